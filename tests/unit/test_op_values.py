"""Every op of the library computes the right values: each built module is checked against an
independent computation (elementary tensor math on the module's own parameters) at several shapes,
with default and non-default arguments, in float32, float64 and bfloat16."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from fastserve.graph.ops import OPS, build_module

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


# --- independent references ---------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    ref: Callable[..., Any]  # (module, args, *inputs) -> expected tensor, or tuple for split
    exact: bool  # same arithmetic as the op: torch.equal in the op's own dtype
    bf16_tol: float  # rtol = atol for bfloat16; float32/float64 use assert_close defaults


CHECKS: dict[str, Check] = {}


def check(op: str, exact: bool = False, bf16_tol: float = 2e-2):
    def deco(fn):
        CHECKS[op] = Check(fn, exact, bf16_tol)
        return fn

    return deco


def _param(t: torch.Tensor | None, *shape: int) -> torch.Tensor:
    # References read the module's weights, so they must also pin the weights' shapes: otherwise
    # an op that ignored an argument (d_ff, bias, ...) would be checked against itself.
    assert t is not None and tuple(t.shape) == shape, (None if t is None else t.shape, shape)
    return t


def _bias(t: torch.Tensor | None, n: int, present: bool) -> torch.Tensor | None:
    if not present:
        assert t is None
        return None
    return _param(t, n)


def _linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def _gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def _silu(x):
    return x / (1 + torch.exp(-x))


ACTIVATIONS = {"gelu": _gelu_erf, "gelu_tanh": _gelu_tanh, "relu": _relu, "silu": _silu}


def _softmax(x, dim):
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as layer norm defines it
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _attention(m, x, n_heads, bias, causal):
    b, s, d = x.shape
    hd = d // n_heads
    qkv = _linear(x, _param(m.qkv.weight, 3 * d, d), _bias(m.qkv.bias, 3 * d, bias))
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, s, n_heads, hd).permute(0, 2, 1, 3)
               for i in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (batch, heads, query, key)
    if causal:
        pos = torch.arange(s)
        allowed = pos[None, :] <= pos[:, None]  # key position <= query position
        scores = scores.masked_fill(~allowed, float("-inf"))
    y = (_softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(b, s, d)
    return _linear(y, _param(m.proj.weight, d, d), _bias(m.proj.bias, d, bias))


def _mlp(m, x, d_model, d_ff, activation, bias):
    d_ff = d_ff or 4 * d_model
    h = _linear(x, _param(m.fc.weight, d_ff, d_model), _bias(m.fc.bias, d_ff, bias))
    h = ACTIVATIONS[activation](h)
    return _linear(h, _param(m.proj.weight, d_model, d_ff), _bias(m.proj.bias, d_model, bias))


def _windows(x, k, stride):
    """(n, c, h, w) -> (n, c, oh, ow, k, k): every pooling/conv window, remainder dropped."""
    return x.unfold(2, k, stride).unfold(3, k, stride)


def _lerp_axis(x, dim, scale):
    """Linear upsampling along one axis, half-pixel centres (align_corners=False)."""
    n = x.shape[dim]
    src = ((torch.arange(n * scale, dtype=torch.float64) + 0.5) / scale - 0.5).clamp(min=0)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp(max=n - 1)
    t = (src - i0).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    t = t.view(shape)
    return x.index_select(dim, i0) * (1 - t) + x.index_select(dim, i1) * t


@check("embedding", exact=True)
def ref_embedding(m, a, ids):
    return _param(m.weight, a["num_embeddings"], a["embedding_dim"])[ids]


@check("positional_embedding", exact=True)
def ref_positional_embedding(m, a, x):
    w = _param(m.weight, a["max_positions"], a["embedding_dim"])
    return x + w[torch.arange(x.shape[1])]


@check("linear")
def ref_linear(m, a, x):
    n_in, n_out = a["in_features"], a["out_features"]
    return _linear(x, _param(m.weight, n_out, n_in), _bias(m.bias, n_out, a.get("bias", True)))


@check("layer_norm")
def ref_layer_norm(m, a, x):
    d = a["dim"]
    return _layer_norm(x, _param(m.weight, d), _param(m.bias, d), a.get("eps", 1e-5))


@check("rms_norm")
def ref_rms_norm(m, a, x):
    eps = a.get("eps", 1e-6)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * _param(m.weight, a["dim"])


@check("gelu")
def ref_gelu(m, a, x):
    return {"none": _gelu_erf, "tanh": _gelu_tanh}[a.get("approximate", "none")](x)


@check("relu", exact=True)
def ref_relu(m, a, x):
    return _relu(x)


@check("silu")
def ref_silu(m, a, x):
    return _silu(x)


@check("softmax")
def ref_softmax(m, a, x):
    return _softmax(x, a.get("dim", -1))


@check("dropout", exact=True)
def ref_dropout(m, a, x):
    return x  # inference: no units dropped, no rescaling


@check("identity", exact=True)
def ref_identity(m, a, x):
    return x


@check("attention", bf16_tol=3e-2)
def ref_attention(m, a, x):
    return _attention(m, x, a["n_heads"], a.get("bias", True), a.get("causal", True))


@check("mlp", bf16_tol=3e-2)
def ref_mlp(m, a, x):
    return _mlp(m, x, a["d_model"], a.get("d_ff"), a.get("activation", "gelu"), a.get("bias", True))


@check("transformer_block", bf16_tol=3e-2)
def ref_transformer_block(m, a, x):
    d, eps, bias = a["d_model"], a.get("eps", 1e-5), a.get("bias", True)
    ln1 = _layer_norm(x, _param(m.ln1.weight, d), _param(m.ln1.bias, d), eps)
    x = x + _attention(m.attn, ln1, a["n_heads"], bias, causal=True)
    ln2 = _layer_norm(x, _param(m.ln2.weight, d), _param(m.ln2.bias, d), eps)
    return x + _mlp(m.mlp, ln2, d, a.get("d_ff"), a.get("activation", "gelu"), bias)


@check("llama_block", bf16_tol=5e-2)
def ref_llama_block(m, a, x):
    """Written from the Llama paper's description, not from the op: rotary embedding as a
    complex rotation of (first half, second half) pairs, each query head reading key/value head
    h // group, an explicit causal softmax."""
    d, h = a["d_model"], a["n_heads"]
    kv, eps, theta = a.get("n_kv_heads") or h, a.get("eps", 1e-6), a.get("rope_theta", 1e4)
    d_ff, hd = a.get("d_ff") or 4 * d, d // h
    b, s, _ = x.shape

    def rms(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * _param(w, d)

    def rope(t, heads):  # (b, s, heads * hd) -> (b, heads, s, hd), rotated by position
        t = t.reshape(b, s, heads, hd).permute(0, 2, 1, 3)
        angle = torch.arange(s, dtype=torch.float64)[:, None] * \
            theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)[None, :]
        z = torch.complex(t[..., :hd // 2].double(), t[..., hd // 2:].double()) * \
            torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], -1).to(t.dtype)

    att = m.attn
    y = rms(x, m.ln1.weight)
    q = rope(_linear(y, _param(att.q.weight, d, d)), h)
    k = rope(_linear(y, _param(att.k.weight, kv * hd, d)), kv)
    v = _linear(y, _param(att.v.weight, kv * hd, d)).reshape(b, s, kv, hd).permute(0, 2, 1, 3)
    heads = []
    allowed = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    for i in range(h):
        j = i // (h // kv)
        scores = (q[:, i] @ k[:, j].transpose(-1, -2) / math.sqrt(hd)).masked_fill(
            ~allowed, float("-inf"))
        heads.append(_softmax(scores, -1) @ v[:, j])
    attn = torch.stack(heads, 1).permute(0, 2, 1, 3).reshape(b, s, d)
    x = x + _linear(attn, _param(att.o.weight, d, d))
    y = rms(x, m.ln2.weight)
    mlp = m.mlp
    gated = _silu(_linear(y, _param(mlp.gate.weight, d_ff, d))) * \
        _linear(y, _param(mlp.up.weight, d_ff, d))
    return x + _linear(gated, _param(mlp.down.weight, d, d_ff))


@check("lm_head")
def ref_lm_head(m, a, x):
    d, vocab = a["d_model"], a["vocab_size"]
    return _linear(x, _param(m.weight, vocab, d), _bias(m.bias, vocab, a.get("bias", False)))


@check("conv2d")
def ref_conv2d(m, a, x):
    c_in, c_out, k = a["in_channels"], a["out_channels"], a["kernel_size"]
    stride, pad = a.get("stride", 1), a.get("padding", 0)
    w = _param(m.weight, c_out, c_in, k, k)
    b = _bias(m.bias, c_out, a.get("bias", True))
    n, _, h, wd = x.shape
    padded = x.new_zeros(n, c_in, h + 2 * pad, wd + 2 * pad)
    padded[:, :, pad:pad + h, pad:pad + wd] = x
    patches = _windows(padded, k, stride)  # (n, c_in, oh, ow, k, k)
    oh, ow = patches.shape[2:4]
    cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(n, oh, ow, c_in * k * k)
    return _linear(cols, w.reshape(c_out, -1), b).permute(0, 3, 1, 2)


@check("max_pool2d", exact=True)
def ref_max_pool2d(m, a, x):
    k = a["kernel_size"]
    stride = a.get("stride") or k
    if stride == k:  # non-overlapping: crop, then one reshape exposes the windows
        n, c, h, w = x.shape
        oh, ow = h // k, w // k
        return x[:, :, :oh * k, :ow * k].reshape(n, c, oh, k, ow, k).amax((3, 5))
    return _windows(x, k, stride).amax((-2, -1))


@check("avg_pool2d")
def ref_avg_pool2d(m, a, x):
    k = a["kernel_size"]
    return _windows(x, k, a.get("stride") or k).mean((-2, -1))


@check("upsample")
def ref_upsample(m, a, x):
    s = a.get("scale_factor", 2)
    if a.get("mode", "nearest") == "nearest":
        return x.repeat_interleave(s, 2).repeat_interleave(s, 3)
    return _lerp_axis(_lerp_axis(x, 2, s), 3, s)


@check("add", exact=True)
def ref_add(m, a, *xs):
    return sum(xs[1:], xs[0])


@check("mul", exact=True)
def ref_mul(m, a, *xs):
    return math.prod(xs[1:], start=xs[0])


@check("concat", exact=True)
def ref_concat(m, a, *xs):
    dim = a.get("dim", -1) % xs[0].dim()
    shape = list(xs[0].shape)
    shape[dim] = sum(x.shape[dim] for x in xs)
    out = xs[0].new_empty(shape)
    start = 0
    for x in xs:
        out.narrow(dim, start, x.shape[dim]).copy_(x)
        start += x.shape[dim]
    return out


@check("split", exact=True)
def ref_split(m, a, x):
    dim = a.get("dim", -1) % x.dim()
    n = x.shape[dim]
    if a.get("sizes") is not None:
        sizes = list(a["sizes"])
    else:  # exactly `chunks` pieces, the first n % chunks of them one longer
        k = a["chunks"]
        sizes = [n // k + (i < n % k) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(x.narrow(dim, s, z) for s, z in zip(starts, sizes))


@check("reshape", exact=True)
def ref_reshape(m, a, x):
    shape = list(a["shape"])
    per_sample = math.prod(x.shape[1:])
    if -1 in shape:
        shape[shape.index(-1)] = per_sample // -math.prod(shape)
    return x.contiguous().view(x.shape[0], *shape)


@check("flatten", exact=True)
def ref_flatten(m, a, x):
    return x.contiguous().view(x.shape[0], math.prod(x.shape[1:]))


# --- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    args: dict[str, Any]
    shapes: list[tuple[int, ...]]  # one per input tensor
    scale: float = 1.0  # of the random inputs
    ids: int = 0  # > 0: the input is token ids below this bound, not floats

    @property
    def id(self) -> str:
        def fmt(v):
            return "[" + ",".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v)

        args = ",".join(f"{k}={fmt(v)}" for k, v in self.args.items())
        shapes = "+".join("x".join(map(str, s)) or "scalar" for s in self.shapes)
        return f"{self.op}({args})-{shapes}" + (f"-scale{self.scale:g}" if self.scale != 1 else "")


EMB = {"num_embeddings": 11, "embedding_dim": 8}
ATT = {"d_model": 16, "n_heads": 4}
BLOCK = {"d_model": 12, "n_heads": 3}
HEAD = {"d_model": 8, "vocab_size": 13}
CONV = {"in_channels": 3, "out_channels": 5, "kernel_size": 3}

CASES = [
    Case("embedding", EMB, [(1, 1)], ids=11),
    Case("embedding", EMB, [(3, 5)], ids=11),
    Case("embedding", {"num_embeddings": 5, "embedding_dim": 3}, [(2, 7)], ids=5),
    Case("positional_embedding", {"max_positions": 9, "embedding_dim": 8}, [(1, 1, 8)]),
    Case("positional_embedding", {"max_positions": 9, "embedding_dim": 8}, [(2, 9, 8)]),
    Case("positional_embedding", {"max_positions": 9, "embedding_dim": 8}, [(3, 5, 8)]),
    Case("linear", {"in_features": 7, "out_features": 5}, [(1, 7)]),
    Case("linear", {"in_features": 7, "out_features": 5}, [(2, 3, 7)]),
    Case("linear", {"in_features": 4, "out_features": 3, "bias": False}, [(5, 4)]),
    Case("linear", {"in_features": 4, "out_features": 3, "bias": False}, [(1, 1, 4)]),
    Case("layer_norm", {"dim": 7}, [(1, 7)]),
    Case("layer_norm", {"dim": 7}, [(2, 3, 7)]),
    Case("layer_norm", {"dim": 7}, [(3, 7)], scale=1e-2),  # variance ~ eps: eps matters
    Case("layer_norm", {"dim": 16, "eps": 0.1}, [(2, 5, 16)]),
    Case("rms_norm", {"dim": 7}, [(1, 7)]),
    Case("rms_norm", {"dim": 7}, [(2, 3, 7)]),
    Case("rms_norm", {"dim": 7}, [(3, 7)], scale=1e-3),  # mean square ~ eps: eps matters
    Case("rms_norm", {"dim": 5, "eps": 0.1}, [(2, 3, 5)]),
    Case("gelu", {}, [(1, 1)]),
    Case("gelu", {}, [(3, 5, 7)], scale=3),
    Case("gelu", {"approximate": "none"}, [(2, 9)], scale=3),
    Case("gelu", {"approximate": "tanh"}, [(1, 1)]),
    Case("gelu", {"approximate": "tanh"}, [(3, 5, 7)], scale=3),
    Case("relu", {}, [(1, 1)]),
    Case("relu", {}, [(3, 5, 7)]),
    Case("silu", {}, [(1, 1)]),
    Case("silu", {}, [(3, 5, 7)], scale=3),
    Case("softmax", {}, [(1, 7)], scale=3),
    Case("softmax", {}, [(2, 3, 5)], scale=3),
    Case("softmax", {"dim": 0}, [(3, 4)], scale=3),
    Case("softmax", {"dim": 0}, [(2, 3, 5)], scale=3),
    Case("softmax", {"dim": 1}, [(2, 3, 5)], scale=3),
    Case("softmax", {"dim": 1}, [(1, 1, 1)]),
    Case("dropout", {}, [(1, 1)]),
    Case("dropout", {"p": 0.5}, [(2, 3, 5)]),
    Case("identity", {}, [(1, 1)]),
    Case("identity", {}, [(2, 3, 5)]),
    Case("attention", ATT, [(1, 1, 16)]),
    Case("attention", ATT, [(2, 5, 16)]),
    Case("attention", ATT, [(1, 7, 16)]),
    Case("attention", {"d_model": 15, "n_heads": 3}, [(2, 4, 15)]),
    Case("attention", {"d_model": 6, "n_heads": 1}, [(3, 5, 6)]),
    Case("attention", {**ATT, "causal": False}, [(1, 1, 16)]),
    Case("attention", {**ATT, "causal": False}, [(2, 5, 16)]),
    Case("attention", {"d_model": 12, "n_heads": 2, "bias": False}, [(2, 3, 12)]),
    Case("attention", {"d_model": 9, "n_heads": 3, "bias": False, "causal": False}, [(1, 6, 9)]),
    Case("mlp", {"d_model": 8}, [(1, 8)]),
    Case("mlp", {"d_model": 8}, [(2, 3, 8)]),
    *(Case("mlp", {"d_model": 8, "d_ff": 12, "activation": act}, [(2, 3, 8)], scale=2)
      for act in ("gelu", "gelu_tanh", "relu", "silu")),
    Case("mlp", {"d_model": 5, "d_ff": 7, "bias": False}, [(1, 1, 5)]),
    Case("mlp", {"d_model": 5, "d_ff": 7, "bias": False}, [(3, 5)]),
    Case("transformer_block", BLOCK, [(1, 1, 12)]),
    Case("transformer_block", BLOCK, [(2, 6, 12)]),
    Case("transformer_block", {**BLOCK, "d_ff": 20, "activation": "relu", "eps": 1e-2,
                               "bias": False}, [(2, 5, 12)]),
    Case("transformer_block", {"d_model": 8, "n_heads": 2, "activation": "gelu_tanh"},
         [(1, 4, 8)]),
    Case("transformer_block", {"d_model": 8, "n_heads": 2, "activation": "silu"}, [(3, 3, 8)]),
    Case("llama_block", {"d_model": 16, "n_heads": 4, "n_kv_heads": 2}, [(2, 5, 16)]),
    Case("llama_block", {"d_model": 16, "n_heads": 4}, [(1, 1, 16)]),
    Case("llama_block", {"d_model": 12, "n_heads": 2, "n_kv_heads": 1, "d_ff": 20,
                         "eps": 1e-3, "rope_theta": 500.0}, [(3, 7, 12)], scale=2),
    Case("lm_head", HEAD, [(1, 8)]),
    Case("lm_head", HEAD, [(2, 3, 8)]),
    Case("lm_head", {**HEAD, "bias": True}, [(2, 3, 8)]),
    Case("lm_head", {**HEAD, "tie": "wte"}, [(2, 3, 8)]),
    Case("lm_head", {**HEAD, "tie": "wte", "bias": True}, [(1, 1, 8)]),
    Case("conv2d", CONV, [(1, 3, 7, 7)]),
    Case("conv2d", CONV, [(2, 3, 8, 6)]),
    Case("conv2d", {**CONV, "stride": 2, "padding": 1, "bias": False}, [(1, 3, 7, 7)]),
    Case("conv2d", {**CONV, "stride": 2, "padding": 1, "bias": False}, [(2, 3, 8, 8)]),
    Case("conv2d", {"in_channels": 2, "out_channels": 3, "kernel_size": 1}, [(2, 2, 3, 5)]),
    Case("conv2d", {"in_channels": 3, "out_channels": 2, "kernel_size": 2, "stride": 3,
                    "padding": 2}, [(1, 3, 9, 7)]),
    *(c for op in ("max_pool2d", "avg_pool2d") for c in (
        Case(op, {"kernel_size": 2}, [(1, 2, 8, 8)]),
        Case(op, {"kernel_size": 2}, [(2, 3, 7, 9)]),
        Case(op, {"kernel_size": 3, "stride": 2}, [(2, 3, 9, 8)]),
        Case(op, {"kernel_size": 2, "stride": 3}, [(1, 2, 8, 7)]),
        Case(op, {"kernel_size": 3, "stride": 1}, [(1, 1, 5, 5)]),
    )),
    Case("upsample", {}, [(1, 2, 3, 3)]),
    Case("upsample", {}, [(2, 3, 4, 5)]),
    Case("upsample", {"scale_factor": 3}, [(1, 1, 2, 3)]),
    Case("upsample", {"mode": "bilinear"}, [(2, 3, 4, 5)]),
    Case("upsample", {"mode": "bilinear"}, [(1, 1, 1, 3)]),
    Case("upsample", {"scale_factor": 3, "mode": "bilinear"}, [(1, 2, 3, 4)]),
    *(c for op in ("add", "mul") for c in (
        Case(op, {}, [(1, 1), (1, 1)]),
        Case(op, {}, [(2, 3, 5), (2, 3, 5)]),
        Case(op, {}, [(2, 3, 5), (2, 3, 5), (2, 3, 5)]),
        Case(op, {}, [(2, 1, 5), (2, 3, 1), (5,)]),  # broadcasting
    )),
    Case("concat", {}, [(1, 2), (1, 3)]),
    Case("concat", {}, [(2, 3, 4), (2, 3, 1), (2, 3, 5)]),
    Case("concat", {"dim": 0}, [(1, 3), (2, 3)]),
    Case("concat", {"dim": 1}, [(2, 1, 4), (2, 3, 4)]),
    Case("concat", {"dim": 1}, [(1, 2, 3), (1, 1, 3), (1, 4, 3)]),
    Case("split", {"sizes": [2, 3]}, [(1, 5)]),
    Case("split", {"sizes": [2, 3]}, [(2, 3, 5)]),
    Case("split", {"dim": 1, "sizes": [1, 1, 3]}, [(2, 5, 4)]),
    Case("split", {"chunks": 3}, [(2, 7)]),
    Case("split", {"chunks": 4}, [(2, 6)]),  # torch.chunk would give 3 pieces of 2
    Case("split", {"chunks": 2}, [(1, 4)]),
    Case("split", {"dim": 0, "chunks": 2}, [(4, 3)]),
    Case("split", {"dim": 1, "chunks": 2}, [(3, 5, 2)]),
    Case("reshape", {"shape": [-1, 4]}, [(2, 12)]),
    Case("reshape", {"shape": [-1, 4]}, [(1, 3, 4)]),
    Case("reshape", {"shape": [3, 2, 2]}, [(1, 12)]),
    Case("reshape", {"shape": [3, -1, 2]}, [(3, 2, 6)]),
    Case("reshape", {"shape": [12]}, [(2, 3, 4)]),
    Case("flatten", {}, [(1, 2, 3, 4)]),
    Case("flatten", {}, [(3, 5)]),
    Case("flatten", {}, [(2, 1)]),
]


# --- the tests -----------------------------------------------------------------------------------


def test_every_op_has_a_value_check():
    # "module" builds a user's class (imported from a target string): its values are the user's,
    # and test_graph_ops covers that it is built and run.
    assert set(CHECKS) == set(OPS) - {"module"}
    assert {c.op for c in CASES} == set(CHECKS)


def test_every_optional_argument_is_exercised():
    for op in CHECKS:
        for arg in OPS[op].optional:
            assert any(arg in c.args for c in CASES if c.op == op), (op, arg)


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    # Default inits (layer norm weight 1, bias 0; lm_head bias 0) would hide swapped or
    # dropped parameters, so every parameter gets random values.
    with torch.no_grad():
        for p in module.parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(r / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.5 * r)


def _build(case: Case, dtype: torch.dtype, gen: torch.Generator) -> torch.nn.Module:
    module = build_module(case.op, case.args).to(dtype)
    _randomize(module, gen)
    if case.op == "lm_head" and case.args.get("tie"):
        assert module.weight is None
        emb = build_module("embedding", {"num_embeddings": case.args["vocab_size"],
                                         "embedding_dim": case.args["d_model"]}).to(dtype)
        _randomize(emb, gen)
        module.weight = emb.weight  # what fastserve.graph.module._bind_tied does
        assert module.weight is emb.weight
    return module.eval()


def _inputs(case: Case, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    if case.ids:
        ids = torch.randint(0, case.ids, case.shapes[0], generator=gen)
        ids.view(-1)[-1] = case.ids - 1  # the last row of the table is reachable
        return [ids]
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * case.scale).to(dtype)
            for s in case.shapes]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_value(case: Case, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    module = _build(case, dtype, gen)
    xs = _inputs(case, dtype, gen)
    chk = CHECKS[case.op]
    with torch.no_grad():
        out = module(*xs)
        if chk.exact:
            expected = chk.ref(module, case.args, *xs)
        else:
            # The reference runs in float64 on the very same (already rounded) weights and inputs.
            m64 = copy.deepcopy(module).double()
            x64 = [x.double() for x in xs]
            expected = chk.ref(m64, case.args, *x64).to(dtype)

    if isinstance(expected, tuple):
        assert isinstance(out, tuple)
        assert len(out) == len(expected) == OPS[case.op].n_outputs(case.args)
    else:
        out, expected = (out,), (expected,)
    for got, want in zip(out, expected):
        assert got.dtype == want.dtype and got.shape == want.shape, (got.shape, want.shape)
        if chk.exact:
            assert torch.equal(got, want)
        elif dtype == torch.bfloat16:
            torch.testing.assert_close(got, want, rtol=chk.bf16_tol, atol=chk.bf16_tol)
        else:
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("args", [{}, {"sizes": [1, 2], "chunks": 2}, {"chunks": 0},
                                  {"chunks": 1.5}])
def test_split_needs_exactly_one_of_sizes_and_a_positive_chunk_count(args):
    from fastserve.errors import SpecError

    with pytest.raises(SpecError, match="split"):
        build_module("split", args)
