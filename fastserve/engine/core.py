"""RankCore: what a rank does with a message, without sockets (STYLE.md habit 4).

A core holds one shard module. ``handle(message)`` runs the shard on a data message and returns
the message to send downstream: the shard's outputs, or an error naming this rank, its stage and
the node that raised. Error messages from upstream pass through unchanged, so a failure anywhere
in a pipeline reaches the coordinator in order with the other results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fastserve.engine.wire import Message
from fastserve.graph.module import SubgraphModule


@dataclass
class RankStats:
    """Counters a rank reports on the control socket."""

    processed: int = 0
    errors: int = 0
    malformed: int = 0
    compute_s: float = 0.0

    def to_json(self) -> dict:
        return {"processed": self.processed, "errors": self.errors, "malformed": self.malformed,
                "compute_s": self.compute_s}


@dataclass
class RankCore:
    """One rank's logic: run ``shard`` on data messages."""

    rank: int
    stage: int
    shard: SubgraphModule
    stats: RankStats = field(default_factory=RankStats)

    def handle(self, msg: Message, received: float | None = None) -> Message:
        """Return the message to send downstream for ``msg`` (received at ``received``)."""
        received = time.time() if received is None else received
        if msg.kind == "error":
            return msg
        if msg.kind != "data":
            return self._error(msg, f"a data socket got a '{msg.kind}' message", None)
        missing = [n for n in self.shard.input_names if n not in msg.tensors]
        if missing:
            return self._error(msg, f"message lacks input tensors {missing}", None)
        start = time.time()
        try:
            with torch.inference_mode():
                outputs = self.shard(msg.tensors)
        except Exception as e:  # a node failing must not take the rank down
            node = getattr(self.shard, "current_node", None)
            return self._error(msg, f"{type(e).__name__}: {e}", node)
        end = time.time()
        self.stats.processed += 1
        self.stats.compute_s += end - start
        timings = list(msg.meta.get("timings", []))
        timings.append({"rank": self.rank, "stage": self.stage, "recv": received,
                        "start": start, "end": end})
        return Message("data", msg.request, msg.micro, outputs, {**msg.meta, "timings": timings})

    def _error(self, msg: Message, text: str, node: str | None) -> Message:
        self.stats.errors += 1
        error = {"rank": self.rank, "stage": self.stage, "node": node, "message": text}
        return Message("error", msg.request, msg.micro, {}, {**msg.meta, "error": error})
