"""The ``weight`` strategy: contiguous shards balanced by cost, exactly (min-max).

``by="params"`` balances the bytes of weights each shard holds (its nodes' parameters, plus a copy
of a tied tensor whose owner sits in another shard); ``by="flops"`` balances FLOPs per sample.
The result minimises the largest shard over *all* cuts of the graph's topological order into
``shards`` non-empty contiguous segments (not a greedy approximation): a bisection on the largest
cost with an exact feasibility test (:mod:`fastserve.partition.search`). Among the optimal cuts
it picks one with the fewest bytes crossing the cuts.

With ``capacities`` (relative speeds or sizes of heterogeneous targets, in shard order) it
minimises ``max(cost_i / capacity_i)``: a target twice as fast gets up to twice the work.

``work`` (with ``by="flops"``) replaces each node's FLOPs by a cost of the caller's, in graph
order: the planner passes measured node times, so that a memory-bound node (an LM head whose
weights are read for every few rows) costs what it takes, not what its FLOPs say.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from fastserve.errors import PartitionError
from fastserve.graph.graph import Graph
from fastserve.partition.chain import ChainCosts, chain_costs
from fastserve.partition.search import cheapest_cuts, first_fit, fit_prefix, smallest_budgets
from fastserve.partition.sharding import Sharding, shards_from_bounds

COSTS = ("params", "flops")


def weight_shards(graph: Graph, shards: int, by: str = "params",
                  capacities: Sequence[float] | None = None,
                  work: Sequence[float] | None = None) -> Sharding:
    """Cut ``graph`` into ``shards`` contiguous shards minimising the largest ``by`` cost.

    Example: ``weight_shards(load("graphs/gpt2.yaml"), 4)`` balances GPT-2's weight bytes over 4
    shards; ``weight_shards(g, 2, by="flops", capacities=[2, 1])`` gives the first target (twice
    as fast) about two thirds of the FLOPs.
    """
    search = _Search(graph, shards, by, capacities, work)
    objective, budgets = search.smallest()
    bounds = cheapest_cuts(search.los_for(budgets), search.costs.cut_bytes)
    if bounds is None:  # cannot happen: smallest_budgets returns a feasible budget
        raise PartitionError(f"no cut of graph '{graph.name}' into {search.k} shards was found")
    if search.caps is not None:  # the exact ratio of the cut found, not the bisection's bound
        objective = max(_segment_cost(search.costs, by, q, p) / c
                        for q, p, c in zip([0, *bounds], bounds, search.caps))
    policy = {"shards": search.k, "by": by if work is None else "measured time",
              "capacities": None if capacities is None else list(capacities),
              "objective": objective}
    return shards_from_bounds(graph, bounds, "weight", policy=policy)


def weight_objective(graph: Graph, shards: int, by: str = "params",
                     capacities: Sequence[float] | None = None,
                     work: Sequence[float] | None = None) -> float:
    """The optimum of :func:`weight_shards` (largest cost, or cost over capacity) without
    building the cut: cheaper, for a planner that may discard the shape anyway."""
    return _Search(graph, shards, by, capacities, work).smallest()[0]


class _Search:
    """The bisection's inputs for one graph, cost and capacities."""

    def __init__(self, graph: Graph, shards, by: str, capacities, work=None):
        self.costs = costs = chain_costs(graph)
        self.k = check_shard_count(graph, shards)
        self.caps = check_capacities(capacities, self.k)
        if by not in COSTS:
            raise PartitionError(f"the weight strategy balances by 'params' or 'flops', not "
                                 f"{by!r}")
        if work is not None:
            self.costs = costs = _with_work(costs, work, by)
        self.by = by
        self._lo_for = segment_fit(costs, by)
        self._cache: dict[int, np.ndarray] = {}

    def los_for(self, budgets: list[int]) -> list[np.ndarray]:
        for b in budgets:
            if b not in self._cache:
                self._cache[b] = self._lo_for(b)
        return [self._cache[b] for b in budgets]

    def smallest(self) -> tuple[float, list[int]]:
        costs, by = self.costs, self.by
        single = costs.node_weight if by == "params" else costs.node_flops
        prefix = costs.params_bytes if by == "params" else costs.flops
        # the largest shard is at least the largest node and the mean shard
        low = max(int(single.max()), -(-int(prefix[-1]) // self.k))
        high = _segment_cost(costs, by, 0, costs.n)  # any cut's largest shard costs at most this
        additive = prefix if by == "flops" or not costs.borrows else None
        return smallest_budgets(self.los_for, self.k, self.caps, low, high, additive)


def _with_work(costs: ChainCosts, work: Sequence[float], by: str) -> ChainCosts:
    """``costs`` with each node's FLOPs replaced by ``work`` (rounded to integers: the bisection
    searches integer budgets)."""
    w = np.asarray(work, dtype=np.float64)
    if by != "flops" or w.shape != (costs.n,) or not np.isfinite(w).all() or (w < 0).any():
        raise PartitionError(f"work must be one finite non-negative cost per node "
                             f"({costs.n}), balanced as flops; got {w.shape[0] if w.ndim else 0} "
                             f"for by={by!r}")
    node = np.rint(w).astype(np.int64)
    return dataclasses.replace(costs, node_flops=node,
                               flops=np.concatenate([[0], np.cumsum(node)]).astype(np.int64))


def segment_fit(costs: ChainCosts, by: str):
    """``budget -> lo`` array (see :mod:`fastserve.partition.search`) for cost ``by``."""
    if by == "flops" or not costs.borrows:
        prefix = costs.flops if by == "flops" else costs.params_bytes
        return lambda budget: fit_prefix(prefix, budget)
    return lambda budget: first_fit(costs.n, lambda q, p: costs.segment_weight(q, p) <= budget)


def _segment_cost(costs: ChainCosts, by: str, q: int, p: int) -> int:
    return costs.segment_weight(q, p) if by == "params" else costs.segment_flops(q, p)


def check_shard_count(graph: Graph, shards) -> int:
    """``shards`` as a positive int no larger than the graph's node count, or a clear error."""
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise PartitionError(f"shards must be a positive integer, got {shards!r}")
    n = len(graph)
    if shards > n:
        raise PartitionError(f"cannot cut graph '{graph.name}' into {shards} shards: it has "
                             f"{n} node{'s' if n != 1 else ''} and every shard needs at least "
                             f"one; use at most {n} shards")
    return int(shards)


def check_capacities(capacities: Sequence[float] | None, k: int) -> tuple[float, ...] | None:
    """Relative target capacities: ``k`` positive finite numbers (None: all equal)."""
    if capacities is None:
        return None
    caps = tuple(capacities)
    if len(caps) != k:
        raise PartitionError(f"{len(caps)} capacities were given for {k} shards; give one per "
                             f"shard, in shard order")
    for c in caps:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) \
                or c <= 0:
            raise PartitionError(f"capacities must be positive numbers, got {c!r}")
    if len(set(caps)) == 1:
        return None  # equal capacities: the exact integer search applies
    return tuple(float(c) for c in caps)
