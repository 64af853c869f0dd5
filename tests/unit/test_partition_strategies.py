"""The layer strategy, the dispatcher, verify(sharding), cut contents and size parsing."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest

import fastserve as fs
from fastserve.errors import PartitionError, SizeError
from fastserve.partition import (STRATEGIES, Sharding, layer_shards, layer_units, parse_bytes,
                                 partition, register_strategy, shards_from_bounds, synthetic,
                                 verify)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpt2():
    return fs.load(str(ROOT / "graphs/gpt2.yaml"), {"seq": 16})


@pytest.fixture(scope="module")
def mlp():
    return fs.load(str(ROOT / "graphs/mlp.yaml"))


# --- layer ---------------------------------------------------------------------------------------


def test_layer_gives_ceil_l_over_k_shards_of_whole_layers(gpt2):
    layers = 12
    for k in range(1, layers + 2):
        sharding = partition(gpt2, "layer", layers_per_shard=k)
        assert len(sharding) == math.ceil(layers / k)
        blocks = [[n for n in s.nodes if n.startswith("h.")] for s in sharding]
        assert [len(b) for b in blocks[:-1]] == [k] * (len(blocks) - 1)
        assert 1 <= len(blocks[-1]) <= k
    # nodes outside the repeat block go with their neighbouring layers
    first, *_, last = partition(gpt2, "layer", layers_per_shard=5)
    assert first.nodes[:3] == ("wte", "wpe", "h.0")
    assert last.nodes[-3:] == ("h.11", "ln_f", "lm_head")


def test_layer_with_a_shard_count_balances_layer_counts(gpt2):
    for n in range(1, 13):
        sharding = layer_shards(gpt2, shards=n)
        counts = [sum(1 for x in s.nodes if x.startswith("h.")) for s in sharding]
        assert len(counts) == n and sum(counts) == 12 and max(counts) - min(counts) <= 1
    with pytest.raises(PartitionError, match="it has 12 layers; use at most 12 shards"):
        layer_shards(gpt2, shards=13)


def test_layer_units_of_graphs_with_inner_nodes_and_without_repeats(mlp):
    units = layer_units(mlp)  # fc_in, 6 x (fc, act), head
    assert len(units) == 6
    assert units[0] == ("fc_in", "layer.0.fc", "layer.0.act")
    assert units[-1] == ("layer.5.fc", "layer.5.act", "head")
    dag = synthetic.dag(9, seed=3)  # no repeat block: one layer per node
    assert len(partition(dag, "layer", layers_per_shard=2)) == math.ceil(9 / 2)


def test_layer_needs_exactly_one_option(mlp):
    with pytest.raises(PartitionError, match="exactly one"):
        partition(mlp, "layer")
    with pytest.raises(PartitionError, match="exactly one"):
        partition(mlp, "layer", shards=2, layers_per_shard=2)
    with pytest.raises(PartitionError, match="positive integer"):
        partition(mlp, "layer", layers_per_shard=0)


# --- dispatcher ----------------------------------------------------------------------------------


def test_too_many_shards_is_a_clear_error(mlp):
    for strategy, extra in (("weight", {}), ("hybrid", {"memory_caps": "1GB"})):
        with pytest.raises(PartitionError, match=r"has 14 nodes .* use at most 14 shards"):
            partition(mlp, strategy, shards=15, **extra)
    with pytest.raises(PartitionError, match="positive integer"):
        partition(mlp, "weight", shards=0)


def test_unknown_strategy_and_unknown_options_name_what_exists(mlp):
    with pytest.raises(PartitionError, match="known strategies: hybrid, layer, weight"):
        partition(mlp, "greedy", shards=2)
    with pytest.raises(PartitionError, match="it takes shards, by, capacities"):
        partition(mlp, "weight", shards=2, memory_caps="1GB")
    with pytest.raises(PartitionError, match="balances by 'params' or 'flops'"):
        partition(mlp, "weight", shards=2, by="bytes")
    with pytest.raises(PartitionError, match="3 capacities were given for 2 shards"):
        partition(mlp, "weight", shards=2, capacities=[1, 2, 3])


def test_a_strategy_is_a_function(mlp):
    def halves(graph, at=None):
        n = len(graph)
        return shards_from_bounds(graph, [at or n // 2, n], "halves")

    sharding = partition(mlp, halves, at=3)
    assert [len(s.nodes) for s in sharding] == [3, len(mlp) - 3]
    register_strategy("halves", halves)
    try:
        assert partition(mlp, "halves").strategy == "halves"
    finally:
        STRATEGIES.pop("halves")

    def broken(graph):
        good = shards_from_bounds(graph, [2, len(graph)], "broken")
        first = dataclasses.replace(good[0], outputs=())
        return Sharding(graph, "broken", (first, good[1]))

    with pytest.raises(PartitionError, match="the cut after shard 0 lacks"):
        partition(mlp, broken)


# --- verify ---------------------------------------------------------------------------------------


def test_verify_rejects_broken_shardings():
    graph = synthetic.dag(10, seed=1, skip=0.6)
    good = partition(graph, "weight", shards=3)
    a, b, c = good.shards

    def bad(*shards):
        return Sharding(graph, "test", tuple(shards))

    cases = {
        "is in shard 0 and shard 1": bad(a, dataclasses.replace(b, nodes=a.nodes[-1:] + b.nodes),
                                         c),
        "are in no shard": bad(a, dataclasses.replace(b, nodes=b.nodes[1:]), c),
        "receives": bad(a, dataclasses.replace(b, inputs=b.inputs[1:] + ("x",)), c),
        "has no nodes": bad(a, dataclasses.replace(b, nodes=()), c),
        "index": bad(a, c, b),
        "reports flops": bad(a, dataclasses.replace(b, flops=b.flops + 1), c),
    }
    for message, sharding in cases.items():
        with pytest.raises(PartitionError, match=message):
            verify(sharding)
    # nodes out of topological order: a node reads a tensor produced later in the same shard
    swapped = shards_from_bounds(graph, [len(graph)], "one")
    nodes = list(swapped[0].nodes)
    nodes[0], nodes[1] = nodes[1], nodes[0]
    with pytest.raises(PartitionError, match="reads"):
        verify(Sharding(graph, "test", (dataclasses.replace(swapped[0], nodes=tuple(nodes)),)))


def test_cuts_carry_skip_tensors_and_early_outputs():
    spec = {"name": "skips", "inputs": {"x": {"shape": ["batch", 8]}, "m": {"shape": ["batch", 8]}},
            "nodes": [
                {"id": "a", "op": "linear", "inputs": ["x"],
                 "args": {"in_features": 8, "out_features": 8}},
                {"id": "b", "op": "linear", "inputs": ["a"],
                 "args": {"in_features": 8, "out_features": 8}},
                {"id": "c", "op": "linear", "inputs": ["b"],
                 "args": {"in_features": 8, "out_features": 8}},
                {"id": "d", "op": "add", "inputs": ["c", "a", "m"]}],
            "outputs": ["d", "b"]}
    graph = fs.compile_graph(fs.graph.spec_from_dict(spec))
    sharding = shards_from_bounds(graph, [1, 2, 3, 4], "test")
    verify(sharding)
    # a skips over b and c; m (a graph input) is read only at the end; b is an early output
    assert [set(s.outputs) for s in sharding] == [{"a", "m"}, {"a", "b", "m"}, {"a", "b", "c", "m"},
                                                  {"d", "b"}]
    assert sharding[1].in_bytes == 2 * 8 * 4 and sharding[2].out_bytes == 4 * 8 * 4


# --- sizes ----------------------------------------------------------------------------------------


def test_parse_bytes_accepts_common_spellings_and_refuses_others():
    assert parse_bytes("2GB") == 2 * 10 ** 9
    assert parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("1.5 GiB") == int(1.5 * 2 ** 30)
    assert parse_bytes("2gb") == 2 * 10 ** 9
    assert parse_bytes("1000") == 1000 == parse_bytes(1000)
    for bad, why in (("2XB", "unknown unit 'XB'"), ("-1GB", "cannot read"), ("0", "not a positive"),
                     ("GB", "cannot read"), ("", "cannot read")):
        with pytest.raises(SizeError, match=why):
            parse_bytes(bad, "--memory-cap")


def test_the_public_api_spelling(mlp):
    from fastserve.partition import partition

    sharding = partition(mlp, "weight", shards=2)
    assert isinstance(sharding, Sharding) and len(sharding) == 2
    assert fs.validate(sharding).ok


# --- weight, by the caller's per-node work ----------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_weight_by_given_work_is_the_min_max_cut(mlp, seed):
    import random

    from fastserve.partition import weight_shards

    rng = random.Random(seed)
    work = [rng.choice([0, 1, 5, 20, 100]) * 1.0 for _ in mlp.order]
    k = rng.randint(2, 4)
    sharding = weight_shards(mlp, k, by="flops", work=work)
    cost = dict(zip(mlp.order, work))
    best = min(max(sum(work[q:p]) for q, p in zip((0, *cut), (*cut, len(work))))
               for cut in itertools.combinations(range(1, len(work)), k - 1))
    assert max(sum(cost[n] for n in s.nodes) for s in sharding) == best
    assert sharding.policy["by"] == "measured time"
    with pytest.raises(PartitionError, match="one finite non-negative cost per node"):
        weight_shards(mlp, k, by="flops", work=work[:-1])
    with pytest.raises(PartitionError, match="one finite non-negative cost per node"):
        weight_shards(mlp, k, by="params", work=work)
    with pytest.raises(PartitionError, match="one finite non-negative cost per node"):
        weight_shards(mlp, k, by="flops", work=[-1.0] + work[1:])
