"""Splitting batches into work items and merging results, without sockets."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from fastserve.engine.coordinator import Merger, plan_work
from fastserve.errors import EngineError


def test_plan_work_gives_each_replica_ceil_m_over_p_in_micro_batches():
    x = {"x": torch.arange(10.0)[:, None], "table": torch.ones(3)}
    items = plan_work(x, ["x"], replicas=3, micro_batches=2)
    assert [i.replica for i in items] == [0, 0, 1, 1, 2, 2]
    assert [i.samples for i in items] == [2, 2, 2, 2, 1, 1]
    assert torch.equal(torch.cat([i.tensors["x"] for i in items]), x["x"])
    assert all(i.tensors["table"] is x["table"] for i in items)  # unbatched: sent whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.bool], ids=str)
def test_merger_puts_results_arriving_in_any_order_back_in_sample_order(dtype):
    # bfloat16 has a copy path of its own (numpy has no bfloat16)
    batches = [{"x": (torch.randn(n, 3) * 50).to(dtype)} for n in (7, 1, 5)]
    per_batch: list = []
    for b in batches:  # keys unique across batches, as Deployment.run_batches numbers them
        start = sum(len(p) for p in per_batch)
        per_batch.append([replace(i, key=start + i.key)
                          for i in plan_work(b, ["x"], replicas=2, micro_batches=2)])
    merger = Merger(per_batch)
    arrivals = [i for items in per_batch for i in items]
    random.Random(0).shuffle(arrivals)
    for item in arrivals:
        merger.add(item.key, {"y": item.tensors["x"].flip(1)})
    for b, out in zip(batches, merger.results()):
        assert out["y"].dtype == dtype and torch.equal(out["y"], b["x"].flip(1))


def test_merger_rejects_an_output_without_the_batch_dimension():
    items = plan_work({"x": torch.randn(4, 2)}, ["x"], replicas=1, micro_batches=2)
    merger = Merger([items])
    with pytest.raises(EngineError, match="keep the batch dimension"):
        merger.add(items[0].key, {"y": torch.randn(3)})


def test_run_stats_splits_each_hop_into_transfer_and_queue_exactly():
    from fastserve.engine.coordinator import RunStats, stage_path
    # two micro-batches through two stages; times in seconds, chosen to be exact in binary
    first = [{"rank": 0, "stage": 0, "recv": 10.0, "start": 10.25, "end": 11.0, "sent": 11.5},
             {"rank": 1, "stage": 1, "recv": 11.5, "start": 12.0, "end": 14.0}]
    second = [{"rank": 0, "stage": 0, "recv": 20.0, "start": 21.0, "end": 21.5},
              {"rank": 1, "stage": 1, "recv": 21.5, "start": 21.25, "end": 22.0}]
    # stage 1 of the first: its hop runs from stage 0's send (11.5), not its end (11.0);
    # a clock running backwards between hosts gives a zero hop, never a negative one
    assert list(stage_path(first, 10.0)) == [(0, 0.75, 0.25), (1, 2.0, 0.5)]
    assert list(stage_path(second, 20.0)) == [(0, 0.5, 1.0), (1, 0.75, 0.0)]
    stats = RunStats(samples=8, seconds=4.0)
    stats.add_timings(first, 10.0)
    stats.add_timings(second, 20.0)
    assert stats.to_json() == {
        "samples": 8, "seconds": 4.0, "throughput": 2.0,
        "stages": {0: {"compute_s": 0.625, "transfer_s": 0.25, "queue_s": 0.375,
                       "micro_batches": 2},
                   1: {"compute_s": 1.375, "transfer_s": 0.0, "queue_s": 0.25,
                       "micro_batches": 2}},
        "note": "per micro-batch means; transfer = fastest hop of the run (of its last 10000 "
                "micro-batches)"}
    assert RunStats().to_json()["throughput"] == 0.0 and RunStats().stages == {}


def test_run_stats_keep_the_latest_micro_batches_of_a_flow_that_never_ends():
    # a generator's flow adds one micro-batch per step for as long as it runs
    from fastserve.engine.coordinator import KEPT_TIMES, RunStats
    stats = RunStats()
    for i in range(KEPT_TIMES + 5):
        stats.add_timings([{"rank": 0, "stage": 0, "recv": 0.0, "start": 1.0,
                            "end": 1.0 + i}], 0.0)
    kept = stats.stages[0]
    assert len(kept.compute) == len(kept.hops) == KEPT_TIMES
    assert kept.count == KEPT_TIMES + 5 == stats.to_json()["stages"][0]["micro_batches"]
    assert kept.compute[0] == 5.0 and kept.compute[-1] == KEPT_TIMES + 4.0


def test_plan_work_refuses_an_empty_batch_and_disagreeing_batch_sizes():
    with pytest.raises(EngineError) as info:
        plan_work({"x": torch.randn(0, 2)}, ["x"], replicas=1, micro_batches=1)
    assert str(info.value) == "the batch is empty"
    with pytest.raises(EngineError) as info:
        plan_work({"x": torch.randn(3, 2), "y": torch.randn(4)}, ["x", "y"], replicas=1,
                  micro_batches=1)
    assert str(info.value) == "batched inputs disagree on the batch size: {'x': 3, 'y': 4}"


@pytest.mark.parametrize("micro_batches, sizes", [(1, [5]), (0, [5]), (2, [3, 2]),
                                                  (9, [1, 1, 1, 1, 1])])
def test_plan_work_makes_at_most_the_micro_batches_asked_for(micro_batches, sizes):
    items = plan_work({"x": torch.arange(5.0)}, ["x"], replicas=1, micro_batches=micro_batches)
    assert [i.samples for i in items] == sizes and [i.key for i in items] == list(range(len(sizes)))


def test_a_whole_batch_result_is_kept_as_received_unless_it_is_borrowed():
    items = plan_work({"x": torch.randn(3, 2)}, ["x"], replicas=1, micro_batches=1)
    received = {"y": torch.randn(3, 4)}
    merger = Merger([items])
    merger.add(items[0].key, received)
    assert merger.results()[0]["y"] is received["y"]  # no copy of a result we own
    borrowed = Merger([items])
    borrowed.add(items[0].key, received, borrowed=True)
    out = borrowed.results()[0]["y"]
    assert torch.equal(out, received["y"]) and out.data_ptr() != received["y"].data_ptr()
