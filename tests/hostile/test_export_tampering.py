"""A tampered or malformed export is refused with one clear error, before anything in it is parsed
or run: issue #9. Each case copies a real export, changes one thing, and expects a
:class:`WeightsError` (a :class:`ManifestError` naming the manifest and key path for a bad
manifest), never a KeyError or TypeError."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

import fastserve as fs
from fastserve.errors import WeightsError
from fastserve.partition import export, load_manifest, load_shard, partition
from fastserve.partition.manifest import ManifestError, exported_spec

ROOT = Path(__file__).resolve().parents[2]
SHARD0, SHARD1, SPEC = "shard-000.safetensors", "shard-001.safetensors", "graph.yaml"
# if anything parsed this, it would fail with a SpecError, not a hash mismatch
BROKEN_SPEC = "name: [unclosed\nnodes: {\n"


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """One real export of graphs/mlp.yaml in 2 shards, copied by each test before tampering."""
    graph = fs.load(str(ROOT / "graphs/mlp.yaml"))
    out = tmp_path_factory.mktemp("export")
    export(partition(graph, "weight", shards=2), out)
    return out


@pytest.fixture
def copy(original, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the export, and a directory outside it holding copies of its files (so a
    path leading there would even pass the hash check: only confinement can refuse it)."""
    d = tmp_path / "export"
    shutil.copytree(original, d)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in (SHARD0, SPEC, "manifest.json"):
        shutil.copyfile(original / name, outside / name)
    return d, outside


@pytest.fixture
def spec_parses(monkeypatch) -> list[str]:
    """Every graph spec parsed during the test (the loader's two entry points funnel here)."""
    import fastserve.graph.loader as loader

    seen: list[str] = []
    read_yaml = loader.read_yaml

    def recording_read_yaml(text, file=None, *args, **kwargs):
        seen.append(str(file))
        return read_yaml(text, file, *args, **kwargs)

    monkeypatch.setattr(loader, "read_yaml", recording_read_yaml)
    return seen


Tamper = Callable[[Path, Path], None]


def _edit(change: Callable[[dict], Any]) -> Tamper:
    def tamper(d: Path, _outside: Path) -> None:
        doc = json.loads((d / "manifest.json").read_text())
        change(doc)
        (d / "manifest.json").write_text(json.dumps(doc))
    return tamper


def _write(data: bytes | str, name: str = "manifest.json") -> Tamper:
    def tamper(d: Path, _outside: Path) -> None:
        (d / name).unlink()
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return tamper


def _replace_spec(d: Path, _outside: Path) -> None:
    size = (d / SPEC).stat().st_size  # same size: only the hash can tell
    (d / SPEC).write_text(BROKEN_SPEC + "#" * (size - len(BROKEN_SPEC)))


def _replace_spec_of_old_export(d: Path, outside: Path) -> None:
    _edit(lambda m: m["spec"].pop("bytes"))(d, outside)  # older exports did not record it
    _write(BROKEN_SPEC, SPEC)(d, outside)


def _flip_last_byte(d: Path, _outside: Path) -> None:
    data = bytearray((d / SHARD1).read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: same size, other hash
    (d / SHARD1).write_bytes(bytes(data))


def _truncate(d: Path, _outside: Path) -> None:
    with open(d / SHARD1, "r+b") as f:
        f.truncate(100)


def _symlink_shard_out(d: Path, outside: Path) -> None:
    (d / SHARD0).unlink()
    (d / SHARD0).symlink_to(outside / SHARD0)  # identical bytes: the hash alone would pass


def _symlink_spec_out(d: Path, outside: Path) -> None:
    (d / SPEC).unlink()
    (d / SPEC).symlink_to(outside / SPEC)


def _symlink_manifest_out(d: Path, outside: Path) -> None:
    (d / "manifest.json").unlink()
    (d / "manifest.json").symlink_to(outside / "manifest.json")


def _symlink_directory_out(d: Path, outside: Path) -> None:
    (d / "sub").symlink_to(outside, target_is_directory=True)
    _edit(lambda m: m["shards"][0].update(file=f"sub/{SHARD0}"))(d, outside)


def _absolute(d: Path, outside: Path) -> None:
    _edit(lambda m: m["shards"][0].update(file=str(outside / SHARD0)))(d, outside)


def _fifo(d: Path, _outside: Path) -> None:
    (d / SHARD1).unlink()
    os.mkfifo(d / SHARD1)  # opening it for reading would block without O_NONBLOCK


def _huge(d: Path, _outside: Path) -> None:
    with open(d / "manifest.json", "r+b") as f:
        f.truncate(17 << 20)  # sparse: cheap to make, refused before a byte is parsed


def _shard_is_directory(d: Path, _outside: Path) -> None:
    (d / SHARD1).unlink()
    (d / SHARD1).mkdir()


def _drop(key: str, shard: int | None = None) -> Tamper:
    return _edit(lambda m: (m if shard is None else m["shards"][shard]).pop(key))


def _set(key: str, value: Any, shard: int | None = None) -> Tamper:
    return _edit(lambda m: (m if shard is None else m["shards"][shard]).update({key: value}))


L = re.escape  # a literal message start
# (tamper, key path in the manifest or None for an error about a file, message start as a regex)
CASES = [
    pytest.param(_replace_spec, None, r"spec file '.*graph\.yaml' has sha256",
                 id="spec-replaced"),
    pytest.param(_replace_spec_of_old_export, None, r"spec file '.*graph\.yaml' has sha256",
                 id="spec-replaced-size-not-recorded"),
    pytest.param(_write(BROKEN_SPEC, SPEC), None, r"spec file '.*graph\.yaml' is 25 bytes, the "
                 r"manifest records", id="spec-replaced-other-size"),
    pytest.param(_flip_last_byte, None, r"shard file '.*shard-001\.safetensors' has sha256",
                 id="shard-bytes-changed"),
    pytest.param(_truncate, None, r"shard file '.*shard-001\.safetensors' is 100 bytes, the "
                 r"manifest records", id="shard-truncated"),
    pytest.param(lambda d, o: (d / SHARD1).unlink(), None,
                 r"shard file '.*shard-001\.safetensors' does not exist", id="shard-missing"),
    pytest.param(_fifo, None, r"shard file '.*shard-001\.safetensors' is not a regular file",
                 id="shard-is-fifo"),
    pytest.param(_shard_is_directory, None, r"shard file '.*shard-001\.safetensors' is not a "
                 r"regular file", id="shard-is-directory"),
    pytest.param(_set("file", f"../outside/{SHARD0}", 0), "shards[0].file",
                 f"'../outside/{SHARD0}' has a '..' component", id="shard-dotdot"),
    pytest.param(_edit(lambda m: m["spec"].update(file=f"../outside/{SPEC}")), "spec.file",
                 f"'../outside/{SPEC}' has a '..' component", id="spec-dotdot"),
    pytest.param(_absolute, "shards[0].file", r"'/.*' is an absolute path", id="shard-absolute"),
    pytest.param(_symlink_shard_out, "shards[0].file", f"'{SHARD0}' resolves to",
                 id="shard-symlink-out"),
    pytest.param(_symlink_spec_out, "spec.file", f"'{SPEC}' resolves to",
                 id="spec-symlink-out"),
    pytest.param(_symlink_directory_out, "shards[0].file", f"'sub/{SHARD0}' resolves to",
                 id="directory-symlink-out"),
    pytest.param(_symlink_manifest_out, "", L("'manifest.json' resolves to"),
                 id="manifest-symlink-out"),
    pytest.param(_write("{not json"), "", "is not valid JSON: Expecting property name",
                 id="manifest-not-json"),
    pytest.param(_write(bytes(range(256))), "", "is not UTF-8 text", id="manifest-binary"),
    pytest.param(_write(b""), "", "the manifest is empty", id="manifest-empty"),
    pytest.param(_huge, "", L(f"is {17 << 20} bytes, more than the 16 MiB"), id="manifest-huge"),
    pytest.param(_write("[" * 100_000), "", "is not valid JSON", id="manifest-nested-deep"),
    pytest.param(_write("[]"), "", "expected a JSON object", id="manifest-a-list"),
    pytest.param(_write('{"format": "fastserve-shards/1", "format": "x"}'), "",
                 "is not valid JSON: key 'format' appears twice", id="duplicate-key"),
    pytest.param(_set("format", "fastserve-shards/2"), "format",
                 "'fastserve-shards/2' is not a version this FastServe reads",
                 id="unknown-version"),
    pytest.param(_drop("format"), "format", "expected 'fastserve-shards/1', got null",
                 id="no-format"),
    pytest.param(_set("spec", "graph.yaml"), "spec", 'expected an object, got string "graph',
                 id="spec-a-string"),
    pytest.param(_edit(lambda m: m["spec"].pop("sha256")), "spec", "missing key 'sha256'",
                 id="spec-hash-missing"),
    pytest.param(_set("shards", "two"), "shards", 'expected a list, got string "two"',
                 id="shards-a-string"),
    pytest.param(_set("shards", []), "shards", "expected at least one shard", id="no-shards"),
    pytest.param(_drop("nodes", 1), "shards[1]", "missing key 'nodes'", id="shard-no-nodes"),
    pytest.param(_set("nodes", [1, 2], 0), "shards[0].nodes[0]",
                 "expected a non-empty string, got integer 1", id="nodes-not-strings"),
    pytest.param(_set("nodes", "fc_in", 0), "shards[0].nodes", "expected a list, got string",
                 id="nodes-a-string"),
    pytest.param(_edit(lambda m: m["shards"][1].update(nodes=m["shards"][0]["nodes"])),
                 "shards[1].nodes", "node 'fc_in' is also in shard 0", id="node-in-two-shards"),
    pytest.param(_set("bytes", -5, 0), "shards[0].bytes", L("expected an integer in [0, "),
                 id="negative-size"),
    pytest.param(_drop("sha256", 1), "shards[1]", "missing key 'sha256'", id="hash-missing"),
    pytest.param(_set("sha256", 12, 1), "shards[1].sha256", "expected a sha256",
                 id="hash-an-integer"),
    pytest.param(_set("sha256", "ab" * 16, 1), "shards[1].sha256", "expected a sha256",
                 id="hash-too-short"),
    pytest.param(_set("index", 0, 1), "shards[1].index", "expected 1", id="index-out-of-order"),
    pytest.param(_set("index", True, 1), "shards[1].index", "expected an integer, got boolean",
                 id="index-a-boolean"),
    pytest.param(_set("seed", "0"), "seed", 'expected an integer, got string "0"',
                 id="seed-a-string"),
    pytest.param(_write('{"format": "fastserve-shards/1", "seed": NaN}'), "",
                 "is not valid JSON: 'NaN' is not a number", id="seed-nan"),
    pytest.param(_set("dims", {"seq": 0}), "dims.seq", L("expected an integer in [1, "),
                 id="dim-zero"),
    pytest.param(_set("extra", 1), "", "unknown key 'extra'", id="unknown-key"),
    pytest.param(_drop("graph"), "", "missing key 'graph'", id="graph-missing"),
    pytest.param(_set("aliases", {"a.weight": "nowhere"}, 0), "shards[0].aliases.a.weight",
                 "expected the name of a tensor of this shard", id="alias-to-nothing"),
    pytest.param(_set("file", "", 0), "shards[0].file", "expected a file name", id="empty-file"),
    pytest.param(_set("file", "shard\n000", 0), "shards[0].file", "expected a file name",
                 id="newline-in-file"),
    pytest.param(_set("nodes", ["a\nb", "a\nb"], 0), "shards[0].nodes[1]",
                 L("'a\\x0ab' is listed twice"), id="newline-in-node"),
]


@pytest.mark.parametrize("tamper, key, start", CASES)
def test_a_tampered_export_is_refused_clearly(copy, spec_parses, tamper: Tamper, key, start):
    d, outside = copy
    tamper(d, outside)
    for load in (lambda: load_manifest(d), lambda: load_shard(d, 1)):
        with pytest.raises(WeightsError) as info:  # a KeyError/TypeError would fail here
            load()
        err = info.value
        assert "\n" not in str(err)
        if key is None:  # about a file the manifest names: the message names that file
            assert re.match(start, str(err)), str(err)
        else:  # about the manifest: names it, the key path and what was expected
            assert isinstance(err, ManifestError)
            assert Path(err.file).name == "manifest.json" and (err.key or "") == key, str(err)
            assert re.match(start, err.reason), err.reason
    assert spec_parses == []  # nothing was parsed before the refusal


def test_the_untampered_export_loads_and_gives_verified_paths(original, spec_parses):
    manifest = load_manifest(original)
    real = Path(os.path.realpath(original))
    assert manifest["directory"] == str(real)
    assert manifest["spec"]["path"] == str(real / SPEC)
    assert manifest["spec"]["text"] == (ROOT / "graphs/mlp.yaml").read_text()
    assert [s["path"] for s in manifest["shards"]] == [str(real / SHARD0), str(real / SHARD1)]
    assert manifest["spec"]["file"] == SPEC  # the keys of the file itself are still there
    assert exported_spec(manifest).name == "mlp" and spec_parses == [str(real / SPEC)]


def test_a_symlink_inside_the_export_is_allowed(copy):
    d, _ = copy
    (d / "weights").mkdir()
    (d / SHARD0).rename(d / "weights" / SHARD0)
    (d / SHARD0).symlink_to(Path("weights") / SHARD0)  # relative, stays inside
    assert load_manifest(d)["shards"][0]["path"] == str((d / "weights" / SHARD0).resolve())
    assert load_shard(d, 0) is not None


def test_a_shard_swapped_after_the_driver_checked_is_refused_by_the_rank(copy):
    """Time of check, time of use: the rank hashes the bytes it loads, not the driver's check."""
    d, outside = copy
    load_manifest(d)  # the driver: all good
    _flip_last_byte(d, outside)
    with pytest.raises(WeightsError, match=r"shard-001\.safetensors' has sha256"):
        load_shard(d, 1)
    assert load_shard(d, 0) is not None  # a rank needs only its own file intact


def test_the_driver_refuses_before_parsing_the_spec_or_starting_a_rank(copy, spec_parses,
                                                                        monkeypatch, capsys):
    import fastserve.engine.placement as placement  # where ranks are launched
    from fastserve.cli.app import run_cli
    from fastserve.engine import Deployment, Layout

    launched: list[Any] = []
    monkeypatch.setattr(placement, "launch_local", lambda *a, **k: launched.append(a))
    d, outside = copy
    _replace_spec(d, outside)
    with pytest.raises(WeightsError, match=r"spec file '.*graph\.yaml' has sha256"):
        Deployment.from_spec(str(d), Layout(stages=2), retain_memory=False)
    code = run_cli(["run", str(d)])
    err = capsys.readouterr().err
    assert code == WeightsError.exit_code, err
    assert err.startswith("error: spec file '") and "has sha256" in err and err.count("\n") == 1
    _set("shards", "two")(d, outside)  # once an internal TypeError, now one clear line
    code = run_cli(["run", str(d)])
    err = capsys.readouterr().err
    assert code == WeightsError.exit_code and err.count("\n") == 1, err
    assert err.startswith("error: ") and "key 'shards': expected a list" in err
    assert launched == [] and spec_parses == []


# --- an export sent to a host that does not have its directory ---------------------------------


def _sent_record(original: Path, index: int = 1, **change) -> dict:
    """The record a rank on another host gets (see Placement._export_file), its files at their
    paths in the export, as a host's cache would hold copies of them."""
    from fastserve.partition.manifest import as_sent

    manifest = load_manifest(original, verify_shards=False)
    record = {"kind": "export-file", "manifest": as_sent(manifest), "index": index,
              "spec": str(original / SPEC), "file": str(original / f"shard-00{index}.safetensors")}
    record.update(change)
    return record


def test_a_sent_shard_builds_as_the_export_does(original):
    import torch

    from fastserve.engine.rank import build_shard

    module = build_shard(json.loads(json.dumps(_sent_record(original))), trust_code=False)
    want = load_shard(original, 1)
    assert (module.input_names, module.output_names) == (want.input_names, want.output_names)
    got, expected = module.state_dict(), want.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("change, error, words", [
    ({"manifest": "not a manifest"}, ManifestError, "expected a JSON object"),
    ({"manifest": {"format": "fastserve-shards/1"}}, ManifestError, "graph"),
    ({"index": 2}, ManifestError, "there is no shard 2"),
    ({"index": "1"}, ManifestError, "'index' \\(an integer\\)"),
    ({"spec": None}, ManifestError, "'spec' and 'file' \\(paths\\)"),
    ({"spec": "shard"}, WeightsError, "spec file"),  # another file than the one hashed
    ({"file": "shard0"}, WeightsError, "the manifest records"),  # shard 0's file as 1's
    ({"file": "/nonexistent/shard.safetensors"}, WeightsError, "does not exist")])
def test_a_malformed_sent_shard_record_is_refused(original, change, error, words):
    from fastserve.engine.rank import build_shard

    paths = {"shard": str(original / SHARD1), "shard0": str(original / SHARD0)}
    record = _sent_record(original, **{k: paths.get(v, v) if isinstance(v, str) else v
                                       for k, v in change.items()})
    with pytest.raises(error, match=words):
        build_shard(record, trust_code=False)
