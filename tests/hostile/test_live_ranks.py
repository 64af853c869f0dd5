"""Hostile traffic against live ranks: malformed floods, stray results, forged peers over tcp.
Every rank survives, answers health checks, and the next run is exact."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

import fastserve.graph as G
from fastserve.engine import Deployment, Layout
from fastserve.engine.security import KeyPair
from fastserve.engine.wire import VERSION, encode
from fastserve.errors import EngineError, RankDeadError
from wireframes import header, header_frames

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "graphs/mlp.yaml")
pytestmark = pytest.mark.timeout(180)


def exact(dep: Deployment, batch: int = 8) -> None:
    inputs = G.random_inputs(dep.graph, batch=batch)
    expected = G.reference(dep.graph, inputs)
    got = dep.run(inputs, micro_batches=2)
    for name, t in expected.items():
        torch.testing.assert_close(got[name], t)


def rss(dep: Deployment) -> dict[int, int]:
    return {r: m["rss"] for r, m in dep.control("stats").items()}


def malformed(rng: random.Random, n_in: int) -> list:
    """One malformed message of a random kind."""
    good = {"v": VERSION, "kind": "data", "req": 1, "mb": 0, "tensors": [["x", "float32", [1, n_in]]],
            "meta": {}}
    pick = rng.randrange(12)
    bad = dict(good)
    if pick == 0:
        return [os.urandom(rng.randrange(1, 64))]
    if pick == 1:
        bad["tensors"] = [["x", "float32", [0, 1 << 40, 1 << 40]]]
    elif pick == 2:
        bad["tensors"] = [["x", ["float32"], [1, n_in]]]
    elif pick == 3:
        bad["kind"] = ["data"]
    elif pick == 4:
        bad["meta"] = {"timings": "x"}
    elif pick == 5:
        bad["meta"] = {"timings": [{"rank": 0, "stage": 0, "recv": 0.0, "start": 0.0,
                                    "end": 0.0}] * 600}
    elif pick == 6:
        bad["req"] = -5
    elif pick == 7:
        return header_frames(good)  # a frame missing
    elif pick == 8:
        return [*header_frames(good), b"\0" * 3]  # a short frame
    elif pick == 9:
        bad["tensors"] = [["x", "float32", [1, n_in + 1]]]  # well-formed, wrong shape
        return [*header_frames(bad), b"\0" * 4 * (n_in + 1)]
    elif pick == 10:
        bad["kind"] = "control"
        bad["meta"] = {"cmd": "stop"}  # a stop on the data socket is not a command
    else:
        bad["mb"] = 1 << 70 if rng.random() < 0.5 else "0"
        return [*header_frames(bad), b"\0" * 4 * n_in] if bad["mb"] == "0" \
            else [header(msgpack.packb([VERSION, "data", good["tensors"]]), b"\xcf" * 9),
                  b"\0" * 4 * n_in]
    return [*header_frames(bad), b"\0" * 4 * n_in]


def test_ten_thousand_hostile_messages_kill_no_rank(capsys):
    with Deployment.from_spec(MLP, Layout(1, 2), timeout=60) as dep:
        exact(dep)
        before = rss(dep)
        n_in = dep.graph.spec.inputs[0].shape[1]
        ctx = zmq.Context.instance()
        socks = [ctx.socket(zmq.PUSH) for _ in dep.ranks]
        for s, r in zip(socks, dep.ranks):
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(dep.endpoint(r.config.rank))
        rng = random.Random(0)
        for i in range(10_000):
            socks[i % len(socks)].send_multipart(malformed(rng, n_in))
        dep.control("health", timeout=5)  # answered while the flood is being read

        def counted():
            stats = dep.control("stats", timeout=30)
            return (sum(sum(m["malformed"].values()) for m in stats.values()),
                    sum(m["errors"] for m in stats.values()), stats)

        # every message is either refused on the wire or answered with an error, exactly once.
        # The errors travel to the coordinator, which reads (and drops) them only while it runs
        # work, so the ranks hold them back in the meantime: run exact batches until all counted
        deadline = time.monotonic() + 90
        while sum(counted()[:2]) < 10_000 and time.monotonic() < deadline:
            exact(dep)
        refused, errors, stats = counted()
        assert refused + errors == 10_000, (refused, errors, stats)
        for s in socks:
            s.close(linger=0)
        after = rss(dep)
        exact(dep)
        assert all(r.process.poll() is None for r in dep.ranks)
        for r in before:  # flat: no per-message growth (10,000 x even 1 KiB would show)
            assert after[r] - before[r] < 32 << 20, (before, after)
        with capsys.disabled():
            print(f"\n10,000 hostile messages: refused {refused}, answered with an error "
                  f"{errors}, by reason {[m['malformed'] for m in stats.values()]}; rank RSS "
                  f"MiB before {[b >> 20 for b in before.values()]} after "
                  f"{[a >> 20 for a in after.values()]}")


def test_stray_results_nobody_reads_do_not_look_like_death():
    with Deployment.from_spec(MLP, Layout(1, 2), timeout=60) as dep:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.connect(dep.endpoint(0))
        x = G.random_inputs(dep.graph, batch=1)
        for i in range(2_000):  # valid work, for a request nobody asked for
            sock.send_multipart(encode("data", request=12345, micro=i, tensors=x))
        replies = dep.control("health", timeout=5)  # answered while data is backed up
        assert set(replies) == {0, 1} and all(m["ok"] for m in replies.values())
        sock.close(linger=0)
        exact(dep)  # the stale results are dropped and counted, the run is exact
        assert dep.dropped["unrequested"] > 0


def deep_header() -> list[bytes]:
    """A 1 KiB header nested 1,000 levels deep (a repr of it recurses past Python's limit)."""
    deep: list = []
    for _ in range(1000):
        deep = [deep]
    return header_frames({"v": VERSION, "kind": "data", "req": 1, "mb": 0, "tensors": [],
                          "meta": {"timings": deep}})


def test_junk_and_forged_results_on_the_results_socket_are_dropped():
    with Deployment.from_spec(MLP, Layout(1, 1), timeout=60) as dep:
        results = dep.results_endpoint
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(results)
        sock.send_multipart([b"junk", b"junk"])
        sock.send_multipart(deep_header())
        head = dep.graph.spec.outputs[0]
        for req in range(4):  # guesses at the next request id
            sock.send_multipart(encode("data", request=req, micro=0,
                                       tensors={head: torch.zeros(8, 10)}))
        # headers that point into the last rank's result ring: outside it, into a ring that
        # does not exist, and (with a guessed request) far ahead of what the rank wrote
        assert list(dep._rings) == [0]
        for shm in ([0, 1 << 40, dep.ring_bytes], [5, 64, 0], [0, 1 << 40, 0]):
            sock.send_multipart(encode("data", request=1, micro=0, meta={"shm": shm},
                                       tensors={head: torch.zeros(8, 10)})[:1])
        sock.close(linger=1000)
        # the same on the data and control sockets
        data = zmq.Context.instance().socket(zmq.PUSH)
        data.connect(dep.endpoint(0))
        data.send_multipart(deep_header())
        ctl = zmq.Context.instance().socket(zmq.DEALER)
        ctl.setsockopt(zmq.IDENTITY, b"rank0")
        ctl.connect(dep.ranks[0].config.control)
        ctl.send_multipart(deep_header())
        exact(dep)
        # the forged results arrive on their own socket: a run may end before all are read,
        # so run again until they have been (each run reads what is waiting)
        deadline = time.monotonic() + 10
        while (dep.dropped["shm"] < 2 or dep.dropped["unrequested"] < 5) and \
                time.monotonic() < deadline:
            exact(dep)
        assert dep.control("health")[0]["ok"]
        assert dep.ranks[0].process.poll() is None
        assert dep.dropped["header"] >= 1 and dep.dropped["meta"] >= 1
        assert dep.dropped["shm"] >= 2 and dep.dropped["unrequested"] >= 5
        exact(dep)  # the ring still carries results
        data.close(linger=0)
        ctl.close(linger=0)


def test_a_trickle_of_junk_does_not_postpone_the_timeout_or_hide_a_dead_rank():
    with Deployment.from_spec(MLP, Layout(1, 2), timeout=3) as dep:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(dep.results_endpoint)
        stop = threading.Event()

        def trickle():
            while not stop.wait(0.05):
                sock.send_multipart([b"junk", b"junk"])

        dep.ranks[1].process.kill()
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(RankDeadError, match="rank 1"):
                dep.run(G.random_inputs(dep.graph, batch=4), micro_batches=2)
        finally:
            stop.set()
            thread.join()
            sock.close(linger=0)
        assert time.monotonic() - t0 < 3, "the trickle postponed noticing the dead rank"


def test_a_taken_port_fails_the_start_at_once_naming_the_socket(monkeypatch):
    from fastserve.engine import launcher

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    new = launcher.Addresses.new
    monkeypatch.setattr(launcher.Addresses, "new", lambda self, name: f"tcp://127.0.0.1:{port}"
                        if name == "r0s1" else new(self, name))
    t0 = time.monotonic()
    try:
        with pytest.raises(EngineError, match=f"rank 1 could not load.*cannot bind its data "
                                              f"socket tcp://127.0.0.1:{port}"):
            Deployment.from_spec(MLP, Layout(1, 2), transport="tcp", timeout=10, load_timeout=60).start()
    finally:
        taken.close()
    assert time.monotonic() - t0 < 30


def _forge(ctx, address: str, keys: KeyPair | None, server: str | None, frames):
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sock.curve_secretkey = keys.secret.encode()
        sock.curve_publickey = keys.public.encode()
        sock.curve_serverkey = server.encode()
    sock.connect(address)
    for _ in range(5):
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # no handshake completed: nothing can be queued to it
            pass
    return sock


def test_tcp_peers_without_the_key_are_refused_and_counted():
    with Deployment.from_spec(MLP, Layout(1, 2), transport="tcp", timeout=60) as dep:
        assert all(r.config.data_in.startswith("tcp://") for r in dep.ranks)
        x = G.random_inputs(dep.graph, batch=2)
        work = encode("data", request=1, micro=0, tensors=x)
        ctx = zmq.Context.instance()
        first, last = dep.ranks[0].config, dep.ranks[-1].config
        stranger = KeyPair.new()
        forged = [
            _forge(ctx, dep.endpoint(0), None, None, work),  # no CURVE at all
            _forge(ctx, dep.endpoint(0), stranger, first.public_key, work),  # unknown key
            _forge(ctx, dep.results_endpoint, stranger, last.downstream_keys[0], work),  # results
            _forge(ctx, first.control, None, None, encode("control", meta={"cmd": "stop"})),
        ]
        deadline = time.monotonic() + 10
        while dep.control("stats")[0]["refused"] < 2 or dep.refused() < 2:
            assert time.monotonic() < deadline, "refusals were not counted"
            time.sleep(0.1)
        for s in forged:
            s.close(linger=0)
        stats = dep.control("stats")
        assert stats[0]["processed"] == 0, "a forged message was run"
        exact(dep)
        processed = dep.control("stats")[0]["processed"]
        assert processed > 0

        # the same connection with the deployment's own key is accepted: the check can fail
        own = KeyPair(dep._keys.public, dep._keys.secret)
        s = _forge(ctx, dep.endpoint(0), own, first.public_key,
                   encode("data", request=99, micro=0, tensors=x))
        deadline = time.monotonic() + 10
        while dep.control("stats")[0]["processed"] == processed:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s.close(linger=0)
