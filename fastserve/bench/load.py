"""What loading a captured model costs: each rank's memory and time to ready, and the driver's.

For each model (transformers BERT and Llama built by :mod:`fastserve.graph.zoo`), the benchmark
writes a safetensors checkpoint and a spec naming the factory and the checkpoint, then measures
what a user's ``fastserve run`` pays:

* the driver: resident memory added while it compiles and plans the spec (it should hold no
  weights at all);
* each rank: resident memory of an idle rank (code and the captured program, no weights), its
  peak while loading and its resident memory once ready, against its shard's weight bytes;
  seconds from receiving its shard to ready, and of those, seconds spent reading weights.

The run's outputs are checked against the single-process reference, so a fast load that gives
wrong weights cannot pass for a good one.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

MODELS = {
    # zoo factory and its arguments per model, at a given depth and width
    "bert": ("hf_bert", lambda layers, hidden: {
        "n_layer": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden,
        "n_head": max(1, hidden // 64), "vocab_size": 8192, "max_position_embeddings": 512,
        "pooler": False}),
    "llama": ("hf_llama", lambda layers, hidden: {
        "n_layer": layers, "hidden_size": hidden, "intermediate_size": 3 * hidden,
        "n_head": max(1, hidden // 64), "n_kv_head": max(1, hidden // 128),
        "vocab_size": 8192, "max_position_embeddings": 512}),
}


def write_model(directory: str | Path, model: str, layers: int, hidden: int, seq: int,
                seed: int = 0) -> tuple[Path, int]:
    """Write ``<model>.safetensors`` (seeded random weights) and a spec naming it; return the
    spec's path and the checkpoint's weight bytes."""
    from safetensors.torch import save_model

    from fastserve.graph import zoo

    factory, kwargs_of = MODELS[model]
    kwargs = kwargs_of(layers, hidden)
    torch.manual_seed(seed)
    module = getattr(zoo, factory)(**kwargs)
    directory = Path(directory)
    save_model(module, str(directory / f"{model}.safetensors"))
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    del module
    spec = {"name": f"{model}-{layers}x{hidden}", "dims": {"seq": seq},
            "weights": {"checkpoint": f"{model}.safetensors"},
            "source": {"torch": f"fastserve.graph.zoo:{factory}", "kwargs": kwargs,
                       "example_inputs": {"input_ids": {"shape": ["batch", "seq"],
                                                        "dtype": "int64", "high": 8192}}}}
    path = directory / f"{model}.yaml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return path, weight_bytes


def bench_load(models=("bert", "llama"), *, layers: int = 12, hidden: int = 768,
               stages: int = 2, replicas: int = 1, seq: int = 128, batch: int = 4,
               progress: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """One row per model: the driver's memory and every rank's memory and time to ready."""
    from fastserve.engine.deployment import Deployment
    from fastserve.engine.rank import peak_resident_bytes, reset_peak_resident, resident_bytes
    from fastserve.graph import compile_graph, load_spec, random_inputs, reference
    from fastserve.resources.inventory import local_inventory
    from fastserve.resources.planner import Constraints, plan

    rows = []
    for model in models:
        with tempfile.TemporaryDirectory(prefix="fastserve-bench-load-") as d:
            progress(f"{model}: writing a {layers}-layer, {hidden}-wide checkpoint")
            spec, weight_bytes = write_model(d, model, layers, hidden, seq)
            gc.collect()
            progress(f"{model}: compiling and planning ({replicas} replica(s) x {stages} "
                     f"stage(s))")
            reset_peak_resident()
            before = resident_bytes()
            t0 = time.perf_counter()
            graph = compile_graph(load_spec(spec, trust_code=True))
            chosen = plan(graph, local_inventory(), constraints=Constraints(
                replicas=replicas, stages=stages, threads=1, batch=batch))
            compile_s = time.perf_counter() - t0
            driver_added = peak_resident_bytes() - before
            progress(f"{model}: starting {chosen.replicas * chosen.stages} rank(s)")
            inputs = random_inputs(graph, batch)
            t0 = time.perf_counter()
            with Deployment(graph, chosen, trust_code=True, timeout=300,
                            load_timeout=600) as dep:
                start_s = time.perf_counter() - t0
                out = dep.run(inputs)
                ranks = [_rank_row(r, m) for r, m in sorted(dep.ready.items())]
            progress(f"{model}: checking the outputs against one process")
            expected = reference(graph, inputs)
            exact = all(torch.equal(out[k], expected[k]) for k in expected)
            rows.append({"model": model, "graph": graph.name, "weight_bytes": weight_bytes,
                         "replicas": chosen.replicas, "stages": chosen.stages,
                         "driver_compile_s": compile_s, "driver_added_bytes": driver_added,
                         "driver_added_over_weights": driver_added / weight_bytes,
                         "deploy_s": start_s, "exact": exact, "ranks": ranks})
    return rows


def _rank_row(rank: int, m: dict) -> dict:
    weights = max(1, m["weight_bytes"])
    return {"rank": rank, "weight_bytes": m["weight_bytes"], "rss_idle": m["rss_before_load"],
            "peak_over_weights": (m["rss_peak"] - m["rss_before_load"]) / weights,
            "loaded_over_weights": (m["rss"] - m["rss_before_load"]) / weights,
            "load_s": m["load_s"], "read_s": m.get("read_s")}
