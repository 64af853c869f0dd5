"""Service config files and the management token: a valid file round-trips into ServiceConfig;
every malformed one is refused with a ServiceConfigError naming the file, the key and its line;
the ServiceConfig constructor refuses the same values; token files only their owner can read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fastserve.errors import ServiceConfigError
from fastserve.service.config import (Batching, Limits, Replicas, ServiceConfig, load_config,
                                      parse_listen)
from fastserve.service.token import MAX_TOKEN_BYTES, read_token

ROOT = Path(__file__).resolve().parents[2]

FULL = """\
# a service with every setting
spec: graphs/mlp.yaml
trust_code: true
stages: 2
threads: 3
transport: tcp
replicas:
  policy: hybrid
  min: 2
  max: 5
  interval_s: 0.5
  cooldown: 4
  patience: 6
batching:
  max_batch: 16
  max_wait_ms: 3.5
limits:
  max_queue: 100
  queue_budget_ms: 250
  deadline_s: 12.5
  hang_s: 2
  restart_budget: 7
  attempts: 2
  max_body_bytes: 4096
listen: "[::1]:9000"
token_file: secrets/service.token
"""


def write(tmp_path: Path, text: str, name: str = "service.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_file_round_trips_with_paths_relative_to_the_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    path = write(conf, FULL)
    monkeypatch.chdir(tmp_path)  # not the file's directory: paths must not follow the cwd
    cfg = load_config(path)
    assert cfg == ServiceConfig(
        spec=str(conf / "graphs/mlp.yaml"), trust_code=True, stages=2, threads=3,
        transport="tcp",
        replicas=Replicas(policy="hybrid", min=2, max=5, interval_s=0.5, cooldown=4, patience=6),
        batching=Batching(max_batch=16, max_wait_ms=3.5),
        limits=Limits(max_queue=100, queue_budget_ms=250.0, deadline_s=12.5, hang_s=2.0,
                      restart_budget=7, attempts=2, max_body_bytes=4096),
        listen="[::1]:9000", token_file=str(conf / "secrets/service.token"))
    assert parse_listen(cfg.listen) == ("::1", 9000)


def test_a_minimal_file_takes_the_defaults_and_keeps_absolute_paths(tmp_path):
    spec = tmp_path / "elsewhere" / "model.yaml"
    cfg = load_config(write(tmp_path, f"spec: {spec}\n"))
    assert cfg == ServiceConfig(spec=str(spec))
    assert cfg.replicas == Replicas() and cfg.limits == Limits() and cfg.token_file is None


def test_a_partial_section_keeps_the_other_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "spec: m.yaml\nlimits:\n  hang_s: 1.5\n"))
    assert cfg.limits == Limits(hang_s=1.5)
    assert cfg.spec == str(tmp_path / "m.yaml")


# (id, file text, key, line): the key and the line the error must name
MALFORMED = [
    ("unknown-top-key", "spec: m.yaml\nstages: 1\nbogus: 3\n", "bogus", 3),
    ("unknown-key-in-replicas", "spec: m.yaml\nreplicas:\n  min: 1\n  maxx: 2\n",
     "replicas.maxx", 4),
    ("unknown-key-in-limits", "spec: m.yaml\nlimits:\n  hang: 3\n", "limits.hang", 3),
    ("unknown-key-in-batching", "spec: m.yaml\nbatching: {max_batch: 4, wait: 2}\n",
     "batching.wait", 2),
    ("non-string-top-key", "spec: m.yaml\n7: x\n", "7", 2),
    ("stages-string", "spec: m.yaml\n\nstages: two\n", "stages", 3),
    ("threads-boolean", "spec: m.yaml\nthreads: true\n", "threads", 2),
    ("max-queue-boolean", "spec: m.yaml\nlimits:\n  deadline_s: 5\n  max_queue: false\n",
     "limits.max_queue", 4),
    ("max-batch-float", "spec: m.yaml\nbatching:\n  max_batch: 2.5\n", "batching.max_batch", 3),
    ("hang-nan", "spec: m.yaml\nlimits:\n  attempts: 2\n  hang_s: .nan\n", "limits.hang_s", 4),
    ("wait-infinite", "spec: m.yaml\nbatching:\n  max_wait_ms: .inf\n",
     "batching.max_wait_ms", 3),
    ("deadline-string", "spec: m.yaml\nlimits:\n  deadline_s: 30s\n", "limits.deadline_s", 3),
    ("max-queue-negative", "spec: m.yaml\nlimits:\n  max_queue: -1\n", "limits.max_queue", 3),
    ("queue-budget-negative", "spec: m.yaml\nlimits:\n  queue_budget_ms: -5\n",
     "limits.queue_budget_ms", 3),
    ("queue-budget-string", "spec: m.yaml\nlimits:\n\n  queue_budget_ms: 10ms\n",
     "limits.queue_budget_ms", 4),
    ("max-batch-zero", "spec: m.yaml\nbatching:\n  max_batch: 0\n", "batching.max_batch", 3),
    ("stages-zero", "stages: 0\nspec: m.yaml\n", "stages", 1),
    ("attempts-zero", "spec: m.yaml\nlimits:\n  attempts: 0\n", "limits.attempts", 3),
    ("interval-too-short", "spec: m.yaml\nreplicas:\n  interval_s: 0.01\n",
     "replicas.interval_s", 3),
    ("hang-too-short", "spec: m.yaml\nlimits:\n  hang_s: 0.1\n", "limits.hang_s", 3),
    ("body-too-small", "spec: m.yaml\nlimits:\n  max_body_bytes: 100\n",
     "limits.max_body_bytes", 3),
    ("deadline-too-large", "spec: m.yaml\nlimits:\n  deadline_s: 1.0e+13\n",
     "limits.deadline_s", 3),
    ("restart-budget-negative", "spec: m.yaml\nlimits:\n  restart_budget: -2\n",
     "limits.restart_budget", 3),
    ("dynamic-max-below-min",
     "spec: m.yaml\nreplicas:\n  policy: dynamic\n  min: 3\n  max: 2\n", "replicas.max", 5),
    ("hybrid-max-below-min", "spec: m.yaml\nreplicas: {policy: hybrid, max: 1, min: 4}\n",
     "replicas.max", 2),
    ("static-no-replica", "spec: m.yaml\nreplicas:\n  policy: static\n  min: 0\n",
     "replicas.min", 4),
    ("unknown-policy", "spec: m.yaml\nreplicas:\n  policy: bursty\n", "replicas.policy", 3),
    ("policy-not-string", "spec: m.yaml\nreplicas:\n  policy: [static]\n", "replicas.policy", 3),
    ("listen-no-port", "spec: m.yaml\nlisten: localhost\n", "listen", 2),
    ("listen-port-too-large", "spec: m.yaml\nlisten: 127.0.0.1:70000\n", "listen", 2),
    ("listen-no-host", "spec: m.yaml\nlisten: ':8000'\n", "listen", 2),
    ("listen-port-not-digits", "spec: m.yaml\nlisten: 'host:http'\n", "listen", 2),
    ("listen-integer", "spec: m.yaml\nlisten: 8000\n", "listen", 2),
    ("listen-negative-port", "spec: m.yaml\nlisten: 'host:-1'\n", "listen", 2),
    ("transport-unknown", "spec: m.yaml\ntransport: udp\n", "transport", 2),
    ("trust-code-string", "spec: m.yaml\ntrust_code: 'no'\n", "trust_code", 2),
    ("trust-code-integer", "spec: m.yaml\ntrust_code: 1\n", "trust_code", 2),
    ("token-file-empty", "spec: m.yaml\ntoken_file: ''\n", "token_file", 2),
    ("token-file-integer", "spec: m.yaml\ntoken_file: 5\n", "token_file", 2),
    ("missing-spec", "# no spec\n\nstages: 1\nlisten: 127.0.0.1:8000\n", "spec", 3),
    ("spec-empty", "stages: 1\nspec: ''\n", "spec", 2),
    ("spec-list", "spec: [a.yaml, b.yaml]\n", "spec", 1),
    ("spec-null", "threads: 1\nspec:\n", "spec", 2),
    ("section-is-a-list", "spec: m.yaml\nreplicas:\n  - 1\n  - 2\n", "replicas", 2),
    ("section-is-a-number", "spec: m.yaml\nbatching: 8\n", "batching", 2),
    ("section-is-null", "spec: m.yaml\nlimits:\n", "limits", 2),
    ("duplicate-key", "spec: m.yaml\nstages: 1\nstages: 2\n", "stages", 3),
    # no key to name: the whole document is wrong
    ("top-level-list", "- spec: m.yaml\n- stages: 1\n", None, 1),
    ("invalid-yaml", "spec: m.yaml\nreplicas:\n  min: 1\n max: [\n", None, 4),
    ("tab-indentation", "spec: m.yaml\nlimits:\n\thang_s: 3\n", None, 3),
    ("binary", "spec: m.yaml\nstages: 1\n\0\n", None, 3),
]
NO_LINE = [  # the file has no line to name
    ("empty-file", ""),
    ("only-comments", "# spec: m.yaml\n"),
    ("top-level-string", "graphs/mlp.yaml\n"),
]


@pytest.mark.parametrize("text,key,line", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_a_malformed_file_names_the_file_the_key_and_its_line(tmp_path, text, key, line):
    path = write(tmp_path, text)
    with pytest.raises(ServiceConfigError) as e:
        load_config(path)
    assert e.value.file == str(path)
    assert e.value.key == key
    assert e.value.line == line
    assert str(path) in str(e.value) and f":{line}" in str(e.value)


@pytest.mark.parametrize("text", [c[1] for c in NO_LINE], ids=[c[0] for c in NO_LINE])
def test_a_file_without_settings_is_refused(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ServiceConfigError) as e:
        load_config(path)
    assert e.value.file == str(path) and e.value.key is None


def test_a_missing_file_and_a_directory_are_refused(tmp_path):
    for path in (tmp_path / "absent.yaml", tmp_path):
        with pytest.raises(ServiceConfigError) as e:
            load_config(path)
        assert str(path) in str(e.value)


def test_the_corpus_covers_what_it_claims():
    keys = {c[2] for c in MALFORMED}
    assert len(MALFORMED) + len(NO_LINE) >= 20
    assert {"replicas.max", "limits.hang_s", "listen", "spec", "replicas.policy"} <= keys


# the ServiceConfig constructor refuses the same values: (keyword arguments, key)
BAD_VALUES = [
    ({"stages": 0}, "stages"),
    ({"stages": "two"}, "stages"),
    ({"threads": True}, "threads"),
    ({"threads": 1.5}, "threads"),
    ({"replicas": Replicas(policy="bursty")}, "replicas.policy"),
    ({"replicas": Replicas(policy="dynamic", min=3, max=2)}, "replicas.max"),
    ({"replicas": Replicas(min=0)}, "replicas.min"),
    ({"replicas": Replicas(interval_s=0.0)}, "replicas.interval_s"),
    ({"replicas": Replicas(cooldown=-1)}, "replicas.cooldown"),
    ({"replicas": Replicas(patience=False)}, "replicas.patience"),
    ({"batching": Batching(max_batch=0)}, "batching.max_batch"),
    ({"batching": Batching(max_batch=2.5)}, "batching.max_batch"),
    ({"batching": Batching(max_wait_ms=-1.0)}, "batching.max_wait_ms"),
    ({"batching": Batching(max_wait_ms=float("nan"))}, "batching.max_wait_ms"),
    ({"limits": Limits(hang_s=float("nan"))}, "limits.hang_s"),
    ({"limits": Limits(deadline_s=float("inf"))}, "limits.deadline_s"),
    ({"limits": Limits(max_queue=True)}, "limits.max_queue"),
    ({"limits": Limits(max_queue=-5)}, "limits.max_queue"),
    ({"limits": Limits(attempts=0)}, "limits.attempts"),
    ({"limits": Limits(max_body_bytes=10)}, "limits.max_body_bytes"),
    ({"limits": Limits(max_body_bytes="64MB")}, "limits.max_body_bytes"),
    ({"listen": "localhost"}, "listen"),
    ({"listen": "127.0.0.1:65536"}, "listen"),
    ({"listen": None}, "listen"),
    ({"transport": "udp"}, "transport"),
    ({"trust_code": "yes"}, "trust_code"),
    ({"token_file": ""}, "token_file"),
    ({"token_file": 3}, "token_file"),
    ({"spec": ""}, "spec"),
    ({"spec": None}, "spec"),
]


@pytest.mark.parametrize("kwargs,key", BAD_VALUES,
                         ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_VALUES)])
def test_the_constructor_refuses_the_same_values(kwargs, key):
    with pytest.raises(ServiceConfigError) as e:
        ServiceConfig(**{"spec": "m.yaml", **kwargs})
    assert e.value.key == key and e.value.file is None


def test_the_constructor_accepts_the_edges_of_the_ranges():
    ServiceConfig(spec="m.yaml", replicas=Replicas(policy="dynamic", min=0, max=1,
                                                   interval_s=0.05, cooldown=0),
                  batching=Batching(max_batch=1, max_wait_ms=0),
                  limits=Limits(max_queue=1, deadline_s=0.01, hang_s=0.5, restart_budget=0,
                                attempts=1, max_body_bytes=1024),
                  listen="localhost:0")


def test_a_listen_port_of_superscript_digits_is_refused_by_the_constructor():
    with pytest.raises(ServiceConfigError) as e:
        ServiceConfig(spec="m.yaml", listen="127.0.0.1:²")
    assert e.value.key == "listen"


def test_a_listen_port_of_superscript_digits_is_refused_in_a_file(tmp_path):
    path = write(tmp_path, "spec: m.yaml\nlisten: '127.0.0.1:²'\n")
    with pytest.raises(ServiceConfigError) as e:
        load_config(path)
    assert (e.value.file, e.value.key, e.value.line) == (str(path), "listen", 2)


# --- the management token ----------------------------------------------------------------------

def test_create_writes_a_new_owner_only_token_that_reads_back_the_same(tmp_path):
    path = str(tmp_path / "svc.token")
    token = read_token(path, create=True)
    assert len(token) >= 32 and token.isprintable() and " " not in token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_token(path) == token
    assert read_token(path, create=True) == token  # an existing file is read, not replaced
    other = str(tmp_path / "other.token")
    assert read_token(other, create=True) != token  # random, not a constant


def test_a_token_file_written_by_hand_is_read_stripped(tmp_path):
    path = tmp_path / "svc.token"
    path.write_text("  s3cret-Token_1\n\n")
    path.chmod(0o600)
    assert read_token(str(path)) == "s3cret-Token_1"


def _token_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "svc.token"
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o602, 0o610],
                         ids=lambda m: f"{m:o}")
def test_a_token_file_others_can_reach_is_refused(tmp_path, mode):
    path = _token_file(tmp_path, b"s3cret\n", mode)
    for create in (False, True):
        with pytest.raises(ServiceConfigError) as e:
            read_token(path, create=create)
        assert e.value.file == path and "chmod 600" in str(e.value)


@pytest.mark.parametrize("data", [
    b"", b"\n\n  \n", b"\x00\x01\x02\xff\xfe", "tökén".encode(), b"two words\n",
    b"tab\there", b"a" * (MAX_TOKEN_BYTES + 1), b"b" * 100_000,
], ids=["empty", "blank", "binary", "non-ascii", "space", "tab", "just-oversized", "oversized"])
def test_a_token_file_without_one_printable_token_is_refused(tmp_path, data):
    path = _token_file(tmp_path, data)
    with pytest.raises(ServiceConfigError) as e:
        read_token(path)
    assert e.value.file == path


def test_a_token_of_the_largest_size_is_read(tmp_path):
    path = _token_file(tmp_path, b"c" * MAX_TOKEN_BYTES)
    assert read_token(path) == "c" * MAX_TOKEN_BYTES


def test_a_directory_is_not_a_token_file(tmp_path):
    d = tmp_path / "dir.token"
    d.mkdir(mode=0o700)
    for create in (False, True):
        with pytest.raises(ServiceConfigError) as e:
            read_token(str(d), create=create)
        assert e.value.file == str(d) and "regular file" in str(e.value)


def test_a_missing_token_file_is_refused_without_create(tmp_path):
    path = str(tmp_path / "absent.token")
    with pytest.raises(ServiceConfigError) as e:
        read_token(path)
    assert e.value.file == path and "does not exist" in str(e.value)
    assert not os.path.exists(path)  # and not created


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_token_file_is_refused(tmp_path):
    path = _token_file(tmp_path, b"s3cret\n", 0o200)
    with pytest.raises(ServiceConfigError) as e:
        read_token(path)
    assert e.value.file == path


def test_create_in_a_missing_directory_is_refused_as_a_config_error(tmp_path):
    path = str(tmp_path / "no-such-dir" / "svc.token")
    with pytest.raises(ServiceConfigError) as e:
        read_token(path, create=True)
    assert e.value.file == path


@pytest.mark.parametrize("budget_ms, budget_s", [(0, 12.5), (40, 0.04)])
def test_the_queue_budget_is_the_deadline_unless_given(budget_ms, budget_s):
    from fastserve.service.service import Service

    service = Service(ServiceConfig(spec=str(ROOT / "graphs/mlp.yaml"),
                                    limits=Limits(queue_budget_ms=budget_ms, deadline_s=12.5)))
    assert service.queue.budget_s == budget_s and not service.replicas
