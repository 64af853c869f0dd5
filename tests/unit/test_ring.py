"""The shared-memory result ring in one process: exact round trips through the wire, space
handed out in order and never over bytes not yet released, and every field of a message that
points into a ring checked before a tensor is built on it."""

from __future__ import annotations

import os

import pytest
import torch

from fastserve.engine.ring import ALIGN, HEADER, Ring
from fastserve.engine.wire import DTYPES, decode, encode
from fastserve.errors import EngineError, WireError


@pytest.fixture
def ring():
    r = Ring.create(4096)
    yield r
    r.close()


def send(ring: Ring, tensors: dict, rank: int = 3, **meta):
    """What a rank sends: the header only, the tensors in the ring (None: they did not fit)."""
    placed = ring.put(tensors)
    if placed is None:
        return None
    return encode("data", request=1, micro=2, tensors=tensors,
                  meta={**meta, "shm": [rank, *placed]})[:1]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_every_dtype_round_trips_through_the_ring(ring, dtype):
    x = (torch.randn(3, 5) * 100).to(dtype)
    tensors = {"x": x, "empty": torch.empty(0, 7, dtype=dtype), "scalar": x[0, 0].clone()}
    frames = send(ring, tensors)
    assert len(frames) == 1  # the header alone crosses the socket
    msg = decode(frames, {3: ring.data})
    assert torch.equal(msg.tensors["x"], x) and msg.tensors["x"].dtype == dtype
    assert msg.tensors["empty"].shape == (0, 7) and msg.tensors["scalar"].shape == ()
    assert torch.equal(msg.tensors["scalar"], x[0, 0])
    assert all(at % ALIGN == 0 for at in msg.meta["shm"][2:])


def test_space_is_handed_out_in_order_wraps_and_never_overwrites_unreleased_bytes(ring):
    block = 1000  # 1,024 bytes once aligned: four fit in the ring
    ends, held = [], []
    for i in range(4):
        frames = send(ring, {"x": torch.full((block,), i, dtype=torch.uint8)})
        msg = decode(frames, {3: ring.data})
        ring.take(msg.meta["shm"][1])
        ends.append(msg.meta["shm"][1])
        held.append(msg.tensors["x"])
    assert ends == [1024, 2048, 3072, 4096]
    # full: nothing fits until the reader releases, and what it holds is left alone
    assert ring.put({"x": torch.full((block,), 9, dtype=torch.uint8)}) is None
    assert [int(t[0]) for t in held] == [0, 1, 2, 3] and all(bool((t == t[0]).all())
                                                                for t in held)
    ring.release(ends[0])
    frames = send(ring, {"x": torch.full((block,), 7, dtype=torch.uint8)})
    assert frames is not None
    msg = decode(frames, {3: ring.data})
    assert msg.meta["shm"][2] == 0  # it wrapped to the start, over the released bytes only
    assert [int(t[0]) for t in held[1:]] == [1, 2, 3]
    ring.take(msg.meta["shm"][1])
    # a message that does not fit before the end skips to the start, once that is free
    ring.release(ends[3])
    big = {"x": torch.zeros(3500, dtype=torch.uint8)}
    assert ring.put(big) is None  # the "7" block at the start is still held
    ring.release(msg.meta["shm"][1])
    frames = send(ring, big)
    msg = decode(frames, {3: ring.data})
    assert msg.meta["shm"][2] == 0
    ring.take(msg.meta["shm"][1])  # the reader accepts where the writer put it


def test_what_does_not_fit_goes_inline(ring):
    assert ring.put({"x": torch.zeros(4097, dtype=torch.uint8)}) is None
    assert ring.put({"x": torch.zeros(0)}) is None  # nothing to place


def test_results_under_the_smallest_size_go_inline(ring):
    x = {"x": torch.zeros(1000, dtype=torch.uint8)}  # 1,024 bytes once aligned
    assert ring.put(x, min_bytes=1025) is None
    assert ring.put(x, min_bytes=1024) == [1024, 0]


def test_the_reader_trusts_its_own_count_of_what_it_released(ring):
    ring.take(1024)
    ring.release(1024)
    ring._released[0] = 1 << 50  # the shared counter, as a rank could write it
    with pytest.raises(WireError):
        ring.take(1 << 49)  # still outside the window the reader itself opened
    ring.take(2048)


def test_an_end_outside_the_readers_window_is_refused(ring):
    ring.take(1024)
    for end in (1024, 512, 2 * 4096 + 1, -5):
        with pytest.raises(WireError) as e:
            ring.take(end)
        assert e.value.reason == "shm"
    ring.take(2 * 4096)  # a skip and a whole ring past what was released: still possible


def header_with(shm, tensors=None, frames_too=False):
    tensors = tensors or {"x": torch.zeros(16)}
    frames = encode("data", tensors=tensors, meta={"shm": shm})
    return frames if frames_too else frames[:1]


@pytest.mark.parametrize("shm, why", [
    ([3, 64, 4096 - 32], "runs past the end"),
    ([3, 64, 4096], "starts at the end"),
    ([3, 64, 32], "misaligned"),
    ([3, 64, -64], "negative"),
    ([3, 64], "no offset"),
    ([3, 64, 0, 64], "one offset too many"),
    ([4, 64, 0], "another ring"),
    ([], "no ring id"),
])
def test_every_field_of_a_ring_message_is_checked(ring, shm, why):
    with pytest.raises(WireError) as e:
        decode(header_with(shm), {3: ring.data})
    assert e.value.reason in ("shm", "meta"), why


def test_a_ring_message_is_refused_where_there_is_no_ring_or_with_frames(ring):
    with pytest.raises(WireError, match="does not have") as e:
        decode(header_with([3, 64, 0]))
    assert e.value.reason == "shm"
    with pytest.raises(WireError, match="frames") as e:
        decode(header_with([3, 64, 0], frames_too=True), {3: ring.data})
    assert e.value.reason == "shm"
    # only data carries it: an error or control message naming a ring is malformed
    for kind, meta in (("error", {"error": {"message": "x"}}), ("control", {"cmd": "health"})):
        with pytest.raises(WireError) as e:
            encode(kind, meta={**meta, "shm": [3, 64, 0]})
        assert e.value.reason == "meta"


def test_open_accepts_only_a_ring_of_the_size_it_was_told(ring):
    fd = os.dup(ring.fd)
    try:
        with pytest.raises(EngineError, match="not a sealed ring of 8192 bytes"):
            Ring.open(fd, 8192)
        with pytest.raises(OSError):  # sealed: the rank cannot shrink it under the reader
            os.ftruncate(fd, 0)
        other = Ring.open(fd, 4096)  # the same memory, as a rank maps it
        frames = send(other, {"x": torch.arange(10.0)})
        assert torch.equal(decode(frames, {3: ring.data}).tensors["x"], torch.arange(10.0))
        other.close_fd()
        fd = -1
        other.close()
    finally:
        if fd >= 0:
            os.close(fd)
    r, w = os.pipe()
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, HEADER + 4096)
    try:
        for bad in (r, unsealed):
            with pytest.raises(EngineError, match="not a sealed ring"):
                Ring.open(bad, 4096)
    finally:
        for f in (r, w, unsealed):
            os.close(f)
    for size in (0, 100, -64):
        with pytest.raises(EngineError, match="multiples of"):
            Ring.create(size)
    assert HEADER % 4096 == 0
