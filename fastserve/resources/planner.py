"""The planner: choose replicas, stages, micro-batches, the cut and the placement of every rank,
maximising predicted throughput (or minimising latency) under memory limits and an optional
latency target, and say why the alternatives lost.

Search space. A plan is ``d`` identical replicas of a ``p``-stage pipeline run with ``m``
micro-batches. Ranks are laid on hosts by a *packing*: each host runs ``n_h`` ranks sharing its
cores evenly (``cores_h // n_h`` threads each), and the ``d * p`` rank slots are dealt to the
replicas so that every replica gets the same mix of fast and slow slots (stage ``k`` of every
replica gets the same kind of slot). The cut of a replica is the exact min-max FLOPs cut sized
to its slots' speeds (``weight`` strategy with capacities).

Packings: every assignment of rank counts to hosts when the inventory is small (``exact``), or
counts proportional to each host's cores (``proportional``) when enumerating them all would be
too slow. Within the chosen packings the search is exhaustive over ``d``, ``p`` and ``m``, by
branch and bound on compute-only throughput (every rank busy all the time, no transfers, no
bubble), which no plan can exceed: shapes are visited best bound first and the search stops when
the best plan found beats the next bound; a packing whose ranks' FLOP/s cannot beat it is
skipped; and a cut's optimum is found (a bisection) before the cut itself is built, so a shape
whose balanced bottleneck cannot beat it costs no cut.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

from fastserve.errors import PartitionError, PlanError
from fastserve.graph import Graph
from fastserve.graph.decode import KV_BYTES, kv_bytes_per_token
from fastserve.partition import Sharding, shards_from_bounds, strategy_cut, weight_shards
from fastserve.partition.weight import weight_objective
from fastserve.units import format_bytes
from fastserve.resources import costmodel as cm
from fastserve.resources.inventory import Host, Inventory, Link
from fastserve.resources.plan import Plan, RankPlan, StagePlan

EXACT_LIMIT = 64  # packings enumerated host by host up to this many per rank count
GROUP_LIMIT = 512  # ... and group by group (identical hosts) up to this many


@dataclass(frozen=True)
class Constraints:
    """What the user fixes. ``None`` means the planner chooses."""

    parallel: str = "auto"  # auto | data | model | hybrid
    replicas: int | None = None
    stages: int | None = None
    micro_batches: int | None = None
    batch: int = 32
    latency_ms: float | None = None  # with the throughput objective: a ceiling
    # how stages are cut: None is the planner's own cut (min-max predicted time, sized to each
    # stage's speed); a strategy name cuts exactly as `fastserve partition --strategy` does
    # with the same shard count (weight: by parameter bytes; layer: equal layer counts;
    # hybrid: compute balanced under each rank's share of its host's memory)
    strategy: str | None = None
    cut: tuple[tuple[str, ...], ...] | None = None  # the nodes of each stage, fixed (an export)
    threads: int | None = None  # torch threads per rank; None: the host's cores shared evenly
    transport: str = "ipc"
    # generation: positions of KV cache (prompt and new tokens, over the sequences that run
    # together) every stage must hold beside its weights; a plan whose hosts cannot is refused
    kv_positions: int | None = None


@dataclass(frozen=True)
class _Slot:
    host: Host
    threads: int
    power: float  # FLOP/s of this rank


def _mode(d: int, p: int) -> str:
    return "data" if p == 1 and d > 1 else "model" if d == 1 and p > 1 else \
        "hybrid" if d > 1 else "single"


def _allowed(c: Constraints, d: int, p: int) -> bool:
    if c.replicas is not None and d != c.replicas:
        return False
    if c.stages is not None and p != c.stages:
        return False
    mode = _mode(d, p)
    return c.parallel == "auto" or mode == c.parallel or (mode == "single" and c.parallel in
                                                          ("data", "model"))


def _groups(inventory: Inventory) -> list[list[int]]:
    """Indices of interchangeable hosts: same cores, speed and memory, and no link of their
    own (a host named in a link entry is a group by itself)."""
    linked = {name for pair in inventory.links for name in pair}
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(inventory.hosts):
        key = (i,) if h.name in linked else (h.cores, h.speed, h.flops, h.memory_bytes)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _packing_search(inventory: Inventory, ranks: int) -> str:
    """How :func:`_packings` searches ``ranks`` ranks: ``hosts`` (every count per host),
    ``groups`` (every count per group of identical hosts, spread evenly in the group) or
    ``proportional`` (one packing, proportional to cores)."""
    hosts = inventory.hosts
    if math.comb(ranks + len(hosts) - 1, len(hosts) - 1) <= EXACT_LIMIT:
        return "hosts"
    g = len(_groups(inventory))
    if g < len(hosts) and math.comb(ranks + g - 1, g - 1) <= GROUP_LIMIT:
        return "groups"
    return "proportional"


def _packings(inventory: Inventory, ranks: int) -> Iterator[tuple[int, ...]]:
    """Rank counts per host summing to ``ranks``, none above the host's cores."""
    hosts = inventory.hosts
    caps = [h.cores for h in hosts]
    if sum(caps) < ranks:
        return
    search = _packing_search(inventory, ranks)
    if search == "hosts":
        yield from (c for c in _compositions(ranks, caps))
        return
    if search == "groups":
        groups = _groups(inventory)
        for per_group in _compositions(ranks, [sum(caps[i] for i in g) for g in groups]):
            counts = [0] * len(hosts)
            for members, n in zip(groups, per_group):
                base, extra = divmod(n, len(members))  # evenly: threads stay balanced
                for j, i in enumerate(members):
                    counts[i] = base + (j < extra)
            yield tuple(counts)
        return
    # proportional to cores (largest remainder), capped by cores
    total = sum(caps)
    raw = [ranks * c / total for c in caps]
    counts = [min(c, int(r)) for r, c in zip(raw, caps)]
    for i in sorted(range(len(hosts)), key=lambda i: raw[i] - int(raw[i]), reverse=True):
        if sum(counts) == ranks:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
    yield tuple(counts)


def _compositions(total: int, caps: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every way to write ``total`` as ``len(caps)`` counts, count i at most ``caps[i]``."""
    k = len(caps)
    for split in itertools.combinations(range(total + k - 1), k - 1):
        counts = tuple(b - a - 1 for a, b in zip((-1, *split), (*split, total + k - 1)))
        if all(n <= c for n, c in zip(counts, caps)):
            yield counts


def _oversubscribed(inventory: Inventory, ranks: int) -> tuple[int, ...]:
    """More ranks than cores, as the user fixed them: dealt round-robin over the hosts in
    proportion to their cores (the ranks then share cores, and predictions are optimistic)."""
    hosts = inventory.hosts
    counts = [0] * len(hosts)
    for i in range(ranks):
        j = min(range(len(hosts)), key=lambda k: (counts[k] / hosts[k].cores, k))
        counts[j] += 1
    return tuple(counts)


def _slots(hosts: Sequence[Host], counts: Sequence[int], d: int, p: int,
           profile: cm.Profile | None, fixed_threads: int | None = None
           ) -> list[list[_Slot]] | None:
    """Deal the packing's slots into ``d`` replicas of ``p`` stages with the same mix each."""
    slots = []
    for h, n in zip(hosts, counts):
        if n:
            threads = fixed_threads or max(1, h.cores // n)
            slots += [_Slot(h, threads, cm.host_flops(h, profile) * cm.speedup(threads))] * n
    slots.sort(key=lambda s: (-s.power, s.host.name))
    # every stage position takes d consecutive slots: identical replicas need identical slots
    groups = [slots[k * d:(k + 1) * d] for k in range(p)]
    if any(g[0].power != g[-1].power or g[0].threads != g[-1].threads for g in groups):
        return None
    return [[groups[k][r] for k in range(p)] for r in range(d)]


OBJECTIVES = ("throughput", "latency", "decode")


def plan(graph: Graph, inventory: Inventory, objective: str = "throughput",
         constraints: Constraints = Constraints(), profile: cm.Profile | None = None) -> Plan:
    """Choose the best plan for ``graph`` on ``inventory``; raise PlanError if none fits.

    ``objective``: ``throughput`` (samples/s), ``latency`` (one batch's seconds), or ``decode``:
    the fewest ranks that hold the model, then the lowest latency. A decode step pushes a few
    rows through every weight, so its cost is mostly that of reading the weights: a pipeline
    splits the sequences into one micro-batch per stage, each reading its stage's weights
    again, and each replica holds and reads all of them for its share of the sequences. On
    this 2-core machine (GPT-2 small, 8 sequences, medians of 4 interleaved runs) one rank made
    75 tokens/s, two replicas 76 and two stages 59: ranks beyond what memory needs bought
    nothing or lost, and each holds its weights and adds a hop per token.
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {', '.join(OBJECTIVES)}, not '{objective}'")
    c = constraints
    if c.cut is not None:  # a fixed cut fixes the stage count
        if c.stages not in (None, len(c.cut)):
            raise PlanError(f"the fixed cut has {len(c.cut)} stages, but stages={c.stages} "
                            f"was asked")
        c = replace(c, stages=len(c.cut))
    hosts = inventory.hosts
    total_work = c.batch * sum(cm.node_work(graph, n, profile) for n in graph.order)
    # upper bounds on the FLOP/s that R ranks can have: perfect scaling on every core, and R
    # times the fastest possible rank
    power_all = sum(cm.host_flops(h, profile) * h.cores for h in hosts)
    fastest_rank = max(cm.host_flops(h, profile) * cm.speedup(h.cores) for h in hosts)
    max_ranks = sum(h.cores for h in hosts)
    # the smallest shape the constraints allow runs even with more ranks than cores (they
    # then share cores): a fixed shape, or the least a mode needs (hybrid: 2 x 2)
    fixed = (c.replicas or (2 if c.parallel in ("data", "hybrid") else 1)) * \
        (c.stages or (2 if c.parallel in ("model", "hybrid") else 1))
    oversubscribed = fixed > max_ranks
    max_ranks = max(max_ranks, fixed)
    cuts: dict[tuple, tuple | None] = {}
    n_nodes = len(graph)
    best: Plan | None = None
    considered: list[dict] = []
    memory_short: list[int] = []
    # branch and bound, best bound first: the FLOP/s d*p ranks could have at most (perfect
    # scaling on every core, or d*p times the fastest rank) bounds a shape's throughput; once
    # the best plan found beats the next shape's bound, it beats every shape after it
    shapes = sorted(((min(power_all, d * p * fastest_rank), d, p)
                     for d in range(1, min(max_ranks, c.batch) + 1)
                     for p in range(1, min(n_nodes, max_ranks // d) + 1)
                     if _allowed(c, d, p)), key=lambda t: (-t[0], t[1], t[2]))
    prune = objective == "throughput"
    searched: dict[str, set[int]] = {}  # how each rank count's packings were searched
    for bound, d, p in shapes:
        if prune and best is not None and c.batch * bound / total_work <= best.throughput:
            break
        how = "oversubscribed" if oversubscribed else _packing_search(inventory, d * p)
        searched.setdefault(how, set()).add(d * p)
        packings = [_oversubscribed(inventory, d * p)] if oversubscribed else \
            _packings(inventory, d * p)
        for counts in packings:
            replicas = _slots(hosts, counts, d, p, profile, c.threads)
            if replicas is None:
                continue
            # the same bound with this packing's FLOP/s
            if prune and best is not None and c.batch * d * sum(
                    s.power for s in replicas[0]) / total_work <= best.throughput:
                continue
            floor = best.throughput if prune and best is not None else None
            for cand in _evaluate(graph, inventory, replicas, d, p, c, profile, memory_short,
                                  cuts, floor):
                considered.append(cand.summary())
                if _better(cand, best, objective, c):
                    best = cand.plan()
    if best is None:
        if memory_short:
            kv = f" with a KV cache of {c.kv_positions} positions (at most " \
                f"{format_bytes(KV_BYTES)} a rank)" if c.kv_positions else ""
            raise PlanError(f"no plan fits in memory: the model{kv} needs at least "
                            f"{format_bytes(min(memory_short))} more than the cluster "
                            f"'{inventory.name}' offers in its best layout" + (
                                "; fewer sequences at once or fewer tokens each need fewer "
                                "positions" if kv else ""))
        raise PlanError("no plan satisfies the constraints "
                        f"{ {k: v for k, v in asdict(c).items() if v is not None} }")
    best = replace(best, search=_describe(searched))
    return _with_alternatives(best, considered, objective, c)


def _describe(searched: dict[str, set[int]]) -> str:
    """Say how exhaustive the search was: the best of a partial search is not proven best."""
    if set(searched) <= {"hosts"}:
        return "exact"
    what = {"hosts": "every packing on the hosts",
            "oversubscribed": "more ranks than cores, as fixed by the constraints",
            "groups": "every split between groups of identical hosts, even within a group",
            "proportional": "one packing proportional to cores (not exhaustive)"}
    return "; ".join((f"{len(r)} rank counts ({min(r)}..{max(r)})" if len(r) > 1 else
                      f"rank count {min(r)}") + f": {what[k]}"
                     for k, r in sorted(searched.items()))


def _evaluate(graph: Graph, inventory: Inventory, replicas: list[list[_Slot]], d: int, p: int,
              c: Constraints, profile, memory_short: list[int],
              cuts: dict[tuple, _Cut | None], floor: float | None = None) -> list[_Candidate]:
    slots = replicas[0]
    top = max(s.power for s in slots)
    key = tuple(round(s.power / top, 9) for s in slots)  # the cut only sees relative speeds
    if c.strategy == "hybrid":  # the cut depends on each rank's memory share too
        key = (*key, *(_memory_share(s.host, replicas) for s in slots))
    if key not in cuts:  # many packings give the same speeds: cut and cost once
        try:
            if c.cut is not None:
                cuts[key] = _FixedCut(graph, c.cut, profile)
            elif c.strategy is None:
                cuts[key] = _Cut(graph, key, profile)
            else:
                cuts[key] = _StrategyCut(graph, c.strategy, p, profile,
                                         [_memory_share(s.host, replicas) for s in slots])
        except PartitionError:  # more stages than nodes, or memory caps nothing fits in
            cuts[key] = None
    cut = cuts[key]
    if cut is None:
        return []
    # the optimal cut's bottleneck bounds throughput (compute only, every rank busy): skip
    # building the cut when even that cannot beat the best plan found
    if floor is not None and cut.objective is not None and d * top / cut.objective <= floor:
        return []
    sharding, costs = cut.sharding, cut.costs
    per_replica = math.ceil(c.batch / d)
    plans = []
    ms = [c.micro_batches] if c.micro_batches else \
        [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= per_replica]
    stages_on: dict[Host, list[int]] = {}  # host -> stage of each rank it runs
    for rep in replicas:
        for k, slot in enumerate(rep):
            stages_on.setdefault(slot.host, []).append(k)
    hosts = sorted(h.name for h in stages_on)
    coordinator = inventory.hosts[0].name  # the driver runs on the inventory's first host

    def link(a: str, b: str) -> Link:
        """A hop: the inventory's link, or the message cost measured between live processes
        when the hop stays on one host and the profile measured it."""
        measured = profile.message_seconds if profile is not None else None
        ln = inventory.link(a, b)
        return Link(ln.bandwidth, measured) if measured is not None and a == b else ln
    # generation: room for the caches beside each shard, counted as the ranks' budget is
    # (fastserve.generate.pipeline.kv_budget): a rank gets an even share of its host's memory
    # less its predicted memory, every stage holds the same positions, a cache grows by
    # doubling (up to twice its positions are allocated), and a rank holds at most KV_BYTES.
    # The plan's rank memory stays without it: what a rank has left becomes its cache budget
    cache = 2 * c.kv_positions * max(kv_bytes_per_token(graph, s.nodes)
                                     for s in sharding.shards) if c.kv_positions else 0
    for m in ms:
        b = cm.micro_batch_size(c.batch, d, m)
        mem = [sc.memory(b) for sc in costs]
        if cache:
            over = max(0, cache - KV_BYTES) + sum(
                max(0, mem[k] + cache - h.memory_bytes // len(ks))
                for h, ks in stages_on.items() for k in ks)
        else:
            over = sum(max(0, sum(mem[k] for k in ks) - h.memory_bytes)
                       for h, ks in stages_on.items())
        if over:
            memory_short.append(over)
            continue
        comp = [sc.seconds(b, slot.power) for sc, slot in zip(costs, slots)]
        # into stage k from the coordinator (k = 0) or from stage k - 1
        senders = [coordinator] + [slot.host.name for slot in slots[:-1]]
        tran = [cm.transfer_seconds(sc.in_bytes, b, link(a, slot.host.name))
                for sc, a, slot in zip(costs, senders, slots)]
        # back to the coordinator, which receives and merges for all d replicas
        back = link(slots[-1].host.name, coordinator)
        output = d * (cm.transfer_seconds(costs[-1].out_bytes, b, back) +
                      (cm.merge_seconds(costs[-1].out_bytes, b) if d * m > 1 else 0.0))
        stages = [x + y for x, y in zip(comp, tran)]
        # the coordinator sends to the d replicas one after the other: the last starts
        # (d - 1) sends late, and in steady state it also spends d sends per round
        latency = cm.pipeline_latency([*stages, output], m) + (d - 1) * tran[0]
        steps = [*stages, output + d * tran[0]]
        plans.append(_Candidate(graph, sharding, replicas, hosts, d, p, c, m, mem, comp, tran,
                                steps, latency_s=latency,
                                throughput=cm.steady_throughput(steps, b, d)))
    return plans


class _Cut:
    """The min-max cut for relative stage speeds ``caps``, of FLOPs, or of measured time when
    the profile timed the nodes (FLOPs misjudge memory-bound nodes such as an LM head): its
    objective is found first (a bisection), the cut itself and its costs only when a plan
    needs them."""

    def __init__(self, graph: Graph, caps: tuple[float, ...], profile: cm.Profile | None):
        self.graph, self.caps, self.profile = graph, caps, profile
        p = len(caps)
        self._sharding: Sharding | None = None
        self._costs: list[cm.ShardCosts] | None = None
        if p > len(graph):
            raise PartitionError("more stages than nodes")
        measured = profile is not None and profile.node_seconds
        # each node's measured seconds per sample in FLOPs of the profiling host (FLOPs for a
        # node the profile did not time)
        self.work = [cm.node_work(graph, n, profile) for n in graph.order] if measured else None
        # the objective bounds the plan only when the model costs FLOPs (no measured seconds)
        self.objective = None if measured else (
            weight_objective(graph, p, by="flops", capacities=list(caps)) if p > 1
            else float(graph.flops))

    @property
    def sharding(self) -> Sharding:
        if self._sharding is None:
            p = len(self.caps)
            self._sharding = weight_shards(self.graph, p, by="flops",
                                           capacities=list(self.caps) if p > 1 else None,
                                           work=self.work)
        return self._sharding

    @property
    def costs(self) -> list[cm.ShardCosts]:
        if self._costs is None:
            self._costs = [cm.shard_costs(self.graph, s, self.profile) for s in self.sharding]
        return self._costs


def _memory_share(host: Host, replicas: list[list[_Slot]]) -> int:
    """What a rank's shard may use of its host's memory: the host's memory over the ranks
    placed on it, less the rank's runtime (the hybrid strategy caps weights and activations;
    the planner's memory check adds the runtime)."""
    on_host = sum(1 for rep in replicas for s in rep if s.host is host)
    return max(0, host.memory_bytes // on_host - cm.RUNTIME_BASELINE)


class _StrategyCut(_Cut):
    """The cut a partition strategy makes with ``p`` shards, the same one ``fastserve
    partition --strategy NAME --shards p`` makes; no bound on it is known in advance."""

    def __init__(self, graph: Graph, strategy: str, p: int, profile: cm.Profile | None,
                 memory_caps: list[int]):
        self.graph, self.profile, self.objective = graph, profile, None
        self._costs = None
        if p > len(graph):
            raise PartitionError("more stages than nodes")
        self._sharding = strategy_cut(graph, strategy, p, memory_caps)


class _FixedCut(_Cut):
    """A cut given in advance (the shards of an export): the nodes of each stage."""

    def __init__(self, graph: Graph, cut: tuple[tuple[str, ...], ...],
                 profile: cm.Profile | None):
        self.graph, self.profile, self.objective = graph, profile, None
        self._costs = None
        order = [n for nodes in cut for n in nodes]
        if sorted(order) != sorted(graph.order):
            raise PlanError("the fixed cut does not cover the graph's nodes exactly once")
        bounds = list(itertools.accumulate(len(nodes) for nodes in cut))
        self._sharding = shards_from_bounds(graph, bounds, "fixed", order=order)


@dataclass
class _Candidate:
    """A plan's numbers; the Plan itself (every rank and stage) is built only for winners."""

    graph: Graph
    sharding: Sharding
    replicas: list[list[_Slot]]
    hosts: list[str]  # every host the plan uses, sorted
    d: int
    p: int
    c: Constraints
    m: int
    mem: list[int]
    comp: list[float]
    tran: list[float]
    steps: list[float]  # per micro-batch: each stage (compute + transfer in), then the
    # coordinator (sending inputs, receiving and merging outputs of every replica)
    latency_s: float
    throughput: float

    @property
    def n_ranks(self) -> int:
        return self.d * self.p

    def summary(self) -> dict:
        return {"mode": _mode(self.d, self.p), "replicas": self.d, "stages": self.p,
                "micro_batches": self.m, "throughput": self.throughput,
                "latency_s": self.latency_s,
                "hosts": self.hosts}

    def plan(self) -> Plan:
        d, p, m, c = self.d, self.p, self.m, self.c
        slowest = max(range(p + 1), key=lambda k: self.steps[k])  # p: the output step
        slots = self.replicas[0]
        ranks = tuple(RankPlan(r * p + k, r, k, slot.host.name, slot.threads, self.mem[k])
                      for r, rep in enumerate(self.replicas) for k, slot in enumerate(rep))
        stages = tuple(StagePlan(k, self.sharding[k].nodes, slots[k].host.name,
                                 slots[k].threads, self.comp[k], self.tran[k], self.mem[k],
                                 k == slowest) for k in range(p))
        return Plan(graph=self.graph.name, mode=_mode(d, p), replicas=d, stages=p,
                    micro_batches=m, batch=c.batch, ranks=ranks, stage_plans=stages,
                    latency_s=self.latency_s, throughput=self.throughput,
                    bubble=cm.bubble(p, m), bounds=tuple(_bounds(self.sharding)),
                    coordinator_s=self.steps[p], transport=c.transport)


def _bounds(sharding: Sharding) -> list[int]:
    """Where each stage ends in the order of its nodes: graph.order, or the order of a fixed
    cut (an export may list its nodes in another topological order)."""
    return list(itertools.accumulate(len(s.nodes) for s in sharding))


def _better(a: _Candidate, b: Plan | None, objective: str, c: Constraints) -> bool:
    if c.latency_ms is not None and a.latency_s * 1e3 > c.latency_ms:
        return False
    if b is None:
        return True
    if objective == "throughput":
        return (a.throughput, -a.latency_s, -a.n_ranks) > \
            (b.throughput, -b.latency_s, -len(b.ranks))
    if objective == "decode":
        return (a.n_ranks, a.latency_s, -a.throughput) < \
            (len(b.ranks), b.latency_s, -b.throughput)
    return (a.latency_s, -a.throughput, a.n_ranks) < (b.latency_s, -b.throughput, len(b.ranks))


def _with_alternatives(best: Plan, considered: list[dict], objective: str,
                       c: Constraints) -> Plan:
    """The best other plan of each (replicas, stages), the best eight of them, with why they
    lost: best by the objective, those within the latency target first."""
    def rank(a: dict) -> tuple:
        over = c.latency_ms is not None and a["latency_s"] * 1e3 > c.latency_ms
        if objective == "decode":
            return over, a["replicas"] * a["stages"], a["latency_s"]
        return over, -a["throughput"] if objective == "throughput" else a["latency_s"]
    by_shape: dict[tuple, dict] = {}
    for alt in considered:
        key = (alt["replicas"], alt["stages"])
        if key == (best.replicas, best.stages):
            continue
        if key not in by_shape or rank(alt) < rank(by_shape[key]):
            by_shape[key] = alt
    alts = sorted(by_shape.values(), key=rank)[:8]
    for a in alts:
        if c.latency_ms is not None and a["latency_s"] * 1e3 > c.latency_ms:
            a["lost"] = f"latency {a['latency_s'] * 1e3:.1f} ms above the {c.latency_ms} ms target"
        elif objective == "throughput":
            a["lost"] = (f"{a['throughput']:.1f} samples/s < {best.throughput:.1f} of the "
                         f"chosen plan")
        elif objective == "decode" and a["replicas"] * a["stages"] > len(best.ranks):
            a["lost"] = (f"{a['replicas'] * a['stages']} ranks where the model fits in "
                         f"{len(best.ranks)}: a decode step reads every weight once, so more "
                         f"ranks add hops, not speed")
        else:
            a["lost"] = f"latency {a['latency_s'] * 1e3:.1f} ms > {best.latency_s * 1e3:.1f} ms"
    return Plan(**{**{f: getattr(best, f) for f in best.__dataclass_fields__},
                   "alternatives": tuple(alts)})
