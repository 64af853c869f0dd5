"""The KV cache a deployment's ranks may hold: what the plan leaves of each host's memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

import fastserve.graph as G
from fastserve.generate import kv_budget
from fastserve.graph.decode import KV_BYTES, GenerationError
from fastserve.resources.inventory import local_inventory, parse_inventory
from fastserve.resources.planner import Constraints, plan

from lms import ROOT

MiB = 2**20


def inventory(a_mib: int, b_mib: int):
    return parse_inventory({"name": "two", "hosts": [
        {"name": "a", "address": "127.0.0.2", "cores": 2, "memory": f"{a_mib}MiB"},
        {"name": "b", "address": "127.0.0.3", "cores": 2, "memory": f"{b_mib}MiB"}]})


@pytest.fixture(scope="module")
def two_stages():
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    return plan(graph, inventory(8192, 8192), constraints=Constraints(stages=2, replicas=1))


def placed(p, *ranks):
    """``p`` with its two ranks on the given (host, predicted memory in MiB)."""
    return replace(p, ranks=tuple(replace(r, host=h, memory_bytes=m * MiB)
                                  for r, (h, m) in zip(p.ranks, ranks)))


def test_ranks_on_one_host_share_its_memory_and_the_tightest_rank_sets_the_budget(two_stages):
    # 1024 MiB shared by two ranks: 512 each, less 100 and 300 predicted
    assert kv_budget(placed(two_stages, ("a", 100), ("a", 300)), inventory(1024, 600)) == \
        212 * MiB
    # one rank a host: 1024 - 100 and 600 - 300
    assert kv_budget(placed(two_stages, ("a", 100), ("b", 300)), inventory(1024, 600)) == \
        300 * MiB


def test_the_budget_is_at_most_a_ranks_cache_cap(two_stages):
    assert kv_budget(placed(two_stages, ("a", 100), ("b", 100)), inventory(8192, 8192)) == \
        KV_BYTES


def test_a_rank_without_room_is_named(two_stages):
    with pytest.raises(GenerationError) as e:
        kv_budget(placed(two_stages, ("a", 100), ("b", 600)), inventory(1024, 600))
    assert str(e.value).startswith("rank 1 (stage 1) on host 'b' has no memory left for KV "
                                   "caches: its share of the host, 600.0 MiB, is no more than "
                                   "the 600.0 MiB its shard")


def test_without_an_inventory_every_rank_shares_this_machine(two_stages):
    machine = local_inventory().hosts[0].memory_bytes
    p = placed(two_stages, ("a", 100), ("b", 200))
    assert kv_budget(p, None) == min(KV_BYTES, machine // 2 - 200 * MiB)


def test_a_generating_service_without_room_for_its_caches_is_refused_before_it_starts():
    from fastserve.errors import PlanError
    from fastserve.service import ServiceConfig
    from fastserve.service.config import Generation
    from fastserve.service.service import Service

    # GPT-2 in two stages on one host: the two ranks fit together, but the planner keeps room
    # for max_seqs x max_tokens (8 x 256) positions in each rank's share of the host, as the
    # ranks' own budget counts it, and there is none
    one = parse_inventory({"name": "one", "hosts": [
        {"name": "a", "address": "127.0.0.2", "cores": 2, "memory": "1600MiB"}]})
    cfg = ServiceConfig(spec=str(ROOT / "graphs/gpt2.yaml"), stages=2,
                        generation=Generation(enabled=True))
    with pytest.raises(PlanError, match=r"no plan fits in memory: the model with a KV cache of "
                                        r"2048 positions"):
        Service(cfg, inventory=one)



def test_a_widened_plan_cannot_generate(two_stages):
    from fastserve.resources.widening import widen

    with pytest.raises(GenerationError, match=r"widened stage \(widths \[1, 2\]\).*replicas"):
        kv_budget(widen(two_stages, 1), None)
