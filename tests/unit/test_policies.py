"""Allocation policies on synthetic load traces: steps, bursts, a ramp, noise."""

from __future__ import annotations

import math
import random

import pytest

from fastserve.resources.policies import (Dynamic, Hybrid, Observation, Static, scale_changes,
                                          simulate)


def trace(demands, available=8):
    avail = available if isinstance(available, list) else [available] * len(demands)
    return [Observation(d, a) for d, a in zip(demands, avail)]


STEP = [1.0] * 20 + [4.0] * 20 + [2.0] * 30
BURST = [1.0] * 15 + [7.5] * 3 + [1.0] * 30
RAMP = [i / 10 for i in range(0, 80)] + [8 - i / 10 for i in range(0, 80)]
rng = random.Random(7)
NOISE = [3.0 + rng.uniform(-0.45, 0.45) for _ in range(200)]  # jitter around 3 replicas


@pytest.mark.parametrize("demands", [STEP, BURST, RAMP, NOISE], ids=["step", "burst", "ramp",
                                                                      "noise"])
def test_dynamic_never_exceeds_available_and_serves_demand_after_cooldown(demands):
    avail = [8 if i % 37 else 3 for i in range(len(demands))]  # capacity dips now and then
    policy = Dynamic(cooldown=2, patience=4)
    alloc = simulate(policy, trace(demands, avail))
    assert all(a <= v for a, v in zip(alloc, avail))
    # after any rise in demand, the allocation covers it within cooldown + 1 steps
    for i in range(len(demands) - 3):
        need = min(avail[i + 3], math.ceil(demands[i] - 1e-9), 8)
        if all(v >= need for v in avail[i:i + 4]) and demands[i] <= min(demands[i:i + 4]):
            assert max(alloc[i:i + 4]) >= need, (i, demands[i], alloc[i:i + 4])


def test_dynamic_tracks_a_step_up_and_down():
    alloc = simulate(Dynamic(cooldown=2, patience=4), trace(STEP))
    assert alloc[19] == 1 and alloc[22] == 4 and alloc[39] == 4 and alloc[-1] == 2
    assert scale_changes(alloc) == 2


def test_dynamic_does_not_oscillate_on_noise():
    alloc = simulate(Dynamic(), trace(NOISE))
    assert scale_changes(alloc) <= 2  # up to 3 (maybe 4 on a spike) once, then stays
    naive = [min(8, math.ceil(d)) for d in NOISE]  # what allocated = ceil(demand) would do
    assert scale_changes(naive) > 20


def test_dynamic_ramp_changes_are_bounded():
    alloc = simulate(Dynamic(cooldown=2, patience=4), trace(RAMP))
    assert max(alloc) == 8
    assert scale_changes(alloc) <= 2 * 8 + 2


def test_burst_is_absorbed_then_released_after_patience():
    alloc = simulate(Dynamic(cooldown=1, patience=5), trace(BURST))
    assert max(alloc) == 8 and alloc[-1] == 1
    top = alloc.index(8)
    assert alloc[top:top + 5] == [8] * 5  # waits `patience` steps before scaling down


def test_static_is_constant_within_availability():
    alloc = simulate(Static(3), trace(RAMP, [8] * 50 + [2] * 110))
    assert set(alloc[:50]) == {3} and set(alloc[50:]) == {2}


@pytest.mark.parametrize("demands", [STEP, BURST, RAMP, NOISE], ids=["step", "burst", "ramp",
                                                                      "noise"])
def test_hybrid_never_drops_below_its_floor(demands):
    avail = [6 if i % 11 else 0 for i in range(len(demands))]  # burst pool sometimes empty
    alloc = simulate(Hybrid(floor=2, maximum=6), trace(demands, avail))
    assert min(alloc) >= 2 and max(alloc) <= 6
    assert max(alloc) > 2 or max(demands) <= 2


def test_hybrid_bursts_above_the_floor():
    alloc = simulate(Hybrid(floor=2, cooldown=1, patience=3), trace(BURST))
    assert max(alloc) == 8 and alloc[-1] == 2
