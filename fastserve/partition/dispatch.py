"""``partition(graph, strategy, **policy)``: look a strategy up, run it, verify the result.

A strategy is any function ``(graph, **policy) -> Sharding``. The three built-in ones are
registered by name; :func:`register_strategy` adds more, and ``partition`` also takes a function
directly, so a new cut policy is a new function, never a new branch here.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence, Union

from fastserve.errors import PartitionError
from fastserve.graph.graph import Graph
from fastserve.partition.hybrid import hybrid_shards
from fastserve.partition.layer import layer_shards
from fastserve.partition.sharding import Sharding
from fastserve.partition.verify import verify
from fastserve.partition.weight import weight_shards

Strategy = Callable[..., Sharding]

STRATEGIES: dict[str, Strategy] = {
    "layer": layer_shards,
    "weight": weight_shards,
    "hybrid": hybrid_shards,
}


def register_strategy(name: str, strategy: Strategy) -> Strategy:
    """Make ``strategy`` available as ``partition(graph, name, ...)`` (returns it, so it can
    decorate: ``register_strategy("mine", fn)``)."""
    if not callable(strategy):
        raise PartitionError(f"strategy '{name}' must be callable, got {type(strategy).__name__}")
    STRATEGIES[name] = strategy
    return strategy


def partition(graph: Graph, strategy: Union[str, Strategy] = "weight",
              **policy: Any) -> Sharding:
    """Cut ``graph`` into shards with ``strategy`` and its ``policy`` options; the result is
    checked by :func:`fastserve.partition.verify` before it is returned.

    Examples::

        partition(graph, "layer", layers_per_shard=3)
        partition(graph, "weight", shards=4, by="flops")
        partition(graph, "hybrid", shards=4, memory_caps="2GB", batch=8)
        partition(graph, my_strategy, shards=4)   # any (graph, **policy) -> Sharding
    """
    if callable(strategy):
        fn, name = strategy, getattr(strategy, "__name__", "custom")
    else:
        fn = STRATEGIES.get(strategy)
        name = strategy
        if fn is None:
            known = ", ".join(sorted(STRATEGIES))
            raise PartitionError(f"unknown strategy {strategy!r}; known strategies: {known}")
    _check_policy(fn, name, graph, policy)
    sharding = fn(graph, **policy)
    if not isinstance(sharding, Sharding):
        raise PartitionError(f"strategy '{name}' returned a {type(sharding).__name__}, not a "
                             f"Sharding")
    if sharding.graph is not graph:
        raise PartitionError(f"strategy '{name}' returned a sharding of another graph")
    return verify(sharding)


def _check_policy(fn: Strategy, name: str, graph: Graph, policy: dict[str, Any]) -> None:
    """Turn a wrong option into a PartitionError naming the options the strategy takes."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(graph, **policy)
    except TypeError as e:
        takes = [p.name for p in list(signature.parameters.values())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise PartitionError(f"strategy '{name}': {e}; it takes {', '.join(takes) or 'nothing'}"
                             ) from None


def strategy_cut(graph: Graph, strategy: str, shards: int,
                 memory_caps: Sequence[int] | None = None) -> Sharding:
    """``shards`` stages cut by the strategy named ``strategy`` with its defaults: the cut
    ``fastserve partition --strategy NAME --shards N`` makes, so a strategy name means the same
    cut in every command (the planner's ``Constraints.strategy`` included). ``memory_caps``
    (bytes per shard) is what ``hybrid`` needs."""
    if strategy == "hybrid":
        if not memory_caps:
            raise PartitionError("the hybrid strategy needs a memory cap per shard")
        return partition(graph, "hybrid", shards=shards, memory_caps=list(memory_caps))
    return partition(graph, strategy, shards=shards)
