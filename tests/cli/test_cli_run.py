"""``fastserve run`` through the CLI boundary, with real rank processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fastserve.graph as G
from fastserve.cli.app import run_cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_run_hybrid_check_json(capsys):
    code = run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--hosts",
                    str(ROOT / "runtime/hosts/local.yaml"), "--parallel", "hybrid",
                    "--random", "12", "--check", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert (doc["layout"]["replicas"], doc["layout"]["stages"]) == (2, 2)
    assert doc["samples"] == 12 and doc["check"].startswith("outputs equal")
    assert set(doc["stages"]) == {"0", "1"}
    assert "ready" in captured.err  # progress on stderr


def test_run_reads_and_writes_npz(tmp_path, capsys):
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    inputs = G.random_inputs(graph, 5, seed=4)
    np.savez(tmp_path / "in.npz", **{k: v.numpy() for k, v in inputs.items()})
    code = run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--parallel", "data",
                    "--replicas", "2", "--input", str(tmp_path / "in.npz"),
                    "--output", str(tmp_path / "out.npz")])
    assert code == 0, capsys.readouterr().err
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        torch.testing.assert_close(torch.from_numpy(out["head"]),
                                   G.reference(graph, inputs)["head"])


def test_agent_hosts_without_keys_are_refused_clearly(capsys):
    code = run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--hosts",
                    str(ROOT / "runtime/hosts/cluster8.yaml")])
    err = capsys.readouterr().err
    assert code == 8 and err.startswith("error: hosts gpu-a, gpu-b")
    assert "--keys DIR" in err and err.count("\n") == 1


def test_unreadable_input_file(tmp_path, capsys):
    bad = tmp_path / "in.npz"
    bad.write_bytes(b"not a zip")
    code = run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--input", str(bad)])
    err = capsys.readouterr().err
    assert code == 8 and "Traceback" not in err
    assert err == f"error: {bad}: the inputs file is not a .npz archive; write one array per " \
                  f"graph input with numpy.savez(path, input_name=array)\n"


def test_run_an_export_and_refuse_a_conflicting_stage_count(tmp_path, capsys):
    spec = str(ROOT / "graphs/mlp.yaml")
    assert run_cli(["partition", spec, "--shards", "3", "--export", str(tmp_path / "e")]) == 0
    code = run_cli(["run", str(tmp_path / "e"), "--parallel", "model", "--random", "6",
                    "--check", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out[captured.out.index("{"):])
    assert doc["layout"]["stages"] == 3 and doc["check"].startswith("outputs equal")
    code = run_cli(["run", str(tmp_path / "e"), "--stages", "2"])
    err = capsys.readouterr().err
    assert code == 8 and "holds 3 shards" in err and err.count("\n") == 1


@pytest.mark.parametrize("spin", ["0", "5000"])
def test_a_run_that_polls_or_never_polls_gives_the_reference(capsys, spin):
    code = run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--stages", "2", "--random", "4",
                    "--repeat", "3", "--check", "--spin-us", spin])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "outputs equal" in captured.out + captured.err


@pytest.mark.parametrize("spin", ["-1", "100001", "1.5", "x"])
def test_a_polling_window_out_of_bounds_is_a_usage_error(capsys, spin):
    code = run_cli(["run", str(ROOT / "graphs/mlp.yaml"), "--spin-us", spin])
    err = capsys.readouterr().err
    assert code == 2 and "--spin-us" in err and "Traceback" not in err
