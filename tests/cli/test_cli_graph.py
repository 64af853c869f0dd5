"""``fastserve compile`` and ``fastserve check`` through the CLI boundary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fastserve.cli.app import run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_compile_table_has_every_node_and_totals(capsys):
    assert run_cli(["compile", str(ROOT / "graphs/mlp.yaml")]) == 0
    out = capsys.readouterr().out
    assert "layer.5.act" in out and out.splitlines()[-1].startswith("total")
    assert "413.96K" in out  # parameters of the MLP


def test_compile_json_schema(capsys):
    assert run_cli(["compile", str(ROOT / "graphs/unet.yaml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "unet"
    assert {"id", "op", "params_bytes", "flops", "out_bytes"} <= set(doc["nodes"][0])
    assert {"src", "dst", "bytes"} <= set(doc["edges"][0])
    assert doc["totals"]["params_bytes"] == sum(n["params_bytes"] for n in doc["nodes"])
    assert doc["totals"]["flops"] == sum(n["flops"] for n in doc["nodes"])


def test_compile_dim_override_changes_costs(capsys):
    d, layers, vocab = 768, 12, 50257  # GPT-2 small
    for seq in (8, 16):
        assert run_cli(["compile", str(ROOT / "graphs/gpt2.yaml"), "--json", "--dim",
                        f"seq={seq}"]) == 0
        flops = json.loads(capsys.readouterr().out)["totals"]["flops"]
        # per sample, matmuls only: per block qkv, proj and mlp (24 s d^2) plus QK^T and AV
        # (4 s^2 d), and the head (2 s d V)
        assert flops == layers * (24 * seq * d * d + 4 * seq * seq * d) + 2 * seq * d * vocab


def test_bad_dim_is_one_line(capsys):
    assert run_cli(["compile", str(ROOT / "graphs/gpt2.yaml"), "--dim", "seq"]) == 2
    assert capsys.readouterr().err.startswith("error: --dim expects NAME=SIZE")


def test_check_runs_the_reference_and_prints_shapes(capsys):
    assert run_cli(["check", str(ROOT / "graphs/unet.yaml"), "--batch", "3"]) == 0
    captured = capsys.readouterr()
    assert "output join: shape (3, 2, 32, 32) float32" in captured.out
    assert "building weights" in captured.err


def test_real_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ninputs: {x: {shape: [2]}}\nnodes:\n  - {id: a, op: nope}\n"
                   "outputs: [a]\n")
    proc = subprocess.run([sys.executable, "-m", "fastserve", "compile", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown op 'nope'" in proc.stderr
    assert proc.stderr.count("\n") == 1
