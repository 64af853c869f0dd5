"""Benchmarks measured side by side in one run, reported as ratios (the machines are shared and
noisy, so absolute times mean little; a ratio of two things measured together does).

* transport: a FastServe hop (encode, send, receive, decode, and back) against a raw pyzmq
  round trip of the same bytes over the same kind of socket, per size and transport;
* pipeline: a p-stage pipeline with one thread per rank against one process with one thread and
  with p threads; d data-parallel replicas against one; resident memory of each rank against its
  shard's weights.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import zmq

from fastserve.engine.launcher import Addresses
from fastserve.engine.wire import decode, encode

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}

_ECHO = """
import sys, zmq
from fastserve.engine.wire import decode, encode
inp, out, mode = sys.argv[1:4]
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL); pull.bind(inp)
push = ctx.socket(zmq.PUSH); push.connect(out)
while True:
    frames = pull.recv_multipart(copy=False)
    if len(frames) == 1 and frames[0].bytes == b"stop":
        break
    if mode == "fastserve":
        m = decode(frames)
        frames = encode(m.kind, request=m.request, micro=m.micro, tensors=m.tensors, meta=m.meta)
    push.send_multipart(frames, copy=False)
"""


class _Echo:
    """A peer process that sends back what it gets (decoding and re-encoding in FastServe mode),
    with the driver's PUSH/PULL pair connected to it."""

    def __init__(self, ctx: zmq.Context, addresses: Addresses, mode: str) -> None:
        self.there, self.back = addresses.new(f"echo-{mode}-in"), addresses.new(f"echo-{mode}-out")
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(self.back)
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO, self.there, self.back, mode])
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(self.there)

    def close(self) -> None:
        self.push.send(b"stop")
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.push.close(linger=0)
        self.pull.close(linger=0)


def _time_block(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_transport(transports=("ipc", "tcp"), sizes=SIZES, blocks: int = 9,
                    progress: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Round-trip time of a FastServe hop vs raw pyzmq; median of interleaved blocks."""
    rows = []
    ctx = zmq.Context()
    for transport in transports:
        addresses = Addresses(transport)
        raw, fs = _Echo(ctx, addresses, "raw"), _Echo(ctx, addresses, "fastserve")
        try:
            for label, size in sizes.items():
                progress(f"transport {transport} {label}")
                tensor = torch.randn(size // 4)
                payload = tensor.numpy().tobytes()
                header = encode("data", tensors={"x": tensor})[0]  # same header bytes for raw

                def raw_trip() -> None:
                    raw.push.send_multipart([header, payload], copy=False)
                    raw.pull.recv_multipart(copy=False)

                def fs_trip() -> None:
                    fs.push.send_multipart(encode("data", tensors={"x": tensor}), copy=False)
                    decode(fs.pull.recv_multipart(copy=False))

                n = max(5, min(2000, (256 << 20) // (size * 8)))
                raw_trip(), fs_trip()  # connect and warm up
                raw_t, fs_t = [], []
                for _ in range(blocks):  # interleave so both see the same machine load
                    raw_t.append(_time_block(raw_trip, n))
                    fs_t.append(_time_block(fs_trip, n))
                r, f = statistics.median(raw_t), statistics.median(fs_t)
                rows.append({"transport": transport, "size": label, "bytes": size,
                             "raw_rtt_us": r * 1e6, "fastserve_rtt_us": f * 1e6,
                             "overhead_ratio": f / r, "throughput_ratio": r / f,
                             "fastserve_gbps": 2 * size / f / 1e9})
        finally:
            raw.close()
            fs.close()
            addresses.close()
    ctx.term()
    return rows


def _time_reference(module, inputs, threads: int, repeats: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            module(inputs)  # warm up
            return min(_timed(lambda: module(inputs)) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_pipeline(spec: str, *, batch: int = 32, seq: int = 32, stages: int = 2,
                   replicas: int = 2, micro_batches: int = 8, stream: int = 4, repeats: int = 2,
                   progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Throughput of pipelines and replicas vs single processes, and rank memory vs weights.

    Two measures per layout: one batch alone (the pipeline fills and drains once per batch, so
    its bubble ``(p - 1) / (m + p - 1)`` is paid in full), and ``stream`` batches back to back,
    as a serving deployment sees them (the next batch fills while the last one drains). A
    single process gains nothing from streaming; its time per batch is the same either way.
    """
    from fastserve.engine.deployment import Deployment, Layout
    from fastserve.graph import build_reference, compile_graph, load_spec, random_inputs

    dims = {"seq": seq}
    graph = compile_graph(load_spec(spec), dims)
    inputs = random_inputs(graph, batch, dims)
    progress("single process, 1 thread and p threads")
    module = build_reference(graph)
    one = _time_reference(module, inputs, 1, repeats)
    many = _time_reference(module, inputs, stages, repeats)
    del module

    def deployed(layout: Layout, micro: int) -> tuple[float, float, list[dict]]:
        """Seconds for one batch alone, seconds per batch in a stream, rank memory."""
        progress(f"{layout.replicas} replica(s) x {layout.stages} stage(s)")
        with Deployment.from_spec(spec, layout, dims=dims, timeout=300) as dep:
            dep.run(inputs, micro_batches=micro)  # warm up: connections, allocator
            alone = min(_timed(lambda: dep.run(inputs, micro_batches=micro))
                        for _ in range(repeats))
            streamed = min(_timed(lambda: dep.run_batches([inputs] * stream, micro))
                           for _ in range(repeats)) / stream
            after = dep.control("stats")
            memory = [{"rank": r, "weight_bytes": m["weight_bytes"],
                       "rss_idle": m["rss_before_load"], "rss_loaded": m["rss"],
                       "rss_peak_loading": m["rss_peak"], "load_s": m["load_s"],
                       "rss_after_run": after[r]["rss"]} for r, m in sorted(dep.ready.items())]
        return alone, streamed, memory

    pipe, pipe_stream, pipe_mem = deployed(Layout(1, stages, None, 1), micro_batches)
    single, single_stream, _ = deployed(Layout(1, 1, None, 1), 1)
    dp, dp_stream, _ = deployed(Layout(replicas, 1, None, 1), 1)
    for m in pipe_mem:
        m["loaded_over_weights"] = (m["rss_loaded"] - m["rss_idle"]) / m["weight_bytes"]
        m["after_run_over_weights"] = (m["rss_after_run"] - m["rss_idle"]) / m["weight_bytes"]
        m["peak_loading_over_weights"] = (m["rss_peak_loading"] - m["rss_idle"]) / \
            m["weight_bytes"]
    return {
        "graph": graph.name, "batch": batch, "seq": seq, "stages": stages,
        "replicas": replicas, "micro_batches": micro_batches, "stream": stream,
        "seconds_per_batch": {
            "one_process_1_thread": one, f"one_process_{stages}_threads": many,
            f"pipeline_{stages}_stages": pipe, f"pipeline_{stages}_stages_stream": pipe_stream,
            "one_replica": single, "one_replica_stream": single_stream,
            f"{replicas}_replicas": dp, f"{replicas}_replicas_stream": dp_stream},
        "ratios": {
            f"pipeline_{stages}_stages_vs_1_thread": one / pipe,
            f"pipeline_{stages}_stages_vs_1_thread_stream": one / pipe_stream,
            f"pipeline_{stages}_stages_vs_{stages}_threads": many / pipe,
            f"pipeline_{stages}_stages_vs_{stages}_threads_stream": many / pipe_stream,
            f"{replicas}_replicas_vs_one": single / dp,
            f"{replicas}_replicas_vs_one_stream": single_stream / dp_stream,
        },
        "rank_memory": pipe_mem,
    }
