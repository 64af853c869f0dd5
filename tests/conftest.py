"""Shared fixtures: one torch thread in the test process, and no rank process may outlive the
test that started it."""

from __future__ import annotations

import os
import time

import pytest
import torch

torch.set_num_threads(1)


def rank_processes(parent: int | None = None) -> dict[int, str]:
    """pid -> command line of every live FastServe rank process started by ``parent`` (default:
    this test process; its command line names its driver, so other test runs are not ours)."""
    parent = os.getpid() if parent is None else parent
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if ("fastserve.engine.rank" in cmd and state != "Z"
                and f"--parent {parent} " in cmd):
            found[int(entry)] = cmd
    return found


@pytest.fixture(autouse=True)
def no_leaked_ranks():
    before = set(rank_processes())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = {p: c for p, c in rank_processes().items() if p not in before}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in leaked:  # do not let one leak cascade into later tests
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not leaked, f"rank processes outlived the test: {sorted(leaked)}"
