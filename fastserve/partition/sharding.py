"""The Sharding value: ordered shards of a graph and the tensors crossing each cut.

Shards follow one topological order of the graph, so they form a chain (a pipeline). The cut
between shard ``i`` and ``i + 1`` carries every tensor that exists before it and is still needed
after it: outputs of earlier nodes read by later nodes (skip connections pass *through* the
shards in between), graph inputs read later (an attention mask every block reads), and graph
outputs produced early (they must reach the end of the pipeline). So:

* ``shard.inputs``  = the tensors of the cut before it (for shard 0: the graph inputs);
* ``shard.outputs`` = the tensors of the cut after it (for the last shard: the graph outputs).

A tensor both in ``inputs`` and ``outputs`` is passed through unchanged.

Costs are per sample (batch 1 at the graph's dims). A shard's memory at batch ``B`` is
``weight_bytes + B * activation_bytes`` (see :mod:`fastserve.partition.chain` for what the
activation bytes count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fastserve.errors import PartitionError
from fastserve.graph.graph import Graph
from fastserve.graph.module import SubgraphModule, build_subgraph
from fastserve.graph.spec import WeightsSpec
from fastserve.partition.chain import chain_costs


@dataclass(frozen=True)
class Shard:
    """One shard: its nodes (in execution order), the tensors it receives and sends, its costs
    (``flops``, ``in_bytes``, ``out_bytes`` and ``activation_bytes`` per sample).

    ``borrowed_bytes`` are tied weights it must hold a copy of because their owner is in another
    shard (a tied ``lm_head`` without the embedding)."""

    index: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: int
    params_bytes: int
    flops: int
    in_bytes: int
    out_bytes: int
    borrowed_bytes: int = 0
    activation_bytes: int = 0  # bytes per sample held while it runs (an upper bound)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights a rank holding this shard keeps in memory."""
        return self.params_bytes + self.borrowed_bytes

    def memory_bytes(self, batch: int = 1) -> int:
        """Predicted memory at batch ``batch``: weights + batch x activation bytes per sample."""
        return self.weight_bytes + batch * self.activation_bytes

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "nodes": list(self.nodes), "inputs": list(self.inputs),
                "outputs": list(self.outputs), "params": self.params,
                "params_bytes": self.params_bytes, "borrowed_bytes": self.borrowed_bytes,
                "flops": self.flops, "in_bytes": self.in_bytes, "out_bytes": self.out_bytes,
                "activation_bytes": self.activation_bytes}


@dataclass(frozen=True, eq=False)
class Sharding:
    """A graph cut into an ordered chain of shards by ``strategy`` with ``policy`` (the options
    the strategy was called with, plain JSON values)."""

    graph: Graph
    strategy: str
    shards: tuple[Shard, ...]
    policy: Mapping[str, Any] = field(default_factory=dict)

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
        return self.imbalance_by("flops")

    def imbalance_by(self, cost: str) -> float:
        """Largest over mean shard by ``"flops"`` or ``"params"`` (weight bytes held)."""
        if cost not in ("flops", "params"):
            raise PartitionError(f"imbalance is measured by 'flops' or 'params', not {cost!r}")
        costs = [s.flops if cost == "flops" else s.weight_bytes for s in self.shards]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean else 1.0

    @property
    def cut_bytes(self) -> int:
        """Bytes per sample crossing all cuts between shards (what the pipeline sends)."""
        return sum(s.out_bytes for s in self.shards[:-1])

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph.name, "strategy": self.strategy, "policy": dict(self.policy),
                "shards": [s.to_json() for s in self.shards], "imbalance": self.imbalance,
                "cut_bytes": self.cut_bytes}


def shards_from_bounds(graph: Graph, bounds: Sequence[int], strategy: str,
                       order: Sequence[str] | None = None,
                       policy: Mapping[str, Any] | None = None) -> Sharding:
    """Cut ``order`` (default ``graph.order``) at ``bounds`` (end indices, exclusive; the last
    must be ``len(order)``) and compute what crosses every cut."""
    costs = chain_costs(graph, order)
    n = costs.n
    bounds = [int(b) for b in bounds]
    if not bounds or bounds[-1] != n or any(b <= a for a, b in zip([0, *bounds], bounds)):
        raise PartitionError(f"bad cut bounds {list(bounds)} for {n} nodes: each shard "
                             f"needs at least one node and the last bound must be {n}")
    sizes = dict(zip(costs.tensor_names, costs.tensor_bytes.tolist()))

    def cut(at: int) -> tuple[str, ...]:
        return tuple(graph.outputs) if at == n else costs.cut(at)

    shards = []
    start = 0
    ins = cut(0)
    for i, stop in enumerate(bounds):
        outs = cut(stop)
        params_bytes = int(costs.params_bytes[stop] - costs.params_bytes[start])
        shards.append(Shard(
            index=i, nodes=costs.order[start:stop], inputs=ins, outputs=outs,
            params=int(costs.params[stop] - costs.params[start]),
            params_bytes=params_bytes,
            flops=costs.segment_flops(start, stop),
            in_bytes=sum(sizes[t] for t in ins),
            out_bytes=sum(sizes[t] for t in outs),
            borrowed_bytes=costs.segment_weight(start, stop) - params_bytes,
            activation_bytes=costs.segment_activation(start, stop)))
        start, ins = stop, outs
    return Sharding(graph, strategy, tuple(shards), dict(policy or {}))
