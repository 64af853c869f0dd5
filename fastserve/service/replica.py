"""One replica of a service: a thread that owns a one-replica :class:`Deployment`, takes
batches from the shared queue when it has room, and supervises its ranks.

* **Batches**: the requests of a batch are concatenated along the batch dim, sent as one work
  item, and the outputs sliced back per request. Up to the deployment's ``max_in_flight`` items
  are in flight, so every stage of a pipeline has work.
* **Supervision**: a dead rank is noticed by the flow within a tenth of a second; a hung one
  (SIGSTOP, a deadlock) by a health check every second that it does not answer within
  ``hang_s`` - 1 s. Either way the requests the replica held go back to the front of the queue
  (another replica, or this one once restarted, runs them again), the deployment is stopped and
  started again with back-off, and after ``restart_budget`` failures in a row without a success
  the replica gives up (the service then says not ready if no replica is left).
* **Draining**: a replica asked to drain takes no new work, answers what it holds, and stops.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from fastserve.engine.coordinator import WorkItem, stage_path
from fastserve.engine.deployment import Deployment
from fastserve.errors import EngineError, RankError, ServiceError
from fastserve.resources.plan import Plan
from fastserve.service.queue import Request, RequestQueue

HEALTH_EVERY_S = 1.0


@dataclass
class Hops:
    """Seconds from the upstream send to a stage's start, summed, and the fastest one."""

    count: int = 0
    total: float = 0.0
    fastest: float = math.inf

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.fastest = min(self.fastest, seconds)


class ReplicaStats:
    """What a replica's flow measured, kept bounded: running sums per stage, not lists."""

    def __init__(self) -> None:
        self.samples = 0
        self.compute: Counter = Counter()  # stage -> seconds
        self.hops: dict[int, Hops] = {}
        self.lock = threading.Lock()

    def add_timings(self, timings: list[dict], sent_at: float) -> None:
        with self.lock:
            for stage, compute, hop in stage_path(timings, sent_at):
                self.compute[stage] += compute
                self.hops.setdefault(stage, Hops()).add(hop)


class Replica(threading.Thread):
    """A replica's life: start, serve, restart on failure, drain, stop."""

    def __init__(self, index: int, start_deployment: Callable[[], Deployment],
                 queue: RequestQueue, batched: list[str], *, hang_s: float,
                 restart_budget: int, attempts: int,
                 on_event: Callable[[str, dict], None] = lambda kind, info: None,
                 plan: Plan | None = None) -> None:
        """``plan``: what each deployment of this replica runs (for status and scaling)."""
        super().__init__(name=f"replica-{index}", daemon=True)
        self.index = index
        self.plan = plan
        self.slot = 0  # which of the service plan's replicas' places it runs on
        self._start_deployment = start_deployment
        self.queue = queue
        self.batched = set(batched)
        self.hang_s, self.restart_budget, self.attempts = hang_s, restart_budget, attempts
        self.on_event = on_event
        self.stats = ReplicaStats()
        self.state = "starting"  # starting | ready | restarting | failed | draining | stopped
        self.restarts = 0
        self.last_error: str | None = None
        self.held = 0  # requests in flight on this replica
        self.busy_s = 0.0  # seconds with work in flight (for its measured throughput)
        self._drain = threading.Event()
        self._halt = threading.Event()
        self.dep: Deployment | None = None
        self._answered = False  # the current deployment has answered a batch
        self._held: dict[int, list[Request]] = {}  # work item key -> its requests

    # --- control from other threads ------------------------------------------------------------

    def drain(self) -> None:
        """Take no new work; stop once what is held is answered."""
        self._drain.set()
        if self.state in ("starting", "ready", "restarting"):
            self.state = "draining"

    def stop(self) -> None:
        """Stop now; held requests go back to the queue."""
        self._drain.set()
        self._halt.set()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # --- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._live()
        finally:  # whatever ended it, its ranks stop and what it held goes back to the queue
            self._shutdown()
            if self.state != "failed":
                self.state = "stopped"

    def _live(self) -> None:
        failures = 0
        # a drained replica ends once its deployment has answered what it held
        while not self._halt.is_set() and (self.dep is not None or not self._drain.is_set()):
            try:
                if self.dep is None:
                    self.dep = self._start_deployment()
                    # state first, then the flag: drain() sets the flag, then the state, so
                    # either order of the two threads ends in "draining"
                    self.state = "ready"
                    if self._drain.is_set():
                        self.state = "draining"
                    self.on_event("ready", {"replica": self.index})
                if self._serve():
                    failures = 0
                if self._drain.is_set():
                    break
            except Exception as e:  # noqa: BLE001 (a replica that dies silently strands work)
                if self._answered:  # the failed deployment had served: a new run of failures
                    failures = 0
                    self._answered = False
                failures += 1
                self._failed(e)
                if self._drain.is_set():  # going away anyway: not a restart, not a failure
                    break
                if failures > self.restart_budget:
                    self.state = "failed"
                    self.on_event("failed", {"replica": self.index, "error": str(e)})
                    break
                self.restarts += 1
                self.state = "restarting"
                if self._drain.is_set():
                    self.state = "draining"
                    break
                self.on_event("restart", {"replica": self.index, "error": str(e)})
                # back-off: 0.25, 0.5, 1, 2, 4 s, then 5 s
                self._halt.wait(min(5.0, 0.25 * 2 ** (failures - 1)))

    def _serve(self) -> bool:
        """Serve until asked to stop or drained; True if at least one batch was answered."""
        dep = self.dep
        flow = dep.flow(self.stats)
        self._held = {}
        self._answered = False
        keys = iter(range(1 << 62))
        answered = False
        last_health = time.monotonic()
        busy_since = None
        while not self._halt.is_set():
            room = flow.pending < dep.max_in_flight and not self._drain.is_set()
            if room:
                # an idle replica takes what is there at once: waiting for a fuller batch
                # only pays while earlier work keeps it busy anyway
                batch = self.queue.take(0.0 if flow.pending else 0.05, eager=not flow.pending)
                if batch:
                    self._send(flow, next(keys), batch)
                    busy_since = busy_since or time.monotonic()
                    continue  # fill the pipeline before waiting on results
            if flow.pending:
                try:
                    done = flow.receive(wait_ms=2 if room else 50)
                except RankError as e:  # the rank lives; the work it raised on is answered
                    self._answer_error(e)
                    continue
                if done is not None:
                    self._answer(*done)
                    answered = self._answered = True
                if not flow.pending and busy_since is not None:
                    self.busy_s += time.monotonic() - busy_since
                    busy_since = None
            elif self._drain.is_set():
                return answered
            if flow.stalled():  # alive and answering health, yet no result for a deadline
                raise EngineError(f"no result for {dep.timeout:.0f} s although the ranks "
                                  f"answer health checks (limits.deadline_s)")
            if time.monotonic() - last_health >= HEALTH_EVERY_S:
                # a rank that does not answer (stopped, deadlocked) raises RankDeadError here
                dep.control("health", timeout=max(0.5, self.hang_s - HEALTH_EVERY_S))
                last_health = time.monotonic()
        return answered

    def _send(self, flow, key: int, batch: list[Request]) -> None:
        tensors = {name: (torch.cat([r.inputs[name] for r in batch]) if name in self.batched
                          and len(batch) > 1 else batch[0].inputs[name])
                   for name in batch[0].inputs}
        samples = sum(r.samples for r in batch)
        now = time.monotonic()
        for r in batch:
            r.taken = now
        self._held[key] = batch
        self.held += len(batch)
        flow.send(WorkItem(key, 0, tensors, samples))

    def _answer(self, item: WorkItem, outputs: dict[str, torch.Tensor]) -> None:
        batch = self._held.pop(item.key)
        self.held -= len(batch)
        self.queue.answered(item.samples, batch[0].taken)
        lo = 0
        for r in batch:
            hi = lo + r.samples
            # outputs are batched along dim 0, like the inputs they come from
            r.answer({k: v[lo:hi] if len(batch) > 1 else v for k, v in outputs.items()})
            lo = hi
        self.on_event("batch", {"replica": self.index, "requests": len(batch),
                                "samples": item.samples})

    def _answer_error(self, e: RankError) -> None:
        batch = self._held.pop(e.item.key, []) if e.item is not None else []
        self.held -= len(batch)
        for r in batch:
            r.fail(ServiceError(f"the model failed on this request: {e}", 500))

    def _failed(self, error: Exception) -> None:
        """The deployment failed: put back what it held (or fail it after ``attempts`` runs),
        stop its ranks."""
        self.last_error = str(error)
        again = []
        for r in self._take_held():
            r.attempts += 1
            if r.attempts >= self.attempts:
                r.fail(ServiceError(f"a replica failed {r.attempts} times while running this "
                                    f"request; last: {error}", 503))
            elif not r.ended:
                again.append(r)
        self.queue.requeue(again)
        self._shutdown(grace_s=0.2)

    def _take_held(self) -> list[Request]:
        """The requests in flight on this replica, in order, which it no longer holds."""
        held = [r for batch in self._held.values() for r in batch]
        self._held = {}
        self.held = 0
        return held

    def _shutdown(self, grace_s: float = 3.0) -> None:
        if self.dep is not None:
            # stopped with work in flight: someone else runs it
            self.queue.requeue(self._take_held())
            try:
                self.dep.stop(grace_s)
            finally:
                self.dep = None
