"""Pitfall checks. Attention: the score scale, what a boolean mask means, and the softmax's dtype
under bfloat16."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from twin_parity import harness as h
from twin_parity.pitfalls.common import (
    CFG,
    Measurement,
    flax_block,
    isolated,
    max_abs,
    torch_block,
    twin_error,
)


def check_attention_scale() -> Measurement:
    cfg = dataclasses.replace(CFG, attn_impl="math")
    wrong = 1.0 / math.sqrt(cfg.d_model)  # 1/sqrt(128) instead of 1/sqrt(d_head) = 1/sqrt(32)

    def flax_with_wrong_scale(cfg):
        model = flax_block(cfg)
        model.attn.scale = wrong
        return model

    ignored = twin_error(cfg, build_flax=flax_with_wrong_scale)
    pinned = twin_error(cfg)
    return Measurement(ignored, pinned, "max abs error of the block output (float32, math attention path)")


def _causal_attention_f64(q, k, v) -> np.ndarray:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(hs)
    scores = np.where(np.tri(T, dtype=bool), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


def check_bool_mask_meaning() -> Measurement:
    import torch
    import torch.nn.functional as F

    B, T, C = h.LESSON_SHAPE
    nh = CFG.n_heads
    shape = (B, nh, T, C // nh)
    q, k, v = (h.make_input(shape, "float32", seed) for seed in (1, 2, 3))
    truth = _causal_attention_f64(q, k, v)
    qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))
    mha_mask = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # nn.MultiheadAttention: True = masked
    with isolated():
        wrong = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mha_mask).numpy()
        right = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).numpy()
    ignored = max_abs(wrong, truth)  # NaN if a fully masked row came out NaN: kept, not hidden
    nan = " (NaN rows)" if np.isnan(wrong).any() else ""
    return Measurement(
        ignored, max_abs(right, truth),
        f"max abs error of SDPA vs float64 causal attention, random (B, nh, T, hs) = {shape}, "
        f"float32{nan}",
    )


def check_softmax_dtype_bf16() -> Measurement:
    import torch

    B, T, C = h.LESSON_SHAPE
    nh, hs = CFG.n_heads, CFG.d_head
    x = h.make_input(h.LESSON_SHAPE, "bfloat16")
    with isolated(), torch.no_grad():
        t = torch_block(CFG, "bfloat16")
        attn = t.attn
        ln_1 = t.ln_1(torch.from_numpy(x.view(np.int16)).view(torch.bfloat16))
        q, k = (getattr(attn, f"{p}_proj")(ln_1).view(B, T, nh, hs).transpose(1, 2) for p in "qk")
        # the probabilities themselves: the project's math_attention with v = I returns them exactly
        eye = torch.eye(T, dtype=torch.bfloat16).expand(B, nh, T, T)
        pinned = attn.math_attention(q, k, eye)  # softmax in float32, rounded once to bfloat16
        scores = (q @ k.transpose(-2, -1)) * attn.scale  # bfloat16, as the twin computes them
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        e = torch.exp(scores - scores.amax(-1, keepdim=True))  # bfloat16 exp, sum and divide
        ignored = e / e.sum(-1, keepdim=True)
        truth = torch.softmax(scores.double(), -1)  # float64 softmax of the same bfloat16 scores
    return Measurement(
        max_abs(ignored.double(), truth), max_abs(pinned.double(), truth),
        "max abs error of the attention probabilities (bfloat16 block, torch math path) vs a float64 "
        "softmax of the same scores",
    )
