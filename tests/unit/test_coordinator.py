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
