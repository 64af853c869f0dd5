"""One plain process decoding a micro-batch's sequences with the whole model on one thread,
talking to nobody: ``fastserve bench generate`` starts one per stage, side by side, to measure
what that many processes decode together on this machine. That is the pipeline's ceiling with
the contention its ranks meet too (the same cores, caches and memory bus), where the ceiling
from one process alone assumes none.

Started as ``python -m fastserve.bench.plaindecode``; its config is one JSON line on stdin: the
spec (read as the driver read it), whether its code is trusted, and the sequences and tokens to
decode. It builds the model as ``bench generate`` builds its one process, decodes once to warm
up, and answers ``{"ready": true}``. Then each line ``{"at": T}`` waits until the wall clock
reads T (so that all of them start together), decodes, and answers ``{"tokens": N, "first":
F, "end": E}``: the tokens after every prefill, and the wall clock when the last prefill's token
and the last token came (the driver divides all their tokens by the span from the earliest F
to the latest E). End of file on stdin (the driver gone) ends it. JSON only.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import ExitStack

import torch


def main() -> int:
    from fastserve.bench.generate import decode_span
    from fastserve.generate import Generator, LocalPipeline
    from fastserve.generate.model import language_model

    cfg = json.loads(sys.stdin.readline())
    torch.set_num_threads(1)
    seqs, tokens = int(cfg["seqs"]), int(cfg["tokens"])
    with ExitStack() as cleanup:
        graph, _cut, _export = language_model(cfg["spec"], bool(cfg["trust_code"]), cleanup)
        local, vocab = LocalPipeline(graph), graph.spec.inputs[0].high or 256
        decode_span(Generator(local, max_seqs=seqs), seqs, min(tokens, 4), vocab)  # warm up
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            time.sleep(max(0.0, float(cmd["at"]) - time.time()))
            count, first, end = decode_span(Generator(local, max_seqs=seqs), seqs, tokens, vocab)
            print(json.dumps({"tokens": count, "first": first, "end": end}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
