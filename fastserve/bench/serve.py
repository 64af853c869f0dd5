"""What the service costs and gains, measured side by side in one run.

* **the HTTP front's overhead**: one request at a time (batch 1), the engine alone (a
  :class:`Deployment` in this process) against the same request through ``fastserve serve``
  (started here as a user starts it, with its own ranks) over HTTP; interleaved rounds, p50 and
  p99 of each and their differences;
* **closed loop**: ``clients`` concurrent HTTP clients, each sending its next request when the
  last is answered, for a bounded time: requests/s against one client's, and latency; beside
  it, the model's own gain from batching (one process, 1 thread as the rank: a batch of that
  many rows against as many batch-1 calls), the most any batching server gets from it here;
* **open loop**: Poisson arrivals at half the closed loop's throughput, bounded in count and
  time: p50 and p99 latency and the answers that were not 200;
* **overload**: Poisson arrivals at twice the closed loop's throughput into the service started
  again with a queue budget (by default the open loop's p50: a request expected to wait longer
  is refused) and at most ``max_queue`` queued requests: how fast the refusals (503) come, and
  the p99 of the admitted requests against the open loop's.

Every answer is checked (after each phase, so that checking does not take the service's CPU): a
benchmark that is fast because it fails cannot pass for a good one.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import msgpack
import torch

from fastserve.bench import reap
from fastserve.errors import ServiceError

Progress = Callable[[str], None]
TIMEOUT_S = 60.0  # a request without an answer for this long counts as failed


def _quantiles(seconds: list[float]) -> dict:
    s = sorted(seconds)
    if not s:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {"n": len(s), "p50_ms": 1e3 * s[len(s) // 2],
            "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))]}


def _start_service(spec: str, max_batch: int, max_queue: int, trust_code: bool, workdir: str,
                   queue_budget_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "fastserve", "serve", spec, "--listen", "127.0.0.1:0",
           "--replicas", "1", "--threads", "1", "--max-batch", str(max_batch),
           "--max-queue", str(max_queue), "--queue-budget-ms", str(queue_budget_ms)] + (
        ["--trust-code"] if trust_code else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            cwd=workdir)
    said = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        said.append(line.rstrip())
        found = re.search(r"ready at (http://\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    proc.wait()
    raise ServiceError("the service did not start: " + " | ".join(said[-3:]))


def _stop_service(proc: subprocess.Popen) -> None:
    proc.terminate()
    reap(proc, 30)


class _Later:
    """Checks answers after the load rather than while it runs (a check costs the load
    generator CPU that the service, on the same machine, would miss), keeping at most
    ``KEEP_BYTES`` of them; past that an answer is checked at once."""

    KEEP_BYTES = 256 << 20

    def __init__(self, verify: Callable[[int, bytes], None]) -> None:
        self.verify, self.kept, self.size = verify, [], 0
        self.lock = threading.Lock()

    def __call__(self, i: int, content: bytes) -> None:
        with self.lock:
            keep = self.size + len(content) <= self.KEEP_BYTES
            if keep:
                self.kept.append((i, content))
                self.size += len(content)
        if not keep:
            self.verify(i, content)

    def run(self) -> None:
        with self.lock:
            kept, self.kept, self.size = self.kept, [], 0
        for i, content in kept:
            self.verify(i, content)


def bench_serve(spec: str, clients: int = 32, requests: int = 300, seconds: float = 20.0,
                max_batch: int = 32, max_queue: int = 64, trust_code: bool = False,
                body_format: str = "json", queue_budget_ms: float | None = None,
                dims: dict[str, int] | None = None,
                progress: Progress = lambda _m: None) -> dict:
    from fastserve.engine import Deployment, Layout
    from fastserve.graph import build_reference, random_inputs, reference

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fastserve-bench-serve-") as workdir:
        progress(f"starting 'fastserve serve {spec}' (1 replica, max batch {max_batch})")
        proc, url = _start_service(os.path.abspath(spec), max_batch, max_queue, trust_code,
                                   workdir)
        try:
            # the engine alone as the service runs it: without polling (engine.spin)
            with Deployment.from_spec(spec, Layout(1, 1, threads=1), batch=1, spin_us=0,
                                      dims=dims, trust_code=trust_code, progress=None) as dep:
                pool = random_inputs(dep.graph, 16, seed=1)
                expected = reference(dep.graph, pool)
                rows = [{k: v[i:i + 1] for k, v in pool.items()} for i in range(16)]
                bodies = _Bodies(body_format, rows, next(iter(expected)))

                def verify(i: int, content: bytes) -> None:
                    torch.testing.assert_close(bodies.output(content),
                                               expected[bodies.out][i % 16:i % 16 + 1])

                check = _Later(verify)

                client = _Client(url)
                try:
                    engine_s, http_s = [], []
                    for i in range(10):  # warm-up of both paths
                        dep.run(rows[i % 16])
                        client.post(bodies, check, i)
                    rounds = 3
                    progress(f"one request at a time: {requests} through the engine alone "
                             f"and {requests} over HTTP, in {rounds} interleaved rounds")
                    for r in range(rounds):
                        for i in range(requests // rounds):
                            t = time.perf_counter()
                            dep.run(rows[i % 16])
                            engine_s.append(time.perf_counter() - t)
                        for i in range(requests // rounds):
                            took, status = client.post(bodies, check, i)
                            if status != 200:
                                raise ServiceError(f"the service answered {status or 'nothing'} "
                                                   f"to a lone request")
                            http_s.append(took)
                finally:
                    client.close()
                engine, http = _quantiles(engine_s), _quantiles(http_s)
                one_client_rps = len(http_s) / sum(http_s)
                rows_per_batch = min(clients, max_batch)
                progress(f"the model alone (1 thread): a batch of {rows_per_batch} against "
                         f"{rows_per_batch} batch-1 calls")
                model_gain = _batching_gain(build_reference(dep.graph),
                                            random_inputs(dep.graph, rows_per_batch, seed=2))
            part = seconds / 3
            progress(f"closed loop: {clients} clients for {part:.0f} s")
            closed = _closed_loop(url, bodies, check, clients, part)
            check.run()

            def poisson(name: str, share: float) -> dict:
                rate = share * closed["requests_per_s"]
                progress(f"{name}: Poisson arrivals at {rate:.1f}/s ({share}x the closed "
                         f"loop's throughput) for {part:.0f} s")
                out = _open_loop(url, bodies, check, rate, part, max_count=int(rate * part) + 1)
                check.run()
                return out

            opened = poisson("open loop", 0.5)
            # the overload meets a service that refuses what would wait longer than the
            # budget: by default the open loop's median latency
            budget_ms = queue_budget_ms if queue_budget_ms is not None else opened["p50_ms"]
            _stop_service(proc)
            progress(f"restarting the service with a queue budget of {budget_ms:.1f} ms")
            proc, url = _start_service(os.path.abspath(spec), max_batch, max_queue, trust_code,
                                       workdir, budget_ms)
            warm = _Client(url)
            for i in range(10):  # warm-up, which also measures the seconds per sample
                warm.post(bodies, check, i)
            warm.close()
            overload = poisson("overload", 2.0)
            overload["queue_budget_ms"] = budget_ms
            overload["admitted_p99_over_unloaded_p99"] = (
                overload["p99_ms"] / opened["p99_ms"] if overload["p99_ms"] else None)
        finally:
            _stop_service(proc)
    return {
        "spec": spec, "dims": dims or {}, "max_batch": max_batch, "max_queue": max_queue,
        "format": body_format,
        "one_at_a_time": {"engine": engine, "http": http,
                          "overhead_p50_ms": http["p50_ms"] - engine["p50_ms"],
                          "overhead_p99_ms": http["p99_ms"] - engine["p99_ms"]},
        "closed_loop": {**closed, "one_client_requests_per_s": one_client_rps,
                        "speedup_over_one_client": closed["requests_per_s"] / one_client_rps,
                        "model_batching_gain": model_gain},
        "open_loop": opened, "overload": overload,
    }


def _batching_gain(module, batch: dict[str, torch.Tensor], repeats: int = 2) -> float:
    """How much faster ``module`` runs the rows of ``batch`` as one batch than one row at a
    time (best of ``repeats`` each, in this process's threads)."""
    rows = next(iter(batch.values())).shape[0]
    singles = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(rows)]

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        module(batch)  # warm up: the allocator, both shapes
        module(singles[0])
        one_at_a_time = best(lambda: [module(s) for s in singles])
        batched = best(lambda: module(batch))
    return one_at_a_time / batched


class _Bodies:
    """Request bodies of the sample rows, encoded once, and the decoding of an answer."""

    def __init__(self, body_format: str, rows: list[dict], out: str) -> None:
        self.format, self.out = body_format, out
        if body_format == "json":
            self.headers = {"content-type": "application/json"}
            self.bodies = [json.dumps({"inputs": {k: v.tolist() for k, v in r.items()}}
                                      ).encode() for r in rows]
        else:
            self.headers = {"content-type": "application/msgpack"}
            self.bodies = [msgpack.packb({"inputs": {k: {
                "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                "data": v.contiguous().numpy().tobytes()} for k, v in r.items()}})
                for r in rows]

    def __getitem__(self, i: int) -> bytes:
        return self.bodies[i % len(self.bodies)]

    def output(self, content: bytes) -> torch.Tensor:
        if self.format == "json":
            return torch.tensor(json.loads(content)["outputs"][self.out])
        t = msgpack.unpackb(content)["outputs"][self.out]
        return torch.frombuffer(bytearray(t["data"]), dtype=getattr(torch, t["dtype"])
                                ).reshape(t["shape"])


class _Client:
    """One keep-alive HTTP connection (the standard library's http.client: a client light
    enough that the service, not the load generator, is what is measured)."""

    def __init__(self, url: str) -> None:
        host, port = urllib.parse.urlsplit(url)[1].rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)

    def post(self, bodies: _Bodies, check, i: int) -> tuple[float, int]:
        """One request: its latency and HTTP status (an answer of 200 is checked); status 0
        when no answer came (the connection failed or nothing came for TIMEOUT_S)."""
        t = time.perf_counter()
        try:
            self.conn.request("POST", "/v1/infer", bodies[i], bodies.headers)
            resp = self.conn.getresponse()
            content = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # the next request opens a new connection
            return time.perf_counter() - t, 0
        took = time.perf_counter() - t
        if resp.status == 200:
            check(i, content)
        return took, resp.status

    def close(self) -> None:
        self.conn.close()


def _closed_loop(url: str, bodies: _Bodies, check, clients: int, seconds: float) -> dict:
    """``clients`` threads, each sending its next request when the last is answered."""
    latencies: list[float] = []
    failed = [0]
    end = time.perf_counter() + seconds

    def client(c: int) -> None:
        conn = _Client(url)
        i = c
        try:
            while time.perf_counter() < end:
                took, status = conn.post(bodies, check, i)
                i += clients
                if status == 200:
                    latencies.append(took)
                else:
                    failed[0] += 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client, c) for c in range(clients)]:
            f.result()
    elapsed = time.perf_counter() - t0
    return {"clients": clients, "requests_per_s": len(latencies) / elapsed, "failed": failed[0],
            **_quantiles(latencies)}


def _open_loop(url: str, bodies: _Bodies, check, rate: float, seconds: float,
               max_count: int) -> dict:
    """Poisson arrivals at ``rate`` (each request on a free connection of a pool large enough
    that arrivals never wait for one): latencies of answered requests and of refused ones
    (503), and how many got anything else."""
    answered: list[float] = []
    refused: list[float] = []
    failed = [0]
    local = threading.local()
    conns: list[_Client] = []

    def one(i: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = _Client(url)
            conns.append(local.conn)
        took, status = local.conn.post(bodies, check, i)
        if status == 200:
            answered.append(took)
        elif status == 503:
            refused.append(took)
        else:
            failed[0] += 1

    rng = random.Random(0)
    futures = []
    with ThreadPoolExecutor(512) as pool:
        t0 = time.perf_counter()
        at = 0.0
        while at < seconds and len(futures) < max_count:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, len(futures)))
            at += rng.expovariate(rate)
        for f in futures:
            f.result()
    for c in conns:
        c.close()
    return {"rate_per_s": rate, "sent": len(futures), "failed": failed[0],
            **_quantiles(answered), "refused": len(refused),
            "refused_p99_ms": _quantiles(refused)["p99_ms"]}
