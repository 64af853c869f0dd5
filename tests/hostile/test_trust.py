"""Code named by a spec runs only when the user trusts it (``--trust-code``, ``trust_code=True``
or the trust file), and the refusal comes before anything is imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastserve as fs
import fastserve.cli  # noqa: F401  (registers every command)
from fastserve.cli.app import run_cli
from fastserve.errors import TrustError
from fastserve.graph import (build_subgraph, compile_graph, load_spec, parse_spec, reference,
                             spec_from_dict)
from fastserve.graph.builder import GraphBuilder
from fastserve.trust import check_code, trusted_modules

ROOT = Path(__file__).resolve().parents[2]

MODULE_SPEC = """\
name: t
inputs:
  x: {shape: [batch, 4]}
nodes:
  - {id: fc, op: linear, args: {in_features: 4, out_features: 4}, inputs: [x]}
  - {id: s, module: "%s", args: %s, inputs: [fc]}
outputs: [s]
"""
SOURCE_SPEC = """\
name: t
source:
  torch: "%s"
  kwargs: {command: "touch %s"}
  example_inputs:
    x: {shape: [batch, 4]}
"""


@pytest.fixture
def trust_file(tmp_path, monkeypatch) -> Path:
    """The trust file the tests control (it does not exist until a test writes it)."""
    path = tmp_path / "trust.yaml"
    monkeypatch.setenv("FASTSERVE_TRUST_FILE", str(path))
    return path


@pytest.fixture
def user_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "unit"))  # user_modules.py: class Scale


def _refusal(file: Path, line: int, key: str, target: str, trust: Path) -> str:
    top = target.split(":")[0].split(".")[0]
    return (f"{file}:{line}, key '{key}': '{target}' is Python code, which a spec may run only "
            f"when trusted: pass --trust-code (CLI) or trust_code=True (Python) if you trust "
            f"this file, or list '{top}' under trusted_modules in {trust}")


def test_os_system_is_refused_without_trust_and_nothing_runs(tmp_path, trust_file, capsys):
    marker = tmp_path / "pwned"
    source = tmp_path / "source.yaml"
    source.write_text(SOURCE_SPEC % ("os:system", marker))
    module = tmp_path / "module.yaml"
    module.write_text(MODULE_SPEC % ("os:system", "{command: 'touch %s'}" % marker))
    for path, line, key in ((source, 3, "source.torch"), (module, 6, "nodes[1].module")):
        expected = _refusal(path, line, key, "os:system", trust_file)
        with pytest.raises(TrustError) as info:
            compile_graph(load_spec(path))
        assert str(info.value) == expected
        with pytest.raises(TrustError):
            fs.load(str(path))
        assert run_cli(["check", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == f"error: {expected}"
    assert not marker.exists()


def test_refusal_comes_before_any_import(tmp_path, trust_file, monkeypatch):
    # a package whose import alone has an effect: it must never be imported
    pkg = tmp_path / "sideeffect_pkg_zz"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass M: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = MODULE_SPEC % ("sideeffect_pkg_zz:M", "{}")
    with pytest.raises(TrustError, match="'sideeffect_pkg_zz:M' is Python code"):
        parse_spec(spec, file="x.yaml")
    assert not marker.exists() and "sideeffect_pkg_zz" not in sys.modules


def test_trust_code_runs_a_harmless_user_module(tmp_path, trust_file, user_modules, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(MODULE_SPEC % ("user_modules:Scale", "{dim: 4, factor: 3.0}"))
    graph = fs.load(str(path), trust_code=True)
    x = torch.randn(2, 4)
    out = reference(graph, {"x": x})["s"]
    with torch.no_grad():
        fc = build_subgraph(graph, ["fc"], ["x"], ["fc"])({"x": x})["fc"]
    torch.testing.assert_close(out, fc * 3.0)  # Scale(factor=3.0) ran
    assert run_cli(["compile", str(path)]) == 2
    assert "is Python code" in capsys.readouterr().err
    assert run_cli(["compile", str(path), "--trust-code"]) == 0
    assert "module" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["compile", "{spec}"], ["check", "{spec}"], ["partition", "{spec}", "--shards", "2"],
    ["plan", "{spec}"], ["profile", "{spec}", "--batch", "1", "--out", "{tmp}/p.json"],
    ["run", "{spec}", "--parallel", "model", "--stages", "1"],
], ids=lambda a: a[0])
def test_every_command_that_loads_a_spec_takes_trust_code(argv, tmp_path, trust_file,
                                                          user_modules, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(MODULE_SPEC % ("user_modules:Scale", "{dim: 4}"))
    args = [a.format(spec=path, tmp=tmp_path) for a in argv]
    assert run_cli(args) == 2
    assert "is Python code" in capsys.readouterr().err
    if argv[0] != "run":  # a trusted run starts rank processes: the multiproc tier covers it
        assert run_cli(args + ["--trust-code"]) == 0, capsys.readouterr().err


def test_trust_file_prefixes(tmp_path, trust_file, user_modules):
    path = tmp_path / "spec.yaml"
    path.write_text(MODULE_SPEC % ("user_modules:Scale", "{dim: 4}"))
    with pytest.raises(TrustError):
        load_spec(path)
    trust_file.write_text("trusted_modules: [user]\n")  # a prefix of the name, not a package
    with pytest.raises(TrustError):
        load_spec(path)
    trust_file.write_text("trusted_modules: [mypkg, user_modules]\n")
    assert trusted_modules() == ("mypkg", "user_modules")
    assert load_spec(path).node("s").args["target"] == "user_modules:Scale"
    check_code("user_modules.sub.deeper:X", trust_code=False)  # packages under a prefix
    check_code("mypkg:X", trust_code=False)
    other = tmp_path / "other.yaml"
    other.write_text(MODULE_SPEC % ("os:system", "{}"))
    with pytest.raises(TrustError, match=f"list 'os' under trusted_modules in {trust_file}"):
        load_spec(other)


@pytest.mark.parametrize("text,line,says", [
    ("- a\n", 1, "holds one key"),
    ("trusted_modules: os\n", 1, "expected a list"),
    ("trusted_modules:\n  - ok\n  - '../x'\n", 3, "is not a module prefix"),
    ("trusted_modules: [a]\nextra: 1\n", 1, "holds one key"),
])
def test_a_malformed_trust_file_is_named(tmp_path, trust_file, text, line, says):
    trust_file.write_text(text)
    with pytest.raises(TrustError, match=says) as info:
        parse_spec(MODULE_SPEC % ("x:Y", "{}"))
    assert (info.value.file, info.value.line) == (str(trust_file), line)


def test_the_op_library_needs_no_trust(trust_file):
    for path in ("mlp.yaml", "gpt2.yaml", "unet.yaml"):
        assert load_spec(ROOT / "graphs" / path).nodes


def test_python_builder_graphs_are_trusted(trust_file, user_modules):
    b = GraphBuilder("b")
    b.input("x", ["batch", 4])
    b.module("s", "user_modules:Scale", ["x"], dim=4)
    b.output("s")
    assert len(b.compile()) == 1
    # the same document as data (it could have come from a file) is not
    with pytest.raises(TrustError):
        spec_from_dict(b.document())
    assert spec_from_dict(b.document(), trust_code=True).nodes
