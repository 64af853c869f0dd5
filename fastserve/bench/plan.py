"""``fastserve bench plan``: how fast the planner is at scale, and how close its predictions are
to what the engine measures on this machine. Lives in the engine because measuring runs ranks."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from fastserve.graph.builder import GraphBuilder
from fastserve.resources.inventory import Host, Inventory, local_inventory
from fastserve.resources.planner import Constraints, plan

ROOT = Path(__file__).resolve().parents[2]
# (spec, batch, dims) of the shipped graphs whose predictions are checked
CASES = [("graphs/mlp.yaml", 512, {}), ("graphs/unet.yaml", 16, {}),
         ("graphs/gpt2.yaml", 16, {"seq": 32})]


def _chain(layers: int):
    b = GraphBuilder(f"chain{layers}", dims={"seq": 64})
    b.input("x", ["batch", "seq", 256])
    with b.repeat("h", layers, input="x") as r:
        r.node("block", "transformer_block", ["$in"], d_model=256, n_heads=4)
    b.output("h")
    return b.compile()


def _cluster(n: int) -> Inventory:
    """A heterogeneous cluster: 8- and 16-core hosts, three speeds."""
    return Inventory(f"synthetic{n}", tuple(
        Host(f"n{i}", f"10.1.{i // 250}.{i % 250}", 16 if i % 2 else 8, 64 * 2**30,
             (1.0, 0.7, 0.4)[i % 3]) for i in range(n)))


def planning_times(progress: Callable[[str], None] = lambda _m: None) -> list[dict]:
    rows = []
    for layers, hosts in ((100, 16), (200, 64)):
        progress(f"planning {layers} layers on {hosts} hosts")
        graph, inventory = _chain(layers), _cluster(hosts)
        t0 = time.perf_counter()
        chosen = plan(graph, inventory)
        rows.append({"layers": layers, "hosts": hosts, "seconds": time.perf_counter() - t0,
                     "chosen": f"{chosen.replicas} x {chosen.stages}, "
                               f"{chosen.micro_batches} micro-batches"})
    return rows


def measure_predictions(repeats: int = 3, min_seconds: float = 1.0, rounds: int = 3,
                        progress: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Plan each shipped graph for this machine with measured node times, run the plan, and
    compare predicted with measured batch throughput.

    The machine's speed drifts (it is shared), so profiling once and running later compares two
    different machines. Each graph is measured in ``rounds`` rounds of profile-then-run with
    the deployment kept up (its ranks idle while the profile runs); each round's prediction uses
    that round's profile, and the medians are reported.
    """
    from fastserve.engine.deployment import Deployment
    from fastserve.graph import compile_graph, load_spec, random_inputs
    from fastserve.resources.profiling import profile_graph

    inventory = local_inventory()
    host = inventory.hosts[0].name
    rows = []
    for spec, batch, dims in CASES:
        path = str(ROOT / spec)
        graph = compile_graph(load_spec(path), dims)
        progress(f"profiling {graph.name}")
        chosen = plan(graph, inventory, constraints=Constraints(batch=batch),
                      profile=profile_graph(graph, host, batch=batch))
        # later rounds re-plan with the measured message cost, for the deployed cut and shape
        threads = chosen.ranks[0].threads
        fixed = Constraints(replicas=chosen.replicas, stages=chosen.stages,
                            micro_batches=chosen.micro_batches, batch=batch, cut=chosen.cut,
                            threads=threads)
        inputs = random_inputs(graph, batch, dims)
        predicted, measured = [], []
        with Deployment(graph, chosen, timeout=300) as dep:
            for _ in range(2):  # warm up: connections, allocator
                dep.run(inputs, micro_batches=chosen.micro_batches)
            for r in range(rounds):
                progress(f"profiling {graph.name} (round {r + 1}/{rounds})")
                measured_profile = replace(profile_graph(graph, host, batch=batch),
                                           message_seconds=_message_seconds(dep))
                chosen = plan(graph, inventory, constraints=fixed, profile=measured_profile)
                progress(f"running {graph.name} as {chosen.replicas} x {chosen.stages} "
                         f"(round {r + 1}/{rounds})")
                runs: list[float] = []
                start = time.perf_counter()
                # at least ``repeats`` runs and ``min_seconds``: a 3 ms batch needs many
                while len(runs) < repeats or time.perf_counter() - start < min_seconds:
                    t0 = time.perf_counter()
                    dep.run(inputs, micro_batches=chosen.micro_batches)
                    runs.append(time.perf_counter() - t0)
                predicted.append(batch / chosen.latency_s)  # one batch at a time, as run here
                measured.append(batch / statistics.median(runs))
        rows.append({"graph": graph.name, "message_us": measured_profile.message_seconds * 1e6,
                     "plan": f"{chosen.replicas} x {chosen.stages}, "
                     f"{chosen.micro_batches} mb, {threads} thr",
                     "predicted": statistics.median(predicted),
                     "measured": statistics.median(measured),
                     "error": statistics.median(p / m - 1 for p, m in zip(predicted, measured)),
                     "rounds": [{"predicted": p, "measured": m}
                                for p, m in zip(predicted, measured)]})
    return rows


def _message_seconds(dep, rounds: int = 30) -> float:
    """One message between live processes, as the deployment's ranks see it now: half the
    median control round trip to every rank (they answer in parallel)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dep.control("health")
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / 2
