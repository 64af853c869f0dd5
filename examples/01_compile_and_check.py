"""Compile a shipped graph spec, look at its costs, and run the single-process reference.

    .venv/bin/python examples/01_compile_and_check.py
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastserve as fs

ROOT = Path(__file__).resolve().parents[1]

graph = fs.load(str(ROOT / "graphs/gpt2.yaml"), dims={"seq": 32})  # costs per sample at seq 32
print(f"{graph.name}: {len(graph)} nodes, {graph.params:,} parameters, "
      f"{graph.flops / 1e9:.1f} GFLOPs per sample")
for node_id in graph.order[:3]:
    node = graph.node(node_id)
    print(f"  {node_id:6} {node['op']:22} params {node['params']:>11,}  flops {node['flops']:>13,}")

inputs = fs.random_inputs(graph, batch=2)          # token ids of shape (2, 32)
outputs = fs.reference(graph, inputs)               # builds seeded weights, runs in-process
logits = outputs["lm_head"]
print(f"logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")
