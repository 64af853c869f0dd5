"""Where generation steps run: the stage cores in this process, or a deployment's ranks.

Both run the same :class:`~fastserve.engine.core.RankCore` code on the same messages, so the
in-process pipeline is the reference a deployment's tokens are compared with, and the quick way
to generate without starting processes.
"""

from __future__ import annotations

import itertools
from collections import deque

import torch

from fastserve.engine.coordinator import WorkItem
from fastserve.engine.core import RankCore
from fastserve.engine.deployment import Deployment
from fastserve.engine.wire import Message
from fastserve.errors import RankError
from fastserve.graph import Graph, build_subgraph
from fastserve.graph.decode import KV_BYTES, KVCache, check_generative, kv_bytes_per_token
from fastserve.partition import shards_from_bounds


class _Base:
    def __init__(self, graph: Graph, cut, replicas: int, kv_bytes: int) -> None:
        check_generative(graph)
        self.graph = graph
        self.stages, self.replicas = len(cut), replicas
        self.input = graph.inputs[0].name
        self.logits = graph.outputs[0]
        self.vocab = graph.spec.inputs[0].high
        self.max_len = max_positions(graph)
        # bytes per position in each stage's cache, and the positions every stage can hold
        # (a sequence's buffers grow by doubling: up to twice its length is allocated)
        self.kv_per_token = [kv_bytes_per_token(graph, nodes) for nodes in cut]
        self.kv_tokens = min(kv_bytes // (2 * b) for b in self.kv_per_token if b) \
            if any(self.kv_per_token) else 1 << 20

    def _meta(self, meta: dict) -> dict:
        return {"gen": {**meta, "logits": self.logits}}


def max_positions(graph: Graph) -> int | None:
    """The longest sequence a graph takes: its learned positions (None: no limit)."""
    sizes = [graph.node(n)["args"]["max_positions"] for n in graph.order
             if graph.node(n)["op"] == "positional_embedding"]
    return min(sizes) if sizes else None


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


class DeploymentPipeline(_Base):
    """A running deployment's replicas and stages; its ranks hold the caches."""

    def __init__(self, deployment: Deployment, stats=None) -> None:
        """``stats``: where the flow's timings go (see :meth:`Deployment.flow`)."""
        super().__init__(deployment.graph, deployment.plan.cut, deployment.plan.replicas,
                         KV_BYTES)
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
