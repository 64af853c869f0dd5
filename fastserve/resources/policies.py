"""Allocation policies: how many replicas a deployment should have, step by step, from a stream
of observations. Pure functions (state in, state and decision out), so they can be tested on
synthetic load traces and wired to a live deployment by the service without change.

* ``static``: the planned number of replicas, always (capped by what is available);
* ``dynamic``: allocated = min(available, demand), with hysteresis and a cool-down so that noise
  around a threshold does not make it oscillate;
* ``hybrid``: a static floor that is always held, plus dynamic burst capacity above it.

Demand is measured in replicas (offered load / one replica's throughput), so 2.3 means "a bit
more than two replicas' worth of work".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Protocol


@dataclass(frozen=True)
class Observation:
    """One monitoring step: the demand (in replicas) and the replicas that can be had now."""

    demand: float
    available: int


@dataclass(frozen=True)
class State:
    """What a policy remembers between steps."""

    replicas: int
    since_change: int = 1_000_000  # steps since the last scale change
    low_streak: int = 0  # consecutive steps with demand clearly below the allocation


class Policy(Protocol):
    def start(self) -> State: ...

    def step(self, state: State, obs: Observation) -> State: ...


@dataclass(frozen=True)
class Static:
    """Plan once: ``replicas`` always, or fewer if fewer are available."""

    replicas: int

    def start(self) -> State:
        return State(self.replicas)

    def step(self, state: State, obs: Observation) -> State:
        return replace(state, replicas=min(self.replicas, obs.available))


@dataclass(frozen=True)
class Dynamic:
    """Follow demand: allocated = min(available, ceil(demand)), between ``minimum`` and
    ``maximum``.

    Scaling up happens as soon as demand exceeds the allocation (work would queue) and the
    cool-down since the last change has passed; scaling down waits until one replica fewer
    would still leave ``hysteresis`` replicas of slack, for ``patience`` consecutive steps, so a
    noisy load around a boundary does not flip the allocation back and forth.
    """

    minimum: int = 1
    maximum: int = 1_000_000
    hysteresis: float = 0.5  # replicas of slack before scaling down
    cooldown: int = 3  # steps after a change before the next scale-up
    patience: int = 5  # steps of low demand before a scale-down

    def start(self) -> State:
        return State(self.minimum)

    def target(self, demand: float) -> int:
        return min(self.maximum, max(self.minimum, math.ceil(demand - 1e-9)))

    def step(self, state: State, obs: Observation) -> State:
        current = min(state.replicas, obs.available)  # lost capacity is lost at once
        want = min(self.target(obs.demand), obs.available)
        since = state.since_change + 1
        # "clearly below": one replica fewer would still leave `hysteresis` replicas of slack
        low = state.low_streak + 1 if obs.demand <= current - 1 - self.hysteresis else 0
        new = current
        if want > current and since > self.cooldown:
            new = want
        elif want < current and low >= self.patience:
            new = max(want, self.minimum)
        if new != state.replicas:
            return State(new, since_change=0, low_streak=0)
        return State(new, since_change=since, low_streak=low)


@dataclass(frozen=True)
class Hybrid:
    """A static ``floor`` that is always held, plus dynamic burst capacity up to ``maximum``."""

    floor: int
    maximum: int = 1_000_000
    hysteresis: float = 0.5
    cooldown: int = 3
    patience: int = 5

    @property
    def _burst(self) -> Dynamic:
        return Dynamic(self.floor, self.maximum, self.hysteresis, self.cooldown, self.patience)

    def start(self) -> State:
        return State(self.floor)

    def step(self, state: State, obs: Observation) -> State:
        # the floor is reserved capacity: it is held even when the burst pool is empty
        pool = Observation(obs.demand, max(obs.available, self.floor))
        nxt = self._burst.step(state, pool)
        return nxt if nxt.replicas >= self.floor else replace(nxt, replicas=self.floor)


def simulate(policy: Policy, trace: Iterable[Observation]) -> list[int]:
    """The allocation after each observation of ``trace``."""
    state = policy.start()
    out = []
    for obs in trace:
        state = policy.step(state, obs)
        out.append(state.replicas)
    return out


def scale_changes(allocations: list[int]) -> int:
    """How many times an allocation sequence changed."""
    return sum(1 for a, b in zip(allocations, allocations[1:]) if a != b)
