"""Refusing, before allocating, what this machine cannot hold: torch's own failure is an
allocator message (or the kernel's OOM killer), not a pointer at the spec."""

from __future__ import annotations

import os
from typing import Iterable

from fastserve.errors import SpecError
from fastserve.graph.graph import Graph


def available_memory() -> int | None:
    """Bytes this machine can still allocate without swapping (Linux MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def ensure_memory(graph: Graph, node_ids: Iterable[str], what: str, size,
                  factor: int = 1) -> None:
    """Refuse, before allocating, to build ``what`` when ``factor`` x the sum of ``size(node
    data)`` over ``node_ids`` exceeds this machine's available memory: torch's own failure is
    an allocator message (or the kernel's OOM killer), not a pointer at the spec."""
    sizes = {n: size(graph.node(n)) * factor for n in node_ids}
    need, free = sum(sizes.values()), available_memory()
    if free is None or need <= free:
        return
    big = max(sizes, key=sizes.__getitem__)
    raise SpecError(f"{what} of graph '{graph.name}' need {_gb(need)}, more than the "
                    f"{_gb(free)} this machine has available; the largest part is node '{big}' "
                    f"({_gb(sizes[big])}): make its sizes smaller, or shard the graph over "
                    f"several hosts (fastserve plan)", file=graph.spec.file,
                    line=graph.node(big).get("line"), key="args")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"
