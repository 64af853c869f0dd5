"""Polling before sleeping (fastserve.engine.spin): when it polls, for how long, and when a
deployment lets its processes do it."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from fastserve.engine.spin import MAX_SPIN_US, SPIN_US, Waiter, poll_briefly, spin_window
from lms import ROOT


class Clock:
    """A poll function that answers once ``after`` seconds have passed, recording each call's
    timeout."""

    def __init__(self, after: float) -> None:
        self.at = time.perf_counter() + after
        self.calls: list[int] = []

    def __call__(self, timeout_ms: int) -> int:
        self.calls.append(timeout_ms)
        if time.perf_counter() >= self.at:
            return 1
        if timeout_ms:
            time.sleep(max(0.0, min(timeout_ms / 1e3, self.at - time.perf_counter())))
            return int(time.perf_counter() >= self.at)
        return 0


def test_poll_briefly_returns_what_came_or_gives_up_after_its_window():
    assert poll_briefly(Clock(0.0), 0.01) == 1
    clock = Clock(10.0)
    t0 = time.perf_counter()
    assert poll_briefly(clock, 0.002) == 0
    assert 0.002 <= time.perf_counter() - t0 < 0.5
    assert set(clock.calls) == {0} and len(clock.calls) > 1  # it polled, never blocked


def test_a_waiter_polls_only_after_a_wait_that_ended_within_its_window():
    waiter = Waiter(2000)
    first = Clock(0.0)
    assert waiter.wait(first, 100) == 1
    assert first.calls == [100]  # nothing came quickly before: straight to the blocking wait
    assert waiter.short
    soon = Clock(0.001)
    assert waiter.wait(soon, 100) == 1
    assert soon.calls[0] == 0 and 100 not in soon.calls  # polled, and it came while polling
    late = Clock(0.05)
    assert waiter.wait(late, 100) == 1
    assert late.calls[-1] == 100 and not waiter.short  # polled in vain, then slept
    again = Clock(0.0005)
    waiter.wait(again, 100)
    assert again.calls[0] == 100  # the last wait was long: no polling this time


def test_a_waiter_that_times_out_stops_polling_and_zero_never_polls():
    waiter = Waiter(1000)
    waiter.short = True
    assert waiter.wait(Clock(10.0), 5) == 0
    assert not waiter.short
    idle = Waiter(0)
    idle.short = True
    clock = Clock(0.0)
    idle.wait(clock, 100)
    assert clock.calls == [100]


def test_a_waiter_on_a_real_socket_takes_a_message_sent_while_it_polls():
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://spin")
        push.connect("inproc://spin")
        waiter = Waiter(MAX_SPIN_US)  # a long window: a stalled machine cannot end it early
        waiter.short = True
        assert not waiter.wait(pull.poll, 1)
        assert not waiter.short
        waiter.short = True
        polls: list[int] = []

        def poll(timeout_ms: int) -> int:
            polls.append(timeout_ms)
            if len(polls) == 3:  # sent while the waiter polls
                push.send(b"x")
            return pull.poll(timeout_ms)

        assert waiter.wait(poll, 1000) and pull.recv() == b"x"
        assert 1000 not in polls and waiter.short  # taken by polling, never by sleeping
    finally:
        pull.close(linger=0)
        push.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(("threads", "cores", "window"), [
    ([1, 1], 2, SPIN_US), ([1, 1, 1], 2, 0), ([2], 2, SPIN_US), ([1, 2], 2, 0), ([1], 1, SPIN_US)])
def test_processes_poll_only_with_a_core_for_every_busy_thread(threads, cores, window):
    assert spin_window(threads, cores) == window
    assert spin_window(threads, cores, 50) == (50 if window else 0)


def _deployment(stages: int, **options):
    from fastserve.engine.deployment import Deployment, Layout

    return Deployment.from_spec(str(ROOT / "graphs/mlp.yaml"), Layout(1, stages, None, 1),
                                batch=1, **options)


def test_a_deployment_polls_where_its_rank_threads_each_have_a_core():
    cores = len(os.sched_getaffinity(0))
    for stages in (1, 2):
        dep = _deployment(stages)
        try:  # ranks of 1 thread each; this process is not counted
            expected = SPIN_US if stages <= cores else 0
            assert dep.spin_us == expected
            assert set(dep._spin.values()) == {expected}
        finally:
            dep.stop()
    dep = _deployment(2, spin_us=250)
    try:
        assert dep.spin_us == 250 and set(dep._spin.values()) == {250}
    finally:
        dep.stop()


@pytest.mark.parametrize("spin_us", [-1, MAX_SPIN_US + 1, 1.5, "10", True])
def test_a_deployment_refuses_a_polling_window_out_of_bounds(spin_us):
    from fastserve.errors import EngineError

    with pytest.raises(EngineError, match="spin_us must be an int"):
        _deployment(1, spin_us=spin_us)
