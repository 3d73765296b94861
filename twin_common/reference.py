"""A third, framework-free implementation of the block in float64 NumPy: the truth that golden
vectors are made from and that low-precision results are judged against.

``block_forward`` reads the weights in the interchange layout (torch state_dict keys, torch layout),
so it shares no code with either twin. ``gpt2_forward`` reads a whole GPT-2 in transformers' own
layout (fused ``c_attn``, Conv1D's (in, out) weights) and its hyperparameters from transformers'
own ``config.json`` (``read_gpt2_config``), so it shares no code and no mapped value with the
importer (``weight_conversion.hf_gpt2``) either: it is the independent source that an imported
checkpoint is verified against, and a mapping that drops the epsilon or misreads the GELU kind
cannot move it. ``llama_forward`` does the same for a transformers Llama: its arrays and its
config.json as they are, nothing read through a twin's config or a table.

The rotary and grouped-query pieces are written unlike the twins on purpose: the half-split layout
as transformers writes it (q * cos + rotate_half(q) * sin, the angles repeated over both halves),
the interleaved one as Meta's Llama does (pairs as complex numbers times e^(i * angle)), and the
key/value head of query head h picked by index (h // group) rather than by a repeat.
"""

from __future__ import annotations

import json
import math
import os
import types
from collections.abc import Mapping

import numpy as np

from twin_common.config import BlockConfig
from twin_common.moe import moe_forward, moe_layer_weights

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _linear(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ np.asarray(w[name + ".weight"], np.float64).T  # torch layout: (out, in)
    bias = w.get(name + ".bias")
    return y if bias is None else y + np.asarray(bias, np.float64)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(weight, np.float64)


def _norm(x: np.ndarray, w: Mapping[str, np.ndarray], name: str, cfg) -> np.ndarray:
    if cfg.norm == "rmsnorm":
        return _rms_norm(x, w[name + ".weight"], cfg.ln_eps)
    return _layer_norm(x, w, name, cfg.ln_eps)


def _angles(T: int, hs: int, theta: float) -> np.ndarray:
    """(T, hs / 2) rotation angles: position p times theta^(-2i / hs)."""
    return np.arange(T, dtype=np.float64)[:, None] * theta ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)


def _rope_half(x: np.ndarray, theta: float) -> np.ndarray:
    """transformers' form on (B, nh, T, hs): x * cos + rotate_half(x) * sin, angles repeated."""
    T, hs = x.shape[-2:]
    emb = np.concatenate([_angles(T, hs, theta)] * 2, axis=-1)  # (T, hs)
    rotated = np.concatenate([-x[..., hs // 2 :], x[..., : hs // 2]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def _rope_interleaved(x: np.ndarray, theta: float) -> np.ndarray:
    """Meta's form on (B, nh, T, hs): features (2i, 2i + 1) as one complex number, times e^(i a)."""
    T, hs = x.shape[-2:]
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * _angles(T, hs, theta))
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def _grouped(k: np.ndarray, n_heads: int) -> np.ndarray:
    """(B, nkv, T, hs) -> (B, nh, T, hs): query head h reads key/value head h // (nh / nkv)."""
    return k[:, np.arange(n_heads) // (n_heads // k.shape[1])]


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
        _linear(x, w, f"attn.{p}_proj").reshape(B, T, -1, hs).transpose(0, 2, 1, 3) for p in "qkv"
    )  # (B, nh or nkv, T, hs)
    if cfg.pos == "rope":
        rope = _rope_half if cfg.rope_layout == "half" else _rope_interleaved
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    scale = 1.0 / math.sqrt(hs)
    return _linear(_causal_attention(q, _grouped(k, nh), _grouped(v, nh), scale), w, "attn.out_proj")


def _mlp(x: np.ndarray, w: Mapping[str, np.ndarray], cfg: BlockConfig) -> np.ndarray:
    if cfg.mlp == "moe":  # a gather dispatch and a stable sort (twin_common/moe.py), unlike the twins
        return moe_forward(x, *moe_layer_weights(w, "mlp."), cfg)["mlp"]
    if cfg.mlp == "swiglu":
        gate = _linear(x, w, "mlp.gate_proj")
        return _linear(gate / (1.0 + np.exp(-gate)) * _linear(x, w, "mlp.up_proj"), w, "mlp.down_proj")
    return _linear(_gelu(_linear(x, w, "mlp.fc_in"), cfg.gelu_approximate), w, "mlp.fc_out")


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
    ln_1 = _norm(x, weights, "ln_1", cfg)
    attn = _attention(ln_1, weights, cfg)
    resid_1 = x + attn
    ln_2 = _norm(resid_1, weights, "ln_2", cfg)
    mlp = _mlp(ln_2, weights, cfg)
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
    return dict(
        ln_1=_norm(x, weights, "ln_1", cfg),
        attn=_attention(f64["ln_1"], weights, cfg),
        resid_1=x + f64["attn"],
        ln_2=_norm(f64["resid_1"], weights, "ln_2", cfg),
        mlp=_mlp(f64["ln_2"], weights, cfg),
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


# ------------------------------------------------------------------------------ Llama, HF layout


def llama_forward(weights: Mapping[str, np.ndarray], idx: np.ndarray, config: Mapping) -> dict[str, np.ndarray]:
    """transformers' LlamaForCausalLM computed straight from its arrays (keys without the "model."
    prefix) and its config.json (a dict, read here with LlamaConfig's defaults), in float64, eval
    mode. Intermediates are keyed like the twins' ("embed", "blocks.i.ln_1", ..., "logits")."""
    idx = np.asarray(idx)
    B, T = idx.shape
    C, nh = config["hidden_size"], config["num_attention_heads"]
    hs = config.get("head_dim") or C // nh
    eps = config.get("rms_norm_eps", 1e-6)  # LlamaConfig's default
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))  # transformers 5, then 4.x
    f64 = lambda key: np.asarray(weights[key], np.float64)  # noqa: E731

    def proj(x, name):
        y = x @ f64(name + ".weight").T  # nn.Linear: (out, in)
        return y + f64(name + ".bias") if name + ".bias" in weights else y

    x = f64("embed_tokens.weight")[idx]
    out = {"embed": x}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        ln_1 = _rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q, k, v = (
            proj(ln_1, p + f"self_attn.{n}_proj").reshape(B, T, -1, hs).transpose(0, 2, 1, 3) for n in "qkv"
        )  # (B, nh or nkv, T, hs)
        q, k = _rope_half(q, theta), _rope_half(k, theta)
        attn = proj(_causal_attention(q, _grouped(k, nh), _grouped(v, nh), 1.0 / math.sqrt(hs)), p + "self_attn.o_proj")
        resid_1 = x + attn
        ln_2 = _rms_norm(resid_1, weights[p + "post_attention_layernorm.weight"], eps)
        if config.get("model_type") == "mixtral":
            moe = _mixtral_moe(ln_2, weights, p + "block_sparse_moe.", config)
            mlp, out[f"blocks.{i}.router_logits"] = moe["mlp"], moe["router_logits"]
        else:
            gate = proj(ln_2, p + "mlp.gate_proj")
            mlp = proj(gate / (1.0 + np.exp(-gate)) * proj(ln_2, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = resid_1 + mlp
        for name, value in dict(ln_1=ln_1, attn=attn, resid_1=resid_1, ln_2=ln_2, mlp=mlp, out=x).items():
            out[f"blocks.{i}.{name}"] = value
    out["ln_f"] = _rms_norm(x, weights["norm.weight"], eps)
    tied = config.get("tie_word_embeddings", False)  # LlamaConfig's default
    out["logits"] = out["ln_f"] @ f64("embed_tokens.weight" if tied else "lm_head.weight").T
    return out


def _mixtral_moe(x: np.ndarray, weights: Mapping[str, np.ndarray], p: str, config: Mapping) -> dict[str, np.ndarray]:
    """Mixtral's sparse MoE block from its per-expert arrays (``{p}experts.{e}.w1 / w3 / w2.weight``,
    ``{p}gate.weight``) and config.json (MixtralConfig's defaults: 8 experts, top-2): softmax over
    all experts, top-k, renormalised, dropless (twin_common.moe.moe_forward's gather dispatch)."""
    E, k = config.get("num_local_experts", 8), config.get("num_experts_per_tok", 2)
    stack = lambda w: np.stack([np.asarray(weights[f"{p}experts.{e}.{w}.weight"], np.float64) for e in range(E)])  # noqa: E731
    rule = types.SimpleNamespace(top_k=k, norm_topk_prob=True, capacity_factor=None)
    return moe_forward(x, weights[p + "gate.weight"], stack("w1"), stack("w3"), stack("w2"), rule)
