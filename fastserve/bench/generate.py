"""Generation measured side by side in one run.

* **decode throughput**: ``seqs`` sequences decoding together, in one process with one thread
  (the whole graph, one batch per step) against a ``stages``-stage pipeline of 1-thread ranks
  (``stages`` micro-batches of ``seqs / stages`` sequences in flight, cut where the stages'
  measured decode steps take the same time: :mod:`fastserve.generate.profile`), and
  ``stages`` plain processes side by side, each decoding a micro-batch's sequences with the
  whole model and talking to nobody (:mod:`fastserve.bench.plaindecode`): the pipeline's
  ceiling on this machine, contention included; rounds interleaved;
* **the runtime's cost per decode step**: one sequence on the pipeline, one step in flight: the
  step's round trip less the ranks' compute, per stage;
* **schedulers**: one synthetic workload (Poisson arrivals, heavy-tailed output lengths, bounded
  in count and time) on the pipeline under FCFS and under skip-join MLFQ, alternated: time to
  first token, inter-token latency, job completion time, tokens/s.

As on a real server, a job's length is not known when it arrives: each request carries the
bound a client sets (``max_tokens``, the workload's longest output) and ends at its own length
as it would at an end-of-sequence token (the driver stops it there, which the schedulers do not
see). So FCFS, which reserves KV for a job's whole bound (Orca), admits by the bound, and MLFQ,
which grows caches as tokens come, by what is used. The KV budget is that of
:data:`KV_REQUESTS` maximum-length jobs: a serving accelerator's memory holds far fewer
maximum-length sequences than it has batch slots. ``known_lengths`` gives every request its
own length as its bound (an FCFS that knew the future), to show what the reservation costs.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch

from fastserve.bench.workers import Workers
from fastserve.engine.coordinator import RunStats
from fastserve.engine.deployment import Deployment
from fastserve.engine.wire import MAX_TIMINGS
from fastserve.generate import (FCFS, MLFQ, DeploymentPipeline, Generator, LocalPipeline,
                                Request, max_positions)
from fastserve.generate.model import language_model
from fastserve.generate.profile import decode_profile
from fastserve.resources.inventory import local_inventory
from fastserve.resources.planner import Constraints, plan

Progress = Callable[[str], None]


KV_REQUESTS = 4  # the scheduler workload's KV budget, in maximum-length jobs


@dataclass(frozen=True)
class Job:
    arrival: float  # seconds after the start
    prompt: list[int]
    length: int  # output tokens it ends after (unknown to the schedulers)
    max_tokens: int  # the bound its request carries


def workload(n: int, rate: float, vocab: int, seed: int = 0, longest: int = 4096,
             prompt: tuple[int, int] = (4, 32), output_min: int = 4, output_max: int = 256,
             alpha: float = 1.2, known_lengths: bool = False) -> list[Job]:
    """``n`` jobs arriving as a Poisson process of ``rate`` per second; prompt lengths uniform
    in ``prompt``; output lengths Pareto(``alpha``) from ``output_min``, capped at
    ``output_max`` (a few long jobs hold most of the work, as in chat traces), and so that no
    job is longer than ``longest`` positions. Each request's bound is ``output_max`` (its own
    length with ``known_lengths``)."""
    rng = random.Random(seed)
    prompt = (min(prompt[0], longest // 4), min(prompt[1], longest // 4))
    output_max = min(output_max, longest - prompt[1])
    t, jobs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        size = rng.randint(*prompt)
        out = min(output_max, int(output_min * (1 - rng.random()) ** (-1 / alpha)))
        jobs.append(Job(t, [rng.randrange(1, vocab) for _ in range(size)], out,
                        out if known_lengths else output_max))
    return jobs


def workload_kv_tokens(jobs: list[Job]) -> int:
    """KV positions for :data:`KV_REQUESTS` of the longest requests ``jobs`` may make."""
    return KV_REQUESTS * max(len(j.prompt) + j.max_tokens for j in jobs)


def _pct(values: list[float], q: float) -> float | None:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else None


def decode_span(gen: Generator, seqs: int, tokens: int, vocab: int
                ) -> tuple[int, float, float]:
    """``seqs`` sequences decoding together: the tokens after every prefill, and the wall
    clock when the last prefill's token came and when the last token came."""
    rng = random.Random(1)
    reqs = [Request([rng.randrange(1, vocab) for _ in range(16)], tokens) for _ in range(seqs)]
    ids = [gen.submit(r) for r in reqs]
    first, count, end = None, 0, 0.0
    while gen.active:
        for ev in gen.poll():
            if ev.seq in ids and ev.token is not None:
                count += 1
                if first is None and count == seqs:  # every prefill done
                    first, count = time.time(), 0
                end = time.time()
    gen.drain()
    return count, first or end, end


def decode_rate(gen: Generator, seqs: int, tokens: int, vocab: int) -> float:
    """Tokens/s of ``seqs`` sequences decoding together, from their first token to the end."""
    count, first, end = decode_span(gen, seqs, tokens, vocab)
    return count / (end - first) if end > first else 0.0


class DecodeSideBySide(Workers):
    """``n`` plain 1-thread processes, each decoding ``seqs`` sequences with the whole model,
    started together and talking to nobody: what ``n`` processes decode on this machine when
    they share it, the ceiling of an ``n``-stage pipeline whose micro-batches hold ``seqs``
    sequences; see :mod:`fastserve.bench.plaindecode`."""

    what = "plain decoding process"

    def __init__(self, spec: str, n: int, seqs: int, tokens: int, trust_code: bool) -> None:
        super().__init__()
        try:
            for _ in range(n):
                self._start("fastserve.bench.plaindecode", {
                    "spec": spec, "trust_code": trust_code, "seqs": seqs, "tokens": tokens})
            self._answers()  # each is built
        except BaseException:
            self.close()
            raise

    def run(self) -> float:
        """Their tokens/s together: every decoded token over the span from the first of them
        to have prefilled every sequence to the last to end (they start together)."""
        spans = self._ask({"at": time.time() + 0.05})
        first = min(float(a["first"]) for a in spans)
        end = max(float(a["end"]) for a in spans)
        return sum(int(a["tokens"]) for a in spans) / (end - first) if end > first else 0.0


def _drive(gen: Generator, jobs: list[Job], seconds: float) -> dict:
    """Run ``jobs`` at their arrival times for at most ``seconds``, each ended at its own
    length (as an end-of-sequence token would end it); per-job timings."""
    start = time.perf_counter()
    pending = list(jobs)
    rec: dict[int, dict] = {}
    while (pending or gen.active) and time.perf_counter() - start < seconds:
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            job = pending.pop(0)
            sid = gen.submit(Request(job.prompt, job.max_tokens))
            rec[sid] = {"arrival": start + job.arrival, "times": [], "end": None,
                        "length": job.length}
        if not gen.active and pending:
            time.sleep(min(0.05, max(0.0, pending[0].arrival - now)))
            continue
        for ev in gen.poll(wait_ms=5):
            t = time.perf_counter()
            r = rec.get(ev.seq)
            if r is None or r["end"] is not None:
                continue
            if ev.token is not None:
                r["times"].append(t)
            if len(r["times"]) == r["length"]:
                r["end"] = t
                gen.cancel(ev.seq)  # its own end: no-op when its bound ended it
            elif ev.done:
                r["end"] = t
    gen.drain(cancel=True)  # out of time: the rest is cancelled, and counted as unfinished
    done = [r for r in rec.values() if r["end"] is not None]
    ttft = [r["times"][0] - r["arrival"] for r in done if r["times"]]
    itl = [b - a for r in done for a, b in zip(r["times"], r["times"][1:])]
    jct = [r["end"] - r["arrival"] for r in done]
    tokens = sum(len(r["times"]) for r in done)
    span = max((r["end"] for r in done), default=start) - start
    return {"finished": len(done), "unfinished": len(jobs) - len(done), "tokens": tokens,
            "ttft_p50_ms": _ms(_pct(ttft, 0.5)), "ttft_p99_ms": _ms(_pct(ttft, 0.99)),
            "itl_p50_ms": _ms(_pct(itl, 0.5)), "itl_p99_ms": _ms(_pct(itl, 0.99)),
            "jct_mean_s": statistics.fmean(jct) if jct else None,
            "jct_p99_s": _pct(jct, 0.99), "tokens_per_s": tokens / span if span else None}


def _ms(s: float | None) -> float | None:
    return None if s is None else 1e3 * s


def bench_generate(spec: str, stages: int = 2, seqs: int = 8, tokens: int = 32,
                   requests: int = 100, load: float = 1.0, max_seqs: int = 4,
                   seconds: float = 120.0, rounds: int = 2, seed: int = 0,
                   kv_tokens: int | None = None, quantum: float = 4.0,
                   known_lengths: bool = False, trust_code: bool = False,
                   progress: Progress = lambda _m: None) -> dict:
    cleanup = ExitStack()  # a captured LM's rewrite, kept until the ranks stop
    graph, cut, export_dir = language_model(spec, trust_code, cleanup)
    if cut is not None:
        stages = len(cut)  # an export's shards are the stages
    vocab = graph.spec.inputs[0].high or 256
    longest = max_positions(graph) or 4096
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    per_stage = math.ceil(seqs / stages)
    out: dict = {"spec": spec, "stages": stages, "seqs": seqs, "tokens": tokens}
    try:
        local = LocalPipeline(graph)
        # the pipeline is cut where its stages' decode steps take the same time (an export's
        # shards are its cut; a graph of more nodes than a profile times is cut by FLOPs)
        measured = decode_profile(graph, rows=per_stage, progress=progress) \
            if cut is None and len(graph) < MAX_TIMINGS else None
        chosen = plan(graph, local_inventory(), constraints=Constraints(
            replicas=1, stages=stages, cut=cut, threads=1, batch=per_stage, transport="ipc"),
            profile=measured)
        # what `fastserve generate` runs without --stages: the planner's decode layout
        planned = plan(graph, local_inventory(), "decode", Constraints(
            replicas=1, stages=len(cut) if cut else None, cut=cut, batch=seqs,
            transport="ipc"))
        layout = f"{planned.stages} stage(s), {planned.ranks[0].threads} thread(s) per rank"
        progress(f"starting a {stages}-stage pipeline (1 thread per rank) and the decode "
                 f"plan ({layout})")
        progress(f"starting {stages} plain processes to decode side by side")
        side = DecodeSideBySide(spec, stages, per_stage, tokens, trust_code)
        cleanup.callback(side.close)
        with Deployment(graph, chosen, timeout=60, trust_code=trust_code,
                        export_dir=export_dir) as dep:
            one, piped, best, micro, sides = [], [], [], [], []
            with Deployment(graph, planned, timeout=60, trust_code=trust_code,
                            export_dir=export_dir) as decode_dep:
                for r in range(rounds):
                    progress(f"round {r + 1}/{rounds}: {seqs} sequences x {tokens} tokens, one "
                             f"process, the pipeline, the decode plan, {stages} plain "
                             f"processes")
                    one.append(decode_rate(Generator(local, max_seqs=seqs), seqs, tokens,
                                           vocab))
                    # the pipeline's micro-batch in one process: each stage runs 1/P of the
                    # model over this many rows, P of them in turn per step, so P times this
                    # rate bounds the pipeline (when the stages split the time evenly)
                    micro.append(decode_rate(Generator(local, max_seqs=per_stage), per_stage,
                                             tokens, vocab))
                    piped.append(decode_rate(Generator(DeploymentPipeline(dep),
                                                       max_seqs=per_stage), seqs, tokens, vocab))
                    best.append(decode_rate(
                        Generator(DeploymentPipeline(decode_dep),
                                  max_seqs=math.ceil(seqs / planned.stages)),
                        seqs, tokens, vocab))
                    sides.append(side.run())
            alone, pipe, plan_rate, part, plain = (statistics.median(x)
                                                   for x in (one, piped, best, micro, sides))
            out["decode"] = {"one_process_tokens_per_s": alone, "pipeline_tokens_per_s": pipe,
                             "ratio": pipe / alone,
                             "one_process_micro_batch_tokens_per_s": part,
                             # P micro-batches of per_stage sequences hold seqs of them
                             "pipeline_ceiling": part * seqs / per_stage / alone,
                             # the same with the contention P processes meet side by side
                             "plain_side_by_side_tokens_per_s": plain,
                             "plain_ceiling": plain / alone,
                             "ratio_of_plain": pipe / plain,
                             "cut": [[sp.nodes[0], sp.nodes[-1]] for sp in chosen.stage_plans],
                             "cut_by": "the export's shards" if cut else "FLOPs"
                             if measured is None else
                             f"measured decode steps of {per_stage} sequences",
                             "decode_plan": layout,
                             "decode_plan_tokens_per_s": plan_rate,
                             "decode_plan_ratio": plan_rate / alone}
            progress("the runtime's cost per decode step: one sequence, one step in flight")
            dep.stats = RunStats()
            gen = Generator(DeploymentPipeline(dep))
            gen.run([Request([1, 2, 3, 4], min(64, longest - 4))])
            rounds_s = [s for p, n, s in gen.steps if p == 0]
            compute = sum(statistics.median(st.compute) for st in dep.stats.stages.values())
            step = statistics.median(rounds_s)
            out["step"] = {"round_ms": 1e3 * step, "compute_ms": 1e3 * compute,
                           "runtime_ms_per_stage": 1e3 * (step - compute) / stages}
            # the workload's rate: `load` times what the pipeline decodes with the workload's
            # sequences per micro-batch (a step costs nearly the same for 1 or 8 rows, so
            # the capacity is not proportional to them: it is measured), in jobs per second
            capacity = out["decode"]["pipeline_tokens_per_s"]
            if max_seqs * stages != seqs:
                progress(f"the workload's capacity: {max_seqs * stages} sequences, {max_seqs} "
                         f"per micro-batch")
                capacity = decode_rate(Generator(DeploymentPipeline(dep), max_seqs=max_seqs),
                                        max_seqs * stages, tokens, vocab)
            mean_out = statistics.fmean(j.length for j in workload(2000, 1.0, vocab, seed,
                                                                    longest))
            rate = load * capacity / mean_out
            jobs = workload(requests, rate, vocab, seed, longest, known_lengths=known_lengths)
            # of the bounded requests whether lengths are known or not (the same memory for
            # both), and never more than the ranks hold
            bounded = jobs if not known_lengths else workload(requests, rate, vocab, seed,
                                                              longest)
            kv = min(kv_tokens or workload_kv_tokens(bounded), DeploymentPipeline(dep).kv_tokens)
            out["workload"] = {"requests": requests, "rate_per_s": rate, "load": load,
                               "capacity_tokens_per_s": capacity,
                               "output_tokens": sum(j.length for j in jobs),
                               "bound": max(j.max_tokens for j in jobs),
                               "known_lengths": known_lengths, "max_seqs": max_seqs,
                               "kv_tokens": kv, "quantum_steps": quantum}
            results: dict[str, list[dict]] = {"fcfs": [], "mlfq": []}
            for r in range(rounds):
                for name, sched in (("fcfs", FCFS()), ("mlfq", MLFQ(quantum=quantum))):
                    progress(f"round {r + 1}/{rounds}: {requests} requests under {name}")
                    gen = Generator(DeploymentPipeline(dep), sched, max_seqs=max_seqs,
                                    kv_tokens=kv)
                    results[name].append(_drive(gen, jobs, seconds))
            out["schedulers"] = {k: _median_of(v) for k, v in results.items()}
            f, m = out["schedulers"]["fcfs"], out["schedulers"]["mlfq"]
            out["jct_mean_fcfs_over_mlfq"] = f["jct_mean_s"] / m["jct_mean_s"] \
                if f["jct_mean_s"] and m["jct_mean_s"] else None
    finally:
        torch.set_num_threads(before)
        cleanup.close()
    return out


def _median_of(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: statistics.median([r[k] for r in runs if r[k] is not None])
            if any(r[k] is not None for r in runs) else None for k in keys}
