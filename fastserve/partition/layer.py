"""The ``layer`` strategy: consecutive runs of whole layers.

A *layer* is one iteration of a ``repeat`` block (``h.3`` of GPT-2, with all its inner nodes).
``L`` counts those layers. Nodes outside any repeat block carry no layer of their own: each joins
the next layer in the order (GPT-2's ``wte`` and ``wpe`` join ``h.0``; a U-Net's pooling node
joins the encoder level after it), and nodes after the last layer join the last one (``ln_f``
and ``lm_head`` join ``h.11``). So the first and last shards hold the embedding and the head,
and no shard is a lone head. A graph without repeat blocks has one layer per node.

``layers_per_shard=k`` gives ``ceil(L / k)`` shards of ``k`` layers (the last may hold fewer);
``shards=N`` gives ``N`` shards whose layer counts differ by at most one (earlier shards get the
extra layer).
"""

from __future__ import annotations

from fastserve.errors import PartitionError
from fastserve.graph.graph import Graph
from fastserve.partition.sharding import Sharding, shards_from_bounds


def layer_units(graph: Graph) -> list[tuple[str, ...]]:
    """The graph's layers in order, each with the non-repeat nodes attached to it (above)."""
    units: list[tuple[str, ...]] = []
    keys: list[tuple] = []
    pending: tuple[str, ...] = ()
    for run in graph.layers:
        d = graph.node(run[0])
        if d["layer"] is None:
            pending += run
            continue
        key = (d["group"], d["layer"])
        if keys and keys[-1] == key:  # one layer split in two runs by an interleaved node
            units[-1] += pending + run
        else:
            units.append(pending + run)
            keys.append(key)
        pending = ()
    if not units:
        return [(n,) for n in graph.order]
    if pending:
        units[-1] += pending
    return units


def layer_shards(graph: Graph, layers_per_shard: int | None = None,
                 shards: int | None = None) -> Sharding:
    """Cut ``graph`` into runs of whole layers: ``layers_per_shard=k`` (``ceil(L/k)`` shards)
    or ``shards=N`` (equal layer counts). Exactly one of the two must be given.

    Example: GPT-2 small has 12 layers; ``layer_shards(g, layers_per_shard=5)`` gives 3 shards
    of 5, 5 and 2 layers, ``layer_shards(g, shards=4)`` 4 shards of 3 layers.
    """
    if (layers_per_shard is None) == (shards is None):
        raise PartitionError("the layer strategy takes exactly one of layers_per_shard=K or "
                             "shards=N")
    units = layer_units(graph)
    count = len(units)
    if layers_per_shard is not None:
        k = _positive(layers_per_shard, "layers_per_shard")
        sizes = [min(k, count - i) for i in range(0, count, k)]
    else:
        n = _positive(shards, "shards")
        if n > count:
            raise PartitionError(f"cannot cut graph '{graph.name}' into {n} shards of whole "
                                 f"layers: it has {count} layers; use at most {count} shards, "
                                 f"or the weight strategy to cut inside layers")
        sizes = [count // n + (1 if i < count % n else 0) for i in range(n)]
    # units concatenate to graph.order (they are consecutive runs of it), so bounds index it
    bounds, at, stop = [], 0, 0
    for size in sizes:
        stop += sum(len(u) for u in units[at:at + size])
        at += size
        bounds.append(stop)
    policy = {"layers": count, "layers_per_shard": layers_per_shard, "shards": len(sizes)}
    return shards_from_bounds(graph, bounds, "layer", policy=policy)


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PartitionError(f"{name} must be a positive integer, got {value!r}")
    return value
