"""Where a deployment's ranks start: as subprocesses of this machine, through each host's agent
(:mod:`fastserve.engine.remote`), or as Ray actors (:mod:`fastserve.engine.raylaunch`), as the
inventory's ``launcher`` of each plan host says. The deployment hands every rank here and gets
back something that answers ``alive()``, ``exit_reason()`` and ``last_words()``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import zmq

from fastserve.engine.keys import ClusterKeys
from fastserve.engine.launcher import RankProcess, launch_local, stop_processes
from fastserve.engine.rank import RankConfig
from fastserve.engine.raylaunch import RayPlacement, RayRank
from fastserve.engine.raylaunch import node_address as ray_node_address
from fastserve.engine.remote import Heartbeat, HostLink, RemoteRank, address_towards, wait_for
from fastserve.errors import EngineError
from fastserve.graph.checkpoint import node_subset
from fastserve.partition.manifest import as_sent, load_manifest
from fastserve.resources.inventory import Host, Inventory
from fastserve.resources.plan import Plan

Rank = Union[RankProcess, RemoteRank, RayRank]


class Placement:
    """The launchers of one deployment's ranks, and what they hold (agent links, a Ray
    placement group, the heartbeat)."""

    def __init__(self, ctx: zmq.Context, plan: Plan, inventory: Inventory | None,
                 keys: ClusterKeys | None, *, coordinator_address: str | None = None,
                 ray_address: str | None = None,
                 progress: Callable[[str], None] = lambda _m: None) -> None:
        self.ctx, self.keys, self.progress = ctx, keys, progress
        # hosts whose ranks do not start here: through an agent, or as Ray actors
        self.remote = {h.name: h for h in (inventory.host(r.host) for r in plan.ranks)
                       if h.launcher != "local"} if inventory is not None else {}
        self.bind = "127.0.0.1"  # where this process's tcp sockets bind
        if self.remote:
            names = ", ".join(sorted(self.remote))
            agents = [h for h in self.remote.values() if h.launcher == "agent"]
            if agents and keys is None:
                raise EngineError(f"the plan places ranks on host(s) {names}, which start "
                                  f"through their agents: give the cluster keys (--keys DIR; "
                                  f"make them with: fastserve keys new DIR)")
            if plan.transport != "tcp":
                raise EngineError(f"the plan places ranks on host(s) {names}, but its transport "
                                  f"is {plan.transport}: ranks on several hosts talk over tcp "
                                  f"(plan with --transport tcp)")
            if coordinator_address:
                self.bind = coordinator_address
            elif agents:
                self.bind = address_towards(agents[0].address)
            else:
                self.bind = ray_node_address(ray_address)
        self.links: dict[str, HostLink] = {}
        self.heartbeat: Heartbeat | None = None
        self.ray: RayPlacement | None = None
        self._on_ray: list[tuple[RankConfig, str]] = []
        self._subsets: tempfile.TemporaryDirectory | None = None  # per-rank weight files
        self._exports: dict[str, dict] = {}  # export directory -> its manifest, read once

    def launch(self, cfg: RankConfig, host_name: str, workdir: str) -> Rank | None:
        """Start one rank on its host; None for a Ray rank, placed with the others by
        :meth:`place_ray` (all or none)."""
        host = self.remote.get(host_name)
        if host is None:
            return launch_local(cfg, workdir)
        if host.launcher == "agent":
            return self._link(host).start(cfg)
        self._on_ray.append((cfg, host.name))
        return None

    def place_ray(self) -> list[RayRank]:
        """Place the Ray ranks :meth:`launch` deferred, then start the agents' heartbeat."""
        placed = []
        if self._on_ray:
            self.ray = RayPlacement()
            self.progress(f"placing {len(self._on_ray)} rank(s) as Ray actors")
            placed = self.ray.start(self._on_ray)
        if self.links:
            self.heartbeat = Heartbeat(list(self.links.values()))
        return placed

    def _link(self, host: Host) -> HostLink:
        """The connection to ``host``'s agent, opened (and checked) on first use."""
        link = self.links.get(host.name)
        if link is None:
            link = self.links[host.name] = HostLink(self.ctx, host.name, host.agent, self.keys)
            info = wait_for(link, timeout=3.0)
            self.progress(f"host '{host.name}' ({host.agent}): agent on {info.get('host')}, "
                          f"{info.get('cores')} cores")
        return link

    def record_for(self, rank: Rank, record: bytes) -> bytes:
        """The shard record as ``rank`` needs it: for a rank on an agent's host, the tensors
        of the checkpoint it names that its nodes use (all of a captured model's checkpoint, or
        of a torch file) are put in that host's cache first (sent once; cached by sha256) and
        named by their path there."""
        if not isinstance(rank, RemoteRank):
            return record
        doc = json.loads(record)
        if doc.get("kind") == "export":
            return self._export_file(rank, doc)
        checkpoint = (doc.get("weights") or {}).get("checkpoint")
        if not checkpoint:
            return record
        if doc.get("kind") == "nodes" and checkpoint.endswith(".safetensors"):
            # only the tensors of the rank's nodes (and of a node its head is tied to)
            if self._subsets is None:
                self._subsets = tempfile.TemporaryDirectory(prefix="fastserve-weights-")
            checkpoint = str(node_subset(Path(checkpoint), [n["id"] for n in doc["nodes"]]
                                         + list(doc.get("tied") or {}),
                                         Path(self._subsets.name)))
        self.progress(f"host '{rank.link.name}': sending {os.path.basename(checkpoint)} "
                      f"({os.path.getsize(checkpoint) / 2**20:.0f} MiB) unless it has it")
        doc["weights"]["checkpoint"] = rank.link.upload(checkpoint)
        return json.dumps(doc).encode()

    def _export_file(self, rank: RemoteRank, doc: dict) -> bytes:
        """An export's shard for a host that does not share the export directory: the spec
        copy and the shard's file are put in the host's cache (sent once; cached by sha256),
        and the rank gets the manifest itself, which it validates and checks both files
        against."""
        if doc["dir"] not in self._exports:  # verified when the driver loaded it
            self._exports[doc["dir"]] = load_manifest(doc["dir"], verify_shards=False)
        manifest = self._exports[doc["dir"]]
        entry = manifest["shards"][doc["index"]]
        self.progress(f"host '{rank.link.name}': sending shard {doc['index']} of export "
                      f"'{manifest['directory']}' ({entry['bytes'] / 2**20:.0f} MiB) unless "
                      f"it has it")
        return json.dumps({"kind": "export-file", "manifest": as_sent(manifest),
                           "index": doc["index"],
                           "spec": rank.link.upload(manifest["spec"]["path"]),
                           "file": rank.link.upload(entry["path"])}).encode()

    def quiet(self) -> None:
        """Stop the heartbeat (the deployment is stopping its ranks)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def stop(self, ranks: list[Rank | None], grace_s: float = 3.0) -> None:
        """Make sure every rank is gone, on every host (they were asked to stop first); a
        local rank still running after ``grace_s`` seconds is killed."""
        self.quiet()
        stop_processes([r for r in ranks if isinstance(r, RankProcess)], grace_s)
        for link in self.links.values():
            link.stop()
        if self._subsets is not None:
            self._subsets.cleanup()
            self._subsets = None
        if self.ray is not None:
            self.ray.stop()
