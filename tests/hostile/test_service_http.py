"""The service's HTTP front against a real one-replica service over graphs/mlp.yaml: valid JSON
and msgpack requests equal the reference run; a hostile corpus (malformed JSON and msgpack,
lying sizes, wrong content types) gets the right 4xx with a JSON error naming the problem and
never a 500, and the service keeps serving; management routes need the token; health, status
and Prometheus metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgpack
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

import fastserve.graph as G
from fastserve.service import Limits, Service, ServiceConfig
from fastserve.service.http import make_app

from conftest import outliving_the_test, rank_processes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)
LIMIT = 1 << 16
TOKEN = "s3cret"
MSGPACK = "application/msgpack"


@pytest.fixture(scope="module")
def svc():
    before = set(rank_processes())
    with outliving_the_test():  # the module's ranks, although the first test starts them
        service = Service(ServiceConfig(spec=str(ROOT / "graphs/mlp.yaml"),
                                        limits=Limits(max_body_bytes=LIMIT)))
        service.start()
    try:
        yield service
    finally:
        service.stop()
        deadline = time.monotonic() + 10
        while set(rank_processes()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not set(rank_processes()) - before, "the service's ranks outlived the module"


@pytest.fixture(scope="module")
def client(svc):
    # a 500 must show as a status the tests can assert on, not as a raised exception
    return TestClient(make_app(svc, token=TOKEN), raise_server_exceptions=False)


def x_of(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 64, generator=torch.Generator().manual_seed(seed))


def packed(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.numpy().tobytes()}


def unpacked(doc: dict) -> torch.Tensor:
    assert set(doc) == {"dtype", "shape", "data"}
    dtype = getattr(torch, doc["dtype"])
    return torch.frombuffer(bytearray(doc["data"]), dtype=dtype).reshape(doc["shape"])


def post_json(client, doc, **headers):
    return client.post("/v1/infer", content=json.dumps(doc).encode(),
                       headers={"content-type": "application/json", **headers})


def post_msgpack(client, doc=None, raw: bytes | None = None):
    body = raw if raw is not None else msgpack.packb(doc)
    return client.post("/v1/infer", content=body, headers={"content-type": MSGPACK})


def assert_valid_request_succeeds(svc, client, seed: int = 1) -> None:
    x = x_of(3, seed)
    r = post_json(client, {"inputs": {"x": x.tolist()}})
    assert r.status_code == 200, r.text
    want = G.reference(svc.graph, {"x": x})
    got = r.json()["outputs"]
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(torch.tensor(got[name]), want[name])


def assert_refused(r, status: int, names: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str)
    assert names.lower() in doc["error"].lower(), doc["error"]


# --- valid requests ----------------------------------------------------------------------------

def test_a_json_request_equals_the_reference(svc, client):
    x = x_of(4)
    r = post_json(client, {"inputs": {"x": x.tolist()}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    outputs = r.json()["outputs"]
    want = G.reference(svc.graph, {"x": x})
    assert set(outputs) == set(want) == {"head"}
    got = torch.tensor(outputs["head"])
    assert got.shape == (4, 10)
    torch.testing.assert_close(got, want["head"])


def test_a_request_past_the_queue_budget_gets_503_and_when_to_retry(svc, client, monkeypatch):
    # 3 samples running at a measured 2 s each: 6 s ahead of a request, past a 0.5 s budget
    monkeypatch.setattr(svc.queue, "budget_s", 0.5)
    monkeypatch.setattr(svc.queue, "per_sample", 2.0)
    monkeypatch.setattr(svc.queue, "_running", 3)
    overloaded = svc.outcomes["overloaded"]
    r = post_json(client, {"inputs": {"x": x_of(1).tolist()}})
    assert r.status_code == 503 and r.headers["retry-after"] == "6"
    assert "queue_budget_ms" in r.json()["error"]
    assert svc.outcomes["overloaded"] == overloaded + 1
    monkeypatch.setattr(svc.queue, "_running", 0)  # nothing ahead: admitted and answered
    r = post_json(client, {"inputs": {"x": x_of(1).tolist()}})
    assert r.status_code == 200 and "retry-after" not in r.headers


def test_a_request_bigger_than_max_batch_is_answered_whole(svc, client):
    x = x_of(svc.config.batching.max_batch * 3 + 1, seed=5)
    r = post_json(client, {"inputs": {"x": x.tolist()}})
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["outputs"]["head"]),
                               G.reference(svc.graph, {"x": x})["head"])


def test_a_json_request_accepting_msgpack_is_answered_in_msgpack(svc, client):
    x = x_of(2, seed=2)
    r = post_json(client, {"inputs": {"x": x.tolist()}}, accept=MSGPACK)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(MSGPACK)
    doc = msgpack.unpackb(r.content)
    assert set(doc) == {"outputs"} and set(doc["outputs"]) == {"head"}
    torch.testing.assert_close(unpacked(doc["outputs"]["head"]),
                               G.reference(svc.graph, {"x": x})["head"])


def test_a_msgpack_request_equals_the_reference_in_msgpack(svc, client):
    x = x_of(3, seed=3)
    r = post_msgpack(client, {"inputs": {"x": packed(x)}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(MSGPACK)
    doc = msgpack.unpackb(r.content)
    assert set(doc) == {"outputs"} and set(doc["outputs"]) == {"head"}
    torch.testing.assert_close(unpacked(doc["outputs"]["head"]),
                               G.reference(svc.graph, {"x": x})["head"])


# --- the hostile corpus: JSON ------------------------------------------------------------------

ROW = [0.25] * 64


def doc(**inputs) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# (id, body, content type, status, what the error must name)
JSON_CORPUS = [
    ("not-json", b"{inputs: x}", "application/json", 400, "not JSON"),
    ("truncated-json", doc(x=[ROW])[:-3], "application/json", 400, "not JSON"),
    ("empty-body", b"", "application/json", 400, "not JSON"),
    ("not-utf8", b'{"inputs": {"x": [[\xff\xfe]]}}', "application/json", 400, "not JSON"),
    ("no-content-type-not-json", b"\x00\x01\x02", "", 400, "not JSON"),
    ("json-list", b"[1, 2, 3]", "application/json", 400, '{"inputs"'),
    ("json-string", b'"x"', "application/json", 400, '{"inputs"'),
    ("json-null", b"null", "application/json", 400, '{"inputs"'),
    ("inputs-a-list", b'{"inputs": [[0.25]]}', "application/json", 400, '{"inputs"'),
    ("inputs-null", b'{"inputs": null}', "application/json", 400, '{"inputs"'),
    ("no-inputs-key", b'{"x": [[0.25]]}', "application/json", 400, '{"inputs"'),
    ("extra-top-level-key", json.dumps({"inputs": {"x": [ROW]}, "debug": True}).encode(),
     "application/json", 400, '{"inputs"'),
    ("unknown-input", doc(x=[ROW], y=[ROW]), "application/json", 400, "'y' is not an input"),
    ("only-unknown-input", doc(z=[ROW]), "application/json", 400, "'z' is not an input"),
    ("missing-input", doc(), "application/json", 400, "no array for graph input 'x'"),
    ("ragged", doc(x=[ROW, ROW[:-1]]), "application/json", 400, "not a rectangular"),
    ("ragged-depth", doc(x=[ROW, [ROW]]), "application/json", 400, "not a rectangular"),
    ("strings", doc(x=[["0.5"] * 64]), "application/json", 400, "not a rectangular"),
    ("nulls", doc(x=[[None] * 64]), "application/json", 400, "not a rectangular"),
    ("maps-in-list", doc(x=[[{}] * 64]), "application/json", 400, "not a rectangular"),
    ("value-a-string", doc(x="0.5"), "application/json", 400, "expected a nested list"),
    ("value-null", doc(x=None), "application/json", 400, "expected a nested list"),
    ("value-a-bool", doc(x=True), "application/json", 400, "expected a nested list"),
    ("value-a-number", doc(x=0.5), "application/json", 400, "expected a nested list"),
    ("value-a-map", doc(x={"data": [ROW]}), "application/json", 400, "expected a nested list"),
    ("huge-integer", b'{"inputs": {"x": [[' + b"9" * 400 + b"]]}}", "application/json", 400,
     "not a rectangular"),
    ("rank-1", doc(x=ROW), "application/json", 400, "has 1 dims"),
    ("rank-3", doc(x=[[ROW]]), "application/json", 400, "has 3 dims"),
    ("scalar-in-list", doc(x=[0.5]), "application/json", 400, "has 1 dims"),
    ("wrong-fixed-dim", doc(x=[ROW[:-1]]), "application/json", 400, "fixes it to 64"),
    ("too-wide", doc(x=[ROW + [0.5]]), "application/json", 400, "fixes it to 64"),
    ("empty-batch", doc(x=[]), "application/json", 400, "input 'x'"),
    ("empty-rows", doc(x=[[]]), "application/json", 400, "input 'x'"),
    ("nested-10000", b'{"inputs": {"x": ' + nested(10000) + b"}}", "application/json", 400,
     "not JSON"),
    ("bare-nested-10000", nested(10000), "application/json", 400, "not JSON"),
    ("maps-nested-5000", b'{"a":' * 5000 + b"1" + b"}" * 5000, "application/json", 400,
     "not JSON"),
    ("nested-200", b'{"inputs": {"x": ' + nested(200) + b"}}", "application/json", 400,
     "not a rectangular"),
    ("over-max-body", doc(x=[[0.123456789] * 64] * 120), "application/json", 413,
     "max_body_bytes"),
    ("text-plain", doc(x=[ROW]), "text/plain", 415, "content type"),
    ("form", b"x=1", "application/x-www-form-urlencoded", 415, "content type"),
    ("json-lookalike", doc(x=[ROW]), "application/jsonx", 415, "content type"),
    ("octet-stream", msgpack.packb({"inputs": {}}), "application/octet-stream", 415,
     "content type"),
]
assert len(doc(x=[[0.123456789] * 64] * 120)) > LIMIT


@pytest.mark.parametrize("body,kind,status,names", [c[1:] for c in JSON_CORPUS],
                         ids=[c[0] for c in JSON_CORPUS])
def test_a_hostile_json_request_is_refused_with_a_4xx_naming_the_problem(client, body, kind,
                                                                         status, names):
    headers = {"content-type": kind} if kind else {}
    r = client.post("/v1/infer", content=body, headers=headers)
    assert_refused(r, status, names)


# JSON that is not finite (NaN, Infinity, beyond float32) is refused with a JSON answer
NON_FINITE = [
    ("nan", b'{"inputs": {"x": [[NaN' + b", 0.5" * 63 + b"]]}}"),
    ("infinity", b'{"inputs": {"x": [[-Infinity' + b", 0.5" * 63 + b"]]}}"),
    ("beyond-float32", b'{"inputs": {"x": [[1e39' + b", 0.5" * 63 + b"]]}}"),
    ("beyond-float64", b'{"inputs": {"x": [[1e400' + b", 0.5" * 63 + b"]]}}"),
]


@pytest.mark.parametrize("body", [c[1] for c in NON_FINITE], ids=[c[0] for c in NON_FINITE])
def test_non_finite_json_values_get_a_json_answer_not_a_500(client, body):
    r = client.post("/v1/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:200])
    assert r.headers["content-type"].startswith("application/json")
    assert "error" in r.json() or "outputs" in r.json()


@pytest.mark.parametrize("row", [[True] * 64, [False] + [0.5] * 63],
                         ids=["all-bools", "one-bool"])
def test_booleans_are_not_numbers(client, row):
    assert_refused(post_json(client, {"inputs": {"x": [row]}}), 400, "input 'x'")


def test_outputs_json_cannot_carry_are_a_4xx_naming_msgpack(client):
    # finite float32 inputs whose outputs overflow: the answer exists, JSON cannot hold it
    r = post_json(client, {"inputs": {"x": [[3e38] * 64]}})
    assert_refused(r, 422, MSGPACK)
    r = post_json(client, {"inputs": {"x": [[3e38] * 64]}}, accept=MSGPACK)
    assert r.status_code == 200 and r.headers["content-type"] == MSGPACK


def test_a_large_body_is_parsed_off_the_event_loop_with_the_same_checks(svc, client,
                                                                      monkeypatch):
    import fastserve.service.http as http

    monkeypatch.setattr(http, "INLINE_PARSE_BYTES", 0)  # every body takes the thread's path
    assert_valid_request_succeeds(svc, client, seed=4)
    x = x_of(2, 5)
    r = post_msgpack(client, {"inputs": {"x": packed(x)}})
    assert r.status_code == 200
    torch.testing.assert_close(unpacked(msgpack.unpackb(r.content)["outputs"]["head"]),
                               G.reference(svc.graph, {"x": x})["head"])
    assert_refused(post_json(client, {"inputs": {"x": [[True] * 64]}}), 400, "input 'x'")
    assert_refused(client.post("/v1/infer", content=b"[" * 3000,
                               headers={"content-type": "application/json"}), 400, "not JSON")
    assert_refused(post_msgpack(client, raw=b"\xc1"), 400, "not msgpack")


@pytest.mark.parametrize("dtype,good,bad", [
    (torch.bool, [[True, False]], [[[5, -3, 0]], [[1, 0]], [[0.5, 1.0]]]),
    (torch.uint8, [[0, 255]], [[[-1, 3]], [[256]], [[True, 1]]]),
    (torch.int8, [[-128, 127]], [[[-129]], [[128]]]),
    (torch.int64, [[-(2 ** 63), 2 ** 63 - 1]], [[[2 ** 63]], [[1.5]]]),
], ids=["bool", "uint8", "int8", "int64"])
def test_json_values_must_be_of_the_input_dtype_and_in_its_range(dtype, good, bad):
    # (no shipped graph takes these: the parser itself, as the front calls it)
    from fastserve.service.http import BadRequest, _inputs

    body = json.dumps({"inputs": {"m": good}}).encode()
    assert _inputs("application/json", body, {"m": dtype})["m"].tolist() == good
    for value in bad:
        with pytest.raises(BadRequest, match="input 'm'"):
            _inputs("application/json", json.dumps({"inputs": {"m": value}}).encode(),
                    {"m": dtype})


def test_msgpack_bool_data_must_be_zeros_and_ones():
    from fastserve.service.http import BadRequest, _inputs

    def body(data: bytes) -> bytes:
        return msgpack.packb({"inputs": {"m": {"dtype": "bool", "shape": [3], "data": data}}})

    assert _inputs(MSGPACK, body(b"\x00\x01\x01"), {"m": torch.bool})["m"].tolist() == \
        [False, True, True]
    with pytest.raises(BadRequest, match="bytes 0 and 1"):
        _inputs(MSGPACK, body(b"\x00\x02\xff"), {"m": torch.bool})


def test_a_request_the_front_stopped_waiting_for_counts_once_as_its_outcome(svc):
    # the front withdraws a request held past its deadline (or whose client left): counted
    # once, as that; the done callback must not fail (future.exception() raises on a
    # cancelled future) nor count it again
    from concurrent.futures import Future

    from fastserve.service.queue import Request

    for outcome in ("timeout", "cancelled"):
        before = dict(svc.outcomes)
        request = Request({"x": x_of(1)}, 1, (), time.monotonic() + 1)
        request.future.add_done_callback(lambda f, r=request: svc._finished(r, f))
        assert svc.withdraw(request.future, outcome)
        assert not svc.withdraw(request.future, outcome)
        after = dict(svc.outcomes)
        assert after.pop(outcome, 0) == before.pop(outcome, 0) + 1 and after == before
        assert isinstance(request.future, Future) and not request.answer({"head": x_of(1)})


def test_withdrawing_while_the_queue_answers_an_expired_request_does_not_deadlock(svc):
    # the front withdraws (cancel runs the queue's callback: its lock) while the queue, under
    # its lock, answers an expired request 504 (the service's callback: counting it)
    import threading

    from fastserve.service.queue import Request, RequestQueue

    queue = RequestQueue(10, 4, 0.0)
    expired = Request({"x": x_of(1)}, 1, (), time.monotonic() - 1)
    waiting = Request({"x": x_of(1)}, 1, (), time.monotonic() + 60)
    for r in (expired, waiting):
        queue.put(r)
    inside = threading.Event()

    def hold(_f) -> None:  # the queue's lock is held while this runs
        inside.set()
        time.sleep(0.5)

    expired.future.add_done_callback(hold)
    for r in (expired, waiting):
        r.future.add_done_callback(lambda f, r=r: svc._finished(r, f))
    expiring = threading.Thread(target=queue.expire, daemon=True)
    expiring.start()
    assert inside.wait(10)
    withdrawing = threading.Thread(target=svc.withdraw, args=(waiting.future,), daemon=True)
    withdrawing.start()
    expiring.join(10)
    withdrawing.join(10)
    assert not expiring.is_alive() and not withdrawing.is_alive(), "deadlocked"
    assert waiting.future.cancelled() and expired.future.exception().status == 504


def test_a_body_over_the_limit_with_a_lying_content_length_is_refused_413(client):
    body = doc(x=[[0.123456789] * 64] * 120)
    for declared in ("10", "0", str(LIMIT)):
        r = client.post("/v1/infer", content=body, headers={
            "content-type": "application/json", "content-length": declared})
        assert_refused(r, 413, "max_body_bytes")


def test_a_content_length_over_the_limit_is_refused_413_before_the_body(client):
    for declared in (str(LIMIT + 1), "99999999999999999999", "-1", "abc"):
        r = client.post("/v1/infer", content=doc(x=[ROW]), headers={
            "content-type": "application/json", "content-length": declared})
        assert_refused(r, 413, "max_body_bytes")


# --- the hostile corpus: msgpack ---------------------------------------------------------------

X2 = x_of(2, seed=4)
GOOD = packed(X2)  # shape [2, 64]: 512 bytes of data


def mdoc(**tensor) -> dict:
    return {"inputs": {"x": {**GOOD, **tensor}}}


# (id, document or raw bytes, status, what the error must name, msgpack or not)
MSGPACK_CORPUS = [
    ("garbage", b"\xc1\xc1\xc1\xc1", 400, "not msgpack", False),
    ("truncated", msgpack.packb(mdoc())[:-7], 400, "not msgpack", False),
    ("trailing-bytes", msgpack.packb(mdoc()) + b"\x00", 400, "not msgpack", False),
    ("huge-array-header", b"\xdd\xff\xff\xff\xff", 400, "not msgpack", False),
    ("deep-nesting", b"\x91" * 60000 + b"\xc0", 400, "not msgpack", False),
    ("json-body", doc(x=[ROW]), 400, "not msgpack", False),
    ("not-a-map", [1, 2, 3], 400, '{"inputs"', True),
    ("extra-top-level-key", {**mdoc(), "debug": True}, 400, '{"inputs"', True),
    ("bytes-top-level-key", {b"inputs": mdoc()["inputs"]}, 400, '{"inputs"', True),
    ("bytes-input-name", {"inputs": {b"x": GOOD}}, 400, "input names must be strings", True),
    ("unknown-input", {"inputs": {"x": GOOD, "y": GOOD}}, 400, "'y' is not an input", True),
    ("missing-input", {"inputs": {}}, 400, "no array for graph input 'x'", True),
    ("tensor-a-list", {"inputs": {"x": [[0.5] * 64]}}, 400, "exactly dtype, shape and data",
     True),
    ("extra-tensor-key", mdoc(strides=[64, 1]), 400, "exactly dtype, shape and data", True),
    ("missing-tensor-key", {"inputs": {"x": {"dtype": "float32", "shape": [2, 64]}}}, 400,
     "exactly dtype, shape and data", True),
    ("wrong-dtype", mdoc(dtype="float64", data=X2.double().numpy().tobytes()), 400, "dtype",
     True),
    ("unknown-dtype", mdoc(dtype="complex1024"), 400, "dtype", True),
    ("dtype-not-a-string", mdoc(dtype=7), 400, "dtype", True),
    ("shape-negative", mdoc(shape=[-2, -64]), 400, "shape must be", True),
    ("shape-bool", mdoc(shape=[True, 64]), 400, "shape must be", True),
    ("shape-huge", mdoc(shape=[2 ** 40, 64]), 400, "shape must be", True),
    ("shape-float", mdoc(shape=[2.0, 64]), 400, "shape must be", True),
    ("shape-too-many-dims", mdoc(shape=[1] * 9), 400, "shape must be", True),
    ("shape-not-a-list", mdoc(shape="2,64"), 400, "shape must be", True),
    ("shape-product-huge", mdoc(shape=[2 ** 31 - 1] * 8), 400, "data must be", True),
    ("data-short", mdoc(data=GOOD["data"][:-1]), 400, "data must be 512 raw bytes", True),
    ("data-long", mdoc(data=GOOD["data"] + b"\0" * 4), 400, "data must be 512 raw bytes", True),
    ("data-a-string", mdoc(data="AAAA"), 400, "data must be", True),
    ("data-a-list", mdoc(data=[0.5] * 128), 400, "data must be", True),
    ("data-null", mdoc(data=None), 400, "data must be", True),
    ("empty-batch", mdoc(shape=[0, 64], data=b""), 400, "empty", True),
    ("wrong-rank", mdoc(shape=[128]), 400, "has 1 dims", True),
    ("wrong-fixed-dim", mdoc(shape=[4, 32]), 400, "fixes it to 64", True),
    ("over-max-body", mdoc(shape=[300, 64], data=b"\0" * (300 * 64 * 4)), 413, "max_body_bytes",
     False),
]


@pytest.mark.parametrize("body,status,names", [
    pytest.param(*c[1:4], id=c[0])
    for c in MSGPACK_CORPUS])
def test_a_hostile_msgpack_request_is_refused_with_a_4xx_naming_the_problem(client, body, status,
                                                                            names):
    raw = body if isinstance(body, bytes) else msgpack.packb(body)
    assert_refused(post_msgpack(client, raw=raw), status, names)


def test_the_service_still_serves_after_the_hostile_corpus(svc, client):
    for _, body, kind, _, _ in JSON_CORPUS:
        r = client.post("/v1/infer", content=body, headers={"content-type": kind} if kind else {})
        assert 400 <= r.status_code < 500
    for _, body, _, _, _ in MSGPACK_CORPUS:
        raw = body if isinstance(body, bytes) else msgpack.packb(body)
        assert 400 <= post_msgpack(client, raw=raw).status_code < 500
    assert_valid_request_succeeds(svc, client)
    assert svc.ready and all(r.restarts == 0 for r in svc.replicas)


# --- management --------------------------------------------------------------------------------

MANAGEMENT = ["/v1/scale", "/v1/drain", "/v1/stop"]


@pytest.mark.parametrize("route", MANAGEMENT)
def test_management_without_the_token_is_refused_401(svc, client, route):
    body = {"replicas": 1} if route == "/v1/scale" else {}
    # none of these may ever be taken for the token: drain and stop would end the shared service
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN},
                    {"authorization": f"Basic {TOKEN}"}, {"authorization": f"Bearer {TOKEN}x"},
                    {"authorization": f"Bearer {TOKEN[:-1]}"}, {"authorization": "Bearer "},
                    {"authorization": f"Bearer{TOKEN}"}, {"authorization": f"Bearer  {TOKEN}"},
                    {"authorization": f"Bearer {TOKEN} "}):
        r = client.post(route, json=body, headers=headers)
        assert_refused(r, 401, "Authorization: Bearer TOKEN")
    assert svc.ready
    assert_valid_request_succeeds(svc, client, seed=7)


@pytest.mark.parametrize("route", MANAGEMENT)
def test_management_is_off_without_a_token(svc, route):
    off = TestClient(make_app(svc, token=None), raise_server_exceptions=False)
    body = {"replicas": 1} if route == "/v1/scale" else {}
    for headers in ({}, {"authorization": f"Bearer {TOKEN}"}, {"authorization": "Bearer None"},
                    {"authorization": "Bearer "}):
        assert_refused(off.post(route, json=body, headers=headers), 403, "management is off")
    assert svc.ready


AUTH = {"authorization": f"Bearer {TOKEN}"}


def test_scale_to_the_same_count_with_the_token(svc, client):
    r = client.post("/v1/scale", json={"replicas": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"replicas": 1}
    # the scheme's case does not matter (RFC 7235)
    r = client.post("/v1/scale", json={"replicas": 1}, headers={"authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200 and r.json() == {"replicas": 1}
    assert len(svc.running_replicas()) == 1 and svc.ready
    assert_valid_request_succeeds(svc, client, seed=8)


@pytest.mark.parametrize("body,names", [
    (b'{"replicas": 2}', "between 1 and 1"),
    (b'{"replicas": 0}', "between 1 and 1"),
    (b'{"replicas": -3}', "between 1 and 1"),
    (b'{"replicas": 1000000}', "between 1 and 1"),
    (b'{"replicas": true}', "integer"),
    (b'{"replicas": 1.0}', "integer"),
    (b'{"replicas": "1"}', "integer"),
    (b'{"replicas": null}', "integer"),
    (b'{}', "integer"),
    (b'[1]', "integer"),
    (b'not json', '{"replicas": N}'),
    (b"", '{"replicas": N}'),
    (b"[" * 3000, '{"replicas": N}'),  # nested past Python's recursion limit
    (b'{"replicas": ' + b"1" * 5000 + b"}", "larger than 4096"),  # over its bound: 413
], ids=["beyond-max", "zero", "negative", "million", "bool", "float", "string", "null",
        "no-key", "list", "not-json", "empty", "nested", "oversized"])
def test_a_bad_scale_request_is_refused_400(svc, client, body, names):
    r = client.post("/v1/scale", content=body, headers={**AUTH,
                                                        "content-type": "application/json"})
    assert_refused(r, 413 if len(body) > 4096 else 400, names)
    assert len(svc.running_replicas()) == 1 and svc.ready


# --- health, status, metrics -------------------------------------------------------------------

def test_health_and_readiness(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"alive": True}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_status_is_json_of_a_ready_service(svc, client):
    r = client.get("/v1/status")
    assert r.status_code == 200
    status = r.json()
    assert status["ready"] is True and status["graph"] == "mlp"
    assert status["queue"] == 0 and status["policy"] == "static"
    assert [rep["state"] for rep in status["replicas"]] == ["ready"]
    assert status["replicas"][0]["ranks"] and status["restarts"] == 0
    assert status["requests"].get("ok", 0) >= 1


def metric_families(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def requests_by_outcome(families) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for s in families["fastserve_requests"].samples
            if s.name == "fastserve_requests_total"}


def test_metrics_parse_and_count_invalid_requests(svc, client):
    families = metric_families(client)
    assert {"fastserve_requests", "fastserve_queue_depth", "fastserve_replicas",
            "fastserve_request_seconds", "fastserve_batch_samples"} <= set(families)
    assert families["fastserve_requests"].type == "counter"
    before = requests_by_outcome(families)
    post_json(client, {"inputs": {"x": [ROW[:-1]]}})  # refused by check_inputs (InputsError)
    client.post("/v1/infer", content=b"{", headers={"content-type": "application/json"})
    client.post("/v1/infer", content=b"x", headers={"content-type": "text/plain"})  # 415
    client.post("/v1/infer", content=b"x", headers={"content-type": "application/json",
                                                    "content-length": str(LIMIT + 1)})  # 413
    assert_valid_request_succeeds(svc, client, seed=9)
    families = metric_families(client)
    after = requests_by_outcome(families)
    assert after["invalid"] - before.get("invalid", 0) == 4
    assert after["ok"] - before.get("ok", 0) == 1
    assert after["invalid"] == svc.outcomes["invalid"] and after["ok"] == svc.outcomes["ok"]
    depth = [s.value for s in families["fastserve_queue_depth"].samples]
    assert depth == [0.0]
    assert [s.value for s in families["fastserve_replicas"].samples] == [1.0]
