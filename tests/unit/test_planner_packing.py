"""The planner's small pieces, pinned exactly: the mode of each (replicas, stages), which shapes
a ``parallel`` constraint allows, how rank counts are packed on hosts (every packing, every split
between groups of identical hosts, or one proportional packing, switching at EXACT_LIMIT and
GROUP_LIMIT), how oversubscribed ranks are dealt, how slots are dealt to replicas, the ``search``
text, the tie-breaking between candidates, the ``alternatives`` and their ``lost`` texts, and
every field of the Plan a candidate becomes.

Expected values come from hand arithmetic (the comments show it) or from enumerations written
here, never from the planner itself. Where a plan() call shows a contract as precisely, the test
goes through plan(); otherwise it calls the private helper directly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from fastserve.errors import PlanError
from fastserve.graph.builder import GraphBuilder
from fastserve.resources import costmodel as cm
from fastserve.resources.inventory import Host, Inventory, Link
from fastserve.resources.plan import Plan, RankPlan
from fastserve.resources.planner import (
    EXACT_LIMIT,
    GROUP_LIMIT,
    Constraints,
    _allowed,
    _better,
    _compositions,
    _mode,
    _oversubscribed,
    _packing_search,
    _packings,
    _slots,
    _with_alternatives,
    plan,
)

FAST_LINKS = Link(1e15, 0.0)  # transfers cost (almost) nothing
BIG = 2**40  # memory no test here runs short of
NO_CALLS = cm.Profile({}, {}, {}, call_seconds=0.0)  # nodes cost their FLOPs only
# the keys of every alternative: a candidate's summary plus why it lost
ALT_KEYS = {"mode", "replicas", "stages", "micro_batches", "throughput", "latency_s", "hosts",
            "lost"}
# the mode of every (replicas, stages), written out by hand
MODES = {(1, 1): "single", (2, 1): "data", (3, 1): "data", (4, 1): "data", (5, 1): "data",
         (6, 1): "data", (1, 2): "model", (1, 3): "model", (1, 4): "model",
         (2, 2): "hybrid", (2, 3): "hybrid", (3, 2): "hybrid", (3, 3): "hybrid"}


def chain(nodes: int, width: int = 8):
    """``nodes`` linear layers width x width: each costs 2 * width**2 FLOPs a sample (128 at
    width 8), holds width**2 + width float32 parameters (288 bytes) and outputs width floats
    (32 bytes) a sample."""
    b = GraphBuilder("chain")
    b.input("x", ["batch", width])
    prev = "x"
    for i in range(nodes):
        prev = b.node(f"n{i}", "linear", [prev], in_features=width, out_features=width)
    b.output(prev)
    return b.compile()


def host(name: str, cores: int, speed: float = 1.0, memory: int = BIG) -> Host:
    return Host(name, "10.0.0.1", cores, memory, speed)  # the planner never reads addresses


def inventory(*hosts: Host, link: Link = FAST_LINKS) -> Inventory:
    return Inventory("test", tuple(hosts), link)


def shapes_of(chosen: Plan) -> set[tuple[int, int]]:
    """The shapes a plan considered: its own and those of its alternatives."""
    return {(chosen.replicas, chosen.stages)} | {(a["replicas"], a["stages"])
                                                 for a in chosen.alternatives}


# --- _mode and _allowed ---------------------------------------------------------------------

def test_mode_of_every_small_shape():
    for (d, p), mode in MODES.items():
        assert _mode(d, p) == mode, (d, p)


@pytest.mark.parametrize("parallel, allowed", [
    ("auto", {(d, p) for d in (1, 2, 3) for p in (1, 2, 3)}),
    # one rank satisfies data and model parallelism alike, not hybrid
    ("data", {(1, 1), (2, 1), (3, 1)}),
    ("model", {(1, 1), (1, 2), (1, 3)}),
    ("hybrid", {(2, 2), (2, 3), (3, 2), (3, 3)}),
])
def test_allowed_shapes_for_each_parallel_mode(parallel, allowed):
    c = Constraints(parallel=parallel)
    got = {(d, p) for d in (1, 2, 3) for p in (1, 2, 3) if _allowed(c, d, p)}
    assert got == allowed


def test_allowed_shapes_with_fixed_replicas_or_stages():
    grid = [(d, p) for d in (1, 2, 3) for p in (1, 2, 3)]
    assert {s for s in grid if _allowed(Constraints(replicas=2), *s)} == {(2, 1), (2, 2), (2, 3)}
    assert {s for s in grid if _allowed(Constraints(stages=3), *s)} == {(1, 3), (2, 3), (3, 3)}
    # a fixed count and a mode must agree: two replicas are never model parallel
    assert {s for s in grid if _allowed(Constraints(parallel="model", replicas=2), *s)} == set()
    assert {s for s in grid if _allowed(Constraints(parallel="data", stages=1), *s)} == \
        {(1, 1), (2, 1), (3, 1)}


@pytest.mark.parametrize("constraints, shapes", [
    # one 4-core host, 3 nodes, batch 4: d * p <= 4 ranks, p <= 3 stages
    (Constraints(batch=4), {(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (1, 3)}),
    (Constraints(batch=4, parallel="data"), {(1, 1), (2, 1), (3, 1), (4, 1)}),
    (Constraints(batch=4, parallel="model"), {(1, 1), (1, 2), (1, 3)}),
    (Constraints(batch=4, parallel="hybrid"), {(2, 2)}),
    (Constraints(batch=4, replicas=2), {(2, 1), (2, 2)}),
    (Constraints(batch=4, stages=2), {(1, 2), (2, 2)}),
])
def test_plan_considers_exactly_the_allowed_shapes_each_with_its_mode(constraints, shapes):
    # the latency objective prunes nothing: every allowed shape is evaluated, and each shape
    # other than the chosen one appears once among the alternatives (7 shapes at most, under 8)
    chosen = plan(chain(3), inventory(host("h", 4)), "latency", constraints, NO_CALLS)
    assert shapes_of(chosen) == shapes
    assert len(chosen.alternatives) == len(shapes) - 1
    assert chosen.mode == MODES[chosen.replicas, chosen.stages]
    for a in chosen.alternatives:
        assert a["mode"] == MODES[a["replicas"], a["stages"]]


# --- packings -------------------------------------------------------------------------------

def every_count(caps, ranks):
    """Every tuple of per-host counts, count i in 0..caps[i], summing to ``ranks``."""
    return sorted(c for c in itertools.product(*[range(n + 1) for n in caps]) if sum(c) == ranks)


def test_compositions_are_every_bounded_split():
    assert sorted(_compositions(3, [5, 5])) == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert sorted(_compositions(3, [1, 5])) == [(0, 3), (1, 2)]
    assert sorted(_compositions(4, [2, 1, 3])) == every_count([2, 1, 3], 4)
    assert list(_compositions(5, [2, 2])) == []
    assert list(_compositions(2, [7])) == [(2,)]


@pytest.mark.parametrize("cores, ranks", [
    ([4, 4], 3),  # every host could take all ranks and more
    ([1, 3, 2], 4),  # a host's cores bound its count
    ([2, 2, 2], 6),  # every core used
    ([40, 40], 63),  # 64 packings counted: at EXACT_LIMIT, still searched host by host
])
def test_packings_on_few_hosts_are_every_count_per_host(cores, ranks):
    inv = inventory(*[host(f"h{i}", c, 1.0 - 0.1 * i) for i, c in enumerate(cores)])
    assert _packing_search(inv, ranks) == "hosts"
    got = list(_packings(inv, ranks))
    assert sorted(got) == every_count(cores, ranks) and len(set(got)) == len(got)


def test_no_packing_when_ranks_exceed_cores():
    inv = inventory(host("a", 2), host("b", 1, 0.5))
    assert list(_packings(inv, 4)) == []


def even_in_groups(counts, groups):
    """Within each group of identical hosts the ranks are spread evenly, the earlier hosts
    taking the extra ones."""
    for g in groups:
        members = [counts[i] for i in g]
        if max(members) - min(members) > 1 or members != sorted(members, reverse=True):
            return False
    return True


def test_packings_between_groups_of_identical_hosts():
    # hosts 0 and 2 are alike (2 cores, speed 1), so are 1 and 3 (3 cores, speed 0.5): four
    # hosts and 6 ranks make C(9, 3) = 84 > 64 packings host by host, C(7, 1) = 7 group by group
    inv = inventory(host("a0", 2), host("b0", 3, 0.5), host("a1", 2), host("b1", 3, 0.5))
    assert math.comb(6 + 3, 3) > EXACT_LIMIT
    assert _packing_search(inv, 6) == "groups"
    got = list(_packings(inv, 6))
    expected = [c for c in every_count([2, 3, 2, 3], 6) if even_in_groups(c, [[0, 2], [1, 3]])]
    # by hand: 0 + 6 -> (0,3,0,3); 1 + 5 -> (1,3,0,2); 2 + 4 -> (1,2,1,2); 3 + 3 -> (2,2,1,1);
    # 4 + 2 -> (2,1,2,1)
    assert expected == sorted([(0, 3, 0, 3), (1, 3, 0, 2), (1, 2, 1, 2), (2, 2, 1, 1),
                               (2, 1, 2, 1)])
    assert sorted(got) == expected and len(got) == 5


@pytest.mark.parametrize("cores, ranks, expected", [
    # 16 cores, 7 ranks: shares 7 * c / 16 = 2.625, 0.875, 2.1875, 1.3125 -> floors 2, 0, 2, 1
    # (5 ranks); the two largest remainders (0.875 of host 1, 0.625 of host 0) take one more
    ([6, 2, 5, 3], 7, (3, 1, 2, 1)),
    # same cores in another order: the remainders, not the positions, decide
    ([3, 5, 2, 6], 7, (1, 2, 1, 3)),
    # every core: the packing is the cores themselves
    ([6, 2, 5, 3], 16, (6, 2, 5, 3)),
    # 10 ranks on 5 cores each of 4 hosts (all alike in cores, not in speed): 2.5 each ->
    # floors 2 (8 ranks), the first two of equal remainders take one more
    ([5, 5, 5, 5], 10, (3, 3, 2, 2)),
])
def test_proportional_packing_is_largest_remainder(cores, ranks, expected):
    # four hosts of different speeds: no two alike, so no groups; more than 64 packings
    inv = inventory(*[host(f"h{i}", c, 1.0 - 0.1 * i) for i, c in enumerate(cores)])
    assert math.comb(ranks + 3, 3) > EXACT_LIMIT
    assert _packing_search(inv, ranks) == "proportional"
    assert list(_packings(inv, ranks)) == [expected]


def test_packing_search_switches_at_exact_limit():
    # two hosts: ranks + 1 packings; 63 ranks make 64 = EXACT_LIMIT packings
    assert EXACT_LIMIT == 64
    alike = inventory(host("a", 100), host("b", 100))
    unlike = inventory(host("a", 100), host("b", 100, 0.5))
    for inv in (alike, unlike):
        assert _packing_search(inv, 62) == "hosts"
        assert _packing_search(inv, 63) == "hosts"
    # past it: identical hosts form one group (1 split), different hosts cannot be grouped
    assert _packing_search(alike, 64) == "groups"
    assert _packing_search(unlike, 64) == "proportional"
    assert _packing_search(unlike, 65) == "proportional"


def test_packing_search_switches_at_group_limit():
    # three hosts, two alike: 2 groups, ranks + 1 splits; 511 ranks make 512 = GROUP_LIMIT
    assert GROUP_LIMIT == 512
    inv = inventory(host("a", 600), host("b", 600), host("c", 600, 0.5))
    assert math.comb(510 + 2, 2) > EXACT_LIMIT
    assert _packing_search(inv, 510) == "groups"
    assert _packing_search(inv, 511) == "groups"
    assert _packing_search(inv, 512) == "proportional"
    # the 512 splits of 511 ranks between the groups, each spread evenly over a, b
    got = list(_packings(inv, 511))
    assert len(got) == 512 and len(set(got)) == 512
    assert all(sum(c) == 511 and c[0] - c[1] in (0, 1) for c in got)
    assert sorted(c[2] for c in got) == list(range(512))
    # three hosts all alike: one group, a single split, even over the three
    same = inventory(host("a", 300), host("b", 300), host("c", 300))
    assert _packing_search(same, 512) == "groups"
    assert list(_packings(same, 512)) == [(171, 171, 170)]


def test_oversubscribed_ranks_are_dealt_round_robin_by_cores():
    # each rank goes to the host with the fewest ranks per core, the first on ties:
    # cores (2, 1): a (0/2 = 0/1: a first), b, a (1/2 < 1/1), a (2/2 = 1/1: a first), b
    inv = inventory(host("a", 2), host("b", 1))
    assert [_oversubscribed(inv, n) for n in range(1, 6)] == \
        [(1, 0), (1, 1), (2, 1), (3, 1), (3, 2)]
    # cores (1, 3): a (tie at 0: first), b (0/3 < 1/1), b (1/3 < 1), b (2/3 < 1), then a
    # (1/1 = 3/3: first)
    inv = inventory(host("a", 1), host("b", 3))
    assert _oversubscribed(inv, 4) == (1, 3)
    assert _oversubscribed(inv, 5) == (2, 3)


# --- _slots ---------------------------------------------------------------------------------

def test_slots_give_every_replica_the_same_mix_and_refuse_mixed_stages():
    fast, slow = host("fast", 1, 1.0), host("slow", 1, 0.5)
    # two replicas of one stage on a fast and a slow rank: not identical, refused
    assert _slots([fast, slow], [1, 1], 2, 1, None) is None
    # one replica of two stages: the fast rank first
    (rep,) = _slots([fast, slow], [1, 1], 1, 2, None)
    assert [(s.host.name, s.threads, s.power) for s in rep] == \
        [("fast", 1, 20e9), ("slow", 1, 10e9)]
    # two hosts of 2 cores, two ranks each: stage 0 of both replicas on a, stage 1 on b
    a, b = host("a", 2), host("b", 2)
    reps = _slots([a, b], [2, 2], 2, 2, None)
    assert [[s.host.name for s in rep] for rep in reps] == [["a", "b"], ["a", "b"]]
    # same speed, different thread counts differ in power: a runs 2 ranks of 1 thread (20e9
    # FLOP/s), b one of 2 threads (20e9 * 1.8); one replica of 3 stages orders them by power,
    # three replicas of one stage would mix them: refused
    (rep,) = _slots([a, b], [2, 1], 1, 3, None)
    assert [(s.host.name, s.threads) for s in rep] == [("b", 2), ("a", 1), ("a", 1)]
    assert rep[0].power == pytest.approx(20e9 * 1.8, rel=1e-12)
    assert _slots([a, b], [2, 1], 3, 1, None) is None


# --- the Plan built from the winning candidate ----------------------------------------------

def test_two_stage_plan_with_a_fixed_cut_has_every_field_exact():
    # 4 nodes of 128 FLOPs; stage 0 gets 3 of them (384 FLOPs a sample), stage 1 one (128)
    graph = chain(4)
    inv = inventory(host("h", 2))
    c = Constraints(replicas=1, stages=2, micro_batches=1, batch=4, threads=1,
                    cut=(("n0", "n1", "n2"), ("n3",)), transport="tcp")
    chosen = plan(graph, inv, constraints=c, profile=NO_CALLS)
    power = cm.REFERENCE_FLOPS  # speed 1.0, one thread: 20e9 FLOP/s
    comp = [cm.RANK_SLOWDOWN * 4 * 384 / power, cm.RANK_SLOWDOWN * 4 * 128 / power]
    hop = 32 * 4 / 1e15  # 32 bytes a sample, 4 samples, latency 0
    # baseline + weights (288 bytes a node) + 4 samples x (2 x (32 in + 32 out) + 32 + 32)
    mem = [cm.RUNTIME_BASELINE + 3 * 288 + 4 * 192, cm.RUNTIME_BASELINE + 288 + 4 * 192]
    assert chosen.ranks == (RankPlan(0, 0, 0, "h", 1, mem[0]), RankPlan(1, 0, 1, "h", 1, mem[1]))
    s0, s1 = chosen.stage_plans
    # stage 0 holds three times the FLOPs: the bottleneck, ahead of the coordinator (2 hops)
    assert (s0.stage, s0.nodes, s0.host, s0.threads, s0.memory_bytes, s0.bottleneck) == \
        (0, ("n0", "n1", "n2"), "h", 1, mem[0], True)
    assert (s1.stage, s1.nodes, s1.host, s1.threads, s1.memory_bytes, s1.bottleneck) == \
        (1, ("n3",), "h", 1, mem[1], False)
    assert [s0.compute_s, s1.compute_s] == pytest.approx(comp, rel=1e-12)
    assert [s0.transfer_s, s1.transfer_s] == pytest.approx([hop, hop], rel=1e-12)
    assert (chosen.graph, chosen.mode, chosen.replicas, chosen.stages, chosen.micro_batches,
            chosen.batch, chosen.bounds, chosen.transport, chosen.search,
            chosen.alternatives) == ("chain", "model", 1, 2, 1, 4, (3, 4), "tcp", "exact", ())
    assert chosen.bubble == pytest.approx(0.5, rel=1e-12)  # (2 - 1) / (1 + 2 - 1)
    # the coordinator sends the input and receives the output (no merge for one micro-batch)
    assert chosen.coordinator_s == pytest.approx(2 * hop, rel=1e-12)
    assert chosen.latency_s == pytest.approx(comp[0] + comp[1] + 3 * hop, rel=1e-12)
    assert chosen.throughput == pytest.approx(4 / (comp[0] + hop), rel=1e-12)


def test_coordinator_bound_plan_marks_no_stage_as_bottleneck():
    # a slow link (1 ms a hop) dwarfs the compute: the coordinator's two hops per round are
    # the slowest step, so no stage is the bottleneck
    graph = chain(4)
    inv = inventory(host("h", 2), link=Link(1e6, 1e-3))
    c = Constraints(replicas=1, stages=2, micro_batches=1, batch=4, threads=1)
    chosen = plan(graph, inv, constraints=c, profile=NO_CALLS)
    assert [s.bottleneck for s in chosen.stage_plans] == [False, False]
    hop = 1e-3 + 32 * 4 / 1e6
    assert chosen.coordinator_s == pytest.approx(2 * hop, rel=1e-12)
    assert chosen.bounds == (2, 4)  # equal speeds: 2 + 2 nodes


def test_single_rank_uses_every_core_at_the_profiled_speed():
    # profiled at 1e9 FLOP/s a thread; 3 threads: 1e9 * (1 + 2 * 0.8) = 2.6e9 FLOP/s
    graph = chain(4)
    inv = inventory(host("h", 3))
    profile = cm.Profile({}, {"h": 1e9}, {}, call_seconds=0.0)
    c = Constraints(replicas=1, stages=1, micro_batches=1, batch=4)
    chosen = plan(graph, inv, constraints=c, profile=profile)
    (stage,) = chosen.stage_plans
    assert (stage.threads, stage.nodes, stage.bottleneck) == (3, ("n0", "n1", "n2", "n3"), True)
    assert stage.compute_s == pytest.approx(cm.RANK_SLOWDOWN * 4 * 512 / 2.6e9, rel=1e-12)
    assert (chosen.mode, chosen.bounds, chosen.bubble) == ("single", (4,), 0.0)
    assert chosen.ranks == (RankPlan(0, 0, 0, "h", 3, stage.memory_bytes),)


def test_two_replicas_share_the_cores_in_whole_threads():
    # 3 cores for 2 ranks: 3 // 2 = 1 thread each, replica r is rank r
    chosen = plan(chain(4), inventory(host("h", 3)),
                  constraints=Constraints(replicas=2, stages=1, batch=4), profile=NO_CALLS)
    mem = chosen.stage_plans[0].memory_bytes
    assert chosen.mode == "data"
    assert chosen.ranks == (RankPlan(0, 0, 0, "h", 1, mem), RankPlan(1, 1, 0, "h", 1, mem))
    assert chosen.stage_plans[0].threads == 1


def test_oversubscribed_hybrid_plan_deals_ranks_round_robin():
    # 2 x 2 ranks on 3 cores (a: 2, b: 1): dealt a, b, a, a -> a runs 3 ranks of
    # max(1, 2 // 3) = 1 thread, b one of 1; all alike, sorted by host name: a a a b; stage 0
    # takes the first two (a, a), stage 1 the next two (a, b)
    inv = inventory(host("a", 2), host("b", 1))
    chosen = plan(chain(4), inv, constraints=Constraints(replicas=2, stages=2, batch=4),
                  profile=NO_CALLS)
    m0, m1 = (s.memory_bytes for s in chosen.stage_plans)
    assert chosen.ranks == (RankPlan(0, 0, 0, "a", 1, m0), RankPlan(1, 0, 1, "a", 1, m1),
                            RankPlan(2, 1, 0, "a", 1, m0), RankPlan(3, 1, 1, "b", 1, m1))
    assert (chosen.mode, chosen.replicas, chosen.stages, chosen.bounds) == \
        ("hybrid", 2, 2, (2, 4))
    assert chosen.search == "rank count 4: more ranks than cores, as fixed by the " \
        "constraints"


# --- the search text ------------------------------------------------------------------------

@pytest.mark.parametrize("hosts, search", [
    # two hosts: every rank count 1..4 has at most 5 packings
    ([host("a", 2), host("b", 2, 0.5)], "exact"),
    # four hosts in two pairs of alike hosts; rank counts 1..8 are searched (d * p <= 8 ranks,
    # p <= 4 nodes, d <= batch 8); C(r + 3, 3) <= 64 for r <= 5 (56), not for 6 (84)
    ([host("a0", 2), host("b0", 2, 0.5), host("a1", 2), host("b1", 2, 0.5)],
     "3 rank counts (6..8): every split between groups of identical hosts, even within a "
     "group; 5 rank counts (1..5): every packing on the hosts"),
    # four hosts no two alike: past 5 ranks one packing proportional to cores
    ([host("h0", 2, 1.0), host("h1", 2, 0.9), host("h2", 2, 0.8), host("h3", 2, 0.7)],
     "5 rank counts (1..5): every packing on the hosts; 3 rank counts (6..8): one packing "
     "proportional to cores (not exhaustive)"),
])
def test_search_text_names_each_range_of_rank_counts(hosts, search):
    # the latency objective visits every shape, so every rank count is searched
    chosen = plan(chain(4), inventory(*hosts), "latency", Constraints(batch=8), NO_CALLS)
    assert chosen.search == search


def test_oversubscribed_search_covers_every_rank_count_of_the_constraints():
    # hybrid needs 2 x 2 = 4 ranks, the host has 2 cores: every shape is oversubscribed;
    # d * p <= 4 with d, p >= 2 leaves 2 x 2 only
    chosen = plan(chain(4), inventory(host("h", 2)), "latency",
                  Constraints(batch=4, parallel="hybrid"), NO_CALLS)
    assert chosen.search == "rank count 4: more ranks than cores, as fixed by the " \
        "constraints"
    assert [(r.host, r.threads) for r in chosen.ranks] == [("h", 1)] * 4


# --- choosing between candidates ------------------------------------------------------------

def cand(throughput, latency_s, n_ranks):
    """What _better reads of a candidate."""
    return SimpleNamespace(throughput=throughput, latency_s=latency_s, n_ranks=n_ranks)


def chosen_plan(throughput, latency_s, n_ranks):
    """What _better reads of the best plan so far: its ranks count through len(ranks)."""
    return SimpleNamespace(throughput=throughput, latency_s=latency_s, ranks=(None,) * n_ranks)


def test_throughput_objective_breaks_ties_by_latency_then_fewer_ranks():
    c = Constraints()
    better = lambda a, b: _better(a, b, "throughput", c)  # noqa: E731
    assert better(cand(1.0, 9.0, 9), None)
    assert better(cand(2.0, 9.0, 9), chosen_plan(1.0, 1.0, 1))  # throughput first
    assert not better(cand(1.0, 1.0, 1), chosen_plan(2.0, 9.0, 9))
    assert better(cand(1.0, 1.0, 9), chosen_plan(1.0, 2.0, 1))  # then the lower latency
    assert not better(cand(1.0, 2.0, 1), chosen_plan(1.0, 1.0, 9))
    assert better(cand(1.0, 1.0, 2), chosen_plan(1.0, 1.0, 4))  # then fewer ranks
    assert not better(cand(1.0, 1.0, 4), chosen_plan(1.0, 1.0, 2))
    assert not better(cand(1.0, 1.0, 4), chosen_plan(1.0, 1.0, 4))  # a tie keeps the first


def test_latency_objective_breaks_ties_by_throughput_then_fewer_ranks():
    c = Constraints()
    better = lambda a, b: _better(a, b, "latency", c)  # noqa: E731
    assert better(cand(1.0, 1.0, 9), None)
    assert better(cand(1.0, 1.0, 9), chosen_plan(9.0, 2.0, 1))  # latency first
    assert not better(cand(9.0, 2.0, 1), chosen_plan(1.0, 1.0, 9))
    assert better(cand(2.0, 1.0, 9), chosen_plan(1.0, 1.0, 1))  # then the higher throughput
    assert not better(cand(1.0, 1.0, 1), chosen_plan(2.0, 1.0, 9))
    assert better(cand(1.0, 1.0, 2), chosen_plan(1.0, 1.0, 4))  # then fewer ranks
    assert not better(cand(1.0, 1.0, 4), chosen_plan(1.0, 1.0, 2))
    assert not better(cand(1.0, 1.0, 4), chosen_plan(1.0, 1.0, 4))


def test_latency_ceiling_refuses_only_candidates_above_it():
    c = Constraints(latency_ms=100.0)
    for objective in ("throughput", "latency"):
        # 0.1 s is 100.0 ms exactly: at the ceiling, allowed
        assert _better(cand(1.0, 0.1, 1), None, objective, c)
        # just above: refused even when nothing was found yet, and whatever its throughput
        assert not _better(cand(1.0, 0.1000001, 1), None, objective, c)
        assert not _better(cand(9e9, 0.2, 1), chosen_plan(1.0, 0.05, 1), objective, c)


def test_plan_with_a_ceiling_at_the_best_latency_keeps_the_best_plan():
    graph, inv = chain(4), inventory(host("a", 2), host("b", 1, 0.5))
    free = plan(graph, inv, constraints=Constraints(batch=8), profile=NO_CALLS)
    at = plan(graph, inv, constraints=Constraints(batch=8, latency_ms=free.latency_s * 1e3),
              profile=NO_CALLS)
    assert (at.replicas, at.stages, at.micro_batches, at.throughput, at.latency_s) == \
        (free.replicas, free.stages, free.micro_batches, free.throughput, free.latency_s)
    # a ceiling no plan meets (1e-6 ms, a nanosecond) leaves no plan
    with pytest.raises(PlanError, match="no plan satisfies the constraints"):
        plan(graph, inv, constraints=Constraints(batch=8, latency_ms=1e-6), profile=NO_CALLS)


# --- alternatives ---------------------------------------------------------------------------

def summary(d, p, m, throughput, latency_s):
    return {"mode": MODES[d, p], "replicas": d, "stages": p, "micro_batches": m,
            "throughput": throughput, "latency_s": latency_s, "hosts": ["h"]}


def best_plan(throughput, latency_s) -> Plan:
    """A chosen plan of shape 1 x 2 (only its shape and numbers matter here)."""
    return Plan(graph="g", mode="model", replicas=1, stages=2, micro_batches=1, batch=4,
                ranks=(), stage_plans=(), latency_s=latency_s, throughput=throughput,
                bubble=0.5, bounds=(1, 2), search="exact")


def considered_shapes():
    """Candidates of 11 shapes, the chosen 1 x 2 among them, in the order they were met."""
    return [
        summary(1, 2, 1, 250.0, 0.10),  # the chosen shape: never an alternative
        summary(2, 1, 1, 200.0, 0.05),
        summary(2, 1, 2, 200.0, 0.06),  # as good as the first 2 x 1: the first stays
        summary(2, 1, 4, 150.0, 0.07),  # worse: the first stays
        summary(1, 1, 1, 100.0, 0.02),
        summary(3, 1, 1, 180.0, 0.20),
        summary(4, 1, 1, 170.0, 0.30),
        summary(1, 2, 2, 240.0, 0.08),
        summary(1, 3, 1, 160.0, 0.12),
        summary(2, 2, 1, 150.0, 0.25),
        summary(5, 1, 1, 140.0, 0.40),
        summary(1, 4, 1, 130.0, 0.15),
        summary(6, 1, 1, 120.0, 0.50),
        summary(2, 3, 1, 110.0, 0.60),
    ]


def test_alternatives_are_the_best_of_each_other_shape_eight_at_most():
    best = best_plan(250.0, 0.1)
    out = _with_alternatives(best, considered_shapes(), "throughput", Constraints())
    # 10 other shapes; the 8 of highest throughput, highest first (2 x 3 and 1 x 1 dropped)
    expected = [summary(2, 1, 1, 200.0, 0.05), summary(3, 1, 1, 180.0, 0.20),
                summary(4, 1, 1, 170.0, 0.30), summary(1, 3, 1, 160.0, 0.12),
                summary(2, 2, 1, 150.0, 0.25), summary(5, 1, 1, 140.0, 0.40),
                summary(1, 4, 1, 130.0, 0.15), summary(6, 1, 1, 120.0, 0.50)]
    for a in expected:
        a["lost"] = f"{a['throughput']:.1f} samples/s < 250.0 of the chosen plan"
    assert expected[0]["lost"] == "200.0 samples/s < 250.0 of the chosen plan"
    assert out == replace(best, alternatives=tuple(expected))


def test_alternatives_lost_texts_under_a_latency_ceiling():
    best = best_plan(250.0, 0.08)
    considered = [summary(2, 1, 1, 200.0, 0.10),  # 100.0 ms: at the 100 ms ceiling, not above
                  summary(3, 1, 1, 180.0, 0.25),  # 250.0 ms: above
                  summary(1, 1, 1, 100.0, 0.02)]
    out = _with_alternatives(best, considered, "throughput", Constraints(latency_ms=100.0))
    # those within the ceiling first, by throughput; then those above it
    assert [a["lost"] for a in out.alternatives] == [
        "200.0 samples/s < 250.0 of the chosen plan",
        "100.0 samples/s < 250.0 of the chosen plan",
        "latency 250.0 ms above the 100.0 ms target"]
    # of one shape, a candidate within the ceiling is kept over a faster one above it
    out = _with_alternatives(best, [summary(2, 1, 1, 200.0, 0.15),
                                    summary(2, 1, 2, 150.0, 0.09)],
                             "throughput", Constraints(latency_ms=100.0))
    assert [(a["micro_batches"], a["lost"]) for a in out.alternatives] == [
        (2, "150.0 samples/s < 250.0 of the chosen plan")]
    # with the latency objective, those under the ceiling lost on latency
    out = _with_alternatives(best, [summary(2, 1, 1, 200.0, 0.10), summary(3, 1, 1, 180.0, 0.25)],
                             "latency", Constraints(latency_ms=100.0))
    assert [a["lost"] for a in out.alternatives] == [
        "latency 100.0 ms > 80.0 ms", "latency 250.0 ms above the 100.0 ms target"]


def test_alternatives_lost_texts_with_the_latency_objective():
    best = best_plan(90.0, 0.1)
    considered = [summary(2, 1, 1, 200.0, 0.35), summary(2, 1, 2, 150.0, 0.30),
                  summary(1, 1, 1, 100.0, 0.12)]
    out = _with_alternatives(best, considered, "latency", Constraints())
    # the lowest latency of each shape, lowest first (not the highest throughput)
    assert [(a["replicas"], a["micro_batches"], a["lost"]) for a in out.alternatives] == [
        (1, 1, "latency 120.0 ms > 100.0 ms"), (2, 2, "latency 300.0 ms > 100.0 ms")]


def test_plan_alternatives_are_the_best_of_each_shape_sorted_with_reasons():
    # one 6-core host, 3 nodes, batch 8: 11 shapes (d * p <= 6, p <= 3); the latency objective
    # evaluates them all, so 10 lose and 8 are kept
    graph, inv = chain(3), inventory(host("h", 6))
    chosen = plan(graph, inv, "latency", Constraints(batch=8), NO_CALLS)
    alts = chosen.alternatives
    assert len(alts) == 8
    shapes = [(a["replicas"], a["stages"]) for a in alts]
    assert len(set(shapes)) == 8 and (chosen.replicas, chosen.stages) not in shapes
    assert [a["latency_s"] for a in alts] == sorted(a["latency_s"] for a in alts)
    best_ms = chosen.latency_s * 1e3
    for a in alts:
        assert set(a) == ALT_KEYS
        d, p = a["replicas"], a["stages"]
        assert a["mode"] == MODES[d, p] and a["hosts"] == ["h"]
        assert a["micro_batches"] in [m for m in (1, 2, 4, 8) if m <= math.ceil(8 / d)]
        assert a["lost"] == f"latency {a['latency_s'] * 1e3:.1f} ms > {best_ms:.1f} ms"
        # the kept candidate of a shape is its lowest latency: what plan() finds for it alone
        alone = plan(graph, inv, "latency", Constraints(batch=8, replicas=d, stages=p),
                     NO_CALLS)
        assert a["latency_s"] == pytest.approx(alone.latency_s, rel=1e-12)
    # the 2 losing shapes left out have no lower latency than the last one kept
    all_shapes = {(d, p) for d in range(1, 7) for p in range(1, 4) if d * p <= 6}
    dropped = all_shapes - set(shapes) - {(chosen.replicas, chosen.stages)}
    assert len(all_shapes) == 11 and len(dropped) == 2
    for d, p in dropped:
        alone = plan(graph, inv, "latency", Constraints(batch=8, replicas=d, stages=p),
                     NO_CALLS)
        assert alone.latency_s >= alts[-1]["latency_s"]
