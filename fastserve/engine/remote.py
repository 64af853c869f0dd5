"""Ranks on other hosts, started through each host's agent (:mod:`fastserve.engine.agent`).

A :class:`HostLink` is the coordinator's connection to one agent. A heartbeat thread asks every
agent for its ranks' status twice a second: the agents see that the coordinator lives (and stop
their ranks when it no longer does), and the deployment learns at once when a rank dies or a host
stops answering. A :class:`RemoteRank` looks like a local rank process to the deployment: it
answers ``exit_reason()`` from the last heartbeat, without a network call.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

import zmq

from fastserve.engine.agent import CHUNK, FILE_SUFFIX, AgentClient, HostError
from fastserve.engine.keys import ClusterKeys
from fastserve.engine.rank import RankConfig
from fastserve.errors import EngineError

BEAT_S = 0.5  # how often the coordinator asks each agent for its ranks' status
SILENT_S = 1.5  # a host that has not answered for this long is taken for dead


class HostLink:
    """One agent, shared by the deployment's thread and the heartbeat thread (a lock guards the
    socket)."""

    def __init__(self, ctx: zmq.Context, name: str, address: str, keys: ClusterKeys) -> None:
        self.name, self.address = name, address
        self.client = AgentClient(ctx, name, address, keys, timeout=SILENT_S)
        self._lock = threading.Lock()
        self.status: dict[int, str | None] = {}  # rank -> None while alive, else how it ended
        self.error: str | None = None  # set once the host stops answering
        self.started: list[int] = []

    def request(self, cmd: str, **body) -> dict:
        with self._lock:
            return self.client.request(cmd, **body)[0]

    def start(self, config: RankConfig) -> RemoteRank:
        doc = {k: v for k, v in asdict(config).items() if k not in ("data_in", "workdir")}
        self.request("start", config=doc)
        self.started.append(config.rank)
        self.status[config.rank] = None
        return RemoteRank(config, self)

    def upload(self, path: str) -> str:
        """Put the file at ``path`` in the agent's cache (nothing is sent if it holds a file with
        the same sha256 already); return its path on the host."""
        digest, suffix = sha256_of(path), os.path.splitext(path)[1].lower()
        if not FILE_SUFFIX.match(suffix):  # (readers know .safetensors and take the rest as torch)
            suffix = ""
        there = self.request("have", sha256=digest, suffix=suffix)["path"]
        if there:
            return there
        size = os.path.getsize(path)
        if size == 0:
            raise EngineError(f"'{path}' is empty: there is nothing to send to host "
                              f"'{self.name}'")
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                chunk = f.read(CHUNK)
                with self._lock:
                    reply, _ = self.client.request("put", frame=chunk, timeout=60.0,
                                                   sha256=digest, suffix=suffix, offset=offset,
                                                   size=size)
                offset += len(chunk)
        if not reply.get("path"):
            raise HostError(f"host '{self.name}' did not keep '{path}' after the last chunk",
                            self.name)
        return reply["path"]

    def beat(self) -> None:
        """Refresh the status of this host's ranks; a silent host is marked dead."""
        if self.error is not None:
            return
        try:
            ranks = self.request("status")["ranks"]
        except HostError as e:
            self.error = str(e)
            return
        self.status = {int(k): v for k, v in ranks.items()} if isinstance(ranks, dict) else {}

    def last_words(self, rank: int) -> str | None:
        if self.error is not None:
            return None
        try:
            text = self.request("logs", rank=rank).get("text", "")
        except HostError:
            return None
        lines = str(text).strip().splitlines()
        return lines[-1] if lines else None

    def stop(self) -> None:
        """Stop this deployment's ranks on the host (they were asked over control first)."""
        if self.error is None and self.started:
            try:
                with self._lock:
                    self.client.request("stop", ranks=self.started, timeout=5.0)
            except HostError:
                pass  # gone already: its ranks went with it (their stdin closed)
        self.client.close()


@dataclass
class RemoteRank:
    """A rank started by an agent, as the deployment sees it."""

    config: RankConfig
    link: HostLink

    @property
    def name(self) -> str:
        c = self.config
        return (f"rank {c.rank} (replica {c.replica}, stage {c.stage}, on host "
                f"'{self.link.name}')")

    def exit_reason(self) -> str | None:
        if self.link.error is not None:
            return f"its host stopped answering: {self.link.error}"
        if self.config.rank not in self.link.status:
            return "its host no longer knows it"
        return self.link.status[self.config.rank]

    def alive(self) -> bool:
        return self.exit_reason() is None

    def last_words(self) -> str | None:
        return self.link.last_words(self.config.rank)


class Heartbeat:
    """Beats every link every ``BEAT_S`` seconds until stopped."""

    def __init__(self, links: list[HostLink]) -> None:
        self.links = links
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            for link in self.links:
                link.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=SILENT_S + 1)


_DIGESTS: dict[tuple[str, float, int], str] = {}


def sha256_of(path: str) -> str:
    """The file's sha256, computed once per (path, mtime, size) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime, st.st_size)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (where remote ranks can reach the
    coordinator). A UDP connect sends nothing; it only picks the route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError as e:
            raise HostError(f"no route from this machine to host address {host}: {e}",
                            host) from None


def wait_for(link: HostLink, timeout: float) -> dict:
    """The agent's resources, retrying until ``timeout`` (an agent may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return link.request("resources")
        except HostError:
            if time.monotonic() > deadline:
                raise
