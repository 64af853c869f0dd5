"""Graph spec values: what a YAML file or the Python builder declares, after validation.

A spec is already expanded: ``repeat`` blocks are unrolled into nodes named ``<id>.<i>`` (or
``<id>.<i>.<inner id>``), ``$param`` references are substituted, and every node remembers the
line of the file it came from so that later errors (bad shapes at compile time) can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastserve.graph.dtypes import DTYPES as _DTYPE_TABLE

DTYPES = tuple(_DTYPE_TABLE)  # the names a spec may declare


@dataclass(frozen=True)
class InputSpec:
    """A graph input. ``shape`` mixes ints and symbolic dim names (``["batch", "seq"]``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    high: int | None = None  # exclusive upper bound for random integer inputs (token ids)
    line: int | None = None


@dataclass(frozen=True)
class NodeSpec:
    """One node: an op with its (substituted) arguments and the tensors it reads.

    A tensor reference is a node id (its first output), ``"<node>:<k>"`` (output k), or a graph
    input name.
    """

    id: str
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    layer: int | None = None  # index within its repeat block; None outside any
    group: str | None = None  # id of the repeat block it came from
    line: int | None = None


@dataclass(frozen=True)
class WeightsSpec:
    """Where weights come from: a seeded deterministic init, or a checkpoint file."""

    seed: int = 0
    checkpoint: str | None = None  # path to .safetensors (preferred) or a torch file


@dataclass(frozen=True)
class SourceSpec:
    """A graph captured from a torch model built by ``factory(**kwargs)``."""

    factory: str  # "package.module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)
    example_inputs: dict[str, Any] = field(default_factory=dict)  # name -> {shape, dtype, high}


@dataclass(frozen=True)
class GraphSpec:
    """A validated, expanded graph declaration. ``file`` is where it was read from, if anywhere."""

    name: str
    inputs: tuple[InputSpec, ...]
    nodes: tuple[NodeSpec, ...]
    outputs: tuple[str, ...]
    dims: dict[str, int] = field(default_factory=dict)  # default sizes of symbolic dims
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    source: SourceSpec | None = None
    file: str | None = None
    output_lines: tuple[int | None, ...] = ()  # line of each entry of ``outputs``, if read

    @property
    def dim_names(self) -> set[str]:
        """The symbolic dims a caller may size: those declared, and those inputs use."""
        shapes = [i.shape for i in self.inputs]
        if self.source is not None:  # a captured model's inputs are its example inputs
            shapes += [e.get("shape", ()) for e in self.source.example_inputs.values()
                       if isinstance(e, dict)]
        return set(self.dims) | {d for shape in shapes for d in shape if isinstance(d, str)}

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)


def split_ref(ref: str) -> tuple[str, int]:
    """``"h.3:1"`` -> ``("h.3", 1)``; ``"h.3"`` -> ``("h.3", 0)``."""
    base, sep, idx = ref.rpartition(":")
    if sep and idx.isdigit():
        return base, int(idx)
    return ref, 0


def tensor_name(node_id: str, index: int, n_outputs: int) -> str:
    """The canonical name of output ``index`` of a node with ``n_outputs`` outputs."""
    return node_id if n_outputs == 1 else f"{node_id}:{index}"
