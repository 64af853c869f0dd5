"""Every command the README shows runs as written, in a scratch directory that sees the repo's
graphs/ and runtime/. A command that reads what an earlier one writes runs after it (the tour
exports out/gpt2, then runs it); the others run two at a time. The set-up lines run their
FastServe part with this venv (the install itself is what CI does). Benchmarks take minutes
each, and the hosts section starts three agents: they run with -m slow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETUP = "python3 -m venv .venv && "


def bash_blocks() -> list[tuple[int, list[str]]]:
    """(first line number, command lines) of each ```bash block of the README."""
    blocks, current, start = [], None, 0
    for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            if current is None and line.strip() == "```bash":
                current, start = [], n + 1
            elif current is not None:
                blocks.append((start, current))
                current = None
        elif current is not None and line.strip() and not line.lstrip().startswith("#"):
            current.append(line)
    return blocks


def as_run_here(line: str) -> str | None:
    """The command to run for a README line: set-up lines keep only their FastServe part
    (None for the test command: CI runs it), with this venv's programs."""
    if line.startswith(SETUP):
        last = line.split(" && ")[-1]
        if "pytest" in last:
            return None
        return last.replace(".venv/bin/", f"{BIN}/")
    return line


def _cases():
    cases = []
    for start, lines in bash_blocks():
        quick = [ln for ln in lines if not ln.startswith("fastserve bench")]
        bench = [ln for ln in lines if ln.startswith("fastserve bench")]
        if quick and any(ln.startswith("fastserve agent") for ln in quick):
            # the hosts section (28 s): its commands are test_hosts' CLI test on the same cluster
            cases.append(pytest.param(quick, id=f"line{start}", marks=pytest.mark.slow))
        elif quick:
            cases.append(pytest.param(quick, id=f"line{start}"))
        if bench:
            cases.append(pytest.param(bench, id=f"line{start}-bench", marks=pytest.mark.slow))
    return cases


def test_the_readme_shows_commands_in_each_part():
    blocks = bash_blocks()
    commands = [ln for _, lines in blocks for ln in lines]
    tour = max((lines for _, lines in blocks), key=len)
    # what the tour writes is read after it is written
    assert any("out/gpt2 --check" in c for lane in lanes(tour) for c in lane[1:])
    assert any("--plan plan.json" in c for lane in lanes(tour) for c in lane[1:])
    assert sum(ln.startswith("fastserve") for ln in commands) >= 20
    assert any(ln.startswith("fastserve agent") for ln in commands)  # the hosts section
    assert sum(as_run_here(ln) is None for ln in commands) == 1  # only the test command


@pytest.mark.parametrize("lines", _cases())
def test_readme_commands_run_as_written(lines, tmp_path):
    for d in ("graphs", "runtime"):
        (tmp_path / d).symlink_to(ROOT / d)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    commands = [c for c in map(as_run_here, lines) if c is not None]
    if any(re.search(r"&\s*(#.*)?$", c) for c in commands):
        # background jobs (agents): one script that stops them whatever happens
        script = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + "\n".join(commands)
        commands = [script]

    def run_lane(lane: list[str]) -> None:
        for command in lane:
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (f"README command failed ({done.returncode}):\n"
                                          f"{command}\n{done.stderr[-3000:]}")
            assert "Traceback" not in done.stderr, done.stderr[-3000:]

    # two at a time (2 cores), a command after the one that writes what it reads
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(run_lane, lane) for lane in lanes(commands)]:
            f.result()


WRITES = re.compile(r"(?:--export|--out|--picture|>)\s+(\S+)")


def lanes(commands: list[str]) -> list[list[str]]:
    """Commands grouped so that one that reads a path an earlier one writes (out/gpt2,
    plan.json) runs after it, in its lane; the others start lanes of their own."""
    result: list[list[str]] = []
    writer: dict[str, int] = {}
    for c in commands:
        words = c.split("#")[0].split()
        lane = next((writer[w] for w in words if w in writer), None)
        if lane is None:
            result.append([])
            lane = len(result) - 1
        result[lane].append(c)
        for path in WRITES.findall(c.split("#")[0]):
            writer[path] = lane
    return result
