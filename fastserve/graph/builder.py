"""The Python builder: the YAML spec format as method calls.

The builder writes the same raw document a YAML file holds and validates it with the same code
(:func:`fastserve.graph.loader.spec_from_dict`), so the two front ends cannot drift apart::

    b = GraphBuilder("mlp", params={"hidden": 256})
    b.input("x", ["batch", 64])
    b.node("fc_in", "linear", ["x"], in_features=64, out_features="$hidden")
    with b.repeat("layer", 4, input="fc_in") as r:
        r.node("fc", "linear", ["$in"], in_features="$hidden", out_features="$hidden")
        r.node("act", "gelu", ["fc"])
    b.node("head", "linear", ["layer"], in_features="$hidden", out_features=10)
    b.output("head")
    graph = b.compile()
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from fastserve.graph.graph import Graph
from fastserve.graph.spec import GraphSpec


class _Nodes:
    """Something nodes can be added to: the graph itself or a repeat block."""

    def __init__(self) -> None:
        self._nodes: list[dict[str, Any]] = []

    def node(self, id: str, op: str, inputs: Sequence[str] = (), **args: Any) -> str:
        """Add a node running ``op`` on ``inputs`` with ``args``; returns its id."""
        self._nodes.append({"id": id, "op": op, "args": dict(args), "inputs": list(inputs)})
        return id

    def module(self, id: str, target: str, inputs: Sequence[str] = (), **kwargs: Any) -> str:
        """Add a node running a user's ``nn.Module`` class ``"package.module:Name"``."""
        self._nodes.append({"id": id, "module": target, "args": dict(kwargs),
                            "inputs": list(inputs)})
        return id


class GraphBuilder(_Nodes):
    """Builds a graph spec in Python; see the module docstring for an example."""

    def __init__(self, name: str, *, params: dict[str, Any] | None = None,
                 dims: dict[str, int] | None = None, seed: int = 0,
                 checkpoint: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.params = dict(params or {})
        self.dims = dict(dims or {})
        self.weights: dict[str, Any] = {"seed": seed}
        if checkpoint is not None:
            self.weights["checkpoint"] = checkpoint
        self._inputs: dict[str, dict[str, Any]] = {}
        self._outputs: list[str] = []

    def input(self, name: str, shape: Sequence[int | str], dtype: str = "float32",
              high: int | None = None) -> str:
        """Declare a graph input; symbolic dims are names (``["batch", "seq"]``)."""
        decl: dict[str, Any] = {"shape": list(shape), "dtype": dtype}
        if high is not None:
            decl["high"] = high
        self._inputs[name] = decl
        return name

    def output(self, *names: str) -> None:
        self._outputs.extend(names)

    @contextmanager
    def repeat(self, id: str, count: int | str, *, input: str | None = None,
               output: str | None = None) -> Iterator[_Nodes]:
        """A block of nodes repeated ``count`` times; ``"$in"`` is the previous iteration."""
        block = _Nodes()
        yield block
        doc: dict[str, Any] = {"repeat": count, "id": id, "nodes": block._nodes}
        if input is not None:
            doc["input"] = input
        if output is not None:
            doc["output"] = output
        self._nodes.append(doc)

    def document(self) -> dict[str, Any]:
        """The raw spec document, exactly what the YAML file would hold."""
        return {"name": self.name, "params": self.params, "dims": self.dims,
                "inputs": self._inputs, "weights": self.weights, "nodes": self._nodes,
                "outputs": self._outputs}

    def spec(self) -> GraphSpec:
        from fastserve.graph.loader import spec_from_dict

        # trusted: every ``module(...)`` target here was written in the caller's own Python
        # program, which could import and run it directly; the trust check exists for code
        # named by files, which a user may load without reading them
        return spec_from_dict(self.document(), file=None, trust_code=True)

    def compile(self, dims: dict[str, int] | None = None) -> Graph:
        from fastserve.graph.compiler import compile_graph

        return compile_graph(self.spec(), dims)
