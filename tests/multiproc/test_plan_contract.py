"""The Plan is the contract: a plan file round-trips, a run from it uses exactly its cut, threads
and micro-batches (the ranks report what they built), ranks never read the spec, and a plan for
another graph or a damaged plan is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import fastserve.graph as G
from fastserve.cli.app import run_cli
from fastserve.engine import Deployment
from fastserve.errors import EngineError, PlanFileError
from fastserve.graph.builder import GraphBuilder
from fastserve.resources.inventory import local_inventory
from fastserve.resources.plan import Plan, load_plan
from fastserve.resources.planner import Constraints, plan

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def test_a_plan_file_round_trips_and_a_run_uses_exactly_it(tmp_path, capsys):
    spec = tmp_path / "unet.yaml"
    shutil.copy(ROOT / "graphs/unet.yaml", spec)
    assert run_cli(["plan", str(spec), "--stages", "3", "--micro-batches", "3",
                    "--threads", "1", "--batch", "6", "--json"]) == 0
    path = tmp_path / "plan.json"
    path.write_text(capsys.readouterr().out)
    graph = G.load(str(spec))
    chosen = load_plan(str(path), graph)
    assert Plan.from_json(json.loads(path.read_text())["plan"]) == chosen
    assert run_cli(["run", str(spec), "--plan", str(path), "--random", "6", "--check",
                    "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert ran["check"] == "outputs equal the single-process reference"
    assert [r["nodes"] for r in ran["ranks"]] == [list(s.nodes) for s in chosen.stage_plans]
    assert [r["threads"] for r in ran["ranks"]] == [r.threads for r in chosen.ranks]
    assert ran["layout"]["micro_batches"] == 3 and ran["plan_hash"] == chosen.hash(graph)


def test_ranks_never_read_the_spec_file(tmp_path):
    spec = tmp_path / "mlp.yaml"
    shutil.copy(ROOT / "graphs/mlp.yaml", spec)
    graph = G.load(str(spec))
    chosen = plan(graph, local_inventory(), constraints=Constraints(stages=2, batch=4))
    spec.unlink()  # the driver holds the graph; the ranks get node records
    with Deployment(graph, chosen, timeout=60) as dep:
        x = G.random_inputs(graph, 4)
        torch.testing.assert_close(dep.run(x)["head"], G.reference(graph, x)["head"])
        assert [m["nodes"] for _, m in sorted(dep.ready.items())] == [list(n) for n in chosen.cut]


def test_a_graph_built_in_python_deploys():
    b = GraphBuilder("built")
    x = b.input("x", ["batch", 8])
    h = b.node("fc1", "linear", [x], in_features=8, out_features=16)
    h = b.node("act", "relu", [h])
    b.node("fc2", "linear", [h], in_features=16, out_features=4)
    b.output("fc2")
    graph = b.compile()
    chosen = plan(graph, local_inventory(), constraints=Constraints(stages=2, batch=4))
    with Deployment(graph, chosen, timeout=60) as dep:
        x = G.random_inputs(graph, 4)
        torch.testing.assert_close(dep.run(x)["fc2"], G.reference(graph, x)["fc2"])


class _WrongHash(Deployment):
    """Sends its ranks another plan's hash with their shards."""

    def _load_meta(self) -> dict:
        return {**super()._load_meta(), "plan": "sha256:" + "0" * 64}


def test_a_rank_with_another_plan_hash_is_refused():
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    chosen = plan(graph, local_inventory(), constraints=Constraints(stages=2, batch=4))
    dep = _WrongHash(graph, chosen, timeout=30)
    with pytest.raises(EngineError, match="loaded plan sha256:0+, not this deployment's"):
        dep.start()
    assert all(r.process.poll() is not None for r in dep.ranks)


class _ExtraOutput(Deployment):
    """Tells the first rank to send its output to one endpoint more than it has keys for."""

    def _outputs(self, rp) -> list[str]:
        out = super()._outputs(rp)
        return out * 2 if rp.rank == 0 else out


@pytest.mark.parametrize("transport, message", [
    ("tcp", "'load' gave 2 endpoint\\(s\\) for the output, and the config 1 key"),
    ("ipc", None),  # ipc has no keys: the extra endpoint is the same peer, connected twice
])
def test_a_rank_refuses_more_output_endpoints_than_keys_on_tcp(transport, message):
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    chosen = plan(graph, local_inventory(), constraints=Constraints(stages=2, batch=4,
                                                                   transport=transport))
    dep = _ExtraOutput(graph, chosen, timeout=30)
    if message is None:
        with dep:
            x = G.random_inputs(graph, 4)
            torch.testing.assert_close(dep.run(x)["head"], G.reference(graph, x)["head"])
        return
    with pytest.raises(EngineError, match=f"rank 0 could not load its shard: {message}"):
        dep.start()
    assert all(r.process.poll() is not None for r in dep.ranks)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(hash="sha256:" + "1" * 64), "does not match its hash"),
    (lambda d: d["plan"].update(micro_batches=7), "does not match its hash"),
    (lambda d: d.update(graph_digest="sha256:" + "2" * 64), "made for another graph"),
    (lambda d: d["plan"].update(replicas="two"), "key 'plan.replicas'"),
    (lambda d: d["plan"]["ranks"][0].update(threads=0), "key 'plan.ranks[0].threads'"),
    (lambda d: d["plan"]["ranks"][0].update(threads=100_000), "from 1 to 1024"),
    (lambda d: d["plan"].update(transport="udp"), "key 'plan.transport'"),
    (lambda d: d["plan"]["stage_plans"][0].pop("nodes"), "key 'plan.stage_plans[0].nodes'"),
    (lambda d: d.update(format="other"), "not a plan file"),
    (lambda d: d.update(version=9), "plan format version 9"),
])
def test_a_damaged_or_foreign_plan_is_refused(tmp_path, edit, message):
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    doc = plan(graph, local_inventory(), constraints=Constraints(stages=2, batch=4)
               ).document(graph)
    edit(doc)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match=re.escape(message)):
        load_plan(str(path), graph)


@pytest.mark.parametrize("content", [b"", b"\x00\xff binary", b"[1, 2]", b"{" * 5000])
def test_a_plan_file_that_is_not_one_gets_one_line(tmp_path, capsys, content):
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    assert run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--plan", str(path)]) == 7
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and "internal" not in err[0]
