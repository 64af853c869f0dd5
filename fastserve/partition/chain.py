"""What a contiguous segment of a topological order costs: the numbers every strategy cuts by.

A shard is a segment ``[q, p)`` of positions in an order of the graph's nodes. For every segment,
in O(1) from prefix sums and a sparse table (vectorised over numpy arrays of ``q`` and ``p``):

* ``flops``: FLOPs per sample, the sum over its nodes;
* ``weight``: bytes of weights it must hold: its nodes' ``params_bytes``, plus a copy of every
  *borrowed* tensor (a tied ``lm_head`` uses the embedding's weight) whose owner lies outside the
  segment. Borrowers of one owner are assumed to borrow the same tensor (counted once, the
  largest); a borrower whose owner the graph does not name is always charged (an upper bound);
* ``activation``: bytes per sample of the tensors held while it runs, an upper bound:
  ``max over its nodes t of (cut(t) + out(t)) + max over its nodes t of cut(t)``, where
  ``cut(t)`` is the bytes crossing the position of ``t`` and ``out(t)`` those of t's outputs.
  The tensors crossing position ``t`` are what a shard holds when ``t`` runs (pass-through
  tensors, intermediates not yet consumed: a shard frees a tensor after its last reader); the
  second term covers the shard's received inputs, which the caller keeps until the shard returns
  (they are ``cut(first node)``, bounded by the largest cut in the shard so that the cost stays
  monotone). Temporaries inside a node (attention scores) are not counted;
* ``memory(batch) = weight + batch * activation``.

All three grow when a segment grows (weights: adding a borrowed tensor's owner adds at least the
tensor's bytes), which is what makes the exact searches in :mod:`fastserve.partition.search`
correct.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fastserve.graph.graph import Graph


@dataclass(frozen=True)
class Borrow:
    """Nodes (``positions``) that use a tensor of bytes ``sizes`` owned by ``owner`` (a
    position, or -1 when the graph does not say who owns it)."""

    owner: int
    positions: np.ndarray
    sizes: np.ndarray


@dataclass(frozen=True, eq=False)
class ChainCosts:
    """Costs of segments of ``order`` (positions ``0..n``; segment ``[q, p)``)."""

    order: tuple[str, ...]
    node_flops: np.ndarray  # (n,) FLOPs per sample of each node
    node_weight: np.ndarray  # (n,) params_bytes + borrowed_bytes of each node (held alone)
    flops: np.ndarray  # (n + 1,) prefix sums of FLOPs
    params: np.ndarray  # (n + 1,) prefix sums of parameter counts
    params_bytes: np.ndarray  # (n + 1,) prefix sums of params_bytes
    borrows: tuple[Borrow, ...]
    cut_bytes: np.ndarray  # (n + 1,) bytes per sample crossing position t (t=0: graph inputs)
    live: np.ndarray  # (n,) bytes per sample crossing node t's position plus its outputs
    tensor_names: tuple[str, ...]  # every tensor: graph inputs, then node outputs in order
    born: np.ndarray  # position of the producer (-1: graph input)
    last: np.ndarray  # last position reading it (n: graph output; -1: never read)
    tensor_bytes: np.ndarray
    _max_live: np.ndarray  # (levels, n): max of live over [i, i + 2**level)
    _max_cut: np.ndarray  # (levels, n): max of cut_bytes over [i, i + 2**level)
    _log2: np.ndarray  # floor(log2(length)) for lengths 0..n

    @property
    def n(self) -> int:
        return len(self.order)

    # --- segment costs (q, p: ints or equal-shape integer arrays) --------------------------------

    def segment_flops(self, q, p):
        return _out(self.flops[p] - self.flops[q])

    def segment_weight(self, q, p):
        q, p = np.asarray(q), np.asarray(p)
        total = self.params_bytes[p] - self.params_bytes[q]
        for b in self.borrows:
            inside = (q[..., None] <= b.positions) & (b.positions < p[..., None])
            held = np.where(inside, b.sizes, 0).max(axis=-1)
            owner_inside = (q <= b.owner) & (b.owner < p)
            total = total + np.where(owner_inside, 0, held)
        return _out(total)

    def segment_activation(self, q, p):
        q, p = np.asarray(q), np.asarray(p)
        length = np.maximum(p - q, 0)
        if self.n == 0:
            return _out(np.zeros_like(length))
        level = self._log2[length]
        left = np.minimum(q, self.n - 1)
        right = np.clip(p - (1 << level), 0, self.n - 1)
        live = np.maximum(self._max_live[level, left], self._max_live[level, right])
        held = np.maximum(self._max_cut[level, left], self._max_cut[level, right])
        return _out(np.where(length > 0, live + held, 0))

    def segment_memory(self, q, p, batch: int = 1):
        return _out(np.asarray(self.segment_weight(q, p))
                    + batch * np.asarray(self.segment_activation(q, p)))

    def cut(self, at: int) -> tuple[str, ...]:
        """Names of the tensors crossing position ``at`` (``at == 0``: every graph input)."""
        if at == 0:
            return tuple(n for n, b in zip(self.tensor_names, self.born) if b < 0)
        alive = np.nonzero((self.born < at) & (at <= self.last))[0]
        return tuple(self.tensor_names[i] for i in alive)


def _out(x):
    """numpy scalars back to Python ints, arrays unchanged."""
    return int(x) if np.ndim(x) == 0 else x


_CACHE: "weakref.WeakKeyDictionary[Graph, ChainCosts]" = weakref.WeakKeyDictionary()


def chain_costs(graph: Graph, order: Sequence[str] | None = None) -> ChainCosts:
    """The segment costs of ``order`` (default ``graph.order``), cached per graph."""
    order = tuple(graph.order if order is None else order)
    cached = _CACHE.get(graph)
    if cached is not None and (cached.order is order or cached.order == order):
        return cached
    costs = _build(graph, order)
    _CACHE[graph] = costs
    return costs


def _build(graph: Graph, order: tuple[str, ...]) -> ChainCosts:
    n = len(order)
    position = {node: i for i, node in enumerate(order)}
    data = [graph.node(node) for node in order]
    node_flops = np.array([d["flops"] for d in data], dtype=np.int64)
    node_params = np.array([d["params"] for d in data], dtype=np.int64)
    node_bytes = np.array([d["params_bytes"] for d in data], dtype=np.int64)
    node_borrowed = np.array([d.get("borrowed_bytes") or 0 for d in data], dtype=np.int64)

    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, d in enumerate(data):
        if node_borrowed[i] > 0:
            owner = position.get(_owner(d), -1)
            key = (owner, owner if owner >= 0 else i)  # unknown owners never merge
            groups.setdefault(key, []).append((i, int(node_borrowed[i])))
    borrows = tuple(Borrow(owner, np.array([p for p, _ in items], dtype=np.int64),
                           np.array([s for _, s in items], dtype=np.int64))
                    for (owner, _), items in groups.items())

    # tensor lifetimes: born at the producer's position, alive until the last reader
    names: list[str] = [t.name for t in graph.inputs]
    born = [-1] * len(names)
    sizes = [t.bytes for t in graph.inputs]
    index = {name: i for i, name in enumerate(names)}
    last = [-1] * len(names)
    for i, d in enumerate(data):
        for ref in d["inputs"]:
            k = index.get(ref)
            if k is not None:  # graph inputs and outputs of earlier nodes (a topological order)
                last[k] = i
        for t in d["outputs"]:
            index[t.name] = len(names)
            names.append(t.name)
            born.append(i)
            sizes.append(t.bytes)
            last.append(-1)
    for out in graph.outputs:
        if out in index:
            last[index[out]] = n
    born_a = np.array(born, dtype=np.int64)
    last_a = np.array(last, dtype=np.int64)
    bytes_a = np.array(sizes, dtype=np.int64)

    # bytes crossing position t: tensors with born < t <= last (a difference array)
    diff = np.zeros(n + 2, dtype=np.int64)
    used = last_a >= 0
    np.add.at(diff, born_a[used] + 1, bytes_a[used])
    np.add.at(diff, last_a[used] + 1, -bytes_a[used])
    cut_bytes = np.cumsum(diff)[: n + 1]
    cut_bytes[0] = int(bytes_a[born_a < 0].sum())  # every graph input enters shard 0
    out_bytes = np.array([sum(t.bytes for t in d["outputs"]) for d in data], dtype=np.int64)
    live = cut_bytes[:n] + out_bytes

    return ChainCosts(
        order=order, node_flops=node_flops, node_weight=node_bytes + node_borrowed,
        flops=_prefix(node_flops), params=_prefix(node_params), params_bytes=_prefix(node_bytes),
        borrows=borrows, cut_bytes=cut_bytes, live=live, tensor_names=tuple(names),
        born=born_a, last=last_a, tensor_bytes=bytes_a,
        _max_live=_sparse_max(live), _max_cut=_sparse_max(cut_bytes[:n]), _log2=_floor_log2(n))


def _owner(d: dict) -> str | None:
    """The node that owns the tensor this node borrows, when the graph says so."""
    owner = d.get("borrowed_from")
    if owner is None and isinstance(d.get("args"), dict):
        owner = d["args"].get("tie")
    return owner if isinstance(owner, str) else None


def _prefix(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=out[1:])
    return out


def sparse_table(values: np.ndarray, op=np.maximum) -> np.ndarray:
    """Row ``j`` holds ``op`` over every window of ``2**j`` values starting at each index, so a
    range query is ``op`` of two overlapping rows (constant time per query)."""
    n = len(values)
    levels = [values.copy() if n else np.zeros(1, dtype=values.dtype)]
    width = 1
    while 2 * width <= n:
        prev = levels[-1]
        nxt = prev.copy()
        nxt[: n - width] = op(prev[: n - width], prev[width:])
        levels.append(nxt)
        width *= 2
    return np.stack(levels)


def _sparse_max(values: np.ndarray) -> np.ndarray:
    return sparse_table(values, np.maximum)


def _floor_log2(n: int) -> np.ndarray:
    out = np.zeros(n + 1, dtype=np.int64)
    if n >= 2:
        out[2:] = np.floor(np.log2(np.arange(2, n + 1))).astype(np.int64)
    return out
