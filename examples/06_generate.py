"""Generate text with a Llama-architecture graph: a 2-stage pipeline of rank processes, each
rank holding the KV cache of its own layers; tokens streamed as they come, then a batch of
prompts of different lengths generated together (each gets the tokens it gets alone).

    .venv/bin/python examples/06_generate.py
"""

from __future__ import annotations

from pathlib import Path

from fastserve.engine import Deployment, Layout
from fastserve.generate import DeploymentPipeline, Generator, Request, Sampling

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "graphs/llama.yaml")

prompts = [[1, 15043, 29892], [1, 306, 626, 263, 1243, 310], [1, 450]]
with Deployment.from_spec(SPEC, Layout(replicas=1, stages=2)) as dep:
    gen = Generator(DeploymentPipeline(dep), max_seqs=4)
    streamed = list(gen.stream(Request(prompts[0], max_tokens=8)))
    print(f"streamed 8 tokens: {streamed}")
    sampled = Request(prompts[1], max_tokens=8, sampling=Sampling(temperature=0.8, top_p=0.9,
                                                                  seed=7))
    batch = gen.run([Request(p, max_tokens=8) for p in prompts] + [sampled])
    cache = {r: s["kv_bytes"] for r, s in dep.control("stats").items()}
print(f"cache bytes per rank once every sequence ended: {cache}")
print(f"{len(batch)} prompts of {sorted({len(p) for p in prompts})} tokens, greedy and sampled; "
      f"the first {'equals' if batch[0] == streamed else 'DIFFERS FROM'} its stream alone")
