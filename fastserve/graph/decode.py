"""What a stage needs to generate text: a step over packed sequences, its KV cache, sampling.

A generation step runs one stage's nodes on the new tokens of several sequences at once. The
tokens are *packed*: a step's tensors have batch 1 and one row per new token, sequence after
sequence (``(1, T)`` ids into the first stage, ``(1, T, d)`` activations between stages), and a
list of segments says which rows belong to which sequence and at which position they start. A
prefill is a segment of a whole prompt at position 0; a decode step is a segment of one token.
Token-wise ops (linear, norms, the MLP, the head...) run on the packed rows unchanged; the ops
that look across positions (attention, learned positions) have a ``step`` method that reads the
segments and this stage's :class:`KVCache`.

So a decode step sends only the new tokens' activations between stages, sequences of different
lengths share a step without padding, and a sequence's cache lives on the rank that owns its
layers. The last stage samples (:func:`sample`): only token ids travel back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from fastserve.errors import SpecError

# ops whose forward treats every token on its own, so packed rows are safe (softmax, concat and
# split only along the last dimension: checked in :func:`check_generative`)
TOKENWISE = {"embedding", "linear", "layer_norm", "rms_norm", "gelu", "relu", "silu", "softmax",
             "dropout", "identity", "mlp", "lm_head", "add", "mul", "concat", "split"}
# ops with a ``step`` method (positions or attention over a sequence's past)
STEPPED = {"positional_embedding", "attention", "transformer_block", "llama_block"}
ATTENTION = {"attention", "transformer_block", "llama_block"}


KV_BYTES = 1 << 30  # a rank's cache budget


class KVCacheFull(RuntimeError):
    """A step would take this stage's cache past its byte budget."""


class GenerationError(SpecError):
    """A graph that cannot generate, or a step that does not fit its sequences."""


@dataclass(frozen=True)
class Segment:
    """The rows of one sequence in a packed step: ``n`` new tokens from position ``start``."""

    seq: int
    start: int
    n: int


class KVCache:
    """One stage's keys and values, per sequence and per attention node, within a byte budget.

    Each entry is a pair of buffers ``(heads, capacity, head_dim)`` grown by doubling, so a
    decode step appends in place instead of copying the whole past. A sequence's positions must
    arrive in order: a step that starts anywhere but at the cached length is refused (a message
    replayed or reordered would otherwise corrupt the sequence silently)."""

    def __init__(self, max_bytes: int = KV_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: dict[int, dict[str, list]] = {}  # seq -> node -> [k, v, length]

    def __len__(self) -> int:
        return len(self._entries)

    def length(self, seq: int) -> int:
        """Positions cached for ``seq`` (the same for every node once a step is done)."""
        nodes = self._entries.get(seq)
        return max((e[2] for e in nodes.values()), default=0) if nodes else 0

    def tokens(self) -> int:
        return sum(self.length(s) for s in self._entries)

    def free(self, seqs: Sequence[int]) -> None:
        for s in seqs:
            for k, v, _ in self._entries.pop(s, {}).values():
                self.bytes -= _nbytes(k) + _nbytes(v)

    def extend(self, seq: int, node: str, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k`` and ``v`` ``(heads, n, head_dim)`` at ``start``; return the whole past
        and present ``(heads, start + n, head_dim)`` (views of the buffers)."""
        nodes = self._entries.setdefault(seq, {})
        entry = nodes.get(node)
        have = entry[2] if entry else 0
        if start != have:
            if not nodes:
                del self._entries[seq]
            raise GenerationError(f"sequence {seq} steps at position {start} but node '{node}' "
                                  f"holds {have} positions of it")
        n = k.shape[1]
        end = start + n
        if entry is None or end > entry[0].shape[1]:
            capacity = max(end, 2 * entry[0].shape[1] if entry else 16)
            grow = 2 * k.shape[0] * k.shape[2] * k.element_size() * \
                (capacity - (entry[0].shape[1] if entry else 0))
            if self.bytes + grow > self.max_bytes:
                if not nodes:
                    del self._entries[seq]
                raise KVCacheFull(f"the KV cache would grow past its {self.max_bytes} bytes "
                                  f"({self.bytes} held for {len(self._entries)} sequences)")
            kb = k.new_empty((k.shape[0], capacity, k.shape[2]))
            vb = v.new_empty((v.shape[0], capacity, v.shape[2]))
            if entry is not None:
                kb[:, :have] = entry[0][:, :have]
                vb[:, :have] = entry[1][:, :have]
            self.bytes += grow
            entry = nodes[node] = [kb, vb, have]
        entry[0][:, start:end] = k
        entry[1][:, start:end] = v
        entry[2] = end
        return entry[0][:, :end], entry[1][:, :end]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Step:
    """One packed step as the stepped ops see it: the segments, the stage's cache, and the node
    running (the cache's key for that node's attention)."""

    segments: list[Segment]
    cache: KVCache
    node: str = ""
    # only each sequence's last row is wanted (the last stage samples from it): once no node
    # that looks across positions is left, the rest run on those rows alone (a prefill's head
    # computes one row of logits per sequence, not one per prompt token)
    last_only: bool = False
    sliced: bool = False  # the outputs hold only the last rows
    _positions: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        return sum(s.n for s in self.segments)

    def positions(self) -> torch.Tensor:
        """The position of every packed row, ``(T,)`` int64."""
        if self._positions is None:
            self._positions = torch.cat([torch.arange(s.start, s.start + s.n)
                                         for s in self.segments]) if self.segments else \
                torch.zeros(0, dtype=torch.int64)
        return self._positions

    def last_rows(self) -> torch.Tensor:
        """The packed row of each sequence's last token."""
        return torch.tensor([s.n for s in self.segments]).cumsum(0) - 1

    def rows(self):
        """``(segment, first row)`` of each segment in the packed tensors."""
        row = 0
        for s in self.segments:
            yield s, row
            row += s.n


def attend(step: Step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
           kv_heads: int | None = None) -> torch.Tensor:
    """Causal attention of packed rows, queries ``(1, T, heads * hd)`` and keys and values
    ``(1, T, kv_heads * hd)`` (grouped-query attention when ``kv_heads`` < ``heads``), over
    each sequence's cached past and present; returns ``(1, T, heads * hd)``. The projections
    ran on all rows at once; only this part is per sequence (the pasts differ in length). The
    cache holds ``kv_heads`` heads."""
    _, t, d = q.shape
    hd = d // heads
    kv_heads = kv_heads or heads
    out = []
    for seg, row in step.rows():
        qs = q[0, row:row + seg.n].view(seg.n, heads, hd).transpose(0, 1)  # (heads, n, hd)
        ks, vs = (x[0, row:row + seg.n].view(seg.n, kv_heads, hd).transpose(0, 1)
                  for x in (k, v))
        keys, values = step.cache.extend(seg.seq, step.node, seg.start, ks, vs)
        if kv_heads != heads:
            keys = keys.repeat_interleave(heads // kv_heads, dim=0)
            values = values.repeat_interleave(heads // kv_heads, dim=0)
        if seg.start == 0:
            y = F.scaled_dot_product_attention(qs, keys, values, is_causal=True)
        elif seg.n == 1:
            y = F.scaled_dot_product_attention(qs, keys, values)
        else:  # several new tokens after a past: each sees the past and the new ones before it
            past = torch.arange(seg.start + seg.n)
            mask = past[None, :] <= (seg.start + torch.arange(seg.n))[:, None]
            y = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)
        out.append(y.transpose(0, 1).reshape(seg.n, d))
    return torch.cat(out).unsqueeze(0) if out else q.new_zeros((1, 0, d))


def kv_bytes_per_token(graph, nodes) -> int:
    """Bytes of keys and values one position of one sequence takes in the cache of a stage
    holding ``nodes`` (float32, as the ranks compute)."""
    total = 0
    for n in nodes:
        d = graph.node(n)
        if d["op"] in ATTENTION:
            args = d["args"]
            heads = args["n_heads"]
            total += 2 * args["d_model"] * (args.get("n_kv_heads") or heads) // heads * 4
    return total


def max_positions(graph) -> int | None:
    """The longest sequence a graph takes: its learned positions (None: no limit)."""
    sizes = [graph.node(n)["args"]["max_positions"] for n in graph.order
             if graph.node(n)["op"] == "positional_embedding"]
    return min(sizes) if sizes else None


def check_generative(graph) -> None:
    """Refuse a graph whose nodes cannot run packed steps, naming the first that cannot."""
    if graph.spec.source is not None:
        raise GenerationError(f"graph '{graph.name}' is captured from a torch model; generation "
                              f"runs graphs written with the op library (e.g. graphs/gpt2.yaml). "
                              f"A spec file of a captured GPT-2 or Llama is rewritten with them "
                              f"(fastserve generate does it: fastserve.graph.hf.rewrite); a "
                              f"partition export of one is not", file=graph.spec.file)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise GenerationError(f"graph '{graph.name}' has {len(graph.inputs)} inputs and "
                              f"{len(graph.outputs)} outputs; generation needs token ids in and "
                              f"logits out", file=graph.spec.file)
    if not any(graph.node(n)["op"] in ATTENTION for n in graph.order):
        raise GenerationError(f"graph '{graph.name}' has no attention: it is not a language "
                              f"model", file=graph.spec.file)
    for n in graph.order:
        d = graph.node(n)
        op, args = d["op"], d["args"]
        ok = op in STEPPED or op in TOKENWISE
        if op in ("softmax", "concat", "split") and args.get("dim", -1) not in (-1, 2):
            ok = False
        if op == "attention" and not args.get("causal", True):
            ok = False
        if not ok:
            raise GenerationError(f"node '{n}' (op {op}) of graph '{graph.name}' cannot run a "
                                  f"generation step: it is neither token-wise nor causal",
                                  file=graph.spec.file)


# --- sampling ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the last stage picks a token: greedy at ``temperature`` 0; else from the softmax at
    that temperature, within the ``top_k`` most likely (0: all) and the smallest set holding
    ``top_p`` of the probability, drawn with a generator seeded by ``seed`` and the position, so
    a sequence's tokens do not depend on what it was batched with."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature must be within 0 and 100, got {self.temperature}")
        if not (0 <= self.top_k <= 1 << 31):
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if not (0 <= self.seed < 1 << 63):
            raise ValueError(f"seed must be a non-negative int64, got {self.seed}")

    def to_wire(self) -> list:
        return [float(self.temperature), int(self.top_k), float(self.top_p), int(self.seed)]


def sample(logits: torch.Tensor, sampling: Sequence[Sampling], positions: Sequence[int]
           ) -> torch.Tensor:
    """One token id per row of ``logits`` ``(S, vocab)``, ``(S,)`` int64. ``positions`` are the
    positions the tokens will take (they vary the seeded draws along a sequence)."""
    out = torch.empty(len(sampling), dtype=torch.int64)
    for i, (row, s, pos) in enumerate(zip(logits, sampling, positions)):
        if s.temperature == 0.0:
            out[i] = int(torch.argmax(row))
            continue
        # from the largest logit down, in float64, so that no temperature in range overflows
        # or rounds to zero (1e-300 would make the logits infinite, the probabilities NaN):
        # the same softmax, and the largest logit's token alone as the temperature nears 0
        row = row.double()
        row = (row - row.max()) / s.temperature
        if 0 < s.top_k < row.numel():
            kth = torch.topk(row, s.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_p, 0) - sorted_p  # mass strictly above each token
            sorted_p[before >= s.top_p] = 0.0  # keep the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        gen = torch.Generator().manual_seed(_draw_seed(s.seed, pos))
        out[i] = int(torch.multinomial(probs, 1, generator=gen))
    return out


def _draw_seed(seed: int, position: int) -> int:
    digest = hashlib.sha256(f"{seed}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
