"""Ranks as Ray actors, on a simulated three-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``, one node per inventory host, each offering ``host:<name>``).

A 3-stage pipeline and 3 replicas placed by the plan's hosts equal the single-process
reference; Ray never restarts a rank (the coordinator decides); a rank whose actor is killed is
named; a cluster off loopback without token authentication is refused."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch

import fastserve.graph as G
from fastserve.engine import Deployment
from fastserve.engine.raylaunch import RayRank, check_ray_auth
from fastserve.errors import EngineError, RankDeadError
from fastserve.resources.inventory import parse_inventory
from fastserve.resources.planner import Constraints, plan

# Ray binds this machine's network address, so the cluster runs with token authentication (as
# a deployment requires off loopback), with a token made for this run. Ray reads these when it
# is imported, so they are set first (and stay set for this test process).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
import ray  # noqa: E402  (the test extra installs it: missing, this file fails)
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for host in "abc":
            cluster.add_node(num_cpus=1, resources={f"host:{host}": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _inventory():
    return parse_inventory({"name": "ray3", "hosts": [
        {"name": h, "address": f"ray-node-{h}", "launcher": "ray", "cores": 1,
         "memory": "4GiB"} for h in "abc"]})


def _deploy(graph, **constraints) -> Deployment:
    inventory = _inventory()
    chosen = plan(graph, inventory, constraints=Constraints(transport="tcp", threads=1,
                                                            **constraints))
    return Deployment(graph, chosen, inventory=inventory, timeout=60)


def _reference(graph, x):
    torch.set_num_threads(1)
    return G.reference(graph, x)


def test_a_pipeline_of_ray_actors_equals_the_reference(ray_cluster):
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 8, seed=1)
    with _deploy(graph, stages=3, replicas=1, batch=8) as dep:
        assert all(isinstance(r, RayRank) for r in dep.ranks)
        assert sorted(r.host for r in dep.ranks) == ["a", "b", "c"]
        out = dep.run(x)
    torch.testing.assert_close(out["head"], _reference(graph, x)["head"], rtol=0, atol=0)


def test_replicas_of_ray_actors_equal_the_reference(ray_cluster):
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 12, seed=2)
    with _deploy(graph, stages=1, replicas=3, batch=12) as dep:
        torch.testing.assert_close(dep.run(x)["head"], _reference(graph, x)["head"])


def test_a_killed_actor_is_named_and_not_restarted(ray_cluster):
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    x = G.random_inputs(graph, 8, seed=3)
    with _deploy(graph, stages=3, replicas=1, batch=8) as dep:
        dep.run(x)
        victim = dep.ranks[1]
        ray.kill(victim.actor, no_restart=False)  # Ray may restart it only if we allowed it
        with pytest.raises(RankDeadError, match="rank 1 .*host 'b'.* died"):
            for _ in range(1000):
                dep.run(x)
        assert victim.exit_reason() is not None  # still dead: max_restarts=0


def test_ray_off_loopback_needs_token_authentication():
    check_ray_auth("127.0.0.1:6379", environ={})
    check_ray_auth("[::1]:6379", environ={})
    with pytest.raises(EngineError, match="RAY_AUTH_MODE=token"):
        check_ray_auth("10.0.0.5:6379", environ={})
    check_ray_auth("10.0.0.5:6379", environ={"RAY_AUTH_MODE": "token"})
