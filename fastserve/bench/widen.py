"""``fastserve bench widen``: a pipeline with a slow stage, scaled by widening that stage
against scaling by a second replica, interleaved in one run.

A 2-stage pipeline whose first stage holds only the first ``first`` nodes (a quarter by default)
spends most of its time in the second stage. Two ways to add throughput:

* widen the slow stage: one more rank holding its shard (3 ranks);
* a second replica of the whole pipeline (4 ranks, every weight twice).

Each is timed on a stream of batches (``Deployment.run_batches``), interleaved round by round
with the plain pipeline; outputs are checked against one process first. Printed: samples per
second, per rank, and the bytes of weights the ranks hold.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fastserve.bench import seq_dims

Progress = Callable[[str], None]


def bench_widen(spec: str = "graphs/gpt2.yaml", *, batch: int = 16, seq: int = 32,
                first: int | None = None, micro_batches: int = 8, stream: int = 2,
                rounds: int = 3, trust_code: bool = False,
                progress: Progress = lambda _m: None) -> dict:
    from fastserve.engine.deployment import Deployment
    from fastserve.graph import compile_graph, load_spec, random_inputs, reference
    from fastserve.resources.inventory import local_inventory
    from fastserve.resources.planner import Constraints, plan
    from fastserve.resources.widening import widen, widen_choice

    loaded = load_spec(spec, trust_code=trust_code)
    dims = seq_dims(loaded, seq)
    graph = compile_graph(loaded, dims)
    order = list(graph.order)
    first = first or max(1, len(order) // 4)
    cut = (tuple(order[:first]), tuple(order[first:]))

    def planned(replicas: int):
        return plan(graph, local_inventory(), constraints=Constraints(
            replicas=replicas, stages=2, threads=1, cut=cut, batch=batch,
            micro_batches=micro_batches))

    base = planned(1)
    slow = max(range(2), key=lambda k: base.stage_plans[k].compute_s)
    layouts = {"pipeline": base, "widened": widen(base, slow), "replicas": planned(2)}
    inputs = random_inputs(graph, batch, dims)
    expected = reference(graph, inputs)
    times: dict[str, list[float]] = {k: [] for k in layouts}
    deps: dict[str, Deployment] = {}
    try:
        for name, p in layouts.items():
            progress(f"starting the {name} ({len(p.ranks)} ranks)")
            deps[name] = Deployment(graph, p, timeout=300, trust_code=trust_code).start()
            for k, v in deps[name].run(inputs).items():  # exact, and warm
                torch.testing.assert_close(v, expected[k])
        for r in range(rounds):
            progress(f"round {r + 1}/{rounds}")
            for name, dep in deps.items():
                t0 = time.perf_counter()
                dep.run_batches([inputs] * stream)
                times[name].append((time.perf_counter() - t0) / stream)
        weights = {name: sum(m["weight_bytes"] for m in dep.ready.values())
                   for name, dep in deps.items()}
    finally:
        for dep in deps.values():
            dep.stop()
    rate = {k: batch / statistics.median(v) for k, v in times.items()}
    return {
        "graph": graph.name, "batch": batch, "seq": seq, "micro_batches": micro_batches,
        "stream": stream, "rounds": rounds, "first_stage_nodes": first, "slow_stage": slow,
        "widen_choice": widen_choice(base),
        "predicted_stage_seconds": [s.compute_s + s.transfer_s for s in base.stage_plans],
        "layouts": {name: {"ranks": len(p.ranks), "samples_per_s": rate[name],
                           "samples_per_s_per_rank": rate[name] / len(p.ranks),
                           "weight_bytes": weights[name]}
                    for name, p in layouts.items()},
        "ratios": {"widened_vs_pipeline": rate["widened"] / rate["pipeline"],
                   "replicas_vs_pipeline": rate["replicas"] / rate["pipeline"],
                   "widened_vs_replicas": rate["widened"] / rate["replicas"]},
    }
