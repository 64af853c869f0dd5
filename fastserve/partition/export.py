"""Per-shard checkpoints: ``export(sharding, dir)`` and ``load_shard(dir, index)``.

An export directory holds one safetensors file per shard and ``manifest.json``::

    {"format": "fastserve-shards/1", "graph": "gpt2", "strategy": "weight", "policy": {...},
     "dims": {"seq": 16}, "seed": 0,
     "spec": {"file": "graph.yaml", "sha256": "...", "bytes": 1234},  # a copy of the spec
     "shards": [{"index": 0, "file": "shard-000.safetensors", "sha256": "...", "bytes": 123,
                 "nodes": [...], "inputs": [...], "outputs": [...],
                 "tensors": ["wte.weight", ...], "aliases": {"lm_head.weight": "wte.weight"}}]}

A shard file holds the weights of that shard's nodes under ``<node id>.<name>`` keys, including
a copy of any tied tensor owned by another shard, so a rank needs nothing but its own file (and
the spec). A tensor reachable under several names within one shard is stored once; the other
names are ``aliases``.

Reading an export back is :mod:`fastserve.partition.manifest`'s job: :func:`load_manifest`
validates the manifest, confines every path to the directory and verifies every hash before it
returns; :func:`load_shard` hashes the bytes of its shard file that it then parses.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fastserve.errors import WeightsError
from fastserve.graph.graph import Graph
from fastserve.graph.module import SubgraphModule, build_nodes
from fastserve.graph.spec import WeightsSpec
from fastserve.partition.manifest import (FORMAT, MANIFEST, ManifestError, check_hash,
                                          exported_spec, load_manifest, read_verified,
                                          sha256_file)
from fastserve.partition.sharding import Sharding

if TYPE_CHECKING:
    from fastserve.limits import Limits

SPEC_COPY = "graph.yaml"
# re-exported: these lived here before the manifest reader had a module of its own
__all__ = ["FORMAT", "MANIFEST", "SPEC_COPY", "ManifestError", "check_hash", "export",
           "load_manifest", "load_shard", "sha256_file"]


def export(sharding: Sharding, directory: str | Path,
           weights: WeightsSpec | None = None) -> Path:
    """Write every shard's weights and the manifest to ``directory`` (created if needed; files of
    an earlier export there are replaced). Shards are built one at a time. Returns the manifest
    path."""
    from safetensors.torch import save_file

    graph = sharding.graph
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    spec_entry = None
    if graph.spec.file and Path(graph.spec.file).is_file():
        shutil.copyfile(graph.spec.file, out / SPEC_COPY)
        spec_entry = {"file": SPEC_COPY, "sha256": sha256_file(out / SPEC_COPY),
                      "bytes": (out / SPEC_COPY).stat().st_size}
    entries = []
    for shard in sharding.shards:
        modules = build_nodes(graph, shard.nodes, weights)
        tensors, aliases = _shard_tensors(modules)
        name = f"shard-{shard.index:03d}.safetensors"
        save_file(tensors, str(out / name), metadata={"graph": graph.name,
                                                       "shard": str(shard.index)})
        del modules, tensors
        entries.append({"index": shard.index, "file": name, "sha256": sha256_file(out / name),
                        "bytes": (out / name).stat().st_size, "nodes": list(shard.nodes),
                        "inputs": list(shard.inputs), "outputs": list(shard.outputs),
                        "tensors": sorted(_keys(out / name)), "aliases": aliases})
    manifest = {"format": FORMAT, "graph": graph.name, "strategy": sharding.strategy,
                "policy": _jsonable(dict(sharding.policy)),
                "dims": {k: v for k, v in graph.dims.items() if k != "batch"},
                "seed": (weights or graph.spec.weights).seed, "spec": spec_entry,
                "shards": entries}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def load_shard(directory: str | Path, index: int, graph: Graph | None = None, *,
               trust_code: bool = False, limits: Limits | None = None) -> SubgraphModule:
    """Build shard ``index`` of an export alone: its nodes, with the weights of its own file.

    ``graph`` defaults to the spec copied into the export (verified), compiled at the exported
    dims; ``trust_code`` and ``limits`` apply to that spec as in
    :func:`fastserve.graph.load_spec`. The shard file must stay inside the export and match the
    manifest's sha256; it is read once and those very bytes are hashed and parsed (safetensors:
    no code runs on load).
    Example::

        module = load_shard("out/gpt2-4", 2)
        outputs = module({name: tensor for name in module.input_names})
    """
    # the driver hashed every shard already; this rank hashes the one it reads, below, on the
    # bytes it uses, so a file replaced in between is still refused
    return shard_of(load_manifest(directory, verify_shards=False), index, graph,
                    trust_code=trust_code, limits=limits)


def shard_of(manifest: dict[str, Any], index: int, graph: Graph | None = None, *,
             trust_code: bool = False, limits: Limits | None = None) -> SubgraphModule:
    """Shard ``index`` of an export whose manifest was read by
    :func:`~fastserve.partition.manifest.load_manifest` (or, on a host the export was sent to,
    :func:`~fastserve.partition.manifest.sent_manifest`); see :func:`load_shard`."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    where = manifest["directory"]
    shards = manifest["shards"]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(shards):
        raise WeightsError(f"export '{where}' has {len(shards)} shards; there is no shard "
                           f"{index!r}")
    entry = shards[index]
    path = Path(entry["path"])
    # every file verified before anything is compiled; the tensors are parsed before the nodes
    # are built and the raw bytes dropped at once, so the peak is two copies of the shard's
    # weights (parsed tensors + module parameters), not three
    data = read_verified(path, entry["sha256"], "shard file", size=entry["bytes"])
    try:
        tensors = load_safetensors(data)
    except SafetensorError as e:
        raise WeightsError(f"shard file '{path}' is not a valid safetensors file: {e}") from None
    del data
    if graph is None:
        from fastserve.graph.compiler import compile_graph

        graph = compile_graph(exported_spec(manifest, trust_code=trust_code, limits=limits),
                              manifest["dims"])
    if graph.name != manifest["graph"]:
        raise WeightsError(f"export '{where}' is of graph '{manifest['graph']}', not "
                           f"'{graph.name}'")
    unknown = [n for n in entry["nodes"] if n not in graph.nx]
    if unknown:
        raise WeightsError(f"shard {index} of export '{where}' holds nodes {unknown[:5]} that "
                           f"graph '{graph.name}' does not have")
    # build the nodes (seeded; never from the spec's own checkpoint), then overwrite every
    # tensor from the shard file: the file is the source of truth
    seeded = dataclasses.replace(graph.spec.weights, seed=manifest["seed"], checkpoint=None)
    modules = build_nodes(graph, entry["nodes"], seeded)
    if graph.spec.source is not None and graph.spec.source.factory.startswith("<"):
        # an in-process capture hands out the captured model's own modules: do not overwrite
        # the user's model with the file's tensors (one deepcopy keeps tied tensors shared)
        modules = copy.deepcopy(modules)
    aliases = entry["aliases"]
    with torch.no_grad():
        for node, module in modules.items():
            for name, dst in module.state_dict(keep_vars=True).items():
                key = aliases.get(f"{node}.{name}", f"{node}.{name}")
                src = tensors.get(key)
                if src is None:
                    raise WeightsError(f"shard file '{path}' lacks tensor '{key}'")
                if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                    raise WeightsError(f"shard file '{path}' tensor '{key}' is "
                                       f"{tuple(src.shape)} {src.dtype}, the graph expects "
                                       f"{tuple(dst.shape)} {dst.dtype}")
                dst.copy_(src)
    return SubgraphModule(graph, modules, entry["inputs"], entry["outputs"])


def _shard_tensors(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor],
                                                           dict[str, str]]:
    """``<node>.<name>`` -> tensor for every parameter and persistent buffer of the shard's
    nodes, each storage once; the names of repeated storages map to the stored name."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored: dict[tuple, str] = {}
    for node, module in modules.items():
        for name, t in module.state_dict(keep_vars=True).items():
            key = f"{node}.{name}"
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
            if ident in stored and t.numel():
                aliases[key] = stored[ident]
                continue
            stored[ident] = key
            tensors[key] = t.detach().contiguous()
    return tensors, aliases


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
