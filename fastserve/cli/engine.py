"""``fastserve run``: run a graph on rank processes and summarise what happened."""

from __future__ import annotations

import itertools
import json

import click

from fastserve.cli.app import bench, cli
from fastserve.cli.graph import dim_option, load_profile, parse_dims, trust_option
from fastserve.cli.render import table
from fastserve.engine.spin import MAX_SPIN_US
from fastserve.errors import EngineError
from fastserve.limits import MAX_THREADS


def cluster_options(command):
    """--hosts, --keys, --coordinator and --ray: where ranks run and how they are reached."""
    for option in reversed([
        click.option("--hosts", type=click.Path(dir_okay=False),
                     help="Host inventory YAML (default: this machine, detected)."),
        click.option("--keys", "keys_dir", type=click.Path(file_okay=False),
                     help="The cluster's key directory ('fastserve keys new DIR'): needed when "
                     "the inventory has hosts whose ranks start through their agents."),
        click.option("--coordinator", "coordinator_address", default=None,
                     help="The address of this machine that other hosts' ranks connect to "
                     "(default: its address on the route to the first agent host)."),
        click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                     help="The Ray cluster for hosts whose launcher is 'ray' (default: "
                     "RAY_ADDRESS, else 'auto').")]):
        command = option(command)
    return command


spin_option = click.option(
    "--spin-us", type=click.IntRange(0, MAX_SPIN_US), default=None, metavar="US",
    help="How long ranks (and this process) poll for a message that is due before they "
    "sleep, in microseconds: faster small messages for a busy core [default: 1000 on each "
    "machine with a core per rank thread, else 0; 0: never poll].")


def load_cluster(hosts: str | None, keys_dir: str | None, transport: str | None):
    """``(inventory, keys, transport)`` for --hosts and --keys: this machine without --hosts;
    tcp (CURVE) when a host is another machine. Refused, before any rank starts: ipc to other
    machines, agent hosts without the cluster's keys."""
    from fastserve.engine.keys import load_keys
    from fastserve.resources.inventory import load_inventory, local_inventory

    inventory = load_inventory(hosts) if hosts else local_inventory()
    agents = [h.name for h in inventory.hosts if h.launcher == "agent"]
    elsewhere = [h.name for h in inventory.hosts if h.launcher != "local"]
    if elsewhere and transport == "ipc":
        raise click.UsageError(f"hosts {', '.join(elsewhere)} are other machines, reached over "
                               f"tcp: drop --transport ipc")
    if agents and not keys_dir:
        raise EngineError(f"hosts {', '.join(agents)} start their ranks through their agents: "
                          f"give the cluster keys (--keys DIR; make them with: fastserve keys "
                          f"new DIR)")
    keys = load_keys(keys_dir, "coordinator") if keys_dir else None
    return inventory, keys, transport or ("tcp" if elsewhere else "ipc")


@cli.command("run")
@click.argument("spec", type=click.Path(exists=True))
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="Run exactly this plan (from 'fastserve plan SPEC --json > plan.json'); the "
              "shape options below then may not be given.")
@click.option("--parallel", type=click.Choice(["auto", "model", "data", "hybrid"]),
              default="auto", show_default=True,
              help="Pipeline stages, data-parallel replicas, or both; auto lets the planner "
              "choose from the inventory and the cost model. Every option of the layout is a "
              "constraint to the planner, which decides the rest as 'fastserve plan' does.")
@click.option("--stages", type=click.IntRange(1), help="Pipeline stages per replica.")
@click.option("--replicas", type=click.IntRange(1), help="Data-parallel replicas.")
@click.option("--strategy", type=click.Choice(["layer", "weight", "hybrid"]), default=None,
              help="Cut the stages as 'fastserve partition --strategy' does (weight: by "
              "parameter bytes); default: the planner's cut, balanced by predicted time.")
@click.option("--micro-batches", type=click.IntRange(1), default=None,
              help="Micro-batches per replica (default: the planner's choice).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="Inputs as .npz, one array per graph input.")
@click.option("--random", "random_batch", type=click.IntRange(1),
              help="Run on random inputs of this batch size (default 8).")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the outputs as .npz.")
@click.option("--check", is_flag=True, help="Compare with the single-process reference; fail "
              "if they differ.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="Torch threads per rank (default: "
              "the planner's, the cores shared evenly).")
@click.option("--repeat", type=click.IntRange(1), default=1, show_default=True,
              help="After a warm-up run, send the batch this many times back to back as one "
              "stream (no drain between batches); the summary is the stream's.")
@click.option("--transport", type=click.Choice(["ipc", "tcp"]), default=None,
              help="ipc or tcp (CURVE-authenticated) [default: ipc on this machine, tcp when "
              "the inventory has other hosts].")
@click.option("--timeout", type=click.FloatRange(0, 86400, min_open=True), default=60.0,
              show_default=True,
              help="Seconds without progress before a rank is declared dead.")
@spin_option
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@dim_option
@trust_option
def run_cmd(spec, plan_path, hosts, parallel, stages, replicas, strategy, micro_batches,
            input_path, random_batch, output, check, threads, repeat, transport, timeout,
            spin_us, keys_dir, coordinator_address, ray_address, as_json, dims,
            trust_code) -> None:
    """Run SPEC on rank processes connected by ZeroMQ.

    \b
    SPEC is a graph spec, or a directory written by 'fastserve partition --export': then
    every rank loads only its own shard file and the stages are the export's shards.

    \b
    Examples:
      fastserve run graphs/gpt2.yaml --parallel model --stages 2 --random 8 --check
      fastserve run graphs/mlp.yaml --parallel hybrid --replicas 2 --stages 2 --check
      fastserve plan graphs/mlp.yaml --json > plan.json && fastserve run graphs/mlp.yaml --plan plan.json
      fastserve partition graphs/gpt2.yaml --shards 2 --export out/gpt2-2
      fastserve run out/gpt2-2 --replicas 1 --check
      fastserve run graphs/gpt2.yaml --hosts runtime/hosts/loopback3.yaml --keys keys/ --check
    """
    import torch

    from fastserve.engine import Deployment
    from fastserve.engine.coordinator import RunStats
    from fastserve.engine.deployment import load_graph
    from fastserve.graph import random_inputs, reference
    from fastserve.graph.inputs import check_inputs, read_inputs
    from fastserve.resources.plan import load_plan
    from fastserve.resources.planner import Constraints, plan

    # a bad inputs file, inventory or plan fails here, before any rank process starts
    file_inputs = read_inputs(input_path) if input_path else None
    inventory, keys, wire = load_cluster(hosts, keys_dir, transport)

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    graph, cut, export_dir = load_graph(spec, parse_dims(dims), trust_code)
    if file_inputs is not None:  # checked against the graph before anything is planned
        check_inputs(graph, file_inputs, input_path)
    if plan_path:
        given = {"--parallel": parallel != "auto", "--stages": stages, "--replicas": replicas,
                 "--strategy": strategy, "--micro-batches": micro_batches,
                 "--threads": threads}
        clash = [k for k, v in given.items() if v]
        if clash:
            raise click.UsageError(f"{', '.join(clash)} cannot be combined with --plan: the "
                                   f"plan fixes them (plan again with those constraints)")
        chosen = load_plan(plan_path, graph)
        if transport not in (None, chosen.transport):
            raise click.UsageError(f"the plan's transport is {chosen.transport}, not "
                                   f"{transport}")
        say(f"running the plan {plan_path} ({chosen.mode}: {chosen.replicas} replica(s) x "
            f"{chosen.stages} stage(s), {chosen.micro_batches} micro-batch(es))")
        if not hosts:  # a plan made for other hosts runs here: say so, it may not be meant
            named = sorted({r.host for r in chosen.ranks} - {h.name for h in inventory.hosts})
            if named:
                say(f"note: the plan places ranks on host(s) {', '.join(named)}; without "
                    f"--hosts they all run on this machine")
    else:
        if cut is not None and stages not in (None, len(cut)):
            raise EngineError(f"the export '{spec}' holds {len(cut)} shards; it runs as "
                              f"{len(cut)} stages, not --stages {stages}")
        if cut is not None and parallel == "data" and len(cut) > 1:
            raise EngineError(f"the export '{spec}' holds {len(cut)} shards: run it with "
                              f"--parallel model or hybrid")
        chosen = plan(graph, inventory, constraints=Constraints(
            parallel=parallel, replicas=replicas, stages=len(cut) if cut else stages,
            micro_batches=micro_batches, batch=random_batch or 8, strategy=strategy,
            threads=threads, cut=cut, transport=wire))
        say(f"planner chose {chosen.mode}: {chosen.replicas} replica(s) x {chosen.stages} "
            f"stage(s), {chosen.micro_batches} micro-batch(es) (see fastserve plan --explain)")
    deployment = Deployment(graph, chosen, timeout=timeout, progress=say,
                            trust_code=trust_code, export_dir=export_dir,
                            inventory=inventory if hosts else None, keys=keys,
                            coordinator_address=coordinator_address, ray_address=ray_address,
                            spin_us=spin_us)
    micro = chosen.micro_batches
    threads_used = sorted({r.threads for r in chosen.ranks})
    widths = f" (ranks per stage {'/'.join(map(str, chosen.widths))})" if chosen.widths else ""
    say(f"{chosen.replicas} replica(s) x {chosen.stages} stage(s){widths} = "
        f"{len(chosen.ranks)} rank(s), {'/'.join(map(str, threads_used))} thread(s) each, on "
        f"{inventory.name}")
    with deployment as dep:
        if file_inputs is not None:
            inputs = file_inputs
        else:
            inputs = random_inputs(dep.graph, random_batch or 8)
        size = next(iter(inputs.values())).shape[0]
        if repeat == 1:
            say(f"running a batch of {size} with {micro} micro-batch(es) per replica")
            results = [dep.run(inputs, micro_batches=micro)]
        else:
            say(f"warm-up: a batch of {size} with {micro} micro-batch(es) per replica")
            dep.run(inputs, micro_batches=micro)
            dep.stats = RunStats()  # the stream's timings only
            say(f"running a stream of {repeat} batches of {size}")
            results = dep.run_batches([inputs] * repeat, micro_batches=micro)
        outputs = results[-1]
        stats = dep.stats.to_json()
        verdict = None
        if check:
            # with the ranks' thread count: a matmul's sums run in another order with more
            # threads, so a reference with other threads differs in the last bits
            ref_threads = min(r.threads for r in chosen.ranks)
            say(f"running the single-process reference ({ref_threads} thread(s), as the ranks)")
            before = torch.get_num_threads()
            torch.set_num_threads(ref_threads)
            try:
                expected = reference(dep.graph, inputs)
            finally:
                torch.set_num_threads(before)
            for (i, got), (name, t) in itertools.product(enumerate(results), expected.items()):
                try:
                    torch.testing.assert_close(got[name], t)
                except AssertionError as e:
                    detail = " ".join(str(e).split("\n")[1:3]).strip()
                    which = f" of batch {i + 1}" if len(results) > 1 else ""
                    raise EngineError(f"output '{name}'{which} differs from the single-process "
                                      f"reference: {detail}") from None
            verdict = "outputs equal the single-process reference"
        shards = [{"stage": s.index, "nodes": f"{s.nodes[0]}..{s.nodes[-1]}",
                   "params_bytes": s.params_bytes} for s in dep.sharding]
        # what each rank reported it built and runs with: compare with the plan
        ranks = [{"rank": r, "nodes": m["nodes"], "threads": m["threads"]}
                 for r, m in sorted(dep.ready.items())]
    if output:
        import numpy as np

        np.savez(output, **{k: v.numpy() for k, v in outputs.items()})
    _summary(stats, shards, deployment.layout, micro, verdict, as_json,
             {"plan_hash": deployment.plan_hash, "ranks": ranks})


def _summary(stats: dict, shards: list, layout, micro: int, verdict: str | None,
             as_json: bool, ran: dict) -> None:
    if as_json:
        click.echo(json.dumps({"layout": {"replicas": layout.replicas, "stages": layout.stages,
                                          "threads": layout.threads, "micro_batches": micro},
                               "shards": shards, **stats, "check": verdict, **ran}, indent=1))
        return
    rows = []
    for s in shards:
        st = stats["stages"].get(s["stage"], {})
        rows.append((s["stage"], s["nodes"], f"{st.get('compute_s', 0) * 1e3:.1f}",
                     f"{st.get('transfer_s', 0) * 1e3:.2f}",
                     f"{st.get('queue_s', 0) * 1e3:.2f}"))
    click.echo(table(["stage", "nodes", "compute ms", "transfer ms", "queue ms"], rows,
                     "rlrrr"))
    click.echo("(means per micro-batch over all replicas; transfer is the fastest hop of the "
               "run, queue the rest of each hop)")
    click.echo(f"{stats['seconds'] * 1e3:.1f} ms for {stats['samples']} samples, "
               f"throughput {stats['throughput']:.1f} samples/s")
    if verdict:
        click.echo(f"check: {verdict}")


@bench.command("transport")
@click.option("--transport", "transports", multiple=True, type=click.Choice(["ipc", "tcp"]),
              help="Transports to measure (default: both).")
@click.option("--blocks", type=click.IntRange(1), default=9, show_default=True,
              help="Interleaved measurement blocks per size; the median is reported.")
@click.option("--spin-us", type=click.IntRange(0, MAX_SPIN_US), default=None, metavar="US",
              help="Polling window of the polling peers (default: what a deployment picks for "
                   "two 1-thread processes on this machine; 0: no polling peers).")
@click.option("--json", "as_json", is_flag=True)
def bench_transport_cmd(transports, blocks, spin_us, as_json) -> None:
    """FastServe hop vs a raw pyzmq round trip with the same bytes, side by side.

    Targets (ipc): at 4 KiB the FastServe round trip is at most 1.2x raw; at 16 MiB its
    throughput is at least 90% of raw. Every end waits in a blocking poll. The plain codec
    column is a codec as one would write it by hand (a JSON header read and written at both
    ends) against the same raw trip. Then, where this machine has a core for each end, a
    FastServe and a raw peer whose ends poll before they sleep, as a deployment's ranks and
    coordinator do: the FastServe hop as deployed, over the blocking and the polling raw trip.
    All are measured in the same blocks.
    """
    from fastserve.bench.engine import bench_transport

    rows = bench_transport(transports or ("ipc", "tcp"), blocks=blocks, spin_us=spin_us,
                           progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(table(["transport", "size", "raw RTT us", "fastserve RTT us", "time ratio",
                      "throughput ratio", "plain codec ratio"],
                     [(r["transport"], r["size"], f"{r['raw_rtt_us']:.1f}",
                       f"{r['fastserve_rtt_us']:.1f}", f"{r['overhead_ratio']:.2f}x",
                       f"{r['throughput_ratio'] * 100:.0f}%", f"{r['plain_ratio']:.2f}x")
                      for r in rows], "llrrrrr"))
    polled = [r for r in rows if "fastserve_polling_rtt_us" in r]
    if polled:
        click.echo(f"\npolling before sleeping ({polled[0]['spin_us']} us), as a deployment's "
                   f"ranks and coordinator do:")
        click.echo(table(["transport", "size", "raw polling RTT us", "fastserve polling RTT us",
                          "over raw", "over raw polling"],
                         [(r["transport"], r["size"], f"{r['raw_polling_rtt_us']:.1f}",
                           f"{r['fastserve_polling_rtt_us']:.1f}",
                           f"{r['polling_over_raw']:.2f}x",
                           f"{r['polling_over_raw_polling']:.2f}x") for r in polled],
                         "llrrrr"))


@bench.command("pipeline")
@click.argument("spec", default="graphs/gpt2.yaml", type=click.Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seq", type=click.IntRange(1), default=32, show_default=True)
@click.option("--stages", type=click.IntRange(2), default=2, show_default=True)
@click.option("--replicas", type=click.IntRange(2), default=2, show_default=True)
@click.option("--micro-batches", type=click.IntRange(1), default=8, show_default=True)
@click.option("--stream", type=click.IntRange(1), default=4, show_default=True,
              help="Batches sent back to back for the streamed throughput.")
@click.option("--repeats", type=click.IntRange(1), default=2, show_default=True,
              help="Timed runs per configuration; the best is kept.")
@click.option("--json", "as_json", is_flag=True)
@trust_option
def bench_pipeline_cmd(spec, batch, seq, stages, replicas, micro_batches, stream, repeats,
                       as_json, trust_code) -> None:
    """A p-stage pipeline (1 thread per rank) vs one process with 1 and p threads; d replicas
    vs one; each rank's resident memory vs its shard's weights.

    Each deployment is timed on one batch alone (fill and drain paid per batch) and on a stream
    of --stream batches back to back (the serving case: the bubble is paid once per stream).

    Targets on GPT-2 small, batch 32: 2 stages >= 1.6x one 1-thread process; 2 replicas >= 1.7x
    one; a rank's memory above an idle rank at most its weights + 10%.
    """
    from fastserve.bench.engine import bench_pipeline

    out = bench_pipeline(spec, batch=batch, seq=seq, stages=stages, replicas=replicas,
                         micro_batches=micro_batches, stream=stream, repeats=repeats,
                         trust_code=trust_code, progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"{out['graph']}, batch {batch}, seq {seq}, {micro_batches} micro-batches, "
               f"streams of {stream} batches")
    click.echo(table(["configuration", "seconds per batch", "samples/s"],
                     [(k, f"{v:.3f}", f"{batch / v:.1f}")
                      for k, v in out["seconds_per_batch"].items()], "lrr"))
    for k, v in out["ratios"].items():
        click.echo(f"{k}: {v:.2f}x")
    click.echo(table(["rank", "weights MiB", "load s", "peak while loading", "loaded",
                      "after run", "after idling"],
                     [(m["rank"], f"{m['weight_bytes'] / 2**20:.1f}", f"{m['load_s']:.2f}",
                       f"{m['peak_loading_over_weights']:.3f}x",
                       f"{m['loaded_over_weights']:.3f}x",
                       f"{m['after_run_over_weights']:.3f}x",
                       f"{m['after_idle_over_weights']:.3f}x") for m in out["rank_memory"]],
                     "rrrrrrr"))
    click.echo("(resident memory above an idle rank, over the rank's weight bytes; after "
               "idling: once a rank has had no work for 2 s it gives its activations' pages "
               "back; a result ring's pages are the coordinator's and not counted)")
    click.echo("target, rank memory at most its weights + 10% + one micro-batch's activations "
               "(as planned): " + "; ".join(
                   f"rank {m['rank']} {m['after_run_over_allowed']:.2f}x after the run, "
                   f"{m['after_idle_over_allowed']:.2f}x after idling"
                   for m in out["rank_memory"]))


@bench.command("request")
@click.argument("spec", default="graphs/mlp.yaml", type=click.Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--blocks", type=click.IntRange(1), default=9, show_default=True,
              help="Interleaved blocks; the median block is kept.")
@click.option("--requests", "n", type=click.IntRange(1), default=200, show_default=True,
              help="Requests per block.")
@click.option("--json", "as_json", is_flag=True)
def bench_request_cmd(spec, batch, blocks, n, as_json) -> None:
    """Latency of one small request through one rank and through two stages, against eager
    in-process, a raw pyzmq ipc round trip of the same input bytes, and the same one and two
    stages in plain pyzmq processes (no FastServe on the path: this machine's floor for them).

    Targets (MLP, batch 1): one rank at most eager + 1.5 raw round trips; two stages at most
    eager + 2. A deployment polls for a due message before sleeping when the machine has a
    core for each rank thread (spin_us in the output).
    """
    from fastserve.bench.engine import bench_request

    out = bench_request(spec, batch=batch, blocks=blocks, n=n,
                        progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"{out['graph']}, batch {batch}, median of {blocks} blocks of {n} requests")
    click.echo(table(["path", "us per request"],
                     [(k, f"{v:.0f}") for k, v in out["microseconds"].items()], "lr"))
    click.echo(f"one rank: eager + {out['one_rank_over_eager_in_raw_rtts']:.2f} raw round "
               f"trips (target 1.5; plain process: "
               f"{out['plain_one_process_over_eager_in_raw_rtts']:.2f}; polling "
               f"{out['spin_us']['one_rank']} us)")
    click.echo(f"two stages: eager + {out['two_stages_over_eager_in_raw_rtts']:.2f} (target 2; "
               f"plain processes: {out['plain_two_processes_over_eager_in_raw_rtts']:.2f}; "
               f"polling {out['spin_us']['two_stages']} us)")


@bench.command("compare")
@click.argument("spec", default="graphs/gpt2.yaml", type=click.Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seq", type=click.IntRange(1), default=128, show_default=True)
@click.option("--stages", type=click.IntRange(2), default=2, show_default=True,
              help="N: pipeline stages, replicas, and threads of the N-thread process.")
@click.option("--micro-batches", type=click.IntRange(1), default=8, show_default=True,
              help="Micro-batches of the pipeline; every other run works in chunks of the "
              "same number of samples.")
@click.option("--stream", type=click.IntRange(1), default=3, show_default=True,
              help="Batches sent back to back for the streamed figures.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Interleaved rounds; the median of each run is kept.")
@click.option("--no-torch", is_flag=True,
              help="Leave torch.distributed.pipelining out (it needs a chain cut).")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False, exists=True),
              help="Cut the pipeline by these measured node times ('fastserve profile SPEC "
              "--dim seq=128'), not by FLOPs; torch pipelining runs on the same cut.")
@click.option("--sockets", is_flag=True,
              help="Also run both deployments streamed with results over the ipc socket "
              "instead of the shared-memory ring, to see what the ring buys (results under "
              "256 KiB take the socket either way).")
@click.option("--json", "as_json", is_flag=True)
@trust_option
def bench_compare_cmd(spec, batch, seq, stages, micro_batches, stream, rounds, no_torch,
                      profile_path, sockets, as_json, trust_code) -> None:
    """FastServe against what you would run instead, interleaved in one run: one process with
    1 and N threads, torch.distributed.pipelining with N stages over gloo on FastServe's cut,
    a FastServe N-stage pipeline and N FastServe replicas (alone and streamed), and N plain
    1-thread processes side by side, each over 1/N of the batch with no messages at all.

    Prints samples/s and the ratios of the targets: the streamed pipeline and replicas
    against N x one 1-thread process (95%) and the N-thread process (1.0x), the pipeline
    against torch pipelining (1.2x). The plain processes side by side are the machine's
    ceiling for any N-process layout: what N processes reach when they share its cores,
    caches and memory, against N x one process alone. Both FastServe deployments are first
    checked against one process (assert_close). GPT-2 small at the defaults takes several
    minutes.
    """
    from fastserve.bench.compare import bench_compare

    out = bench_compare(spec, batch=batch, seq=seq, stages=stages, micro_batches=micro_batches,
                        stream=stream, rounds=rounds, torch_pipelining=not no_torch,
                        profile=load_profile(profile_path, decode=False),
                        sockets=sockets, trust_code=trust_code,
                        progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"{out['graph']}, batch {batch}, seq {seq}, micro-batches of "
               f"{out['micro_batch_samples']} samples, cut {out['cut']} (by {out['cut_by']}), "
               f"streams of {stream}, "
               f"median of {rounds} round(s)")
    click.echo(table(["run", "seconds per batch", "samples/s"],
                     [(k, f"{v:.3f}", f"{out['samples_per_s'][k]:.2f}")
                      for k, v in out["seconds_per_batch"].items()], "lrr"))
    for k, v in out["ratios"].items():
        click.echo(f"{k}: {v:.2f}x")
    click.echo("FastServe pipeline, per micro-batch: " + "; ".join(
        f"stage {k} compute {v['compute_s'] * 1e3:.1f} ms, transfer "
        f"{v['transfer_s'] * 1e3:.1f} ms, queue {v['queue_s'] * 1e3:.1f} ms"
        for k, v in out["pipeline_stages"].items()))
    click.echo("results through the shared-memory ring (the rest were under ring_min_bytes or "
               "found it full): " + ", ".join(
        f"{k} {v:.0%}" for k, v in out["results_through_ring"].items()))


@bench.command("load")
@click.option("--model", "models", multiple=True, type=click.Choice(["bert", "llama"]),
              help="Models to load (default: both).")
@click.option("--layers", type=click.IntRange(1), default=12, show_default=True)
@click.option("--hidden", type=click.IntRange(64), default=768, show_default=True,
              help="Hidden size (a multiple of 64: heads are 64 wide).")
@click.option("--stages", type=click.IntRange(1), default=2, show_default=True)
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_load_cmd(models, layers, hidden, stages, replicas, as_json) -> None:
    """Memory and time to ready of ranks loading a captured transformers model.

    Writes a safetensors checkpoint of a BERT and a Llama model (12 layers, 768 wide by
    default) and a spec naming it, deploys it, and prints per rank: resident memory above an
    idle rank at its peak while loading and once ready, over its shard's weight bytes, and
    seconds to ready (of which reading weights); plus the memory the driver adds while it
    compiles and plans. The outputs are checked against one process.

    Targets: peak at most 1.5x the shard's weights, ready at most 1.1x; ready within 3 s plus
    the time to read the shard; the driver holds no weights.
    """
    from fastserve.bench.load import bench_load

    rows = bench_load(models or ("bert", "llama"), layers=layers, hidden=hidden, stages=stages,
                      replicas=replicas, progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for row in rows:
        click.echo(f"{row['graph']}: {row['weight_bytes'] / 2**20:.1f} MiB of weights, "
                   f"{row['replicas']} replica(s) x {row['stages']} stage(s); outputs "
                   f"{'exact' if row['exact'] else 'DIFFER from one process'}; the driver "
                   f"added {row['driver_added_bytes'] / 2**20:.1f} MiB "
                   f"({row['driver_added_over_weights']:.2f}x the weights) in "
                   f"{row['driver_compile_s']:.2f} s to compile and plan")
        click.echo(table(["rank", "weights MiB", "idle MiB", "peak loading", "ready",
                          "load s", "read s"],
                         [(m["rank"], f"{m['weight_bytes'] / 2**20:.1f}",
                           f"{m['rss_idle'] / 2**20:.0f}", f"{m['peak_over_weights']:.2f}x",
                           f"{m['loaded_over_weights']:.2f}x", f"{m['load_s']:.2f}",
                           "-" if m["read_s"] is None else f"{m['read_s']:.2f}")
                          for m in row["ranks"]], "rrrrrrr"))
    click.echo("(resident memory above an idle rank, over the rank's weight bytes)")
