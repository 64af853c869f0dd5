"""Results through the shared-memory ring (fastserve.engine.ring) on real rank processes: equal
to the reference whether they fit in the ring, wrap around it many times or do not fit at all,
and results handed to the caller stay intact while the ring is reused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import fastserve.graph as G
from fastserve.engine import Deployment, Layout
from fastserve.engine.coordinator import WorkItem

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "graphs/mlp.yaml")
pytestmark = pytest.mark.timeout(120)


def test_results_through_a_small_ring_wrap_fall_back_and_stay_exact():
    # the MLP's output is 40 bytes per sample: 8 samples (320 bytes) fit three times in a
    # 1,024-byte ring, 32 samples (1,280 bytes) do not fit and go over the socket
    with Deployment.from_spec(MLP, Layout(1, 2), timeout=60, ring_bytes=1024,
                              ring_min_bytes=0) as dep:
        ring = dep._rings[1]
        requests = [G.random_inputs(dep.graph, batch=8, seed=s) for s in range(12)]
        got = dep.run_requests(requests)  # each result copied out before the ring moves on
        for inputs, out in zip(requests, got):
            torch.testing.assert_close(out["head"], G.reference(dep.graph, inputs)["head"])
        # through the ring and round it (one that finds the ring full goes over the socket)
        assert ring._expected > 1024
        assert sum(dep.received.values()) == 12 and 3 <= dep.received["ring"] <= 12
        taken, through = ring._expected, dep.received["ring"]
        big = G.random_inputs(dep.graph, batch=32, seed=99)
        out = dep.run(big, micro_batches=1)
        torch.testing.assert_close(out["head"], G.reference(dep.graph, big)["head"])
        # too large for the ring: it came over the socket
        assert ring._expected == taken and dep.received["ring"] == through
        # a batch merged straight from the ring (borrowed, then released) in 4 micro-batches
        out = dep.run(big, micro_batches=4)
        torch.testing.assert_close(out["head"], G.reference(dep.graph, big)["head"])
        assert ring._expected > taken


def test_results_of_an_abandoned_flow_free_the_ring_for_the_next_runs():
    with Deployment.from_spec(MLP, Layout(1, 1), timeout=60, ring_bytes=1024,
                              ring_min_bytes=0) as dep:
        x = G.random_inputs(dep.graph, batch=8)
        abandoned = dep.flow()
        for key in range(3):  # three results of 320 bytes fill the ring; nobody takes them
            abandoned.send(WorkItem(key, 0, x, 8))
        deadline = time.monotonic() + 30
        while dep.control("stats")[0]["processed"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(3):  # the stragglers are dropped, and their ring bytes released
            torch.testing.assert_close(dep.run(x)["head"], G.reference(dep.graph, x)["head"])
        assert dep.dropped["unrequested"] == 3
        assert dep.received["ring"] >= 1  # the ring is in use again


def test_rings_are_sized_from_the_plan_or_left_out():
    from fastserve.engine.ring import ring_size

    assert ring_size(0) == 1 << 20 and ring_size(103 << 20) == 206 << 20
    assert ring_size(1 << 40) == 1 << 30
    dep = Deployment.from_spec(str(ROOT / "graphs/gpt2.yaml"), Layout(1, 1),
                               dims={"seq": 128}, batch=32, micro_batches=8)
    try:  # (planned, not started)
        # 4 samples of GPT-2's logits (4 x 128 x 50,257 float32) twice, in whole MiB
        assert dep.ring_bytes == ring_size(4 * 128 * 50257 * 4) == 197 << 20
    finally:
        dep.stop()
    with Deployment.from_spec(MLP, Layout(1, 1), timeout=60) as dep:
        assert list(dep._rings) == [0] and dep._rings[0].size == dep.ring_bytes == 1 << 20
        # results under ring_min_bytes (256 KiB by default) take the socket; larger ones the
        # ring (the MLP's results are 40 bytes a sample)
        for batch in (8, 8192):
            inputs = G.random_inputs(dep.graph, batch=batch)
            torch.testing.assert_close(dep.run(inputs, micro_batches=1)["head"],
                                       G.reference(dep.graph, inputs)["head"])
        assert dep.received == {"socket": 1, "ring": 1}
    with Deployment.from_spec(MLP, Layout(1, 1), timeout=60, ring_bytes=0) as dep:
        assert dep._rings == {}
        inputs = G.random_inputs(dep.graph, batch=8)
        torch.testing.assert_close(dep.run(inputs)["head"],
                                   G.reference(dep.graph, inputs)["head"])


def test_an_idle_rank_gives_back_the_memory_of_its_activations():
    from fastserve.engine.memory import IDLE_RELEASE_S

    # 16,384 samples through a 256-wide MLP: each layer's activations are 16 MiB, which the
    # rank keeps for the next micro-batch while work comes, and gives back once idle
    with Deployment.from_spec(MLP, Layout(1, 1), timeout=60, ring_bytes=0) as dep:
        before = dep.control("stats")[0]["rss"]
        x = G.random_inputs(dep.graph, batch=16384)
        torch.testing.assert_close(dep.run(x, micro_batches=1)["head"],
                                   G.reference(dep.graph, x)["head"])
        busy = dep.control("stats")[0]["rss"]
        assert busy - before > 32 << 20  # kept: at least two layers' activations
        deadline = time.monotonic() + IDLE_RELEASE_S + 10
        while time.monotonic() < deadline:
            time.sleep(0.5)
            idle = dep.control("stats")[0]["rss"]
            if idle - before < 16 << 20:
                break
        assert idle - before < 16 << 20, (before, busy, idle)
        # and it still computes the same after
        torch.testing.assert_close(dep.run(x, micro_batches=1)["head"],
                                   G.reference(dep.graph, x)["head"])
