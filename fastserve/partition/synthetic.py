"""Synthetic graphs with irregular costs, for benchmarks and partition tests.

They are real graph specs (built with :func:`fastserve.graph.spec_from_dict` and compiled on the
meta device like any YAML spec), so every graph here can also be built and run. Widths are drawn
from a small palette so that a long chain compiles fast (the compiler costs identical nodes once)
while node costs still vary.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from fastserve.graph.compiler import compile_graph
from fastserve.graph.graph import Graph
from fastserve.graph.loader import spec_from_dict

PALETTE = (8, 16, 24, 32, 48, 64)


def chain_spec(nodes: int, seed: int = 0, widths: Sequence[int] = PALETTE,
               layer_size: int = 10) -> dict[str, Any]:
    """A chain of ``nodes`` linear nodes of random widths: a ``repeat`` block of layers of
    ``layer_size`` nodes (so the ``layer`` strategy has layers), then an ``identity`` output
    node. ``nodes`` counts every node (layers plus the output)."""
    rng = random.Random(seed)
    body_size = max(1, min(layer_size, nodes - 1))
    layers = max(1, (nodes - 1) // body_size)
    first = width = rng.choice(widths)
    body = []
    ref = "$in"
    for i in range(body_size):
        nxt = first if i == body_size - 1 else rng.choice(widths)  # layers chain end to start
        body.append({"id": f"fc{i}", "op": "linear", "inputs": [ref],
                     "args": {"in_features": width, "out_features": nxt}})
        ref, width = f"fc{i}", nxt
    doc_nodes: list[dict[str, Any]] = [
        {"repeat": layers, "id": "layer", "input": "x", "nodes": body}]
    extra = nodes - 1 - layers * body_size  # odd remainders: plain nodes after the repeat
    prev = "layer"
    for i in range(extra):
        doc_nodes.append({"id": f"tail{i}", "op": "linear", "inputs": [prev],
                          "args": {"in_features": first, "out_features": first}})
        prev = f"tail{i}"
    doc_nodes.append({"id": "out", "op": "identity", "inputs": [prev]})
    return {"name": f"chain{nodes}", "inputs": {"x": {"shape": ["batch", first]}},
            "weights": {"seed": seed}, "nodes": doc_nodes, "outputs": ["out"]}


def chain(nodes: int, seed: int = 0, widths: Sequence[int] = PALETTE,
          layer_size: int = 10) -> Graph:
    """:func:`chain_spec`, compiled."""
    return compile_graph(spec_from_dict(chain_spec(nodes, seed, widths, layer_size)))


def dag_spec(nodes: int, seed: int = 0, skip: float = 0.4,
             widths: Sequence[int] = (4, 8, 16)) -> dict[str, Any]:
    """A random DAG of ``nodes`` nodes with skip connections: each node is a ``linear`` of the
    latest tensor, or joins the latest tensor with an earlier one (``add`` when widths agree,
    else ``concat``) with probability ``skip``. Graph outputs: the last node and, sometimes, an
    early tensor (an output produced early must travel to the end of the pipeline)."""
    rng = random.Random(seed)
    width0 = rng.choice(widths)
    made: list[tuple[str, int]] = [("x", width0)]
    out_nodes = []
    for i in range(nodes):
        name, width = made[-1]
        node_id = f"n{i}"
        if len(made) > 2 and rng.random() < skip:
            other, w2 = rng.choice(made[:-2])
            if w2 == width:
                out_nodes.append({"id": node_id, "op": "add", "inputs": [name, other]})
            else:
                out_nodes.append({"id": node_id, "op": "concat", "inputs": [name, other]})
                width = width + w2
        else:
            nxt = rng.choice(widths)
            out_nodes.append({"id": node_id, "op": "linear", "inputs": [name],
                              "args": {"in_features": width, "out_features": nxt}})
            width = nxt
        made.append((node_id, width))
    outputs = [made[-1][0]]
    if nodes > 3 and rng.random() < 0.5:
        outputs.append(made[rng.randrange(1, nodes - 1)][0])
    return {"name": f"dag{nodes}", "inputs": {"x": {"shape": ["batch", width0]}},
            "weights": {"seed": seed}, "nodes": out_nodes, "outputs": outputs}


def dag(nodes: int, seed: int = 0, skip: float = 0.4) -> Graph:
    """:func:`dag_spec`, compiled."""
    return compile_graph(spec_from_dict(dag_spec(nodes, seed, skip)))


def tied_lm_spec(layers: int, seed: int = 0, vocab: int = 64, width: int = 16) -> dict[str, Any]:
    """A tiny language model whose ``lm_head`` borrows the token embedding's weight (tie)."""
    rng = random.Random(seed)
    nodes: list[dict[str, Any]] = [
        {"id": "wte", "op": "embedding", "inputs": ["ids"],
         "args": {"num_embeddings": vocab, "embedding_dim": width}}]
    ref = "wte"
    for i in range(layers):
        hidden = rng.choice((8, 16, 32, 64))
        nodes.append({"id": f"up{i}", "op": "linear", "inputs": [ref],
                      "args": {"in_features": width, "out_features": hidden}})
        nodes.append({"id": f"down{i}", "op": "linear", "inputs": [f"up{i}"],
                      "args": {"in_features": hidden, "out_features": width}})
        ref = f"down{i}"
    nodes.append({"id": "lm_head", "op": "lm_head", "inputs": [ref],
                  "args": {"d_model": width, "vocab_size": vocab, "tie": "wte"}})
    return {"name": "tied", "dims": {"seq": 4},
            "inputs": {"ids": {"shape": ["batch", "seq"], "dtype": "int64", "high": vocab}},
            "weights": {"seed": seed}, "nodes": nodes, "outputs": ["lm_head"]}


def tied_lm(layers: int, seed: int = 0, vocab: int = 64, width: int = 16) -> Graph:
    """:func:`tied_lm_spec`, compiled."""
    return compile_graph(spec_from_dict(tied_lm_spec(layers, seed, vocab, width)))
