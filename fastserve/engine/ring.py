"""A ring of shared memory that carries one rank's results to the coordinator on the same host.

A last-stage rank's results are the largest messages of a deployment (GPT-2's logits are 103 MB
per micro-batch of 4 at seq 128). Over an ipc socket each crosses the kernel twice (the rank's
ZeroMQ I/O thread writes it into the socket, the coordinator's reads it out into a fresh
buffer) before the coordinator copies it into its rows of the output, on the cores the ranks
compute on. Through a ring the rank copies each tensor once into shared memory and sends only
the header, whose meta says where each tensor lies (``shm``: ring id, end, offsets); the
coordinator merges straight from the ring into the output and then releases the bytes.

* The ring is a memfd: it has no name in any file system, so nothing is left behind however the
  processes end (the memory goes when the last mapping does), and no path is taken from a
  message. The coordinator creates it and the rank inherits its descriptor at start.
* One writer (the rank) and one reader (the coordinator). The first 8 bytes hold how many bytes
  the reader has released; only the reader writes them. The writer hands out space in order and
  wraps to the start when a message does not fit before the end; a message that does not fit in
  the free space (the coordinator is behind, or it is larger than the ring) goes over the socket
  as usual, so the ring never blocks a rank.
* The reader checks every offset against the ring (the wire does, see
  :func:`fastserve.engine.wire.decode`) and every end against what it has released, and releases
  messages in the order they came, which is the order the rank wrote them.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from typing import Mapping

import numpy as np
import torch

from fastserve.engine.wire import SHM_ALIGN as ALIGN
from fastserve.errors import EngineError, WireError

HEADER = 4096  # the released-bytes counter; the data starts page-aligned after it
# a ring's size is fixed for its life: a rank that shrank it would make the coordinator's next
# read of a dropped page a SIGBUS
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MIN_RING_BYTES = 1 << 20
MAX_RING_BYTES = 1 << 40
DEFAULT_MAX_BYTES = 1 << 30  # what a ring sized from a plan takes at most
# A result smaller than this goes over the socket even where a ring exists: the ring saves the
# kernel's two copies, which is worth its fixed cost (a second header, the copy in, the
# coordinator's bookkeeping and copy out) only for large results. Measured with the MLP's
# 40-byte results on this machine, a request took 849 us over the socket against 1,019 us
# through the ring; at 1 MiB an ipc hop is several hundred us of copies.
INLINE_BYTES = 256 << 10


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def ring_size(result_bytes: int) -> int:
    """A ring for results of about ``result_bytes``: room for two (one being merged while the
    next arrives), in whole MiB, 1 MiB to 1 GiB. Its pages are taken only as they are written,
    and they count in the resident memory of both processes, so it is kept to what a plan
    needs; a larger result goes over the socket."""
    mib = -(-2 * max(0, result_bytes) // MIN_RING_BYTES) * MIN_RING_BYTES
    return min(DEFAULT_MAX_BYTES, max(MIN_RING_BYTES, mib))


class Ring:
    """One link's ring; ``Ring.create(size)`` in the coordinator, ``Ring.open(fd, size)`` in
    the rank that inherited ``fd``."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self._map = mmap.mmap(fd, HEADER + size)
        self._released = np.frombuffer(self._map, np.int64, 1, 0)  # written by the reader only
        self.data = memoryview(self._map)[HEADER:]
        self._written = 0  # writer: bytes handed out (never decreases)
        self._expected = 0  # reader: the end of the last message taken
        # reader: what it has released, kept here too (the shared counter is the writer's to
        # read, and a writer could write it)
        self._freed = 0

    @classmethod
    def create(cls, size: int, name: str = "fastserve-ring") -> Ring:
        if not 0 < size <= MAX_RING_BYTES or size % ALIGN:
            raise EngineError(f"a ring holds 1 byte to 1 TiB, in multiples of {ALIGN}; got "
                              f"{size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        if fd < 3:  # a rank inherits it as the same number: keep clear of stdin, out, err
            low = fd
            fd = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(low)
        try:
            os.ftruncate(fd, HEADER + size)  # sparse: pages are taken as they are written
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, fd: int, size: int) -> Ring:
        """The ring behind an inherited descriptor, which must be a shared-memory file of
        exactly the size the coordinator said."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != HEADER + size or size % ALIGN or \
                fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
            raise EngineError(f"descriptor {fd} is not a sealed ring of {size} bytes")
        return cls(fd, size)

    def close_fd(self) -> None:
        """Close the descriptor; the mapping stays until :meth:`close`."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        self._released = None
        self.data.release()
        try:
            self._map.close()
        except BufferError:  # a tensor still views the ring: the mapping goes with it
            pass

    # --- the writer (a rank) ---------------------------------------------------------------

    def put(self, tensors: Mapping[str, torch.Tensor], min_bytes: int = 0) -> list[int] | None:
        """Copy ``tensors`` into the ring: ``[end, offset, ...]`` for the message's ``shm``
        meta (without the ring id), or None when they do not fit now or take fewer than
        ``min_bytes`` (send them inline)."""
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        need = sum(_aligned(n) for n in sizes)
        if not need or need < min_bytes or need > self.size:
            return None
        start = self._written
        at = start % self.size
        if at + need > self.size:  # not before the end: skip to the start of the ring
            start += self.size - at
            at = 0
        released = int(self._released[0])
        # the bytes still held are [released, written): the new ones must not lap them (an
        # empty ring takes anything that fits)
        if released < self._written and start + need - released > self.size:
            return None
        offsets = []
        for t, n in zip(tensors.values(), sizes):
            if n:
                dst = torch.frombuffer(self.data, dtype=torch.uint8, count=n, offset=at)
                dst.copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            offsets.append(at)
            at += _aligned(n)
        self._written = start + need
        return [self._written, *offsets]

    # --- the reader (the coordinator) -------------------------------------------------------

    def take(self, end: int) -> None:
        """Accept a message whose writer says it ends at ``end``: after every message taken
        before it, and no further ahead of what was released than a writer can place it (a
        skip to the start, under a ring, then at most a ring). Raise WireError otherwise."""
        if not self._expected < end <= self._freed + 2 * self.size:
            raise WireError(f"a shared-memory message ends at {end}, outside the ring's "
                            f"window ({self._expected}, {self._freed + 2 * self.size}]", "shm")
        self._expected = end

    def release(self, end: int) -> None:
        """The bytes of every message up to ``end`` (one taken) may be written again."""
        if end > self._freed:
            self._freed = end
            self._released[0] = end
