"""Calibration on the real host: how fast each node and one thread of this machine are.

``profile_graph`` runs every node alone on one thread at batch sizes 1, 4, 16, ... up to
``batch`` and records seconds per call at each (the cost model interpolates between them);
``measure_host_flops`` times a float32 matmul. The planner's cost model uses the measured
numbers in place of FLOP counts when a :class:`~fastserve.resources.costmodel.Profile` is given.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from fastserve.graph import Graph
from fastserve.graph.module import build_nodes, torch_dtype
from fastserve.resources.costmodel import Profile


def measure_host_flops(size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of one thread on a square float32 matmul (best of ``repeats``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm up
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
    return 2 * size**3 / best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _example(graph: Graph, name: str, batch: int) -> torch.Tensor:
    info = graph.tensors[name]
    shape = (batch, *info.shape[1:])
    dtype = torch_dtype(info.dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    spec = next((i for i in graph.spec.inputs if i.name == name), None)
    high = spec.high if spec is not None and spec.high else 2
    return torch.randint(0, high, shape, dtype=dtype)


def profile_graph(graph: Graph, host: str, batch: int = 4, repeats: int = 3,
                  progress: Callable[[str], None] = lambda _m: None) -> Profile:
    """Every node's seconds per call on one thread at batch 1, 4, 16, ... up to ``batch``
    (and at ``batch``), and this host's FLOP/s per thread. ``node_seconds`` holds the lowest
    seconds per sample seen, usually at the largest batch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    sizes = sorted({*(4**i for i in range(8) if 4**i < batch), batch})
    per_sample: dict[str, float] = {}
    times: dict[str, list[list[float]]] = {}
    try:
        for i, node in enumerate(graph.order):
            module = build_nodes(graph, [node])[node]
            times[node] = [[b, _best(module, [_example(graph, t, b)
                                              for t in graph.node(node)["inputs"]], repeats)]
                           for b in sizes]
            # the cheapest per sample: a lower bound the planner's pruning can rely on
            per_sample[node] = min(t / b for b, t in times[node])
            if (i + 1) % 10 == 0 or i + 1 == len(graph):
                progress(f"profiled {i + 1}/{len(graph)} nodes")
    finally:
        torch.set_num_threads(previous)
    return Profile(per_sample, {host: measure_host_flops()}, dict(graph.dims), times)


def _best(module, args, repeats: int) -> float:
    with torch.inference_mode():
        module(*args)  # warm up
        return min(_timed(lambda: module(*args)) for _ in range(repeats))
