"""Let the planner lay a graph out on this machine, deploy it on rank processes, stream batches
through it, and check every result against the single-process reference.

    .venv/bin/python examples/04_plan_and_serve.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import fastserve as fs
from fastserve.engine import Deployment

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "graphs/unet.yaml")

graph = fs.load(SPEC)
chosen = fs.plan(graph, fs.load_inventory(str(ROOT / "runtime/hosts/local.yaml")),
                 constraints=fs.Constraints(batch=16))
print(f"plan: {chosen.mode}, {chosen.replicas} x {chosen.stages}, "
      f"{chosen.micro_batches} micro-batch(es); predicted from FLOPs (no profile): "
      f"{chosen.throughput:.0f} samples/s")

batches = [fs.random_inputs(graph, batch=16, seed=i) for i in range(8)]
with Deployment(graph, chosen) as dep:  # exactly that plan: cut, threads, micro-batches
    dep.run(batches[0])  # warm up
    start = time.perf_counter()
    results = dep.run_batches(batches)
    seconds = time.perf_counter() - start
for inputs, outputs in zip(batches, results):
    for name, expected in fs.reference(graph, inputs).items():
        torch.testing.assert_close(outputs[name], expected)
print(f"served {16 * len(batches)} samples in {seconds * 1e3:.1f} ms "
      f"({16 * len(batches) / seconds:.0f} samples/s); every output equals the reference")
