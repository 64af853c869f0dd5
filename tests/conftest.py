"""Shared fixtures: one torch thread in the test process, and no process a test started may
outlive it: its rank processes, and every process it started at any depth (a driver's ranks,
an agent's ranks), found by a token in their environment that they all inherit."""

from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager

import pytest
import torch

torch.set_num_threads(1)

TOKEN = "FASTSERVE_TEST_PROCESS"  # in the environment of everything a test starts


def _live(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rank_processes(parent: int | None = None) -> dict[int, str]:
    """pid -> command line of every live FastServe rank process started by ``parent`` (default:
    this test process; its command line names its driver, so other test runs are not ours)."""
    parent = os.getpid() if parent is None else parent
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmd = _cmdline(entry)
        if "fastserve.engine.rank" in cmd and f"--parent {parent} " in cmd and _live(entry):
            found[int(entry)] = cmd
    return found


def started_by(token: str) -> dict[int, str]:
    """pid -> command line of every live process (but this one) whose environment carries
    ``token``: whatever a test started, however deep, even after its parent died."""
    needle = f"{TOKEN}={token}\0".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read():
                    continue
        except OSError:
            continue
        if _live(entry):
            found[int(entry)] = _cmdline(entry)
    return found


@contextmanager
def outliving_the_test():
    """Start processes that belong to a module fixture although a test starts them (an agent
    the test killed, restarted for the next tests): they do not carry the test's token."""
    token = os.environ.pop(TOKEN, None)
    try:
        yield
    finally:
        if token is not None:
            os.environ[TOKEN] = token


@pytest.fixture(autouse=True)
def no_leaked_processes():
    token = uuid.uuid4().hex
    os.environ[TOKEN] = token  # inherited by every process the test starts from here on
    before = set(rank_processes())
    try:
        yield
    finally:
        os.environ.pop(TOKEN, None)  # module fixtures set up later are not this test's
    deadline = time.monotonic() + 5
    while True:
        leaked = {p: c for p, c in rank_processes().items() if p not in before}
        leaked.update(started_by(token))
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in leaked:  # do not let one leak cascade into later tests
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not leaked, f"processes outlived the test: {leaked}"
