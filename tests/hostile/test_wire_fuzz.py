"""Property-based fuzzing of every header field: a decode either returns a message that follows
the schema or raises WireError, never anything else; whatever a rank answers to an accepted
message, its peer accepts."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastserve.engine.core import RankCore
from fastserve.engine.wire import (DTYPES, MAX_HEADER_BYTES, MAX_TEXT, MAX_TIMINGS, META,
                                   VERSION, Message, check_meta, decode, encode)
from fastserve.errors import WireError
from fastserve.graph import compile_graph, load_spec
from fastserve.graph.module import build_subgraph
from wireframes import header, header_frames

ROOT = Path(__file__).resolve().parents[2]
# under mutation testing (mutmut sets MUTANT_UNDER_TEST) each of thousands of mutants runs
# these: fewer examples there, the full 400 in the test suite
FUZZ = settings(max_examples=50 if os.environ.get("MUTANT_UNDER_TEST") else 400, deadline=None,
                suppress_health_check=list(HealthCheck))

# any value msgpack can carry, nested a little
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
                    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)

VALID = {"v": VERSION, "kind": "data", "req": 3, "mb": 1,
         "tensors": [["x", "float32", [2, 3]]],
         "meta": {"timings": [{"rank": 0, "stage": 0, "recv": 1.0, "start": 1.0, "end": 2.0}]}}
PAYLOAD = [b"\0" * 24]


def frames(header, payload=PAYLOAD):
    return [*header_frames(header), *payload]


def decodes_or_refuses(fr) -> Message | None:
    try:
        msg = decode(fr)
    except WireError as e:
        assert e.reason and str(e)
        return None
    # accepted: it must follow the schema and re-encode to something a peer accepts
    check_meta(msg.kind, msg.meta)
    decode([bytes(memoryview(f)) for f in encode(msg.kind, request=msg.request, micro=msg.micro,
                                                 tensors=msg.tensors, meta=msg.meta)])
    return msg


@FUZZ
@given(field=st.sampled_from(sorted(VALID)), value=values)
def test_any_value_in_any_header_field(field, value):
    decodes_or_refuses(frames({**VALID, field: value}))


@FUZZ
@given(key=st.sampled_from(["timings", "error", "cmd", "event", "rank", "busy", "malformed",
                            "junk"]), value=values,
       kind=st.sampled_from(sorted(META)))
def test_any_meta_field_of_any_kind(key, value, kind):
    decodes_or_refuses(frames({**VALID, "kind": kind, "meta": {key: value}}))


@FUZZ
@given(spec=values, payload=st.lists(st.binary(max_size=64), max_size=3))
def test_any_tensor_spec_and_frames(spec, payload):
    decodes_or_refuses(frames({**VALID, "tensors": [spec] * len(payload)}, payload))


@FUZZ
@given(name=values, dtype=values, shape=st.one_of(values, st.lists(
    st.integers(-(1 << 62), 1 << 62), max_size=10)))
def test_any_name_dtype_and_shape(name, dtype, shape):
    decodes_or_refuses(frames({**VALID, "tensors": [[name, dtype, shape]]}))


@FUZZ
@given(raw=st.binary(max_size=256))
def test_any_bytes_as_a_header(raw):
    layout = msgpack.packb([VERSION, "data", VALID["tensors"]])
    ids = msgpack.packb([VALID["req"], VALID["mb"], VALID["meta"]])
    decodes_or_refuses([header(raw, ids), *PAYLOAD])
    decodes_or_refuses([header(layout, raw), *PAYLOAD])
    decodes_or_refuses([raw, *PAYLOAD])
    decodes_or_refuses([raw])


@pytest.mark.parametrize("header, reason", [
    ({**VALID, "kind": ["data"]}, "kind"),
    ({**VALID, "tensors": [["x", ["float32"], [2, 3]]]}, "dtype"),
    ({**VALID, "tensors": [["x", "float32", [0, 1 << 40, 1 << 40]]]}, "shape"),
    ({**VALID, "tensors": [["x", "float32", [1 << 40, 1 << 40]]]}, "shape"),
    ({**VALID, "tensors": [["x", "float32", [2, -3]]]}, "shape"),
    ({**VALID, "tensors": [["x", "float32", [True, 3]]]}, "shape"),
    ({**VALID, "meta": {"timings": "soon"}}, "meta"),
    ({**VALID, "meta": {"timings": [{"rank": "0"}]}}, "meta"),
    ({**VALID, "meta": {"anything": 1}}, "meta"),
    ({**VALID, "req": -1}, "id"),
    ({**VALID, "req": 1.5}, "id"),
    ({**VALID, "mb": True}, "id"),
    ({**VALID, "extra": 1}, "header"),
    ({**VALID, "kind": "result"}, "kind"),
    ({**VALID, "kind": "control", "meta": {"cmd": "rm -rf /"}}, "meta"),
    ({**VALID, "kind": "control", "meta": {"cmd": "stop", "event": "ready"}}, "meta"),
    ({**VALID, "kind": "error", "meta": {"error": {"message": "x" * (MAX_TEXT + 1)}}}, "meta"),
])
def test_each_known_killer_is_refused_with_its_reason(header, reason):
    with pytest.raises(WireError) as info:
        decode(frames(header))
    assert info.value.reason == reason


def test_an_empty_shape_with_huge_other_dims_does_not_reach_torch():
    with pytest.raises(WireError, match="more than"):
        decode(frames({**VALID, "tensors": [["x", "float32", [0] + [1 << 20] * 7]]}, [b""]))


@pytest.fixture(scope="module")
def core():
    graph = compile_graph(load_spec(ROOT / "graphs/mlp.yaml"))
    shard = build_subgraph(graph, graph.order[:2], [t.name for t in graph.inputs],
                           [graph.order[1]])
    return RankCore(0, 0, shard)


def _answer_is_accepted(core, msg):
    out = core.handle(msg)
    fr = encode(out.kind, request=out.request, micro=out.micro, tensors=out.tensors,
                meta=out.meta)
    assert len(fr[0]) <= MAX_HEADER_BYTES
    return decode([bytes(memoryview(f)) for f in fr])


def test_a_rank_answers_a_full_message_with_an_error_its_peer_accepts(core):
    # the header just under the bound: the most timings a message may carry; appending one
    # more would make the answer unacceptable, so the rank answers with an error
    timing = {"rank": 1, "stage": 1, "recv": 1.0, "start": 1.0, "end": 1.0, "sent": 1.0}
    x = torch.randn(2, 64)
    full = decode([bytes(memoryview(f)) for f in encode(
        "data", request=1, tensors={"x": x}, meta={"timings": [timing] * MAX_TIMINGS})])
    answer = _answer_is_accepted(core, full)
    assert answer.kind == "error" and "stages already" in answer.meta["error"]["message"]
    almost = Message("data", 1, 0, {"x": x}, {"timings": [timing] * (MAX_TIMINGS - 1)})
    answer = _answer_is_accepted(core, almost)
    assert answer.kind == "data" and len(answer.meta["timings"]) == MAX_TIMINGS


class _Loud:
    """A shard whose node raises with a 100,000-character message."""

    input_names = ["x"]
    current_node = "loud"

    def __call__(self, tensors):
        raise ValueError("x" * 100_000)


def test_a_huge_error_text_is_cut_to_what_the_wire_carries():
    answer = _answer_is_accepted(RankCore(0, 0, _Loud()),
                                 Message("data", 1, 0, {"x": torch.randn(1, 64)}, {}))
    assert answer.kind == "error" and len(answer.meta["error"]["message"]) <= MAX_TEXT
    assert answer.meta["error"]["node"] == "loud"


@FUZZ
@given(dtype=st.sampled_from(sorted(DTYPES)), shape=st.lists(st.integers(0, 4), max_size=4))
def test_every_valid_tensor_round_trips(dtype, shape):
    t = torch.zeros(shape, dtype=DTYPES[dtype])
    msg = decode([zmq.Frame(bytes(memoryview(f))) for f in encode("data", tensors={"t": t})])
    assert msg.tensors["t"].shape == t.shape and msg.tensors["t"].dtype == t.dtype


def _nested(depth: int):
    v: list = []
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize("field", ["kind", "req", "tensors", "meta", "shape", "cmd", "timings"])
def test_deeply_nested_values_are_refused_not_recursed(field):
    deep = _nested(1000)
    header = dict(VALID)
    if field == "shape":
        header["tensors"] = [["x", "float32", deep]]
    elif field == "cmd":
        header.update(kind="control", meta={"cmd": deep})
    elif field == "timings":
        header["meta"] = {"timings": deep}
    else:
        header[field] = deep
    with pytest.raises(WireError):
        decode(frames(header))
