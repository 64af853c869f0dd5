"""The weight and hybrid strategies against brute force over every cut of small graphs.

Segment costs are recomputed here from the graph's node attributes (not from the partition
package's cost arrays), then every composition of the topological order into k contiguous
shards is enumerated.
"""

from __future__ import annotations

import itertools
import math

import pytest

from fastserve.errors import PartitionError
from fastserve.partition import format_bytes, partition, synthetic, verify


def tensor_bytes(graph) -> tuple[list[int], list[int]]:
    """Bytes alive across each boundary of ``graph.order`` (cut[i]: tensors made before node i
    and read at or after it; cut[0]: the inputs) and bytes each node outputs, from node
    attributes alone."""
    data = [graph.node(x) for x in graph.order]
    n = len(data)
    born, last, size = {}, {}, {}
    for t in graph.inputs:
        born[t.name], size[t.name] = -1, t.bytes
    for i, d in enumerate(data):
        for ref in d["inputs"]:
            last[ref] = i
        for t in d["outputs"]:
            born[t.name], size[t.name] = i, t.bytes
    for o in graph.outputs:
        last[o] = n
    cut = [sum(size[t] for t in born if born[t] < at <= last.get(t, -2)) for at in range(n + 1)]
    cut[0] = sum(t.bytes for t in graph.inputs)
    return cut, [sum(t.bytes for t in d["outputs"]) for d in data]


class Brute:
    """Independent segment costs of ``graph.order`` and exhaustive search over cuts."""

    def __init__(self, graph):
        self.graph = graph
        self.order = graph.order
        self.n = n = len(self.order)
        data = [graph.node(x) for x in self.order]
        pos = {x: i for i, x in enumerate(self.order)}
        self.cut, out = tensor_bytes(graph)
        self.flops, self.weight, self.act = {}, {}, {}
        for q in range(n):
            for p in range(q + 1, n + 1):
                seg = data[q:p]
                self.flops[q, p] = sum(d["flops"] for d in seg)
                borrowed: dict[str, int] = {}
                for d in seg:
                    owner = d["args"].get("tie")
                    if d["borrowed_bytes"] and not (owner in pos and q <= pos[owner] < p):
                        borrowed[owner] = max(borrowed.get(owner, 0), d["borrowed_bytes"])
                self.weight[q, p] = sum(d["params_bytes"] for d in seg) + sum(borrowed.values())
                self.act[q, p] = (max(self.cut[t] + out[t] for t in range(q, p))
                                  + max(self.cut[t] for t in range(q, p)))

    def cuts(self, k):
        for inner in itertools.combinations(range(1, self.n), k - 1):
            bounds = [0, *inner, self.n]
            yield list(zip(bounds, bounds[1:]))

    def segments(self, sharding):
        at, out = 0, []
        for s in sharding:
            assert s.nodes == self.order[at:at + len(s.nodes)]
            out.append((at, at + len(s.nodes)))
            at += len(s.nodes)
        assert at == self.n
        return out

    def memory(self, seg, batch):
        return self.weight[seg] + batch * self.act[seg]

    def cut_bytes(self, segs):
        return sum(self.cut[p] for _, p in segs[:-1])


def _graphs():
    for seed in range(8):
        yield f"chain{seed}", synthetic.chain(4 + seed, seed=seed, layer_size=3)
    for seed in range(6):
        yield f"dag{seed}", synthetic.dag(7 + seed % 4, seed=seed, skip=0.5)
    yield "tied", synthetic.tied_lm(4, seed=1)


GRAPHS = dict(_graphs())


def test_test_graphs_have_skips_and_ties():
    skips = [g for g in GRAPHS.values() if any(len(s) > 1 for s in
                                               (partition(g, "weight", shards=2)[0].outputs,))]
    assert skips, "no test DAG has a cut carrying more than one tensor"
    assert GRAPHS["tied"].node("lm_head")["borrowed_bytes"] > 0
    assert max(len(g) for g in GRAPHS.values()) <= 12


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("by", ["params", "flops"])
def test_weight_equals_brute_force_optimum_for_every_shard_count(name, by):
    graph = GRAPHS[name]
    brute = Brute(graph)
    cost = brute.weight if by == "params" else brute.flops
    for k in range(1, brute.n + 1):
        best = min(max(cost[s] for s in segs) for segs in brute.cuts(k))
        sharding = partition(graph, "weight", shards=k, by=by)
        segs = brute.segments(sharding)
        assert len(segs) == k
        assert max(cost[s] for s in segs) == best, (name, by, k)
        # among the optimal cuts, the fewest bytes crossing them
        fewest = min(brute.cut_bytes(c) for c in brute.cuts(k)
                     if max(cost[s] for s in c) == best)
        assert brute.cut_bytes(segs) == fewest == sharding.cut_bytes
        # the Sharding's reported costs are the independent ones
        for s, seg in zip(sharding, segs):
            assert s.weight_bytes == brute.weight[seg] and s.flops == brute.flops[seg]


@pytest.mark.parametrize("name", ["chain3", "chain7", "dag2", "tied"])
def test_weight_with_capacities_minimises_the_largest_cost_over_capacity(name):
    graph = GRAPHS[name]
    brute = Brute(graph)
    for k in range(2, min(brute.n, 6) + 1):
        for caps in ([float(1 + i % 3) for i in range(k)], [0.5 + k - i for i in range(k)]):
            best = min(max(brute.flops[s] / c for s, c in zip(segs, caps))
                       for segs in brute.cuts(k))
            sharding = partition(graph, "weight", shards=k, by="flops", capacities=caps)
            got = max(brute.flops[s] / c for s, c in zip(brute.segments(sharding), caps))
            assert math.isclose(got, best, rel_tol=1e-9), (name, k, caps, got, best)
            assert math.isclose(sharding.policy["objective"], best, rel_tol=1e-9)


@pytest.mark.parametrize("name", ["chain2", "chain6", "dag1", "dag4", "tied"])
def test_hybrid_never_exceeds_caps_and_is_optimal_or_says_what_is_missing(name):
    graph = GRAPHS[name]
    brute = Brute(graph)
    tolerance = 0.1
    checked_infeasible = checked_feasible = 0
    for k in range(1, min(brute.n, 5) + 1):
        for batch in (1, 3):
            tightest = min(max(brute.memory(s, batch) for s in segs) for segs in brute.cuts(k))
            for factor in (0.8, 1.0, 1.3):
                caps = [int(tightest * factor) + (j % 2) * int(tightest * 0.05)
                        for j in range(k)]
                fits = [segs for segs in brute.cuts(k)
                        if all(brute.memory(s, batch) <= c for s, c in zip(segs, caps))]
                if not fits:
                    missing = max(1, min(max(brute.memory(s, batch) - c for s, c in zip(segs, caps))
                                         for segs in brute.cuts(k)))
                    with pytest.raises(PartitionError, match="missing") as e:
                        partition(graph, "hybrid", shards=k, memory_caps=caps, batch=batch,
                                  tolerance=tolerance)
                    assert format_bytes(missing) in str(e.value), (str(e.value), missing)
                    checked_infeasible += 1
                    continue
                best = min(max(brute.flops[s] for s in segs) for segs in fits)
                limit = math.floor(best * (1 + tolerance))
                fewest = min(brute.cut_bytes(segs) for segs in fits
                             if max(brute.flops[s] for s in segs) <= limit)
                sharding = partition(graph, "hybrid", shards=k, memory_caps=caps, batch=batch,
                                     tolerance=tolerance)
                segs = brute.segments(sharding)
                for s, seg, cap in zip(sharding, segs, caps):
                    assert brute.memory(seg, batch) <= cap
                    assert s.memory_bytes(batch) == brute.memory(seg, batch)
                assert sharding.policy["optimum"] == best
                assert max(brute.flops[s] for s in segs) <= limit
                assert brute.cut_bytes(segs) == fewest
                checked_feasible += 1
    assert checked_feasible and checked_infeasible


def test_hybrid_names_a_node_that_alone_exceeds_the_cap():
    graph = GRAPHS["tied"]
    brute = Brute(graph)
    alone = {graph.order[i]: brute.memory((i, i + 1), 2) for i in range(brute.n)}
    node, need = max(alone.items(), key=lambda kv: kv[1])
    cap = need - 1000
    with pytest.raises(PartitionError) as e:
        partition(graph, "hybrid", shards=3, memory_caps=cap, batch=2)
    message = str(e.value)
    assert f"node '{node}' alone needs {format_bytes(need)}" in message
    assert f"{format_bytes(1000)} missing" in message


def test_shards_form_a_verified_chain_on_dags():
    for name, graph in GRAPHS.items():
        for k in (1, 2, 3, len(graph)):
            for strategy, policy in (("weight", {}), ("hybrid", {"memory_caps": "1GB"})):
                sharding = partition(graph, strategy, shards=k, **policy)
                assert verify(sharding) is sharding
                for a, b in zip(sharding, sharding.shards[1:]):
                    assert a.outputs == b.inputs


def test_greedy_feasibility_equals_the_exact_test_when_every_node_fits():
    import numpy as np

    from fastserve.partition.search import feasible, fit_prefix, greedy_feasible

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        n = int(rng.integers(1, 14))
        costs = rng.integers(0, 9, size=n)
        prefix = np.concatenate([[0], np.cumsum(costs)]).astype(np.int64)
        k = int(rng.integers(1, n + 1))
        budgets = [int(costs.max() + rng.integers(0, 12)) for _ in range(k)]
        exact = feasible([fit_prefix(prefix, b) for b in budgets])
        assert greedy_feasible(prefix.tolist(), budgets) == exact, (costs, budgets)
        checked += exact
    assert 300 < checked < 2700  # both answers were exercised
