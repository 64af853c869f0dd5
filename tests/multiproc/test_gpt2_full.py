"""Full-size GPT-2 small (124M) on real ranks: slow, so run with ``pytest -m slow``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastserve.graph as G
from fastserve.engine import Deployment, Layout

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("layout", [Layout(1, 2), Layout(2, 1), Layout(1, 4, "layer")],
                         ids=["2-stage", "2-replica", "4-stage-layer"])
def test_gpt2_small_equals_the_reference(layout):
    dims = {"seq": 24}
    with Deployment.from_spec(str(ROOT / "graphs/gpt2.yaml"), layout, dims=dims, timeout=300) as dep:
        inputs = G.random_inputs(dep.graph, 6, dims, seed=5)
        got = dep.run(inputs, micro_batches=3)["lm_head"]
        torch.testing.assert_close(got, G.reference(dep.graph, inputs)["lm_head"])
