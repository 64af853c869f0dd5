"""How fast the strategies cut large graphs, and proof that cutting allocates no weights.

``fastserve bench partition`` renders :func:`run_bench`. For each graph (a synthetic chain of
10,000 linear nodes with irregular widths, and GPT-3 175B compiled on the meta device) it times
every strategy twice over:

* ``cold``: the first :func:`partition` call on a freshly compiled graph, including the
  topological order and the cost arrays the strategies share (and :func:`verify`);
* ``warm``: the best of ``repeat`` further calls (the cost arrays are cached per graph).

It also records the process's peak resident memory (``getrusage``), which stays far below the
graphs' weight bytes: compiling and cutting never materialise a weight.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve.graph.graph import Graph
from fastserve.partition.dispatch import partition
from fastserve.partition.sharding import Sharding


@dataclass(frozen=True)
class BenchRow:
    graph: str
    nodes: int
    shards: int
    strategy: str
    options: str
    cold_seconds: float
    warm_seconds: float
    imbalance: float  # largest / mean by the cost the strategy balances
    largest_memory_bytes: int  # of the largest shard at batch 1

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BenchGraph:
    name: str
    nodes: int
    weight_bytes: int
    compile_seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BenchReport:
    graphs: tuple[BenchGraph, ...]
    rows: tuple[BenchRow, ...]
    peak_rss_bytes: int
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"graphs": [g.to_json() for g in self.graphs],
                "rows": [r.to_json() for r in self.rows],
                "peak_rss_bytes": self.peak_rss_bytes, "notes": list(self.notes)}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def default_gpt3_spec() -> Path | None:
    """``graphs/gpt3-175b.yaml`` of the source tree, or of the working directory."""
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        path = base / "graphs" / "gpt3-175b.yaml"
        if path.is_file():
            return path
    return None


def run_bench(chain_nodes: int = 10_000, chain_shards: int = 64,
              gpt3_spec: str | Path | None = None, gpt3_shards: int = 16,
              repeat: int = 3, trust_code: bool = False) -> BenchReport:
    """Time the strategies on a synthetic chain and on GPT-3 175B (if its spec is found);
    ``trust_code`` is passed to :func:`fastserve.graph.load_spec` for that spec."""
    from fastserve.graph import compile_graph, load_spec
    from fastserve.partition.synthetic import chain_spec
    from fastserve.graph.loader import spec_from_dict

    graphs, rows, notes = [], [], []
    t0 = time.perf_counter()
    chain = compile_graph(spec_from_dict(chain_spec(chain_nodes, seed=0)))
    graphs.append(BenchGraph(chain.name, len(chain), chain.params_bytes,
                             time.perf_counter() - t0))
    rows += _bench_graph(chain, chain_shards, repeat)

    path = Path(gpt3_spec) if gpt3_spec else default_gpt3_spec()
    if path is None or not path.is_file():
        notes.append("graphs/gpt3-175b.yaml not found: GPT-3 175B skipped (pass --gpt3 PATH)")
    else:
        t0 = time.perf_counter()
        gpt3 = compile_graph(load_spec(path, trust_code=trust_code))
        graphs.append(BenchGraph(gpt3.name, len(gpt3), gpt3.params_bytes,
                                 time.perf_counter() - t0))
        rows += _bench_graph(gpt3, gpt3_shards, repeat)
    return BenchReport(tuple(graphs), tuple(rows), peak_rss_bytes(), tuple(notes))


def _forget(graph: Graph) -> None:
    """Drop what earlier calls cached on ``graph`` (its order, tensor maps, cost arrays)."""
    from fastserve.partition.chain import _CACHE

    for name in ("order", "layers", "producers", "tensors"):
        graph.__dict__.pop(name, None)
    _CACHE.pop(graph, None)


def _bench_graph(graph: Graph, shards: int, repeat: int) -> list[BenchRow]:
    shards = min(shards, len(graph))
    # hybrid's caps: 10% above the largest shard of the weight cut, so a solution exists
    by_params = partition(graph, "weight", shards=shards)
    cap = int(max(s.memory_bytes(1) for s in by_params) * 1.1)
    cases = [
        ("weight", {"shards": shards, "by": "params"}, "params"),
        ("weight", {"shards": shards, "by": "flops"}, "flops"),
        ("weight", {"shards": shards, "by": "flops",
                    "capacities": [1.0 + (i % 3) for i in range(shards)]}, "flops"),
        ("layer", {"shards": shards}, "flops"),
        ("hybrid", {"shards": shards, "memory_caps": cap, "batch": 1}, "flops"),
    ]
    rows = []
    for strategy, options, balanced in cases:
        _forget(graph)  # cold: as if the graph had just been compiled
        t0 = time.perf_counter()
        partition(graph, strategy, **options)
        cold = time.perf_counter() - t0
        warm = float("inf")
        result: Sharding | None = None
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            result = partition(graph, strategy, **options)
            warm = min(warm, time.perf_counter() - t0)
        assert result is not None
        rows.append(BenchRow(graph.name, len(graph), shards, strategy, _describe(options),
                             cold, warm, result.imbalance_by(balanced),
                             max(s.memory_bytes(1) for s in result)))
    return rows


def _describe(options: dict[str, Any]) -> str:
    out = []
    for k, v in options.items():
        if k == "shards":
            continue
        if k == "capacities":
            v = "1,2,3,1,2,3,..."
        elif k == "memory_caps":
            from fastserve.units import format_bytes

            v = format_bytes(v)
        out.append(f"{k}={v}")
    return " ".join(out)
