"""Benchmark workers that fail are named with their exit code and last stderr line, and none
outlives its driver."""

from __future__ import annotations

import pytest

from fastserve.bench.workers import Workers
from fastserve.errors import EngineError


def test_a_worker_that_dies_at_start_is_named_with_its_error_and_reaped():
    workers = Workers()
    try:
        workers._start("fastserve.bench.plain", {"not": "a config"})
        with pytest.raises(EngineError) as e:
            workers._answers()
        assert "worker 0 exited (exit code 1): KeyError" in str(e.value)
        with pytest.raises(EngineError, match="worker 0 exited"):  # its stdin is gone too
            workers._ask({"repeats": 1, "at": 0})
    finally:
        workers.close()
    assert all(p.poll() is not None for p in workers.procs)


def test_a_worker_that_cannot_start_is_named():
    workers = Workers()
    try:
        workers._start("this_module_does_not_exist", {})
        with pytest.raises(EngineError, match="No module named"):
            workers._answers()
    finally:
        workers.close()
