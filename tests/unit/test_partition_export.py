"""export(sharding, dir) / load_shard(dir, i): per-shard checkpoints a rank can load alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastserve as fs
from fastserve.errors import WeightsError
from fastserve.graph import random_inputs, reference
from fastserve.partition import export, load_shard, partition, synthetic, validate
from fastserve.partition.export import sha256_file

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)  # the machine is shared: one thread per test process


def _chain_loaded(directory, n, inputs, graph=None):
    env = dict(inputs)
    modules = []
    with torch.inference_mode():
        for i in range(n):
            module = load_shard(directory, i, graph)
            modules.append(module)
            env = module({k: env[k] for k in module.input_names})
    return env, modules


@pytest.mark.parametrize("strategy", ["weight", "layer"])
def test_export_then_reload_every_shard_reproduces_the_reference(tmp_path, strategy):
    graph = fs.load(str(ROOT / "graphs/mlp.yaml"))
    sharding = partition(graph, strategy, shards=3)
    manifest_path = export(sharding, tmp_path)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["graph"] == "mlp" and manifest["strategy"] == strategy
    assert [s["nodes"] for s in manifest["shards"]] == [list(s.nodes) for s in sharding]
    for entry in manifest["shards"]:
        assert sha256_file(tmp_path / entry["file"]) == entry["sha256"]
        # a shard file holds its own nodes' tensors and nothing else
        assert entry["tensors"] and all(any(t.startswith(n + ".") for n in entry["nodes"])
                                        for t in entry["tensors"])
    inputs = random_inputs(graph, 3, seed=4)
    outputs, modules = _chain_loaded(tmp_path, 3, inputs)  # graph rebuilt from the export's spec
    torch.testing.assert_close(outputs["head"], reference(graph, inputs)["head"])
    assert validate(sharding, modules=modules, batch=3).ok


def test_a_tied_weight_travels_with_the_shard_that_borrows_it(tmp_path):
    graph = synthetic.tied_lm(4, seed=2)
    sharding = partition(graph, "weight", shards=3)
    assert sharding[-1].borrowed_bytes > 0 and "wte" not in sharding[-1].nodes
    export(sharding, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "lm_head.weight" in manifest["shards"][-1]["tensors"]
    inputs = random_inputs(graph, 2, seed=1)
    outputs, _ = _chain_loaded(tmp_path, 3, inputs, graph)  # no spec file: graph given
    torch.testing.assert_close(outputs["lm_head"], reference(graph, inputs)["lm_head"])
    # one shard holding both the owner and the borrower stores the tensor once
    whole = partition(graph, "weight", shards=1)
    export(whole, tmp_path / "one")
    entry = json.loads((tmp_path / "one/manifest.json").read_text())["shards"][0]
    assert entry["aliases"] == {"lm_head.weight": "wte.weight"}
    out_one, _ = _chain_loaded(tmp_path / "one", 1, inputs, graph)
    torch.testing.assert_close(out_one["lm_head"], outputs["lm_head"])


def test_a_skip_dag_exports_and_reloads(tmp_path):
    graph = synthetic.dag(12, seed=4, skip=0.6)
    sharding = partition(graph, "weight", shards=4, by="flops")
    export(sharding, tmp_path)
    inputs = random_inputs(graph, 2, seed=0)
    outputs, _ = _chain_loaded(tmp_path, 4, inputs, graph)
    expected = reference(graph, inputs)
    for name in graph.outputs:
        torch.testing.assert_close(outputs[name], expected[name])


def test_a_tampered_shard_file_is_refused_naming_the_file(tmp_path):
    graph = fs.load(str(ROOT / "graphs/mlp.yaml"))
    export(partition(graph, "weight", shards=3), tmp_path)
    target = tmp_path / "shard-001.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    target.write_bytes(bytes(data))
    assert load_shard(tmp_path, 0) is not None  # the other shards still load
    with pytest.raises(WeightsError, match=r"shard file '.*shard-001\.safetensors' has sha256"):
        load_shard(tmp_path, 1)
    target.unlink()
    with pytest.raises(WeightsError, match="shard-001.safetensors' does not exist"):
        load_shard(tmp_path, 1)
    with pytest.raises(WeightsError, match="there is no shard 7"):
        load_shard(tmp_path, 7)
    with pytest.raises(WeightsError, match="manifest.json' does not exist"):
        load_shard(tmp_path / "elsewhere", 0)


def test_weights_really_come_from_the_shard_file(tmp_path):
    """A consistently re-hashed but altered file loads, and validation catches the change: the
    loaded module uses the file's tensors, not the seeded init."""
    from safetensors.torch import load_file, save_file

    graph = fs.load(str(ROOT / "graphs/mlp.yaml"))
    sharding = partition(graph, "weight", shards=2)
    export(sharding, tmp_path)
    path = tmp_path / "shard-001.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 0.1
    save_file(tensors, str(path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = sha256_file(path)
    manifest["shards"][1]["bytes"] = path.stat().st_size  # the re-save drops the metadata
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    modules = [load_shard(tmp_path, i) for i in range(2)]
    report = validate(sharding, modules=modules)
    assert [c.ok for c in report.shards] == [True, False]


def test_a_captured_model_exports_and_reloads(tmp_path):
    spec = ROOT / "graphs/gpt2-hf-tiny.yaml"
    torch.set_num_threads(1)
    graph = fs.load(str(spec), trust_code=True)  # its source: factory is code we ship
    sharding = partition(graph, "weight", shards=2)
    export(sharding, tmp_path)
    inputs = random_inputs(graph, 2, seed=5)
    outputs, _ = _chain_loaded(tmp_path, 2, inputs, graph)
    torch.testing.assert_close(outputs["lm_head"], reference(graph, inputs)["lm_head"])
