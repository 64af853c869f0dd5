"""The op library: every op a graph spec may name.

An op turns a node's arguments into a ``torch.nn.Module`` whose ``forward`` takes the node's input
tensors positionally and returns one tensor, or a tuple for multi-output ops (``split``). Modules
are shape-generic in the batch and sequence dimensions, so one built module serves any batch size.

Reshaping ops keep the leading (batch) dimension: ``reshape`` with ``shape: [-1, 8, 8]`` maps
``(batch, 512)`` to ``(batch, 8, 8, 8)``, which is what a spec with a symbolic batch needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastserve.errors import SpecError
from fastserve.graph.decode import GenerationError, Step, attend


@dataclass(frozen=True)
class Op:
    """A registered op: how to build its module and what arguments it takes."""

    name: str
    build: Callable[..., nn.Module]
    required: tuple[str, ...] = ()
    optional: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[int, int | None] = (1, 1)  # (min, max) input tensors; max None = any
    doc: str = ""

    def n_outputs(self, args: dict[str, Any]) -> int:
        if self.name == "split":
            return len(args["sizes"]) if "sizes" in args else int(args["chunks"])
        return 1


OPS: dict[str, Op] = {}


def register(name: str, *, required=(), optional=None, inputs=(1, 1), doc: str = ""):
    """Register ``fn(**args) -> nn.Module`` as op ``name``. Users may register their own ops."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        OPS[name] = Op(name, fn, tuple(required), dict(optional or {}), inputs, doc)
        return fn

    return deco


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise SpecError(f"unknown op '{name}'; known ops: {', '.join(sorted(OPS))}") from None


def build_module(op: str, args: dict[str, Any]) -> nn.Module:
    """Build the module of one node (on the current default device)."""
    spec = get_op(op)
    return spec.build(**{**spec.optional, **args})


# --- modules that torch does not ship in the shape we need -------------------------------------


class Lambda(nn.Module):
    """A parameter-free op given as a function of its inputs."""

    def __init__(self, fn: Callable[..., torch.Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, *xs: torch.Tensor):
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.name


class PositionalEmbedding(nn.Module):
    """Learned absolute positions added to token embeddings: (batch, seq, dim) -> same."""

    def __init__(self, max_positions: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, embedding_dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[: x.shape[1]]

    def step(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        positions = step.positions()
        if positions.numel() and int(positions.max()) >= self.weight.shape[0]:
            raise GenerationError(f"position {int(positions.max())} is past the "
                                  f"{self.weight.shape[0]} this model has")
        return x + self.weight[positions]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, GPT-2 layout (fused qkv projection, output projection)."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, causal: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise SpecError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape  # (batch, seq, d_model)
        q, k, v = self.qkv(x).split(d, dim=-1)
        shape = (b, s, self.n_heads, d // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))

    def step(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        return self.proj(attend(step, q, k, v, self.n_heads))


class MLP(nn.Module):
    """Position-wise feed-forward: linear, activation, linear."""

    def __init__(self, d_model: int, d_ff: int | None = None, activation: str = "gelu",
                 bias: bool = True) -> None:
        super().__init__()
        d_ff = d_ff or 4 * d_model
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.act = _activation(activation)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class PreNormBlock(nn.Module):
    """A pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)). Subclasses build the
    four parts."""

    ln1: nn.Module
    attn: nn.Module
    ln2: nn.Module
    mlp: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def step(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.attn.step(self.ln1(x), step)
        return x + self.mlp(self.ln2(x))


class TransformerBlock(PreNormBlock):
    """GPT-2 style block: layer norms, fused-qkv attention, GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None,
                 activation: str = "gelu", eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = CausalSelfAttention(d_model, n_heads, bias=bias)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_ff, activation, bias=bias)


class RotaryAttention(nn.Module):
    """Llama-style causal self-attention: separate q, k, v and output projections without
    bias, rotary position embeddings (rotate-half form, base ``rope_theta``) on q and k, and
    grouped-query attention (``n_kv_heads`` key/value heads shared by ``n_heads`` query
    heads)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 rope_theta: float = 10000.0) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads or n_heads % n_kv_heads or (d_model // n_heads) % 2:
            raise SpecError(f"d_model {d_model}, n_heads {n_heads} and n_kv_heads "
                            f"{n_kv_heads}: d_model must split into heads of an even size "
                            f"and n_heads into groups of n_kv_heads")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        # made once here, not per step; a plain tensor, not a buffer: no checkpoint holds it
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device="cpu")
        self.inv_freq = 1.0 / rope_theta ** (half / self.head_dim)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, heads: int) -> torch.Tensor:
        """Rotary embedding of ``x`` (batch, seq, heads * head_dim) at ``positions`` (seq,)."""
        b, s, _ = x.shape
        inv_freq = self.inv_freq.to(x.device)  # no copy on the CPU; meta when costed
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # (seq, head_dim)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x = x.view(b, s, heads, self.head_dim)
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2:]
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x * cos[:, None, :] + rotated * sin[:, None, :]).reshape(b, s, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        positions = torch.arange(s, device=x.device)
        q = self.rotate(self.q(x), positions, self.n_heads)
        k = self.rotate(self.k(x), positions, self.n_kv_heads)
        v = self.v(x)
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, d))

    def step(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        positions = step.positions()
        q = self.rotate(self.q(x), positions, self.n_heads)
        k = self.rotate(self.k(x), positions, self.n_kv_heads)
        return self.o(attend(step, q, k, self.v(x), self.n_heads, self.n_kv_heads))


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x)), without bias."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(PreNormBlock):
    """Llama decoder layer: RMSNorms, rotary grouped-query attention, SwiGLU."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 d_ff: int | None = None, eps: float = 1e-6,
                 rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.ln1 = nn.RMSNorm(d_model, eps=eps)
        self.attn = RotaryAttention(d_model, n_heads, n_kv_heads, rope_theta)
        self.ln2 = nn.RMSNorm(d_model, eps=eps)
        self.mlp = SwiGLU(d_model, d_ff or 4 * d_model)


class LMHead(nn.Module):
    """Projection to vocabulary logits. With ``tie`` the weight is another node's (the
    embedding's); it is bound after build, see ``fastserve.graph.module``."""

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False,
                 tie: str | None = None) -> None:
        super().__init__()
        self.tie = tie
        if tie is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
            nn.init.normal_(self.weight, std=0.02)
        else:
            self.weight = None  # bound to the tied node's parameter at build time
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Reshape(nn.Module):
    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


class Split(nn.Module):
    """One tensor into pieces along ``dim``: of the given ``sizes``, or exactly ``chunks``
    pieces (sizes differing by at most one, as ``torch.tensor_split``; ``torch.chunk`` may give
    fewer pieces than asked, and the graph has declared one output per chunk)."""

    def __init__(self, dim: int, sizes: list[int] | None = None, chunks: int | None = None) -> None:
        super().__init__()
        if (sizes is None) == (chunks is None):
            raise SpecError("split takes exactly one of 'sizes' and 'chunks'")
        if chunks is not None and (type(chunks) is not int or chunks < 1):
            raise SpecError(f"split 'chunks' must be a positive integer, got {chunks!r}")
        self.dim, self.sizes, self.chunks = dim, sizes, chunks

    def forward(self, x: torch.Tensor):
        if self.sizes is not None:
            return tuple(torch.split(x, list(self.sizes), dim=self.dim))
        return tuple(torch.tensor_split(x, self.chunks, dim=self.dim))


def _activation(name: str) -> nn.Module:
    table = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(),
             "silu": nn.SiLU()}
    if name not in table:
        raise SpecError(f"unknown activation '{name}'; expected one of {', '.join(table)}")
    return table[name]


def _import(target: str) -> Any:
    """Resolve ``"package.module:Name"``. Imports and so runs code: a spec read from a file
    reaches here only after :func:`fastserve.trust.check_code` accepted ``target`` while the
    spec was loaded (a spec built in Python is the user's own code)."""
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise SpecError(f"'{target}' is not of the form 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"cannot import module '{mod_name}' (from '{target}'): {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


# --- the registry ------------------------------------------------------------------------------

register("embedding", required=("num_embeddings", "embedding_dim"),
         doc="token ids (batch, seq) int64 -> (batch, seq, dim)")(
    lambda num_embeddings, embedding_dim: nn.Embedding(num_embeddings, embedding_dim))
register("positional_embedding", required=("max_positions", "embedding_dim"),
         doc="(batch, seq, dim) + learned positions[:seq]")(PositionalEmbedding)
register("linear", required=("in_features", "out_features"), optional={"bias": True})(
    lambda in_features, out_features, bias: nn.Linear(in_features, out_features, bias=bias))
register("layer_norm", required=("dim",), optional={"eps": 1e-5})(
    lambda dim, eps: nn.LayerNorm(dim, eps=eps))
register("rms_norm", required=("dim",), optional={"eps": 1e-6})(
    lambda dim, eps: nn.RMSNorm(dim, eps=eps))
register("gelu", optional={"approximate": "none"})(
    lambda approximate: nn.GELU(approximate=approximate))
register("relu")(lambda: nn.ReLU())
register("silu")(lambda: nn.SiLU())
register("softmax", optional={"dim": -1})(lambda dim: nn.Softmax(dim=dim))
register("dropout", optional={"p": 0.0}, doc="identity at inference")(lambda p: nn.Identity())
register("identity")(lambda: nn.Identity())
register("attention", required=("d_model", "n_heads"), optional={"bias": True, "causal": True},
         doc="multi-head (causal) self-attention, (batch, seq, d_model)")(CausalSelfAttention)
register("mlp", required=("d_model",),
         optional={"d_ff": None, "activation": "gelu", "bias": True})(MLP)
register("transformer_block", required=("d_model", "n_heads"),
         optional={"d_ff": None, "activation": "gelu", "eps": 1e-5, "bias": True})(TransformerBlock)
register("llama_block", required=("d_model", "n_heads"),
         optional={"n_kv_heads": None, "d_ff": None, "eps": 1e-6, "rope_theta": 10000.0},
         doc="Llama decoder layer: RMSNorm, rotary grouped-query attention, SwiGLU")(LlamaBlock)
register("lm_head", required=("d_model", "vocab_size"), optional={"bias": False, "tie": None},
         doc="logits; 'tie: <node id>' shares that embedding node's weight")(LMHead)
register("conv2d", required=("in_channels", "out_channels", "kernel_size"),
         optional={"stride": 1, "padding": 0, "bias": True})(
    lambda in_channels, out_channels, kernel_size, stride, padding, bias: nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias))
register("max_pool2d", required=("kernel_size",), optional={"stride": None})(
    lambda kernel_size, stride: nn.MaxPool2d(kernel_size, stride))
register("avg_pool2d", required=("kernel_size",), optional={"stride": None})(
    lambda kernel_size, stride: nn.AvgPool2d(kernel_size, stride))
register("upsample", optional={"scale_factor": 2, "mode": "nearest"})(
    lambda scale_factor, mode: nn.Upsample(scale_factor=scale_factor, mode=mode))
register("add", inputs=(2, None))(lambda: Lambda(_sum, "add"))
register("mul", inputs=(2, None))(lambda: Lambda(_product, "mul"))
register("concat", inputs=(2, None), optional={"dim": -1})(
    lambda dim: Lambda(lambda *xs: torch.cat(xs, dim=dim), f"concat(dim={dim})"))
register("split", optional={"dim": -1, "sizes": None, "chunks": None},
         doc="one input, several outputs: 'sizes: [a, b]' or 'chunks: n'")(Split)
register("reshape", required=("shape",), doc="batch-preserving: (batch, *shape)")(Reshape)
register("flatten", doc="(batch, ...) -> (batch, -1)")(lambda: Reshape([-1]))
register("module", required=("target",), optional={"kwargs": {}}, inputs=(1, None),
         doc="a user's nn.Module class given as 'package.module:Name'")(
    lambda target, kwargs: _user_module(target, kwargs))


def _sum(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _product(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


def _user_module(target: str, kwargs: dict[str, Any]) -> nn.Module:
    cls = _import(target)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SpecError(f"'{target}' is not a torch.nn.Module subclass")
    return cls(**kwargs)
