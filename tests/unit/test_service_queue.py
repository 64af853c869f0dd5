"""The service's queue without any process: admission bound, close, batching by shape in FIFO
order, max_wait and eager, requeue, deadlines, exactly-once answers, drain."""

from __future__ import annotations

import math
import re
import threading
import time

import pytest
import torch

from fastserve.errors import ServiceError
from fastserve.service.queue import KEPT_ANSWERS, Request, RequestQueue, shape_key

BATCHED = {"x"}
LONG_S = 60.0  # a max_wait or deadline no test waits for: a batch returned came for another reason


def req(samples: int = 1, width: int = 4, dtype=torch.float32, deadline_s: float = LONG_S,
        fill: float = 0.0) -> Request:
    inputs = {"x": torch.full((samples, width), fill, dtype=dtype)}
    return Request(inputs, samples, shape_key(inputs, BATCHED), time.monotonic() + deadline_s)


def queue(max_queue: int = 8, max_batch: int = 4, max_wait_s: float = LONG_S,
          mergeable: bool = True, budget_s: float = math.inf) -> RequestQueue:
    return RequestQueue(max_queue, max_batch, max_wait_s, mergeable, budget_s)


def status_of(request: Request) -> int:
    error = request.future.exception(timeout=0)
    assert isinstance(error, ServiceError), error
    return error.status


# --- admission ---------------------------------------------------------------------------------

def test_the_request_past_max_queue_is_refused_503_and_nothing_admitted_is_lost():
    q = queue(max_queue=3)
    admitted = [req(fill=i) for i in range(3)]
    for r in admitted:
        q.put(r)
    late = req(fill=9)
    with pytest.raises(ServiceError) as e:
        q.put(late)
    assert e.value.status == 503 and "max_queue" in str(e.value)
    assert len(q) == 3 and not late.future.done()
    taken = []
    while len(q):
        taken += q.take(0.0, eager=True)
    assert taken == admitted  # every admitted one, in order, none answered on the way
    assert not any(r.future.done() for r in admitted)
    q.put(late)  # room again once taken
    assert len(q) == 1


def test_seconds_per_sample_are_measured_from_answered_batches():
    q = queue()
    assert q.per_sample is None and q.expected_wait() == 0.0
    q.answered(4, time.monotonic() - 1.0)  # 4 samples answered 1 s after they were taken
    assert q.per_sample == pytest.approx(0.25, abs=0.01) and q.per_batch == 0.0
    # taken before the last answer: counted from that answer (replicas side by side drain
    # faster), here about 0 s, which lowers the estimate (from the 5 s, it would rise)
    q.answered(1, time.monotonic() - 5.0)
    assert 0.2 < q.per_sample < 0.25 and q.per_batch == 0.0
    assert q.expected_wait() == 0.0  # nothing queued
    for samples in (2, 3):
        q.put(req(samples))
    assert q.expected_wait() == pytest.approx(5 * q.per_sample)


def test_a_batch_has_a_fixed_cost_and_a_cost_per_sample_and_admission_counts_both():
    q = queue(max_queue=100, max_batch=8, budget_s=2.0)
    for _ in range(10):  # one sample takes 1 s and eight take 1.7 s: the weights, read once
        q._fit(1, 1.0)
        q._fit(8, 1.7)
    assert q.per_batch == pytest.approx(0.9, abs=0.01)
    assert q.per_sample == pytest.approx(0.1, abs=0.01)
    for _ in range(9):  # (at 0.3 s a sample, the 8th would already be refused)
        q.put(req())
    # one batch of 8 and one of 1 ahead: 1.7 + 1.0 s
    with pytest.raises(ServiceError, match="about 2700 ms"):
        q.put(req())
    q.take(0.0, eager=True)
    assert q.expected_wait() == pytest.approx(2.7, abs=0.01)  # held by a replica: still ahead
    # batches of one size say only what that size costs: the line keeps its slope (here, once
    # the other sizes have faded from the measure, the one between them) and follows that size
    for _ in range(80):
        q._fit(8, 2.4)
    slope = 1.4 / 7  # last measured: from 1 sample in 1.0 s to 8 in 2.4 s
    assert q.per_sample == pytest.approx(slope, abs=0.01)
    assert q.per_batch + 8 * q.per_sample == pytest.approx(2.4, abs=0.01)
    # but not for ever: a slope from a few odd batches would admit past the budget as long as
    # the load stays at one size
    for _ in range(KEPT_ANSWERS):
        q._fit(8, 2.4)
    assert q.per_batch == 0.0 and q.per_sample == pytest.approx(0.3, abs=0.001)
    # requests that may not be merged are a batch each
    single = queue(max_batch=8, mergeable=False)
    single.per_sample, single.per_batch = 0.1, 0.9
    for _ in range(3):
        single.put(req(2))
    assert single.expected_wait() == pytest.approx(3 * 0.9 + 6 * 0.1)
    # noise that makes larger batches cheaper: proportional, never a negative cost
    fresh = queue()
    for n, t in ((1, 1.0), (4, 0.5)) * 5:
        fresh._fit(n, t)
    assert fresh.per_batch == 0.0 and fresh.per_sample > 0


def test_the_request_past_the_time_budget_is_refused_503_and_nothing_admitted_is_lost():
    q = queue(max_queue=100, budget_s=1.1)
    q.answered(4, time.monotonic() - 1.0)  # 0.25 s per sample
    admitted = [req(2, fill=i) for i in range(3)]  # expected waits 0, 0.5 and 1.0 s: admitted
    for r in admitted:
        q.put(r)
    late = req(1)
    for ask in (lambda: q.put(late), q.admits):
        with pytest.raises(ServiceError) as e:
            ask()
        assert e.value.status == 503 and "queue_budget_ms" in str(e.value)
        assert re.search(r"about 15\d\d ms, more than the 1100 ms", str(e.value))
        assert e.value.retry_after == pytest.approx(1.5, abs=0.05)
        assert e.value.headers == {"Retry-After": "2"}  # whole seconds, rounded up
    assert len(q) == 3 and not late.future.done()
    taken = q.take(0.0, eager=True)
    assert taken == admitted[:2]  # 4 samples (max_batch)
    with pytest.raises(ServiceError):  # the 4 samples taken are still to be answered
        q.admits()
    for r in taken:
        r.answer({"y": r.inputs["x"]})
    q.admits()  # 0.5 s of work left
    q.put(late)
    assert len(q) == 2


def test_the_work_replicas_hold_counts_until_it_is_answered_failed_or_put_back():
    q = queue(max_batch=8)
    q.answered(1, time.monotonic() - 1.0)  # 1 s per sample
    held = [req(2), req(3), req(1)]
    for r in held:
        q.put(r)
    assert q.expected_wait() == pytest.approx(6.0, abs=0.1)
    assert q.take(0.0, eager=True) == held
    assert q.expected_wait() == pytest.approx(6.0, abs=0.1)  # taken: still ahead of the next
    held[0].answer({"y": held[0].inputs["x"]})
    assert q.expected_wait() == pytest.approx(4.0, abs=0.1)
    held[0].answer({"y": held[0].inputs["x"]})  # a second answer is not delivered nor counted
    held[1].fail(ServiceError("the model failed", 500))
    assert q.expected_wait() == pytest.approx(1.0, abs=0.1)
    q.requeue([held[2]])  # back in the queue: counted once
    assert q.expected_wait() == pytest.approx(1.0, abs=0.1)
    assert q.take(0.0, eager=True) == [held[2]]
    held[2].answer({"y": held[2].inputs["x"]})
    assert q.expected_wait() == 0.0


def test_a_request_is_not_refused_for_its_own_cost_when_nothing_is_ahead():
    q = queue(budget_s=0.001)
    q.answered(1, time.monotonic() - 10.0)
    q.admits()
    q.put(req(4))
    with pytest.raises(ServiceError):
        q.put(req(1))
    (r,) = q.take(0.0, eager=True)
    with pytest.raises(ServiceError):  # running, still ahead
        q.admits()
    r.answer({"y": r.inputs["x"]})
    q.put(req(1))


def test_admits_refuses_like_put_and_admits_nothing():
    q = queue(max_queue=1)
    q.admits()
    assert len(q) == 0
    q.put(req())
    with pytest.raises(ServiceError) as e:
        q.admits()
    assert "max_queue" in str(e.value) and len(q) == 1
    assert e.value.headers == {"Retry-After": "1"}
    assert ServiceError("too late", 504).headers is None
    q.close("stopping: drained")
    with pytest.raises(ServiceError, match="stopping: drained"):
        q.admits()


def test_close_refuses_new_requests_with_the_reason_but_keeps_queued_work():
    q = queue()
    queued = [req(), req()]
    for r in queued:
        q.put(r)
    q.close("the service is stopping")
    with pytest.raises(ServiceError) as e:
        q.put(req())
    assert e.value.status == 503 and "the service is stopping" in str(e.value)
    assert len(q) == 2
    # closed: what is queued is ready at once, without waiting max_wait for a fuller batch
    assert q.take(0.2) == queued
    assert not any(r.future.done() for r in queued)


# --- batching ----------------------------------------------------------------------------------

def test_take_merges_requests_of_one_shape_in_fifo_order_and_leaves_the_others():
    q = queue(max_queue=16, max_batch=4)
    a1, b1, a2, c1, a3, b2 = (req(width=4), req(width=5), req(width=4),
                              req(width=4, dtype=torch.float64), req(width=4), req(width=5))
    for r in (a1, b1, a2, c1, a3, b2):
        q.put(r)
    assert a1.shape != b1.shape and a1.shape != c1.shape and a1.shape == a2.shape
    assert q.take(0.0, eager=True) == [a1, a2, a3]
    assert q.take(0.0, eager=True) == [b1, b2]
    assert q.take(0.0, eager=True) == [c1]
    assert len(q) == 0 and q.take(0.0, eager=True) == []


def test_take_stops_at_max_batch_samples_and_the_rest_forms_the_next_batch():
    q = queue(max_queue=16, max_batch=4)
    rs = [req(samples=s) for s in (2, 1, 2, 1, 3)]
    for r in rs:
        q.put(r)
    assert q.take(0.0, eager=True) == rs[:2]  # 2 + 1 fit; the next 2 would make 5
    assert q.take(0.0, eager=True) == rs[2:4]  # 2 + 1; 3 more would make 6
    assert q.take(0.0, eager=True) == rs[4:]
    assert len(q) == 0


def test_a_full_batch_is_exactly_max_batch_samples():
    q = queue(max_queue=16, max_batch=4)
    rs = [req(samples=1) for _ in range(6)]
    for r in rs:
        q.put(r)
    batch = q.take(0.2)  # full: returned although max_wait is a minute
    assert batch == rs[:4] and sum(r.samples for r in batch) == 4
    assert len(q) == 2


def test_a_request_bigger_than_max_batch_goes_alone():
    q = queue(max_batch=4)
    big, small = req(samples=7), req(samples=1)
    q.put(big)
    q.put(small)
    assert q.take(0.2) == [big]  # full by itself: no waiting, and nothing joins it
    assert q.take(0.0, eager=True) == [small]


def test_a_younger_request_of_another_shape_does_not_join_or_block_the_oldest():
    q = queue(max_batch=2)
    a1, b1, a2 = req(width=4), req(width=8), req(width=4)
    for r in (a1, b1, a2):
        q.put(r)
    assert q.take(0.2) == [a1, a2]  # full with b1 skipped
    assert q.take(0.0, eager=True) == [b1]


def test_unmergeable_requests_go_one_per_batch_at_once():
    q = queue(max_batch=8, mergeable=False)
    rs = [req() for _ in range(3)]
    for r in rs:
        q.put(r)
    for r in rs:
        assert q.take(0.2) == [r]  # each batch is full by itself: no max_wait
    assert len(q) == 0


# --- waiting -----------------------------------------------------------------------------------

def test_take_waits_max_wait_for_a_batch_that_is_not_full():
    q = queue(max_batch=4, max_wait_s=0.1)
    r = req()
    q.put(r)
    batch = q.take(0.2 + 5.0)  # generous: it must come at max_wait, not at the timeout
    done = time.monotonic()
    assert batch == [r]
    assert done - r.accepted >= 0.1  # not before its oldest request waited max_wait
    assert done - r.accepted < 5.0


def test_take_returns_nothing_when_the_timeout_ends_before_max_wait():
    q = queue(max_batch=4, max_wait_s=LONG_S)
    r = req()
    q.put(r)
    assert q.take(0.05) == []
    assert len(q) == 1 and not r.future.done()


def test_eager_take_returns_a_partial_batch_at_once():
    q = queue(max_batch=4, max_wait_s=LONG_S)
    rs = [req(), req()]
    for r in rs:
        q.put(r)
    assert q.take(0.2, eager=True) == rs


def test_take_on_an_empty_queue_waits_for_the_timeout_and_returns_nothing():
    q = queue()
    start = time.monotonic()
    assert q.take(0.05) == [] and q.take(0.05, eager=True) == []
    # the timeout is kept, neither cut short nor overslept (a wide bound: a loaded machine)
    assert 0.1 <= time.monotonic() - start < 0.9


def test_take_wakes_when_another_thread_fills_the_batch():
    q = queue(max_batch=2, max_wait_s=LONG_S)
    first, second = req(), req()
    q.put(first)
    timer = threading.Timer(0.02, q.put, args=(second,))
    timer.start()
    try:
        assert q.take(0.2) == [first, second]  # before the timeout: the batch became full
    finally:
        timer.join()


def test_take_wakes_for_a_request_put_while_it_waits_on_an_empty_queue():
    q = queue(max_batch=1, max_wait_s=LONG_S)
    r = req()
    timer = threading.Timer(0.02, q.put, args=(r,))
    timer.start()
    try:
        assert q.take(0.2) == [r]
    finally:
        timer.join()


# --- requeue -----------------------------------------------------------------------------------

def test_requeue_puts_requests_back_first_in_their_order_even_past_the_bound():
    q = queue(max_queue=2, max_batch=1)
    waiting = [req(fill=1), req(fill=2)]
    for r in waiting:
        q.put(r)
    failed = [req(fill=7), req(fill=8), req(fill=9)]  # a replica held these
    q.requeue(failed)
    assert len(q) == 5  # above max_queue: they were admitted once
    with pytest.raises(ServiceError) as e:
        q.put(req())  # new work is still bounded
    assert e.value.status == 503
    order = [q.take(0.0, eager=True) for _ in range(5)]
    assert order == [[r] for r in failed + waiting]


def test_requeued_requests_merge_again_by_shape():
    q = queue(max_batch=4)
    a, b, c = req(width=4), req(width=6), req(width=4)
    q.put(b)
    q.requeue([a, c])
    assert q.take(0.0, eager=True) == [a, c]
    assert q.take(0.0, eager=True) == [b]


# --- deadlines ---------------------------------------------------------------------------------

def test_an_expired_request_is_answered_504_and_not_returned():
    q = queue(max_batch=4)
    live1, dead, live2 = req(), req(deadline_s=-1.0), req()
    for r in (live1, dead, live2):
        q.put(r)
    assert q.take(0.0, eager=True) == [live1, live2]
    assert status_of(dead) == 504
    assert str(dead.future.exception()) == ("deadline passed before a replica could take the "
                                            "request (limits.deadline_s)")
    assert not live1.future.done() and not live2.future.done()
    assert len(q) == 0


def test_a_withdrawn_request_is_dropped_not_returned_and_frees_its_place():
    q = queue(max_queue=3, max_batch=4)
    first, gone, last = req(), req(), req()
    for r in (first, gone, last):
        q.put(r)
    assert gone.future.cancel()  # its caller went away (Service.withdraw)
    q.expire()
    assert len(q) == 2
    q.put(req())  # its place is free again
    assert q.take(0.0, eager=True)[:2] == [first, last]
    assert gone.future.cancelled()


def test_a_queue_of_only_expired_requests_returns_nothing():
    q = queue()
    dead = [req(deadline_s=-1.0) for _ in range(3)]
    for r in dead:
        q.put(r)
    assert q.take(0.05, eager=True) == []
    assert [status_of(r) for r in dead] == [504] * 3
    assert len(q) == 0


def test_a_request_that_expires_while_queued_is_answered_504_by_the_next_take():
    q = queue(max_batch=4)
    r = req(deadline_s=0.03)
    q.put(r)
    time.sleep(0.06)
    assert q.take(0.0, eager=True) == []
    assert status_of(r) == 504


# --- answers -----------------------------------------------------------------------------------

def test_answer_delivers_exactly_once():
    r = req()
    first = {"y": torch.ones(1, 2)}
    assert r.answer(first) is True
    assert r.answer({"y": torch.zeros(1, 2)}) is False
    assert r.fail(ServiceError("late", 503)) is False
    result = r.future.result(timeout=0)
    assert set(result) == {"y"}
    torch.testing.assert_close(result["y"], torch.ones(1, 2))


def test_fail_delivers_exactly_once():
    r = req()
    error = ServiceError("replica failed", 503)
    assert r.fail(error) is True
    assert r.fail(ServiceError("other", 504)) is False
    assert r.answer({"y": torch.ones(1)}) is False
    assert r.future.exception(timeout=0) is error


def test_answer_on_a_cancelled_request_returns_false():
    r = req()
    assert r.future.cancel()
    assert r.answer({"y": torch.ones(1)}) is False
    assert r.fail(ServiceError("x", 503)) is False


def test_answer_copies_the_mapping_it_is_given():
    r = req()
    outputs = {"y": torch.ones(1)}
    r.answer(outputs)
    outputs["z"] = torch.zeros(1)
    assert set(r.future.result(timeout=0)) == {"y"}


# --- drain -------------------------------------------------------------------------------------

def test_drain_answers_everything_queued_with_the_error():
    q = queue(max_queue=4)
    rs = [req(), req(width=3), req()]
    for r in rs:
        q.put(r)
    already = req()
    already.answer({"y": torch.ones(1)})
    q.requeue([already])  # one that has its answer: drain must not change it
    error = ServiceError("the service stopped before a replica took the request", 503)
    q.drain(error)
    assert len(q) == 0
    assert all(r.future.exception(timeout=0) is error for r in rs)
    torch.testing.assert_close(already.future.result(timeout=0)["y"], torch.ones(1))
    assert q.take(0.0, eager=True) == []


# --- shape keys --------------------------------------------------------------------------------

def test_shape_key_ignores_the_batch_dim_of_batched_inputs_only():
    a = {"x": torch.zeros(2, 4), "m": torch.zeros(3, 4)}
    b = {"x": torch.zeros(5, 4), "m": torch.zeros(3, 4)}
    c = {"x": torch.zeros(5, 4), "m": torch.zeros(2, 4)}
    d = {"x": torch.zeros(5, 4, dtype=torch.float64), "m": torch.zeros(3, 4)}
    assert shape_key(a, {"x"}) == shape_key(b, {"x"})
    assert shape_key(b, {"x"}) != shape_key(c, {"x"})  # m is not batched: all of it counts
    assert shape_key(b, {"x"}) != shape_key(d, {"x"})  # the dtype counts
    assert shape_key(a, {"x"}) != shape_key(b, set())


def test_a_queue_built_with_the_defaults_merges_and_has_no_time_budget():
    q = RequestQueue(max_queue=8, max_batch=4, max_wait_s=LONG_S)
    q.answered(1, time.monotonic() - 100.0)  # 100 s a sample: no budget refuses anything
    pair = [req(), req()]
    for r in pair:
        q.put(r)
    assert q.take(0.0, eager=True) == pair


def test_a_wait_exactly_at_the_budget_is_admitted_and_the_refusal_names_both():
    q = queue(max_batch=8, budget_s=1.0)
    q.per_sample = 0.25  # as measured
    for _ in range(2):
        q.put(req(2))  # 0 s, then 0.5 s ahead
    q.admits()  # 4 samples ahead: exactly 1 s
    q.put(req(1))
    with pytest.raises(ServiceError) as e:
        q.put(req(1))
    assert "about 1250 ms, more than the 1000 ms a request may wait" in str(e.value)
    assert e.value.retry_after == 1.25


def test_requeued_work_that_then_expires_leaves_nothing_counted():
    q = queue(max_batch=8)
    q.per_sample = 1.0
    r = req(3, deadline_s=0.05)
    q.put(r)
    assert q.take(0.0, eager=True) == [r] and r.running
    q.requeue([r])
    assert not r.running and q.expected_wait() == 3.0  # queued again, counted once
    time.sleep(0.06)
    q.expire()
    assert status_of(r) == 504 and not r.running and q.expected_wait() == 0.0


def test_an_answered_request_no_longer_counts_as_running():
    q = queue()
    q.per_sample = 1.0
    r = req(2)
    q.put(r)
    q.take(0.0, eager=True)
    r.answer({"y": r.inputs["x"]})
    assert not r.running and q.expected_wait() == 0.0


def test_a_generation_goes_through_the_queue_uncounted():
    from fastserve.generate import Sampling
    from fastserve.service.generation import Completion

    q = queue()
    q.per_sample = 1.0
    c = Completion([1, 2], 4, Sampling(), (), time.monotonic() + LONG_S, lambda *_: None)
    q.put(c)
    assert q.expected_wait() == 1.0  # queued: it counts as one sample ahead
    assert q.take(0.0, eager=True) == [c]
    assert q.expected_wait() == 0.0  # its length is not known: not counted while it runs
    q.requeue([c])
    assert len(q) == 1 and q.expected_wait() == 1.0
