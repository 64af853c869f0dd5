"""The cost model: predicted stage time, transfer time and memory of a rank, and from those a
plan's latency and throughput under micro-batching.

Compute time of a stage for a micro-batch of ``b`` samples on a host with ``t`` threads::

    seconds = RANK_SLOWDOWN * (b * sum(node seconds per sample) / speedup(t)
                               + sum(node seconds per call))

where a node's seconds per sample come from ``fastserve profile`` when measured, else from its
FLOPs over the host's FLOP/s per thread (measured, or ``REFERENCE_FLOPS * host.speed``), and
``speedup(t) = 1 + (t - 1) * THREAD_EFFICIENCY``. The per-call part is what a node costs
whatever the batch (Python and torch dispatch, about 10 us): it dominates small models and small
micro-batches. With a profile, a stage's time is instead interpolated from its nodes' measured
times at batch 1, 4, 16, ... (which hold the per-call part), still times ``RANK_SLOWDOWN``.

Transfers: a micro-batch enters stage 0 from the coordinator, crosses every cut, and its outputs
return to the coordinator, which copies them into the merged result. The coordinator is a
pipeline step of its own (it sends and receives while the stages compute), serving ``d``
replicas one after another. A replica of ``p`` stages running ``m`` micro-batches (GPipe fill and drain) takes::

    latency = sum_k(step_k) + (m - 1) * max_k(step_k) + (d - 1) * transfer in
    step_k = compute_k + transfer into stage k      (k < p)
    step_p = d * (transfer out + merge copy)       (the coordinator; plus d * transfer in
                                                     for the steady-state throughput)

and ``d`` replicas run side by side, so a batch of ``B`` samples takes the latency of a replica
given ``ceil(B / d)`` samples. With batches streaming back to back, each replica completes a
micro-batch of ``b`` samples every ``max_k(step_k)``: throughput = ``d * b / max_k(step_k)``.
The pipeline bubble of one batch is ``(p - 1) / (m + p - 1)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fastserve.errors import ProfileError
from fastserve.graph import Graph
from fastserve.partition.sharding import Shard
from fastserve.resources.inventory import Host, Link
from fastserve.yamlio import read_text

REFERENCE_FLOPS = 20e9  # FLOP/s of one reference core (speed 1.0) when nothing is measured
THREAD_EFFICIENCY = 0.8  # each extra thread adds this fraction of one thread's speed
# A rank computes this much slower than its nodes timed alone: it shares caches, memory
# bandwidth and cores with the other ranks and the coordinator on its host. Measured with
# `fastserve bench pipeline`: 2 GPT-2 ranks on 2 cores used 10-15% more CPU per sample than
# one process, and predictions of `fastserve bench plan` ran 25-30% high without it.
RANK_SLOWDOWN = 1.15
CALL_SECONDS = 10e-6  # per node call when not measured: Python and torch dispatch
COPY_BANDWIDTH = 4e9  # bytes/s the coordinator copies results into the merged output
RUNTIME_BASELINE = 320 * 2**20  # bytes: an idle rank (Python, torch, zmq, FastServe loaded)
ACTIVATION_FACTOR = 2.0  # live activations inside a node: its inputs plus its outputs


PHASES = ("forward", "decode")


@dataclass(frozen=True)
class Profile:
    """Measured numbers, written by ``fastserve profile``: FLOP/s per thread of each host and,
    for each node on one thread, its seconds per call at a few batch sizes (``node_times``:
    ``[[batch, seconds], ...]``, ascending) and the lowest seconds per sample among them
    (``node_seconds``, a lower bound the planner prunes with). Time is not linear in the batch: a matmul of 4 rows is memory-bound,
    one of 256 is not, and every call pays its dispatch; the cost model interpolates.

    ``call_seconds``: what a node without measured times costs per call (default
    :data:`CALL_SECONDS`)."""

    node_seconds: Mapping[str, float]
    host_flops: Mapping[str, float]
    dims: Mapping[str, int]
    node_times: Mapping[str, Sequence[Sequence[float]]] = field(default_factory=dict)
    call_seconds: float | None = None
    # one message between two live processes of this host (send, wake the peer, receive),
    # measured on running ranks; replaces the local link's latency
    message_seconds: float | None = None
    # what the node times are of: "forward" (a batch of whole samples, ``fastserve profile``)
    # or "decode" (one generation step over rows of sequences, ``fastserve profile --decode``)
    phase: str = "forward"

    def to_json(self) -> dict:
        return {"node_seconds": dict(self.node_seconds), "host_flops": dict(self.host_flops),
                "dims": dict(self.dims),
                "node_times": {n: [list(x) for x in t] for n, t in self.node_times.items()},
                "message_seconds": self.message_seconds, "phase": self.phase}

    @staticmethod
    def load(path: str | Path) -> Profile:
        """Read a profile written by ``fastserve profile``; anything malformed is a
        :class:`ProfileError` naming the file (and the line of a JSON syntax error) and key."""
        file = str(path)
        text = read_text(path, "profile", ProfileError)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"invalid JSON: {e.msg}", file=file, line=e.lineno) from None
        except RecursionError:
            raise ProfileError("invalid JSON: nested too deeply", file=file) from None
        if not isinstance(doc, dict):
            raise ProfileError(f"expected a JSON object, got {type(doc).__name__}", file=file)
        for key in ("node_seconds", "host_flops"):
            if key not in doc:
                raise ProfileError(f"missing key '{key}'; write profiles with fastserve "
                                   f"profile", file=file, key=key)
        node_seconds = _numbers(doc, "node_seconds", file)
        host_flops = _numbers(doc, "host_flops", file, positive=True)
        dims = _numbers(doc, "dims", file, positive=True)
        if any(not isinstance(v, int) for v in dims.values()):
            raise ProfileError("dim sizes must be integers", file=file, key="dims")
        times = doc.get("node_times") or {}
        if not isinstance(times, dict):
            raise ProfileError("expected an object of node -> [[batch, seconds], ...]",
                               file=file, key="node_times")
        for node, pairs in times.items():
            if not isinstance(pairs, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(_is_number(x) and x >= 0
                                                                for x in p) for p in pairs):
                raise ProfileError("expected a list of [batch, seconds] pairs", file=file,
                                   key=f"node_times.{node}")
            batches = [p[0] for p in pairs]
            if any(b < 1 for b in batches) or batches != sorted(set(batches)):
                # the cost model interpolates between them, dividing by their differences
                raise ProfileError("expected batches of at least 1, ascending, each once",
                                   file=file, key=f"node_times.{node}")
        message = doc.get("message_seconds")
        if message is not None and not (_is_number(message) and message >= 0):
            raise ProfileError(f"expected seconds, got {str(message)[:40]}", file=file,
                               key="message_seconds")
        phase = doc.get("phase", "forward")
        if phase not in PHASES:
            raise ProfileError(f"expected one of {', '.join(PHASES)}, got {str(phase)[:40]}",
                               file=file, key="phase")
        return Profile(node_seconds, host_flops, dims, times, message_seconds=message,
                       phase=phase)

    @property
    def reference_flops(self) -> float:
        """FLOP/s per thread of the host the node times were measured on."""
        return max(self.host_flops.values()) if self.host_flops else REFERENCE_FLOPS


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(doc: dict, key: str, file: str, positive: bool = False) -> dict[str, float]:
    """``doc[key]``, an object of names to finite non-negative (or positive) numbers."""
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise ProfileError(f"expected an object of names to numbers, got "
                           f"{type(value).__name__}", file=file, key=key)
    for name, x in value.items():
        if not _is_number(x) or x < 0 or (positive and x == 0):
            raise ProfileError(f"expected a {'positive' if positive else 'non-negative'} "
                               f"number, got {str(x)[:40]}", file=file, key=f"{key}.{name}")
    return value


def speedup(threads: int) -> float:
    return 1.0 + (max(1, threads) - 1) * THREAD_EFFICIENCY


def host_flops(host: Host, profile: Profile | None = None) -> float:
    """FLOP/s of one thread on ``host``."""
    if profile is not None and host.name in profile.host_flops:
        return profile.host_flops[host.name]
    if host.flops:
        return host.flops
    return REFERENCE_FLOPS * host.speed


def transfer_seconds(bytes_per_sample: int, samples: int, link: Link) -> float:
    if bytes_per_sample == 0:
        return 0.0
    return link.latency + bytes_per_sample * samples / link.bandwidth


@dataclass(frozen=True)
class ShardCosts:
    """What the model needs of one shard, computed once. Time for ``b`` samples on a rank of
    ``power`` FLOP/s: :meth:`seconds`; memory: ``fixed + b * per_sample``."""

    work: float  # FLOPs per sample, or measured seconds x reference FLOP/s
    calls: float  # seconds per micro-batch whatever its size (unmeasured nodes' dispatch)
    fixed: int  # bytes: runtime baseline + weights (own and borrowed)
    per_sample: float  # bytes of activations and cut tensors held per sample
    in_bytes: int  # per sample, crossing the cut into this shard
    out_bytes: int  # per sample, leaving it
    # measured: (batch, FLOP-equivalents per call) of the whole shard, ascending batch
    table: tuple[tuple[float, float], ...] = ()

    def memory(self, samples: int) -> int:
        return self.fixed + int(samples * self.per_sample)

    def seconds(self, samples: int, power: float) -> float:
        """One micro-batch of ``samples`` on a rank of ``power`` FLOP/s."""
        if not self.table:
            return RANK_SLOWDOWN * (samples * self.work / power + self.calls)
        return RANK_SLOWDOWN * interpolate(self.table, samples) / power


def interpolate(table: Sequence[Sequence[float]], batch: float) -> float:
    """Piecewise linear through measured ``(batch, cost)`` points; beyond the largest batch the
    cost per sample stays that of the largest; below the smallest, its cost."""
    if batch <= table[0][0]:
        return table[0][1]
    for (b0, c0), (b1, c1) in zip(table, table[1:]):
        if batch <= b1:
            return c0 + (c1 - c0) * (batch - b0) / (b1 - b0)
    b_last, c_last = table[-1]
    return c_last * batch / b_last


def node_work(graph: Graph, node: str, profile: Profile | None = None) -> float:
    """What one sample of ``node`` costs in FLOPs: measured seconds times the profiling host's
    FLOP/s when profiled (memory-bound nodes cost more than their FLOPs), else its FLOPs."""
    if profile is not None and node in profile.node_seconds:
        return profile.node_seconds[node] * profile.reference_flops
    return graph.node(node)["flops"]


def shard_costs(graph: Graph, shard: Shard, profile: Profile | None = None) -> ShardCosts:
    """Predicted costs of a rank holding ``shard``. Memory: the runtime baseline, the weights,
    and per sample the largest node's live activations (inputs + outputs, times
    ACTIVATION_FACTOR) plus the cut tensors received and sent."""
    work = sum(node_work(graph, n, profile) for n in shard.nodes)
    weights = sum(graph.node(n)["params_bytes"] + graph.node(n).get("borrowed_bytes", 0)
                  for n in shard.nodes)
    largest = max((sum(graph.tensors[t].bytes for t in graph.node(n)["inputs"])
                   + graph.node(n)["out_bytes"]) for n in shard.nodes)
    per_sample = ACTIVATION_FACTOR * largest + shard.in_bytes + shard.out_bytes
    call = CALL_SECONDS if profile is None or profile.call_seconds is None else \
        profile.call_seconds
    timed = profile.node_times if profile is not None else {}
    table: tuple[tuple[float, float], ...] = ()
    if shard.nodes and all(n in timed for n in shard.nodes):
        # every node measured on the same batch sizes: the shard's time is their sum
        batches = [b for b, _ in timed[shard.nodes[0]]]
        if all([b for b, _ in timed[n]] == batches for n in shard.nodes):
            ref = profile.reference_flops
            table = tuple((b, ref * sum(timed[n][i][1] for n in shard.nodes))
                          for i, b in enumerate(batches))
    calls = call * len(shard.nodes)
    return ShardCosts(work, calls, RUNTIME_BASELINE + weights, per_sample, shard.in_bytes,
                      shard.out_bytes, table)


def merge_seconds(bytes_per_sample: int, samples: int) -> float:
    """The coordinator copying a micro-batch's outputs into the merged result."""
    return bytes_per_sample * samples / COPY_BANDWIDTH


def pipeline_latency(stage_seconds: Sequence[float], micro_batches: int) -> float:
    """GPipe: the first micro-batch crosses every stage, the rest follow at the slowest pace."""
    return sum(stage_seconds) + (micro_batches - 1) * max(stage_seconds)


def steady_throughput(stage_seconds: Sequence[float], micro_batch: int, replicas: int) -> float:
    """Samples per second when batches stream back to back: every replica finishes a
    micro-batch each time its slowest stage does."""
    return replicas * micro_batch / max(stage_seconds)


def bubble(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


def micro_batch_size(batch: int, replicas: int, micro_batches: int) -> int:
    return math.ceil(math.ceil(batch / replicas) / micro_batches)
