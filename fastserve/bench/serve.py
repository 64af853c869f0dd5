"""What the service costs and gains, measured side by side in one run.

* **the HTTP front's overhead**: one request at a time (batch 1), the engine alone (a
  :class:`Deployment` in this process) against the same request through ``fastserve serve``
  (started here as a user starts it, with its own ranks) over HTTP; interleaved rounds, p50 and
  p99 of each and their differences;
* **closed loop**: ``clients`` concurrent HTTP clients, each sending its next request when the
  last is answered, for a bounded time: requests/s against one client's, and latency;
* **open loop**: Poisson arrivals at half the closed loop's throughput, bounded in count and
  time: p50 and p99 latency and the answers that were not 200.

Every answer is checked: a benchmark that is fast because it fails cannot pass for a good one.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

Progress = Callable[[str], None]


def _quantiles(seconds: list[float]) -> dict:
    s = sorted(seconds)
    if not s:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {"n": len(s), "p50_ms": 1e3 * s[len(s) // 2],
            "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))]}


def _start_service(spec: str, max_batch: int, trust_code: bool, workdir: str
                   ) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "fastserve", "serve", spec, "--listen", "127.0.0.1:0",
           "--replicas", "1", "--threads", "1", "--max-batch", str(max_batch),
           "--max-queue", "4096"] + (["--trust-code"] if trust_code else [])
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
    from fastserve.errors import ServiceError
    raise ServiceError("the service did not start: " + " | ".join(said[-3:]))


def bench_serve(spec: str, clients: int = 32, requests: int = 300, seconds: float = 20.0,
                max_batch: int = 32, trust_code: bool = False,
                progress: Progress = lambda _m: None) -> dict:
    import httpx

    from fastserve.engine import Deployment, Layout
    from fastserve.graph import random_inputs, reference

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fastserve-bench-serve-") as workdir:
        progress(f"starting 'fastserve serve {spec}' (1 replica, max batch {max_batch})")
        proc, url = _start_service(os.path.abspath(spec), max_batch, trust_code, workdir)
        try:
            with Deployment.from_spec(spec, Layout(1, 1, threads=1), batch=1,
                                      trust_code=trust_code, progress=None) as dep:
                pool = random_inputs(dep.graph, 16, seed=1)
                expected = reference(dep.graph, pool)
                rows = [{k: v[i:i + 1] for k, v in pool.items()} for i in range(16)]
                bodies = [{"inputs": {k: v.tolist() for k, v in r.items()}} for r in rows]
                out_name = next(iter(expected))

                def check(i: int, got) -> None:
                    torch.testing.assert_close(torch.tensor(got, dtype=expected[out_name].dtype),
                                               expected[out_name][i % 16:i % 16 + 1])

                with httpx.Client(base_url=url, timeout=120) as client:
                    engine_s, http_s = [], []
                    for i in range(10):  # warm-up of both paths
                        dep.run(rows[i % 16])
                        client.post("/v1/infer", json=bodies[i % 16]).raise_for_status()
                    rounds = 3
                    progress(f"one request at a time: {requests} through the engine alone "
                             f"and {requests} over HTTP, in {rounds} interleaved rounds")
                    for r in range(rounds):
                        for i in range(requests // rounds):
                            t = time.perf_counter()
                            dep.run(rows[i % 16])
                            engine_s.append(time.perf_counter() - t)
                        for i in range(requests // rounds):
                            t = time.perf_counter()
                            resp = client.post("/v1/infer", json=bodies[i % 16])
                            http_s.append(time.perf_counter() - t)
                            resp.raise_for_status()
                            check(i, resp.json()["outputs"][out_name])
                engine, http = _quantiles(engine_s), _quantiles(http_s)
                one_client_rps = len(http_s) / sum(http_s)
            progress(f"closed loop: {clients} clients for {seconds / 2:.0f} s")
            closed = asyncio.run(_closed_loop(url, bodies, check, clients, seconds / 2))
            rate = 0.5 * closed["requests_per_s"]
            progress(f"open loop: Poisson arrivals at {rate:.1f}/s for {seconds / 2:.0f} s")
            opened = asyncio.run(_open_loop(url, bodies, check, rate, seconds / 2,
                                            max_count=int(rate * seconds) + 1))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "spec": spec, "max_batch": max_batch,
        "one_at_a_time": {"engine": engine, "http": http,
                          "overhead_p50_ms": http["p50_ms"] - engine["p50_ms"],
                          "overhead_p99_ms": http["p99_ms"] - engine["p99_ms"]},
        "closed_loop": {**closed, "one_client_requests_per_s": one_client_rps,
                        "speedup_over_one_client": closed["requests_per_s"] / one_client_rps},
        "open_loop": opened,
    }


async def _post(client, bodies, check, i: int) -> tuple[float, bool]:
    t = time.perf_counter()
    resp = await client.post("/v1/infer", json=bodies[i % len(bodies)])
    took = time.perf_counter() - t
    if resp.status_code != 200:
        return took, False
    check(i, resp.json()["outputs"][next(iter(resp.json()["outputs"]))])
    return took, True


async def _closed_loop(url, bodies, check, clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    failed = 0
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one(c: int) -> None:
            nonlocal failed
            i = c
            while time.perf_counter() < end:
                took, ok = await _post(client, bodies, check, i)
                i += clients
                latencies.append(took) if ok else None
                failed += not ok
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"clients": clients, "requests_per_s": len(latencies) / elapsed, "failed": failed,
            **_quantiles(latencies)}


async def _open_loop(url, bodies, check, rate: float, seconds: float, max_count: int) -> dict:
    import httpx

    latencies: list[float] = []
    failed = 0
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=256)) as client:
        async def one(i: int) -> None:
            nonlocal failed
            took, ok = await _post(client, bodies, check, i)
            latencies.append(took) if ok else None
            failed += not ok
        tasks = []
        t0 = time.perf_counter()
        at = 0.0
        while at < seconds and len(tasks) < max_count:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(len(tasks))))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return {"rate_per_s": rate, "sent": len(tasks), "failed": failed, **_quantiles(latencies)}
