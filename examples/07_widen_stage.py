"""Widen a pipeline's slow stage: another rank holding its shard, instead of another replica.

A 2-stage cut of the U-Net whose first stage holds only its first two nodes: the second stage is
the bottleneck by far, so one more rank for it adds more throughput per rank than a second
replica would (which adds one rank per stage). The widened plan runs on rank processes, the
stage's two ranks taking its micro-batches in turn, and every output is checked against the
single-process reference.

    .venv/bin/python examples/07_widen_stage.py
"""

from __future__ import annotations

from pathlib import Path

import torch

import fastserve as fs
from fastserve.engine import Deployment
from fastserve.resources.widening import layout_for, widen, widen_choice

ROOT = Path(__file__).resolve().parents[1]

graph = fs.load(str(ROOT / "graphs/unet.yaml"))
order = list(graph.order)
chosen = fs.plan(graph, fs.load_inventory(str(ROOT / "runtime/hosts/local.yaml")),
                 constraints=fs.Constraints(stages=2, threads=1, batch=16, micro_batches=8,
                                            cut=(tuple(order[:2]), tuple(order[2:]))))
slow = widen_choice(chosen)
print(f"predicted seconds per micro-batch by stage: "
      f"{[round(s.compute_s + s.transfer_s, 4) for s in chosen.stage_plans]}; "
      f"widening pays for stage {slow}")
replicas, widths = layout_for(chosen, 2)
print(f"two replicas' worth of throughput in the fewest ranks: {replicas} replica(s), "
      f"ranks per stage {list(widths)}")

wide = widen(chosen, slow)
batch = fs.random_inputs(graph, batch=16, seed=1)
with Deployment(graph, wide) as dep:
    outputs = dep.run_batches([batch] * 3)
    took = {r: s["processed"] for r, s in sorted(dep.control("stats").items())}
for out in outputs:
    for name, expected in fs.reference(graph, batch).items():
        torch.testing.assert_close(out[name], expected)
print(f"{len(wide.ranks)} ranks, micro-batches each took: {took}; every output equals the "
      f"reference")
