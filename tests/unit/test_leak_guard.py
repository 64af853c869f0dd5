"""The leak guard of tests/conftest.py sees what a test started at any depth."""

from __future__ import annotations

import os
import subprocess
import time

from conftest import TOKEN, started_by


def test_the_guard_sees_a_grandchild_whose_parent_is_gone():
    token = os.environ[TOKEN]
    # a shell that starts a sleeper in the background and exits: the sleeper is reparented to
    # init, so walking this process's children would not find it
    subprocess.run(["sh", "-c", "sleep 37 >/dev/null 2>&1 &"], check=True)
    deadline = time.monotonic() + 5
    found: dict[int, str] = {}
    while not found and time.monotonic() < deadline:
        found = {p: c for p, c in started_by(token).items() if c.startswith("sleep 37")}
    for pid in found:
        os.kill(pid, 9)
    assert found, "the guard did not see the orphaned grandchild"
    assert os.getppid() not in found and os.getpid() not in found


def test_the_guard_does_not_see_other_tests_processes():
    proc = subprocess.Popen(["sleep", "38"], env={**os.environ, TOKEN: "another-test"})
    try:
        assert proc.pid not in started_by(os.environ[TOKEN])
        assert proc.pid in started_by("another-test")
    finally:
        proc.kill()
        proc.wait()
