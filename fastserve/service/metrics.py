"""Prometheus metrics of a service (prometheus-client), in a registry of its own so that two
services in one process (tests, benchmarks) do not share counters."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

# request latency buckets: sub-millisecond small requests up to a minute-long batch
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], replicas: Callable[[], int],
                 stage_seconds: Callable[[], dict[tuple[int, str], float]]) -> None:
        """The callables are read at scrape time: the queue depth, the ready replicas, and
        seconds per (stage, compute|transfer|queue) summed over every replica's life."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastserve_requests", "Requests by outcome (ok, invalid, "
                                "overloaded, timeout, error)", ["outcome"], registry=r)
        self.latency = Histogram("fastserve_request_seconds", "Seconds from admission to the "
                                 "answer, for answered requests", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.queue_seconds = Histogram("fastserve_queue_seconds", "Seconds a request waited "
                                       "in the queue before a replica took it",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_samples = Histogram("fastserve_batch_samples", "Samples per batch sent to "
                                       "a replica", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                       registry=r)
        self.tokens = Counter("fastserve_generation_tokens", "Tokens generated and sent",
                              registry=r)
        self.first_token = Histogram("fastserve_time_to_first_token_seconds", "Seconds from "
                                     "admission to a completion's first token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.restarts = Counter("fastserve_rank_restarts", "Replica restarts after a rank "
                                "died or hung", registry=r)
        Gauge("fastserve_queue_depth", "Requests admitted and waiting for a replica",
              registry=r).set_function(queue_depth)
        Gauge("fastserve_replicas", "Replicas ready to serve", registry=r
              ).set_function(replicas)
        r.register(_StageCollector(stage_seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StageCollector:
    """Per-stage compute and transfer seconds, read from the replicas when scraped."""

    def __init__(self, read: Callable[[], dict[tuple[int, str], float]]) -> None:
        self.read = read

    def collect(self):
        family = CounterMetricFamily("fastserve_stage_seconds", "Seconds per stage, by kind: "
                                     "compute; transfer (the fastest hop from the upstream "
                                     "send, per micro-batch); queue (the rest of each hop: "
                                     "waiting at the rank)",
                                     labels=["stage", "kind"])
        for (stage, kind), seconds in sorted(self.read().items()):
            family.add_metric([str(stage), kind], seconds)
        yield family

    def describe(self):
        return []
