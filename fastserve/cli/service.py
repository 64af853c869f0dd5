"""``fastserve serve``, ``status`` and ``stop``: a deployment kept serving behind HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import replace

import click

from fastserve.cli.app import bench, cli
from fastserve.cli.graph import dim_option, load_graph, parse_dims, trust_option
from fastserve.cli.render import table
from fastserve.errors import ServiceError
from fastserve.limits import MAX_THREADS

DEFAULT_URL = "http://127.0.0.1:8000"


@cli.command("serve")
@click.argument("spec", required=False, type=click.Path(exists=True))
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Service config YAML (see fastserve.service.config); the options below "
              "override its settings.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False),
              help="Run this plan ('fastserve plan SPEC --json > plan.json'): each of its "
              "replicas is a replica of the service, on the plan's hosts and threads.")
@click.option("--hosts", type=click.Path(dir_okay=False),
              help="Host inventory YAML the ranks are placed on (default: this machine).")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False),
              help="The cluster's key directory, when hosts start ranks through agents.")
@click.option("--listen", help="HOST:PORT to serve HTTP on [default: 127.0.0.1:8000]; port 0 "
              "lets the kernel pick one.")
@click.option("--replicas", type=click.IntRange(1), help="Replicas (the static policy's count, "
              "or the dynamic and hybrid policies' minimum).")
@click.option("--max-replicas", type=click.IntRange(1), help="The most replicas a dynamic or "
              "hybrid policy may run.")
@click.option("--policy", type=click.Choice(["static", "dynamic", "hybrid"]),
              help="How replicas follow the load [default: static].")
@click.option("--widen", is_flag=True, default=None, help="Scale a pipeline's bottleneck stage "
              "alone (more ranks for it) where that adds more throughput per rank than a "
              "replica; --replicas and /v1/scale then count replicas' worth of throughput.")
@click.option("--stages", type=click.IntRange(1), help="Pipeline stages per replica.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="Torch threads per rank [default: 1].")
@click.option("--max-batch", type=click.IntRange(1), help="Samples per batch that concurrent "
              "requests are merged into [default: 8].")
@click.option("--max-wait-ms", type=click.FloatRange(0), help="How long a request waits for "
              "others to join its batch while its replica is busy [default: 2].")
@click.option("--max-queue", type=click.IntRange(1), help="Requests admitted and waiting; "
              "beyond it, 503 with Retry-After [default: 256].")
@click.option("--queue-budget-ms", type=click.FloatRange(0), help="Refuse (503) a request "
              "when the requests queued and running are expected to take longer than this "
              "(from the measured cost of a batch: per batch plus per sample); 0: the deadline "
              "[default: 0].")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="The management token (scale, drain, stop); created (mode 0600) if it does "
              "not exist. Without it the management routes are off.")
@click.option("--generate", is_flag=True, help="Serve text generation (POST /v1/completions "
              "and /v1/chat/completions) instead of /v1/infer: SPEC must be a causal LM.")
@click.option("--scheduler", type=click.Choice(["fcfs", "mlfq"]),
              help="Generation: who runs next [default: fcfs].")
@click.option("--max-seqs", type=click.IntRange(1), help="Generation: sequences per "
              "micro-batch [default: 8].")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="Generation: a transformers tokenizer directory [default: UTF-8 bytes].")
@trust_option
def serve_cmd(spec, config_path, plan_path, hosts, keys_dir, listen, replicas, max_replicas,
              policy, widen, stages, threads, max_batch, max_wait_ms, max_queue, queue_budget_ms,
              token_file, generate, scheduler, max_seqs, tokenizer, trust_code) -> None:
    """Deploy SPEC and serve it over HTTP until stopped.

    \b
    Routes: POST /v1/infer (or with --generate POST /v1/completions and
    /v1/chat/completions, streamed as server-sent events with "stream": true), GET /healthz
    /readyz /v1/status /metrics, and with a token POST /v1/scale /v1/drain /v1/stop.

    \b
    Examples:
      fastserve serve graphs/mlp.yaml --replicas 2 --token-file svc.token
      fastserve plan graphs/mlp.yaml --replicas 2 --json > plan.json
      fastserve serve graphs/mlp.yaml --plan plan.json
      curl -s -H 'content-type: application/json' localhost:8000/v1/infer \\
           -d '{"inputs": {"x": [[0.1, ...]]}}'
      fastserve serve --config runtime/services/mlp.yaml
      fastserve serve graphs/gpt2.yaml --generate --stages 2 --scheduler mlfq
      fastserve status; fastserve stop --token-file svc.token
    """
    from fastserve.service import ServiceConfig, load_config
    from fastserve.service.config import parse_listen
    from fastserve.service.http import serve_http
    from fastserve.service.service import Service
    from fastserve.service.token import read_token

    if config_path:
        cfg = load_config(config_path)
        if spec:
            cfg = replace(cfg, spec=spec)
    elif spec:
        cfg = ServiceConfig(spec=spec)
    else:
        raise click.UsageError("give a SPEC to serve, or --config FILE")
    overrides = {"listen": listen, "stages": stages, "threads": threads,
                 "token_file": token_file, "plan": plan_path, "hosts": hosts, "keys": keys_dir}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None},
                  trust_code=cfg.trust_code or trust_code)
    rep = {"min": replicas, "max": max_replicas, "policy": policy, "widen": widen}
    rep = {k: v for k, v in rep.items() if v is not None}
    if replicas is not None and cfg.plan and rep.get("policy", cfg.replicas.policy) == "static":
        raise click.UsageError("--replicas with a plan and the static policy: the plan fixes "
                               "the replicas (make it with 'fastserve plan SPEC --replicas N "
                               "--json'), or use --policy dynamic or hybrid")
    if rep:
        merged = replace(cfg.replicas, **rep)
        if merged.max < merged.min:
            merged = replace(merged, max=merged.min) if "max" not in rep else merged
        cfg = replace(cfg, replicas=merged)
    batch = {"max_batch": max_batch, "max_wait_ms": max_wait_ms}
    cfg = replace(cfg, batching=replace(cfg.batching, **{k: v for k, v in batch.items()
                                                          if v is not None}))
    limits = {"max_queue": max_queue, "queue_budget_ms": queue_budget_ms}
    cfg = replace(cfg, limits=replace(cfg.limits, **{k: v for k, v in limits.items()
                                                      if v is not None}))
    gen = {"enabled": True if generate else None, "scheduler": scheduler, "max_seqs": max_seqs,
           "tokenizer": tokenizer}
    cfg = replace(cfg, generation=replace(cfg.generation, **{k: v for k, v in gen.items()
                                                              if v is not None}))
    host, port = parse_listen(cfg.listen)
    token = read_token(cfg.token_file, create=True) if cfg.token_file else None

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    if host in ("0.0.0.0", "::"):  # allowed (behind a proxy), but said
        say(f"note: listening on every interface ({cfg.listen}): whoever reaches this host "
            f"can send requests" + ("" if token else "; management is off (no --token-file)"))
    service = Service(cfg, progress=say)
    r = cfg.replicas
    count = f"{service.plan.replicas} replica(s), from the plan" if cfg.plan and \
        r.policy == "static" else f"{r.min}" + (f"..{r.max}" if r.policy != "static" else "") \
        + " replica(s)"
    what = "generating with" if cfg.generation.enabled else "serving"
    say(f"{what} graph '{service.graph.name}': {service.plan.stages} stage(s) per replica, "
        f"{r.policy} policy ({count})")
    try:
        service.start()
        serve_http(service, host, port, token, ready=lambda url: say(
            f"ready at {url} (management {'needs the token in ' + cfg.token_file if token else 'is off: no --token-file'})"))
    finally:
        service.stop(drain=True, timeout=10)
    say(f"stopped; requests: {dict(service.outcomes)}")


def _call(url: str, path: str, token: str | None = None, body: dict | None = None,
          timeout: float = 10.0) -> dict:
    """One JSON call to a running service; its error, or no answer within ``timeout``
    seconds, as a ServiceError."""
    if not url.startswith(("http://", "https://")):
        raise click.UsageError(f"--url {url!r}: expected http://HOST:PORT")
    data = json.dumps(body).encode() if body is not None else None
    try:
        req = urllib.request.Request(url.rstrip("/") + path, data=data,
                                     method="POST" if data is not None else "GET")
    except ValueError as e:
        raise click.UsageError(f"--url {url!r}: {e}") from None
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read(1 << 24))
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read(1 << 16)).get("error", e.reason)
        except ValueError:
            reason = e.reason
        raise ServiceError(f"{url}{path}: {e.code} {reason}", e.code) from None
    except (urllib.error.URLError, OSError) as e:  # (a timeout is an OSError)
        why = getattr(e, "reason", e)
        raise ServiceError(f"no service answers at {url} ({why or 'timed out'})") from None
    except ValueError:
        raise ServiceError(f"{url}{path} did not answer JSON: is that a FastServe "
                           f"service?") from None


@cli.command("status")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The service.")
@click.option("--wait", "wait_s", type=click.FloatRange(0), default=0,
              help="Wait up to this many seconds for the service to answer and be ready.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=5.0,
              show_default=True, help="Seconds to wait for each answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(url, wait_s, timeout, as_json) -> None:
    """Show a running service: readiness, replicas and their ranks, queue, requests."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            st = _call(url, "/v1/status", timeout=timeout)
            if st.get("ready") or time.monotonic() >= deadline:
                break
        except ServiceError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.2)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"graph {st['graph']}: {'ready' if st['ready'] else 'NOT READY'}, "
               f"{st['plan']['stages']} stage(s) per replica, {st['policy']} policy, "
               f"queue {st['queue']}, restarts {st['restarts']}")
    click.echo(f"requests: {', '.join(f'{k} {v}' for k, v in sorted(st['requests'].items())) or 'none'}")
    if st.get("widen"):
        click.echo(f"widening stages: ranks per stage {st['widths']}")
    click.echo(table(["replica", "state", "held", "restarts", "ranks per stage", "hosts",
                      "ranks"],
                     [[r["index"], r["state"], r["held"], r["restarts"],
                       "/".join(map(str, r["widths"])), ", ".join(r["hosts"]),
                       ", ".join(k["name"] for k in r["ranks"])]
                      for r in st["replicas"]], "lllrlll"))


@cli.command("stop")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The service.")
@click.option("--token-file", required=True, type=click.Path(dir_okay=False),
              help="The token file the service was started with.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=60.0,
              show_default=True, help="Seconds to wait for the drain to end.")
def stop_cmd(url, token_file, timeout) -> None:
    """Stop a running service gracefully: it admits nothing more, answers what it admitted,
    then stops its ranks and exits."""
    from fastserve.service.token import read_token

    done = _call(url, "/v1/stop", read_token(token_file), body={}, timeout=timeout)
    click.echo(f"stopped; requests: {done.get('requests')}")


@bench.command("serve")
@click.argument("spec", type=click.Path(exists=True), default="graphs/mlp.yaml")
@click.option("--clients", type=click.IntRange(1), default=32, show_default=True,
              help="Concurrent clients of the closed loop.")
@click.option("--requests", type=click.IntRange(3), default=300, show_default=True,
              help="Requests one at a time, through the engine alone and over HTTP each.")
@click.option("--seconds", type=click.FloatRange(1), default=20, show_default=True,
              help="Time for the closed and the open loop together.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="The service's dynamic batching bound.")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="The service's admission bound (what the overload phase meets).")
@click.option("--queue-budget-ms", type=click.FloatRange(0), help="The overload phase's "
              "queue budget (see 'fastserve serve --help') [default: the open loop's p50].")
@click.option("--format", "body_format", type=click.Choice(["json", "msgpack"]),
              default="json", show_default=True,
              help="Request and answer bodies: JSON lists, or msgpack with raw tensor bytes "
              "(what large outputs such as a language model's logits need).")
@dim_option
@click.option("--json", "as_json", is_flag=True)
@trust_option
def bench_serve_cmd(spec, clients, requests, seconds, max_batch, max_queue, queue_budget_ms,
                    body_format, dims, as_json, trust_code) -> None:
    """The service against the engine alone: the HTTP front's overhead one request at a time,
    and closed- and open-loop load (batch-1 requests, every answer checked).

    \b
    Examples:
      fastserve bench serve graphs/mlp.yaml                     # the front's overhead
      fastserve bench serve graphs/gpt2.yaml --format msgpack   # what dynamic batching gains
      fastserve bench serve graphs/gpt2.yaml --format msgpack --dim seq=4   # short requests

    --dim sets the requests' shape (the spec's dims by default); the service serves any.
    """
    from fastserve.bench.serve import bench_serve

    load_graph(spec, dims, trust_code)  # a bad spec or --dim is told before a service starts
    out = bench_serve(spec, clients, requests, seconds, max_batch, max_queue, trust_code,
                      body_format, queue_budget_ms, parse_dims(dims),
                      progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    one = out["one_at_a_time"]
    click.echo(table(["one request at a time", "n", "p50 ms", "p99 ms"],
                     [[k, one[k]["n"], f"{one[k]['p50_ms']:.3f}", f"{one[k]['p99_ms']:.3f}"]
                      for k in ("engine", "http")], "lrrr"))
    click.echo(f"HTTP front overhead: {one['overhead_p50_ms']:+.3f} ms at p50, "
               f"{one['overhead_p99_ms']:+.3f} ms at p99")
    c = out["closed_loop"]
    click.echo(f"closed loop, {c['clients']} clients: {c['requests_per_s']:.1f} requests/s "
               f"= {c['speedup_over_one_client']:.2f}x one client's "
               f"{c['one_client_requests_per_s']:.1f}/s; p50 {c['p50_ms']:.1f} ms, p99 "
               f"{c['p99_ms']:.1f} ms, {c['failed']} failed")
    click.echo(f"the model alone (1 thread) runs a batch of {min(c['clients'], out['max_batch'])} "
               f"{c['model_batching_gain']:.2f}x faster than as many batch-1 calls: the most "
               f"batching can gain here")
    for name, o in (("open loop", out["open_loop"]), ("overload", out["overload"])):
        click.echo(f"{name}, Poisson {o['rate_per_s']:.1f}/s: {o['sent']} sent, "
                   f"{o['sent'] - o['refused'] - o['failed']} answered (p50 "
                   f"{_ms(o['p50_ms'])}, p99 {_ms(o['p99_ms'])}), {o['refused']} refused 503 "
                   f"(p99 {_ms(o['refused_p99_ms'])}), {o['failed']} failed otherwise")
    ratio = out["overload"]["admitted_p99_over_unloaded_p99"]
    if ratio is not None:
        click.echo(f"admitted p99 under 2x overload (queue budget "
                   f"{out['overload']['queue_budget_ms']:.1f} ms) / open-loop p99: {ratio:.2f}x")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


@bench.command("widen")
@click.argument("spec", default="graphs/gpt2.yaml", type=click.Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(1), default=16, show_default=True)
@click.option("--seq", type=click.IntRange(1), default=32, show_default=True)
@click.option("--first", type=click.IntRange(1), help="Nodes in the first stage [default: a "
              "quarter of the graph's].")
@click.option("--micro-batches", type=click.IntRange(1), default=8, show_default=True)
@click.option("--stream", type=click.IntRange(1), default=2, show_default=True,
              help="Batches sent back to back per timed run.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Interleaved rounds; the median is kept.")
@click.option("--json", "as_json", is_flag=True)
@trust_option
def bench_widen_cmd(spec, batch, seq, first, micro_batches, stream, rounds, as_json,
                    trust_code) -> None:
    """A 2-stage pipeline with a slow stage (its first stage holds only --first nodes), scaled
    by widening the slow stage (3 ranks) against a second replica (4 ranks), interleaved.

    What `serve --widen` chooses between: samples/s, samples/s per rank, and the weight bytes
    the ranks hold, each checked against one process first.
    """
    from fastserve.bench.widen import bench_widen

    out = bench_widen(spec, batch=batch, seq=seq, first=first, micro_batches=micro_batches,
                      stream=stream, rounds=rounds, trust_code=trust_code,
                      progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    predicted = ", ".join(f"{s:.3g}" for s in out["predicted_stage_seconds"])
    click.echo(f"{out['graph']}, batch {batch}, seq {seq}, {micro_batches} micro-batches; first "
               f"stage {out['first_stage_nodes']} nodes; predicted seconds per micro-batch "
               f"by stage: {predicted}; widen_choice: stage {out['widen_choice']}")
    click.echo(table(["layout", "ranks", "samples/s", "per rank", "weights MiB"],
                     [(k, v["ranks"], f"{v['samples_per_s']:.2f}",
                       f"{v['samples_per_s_per_rank']:.2f}", f"{v['weight_bytes'] / 2**20:.0f}")
                      for k, v in out["layouts"].items()], "lrrrr"))
    for k, v in out["ratios"].items():
        click.echo(f"{k}: {v:.2f}x")
