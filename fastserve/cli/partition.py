"""``fastserve partition`` and ``fastserve bench partition``: the sharder's commands."""

from __future__ import annotations

import json

import click

from fastserve.cli.app import bench, cli
from fastserve.cli.graph import dim_option, load_graph, trust_option
from fastserve.cli.render import human_bytes, human_count, step, table
from fastserve.errors import SizeError


def parse_memory_caps(text: str | None) -> list[int] | None:
    """``"2GB"`` or ``"16GB,16GB,8GB"`` -> bytes; a bad size is a usage error naming the flag."""
    from fastserve.partition import parse_bytes

    if text is None:
        return None
    try:
        return [parse_bytes(part.strip(), "--memory-cap") for part in text.split(",")]
    except SizeError as e:
        raise click.BadParameter(str(e).removeprefix("--memory-cap: "),
                                 param_hint="'--memory-cap'") from None


def parse_capacities(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers (relative speeds), got "
                                 f"{text!r}", param_hint="'--capacities'") from None


def _policy(strategy: str, shards, layers_per_shard, by, memory_cap, capacities, batch,
            tolerance) -> dict:
    """The strategy's options from the flags; flags that do not apply are usage errors."""
    given = {"--by": by, "--memory-cap": memory_cap, "--capacities": capacities,
             "--layers-per-shard": layers_per_shard, "--tolerance": tolerance}
    allowed = {"layer": {"--layers-per-shard"},
               "weight": {"--by", "--capacities"},
               "hybrid": {"--memory-cap", "--capacities", "--tolerance"}}[strategy]
    wrong = [flag for flag, value in given.items() if value is not None and flag not in allowed]
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)} does not apply to --strategy {strategy}")
    if strategy == "layer":
        if (shards is None) == (layers_per_shard is None):
            raise click.UsageError("--strategy layer needs exactly one of --shards N or "
                                   "--layers-per-shard K")
        return ({"shards": shards} if shards is not None
                else {"layers_per_shard": layers_per_shard})
    if shards is None:
        raise click.UsageError(f"--strategy {strategy} needs --shards N")
    policy: dict = {"shards": shards}
    if capacities is not None:
        policy["capacities"] = capacities
    if strategy == "weight":
        policy["by"] = by or "params"
        return policy
    if memory_cap is None:
        raise click.UsageError("--strategy hybrid needs --memory-cap SIZE (e.g. 2GB, or one "
                               "size per shard: 2GB,2GB,1GB)")
    policy.update(memory_caps=memory_cap, batch=batch)
    if tolerance is not None:
        policy["tolerance"] = tolerance
    return policy


def _span(nodes: tuple[str, ...]) -> str:
    return nodes[0] if len(nodes) == 1 else f"{nodes[0]}..{nodes[-1]}"


@cli.command("partition")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--strategy", type=click.Choice(["layer", "weight", "hybrid"]), default="weight",
              show_default=True, help="How to cut the graph.")
@click.option("--shards", type=click.IntRange(1), help="Number of shards.")
@click.option("--layers-per-shard", type=click.IntRange(1),
              help="layer: K consecutive layers per shard.")
@click.option("--by", type=click.Choice(["params", "flops"]),
              help="weight: balance parameter bytes (default) or FLOPs.")
@click.option("--memory-cap", "memory_cap", metavar="SIZE[,SIZE...]",
              callback=lambda _c, _p, v: parse_memory_caps(v),
              help="hybrid: memory per shard, e.g. 2GB or 512MiB; one for all or one per shard.")
@click.option("--capacities", metavar="X,Y,...", callback=lambda _c, _p, v: parse_capacities(v),
              help="weight/hybrid: relative speeds of the targets, one per shard.")
@click.option("--tolerance", type=float,
              help="hybrid: FLOPs slack (0.05 = 5%) traded for fewer bytes crossing cuts.")
@click.option("--batch", type=int, default=2, show_default=True,
              help="Batch size for hybrid's memory (weights + batch x activations) and for "
                   "--validate's inputs.")
@click.option("--validate", "do_validate", is_flag=True,
              help="Run the shards in a chain and compare with the unsharded reference.")
@click.option("--seed", default=0, show_default=True, help="Seed of the validation inputs.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False),
              help="Write one safetensors file per shard and manifest.json to this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@dim_option
@trust_option
def partition_cmd(spec, strategy, shards, layers_per_shard, by, memory_cap, capacities,
                  tolerance, batch, do_validate, seed, export_dir, as_json, dims,
                  trust_code) -> None:
    """Cut SPEC into shards and print them: nodes, params, FLOPs, bytes in and out per sample.

    \b
    Examples:
      fastserve partition graphs/gpt2.yaml --strategy layer --layers-per-shard 3
      fastserve partition graphs/gpt2.yaml --shards 4 --by flops --validate --dim seq=16
      fastserve partition graphs/gpt2.yaml --strategy hybrid --shards 4 --memory-cap 200MB
      fastserve partition graphs/gpt2.yaml --shards 4 --export out/gpt2-4
    """
    from fastserve.partition import export, partition, validate

    if batch < 1:
        raise click.BadParameter("must be at least 1", param_hint="'--batch'")
    policy = _policy(strategy, shards, layers_per_shard, by, memory_cap, capacities, batch,
                     tolerance)
    graph = load_graph(spec, dims, trust_code)
    sharding = partition(graph, strategy, **policy)
    balanced = policy.get("by", "flops")
    report = None
    if do_validate:
        if as_json:
            report = validate(sharding, batch=batch, seed=seed)
        else:
            with step(f"validating {len(sharding)} shards (batch {batch})"):
                report = validate(sharding, batch=batch, seed=seed)
    manifest = export(sharding, export_dir) if export_dir else None

    if as_json:
        doc = {"graph": graph.name, "dims": {k: v for k, v in graph.dims.items() if k != "batch"},
               "strategy": sharding.strategy, "policy": sharding.policy,
               "shards": [s.to_json() for s in sharding],
               "imbalance": sharding.imbalance_by(balanced), "imbalance_by": balanced,
               "cut_bytes": sharding.cut_bytes,
               "valid": None if report is None else report.ok,
               "validation": None if report is None else report.to_json(),
               "export": None if manifest is None else str(manifest)}
        click.echo(json.dumps(doc, indent=1, default=str))
    else:
        _print_sharding(graph, sharding, balanced, batch)
        if report is not None:
            _print_validation(sharding, report)
        if manifest is not None:
            click.echo(f"exported {len(sharding)} shard files and {manifest.name} to "
                       f"{manifest.parent}")
    if report is not None:
        report.raise_for_failure()


def _print_sharding(graph, sharding, balanced: str, batch: int) -> None:
    dims = "".join(f"{k}={v}, " for k, v in graph.dims.items() if k != "batch")
    how = {"weight": f" (balanced by {balanced})", "hybrid": " (FLOPs under memory caps)",
           "layer": f" ({sharding.policy.get('layers')} layers)"}[sharding.strategy] \
        if sharding.strategy in ("weight", "hybrid", "layer") else ""
    click.echo(f"graph '{graph.name}' ({dims}costs per sample): {len(sharding)} shards, "
               f"strategy {sharding.strategy}{how}")
    rows = [(s.index, _span(s.nodes), len(s.nodes), human_count(s.params),
             human_bytes(s.weight_bytes), human_count(s.flops), human_bytes(s.in_bytes),
             human_bytes(s.out_bytes), human_bytes(s.memory_bytes(batch)))
            for s in sharding]
    click.echo(table(["shard", "nodes", "count", "params", "weights", "FLOPs", "bytes in",
                      "bytes out", f"memory@{batch}"], rows, "llrrrrrrr"))
    click.echo(f"imbalance (largest/mean {balanced}): {sharding.imbalance_by(balanced):.3f}")
    if sharding.policy.get("capacities"):
        unit = human_bytes if balanced == "params" else human_count
        click.echo(f"largest {balanced} / capacity (capacities "
                   f"{','.join(f'{c:g}' for c in sharding.policy['capacities'])}): "
                   f"{unit(sharding.policy['objective'])}")
    click.echo(f"bytes crossing cuts: {human_bytes(sharding.cut_bytes)} per sample")


def _print_validation(sharding, report) -> None:
    rows = []
    for check, shard in zip(report.shards, sharding):
        rows.append((check.index, "ok" if check.ok else "MISMATCH", f"{check.max_abs_diff:.2e}",
                     human_bytes(check.weight_bytes), human_bytes(check.activation_bytes),
                     human_bytes(check.peak_bytes),
                     human_bytes(shard.memory_bytes(report.batch)),
                     f"{check.seconds * 1000:.1f}"))
    click.echo(f"validation (batch {report.batch}, seed {report.seed}; measured while running)")
    click.echo(table(["shard", "result", "max |diff|", "weights", "activations", "peak",
                      "predicted", "ms"], rows, "llrrrrrr"))
    click.echo(report.summary())


@bench.command("partition")
@click.option("--nodes", default=10_000, show_default=True, help="Nodes of the synthetic chain.")
@click.option("--shards", default=64, show_default=True, help="Shards of the synthetic chain.")
@click.option("--gpt3", "gpt3_spec", type=click.Path(dir_okay=False),
              help="GPT-3 175B spec (default: graphs/gpt3-175b.yaml).")
@click.option("--gpt3-shards", default=16, show_default=True)
@click.option("--repeat", default=3, show_default=True, help="Warm runs per case (best kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@trust_option
def bench_partition_cmd(nodes, shards, gpt3_spec, gpt3_shards, repeat, as_json,
                        trust_code) -> None:
    """Time every strategy on a synthetic chain (10,000 nodes into 64 shards) and on GPT-3 175B
    (16 shards), and show the peak memory of the process: no weights are allocated.

    cold = first call on a freshly compiled graph (topological order and cost arrays included);
    warm = best of --repeat further calls.
    """
    from fastserve.bench.partition import run_bench

    if nodes < 2 or shards < 1:
        raise click.BadParameter("need --nodes >= 2 and --shards >= 1")
    report = run_bench(nodes, shards, gpt3_spec, gpt3_shards, repeat, trust_code)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
        return
    for g in report.graphs:
        click.echo(f"graph '{g.name}': {g.nodes} nodes, weights {human_bytes(g.weight_bytes)}, "
                   f"compiled in {g.compile_seconds:.2f} s (meta device)")
    rows = [(r.graph, r.shards, r.strategy, r.options, f"{r.cold_seconds * 1000:.1f}",
             f"{r.warm_seconds * 1000:.1f}", f"{r.imbalance:.3f}",
             human_bytes(r.largest_memory_bytes)) for r in report.rows]
    click.echo(table(["graph", "shards", "strategy", "options", "cold ms", "warm ms",
                      "imbalance", "largest shard"], rows, "lrllrrrr"))
    biggest = max((g.weight_bytes for g in report.graphs), default=0)
    click.echo(f"peak RSS of this process: {human_bytes(report.peak_rss_bytes)} "
               f"(the largest graph's weights would take {human_bytes(biggest)}: none were "
               f"allocated)")
    for note in report.notes:
        click.echo(f"note: {note}")
