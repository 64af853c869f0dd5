"""The reference run, checked against a hand-written torch model with the same weights; costs
checked against analytic counts; checkpoints and subset builds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import fastserve.graph as G
from fastserve.errors import WeightsError
from fastserve.graph.builder import GraphBuilder
from fastserve.graph.module import build_nodes, state_dict

ROOT = Path(__file__).resolve().parents[2]
GPT2 = ROOT / "graphs" / "gpt2.yaml"


# --- a plain torch GPT-2, written independently of the op library -----------------------------


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, self.h, d // self.h).permute(0, 2, 1, 3) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = scores.softmax(-1) @ v
        return self.c_proj(y.permute(0, 2, 1, 3).reshape(b, s, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class HandGPT2(nn.Module):
    def __init__(self, vocab: int, positions: int, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(positions, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head


def load_from_graph(model: HandGPT2, graph: G.Graph) -> None:
    """Copy the graph's seeded weights into the hand-written model, by name."""
    sd = state_dict(build_nodes(graph))
    mapping = {"wte.weight": "wte.weight", "wpe": "wpe.weight", "ln_f.weight": "ln_f.weight",
               "ln_f.bias": "ln_f.bias"}
    for i in range(len(model.blocks)):
        for ours, theirs in [("ln_1", "ln1"), ("ln_2", "ln2"), ("c_attn", "attn.qkv"),
                             ("c_proj", "attn.proj"), ("c_fc", "mlp.fc"),
                             ("mlp_proj", "mlp.proj")]:
            for p in ("weight", "bias"):
                mapping[f"blocks.{i}.{ours}.{p}"] = f"h.{i}.{theirs}.{p}"
    own = dict(model.named_parameters())
    assert set(own) == set(mapping), set(own) ^ set(mapping)
    with torch.no_grad():
        for ours, theirs in mapping.items():
            own[ours].copy_(sd[theirs])


def small_gpt2(layers: int = 2) -> G.Graph:
    """graphs/gpt2.yaml with smaller params: same spec, reduced sizes."""
    import yaml

    doc = yaml.safe_load(GPT2.read_text())
    doc["params"].update(vocab=500, positions=64, d_model=64, n_heads=4, n_layers=layers)
    doc["dims"] = {"seq": 16}
    return G.compile_graph(G.spec_from_dict(doc))


@pytest.mark.parametrize("batch,seq", [(2, 16), (3, 7)])
def test_yaml_gpt2_equals_hand_written_torch(batch, seq):
    graph = small_gpt2()
    model = HandGPT2(500, 64, 64, 4, 2).eval()
    load_from_graph(model, graph)
    ids = torch.randint(0, 500, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
    got = G.reference(graph, {"ids": ids})["lm_head"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gpt2_small_parameter_count_equals_torch_model():
    graph = G.load(str(GPT2))
    with torch.device("meta"):
        model = HandGPT2(50257, 1024, 768, 12, 12)
    n = sum(p.numel() for p in model.parameters())
    assert graph.params == n == 124_439_808


def test_linear_and_attention_flops_equal_the_analytic_count():
    s, d = 32, 64
    b = GraphBuilder("flops", dims={"seq": s})
    b.input("x", ["batch", "seq", d])
    b.node("lin", "linear", ["x"], in_features=d, out_features=3 * d)
    b.node("att", "attention", ["x"], d_model=d, n_heads=4)
    b.node("blk", "transformer_block", ["x"], d_model=d, n_heads=4)
    b.output("lin", "att", "blk")
    g = b.compile()
    linear = 2 * s * d * 3 * d
    # qkv and output projections, plus QK^T and AV (full s x s: the causal mask is applied to
    # a dense score matrix, which is what torch's counter and the kernels compute)
    attention = 2 * s * d * 3 * d + 2 * s * d * d + 2 * (2 * s * s * d)
    block = attention + 2 * (2 * s * d * 4 * d)
    # torch's counter counts matmuls only (no biases, norms, softmax or GELU): exact figures
    for node, analytic in [("lin", linear), ("att", attention), ("blk", block)]:
        assert g.node(node)["flops"] == analytic, node


def test_seeded_weights_are_per_node_and_subsets_build_identically():
    graph = small_gpt2()
    full = state_dict(build_nodes(graph))
    part = state_dict(build_nodes(graph, ["h.1"]))
    assert part and all(torch.equal(full[k], v) for k, v in part.items())
    other_seed = state_dict(build_nodes(graph, ["h.1"], G.WeightsSpec(seed=1)))
    assert not torch.equal(other_seed["h.1.attn.qkv.weight"], full["h.1.attn.qkv.weight"])


def test_subgraph_of_one_layer_matches_the_reference_intermediate():
    graph = small_gpt2()
    ids = torch.randint(0, 500, (2, 16))
    everything = G.build_subgraph(graph, graph.order, ["ids"], ["wpe", "h.0"])
    with torch.no_grad():
        mids = everything({"ids": ids})
        alone = G.build_subgraph(graph, ["h.0"], ["wpe"], ["h.0"])({"wpe": mids["wpe"]})
        # the layer's module as built for the whole graph, called directly on the same input
        direct = build_nodes(graph)["h.0"](mids["wpe"])
    torch.testing.assert_close(alone["h.0"], mids["h.0"], rtol=0, atol=0)
    torch.testing.assert_close(alone["h.0"], direct, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoint_weights_replace_the_seeded_ones(tmp_path, fmt):
    graph = small_gpt2()
    weights = {k: torch.randn_like(v) for k, v in state_dict(build_nodes(graph)).items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(weights, str(path))
    else:
        torch.save(weights, str(path))
    spec = G.WeightsSpec(seed=0, checkpoint=str(path))
    loaded = state_dict(build_nodes(graph, None, spec))
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    ids = torch.randint(0, 500, (1, 8))
    a = G.reference(graph, {"ids": ids}, spec)["lm_head"]
    b = G.reference(graph, {"ids": ids})["lm_head"]
    assert not torch.allclose(a, b)


def test_checkpoint_missing_tensor_is_named(tmp_path):
    graph = small_gpt2()
    weights = state_dict(build_nodes(graph))
    del weights["h.1.mlp.fc.bias"]
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    with pytest.raises(WeightsError, match="h.1.mlp.fc.bias"):
        build_nodes(graph, None, G.WeightsSpec(checkpoint=str(path)))


def test_builder_and_yaml_give_the_same_graph():
    yaml_graph = G.load(str(ROOT / "graphs" / "mlp.yaml"))
    b = GraphBuilder("mlp", params={"d_in": 64, "hidden": 256, "depth": 6, "classes": 10})
    b.input("x", ["batch", "$d_in"])
    b.node("fc_in", "linear", ["x"], in_features="$d_in", out_features="$hidden")
    with b.repeat("layer", "$depth", input="fc_in") as r:
        r.node("fc", "linear", ["$in"], in_features="$hidden", out_features="$hidden")
        r.node("act", "gelu", ["fc"])
    b.node("head", "linear", ["layer"], in_features="$hidden", out_features="$classes")
    b.output("head")
    built = b.compile()
    assert built.to_json() == yaml_graph.to_json()
    x = G.random_inputs(built, 3)
    torch.testing.assert_close(G.reference(built, x)["head"], G.reference(yaml_graph, x)["head"],
                               rtol=0, atol=0)
