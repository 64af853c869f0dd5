"""The planner's contract, pinned exactly: the plan it chooses (shape, micro-batches, ranks,
hosts, threads, cut) and the numbers it predicts, recomputed here from the cost model's
documented formulas; every refusal's text; memory limits per host; links, the coordinator and
measured same-host hops; shapes fixed by the user beyond the cores; fixed and strategy cuts;
the ``search`` text and the alternatives.

Expected values never come from the planner itself: they are hand arithmetic, the cost model's
primitives (``fastserve.resources.costmodel``) applied to hand-chosen placements, or a brute
force over every shape, packing, cut and micro-batch count of a tiny instance.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fastserve.errors import PartitionError, PlanError
from fastserve.graph.builder import GraphBuilder
from fastserve.partition import shards_from_bounds, strategy_cut
from fastserve.resources import costmodel as cm
from fastserve.resources.inventory import Host, Inventory, Link
from fastserve.resources.planner import Constraints, plan
from fastserve.units import format_bytes
from test_planner import chain  # linear nodes n0, n1, ... (len(widths) - 1 of them)

FAST = Link(1e15, 0.0)  # transfers next to free: the min-max compute cut is the best cut
MS = (1, 2, 4, 8, 16, 32, 64)  # the micro-batch counts the planner tries (module docstring)
TB = 2**40


def free_calls() -> cm.Profile:
    """Nodes cost their FLOPs only (no per-call cost): then time is linear in the batch."""
    return cm.Profile({}, {}, {}, call_seconds=0.0)


def host(name: str, cores: int = 1, memory: int = TB, speed: float = 1.0) -> Host:
    return Host(name, f"10.0.0.{len(name)}", cores, memory, speed)


# --- an independent evaluation of one placement with the documented cost model -----------------


def hop(inv: Inventory, profile, a: str, b: str) -> Link:
    """A hop from host a to host b: the inventory's link, but one that stays on a host costs
    the profile's measured message time when it has one (costmodel/Profile docs)."""
    ln = inv.link(a, b)
    if profile is not None and profile.message_seconds is not None and a == b:
        return Link(ln.bandwidth, profile.message_seconds)
    return ln


def evaluate(graph, inv, stage_hosts, stage_threads, order, bounds, d, m, batch, profile):
    """Predicted numbers of ``d`` replicas whose stage k runs on ``stage_hosts[k]`` with
    ``stage_threads[k]`` threads, cut at ``bounds`` of ``order``, ``m`` micro-batches
    (costmodel module docstring): a dict of every number a Plan reports."""
    shards = shards_from_bounds(graph, bounds, "reference", order=order)
    costs = [cm.shard_costs(graph, s, profile) for s in shards]
    hosts = {h.name: h for h in inv.hosts}
    coord = inv.hosts[0].name  # the driver runs on the inventory's first host
    b = cm.micro_batch_size(batch, d, m)
    power = [cm.host_flops(hosts[h], profile) * cm.speedup(t)
             for h, t in zip(stage_hosts, stage_threads)]
    comp = [sc.seconds(b, pw) for sc, pw in zip(costs, power)]
    senders = [coord, *stage_hosts[:-1]]
    tran = [cm.transfer_seconds(sc.in_bytes, b, hop(inv, profile, a, h))
            for sc, a, h in zip(costs, senders, stage_hosts)]
    out = costs[-1].out_bytes
    back = cm.transfer_seconds(out, b, hop(inv, profile, stage_hosts[-1], coord))
    output = d * (back + (cm.merge_seconds(out, b) if d * m > 1 else 0.0))
    stages = [x + y for x, y in zip(comp, tran)]
    steps = [*stages, output + d * tran[0]]
    return {"comp": comp, "tran": tran, "mem": [sc.memory(b) for sc in costs], "b": b,
            "latency": cm.pipeline_latency([*stages, output], m) + (d - 1) * tran[0],
            "throughput": cm.steady_throughput(steps, b, d), "coordinator": steps[-1],
            "steps": steps, "shards": shards}


def check_numbers(graph, inv, chosen, profile):
    """Every number of ``chosen`` equals the cost model's, recomputed from its own layout."""
    order = [n for s in chosen.stage_plans for n in s.nodes]
    assert sorted(order) == sorted(graph.order)
    bounds = list(itertools.accumulate(len(s.nodes) for s in chosen.stage_plans))
    first = [chosen.stage_ranks(0, k)[0] for k in range(chosen.stages)]
    ref = evaluate(graph, inv, [r.host for r in first], [r.threads for r in first], order,
                   bounds, chosen.replicas, chosen.micro_batches, chosen.batch, profile)
    assert chosen.throughput == pytest.approx(ref["throughput"], rel=1e-12)
    assert chosen.latency_s == pytest.approx(ref["latency"], rel=1e-12)
    assert chosen.coordinator_s == pytest.approx(ref["coordinator"], rel=1e-12)
    assert chosen.bubble == pytest.approx(
        (chosen.stages - 1) / (chosen.micro_batches + chosen.stages - 1), rel=1e-12)
    for k, s in enumerate(chosen.stage_plans):
        assert (s.stage, s.host, s.threads) == (k, first[k].host, first[k].threads)
        assert s.compute_s == pytest.approx(ref["comp"][k], rel=1e-12)
        assert s.transfer_s == pytest.approx(ref["tran"][k], rel=1e-12)
        assert s.memory_bytes == ref["mem"][k]
    slowest = max(range(chosen.stages + 1), key=lambda k: ref["steps"][k])
    assert [s.bottleneck for s in chosen.stage_plans] == \
        [k == slowest for k in range(chosen.stages)]
    # rank r * p + k is stage k of replica r; every replica holds the same memory per stage
    assert [(r.rank, r.replica, r.stage) for r in chosen.ranks] == \
        [(r * chosen.stages + k, r, k) for r in range(chosen.replicas)
         for k in range(chosen.stages)]
    assert [r.memory_bytes for r in chosen.ranks] == ref["mem"] * chosen.replicas
    return ref


# --- a brute force over every shape, packing, cut and micro-batch count ------------------------


def deal(inv, counts, d, p, profile):
    """The packing's slots dealt to d replicas of p stages, fastest first (name breaks ties);
    None when the stages of the replicas cannot get identical slots."""
    slots = []
    for h, n in zip(inv.hosts, counts):
        t = max(1, h.cores // n) if n else 0
        slots += [(cm.host_flops(h, profile) * cm.speedup(t), h.name, t)] * n
    slots.sort(key=lambda s: (-s[0], s[1]))
    groups = [slots[k * d:(k + 1) * d] for k in range(p)]
    if any(len({(s[0], s[2]) for s in g}) != 1 for g in groups):
        return None
    return [g[0] for g in groups], slots


def brute_force(graph, inv, batch, objective="throughput", profile=None, latency_ms=None):
    """The best (throughput, latency, d, p, m) over everything the planner may choose, by
    exhaustive enumeration; plans slower than ``latency_ms`` do not count."""
    n = len(graph)
    best = None
    hosts = inv.hosts
    for d in range(1, batch + 1):
        for p in range(1, n + 1):
            for counts in itertools.product(*[range(h.cores + 1) for h in hosts]):
                if sum(counts) != d * p:
                    continue
                dealt = deal(inv, counts, d, p, profile)
                if dealt is None:
                    continue
                stage_slots, slots = dealt
                for cut in itertools.combinations(range(1, n), p - 1):
                    for m in MS:
                        if m > math.ceil(batch / d):
                            continue
                        ref = evaluate(graph, inv, [s[1] for s in stage_slots],
                                       [s[2] for s in stage_slots], list(graph.order),
                                       [*cut, n], d, m, batch, profile)
                        # memory binds per host: every rank placed there
                        used = {}
                        for r in range(d):
                            for k in range(p):
                                h = slots[k * d + r][1]
                                used[h] = used.get(h, 0) + ref["mem"][k]
                        if any(used[h.name] > h.memory_bytes for h in hosts if h.name in used):
                            continue
                        if latency_ms is not None and ref["latency"] * 1e3 > latency_ms:
                            continue
                        key = {"throughput": (ref["throughput"], -ref["latency"]),
                               "latency": (-ref["latency"], ref["throughput"]),
                               "decode": (-d * p, -ref["latency"], ref["throughput"])
                               }[objective]
                        if best is None or key > best[0]:
                            best = (key, ref["throughput"], ref["latency"], d, p, m)
    return best[1:]


# instances found where a wrong bound on 2-stage shapes prunes the best plan
FIXED_INSTANCES = [(4, ((2, 0.25), (2, 0.25)), 2), (5, ((3, 1.0), (4, 1.0)), 4)]


def fixed_instance(nodes, hosts, batch):
    graph = chain([64] * (nodes + 1))
    return graph, Inventory("small", tuple(Host(f"h{i}", f"10.0.0.{i}", c, TB, s)
                                           for i, (c, s) in enumerate(hosts)), FAST), batch


def random_instance(seed: int):
    rng = random.Random(seed)
    graph = chain([rng.choice([8, 16, 32, 64]) for _ in range(rng.randint(3, 5))])
    hosts = tuple(Host(f"h{i}", f"10.0.0.{i}", rng.randint(1, 2), TB,
                       rng.choice([1.0, 0.5, 0.25])) for i in range(rng.randint(1, 3)))
    return graph, Inventory("small", hosts, FAST), rng.choice([1, 2, 4, 8])


# --- refusals -------------------------------------------------------------------------------------


def test_an_unknown_objective_is_refused_by_name():
    with pytest.raises(PlanError) as info:
        plan(chain([8, 8]), Inventory("one", (host("a"),)), "speed")
    assert str(info.value) == \
        "objective must be one of throughput, latency, decode, not 'speed'"


def test_no_plan_names_the_constraints_that_were_set():
    graph = chain([8, 8, 8])
    inv = Inventory("one", (host("a", cores=2),), FAST)
    # a latency ceiling no plan meets: the message lists every constraint that is not None
    with pytest.raises(PlanError) as info:
        plan(graph, inv, constraints=Constraints(batch=4, latency_ms=1e-9, stages=2))
    assert str(info.value) == (
        "no plan satisfies the constraints {'parallel': 'auto', 'stages': 2, 'batch': 4, "
        "'latency_ms': 1e-09, 'transport': 'ipc'}")


def test_memory_shortfall_is_the_least_any_layout_misses_in_format_bytes():
    graph = chain([256, 256, 256])  # two nodes of 256 x 256 weights
    ref = evaluate(graph, Inventory("x", (host("a"),)), ["a"], [1], list(graph.order), [2],
                   1, 1, 1, free_calls())
    whole = ref["mem"][0]  # one rank holding everything, one sample
    # one core: the only layout is a single rank (batch 1, one micro-batch); it misses
    # 1234567 bytes
    inv = Inventory("lab", (host("a", memory=whole - 1234567),))
    with pytest.raises(PlanError) as info:
        plan(graph, inv, constraints=Constraints(batch=1), profile=free_calls())
    assert str(info.value) == (f"no plan fits in memory: the model needs at least "
                               f"{format_bytes(1234567)} more than the cluster 'lab' offers "
                               f"in its best layout")
    assert format_bytes(1234567) == "1.2 MiB"


def test_a_fixed_cut_must_cover_every_node_exactly_once():
    graph = chain([8, 8, 8, 8])
    inv = Inventory("one", (host("a", cores=2),), FAST)
    for cut in ((("n0",), ("n1",)), (("n0", "n1"), ("n1", "n2")), (("n0", "n1", "n2", "n2"),)):
        with pytest.raises(PlanError) as info:
            plan(graph, inv, constraints=Constraints(cut=cut, stages=len(cut), batch=2))
        assert str(info.value) == "the fixed cut does not cover the graph's nodes exactly once"


def test_a_cut_of_more_stages_than_nodes_is_refused_inside_the_planner():
    # the planner never asks for it (stages <= nodes), but the refusal must say why
    from fastserve.resources.planner import _Cut, _StrategyCut

    graph = chain([8, 8, 8])
    with pytest.raises(PartitionError, match=r"^more stages than nodes$"):
        _Cut(graph, (1.0, 1.0, 1.0), None)
    with pytest.raises(PartitionError, match=r"^more stages than nodes$"):
        _StrategyCut(graph, "weight", 3, None, [TB] * 3)


# --- the best plan, against brute force -----------------------------------------------------------


@pytest.mark.parametrize("instance", [*range(8), *FIXED_INSTANCES])
@pytest.mark.parametrize("objective", ["throughput", "latency", "decode"])
def test_the_chosen_plan_is_the_brute_force_best(instance, objective):
    """Pruning (throughput only) never loses the best plan; the latency objective minimises
    latency, then maximises throughput; decode takes the fewest ranks, then the lowest
    latency; every predicted number is the cost model's."""
    graph, inv, batch = random_instance(instance) if isinstance(instance, int) else \
        fixed_instance(*instance)
    chosen = plan(graph, inv, objective, Constraints(batch=batch), profile=free_calls())
    thr, lat, d, p, _ = brute_force(graph, inv, batch, objective, free_calls())
    if objective == "throughput":
        assert chosen.throughput == pytest.approx(thr, rel=1e-9)
    else:
        if objective == "decode":
            assert len(chosen.ranks) == d * p
        assert chosen.latency_s == pytest.approx(lat, rel=1e-9)
    check_numbers(graph, inv, chosen, free_calls())
    assert chosen.search == "exact"  # at most 3 hosts of 2 cores: every packing was tried


@pytest.mark.parametrize("seed", [0, 3])
def test_a_latency_ceiling_keeps_the_best_throughput_under_it(seed):
    graph, inv, batch = random_instance(seed)
    _, quickest, *_ = brute_force(graph, inv, batch, "latency", free_calls())
    ceiling_ms = quickest * 1e3 * 1.3
    chosen = plan(graph, inv, constraints=Constraints(batch=batch, latency_ms=ceiling_ms),
                  profile=free_calls())
    assert chosen.latency_s * 1e3 <= ceiling_ms
    thr, *_ = brute_force(graph, inv, batch, "throughput", free_calls(), latency_ms=ceiling_ms)
    assert chosen.throughput == pytest.approx(thr, rel=1e-9)


def test_measured_profiles_drive_bounds_powers_and_cuts():
    """A profile that measures the host 10 times faster than its nominal speed, and nodes 10
    times cheaper than their FLOPs: the planner's bounds must use the same measured numbers as
    its predictions, or it prunes the best shape unseen (here data parallel, visited after
    the 2-stage pipeline, or the single rank, visited first when the bounds are too low)."""
    graph = chain([4096] * 4)  # 3 equal nodes: a 2-stage cut is 2 + 1, unbalanced
    inv = Inventory("one", (host("h", cores=2),), FAST)
    flops = 10 * cm.REFERENCE_FLOPS
    seconds = {n: graph.node(n)["flops"] / flops / 10 for n in graph.order}
    profile = cm.Profile(seconds, {"h": flops}, {}, call_seconds=0.0)
    chosen = plan(graph, inv, constraints=Constraints(batch=4), profile=profile)
    thr, _, d, p, m = brute_force(graph, inv, 4, "throughput", profile)
    assert (chosen.replicas, chosen.stages, chosen.micro_batches) == (d, p, m) == (2, 1, 2)
    assert chosen.throughput == pytest.approx(thr, rel=1e-12)
    check_numbers(graph, inv, chosen, profile)


# --- shapes fixed beyond the cores: more ranks than cores -----------------------------------------


def test_data_parallel_on_one_core_runs_two_replicas_sharing_it():
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a"),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(parallel="data", batch=4),
                  profile=free_calls())
    # data parallel needs 2 ranks at least: both on the single core, one thread each
    assert (chosen.mode, chosen.replicas, chosen.stages) == ("data", 2, 1)
    assert [(r.host, r.threads) for r in chosen.ranks] == [("a", 1), ("a", 1)]
    # 1 rank (single, allowed with --parallel data) and 2 ranks were both searched
    assert chosen.search == "2 rank counts (1..2): more ranks than cores, as fixed by the " \
                            "constraints"
    check_numbers(graph, inv, chosen, free_calls())


def test_model_parallel_on_one_core_runs_two_stages_not_more():
    graph = chain([16, 16, 16, 16])  # 3 nodes: 3 stages would be possible with 3 cores
    inv = Inventory("one", (host("a"),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(parallel="model", batch=4),
                  profile=free_calls())
    assert (chosen.mode, chosen.replicas, chosen.stages) == ("model", 1, 2)
    assert [(r.host, r.threads) for r in chosen.ranks] == [("a", 1), ("a", 1)]
    assert chosen.search == "2 rank counts (1..2): more ranks than cores, as fixed by the " \
                            "constraints"
    check_numbers(graph, inv, chosen, free_calls())


@pytest.mark.parametrize("constraints", [Constraints(parallel="hybrid", batch=4),
                                         Constraints(replicas=2, stages=2, batch=4)])
def test_a_two_by_two_shape_on_two_cores_oversubscribes_them(constraints):
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a", cores=2),), FAST)
    chosen = plan(graph, inv, constraints=constraints, profile=free_calls())
    assert (chosen.mode, chosen.replicas, chosen.stages) == ("hybrid", 2, 2)
    assert [(r.host, r.threads) for r in chosen.ranks] == [("a", 1)] * 4
    assert chosen.search == "rank count 4: more ranks than cores, as fixed by the " \
                            "constraints"
    check_numbers(graph, inv, chosen, free_calls())


@pytest.mark.parametrize("parallel", ["data", "model"])
def test_the_least_shape_of_a_mode_is_searched_and_no_more(parallel):
    """Over a slow link no plan comes near its compute bound, so nothing is pruned: the search
    text lists every rank count tried, 1 (a single rank) and the 2 the mode needs at least,
    not 3. (Every hop costs a millisecond: the single rank, with the fewest, wins.)"""
    graph = chain([16, 16, 16, 16])
    inv = Inventory("one", (host("a"),), Link(1e9, 1e-3))
    chosen = plan(graph, inv, constraints=Constraints(parallel=parallel, batch=4),
                  profile=free_calls())
    assert (chosen.replicas, chosen.stages) == (1, 1)
    assert chosen.search == "2 rank counts (1..2): more ranks than cores, as fixed by the " \
                            "constraints"


def test_data_parallel_within_the_cores_is_an_exact_search():
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a", cores=2),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(parallel="data", batch=4),
                  profile=free_calls())
    assert (chosen.replicas, chosen.stages, chosen.search) == (2, 1, "exact")


def test_a_fixed_shape_that_exactly_fills_the_cores_is_an_exact_search():
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a", cores=2),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=2, stages=1, batch=4),
                  profile=free_calls())
    assert (chosen.replicas, chosen.stages, chosen.search) == (2, 1, "exact")
    assert [(r.host, r.threads) for r in chosen.ranks] == [("a", 1), ("a", 1)]


def test_replicas_never_outnumber_the_samples():
    graph = chain([16, 16, 16])
    inv = Inventory("two", (host("a"), host("bb")), FAST)
    chosen = plan(graph, inv, constraints=Constraints(parallel="data", batch=1),
                  profile=free_calls())
    assert (chosen.replicas, chosen.stages) == (1, 1)  # a second replica would get no sample


def test_fixed_threads_replace_the_cores_share():
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a", cores=4),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=1, batch=4,
                                                      threads=1), profile=free_calls())
    assert [(r.host, r.threads) for r in chosen.ranks] == [("a", 1)]
    check_numbers(graph, inv, chosen, free_calls())


# --- micro-batches and memory -------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 4, 16, 32, 64])
def test_with_time_linear_in_the_batch_the_most_micro_batches_win(batch):
    """Every micro-batch count gives the same throughput (time is linear in the batch, and
    powers of two scale exactly); more micro-batches shorten the pipeline fill, so the
    largest count of 1, 2, 4, ..., 64 not above the batch wins."""
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a", cores=2),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=2, batch=batch),
                  profile=free_calls())
    assert chosen.micro_batches == batch
    check_numbers(graph, inv, chosen, free_calls())


def test_micro_batches_never_exceed_a_replicas_samples():
    # 6 samples over 2 replicas: 3 each, so 1 or 2 micro-batches (4 would be 4 of 1 sample for
    # 3 samples, a shorter fill the batch cannot have)
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a", cores=4),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=2, stages=2, batch=6),
                  profile=free_calls())
    assert chosen.micro_batches == 2
    check_numbers(graph, inv, chosen, free_calls())


def test_a_fixed_micro_batch_count_is_kept():
    graph = chain([16, 16, 16])
    inv = Inventory("one", (host("a", cores=2),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=2, batch=8,
                                                      micro_batches=1), profile=free_calls())
    assert chosen.micro_batches == 1


def test_memory_too_small_for_a_whole_batch_takes_smaller_micro_batches():
    graph = chain([512, 512, 512])
    probe = evaluate(graph, Inventory("x", (host("a"),)), ["a"], [1], list(graph.order), [2],
                     1, 1, 1, free_calls())
    per_sample = evaluate(graph, Inventory("x", (host("a"),)), ["a"], [1], list(graph.order),
                          [2], 1, 1, 2, free_calls())["mem"][0] - probe["mem"][0]
    # room for micro-batches of 2 samples, not 4 or 8: 8 samples need 4 micro-batches or more
    inv = Inventory("one", (host("a", memory=probe["mem"][0] + per_sample),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(batch=8), profile=free_calls())
    assert chosen.micro_batches in (4, 8)
    ref = check_numbers(graph, inv, chosen, free_calls())
    assert ref["mem"][0] <= inv.hosts[0].memory_bytes
    thr, lat, d, p, m = brute_force(graph, inv, 8, "throughput", free_calls())
    assert (chosen.replicas, chosen.stages, chosen.micro_batches) == (d, p, m)


def test_memory_binds_per_host_the_sum_of_its_ranks():
    """Two cores and room for two runtimes plus one copy of the weights: two replicas (two
    copies) would be faster but do not fit together; two stages of half the weights do."""
    graph = chain([1024] * 5)  # 4 nodes of 4 MiB of weights
    weights = sum(graph.node(n)["params_bytes"] for n in graph.order)
    inv = Inventory("one", (host("h", cores=2, memory=2 * cm.RUNTIME_BASELINE + weights
                                 + 2**20),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(batch=2), profile=free_calls())
    thr, lat, d, p, m = brute_force(graph, inv, 2, "throughput", free_calls())
    assert (chosen.replicas, chosen.stages, chosen.micro_batches) == (d, p, m) == (1, 2, 2)
    assert chosen.throughput == pytest.approx(thr, rel=1e-12)
    assert sum(r.memory_bytes for r in chosen.ranks) <= inv.hosts[0].memory_bytes
    roomy = Inventory("one", (host("h", cores=2),), FAST)
    free = plan(graph, roomy, constraints=Constraints(batch=2), profile=free_calls())
    assert (free.replicas, free.stages) == (2, 1) and free.throughput > chosen.throughput


# --- links, the coordinator, measured hops ------------------------------------------------------


def test_hops_use_their_links_and_the_measured_message_time_on_one_host():
    """Stage 0 runs on the faster host b, stage 1 on a, the inventory's first host and so the
    coordinator: a -> b and b -> a cross the a-b link; the output hop a -> a stays on a and
    costs the profile's measured message time instead of the default link's latency."""
    graph = chain([64, 64, 64, 64])
    ab = Link(1e9, 1e-3)
    inv = Inventory("pair", (host("a", speed=0.5), host("b", speed=1.0)), Link(4e9, 2e-5),
                    {frozenset(("a", "b")): ab})
    profile = cm.Profile({}, {}, {}, call_seconds=0.0, message_seconds=7e-4)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=2, batch=4,
                                                      micro_batches=2), profile=profile)
    assert [s.host for s in chosen.stage_plans] == ["b", "a"]
    ref = check_numbers(graph, inv, chosen, profile)
    first, last = ref["shards"][0], ref["shards"][-1]
    b = 2  # 4 samples in 2 micro-batches
    # by hand: the links' latency plus bytes over bandwidth
    assert chosen.stage_plans[0].transfer_s == pytest.approx(1e-3 + first.in_bytes * b / 1e9,
                                                             rel=1e-12)
    assert chosen.stage_plans[1].transfer_s == pytest.approx(
        1e-3 + ref["shards"][1].in_bytes * b / 1e9, rel=1e-12)
    out = 7e-4 + last.out_bytes * b / 4e9 + last.out_bytes * b / cm.COPY_BANDWIDTH
    assert chosen.coordinator_s == pytest.approx(out + chosen.stage_plans[0].transfer_s,
                                                 rel=1e-12)


def test_replicas_wait_for_the_coordinator_to_send_to_each_in_turn():
    """Two replicas on hosts a and b; the coordinator (a) sends the second replica's input
    after the first's: the latency has one more input transfer, and the coordinator's step
    sends and receives for both replicas."""
    graph = chain([64, 64, 64])
    inv = Inventory("pair", (host("a"), host("b")), Link(1e9, 1e-3))
    chosen = plan(graph, inv, constraints=Constraints(replicas=2, stages=1, batch=4,
                                                      micro_batches=1), profile=free_calls())
    assert [r.host for r in chosen.ranks] == ["a", "b"]
    ref = check_numbers(graph, inv, chosen, free_calls())
    shard = ref["shards"][0]
    b = 2
    tin = 1e-3 + shard.in_bytes * b / 1e9
    tout = 1e-3 + shard.out_bytes * b / 1e9
    merge = shard.out_bytes * b / cm.COPY_BANDWIDTH
    comp = cm.RANK_SLOWDOWN * b * graph.flops / cm.REFERENCE_FLOPS
    stage, coord = comp + tin, 2 * (tout + merge)
    assert chosen.latency_s == pytest.approx(stage + coord + tin, rel=1e-12)
    assert chosen.coordinator_s == pytest.approx(coord + 2 * tin, rel=1e-12)
    assert chosen.throughput == pytest.approx(2 * b / max(stage, coord + 2 * tin), rel=1e-12)


# --- fixed cuts and strategy cuts ---------------------------------------------------------------


def branch_graph():
    """x feeds a and s, y = a + s, z follows: graph.order is a, s, y, z, but s, a, y, z is a
    valid order too."""
    b = GraphBuilder("branch")
    b.input("x", ["batch", 64])
    b.node("a", "linear", ["x"], in_features=64, out_features=64)
    b.node("s", "linear", ["x"], in_features=64, out_features=64)
    b.node("y", "add", ["a", "s"])
    b.node("z", "linear", ["y"], in_features=64, out_features=64)
    b.output("z")
    return b.compile()


def timed(graph, factor: float = 3.0) -> cm.Profile:
    """Measured node times ``factor`` times what their FLOPs predict (add: a microsecond)."""
    seconds = {n: (graph.node(n)["flops"] * factor / cm.REFERENCE_FLOPS) or 1e-6
               for n in graph.order}
    return cm.Profile(seconds, {}, {}, call_seconds=0.0)


def test_a_fixed_cut_is_kept_in_its_own_order_and_costed_with_the_profile():
    graph = branch_graph()
    assert graph.order == ("a", "s", "y", "z")
    inv = Inventory("one", (host("h", cores=2),), FAST)
    cut = (("s", "a"), ("y", "z"))
    profile = timed(graph)
    chosen = plan(graph, inv, constraints=Constraints(cut=cut, stages=2, batch=4),
                  profile=profile)
    assert chosen.cut == cut
    assert chosen.bounds == (2, 4)  # in the cut's own order: (s, a) | (y, z)
    check_numbers(graph, inv, chosen, profile)


def test_a_fixed_cut_fixes_the_stage_count():
    graph = chain([64] * 5)  # 4 nodes
    inv = Inventory("two", (host("a", cores=2), host("b", cores=2)), FAST)
    cut = (("n0", "n1"), ("n2", "n3"))
    # without stages, every plan has the cut's 2 stages and keeps every node
    chosen = plan(graph, inv, constraints=Constraints(cut=cut, batch=8))
    assert chosen.stages == 2 and chosen.cut == cut
    assert {a["stages"] for a in chosen.alternatives} == {2}
    for stages in (1, 3):  # another stage count would drop nodes or index past the cut
        with pytest.raises(PlanError) as info:
            plan(graph, inv, constraints=Constraints(cut=cut, stages=stages, batch=8))
        assert str(info.value) == f"the fixed cut has 2 stages, but stages={stages} was asked"


def test_a_strategy_cuts_as_the_partition_command_does_whatever_the_speeds():
    graph = chain([64] * 5)  # 4 equal nodes
    inv = Inventory("het", (host("a", speed=1.0), host("b", speed=0.25)), FAST)
    profile = timed(graph)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=2, batch=4,
                                                      strategy="weight"), profile=profile)
    # the planner's own cut would give the 4x faster host 3 nodes of 4; weight cuts 2 + 2
    assert chosen.cut == tuple(s.nodes for s in strategy_cut(graph, "weight", 2)) \
        == (("n0", "n1"), ("n2", "n3"))
    assert [s.host for s in chosen.stage_plans] == ["a", "b"]
    assert chosen.bounds == (2, 4)
    check_numbers(graph, inv, chosen, profile)
    own = plan(graph, inv, constraints=Constraints(replicas=1, stages=2, batch=4),
               profile=free_calls())
    assert own.cut == (("n0", "n1", "n2"), ("n3",))


def test_a_strategy_may_cut_as_many_stages_as_nodes():
    graph = chain([64] * 4)  # 3 nodes, 3 stages
    inv = Inventory("one", (host("h", cores=3),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=3, batch=4,
                                                      strategy="weight"), profile=free_calls())
    assert chosen.cut == (("n0",), ("n1",), ("n2",))
    check_numbers(graph, inv, chosen, free_calls())


WIDE = [8192] * 9  # 8 linear nodes of 8192 x 8192: 256 MiB of weights each, 2 GiB in all


def test_hybrid_caps_each_rank_at_its_share_of_its_hosts_memory():
    """Two ranks on one host share its memory: each shard is capped at half of it less a
    runtime. Half holds half the model and a runtime, but a quarter would not, nor would half
    hold the whole model: one rank of the whole model or two of half."""
    graph = chain(WIDE)
    weights = sum(graph.node(n)["params_bytes"] for n in graph.order)
    memory = 2 * cm.RUNTIME_BASELINE + weights + 16 * 2**20
    assert memory // 4 < weights // 2 < memory // 2 < weights <= memory
    inv = Inventory("one", (host("h", cores=2, memory=memory),), FAST)
    chosen = plan(graph, inv, constraints=Constraints(batch=4, strategy="hybrid"),
                  profile=free_calls())
    assert (chosen.replicas, chosen.stages) == (1, 2)  # 2 replicas of the whole: no cut fits
    share = memory // 2 - cm.RUNTIME_BASELINE  # weights // 2 + 8 MiB
    expected = strategy_cut(graph, "hybrid", 2, [share, share])
    assert chosen.cut == tuple(s.nodes for s in expected)
    check_numbers(graph, inv, chosen, free_calls())
    assert sum(r.memory_bytes for r in chosen.ranks) <= memory


def test_hybrid_cuts_again_for_each_placements_memory_shares():
    """Hosts of equal speed, b with little memory: b and c get a cut that spares b (one node
    on b: its share less a runtime holds one), a and c (the same speeds) must get their own,
    balanced, cut, which is faster."""
    graph = chain(WIDE)
    small = 600 * 2**20  # a runtime and one node (576 MiB), not two (832 MiB)
    share_b = small - cm.RUNTIME_BASELINE
    assert [len(s.nodes) for s in strategy_cut(graph, "hybrid", 2, [share_b, TB])] == [1, 7]
    inv = Inventory("three", (host("a"), host("b", memory=small), host("c")), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=2, batch=2,
                                                      strategy="hybrid"), profile=free_calls())
    assert [s.host for s in chosen.stage_plans] == ["a", "c"]
    assert chosen.cut == tuple(s.nodes for s in strategy_cut(graph, "hybrid", 2, [TB, TB]))
    assert [len(s) for s in chosen.cut] == [4, 4]
    check_numbers(graph, inv, chosen, free_calls())


def test_hybrid_leaves_room_for_the_runtime_of_a_small_hosts_rank():
    """Two stages on b (600 MiB) and c: capped at all of b's memory the hybrid cut would give
    b two nodes (512 MiB), which with its runtime (832 MiB) the planner must refuse; capped at
    b's memory less a runtime it gives b one node, which fits."""
    graph = chain(WIDE)
    small = 600 * 2**20
    inv = Inventory("two", (host("b", memory=small), host("c")), FAST)
    chosen = plan(graph, inv, constraints=Constraints(replicas=1, stages=2, batch=2,
                                                      strategy="hybrid"), profile=free_calls())
    assert [s.host for s in chosen.stage_plans] == ["b", "c"]
    assert [len(s) for s in chosen.cut] == [1, 7]
    assert chosen.ranks[0].memory_bytes <= small
    check_numbers(graph, inv, chosen, free_calls())


# --- the search text and the alternatives -----------------------------------------------------


FOUR = Inventory("four", (host("h", cores=4),), FAST)


def shapes_of(chosen):
    return sorted((a["replicas"], a["stages"]) for a in chosen.alternatives)


def test_alternatives_are_the_shapes_searched_with_why_they_lost():
    """4 cores, batch 4, 3 equal nodes (W FLOPs per sample); in reference cores (f / W
    samples/s), shapes are visited best bound first, then by replicas and stages:

    - 1x2, 1x3, 2x1 (bound: the 4 cores): searched; 2x1 (two ranks of 2 threads) reaches
      2 * 1.8 / 1.15 = 3.13;
    - 2x2 (bound 4): four one-thread ranks, but its balanced cut (2 nodes + 1) bounds it at
      2 replicas / (2/3) = 3 < 3.13: no cut is built, it is not an alternative;
    - 3x1 (bound 4): three one-thread ranks, at most 3 < 3.13: its packing is skipped;
    - 4x1 (bound 4): four one-thread replicas, 4 / 1.15 = 3.48: the best;
    - 1x1 (one rank of 4 threads, bound 1 + 3 * 0.8 = 3.4 < 3.48): the search stops.
    """
    assert 3 < 2 * cm.speedup(2) / cm.RANK_SLOWDOWN < cm.speedup(4) < 4 / cm.RANK_SLOWDOWN
    graph = chain([64, 64, 64, 64])
    chosen = plan(graph, FOUR, constraints=Constraints(batch=4), profile=free_calls())
    assert (chosen.replicas, chosen.stages) == (4, 1)
    # 4 reference cores over 1.15, less the (near free) input transfer
    assert chosen.throughput == pytest.approx(4 * cm.REFERENCE_FLOPS / graph.flops
                                              / cm.RANK_SLOWDOWN, rel=1e-6)
    assert shapes_of(chosen) == [(1, 2), (1, 3), (2, 1)]
    for a in chosen.alternatives:
        assert a["lost"] == (f"{a['throughput']:.1f} samples/s < {chosen.throughput:.1f} of the "
                             f"chosen plan")
        assert a["hosts"] == ["h"]
        assert a["mode"] == ("model" if a["replicas"] == 1 else "data")
    # sorted by throughput, best first
    assert [a["throughput"] for a in chosen.alternatives] == \
        sorted((a["throughput"] for a in chosen.alternatives), reverse=True)


def test_without_a_cut_bound_the_packing_and_shape_bounds_still_prune():
    """As above, with node times measured (equal to their FLOPs): a measured cut has no bound
    known before it is built, so 2x2 is now searched (its 4 one-thread ranks could reach 4);
    3x1 is still skipped by its packing's 3 cores and 1x1 by its shape's 3.4."""
    graph = chain([64, 64, 64, 64])
    seconds = {n: graph.node(n)["flops"] / cm.REFERENCE_FLOPS for n in graph.order}
    profile = cm.Profile(seconds, {}, {}, call_seconds=0.0)
    chosen = plan(graph, FOUR, constraints=Constraints(batch=4), profile=profile)
    assert (chosen.replicas, chosen.stages) == (4, 1)
    assert shapes_of(chosen) == [(1, 2), (1, 3), (2, 1), (2, 2)]
    check_numbers(graph, FOUR, chosen, profile)


def test_the_search_stops_at_the_first_shape_whose_bound_cannot_win():
    """Six identical one-core hosts: r ranks are bounded by r cores, so the 6-rank shapes are
    visited first, and the best of them, near 6 / 1.15 = 5.2 cores, beats every 5-rank shape's
    bound: the search stops there, and says it searched 6 ranks only (by groups of identical
    hosts: 6 ranks over 6 hosts are too many packings to try one by one)."""
    graph = chain([256, 256, 256, 256])
    inv = Inventory("six", tuple(host(f"h{i}") for i in range(6)), FAST)
    chosen = plan(graph, inv, constraints=Constraints(batch=6), profile=free_calls())
    assert chosen.replicas * chosen.stages == 6
    assert chosen.throughput > 5 * cm.REFERENCE_FLOPS / graph.flops
    assert chosen.search == "rank count 6: every split between groups of identical " \
                            "hosts, even within a group"


def test_the_cut_bound_weighs_each_stage_by_its_ranks_speed():
    """h0: 3 cores at full speed, h1: 2 at a quarter; 5 equal nodes (w each, W in all), one
    sample. One rank of 3 threads wins at 2.6 / 1.15 = 2.26 f / W. Five ranks (one node each,
    2 of them at a quarter speed) are bounded by 3.5 f / W by their FLOP/s, but their cut's
    bottleneck is a node on a quarter-speed rank, 4 w: at most f / (4 w) = 1.25 f / W, so
    that shape is never cut, nor listed."""
    graph, inv, batch = fixed_instance(5, ((3, 1.0), (2, 0.25)), 1)
    chosen = plan(graph, inv, constraints=Constraints(batch=batch), profile=free_calls())
    assert (chosen.replicas, chosen.stages) == (1, 1)
    assert chosen.throughput == pytest.approx(
        cm.REFERENCE_FLOPS * cm.speedup(3) / cm.RANK_SLOWDOWN / graph.flops, rel=1e-6)
    assert shapes_of(chosen) == [(1, 2), (1, 3), (1, 4)]


def test_the_latency_objective_searches_every_shape():
    graph = chain([64, 64, 64, 64])
    chosen = plan(graph, FOUR, "latency", Constraints(batch=4), profile=free_calls())
    everything = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert shapes_of(chosen) == [s for s in everything if s != (chosen.replicas,
                                                                 chosen.stages)]
    thr, lat, d, p, m = brute_force(graph, FOUR, 4, "latency", free_calls())
    assert (chosen.replicas, chosen.stages, chosen.micro_batches) == (d, p, m)
    for a in chosen.alternatives:
        assert a["lost"] == (f"latency {a['latency_s'] * 1e3:.1f} ms > "
                             f"{chosen.latency_s * 1e3:.1f} ms")


def test_alternatives_name_the_hosts_they_use():
    graph = chain([16, 16, 16])
    inv = Inventory("two", (host("b"), host("a")), FAST)
    chosen = plan(graph, inv, constraints=Constraints(batch=2), profile=free_calls())
    assert (chosen.replicas, chosen.stages) == (2, 1)
    assert [(a["replicas"], a["stages"], a["hosts"]) for a in chosen.alternatives] == \
        [(1, 2, ["a", "b"])]
