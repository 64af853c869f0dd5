"""Declare a graph in Python instead of YAML: a small residual MLP with a branch and a join.

    .venv/bin/python examples/02_python_builder.py
"""

from __future__ import annotations

import fastserve as fs
from fastserve.graph.builder import GraphBuilder

b = GraphBuilder("residual_mlp", params={"d": 32})
b.input("x", ["batch", "$d"])
with b.repeat("block", 3, input="x", output="sum") as r:
    r.node("fc", "linear", ["$in"], in_features="$d", out_features="$d")
    r.node("act", "silu", ["fc"])
    r.node("sum", "add", ["act", "$in"])           # residual: a skip around fc/act
b.node("left", "linear", ["block"], in_features="$d", out_features=4)
b.node("right", "linear", ["block"], in_features="$d", out_features=4)
b.node("join", "mul", ["left", "right"])
b.output("join")

graph = b.compile()
print(f"{graph.name}: nodes {list(graph.order)}")
print(f"edges into 'join': {sorted(graph.nx.predecessors('join'))}")
out = fs.reference(graph, fs.random_inputs(graph, batch=5))
print(f"join: {tuple(out['join'].shape)}")
