"""Shard records: a shard as plain data a rank can build alone, without the spec or the graph.

The driver holds the graph. For each rank it writes the records of that rank's nodes (op,
arguments, the tensors each reads and writes), where the weights come from (the seed, or a
checkpoint path from which only these nodes' tensors are read) and the cut tensors in and out.
The rank checks the record field by field, builds exactly those nodes and nothing else: it never
reads the spec file nor compiles the whole graph, so it can run on any host.

A record names code only through ``op: module`` nodes, and those are built only when the rank
was told the user trusts the spec's code (the same :func:`fastserve.trust.check_code` rule the
loader applies).

Graphs captured from a torch model are not described by node records (their nodes are pieces
of a traced program); their ranks still build from the spec file (see ``spec_record``).
"""

from __future__ import annotations

from typing import Any

import torch

from fastserve.errors import SpecError
from fastserve.graph.graph import Graph
from fastserve.graph.checkpoint import resolve_path
from fastserve.graph.module import SubgraphModule, load_checkpoint, node_seed
from fastserve.graph.ops import LMHead, build_module, get_op

VERSION = 1
MAX_NODES = 1_000_000


def shard_record(graph: Graph, nodes: list[str], inputs: list[str], outputs: list[str]) -> dict:
    """The record of the shard of ``graph`` made of ``nodes`` (in graph order)."""
    spec = graph.spec
    if spec.source is not None:
        raise SpecError(f"graph '{graph.name}' was captured from a torch model: its shards are "
                        f"built from the spec file, not from node records")
    wanted = set(nodes)
    steps = [_node(graph, n) for n in graph.order if n in wanted]
    tied = {}
    for n in nodes:
        tie = graph.node(n)["args"].get("tie") if graph.node(n)["op"] == "lm_head" else None
        if tie is not None and tie not in wanted:
            tied[tie] = {"op": graph.node(tie)["op"], "args": graph.node(tie)["args"]}
    checkpoint = spec.weights.checkpoint
    return {"version": VERSION, "kind": "nodes", "graph": graph.name, "nodes": steps,
            "tied": tied, "inputs": list(inputs), "outputs": list(outputs),
            "weights": {"seed": spec.weights.seed, "checkpoint": None if checkpoint is None
                        else str(resolve_path(checkpoint, spec.file).resolve())}}


def _node(graph: Graph, n: str) -> dict:
    d = graph.node(n)
    return {"id": n, "op": d["op"], "args": d["args"], "inputs": list(d["inputs"]),
            "outputs": [t.name for t in d["outputs"]]}


def build_from_record(record: Any, *, trust_code: bool = False) -> SubgraphModule:
    """Build the shard a record describes (checked first), weights included, in eval mode."""
    rec = check_record(record)
    from fastserve.trust import check_code

    for step in [*rec["nodes"], *rec["tied"].values()]:
        if step["op"] == "module":  # the user's own nn.Module class: code, run only if trusted
            check_code(str(step["args"].get("target")), trust_code=trust_code,
                       key=f"node '{step.get('id', '?')}'.module")
    seed = rec["weights"]["seed"]
    modules = {s["id"]: _seeded(s["id"], s["op"], s["args"], seed) for s in rec["nodes"]}
    checkpoint = rec["weights"]["checkpoint"]
    if checkpoint:
        load_checkpoint(modules, checkpoint)
    extra = {t: _seeded(t, d["op"], d["args"], seed) for t, d in rec["tied"].items()}
    if checkpoint and extra:
        load_checkpoint(extra, checkpoint)
    for m in modules.values():  # a tied head shares its embedding's weight, here or private
        if isinstance(m, LMHead) and m.tie is not None:
            src = modules.get(m.tie) or extra.get(m.tie)
            if src is None:
                raise SpecError(f"shard record: head ties to node '{m.tie}', which the record "
                                f"neither holds nor lists under 'tied'", key="tied")
            m.weight = src.weight
    for m in modules.values():
        m.eval()
    steps = [(s["id"], s["inputs"], s["outputs"]) for s in rec["nodes"]]
    return SubgraphModule.from_steps(rec["graph"], steps, modules, rec["inputs"],
                                     rec["outputs"])


def _seeded(node_id: str, op: str, args: dict, seed: int) -> torch.nn.Module:
    # the same seed per node as fastserve.graph.module, so weights equal the reference's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(node_seed(seed, node_id))
        return build_module(op, args)


def check_record(doc: Any) -> dict:
    """``doc`` if it is a well-formed node record; :class:`SpecError` naming the field if not."""
    def fail(key: str, what: str):
        raise SpecError(f"shard record: {what}", key=key)

    if not isinstance(doc, dict):
        fail("(record)", f"expected a map, got {type(doc).__name__}")
    if doc.get("version") != VERSION or doc.get("kind") != "nodes":
        fail("version", f"expected version {VERSION} of kind 'nodes'")
    if not isinstance(doc.get("graph"), str):
        fail("graph", "expected the graph's name")
    for key in ("inputs", "outputs"):
        names = doc.get(key)
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            fail(key, "expected a list of tensor names")
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
        fail("nodes", f"expected a list of 1 to {MAX_NODES} node records")
    seen: set[str] = set()
    for i, step in enumerate(nodes):
        _check_step(step, f"nodes[{i}]", fail, with_tensors=True)
        if step["id"] in seen:
            fail(f"nodes[{i}].id", f"node '{step['id']}' appears twice")
        seen.add(step["id"])
    tied = doc.get("tied")
    if not isinstance(tied, dict):
        fail("tied", "expected a map of node id to {op, args}")
    for t, step in tied.items():
        _check_step({"id": t, **step} if isinstance(step, dict) else step, f"tied.{t}", fail,
                    with_tensors=False)
    weights = doc.get("weights")
    if not isinstance(weights, dict) or type(weights.get("seed")) is not int or \
            not isinstance(weights.get("checkpoint"), (str, type(None))):
        fail("weights", "expected {seed: int, checkpoint: path or null}")
    return doc


def _check_step(step: Any, key: str, fail, with_tensors: bool) -> None:
    if not isinstance(step, dict):
        fail(key, "expected a map")
    if not isinstance(step.get("id"), str) or not step["id"]:
        fail(f"{key}.id", "expected a node id")
    op = step.get("op")
    if not isinstance(op, str):
        fail(f"{key}.op", "expected an op name")
    try:
        get_op(op)
    except SpecError:
        fail(f"{key}.op", f"unknown op {op!r}")
    if not isinstance(step.get("args"), dict):
        fail(f"{key}.args", "expected a map of arguments")
    if with_tensors:
        for part in ("inputs", "outputs"):
            names = step.get(part)
            if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
                fail(f"{key}.{part}", "expected a list of tensor names")

