"""The cost model: predicted stage time, transfer time and memory of a rank, and from those a
plan's latency and throughput under micro-batching.

Compute time of a stage for ``b`` samples on a host with ``t`` threads::

    seconds = b * sum(node seconds per sample) / speedup(t)

where a node's seconds per sample come from ``fastserve profile`` when measured, else from its
FLOPs over the host's FLOP/s per thread (measured, or ``REFERENCE_FLOPS * host.speed``), and
``speedup(t) = 1 + (t - 1) * THREAD_EFFICIENCY``.

A replica of ``p`` stages running ``m`` micro-batches (GPipe fill and drain) takes::

    latency = sum_k(stage_k) + (m - 1) * max_k(stage_k)     stage_k = compute + transfer in

and ``d`` replicas run side by side, so a batch of ``B`` samples takes the latency of a replica
given ``ceil(B / d)`` samples. With batches streaming back to back, each replica completes a
micro-batch of ``b`` samples every ``max_k(stage_k)``: throughput = ``d * b / max_k(stage_k)``.
The pipeline bubble of one batch is ``(p - 1) / (m + p - 1)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from fastserve.graph import Graph
from fastserve.partition.sharding import Shard
from fastserve.resources.inventory import Host, Link

REFERENCE_FLOPS = 20e9  # FLOP/s of one reference core (speed 1.0) when nothing is measured
THREAD_EFFICIENCY = 0.8  # each extra thread adds this fraction of one thread's speed
RUNTIME_BASELINE = 320 * 2**20  # bytes: an idle rank (Python, torch, zmq, FastServe loaded)
ACTIVATION_FACTOR = 2.0  # live activations inside a node: its inputs plus its outputs


@dataclass(frozen=True)
class Profile:
    """Measured numbers: seconds per sample of each node (1 thread) and FLOP/s per thread of
    each host, written by ``fastserve profile``."""

    node_seconds: Mapping[str, float]
    host_flops: Mapping[str, float]
    dims: Mapping[str, int]

    def to_json(self) -> dict:
        return {"node_seconds": dict(self.node_seconds), "host_flops": dict(self.host_flops),
                "dims": dict(self.dims)}

    @staticmethod
    def load(path: str | Path) -> Profile:
        doc = json.loads(Path(path).read_text())
        return Profile(doc["node_seconds"], doc["host_flops"], doc.get("dims", {}))


def speedup(threads: int) -> float:
    return 1.0 + (max(1, threads) - 1) * THREAD_EFFICIENCY


def host_flops(host: Host, profile: Profile | None = None) -> float:
    """FLOP/s of one thread on ``host``."""
    if profile is not None and host.name in profile.host_flops:
        return profile.host_flops[host.name]
    if host.flops:
        return host.flops
    return REFERENCE_FLOPS * host.speed


def node_seconds(graph: Graph, node: str, host: Host, profile: Profile | None = None) -> float:
    """Seconds per sample of one node on one thread of ``host``."""
    if profile is not None and node in profile.node_seconds:
        # measured on the profiling host: rescale by relative speed
        ref = max(profile.host_flops.values()) if profile.host_flops else REFERENCE_FLOPS
        return profile.node_seconds[node] * ref / host_flops(host, profile)
    return graph.node(node)["flops"] / host_flops(host, profile)


def compute_seconds(graph: Graph, nodes: Sequence[str], host: Host, threads: int,
                    samples: int, profile: Profile | None = None) -> float:
    per_sample = sum(node_seconds(graph, n, host, profile) for n in nodes)
    return samples * per_sample / speedup(threads)


def transfer_seconds(bytes_per_sample: int, samples: int, link: Link) -> float:
    if bytes_per_sample == 0:
        return 0.0
    return link.latency + bytes_per_sample * samples / link.bandwidth


@dataclass(frozen=True)
class ShardCosts:
    """What the model needs of one shard, computed once: seconds per sample on one thread of a
    host with ``flops`` FLOP/s is ``work / flops``; memory for ``b`` samples is
    ``fixed + b * per_sample``."""

    work: float  # FLOPs per sample, or measured seconds x reference FLOP/s
    fixed: int  # bytes: runtime baseline + weights (own and borrowed)
    per_sample: float  # bytes of activations and cut tensors held per sample
    in_bytes: int  # per sample, crossing the cut into this shard

    def memory(self, samples: int) -> int:
        return self.fixed + int(samples * self.per_sample)


def node_work(graph: Graph, node: str, profile: Profile | None = None) -> float:
    """What one sample of ``node`` costs in FLOPs: measured seconds times the profiling host's
    FLOP/s when profiled (memory-bound nodes cost more than their FLOPs), else its FLOPs."""
    if profile is not None and node in profile.node_seconds:
        ref = max(profile.host_flops.values()) if profile.host_flops else REFERENCE_FLOPS
        return profile.node_seconds[node] * ref
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
    return ShardCosts(work, RUNTIME_BASELINE + weights, per_sample, shard.in_bytes)


def rank_memory(graph: Graph, shard: Shard, samples: int) -> int:
    """Predicted resident bytes of a rank holding ``shard`` for ``samples`` samples."""
    return shard_costs(graph, shard).memory(samples)


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
