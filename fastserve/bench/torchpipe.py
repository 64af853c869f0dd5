"""One stage of torch.distributed.pipelining over gloo: the peer ``fastserve bench compare``
measures FastServe's pipeline against, on the same cut.

Started as ``python -m fastserve.bench.torchpipe``; its config is one JSON line on stdin
(the stage's shard record, as a FastServe rank receives it; for stage 0 the batch as nested
lists). Then each line ``{"steps": K}`` runs K GPipe steps between two barriers and answers
``{"seconds": ...}`` on stdout; ``{"shape": true}`` answers the last stage's output shape. End
of file on stdin (the driver gone) ends the process. No pickle crosses: JSON only.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn


class _Positional(nn.Module):
    """A shard called with positional tensors (its inputs in order), as pipelining calls a
    stage; it returns its outputs in order."""

    def __init__(self, shard) -> None:
        super().__init__()
        self.shard = shard

    def forward(self, *args: torch.Tensor):
        out = self.shard(dict(zip(self.shard.input_names, args)))
        values = tuple(out[n] for n in self.shard.output_names)
        return values if len(values) > 1 else values[0]


def main() -> int:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from fastserve.graph.dtypes import DTYPES
    from fastserve.graph.records import build_from_record

    cfg = json.loads(sys.stdin.readline())
    torch.set_num_threads(cfg["threads"])
    stage, stages = cfg["stage"], cfg["stages"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}",
                            rank=stage, world_size=stages)
    try:
        module = _Positional(build_from_record(cfg["record"],
                                               trust_code=cfg["trust_code"]))
        pipe = PipelineStage(module, stage, stages, torch.device("cpu"))
        schedule = ScheduleGPipe(pipe, cfg["micro_batches"])
        args = tuple(torch.tensor(v, dtype=DTYPES[d]) for v, d in cfg.get("inputs", []))
        output = None

        def step() -> None:
            nonlocal output
            with torch.inference_mode():
                output = schedule.step(*args) if stage == 0 else schedule.step()

        for line in sys.stdin:
            cmd = json.loads(line)
            if "steps" in cmd:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(cmd["steps"]):
                    step()
                dist.barrier()
                answer = {"seconds": time.perf_counter() - t0}
            else:
                answer = {"shape": list(output.shape) if isinstance(output, torch.Tensor)
                          else None}
            print(json.dumps(answer), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
