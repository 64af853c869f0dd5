"""The exact contract of the ``layer`` and ``hybrid`` strategies on small hand-made graphs.

Every expected shard, policy entry and byte figure here is worked out by hand (see the comments)
or recomputed from the graph's node attributes by the small independent cost model below, never
by calling the partition code to produce the expectation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest

from fastserve.errors import PartitionError
from fastserve.graph import compile_graph, parse_spec
from fastserve.partition import hybrid_shards, layer_shards, layer_units, partition
from fastserve.partition.hybrid import memory_cap_list
from test_partition_search import tensor_bytes


ROOT = Path(__file__).resolve().parents[2]


def exactly(message: str) -> str:
    """A ``match`` pattern accepting exactly ``message``, nothing before or after."""
    return "^" + re.escape(message) + "$"


# --- graphs ----------------------------------------------------------------------------------------

LIN = "op: linear, args: {{in_features: {i}, out_features: {o}}}"

# A chain with a skip (a -> c) and no repeat block. Per sample (float32, x: 2 values = 8 B):
#   node  flops  params_bytes  output bytes
#   a      16        48            16       linear 2 -> 4
#   b      32        80            16       linear 4 -> 4
#   c       0         0            16       add(b, a)
#   d      64       160            32       linear 4 -> 8
#   e      32        72             8       linear 8 -> 2
CHAIN5 = f"""
name: chain5
inputs:
  x: {{shape: [batch, 2], dtype: float32}}
nodes:
  - {{id: a, {LIN.format(i=2, o=4)}, inputs: [x]}}
  - {{id: b, {LIN.format(i=4, o=4)}, inputs: [a]}}
  - {{id: c, op: add, inputs: [b, a]}}
  - {{id: d, {LIN.format(i=4, o=8)}, inputs: [c]}}
  - {{id: e, {LIN.format(i=8, o=2)}, inputs: [d]}}
outputs: [e]
"""


def _spec_nodes(ids_inputs):
    lines = []
    for nid, kind, inputs in ids_inputs:
        op = LIN.format(i=4, o=4) if kind == "lin" else f"op: {kind}"
        lines.append(f"  - {{id: {nid}, {op}, inputs: [{', '.join(inputs)}]}}")
    return "\n".join(lines)


def tagged_graph(name, ids_inputs, tags):
    """A graph whose nodes carry repeat-block tags ``tags[id] = (group, layer)`` (what a repeat
    block or a torch capture records), in the given node order."""
    text = (f"name: {name}\ninputs:\n  x: {{shape: [batch, 4], dtype: float32}}\nnodes:\n"
            f"{_spec_nodes(ids_inputs)}\noutputs: [{ids_inputs[-1][0]}]\n")
    spec = parse_spec(text)
    nodes = tuple(dataclasses.replace(n, group=tags[n.id][0], layer=tags[n.id][1])
                  if n.id in tags else n for n in spec.nodes)
    return compile_graph(dataclasses.replace(spec, nodes=nodes))


@pytest.fixture(scope="module")
def chain5():
    return compile_graph(parse_spec(CHAIN5))


@pytest.fixture(scope="module")
def split_first():
    """Layer h.0 split in two runs by the non-repeat node ``side`` (which h.0.b reads)."""
    nodes = [("emb", "lin", ["x"]), ("h0a", "lin", ["emb"]), ("side", "lin", ["x"]),
             ("h0b", "add", ["h0a", "side"]), ("h1a", "lin", ["h0b"]), ("h1b", "gelu", ["h1a"]),
             ("h2a", "lin", ["h1b"]), ("h2b", "gelu", ["h2a"]), ("head", "lin", ["h2b"]),
             ("post", "gelu", ["head"])]
    tags = {"h0a": ("h", 0), "h0b": ("h", 0), "h1a": ("h", 1), "h1b": ("h", 1),
            "h2a": ("h", 2), "h2b": ("h", 2)}
    return tagged_graph("split_first", nodes, tags)


@pytest.fixture(scope="module")
def split_last():
    """Layer h.2 (the third) split in two runs by ``side``; ``head`` follows the last layer."""
    nodes = [("emb", "lin", ["x"]), ("h0a", "lin", ["emb"]), ("h0b", "gelu", ["h0a"]),
             ("h1a", "lin", ["h0b"]), ("h1b", "gelu", ["h1a"]), ("h2a", "lin", ["h1b"]),
             ("side", "lin", ["x"]), ("h2b", "add", ["h2a", "side"]), ("head", "lin", ["h2b"])]
    tags = {"h0a": ("h", 0), "h0b": ("h", 0), "h1a": ("h", 1), "h1b": ("h", 1),
            "h2a": ("h", 2), "h2b": ("h", 2)}
    return tagged_graph("split_last", nodes, tags)


def nodes_of(sharding):
    return [list(s.nodes) for s in sharding]


# --- layer: units ------------------------------------------------------------------------------------


def test_the_graphs_have_the_shapes_the_tests_rely_on(split_first, split_last):
    assert split_first.order == ("emb", "h0a", "side", "h0b", "h1a", "h1b", "h2a", "h2b", "head",
                                 "post")
    assert split_last.order == ("emb", "h0a", "h0b", "h1a", "h1b", "h2a", "side", "h2b", "head")


def test_a_layer_split_by_an_interleaved_node_stays_one_unit(split_first, split_last):
    # emb joins h.0; side (between h.0's two runs) stays inside h.0; head/post join h.2
    assert layer_units(split_first) == [("emb", "h0a", "side", "h0b"), ("h1a", "h1b"),
                                        ("h2a", "h2b", "head", "post")]
    assert layer_units(split_last) == [("emb", "h0a", "h0b"), ("h1a", "h1b"),
                                       ("h2a", "side", "h2b", "head")]


def test_a_graph_without_repeat_blocks_has_one_layer_per_node(chain5):
    assert layer_units(chain5) == [("a",), ("b",), ("c",), ("d",), ("e",)]


# --- layer: cuts -------------------------------------------------------------------------------------


def test_layer_cut_of_a_split_first_layer(split_first):
    one = layer_shards(split_first, layers_per_shard=1)
    assert nodes_of(one) == [["emb", "h0a", "side", "h0b"], ["h1a", "h1b"],
                             ["h2a", "h2b", "head", "post"]]
    assert one.strategy == "layer"
    assert dict(one.policy) == {"layers": 3, "layers_per_shard": 1, "shards": 3}
    two = layer_shards(split_first, shards=2)  # 3 layers over 2 shards: 2 + 1
    assert nodes_of(two) == [["emb", "h0a", "side", "h0b", "h1a", "h1b"],
                             ["h2a", "h2b", "head", "post"]]
    assert two.strategy == "layer"
    assert dict(two.policy) == {"layers": 3, "layers_per_shard": None, "shards": 2}


def test_layer_cut_of_a_split_later_layer(split_last):
    one = layer_shards(split_last, layers_per_shard=1)
    assert nodes_of(one) == [["emb", "h0a", "h0b"], ["h1a", "h1b"], ["h2a", "side", "h2b", "head"]]
    two = layer_shards(split_last, shards=2)
    assert nodes_of(two) == [["emb", "h0a", "h0b", "h1a", "h1b"], ["h2a", "side", "h2b", "head"]]
    assert dict(two.policy) == {"layers": 3, "layers_per_shard": None, "shards": 2}
    three = layer_shards(split_last, shards=3)
    assert nodes_of(three) == nodes_of(one)
    assert dict(three.policy) == {"layers": 3, "layers_per_shard": None, "shards": 3}
    # through the dispatcher (which verifies the cut) the result is the same
    via = partition(split_last, "layer", layers_per_shard=2)
    assert nodes_of(via) == [["emb", "h0a", "h0b", "h1a", "h1b"], ["h2a", "side", "h2b", "head"]]
    assert via.strategy == "layer"
    assert dict(via.policy) == {"layers": 3, "layers_per_shard": 2, "shards": 2}


def test_layer_cut_of_a_graph_without_repeat_blocks(chain5):
    by_two = layer_shards(chain5, layers_per_shard=2)  # ceil(5 / 2) = 3 shards of 2, 2, 1
    assert nodes_of(by_two) == [["a", "b"], ["c", "d"], ["e"]]
    assert by_two.strategy == "layer"
    assert dict(by_two.policy) == {"layers": 5, "layers_per_shard": 2, "shards": 3}
    by_three = layer_shards(chain5, layers_per_shard=3)
    assert nodes_of(by_three) == [["a", "b", "c"], ["d", "e"]]
    assert dict(by_three.policy) == {"layers": 5, "layers_per_shard": 3, "shards": 2}
    big = layer_shards(chain5, layers_per_shard=7)  # more than L: one shard
    assert nodes_of(big) == [["a", "b", "c", "d", "e"]]
    assert dict(big.policy) == {"layers": 5, "layers_per_shard": 7, "shards": 1}
    two = layer_shards(chain5, shards=2)  # 5 layers over 2 shards: 3 + 2
    assert nodes_of(two) == [["a", "b", "c"], ["d", "e"]]
    assert dict(two.policy) == {"layers": 5, "layers_per_shard": None, "shards": 2}
    four = layer_shards(chain5, shards=4)  # 2 + 1 + 1 + 1
    assert nodes_of(four) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert dict(four.policy) == {"layers": 5, "layers_per_shard": None, "shards": 4}
    # what the shards carry: the skip a -> c crosses the cut after a, b
    assert [s.outputs for s in four] == [("a", "b"), ("c",), ("d",), ("e",)]


def test_layer_cut_of_the_mlp_attaches_the_input_and_head_layers():
    g = compile_graph(parse_spec((ROOT / "graphs/mlp.yaml").read_text()))  # fc_in, 6 x (fc, act), head
    layer = [[f"layer.{i}.fc", f"layer.{i}.act"] for i in range(6)]
    s = layer_shards(g, shards=4)  # 6 layers: 2, 2, 1, 1
    assert nodes_of(s) == [["fc_in", *layer[0], *layer[1]], [*layer[2], *layer[3]], layer[4],
                           [*layer[5], "head"]]
    assert dict(s.policy) == {"layers": 6, "layers_per_shard": None, "shards": 4}


# --- layer: refusals ---------------------------------------------------------------------------------

EXACTLY_ONE = "the layer strategy takes exactly one of layers_per_shard=K or shards=N"


def test_layer_needs_exactly_one_of_its_two_options(chain5):
    with pytest.raises(PartitionError, match=exactly(EXACTLY_ONE)):
        layer_shards(chain5)
    with pytest.raises(PartitionError, match=exactly(EXACTLY_ONE)):
        layer_shards(chain5, layers_per_shard=2, shards=2)


@pytest.mark.parametrize("value, shown", [(0, "0"), (-1, "-1"), (True, "True"), (False, "False"),
                                          (2.0, "2.0"), ("2", "'2'"), (1.5, "1.5")])
def test_layer_counts_must_be_positive_integers(chain5, value, shown):
    with pytest.raises(PartitionError,
                       match=exactly(f"layers_per_shard must be a positive integer, got {shown}")):
        layer_shards(chain5, layers_per_shard=value)
    with pytest.raises(PartitionError, match=exactly(f"shards must be a positive integer, got "
                                                     f"{shown}")):
        layer_shards(chain5, shards=value)


def test_layer_refuses_more_shards_than_layers(chain5, split_first):
    with pytest.raises(PartitionError, match=exactly(
            "cannot cut graph 'chain5' into 6 shards of whole layers: it has 5 layers; use at "
            "most 5 shards, or the weight strategy to cut inside layers")):
        layer_shards(chain5, shards=6)
    # split_first has 10 nodes but only 3 layers
    with pytest.raises(PartitionError, match=exactly(
            "cannot cut graph 'split_first' into 4 shards of whole layers: it has 3 layers; use "
            "at most 3 shards, or the weight strategy to cut inside layers")):
        layer_shards(split_first, shards=4)


# --- an independent cost model of chain5 -------------------------------------------------------------


class Costs:
    """Segment costs of ``graph.order`` from node attributes (no tied weights in these graphs):
    flops and weights add up; activation = max over nodes t of (cut(t) + out(t)) + max cut(t);
    memory = weights + batch x activation."""

    def __init__(self, graph):
        self.order = graph.order
        self.n = len(self.order)
        data = [graph.node(x) for x in self.order]
        assert not any(d["borrowed_bytes"] for d in data)
        self.cut, self.out = tensor_bytes(graph)
        self.node_flops = [d["flops"] for d in data]
        self.node_weight = [d["params_bytes"] for d in data]

    def flops(self, q, p):
        return sum(self.node_flops[q:p])

    def weight(self, q, p):
        return sum(self.node_weight[q:p])

    def act(self, q, p):
        return (max(self.cut[t] + self.out[t] for t in range(q, p))
                + max(self.cut[t] for t in range(q, p)))

    def memory(self, q, p, batch):
        return self.weight(q, p) + batch * self.act(q, p)

    def cuts(self, k):
        for inner in itertools.combinations(range(1, self.n), k - 1):
            yield [*inner, self.n]

    @staticmethod
    def segments(bounds):
        return list(zip([0, *bounds], bounds))

    def cut_cost(self, bounds):
        return sum(self.cut[p] for p in bounds[:-1])


def test_the_cost_model_matches_the_hand_figures(chain5):
    c = Costs(chain5)
    assert c.node_flops == [16, 32, 0, 64, 32]
    assert c.node_weight == [48, 80, 0, 160, 72]
    assert c.cut == [8, 16, 32, 16, 32, 8]  # the skip a -> c doubles the cut after b
    # alone at batch 1: a 48+32, b 80+48, c 0+80, d 160+64, e 72+72
    assert [c.memory(i, i + 1, 1) for i in range(5)] == [80, 128, 80, 224, 144]
    assert c.memory(0, 5, 1) == 440 and c.memory(0, 5, 4) == 680


# --- hybrid: cuts and policy -------------------------------------------------------------------------


def test_hybrid_balances_flops_then_sends_the_least(chain5):
    # flops 16 | 32 | 0 | 64 | 32: the best 2-cut leaves 96 in the second shard, after b (cut
    # 32 B: b and the skip a) or after c (cut 16 B): after c
    s = hybrid_shards(chain5, 2, "1GB", batch=1, tolerance=0)
    assert nodes_of(s) == [["a", "b", "c"], ["d", "e"]]
    assert s.strategy == "hybrid"
    assert dict(s.policy) == {"shards": 2, "memory_caps": [10 ** 9, 10 ** 9], "batch": 1,
                              "capacities": None, "tolerance": 0, "optimum": 96,
                              "objective": 96}
    assert s.policy["objective"] == s.policy["optimum"] == max(sh.flops for sh in s)


def test_hybrid_defaults_are_batch_1_and_tolerance_5_percent(chain5):
    s = hybrid_shards(chain5, 2, 10 ** 9)
    assert nodes_of(s) == [["a", "b", "c"], ["d", "e"]]
    assert dict(s.policy) == {"shards": 2, "memory_caps": [10 ** 9, 10 ** 9], "batch": 1,
                              "capacities": None, "tolerance": 0.05, "optimum": 96,
                              "objective": 96}


def test_hybrid_default_batch_is_what_the_caps_are_checked_at(chain5):
    # [d, e] needs 232 + 1 x 80 = 312 B at batch 1 and 232 + 2 x 80 = 392 B at batch 2
    s = hybrid_shards(chain5, 2, 312, tolerance=0)
    assert nodes_of(s) == [["a", "b", "c"], ["d", "e"]]
    with pytest.raises(PartitionError, match="missing per shard"):
        hybrid_shards(chain5, 2, 312, batch=2, tolerance=0)


def test_hybrid_tolerance_trades_compute_for_fewer_bytes_sent(chain5):
    # 3 shards: the optimum is 64 (cuts after b|d: 64 B sent, or c|d: 48 B); at tolerance 0.5
    # every cut with a shard up to 96 FLOPs is allowed, and a|c sends 16 + 16 = 32 B
    tight = hybrid_shards(chain5, 3, "1GB", tolerance=0)
    assert nodes_of(tight) == [["a", "b", "c"], ["d"], ["e"]]
    assert dict(tight.policy) == {"shards": 3, "memory_caps": [10 ** 9] * 3, "batch": 1,
                                  "capacities": None, "tolerance": 0, "optimum": 64,
                                  "objective": 64}
    loose = hybrid_shards(chain5, 3, "1GB", tolerance=0.5)
    assert nodes_of(loose) == [["a"], ["b", "c"], ["d", "e"]]
    assert dict(loose.policy) == {"shards": 3, "memory_caps": [10 ** 9] * 3, "batch": 1,
                                  "capacities": None, "tolerance": 0.5, "optimum": 64,
                                  "objective": 96}
    # floor(64 x 1.49) = 95 < 96: back to the tight cut
    assert nodes_of(hybrid_shards(chain5, 3, "1GB", tolerance=0.49)) == nodes_of(tight)


def test_hybrid_per_shard_caps_and_the_objective_of_a_large_first_shard(chain5):
    # the second cap (150 B) holds only e (144 B); [a..d] needs 288 + 80 = 368 B
    s = hybrid_shards(chain5, 2, ["1KB", 150], batch=1, tolerance=0)
    assert nodes_of(s) == [["a", "b", "c", "d"], ["e"]]
    assert [sh.memory_bytes(1) for sh in s] == [368, 144]
    assert dict(s.policy) == {"shards": 2, "memory_caps": [1000, 150], "batch": 1,
                              "capacities": None, "tolerance": 0, "optimum": 112,
                              "objective": 112}  # 16 + 32 + 0 + 64: the first shard's


def test_hybrid_with_capacities_balances_flops_over_speed(chain5):
    # speeds 1 and 3: after a, max(16 / 1, 128 / 3) = 42.67 beats 48 (after b or c) and 112
    s = hybrid_shards(chain5, 2, "1GB", capacities=(1, 3))
    assert nodes_of(s) == [["a"], ["b", "c", "d", "e"]]
    policy = dict(s.policy)
    assert math.isclose(policy.pop("optimum"), 128 / 3, rel_tol=1e-9)
    assert policy == {"shards": 2, "memory_caps": [10 ** 9, 10 ** 9], "batch": 1,
                      "capacities": [1, 3], "tolerance": 0.05, "objective": 128 / 3}
    assert isinstance(s.policy["capacities"], list)
    # the other way round the fast target comes first: after b or c, max(48 / 3, 96 / 1) = 96;
    # after d, max(112 / 3, 32 / 1) = 37.3 wins
    r = hybrid_shards(chain5, 2, "1GB", capacities=[3, 1], tolerance=0)
    assert nodes_of(r) == [["a", "b", "c", "d"], ["e"]]
    assert r.policy["objective"] == 112 / 3
    assert r.policy["capacities"] == [3, 1]


def test_hybrid_equal_capacities_are_no_capacities(chain5):
    s = hybrid_shards(chain5, 2, "1GB", capacities=[2, 2], tolerance=0)
    assert nodes_of(s) == [["a", "b", "c"], ["d", "e"]]
    assert s.policy["capacities"] == [2, 2]
    assert s.policy["objective"] == 96 and s.policy["optimum"] == 96


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_hybrid_equals_brute_force(chain5, k, batch):
    c = Costs(chain5)
    checked = 0
    for cap in (150, 250, 320, 400, 700, 2000):
        for tolerance in (0, 0.3):
            fits = [b for b in c.cuts(k)
                    if all(c.memory(q, p, batch) <= cap for q, p in c.segments(b))]
            if not fits:
                with pytest.raises(PartitionError):
                    hybrid_shards(chain5, k, cap, batch=batch, tolerance=tolerance)
                continue
            best = min(max(c.flops(q, p) for q, p in c.segments(b)) for b in fits)
            limit = math.floor(best * (1 + tolerance))
            allowed = [b for b in fits if max(c.flops(q, p) for q, p in c.segments(b)) <= limit]
            fewest = min(c.cut_cost(b) for b in allowed)
            # ties: the cut that makes earlier shards longer (the latest last cut first)
            want = max((b for b in allowed if c.cut_cost(b) == fewest), key=lambda b: b[::-1])
            s = hybrid_shards(chain5, k, cap, batch=batch, tolerance=tolerance)
            got = list(itertools.accumulate(len(sh.nodes) for sh in s))
            assert got == want, (cap, tolerance)
            assert s.policy["optimum"] == best
            assert s.policy["objective"] == max(c.flops(q, p) for q, p in c.segments(want))
            checked += 1
    assert checked


# --- hybrid: refusals of arguments -------------------------------------------------------------------


@pytest.mark.parametrize("batch, shown", [(0, "0"), (-2, "-2"), (True, "True"), (False, "False"),
                                          (1.0, "1.0"), ("2", "'2'")])
def test_hybrid_batch_must_be_a_positive_integer(chain5, batch, shown):
    with pytest.raises(PartitionError, match=exactly(f"batch must be a positive integer, got "
                                                     f"{shown}")):
        hybrid_shards(chain5, 2, "1GB", batch=batch)


@pytest.mark.parametrize("tolerance, shown", [(-0.1, "-0.1"), (-1, "-1"), (math.inf, "inf"),
                                              (math.nan, "nan"), ("0.1", "'0.1'"),
                                              (None, "None"), (True, "True")])
def test_hybrid_tolerance_must_be_a_finite_number_at_least_0(chain5, tolerance, shown):
    with pytest.raises(PartitionError, match=exactly(f"tolerance must be a number >= 0, got "
                                                     f"{shown}")):
        hybrid_shards(chain5, 2, "1GB", tolerance=tolerance)


def test_hybrid_accepts_a_zero_tolerance_and_integer_ones(chain5):
    assert hybrid_shards(chain5, 2, "1GB", tolerance=0).policy["tolerance"] == 0
    assert hybrid_shards(chain5, 2, "1GB", tolerance=0.0).policy["tolerance"] == 0.0
    assert hybrid_shards(chain5, 3, "1GB", tolerance=1).policy["objective"] == 96


def test_hybrid_shard_count_and_capacities_are_checked(chain5):
    for bad, shown in ((0, "0"), (True, "True"), ("2", "'2'"), (2.0, "2.0")):
        with pytest.raises(PartitionError, match=exactly(f"shards must be a positive integer, "
                                                         f"got {shown}")):
            hybrid_shards(chain5, bad, "1GB")
    with pytest.raises(PartitionError, match=exactly(
            "cannot cut graph 'chain5' into 6 shards: it has 5 nodes and every shard needs at "
            "least one; use at most 5 shards")):
        hybrid_shards(chain5, 6, "1GB")
    with pytest.raises(PartitionError, match=exactly(
            "3 capacities were given for 2 shards; give one per shard, in shard order")):
        hybrid_shards(chain5, 2, "1GB", capacities=[1, 2, 3])
    with pytest.raises(PartitionError, match=exactly(
            "capacities must be positive numbers, got 0")):
        hybrid_shards(chain5, 2, "1GB", capacities=[0, 1])


def test_memory_caps_one_for_all_or_one_per_shard(chain5):
    assert memory_cap_list("2GB", 3) == [2 * 10 ** 9] * 3
    assert memory_cap_list("512MiB", 2) == [512 * 2 ** 20] * 2
    assert memory_cap_list(1000, 2) == [1000, 1000]
    assert memory_cap_list(1.5e3, 2) == [1500, 1500]
    assert memory_cap_list(["1KiB"], 3) == [1024] * 3
    assert memory_cap_list(("1KB", 2000), 2) == [1000, 2000]
    s = hybrid_shards(chain5, 2, ["1KB"], tolerance=0)
    assert s.policy["memory_caps"] == [1000, 1000]


def test_memory_caps_refusals(chain5):
    with pytest.raises(PartitionError, match=exactly(
            "the hybrid strategy needs memory_caps (e.g. '2GB' or one per shard)")):
        hybrid_shards(chain5, 2, None)
    with pytest.raises(PartitionError, match=exactly(
            "3 memory caps were given for 2 shards; give one for all shards or one per shard")):
        hybrid_shards(chain5, 2, ["1GB", "1GB", "1GB"])
    with pytest.raises(PartitionError, match=exactly(
            "0 memory caps were given for 2 shards; give one for all shards or one per shard")):
        hybrid_shards(chain5, 2, [])
    with pytest.raises(PartitionError, match=exactly(
            "memory cap: cannot read 'lots' as a size; write a number with an optional unit, "
            "e.g. 2GB, 512MiB, 1.5GiB or 1000000")):
        hybrid_shards(chain5, 2, "lots")
    with pytest.raises(PartitionError, match=exactly("memory cap: 0 is not a positive size")):
        hybrid_shards(chain5, 2, 0)
    with pytest.raises(PartitionError, match=exactly(
            "memory cap: cannot read '-1GB' as a size; write a number with an optional unit, "
            "e.g. 2GB, 512MiB, 1.5GiB or 1000000")):
        hybrid_shards(chain5, 2, ["1GB", "-1GB"])
    with pytest.raises(PartitionError, match=exactly(
            "memory cap: unknown unit 'XB' in '2XB'; use one of B, KB, MB, GB, TB, KiB, MiB, "
            "GiB, TiB")):
        hybrid_shards(chain5, 2, "2XB")
    with pytest.raises(PartitionError, match=exactly(
            "memory cap: expected a size such as 2GB or 512MiB, got True")):
        hybrid_shards(chain5, 2, [True])


def test_a_bool_memory_cap_is_refused_like_any_bad_size(chain5):
    with pytest.raises(PartitionError, match=exactly(
            "memory cap: expected a size such as 2GB or 512MiB, got True")):
        hybrid_shards(chain5, 2, True)


def test_a_numpy_integer_memory_cap_is_one_cap_for_all():
    import numpy as np

    assert memory_cap_list(np.int64(1000), 2) == [1000, 1000]


# --- hybrid: caps no cut can meet --------------------------------------------------------------------


def _missing(c, k, caps, batch):
    """The smallest amount that, added to every cap, lets some cut fit (at least 1 B)."""
    return max(1, min(max(c.memory(q, p, batch) - cap for (q, p), cap in
                          zip(c.segments(b), caps)) for b in c.cuts(k)))


def test_missing_per_shard_with_one_cap_for_all(chain5):
    c = Costs(chain5)
    # 2-cuts at batch 1: after a 80 | 392, after b 176 | 312, after c 208 | 312, after d
    # 368 | 144: the best still needs 312 - 224 = 88 B more; d alone (224 B) just fits
    assert _missing(c, 2, [224, 224], 1) == 88
    assert max(c.memory(i, i + 1, 1) for i in range(5)) == 224
    assert c.weight(0, 5) == 360
    with pytest.raises(PartitionError, match=exactly(
            "no cut of graph 'chain5' into 2 shards fits the memory caps (224 B each; memory = "
            "weights + 1 x activation bytes per sample): 88 B missing per shard (176 B in "
            "total); the weights alone are 360 B and the caps sum to 448 B; raise the caps, use "
            "more shards or a smaller batch")):
        hybrid_shards(chain5, 2, 224)


def test_missing_per_shard_with_a_cap_per_shard(chain5):
    c = Costs(chain5)
    # caps 150 and 260: after b needs 176 - 150 = 26 and 312 - 260 = 52: 52 B
    assert _missing(c, 2, [150, 260], 1) == 52
    with pytest.raises(PartitionError, match=exactly(
            "no cut of graph 'chain5' into 2 shards fits the memory caps (150 B, 260 B; memory = "
            "weights + 1 x activation bytes per sample): 52 B missing per shard (104 B in "
            "total); the weights alone are 360 B and the caps sum to 410 B; raise the caps, use "
            "more shards or a smaller batch")):
        hybrid_shards(chain5, 2, [150, 260])


def test_one_byte_missing(chain5):
    c = Costs(chain5)
    whole = c.memory(0, 5, 1)  # 440 B
    assert _missing(c, 1, [whole - 1], 1) == 1
    with pytest.raises(PartitionError, match=exactly(
            f"no cut of graph 'chain5' into 1 shards fits the memory caps ({whole - 1} B each; "
            f"memory = weights + 1 x activation bytes per sample): 1 B missing per shard (1 B in "
            f"total); the weights alone are 360 B and the caps sum to {whole - 1} B; raise the "
            f"caps, use more shards or a smaller batch")):
        hybrid_shards(chain5, 1, whole - 1)
    assert nodes_of(hybrid_shards(chain5, 1, whole)) == [["a", "b", "c", "d", "e"]]


def test_missing_amounts_at_a_larger_batch(chain5):
    c = Costs(chain5)
    # batch 3, caps 400 each: after c 128 + 3 x 80 = 368 | 232 + 3 x 80 = 472: 72 B missing
    assert _missing(c, 2, [400, 400], 3) == 72
    with pytest.raises(PartitionError, match=exactly(
            "no cut of graph 'chain5' into 2 shards fits the memory caps (400 B each; memory = "
            "weights + 3 x activation bytes per sample): 72 B missing per shard (144 B in "
            "total); the weights alone are 360 B and the caps sum to 800 B; raise the caps, use "
            "more shards or a smaller batch")):
        hybrid_shards(chain5, 2, 400, batch=3)


def test_a_node_that_alone_exceeds_every_cap_is_named(chain5):
    c = Costs(chain5)
    # batch 4, alone: a 48 + 4 x 32, b 80 + 4 x 48, c 0 + 4 x 80, d 160 + 4 x 64, e 72 + 4 x 72
    alone = [c.memory(i, i + 1, 4) for i in range(5)]
    assert alone == [176, 272, 320, 416, 360]
    assert (c.weight(3, 4), c.act(3, 4)) == (160, 64)
    # one shard of 1 B: d misses 415 B, the whole graph (680 B) 679 B
    assert _missing(c, 1, [1], 4) == 679
    with pytest.raises(PartitionError, match=exactly(
            "graph 'chain5' cannot fit the memory caps: node 'd' alone needs 416 B (weights "
            "160 B + 4 x 64 B activations per sample), the largest cap is 1 B; 415 B missing; "
            "to fit the whole graph every cap needs 679 B more")):
        hybrid_shards(chain5, 1, 1, batch=4)


def test_a_node_alone_without_more_missing_elsewhere(chain5):
    c = Costs(chain5)
    # one node per shard, 300 B each: only d (416 B) is over, by 116 B, which is all that is
    # missing: no second figure
    assert _missing(c, 5, [300] * 5, 4) == 116
    with pytest.raises(PartitionError, match=exactly(
            "graph 'chain5' cannot fit the memory caps: node 'd' alone needs 416 B (weights "
            "160 B + 4 x 64 B activations per sample), the largest cap is 300 B; 116 B missing")):
        hybrid_shards(chain5, 5, 300, batch=4)
    # per-shard caps: d is compared with the largest (350 B); c needs 320 - 100 = 220 B more
    caps = [300, 350, 100, 200, 250]
    assert _missing(c, 5, caps, 4) == 220
    with pytest.raises(PartitionError, match=exactly(
            "graph 'chain5' cannot fit the memory caps: node 'd' alone needs 416 B (weights "
            "160 B + 4 x 64 B activations per sample), the largest cap is 350 B; 66 B missing; "
            "to fit the whole graph every cap needs 220 B more")):
        hybrid_shards(chain5, 5, caps, batch=4)


def test_a_node_that_exactly_fills_the_largest_cap_is_not_blamed(chain5):
    # d alone needs 224 B at batch 1 == the cap: the cut is what does not fit (see above)
    with pytest.raises(PartitionError, match=r"^no cut of graph 'chain5' into 2 shards fits .*: "
                                             r"88 B missing per shard"):
        hybrid_shards(chain5, 2, [224, 224])
    with pytest.raises(PartitionError, match=r"^no cut of graph 'chain5' into 1 shards fits "
                                             r"the memory caps \(224 B each; .*: 216 B missing "):
        hybrid_shards(chain5, 1, 224)
