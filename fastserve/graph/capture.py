"""Capture a real ``torch.nn.Module`` into a FastServe :class:`Graph`, one node per module.

Two ways in, one graph type out:

* ``capture(module, example_inputs)`` captures a live module in this process. Its node modules
  (and so its weights) stay in memory with the graph: ``reference``, ``build_nodes`` and
  ``Sharding.module`` use them directly. Such a graph's ``spec.source.factory`` is
  ``"<in-process>"``: other processes run it from its programs and ``weights.checkpoint`` (save
  the model with ``safetensors.torch.save_model`` and capture with
  ``weights=WeightsSpec(checkpoint=path)``). Or pass ``source=SourceSpec(factory, kwargs)`` (with
  ``module`` built by that factory and given ``seed_weights(module, weights.seed)``) to make its
  seeded weights reproducible anywhere.
* A YAML spec with ``source: {torch: "pkg.mod:factory", kwargs: {...}, example_inputs: {...}}``.
  ``compile_captured`` builds the model without weights
  (:func:`~fastserve.graph.capture_weights.skeleton`) and captures it on ``meta``: nothing the
  size of the model is ever allocated.

Either way every node carries its **program** (:mod:`fastserve.graph.program`): its ATen ops as
plain data. Any process rebuilds any subset of nodes from their programs in milliseconds
(:func:`build_parts`, what a rank runs), without capturing the model again, and gives only those
nodes their weights: read from ``weights.checkpoint``, or seeded per module (see
:mod:`fastserve.graph.capture_weights`). With a checkpoint that holds every tensor, no model
code runs there at all.

Capture runs ``torch.export.export(strict=False)`` with dynamic batch and sequence dims (so the
graph serves any batch size and sequence length) and cuts the exported graph with
:mod:`fastserve.graph.fxsplit`. Node ids are module paths (``transformer.h.3``); every node is an
``fx.GraphModule`` owning its weights, whose forward takes the node's input tensors positionally.

**Shared (tied) weights.** A tensor used by several nodes (GPT-2's ``lm_head`` uses the token
embedding) is owned by the first node that uses it and *borrowed* by the others: counted in their
``borrowed_bytes``, not in ``params``. A process that builds the borrowing node without the owner
(a shard) gets the tensor too; in one process the nodes share one tensor.

**Checkpoints** use the model's own ``state_dict`` names (``transformer.h.0.attn.c_attn.weight``);
a tied tensor is found under any of its names, and ``<node id>.<name>`` keys (what
``fastserve.graph.module.state_dict`` writes) are accepted too.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import networkx as nx
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_unflatten  # no public pytree module in torch 2.13
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fastserve.errors import CaptureError, GraphError, SpecError
from fastserve.graph.capture_weights import aliases, materialise, ownership, skeleton
from fastserve.graph import program
from fastserve.graph.fxsplit import Part, split_parts, strip_guards
from fastserve.graph.graph import Graph, tensor_info, verify
from fastserve.graph.dtypes import dtype_name, torch_dtype
from fastserve.graph.memory import ensure_memory
from fastserve.graph.spec import (GraphSpec, InputSpec, NodeSpec, SourceSpec, WeightsSpec,
                                  tensor_name)

IN_PROCESS = "<in-process>"

# id(SourceSpec) -> (weak ref to it, the capture): the live modules of in-process captures,
# dropped when the last graph/spec holding that SourceSpec is garbage collected.
_LIVE: dict[int, tuple[weakref.ref, _Capture]] = {}


@dataclass(frozen=True)
class _Decl:
    """A graph input: dims are ints (static) or names (dynamic: ``batch``, ``seq``, ...)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    high: int | None = None


@dataclass(frozen=True)
class _Capture:
    """An exported, split model: its parts in order and how graph inputs/outputs map to them."""

    parts: tuple[Part, ...]
    inputs: tuple[_Decl, ...]
    names: dict[fx.Node, str]  # exported value -> graph tensor name
    outputs: tuple[str, ...]
    aliases: dict[str, list[str]]  # state name -> every name of that tensor in the model
    # buffer values of a model captured on meta (as built; see capture_weights.skeleton)
    buffers: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


# --- public API -----------------------------------------------------------------------------------


def capture(module: nn.Module, example_inputs: Mapping[str, torch.Tensor] | tuple, *,
            name: str | None = None, dynamic: bool | Mapping[Any, Mapping[int, str]] = True,
            source: SourceSpec | None = None, weights: WeightsSpec | None = None) -> Graph:
    """Capture ``module`` into a costed, verified graph at module granularity.

    ``example_inputs`` are the forward's tensor arguments, by keyword (a dict) or position (a
    tuple). ``dynamic``: ``True`` makes dim 0 of every input ``batch`` and dim 1 of integer/bool
    inputs (token ids, masks) ``seq``; ``False`` makes only ``batch`` dynamic; a mapping
    ``{input name or position: {dim: name}}`` names the dynamic dims explicitly. The module is
    captured in eval mode; afterwards every submodule's own train/eval flag is restored.

    Example::

        graph = capture(hf_gpt2(), {"input_ids": torch.randint(0, 128, (2, 16))})
        logits = reference(graph, {"input_ids": ids})["lm_head"]  # any batch size and length

    ``graph.outputs`` follow the order of the model's flattened outputs (a ``ModelOutput``'s
    fields, a tuple's items).
    """
    if isinstance(example_inputs, Mapping):
        keyed = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        keyed = {i: t for i, t in enumerate(example_inputs)}
    else:
        raise CaptureError(f"example_inputs must be a dict of tensors or a tuple, got "
                           f"{type(example_inputs).__name__}")
    for k, t in keyed.items():
        if not isinstance(t, torch.Tensor):
            raise CaptureError(f"example input {k!r} is a {type(t).__name__}; capture takes "
                               f"tensor inputs only (fix other arguments with a wrapper module "
                               f"or the model's config)")
    dims = _dynamic_dims(keyed, dynamic)
    padded = {k: _at_least_two(t, dims[k]) for k, t in keyed.items()}
    # one flag per submodule: module.train(was_training) would set them all, turning an
    # eval-mode submodule (a frozen encoder inside a training wrapper) back to train mode
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        cap = _capture(module, padded, dims, highs={k: _high(t) for k, t in keyed.items()})
    finally:
        for m, training in modes:
            m.training = training
    sizes = _example_sizes(keyed, dims)
    decls = {d.name: {"shape": list(d.shape), "dtype": d.dtype, "high": d.high}
             for d in cap.inputs}
    if source is None:
        source = SourceSpec(IN_PROCESS, {}, decls)
    elif not source.example_inputs:
        source = dataclasses.replace(source, example_inputs=decls)
    spec = GraphSpec(name or type(module).__name__, (), (), (), sizes,
                     weights or WeightsSpec(), source, None)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    graph = _graph(cap, spec, sizes, device)
    _LIVE[id(source)] = (weakref.ref(source), cap)
    weakref.finalize(source, _LIVE.pop, id(source), None)
    return graph


def compile_captured(spec: GraphSpec, dims: Mapping[str, int] | None = None) -> Graph:
    """Compile a spec with a ``source:`` factory. The model is built without weights
    (:func:`~fastserve.graph.capture_weights.skeleton`) and captured on ``meta``: costs come
    from shapes alone, and no weight is ever allocated."""
    source = _shippable(spec)
    sizes = {**spec.dims, **(dims or {})}
    model, buffers = _skeleton(source, spec.file, seed=spec.weights.seed)
    try:
        cap = _capture_source(model, source, sizes, spec.file)
    except CaptureError as e:
        raise CaptureError(f"{e}. A spec's model is captured without its weights (on the meta "
                           f"device), so its forward may not read tensor values; capture such "
                           f"a model in Python instead: fastserve.graph.capture(model, "
                           f"example_inputs)") from None
    cap = dataclasses.replace(cap, buffers=buffers)
    return _graph(cap, spec, sizes, torch.device("meta"))


def live_model(spec: GraphSpec, accept: Callable[[nn.Module], object] = lambda _m: None
               ) -> nn.Module:
    """The factory's whole model with the graph's weights (seeded per module, or read from its
    checkpoint), in eval mode, in this process: for rewriting a captured model
    (:mod:`fastserve.graph.hf`). A deployment never holds the whole model. ``accept`` sees the
    model before it has weights (and may raise)."""
    source = _shippable(spec)
    built = _skeleton(source, spec.file, seed=spec.weights.seed)
    model = built[0]
    accept(model)
    materialise({"": model}, aliases(model), spec.weights, base=spec.file, model=lambda: built)
    return model.eval()


def build_captured_nodes(graph: Graph, node_ids: Iterable[str],
                         weights: WeightsSpec | None = None) -> dict[str, nn.Module]:
    """The modules of ``node_ids`` of a captured graph, with weights, in eval mode.

    For an in-process capture these are the captured modules themselves (copies when a checkpoint
    is given). Otherwise they are rebuilt from the programs the graph holds and only they get
    their weights (see :func:`build_parts`).
    """
    ids = list(node_ids)
    weights = weights or graph.spec.weights
    source = graph.spec.source
    if source is None:
        raise CaptureError(f"graph '{graph.name}' was not captured from a torch model")
    unknown = [i for i in ids if i not in graph.nx]
    if unknown:
        raise CaptureError(f"graph '{graph.name}' has no node(s) {unknown}")
    entry = _LIVE.get(id(source))
    if entry is None or entry[0]() is not source:
        _shippable(graph.spec)
        ensure_memory(graph, ids, "the weights",
                      lambda d: d["params_bytes"] + d["borrowed_bytes"])
        steps = [(n, graph.node(n)["inputs"], [t.name for t in graph.node(n)["outputs"]])
                 for n in ids]
        return build_parts(steps, {n: graph.node(n).get("program") for n in ids}, weights,
                           source=source, sizes=graph.dims, file=graph.spec.file,
                           name=graph.name, count=len(graph))
    cap = entry[1]
    modules = {p.id: p.module for p in cap.parts if p.id in ids}
    if weights.checkpoint:  # the file's tensors, not the live model's: copies
        modules = copy.deepcopy(modules)  # one call keeps tied tensors shared
        materialise(modules, cap.aliases, weights, base=graph.spec.file)
    for m in modules.values():
        m.eval()
    return modules


def build_parts(steps: Iterable[tuple[str, Iterable[str], Iterable[str]]],
                programs: Mapping[str, dict | None], weights: WeightsSpec, *,
                source: SourceSpec | None, sizes: Mapping[str, int], file: str | None = None,
                name: str = "", count: int | None = None,
                before_weights: Callable[[], object] = lambda: None,
                check_code: Callable[[str], object] = lambda _factory: None
                ) -> dict[str, nn.Module]:
    """The nodes of ``steps`` of a captured graph, and only their weights: how a rank builds
    its shard. The whole model is never in memory; its own tensors are.

    ``steps`` are ``(node id, tensors it reads, tensors it writes)`` as the driver compiled
    them, ``programs`` their programs (:mod:`fastserve.graph.program`). The model is built from
    ``source`` (without weights) only when something needs it: seeded weights, a buffer the
    model computes when built, or a node without a program, for which the model is captured
    again, and must give the same nodes (``count``: the graph's number of nodes); and only
    after ``check_code(factory)`` accepted running the factory. With a checkpoint that holds
    every tensor, no model code runs at all. ``before_weights`` runs once everything but the
    weights is in memory.
    """
    steps = [(n, tuple(ins), tuple(outs)) for n, ins, outs in steps]
    built: list = []

    def model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The factory's model without weights, and its buffers; built at most once."""
        if not built:
            if source is None or source.factory.startswith("<"):
                raise CaptureError(f"graph '{name}' has no factory to build its model from "
                                   f"(it was captured from a live module): its tensors must "
                                   f"all come from weights.checkpoint")
            check_code(source.factory)
            built.append(_skeleton(source, file, seed=weights.seed))
        return built[0]

    if all(programs.get(n) for n, _, _ in steps):
        modules = {n: program.decode(programs[n], where=f"node '{n}' program")
                   for n, _, _ in steps}
        aliases = {k: v for n, _, _ in steps for k, v in program.aliases_of(programs[n]).items()}
        for n, ins, _ in steps:
            takes = sum(1 for x in modules[n].graph.nodes if x.op == "placeholder")
            if takes != len(ins):
                raise CaptureError(f"node '{n}': its program takes {takes} inputs, the graph "
                                   f"gives it {len(ins)}")
    else:  # a node without a program: capture again, without weights
        root, _ = model()
        cap = _capture_source(root, source, sizes, file)
        parts = {p.id: p for p in cap.parts}
        for n, ins, outs in steps:
            p = parts.get(n)
            if p is None or tuple(cap.names[v] for v in p.inputs) != ins or \
                    tuple(cap.names[v] for v in p.outputs) != outs or \
                    (count is not None and count != len(cap.parts)):
                raise CaptureError(f"rebuilding graph '{name}' from '{source.factory}' gave "
                                   f"different nodes than the compiled graph (at node '{n}'); "
                                   f"the factory must build the same model in every process")
        modules = {n: parts[n].module for n, _, _ in steps}
        for m in modules.values():
            _move_program(m, torch.device("cpu"))
        aliases = cap.aliases
    if not weights.checkpoint:
        model()  # seeded weights need the model's initialisers: code, not weights
    before_weights()
    materialise(modules, aliases, weights, base=file, model=model)
    for m in modules.values():
        m.eval()
    return modules


def load_factory(target: str, *, file: str | None = None) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:factory"``, or raise a :class:`SpecError` naming what failed.

    Imports and so runs code: a spec read from a file reaches here only after
    :func:`fastserve.trust.check_code` accepted the factory while the spec was loaded; a
    ``GraphSpec`` built in Python is the user's own code and is not checked again.
    """
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise SpecError(f"'{target}' is not of the form 'package.module:factory'", file=file,
                        key="source.torch")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"cannot import module '{mod_name}' (from '{target}'): {e}", file=file,
                        key="source.torch") from None
    for bit in attr.split("."):
        if not hasattr(obj, bit):
            raise SpecError(f"module '{mod_name}' has no attribute '{attr}' (from '{target}')",
                            file=file, key="source.torch")
        obj = getattr(obj, bit)
    if not callable(obj):
        raise SpecError(f"'{target}' is a {type(obj).__name__}, not a callable factory",
                        file=file, key="source.torch")
    return obj


# --- capture ------------------------------------------------------------------------------------


def _capture(module: nn.Module, examples: dict[Any, torch.Tensor],
             dims: dict[Any, dict[int, str]], highs: dict[Any, int | None]) -> _Capture:
    from torch.export import Dim, export

    positional = all(isinstance(k, int) for k in examples)
    shapes = {k: ({i: Dim.AUTO for i in dims[k]} or None) for k in examples}
    args = tuple(examples.values()) if positional else ()
    kwargs = {} if positional else examples
    try:
        ep = export(module, args, kwargs, strict=False,
                    dynamic_shapes=tuple(shapes.values()) if positional else shapes)
    except Exception as e:  # torch.export raises many types; the first line says what failed
        raise CaptureError(f"torch.export could not capture {type(module).__name__}: "
                           f"{_first_line(e)} (capture needs a forward that torch.export can "
                           f"trace with strict=False)") from None
    gm = ep.module()
    strip_guards(gm)
    sig = ep.graph_signature
    state = set(sig.inputs_to_parameters.values()) | set(sig.inputs_to_buffers.values())
    parts = split_parts(gm, module, state)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(examples):
        raise CaptureError(f"the export of {type(module).__name__} takes {len(placeholders)} "
                           f"inputs, {len(examples)} example inputs were given")
    # the export orders keyword inputs by the forward's signature, not by the dict
    flat_args, flat_kwargs = tree_unflatten(list(range(len(placeholders))), ep.call_spec.in_spec)
    position = dict(enumerate(flat_args)) if positional else flat_kwargs
    names: dict[fx.Node, str] = {}
    inputs = []
    for key, t in examples.items():
        ph = placeholders[position[key]]
        input_name = ph.name if positional else key
        names[ph] = input_name
        inputs.append(_decl(input_name, ph, t, dims[key], highs[key]))
    for p in parts:
        for k, n in enumerate(p.outputs):
            names[n] = tensor_name(p.id, k, len(p.outputs))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = []
    for n in output.all_input_nodes:
        if n.op == "placeholder":
            raise CaptureError(f"{type(module).__name__} returns its input '{names[n]}' "
                               f"unchanged; a captured graph's outputs must be computed")
        outputs.append(names[n])
    return _Capture(tuple(parts), tuple(inputs), names, tuple(outputs), aliases(module))


def _decl(name: str, ph: fx.Node, example: torch.Tensor, dims: dict[int, str],
          high: int | None) -> _Decl:
    """The input's declared shape: a dynamic dim the export specialised becomes its size."""
    val = ph.meta.get("val")
    shape: list[int | str] = list(example.shape)
    for i, dim_name in dims.items():
        if isinstance(val.shape[i], torch.SymInt):
            shape[i] = dim_name
        elif dim_name == "batch":
            raise CaptureError(f"the model fixes the batch dim of input '{name}' to "
                               f"{val.shape[i]}; FastServe needs a dynamic batch dim")
    return _Decl(name, tuple(shape), dtype_name(example.dtype), high)


def _capture_source(model: nn.Module, source: SourceSpec, sizes: Mapping[str, int],
                    file: str | None) -> _Capture:
    """Capture a factory-built model with example inputs made from the spec's declarations."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    examples, dims, highs = {}, {}, {}
    for name, decl in source.example_inputs.items():
        shape, named = [], {}
        for i, d in enumerate(decl["shape"]):
            if isinstance(d, str):
                if d != "batch" and d not in sizes:
                    raise SpecError(f"example input '{name}' uses dim '{d}' with no size; give "
                                    f"it one under 'dims:'", file=file, key="dims")
                named[i] = d
                # torch.export specialises a dim whose example size is 0 or 1
                shape.append(max(2, 2 if d == "batch" else sizes[d]))
            else:
                shape.append(d)
        dtype = torch_dtype(decl.get("dtype", "float32"))
        examples[name] = torch.zeros(shape, dtype=dtype, device=device)
        dims[name], highs[name] = named, decl.get("high")
    return _capture(model, examples, dims, highs)


def _move_program(gm: fx.GraphModule, device: torch.device) -> None:
    """Make the ops of a program captured on ``meta`` create their tensors on ``device``
    (``arange``, ``zeros``, ``to`` ... carry the capture's device as an argument)."""
    def swap(a: Any) -> Any:
        return device if isinstance(a, torch.device) and a.type == "meta" else a

    for node in gm.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()


def _skeleton(source: SourceSpec, file: str | None,
              seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The factory's model without weights, and its buffers (see ``capture_weights.skeleton``).
    The seed is set anyway: a factory may draw random numbers for more than weights."""
    factory = load_factory(source.factory, file=file)

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = factory(**source.kwargs)
            except CaptureError:
                raise
            except Exception as e:  # the factory is user code: report, do not crash
                raise CaptureError(f"factory '{source.factory}' raised {type(e).__name__}: "
                                   f"{_first_line(e)}") from None
        if not isinstance(model, nn.Module):
            raise CaptureError(f"factory '{source.factory}' returned a {type(model).__name__}, "
                               f"not a torch.nn.Module")
        return model

    model, buffers = skeleton(build)
    return model.eval(), buffers


def _shippable(spec: GraphSpec) -> SourceSpec:
    source = spec.source
    if source is None or source.factory.startswith("<"):
        raise CaptureError(f"graph '{spec.name}' was captured from a live module and has no "
                           f"factory to rebuild it from, so it runs only in the process that "
                           f"captured it; to ship it to other processes, capture with "
                           f"source=SourceSpec('package.module:factory', kwargs)")
    return source


# --- costs and the graph value ------------------------------------------------------------------


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # torch's FLOP table knows the CUDA attention kernels but not the CPU one that
    # scaled_dot_product_attention dispatches to on fake CPU tensors; count it the same way
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _graph(cap: _Capture, spec: GraphSpec, sizes: Mapping[str, int],
           device: torch.device) -> Graph:
    """Cost every part at batch 1 on fake tensors (no compute, no allocation) and build the
    graph, node and edge attributes exactly like :mod:`fastserve.graph.compiler`."""
    sizes = {**sizes, "batch": 1}
    g = nx.DiGraph()
    owner: dict[int, str] = {}  # id(tensor) -> node that owns it
    keep: list[torch.Tensor] = []  # keeps ids above unique while we count
    nodes = []
    programs = {p.id: _program(p, cap) for p in cap.parts}  # real values, not fake ones
    with FakeTensorMode(allow_non_fake_inputs=True):
        env = {d.name: torch.empty([sizes[x] if isinstance(x, str) else x for x in d.shape],
                                   dtype=torch_dtype(d.dtype), device=device)
               for d in cap.inputs}
        infos_in = tuple(tensor_info(d.name, env[d.name]) for d in cap.inputs)
        for p in cap.parts:
            ins = [cap.names[n] for n in p.inputs]
            counter = FlopCounterMode(display=False, custom_mapping=_FLOP_FORMULAS)
            try:
                with counter, torch.no_grad():
                    out = p.module(*(env[i] for i in ins))
            except Exception as e:  # a part that cannot run at batch 1 is a capture bug
                raise CaptureError(f"captured node '{p.id}' fails at batch 1: "
                                   f"{_first_line(e)}") from None
            outs = out if isinstance(out, tuple) else (out,)
            infos = []
            for n, t in zip(p.outputs, outs):
                env[cap.names[n]] = t
                infos.append(tensor_info(cap.names[n], t))
            params, params_bytes, borrowed = ownership(p, owner, keep)
            args = {"module_path": p.module_path, "modules": list(p.units),
                    "ops": len(p.ops)}
            g.add_node(p.id, op="captured", args=args, inputs=tuple(ins), outputs=tuple(infos),
                       program=programs[p.id],
                       params=params, params_bytes=params_bytes, borrowed_bytes=borrowed,
                       flops=int(counter.get_total_flops()),
                       out_bytes=sum(t.bytes for t in infos), layer=p.layer, group=p.group,
                       line=None, measured=None)
            nodes.append(NodeSpec(p.id, "captured", args, tuple(ins), p.layer, p.group))
    producer = {t.name: n for n in g.nodes for t in g.nodes[n]["outputs"]}
    bytes_of = {t.name: t.bytes for n in g.nodes for t in g.nodes[n]["outputs"]}
    for n in list(g.nodes):
        for ref in g.nodes[n]["inputs"]:
            src = producer.get(ref)
            if src is None:
                continue
            if g.has_edge(src, n):
                e = g.edges[src, n]
                e["tensors"] += (ref,)
                e["bytes"] += bytes_of[ref]
            else:
                g.add_edge(src, n, tensors=(ref,), bytes=bytes_of[ref])
    inputs = tuple(InputSpec(d.name, d.shape, d.dtype, d.high) for d in cap.inputs)
    spec = dataclasses.replace(spec, inputs=inputs, nodes=tuple(nodes), outputs=cap.outputs,
                               dims={k: v for k, v in sizes.items() if k != "batch"})
    try:
        return verify(Graph(spec.name, g, infos_in, cap.outputs, spec, dict(sizes)))
    except GraphError as e:
        raise CaptureError(f"captured graph '{spec.name}' is inconsistent: {e}") from None


# --- helpers --------------------------------------------------------------------------------------


def _program(part: Part, cap: _Capture) -> dict | None:
    """The part's program as data, or None where it uses what cannot be shipped (it then runs
    only where the model can be captured again)."""
    try:
        return program.encode(part.module, cap.aliases, cap.buffers)
    except program.ProgramError:
        return None


def _dynamic_dims(examples: Mapping[Any, torch.Tensor],
                  dynamic: bool | Mapping[Any, Mapping[int, str]]) -> dict[Any, dict[int, str]]:
    if isinstance(dynamic, Mapping):
        for k, dims in dynamic.items():
            if k not in examples:
                raise CaptureError(f"dynamic names input {k!r}, which is not an example input")
            for i in dims:
                if not isinstance(i, int) or not 0 <= i < examples[k].dim():
                    raise CaptureError(f"dynamic dim {i!r} of input {k!r} is out of range for "
                                       f"shape {tuple(examples[k].shape)}")
        return {k: dict(dynamic.get(k, {})) for k in examples}
    out = {}
    for k, t in examples.items():
        dims = {0: "batch"} if t.dim() else {}
        if dynamic and t.dim() >= 2 and not t.is_floating_point():
            dims[1] = "seq"
        out[k] = dims
    return out


def _at_least_two(t: torch.Tensor, dims: Mapping[int, str]) -> torch.Tensor:
    """torch.export specialises dims of size 0 or 1: repeat such dynamic dims to size 2."""
    reps = [2 if i in dims and t.shape[i] == 1 else 1 for i in range(t.dim())]
    return t.repeat(*reps) if any(r > 1 for r in reps) else t


def _example_sizes(examples: Mapping[Any, torch.Tensor],
                   dims: Mapping[Any, Mapping[int, str]]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for k, t in examples.items():
        for i, name in dims[k].items():
            if name != "batch" and sizes.setdefault(name, t.shape[i]) != t.shape[i]:
                raise CaptureError(f"dim '{name}' is {sizes[name]} in one example input and "
                                   f"{t.shape[i]} in input {k!r}")
    return sizes


def _high(t: torch.Tensor) -> int | None:
    if t.is_floating_point() or t.dtype == torch.bool or t.numel() == 0:
        return None
    return max(2, int(t.max()) + 1)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
