"""``fastserve generate``: text from a language-model graph, on rank processes or in this one."""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack

import click

from fastserve.cli.app import bench, cli
from fastserve.cli.engine import cluster_options, load_cluster, spin_option
from fastserve.cli.graph import load_profile, trust_option
from fastserve.errors import EngineError, FastServeError
from fastserve.limits import MAX_THREADS


@cli.command("generate")
@click.argument("spec")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Text to continue. Repeat for several prompts, generated together.")
@click.option("--ids", "id_prompts", multiple=True, metavar="I,J,...",
              help="A prompt given as comma-separated token ids (repeatable).")
@click.option("--max-tokens", type=click.IntRange(1), default=16, show_default=True,
              help="New tokens per prompt at most.")
@click.option("--stream", is_flag=True, help="Print the text as tokens come (one prompt).")
@click.option("--stages", type=click.IntRange(1),
              help="Pipeline stages: each rank holds the KV cache of its layers. Default: "
              "the fewest that hold the model (a decode step reads every weight once, so "
              "more stages add a hop per token, not speed).")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True,
              help="Data-parallel replicas; each prompt runs on one.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False, exists=True),
              help="Node times from 'fastserve profile SPEC --decode ROWS': the stages are "
              "cut where their decode steps take the same time. Default: by FLOPs, which "
              "undercount an LM head.")
@click.option("--scheduler", type=click.Choice(["fcfs", "mlfq"]), default="fcfs",
              show_default=True, help="Who runs next: first come first served, or skip-join "
              "MLFQ (preempts long generations for short ones).")
@click.option("--max-seqs", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences per micro-batch (one micro-batch per stage is in flight).")
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True,
              help="0: greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True,
              help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="Sample within the smallest set holding this mass.")
@click.option("--seed", type=click.IntRange(0, (1 << 63) - 1), default=0, show_default=True)
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help="End a prompt's text where this appears (repeatable).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="A transformers tokenizer directory (save_pretrained). Default: UTF-8 "
              "bytes, one token per byte.")
@click.option("--local", is_flag=True, help="Run the stages in this process, without ranks.")
@click.option("--check", is_flag=True, help="Generate again in this process and fail unless "
              "the tokens are the same.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="Torch threads per rank.")
@click.option("--timeout", type=click.FloatRange(0, 86400, min_open=True), default=60.0,
              show_default=True,
              help="Seconds without a result before a rank counts as hung.")
@click.option("--json", "as_json", is_flag=True, help="Print texts, tokens and timings as JSON.")
@spin_option
@cluster_options
@trust_option
def generate_cmd(spec, prompts, id_prompts, max_tokens, stream, stages, replicas, profile_path,
                 scheduler, max_seqs, temperature, top_k, top_p, seed, stops, tokenizer, local,
                 check, threads, timeout, as_json, spin_us, hosts, keys_dir, coordinator_address,
                 ray_address, trust_code) -> None:
    """Generate text with the language model of SPEC, a KV cache per stage.

    \b
    The graph must be a causal LM written with the op library (token ids in, logits out),
    such as graphs/gpt2.yaml, or a GPT-2 or Llama captured from transformers (source:, such
    as graphs/gpt2-hf-tiny.yaml), which is rewritten with the op library's layers and the
    same weights. Each prompt is prefilled once; each step then sends only the
    new token's activations between stages, and the last stage samples, so only token ids
    come back.

    \b
    Examples:
      fastserve generate graphs/gpt2.yaml --prompt "Hello" --max-tokens 8
      fastserve generate graphs/gpt2.yaml --prompt "Hi" --stages 2 --stream
      fastserve generate graphs/gpt2.yaml --ids 1,2,3 --ids 4,5 --replicas 2 --check --json
      fastserve generate graphs/gpt2.yaml --prompt "Hi" --stages 3 \\
          --hosts runtime/hosts/loopback3.yaml --keys keys/
    """
    from fastserve.engine import Deployment
    from fastserve.generate import (DeploymentPipeline, Generator, LocalPipeline, Request,
                                    Sampling, kv_budget, scheduler as make_scheduler)
    from fastserve.generate.model import language_model
    from fastserve.generate.text import TextStream, load_tokenizer
    from fastserve.graph.decode import max_positions
    from fastserve.resources.planner import Constraints, plan

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    if not prompts and not id_prompts:
        raise click.UsageError("give a prompt: --prompt TEXT or --ids I,J,...")
    if stream and len(prompts) + len(id_prompts) > 1:
        raise click.UsageError("--stream prints one prompt's text as it comes: give one prompt")
    if local and hosts:
        raise click.UsageError("--local generates in this process: drop --hosts")
    inventory, keys, transport = load_cluster(hosts, keys_dir, None)
    tok = load_tokenizer(tokenizer)
    inputs = [tok.encode(p) for p in prompts] + [_ids(text) for text in id_prompts]
    # a captured model's rewrite lives in a temporary directory until the command ends
    cleanup = click.get_current_context().with_resource(ExitStack())
    graph, cut, export_dir = language_model(spec, trust_code, cleanup, say)
    # room for the caches of one micro-batch of the longest requests at their full length (the
    # scheduler admits more as room allows; a request longer than the model takes is refused
    # by name when it is submitted, so it counts here at the model's length)
    longest = max_positions(graph) or 1 << 62
    lengths = sorted((min(longest, len(ids) + max_tokens) for ids in inputs), reverse=True)
    measured = load_profile(profile_path, decode=True)
    if measured is not None and set(measured.node_seconds) != set(graph.order):
        raise click.UsageError(f"profile '{profile_path}' times other nodes than the graph "
                               f"'{graph.name}' generates with: profile this spec")
    chosen = plan(graph, inventory, "decode", constraints=Constraints(
        replicas=replicas, stages=len(cut) if cut else stages, cut=cut, threads=threads,
        batch=max_seqs, transport=transport, kv_positions=sum(lengths[:max_seqs])),
        profile=measured)
    # a rank without room for KV is named before any rank starts
    kv_budget(chosen, inventory if hosts else None)
    eos = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    try:
        sampling = Sampling(temperature, top_k, top_p, seed)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    requests = [Request(ids, max_tokens, sampling, eos) for ids in inputs]

    def generator(pipeline):
        return Generator(pipeline, make_scheduler(scheduler), max_seqs=max_seqs,
                         max_len=pipeline.max_len)

    def run(pipeline, echo: bool = stream, main: bool = True) -> list[dict]:
        gen = generator(pipeline)
        if main:  # the run the user asked for, not the check
            per = ", ".join(f"{b / 1024:.0f} KiB" for b in pipeline.kv_per_token)
            say(f"KV cache per position, stage by stage: {per}; {gen.kv_tokens} positions "
                f"fit in each replica's caches")
        try:
            sids = [gen.submit(r) for r in requests]
        except ValueError as e:
            raise FastServeError(f"cannot generate: {e}") from None
        texts = {s: TextStream(tok, stops) for s in sids}
        out = {s: {"tokens": [], "text": "", "first_token_s": None, "end": None,
                  "seconds": None} for s in sids}
        start = time.perf_counter()
        while gen.active:
            for ev in gen.poll():
                o = out.get(ev.seq)
                if o is None:
                    continue
                if ev.error:
                    raise EngineError(f"prompt {sids.index(ev.seq) + 1} failed: {ev.error}")
                if ev.token is not None and not texts[ev.seq].stopped:
                    o["tokens"].append(ev.token)
                    if o["first_token_s"] is None:
                        o["first_token_s"] = time.perf_counter() - start
                    piece = texts[ev.seq].add(ev.token)
                    o["text"] += piece
                    if echo:
                        click.echo(piece, nl=False)
                    if texts[ev.seq].stopped:
                        gen.cancel(ev.seq)
                        o["end"], o["seconds"] = "stop", time.perf_counter() - start
                if ev.done and o["end"] is None:
                    o["seconds"] = time.perf_counter() - start
                    o["end"] = ev.done
                    piece = texts[ev.seq].flush()
                    o["text"] += piece
                    if echo:
                        click.echo(piece, nl=False)
        if echo:
            click.echo()
        gen.drain()  # the caches dropped before the ranks stop
        return [out[s] for s in sids]

    cut_lists = [list(c) for c in chosen.cut]
    if local:
        say(f"generating in this process: {chosen.stages} stage(s) x {chosen.replicas} "
            f"replica(s)")
        results = run(LocalPipeline(graph, cut_lists, chosen.replicas))
    else:
        with Deployment(graph, chosen, timeout=timeout, progress=say, trust_code=trust_code,
                        export_dir=export_dir, inventory=inventory if hosts else None,
                        keys=keys, coordinator_address=coordinator_address,
                        ray_address=ray_address, spin_us=spin_us) as dep:
            say(f"generating on {len(chosen.ranks)} rank(s): {chosen.stages} stage(s) x "
                f"{chosen.replicas} replica(s), scheduler {scheduler}")
            if chosen.stages > 1:
                by = "the export's shards" if cut else "FLOPs" if measured is None else \
                    "measured decode steps" if measured.phase == "decode" else \
                    "measured batch times"
                say(f"stages cut by {by}: " + " | ".join(
                    f"{sp.nodes[0]}..{sp.nodes[-1]}" if len(sp.nodes) > 1 else sp.nodes[0]
                    for sp in chosen.stage_plans))
            results = run(DeploymentPipeline(dep))
    verdict = None
    if check:  # the whole graph as one stage in this process: another cut, the same tokens
        say("generating again in this process, as one stage, to check the tokens")
        expected = run(LocalPipeline(graph), echo=False, main=False)
        for i, (got, want) in enumerate(zip(results, expected)):
            if got["tokens"] != want["tokens"]:
                raise EngineError(f"prompt {i + 1}: tokens {got['tokens']} differ from the "
                                  f"in-process run's {want['tokens']}")
        verdict = "tokens equal the in-process run"
    _report(results, inputs, as_json, stream, verdict)


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"--ids takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise click.UsageError("--ids needs at least one token id")
    return ids


def _report(results, inputs, as_json, stream, verdict) -> None:
    tokens = sum(len(r["tokens"]) for r in results)
    seconds = max((r["seconds"] for r in results), default=0.0)
    if as_json:
        click.echo(json.dumps({"results": [{"prompt_tokens": len(i), **r}
                                           for r, i in zip(results, inputs)],
                               "tokens": tokens, "seconds": seconds,
                               "tokens_per_s": tokens / seconds if seconds else None,
                               "check": verdict}, indent=2))
        return
    if not stream:
        for i, r in enumerate(results):
            prefix = f"[{i + 1}] " if len(results) > 1 else ""
            click.echo(f"{prefix}{r['text']}")
    click.echo(f"{tokens} token(s) in {seconds:.2f} s ({tokens / seconds if seconds else 0:.1f} "
               f"tokens/s); first token after {min(r['first_token_s'] or 0 for r in results) * 1e3:.0f} ms"
               + (f"; {verdict}" if verdict else ""), err=True)


@bench.command("generate")
@click.argument("spec", default="graphs/gpt2.yaml")
@click.option("--stages", type=click.IntRange(2), default=2, show_default=True)
@click.option("--seqs", type=click.IntRange(1), default=8, show_default=True,
              help="Sequences decoding together in the throughput phase.")
@click.option("--tokens", type=click.IntRange(2), default=32, show_default=True,
              help="New tokens per sequence in the throughput phase.")
@click.option("--requests", type=click.IntRange(1), default=100, show_default=True,
              help="Jobs of the scheduler workload.")
@click.option("--load", type=click.FloatRange(0.05, 10), default=1.0, show_default=True,
              help="Arrival rate of output tokens as a multiple of what the pipeline decodes "
              "with --max-seqs sequences per micro-batch (measured).")
@click.option("--max-seqs", type=click.IntRange(1), default=4, show_default=True,
              help="Sequences per micro-batch in the scheduler workload.")
@click.option("--seconds", type=click.FloatRange(1), default=120.0, show_default=True,
              help="Time bound of each scheduler run (what is left is cancelled, counted).")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True,
              help="Interleaved rounds; medians are printed.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True)
@click.option("--kv-tokens", type=click.IntRange(300), default=None,
              help="Positions the caches may hold in the scheduler workload (default: 4 "
              "maximum-length requests, 1,152 for GPT-2). FCFS reserves each request's "
              "prompt and whole bound, MLFQ grows caches and evicts.")
@click.option("--quantum", type=click.FloatRange(0.5), default=4.0, show_default=True,
              help="MLFQ: the top level's quantum, in decode steps (doubling per level).")
@click.option("--known-lengths", is_flag=True,
              help="Give each request its own output length as its bound, as if FCFS knew "
              "the future (default: every request is bounded by the longest output, 256).")
@click.option("--json", "as_json", is_flag=True)
@trust_option
def bench_generate_cmd(spec, stages, seqs, tokens, requests, load, max_seqs, seconds, rounds,
                       seed, kv_tokens, quantum, known_lengths, as_json, trust_code) -> None:
    """Generation: pipeline decode throughput against one 1-thread process (and the layout
    `fastserve generate` plans for decode), the runtime's cost per decode step, and FCFS
    against skip-join MLFQ on one heavy-tailed workload.

    \b
    Targets (issue #14): pipeline >= 1.6x one process with 8 or more sequences; runtime
    <= 1 ms per stage per step above compute; MLFQ mean job completion time >= 2x lower.
    """
    from fastserve.bench.generate import bench_generate

    out = bench_generate(spec, stages, seqs, tokens, requests, load, max_seqs, seconds, rounds,
                         seed, kv_tokens, quantum, known_lengths, trust_code,
                         progress=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    d, s = out["decode"], out["step"]
    click.echo(f"pipeline cut ({d['cut_by']}): "
               + " | ".join(f"{a}..{b}" if a != b else a for a, b in d["cut"]))
    click.echo(f"decode, {seqs} sequences: one 1-thread process {d['one_process_tokens_per_s']:.1f}"
               f" tokens/s, {stages}-stage pipeline {d['pipeline_tokens_per_s']:.1f} tokens/s: "
               f"{d['ratio']:.2f}x")
    click.echo(f"decode, {math.ceil(seqs / stages)} sequences (the pipeline's micro-batch): one "
               f"1-thread process {d['one_process_micro_batch_tokens_per_s']:.1f} tokens/s, so "
               f"the pipeline's ceiling is {stages} x that = {d['pipeline_ceiling']:.2f}x the "
               f"process decoding all {seqs}")
    click.echo(f"decode, {stages} plain processes side by side, {math.ceil(seqs / stages)} "
               f"sequences each: {d['plain_side_by_side_tokens_per_s']:.1f} tokens/s together "
               f"= {d['plain_ceiling']:.2f}x the process decoding all {seqs} (the ceiling with "
               f"their contention); the pipeline reaches {d['ratio_of_plain']:.2f} of it")
    click.echo(f"decode, {seqs} sequences: the decode plan ({d['decode_plan']}) "
               f"{d['decode_plan_tokens_per_s']:.1f} tokens/s: {d['decode_plan_ratio']:.2f}x the "
               f"1-thread process")
    click.echo(f"decode step, one sequence: round {s['round_ms']:.2f} ms, compute "
               f"{s['compute_ms']:.2f} ms: runtime {s['runtime_ms_per_stage']:.2f} ms per stage")
    w = out["workload"]
    click.echo(f"workload: {w['requests']} requests, Poisson {w['rate_per_s']:.2f}/s, "
               f"{w['output_tokens']} output tokens (heavy-tailed; "
               + ("lengths known" if w["known_lengths"] else f"each bounded by {w['bound']}")
               + f"), {w['max_seqs']} sequences per micro-batch, KV budget {w['kv_tokens']} "
               f"positions; load {w['load']:.2f} of a capacity of "
               f"{w['capacity_tokens_per_s']:.1f} tokens/s")
    rows = []
    for name, r in out["schedulers"].items():
        rows.append(f"  {name:5} ttft p50/p99 {_f(r['ttft_p50_ms'])}/{_f(r['ttft_p99_ms'])} ms  "
                    f"itl p50/p99 {_f(r['itl_p50_ms'])}/{_f(r['itl_p99_ms'])} ms  "
                    f"jct mean/p99 {_f(r['jct_mean_s'], 2)}/{_f(r['jct_p99_s'], 2)} s  "
                    f"{_f(r['tokens_per_s'])} tokens/s  unfinished {_f(r['unfinished'], 0)}")
    click.echo("\n".join(rows))
    ratio = out["jct_mean_fcfs_over_mlfq"]
    click.echo(f"mean job completion time, FCFS / MLFQ: {_f(ratio, 2)}x")


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
