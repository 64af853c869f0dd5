"""A captured node's program arrives from the coordinator as data: anything that is not a
well-formed program of ATen operators is refused with ProgramError naming the field, and nothing
in it reaches Python as code (fx writes the graph it builds as Python source, so names and
keyword arguments are where an injection would go)."""

from __future__ import annotations

import copy
import dataclasses
import json
import operator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastserve.graph as G
from fastserve.graph import program
from fastserve.graph.program import ProgramError, decode

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def graph():
    return G.load(str(ROOT / "graphs/gpt2-hf-tiny.yaml"), trust_code=True)


@pytest.fixture(scope="module")
def block(graph) -> dict:
    """The program of one transformer block, as the coordinator sends it."""
    return json.loads(json.dumps(graph.node("transformer.h.1")["program"]))


def test_every_node_of_a_captured_graph_has_a_program_that_runs_like_the_capture(graph):
    for n in graph.order:
        doc = graph.node(n)["program"]
        assert doc is not None, n
        gm = decode(json.loads(json.dumps(doc)))  # what crosses the wire is JSON
        assert sum(1 for x in gm.graph.nodes if x.op == "placeholder") == \
            len(graph.node(n)["inputs"])
    # decoded programs with their weights compute what the eager model computes
    x = G.random_inputs(graph, 2, seed=4)
    from fastserve.graph.zoo import hf_gpt2

    eager = G.seed_weights(hf_gpt2(**graph.spec.source.kwargs), 0)
    with torch.no_grad():
        torch.testing.assert_close(G.reference(graph, x)["lm_head"], eager(**x).logits)


def test_a_live_capture_round_trips_through_its_program():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(approximate="tanh"),
                                torch.nn.LayerNorm(5))
    graph = G.capture(model, {"input": torch.randn(3, 6)})
    x = torch.randn(4, 6)
    for n in graph.order:
        doc = json.loads(json.dumps(graph.node(n)["program"]))
        gm = decode(doc)
        for name, t in gm.named_parameters():
            assert t.is_meta, name  # tensors arrive without values; weights come after
    # the graph's nodes, rebuilt from their programs (not the live modules), compute what the
    # module does
    rebuilt = G.Graph(graph.name, graph.nx, graph.inputs, graph.outputs,
                      dataclasses.replace(graph.spec, source=dataclasses.replace(
                          graph.spec.source)), graph.dims)
    with torch.no_grad():
        with pytest.raises(Exception, match="checkpoint|factory"):
            G.reference(rebuilt, {"input": x})  # no factory, no checkpoint: nothing to load
        torch.testing.assert_close(G.reference(graph, {"input": x})[graph.outputs[0]], model(x))


def _with(doc: dict, path: list, value) -> dict:
    out = copy.deepcopy(doc)
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def _first(doc: dict, kind: str, target: str | None = None) -> int:
    return next(i for i, op in enumerate(doc["ops"])
                if op[0] == kind and (target is None or op[1] == target))


HOSTILE = {
    # code by name: only ATen operators and operators on sizes resolve
    "builtin eval": lambda d: _with(d, ["ops", _first(d, "call"), 1], "eval"),
    "os.system": lambda d: _with(d, ["ops", _first(d, "call"), 1], "os.system"),
    "dunder walk": lambda d: _with(d, ["ops", _first(d, "call"), 1], "aten.__class__.__init__"),
    "from_file": lambda d: _with(d, ["ops", _first(d, "call"), 1], "aten.from_file.default"),
    "no such op": lambda d: _with(d, ["ops", _first(d, "call"), 1], "aten.nope.default"),
    # names fx would write into Python source
    "keyword injection": lambda d: _with(d, ["ops", _first(d, "call"), 3],
                                         {"map": {"x=1); import os; os.system('id'); (": 1}}),
    "keyword is a keyword": lambda d: _with(d, ["ops", _first(d, "call"), 3],
                                            {"map": {"lambda": 1}}),
    "tensor name injection": lambda d: {
        "ops": [["tensor", 'w")+__import__("os").system("id")+("'] if op[0] == "tensor" else op
                for op in d["ops"]],
        "tensors": {**d["tensors"], 'w")+__import__("os").system("id")+("': {
            "shape": [1], "dtype": "float32", "param": True, "aliases": ["w"]}}},
    "tensor named like a method": lambda d: _with(d, ["tensors", "forward"], {
        "shape": [1], "dtype": "float32", "param": True, "aliases": ["forward"]}),
    # structure
    "not a map": lambda d: [d],
    "extra key": lambda d: {**d, "code": "print(1)"},
    "undeclared tensor": lambda d: _with(d, ["ops", _first(d, "tensor"), 1], "nowhere.weight"),
    "forward reference": lambda d: _with(d, ["ops", _first(d, "call"), 2],
                                         {"tuple": [{"ref": len(d["ops"]) - 1}]}),
    "reference to a bool": lambda d: _with(d, ["ops", _first(d, "call"), 2],
                                           {"tuple": [{"ref": True}]}),
    "reference to the output": lambda d: {
        "ops": [*d["ops"], ["call", "aten.relu.default", {"tuple": [{"ref": len(d["ops"]) - 1}]},
                            {"map": {}}]],
        "tensors": d["tensors"]},
    "no output": lambda d: {"ops": d["ops"][:-1], "tensors": d["tensors"]},
    "input after a call": lambda d: {"ops": [*d["ops"][:-1], ["input"], d["ops"][-1]],
                                     "tensors": d["tensors"]},
    "unknown kind": lambda d: _with(d, ["ops", 0], ["exec", "print(1)"]),
    "deep nesting": lambda d: _with(d, ["ops", _first(d, "call"), 2],
                                    {"tuple": [json.loads("[" * 50 + "]" * 50)]}),
    "unknown value tag": lambda d: _with(d, ["ops", _first(d, "call"), 2],
                                         {"tuple": [{"pickle": "gASVAAAA"}]}),
    "cuda device": lambda d: _with(d, ["ops", _first(d, "call"), 3],
                                   {"map": {"device": {"device": "cuda"}}}),
    # tensors
    "negative size": lambda d: _with(d, ["tensors", next(iter(d["tensors"])), "shape"], [-1]),
    "unknown dtype": lambda d: _with(d, ["tensors", next(iter(d["tensors"])), "dtype"], "object"),
    "param not a bool": lambda d: _with(d, ["tensors", next(iter(d["tensors"])), "param"], 1),
    "value of a parameter": lambda d: _with(d, ["tensors", next(iter(d["tensors"])), "value"],
                                            [0.0]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_are_refused(block, name):
    with pytest.raises(ProgramError):
        decode(HOSTILE[name](block))


def test_buffer_values_are_checked():
    base = {"ops": [["tensor", "b"], ["output", {"ref": 0}]],
            "tensors": {"b": {"shape": [2], "dtype": "int64", "param": False,
                              "aliases": ["b"], "value": [1, 2]}}}
    assert decode(base).b.tolist() == [1, 2]
    for value in ([1], [1, 2, 3], [1.5, 2], ["1", 2], [True, 2], [2 ** 70, 1], "12", None):
        with pytest.raises(ProgramError, match="value"):
            decode(_with(base, ["tensors", "b", "value"], value))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
                     st.text(max_size=12),
                     lambda kids: st.lists(kids, max_size=4) |
                     st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_change_to_a_program_decodes_to_aten_calls_or_is_refused(block, data):
    doc = copy.deepcopy(block)
    i = data.draw(st.integers(0, len(doc["ops"]) - 1))
    op = doc["ops"][i]
    j = data.draw(st.integers(0, len(op)))
    value = data.draw(_JSON)
    if j == len(op):
        doc["ops"][i] = value
    else:
        op[j] = value
    try:
        gm = decode(doc)
    except ProgramError:
        return
    allowed = set(program._OPERATORS.values()) | {operator.getitem}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert isinstance(node.target, torch._ops.OpOverload) or node.target in allowed
            assert node.target.__module__ != "builtins" or node.target in allowed
    assert "import" not in gm.code
