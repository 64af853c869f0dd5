"""Cut an exported torch graph into module-granularity parts that each own their weights.

``torch.export`` gives one flat ATen graph for a whole model. FastServe wants one graph node per
module of interest (an embedding, each transformer block, the final norm, the head), each a
``torch.fx.GraphModule`` that a rank can run alone. This module does that cut:

1. **Units.** Every exported op records the module it ran in (``meta["nn_module_stack"]``). The
   repeated blocks of a model live in containers (``nn.ModuleList`` / ``nn.Sequential``); the
   outermost containers and their ancestors are *expanded*, and an op belongs to the first
   module on its stack that is not expanded: a block (``transformer.h.3``) or a module beside
   the blocks (``transformer.wte``, ``transformer.ln_f``, ``lm_head``). Ops that run in an
   expanded module's own ``forward`` (mask building, reshapes) are glue of that module.
2. **Parts.** Consecutive ops of one unit form a run. A run that touches no parameter or buffer
   (glue, dropout, activations) joins the run before it (the first such runs join the run after
   them), so the embedding add and the mask construction travel with the embeddings. Parts are
   contiguous in the exported (topological) order, so the part graph is acyclic by construction.
3. **Modules.** Each part is copied into its own ``fx.Graph``. Weights are ``get_attr`` nodes of
   the part's own ``GraphModule`` (it *owns* them; they never travel as arguments, which is what
   ``torch.fx.passes.split_module`` would do). Values from other parts become placeholders.
   Symbolic sizes (``sym_size`` of the batch or sequence dim) are recomputed inside each part from
   a local tensor with the same symbolic dim, so parts exchange tensors only.

The export's ``_guards_fn`` call and runtime shape asserts are dropped: they would pin the first
part to the example's dim ranges (torch.export refuses size 1 for a dynamic dim, while per-sample
costs run at batch 1).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fastserve.errors import CaptureError

_CONTAINERS = (nn.ModuleList, nn.Sequential)
_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
_DROPPED = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range.default,
            torch.ops.aten.sym_constrain_range_for_size.default}


@dataclass
class Part:
    """One node of the captured graph: a run of exported ops and the module built from it."""

    id: str
    module_path: str  # the unit that names the part ("" for the root module's own glue)
    units: list[str]  # every unit merged into this part, in order
    ops: list[fx.Node] = field(default_factory=list)
    layer: int | None = None  # index within its container (a block), else None
    group: str | None = None  # container path of a block, else None
    stateful: bool = False  # touches a parameter or buffer
    module: fx.GraphModule | None = None
    inputs: list[fx.Node] = field(default_factory=list)  # exported values read, in call order
    outputs: list[fx.Node] = field(default_factory=list)  # exported values produced for others


def strip_guards(gm: fx.GraphModule) -> None:
    """Remove the input-shape guard call and runtime scalar asserts from ``ep.module()``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            if hasattr(gm, "_guards_fn"):
                delattr(gm, "_guards_fn")
        elif node.op == "call_function" and node.target in _DROPPED and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def split_parts(gm: fx.GraphModule, model: nn.Module, state: set[str]) -> list[Part]:
    """Cut ``gm`` (``ep.module()`` of ``model``, guards stripped) into parts with modules.

    ``state`` is the set of ``get_attr`` targets that are parameters or buffers (as opposed to
    lifted constants); a run is *stateful* if it reads one.
    """
    containers = _outermost_containers(model)
    expanded = {""} | set(containers)
    for c in containers:
        expanded.update(_ancestors(c))
    parts = _merge(_runs(gm, expanded, containers, state))
    _name(parts)
    _build(gm, parts)
    return [p for p in parts if p.outputs]


# --- units and runs ----------------------------------------------------------------------------


def _outermost_containers(model: nn.Module) -> list[str]:
    paths = [p for p, m in model.named_modules() if isinstance(m, _CONTAINERS) and len(m)]
    return [p for p in paths if not any(_inside(p, q) for q in paths if q != p)]


def _inside(path: str, parent: str) -> bool:
    return parent == "" or path.startswith(parent + ".")


def _ancestors(path: str) -> list[str]:
    bits = path.split(".") if path else []
    return [".".join(bits[:i]) for i in range(len(bits))]


def _unit(node: fx.Node, expanded: set[str]) -> str:
    paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if p]
    for p in paths:
        if p not in expanded:
            return p
    return paths[-1] if paths else ""


def is_scalar(node: fx.Node) -> bool:
    """A symbolic or constant scalar (``sym_size`` and arithmetic on it): recomputed per part."""
    return node.op == "call_function" and isinstance(node.meta.get("val"), _SCALARS)


def _runs(gm: fx.GraphModule, expanded: set[str], containers: list[str],
          state: set[str]) -> list[Part]:
    runs: list[Part] = []
    owner: dict[fx.Node, Part] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or is_scalar(node):
            continue
        src = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(src, fx.Node) and src in owner:
            run = owner[src]  # an element of a multi-output op stays with the op
        else:
            unit = _unit(node, expanded)
            if not runs or runs[-1].units[0] != unit:
                runs.append(Part(id="", module_path=unit, units=[unit]))
            run = runs[-1]
            parent, _, index = unit.rpartition(".")
            if parent in containers and index.isdigit():
                run.layer, run.group = int(index), parent
        run.ops.append(node)
        owner[node] = run
        run.stateful |= any(a.op == "get_attr" and a.target in state
                            for a in node.all_input_nodes)
    return runs


def _merge(runs: list[Part]) -> list[Part]:
    """Stateless runs join the previous part (the leading ones join the first stateful run)."""
    parts: list[Part] = []
    leading: list[Part] = []
    for run in runs:
        if run.stateful or not any(r.stateful for r in runs):
            for lead in leading:
                run.ops[:0] = lead.ops  # leading glue runs before this part's own ops
                run.units[:0] = lead.units
            leading = []
            parts.append(run)
        elif parts:
            parts[-1].ops.extend(run.ops)
            parts[-1].units.extend(u for u in run.units if u not in parts[-1].units)
        else:
            leading.append(run)
    if leading:  # no stateful run at all: one part
        return [_concat(leading)]
    return parts


def _concat(runs: list[Part]) -> Part:
    first = runs[0]
    for r in runs[1:]:
        first.ops.extend(r.ops)
        first.units.extend(u for u in r.units if u not in first.units)
    return first


def _name(parts: list[Part]) -> None:
    """Part ids are module paths; a module run twice (shared weights) gets ``path@1``, ..."""
    seen: dict[str, int] = {}
    for p in parts:
        base = p.module_path or "root"
        k = seen.get(base, 0)
        seen[base] = k + 1
        p.id = base if k == 0 else f"{base}@{k}"


# --- building the part modules -------------------------------------------------------------------


def _build(gm: fx.GraphModule, parts: list[Part]) -> None:
    part_of = {n: p for p in parts for n in p.ops}
    wanted: dict[fx.Node, None] = {}  # values read across parts or returned by the model
    builders = []
    for p in parts:
        builders.append(_PartBuilder(gm, p, part_of, wanted))
        for n in p.ops:
            builders[-1].copy(n)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for n in output.all_input_nodes:
        wanted[n] = None
    for p, b in zip(parts, builders):
        p.outputs = [n for n in p.ops if n in wanted]
        if p.outputs:
            p.module = b.finish(p.outputs)


class _PartBuilder:
    """Copies one part's ops into a fresh graph whose module owns the weights it reads."""

    def __init__(self, gm: fx.GraphModule, part: Part, part_of: dict[fx.Node, Part],
                 wanted: dict[fx.Node, None]) -> None:
        self.gm, self.part, self.part_of, self.wanted = gm, part, part_of, wanted
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.attrs: dict[str, Any] = {}
        self.placeholders: list[fx.Node] = []

    def copy(self, node: fx.Node) -> None:
        # map tensor arguments first, so that a symbolic size the op needs can be read from them
        for a in node.all_input_nodes:
            if not is_scalar(a):
                self.value(a)
        self.env[node] = self.graph.node_copy(node, self.value)

    def value(self, old: fx.Node) -> fx.Node:
        if old in self.env:
            return self.env[old]
        if old.op == "get_attr":
            new = self.graph.get_attr(old.target)
            self.attrs[old.target] = _fetch(self.gm, old.target)
        elif is_scalar(old):
            new = self._scalar(old)
            if not isinstance(new, fx.Node):  # a dim the export specialised to a constant
                return new
        else:
            val = old.meta.get("val")
            if not isinstance(val, torch.Tensor):
                where = self.part_of.get(old)
                raise CaptureError(
                    f"part '{self.part.id}' reads '{old.name}' ({type(val).__name__}) from "
                    f"{'part ' + repr(where.id) if where else 'the model inputs'}; only tensors "
                    f"may cross between captured nodes")
            new = self.graph.placeholder(old.name)
            self.placeholders.append(new)
            self.part.inputs.append(old)
            if old.op != "placeholder":
                self.wanted[old] = None
        new.meta = dict(old.meta)
        self.env[old] = new
        return new

    def _scalar(self, old: fx.Node) -> Any:
        val = old.meta["val"]
        if not isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return val  # specialised to a constant
        if old.target is torch.ops.aten.sym_size.int:
            expr = val.node.expr
            for o, n in list(self.env.items()):
                v = o.meta.get("val")
                if not isinstance(v, torch.Tensor):
                    continue
                for i, s in enumerate(v.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr == expr:
                        return self.graph.call_function(torch.ops.aten.sym_size.int, (n, i))
        # no local tensor carries this size: compute it like the export did (this may read
        # another part's tensor, which then becomes an input of this part)
        return self.graph.node_copy(old, self.value)

    def finish(self, outputs: list[fx.Node]) -> fx.GraphModule:
        placeholders = set(self.placeholders)
        anchor = next(n for n in self.graph.nodes if n not in placeholders)
        for ph in self.placeholders:  # placeholders first, in the order they were needed
            anchor.prepend(ph)
        outs = [self.env[n] for n in outputs]
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        self.graph.lint()
        name = "Captured_" + "".join(c if c.isalnum() else "_" for c in self.part.id)
        gm = fx.GraphModule(self.attrs, self.graph, class_name=name)
        gm.eval()
        return gm


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for bit in target.split("."):
        obj = getattr(obj, bit)
    return obj

