"""RankCore: what a rank does with a message, without sockets (STYLE.md habit 4).

A core holds one shard module. ``handle(message)`` runs the shard on a data message and returns
the message to send downstream: the shard's outputs, or an error naming this rank, its stage and
the node that raised. Error messages from upstream pass through unchanged, so a failure anywhere
in a pipeline reaches the coordinator in order with the other results. ``command(message)``
answers the coordinator's control commands (health, stats, stop; a second "load" is refused).

Whatever the core returns is encodable: an error's text is cut to the wire's bound, and a message
that has already passed :data:`~fastserve.engine.wire.MAX_TIMINGS` stages is answered with an
error instead of growing past what the next peer accepts.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from fastserve.engine.wire import COMMANDS, MAX_TEXT, MAX_TIMINGS, Message
from fastserve.graph.decode import KVCache, Sampling, Segment, Step
from fastserve.graph.decode import sample as sample_tokens
from fastserve.graph.module import SubgraphModule


@dataclass
class RankStats:
    """Counters a rank reports on the control socket."""

    processed: int = 0
    errors: int = 0
    malformed: Counter = field(default_factory=Counter)  # rejected messages by reason
    refused: int = 0  # peers refused by authentication
    compute_s: float = 0.0

    def to_json(self) -> dict:
        return {"processed": self.processed, "errors": self.errors,
                "malformed": dict(self.malformed), "refused": self.refused,
                "compute_s": self.compute_s}


@dataclass
class RankCore:
    """One rank's logic: run ``shard`` on data messages, answer control commands."""

    rank: int
    stage: int
    shard: SubgraphModule
    stats: RankStats = field(default_factory=RankStats)
    cache: KVCache = field(default_factory=KVCache)  # generation: this rank's sequences

    def handle(self, msg: Message, received: float | None = None) -> Message:
        """Return the message to send downstream for ``msg`` (received at ``received``)."""
        received = time.time() if received is None else received
        if msg.kind == "error":
            return msg
        if msg.kind != "data":
            return self.error(msg, f"a data socket got a '{msg.kind}' message")
        timings = msg.meta.get("timings", [])
        if len(timings) >= MAX_TIMINGS:
            return self.error(msg, f"the message has passed {len(timings)} stages already; "
                                   f"at most {MAX_TIMINGS}")
        gen = msg.meta.get("gen")
        start = time.time()
        if gen is not None:
            outputs = self._step(msg, gen)
            if isinstance(outputs, Message):
                return outputs
        else:
            missing = [n for n in self.shard.input_names if n not in msg.tensors]
            if missing:
                return self.error(msg, f"message lacks input tensors {missing}")
            try:
                with torch.inference_mode():
                    outputs = self.shard(msg.tensors)
            except Exception as e:  # a node failing must not take the rank down
                return self.error(msg, f"{type(e).__name__}: {e}",
                                  getattr(self.shard, "current_node", None))
        end = time.time()
        self.stats.processed += 1
        self.stats.compute_s += end - start
        timing = {"rank": self.rank, "stage": self.stage, "recv": received, "start": start,
                  "end": end}
        meta = {**msg.meta, "timings": [*timings, timing]}
        if gen is not None and gen.get("logits") in self.shard.output_names:
            del meta["gen"]  # sampled: nothing downstream reads the step (the coordinator has it)
        return Message("data", msg.request, msg.micro, outputs, meta)

    def _step(self, msg: Message, gen: dict) -> dict[str, torch.Tensor] | Message:
        """One generation step (:mod:`fastserve.graph.decode`): drop the caches ``free`` names,
        run the packed sequences through the shard with this rank's cache, and, where the shard
        produces the ``logits`` tensor, sample one token per sequence. A step that fails drops
        its sequences' caches here, whatever refused it (the coordinator may start them again from
        position 0)."""
        self.cache.free(gen.get("free", []))
        segments = [Segment(*s) for s in gen["seqs"]]

        def refuse(text: str, node: str | None = None) -> Message:
            self.cache.free([s.seq for s in segments])
            return self.error(msg, text, node)

        if len({s.seq for s in segments}) != len(segments) or \
                any(s.seq < 0 or s.start < 0 or s.n < 1 for s in segments):
            return refuse("a generation step needs distinct sequences, each with a position "
                          ">= 0 and at least one token")
        sample = gen.get("sample")
        if sample is not None and len(sample) != len(segments):
            return refuse(f"a generation step samples {len(sample)} sequences, it has "
                          f"{len(segments)}")
        samples = [Sampling()] * len(segments)
        try:
            if sample is not None:
                samples = [Sampling(float(t), k, float(p), seed) for t, k, p, seed in sample]
        except ValueError as e:
            return refuse(f"a generation step's sampling: {e}")
        sampler = gen.get("logits") in self.shard.output_names
        if not segments:  # only caches to free: pass it on
            return {"tokens": torch.zeros(0, dtype=torch.int64)} if sampler else {}
        tokens = sum(s.n for s in segments)
        for name in self.shard.input_names:
            t = msg.tensors.get(name)
            if t is None or t.dim() < 2 or tuple(t.shape[:2]) != (1, tokens):
                shape = None if t is None else tuple(t.shape)
                return refuse(f"a generation step of {tokens} tokens needs input '{name}' of "
                              f"shape (1, {tokens}, ...), got {shape}")
        try:
            with torch.inference_mode():
                step = Step(segments, self.cache, last_only=sampler)
                outputs = self.shard.step(msg.tensors, step)
                if sampler:
                    logits = outputs[gen["logits"]][0]
                    if not step.sliced:
                        logits = logits[step.last_rows()]
                    outputs = {"tokens": sample_tokens(
                        logits, samples, [s.start + s.n for s in segments])}
        except Exception as e:  # a node failing (or a full cache) must not take the rank down
            return refuse(f"{type(e).__name__}: {e}", getattr(self.shard, "current_node", None))
        return outputs

    def error(self, msg: Message, text: str, node: str | None = None) -> Message:
        """An error message for ``msg`` naming this rank, its stage and ``node``."""
        self.stats.errors += 1
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT - 3] + "..."
        error = {"rank": self.rank, "stage": self.stage, "node": node, "message": text}
        return Message("error", msg.request, msg.micro, {}, {"error": error})

    def command(self, msg: Message, **state: Any) -> tuple[Message, bool]:
        """The reply to a control message, and whether the rank should stop. ``state`` adds
        what only the process knows (resident memory, whether output is backed up)."""
        cmd = msg.meta.get("cmd")
        if msg.kind != "control" or cmd not in COMMANDS:
            self.stats.malformed["command"] += 1
            return Message("reply", meta={"cmd": "health", "rank": self.rank, "ok": False}), \
                False
        reply: dict[str, Any] = {"cmd": cmd, "rank": self.rank, "ok": cmd != "load"}
        if cmd == "health":  # alive; busy when its output waits for a slow or absent reader
            reply["busy"] = bool(state.get("pending"))
        elif cmd == "stats":
            reply.update(self.stats.to_json(), kv_bytes=self.cache.bytes,
                         sequences=len(self.cache), **state)
        return Message("reply", meta=reply), cmd == "stop"
