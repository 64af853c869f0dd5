"""A captured node's program as plain data, and back: how a rank gets its part of a traced model.

Capturing a model (``torch.export``) costs seconds of a core per model (4 s for a 12-layer Llama
on this machine), and a rank would pay it again for a model it holds a piece of. Instead the
driver, which captured once, writes each node's program as JSON-able data: its ATen ops in
order, their arguments, and the tensors it reads by name with their shape and dtype. A rank
rebuilds the ``torch.fx`` graph from that data in milliseconds, with its tensors on ``meta``
until :mod:`fastserve.graph.capture_weights` gives them values.

No code travels this way. A target is the name of an ATen operator (``aten.linear.default``),
looked up in ``torch.ops.aten``, or one of a few Python operators on sizes (``getitem``,
``mul``...); argument values are numbers, strings, dtypes, layouts, memory formats, the CPU
device, lists and references to earlier values. Every name is checked before use, and the
Python source that ``torch.fx`` generates names its values itself: a placeholder is ``x<i>``, a
value gets fx's own name, and a tensor name must be a dotted path of plain words (fx writes it
into the source as an attribute path).
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from typing import Any, Mapping

import torch
from torch import fx, nn

from fastserve.errors import SpecError
from fastserve.graph.dtypes import DTYPES, dtype_name, torch_dtype

MAX_OPS = 100_000
MAX_DEPTH = 8  # nesting of argument lists
MAX_VALUE = 1 << 16  # elements of a buffer whose value travels in the program
# Python operators that a captured program applies to symbolic sizes
_OPERATORS = {f.__name__: f for f in (
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
    operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
    operator.lt, operator.le, operator.gt, operator.ge)}
# ATen operators that touch more than tensors (a file)
_DENIED = {"from_file"}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last,
    torch.channels_last_3d)}
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")
_ATEN = re.compile(r"^aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\Z")
_KEYWORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


class ProgramError(SpecError):
    """A program that does not follow the format."""


# --- writing ------------------------------------------------------------------------------------


def encode(gm: fx.GraphModule, aliases: Mapping[str, list[str]],
           buffers: Mapping[str, torch.Tensor]) -> dict:
    """The data of a captured part: ``ops`` (one entry per fx node) and ``tensors`` (name ->
    shape, dtype, whether it is a parameter, and every name the model has for it). A small
    buffer the model computed when it was built (rotary frequencies, position ids: not in a
    checkpoint) travels with its ``value``, taken from the part or, where the part's is on
    ``meta``, from ``buffers`` (by any of its names), so a rank needs no model to compute it."""
    state = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    ids = {n: i for i, n in enumerate(gm.graph.nodes)}
    ops = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            ops.append(["input"])
        elif n.op == "get_attr":
            ops.append(["tensor", n.target])
        elif n.op == "call_function":
            ops.append(["call", _target_name(n.target), _value(n.args, ids),
                        _value(dict(n.kwargs), ids)])
        elif n.op == "output":
            ops.append(["output", _value(n.args[0], ids)])
        else:
            raise ProgramError(f"a captured program holds a '{n.op}' node; only inputs, "
                               f"tensors and calls of operators can be shipped")
    tensors = {}
    for k, t in state.items():
        names = list(aliases.get(k, [k]))
        tensors[k] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                      "param": isinstance(t, nn.Parameter), "aliases": names}
        if not isinstance(t, nn.Parameter):
            value = t if not t.is_meta else next((buffers[n] for n in names if n in buffers),
                                                 None)
            if value is not None and value.numel() <= MAX_VALUE and \
                    (not value.is_floating_point() or bool(value.isfinite().all())):
                tensors[k]["value"] = value.detach().flatten().tolist()
    return {"ops": ops, "tensors": tensors}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"aten.{target._opname}.{target._overloadname}"
    name = getattr(target, "__name__", None)
    if _OPERATORS.get(name) is target:
        return name
    raise ProgramError(f"a captured program calls {target!r}; only ATen operators and "
                       f"operators on sizes can be shipped")


def _value(a: Any, ids: Mapping[fx.Node, int]) -> Any:
    if isinstance(a, fx.Node):
        return {"ref": ids[a]}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        items = [_value(x, ids) for x in a]
        return items if isinstance(a, list) else {"tuple": items}
    if isinstance(a, dict):
        return {"map": {k: _value(v, ids) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": dtype_name(a)}
    if isinstance(a, torch.device):
        return {"device": "cpu"}  # captured on meta or cpu; ranks run on cpu
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise ProgramError(f"a captured program has an argument of type {type(a).__name__}, "
                       f"which cannot be shipped")


# --- reading -----------------------------------------------------------------------------------


def decode(doc: Any, where: str = "program") -> fx.GraphModule:
    """The ``GraphModule`` of an encoded program, every field checked, its tensors on ``meta``
    (parameters as parameters, the rest as buffers). :class:`ProgramError` names the field."""
    def fail(key: str, what: str):
        raise ProgramError(f"{where}: {what}", key=key)

    if not isinstance(doc, dict) or set(doc) != {"ops", "tensors"}:
        fail(where, "expected {ops, tensors}")
    tensors = _tensors(doc["tensors"], fail)
    ops = doc["ops"]
    if not isinstance(ops, list) or not 0 < len(ops) <= MAX_OPS:
        fail("ops", f"expected a list of 1 to {MAX_OPS} ops")
    graph = fx.Graph()
    made: list[fx.Node | None] = []
    inputs = 0
    for i, op in enumerate(ops):
        key = f"ops[{i}]"
        if not isinstance(op, list) or not op or not isinstance(op[0], str):
            fail(key, "expected [kind, ...]")
        kind, shape = op[0], {"input": 1, "tensor": 2, "call": 4, "output": 2}.get(op[0])
        if shape is None or len(op) != shape:
            fail(key, f"expected input, tensor, call or output with its fields, got {kind!r}")
        if made and made[-1] is None:
            fail(key, "nothing may follow the output")
        if kind == "input":
            if any(n is not None and n.op != "placeholder" for n in made):
                fail(key, "inputs come first")
            made.append(graph.placeholder(f"x{inputs}"))
            inputs += 1
        elif kind == "tensor":
            if not isinstance(op[1], str) or op[1] not in tensors:
                fail(key, f"reads tensor {op[1]!r}, which 'tensors' does not declare")
            made.append(graph.get_attr(op[1]))
        elif kind == "call":
            target = _target(op[1], key, fail)
            args = _read(op[2], made, f"{key}.args", fail)
            kwargs = _read(op[3], made, f"{key}.kwargs", fail)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                fail(key, "expected a tuple of arguments and a map of keyword arguments")
            made.append(graph.call_function(target, args, kwargs))
        else:
            graph.output(_read(op[1], made, f"{key}.result", fail))
            made.append(None)
    if not made or made[-1] is not None:
        fail("ops", "expected the last op to be the output")
    root = nn.Module()
    try:
        for name, t in tensors.items():
            _attach(root, name, t)
        graph.lint()
        return fx.GraphModule(root, graph, class_name="CapturedPart")
    except Exception as e:  # fx reports a malformed graph in several types
        fail("ops", f"not a valid program: {e}")


def _tensors(doc: Any, fail) -> dict[str, torch.Tensor]:
    if not isinstance(doc, dict):
        fail("tensors", "expected a map of tensor name to {shape, dtype, param, aliases}")
    out = {}
    for name, spec in doc.items():
        key = f"tensors.{name}"
        if not isinstance(name, str) or not _TENSOR_NAME.match(name):
            fail("tensors", f"{name!r} is not a dotted tensor name")
        if not isinstance(spec, dict) or not {"shape", "dtype", "param", "aliases"} <= \
                set(spec) <= {"shape", "dtype", "param", "aliases", "value"}:
            fail(key, "expected {shape, dtype, param, aliases} and, for a buffer, its value")
        shape = spec["shape"]
        if not isinstance(shape, list) or len(shape) > 16 or \
                not all(type(d) is int and 0 <= d < 1 << 40 for d in shape):
            fail(f"{key}.shape", "expected a list of sizes")
        if spec["dtype"] not in DTYPES:
            fail(f"{key}.dtype", f"expected one of {sorted(DTYPES)}")
        if type(spec["param"]) is not bool:
            fail(f"{key}.param", "expected true or false")
        aliases = spec["aliases"]
        if not isinstance(aliases, list) or not 0 < len(aliases) <= 64 or \
                not all(isinstance(a, str) and len(a) <= 1024 for a in aliases):
            fail(f"{key}.aliases", "expected a list of names")
        dtype = torch_dtype(spec["dtype"])
        if "value" in spec:
            out[name] = _buffer(spec["value"], shape, dtype, spec["param"], f"{key}.value", fail)
            continue
        t = torch.empty(shape, dtype=dtype, device="meta")
        out[name] = nn.Parameter(t, requires_grad=False) if spec["param"] else t
    return out


def _buffer(value: Any, shape: list[int], dtype: torch.dtype, param: bool, key: str,
            fail) -> torch.Tensor:
    numel = math.prod(shape)
    if param or numel > MAX_VALUE or not isinstance(value, list) or len(value) != numel:
        fail(key, f"expected the {numel} values of a buffer of at most {MAX_VALUE}")
    kinds = (bool,) if dtype == torch.bool else (int,) if not dtype.is_floating_point and \
        not dtype.is_complex else (int, float)
    if dtype.is_complex or not all(type(v) in kinds for v in value):
        fail(key, f"expected values of type {' or '.join(k.__name__ for k in kinds)}")
    try:
        t = torch.tensor(value, dtype=dtype)
    except (OverflowError, RuntimeError, ValueError) as e:
        fail(key, f"values do not fit {dtype}: {e}")
    if t.tolist() != value:  # wrapped, rounded or not a number: not what the driver had
        fail(key, f"values that {dtype} does not hold exactly")
    return t.reshape(shape)


def aliases_of(doc: dict) -> dict[str, list[str]]:
    """Tensor name -> every name the model has for it, of a program :func:`decode` accepted."""
    return {k: v["aliases"] for k, v in doc["tensors"].items()}


def _attach(root: nn.Module, name: str, t: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = root
    for bit in path:
        if not hasattr(owner, bit):
            owner.add_module(bit, nn.Module())
        owner = getattr(owner, bit)
        if not isinstance(owner, nn.Module):
            raise ValueError(f"tensor name '{name}' runs through another attribute")
    if isinstance(t, nn.Parameter):
        owner.register_parameter(leaf, t)
    else:
        owner.register_buffer(leaf, t)


def _target(name: Any, key: str, fail) -> Any:
    if not isinstance(name, str):
        fail(f"{key}.target", "expected an operator name")
    if name in _OPERATORS:
        return _OPERATORS[name]
    m = _ATEN.match(name)
    if m is None or m.group(1) in _DENIED:
        fail(f"{key}.target", f"{name!r} is not an ATen operator that may be shipped")
    try:
        op = getattr(getattr(torch.ops.aten, m.group(1)), m.group(2))
    except (AttributeError, RuntimeError):
        op = None
    if not isinstance(op, torch._ops.OpOverload):
        fail(f"{key}.target", f"torch has no operator {name!r}")
    return op


def _read(v: Any, made: list, key: str, fail, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        fail(key, f"arguments nested deeper than {MAX_DEPTH}")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_read(x, made, key, fail, depth + 1) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        fail(key, f"unexpected value {v!r}"[:200])
    (tag, x), = v.items()
    if tag == "ref":
        if type(x) is not int or not 0 <= x < len(made) or made[x] is None:
            fail(key, f"refers to op {x!r}, which is not an earlier value")
        return made[x]
    if tag == "tuple" and isinstance(x, list):
        return tuple(_read(y, made, key, fail, depth + 1) for y in x)
    if tag == "map" and isinstance(x, dict):
        for k in x:  # fx writes keyword names into the source it generates
            if not _KEYWORD.match(k) or keyword.iskeyword(k):
                fail(key, f"{k!r} is not a keyword argument name")
        return {k: _read(y, made, key, fail, depth + 1) for k, y in x.items()}
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "dtype" and x in DTYPES:
        return torch_dtype(x)
    if tag == "device" and x == "cpu":
        return torch.device("cpu")
    if tag == "layout" and x in _LAYOUTS:
        return _LAYOUTS[x]
    if tag == "memory_format" and x in _FORMATS:
        return _FORMATS[x]
    fail(key, f"unexpected value {v!r}"[:200])
