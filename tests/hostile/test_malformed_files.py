"""Hostile and malformed files through the real CLI: one clear line each, fast, never a traceback.

The corpus (``corpus/``, with the expected message of every file in ``corpus/expected.yaml``)
holds specs, host inventories, inputs files and profiles: alias bombs, huge repeat counts, power
towers, 5,000 nested brackets, binary and non-UTF-8 files, wrong types for every top-level key,
untrusted code... Each must exit non-zero with ``error: <file>[:<line>][, key '<key>']: ...``.
The time bound per file only guards against hangs; the message is the real check.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import fastserve.cli  # noqa: F401  (registers every command)
from fastserve.cli.app import run_cli
from fastserve.errors import SpecError
from fastserve.graph import load_spec, parse_spec
from fastserve.limits import Limits

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
EXPECTED = yaml.safe_load((CORPUS / "expected.yaml").read_text())
FILES = EXPECTED["files"]
HANG_GUARD_S = 5.0  # generous: every file takes well under a second once torch is imported
_times: dict[str, float] = {}


def _argv(name: str) -> list[str]:
    command = EXPECTED["commands"][FILES[name].get("run", "spec")]
    return [_fill(a, name) for a in command]


def _fill(text: str, name: str) -> str:
    # not str.format: messages hold braces of their own (``${4 // 0}``)
    return text.replace("{file}", str(CORPUS / name)).replace("{root}", str(ROOT))


@pytest.fixture(autouse=True)
def no_trust_file(tmp_path, monkeypatch):
    """Whatever the developer's own trust file lists, the corpus runs with none."""
    monkeypatch.setenv("FASTSERVE_TRUST_FILE", str(tmp_path / "no-trust.yaml"))


@pytest.fixture(scope="module", autouse=True)
def warm_and_report(request):
    """Import torch and compile once first, so that no file's time includes the imports; print
    the slowest file at the end."""
    assert run_cli(["compile", str(ROOT / "graphs/mlp.yaml")]) == 0
    for module in ("numpy", "fastserve.engine", "fastserve.graph.inputs",
                   "fastserve.resources.planner"):  # what plan and run import on first use
        importlib.import_module(module)
    yield
    if _times:
        name = max(_times, key=_times.get)
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\nslowest malformed file: {name} in {_times[name]:.3f} s "
                  f"({len(_times)} files)")


def test_corpus_is_complete():
    on_disk = {p.name for p in CORPUS.iterdir() if p.name != "expected.yaml"}
    assert on_disk == set(FILES), on_disk ^ set(FILES)
    assert len(FILES) >= 40
    kinds = {entry.get("run", "spec") for entry in FILES.values()}
    assert kinds == set(EXPECTED["commands"])


@pytest.mark.parametrize("name", sorted(FILES))
def test_malformed_file_gives_one_clear_line(name, capsys):
    capsys.readouterr()
    t0 = time.perf_counter()
    code = run_cli(_argv(name))
    elapsed = time.perf_counter() - t0
    _times[name] = elapsed
    err = capsys.readouterr().err
    lines = err.splitlines()
    expected = _fill(FILES[name]["error"], name)
    assert code != 0
    assert "Traceback" not in err and "internal error" not in err, err
    assert [ln for ln in lines if ln.startswith("error")] == [lines[-1]], err
    assert lines[-1].startswith(expected), f"\n got: {lines[-1]}\nwant: {expected}"
    if FILES[name].get("run") != "check":  # check prints its steps before the error
        assert len(lines) == 1, err
    assert elapsed < HANG_GUARD_S, f"{name} took {elapsed:.1f} s"


@pytest.mark.parametrize("name", ["spec_alias_bomb.yaml", "spec_binary.yaml",
                                  "hosts_deep.yaml", "inputs_zip_bomb.npz"])
def test_a_real_process_fails_the_same_way(name, tmp_path):
    env = {**os.environ, "FASTSERVE_TRUST_FILE": str(tmp_path / "no-trust.yaml")}
    run = subprocess.run([sys.executable, "-m", "fastserve", *_argv(name)], capture_output=True,
                         text=True, timeout=120, env=env, cwd=ROOT)
    expected = _fill(FILES[name]["error"], name)
    assert run.returncode != 0
    assert run.stderr.splitlines() == [run.stderr.strip()], run.stderr
    assert run.stderr.startswith(expected), run.stderr


# --- the limits are one value, with generous defaults, that callers may change ---------------

REPEAT = """\
name: t
inputs:
  x: {shape: [batch, 4]}
nodes:
  - repeat: %d
    id: r
    input: x
    nodes:
      - {id: a, op: relu, inputs: [$in]}
outputs: [r]
"""


def test_limits_are_configurable(tmp_path):
    spec = parse_spec(REPEAT % 50)
    assert len(spec.nodes) == 50
    with pytest.raises(SpecError, match=r"repeat count 50 is more than 10 \(Limits.max_repeat\)"):
        parse_spec(REPEAT % 50, limits=Limits(max_repeat=10))
    with pytest.raises(SpecError, match=r"larger than 20 nodes \(Limits.max_nodes\)"):
        parse_spec(REPEAT % 50, limits=Limits(max_nodes=20))
    path = tmp_path / "spec.yaml"
    path.write_text(REPEAT % 3)
    with pytest.raises(SpecError, match="larger than 100 bytes") as info:
        load_spec(path, limits=Limits(max_file_bytes=100))
    assert info.value.file == str(path)
    assert load_spec(path, limits=Limits(max_file_bytes=len(REPEAT) + 10)).nodes


def test_expression_limits():
    text = "name: t\nparams: {n: '${2 ** %d}'}\ninputs:\n  x: {shape: [batch, $n]}\nnodes:\n" \
           "  - {id: a, op: relu, inputs: [x]}\noutputs: [a]\n"
    assert parse_spec(text % 53).inputs[0].shape == ("batch", 2**53)
    with pytest.raises(SpecError, match="would be larger than"):
        parse_spec(text % 54)
    assert parse_spec(text % 40, limits=Limits(max_int=2**40)).inputs[0].shape[1] == 2**40
    with pytest.raises(SpecError, match=r"Limits.max_int"):
        parse_spec(text % 41, limits=Limits(max_int=2**40))


def test_a_spec_that_is_a_directory_or_a_device_is_refused(tmp_path):
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)
    if os.path.exists("/dev/zero"):  # endless: read only up to the size limit
        with pytest.raises(SpecError, match=r"Limits.max_file_bytes"):
            load_spec("/dev/zero")


def test_every_shipped_spec_is_inside_the_default_limits():
    for path in sorted((ROOT / "graphs").glob("*.yaml")):
        load_spec(path, trust_code=True)
