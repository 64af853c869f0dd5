"""A coordinator reading an agent's replies: every field it uses is checked first. A forged
agent (a real ZeroMQ CURVE server holding the agent's key) answers each request with junk, and
the client names the host and the reply instead of failing later on a missing key or a bad
number."""

from __future__ import annotations

import json
import threading

import pytest
import zmq

from fastserve.engine.agent import AgentClient, HostError
from fastserve.engine.keys import ClusterKeys
from fastserve.engine.security import KeyPair

pytestmark = pytest.mark.timeout(60)

GOOD = {"resources": {"host": "h", "cores": 2, "memory_bytes": 1 << 30, "flops": 1e9,
                      "refused": 0, "malformed": {}},
        "status": {"ranks": {"0": None, "3": "exited with code 1"}},
        "have": {"path": None}, "put": {"path": "/cache/x.safetensors"},
        "logs": {"text": "rank 0: ready"}}

BAD = [
    ("resources", {}),
    ("resources", {**GOOD["resources"], "cores": 0}),
    ("resources", {**GOOD["resources"], "cores": "2"}),
    ("resources", {**GOOD["resources"], "cores": True}),
    ("resources", {**GOOD["resources"], "memory_bytes": -1}),
    ("resources", {**GOOD["resources"], "memory_bytes": 2.5}),
    ("resources", {**GOOD["resources"], "flops": "fast"}),
    ("resources", {**GOOD["resources"], "flops": -1.0}),
    ("resources", {**GOOD["resources"], "refused": None}),
    ("resources", {**GOOD["resources"], "host": ["h"]}),
    ("resources", {**GOOD["resources"], "host": "h" * 257}),
    ("status", {}),
    ("status", {"ranks": []}),
    ("status", {"ranks": {"zero": None}}),
    ("status", {"ranks": {"-1": None}}),
    ("status", {"ranks": {"0": 7}}),
    ("status", {"ranks": {str(i): None for i in range(1025)}}),
    ("have", {"path": 5}),
    ("have", {"path": ""}),
    ("put", {"path": ["/x"]}),
    ("logs", {"text": 12}),
    ("logs", {"text": "x" * (1 << 20)}),
]


@pytest.fixture
def forged():
    """A forged agent that answers the next request with the reply it is given."""
    agent, coordinator = KeyPair.new(), KeyPair.new()
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.curve_server = True
    server.curve_secretkey = agent.secret.encode()
    server.curve_publickey = agent.public.encode()
    port = server.bind_to_random_port("tcp://127.0.0.1")
    replies: list[dict] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not server.poll(50):
                continue
            ident, doc, *_ = server.recv_multipart()
            req = json.loads(doc)
            server.send_multipart([ident, json.dumps(
                {"id": req["id"], "ok": True, **replies.pop(0)}).encode()])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = AgentClient(ctx, "h1", f"127.0.0.1:{port}",
                         ClusterKeys(coordinator, (agent.public,)), timeout=5.0)
    try:
        yield client, replies
    finally:
        client.close()
        stop.set()
        thread.join(5)
        server.close(linger=0)
        ctx.term()


def test_well_formed_replies_are_taken(forged):
    client, replies = forged
    for cmd, reply in GOOD.items():
        replies.append(reply)
        got, _ = client.request(cmd)
        assert {k: got[k] for k in reply} == reply


@pytest.mark.parametrize("cmd,reply", BAD, ids=[f"{c}-{i}" for i, (c, _) in enumerate(BAD)])
def test_a_malformed_reply_names_the_host_and_the_command(forged, cmd, reply):
    client, replies = forged
    replies.append(reply)
    with pytest.raises(HostError) as e:
        client.request(cmd)
    assert f"host 'h1' (127.0.0.1:" in str(e.value)
    assert f"sent a malformed reply to '{cmd}'" in str(e.value)
    replies.append(GOOD[cmd])  # the link still works
    client.request(cmd)
