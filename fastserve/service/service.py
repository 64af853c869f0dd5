"""A service: a model deployed as replicas that are kept serving.

    with Service(ServiceConfig(spec="graphs/mlp.yaml", replicas=Replicas(min=2))) as svc:
        outputs = svc.infer({"x": torch.randn(1, 64)})     # from any thread
        future = svc.submit({"x": torch.randn(4, 64)})      # concurrent.futures.Future

The graph is planned once for one replica (its stages, cut and threads); every replica is a
:class:`Replica` thread running that plan on its own ranks, all fed from one bounded
:class:`RequestQueue`. An allocation policy (:mod:`fastserve.resources.policies`) looks at the
load every ``replicas.interval_s`` and the service starts replicas or drains them to follow it.
The HTTP front (:mod:`fastserve.service.http`) is a thin layer over this object.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from concurrent.futures import Future
from typing import Callable, Mapping

import torch

from fastserve.engine.deployment import Deployment, load_graph
from fastserve.engine.keys import load_keys
from fastserve.errors import InputsError, ServiceConfigError, ServiceError
from fastserve.generate import Sampling, kv_budget, max_positions
from fastserve.generate.loop import refusal
from fastserve.generate.model import language_model
from fastserve.generate.text import load_tokenizer
from fastserve.graph.inputs import check_inputs
from fastserve.resources.inventory import Inventory, load_inventory, local_inventory
from fastserve.resources.plan import Plan, load_plan
from fastserve.resources.planner import Constraints, plan
from fastserve.resources.policies import Dynamic, Hybrid, Observation, Policy, State, Static
from fastserve.resources.widening import layout_for, speedup, with_widths
from fastserve.service.config import ServiceConfig
from fastserve.service.metrics import Metrics
from fastserve.service.generation import Completion, GenerationReplica, Sink
from fastserve.service.queue import Request, RequestQueue, shape_key
from fastserve.service.replica import Replica

Progress = Callable[[str], None]


def replica_plan(full: Plan, replica: int) -> Plan:
    """Replica ``replica`` of ``full`` as a plan of one replica: its ranks, hosts and threads,
    renumbered from 0 (the cut, the widths and the predictions are the same for every
    replica)."""
    n = full.per_replica
    ranks = tuple(replace(r, rank=k, replica=0)
                  for k, r in enumerate(full.ranks[replica * n:(replica + 1) * n]))
    return replace(full, replicas=1, ranks=ranks, mode="single" if n == 1 else "model",
                   alternatives=())


def _ranks_of(replica: Replica) -> list[dict]:
    dep = replica.dep  # once: its thread sets it to None when the deployment stops
    return [{"rank": k.config.rank, "name": k.name} for k in (dep.ranks if dep else [])
            if k is not None]


def make_policy(cfg: ServiceConfig) -> Policy:
    r = cfg.replicas
    if r.policy == "static":
        return Static(r.min)
    if r.policy == "dynamic":
        return Dynamic(max(1, r.min), r.max, cooldown=r.cooldown, patience=r.patience)
    return Hybrid(max(1, r.min), r.max, cooldown=r.cooldown, patience=r.patience)


class Service:
    def __init__(self, config: ServiceConfig, *, inventory: Inventory | None = None,
                 keys=None, progress: Progress | None = None) -> None:
        """``inventory`` and ``keys`` (Python callers) stand for the config's ``hosts`` and
        ``keys`` files."""
        self.config = config
        self.progress = progress or (lambda _msg: None)
        self.generating = config.generation.enabled
        self._cleanup = ExitStack()  # a captured LM's rewrite, kept until the replicas stop
        try:
            self._load(config, inventory, keys)
        except BaseException:  # nothing started: the rewrite's files go now
            self._cleanup.close()
            raise

    def _kv_positions(self, config: ServiceConfig) -> int | None:
        """Generation: the KV positions the planner keeps room for on every stage, one
        micro-batch of sequences at the most new tokens a request may ask for (prompts take
        what is left over: each rank's cache budget is all its host's memory it does not
        need otherwise)."""
        g = config.generation
        return g.max_seqs * g.max_tokens if self.generating else None

    def _load(self, config: ServiceConfig, inventory: Inventory | None, keys) -> None:
        """The graph, hosts, keys, plan, queue and policy of ``config``."""
        if self.generating:  # a causal LM: completions instead of tensors
            self.graph, cut, self.export_dir = language_model(
                config.spec, config.trust_code, self._cleanup, self.progress, config.plan)
        else:
            self.graph, cut, self.export_dir = load_graph(config.spec, None, config.trust_code)
        if inventory is None and config.hosts:
            inventory = load_inventory(config.hosts)
        if keys is None and config.keys:
            keys = load_keys(config.keys, "coordinator")
        self.inventory, self.keys = inventory, keys
        elsewhere = [h.name for h in (inventory.hosts if inventory else ())
                     if h.launcher != "local"]
        transport = config.transport or ("tcp" if elsewhere else "ipc")
        if elsewhere and transport == "ipc":
            raise ServiceConfigError(f"hosts {', '.join(elsewhere)} are other machines, "
                                     f"reached over tcp, not ipc", key="transport")
        b = config.batching
        if config.plan:
            self.plan = load_plan(config.plan, self.graph)
        else:
            objective = "decode" if self.generating else "throughput"
            self.plan = plan(self.graph, inventory or local_inventory(), objective, Constraints(
                replicas=max(1, config.replicas.min), stages=len(cut) if cut else config.stages,
                threads=config.threads, cut=cut, batch=b.max_batch, micro_batches=1,
                transport=transport, kv_positions=self._kv_positions(config)))
        # each replica of the plan runs as a one-replica plan of its own; replicas beyond the
        # plan's (scaling up) reuse its replicas' places in turn
        self.replica_plans = [replica_plan(self.plan, r) for r in range(self.plan.replicas)]
        # stage widening (fastserve.resources.widening): the load is met in the fewest ranks,
        # by ranks for the bottleneck stage where they pay more than replicas (the config
        # refuses it for generation, whose KV caches pin a sequence to one rank per stage)
        self.widen = config.replicas.widen and self.plan.stages > 1
        first = self.replica_plans[0]
        self.widths = tuple(first.width(k) for k in range(first.stages))  # of new replicas
        self.batched = [i.name for i in self.graph.spec.inputs
                        if i.shape and i.shape[0] == "batch"]
        if self.generating:
            for p in self.replica_plans:  # a rank without room for KV is named now
                kv_budget(p, inventory)
            self.tokenizer = load_tokenizer(config.generation.tokenizer)
            self.max_len = max_positions(self.graph)
            self.vocab = self.graph.spec.inputs[0].high
        agents = sorted({r.host for r in self.plan.ranks
                         if inventory and inventory.host(r.host).launcher == "agent"})
        if agents and keys is None:  # refused now, not by every replica's start in turn
            raise ServiceConfigError(f"hosts {', '.join(agents)} start their ranks through "
                                     f"their agents: give the cluster keys (--keys DIR; make "
                                     f"them with: fastserve keys new DIR)", key="keys")
        mergeable = len(self.batched) == len(self.graph.spec.inputs)
        lim = config.limits
        self.queue = RequestQueue(lim.max_queue, b.max_batch, b.max_wait_ms / 1000, mergeable,
                                  budget_s=(lim.queue_budget_ms / 1000 or lim.deadline_s))
        self.replicas: list[Replica] = []
        # replicas of the previous widths, serving until those of the new widths are ready
        self._retiring: list[Replica] = []
        self.policy = Static(self.plan.replicas) if config.plan and \
            config.replicas.policy == "static" else make_policy(config)
        self.max_replicas = max(config.replicas.max, config.replicas.min,
                                self.plan.replicas if config.plan else 1)
        self.policy_state: State | None = None
        self.outcomes: Counter = Counter()
        self.events: list[dict] = []  # the last scale and restart events, for status
        self._lock = threading.Lock()
        self._counting = threading.Lock()
        self._withdrawing = threading.Lock()
        self._stopping = threading.Event()
        self._arrived = 0  # samples admitted, for the policy's demand
        self._next_index = 0
        self._retired: Counter = Counter()  # stage seconds of replicas that ended
        self._retired_restarts = 0
        self.metrics = Metrics(lambda: len(self.queue), lambda: len(self.ready_replicas()),
                               self._stage_seconds)
        self.started_at = time.time()

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, wait_s: float = 120.0) -> Service:
        """Start the policy's first replicas and wait until at least one is ready."""
        self.policy_state = self.policy.start()
        self.scale(self.policy_state.replicas, reason="start")
        deadline = time.monotonic() + wait_s
        while not self.ready:
            if all(r.state == "failed" for r in self.replicas):
                errors = "; ".join(sorted({r.last_error or "?" for r in self.replicas}))
                self.stop(drain=False)
                raise ServiceError(f"no replica could start: {errors}", 503)
            if time.monotonic() > deadline:
                self.stop(drain=False)
                raise ServiceError(f"no replica was ready within {wait_s:.0f} s", 503)
            time.sleep(0.05)
        threading.Thread(target=self._maintain, name="service-maintenance", daemon=True).start()
        return self

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop admitting; with ``drain``, answer what was admitted first (up to ``timeout``
        seconds); then stop every replica. Whatever is left gets a 503."""
        with self._lock:  # once set, scale() starts nothing: these are all the replicas
            if self._stopping.is_set():
                return
            self._stopping.set()
            replicas = list(self.replicas)
        self.queue.close("the service is stopping")
        if drain:
            deadline = time.monotonic() + timeout
            while (len(self.queue) or any(r.held for r in replicas)) and \
                    any(r.state in ("ready", "restarting", "starting") for r in replicas) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
        for r in replicas:
            r.stop()
        for r in replicas:
            r.join(timeout=30)
        self.queue.drain(ServiceError("the service stopped before a replica took the request",
                                      503))
        self._cleanup.close()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(drain=exc[0] is None)

    # --- requests ------------------------------------------------------------------------------

    def submit(self, inputs: Mapping[str, torch.Tensor]) -> Future:
        """Admit one request; its future gets the outputs or a :class:`ServiceError`.
        Raises :class:`InputsError` (inputs that do not fit the graph) or ServiceError 503
        (overloaded, stopping) at once."""
        inputs = dict(inputs)
        if self.generating:
            raise ServiceError("this service generates text: POST /v1/completions", 404)
        try:
            check_inputs(self.graph, inputs)
        except InputsError:
            self.count_outcome("invalid")
            raise
        samples = next((inputs[n].shape[0] for n in self.batched), 1)
        request = Request(inputs, samples, shape_key(inputs, set(self.batched)),
                          time.monotonic() + self.config.limits.deadline_s)
        try:
            self.queue.put(request)
        except ServiceError:
            self.count_outcome("overloaded")
            raise
        with self._lock:
            self._arrived += samples
        request.future.add_done_callback(lambda f, r=request: self._finished(r, f))
        return request.future

    def admits(self) -> None:
        """Raise the 503 (counted) that :meth:`submit` would raise now for being overloaded
        or stopping, before the caller spends anything on reading the request."""
        try:
            self.queue.admits()
        except ServiceError:
            self.count_outcome("overloaded")
            raise

    def complete(self, prompt: list[int], sink: Sink, max_tokens: int = 16,
                 sampling: Sampling = Sampling(), eos: tuple[int, ...] = ()) -> Completion:
        """Admit one generation; ``sink(kind, value)`` gets each token as it comes
        (``"token"``, id), then ``("done", reason)`` or ``("error", ServiceError)``, from a
        replica's thread. Raises ServiceError 400 (a request the model cannot run) or 503
        (overloaded, stopping) at once."""
        if not self.generating:
            raise ServiceError("this service runs /v1/infer; generation is off "
                               "(generation.enabled)", 404)
        limit = self.config.generation.max_tokens
        problem = refusal(prompt, max_tokens, self.vocab, self.max_len)
        if not problem and max_tokens > limit:
            problem = f"max_tokens must be at most {limit} (generation.max_tokens)"
        if problem:
            self.count_outcome("invalid")
            raise ServiceError(problem, 400)

        def counted(kind: str, value) -> None:
            if kind == "token":
                self.metrics.tokens.inc()
                if len(completion.sent) == 1:
                    self.metrics.first_token.observe(completion.first_token -
                                                     completion.accepted)
            elif kind == "done" and completion.gone:
                self.count_outcome("cancelled")
            elif kind == "done":
                self.count_outcome("ok")
                self.metrics.latency.observe(time.monotonic() - completion.accepted)
                if completion.taken is not None:
                    self.metrics.queue_seconds.observe(completion.taken - completion.accepted)
            else:
                self.count_outcome("timeout" if value.status == 504 else "error")
            sink(kind, value)

        completion = Completion(list(prompt), max_tokens, sampling, eos,
                                time.monotonic() + self.config.limits.deadline_s, counted)
        try:
            self.queue.put(completion)
        except ServiceError:
            self.count_outcome("overloaded")
            raise
        with self._lock:
            self._arrived += max_tokens
        return completion

    def count_outcome(self, outcome: str) -> None:
        """Count one request's outcome (ok, invalid, overloaded, timeout, error, cancelled:
        a completion whose caller went away)."""
        with self._counting:  # from the event loop and every replica's thread
            self.outcomes[outcome] += 1
        self.metrics.requests.labels(outcome).inc()

    def infer(self, inputs: Mapping[str, torch.Tensor], timeout: float | None = None
              ) -> dict[str, torch.Tensor]:
        """Submit and wait for the outputs."""
        return self.submit(inputs).result(timeout)

    def withdraw(self, future: Future, outcome: str = "cancelled") -> bool:
        """Give up a request :meth:`submit` admitted: its caller no longer waits for it
        (``outcome``: cancelled, the caller went away; timeout, it waited too long). A
        withdrawn request still queued is never run. False if it already had its answer."""
        # not under _counting: cancel() runs the future's callbacks here, and the queue's takes
        # that lock's reverse order (its lock, then _counting through _finished)
        with self._withdrawing:  # (cancel() is True again on a cancelled future: count once)
            if future.cancelled() or not future.cancel():
                return False
        self.count_outcome(outcome)
        return True

    def _finished(self, request: Request, future: Future) -> None:
        if future.cancelled():  # withdrawn, and counted then
            return
        error = future.exception()
        if error is None:
            outcome = "ok"
            self.metrics.latency.observe(time.monotonic() - request.accepted)
            if request.taken is not None:
                self.metrics.queue_seconds.observe(request.taken - request.accepted)
        else:
            outcome = "timeout" if getattr(error, "status", 0) == 504 else "error"
        self.count_outcome(outcome)

    # --- replicas ------------------------------------------------------------------------------

    def _deploy(self, plan: Plan) -> Deployment:
        # one batch per rank plus one waiting at the first keeps every rank busy; more in
        # flight would only hold requests at the ranks, where they can no longer join a batch
        # and where admission does not see them. Nothing polls (engine.spin): this process's engine
        # threads would hold the interpreter the HTTP front needs (measured: the front's
        # overhead grew), and replicas deployed one by one cannot count each other's cores
        dep = Deployment(self.graph, plan,
                         trust_code=self.config.trust_code,
                         export_dir=self.export_dir, inventory=self.inventory, keys=self.keys,
                         timeout=self.config.limits.deadline_s, retain_memory=False,
                         max_in_flight=plan.per_replica + 1, spin_us=0)
        return dep.start()

    def _event(self, kind: str, info: dict) -> None:
        if kind == "batch":
            self.metrics.batch_samples.observe(info["samples"])
            return
        if kind == "restart":
            self.metrics.restarts.inc()
        with self._lock:
            self.events = [*self.events[-49:], {"at": time.time(), "event": kind, **info}]
        if kind == "scale":
            self.progress(f"scaling from {info['from']} to {info['to']} replica(s) "
                          f"({info['reason']})")
        else:
            self.progress(f"replica {info['replica']}: {kind}"
                          + (f" ({info['error']})" if "error" in info else ""))

    def running_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in ("starting", "ready", "restarting")]

    def ready_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.ready]

    @property
    def ready(self) -> bool:
        """Every replica the service means to run is loaded and answering (a replica that
        restarts, or that gave up after its restart budget, makes the service not ready).
        While new widths start, the replicas of the old ones are what it runs."""
        wanted = self._retiring or [r for r in self.replicas
                                    if r.state not in ("draining", "stopped")]
        return bool(wanted) and all(r.ready for r in wanted) and not self._stopping.is_set()

    def layout(self, units: int) -> tuple[int, tuple[int, ...]]:
        """How the service runs ``units`` replicas' worth of load: (replicas, widths)."""
        if self.widen:
            return layout_for(self.replica_plans[0], units)
        return units, self.widths

    def scale(self, units: int, reason: str = "manual") -> int:
        """Run ``units`` replicas' worth: start replicas, or drain the newest (a drained
        replica answers what it holds before its ranks stop). With widening, the load is met
        by :meth:`layout`; new widths start a new set of replicas, and the old set serves
        until the new one is ready. Returns the number asked for."""
        limit = self.max_replicas
        if not 1 <= units <= limit:
            raise ServiceError(f"replicas must be between 1 and {limit} "
                               f"(replicas.max), not {units}", 400)
        with self._lock:
            if self._stopping.is_set():
                raise ServiceError("the service is stopping", 503)
            replicas, widths = self.layout(units)  # (widening may have just been given up)
            # ended replicas go, failed ones too: the replicas started below replace them
            self._forget([r for r in self.replicas if not r.is_alive()])
            current = self._current()
            before = (len(current), self.widths)
            if widths != self.widths:
                if self._retiring and widths == self._widths_of(self._retiring[0]):
                    # back to the widths still serving: the set that was starting goes
                    for r in current:
                        r.drain()
                    running = self.running_replicas()
                    current = [r for r in self._retiring if r in running]
                    self._retiring = []
                else:  # a new set; the serving one goes once the new one is ready
                    if self._retiring:  # a set that never took over is replaced
                        for r in current:
                            r.drain()
                    else:
                        self._retiring = current
                    current = []
                self.widths = widths
            for r in current[replicas:]:
                r.drain()
            for _ in range(replicas - len(current)):
                self._start_replica()
        if before != (replicas, widths):
            self._event("scale", {"replica": "all", "from": before[0], "to": replicas,
                                  "widths": list(widths), "reason": reason})
        return units

    def _forget(self, ended: list[Replica]) -> None:
        """Drop ``ended`` replicas from the list, keeping what they counted (under the
        lock)."""
        for r in ended:
            self._retired.update(self._seconds_of(r))
            self._retired_restarts += r.restarts
        self.replicas = [r for r in self.replicas if r not in ended]

    @staticmethod
    def _widths_of(replica: Replica) -> tuple[int, ...]:
        return tuple(replica.plan.width(k) for k in range(replica.plan.stages))

    def _current(self) -> list[Replica]:
        """The running replicas of the current widths."""
        return [r for r in self.running_replicas() if r not in self._retiring]

    def _start_replica(self) -> None:
        lim = self.config.limits
        index = self._next_index
        live = [r for r in self.replicas if r.is_alive() and r.state != "failed"]
        # the place of the plan's replica that the fewest staying replicas use
        used = Counter(r.slot for r in live if r.state != "draining")
        slot = min(range(len(self.replica_plans)), key=lambda k: (used[k], k))
        # an added rank of a widened stage goes where the live replicas (draining ones too:
        # their ranks hold cores until they end) leave room
        busy = tuple(k for r in live for k in r.plan.ranks)
        plan = with_widths(self.replica_plans[slot], self.widths, self.inventory, busy)
        kind, extra = Replica, {}
        if self.generating:
            g = self.config.generation
            kind = GenerationReplica
            extra = {"scheduler": g.scheduler, "max_seqs": g.max_seqs}
        rep = kind(index, lambda p=plan: self._deploy(p), self.queue, self.batched,
                   hang_s=lim.hang_s, restart_budget=lim.restart_budget,
                   attempts=lim.attempts, on_event=self._event, plan=plan, **extra)
        rep.slot = slot
        self._next_index += 1
        self.replicas.append(rep)
        rep.start()

    def _finish_widening(self) -> None:
        """Once every replica of the new widths is ready, drain the old ones. If none of the
        new ones could start, go back to the old widths, which still serve, and stop widening
        (the policy then scales by replicas)."""
        info: dict = {"replica": "all"}
        with self._lock:
            if not self._retiring:
                return
            current = self._current()
            if current and all(r.ready for r in current):
                for r in self._retiring:
                    r.drain()
                event = "widened"
            elif not current:
                failed = [r for r in self.replicas if r.state == "failed"
                          and r not in self._retiring]
                self._forget(failed)
                self.widths = self._widths_of(self._retiring[0])
                self.widen = False
                event = "widening failed"
                info["error"] = next((r.last_error for r in failed if r.last_error), "?")
            else:
                return
            self._retiring = []
        self._event(event, {**info, "widths": list(self.widths)})

    def _maintain(self) -> None:
        """Every tenth of a second, answer 504 to requests past their deadline (no replica may
        be left to take them); every ``replicas.interval_s``, one step of the policy."""
        interval = self.config.replicas.interval_s
        scaling = self.config.replicas.policy != "static"
        next_step = time.monotonic() + interval
        while not self._stopping.wait(min(0.1, interval)):
            self.queue.expire()
            try:  # deadlines depend on this loop: a failed step is reported, not fatal
                self._finish_widening()
                if scaling and time.monotonic() >= next_step:
                    next_step += interval
                    self._autoscale_step(interval)
            except Exception as e:  # noqa: BLE001
                if not self._stopping.is_set():
                    self.progress(f"a maintenance step failed: {type(e).__name__}: {e}")

    def _autoscale_step(self, interval: float) -> None:
        """The load as demand in replicas, one policy step, scale to it."""
        with self._lock:
            arrived, self._arrived = self._arrived, 0
        running = self.running_replicas()
        # one replica's throughput, from the samples it ran and the time it had work; a
        # widened replica's samples count as the unwidened replicas' worth they are
        base, replicas = self.replica_plans[0], list(self.replicas)
        samples = sum(r.stats.samples / speedup(base, self._widths_of(r)) for r in replicas)
        busy = sum(r.busy_s for r in replicas)
        rate = samples / busy if busy > 0 else None
        demand = (arrived / interval) / rate if rate else float(bool(len(self.queue)))
        if len(self.queue) > self.config.batching.max_batch * max(1, len(running)):
            # a backlog grows: more than we have (in replicas' worth when widening)
            have = self.policy_state.replicas if self.widen else len(running)
            demand = max(demand, have + 1)
        state = self.policy.step(self.policy_state, Observation(
            demand, self.max_replicas))
        self.policy_state = state
        if self.layout(state.replicas) != (len(self._current()), self.widths) and \
                not self._stopping.is_set():
            self.scale(state.replicas, reason=f"{self.config.replicas.policy} policy, "
                                              f"demand {demand:.2f} replicas")

    @staticmethod
    def _seconds_of(replica: Replica) -> Counter:
        out: Counter = Counter()
        with replica.stats.lock:
            for stage, s in replica.stats.compute.items():
                out[(stage, "compute")] += s
            for stage, hops in replica.stats.hops.items():
                # the fastest hop is the transfer, the rest of each hop time queued at the rank
                # (clocks cannot tell them apart per message; as RunStats does)
                transfer = hops.count * hops.fastest
                out[(stage, "transfer")] += transfer
                out[(stage, "queue")] += hops.total - transfer
        return out

    def _stage_seconds(self) -> dict[tuple[int, str], float]:
        """Seconds per (stage, kind) over every replica this service ran (counters never go
        back when a drained replica is forgotten)."""
        out = Counter(self._retired)
        for r in list(self.replicas):
            out.update(self._seconds_of(r))
        return dict(out)

    def status(self) -> dict:
        """Plan, replicas and their ranks, load and restarts, as JSON values."""
        with self._lock:
            events = list(self.events)
        return {
            "ready": self.ready,
            "graph": self.graph.name,
            "plan": {"hash": self.plan.hash(self.graph), "stages": self.plan.stages,
                     "threads": [r.threads for r in self.plan.ranks],
                     "hosts": [r.host for r in self.plan.ranks]},
            "policy": self.config.replicas.policy,
            "widen": self.widen,
            "widths": list(self.widths),
            "replicas": [{"index": r.index, "state": r.state, "held": r.held,
                          "widths": list(self._widths_of(r)),
                          "hosts": [k.host for k in r.plan.ranks],
                          "restarts": r.restarts, "last_error": r.last_error,
                          "ranks": _ranks_of(r)}
                         for r in list(self.replicas)],
            "generation": {"scheduler": self.config.generation.scheduler,
                           "max_seqs": self.config.generation.max_seqs,
                           "tokenizer": self.tokenizer.name} if self.generating else None,
            "queue": len(self.queue),
            "requests": dict(self.outcomes),
            "restarts": self._retired_restarts + sum(r.restarts for r in self.replicas),
            "uptime_s": time.time() - self.started_at,
            "events": events[-10:],
        }
