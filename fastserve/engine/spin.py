"""Waiting for the next message by polling for a moment before sleeping.

A process that sleeps in ``poll`` between small messages pays twice when it wakes: the wake-up
itself, and its compute, which runs on caches the idle core has lost. Measured on the 2-core VM
this project is developed on (MLP, batch 1): the model takes 160 us back to back in one process,
but 360 us in a plain pyzmq process that sleeps between requests, and 216-311 us in one that
polls instead. So a rank polls for ``spin_us`` after each message it handled, and the
coordinator polls while its results are due, before either sleeps in ``poll``. Between tries
the core is yielded, so a process with work on the same core runs first.

Polling burns its core, so a deployment polls only on a machine with a core for every rank
thread it runs there (:func:`spin_window`); with more, sleeping leaves the cores to compute.
The coordinator is not counted: it mostly waits, and yields to compute when it polls. Measured
side by side (2 stages of 1 thread and the coordinator on 2 cores): a batch-1 MLP request took
1.18 ms with every process polling, 1.29 with the ranks alone, 1.57 with none, and a batch of
GPT-2 (32 x 64 tokens, 8 micro-batches) 5.17, 5.02 and 5.42 s: a busy pipeline rarely polls,
since its messages wait for it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, TypeVar

SPIN_US = 1000  # default window: covers a small request's round trip through a rank
MAX_SPIN_US = 100_000

T = TypeVar("T")


def poll_briefly(poll: Callable[[int], T], seconds: float) -> T:
    """``poll(0)`` until it returns something true or ``seconds`` have passed; its last
    result. The caller then waits the usual way (a blocking ``poll``) if nothing came."""
    end = time.perf_counter() + seconds
    while True:
        got = poll(0)
        if got or time.perf_counter() >= end:
            return got
        os.sched_yield()


class Waiter:
    """Waits for a message, polling first for up to ``spin_us`` while the last wait was no
    longer than that: a message that came quickly is likely to come quickly again, and one
    that took longer would only have burnt the core (a pipeline busy with large batches, a
    rank that sits idle) before the blocking wait."""

    def __init__(self, spin_us: int) -> None:
        self.window = spin_us / 1e6
        self.short = False  # the last wait ended within the window

    def wait(self, poll: Callable[[int], T], timeout_ms: int) -> T:
        """``poll(timeout_ms)``, preceded by a moment of polling when the last wait was short."""
        start = time.perf_counter()
        got = poll_briefly(poll, min(self.window, timeout_ms / 1e3)) \
            if self.short and self.window else None
        if not got:
            got = poll(timeout_ms)
        self.short = bool(got) and time.perf_counter() - start <= self.window
        return got


def spin_window(threads: Iterable[int], cores: int, spin_us: int = SPIN_US) -> int:
    """The polling window (us) for processes whose busy threads are ``threads`` on a machine
    of ``cores``: ``spin_us`` when every thread has a core of its own, else 0."""
    return spin_us if sum(threads) <= cores else 0
