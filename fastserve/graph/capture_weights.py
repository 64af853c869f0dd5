"""The weights of captured nodes: who owns a shared tensor, and loading a checkpoint into a subset.

A tensor used by several captured nodes (a tied ``lm_head``) is owned by the first node in graph
order and *borrowed* by the others. Checkpoint keys are the model's own ``state_dict`` names; a
tied tensor is found under any of its names (``torch.export`` keeps one name for it, a checkpoint
may have saved another), and ``<node id>.<name>`` keys, as written by
:func:`fastserve.graph.module.state_dict`, are accepted too.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from fastserve.errors import WeightsError
from fastserve.graph.fxsplit import Part
from fastserve.graph.checkpoint import open_checkpoint, resolve_path


def ownership(part: Part, owner: dict[int, str], keep: list) -> tuple[int, int, int]:
    """``(params owned, bytes owned incl. buffers, bytes borrowed)`` of one part; ``owner`` maps
    ``id(tensor)`` to the first part that used it and is updated, ``keep`` holds the tensors
    so that their ids stay unique while counting."""
    params = params_bytes = borrowed = 0
    seen: set[int] = set()
    for t in state(part.module).values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        if owner.setdefault(id(t), part.id) != part.id:
            borrowed += size
            continue
        keep.append(t)
        params_bytes += size
        if isinstance(t, nn.Parameter):
            params += t.numel()
    return params, params_bytes, borrowed


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """name -> every name of the same tensor in the model (tied weights: torch.export keeps one
    name for a tied tensor, a checkpoint may have saved it under another)."""
    by_id: dict[int, list[str]] = {}
    for k, t in state(model).items():
        by_id.setdefault(id(t), []).append(k)
    return {k: names for names in by_id.values() for k in names}


def load_checkpoint(modules: Mapping[str, nn.Module], names: Mapping[str, list[str]],
                    path: str, base: str | None) -> None:
    """Copy the tensors of ``modules`` (node id -> module) from a checkpoint, reading only those.
    ``names`` are the tensors' aliases (:func:`aliases`); ``path`` is relative to ``base``."""
    p = resolve_path(path, base)
    with open_checkpoint(p) as (keys, get):
        _copy_from(modules, names, keys, get, p)


def _copy_from(modules, names, keys: set[str], get, path) -> None:
    missing = []
    with torch.no_grad():
        for node_id, m in modules.items():
            for k, dst in state(m).items():
                candidates = [*names.get(k, [k]), f"{node_id}.{k}"]
                found = next((n for n in candidates if n in keys), None)
                if found is None:
                    if isinstance(dst, nn.Parameter):  # buffers may be computed, not saved
                        missing.append(k)
                    continue
                src = get(found)
                if tuple(src.shape) != tuple(dst.shape):
                    raise WeightsError(f"checkpoint '{path}' tensor '{found}' has shape "
                                       f"{tuple(src.shape)}, the graph expects "
                                       f"{tuple(dst.shape)}")
                dst.copy_(src)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"checkpoint '{path}' lacks tensors {', '.join(missing[:5])}{more}")
