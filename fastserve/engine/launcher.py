"""The local launcher: rank processes as subprocesses of this machine.

Addresses are chosen here, before any rank starts, so every rank knows where to connect:
``ipc`` sockets in a private temporary directory (the default), or ``tcp`` on loopback ports
the kernel hands out. A per-host agent (:mod:`fastserve.engine.remote`) starts the same rank
program with the same :class:`~fastserve.engine.rank.RankConfig` on another host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from fastserve.engine.rank import RankConfig
from fastserve.errors import EngineError

MAX_WORDS = 1024  # characters of a dead rank's last line in its exit reason


class Addresses:
    """Hands out socket addresses for one deployment and cleans them up."""

    def __init__(self, transport: str = "ipc", host: str = "127.0.0.1") -> None:
        """``host``: the address tcp sockets bind on (one remote ranks can reach, when a
        deployment spans hosts)."""
        if transport not in ("ipc", "tcp"):
            raise EngineError(f"unknown transport '{transport}'; expected ipc or tcp")
        self.transport = transport
        self.host = host
        # ipc socket files and rank logs live here; removed on close. mkdtemp makes it 0700:
        # only this user can reach the ipc sockets in it
        self.dir = tempfile.mkdtemp(prefix="fastserve-")

    def new(self, name: str) -> str:
        """Where to bind ``name``: a path in the private directory, or on tcp a port the kernel
        picks at bind time (read back with ZMQ_LAST_ENDPOINT), never one chosen earlier and
        left free for another process to take."""
        if self.transport == "ipc":
            return f"ipc://{self.dir}/{name}"
        return f"tcp://{self.host}:*"

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class RankProcess:
    """A started rank: its config and process handle."""

    config: RankConfig
    process: subprocess.Popen
    log: str  # the rank's stderr

    @property
    def name(self) -> str:
        c = self.config
        return f"rank {c.rank} (replica {c.replica}, stage {c.stage}, pid {self.process.pid})"

    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_reason(self) -> str | None:
        """None while running; otherwise how it ended, with the end of its stderr."""
        code = self.process.poll()
        if code is None:
            return None
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        words = self.last_words()
        return how + (f": {words}" if words else "")

    def last_words(self) -> str | None:
        """The last line of the rank's log (its last error), if it wrote any, cut to
        :data:`MAX_WORDS` characters (a reason travels in messages with bounded text)."""
        lines = log_tail(self.log, 4096).strip().splitlines()
        if not lines:
            return None
        return lines[-1] if len(lines[-1]) <= MAX_WORDS else lines[-1][:MAX_WORDS - 3] + "..."


def _signal_name(number: int) -> str:
    """SIGKILL, or "signal 40" for one Python has no name for (the real-time ones)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def log_tail(path: str, limit: int) -> str:
    """The last ``limit`` bytes of a log (a log can be long), or "" if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def launch_local(config: RankConfig, log_dir: str) -> RankProcess:
    """Start one rank as a subprocess of this process; its stderr goes to a file in log_dir
    (a pipe nobody reads could fill and block the rank). A config's ``ring_fd`` is inherited
    by the rank, as the same number."""
    env = dict(os.environ)
    # one thread pool size for every runtime in the rank; torch reads the config's `threads`
    env.update(OMP_NUM_THREADS=str(config.threads), MKL_NUM_THREADS=str(config.threads))
    log = os.path.join(log_dir, f"rank{config.rank}.log")
    with open(log, "wb") as err:
        # the config (with the rank's secret key) goes on stdin, and stdin stays open: its end
        # of file tells the rank that this process is gone (see rank.watch_parent)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastserve.engine.rank", "--parent", str(os.getpid()),
             "--rank", str(config.rank)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=env,
            pass_fds=() if config.ring_fd is None else (config.ring_fd,),
            # a terminal's Ctrl-C goes to the driver alone, which stops the ranks in order
            start_new_session=True)
    try:
        proc.stdin.write(config.to_json().encode() + b"\n")
        proc.stdin.flush()
    except OSError:  # it died at once; exit_reason() will tell why
        pass
    return RankProcess(config, proc, log)


def stop_processes(ranks: list[RankProcess], grace_s: float = 3.0) -> None:
    """Wait for ranks to exit, then kill whatever is left; reap all."""
    for r in ranks:
        try:
            r.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            r.process.kill()
            r.process.wait(timeout=5)
        if r.process.stdin is not None:
            try:
                r.process.stdin.close()
            except OSError:
                pass
