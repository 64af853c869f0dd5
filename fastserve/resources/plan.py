"""The Plan: the one contract from the planner to the engine.

A plan says everything the engine needs to run a graph and nothing it has to decide again: the
replicas and stages, the cut (the nodes of each stage, in order), each rank's host, threads and
memory, the micro-batches, the transport, and what the planner predicted. It is pure data: it
prints, round-trips through JSON (``fastserve plan --json > plan.json``; ``fastserve run SPEC
--plan plan.json``), and carries a content hash over the graph it was made for and itself, so a
plan is never run on another graph, and a rank holding another plan's shard is refused.

A plan file is untrusted input: :meth:`Plan.from_json` checks every field before use.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastserve.errors import PlanFileError
from fastserve.graph import Graph
from fastserve.limits import MAX_THREADS

FORMAT = "fastserve-plan"
VERSION = 1
TRANSPORTS = ("ipc", "tcp")
MODES = ("single", "data", "model", "hybrid")
MAX_WIDTH = 64  # ranks of one stage in a replica (what a rank's output fans out to)


@dataclass(frozen=True)
class RankPlan:
    rank: int
    replica: int
    stage: int
    host: str
    threads: int
    memory_bytes: int


@dataclass(frozen=True)
class StagePlan:
    stage: int
    nodes: tuple[str, ...]
    host: str
    threads: int
    compute_s: float
    transfer_s: float
    memory_bytes: int
    bottleneck: bool


@dataclass(frozen=True)
class Plan:
    """A chosen allocation and its predictions (seconds for one batch of ``batch`` samples).

    Every replica runs the same cut, ``stage_plans[k].nodes``. Stage ``k`` of each replica has
    ``width(k)`` ranks, which share its micro-batches (a stage widened alone, when it is the
    bottleneck: :func:`widen`); ranks are numbered replica by replica, stage by stage, so
    without widening rank ``r * stages + k`` is stage ``k`` of replica ``r``."""

    graph: str
    mode: str
    replicas: int
    stages: int
    micro_batches: int
    batch: int
    ranks: tuple[RankPlan, ...]
    stage_plans: tuple[StagePlan, ...]
    latency_s: float
    throughput: float  # samples per second
    bubble: float
    # where each stage ends in the order of its nodes: graph.order, or that of a fixed cut
    bounds: tuple[int, ...]
    # per micro-batch round: the coordinator sending every replica's inputs and receiving and
    # merging its outputs
    coordinator_s: float = 0.0
    # how far the search was exhaustive: "exact", or how each range of rank counts was searched
    search: str = "exact"
    transport: str = "ipc"
    alternatives: tuple[dict, ...] = field(default_factory=tuple)
    # ranks per stage in each replica; empty when every stage has one (the file then has no
    # "widths", so plans written before widening keep their hash)
    widths: tuple[int, ...] = ()

    def width(self, stage: int) -> int:
        return self.widths[stage] if self.widths else 1

    @property
    def per_replica(self) -> int:
        """Ranks in each replica."""
        return sum(self.widths) if self.widths else self.stages

    def stage_ranks(self, replica: int, stage: int) -> tuple[RankPlan, ...]:
        """The ranks of stage ``stage`` of replica ``replica``."""
        first = replica * self.per_replica + sum(self.width(k) for k in range(stage))
        return self.ranks[first:first + self.width(stage)]

    @property
    def cut(self) -> tuple[tuple[str, ...], ...]:
        """The nodes of each stage, in order."""
        return tuple(s.nodes for s in self.stage_plans)

    def with_transport(self, transport: str) -> Plan:
        if transport not in TRANSPORTS:
            raise PlanFileError(f"transport must be one of {', '.join(TRANSPORTS)}, not "
                                f"'{transport}'")
        return replace(self, transport=transport)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["alternatives"] = list(self.alternatives)
        if not self.widths:
            del doc["widths"]
        return doc

    def hash(self, graph: Graph, digest: str | None = None) -> str:
        """A content hash over ``graph`` and this plan's decisions (not its alternatives);
        ``digest`` is :func:`graph_digest` of ``graph`` when the caller has it already."""
        doc = self.to_json()
        doc.pop("alternatives")
        return _sha256({"graph": digest or graph_digest(graph), "plan": doc})

    def document(self, graph: Graph) -> dict:
        """The plan file's content: the plan, the digest of its graph and its hash."""
        digest = graph_digest(graph)
        return {"format": FORMAT, "version": VERSION, "graph_digest": digest,
                "hash": self.hash(graph, digest), "plan": self.to_json()}

    @staticmethod
    def from_json(doc: Any, file: str | None = None) -> Plan:
        """A plan from :meth:`to_json`'s document, every field checked (a plan file is input
        like any other); raise :class:`PlanFileError` naming the key otherwise."""
        return _read_plan(doc, file)


def load_plan(path: str, graph: Graph) -> Plan:
    """Read a plan file written by ``fastserve plan --json`` and check that it was made for
    ``graph`` and is intact."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise PlanFileError(f"cannot read the plan: {e.strerror}", file=path) from None
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanFileError(f"the plan is over {MAX_PLAN_BYTES >> 20} MiB", file=path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        line = getattr(e, "lineno", None)
        raise PlanFileError(f"not a JSON plan file ({type(e).__name__}); write one with "
                            f"'fastserve plan SPEC --json > plan.json'", file=path,
                            line=line) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanFileError(f"not a plan file: expected \"format\": \"{FORMAT}\"; write one "
                            f"with 'fastserve plan SPEC --json > plan.json'", file=path,
                            key="format")
    if doc.get("version") != VERSION:
        raise PlanFileError(f"plan format version {doc.get('version')!r}; this FastServe reads "
                            f"version {VERSION}", file=path, key="version")
    plan = Plan.from_json(doc.get("plan"), path)
    digest = graph_digest(graph)
    if doc.get("graph_digest") != digest:
        raise PlanFileError(f"the plan was made for another graph than '{graph.name}' (or "
                            f"other dims); plan it again with 'fastserve plan'", file=path,
                            key="graph_digest")
    if doc.get("hash") != plan.hash(graph, digest):
        raise PlanFileError("the plan's content does not match its hash: it was edited or "
                            "damaged; plan it again with 'fastserve plan'", file=path, key="hash")
    check_plan(plan, graph, path)
    return plan


MAX_PLAN_BYTES = 64 << 20


def check_plan(plan: Plan, graph: Graph, file: str | None = None) -> None:
    """Raise :class:`PlanFileError` unless ``plan`` is runnable on ``graph``: ranks numbered
    replica by replica and stage by stage, as many per stage as its width, stages covering the
    graph's nodes in order exactly once."""
    if plan.graph != graph.name:
        raise PlanFileError(f"the plan is for graph '{plan.graph}', not '{graph.name}'",
                            file=file, key="plan.graph")
    if plan.widths and (len(plan.widths) != plan.stages or min(plan.widths) < 1
                        or max(plan.widths) == 1 or max(plan.widths) > MAX_WIDTH):
        raise PlanFileError(f"widths must give each of the {plan.stages} stage(s) 1 to "
                            f"{MAX_WIDTH} ranks, and one stage more than one (none: leave "
                            f"widths out)", file=file, key="plan.widths")
    need = plan.replicas * plan.per_replica
    if len(plan.stage_plans) != plan.stages or len(plan.ranks) != need:
        raise PlanFileError(f"{plan.replicas} replica(s) x {plan.stages} stage(s) need "
                            f"{need} ranks and {plan.stages} stage plans; the plan has "
                            f"{len(plan.ranks)} and {len(plan.stage_plans)}", file=file,
                            key="plan.ranks")
    expected = [(replica, stage) for replica in range(plan.replicas)
                for stage in range(plan.stages) for _ in range(plan.width(stage))]
    for i, (r, (replica, stage)) in enumerate(zip(plan.ranks, expected)):
        if (r.rank, r.replica, r.stage) != (i, replica, stage):
            raise PlanFileError(f"rank {i} must be replica {replica}, stage {stage}", file=file,
                                key=f"plan.ranks[{i}]")
    order = [n for s in plan.stage_plans for n in s.nodes]
    if sorted(order) != sorted(graph.order):
        raise PlanFileError("the stages' nodes do not cover the graph's nodes exactly once",
                            file=file, key="plan.stage_plans")
    if any(not s.nodes for s in plan.stage_plans):
        raise PlanFileError("a stage without nodes", file=file, key="plan.stage_plans")


def graph_digest(graph: Graph) -> str:
    """sha256 over what defines a graph's computation: its nodes (op, arguments, inputs),
    tensors, dims and where its weights come from."""
    spec = graph.spec
    nodes = {n.id: {"op": n.op, "args": n.args, "inputs": list(n.inputs)} for n in spec.nodes}
    weights = {"seed": spec.weights.seed, "checkpoint": spec.weights.checkpoint}
    source = None if spec.source is None else {"factory": spec.source.factory,
                                               "kwargs": spec.source.kwargs}
    # a captured node's program is its computation (the ops a rank will run)
    programs = {n: graph.node(n).get("program") for n in graph.order
                if graph.node(n).get("program") is not None}
    return _sha256({"graph": graph.to_json(), "nodes": nodes, "weights": weights,
                    "source": source, "programs": programs})


def _sha256(doc: Any) -> str:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=repr)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --- reading a plan document, every field checked ---------------------------------------------

def _read_plan(doc: Any, file: str | None) -> Plan:
    where = "plan"
    m = _map(doc, where, file)
    ranks = tuple(RankPlan(
        rank=_int(r, "rank", f"{where}.ranks[{i}]", file),
        replica=_int(r, "replica", f"{where}.ranks[{i}]", file),
        stage=_int(r, "stage", f"{where}.ranks[{i}]", file),
        host=_str(r, "host", f"{where}.ranks[{i}]", file),
        threads=_int(r, "threads", f"{where}.ranks[{i}]", file, low=1, high=MAX_THREADS),
        memory_bytes=_int(r, "memory_bytes", f"{where}.ranks[{i}]", file))
        for i, r in enumerate(_maps(m, "ranks", where, file)))
    stages = tuple(StagePlan(
        stage=_int(s, "stage", f"{where}.stage_plans[{i}]", file),
        nodes=_strs(s, "nodes", f"{where}.stage_plans[{i}]", file),
        host=_str(s, "host", f"{where}.stage_plans[{i}]", file),
        threads=_int(s, "threads", f"{where}.stage_plans[{i}]", file, low=1,
                     high=MAX_THREADS),
        compute_s=_num(s, "compute_s", f"{where}.stage_plans[{i}]", file),
        transfer_s=_num(s, "transfer_s", f"{where}.stage_plans[{i}]", file),
        memory_bytes=_int(s, "memory_bytes", f"{where}.stage_plans[{i}]", file),
        bottleneck=_bool(s, "bottleneck", f"{where}.stage_plans[{i}]", file))
        for i, s in enumerate(_maps(m, "stage_plans", where, file)))
    mode = _str(m, "mode", where, file)
    transport = _str(m, "transport", where, file)
    if mode not in MODES:
        raise PlanFileError(f"expected one of {', '.join(MODES)}, got '{mode}'", file=file,
                            key=f"{where}.mode")
    if transport not in TRANSPORTS:
        raise PlanFileError(f"expected one of {', '.join(TRANSPORTS)}, got '{transport}'",
                            file=file, key=f"{where}.transport")
    bounds = m.get("bounds")
    if not isinstance(bounds, list) or not all(type(b) is int and b >= 0 for b in bounds):
        raise PlanFileError("expected a list of non-negative ints", file=file,
                            key=f"{where}.bounds")
    widths = m.get("widths", [])
    if not isinstance(widths, list) or len(widths) > _LIMIT or \
            not all(type(w) is int and 1 <= w <= _LIMIT for w in widths):
        raise PlanFileError("expected a list of positive ints, one per stage", file=file,
                            key=f"{where}.widths")
    alternatives = m.get("alternatives", [])
    if not isinstance(alternatives, list) or not all(isinstance(a, dict) for a in alternatives):
        raise PlanFileError("expected a list of maps", file=file, key=f"{where}.alternatives")
    return Plan(graph=_str(m, "graph", where, file), mode=mode,
                replicas=_int(m, "replicas", where, file, low=1),
                stages=_int(m, "stages", where, file, low=1),
                micro_batches=_int(m, "micro_batches", where, file, low=1),
                batch=_int(m, "batch", where, file, low=1), ranks=ranks, stage_plans=stages,
                latency_s=_num(m, "latency_s", where, file),
                throughput=_num(m, "throughput", where, file),
                bubble=_num(m, "bubble", where, file), bounds=tuple(bounds),
                coordinator_s=_num(m, "coordinator_s", where, file),
                search=_str(m, "search", where, file), transport=transport,
                alternatives=tuple(alternatives), widths=tuple(widths))


_LIMIT = 1 << 20  # ranks, stages, nodes: far above any real plan


def _map(v: Any, where: str, file: str | None) -> dict:
    if not isinstance(v, dict):
        raise PlanFileError(f"expected a map, got {type(v).__name__}", file=file, key=where)
    return v


def _field(m: dict, key: str, where: str, file: str | None) -> Any:
    if key not in m:
        raise PlanFileError("missing", file=file, key=f"{where}.{key}")
    return m[key]


def _int(m: Any, key: str, where: str, file: str | None, low: int = 0,
         high: int = 1 << 62) -> int:
    v = _field(_map(m, where, file), key, where, file)
    if type(v) is not int or not low <= v <= high:
        bound = f">= {low}" if high == 1 << 62 else f"from {low} to {high}"
        raise PlanFileError(f"expected an int {bound}, got {v!r:.40}", file=file,
                            key=f"{where}.{key}")
    return v


def _num(m: dict, key: str, where: str, file: str | None) -> float:
    v = _field(m, key, where, file)
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
        raise PlanFileError(f"expected a non-negative number, got {v!r:.40}", file=file,
                            key=f"{where}.{key}")
    return float(v)


def _str(m: Any, key: str, where: str, file: str | None) -> str:
    v = _field(_map(m, where, file), key, where, file)
    if type(v) is not str or len(v) > 4096:
        raise PlanFileError(f"expected a string, got {v!r:.40}", file=file, key=f"{where}.{key}")
    return v


def _bool(m: dict, key: str, where: str, file: str | None) -> bool:
    v = _field(m, key, where, file)
    if type(v) is not bool:
        raise PlanFileError(f"expected true or false, got {v!r:.40}", file=file,
                            key=f"{where}.{key}")
    return v


def _strs(m: dict, key: str, where: str, file: str | None) -> tuple[str, ...]:
    v = _field(m, key, where, file)
    if not isinstance(v, list) or len(v) > _LIMIT or not all(type(x) is str for x in v):
        raise PlanFileError("expected a list of node ids", file=file, key=f"{where}.{key}")
    return tuple(v)


def _maps(m: dict, key: str, where: str, file: str | None) -> list[dict]:
    v = _field(m, key, where, file)
    if not isinstance(v, list) or len(v) > _LIMIT:
        raise PlanFileError("expected a list", file=file, key=f"{where}.{key}")
    for i, x in enumerate(v):
        _map(x, f"{where}.{key}[{i}]", file)
    return v
