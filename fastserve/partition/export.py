"""Per-shard checkpoints: ``export(sharding, dir)`` and ``load_shard(dir, index)``.

An export directory holds one safetensors file per shard and ``manifest.json``::

    {"format": "fastserve-shards/1", "graph": "gpt2", "strategy": "weight", "policy": {...},
     "dims": {"seq": 16}, "seed": 0,
     "spec": {"file": "graph.yaml", "sha256": "..."},          # a copy of the graph spec
     "shards": [{"index": 0, "file": "shard-000.safetensors", "sha256": "...", "bytes": 123,
                 "nodes": [...], "inputs": [...], "outputs": [...],
                 "tensors": ["wte.weight", ...], "aliases": {"lm_head.weight": "wte.weight"}}]}

A shard file holds the weights of that shard's nodes under ``<node id>.<name>`` keys, including
a copy of any tied tensor owned by another shard, so a rank needs nothing but its own file (and
the spec). A tensor reachable under several names within one shard is stored once; the other
names are ``aliases``. :func:`load_shard` checks the file's sha256 against the manifest before
reading it and refuses a mismatch with a :class:`WeightsError` naming the file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastserve.errors import WeightsError
from fastserve.graph.graph import Graph
from fastserve.graph.module import SubgraphModule, build_nodes
from fastserve.graph.spec import WeightsSpec
from fastserve.partition.sharding import Sharding

FORMAT = "fastserve-shards/1"
MANIFEST = "manifest.json"
SPEC_COPY = "graph.yaml"


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
        spec_entry = {"file": SPEC_COPY, "sha256": sha256_file(out / SPEC_COPY)}
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


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an export directory."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"'{path}' does not exist; export shards first (fastserve partition "
                           f"SPEC --export DIR)") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read '{path}': {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WeightsError(f"'{path}' is not a FastServe shard manifest (format {FORMAT})")
    for key in ("graph", "shards", "dims", "seed"):
        if key not in manifest:
            raise WeightsError(f"'{path}' lacks the key '{key}'")
    return manifest


def load_shard(directory: str | Path, index: int, graph: Graph | None = None) -> SubgraphModule:
    """Build shard ``index`` of an export alone: its nodes, with the weights of its own file.

    ``graph`` defaults to the spec copied into the export, compiled at the exported dims. The
    file's sha256 must match the manifest. Example::

        module = load_shard("out/gpt2-4", 2)
        outputs = module({name: tensor for name in module.input_names})
    """
    from safetensors import safe_open

    directory = Path(directory)
    manifest = load_manifest(directory)
    shards = manifest["shards"]
    if not isinstance(index, int) or not 0 <= index < len(shards):
        raise WeightsError(f"export '{directory}' has {len(shards)} shards; there is no shard "
                           f"{index!r}")
    entry = shards[index]
    if graph is None:
        graph = _exported_graph(directory, manifest)
    if graph.name != manifest["graph"]:
        raise WeightsError(f"export '{directory}' is of graph '{manifest['graph']}', not "
                           f"'{graph.name}'")
    unknown = [n for n in entry["nodes"] if n not in graph.nx]
    if unknown:
        raise WeightsError(f"shard {index} of export '{directory}' holds nodes {unknown[:5]} that "
                           f"graph '{graph.name}' does not have")
    path = directory / entry["file"]
    check_hash(path, entry["sha256"])
    # build the nodes (seeded; never from the spec's own checkpoint), then overwrite every
    # tensor from the shard file: the file is the source of truth
    seeded = dataclasses.replace(graph.spec.weights, seed=manifest["seed"], checkpoint=None)
    modules = build_nodes(graph, entry["nodes"], seeded)
    if graph.spec.source is not None and graph.spec.source.factory.startswith("<"):
        # an in-process capture hands out the captured model's own modules: do not overwrite
        # the user's model with the file's tensors (one deepcopy keeps tied tensors shared)
        modules = copy.deepcopy(modules)
    aliases = entry.get("aliases", {})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for node, module in modules.items():
                for name, dst in module.state_dict(keep_vars=True).items():
                    key = aliases.get(f"{node}.{name}", f"{node}.{name}")
                    if key not in keys:
                        raise WeightsError(f"shard file '{path}' lacks tensor '{key}'")
                    src = f.get_tensor(key)
                    if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                        raise WeightsError(f"shard file '{path}' tensor '{key}' is "
                                           f"{tuple(src.shape)} {src.dtype}, the graph expects "
                                           f"{tuple(dst.shape)} {dst.dtype}")
                    dst.copy_(src)
    return SubgraphModule(graph, modules, entry["inputs"], entry["outputs"])


def check_hash(path: Path, expected: str, what: str = "shard file") -> None:
    """Refuse a file whose sha256 is not ``expected``, naming the file."""
    if not path.is_file():
        raise WeightsError(f"{what} '{path}' does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"{what} '{path}' has sha256 {actual[:16]}..., the manifest "
                           f"records {expected[:16]}...: the file was modified or corrupted "
                           f"after export; export the shards again")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _exported_graph(directory: Path, manifest: dict[str, Any]) -> Graph:
    from fastserve.graph.compiler import compile_graph
    from fastserve.graph.loader import load_spec

    spec = manifest.get("spec")
    if not spec:
        raise WeightsError(f"export '{directory}' holds no spec (its graph was not loaded from a "
                           f"file); pass graph= to load_shard")
    path = directory / spec["file"]
    check_hash(path, spec["sha256"], "spec file")
    return compile_graph(load_spec(path), manifest["dims"])


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
