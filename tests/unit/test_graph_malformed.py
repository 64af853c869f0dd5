"""The malformed-spec corpus: every error names the file, the line, the key and what was expected.

Each case is a complete spec file with one thing wrong; ``line`` is the 1-based line of the
offending key, ``key`` the dotted path reported, ``says`` a phrase the message must contain.
"""

from __future__ import annotations

import re
import textwrap

import pytest

from fastserve.cli.app import run_cli
from fastserve.errors import SpecError
from fastserve.graph import compile_graph, load_spec

GOOD_HEAD = """\
name: t
params: {d: 8}
inputs:
  x: {shape: [batch, $d], dtype: float32}
nodes:
"""
# line numbers below count from 1; node lines start at line 6
CASES = [
    # (case id, body after GOOD_HEAD or a whole file, line, key, phrase)
    ("unknown_op", "  - {id: a, op: linearr, inputs: [x]}\noutputs: [a]\n", 6, "nodes[0].op",
     "unknown op 'linearr'"),
    ("missing_input", "  - {id: a, op: relu, inputs: [y]}\noutputs: [a]\n", 6, "inputs",
     "reads 'y'"),
    ("forward_reference_cycle",
     "  - {id: a, op: add, inputs: [x, b]}\n  - {id: b, op: relu, inputs: [a]}\noutputs: [b]\n",
     6, "inputs", "reads 'b'"),
    ("self_loop", "  - {id: a, op: relu, inputs: [a]}\noutputs: [a]\n", 6, "inputs", "reads 'a'"),
    ("bad_shape",
     "  - {id: a, op: linear, args: {in_features: 9, out_features: 4}, inputs: [x]}\n"
     "outputs: [a]\n", 6, "inputs", "cannot take inputs of shape"),
    ("wrong_type_args", "  - {id: a, op: relu, args: [1, 2], inputs: [x]}\noutputs: [a]\n", 6,
     "nodes[0].args", "expected a mapping"),
    ("duplicate_id",
     "  - {id: a, op: relu, inputs: [x]}\n  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n",
     7, "nodes[1]", "duplicate id 'a'"),
    ("id_shadows_input", "  - {id: x, op: relu, inputs: [x]}\noutputs: [x]\n", 6, "nodes[0]",
     "duplicate id 'x'"),
    ("undefined_param",
     "  - {id: a, op: linear, args: {in_features: $d, out_features: $width}, inputs: [x]}\n"
     "outputs: [a]\n", 6, "nodes[0].args.out_features", "undefined parameter 'width'"),
    ("unknown_node_key", "  - {id: a, op: relu, input: [x]}\noutputs: [a]\n", 6,
     "nodes[0].input", "unknown key 'input'"),
    ("missing_required_arg",
     "  - {id: a, op: linear, args: {in_features: 8}, inputs: [x]}\noutputs: [a]\n", 6,
     "nodes[0].args.out_features", "needs argument 'out_features'"),
    ("unknown_arg", "  - {id: a, op: relu, args: {inplace: true}, inputs: [x]}\noutputs: [a]\n",
     6, "nodes[0].args.inplace", "has no argument 'inplace'"),
    ("op_and_module", "  - {id: a, op: relu, module: 'x.y:Z', inputs: [x]}\noutputs: [a]\n", 6,
     "nodes[0]", "exactly one of 'op' or 'module'"),
    ("bad_module_path", "  - {id: a, module: no_such_pkg_zz, inputs: [x]}\noutputs: [a]\n", 6,
     "nodes[0].module", "package.module:Name"),
    ("in_outside_repeat", "  - {id: a, op: relu, inputs: [$in]}\noutputs: [a]\n", 6,
     "nodes[0].inputs[0]", "only meaningful inside a repeat"),
    ("bad_repeat_count",
     "  - repeat: 0\n    id: r\n    nodes:\n      - {id: a, op: relu, inputs: [$in]}\n"
     "outputs: [r]\n", 6, "nodes[0].repeat", "repeat count must be positive"),
    ("repeat_count_not_int",
     "  - repeat: many\n    id: r\n    nodes:\n      - {id: a, op: relu, inputs: [x]}\n"
     "outputs: [r]\n", 6, "nodes[0].repeat", "expected a positive repeat count"),
    ("repeat_bad_output",
     "  - repeat: 2\n    id: r\n    input: x\n    output: zz\n    nodes:\n"
     "      - {id: a, op: relu, inputs: [$in]}\noutputs: [r]\n", 9, "nodes[0].output",
     "not a node of the block"),
    ("empty_nodes", "  []\noutputs: [a]\n", 5, "nodes", "at least one node"),
    ("bad_output_ref", "  - {id: a, op: relu, inputs: [x]}\noutputs: [b]\n", 7, "outputs[0]",
     "outputs[0] reads 'b'"),
    ("outputs_wrong_type", "  - {id: a, op: relu, inputs: [x]}\noutputs: {a: 1}\n", 7,
     "outputs", "expected a list of tensor names"),
    ("too_many_inputs", "  - {id: a, op: relu, inputs: [x, x]}\noutputs: [a]\n", 6, "inputs",
     "takes 1 input(s)"),
    ("add_one_input", "  - {id: a, op: add, inputs: [x]}\noutputs: [a]\n", 6, "inputs",
     "takes at least 2 input(s)"),
    ("bad_node_id", "  - {id: 'a b', op: relu, inputs: [x]}\noutputs: [a]\n", 6, "nodes[0].id",
     "must start with a letter"),
    ("missing_id", "  - {op: relu, inputs: [x]}\noutputs: [a]\n", 6, "nodes[0].id",
     "missing required key 'id'"),
    ("bad_expression",
     "  - {id: a, op: linear, args: {in_features: '${d +}', out_features: 2}, inputs: [x]}\n"
     "outputs: [a]\n", 6, "nodes[0].args.in_features", "cannot evaluate"),
    ("bad_activation",
     "  - {id: a, op: mlp, args: {d_model: 8, activation: swish}, inputs: [x]}\noutputs: [a]\n",
     6, "args", "unknown activation 'swish'"),
    ("heads_do_not_divide",
     "  - {id: a, op: attention, args: {d_model: 8, n_heads: 3}, inputs: [x]}\noutputs: [a]\n",
     6, "args", "not divisible"),
]

WHOLE_FILES = [
    ("not_a_mapping", "- just\n- a list\n", 1, None, "must be a mapping"),
    ("missing_name", "inputs: {x: {shape: [2]}}\nnodes: []\noutputs: []\n", 1, "name",
     "missing required key 'name'"),
    ("unknown_top_key", "name: t\nnodez: []\n", 2, "nodez", "unknown key 'nodez'"),
    ("bad_dtype", "name: t\ninputs:\n  x: {shape: [4], dtype: float8}\nnodes:\n"
     "  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n", 3, "inputs.x.dtype",
     "unknown dtype 'float8'"),
    ("negative_dim", "name: t\ninputs:\n  x: {shape: [batch, -4]}\nnodes:\n"
     "  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n", 3, "inputs.x.shape", "bad shape"),
    ("shape_not_list", "name: t\ninputs:\n  x: {shape: 4}\nnodes:\n"
     "  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n", 3, "inputs.x.shape",
     "expected a list of dims"),
    ("unsized_dim", "name: t\ninputs:\n  x: {shape: [batch, seq]}\nnodes:\n"
     "  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n", 3, "dims", "dim 'seq' with no size"),
    ("duplicate_yaml_key", "name: t\nname: u\n", 2, "name", "duplicate key 'name'"),
    ("yaml_syntax", "name: t\ninputs: [x\n", 3, None, "invalid YAML"),
    ("tab_indent", "name: t\ninputs:\n\tx: 1\n", 3, None, "invalid YAML"),
    ("bad_checkpoint_ext", "name: t\nweights: {checkpoint: w.pickle}\ninputs:\n"
     "  x: {shape: [4]}\nnodes:\n  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n", 2,
     "weights.checkpoint", "must be .safetensors"),
    ("seed_not_int", "name: t\nweights: {seed: abc}\ninputs:\n  x: {shape: [4]}\nnodes:\n"
     "  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n", 2, "weights.seed",
     "expected an integer seed"),
    ("bool_where_int", "name: t\ndims: {seq: true}\ninputs:\n  x: {shape: [4]}\nnodes:\n"
     "  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n", 2, "dims.seq", "got a boolean"),
]


def _write(tmp_path, text: str):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def _check(path, line, key, phrase) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_graph(load_spec(path))
    e = info.value
    assert e.file == str(path)
    assert phrase in str(e), str(e)
    if line is not None:
        assert e.line == line, f"line {e.line} != {line}: {e}"
    if key is not None:
        assert e.key is not None and key in e.key, f"key {e.key!r} lacks {key!r}: {e}"
    return e


@pytest.mark.parametrize("case,body,line,key,phrase", CASES, ids=[c[0] for c in CASES])
def test_malformed_node_specs(tmp_path, case, body, line, key, phrase):
    _check(_write(tmp_path, GOOD_HEAD + body), line, key, phrase)


@pytest.mark.parametrize("case,text,line,key,phrase", WHOLE_FILES, ids=[c[0] for c in WHOLE_FILES])
def test_malformed_whole_specs(tmp_path, case, text, line, key, phrase):
    _check(_write(tmp_path, text), line, key, phrase)


def test_every_case_is_one_line_from_the_cli_and_no_two_read_alike(tmp_path, capsys):
    """What a user sees: ``fastserve compile`` exits 2 with one line that starts with the file,
    the line and the key the loader found; and no two malformations are explained alike."""
    reports = {}
    for case, body, line, key, _ in [(c, GOOD_HEAD + b, *rest) for c, b, *rest in CASES] \
            + WHOLE_FILES:
        path = tmp_path / f"{case}.yaml"
        path.write_text(body)
        assert run_cli(["compile", str(path)]) == 2, case
        err = capsys.readouterr().err
        where = re.match(rf"error: {re.escape(str(path))}:{line}(?:, key '([^']+)')?: ", err)
        assert where, (case, err)
        assert (key is None) == (where[1] is None) and (key or "") in (where[1] or ""), \
            (case, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (case, err)
        reports.setdefault(err[where.end():], []).append(case)  # what is wrong, not where
    assert [cases for cases in reports.values() if len(cases) > 1] == []


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_prints_one_line_and_exits_non_zero(tmp_path, capsys):
    path = _write(tmp_path, GOOD_HEAD + textwrap.dedent("""\
          - {id: a, op: linearr, inputs: [x]}
        outputs: [a]
        """))
    code = run_cli(["compile", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}:6, key 'nodes[0].op': unknown op 'linearr'")
