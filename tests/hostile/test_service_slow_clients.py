"""Clients that take their time or go away, against `serve_http` on a real socket (the server
`fastserve serve` runs) over a one-replica service of graphs/mlp.yaml: headers that trickle or
never come are cut off after limits.header_timeout_s, a body that trickles gets 408 after
limits.body_timeout_s, a client that disconnects withdraws its request, and a second stop
answers only once the service has drained. After each, a normal request still equals the
reference."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import fastserve.graph as G
from fastserve.service import Limits, Service, ServiceConfig, connections
from fastserve.service.http import serve_http

from conftest import outliving_the_test, rank_processes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret"
HEADER_S, BODY_S = 0.5, 1.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(service, base url): the service behind serve_http in a thread, stopped over HTTP."""
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN)
    before = set(rank_processes())
    with outliving_the_test():  # the module's ranks, although the first test starts them
        service = Service(ServiceConfig(
            spec=str(ROOT / "graphs/mlp.yaml"),
            limits=Limits(header_timeout_s=HEADER_S, body_timeout_s=BODY_S)))
        service.start()
    urls: list[str] = []
    server = threading.Thread(target=serve_http, args=(service, "127.0.0.1", 0, TOKEN),
                              kwargs={"ready": urls.append}, daemon=True)
    server.start()
    deadline = time.monotonic() + 30
    while not urls and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert urls, "the server did not start"
        yield service, urls[0]
    finally:
        try:  # (the last test stops it)
            httpx.post(urls[0] + "/v1/stop", headers={"authorization": f"Bearer {TOKEN}"},
                       timeout=60)
        except httpx.HTTPError:
            pass
        server.join(timeout=30)
        service.stop()
        deadline = time.monotonic() + 10
        while set(rank_processes()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.is_alive(), "the server outlived its stop"
        assert not set(rank_processes()) - before, "the service's ranks outlived the module"


def x_of(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed))


def assert_still_serving(service: Service, url: str, seed: int = 1) -> None:
    x = x_of(2, seed)
    r = httpx.post(url + "/v1/infer", json={"inputs": {"x": x.tolist()}}, timeout=30)
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]["head"]),
                               G.reference(service.graph, {"x": x})["head"])


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_after(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (at most ``limit_s``), and what it sent."""
    t0, got = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return time.monotonic() - t0, got


def trickled(url: str, head: bytes) -> float:
    """Seconds until the server cuts off a client that sends ``head``, then a byte every
    0.1 s (a server without deadlines would wait for 10 s of them, then for ever)."""
    with connect(url) as sock:
        t0 = time.monotonic()
        sock.sendall(head)
        try:
            for _ in range(100):
                sock.sendall(b"X")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        closed_after(sock, 5)
        return time.monotonic() - t0


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(served):
    service, url = served
    with connect(url) as sock:
        waited, got = closed_after(sock, 10)
    assert HEADER_S * 0.8 <= waited <= HEADER_S + 3, waited
    assert got == b""
    assert_still_serving(service, url)


def test_headers_that_trickle_are_cut_off_at_the_header_timeout(served):
    service, url = served
    waited = trickled(url, b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n")  # header bytes
    assert waited <= HEADER_S + 4, "the trickle was not cut off"
    assert_still_serving(service, url)


def test_an_idle_keep_alive_connection_serves_its_next_request(served):
    # the header deadline runs from a request's first byte, not from the last response
    service, url = served
    x = x_of(1, 4)
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(2):
            r = client.post("/v1/infer", json={"inputs": {"x": x.tolist()}})
            assert r.status_code == 200, r.text
            time.sleep(HEADER_S * 3)
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]["head"]),
                               G.reference(service.graph, {"x": x})["head"])


def test_a_body_that_trickles_gets_408_and_the_connection_closes(served):
    service, url = served
    body = json.dumps({"inputs": {"x": x_of(1).tolist()}}).encode()
    with connect(url) as sock:
        t0 = time.monotonic()
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        _, got = closed_after(sock, 10)
    head = got.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 408"), got[:200]
    assert b"connection: close" in head
    assert b"limits.body_timeout_s" in got
    assert BODY_S * 0.8 <= time.monotonic() - t0 <= BODY_S + 3
    assert_still_serving(service, url)


def test_a_body_the_route_never_reads_is_cut_off_too(served, monkeypatch):
    # a 401 (or a 503 under overload) answers before the body: the body's trickle would
    # otherwise keep the connection, since every byte stops uvicorn's keep-alive clock
    service, url = served
    monkeypatch.setattr(connections, "BODY_GRACE_S", 0.5)
    waited = trickled(url, b"POST /v1/scale HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000"
                           b"\r\n\r\n")  # then body bytes, unread
    assert waited <= BODY_S + 0.5 + 4, "the trickle was not cut off"
    assert_still_serving(service, url)


def test_a_client_that_goes_away_withdraws_its_request(served):
    service, url = served
    ranks = list(rank_processes())
    assert ranks
    before = service.outcomes.get("cancelled", 0)
    body = json.dumps({"inputs": {"x": x_of(1).tolist()}}).encode()
    for pid in ranks:  # the rank cannot answer while the client leaves (well within hang_s)
        os.kill(pid, signal.SIGSTOP)
    try:
        with connect(url) as sock:
            sock.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.3)
        deadline = time.monotonic() + 1.0
        while service.outcomes.get("cancelled", 0) == before and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    assert service.outcomes.get("cancelled", 0) == before + 1
    assert_still_serving(service, url)


def test_a_second_stop_answers_after_the_drain(served):
    # last: it stops the module's service. Both calls answer only once nothing is left.
    service, url = served
    answers: list[tuple[float, int]] = []

    def stop() -> None:
        r = httpx.post(url + "/v1/stop", headers={"authorization": f"Bearer {TOKEN}"},
                       timeout=60)
        answers.append((time.monotonic(), r.status_code))

    served_one: list[bool] = []

    def request() -> None:
        assert_still_serving(service, url, 9)
        served_one.append(True)

    ranks = list(rank_processes())
    for pid in ranks:  # one request held by a rank that answers in 1 s: the drain waits
        os.kill(pid, signal.SIGSTOP)
    try:
        pending = threading.Thread(target=request)
        pending.start()
        time.sleep(0.3)
        stops = [threading.Thread(target=stop) for _ in range(2)]
        for t in stops:
            t.start()
            time.sleep(0.1)
        time.sleep(0.6)
    finally:
        resumed = time.monotonic()
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    pending.join(timeout=30)
    for t in stops:
        t.join(timeout=60)
    assert [status for _, status in answers] == [200, 200]
    assert all(at >= resumed for at, _ in answers), "a stop answered before the drain ended"
    assert served_one == [True], "the request admitted before the stops was not answered"
