"""Partition: cut a compiled graph into shards that separate processes can run.

The sharder's three steps: pick a strategy (``layer``, ``weight``, ``hybrid`` or your own
function), cut (:func:`partition`, checked by :func:`verify`), validate (:func:`validate` runs
the shards in a chain against the unsharded reference). :func:`export` writes one checkpoint per
shard so that a rank loads its shard alone (:func:`load_shard`).

    import fastserve as fs
    from fastserve.partition import partition
    graph = fs.load("graphs/gpt2.yaml", {"seq": 16})
    sharding = partition(graph, "weight", shards=4)
    fs.validate(sharding).raise_for_failure()
"""

import sys
import types

from fastserve.partition.chain import ChainCosts, chain_costs
from fastserve.partition.dispatch import STRATEGIES, partition, register_strategy, strategy_cut
from fastserve.partition.export import export, load_manifest, load_shard
from fastserve.partition.hybrid import hybrid_shards
from fastserve.partition.layer import layer_shards, layer_units
from fastserve.partition.sharding import Shard, Sharding, shards_from_bounds
from fastserve.units import format_bytes, parse_bytes
from fastserve.partition.validate import ShardCheck, ValidationReport, validate
from fastserve.partition.verify import verify
from fastserve.partition.weight import weight_shards



class _CallablePackage(types.ModuleType):
    """``fastserve.partition`` is both this package and, called, the :func:`partition` function:
    importing a subpackage binds its name on the parent, so ``fastserve.partition`` can only be
    the package, and this lets ``fs.partition(graph, "weight", shards=4)`` read as the docs say."""

    def __call__(self, graph, strategy="weight", **policy):
        return partition(graph, strategy, **policy)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["STRATEGIES", "ChainCosts", "Shard", "ShardCheck", "Sharding", "ValidationReport",
           "chain_costs", "export", "format_bytes", "hybrid_shards", "layer_shards",
           "layer_units", "load_manifest", "load_shard", "parse_bytes", "partition",
           "register_strategy", "shards_from_bounds", "strategy_cut", "validate", "verify",
           "weight_shards"]

