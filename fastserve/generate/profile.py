"""Each node's time per decode step, measured in this process: what a decode pipeline's cut is
balanced by.

A decode step runs a few rows through every weight, so a node costs about what reading its
weights costs, plus attention over the cache: an LM head costs several blocks, which neither its
FLOPs nor a prefill-sized batch show (GPT-2 small, 32 rows on this project's 2-core VM: the
FLOP-balanced cut gave stages of 75 and 65 ms per step, the cut one block earlier 68 and 72).
So the nodes are timed decoding: ``rows`` sequences at once, each node its own stage of a
:class:`~fastserve.generate.pipeline.LocalPipeline` (each stage's core counts its compute), in
two runs of different lengths; the difference per step is the node's decode step (the prefill
and the first steps cancel).
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from fastserve.engine.wire import MAX_TIMINGS
from fastserve.generate.loop import Generator, Request
from fastserve.generate.pipeline import LocalPipeline
from fastserve.graph import Graph
from fastserve.graph.decode import GenerationError, max_positions
from fastserve.resources.costmodel import Profile
from fastserve.resources.profiling import measure_host_flops

FLOOR_S = 1e-7  # a node whose two runs differ by noise alone still costs something


def decode_profile(graph: Graph, host: str = "local", rows: int = 8, steps: int = 8,
                   prompt: int = 16, progress: Callable[[str], object] = lambda _m: None
                   ) -> Profile:
    """Seconds per decode step of every node over ``rows`` sequences (``node_times``
    ``[[rows, seconds]]``; ``node_seconds`` per row) on one thread of this machine, with
    ``prompt`` tokens cached, measured over ``steps`` steps; and this host's FLOP/s per
    thread. A :class:`~fastserve.graph.decode.GenerationError` if ``graph`` does not
    generate or takes too few positions for the measurement."""
    if rows < 1 or steps < 1 or prompt < 1:
        raise ValueError("rows, steps and prompt must be at least 1")
    if len(graph) >= MAX_TIMINGS:  # each node is a stage, and a step passes them all
        raise GenerationError(f"a decode profile times each node as a stage of its own, and a "
                              f"message passes at most {MAX_TIMINGS} stages: graph "
                              f"'{graph.name}' has {len(graph)} nodes")
    longest = max_positions(graph)
    if longest is not None and prompt + steps + 2 > longest:
        raise GenerationError(f"the model takes {longest} positions: too few to time a decode "
                              f"step after a prompt of {prompt} tokens and {steps} steps")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = LocalPipeline(graph, cut=[[n] for n in graph.order])
        cores = local.cores[0]
        rng = random.Random(0)
        vocab = graph.spec.inputs[0].high or 2
        prompts = [[rng.randrange(1, vocab) for _ in range(prompt)] for _ in range(rows)]

        def compute(tokens: int) -> list[float]:
            before = [c.stats.compute_s for c in cores]
            Generator(local, max_seqs=rows).run([Request(p, tokens) for p in prompts])
            return [c.stats.compute_s - b for c, b in zip(cores, before)]

        progress(f"timing each node's decode step: {rows} sequences, {steps} steps")
        compute(2)  # warm up: the caches' buffers and the kernels' first calls
        short, long = compute(2), compute(2 + steps)
        per_step = {n: max(FLOOR_S, (b - a) / steps)
                    for n, a, b in zip(graph.order, short, long)}
    finally:
        torch.set_num_threads(previous)
    return Profile({n: t / rows for n, t in per_step.items()}, {host: measure_host_flops()},
                   dict(graph.dims), {n: [[rows, t]] for n, t in per_step.items()},
                   phase="decode")
