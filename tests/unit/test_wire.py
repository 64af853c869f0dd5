"""The wire format in one process: exact round trips without copies, and clear rejections."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
import zmq

from fastserve.engine.wire import DTYPES, decode, encode
from fastserve.errors import WireError


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


def test_decoded_tensors_live_on_the_received_frames():
    frames = frames_of({"x": torch.arange(12.0).reshape(3, 4)})
    t = decode(frames).tensors["x"]
    frame_address = np.frombuffer(frames[1].buffer, np.uint8).ctypes.data
    assert t.data_ptr() == frame_address  # no copy on receive


def test_non_contiguous_tensors_are_sent_in_their_logical_order():
    x = torch.arange(12.0).reshape(3, 4).t()
    torch.testing.assert_close(decode(frames_of({"x": x})).tensors["x"], x)


@pytest.mark.parametrize("frames, message", [
    ([b"\xc1"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([msgpack.packb({"v": 2, "kind": "data"})], "unknown wire version 2"),
    ([msgpack.packb({"v": 1, "kind": "sudo"})], "unknown message kind"),
    ([msgpack.packb({"v": 1, "kind": "data", "req": 0, "mb": 0, "meta": {},
                     "tensors": [["x", "float32", [2]]]})], "truncated or padded"),
    ([msgpack.packb({"v": 1, "kind": "data", "req": 0, "mb": 0, "meta": {},
                     "tensors": [["x", "float32", [4]]]}), b"x" * 8], "declares 16 bytes"),
    ([msgpack.packb({"v": 1, "kind": "data", "req": 0, "mb": 0, "meta": {},
                     "tensors": [["x", "complex64", [1]]]}), b"x" * 8], "unknown dtype"),
    ([b"\x00" * ((1 << 20) + 1)], "exceeds"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, message):
    with pytest.raises(WireError, match=message):
        decode(frames)
