"""Ranks as Ray actors, for clusters that Ray already manages (``pip install 'fastserve[ray]'``).

Ray only places and starts the ranks. All of a deployment's Ray ranks go into one placement
group, one bundle per rank, each bundle asking for the rank's threads in CPUs and a sliver of the
custom resource ``host:<name>`` of the inventory host the plan gave it (start each Ray node
with ``--resources '{"host:NAME": 1}'``): so the plan's placement is Ray's placement, and all
ranks start or none does. Each actor runs the rank program in its own process, binding its data
socket on its node's address; tensors travel on FastServe's ZeroMQ data plane (CURVE on tcp),
never through Ray's object store. Actors are created with ``max_restarts=0``: FastServe's
coordinator alone decides what happens when a rank dies.

Ray's token authentication is off by default before Ray 2.61; a deployment refuses a Ray
cluster that is not on this machine's loopback unless ``RAY_AUTH_MODE=token`` is set, since an
unauthenticated Ray cluster runs code for anyone who reaches it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fastserve.engine.rank import RankConfig
from fastserve.errors import EngineError
from fastserve.resources.inventory import is_loopback

PLACE_TIMEOUT_S = 60.0


def check_ray_auth(gcs_address: str, environ=os.environ) -> None:
    """Refuse a Ray cluster reached over the network without token authentication."""
    host = gcs_address.rsplit(":", 1)[0].strip("[]")
    if not is_loopback(host) and environ.get("RAY_AUTH_MODE") != "token":
        raise EngineError(f"the Ray cluster at {gcs_address} is not on this machine's loopback "
                          f"and Ray's token authentication is off: anyone who reaches it can "
                          f"run code there. Start every Ray node, and this driver, with "
                          f"RAY_AUTH_MODE=token (see 'ray get-auth-token --generate')")


def _ray():
    try:
        import ray
    except ImportError as e:
        raise EngineError(f"hosts with launcher 'ray' need Ray ({e}); install it with: pip "
                          f"install 'fastserve[ray]'") from None
    return ray


def node_address(address: str | None = None) -> str:
    """Connect to Ray (``address``, else ``RAY_ADDRESS`` or 'auto') unless already connected;
    check its authentication; return this driver's node address (where ranks reach it)."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto",
                 log_to_driver=False)
    check_ray_auth(ray.get_runtime_context().gcs_address)
    return ray.util.get_node_ip_address()


class RankActor:
    """The body of a rank's Ray actor: the rank program, in the actor's own process."""

    def serve(self, config: str) -> int:
        import shutil
        import tempfile
        from dataclasses import replace

        import ray

        from fastserve.engine.rank import serve

        cfg = RankConfig.from_json(config)
        workdir = tempfile.mkdtemp(prefix="fastserve-ray-")
        try:
            return serve(replace(cfg, data_in=f"tcp://{ray.util.get_node_ip_address()}:*",
                                 workdir=workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class RayRank:
    """A rank running in a Ray actor, as the deployment sees it."""

    config: RankConfig
    host: str
    actor: Any
    done: Any  # the ObjectRef of the actor's serve() call: ready when the rank has ended

    @property
    def name(self) -> str:
        c = self.config
        return (f"rank {c.rank} (replica {c.replica}, stage {c.stage}, a Ray actor on host "
                f"'{self.host}')")

    def exit_reason(self) -> str | None:
        ray = _ray()
        ready, _ = ray.wait([self.done], timeout=0)
        if not ready:
            return None
        try:
            return f"exited with code {ray.get(self.done)}"
        except Exception as e:  # noqa: BLE001 - Ray reports a dead actor or node in many types
            first = (str(e).strip().splitlines() or [""])[0]
            return f"its Ray actor died: {type(e).__name__}: {first}"

    def alive(self) -> bool:
        return self.exit_reason() is None

    def last_words(self) -> str | None:
        return None  # its log is in Ray's session logs on its node


class RayPlacement:
    """The Ray ranks of one deployment: one placement group, one actor per rank."""

    def __init__(self) -> None:
        self.group = None
        self.ranks: list[RayRank] = []

    def start(self, configs: list[tuple[RankConfig, str]]) -> list[RayRank]:
        """Place and start ``(config, host name)`` ranks, all or none."""
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [{"CPU": cfg.threads, f"host:{host}": 0.001} for cfg, host in configs]
        self.group = placement_group(bundles)
        ready, _ = ray.wait([self.group.ready()], timeout=PLACE_TIMEOUT_S)
        if not ready:
            hosts = sorted({host for _, host in configs})
            raise EngineError(f"Ray could not place {len(configs)} rank(s) on hosts "
                              f"{', '.join(hosts)} within {PLACE_TIMEOUT_S:.0f} s: does each "
                              f"host's Ray node offer the resource 'host:NAME' and the CPUs "
                              f"its ranks ask for? (ray status)")
        actor_class = ray.remote(max_restarts=0, max_task_retries=0)(RankActor)
        for i, (cfg, host) in enumerate(configs):
            actor = actor_class.options(
                num_cpus=cfg.threads, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=i)).remote()
            self.ranks.append(RayRank(cfg, host, actor, actor.serve.remote(cfg.to_json())))
        return self.ranks

    def stop(self, grace_s: float = 3.0) -> None:
        """Wait for the ranks to end (they were told to stop), then kill what is left."""
        ray = _ray()
        if self.ranks:
            ray.wait([r.done for r in self.ranks], num_returns=len(self.ranks),
                     timeout=grace_s)
        for r in self.ranks:
            ray.kill(r.actor, no_restart=True)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
