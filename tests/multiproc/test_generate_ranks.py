"""Generation on rank processes: each stage's rank holds its sequences' caches; tokens equal
transformers' ``generate()``; a rank killed mid-generation is named."""

from __future__ import annotations

import signal
import time

import pytest

from fastserve.engine import Deployment, Layout
from fastserve.errors import RankDeadError
from fastserve.generate import DeploymentPipeline, Generator, Request
from lms import hf_gpt2, hf_greedy, hf_llama, prompts, small_gpt2, small_llama

pytestmark = pytest.mark.timeout(120)
STEPS = 10


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    spec, weights = small_gpt2(tmp_path_factory.mktemp("lm"))
    model = hf_gpt2(weights)
    return spec, [hf_greedy(model, p, STEPS) for p in prompts()]


# 2 stages on ranks: tests/cli/test_cli_generate.py and the llama test below
@pytest.mark.parametrize("layout", [Layout(1, 3), Layout(2, 1)], ids=["3-stages", "2-replicas"])
def test_greedy_on_ranks_equals_transformers_generate(lm, layout):
    spec, expected = lm
    with Deployment.from_spec(spec, layout, timeout=30) as dep:
        gen = Generator(DeploymentPipeline(dep), max_seqs=2)
        assert gen.run([Request(p, STEPS) for p in prompts()]) == expected
        stats = dep.control("stats")
        assert {r: (s["kv_bytes"], s["sequences"]) for r, s in stats.items()} == \
            {r.rank: (0, 0) for r in dep.plan.ranks}  # every cache dropped at the end
        assert all(s["processed"] > 0 and s["errors"] == 0 for s in stats.values())


def test_rank_killed_mid_generation_is_named(lm):
    spec, expected = lm
    with Deployment.from_spec(spec, Layout(1, 2), timeout=30) as dep:
        gen = Generator(DeploymentPipeline(dep))
        sid = gen.submit(Request(prompts()[0], 50))
        got = []
        while len(got) < 3:
            got += [e.token for e in gen.poll() if e.seq == sid and e.token is not None]
        assert got == expected[0][:len(got)]
        dep.ranks[1].process.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankDeadError) as info:
            while gen.active:
                gen.poll()
        assert time.monotonic() - start < 3
        assert info.value.rank == 1 and "SIGKILL" in str(info.value)


def test_llama_on_two_stages_equals_transformers_generate(tmp_path):
    spec, weights = small_llama(tmp_path)
    model = hf_llama(weights)
    expected = [hf_greedy(model, p, STEPS) for p in prompts()]
    with Deployment.from_spec(spec, Layout(1, 2), timeout=30) as dep:
        gen = Generator(DeploymentPipeline(dep), max_seqs=2)
        assert gen.run([Request(p, STEPS) for p in prompts()]) == expected
