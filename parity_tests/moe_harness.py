"""Mixture-of-Experts parity, shared by parity_tests/test_moe.py and scripts.parity_report.

The MoE preset (``GPTConfig.moe_tiny``: 4 SwiGLU experts, top-2) through the same checks as the
dense twins: forward (the block at the lesson's (5, 8, 128), float32 / float64 / bfloat16, through
``harness.forward_check``), routing equality (the experts each token chooses, identical in both
twins except tokens whose routing margin the dtype cannot decide: counted), gradients and a
20-step AdamW trajectory with the router losses in the loss, cross-framework resume, the KV cache
and generation, all through the dense checks with the MoE config.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from parity_tests import generate_harness as gh
from parity_tests import harness as h
from parity_tests import train_harness as th
from twin_common import GPTConfig
from twin_common.generation import compare_generations
from twin_common.moe import compare_routing
from twin_common.precision import matched_precision
from twin_common.tolerances import tolerance_for

# The lesson's (5, 8, 128) input through a MoE block: moe_tiny's block at width 128, experts of 96.
MOE_BLOCK = dataclasses.replace(GPTConfig.moe_tiny().block_config(), d_model=128, block_size=8, mlp_hidden=96)
# The GPT for gradients, training and resume: moe_tiny at block 16 and vocabulary 64 (cheap on CPU).
MOE_GPT = dataclasses.replace(GPTConfig.moe_tiny(), vocab_size=64, block_size=16)
# The GPT for the KV cache and generation: init_std 0.1 for logits of O(1) (peak 3.2; at normal(0,
# 0.02) they are near-uniform and hide cache errors). generate_harness.CACHE_CFG's 0.2 gives this
# model logits of peak 6.1, and float32 rounding at that size alone (relative 2.8e-6, measured)
# reaches 1.7e-5 absolute, over the 1e-5 tolerance without any bug.
MOE_CACHE = dataclasses.replace(GPTConfig.moe_tiny(), block_size=32, init_std=0.1)
ROUTING_SHAPE = (64, 8, 128)  # 512 tokens: enough for the bfloat16 count of undecidable tokens to mean something


def forward_check(dtype: str, direction: str) -> h.Result:
    r = h.forward_check(MOE_BLOCK, dtype, direction)
    r.config = {"model": "moe block", "n_experts": MOE_BLOCK.n_experts, "top_k": MOE_BLOCK.top_k}
    return r


def routing_check(dtype: str, direction: str = "torch->jax", cfg=MOE_BLOCK, shape=ROUTING_SHAPE) -> h.Result:
    """The experts each token chooses in both twins (same weights, same input): every token whose
    choice differs must be undecidable in ``dtype`` (twin_common.moe.compare_routing).
    max_abs_err is the largest router-logit difference."""
    ref, other, _ = h.forward_pair(cfg, dtype, direction, shape=shape)
    a, b = ref["router_logits"], other["router_logits"]
    counts = compare_routing(a, b, cfg.top_k, dtype)
    err = float(np.max(np.abs(a - b)))
    peak = float(np.max(np.abs(a)))
    passed = counts["differ_decidable"] == 0
    detail = None if passed else f"{counts['differ_decidable']} tokens chose other experts with a decidable margin"
    return h.Result(
        "routing", list(shape), dtype, "cpu", "cpu", direction, err, err / peak if peak else 0.0,
        tolerance_for(dtype).bound(a), passed, None if passed else "router", detail,
        config={"model": "moe block", **counts},
    )  # fmt: skip


def grad_check(direction: str, dtype: str = "float32") -> h.Result:
    r = th.grad_check("gpt", dtype, direction, gpt_cfg=MOE_GPT)
    r.config["model"] = "moe"
    return r


def trajectory_check(direction: str) -> h.Result:
    r, _ = th.trajectory_check(direction, cfg=MOE_GPT)
    r.config["model"] = "moe"
    return r


def resume_check(first: str) -> h.Result:
    r = th.resume_check(first, cfg=MOE_GPT)
    r.config["model"] = "moe"
    return r


def kv_cache_check(framework: str, dtype: str = "float32") -> h.Result:
    return gh.kv_cache_check(framework, dtype, base=MOE_CACHE)


def generate_check(sampling_name: str, seed: int = 0) -> h.Result:
    """Both twins generate from one converted MoE model (random weights, init_std 0.2): per-step
    logits within the float32 tolerance and the same tokens, or a first difference explained by
    an undecidable step (twin_common.generation.compare_generations)."""
    sampling = gh.SAMPLINGS[sampling_name]
    with matched_precision():
        t, j = th.converted_pair(MOE_CACHE, "float32", "torch->jax")
        j.eval()
        n = MOE_CACHE.block_size - max(len(p) for p in gh.GEN_PROMPTS)
        a = gh._run("torch", t, gh.GEN_PROMPTS, n, sampling, seed)
        b = gh._run("jax", j, gh.GEN_PROMPTS, n, sampling, seed)
    report = compare_generations(a, b, sampling)
    tol = tolerance_for("float32").atol
    passed = (report["identical"] or report["explained"]) and report["max_logit_diff"] <= tol
    peak = float(np.max(np.abs(a.logits)))
    return h.Result(
        "generate", [len(gh.GEN_PROMPTS), n], "float32", "cpu", "cpu", f"torch<->jax {sampling_name}",
        report["max_logit_diff"], report["max_logit_diff"] / peak, tol, passed,
        None if passed else "generation",
        config={"model": "moe", "tokens_identical": report["identical"], "steps": n},
    )  # fmt: skip


def checks(skip_training: bool = False) -> list:
    """Every MoE check as (name, thunk), for the parity report."""
    out = [(f"moe forward {d} {dt}", lambda d=d, dt=dt: forward_check(dt, d))
           for dt in h.PARITY_DTYPES for d in h.DIRECTIONS]  # fmt: skip
    out += [(f"moe routing {dt}", lambda dt=dt: routing_check(dt)) for dt in h.PARITY_DTYPES]
    if not skip_training:
        out += [(f"moe grad {d}", lambda d=d: grad_check(d)) for d in h.DIRECTIONS]
        out += [(f"moe train_step {d}", lambda d=d: trajectory_check(d)) for d in h.DIRECTIONS]
        out += [(f"moe resume {f}", lambda f=f: resume_check(f)) for f in ("torch", "jax")]
        out += [(f"moe kv_cache {f}", lambda f=f: kv_cache_check(f)) for f in ("torch", "jax")]
        out += [(f"moe generate {s}", lambda s=s: generate_check(s)) for s in gh.SAMPLINGS]
    return out
