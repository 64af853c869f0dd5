"""``fastserve plan`` and ``fastserve profile`` through the CLI boundary."""

from __future__ import annotations

import json
from pathlib import Path

from fastserve.cli.app import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_plan_explain_lists_stages_ranks_and_alternatives(capsys):
    code = run_cli(["plan", str(ROOT / "graphs/gpt2.yaml"), "--hosts",
                    str(ROOT / "runtime/hosts/cluster8.yaml"), "--explain"])
    out = capsys.readouterr().out
    assert code == 0
    assert "bottleneck" in out and "predicted: throughput" in out and "lost," in out


def test_plan_json_fixed_layout(capsys):
    code = run_cli(["plan", str(ROOT / "graphs/mlp.yaml"), "--parallel", "model", "--stages",
                    "2", "--json"])
    doc = json.loads(capsys.readouterr().out)["plan"]
    assert code == 0 and (doc["replicas"], doc["stages"]) == (1, 2)
    assert len(doc["ranks"]) == 2 and doc["bounds"][-1] == 14


def test_plan_infeasible_is_one_line(capsys):
    code = run_cli(["plan", str(ROOT / "graphs/gpt3-175b.yaml"), "--hosts",
                    str(ROOT / "runtime/hosts/local.yaml"), "--batch", "1"])
    err = capsys.readouterr().err
    assert code == 7 and err.startswith("error: no plan fits in memory") and "GiB more" in err


def test_profile_then_plan_with_measured_times(tmp_path, capsys):
    out = tmp_path / "mlp.profile.json"
    assert run_cli(["profile", str(ROOT / "graphs/mlp.yaml"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["node_seconds"]) == 14 and doc["host_flops"]["local"] > 1e8
    assert [b for b, _ in doc["node_times"]["head"]] == [1, 4, 16]  # timed at each batch
    capsys.readouterr()
    assert run_cli(["plan", str(ROOT / "graphs/mlp.yaml"), "--profile", str(out)]) == 0
    assert "(measured node times)" in capsys.readouterr().out
