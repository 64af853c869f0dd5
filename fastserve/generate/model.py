"""The graph a generation runs: a spec's own, or a captured model's rewritten with the op
library (:mod:`fastserve.graph.hf`)."""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from typing import Callable

from fastserve.engine.deployment import load_graph
from fastserve.graph import Graph, compile_graph, load_spec
from fastserve.graph.decode import GenerationError, check_generative
from fastserve.graph.hf import rewrite


def language_model(spec: str, trust_code: bool, cleanup: ExitStack,
                   progress: Callable[[str], object] = lambda _m: None,
                   plan_file: str | None = None
                   ) -> tuple[Graph, tuple[tuple[str, ...], ...] | None, str | None]:
    """``(graph, cut, export_dir)`` as :func:`~fastserve.engine.deployment.load_graph`, for a
    causal LM the generation loop runs; :class:`~fastserve.graph.decode.GenerationError` (a
    :class:`~fastserve.errors.SpecError`) naming why not. A spec captured from a GPT-2 or Llama
    model (``source:``) is rewritten with the op library, its weights in a temporary directory
    that ``cleanup`` removes (keep it open while ranks run). ``plan_file``: the plan the caller
    will run, which cannot be one for a rewrite (a plan is made for the graph of its spec)."""
    if os.path.isdir(spec):  # a partition export: its shards are the stages
        graph, cut, export_dir = load_graph(spec, None, trust_code)
    else:
        parsed = load_spec(spec, trust_code=trust_code)
        if parsed.source is not None:  # not captured here: the rewrite needs no program
            if plan_file:
                raise GenerationError(
                    f"plan '{plan_file}' was made for the captured graph of '{spec}', but "
                    f"generation runs its rewrite with the op library, which no plan file "
                    f"describes; leave the plan out and give the stages (and hosts) instead")
            directory = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fastserve-lm-"))
            parsed = rewrite(parsed, directory)
            progress(f"graph '{parsed.name}' was captured from a torch model: rewritten with "
                     f"the op library's layers and the same weights, to generate with a KV "
                     f"cache")
        graph, cut, export_dir = compile_graph(parsed), None, None
    check_generative(graph)
    return graph, cut, export_dir
