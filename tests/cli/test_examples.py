"""The examples are documentation: each must run as shipped and print what it says it shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# lines each example must print (regular expressions, each matched against one whole line)
PRINTS = {
    "01_compile_and_check.py": [
        # GPT-2 small at seq 32: 7.9 GFLOPs of matmuls per sample
        r"gpt2: \d+ nodes, 124,439,808 parameters, 7\.9 GFLOPs per sample",
        r"logits \(2, 32, 50257\), finite: True",
    ],
    "02_python_builder.py": [
        r"edges into 'join': \['left', 'right'\]",
        r"join: \(5, 4\)",
    ],
    "03_partition.py": [
        r"layer  \d+ shards \[wte\.\..*\].*",
        r"weight 4 shards \[wte\.\..*\.\.lm_head\].*",
        r"hybrid 4 shards \[wte\.\..*\.\.lm_head\].*",
        r"valid: 4 shards chained reproduce the reference outputs \(batch 2, seed \d+\)",
        r"exported shards, loaded one by one: logits \(2, 16, 50257\) match the reference",
    ],
    "04_plan_and_serve.py": [
        r"plan: \w+, \d+ x \d+, \d+ micro-batch\(es\); .*",
        r"served 128 samples in .* every output equals the reference",
    ],
    "06_generate.py": [
        r"streamed 8 tokens: \[\d+(, \d+){7}\]",
        r"cache bytes per rank once every sequence ended: \{0: 0, 1: 0\}",
        r"4 prompts of \[2, 3, 6\] tokens, greedy and sampled; the first equals its stream alone",
    ],
    "05_three_hosts.py": [
        *(rf"rank {k} \(stage {k}\) ran on host \S+ at 127\.0\.0\.\d:\d+" for k in range(3)),
        r"the pipeline over three hosts equals the single-process reference, to the last bit",
    ],
    "07_widen_stage.py": [
        r"predicted seconds per micro-batch by stage: \[.*\]; widening pays for stage 1",
        r"two replicas' worth of throughput in the fewest ranks: 1 replica\(s\), ranks per "
        r"stage \[1, 2\]",
        # 3 batches of 8 micro-batches: the first stage takes all 24, its two ranks share them
        r"3 ranks, micro-batches each took: \{0: 24, 1: \d+, 2: \d+\}; every output equals "
        r"the reference",
    ],
}


# examples whose ground the default run covers elsewhere (partition and export tests, the hosts
# tests, the generation tests), run with -m slow to keep the default run within its time
SLOW = {"03_partition.py", "05_three_hosts.py", "06_generate.py"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
    for name in sorted(p.name for p in (ROOT / "examples").glob("*.py"))])
def test_example_runs(script):
    assert script in PRINTS, f"say above what examples/{script} prints"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True,
                         text=True, timeout=110, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    for pattern in PRINTS[script]:
        assert any(re.fullmatch(pattern, ln) for ln in lines), (pattern, run.stdout)
