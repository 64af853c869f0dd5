"""A widened stage (several ranks running one shard, sharing its micro-batches) computes exactly
what one process does, on ipc and on tcp with CURVE, wherever the wide stage sits, and every rank
of it takes work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastserve.graph as G
from fastserve.engine import Deployment
from fastserve.resources.inventory import local_inventory
from fastserve.resources.plan import Plan, check_plan
from fastserve.resources.planner import Constraints, plan
from fastserve.resources.widening import widen

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "graphs/mlp.yaml")
pytestmark = pytest.mark.timeout(180)


def _planned(graph, stages: int, widths: list[int], transport: str = "ipc",
             replicas: int = 1) -> Plan:
    chosen = plan(graph, local_inventory(), constraints=Constraints(
        replicas=replicas, stages=stages, threads=1, batch=16, micro_batches=8,
        transport=transport))
    for k, w in enumerate(widths):
        for _ in range(w - 1):
            chosen = widen(chosen, k)
    return chosen


@pytest.mark.parametrize("widths,transport", [
    ([2, 1], "ipc"),  # a wide first stage: the coordinator's input serves both in turn
    ([1, 2], "ipc"),  # a wide last stage: two result rings
    ([2, 2], "tcp"),  # every hop fans out, each peer with its own CURVE key
])
def test_a_widened_stage_equals_one_process(widths, transport):
    graph = G.load(MLP)
    chosen = _planned(graph, 2, widths, transport)
    check_plan(chosen, graph)
    assert len(chosen.ranks) == sum(widths)
    x = G.random_inputs(graph, 16)
    expected = G.reference(graph, x)["head"]
    with Deployment(graph, chosen, timeout=60) as dep:
        for _ in range(3):
            torch.testing.assert_close(dep.run(x)["head"], expected)
        processed = {r: s["processed"] for r, s in dep.control("stats").items()}
    for k, w in enumerate(widths):
        ranks = [r.rank for r in chosen.stage_ranks(0, k)]
        assert len(ranks) == w
        # 24 micro-batches per stage over its ranks; each rank of a wide stage took some
        assert sum(processed[r] for r in ranks) == 24
        assert all(processed[r] > 0 for r in ranks), processed


def test_a_widened_plan_with_replicas_runs_from_its_file(tmp_path):
    graph = G.load(MLP)
    chosen = _planned(graph, 2, [1, 2], replicas=2)
    assert [(r.rank, r.replica, r.stage) for r in chosen.ranks] == [
        (0, 0, 0), (1, 0, 1), (2, 0, 1), (3, 1, 0), (4, 1, 1), (5, 1, 1)]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(chosen.document(graph)))
    from fastserve.resources.plan import load_plan

    again = load_plan(str(path), graph)
    assert again == chosen
    x = G.random_inputs(graph, 16)
    with Deployment(graph, again, timeout=60) as dep:
        torch.testing.assert_close(dep.run(x)["head"], G.reference(graph, x)["head"])
        assert sorted(dep.ready) == list(range(6))


def test_the_cli_plans_a_widened_stage_and_runs_it_exactly(tmp_path, capsys):
    from fastserve.cli.app import run_cli

    assert run_cli(["plan", MLP, "--stages", "2", "--widen", "1", "--micro-batches", "4",
                    "--threads", "1", "--batch", "8", "--json"]) == 0
    path = tmp_path / "plan.json"
    path.write_text(capsys.readouterr().out)
    assert json.loads(path.read_text())["plan"]["widths"] == [1, 2]
    assert run_cli(["run", MLP, "--plan", str(path), "--random", "8", "--check",
                    "--json"]) == 0
    out = capsys.readouterr()
    ran = json.loads(out.out)
    assert ran["check"] == "outputs equal the single-process reference"
    assert [r["rank"] for r in ran["ranks"]] == [0, 1, 2]
    assert "1 replica(s) x 2 stage(s) (ranks per stage 1/2) = 3 rank(s)" in out.err
    assert run_cli(["plan", MLP, "--stages", "2", "--widen", "2"]) != 0
    assert "the plan has stages 0 to 1, not 2" in capsys.readouterr().err
