"""Calibration on the real host: how fast each node and one thread of this machine are.

``profile_graph`` runs every node alone on one thread at batch ``batch`` and records seconds per
sample; ``measure_host_flops`` times a float32 matmul. The planner's cost model uses the measured
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
    """Seconds per sample of every node (1 thread), and this host's FLOP/s per thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    try:
        for i, node in enumerate(graph.order):
            module = build_nodes(graph, [node])[node]
            args = [_example(graph, t, batch) for t in graph.node(node)["inputs"]]
            with torch.inference_mode():
                module(*args)  # warm up
                best = min(_timed(lambda: module(*args)) for _ in range(repeats))
            seconds[node] = best / batch
            if (i + 1) % 10 == 0 or i + 1 == len(graph):
                progress(f"profiled {i + 1}/{len(graph)} nodes")
    finally:
        torch.set_num_threads(previous)
    return Profile(seconds, {host: measure_host_flops()}, dict(graph.dims))
