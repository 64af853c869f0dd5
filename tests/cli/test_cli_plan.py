"""``fastserve plan`` and ``fastserve profile`` through the CLI boundary."""

from __future__ import annotations

import json
import re
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


def test_a_decode_plan_keeps_room_for_the_kv_positions_asked(capsys):
    gpt2, local = str(ROOT / "graphs/gpt2.yaml"), str(ROOT / "runtime/hosts/local.yaml")
    assert run_cli(["plan", gpt2, "--hosts", local, "--objective", "decode",
                    "--kv-positions", "1024"]) == 0
    capsys.readouterr()
    # 10 M positions of GPT-2's 72 KiB each: far beyond any host
    code = run_cli(["plan", gpt2, "--hosts", local, "--objective", "decode",
                    "--kv-positions", "10000000"])
    err = capsys.readouterr().err
    assert code == 7 and err.startswith(
        "error: no plan fits in memory: the model with a KV cache of 10000000 positions")
    # a graph without attention nodes has no cache to count: said, not silently ignored
    assert run_cli(["plan", str(ROOT / "graphs/mlp.yaml"), "--objective", "decode",
                    "--kv-positions", "1024"]) == 0
    assert "--kv-positions changes nothing" in capsys.readouterr().err


def test_profile_then_plan_with_measured_times(tmp_path, capsys):
    out = tmp_path / "mlp.profile.json"
    assert run_cli(["profile", str(ROOT / "graphs/mlp.yaml"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["node_seconds"]) == 14 and doc["host_flops"]["local"] > 1e8
    assert [b for b, _ in doc["node_times"]["head"]] == [1, 4, 16]  # timed at each batch
    capsys.readouterr()
    assert run_cli(["plan", str(ROOT / "graphs/mlp.yaml"), "--profile", str(out)]) == 0
    assert "(measured node times)" in capsys.readouterr().out


def test_plan_of_a_language_model_says_how_much_kv_cache_fits(tmp_path, capsys):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("name: small\nhosts:\n"
                     "  - {name: a, address: 127.0.0.2, cores: 1, memory: 1200MiB}\n"
                     "  - {name: b, address: 127.0.0.3, cores: 1, memory: 1300MiB}\n")
    args = ["plan", str(ROOT / "graphs/gpt2.yaml"), "--hosts", str(hosts), "--stages", "2",
            "--batch", "1"]
    assert run_cli([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["plan"]
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    memory = {"a": 1200 * 2**20, "b": 1300 * 2**20}
    # keys and values of d_model 768 in float32 for each block of the stage, in a buffer that
    # grows by doubling
    blocks = [sum(re.fullmatch(r"h\.\d+", n) is not None for n in s["nodes"])
              for s in doc["stage_plans"]]
    assert sum(blocks) == 12
    per = [2 * 768 * 4 * b for b in blocks]
    fits = min((memory[r["host"]] - r["memory_bytes"]) // (2 * per[r["stage"]])
               for r in doc["ranks"])
    assert f"generation: {fits} positions of KV cache fit in each replica" in out
    assert run_cli(["plan", str(ROOT / "graphs/mlp.yaml")]) == 0
    assert "generation" not in capsys.readouterr().out


def test_serve_refuses_replicas_that_a_static_plan_would_ignore(tmp_path, capsys):
    mlp = str(ROOT / "graphs/mlp.yaml")
    assert run_cli(["plan", mlp, "--replicas", "2", "--json"]) == 0
    plan = tmp_path / "plan.json"
    plan.write_text(capsys.readouterr().out)
    assert run_cli(["serve", mlp, "--plan", str(plan), "--replicas", "3"]) == 2
    err = capsys.readouterr().err
    assert "--replicas with a plan and the static policy" in err and "Traceback" not in err
    config = tmp_path / "svc.yaml"  # the static policy of a config file counts too
    config.write_text(f"spec: {mlp}\nplan: {plan}\nreplicas:\n  policy: static\n")
    assert run_cli(["serve", "--config", str(config), "--replicas", "1"]) == 2


def test_a_plan_for_other_hosts_run_without_them_says_so(tmp_path, capsys):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("name: two\nhosts:\n"
                     "  - {name: a, address: 10.0.0.1, cores: 1, memory: 4GiB}\n"
                     "  - {name: b, address: 10.0.0.2, cores: 1, memory: 4GiB}\n")
    mlp = str(ROOT / "graphs/mlp.yaml")
    assert run_cli(["plan", mlp, "--hosts", str(hosts), "--stages", "2", "--json"]) == 0
    plan = tmp_path / "plan.json"
    plan.write_text(capsys.readouterr().out)
    assert run_cli(["run", mlp, "--plan", str(plan), "--random", "4", "--check"]) == 0
    err = capsys.readouterr().err
    assert "note: the plan places ranks on host(s) a, b; without --hosts they all run on this " \
           "machine" in err
