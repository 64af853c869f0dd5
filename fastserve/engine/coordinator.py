"""Splitting work and merging results, without sockets.

* data parallel: M samples over P replicas, ceil(M/P) each (the last gets the rest);
* model parallel: each replica's part is cut into micro-batches that flow through the stages so
  that stage k works on micro-batch i while stage k+1 works on i-1 (GPipe fill and drain);
* merging (:class:`Merger`) puts results back in request order as they arrive, whatever order
  they arrive in.

Inputs whose first dimension is the symbolic ``batch`` are split; other inputs (a shared table,
a fixed mask) are sent whole with every piece.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from fastserve.errors import EngineError

# micro-batches whose times a stage keeps: a run's, and the latest of a flow that runs for
# ever (a generator sends one per step)
KEPT_TIMES = 10_000


@dataclass(frozen=True)
class WorkItem:
    """One micro-batch for one replica: ``key`` orders it among its run's results."""

    key: int
    replica: int | None  # None: route to the least-loaded replica when sending
    tensors: dict[str, torch.Tensor]
    samples: int
    meta: dict | None = None  # a generation step's sequences (fastserve.graph.decode)


def batch_size(inputs: Mapping[str, torch.Tensor], batched: Sequence[str]) -> int:
    sizes = {name: inputs[name].shape[0] for name in batched}
    if len(set(sizes.values())) != 1:
        raise EngineError(f"batched inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def _slice(inputs: Mapping[str, torch.Tensor], batched: Sequence[str], lo: int,
           hi: int) -> dict[str, torch.Tensor]:
    return {k: (v[lo:hi] if k in batched else v) for k, v in inputs.items()}


def plan_work(inputs: Mapping[str, torch.Tensor], batched: Sequence[str], replicas: int,
              micro_batches: int) -> list[WorkItem]:
    """Cut one batch into work items: ceil(M/P) samples per replica, each part into at most
    ``micro_batches`` micro-batches of near-equal size. Keys follow sample order."""
    total = batch_size(inputs, batched)
    if total == 0:
        raise EngineError("the batch is empty")
    per_replica = math.ceil(total / replicas)
    items: list[WorkItem] = []
    for r in range(replicas):
        lo, hi = r * per_replica, min(total, (r + 1) * per_replica)
        if lo >= hi:
            break
        n = hi - lo
        m = max(1, min(micro_batches, n))
        size = math.ceil(n / m)
        for start in range(lo, hi, size):
            stop = min(hi, start + size)
            items.append(WorkItem(len(items), r, _slice(inputs, batched, start, stop),
                                  stop - start))
    return items


class Merger:
    """Merges results as they arrive, into one output tensor per batch and name.

    ``batches[i]`` lists the work items of batch ``i`` in sample order. Each result is copied
    into its rows at once and its received buffers are released, so the coordinator holds one
    output per batch instead of every micro-batch's frames plus a concatenated copy (a GPT-2
    batch of 32 carries 206 MB of logits), and the freed buffers are reused by the next
    receive instead of faulting fresh pages. A batch of one item keeps its tensors as received.
    """

    def __init__(self, batches: Sequence[Sequence[WorkItem]]) -> None:
        self._where: dict[int, tuple[int, int, int]] = {}  # key -> batch, first row, rows
        self._totals = []
        for b, items in enumerate(batches):
            row = 0
            for item in items:
                self._where[item.key] = (b, row, item.samples)
                row += item.samples
            self._totals.append(row)
        self._single = [len(items) == 1 for items in batches]
        self._out: list[dict[str, torch.Tensor]] = [{} for _ in batches]

    def add(self, key: int, tensors: Mapping[str, torch.Tensor], borrowed: bool = False) -> None:
        """Copy a result into its rows. ``borrowed`` tensors (a result ring's, valid until the
        next receive) are copied even when they are a whole batch."""
        b, row, rows = self._where[key]
        if self._single[b]:
            self._out[b] = {k: v.clone() for k, v in tensors.items()} if borrowed else \
                dict(tensors)
            return
        out = self._out[b]
        for name, t in tensors.items():
            if t.shape[:1] != (rows,):
                raise EngineError(f"output '{name}' of a {rows}-sample micro-batch has shape "
                                  f"{tuple(t.shape)}: outputs must keep the batch dimension")
            if name not in out:
                out[name] = torch.empty((self._totals[b], *t.shape[1:]), dtype=t.dtype)
            dst = out[name][row:row + rows]
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16
                dst.copy_(t)
            else:  # one thread: torch's parallel copy would wake threads the ranks need
                np.copyto(dst.numpy(), t.numpy())

    def results(self) -> list[dict[str, torch.Tensor]]:
        return self._out


@dataclass
class StageTimes:
    """Seconds measured for one stage over the micro-batches of a run (the last
    :data:`KEPT_TIMES` of them).

    A hop (upstream send -> this rank picks the message up) is transfer time plus time queued in
    the socket while the rank was busy; clocks cannot tell the two apart per message, so the
    fastest hop of the run is taken as the transfer time and the rest of each hop as queueing.
    """

    compute: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_TIMES))
    hops: deque[float] = field(default_factory=lambda: deque(maxlen=KEPT_TIMES))
    count: int = 0  # micro-batches measured, all of them

    @property
    def transfer(self) -> float:
        """Mean transfer seconds per micro-batch (the fastest hop)."""
        return min(self.hops) if self.hops else 0.0

    @property
    def queue(self) -> float:
        """Mean seconds a micro-batch waited for this stage."""
        return sum(self.hops) / len(self.hops) - self.transfer if self.hops else 0.0

    @property
    def mean_compute(self) -> float:
        return sum(self.compute) / len(self.compute) if self.compute else 0.0


def stage_path(timings: list[dict], sent_at: float) -> Iterator[tuple[int, float, float]]:
    """(stage, compute seconds, hop seconds) of each stage a micro-batch went through, from the
    ranks' ``timings`` (one entry per stage, in order) and when the coordinator sent it; a hop
    runs from the previous sender's send to this stage's start."""
    previous = sent_at
    for t in timings:
        yield int(t["stage"]), t["end"] - t["start"], max(0.0, t["start"] - previous)
        previous = t.get("sent", t["end"])


@dataclass
class RunStats:
    """What a run measured: per-stage times, latency and throughput."""

    samples: int = 0
    seconds: float = 0.0
    stages: dict[int, StageTimes] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def add_timings(self, timings: list[dict], sent_at: float) -> None:
        """Account one micro-batch's path: ``timings`` is one entry per stage, in order."""
        for stage, compute, hop in stage_path(timings, sent_at):
            st = self.stages.setdefault(stage, StageTimes())
            st.compute.append(compute)
            st.hops.append(hop)
            st.count += 1

    def to_json(self) -> dict:
        return {"samples": self.samples, "seconds": self.seconds,
                "throughput": self.throughput,
                "stages": {s: {"compute_s": v.mean_compute, "transfer_s": v.transfer,
                               "queue_s": v.queue, "micro_batches": v.count}
                           for s, v in sorted(self.stages.items())},
                "note": "per micro-batch means; transfer = fastest hop of the run (of its "
                        f"last {KEPT_TIMES} micro-batches)"}
