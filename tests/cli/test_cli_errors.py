"""Bad input through every subcommand, at the CLI boundary (``run_cli``, in this process).

The rule of the command line: bad input gets one clear line naming what is wrong (the file,
line and key of a malformed spec/inventory/config/plan; the option of a bad value), a non-zero
exit (2 for usage errors), and never a Python traceback. ``internal error:`` is the boundary's
last line of defence for exceptions nobody turned into a message: it counts as a failure here.

Nothing long-running starts: ``serve`` and ``agent`` only get inputs refused before anything
starts, and the two cases that hang run in a thread or a subprocess with a deadline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastserve.cli.app import run_cli
from lms import ROOT

MLP = str(ROOT / "graphs/mlp.yaml")
GPT2 = str(ROOT / "graphs/gpt2.yaml")
UNET = str(ROOT / "graphs/unet.yaml")

# a one-node spec whose line numbers the tests below name
TINY = """\
name: tiny
inputs:
  x: {shape: [batch, 8], dtype: float32}
weights: {seed: 0}
nodes:
  - {id: fc, op: linear, args: {in_features: 8, out_features: 4}, inputs: [x]}
outputs: [fc]
"""


# --- helpers -------------------------------------------------------------------------------------


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code: int, err: str, *names: str, exit_code: int | None = None) -> str:
    """Assert the CLI's rule for bad input; return the error line."""
    assert code != 0, f"exit 0 on bad input; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert "internal error" not in err, f"an unhandled exception, not a message: {err!r}"
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    for name in names:
        assert name in lines[0], f"{name!r} is not named in {lines[0]!r}"
    if exit_code is not None:
        assert code == exit_code, f"exit {code}, expected {exit_code}: {err!r}"
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_subprocess(args: list[str], timeout: float) -> tuple[int, str, str]:
    """run_cli in a child process, killed after ``timeout`` s (for a command that hangs)."""
    code = "import sys; from fastserve.cli.app import run_cli; sys.exit(run_cli(sys.argv[1:]))"
    try:
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                           text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"'fastserve {' '.join(args)}' still ran after {timeout:g} s (a hang; "
                    f"killed); stderr so far: {e.stderr or ''!r}")
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("keys") / "k"
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_cli(["keys", "new", str(d)]) == 0
    return str(d)


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Path]:
    """A good plan for the MLP (2 stages) and one for the U-Net."""
    d = tmp_path_factory.mktemp("plans")
    out = {}
    for name, spec, extra in (("mlp", MLP, ["--stages", "2"]), ("unet", UNET, [])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert run_cli(["plan", spec, *extra, "--json"]) == 0
        out[name] = d / f"{name}.json"
        out[name].write_text(buf.getvalue())
    return out


# --- spec files, through every command that reads one -------------------------------------------

SPEC_COMMANDS = {
    "compile": lambda spec, tmp: ["compile", spec],
    "check": lambda spec, tmp: ["check", spec],
    "partition": lambda spec, tmp: ["partition", spec, "--shards", "2"],
    "plan": lambda spec, tmp: ["plan", spec],
    "profile": lambda spec, tmp: ["profile", spec, "--out", tmp / "profile.json"],
    "run": lambda spec, tmp: ["run", spec],
    "generate": lambda spec, tmp: ["generate", spec, "--prompt", "hi", "--local"],
    "serve": lambda spec, tmp: ["serve", spec, "--listen", "127.0.0.1:0"],
    "bench pipeline": lambda spec, tmp: ["bench", "pipeline", spec],
}


def _spec_case(case: str, tmp: Path) -> tuple[Path, list[str]]:
    """The bad spec file of ``case`` and what its error must name."""
    p = tmp / f"{case}.yaml"
    if case == "missing":
        return p, [str(p), "does not exist"]
    if case == "directory":
        p.mkdir()
        return p, [str(p)]
    if case == "empty":
        p.write_text("")
        return p, [str(p), "empty"]
    if case == "binary":
        p.write_bytes(b"\x00\x01\x02\x89PNG binary")
        return p, [f"{p}:1", "binary"]
    if case == "not-utf8":
        p.write_bytes(TINY.encode().replace(b"name: tiny", b"name: caf\xe9"))
        return p, [f"{p}:1", "UTF-8"]
    if case == "yaml-syntax":
        p.write_text(TINY.replace("outputs: [fc]", "outputs: [fc"))
        return p, [f"{p}:", "invalid YAML"]
    if case == "list":
        p.write_text("- name: tiny\n- nodes: []\n")
        return p, [f"{p}:1", "mapping"]
    if case == "scalar":
        p.write_text("42\n")
        return p, [str(p), "mapping", "42"]
    if case == "unknown-key":
        p.write_text(TINY + "colour: blue\n")
        return p, [f"{p}:8", "'colour'"]
    if case == "wrong-type":
        p.write_text(TINY.replace("{seed: 0}", "{seed: zero}"))
        return p, [f"{p}:4", "'weights.seed'", "zero"]
    raise AssertionError(case)


SPEC_CASES = ["missing", "directory", "empty", "binary", "not-utf8", "yaml-syntax", "list",
              "scalar", "unknown-key", "wrong-type"]


def test_the_tiny_spec_is_good(tmp_path, capsys):
    """The bad specs below are this one spoiled: it compiles as it is."""
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    code, out, err = cli(capsys, "compile", p)
    assert code == 0, err
    assert "tiny" in out


@pytest.mark.parametrize("case", SPEC_CASES)
@pytest.mark.parametrize("command", list(SPEC_COMMANDS))
def test_bad_spec_file(command, case, tmp_path, capsys):
    path, names = _spec_case(case, tmp_path)
    code, _, err = cli(capsys, *SPEC_COMMANDS[command](str(path), tmp_path))
    refused(code, err, *names)


def test_spec_syntax_error_names_the_line(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(TINY.replace("  x: {shape: [batch, 8], dtype: float32}",
                              "  x: {shape: [batch, 8, dtype: float32}"))
    code, _, err = cli(capsys, "compile", p)
    refused(code, err, f"{p}:3", "invalid YAML", exit_code=2)


def test_spec_unknown_input_dtype_names_line_and_key(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(TINY.replace("float32", "float33"))
    code, _, err = cli(capsys, "plan", p)
    refused(code, err, f"{p}:3", "'inputs.x.dtype'", "float33", exit_code=2)


def test_spec_wrong_type_of_outputs_names_line_and_key(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(TINY.replace("outputs: [fc]", "outputs: 7"))
    code, _, err = cli(capsys, "compile", p)
    refused(code, err, f"{p}:7", "'outputs'", exit_code=2)


# --- host inventories (--hosts, hosts check) ------------------------------------------------------

INVENTORIES = {
    # case: (text, what the error must name, given the path; line numbers are the file's)
    "malformed": ("name: lab\nhosts:\n  - {name: a, address: 127.0.0.2, cores: 1, memory: 1GiB\n",
                  lambda p: [f"{p}:4", "invalid YAML"]),
    "duplicate-name": ("name: lab\nhosts:\n"
                       "  - {name: a, address: 127.0.0.2, cores: 1, memory: 1GiB}\n"
                       "  - {name: a, address: 127.0.0.3, cores: 1, memory: 1GiB}\n",
                       lambda p: [f"{p}:4", "'hosts[1].name'", "duplicate"]),
    "negative-cores": ("name: lab\nhosts:\n"
                       "  - {name: a, address: 127.0.0.2, cores: -4, memory: 1GiB}\n",
                       lambda p: [f"{p}:3", "'hosts[0].cores'", "-4"]),
    "unknown-key": ("name: lab\nhosts:\n"
                    "  - {name: a, address: 127.0.0.2, corse: 4, cores: 1, memory: 1GiB}\n",
                    lambda p: [f"{p}:3", "'hosts[0].corse'"]),
    "not-an-address": ("name: lab\nhosts:\n"
                       "  - {name: a, address: 'not an address!', cores: 2, memory: 1GiB}\n",
                       lambda p: [f"{p}:3", "'hosts[0].address'"]),
}

INVENTORY_COMMANDS = {
    "plan": lambda inv: ["plan", MLP, "--hosts", inv],
    "run": lambda inv: ["run", MLP, "--hosts", inv],
    "generate": lambda inv: ["generate", GPT2, "--prompt", "hi", "--hosts", inv],
    "serve": lambda inv: ["serve", MLP, "--hosts", inv, "--listen", "127.0.0.1:0"],
    "hosts check": lambda inv: ["hosts", "check", inv],
}


# serve with the bad address: not run here, since serve accepts the inventory and then starts
# (see test_serve_refuses_agent_hosts_without_keys_before_starting)
@pytest.mark.parametrize("command,case", [
    (command, case) for command in INVENTORY_COMMANDS for case in INVENTORIES
    if (command, case) != ("serve", "not-an-address")])
def test_bad_inventory(command, case, tmp_path, capsys):
    text, names = INVENTORIES[case]
    p = tmp_path / "hosts.yaml"
    p.write_text(text)
    code, _, err = cli(capsys, *INVENTORY_COMMANDS[command](str(p)))
    refused(code, err, *names(p))


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "binary"])
def test_inventory_file_unreadable(case, tmp_path, capsys):
    p, names = _spec_case(case, tmp_path)
    names = [n for n in names if n != "does not exist"]
    code, _, err = cli(capsys, "plan", MLP, "--hosts", p)
    refused(code, err, *names)


def test_hosts_check_with_an_address_that_is_not_one_fails_fast(tmp_path, keys_dir):
    """With keys the agent host is contacted: the bad address must be an error, not a hang."""
    p = tmp_path / "hosts.yaml"
    p.write_text(INVENTORIES["not-an-address"][0])
    code, _, err = cli_subprocess(["hosts", "check", str(p), "--keys", keys_dir], timeout=12)
    refused(code, err, "not an address!")


def test_serve_refuses_agent_hosts_without_keys_before_starting(tmp_path, capsys):
    """'run' and 'generate' refuse agent hosts without --keys before any rank starts; serve
    must too, not start a service whose replicas then fail and restart."""
    p = tmp_path / "hosts.yaml"
    p.write_text("name: lab\nhosts:\n  - {name: a, address: 127.0.0.2, cores: 1, memory: 1GiB}\n")
    t0 = time.monotonic()
    code, _, err = cli(capsys, "serve", MLP, "--hosts", p, "--listen", "127.0.0.1:0")
    elapsed = time.monotonic() - t0
    refused(code, err, "--keys")
    assert "serving graph" not in err and "restart" not in err, f"the service started: {err!r}"
    assert elapsed < 5, f"took {elapsed:.1f} s to refuse"


def test_hosts_check_agent_hosts_need_keys(capsys):
    code, _, err = cli(capsys, "hosts", "check", ROOT / "runtime/hosts/loopback3.yaml")
    refused(code, err, "--keys", exit_code=2)


def test_hosts_check_missing_key_directory(tmp_path, capsys):
    code, _, err = cli(capsys, "hosts", "check", ROOT / "runtime/hosts/loopback3.yaml",
                       "--keys", tmp_path / "nokeys")
    refused(code, err, str(tmp_path / "nokeys"))


# --- plan files (--plan) --------------------------------------------------------------------------


def _plan_case(case: str, plans: dict[str, Path], tmp: Path) -> tuple[Path, list[str]]:
    p = tmp / f"{case}.json"
    if case == "not-json":
        p.write_text("plan: [1, 2\n")
        return p, [f"{p}:1", "not a JSON plan"]
    if case == "binary":
        p.write_bytes(b"\x00\xff\xfe binary")
        return p, [str(p), "not a JSON plan"]
    if case == "json-list":
        p.write_text("[1, 2, 3]")
        return p, [str(p), "format"]
    if case == "other-graph":
        return plans["unet"], [str(plans["unet"]), "'graph_digest'", "another graph"]
    doc = json.loads(plans["mlp"].read_text())
    if case == "tampered":
        doc["plan"]["micro_batches"] += 3
        p.write_text(json.dumps(doc))
        return p, [str(p), "'hash'", "edited or damaged"]
    if case == "wrong-type":
        doc["plan"]["ranks"][0]["threads"] = "many"
        p.write_text(json.dumps(doc))
        return p, [str(p), "'plan.ranks[0].threads'", "many"]
    if case == "missing":
        return p, [str(p)]
    if case == "directory":
        p.mkdir()
        return p, [str(p)]
    raise AssertionError(case)


PLAN_CASES = ["not-json", "binary", "json-list", "other-graph", "tampered", "wrong-type",
              "missing", "directory"]


@pytest.mark.parametrize("case", PLAN_CASES)
@pytest.mark.parametrize("command", ["run", "serve"])
def test_bad_plan_file(command, case, plans, tmp_path, capsys):
    p, names = _plan_case(case, plans, tmp_path)
    extra = ["--listen", "127.0.0.1:0"] if command == "serve" else []
    code, _, err = cli(capsys, command, MLP, "--plan", p, *extra)
    refused(code, err, *names)


def test_the_good_plan_is_accepted_by_its_reader(plans):
    """The bad plans are spoiled copies of one that loads."""
    from fastserve.cli.graph import load_graph
    from fastserve.resources.plan import load_plan

    assert load_plan(str(plans["mlp"]), load_graph(MLP)).stages == 2


# --- service configs (serve --config) -------------------------------------------------------------

CONFIGS = {
    "unknown-key": (f"spec: {MLP}\nbogus: 1\n", lambda p: [f"{p}:2", "'bogus'", "unknown"]),
    "unknown-section-key": (f"spec: {MLP}\nbatching:\n  max_batch: 8\n  colour: red\n",
                            lambda p: [f"{p}:4", "'batching.colour'"]),
    "wrong-type": (f"spec: {MLP}\nbatching:\n  max_batch: lots\n",
                   lambda p: [f"{p}:3", "'batching.max_batch'", "lots"]),
    "section-not-mapping": (f"spec: {MLP}\nreplicas: 3\n",
                            lambda p: [f"{p}:2", "'replicas'", "mapping"]),
    "bad-listen": (f"spec: {MLP}\nlisten: '127.0.0.1:99999'\n",
                   lambda p: [f"{p}:2", "'listen'", "99999"]),
    "no-spec": ("stages: 2\n", lambda p: [str(p), "'spec'"]),
    "out-of-range": (f"spec: {MLP}\nlimits:\n  hang_s: 0\n",
                     lambda p: [f"{p}:3", "'limits.hang_s'"]),
    "list": ("- spec: x\n", lambda p: [f"{p}:1", "mapping"]),
    "empty": ("", lambda p: [str(p), "empty"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_service_config(case, tmp_path, capsys):
    text, names = CONFIGS[case]
    p = tmp_path / "service.yaml"
    p.write_text(text)
    code, _, err = cli(capsys, "serve", "--config", p)
    refused(code, err, *names(p), exit_code=2)


def test_service_config_missing(tmp_path, capsys):
    code, _, err = cli(capsys, "serve", "--config", tmp_path / "nope.yaml")
    refused(code, err, str(tmp_path / "nope.yaml"), "does not exist", exit_code=2)


def test_serve_without_spec_or_config(capsys):
    code, _, err = cli(capsys, "serve")
    refused(code, err, "SPEC", "--config", exit_code=2)


# --- option values out of range -------------------------------------------------------------------

OPTIONS = [
    (["plan", MLP, "--stages", "0"], "--stages"),
    (["plan", MLP, "--replicas", "0"], "--replicas"),
    (["plan", MLP, "--batch", "-1"], "--batch"),
    (["plan", MLP, "--micro-batches", "0"], "--micro-batches"),
    (["plan", MLP, "--threads", "0"], "--threads"),
    (["run", MLP, "--stages", "0"], "--stages"),
    (["run", MLP, "--replicas", "0"], "--replicas"),
    (["run", MLP, "--random", "0"], "--random"),
    (["run", MLP, "--repeat", "0"], "--repeat"),
    (["generate", GPT2, "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", GPT2, "--prompt", "hi", "--stages", "0"], "--stages"),
    (["generate", GPT2, "--prompt", "hi", "--replicas", "0"], "--replicas"),
    (["generate", GPT2, "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", GPT2, "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", GPT2, "--ids", "1,x"], "--ids"),
    (["generate", GPT2], "--prompt"),
    (["serve", MLP, "--stages", "0"], "--stages"),
    (["serve", MLP, "--replicas", "0"], "--replicas"),
    (["serve", MLP, "--max-batch", "0"], "--max-batch"),
    (["serve", MLP, "--max-queue", "0"], "--max-queue"),
    (["serve", MLP, "--max-wait-ms", "-1"], "--max-wait-ms"),
    (["check", MLP, "--batch", "-1"], "--batch"),
    (["profile", MLP, "--batch", "0", "--out", "unused.json"], "--batch"),
    (["partition", MLP, "--shards", "2", "--batch", "-1"], "--batch"),
    (["partition", MLP], "--shards"),
    (["partition", MLP, "--shards", "0"], "--shards"),
    (["partition", MLP, "--strategy", "layer", "--layers-per-shard", "0"], "--layers-per-shard"),
    (["partition", MLP, "--strategy", "hybrid", "--shards", "2", "--memory-cap", "lots"],
     "--memory-cap"),
    (["partition", MLP, "--shards", "2", "--capacities", "1,x"], "--capacities"),
    (["compile", MLP, "--dim", "seq=0"], "--dim"),
    (["status", "--wait", "-1"], "--wait"),
    (["bench", "pipeline", "--stages", "1"], "--stages"),
    (["bench", "partition", "--nodes", "1"], "--nodes"),
    (["bench", "transport", "--blocks", "0"], "--blocks"),
]


@pytest.mark.parametrize("argv,option", OPTIONS, ids=[" ".join(a[:1] + a[2:]) if len(a) > 1
                                                       and a[1] in (MLP, GPT2) else " ".join(a)
                                                       for a, _ in OPTIONS])
def test_option_out_of_range_is_a_usage_error(argv, option, capsys):
    code, _, err = cli(capsys, *argv)
    refused(code, err, option, exit_code=2)


def test_unknown_dim_name_is_refused(capsys):
    """A typo in --dim (the MLP has no dim 'seqq') must not be ignored silently."""
    code, _, err = cli(capsys, "compile", MLP, "--dim", "seqq=128")
    refused(code, err, "seqq")


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1:http",
                                    "nocolon", ":8000"])
def test_serve_bad_listen(listen, capsys):
    code, _, err = cli(capsys, "serve", MLP, "--listen", listen)
    refused(code, err, "listen", exit_code=2)


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "nocolon", "0.0.0.0:7301", "*:7301",
                                    "[::]:7301"])
def test_agent_bad_listen(listen, tmp_path, capsys):
    """Refused before the keys are read (the key directory does not exist either, so an
    accepted address fails on the keys and nothing starts)."""
    code, _, err = cli(capsys, "agent", "--listen", listen, "--keys", tmp_path / "nokeys")
    line = refused(code, err, "--listen", exit_code=2)
    if listen.startswith(("0.0.0.0", "*", "[::]")):
        assert "every interface" in line


def test_agent_missing_key_directory(tmp_path, capsys):
    code, _, err = cli(capsys, "agent", "--listen", "127.0.0.1:0", "--keys", tmp_path / "nokeys")
    refused(code, err, str(tmp_path / "nokeys"), exit_code=2)


def test_run_negative_timeout_is_refused_before_ranks_start(capsys):
    code, _, err = cli(capsys, "run", MLP, "--timeout", "-1", "--random", "1")
    refused(code, err, "--timeout", exit_code=2)
    assert "started" not in err, f"ranks started: {err!r}"


def test_generate_negative_timeout_is_refused(capsys):
    code, _, err = cli(capsys, "generate", GPT2, "--prompt", "hi", "--max-tokens", "1",
                       "--timeout", "-1")
    refused(code, err, "--timeout", exit_code=2)


# --- status / stop against nothing ----------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_status_where_nothing_listens_fails_fast(extra, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, _, err = cli(capsys, "status", "--url", url, *extra)
    assert time.monotonic() - t0 < 5
    refused(code, err, url)


def test_status_against_a_silent_listener_fails_fast(capsys):
    """A port that accepts connections but never answers (a hung service, or another program
    listening there): status must give up quickly, not wait a minute."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(run_cli(["status", "--url", url])),
                             daemon=True)
        t.start()
        t.join(8)
        hung = t.is_alive()
    t.join(10)  # the listener is closed: the pending connection is reset and status returns
    err = capsys.readouterr().err
    assert not hung, f"'fastserve status --url {url}' still waiting after 8 s: {err!r}"
    refused(result[0], err, url)


def test_status_with_a_url_that_is_not_one(capsys):
    code, _, err = cli(capsys, "status", "--url", "not a url")
    refused(code, err, "not a url")


def test_stop_where_nothing_listens_fails_fast(tmp_path, capsys):
    token = tmp_path / "svc.token"
    token.write_text("secret-token\n")
    token.chmod(0o600)
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, _, err = cli(capsys, "stop", "--url", url, "--token-file", token)
    assert time.monotonic() - t0 < 5
    refused(code, err, url)


def test_stop_token_file_missing(tmp_path, capsys):
    code, _, err = cli(capsys, "stop", "--url", f"http://127.0.0.1:{free_port()}",
                       "--token-file", tmp_path / "none.token")
    refused(code, err, str(tmp_path / "none.token"), "does not exist")


def test_stop_token_file_readable_by_others(tmp_path, capsys):
    token = tmp_path / "svc.token"
    token.write_text("secret-token\n")
    token.chmod(0o644)
    code, _, err = cli(capsys, "stop", "--url", f"http://127.0.0.1:{free_port()}",
                       "--token-file", token)
    refused(code, err, str(token), "chmod 600")


def test_stop_needs_a_token_file(capsys):
    code, _, err = cli(capsys, "stop")
    refused(code, err, "--token-file", exit_code=2)


# --- keys new -------------------------------------------------------------------------------------


def test_keys_new_refuses_a_directory_holding_keys(keys_dir, capsys):
    code, _, err = cli(capsys, "keys", "new", keys_dir)
    refused(code, err, keys_dir, "--force", exit_code=2)


def test_keys_new_refuses_a_non_empty_directory(tmp_path, capsys):
    d = tmp_path / "project"
    d.mkdir()
    (d / "notes.txt").write_text("mine\n")
    d.chmod(0o755)
    code, _, err = cli(capsys, "keys", "new", d)
    mode = stat.S_IMODE(d.stat().st_mode)
    refused(code, err, str(d))
    assert mode == 0o755, f"the existing directory's mode was changed to {mode:o}"


def test_keys_new_on_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli(capsys, "keys", "new", f)
    refused(code, err, str(f), exit_code=2)


def test_keys_new_where_the_directory_cannot_be_made(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli(capsys, "keys", "new", f / "keys")
    refused(code, err, str(f / "keys"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_keys_new_into_an_unwritable_directory(tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        code, _, err = cli(capsys, "keys", "new", d / "keys")
    finally:
        d.chmod(0o700)
    refused(code, err, str(d / "keys"))


# --- generate on what is not a language model -----------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["generate", MLP, "--prompt", "hi"],
    ["generate", MLP, "--prompt", "hi", "--local"],
    ["generate", UNET, "--ids", "1,2", "--local"],
    ["serve", MLP, "--generate", "--listen", "127.0.0.1:0"],
    ["bench", "generate", MLP],
], ids=["generate mlp", "generate mlp --local", "generate unet", "serve --generate mlp",
        "bench generate mlp"])
def test_generate_on_a_graph_that_is_not_a_language_model(argv, capsys):
    code, _, err = cli(capsys, *argv)
    refused(code, err, "not a language model" if "unet" not in argv[1] else "token ids",
            exit_code=2)


# --- the rest of bench ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv,names", [
    (["bench", "compare", MLP, "--profile", "/nonexistent/profile.json"], ["--profile"]),
    (["bench", "serve", "/nonexistent/spec.yaml"], ["/nonexistent/spec.yaml"]),
    (["bench", "serve", MLP, "--dim", "seq=x"], ["--dim", "seq=x"]),
    (["bench", "serve", MLP, "--dim", "seqq=4"], [MLP, "seqq"]),
    (["bench", "hosts", "--hosts", str(ROOT / "runtime/hosts/loopback3.yaml")], ["--keys"]),
    (["bench", "widen", "/nonexistent/spec.yaml"], ["/nonexistent/spec.yaml"]),
    (["bench", "load", "--hidden", "10"], ["--hidden"]),
], ids=["compare --profile", "serve", "serve --dim format", "serve --dim name", "hosts --hosts",
        "widen", "load --hidden"])
def test_bench_bad_input(argv, names, capsys):
    code, _, err = cli(capsys, *argv)
    refused(code, err, *names)


def test_bench_compare_unreadable_profile(tmp_path, capsys):
    p = tmp_path / "profile.json"
    p.write_bytes(b"\x00binary")
    code, _, err = cli(capsys, "bench", "compare", MLP, "--profile", p)
    refused(code, err, f"{p}:1", "binary")


def test_run_inputs_file_not_npz(tmp_path, capsys):
    p = tmp_path / "inputs.npz"
    p.write_text("not an archive")
    code, _, err = cli(capsys, "run", MLP, "--input", p)
    refused(code, err, str(p), ".npz")


def test_plan_profile_not_a_profile(tmp_path, capsys, plans):
    code, _, err = cli(capsys, "plan", MLP, "--profile", plans["mlp"])
    refused(code, err, str(plans["mlp"]), "'node_seconds'")


def test_keys_new_force_replaces_keys_among_other_key_files(tmp_path, capsys):
    d = tmp_path / "keys"
    assert cli(capsys, "keys", "new", d)[0] == 0
    other = d / "coordinator-b.key"  # another coordinator's public key an agent accepts
    other.write_text("kept\n")
    code, _, err = cli(capsys, "keys", "new", d)
    refused(code, err, "--force")
    assert cli(capsys, "keys", "new", d, "--force")[0] == 0
    assert other.read_text() == "kept\n"
