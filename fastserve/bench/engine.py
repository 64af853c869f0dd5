"""Benchmarks measured side by side in one run, reported as ratios (the machines are shared and
noisy, so absolute times mean little; a ratio of two things measured together does).

* transport: a FastServe hop (encode, send, receive, decode, and back) against a raw pyzmq
  round trip of the same bytes over the same kind of socket, per size and transport (on tcp the
  FastServe hop is CURVE-encrypted, as every tcp socket of a deployment is; raw pyzmq is plain),
  and a plain codec (a JSON header read and written at both ends) against the same raw trip;
  then a FastServe and a raw peer whose ends poll before they sleep, as a deployment's do;
* pipeline: a p-stage pipeline with one thread per rank against one process with one thread and
  with p threads; d data-parallel replicas against one; resident memory of each rank against its
  shard's weights.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import zmq

from fastserve.bench import reap, seq_dims
from fastserve.engine.launcher import Addresses
from fastserve.engine.memory import IDLE_RELEASE_S
from fastserve.resources.costmodel import RUNTIME_BASELINE, micro_batch_size
from fastserve.engine.wire import decode, encode

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}

_ECHO = """
import json, sys, zmq
from fastserve.bench.plainrank import frames_of, tensors_of
from fastserve.engine.spin import Waiter
from fastserve.engine.wire import decode, encode
cfg = json.loads(sys.stdin.readline())  # keys never on the command line
ctx = zmq.Context()
pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
for sock in (pull, push):
    if cfg["keys"]:  # FastServe on tcp: CURVE, as a deployment's sockets are
        sock.curve_publickey = cfg["keys"]["public"].encode()
        sock.curve_secretkey = cfg["keys"]["secret"].encode()
        sock.curve_serverkey = cfg["keys"]["server"].encode()
pull.connect(cfg["inp"]); push.connect(cfg["out"])
mode = cfg["mode"]
waiter = Waiter(cfg["spin_us"])  # a rank's way of waiting (spin_us 0: a blocking poll)
while True:
    if not waiter.wait(pull.poll, 1000):
        continue
    frames = pull.recv_multipart(copy=False)
    if len(frames) == 1 and frames[0].bytes == b"stop":
        break
    if mode == "fastserve":
        m = decode(frames)
        frames = encode(m.kind, request=m.request, micro=m.micro, tensors=m.tensors, meta=m.meta)
    elif mode == "plain":
        frames = frames_of(tensors_of(frames))
    push.send_multipart(frames, copy=False)
"""


class _Echo:
    """A peer process that sends back what it gets (decoding and re-encoding in FastServe mode,
    reading and writing a JSON header in plain mode).
    The driver binds both sockets and the echo connects; in FastServe mode on tcp both links
    are CURVE-authenticated and encrypted, as every tcp socket of a deployment is."""

    def __init__(self, addresses: Addresses, mode: str, curve: bool | None = None,
                 spin_us: int = 0, name: str | None = None) -> None:
        """``curve``: encrypt the raw mode too (default: FastServe mode on tcp only).
        ``spin_us``: both ends wait as a deployment's ranks and coordinator do, polling for up
        to that long before they sleep (:mod:`fastserve.engine.spin`); 0: a blocking wait."""
        from fastserve.engine.security import Guard, KeyPair
        from fastserve.engine.spin import Waiter

        self.ctx = zmq.Context()  # one authenticator per context
        self.mode = mode
        self.waiter = Waiter(spin_us)
        name = name or mode
        secure = (mode == "fastserve" and addresses.transport == "tcp") if curve is None \
            else curve
        server, client = (KeyPair.new(), KeyPair.new()) if secure else (None, None)
        self.guard = Guard(self.ctx, server)
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.push.setsockopt(zmq.SNDTIMEO, 30_000)  # a trip to a peer that died fails
        ends = []
        for sock, end in ((self.push, "in"), (self.pull, "out")):
            self.guard.serve(sock, f"echo-{end}", [client.public] if client else [])
            sock.bind(addresses.new(f"echo-{name}-{end}"))
            ends.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        keys = {"public": client.public, "secret": client.secret, "server": server.public} \
            if secure else None
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE)
        self.proc.stdin.write(json.dumps({"inp": ends[0], "out": ends[1], "mode": mode,
                                          "keys": keys, "spin_us": spin_us}).encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self) -> list:
        if not self.waiter.wait(self.pull.poll, 30_000):
            code = self.proc.poll()
            raise RuntimeError(f"the {self.mode} echo peer gave no answer within 30 s ("
                               f"{'still running' if code is None else f'exit code {code}'})")
        return self.pull.recv_multipart(copy=False)

    def close(self) -> None:
        try:  # (a peer that died takes no message: a blocking send would wait for ever)
            self.push.send(b"stop", flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        reap(self.proc, 5)
        self.proc.stdin.close()
        self.guard.close()
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()


class _PlainChain:
    """The stages of a deployment, each in a plain pyzmq process (:mod:`fastserve.bench.plainrank`)
    chained stage to stage: a small request's floor on this machine without FastServe."""

    def __init__(self, dep, addresses: Addresses, name: str) -> None:
        from fastserve.graph.records import shard_record

        self.ctx = zmq.Context()
        self.procs: list[subprocess.Popen] = []
        self.pull = self.ctx.socket(zmq.PULL)
        self.push = self.ctx.socket(zmq.PUSH)
        try:
            self.pull.setsockopt(zmq.RCVTIMEO, 30_000)  # a plain process that failed: no hang
            self.pull.bind(addresses.new(f"{name}-out"))
            ins = [addresses.new(f"{name}-s{k}") for k in range(len(dep.sharding))]
            outs = [*ins[1:], self.pull.getsockopt_string(zmq.LAST_ENDPOINT)]
            for k, shard in enumerate(dep.sharding):
                record = shard_record(dep.graph, list(shard.nodes), list(shard.inputs),
                                      list(shard.outputs))
                proc = subprocess.Popen([sys.executable, "-m", "fastserve.bench.plainrank"],
                                        stdin=subprocess.PIPE)
                self.procs.append(proc)
                proc.stdin.write(json.dumps({"record": record, "trust_code": dep.trust_code,
                                             "inp": ins[k], "out": outs[k]}).encode() + b"\n")
                proc.stdin.flush()
            self.push.connect(ins[0])
        except BaseException:
            self.close()
            raise

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from fastserve.bench.plainrank import frames_of, tensors_of

        self.push.send_multipart(frames_of(inputs), copy=False)
        try:
            return tensors_of(self.pull.recv_multipart(copy=False))
        except zmq.Again:
            codes = [p.poll() for p in self.procs]
            raise RuntimeError(f"the plain processes gave no answer within 30 s (exit codes: "
                               f"{codes}, None: still running)") from None

    def close(self) -> None:
        try:
            self.push.send(b"stop", flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        for proc in self.procs:
            reap(proc, 5)
            proc.stdin.close()
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()


def _time_block(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def round_trips(peers: dict[str, _Echo], size: int, blocks: int) -> dict[str, float]:
    """Median seconds of a round trip of ``size`` bytes through each echo peer, measured in
    interleaved blocks so that all see the same machine load. A raw peer gets the bytes of a
    FastServe message (header and payload) without the encoding and decoding; a plain one
    a codec as one would write it by hand: a JSON header that both ends read and write
    (:mod:`fastserve.bench.plainrank`)."""
    from fastserve.bench.plainrank import frames_of, tensors_of

    tensor = torch.randn(size // 4)
    payload = tensor.numpy().tobytes()
    header = encode("data", tensors={"x": tensor})[0]  # same header bytes for raw

    def trip(peer: _Echo) -> None:
        if peer.mode == "raw":
            peer.push.send_multipart([header, payload], copy=False)
            peer.receive()
        elif peer.mode == "plain":
            peer.push.send_multipart(frames_of({"x": tensor}), copy=False)
            tensors_of(peer.receive())
        else:
            peer.push.send_multipart(encode("data", tensors={"x": tensor}), copy=False)
            decode(peer.receive())

    n = max(5, min(2000, (256 << 20) // (size * 8)))
    for peer in peers.values():  # connect and warm up
        trip(peer)
    times: dict[str, list[float]] = {k: [] for k in peers}
    for _ in range(blocks):
        for k, peer in peers.items():
            times[k].append(_time_block(lambda: trip(peer), n))
    return {k: statistics.median(v) for k, v in times.items()}


def polling_window() -> int:
    """The polling window a deployment picks for two 1-thread processes on this machine."""
    from fastserve.engine.spin import spin_window
    from fastserve.resources.inventory import machine_cores

    return spin_window([1, 1], machine_cores())


def polling_peers(addresses: Addresses, spin_us: int) -> dict[str, _Echo]:
    """A raw and a FastServe peer ("raw_polling", "fastserve_polling") whose ends poll for up
    to ``spin_us`` before they sleep, as a deployment's do; none when it is 0."""
    return {f"{mode}_polling": _Echo(addresses, mode, spin_us=spin_us, name=f"{mode}-polling")
            for mode in ("raw", "fastserve")} if spin_us else {}


def bench_transport(transports=("ipc", "tcp"), sizes=SIZES, blocks: int = 9,
                    spin_us: int | None = None,
                    progress: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Round-trip time of a FastServe hop vs raw pyzmq, and of a hand-written JSON-header codec
    vs the same; median of interleaved blocks. All of them wait for a message in a blocking
    poll; with a polling window (``spin_us``; None: what a deployment picks for two 1-thread
    processes on this machine, 0: none) a raw and a FastServe peer that poll first, as a
    deployment's ranks and coordinator do, are measured in the same blocks."""
    spin = polling_window() if spin_us is None else spin_us
    rows = []
    for transport in transports:
        addresses = Addresses(transport)
        peers: dict[str, _Echo] = {}
        try:
            for mode in ("raw", "plain", "fastserve"):
                peers[mode] = _Echo(addresses, mode)
            peers.update(polling_peers(addresses, spin))
            for label, size in sizes.items():
                progress(f"transport {transport} {label}")
                t = round_trips(peers, size, blocks)
                r, f, p = t["raw"], t["fastserve"], t["plain"]
                row = {"transport": transport, "size": label, "bytes": size,
                       "raw_rtt_us": r * 1e6, "fastserve_rtt_us": f * 1e6,
                       "plain_rtt_us": p * 1e6, "overhead_ratio": f / r,
                       "plain_ratio": p / r, "throughput_ratio": r / f,
                       "fastserve_gbps": 2 * size / f / 1e9, "spin_us": spin}
                if spin:
                    rp, fp = t["raw_polling"], t["fastserve_polling"]
                    row.update({"raw_polling_rtt_us": rp * 1e6,
                                "fastserve_polling_rtt_us": fp * 1e6,
                                # FastServe as a deployment runs it, against each raw trip
                                "polling_over_raw": fp / r, "polling_over_raw_polling": fp / rp})
                rows.append(row)
        finally:
            for peer in peers.values():
                peer.close()
            addresses.close()
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
                   trust_code: bool = False,
                   progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Throughput of pipelines and replicas vs single processes, and rank memory vs weights.

    Two measures per layout: one batch alone (the pipeline fills and drains once per batch, so
    its bubble ``(p - 1) / (m + p - 1)`` is paid in full), and ``stream`` batches back to back,
    as a serving deployment sees them (the next batch fills while the last one drains). A
    single process gains nothing from streaming; its time per batch is the same either way.
    """
    from fastserve.engine.deployment import Deployment, Layout
    from fastserve.graph import build_reference, compile_graph, load_spec, random_inputs

    loaded = load_spec(spec, trust_code=trust_code)
    dims = seq_dims(loaded, seq)
    graph = compile_graph(loaded, dims)
    inputs = random_inputs(graph, batch, dims)
    progress("single process, 1 thread and p threads")
    module = build_reference(graph)
    one = _time_reference(module, inputs, 1, repeats)
    many = _time_reference(module, inputs, stages, repeats)
    del module

    def deployed(layout: Layout, micro: int) -> tuple[float, float, list[dict]]:
        """Seconds for one batch alone, seconds per batch in a stream, rank memory."""
        progress(f"{layout.replicas} replica(s) x {layout.stages} stage(s)")
        with Deployment.from_spec(spec, layout, dims=dims, timeout=300,
                                  trust_code=trust_code) as dep:
            dep.run(inputs, micro_batches=micro)  # warm up: connections, allocator
            alone = min(_timed(lambda: dep.run(inputs, micro_batches=micro))
                        for _ in range(repeats))
            streamed = min(_timed(lambda: dep.run_batches([inputs] * stream, micro))
                           for _ in range(repeats)) / stream
            after = dep.control("stats")
            # a rank gives its activations' pages back once idle (fastserve.engine.memory)
            time.sleep(IDLE_RELEASE_S + 1.0)
            rested = dep.control("stats")
            # one micro-batch's activations as the cost model predicts them: the plan's rank
            # memory is its runtime, weights and activations for the plan's micro-batch, scaled
            # here to the micro-batch this run sends
            p = dep.plan
            planned = micro_batch_size(p.batch, p.replicas, p.micro_batches)
            sent = micro_batch_size(batch, layout.replicas, micro)
            memory = [{"rank": r, "weight_bytes": m["weight_bytes"],
                       "rss_idle": m["rss_before_load"], "rss_loaded": m["rss"],
                       "rss_peak_loading": m["rss_peak"], "load_s": m["load_s"],
                       "rss_after_run": after[r]["rss"], "rss_after_idle": rested[r]["rss"],
                       "activation_bytes": max(0, p.ranks[r].memory_bytes - RUNTIME_BASELINE
                                               - m["weight_bytes"]) * sent // planned}
                      for r, m in sorted(dep.ready.items())]
        return alone, streamed, memory

    pipe, pipe_stream, pipe_mem = deployed(Layout(1, stages, None, 1), micro_batches)
    single, single_stream, _ = deployed(Layout(1, 1, None, 1), 1)
    dp, dp_stream, _ = deployed(Layout(replicas, 1, None, 1), 1)
    for m in pipe_mem:
        m["loaded_over_weights"] = (m["rss_loaded"] - m["rss_idle"]) / m["weight_bytes"]
        m["after_run_over_weights"] = (m["rss_after_run"] - m["rss_idle"]) / m["weight_bytes"]
        m["after_idle_over_weights"] = (m["rss_after_idle"] - m["rss_idle"]) / \
            m["weight_bytes"]
        # the target: at most the weights + 10% + one micro-batch's activations
        allowed = 1.1 * m["weight_bytes"] + m["activation_bytes"]
        m["after_run_over_allowed"] = (m["rss_after_run"] - m["rss_idle"]) / allowed
        m["after_idle_over_allowed"] = (m["rss_after_idle"] - m["rss_idle"]) / allowed
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


def bench_request(spec: str = "graphs/mlp.yaml", *, batch: int = 1, blocks: int = 9,
                  n: int = 200, progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Latency of one small request: eager in this process (1 thread), a raw pyzmq ipc round
    trip of the input's bytes, ``Deployment.run`` through one rank and through two stages
    (1 thread each), and the same one and two stages in plain pyzmq processes (the floor of
    any multi-process path on this machine); medians of ``blocks`` interleaved blocks of ``n``
    requests. What each path adds over eager is stated in raw round trips, the unit of the
    targets."""
    from fastserve.engine.deployment import Deployment, Layout
    from fastserve.graph import build_reference, random_inputs

    progress("starting one rank, a 2-stage pipeline and their plain twins")
    addresses = Addresses("ipc")
    raw = _Echo(addresses, "raw")
    plain: list[_PlainChain] = []
    try:
        with Deployment.from_spec(spec, Layout(1, 1, None, 1), batch=batch) as one, \
                Deployment.from_spec(spec, Layout(1, 2, None, 1), batch=batch) as two:
            for dep, name in ((one, "plain1"), (two, "plain2")):
                plain.append(_PlainChain(dep, addresses, name))
            inputs = random_inputs(one.graph, batch)
            module = build_reference(one.graph)
            expected = module(inputs)
            for path in (one, two, *plain):  # exact, and warm
                for k, v in path.run(inputs).items():
                    torch.testing.assert_close(v, expected[k])
            tensors = list(inputs.values())
            header = encode("data", tensors=inputs)[0]
            payload = [t.numpy().tobytes() for t in tensors]

            def raw_trip() -> None:
                raw.push.send_multipart([header, *payload], copy=False)
                raw.pull.recv_multipart(copy=False)

            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.inference_mode():
                    runs = {"eager": lambda: module(inputs), "raw_rtt": raw_trip,
                            "one_rank": lambda: one.run(inputs),
                            "plain_one_process": lambda: plain[0].run(inputs),
                            "two_stages": lambda: two.run(inputs),
                            "plain_two_processes": lambda: plain[1].run(inputs)}
                    times: dict[str, list[float]] = {k: [] for k in runs}
                    for b in range(blocks):
                        progress(f"block {b + 1}/{blocks}")
                        for k, fn in runs.items():
                            fn()
                            times[k].append(_time_block(fn, n))
            finally:
                torch.set_num_threads(previous)
            spin = {"one_rank": one.spin_us, "two_stages": two.spin_us}
    finally:
        for chain in plain:
            chain.close()
        raw.close()
        addresses.close()
    us = {k: statistics.median(v) * 1e6 for k, v in times.items()}

    def over_eager(path: str) -> float:
        return (us[path] - us["eager"]) / us["raw_rtt"]

    return {"graph": one.graph.name, "batch": batch, "blocks": blocks, "requests_per_block": n,
            "microseconds": us, "spin_us": spin,
            "one_rank_over_eager_in_raw_rtts": over_eager("one_rank"),
            "two_stages_over_eager_in_raw_rtts": over_eager("two_stages"),
            "plain_one_process_over_eager_in_raw_rtts": over_eager("plain_one_process"),
            "plain_two_processes_over_eager_in_raw_rtts": over_eager("plain_two_processes"),
            "one_rank_over_plain": us["one_rank"] / us["plain_one_process"],
            "two_stages_over_plain": us["two_stages"] / us["plain_two_processes"]}
