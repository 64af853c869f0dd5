"""A three-host cluster on one machine, for tests, benchmarks and trying FastServe out: three
agents on the loopback addresses 127.0.0.2, .3 and .4 (Linux routes all of 127.0.0.0/8 to the
loopback device, so no root is needed), with fresh keys. ``runtime/netns-cluster.sh`` makes the
same three hosts as network namespaces (needs root)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

from fastserve.engine.agent import spawn_agent
from fastserve.engine.keys import ClusterKeys, load_keys, new_keys
from fastserve.resources.inventory import Inventory, parse_inventory

LOOPBACK = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@contextlib.contextmanager
def loopback_cluster(directory: str | Path) -> Iterator[tuple[Inventory, ClusterKeys]]:
    """Three agents on 127.0.0.2-4 (hosts a, b, c; one core and 4 GiB each, as the planner
    sees them), keys, logs and caches in ``directory``; yields (inventory, coordinator keys)
    and stops the agents (and so their ranks) on the way out."""
    d = Path(directory)
    new_keys(d / "keys")
    procs, hosts = [], []
    try:
        for name, address in zip("abc", LOOPBACK):
            proc, endpoint = spawn_agent(f"{address}:0", str(d / "keys"),
                                         str(d / f"agent-{name}.log"),
                                         cache=str(d / f"cache-{name}"))
            procs.append(proc)
            hosts.append({"name": name, "address": address, "launcher": "agent",
                          "port": int(endpoint.rsplit(":", 1)[1]), "cores": 1,
                          "memory": "4GiB"})
        yield (parse_inventory({"name": "loopback3", "hosts": hosts}),
               load_keys(d / "keys", "coordinator"))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
