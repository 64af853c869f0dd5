"""``fastserve bench widen`` through the CLI boundary on the small MLP: the three layouts run
(checked against one process inside), with the ranks and weights each holds, and the ratios are
the quotients of the rates they name."""

from __future__ import annotations

import json

import pytest

from fastserve.cli.app import run_cli
from lms import ROOT

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow  # 12 s: three deployments measured, like the other benchmark commands
def test_bench_widen_runs_the_three_layouts_and_states_their_ratios(capsys):
    code = run_cli(["bench", "widen", str(ROOT / "graphs/mlp.yaml"), "--batch", "8",
                    "--micro-batches", "4", "--stream", "1", "--rounds", "1", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    layouts = doc["layouts"]
    assert {k: v["ranks"] for k, v in layouts.items()} == {"pipeline": 2, "widened": 3,
                                                          "replicas": 4}
    # the first stage holds 3 of the MLP's 14 nodes: the second is slow, and it is widened
    assert doc["first_stage_nodes"] == 3 and doc["slow_stage"] == 1 == doc["widen_choice"]
    weights = {k: v["weight_bytes"] for k, v in layouts.items()}
    assert weights["replicas"] == 2 * weights["pipeline"]
    assert weights["pipeline"] < weights["widened"] < weights["replicas"]
    rate = {k: v["samples_per_s"] for k, v in layouts.items()}
    assert all(r > 0 for r in rate.values())
    assert doc["ratios"]["widened_vs_replicas"] == pytest.approx(rate["widened"] /
                                                                 rate["replicas"])
    assert layouts["widened"]["samples_per_s_per_rank"] == pytest.approx(rate["widened"] / 3)
