"""A deployment: rank processes for a plan's ``replicas × stages`` shards, and the coordinator
that feeds them, collects results in order, and turns every failure into a typed error instead of
a hang.

    with Deployment(graph, plan) as dep:            # exactly the plan: cut, threads, ...
        outputs = dep.run(inputs)
    with Deployment.from_spec("graphs/gpt2.yaml", Layout(replicas=1, stages=2)) as dep:
        outputs = dep.run(inputs, micro_batches=4)  # planned under those constraints

Data flows rank to rank (stage k PUSHes to stage k+1's PULL); only the first stage's inputs and
the last stage's outputs pass through the coordinator. Control (ready, health, stats, stop) uses
one ROUTER socket here and a DEALER in every rank.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import zmq

from fastserve.engine.coordinator import Merger, RunStats, WorkItem, plan_work
from fastserve.engine.keys import ClusterKeys
from fastserve.engine.launcher import Addresses
from fastserve.engine.placement import Placement, Rank
from fastserve.engine.memory import retain_freed_memory
from fastserve.engine.rank import RankConfig
from fastserve.engine.flow import Flow
from fastserve.engine.ring import INLINE_BYTES, Ring, ring_size
from fastserve.engine.security import Guard, KeyPair
from fastserve.engine.spin import MAX_SPIN_US, Waiter, spin_window
from fastserve.engine.wire import (MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, Message, WireError,
                                   decode, encode)
from fastserve.errors import EngineError, RankDeadError
from fastserve.graph import Graph, compile_graph, load_spec
from fastserve.graph.records import shard_record
from fastserve.partition import Sharding, load_manifest, shards_from_bounds
from fastserve.partition.manifest import exported_spec
from fastserve.resources.costmodel import Profile, micro_batch_size
from fastserve.resources.inventory import (Inventory, is_loopback, local_inventory,
                                           machine_cores)
from fastserve.resources.plan import Plan, RankPlan, check_plan
from fastserve.resources.planner import Constraints, plan

Progress = Callable[[str], None]
RECONNECT_MS = 5  # retry a connection to a rank that has not bound its socket yet this often


@dataclass(frozen=True)
class Layout:
    """The shape a user fixes for :meth:`Deployment.from_spec`: ``replicas`` copies of a
    ``stages``-stage pipeline. Each field is a constraint to the planner, which decides
    everything else (the cut, threads, micro-batches) by the same rules as ``fastserve plan``.
    ``strategy`` None is the planner's own cut (balanced by predicted time); a name cuts as
    ``fastserve partition --strategy NAME`` does."""

    replicas: int | None = 1
    stages: int | None = 1
    strategy: str | None = None
    threads: int | None = None  # torch threads per rank; None: the cores shared evenly

    @property
    def ranks(self) -> int:
        return (self.replicas or 1) * (self.stages or 1)


class Deployment:
    """Rank processes running one graph by one plan, and the coordinator in this process.

    ``Deployment(graph, plan)`` runs ``plan`` exactly as given: its cut, its replicas, each
    rank's threads, its micro-batches and transport; nothing is decided again. The graph stays
    here: each rank receives the records of its own nodes over the control channel (or, for an
    export, which shard file to load), never a spec path. :meth:`from_spec` plans for you."""

    def __init__(self, graph: Graph, plan: Plan, *, timeout: float = 60.0,
                 load_timeout: float = 120.0, max_in_flight: int | None = None,
                 progress: Progress | None = None, retain_memory: bool = True,
                 trust_code: bool = False, export_dir: str | None = None,
                 inventory: Inventory | None = None, keys: ClusterKeys | None = None,
                 coordinator_address: str | None = None, ray_address: str | None = None,
                 ring_bytes: int | None = None, ring_min_bytes: int = INLINE_BYTES,
                 spin_us: int | None = None) -> None:
        """``retain_memory``: keep this process's freed memory for reuse instead of returning
        it to the kernel (see :mod:`fastserve.engine.memory`); it changes glibc's malloc for
        the whole process, and makes merging large outputs several times cheaper.
        ``trust_code``: the ranks may build ``module:`` nodes (the user's code) of the graph.
        ``export_dir``: a verified partition export whose shard files the ranks load (its
        shards must be the plan's stages). ``inventory``: the hosts the plan names; a rank on a
        host whose launcher is ``agent`` starts through that host's agent, which needs the
        cluster's ``keys`` (coordinator role, :func:`fastserve.engine.keys.load_keys`), and
        tcp; this process then binds on ``coordinator_address`` (default: its address on the
        route to the first such host). Ranks on hosts whose launcher is ``ray`` start as Ray
        actors (:mod:`fastserve.engine.raylaunch`) on the cluster at ``ray_address`` (default:
        the one this process is connected to, else ``RAY_ADDRESS`` or 'auto').
        ``ring_bytes``: the shared-memory ring each last-stage rank on this host sends its
        results through (:mod:`fastserve.engine.ring`); None sizes it for two of the plan's
        micro-batches of results, 0 sends them over the socket; a result smaller than
        ``ring_min_bytes`` goes over the socket anyway (cheaper for small results).
        ``spin_us``: how long the ranks and this process poll for a message that is due before
        they sleep (:mod:`fastserve.engine.spin`); None: ``SPIN_US`` on each machine with a
        core for every rank thread it runs, else 0."""
        if not isinstance(graph, Graph) or not isinstance(plan, Plan):
            raise EngineError(f"Deployment(graph, plan) takes a compiled Graph and a Plan, got "
                              f"{type(graph).__name__} and {type(plan).__name__}; "
                              f"Deployment.from_spec(path) plans a spec for you")
        check_plan(plan, graph)
        if spin_us is not None and (type(spin_us) is not int or not 0 <= spin_us <= MAX_SPIN_US):
            raise EngineError(f"spin_us must be an int in [0, {MAX_SPIN_US}], got {spin_us!r}")
        source = graph.spec.source
        if export_dir is None and source is not None and source.factory.startswith("<") and (
                not graph.spec.weights.checkpoint
                or any(graph.node(n).get("program") is None for n in graph.order)):
            raise EngineError(f"graph '{graph.name}' was captured in Python from a live model "
                              f"without a checkpoint, so its ranks have no weights to load: "
                              f"save the model (safetensors.torch.save_model) and capture "
                              f"with weights=WeightsSpec(checkpoint=path), or capture with "
                              f"source=SourceSpec('package.module:factory', kwargs) to build "
                              f"seeded weights (see graphs/gpt2-hf-tiny.yaml)")
        if retain_memory:
            retain_freed_memory()
        self.graph, self.plan = graph, plan
        self.inventory = inventory  # None: every rank on this machine
        self.plan_hash = plan.hash(graph)
        self.export_dir = export_dir
        self.trust_code = trust_code
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.progress = progress or (lambda _msg: None)
        order = [n for nodes in plan.cut for n in nodes]
        self.sharding: Sharding = shards_from_bounds(
            graph, list(itertools.accumulate(len(nodes) for nodes in plan.cut)), "plan",
            order=order)
        # batched inputs: those declared with a symbolic 'batch' first dim
        self.batched = [i.name for i in self.graph.spec.inputs
                        if i.shape and i.shape[0] == "batch"] or \
                       [t.name for t in self.graph.inputs]
        self.max_in_flight = max_in_flight or 2 * plan.per_replica + 1  # per replica
        self._ctx = zmq.Context()
        try:
            self._placement = Placement(self._ctx, plan, inventory, keys,
                                        coordinator_address=coordinator_address,
                                        ray_address=ray_address, progress=self.progress)
        except BaseException:
            self._ctx.term()
            raise
        self.addresses = Addresses(plan.transport, host=self._placement.bind)
        self.ranks: list[Rank | None] = []
        self.ready: dict[int, dict] = {}
        self.stats = RunStats()
        # messages the coordinator received and dropped, by reason: malformed (the wire's
        # reason), "unrequested" (a result for no request in flight), "control"
        self.dropped: Counter = Counter()
        # results taken, by how they came: "ring" (shared memory) or "socket"
        self.received: Counter = Counter()
        secure = plan.transport == "tcp"
        self._keys = KeyPair.new() if secure else None
        self.ring_min_bytes = int(ring_min_bytes)
        self.ring_bytes = ring_size(self.sharding[-1].out_bytes * micro_batch_size(
            plan.batch, plan.replicas, plan.micro_batches)) if ring_bytes is None else ring_bytes
        self._rings: dict[int, Ring] = {}  # last-stage rank -> its result ring
        self._ring_data: dict[int, memoryview] = {}
        self._rank_keys = [KeyPair.new() if secure else None for _ in plan.ranks]
        self._spin = self._spin_windows(spin_us)
        self.spin_us = self._spin[None]  # this process's window
        self._waiter = Waiter(self.spin_us)

    def _spin_windows(self, spin_us: int | None) -> dict[str | None, int]:
        """The polling window of each host's ranks, and of this process (key None): that of
        its machine, which runs the ranks of every host the placement starts here."""
        if spin_us is not None:
            return {None: spin_us, **{r.host: spin_us for r in self.plan.ranks}}
        remote = self._placement.remote

        def machine(host: str) -> str | None:
            """Hosts share a machine when they share an address; None: this one (hosts on
            loopback addresses, such as a test cluster's agents, run here too)."""
            if host not in remote or is_loopback(remote[host].address):
                return None
            return remote[host].address

        # this process is not counted: it mostly waits, and its polling yields the core
        threads: dict[str | None, list[int]] = {None: []}
        cores: dict[str | None, int] = {None: machine_cores()}
        for r in self.plan.ranks:
            m = machine(r.host)
            threads.setdefault(m, []).append(r.threads)
            if m is not None:  # hosts at one address: the fewest cores any of them declares
                cores[m] = min(cores.get(m, remote[r.host].cores), remote[r.host].cores)
        window = {m: spin_window(t, cores[m]) for m, t in threads.items()}
        return {None: window[None], **{r.host: window[machine(r.host)] for r in self.plan.ranks}}

    @classmethod
    def from_spec(cls, spec: str, layout: Layout | None = None, *,
                  dims: Mapping[str, int] | None = None, transport: str = "ipc",
                  micro_batches: int | None = None, batch: int = 8,
                  inventory: Inventory | None = None, trust_code: bool = False,
                  profile: Profile | None = None, **options) -> Deployment:
        """Plan and deploy a spec file, or a partition export directory (its shards are the
        stages). ``layout``, ``micro_batches`` and ``transport`` are constraints to the planner
        (:func:`fastserve.resources.planner.plan`), which plans for ``batch`` samples on
        ``inventory`` (default: this machine), from measured node times when given a
        ``profile`` (``fastserve profile``); ``options`` go to the constructor."""
        layout = layout or Layout()
        graph, cut, export_dir = load_graph(spec, dims, trust_code)
        if cut is not None and layout.stages not in (None, len(cut)):
            raise EngineError(f"the export '{spec}' holds {len(cut)} shards, so it runs as "
                              f"{len(cut)} stages, not {layout.stages}; use --stages "
                              f"{len(cut)} or export again")
        constraints = Constraints(
            replicas=layout.replicas, stages=len(cut) if cut else layout.stages,
            strategy=layout.strategy, threads=layout.threads, cut=cut,
            micro_batches=micro_batches, batch=batch, transport=transport)
        chosen = plan(graph, inventory or local_inventory(), constraints=constraints,
                      profile=profile)
        return cls(graph, chosen, trust_code=trust_code, export_dir=export_dir,
                   inventory=inventory, **options)

    def endpoint(self, rank: int) -> str:
        """Where ``rank``'s data socket is bound (known once it has said hello)."""
        return self._endpoints[rank]

    @property
    def results_endpoint(self) -> str:
        """Where the coordinator's results socket is bound."""
        return self._results_at

    @property
    def layout(self) -> Layout:
        """The plan's shape (replicas, stages, threads of the first rank)."""
        return Layout(self.plan.replicas, self.plan.stages, None, self.plan.ranks[0].threads)

    # --- life cycle --------------------------------------------------------------------------

    def _record(self, stage: int) -> dict:
        """What rank of ``stage`` is sent to build its shard."""
        shard = self.sharding[stage]
        if self.export_dir is not None:
            return {"kind": "export", "dir": self.export_dir, "index": stage}
        return shard_record(self.graph, list(shard.nodes), list(shard.inputs),
                            list(shard.outputs))

    def start(self) -> Deployment:
        """Launch every rank, send each its shard, and wait until each has loaded it. If any
        of it fails, whatever was started is stopped before the error goes on."""
        try:
            self._launch()
            self._await_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        ctx, addr, plan = self._ctx, self.addresses, self.plan
        p = plan.stages
        self._records = [json.dumps(self._record(k)).encode() for k in range(p)]
        keys = self._rank_keys
        public = [k.public if k else None for k in keys]
        last = [public[r.rank] for r in plan.ranks if r.stage == p - 1]
        self._guard = Guard(ctx, self._keys)
        me = self._keys.public if self._keys else None
        self._control = ctx.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES + 64)
        self._guard.serve(self._control, "control", filter(None, public))
        self._control.bind(addr.new("control"))
        control = self._control.getsockopt_string(zmq.LAST_ENDPOINT)
        self._results = ctx.socket(zmq.PULL)
        self._results.setsockopt(zmq.LINGER, 0)
        self._results.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # results are accepted only from the last-stage ranks (on ipc: only this user's)
        self._guard.serve(self._results, "results", filter(None, last))
        self._results.bind(addr.new("results"))
        self._results_at = self._results.getsockopt_string(zmq.LAST_ENDPOINT)
        self._inputs: list[zmq.Socket] = []
        self._endpoints: dict[int, str] = {}  # rank -> where it bound, from its hello
        for r in range(plan.replicas):
            for k in range(p):
                # who may send a rank of this stage data, and whom it sends to
                ups = [me] if k == 0 else [public[u.rank] for u in plan.stage_ranks(r, k - 1)]
                downs = [public[d.rank] for d in plan.stage_ranks(r, k + 1)] if k + 1 < p \
                    else [me]
                for i, rp in enumerate(plan.stage_ranks(r, k)):
                    key = keys[rp.rank]
                    ring = None
                    if k == p - 1 and self.ring_bytes and plan.transport == "ipc" and \
                            self._placement.remote.get(rp.host) is None:  # on this host
                        ring = self._rings[rp.rank] = Ring.create(self.ring_bytes)
                        self._ring_data[rp.rank] = ring.data
                    cfg = RankConfig(
                        rank=rp.rank, stage=k, replica=r,
                        data_in=addr.new(f"r{r}s{k}" + (f"w{i}" if i else "")),
                        control=control, threads=rp.threads, trust_code=self.trust_code,
                        workdir=addr.dir, public_key=key and key.public,
                        secret_key=key and key.secret,
                        upstream_keys=[u for u in ups if u],
                        downstream_keys=[d for d in downs if d],
                        coordinator_key=me, ring_fd=ring and ring.fd,
                        ring_bytes=ring.size if ring else 0,
                        ring_min_bytes=self.ring_min_bytes, spin_us=self._spin[rp.host])
                    self.ranks.append(self._placement.launch(cfg, rp.host, addr.dir))
                    if ring is not None:
                        ring.close_fd()  # the rank holds its own descriptor now
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
            self._inputs.append(sock)  # connected once its first stage says where it is
        for rank in self._placement.place_ray():  # Ray ranks: placed together, all or none
            self.ranks[rank.config.rank] = rank
        self.progress(f"started {len(self.ranks)} ranks ({plan.replicas} replica(s) x "
                      f"{p} stage(s)); sending each its shard")

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.load_timeout
        while len(self.ready) < len(self.ranks):
            self._check_alive()
            if time.monotonic() > deadline:
                missing = [r for r in self.ranks if r.config.rank not in self.ready]
                said = "; ".join(f"rank {r.config.rank} last said: {r.last_words()}"
                                 for r in missing if r.last_words())
                raise RankDeadError(f"{', '.join(r.name for r in missing)} did not load "
                                    f"within {self.load_timeout:.0f} s; is the machine "
                                    f"overloaded?" + (f" ({said})" if said else ""),
                                    rank=missing[0].config.rank)
            if not self._control.poll(100):
                continue
            msg = self._receive_control()
            if msg is None or msg.kind != "control":
                continue
            meta = msg.meta
            rank = meta["rank"]
            if meta.get("event") == "hello" and rank not in self._endpoints:
                self._endpoints[rank] = meta.get("endpoint", "")
                if len(self._endpoints) == len(self.ranks):  # everyone bound: wire and load
                    self._send_loads()
            if meta.get("event") == "failed":
                raise EngineError(f"rank {rank} could not load its shard: "
                                  f"{meta.get('error', 'no reason given')}")
            if meta.get("event") == "ready":
                if meta.get("plan") != self.plan_hash:
                    raise EngineError(f"rank {rank} loaded plan {meta.get('plan')}, not this "
                                      f"deployment's {self.plan_hash}: refused")
                want = list(self.sharding[self.plan.ranks[rank].stage].nodes)
                if meta.get("nodes") != want:
                    raise EngineError(f"rank {rank} holds nodes {meta.get('nodes')}, the plan "
                                      f"gives it {want}: refused")
                self.ready[rank] = meta
                self.progress(f"rank {rank} ready ({meta.get('load_s', 0):.1f} s)")

    def _send_loads(self) -> None:
        """Send each rank its shard, the plan hash and where its output goes (the next
        stage's ranks, or the results socket); connect the inputs to the first stages."""
        plan = self.plan
        public = [k.public if k else None for k in self._rank_keys]
        for rp in plan.ranks:
            record = self._placement.record_for(self.ranks[rp.rank], self._records[rp.stage])
            shard = torch.frombuffer(bytearray(record), dtype=torch.uint8)
            self._control.send_multipart([f"rank{rp.rank}".encode(), *encode(
                "control", meta={**self._load_meta(), "data_out": self._outputs(rp)},
                tensors={"shard": shard})])
        for r, sock in enumerate(self._inputs):  # a widened first stage: served in turn
            for rp in plan.stage_ranks(r, 0):
                self._guard.connect_to(sock, public[rp.rank])
                sock.connect(self._endpoints[rp.rank])

    def _outputs(self, rp: RankPlan) -> list[str]:
        """Where a rank sends its output: the next stage's ranks, or the results socket."""
        if rp.stage + 1 < self.plan.stages:
            return [self._endpoints[d.rank]
                    for d in self.plan.stage_ranks(rp.replica, rp.stage + 1)]
        return [self._results_at]

    def _load_meta(self) -> dict:
        return {"cmd": "load", "plan": self.plan_hash}

    def _receive_control(self) -> Message | None:
        """One message from the control socket, or None (counted in ``dropped``) when it is
        malformed or claims to be from a rank that is not the one that sent it."""
        identity, *frames = self._control.recv_multipart(copy=False)
        try:
            msg = decode(frames)
        except WireError as e:
            self.dropped[e.reason] += 1
            return None
        rank = msg.meta.get("rank")
        if rank is None or identity.bytes != f"rank{rank}".encode() or \
                not 0 <= rank < len(self.ranks):
            self.dropped["control"] += 1
            return None
        return msg

    def stop(self, grace_s: float = 3.0) -> None:
        """Ask every rank to stop, then make sure each process is gone: a rank still there
        after ``grace_s`` seconds is killed."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        control = getattr(self, "_control", None)
        self._placement.quiet()
        for r in self.ranks:
            if control is not None and r is not None and r.alive():
                try:
                    control.send_multipart([f"rank{r.config.rank}".encode(),
                                            *encode("control", meta={"cmd": "stop"})],
                                           flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        self._placement.stop(self.ranks, grace_s)
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.close()
        for s in [control, getattr(self, "_results", None), *getattr(self, "_inputs", [])]:
            if s is not None:
                s.close(linger=0)
        self._ctx.term()
        self.addresses.close()
        for ring in getattr(self, "_rings", {}).values():
            ring.close()

    def refused(self) -> int:
        """Peers refused by authentication on this coordinator's sockets so far (tcp)."""
        guard = getattr(self, "_guard", None)
        return guard.count() if guard is not None else 0

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
                msg = self._receive_control()
                if msg is not None and msg.kind == "reply" and msg.meta["cmd"] == cmd:
                    replies[msg.meta["rank"]] = msg.meta
        silent = [r for r in self.ranks if r.config.rank not in replies]
        if silent:
            self._check_alive()
            raise RankDeadError(f"{', '.join(r.name for r in silent)} did not answer '{cmd}' "
                                f"within {timeout:.0f} s", rank=silent[0].config.rank)
        return replies

    # --- running ---------------------------------------------------------------------------------

    def run(self, inputs: Mapping[str, torch.Tensor], micro_batches: int | None = None
            ) -> dict[str, torch.Tensor]:
        """Run one batch: split over replicas and micro-batches (default: the plan's), merge
        results in order."""
        return self.run_batches([inputs], micro_batches)[0]

    def run_batches(self, batches: Sequence[Mapping[str, torch.Tensor]],
                    micro_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Run several batches as one stream: the micro-batches of batch i+1 enter the pipeline
        while those of batch i drain, so the fill-and-drain bubble is paid once per stream, not
        once per batch. Results come back per batch, merged in order."""
        micro_batches = micro_batches or self.plan.micro_batches
        per_batch: list[list[WorkItem]] = []
        items: list[WorkItem] = []
        for inputs in batches:
            work = plan_work(inputs, self.batched, self.plan.replicas, micro_batches)
            per_batch.append([replace(w, key=len(items) + w.key) for w in work])
            items += per_batch[-1]
        merger = Merger(per_batch)
        # results are merged from where they arrived (a result ring too) before the next one
        for item, tensors in self._stream(items, borrow=True):
            merger.add(item.key, tensors, borrowed=True)
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
        limit = 2 * self.plan.replicas * self.max_in_flight  # results held out of order
        expected = 0
        for item, tensors in self._stream(items, room=lambda: len(done) < limit):
            done[item.key] = tensors
            while expected in done:
                yield done.pop(expected)
                expected += 1

    def _stream(self, items: Iterable[WorkItem], room: Callable[[], bool] = lambda: True,
                borrow: bool = False) -> Iterator[tuple[WorkItem, dict[str, torch.Tensor]]]:
        """Send ``items`` and yield each with its result as results arrive. An item is taken
        from the iterable only when its replica has fewer than ``max_in_flight`` in flight and
        ``room()`` holds: bounded queues, back-pressure up to the caller. ``borrow``: see
        :meth:`Flow.receive`."""
        flow = self.flow()
        source = iter(items)
        upcoming = next(source, None)
        t0 = time.perf_counter()
        try:
            while upcoming is not None or flow.pending:
                while upcoming is not None and room():
                    if flow.send(upcoming) is None:
                        break
                    upcoming = next(source, None)
                if not flow.pending:  # room() only closes while results wait for an earlier one
                    raise EngineError("internal error: no work in flight and no room to send")
                if flow.stalled():
                    self.control("health")  # names a rank that stopped answering
                    raise EngineError(f"no result for {self.timeout:.0f} s although every "
                                      f"rank answers health checks; raise --timeout for "
                                      f"slow runs")
                done = flow.receive(borrow=borrow)
                if done is not None:
                    yield done
        finally:
            flow.release()
            self.stats.seconds += time.perf_counter() - t0

    def flow(self, stats: RunStats | None = None) -> Flow:
        """A new :class:`Flow` of work on this deployment: for callers that send and receive
        on their own schedule (the service) rather than through :meth:`serve`."""
        return Flow(self, stats)

    def _send(self, replica: int, frames: list) -> None:
        """Send to a replica's first stage without blocking past ``timeout``: its queue is full
        only when the rank has stopped taking work, which names it."""
        sock = self._inputs[replica]
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
            if time.monotonic() > deadline:
                self.control("health")
                raise EngineError(f"replica {replica}'s first stage took no work for "
                                  f"{self.timeout:.0f} s although it answers health checks")
            if not sock.poll(100, zmq.POLLOUT):
                self._check_alive()


def load_graph(spec: str, dims: Mapping[str, int] | None = None, trust_code: bool = False
               ) -> tuple[Graph, tuple[tuple[str, ...], ...] | None, str | None]:
    """The graph of a spec file; or of a partition export directory, verified (every path and
    hash) before anything in it is read, with its cut and its real path."""
    if os.path.isdir(spec):
        manifest = load_manifest(spec)
        if not manifest.get("spec"):
            raise EngineError(f"export '{spec}' holds no graph spec (it was made from a graph "
                              f"built in Python); export it from a spec file")
        # parsed from the bytes load_manifest checked, not read again
        graph = compile_graph(exported_spec(manifest, trust_code=trust_code),
                              {**manifest["dims"], **(dims or {})})
        cut = tuple(tuple(s["nodes"]) for s in manifest["shards"])
        return graph, cut, manifest["directory"]
    return compile_graph(load_spec(spec, trust_code=trust_code), dict(dims or {})), None, None
