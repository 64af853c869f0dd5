"""Widening a stage: the plan it makes, its predictions, when it pays more than a replica, and
that a plan file's widths are checked like every other field."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace

import pytest

import fastserve.graph as G
from fastserve.errors import PlanFileError
from fastserve.resources.inventory import Host, Inventory, local_inventory
from fastserve.resources.plan import Plan, check_plan
from fastserve.resources.planner import Constraints, plan
from fastserve.resources.widening import (layout_for, speedup, stage_seconds, widen,
                                          widen_choice, with_widths)

from lms import ROOT


@pytest.fixture(scope="module")
def graph():
    return G.load(str(ROOT / "graphs/mlp.yaml"))


def _plan(graph, stages=3, replicas=1) -> Plan:
    return plan(graph, local_inventory(), constraints=Constraints(
        stages=stages, replicas=replicas, threads=1, batch=8, micro_batches=4))


def _times(p: Plan, seconds: list[float]) -> Plan:
    """``p`` with these per-stage times (compute only)."""
    return replace(p, stage_plans=tuple(replace(s, compute_s=t, transfer_s=0.0)
                                        for s, t in zip(p.stage_plans, seconds)))


def test_widen_adds_a_rank_to_the_stage_of_every_replica(graph):
    base = _plan(graph, stages=3, replicas=2)
    wide = widen(base, 1)
    check_plan(wide, graph)
    assert wide.widths == (1, 2, 1) and wide.per_replica == 4 and len(wide.ranks) == 8
    assert [(r.rank, r.replica, r.stage) for r in wide.ranks] == [
        (0, 0, 0), (1, 0, 1), (2, 0, 1), (3, 0, 2), (4, 1, 0), (5, 1, 1), (6, 1, 1), (7, 1, 2)]
    assert [r.rank for r in wide.stage_ranks(1, 1)] == [5, 6]
    assert wide.stage_ranks(1, 1)[1].host == base.stage_ranks(1, 1)[0].host
    assert wide.cut == base.cut and wide.latency_s == base.latency_s
    back = with_widths(wide, (1, 1, 1))
    assert back.widths == () and back.ranks == base.ranks
    check_plan(back, graph)
    with pytest.raises(PlanFileError, match="not 3"):
        widen(base, 3)
    for bad in [(1, 1), (1, 0, 1), (1, 65, 1)]:
        with pytest.raises(PlanFileError, match="1 to 64 ranks"):
            with_widths(base, bad)


GiB = 1 << 30


def _on_hosts(graph, transport="tcp") -> tuple[Plan, Inventory]:
    """A 2-stage plan whose stage 0 (2 threads) fills host a and whose stage 1 (1 thread)
    leaves a core free on b; c is idle with 4 cores, d is idle and has no memory to spare."""
    base = _plan(graph, stages=2)
    ranks = (replace(base.ranks[0], host="a", threads=2, memory_bytes=GiB),
             replace(base.ranks[1], host="b", threads=1, memory_bytes=GiB))
    hosts = (Host("a", "10.0.0.1", 2, 8 * GiB, launcher="agent"),
             Host("b", "10.0.0.2", 2, 8 * GiB, launcher="agent"),
             Host("c", "10.0.0.3", 4, 8 * GiB, launcher="agent"),
             Host("d", "10.0.0.4", 8, GiB // 2, launcher="agent"))
    return replace(base, ranks=ranks, transport=transport), Inventory("lab", hosts)


def test_an_added_rank_goes_where_its_threads_and_shard_fit(graph):
    base, inventory = _on_hosts(graph)

    def hosts(p: Plan) -> list[list[str]]:
        return [[r.host for r in p.stage_ranks(0, k)] for k in range(p.stages)]

    # stage 0 fills a: its ranks go to c (the most cores free) until c is full, then back to
    # a (nothing fits: oversubscribed, as without an inventory); d lacks the memory
    assert hosts(with_widths(base, (2, 1), inventory)) == [["a", "c"], ["b"]]
    assert hosts(with_widths(base, (4, 1), inventory)) == [["a", "c", "c", "a"], ["b"]]
    # stage 1's host has a core free: its own host first
    assert hosts(widen(base, 1, inventory)) == [["a"], ["b", "b"]]
    assert hosts(with_widths(base, (1, 3), inventory)) == [["a"], ["b", "b", "c"]]
    # the ranks a stage keeps stay where they are
    wide = with_widths(base, (3, 1), inventory)
    assert hosts(with_widths(wide, (2, 1), inventory)) == [["a", "c"], ["b"]]
    # ranks of other deployments take room too
    busy = (replace(base.ranks[0], host="c", threads=3),)
    assert hosts(with_widths(base, (3, 1), inventory, busy)) == [["a", "a", "a"], ["b"]]
    # without an inventory, or on ipc (only hosts whose ranks start here), beside the first
    assert hosts(with_widths(base, (2, 1))) == [["a", "a"], ["b"]]
    ipc, _ = _on_hosts(graph, "ipc")
    assert hosts(with_widths(ipc, (2, 1), inventory)) == [["a", "a"], ["b"]]
    check_plan(with_widths(base, (4, 1), inventory), graph)


def test_a_widened_stage_shares_its_time_and_the_throughput_follows_the_slowest(graph):
    p = _times(_plan(graph), [0.2, 0.6, 0.3])
    p = replace(p, throughput=10.0)
    wide = widen(p, 1)
    assert stage_seconds(wide, 1) == pytest.approx(0.3)
    assert wide.throughput == pytest.approx(20.0)  # the pace goes from 0.6 s to 0.3 s
    assert [s.bottleneck for s in wide.stage_plans] in ([False, True, False],
                                                        [False, False, True])
    wider = widen(wide, 1)
    assert wider.throughput == pytest.approx(20.0)  # stage 2 is the pace now


def test_widening_is_chosen_only_when_it_pays_more_per_rank_than_a_replica(graph):
    # a replica of 3 stages adds 1/3 of the throughput per rank; widening stage 1 doubles it
    assert widen_choice(_times(_plan(graph), [0.1, 0.6, 0.1])) == 1
    # balanced: widening one stage gains nothing
    assert widen_choice(_times(_plan(graph), [0.3, 0.3, 0.3])) is None
    # 0.38 -> 0.3: a quarter more, less than a third
    assert widen_choice(_times(_plan(graph), [0.3, 0.38, 0.3])) is None
    assert widen_choice(_times(_plan(graph), [0.3, 0.46, 0.3])) == 1
    assert widen_choice(_plan(graph, stages=1)) is None
    p = _times(_plan(graph), [0.1, 0.6, 0.5])
    assert speedup(p, (1, 2, 1)) == pytest.approx(0.6 / 0.5)


def test_the_layout_for_a_load_uses_the_fewest_ranks(graph):
    skewed = _times(_plan(graph), [0.1, 0.6, 0.1])
    assert layout_for(skewed, 1) == (1, (1, 1, 1))
    assert layout_for(skewed, 2) == (1, (1, 2, 1))  # 4 ranks, where 2 replicas take 6
    assert layout_for(skewed, 3) == (1, (1, 3, 1))
    assert layout_for(skewed, 6) == (1, (1, 6, 1))  # stage 1 at 0.1 s: the others' pace
    assert layout_for(skewed, 7) == (1, (2, 7, 2))  # 11 ranks; (2, (1, 6, 1)) takes 16
    balanced = _times(_plan(graph), [0.3, 0.3, 0.3])
    assert [layout_for(balanced, n) for n in (1, 2, 3)] == [(1, (1, 1, 1)), (2, (1, 1, 1)),
                                                            (3, (1, 1, 1))]
    # widening stage 1 once gives 1.9 units in 4 ranks: short of 2, and 2 of those are 8
    # ranks, where 2 plain replicas are 6
    assert layout_for(_times(_plan(graph), [0.1, 0.19, 0.1]), 2) == (2, (1, 1, 1))
    assert layout_for(_times(_plan(graph), [0.1, 0.3, 0.1]), 4) == (2, (1, 2, 1))


def test_the_layout_for_a_load_is_the_brute_force_fewest_ranks(graph):
    base = _plan(graph)
    rng = random.Random(7)
    for _ in range(30):
        seconds = [rng.choice([0.05, 0.1, 0.2, 0.3, 0.45]) for _ in range(3)]
        p = _times(base, seconds)
        pace = max(seconds)
        for units in range(1, 6):
            best = min(
                (d * sum(w), d, w) for w in itertools.product(range(1, 7), repeat=3)
                for d in range(1, units + 1)
                if d * pace / max(t / k for t, k in zip(seconds, w)) >= units - 1e-9)
            replicas, widths = layout_for(p, units)
            got = replicas * sum(widths)
            assert got == best[0], (seconds, units, (replicas, widths), best)
            assert replicas * pace / max(t / k for t, k in zip(seconds, widths)) >= \
                units - 1e-9


def test_a_plan_files_widths_are_checked(graph):
    wide = widen(_plan(graph, stages=2), 0)
    doc = json.loads(json.dumps(wide.to_json()))
    assert Plan.from_json(doc) == wide
    assert "widths" not in _plan(graph, stages=2).to_json()  # older plans keep their hash
    for bad, message in [("2", "positive ints"), ([2, 0], "positive ints"),
                         ([2, True], "positive ints")]:
        with pytest.raises(PlanFileError, match=message) as e:
            Plan.from_json({**doc, "widths": bad}, "p.json")
        assert e.value.key == "plan.widths"
    for widths, message in [([2], "each of the 2 stage"), ([1, 1], "one stage more than one"),
                            ([65, 1], "1 to 64 ranks"),
                            ([3, 1], r"need 4 ranks and 2 stage plans; the plan has 3")]:
        with pytest.raises(PlanFileError, match=message):
            check_plan(replace(wide, widths=tuple(widths)), graph)
    swapped = replace(wide, ranks=(wide.ranks[0], replace(wide.ranks[1], stage=1),
                                   wide.ranks[2]))
    with pytest.raises(PlanFileError, match="rank 1 must be replica 0, stage 0"):
        check_plan(swapped, graph)
