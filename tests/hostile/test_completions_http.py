"""The OpenAI-style completion routes (``POST /v1/completions``, ``POST /v1/chat/completions``)
of a real generating service on two rank processes, against hostile bodies: text that is not
JSON, JSON of the wrong shape or nested past the parser's recursion limit, huge and non-finite
numbers (``10**400``, ``1e400``, ``-0.0``, ``NaN``, ``Infinity``) and booleans in every numeric
field, lone surrogates in text, token ids out of range, malformed chats and stop lists, unknown
fields, wrong content types, bodies past ``limits.max_body_bytes``.

The rule: each gets a 4xx with a JSON ``{"error": ...}`` naming the offending field, never a
500 and never a hang, a streamed one before any event is sent, and the service answers a
well-formed request correctly afterwards. Values at the edge of what is allowed (``-0.0`` as a
temperature, the largest seed, a prompt that just fits the model's positions, a body of exactly
``max_body_bytes``) are answered."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgpack
import pytest

from fastserve.service import Service, ServiceConfig
from fastserve.service.config import Generation, Limits
from fastserve.service.http import make_app
from lms import POSITIONS, VOCAB, hf_gpt2, hf_greedy, prompts, small_gpt2

from conftest import outliving_the_test

pytestmark = pytest.mark.timeout(120)

LIMIT = 4096  # limits.max_body_bytes
MAX_TOKENS = 40  # generation.max_tokens
ANSWER_S = 20.0  # a request not answered within this hangs
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ROUTES = {"completions": COMPLETIONS, "chat": CHAT}
JSON_TYPE = "application/json"


# --- the service -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return small_gpt2(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def svc(lm):
    with outliving_the_test():  # the module's ranks, although the first test starts them
        service = Service(ServiceConfig(
            spec=lm[0], stages=2, limits=Limits(max_body_bytes=LIMIT),
            generation=Generation(enabled=True, max_tokens=MAX_TOKENS, max_seqs=2))).start()
    yield service
    service.stop(drain=False)


@pytest.fixture(scope="module")
def app(svc):
    return make_app(svc)


async def _post(client: httpx.AsyncClient, path: str, body: bytes,
                headers: dict | None) -> httpx.Response:
    h = {"content-type": JSON_TYPE} if headers is None else headers
    return await asyncio.wait_for(client.post(path, content=body, headers=h), ANSWER_S)


def _client(app) -> httpx.AsyncClient:
    # a 500 must show as a status the tests can assert on, not as a raised exception
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://svc")


def send(app, path: str, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    """POST ``body`` (raw bytes, or a document sent as JSON) with ``headers`` (default: a JSON
    content type); a request not answered within ANSWER_S fails the test as a hang."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def main():
        async with _client(app) as client:
            return await _post(client, path, raw, headers)
    try:
        return asyncio.run(main())
    except asyncio.TimeoutError:
        pytest.fail(f"no answer within {ANSWER_S} s to {path} {raw[:120]!r}: a hang")


def send_all(app, requests: list[tuple[str, bytes, dict | None]]) -> list:
    """All ``requests`` at once; each answer, or the exception it raised."""
    async def main():
        async with _client(app) as client:
            return await asyncio.gather(*[_post(client, p, b, h) for p, b, h in requests],
                                        return_exceptions=True)
    return asyncio.run(main())


def assert_refused(r: httpx.Response, status: int | tuple, names: str | tuple) -> None:
    """A JSON ``{"error": ...}`` with ``status`` (or one of them) that names (one of)
    ``names``."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), \
        (r.headers.get("content-type"), r.text[:300])
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    alternatives = names if isinstance(names, tuple) else (names,)
    assert any(n.lower() in doc["error"].lower() for n in alternatives), \
        f"the error {doc['error']!r} does not name {' or '.join(alternatives)}"


def assert_answered(r: httpx.Response, route: str, max_tokens: int,
                    may_stop: bool = False) -> dict:
    """A 200 completion of ``max_tokens`` tokens (fewer only with a stop string that matched)."""
    assert r.status_code == 200, (r.status_code, r.text[:300])
    doc = r.json()
    assert doc["object"] == ("chat.completion" if route == CHAT else "text_completion")
    choice = doc["choices"][0]
    n = len(choice["token_ids"])
    assert all(isinstance(t, int) and 0 <= t < VOCAB for t in choice["token_ids"])
    assert doc["usage"]["completion_tokens"] == n
    if choice["finish_reason"] == "stop" and may_stop:
        assert n <= max_tokens
    else:
        assert choice["finish_reason"] == "length" and n == max_tokens, choice
    return doc


# --- bodies ------------------------------------------------------------------------------------

class Lit(str):
    """A value written into the body as it is: JSON's non-standard NaN and Infinity, numbers
    Python would round (1e400, 1e-400), anything not JSON."""


MISSING = object()  # drops a field of the base request
BASE = {COMPLETIONS: {"prompt": "hi"},
        CHAT: {"messages": [{"role": "user", "content": "hi"}]}}


def body(route: str, **fields) -> bytes:
    """The base request of ``route`` with ``fields`` added or replaced (MISSING: removed)."""
    doc = {**BASE[route], **fields}
    parts = [f"{json.dumps(k)}: {v if isinstance(v, Lit) else json.dumps(v)}"
             for k, v in doc.items() if v is not MISSING]
    return ("{" + ", ".join(parts) + "}").encode()


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def nested_maps(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


HUGE = str(10 ** 400)
DEEP = nested(800)  # within the parser's recursion limit (1000) and the body limit
DEEP_MAPS = nested_maps(550)
TOO_DEEP = nested(1990)  # past the parser's recursion limit, within the body limit

# the values no numeric field takes
NOT_NUMBERS = [
    ("huge-int", Lit(HUGE)), ("huge-negative-int", Lit("-" + HUGE)), ("1e400", Lit("1e400")),
    ("-1e400", Lit("-1e400")), ("NaN", Lit("NaN")), ("Infinity", Lit("Infinity")),
    ("-Infinity", Lit("-Infinity")), ("true", True), ("false", False), ("string", "1"),
    ("list", [1]), ("map", {"value": 1}), ("deep", Lit(DEEP)),
]
# (field, [(id, value)]) out of range or of the wrong kind for that field
OUT_OF_RANGE = {
    "max_tokens": [("-0.0", Lit("-0.0")), ("zero", 0), ("negative", -1),
                   ("over-generation-max", MAX_TOKENS + 1), ("float", Lit("2.0")),
                   ("exponent", Lit("1e1")), ("1e-400", Lit("1e-400"))],
    "temperature": [("negative", -0.1), ("over-2", Lit("2.0000001")),
                    ("tiny-negative", Lit("-1e-300"))],
    "top_p": [("-0.0", Lit("-0.0")), ("zero", 0), ("below-1e-9", Lit("1e-10")),
              ("over-1", Lit("1.0000001")), ("1e-400", Lit("1e-400")), ("negative", -0.5)],
    "top_k": [("-0.0", Lit("-0.0")), ("negative", -1), ("float", 1.5),
              ("over-2^20", (1 << 20) + 1), ("whole-float", Lit("5.0"))],
    "seed": [("-0.0", Lit("-0.0")), ("negative", -1), ("2^63", 1 << 63), ("float", 1.5),
             ("exponent", Lit("1e3"))],
}

# (id, fields, status, names): one bad field each, on both routes
FIELD_CASES = [
    *[(f"{key}-{vid}", {key: value}, 400, f"'{key}'")
      for key in OUT_OF_RANGE for vid, value in NOT_NUMBERS + OUT_OF_RANGE[key]],
    # fields OpenAI clients send that do not apply: only their neutral value
    *[(f"{key}-{vid}", {key: value}, 400, f"'{key}'") for key, vid, value in [
        ("n", "2", 2), ("n", "zero", 0), ("n", "true", True), ("n", "NaN", Lit("NaN")),
        ("n", "huge-int", Lit(HUGE)), ("n", "string", "1"), ("best_of", "3", 3),
        ("echo", "true", True), ("echo", "one", 1), ("echo", "zero", 0),
        ("logprobs", "5", 5), ("logprobs", "zero", 0), ("logprobs", "true", True),
        ("suffix", "text", "x"), ("suffix", "empty", ""),
        ("presence_penalty", "0.5", 0.5), ("presence_penalty", "NaN", Lit("NaN")),
        ("presence_penalty", "Infinity", Lit("Infinity")), ("presence_penalty", "true", True),
        ("frequency_penalty", "huge-int", Lit(HUGE)), ("frequency_penalty", "1e400",
                                                       Lit("1e400")),
        ("logit_bias", "map", {"1": 5}), ("logit_bias", "empty-list", [])]],
    *[(f"{key}-{vid}", {key: value}, 400, f"'{key}'") for key in ("model", "user")
      for vid, value in [("number", 5), ("null", None), ("list", ["gpt2"]), ("map", {}),
                         ("true", True), ("NaN", Lit("NaN"))]],
    *[(f"stream-{vid}", {"stream": value}, 400, "'stream'") for vid, value in [
        ("one", 1), ("zero", 0), ("string-true", "true"), ("string-false", "false"),
        ("null", None), ("list", [True]), ("map", {}), ("NaN", Lit("NaN")),
        ("huge-int", Lit(HUGE))]],
    *[(f"stop-{vid}", {"stop": value}, 400, "'stop'") for vid, value in [
        ("number", 5), ("true", True), ("map", {"a": 1}), ("list-of-numbers", [1, 2]),
        ("list-with-null", ["a", None]), ("list-with-bool", [True]),
        ("empty-string", ""), ("list-with-empty-string", ["a", ""]),
        ("five-stops", ["a", "b", "c", "d", "e"]), ("too-long", "x" * 257),
        ("list-too-long", ["x" * 257]), ("nested-list", [["a"]]), ("NaN", Lit("NaN")),
        ("huge-int", Lit(HUGE)), ("deep", Lit(DEEP)),
        ("lone-high-surrogate", "\ud800"), ("lone-low-surrogate-in-list", ["ok", "\udfff"])]],
    *[(f"unknown-{vid}", {key: 1}, 400, names) for vid, key, names in [
        ("foo", "foo", "foo"), ("empty-name", "", "unknown field"),
        ("capitalized", "Max_Tokens", "Max_Tokens"), ("tools", "tools", "tools"),
        ("functions", "functions", "functions"),
        ("response_format", "response_format", "response_format"),
        ("max_completion_tokens", "max_completion_tokens", "max_completion_tokens"),
        ("long-name", "k" * 300, "k" * 40),
        ("nul-name", "a\u0000b", "unknown field"),
        ("lone-surrogate-name", "\ud800", "unknown field")]],
    ("unknown-deep-value", {"deep": Lit(DEEP_MAPS)}, 400, "deep"),
]

# (id, fields, status, names): the prompt of /v1/completions
PROMPT_CASES = [
    ("prompt-missing", {"prompt": MISSING}, 400, "'prompt'"),
    ("prompt-null", {"prompt": None}, 400, "'prompt'"),
    ("prompt-number", {"prompt": 5}, 400, "'prompt'"),
    ("prompt-true", {"prompt": True}, 400, "'prompt'"),
    ("prompt-map", {"prompt": {"text": "hi"}}, 400, "'prompt'"),
    ("prompt-empty-list", {"prompt": []}, 400, "'prompt'"),
    ("prompt-empty-text", {"prompt": ""}, 400, "prompt"),
    ("prompt-list-of-texts", {"prompt": ["hi", "there"]}, 400, "'prompt'"),
    ("prompt-nested-ids", {"prompt": [[1, 2]]}, 400, "'prompt'"),
    ("prompt-float-id", {"prompt": [1.0]}, 400, "'prompt'"),
    ("prompt-fraction-id", {"prompt": [1.5]}, 400, "'prompt'"),
    ("prompt-bool-id", {"prompt": [1, True]}, 400, "'prompt'"),
    ("prompt-string-id", {"prompt": ["1"]}, 400, "'prompt'"),
    ("prompt-null-id", {"prompt": [1, None]}, 400, "'prompt'"),
    ("prompt-NaN-id", {"prompt": Lit("[NaN]")}, 400, "'prompt'"),
    ("prompt-1e400-id", {"prompt": Lit("[1e400]")}, 400, "'prompt'"),
    ("prompt-negative-id", {"prompt": [5, -1]}, 400, "prompt token ids"),
    ("prompt-id-vocab", {"prompt": [VOCAB]}, 400, "prompt token ids"),
    ("prompt-id-2^63", {"prompt": [1 << 63]}, 400, "prompt token ids"),
    ("prompt-id-huge-int", {"prompt": Lit(f"[{HUGE}]")}, 400, "prompt token ids"),
    ("prompt-id-huge-negative", {"prompt": Lit(f"[-{HUGE}]")}, 400, "prompt token ids"),
    ("prompt-1300-ids", {"prompt": [0] * 1300}, 400, "prompt"),
    ("prompt-ids-past-positions", {"prompt": [1] * POSITIONS, "max_tokens": 1}, 400, "prompt"),
    ("prompt-text-past-positions", {"prompt": "x" * 60, "max_tokens": 5}, 400, "prompt"),
    ("prompt-deep", {"prompt": Lit(DEEP)}, 400, "'prompt'"),
    ("prompt-deep-maps", {"prompt": Lit(DEEP_MAPS)}, 400, "'prompt'"),
    ("prompt-lone-high-surrogate", {"prompt": "\ud800"}, 400, "prompt"),
    ("prompt-lone-low-surrogate", {"prompt": "a\udfffb"}, 400, "prompt"),
    ("prompt-reversed-surrogates", {"prompt": "\udc00\ud800"}, 400, "prompt"),
    ("messages-on-completions", {"messages": [{"role": "user", "content": "hi"}]}, 400,
     "messages"),
]

USER = {"role": "user", "content": "hi"}
# (id, fields, status, names): the messages of /v1/chat/completions
MESSAGES_CASES = [
    *[(f"messages-{vid}", {"messages": value}, 400, "'messages'") for vid, value in [
        ("missing", MISSING), ("null", None), ("text", "hi"), ("a-message-not-a-list", USER),
        ("empty-list", []), ("null-message", [None]), ("text-message", ["hi"]),
        ("list-message", [["user", "hi"]]), ("empty-message", [{}]),
        ("no-content", [{"role": "user"}]), ("no-role", [{"content": "hi"}]),
        ("role-tool", [{"role": "tool", "content": "hi"}]),
        ("role-function", [{"role": "function", "content": "hi"}]),
        ("role-capitalized", [{"role": "User", "content": "hi"}]),
        ("role-empty", [{"role": "", "content": "hi"}]),
        ("role-null", [{"role": None, "content": "hi"}]),
        ("role-number", [{"role": 1, "content": "hi"}]),
        ("role-lone-surrogate", [{"role": "user\ud800", "content": "hi"}]),
        ("content-null", [{"role": "user", "content": None}]),
        ("content-number", [{"role": "user", "content": 5}]),
        ("content-parts", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
        ("content-map", [{"role": "user", "content": {}}]),
        ("content-true", [{"role": "user", "content": True}]),
        ("extra-key", [{**USER, "foo": 1}]),
        ("tool-calls", [{"role": "assistant", "content": "", "tool_calls": []}]),
        ("second-message-bad", [USER, {"role": "assistant"}]),
        ("deep", Lit(DEEP)), ("deep-maps", Lit(DEEP_MAPS)),
        ("NaN", Lit("NaN")), ("huge-int", Lit(HUGE)),
        ("name-a-map", [{**USER, "name": {"a": 1}}]),
        ("name-a-number", [{**USER, "name": 5}]),
        ("content-lone-high-surrogate", [{"role": "user", "content": "\ud800"}]),
        ("content-lone-low-surrogate", [{"role": "user", "content": "a\udfff"}])]],
    ("messages-past-positions", {"messages": [{"role": "user", "content": "x" * 200}]}, 400,
     ("messages", "prompt")),
    # 257 messages do not fit in 4096 bytes: the body limit refuses them first
    ("messages-too-many", {"messages": [{"role": "user", "content": ""}] * 257}, 413,
     "max_body_bytes"),
    ("prompt-on-chat", {"prompt": "hi"}, 400, "prompt"),
]

# (id, route, body, status, names): bodies that are not a JSON object
MSGPACK_BODY = msgpack.packb({"prompt": "hi", "max_tokens": 2})
RAW_CASES = [
    *[(f"{rid}-{vid}", route, raw, 400, "not JSON") for rid, route in ROUTES.items()
      for vid, raw in [
          ("empty", b""), ("whitespace", b" \n\t "), ("open-brace", b"{"),
          ("unquoted", b"{prompt: hi}"), ("single-quotes", b"{'prompt': 'hi'}"),
          ("trailing-comma", b'{"prompt": "hi",}'), ("trailing-text", b'{"prompt": "hi"} x'),
          ("two-documents", b'{"prompt": "hi"}{"prompt": "hi"}'), ("binary", b"\x00\x01\x02"),
          ("invalid-utf8", b'{"prompt": "\xff\xfe\xfd"}'), ("bare-0xff", b"\xff"),
          ("msgpack", MSGPACK_BODY), ("form", b"prompt=hi&max_tokens=2"),
          ("too-deep", TOO_DEEP.encode()),
          ("too-deep-in-prompt", b'{"prompt": ' + TOO_DEEP.encode() + b"}"),
          ("too-deep-in-max_tokens", b'{"max_tokens": ' + TOO_DEEP.encode() + b"}"),
          ("python-repr", b"{'prompt': 'hi', 'max_tokens': None}")]],
    *[(f"{rid}-{vid}", route, raw, 400, "JSON object") for rid, route in ROUTES.items()
      for vid, raw in [
          ("list", b"[]"), ("list-of-request", b'[{"prompt": "hi"}]'), ("string", b'"hi"'),
          ("number", b"1"), ("huge-int", HUGE.encode()), ("null", b"null"), ("true", b"true"),
          ("NaN", b"NaN"), ("-Infinity", b"-Infinity"), ("1e400", b"1e400"),
          ("deep-list", DEEP.encode())]],
    # a lone surrogate written as raw UTF-8 bytes (CESU-style), which json.loads decodes
    # with "surrogatepass"
    ("completions-prompt-raw-surrogate-bytes", COMPLETIONS, b'{"prompt": "\xed\xa0\x80"}', 400,
     "prompt"),
    ("chat-content-raw-surrogate-bytes", CHAT,
     b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', 400, "messages"),
]


def padded(route: str, size: int, **fields) -> bytes:
    """A well-formed body of exactly ``size`` bytes (trailing spaces)."""
    raw = body(route, **fields)
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


async def _chunks(raw: bytes):
    for i in range(0, len(raw), 1000):
        yield raw[i:i + 1000]


# (id, route, body, headers or None, names): bodies refused 413 for their size
SIZE_CASES = [
    *[(f"{rid}-{vid}", route, raw, headers, "max_body_bytes") for rid, route in ROUTES.items()
      for vid, raw, headers in [
          ("one-byte-over", padded(route, LIMIT + 1, max_tokens=2), None),
          ("huge-text", body(route, prompt="x" * 5000, messages=[
              {"role": "user", "content": "x" * 5000}]), None),
          ("declared-over", body(route, max_tokens=2),
           {"content-type": JSON_TYPE, "content-length": str(LIMIT + 1)}),
          ("declared-huge", body(route, max_tokens=2),
           {"content-type": JSON_TYPE, "content-length": "9" * 30}),
          ("declared-not-a-number", body(route, max_tokens=2),
           {"content-type": JSON_TYPE, "content-length": "abc"}),
          ("declared-negative", body(route, max_tokens=2),
           {"content-type": JSON_TYPE, "content-length": "-1"}),
          ("declared-small-sent-over", padded(route, LIMIT + 500, max_tokens=2),
           {"content-type": JSON_TYPE, "content-length": "10"})]],
]


def case_params(cases, routes=ROUTES):
    return [pytest.param(route, fields, status, names, id=f"{rid}-{cid}")
            for rid, route in routes.items() for cid, fields, status, names in cases]


ALL_FIELD_PARAMS = (case_params(FIELD_CASES) + case_params(PROMPT_CASES, {"completions":
                                                                            COMPLETIONS})
                    + case_params(MESSAGES_CASES, {"chat": CHAT}))


# --- the hostile corpus ------------------------------------------------------------------------

@pytest.mark.parametrize("route,fields,status,names", ALL_FIELD_PARAMS)
def test_a_bad_field_gets_a_4xx_naming_it(app, route, fields, status, names):
    assert_refused(send(app, route, body(route, **fields)), status, names)


@pytest.mark.parametrize("route,fields,status,names", [
    p for p in ALL_FIELD_PARAMS if "stream" not in p.values[1]])
def test_a_streamed_request_with_a_bad_field_gets_a_4xx_before_any_event(app, route, fields,
                                                                          status, names):
    r = send(app, route, body(route, **fields, stream=True))
    assert "data:" not in r.text, f"events were sent: {r.status_code} {r.text[:300]}"
    assert not r.headers.get("content-type", "").startswith("text/event-stream")
    assert_refused(r, status, names)


@pytest.mark.parametrize("route,raw,status,names",
                         [pytest.param(*c[1:], id=c[0]) for c in RAW_CASES])
def test_a_body_that_is_not_a_json_object_gets_400(app, route, raw, status, names):
    assert_refused(send(app, route, raw), status, names)


@pytest.mark.parametrize("route,raw,headers,names",
                         [pytest.param(*c[1:], id=c[0]) for c in SIZE_CASES])
def test_a_body_past_max_body_bytes_gets_413(app, route, raw, headers, names):
    assert_refused(send(app, route, raw, headers), 413, names)


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
def test_a_completion_body_is_bounded_below_max_body_bytes(app, route, monkeypatch):
    # a prompt is parsed on the event loop: its body has its own, smaller bound
    import fastserve.service.openai as openai

    monkeypatch.setattr(openai, "MAX_BODY", 64)
    assert_refused(send(app, route, body(route, max_tokens=1) + b" " * 100), 413, "64 bytes")


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
def test_a_chunked_body_past_max_body_bytes_gets_413(app, route):
    raw = padded(route, LIMIT + 1, max_tokens=2)

    async def main():
        async with _client(app) as client:  # no content-length: the size shows only as it comes
            return await asyncio.wait_for(client.post(route, content=_chunks(raw), headers={
                "content-type": JSON_TYPE}), ANSWER_S)
    r = asyncio.run(main())
    assert_refused(r, 413, "max_body_bytes")


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("kind,raw", [
    ("application/msgpack", MSGPACK_BODY),
    ("application/x-www-form-urlencoded", b"prompt=hi&max_tokens=2"),
    ("multipart/form-data; boundary=x",
     b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--x--\r\n'),
    ("text/plain", b"hi"),
], ids=["msgpack", "form", "multipart", "text"])
def test_a_body_of_another_content_type_gets_a_415(app, route, kind, raw):
    assert_refused(send(app, route, raw, {"content-type": kind}), 415, "content type")


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("kind", ["text/plain", "application/msgpack",
                                  "application/x-www-form-urlencoded", "image/png",
                                  "application/json; charset=latin-1", None],
                         ids=["text", "msgpack", "form", "png", "json-latin1", "no-header"])
def test_a_json_body_under_another_content_type_is_refused_415(app, route, kind):
    """As /v1/infer: JSON, or no content type, is read; anything else is a 415 unread."""
    r = send(app, route, body(route, max_tokens=2), {} if kind is None else {"content-type": kind})
    if kind is None or kind.startswith("application/json"):
        assert_answered(r, route, 2)
    else:
        assert_refused(r, 415, "content type")


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
@pytest.mark.parametrize("literal", ["1e-300", "5e-324", "1e-40"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_temperature_too_small_for_float32_is_refused_or_greedy_never_a_500(
        app, route, literal, stream):
    """A temperature within [0, 2] that divides the logits to infinity: the answer is greedy
    decoding or a 400 naming the temperature, not the model's failure."""
    r = send(app, route, body(route, temperature=Lit(literal), max_tokens=3, stream=stream))
    if r.status_code == 400:
        assert_refused(r, 400, "'temperature'")
    elif not stream:
        assert_answered(r, route, 3)
    else:
        assert r.status_code == 200, (r.status_code, r.text[:300])
        events = [e.removeprefix("data: ") for e in r.text.strip().split("\n\n")]
        assert events[-1] == "[DONE]"
        docs = [json.loads(e) for e in events[:-1]]
        assert not [d for d in docs if "error" in d], f"the stream failed: {r.text[-300:]}"


# --- what is allowed at the edges is answered ---------------------------------------------------

# (id, fields, max_tokens expected, a stop string may end it)
ACCEPTED = [
    ("temperature--0.0", {"temperature": Lit("-0.0"), "max_tokens": 2}, 2, False),
    ("temperature-1e-400", {"temperature": Lit("1e-400"), "max_tokens": 2}, 2, False),
    ("temperature-2", {"temperature": 2, "max_tokens": 2}, 2, False),
    ("top_p-1e-9", {"top_p": 1e-9, "temperature": 1, "max_tokens": 2}, 2, False),
    ("top_k-2^20", {"top_k": 1 << 20, "temperature": 1, "max_tokens": 2}, 2, False),
    ("seed-zero", {"seed": 0, "temperature": 1, "max_tokens": 2}, 2, False),
    ("seed-largest", {"seed": (1 << 63) - 1, "temperature": 1, "max_tokens": 2}, 2, False),
    ("max_tokens-1", {"max_tokens": 1}, 1, False),
    ("max_tokens-generation-max", {"max_tokens": MAX_TOKENS}, MAX_TOKENS, False),
    ("max_tokens-null", {"max_tokens": None}, 16, False),
    ("neutral-values", {"n": 1, "best_of": 1.0, "echo": False, "logprobs": None,
                        "suffix": None, "presence_penalty": Lit("-0.0"),
                        "frequency_penalty": 0, "logit_bias": None, "max_tokens": 2}, 2, False),
    ("model-and-user", {"model": "anything", "user": "u\u0000", "max_tokens": 2}, 2, False),
    ("stream-false", {"stream": False, "max_tokens": 2}, 2, False),
    ("stop-empty-list", {"stop": [], "max_tokens": 2}, 2, False),
    ("stop-nul", {"stop": "\u0000", "max_tokens": 2}, 2, True),
    ("stop-four", {"stop": ["a", "b", "c", "d"], "max_tokens": 2}, 2, True),
    ("stop-256-chars", {"stop": "x" * 256, "max_tokens": 2}, 2, True),
    ("unicode-emoji-pair", {"stop": "\U0001f600", "max_tokens": 2}, 2, True),
]
PROMPT_ACCEPTED = [
    ("prompt-nul", {"prompt": "\u0000", "max_tokens": 2}, 2, False),
    ("prompt-emoji-surrogate-pair", {"prompt": "\ud83d\ude00", "max_tokens": 2}, 2, False),
    ("prompt-id-zero", {"prompt": [0], "max_tokens": 2}, 2, False),
    ("prompt-id-vocab-1", {"prompt": [VOCAB - 1], "max_tokens": 2}, 2, False),
    ("prompt-just-fits-positions", {"prompt": [1] * (POSITIONS - 1), "max_tokens": 1}, 1,
     False),
]
MESSAGES_ACCEPTED = [
    ("messages-all-roles", {"messages": [{"role": "system", "content": "s"}, USER,
                                         {"role": "assistant", "content": "a"}],
                            "max_tokens": 2}, 2, False),
    ("messages-name", {"messages": [{**USER, "name": "bob"}], "max_tokens": 2}, 2, False),
    ("messages-empty-content", {"messages": [{"role": "user", "content": ""}],
                                "max_tokens": 2}, 2, False),
    ("messages-nul-content", {"messages": [{"role": "user", "content": "\u0000"}],
                              "max_tokens": 2}, 2, False),
]


@pytest.mark.parametrize("route,fields,max_tokens,may_stop", [
    pytest.param(route, fields, n, stop, id=f"{rid}-{cid}")
    for rid, route in ROUTES.items() for cid, fields, n, stop in ACCEPTED] + [
    pytest.param(COMPLETIONS, fields, n, stop, id=f"completions-{cid}")
    for cid, fields, n, stop in PROMPT_ACCEPTED] + [
    pytest.param(CHAT, fields, n, stop, id=f"chat-{cid}")
    for cid, fields, n, stop in MESSAGES_ACCEPTED])
def test_a_value_at_the_edge_of_what_is_allowed_is_answered(app, route, fields, max_tokens,
                                                            may_stop):
    assert_answered(send(app, route, body(route, **fields)), route, max_tokens, may_stop)


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
def test_a_body_of_exactly_max_body_bytes_is_answered(app, route):
    raw = padded(route, LIMIT, max_tokens=2)
    assert len(raw) == LIMIT
    assert_answered(send(app, route, raw), route, 2)


def test_negative_zero_temperature_is_greedy(app):
    prompt = prompts()[0]
    zero, negative = [send(app, COMPLETIONS, body(COMPLETIONS, prompt=prompt, max_tokens=6,
                                                  temperature=Lit(t))) for t in ("0", "-0.0")]
    assert assert_answered(zero, COMPLETIONS, 6)["choices"][0]["token_ids"] == \
        assert_answered(negative, COMPLETIONS, 6)["choices"][0]["token_ids"]


# --- and the service keeps serving -------------------------------------------------------------

def _hostile_requests() -> list[tuple[str, bytes, dict | None]]:
    out = []
    for p in ALL_FIELD_PARAMS:
        route, fields = p.values[0], p.values[1]
        out.append((route, body(route, **fields), None))
        if "stream" not in fields:
            out.append((route, body(route, **fields, stream=True), None))
    out += [(c[1], c[2], None) for c in RAW_CASES]
    out += [(c[1], c[2], c[3]) for c in SIZE_CASES]
    return out


def test_the_service_answers_correctly_after_and_among_the_hostile_corpus(svc, app, lm):
    """Every hostile request above at once (each answered, none hanging), with well-formed ones
    among them; then well-formed ones alone. The greedy answers equal transformers' and no rank
    restarted. (The statuses of the hostile requests are the tests' above; the temperatures that
    fail the model are left to the test below, which shows what they do to their neighbours.)"""
    model = hf_gpt2(lm[1])
    steps = 12
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, steps)
    good = (COMPLETIONS, body(COMPLETIONS, prompt=prompt, max_tokens=steps, temperature=0), None)
    hostile = _hostile_requests()
    answers = send_all(app, [good, *hostile, good])
    for (path, raw, _), r in zip(hostile, answers[1:-1]):
        assert isinstance(r, httpx.Response), f"{path} {raw[:100]!r}: {r!r}"
    for r in (answers[0], answers[-1]):
        assert assert_answered(r, COMPLETIONS, steps)["choices"][0]["token_ids"] == want

    after = send(app, *good[:2])
    assert assert_answered(after, COMPLETIONS, steps)["choices"][0]["token_ids"] == want
    for route in (COMPLETIONS, CHAT):
        r = send(app, route, body(route, max_tokens=MAX_TOKENS, temperature=0))
        assert_answered(r, route, MAX_TOKENS)
        streamed = send(app, route, body(route, max_tokens=5, temperature=0, stream=True))
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith(
            "text/event-stream")
        events = [e.removeprefix("data: ") for e in streamed.text.strip().split("\n\n")]
        assert events[-1] == "[DONE]"
        ids = sum((json.loads(e)["choices"][0]["token_ids"] for e in events[:-1]), [])
        assert len(ids) == 5
    assert svc.ready and all(r.restarts == 0 for r in svc.replicas)


def test_a_temperature_that_fails_the_model_does_not_fail_the_requests_beside_it(app, lm):
    """Requests with a temperature the model cannot sample at, sent while a well-formed greedy
    request generates: whatever they get, the well-formed one gets its whole answer."""
    steps = 30
    prompt = prompts()[2]
    want = hf_greedy(hf_gpt2(lm[1]), prompt, steps)

    async def main():
        async with _client(app) as client:
            good = asyncio.ensure_future(_post(client, COMPLETIONS, body(
                COMPLETIONS, prompt=prompt, max_tokens=steps, temperature=0), None))
            bad = []
            for route in (COMPLETIONS, CHAT, COMPLETIONS, CHAT):
                await asyncio.sleep(0.02)  # the good one is decoding by now
                bad.append(await _post(client, route, body(route, temperature=Lit("1e-300"),
                                                           max_tokens=3), None))
            return await good, bad
    good, bad = asyncio.run(main())
    assert all(r.status_code in (200, 400, 500) for r in bad)  # their own tests judge them
    assert assert_answered(good, COMPLETIONS, steps)["choices"][0]["token_ids"] == want
