"""Where generation steps run: the stage cores in this process, or a deployment's ranks.

Both run the same :class:`~fastserve.engine.core.RankCore` code on the same messages, so the
in-process pipeline is the reference a deployment's tokens are compared with, and the quick way
to generate without starting processes.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque

import torch

from fastserve.engine.coordinator import WorkItem
from fastserve.engine.core import RankCore
from fastserve.engine.deployment import Deployment
from fastserve.engine.wire import Message
from fastserve.errors import RankError
from fastserve.graph import Graph, build_subgraph
from fastserve.graph.decode import (KV_BYTES, GenerationError, KVCache, check_generative,
                                   kv_bytes_per_token, max_positions)
from fastserve.partition import shards_from_bounds
from fastserve.resources.inventory import Inventory, local_inventory
from fastserve.resources.plan import Plan
from fastserve.units import format_bytes


class _Base:
    def __init__(self, graph: Graph, cut, replicas: int, kv_bytes: int) -> None:
        check_generative(graph)
        self.graph = graph
        self.stages, self.replicas = len(cut), replicas
        self.input = graph.inputs[0].name
        self.logits = graph.outputs[0]
        self.vocab = graph.spec.inputs[0].high
        self.max_len = max_positions(graph)
        self.kv_per_token, self.kv_tokens = kv_positions(graph, cut, kv_bytes)

    def _meta(self, meta: dict) -> dict:
        return {"gen": {**meta, "logits": self.logits}}


class LocalPipeline(_Base):
    """The stages of ``cut`` (default: one stage) as cores in this process, ``replicas`` of
    them sharing weights, each with its own caches. A step runs when it is sent."""

    def __init__(self, graph: Graph, cut: list[list[str]] | None = None, replicas: int = 1,
                 kv_bytes: int = KV_BYTES) -> None:
        cut = cut or [list(graph.order)]
        super().__init__(graph, cut, replicas, kv_bytes)
        sharding = shards_from_bounds(graph, list(itertools.accumulate(len(c) for c in cut)),
                                      "local", order=[n for c in cut for n in c])
        shards = [build_subgraph(graph, s.nodes, s.inputs, s.outputs) for s in sharding.shards]
        self.cores = [[RankCore(i, i, shard, cache=KVCache(kv_bytes))
                       for i, shard in enumerate(shards)] for _ in range(replicas)]
        self._done: deque = deque()

    def send(self, replica: int, key: int, ids: torch.Tensor, meta: dict) -> None:
        msg = Message("data", 0, key, {self.input: ids}, self._meta(meta))
        for core in self.cores[replica]:
            msg = core.handle(msg)
        self._done.append(msg)

    def receive(self, wait_ms: int = 0):
        if not self._done:
            return None
        msg = self._done.popleft()
        if msg.kind == "error":
            err = msg.meta["error"]
            e = RankError(err["message"], rank=err.get("rank"), stage=err.get("stage"),
                          node=err.get("node"))
            e.key = msg.micro
            raise e
        return msg.micro, msg.tensors["tokens"]


def kv_positions(graph: Graph, cut, kv_bytes: int) -> tuple[list[int], int]:
    """Bytes per position in the cache of each stage of ``cut``, and the positions every
    stage can hold in ``kv_bytes`` (a sequence's buffers grow by doubling: up to twice its
    length is allocated)."""
    per_token = [kv_bytes_per_token(graph, nodes) for nodes in cut]
    positions = min(kv_bytes // (2 * b) for b in per_token if b) if any(per_token) else 1 << 20
    return per_token, positions


def kv_budget(plan: Plan, inventory: Inventory | None) -> int:
    """Bytes of KV cache every rank of ``plan`` can hold, at most ``KV_BYTES``: the least,
    over its ranks, of a rank's share of its host's memory (the host's memory over the plan's
    ranks on it) less the memory the planner predicted for the rank (its runtime, weights and
    activations). ``inventory`` None: every rank on this machine."""
    if plan.widths:  # PUSH serves a stage's ranks in turn: a sequence's steps would scatter
        raise GenerationError(
            f"a plan with a widened stage (widths {list(plan.widths)}) cannot generate: each "
            f"sequence's KV cache lives on one rank per stage, and a widened stage shares its "
            f"steps among its ranks; use replicas")
    if inventory is None:
        machine = local_inventory().hosts[0].memory_bytes
        shares = [machine // len(plan.ranks)] * len(plan.ranks)
    else:
        on_host = Counter(r.host for r in plan.ranks)
        shares = [inventory.host(r.host).memory_bytes // on_host[r.host] for r in plan.ranks]
    room, share, rank = min(((share - r.memory_bytes, share, r)
                             for share, r in zip(shares, plan.ranks)), key=lambda t: t[0])
    if room <= 0:
        raise GenerationError(
            f"rank {rank.rank} (stage {rank.stage}) on host '{rank.host}' has no memory left "
            f"for KV caches: its share of the host, {format_bytes(share)}, is no more than the "
            f"{format_bytes(rank.memory_bytes)} its shard is predicted to take; use more "
            f"stages or hosts with more memory")
    return min(KV_BYTES, room)


class DeploymentPipeline(_Base):
    """A running deployment's replicas and stages; its ranks hold the caches, sized to what
    the plan leaves of each host's memory (:func:`kv_budget`)."""

    def __init__(self, deployment: Deployment, stats=None) -> None:
        """``stats``: where the flow's timings go (see :meth:`Deployment.flow`)."""
        super().__init__(deployment.graph, deployment.plan.cut, deployment.plan.replicas,
                         kv_budget(deployment.plan, deployment.inventory))
        self.deployment = deployment
        self.flow = deployment.flow(stats)

    def send(self, replica: int, key: int, ids: torch.Tensor, meta: dict) -> None:
        item = WorkItem(key, replica, {self.input: ids}, len(meta["seqs"]), self._meta(meta))
        if self.flow.send(item) is None:
            raise RuntimeError(f"replica {replica} has no room for another step")

    def receive(self, wait_ms: int = 100):
        try:
            got = self.flow.receive(wait_ms)
        except RankError as e:
            item = getattr(e, "item", None)
            e.key = item.key if item is not None else None
            raise
        if got is None:
            return None
        item, tensors = got
        tokens = tensors.get("tokens")
        if tokens is None:
            tokens = torch.zeros(0, dtype=torch.int64) if not item.meta["gen"]["seqs"] else \
                torch.zeros(0)  # a shape the loop refuses: the last stage did not sample
        return item.key, tokens
