"""The compiled graph: a networkx DiGraph with costs, wrapped in a frozen value.

Node schema (``graph.nx.nodes[node_id]``):

==================  ==========================================================================
``op``              op name (``linear``, ``transformer_block``, ``captured``, ...)
``args``            the op's arguments (plain JSON values)
``inputs``          tensor names the node reads, in call order
``outputs``         tuple of :class:`TensorInfo` the node produces
``params``          parameter count owned by the node
``params_bytes``    bytes of those parameters
``borrowed_bytes``  bytes of parameters used but owned by another node (a tied lm_head); a
                    shard holding this node without the owner must hold a copy
``flops``           floating point operations per sample (multiply-add = 2)
``out_bytes``       bytes of all outputs per sample
``layer``/``group`` repeat index and repeat block id, or None
``line``            line of the spec that declared it, or None
``measured``        seconds per sample once profiled, else None
==================  ==========================================================================

Edge schema (``graph.nx.edges[src, dst]``): ``tensors`` (names passed from src to dst) and
``bytes`` (per sample, what would cross if the edge were cut).

Graph inputs are tensors without a producing node; they are listed in ``graph.inputs``.
"Per sample" means batch size 1 at the dim sizes recorded in ``graph.dims``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

import networkx as nx

from fastserve.errors import GraphError
from fastserve.graph.dtypes import dtype_name
from fastserve.graph.spec import GraphSpec


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, its shape at the graph's dims (batch 1), dtype and bytes per sample."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.bytes}


@dataclass(frozen=True, eq=False)
class Graph:
    """A compiled, costed dataflow graph. Pure data: no weights, no processes."""

    name: str
    nx: nx.DiGraph
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[str, ...]
    spec: GraphSpec
    dims: dict[str, int] = field(default_factory=dict)

    # --- navigation ------------------------------------------------------------------------

    @cached_property
    def order(self) -> tuple[str, ...]:
        """Node ids in a deterministic topological order (spec order where it is free)."""
        rank = {n: i for i, n in enumerate(self.nx.nodes)}
        return tuple(nx.lexicographical_topological_sort(self.nx, key=lambda n: rank[n]))

    @cached_property
    def producers(self) -> dict[str, str | None]:
        """tensor name -> producing node id (None for graph inputs)."""
        out: dict[str, str | None] = {t.name: None for t in self.inputs}
        for n, data in self.nx.nodes(data=True):
            for t in data["outputs"]:
                out[t.name] = n
        return out

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """tensor name -> TensorInfo, for graph inputs and every node output."""
        out = {t.name: t for t in self.inputs}
        for _, data in self.nx.nodes(data=True):
            out.update({t.name: t for t in data["outputs"]})
        return out

    def node(self, node_id: str) -> dict[str, Any]:
        return self.nx.nodes[node_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    @cached_property
    def layers(self) -> tuple[tuple[str, ...], ...]:
        """Nodes grouped into layers, in order: each repeat iteration is one layer; a node outside
        any repeat block is a layer of its own. This is what the ``layer`` strategy counts."""
        groups: list[tuple[str, ...]] = []
        key_of_last = None
        for n in self.order:
            d = self.node(n)
            key = (d["group"], d["layer"]) if d["layer"] is not None else ("node", n)
            if key == key_of_last:
                groups[-1] = groups[-1] + (n,)
            else:
                groups.append((n,))
            key_of_last = key
        return tuple(groups)

    # --- totals ------------------------------------------------------------------------------

    def total(self, attr: str) -> int:
        return int(sum(d[attr] or 0 for _, d in self.nx.nodes(data=True)))

    @property
    def params(self) -> int:
        return self.total("params")

    @property
    def params_bytes(self) -> int:
        return self.total("params_bytes")

    @property
    def flops(self) -> int:
        return self.total("flops")

    # --- serialisation -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ``fastserve compile --json`` document (costs per sample)."""
        nodes = []
        for n in self.order:
            d = self.node(n)
            nodes.append({"id": n, "op": d["op"], "params": d["params"],
                          "params_bytes": d["params_bytes"], "flops": d["flops"],
                          "out_bytes": d["out_bytes"], "layer": d["layer"],
                          "outputs": [t.to_json() for t in d["outputs"]]})
        edges = [{"src": s, "dst": t, "tensors": list(d["tensors"]), "bytes": d["bytes"]}
                 for s, t, d in self.nx.edges(data=True)]
        return {
            "name": self.name,
            "dims": dict(self.dims),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": list(self.outputs),
            "nodes": nodes,
            "edges": edges,
            "totals": {"nodes": len(nodes), "params": self.params,
                       "params_bytes": self.params_bytes, "flops": self.flops,
                       "out_bytes": self.total("out_bytes")},
        }


def tensor_info(name: str, t) -> TensorInfo:
    """What a graph records of a tensor (a torch tensor, possibly on ``meta``): name, shape,
    dtype name and bytes."""
    return TensorInfo(name, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size())


def verify(graph: Graph) -> Graph:
    """Check a compiled graph's invariants; return it unchanged or raise :class:`GraphError`.

    Acyclic; every tensor a node reads is a graph input or produced by exactly one node; edges
    agree with node inputs; every graph output exists; shapes and dtypes were inferred.
    """
    g = graph.nx
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join(str(e[0]) for e in nx.find_cycle(g))
        raise GraphError(f"graph '{graph.name}' has a cycle: {cycle}")
    producers: dict[str, str | None] = {t.name: None for t in graph.inputs}
    for n, d in g.nodes(data=True):
        for t in d["outputs"]:
            if t.name in producers:
                raise GraphError(f"tensor '{t.name}' is produced twice ('{producers[t.name]}' "
                                 f"and '{n}')")
            if not t.shape or t.dtype is None:
                raise GraphError(f"node '{n}' output '{t.name}' has no inferred shape/dtype")
            producers[t.name] = n
    for n, d in g.nodes(data=True):
        for ref in d["inputs"]:
            if ref not in producers:
                raise GraphError(f"node '{n}' reads '{ref}', which no node produces")
            src = producers[ref]
            if src is not None and not g.has_edge(src, n):
                raise GraphError(f"edge {src} -> {n} missing for tensor '{ref}'")
            if src is not None and ref not in g.edges[src, n]["tensors"]:
                raise GraphError(f"edge {src} -> {n} does not list tensor '{ref}'")
        for key in ("params", "params_bytes", "flops", "out_bytes"):
            if not isinstance(d.get(key), int) or d[key] < 0:
                raise GraphError(f"node '{n}' has no valid '{key}' cost: {d.get(key)!r}")
    for s, t, d in g.edges(data=True):
        for ref in d["tensors"]:
            if producers.get(ref) != s or ref not in g.nodes[t]["inputs"]:
                raise GraphError(f"edge {s} -> {t} lists tensor '{ref}' that does not flow there")
    for out in graph.outputs:
        if out not in producers:
            raise GraphError(f"graph output '{out}' is not produced by any node")
    return graph
