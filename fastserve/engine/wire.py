"""The wire format: a msgpack header plus one raw frame per tensor, without copies.

A message is a list of ZeroMQ frames::

    frame 0   msgpack map {"v": 1, "kind": "data", "req": 7, "mb": 0,
                           "tensors": [["h.3", "float32", [4, 16, 768]], ...],
                           "meta": {...}}          # per-kind fields: timings, errors, commands
    frame 1.. the bytes of each tensor, in header order (C-contiguous, native byte order)

Sending hands ZeroMQ a memoryview of each tensor's storage (``copy=False``); receiving builds
tensors on the frames' buffers, so a 16 MiB activation is never copied in Python.

Every field of a received header is checked for type, range and consistency before anything is
built from it, and ``meta`` follows a schema per kind (:data:`META`): unknown keys, wrong types and
oversized values are refused. Anything that does not match raises :class:`WireError` with a
``reason`` the receiver counts; a decode never raises anything else. The bounds are chosen so that
what a rank sends in answer to an accepted message (its timings appended, an error text cut to
:data:`MAX_TEXT`) is always accepted by its peer. No pickle anywhere.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np
import torch

from fastserve.errors import WireError
from fastserve.graph.dtypes import DTYPES

VERSION = 1
KINDS = ("data", "error", "control", "reply")
# A valid header is far below this (256 specs with 256-character names: ~80 KiB); the bound
# also caps what decoding junk costs before it is refused (~128K Python objects, a few ms)
MAX_HEADER_BYTES = 128 << 10
MAX_FRAME_BYTES = 1 << 32  # 4 GiB: one tensor
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES + MAX_HEADER_BYTES  # ZMQ_MAXMSGSIZE of receiving sockets
MAX_ELEMENTS = 1 << 40  # product of a shape's dimensions, zero-size ones counted as 1
MAX_TENSORS = 256
MAX_DIMS = 8
MAX_NAME = 256  # characters in a tensor name
MAX_TEXT = 2048  # characters in any string of meta (an error's text is cut to this)
MAX_TIMINGS = 512  # stages a message may have passed; a rank refuses to add the 513th
MAX_ID = (1 << 63) - 1  # request and micro-batch ids are non-negative int64

_NAMES = {v: k for k, v in DTYPES.items()}

_NUMPY = {t: np.dtype(n if n != "bool" else "bool") for n, t in DTYPES.items() if n != "bfloat16"}

# Received frames are read-only buffers and torch warns about the first tensor built on one; the
# shards only read their inputs, so that warning is dropped.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning)


@dataclass
class Message:
    """A decoded message. ``tensors`` may share memory with the received frames."""

    kind: str
    request: int = 0
    micro: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


# --- meta schemas ------------------------------------------------------------------------------
# A checker takes a value and returns an error text, or None when the value is acceptable.

Check = Callable[[Any], "str | None"]


def _int(v: Any) -> str | None:
    if type(v) is not int or not -MAX_ID <= v <= MAX_ID:
        return f"expected an int64, got {_show(v)}"
    return None


def _number(v: Any) -> str | None:
    if type(v) is int:
        return _int(v)
    if type(v) is not float or not math.isfinite(v):
        return f"expected a finite number, got {_show(v)}"
    return None


def _text(v: Any) -> str | None:
    if type(v) is not str or len(v) > MAX_TEXT:
        return f"expected a string of at most {MAX_TEXT} characters, got {_show(v)}"
    return None


def _bool(v: Any) -> str | None:
    return None if type(v) is bool else f"expected true or false, got {_show(v)}"


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _one_of(*values: str) -> Check:
    return lambda v: None if type(v) is str and v in values else \
        f"expected one of {', '.join(values)}, got {_show(v)}"


def _record(fields: dict[str, Check], required: frozenset[str] = frozenset()) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not dict:
            return f"expected a map, got {_show(v)}"
        return _check_map(v, fields, required)
    return check


def _list_of(item: Check, limit: int) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not list or len(v) > limit:
            return f"expected a list of at most {limit} entries, got {_show(v)}"
        for i, x in enumerate(v):
            err = item(x)
            if err:
                return f"[{i}]: {err}"
        return None
    return check


def _counts(v: Any) -> str | None:
    """A small map of reason -> count (malformed messages by reason)."""
    if type(v) is not dict or len(v) > 64:
        return f"expected a map of at most 64 counts, got {_show(v)}"
    for k, n in v.items():
        if type(k) is not str or len(k) > MAX_NAME or _int(n):
            return f"expected reason -> count, got {_show(k)}: {_show(n)}"
    return None


def _check_map(m: dict, fields: dict[str, Check], required: frozenset[str]) -> str | None:
    for key, value in m.items():
        check = fields.get(key) if type(key) is str else None
        if check is None:
            return f"unexpected key {_show(key)}"
        err = check(value)
        if err:
            return f"'{key}': {err}"
    missing = required - m.keys()
    return f"missing {sorted(missing)}" if missing else None


_TIMING = _record({"rank": _int, "stage": _int, "recv": _number, "start": _number,
                   "end": _number, "sent": _number},
                  frozenset({"rank", "stage", "recv", "start", "end"}))
_TIMINGS = _list_of(_TIMING, MAX_TIMINGS)
_ERROR = _record({"rank": _optional(_int), "stage": _optional(_int), "node": _optional(_text),
                  "message": _text}, frozenset({"message"}))
COMMANDS = ("health", "stats", "stop", "load")

# kind -> (fields, required keys). Control messages go both ways: commands to a rank, and the
# rank's ready/failed events to the coordinator.
META: dict[str, tuple[dict[str, Check], frozenset[str]]] = {
    "data": ({"timings": _TIMINGS}, frozenset()),
    "error": ({"timings": _TIMINGS, "error": _ERROR}, frozenset({"error"})),
    # "load" carries the rank's shard record as a uint8 tensor and the plan hash; "ready"
    # answers with the same hash and the nodes the rank built
    "control": ({"cmd": _one_of(*COMMANDS), "event": _one_of("hello", "ready", "failed"),
                 "rank": _int, "pid": _int, "load_s": _number, "read_s": _number,
                 "rss": _int,
                 "rss_before_load": _int, "rss_peak": _int, "weight_bytes": _int,
                 "error": _text, "plan": _text, "nodes": _list_of(_text, 1 << 16),
                 "threads": _int, "endpoint": _text, "data_out": _text},
                frozenset()),
    "reply": ({"cmd": _one_of(*COMMANDS), "rank": _int, "ok": _bool, "busy": _bool,
               "processed": _int, "errors": _int, "malformed": _counts, "refused": _int,
               "compute_s": _number, "rss": _int, "pending": _int},
              frozenset({"cmd", "rank"})),
}


def check_meta(kind: str, meta: Any) -> None:
    """Raise :class:`WireError` unless ``meta`` follows the schema of ``kind``."""
    if type(meta) is not dict:
        raise WireError(f"'meta' must be a map, got {_show(meta)}", "meta")
    fields, required = META[kind]
    err = _check_map(meta, fields, required)
    if err is None and kind == "control" and ("cmd" in meta) == ("event" in meta):
        err = "a control message carries exactly one of 'cmd' and 'event'"
    if err:
        raise WireError(f"{kind} message meta {err}", "meta")


def _show(v: Any) -> str:
    """A short description of a received value: containers by type and length only (the
    repr of a deeply nested one would recurse past Python's limit)."""
    if isinstance(v, (list, dict, tuple)):
        return f"a {type(v).__name__} of {len(v)}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# --- encode / decode ---------------------------------------------------------------------------

def encode(kind: str, *, request: int = 0, micro: int = 0,
           tensors: Mapping[str, torch.Tensor] | None = None,
           meta: Mapping[str, Any] | None = None) -> list:
    """Frames for one message: the header bytes, then a zero-copy view of each tensor.

    The header is checked by the same rules as :func:`decode`, so a message that could not be
    received is refused here, at the sender, with the reason."""
    if kind not in META:
        raise WireError(f"unknown message kind '{kind}'", "kind")
    meta = dict(meta or {})
    check_meta(kind, meta)
    specs = []
    frames: list = [b""]
    for name, t in (tensors or {}).items():
        if not t.is_cpu:  # (cheaper than t.device.type: this loop runs for every message)
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        dtype = _NAMES.get(t.dtype)
        if dtype is None:
            raise WireError(f"tensor '{name}' has dtype {t.dtype}, which the wire does not "
                            f"carry", "dtype")
        specs.append([name, dtype, list(t.shape)])
        # a numpy view of the storage keeps `t` alive for as long as ZeroMQ holds the frame;
        # numpy has no bfloat16, so that one travels as raw bytes
        if not t.numel():
            frames.append(b"")
        elif t.dtype == torch.bfloat16:
            frames.append(t.view(torch.int16).numpy())
        else:
            frames.append(t.numpy())
    if len(specs) > MAX_TENSORS:
        raise WireError(f"{len(specs)} tensors in one message; at most {MAX_TENSORS}", "tensors")
    header = {"v": VERSION, "kind": kind, "req": int(request), "mb": int(micro),
              "tensors": specs, "meta": meta}
    frames[0] = msgpack.packb(header, use_bin_type=True)
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frames[0])} bytes exceeds {MAX_HEADER_BYTES}", "size")
    return frames


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame or bytes
    return memoryview(buf)


_HEADER_KEYS = frozenset({"v", "kind", "req", "mb", "tensors", "meta"})


def decode(frames: Sequence[Any]) -> Message:
    """Validate and decode frames from :func:`encode`; raise :class:`WireError` otherwise."""
    try:
        return _decode(frames)
    except RecursionError:  # a backstop: no check should recurse on received data
        raise WireError("header nested too deeply", "header") from None


def _decode(frames: Sequence[Any]) -> Message:
    if not frames:
        raise WireError("empty message", "empty")
    if len(frames) > MAX_TENSORS + 1:
        raise WireError(f"{len(frames)} frames; at most {MAX_TENSORS + 1}", "tensors")
    head = _buffer(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}", "size")
    try:
        # msgpack's own limits bound what a hostile header can make it allocate
        header = msgpack.unpackb(head, raw=False, strict_map_key=True,
                                 max_array_len=MAX_TENSORS + MAX_TIMINGS, max_map_len=64)
    except Exception as e:  # msgpack raises many types for garbage
        raise WireError(f"header is not valid msgpack: {type(e).__name__}", "header") from None
    if type(header) is not dict:
        raise WireError("header is not a map", "header")
    if header.get("v") != VERSION or type(header.get("v")) is not int:
        raise WireError(f"unknown wire version {_show(header.get('v'))}; this build speaks "
                        f"{VERSION}", "version")
    kind = header.get("kind")
    if type(kind) is not str or kind not in META:
        raise WireError(f"unknown message kind {_show(kind)}", "kind")
    if header.keys() != _HEADER_KEYS:
        raise WireError(f"header keys {sorted(map(str, header))} are not "
                        f"{sorted(_HEADER_KEYS)}", "header")
    req, mb = header["req"], header["mb"]
    if type(req) is not int or type(mb) is not int or not (0 <= req <= MAX_ID
                                                          and 0 <= mb <= MAX_ID):
        raise WireError(f"header 'req' and 'mb' must be ints in [0, 2**63), got {_show(req)} "
                        f"and {_show(mb)}", "id")
    check_meta(kind, header["meta"])
    specs = header["tensors"]
    if type(specs) is not list or len(specs) > MAX_TENSORS:
        raise WireError("header 'tensors' must be a list of at most "
                        f"{MAX_TENSORS} [name, dtype, shape] entries", "tensors")
    if len(frames) != len(specs) + 1:
        raise WireError(f"header declares {len(specs)} tensors but {len(frames) - 1} frames "
                        f"follow (truncated or padded message)", "frames")
    tensors: dict[str, torch.Tensor] = {}
    for spec, frame in zip(specs, frames[1:]):
        name, dtype, shape, nbytes = _check_spec(spec)
        if name in tensors:
            raise WireError(f"tensor '{name}' appears twice", "tensors")
        buf = _buffer(frame)
        if buf.nbytes != nbytes:
            raise WireError(f"tensor '{name}' declares {nbytes} bytes, its frame has "
                            f"{buf.nbytes}", "frames")
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # numpy builds the view with less per-call overhead than torch.frombuffer + view, which
        # matters for small messages; bfloat16 travels as int16 and is reinterpreted
        if dtype == torch.bfloat16:
            arr = np.frombuffer(buf, np.int16).reshape(shape)
            tensors[name] = torch.from_numpy(arr).view(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(np.frombuffer(buf, _NUMPY[dtype]).reshape(shape))
    return Message(kind, req, mb, tensors, header["meta"])


def _check_spec(spec: Any) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    """Name, dtype, shape and byte count of one tensor spec, each checked."""
    if type(spec) is not list or len(spec) != 3:
        raise WireError(f"a tensor spec must be [name, dtype, shape], got {_show(spec)}",
                        "tensors")
    name, dtype, shape = spec
    if type(name) is not str or not 0 < len(name) <= MAX_NAME:
        raise WireError(f"a tensor name must be a string of 1 to {MAX_NAME} characters, got "
                        f"{_show(name)}", "tensors")
    if type(dtype) is not str or dtype not in DTYPES:
        raise WireError(f"tensor '{name}' has unknown dtype {_show(dtype)}", "dtype")
    if (type(shape) is not list or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape)):
        raise WireError(f"tensor '{name}' has a bad shape {_show(shape)}: at most {MAX_DIMS} "
                        f"non-negative ints", "shape")
    # zero-size dimensions count as 1 here: torch computes strides from the others, and a
    # (0, 2**40, 2**40) tensor overflows them although it holds no element
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise WireError(f"tensor '{name}' shape {_show(shape)} has more than {MAX_ELEMENTS} "
                        f"elements", "shape")
    t = DTYPES[dtype]
    nbytes = math.prod(shape) * t.itemsize
    if nbytes > MAX_FRAME_BYTES:
        raise WireError(f"tensor '{name}' declares {nbytes} bytes; at most {MAX_FRAME_BYTES}",
                        "size")
    return name, t, tuple(shape), nbytes
