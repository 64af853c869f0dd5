"""Process life cycle: ranks follow the driver process (not the thread that started them),
signals stop everything and leave no files, a rank's log ends with its own last words."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import fastserve.graph as G
from conftest import rank_processes
from fastserve.engine import Deployment, Layout

ROOT = Path(__file__).resolve().parents[2]
MULTIPROC = ROOT / "tests/multiproc"
pytestmark = pytest.mark.timeout(120)


def ranks_of(parent: int) -> list[int]:
    """Live rank processes whose driver is ``parent``."""
    return list(rank_processes(parent))


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_deployment_started_in_a_thread_that_ends_keeps_its_ranks():
    box = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "dep", Deployment.from_spec(str(ROOT / "graphs/mlp.yaml"), Layout(1, 2), timeout=30).start()))
    t.start()
    t.join()
    dep = box["dep"]
    try:
        time.sleep(0.5)  # PR_SET_PDEATHSIG would have killed them by now
        assert all(r.process.poll() is None for r in dep.ranks)
        x = G.random_inputs(dep.graph, 4)
        torch.testing.assert_close(dep.run(x, micro_batches=2)["head"],
                                   G.reference(dep.graph, x)["head"])
    finally:
        dep.stop()


SLOW = """\
name: slow
inputs:
  x: {shape: [batch, 4], dtype: float32}
nodes:
  - {id: fc, op: linear, args: {in_features: 4, out_features: 4}, inputs: [x]}
  - {id: wait, module: "faulty:Slow", args: {seconds: 0.5}, inputs: [fc]}
outputs: [wait]
"""


@pytest.fixture
def slow_run(tmp_path):
    """Start `fastserve run` on a slow 2-stage spec, with its temporary files in a folder of
    ours; return (process, temp dir) once both ranks are loaded."""
    spec = tmp_path / "slow.yaml"
    spec.write_text(SLOW)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join([str(MULTIPROC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastserve.cli", "run", str(spec), "--parallel", "model",
         "--stages", "2", "--threads", "1", "--repeat", "1000", "--trust-code"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any("running a stream" in ln for ln in lines), 60), lines
        yield proc, tmp, lines, reader
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_a_signal_stops_the_ranks_and_removes_every_file(slow_run, signum, code, word):
    proc, tmp, lines, reader = slow_run
    assert len(ranks_of(proc.pid)) == 2 and os.listdir(tmp)
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == code
    reader.join(timeout=5)
    assert lines and lines[-1].startswith(word), lines[-3:]
    assert not any("Traceback" in ln for ln in lines)
    assert wait_until(lambda: not ranks_of(proc.pid), 5), "ranks outlived the driver"
    assert os.listdir(tmp) == [], "the socket directory or rank logs were left behind"


def test_a_killed_driver_leaves_no_ranks_and_no_files(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    driver = textwrap.dedent(f"""
        import time
        from fastserve.engine import Deployment, Layout
        dep = Deployment.from_spec({str(ROOT / 'graphs/mlp.yaml')!r}, Layout(1, 2)).start()
        print("up", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    try:
        assert proc.stdout.readline().strip() == "up"
        assert len(ranks_of(proc.pid)) == 2 and os.listdir(tmp)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not ranks_of(proc.pid), 5), "ranks outlived their driver"
        assert wait_until(lambda: os.listdir(tmp) == [], 5), os.listdir(tmp)
    finally:
        proc.kill()


def test_a_rank_log_ends_with_its_own_last_words():
    with Deployment.from_spec(str(ROOT / "graphs/mlp.yaml"), Layout(1, 2), timeout=30) as dep:
        victim = dep.ranks[1]
        logs = [Path(r.log).read_text() for r in dep.ranks]
        assert not any("Warning" in text for text in logs), logs  # no runpy warning
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
        reason = victim.exit_reason()
        assert reason == "killed by SIGKILL", reason


def test_an_exit_reason_names_any_signal_and_stays_short(tmp_path):
    # a real-time signal has no name in Python, and a rank's last line may be long: the reason
    # travels in an agent's status reply, whose text is bounded
    from fastserve.engine.launcher import MAX_WORDS, RankProcess

    log = tmp_path / "rank.log"
    log.write_text("starting\n" + "x" * 5000)  # no newline at the end
    proc = subprocess.Popen(["sleep", "30"])
    try:
        rank = RankProcess(None, proc, str(log))
        assert rank.exit_reason() is None
        proc.send_signal(signal.SIGRTMIN + 6)
        proc.wait(timeout=10)
        reason = rank.exit_reason()
        assert reason.startswith(f"killed by signal {int(signal.SIGRTMIN) + 6}: xxx")
        assert reason.endswith("...") and len(reason) < MAX_WORDS + 40
    finally:
        proc.kill()
        proc.wait()


def test_health_is_answered_while_a_long_batch_computes(tmp_path, monkeypatch):
    spec = tmp_path / "slow.yaml"
    spec.write_text(SLOW.replace("seconds: 0.5", "seconds: 4"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(MULTIPROC),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(MULTIPROC))
    with Deployment.from_spec(str(spec), Layout(1, 2), timeout=30, trust_code=True) as dep:
        x = G.random_inputs(dep.graph, 2)
        box = {}
        worker = threading.Thread(target=lambda: box.setdefault("out", dep.run(x, 1)))
        t0 = time.monotonic()
        worker.start()
        time.sleep(0.5)  # stage 1 is now inside its 4 s node
        try:
            # the coordinator is not thread-safe: ask through a socket of our own
            replies = _health(dep)
            assert time.monotonic() - t0 < 3.5, "health waited for the batch"
            assert replies[1]["busy"] is True and replies[0]["busy"] is False
        finally:
            worker.join(timeout=30)
        torch.testing.assert_close(box["out"]["wait"], G.reference(dep.graph, x)["wait"])


def _health(dep) -> dict[int, dict]:
    """Ask every rank 'health' over a control socket of our own: a ROUTER the ranks are not
    connected to cannot reach them, so use the deployment's own socket from this thread while
    the run thread only uses the data sockets (the run polls the results socket only)."""
    import zmq

    from fastserve.engine.wire import decode, encode

    sock = dep._control
    for r in dep.ranks:
        sock.send_multipart([f"rank{r.config.rank}".encode(),
                             *encode("control", meta={"cmd": "health"})])
    replies, deadline = {}, time.monotonic() + 3
    while len(replies) < len(dep.ranks) and time.monotonic() < deadline:
        if sock.poll(50, zmq.POLLIN):
            _, *frames = sock.recv_multipart()
            meta = decode(frames).meta
            if meta.get("cmd") == "health":
                replies[meta["rank"]] = meta
    return replies


def test_a_second_sigterm_does_not_cut_the_stop_short():
    """The first SIGTERM raises Terminated; one that arrives while the stop runs is ignored
    (an agent whose authenticator thread was half stopped hung at exit), and the handler the
    CLI replaced is back afterwards."""
    from fastserve.cli.app import Terminated, _terminate_as_exception

    before = signal.getsignal(signal.SIGTERM)
    stopped = False
    with pytest.raises(Terminated):
        with _terminate_as_exception():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the signal interrupts this
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second one, during the clean-up
                time.sleep(0.2)
                stopped = True
    assert stopped
    assert signal.getsignal(signal.SIGTERM) is before
