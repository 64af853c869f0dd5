"""Which sequences run in the next step: FCFS and skip-join MLFQ, as functions of the queue.

The generation loop (:mod:`fastserve.generate.loop`) calls a scheduler's :meth:`pick` whenever a
micro-batch can go out, with the state of every sequence on that replica; the scheduler answers
which sequences run and whose KV cache to drop first. ``pick`` changes nothing: the loop applies
the answer, and after each step asks :meth:`account` for the sequence's new level. So both are
tested on plain values, without a process.

* **FCFS** (Orca's iteration-level batching): sequences run in arrival order; a sequence is
  admitted when its prompt plus its whole output fits in the KV budget, and then runs to
  completion. A long job at the head makes everyone behind it wait.
* **Skip-join MLFQ** (FastServe, Wu et al. 2023): priority levels with quanta that double per
  level; a job joins at the first level whose quantum covers its prefill (skipping the levels
  above it), is demoted when it has used its level's quantum, and is preempted at token
  granularity by any job of a higher level. A job that has waited ``starve_s`` runs as the top
  level (the starvation guard). KV grows as tokens come; when it runs out, the cache of the
  lowest-priority waiting job is dropped and recomputed from its tokens when it runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeqState:
    """What a scheduler sees of one sequence."""

    id: int
    arrival: float
    prompt: int  # prompt tokens
    max_tokens: int
    generated: int = 0
    cached: int = 0  # positions held in the stages' KV caches
    in_flight: bool = False
    level: int = 0
    attained: float = 0.0  # service seconds at its level
    last_run: float = 0.0  # when it last ran (its arrival until it has)

    @property
    def length(self) -> int:
        return self.prompt + self.generated

    @property
    def holds_kv(self) -> bool:
        return self.cached > 0 or self.in_flight


@dataclass(frozen=True)
class Costs:
    """Measured step costs: a decode step's seconds, and a prompt token's prefill seconds."""

    step_s: float = 0.01
    token_s: float = 0.001

    def prefill_s(self, tokens: int) -> float:
        return self.token_s * tokens


@dataclass(frozen=True)
class Pick:
    run: list[int] = field(default_factory=list)
    evict: list[int] = field(default_factory=list)


class FCFS:
    """First come, first served, run to completion, KV reserved for the whole output."""

    name = "fcfs"

    def join(self, seq: SeqState, costs: Costs) -> int:
        return 0

    def reserve(self, seq: SeqState) -> int:
        return seq.prompt + seq.max_tokens

    def pick(self, seqs: list[SeqState], max_seqs: int, kv_tokens: int, now: float,
             costs: Costs) -> Pick:
        used = sum(self.reserve(s) for s in seqs if s.holds_kv)
        run: list[int] = []
        for s in sorted((s for s in seqs if not s.in_flight), key=lambda s: (s.arrival, s.id)):
            if len(run) == max_seqs:
                break
            if not s.holds_kv:
                if used + self.reserve(s) > kv_tokens:
                    break  # strictly in order: nobody overtakes the head of the queue
                used += self.reserve(s)
            run.append(s.id)
        return Pick(run)

    def account(self, seq: SeqState, seconds: float, costs: Costs) -> tuple[int, float]:
        return seq.level, seq.attained + seconds


@dataclass(frozen=True)
class MLFQ:
    """Skip-join multi-level feedback queue. Level ``i``'s quantum is ``costs.step_s * quantum
    * 2**i`` seconds of service."""

    levels: int = 6
    quantum: float = 4.0  # level 0's quantum in decode steps
    starve_s: float = 5.0

    name = "mlfq"

    def quantum_s(self, level: int, costs: Costs) -> float:
        return costs.step_s * self.quantum * 2 ** level

    def join(self, seq: SeqState, costs: Costs) -> int:
        """The first level whose quantum covers the job's prefill (skip-join)."""
        prefill = costs.prefill_s(seq.prompt)
        for level in range(self.levels):
            if self.quantum_s(level, costs) >= prefill:
                return level
        return self.levels - 1

    def reserve(self, seq: SeqState) -> int:
        """Positions held: what is cached, plus the one a decode step in flight adds (a
        prefill in flight adds the whole sequence)."""
        if seq.cached:
            return seq.cached + (1 if seq.in_flight else 0)
        return seq.length

    def priority(self, seq: SeqState, now: float) -> tuple:
        level = 0 if now - seq.last_run >= self.starve_s else seq.level
        return (level, seq.arrival, seq.id)

    def pick(self, seqs: list[SeqState], max_seqs: int, kv_tokens: int, now: float,
             costs: Costs) -> Pick:
        used = sum(self.reserve(s) for s in seqs if s.holds_kv)
        waiting = sorted((s for s in seqs if not s.in_flight),
                         key=lambda s: self.priority(s, now))
        # whose cache may be dropped: cached, not running now, lowest priority first
        victims = [s for s in reversed(waiting) if s.cached]
        run: list[int] = []
        evict: list[int] = []
        for s in waiting:
            if len(run) == max_seqs:
                break
            if s.id in evict:
                continue
            need = 1 if s.cached else s.length  # the positions this step adds
            mine = self.priority(s, now)
            # evict only when dropping every lower-priority cache would make room (in-flight
            # sequences hold the rest): else the victims recompute and nothing is gained
            freeable = sum(v.cached for v in victims if v is not s and
                           self.priority(v, now) > mine)
            if used + need - freeable > kv_tokens:
                continue
            while used + need > kv_tokens and victims and \
                    self.priority(victims[0], now) > mine:
                v = victims.pop(0)
                evict.append(v.id)
                used -= v.cached
            if used + need > kv_tokens:
                continue  # does not fit now; a smaller job behind it may
            used += need
            run.append(s.id)
            victims = [v for v in victims if v is not s]
        return Pick(run, evict)

    def account(self, seq: SeqState, seconds: float, costs: Costs) -> tuple[int, float]:
        """The level and attained service after ``seconds`` more: demoted once the level's
        quantum is used."""
        attained = seq.attained + seconds
        if attained >= self.quantum_s(seq.level, costs) and seq.level < self.levels - 1:
            return seq.level + 1, 0.0
        return seq.level, attained


SCHEDULERS = {"fcfs": FCFS, "mlfq": MLFQ}


def scheduler(name: str):
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler '{name}'; expected one of "
                         f"{', '.join(SCHEDULERS)}") from None
