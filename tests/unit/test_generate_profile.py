"""The decode profile: each node's time per generation step, the cut a decode pipeline is
balanced by."""

from __future__ import annotations

import json

import pytest
import yaml

import fastserve.graph as G
from fastserve.engine.wire import MAX_TIMINGS
from fastserve.errors import ProfileError
from fastserve.generate.profile import decode_profile
from fastserve.graph.decode import GenerationError
from fastserve.resources.costmodel import Profile
from fastserve.resources.inventory import local_inventory
from fastserve.resources.planner import Constraints, plan
from lms import ROOT


def gpt2(vocab: int, layers: int = 2):
    doc = yaml.safe_load((ROOT / "graphs/gpt2.yaml").read_text())
    doc["params"].update(vocab=vocab, positions=64, d_model=32, n_heads=2, n_layers=layers)
    return G.compile_graph(G.spec_from_dict(doc))


def test_every_node_is_timed_per_step_and_the_profile_says_it_is_of_decode(tmp_path):
    graph = gpt2(vocab=300)
    prof = decode_profile(graph, "here", rows=3, steps=4, prompt=5)
    assert prof.phase == "decode" and set(prof.node_times) == set(graph.order)
    for node, table in prof.node_times.items():
        [[rows, seconds]] = table
        assert rows == 3 and seconds > 0
        assert prof.node_seconds[node] == pytest.approx(seconds / 3)
    assert prof.host_flops["here"] > 0
    path = tmp_path / "decode.json"
    path.write_text(json.dumps(prof.to_json()))
    assert Profile.load(path).phase == "decode"
    doc = prof.to_json()
    del doc["phase"]  # a profile from before phases: of whole batches
    path.write_text(json.dumps(doc))
    assert Profile.load(path).phase == "forward"


def test_an_unknown_phase_is_named_with_its_key(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"node_seconds": {}, "host_flops": {"a": 1.0},
                                "phase": "prefill"}))
    with pytest.raises(ProfileError) as e:
        Profile.load(path)
    assert "phase" in str(e.value) and "prefill" in str(e.value)


def test_a_large_vocabulary_makes_the_head_cost_more_than_the_blocks_and_the_cut_follows():
    # 64,000 tokens of 32 wide: the head reads 8 MiB of weights per step, a block 48 KiB; the
    # cut by these times gives the head a stage of its own
    graph = gpt2(vocab=64_000, layers=2)
    prof = decode_profile(graph, "local", rows=4, steps=6, prompt=4)
    head = prof.node_times["lm_head"][0][1]
    blocks = [prof.node_times[f"h.{i}"][0][1] for i in range(2)]
    assert head > sum(blocks), (head, blocks)
    chosen = plan(graph, local_inventory(), constraints=Constraints(
        replicas=1, stages=2, threads=1, batch=4, transport="ipc"), profile=prof)
    assert chosen.stage_plans[1].nodes[-1] == "lm_head"
    assert {"h.0", "h.1"} <= set(chosen.stage_plans[0].nodes)


@pytest.mark.parametrize("kwargs", [{"rows": 0}, {"steps": 0}, {"prompt": 0}])
def test_impossible_measurements_are_refused(kwargs):
    with pytest.raises(ValueError):
        decode_profile(gpt2(vocab=50, layers=1), **kwargs)


def test_a_model_too_short_for_the_measurement_is_named():
    with pytest.raises(GenerationError, match="64 positions"):
        decode_profile(gpt2(vocab=50, layers=1), prompt=60, steps=8)


def test_a_graph_of_more_nodes_than_a_message_passes_is_named():
    graph = gpt2(vocab=50, layers=MAX_TIMINGS)
    with pytest.raises(GenerationError, match=f"at most {MAX_TIMINGS} stages"):
        decode_profile(graph, rows=1, steps=1, prompt=1)


@pytest.mark.parametrize("pairs", [[[0, 0.1]], [[4, 0.1], [1, 0.05]], [[2, 0.1], [2, 0.1]]])
def test_batches_the_cost_model_cannot_interpolate_are_refused(tmp_path, pairs):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"node_seconds": {"a": 0.1}, "host_flops": {"h": 1.0},
                                "node_times": {"a": pairs}}))
    with pytest.raises(ProfileError) as e:
        Profile.load(path)
    assert e.value.key == "node_times.a"
