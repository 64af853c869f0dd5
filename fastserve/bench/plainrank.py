"""One stage of a model in a plain pyzmq process: ``fastserve bench request`` chains one or two
of them to measure what a hand-written pipeline of the same stages costs on this machine, with
nothing of FastServe on the path (no validation, no timings, no control thread, no polling).

Started as ``python -m fastserve.bench.plainrank``; its config is one JSON line on stdin: the
stage as a shard record (as a FastServe rank receives one), where to bind its input (PULL) and
where to send its output (PUSH). A message is a JSON frame naming each tensor's shape and dtype,
then one frame of bytes per tensor; a lone ``stop`` frame is passed on and ends the process,
as does end of file on stdin. No pickle crosses.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import torch
import zmq


def frames_of(tensors: dict[str, torch.Tensor]) -> list:
    head = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()}
    # bytes of any dtype (numpy has no bfloat16)
    return [json.dumps(head).encode(),
            *(t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in tensors.values())]


def tensors_of(frames: list) -> dict[str, torch.Tensor]:
    head = json.loads(frames[0].bytes)
    return {k: torch.frombuffer(f.buffer, dtype=getattr(torch, dtype)).view(shape)
            for (k, (shape, dtype)), f in zip(head.items(), frames[1:])}


def main() -> int:
    from fastserve.graph.records import build_from_record

    cfg = json.loads(sys.stdin.readline())
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    torch.set_num_threads(1)
    module = build_from_record(cfg["record"], trust_code=cfg["trust_code"])
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(cfg["inp"])
    push.connect(cfg["out"])
    with torch.inference_mode():
        while True:
            frames = pull.recv_multipart(copy=False)
            if len(frames) == 1:
                push.send(b"stop")
                break
            push.send_multipart(frames_of(module(tensors_of(frames))), copy=False)
    push.close(linger=1000)
    pull.close(linger=0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
