"""The iteration-level generation loop: sequences join and leave between steps.

A :class:`Generator` drives a :class:`~fastserve.generate.pipeline.Pipeline` (rank processes,
or the same stage cores in this process). Whenever a replica has fewer than ``stages``
micro-batches in flight, the scheduler picks the sequences of the next one among those of that
replica not already in flight (a sequence is in at most one micro-batch), so with P stages P
micro-batches keep every stage busy. A sequence's first step is its prefill (its whole prompt,
or after its cache was dropped its prompt and every token so far); each later step sends its
last token. The last stage samples and only token ids come back.

Caches are dropped by the next message to the replica (``free``, applied before the step), or
by a message of its own when nothing else goes out.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from fastserve.errors import RankError
from fastserve.generate.scheduler import FCFS, Costs, SeqState
from fastserve.graph.decode import Sampling


@dataclass(frozen=True)
class Request:
    """One generation: prompt token ids, how many tokens at most, how to sample, which token
    ids end it (an end-of-sequence token is returned as the last token)."""

    prompt: Sequence[int]
    max_tokens: int = 16
    sampling: Sampling = Sampling()
    eos: tuple[int, ...] = ()


@dataclass(frozen=True)
class Event:
    """A token of sequence ``seq`` (``token`` None when it ended without one); ``done`` is why
    it ended ("length", "eos", "cancelled", "error"), None while it goes on."""

    seq: int
    token: int | None
    done: str | None = None
    error: str | None = None


@dataclass
class _Seq:
    request: Request
    state: SeqState
    replica: int
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    cancelled: bool = False  # ends when its step in flight comes back
    sample: list = field(init=False)  # its sampling as a step carries it, built once

    def __post_init__(self) -> None:
        self.sample = self.request.sampling.to_wire()

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.state.prompt:]


def refusal(prompt: Sequence[int], max_tokens: int, vocab: int | None,
            max_len: int | None) -> str | None:
    """Why a model with ``vocab`` token ids and ``max_len`` positions cannot run a request,
    or None."""
    if not prompt:
        return "a prompt needs at least one token"
    if max_tokens < 1:
        return f"max_tokens must be at least 1, got {max_tokens}"
    if vocab is not None and not all(0 <= t < vocab for t in prompt):
        return f"prompt token ids must be within [0, {vocab})"
    if max_len is not None and len(prompt) + max_tokens > max_len:
        return (f"a prompt of {len(prompt)} tokens plus {max_tokens} new ones is longer "
                f"than the {max_len} positions of this model")
    return None


class Generator:
    """Generate for many requests at once over ``pipeline``.

    ``max_seqs``: sequences per micro-batch. ``kv_tokens``: positions each replica's caches may
    hold (the scheduler keeps within it; default: what every stage's rank can hold). ``max_len``: the longest sequence the
    model takes (default: the pipeline's, its learned positions)."""

    def __init__(self, pipeline, scheduler=None, *, max_seqs: int = 8,
                 kv_tokens: int | None = None, max_len: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        kv_tokens = kv_tokens if kv_tokens is not None else pipeline.kv_tokens
        if max_seqs < 1 or kv_tokens < 1:
            raise ValueError("max_seqs and kv_tokens must be at least 1")
        self.pipeline = pipeline
        self.scheduler = scheduler or FCFS()
        self.max_seqs, self.kv_tokens = max_seqs, kv_tokens
        self.max_len = max_len if max_len is not None else getattr(pipeline, "max_len", None)
        self.clock = clock
        self.costs = Costs()
        # sequence ids from a random base: a rank's caches outlive a generator that stopped
        # without dropping them, and another generator's sequences must not meet them
        self._ids = itertools.count(secrets.randbits(40) << 20)
        self._keys = itertools.count()
        self._seqs: dict[int, _Seq] = {}
        self._flight: dict[int, tuple[int, list[int], float]] = {}  # key -> replica, seqs, sent
        self._flying = [0] * pipeline.replicas  # steps in flight per replica
        self._free: list[list[int]] = [[] for _ in range(pipeline.replicas)]
        self._events: list[Event] = []
        # the last steps: (prompt tokens prefilled, sequences, seconds from send to result)
        self.steps: deque[tuple[int, int, float]] = deque(maxlen=10_000)

    # --- requests ------------------------------------------------------------------------------

    def submit(self, request: Request) -> int:
        """Queue ``request``; its sequence id."""
        prompt = [int(t) for t in request.prompt]
        problem = refusal(prompt, request.max_tokens, self.pipeline.vocab, self.max_len)
        if problem:
            raise ValueError(problem)
        if len(prompt) + request.max_tokens > self.kv_tokens:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {request.max_tokens} new "
                             f"ones does not fit the KV budget of {self.kv_tokens} tokens")
        sid = next(self._ids)
        now = self.clock()
        load = [0] * self.pipeline.replicas
        for s in self._seqs.values():
            load[s.replica] += 1
        state = SeqState(sid, now, len(prompt), request.max_tokens, last_run=now)
        state.level = self.scheduler.join(state, self.costs)
        self._seqs[sid] = _Seq(request, state, load.index(min(load)), list(prompt))
        return sid

    def cancel(self, sid: int) -> None:
        """End sequence ``sid`` now (a stop string was seen); its cache is dropped."""
        s = self._seqs.get(sid)
        if s is not None and not s.state.in_flight:
            self._finish(s, "cancelled")
        elif s is not None:
            s.cancelled = True

    @property
    def active(self) -> int:
        """Sequences not finished."""
        return len(self._seqs)

    def drain(self, cancel: bool = False) -> list[Event]:
        """Run until no sequence is left and every cache is dropped (``cancel``: end every
        sequence now); the events on the way."""
        events: list[Event] = []
        if cancel:
            for sid in list(self._seqs):
                self.cancel(sid)
        while not self.idle:
            events += self.poll()
        return events + self.poll()

    @property
    def idle(self) -> bool:
        """No sequence left, nothing in flight, no cache left to drop."""
        return not (self._seqs or self._flight or any(self._free))

    def kv_in_use(self) -> int:
        """Positions the caches hold for running sequences (all replicas)."""
        return sum(s.state.cached for s in self._seqs.values())

    # --- the loop ------------------------------------------------------------------------------

    def poll(self, wait_ms: int = 100) -> list[Event]:
        """Send what can go out, take one result (waiting up to ``wait_ms``), and return the
        events that came of it."""
        self._fill()
        if self._flight:
            try:
                got = self.pipeline.receive(wait_ms)
            except RankError as e:
                key = getattr(e, "key", None)
                if key not in self._flight:
                    raise
                self._failed(key, str(e))
                got = None
            if got is not None:
                self._result(*got)
        events, self._events = self._events, []
        return events

    def run(self, requests: Sequence[Request]) -> list[list[int]]:
        """Every request's generated tokens, in order."""
        ids = [self.submit(r) for r in requests]
        out: dict[int, list[int]] = {i: [] for i in ids}
        errors: dict[int, str] = {}
        while any(i in self._seqs for i in ids) or self._flight or any(self._free):
            for ev in self.poll():
                if ev.token is not None and ev.seq in out:
                    out[ev.seq].append(ev.token)
                if ev.error and ev.seq in out:
                    errors[ev.seq] = ev.error
        if errors:
            sid, text = next(iter(errors.items()))
            raise RankError(f"sequence {sid} failed: {text}")
        return [out[i] for i in ids]

    def stream(self, request: Request) -> Iterator[int]:
        """The tokens of one request as they come."""
        sid = self.submit(request)
        try:
            while sid in self._seqs:
                for ev in self.poll():
                    if ev.seq != sid:
                        continue
                    if ev.error:
                        raise RankError(f"sequence {sid} failed: {ev.error}")
                    if ev.token is not None:
                        yield ev.token
        finally:
            self.cancel(sid)

    def _fill(self) -> None:
        now = self.clock()
        for replica in range(self.pipeline.replicas):
            while self._flying[replica] < self.pipeline.stages:
                seqs = [s.state for s in self._seqs.values() if s.replica == replica]
                if all(st.in_flight for st in seqs):
                    break  # (a scheduler picks and evicts only sequences not in flight)
                pick = self.scheduler.pick(seqs, self.max_seqs, self.kv_tokens, now,
                                           self.costs)
                for sid in pick.evict:
                    s = self._seqs[sid]
                    s.state.cached = 0
                    self._free[replica].append(sid)
                if not pick.run:
                    break
                self._send(replica, [self._seqs[i] for i in pick.run], now)
            if self._free[replica] and not self._flying[replica]:
                self._send(replica, [], now)  # only caches to drop

    def _send(self, replica: int, seqs: list[_Seq], now: float) -> None:
        ids, segments, sample = [], [], []
        for s in seqs:
            new = s.tokens[s.state.cached:]
            segments.append([s.state.id, s.state.cached, len(new)])
            ids.extend(new)
            sample.append(s.sample)
            s.state.in_flight = True
            s.state.last_run = now
        free, self._free[replica] = self._free[replica], []
        meta = {"seqs": segments, "free": free, "sample": sample}
        key = next(self._keys)
        self._flight[key] = (replica, [s.state.id for s in seqs], time.perf_counter())
        self._flying[replica] += 1
        # (from numpy: torch.tensor of a list costs twice as much, on every step)
        self.pipeline.send(replica, key, torch.from_numpy(np.array([ids], dtype=np.int64)),
                           meta)

    def _result(self, key: int, tokens: torch.Tensor) -> None:
        replica, sids, sent = self._flight.pop(key)
        self._flying[replica] -= 1
        seconds = time.perf_counter() - sent
        seqs = [self._seqs[i] for i in sids]
        if seqs:
            self._measure(seqs, seconds)
        if tokens.shape != (len(seqs),):
            for s in seqs:
                self._finish(s, "error", f"the last stage sent {tuple(tokens.shape)} tokens "
                                         f"for {len(seqs)} sequences")
            return
        for s, token in zip(seqs, tokens.tolist()):
            st = s.state
            st.in_flight = False
            if s.cancelled:  # its caller wants no more: the token is not given out
                self._finish(s, "cancelled")
                continue
            st.cached = len(s.tokens)
            st.level, st.attained = self.scheduler.account(st, seconds, self.costs)
            s.tokens.append(token)
            st.generated += 1
            if token in s.request.eos:
                self._finish(s, "eos", token=token)
            elif st.generated >= s.request.max_tokens:
                self._finish(s, "length", token=token)
            else:
                self._events.append(Event(st.id, token))

    def _measure(self, seqs: list[_Seq], seconds: float) -> None:
        """Keep running estimates of a decode step and a prompt token's cost (for MLFQ)."""
        prefill = sum(len(s.tokens) - s.state.cached for s in seqs if not s.state.cached)
        self.steps.append((prefill, len(seqs), seconds))
        if prefill >= 8:
            self.costs = Costs(self.costs.step_s, 0.8 * self.costs.token_s +
                               0.2 * seconds / prefill)
        elif not prefill:
            self.costs = Costs(0.8 * self.costs.step_s + 0.2 * seconds, self.costs.token_s)

    def _failed(self, key: int, text: str) -> None:
        replica, sids, _ = self._flight.pop(key)
        self._flying[replica] -= 1
        for sid in sids:
            self._finish(self._seqs[sid], "error", text)

    def _finish(self, s: _Seq, why: str, error: str | None = None, token: int | None = None
                ) -> None:
        s.state.in_flight = False
        self._seqs.pop(s.state.id, None)
        self._free[s.replica].append(s.state.id)
        self._events.append(Event(s.state.id, token, why, error))
