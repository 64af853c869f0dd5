"""YAML graph specs: safe loading with line numbers, validation, ``$param`` substitution and
``repeat`` expansion. The Python builder produces the same raw document and shares the validator.

A spec document::

    name: mlp
    dims: {seq: 128}                 # default sizes of symbolic dims (batch is always free)
    params: {hidden: 256, depth: 4}  # substituted into args as $hidden or ${hidden * 4}
    inputs:
      x: {shape: [batch, 64], dtype: float32}
    weights: {seed: 0}               # or {checkpoint: weights.safetensors}
    nodes:
      - {id: fc_in, op: linear, args: {in_features: 64, out_features: $hidden}, inputs: [x]}
      - repeat: $depth               # unrolled into block.0 .. block.3
        id: block
        input: fc_in                 # what the first iteration's $in is
        nodes:
          - {id: fc, op: linear, args: {in_features: $hidden, out_features: $hidden}, inputs: [$in]}
          - {id: act, op: relu, inputs: [fc]}
      - {id: out, op: linear, args: {in_features: $hidden, out_features: 10}, inputs: [block]}
    outputs: [out]

Every error is a :class:`SpecError` naming the file, the line, the key and what was expected.
The work a spec may cause is bounded by :class:`fastserve.limits.Limits` (file size, nesting,
aliases, ``repeat`` counts, graph size, expressions, number magnitudes), and a spec that names
Python code (``module:`` nodes, ``source:`` factories) loads only when that code is trusted
(:mod:`fastserve.trust`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastserve.errors import SpecError
from fastserve.graph.expr import ExprError, evaluate, number_problem
from fastserve.graph.ops import OPS
from fastserve.graph.spec import (DTYPES, GraphSpec, InputSpec, NodeSpec, SourceSpec,
                                  WeightsSpec)
from fastserve.limits import DEFAULT_LIMITS, Limits
from fastserve.trust import check_code
from fastserve.yamlio import Located, describe, line_of, located_like, read_text, read_yaml

_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*\Z")
# what YAML 1.1 reads as a string although it looks like a number: 1e11, 1_000.5e3
_NUMERIC_TEXT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?([eE][-+]?[0-9]+)?\Z")


def load_spec(path: str | Path, *, trust_code: bool = False,
              limits: Limits | None = None) -> GraphSpec:
    """Read and validate a YAML graph spec.

    ``trust_code=True`` lets the spec name Python code (``module:`` nodes, a ``source:``
    factory) that will be imported and run when the graph is built; without it only modules
    listed in the trust file are accepted (see :mod:`fastserve.trust`). ``limits`` bounds the
    work the file may cause (:class:`fastserve.limits.Limits`; generous defaults).
    """
    text = read_text(path, "spec file", SpecError, limits)
    return parse_spec(text, file=str(path), trust_code=trust_code, limits=limits)


def parse_spec(text: str, file: str | None = None, *, trust_code: bool = False,
               limits: Limits | None = None) -> GraphSpec:
    """Parse and validate a YAML graph spec given as text (see :func:`load_spec`)."""
    return spec_from_dict(read_yaml(text, file, SpecError, limits), file=file,
                          trust_code=trust_code, limits=limits)


# --- validation ----------------------------------------------------------------------------------


class _Ctx:
    """Where we are in the document, for error messages, and what the document may do."""

    def __init__(self, file: str | None, trust_code: bool, limits: Limits) -> None:
        self.file = file
        self.trust_code = trust_code
        self.limits = limits
        self.trusted: set[str] = set()  # code targets already checked (repeat bodies recur)
        self.nodes = 0  # graph nodes so far, after unrolling
        self.values = 0  # values in node arguments so far, with parameters expanded
        # id of a parameter's list/mapping value -> (values it expands to, its depth); kept for
        # the whole load, so the ids stay those of the live parameter values
        self.weights: dict[int, tuple[int, int]] = {}
        self.plain: dict[int, Any] = {}  # id of a parameter's value -> its plain copy, shared

    def weigh(self, value: Any, container: Any, key: Any, path: str, remember: bool = False,
              depth: int = 0) -> tuple[int, int]:
        """(values, depth) of ``value`` once expanded, refusing more than the limits allow.

        ``$name`` substitution shares one parameter object among its uses, so ``b: [$a, $a]``,
        ``c: [$b, $b]``... doubles the expanded size at each step while the file stays small;
        sizes of parameter values are memoised by id, so weighing is linear in the file.
        """
        if not isinstance(value, (dict, list)):
            return 1, 0
        known = self.weights.get(id(value))
        if known is None:
            if depth > self.limits.max_depth:
                self.fail(f"nested more than {self.limits.max_depth} levels deep "
                          f"(Limits.max_depth)", container, key, path)
            size, deepest = 1, 0
            for item in (value.values() if isinstance(value, dict) else value):
                n, d = self.weigh(item, container, key, path, remember, depth + 1)
                size, deepest = size + n, max(deepest, d)
            known = (size, deepest + 1)
            if remember:
                self.weights[id(value)] = known
        if depth + known[1] > self.limits.max_depth:
            self.fail(f"nested more than {self.limits.max_depth} levels deep (Limits.max_depth)",
                      container, key, path)
        if known[0] > self.limits.max_yaml_nodes:
            self.fail(f"expands to more than {self.limits.max_yaml_nodes} values "
                      f"(Limits.max_yaml_nodes); are parameters ($name) repeating each other?",
                      container, key, path)
        return known

    def count_values(self, value: Any, container: Any, key: Any, path: str) -> None:
        """Add what ``value`` expands to to the document's total (every node copies its
        arguments), refusing a total beyond ``Limits.max_yaml_nodes``."""
        self.values += self.weigh(value, container, key, path)[0]
        if self.values > self.limits.max_yaml_nodes:
            self.fail(f"the arguments of all nodes expand to more than "
                      f"{self.limits.max_yaml_nodes} values (Limits.max_yaml_nodes)", container,
                      key, path)

    def check_code(self, target: str, container: Any, key: Any, path: str) -> None:
        if target not in self.trusted:
            check_code(target, trust_code=self.trust_code, file=self.file,
                       line=line_of(container, key), key=path)
            self.trusted.add(target)

    def fail(self, msg: str, container: Any = None, key: Any = None, path: str | None = None):
        line = line_of(container, key) if container is not None else None
        raise SpecError(msg, file=self.file, line=line, key=path)


def _check_keys(ctx: _Ctx, m: dict, allowed: set[str], required: set[str], where: str) -> None:
    for k in m:
        if k not in allowed:
            ctx.fail(f"unknown key '{k}' in {where}; expected one of {', '.join(sorted(allowed))}",
                     m, k, f"{where}.{k}" if where != "spec" else str(k))
    for k in sorted(required):
        if k not in m:
            ctx.fail(f"{where} is missing required key '{k}'", m, None, k if where == "spec"
                     else f"{where}.{k}")


def _expect(ctx: _Ctx, value: Any, types: type | tuple, what: str, container, key, path) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ctx.fail(f"expected {what}, got {describe(value)}", container, key, path)
    if not isinstance(value, types):
        ctx.fail(f"expected {what}, got {describe(value)}", container, key, path)
    return value


_TOP_KEYS = {"name", "dims", "params", "inputs", "weights", "nodes", "outputs", "source",
             "description"}


def spec_from_dict(doc: Any, file: str | None = None, *, trust_code: bool = False,
                   limits: Limits | None = None) -> GraphSpec:
    """Validate a raw spec document (from YAML or the builder) and expand it (see
    :func:`load_spec` for ``trust_code`` and ``limits``)."""
    ctx = _Ctx(file, trust_code, limits or DEFAULT_LIMITS)
    if not isinstance(doc, dict):
        ctx.fail(f"a graph spec must be a mapping at the top level, got {describe(doc)}", doc)
    source = doc.get("source")
    _check_keys(ctx, doc, _TOP_KEYS, {"name"} | ({"nodes", "outputs", "inputs"} if source is None
                                                 else set()), "spec")
    name = _expect(ctx, doc["name"], str, "a string", doc, "name", "name")
    if not _ID.match(name.replace(".", "_")):
        ctx.fail(f"graph name '{name}' must be an identifier", doc, "name", "name")
    if doc.get("description") is not None:
        _expect(ctx, doc["description"], str, "a string", doc, "description", "description")
    params = _params(ctx, doc)
    dims = _dims(ctx, doc, params)
    weights = _weights(ctx, doc)
    if source is not None:
        return GraphSpec(name, (), (), (), dims, weights, _source(ctx, doc, params), file)
    inputs = _inputs(ctx, doc, params)
    aliases: dict[str, str] = {}  # repeat id -> its last iteration's output
    nodes = _nodes(ctx, doc, params, {i.name for i in inputs}, aliases)
    outputs = tuple(_alias(o, aliases) for o in _outputs(ctx, doc))
    raw_outputs = doc["outputs"]
    output_lines = tuple(line_of(raw_outputs, i) if isinstance(raw_outputs, list)
                         else line_of(doc, "outputs") for i in range(len(outputs)))
    return GraphSpec(name, inputs, nodes, outputs, dims, weights, None, file, output_lines)


def _params(ctx: _Ctx, doc: dict) -> dict[str, Any]:
    raw = doc.get("params") or {}
    _expect(ctx, raw, dict, "a mapping of parameter names to values", doc, "params", "params")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not _ID.match(k):
            ctx.fail(f"parameter name {k!r} is not an identifier", raw, k, f"params.{k}")
        # parameters may refer to earlier parameters: d_ff: ${4 * d_model}
        out[k] = _subst(ctx, v, out, raw, k, f"params.{k}")
        ctx.weigh(out[k], raw, k, f"params.{k}", remember=True)
        if isinstance(out[k], (dict, list)):
            ctx.plain[id(out[k])] = _plain(out[k], ctx.plain)
    return out


def _dims(ctx: _Ctx, doc: dict, params: dict) -> dict[str, int]:
    raw = doc.get("dims") or {}
    _expect(ctx, raw, dict, "a mapping of dim names to sizes", doc, "dims", "dims")
    out = {}
    for k, v in raw.items():
        v = _subst(ctx, v, params, raw, k, f"dims.{k}")
        _expect(ctx, v, int, "a positive integer size", raw, k, f"dims.{k}")
        if v <= 0:
            ctx.fail(f"dim '{k}' must be positive, got {v}", raw, k, f"dims.{k}")
        out[str(k)] = v
    return out


def _weights(ctx: _Ctx, doc: dict) -> WeightsSpec:
    raw = doc.get("weights")
    if raw is None:
        return WeightsSpec()
    _expect(ctx, raw, dict, "a mapping with 'seed' or 'checkpoint'", doc, "weights", "weights")
    _check_keys(ctx, raw, {"seed", "checkpoint"}, set(), "weights")
    seed = raw.get("seed", 0)
    _expect(ctx, seed, int, "an integer seed", raw, "seed", "weights.seed")
    if number_problem(seed, ctx.limits) or seed < 0:
        ctx.fail(f"seed must be an integer from 0 to {ctx.limits.max_int}, got {seed}", raw,
                 "seed", "weights.seed")
    ckpt = raw.get("checkpoint")
    if ckpt is not None:
        _expect(ctx, ckpt, str, "a checkpoint path", raw, "checkpoint", "weights.checkpoint")
        if not ckpt.endswith((".safetensors", ".pt", ".pth", ".bin")):
            ctx.fail(f"checkpoint '{ckpt}' must be .safetensors (preferred) or a torch file "
                     f"(.pt/.pth/.bin)", raw, "checkpoint", "weights.checkpoint")
    return WeightsSpec(seed, ckpt)


def _tensor_decl(ctx: _Ctx, name: str, raw: Any, container, path: str, params: dict) -> InputSpec:
    _expect(ctx, raw, dict, "a mapping with 'shape' and 'dtype'", container, name, path)
    _check_keys(ctx, raw, {"shape", "dtype", "high"}, {"shape"}, path)
    shape = _expect(ctx, raw["shape"], list, "a list of dims (ints or names)", raw, "shape",
                    f"{path}.shape")
    dims: list[int | str] = []
    for i, d in enumerate(shape):
        d = _subst(ctx, d, params, shape, i, f"{path}.shape[{i}]")
        if isinstance(d, bool) or not isinstance(d, (int, str)) or (isinstance(d, int) and d <= 0):
            ctx.fail(f"bad shape: dim {i} must be a positive int or a dim name, got "
                     f"{describe(d)}", shape, i, f"{path}.shape")
        dims.append(d)
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        ctx.fail(f"unknown dtype '{dtype}'; expected one of {', '.join(DTYPES)}", raw, "dtype",
                 f"{path}.dtype")
    high = _subst(ctx, raw.get("high"), params, raw, "high", f"{path}.high")
    if high is not None:
        _expect(ctx, high, int, "an integer bound", raw, "high", f"{path}.high")
        if high <= 0:
            ctx.fail(f"high (the exclusive bound of random integer inputs) must be positive, "
                     f"got {high}", raw, "high", f"{path}.high")
    return InputSpec(str(name), tuple(dims), dtype, high, raw.line if isinstance(raw, Located)
                     else None)


def _inputs(ctx: _Ctx, doc: dict, params: dict) -> tuple[InputSpec, ...]:
    raw = doc["inputs"]
    _expect(ctx, raw, dict, "a mapping of input names to {shape, dtype}", doc, "inputs", "inputs")
    if not raw:
        ctx.fail("a graph needs at least one input", doc, "inputs", "inputs")
    out = []
    for k, v in raw.items():
        if not isinstance(k, str) or not _ID.match(k):
            ctx.fail(f"input name {k!r} is not an identifier", raw, k, f"inputs.{k}")
        out.append(_tensor_decl(ctx, k, v, raw, f"inputs.{k}", params))
    return tuple(out)


def _source(ctx: _Ctx, doc: dict, params: dict) -> SourceSpec:
    raw = doc["source"]
    _expect(ctx, raw, dict, "a mapping with 'torch'", doc, "source", "source")
    _check_keys(ctx, raw, {"torch", "kwargs", "example_inputs"}, {"torch", "example_inputs"},
                "source")
    factory = _expect(ctx, raw["torch"], str, "'package.module:factory'", raw, "torch",
                      "source.torch")
    if ":" not in factory:
        ctx.fail(f"'{factory}' is not of the form 'package.module:factory'", raw, "torch",
                 "source.torch")
    ctx.check_code(factory, raw, "torch", "source.torch")
    kwargs = _subst(ctx, raw.get("kwargs") or {}, params, raw, "kwargs", "source.kwargs")
    ctx.count_values(kwargs, raw, "kwargs", "source.kwargs")
    _expect(ctx, kwargs, dict, "a mapping of keyword arguments", raw, "kwargs", "source.kwargs")
    ex = raw["example_inputs"]
    _expect(ctx, ex, dict, "a mapping of input names to {shape, dtype}", raw, "example_inputs",
            "source.example_inputs")
    examples = {}
    for k, v in ex.items():
        spec = _tensor_decl(ctx, k, v, ex, f"source.example_inputs.{k}", params)
        examples[k] = {"shape": list(spec.shape), "dtype": spec.dtype, "high": spec.high}
    return SourceSpec(factory, _plain(kwargs, ctx.plain), examples)


def _outputs(ctx: _Ctx, doc: dict) -> tuple[str, ...]:
    raw = doc["outputs"]
    if isinstance(raw, str):
        return (raw,)
    _expect(ctx, raw, list, "a list of tensor names", doc, "outputs", "outputs")
    if not raw:
        ctx.fail("a graph needs at least one output", doc, "outputs", "outputs")
    for i, o in enumerate(raw):
        _expect(ctx, o, str, "a tensor name", raw, i, f"outputs[{i}]")
    return tuple(raw)


_NODE_KEYS = {"id", "op", "module", "args", "inputs"}
_REPEAT_KEYS = {"repeat", "id", "input", "nodes", "output"}


def _alias(ref: str, aliases: dict[str, str]) -> str:
    """Map a reference to a repeat block (``h`` or ``h:0``) to its last iteration's output."""
    base, sep, idx = ref.rpartition(":")
    if sep and idx.isdigit() and base in aliases:
        return f"{aliases[base]}:{idx}"
    return aliases.get(ref, ref)


def _nodes(ctx: _Ctx, doc: dict, params: dict, input_names: set[str],
           aliases: dict[str, str]) -> tuple[NodeSpec, ...]:
    raw = doc["nodes"]
    _expect(ctx, raw, list, "a list of nodes", doc, "nodes", "nodes")
    if not raw:
        ctx.fail("a graph needs at least one node", doc, "nodes", "nodes")
    if len(raw) > ctx.limits.max_nodes:
        ctx.fail(f"{len(raw)} nodes, more than {ctx.limits.max_nodes} (Limits.max_nodes)", doc,
                 "nodes", "nodes")
    out: list[NodeSpec] = []
    seen: dict[str, int | None] = {n: None for n in input_names}  # id -> its line

    def claim(name: str, line: int | None, container, key, path) -> None:
        """Take ``name`` for a node or a repeat block (whose id then means its last output),
        refusing one already taken: the later one would silently shadow it."""
        if name in seen:
            what = "a graph input" if seen[name] is None and name in input_names else \
                f"line {seen[name]}" if seen[name] else "an earlier node"
            ctx.fail(f"duplicate id '{name}' (already used by {what})", container, key, path)
        seen[name] = line

    def add(node: NodeSpec, container, key, path) -> None:
        claim(node.id, node.line, container, key, path)
        out.append(node)
        ctx.nodes += 1

    for i, item in enumerate(raw):
        path = f"nodes[{i}]"
        _expect(ctx, item, dict, "a node mapping", raw, i, path)
        if "repeat" in item:
            _repeat(ctx, item, params, path, add, aliases, claim)
        else:
            node = _node(ctx, item, params, raw, i, path, {}, aliases)
            add(node, raw, i, path)
    return tuple(out)


def _node(ctx: _Ctx, item: dict, params: dict, container, idx, path: str,
          local: dict[str, str], aliases: dict[str, str], *, node_id: str | None = None,
          layer: int | None = None, group: str | None = None) -> NodeSpec:
    _check_keys(ctx, item, _NODE_KEYS, {"id"}, path)
    raw_id = _expect(ctx, item["id"], str, "a string id", item, "id", f"{path}.id")
    if not _ID.match(raw_id):
        ctx.fail(f"node id '{raw_id}' must start with a letter or '_' and contain only letters, "
                 f"digits, '_' and '-'", item, "id", f"{path}.id")
    if ("op" in item) == ("module" in item):
        ctx.fail(f"node '{raw_id}' needs exactly one of 'op' or 'module'", container, idx, path)
    args = item.get("args") or {}
    _expect(ctx, args, dict, "a mapping of arguments", item, "args", f"{path}.args")
    args = _subst(ctx, args, params, item, "args", f"{path}.args")
    ctx.count_values(args, item, "args", f"{path}.args")
    if "module" in item:
        target = _expect(ctx, item["module"], str, "'package.module:Name'", item, "module",
                         f"{path}.module")
        if ":" not in target:
            ctx.fail(f"module '{target}' is not of the form 'package.module:Name'", item,
                     "module", f"{path}.module")
        ctx.check_code(target, item, "module", f"{path}.module")
        op, args = "module", {"target": target, "kwargs": args}
    else:
        op = _expect(ctx, item["op"], str, "an op name", item, "op", f"{path}.op")
        if op == "module":  # only the `module:` key checks that the code is trusted
            ctx.fail("a user module is named with 'module: package.module:Name', not with "
                     "'op: module'", item, "op", f"{path}.op")
        if op not in OPS:
            known = ", ".join(sorted(o for o in OPS if o != "module"))
            ctx.fail(f"unknown op '{op}'; known ops: {known}", item, "op", f"{path}.op")
        spec = OPS[op]
        allowed = set(spec.required) | set(spec.optional)
        for k in args:
            if k not in allowed:
                ctx.fail(f"op '{op}' has no argument '{k}'; it takes "
                         f"{', '.join(sorted(allowed)) or 'no arguments'}", args, k,
                         f"{path}.args.{k}")
        for k in spec.required:
            if k not in args:
                ctx.fail(f"op '{op}' needs argument '{k}'", item, "args" if "args" in item
                         else "op", f"{path}.args.{k}")
        for k, v in args.items():
            if isinstance(v, str) and _NUMERIC_TEXT.match(v):
                ctx.fail(f"argument '{k}' is the text '{v}', not a number (YAML reads e-notation "
                         f"as a number only with a '.' and a signed exponent, 1.0e+11); write "
                         f"'${{{v.replace('_', '')}}}' or the digits", args, k, f"{path}.args.{k}")
    inputs = item.get("inputs", [])
    if isinstance(inputs, str):
        inputs = [inputs]
    _expect(ctx, inputs, list, "a list of tensor names", item, "inputs", f"{path}.inputs")
    refs = []
    for j, r in enumerate(inputs):
        _expect(ctx, r, str, "a tensor name", inputs, j, f"{path}.inputs[{j}]")
        base, sep, idx_s = r.rpartition(":")
        if not (sep and idx_s.isdigit()):
            base, sep, idx_s = r, "", ""
        if base == "$in" and "$in" not in local:
            ctx.fail("'$in' is only meaningful inside a repeat block", inputs, j,
                     f"{path}.inputs[{j}]")
        base = local.get(base, aliases.get(base, base))
        refs.append(base + (f":{idx_s}" if sep else ""))
    line = item.lines.get("id") if isinstance(item, Located) else None
    return NodeSpec(node_id or raw_id, op, _plain(args, ctx.plain), tuple(refs), layer, group,
                    line)


def _repeat(ctx: _Ctx, item: dict, params: dict, path: str, add, aliases: dict[str, str],
            claim) -> None:
    _check_keys(ctx, item, _REPEAT_KEYS, {"repeat", "id", "nodes"}, path)
    count = _subst(ctx, item["repeat"], params, item, "repeat", f"{path}.repeat")
    _expect(ctx, count, int, "a positive repeat count", item, "repeat", f"{path}.repeat")
    if count <= 0:
        ctx.fail(f"repeat count must be positive, got {count}", item, "repeat", f"{path}.repeat")
    if count > ctx.limits.max_repeat:
        ctx.fail(f"repeat count {count} is more than {ctx.limits.max_repeat} "
                 f"(Limits.max_repeat)", item, "repeat", f"{path}.repeat")
    rid = _expect(ctx, item["id"], str, "a string id", item, "id", f"{path}.id")
    if not _ID.match(rid):
        ctx.fail(f"repeat id '{rid}' is not an identifier", item, "id", f"{path}.id")
    claim(rid, item.lines.get("id") if isinstance(item, Located) else None, item, "id",
          f"{path}.id")
    body = _expect(ctx, item["nodes"], list, "a list of nodes", item, "nodes", f"{path}.nodes")
    if not body:
        ctx.fail("a repeat block needs at least one node", item, "nodes", f"{path}.nodes")
    if ctx.nodes + count * len(body) > ctx.limits.max_nodes:  # refused before unrolling
        ctx.fail(f"{count} x {len(body)} nodes would make the graph larger than "
                 f"{ctx.limits.max_nodes} nodes (Limits.max_nodes)", item, "repeat",
                 f"{path}.repeat")
    local_ids = []
    for j, b in enumerate(body):
        _expect(ctx, b, dict, "a node mapping", body, j, f"{path}.nodes[{j}]")
        if "repeat" in b:
            ctx.fail("nested repeat blocks are not supported; flatten the inner one", body, j,
                     f"{path}.nodes[{j}]")
        local_ids.append(b.get("id"))
    output = item.get("output", local_ids[-1])
    if output not in local_ids:
        ctx.fail(f"repeat output '{output}' is not a node of the block", item, "output",
                 f"{path}.output")
    prev = item.get("input")
    if prev is not None:
        _expect(ctx, prev, str, "a tensor name", item, "input", f"{path}.input")
        prev = aliases.get(prev, prev)
    for i in range(count):
        prefix = f"{rid}.{i}"
        local = {"$in": prev} if prev is not None else {}
        scoped = {**params, "i": i}
        for j, b in enumerate(body):
            nid = prefix if len(body) == 1 else f"{prefix}.{b.get('id')}"
            node = _node(ctx, b, scoped, body, j, f"{path}.nodes[{j}]", local, aliases,
                         node_id=nid, layer=i, group=rid)
            add(node, body, j, f"{path}.nodes[{j}]")
            local[b["id"]] = nid
        prev = local[output]
    aliases[rid] = prev


# --- $param substitution -------------------------------------------------------------------------


def _subst(ctx: _Ctx, value: Any, params: dict[str, Any], container, key, path: str,
           depth: int = 0) -> Any:
    """Replace ``$name`` and ``${expr}`` strings (recursively) with parameter values, and
    refuse numbers beyond ``Limits.max_int`` (see :mod:`fastserve.graph.expr`)."""
    if depth > ctx.limits.max_depth:  # a document built in Python has no YAML depth check
        ctx.fail(f"nested more than {ctx.limits.max_depth} levels deep (Limits.max_depth)",
                 container, key, path)
    if isinstance(value, dict):
        return located_like(value, {k: _subst(ctx, v, params, value, k, f"{path}.{k}", depth + 1)
                                    for k, v in value.items()})
    if isinstance(value, list):
        return [_subst(ctx, v, params, value, i, f"{path}[{i}]", depth + 1)
                for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("$") and value != "$in":
        expr = value[2:-1] if value.startswith("${") and value.endswith("}") else value[1:]
        shown = value if len(value) <= 60 else value[:57] + "..."
        try:
            return evaluate(expr, params, ctx.limits)
        except KeyError as e:
            ctx.fail(f"undefined parameter '{e.args[0]}' in '{shown}'; defined: "
                     f"{', '.join(sorted(params)) or 'none'}", container, key, path)
        except ExprError as e:
            ctx.fail(f"cannot evaluate '{shown}': {e}", container, key, path)
    problem = number_problem(value, ctx.limits)
    if problem:
        ctx.fail(problem, container, key, path)
    return value


def _plain(value: Any, shared: dict[int, Any] | None = None) -> Any:
    """Strip line-tracking types: specs hold plain dicts and lists. ``shared`` maps the ids of
    parameter values to their plain copies: every node using ``$p`` gets that one copy (no
    code mutates node arguments), so a large parameter used by many nodes is copied once."""
    if shared and id(value) in shared:
        return shared[id(value)]
    if isinstance(value, dict):
        return {k: _plain(v, shared) if isinstance(v, (dict, list)) else v
                for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, shared) if isinstance(v, (dict, list)) else v for v in value]
    return value
