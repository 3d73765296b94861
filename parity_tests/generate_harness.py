"""Generation parity, shared by parity_tests/test_generate.py and scripts.parity_report.

kv_cache_check: within one framework, the logits of cached generation (a left-padded batch of
    prompts of different lengths, prefill then one token per step, up to the full block) against
    the uncached forward of each row alone, at every generated position.
generate_check: across frameworks, on a briefly trained GPT, per-step logits and the tokens of
    greedy and sampled generation (64+ steps) from the same seed.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

import weight_conversion as wc
from parity_tests import harness as h
from parity_tests import train_harness as th
from twin_common import GPTConfig
from twin_common.generation import Generation, Sampling, compare_generations
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
GEN_PROMPTS = (b"The cat ", b"12+7=")
GEN_STEPS = 72  # >= 64 new tokens; 8 + 72 <= block_size 96
SAMPLINGS = {
    "greedy": Sampling(temperature=0.0),
    "sampled": Sampling(temperature=0.8, top_k=40, top_p=0.95),
}


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
            return model(torch.from_numpy(batch)).numpy()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.asarray(forward(state, jnp.asarray(batch, jnp.int32)))


def kv_cache_check(
    framework: str, dtype: str, attn_impl: str = "fused", seed: int = 0, base: GPTConfig = CACHE_CFG
) -> h.Result:
    cfg = dataclasses.replace(base, attn_impl=attn_impl)
    n_new = cfg.block_size - max(len(p) for p in CACHE_PROMPTS)  # up to the last position
    with matched_precision(x64=dtype == "float64"):
        if framework == "torch":  # one framework only: a machine without the other runs this check too
            model = th.new_torch_gpt(cfg, dtype, seed)
        else:
            model = th.new_flax_gpt(cfg, dtype, seed + 100)
            model.eval()
        gen = _run(framework, model, CACHE_PROMPTS, n_new, SAMPLINGS["greedy"])
        worst, where, peak = 0.0, None, 0.0
        full = uncached_logits(framework, model, [list(p) + gen.tokens[r] for r, p in enumerate(CACHE_PROMPTS)])
        for row, prompt in enumerate(CACHE_PROMPTS):
            P = len(prompt)
            for k in range(len(gen.tokens[row])):
                ref, got = full[row, P - 1 + k], gen.logits[k, row]
                err = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
                peak = max(peak, float(np.max(np.abs(ref))))
                if err > worst:
                    worst, where = err, f"row {row} position {P - 1 + k}"
    tol = tolerance_for(dtype).atol
    return h.Result(
        check="kv_cache", shape=[len(CACHE_PROMPTS), cfg.block_size], dtype=dtype,
        torch_device="cpu" if framework == "torch" else None,
        jax_device="cpu" if framework == "jax" else None,
        direction=f"{framework}: cached vs uncached", max_abs_err=worst,
        max_rel_err=worst / peak if peak else 0.0, tolerance=tol, passed=worst <= tol,
        first_divergence=None if worst <= tol else where,
        config={"model": "moe" if cfg.mlp == "moe" else "llama" if cfg.pos == "rope" else "gpt", "attn_impl": attn_impl,
                "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                "prompt_lengths": [len(p) for p in CACHE_PROMPTS], "new_tokens": n_new},
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def trained_weights(steps: int = 80) -> dict:
    """TRAINED_CFG after ``steps`` AdamW steps (torch) on the generated corpus: a model whose
    next-token distributions are peaked, as real ones are (untrained logits are near-uniform and
    would make token identity easy)."""
    import torch

    from torch_impl.train import Trainer
    from twin_common import data as D
    from twin_common.train_config import TrainConfig

    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=10)
    train, _ = D.split(D.generated_corpus(), tcfg.seq_len)
    with matched_precision():
        torch.manual_seed(0)
        from torch_impl.gpt import GPT

        trainer = Trainer(GPT(TRAINED_CFG), tcfg)
        for step in range(steps):
            trainer.step(*D.batch(train, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step))
        return wc.export(trainer.model)


def trained_pair():
    torch_model, flax_model = new_pair_models(TRAINED_CFG, "float32")
    weights = trained_weights()
    wc.import_(torch_model, weights)
    wc.import_(flax_model, weights)
    return torch_model, flax_model


def generate_pair(sampling_name: str, seed: int = 0) -> tuple[Generation, Generation, dict]:
    sampling = SAMPLINGS[sampling_name]
    with matched_precision():
        torch_model, flax_model = trained_pair()
        a = _run("torch", torch_model, GEN_PROMPTS, GEN_STEPS, sampling, seed)
        b = _run("jax", flax_model, GEN_PROMPTS, GEN_STEPS, sampling, seed)
    return a, b, compare_generations(a, b, sampling)


def generate_check(sampling_name: str, seed: int = 0) -> h.Result:
    a, b, report = generate_pair(sampling_name, seed)
    tol = tolerance_for("float32").atol
    passed = (report["identical"] or report["explained"]) and report["max_logit_diff"] <= tol
    divergence = None
    for row in report["rows"]:
        if row["first_difference"] is not None:
            kind = "undecidable within tolerance" if row.get("undecidable") else "NOT explained"
            divergence = f"row {row['row']} token {row['first_difference']} ({kind})"
            break
    if report["max_logit_diff"] > tol:
        divergence = (divergence + "; " if divergence else "") + "logits over tolerance"
    peak = float(np.max(np.abs(a.logits)))
    return h.Result(
        check="generate", shape=[len(GEN_PROMPTS), GEN_STEPS], dtype="float32", torch_device="cpu",
        jax_device="cpu", direction=f"torch<->jax {sampling_name}", max_abs_err=report["max_logit_diff"],
        max_rel_err=report["max_logit_diff"] / peak, tolerance=tol, passed=passed,
        first_divergence=divergence,
        config={"model": "gpt", "sampling": SAMPLINGS[sampling_name].__dict__, "seed": seed,
                "tokens_identical": report["identical"], "steps": GEN_STEPS, "trained": True},
    )  # fmt: skip
