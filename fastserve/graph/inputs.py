"""Input tensors from a file (``fastserve run --input x.npz``), checked against the graph.

The file is a ``.npz`` (``numpy.savez``) with one array per graph input, named like the input.
It is read without pickle (``allow_pickle=False``), each array's size is checked before it is
decompressed (a small zip can expand to terabytes), and every mismatch with the graph (a
missing or unknown name, dtype, rank, a fixed dim, a token id out of range) is an
:class:`InputsError` naming the file and the array, before any rank process is started.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from fastserve.errors import InputsError
from fastserve.graph.graph import Graph
from fastserve.graph.dtypes import torch_dtype
from fastserve.graph.memory import available_memory
from fastserve.yamlio import read_head

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with entries, an empty zip


def read_inputs(path: str | Path) -> dict[str, torch.Tensor]:
    """The arrays of a ``.npz`` file as tensors, by name."""
    import numpy as np

    p = str(path)
    magic = read_head(p, 4, "inputs file", InputsError)
    if magic not in _ZIP_MAGIC:
        what = "empty" if not magic else "not a .npz archive"
        raise InputsError(f"the inputs file is {what}; write one array per graph input with "
                          f"numpy.savez(path, input_name=array)", file=p)
    try:
        with np.load(p, allow_pickle=False) as data:  # no pickle, ever
            need = sum(_array_bytes(data.zip, k, p) for k in data.files)
            free = available_memory()
            if free is not None and need > free:
                raise InputsError(f"the arrays need {need} bytes, more than the {free} bytes "
                                  f"this machine has available", file=p)
            out = {}
            for k in data.files:
                try:
                    out[k] = torch.from_numpy(data[k].copy())
                except TypeError:  # a dtype torch has no tensor for (strings, ...)
                    raise InputsError(f"array of dtype {data[k].dtype} cannot be a tensor "
                                      f"(numbers and booleans only)", file=p, key=k) from None
            return out
    except InputsError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError,
            MemoryError) as e:
        raise InputsError(f"cannot read the arrays: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}", file=p) from None


def _array_bytes(archive: zipfile.ZipFile, key: str, file: str) -> int:
    """Bytes of array ``key`` from its .npy header alone. numpy allocates the whole array
    before reading a zip member, so a header claiming 4 TB must be refused before that."""
    import numpy as np
    from numpy.lib import format as npy

    member = f"{key}.npy"
    with archive.open(member) as f:
        version = npy.read_magic(f)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else \
            npy.read_array_header_2_0
        shape, _, dtype = read_header(f)
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > archive.getinfo(member).file_size:
        raise InputsError(f"the array header claims shape {shape} ({need} bytes) but the file "
                          f"holds only {archive.getinfo(member).file_size} bytes for it",
                          file=file, key=key)
    return need


def check_inputs(graph: Graph, inputs: dict[str, torch.Tensor],
                 file: str | None = None) -> None:
    """Refuse inputs that do not fit ``graph``: names, dtypes, ranks, fixed dims, one batch
    size, integer ids within the declared ``high``."""
    declared = {s.name: s for s in graph.spec.inputs}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise InputsError(f"array '{unknown[0]}' is not an input of graph '{graph.name}' (its "
                          f"inputs: {', '.join(declared)})", file=file, key=unknown[0])
    batch: tuple[str, int] | None = None
    for name, spec in declared.items():
        if name not in inputs:
            raise InputsError(f"no array for graph input '{name}'", file=file, key=name)
        t = inputs[name]
        if t.dtype != torch_dtype(spec.dtype):
            raise InputsError(f"dtype {str(t.dtype).removeprefix('torch.')}, graph input "
                              f"'{name}' is {spec.dtype}", file=file, key=name)
        if t.dim() != len(spec.shape):
            raise InputsError(f"shape {tuple(t.shape)} has {t.dim()} dims, graph input "
                              f"'{name}' has {len(spec.shape)}: {list(spec.shape)}", file=file,
                              key=name)
        for i, (got, want) in enumerate(zip(t.shape, spec.shape)):
            if isinstance(want, int) and got != want:
                raise InputsError(f"dim {i} is {got}, graph input '{name}' fixes it to {want}",
                                  file=file, key=name)
            if got == 0:
                raise InputsError(f"dim {i} is empty: shape {tuple(t.shape)}", file=file,
                                  key=name)
        if spec.shape and spec.shape[0] == "batch":
            if batch is not None and batch[1] != t.shape[0]:
                raise InputsError(f"batch {t.shape[0]}, input '{batch[0]}' has batch {batch[1]}",
                                  file=file, key=name)
            batch = (name, t.shape[0])
        if spec.high is not None and t.numel() and not t.dtype.is_floating_point \
                and t.dtype != torch.bool and (int(t.min()) < 0 or int(t.max()) >= spec.high):
            raise InputsError(f"values must lie in [0, {spec.high}), found {int(t.min())}.."
                              f"{int(t.max())}", file=file, key=name)
