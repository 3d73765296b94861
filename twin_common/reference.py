"""A third, framework-free implementation of the block in float64 NumPy: the truth that golden
vectors are made from and that low-precision results are judged against.

``block_forward`` reads the weights in the interchange layout (torch state_dict keys, torch layout),
so it shares no code with either twin. ``gpt2_forward`` reads a whole GPT-2 in transformers' own
layout (fused ``c_attn``, Conv1D's (in, out) weights) and its hyperparameters from transformers'
own ``config.json`` (``read_gpt2_config``), so it shares no code and no mapped value with the
importer (``weight_conversion.hf_gpt2``) either: it is the independent source that an imported
checkpoint is verified against, and a mapping that drops the epsilon or misreads the GELU kind
cannot move it.
"""

from __future__ import annotations

import json
import math
import os
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
    return _linear(_causal_attention(q, k, v, 1.0 / math.sqrt(hs)), w, "attn.out_proj")


def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q k^T * scale + causal mask) v on (B, nh, T, hs); returns the heads merged, (B, T, C)."""
    B, nh, T, hs = q.shape
    scores = q @ k.transpose(0, 1, 3, 2) * scale  # (B, nh, T, T)
    scores = np.where(np.tri(T, dtype=bool), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


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


# ----------------------------------------------------------------------------- GPT-2, HF layout


def _conv1d(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """transformers' Conv1D: weight stored (in, out), so x @ W + b with no transpose."""
    return x @ np.asarray(w[name + ".weight"], np.float64) + np.asarray(w[name + ".bias"], np.float64)


# transformers' activation_function names -> the GELU they compute, read here on purpose and not
# from weight_conversion.hf_gpt2 (the table under test): "gelu_new" and "gelu_pytorch_tanh" are the
# tanh approximation, "gelu" is exact erf GELU (transformers.activations.ACT2FN).
_GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def read_gpt2_config(directory: str | os.PathLike) -> dict:
    """``directory/config.json`` as transformers wrote it: a plain dict, nothing mapped."""
    with open(os.path.join(os.fspath(directory), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _gpt2_field(config: Mapping, name: str, default):
    """A GPT2Config field; absent or null takes GPT2Config's default (as transformers does)."""
    value = config.get(name)
    return default if value is None else value


def gpt2_forward(weights: Mapping[str, np.ndarray], idx: np.ndarray, config: Mapping) -> dict[str, np.ndarray]:
    """GPT-2 computed straight from transformers' arrays (keys without the "transformer." prefix)
    and its config.json (``config``, a dict: see ``read_gpt2_config``), in float64, eval mode.
    Intermediates are keyed like the twins' ("embed", "blocks.i.ln_1", ..., "blocks.i.out", "ln_f",
    "logits") so the two can be compared sublayer by sublayer.

    Read here from ``config``, with GPT2Config's defaults: n_layer (12), n_head (12),
    layer_norm_epsilon (1e-5), activation_function ("gelu_new"), tie_word_embeddings (True),
    scale_attn_weights (True) and scale_attn_by_inverse_layer_idx (False), which change the
    scores. n_embd and the MLP width are the arrays' own."""
    activation = _gpt2_field(config, "activation_function", "gelu_new")
    if activation not in _GPT2_GELU:
        raise ValueError(f"the reference GPT-2 computes activation_function {sorted(_GPT2_GELU)}, not {activation!r}")
    gelu, eps = _GPT2_GELU[activation], float(_gpt2_field(config, "layer_norm_epsilon", 1e-5))
    n_layers, nh = int(_gpt2_field(config, "n_layer", 12)), int(_gpt2_field(config, "n_head", 12))
    scaled = bool(_gpt2_field(config, "scale_attn_weights", True))
    by_layer = bool(_gpt2_field(config, "scale_attn_by_inverse_layer_idx", False))
    idx = np.asarray(idx)
    B, T = idx.shape
    x = np.asarray(weights["wte.weight"], np.float64)[idx] + np.asarray(weights["wpe.weight"], np.float64)[:T]
    C = x.shape[-1]
    out = {"embed": x}
    for i in range(n_layers):
        p = f"h.{i}."
        ln_1 = _layer_norm(x, weights, p + "ln_1", eps)
        qkv = _conv1d(ln_1, weights, p + "attn.c_attn")  # (B, T, 3C): q | k | v along the columns
        q, k, v = (qkv[..., j * C : (j + 1) * C].reshape(B, T, nh, C // nh).transpose(0, 2, 1, 3) for j in range(3))
        scale = (1.0 / math.sqrt(C // nh) if scaled else 1.0) / (i + 1 if by_layer else 1)
        attn = _conv1d(_causal_attention(q, k, v, scale), weights, p + "attn.c_proj")
        resid_1 = x + attn
        ln_2 = _layer_norm(resid_1, weights, p + "ln_2", eps)
        mlp = _conv1d(_gelu(_conv1d(ln_2, weights, p + "mlp.c_fc"), gelu), weights, p + "mlp.c_proj")
        x = resid_1 + mlp
        for name, value in dict(ln_1=ln_1, attn=attn, resid_1=resid_1, ln_2=ln_2, mlp=mlp, out=x).items():
            out[f"blocks.{i}.{name}"] = value
    out["ln_f"] = _layer_norm(x, weights, "ln_f", eps)
    tied = bool(_gpt2_field(config, "tie_word_embeddings", True))
    head = weights["wte.weight"] if tied else weights["lm_head.weight"]  # (V, C) both
    out["logits"] = out["ln_f"] @ np.asarray(head, np.float64).T
    return out
