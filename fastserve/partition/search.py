"""Exact searches for contiguous cuts of a chain of ``n`` positions into ``k`` non-empty segments.

Every constraint a strategy puts on a segment (``cost <= budget``, ``memory <= cap``) is monotone:
if ``[q, p)`` satisfies it, so does every segment inside it. So for each end ``p`` the valid
starts form an interval ``[lo[p], p - 1]``, and a constraint is fully described by its array
``lo`` (``lo[p] = p`` when no non-empty segment ending at ``p`` fits). Several constraints
combine by taking the elementwise maximum of their ``lo`` arrays.

With one ``lo`` array per segment (segment ``s`` may have its own budget: heterogeneous targets):

* :func:`reachable` decides feasibility exactly: position ``p`` is reachable with ``s`` segments
  if some reachable ``q`` (with ``s - 1`` segments) lies in ``[lo_s[p], p - 1]``. One prefix
  count per segment, vectorised: O(k n).
* :func:`smallest_budgets` binary-searches the smallest max cost (the min-max objective) with
  that feasibility test; with per-segment capacities the budget of segment ``s`` is
  ``T * capacity_s`` and ``T`` is searched over the reals.
* :func:`cheapest_cuts` picks, among all cuts meeting the constraints, one whose total cut cost
  (bytes crossing the cuts) is smallest: a min-plus dynamic programme with range minima from a
  sparse table, O(k n log n).

Greedy "fill each segment up to its budget" is exact only for an additive cost when every node
fits every segment's budget on its own: then the positions reachable with ``s`` segments form an
interval ``[s, reach_s]`` (a cut ending further can be shrunk segment by segment), and the greedy
end is ``reach_s``. :func:`smallest_budgets` uses it, in O(k log n) pure Python, only when that
holds (``additive``), and the exact O(k n) test otherwise: the planner calls the bisection
thousands of times.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

import numpy as np

from fastserve.partition.chain import sparse_table

_INF = np.int64(1) << np.int64(62)


def fit_prefix(prefix: np.ndarray, budget: int) -> np.ndarray:
    """``lo`` for an additive cost given by its prefix sums: smallest ``q`` with
    ``prefix[p] - prefix[q] <= budget``."""
    return np.searchsorted(prefix, prefix - budget, side="left").astype(np.int64)


def first_fit(n: int, fits: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``lo`` for any monotone constraint: smallest ``q`` in ``[0, p]`` with ``fits(q, p)``.

    ``fits`` is vectorised over arrays of starts and ends, and must hold for empty segments.
    A bisection on every ``p`` at once: O(n log n) evaluations in O(log n) numpy calls.
    """
    p = np.arange(n + 1, dtype=np.int64)
    lo = np.zeros(n + 1, dtype=np.int64)
    hi = p.copy()  # fits(hi, p) holds: the empty segment always fits
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        ok = np.asarray(fits(mid, p), dtype=bool)
        hi = np.where(active & ok, mid, hi)
        lo = np.where(active & ~ok, mid + 1, lo)


def reachable(los: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``out[s][p]``: can positions ``[0, p)`` be cut into ``s`` segments meeting ``los[:s]``?"""
    n = len(los[0]) - 1
    r = np.zeros(n + 1, dtype=bool)
    r[0] = True
    out = [r]
    for lo in los:
        count = np.zeros(n + 2, dtype=np.int64)
        np.cumsum(r, out=count[1:])  # count[x] = reachable positions in [0, x)
        r = (count[: n + 1] - count[lo]) > 0
        out.append(r)
    return out


def feasible(los: Sequence[np.ndarray]) -> bool:
    n = len(los[0]) - 1
    return bool(reachable(los)[-1][n])


def cheapest_cuts(los: Sequence[np.ndarray], cut_cost: np.ndarray) -> list[int] | None:
    """End positions of ``len(los)`` segments covering ``[0, n)``, segment ``s`` meeting
    ``los[s]``, minimising the sum of ``cut_cost`` over the internal cuts; None if none exists.
    Ties go to the cut that makes earlier segments longer."""
    n = len(los[0]) - 1
    k = len(los)
    add = np.asarray(cut_cost, dtype=np.int64).copy()
    add[n] = 0  # the end of the last segment is not a cut
    best = np.full(n + 1, _INF, dtype=np.int64)
    best[0] = 0
    history = [best]
    positions = np.arange(n + 1, dtype=np.int64)
    for lo in los:
        prev_min = _range_min(best, lo, positions)
        best = np.where(prev_min >= _INF, _INF, prev_min + add)
        history.append(best)
    if best[n] >= _INF:
        return None
    bounds = [n]
    p = n
    for s in range(k, 1, -1):
        want = history[s][p] - add[p]
        lo = int(los[s - 1][p])
        candidates = np.nonzero(history[s - 1][lo:p] == want)[0]
        p = lo + int(candidates[-1])
        bounds.append(p)
    return bounds[::-1]


def _range_min(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``min(values[lo[i]:hi[i]])`` for every i (``_INF`` when empty), via a sparse table."""
    n = len(values)
    table = sparse_table(values, np.minimum)
    length = np.maximum(hi - lo, 0)
    level = np.zeros_like(length)
    nonzero = length > 0
    level[nonzero] = np.floor(np.log2(length[nonzero])).astype(np.int64)
    left = np.minimum(lo, n - 1)
    right = np.clip(hi - (np.int64(1) << level), 0, n - 1)
    out = np.minimum(table[level, left], table[level, right])
    return np.where(nonzero, out, _INF)


def greedy_feasible(prefix: list[int], budgets: Sequence[int]) -> bool:
    """Exact feasibility for an additive cost (``prefix``: its prefix sums) when every node fits
    every budget on its own: fill each segment as far as its budget allows."""
    n = len(prefix) - 1
    end = 0
    for b in budgets:
        end = bisect.bisect_right(prefix, prefix[end] + b, lo=end) - 1
        if end >= n:
            return True
    return False


def smallest_budgets(los_for: Callable[[list[int]], list[np.ndarray]], k: int,
                     capacities: Sequence[float] | None, low: int, high: int,
                     additive: np.ndarray | None = None) -> tuple[float, list[int]]:
    """The min-max objective ``T`` and the per-segment budgets that achieve it.

    Without ``capacities`` every segment's budget is the same integer ``T``, found exactly by
    bisection over ``[low, high]`` (``high`` must be feasible). With capacities the budget of
    segment ``s`` is ``floor(T * capacities[s])``: ``T`` is bisected over the reals from
    ``[0, high / min(capacities)]`` to a relative precision of 1e-12, which selects the optimum
    unless two candidate ratios lie closer than that.

    ``additive``: the prefix sums of the cost when it is additive (FLOPs, weights without
    borrowed tensors), which enables the greedy test where it is exact.
    """
    prefix = None if additive is None else [int(x) for x in additive]
    nodes = [] if prefix is None else [b - a for a, b in zip(prefix, prefix[1:])]
    largest, smallest = (max(nodes), min(nodes)) if nodes else (0, 0)

    def ok(budgets: list[int]) -> bool:
        if prefix is not None:
            # necessary: the segments hold the whole cost, and each holds at least one node
            if sum(budgets) < prefix[-1] or min(budgets) < smallest:
                return False
            if min(budgets) >= largest:
                return greedy_feasible(prefix, budgets)
        return feasible(los_for(budgets))

    if capacities is None:
        while low < high:
            mid = (low + high) // 2
            if ok([mid] * k):
                high = mid
            else:
                low = mid + 1
        return float(low), [low] * k

    def budgets(t: float) -> list[int]:
        # a budget above ``high`` (the whole chain's cost) admits the same segments as ``high``
        return [min(int(math.floor(t * c)), high) for c in capacities]

    lo_t, hi_t = 0.0, high / min(capacities)
    for _ in range(200):
        if hi_t - lo_t <= hi_t * 1e-12:
            break
        mid = (lo_t + hi_t) / 2
        if ok(budgets(mid)):
            hi_t = mid
        else:
            lo_t = mid
    return hi_t, budgets(hi_t)
