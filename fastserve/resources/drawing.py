"""A picture of a plan: the graph coloured by stage, and every rank on its host.

Left, the dataflow graph in its topological layers (a skip connection shows as an edge that
jumps layers), each node coloured by the pipeline stage that runs it, with the stage's host and
threads in the legend. Graphs too large to read node by node are drawn as chunks of consecutive
nodes of one stage ("h.3..h.8 (6)"). Right, one bar per host as wide as its cores, split into
its ranks (replica, stage, threads), coloured like their stage: where the work runs and how
full each host is. The title carries the predictions.

matplotlib is an optional dependency (``pip install 'fastserve[picture]'``); it is imported
only here, without pyplot, so drawing never touches global plotting state.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import networkx as nx

from fastserve.errors import PlanError
from fastserve.graph import Graph
from fastserve.resources.inventory import Inventory
from fastserve.resources.plan import Plan

FORMATS = (".svg", ".png")
MAX_BOXES = 60  # beyond this many nodes, consecutive nodes of a stage are drawn as one box
LEGEND_STAGES = 12  # up to this many stages are named in a legend, more get a colour scale


def draw_plan(graph: Graph, plan: Plan, path: str | Path,
              inventory: Inventory | None = None) -> None:
    """Write a picture of ``plan`` for ``graph`` to ``path`` (.svg or .png). With
    ``inventory`` the host bars show every host's cores, used or not."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise PlanError(f"a plan picture is written as {' or '.join(FORMATS)}, not "
                        f"'{path.suffix or path.name}'")
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise PlanError("drawing a plan needs matplotlib: pip install 'fastserve[picture]'"
                        ) from None
    boxes, stage_of, edges = _boxes(graph, plan)
    colours = _colours(plan.stages)
    positions = _layout(boxes, edges)

    fig = Figure(figsize=(14, 7), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 1.4])
    for a, b in edges:
        (x0, y0), (x1, y1) = positions[a], positions[b]
        # an edge that skips layers (a skip connection) bends so it does not hide the chain
        rad = 0.25 if abs(x1 - x0) > 1 else 0.0
        left.annotate("", (x1, y1), (x0, y0), arrowprops=dict(
            arrowstyle="-|>", color="#8a8a8a", lw=0.8, shrinkA=9, shrinkB=9,
            connectionstyle=f"arc3,rad={rad}"))
    small = len(boxes) > 25
    for name, (x, y) in positions.items():
        left.scatter([x], [y], s=180 if small else 420, color=colours[stage_of[name]],
                     edgecolors="black", linewidths=0.6, zorder=3)
        left.annotate(name, (x, y), xytext=(0, -13 if small else -17),
                      textcoords="offset points", ha="center", va="top",
                      fontsize=6 if small else 8, rotation=30 if small else 0)
    left.set_title(f"graph '{graph.name}': {len(graph)} nodes"
                   + (f" in {len(boxes)} chunks" if len(boxes) < len(graph) else ""),
                   fontsize=10)
    left.set_axis_off()
    left.margins(0.08, 0.25)
    if plan.stages <= LEGEND_STAGES:
        stage_hosts = {s.stage: s for s in plan.stage_plans}
        left.legend(handles=[Patch(color=colours[k], label=f"stage {k}: {stage_hosts[k].host}, "
                                   f"{stage_hosts[k].threads} thr"
                                   + (" (bottleneck)" if stage_hosts[k].bottleneck else ""))
                             for k in range(plan.stages)],
                    loc="upper left", fontsize=8, frameon=False)
    else:  # too many stages to name one by one: a colour scale, hosts are on the right
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm, ListedColormap

        scale = ScalarMappable(BoundaryNorm(range(plan.stages + 1), plan.stages),
                               ListedColormap(colours))
        fig.colorbar(scale, ax=left, orientation="horizontal", fraction=0.04, pad=0.02,
                     label="stage")

    _draw_hosts(right, plan, inventory, colours)
    fig.suptitle(f"{plan.graph}: {plan.mode}, {plan.replicas} replica(s) x {plan.stages} "
                 f"stage(s), {plan.micro_batches} micro-batch(es), batch {plan.batch} - "
                 f"predicted {_number(plan.throughput)} samples/s, "
                 f"{_number(plan.latency_s * 1e3)} ms per batch, bubble {plan.bubble:.0%}",
                 fontsize=11)
    fig.savefig(path, format=path.suffix[1:].lower(), dpi=110)


def _boxes(graph: Graph, plan: Plan):
    """The boxes to draw (nodes, or chunks of consecutive nodes of one stage), the stage of
    each, and the edges between boxes."""
    stage_of_node = {n: s.stage for s in plan.stage_plans for n in s.nodes}
    order = list(graph.order)
    size = max(1, math.ceil(len(order) / MAX_BOXES))
    box_of: dict[str, str] = {}
    stage_of: dict[str, int] = {}
    boxes: list[str] = []
    run: list[str] = []

    def close() -> None:
        name = run[0] if len(run) == 1 else f"{run[0]}..{run[-1]} ({len(run)})"
        boxes.append(name)
        stage_of[name] = stage_of_node[run[0]]
        for n in run:
            box_of[n] = name
        run.clear()

    for n in order:
        if run and (len(run) == size or stage_of_node[n] != stage_of_node[run[0]]):
            close()
        run.append(n)
    if run:
        close()
    edges = sorted({(box_of[a], box_of[b]) for a, b in graph.nx.edges if box_of[a] != box_of[b]},
                   key=lambda e: (boxes.index(e[0]), boxes.index(e[1])))
    return boxes, stage_of, edges


def _layout(boxes: list[str], edges: list[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Topological layers left to right; boxes of one layer stacked, centred on the axis."""
    dag = nx.DiGraph()
    dag.add_nodes_from(boxes)
    dag.add_edges_from(edges)
    positions = {}
    layers = list(nx.topological_generations(dag))
    for x, layer in enumerate(layers):
        layer = sorted(layer, key=boxes.index)
        for i, name in enumerate(layer):
            positions[name] = (float(x), (len(layer) - 1) / 2 - i)
    # a long chain wraps into rows, so a 60-box chain stays readable
    width = max(20, math.ceil(math.sqrt(len(layers) * 6)))
    if len(layers) > width:
        height = 1 + max(len(layer) for layer in layers)
        positions = {n: (x % width, y - (x // width) * (height + 1))
                     for n, (x, y) in ((n, (int(x), y)) for n, (x, y) in positions.items())}
    return positions


def _draw_hosts(ax, plan: Plan, inventory: Inventory | None, colours) -> None:
    ranks_on: dict[str, list] = defaultdict(list)
    for r in plan.ranks:
        ranks_on[r.host].append(r)
    hosts = list(ranks_on)
    cores = {}
    if inventory is not None:
        hosts = [h.name for h in inventory.hosts]
        cores = {h.name: h.cores for h in inventory.hosts}
    for y, host in enumerate(hosts):
        total = cores.get(host, sum(r.threads for r in ranks_on[host]))
        ax.barh(y, total, color="#eeeeee", edgecolor="#999999", height=0.8)
        start = 0
        crowd = len(ranks_on[host])
        for r in sorted(ranks_on[host], key=lambda r: r.rank):
            ax.barh(y, r.threads, left=start, color=colours[r.stage], edgecolor="black",
                    linewidth=0.5, height=0.8)
            # labels only where they fit: a bar of one core among sixteen has no room
            label = f"r{r.rank}\nR{r.replica} s{r.stage}" if crowd <= 4 else \
                f"s{r.stage}" if crowd <= 8 else ""
            ax.text(start + r.threads / 2, y, label, ha="center", va="center", fontsize=7)
            start += r.threads
    ax.set_yticks(range(len(hosts)), hosts, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("cores (bar: one rank, its threads; R replica, s stage)", fontsize=8)
    ax.set_title(f"{len(plan.ranks)} ranks on {len(ranks_on)} host(s)", fontsize=10)


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _colours(stages: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if stages <= 10 else "tab20" if stages <= 20 else "turbo"]
    if stages <= 20:
        return [cmap(k) for k in range(stages)]
    return [cmap(k / max(1, stages - 1)) for k in range(stages)]
