"""The ``hybrid`` strategy: balance compute under per-shard memory caps, then send the least.

Objective, in order:

1. every shard fits its memory cap, where a shard's memory at batch ``B`` is
   ``weight bytes + B x activation bytes per sample`` (weight bytes include a copy of tied
   weights owned by another shard; activation bytes bound the tensors held while it runs, its
   received inputs included, see :mod:`fastserve.partition.chain`);
2. the largest shard's FLOPs (or ``FLOPs_i / capacity_i`` for heterogeneous targets) is the
   smallest possible under 1, exactly;
3. among the cuts within ``(1 + tolerance)`` of that optimum, the total bytes crossing the cuts
   (per sample) are the smallest possible, exactly.

Caps that no cut can meet give a :class:`PartitionError` that says how much memory is missing:
a node that alone exceeds the largest cap is named with its size; otherwise the error gives the
smallest amount that, added to every cap, makes a cut possible.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fastserve.errors import PartitionError, SizeError
from fastserve.graph.graph import Graph
from fastserve.partition.chain import ChainCosts, chain_costs
from fastserve.partition.search import (cheapest_cuts, feasible, first_fit, fit_prefix,
                                        smallest_budgets)
from fastserve.partition.sharding import Sharding, shards_from_bounds
from fastserve.units import format_bytes, parse_bytes
from fastserve.partition.weight import check_capacities, check_shard_count


def hybrid_shards(graph: Graph, shards: int, memory_caps: int | str | Sequence[int | str],
                  batch: int = 1, capacities: Sequence[float] | None = None,
                  tolerance: float = 0.05) -> Sharding:
    """Cut ``graph`` into ``shards`` shards that fit ``memory_caps`` at batch ``batch`` with the
    smallest largest compute, then the fewest bytes crossing cuts.

    ``memory_caps``: one size for every shard or one per shard, in bytes or as text (``"2GB"``,
    ``"512MiB"``). ``capacities``: relative speeds of the targets, in shard order.

    Example: ``hybrid_shards(load("graphs/gpt2.yaml"), 4, "200MB", batch=8)``.
    """
    costs = chain_costs(graph)
    k = check_shard_count(graph, shards)
    speeds = check_capacities(capacities, k)
    caps = memory_cap_list(memory_caps, k)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PartitionError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or \
            not 0 <= tolerance < math.inf:
        raise PartitionError(f"tolerance must be a number >= 0, got {tolerance!r}")

    memory_lo: dict[int, np.ndarray] = {}
    for cap in set(caps):
        memory_lo[cap] = _memory_fit(costs, batch, cap)
    memory_los = [memory_lo[c] for c in caps]
    if not feasible(memory_los):
        raise _infeasible(graph, costs, k, caps, batch)

    flop_lo: dict[int, np.ndarray] = {}

    def los_for(budgets: list[int]) -> list[np.ndarray]:
        out = []
        for lo_mem, b in zip(memory_los, budgets):
            if b not in flop_lo:
                flop_lo[b] = fit_prefix(costs.flops, b)
            out.append(np.maximum(lo_mem, flop_lo[b]))
        return out

    total = int(costs.flops[-1])
    low = max(int(costs.node_flops.max()), -(-total // k))
    objective, budgets = smallest_budgets(los_for, k, speeds, low, total)
    relaxed = [int(math.floor(b * (1 + tolerance))) for b in budgets]
    bounds = cheapest_cuts(los_for(relaxed), costs.cut_bytes)
    if bounds is None:  # cannot happen: the relaxed budgets include a feasible cut
        raise PartitionError(f"no cut of graph '{graph.name}' into {k} shards was found")
    optimum = objective  # the smallest largest compute under the caps
    objective = max(costs.segment_flops(q, p) / (speeds[i] if speeds else 1)
                    for i, (q, p) in enumerate(zip([0, *bounds], bounds)))
    policy = {"shards": k, "memory_caps": caps, "batch": batch,
              "capacities": None if capacities is None else list(capacities),
              "tolerance": tolerance, "optimum": optimum, "objective": objective}
    return shards_from_bounds(graph, bounds, "hybrid", policy=policy)


def _cap(size: int | str | float) -> int:
    try:
        return parse_bytes(size, "memory cap")
    except SizeError as e:
        raise PartitionError(str(e)) from None


def memory_cap_list(memory_caps, k: int) -> list[int]:
    """One cap in bytes per shard from a size, a text size, or a list of one or ``k`` of them."""
    if memory_caps is None:
        raise PartitionError("the hybrid strategy needs memory_caps (e.g. '2GB' or one per "
                             "shard)")
    if isinstance(memory_caps, str) or not isinstance(memory_caps, Sequence):
        return [_cap(memory_caps)] * k  # one size (a bool or junk is refused by _cap)
    caps = [_cap(c) for c in memory_caps]
    if len(caps) == 1:
        return caps * k
    if len(caps) != k:
        raise PartitionError(f"{len(caps)} memory caps were given for {k} shards; give one for "
                             f"all shards or one per shard")
    return caps


def _memory_fit(costs: ChainCosts, batch: int, cap: int) -> np.ndarray:
    return first_fit(costs.n, lambda q, p: costs.segment_memory(q, p, batch) <= cap)


def _infeasible(graph: Graph, costs: ChainCosts, k: int, caps: list[int],
                batch: int) -> PartitionError:
    n = costs.n
    # the smallest amount that, added to every cap, lets some cut fit
    low, high = 1, int(costs.segment_memory(0, n, batch))
    while low < high:
        mid = (low + high) // 2
        if feasible([_memory_fit(costs, batch, c + mid) for c in caps]):
            high = mid
        else:
            low = mid + 1
    missing = low
    starts = np.arange(n, dtype=np.int64)
    alone = np.asarray(costs.segment_memory(starts, starts + 1, batch))
    largest = max(caps)
    worst = int(np.argmax(alone))
    if alone[worst] > largest:
        w = costs.segment_weight(worst, worst + 1)
        a = costs.segment_activation(worst, worst + 1)
        over = int(alone[worst]) - largest
        more = (f"; to fit the whole graph every cap needs {format_bytes(missing)} more"
                if missing > over else "")
        return PartitionError(
            f"graph '{graph.name}' cannot fit the memory caps: node '{costs.order[worst]}' alone "
            f"needs {format_bytes(alone[worst])} (weights {format_bytes(w)} + {batch} x "
            f"{format_bytes(a)} activations per sample), the largest cap is "
            f"{format_bytes(largest)}; {format_bytes(over)} missing{more}")
    caps_text = (format_bytes(caps[0]) + " each" if len(set(caps)) == 1
                 else ", ".join(format_bytes(c) for c in caps))
    weights = costs.segment_weight(0, n)
    return PartitionError(
        f"no cut of graph '{graph.name}' into {k} shards fits the memory caps ({caps_text}; "
        f"memory = weights + {batch} x activation bytes per sample): "
        f"{format_bytes(missing)} missing per shard ({format_bytes(missing * k)} in total); the "
        f"weights alone are {format_bytes(weights)} and the caps sum to "
        f"{format_bytes(sum(caps))}; raise the caps, use more shards or a smaller batch")
