"""Model, data and hybrid parallel runs on real rank processes, checked against the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import fastserve.graph as G
from fastserve.engine import Deployment, Layout

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def small_gpt2(tmp_path: Path) -> str:
    doc = yaml.safe_load((ROOT / "graphs/gpt2.yaml").read_text())
    doc["params"].update(vocab=300, positions=64, d_model=64, n_heads=4, n_layers=4)
    doc["dims"] = {"seq": 12}
    path = tmp_path / "gpt2-small.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def check(spec: str, layout: Layout, batch: int, micro_batches: int,
          trust_code: bool = False) -> None:
    with Deployment.from_spec(spec, layout, timeout=60, trust_code=trust_code) as dep:
        inputs = G.random_inputs(dep.graph, batch, seed=3)
        expected = G.reference(dep.graph, inputs)
        got = dep.run(inputs, micro_batches=micro_batches)
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])
        stats = dep.control("stats")
        want = expected_processed(batch, dep.plan.replicas, micro_batches)
        assert {r: s["processed"] for r, s in stats.items()} == \
            {r.rank: want[r.replica] for r in dep.plan.ranks}
        assert all(s["errors"] == 0 for s in stats.values())


def expected_processed(batch: int, replicas: int, micro_batches: int) -> list[int]:
    """How many messages each rank of each replica handles for one batch: replica r gets
    samples [r * ceil(batch / replicas), ...) of the batch, cut into micro-batches of
    ceil(n / micro_batches) samples, and each of its stages runs every micro-batch once."""
    share = -(-batch // replicas)
    counts = []
    for r in range(replicas):
        n = max(0, min(batch, (r + 1) * share) - r * share)
        size = -(-n // min(micro_batches, n)) if n else 1
        counts.append(-(-n // size))
    return counts


@pytest.mark.parametrize("layout", [Layout(1, 3), Layout(3, 1), Layout(2, 2)],
                         ids=["model", "data", "hybrid"])
def test_mlp(layout):
    check(str(ROOT / "graphs/mlp.yaml"), layout, batch=7, micro_batches=3)


@pytest.mark.parametrize("layout", [Layout(1, 2, "layer"), Layout(2, 1), Layout(2, 2, "hybrid")],
                         ids=["model", "data", "hybrid"])
def test_reduced_gpt2(tmp_path, layout):
    check(small_gpt2(tmp_path), layout, batch=5, micro_batches=2)


def test_skip_connection_dag_pipeline():
    check(str(ROOT / "graphs/unet.yaml"), Layout(1, 3), batch=4, micro_batches=2)


@pytest.mark.slow  # 10 s; test_captured_models deploys the same graph in the default run
def test_captured_transformers_model():
    check(str(ROOT / "graphs/gpt2-hf-tiny.yaml"), Layout(1, 2), batch=3, micro_batches=3,
          trust_code=True)  # its source: names the zoo's factory


def test_variable_batch_and_sequence_lengths(tmp_path):
    with Deployment.from_spec(small_gpt2(tmp_path), Layout(2, 2), timeout=60) as dep:
        requests = [G.random_inputs(dep.graph, b, {"seq": s}, seed=b * s)
                    for b, s in [(1, 5), (4, 12), (2, 30), (3, 1), (6, 7)]]
        got = dep.run_requests(requests)
        for req, out in zip(requests, got):
            torch.testing.assert_close(out["lm_head"], G.reference(dep.graph, req)["lm_head"])
        # and whole batches of different shapes through the pipeline with micro-batches
        for b, s in [(3, 9), (8, 4)]:
            x = G.random_inputs(dep.graph, b, {"seq": s}, seed=11)
            torch.testing.assert_close(dep.run(x, micro_batches=4)["lm_head"],
                                       G.reference(dep.graph, x)["lm_head"])
        # a stream of batches: batch i+1 enters while batch i drains; each merged in order
        batches = [G.random_inputs(dep.graph, b, {"seq": s}, seed=b + s)
                   for b, s in [(5, 6), (1, 6), (7, 3)]]
        for x, out in zip(batches, dep.run_batches(batches, micro_batches=3)):
            torch.testing.assert_close(out["lm_head"], G.reference(dep.graph, x)["lm_head"])


@pytest.mark.slow  # 9 s; an export runs in the default run too (test_cli_run, the README tour)
def test_runs_from_a_partition_export(tmp_path):
    from fastserve.errors import FastServeError
    from fastserve.partition import export, partition

    graph = G.compile_graph(G.load_spec(small_gpt2(tmp_path)), {})
    export(partition(graph, "weight", shards=2), tmp_path / "exp")
    with Deployment.from_spec(str(tmp_path / "exp"), Layout(2, 2), timeout=60) as dep:
        assert dep.export_dir == str(tmp_path / "exp")
        x = G.random_inputs(dep.graph, 5, seed=4)
        torch.testing.assert_close(dep.run(x, micro_batches=2)["lm_head"],
                                   G.reference(graph, x)["lm_head"])
    with pytest.raises(FastServeError, match="holds 2 shards"):
        Deployment.from_spec(str(tmp_path / "exp"), Layout(1, 3))
    # a corrupted shard file is refused before any rank starts, naming the file
    shard = tmp_path / "exp" / "shard-001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(FastServeError, match="shard-001"):
        Deployment.from_spec(str(tmp_path / "exp"), Layout(1, 2), timeout=60)


def test_serve_reads_a_stream_lazily_and_yields_in_order(tmp_path):
    with Deployment.from_spec(small_gpt2(tmp_path), Layout(2, 1), timeout=60, max_in_flight=2) as dep:
        pulled = []

        def requests():  # an endless source in spirit: count how far ahead it is read
            for i in range(40):
                pulled.append(i)
                yield G.random_inputs(dep.graph, 1 + i % 3, {"seq": 2 + i % 5}, seed=i)

        ahead = 0
        for i, out in enumerate(dep.serve(requests())):
            ahead = max(ahead, len(pulled) - i)
            x = G.random_inputs(dep.graph, 1 + i % 3, {"seq": 2 + i % 5}, seed=i)
            torch.testing.assert_close(out["lm_head"], G.reference(dep.graph, x)["lm_head"])
        assert i == 39
        # 2 replicas x 2 in flight, at most 2 x 2 x 2 results held out of order behind a slow
        # one (Deployment.serve's bound), one peeked at, one yielded: never the whole stream
        assert ahead <= 2 * 2 + 8 + 2
