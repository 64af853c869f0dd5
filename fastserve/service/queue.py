"""Admission and dynamic batching: the queue between the HTTP front and the replicas.

A request is admitted only while fewer than ``max_queue`` wait, and while the work ahead of it
is expected to take no longer than ``budget_s`` (the samples queued and held by replicas, in
batches of at most ``max_batch``, each batch costing what the replicas were measured to
answer at: seconds per batch plus seconds per sample; generations, whose length is not known
ahead, are bounded by ``max_queue`` only); beyond either bound the caller gets an immediate
:class:`ServiceError` 503, so admitted requests keep their latency. Replicas take
work from the one shared queue when they have room, so routing is least-loaded by construction.
:meth:`RequestQueue.take` hands out the oldest request together with younger ones of the same
shape, up to ``max_batch`` samples, as soon as that batch is full or its oldest request has
waited ``max_wait``; requests of other shapes form their own batches.

Every request is answered exactly once: :meth:`Request.answer` and :meth:`Request.fail` set its
future only if nothing has, and a request whose replica failed is put back at the front.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Mapping

import torch

from fastserve.errors import ServiceError

# weight of the newest answered batch in the measured batch cost: ten or so batches follow a
# change of load, a single slow one does not swing admission
RATE_WEIGHT = 0.1
# answered batch sizes must spread this much (variance, samples squared) to tell a batch's
# fixed cost from its cost per sample; below it, the cost is taken as proportional
SPREAD = 0.25
# answers of one size after which the slope last measured is no longer trusted: a slope fitted
# from a few odd batches (one measured short beside another replica's answer) would otherwise
# be kept for as long as the load stays at one size, and admit far more than the budget
KEPT_ANSWERS = round(1 / RATE_WEIGHT ** 2)


@dataclass(eq=False)
class Request:
    """One caller's inputs, the future its answer goes to, and its bookkeeping."""

    inputs: dict[str, torch.Tensor]
    samples: int
    shape: tuple  # requests with equal shapes can share a batch
    deadline: float  # time.monotonic() after which it is answered 504
    accepted: float = field(default_factory=time.monotonic)
    attempts: int = 0  # runs that failed because a replica failed
    taken: float | None = None  # when a replica last took it
    running: bool = False  # a replica holds it (counted in the queue's work in flight)
    future: Future = field(default_factory=Future)

    @property
    def ended(self) -> bool:
        """It has its answer (or its error)."""
        return self.future.done()

    def answer(self, outputs: Mapping[str, torch.Tensor]) -> bool:
        """Deliver the outputs; False if the request already had its answer."""
        try:
            self.future.set_result(dict(outputs))
            return True
        except InvalidStateError:
            return False

    def fail(self, error: BaseException) -> bool:
        try:
            self.future.set_exception(error)
            return True
        except InvalidStateError:
            return False


def shape_key(inputs: Mapping[str, torch.Tensor], batched: set[str]) -> tuple:
    """What must be equal for requests to be concatenated: every input's name and dtype, the
    dims after the batch dim of batched inputs, and the whole of the others."""
    return tuple((name, str(t.dtype), tuple(t.shape[1:] if name in batched else t.shape))
                 for name, t in sorted(inputs.items()))


class RequestQueue:
    """Bounded FIFO of admitted requests, taken in batches of one shape."""

    def __init__(self, max_queue: int, max_batch: int, max_wait_s: float,
                 mergeable: bool = True, budget_s: float = math.inf) -> None:
        """``mergeable`` False: every batch is one request (the graph has inputs that are
        not batched, which concatenation would change). ``budget_s``: the longest expected
        wait a request is admitted into."""
        self.max_queue, self.max_batch, self.max_wait_s = max_queue, max_batch, max_wait_s
        self.mergeable = mergeable
        self.budget_s = budget_s
        self._items: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed: str | None = None
        # a batch of n samples takes per_batch + n * per_sample seconds, as measured: a model
        # that streams its weights once per batch answers a batch of 8 in much less than 8
        # times one, and a proportional estimate would refuse the batches that keep up
        self.per_sample: float | None = None
        self.per_batch = 0.0
        self._moments: tuple[float, float, float, float] | None = None  # n, t, n*n, n*t
        self._slope: float | None = None  # seconds per sample, when batch sizes last spread
        self._kept = 0  # answers since then
        self._last_answer: float | None = None
        self._running = 0  # samples of the requests replicas hold, not yet answered

    def __len__(self) -> int:
        return len(self._items)

    def put(self, request: Request) -> None:
        """Admit ``request`` or refuse it at once (503): the queue is full, its work would
        outlast the budget, or it is closed."""
        with self._cond:
            self._admit()
            self._items.append(request)
            self._cond.notify()
        if isinstance(request, Request):  # a generation has no future: its sink is told
            request.future.add_done_callback(lambda _f: self._ended(request))

    def _ended(self, request: Request) -> None:
        with self._cond:  # (reentrant: _expire and drain end requests under it)
            if request.running:
                request.running = False
                self._running -= request.samples
            elif request in self._items:  # withdrawn by its caller while queued: never run
                self._items.remove(request)

    def admits(self) -> None:
        """Raise the 503 that :meth:`put` would raise now (the HTTP front asks before it
        reads a body: under overload, refusing costs less than parsing)."""
        with self._cond:
            self._admit()

    def _admit(self) -> None:
        if self._closed is not None:
            raise ServiceError(self._closed, 503)
        if len(self._items) >= self.max_queue:
            raise ServiceError(f"overloaded: {len(self._items)} requests already wait "
                               f"(limits.max_queue); retry shortly", 503)
        wait = self.expected_wait()
        if wait > self.budget_s:
            raise ServiceError(f"overloaded: the requests queued and running need about "
                               f"{wait * 1e3:.0f} ms, more than the {self.budget_s * 1e3:.0f} "
                               f"ms a request may wait (limits.queue_budget_ms); retry "
                               f"shortly", 503, retry_after=wait)

    def expected_wait(self) -> float:
        """Seconds the requests queued and those the replicas hold are expected to take, in
        batches of at most ``max_batch`` samples at the measured cost (0 before anything was
        answered, and when nothing is queued or running: a request is never refused for its
        own cost)."""
        if self.per_sample is None:
            return 0.0
        queued = sum(r.samples for r in self._items)
        # (requests of other shapes would form batches of their own: not worth counting)
        batches = (-(-queued // self.max_batch) if self.mergeable else len(self._items)) \
            + -(-self._running // self.max_batch)
        return self.per_sample * (queued + self._running) + self.per_batch * batches

    def answered(self, samples: int, taken: float) -> None:
        """A replica answered a batch of ``samples`` it took at ``taken`` (time.monotonic).
        The time it stands for runs from the later of ``taken`` and the previous answer of
        any replica: idle time is not counted, and replicas answering side by side count
        as the faster drain they are."""
        now = time.monotonic()
        with self._cond:
            start = taken if self._last_answer is None else max(taken, self._last_answer)
            self._last_answer = now
            self._fit(max(1, samples), max(0.0, now - start))

    def _fit(self, n: int, seconds: float) -> None:
        """Move the batch cost towards a batch of ``n`` samples taking ``seconds``: a least
        squares line through the answered batches, the newest weighing ``RATE_WEIGHT``."""
        x = (n, seconds, n * n, n * seconds)
        m = x if self._moments is None else tuple(
            old + RATE_WEIGHT * (new - old) for old, new in zip(self._moments, x))
        self._moments = m
        mean_n, mean_t, nn, nt = m
        spread = nn - mean_n * mean_n
        if spread >= SPREAD:
            self._slope, self._kept = (nt - mean_n * mean_t) / spread, 0
        elif self._slope is not None:
            self._kept += 1
            if self._kept > KEPT_ANSWERS:
                self._slope = None
        # batches of one size (as a steady load makes them) only say what that size costs:
        # the line keeps the slope last measured and goes through them
        per_sample = self._slope if self._slope is not None else -1.0
        per_batch = mean_t - per_sample * mean_n
        if per_sample < 0 or per_batch < 0:  # no spread seen yet, or noise: proportional
            per_sample, per_batch = nt / nn, 0.0
        self.per_sample, self.per_batch = per_sample, per_batch

    def requeue(self, requests: list[Request]) -> None:
        """Put back the requests a failed replica held, first in line, in their order. They
        were admitted once, so the bound does not apply again."""
        with self._cond:
            for r in requests:
                if isinstance(r, Request) and r.running:
                    r.running = False
                    self._running -= r.samples
            self._items.extendleft(reversed(requests))
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        """Admit nothing more (``put`` raises 503 with ``reason``); queued work stays."""
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    def take(self, timeout: float, eager: bool = False) -> list[Request]:
        """The next batch, waiting up to ``timeout`` seconds for one to be ready; [] if none
        is. ``eager``: whatever is queued is ready (the caller is idle, so waiting for more
        would only add latency). Requests past their deadline are answered 504 on the way."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                self._expire()
                now = time.monotonic()
                if self._items:
                    batch, full = self._gather()
                    ready_at = self._items[0].accepted + self.max_wait_s
                    if full or eager or now >= ready_at or self._closed is not None:
                        for r in batch:
                            self._items.remove(r)
                            if isinstance(r, Request):
                                r.running = True
                                self._running += r.samples
                        return batch
                    wake = min(end, ready_at)
                else:
                    wake = end
                if now >= end:
                    return []
                self._cond.wait(max(0.0, wake - now))

    def _gather(self) -> tuple[list[Request], bool]:
        """The oldest request and the next ones of its shape that fit; and whether the batch
        is full (no more can join it)."""
        first = self._items[0]
        batch, samples = [first], first.samples
        if not self.mergeable:
            return batch, True
        for r in list(self._items)[1:]:
            if r.shape != first.shape:
                continue
            if samples + r.samples > self.max_batch:
                return batch, True
            batch.append(r)
            samples += r.samples
        return batch, samples >= self.max_batch

    def expire(self) -> None:
        """Answer 504 to the requests whose deadline has passed (also done by every take:
        this is for when no replica takes anything)."""
        with self._cond:
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        if self._items and min(r.deadline for r in self._items) <= now:
            for r in [r for r in self._items if r.deadline <= now]:
                self._items.remove(r)
                r.fail(ServiceError("deadline passed before a replica could take the request "
                                    "(limits.deadline_s)", 504))

    def drain(self, error: ServiceError) -> None:
        """Answer everything still queued with ``error`` (the service is stopping)."""
        with self._cond:
            while self._items:
                self._items.popleft().fail(error)
