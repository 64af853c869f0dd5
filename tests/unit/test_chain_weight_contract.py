"""The exact contract of the segment-cost model (``partition/chain.py``) and of the ``weight``
strategy's search (``partition/weight.py``) on small hand-built graphs.

Every expected number is worked out by hand in a comment (tensor lifetimes, cut bytes, borrowed
weights) or recomputed by a brute force over every segment from those hand tables; nothing here
asks the code under test for its own expectation. Types and dtypes are checked where they are
part of the contract: segment costs of scalar positions are Python ints, the cost arrays are
int64, and a chain of zero positions (an empty order) is supported.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from fastserve.errors import PartitionError
from fastserve.graph.builder import GraphBuilder
from fastserve.partition import weight as weight_module
from fastserve.partition.chain import (Borrow, _floor_log2, _out, _owner, _prefix, chain_costs,
                                       sparse_table)
from fastserve.partition.weight import (_Search, _with_work, check_capacities, check_shard_count,
                                        weight_objective, weight_shards)


def exactly(message: str) -> str:
    """A ``match`` pattern accepting exactly ``message``."""
    return "^" + re.escape(message) + "$"


def assert_int64(array, values):
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.int64
    assert array.tolist() == list(values)


# --- graphs ---------------------------------------------------------------------------------------


def life_graph():
    """Six nodes whose tensors have every kind of lifetime (float32, per sample):

    ===== ======= ====== ==========================================================
    pos   node    bytes  notes
    ===== ======= ====== ==========================================================
    in    x        8     graph input [1, 2], read only by a (last 0)
    in    m       12     graph input [1, 3], read late by c (last 3)
    in    u        4     graph input nobody reads (last -1)
    0     a       16     linear 2->4 (params 12 = 8 + 4 bias, 48 B, 16 FLOPs); read by s and e
    1     s:0/s:1  8/8   split(a) in two; s:1 is never read (last -1)
    2     b       12     linear 2->3 (9 params, 36 B, 12 FLOPs) on s:0; also a graph output
    3     c       24     concat(b, m)
    4     d       16     linear 6->4 (28 params, 112 B, 48 FLOPs)
    5     e       16     add(d, a); graph output
    ===== ======= ====== ==========================================================
    """
    b = GraphBuilder("life")
    b.input("x", ["batch", 2])
    b.input("m", ["batch", 3])
    b.input("u", ["batch", 1])
    b.node("a", "linear", ["x"], in_features=2, out_features=4)
    b.node("s", "split", ["a"], chunks=2)
    b.node("b", "linear", ["s:0"], in_features=2, out_features=3)
    b.node("c", "concat", ["b", "m"])
    b.node("d", "linear", ["c"], in_features=6, out_features=4)
    b.node("e", "add", ["d", "a"])
    b.output("e", "b")
    return b.compile()


# cut(t) = bytes of tensors with born < t <= last (t = 0: every graph input, 8 + 12 + 4):
#   t=1: m 12 + a 16 = 28            t=2: m 12 + a 16 + s:0 8 = 36
#   t=3: m 12 + a 16 + b 12 = 40     t=4: a 16 + b 12 + c 24 = 52
#   t=5: a 16 + b 12 + d 16 = 44     t=6: b 12 + e 16 = 28 (the graph outputs)
LIFE_CUT = [24, 28, 36, 40, 52, 44, 28]
LIFE_OUT = [16, 16, 12, 24, 16, 16]  # bytes each node produces (s: 8 + 8)
LIFE_LIVE = [c + o for c, o in zip(LIFE_CUT, LIFE_OUT)]  # [40, 44, 48, 64, 68, 60]
LIFE_PARAMS_BYTES = [48, 0, 36, 0, 112, 0]
LIFE_FLOPS = [16, 0, 12, 0, 48, 0]


def linear_chain(name: str, count: int):
    """``x -> n0 -> n1 -> ...`` (linear 2->2); the tests then set the costs by hand."""
    b = GraphBuilder(name)
    b.input("x", ["batch", 2])
    prev = "x"
    for i in range(count):
        prev = b.node(f"n{i}", "linear", [prev], in_features=2, out_features=2)
    b.output(prev)
    return b.compile()


def set_costs(graph, **columns):
    """Overwrite node attributes (one value per node, in order) before any cost is computed:
    hand-chosen numbers keep the arithmetic of the expectations plain."""
    for attr, values in columns.items():
        for node, value in zip(graph.order, values):
            graph.node(node)[attr] = value
    return graph


# A chain with every kind of borrowed tensor (bytes):
#   n0: 100 own (the owner of a tied tensor)   n1: 10 own
#   n2: borrows 30 from n0 (``args.tie``)        n3: 10 own, borrows 20 from n0 (``borrowed_from``)
#   n4: borrows 7, no owner named                n5: borrows 5 from "nowhere" (not in the graph)
#   n6: 2 own, borrows 1, no owner named
BOR_PARAMS_BYTES = [100, 10, 0, 10, 0, 0, 2]
BOR_BORROWED = [0, 0, 30, 20, 7, 5, 1]
BOR_FLOPS = [0, 4, 8, 2, 6, 1, 3]


def borrow_graph():
    g = set_costs(linear_chain("bor", 7), params_bytes=BOR_PARAMS_BYTES,
                  params=[25, 3, 0, 3, 0, 0, 1], borrowed_bytes=BOR_BORROWED, flops=BOR_FLOPS)
    g.node("n2")["args"]["tie"] = "n0"
    g.node("n3")["borrowed_from"] = "n0"
    g.node("n5")["args"]["tie"] = "nowhere"
    return g


def brute_borrow_weight(q: int, p: int) -> int:
    """Weight of ``[q, p)`` of :func:`borrow_graph` from its table: own bytes, plus the tensor
    borrowed from n0 once (the largest borrower's 30 or 20) when n0 is outside, plus every
    ownerless borrow separately."""
    inside = range(q, p)
    total = sum(BOR_PARAMS_BYTES[i] for i in inside)
    tied = [BOR_BORROWED[i] for i in (2, 3) if i in inside]
    if tied and 0 not in inside:
        total += max(tied)
    return total + sum(BOR_BORROWED[i] for i in (4, 5, 6) if i in inside)


def tied_graph():
    """An embedding (10 x 4 float32 = 160 B) and an lm_head tied to it (borrows those 160 B)."""
    b = GraphBuilder("tied")
    b.input("ids", ["batch", 3], dtype="int64", high=10)
    b.node("wte", "embedding", ["ids"], num_embeddings=10, embedding_dim=4)
    b.node("head", "lm_head", ["wte"], d_model=4, vocab_size=10, tie="wte")
    b.output("head")
    return b.compile()


def one_node_graph():
    """x (8 B) -> a: linear 2->4 (16 B out)."""
    b = GraphBuilder("one")
    b.input("x", ["batch", 2])
    b.node("a", "linear", ["x"], in_features=2, out_features=4)
    b.output("a")
    return b.compile()


def fork_graph():
    """x -> p1, x -> p2 (independent), s = add(p1, p2): two valid orders.
    p1: linear 2->3 with bias (9 params), p2: without bias (6 params)."""
    b = GraphBuilder("fork")
    b.input("x", ["batch", 2])
    b.node("p1", "linear", ["x"], in_features=2, out_features=3)
    b.node("p2", "linear", ["x"], in_features=2, out_features=3, bias=False)
    b.node("s", "add", ["p1", "p2"])
    b.output("s")
    return b.compile()


def pairs(n):
    """Every (q, p) with 0 <= q, p <= n, including empty and reversed segments."""
    return [(q, p) for q in range(n + 1) for p in range(n + 1)]


# --- chain.py: tensor lifetimes and cut bytes -----------------------------------------------------


def test_tensor_lifetimes_and_cut_bytes_of_a_graph_with_skips_dead_tensors_and_early_outputs():
    costs = chain_costs(life_graph())
    assert costs.order == ("a", "s", "b", "c", "d", "e")
    assert costs.tensor_names == ("x", "m", "u", "a", "s:0", "s:1", "b", "c", "d", "e")
    # inputs are born at -1; unread tensors (u, s:1) keep last -1; graph outputs last = n = 6
    assert_int64(costs.born, [-1, -1, -1, 0, 1, 1, 2, 3, 4, 5])
    assert_int64(costs.last, [0, 3, -1, 5, 2, -1, 6, 4, 5, 6])
    assert_int64(costs.tensor_bytes, [8, 12, 4, 16, 8, 8, 12, 24, 16, 16])
    assert_int64(costs.cut_bytes, LIFE_CUT)
    assert_int64(costs.live, LIFE_LIVE)


def test_cut_names_the_tensors_crossing_a_position():
    costs = chain_costs(life_graph())
    assert costs.cut(0) == ("x", "m", "u")  # every graph input, even an unread one
    assert costs.cut(1) == ("m", "a")
    assert costs.cut(3) == ("m", "a", "b")
    assert costs.cut(6) == ("b", "e")


def test_prefix_sums_and_node_arrays_of_the_life_graph():
    costs = chain_costs(life_graph())
    assert costs.n == 6
    assert_int64(costs.node_flops, LIFE_FLOPS)
    assert_int64(costs.node_weight, LIFE_PARAMS_BYTES)
    assert_int64(costs.flops, [0, 16, 16, 28, 28, 76, 76])
    assert_int64(costs.params, [0, 12, 12, 21, 21, 49, 49])
    assert_int64(costs.params_bytes, [0, 48, 48, 84, 84, 196, 196])
    assert costs.borrows == ()


# --- chain.py: segment costs ----------------------------------------------------------------------


def test_segment_activation_is_max_live_plus_max_cut_for_every_segment():
    costs = chain_costs(life_graph())
    # hand values: [0, 6): 68 + 52; [1, 3): max(44, 48) + max(28, 36); [5, 6): 60 + 44
    assert costs.segment_activation(0, 6) == 120
    assert costs.segment_activation(1, 3) == 84
    assert costs.segment_activation(5, 6) == 104
    assert costs.segment_activation(0, 1) == 64  # 40 + 24
    for q, p in pairs(6):
        expected = (max(LIFE_LIVE[q:p]) + max(LIFE_CUT[q:p])) if p > q else 0
        got = costs.segment_activation(q, p)
        assert type(got) is int and got == expected, (q, p)


def test_empty_and_reversed_segments_cost_nothing():
    costs = chain_costs(life_graph())
    for q, p in [(0, 0), (3, 3), (6, 6), (4, 2)]:
        assert costs.segment_activation(q, p) == 0
        assert costs.segment_flops(q, q) == 0
        assert costs.segment_weight(q, q) == 0


def test_segment_costs_are_vectorised_over_arrays_of_starts_and_ends():
    costs = chain_costs(life_graph())
    q, p = np.array([[0, 1], [2, 3]]), np.array([[6, 3], [2, 5]])
    act = costs.segment_activation(q, p)
    assert isinstance(act, np.ndarray) and act.shape == (2, 2) and act.dtype == np.int64
    # [2, 2) is empty; [3, 5): max(64, 68) + max(40, 52) = 120
    assert act.tolist() == [[120, 84], [0, 120]]
    flops = costs.segment_flops(q, p)
    assert isinstance(flops, np.ndarray) and flops.tolist() == [[76, 12], [0, 48]]
    weight = costs.segment_weight(q, p)
    assert isinstance(weight, np.ndarray) and weight.tolist() == [[196, 36], [0, 112]]
    memory = costs.segment_memory(q, p, batch=2)
    assert isinstance(memory, np.ndarray)
    assert memory.tolist() == [[196 + 240, 36 + 168], [0, 112 + 240]]


def test_scalar_segment_costs_are_python_ints():
    costs = chain_costs(life_graph())
    for value in (costs.segment_flops(0, 2), costs.segment_weight(0, 2),
                  costs.segment_activation(0, 2), costs.segment_memory(0, 2)):
        assert type(value) is int
    assert costs.segment_flops(0, 3) == 28  # 16 + 0 + 12


def test_segment_memory_is_weight_plus_batch_times_activation_batch_one_by_default():
    costs = chain_costs(life_graph())
    # [0, 6): weights 48 + 36 + 112 = 196, activation 120
    assert costs.segment_memory(0, 6) == 196 + 120
    assert costs.segment_memory(0, 6, batch=3) == 196 + 3 * 120
    # [2, 4): weights 36, activation max(48, 64) + max(36, 40) = 104
    assert costs.segment_memory(2, 4) == 36 + 104


def test_a_one_node_graph_has_an_activation():
    costs = chain_costs(one_node_graph())
    # cut = [x 8, a 16]; live[0] = 8 + 16 = 24; activation = 24 + 8
    assert_int64(costs.cut_bytes, [8, 16])
    assert costs.segment_activation(0, 1) == 32
    assert costs.segment_activation(np.array([0]), np.array([1])).tolist() == [32]


def test_an_empty_order_is_a_chain_of_zero_positions():
    costs = chain_costs(life_graph(), order=())
    assert costs.n == 0 and costs.order == ()
    for array in (costs.node_flops, costs.node_weight, costs.live):
        assert array.dtype == np.int64 and array.shape == (0,)
    assert_int64(costs.flops, [0])
    assert_int64(costs.params, [0])
    assert_int64(costs.params_bytes, [0])
    assert_int64(costs.cut_bytes, [24])  # the graph inputs 8 + 12 + 4
    assert costs.tensor_names == ("x", "m", "u")
    assert_int64(costs.born, [-1, -1, -1])
    assert_int64(costs.last, [-1, -1, -1])  # no node in the order reads them
    assert costs.borrows == ()
    assert costs.segment_activation(0, 0) == 0 and type(costs.segment_activation(0, 0)) is int
    act = costs.segment_activation(np.array([0, 0]), np.array([0, 0]))
    assert isinstance(act, np.ndarray) and act.dtype == np.int64 and act.tolist() == [0, 0]
    assert costs.segment_weight(0, 0) == 0 and costs.segment_flops(0, 0) == 0


# --- chain.py: borrowed (tied) weights ------------------------------------------------------------


def test_a_tied_lm_head_borrows_the_embedding_weight_from_position_zero():
    costs = chain_costs(tied_graph())
    assert len(costs.borrows) == 1
    borrow = costs.borrows[0]
    assert isinstance(borrow, Borrow) and borrow.owner == 0
    assert_int64(borrow.positions, [1])
    assert_int64(borrow.sizes, [160])
    assert_int64(costs.node_weight, [160, 160])  # wte owns 160 B; head holds a 160 B copy alone
    assert costs.segment_weight(0, 2) == 160  # the owner is inside: one copy
    assert costs.segment_weight(1, 2) == 160  # head alone: its copy
    assert costs.segment_weight(0, 1) == 160


def test_borrow_groups_merge_borrowers_of_one_owner_and_never_ownerless_ones():
    costs = chain_costs(borrow_graph())
    got = [(b.owner, b.positions.tolist(), b.sizes.tolist()) for b in costs.borrows]
    assert got == [(0, [2, 3], [30, 20]), (-1, [4], [7]), (-1, [5], [5]), (-1, [6], [1])]
    for b in costs.borrows:
        assert b.positions.dtype == np.int64 and b.sizes.dtype == np.int64
    assert_int64(costs.node_weight, [100, 10, 30, 30, 7, 5, 3])  # params_bytes + borrowed


def test_segment_weight_of_every_segment_of_the_borrow_graph():
    costs = chain_costs(borrow_graph())
    # hand values: the whole chain holds n0, so only the ownerless 7 + 5 + 1 are added to 122
    assert costs.segment_weight(0, 7) == 135
    assert costs.segment_weight(1, 7) == 22 + 30 + 13  # n0 outside: the larger tied copy, once
    assert costs.segment_weight(3, 4) == 10 + 20
    assert costs.segment_weight(4, 7) == 2 + 7 + 5 + 1
    q, p = map(np.array, zip(*[(q, p) for q in range(8) for p in range(q, 8)]))
    expected = [brute_borrow_weight(a, b) for a, b in zip(q.tolist(), p.tolist())]
    assert costs.segment_weight(q, p).tolist() == expected


def test_an_owner_after_its_borrower_is_outside_a_segment_ending_before_it():
    g = set_costs(linear_chain("late_owner", 2), params_bytes=[4, 50], borrowed_bytes=[50, 0])
    g.node("n0")["borrowed_from"] = "n1"
    costs = chain_costs(g)
    assert [b.owner for b in costs.borrows] == [1]
    assert costs.segment_weight(0, 1) == 4 + 50  # n1 (position 1 = p) is not in [0, 1)
    assert costs.segment_weight(0, 2) == 54


def test_a_missing_borrowed_bytes_counts_as_zero():
    g = set_costs(linear_chain("none_borrowed", 2), params_bytes=[3, 5], borrowed_bytes=[None, 0])
    costs = chain_costs(g)
    assert costs.borrows == ()
    assert_int64(costs.node_weight, [3, 5])


def test_owner_prefers_borrowed_from_then_the_tie_argument_and_only_names():
    assert _owner({"borrowed_from": "emb", "args": {"tie": "other"}}) == "emb"
    assert _owner({"borrowed_from": "emb", "args": {}}) == "emb"
    assert _owner({"args": {"tie": "wte"}}) == "wte"
    assert _owner({"borrowed_from": None, "args": {"tie": "wte"}}) == "wte"
    assert _owner({"args": {}}) is None
    assert _owner({"args": None}) is None
    assert _owner({}) is None
    assert _owner({"borrowed_from": ["emb"]}) is None  # not a node name
    assert _owner({"args": {"tie": 3}}) is None


# --- chain.py: the cache --------------------------------------------------------------------------


def test_chain_costs_is_cached_per_graph_and_order():
    g = life_graph()
    first = chain_costs(g)
    assert chain_costs(g) is first
    assert chain_costs(g, g.order) is first
    assert chain_costs(g, list(g.order)) is first  # an equal order, another object


def test_another_order_rebuilds_and_replaces_the_cache():
    g = fork_graph()
    default = chain_costs(g)
    assert default.order == ("p1", "p2", "s")
    assert_int64(default.params, [0, 9, 15, 15])
    swapped = chain_costs(g, ["p2", "p1", "s"])
    assert swapped.order == ("p2", "p1", "s")
    assert_int64(swapped.params, [0, 6, 15, 15])
    assert chain_costs(g, ("p2", "p1", "s")) is swapped
    again = chain_costs(g)
    assert again is not swapped and again.order == ("p1", "p2", "s")


# --- chain.py: helpers ----------------------------------------------------------------------------


def test_sparse_table_rows_hold_window_maxima_and_minima():
    values = np.array([3, 1, 4, 1, 5], dtype=np.int64)
    table = sparse_table(values)
    # width 2: max of (3,1) (1,4) (4,1) (1,5), last copied; width 4: max of rows 1 at i, i + 2
    assert table.dtype == np.int64 and table.shape == (3, 5)
    assert table.tolist() == [[3, 1, 4, 1, 5], [3, 4, 4, 5, 5], [4, 5, 5, 5, 5]]
    assert sparse_table(values, np.minimum).tolist() == [[3, 1, 4, 1, 5], [1, 1, 1, 1, 5],
                                                         [1, 1, 1, 1, 5]]
    assert values.tolist() == [3, 1, 4, 1, 5]  # the input is not modified


def test_sparse_table_of_nothing_is_one_zero_of_the_same_dtype():
    for dtype in (np.int64, np.float32):
        table = sparse_table(np.array([], dtype=dtype))
        assert table.shape == (1, 1) and table.dtype == dtype and table.tolist() == [[0]]


def test_floor_log2_of_every_length():
    for n, expected in [(0, [0]), (1, [0, 0]), (2, [0, 0, 1]), (3, [0, 0, 1, 1]),
                        (9, [0, 0, 1, 1, 2, 2, 2, 2, 3, 3])]:
        assert_int64(_floor_log2(n), expected)


def test_prefix_and_out():
    assert_int64(_prefix(np.array([3, 4, 5], dtype=np.int64)), [0, 3, 7, 12])
    assert_int64(_prefix(np.array([], dtype=np.int64)), [0])
    assert type(_out(np.int64(5))) is int and _out(np.int64(5)) == 5
    assert type(_out(np.array(7))) is int
    array = np.array([1, 2])
    assert _out(array) is array


# --- weight.py ------------------------------------------------------------------------------------


def three_node_graph(params_bytes=(6, 3, 3), flops=(1, 1, 1)):
    return set_costs(linear_chain("three", 3), params_bytes=list(params_bytes),
                     params=[0, 0, 0], flops=list(flops), borrowed_bytes=[0, 0, 0])


def test_weight_shards_policy_and_strategy_by_params():
    # params [6, 3, 3] in 2 shards: [6 | 3 3] -> 6, [6 3 | 3] -> 9: objective 6, cut after n0
    sharding = weight_shards(three_node_graph(), 2)
    assert sharding.strategy == "weight"
    assert [s.nodes for s in sharding] == [("n0",), ("n1", "n2")]
    assert dict(sharding.policy) == {"shards": 2, "by": "params", "capacities": None,
                                     "objective": 6.0}


def test_weight_shards_with_capacities_reports_the_exact_ratio_by_params():
    # capacities [2, 1]: [6 | 6] -> max(6/2, 6/1) = 6; [9 | 3] -> max(9/2, 3/1) = 4.5 (FLOPs would
    # give 1.0: the ratio must be taken of the params cost)
    sharding = weight_shards(three_node_graph(), 2, capacities=[2, 1])
    assert [s.nodes for s in sharding] == [("n0", "n1"), ("n2",)]
    assert dict(sharding.policy) == {"shards": 2, "by": "params", "capacities": [2, 1],
                                     "objective": 4.5}


def test_weight_shards_by_measured_work():
    # work [5, 1, 1] replaces FLOPs [1, 1, 1]: [5 | 2] -> 5
    sharding = weight_shards(three_node_graph(), 2, by="flops", work=[5.0, 1.0, 1.0])
    assert [s.nodes for s in sharding] == [("n0",), ("n1", "n2")]
    assert dict(sharding.policy) == {"shards": 2, "by": "measured time", "capacities": None,
                                     "objective": 5.0}


def test_a_heavy_first_node_on_the_slowest_target_is_still_found():
    # flops [10, 1, 1], capacities [1, 2]: [10 | 2] -> max(10/1, 2/2) = 10; [11 | 1] -> 11.
    # The optimum (10) exceeds the cost of everything after the first node (2).
    g = three_node_graph(params_bytes=(1, 1, 1), flops=(10, 1, 1))
    sharding = weight_shards(g, 2, by="flops", capacities=[1, 2])
    assert [s.nodes for s in sharding] == [("n0",), ("n1", "n2")]
    assert sharding.policy["objective"] == 10.0
    assert weight_objective(g, 2, by="flops", capacities=[1, 2]) == pytest.approx(10.0, rel=1e-9)


def test_weight_objective_defaults_to_params_and_passes_capacities_and_work():
    g = three_node_graph()
    assert weight_objective(g, 2) == 6.0  # params [6 | 3 3]
    assert weight_objective(g, 2, by="flops") == 2.0  # flops [1 | 1 1]
    assert weight_objective(g, 2, capacities=[2, 1]) == pytest.approx(4.5, rel=1e-9)
    assert weight_objective(g, 2, by="flops", work=[5, 1, 1]) == 5.0


def test_smallest_returns_a_float_objective_and_integer_budgets():
    # flops [1, 1, 1, 1] in 2 shards: the mean 2 is above the largest node 1, and is optimal
    g = set_costs(linear_chain("four", 4), flops=[1, 1, 1, 1])
    objective, budgets = _Search(g, 2, "flops", None).smallest()
    assert type(objective) is float and objective == 2.0
    assert budgets == [2, 2] and all(type(b) is int for b in budgets)


def count_exact_tests(search):
    """Wrap the search's ``budget -> lo`` builder to count exact (non-greedy) feasibility tests."""
    calls = []
    inner = search._lo_for

    def counting(budget):
        calls.append(budget)
        return inner(budget)

    search._lo_for = counting
    return calls


def test_additive_costs_take_the_greedy_path_and_borrowed_weights_the_exact_one():
    # FLOPs are additive even on a graph with borrowed tensors; params are additive only
    # without them. The greedy test needs no lo arrays (the planner runs this thousands of times).
    cases = [(borrow_graph(), "flops", False), (three_node_graph(), "params", False),
             (three_node_graph(), "flops", False), (borrow_graph(), "params", True)]
    for graph, by, exact in cases:
        search = _Search(graph, 3, by, None)
        calls = count_exact_tests(search)
        search.smallest()
        assert bool(calls) == exact, (graph.name, by)


def test_the_defensive_no_cut_error_names_the_graph_and_shard_count(monkeypatch):
    monkeypatch.setattr(weight_module, "cheapest_cuts", lambda los, cut: None)
    with pytest.raises(PartitionError,
                       match=exactly("no cut of graph 'three' into 2 shards was found")):
        weight_shards(three_node_graph(), 2)


# --- weight.py: refusals --------------------------------------------------------------------------


def test_with_work_rounds_to_int64_node_costs_and_prefix_sums():
    costs = chain_costs(three_node_graph())
    worked = _with_work(costs, [0.4, 2.5, 3.6], "flops")  # rint: 0, 2 (half to even), 4
    assert_int64(worked.node_flops, [0, 2, 4])
    assert_int64(worked.flops, [0, 0, 2, 6])
    assert_int64(costs.node_flops, [1, 1, 1])  # the cached costs are left alone


@pytest.mark.parametrize("work, by, got", [
    ([1.0, 2.0], "flops", "got 2 for by='flops'"),
    (5.0, "flops", "got 0 for by='flops'"),
    ([1.0, 2.0, 3.0], "params", "got 3 for by='params'"),
    ([None, 1.0, 2.0], "flops", "got 3 for by='flops'"),  # None is not a finite cost
    ([1.0, float("inf"), 2.0], "flops", "got 3 for by='flops'"),
    ([1.0, -0.5, 2.0], "flops", "got 3 for by='flops'"),
])
def test_with_work_refuses_bad_work_with_its_length(work, by, got):
    costs = chain_costs(three_node_graph())
    message = ("work must be one finite non-negative cost per node (3), balanced as flops; "
               + got)
    with pytest.raises(PartitionError, match=exactly(message)):
        _with_work(costs, work, by)


def test_shard_count_errors_say_node_or_nodes():
    with pytest.raises(PartitionError, match=exactly(
            "cannot cut graph 'one' into 2 shards: it has 1 node and every shard needs at least "
            "one; use at most 1 shards")):
        check_shard_count(one_node_graph(), 2)
    two = linear_chain("two", 2)
    with pytest.raises(PartitionError, match=exactly(
            "cannot cut graph 'two' into 3 shards: it has 2 nodes and every shard needs at least "
            "one; use at most 2 shards")):
        check_shard_count(two, 3)
    for bad in (True, 0, -1, 1.0, "2"):
        with pytest.raises(PartitionError,
                           match=exactly(f"shards must be a positive integer, got {bad!r}")):
            check_shard_count(two, bad)
    assert type(check_shard_count(two, np.int64(2))) is int


def test_capacities_must_be_positive_finite_non_boolean_numbers():
    for bad in ("fast", None, True, float("nan"), float("inf"), 0, -1.0):
        with pytest.raises(PartitionError,
                           match=exactly(f"capacities must be positive numbers, got {bad!r}")):
            check_capacities([1, bad], 2)
    with pytest.raises(PartitionError, match=exactly(
            "3 capacities were given for 2 shards; give one per shard, in shard order")):
        check_capacities([1, 2, 3], 2)
    assert check_capacities(None, 2) is None
    assert check_capacities([2, 2.0], 2) is None  # equal: the integer search applies
    caps = check_capacities([2, 1], 2)
    assert caps == (2.0, 1.0) and all(type(c) is float for c in caps)
