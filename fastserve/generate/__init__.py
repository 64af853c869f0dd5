"""Text generation: a KV cache per stage, iteration-level batching, FCFS and skip-join MLFQ.

``Generator(pipeline).run([Request(prompt_ids, max_tokens=16)])`` generates on a
:class:`LocalPipeline` (stages in this process) or a :class:`DeploymentPipeline` (rank
processes); see :mod:`fastserve.generate.loop`.
"""

from fastserve.generate.loop import Event, Generator, Request
from fastserve.generate.pipeline import (DeploymentPipeline, LocalPipeline, kv_budget,
                                         kv_positions, max_positions)
from fastserve.generate.scheduler import FCFS, MLFQ, Costs, SeqState, scheduler
from fastserve.graph.decode import Sampling

__all__ = ["Costs", "DeploymentPipeline", "Event", "FCFS", "Generator", "LocalPipeline", "MLFQ",
           "Request", "Sampling", "SeqState", "kv_budget", "kv_positions",
           "max_positions", "scheduler"]
