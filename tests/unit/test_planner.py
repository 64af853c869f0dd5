"""The planner: equal to brute force on small instances, follows host speeds, respects memory,
errs clearly when the model does not fit."""

from __future__ import annotations

import itertools
import math
import random
import re
from pathlib import Path

import pytest

import fastserve.graph as G
from fastserve.errors import PlanError
from fastserve.graph.builder import GraphBuilder
from fastserve.partition import shards_from_bounds
from fastserve.resources import costmodel as cm
from fastserve.resources.inventory import Host, Inventory, Link, load_inventory
from fastserve.resources.planner import Constraints, plan

ROOT = Path(__file__).resolve().parents[2]
FAST_LINKS = Link(1e15, 0.0)  # transfers cost nothing: the best cut is the balanced one


def chain(widths: list[int]) -> G.Graph:
    b = GraphBuilder("chain")
    b.input("x", ["batch", widths[0]])
    prev = "x"
    for i, (a, c) in enumerate(zip(widths, widths[1:])):
        prev = b.node(f"n{i}", "linear", [prev], in_features=a, out_features=c)
    b.output(prev)
    return b.compile()


def no_call_costs(graph) -> cm.Profile:
    """Nodes cost their FLOPs only: then the min-max FLOPs cut is the best cut, and the
    planner must match brute force over all cuts."""
    return cm.Profile({}, {}, {}, call_seconds=0.0)


def brute_force(graph, inventory, batch):
    """Every replicas x stages x micro-batches x rank placement x cut, evaluated with the
    cost model (no per-call costs), no pruning: the best throughput."""
    hosts = inventory.hosts
    n = len(graph)
    best = 0.0
    cores = [h.cores for h in hosts]
    for d in range(1, batch + 1):
        for p in range(1, n + 1):
            for counts in itertools.product(*[range(c + 1) for c in cores]):
                if sum(counts) != d * p:
                    continue
                slots = sorted(((cm.host_flops(h) * cm.speedup(h.cores // k), h.cores // k, h)
                                for h, k in zip(hosts, counts) for _ in range(k)),
                               key=lambda s: (-s[0], s[2].name))
                groups = [slots[k * d:(k + 1) * d] for k in range(p)]
                if any(len({s[0] for s in g}) != 1 for g in groups):
                    continue
                stage_slots = [g[0] for g in groups]
                for cut in itertools.combinations(range(1, n), p - 1):
                    sharding = shards_from_bounds(graph, [*cut, n], "brute")
                    for m in (1, 2, 4, 8, 16, 32, 64):
                        if m > math.ceil(batch / d):
                            continue
                        b = cm.micro_batch_size(batch, d, m)
                        link = inventory.link(hosts[0].name, hosts[-1].name)
                        steps = [cm.RANK_SLOWDOWN * b * sum(graph.node(x)["flops"]
                                                            for x in s.nodes) / slot[0]
                                 + cm.transfer_seconds(s.in_bytes, b, link)
                                 for s, slot in zip(sharding, stage_slots)]
                        out = sharding[-1].out_bytes
                        steps.append(d * (cm.transfer_seconds(sharding[0].in_bytes, b, link)
                                          + cm.transfer_seconds(out, b, link)
                                          + (cm.merge_seconds(out, b) if d * m > 1 else 0.0)))
                        best = max(best, d * b / max(steps))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_planner_equals_brute_force_on_small_instances(seed):
    rng = random.Random(seed)
    graph = chain([rng.choice([8, 16, 32, 64]) for _ in range(rng.randint(3, 5))])
    hosts = tuple(Host(f"h{i}", f"10.0.0.{i}", rng.randint(1, 2), 2**40,
                       rng.choice([1.0, 0.5, 0.25])) for i in range(rng.randint(1, 2)))
    inv = Inventory("small", hosts, FAST_LINKS)
    batch = rng.choice([2, 4, 8])
    chosen = plan(graph, inv, constraints=Constraints(batch=batch),
                  profile=no_call_costs(graph))
    assert chosen.throughput == pytest.approx(brute_force(graph, inv, batch), rel=1e-9)


def test_heterogeneous_hosts_get_stages_sized_to_their_speed():
    graph = chain([64] * 13)  # 12 equal nodes
    inv = Inventory("het", (Host("fast", "10.0.0.1", 1, 2**40, 1.0),
                            Host("slow", "10.0.0.2", 1, 2**40, 0.5)), FAST_LINKS)
    chosen = plan(graph, inv, constraints=Constraints(parallel="model", batch=8))
    fast, slow = chosen.stage_plans
    assert (fast.host, slow.host) == ("fast", "slow")
    assert (len(fast.nodes), len(slow.nodes)) == (8, 4)


# 16 linear nodes of 4096 x 4096: 64 MiB of weights each, 1 GiB in all
BIG = [4096] * 17
# a host holds half the model and one rank's runtime, but not the whole model, nor half of it
# in two ranks: the model fits only as two stages on two hosts
TIGHT = 1000 * 2**20


def _host_memory_from_weights(graph, chosen) -> dict[str, int]:
    """What each host must hold, from the graph rather than the plan's own estimate: the
    parameter bytes of every stage placed there, plus one runtime per rank."""
    node = graph.node
    stage_weights = {s.stage: sum(node(n)["params_bytes"] + node(n)["borrowed_bytes"]
                                  for n in s.nodes) for s in chosen.stage_plans}
    used: dict[str, int] = {}
    for r in chosen.ranks:
        need = stage_weights[r.stage] + cm.RUNTIME_BASELINE
        assert r.memory_bytes >= need  # the planner's estimate covers at least that
        used[r.host] = used.get(r.host, 0) + need
    return used


def test_decode_takes_the_fewest_ranks_that_hold_the_model_and_every_core():
    graph = chain(BIG)
    roomy = Inventory("roomy", tuple(Host(f"h{i}", f"10.0.0.{i}", 2, 64 * 2**30)
                                     for i in range(2)))
    assert len(plan(graph, roomy, constraints=Constraints(batch=8)).ranks) > 1
    one = plan(graph, roomy, "decode", Constraints(batch=8))
    assert (one.replicas, one.stages, one.ranks[0].threads) == (1, 1, 2)
    assert one.alternatives and \
        all("more ranks add hops, not speed" in a["lost"] for a in one.alternatives)
    tight = Inventory("tight", tuple(Host(f"h{i}", f"10.0.0.{i}", 2, TIGHT) for i in range(3)))
    two = plan(graph, tight, "decode", Constraints(batch=8))
    assert (two.replicas, two.stages) == (1, 2)  # the model fits in no fewer
    assert len({r.host for r in two.ranks}) == 2 and [r.threads for r in two.ranks] == [2, 2]


def test_memory_limits_bind_per_host_not_per_rank():
    graph = chain(BIG)
    weights = sum(graph.node(n)["params_bytes"] for n in graph.order)
    assert weights / 2 + cm.RUNTIME_BASELINE < TIGHT < weights / 2 + 2 * cm.RUNTIME_BASELINE
    hosts = tuple(Host(f"h{i}", f"10.0.0.{i}", 2, TIGHT) for i in range(2))
    inv = Inventory("tight", hosts)
    # unconstrained, the planner would rather run 4 ranks (2 per host): every one of them fits
    # alone, but a host cannot hold two
    chosen = plan(graph, inv, constraints=Constraints(batch=32))
    assert sorted(n for s in chosen.stage_plans for n in s.nodes) == sorted(graph.order)
    used = _host_memory_from_weights(graph, chosen)
    for host in inv.hosts:
        assert used.get(host.name, 0) <= host.memory_bytes, host.name
        assert sum(r.memory_bytes for r in chosen.ranks if r.host == host.name) \
            <= host.memory_bytes
        assert sum(r.threads for r in chosen.ranks if r.host == host.name) <= host.cores
    assert sorted(r.host for r in chosen.ranks) == ["h0", "h1"]  # spread, one rank a host


def test_ranks_that_fit_alone_but_not_together_on_one_host_are_refused():
    graph = chain(BIG)
    weights = sum(graph.node(n)["params_bytes"] for n in graph.order)
    # two stages of half the model each fit this host one at a time, not both at once
    inv = Inventory("one", (Host("h", "10.0.0.1", 2, TIGHT),))
    with pytest.raises(PlanError, match="no plan fits in memory") as info:
        plan(graph, inv, constraints=Constraints(batch=8))
    # the least missing is the single-rank layout's: the whole model and one runtime, less
    # the host's memory (plus a sample's activations, under 1 MiB)
    short = float(re.search(r"needs at least ([0-9.]+) MiB more", str(info.value)).group(1))
    least = (weights + cm.RUNTIME_BASELINE - TIGHT) / 2**20
    assert least - 0.05 <= short <= least + 1


def test_model_larger_than_the_cluster_says_how_much_is_missing():
    graph = G.load(str(ROOT / "graphs/gpt3-175b.yaml"))
    inv = Inventory("tiny", (Host("a", "10.0.0.1", 4, 64 * 2**30),
                             Host("b", "10.0.0.2", 4, 64 * 2**30)))
    with pytest.raises(PlanError, match=r"needs at least [0-9.]+ GiB more"):
        plan(graph, inv, constraints=Constraints(batch=1))


def test_latency_target_and_fixed_layout_are_respected():
    graph = G.load(str(ROOT / "graphs/gpt2.yaml"))
    inv = load_inventory(ROOT / "runtime/hosts/cluster8.yaml")
    free = plan(graph, inv, constraints=Constraints(batch=32))
    quickest = plan(graph, inv, "latency", Constraints(batch=32))
    assert quickest.latency_s <= free.latency_s and quickest.throughput <= free.throughput
    target = quickest.latency_s * 1e3 * 1.05
    fast = plan(graph, inv, constraints=Constraints(batch=32, latency_ms=target))
    assert fast.latency_s * 1e3 <= target
    with pytest.raises(PlanError, match="no plan satisfies"):
        plan(graph, inv, constraints=Constraints(batch=32, latency_ms=target / 2))
    fixed = plan(graph, inv, constraints=Constraints(batch=32, replicas=2, stages=3))
    assert (fixed.replicas, fixed.stages) == (2, 3)


def test_explanations_name_why_alternatives_lost():
    graph = G.load(str(ROOT / "graphs/gpt2.yaml"))
    chosen = plan(graph, load_inventory(ROOT / "runtime/hosts/cluster8.yaml"))
    assert chosen.alternatives and all("lost" in a for a in chosen.alternatives)
    assert sum(s.bottleneck for s in chosen.stage_plans) == 1


def test_per_call_costs_favour_fewer_larger_micro_batches():
    graph = chain([64] * 7)
    inv = Inventory("one", (Host("h", "10.0.0.1", 2, 2**40, 1.0),), FAST_LINKS)
    fixed = Constraints(parallel="model", stages=2, batch=8)
    free = plan(graph, inv, constraints=fixed, profile=no_call_costs(graph))
    costly = plan(graph, inv, constraints=fixed,
                  profile=cm.Profile({}, {}, {}, call_seconds=1e-3))
    assert free.micro_batches == 8  # same throughput for every m; the least latency wins
    assert costly.micro_batches == 1  # every micro-batch pays 3 ms of calls per stage
    assert costly.stage_plans[0].compute_s > 3e-3 * cm.RANK_SLOWDOWN


def test_plans_say_how_exhaustive_their_search_was():
    from fastserve.resources.planner import _groups

    cluster = load_inventory(ROOT / "runtime/hosts/cluster8.yaml")
    # gpu-a and gpu-b have a link of their own; cpu-1/2 and cpu-3/4 differ in memory
    assert sorted(len(g) for g in _groups(cluster)) == [1, 1, 2, 2, 2]
    chosen = plan(G.compile_graph(G.load_spec(ROOT / "graphs/gpt2.yaml"), {"seq": 32}),
                  cluster, constraints=Constraints(batch=32))
    assert "groups of identical hosts" in chosen.search and "not exhaustive" in chosen.search
    small = Inventory("two", (Host("a", "10.0.0.1", 2, 2**40, 1.0),
                              Host("b", "10.0.0.2", 2, 2**40, 0.5)), FAST_LINKS)
    assert plan(chain([8, 8, 8]), small).search == "exact"


def test_measured_times_are_interpolated_between_batches_and_scaled_beyond():
    table = [(1, 10.0), (4, 16.0), (16, 40.0)]
    assert cm.interpolate(table, 1) == 10.0 and cm.interpolate(table, 0.5) == 10.0
    assert cm.interpolate(table, 2) == pytest.approx(12.0)
    assert cm.interpolate(table, 10) == pytest.approx(28.0)
    assert cm.interpolate(table, 32) == pytest.approx(80.0)  # per sample as at the largest


def test_with_measured_node_times_the_cut_balances_time_not_flops():
    """Four nodes of equal FLOPs, the last one measured three times slower (memory-bound, as
    an LM head is): FLOPs cut 2 + 2, measured time 3 + 1."""
    graph = chain([32, 32, 32, 32, 32])
    inv = Inventory("one", (Host("h", "10.0.0.1", 2, 2**40, 1.0),), FAST_LINKS)
    fixed = Constraints(replicas=1, stages=2, micro_batches=1, batch=4, threads=1)
    by_flops = plan(graph, inv, constraints=fixed, profile=no_call_costs(graph))
    assert [len(s) for s in by_flops.cut] == [2, 2]
    seconds = {"n0": 1e-6, "n1": 1e-6, "n2": 1e-6, "n3": 3e-6}
    timed = cm.Profile(seconds, {"h": 1e9}, {}, call_seconds=0.0)
    by_time = plan(graph, inv, constraints=fixed, profile=timed)
    assert [list(s) for s in by_time.cut] == [["n0", "n1", "n2"], ["n3"]]
    # a profile that does not time every node costs the others their FLOPs
    flops = graph.node("n0")["flops"]
    partial = cm.Profile({"n3": 3 * flops / 1e9}, {"h": 1e9}, {}, call_seconds=0.0)
    assert [len(s) for s in plan(graph, inv, constraints=fixed, profile=partial).cut] == [3, 1]


def test_decode_plans_keep_room_for_the_kv_cache_they_are_asked_to_hold():
    from fastserve.graph.decode import kv_bytes_per_token

    graph = G.load(str(ROOT / "graphs/gpt2.yaml"))
    per_position = kv_bytes_per_token(graph, graph.order)  # 12 blocks x 2 x 768 floats
    assert per_position == 12 * 2 * 768 * 4
    roomy = Inventory("roomy", (Host("h0", "10.0.0.1", 2, 64 * 2**30),))
    alone = plan(graph, roomy, "decode", Constraints(batch=8)).ranks[0].memory_bytes
    # room for the weights and 300 MB more on each host: 4,096 positions (604 MB, as a cache
    # grows by doubling) fit only when two stages share them
    hosts = Inventory("two", tuple(Host(f"h{i}", f"10.0.0.{i}", 2, alone + 300 * 2**20)
                                   for i in range(2)))
    assert plan(graph, hosts, "decode", Constraints(batch=8)).stages == 1
    two = plan(graph, hosts, "decode", Constraints(batch=8, kv_positions=4096))
    assert (two.replicas, two.stages) == (1, 2) and len({r.host for r in two.ranks}) == 2
    # the rank memory stays the shard's: what is left is the cache's, every stage holding the
    # same positions (the heavier stage's per-position bytes count for both)
    per_stage = max(kv_bytes_per_token(graph, s.nodes) for s in two.stage_plans)
    assert all(r.memory_bytes + 2 * 4096 * per_stage <= alone + 300 * 2**20 for r in two.ranks)
    # two ranks on one such host share its memory evenly, as the ranks' budget does: no room
    one_host = Inventory("one", (Host("h0", "10.0.0.1", 2, alone + 300 * 2**20),))
    with pytest.raises(PlanError, match="with a KV cache of 4096 positions"):
        plan(graph, one_host, "decode", Constraints(batch=8, kv_positions=4096))
    # a rank holds at most 1 GiB of cache (KV_BYTES), however roomy its host: 8,000
    # positions (1.1 GiB for 12 blocks) take 2 stages (the cut, by time, gives the first 9
    # blocks), 30,000 more ranks than its 2 cores
    assert plan(graph, roomy, "decode", Constraints(batch=8)).stages == 1
    assert plan(graph, roomy, "decode", Constraints(batch=8, kv_positions=8000)).stages == 2
    with pytest.raises(PlanError, match="with a KV cache of 30000 positions"):
        plan(graph, roomy, "decode", Constraints(batch=8, kv_positions=30000))
