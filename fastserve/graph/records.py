"""Shard records: a shard as plain data a rank can build alone, without the spec or the graph.

The driver holds the graph. For each rank it writes the records of that rank's nodes and where
the weights come from (the seed, or a checkpoint path from which only these nodes' tensors are
read) and the cut tensors in and out. The rank checks the record field by field and builds
exactly those nodes and nothing else: it never reads the spec file nor compiles the whole graph,
so it can run on any host. Two kinds:

* ``nodes``: a graph of the op library; each node's op, arguments and tensors.
* ``captured``: a graph captured from a torch model; the factory and its arguments, the example
  inputs' declarations, the dims, and each node's id and tensors. The rank captures the model
  without weights (its nodes are pieces of a traced program, which is not shipped as code) and
  materialises only its own nodes' tensors (:func:`fastserve.graph.capture.build_parts`).

A record names code only through ``op: module`` nodes and a captured model's factory, and those
are built only when the rank was told the user trusts the spec's code (the same
:func:`fastserve.trust.check_code` rule the loader applies).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fastserve.errors import SpecError
from fastserve.graph.graph import Graph
from fastserve.graph.checkpoint import resolve_path
from fastserve.graph.module import SubgraphModule, load_checkpoint, node_seed
from fastserve.graph.dtypes import DTYPES
from fastserve.graph.ops import LMHead, build_module, get_op
from fastserve.graph.spec import SourceSpec, WeightsSpec

VERSION = 1
MAX_NODES = 1_000_000


def shard_record(graph: Graph, nodes: list[str], inputs: list[str], outputs: list[str]) -> dict:
    """The record of the shard of ``graph`` made of ``nodes`` (in graph order)."""
    spec = graph.spec
    checkpoint = spec.weights.checkpoint
    weights = {"seed": spec.weights.seed, "checkpoint": None if checkpoint is None
               else str(resolve_path(checkpoint, spec.file).resolve())}
    wanted = set(nodes)
    if spec.source is not None:
        return {"version": VERSION, "kind": "captured", "graph": graph.name,
                "nodes": [{"id": n, "inputs": list(graph.node(n)["inputs"]),
                           "outputs": [t.name for t in graph.node(n)["outputs"]],
                           "program": graph.node(n).get("program")}
                          for n in graph.order if n in wanted],
                "count": len(graph), "inputs": list(inputs), "outputs": list(outputs),
                "weights": weights,
                "source": {"factory": spec.source.factory, "kwargs": spec.source.kwargs,
                           "example_inputs": spec.source.example_inputs},
                "dims": {k: v for k, v in graph.dims.items() if k != "batch"}}
    steps = [_node(graph, n) for n in graph.order if n in wanted]
    tied = {}
    for n in nodes:
        tie = graph.node(n)["args"].get("tie") if graph.node(n)["op"] == "lm_head" else None
        if tie is not None and tie not in wanted:
            tied[tie] = {"op": graph.node(tie)["op"], "args": graph.node(tie)["args"]}
    return {"version": VERSION, "kind": "nodes", "graph": graph.name, "nodes": steps,
            "tied": tied, "inputs": list(inputs), "outputs": list(outputs), "weights": weights}


def _node(graph: Graph, n: str) -> dict:
    d = graph.node(n)
    return {"id": n, "op": d["op"], "args": d["args"], "inputs": list(d["inputs"]),
            "outputs": [t.name for t in d["outputs"]]}


def build_from_record(record: Any, *, trust_code: bool = False,
                      before_weights: Callable[[], object] = lambda: None) -> SubgraphModule:
    """Build the shard a record describes (checked first), weights included, in eval mode.
    ``before_weights`` runs once everything but the weights is in memory."""
    rec = check_record(record)
    from fastserve.trust import check_code

    if rec["kind"] == "captured":
        return _build_captured(rec, trust_code, before_weights)
    for step in [*rec["nodes"], *rec["tied"].values()]:
        if step["op"] == "module":  # the user's own nn.Module class: code, run only if trusted
            check_code(str(step["args"].get("target")), trust_code=trust_code,
                       key=f"node '{step.get('id', '?')}'.module")
    before_weights()
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


def _build_captured(rec: dict, trust_code: bool, before_weights) -> SubgraphModule:
    from fastserve.graph.capture import build_parts
    from fastserve.trust import check_code

    source = rec["source"]
    steps = [(s["id"], s["inputs"], s["outputs"]) for s in rec["nodes"]]
    weights = WeightsSpec(rec["weights"]["seed"], rec["weights"]["checkpoint"])
    modules = build_parts(steps, {s["id"]: s["program"] for s in rec["nodes"]}, weights,
                          source=SourceSpec(source["factory"], source["kwargs"],
                                            source["example_inputs"]),
                          sizes=rec["dims"], name=rec["graph"], count=rec["count"],
                          before_weights=before_weights,
                          check_code=lambda factory: check_code(
                              factory, trust_code=trust_code, key="source.torch"))
    return SubgraphModule.from_steps(rec["graph"], steps, modules, rec["inputs"],
                                     rec["outputs"])


def _seeded(node_id: str, op: str, args: dict, seed: int) -> torch.nn.Module:
    # the same seed per node as fastserve.graph.module, so weights equal the reference's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(node_seed(seed, node_id))
        return build_module(op, args)


def check_record(doc: Any) -> dict:
    """``doc`` if it is a well-formed shard record; :class:`SpecError` naming the field if not."""
    def fail(key: str, what: str):
        raise SpecError(f"shard record: {what}", key=key)

    if not isinstance(doc, dict):
        fail("(record)", f"expected a map, got {type(doc).__name__}")
    kind = doc.get("kind")
    if doc.get("version") != VERSION or kind not in ("nodes", "captured"):
        fail("version", f"expected version {VERSION} of kind 'nodes' or 'captured'")
    if not isinstance(doc.get("graph"), str):
        fail("graph", "expected the graph's name")
    for key in ("inputs", "outputs"):
        _check_names(doc.get(key), key, fail)
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not 0 < len(nodes) <= MAX_NODES:
        fail("nodes", f"expected a list of 1 to {MAX_NODES} node records")
    seen: set[str] = set()
    for i, step in enumerate(nodes):
        if kind == "nodes":
            _check_step(step, f"nodes[{i}]", fail, with_tensors=True)
        else:
            if not isinstance(step, dict) or set(step) != {"id", "inputs", "outputs", "program"} \
                    or not isinstance(step["id"], str) or not step["id"]:
                fail(f"nodes[{i}]", "expected {id, inputs, outputs, program}")
            if not isinstance(step["program"], (dict, type(None))):
                fail(f"nodes[{i}].program", "expected a program or null")
            for part in ("inputs", "outputs"):
                _check_names(step[part], f"nodes[{i}].{part}", fail)
        if step["id"] in seen:
            fail(f"nodes[{i}].id", f"node '{step['id']}' appears twice")
        seen.add(step["id"])
    weights = doc.get("weights")
    if not isinstance(weights, dict) or type(weights.get("seed")) is not int or \
            not isinstance(weights.get("checkpoint"), (str, type(None))):
        fail("weights", "expected {seed: int, checkpoint: path or null}")
    if kind == "captured":
        _check_captured(doc, fail)
        return doc
    tied = doc.get("tied")
    if not isinstance(tied, dict):
        fail("tied", "expected a map of node id to {op, args}")
    for t, step in tied.items():
        _check_step({"id": t, **step} if isinstance(step, dict) else step, f"tied.{t}", fail,
                    with_tensors=False)
    return doc


def _check_names(names: Any, key: str, fail) -> None:
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        fail(key, "expected a list of tensor names")


def _check_captured(doc: dict, fail) -> None:
    count = doc.get("count")
    if type(count) is not int or not len(doc["nodes"]) <= count <= MAX_NODES:
        fail("count", "expected the graph's number of nodes")
    dims = doc.get("dims")
    if not isinstance(dims, dict) or not all(isinstance(k, str) and type(v) is int and v > 0
                                             for k, v in dims.items()):
        fail("dims", "expected a map of dim name to a positive size")
    source = doc.get("source")
    if not isinstance(source, dict) or set(source) != {"factory", "kwargs", "example_inputs"}:
        fail("source", "expected {factory, kwargs, example_inputs}")
    if not isinstance(source["factory"], str):
        fail("source.factory", "expected 'package.module:factory'")
    if not isinstance(source["kwargs"], dict) or not all(isinstance(k, str)
                                                         for k in source["kwargs"]):
        fail("source.kwargs", "expected a map of argument name to value")
    examples = source["example_inputs"]
    if not isinstance(examples, dict) or not examples:
        fail("source.example_inputs", "expected a map of input name to declaration")
    for name, decl in examples.items():
        key = f"source.example_inputs.{name}"
        if not isinstance(decl, dict) or set(decl) - {"shape", "dtype", "high"}:
            fail(key, "expected {shape, dtype, high}")
        shape = decl.get("shape")
        if not isinstance(shape, list) or not all(
                (type(d) is int and d >= 0) or (isinstance(d, str) and (d == "batch" or d in dims))
                for d in shape):
            fail(f"{key}.shape", "expected sizes and names of dims the record gives")
        if decl.get("dtype", "float32") not in DTYPES:
            fail(f"{key}.dtype", f"expected one of {sorted(DTYPES)}")
        if decl.get("high") is not None and (type(decl["high"]) is not int or decl["high"] < 1):
            fail(f"{key}.high", "expected a positive int or null")


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
            _check_names(step.get(part), f"{key}.{part}", fail)

