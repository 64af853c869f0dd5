"""The per-host agent: a small daemon that starts FastServe rank processes for a coordinator.

``fastserve agent --listen HOST:PORT --keys DIR`` binds that one address (a CURVE server: only
coordinators whose public key is in DIR get through the handshake; see
:mod:`fastserve.engine.keys`) and answers requests, one JSON document per message:

==========  =====================================================================================
resources   this host: name, cores, memory, and FLOP/s per core measured when the agent started
echo        the request's binary frame, back (to measure a link's latency and bandwidth)
start       start one rank program from a rank config (the only program an agent runs)
status      each of its ranks: alive, or how it ended; every request is also a heartbeat
stop        stop some ranks, or all
logs        the end of a rank's log
have        whether a file (by sha256) is in the agent's cache, and where
put         a file for the cache, in chunks, kept only if its sha256 matches
==========  =====================================================================================

Every field of every request is checked before use; a malformed request gets an error reply and
the agent keeps serving. A rank's data socket binds on the agent's own address (a port the kernel
picks). Ranks are children of the agent and exit when it does (their stdin closes). Each rank
belongs to the coordinator that started it (known by its connection's routing id): only that
one sees, stops or reads it, and when it has not spoken for ``coordinator_timeout`` seconds
the agent stops its ranks, so a vanished coordinator leaves nothing running however many
others are talking to the agent. :class:`AgentClient` is the coordinator's side.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import zmq

from fastserve.engine.keys import ClusterKeys
from fastserve.engine.launcher import RankProcess, launch_local, log_tail, stop_processes
from fastserve.engine.rank import RankConfig
from fastserve.engine.security import Guard
from fastserve.engine.spin import MAX_SPIN_US, spin_window
from fastserve.engine.wire import MAX_PEERS
from fastserve.errors import EngineError
from fastserve.resources.inventory import machine_cores, machine_memory
from fastserve.units import host_port

DEFAULT_PORT = 7301
MAX_REQUEST = 1 << 20  # a JSON request
MAX_FRAME = 64 << 20  # an echo frame
MAX_RANKS = 1024
LOG_TAIL = 64 << 10
_KEY = re.compile(r"^[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}\Z")  # Z85, 32 bytes
_TCP = re.compile(r"^tcp://[0-9A-Za-z.\-\[\]:]{1,255}:[0-9]{1,5}\Z")
COMMANDS = ("resources", "echo", "start", "status", "stop", "logs", "have", "put")
MAX_FILE = 1 << 40  # a file put in the cache
CHUNK = 16 << 20  # bytes per 'put' message
MAX_UPLOADS = 8  # files arriving at once
UPLOAD_IDLE_S = 600.0  # an upload without a chunk for this long is dropped when another starts
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
FILE_SUFFIX = re.compile(r"^(\.[a-z0-9]{1,16})?\Z")


class HostError(EngineError):
    """A host (its agent) that cannot be reached, refuses, or reports a failure."""

    exit_code = 9

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: the kernel picks one) -> (host, port); ValueError if malformed."""
    try:
        host, port = host_port(text)
    except ValueError:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.2:{DEFAULT_PORT}), got "
                         f"{text!r}") from None
    if host.strip("[]") in ("*", "0.0.0.0", "::"):
        raise ValueError("an agent binds one address, not every interface: give the host's "
                         "address on the cluster network")
    return host, port


# --- the daemon -------------------------------------------------------------------------------


@dataclass
class _Upload:
    """A file arriving in chunks: its size, what has arrived and its running hash."""

    size: int
    received: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    touched: float = field(default_factory=time.monotonic)


class Agent:
    """One agent: a bound, authenticated ROUTER and the ranks it started."""

    def __init__(self, listen: str, keys: ClusterKeys, *, coordinator_timeout: float = 10.0,
                 cache: str | None = None,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> None:
        self.host, port = parse_listen(listen)
        # files from coordinators, by sha256: kept across runs, so a second run sends nothing
        self.cache = Path(cache) if cache else \
            Path.home() / ".cache" / "fastserve" / f"agent-{self.host}-{port}"
        self.cache.mkdir(parents=True, exist_ok=True)
        for stale in self.cache.glob("*.part"):  # uploads an earlier agent left half done
            stale.unlink(missing_ok=True)
        self._uploads: dict[Path, _Upload] = {}
        os.chmod(self.cache, 0o700)
        self.keys = keys
        self.coordinator_timeout = coordinator_timeout
        self.log = log
        self.ctx = zmq.Context()
        self.guard = Guard(self.ctx, keys.own)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME + MAX_REQUEST)
        # a coordinator that reconnects (a link back after a cut) keeps its routing id, and so
        # its ranks: the new connection takes the id over from the dead one
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.guard.serve(self.sock, "agent", keys.peers)
        try:
            self.sock.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as e:
            self.guard.close()
            self.sock.close(linger=0)
            self.ctx.term()
            raise EngineError(f"the agent cannot listen on {self.host}:{port}: {e} (is another "
                              f"agent there, or is the address not this host's?)") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workdir = tempfile.mkdtemp(prefix="fastserve-agent-")
        self.ranks: dict[int, RankProcess] = {}
        # each coordinator (its connection's routing id, which it keeps across reconnects)
        # owns the ranks it started: it alone stops them or reads them, and they stop when it
        # has been silent for the timeout, whoever else is talking to this agent
        self.owner: dict[int, bytes] = {}
        self.last_seen: dict[bytes, float] = {}
        self.malformed = 0
        self.flops = _measure_flops()

    def serve(self, should_stop=lambda: False) -> None:
        """Answer requests until ``should_stop()``; stop every rank on the way out."""
        self.log(f"agent listening on {self.endpoint} ({machine_cores()} cores, "
                 f"{self.flops / 1e9:.1f} GFLOP/s per core)")
        try:
            while not should_stop():
                if self.sock.poll(200):
                    self._answer(self.sock.recv_multipart(copy=False))
                self.guard.count()
                self._stop_orphans()
        finally:
            self._stop(list(self.ranks))
            self.guard.close()
            self.sock.close(linger=0)
            self.ctx.term()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _answer(self, frames: list) -> None:
        identity, *rest = frames
        if not rest or len(rest) > 2 or len(rest[0]) > MAX_REQUEST:
            self.malformed += 1
            return self._reply(identity, {"id": None, "ok": False,
                                          "error": "expected one JSON request and at most one "
                                                   "binary frame"})
        try:
            req = json.loads(rest[0].bytes)
        except (ValueError, UnicodeDecodeError, RecursionError):  # (nesting past the limit)
            req = None
        rid = req.get("id") if isinstance(req, dict) else None
        try:
            if not isinstance(req, dict) or type(rid) is not int or \
                    req.get("cmd") not in COMMANDS:
                raise ValueError(f"expected {{id: int, cmd: one of {', '.join(COMMANDS)}, "
                                 f"...}}")
            self.last_seen[identity.bytes] = time.monotonic()
            out, frame = self._handle(req, rest[1] if len(rest) == 2 else None, identity.bytes)
            self._reply(identity, {"id": rid, "ok": True, **out}, frame)
        except (ValueError, TypeError, OSError) as e:
            self.malformed += 1
            self._reply(identity, {"id": rid, "ok": False, "error": str(e)[:2000]})

    def _reply(self, identity, doc: dict, frame=None) -> None:
        parts = [identity, json.dumps(doc).encode()] + ([frame] if frame is not None else [])
        try:
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the coordinator is not reading: it will time out and ask again
            pass

    def _stop_orphans(self) -> None:
        """Stop the ranks of every coordinator silent for longer than the timeout."""
        now = time.monotonic()
        for who, seen in list(self.last_seen.items()):
            if now - seen <= self.coordinator_timeout:
                continue
            del self.last_seen[who]
            orphans = [n for n, o in self.owner.items() if o == who]
            if orphans:
                self.log(f"a coordinator silent for {self.coordinator_timeout:.0f} s: stopping "
                         f"its {len(orphans)} rank(s)")
                self._stop(orphans)

    def _handle(self, req: dict, frame, who: bytes) -> tuple[dict, Any]:
        cmd = req["cmd"]
        _only(req, {"id", "cmd"} | _FIELDS[cmd])
        if cmd == "resources":
            return {"host": socket.gethostname(), "cores": machine_cores(),
                    "memory_bytes": machine_memory(),
                    "flops": self.flops, "refused": self.guard.count(),
                    "malformed": self.malformed}, None
        if cmd == "echo":
            return {}, frame
        if cmd == "start":
            cfg = self._config(req.get("config"))
            if cfg.rank in self.ranks and self.ranks[cfg.rank].process.poll() is None:
                whose = "" if self.owner.get(cfg.rank) == who else " for another coordinator"
                raise ValueError(f"rank {cfg.rank} is already running here{whose}")
            # (a rank of that number that has ended is replaced, whoever started it: its
            # coordinator then hears that this host no longer knows it, which is so)
            if len(self.ranks) >= MAX_RANKS and cfg.rank not in self.ranks:
                raise ValueError(f"this agent runs at most {MAX_RANKS} ranks")
            busy = [r.config.threads for r in self.ranks.values() if r.process.poll() is None]
            if spin_window([*busy, cfg.threads], machine_cores()) == 0:
                # this host's ranks (of every coordinator) would outnumber its cores
                cfg = replace(cfg, spin_us=0)
            self.ranks[cfg.rank] = launch_local(cfg, self.workdir)
            self.owner[cfg.rank] = who
            self.log(f"started rank {cfg.rank} (pid {self.ranks[cfg.rank].process.pid})")
            return {"pid": self.ranks[cfg.rank].process.pid}, None
        mine = [n for n, o in self.owner.items() if o == who]
        if cmd == "status":
            return {"ranks": {str(n): self.ranks[n].exit_reason() for n in mine}}, None
        if cmd == "stop":
            which = req.get("ranks")
            if which is not None and (not isinstance(which, list) or
                                      not all(type(n) is int for n in which)):
                raise ValueError("'ranks' must be a list of rank numbers, or null for all")
            self._stop(mine if which is None else [n for n in which if n in mine])
            return {}, None
        if cmd in ("have", "put"):
            return self._file(req, frame), None
        rank = req.get("rank")  # logs
        if type(rank) is not int or rank not in mine:
            raise ValueError(f"no rank {rank!r} of yours here")
        return {"text": log_tail(self.ranks[rank].log, LOG_TAIL)}, None

    def _file(self, req: dict, frame) -> dict:
        """``have``: the cached file's path, or None. ``put``: append one chunk (in order); the
        last one is checked against the sha256 before the file is kept."""
        digest, suffix = req.get("sha256"), req.get("suffix", "")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError("'sha256' must be 64 lowercase hex digits")
        if not isinstance(suffix, str) or not FILE_SUFFIX.match(suffix):
            raise ValueError("'suffix' must be a file extension like '.safetensors'")
        # the suffix says the format (readers go by it); the name is the content's hash
        final, part = self.cache / f"{digest}{suffix}", self.cache / f"{digest}{suffix}.part"
        if req["cmd"] == "have":
            return {"path": str(final) if final.is_file() else None}
        offset, size = req.get("offset"), req.get("size")
        if type(size) is not int or not 0 < size <= MAX_FILE or type(offset) is not int \
                or frame is None or not 0 < len(frame) <= CHUNK \
                or offset + len(frame) > size:
            raise ValueError(f"'put' takes an offset, a size up to {MAX_FILE} and a chunk of "
                             f"at most {CHUNK} bytes that fits in it")
        if offset == 0:
            self._begin_upload(part, size)
        upload = self._uploads.get(part)
        if upload is None or offset != upload.received or size != upload.size:
            have = upload.received if upload is not None else 0
            raise ValueError(f"chunk at {offset} of a {size}-byte file, but {have} bytes of it "
                             f"have arrived: send in order, from offset 0")
        with open(part, "r+b") as f:
            f.seek(offset)
            f.write(frame.buffer)
        # hashed as it arrives: hashing a large file at the end would hold up every request
        upload.sha256.update(frame.buffer)
        upload.received += len(frame)
        upload.touched = time.monotonic()
        if upload.received < size:
            return {"path": None}
        del self._uploads[part]
        got = upload.sha256.hexdigest()
        if got != digest:
            part.unlink()
            raise ValueError(f"the file's sha256 is {got}, not {digest}: dropped")
        part.replace(final)
        return {"path": str(final)}

    def _begin_upload(self, part: Path, size: int) -> None:
        """Start (or restart) the upload of ``part``: uploads left idle are dropped first, and
        a file is refused when too many are under way or the disk cannot hold it."""
        now = time.monotonic()
        for stale in [p for p, u in self._uploads.items()
                      if now - u.touched > UPLOAD_IDLE_S or p == part]:
            del self._uploads[stale]
            stale.unlink(missing_ok=True)
        if len(self._uploads) >= MAX_UPLOADS:
            raise ValueError(f"{MAX_UPLOADS} uploads are under way here; send this file after "
                             f"they end")
        # the uploads under way will take the rest of their bytes too
        free = shutil.disk_usage(self.cache).free - sum(u.size - u.received
                                                        for u in self._uploads.values())
        if size > free:
            raise ValueError(f"the file takes {size} bytes and the cache ({self.cache}) has "
                             f"{max(0, free)} free beside the uploads under way")
        part.write_bytes(b"")
        self._uploads[part] = _Upload(size)

    def _config(self, doc: Any) -> RankConfig:
        """A rank config from a coordinator, every field checked; its data socket binds on
        this agent's address and its files live in this agent's directory."""
        if not isinstance(doc, dict):
            raise ValueError("'config' must be a rank config map")
        _only(doc, {f.name for f in fields(RankConfig)})
        ints = {"rank": (0, 1 << 20), "stage": (0, 1 << 20), "replica": (0, 1 << 20),
                "threads": (1, 4096), "hwm": (1, 1 << 20), "spin_us": (0, MAX_SPIN_US)}
        for k, (low, high) in ints.items():
            if k in doc and (type(doc[k]) is not int or not low <= doc[k] <= high):
                raise ValueError(f"config '{k}' must be an int in [{low}, {high}]")
        if type(doc.get("trust_code", False)) is not bool:
            raise ValueError("config 'trust_code' must be true or false")
        if not isinstance(doc.get("control"), str) or not _TCP.match(doc["control"]) or \
                not 0 < int(doc["control"].rpartition(":")[2]) <= 65535:
            raise ValueError("config 'control' must be the coordinator's tcp://HOST:PORT "
                             "(a port from 1 to 65535)")
        for k in ("public_key", "secret_key", "coordinator_key"):
            if not isinstance(doc.get(k), str) or not _KEY.match(doc[k]):
                raise ValueError(f"config '{k}' must be a CURVE key (ranks of other hosts "
                                 f"always use CURVE)")
        for k in ("upstream_keys", "downstream_keys"):
            peers = doc.get(k)
            if not isinstance(peers, list) or not 0 < len(peers) <= MAX_PEERS or \
                    not all(isinstance(u, str) and _KEY.match(u) for u in peers):
                raise ValueError(f"config '{k}' must be a list of 1 to {MAX_PEERS} CURVE keys")
        # a shared-memory ring (an inherited descriptor) never crosses hosts
        return RankConfig(**{**doc, "data_in": f"tcp://{self.host}:*",
                             "workdir": self.workdir, "ring_fd": None, "ring_bytes": 0,
                             "ring_min_bytes": 0})

    def _stop(self, numbers: list[int]) -> None:
        stopping = [self.ranks.pop(n) for n in numbers if n in self.ranks]
        for n in numbers:
            self.owner.pop(n, None)
        for r in stopping:
            if r.process.poll() is None:
                r.process.terminate()
        stop_processes(stopping, grace_s=2.0)


_FIELDS = {"resources": set(), "echo": set(), "start": {"config"}, "status": set(),
           "stop": {"ranks"}, "logs": {"rank"}, "have": {"sha256", "suffix"},
           "put": {"sha256", "suffix", "offset", "size"}}


def _count(v: Any, low: int = 0, high: int = 1 << 62) -> bool:
    return type(v) is int and low <= v <= high


def _text(v: Any, limit: int = 4096) -> bool:
    return type(v) is str and len(v) <= limit


def _reply_problem(cmd: str, reply: dict) -> str | None:
    """What is wrong with an agent's reply to ``cmd`` (None: nothing), for every field the
    coordinator reads. An agent holds the cluster's key, but a wrong or damaged answer is
    named here rather than failing as a KeyError or a bad number deep in a run."""
    if cmd == "resources":
        flops = reply.get("flops")
        if not (_text(reply.get("host"), 256) and _count(reply.get("cores"), 1, 1 << 20)
                and _count(reply.get("memory_bytes")) and _count(reply.get("refused"))
                and type(flops) in (int, float) and 0 <= flops < float("inf")):
            return "'resources' needs host (text), cores (>= 1), memory_bytes, refused " \
                   "(counts) and flops (a number >= 0)"
    elif cmd == "status":
        ranks = reply.get("ranks")
        if not isinstance(ranks, dict) or len(ranks) > MAX_RANKS or not all(
                _text(k, 20) and k.isdigit() and (v is None or _text(v))
                for k, v in ranks.items()):
            return "'ranks' must map rank numbers to null (running) or why each ended"
    elif cmd in ("have", "put"):
        path = reply.get("path")
        if not (path is None or (_text(path) and path)):
            return "'path' must be a path or null"
    elif cmd == "logs" and not _text(reply.get("text", ""), 4 * LOG_TAIL):
        return f"'text' must be text of at most {4 * LOG_TAIL} characters"
    return None


def _only(doc: dict, allowed: set[str]) -> None:
    extra = sorted(str(k) for k in doc if k not in allowed)
    if extra:
        raise ValueError(f"unexpected field(s) {', '.join(extra)[:200]}")


def _measure_flops() -> float:
    """FLOP/s of one core on a float32 matmul (the planner's unit), in about 0.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        a @ a  # warm up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ a
            n += 1
        return 2 * 256 ** 3 * n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def spawn_agent(listen: str, keys_dir: str, log_path: str, *,
                coordinator_timeout: float = 10.0, wait_s: float = 30.0,
                wrapper: tuple[str, ...] = (), cache: str | None = None
                ) -> tuple[subprocess.Popen, str]:
    """Start ``fastserve agent`` as a subprocess of this one (its log in ``log_path``) and wait
    until it listens; return the process and the ``tcp://HOST:PORT`` it bound (port 0 in
    ``listen``: the kernel's pick). ``wrapper`` runs it inside something (``ip netns exec NS``,
    which then execs the agent: the process is the agent). For test clusters and benchmarks on
    one machine."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "fastserve", "agent", "--listen", listen,
             "--keys", str(keys_dir), "--coordinator-timeout", str(coordinator_timeout),
             *(["--cache", str(cache)] if cache else [])],
            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + wait_s
    while True:
        with open(log_path, errors="replace") as f:
            found = re.search(r"listening on (tcp://\S+)", f.read())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            with open(log_path, errors="replace") as f:
                raise EngineError(f"the agent on {listen} did not start: {f.read()[-500:]}")
        time.sleep(0.05)


# --- the coordinator's side ------------------------------------------------------------------


class AgentClient:
    """A coordinator's connection to one agent: requests with a deadline, each answered or
    turned into a :class:`HostError` naming the host."""

    def __init__(self, ctx: zmq.Context, name: str, address: str, keys: ClusterKeys,
                 timeout: float = 3.0) -> None:
        self.name, self.address, self.timeout = name, address, timeout
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME + MAX_REQUEST)
        # the agent knows this coordinator, and the ranks it starts, by this id
        self.sock.setsockopt(zmq.ROUTING_ID, secrets.token_bytes(16))
        self.sock.curve_secretkey = keys.own.secret.encode()
        self.sock.curve_publickey = keys.own.public.encode()
        self.sock.curve_serverkey = keys.peers[0].encode()
        try:
            self.sock.connect(f"tcp://{address}")
        except zmq.ZMQError as e:  # closed here: a socket left open blocks ctx.term() forever
            self.sock.close()
            raise HostError(f"host '{name}': cannot connect to {address}: {e}", name) \
                from None
        self._next = 0

    def request(self, cmd: str, frame: bytes | None = None, timeout: float | None = None,
                **body) -> tuple[dict, bytes | None]:
        """Send one request; the reply document and its frame (if any)."""
        self._next += 1
        rid = self._next
        doc = json.dumps({"id": rid, "cmd": cmd, **body}).encode()
        try:
            self.sock.send_multipart([doc] + ([frame] if frame is not None else []),
                                     flags=zmq.NOBLOCK)
        except zmq.Again:
            raise HostError(self._silent(timeout), self.name) from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                raise HostError(self._silent(timeout), self.name)
            parts = self.sock.recv_multipart()
            try:
                reply = json.loads(parts[0])
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            if not isinstance(reply, dict) or reply.get("id") != rid:
                continue  # a late answer to a request that timed out
            if not reply.get("ok"):
                raise HostError(f"host '{self.name}' ({self.address}) refused '{cmd}': "
                                f"{reply.get('error', 'no reason given')}", self.name)
            problem = _reply_problem(cmd, reply)
            if problem:
                raise HostError(f"host '{self.name}' ({self.address}) sent a malformed "
                                f"reply to '{cmd}': {problem}", self.name)
            return reply, parts[1] if len(parts) > 1 else None

    def _silent(self, timeout: float | None) -> str:
        return (f"host '{self.name}' ({self.address}) did not answer within "
                f"{timeout or self.timeout:g} s: is its agent running (fastserve agent "
                f"--listen {self.address} --keys DIR), and does its key directory list this "
                f"coordinator's key?")

    def close(self) -> None:
        self.sock.close(linger=0)
