"""Llama-block parity, shared by parity_tests/test_llama.py and scripts.parity_report.

The Llama preset (``GPTConfig.llama_tiny``: RMSNorm, rotary positions, 4 query heads sharing 2
key/value heads, SwiGLU, no biases, untied head) through the dense checks, each given the Llama
config: forward (its block at the lesson's (5, 8, 128) input, ``harness.forward_check``),
gradients (``train_harness.grad_check``), a 20-step AdamW trajectory
(``train_harness.trajectory_check``) and a cross-framework resume (``train_harness.resume_check``)
of the GPT, cached against uncached generation on a left-padded batch
(``generate_harness.kv_cache_check``) and generation across frameworks on a briefly trained model
(``generate_harness.generate_check``). transformers' LlamaForCausalLM against each twin is
``hf_harness.hf_llama_check``; the GPT on (data, model) meshes is ``sharded_rows``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from twin_parity import generate_harness as gh
from twin_parity import harness as h
from twin_parity import sharded_rows as sr
from twin_parity import train_harness as th
from twin_common import GPTConfig

# the lesson's (5, 8, 128) input through llama_tiny's block at width 128: 4 query heads of 32, 2
# key/value heads, SwiGLU 344 (about 8/3 * 128, as llama_tiny's 176 for 64)
LLAMA_BLOCK = dataclasses.replace(GPTConfig.llama_tiny().block_config(), d_model=128, block_size=8, mlp_hidden=344)
# The GPT for gradients and training: llama_tiny at block 16 and vocabulary 64 (cheap on CPU).
LLAMA_GPT = dataclasses.replace(GPTConfig.llama_tiny(), vocab_size=64, block_size=16)
# The final-parameter bound of the llama train_step rows. One entry of blocks.0.mlp.down_proj.weight
# (of 11264) has an exact step-0 gradient of 1.34e-9 (float64), under AdamW's eps 1e-8: the twins'
# float32 gradients of it are 6.0e-10 (torch) and 1.04e-9 (JAX), rounding noise, and Adam's first
# update lr_0 * g / (|g| + eps) (lr_0 = 6e-4) moves it by 3.4e-5 and 5.6e-5: 2.3e-5 apart, measured
# 1.35e-5 apart after 20 steps, while every other entry stays within 1e-6. 5e-5 bounds a first-step
# difference from rounding noise of up to 8e-10 in such a gradient; the per-step losses keep
# TRAIN_TOLERANCE (1e-5, measured 1.2e-7) and the grad rows hold every gradient to 1e-5.
LLAMA_WEIGHT_TOLERANCE = 5e-5
ROPE_LAYOUTS = ("half", "interleaved")
# transformers' LlamaForCausalLM rows: (n_kv_heads, rope layout, LlamaConfig overrides) of a 6-head
# model; 2 is grouped (3 query heads per key/value head), 1 multi-query, 6 multi-head; the last two
# also carry attention biases (Qwen2's q/k/v biases) and one a head tied to the embedding, so an
# import that drops either fails a row and not only a test
HF_VARIANTS = ((2, "half", {}), (2, "interleaved", {}), (1, "half", {"attention_bias": True}),
               (6, "interleaved", {"attention_bias": True, "tie_word_embeddings": True}))  # fmt: skip


def _summary(cfg) -> dict:
    return {"model": "llama block", "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "rope_layout": cfg.rope_layout}  # fmt: skip


def forward_check(dtype: str, direction: str, rope_layout: str = "half") -> h.Result:
    cfg = dataclasses.replace(LLAMA_BLOCK, rope_layout=rope_layout)
    r = h.forward_check(cfg, dtype, direction)
    r.config = _summary(cfg)
    return r


def grad_check(direction: str, dtype: str = "float32") -> h.Result:
    r = th.grad_check("gpt", dtype, direction, gpt_cfg=LLAMA_GPT)
    r.config["model"] = "llama"
    return r


def trajectory_check(direction: str) -> h.Result:
    r, _ = th.trajectory_check(direction, cfg=LLAMA_GPT, weight_tolerance=LLAMA_WEIGHT_TOLERANCE)
    r.config["model"] = "llama"
    return r


def bf16_sublayer_check(framework: str, attn_impl: str = "fused") -> h.Result:
    """One twin's Llama block alone in bfloat16, every sublayer against float64 on its own input
    (``harness.bf16_sublayer_check``). The bfloat16 forward rows compare the twins with each other
    at 3.1e-2: an RMSNorm statistic taken in bfloat16 (what torch.nn.RMSNorm does with a bfloat16
    input) moved neither twin's row (1.56e-2 before and after, measured) and fails here at ln_1."""
    r = h.bf16_sublayer_check(framework, dataclasses.replace(LLAMA_BLOCK, attn_impl=attn_impl))
    r.config = {**_summary(LLAMA_BLOCK), "attn_impl": attn_impl}
    return r


ROPE_POSITIONS = 4096  # a context where a bfloat16 position (8 bits of mantissa) is off by up to 8
# cos and sin of bfloat16 angles computed in float32 (as transformers' LlamaRotaryEmbedding, which
# disables autocast: "bfloat16 loses precision on long contexts", transformers PR #29285): rounded
# once to bfloat16, half an ulp in [0.5, 1) (2^-9), plus the float32 angle's own error, at most
# 2 ulps of float32 of an angle up to ROPE_POSITIONS radians (ROPE_POSITIONS * 2^-23).
ROPE_BF16_BOUND = 2.0**-9 + ROPE_POSITIONS * 2.0**-23


def rope_check(framework: str) -> h.Result:
    """One twin's rotary cos and sin for bfloat16 compute at positions 0 .. ROPE_POSITIONS - 1 (the
    Llama block's head size 32 and theta) against float64. Angles taken in bfloat16 are off by whole
    radians there (2.0 measured); the lesson's 8 positions hide it from every other row."""
    import jax.numpy as jnp
    import torch

    import jax_impl.block as jb
    import torch_impl.block as tb

    cfg, hs = LLAMA_BLOCK, LLAMA_BLOCK.d_head
    angles = np.arange(ROPE_POSITIONS, dtype=np.float64)[:, None] * cfg.rope_theta ** (
        -np.arange(0, hs, 2, dtype=np.float64) / hs)  # fmt: skip
    if framework == "torch":
        got = [t[0].float().numpy() for t in tb.rope_angles(torch.arange(ROPE_POSITIONS)[None], cfg, torch.bfloat16)]
    else:
        got = [np.asarray(t[0].astype(jnp.float32)) for t in jb.rope_angles(jnp.arange(ROPE_POSITIONS)[None], cfg, jnp.bfloat16)]
    first = detail = None
    worst = 0.0
    for name, truth, value in (("cos", np.cos(angles), got[0]), ("sin", np.sin(angles), got[1])):
        err = np.abs(value.astype(np.float64) - truth)
        worst = th._worse(worst, float(err.max()))
        if first is None and not err.max() <= ROPE_BF16_BOUND:
            pos = int(np.argmax(err.max(axis=1) > ROPE_BF16_BOUND))
            first, detail = f"{name} at position {pos}", f"{name} at position {pos}: {err[pos].max():.2e} > {ROPE_BF16_BOUND:.2e} (first position over the bound)"
    device = ("cpu", None) if framework == "torch" else (None, "cpu")
    return h.Result(
        "rope_vs_f64", [ROPE_POSITIONS, hs // 2], "bfloat16", *device, f"{framework} vs float64", worst, worst,
        ROPE_BF16_BOUND, first is None, first, detail, config={**_summary(cfg), "rope_theta": cfg.rope_theta},
    )  # fmt: skip


def resume_check(first: str) -> h.Result:
    """10 steps in ``first``, a checkpoint, 10 in the other framework, against 10 + 10 there; the
    final parameters within LLAMA_WEIGHT_TOLERANCE (the train_step rows' reason: the near-zero
    down_proj gradient entry, whose Adam updates differ by rounding noise from step 0)."""
    r = th.resume_check(first, cfg=LLAMA_GPT, weight_tolerance=LLAMA_WEIGHT_TOLERANCE)
    r.config["model"] = "llama"
    return r


def kv_cache_check(framework: str, dtype: str = "float32") -> h.Result:
    """Cached vs uncached on generate_harness.LLAMA_CACHE_CFG: its left-padded batch of three prompts
    (lengths 5, 11, 1) puts the short rows' first tokens at slots 6 and 10, position 0 each."""
    return gh.kv_cache_check(framework, dtype, base=gh.LLAMA_CACHE_CFG)


def generate_check(sampling_name: str, seed: int = 0) -> h.Result:
    return gh.generate_check(sampling_name, seed, cfg=gh.LLAMA_TRAINED_CFG)


# ------------------------------------------------------------------------------ tensor parallelism

# (data, model): llama_tiny's 2 key/value heads and 4 query heads split over model=2, one key/value
# head and its 2 query heads per device, the batch over data=2
SHARDED_MESHES = ((2, 2),)


def run_jax_sharded() -> list[h.Result]:
    """LLAMA_GPT on SHARDED_MESHES of simulated CPU devices against one device (sharded_rows)."""
    return sr.run_jax_sharded(LLAMA_GPT, SHARDED_MESHES)


def torch_sharded_rows(mesh: tuple[int, int] = SHARDED_MESHES[0]) -> list[h.Result]:
    """LLAMA_GPT on ``mesh`` (gloo processes, q/k/v by heads over model) against one device."""
    return sr.torch_sharded_rows(LLAMA_GPT, mesh)
