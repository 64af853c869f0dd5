"""The wire format in one process: exact round trips without copies, and clear rejections."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
import zmq

from fastserve.engine.wire import DTYPES, INLINE_BYTES, VERSION, decode, encode
from fastserve.errors import WireError
from wireframes import header, header_frames


TIMING = {"rank": 0, "stage": 0, "recv": 1.0, "start": 1.5, "end": 2.0}


def frames_of(tensors, **kw):
    # as ZeroMQ hands them over: zmq.Frame objects owning their bytes
    return [zmq.Frame(bytes(memoryview(f))) for f in encode("data", tensors=tensors, **kw)]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_every_dtype_round_trips_exactly(dtype):
    x = (torch.randn(3, 5) * 100).to(dtype)
    msg = decode(frames_of({"x": x, "empty": torch.empty(0, 7, dtype=dtype)}, request=7,
                           micro=3, meta={"timings": [TIMING]}))
    assert (msg.kind, msg.request, msg.micro, msg.meta) == ("data", 7, 3,
                                                            {"timings": [TIMING]})
    assert msg.tensors["x"].dtype == dtype and torch.equal(msg.tensors["x"], x)
    assert msg.tensors["empty"].shape == (0, 7)


def address(frame) -> int:
    return np.frombuffer(frame.buffer, np.uint8).ctypes.data


def test_decoded_tensors_live_on_the_received_frames():
    big = torch.arange(INLINE_BYTES // 4 + 1.0)  # one float past the inline bound
    frames = frames_of({"x": big})
    assert len(frames) == 2
    t = decode(frames).tensors["x"]
    assert t.data_ptr() == address(frames[1])  # no copy on receive
    torch.testing.assert_close(t, big)


def test_small_tensors_travel_in_the_header_frame_and_live_on_it():
    # a frame costs ZeroMQ (and CURVE) more than copying a few KiB into the header
    x, ids = torch.arange(12.0).reshape(3, 4), torch.tensor([[7, 8, 9]])
    frames = frames_of({"x": x, "none": torch.empty(0, 2), "ids": ids},
                       meta={"timings": [TIMING]})
    assert len(frames) == 1
    msg = decode(frames)
    start, end = address(frames[0]), address(frames[0]) + len(frames[0].bytes)
    for name, want in (("x", x), ("ids", ids)):
        got = msg.tensors[name]
        assert start < got.data_ptr() and got.data_ptr() + got.nbytes <= end  # no copy
        assert (got.data_ptr() - start) % 8 == 0  # each from a multiple of 8 in the frame
        assert torch.equal(got, want)
    assert msg.tensors["none"].shape == (0, 2) and msg.meta == {"timings": [TIMING]}
    # exactly at the bound: inline; one element more: a frame of its own
    assert len(encode("data", tensors={"x": torch.zeros(INLINE_BYTES, dtype=torch.uint8)})) == 1
    assert len(encode("data", tensors={"x": torch.zeros(INLINE_BYTES + 1,
                                                        dtype=torch.uint8)})) == 2


def test_non_contiguous_tensors_are_sent_in_their_logical_order():
    x = torch.arange(12.0).reshape(3, 4).t()
    torch.testing.assert_close(decode(frames_of({"x": x})).tensors["x"], x)


HEAD = {"v": VERSION, "kind": "data", "req": 0, "mb": 0, "meta": {}}


@pytest.mark.parametrize("frames, message", [
    ([header(b"\xc1", msgpack.packb([0, 0, {}]))], "not valid msgpack"),
    ([header(msgpack.packb({"v": VERSION}), msgpack.packb([0, 0, {}]))],
     "must be \\[version, kind"),
    ([b"\x10\0\0\0" + msgpack.packb([VERSION, "data", []])], "cannot hold its layout"),
    ([b"\x01"], "cannot hold its layout"),
    (header_frames({**HEAD, "v": 1, "tensors": []}), "unknown wire version 1"),
    (header_frames({**HEAD, "kind": "sudo", "tensors": []}), "unknown message kind"),
    (header_frames({**HEAD, "tensors": [["x", "float32", [2]]]}),
     "declares 8 bytes, the header has 0 left"),
    (header_frames({**HEAD, "tensors": [["x", "float32", [2]], ["y", "uint8", [1]]]})
     + [b"x" * 8], "truncated or padded"),
    ([bytes(memoryview(encode("data", tensors={"x": torch.zeros(2)})[0])) + b"abc"],
     "3 bytes follow a message's inline tensors"),
    ([header(msgpack.packb([VERSION, "data", []]), msgpack.packb([0, 0, {}]), b"x")],
     "1 bytes follow the ids"),
    (header_frames({**HEAD, "tensors": [["x", "float32", [4]]]}) + [b"x" * 8],
     "declares 16 bytes"),
    (header_frames({**HEAD, "tensors": [["x", "complex64", [1]]]}) + [b"x" * 8],
     "unknown dtype"),
    (header_frames({**HEAD, "tensors": [], "mb": -1}), "'req' and 'mb' must be ints"),
    (header_frames({"v": VERSION, "kind": "data", "tensors": [], "req": 0, "mb": 0}),
     "ids must be \\[req, mb, meta\\]"),
    ([], "empty message"),
    # 2**31 float32 elements: under the element bound, over the 4 GiB frame bound
    (header_frames({**HEAD, "tensors": [["x", "float32", [1 << 31]]]}) + [b""],
     "declares 8589934592 bytes; at most 4294967296"),
    ([header(msgpack.packb([VERSION, "data", []]), b"\x00" * ((1 << 20) + 1))], "exceeds"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, message):
    with pytest.raises(WireError, match=message):
        decode(frames)


def test_a_known_layout_still_gets_its_ids_meta_and_frames_checked():
    good = frames_of({"x": torch.zeros(2, INLINE_BYTES)})
    decode(good)  # the layout is now known
    layout = bytes(good[0].buffer)[4:4 + int.from_bytes(good[0].buffer[:4], "little")]
    with pytest.raises(WireError) as info:
        decode([header(layout, msgpack.packb([0, -1, {}])), good[1]])
    assert info.value.reason == "id"
    with pytest.raises(WireError) as info:
        decode([header(layout, msgpack.packb([0, 0, {"timings": "soon"}])), good[1]])
    assert info.value.reason == "meta"
    with pytest.raises(WireError) as info:
        decode([good[0], b"\0" * 20])
    assert info.value.reason == "frames"
    with pytest.raises(WireError) as info:
        decode([good[0]])
    assert info.value.reason == "frames"


def test_a_refused_layout_is_refused_every_time():
    bad = header_frames({**HEAD, "tensors": [["x", "float32", [2, -3]]]})
    for _ in range(3):
        with pytest.raises(WireError, match="bad shape"):
            decode(bad)


def test_the_layout_caches_stay_bounded():
    from fastserve.engine import wire
    for n in range(1, 3 * wire._LAYOUT_CACHE):
        decode([bytes(memoryview(f)) for f in encode("data", tensors={"x": torch.zeros(n)})])
    assert 0 < len(wire._received) <= wire._LAYOUT_CACHE
    assert 0 < len(wire._sent) <= wire._LAYOUT_CACHE


def test_the_sender_refuses_what_the_receiver_would():
    with pytest.raises(WireError, match="1 to 256 characters"):
        encode("data", tensors={"x" * 300: torch.zeros(1)})
    with pytest.raises(WireError, match="'req' and 'mb'|request and micro"):
        encode("data", request=-1)
    with pytest.raises(WireError, match="wire does not carry"):
        encode("data", tensors={"x": torch.zeros(1, dtype=torch.complex64)})
    with pytest.raises(WireError, match="unknown message kind"):
        encode("sudo")
    with pytest.raises(WireError, match="meta"):
        encode("control")  # a control message carries a command or an event
