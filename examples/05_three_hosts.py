"""Run a 3-stage pipeline over three hosts and check it against one process. The hosts are
three agents on this machine's loopback addresses 127.0.0.2-4 (no root needed); with real
hosts, the same plan and deployment run on them:

    fastserve keys new keys/                              # copy keys/ to every host
    fastserve agent --listen 10.0.0.2:7301 --keys keys/   # on each host
    fastserve run graphs/mlp.yaml --hosts lab.yaml --keys keys/ --check

    .venv/bin/python examples/05_three_hosts.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import fastserve as fs
from fastserve.engine import Deployment
from fastserve.engine.testcluster import loopback_cluster

ROOT = Path(__file__).resolve().parents[1]
graph = fs.load(str(ROOT / "graphs/mlp.yaml"))
inputs = fs.random_inputs(graph, batch=8)

with tempfile.TemporaryDirectory() as d, loopback_cluster(d) as (inventory, keys):
    chosen = fs.plan(graph, inventory, constraints=fs.Constraints(
        stages=3, threads=1, batch=8, transport="tcp"))
    with Deployment(graph, chosen, inventory=inventory, keys=keys) as dep:
        outputs = dep.run(inputs)
        for r in chosen.ranks:
            host = inventory.host(r.host)
            print(f"rank {r.rank} (stage {r.stage}) ran on host {host.name} at {host.agent}")

torch.set_num_threads(1)  # as the ranks ran: the same order of sums, the same last bits
expected = fs.reference(graph, inputs)
assert all(torch.equal(outputs[k], expected[k]) for k in expected)
print("the pipeline over three hosts equals the single-process reference, to the last bit")
