"""The one checkpoint reader: keys and tensors of a safetensors file (memory-mapped, so only the
tensors asked for are read) or of a torch file, loaded with ``weights_only=True`` (no pickled
code can run). Shard files of an export are read by :mod:`fastserve.partition.export`, which
checks their hash on the bytes first."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from fastserve.errors import WeightsError


def resolve_path(path: str, base: str | None) -> Path:
    """``path`` relative to the directory of the file ``base`` (a spec), unless absolute."""
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = Path(base).parent / p
    return p


@contextmanager
def open_checkpoint(path: Path) -> Iterator[tuple[set[str], Callable[[str], torch.Tensor]]]:
    """``(keys, get)`` for the checkpoint at ``path``; :class:`WeightsError` if it is missing
    or not a checkpoint."""
    if not path.exists():
        raise WeightsError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                yield set(f.keys()), f.get_tensor
        except SafetensorError as e:
            raise WeightsError(f"cannot read checkpoint '{path}': {e}") from None
        return
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a non-checkpoint file
        raise WeightsError(f"cannot read checkpoint '{path}': {e}") from None
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state "
                           f"dict")
    yield set(state), state.__getitem__


def node_subset(path: Path, nodes: list[str], out_dir: Path) -> Path:
    """The tensors of the safetensors checkpoint at ``path`` that belong to ``nodes``
    (``<node>.<param>`` keys), written to a file of their own in ``out_dir``, named by what it
    holds so that the same subset is the same file; ``path`` itself when it holds nothing
    else. A host that runs only some nodes is sent only their weights."""
    from safetensors.torch import save_file

    prefixes = tuple(f"{n}." for n in nodes)
    with open_checkpoint(path) as (keys, get):
        wanted = sorted(k for k in keys if k.startswith(prefixes))
        if len(wanted) == len(keys):
            return path
        tag = hashlib.sha256("\0".join([str(path), str(path.stat().st_mtime_ns),
                                         *wanted]).encode()).hexdigest()[:16]
        out = out_dir / f"{path.stem}.{tag}.safetensors"
        if not out.exists():
            save_file({k: get(k).contiguous() for k in wanted}, str(out))
    return out
