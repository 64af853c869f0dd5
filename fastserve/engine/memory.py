"""Keep freed memory in the process instead of handing it back to the kernel.

glibc serves large allocations (a 26 MB logits tensor, a 206 MB merged output) with a fresh
``mmap`` and returns them with ``munmap`` when freed, so every batch faults its pages in again.
On the virtual machines this runs on, a fresh page costs about 1 us per KiB (measured: filling a
new 206 MB tensor 53 ms, the same tensor again 8 ms), which made the coordinator spend more CPU
on page faults than on its own work while two ranks computed on the same two cores.

:func:`retain_freed_memory` makes glibc serve large blocks from the heap and never trim it: a
freed block is reused by the next one of its size. The price is that resident memory stays at
its high-water mark while work comes. :func:`release_freed_memory` gives the free pages back
(a rank calls it once it has been idle for :data:`IDLE_RELEASE_S`), so an idle rank holds its
weights, not the activations of its busiest moment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# a rank idle this long gives its free pages back; a gap shorter than this keeps them (the next
# batch would only fault them in again)
IDLE_RELEASE_S = 2.0
_done = False


@functools.cache  # loaded once: a rank asks again each time it goes idle
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Tune glibc's malloc for this process (once); False where it is not glibc."""
    global _done
    if _done:
        return True
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (macOS, musl without mallopt)
        return False
    _done = (mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
             and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1)
    return _done


def release_freed_memory() -> bool:
    """Give every whole free page of the heap back to the kernel (glibc's ``malloc_trim``);
    False where there is no such call."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
