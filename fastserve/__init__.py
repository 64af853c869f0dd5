"""FastServe: deploy large models over many processes and hosts from a graph declaration.

The public API, re-exported lazily so that ``fastserve --help`` does not pay for importing torch::

    import fastserve as fs
    graph = fs.load("graphs/gpt2.yaml")            # spec -> costed Graph (meta device)
    sharding = partition(graph, "weight", shards=4)   # from fastserve.partition
    fs.validate(sharding)                           # shards chained == the reference
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # graph
    "Graph": "fastserve.graph", "GraphSpec": "fastserve.graph", "load": "fastserve.graph",
    "load_spec": "fastserve.graph", "compile_graph": "fastserve.graph",
    "capture": "fastserve.graph", "reference": "fastserve.graph",
    "random_inputs": "fastserve.graph", "verify": "fastserve.graph",
    # partition: ``fs.partition(graph, "weight", shards=4)``; ``fastserve.partition`` is also
    # the package, made callable (see fastserve/partition/__init__.py)
    "partition": "fastserve", "Sharding": "fastserve.partition", "validate": "fastserve.partition",
    "export": "fastserve.partition", "load_shard": "fastserve.partition",
    # resources
    "load_inventory": "fastserve.resources.inventory", "plan": "fastserve.resources.planner",
    "Constraints": "fastserve.resources.planner", "Plan": "fastserve.resources.plan",
    "load_plan": "fastserve.resources.plan",
    # engine
    "Deployment": "fastserve.engine", "Layout": "fastserve.engine",
    # errors
    "FastServeError": "fastserve.errors", "Limits": "fastserve.limits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastserve' has no attribute '{name}'")
    if name == "partition":  # importing the subpackage binds it here: the callable package
        return importlib.import_module("fastserve.partition")
    return getattr(importlib.import_module(module), name)
