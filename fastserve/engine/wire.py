"""The wire format: a msgpack header plus one raw frame per tensor, without copies.

A message is a list of ZeroMQ frames::

    frame 0   msgpack map {"v": 1, "kind": "data", "req": 7, "mb": 0,
                           "tensors": [["h.3", "float32", [4, 16, 768]], ...],
                           "meta": {...}}          # small JSON-like values: timings, errors
    frame 1.. the bytes of each tensor, in header order (C-contiguous, native byte order)

Sending hands ZeroMQ a memoryview of each tensor's storage (``copy=False``); receiving builds
tensors on the frames' buffers (``torch.frombuffer``), so a 16 MiB activation is never copied in
Python. No pickle anywhere: a peer can only make us allocate what the header declares, within
the limits below, and everything that does not match is rejected with :class:`WireError`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
import torch

from fastserve.errors import WireError

VERSION = 1
KINDS = frozenset({"data", "result", "error", "control", "reply"})
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: thousands of tensor specs and error text
MAX_FRAME_BYTES = 1 << 32  # 4 GiB: one tensor
MAX_TENSORS = 4096
MAX_DIMS = 8

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
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


def encode(kind: str, *, request: int = 0, micro: int = 0,
           tensors: Mapping[str, torch.Tensor] | None = None,
           meta: Mapping[str, Any] | None = None) -> list:
    """Frames for one message: the header bytes, then a zero-copy view of each tensor."""
    if kind not in KINDS:
        raise WireError(f"unknown message kind '{kind}'")
    specs = []
    frames: list = [b""]
    for name, t in (tensors or {}).items():
        if not t.is_cpu:  # (cheaper than t.device.type: this loop runs for every message)
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        dtype = _NAMES.get(t.dtype)
        if dtype is None:
            raise WireError(f"tensor '{name}' has dtype {t.dtype}, which the wire does not carry")
        specs.append([name, dtype, list(t.shape)])
        # a numpy view of the storage keeps `t` alive for as long as ZeroMQ holds the frame;
        # numpy has no bfloat16, so that one travels as raw bytes
        if not t.numel():
            frames.append(b"")
        elif t.dtype == torch.bfloat16:
            frames.append(t.view(torch.int16).numpy())
        else:
            frames.append(t.numpy())
    header = {"v": VERSION, "kind": kind, "req": int(request), "mb": int(micro),
              "tensors": specs, "meta": dict(meta or {})}
    frames[0] = msgpack.packb(header, use_bin_type=True)
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frames[0])} bytes exceeds {MAX_HEADER_BYTES}")
    return frames


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame or bytes
    return memoryview(buf)


def decode(frames: Sequence[Any]) -> Message:
    """Validate and decode frames from :func:`encode`; raise :class:`WireError` otherwise."""
    if not frames:
        raise WireError("empty message")
    head = _buffer(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for garbage
        raise WireError(f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    if header.get("v") != VERSION:
        raise WireError(f"unknown wire version {header.get('v')!r}; this build speaks {VERSION}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}")
    req, mb, meta = header.get("req"), header.get("mb"), header.get("meta", {})
    if not isinstance(req, int) or not isinstance(mb, int) or not isinstance(meta, dict):
        raise WireError("header fields 'req'/'mb' must be ints and 'meta' a map")
    specs = header.get("tensors")
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise WireError("header 'tensors' must be a list of at most "
                        f"{MAX_TENSORS} [name, dtype, shape] entries")
    if len(frames) != len(specs) + 1:
        raise WireError(f"header declares {len(specs)} tensors but {len(frames) - 1} frames "
                        f"follow (truncated or padded message)")
    tensors: dict[str, torch.Tensor] = {}
    for spec, frame in zip(specs, frames[1:]):
        name, dtype, shape = _check_spec(spec)
        buf = _buffer(frame)
        want = math.prod(shape) * dtype.itemsize
        if buf.nbytes != want or want > MAX_FRAME_BYTES:
            raise WireError(f"tensor '{name}' declares {want} bytes, its frame has {buf.nbytes}")
        if want == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # numpy builds the view with less per-call overhead than torch.frombuffer + view, which
        # matters for small messages; bfloat16 travels as int16 and is reinterpreted
        if dtype == torch.bfloat16:
            arr = np.frombuffer(buf, np.int16).reshape(shape)
            tensors[name] = torch.from_numpy(arr).view(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(np.frombuffer(buf, _NUMPY[dtype]).reshape(shape))
    return Message(kind, req, mb, tensors, meta)


def _check_spec(spec: Any) -> tuple[str, torch.dtype, tuple[int, ...]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise WireError("a tensor spec must be [name, dtype, shape]")
    name, dtype, shape = spec
    if not isinstance(name, str) or not name:
        raise WireError("a tensor name must be a non-empty string")
    if dtype not in DTYPES:
        raise WireError(f"tensor '{name}' has unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape)):
        raise WireError(f"tensor '{name}' has a bad shape {shape!r}")
    return name, DTYPES[dtype], tuple(shape)
