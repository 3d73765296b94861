"""Generation parity, shared by parity_tests/test_generate.py and scripts.parity_report.

kv_cache_check: within one framework, the logits of cached generation (a left-padded batch of
    prompts of different lengths, prefill then one token per step, up to the full block) against
    the uncached forward of each row alone, at every generated position.
generate_check: across frameworks, on a briefly trained model of a given config (the GPT's
    TRAINED_CFG, the Llama preset's, the MoE preset's), per-step logits and the tokens of greedy,
    top-k and sampled generation (64+ steps) from the same seed.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_parity import train_harness as th
from twin_common import GPTConfig
from twin_common.generation import (
    LOGIT_TOL, Generation, Sampling, compare_generations, decision_margin, kept_probabilities, layout,
)
from twin_common.precision import matched_precision
from twin_common.tolerances import tolerance_for

# init_std 0.2: logits of O(1) (normal(0, 0.02) gives near-uniform ones, where any cache error hides)
CACHE_CFG = GPTConfig(vocab_size=256, block_size=32, n_layers=2, d_model=64, n_heads=4, init_std=0.2)
CACHE_PROMPTS = ([3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4], [9])  # lengths 5, 11, 1: padding
# The Llama-style preset's cache check: init_std 0.1, where 0.2 (peak logits 6.1) measured cached vs
# uncached 8.6e-6 (torch) and 9.5e-6 (Flax), too near the 1e-5 bound to tell rounding from a bug;
# at 0.1 the logits peak at 3.6 and the errors are 2.3e-6 and 2.0e-6 (2-core CPU, float32).
LLAMA_CACHE_CFG = dataclasses.replace(GPTConfig.llama_tiny(), block_size=32, init_std=0.1)
TRAINED_CFG = GPTConfig(vocab_size=256, block_size=96, n_layers=2, d_model=64, n_heads=4)
# The Llama preset for generate_check: llama_tiny (byte-level, 2 layers of 64) with the same context
LLAMA_TRAINED_CFG = dataclasses.replace(GPTConfig.llama_tiny(), block_size=96)
GEN_PROMPTS = (b"The cat ", b"12+7=")
GEN_STEPS = 72  # >= 64 new tokens; 8 + 72 <= block_size 96
SAMPLINGS = {
    "greedy": Sampling(temperature=0.0),
    "sampled": Sampling(temperature=0.8, top_k=40, top_p=0.95),
    # top-k alone: in "sampled" top_p=0.95 does all the cutting, so a top-k that keeps k + 1 passes it
    "top_k": Sampling(temperature=1.0, top_k=5),
}


def model_name(cfg: GPTConfig) -> str:
    """The report's model column for a GPT config: "moe", "llama" (rotary positions) or "gpt"."""
    return "moe" if cfg.mlp == "moe" else "llama" if cfg.pos == "rope" else "gpt"


def new_pair_models(cfg: GPTConfig, dtype: str, seed: int = 0):
    return th.new_torch_gpt(cfg, dtype, seed), th.new_flax_gpt(cfg, dtype, seed + 100)


def _run(framework: str, model, prompts, n: int, sampling: Sampling, seed: int = 0) -> Generation:
    if framework == "torch":
        from torch_impl.generate import run
    else:
        from jax_impl.generate import run
    return run(model, [list(p) for p in prompts], n, sampling, seed=seed, record_logits=True)


def uncached_logits(framework: str, model, rows: list[list[int]]) -> np.ndarray:
    """(B, block_size, V) logits of the plain forward (no cache), every row right-padded with 0 to
    block_size: a causal model's logits at a position ignore what comes after it, so one call
    (one JAX compilation) serves rows of every length."""
    batch = np.zeros((len(rows), model.cfg.block_size), np.int64)
    for b, row in enumerate(rows):
        batch[b, : len(row)] = row
    if framework == "torch":
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(batch).to(model.wte.weight.device)).cpu().numpy()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.asarray(forward(state, jnp.asarray(batch, jnp.int32)))


def kv_cache_check(
    framework: str, dtype: str, attn_impl: str = "fused", seed: int = 0, base: GPTConfig = CACHE_CFG, device=None
) -> h.Result:
    """``base``: the model's config (CACHE_CFG, LLAMA_CACHE_CFG, ...); ``device``: a torch device
    name or a JAX device (None: the CPU)."""
    cfg = dataclasses.replace(base, attn_impl=attn_impl)
    n_new = cfg.block_size - max(len(p) for p in CACHE_PROMPTS)  # up to the last position
    with matched_precision(x64=dtype == "float64"):
        if framework == "torch":  # one framework only: a machine without the other runs this check too
            model = th.new_torch_gpt(cfg, dtype, seed).to(device or "cpu")
        else:
            import jax
            from flax import nnx

            model = th.new_flax_gpt(cfg, dtype, seed + 100)
            if device is not None:
                nnx.update(model, jax.device_put(nnx.state(model), device))
            model.eval()
        gen = _run(framework, model, CACHE_PROMPTS, n_new, SAMPLINGS["greedy"])
        full = uncached_logits(framework, model, [list(p) + gen.tokens[r] for r, p in enumerate(CACHE_PROMPTS)])
    tol = tolerance_for(dtype).atol
    # The locator's rule: the first position over the bound, in generation order (step by step,
    # rows in order). A cache bug starts somewhere and everything after it inherits it, so the
    # worst position is usually far from the cause (a slot never advanced: worst at the end).
    worst, first, detail, peak = 0.0, None, None, 0.0
    for k in range(n_new):
        for row, prompt in enumerate(CACHE_PROMPTS):
            P = len(prompt)
            if k >= len(gen.tokens[row]):
                continue
            ref, got = full[row, P - 1 + k], gen.logits[k, row]
            err = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
            peak = max(peak, float(np.max(np.abs(ref))))
            worst = err if err != err else max(worst, err)
            if first is None and not err <= tol:
                first = f"row {row} position {P - 1 + k}"
                detail = f"{first} (decode step {k}; rule: the first position over the bound, not the worst): {err:.2e} > {tol:.0e}"
    return h.Result(
        check="kv_cache", shape=[len(CACHE_PROMPTS), cfg.block_size], dtype=dtype,
        torch_device=(device or "cpu") if framework == "torch" else None,
        jax_device=th._jax_name(device) if framework == "jax" else None,
        direction=f"{framework}: cached vs uncached", max_abs_err=worst,
        max_rel_err=worst / peak if peak else 0.0, tolerance=tol, passed=first is None,
        first_divergence=first, divergence_detail=detail,
        config={"model": model_name(cfg), "attn_impl": attn_impl,
                "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                "prompt_lengths": [len(p) for p in CACHE_PROMPTS], "new_tokens": n_new,
                "first_real_slots": layout([list(p) for p in CACHE_PROMPTS], cfg.block_size).start.tolist()},
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def trained_weights(cfg: GPTConfig = TRAINED_CFG, steps: int = 80) -> dict:
    """``cfg`` after ``steps`` AdamW steps (torch) on the generated corpus, once per config: a model
    whose next-token distributions are peaked, as real ones are (untrained logits are near-uniform
    and would make token identity easy)."""
    import torch

    from torch_impl.train import Trainer
    from twin_common import data as D
    from twin_common.train_config import TrainConfig

    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=10)
    train, _ = D.split(D.generated_corpus(), tcfg.seq_len)
    with matched_precision():
        torch.manual_seed(0)
        from torch_impl.gpt import GPT

        trainer = Trainer(GPT(cfg), tcfg)
        for step in range(steps):
            trainer.step(*D.batch(train, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step))
        return wc.export(trainer.model)


def trained_pair(torch_device: str = "cpu", jax_device=None, cfg: GPTConfig = TRAINED_CFG):
    torch_model, flax_model = new_pair_models(cfg, "float32")
    weights = trained_weights(cfg)
    wc.import_(torch_model, weights)
    wc.import_(flax_model, weights)
    return th.place(torch_model, flax_model, torch_device, jax_device)


def generate_pair(
    sampling_name: str, seed: int = 0, torch_device: str = "cpu", jax_device=None, cfg: GPTConfig = TRAINED_CFG
) -> tuple[Generation, Generation, dict]:
    sampling = SAMPLINGS[sampling_name]
    with matched_precision():
        torch_model, flax_model = trained_pair(torch_device, jax_device, cfg)
        flax_model.eval()
        a = _run("torch", torch_model, GEN_PROMPTS, GEN_STEPS, sampling, seed)
        b = _run("jax", flax_model, GEN_PROMPTS, GEN_STEPS, sampling, seed)
    return a, b, compare_generations(a, b, sampling)


def outside_the_filters(gen: Generation, sampling: Sampling) -> tuple[int, int] | None:
    """(row, step) of the first sampled token that the top-k / top-p filters, applied in float64 to
    the twin's own logits, give probability 0 (a step that float32 cannot decide is not counted),
    or None. Both twins could share a filter bug; this holds each to the definition."""
    if sampling.greedy:
        return None
    for step in range(gen.logits.shape[0]):
        for row, tokens in enumerate(gen.tokens):
            if step < len(tokens) and kept_probabilities(gen.logits[step, row], sampling)[tokens[step]] == 0:
                if decision_margin(gen.logits[step, row], float(gen.uniforms[step, row]), sampling) >= LOGIT_TOL:
                    return row, step
    return None


def generate_check(
    sampling_name: str, seed: int = 0, torch_device: str = "cpu", jax_device=None, cfg: GPTConfig = TRAINED_CFG
) -> h.Result:
    """Both twins generate from ``cfg`` trained briefly (trained_weights, once per config): per-step
    logits within the float32 tolerance and the same tokens, or a first difference explained by an
    undecidable step (twin_common.generation.compare_generations); every sampled token inside the
    float64 top-k / top-p set of its own twin's logits (outside_the_filters)."""
    a, b, report = generate_pair(sampling_name, seed, torch_device, jax_device, cfg)
    tol = tolerance_for("float32").atol
    outside = {fw: outside_the_filters(g, SAMPLINGS[sampling_name]) for fw, g in (("torch", a), ("jax", b))}
    passed = (report["identical"] or report["explained"]) and report["max_logit_diff"] <= tol
    passed = passed and not any(outside.values())
    divergence = None
    for fw, found in outside.items():
        if found and divergence is None:
            divergence = f"{fw} row {found[0]} token {found[1]} outside the top-k/top-p set"
    for row in report["rows"]:
        if divergence is not None:
            break
        if row["first_difference"] is not None:
            kind = "undecidable within tolerance" if row.get("undecidable") else "NOT explained"
            divergence = f"row {row['row']} token {row['first_difference']} ({kind})"
            break
    if report["max_logit_diff"] > tol:
        divergence = (divergence + "; " if divergence else "") + "logits over tolerance"
    peak = float(np.max(np.abs(a.logits)))
    return h.Result(
        check="generate", shape=[len(GEN_PROMPTS), GEN_STEPS], dtype="float32", torch_device=torch_device,
        jax_device=th._jax_name(jax_device), direction=f"torch<->jax {sampling_name}", max_abs_err=report["max_logit_diff"],
        max_rel_err=report["max_logit_diff"] / peak, tolerance=tol, passed=passed,
        first_divergence=divergence,
        config={"model": model_name(cfg), "sampling": SAMPLINGS[sampling_name].__dict__, "seed": seed,
                "tokens_identical": report["identical"], "steps": GEN_STEPS, "trained": True},
    )  # fmt: skip
