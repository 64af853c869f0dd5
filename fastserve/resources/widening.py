"""Widening a stage: more ranks for the bottleneck stage alone, instead of a whole replica.

A pipeline runs at the pace of its slowest stage. When that stage is much slower than the
others, a second rank for it (the same shard, sharing its micro-batches) raises the replica's
throughput by one rank's worth, where a new replica costs one rank per stage. :func:`widen`
returns the plan with one rank more on a stage of every replica; :func:`widen_choice` says
whether that pays more per rank than a replica, and for which stage; :func:`layout_for` says how
to run some replicas' worth of throughput in the fewest ranks (the service scales by it).

The predictions of a widened plan are the planner's, rescaled: a stage's time per micro-batch
(compute and transfer) is shared by its ranks, and the replica's steady throughput follows its
slowest stage (:func:`fastserve.resources.costmodel.steady_throughput`). Latency is unchanged:
one micro-batch still crosses every stage.

Given the inventory, an added rank goes where its threads and shard fit beside the ranks
already there (its stage's host first, else the host with the most cores free); without one,
or where nothing fits, it joins its stage's first rank.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fastserve.errors import PlanFileError
from fastserve.resources.inventory import Inventory
from fastserve.resources.plan import MAX_WIDTH, Plan, RankPlan


def stage_seconds(plan: Plan, stage: int, width: int | None = None) -> float:
    """Seconds stage ``stage`` adds per micro-batch in the steady state, with ``width`` ranks
    (default: the plan's)."""
    s = plan.stage_plans[stage]
    return (s.compute_s + s.transfer_s) / (plan.width(stage) if width is None else width)


def _pace(plan: Plan, widths: list[int]) -> float:
    return max(stage_seconds(plan, k, w) for k, w in enumerate(widths))


def with_widths(plan: Plan, widths: tuple[int, ...] | list[int],
                inventory: Inventory | None = None, busy: tuple[RankPlan, ...] = ()) -> Plan:
    """``plan`` with ``widths`` ranks per stage: each replica's ranks renumbered, the ranks a
    stage keeps where they were, an added rank placed by :meth:`_Room.place` (``busy``: ranks
    of other deployments on ``inventory``'s hosts), the throughput rescaled."""
    widths = list(widths)
    if len(widths) != plan.stages or min(widths) < 1 or max(widths) > MAX_WIDTH:
        raise PlanFileError(f"widths must give each of the {plan.stages} stage(s) 1 to "
                            f"{MAX_WIDTH} ranks, not {widths}")
    kept = [plan.stage_ranks(r, k)[:w] for r in range(plan.replicas)
            for k, w in enumerate(widths)]
    room = _Room(inventory, plan.transport, [*busy, *(x for stage in kept for x in stage)]) \
        if inventory is not None else None
    ranks: list[RankPlan] = []
    for stage, w in zip(kept, widths * plan.replicas):
        for i in range(w):
            rank = stage[i] if i < len(stage) else \
                replace(stage[0], host=room.place(stage[0]) if room else stage[0].host)
            ranks.append(replace(rank, rank=len(ranks)))
    throughput = plan.throughput * speedup(plan, widths)
    slowest = max(range(plan.stages), key=lambda k: stage_seconds(plan, k, widths[k]))
    stages = tuple(replace(s, bottleneck=k == slowest) for k, s in enumerate(plan.stage_plans))
    return replace(plan, ranks=tuple(ranks), stage_plans=stages, throughput=throughput,
                   widths=tuple(widths) if max(widths) > 1 else (), alternatives=())


class _Room:
    """Cores and memory left on each host an added rank may go to (every host of the
    inventory; on ipc, only those whose ranks start here)."""

    def __init__(self, inventory: Inventory, transport: str, used) -> None:
        self.free = {h.name: [h.cores, h.memory_bytes] for h in inventory.hosts
                     if transport != "ipc" or h.launcher == "local"}
        for r in used:
            if r.host in self.free:
                self.free[r.host][0] -= r.threads
                self.free[r.host][1] -= r.memory_bytes

    def place(self, like: RankPlan) -> str:
        """The host for another rank of ``like``'s stage: its own host while the rank fits
        there, else the host with the most cores free that it fits (the first such in the
        inventory), else its own (oversubscribed, as with no inventory)."""
        def fits(host: str) -> bool:
            cores, memory = self.free.get(host, (0, 0))
            return cores >= like.threads and memory >= like.memory_bytes

        hosts = [h for h in self.free if fits(h)]
        host = like.host if fits(like.host) or not hosts else \
            max(hosts, key=lambda h: self.free[h][0])
        if host in self.free:
            self.free[host][0] -= like.threads
            self.free[host][1] -= like.memory_bytes
        return host


def speedup(plan: Plan, widths: tuple[int, ...] | list[int]) -> float:
    """How much faster a replica with ``widths`` ranks per stage streams than with the plan's
    own widths (the predicted paces' ratio)."""
    new = _pace(plan, list(widths))
    return _pace(plan, [plan.width(k) for k in range(plan.stages)]) / new if new > 0 else 1.0


def widen(plan: Plan, stage: int, inventory: Inventory | None = None) -> Plan:
    """``plan`` with one more rank on ``stage`` in every replica (placed on ``inventory`` as
    :func:`with_widths` says)."""
    if not 0 <= stage < plan.stages:
        raise PlanFileError(f"the plan has stages 0 to {plan.stages - 1}, not {stage}")
    widths = [plan.width(k) for k in range(plan.stages)]
    widths[stage] += 1
    return with_widths(plan, widths, inventory)


def widen_choice(plan: Plan) -> int | None:
    """The stage whose widening adds more throughput per added rank than another replica of
    the plan (which adds one replica's throughput for ``per_replica`` ranks), or None when a
    replica pays as well (a balanced pipeline, or one stage)."""
    if plan.stages < 2:
        return None
    widths = [plan.width(k) for k in range(plan.stages)]
    pace = _pace(plan, widths)
    slowest = max(range(plan.stages), key=lambda k: stage_seconds(plan, k))
    widths[slowest] += 1
    gain = pace / _pace(plan, widths) - 1  # the replica's throughput, relative
    return slowest if gain > 1 / plan.per_replica else None


def layout_for(plan: Plan, units: int) -> tuple[int, tuple[int, ...]]:
    """How to run ``units`` times the throughput of the one-replica ``plan`` in the fewest
    ranks, as (replicas, widths); among layouts of as many ranks, the one widened least.

    For each number of ranks per replica, the fastest widths come from giving each added rank
    to the slowest stage (no other choice lowers the slowest stage's time further); with those
    widths, the replicas needed follow from the pace. Widths are tried until a replica would
    hold as many ranks as ``units`` plain replicas do."""
    widths = [plan.width(k) for k in range(plan.stages)]
    pace = _pace(plan, widths)
    best = (units, tuple(widths))
    if pace <= 0:  # nothing predicted to tell layouts apart
        return best
    need = units * sum(widths)  # ranks of the plain replicas
    while sum(widths) < need:
        slowest = max(range(plan.stages), key=lambda k: stage_seconds(plan, k, widths[k]))
        if widths[slowest] >= MAX_WIDTH:
            break
        widths[slowest] += 1
        replicas = math.ceil(units * _pace(plan, widths) / pace - 1e-9)
        if replicas * sum(widths) < need:
            best, need = (replicas, tuple(widths)), replicas * sum(widths)
    return best
