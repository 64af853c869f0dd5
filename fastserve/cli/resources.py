"""``fastserve plan``, ``fastserve profile`` and ``fastserve bench plan``."""

from __future__ import annotations

import json
from contextlib import ExitStack

import click

from fastserve.cli.app import bench, cli
from fastserve.cli.graph import dim_option, load_graph, load_profile, trust_option
from fastserve.cli.render import human_bytes, table
from fastserve.limits import MAX_THREADS


def _inventory(hosts: str | None):
    from fastserve.resources.inventory import load_inventory, local_inventory

    return load_inventory(hosts) if hosts else local_inventory()


@cli.command("plan")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--hosts", type=click.Path(dir_okay=False),
              help="Host inventory YAML (default: this machine, detected).")
@click.option("--parallel", type=click.Choice(["auto", "data", "model", "hybrid"]),
              default="auto", show_default=True)
@click.option("--replicas", type=click.IntRange(1), help="Fix the data-parallel degree.")
@click.option("--stages", type=click.IntRange(1), help="Fix the number of pipeline stages.")
@click.option("--strategy", type=click.Choice(["layer", "weight", "hybrid"]), default=None,
              help="Cut the stages as 'fastserve partition --strategy' does; default: the "
              "planner's cut, balanced by predicted time.")
@click.option("--micro-batches", type=click.IntRange(1), help="Fix the micro-batches.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="Fix the torch threads per rank.")
@click.option("--transport", type=click.Choice(["ipc", "tcp"]), default=None,
              help="The transport the plan's ranks will use (default: ipc on this machine, "
              "tcp when the inventory has other hosts).")
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--latency-ms", type=float, help="Latency ceiling for one batch.")
@click.option("--objective", type=click.Choice(["throughput", "latency", "decode"]),
              default="throughput", show_default=True,
              help="What the plan maximises: samples/s, or one batch's latency; decode (a "
              "language model generating): the fewest ranks that hold the model, then the "
              "lowest latency.")
@click.option("--kv-positions", type=click.IntRange(1),
              help="Generation: positions of KV cache (prompts and new tokens of the sequences "
              "that run together) every stage must hold beside its weights.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False, exists=True),
              help="Measured node and host speeds from 'fastserve profile'.")
@click.option("--widen", "widen_stages", type=click.IntRange(0), multiple=True,
              metavar="STAGE", help="Give stage STAGE (from 0) of every replica one more rank "
              "holding its shard; they take its micro-batches in turn. Repeat to add more.")
@click.option("--explain", is_flag=True, help="Also list the alternatives and why they lost.")
@click.option("--picture", type=click.Path(dir_okay=False),
              help="Also draw the plan (graph coloured by stage, ranks on hosts) to this .svg "
              "or .png; needs matplotlib (pip install 'fastserve[picture]').")
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan file: 'fastserve run SPEC --plan FILE' runs exactly it.")
@dim_option
@trust_option
def plan_cmd(spec, hosts, parallel, replicas, stages, strategy, micro_batches, threads,
             transport, batch, latency_ms, objective, kv_positions, profile_path,
             widen_stages, explain, picture, as_json, dims, trust_code) -> None:
    """Choose replicas, stages, the cut and where every rank runs, from the cost model.

    Prints the ranks, each stage's memory, predicted time and the bottleneck, and the predicted
    throughput, latency and pipeline bubble. The options are the same constraints 'fastserve
    run' gives the planner, so both decide alike.

    \b
    Examples:
      fastserve plan graphs/gpt2.yaml --hosts runtime/hosts/cluster8.yaml --explain
      fastserve plan graphs/mlp.yaml --stages 2 --json > plan.json
      fastserve run graphs/mlp.yaml --plan plan.json --check
      fastserve plan graphs/gpt2.yaml --stages 2 --widen 1 --json > wide.json
    """
    from fastserve.resources.planner import Constraints, plan
    from fastserve.resources.widening import widen, widen_choice

    graph = load_graph(spec, dims, trust_code)
    inventory = _inventory(hosts)
    if transport is None:
        transport = "tcp" if any(h.launcher != "local" for h in inventory.hosts) else "ipc"
    profile = load_profile(profile_path, decode=objective == "decode")
    if kv_positions:
        from fastserve.graph.decode import kv_bytes_per_token

        if not kv_bytes_per_token(graph, graph.order):
            click.echo(f"note: '{graph.name}' has no attention node of the op library, so its "
                       f"positions cost no cache the planner can count (a captured model's "
                       f"attention is inside its programs): --kv-positions changes nothing",
                       err=True)
    chosen = plan(graph, inventory, objective, Constraints(
        parallel=parallel, replicas=replicas, stages=stages, micro_batches=micro_batches,
        batch=batch, latency_ms=latency_ms, strategy=strategy, threads=threads,
        transport=transport, kv_positions=kv_positions), profile)
    for stage in widen_stages:
        chosen = widen(chosen, stage, inventory)
    if picture:
        from fastserve.resources.drawing import draw_plan

        draw_plan(graph, chosen, picture, inventory)
        click.echo(f"drew the plan to {picture}", err=True)
    if as_json:
        click.echo(json.dumps(chosen.document(graph), indent=1))
        return
    click.echo(f"plan for '{graph.name}' on '{inventory.name}': {chosen.mode}, "
               f"{chosen.replicas} replica(s) x {chosen.stages} stage(s)"
               + (f" (ranks per stage {'/'.join(map(str, chosen.widths))})" if chosen.widths
                  else "") + f", {chosen.micro_batches} micro-batch(es), batch {batch}")
    click.echo(table(["stage", "nodes", "host", "threads", "memory", "compute ms",
                      "transfer ms", ""],
                     [(s.stage, f"{s.nodes[0]}..{s.nodes[-1]} ({len(s.nodes)})", s.host,
                       s.threads, human_bytes(s.memory_bytes), f"{s.compute_s * 1e3:.2f}",
                       f"{s.transfer_s * 1e3:.3f}", "bottleneck" if s.bottleneck else "")
                      for s in chosen.stage_plans]
                     + [("coord", "inputs out, outputs back", inventory.hosts[0].name, "", "",
                         "", f"{chosen.coordinator_s * 1e3:.3f}",
                         "" if any(s.bottleneck for s in chosen.stage_plans) else "bottleneck")],
                     "rllrrrrl"))
    click.echo(table(["rank", "replica", "stage", "host", "threads"],
                     [(r.rank, r.replica, r.stage, r.host, r.threads) for r in chosen.ranks],
                     "rrrlr"))
    click.echo(f"predicted: throughput {chosen.throughput:.4g} samples/s, latency "
               f"{_duration(chosen.latency_s)} per batch, bubble {chosen.bubble:.0%}"
               f"{' (measured node times)' if profile else ' (from FLOPs; see fastserve profile)'}")
    click.echo(f"search: {chosen.search}")
    stage = widen_choice(chosen)
    if stage is not None:
        click.echo(f"stage {stage} is the bottleneck by far: another rank for it (--widen "
                   f"{stage}) adds more throughput per rank than another replica")
    _kv_line(graph, chosen, inventory)
    if explain:
        click.echo("alternatives (best of each shape):")
        for a in chosen.alternatives:
            click.echo(f"  {a['replicas']} x {a['stages']} ({a['mode']}, {a['micro_batches']} "
                       f"micro-batches): lost, {a['lost']}")


def _kv_line(graph, chosen, inventory) -> None:
    """For a causal LM: how many positions of KV cache the plan leaves room for."""
    from fastserve.generate import kv_budget, kv_positions
    from fastserve.graph.decode import GenerationError, check_generative

    try:
        check_generative(graph)
    except GenerationError:
        return  # not a language model the generation loop runs
    try:
        per, positions = kv_positions(graph, chosen.cut, kv_budget(chosen, inventory))
    except GenerationError as e:
        click.echo(f"generation: {e}")
        return
    click.echo(f"generation: {positions} positions of KV cache fit in each replica "
               f"({', '.join(human_bytes(b) for b in per)} a position, stage by stage)")


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 3600:
        return f"{seconds:.1f} s"
    return f"{seconds / 3600:.1f} h"


@cli.command("profile")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(1), default=16, show_default=True,
              help="Largest batch timed; every node is also timed at 1, 4, 16, ... below it "
              "and the planner interpolates. Use the micro-batch sizes you expect to run.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Where to write the profile (JSON).")
@click.option("--host", default="local", show_default=True,
              help="Name of this host in the inventory.")
@click.option("--decode", "decode_rows", type=click.IntRange(1, 4096), metavar="ROWS",
              help="Time each node's generation step over ROWS sequences instead (a causal LM; "
              "use the sequences per micro-batch you will run), for 'fastserve generate "
              "--profile': a decode step costs what reading the weights costs, which a "
              "batch's profile does not show.")
@dim_option
@trust_option
def profile_cmd(spec, batch, out, host, decode_rows, dims, trust_code) -> None:
    """Measure every node's time on one thread of this machine, and the machine's FLOP/s.

    The cost of a message between processes is not measured here (it needs running ranks;
    'fastserve bench plan' measures it): plans from this profile use the inventory's link
    latency for it.
    """
    from fastserve.resources.profiling import profile_graph

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    if decode_rows is not None:
        from fastserve.generate.model import language_model
        from fastserve.generate.profile import decode_profile

        if dims:
            raise click.UsageError("--dim sets a batch's shape; a decode step has its own "
                                   "(one new token per sequence): drop --dim with --decode")
        cleanup = click.get_current_context().with_resource(ExitStack())
        graph, _cut, _export = language_model(spec, trust_code, cleanup, say)
        measured = decode_profile(graph, host, decode_rows, progress=say)
    else:
        graph = load_graph(spec, dims, trust_code)
        measured = profile_graph(graph, host, batch, progress=say)
    with open(out, "w") as f:
        json.dump(measured.to_json(), f, indent=1)
    what = f"decode steps of {decode_rows} sequences, " if decode_rows else ""
    click.echo(f"wrote {out}: {what}{len(measured.node_seconds)} nodes, "
               f"{measured.host_flops[host] / 1e9:.1f} GFLOP/s per thread on '{host}'")


@bench.command("plan")
@click.option("--json", "as_json", is_flag=True)
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="Also run the chosen plans on this machine and compare with predictions.")
def bench_plan_cmd(as_json, measure) -> None:
    """Planning time at scale (100 layers on 16 hosts, 200 layers on 64 hosts), and predicted
    vs measured throughput of the chosen plan for 3 shipped graphs on this machine.

    Targets: under 1 s and under 5 s; predictions within 25% of measurements.
    """
    from fastserve.bench.plan import measure_predictions, planning_times

    out = {"planning": planning_times(progress=lambda m: click.echo(m, err=True))}
    if measure:
        out["accuracy"] = measure_predictions(progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(table(["layers", "hosts", "seconds", "chosen"],
                     [(r["layers"], r["hosts"], f"{r['seconds']:.2f}", r["chosen"])
                      for r in out["planning"]], "rrrl"))
    if measure:
        click.echo(table(["graph", "plan", "predicted samples/s", "measured samples/s",
                          "error"],
                         [(r["graph"], r["plan"], f"{r['predicted']:.1f}",
                           f"{r['measured']:.1f}", f"{r['error']:+.0%}")
                          for r in out["accuracy"]], "llrrr"))
