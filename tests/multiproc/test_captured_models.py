"""Captured transformers models deploy with each rank holding only its shard.

BERT- and Llama-style models are built by a zoo factory from a safetensors checkpoint this test
writes; the shipped captured graph has seeded weights; a model captured in Python runs from its
checkpoint. Every parallel mode (stages, replicas, both) equals the eager model, each rank's
weights are its shard's and no more, and ranks that read every tensor from the checkpoint run no
model code at all (they are not trusted to)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

import fastserve.graph as G
from fastserve.engine import Deployment
from fastserve.errors import EngineError
from fastserve.graph.spec import WeightsSpec
from fastserve.graph.zoo import hf_bert, hf_gpt2, hf_llama
from fastserve.resources.inventory import local_inventory
from fastserve.resources.planner import Constraints, plan

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)

VOCAB = 512
MODELS = {
    "bert": (hf_bert, {"n_layer": 4, "hidden_size": 64, "intermediate_size": 128, "n_head": 4,
                       "vocab_size": VOCAB, "pooler": False}),
    "llama": (hf_llama, {"n_layer": 4, "hidden_size": 64, "intermediate_size": 96, "n_head": 4,
                         "n_kv_head": 2, "vocab_size": VOCAB}),
}
LAYOUTS = [pytest.param((1, 3), id="model-3-stages"), pytest.param((2, 1), id="data-2-replicas"),
           pytest.param((2, 2), id="hybrid-2x2")]


def _write(directory: Path, name: str) -> tuple[Path, torch.nn.Module]:
    factory, kwargs = MODELS[name]
    torch.manual_seed(7)
    model = factory(**kwargs)
    save_model(model, str(directory / f"{name}.safetensors"))
    spec = {"name": name, "dims": {"seq": 12},
            "weights": {"checkpoint": f"{name}.safetensors"},
            "source": {"torch": f"fastserve.graph.zoo:{factory.__name__}", "kwargs": kwargs,
                       "example_inputs": {"input_ids": {"shape": ["batch", "seq"],
                                                        "dtype": "int64", "high": VOCAB}}}}
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    return path, model


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpointed(request, tmp_path_factory):
    spec, model = _write(tmp_path_factory.mktemp(request.param), request.param)
    return G.load(str(spec), trust_code=True), model


def _deploy(graph, layout: tuple[int, int], **options) -> Deployment:
    replicas, stages = layout
    chosen = plan(graph, local_inventory(), constraints=Constraints(
        replicas=replicas, stages=stages, batch=4, threads=1))
    return Deployment(graph, chosen, timeout=60, **options)


def _shard_bytes(graph, nodes) -> int:
    return sum(graph.node(n)["params_bytes"] + graph.node(n)["borrowed_bytes"] for n in nodes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpointed_model_equals_eager_in_every_mode(checkpointed, layout):
    graph, model = checkpointed
    x = G.random_inputs(graph, 4, seed=1)
    # trust_code=False: every tensor comes from the checkpoint, so the ranks run no model code
    with _deploy(graph, layout, trust_code=False) as dep:
        out = dep.run(x)
        ready = dict(dep.ready)
        cut = dep.plan.cut
    with torch.no_grad():
        eager = model(**x)[0]
    torch.testing.assert_close(out[graph.outputs[0]], eager)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for rank, meta in ready.items():
        nodes = cut[rank % len(cut)]
        assert meta["nodes"] == list(nodes)
        # the rank holds its shard's weights (buffers aside), never the whole model
        assert 0.9 * _shard_bytes(graph, nodes) <= meta["weight_bytes"] <= \
            _shard_bytes(graph, nodes)
        if len(cut) > 1:
            assert meta["weight_bytes"] < 0.75 * total


def test_ranks_of_a_captured_model_never_read_the_spec(tmp_path):
    spec, model = _write(tmp_path, "llama")
    graph = G.load(str(spec), trust_code=True)
    spec.unlink()  # the driver holds the graph and the programs; the checkpoint stays
    x = G.random_inputs(graph, 3, seed=2)
    with _deploy(graph, (1, 2)) as dep:
        out = dep.run(x)
    with torch.no_grad():
        torch.testing.assert_close(out["lm_head"], model(**x).logits)


def test_the_shipped_captured_graph_with_seeded_weights(tmp_path):
    spec = tmp_path / "gpt2-hf-tiny.yaml"
    shutil.copy(ROOT / "graphs/gpt2-hf-tiny.yaml", spec)
    graph = G.load(str(spec), trust_code=True)
    eager = G.seed_weights(hf_gpt2(**graph.spec.source.kwargs), graph.spec.weights.seed)
    x = G.random_inputs(graph, 4, seed=3)
    with torch.no_grad():
        want = eager(**x).logits
    # seeded weights are made by the model's own initialisers: code the ranks must be trusted
    # to run, and a rank that is not says so
    with pytest.raises(EngineError, match="trust"):
        _deploy(graph, (1, 2), trust_code=False).start()
    # two stages (replicas and stages at once are checkpointed_model_equals_eager's: every
    # rank here runs the factory, 4 ranks cost 8 s more)
    with _deploy(graph, (1, 2), trust_code=True) as dep:
        torch.testing.assert_close(dep.run(x)["lm_head"], want)
        last = dep.ready[1]
    # the last stage borrows the tied embedding for its head, and holds it once
    assert last["weight_bytes"] == _shard_bytes(graph, last["nodes"])


def test_a_model_captured_in_python_deploys_from_its_checkpoint(tmp_path):
    torch.manual_seed(5)
    model = hf_llama(**MODELS["llama"][1])
    path = tmp_path / "live.safetensors"
    save_model(model, str(path))
    ids = torch.randint(0, VOCAB, (2, 10))
    graph = G.capture(model, {"input_ids": ids}, weights=WeightsSpec(checkpoint=str(path)))
    x = {"input_ids": torch.randint(0, VOCAB, (4, 10))}
    with torch.no_grad():
        want = model(**x).logits
    with _deploy(graph, (1, 2)) as dep:
        torch.testing.assert_close(dep.run(x)[graph.outputs[0]], want)
    # without a checkpoint the ranks would have nothing to load: refused before any starts
    bare = G.capture(model, {"input_ids": ids})
    with pytest.raises(EngineError, match="checkpoint"):
        _deploy(bare, (1, 2))
