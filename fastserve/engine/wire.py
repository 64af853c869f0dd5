"""The wire format: a header frame (a layout both ends cache, then ids and meta) and one raw
frame per tensor, without copies; a small message's tensors ride in the header frame.

A message is a list of ZeroMQ frames::

    frame 0   the header, back to back:
                u32 (little-endian)  the layout's length in bytes
                layout  msgpack [3, "data", [["h.3", "float32", [4, 16, 768]], ...]]
                        (wire version, kind, tensor specs: the same for every message of a shape)
                u32     the ids' length in bytes
                ids     msgpack [7, 0, {...}]
                        (request id, micro-batch id, meta: per-kind fields such as timings,
                        errors, commands)
                and, for a small message, its tensors' bytes (see below)
    frame 1.. the bytes of each tensor, in layout order (C-contiguous, native byte order)

Sending hands ZeroMQ a memoryview of each tensor's storage (``copy=False``); receiving builds
tensors on the frames' buffers, so a 16 MiB activation is never copied in Python. The layout is
apart from the ids so that both ends can keep the layouts they have seen: a small message then
costs one msgpack call per end beyond building its tensors.

A message whose tensors hold at most :data:`INLINE_BYTES` travels as the header frame alone,
its tensors' bytes after the ids, each from the next multiple of 8 bytes of the frame: every
frame costs ZeroMQ a few microseconds, and a CURVE link an encryption, more than copying a few
KiB does. A receiver tells the two apart by the frame count (one frame and a layout with
tensors: they are inline), so the threshold is the sender's choice.

A result may instead leave its tensors in a shared-memory ring (:mod:`fastserve.engine.ring`):
its meta ``shm`` then says which ring and where, and only the header frame travels.

Every field of a received message is checked for type, range and consistency before anything is
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
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np
import torch

from fastserve.errors import WireError
from fastserve.graph.dtypes import DTYPES

VERSION = 3  # 2: the layout apart from the ids, so that it can be cached; 3: small tensors inline
KINDS = ("data", "error", "control", "reply")
# A valid header is far below this (256 specs with 256-character names: ~80 KiB); the bound
# also caps what decoding junk costs before it is refused (~128K Python objects, a few ms)
MAX_HEADER_BYTES = 128 << 10
MAX_FRAME_BYTES = 1 << 32  # 4 GiB: one tensor
INLINE_BYTES = 16 << 10  # a message's tensors up to this size travel in its header frame
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES + MAX_HEADER_BYTES  # ZMQ_MAXMSGSIZE of receiving sockets
MAX_ELEMENTS = 1 << 40  # product of a shape's dimensions, zero-size ones counted as 1
MAX_TENSORS = 256
MAX_DIMS = 8
MAX_NAME = 256  # characters in a tensor name
MAX_TEXT = 2048  # characters in any string of meta (an error's text is cut to this)
MAX_TIMINGS = 512  # stages a message may have passed; a rank refuses to add the 513th
MAX_ID = (1 << 63) - 1  # request and micro-batch ids are non-negative int64
SHM_ALIGN = 64  # every tensor in a shared-memory ring starts on a cache line
MAX_SEQS = 512  # sequences in one generation step (and freed by one message)
MAX_PEERS = 64  # endpoints a rank sends its output to (the ranks of a widened stage)
MAX_NODES = 1 << 16  # node names in a rank's "ready" event (a captured model has one per op)
# the receiver's msgpack bound on any array: the longest list a schema allows (the header's byte
# bound caps the work a junk header can cause anyway)
MAX_ARRAY = max(MAX_NODES, MAX_TENSORS + MAX_TIMINGS)

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


# The schema builders return partial applications of module-level checkers rather than
# closures: the checks are then plain functions, cheap to call and each reachable by mutation
# testing. The builders themselves run once, at import, where mutmut cannot switch a mutant on
# (a broken builder fails every test at import), hence their pragmas.

def _optional(check: Check) -> Check:
    return partial(_check_optional, check)  # pragma: no mutate


def _check_optional(check: Check, v: Any) -> str | None:
    return None if v is None else check(v)


def _one_of(*values: str) -> Check:
    return partial(_check_one_of, values)  # pragma: no mutate


def _check_one_of(values: tuple[str, ...], v: Any) -> str | None:
    if type(v) is str and v in values:
        return None
    return f"expected one of {', '.join(values)}, got {_show(v)}"


def _record(fields: dict[str, Check], required: frozenset[str] = frozenset()) -> Check:
    return partial(_check_record, fields, required)  # pragma: no mutate


def _check_record(fields: dict[str, Check], required: frozenset[str], v: Any) -> str | None:
    if type(v) is not dict:
        return f"expected a map, got {_show(v)}"
    return _check_map(v, fields, required)


def _list_of(item: Check, limit: int) -> Check:
    return partial(_check_list, item, limit)  # pragma: no mutate


def _check_list(item: Check, limit: int, v: Any) -> str | None:
    if type(v) is not list or len(v) > limit:
        return f"expected a list of at most {limit} entries, got {_show(v)}"
    for i, x in enumerate(v):
        err = item(x)
        if err:
            return f"[{i}]: {err}"
    return None


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


def _ints(n: int) -> Check:
    return partial(_check_ints, n)  # pragma: no mutate


def _check_ints(n: int, v: Any) -> str | None:
    if type(v) is not list or len(v) != n or any(_int(x) for x in v):
        return f"expected a list of {n} int64s, got {_show(v)}"
    return None


def _sampling(v: Any) -> str | None:
    if type(v) is not list or len(v) != 4 or _number(v[0]) or _int(v[1]) or _number(v[2]) \
            or _int(v[3]):
        return f"expected [temperature, top_k, top_p, seed], got {_show(v)}"
    return None


# a generation step (fastserve.graph.decode): the packed sequences [seq, start, n], the
# sequences whose caches to drop first, the logits tensor the last stage samples from, and how
# it samples each sequence
_GEN = _record({"seqs": _list_of(_ints(3), MAX_SEQS), "free": _list_of(_int, MAX_SEQS),
                "logits": _text, "sample": _list_of(_sampling, MAX_SEQS)},
               frozenset({"seqs"}))

# a result whose tensors lie in a shared-memory ring (fastserve.engine.ring): the ring's id,
# where the message ends in the ring's byte count, and each tensor's offset in layout order
_SHM = _list_of(_int, MAX_TENSORS + 2)

# kind -> (fields, required keys). Control messages go both ways: commands to a rank, and the
# rank's ready/failed events to the coordinator.
META: dict[str, tuple[dict[str, Check], frozenset[str]]] = {
    "data": ({"timings": _TIMINGS, "gen": _GEN, "shm": _SHM}, frozenset()),
    "error": ({"timings": _TIMINGS, "error": _ERROR}, frozenset({"error"})),
    # "load" carries the rank's shard record as a uint8 tensor and the plan hash; "ready"
    # answers with the same hash and the nodes the rank built
    "control": ({"cmd": _one_of(*COMMANDS), "event": _one_of("hello", "ready", "failed"),
                 "rank": _int, "pid": _int, "load_s": _number, "read_s": _number,
                 "rss": _int,
                 "rss_before_load": _int, "rss_peak": _int, "weight_bytes": _int,
                 "error": _text, "plan": _text, "nodes": _list_of(_text, MAX_NODES),
                 "threads": _int, "endpoint": _text, "data_out": _list_of(_text, MAX_PEERS)},
                frozenset()),
    "reply": ({"cmd": _one_of(*COMMANDS), "rank": _int, "ok": _bool, "busy": _bool,
               "processed": _int, "errors": _int, "malformed": _counts, "refused": _int,
               "compute_s": _number, "rss": _int, "pending": _int, "kv_bytes": _int,
               "sequences": _int},
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
# A layout (kind and tensor specs) is the same for every message of one shape, so both ends keep
# the ones they have seen: the sender its packed bytes, the receiver what it validated from those
# exact bytes. A hit skips msgpack and every check of the layout; ids and meta are checked on
# every message. The caches are bounded (a peer sending endless new layouts only costs misses).

_LAYOUT_CACHE = 1024  # entries per cache; cleared when full
_PAD = bytes(8)
_CACHED_LAYOUT_BYTES = 8 << 10  # longer layouts are checked each time, not kept

# a checked tensor spec: name, torch dtype, numpy dtype (None: bfloat16, carried as int16),
# shape, bytes
_Spec = tuple[str, torch.dtype, "np.dtype | None", tuple[int, ...], int]
_received: dict[bytes, tuple[str, tuple[_Spec, ...]]] = {}
_sent: dict[tuple, bytes] = {}


def encode(kind: str, *, request: int = 0, micro: int = 0,
           tensors: Mapping[str, torch.Tensor] | None = None,
           meta: Mapping[str, Any] | None = None, meta_checked: bool = False) -> list:
    """Frames for one message: the header (layout, ids, meta), then a zero-copy view of each
    tensor.

    Everything is checked by the same rules as :func:`decode`, so a message that could not be
    received is refused here, at the sender, with the reason. ``meta_checked``: ``meta`` is
    a decoded message's meta (checked then) with what a rank adds to it, which the bounds
    above keep acceptable: its schema is not checked again here (a rank's step is on the
    critical path of every generated token). The receiver checks it all the same."""
    meta = dict(meta) if meta else {}
    if (meta or kind != "data") and not meta_checked:  # (an empty data meta is valid)
        if kind not in META:
            raise WireError(f"unknown message kind '{kind}'", "kind")
        check_meta(kind, meta)
    request, micro = int(request), int(micro)
    if not (0 <= request <= MAX_ID and 0 <= micro <= MAX_ID):
        raise WireError(f"request and micro-batch ids must be ints in [0, 2**63), got "
                        f"{_show(request)} and {_show(micro)}", "id")
    ids = msgpack.packb([request, micro, meta])
    frames: list = [b""]
    key: list = [kind]
    size = 0
    for name, t in (tensors or {}).items():
        if not t.is_cpu:  # (cheaper than t.device.type: this loop runs for every message)
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype not in _NAMES:  # (before numpy sees it: numpy lacks some torch dtypes)
            raise WireError(f"tensor '{name}' has dtype {t.dtype}, which the wire does not "
                            f"carry", "dtype")
        key.append((name, t.dtype, t.shape))
        # a numpy view of the storage keeps `t` alive for as long as ZeroMQ holds the frame;
        # numpy has no bfloat16, so that one travels as raw bytes
        if not t.numel():
            frames.append(b"")
        elif t.dtype == torch.bfloat16:
            frames.append(t.view(torch.int16).numpy())
        else:
            frames.append(t.numpy())
        size += t.nbytes
    layout = _sent.get(tuple(key))
    if layout is None:
        layout = _pack_layout(key)
    head = [layout, len(ids).to_bytes(4, "little"), ids]
    at = len(layout) + 4 + len(ids)
    if len(frames) > 1 and size <= INLINE_BYTES and "shm" not in meta and \
            at + size + 8 * len(frames) <= MAX_HEADER_BYTES:
        for array in frames[1:]:
            if not isinstance(array, bytes):  # (b"": an empty tensor, no bytes)
                pad = -at % 8
                head += [_PAD[:pad], array]
                at += pad + array.nbytes
        return [b"".join(head)]
    if at > MAX_HEADER_BYTES:
        raise WireError(f"header of {at} bytes exceeds {MAX_HEADER_BYTES}", "size")
    frames[0] = b"".join(head)
    return frames


def _pack_layout(key: list) -> bytes:
    """The layout of ``key`` ([kind, (name, dtype, shape), ...]) with its length in front,
    checked by decoding it (so a sender refuses what a receiver would), and remembered."""
    kind, specs = key[0], []  # (encode checked the kind)
    for name, dtype, shape in key[1:]:  # (encode checked every dtype)
        specs.append([name, _NAMES[dtype], list(shape)])
    if len(specs) > MAX_TENSORS:
        raise WireError(f"{len(specs)} tensors in one message; at most {MAX_TENSORS}", "tensors")
    packed = msgpack.packb([VERSION, kind, specs])
    if len(packed) > MAX_HEADER_BYTES:
        raise WireError(f"layout of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}", "size")
    _layout(memoryview(packed))
    layout = len(packed).to_bytes(4, "little") + packed
    if len(layout) <= _CACHED_LAYOUT_BYTES:
        if len(_sent) >= _LAYOUT_CACHE:
            _sent.clear()
        _sent[tuple(key)] = layout
    return layout


def decode(frames: Sequence[Any], rings: Mapping[int, Any] | None = None) -> Message:
    """Validate and decode frames from :func:`encode`; raise :class:`WireError` otherwise.

    ``rings``: the shared-memory rings (id -> buffer) results may lie in (see
    :mod:`fastserve.engine.ring`); a message whose meta says ``shm`` has no tensor frames, and
    its tensors are views of its ring, each checked to lie inside it."""
    try:
        return _decode(frames, rings)
    except RecursionError:  # a backstop: no check should recurse on received data
        raise WireError("header nested too deeply", "header") from None


def _decode(frames: Sequence[Any], rings: Mapping[int, Any] | None = None) -> Message:
    if not frames:
        raise WireError("empty message", "empty")
    if len(frames) > MAX_TENSORS + 1:
        raise WireError(f"{len(frames)} frames; at most {MAX_TENSORS + 1}", "tensors")
    head = memoryview(frames[0])  # a zmq.Frame, bytes, or any buffer
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}", "size")
    n = int.from_bytes(head[:4], "little")
    if head.nbytes < 4 or n > head.nbytes - 4:
        raise WireError(f"a header of {head.nbytes} bytes cannot hold its layout "
                        f"(length {n if head.nbytes >= 4 else 'missing'})", "header")
    kind, specs = _layout(head[4:4 + n])
    at = 4 + n
    m = int.from_bytes(head[at:at + 4], "little")
    if head.nbytes < at + 4 or m > head.nbytes - at - 4:
        raise WireError(f"a header of {head.nbytes} bytes cannot hold its ids after a layout of "
                        f"{n} (length {m if head.nbytes >= at + 4 else 'missing'})", "header")
    request, micro, meta = _ids(kind, head[at + 4:at + 4 + m])
    at += 4 + m
    if "shm" in meta:
        _all_read(head, at, "a shared-memory message")
        return Message(kind, request, micro, _in_ring(meta["shm"], specs, frames, rings), meta)
    tensors: dict[str, torch.Tensor] = {}
    if len(frames) == 1 and specs:  # small: the tensors' bytes follow the ids
        for spec in specs:
            if spec[4]:
                at += -at % 8
                if spec[4] > head.nbytes - at:
                    raise WireError(f"tensor '{spec[0]}' declares {spec[4]} bytes, the header "
                                    f"has {max(0, head.nbytes - at)} left for it", "frames")
            tensors[spec[0]] = _view(head, spec, at)
            at += spec[4]
        _all_read(head, at, "a message's inline tensors")
        return Message(kind, request, micro, tensors, meta)
    _all_read(head, at, "the ids")
    if len(frames) != len(specs) + 1:
        raise WireError(f"the layout declares {len(specs)} tensors but {len(frames) - 1} frames "
                        f"follow (truncated or padded message)", "frames")
    for spec, frame in zip(specs, frames[1:]):
        buf = memoryview(frame)
        if buf.nbytes != spec[4]:
            raise WireError(f"tensor '{spec[0]}' declares {spec[4]} bytes, its frame has "
                            f"{buf.nbytes}", "frames")
        tensors[spec[0]] = _view(buf, spec)
    return Message(kind, request, micro, tensors, meta)


def _all_read(head: memoryview, at: int, what: str) -> None:
    if at != head.nbytes:
        raise WireError(f"{head.nbytes - at} bytes follow {what} in the header", "header")


def _view(buf: Any, spec: _Spec, at: int = 0) -> torch.Tensor:
    """The tensor of ``spec`` on ``buf``'s bytes from offset ``at`` (checked to be there)."""
    _, dtype, np_dtype, shape, nbytes = spec
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if np_dtype is None:  # bfloat16 travels as int16 and is reinterpreted
        arr = np.frombuffer(buf, np.int16, nbytes // 2, at).reshape(shape)
        return torch.from_numpy(arr).view(torch.bfloat16)
    # numpy builds the view with less per-call overhead than torch.frombuffer + view, which
    # matters for small messages
    return torch.from_numpy(np.frombuffer(buf, np_dtype, nbytes // np_dtype.itemsize,
                                          at).reshape(shape))


def _in_ring(shm: list, specs: tuple[_Spec, ...], frames: Sequence[Any],
             rings: Mapping[int, Any] | None) -> dict[str, torch.Tensor]:
    """Tensors viewing a ring: ``shm`` is [ring id, end, offset per tensor]."""
    ring = rings.get(shm[0]) if rings is not None and shm else None
    if ring is None:
        raise WireError(f"a shared-memory message names ring {_show(shm[0] if shm else None)}, "
                        f"which this link does not have", "shm")
    if len(frames) != 1 or len(shm) != len(specs) + 2:
        raise WireError(f"a shared-memory message carries {len(frames) - 1} frames and "
                        f"{len(shm) - 2} offsets for {len(specs)} tensors", "shm")
    size = memoryview(ring).nbytes
    tensors: dict[str, torch.Tensor] = {}
    for spec, at in zip(specs, shm[2:]):
        name, nbytes = spec[0], spec[4]
        if at % SHM_ALIGN or not 0 <= at <= size - nbytes:
            raise WireError(f"tensor '{name}' at offset {at} ({nbytes} bytes) is not an "
                            f"aligned place inside the ring of {size} bytes", "shm")
        tensors[name] = _view(ring, spec, at)
    return tensors


def _unpack(buf: memoryview, what: str) -> Any:
    try:
        # msgpack's own limits bound what a hostile header can make it allocate
        return msgpack.unpackb(buf, raw=False, strict_map_key=True,
                               max_array_len=MAX_ARRAY, max_map_len=64)
    except Exception as e:  # msgpack raises many types for garbage
        raise WireError(f"{what} is not valid msgpack: {type(e).__name__}", "header") from None


def _layout(buf: memoryview) -> tuple[str, tuple[_Spec, ...]]:
    """The kind and checked tensor specs of a layout: [version, kind, [spec, ...]]."""
    raw = buf.tobytes() if buf.nbytes <= _CACHED_LAYOUT_BYTES else None
    known = _received.get(raw) if raw is not None else None
    if known is not None:
        return known
    layout = _unpack(buf, "layout")
    if type(layout) is not list or len(layout) != 3:
        raise WireError(f"the layout must be [version, kind, tensors], got {_show(layout)}",
                        "header")
    version, kind, specs = layout
    if type(version) is not int or version != VERSION:
        raise WireError(f"unknown wire version {_show(version)}; this build speaks {VERSION}",
                        "version")
    if type(kind) is not str or kind not in META:
        raise WireError(f"unknown message kind {_show(kind)}", "kind")
    if type(specs) is not list or len(specs) > MAX_TENSORS:
        raise WireError("the layout's tensors must be a list of at most "
                        f"{MAX_TENSORS} [name, dtype, shape] entries", "tensors")
    checked = tuple(_check_spec(s) for s in specs)
    if len({s[0] for s in checked}) != len(checked):
        raise WireError("a tensor name appears twice", "tensors")
    known = (kind, checked)
    if raw is not None:
        if len(_received) >= _LAYOUT_CACHE:
            _received.clear()
        _received[raw] = known
    return known


def _ids(kind: str, buf: memoryview) -> tuple[int, int, dict]:
    """Request id, micro-batch id and meta: [req, mb, meta], each checked."""
    ids = _unpack(buf, "ids")
    if type(ids) is not list or len(ids) != 3:
        raise WireError(f"the ids must be [req, mb, meta], got {_show(ids)}", "header")
    req, mb, meta = ids
    if type(req) is not int or type(mb) is not int or not (0 <= req <= MAX_ID
                                                          and 0 <= mb <= MAX_ID):
        raise WireError(f"'req' and 'mb' must be ints in [0, 2**63), got {_show(req)} "
                        f"and {_show(mb)}", "id")
    if type(meta) is not dict or meta or kind != "data":
        check_meta(kind, meta)
    return req, mb, meta


def _check_spec(spec: Any) -> _Spec:
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
    return name, t, _NUMPY.get(t), tuple(shape), nbytes
