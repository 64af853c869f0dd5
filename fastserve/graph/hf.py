"""A captured Hugging Face causal LM rewritten with the op library, so that it can generate.

A graph captured from a torch model (``source:``) holds ATen programs: its attention is one
fused call over the whole sequence, with no step that reads and extends a KV cache. The op
library's ``transformer_block`` and ``llama_block`` have that step. For the two families the
op library implements, GPT-2 (``GPT2LMHeadModel``) and Llama (``LlamaForCausalLM``), this
module reads the model's config, writes the same architecture as an op-library spec, and maps
the model's tensors to the spec's names (GPT-2's ``Conv1D`` weights are stored transposed).
The graph keeps its name, input, dims and weights (seeded per module as the captured graph's
are, or read from its checkpoint).

A config the op library does not compute the same way (a scaled or reordered attention, rotary
scaling, biases Llama does not have, another activation) is refused by name before any weight
is made, never approximated. The rewrite builds the whole model once in this process (the
driver), writes the op-library weights to a safetensors file, runs the rewrite and the model
side by side on a short probe (a factory may have changed a module after the build, which no
config shows) and frees the model; ranks then read only their nodes' tensors of that file, as
for any spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fastserve.graph.capture_weights import aliases
from fastserve.graph.decode import GenerationError, max_positions
from fastserve.graph.memory import available_memory
from fastserve.graph.spec import GraphSpec
from fastserve.units import format_bytes

# transformers' activation names -> the op library's (GPT-2's "gelu_new" is the tanh form)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu", "silu": "silu"}


@dataclass
class _Layout:
    """An op-library architecture equal to a model's: its nodes, and the model's tensor name
    for each of the spec's (``transposed``: stored as ``Conv1D``, (in, out))."""

    nodes: list[dict[str, Any]]
    names: dict[str, str] = field(default_factory=dict)  # theirs -> ours
    transposed: set[str] = field(default_factory=set)


def rewrite(spec: GraphSpec, directory: str | Path) -> GraphSpec:
    """The op-library spec of ``spec``, a captured GPT-2 or Llama causal LM, its weights written
    to a safetensors file in ``directory`` (which must outlive the ranks that read it).
    :class:`GenerationError` for any other model or a config the op library does not
    compute."""
    from fastserve.graph.capture import live_model
    from fastserve.graph.loader import spec_from_dict

    if spec.source is None:
        raise GenerationError(f"graph '{spec.name}' was not captured from a torch model")
    examples = spec.source.example_inputs
    if "input_ids" not in examples or set(examples) - {"input_ids", "attention_mask"}:
        raise GenerationError(f"graph '{spec.name}' takes {', '.join(examples) or 'nothing'}; "
                              f"a language model to generate with takes token ids "
                              f"('input_ids', and an 'attention_mask' it does not need)")
    layouts: list[_Layout] = []

    def layout(model: nn.Module) -> None:  # from the config, before any weight is made
        kind = type(model).__name__
        if kind not in _FAMILIES:
            raise GenerationError(
                f"graph '{spec.name}' is a captured {kind}; generation runs the op library's "
                f"transformer layers, and captured models of the families "
                f"{', '.join(sorted(_FAMILIES))} are rewritten with them; write other models' "
                f"layers with the op library (see graphs/gpt2.yaml, graphs/llama.yaml)")
        _fits(spec.name, model)
        family, embedding = _FAMILIES[kind]
        layouts.append(family(model.config, _tied(aliases(model), embedding, kind)))

    model = live_model(spec, accept=layout)
    tensors = _tensors(layouts[0], model.state_dict(), aliases(model), type(model).__name__)
    path = Path(directory).resolve() / f"{spec.name}.safetensors"
    save_file(tensors, str(path))
    del tensors
    nodes = layouts[0].nodes
    doc = {"name": spec.name, "dims": dict(spec.dims),
           "inputs": {"input_ids": {"shape": list(examples["input_ids"]["shape"]),
                                    "dtype": "int64",
                                    "high": nodes[0]["args"]["num_embeddings"]}},
           "weights": {"checkpoint": str(path)}, "nodes": nodes, "outputs": ["lm_head"]}
    rewritten = spec_from_dict(doc)
    _probe(spec.name, model, rewritten)
    return rewritten


def _fits(name: str, model: nn.Module) -> None:
    """Refuse, before any weight is made, a model the driver cannot hold twice (the model and
    its rewrite, run side by side on a probe)."""
    need = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = available_memory()
    if free is not None and need > free:
        raise GenerationError(f"rewriting graph '{name}' for generation holds the model twice "
                              f"in this process, {format_bytes(need)}, more than the "
                              f"{format_bytes(free)} available")


def _probe(name: str, model: nn.Module, rewritten: GraphSpec) -> None:
    """Run the rewrite and the model on a few tokens: a factory may change a module after the
    config was written (another activation, a patched forward), which no config check sees."""
    from fastserve.graph.compiler import compile_graph
    from fastserve.graph.module import build_reference

    graph = compile_graph(rewritten)
    vocab, positions = graph.spec.inputs[0].high, max_positions(graph)
    ids = (torch.arange(min(8, positions or 8)) * 7919 % vocab + 1).clamp(max=vocab - 1)[None]
    with torch.inference_mode():
        ours = build_reference(graph)({"input_ids": ids})["lm_head"].float()
        theirs = model(input_ids=ids).logits.float()
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(ours, theirs, rtol=tol, atol=tol):
        raise GenerationError(f"the op-library rewrite of graph '{name}' does not compute what "
                              f"the factory's model does (logits differ by up to "
                              f"{(ours - theirs).abs().max().item():.3g} on a probe of "
                              f"{ids.shape[1]} tokens): the model's modules are not the ones "
                              f"its config describes, so it cannot be rewritten")


def _tied(names: dict[str, list[str]], embedding: str, kind: str) -> bool:
    """Is the head the token embedding's weight (one tensor under both names)?"""
    shared = [n for n in names.get("lm_head.weight", []) if n != "lm_head.weight"]
    if shared and embedding not in shared:
        raise GenerationError(f"this {kind}'s head shares its weight with {shared[0]}, not the "
                              f"token embedding: the op library ties a head to an embedding "
                              f"only")
    return bool(shared)


def _refuse(kind: str, what: str) -> GenerationError:
    return GenerationError(f"this {kind} cannot generate: its config sets {what}, which the op "
                           f"library's layers do not compute")


def _gpt2(cfg, tied: bool) -> _Layout:
    act = _ACTIVATIONS.get(cfg.activation_function)
    for bad, what in [(act is None, f"activation_function={cfg.activation_function!r}"),
                      (not cfg.scale_attn_weights, "scale_attn_weights=False"),
                      (cfg.scale_attn_by_inverse_layer_idx,
                       "scale_attn_by_inverse_layer_idx=True"),
                      (cfg.reorder_and_upcast_attn, "reorder_and_upcast_attn=True"),
                      (getattr(cfg, "add_cross_attention", False), "add_cross_attention=True")]:
        if bad:
            raise _refuse("GPT2LMHeadModel", what)
    d, layers, eps = cfg.n_embd, cfg.n_layer, float(cfg.layer_norm_epsilon)
    block = {"d_model": d, "n_heads": cfg.n_head, "d_ff": cfg.n_inner or 4 * d,
             "activation": act, "eps": eps}
    out = _Layout([
        _node("wte", "embedding", ["input_ids"], num_embeddings=cfg.vocab_size, embedding_dim=d),
        _node("wpe", "positional_embedding", ["wte"], max_positions=cfg.n_positions,
              embedding_dim=d),
        _repeat("h", "wpe", layers, "transformer_block", block),
        _node("ln_f", "layer_norm", ["h"], dim=d, eps=eps),
        _node("lm_head", "lm_head", ["ln_f"], d_model=d, vocab_size=cfg.vocab_size,
              **({"tie": "wte"} if tied else {}))])
    out.names = {"transformer.wte.weight": "wte.weight", "transformer.wpe.weight": "wpe.weight",
                 "transformer.ln_f.weight": "ln_f.weight", "transformer.ln_f.bias": "ln_f.bias"}
    for i in range(layers):
        for theirs, ours in [("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.c_attn", "attn.qkv"),
                             ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                             ("mlp.c_proj", "mlp.proj")]:
            for p in ("weight", "bias"):
                out.names[f"transformer.h.{i}.{theirs}.{p}"] = f"h.{i}.{ours}.{p}"
            if "." in theirs:  # attention and MLP projections are Conv1D
                out.transposed.add(f"transformer.h.{i}.{theirs}.weight")
    return _head(out, tied)


def _llama(cfg, tied: bool) -> _Layout:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    heads, d = cfg.num_attention_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    for bad, what in [(cfg.hidden_act != "silu", f"hidden_act={cfg.hidden_act!r}"),
                      (getattr(cfg, "attention_bias", False), "attention_bias=True"),
                      (getattr(cfg, "mlp_bias", False), "mlp_bias=True"),
                      (rope.get("rope_type", "default") != "default",
                       f"rope_type={rope.get('rope_type')!r}"),
                      (theta is None, "no rope_theta"),
                      (head_dim * heads != d, f"head_dim={head_dim} (not hidden_size / heads)")]:
        if bad:
            raise _refuse("LlamaForCausalLM", what)
    layers, eps = cfg.num_hidden_layers, float(cfg.rms_norm_eps)
    block = {"d_model": d, "n_heads": heads, "n_kv_heads": cfg.num_key_value_heads or heads,
             "d_ff": cfg.intermediate_size, "eps": eps, "rope_theta": float(theta)}
    out = _Layout([
        _node("embed", "embedding", ["input_ids"], num_embeddings=cfg.vocab_size,
              embedding_dim=d),
        _repeat("layers", "embed", layers, "llama_block", block),
        _node("norm", "rms_norm", ["layers"], dim=d, eps=eps),
        _node("lm_head", "lm_head", ["norm"], d_model=d, vocab_size=cfg.vocab_size,
              **({"tie": "embed"} if tied else {}))])
    out.names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    for i in range(layers):
        for theirs, ours in [("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2"),
                             ("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"),
                             ("self_attn.v_proj", "attn.v"), ("self_attn.o_proj", "attn.o"),
                             ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"),
                             ("mlp.down_proj", "mlp.down")]:
            out.names[f"model.layers.{i}.{theirs}.weight"] = f"layers.{i}.{ours}.weight"
    return _head(out, tied)


def _head(layout: _Layout, tied: bool) -> _Layout:
    if not tied:  # a tied head has no tensor of its own: the spec's 'tie' binds it
        layout.names["lm_head.weight"] = "lm_head.weight"
    return layout


def _node(node_id: str, op: str, inputs: list[str], **args) -> dict[str, Any]:
    return {"id": node_id, "op": op, "args": args, "inputs": inputs}


def _repeat(block_id: str, after: str, times: int, op: str, args: dict) -> dict[str, Any]:
    """``times`` layers in a chain, named ``<block_id>.<i>`` as the model's own layers are."""
    return {"repeat": times, "id": block_id, "input": after,
            "nodes": [_node("block", op, ["$in"], **args)]}


def _tensors(layout: _Layout, state: dict[str, torch.Tensor], names: dict[str, list[str]],
             kind: str) -> dict[str, torch.Tensor]:
    """The op-library tensors from the model's ``state``. Every tensor of the model must be
    used under one of its names: one left over is a part of the model the rewrite would not
    compute."""
    missing = [k for k in layout.names if k not in state]
    if missing:
        raise GenerationError(f"this {kind} has no tensor(s) {', '.join(missing[:3])}: not the "
                              f"layout the rewrite knows")
    used = {n for k in layout.names for n in names.get(k, [k])}
    left = sorted(k for k in set(state) - used if not _derived(k))
    if left:
        raise GenerationError(f"this {kind} has tensor(s) {', '.join(left[:3])} that the "
                              f"op library's layers would not use")
    return {ours: (state[theirs].T if theirs in layout.transposed else state[theirs])
            .detach().contiguous() for theirs, ours in layout.names.items()}


def _derived(name: str) -> bool:
    """A buffer a model computes from its config (rotary frequencies, causal masks): the op
    library's layers compute their own."""
    return name.endswith((".inv_freq", ".attn.bias", ".attn.masked_bias"))


# the families rewritten: how, and the name of the token embedding a tied head shares
_FAMILIES = {"GPT2LMHeadModel": (_gpt2, "transformer.wte.weight"),
             "LlamaForCausalLM": (_llama, "model.embed_tokens.weight")}
