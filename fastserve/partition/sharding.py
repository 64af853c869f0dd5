"""The Sharding value: ordered shards of a graph and the tensors crossing each cut.

Shards follow one topological order of the graph, so they form a chain (a pipeline). The cut
between shard ``i`` and ``i + 1`` carries every tensor that exists before it and is still needed
after it: outputs of earlier nodes read by later nodes (skip connections pass *through* the
shards in between), graph inputs read later (an attention mask every block reads), and graph
outputs produced early (they must reach the end of the pipeline). So:

* ``shard.inputs``  = the tensors of the cut before it (for shard 0: the graph inputs);
* ``shard.outputs`` = the tensors of the cut after it (for the last shard: the graph outputs).

A tensor both in ``inputs`` and ``outputs`` is passed through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from fastserve.errors import PartitionError
from fastserve.graph.graph import Graph
from fastserve.graph.module import SubgraphModule, build_subgraph
from fastserve.graph.spec import WeightsSpec


@dataclass(frozen=True)
class Shard:
    """One shard: its nodes (in execution order), the tensors it receives and sends, its costs
    (``flops``, ``in_bytes`` and ``out_bytes`` per sample)."""

    index: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: int
    params_bytes: int
    flops: int
    in_bytes: int
    out_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "nodes": list(self.nodes), "inputs": list(self.inputs),
                "outputs": list(self.outputs), "params": self.params,
                "params_bytes": self.params_bytes, "flops": self.flops,
                "in_bytes": self.in_bytes, "out_bytes": self.out_bytes}


@dataclass(frozen=True, eq=False)
class Sharding:
    """A graph cut into an ordered chain of shards by ``strategy``."""

    graph: Graph
    strategy: str
    shards: tuple[Shard, ...]

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self):
        return iter(self.shards)

    def __getitem__(self, i: int) -> Shard:
        return self.shards[i]

    def module(self, index: int, weights: WeightsSpec | None = None) -> SubgraphModule:
        """Build shard ``index`` alone, with only its own weights."""
        s = self.shards[index]
        return build_subgraph(self.graph, s.nodes, s.inputs, s.outputs, weights)

    @property
    def imbalance(self) -> float:
        """Largest shard over the mean shard, by FLOPs (1.0 is perfect balance)."""
        costs = [s.flops for s in self.shards]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph.name, "strategy": self.strategy,
                "shards": [s.to_json() for s in self.shards], "imbalance": self.imbalance}


def shards_from_bounds(graph: Graph, bounds: Sequence[int], strategy: str,
                       order: Sequence[str] | None = None) -> Sharding:
    """Cut ``order`` (default ``graph.order``) at ``bounds`` (end indices, exclusive; the last
    must be ``len(order)``) and compute what crosses every cut."""
    order = tuple(order or graph.order)
    if not bounds or bounds[-1] != len(order) or any(b <= a for a, b in zip([0, *bounds], bounds)):
        raise PartitionError(f"bad cut bounds {list(bounds)} for {len(order)} nodes: each shard "
                             f"needs at least one node and the last bound must be {len(order)}")
    position = {n: i for i, n in enumerate(order)}
    # for each tensor: where it becomes available (-1 for graph inputs) and its last use
    born = {t.name: -1 for t in graph.inputs}
    last = {}
    for n in order:
        for t in graph.node(n)["outputs"]:
            born[t.name] = position[n]
        for ref in graph.node(n)["inputs"]:
            last[ref] = max(last.get(ref, -1), position[n])
    end = len(order)
    for out in graph.outputs:
        last[out] = end  # graph outputs live until the end of the pipeline

    def cut(at: int) -> tuple[str, ...]:
        """Tensors alive across the boundary just before position ``at``."""
        if at == 0:
            return tuple(t.name for t in graph.inputs)
        if at == end:
            return tuple(graph.outputs)
        return tuple(t for t in born if born[t] < at <= last.get(t, -2))

    shards = []
    start = 0
    for i, stop in enumerate(bounds):
        nodes = order[start:stop]
        ins, outs = cut(start), cut(stop)
        data = [graph.node(n) for n in nodes]
        shards.append(Shard(
            index=i, nodes=nodes, inputs=ins, outputs=outs,
            params=sum(d["params"] for d in data),
            params_bytes=sum(d["params_bytes"] for d in data),
            flops=sum(d["flops"] for d in data),
            in_bytes=sum(graph.tensors[t].bytes for t in ins),
            out_bytes=sum(graph.tensors[t].bytes for t in outs)))
        start = stop
    return Sharding(graph, strategy, tuple(shards))
