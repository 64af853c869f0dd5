"""A captured transformers GPT-2 or Llama rewritten with the op library generates exactly as
transformers does: the same logits as the eager model with the graph's weights, and greedy
tokens equal to ``generate()``'s, through one and two stages; whatever the rewrite does not
compute the same way is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_model

import fastserve.graph as G
from fastserve.generate import Generator, LocalPipeline, Request
from fastserve.graph import zoo
from fastserve.graph.decode import GenerationError, check_generative
from fastserve.graph.hf import rewrite
from lms import ROOT, hf_greedy

STEPS = 10
PROMPTS = [[5, 17, 300, 2, 9], [44, 8, 120, 7, 61, 3, 250, 11], [90]]
# wider weights than the factories' defaults, so that greedy decoding does not settle on one
# token and the comparison means something
GPT2 = {"n_layer": 3, "n_embd": 64, "n_head": 4, "vocab_size": 320, "n_positions": 64,
        "initializer_range": 0.15}
LLAMA = {"n_layer": 3, "hidden_size": 64, "intermediate_size": 96, "n_head": 4, "n_kv_head": 2,
         "vocab_size": 320, "initializer_range": 0.2}


def source_spec(tmp_path, factory: str, kwargs: dict, *, seed: int = 0, weights=None,
                inputs=None) -> str:
    target = factory if ":" in factory else f"fastserve.graph.zoo:{factory}"
    doc = {"name": f"{factory.rpartition(':')[2]}-tiny", "dims": {"seq": 16},
           "weights": weights or {"seed": seed},
           "source": {"torch": target, "kwargs": kwargs,
                      "example_inputs": inputs or {"input_ids": {
                          "shape": ["batch", "seq"], "dtype": "int64", "high": 320}}}}
    path = tmp_path / f"{factory}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def rewritten(tmp_path, spec: str) -> G.Graph:
    return G.compile_graph(rewrite(G.load_spec(spec, trust_code=True), tmp_path))


@pytest.mark.parametrize("factory,kwargs,seed", [
    ("hf_gpt2", GPT2, 0),  # tied head, gelu_new, learned positions
    ("hf_gpt2", {**GPT2, "tie_word_embeddings": False, "n_inner": 96}, 2),
    ("hf_llama", LLAMA, 3),  # untied head, grouped-query rotary attention
    ("hf_llama", {**LLAMA, "tie_word_embeddings": True}, 1)])
def test_the_rewrite_generates_as_transformers_does(tmp_path, factory, kwargs, seed):
    graph = rewritten(tmp_path, source_spec(tmp_path, factory, kwargs, seed=seed))
    check_generative(graph)
    model = G.seed_weights(getattr(zoo, factory)(**kwargs), seed)  # the eager model
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(G.build_reference(graph)({"input_ids": ids})["lm_head"],
                                   model(input_ids=ids).logits)
    expected = [hf_greedy(model, p, STEPS) for p in PROMPTS]
    assert len({t for seq in expected for t in seq}) > 8  # not a degenerate model
    order = list(graph.order)
    for cut in (None, [order[:3], order[3:]]):
        got = Generator(LocalPipeline(graph, cut), max_seqs=3).run(
            [Request(p, STEPS) for p in PROMPTS])
        assert got == expected
    assert ("tie" in graph.node("lm_head")["args"]) == \
        kwargs.get("tie_word_embeddings", factory == "hf_gpt2")


def test_the_rewrite_reads_the_captured_graphs_checkpoint(tmp_path):
    model = zoo.hf_gpt2(**GPT2)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(3)  # not what any seed gives
    save_model(model, str(tmp_path / "gpt2.safetensors"))
    spec = source_spec(tmp_path, "hf_gpt2", GPT2, weights={"checkpoint": "gpt2.safetensors"})
    out = tmp_path / "out"
    out.mkdir()
    graph = rewritten(out, spec)
    assert graph.spec.weights.checkpoint == str(out / "hf_gpt2-tiny.safetensors")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(G.build_reference(graph)({"input_ids": ids})["lm_head"],
                                   model(input_ids=ids).logits)


@pytest.mark.parametrize("factory,kwargs,why", [
    ("hf_bert", {}, "captured BertModel; .*GPT2LMHeadModel, LlamaForCausalLM"),
    ("hf_gpt2", {"scale_attn_by_inverse_layer_idx": True},
     "GPT2LMHeadModel .*scale_attn_by_inverse_layer_idx=True"),
    ("hf_gpt2", {"activation_function": "quick_gelu"}, "activation_function='quick_gelu'"),
    ("hf_llama", {"attention_bias": True}, "attention_bias=True"),
    ("hf_llama", {"mlp_bias": True}, "mlp_bias=True"),
    ("hf_llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                      "rope_theta": 10000.0}}, "rope_type='linear'"),
    ("hf_llama", {"head_dim": 32}, "head_dim=32")])
def test_what_the_op_library_does_not_compute_is_refused_by_name(tmp_path, factory, kwargs,
                                                                   why):
    spec = source_spec(tmp_path, factory, kwargs)
    with pytest.raises(GenerationError, match=why):
        rewritten(tmp_path, spec)
    assert not list(tmp_path.glob("*.safetensors"))  # refused before any weight was written


def test_a_model_whose_modules_are_not_its_configs_is_refused_by_the_probe(tmp_path):
    spec = source_spec(tmp_path, "lms:relu_gpt2", GPT2)
    with pytest.raises(GenerationError, match="does not compute what the factory's model does"):
        rewritten(tmp_path, spec)


def test_a_captured_graph_itself_cannot_generate_and_is_told_of_the_rewrite():
    graph = G.capture(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)),
                      {"input": torch.zeros(2, 3, dtype=torch.int64)})
    with pytest.raises(GenerationError, match="captured from a torch model.*rewritten"):
        check_generative(graph)


def test_inputs_other_than_token_ids_and_specs_without_a_source_are_refused(tmp_path):
    spec = source_spec(tmp_path, "hf_gpt2", GPT2, inputs={
        "inputs_embeds": {"shape": ["batch", "seq", 64], "dtype": "float32"}})
    with pytest.raises(GenerationError, match="takes inputs_embeds; .*input_ids"):
        rewritten(tmp_path, spec)
    plain = G.load_spec(str(ROOT / "graphs/gpt2.yaml"))
    with pytest.raises(GenerationError, match="not captured from a torch model"):
        rewrite(plain, tmp_path)



def test_a_generating_service_keeps_the_rewrite_until_it_stops(tmp_path):
    from fastserve.service import Service, ServiceConfig
    from fastserve.service.config import Generation

    spec = source_spec(tmp_path, "hf_llama", LLAMA)
    svc = Service(ServiceConfig(spec=spec, trust_code=True,
                                generation=Generation(enabled=True, max_seqs=2)))
    weights = svc.graph.spec.weights.checkpoint
    assert svc.graph.node("layers.0")["op"] == "llama_block" and Path(weights).is_file()
    svc.stop(drain=False)  # never started: no rank ran, the files go all the same
    assert not Path(weights).parent.exists()
    # a plan file describes the captured graph, never its rewrite: refused by name
    with pytest.raises(GenerationError, match="plan 'p.json' was made for the captured graph"):
        Service(ServiceConfig(spec=spec, plan="p.json", trust_code=True,
                              generation=Generation(enabled=True, max_seqs=2)))
