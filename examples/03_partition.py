"""Cut GPT-2 small into shards three ways, validate each cut, export one and run it from disk.

    .venv/bin/python examples/03_partition.py

The sharder's three steps: pick a strategy, cut, validate. Costs are per sample at seq=16.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import fastserve as fs
from fastserve.partition import export, load_shard, partition

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

graph = fs.load(str(ROOT / "graphs/gpt2.yaml"), {"seq": 16})
print(f"{graph.name}: {len(graph)} nodes, {graph.params_bytes / 2**20:.0f} MiB of weights")

# 1. pick a strategy; 2. cut
cuts = {
    "layer": partition(graph, "layer", layers_per_shard=3),
    "weight": partition(graph, "weight", shards=4, by="params"),
    "hybrid": partition(graph, "hybrid", shards=4, memory_caps="200MB", batch=8),
}
for name, sharding in cuts.items():
    spans = ", ".join(f"{s.nodes[0]}..{s.nodes[-1]}" for s in sharding)
    largest = max(s.memory_bytes(8) for s in sharding) / 2**20
    print(f"{name:6s} {len(sharding)} shards [{spans}]  largest at batch 8: {largest:.0f} MiB, "
          f"cuts send {sharding.cut_bytes / 1024:.0f} KiB per sample")

# 3. validate: the shards, chained, reproduce the unsharded reference
report = fs.validate(cuts["weight"], batch=2)
print(report.summary())
for check in report.shards:
    print(f"  shard {check.index}: weights {check.weight_bytes / 2**20:.1f} MiB, activations "
          f"{check.activation_bytes / 1024:.0f} KiB (measured)")

# export one checkpoint per shard, then load each shard alone, as a rank would
with tempfile.TemporaryDirectory() as out:
    export(cuts["weight"], out)
    inputs = fs.random_inputs(graph, 2, seed=1)
    env = dict(inputs)
    with torch.inference_mode():
        for i in range(len(cuts["weight"])):
            shard = load_shard(out, i)  # rebuilt from the exported spec + this shard's file
            env = shard({k: env[k] for k in shard.input_names})
    expected = fs.reference(graph, inputs)["lm_head"]
    torch.testing.assert_close(env["lm_head"], expected)
    print(f"exported shards, loaded one by one: logits {tuple(expected.shape)} match the reference")
