"""Failures come back as typed errors naming the rank, never as hangs; no orphan ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

import fastserve.graph as G
from fastserve.engine import Deployment, Layout
from fastserve.engine.wire import VERSION, encode
from fastserve.errors import RankDeadError, RankError
from wireframes import header_frames

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(120)

SPEC = """\
name: faulty
inputs:
  x: {shape: [batch, 4], dtype: float32}
nodes:
  - {id: fc, op: linear, args: {in_features: 4, out_features: 4}, inputs: [x]}
  - {id: risky, module: "faulty:%s", inputs: [fc]}
  - {id: out, op: linear, args: {in_features: 4, out_features: 2}, inputs: [risky]}
outputs: [out]
"""


@pytest.fixture
def faulty_spec(tmp_path, monkeypatch):
    """A 3-node spec whose middle node is a user module from tests/multiproc/faulty.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(HERE))

    def make(module: str) -> str:
        path = tmp_path / f"{module}.yaml"
        path.write_text(SPEC % module)
        return str(path)

    return make


def test_exception_in_a_rank_names_rank_stage_node_and_rank_keeps_serving(faulty_spec):
    with Deployment.from_spec(faulty_spec("FailOnNegative"), Layout(1, 3), timeout=30,
                    trust_code=True) as dep:
        assert dep.sharding[1].nodes == ("risky",)
        bad = {"x": torch.full((2, 4), -100.0)}
        # fc maps -100s to some vector; find an input whose fc output starts negative
        with torch.no_grad():
            fc = G.build_subgraph(dep.graph, ["fc"], ["x"], ["fc"])
            sign = fc(bad)["fc"].reshape(-1)[0]
        if sign >= 0:
            bad = {"x": -bad["x"]}
        with pytest.raises(RankError) as info:
            dep.run(bad)
        e = info.value
        assert (e.rank, e.stage, e.node) == (1, 1, "risky")
        assert "negative input refused" in str(e) and "rank 1" in str(e)
        good = {"x": -bad["x"]}
        torch.testing.assert_close(dep.run(good)["out"], G.reference(dep.graph, good)["out"])


def test_rank_killed_mid_run_is_named(faulty_spec, tmp_path, monkeypatch):
    busy = tmp_path / "busy"  # the slow rank creates it when its first micro-batch starts
    monkeypatch.setenv("FAULTY_BUSY", str(busy))
    with Deployment.from_spec(faulty_spec("Slow"), Layout(1, 3), timeout=30, trust_code=True) as dep:
        victim = dep.ranks[1]
        x = {"x": torch.randn(8, 4)}
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(dep.run, x, 8)
            deadline = time.monotonic() + 30
            while not busy.exists() and time.monotonic() < deadline and not future.done():
                time.sleep(0.01)
            assert busy.exists() and not future.done(), "the slow rank never started its work"
            victim.process.send_signal(signal.SIGKILL)  # in the middle of a micro-batch
            with pytest.raises(RankDeadError) as info:
                future.result(timeout=30)
        assert info.value.rank == 1
        assert "rank 1 (replica 0, stage 1" in str(info.value) and "SIGKILL" in str(info.value)


def test_killed_driver_leaves_no_ranks(tmp_path):
    driver = textwrap.dedent(f"""
        import sys, time
        from fastserve.engine import Deployment, Layout
        dep = Deployment.from_spec({str(ROOT / 'graphs/mlp.yaml')!r}, Layout(2, 2)).start()
        print(" ".join(str(r.process.pid) for r in dep.ranks), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 4, line
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in pids if _alive(p)]
        assert not alive, f"ranks {alive} outlived their driver"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def garbage_messages(n: int):
    """Malformed messages of many kinds: random bytes, wrong version, truncated, padded,
    lying sizes, bad dtypes, oversized shapes."""
    good = encode("data", tensors={"x": torch.randn(2, 2049)})  # past the inline bound
    head, x = bytes(good[0]), bytes(good[1])
    small = bytes(encode("data", tensors={"x": torch.randn(2, 4)})[0])  # tensor in the header
    header = {"v": VERSION, "kind": "data", "req": 0, "mb": 0, "meta": {}}
    kinds = [
        lambda i: [os.urandom(1 + i % 50)],
        lambda i: [os.urandom(1 + i % 50), x],
        lambda i: [head[:4] + os.urandom(1 + i % 50), x],
        lambda i: [*header_frames({**header, "v": 99, "tensors": []})],
        lambda i: [head],  # truncated: no tensor frame
        lambda i: [head, x, b"extra"],  # padded
        lambda i: [head, x[:-4]],  # short frame
        lambda i: [*header_frames({**header, "tensors": [["x", "complex64", [2, 4]]]}), b"x" * 64],
        lambda i: [*header_frames({**header, "tensors": [["x", "float32", [1 << 39, 4]]]}), b""],
        lambda i: [*header_frames({**header, "kind": "sudo", "tensors": []}), x],
        lambda i: [msgpack.packb([1, 2, 3]), x],
        lambda i: [b""],
        lambda i: [small[:-1 - i % 32]],  # inline bytes cut short
        lambda i: [small + os.urandom(1 + i % 7)],  # inline bytes padded
    ]
    for i in range(n):
        yield kinds[i % len(kinds)](i)


def test_thousand_malformed_messages_are_counted_and_the_rank_keeps_serving():
    with Deployment.from_spec(str(ROOT / "graphs/mlp.yaml"), Layout(1, 2), timeout=30) as dep:
        target = dep.endpoint(0)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(target)
        for frames in garbage_messages(1000):
            sock.send_multipart(frames)
        x = G.random_inputs(dep.graph, 6)
        torch.testing.assert_close(dep.run(x, micro_batches=2)["head"],
                                   G.reference(dep.graph, x)["head"])
        deadline = time.monotonic() + 10
        while (sum(dep.control("stats")[0]["malformed"].values()) < 1000
               and time.monotonic() < deadline):
            time.sleep(0.1)
        stats = dep.control("stats")
        sock.close()
        assert sum(stats[0]["malformed"].values()) == 1000
        assert stats[0]["processed"] == 2 and stats[1]["processed"] == 2


def test_unloadable_shard_is_reported_not_hung(tmp_path):
    spec = tmp_path / "ckpt.yaml"
    spec.write_text((ROOT / "graphs/mlp.yaml").read_text().replace(
        "weights: {seed: 0}", "weights: {checkpoint: missing.safetensors}"))
    from fastserve.errors import EngineError

    with pytest.raises(EngineError, match="could not load its shard.*missing.safetensors"):
        Deployment.from_spec(str(spec), Layout(1, 2), load_timeout=60).start()
