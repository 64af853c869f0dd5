"""Several hosts: what a hop between hosts costs, and what running a plan over hosts costs.

* hop: a FastServe round trip between two host addresses (tcp, CURVE, as a deployment's
  cross-host links run) against a raw pyzmq tcp round trip of the same bytes with CURVE off and
  on, interleaved; then, where this machine has a core for each end, a FastServe and a raw peer
  whose ends poll before they sleep, as a deployment's ranks and coordinator do;
* pipeline: a 3-stage plan whose ranks start on three hosts through their agents, against the
  same plan (same cut, threads, micro-batches, tcp) with every rank started on this machine: time
  to ready and seconds per batch of a stream; the outputs are checked against one process.

Without an inventory the benchmark starts its own cluster: three agents on 127.0.0.2-4 with
fresh keys (one machine underneath, so it measures FastServe's own cost of going through agents
and host addresses, not a network).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable

import torch

from fastserve.bench.engine import _timed
from fastserve.engine.testcluster import loopback_cluster

SIZES = {"4KiB": 4 << 10, "16MiB": 16 << 20}


def bench_hosts(spec: str = "graphs/gpt2.yaml", *, batch: int = 8, seq: int = 32,
                stream: int = 4, blocks: int = 7, inventory=None, keys=None,
                progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Hop costs between two hosts and a 3-host pipeline against the same plan on one host."""
    with tempfile.TemporaryDirectory(prefix="fastserve-bench-hosts-") as d:
        if inventory is None:
            progress("starting three agents on 127.0.0.2-4")
            with loopback_cluster(d) as (inventory, keys):
                return _bench(spec, batch, seq, stream, blocks, inventory, keys, progress)
        return _bench(spec, batch, seq, stream, blocks, inventory, keys, progress)


def _bench(spec, batch, seq, stream, blocks, inventory, keys, progress) -> dict:
    from fastserve.bench.engine import _Echo, polling_peers, polling_window, round_trips
    from fastserve.engine.deployment import Deployment
    from fastserve.engine.launcher import Addresses
    from fastserve.graph import load, random_inputs, reference
    from fastserve.resources.planner import Constraints, plan

    agents = [h for h in inventory.hosts if h.launcher == "agent"]
    if len(agents) < 2:
        raise ValueError("the inventory needs at least two agent hosts")
    hops = []
    addresses = Addresses("tcp", host=agents[0].address)
    # both ends of these hops run on this machine: they poll when it has a core for each
    spin = polling_window()
    peers = {"raw": _Echo(addresses, "raw", curve=False),
             "raw_curve": _Echo(addresses, "raw", curve=True, name="raw-curve"),
             "fastserve": _Echo(addresses, "fastserve"), **polling_peers(addresses, spin)}
    try:
        for label, size in SIZES.items():
            progress(f"hop {label}: raw tcp, raw tcp + CURVE, FastServe (CURVE)"
                     + (", and raw and FastServe polling" if spin else ""))
            t = round_trips(peers, size, blocks)
            hop = {"size": label, "raw_rtt_us": t["raw"] * 1e6,
                   "raw_curve_rtt_us": t["raw_curve"] * 1e6,
                   "fastserve_rtt_us": t["fastserve"] * 1e6,
                   "vs_raw": t["fastserve"] / t["raw"],
                   "vs_raw_curve": t["fastserve"] / t["raw_curve"], "spin_us": spin}
            if spin:  # FastServe as a deployment waits, against both raw trips
                hop.update({"raw_polling_rtt_us": t["raw_polling"] * 1e6,
                            "fastserve_polling_rtt_us": t["fastserve_polling"] * 1e6,
                            "polling_vs_raw": t["fastserve_polling"] / t["raw"],
                            "polling_vs_raw_polling": t["fastserve_polling"]
                            / t["raw_polling"]})
            hops.append(hop)
    finally:
        for p in peers.values():
            p.close()
        addresses.close()

    graph = load(spec, {"seq": seq})
    inputs = random_inputs(graph, batch)
    stages = min(3, len(agents))
    chosen = plan(graph, inventory, constraints=Constraints(
        stages=stages, replicas=1, threads=1, batch=batch, transport="tcp"))
    runs = {}
    for where, kwargs in (("hosts", {"inventory": inventory, "keys": keys}),
                          ("one_host", {})):
        progress(f"{stages}-stage pipeline of {graph.name}, ranks on "
                 f"{'three hosts' if where == 'hosts' else 'this machine'}")
        t0 = time.perf_counter()
        with Deployment(graph, chosen, timeout=300, load_timeout=600, **kwargs) as dep:
            ready_s = time.perf_counter() - t0
            out = dep.run(inputs)  # warm up
            best = min(_timed(lambda: dep.run_batches([inputs] * stream)) for _ in range(2))
        runs[where] = {"ready_s": ready_s, "seconds_per_batch": best / stream, "out": out}
    torch.set_num_threads(1)  # as the ranks
    expected = reference(graph, inputs)
    exact = all(torch.equal(runs[w]["out"][k], expected[k]) for w in runs for k in expected)
    return {"graph": graph.name, "batch": batch, "seq": seq, "stages": stages, "hops": hops,
            "ready_s": {w: r["ready_s"] for w, r in runs.items()},
            "seconds_per_batch": {w: r["seconds_per_batch"] for w, r in runs.items()},
            "hosts_vs_one_host": runs["one_host"]["seconds_per_batch"]
            / runs["hosts"]["seconds_per_batch"], "exact": exact}


def measure_link(client) -> dict:
    """Latency (median round trip of 4 KiB, of 21) and bandwidth (16 MiB each way, best of 3)
    of the link to an agent, through its echo request."""
    small = bytes(4096)
    trips = [_timed(lambda: client.request("echo", frame=small)) for _ in range(21)]
    big = bytes(16 << 20)
    best = min(_timed(lambda: client.request("echo", frame=big, timeout=30.0))
               for _ in range(3))
    return {"latency_us": statistics.median(trips) * 1e6, "bandwidth": 2 * len(big) / best}
