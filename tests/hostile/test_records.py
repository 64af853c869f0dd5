"""Shard records, as a rank receives them from the coordinator: a well-formed record builds
exactly its shard; a malformed one is refused with SpecError naming the field, before anything
is built. A captured model's record read from a complete checkpoint runs no model code: its
factory is never imported."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

import fastserve.graph as G
from fastserve.errors import SpecError, TrustError
from fastserve.graph.records import build_from_record, check_record, shard_record
from fastserve.graph.zoo import hf_bert

ROOT = Path(__file__).resolve().parents[2]


def _shard(graph, nodes: list[str]) -> dict:
    """The record of ``nodes`` as a rank would receive it (through JSON)."""
    inside = set(nodes)
    produced = {t.name for n in nodes for t in graph.node(n)["outputs"]}
    inputs = sorted({r for n in nodes for r in graph.node(n)["inputs"] if r not in produced})
    later = [n for n in graph.order if n not in inside]
    outputs = sorted({t for t in produced
                      if t in graph.outputs or any(t in graph.node(m)["inputs"] for m in later)})
    return json.loads(json.dumps(shard_record(graph, nodes, inputs, outputs)))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    kwargs = {"n_layer": 2, "hidden_size": 32, "intermediate_size": 64, "n_head": 2,
              "vocab_size": 64}
    torch.manual_seed(3)
    model = hf_bert(**kwargs)
    save_model(model, str(d / "bert.safetensors"))
    spec = {"name": "bert", "dims": {"seq": 8}, "weights": {"checkpoint": "bert.safetensors"},
            "source": {"torch": "fastserve.graph.zoo:hf_bert", "kwargs": kwargs,
                       "example_inputs": {"input_ids": {"shape": ["batch", "seq"],
                                                        "dtype": "int64", "high": 64}}}}
    (d / "bert.yaml").write_text(json.dumps(spec))
    return G.load(str(d / "bert.yaml"), trust_code=True), model


def test_a_captured_record_builds_its_shard_without_running_model_code(bert):
    graph, model = bert
    nodes = list(graph.order)
    record = _shard(graph, nodes)
    # the factory is named, but a complete checkpoint means it never runs: a record naming a
    # module that does not exist still builds, untrusted
    record["source"]["factory"] = "no_such_package.anywhere:factory"
    shard = build_from_record(record, trust_code=False)
    x = G.random_inputs(graph, 2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(shard(x)["pooler"], model(**x).pooler_output)
    assert {k for k, _ in shard.named_parameters()} and all(
        not p.is_meta for p in shard.parameters())


def test_seeded_captured_records_run_the_factory_only_when_trusted():
    graph = G.load(str(ROOT / "graphs/gpt2-hf-tiny.yaml"), trust_code=True)
    record = _shard(graph, ["transformer.h.0", "transformer.h.1"])
    with pytest.raises(TrustError, match="trust"):
        build_from_record(record, trust_code=False)
    shard = build_from_record(record, trust_code=True)
    reference = G.build_subgraph(graph, ["transformer.h.0", "transformer.h.1"],
                                 record["inputs"], record["outputs"])
    for (k, a), (_, b) in zip(sorted(shard.state_dict().items()),
                              sorted(reference.state_dict().items())):
        assert torch.equal(a, b), k


def _set(path: list, value):
    def edit(record: dict) -> dict:
        out = copy.deepcopy(record)
        target = out
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return out
    return edit


def _drop(path: list):
    def edit(record: dict) -> dict:
        out = copy.deepcopy(record)
        target = out
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return out
    return edit


MALFORMED = [
    ("not a map", lambda r: [r], "(record)"),
    ("other version", _set(["version"], 2), "version"),
    ("unknown kind", _set(["kind"], "pickle"), "version"),
    ("graph not a name", _set(["graph"], 7), "graph"),
    ("inputs not names", _set(["inputs"], [1]), "inputs"),
    ("no nodes", _set(["nodes"], []), "nodes"),
    ("node with code", _set(["nodes", 0, "exec"], "print(1)"), "nodes[0]"),
    ("node id empty", _set(["nodes", 0, "id"], ""), "nodes[0]"),
    ("node outputs not names", _set(["nodes", 0, "outputs"], "x"), "nodes[0].outputs"),
    ("program not a map", _set(["nodes", 0, "program"], "ops"), "nodes[0].program"),
    ("node twice", lambda r: {**r, "nodes": [r["nodes"][0], r["nodes"][0]]}, "nodes[1].id"),
    ("seed a bool", _set(["weights", "seed"], True), "weights"),
    ("checkpoint a number", _set(["weights", "checkpoint"], 3), "weights"),
    ("count below the nodes", _set(["count"], 0), "count"),
    ("dims negative", _set(["dims", "seq"], -1), "dims"),
    ("source extra key", _set(["source", "code"], "x"), "source"),
    ("factory not a string", _set(["source", "factory"], ["os", "system"]), "source.factory"),
    ("kwargs not a map", _set(["source", "kwargs"], [1]), "source.kwargs"),
    ("no example inputs", _set(["source", "example_inputs"], {}), "source.example_inputs"),
    ("example dim unknown", _set(["source", "example_inputs", "input_ids", "shape"],
                                 ["batch", "width"]), "source.example_inputs.input_ids.shape"),
    ("example dtype", _set(["source", "example_inputs", "input_ids", "dtype"], "object"),
     "source.example_inputs.input_ids.dtype"),
    ("example high", _set(["source", "example_inputs", "input_ids", "high"], 0),
     "source.example_inputs.input_ids.high"),
    ("no weights", _drop(["weights"]), "weights"),
]


@pytest.mark.parametrize("name,edit,key", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_captured_records_are_refused(bert, name, edit, key):
    graph, _ = bert
    record = _shard(graph, list(graph.order)[:2])
    check_record(record)
    with pytest.raises(SpecError) as info:
        build_from_record(edit(record), trust_code=True)
    assert info.value.key == key


def test_a_bad_program_in_a_record_is_refused_naming_the_node(bert):
    graph, _ = bert
    record = _shard(graph, list(graph.order)[:2])
    record["nodes"][1]["program"]["ops"][0] = ["call", "builtins.exec", {"tuple": []},
                                               {"map": {}}]
    with pytest.raises(SpecError, match=f"node '{record['nodes'][1]['id']}' program"):
        build_from_record(record, trust_code=True)


def test_malformed_node_records_are_refused():
    graph = G.load(str(ROOT / "graphs/mlp.yaml"))
    record = _shard(graph, list(graph.order)[:2])
    assert check_record(record) is record
    for edit, key in [(_set(["nodes", 0, "op"], "os.system"), "nodes[0].op"),
                      (_set(["nodes", 0, "args"], []), "nodes[0].args"),
                      (_set(["tied"], []), "tied"),
                      (_set(["nodes", 1, "inputs"], [None]), "nodes[1].inputs")]:
        with pytest.raises(SpecError) as info:
            build_from_record(edit(record))
        assert info.value.key == key
