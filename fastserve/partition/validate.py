"""``validate(sharding)``: run the shards one after another and compare with the reference.

Preprocess (pick a strategy), cut, validate: this is the last step. On random inputs from
:func:`fastserve.graph.random_inputs`:

1. the unsharded graph runs in this process, once (the same modules as
   :func:`fastserve.graph.reference`, asked to also return every tensor that crosses a cut);
2. each shard is built alone (only its own weights, the way a rank builds it), fed the outputs
   of the previous *shard* (not of the reference, so errors propagate as in a real pipeline),
   and every tensor it sends is compared with the reference's value by
   ``torch.testing.assert_close``; then it is freed before the next shard is built.

The report gives, per shard, what was measured while it ran at the validation batch size:

* ``weight_bytes``: bytes of the distinct parameter and buffer storages of the built shard;
* ``activation_bytes``: the peak bytes of tensors alive between nodes (the shard's inputs and
  its nodes' outputs, tracked from creation until Python frees them); temporaries inside a node
  are not seen, so this is a lower bound on the true activation peak;
* ``peak_bytes = weight_bytes + activation_bytes``.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from fastserve.errors import ValidationError
from fastserve.graph.module import SubgraphModule, build_subgraph, random_inputs
from fastserve.graph.spec import WeightsSpec
from fastserve.partition.sharding import Sharding


@dataclass(frozen=True)
class ShardCheck:
    """One shard's validation: did its outputs match, and what it held while running."""

    index: int
    ok: bool
    max_abs_diff: float  # over all tensors it sends, vs the reference (nan if shapes differ)
    weight_bytes: int
    activation_bytes: int
    seconds: float
    message: str | None = None  # the first mismatch, when not ok

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "ok": self.ok, "max_abs_diff": self.max_abs_diff,
                "weight_bytes": self.weight_bytes, "activation_bytes": self.activation_bytes,
                "peak_bytes": self.peak_bytes, "seconds": self.seconds,
                "message": self.message}


@dataclass(frozen=True)
class ValidationReport:
    """The result of :func:`validate`; ``ok`` when every shard matched the reference."""

    graph: str
    strategy: str
    batch: int
    seed: int
    shards: tuple[ShardCheck, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.shards)

    @property
    def first_failure(self) -> ShardCheck | None:
        return next((s for s in self.shards if not s.ok), None)

    def summary(self) -> str:
        bad = self.first_failure
        if bad is None:
            return (f"valid: {len(self.shards)} shards chained reproduce the reference outputs "
                    f"(batch {self.batch}, seed {self.seed})")
        return f"INVALID: shard {bad.index} differs from the reference: {bad.message}"

    def raise_for_failure(self) -> ValidationReport:
        if not self.ok:
            raise ValidationError(f"graph '{self.graph}' ({self.strategy} sharding): "
                                  f"{self.summary()}")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "strategy": self.strategy, "batch": self.batch,
                "seed": self.seed, "ok": self.ok, "shards": [s.to_json() for s in self.shards]}


@torch.inference_mode()
def validate(sharding: Sharding, batch: int = 2, seed: int = 0,
             dims: Mapping[str, int] | None = None, weights: WeightsSpec | None = None,
             modules: Sequence[SubgraphModule] | None = None,
             inputs: Mapping[str, torch.Tensor] | None = None,
             rtol: float | None = None, atol: float | None = None) -> ValidationReport:
    """Run ``sharding``'s shards in order on random inputs (``batch``, ``seed``, ``dims``) and
    compare every cut tensor and the graph outputs with the unsharded reference.

    ``modules`` replaces the freshly built shards (e.g. shards loaded from an export, or a shard
    whose weights a test corrupted); ``inputs`` replaces the random inputs. ``rtol``/``atol``
    are passed to ``torch.testing.assert_close`` (its dtype defaults when None).
    """
    graph = sharding.graph
    if modules is not None and len(modules) != len(sharding.shards):
        raise ValidationError(f"{len(modules)} shard modules were given for "
                              f"{len(sharding.shards)} shards")
    feed = dict(inputs) if inputs is not None else random_inputs(graph, batch, dims, seed)
    wanted = list(dict.fromkeys(t for s in sharding.shards for t in s.outputs))
    reference_module = build_subgraph(graph, graph.order, [t.name for t in graph.inputs],
                                      wanted, weights)
    expected = reference_module(feed)
    del reference_module  # free its weights before the shards are built

    checks = []
    env = feed
    for i, shard in enumerate(sharding.shards):
        module = modules[i] if modules is not None else sharding.module(i, weights)
        weight_bytes = _storage_bytes(module)
        tracker = _LiveTensors()
        with tracker.watch(module, {k: env[k] for k in shard.inputs}):
            t0 = time.perf_counter()
            out = module({k: env[k] for k in shard.inputs})
            seconds = time.perf_counter() - t0
        if modules is None:
            del module
        worst, message = _compare(out, expected, shard.outputs, rtol, atol)
        checks.append(ShardCheck(i, message is None, worst, weight_bytes, tracker.peak, seconds,
                                 message))
        env = out
    return ValidationReport(graph.name, sharding.strategy, batch, seed, tuple(checks))


def _compare(out: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
             names: Sequence[str], rtol, atol) -> tuple[float, str | None]:
    worst, message = 0.0, None
    for name in names:
        got, want = out.get(name), expected[name]
        if got is None:
            return float("nan"), f"it did not send '{name}'"
        if got.shape == want.shape and got.is_floating_point() and want.is_floating_point():
            diff = (got.double() - want.double()).abs()
            worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        elif got.shape != want.shape:
            worst = float("nan")
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        except AssertionError as e:
            if message is None:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                message = f"tensor '{name}': " + "; ".join(lines[:3])
    return worst, message


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    seen: dict[int, int] = {}
    tensors = [*module.named_parameters(remove_duplicate=False),
               *module.named_buffers(remove_duplicate=False)]
    for _, t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _LiveTensors:
    """Peak bytes of tensors alive during a shard's run: its inputs, and every node output from
    the moment a node returns it until the last reference to it is dropped (weakref finalizers,
    which CPython runs as soon as a tensor's refcount reaches zero). Storages are counted once,
    so a node returning a view of its input adds nothing."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage pointer -> tracked tensors using it

    def track(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._refs:
                self._refs[key] = 0
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key, storage.nbytes())
        elif isinstance(t, (tuple, list)):
            for x in t:
                self.track(x)
        elif isinstance(t, dict):
            for x in t.values():
                self.track(x)

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    @contextmanager
    def watch(self, module: SubgraphModule, inputs: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Track ``inputs`` and, while the block runs, every output of the shard's nodes."""
        self.track(list(inputs.values()))
        handles = [m.register_forward_hook(lambda _m, _args, out: self.track(out))
                   for m in module.nodes.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
