"""Plausible porting bugs that touch only the reduced-precision path: in float32 and float64 each
one computes exactly what the correct code does, so only a bfloat16 check can see it.

Each bug is a context manager that puts the bug into ONE twin (a port is wrong on one side) and
restores the twin on exit; test_sabotage.py runs each against the checks.

Measured on the 2-core CPU (lesson block, 1 and 4 heads, fused and math attention, both directions):
none of them failed a twin-vs-twin bfloat16 forward row or an attn_fused_vs_math row, except
"LayerNorm statistics in bfloat16 (Flax)" in 2 of 8 forward rows, and no bf16 loss was compared at
all. The one-twin rows against float64 (harness.bf16_sublayer_check, harness.loss_check) catch all
but the softmax bugs: with the probabilities rounded to bfloat16 either way, a bfloat16 softmax
moved the attention output's error from 0.52 to 0.57 ulps in torch at T = 64, under the output's
own rounding. harness.softmax_check reads the probabilities themselves (exact scores, v the
identity): 1.92 ulps in both twins against 0.4995 for the correct code (bound 0.51).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from unittest import mock

BF16_BUGS: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {}
# Bugs in the Llama block's own layers (RMSNorm, rotary angles): seen through llama_harness.LLAMA_BLOCK
LLAMA_BF16_BUGS: dict[str, tuple[str, Callable[[], contextlib.AbstractContextManager]]] = {}


def _bug(name: str, framework: str, registry: dict = BF16_BUGS):
    def register(fn):
        registry[name] = (framework, contextlib.contextmanager(fn))
        return fn

    return register


# ----------------------------------------------------------------------------------------- softmax


@_bug("softmax in bfloat16 (torch math path)", "torch")
def _torch_softmax_bf16() -> Iterator[None]:
    """exp, sum and divide in the scores' dtype instead of in at least float32."""
    import torch

    import torch_impl.block as tb

    def math_attention(self, q, k, v, mask=None):  # the real method's signature, mask included
        T, S = q.shape[-2], k.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        return self.attn_dropout(e / e.sum(-1, keepdim=True)) @ v

    with mock.patch.object(tb.CausalSelfAttention, "math_attention", math_attention):
        yield


@_bug("softmax in bfloat16 (Flax math path)", "jax")
def _flax_softmax_bf16() -> Iterator[None]:
    import jax.numpy as jnp

    import jax_impl.block as jb

    def math_attention(self, q, k, v, mask=None):  # the real method's signature, mask included
        T, S = q.shape[1], k.shape[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        if mask is None:
            mask = jnp.tril(jnp.ones((T, S), dtype=bool))
        scores = jnp.where(mask, scores, -jnp.inf)
        e = jnp.exp(scores - scores.max(-1, keepdims=True))
        return jnp.einsum("bhqk,bkhd->bqhd", self.attn_dropout(e / e.sum(-1, keepdims=True)), v)

    with mock.patch.object(jb.CausalSelfAttention, "math_attention", math_attention):
        yield


# --------------------------------------------------------------------------------------- LayerNorm


def _torch_layer_norm(statistics: str):
    """torch_impl.block.layer_norm replaced by a hand-written LayerNorm (same parameters) whose
    statistics are computed in the input's dtype ("input"), or whose squared deviations are cast
    to it before the mean ("cast-before-mean")."""
    import torch
    from torch import nn

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            if statistics == "input":
                mean = x.mean(-1, keepdim=True)
                var = ((x - mean) ** 2).mean(-1, keepdim=True)
                y = (x - mean) / torch.sqrt(var + self.eps)
            else:
                xf = x.float()
                mean = xf.mean(-1, keepdim=True)
                var = ((xf - mean) ** 2).to(x.dtype).mean(-1, keepdim=True).float()
                y = ((xf - mean) / torch.sqrt(var + self.eps)).to(x.dtype)
            return y * self.weight + self.bias

    return lambda cfg: LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)


def _flax_layer_norm(statistics: str):
    import jax.numpy as jnp
    from flax import nnx

    class LayerNorm(nnx.LayerNorm):
        def __call__(self, x, *, mask=None):
            if statistics == "input":
                mean = x.mean(-1, keepdims=True)
                var = ((x - mean) ** 2).mean(-1, keepdims=True)
                y = (x - mean) / jnp.sqrt(var + self.epsilon)
            else:
                xf = x.astype(jnp.float32)
                mean = xf.mean(-1, keepdims=True)
                var = ((xf - mean) ** 2).astype(x.dtype).mean(-1, keepdims=True).astype(jnp.float32)
                y = ((xf - mean) / jnp.sqrt(var + self.epsilon)).astype(x.dtype)
            return y * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)

    def layer_norm(cfg, *, param_dtype, rngs):
        return LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, use_fast_variance=False, use_bias=cfg.bias,
                         param_dtype=param_dtype, rngs=rngs)  # fmt: skip

    return layer_norm


@_bug("LayerNorm statistics in bfloat16 (torch)", "torch")
def _torch_ln_stats_bf16() -> Iterator[None]:
    import torch_impl.block as tb

    with mock.patch.object(tb, "layer_norm", _torch_layer_norm("input")):
        yield


@_bug("LayerNorm statistics in bfloat16 (Flax)", "jax")
def _flax_ln_stats_bf16() -> Iterator[None]:
    import jax_impl.block as jb

    with mock.patch.object(jb, "layer_norm", _flax_layer_norm("input")):
        yield


@_bug("LayerNorm squared deviations cast to bfloat16 before the mean (Flax)", "jax")
def _flax_ln_cast_before_mean() -> Iterator[None]:
    import jax_impl.block as jb

    with mock.patch.object(jb, "layer_norm", _flax_layer_norm("cast-before-mean")):
        yield


# -------------------------------------------------------------------------------------------- loss


@_bug("loss in bfloat16 (torch)", "torch")
def _torch_loss_bf16() -> Iterator[None]:
    import torch.nn.functional as F

    import torch_impl.gpt as tg

    def loss_fn(logits, targets):  # no promotion to float32
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    with mock.patch.object(tg, "loss_fn", loss_fn):
        yield


@_bug("loss in bfloat16 (Flax)", "jax")
def _flax_loss_bf16() -> Iterator[None]:
    import optax

    import jax_impl.gpt as jg

    def loss_fn(logits, targets):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    with mock.patch.object(jg, "loss_fn", loss_fn):
        yield


@_bug("per-token losses cast to bfloat16 before the mean (Flax)", "jax")
def _flax_loss_cast_before_mean() -> Iterator[None]:
    import jax.numpy as jnp
    import optax

    import jax_impl.gpt as jg

    def loss_fn(logits, targets):
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        return per_token.astype(logits.dtype).mean()

    with mock.patch.object(jg, "loss_fn", loss_fn):
        yield


# ------------------------------------------------------------------------------ the Llama block


@_bug("RMSNorm statistic in bfloat16 (torch)", "torch", LLAMA_BF16_BUGS)
def _torch_rmsnorm_bf16() -> Iterator[None]:
    """mean(x^2) and rsqrt in the input's dtype: what torch.nn.RMSNorm does with a bfloat16 input,
    and what transformers' LlamaRMSNorm upcasts to float32 to avoid."""
    import torch

    import torch_impl.block as tb

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    with mock.patch.object(tb.RMSNorm, "forward", forward):
        yield


@_bug("RMSNorm statistic in bfloat16 (Flax)", "jax", LLAMA_BF16_BUGS)
def _flax_rmsnorm_bf16() -> Iterator[None]:
    import jax
    import jax.numpy as jnp

    import jax_impl.block as jb

    def __call__(self, x):  # noqa: N807
        return self.scale[...] * (x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps))

    with mock.patch.object(jb.RMSNorm, "__call__", __call__):
        yield


@_bug("rotary angles in bfloat16 (torch)", "torch", LLAMA_BF16_BUGS)
def _torch_rope_angles_bf16() -> Iterator[None]:
    """The frequencies and position x frequency products in the compute dtype instead of float32."""
    import torch

    import torch_impl.block as tb

    def rope_angles(pos, cfg, dtype):
        hs = cfg.d_head
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=dtype, device=pos.device) / hs)
        angles = pos.to(dtype)[..., None] * inv_freq
        return angles.cos(), angles.sin()

    with mock.patch.object(tb, "rope_angles", rope_angles):
        yield


@_bug("rotary angles in bfloat16 (Flax)", "jax", LLAMA_BF16_BUGS)
def _flax_rope_angles_bf16() -> Iterator[None]:
    import jax.numpy as jnp

    import jax_impl.block as jb

    def rope_angles(pos, cfg, dtype):
        hs = cfg.d_head
        inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, hs, 2, dtype=dtype) / hs)
        angles = pos.astype(dtype)[..., None] * inv_freq
        return jnp.cos(angles), jnp.sin(angles)

    with mock.patch.object(jb, "rope_angles", rope_angles):
        yield
