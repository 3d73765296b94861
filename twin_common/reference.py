"""A third, framework-free implementation of the block in float64 NumPy: the truth that golden
vectors are made from and that low-precision results are judged against.

It reads the weights in the interchange layout (torch state_dict keys, torch layout), so it shares
no code with either twin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from twin_common.config import BlockConfig

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _linear(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ np.asarray(w[name + ".weight"], np.float64).T  # torch layout: (out, in)
    bias = w.get(name + ".bias")
    return y if bias is None else y + np.asarray(bias, np.float64)


def _layer_norm(x: np.ndarray, w: Mapping[str, np.ndarray], name: str, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased, two-pass: what torch computes
    y = (x - mean) / np.sqrt(var + eps) * np.asarray(w[name + ".weight"], np.float64)
    bias = w.get(name + ".bias")
    return y if bias is None else y + np.asarray(bias, np.float64)


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _attention(x: np.ndarray, w: Mapping[str, np.ndarray], cfg: BlockConfig) -> np.ndarray:
    B, T, C = x.shape
    nh, hs = cfg.n_heads, cfg.d_head
    q, k, v = (
        _linear(x, w, f"attn.{p}_proj").reshape(B, T, nh, hs).transpose(0, 2, 1, 3) for p in "qkv"
    )  # (B, nh, T, hs)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)  # (B, nh, T, T)
    scores = np.where(np.tri(T, dtype=bool), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    y = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return _linear(y, w, "attn.out_proj")


def block_forward(
    weights: Mapping[str, np.ndarray], x: np.ndarray, cfg: BlockConfig
) -> dict[str, np.ndarray]:
    """All intermediates of the block (eval mode) in float64, keyed like the twins' intermediates."""
    x = np.asarray(x, np.float64)
    ln_1 = _layer_norm(x, weights, "ln_1", cfg.ln_eps)
    attn = _attention(ln_1, weights, cfg)
    resid_1 = x + attn
    ln_2 = _layer_norm(resid_1, weights, "ln_2", cfg.ln_eps)
    mlp = _linear(_gelu(_linear(ln_2, weights, "mlp.fc_in"), cfg.gelu_approximate), weights, "mlp.fc_out")
    out = resid_1 + mlp
    return dict(ln_1=ln_1, attn=attn, resid_1=resid_1, ln_2=ln_2, mlp=mlp, out=out)


def block_sublayers(
    weights: Mapping[str, np.ndarray], x: np.ndarray, cfg: BlockConfig, inter: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each sublayer in float64, applied to the input that a twin's own run gave that sublayer
    (``inter``: the twin's intermediates). Compared with the twin's output of the same sublayer,
    the error is that sublayer's alone, not the sum of everything before it."""
    x = np.asarray(x, np.float64)
    f64 = {k: np.asarray(v, np.float64) for k, v in inter.items()}
    mlp_in = _linear(f64["ln_2"], weights, "mlp.fc_in")
    return dict(
        ln_1=_layer_norm(x, weights, "ln_1", cfg.ln_eps),
        attn=_attention(f64["ln_1"], weights, cfg),
        resid_1=x + f64["attn"],
        ln_2=_layer_norm(f64["resid_1"], weights, "ln_2", cfg.ln_eps),
        mlp=_linear(_gelu(mlp_in, cfg.gelu_approximate), weights, "mlp.fc_out"),
        out=f64["resid_1"] + f64["mlp"],
    )


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy in float64: the truth for a twin's loss_fn."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1).mean())
