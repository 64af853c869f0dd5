"""The wire's contract, stated exactly: what a peer may rely on byte for byte and word for word.

Every refusal of :func:`encode` and :func:`decode` is checked for its ``reason`` (the slug the
receiver counts) and its full message text (which names what was wrong and shows the offending
value); every bound is checked on both sides: exactly at the limit accepted, one past refused. A
meta is checked three ways (``check_meta``, the sender, the receiver of a hand-made header), so
that what the sender refuses is what the receiver would. Expected values are written by hand.
"""

from __future__ import annotations

import math
import sys

import msgpack
import numpy as np
import pytest
import torch

from fastserve.engine import wire
from fastserve.engine.wire import (INLINE_BYTES, MAX_FRAME_BYTES, MAX_HEADER_BYTES, MAX_ID,
                                   MAX_NAME, MAX_PEERS, MAX_SEQS, MAX_TENSORS, MAX_TEXT,
                                   MAX_TIMINGS, VERSION, _show, check_meta, decode, encode)
from fastserve.errors import WireError
from wireframes import header

BIG = MAX_ID + 1  # 2**63: one past the int64 range
T = {"rank": 0, "stage": 1, "recv": 1.0, "start": 1.5, "end": 2.0}  # a valid timing


def refusal(fn, *args, **kw) -> tuple[str, str]:
    """(reason, full message) of the WireError ``fn`` raises; anything else fails the test."""
    with pytest.raises(WireError) as info:
        fn(*args, **kw)
    return info.value.reason, str(info.value)


def plain(frames) -> list[bytes]:
    """Frames as a receiver gets them: plain bytes."""
    return [bytes(memoryview(f)) for f in frames]


_EMPTY = object()


def hand(kind="data", specs=(), req=0, mb=0, meta=_EMPTY, version=VERSION) -> bytes:
    """A header frame written by hand (what a peer that skips encode's checks sends)."""
    return header(msgpack.packb([version, kind, list(specs)]),
                  msgpack.packb([req, mb, {} if meta is _EMPTY else meta]))


@pytest.fixture
def fresh_caches():
    """Both layout caches empty before and after (tests that fill or seed them)."""
    wire._received.clear()
    wire._sent.clear()
    yield
    wire._received.clear()
    wire._sent.clear()


# --- _show ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [
    ([1, 2, 3], "a list of 3"),
    ([], "a list of 0"),
    ({"a": 1, "b": 2}, "a dict of 2"),
    ((1,), "a tuple of 1"),
    ([[[[]]]], "a list of 1"),
    ("abc", "'abc'"),
    (5, "5"),
    (None, "None"),
    (True, "True"),
    (1.5, "1.5"),
    (b"x", "b'x'"),
    ("x" * 58, "'" + "x" * 58 + "'"),          # a repr of exactly 60 characters is kept whole
    ("x" * 59, "'" + "x" * 56 + "..."),        # 61: cut to 57 and '...'
    ("y" * 1000, "'" + "y" * 56 + "..."),
    (float("nan"), "nan"),
])
def test_show_describes_containers_by_type_and_length_and_cuts_long_reprs(value, shown):
    assert _show(value) == shown


def test_show_names_the_container_type():
    class Seqs(list):
        pass

    assert _show(Seqs([1, 2])) == "a Seqs of 2"
    assert len(_show("z" * 500)) == 60


# --- meta schemas: accepted ----------------------------------------------------------------------

FULL_TIMING = {**T, "sent": 2.5}
SAMPLE = [0.7, 40, 0.9, 12345]
ACCEPTED = [
    ("data", {}),
    ("data", {"timings": []}),
    ("data", {"timings": [T]}),
    ("data", {"timings": [FULL_TIMING] * MAX_TIMINGS}),
    ("data", {"timings": [{"rank": MAX_ID, "stage": -MAX_ID, "recv": 1, "start": MAX_ID,
                           "end": -MAX_ID, "sent": 0}]}),                 # ints where numbers go
    ("data", {"timings": [{**T, "recv": -1e308, "end": 1e308}]}),
    ("data", {"gen": {"seqs": []}}),
    ("data", {"gen": {"seqs": [[0, 0, 3], [5, 7, 1]], "free": [2, 3], "logits": "lm_head",
                      "sample": [[0.0, 0, 1.0, 0], SAMPLE]}}),
    ("data", {"gen": {"seqs": [[MAX_ID, -MAX_ID, 0]] * MAX_SEQS, "free": [MAX_ID] * MAX_SEQS,
                      "logits": "l" * MAX_TEXT, "sample": [[1, -3, 0, MAX_ID]] * MAX_SEQS}}),
    ("data", {"gen": {"seqs": [], "logits": ""}}),
    ("error", {"error": {"message": "boom"}}),
    ("error", {"error": {"rank": None, "stage": None, "node": None, "message": ""}}),
    ("error", {"error": {"rank": 3, "stage": MAX_ID, "node": "n" * MAX_TEXT,
                         "message": "m" * MAX_TEXT}, "timings": [T] * MAX_TIMINGS}),
    *[("control", {"cmd": c}) for c in ("health", "stats", "stop", "load")],
    *[("control", {"event": e}) for e in ("hello", "ready", "failed")],
    ("control", {"event": "ready", "rank": 0, "pid": 1, "load_s": 0.5, "read_s": 1, "rss": 1,
                 "rss_before_load": 0, "rss_peak": 2, "weight_bytes": MAX_ID, "error": "",
                 "plan": "p" * MAX_TEXT, "nodes": ["a", "b"], "threads": 4,
                 "endpoint": "tcp://h:1", "data_out": ["ipc:///x"] * MAX_PEERS}),
    ("control", {"cmd": "load", "nodes": ["n"] * 700}),
    ("reply", {"cmd": "stats", "rank": 0}),
    ("reply", {"rank": 2, "cmd": "health", "ok": True, "busy": False, "processed": 1,
               "errors": 0, "malformed": {"header": 2, "meta": 0}, "refused": 0,
               "compute_s": 0.25, "rss": 1, "pending": 0, "kv_bytes": MAX_ID, "sequences": 3}),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {f"r{i}": i for i in range(64)}}),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {"k" * MAX_NAME: MAX_ID}}),
    ("reply", {"cmd": "stats", "rank": 0, "compute_s": 7}),
]


@pytest.mark.parametrize("kind, meta", ACCEPTED)
def test_accepted_meta_passes_every_check_and_round_trips_exactly(kind, meta):
    assert check_meta(kind, meta) is None
    msg = decode(plain(encode(kind, request=5, micro=6, meta=meta)))
    assert (msg.kind, msg.request, msg.micro, msg.tensors, msg.meta) == (kind, 5, 6, {}, meta)
    msg = decode([hand(kind, req=9, mb=8, meta=meta)])
    assert (msg.kind, msg.request, msg.micro, msg.meta) == (kind, 9, 8, meta)


def test_schema_bounds_that_msgpack_does_not_reach_are_accepted_by_check_meta():
    check_meta("control", {"cmd": "load", "nodes": ["n"] * (1 << 16)})
    check_meta("data", {"shm": [0] * (MAX_TENSORS + 2)})
    check_meta("data", {"shm": []})
    check_meta("data", {"shm": [3, MAX_ID, -MAX_ID]})


# --- meta schemas: refused -----------------------------------------------------------------------

X56 = "'" + "x" * 56 + "..."  # how _show shows a string of more than 58 x's
STR = f"expected a string of at most {MAX_TEXT} characters, got"
LIST512 = "expected a list of at most 512 entries, got"
SEQ3 = "expected a list of 3 int64s, got"
SAMPLING = "expected [temperature, top_k, top_p, seed], got"
ONE = "a control message carries exactly one of 'cmd' and 'event'"
COUNTS = "expected a map of at most 64 counts, got"

REFUSED = [
    # data: timings
    ("data", {"timings": "soon"}, f"'timings': {LIST512} 'soon'"),
    ("data", {"timings": 5}, f"'timings': {LIST512} 5"),
    ("data", {"timings": {"rank": 0}}, f"'timings': {LIST512} a dict of 1"),
    ("data", {"timings": [T] * (MAX_TIMINGS + 1)}, f"'timings': {LIST512} a list of 513"),
    ("data", {"timings": [1]}, "'timings': [0]: expected a map, got 1"),
    ("data", {"timings": [T, [T]]}, "'timings': [1]: expected a map, got a list of 1"),
    ("data", {"timings": [T, {**T, "rank": "x"}]},
     "'timings': [1]: 'rank': expected an int64, got 'x'"),
    ("data", {"timings": [{**T, "rank": True}]},
     "'timings': [0]: 'rank': expected an int64, got True"),
    ("data", {"timings": [{**T, "rank": BIG}]},
     "'timings': [0]: 'rank': expected an int64, got 9223372036854775808"),
    ("data", {"timings": [{**T, "stage": -BIG}]},
     "'timings': [0]: 'stage': expected an int64, got -9223372036854775808"),
    ("data", {"timings": [{**T, "stage": 1.0}]},
     "'timings': [0]: 'stage': expected an int64, got 1.0"),
    ("data", {"timings": [{**T, "recv": float("nan")}]},
     "'timings': [0]: 'recv': expected a finite number, got nan"),
    ("data", {"timings": [{**T, "start": float("inf")}]},
     "'timings': [0]: 'start': expected a finite number, got inf"),
    ("data", {"timings": [{**T, "end": -float("inf")}]},
     "'timings': [0]: 'end': expected a finite number, got -inf"),
    ("data", {"timings": [{**T, "recv": "1"}]},
     "'timings': [0]: 'recv': expected a finite number, got '1'"),
    ("data", {"timings": [{**T, "recv": True}]},
     "'timings': [0]: 'recv': expected a finite number, got True"),
    ("data", {"timings": [{**T, "recv": BIG}]},
     "'timings': [0]: 'recv': expected an int64, got 9223372036854775808"),
    ("data", {"timings": [{**T, "sent": None}]},
     "'timings': [0]: 'sent': expected a finite number, got None"),
    ("data", {"timings": [{**T, "extra": 1}]}, "'timings': [0]: unexpected key 'extra'"),
    ("data", {"timings": [{"rank": 0, "stage": 0, "recv": 1.0, "start": 1.0}]},
     "'timings': [0]: missing ['end']"),
    ("data", {"timings": [{"rank": 0}]}, "'timings': [0]: missing ['end', 'recv', 'stage', 'start']"),
    # data: other keys
    ("data", {"anything": 1}, "unexpected key 'anything'"),
    ("data", {"error": {"message": "m"}}, "unexpected key 'error'"),
    ("data", {"timings": [], "cmd": "stop"}, "unexpected key 'cmd'"),
    # data: gen
    ("data", {"gen": "x"}, "'gen': expected a map, got 'x'"),
    ("data", {"gen": [[0, 0, 1]]}, "'gen': expected a map, got a list of 1"),
    ("data", {"gen": {}}, "'gen': missing ['seqs']"),
    ("data", {"gen": {"free": []}}, "'gen': missing ['seqs']"),
    ("data", {"gen": {"seqs": [], "temperature": 1.0}}, "'gen': unexpected key 'temperature'"),
    ("data", {"gen": {"seqs": "abc"}}, f"'gen': 'seqs': {LIST512} 'abc'"),
    ("data", {"gen": {"seqs": [[0, 0, 1]] * (MAX_SEQS + 1)}},
     f"'gen': 'seqs': {LIST512} a list of 513"),
    ("data", {"gen": {"seqs": [[0, 0]]}}, f"'gen': 'seqs': [0]: {SEQ3} a list of 2"),
    ("data", {"gen": {"seqs": [[0, 0, 3, 4]]}}, f"'gen': 'seqs': [0]: {SEQ3} a list of 4"),
    ("data", {"gen": {"seqs": [[0, 0, 3], [0, 0, "3"]]}},
     f"'gen': 'seqs': [1]: {SEQ3} a list of 3"),
    ("data", {"gen": {"seqs": [[True, 0, 3]]}}, f"'gen': 'seqs': [0]: {SEQ3} a list of 3"),
    ("data", {"gen": {"seqs": [[0, 0, BIG]]}}, f"'gen': 'seqs': [0]: {SEQ3} a list of 3"),
    ("data", {"gen": {"seqs": [[0, 1.0, 3]]}}, f"'gen': 'seqs': [0]: {SEQ3} a list of 3"),
    ("data", {"gen": {"seqs": [5]}}, f"'gen': 'seqs': [0]: {SEQ3} 5"),
    ("data", {"gen": {"seqs": ["abc"]}}, f"'gen': 'seqs': [0]: {SEQ3} 'abc'"),
    ("data", {"gen": {"seqs": [{"a": 1, "b": 2, "c": 3}]}},
     f"'gen': 'seqs': [0]: {SEQ3} a dict of 3"),
    ("data", {"gen": {"seqs": [], "free": [1.0]}},
     "'gen': 'free': [0]: expected an int64, got 1.0"),
    ("data", {"gen": {"seqs": [], "free": [0] * (MAX_SEQS + 1)}},
     f"'gen': 'free': {LIST512} a list of 513"),
    ("data", {"gen": {"seqs": [], "logits": "x" * (MAX_TEXT + 1)}}, f"'gen': 'logits': {STR} {X56}"),
    ("data", {"gen": {"seqs": [], "logits": 5}}, f"'gen': 'logits': {STR} 5"),
    ("data", {"gen": {"seqs": [], "logits": b"lm"}}, f"'gen': 'logits': {STR} b'lm'"),
    ("data", {"gen": {"seqs": [], "logits": None}}, f"'gen': 'logits': {STR} None"),
    ("data", {"gen": {"seqs": [], "sample": [SAMPLE] * (MAX_SEQS + 1)}},
     f"'gen': 'sample': {LIST512} a list of 513"),
    ("data", {"gen": {"seqs": [], "sample": [5]}}, f"'gen': 'sample': [0]: {SAMPLING} 5"),
    ("data", {"gen": {"seqs": [], "sample": ["abcd"]}},
     f"'gen': 'sample': [0]: {SAMPLING} 'abcd'"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40, 0.9]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 3"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40, 0.9, 1, 2]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 5"),
    ("data", {"gen": {"seqs": [], "sample": [SAMPLE, ["x", 40, 0.9, 1]]}},
     f"'gen': 'sample': [1]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[float("nan"), 40, 0.9, 1]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, "x", 0.9, 1]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40.0, 0.9, 1]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40, "x", 1]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40, float("inf"), 1]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40, 0.9, "x"]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40, 0.9, 1.0]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    ("data", {"gen": {"seqs": [], "sample": [[0.7, 40, 0.9, BIG]]}},
     f"'gen': 'sample': [0]: {SAMPLING} a list of 4"),
    # data: shm
    ("data", {"shm": "x"}, "'shm': expected a list of at most 258 entries, got 'x'"),
    ("data", {"shm": [0] * (MAX_TENSORS + 3)},
     "'shm': expected a list of at most 258 entries, got a list of 259"),
    ("data", {"shm": [3, 64, 1.5]}, "'shm': [2]: expected an int64, got 1.5"),
    # error
    ("error", {}, "missing ['error']"),
    ("error", {"timings": []}, "missing ['error']"),
    ("error", {"error": {}}, "'error': missing ['message']"),
    ("error", {"error": "x"}, "'error': expected a map, got 'x'"),
    ("error", {"error": None}, "'error': expected a map, got None"),
    ("error", {"error": {"message": 5}}, f"'error': 'message': {STR} 5"),
    ("error", {"error": {"message": "x" * (MAX_TEXT + 1)}}, f"'error': 'message': {STR} {X56}"),
    ("error", {"error": {"message": "m", "rank": "1"}},
     "'error': 'rank': expected an int64, got '1'"),
    ("error", {"error": {"message": "m", "stage": 1.5}},
     "'error': 'stage': expected an int64, got 1.5"),
    ("error", {"error": {"message": "m", "node": 5}}, f"'error': 'node': {STR} 5"),
    ("error", {"error": {"message": "m", "where": 1}}, "'error': unexpected key 'where'"),
    ("error", {"error": {"message": "m"}, "gen": {"seqs": []}}, "unexpected key 'gen'"),
    ("error", {"error": {"message": "m"}, "timings": [1]},
     "'timings': [0]: expected a map, got 1"),
    # control
    ("control", {}, ONE),
    ("control", {"cmd": "stop", "event": "ready"}, ONE),
    ("control", {"rank": 0, "pid": 1}, ONE),
    ("control", {"cmd": "rm"}, "'cmd': expected one of health, stats, stop, load, got 'rm'"),
    ("control", {"cmd": "STOP"}, "'cmd': expected one of health, stats, stop, load, got 'STOP'"),
    ("control", {"cmd": 1}, "'cmd': expected one of health, stats, stop, load, got 1"),
    ("control", {"cmd": ["stop"]},
     "'cmd': expected one of health, stats, stop, load, got a list of 1"),
    ("control", {"event": "done"}, "'event': expected one of hello, ready, failed, got 'done'"),
    ("control", {"event": None}, "'event': expected one of hello, ready, failed, got None"),
    *[("control", {"cmd": "load", f: "1"}, f"'{f}': expected an int64, got '1'")
      for f in ("rank", "pid", "rss", "rss_before_load", "rss_peak", "weight_bytes", "threads")],
    ("control", {"event": "ready", "pid": True}, "'pid': expected an int64, got True"),
    *[("control", {"event": "ready", f: float("nan")}, f"'{f}': expected a finite number, got nan")
      for f in ("load_s", "read_s")],
    *[("control", {"event": "failed", f: 5}, f"'{f}': {STR} 5")
      for f in ("error", "plan", "endpoint")],
    ("control", {"cmd": "load", "data_out": "ipc:///x"},
     "'data_out': expected a list of at most 64 entries, got 'ipc:///x'"),
    ("control", {"cmd": "load", "data_out": ["ipc:///x"] * (MAX_PEERS + 1)},
     "'data_out': expected a list of at most 64 entries, got a list of 65"),
    ("control", {"cmd": "load", "data_out": [5]}, f"'data_out': [0]: {STR} 5"),
    ("control", {"event": "failed", "error": "x" * (MAX_TEXT + 1)}, f"'error': {STR} {X56}"),
    ("control", {"event": "ready", "nodes": "a"},
     "'nodes': expected a list of at most 65536 entries, got 'a'"),
    ("control", {"event": "ready", "nodes": ["a", 1]}, f"'nodes': [1]: {STR} 1"),
    ("control", {"cmd": "stop", "junk": 1}, "unexpected key 'junk'"),
    ("control", {"cmd": "stop", "ok": True}, "unexpected key 'ok'"),
    # reply
    ("reply", {}, "missing ['cmd', 'rank']"),
    ("reply", {"cmd": "stats"}, "missing ['rank']"),
    ("reply", {"rank": 0}, "missing ['cmd']"),
    ("reply", {"cmd": "go", "rank": 0},
     "'cmd': expected one of health, stats, stop, load, got 'go'"),
    ("reply", {"cmd": "stats", "rank": 0, "event": "ready"}, "unexpected key 'event'"),
    ("reply", {"cmd": "stats", "rank": 0, "ok": 1}, "'ok': expected true or false, got 1"),
    ("reply", {"cmd": "stats", "rank": 0, "busy": None}, "'busy': expected true or false, got None"),
    ("reply", {"cmd": "stats", "rank": 0, "busy": "yes"},
     "'busy': expected true or false, got 'yes'"),
    *[("reply", {"cmd": "stats", "rank": 0, f: True}, f"'{f}': expected an int64, got True")
      for f in ("processed", "errors", "refused", "rss", "pending", "kv_bytes", "sequences")],
    ("reply", {"cmd": "stats", "rank": 1.5}, "'rank': expected an int64, got 1.5"),
    ("reply", {"cmd": "stats", "rank": 0, "compute_s": float("inf")},
     "'compute_s': expected a finite number, got inf"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": []}, f"'malformed': {COUNTS} a list of 0"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": "x"}, f"'malformed': {COUNTS} 'x'"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {"x": "1"}},
     "'malformed': expected reason -> count, got 'x': '1'"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {"a": 1, "x": True}},
     "'malformed': expected reason -> count, got 'x': True"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {"x": BIG}},
     "'malformed': expected reason -> count, got 'x': 9223372036854775808"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {"x" * (MAX_NAME + 1): 1}},
     f"'malformed': expected reason -> count, got {X56}: 1"),
]


@pytest.mark.parametrize("kind, meta, err", REFUSED)
def test_refused_meta_is_refused_alike_by_check_meta_sender_and_receiver(kind, meta, err):
    expected = ("meta", f"{kind} message meta {err}")
    assert refusal(check_meta, kind, meta) == expected
    assert refusal(encode, kind, meta=meta) == expected
    assert refusal(decode, [hand(kind, meta=meta)]) == expected


@pytest.mark.parametrize("kind, meta, err", [r for r in REFUSED if r[0] == "data"])
def test_meta_said_checked_is_not_checked_at_the_sender_but_still_at_the_receiver(kind, meta,
                                                                                  err):
    # (what a rank does with the meta of a message it decoded: the receiver stays the guard)
    try:
        frames = encode(kind, meta=meta, meta_checked=True)
    except WireError as e:  # only what msgpack itself cannot pack, never the schema
        assert e.reason != "meta"
        return
    assert refusal(decode, [bytes(memoryview(f)) for f in frames])[0] in ("meta", "header")


def test_meta_said_checked_round_trips_a_ranks_answer_exactly():
    meta = {"gen": {"seqs": [[0, 0, 3]]}, "timings": [T, T]}
    frames = encode("data", request=3, micro=4, meta=meta, meta_checked=True)
    assert frames == encode("data", request=3, micro=4, meta=meta)
    assert decode(frames).meta == meta


@pytest.mark.parametrize("kind, meta, err", [
    # values the sender may be handed but msgpack cannot carry as such: refused at the sender
    ("data", {"gen": {"seqs": [(0, 0, 3)]}}, f"'gen': 'seqs': [0]: {SEQ3} a tuple of 3"),
    ("data", {"gen": {"seqs": [], "sample": [(0.7, 40, 0.9, 1)]}},
     f"'gen': 'sample': [0]: {SAMPLING} a tuple of 4"),
    ("data", {"timings": (T,)}, f"'timings': {LIST512} a tuple of 1"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {1: 1}},
     "'malformed': expected reason -> count, got 1: 1"),
    ("data", {1: 2}, "unexpected key 1"),
    ("data", {("timings",): []}, "unexpected key a tuple of 1"),
    ("control", {"event": "ready", "nodes": ["n"] * ((1 << 16) + 1)},
     "'nodes': expected a list of at most 65536 entries, got a list of 65537"),
    ("reply", {"cmd": "stats", "rank": 0, "malformed": {f"r{i}": 1 for i in range(65)}},
     f"'malformed': {COUNTS} a dict of 65"),
])
def test_meta_the_sender_refuses_before_msgpack(kind, meta, err):
    expected = ("meta", f"{kind} message meta {err}")
    assert refusal(check_meta, kind, meta) == expected
    assert refusal(encode, kind, meta=meta) == expected


def test_a_key_must_be_exactly_a_str_not_a_subclass():
    class Key(str):
        pass

    assert refusal(check_meta, "data", {Key("timings"): []}) == (
        "meta", "data message meta unexpected key 'timings'")


@pytest.mark.parametrize("meta, shown", [([], "a list of 0"), (None, "None"), ("x", "'x'"),
                                         (5, "5"), ([("timings", [])], "a list of 1")])
def test_meta_must_be_a_map(meta, shown):
    assert refusal(check_meta, "data", meta) == ("meta", f"'meta' must be a map, got {shown}")
    assert refusal(check_meta, "reply", meta) == ("meta", f"'meta' must be a map, got {shown}")
    assert refusal(decode, [hand("error", meta=meta)]) == (
        "meta", f"'meta' must be a map, got {shown}")
    assert refusal(decode, [hand("data", meta=meta)]) == (
        "meta", f"'meta' must be a map, got {shown}")


def test_an_empty_meta_is_checked_for_every_kind_but_data():
    assert decode([hand("data")]).meta == {}
    assert refusal(decode, [hand("error")]) == ("meta", "error message meta missing ['error']")
    assert refusal(decode, [hand("reply")]) == ("meta", "reply message meta missing ['cmd', 'rank']")
    assert refusal(decode, [hand("control")]) == ("meta", f"control message meta {ONE}")
    assert refusal(encode, "error") == ("meta", "error message meta missing ['error']")
    assert refusal(encode, "control", meta={}) == ("meta", f"control message meta {ONE}")


# --- msgpack's own bounds at the receiver --------------------------------------------------------

def test_a_map_of_64_counts_is_received_and_65_is_refused_by_msgpack():
    ok = {"cmd": "stats", "rank": 0, "malformed": {f"r{i}": i for i in range(64)}}
    assert decode([hand("reply", meta=ok)]).meta == ok
    over = {"cmd": "stats", "rank": 0, "malformed": {f"r{i}": i for i in range(65)}}
    assert refusal(decode, [hand("reply", meta=over)]) == (
        "header", "ids is not valid msgpack: ValueError")


def test_a_map_key_that_is_not_a_string_is_refused_by_msgpack():
    assert refusal(decode, [hand("data", meta={1: 2})]) == (
        "header", "ids is not valid msgpack: ValueError")
    assert refusal(decode, [header(msgpack.packb({1: 2}), msgpack.packb([0, 0, {}]))]) == (
        "header", "layout is not valid msgpack: ValueError")


def test_arrays_of_65536_entries_are_parsed_and_65537_refused_by_msgpack():
    # the longest list a schema allows is a rank's node names (MAX_NODES); msgpack refuses
    # longer arrays before any object is built for them
    assert refusal(decode, [hand(specs=[0] * 65536)]) == (
        "tensors", f"the layout's tensors must be a list of at most {MAX_TENSORS} "
                   "[name, dtype, shape] entries")
    assert refusal(decode, [hand(specs=[0] * 65537)]) == (
        "header", "layout is not valid msgpack: ValueError")
    assert refusal(decode, [hand("control", meta={"cmd": "stop", "nodes": [""] * 65537})]) == (
        "header", "ids is not valid msgpack: ValueError")


def test_what_the_sender_accepts_the_receiver_accepts_nodes():
    meta = {"event": "ready", "rank": 0, "nodes": [f"n{i}" for i in range(769)]}
    frames = encode("control", meta=meta)  # accepted at the sender
    assert decode(plain(frames)).meta == meta


@pytest.mark.parametrize("frames, expected", [
    ([header(b"\xc1", msgpack.packb([0, 0, {}]))], "layout is not valid msgpack: FormatError"),
    ([header(msgpack.packb([VERSION, "data", []]), b"\xc1")],
     "ids is not valid msgpack: FormatError"),
    ([header(msgpack.packb([VERSION, "data", []]), b"")], "ids is not valid msgpack: ValueError"),
    ([header(msgpack.packb([VERSION, "data", []]), msgpack.packb([0, 0, {}]) + b"\x00")],
     "ids is not valid msgpack: ExtraData"),
    ([header(msgpack.packb([VERSION, "data", []]) + b"\x00", msgpack.packb([0, 0, {}]))],
     "layout is not valid msgpack: ExtraData"),
    ([b"\x00\x00\x00\x00"], "layout is not valid msgpack: ValueError"),
])
def test_garbage_is_refused_as_not_msgpack(frames, expected):
    assert refusal(decode, frames) == ("header", expected)


# --- decode: frames and header ------------------------------------------------------------------

def test_an_empty_message_is_refused():
    assert refusal(decode, []) == ("empty", "empty message")


def test_at_most_257_frames():
    assert refusal(decode, [hand()] + [b""] * 257) == ("tensors", "258 frames; at most 257")
    assert refusal(decode, [b"junk"] + [b""] * 300) == ("tensors", "301 frames; at most 257")


@pytest.mark.parametrize("frame, expected", [
    (b"\x01", "a header of 1 bytes cannot hold its layout (length missing)"),
    (b"\x00\x00\x00", "a header of 3 bytes cannot hold its layout (length missing)"),
    (b"", "a header of 0 bytes cannot hold its layout (length missing)"),
    (b"\x01\x00\x00\x00", "a header of 4 bytes cannot hold its layout (length 1)"),
    (b"\x05\x00\x00\x00\x93\x02\xa4d", "a header of 8 bytes cannot hold its layout (length 5)"),
    (b"\x00\x01\x00\x00" + b"\x00" * 200, "a header of 204 bytes cannot hold its layout "
                                          "(length 256)"),
    (b"\x01\x00\x00\x01" + b"\x00" * 20, "a header of 24 bytes cannot hold its layout "
                                         "(length 16777217)"),
])
def test_a_header_must_hold_its_layout(frame, expected):
    assert refusal(decode, [frame]) == ("header", expected)


def test_a_layout_that_fills_the_header_leaves_the_ids_missing():
    layout = msgpack.packb([VERSION, "data", []])
    assert refusal(decode, [header(layout, b"")]) == (
        "header", "ids is not valid msgpack: ValueError")


@pytest.mark.parametrize("layout, reason, expected", [
    ({"v": 2}, "header", "the layout must be [version, kind, tensors], got a dict of 1"),
    ([VERSION, "data"], "header", "the layout must be [version, kind, tensors], got a list of 2"),
    ([VERSION, "data", [], 0], "header",
     "the layout must be [version, kind, tensors], got a list of 4"),
    ("data", "header", "the layout must be [version, kind, tensors], got 'data'"),
    ([2, "data", []], "version", "unknown wire version 2; this build speaks 3"),
    ([4, "data", []], "version", "unknown wire version 4; this build speaks 3"),
    (["3", "data", []], "version", "unknown wire version '3'; this build speaks 3"),
    ([3.0, "data", []], "version", "unknown wire version 3.0; this build speaks 3"),
    ([True, "data", []], "version", "unknown wire version True; this build speaks 3"),
    ([VERSION, "sudo", []], "kind", "unknown message kind 'sudo'"),
    ([VERSION, "DATA", []], "kind", "unknown message kind 'DATA'"),
    ([VERSION, 5, []], "kind", "unknown message kind 5"),
    ([VERSION, ["data"], []], "kind", "unknown message kind a list of 1"),
    ([VERSION, "data", {}], "tensors", "the layout's tensors must be a list of at most 256 "
                                       "[name, dtype, shape] entries"),
    ([VERSION, "data", [["x", "uint8", [1]]] * 257], "tensors",
     "the layout's tensors must be a list of at most 256 [name, dtype, shape] entries"),
    ([VERSION, "data", [["x", "uint8", [1]], ["x", "int8", [2]]]], "tensors",
     "a tensor name appears twice"),
])
def test_layout_refusals(layout, reason, expected):
    assert refusal(decode, [header(msgpack.packb(layout), msgpack.packb([0, 0, {}]))]) == (
        reason, expected)


SHAPE = "non-negative ints"
SPEC_REFUSALS = [
    ("x", "tensors", "a tensor spec must be [name, dtype, shape], got 'x'"),
    (["x", "uint8"], "tensors", "a tensor spec must be [name, dtype, shape], got a list of 2"),
    (["x", "uint8", [1], 0], "tensors",
     "a tensor spec must be [name, dtype, shape], got a list of 4"),
    ({"x": 1}, "tensors", "a tensor spec must be [name, dtype, shape], got a dict of 1"),
    (["", "uint8", [1]], "tensors", "a tensor name must be a string of 1 to 256 characters, got ''"),
    (["x" * (MAX_NAME + 1), "uint8", [1]], "tensors",
     f"a tensor name must be a string of 1 to 256 characters, got {X56}"),
    ([5, "uint8", [1]], "tensors", "a tensor name must be a string of 1 to 256 characters, got 5"),
    ([b"x", "uint8", [1]], "tensors",
     "a tensor name must be a string of 1 to 256 characters, got b'x'"),
    (["x", "complex64", [1]], "dtype", "tensor 'x' has unknown dtype 'complex64'"),
    (["x", "torch.float32", [1]], "dtype", "tensor 'x' has unknown dtype 'torch.float32'"),
    (["x", 5, [1]], "dtype", "tensor 'x' has unknown dtype 5"),
    (["x", ["float32"], [1]], "dtype", "tensor 'x' has unknown dtype a list of 1"),
    (["x", "uint8", 5], "shape", f"tensor 'x' has a bad shape 5: at most 8 {SHAPE}"),
    (["x", "uint8", "abc"], "shape", f"tensor 'x' has a bad shape 'abc': at most 8 {SHAPE}"),
    (["x", "uint8", [1] * 9], "shape", f"tensor 'x' has a bad shape a list of 9: at most 8 {SHAPE}"),
    (["x", "uint8", [2, -3]], "shape", f"tensor 'x' has a bad shape a list of 2: at most 8 {SHAPE}"),
    (["x", "uint8", [True, 3]], "shape",
     f"tensor 'x' has a bad shape a list of 2: at most 8 {SHAPE}"),
    (["x", "uint8", [1.0]], "shape", f"tensor 'x' has a bad shape a list of 1: at most 8 {SHAPE}"),
    (["x", "uint8", [0, (1 << 40) + 1]], "shape",
     f"tensor 'x' has a bad shape a list of 2: at most 8 {SHAPE}"),
    (["x", "uint8", [0, 1 << 40, 2]], "shape",
     "tensor 'x' shape a list of 3 has more than 1099511627776 elements"),
    (["x", "uint8", [1 << 20, (1 << 20) + 1]], "shape",
     "tensor 'x' shape a list of 2 has more than 1099511627776 elements"),
    # exactly at the element bound: the frame bound refuses it instead
    (["x", "uint8", [1, 1 << 40]], "size",
     "tensor 'x' declares 1099511627776 bytes; at most 4294967296"),
    (["x", "uint8", [(1 << 32) + 1]], "size", "tensor 'x' declares 4294967297 bytes; at most 4294967296"),
    (["x", "float32", [(1 << 30) + 1]], "size",
     "tensor 'x' declares 4294967300 bytes; at most 4294967296"),
    (["x", "bool", [1 << 31, 3]], "size", "tensor 'x' declares 6442450944 bytes; at most 4294967296"),
]


@pytest.mark.parametrize("spec, reason, expected", SPEC_REFUSALS)
def test_tensor_spec_refusals(spec, reason, expected):
    frames = [hand(specs=[spec]), b""]
    for _ in range(2):  # a refused layout is never cached: refused alike the second time
        assert refusal(decode, frames) == (reason, expected)


@pytest.mark.parametrize("spec, nbytes", [
    (["x" * MAX_NAME, "uint8", [1]], 1),                 # the longest name
    (["é" * MAX_NAME, "uint8", [1]], 1),                 # characters, not bytes
    (["x", "uint8", [1] * 8], 1),                        # the most dimensions
    (["x", "uint8", [1 << 32]], 1 << 32),                # exactly the 4 GiB frame bound
    (["x", "float32", [1 << 30]], 1 << 32),
    (["x", "int64", [1 << 16, 1 << 13]], 1 << 32),
])
def test_specs_at_their_bounds_are_accepted(spec, nbytes):
    # accepted up to the frame check: the (empty) frame is then refused for its size
    assert refusal(decode, [hand(specs=[spec]), b""]) == (
        "frames", f"tensor '{spec[0]}' declares {nbytes} bytes, its frame has 0")


def test_zero_size_dimensions_count_as_one_toward_the_element_bound():
    msg = decode([hand(specs=[["x", "float32", [0, 1 << 40]], ["y", "int8", [1 << 40, 0]]]),
                  b"", b""])
    assert msg.tensors["x"].shape == (0, 1 << 40) and msg.tensors["x"].dtype == torch.float32
    assert msg.tensors["y"].shape == (1 << 40, 0) and msg.tensors["y"].dtype == torch.int8


@pytest.mark.parametrize("specs, frames, expected", [
    ([["x", "float32", [4]], ["y", "int8", [1]]], [b"\0" * 16],
     "the layout declares 2 tensors but 1 frames follow (truncated or padded message)"),
    ([["x", "float32", [4]]], [b"\0" * 16] * 3, "the layout declares 1 tensors but 3 frames "
                                                "follow (truncated or padded message)"),
    ([], [b""], "the layout declares 0 tensors but 1 frames follow (truncated or padded "
                "message)"),
    ([["x", "float32", [4]]], [b"\0" * 8], "tensor 'x' declares 16 bytes, its frame has 8"),
    ([["x", "float32", [4]]], [b"\0" * 17], "tensor 'x' declares 16 bytes, its frame has 17"),
    ([["a", "int8", [1]], ["e", "int64", [0, 3]]], [b"\1", b"\0"],
     "tensor 'e' declares 0 bytes, its frame has 1"),
    ([["b", "bfloat16", [2, 2]]], [b"\0" * 4], "tensor 'b' declares 8 bytes, its frame has 4"),
])
def test_frames_must_match_the_layout(specs, frames, expected):
    assert refusal(decode, [hand(specs=specs), *frames]) == ("frames", expected)


@pytest.mark.parametrize("ids, expected", [
    ([0, 0], "the ids must be [req, mb, meta], got a list of 2"),
    ([0, 0, {}, 1], "the ids must be [req, mb, meta], got a list of 4"),
    ({"req": 0}, "the ids must be [req, mb, meta], got a dict of 1"),
    (5, "the ids must be [req, mb, meta], got 5"),
])
def test_ids_must_be_three(ids, expected):
    layout = msgpack.packb([VERSION, "data", []])
    assert refusal(decode, [header(layout, msgpack.packb(ids))]) == ("header", expected)


ID_TEXT = "'req' and 'mb' must be ints in [0, 2**63), got"


@pytest.mark.parametrize("req, mb, shown", [
    (-1, 0, "-1 and 0"),
    (0, -1, "0 and -1"),
    (BIG, 0, "9223372036854775808 and 0"),
    (0, BIG, "0 and 9223372036854775808"),
    ((1 << 64) - 1, 5, "18446744073709551615 and 5"),
    (True, 0, "True and 0"),
    (0, False, "0 and False"),
    (1.0, 0, "1.0 and 0"),
    (0, "1", "0 and '1'"),
    (None, None, "None and None"),
    ([1], 0, "a list of 1 and 0"),
])
def test_ids_must_be_int64s_not_negative(req, mb, shown):
    assert refusal(decode, [hand(req=req, mb=mb)]) == ("id", f"{ID_TEXT} {shown}")


def test_the_largest_ids_are_accepted():
    msg = decode([hand(req=MAX_ID, mb=MAX_ID)])
    assert (msg.request, msg.micro) == (MAX_ID, MAX_ID)
    msg = decode(plain(encode("data", request=MAX_ID, micro=MAX_ID)))
    assert (msg.request, msg.micro) == (MAX_ID, MAX_ID)
    msg = decode(plain(encode("data", request=MAX_ID, micro=0)))
    assert (msg.request, msg.micro) == (MAX_ID, 0)
    msg = decode(plain(encode("data", request=0, micro=MAX_ID)))
    assert (msg.request, msg.micro) == (0, MAX_ID)


def test_decode_turns_a_recursion_error_into_a_wire_error():
    """The backstop: whatever recursion happens while decoding, the caller gets a WireError."""
    frames = [hand(meta={"timings": [T]})]
    depth, f = 0, sys._getframe()
    while f:
        depth, f = depth + 1, f.f_back
    old, seen = sys.getrecursionlimit(), set()
    try:
        for limit in range(depth, depth + 80):
            try:
                sys.setrecursionlimit(limit)
            except RecursionError:  # (below the depth this test runs at)
                continue
            try:
                decode(frames)
                seen.add("ok")
            except WireError as e:
                seen.add((e.reason, str(e)))
            except RecursionError:  # (too low to even enter decode)
                seen.add("outside")
            finally:
                sys.setrecursionlimit(old)
    finally:
        sys.setrecursionlimit(old)
    assert ("header", "header nested too deeply") in seen and "ok" in seen
    assert seen <= {"ok", "outside", ("header", "header nested too deeply")}


# --- decode: exact round trips -------------------------------------------------------------------

def test_a_hand_made_message_decodes_to_exactly_its_values_as_views_of_its_frames():
    f32 = np.array([[1.5, -2.0, 3.25], [0.0, 1e30, -7.0]], dtype=np.float32)
    i64 = np.array([MAX_ID, -MAX_ID - 1, 0], dtype=np.int64)
    b16 = torch.tensor([1.0, -2.5, 3.0, 65280.0], dtype=torch.bfloat16).reshape(2, 2)
    flags = np.array([True, False, True])
    frames = [hand(specs=[["f", "float32", [2, 3]], ["i", "int64", [3]], ["b", "bfloat16", [2, 2]],
                          ["e", "float16", [0, 4]], ["s", "int8", []], ["k", "bool", [3]]],
                   req=11, mb=4, meta={"timings": [T]}),
              f32.tobytes(), i64.tobytes(), b16.view(torch.int16).numpy().tobytes(), b"",
              b"\xfe", flags.tobytes()]
    msg = decode(frames)
    assert (msg.kind, msg.request, msg.micro, msg.meta) == ("data", 11, 4, {"timings": [T]})
    t = msg.tensors
    assert list(t) == ["f", "i", "b", "e", "s", "k"]
    assert t["f"].dtype == torch.float32 and t["f"].shape == (2, 3)
    assert t["f"].tolist() == [[1.5, -2.0, 3.25], [0.0, float(np.float32(1e30)), -7.0]]
    assert t["i"].dtype == torch.int64 and t["i"].tolist() == [MAX_ID, -MAX_ID - 1, 0]
    assert t["b"].dtype == torch.bfloat16 and t["b"].shape == (2, 2)
    assert t["b"].float().tolist() == [[1.0, -2.5], [3.0, 65280.0]]
    assert t["e"].dtype == torch.float16 and t["e"].shape == (0, 4)
    assert t["s"].dtype == torch.int8 and t["s"].shape == () and t["s"].item() == -2
    assert t["k"].dtype == torch.bool and t["k"].tolist() == [True, False, True]
    # no copy on receive: each tensor lies on its frame's bytes
    for name, frame in [("f", frames[1]), ("i", frames[2]), ("b", frames[3]), ("k", frames[6])]:
        assert t[name].data_ptr() == np.frombuffer(frame, np.uint8).ctypes.data


def test_an_encoded_message_round_trips_exactly():
    tensors = {"x": torch.arange(24, dtype=torch.float64).reshape(2, 3, 4),
               "b": torch.tensor([[0.5, -1.0]], dtype=torch.bfloat16),
               "e": torch.empty(3, 0, dtype=torch.bfloat16),
               "z": torch.empty(0, dtype=torch.uint8),
               "s": torch.tensor(7, dtype=torch.int32)}
    meta = {"timings": [T], "gen": {"seqs": [[1, 0, 2]], "sample": [SAMPLE]}}
    msg = decode(plain(encode("data", request=3, micro=9, tensors=tensors, meta=meta)))
    assert (msg.kind, msg.request, msg.micro, msg.meta) == ("data", 3, 9, meta)
    assert list(msg.tensors) == ["x", "b", "e", "z", "s"]
    for name, t in tensors.items():
        got = msg.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


# --- encode ---------------------------------------------------------------------------------------

def test_encode_defaults_and_the_exact_bytes_of_a_header():
    assert encode("data") == [b"\x08\x00\x00\x00\x93\x03\xa4data\x90"
                              b"\x04\x00\x00\x00\x93\x00\x00\x80"]
    msg = decode(encode("data"))
    assert (msg.kind, msg.request, msg.micro, msg.tensors, msg.meta) == ("data", 0, 0, {}, {})
    # a small tensor follows the ids in the header, from the next multiple of 8 (31 -> 32)
    frames = encode("data", request=7, micro=3,
                    tensors={"x": torch.tensor([1, 2], dtype=torch.int16)})
    assert frames == [b"\x13\x00\x00\x00\x93\x03\xa4data\x91\x93\xa1x\xa5int16\x91\x02"
                      b"\x04\x00\x00\x00\x93\x07\x03\x80" + b"\x00" + b"\x01\x00\x02\x00"]
    # a large one has a frame of its own
    big = torch.ones(INLINE_BYTES // 2 + 1, dtype=torch.int16)
    frames = encode("data", request=7, micro=3, tensors={"x": big})
    assert len(frames) == 2 and bytes(memoryview(frames[1])) == big.numpy().tobytes()
    assert frames[0] == b"\x15\x00\x00\x00\x93\x03\xa4data\x91\x93\xa1x\xa5int16\x91" \
                        b"\xcd\x20\x01\x04\x00\x00\x00\x93\x07\x03\x80"
    assert encode("reply", meta={"cmd": "stop", "rank": 1})[0] == (
        b"\x09\x00\x00\x00\x93\x03\xa5reply\x90\x13\x00\x00\x00"
        b"\x93\x00\x00\x82\xa3cmd\xa4stop\xa4rank\x01")


# a tensor that takes a message past the inline bound: the others get frames of their own
PAST_INLINE = {"pad": torch.zeros(INLINE_BYTES, dtype=torch.uint8)}


def test_a_non_contiguous_tensor_travels_as_c_contiguous_bytes_in_logical_order():
    x = torch.arange(6, dtype=torch.int8).reshape(2, 3).t()  # [[0, 3], [1, 4], [2, 5]]
    frames = encode("data", tensors={"x": x, **PAST_INLINE})
    view = memoryview(frames[1])
    assert view.c_contiguous and view.nbytes == 6
    assert bytes(view) == b"\x00\x03\x01\x04\x02\x05"
    msg = decode(frames)  # the frames as handed to ZeroMQ, not copied
    assert msg.tensors["x"].tolist() == [[0, 3], [1, 4], [2, 5]]
    inline = encode("data", tensors={"x": x})
    assert len(inline) == 1 and bytes(memoryview(inline[0]))[-6:] == b"\x00\x03\x01\x04\x02\x05"
    assert decode(inline).tensors["x"].tolist() == [[0, 3], [1, 4], [2, 5]]


def test_bfloat16_and_empty_tensors_on_the_sender():
    b = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    tensors = {"b": b, "e": torch.empty(0, 5), "f": torch.empty(2, 0)}
    frames = encode("data", tensors={**tensors, **PAST_INLINE})
    assert bytes(memoryview(frames[1])) == b"\x80\x3f\x00\xc0"  # bfloat16 1.0, -2.0 (LE)
    assert memoryview(frames[1]).c_contiguous
    assert frames[2] == b"" and frames[3] == b""
    inline = encode("data", tensors=tensors)  # the same, its 4 bytes after the ids
    assert len(inline) == 1 and bytes(memoryview(inline[0]))[-4:] == b"\x80\x3f\x00\xc0"
    for msg in (decode(frames), decode(inline)):
        assert msg.tensors["b"].dtype == torch.bfloat16
        assert msg.tensors["b"].tolist() == [1.0, -2.0]
        assert msg.tensors["e"].shape == (0, 5) and msg.tensors["f"].shape == (2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_cuda_tensor_is_sent_from_host_memory():
    x = torch.arange(4.0, device="cuda")
    msg = decode(plain(encode("data", tensors={"x": x})))
    assert msg.tensors["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("kw, shown", [
    ({"request": -1}, "-1 and 0"),
    ({"micro": -1}, "0 and -1"),
    ({"request": BIG}, "9223372036854775808 and 0"),
    ({"micro": BIG}, "0 and 9223372036854775808"),
    ({"request": 5, "micro": -(1 << 70)}, "5 and -1180591620717411303424"),
])
def test_encode_refuses_ids_out_of_range(kw, shown):
    assert refusal(encode, "data", **kw) == (
        "id", f"request and micro-batch ids must be ints in [0, 2**63), got {shown}")


@pytest.mark.parametrize("kind", ["sudo", "result", "DATA", ""])
def test_encode_refuses_an_unknown_kind(kind):
    assert refusal(encode, kind) == ("kind", f"unknown message kind '{kind}'")
    assert refusal(encode, kind, meta={"timings": []}) == ("kind", f"unknown message kind '{kind}'")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.uint16])
def test_encode_refuses_a_dtype_the_wire_does_not_carry(dtype):
    assert refusal(encode, "data", tensors={"ok": torch.zeros(1), "x": torch.zeros(2, dtype=dtype)}) \
        == ("dtype", f"tensor 'x' has dtype {dtype}, which the wire does not carry")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex32])
def test_encode_refuses_a_dtype_numpy_lacks_with_a_wire_error(dtype):
    assert refusal(encode, "data", tensors={"x": torch.zeros(2, dtype=dtype)}) == (
        "dtype", f"tensor 'x' has dtype {dtype}, which the wire does not carry")


def test_an_empty_tensor_of_a_dtype_numpy_lacks_is_refused_with_its_reason():
    assert refusal(encode, "data", tensors={"x": torch.zeros(0, dtype=torch.float8_e4m3fn)}) == (
        "dtype", "tensor 'x' has dtype torch.float8_e4m3fn, which the wire does not carry")


def _many(n: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.tensor([i % 256], dtype=torch.uint8) for i in range(n)}


def test_256_tensors_travel_and_257_are_refused_at_the_sender():
    frames = encode("data", tensors=_many(MAX_TENSORS))
    assert len(frames) == 1  # 256 bytes: inline, each on its own 8 bytes
    msg = decode(plain(frames))
    assert [int(msg.tensors[f"t{i}"][0]) for i in range(MAX_TENSORS)] == list(range(256))
    frames = encode("data", tensors={**_many(MAX_TENSORS - 1), **PAST_INLINE})
    assert len(frames) == MAX_TENSORS + 1
    msg = decode(plain(frames))
    assert [int(msg.tensors[f"t{i}"][0]) for i in range(MAX_TENSORS - 1)] == list(range(255))
    assert refusal(encode, "data", tensors=_many(MAX_TENSORS + 1)) == (
        "tensors", "257 tensors in one message; at most 256")


@pytest.mark.parametrize("tensors, reason, expected", [
    ({"": torch.zeros(1)}, "tensors", "a tensor name must be a string of 1 to 256 characters, "
                                      "got ''"),
    ({"x" * (MAX_NAME + 1): torch.zeros(1)}, "tensors",
     f"a tensor name must be a string of 1 to 256 characters, got {X56}"),
    ({7: torch.zeros(1)}, "tensors", "a tensor name must be a string of 1 to 256 characters, "
                                     "got 7"),
    ({"x": torch.zeros([1] * 9)}, "shape",
     f"tensor 'x' has a bad shape a list of 9: at most 8 {SHAPE}"),
])
def test_the_sender_refuses_a_layout_as_the_receiver_would(tensors, reason, expected):
    assert refusal(encode, "data", tensors=tensors) == (reason, expected)
    (name, t), = tensors.items()
    spec = [name, "float32", list(t.shape)]
    assert refusal(decode, [hand(specs=[spec]), b"\0" * 4]) == (reason, expected)


# --- sizes of the header and the layout ----------------------------------------------------------

def names_for_layout(size: int, kind: str = "data") -> list[str]:
    """Distinct names, each of at most MAX_NAME characters, such that the layout
    ``[VERSION, kind, [[name, "float32", [0]], ...]]`` packs to exactly ``size`` bytes."""
    def packed(names):
        return len(msgpack.packb([VERSION, kind, [[n, "float32", [0]] for n in names]]))

    full = [f"{i:03d}" + "\U0001F600" * (MAX_NAME - 3) for i in range(MAX_TENSORS)]  # 1015 B
    names: list[str] = []
    while packed(names + [full[len(names)], "000"]) <= size:
        names.append(full[len(names)])
    # the last name: a 3-character prefix, then 4-byte and 1-byte characters
    need = size - packed(names + ["\0"]) + 1  # its UTF-8 length with a 1-byte str header
    for nbytes in (need, need - 1, need - 2):  # (a longer name has a longer str header)
        last = f"{len(names):03d}" + "\U0001F600" * ((nbytes - 3) // 4) + "x" * ((nbytes - 3) % 4)
        if packed(names + [last]) == size:
            assert len(last) <= MAX_NAME
            return names + [last]
    raise AssertionError(f"no layout of {size} bytes")


def empties(names) -> dict[str, torch.Tensor]:
    return {n: torch.empty(0) for n in names}


IDS = msgpack.packb([0, 0, {}])  # 4 bytes


def test_a_header_of_exactly_128_KiB_is_sent_and_received_one_byte_more_is_refused():
    names = names_for_layout(MAX_HEADER_BYTES - 8 - len(IDS))  # (8: the two lengths)
    frames = encode("data", tensors=empties(names))
    assert len(frames[0]) == MAX_HEADER_BYTES
    msg = decode(plain(frames))
    assert list(msg.tensors) == names
    assert decode([hand(specs=[[n, "float32", [0]] for n in names])] + [b""] * len(names)).tensors
    over = names_for_layout(MAX_HEADER_BYTES - 8 - len(IDS) + 1)
    assert refusal(encode, "data", tensors=empties(over)) == (
        "size", "header of 131073 bytes exceeds 131072")
    assert refusal(decode, [hand(specs=[[n, "float32", [0]] for n in over])] + [b""] * len(over)) \
        == ("size", "header of 131073 bytes exceeds 131072")
    # the meta counts toward the same bound
    assert refusal(encode, "data", tensors=empties(names), micro=1 << 16) == (
        "size", "header of 131076 bytes exceeds 131072")


def test_a_layout_of_exactly_128_KiB_passes_its_own_bound_but_not_the_headers():
    names = names_for_layout(MAX_HEADER_BYTES)
    assert refusal(encode, "data", tensors=empties(names)) == (
        "size", "header of 131084 bytes exceeds 131072")
    names = names_for_layout(MAX_HEADER_BYTES + 1)
    assert refusal(encode, "data", tensors=empties(names)) == (
        "size", "layout of 131073 bytes exceeds 131072")


def test_decode_refuses_a_header_over_128_KiB_before_reading_it():
    frame = b"\xff\xff\xff\xff" + b"\xc1" * MAX_HEADER_BYTES
    assert refusal(decode, [frame]) == ("size", "header of 131076 bytes exceeds 131072")
    assert refusal(decode, [hand(meta={"junk": "x" * (1 << 20)})]) == (
        "size", "header of 1048606 bytes exceeds 131072")


# --- the layout caches ----------------------------------------------------------------------------

def test_a_received_layout_is_kept_and_served_from_the_cache(fresh_caches):
    layout = msgpack.packb([VERSION, "data", [["x", "float32", [2, 3]]]])
    ids = msgpack.packb([1, 2, {}])
    decode([header(layout, ids), b"\0" * 24])
    assert wire._received == {
        layout: ("data", (("x", torch.float32, np.dtype("float32"), (2, 3), 24),))}
    # a hit is not parsed again: what the cache holds for these bytes is what decode uses
    wire._received[layout] = ("reply", (("y", torch.int16, np.dtype("int16"), (3,), 6),))
    msg = decode([header(layout, msgpack.packb([1, 2, {"cmd": "stop", "rank": 4}])),
                  b"\x01\x00\x02\x00\x03\x00"])
    assert msg.kind == "reply" and msg.tensors["y"].tolist() == [1, 2, 3]
    assert msg.meta == {"cmd": "stop", "rank": 4}


def test_a_cached_layout_still_gets_its_ids_and_meta_checked(fresh_caches):
    layout = msgpack.packb([VERSION, "error", [["x", "uint8", [2]]]])
    good = msgpack.packb([1, 2, {"error": {"message": "m"}}])
    assert decode([header(layout, good), b"ab"]).meta == {"error": {"message": "m"}}
    assert layout in wire._received
    assert refusal(decode, [header(layout, msgpack.packb([1, 2, {}])), b"ab"]) == (
        "meta", "error message meta missing ['error']")
    assert refusal(decode, [header(layout, msgpack.packb([-1, 2, {}])), b"ab"]) == (
        "id", f"{ID_TEXT} -1 and 2")
    assert refusal(decode, [header(layout, msgpack.packb([1, 2, []])), b"ab"]) == (
        "meta", "'meta' must be a map, got a list of 0")
    assert refusal(decode, [header(layout, good), b"abc"]) == (
        "frames", "tensor 'x' declares 2 bytes, its frame has 3")
    assert refusal(decode, [header(layout, good)]) == (  # (one frame: its bytes are inline)
        "frames", "tensor 'x' declares 2 bytes, the header has 0 left for it")


@pytest.mark.parametrize("size, kept", [(8191, True), (8192, True), (8193, False), (9000, False)])
def test_received_layouts_of_up_to_8_KiB_are_kept(fresh_caches, size, kept):
    names = names_for_layout(size)
    layout = msgpack.packb([VERSION, "data", [[n, "float32", [0]] for n in names]])
    assert len(layout) == size
    msg = decode([header(layout, IDS)] + [b""] * len(names))
    assert list(msg.tensors) == names
    assert (layout in wire._received) is kept
    assert len(wire._received) == int(kept)


def test_the_received_cache_is_cleared_when_full(fresh_caches):
    def receive(n):
        decode([hand(specs=[["x", "uint8", [n]]]), b"\0" * n])

    for n in range(1, 1025):
        receive(n)
    assert len(wire._received) == 1024
    receive(1025)  # full: cleared, then this one kept
    assert list(wire._received.values()) == [
        ("data", (("x", torch.uint8, np.dtype("uint8"), (1025,), 1025),))]
    receive(3)
    assert len(wire._received) == 2


def test_a_sent_layout_is_kept_and_served_from_the_cache(fresh_caches):
    key = ("data", ("x", torch.int16, torch.Size([2])))
    frames = encode("data", tensors={"x": torch.tensor([1, 2], dtype=torch.int16)})
    layout = b"\x13\x00\x00\x00\x93\x03\xa4data\x91\x93\xa1x\xa5int16\x91\x02"
    assert wire._sent == {key: layout}
    ids = len(IDS).to_bytes(4, "little") + IDS
    assert frames == [layout + ids + b"\x00" + b"\x01\x00\x02\x00"]  # (inline from byte 32)
    # a hit is not packed again: what the cache holds is what is sent
    wire._sent[key] = b"\x01\x00\x00\x00\x90"
    frames = encode("data", tensors={"x": torch.tensor([1, 2], dtype=torch.int16)})
    assert frames == [b"\x01\x00\x00\x00\x90" + ids + b"\x00" * 3 + b"\x01\x00\x02\x00"]


@pytest.mark.parametrize("size, kept", [(8187, True), (8188, True), (8189, False)])
def test_sent_layouts_of_up_to_8_KiB_with_their_length_are_kept(fresh_caches, size, kept):
    names = names_for_layout(size)  # packed size; 4 more bytes with its length in front
    encode("data", tensors=empties(names))
    key = ("data", *[(n, torch.float32, torch.Size([0])) for n in names])
    assert (key in wire._sent) is kept
    assert len(wire._sent) == int(kept)
    if kept:
        assert len(wire._sent[key]) == size + 4


def test_the_sent_cache_is_cleared_when_full(fresh_caches):
    for n in range(1, 1025):
        encode("data", tensors={"x": torch.zeros(n, dtype=torch.uint8)})
    assert len(wire._sent) == 1024
    encode("data", tensors={"x": torch.zeros(1025, dtype=torch.uint8)})
    assert list(wire._sent) == [("data", ("x", torch.uint8, torch.Size([1025])))]


def test_a_refused_layout_is_never_kept(fresh_caches):
    for _ in range(2):
        assert refusal(decode, [hand(specs=[["x", "uint8", [-1]]]), b""])[0] == "shape"
        assert refusal(encode, "data", tensors={"": torch.zeros(1)})[0] == "tensors"
    assert wire._received == {} and wire._sent == {}


# --- shared-memory rings ---------------------------------------------------------------------------

RING = 4096


def ring_of(size: int = RING) -> bytearray:
    return bytearray(size)


def put(ring: bytearray, at: int, t: torch.Tensor) -> None:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ring[at:at + len(data)] = data


def address(ring: bytearray) -> int:
    return np.frombuffer(ring, np.uint8).ctypes.data


def shm_frames(tensors, shm, **kw):
    return encode("data", request=1, micro=2, tensors=tensors, meta={"shm": shm, **kw})[:1]


def test_ring_tensors_are_exact_views_of_the_ring_at_their_offsets():
    ring = ring_of()
    tensors = {
        "u": torch.tensor([0xAB], dtype=torch.uint8),                       # at 0, one byte
        "x": torch.tensor([[1.5, -2.0, 3.0], [4.0, 5.5, -6.0]]),          # at 64
        "b": torch.tensor([[1.0, -2.5], [3.0, 0.5]], dtype=torch.bfloat16),  # at 192
        "i": torch.tensor([MAX_ID, -1, 7], dtype=torch.int64),            # at 256
        "e": torch.empty(0, 7, dtype=torch.int64),                        # nothing to place
        "f": torch.empty(3, 0, dtype=torch.bfloat16),
        "k": torch.tensor([True, False]),                                  # at 384
        "z": torch.full((64,), 9, dtype=torch.int8),                       # ends at the end
    }
    offsets = [0, 64, 192, 256, RING, RING, 384, RING - 64]
    for (name, t), at in zip(tensors.items(), offsets):
        if t.numel():
            put(ring, at, t)
    frames = shm_frames(tensors, [3, 4096, *offsets], timings=[T])
    assert len(frames) == 1
    msg = decode(frames, {3: ring})
    assert (msg.kind, msg.request, msg.micro) == ("data", 1, 2)
    assert msg.meta == {"shm": [3, 4096, *offsets], "timings": [T]}
    assert list(msg.tensors) == list(tensors)
    for (name, t), at in zip(tensors.items(), offsets):
        got = msg.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t), name
        if t.numel():
            assert got.data_ptr() == address(ring) + at, name  # a view, not a copy
    assert msg.tensors["u"].item() == 0xAB
    assert msg.tensors["b"].float().tolist() == [[1.0, -2.5], [3.0, 0.5]]
    # a view: what the ring holds later is what the tensor reads
    put(ring, 64, torch.tensor([7.0]))
    assert msg.tensors["x"][0, 0].item() == 7.0


def test_the_same_bytes_read_from_several_places():
    ring = ring_of(1024)
    put(ring, 128, torch.tensor([1, 2, 3, 4], dtype=torch.int16))
    put(ring, 512, torch.tensor([5, 6, 7, 8], dtype=torch.int16))
    tensors = {"a": torch.zeros(4, dtype=torch.int16), "b": torch.zeros(2, 2, dtype=torch.int16)}
    msg = decode(shm_frames(tensors, [0, 640, 512, 128]), {0: ring, 1: ring_of(64)})
    assert msg.tensors["a"].tolist() == [5, 6, 7, 8]
    assert msg.tensors["b"].tolist() == [[1, 2], [3, 4]]
    msg = decode(shm_frames({"c": torch.zeros(2, dtype=torch.bfloat16)}, [1, 64, 64]),
                 {1: ring})
    assert msg.tensors["c"].view(torch.int16).tolist() == [0, 0]  # (ring 1 is `ring` here)


NO_RING = "which this link does not have"


@pytest.mark.parametrize("shm, rings, shown", [
    ([3, 64, 0], None, "3"),
    ([3, 64, 0], {}, "3"),
    ([3, 64, 0], {4: "ring"}, "3"),
    ([64, 3, 0], {3: "ring"}, "64"),
    ([], None, "None"),
    ([], {3: "ring"}, "None"),
    ([BIG - 1, 64, 0], {3: "ring"}, "9223372036854775807"),
])
def test_a_ring_the_link_does_not_have_is_refused(shm, rings, shown):
    ring = ring_of()
    rings = None if rings is None else {k: ring for k in rings}
    frames = shm_frames({"x": torch.zeros(4)}, shm)
    assert refusal(decode, frames, rings) == (
        "shm", f"a shared-memory message names ring {shown}, {NO_RING}")


@pytest.mark.parametrize("frames_extra, shm, expected", [
    (1, [3, 64, 0], "carries 1 frames and 1 offsets for 1 tensors"),
    (1, [3, 64], "carries 1 frames and 0 offsets for 1 tensors"),
    (0, [3, 64], "carries 0 frames and 0 offsets for 1 tensors"),
    (0, [3], "carries 0 frames and -1 offsets for 1 tensors"),
    (0, [3, 128, 0, 64], "carries 0 frames and 2 offsets for 1 tensors"),
    (0, [3, 192, 0, 64, 128], "carries 0 frames and 3 offsets for 1 tensors"),
    (2, [3, 64, 0], "carries 2 frames and 1 offsets for 1 tensors"),
])
def test_a_ring_message_carries_no_frames_and_one_offset_per_tensor(frames_extra, shm, expected):
    frames = encode("data", tensors={"x": torch.zeros(4)}, meta={"shm": shm})
    frames = frames[:1] + [b"\0" * 16] * frames_extra
    assert refusal(decode, frames, {3: ring_of()}) == (
        "shm", f"a shared-memory message {expected}")


def test_a_ring_message_of_no_tensors():
    msg = decode(shm_frames({}, [3, 0]), {3: ring_of()})
    assert msg.tensors == {} and msg.meta == {"shm": [3, 0]}
    assert refusal(decode, shm_frames({}, [3, 0, 0]), {3: ring_of()}) == (
        "shm", "a shared-memory message carries 0 frames and 1 offsets for 0 tensors")


PLACE = "is not an aligned place inside the ring of 4096 bytes"


@pytest.mark.parametrize("t, at, nbytes", [
    (torch.zeros(15), 32, 60),                            # misaligned, inside
    (torch.zeros(15), 1, 60),
    (torch.zeros(15), 4095, 60),
    (torch.zeros(15), -64, 60),                           # aligned, before the start
    (torch.zeros(15), RING, 60),                          # aligned, past the end
    (torch.zeros(17), RING - 64, 68),                     # four bytes past the end
    (torch.zeros(65, dtype=torch.uint8), RING - 64, 65),  # one byte past the end
    (torch.zeros(1, dtype=torch.uint8), RING, 1),
    (torch.zeros(2, dtype=torch.bfloat16), RING, 4),
    (torch.zeros(2, dtype=torch.bfloat16), 96, 4),
    (torch.zeros(1024, dtype=torch.int64), 0, 8192),      # larger than the ring
    (torch.zeros(3), 1 << 40, 12),
    (torch.empty(0), RING + 64, 0),                       # even an empty tensor
    (torch.empty(0), 32, 0),
])
def test_a_tensor_outside_the_ring_or_misaligned_is_refused(t, at, nbytes):
    frames = shm_frames({"ok": torch.zeros(1), "x": t}, [3, RING, 0, at])
    assert refusal(decode, frames, {3: ring_of()}) == (
        "shm", f"tensor 'x' at offset {at} ({nbytes} bytes) {PLACE}")


@pytest.mark.parametrize("t, at", [
    (torch.zeros(16), RING - 64),               # ends exactly at the end
    (torch.zeros(1024), 0),                     # fills the ring
    (torch.zeros(2, dtype=torch.bfloat16), RING - 64),
    (torch.empty(0), RING),                     # an empty tensor at the very end
    (torch.empty(0, dtype=torch.bfloat16), 0),
])
def test_a_tensor_at_the_edges_of_the_ring_is_accepted(t, at):
    ring = ring_of()
    src = (torch.arange(t.numel()) % 100).to(t.dtype).reshape(t.shape)
    if src.numel():
        put(ring, at, src)
    msg = decode(shm_frames({"x": t}, [3, RING, at]), {3: ring})
    got = msg.tensors["x"]
    assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, src)
    if src.numel():
        assert got.data_ptr() == address(ring) + at
