"""A flow: work in flight on a :class:`~fastserve.engine.deployment.Deployment`, sent one item at
a time and matched, result by result, to what is still in flight.

The coordinator's receive path lives here: a result comes over the results socket or, from a
last-stage rank on this host, as a header whose tensors sit in that rank's result ring
(:mod:`fastserve.engine.ring`); either way it is taken only for this flow's request and a
micro-batch it sent.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

import torch

from fastserve.engine.coordinator import RunStats, WorkItem
from fastserve.engine.ring import Ring
from fastserve.engine.wire import WireError, decode, encode
from fastserve.errors import RankError

if TYPE_CHECKING:
    from fastserve.engine.deployment import Deployment


class Flow:
    """Work in flight on a deployment, sent and received one item at a time.

    Every result is matched to this flow's unguessable request id and to a micro-batch key
    still in flight, so a straggler of an earlier, failed or abandoned flow is dropped (counted
    as "unrequested"), never taken for an answer. Not thread-safe: one thread owns a flow, as it
    owns the deployment's sockets."""

    def __init__(self, dep: Deployment, stats: RunStats | None = None) -> None:
        """``stats`` receives each result's timings and samples (default: the deployment's
        :class:`RunStats`, which keeps every timing: a long-running caller passes its own)."""
        self.dep = dep
        self.stats = stats if stats is not None else dep.stats
        self.request = secrets.randbits(62)
        self.in_flight = [0] * dep.plan.replicas
        self.sent: dict[int, tuple[WorkItem, int, float]] = {}  # key -> item, replica, sent at
        self.last_progress = time.monotonic()
        self._lent: tuple[Ring, int] | None = None  # a borrowed result's ring and end

    @property
    def pending(self) -> int:
        """Items sent whose result has not come back."""
        return len(self.sent)

    def send(self, item: WorkItem) -> int | None:
        """Send ``item`` to its replica (None: the least loaded); the replica it went to, or
        None when that replica already has ``max_in_flight`` items in flight."""
        replica = item.replica if item.replica is not None else \
            min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        if self.in_flight[replica] >= self.dep.max_in_flight:
            return None
        if not self.sent:  # the clock for "no progress" starts with the first item in flight
            self.last_progress = time.monotonic()
        self.sent[item.key] = (item, replica, time.time())
        self.dep._send(replica, encode("data", request=self.request, micro=item.key,
                                       tensors=item.tensors, meta=item.meta))
        self.in_flight[replica] += 1
        return replica

    def stalled(self) -> bool:
        """Work is in flight and no result has come for the deployment's ``timeout``."""
        return bool(self.sent) and time.monotonic() - self.last_progress > self.dep.timeout

    def release(self) -> None:
        """Give a borrowed result's bytes back to its ring (see :meth:`receive`)."""
        if self._lent is not None:
            ring, end = self._lent
            self._lent = None
            ring.release(end)

    def receive(self, wait_ms: int = 100, borrow: bool = False
                ) -> tuple[WorkItem, dict[str, torch.Tensor]] | None:
        """The next result of this flow, waiting up to ``wait_ms``; None if none came. A rank
        that died raises :class:`RankDeadError`, a rank that raised :class:`RankError`.

        A result that came through a shared-memory ring is copied out of it, unless
        ``borrow``: then its tensors view the ring until the next :meth:`receive` or
        :meth:`release` (a caller that merges each result at once saves the copy)."""
        self.release()
        dep = self.dep
        # a result due: poll for a moment before sleeping (engine.spin)
        ready = dep._waiter.wait(dep._results.poll, wait_ms) if self.sent else \
            dep._results.poll(wait_ms)
        # junk that keeps arriving must not postpone the liveness check: once a tenth of a
        # second has passed without a result of ours, every wake-up checks the ranks
        if not ready or time.monotonic() - self.last_progress > 0.1:
            dep._check_alive()
        if not ready:
            return None
        try:
            msg = decode(dep._results.recv_multipart(copy=False), dep._ring_data)
        except WireError as e:
            dep.dropped[e.reason] += 1
            return None
        shm = msg.meta.get("shm")
        ring = dep._rings[shm[0]] if shm is not None else None  # (decode checked the id)
        if msg.request != self.request or msg.micro not in self.sent or \
                msg.kind not in ("data", "error"):
            dep.dropped["unrequested"] += 1
            if ring is not None:  # a straggler of an earlier run: its bytes are free again
                try:
                    ring.take(shm[1])
                    ring.release(shm[1])
                except WireError:
                    pass
            return None
        self.last_progress = time.monotonic()
        item, replica, at = self.sent.pop(msg.micro)
        self.in_flight[replica] -= 1
        if ring is not None:
            try:  # (decode checked that the ring is a last-stage rank's)
                if dep.plan.ranks[shm[0]].replica != replica:
                    raise WireError(f"ring {shm[0]} is not replica {replica}'s", "shm")
                ring.take(shm[1])
            except WireError as e:  # a rank out of step with its ring: name it, do not wait
                dep.dropped[e.reason] += 1
                error = RankError(f"micro-batch {msg.micro}'s result is not a valid message "
                                  f"of its result ring: {e}", rank=shm[0])
                error.item = item
                raise error from None
        if msg.kind == "error":
            err = msg.meta.get("error", {})
            error = RankError(err.get("message", "unknown error"), rank=err.get("rank"),
                              stage=err.get("stage"), node=err.get("node"))
            error.item = item  # the work that failed; the rest of the flow goes on
            raise error
        self.stats.add_timings(msg.meta.get("timings", []), at)
        self.stats.samples += item.samples
        dep.received["ring" if shm is not None else "socket"] += 1
        if shm is not None:
            self._lent = (ring, shm[1])
            if not borrow:
                tensors = {k: v.clone() for k, v in msg.tensors.items()}
                self.release()
                return item, tensors
        # the tensors live on the received ZeroMQ frames, which they keep alive
        return item, msg.tensors
