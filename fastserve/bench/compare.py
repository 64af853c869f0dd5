"""``fastserve bench compare``: FastServe against what a user would run instead, on one model,
batch and seq, interleaved in one run.

Measured in each round, one after another (so that a noisy neighbour slows them all alike):

* one process with 1 thread, and with N threads, each over the batch in chunks the size of a
  micro-batch (chunking is how a single process keeps its activations small, so the
  deployments' micro-batches do not give them an edge);
* torch.distributed.pipelining: N stage processes over gloo, GPipe, on FastServe's cut (the
  peer a user would pick instead), 1 thread each;
* a FastServe N-stage pipeline: one batch alone, and a stream of batches back to back;
* N FastServe replicas of the whole model: alone and streamed, micro-batches of the same size;
* N plain 1-thread processes side by side, each over 1/N of the batch in the same chunks, with
  no messages at all (:mod:`fastserve.bench.plain`): what N processes reach on this machine,
  the ceiling of both FastServe layouts;
* with ``sockets``, both streamed again on deployments that send results over the ipc socket
  instead of the shared-memory ring (:mod:`fastserve.engine.ring`): what the ring buys (results
  under its ``ring_min_bytes`` take the socket either way).

Everything is started before the first round and kept running. The FastServe outputs are
checked against the single process (``torch.testing.assert_close``) once, before timing.
Seconds per batch are the median over rounds; ratios are of those medians.
"""

from __future__ import annotations

import contextlib
import math
import socket
import statistics
import time
from typing import Callable, Mapping

import torch

from fastserve.bench import seq_dims
from fastserve.bench.workers import Workers
from fastserve.errors import EngineError

Progress = Callable[[str], None]


def _chunked(module, inputs: Mapping[str, torch.Tensor], batched: list[str], size: int,
             threads: int) -> Callable[[], list]:
    """One process over the batch in chunks of ``size`` samples, with ``threads`` threads."""
    total = next(iter(inputs[n] for n in batched)).shape[0]
    chunks = [{k: (v[lo:lo + size] if k in batched else v) for k, v in inputs.items()}
              for lo in range(0, total, size)]

    def run() -> list:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return [module(c) for c in chunks]
        finally:
            torch.set_num_threads(previous)
    return run


def _as_lists(tensors: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """Tensors as [nested lists, dtype name] for a worker's JSON config."""
    from fastserve.graph.dtypes import DTYPES

    names = {v: k for k, v in DTYPES.items()}
    return {n: [t.tolist(), names[t.dtype]] for n, t in tensors.items()}


class TorchPipeline(Workers):
    """N torch.distributed.pipelining stage processes on a FastServe cut; see
    :mod:`fastserve.bench.torchpipe`."""

    what = "torch pipelining stage"

    def __init__(self, dep, inputs: Mapping[str, torch.Tensor], micro_batches: int,
                 trust_code: bool = False) -> None:
        from fastserve.graph.records import shard_record

        super().__init__()
        shards = dep.sharding
        for k in range(1, len(shards)):
            if list(shards[k].inputs) != list(shards[k - 1].outputs):
                raise EngineError(
                    f"torch.distributed.pipelining passes each stage's outputs to the next "
                    f"stage as its inputs, but stage {k} reads {list(shards[k].inputs)} and "
                    f"stage {k - 1} writes {list(shards[k - 1].outputs)}")
        with socket.socket() as s:  # a free port for gloo's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for k, shard in enumerate(shards):
                cfg = {"stage": k, "stages": len(shards), "port": port, "threads": 1,
                       "micro_batches": micro_batches, "trust_code": trust_code,
                       "record": shard_record(dep.graph, list(shard.nodes),
                                              list(shard.inputs), list(shard.outputs))}
                if k == 0:
                    cfg["inputs"] = list(_as_lists({n: inputs[n]
                                                    for n in shard.inputs}).values())
                self._start("fastserve.bench.torchpipe", cfg)
        except BaseException:
            self.close()
            raise

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` GPipe steps, as the slowest stage saw them."""
        return max(a["seconds"] for a in self._ask({"steps": steps}))

    def output_shape(self) -> list[int] | None:
        return self._ask({"shape": True})[-1]["shape"]


class SideBySide(Workers):
    """N plain 1-thread processes, each running the whole model over 1/N of the batch in
    chunks, started together and talking to nobody: the ceiling of N processes on this
    machine; see :mod:`fastserve.bench.plain`."""

    what = "plain process"

    def __init__(self, dep, inputs: Mapping[str, torch.Tensor], batched: list[str], n: int,
                 size: int, trust_code: bool = False) -> None:
        from fastserve.graph.records import shard_record

        super().__init__()
        graph = dep.graph
        total = next(iter(inputs[b] for b in batched)).shape[0]
        if total < n:
            raise EngineError(f"{n} processes side by side need a batch of at least {n} "
                              f"samples, got {total}")
        record = shard_record(graph, list(graph.order), [t.name for t in graph.inputs],
                              list(graph.outputs))
        # shares differ by at most one sample
        parts = [{k: (v.tensor_split(n)[i] if k in batched else v) for k, v in inputs.items()}
                 for i in range(n)]
        try:
            for part in parts:
                self._start("fastserve.bench.plain", {
                    "record": record, "inputs": _as_lists(part), "batched": batched,
                    "size": size, "trust_code": trust_code})
            self._answers()  # each is built
        except BaseException:
            self.close()
            raise

    def run(self, repeats: int) -> float:
        """Seconds from the agreed start until the last process has run its share
        ``repeats`` times (a process that starts late counts its lateness)."""
        at = time.time() + 0.05
        return max(a["end"] for a in self._ask({"repeats": repeats, "at": at})) - at


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_compare(spec: str, *, batch: int = 32, seq: int = 128, stages: int = 2,
                  micro_batches: int = 8, stream: int = 3, rounds: int = 3,
                  torch_pipelining: bool = True, profile=None, sockets: bool = False,
                  trust_code: bool = False, progress: Progress = lambda _m: None) -> dict:
    """Seconds per batch of each way of running ``spec`` (medians of ``rounds`` interleaved
    rounds), samples/s, and the ratios the performance targets are stated in. With a
    ``profile`` (:class:`fastserve.resources.costmodel.Profile`) the pipeline is cut by measured
    node times, and torch pipelining runs on that cut too."""
    from fastserve.engine.deployment import Deployment, Layout
    from fastserve.graph import build_reference, load_spec, random_inputs

    dims = seq_dims(load_spec(spec, trust_code=trust_code), seq)
    size = math.ceil(batch / micro_batches)  # samples per micro-batch, everywhere
    per_replica = math.ceil(math.ceil(batch / stages) / size)
    with contextlib.ExitStack() as stack:
        progress(f"starting a {stages}-stage pipeline and {stages} replicas")
        pipe = stack.enter_context(Deployment.from_spec(
            spec, Layout(1, stages, None, 1), dims=dims, micro_batches=micro_batches,
            batch=batch, timeout=600, profile=profile, trust_code=trust_code))
        reps = stack.enter_context(Deployment.from_spec(
            spec, Layout(stages, 1, None, 1), dims=dims, micro_batches=per_replica,
            batch=batch, timeout=600, trust_code=trust_code))
        socket_deps = {}
        if sockets:
            progress("starting both again with results over the socket (no ring)")
            for key, layout, micro in ((f"fastserve_pipeline_{stages}_stages_stream_sockets",
                                        Layout(1, stages, None, 1), micro_batches),
                                       (f"fastserve_{stages}_replicas_stream_sockets",
                                        Layout(stages, 1, None, 1), per_replica)):
                socket_deps[key] = (stack.enter_context(Deployment.from_spec(
                    spec, layout, dims=dims, micro_batches=micro, batch=batch, timeout=600,
                    profile=profile, ring_bytes=0, trust_code=trust_code)), micro)
        graph = pipe.graph
        inputs = random_inputs(graph, batch, dims)
        batched = pipe.batched
        module = build_reference(graph)
        one = _chunked(module, inputs, batched, size, 1)
        many = _chunked(module, inputs, batched, size, stages)
        torch_pipe = None
        if torch_pipelining:
            progress(f"starting {stages} torch.distributed.pipelining stages (gloo)")
            torch_pipe = TorchPipeline(pipe, inputs, micro_batches, trust_code)
            stack.callback(torch_pipe.close)
        progress(f"starting {stages} plain processes to run side by side")
        side = SideBySide(pipe, inputs, batched, stages, size, trust_code)
        stack.callback(side.close)

        progress("checking the deployments against one process")
        expected = {k: torch.cat([c[k] for c in one()]) for k in graph.outputs}
        for name, dep, micro in (("pipeline", pipe, micro_batches),
                                 ("replicas", reps, per_replica), *(
                                     (k, d, m) for k, (d, m) in socket_deps.items())):
            got = dep.run(inputs, micro_batches=micro)
            for k in graph.outputs:
                try:
                    torch.testing.assert_close(got[k], expected[k])
                except AssertionError as e:
                    raise EngineError(f"the {name}'s output '{k}' differs from one process: "
                                      f"{e}") from None
        last = list(pipe.sharding[-1].outputs)
        want = list(expected[last[0]].shape) if len(last) == 1 else None
        del expected, got
        if torch_pipe is not None:
            torch_pipe.run(1)  # warm up, and check that it computed the whole batch
            shape = torch_pipe.output_shape()
            if want is not None and shape != want:
                raise EngineError(f"torch pipelining returned shape {shape}, expected {want}")

        runs: dict[str, Callable[[], float]] = {
            "one_process_1_thread": lambda: _timed(one),
            f"one_process_{stages}_threads": lambda: _timed(many),
            f"{stages}_plain_processes_side_by_side": lambda: side.run(stream) / stream,
            f"fastserve_pipeline_{stages}_stages": lambda: _timed(
                lambda: pipe.run(inputs, micro_batches=micro_batches)),
            f"fastserve_pipeline_{stages}_stages_stream": lambda: _timed(
                lambda: pipe.run_batches([inputs] * stream, micro_batches)) / stream,
            f"fastserve_{stages}_replicas": lambda: _timed(
                lambda: reps.run(inputs, micro_batches=per_replica)),
            f"fastserve_{stages}_replicas_stream": lambda: _timed(
                lambda: reps.run_batches([inputs] * stream, per_replica)) / stream,
        }
        for key, (dep, micro) in socket_deps.items():
            runs[key] = lambda dep=dep, micro=micro: _timed(
                lambda: dep.run_batches([inputs] * stream, micro)) / stream
        if torch_pipe is not None:
            runs[f"torch_pipelining_{stages}_stages"] = lambda: torch_pipe.run(stream) / stream
        seconds: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(rounds):
            for name, run in runs.items():
                progress(f"round {r + 1}/{rounds}: {name}")
                seconds[name].append(run())
        stages_seen = pipe.stats.to_json()["stages"]
        # the share of results that came through the ring (the rest were small enough for the
        # socket, or found it full)
        through_ring = {name: dep.received["ring"] / max(1, sum(dep.received.values()))
                        for name, dep in (("pipeline", pipe), ("replicas", reps))}

    median = {k: statistics.median(v) for k, v in seconds.items()}
    rate = {k: batch / v for k, v in median.items()}
    one1, oneN = rate["one_process_1_thread"], rate[f"one_process_{stages}_threads"]
    ratios = {}
    for name in runs:
        if name.startswith(("fastserve", "torch")):
            ratios[f"{name} / ({stages} x one 1-thread process)"] = rate[name] / (stages * one1)
            ratios[f"{name} / one {stages}-thread process"] = rate[name] / oneN
    for key in socket_deps:
        ratios[f"{key.removesuffix('_sockets')} / the same over sockets"] = \
            rate[key.removesuffix("_sockets")] / rate[key]
    ceiling = rate[f"{stages}_plain_processes_side_by_side"]
    ratios[f"{stages} plain processes side by side / ({stages} x one 1-thread process)"] = \
        ceiling / (stages * one1)
    for name in (f"fastserve_pipeline_{stages}_stages_stream",
                 f"fastserve_{stages}_replicas_stream"):
        ratios[f"{name} / {stages} plain processes side by side"] = rate[name] / ceiling
    if torch_pipe is not None:
        peer = rate[f"torch_pipelining_{stages}_stages"]
        for name in (f"fastserve_pipeline_{stages}_stages",
                     f"fastserve_pipeline_{stages}_stages_stream"):
            ratios[f"{name} / torch pipelining"] = rate[name] / peer
    return {"graph": graph.name, "batch": batch, "seq": seq, "stages": stages,
            "micro_batches": micro_batches, "micro_batch_samples": size, "stream": stream,
            "rounds": rounds, "cut": [len(s.nodes) for s in pipe.sharding],
            "cut_by": "measured node times" if profile is not None else "FLOPs",
            "seconds_per_batch": median, "seconds_per_round": seconds,
            "samples_per_s": rate, "ratios": ratios,
            "pipeline_stages": {str(k): v for k, v in stages_seen.items()},
            "results_through_ring": through_ring}
