"""The rank process: ZeroMQ sockets and a loop around a :class:`RankCore`.

Started as ``python -m fastserve.engine.rank '<RankConfig JSON>'``. The rank

* builds only its own shard (from the spec with seeded weights, or from a partition export);
* binds a PULL socket for data, PUSHes results to the next stage (or to the coordinator);
* talks to the coordinator on a separate DEALER control socket: ``ready`` (or ``failed`` with
  the reason) once loaded, then answers ``health``, ``stats`` and ``stop``;
* rejects and counts malformed messages and keeps serving;
* exits by itself when its parent process disappears (PR_SET_PDEATHSIG plus a parent-pid check),
  so a killed driver never leaves orphan ranks.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import zmq

from fastserve.engine.memory import retain_freed_memory
from fastserve.engine.wire import WireError, decode, encode

POLL_MS = 250  # also the period of the parent-alive check


@dataclass(frozen=True)
class RankConfig:
    """Everything a rank needs, as plain JSON values (no pickled objects cross processes)."""

    rank: int
    stage: int
    replica: int
    spec: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    data_in: str  # address this rank binds for data
    data_out: str  # address it connects to: the next stage, or the coordinator's results
    control: str  # the coordinator's control ROUTER
    parent_pid: int
    dims: dict[str, int] = field(default_factory=dict)
    threads: int = 1
    export_dir: str | None = None
    shard_index: int | None = None
    hwm: int = 64  # ZeroMQ high-water mark: bounded queues, back-pressure upstream

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> RankConfig:
        return RankConfig(**json.loads(text))


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the parent-pid check in the loop still applies
        pass


def build_shard(cfg: RankConfig, before_weights=lambda: None):
    """The shard module of this rank, built alone. ``before_weights`` runs once everything but
    the weights is in memory (code, the compiled graph), to measure an idle rank."""
    if cfg.export_dir is not None:
        from fastserve.partition import load_shard

        before_weights()
        return load_shard(cfg.export_dir, cfg.shard_index)
    from fastserve.graph import compile_graph, load_spec
    from fastserve.graph.module import build_subgraph

    graph = compile_graph(load_spec(cfg.spec), cfg.dims)
    before_weights()
    return build_subgraph(graph, cfg.nodes, cfg.inputs, cfg.outputs)


def serve(cfg: RankConfig) -> int:
    """Run the rank until told to stop or orphaned; return the exit code."""
    import torch

    from fastserve.engine.core import RankCore

    _die_with_parent()
    retain_freed_memory()  # activations of every micro-batch reuse the last one's pages
    torch.set_num_threads(cfg.threads)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.IDENTITY, f"rank{cfg.rank}".encode())
    ctl.setsockopt(zmq.LINGER, 1000)
    ctl.connect(cfg.control)
    idle = {}  # an idle rank: code and compiled graph loaded, no weights
    t0 = time.time()
    try:
        shard = build_shard(cfg, lambda: idle.setdefault("rss", resident_bytes()))
    except Exception as e:  # report why instead of dying silently
        ctl.send_multipart(encode("control", meta={"event": "failed", "rank": cfg.rank,
                                                   "error": f"{type(e).__name__}: {e}"}))
        ctl.close()
        ctx.term()
        return 1
    core = RankCore(cfg.rank, cfg.stage, shard)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, cfg.hwm)
    pull.bind(cfg.data_in)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, cfg.hwm)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.RECONNECT_IVL, 5)  # the next stage may bind later: retry quickly
    push.connect(cfg.data_out)
    weights = sum(p.numel() * p.element_size() for p in shard.parameters())
    ctl.send_multipart(encode("control", meta={
        "event": "ready", "rank": cfg.rank, "pid": os.getpid(), "load_s": time.time() - t0,
        "rss": resident_bytes(), "rss_before_load": idle["rss"], "weight_bytes": weights}))

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(ctl, zmq.POLLIN)
    try:
        while True:
            events = dict(poller.poll(POLL_MS))
            if os.getppid() != cfg.parent_pid:
                return 3  # orphaned: the driver is gone
            if pull in events:
                frames = pull.recv_multipart(copy=False)
                received = time.time()
                try:
                    msg = decode(frames)
                except WireError:
                    core.stats.malformed += 1
                    continue
                out = core.handle(msg, received)
                if out.meta.get("timings"):
                    out.meta["timings"][-1]["sent"] = time.time()
                push.send_multipart(encode(out.kind, request=out.request, micro=out.micro,
                                           tensors=out.tensors, meta=out.meta), copy=False)
            if ctl in events:
                try:
                    cmd = decode(ctl.recv_multipart(copy=False)).meta.get("cmd")
                except WireError:
                    core.stats.malformed += 1
                    continue
                reply = {"cmd": cmd, "rank": cfg.rank, "ok": True}
                if cmd == "stats":
                    reply.update(core.stats.to_json(), rss=resident_bytes())
                ctl.send_multipart(encode("reply", meta=reply))
                if cmd == "stop":
                    return 0
    finally:
        for s in (pull, push, ctl):
            s.close(linger=0 if s is not ctl else 500)
        ctx.term()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fastserve.engine.rank '<RankConfig JSON>'", file=sys.stderr)
        return 2
    return serve(RankConfig.from_json(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
