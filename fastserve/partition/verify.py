"""``verify(sharding)``: the invariants every strategy's result must satisfy.

* every node of the graph is in exactly one shard, and no shard is empty;
* the shards, in order, form a topological order: nothing is used before it is produced;
* the shards form a chain: shard 0 receives the graph inputs, shard ``i`` receives exactly what
  shard ``i - 1`` sends, the last shard sends the graph outputs;
* cut tensors are complete: a shard's inputs hold every tensor its nodes read that it does not
  produce, and its outputs hold every tensor produced so far that a later shard reads or that is
  a graph output; and nothing else (a cut carries no dead tensor);
* each shard's costs are the sums over its nodes.
"""

from __future__ import annotations

from fastserve.errors import PartitionError
from fastserve.partition.sharding import Sharding


def verify(sharding: Sharding) -> Sharding:
    """Return ``sharding`` unchanged if it is consistent, else raise :class:`PartitionError`
    saying which shard breaks which rule."""
    graph = sharding.graph
    shards = sharding.shards
    if not shards:
        raise PartitionError(f"sharding of graph '{graph.name}' has no shards")
    where: dict[str, int] = {}
    for i, s in enumerate(shards):
        if s.index != i:
            raise PartitionError(f"shard at position {i} has index {s.index}")
        if not s.nodes:
            raise PartitionError(f"shard {i} has no nodes")
        for n in s.nodes:
            if n not in graph.nx:
                raise PartitionError(f"shard {i} holds node '{n}', which graph '{graph.name}' "
                                     f"does not have")
            if n in where:
                raise PartitionError(f"node '{n}' is in shard {where[n]} and shard {i}")
            where[n] = i
    missing = [n for n in graph.order if n not in where]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise PartitionError(f"nodes {', '.join(missing[:5])}{more} are in no shard")

    producer_shard = {t.name: -1 for t in graph.inputs}  # -1: graph input
    last_reader_shard: dict[str, int] = {}
    for i, s in enumerate(shards):
        for n in s.nodes:
            for t in graph.node(n)["outputs"]:
                producer_shard[t.name] = i
    for i, s in enumerate(shards):
        for n in s.nodes:
            for ref in graph.node(n)["inputs"]:
                last_reader_shard[ref] = max(last_reader_shard.get(ref, -1), i)
    for out in graph.outputs:
        last_reader_shard[out] = len(shards)

    graph_inputs = {t.name for t in graph.inputs}
    if set(shards[0].inputs) != graph_inputs:
        raise PartitionError(f"shard 0 receives {sorted(shards[0].inputs)}, the graph inputs are "
                             f"{sorted(graph_inputs)}")
    if set(shards[-1].outputs) != set(graph.outputs):
        raise PartitionError(f"the last shard sends {sorted(shards[-1].outputs)}, the graph "
                             f"outputs are {sorted(graph.outputs)}")
    dying: dict[int, list[str]] = {}
    for t, reader in last_reader_shard.items():
        dying.setdefault(reader, []).append(t)
    alive = {t for t in graph_inputs if t in last_reader_shard}
    for i, s in enumerate(shards):
        if i and tuple(s.inputs) != tuple(shards[i - 1].outputs):
            raise PartitionError(f"shard {i} receives {list(s.inputs)} but shard {i - 1} sends "
                                 f"{list(shards[i - 1].outputs)}")
        available = set(s.inputs)
        for n in s.nodes:
            for ref in graph.node(n)["inputs"]:
                if ref not in available:
                    src = producer_shard.get(ref)
                    why = ("it is produced later, in shard " + str(src)) if src is not None \
                        and src >= i else "it is not in the shard's inputs"
                    raise PartitionError(f"shard {i}: node '{n}' reads '{ref}' but {why}")
            available.update(t.name for t in graph.node(n)["outputs"])
        # alive after shard i: produced so far and read later (or a graph output)
        alive.update(t.name for n in s.nodes for t in graph.node(n)["outputs"]
                     if t.name in last_reader_shard)
        alive.difference_update(dying.get(i, ()))
        needed = alive
        sent = set(s.outputs)
        if needed - sent:
            raise PartitionError(f"the cut after shard {i} lacks {sorted(needed - sent)}, which "
                                 f"later shards read or the graph outputs")
        if sent - needed:
            raise PartitionError(f"the cut after shard {i} carries {sorted(sent - needed)}, "
                                 f"which no later shard reads")
        if sent - available:
            raise PartitionError(f"shard {i} sends {sorted(sent - available)}, which it neither "
                                 f"receives nor produces")
        data = [graph.node(n) for n in s.nodes]
        for attr in ("params", "params_bytes", "flops"):
            total = sum(d[attr] for d in data)
            if getattr(s, attr) != total:
                raise PartitionError(f"shard {i} reports {attr}={getattr(s, attr)}, its nodes sum "
                                     f"to {total}")
    return sharding
