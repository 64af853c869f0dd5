"""``fastserve partition`` and ``fastserve bench partition`` through the CLI's error boundary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fastserve.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)  # the machine is shared: one thread per test process
MLP = str(ROOT / "graphs/mlp.yaml")
GPT2 = str(ROOT / "graphs/gpt2.yaml")


def run(capsys, *args):
    code = run_cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_with_imbalance_and_validation(capsys):
    code, out, err = run(capsys, "partition", MLP, "--shards", "3", "--validate")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("graph 'mlp'") and "3 shards, strategy weight" in lines[0]
    header = lines[1].split()
    assert header[:4] == ["shard", "nodes", "count", "params"]
    assert {"FLOPs", "in", "out"} <= set(header)
    from fastserve.graph import load
    from fastserve.partition import partition

    expected = partition(load(MLP), "weight", shards=3)
    rows = [ln.split() for ln in lines[3:6]]
    assert [r[1] for r in rows] == [f"{s.nodes[0]}..{s.nodes[-1]}" for s in expected]
    assert [int(r[2]) for r in rows] == [len(s.nodes) for s in expected]
    assert any(ln.startswith("imbalance (largest/mean params):") for ln in lines)
    assert "valid: 3 shards chained reproduce the reference outputs" in out
    assert "Traceback" not in out + err


def test_json_has_the_documented_fields(capsys):
    code, out, err = run(capsys, "partition", GPT2, "--shards", "4", "--by", "flops",
                         "--dim", "seq=16", "--json", "--validate")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["strategy"] == "weight" and doc["valid"] is True
    assert len(doc["shards"]) == 4
    for i, shard in enumerate(doc["shards"]):
        assert shard["index"] == i
        assert {"nodes", "params_bytes", "flops", "in_bytes", "out_bytes"} <= set(shard)
    flops = [s["flops"] for s in doc["shards"]]
    assert math.isclose(doc["imbalance"], max(flops) / (sum(flops) / 4))
    assert sum(len(s["nodes"]) for s in doc["shards"]) == 16
    code, out, err = run(capsys, "partition", MLP, "--shards", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["valid"] is None  # not validated unless asked


def test_layer_strategy_flags(capsys):
    code, out, _ = run(capsys, "partition", MLP, "--strategy", "layer", "--layers-per-shard",
                       "4", "--json")
    assert code == 0
    assert len(json.loads(out)["shards"]) == math.ceil(6 / 4)
    code, _, err = run(capsys, "partition", MLP, "--strategy", "layer")
    assert code == 2 and "exactly one of --shards N or --layers-per-shard K" in err
    code, _, err = run(capsys, "partition", MLP, "--strategy", "layer", "--shards", "2",
                       "--by", "flops")
    assert code == 2 and "--by does not apply to --strategy layer" in err


def test_hybrid_memory_caps(capsys):
    code, out, err = run(capsys, "partition", GPT2, "--strategy", "hybrid", "--shards", "4",
                         "--memory-cap", "200MB", "--batch", "4", "--dim", "seq=16", "--json")
    assert code == 0, err
    doc = json.loads(out)
    for s in doc["shards"]:
        assert s["params_bytes"] + s["borrowed_bytes"] + 4 * s["activation_bytes"] <= 200e6
    code, _, err = run(capsys, "partition", GPT2, "--strategy", "hybrid", "--shards", "4",
                       "--memory-cap", "100MiB")
    assert code == 5 and err.startswith("error: ") and "missing" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "partition", GPT2, "--strategy", "hybrid", "--shards", "4",
                       "--memory-cap", "2XB")
    assert code == 2 and "unknown unit 'XB'" in err
    code, _, err = run(capsys, "partition", GPT2, "--strategy", "hybrid", "--shards", "4")
    assert code == 2 and "needs --memory-cap" in err


def test_errors_are_one_line(capsys):
    code, _, err = run(capsys, "partition", MLP, "--shards", "99")
    assert code == 5 and err == ("error: cannot cut graph 'mlp' into 99 shards: it has 14 nodes "
                                 "and every shard needs at least one; use at most 14 shards\n")
    code, _, err = run(capsys, "partition", MLP)
    assert code == 2 and "needs --shards N" in err


def test_export(capsys, tmp_path):
    code, out, err = run(capsys, "partition", MLP, "--shards", "3", "--export",
                         str(tmp_path / "out"))
    assert code == 0, err
    assert "exported 3 shard files and manifest.json" in out
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-00{i}.safetensors"
                                                       for i in range(3)]
    assert (tmp_path / "out/graph.yaml").read_text() == Path(MLP).read_text()


def test_bench_partition(capsys):
    code, out, err = run(capsys, "bench", "partition", "--nodes", "300", "--shards", "8",
                         "--repeat", "1", "--json")
    assert code == 0, err
    doc = json.loads(out)
    names = {g["name"] for g in doc["graphs"]}
    assert names == {"chain300", "gpt3-175b"}
    strategies = {(r["graph"], r["strategy"]) for r in doc["rows"]}
    assert {("chain300", "weight"), ("chain300", "layer"), ("chain300", "hybrid"),
            ("gpt3-175b", "weight")} <= strategies
    assert all(r["cold_seconds"] > 0 and r["warm_seconds"] > 0 for r in doc["rows"])
    # the figures are those of the cuts the rows name, made here again on the same chain
    from fastserve.graph import compile_graph
    from fastserve.graph.loader import spec_from_dict
    from fastserve.partition import partition
    from fastserve.partition.synthetic import chain_spec

    chain = compile_graph(spec_from_dict(chain_spec(300, seed=0)))
    chain_row = next(g for g in doc["graphs"] if g["name"] == "chain300")
    assert (chain_row["nodes"], chain_row["weight_bytes"]) == (300, chain.params_bytes)
    for strategy, options, balanced, kwargs in [
            ("weight", "by=params", "params", {"by": "params"}),
            ("weight", "by=flops", "flops", {"by": "flops"}),
            ("layer", "", "flops", {})]:
        row = next(r for r in doc["rows"] if (r["graph"], r["strategy"], r["options"])
                   == ("chain300", strategy, options))
        cut = partition(chain, strategy, shards=8, **kwargs)
        assert row["shards"] == len(cut) == 8
        assert row["imbalance"] == cut.imbalance_by(balanced)
        assert row["largest_memory_bytes"] == max(s.memory_bytes(1) for s in cut)
    gpt3 = next(g for g in doc["graphs"] if g["name"] == "gpt3-175b")
    assert 174e9 * 4 < gpt3["weight_bytes"] < 176e9 * 4  # float32
    # no weights were allocated: the process stayed far below the model's weight bytes
    assert doc["peak_rss_bytes"] < gpt3["weight_bytes"] / 100
