"""The weights of captured nodes: a model built without them, who owns a shared tensor, and
giving a subset of nodes their tensors (:func:`materialise`, the one place that reads a
captured model's checkpoint).

**Without weights.** :func:`skeleton` builds a model whose parameters never exist: each is moved
to the ``meta`` device the moment the model registers it (a fresh ``torch.empty`` that is never
written costs no resident memory), while buffers, which models compute when they are built
(rotary frequencies, position ids), are kept. The model is captured on ``meta``; then
:func:`materialise` gives the parts a process runs their tensors, and only those: read from a
checkpoint, or initialised from the seed. So neither the driver (which only compiles) nor a rank
(which holds one shard) ever holds the whole model.

**Seeded weights** are made per module, not from one global random stream (which would need the
whole model built in order): the module that owns a parameter is initialised alone by the
model's own initialiser (``_init_weights`` of a transformers model, else the module's
``reset_parameters()``; parameters neither covers stay zero) from a generator seeded with
``hash(seed, module path)``. Any process building any subset gets the same values;
:func:`seed_weights` gives a live model the same weights, for comparisons with the eager model.

**Sharing.** A tensor used by several captured nodes (a tied ``lm_head``) is owned by the first
node in graph order and *borrowed* by the others. Checkpoint keys are the model's own
``state_dict`` names; a tied tensor is found under any of its names (``torch.export`` keeps one
name for it, a checkpoint may have saved another), and ``<node id>.<name>`` keys, as written by
:func:`fastserve.graph.module.state_dict`, are accepted too.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import nn

from fastserve.errors import WeightsError
from fastserve.graph.checkpoint import open_checkpoint, resolve_path
from fastserve.graph.fxsplit import Part
from fastserve.graph.module import node_seed
from fastserve.graph.spec import WeightsSpec


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


# --- a model without weights ----------------------------------------------------------------------


def skeleton(build: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``build()``'s model with every parameter and buffer on ``meta``, and the values its
    buffers had when it was built (by name)."""
    def to_meta(_module, _name, param):
        if param is None or param.is_meta:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    hook = nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        model = build()
    finally:
        hook.remove()
    buffers = {k: b for k, b in model.named_buffers(remove_duplicate=False) if not b.is_meta}
    return model.to("meta"), buffers


def materialise(modules: Mapping[str, nn.Module], names: Mapping[str, list[str]],
                weights: WeightsSpec, *, base: str | None = None,
                model: Callable[[], tuple[nn.Module, Mapping[str, torch.Tensor]]] | None = None
                ) -> None:
    """Give the node ``modules`` their tensors, in place: from ``weights.checkpoint`` (only
    these nodes' tensors are read; every parameter must be there), or else seeded per module or
    the model's own buffers, for which ``model()`` gives the :func:`skeleton` (it is called only
    then). A buffer already holding a value (not on ``meta``) keeps it unless the checkpoint has
    one. ``names``: every name of each tensor (:func:`aliases`). A tensor several nodes use is
    made once and shared."""
    # canonical name -> (the node and name that asked first, is it a parameter, on meta)
    wanted = {}
    for node, module in modules.items():
        for k, t in state(module).items():
            wanted.setdefault(names.get(k, [k])[0], (node, k, isinstance(t, nn.Parameter),
                                                     t.is_meta))
    made: dict[str, torch.Tensor] = {}
    if weights.checkpoint:
        path = resolve_path(weights.checkpoint, base)
        for name, (node, k, _, _) in wanted.items():
            # one file open per tensor: safetensors maps the file, and a mapping held open
            # across the shard would keep every page read so far resident beside its copy
            with open_checkpoint(path) as (keys, get):
                found = next((n for n in [*names.get(name, [name]), f"{node}.{k}"]
                              if n in keys), None)
                if found is not None:
                    made[name] = get(found).clone()
    missing = []
    for name, (node, k, is_param, is_meta) in wanted.items():
        if name in made:
            continue
        if is_param and weights.checkpoint:
            missing.append(name)
            continue
        if not is_meta:  # a buffer whose value came with the program
            made[name] = state(modules[node])[k]
            continue
        if model is None:
            raise WeightsError(f"captured node '{node}' needs tensor '{k}', which "
                               f"{'the checkpoint lacks' if weights.checkpoint else 'has no value'}"
                               f", and there is no model to compute it from")
        root, buffers = model()
        if is_param:
            made.update(_seeded(root, name, weights.seed))
            continue
        found = next((n for n in names.get(name, [name]) if n in buffers), None)
        if found is None:
            raise WeightsError(f"captured node '{node}' holds tensor '{k}', which is neither a "
                               f"parameter nor a buffer the model computes when built, and no "
                               f"checkpoint holds it")
        made[name] = buffers[found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"checkpoint '{resolve_path(weights.checkpoint, base)}' lacks "
                           f"tensors {', '.join(missing[:5])}{more}")
    shared: dict[str, torch.Tensor] = {}
    for module in modules.values():
        for k, t in state(module).items():
            name = names.get(k, [k])[0]
            if name not in shared:
                shared[name] = _checked(made[name], t, name, weights.checkpoint)
            _assign(module, k, shared[name])


def _checked(src: torch.Tensor, like: torch.Tensor, name: str, checkpoint) -> torch.Tensor:
    if tuple(src.shape) != tuple(like.shape):
        raise WeightsError(f"checkpoint '{checkpoint}' tensor '{name}' has shape "
                           f"{tuple(src.shape)}, the graph expects {tuple(like.shape)}")
    src = src.to(like.dtype)
    return nn.Parameter(src, requires_grad=False) if isinstance(like, nn.Parameter) else src


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def _seeded(root: nn.Module, name: str, seed: int) -> dict[str, torch.Tensor]:
    """The parameters of the module that owns parameter ``name``, initialised alone from
    ``hash(seed, module path)`` (see the module docstring), by their full names."""
    path, _, _ = name.rpartition(".")
    owner = root.get_submodule(path)
    alone = copy.copy(owner)  # the module's own parameters only: no children, fresh tensors
    alone.__dict__["_modules"] = {}
    alone.__dict__["_parameters"] = {
        k: None if p is None else nn.Parameter(torch.zeros(p.shape, dtype=p.dtype),
                                               requires_grad=False)
        for k, p in owner._parameters.items()}
    alone.__dict__["_buffers"] = {
        k: None if b is None else torch.zeros(b.shape, dtype=b.dtype)
        for k, b in owner._buffers.items()}
    init = getattr(root, "_init_weights", None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(node_seed(seed, path))
        if callable(init):
            init(alone)
        elif callable(getattr(alone, "reset_parameters", None)):
            alone.reset_parameters()
    prefix = f"{path}." if path else ""
    return {prefix + k: p.data for k, p in alone._parameters.items() if p is not None}


def seed_weights(model: nn.Module, seed: int) -> nn.Module:
    """Give a live ``model`` the weights a captured graph with ``weights: {seed: seed}`` has
    (to compare a deployment with the eager model); returns ``model``."""
    names = aliases(model)
    made: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            canonical = names.get(name, [name])[0]
            if canonical not in made:
                made.update(_seeded(model, canonical, seed))
            p.copy_(made[canonical])
    return model
