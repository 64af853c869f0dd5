"""A deployment: rank processes for ``replicas × stages`` shards, and the coordinator that feeds
them, collects results in order, and turns every failure into a typed error instead of a hang.

    with Deployment("graphs/gpt2.yaml", Layout(replicas=1, stages=2)) as dep:
        outputs = dep.run(inputs, micro_batches=4)

Data flows rank to rank (stage k PUSHes to stage k+1's PULL); only the first stage's inputs and
the last stage's outputs pass through the coordinator. Control (ready, health, stats, stop) uses
one ROUTER socket here and a DEALER in every rank.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import zmq

from fastserve.engine.coordinator import Merger, RunStats, WorkItem, plan_work
from fastserve.engine.launcher import Addresses, RankProcess, launch_local, stop_processes
from fastserve.engine.memory import retain_freed_memory
from fastserve.engine.rank import RankConfig
from fastserve.engine.wire import WireError, decode, encode
from fastserve.errors import EngineError, RankDeadError, RankError
from fastserve.graph import Graph, compile_graph, load_spec
from fastserve.partition import Sharding, load_manifest, partition, shards_from_bounds

Progress = Callable[[str], None]
RECONNECT_MS = 5  # retry a connection to a rank that has not bound its socket yet this often


@dataclass(frozen=True)
class Layout:
    """How a deployment is laid out: ``replicas`` copies of a ``stages``-stage pipeline."""

    replicas: int = 1
    stages: int = 1
    strategy: str = "weight"
    threads: int = 1  # torch threads per rank
    memory_cap: int | str | None = None  # per rank, for the hybrid strategy; default: an even
    # share of this machine's memory

    @property
    def ranks(self) -> int:
        return self.replicas * self.stages


class Deployment:
    """Rank processes running one graph, and the coordinator in this process."""

    def __init__(self, spec: str, layout: Layout = Layout(), *, dims: Mapping[str, int] | None
                 = None, transport: str = "ipc", timeout: float = 60.0,
                 load_timeout: float = 120.0, max_in_flight: int | None = None,
                 progress: Progress | None = None, retain_memory: bool = True) -> None:
        """``retain_memory``: keep this process's freed memory for reuse instead of returning
        it to the kernel (see :mod:`fastserve.engine.memory`); it changes glibc's malloc for
        the whole process, and makes merging large outputs several times cheaper."""
        if retain_memory:
            retain_freed_memory()
        self.layout = layout
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.progress = progress or (lambda _msg: None)
        # ``spec`` is a graph spec, or a partition export whose shard files the ranks load
        self.export_dir = os.path.abspath(spec) if os.path.isdir(spec) else None
        if self.export_dir is not None:
            manifest = load_manifest(self.export_dir)
            if not manifest.get("spec"):
                raise EngineError(f"export '{spec}' holds no graph spec (it was made from a "
                                  f"graph built in Python); export it from a spec file")
            self.spec_path = os.path.join(self.export_dir, manifest["spec"]["file"])
            self.dims = {**manifest["dims"], **(dims or {})}
            self.graph: Graph = compile_graph(load_spec(self.spec_path), self.dims)
            self.sharding: Sharding = _exported_sharding(self.graph, manifest, layout)
        else:
            self.spec_path = os.path.abspath(spec)
            self.dims = dict(dims or {})
            self.graph = compile_graph(load_spec(spec), self.dims)
            self.sharding = self._cut()
        if len(self.sharding) != layout.stages:
            raise EngineError(f"strategy '{layout.strategy}' made {len(self.sharding)} shards, "
                              f"{layout.stages} stages were asked for")
        # batched inputs: those declared with a symbolic 'batch' first dim
        self.batched = [i.name for i in self.graph.spec.inputs
                        if i.shape and i.shape[0] == "batch"] or \
                       [t.name for t in self.graph.inputs]
        self.max_in_flight = max_in_flight or 2 * layout.stages + 1  # per replica
        self.addresses = Addresses(transport)
        self.ranks: list[RankProcess] = []
        self.ready: dict[int, dict] = {}
        self._ctx = zmq.Context()
        self._next_request = 1
        self.stats = RunStats()

    def _cut(self) -> Sharding:
        lay = self.layout
        if lay.stages == 1:
            return partition(self.graph, "weight", shards=1)
        if lay.strategy == "hybrid":
            cap = lay.memory_cap or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") \
                // lay.ranks
            return partition(self.graph, "hybrid", shards=lay.stages, memory_caps=cap)
        if lay.strategy == "weight":  # a pipeline runs at its slowest stage: balance compute
            return partition(self.graph, "weight", shards=lay.stages, by="flops")
        return partition(self.graph, lay.strategy, shards=lay.stages)

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> Deployment:
        """Launch every rank and wait until each has loaded its shard."""
        ctx, addr, lay = self._ctx, self.addresses, self.layout
        self._control = ctx.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        control = addr.new("control")
        self._control.bind(control)
        self._results = ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        results = addr.new("results")
        self._results.bind(results)
        self._inputs: list[zmq.Socket] = []
        rank = 0
        for r in range(lay.replicas):
            stage_in = [addr.new(f"r{r}s{s}") for s in range(lay.stages)]
            for s, shard in enumerate(self.sharding):
                cfg = RankConfig(
                    rank=rank, stage=s, replica=r, spec=self.spec_path, nodes=list(shard.nodes),
                    inputs=list(shard.inputs), outputs=list(shard.outputs),
                    data_in=stage_in[s],
                    data_out=stage_in[s + 1] if s + 1 < lay.stages else results,
                    control=control, parent_pid=os.getpid(), dims=self.dims,
                    threads=lay.threads, export_dir=self.export_dir,
                    shard_index=s if self.export_dir else None)
                self.ranks.append(launch_local(cfg, addr.dir))
                rank += 1
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            # the first stage binds only once its shard is loaded; ZeroMQ's default 100 ms
            # between connection attempts would delay the first batch by up to that much
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
            sock.connect(stage_in[0])
            self._inputs.append(sock)
        self.progress(f"started {len(self.ranks)} ranks ({lay.replicas} replica(s) x "
                      f"{lay.stages} stage(s)); loading shards")
        try:
            self._await_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.load_timeout
        while len(self.ready) < len(self.ranks):
            self._check_alive()
            if time.monotonic() > deadline:
                missing = [r.name for r in self.ranks if r.config.rank not in self.ready]
                raise RankDeadError(f"{', '.join(missing)} did not load within "
                                    f"{self.load_timeout:.0f} s; is the machine overloaded?",
                                    rank=self.ranks[0].config.rank)
            if not self._control.poll(100):
                continue
            _, *frames = self._control.recv_multipart(copy=False)
            meta = decode(frames).meta
            if meta.get("event") == "failed":
                raise EngineError(f"rank {meta.get('rank')} could not load its shard: "
                                  f"{meta.get('error')}")
            if meta.get("event") == "ready":
                self.ready[meta["rank"]] = meta
                self.progress(f"rank {meta['rank']} ready ({meta['load_s']:.1f} s)")

    def stop(self) -> None:
        """Ask every rank to stop, then make sure each process is gone."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        control = getattr(self, "_control", None)
        for r in self.ranks:
            if control is not None and r.process.poll() is None:
                try:
                    control.send_multipart([f"rank{r.config.rank}".encode(),
                                            *encode("control", meta={"cmd": "stop"})],
                                           flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        stop_processes(self.ranks)
        for s in [control, getattr(self, "_results", None), *getattr(self, "_inputs", [])]:
            if s is not None:
                s.close(linger=0)
        self._ctx.term()
        self.addresses.close()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- failures ------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for r in self.ranks:
            why = r.exit_reason()
            if why is not None:
                raise RankDeadError(f"{r.name} died: {why}", rank=r.config.rank)

    def control(self, cmd: str, timeout: float = 5.0) -> dict[int, dict]:
        """Send ``cmd`` (health, stats) to every rank; return replies by rank. A rank that does
        not answer within ``timeout`` raises RankDeadError naming it."""
        self._check_alive()
        for r in self.ranks:
            self._control.send_multipart([f"rank{r.config.rank}".encode(),
                                          *encode("control", meta={"cmd": cmd})])
        replies: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.ranks) and time.monotonic() < deadline:
            if self._control.poll(50):
                _, *frames = self._control.recv_multipart(copy=False)
                meta = decode(frames).meta
                if meta.get("cmd") == cmd:
                    replies[meta["rank"]] = meta
        silent = [r for r in self.ranks if r.config.rank not in replies]
        if silent:
            self._check_alive()
            raise RankDeadError(f"{', '.join(r.name for r in silent)} did not answer '{cmd}' "
                                f"within {timeout:.0f} s", rank=silent[0].config.rank)
        return replies

    # --- running ---------------------------------------------------------------------------------

    def run(self, inputs: Mapping[str, torch.Tensor], micro_batches: int = 1
            ) -> dict[str, torch.Tensor]:
        """Run one batch: split over replicas and micro-batches, merge results in order."""
        return self.run_batches([inputs], micro_batches)[0]

    def run_batches(self, batches: Sequence[Mapping[str, torch.Tensor]], micro_batches: int = 1
                    ) -> list[dict[str, torch.Tensor]]:
        """Run several batches as one stream: the micro-batches of batch i+1 enter the pipeline
        while those of batch i drain, so the fill-and-drain bubble is paid once per stream, not
        once per batch. Results come back per batch, merged in order."""
        per_batch: list[list[WorkItem]] = []
        items: list[WorkItem] = []
        for inputs in batches:
            work = plan_work(inputs, self.batched, self.layout.replicas, micro_batches)
            per_batch.append([replace(w, key=len(items) + w.key) for w in work])
            items += per_batch[-1]
        merger = Merger(per_batch)
        for item, tensors in self._stream(items):
            merger.add(item.key, tensors)
        return merger.results()

    def run_requests(self, requests: Sequence[Mapping[str, torch.Tensor]]
                     ) -> list[dict[str, torch.Tensor]]:
        """Run independent requests (any batch size and sequence length each), each routed
        whole to the least-loaded replica; results come back in request order."""
        return list(self.serve(requests))

    def serve(self, requests: Iterable[Mapping[str, torch.Tensor]]
              ) -> Iterator[dict[str, torch.Tensor]]:
        """Serve a stream of requests: yield each result, in request order, as soon as it and
        every earlier one are done. ``requests`` is read only as fast as the replicas take
        work, and finished results wait for an earlier slow one only up to a bound, so an
        endless stream runs in bounded memory."""
        items = (WorkItem(i, None, dict(r), next(iter(r.values())).shape[0])
                 for i, r in enumerate(requests))
        done: dict[int, dict[str, torch.Tensor]] = {}
        limit = 2 * self.layout.replicas * self.max_in_flight  # results held out of order
        expected = 0
        for item, tensors in self._stream(items, room=lambda: len(done) < limit):
            done[item.key] = tensors
            while expected in done:
                yield done.pop(expected)
                expected += 1

    def _stream(self, items: Iterable[WorkItem], room: Callable[[], bool] = lambda: True
                 ) -> Iterator[tuple[WorkItem, dict[str, torch.Tensor]]]:
        """Send ``items`` and yield each with its result as results arrive. An item is taken
        from the iterable only when its replica has fewer than ``max_in_flight`` in flight and
        ``room()`` holds: bounded queues, back-pressure up to the caller."""
        request = self._next_request
        self._next_request += 1
        source = iter(items)
        upcoming = next(source, None)
        in_flight = [0] * self.layout.replicas
        sent: dict[int, tuple[WorkItem, int, float]] = {}  # key -> item, replica, sent at
        t0 = time.perf_counter()
        last_progress = time.monotonic()
        try:
            while upcoming is not None or sent:
                while upcoming is not None and room():
                    item = upcoming
                    replica = item.replica if item.replica is not None else \
                        min(range(self.layout.replicas), key=lambda i: in_flight[i])
                    if in_flight[replica] >= self.max_in_flight:
                        break
                    sent[item.key] = (item, replica, time.time())
                    self._inputs[replica].send_multipart(
                        encode("data", request=request, micro=item.key, tensors=item.tensors),
                        copy=False)
                    in_flight[replica] += 1
                    upcoming = next(source, None)
                if not sent:  # room() only closes while results wait for an earlier one
                    raise EngineError("internal error: no work in flight and no room to send")
                if not self._results_socket_ready():
                    if time.monotonic() - last_progress > self.timeout:
                        self.control("health")  # names a rank that stopped answering
                        raise EngineError(f"no result for {self.timeout:.0f} s although every "
                                          f"rank answers health checks; raise --timeout for "
                                          f"slow runs")
                    continue
                try:
                    msg = decode(self._results.recv_multipart(copy=False))
                except WireError as e:
                    raise EngineError(f"the last stage sent a malformed result: {e}") from None
                if msg.request != request or msg.micro not in sent:
                    continue  # a straggler of an earlier, failed or abandoned run
                last_progress = time.monotonic()
                if msg.kind == "error":
                    err = msg.meta.get("error", {})
                    raise RankError(err.get("message", "unknown error"), rank=err.get("rank"),
                                    stage=err.get("stage"), node=err.get("node"))
                item, replica, at = sent.pop(msg.micro)
                in_flight[replica] -= 1
                self.stats.add_timings(msg.meta.get("timings", []), at)
                self.stats.samples += item.samples
                # the tensors live on the received ZeroMQ frames, which they keep alive
                yield item, msg.tensors
        finally:
            self.stats.seconds += time.perf_counter() - t0

    def _results_socket_ready(self) -> bool:
        """Wait up to 100 ms for a result; in between, notice a rank that died."""
        if self._results.poll(100):
            return True
        self._check_alive()
        return False


def _exported_sharding(graph: Graph, manifest: dict, layout: Layout) -> Sharding:
    """The cut an export was made with, in its own node order."""
    shards = manifest["shards"]
    if len(shards) != layout.stages:
        raise EngineError(f"the export holds {len(shards)} shards, so it runs as "
                          f"{len(shards)} stages, not {layout.stages}; use --stages "
                          f"{len(shards)} or export again")
    order = [n for s in shards for n in s["nodes"]]
    if sorted(order) != sorted(graph.order):
        raise EngineError("the export's shards do not cover its graph's nodes exactly once")
    bounds = list(itertools.accumulate(len(s["nodes"]) for s in shards))
    return shards_from_bounds(graph, bounds, manifest.get("strategy", "export"), order=order)
