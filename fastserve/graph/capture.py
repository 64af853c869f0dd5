"""Capture a real ``torch.nn.Module`` into a FastServe :class:`Graph`, one node per module.

Two ways in, one graph type out:

* ``capture(module, example_inputs)`` captures a live module in this process. Its node modules
  (and so its weights) stay in memory with the graph: ``reference``, ``build_nodes`` and
  ``Sharding.module`` use them directly. Such a graph's ``spec.source.factory`` is
  ``"<in-process>"``: it cannot be rebuilt in another process. Pass ``source=SourceSpec(factory,
  kwargs)`` (with ``module`` built by that factory after ``torch.manual_seed(weights.seed)``) to
  make it shippable.
* A YAML spec with ``source: {torch: "pkg.mod:factory", kwargs: {...}, example_inputs: {...}}``.
  ``compile_captured`` builds the model on the ``meta`` device (no weights allocated) for the
  costs; ``build_captured_nodes`` rebuilds it in any process, deterministically
  (``torch.manual_seed(weights.seed)`` then ``factory(**kwargs)``), or loads ``weights.checkpoint``
  into the requested nodes only, and returns just those nodes' modules.

Capture runs ``torch.export.export(strict=False)`` with dynamic batch and sequence dims (so the
graph serves any batch size and sequence length) and cuts the exported graph with
:mod:`fastserve.graph.fxsplit`. Node ids are module paths (``transformer.h.3``); every node is an
``fx.GraphModule`` owning its weights, whose forward takes the node's input tensors positionally.

**Shared (tied) weights.** A tensor used by several nodes (GPT-2's ``lm_head`` uses the token
embedding) is owned by the first node that uses it and *borrowed* by the others: counted in their
``borrowed_bytes``, not in ``params``. Each node module holds a reference to the tensor, so a node
runs standalone: a process that builds the borrowing node without the owner (a shard) gets its own
copy; in one process the nodes share one tensor.

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
from fastserve.graph.capture_weights import aliases, load_checkpoint, ownership
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
    """Compile a spec with a ``source:`` factory: the model is built on ``meta`` for costs."""
    source = _shippable(spec)
    sizes = {**spec.dims, **(dims or {})}
    factory = load_factory(source.factory, file=spec.file)
    model = _build_model(factory, source, seed=spec.weights.seed, device="meta")
    try:
        cap = _capture_source(model, source, sizes, spec.file)
    except CaptureError:
        if next((p.is_meta for p in model.parameters()), False) is False:
            raise
        # some forwards read tensor values (meta tensors have none): capture a real model
        model = _build_model(factory, source, seed=spec.weights.seed, device="cpu")
        cap = _capture_source(model, source, sizes, spec.file)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return _graph(cap, spec, sizes, device)


def build_captured_nodes(graph: Graph, node_ids: Iterable[str],
                         weights: WeightsSpec | None = None) -> dict[str, nn.Module]:
    """The modules of ``node_ids`` of a captured graph, with weights, in eval mode.

    For an in-process capture these are the captured modules themselves (copies when a checkpoint
    is given). Otherwise the model is rebuilt from ``graph.spec.source`` (seeded), captured
    again, and only the requested nodes are kept; with ``weights.checkpoint`` only their tensors
    are read from the file.
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
    if entry is not None and entry[0]() is source:
        cap = entry[1]
        modules = {p.id: p.module for p in cap.parts if p.id in ids}
        if weights.checkpoint:
            modules = copy.deepcopy(modules)  # one call keeps tied tensors shared
    else:
        _shippable(graph.spec)
        factory = load_factory(source.factory, file=graph.spec.file)
        # the whole model is rebuilt, then cut
        ensure_memory(graph, graph.order, "the weights", lambda d: d["params_bytes"])
        model = _build_model(factory, source, seed=weights.seed, device="cpu")
        sizes = {k: v for k, v in graph.dims.items() if k != "batch"}
        cap = _capture_source(model, source, sizes, graph.spec.file)
        _check_same(graph, cap)
        modules = {p.id: p.module for p in cap.parts if p.id in ids}
    if weights.checkpoint:
        load_checkpoint(modules, cap.aliases, weights.checkpoint, graph.spec.file)
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


def _build_model(factory: Callable[..., nn.Module], source: SourceSpec, *, seed: int,
                 device: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with torch.device(device):
                model = factory(**source.kwargs)
        except CaptureError:
            raise
        except Exception as e:  # the factory is user code: report, do not crash
            if device == "meta":  # some models cannot be built on meta: build them for real
                return _build_model(factory, source, seed=seed, device="cpu")
            raise CaptureError(f"factory '{source.factory}' raised {type(e).__name__}: "
                               f"{_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise CaptureError(f"factory '{source.factory}' returned a {type(model).__name__}, not "
                           f"a torch.nn.Module")
    return model.eval()


def _shippable(spec: GraphSpec) -> SourceSpec:
    source = spec.source
    if source is None or source.factory.startswith("<"):
        raise CaptureError(f"graph '{spec.name}' was captured from a live module and has no "
                           f"factory to rebuild it from, so it runs only in the process that "
                           f"captured it; to ship it to other processes, capture with "
                           f"source=SourceSpec('package.module:factory', kwargs)")
    return source


def _check_same(graph: Graph, cap: _Capture) -> None:
    """A rebuilt capture must cut the model exactly like the compiled graph did."""
    for p in cap.parts:
        if p.id not in graph.nx:
            break
        d = graph.node(p.id)
        ins = tuple(cap.names[n] for n in p.inputs)
        outs = tuple(cap.names[n] for n in p.outputs)
        if ins != tuple(d["inputs"]) or outs != tuple(t.name for t in d["outputs"]):
            break
    else:
        if len(cap.parts) == len(graph):
            return
    raise CaptureError(f"rebuilding graph '{graph.name}' from '{graph.spec.source.factory}' "
                       f"gave different nodes than the compiled graph; the factory must build "
                       f"the same model in every process")


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
