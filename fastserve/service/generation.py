"""Generation in a service: completions queued like requests, replicas that run the
iteration-level loop over their ranks, tokens streamed back as they come.

A :class:`Completion` waits in the service's :class:`~fastserve.service.queue.RequestQueue`
(bounded admission, deadlines) until a :class:`GenerationReplica` has room for more sequences;
the replica's :class:`~fastserve.generate.Generator` then runs it with the others, and each
token goes to the completion's sink as soon as the last stage has sampled it.

A replica that fails (a rank died or hung) hands back its completions with the tokens already
sent: the next run starts from the prompt plus those tokens and asks only for the rest, so the
stream continues without a gap or a duplicate (sampling is seeded by position, so even a
sampled stream continues as it would have).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastserve.errors import EngineError, ServiceError
from fastserve.generate import DeploymentPipeline, Generator, Request, Sampling
from fastserve.generate import scheduler as make_scheduler
from fastserve.service.replica import HEALTH_EVERY_S, Replica

Sink = Callable[[str, Any], None]  # ("token", id) | ("done", reason) | ("error", ServiceError)


@dataclass(eq=False)
class Completion:
    """One generation request as the service holds it. ``sent`` are the tokens delivered to
    the caller so far; ``end`` and ``fail`` reach the sink exactly once between them."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    eos: tuple[int, ...]
    deadline: float  # time.monotonic() by which a replica must have taken it
    sink: Sink
    sent: list[int] = field(default_factory=list)
    attempts: int = 0
    accepted: float = field(default_factory=time.monotonic)
    taken: float | None = None
    first_token: float | None = None
    samples: int = 1  # what the queue counts
    shape: tuple = ("completion",)
    cancelled: threading.Event = field(default_factory=threading.Event)
    gone: bool = False  # cancelled because its caller went away (not answered: not "ok")
    _ended: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ended(self) -> bool:
        return self._ended

    def request(self) -> Request:
        """What is left to generate: from the prompt and the tokens already sent."""
        return Request(self.prompt + self.sent, self.max_tokens - len(self.sent),
                       self.sampling, self.eos)

    def token(self, token: int) -> None:
        with self._lock:
            if self._ended:
                return
            if self.first_token is None:
                self.first_token = time.monotonic()
            self.sent.append(token)
        self._tell("token", token)

    def end(self, reason: str) -> bool:
        return self._close("done", reason)

    def fail(self, error: ServiceError) -> bool:
        return self._close("error", error)

    def cancel(self, gone: bool = False) -> None:
        """The caller needs no more: a stop string, or (``gone``) it went away."""
        if gone and not self._ended:
            self.gone = True
        self.cancelled.set()

    def _close(self, kind: str, value: Any) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        self._tell(kind, value)
        return True

    def _tell(self, kind: str, value: Any) -> None:
        """Hand an event to the sink; a sink that fails means the caller is gone (its event
        loop closed): the generation is cancelled, and the replica's thread goes on."""
        try:
            self.sink(kind, value)
        except Exception:
            self.cancelled.set()


class GenerationReplica(Replica):
    """A replica that generates: its thread admits completions while its generator has room,
    polls the generator, and hands each token to its completion."""

    def __init__(self, *args, scheduler: str = "fcfs", max_seqs: int = 8, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scheduler, self.max_seqs = scheduler, max_seqs
        self._active: dict[int, Completion] = {}  # sequence id -> completion

    def _serve(self) -> bool:
        dep = self.dep
        pipe = DeploymentPipeline(dep, self.stats)
        gen = Generator(pipe, make_scheduler(self.scheduler), max_seqs=self.max_seqs)
        # twice what fills every stage: the next sequences are there when others end
        capacity = 2 * self.max_seqs * pipe.stages
        self._active = {}
        answered = False
        busy_since = None
        last_health = time.monotonic()
        while not self._halt.is_set():
            if not self._drain.is_set() and gen.active < capacity:
                for c in self.queue.take(0.0 if gen.active else 0.02, eager=True):
                    self._admit(gen, c)
            for sid, c in list(self._active.items()):
                if c.cancelled.is_set():
                    gen.cancel(sid)
            for ev in gen.poll(wait_ms=5):
                c = self._active.get(ev.seq)
                if c is None:
                    continue
                if ev.token is not None:
                    c.token(ev.token)
                    answered = self._answered = True
                if ev.error:
                    c.fail(ServiceError(f"the model failed on this request: {ev.error}", 500))
                elif ev.done:
                    c.end("stop" if ev.done == "cancelled" else ev.done)
                if ev.done:
                    del self._active[ev.seq]
            self.held = len(self._active)
            # seconds with work (the flow counts each sequence's step as a sample: a token)
            if self._active and busy_since is None:
                busy_since = time.monotonic()
            elif not self._active and busy_since is not None:
                self.busy_s += time.monotonic() - busy_since
                busy_since = None
            # drained once the ranks have dropped every cache; waiting for that here, not in
            # gen.drain(), keeps the stall and health checks below on a rank that hangs
            if self._drain.is_set() and not self._active and gen.idle:
                return answered
            if pipe.flow.stalled():
                raise EngineError(f"no result for {dep.timeout:.0f} s although the ranks "
                                  f"answer health checks (limits.deadline_s)")
            if time.monotonic() - last_health >= HEALTH_EVERY_S:
                dep.control("health", timeout=max(0.5, self.hang_s - HEALTH_EVERY_S))
                last_health = time.monotonic()
        return answered

    def _admit(self, gen: Generator, c: Completion) -> None:
        c.taken = c.taken or time.monotonic()  # (its queue time ends once, when first taken)
        if c.ended:
            return
        if c.cancelled.is_set() or len(c.sent) >= c.max_tokens:
            c.end("stop" if c.cancelled.is_set() else "length")
            return
        try:
            sid = gen.submit(c.request())
        except ValueError as e:  # checked at admission; a plan's budget may still refuse it
            c.fail(ServiceError(f"cannot generate: {e}", 400))
            return
        self._active[sid] = c
        self.held = len(self._active)  # at once: a drain must not miss it

    def _take_held(self) -> list[Completion]:
        """The completions in flight, which go back to the queue with the tokens they have
        sent when the deployment fails (:meth:`Replica._failed`). Each gets its time in the
        queue again from now: its admission deadline is long past for a long generation, and
        its stream goes on where it stopped."""
        held = [c for c in self._active.values() if not c.ended]
        now = time.monotonic()
        for c in held:
            c.deadline = now + (c.deadline - c.accepted)
        self._active = {}
        self.held = 0
        return held
