"""Materialising and running a graph, or any subset of its nodes, in one process.

Weights are deterministic per node: node ``n`` of a graph with seed ``s`` is initialised from a
generator seeded with ``hash(s, n)``, so a rank can build just its own nodes and get bit-for-bit
the weights the single-process reference has. With a checkpoint, only the tensors of the requested
nodes are read (``<node id>.<param name>`` keys; safetensors files are memory-mapped).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from fastserve.errors import SpecError, WeightsError
from fastserve.graph.checkpoint import open_checkpoint, resolve_path
from fastserve.graph.decode import Step
from fastserve.graph.dtypes import torch_dtype
from fastserve.graph.graph import Graph
from fastserve.graph.memory import _gb, available_memory, ensure_memory
from fastserve.graph.ops import LMHead, build_module
from fastserve.graph.spec import WeightsSpec


def node_seed(seed: int, node_id: str) -> int:
    """A stable 63-bit seed for one node (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_nodes(graph: Graph, node_ids: Iterable[str] | None = None,
                weights: WeightsSpec | None = None) -> dict[str, nn.Module]:
    """Build the modules of ``node_ids`` (default: all) with their weights, in eval mode."""
    ids = list(graph.order if node_ids is None else node_ids)
    weights = weights or graph.spec.weights
    if graph.spec.source is not None:
        from fastserve.graph.capture import build_captured_nodes

        return build_captured_nodes(graph, ids, weights)
    ensure_memory(graph, ids, "the weights", lambda d: d["params_bytes"] + d["borrowed_bytes"])
    modules = {n: _seeded(graph, n, weights.seed) for n in ids}
    if weights.checkpoint:
        load_checkpoint(modules, weights.checkpoint, base=graph.spec.file)
    _bind_tied(graph, modules, weights)
    for m in modules.values():
        m.eval()
    return modules


def _seeded(graph: Graph, node_id: str, seed: int) -> nn.Module:
    d = graph.node(node_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(node_seed(seed, node_id))
        return build_module(d["op"], d["args"])


def _bind_tied(graph: Graph, modules: dict[str, nn.Module], weights: WeightsSpec) -> None:
    """Give ``lm_head`` nodes with ``tie`` the weight of the node they are tied to. If that node
    is not part of this subset (another shard holds it), build a private copy of it."""
    for n, m in modules.items():
        if isinstance(m, LMHead) and m.tie is not None:
            src = modules.get(m.tie)
            if src is None:
                src = _seeded(graph, m.tie, weights.seed)
                if weights.checkpoint:
                    load_checkpoint({m.tie: src}, weights.checkpoint, base=graph.spec.file)
            m.weight = src.weight


def load_checkpoint(modules: Mapping[str, nn.Module], path: str, base: str | None = None) -> None:
    """Copy ``<node>.<param>`` tensors from a checkpoint into ``modules`` (only those nodes)."""
    p = resolve_path(path, base)
    wanted = {f"{n}.{k}": t for n, m in modules.items()
              for k, t in {**dict(m.named_parameters()), **dict(m.named_buffers())}.items()}
    with open_checkpoint(p) as (keys, get):
        _copy_into(wanted, keys, get, p)


def _copy_into(wanted: dict[str, torch.Tensor], keys: set[str], get, path: Path) -> None:
    missing = sorted(k for k in wanted if k not in keys)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"checkpoint '{path}' lacks tensors {', '.join(missing[:5])}{more}")
    with torch.no_grad():
        for k, dst in wanted.items():
            src = get(k)
            if tuple(src.shape) != tuple(dst.shape):
                raise WeightsError(f"checkpoint '{path}' tensor '{k}' has shape "
                                   f"{tuple(src.shape)}, the graph expects {tuple(dst.shape)}")
            dst.copy_(src)


def state_dict(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``<node>.<param>`` -> tensor for the given node modules (the checkpoint key layout)."""
    out: dict[str, torch.Tensor] = {}
    for n, m in modules.items():
        for k, t in m.state_dict().items():
            if isinstance(m, LMHead) and m.tie is not None and k == "weight":
                continue  # owned by the tied node
            out[f"{n}.{k}"] = t.detach().contiguous()
    return out


class SubgraphModule(nn.Module):
    """Runs a set of nodes: reads ``inputs`` tensors, returns ``outputs`` tensors by name.

    The whole graph is the subset of all nodes; a shard is a subset whose inputs and outputs are
    the tensors crossing its cuts. Intermediate tensors are dropped as soon as their last reader
    has run, so peak memory follows the live set, not the whole graph.
    """

    def __init__(self, graph: Graph, modules: dict[str, nn.Module], inputs: Iterable[str],
                 outputs: Iterable[str]) -> None:
        steps = [(n, list(graph.node(n)["inputs"]), [t.name for t in graph.node(n)["outputs"]])
                 for n in graph.order if n in modules]
        self._setup(graph.name, steps, modules, inputs, outputs)

    @classmethod
    def from_steps(cls, name: str, steps: Iterable[tuple[str, list[str], list[str]]],
                   modules: dict[str, nn.Module], inputs: Iterable[str],
                   outputs: Iterable[str]) -> SubgraphModule:
        """A subgraph without its graph: ``steps`` lists each node (in an order where every
        tensor is produced before it is read) with the tensors it reads and writes. A rank
        builds its shard this way from the node records it receives."""
        self = cls.__new__(cls)
        self._setup(name, list(steps), modules, inputs, outputs)
        return self

    def _setup(self, name: str, steps: list[tuple[str, list[str], list[str]]],
               modules: dict[str, nn.Module], inputs: Iterable[str],
               outputs: Iterable[str]) -> None:
        super().__init__()
        self.graph_name = name
        self.order = [n for n, _, _ in steps]
        self.nodes = nn.ModuleDict({_key(n): modules[n] for n in self.order})
        self.node_inputs = {n: list(ins) for n, ins, _ in steps}
        self.node_outputs = {n: list(outs) for n, _, outs in steps}
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        available = set(self.input_names)
        for n in self.order:
            for ref in self.node_inputs[n]:
                if ref not in available:
                    raise SpecError(f"node '{n}' reads '{ref}', which is neither an input of "
                                    f"this subgraph nor produced inside it")
            available.update(self.node_outputs[n])
        missing = [o for o in self.output_names if o not in available]
        if missing:
            raise SpecError(f"subgraph cannot produce outputs {missing}")
        # last reader of each tensor, to free intermediates early
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(self.order):
            for ref in self.node_inputs[n]:
                self.last_use[ref] = i
        keep = set(self.output_names)
        # one tuple per node, resolved once: a forward of a small batch is mostly this loop
        # (a node's torch call is ~5 us), so no lookups by name in it
        self._steps = [(n, self.nodes[_key(n)], getattr(self.nodes[_key(n)], "step", None),
                        tuple(self.node_inputs[n]), tuple(self.node_outputs[n]),
                        tuple(r for r in self.node_inputs[n]
                              if self.last_use[r] == i and r not in keep))
                       for i, n in enumerate(self.order)]
        # from this step on no node looks across positions (see Step.last_only)
        self._tail = 1 + max((i for i, s in enumerate(self._steps) if s[2] is not None),
                             default=-1)
        self.__dict__["current_node"] = None

    def forward(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.step(tensors, None)

    def step(self, tensors: Mapping[str, torch.Tensor], step: Step | None
             ) -> dict[str, torch.Tensor]:
        """Run the nodes; with ``step``, one generation step of packed sequences (see
        :mod:`fastserve.graph.decode`): nodes with a ``step`` method get it."""
        env = {k: tensors[k] for k in self.input_names}
        state = self.__dict__  # nn.Module.__setattr__ is slow; current_node is plain data
        cut = self._tail if step is not None and step.last_only else -1
        for i, (n, module, stepper, refs, names, done) in enumerate(self._steps):
            if i == cut:
                rows = step.last_rows()
                env = {k: v.index_select(1, rows) for k, v in env.items()}
                step.sliced = True
            state["current_node"] = n  # for error reports: which node raised
            if step is None or stepper is None:
                out = module(*[env[r] for r in refs])
            else:
                step.node = n
                out = stepper(*[env[r] for r in refs], step)
            if len(names) == 1:
                env[names[0]] = out[0] if isinstance(out, tuple) and len(out) == 1 else out
            else:
                env.update(zip(names, out))
            for ref in done:
                env.pop(ref, None)
        state["current_node"] = None
        return {k: env[k] for k in self.output_names}


def _key(node_id: str) -> str:
    # ModuleDict keys may not contain '.'
    return node_id.replace(".", "__")


def build_subgraph(graph: Graph, node_ids: Iterable[str], inputs: Iterable[str],
                   outputs: Iterable[str], weights: WeightsSpec | None = None) -> SubgraphModule:
    """Build only ``node_ids`` with their weights, as a module from ``inputs`` to ``outputs``."""
    return SubgraphModule(graph, build_nodes(graph, list(node_ids), weights), inputs, outputs)


def build_reference(graph: Graph, weights: WeightsSpec | None = None) -> SubgraphModule:
    """The whole graph as one module: graph inputs in, graph outputs out."""
    return build_subgraph(graph, graph.order, [t.name for t in graph.inputs], graph.outputs,
                          weights)


def random_inputs(graph: Graph, batch: int, dims: Mapping[str, int] | None = None,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for ``graph`` at batch size ``batch`` (token ids within ``high``)."""
    sizes = {**graph.dims, **(dims or {}), "batch": batch}
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    shapes = [tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
              for spec in graph.spec.inputs]
    need = sum(_numel(s) * torch_dtype(spec.dtype).itemsize
               for s, spec in zip(shapes, graph.spec.inputs))
    free = available_memory()
    if free is not None and need > free:
        raise SpecError(f"random inputs of batch {batch} need {_gb(need)}, more than the "
                        f"{_gb(free)} this machine has available; use a smaller batch or "
                        f"smaller input dims", file=graph.spec.file, key="inputs")
    for spec, shape in zip(graph.spec.inputs, shapes):
        dtype = torch_dtype(spec.dtype)
        if dtype.is_floating_point:
            out[spec.name] = torch.randn(shape, generator=gen, dtype=dtype)
        elif dtype == torch.bool:
            out[spec.name] = torch.ones(shape, dtype=torch.bool)
        else:
            out[spec.name] = torch.randint(0, spec.high or 2, shape, generator=gen, dtype=dtype)
    return out


@torch.inference_mode()
def reference(graph: Graph, inputs: Mapping[str, torch.Tensor],
              weights: WeightsSpec | None = None) -> dict[str, torch.Tensor]:
    """Run the whole graph in this process: the result every distributed run is checked against."""
    module = build_reference(graph, weights)
    batch = next((t.shape[0] for t in inputs.values() if t.dim()), 1)
    ensure_activations(graph, batch)
    return module(inputs)


def ensure_activations(graph: Graph, batch: int) -> None:
    """Refuse a run of ``batch`` samples whose largest single output would not fit in memory
    (a lower bound on what the run needs; the live set is larger)."""
    biggest = max(graph, key=lambda n: graph.node(n)["out_bytes"], default=None)
    if biggest is not None:
        ensure_memory(graph, [biggest], f"the activations at batch {batch}",
                      lambda d: d["out_bytes"], factor=batch)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
