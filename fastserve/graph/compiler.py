"""Spec -> costed Graph, on the ``meta`` device: compiling never allocates weights.

Each node's module is built on ``meta`` and run once on meta tensors of batch 1 under torch's
``FlopCounterMode``; that yields output shapes and dtypes (checking that the node accepts its
inputs), parameter counts and FLOPs per sample. Identical nodes (the layers of a ``repeat``)
are costed once.
"""

from __future__ import annotations

from typing import Any, Mapping

import networkx as nx
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastserve.errors import GraphError, SpecError
from fastserve.graph.graph import Graph, tensor_info, verify
from fastserve.graph.dtypes import dtype_name, torch_dtype
from fastserve.graph.ops import LMHead, build_module, get_op
from fastserve.graph.spec import GraphSpec, NodeSpec, split_ref, tensor_name



def compile_graph(spec: GraphSpec, dims: Mapping[str, int] | None = None) -> Graph:
    """Compile a validated spec into a costed, verified :class:`Graph`.

    ``dims`` overrides the spec's default sizes of symbolic dimensions (``seq``, ...); ``batch``
    is always 1 because costs are per sample.
    """
    if spec.source is not None:
        from fastserve.graph.capture import compile_captured

        return compile_captured(spec, dims)
    known = spec.dim_names
    unknown = sorted(set(dims or {}) - known)
    if unknown:  # a misspelt --dim would otherwise change nothing, silently
        raise SpecError(f"dim(s) {', '.join(unknown)} are not in the spec; its dims: "
                        f"{', '.join(sorted(known - {'batch'})) or 'none'}", file=spec.file,
                        key="dims")
    sizes = {**spec.dims, **(dims or {}), "batch": 1}
    env: dict[str, torch.Tensor] = {}  # tensor name -> meta tensor
    inputs = []
    for inp in spec.inputs:
        shape = []
        for d in inp.shape:
            if isinstance(d, str) and d not in sizes:
                raise SpecError(f"input '{inp.name}' uses dim '{d}' with no size; give it one "
                                f"under 'dims:'", file=spec.file, line=inp.line, key="dims")
            shape.append(sizes[d] if isinstance(d, str) else d)
        try:  # meta: no memory, but torch still refuses sizes whose element count overflows
            env[inp.name] = torch.empty(shape, dtype=torch_dtype(inp.dtype), device="meta")
        except (RuntimeError, ValueError, OverflowError) as e:
            raise SpecError(f"input '{inp.name}' of shape {shape} is not a valid tensor: "
                            f"{_first_line(e)}", file=spec.file, line=inp.line,
                            key=f"inputs.{inp.name}.shape") from None
        inputs.append(tensor_info(inp.name, env[inp.name]))

    g = nx.DiGraph()
    producer: dict[str, str | None] = {t.name: None for t in inputs}
    cache: dict[Any, tuple[int, int, int, tuple]] = {}
    for node in spec.nodes:
        refs = [_resolve(spec, node, r, producer) for r in node.inputs]
        args_in = [env[r] for r in refs]
        key = (node.op, repr(sorted(node.args.items())),
               tuple((tuple(a.shape), a.dtype) for a in args_in))
        if key not in cache:
            cache[key] = _cost(spec, node, args_in)
        params, params_bytes, borrowed, flops, outs = cache[key]
        n_out = len(outs)
        infos = []
        for i, t in enumerate(outs):
            name = tensor_name(node.id, i, n_out)
            env[name] = t
            producer[name] = node.id
            infos.append(tensor_info(name, t))
        g.add_node(node.id, op=node.op, args=dict(node.args), inputs=tuple(refs),
                   outputs=tuple(infos), params=params, params_bytes=params_bytes,
                   borrowed_bytes=borrowed, flops=flops,
                   out_bytes=sum(t.bytes for t in infos), layer=node.layer, group=node.group,
                   line=node.line, measured=None)
        for r in refs:
            src = producer[r]
            if src is None:
                continue
            if g.has_edge(src, node.id):
                e = g.edges[src, node.id]
                if r not in e["tensors"]:
                    e["tensors"] = e["tensors"] + (r,)
                    e["bytes"] += env_bytes(env[r])
            else:
                g.add_edge(src, node.id, tensors=(r,), bytes=env_bytes(env[r]))
    outputs = tuple(_resolve(spec, None, o, producer, i) for i, o in enumerate(spec.outputs))
    graph = Graph(spec.name, g, tuple(inputs), outputs, spec, dict(sizes))
    try:
        return verify(graph)
    except GraphError as e:
        raise SpecError(str(e), file=spec.file) from None


def env_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _resolve(spec: GraphSpec, node: NodeSpec | None, ref: str,
             producer: dict[str, str | None], output: int = 0) -> str:
    """Canonical tensor name of a reference, or a SpecError naming the node's line (or the
    line of entry ``output`` of the spec's outputs)."""
    if ref in producer:
        return ref
    base, idx = split_ref(ref)
    if idx == 0 and base in producer:  # "x:0" of a single-output node
        return base
    if f"{ref}:0" in producer:  # bare name of a multi-output node means its first output
        return f"{ref}:0"
    if node is not None:
        raise SpecError(f"node '{node.id}' reads '{ref}', which is not a graph input or the "
                        f"output of an earlier node", file=spec.file, line=node.line,
                        key="inputs")
    line = spec.output_lines[output] if output < len(spec.output_lines) else None
    raise SpecError(f"outputs[{output}] reads '{ref}', which is not a graph input or the output "
                    f"of a node", file=spec.file, line=line, key=f"outputs[{output}]")


def _cost(spec: GraphSpec, node: NodeSpec, args_in: list[torch.Tensor]):
    op = get_op(node.op)
    lo, hi = op.inputs
    if len(args_in) < lo or (hi is not None and len(args_in) > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}..{hi}"
        raise SpecError(f"op '{node.op}' takes {want} input(s), node '{node.id}' gives "
                        f"{len(args_in)}", file=spec.file, line=node.line, key="inputs")
    try:
        with torch.device("meta"):
            module = build_module(node.op, node.args)
    except SpecError as e:
        raise SpecError(f"node '{node.id}': {e.reason}", file=spec.file, line=node.line,
                        key="args") from None
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as e:
        raise SpecError(f"node '{node.id}' (op '{node.op}'): bad arguments: {_first_line(e)}",
                        file=spec.file, line=node.line, key="args") from None
    if isinstance(module, LMHead) and module.tie is not None:
        tied = next((n for n in spec.nodes if n.id == module.tie), None)
        if tied is None:
            raise SpecError(f"node '{node.id}' ties its weight to '{module.tie}', which is not "
                            f"a node", file=spec.file, line=node.line, key="args.tie")
        vocab, d_model = node.args["vocab_size"], node.args["d_model"]
        module.weight = torch.nn.Parameter(torch.empty(vocab, d_model, device="meta"))
        own = [p for k, p in module.named_parameters() if k != "weight"]
        borrowed = vocab * d_model * module.weight.element_size()
    else:
        own = list(module.parameters())
        borrowed = 0
    params = sum(p.numel() for p in own)
    params_bytes = sum(p.numel() * p.element_size() for p in own)
    params_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            out = module(*args_in)
    except Exception as e:  # any failure here is the spec's shapes not fitting the op
        if node.op == "module":
            # a user's module may look at values (data-dependent control flow), which meta
            # tensors cannot answer: cost it on the CPU with zeros, its weights only
            return _cost_on_cpu(spec, node, args_in, params, params_bytes, borrowed)
        shapes = ", ".join(f"{tuple(a.shape)}:{dtype_name(a.dtype)}" for a in args_in)
        raise SpecError(f"node '{node.id}' (op '{node.op}') cannot take inputs of shape "
                        f"[{shapes}]: {_first_line(e)}", file=spec.file, line=node.line,
                        key="inputs") from None
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return params, params_bytes, borrowed, int(counter.get_total_flops()), outs


def _cost_on_cpu(spec: GraphSpec, node: NodeSpec, args_in: list[torch.Tensor], params: int,
                 params_bytes: int, borrowed: int):
    module = build_module(node.op, node.args)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            out = module(*(torch.zeros(a.shape, dtype=a.dtype) for a in args_in))
    except Exception as e:
        shapes = ", ".join(f"{tuple(a.shape)}:{dtype_name(a.dtype)}" for a in args_in)
        raise SpecError(f"node '{node.id}' (module '{node.args['target']}') cannot take inputs "
                        f"of shape [{shapes}]: {_first_line(e)}", file=spec.file, line=node.line,
                        key="inputs") from None
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    outs = tuple(t.to("meta") for t in outs)
    return params, params_bytes, borrowed, int(counter.get_total_flops()), outs


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
