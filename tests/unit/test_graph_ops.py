"""Every op of the library compiles, verifies and runs; every shipped graph compiles."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastserve.graph as G
from fastserve.graph.builder import GraphBuilder
from fastserve.graph.ops import OPS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))  # for user_modules

# op -> (input shapes, dtype, args, expected output shape at batch 2)
SEQ = (2, 5, 8)
IMG = (2, 3, 8, 8)
CASES = {
    "embedding": ([(2, 5)], "int64", {"num_embeddings": 11, "embedding_dim": 8}, (2, 5, 8)),
    "positional_embedding": ([SEQ], "float32", {"max_positions": 16, "embedding_dim": 8}, SEQ),
    "linear": ([SEQ], "float32", {"in_features": 8, "out_features": 3}, (2, 5, 3)),
    "layer_norm": ([SEQ], "float32", {"dim": 8}, SEQ),
    "rms_norm": ([SEQ], "float32", {"dim": 8}, SEQ),
    "gelu": ([SEQ], "float32", {}, SEQ),
    "relu": ([SEQ], "float32", {}, SEQ),
    "silu": ([SEQ], "float32", {}, SEQ),
    "softmax": ([SEQ], "float32", {"dim": -1}, SEQ),
    "dropout": ([SEQ], "float32", {"p": 0.5}, SEQ),
    "identity": ([SEQ], "float32", {}, SEQ),
    "attention": ([SEQ], "float32", {"d_model": 8, "n_heads": 2}, SEQ),
    "mlp": ([SEQ], "float32", {"d_model": 8, "d_ff": 16}, SEQ),
    "transformer_block": ([SEQ], "float32", {"d_model": 8, "n_heads": 2}, SEQ),
    "llama_block": ([SEQ], "float32", {"d_model": 8, "n_heads": 2, "n_kv_heads": 1}, SEQ),
    "lm_head": ([SEQ], "float32", {"d_model": 8, "vocab_size": 13}, (2, 5, 13)),
    "conv2d": ([IMG], "float32", {"in_channels": 3, "out_channels": 4, "kernel_size": 3,
                                  "padding": 1}, (2, 4, 8, 8)),
    "max_pool2d": ([IMG], "float32", {"kernel_size": 2}, (2, 3, 4, 4)),
    "avg_pool2d": ([IMG], "float32", {"kernel_size": 2}, (2, 3, 4, 4)),
    "upsample": ([IMG], "float32", {"scale_factor": 2}, (2, 3, 16, 16)),
    "add": ([SEQ, SEQ], "float32", {}, SEQ),
    "mul": ([SEQ, SEQ, SEQ], "float32", {}, SEQ),
    "concat": ([SEQ, SEQ], "float32", {"dim": -1}, (2, 5, 16)),
    "split": ([SEQ], "float32", {"dim": -1, "sizes": [3, 5]}, (2, 5, 3)),
    "reshape": ([SEQ], "float32", {"shape": [-1, 4]}, (2, 10, 4)),
    "flatten": ([SEQ], "float32", {}, (2, 40)),
    "module": ([SEQ], "float32", {"target": "user_modules:Scale", "kwargs": {"dim": 8}}, SEQ),
}


def test_every_registered_op_has_a_case():
    assert set(OPS) == set(CASES)


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_compiles_and_runs(op):
    shapes, dtype, args, expected = CASES[op]
    b = GraphBuilder(f"one_{op}")
    names = [b.input(f"x{i}", ["batch", *s[1:]], dtype, high=11) for i, s in enumerate(shapes)]
    if op == "module":
        b.module("n", args["target"], names, **args["kwargs"])
    else:
        b.node("n", op, names, **args)
    b.output("n")
    graph = G.verify(b.compile())
    out = G.reference(graph, G.random_inputs(graph, 2))
    first = out[graph.outputs[0]]
    assert tuple(first.shape) == expected
    assert graph.node("n")["outputs"][0].shape == (1, *expected[1:])  # per sample
    if first.is_floating_point():
        assert torch.isfinite(first).all()


def test_user_module_parameters_are_counted_and_seeded():
    b = GraphBuilder("user")
    b.input("x", ["batch", 8])
    b.module("s", "user_modules:Scale", ["x"], dim=8, factor=3.0)
    b.output("s")
    graph = b.compile()
    assert graph.params == 8
    x = torch.ones(2, 8)
    torch.testing.assert_close(G.reference(graph, {"x": x})["s"], 3 * x)


def test_split_outputs_are_addressable():
    b = GraphBuilder("split")
    b.input("x", ["batch", 6])
    b.node("parts", "split", ["x"], dim=-1, chunks=3)
    b.node("joined", "add", ["parts:0", "parts:2"])
    b.output("joined", "parts:1")
    graph = b.compile()
    x = torch.arange(12.0).reshape(2, 6)
    out = G.reference(graph, {"x": x})
    torch.testing.assert_close(out["joined"], x[:, 0:2] + x[:, 4:6])
    torch.testing.assert_close(out["parts:1"], x[:, 2:4])


SHIPPED = sorted(p.name for p in (ROOT / "graphs").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_graph_compiles_and_verifies(name):
    spec = G.load_spec(str(ROOT / "graphs" / name), trust_code=True)  # gpt2-hf-tiny: the zoo
    graph = G.verify(G.compile_graph(spec))
    assert len(graph) > 0 and graph.params > 0 and graph.flops > 0
    doc = graph.to_json()
    assert doc["totals"]["params"] == graph.params
    assert all(e["bytes"] > 0 for e in doc["edges"])


def test_gpt3_compiles_without_weights():
    graph = G.load(str(ROOT / "graphs" / "gpt3-175b.yaml"))
    assert len(graph) == 96 + 4
    assert 174e9 < graph.params < 176e9  # 175B; the tied head is counted once
    assert graph.node("h.0")["args"]["d_model"] == 12288


def test_unet_has_skip_connections_and_a_join():
    graph = G.load(str(ROOT / "graphs" / "unet.yaml"))
    assert graph.nx.has_edge("enc1_act", "skip1") and graph.nx.has_edge("enc2_act", "skip2")
    assert graph.nx.in_degree("join") == 2 and graph.nx.out_degree("dec1_act") == 2


def test_graph_output_may_name_a_repeat_block():
    b = GraphBuilder("rep_out")
    b.input("x", ["batch", 4])
    with b.repeat("h", 3, input="x") as r:
        r.node("fc", "linear", ["$in"], in_features=4, out_features=4)
    b.output("h")
    graph = b.compile()
    assert graph.outputs == ("h.2",)
