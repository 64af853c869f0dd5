"""The rank process: ZeroMQ sockets and a loop around a :class:`RankCore`.

Started as ``python -m fastserve.engine.rank --parent PID --rank N`` with its
:class:`RankConfig` as one JSON line on stdin (secret keys never appear on a command line). The
rank

* keeps reading stdin after the config: end of file means the driver process is gone (killed,
  crashed or exited), whichever thread started the rank, and the rank removes the deployment's
  private directory and exits. This watch is armed before torch is imported;
* says ``hello`` on the control channel and receives its shard from the coordinator: the
  records of its own nodes (or which export shard file to load) and the plan's hash. It never
  reads the spec file nor compiles the whole graph; ``ready`` echoes the plan hash and the nodes
  it built, and the coordinator refuses a rank whose hash or nodes differ from the plan;
* binds a PULL socket for data first (on tcp a port the kernel picks, reported in ``hello``),
  and PUSHes results to where ``load`` says (the next stage's ranks, which ZeroMQ serves in
  turn, or the coordinator); on tcp both are CURVE-authenticated
  (:mod:`fastserve.engine.security`);
* talks to the coordinator on a separate DEALER control socket: ``ready`` (or ``failed`` with
  the reason) once loaded, then answers ``health``, ``stats`` and ``stop`` from a thread of its
  own, so a long batch does not make a live rank look dead;
* never blocks on a send: a result the next peer cannot take yet waits in an outbox while the
  rank stops reading new data (back-pressure) but keeps answering control;
* a last-stage rank on the coordinator's host copies its results into a shared-memory ring it
  inherited (:mod:`fastserve.engine.ring`) and sends only their header, when they fit;
* rejects and counts malformed messages by reason and keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

POLL_MS = 250
ORPHANED = 3  # exit code of a rank whose driver disappeared
LOAD_WAIT_S = 120.0  # how long a rank waits for its shard after saying hello
MAX_RECORD_BYTES = 1 << 28  # a shard record (JSON); control messages carry nothing larger


@dataclass(frozen=True)
class RankConfig:
    """Everything a rank needs, as plain JSON values (no pickled objects cross processes)."""

    rank: int
    stage: int
    replica: int
    data_in: str  # where this rank binds for data (tcp: port *, the kernel picks one)
    control: str  # the coordinator's control ROUTER
    threads: int = 1
    trust_code: bool = False  # the user trusts code the spec names (module:, source:)
    workdir: str | None = None  # the deployment's private directory, removed if orphaned
    hwm: int = 64  # ZeroMQ high-water mark: bounded queues, back-pressure upstream
    # CURVE (tcp only): this rank's key pair, the keys allowed to send it data, and the
    # servers it sends data to (in the order of the endpoints "load" gives)
    public_key: str | None = None
    secret_key: str | None = None
    upstream_keys: list[str] = field(default_factory=list)
    downstream_keys: list[str] = field(default_factory=list)
    coordinator_key: str | None = None
    # a last-stage rank on the coordinator's host: the shared-memory ring its results go
    # through (an inherited memfd, fastserve.engine.ring), its size, and the smallest result
    # it carries (smaller ones go over the socket)
    ring_fd: int | None = None
    ring_bytes: int = 0
    ring_min_bytes: int = 0
    spin_us: int = 0  # how long to poll for the next message before sleeping (engine.spin)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> RankConfig:
        doc = json.loads(text)
        known = {f.name for f in fields(RankConfig)}
        if not isinstance(doc, dict) or not doc.keys() <= known:
            raise ValueError(f"a rank config must be a map with keys from {sorted(known)}")
        return RankConfig(**doc)


def resident_bytes() -> int:
    """This process's resident set size, less its resident shared memory: a last-stage rank
    maps its result ring (fastserve.engine.ring), which the coordinator owns and maps too, and
    its pages would otherwise count once in each."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssShmem:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0) - fields.get("RssShmem", 0)


def watch_parent(workdir: str | None) -> None:
    """Exit as soon as stdin reaches end of file: the driver holding its write end is gone.

    A pipe follows the process, unlike PR_SET_PDEATHSIG, which fires when the *thread* that
    started the rank ends (a Deployment started from a worker thread lost its ranks)."""
    def wait() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if workdir and os.path.isdir(workdir):  # nobody else is left to remove it
            shutil.rmtree(workdir, ignore_errors=True)
        os._exit(ORPHANED)

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


def build_shard(record: Any, trust_code: bool, before_weights=lambda: None):
    """The shard module a record from the coordinator describes, built alone.
    ``before_weights`` runs once everything but the weights is in memory (to measure an idle
    rank)."""
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind in ("nodes", "captured"):
        from fastserve.graph.records import build_from_record

        return build_from_record(record, trust_code=trust_code, before_weights=before_weights)
    if kind == "export":
        from fastserve.partition import load_shard

        if not isinstance(record.get("dir"), str) or type(record.get("index")) is not int:
            raise ValueError("an export record needs 'dir' (a path) and 'index' (an int)")
        before_weights()
        return load_shard(record["dir"], record["index"], trust_code=trust_code)
    if kind == "export-file":  # an export sent to this host: its spec and this shard's file
        from fastserve.partition.export import shard_of
        from fastserve.partition.manifest import sent_manifest

        manifest = sent_manifest(record.get("manifest"), record.get("index"),
                                 record.get("spec"), record.get("file"))
        before_weights()
        return shard_of(manifest, record["index"], trust_code=trust_code)
    raise ValueError(f"unknown shard record kind {kind!r}")


def serve(cfg: RankConfig) -> int:
    """Run the rank until told to stop; return the exit code."""
    import torch
    import zmq

    from fastserve.engine.core import RankCore
    from fastserve.engine.memory import (IDLE_RELEASE_S, release_freed_memory,
                                         retain_freed_memory)
    from fastserve.engine.ring import Ring
    from fastserve.engine.security import Guard, KeyPair
    from fastserve.engine.spin import Waiter
    from fastserve.engine.wire import MAX_MESSAGE_BYTES, WireError, decode, encode
    from fastserve.errors import EngineError

    retain_freed_memory()  # activations of every micro-batch reuse the last one's pages
    torch.set_num_threads(cfg.threads)
    ctx = zmq.Context()
    keys = KeyPair(cfg.public_key, cfg.secret_key) if cfg.secret_key else None
    guard = Guard(ctx, keys)
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.IDENTITY, f"rank{cfg.rank}".encode())
    ctl.setsockopt(zmq.LINGER, 1000)
    ctl.setsockopt(zmq.SNDHWM, cfg.hwm)
    ctl.setsockopt(zmq.SNDTIMEO, 10_000)
    ctl.setsockopt(zmq.MAXMSGSIZE, MAX_RECORD_BYTES)  # the largest is the shard record
    guard.connect_to(ctl, cfg.coordinator_key)
    ctl.connect(cfg.control)
    sockets = [ctl]
    stopping = threading.Event()
    answering: threading.Thread | None = None  # answers control once the rank is ready

    def tell(meta: dict) -> None:
        """Send an event to the coordinator: waits up to 10 s for the connection (a CURVE
        handshake under load takes a while), then gives up rather than block for ever."""
        try:
            ctl.send_multipart(encode("control", meta=meta))
        except zmq.Again:
            print(f"rank {cfg.rank}: the coordinator took no '{meta['event']}' event within "
                  f"10 s", file=sys.stderr)

    try:
        # bind first, where the config says (on tcp, a port the kernel picks now, so no port
        # is chosen early and left for another process to take), and say where in hello
        pull = ctx.socket(zmq.PULL)
        push = ctx.socket(zmq.PUSH)
        sockets += [pull, push]  # closed on the way out whatever fails below
        pull.setsockopt(zmq.RCVHWM, cfg.hwm)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a larger one drops its peer
        guard.serve(pull, "data", cfg.upstream_keys)
        try:
            pull.bind(cfg.data_in)
        except zmq.ZMQError as e:
            print(f"rank {cfg.rank}: cannot bind its data socket {cfg.data_in}: {e}",
                  file=sys.stderr)
            tell({"event": "failed", "rank": cfg.rank,
                  "error": f"cannot bind its data socket {cfg.data_in}: {e}"})
            return 1
        ring, ring_min = None, int(cfg.ring_min_bytes)
        if cfg.ring_fd is not None:
            try:
                ring = Ring.open(int(cfg.ring_fd), int(cfg.ring_bytes))
            except (OSError, ValueError, TypeError, EngineError) as e:
                tell({"event": "failed", "rank": cfg.rank,
                      "error": f"cannot map its result ring: {e}"[:2000]})
                return 1
        tell({"event": "hello", "rank": cfg.rank,
              "endpoint": pull.getsockopt_string(zmq.LAST_ENDPOINT)})
        load = _await_load(ctl)
        if load is None:
            return 0  # told to stop before loading
        outs = load.meta["data_out"]
        if not outs or (keys is not None and len(outs) != len(cfg.downstream_keys)):
            tell({"event": "failed", "rank": cfg.rank,
                  "error": f"'load' gave {len(outs)} endpoint(s) for the output, and the "
                           f"config {len(cfg.downstream_keys)} key(s) to reach them"})
            return 1
        t0 = time.time()
        idle = {}  # an idle rank: code loaded, no weights

        def before_weights() -> None:
            idle.update(rss=resident_bytes(), t=time.time())

        try:
            record = json.loads(bytes(load.tensors["shard"].numpy()).decode("utf-8"))
            shard = build_shard(record, cfg.trust_code, before_weights)
        except Exception as e:  # report why instead of dying silently
            print(f"rank {cfg.rank}: could not load its shard: {type(e).__name__}: {e}",
                  file=sys.stderr)
            tell({"event": "failed", "rank": cfg.rank,
                  "error": f"{type(e).__name__}: {e}"[:2000]})
            return 1
        core = RankCore(cfg.rank, cfg.stage, shard)
        push.setsockopt(zmq.SNDHWM, cfg.hwm)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.RECONNECT_IVL, 5)
        for i, endpoint in enumerate(outs):  # the next stage's ranks, or the results
            guard.connect_to(push, cfg.downstream_keys[i] if keys is not None else None)
            push.connect(endpoint)
        weights = sum(p.numel() * p.element_size() for p in shard.parameters())
        tell({"event": "ready", "rank": cfg.rank, "pid": os.getpid(),
              "load_s": time.time() - t0, "read_s": time.time() - idle.get("t", t0),
              "rss": resident_bytes(),
              "rss_before_load": idle.get("rss", 0), "rss_peak": peak_resident_bytes(),
              "weight_bytes": weights, "plan": load.meta["plan"],
              "nodes": list(shard.order), "threads": torch.get_num_threads()})

        def frames_of(out) -> list:
            try:
                # encoded first: a result the wire refuses takes no room in the ring
                # a data result's meta is its input's, checked on receipt, and its timing
                frames = encode(out.kind, request=out.request, micro=out.micro,
                                tensors=out.tensors, meta=out.meta,
                                meta_checked=out.kind == "data")
                placed = ring.put(out.tensors, ring_min) \
                    if ring is not None and out.kind == "data" else None
                if placed is not None:  # the header alone: the tensors are in the ring
                    return encode(out.kind, request=out.request, micro=out.micro,
                                  tensors=out.tensors,
                                  meta={**out.meta, "shm": [cfg.rank, *placed]})[:1]
                return frames
            except WireError as e:  # e.g. an output dtype the wire does not carry
                err = core.error(out, f"could not send the result: {e}")
                return encode(err.kind, request=err.request, micro=err.micro, meta=err.meta)

        outbox: list | None = None  # a result the next peer could not take yet
        # control is answered by its own thread from here on, so health is answered while a
        # long batch computes (torch releases the GIL) or output waits: busy, not dead
        state = {"busy": False}
        answering = threading.Thread(target=_answer_control, name="control", daemon=True,
                                     args=(ctl, core, state, stopping))
        answering.start()
        poller = zmq.Poller()
        for m in guard.monitors:
            poller.register(m, zmq.POLLIN)
        worked_at: float | None = None  # the last data message; None once idle and released
        waiter = Waiter(int(cfg.spin_us))
        while not stopping.is_set():
            poller.register(pull, zmq.POLLIN if outbox is None else 0)
            poller.register(push, zmq.POLLOUT if outbox is not None else 0)
            events = dict(waiter.wait(poller.poll, POLL_MS))
            if outbox is not None and push in events:
                try:
                    push.send_multipart(outbox, flags=zmq.NOBLOCK, copy=False)
                    outbox = None
                    state["busy"] = False
                except zmq.Again:
                    pass
            if outbox is None and pull in events:
                frames = pull.recv_multipart(copy=False)
                received = time.time()
                try:
                    msg = decode(frames)
                except WireError as e:
                    core.stats.malformed[e.reason] += 1
                    continue
                state["busy"] = True
                out = core.handle(msg, received)
                if out.meta.get("timings"):
                    out.meta["timings"][-1]["sent"] = time.time()
                frames = frames_of(out)
                try:
                    push.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    state["busy"] = False
                except zmq.Again:  # downstream is full: hold it, stop reading, keep answering
                    outbox = frames
                worked_at = time.monotonic()
            elif outbox is None and worked_at is not None and \
                    time.monotonic() - worked_at > IDLE_RELEASE_S:
                # idle: the activations' pages kept for the next micro-batch go back, so an
                # idle rank holds its weights and caches, not its busiest moment
                release_freed_memory()
                worked_at = None
            for m in guard.monitors:
                if m in events:
                    core.stats.refused = guard.count(m)
        return 0
    finally:
        if answering is not None:  # the control thread owns ctl until it is gone
            stopping.set()
            answering.join(timeout=5)
        guard.close()
        for s in sockets:
            s.close(linger=500 if s is ctl else 0)
        ctx.term()


def _answer_control(ctl, core, state: dict, stopping: threading.Event) -> None:
    """The control thread: answer health, stats and stop until told to stop."""
    import zmq

    from fastserve.engine.wire import WireError, decode, encode

    while not stopping.is_set():
        if not ctl.poll(POLL_MS):
            continue
        try:
            msg = decode(ctl.recv_multipart(copy=False))
        except WireError as e:
            core.stats.malformed[e.reason] += 1
            continue
        reply, stop = core.command(msg, pending=int(state["busy"]), rss=resident_bytes())
        try:
            ctl.send_multipart(encode(reply.kind, meta=reply.meta), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        if stop:
            stopping.set()


def _await_load(ctl):
    """Wait for the coordinator's ``load`` (None if told to stop first); anything else on the
    control socket meanwhile is ignored."""
    from fastserve.engine.wire import WireError, decode

    deadline = time.monotonic() + LOAD_WAIT_S
    while time.monotonic() < deadline:
        if not ctl.poll(POLL_MS):
            continue
        try:
            msg = decode(ctl.recv_multipart(copy=False))
        except WireError:
            continue
        cmd = msg.meta.get("cmd") if msg.kind == "control" else None
        if cmd == "load" and {"plan", "data_out"} <= msg.meta.keys() and "shard" in msg.tensors:
            return msg
        if cmd == "stop":
            return None
    raise TimeoutError(f"no shard arrived within {LOAD_WAIT_S:.0f} s of saying hello")


def peak_resident_bytes() -> int:
    """The largest resident set this process has had (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_resident() -> bool:
    """Start the peak (VmHWM) again from the current resident set, to measure one phase's peak;
    False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


USAGE = "usage: python -m fastserve.engine.rank --parent PID --rank N  (RankConfig JSON on stdin)"


def main(argv: list[str]) -> int:
    # argv only names the rank for `ps` and the test suite's leak check; the config is on stdin
    if len(argv) != 4 or argv[0] != "--parent" or argv[2] != "--rank":
        print(USAGE, file=sys.stderr)
        return 2
    line = sys.stdin.buffer.readline()
    try:
        cfg = RankConfig.from_json(line.decode())
    except (ValueError, TypeError) as e:
        print(f"rank: a malformed config on stdin: {e}\n{USAGE}", file=sys.stderr)
        return 2
    watch_parent(cfg.workdir)
    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
