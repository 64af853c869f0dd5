"""A small GPT-2 written with the op library, and the same weights in transformers'
``GPT2LMHeadModel``: the independent reference that generation is checked against."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

import fastserve.graph as G
from fastserve.graph.module import build_nodes, state_dict

ROOT = Path(__file__).resolve().parents[1]
VOCAB, POSITIONS, D, HEADS = 500, 64, 64, 4


def small_gpt2(tmp_path: Path, layers: int = 3) -> tuple[str, dict[str, torch.Tensor]]:
    """graphs/gpt2.yaml at a small size, with weights in a checkpoint: the seeded ones, the
    blocks' matrices and the positions scaled up so that greedy decoding does not collapse
    into repeating one token (random GPT-2 weights at std 0.02 do). The spec path, and the
    weights by the graph's names."""
    doc = yaml.safe_load((ROOT / "graphs/gpt2.yaml").read_text())
    doc["params"].update(vocab=VOCAB, positions=POSITIONS, d_model=D, n_heads=HEADS,
                         n_layers=layers)
    seeded = state_dict(build_nodes(G.compile_graph(G.spec_from_dict(doc))))
    weights = {k: (v * (12 if k.startswith("wpe") else
                        4 if k.startswith("h.") and v.dim() == 2 else 1)).contiguous()
               for k, v in seeded.items()}
    save_file(weights, str(tmp_path / "gpt2-small.safetensors"))
    doc["weights"] = {"checkpoint": "gpt2-small.safetensors"}
    spec = tmp_path / "gpt2-small.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return str(spec), weights


def hf_gpt2(weights: dict[str, torch.Tensor], layers: int = 3):
    """transformers' GPT-2 with the graph's weights (its Conv1D weights are transposed
    linears; exact GELU as the op library's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=layers,
                     n_head=HEADS, activation_function="gelu", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    names = {"transformer.wte.weight": "wte.weight", "transformer.wpe.weight": "wpe.weight",
             "transformer.ln_f.weight": "ln_f.weight", "transformer.ln_f.bias": "ln_f.bias"}
    conv1d = set()
    for i in range(layers):
        for theirs, ours in [("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.c_attn", "attn.qkv"),
                             ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                             ("mlp.c_proj", "mlp.proj")]:
            for p in ("weight", "bias"):
                names[f"transformer.h.{i}.{theirs}.{p}"] = f"h.{i}.{ours}.{p}"
            if theirs.startswith(("attn", "mlp")):
                conv1d.add(f"transformer.h.{i}.{theirs}.weight")
    own = model.state_dict()
    with torch.no_grad():
        for theirs, ours in names.items():
            own[theirs].copy_(weights[ours].T if theirs in conv1d else weights[ours])
    return model


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(lengths=(5, 11, 3, 8), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def small_llama(tmp_path: Path, layers: int = 3) -> tuple[str, dict[str, torch.Tensor]]:
    """graphs/llama.yaml at a small size (grouped-query attention kept: 4 query heads, 2
    key/value heads), its seeded weights in a checkpoint."""
    doc = yaml.safe_load((ROOT / "graphs/llama.yaml").read_text())
    doc["params"].update(vocab=VOCAB, d_model=D, n_heads=HEADS, n_kv_heads=HEADS // 2,
                         d_ff=96, n_layers=layers)
    weights = state_dict(build_nodes(G.compile_graph(G.spec_from_dict(doc))))
    save_file(weights, str(tmp_path / "llama-small.safetensors"))
    doc["weights"] = {"checkpoint": "llama-small.safetensors"}
    spec = tmp_path / "llama-small.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return str(spec), weights


def hf_llama(weights: dict[str, torch.Tensor], layers: int = 3):
    """transformers' Llama with the graph's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS // 2, max_position_embeddings=POSITIONS,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(layers):
        for theirs, ours in [("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2"),
                             ("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"),
                             ("self_attn.v_proj", "attn.v"), ("self_attn.o_proj", "attn.o"),
                             ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"),
                             ("mlp.down_proj", "mlp.down")]:
            names[f"model.layers.{i}.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
    own = model.state_dict()
    assert set(names) == set(own), set(names) ^ set(own)
    with torch.no_grad():
        for theirs, ours in names.items():
            own[theirs].copy_(weights[ours])
    return model


def relu_gpt2(**kwargs):
    """A factory whose GPT-2 is not what its config says: ReLU put in after the build (the
    rewrite must notice from the logits, since no config field or tensor changed)."""
    from torch import nn

    from fastserve.graph.zoo import hf_gpt2 as zoo_gpt2

    model = zoo_gpt2(**kwargs)
    for block in model.transformer.h:
        block.mlp.act = nn.ReLU()
    return model
