"""One plain process running the whole model over its share of a batch, talking to nobody:
``fastserve bench compare`` starts N of them side by side to measure what N processes on this
machine reach at all. N processes sharing the same cores, caches and memory bus slow each other
down; the rate they reach together is the ceiling of every N-process layout of the same work
(a pipeline or N replicas only add messages to it).

Started as ``python -m fastserve.bench.plain``; its config is one JSON line on stdin: the whole
graph as a shard record (as a FastServe rank receives one), its share of the batch as nested
lists, which inputs are batched, and the chunk size (the micro-batch's samples). It answers
``{"ready": true}`` once built. Then each line ``{"repeats": K, "at": T}`` waits until the wall
clock reads T (so that all of them start together), runs its share K times in chunks and answers
``{"end": ...}``, the wall clock when it finished (the driver times from T, so a process that
wakes late counts its lateness). End of file on stdin (the driver gone) ends it. No pickle
crosses: JSON only.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main() -> int:
    from fastserve.graph.dtypes import DTYPES
    from fastserve.graph.records import build_from_record

    cfg = json.loads(sys.stdin.readline())
    torch.set_num_threads(1)
    module = build_from_record(cfg["record"], trust_code=cfg["trust_code"])
    inputs = {name: torch.tensor(v, dtype=DTYPES[d]) for name, (v, d) in cfg["inputs"].items()}
    size, batched = cfg["size"], cfg["batched"]
    total = inputs[batched[0]].shape[0]
    chunks = [{k: (v[lo:lo + size] if k in batched else v) for k, v in inputs.items()}
              for lo in range(0, total, size)]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        time.sleep(max(0.0, cmd["at"] - time.time()))
        with torch.inference_mode():
            for _ in range(cmd["repeats"]):
                for chunk in chunks:
                    module(chunk)
        print(json.dumps({"end": time.time()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
