"""Generation in one process: greedy tokens through 1, 2 and 3 stages equal transformers'
``generate()`` on the same weights; batching, preemption and sampling do not change a
sequence's tokens; caches return to empty."""

from __future__ import annotations

import pytest
import torch

import fastserve.graph as G
from fastserve.bench.generate import (KV_REQUESTS, _drive, workload,
                                      workload_kv_tokens)
from fastserve.generate import FCFS, MLFQ, Generator, LocalPipeline, Request, Sampling
from fastserve.graph.decode import GenerationError, check_generative, max_positions
from fastserve.graph.module import build_reference
from lms import ROOT, hf_gpt2, hf_greedy, hf_llama, prompts, small_gpt2, small_llama

STEPS = 12


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    spec, weights = small_gpt2(tmp_path_factory.mktemp("lm"))
    graph = G.load(spec)
    model = hf_gpt2(weights)
    expected = [hf_greedy(model, p, STEPS) for p in prompts()]
    return graph, expected


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    spec, weights = small_llama(tmp_path_factory.mktemp("llama"))
    graph = G.load(spec)
    model = hf_llama(weights)
    return graph, model, [hf_greedy(model, p, STEPS) for p in prompts()]


def cuts(graph, stages):
    order = list(graph.order)  # wte, wpe, h.0, h.1, h.2, ln_f, lm_head
    return {1: None, 2: [order[:3], order[3:]], 3: [order[:2], order[2:4], order[4:]],
            # the last stage holds only the norm and the head: it runs on last rows alone
            "head": [order[:5], order[5:]]}[stages]


@pytest.mark.parametrize("stages", [1, 2, 3, "head"])
def test_greedy_equals_transformers_generate(lm, stages):
    graph, expected = lm
    gen = Generator(LocalPipeline(graph, cuts(graph, stages)), max_seqs=3)
    got = gen.run([Request(p, STEPS) for p in prompts()])
    assert got == expected
    assert len({t for seq in got for t in seq}) > 10  # the check is not of a degenerate model
    assert [c.cache.bytes for c in gen.pipeline.cores[0]] == [0] * gen.pipeline.stages
    assert gen.kv_in_use() == 0 and gen.active == 0


def test_a_batch_of_mixed_lengths_gives_each_prompt_its_own_tokens(lm):
    graph, expected = lm
    alone = [Generator(LocalPipeline(graph)).run([Request(p, STEPS)])[0] for p in prompts()]
    together = Generator(LocalPipeline(graph), max_seqs=4).run(
        [Request(p, STEPS) for p in prompts()])
    assert alone == together == expected


def test_mlfq_with_a_kv_budget_that_forces_recompute_gives_the_same_tokens(lm):
    graph, expected = lm
    gen = Generator(LocalPipeline(graph), MLFQ(quantum=1.0), max_seqs=2, kv_tokens=30)
    assert gen.run([Request(p, STEPS) for p in prompts()]) == expected


def test_two_replicas_each_keep_their_sequences(lm):
    graph, expected = lm
    pipe = LocalPipeline(graph, replicas=2)
    gen = Generator(pipe, max_seqs=2)
    assert gen.run([Request(p, STEPS) for p in prompts()]) == expected
    assert all(core.stats.processed > 0 for cores in pipe.cores for core in cores)


def test_seeded_sampling_does_not_depend_on_the_batch(lm):
    graph, _ = lm
    reqs = [Request(p, STEPS, Sampling(0.9, 50, 0.95, seed=7)) for p in prompts()]
    one = Generator(LocalPipeline(graph), max_seqs=1).run(reqs)
    four = Generator(LocalPipeline(graph), max_seqs=4).run(reqs)
    other = Generator(LocalPipeline(graph), max_seqs=4).run(
        [Request(r.prompt, STEPS, Sampling(0.9, 50, 0.95, seed=8)) for r in reqs])
    assert one == four
    assert one != other


def test_eos_and_stream_and_cancel(lm):
    graph, expected = lm
    gen = Generator(LocalPipeline(graph))
    first = expected[0]
    eos = first[4]
    cut = first.index(eos) + 1
    assert gen.run([Request(prompts()[0], STEPS, eos=(eos,))]) == [first[:cut]]
    stream = gen.stream(Request(prompts()[0], STEPS))
    assert [next(stream) for _ in range(3)] == first[:3]
    stream.close()  # the consumer stops: the sequence is cancelled and its caches dropped
    gen.drain()
    assert gen.pipeline.cores[0][0].cache.bytes == 0


def test_no_growth_over_1000_requests(lm):
    graph, _ = lm
    pipe = LocalPipeline(graph)
    gen = Generator(pipe, max_seqs=16)
    gen.run([Request([i % 400 + 1, 7], 2) for i in range(20)])
    idle = pipe.cores[0][0].cache.bytes
    gen.run([Request([i % 400 + 1, 7, 9], 2) for i in range(1000)])
    assert idle == pipe.cores[0][0].cache.bytes == 0
    assert len(pipe.cores[0][0].cache) == 0


def test_the_bench_workload_ends_each_job_at_a_length_its_request_does_not_carry(lm):
    graph, _ = lm
    vocab, longest = graph.spec.inputs[0].high, max_positions(graph)
    jobs = workload(10, 500.0, vocab, seed=3, longest=longest)
    bound = jobs[0].max_tokens
    assert all(j.max_tokens == bound and 4 <= j.length <= bound for j in jobs)
    assert min(j.length for j in jobs) < bound  # the bound is not the length
    assert workload_kv_tokens(jobs) == KV_REQUESTS * max(len(j.prompt) + bound for j in jobs)
    known = workload(10, 500.0, vocab, seed=3, longest=longest, known_lengths=True)
    assert [j.max_tokens for j in known] == [j.length for j in known] == \
        [j.length for j in jobs]
    for sched in (FCFS(), MLFQ()):
        gen = Generator(LocalPipeline(graph), sched, max_seqs=2,
                        kv_tokens=workload_kv_tokens(jobs))
        got = _drive(gen, jobs, 60.0)
        assert (got["finished"], got["unfinished"]) == (10, 0)
        assert got["tokens"] == sum(j.length for j in jobs)  # each ended at its own length
        assert gen.active == 0 and gen.pipeline.cores[0][0].cache.bytes == 0


def test_requests_that_cannot_run_are_refused_before_they_start(lm):
    graph, _ = lm
    gen = Generator(LocalPipeline(graph), kv_tokens=40, max_len=64)
    with pytest.raises(ValueError, match="positions"):
        gen.submit(Request([1] * 60, 10))
    with pytest.raises(ValueError, match="KV budget"):
        gen.submit(Request([1] * 30, 20))
    with pytest.raises(ValueError, match="within"):
        gen.submit(Request([500], 1))
    with pytest.raises(ValueError, match="at least one token"):
        gen.submit(Request([], 1))


@pytest.mark.parametrize("spec,why", [("graphs/mlp.yaml", "no attention"),
                                      ("graphs/unet.yaml", "token ids in and logits out")])
def test_graphs_that_cannot_generate_are_named(spec, why):
    with pytest.raises(GenerationError, match=why):
        check_generative(G.load(str(ROOT / spec)))


@pytest.mark.parametrize("node,why", [
    ({"op": "attention", "args": {"d_model": 8, "n_heads": 2, "causal": False}}, "'mix'"),
    ({"op": "softmax", "args": {"dim": 1}}, "'mix' \\(op softmax\\)")])
def test_a_node_that_looks_across_positions_is_named(node, why):
    doc = {"name": "lm", "inputs": {"ids": {"shape": ["batch", 4], "dtype": "int64",
                                            "high": 10}},
           "nodes": [{"id": "wte", "op": "embedding",
                      "args": {"num_embeddings": 10, "embedding_dim": 8}, "inputs": ["ids"]},
                     {"id": "att", "op": "attention", "args": {"d_model": 8, "n_heads": 2},
                      "inputs": ["wte"]},
                     {"id": "mix", **node, "inputs": ["att"]}],
           "outputs": ["mix"]}
    with pytest.raises(GenerationError, match=why):
        check_generative(G.compile_graph(G.spec_from_dict(doc)))


def test_a_generator_abandoned_mid_way_does_not_disturb_the_next(lm):
    graph, expected = lm
    pipe = LocalPipeline(graph)
    first = Generator(pipe)
    first.submit(Request(prompts()[0], STEPS))
    for _ in range(3):
        first.poll()  # three steps, then dropped without freeing its caches
    assert pipe.cores[0][0].cache.bytes > 0
    assert Generator(pipe).run([Request(p, STEPS) for p in prompts()]) == expected


def test_the_llama_block_equals_transformers_llama(llama):
    graph, model, _ = llama
    ids = torch.tensor([prompts()[1]])
    with torch.inference_mode():
        torch.testing.assert_close(build_reference(graph)({"ids": ids})["lm_head"],
                                   model(ids).logits)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_llama_greedy_equals_transformers_generate(llama, stages):
    graph, _, expected = llama  # rotary positions, grouped-query attention, an untied head
    order = list(graph.order)  # embed, layers.0-2, norm, lm_head
    cut = {1: None, 2: [order[:2], order[2:]], 3: [order[:2], order[2:4], order[4:]]}[stages]
    got = Generator(LocalPipeline(graph, cut), max_seqs=3).run(
        [Request(p, STEPS) for p in prompts()])
    assert got == expected
    assert len({t for seq in got for t in seq}) > 10


def test_the_shipped_llama_generates_the_same_through_two_stages():
    graph = G.load(str(ROOT / "graphs/llama.yaml"))
    reqs = [Request(p, 6) for p in prompts()[:2]]
    order = list(graph.order)
    one = Generator(LocalPipeline(graph)).run(reqs)
    two = Generator(LocalPipeline(graph, [order[:5], order[5:]])).run(reqs)
    assert one == two and all(len(t) == 6 for t in one)
