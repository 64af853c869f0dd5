"""``fastserve keys``, ``fastserve agent`` and ``fastserve hosts``: running on several hosts."""

from __future__ import annotations

import json

import click

from fastserve.cli.app import bench, cli
from fastserve.cli.render import table


@cli.group("keys")
def keys_group() -> None:
    """The cluster's CURVE keys (agents obey only coordinators holding them)."""


@keys_group.command("new")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace keys already in DIRECTORY.")
def keys_new_cmd(directory, force) -> None:
    """Make the coordinator and agent keys in DIRECTORY (mode 0700; secret files 0600).

    Copy DIRECTORY to every host: agents run with '--keys DIRECTORY', and 'fastserve run
    --keys DIRECTORY' uses the coordinator key. An agent obeys every coordinator*.key public
    key in its directory.
    """
    from fastserve.engine.keys import new_keys

    for path in new_keys(directory, force=force):
        click.echo(path)


@cli.command("agent")
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="The one address to bind (this host's address on the cluster network; "
              "port 0: the kernel picks one, printed at start).")
@click.option("--keys", "keys_dir", required=True, type=click.Path(file_okay=False),
              help="The cluster's key directory ('fastserve keys new').")
@click.option("--coordinator-timeout", type=click.FloatRange(1.0), default=10.0,
              show_default=True, help="Stop this host's ranks when no coordinator has spoken "
              "for this many seconds.")
@click.option("--cache", type=click.Path(file_okay=False),
              help="Where files from coordinators (checkpoints) are kept, by sha256 (default: "
              "~/.cache/fastserve/agent-HOST-PORT).")
def agent_cmd(listen, keys_dir, coordinator_timeout, cache) -> None:
    """Run this host's agent: it starts FastServe rank processes for an authenticated
    coordinator, and nothing else.

    It reports the host's cores, memory and measured FLOP/s, starts and stops ranks, reports a
    dead rank at once, sends rank logs on request, keeps the checkpoints coordinators send it
    (verified and cached by sha256), and stops a coordinator's ranks when that coordinator
    has been gone longer than --coordinator-timeout. Stop it with Ctrl-C or SIGTERM.
    """
    from fastserve.engine.agent import Agent
    from fastserve.engine.keys import load_keys

    try:
        from fastserve.engine.agent import parse_listen

        parse_listen(listen)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    Agent(listen, load_keys(keys_dir, "agent"), coordinator_timeout=coordinator_timeout,
          cache=cache).serve()


@cli.group("hosts")
def hosts_group() -> None:
    """Check the hosts of an inventory."""


@hosts_group.command("check")
@click.argument("inventory", type=click.Path(exists=True, dir_okay=False))
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False),
              help="The cluster's key directory (needed for agent hosts).")
@click.option("--write", "write_path", type=click.Path(dir_okay=False),
              help="Also write INVENTORY with what was measured (each agent host's cores, "
              "memory and FLOP/s; the slowest link as the default link) to this file, for "
              "'fastserve plan/run --hosts'.")
@click.option("--wait", type=click.FloatRange(0), default=0, show_default=True,
              help="Seconds to wait for an agent that does not answer yet (one just started).")
@click.option("--json", "as_json", is_flag=True)
def hosts_check_cmd(inventory, keys_dir, write_path, wait, as_json) -> None:
    """Connect to every agent of INVENTORY and print its resources, the measured latency
    (median round trip of 4 KiB) and bandwidth (16 MiB each way) of the link to it, and how
    many peers without the cluster's key it has refused since it started.

    Exits non-zero if a host does not answer.
    """
    import zmq

    from fastserve.bench.hosts import measure_link
    from fastserve.engine.agent import AgentClient, HostError
    from fastserve.engine.keys import load_keys
    from fastserve.errors import EngineError
    from fastserve.resources.inventory import load_inventory

    inv = load_inventory(inventory)
    agents = [h for h in inv.hosts if h.launcher == "agent"]
    if agents and not keys_dir:
        raise click.UsageError("the inventory has agent hosts: give --keys DIR")
    keys = load_keys(keys_dir, "coordinator") if agents else None
    ctx = zmq.Context()
    rows, failed = [], []
    try:
        for h in inv.hosts:
            if h.launcher != "agent":
                rows.append({"host": h.name, "address": h.address, "launcher": h.launcher,
                             "cores": h.cores, "memory_bytes": h.memory_bytes})
                continue
            client = None
            try:
                client = AgentClient(ctx, h.name, h.agent, keys)
                # a request waits for the agent's socket to come up, so waiting is a timeout
                info, _ = client.request("resources", timeout=max(client.timeout, wait))
                rows.append({"host": h.name, "address": h.agent, "launcher": "agent",
                             "cores": info["cores"], "memory_bytes": info["memory_bytes"],
                             "flops_per_core": info["flops"], "refused": info["refused"],
                             **measure_link(client)})
            except HostError as e:
                failed.append(str(e))
                rows.append({"host": h.name, "address": h.agent, "launcher": "agent",
                             "error": str(e)})
            finally:
                if client is not None:
                    client.close()
    finally:
        ctx.term()
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        click.echo(table(
            ["host", "address", "cores", "memory GiB", "GFLOP/s per core", "latency us",
             "bandwidth MB/s", "refused peers"],
            [(r["host"], r["address"], r.get("cores", "-"),
              f"{r['memory_bytes'] / 2**30:.1f}" if "memory_bytes" in r else "-",
              f"{r['flops_per_core'] / 1e9:.1f}" if "flops_per_core" in r else "-",
              f"{r['latency_us']:.0f}" if "latency_us" in r else "-",
              f"{r['bandwidth'] / 1e6:.0f}" if "bandwidth" in r else "-",
              r.get("refused", "-")) for r in rows],
            "llrrrrrr"))
    if failed:
        raise EngineError("; ".join(failed))
    if write_path:
        _write_measured(inventory, rows, write_path)
        click.echo(f"wrote the measured inventory to {write_path}", err=True)


def _write_measured(source: str, rows: list[dict], path: str) -> None:
    """The inventory file with the agents' measured resources, and the slowest measured link
    (one way: half a round trip) as every link's default."""
    import yaml

    from fastserve.yamlio import read_text, read_yaml
    from fastserve.errors import InventoryError

    doc = read_yaml(read_text(source, "host inventory", InventoryError), source,
                    InventoryError)
    measured = {r["host"]: r for r in rows if "flops_per_core" in r}
    plain = json.loads(json.dumps(doc))  # the loader's line-tracking containers, as plain data
    for h in plain["hosts"]:
        r = measured.get(h["name"])
        if r is not None:
            h.update(cores=r["cores"], memory=r["memory_bytes"],
                     flops=round(r["flops_per_core"]))
    if measured:
        plain["defaults"] = {**plain.get("defaults", {}),
                             "bandwidth": round(min(r["bandwidth"] for r in measured.values())),
                             "latency_us": round(max(r["latency_us"] for r in measured.values())
                                                 / 2, 1)}
    with open(path, "w") as f:
        f.write(f"# measured by: fastserve hosts check {source}\n")
        yaml.safe_dump(plain, f, sort_keys=False)


@bench.command("hosts")
@click.argument("spec", default="graphs/gpt2.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--hosts", "inventory_path", type=click.Path(exists=True, dir_okay=False),
              help="An inventory of agent hosts (default: start three agents on 127.0.0.2-4).")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False),
              help="The cluster's key directory (with --hosts).")
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--seq", type=click.IntRange(1), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_hosts_cmd(spec, inventory_path, keys_dir, batch, seq, as_json) -> None:
    """A hop between two hosts vs raw pyzmq tcp (CURVE off and on), and a 3-stage pipeline
    over three hosts vs the same plan on this machine.

    Target: a 4 KiB hop with CURVE at most 1.5x a raw tcp round trip. Every end waits in a
    blocking poll; then, where this machine has a core for each end, a FastServe and a raw
    peer whose ends poll before they sleep, as a deployment's ranks and coordinator do.
    """
    from fastserve.bench.hosts import bench_hosts
    from fastserve.engine.keys import load_keys
    from fastserve.resources.inventory import load_inventory

    if inventory_path and not keys_dir:
        raise click.UsageError("--hosts needs --keys DIR")
    out = bench_hosts(spec, batch=batch, seq=seq,
                      inventory=load_inventory(inventory_path) if inventory_path else None,
                      keys=load_keys(keys_dir, "coordinator") if inventory_path else None,
                      progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(table(["size", "raw tcp us", "raw tcp + CURVE us", "FastServe us", "vs raw",
                      "vs raw + CURVE"],
                     [(h["size"], f"{h['raw_rtt_us']:.0f}", f"{h['raw_curve_rtt_us']:.0f}",
                       f"{h['fastserve_rtt_us']:.0f}", f"{h['vs_raw']:.2f}x",
                       f"{h['vs_raw_curve']:.2f}x") for h in out["hops"]], "lrrrrr"))
    polled = [h for h in out["hops"] if "fastserve_polling_rtt_us" in h]
    if polled:
        click.echo(f"polling before sleeping ({polled[0]['spin_us']} us), as a deployment's "
                   f"ranks and coordinator do:")
        click.echo(table(["size", "raw tcp polling us", "FastServe polling us", "vs raw",
                          "vs raw polling"],
                         [(h["size"], f"{h['raw_polling_rtt_us']:.0f}",
                           f"{h['fastserve_polling_rtt_us']:.0f}",
                           f"{h['polling_vs_raw']:.2f}x", f"{h['polling_vs_raw_polling']:.2f}x")
                          for h in polled], "lrrrr"))
    click.echo(f"{out['graph']}, batch {batch}, seq {seq}, {out['stages']} stages: ready in "
               f"{out['ready_s']['hosts']:.1f} s on the hosts, "
               f"{out['ready_s']['one_host']:.1f} s on one host; "
               f"{out['seconds_per_batch']['hosts']:.3f} vs "
               f"{out['seconds_per_batch']['one_host']:.3f} s per batch "
               f"({out['hosts_vs_one_host']:.2f}x of one host's throughput); outputs "
               f"{'exact' if out['exact'] else 'DIFFER from one process'}")
