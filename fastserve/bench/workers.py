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
import tempfile

from fastserve.bench import reap
from fastserve.errors import EngineError


class Workers:
    """Worker processes that take one JSON line per command on stdin and answer one JSON line
    each on stdout. ``what`` names one in errors."""

    what = "worker"

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._stderr: list = []  # each worker's stderr, a file: quoted when it fails

    def _start(self, module: str, cfg: dict) -> None:
        # (a terminal's Ctrl-C goes to the driver, which closes their stdin: they exit)
        err = tempfile.TemporaryFile()
        self._stderr.append(err)
        proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)
        self.procs.append(proc)
        self._send(len(self.procs) - 1, cfg)

    def _failed(self, k: int, what: str) -> EngineError:
        """The error for worker ``k``: ``what`` happened, its exit code, its last stderr line."""
        p = self.procs[k]
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(2)
        err = self._stderr[k]
        err.seek(0)
        lines = err.read().decode("utf-8", "replace").strip().splitlines()
        last = f": {lines[-1][:500]}" if lines else ""
        return EngineError(f"{self.what} {k} {what} (exit code {p.poll()}){last}")

    def _send(self, k: int, cmd: dict) -> None:
        try:
            self.procs[k].stdin.write(json.dumps(cmd) + "\n")
            self.procs[k].stdin.flush()
        except OSError:  # its end of the pipe is gone: it exited
            raise self._failed(k, "exited") from None

    def _answers(self) -> list[dict]:
        answers = []
        for k, p in enumerate(self.procs):
            line = p.stdout.readline()
            if not line:
                raise self._failed(k, "exited")
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                raise self._failed(k, f"answered {line[:80]!r}, not JSON") from None
            if not isinstance(answer, dict):
                raise self._failed(k, f"answered {line[:80]!r}, not a JSON object")
            answers.append(answer)
        return answers

    def _ask(self, cmd: dict) -> list[dict]:
        for k in range(len(self.procs)):
            self._send(k, cmd)
        return self._answers()

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in self.procs:
            reap(p, 10)
        for f in self._stderr:
            f.close()
