"""Benchmark worker processes driven over their stdin and stdout, one JSON line each way.

The benches start helper processes that must not share the driver's interpreter (torch's
pipelining with its own process group, plain processes that stand for a machine's ceiling):
each takes one JSON config line, answers when built, then one answer line per command line.
JSON only, never pickle. End of file on a worker's stdin (the driver closing it, or gone) ends
it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

from fastserve.bench import reap
from fastserve.errors import EngineError


class Workers:
    """Worker processes that take one JSON line per command on stdin and answer one JSON line
    each on stdout. ``what`` names one in errors."""

    what = "worker"

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def _start(self, module: str, cfg: dict) -> None:
        # (a terminal's Ctrl-C goes to the driver, which closes their stdin: they exit)
        proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        proc.stdin.write(json.dumps(cfg) + "\n")
        proc.stdin.flush()

    def _answers(self) -> list[dict]:
        answers = []
        for k, p in enumerate(self.procs):
            line = p.stdout.readline()
            if not line:
                raise EngineError(f"{self.what} {k} exited (code {p.poll()})")
            answers.append(json.loads(line))
        return answers

    def _ask(self, cmd: dict) -> list[dict]:
        for p in self.procs:
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        return self._answers()

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in self.procs:
            reap(p, 10)
