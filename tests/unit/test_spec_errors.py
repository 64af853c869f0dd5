"""The loader's contract, pinned exactly: every refusal of ``fastserve/graph/loader.py`` names the
file, the 1-based line of the offending key or item, the key path and a fixed message; and the
accepted edge cases (``repeat: 1``, ``seed: 0``, each checkpoint suffix, ``outputs: a``,
parameters using earlier ones, ``source:`` specs) give exactly the spec they should.

Every expected value below is written by hand. In the YAML texts the offending key is, on
purpose, never the first key of its mapping nor the first item of its list, and containers start
on other lines than their keys: a message that named the container instead of the key, or no
line at all, would then report a different line.
"""

from __future__ import annotations

import pytest
import yaml

import fastserve.graph.loader as loader
from fastserve.errors import SpecError, TrustError
from fastserve.graph import load_spec, parse_spec, spec_from_dict
from fastserve.graph.spec import GraphSpec, InputSpec, NodeSpec, SourceSpec, WeightsSpec
from fastserve.limits import Limits

F = "t.yaml"

ALL_OPS = ("add, attention, avg_pool2d, concat, conv2d, dropout, embedding, flatten, gelu, "
           "identity, layer_norm, linear, llama_block, lm_head, max_pool2d, mlp, mul, "
           "positional_embedding, relu, reshape, rms_norm, silu, softmax, split, "
           "transformer_block, upsample")
ALL_DTYPES = "float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool"
TOP_KEYS = "description, dims, inputs, name, nodes, outputs, params, source, weights"
NODE_KEYS = "args, id, inputs, module, op"
REPEAT_KEYS = "id, input, nodes, output, repeat"
MAX_INT = 9007199254740992  # 2**53, the default Limits.max_int


@pytest.fixture(autouse=True)
def no_trust_file(tmp_path, monkeypatch):
    """Whatever the developer's own trust file lists, these tests run with none."""
    monkeypatch.setenv("FASTSERVE_TRUST_FILE", str(tmp_path / "no-trust.yaml"))


def text(*lines: str) -> str:
    """A YAML file, one argument a line: line numbers are the argument positions, from 1."""
    return "\n".join(lines) + "\n"


# lines 1-8 of every node case; the case's own lines start at line 9 (nodes[1])
HEAD = (
    "name: t",                               # 1
    "params:",                               # 2
    "  d: 8",                                # 3
    "inputs:",                               # 4
    "  x:",                                  # 5
    "    shape: [batch, 8]",                 # 6
    "nodes:",                                # 7
    "  - {id: a, op: relu, inputs: [x]}",    # 8
)


def nodes(*tail: str, outputs: str = "outputs: [a]") -> str:
    return text(*HEAD, *tail, outputs)


def where(line, key, file=F) -> str:
    parts = []
    if file:
        parts.append(file + (f":{line}" if line else ""))
    elif line:
        parts.append(f"line {line}")
    if key:
        parts.append(f"key '{key}'")
    return ", ".join(parts)


def refused(src: str, *, limits=None, trust=False, kind=SpecError) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(src, file=F, trust_code=trust, limits=limits)
    assert type(info.value) is kind, repr(info.value)
    return info.value


def check(e: SpecError, line, key, message, file=F) -> None:
    assert (e.file, e.line, e.key, e.reason) == (file, line, key, message)
    prefix = where(line, key, file)
    assert str(e) == (f"{prefix}: {message}" if prefix else message)


def case(id_, src, line, key, message, limits=None):
    return pytest.param(src, line, key, message, limits, id=id_)


# --- the top level: the document, name, description, params, dims, weights ---------------------

TOP = [
    case("doc_is_list", text("# a comment", "- a"), 2, None,
         "a graph spec must be a mapping at the top level, got a list (['a'])"),
    case("doc_is_scalar", text("hello"), None, None,
         "a graph spec must be a mapping at the top level, got a string ('hello')"),
    case("unknown_top_key", text("name: t", "nodez: []"), 2, "nodez",
         f"unknown key 'nodez' in spec; expected one of {TOP_KEYS}"),
    case("int_top_key", text("name: t", "5: x"), 2, "5",
         f"unknown key '5' in spec; expected one of {TOP_KEYS}"),
    # required keys are reported in sorted order, at the line where the document starts
    case("missing_inputs_first", text("# c", "name: t"), 2, "inputs",
         "spec is missing required key 'inputs'"),
    case("missing_name", text("# c", "inputs: 1", "nodes: 1", "outputs: 1"), 2, "name",
         "spec is missing required key 'name'"),
    case("missing_nodes", text("# c", "name: t", "inputs: 1", "outputs: 1"), 2, "nodes",
         "spec is missing required key 'nodes'"),
    case("missing_outputs", text("# c", "name: t", "inputs: 1", "nodes: 1"), 2, "outputs",
         "spec is missing required key 'outputs'"),
    case("source_needs_only_name", text("# c", "source: 1"), 2, "name",
         "spec is missing required key 'name'"),
    case("name_int", text("description: d", "name: 5", "inputs: 1", "nodes: 1", "outputs: 1"),
         2, "name", "expected a string, got an integer (5)"),
    case("name_bool", text("description: d", "name: true", "inputs: 1", "nodes: 1",
                           "outputs: 1"), 2, "name", "expected a string, got a boolean (True)"),
    case("name_space", text("description: d", "name: a b", "inputs: 1", "nodes: 1",
                            "outputs: 1"), 2, "name", "graph name 'a b' must be an identifier"),
    case("name_digit", text("description: d", "name: '1t'", "inputs: 1", "nodes: 1",
                            "outputs: 1"), 2, "name", "graph name '1t' must be an identifier"),
    case("description_int", text("name: t", "description: 5", "inputs: 1", "nodes: 1",
                                 "outputs: 1"), 2, "description",
         "expected a string, got an integer (5)"),
    case("params_list", text("name: t", "params: [1]", "inputs: 1", "nodes: 1", "outputs: 1"),
         2, "params", "expected a mapping of parameter names to values, got a list ([1])"),
    case("param_name", text("name: t", "params:", "  a: 1", "  1x: 2", "inputs: 1", "nodes: 1",
                            "outputs: 1"), 4, "params.1x",
         "parameter name '1x' is not an identifier"),
    case("param_name_int", text("name: t", "params:", "  a: 1", "  5: 2", "inputs: 1",
                                "nodes: 1", "outputs: 1"), 4, "params.5",
         "parameter name 5 is not an identifier"),
    case("param_forward_ref", text("name: t", "params:", "  a: $b", "  b: 1", "inputs: 1",
                                   "nodes: 1", "outputs: 1"), 3, "params.a",
         "undefined parameter 'b' in '$b'; defined: none"),
    case("param_later_ref", text("name: t", "params:", "  a: 1", "  b: ${a + c}", "  c: 2",
                                 "inputs: 1", "nodes: 1", "outputs: 1"), 4, "params.b",
         "undefined parameter 'c' in '${a + c}'; defined: a"),
    case("param_nested_ref", text("name: t", "params:", "  a: 1", "  b:", "    - 1",
                                  "    - $zz", "inputs: 1", "nodes: 1", "outputs: 1"),
         6, "params.b[1]", "undefined parameter 'zz' in '$zz'; defined: a"),
    case("param_too_big", text("name: t", "params:", "  a: 1", "  b: 101", "inputs: 1",
                               "nodes: 1", "outputs: 1"), 4, "params.b",
         "101 is larger in magnitude than 100 (Limits.max_int)", Limits(max_int=100)),
    case("dims_list", text("name: t", "dims: [1]", "inputs: 1", "nodes: 1", "outputs: 1"), 2,
         "dims", "expected a mapping of dim names to sizes, got a list ([1])"),
    case("dim_text", text("name: t", "dims:", "  seq: 4", "  hid: abc", "inputs: 1",
                          "nodes: 1", "outputs: 1"), 4, "dims.hid",
         "expected a positive integer size, got a string ('abc')"),
    case("dim_bool", text("name: t", "dims:", "  seq: 4", "  hid: true", "inputs: 1",
                          "nodes: 1", "outputs: 1"), 4, "dims.hid",
         "expected a positive integer size, got a boolean (True)"),
    case("dim_float", text("name: t", "dims:", "  seq: 4", "  hid: 1.5", "inputs: 1",
                           "nodes: 1", "outputs: 1"), 4, "dims.hid",
         "expected a positive integer size, got a number (1.5)"),
    case("dim_zero", text("name: t", "dims:", "  seq: 4", "  hid: 0", "inputs: 1",
                          "nodes: 1", "outputs: 1"), 4, "dims.hid",
         "dim 'hid' must be positive, got 0"),
    case("dim_negative", text("name: t", "dims:", "  seq: 4", "  hid: -3", "inputs: 1",
                              "nodes: 1", "outputs: 1"), 4, "dims.hid",
         "dim 'hid' must be positive, got -3"),
    case("dim_zero_by_param", text("name: t", "params: {d: 4}", "dims:", "  seq: 4",
                                   "  hid: ${d - 4}", "inputs: 1", "nodes: 1", "outputs: 1"),
         5, "dims.hid", "dim 'hid' must be positive, got 0"),
    case("dim_undefined", text("name: t", "dims:", "  seq: 4", "  hid: $h", "inputs: 1",
                               "nodes: 1", "outputs: 1"), 4, "dims.hid",
         "undefined parameter 'h' in '$h'; defined: none"),
    case("dim_too_big", text("name: t", "dims:", "  seq: 4", "  hid: 101", "inputs: 1",
                             "nodes: 1", "outputs: 1"), 4, "dims.hid",
         "101 is larger in magnitude than 100 (Limits.max_int)", Limits(max_int=100)),
    case("weights_int", text("name: t", "weights: 5", "inputs: 1", "nodes: 1", "outputs: 1"), 2,
         "weights", "expected a mapping with 'seed' or 'checkpoint', got an integer (5)"),
    case("weights_unknown_key", text("name: t", "weights:", "  seed: 1", "  ckpt: a.pt",
                                     "inputs: 1", "nodes: 1", "outputs: 1"), 4, "weights.ckpt",
         "unknown key 'ckpt' in weights; expected one of checkpoint, seed"),
    case("seed_text", text("name: t", "weights:", "  checkpoint: w.pt", "  seed: abc",
                           "inputs: 1", "nodes: 1", "outputs: 1"), 4, "weights.seed",
         "expected an integer seed, got a string ('abc')"),
    case("seed_bool", text("name: t", "weights:", "  checkpoint: w.pt", "  seed: true",
                           "inputs: 1", "nodes: 1", "outputs: 1"), 4, "weights.seed",
         "expected an integer seed, got a boolean (True)"),
    case("seed_param_not_substituted", text("name: t", "params: {s: 1}", "weights:",
                                            "  checkpoint: w.pt", "  seed: $s", "inputs: 1",
                                            "nodes: 1", "outputs: 1"), 5, "weights.seed",
         "expected an integer seed, got a string ('$s')"),
    case("seed_negative", text("name: t", "weights:", "  checkpoint: w.pt", "  seed: -1",
                               "inputs: 1", "nodes: 1", "outputs: 1"), 4, "weights.seed",
         f"seed must be an integer from 0 to {MAX_INT}, got -1"),
    case("seed_too_big", text("name: t", "weights:", "  checkpoint: w.pt", "  seed: 101",
                              "inputs: 1", "nodes: 1", "outputs: 1"), 4, "weights.seed",
         "seed must be an integer from 0 to 100, got 101", Limits(max_int=100)),
    case("checkpoint_int", text("name: t", "weights:", "  seed: 1", "  checkpoint: 5",
                                "inputs: 1", "nodes: 1", "outputs: 1"), 4, "weights.checkpoint",
         "expected a checkpoint path, got an integer (5)"),
    case("checkpoint_suffix", text("name: t", "weights:", "  seed: 1", "  checkpoint: w.pickle",
                                   "inputs: 1", "nodes: 1", "outputs: 1"), 4,
         "weights.checkpoint", "checkpoint 'w.pickle' must be .safetensors (preferred) or a "
         "torch file (.pt/.pth/.bin)"),
    case("checkpoint_suffix_inside", text("name: t", "weights:", "  seed: 1",
                                          "  checkpoint: w.pt.old", "inputs: 1", "nodes: 1",
                                          "outputs: 1"), 4, "weights.checkpoint",
         "checkpoint 'w.pt.old' must be .safetensors (preferred) or a torch file "
         "(.pt/.pth/.bin)"),
]


# --- inputs: tensor declarations -------------------------------------------------------------

def inputs(*lines: str) -> str:
    """A spec whose ``inputs:`` block is ``lines`` (from line 3)."""
    return text("name: t", "inputs:", *lines, "nodes: 1", "outputs: 1")


INPUTS = [
    case("inputs_list", text("name: t", "inputs: [x]", "nodes: 1", "outputs: 1"), 2, "inputs",
         "expected a mapping of input names to {shape, dtype}, got a list (['x'])"),
    case("inputs_empty", text("name: t", "inputs: {}", "nodes: 1", "outputs: 1"), 2, "inputs",
         "a graph needs at least one input"),
    case("input_name", inputs("  x: {shape: [2]}", "  a b: {shape: [2]}"), 4, "inputs.a b",
         "input name 'a b' is not an identifier"),
    case("input_name_int", inputs("  x: {shape: [2]}", "  5: {shape: [2]}"), 4, "inputs.5",
         "input name 5 is not an identifier"),
    case("decl_not_mapping", inputs("  x: {shape: [2]}", "  y: 5"), 4, "inputs.y",
         "expected a mapping with 'shape' and 'dtype', got an integer (5)"),
    case("decl_unknown_key", inputs("  x:", "    shape: [2]", "    dtyp: int64"), 5,
         "inputs.x.dtyp", "unknown key 'dtyp' in inputs.x; expected one of dtype, high, shape"),
    case("decl_missing_shape", inputs("  x: {shape: [2]}", "  y:", "    dtype: int64"), 5,
         "inputs.y.shape", "inputs.y is missing required key 'shape'"),
    case("shape_not_list", inputs("  x:", "    dtype: int64", "    shape: 4"), 5,
         "inputs.x.shape", "expected a list of dims (ints or names), got an integer (4)"),
    case("shape_zero", inputs("  x:", "    shape:", "      - batch", "      - 0"), 6,
         "inputs.x.shape", "bad shape: dim 1 must be a positive int or a dim name, got an "
         "integer (0)"),
    case("shape_negative", inputs("  x:", "    shape:", "      - batch", "      - -4"), 6,
         "inputs.x.shape", "bad shape: dim 1 must be a positive int or a dim name, got an "
         "integer (-4)"),
    case("shape_bool", inputs("  x:", "    shape:", "      - batch", "      - true"), 6,
         "inputs.x.shape", "bad shape: dim 1 must be a positive int or a dim name, got a "
         "boolean (True)"),
    case("shape_float", inputs("  x:", "    shape:", "      - batch", "      - 1.5"), 6,
         "inputs.x.shape", "bad shape: dim 1 must be a positive int or a dim name, got a "
         "number (1.5)"),
    case("shape_null", inputs("  x:", "    shape:", "      - batch", "      - null"), 6,
         "inputs.x.shape", "bad shape: dim 1 must be a positive int or a dim name, got nothing "
         "(null) (None)"),
    case("shape_list", inputs("  x:", "    shape:", "      - batch", "      - [2]"), 6,
         "inputs.x.shape", "bad shape: dim 1 must be a positive int or a dim name, got a list "
         "([2])"),
    case("shape_undefined", inputs("  x:", "    shape:", "      - batch", "      - $h"), 6,
         "inputs.x.shape[1]", "undefined parameter 'h' in '$h'; defined: none"),
    case("shape_too_big", inputs("  x:", "    shape:", "      - batch", "      - 101"), 6,
         "inputs.x.shape[1]", "101 is larger in magnitude than 100 (Limits.max_int)",
         Limits(max_int=100)),
    case("dtype", inputs("  x:", "    shape: [2]", "    dtype: float8"), 5, "inputs.x.dtype",
         f"unknown dtype 'float8'; expected one of {ALL_DTYPES}"),
    case("high_float", inputs("  x:", "    shape: [2]", "    high: 1.5"), 5, "inputs.x.high",
         "expected an integer bound, got a number (1.5)"),
    case("high_bool", inputs("  x:", "    shape: [2]", "    high: true"), 5, "inputs.x.high",
         "expected an integer bound, got a boolean (True)"),
    case("high_zero", inputs("  x:", "    shape: [2]", "    high: 0"), 5, "inputs.x.high",
         "high (the exclusive bound of random integer inputs) must be positive, got 0"),
    case("high_negative", inputs("  x:", "    shape: [2]", "    high: -2"), 5, "inputs.x.high",
         "high (the exclusive bound of random integer inputs) must be positive, got -2"),
    case("high_undefined", inputs("  x:", "    shape: [2]", "    high: $v"), 5, "inputs.x.high",
         "undefined parameter 'v' in '$v'; defined: none"),
    case("high_too_big", inputs("  x:", "    shape: [2]", "    high: 101"), 5, "inputs.x.high",
         "101 is larger in magnitude than 100 (Limits.max_int)", Limits(max_int=100)),
]


# --- outputs and the node list ------------------------------------------------------------------

OUTPUTS = [
    case("outputs_mapping", nodes(outputs="outputs: {a: 1}"), 9, "outputs",
         "expected a list of tensor names, got a mapping ({'a': 1})"),
    case("outputs_int", nodes(outputs="outputs: 5"), 9, "outputs",
         "expected a list of tensor names, got an integer (5)"),
    case("outputs_null", nodes(outputs="outputs:"), 9, "outputs",
         "expected a list of tensor names, got nothing (null) (None)"),
    case("outputs_empty", nodes(outputs="outputs: []"), 9, "outputs",
         "a graph needs at least one output"),
    case("output_not_name", nodes(outputs="outputs:\n  - a\n  - 5"), 11, "outputs[1]",
         "expected a tensor name, got an integer (5)"),
    case("nodes_mapping", text("name: t", "inputs: {x: {shape: [2]}}", "nodes: {a: 1}",
                               "outputs: [a]"), 3, "nodes",
         "expected a list of nodes, got a mapping ({'a': 1})"),
    case("nodes_empty", text("name: t", "inputs: {x: {shape: [2]}}", "nodes: []",
                             "outputs: [a]"), 3, "nodes", "a graph needs at least one node"),
    case("nodes_too_many", nodes("  - {id: b, op: relu, inputs: [a]}",
                                 "  - {id: c, op: relu, inputs: [b]}"), 7, "nodes",
         "3 nodes, more than 2 (Limits.max_nodes)", Limits(max_nodes=2)),
    case("node_not_mapping", nodes("  - 5"), 9, "nodes[1]",
         "expected a node mapping, got an integer (5)"),
]


# --- plain nodes (nodes[1], from line 9) ----------------------------------------------------------

NODES = [
    case("unknown_node_key", nodes("  - id: b", "    op: relu", "    input: [x]"), 11,
         "nodes[1].input", f"unknown key 'input' in nodes[1]; expected one of {NODE_KEYS}"),
    case("missing_id", nodes("  - op: relu", "    inputs: [x]"), 9, "nodes[1].id",
         "nodes[1] is missing required key 'id'"),
    case("id_int", nodes("  - op: relu", "    id: 5"), 10, "nodes[1].id",
         "expected a string id, got an integer (5)"),
    case("id_space", nodes("  - op: relu", "    id: b c"), 10, "nodes[1].id",
         "node id 'b c' must start with a letter or '_' and contain only letters, digits, '_' "
         "and '-'"),
    case("id_dot", nodes("  - op: relu", "    id: b.c"), 10, "nodes[1].id",
         "node id 'b.c' must start with a letter or '_' and contain only letters, digits, '_' "
         "and '-'"),
    case("id_digit", nodes("  - op: relu", "    id: '1b'"), 10, "nodes[1].id",
         "node id '1b' must start with a letter or '_' and contain only letters, digits, '_' "
         "and '-'"),
    # the item itself is at fault: its line is the line of the list item
    case("op_and_module", nodes("  - {", "     id: b, op: relu, module: 'p.m:C'}"), 9,
         "nodes[1]", "node 'b' needs exactly one of 'op' or 'module'"),
    case("neither_op_nor_module", nodes("  - {", "     id: b, inputs: [a]}"), 9, "nodes[1]",
         "node 'b' needs exactly one of 'op' or 'module'"),
    case("args_list", nodes("  - id: b", "    op: relu", "    args: [1]"), 11, "nodes[1].args",
         "expected a mapping of arguments, got a list ([1])"),
    case("args_param", nodes("  - id: b", "    op: relu", "    args: $d"), 11, "nodes[1].args",
         "expected a mapping of arguments, got a string ('$d')"),
    case("arg_undefined", nodes("  - id: b", "    op: linear", "    args:",
                                "      in_features: 8", "      out_features: $w"), 13,
         "nodes[1].args.out_features", "undefined parameter 'w' in '$w'; defined: d"),
    case("arg_nested_undefined", nodes("  - id: b", "    op: reshape", "    args:",
                                       "      shape:", "        - 2", "        - $w"), 14,
         "nodes[1].args.shape[1]", "undefined parameter 'w' in '$w'; defined: d"),
    case("arg_too_big", nodes("  - id: b", "    op: linear", "    args:",
                              "      in_features: 8", "      out_features: 101"), 13,
         "nodes[1].args.out_features", "101 is larger in magnitude than 100 (Limits.max_int)",
         Limits(max_int=100)),
    case("arg_too_small", nodes("  - id: b", "    op: linear", "    args:",
                                "      in_features: 8", "      out_features: -101"), 13,
         "nodes[1].args.out_features", "-101 is larger in magnitude than 100 (Limits.max_int)",
         Limits(max_int=100)),
    case("arg_infinite", nodes("  - id: b", "    op: linear", "    args:",
                               "      in_features: 8", "      out_features: .inf"), 13,
         "nodes[1].args.out_features", "inf is not a finite number"),
    case("module_int", nodes("  - id: b", "    inputs: [a]", "    module: 5"), 11,
         "nodes[1].module", "expected 'package.module:Name', got an integer (5)"),
    case("module_no_colon", nodes("  - id: b", "    inputs: [a]", "    module: no_such_pkg"),
         11, "nodes[1].module", "module 'no_such_pkg' is not of the form 'package.module:Name'"),
    case("module_bad_form", nodes("  - id: b", "    inputs: [a]", "    module: 'a b:C'"), 11,
         "nodes[1].module", "'a b:C' is not of the form 'package.module:Name'"),
    case("op_int", nodes("  - id: b", "    inputs: [a]", "    op: 5"), 11, "nodes[1].op",
         "expected an op name, got an integer (5)"),
    case("unknown_op", nodes("  - id: b", "    inputs: [a]", "    op: linearr"), 11,
         "nodes[1].op", f"unknown op 'linearr'; known ops: {ALL_OPS}"),
    case("unknown_arg_none_taken", nodes("  - id: b", "    op: relu", "    args:",
                                         "      inplace: true"), 12, "nodes[1].args.inplace",
         "op 'relu' has no argument 'inplace'; it takes no arguments"),
    case("unknown_arg", nodes("  - id: b", "    op: linear", "    args:", "      in_features: 8",
                              "      biass: false"), 13, "nodes[1].args.biass",
         "op 'linear' has no argument 'biass'; it takes bias, in_features, out_features"),
    case("missing_arg", nodes("  - id: b", "    op: linear", "    inputs: [a]", "    args:",
                              "      in_features: 8"), 12, "nodes[1].args.out_features",
         "op 'linear' needs argument 'out_features'"),
    case("missing_arg_no_args_key", nodes("  - id: b", "    inputs: [a]", "    op: linear"), 11,
         "nodes[1].args.in_features", "op 'linear' needs argument 'in_features'"),
    case("missing_arg_null_args", nodes("  - id: b", "    op: linear", "    inputs: [a]",
                                        "    args:"), 12, "nodes[1].args.in_features",
         "op 'linear' needs argument 'in_features'"),
    case("numeric_text", nodes("  - id: b", "    op: linear", "    inputs: [a]", "    args:",
                               "      out_features: 4", "      in_features: 1e11"), 14,
         "nodes[1].args.in_features",
         "argument 'in_features' is the text '1e11', not a number (YAML reads e-notation as a "
         "number only with a '.' and a signed exponent, 1.0e+11); write '${1e11}' or the "
         "digits"),
    case("numeric_text_underscores", nodes("  - id: b", "    op: linear", "    inputs: [a]",
                                           "    args:", "      out_features: 4",
                                           "      in_features: 1_000.5e3"), 14,
         "nodes[1].args.in_features",
         "argument 'in_features' is the text '1_000.5e3', not a number (YAML reads e-notation "
         "as a number only with a '.' and a signed exponent, 1.0e+11); write '${1000.5e3}' or "
         "the digits"),
    case("numeric_text_quoted", nodes("  - id: b", "    op: mlp", "    inputs: [a]", "    args:",
                                      "      d_model: 8", "      activation: '-12'"), 14,
         "nodes[1].args.activation",
         "argument 'activation' is the text '-12', not a number (YAML reads e-notation as a "
         "number only with a '.' and a signed exponent, 1.0e+11); write '${-12}' or the "
         "digits"),
    case("inputs_mapping", nodes("  - id: b", "    op: relu", "    inputs: {a: 1}"), 11,
         "nodes[1].inputs", "expected a list of tensor names, got a mapping ({'a': 1})"),
    case("inputs_null", nodes("  - id: b", "    op: relu", "    inputs:"), 11,
         "nodes[1].inputs", "expected a list of tensor names, got nothing (null) (None)"),
    case("input_not_name", nodes("  - id: b", "    op: add", "    inputs:", "      - a",
                                 "      - 5"), 13, "nodes[1].inputs[1]",
         "expected a tensor name, got an integer (5)"),
    case("in_outside_repeat", nodes("  - id: b", "    op: add", "    inputs:", "      - a",
                                    "      - $in"), 13, "nodes[1].inputs[1]",
         "'$in' is only meaningful inside a repeat block"),
    case("in_output_outside_repeat", nodes("  - id: b", "    op: add", "    inputs:",
                                           "      - a", "      - $in:0"), 13,
         "nodes[1].inputs[1]", "'$in' is only meaningful inside a repeat block"),
    case("duplicate_id", nodes("  - id: b", "    op: relu", "    inputs: [a]", "  - id: b",
                               "    op: relu", "    inputs: [a]"), 12, "nodes[2]",
         "duplicate id 'b' (already used by line 9)"),
    case("duplicate_of_first", nodes("  - {id: a, op: relu, inputs: [x]}"), 9, "nodes[1]",
         "duplicate id 'a' (already used by line 8)"),
    case("duplicate_of_input", nodes("  - id: x", "    op: relu", "    inputs: [a]"), 9,
         "nodes[1]", "duplicate id 'x' (already used by a graph input)"),
]


# --- repeat blocks (nodes[1], from line 9) --------------------------------------------------------

REPEATS = [
    case("repeat_unknown_key", nodes("  - repeat: 2", "    id: r", "    input: a", "    nodes:",
                                     "      - {id: f, op: relu, inputs: [$in]}",
                                     "    inputs: [a]"), 14, "nodes[1].inputs",
         f"unknown key 'inputs' in nodes[1]; expected one of {REPEAT_KEYS}"),
    case("repeat_missing_id", nodes("  - repeat: 2", "    nodes:",
                                    "      - {id: f, op: relu, inputs: [a]}"), 9, "nodes[1].id",
         "nodes[1] is missing required key 'id'"),
    case("repeat_missing_nodes", nodes("  - repeat: 2", "    id: r"), 9, "nodes[1].nodes",
         "nodes[1] is missing required key 'nodes'"),
    case("repeat_count_undefined", nodes("  - id: r", "    repeat: $n", "    input: a",
                                         "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "undefined parameter 'n' in '$n'; defined: d"),
    case("repeat_count_text", nodes("  - id: r", "    repeat: many", "    input: a",
                                    "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "expected a positive repeat count, got a string ('many')"),
    case("repeat_count_float", nodes("  - id: r", "    repeat: 1.5", "    input: a",
                                     "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "expected a positive repeat count, got a number (1.5)"),
    case("repeat_count_bool", nodes("  - id: r", "    repeat: true", "    input: a",
                                    "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "expected a positive repeat count, got a boolean (True)"),
    case("repeat_count_zero", nodes("  - id: r", "    repeat: 0", "    input: a", "    nodes:",
                                    "      - {id: f, op: relu, inputs: [$in]}"), 10,
         "nodes[1].repeat", "repeat count must be positive, got 0"),
    case("repeat_count_negative", nodes("  - id: r", "    repeat: -2", "    input: a",
                                        "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "repeat count must be positive, got -2"),
    case("repeat_count_zero_by_param", nodes("  - id: r", "    repeat: ${d - 8}",
                                             "    input: a", "    nodes:",
                                             "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "repeat count must be positive, got 0"),
    case("repeat_count_over_limit", nodes("  - id: r", "    repeat: 4", "    input: a",
                                          "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "repeat count 4 is more than 3 (Limits.max_repeat)",
         Limits(max_repeat=3)),
    case("repeat_count_too_big", nodes("  - id: r", "    repeat: 101", "    input: a",
                                       "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         10, "nodes[1].repeat", "101 is larger in magnitude than 100 (Limits.max_int)",
         Limits(max_int=100)),
    case("repeat_id_int", nodes("  - repeat: 2", "    input: a", "    id: 5", "    nodes:",
                                "      - {id: f, op: relu, inputs: [$in]}"), 11, "nodes[1].id",
         "expected a string id, got an integer (5)"),
    case("repeat_id_dot", nodes("  - repeat: 2", "    input: a", "    id: r.x", "    nodes:",
                                "      - {id: f, op: relu, inputs: [$in]}"), 11, "nodes[1].id",
         "repeat id 'r.x' is not an identifier"),
    case("repeat_body_mapping", nodes("  - repeat: 2", "    id: r", "    nodes: {f: 1}"), 11,
         "nodes[1].nodes", "expected a list of nodes, got a mapping ({'f': 1})"),
    case("repeat_body_empty", nodes("  - repeat: 2", "    id: r", "    nodes: []"), 11,
         "nodes[1].nodes", "a repeat block needs at least one node"),
    # 1 node before + 2 x 3 = 7 > 5, refused before unrolling, at the repeat count
    case("repeat_graph_too_big", nodes("  - id: r", "    repeat: 2", "    input: a",
                                       "    nodes:", "      - {id: f, op: relu, inputs: [$in]}",
                                       "      - {id: g, op: relu, inputs: [f]}",
                                       "      - {id: h, op: relu, inputs: [g]}"), 10,
         "nodes[1].repeat", "2 x 3 nodes would make the graph larger than 5 nodes "
         "(Limits.max_nodes)", Limits(max_nodes=5)),
    # the nodes before the block count: 2 + 2 x 2 = 6 > 5
    case("repeat_graph_too_big_earlier", nodes("  - {id: b, op: relu, inputs: [a]}",
                                               "  - id: r", "    repeat: 2", "    input: a",
                                               "    nodes:",
                                               "      - {id: f, op: relu, inputs: [$in]}",
                                               "      - {id: g, op: relu, inputs: [f]}"), 11,
         "nodes[2].repeat", "2 x 2 nodes would make the graph larger than 5 nodes "
         "(Limits.max_nodes)", Limits(max_nodes=5)),
    case("repeat_body_item", nodes("  - repeat: 2", "    id: r", "    input: a", "    nodes:",
                                   "      - {id: f, op: relu, inputs: [$in]}", "      - 5"), 14,
         "nodes[1].nodes[1]", "expected a node mapping, got an integer (5)"),
    case("repeat_nested", nodes("  - repeat: 2", "    id: r", "    input: a", "    nodes:",
                                "      - {id: f, op: relu, inputs: [$in]}",
                                "      - {repeat: 2, id: q, nodes: [{id: g, op: relu}]}"), 14,
         "nodes[1].nodes[1]", "nested repeat blocks are not supported; flatten the inner one"),
    case("repeat_bad_output", nodes("  - repeat: 2", "    id: r", "    input: a", "    nodes:",
                                    "      - {id: f, op: relu, inputs: [$in]}",
                                    "    output: zz"), 14, "nodes[1].output",
         "repeat output 'zz' is not a node of the block"),
    case("repeat_input_int", nodes("  - repeat: 2", "    id: r", "    input: 5", "    nodes:",
                                   "      - {id: f, op: relu, inputs: [$in]}"), 11,
         "nodes[1].input", "expected a tensor name, got an integer (5)"),
    case("repeat_body_unknown_key", nodes("  - repeat: 2", "    id: r", "    input: a",
                                          "    nodes:", "      - id: f", "        op: relu",
                                          "        input: [$in]"), 15,
         "nodes[1].nodes[0].input",
         f"unknown key 'input' in nodes[1].nodes[0]; expected one of {NODE_KEYS}"),
    case("repeat_in_without_input", nodes("  - repeat: 2", "    id: r", "    nodes:",
                                          "      - id: f", "        op: relu",
                                          "        inputs: [$in]"), 14,
         "nodes[1].nodes[0].inputs[0]", "'$in' is only meaningful inside a repeat block"),
    case("repeat_body_undefined", nodes("  - repeat: 2", "    id: r", "    input: a",
                                        "    nodes:", "      - id: f", "        op: linear",
                                        "        inputs: [$in]", "        args:",
                                        "          in_features: 8",
                                        "          out_features: $w"), 18,
         "nodes[1].nodes[0].args.out_features",
         "undefined parameter 'w' in '$w'; defined: d, i"),
    case("repeat_body_division_by_zero", nodes("  - repeat: 2", "    id: r", "    input: a",
                                               "    nodes:", "      - id: f",
                                               "        op: linear", "        inputs: [$in]",
                                               "        args:", "          in_features: 8",
                                               "          out_features: ${8 // i}"), 18,
         "nodes[1].nodes[0].args.out_features",
         "cannot evaluate '${8 // i}': division by zero"),
    case("repeat_duplicate_block", nodes("  - repeat: 1", "    id: r", "    input: a",
                                         "    nodes:", "      - {id: f, op: relu, inputs: [$in]}",
                                         "  - repeat: 1", "    id: r", "    input: a",
                                         "    nodes:", "      - {id: f, op: relu, inputs: [$in]}"),
         15, "nodes[2].id", "duplicate id 'r' (already used by line 10)"),
    case("repeat_duplicate_in_body", nodes("  - repeat: 1", "    id: r", "    input: a",
                                           "    nodes:", "      - {id: f, op: relu, inputs: [$in]}",
                                           "      - {id: f, op: relu, inputs: [$in]}"), 14,
         "nodes[1].nodes[1]", "duplicate id 'r.0.f' (already used by line 13)"),
]


# --- $param substitution --------------------------------------------------------------------------

def arg(value: str) -> str:
    """nodes[1] is a linear node whose out_features (line 13) is ``value``."""
    return nodes("  - id: b", "    op: linear", "    args:", "      in_features: 8",
                 f"      out_features: {value}", "    inputs: [a]")


LONG_60 = "${d + d + d + d + d + d + d + d + d + d + d + d + d + d + z}"     # 60 characters
LONG_61 = "${d + d + d + d + d + d + d + d + d + d + d + d + d + d + zz}"    # 61 characters
LONG_61_SHOWN = "${d + d + d + d + d + d + d + d + d + d + d + d + d + d +..."  # 57 + '...'

SUBST = [
    case("undefined_braces", arg("'${w * 2}'"), 13, "nodes[1].args.out_features",
         "undefined parameter 'w' in '${w * 2}'; defined: d"),
    case("division_by_zero", arg("'${d // 0}'"), 13, "nodes[1].args.out_features",
         "cannot evaluate '${d // 0}': division by zero"),
    case("arithmetic_on_text", arg("'${d * e}'").replace("  d: 8", "  d: 8\n  e: t"), 14,
         "nodes[1].args.out_features",
         "cannot evaluate '${d * e}': arithmetic needs numbers, got a string ('t')"),
    case("expression_result_too_big", arg("'${d * 100}'"), 13, "nodes[1].args.out_features",
         "cannot evaluate '${d * 100}': 800 is larger in magnitude than 100 (Limits.max_int)",
         Limits(max_int=100)),
    case("expression_too_long", arg("'${d+d+d+d+d+d}'"), 13, "nodes[1].args.out_features",
         "cannot evaluate '${d+d+d+d+d+d}': the expression is 11 characters long, more than 10 "
         "(Limits.max_expression_chars)", Limits(max_expression_chars=10)),
    case("expression_60_chars_shown_whole", arg(f"'{LONG_60}'"), 13,
         "nodes[1].args.out_features", f"undefined parameter 'z' in '{LONG_60}'; defined: d"),
    case("expression_61_chars_cut", arg(f"'{LONG_61}'"), 13, "nodes[1].args.out_features",
         f"undefined parameter 'zz' in '{LONG_61_SHOWN}'; defined: d"),
]


@pytest.mark.parametrize("src,line,key,message,limits",
                         TOP + INPUTS + OUTPUTS + NODES + REPEATS + SUBST)
def test_refusal_names_file_line_key_and_message(src, line, key, message, limits):
    check(refused(src, limits=limits), line, key, message)


def test_long_expression_texts_are_as_long_as_claimed():
    assert (len(LONG_60), len(LONG_61), len(LONG_61_SHOWN)) == (60, 61, 60)


# --- source: specs (captured torch models) --------------------------------------------------------

SOURCE_HEAD = (
    "name: cap",                               # 1
    "params:",                                 # 2
    "  h: 4",                                  # 3
    "source:",                                 # 4
)


def source(*lines: str) -> str:
    return text(*SOURCE_HEAD, *lines)


GOOD_EXAMPLES = ("  example_inputs:", "    x: {shape: [batch, $h]}")   # lines 5, 6
TORCH = "  torch: mypkg.models:make"

SOURCES = [
    case("source_int", text("name: cap", "source: 5"), 2, "source",
         "expected a mapping with 'torch', got an integer (5)"),
    case("source_unknown_key", source(*GOOD_EXAMPLES, TORCH, "  model: m"), 8, "source.model",
         "unknown key 'model' in source; expected one of example_inputs, kwargs, torch"),
    case("source_missing_torch", source(*GOOD_EXAMPLES, "  kwargs: {}"), 5, "source.torch",
         "source is missing required key 'torch'"),
    case("source_missing_examples", source("  kwargs: {}", TORCH), 5, "source.example_inputs",
         "source is missing required key 'example_inputs'"),
    case("torch_int", source(*GOOD_EXAMPLES, "  torch: 5"), 7, "source.torch",
         "expected 'package.module:factory', got an integer (5)"),
    case("torch_no_colon", source(*GOOD_EXAMPLES, "  torch: mypkg.make"), 7, "source.torch",
         "'mypkg.make' is not of the form 'package.module:factory'"),
    case("torch_bad_form", source(*GOOD_EXAMPLES, "  torch: 'my pkg:make'"), 7, "source.torch",
         "'my pkg:make' is not of the form 'package.module:Name'"),
    case("kwargs_list", source(*GOOD_EXAMPLES, TORCH, "  kwargs: [1, 2]"), 8, "source.kwargs",
         "expected a mapping of keyword arguments, got a list ([1, 2])"),
    case("kwargs_undefined", source(*GOOD_EXAMPLES, TORCH, "  kwargs: $nope"), 8,
         "source.kwargs", "undefined parameter 'nope' in '$nope'; defined: h"),
    case("kwargs_too_big", source(*GOOD_EXAMPLES, TORCH, "  kwargs: 101"), 8, "source.kwargs",
         "101 is larger in magnitude than 100 (Limits.max_int)", Limits(max_int=100)),
    case("kwarg_undefined", source(*GOOD_EXAMPLES, TORCH, "  kwargs:", "    a: 1",
                                   "    hidden: $nope"), 10, "source.kwargs.hidden",
         "undefined parameter 'nope' in '$nope'; defined: h"),
    case("kwarg_too_big", source(*GOOD_EXAMPLES, TORCH, "  kwargs:", "    a: 1",
                                 "    hidden: 101"), 10, "source.kwargs.hidden",
         "101 is larger in magnitude than 100 (Limits.max_int)", Limits(max_int=100)),
    case("examples_list", source("  kwargs: {}", TORCH, "  example_inputs: [x]"), 7,
         "source.example_inputs",
         "expected a mapping of input names to {shape, dtype}, got a list (['x'])"),
    case("example_not_mapping", source(*GOOD_EXAMPLES, "    y: 5", TORCH), 7,
         "source.example_inputs.y",
         "expected a mapping with 'shape' and 'dtype', got an integer (5)"),
    case("example_unknown_key", source(*GOOD_EXAMPLES, "    y:", "      shape: [2]",
                                       "      dtyp: int64", TORCH), 9,
         "source.example_inputs.y.dtyp",
         "unknown key 'dtyp' in source.example_inputs.y; expected one of dtype, high, shape"),
    case("example_missing_shape", source(*GOOD_EXAMPLES, "    y:", "      dtype: int64", TORCH),
         8, "source.example_inputs.y.shape",
         "source.example_inputs.y is missing required key 'shape'"),
    case("example_shape_undefined", source(*GOOD_EXAMPLES, "    y:", "      shape:",
                                           "        - 2", "        - $w", TORCH), 10,
         "source.example_inputs.y.shape[1]", "undefined parameter 'w' in '$w'; defined: h"),
    case("example_shape_zero", source(*GOOD_EXAMPLES, "    y:", "      shape:", "        - 2",
                                      "        - 0", TORCH), 10, "source.example_inputs.y.shape",
         "bad shape: dim 1 must be a positive int or a dim name, got an integer (0)"),
    case("example_dtype", source(*GOOD_EXAMPLES, "    y:", "      shape: [2]",
                                 "      dtype: float8", TORCH), 9,
         "source.example_inputs.y.dtype",
         f"unknown dtype 'float8'; expected one of {ALL_DTYPES}"),
    case("example_high_zero", source(*GOOD_EXAMPLES, "    y:", "      shape: [2]",
                                     "      high: 0", TORCH), 9, "source.example_inputs.y.high",
         "high (the exclusive bound of random integer inputs) must be positive, got 0"),
]


@pytest.mark.parametrize("src,line,key,message,limits", SOURCES)
def test_source_refusal_names_file_line_key_and_message(src, line, key, message, limits):
    check(refused(src, limits=limits, trust=True), line, key, message)


def test_untrusted_source_factory_is_a_trust_error_at_its_line(tmp_path):
    e = refused(source(*GOOD_EXAMPLES, TORCH), kind=TrustError)
    check(e, 7, "source.torch",
          "'mypkg.models:make' is Python code, which a spec may run only when trusted: pass "
          "--trust-code (CLI) or trust_code=True (Python) if you trust this file, or list "
          f"'mypkg' under trusted_modules in {tmp_path / 'no-trust.yaml'}")


def test_untrusted_module_node_is_a_trust_error_at_its_line(tmp_path):
    e = refused(nodes("  - id: b", "    inputs: [a]", "    module: mypkg.layers:Block"),
                kind=TrustError)
    check(e, 11, "nodes[1].module",
          "'mypkg.layers:Block' is Python code, which a spec may run only when trusted: pass "
          "--trust-code (CLI) or trust_code=True (Python) if you trust this file, or list "
          f"'mypkg' under trusted_modules in {tmp_path / 'no-trust.yaml'}")


def test_untrusted_module_in_a_repeat_names_the_body_node(tmp_path):
    e = refused(nodes("  - repeat: 2", "    id: r", "    input: a", "    nodes:",
                      "      - id: f", "        inputs: [$in]",
                      "        module: mypkg.layers:Block"), kind=TrustError)
    check(e, 15, "nodes[1].nodes[0].module",
          "'mypkg.layers:Block' is Python code, which a spec may run only when trusted: pass "
          "--trust-code (CLI) or trust_code=True (Python) if you trust this file, or list "
          f"'mypkg' under trusted_modules in {tmp_path / 'no-trust.yaml'}")


def test_a_trust_file_prefix_trusts_the_factory_without_trust_code(tmp_path, monkeypatch):
    trust = tmp_path / "trust.yaml"
    trust.write_text("trusted_modules: [mypkg]\n")
    monkeypatch.setenv("FASTSERVE_TRUST_FILE", str(trust))
    spec = parse_spec(source(*GOOD_EXAMPLES, TORCH), file=F)
    assert spec.source == SourceSpec("mypkg.models:make", {},
                                     {"x": {"shape": ["batch", 4], "dtype": "float32",
                                            "high": None}})


def test_source_spec_fields_exactly():
    spec = parse_spec(source(
        "  example_inputs:",                                   # 5
        "    x: {shape: [batch, $h]}",                         # 6
        "    ids: {shape: ['${h * 2}'], dtype: int64, high: $h}",  # 7
        "  kwargs:",                                           # 8
        "    hidden: $h",                                      # 9
        "    sizes: [1, 2]",                                   # 10
        "    name: m",                                         # 11
        TORCH), file=F, trust_code=True)
    assert spec == GraphSpec(
        name="cap", inputs=(), nodes=(), outputs=(), dims={}, weights=WeightsSpec(0, None),
        source=SourceSpec("mypkg.models:make", {"hidden": 4, "sizes": [1, 2], "name": "m"},
                          {"x": {"shape": ["batch", 4], "dtype": "float32", "high": None},
                           "ids": {"shape": [8], "dtype": "int64", "high": 4}}),
        file=F, output_lines=())
    # plain values, not the loader's line-tracking types
    assert type(spec.source.kwargs) is dict and type(spec.source.kwargs["sizes"]) is list
    assert type(spec.source.example_inputs["x"]["shape"]) is list


@pytest.mark.parametrize("kwargs_line", [None, "  kwargs:", "  kwargs: {}"])
def test_source_without_kwargs_has_empty_kwargs(kwargs_line):
    lines = (*GOOD_EXAMPLES, TORCH) + ((kwargs_line,) if kwargs_line else ())
    spec = parse_spec(source(*lines), file=F, trust_code=True)
    assert spec.source == SourceSpec("mypkg.models:make", {},
                                     {"x": {"shape": ["batch", 4], "dtype": "float32",
                                            "high": None}})


def test_source_kwargs_share_one_copy_of_a_parameter():
    src = text("name: cap", "params:", "  p: [1, 2, 3]", "source:", *GOOD_EXAMPLES[:1],
               "    x: {shape: [2]}", TORCH, "  kwargs: {a: $p, b: $p}")
    kw = parse_spec(src, file=F, trust_code=True).source.kwargs
    assert kw == {"a": [1, 2, 3], "b": [1, 2, 3]}
    assert kw["a"] is kw["b"] and type(kw["a"]) is list


def test_source_specs_ignore_dims_but_keep_weights_and_dims():
    spec = parse_spec(text("name: cap.v2", "dims: {seq: 3}", "weights: {checkpoint: m.pt}",
                           "source:", *GOOD_EXAMPLES[:1], "    x: {shape: [seq]}", TORCH),
                      file=F, trust_code=True)
    assert (spec.name, spec.dims, spec.weights) == ("cap.v2", {"seq": 3}, WeightsSpec(0, "m.pt"))
    assert spec.source.example_inputs == {"x": {"shape": ["seq"], "dtype": "float32",
                                                "high": None}}


def test_source_code_is_checked_once(monkeypatch):
    """The trust check runs once per code target, however often a repeat body names it."""
    calls = []
    real = loader.check_code

    def spy(target, **kw):
        calls.append((target, kw["line"], kw["key"]))
        return real(target, **kw)

    monkeypatch.setattr(loader, "check_code", spy)
    spec = parse_spec(nodes("  - repeat: 3", "    id: r", "    input: a", "    nodes:",
                            "      - {id: f, inputs: [$in], module: 'mypkg.layers:Block'}",
                            "      - {id: g, inputs: [f], module: 'mypkg.layers:Other'}",
                            "      - {id: h, inputs: [g], module: 'mypkg.layers:Block'}"),
                      file=F, trust_code=True)
    assert calls == [("mypkg.layers:Block", 13, "nodes[1].nodes[0].module"),
                     ("mypkg.layers:Other", 14, "nodes[1].nodes[1].module")]
    assert [n.id for n in spec.nodes] == ["a", "r.0.f", "r.0.g", "r.0.h", "r.1.f", "r.1.g",
                                          "r.1.h", "r.2.f", "r.2.g", "r.2.h"]
    assert spec.nodes[1] == NodeSpec("r.0.f", "module",
                                     {"target": "mypkg.layers:Block", "kwargs": {}},
                                     ("a",), 0, "r", 13)


def test_only_digits_after_a_colon_name_an_output():
    """``r:0`` is output 0 of block r's last node; ``r:x`` and ``$in:x`` are names, kept as
    written."""
    spec = parse_spec(nodes("  - repeat: 1", "    id: r", "    input: a", "    nodes:",
                            "      - {id: f, op: add, inputs: ['$in:0', '$in:x']}",
                            "  - {id: o, op: add, inputs: ['r:1', 'r:x']}",
                            outputs="outputs: ['r:x', 'r:0']"), file=F)
    assert [n.inputs for n in spec.nodes[1:]] == [("a:0", "$in:x"), ("r.0:1", "r:x")]
    assert spec.outputs == ("r:x", "r.0:0")


@pytest.mark.parametrize("value", ["'$dd}'", "'${d'"])
def test_a_half_braced_expression_is_refused(value):
    e = refused(arg(value).replace("  d: 8", "  d: 8\n  dd: 1"))
    assert (e.line, e.key) == (14, "nodes[1].args.out_features")
    assert e.reason.startswith(f"cannot evaluate {value}: invalid syntax ("), e.reason


# --- Limits.max_yaml_nodes and Limits.max_depth through parameters ---------------------------------

# a: 3 values, b: 1 + 3 x 3 = 10, c: 1 + 3 x 10 = 31; {sizes: $c} is 32 values
DOUBLING = ("name: t",                       # 1
            "params:",                       # 2
            "  a: [1, 2]",                   # 3
            "  b: [$a, $a, $a]",             # 4
            "  c: [$b, $b, $b]")             # 5
SPLIT_X = ("inputs:",                        # 6
           "  x:",                           # 7
           "    shape: [batch, 8]",          # 8
           "nodes:",                         # 9
           "  - id: p",                      # 10
           "    op: split",                  # 11
           "    inputs: [x]",                # 12
           "    args: {sizes: $c}")          # 13


def test_node_arguments_at_the_values_bound_are_accepted():
    src = text(*DOUBLING, *SPLIT_X, "  - id: q", "    op: split", "    inputs: [x]",
               "    args:", "      sizes: $c", "outputs: [p]")
    spec = parse_spec(src, file=F, limits=Limits(max_yaml_nodes=64))  # 32 + 32
    p, q = spec.nodes
    assert p.args == q.args == {"sizes": [[[1, 2]] * 3] * 3}
    assert p.args["sizes"] is q.args["sizes"]  # one plain copy of $c, shared


def test_node_arguments_beyond_the_values_bound():
    src = text(*DOUBLING, *SPLIT_X, "  - id: q", "    op: split", "    inputs: [x]",
               "    args:", "      sizes: $c", "outputs: [p]")
    check(refused(src, limits=Limits(max_yaml_nodes=63)), 17, "nodes[1].args",
          "the arguments of all nodes expand to more than 63 values (Limits.max_yaml_nodes)")


def test_one_node_argument_beyond_the_values_bound():
    src = text(*DOUBLING, *SPLIT_X, "  - id: q", "    op: split", "    inputs: [x]",
               "    args:", "      sizes: [$c, $c]", "outputs: [p]")  # 1 + 1 + 62 = 64
    check(refused(src, limits=Limits(max_yaml_nodes=63)), 17, "nodes[1].args",
          "expands to more than 63 values (Limits.max_yaml_nodes); are parameters ($name) "
          "repeating each other?")


def test_a_parameter_beyond_the_values_bound():
    src = text(*DOUBLING, "  e: 1", "  d: [$c, $c]", "inputs: 1", "nodes: 1", "outputs: 1")
    check(refused(src, limits=Limits(max_yaml_nodes=62)), 7, "params.d",
          "expands to more than 62 values (Limits.max_yaml_nodes); are parameters ($name) "
          "repeating each other?")


def test_a_parameter_at_the_values_bound_is_accepted():
    src = text(*DOUBLING, "  e: 1", "  d: [$c, $c]", "inputs:", "  x: {shape: [2]}",
               "nodes:", "  - {id: a, op: relu, inputs: [x]}", "outputs: a")
    spec = parse_spec(src, file=F, limits=Limits(max_yaml_nodes=63))
    assert [n.id for n in spec.nodes] == ["a"]


def test_source_kwargs_beyond_the_values_bound():
    src = text(*DOUBLING, "source:", *GOOD_EXAMPLES[:1], "    x: {shape: [2]}",
               "  kwargs: {p: $c, q: $c}", TORCH)  # 1 + 31 + 31 = 63
    check(refused(src, trust=True, limits=Limits(max_yaml_nodes=62)), 9, "source.kwargs",
          "expands to more than 62 values (Limits.max_yaml_nodes); are parameters ($name) "
          "repeating each other?")
    spec = parse_spec(src, file=F, trust_code=True, limits=Limits(max_yaml_nodes=63))
    assert spec.source.kwargs == {"p": [[[1, 2]] * 3] * 3, "q": [[[1, 2]] * 3] * 3}


# a: depth 2, b: 4, c: 6; the file itself nests 5 deep
NESTING = ("name: t",            # 1
           "params:",            # 2
           "  a: [[1]]",         # 3
           "  b: [[$a]]")        # 4


def test_a_parameter_nested_beyond_the_depth_bound():
    src = text(*NESTING, "  c: [[$b]]", "inputs: 1", "nodes: 1", "outputs: 1")
    check(refused(src, limits=Limits(max_depth=5)), 5, "params.c",
          "nested more than 5 levels deep (Limits.max_depth)")


def test_node_arguments_nested_beyond_the_depth_bound():
    # c: depth 6; {sizes: $c} is 7 deep and {sizes: [$c]} 8, while the file nests 6 deep
    src = text(*NESTING, "  c: [[$b]]", "inputs:", "  x: {shape: [2]}", "nodes:",
               "  - {id: a, op: split, inputs: [x], args: {sizes: [1]}}",
               "  - id: q", "    op: split", "    inputs: [x]", "    args: {sizes: [$c]}",
               "outputs: [a]")
    check(refused(src, limits=Limits(max_depth=6)), 13, "nodes[1].args",
          "nested more than 6 levels deep (Limits.max_depth)")


def test_node_arguments_at_the_depth_bound_are_accepted():
    src = text(*NESTING, "inputs:", "  x: {shape: [2]}", "nodes:",
               "  - {id: a, op: split, inputs: [x], args: {sizes: $b}}", "outputs: [a]")
    spec = parse_spec(src, file=F, limits=Limits(max_depth=5))  # 1 + 4
    assert spec.nodes[0].args == {"sizes": [[[[1]]]]}


def test_source_kwargs_nested_beyond_the_depth_bound():
    src = text(*NESTING, "  c: [[$b]]", "source:", "  example_inputs: {x: {shape: [2]}}",
               TORCH, "  kwargs: {k: $c}")  # 1 + 6 deep, the file 6
    check(refused(src, trust=True, limits=Limits(max_depth=6)), 9, "source.kwargs",
          "nested more than 6 levels deep (Limits.max_depth)")


# --- accepted edge cases, pinned whole -------------------------------------------------------------

def test_a_whole_spec_exactly():
    spec = parse_spec(text(
        "name: t",                                         # 1
        "description: a test",                             # 2
        "params:",                                         # 3
        "  d: 8",                                          # 4
        "  d2: ${d * 2}",                                  # 5  an earlier parameter
        "  n: $d2",                                        # 6
        "dims: {seq: 1, hid: $d}",                         # 7
        "weights: {seed: 0}",                              # 8
        "inputs:",                                         # 9
        "  x:",                                            # 10
        "    shape: [batch, seq, $d]",                     # 11
        "  ids: {shape: [2], dtype: int64, high: 1}",      # 12
        "nodes:",                                          # 13
        "  - {id: a, op: relu, inputs: x}",                # 14
        "  - inputs: [a, 'x:0']",                          # 15
        "    op: add",                                     # 16
        "    id: b-2",                                     # 17
        "  - id: _c",                                      # 18
        "    op: linear",                                  # 19
        "    args: {in_features: $d, out_features: $n, bias: false}",  # 20
        "    inputs: [b-2]",                               # 21
        "  - id: m",                                       # 22
        "    op: mlp",                                     # 23
        "    args: {d_model: 8, activation: $in}",         # 24 '$in' stays text in args
        "    inputs: [_c]",                                # 25
        "outputs:",                                        # 26
        "  - m",                                           # 27
        "  - '_c:0'"),                                     # 28
        file=F)
    assert spec == GraphSpec(
        name="t",
        inputs=(InputSpec("x", ("batch", "seq", 8), "float32", None, 11),
                InputSpec("ids", (2,), "int64", 1, 12)),
        nodes=(NodeSpec("a", "relu", {}, ("x",), None, None, 14),
               NodeSpec("b-2", "add", {}, ("a", "x:0"), None, None, 17),
               NodeSpec("_c", "linear", {"in_features": 8, "out_features": 16, "bias": False},
                        ("b-2",), None, None, 18),
               NodeSpec("m", "mlp", {"d_model": 8, "activation": "$in"}, ("_c",), None, None,
                        22)),
        outputs=("m", "_c:0"), dims={"seq": 1, "hid": 8}, weights=WeightsSpec(0, None),
        source=None, file=F, output_lines=(27, 28))
    assert type(spec.nodes[2].args) is dict


def test_repeat_once_names_its_node_after_the_block():
    spec = parse_spec(nodes("  - repeat: 1", "    id: r", "    input: a", "    nodes:",
                            "      - {id: f, op: linear, inputs: [$in],",
                            "         args: {in_features: $d, out_features: '${d + i}'}}",
                            "  - {id: o, op: relu, inputs: [r]}",
                            outputs="outputs: r"), file=F)
    assert spec.nodes[1:] == (
        NodeSpec("r.0", "linear", {"in_features": 8, "out_features": 8}, ("a",), 0, "r", 13),
        NodeSpec("o", "relu", {}, ("r.0",), None, None, 15))
    assert (spec.outputs, spec.output_lines) == (("r.0",), (16,))


def test_repeat_unrolls_chains_and_aliases():
    spec = parse_spec(nodes(
        "  - repeat: 2",                                        # 9
        "    id: r",                                            # 10
        "    input: a",                                         # 11
        "    nodes:",                                           # 12
        "      - {id: f, op: linear, inputs: [$in], args: {in_features: 8, out_features: $i}}",
        "      - {id: g, op: add, inputs: [f, $in]}",           # 14
        "  - repeat: 3",                                        # 15
        "    id: s",                                            # 16
        "    input: r",                                         # 17 the block's last output
        "    output: u",                                        # 18
        "    nodes:",                                           # 19
        "      - {id: u, op: relu, inputs: ['$in:0']}",         # 20
        "      - {id: v, op: relu, inputs: [u]}",               # 21
        "  - {id: o, op: add, inputs: [s, 'r:0', 'x:1']}",      # 22
        outputs="outputs: [o, s, 's:1']"), file=F, limits=Limits(max_repeat=3, max_nodes=12))
    assert spec.nodes[1:] == (
        NodeSpec("r.0.f", "linear", {"in_features": 8, "out_features": 0}, ("a",), 0, "r", 13),
        NodeSpec("r.0.g", "add", {}, ("r.0.f", "a"), 0, "r", 14),
        NodeSpec("r.1.f", "linear", {"in_features": 8, "out_features": 1}, ("r.0.g",), 1, "r",
                 13),
        NodeSpec("r.1.g", "add", {}, ("r.1.f", "r.0.g"), 1, "r", 14),
        NodeSpec("s.0.u", "relu", {}, ("r.1.g:0",), 0, "s", 20),
        NodeSpec("s.0.v", "relu", {}, ("s.0.u",), 0, "s", 21),
        NodeSpec("s.1.u", "relu", {}, ("s.0.u:0",), 1, "s", 20),
        NodeSpec("s.1.v", "relu", {}, ("s.1.u",), 1, "s", 21),
        NodeSpec("s.2.u", "relu", {}, ("s.1.u:0",), 2, "s", 20),
        NodeSpec("s.2.v", "relu", {}, ("s.2.u",), 2, "s", 21),
        NodeSpec("o", "add", {}, ("s.2.u", "r.1.g:0", "x:1"), None, None, 22))
    assert spec.outputs == ("o", "s.2.u", "s.2.u:1")
    assert spec.output_lines == (23, 23, 23)


def test_repeat_at_the_count_and_size_limits_is_accepted():
    # 1 node before + 3 x 1 = 4 = max_nodes; repeat 3 = max_repeat
    spec = parse_spec(nodes("  - id: r", "    repeat: 3", "    input: a", "    nodes:",
                            "      - {id: f, op: relu, inputs: [$in]}"), file=F,
                      limits=Limits(max_repeat=3, max_nodes=4))
    assert [(n.id, n.inputs) for n in spec.nodes] == [
        ("a", ("x",)), ("r.0", ("a",)), ("r.1", ("r.0",)), ("r.2", ("r.1",))]


def test_sizes_of_one_are_accepted():
    spec = parse_spec(text("name: t", "dims: {seq: 1}", "inputs:",
                           "  x: {shape: [1, seq], dtype: int64, high: 1}", "nodes:",
                           "  - {id: a, op: relu, inputs: [x]}", "outputs: a"), file=F)
    assert spec.inputs == (InputSpec("x", (1, "seq"), "int64", 1, 4),)
    assert spec.dims == {"seq": 1}


def test_node_count_at_the_limit_is_accepted():
    spec = parse_spec(nodes("  - {id: b, op: relu, inputs: [a]}"), file=F,
                      limits=Limits(max_nodes=2))
    assert [n.id for n in spec.nodes] == ["a", "b"]


def test_numbers_at_max_int_are_accepted():
    spec = parse_spec(text("name: t", "params: {p: -100}", "dims: {seq: 100}",
                           "weights: {seed: 100}", "inputs:",
                           "  x: {shape: [100], high: 100}", "nodes:",
                           "  - {id: a, op: linear, inputs: [x],",
                           "     args: {in_features: 100, out_features: '${10 * 10}'}}",
                           "outputs: a"), file=F, limits=Limits(max_int=100))
    assert spec.dims == {"seq": 100} and spec.weights == WeightsSpec(100, None)
    assert spec.inputs == (InputSpec("x", (100,), "float32", 100, 6),)
    assert spec.nodes[0].args == {"in_features": 100, "out_features": 100}
    assert spec.output_lines == (10,)


def test_expression_at_its_length_limit_is_accepted():
    spec = parse_spec(arg("'${d+d+d+d+dd}'").replace("  d: 8", "  d: 8\n  dd: 1"), file=F,
                      limits=Limits(max_expression_chars=10))
    assert spec.nodes[1].args == {"in_features": 8, "out_features": 33}


@pytest.mark.parametrize("value,expected", [("$d", 8), ("'${d}'", 8), ("'${d * 2}'", 16),
                                            ("'${ d - 1 }'", 7), ("'${-d + 9}'", 1)])
def test_substitution_values(value, expected):
    spec = parse_spec(arg(value), file=F)
    assert spec.nodes[1].args == {"in_features": 8, "out_features": expected}


@pytest.mark.parametrize("weights,expected", [
    ("weights: {seed: 0}", WeightsSpec(0, None)),
    ("weights: {seed: 7}", WeightsSpec(7, None)),
    ("weights: {}", WeightsSpec(0, None)),
    ("weights:", WeightsSpec(0, None)),
    ("weights: {checkpoint: w.safetensors}", WeightsSpec(0, "w.safetensors")),
    ("weights: {checkpoint: dir/w.pt, seed: 3}", WeightsSpec(3, "dir/w.pt")),
    ("weights: {checkpoint: w.pth}", WeightsSpec(0, "w.pth")),
    ("weights: {checkpoint: w.bin}", WeightsSpec(0, "w.bin")),
    (f"weights: {{seed: {MAX_INT}}}", WeightsSpec(MAX_INT, None)),
])
def test_weights_accepted(weights, expected):
    spec = parse_spec(text(*HEAD, "outputs: a", weights), file=F)
    assert spec.weights == expected


@pytest.mark.parametrize("name", ["t", "gpt2.small", "my-net", "_x", "a.b.c"])
def test_graph_names_accepted(name):
    assert parse_spec(text(*HEAD[1:], "outputs: a", f"name: {name}"), file=F).name == name


def test_load_spec_names_the_path(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(text(*HEAD, "outputs: [a]", "weights: {seed: -1}"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    check(info.value, 10, "weights.seed", f"seed must be an integer from 0 to {MAX_INT}, got -1",
          file=str(path))
    path.write_text(text(*HEAD, "outputs: [a]"))
    assert load_spec(path, limits=Limits(max_file_bytes=113)).file == str(path)  # 113 bytes


def test_load_spec_refuses_a_missing_or_large_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    check(info.value, None, None, f"spec file '{tmp_path / 'nope.yaml'}' does not exist",
          file=None)
    path = tmp_path / "g.yaml"
    path.write_text(text(*HEAD, "outputs: [a]"))  # 113 bytes
    with pytest.raises(SpecError) as info:
        load_spec(path, limits=Limits(max_file_bytes=112))
    check(info.value, None, None, "spec file is larger than 112 bytes (Limits.max_file_bytes); "
          "is this the right file?", file=str(path))


def test_load_spec_passes_trust_and_limits(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(source(*GOOD_EXAMPLES, TORCH))
    assert load_spec(path, trust_code=True).source.factory == "mypkg.models:make"
    with pytest.raises(TrustError):
        load_spec(path)
    path.write_text(text(*HEAD, "outputs: [a]", "dims: {s: 101}"))
    with pytest.raises(SpecError) as info:
        load_spec(path, limits=Limits(max_int=100))
    check(info.value, 10, "dims.s", "101 is larger in magnitude than 100 (Limits.max_int)",
          file=str(path))


def test_errors_without_a_file_name_say_line():
    with pytest.raises(SpecError) as info:
        parse_spec(text("name: t", "nodez: []"))
    check(info.value, 2, "nodez", f"unknown key 'nodez' in spec; expected one of {TOP_KEYS}",
          file=None)


# --- spec_from_dict: the Python builder's path, no line numbers -------------------------------------

def doc(**over):
    base = {"name": "t", "inputs": {"x": {"shape": [2, 4]}},
            "nodes": [{"id": "a", "op": "relu", "inputs": ["x"]}], "outputs": ["a"]}
    return {**base, **over}


def refused_dict(d, limits=None, file=F) -> SpecError:
    with pytest.raises(SpecError) as info:
        spec_from_dict(d, file=file, limits=limits)
    assert type(info.value) is SpecError
    return info.value


@pytest.mark.parametrize("d,key,message", [
    (None, None, "a graph spec must be a mapping at the top level, got nothing (null) (None)"),
    ([1], None, "a graph spec must be a mapping at the top level, got a list ([1])"),
    (doc(nodes=[{"id": "a", "op": "relu", "inputs": ["x"]},
                {"id": "a", "op": "relu", "inputs": ["x"]}]), "nodes[1]",
     "duplicate id 'a' (already used by an earlier node)"),
    (doc(nodes=[{"id": "x", "op": "relu", "inputs": ["x"]}]), "nodes[0]",
     "duplicate id 'x' (already used by a graph input)"),
    (doc(name=None), "name", "expected a string, got nothing (null) (None)"),
    (doc(outputs=[]), "outputs", "a graph needs at least one output"),
])
def test_dict_refusals_have_no_line(d, key, message):
    check(refused_dict(d), None, key, message)


def test_dict_arguments_nested_beyond_the_depth_bound():
    d = doc(nodes=[{"id": "a", "op": "split", "inputs": ["x"],
                    "args": {"sizes": [[[[1]]]]}}])
    check(refused_dict(d, Limits(max_depth=3)), None, "nodes[0].args.sizes[0][0][0]",
          "nested more than 3 levels deep (Limits.max_depth)")
    spec = spec_from_dict(doc(nodes=[{"id": "a", "op": "split", "inputs": ["x"],
                                      "args": {"sizes": [[1]]}}]),
                          limits=Limits(max_depth=3))  # the innermost 1 is 3 deep
    assert spec.nodes[0].args == {"sizes": [[1]]}


def test_dict_parameters_nested_beyond_the_depth_bound():
    check(refused_dict(doc(params={"p": {"q": [[[1]]]}}), Limits(max_depth=3)), None,
          "params.p.q[0][0][0]", "nested more than 3 levels deep (Limits.max_depth)")


def test_dict_argument_values_at_and_beyond_the_bound():
    d = doc(params={"p": [1, 2, 3]},
            nodes=[{"id": "a", "op": "split", "inputs": ["x"], "args": {"sizes": "$p"}},
                   {"id": "b", "op": "split", "inputs": ["x"], "args": {"sizes": "$p"}}])
    assert len(spec_from_dict(d, limits=Limits(max_yaml_nodes=10)).nodes) == 2  # 5 + 5
    check(refused_dict(d, Limits(max_yaml_nodes=9)), None, "nodes[1].args",
          "the arguments of all nodes expand to more than 9 values (Limits.max_yaml_nodes)")


# --- bugs found while pinning the contract ----------------------------------------------------------

@pytest.mark.parametrize("trust_code", [False, True])
def test_op_module_is_refused_even_with_trust(trust_code):
    # `op: module` would reach the module op without the trust check that `module:` makes
    with pytest.raises(SpecError) as info:
        parse_spec(nodes("  - id: b", "    op: module", "    inputs: [a]",
                         "    args: {target: 'mypkg.layers:Block'}"), file=F,
                   trust_code=trust_code)
    assert str(info.value) == ("t.yaml:10, key 'nodes[1].op': a user module is named with "
                               "'module: package.module:Name', not with 'op: module'")


@pytest.mark.parametrize("rid, used_by", [("a", "line 8"), ("x", "a graph input")])
def test_repeat_id_may_not_shadow_a_node_or_input(rid, used_by):
    with pytest.raises(SpecError) as info:
        parse_spec(nodes("  - repeat: 2", f"    id: {rid}", "    input: a", "    nodes:",
                         "      - {id: f, op: relu, inputs: [$in]}",
                         "  - {id: o, op: add, inputs: [a, x]}"), file=F)
    assert str(info.value) == (f"t.yaml:10, key 'nodes[1].id': duplicate id '{rid}' (already "
                               f"used by {used_by})")


def test_a_node_may_not_take_a_repeat_blocks_id():
    with pytest.raises(SpecError) as info:
        parse_spec(nodes("  - repeat: 2", "    id: r", "    input: a", "    nodes:",
                         "      - {id: f, op: relu, inputs: [$in]}",
                         "  - {id: r, op: relu, inputs: [a]}"), file=F)
    assert str(info.value) == ("t.yaml:14, key 'nodes[2]': duplicate id 'r' (already used by "
                               "line 10)")


def test_parse_spec_reads_the_yaml_under_the_limits_it_is_given():
    # aliases and nesting are bounded while the YAML is read, before the spec is checked
    src = text(*HEAD, "outputs: [a]", "description: &d words", "weights: {seed: 3}",
               "dims: {k: 2}", "x1: *d", "x2: *d")
    with pytest.raises(SpecError) as info:
        parse_spec(src, file=F, limits=Limits(max_aliases=1))
    check(info.value, 14, None, "more than 1 YAML aliases (Limits.max_aliases)")
    deep = text(*HEAD, "outputs: [a]", "description: [[[[[x]]]]]")
    with pytest.raises(SpecError) as info:
        parse_spec(deep, file=F, limits=Limits(max_depth=5))
    assert "Limits.max_depth" in str(info.value) and info.value.line == 10
    assert parse_spec(deep.replace("[[[[[x]]]]]", "x"), file=F, limits=Limits(max_depth=5))


def test_parse_spec_and_spec_from_dict_run_no_code_unless_trusted():
    # the text and the builder's paths into the loader: untrusted unless said otherwise
    src = source(*GOOD_EXAMPLES, TORCH)
    with pytest.raises(TrustError):
        parse_spec(src, file=F)
    doc = yaml.safe_load(src)
    with pytest.raises(TrustError):
        spec_from_dict(doc, file=F)
    assert spec_from_dict(doc, file=F, trust_code=True).source.factory == "mypkg.models:make"
