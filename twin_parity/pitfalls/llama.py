"""The Llama family's porting pitfalls, each measured the way ``pitfalls.py`` measures GPT-2's:
the effect with the trap left in, and the result with this project's pin.

Unless a check says otherwise it runs on the Llama-style preset (``GPTConfig.llama_tiny()``: 2
layers, 64 wide, 4 query heads sharing 2 key/value heads, SwiGLU 176, rope_theta 10000, RMSNorm
eps 1e-5) in float32, eval mode: the torch twin built by the harness and every parameter perturbed
(so no RMSNorm weight hides at 1), its weights moved into the Flax twin by the converter, both run
on the same (3, 48) token ids under ``matched_precision()``, and the number is the max abs
difference of the logits. Anything a check patches is restored before it returns.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_parity import train_harness as th
from twin_parity.pitfalls.common import Measurement, Pitfall, isolated, max_abs
from twin_common import GPTConfig

CFG = GPTConfig.llama_tiny()
LOGITS = "max abs error of the logits (float32, Llama-style preset)"


def _perturbed_torch_gpt(cfg: GPTConfig):
    """The harness's torch GPT with every parameter moved off its init (PERTURB_STD)."""
    model = th.new_torch_gpt(cfg, "float32", 0).eval()
    rng = np.random.default_rng(7)
    wc.import_(model, {k: (v + h.PERTURB_STD * rng.standard_normal(v.shape)).astype(v.dtype)
                       for k, v in wc.export(model).items()})  # fmt: skip
    return model


def _tokens(cfg: GPTConfig = CFG) -> np.ndarray:
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 48))


def _logits(model, idx: np.ndarray) -> np.ndarray:
    if hasattr(model, "parameters"):
        import torch

        with torch.no_grad():
            return model(torch.as_tensor(idx)).numpy()
    return np.asarray(model(idx))


def _gpt_error(
    torch_cfg: GPTConfig = CFG, flax_cfg: GPTConfig | None = None, arrays=None, patch=None, patch_torch=None
) -> float:
    """Logits of the torch twin (``torch_cfg``, perturbed) against the Flax twin (``flax_cfg``,
    default the same) given the torch twin's weights (edited by ``arrays`` if given), with
    ``patch`` / ``patch_torch`` (context-manager factories) active while the Flax / torch twin is
    built and run."""
    idx = _tokens(torch_cfg)
    with isolated():
        with patch_torch() if patch_torch else _nothing():
            t = _perturbed_torch_gpt(torch_cfg)
            ref = _logits(t, idx)
        weights = wc.export(t)
        with patch() if patch else _nothing():
            j = th.new_flax_gpt(flax_cfg or torch_cfg, "float32", 100)
            j.eval()
            wc.import_(j, arrays(dict(weights)) if arrays else weights)
            return max_abs(ref, _logits(j, idx))


def _nothing():
    return mock.patch.dict({})  # a no-op context manager


# --------------------------------------------------------------------------------------- the checks


def check_rope_layout() -> Measurement:
    interleaved = dataclasses.replace(CFG, rope_layout="interleaved")
    return Measurement(
        _gpt_error(CFG, interleaved), _gpt_error(CFG, CFG),
        f"{LOGITS}: half-split weights run by a twin rotating interleaved pairs, vs the same layout",
    )


def check_qk_permutation() -> Measurement:
    """Meta's direction: an interleaved checkpoint (the torch twin) into a half-split twin."""
    from twin_common.params import relayout_rope, table_for

    meta = dataclasses.replace(CFG, rope_layout="interleaved")
    permuted = lambda w: relayout_rope(w, table_for(CFG), "half")  # noqa: E731
    return Measurement(
        _gpt_error(meta, CFG), _gpt_error(meta, CFG, arrays=permuted),
        f"{LOGITS}: an interleaved (Meta-layout) checkpoint loaded into a half-split twin, q/k rows "
        f"copied vs permuted",
    )


def check_gqa_repeat() -> Measurement:
    import jax.numpy as jnp

    import jax_impl.block as jb

    def tiled(k, group):  # kv0 kv1 kv0 kv1: the whole set of key/value heads repeated
        return jnp.tile(k, (1, 1, group, 1))

    return Measurement(
        _gpt_error(patch=lambda: mock.patch.object(jb, "repeat_kv", tiled)), _gpt_error(),
        f"{LOGITS}: Flax twin with its key/value heads tiled instead of repeated (4 query heads, 2 kv)",
    )


def check_rmsnorm_eps_flax() -> Measurement:
    from flax import nnx

    import jax_impl.block as jb

    def library_rmsnorm(cfg, *, param_dtype, rngs):
        return nnx.RMSNorm(cfg.d_model, param_dtype=param_dtype, rngs=rngs)  # epsilon 1e-6

    return Measurement(
        _gpt_error(patch=lambda: mock.patch.object(jb, "norm", library_rmsnorm)), _gpt_error(),
        f"{LOGITS}: Flax twin's norms as nnx.RMSNorm with its default epsilon 1e-6 (the file says 1e-5)",
    )


def check_rmsnorm_eps_torch() -> Measurement:
    import torch

    import torch_impl.block as tb

    def library_rmsnorm(cfg):
        return torch.nn.RMSNorm(cfg.d_model)  # eps=None: torch.finfo(float32).eps, 1.19e-7

    return Measurement(
        _gpt_error(patch_torch=lambda: mock.patch.object(tb, "norm", library_rmsnorm)), _gpt_error(),
        f"{LOGITS}: torch twin's norms as nn.RMSNorm with its default eps (float32 machine epsilon, "
        f"1.19e-7; the file says 1e-5)",
    )


def check_rmsnorm_stat_dtype() -> Measurement:
    """bfloat16 block, ln_1 against float64 applied to the same bfloat16 input, in bfloat16 ulps of
    max |truth|: the statistic in bfloat16 vs the pinned float32."""
    import torch

    import torch_impl.block as tb
    from twin_common.reference import block_sublayers

    cfg = dataclasses.replace(CFG.block_config(), d_model=128, block_size=8, mlp_hidden=344)

    def bf16_statistic(self, x):  # the mean of squares taken in x's dtype
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y

    def ulps(patched: bool) -> float:
        x = h.make_input(h.LESSON_SHAPE, "bfloat16") * 3
        with isolated(), mock.patch.object(tb.RMSNorm, "forward", bf16_statistic) if patched else _nothing():
            model = h.new_torch_block(cfg, "bfloat16", "cpu", 0)
            inter = h.run_torch(model, x, "cpu")
        truth = block_sublayers(h.native_weights(model), x, cfg, inter)["ln_1"]
        return max_abs(inter["ln_1"], truth) / h._bf16_ulp(float(np.max(np.abs(truth))))

    return Measurement(
        ulps(True), ulps(False),
        "ln_1 error in bfloat16 ulps of max |truth| (torch twin, bfloat16 (5, 8, 128) input x 3): "
        "statistic in bfloat16 vs float32",
    )


def check_swiglu_swap() -> Measurement:
    def swapped(weights: dict) -> dict:
        for i in range(CFG.n_layers):
            g, u = f"blocks.{i}.mlp.gate_proj.weight", f"blocks.{i}.mlp.up_proj.weight"
            weights[g], weights[u] = weights[u], weights[g]
        return weights

    return Measurement(
        _gpt_error(arrays=swapped), _gpt_error(),
        f"{LOGITS}: gate_proj and up_proj loaded into each other's place (same shape, no error)",
    )


def check_rope_theta() -> Measurement:
    smollm = dataclasses.replace(CFG, rope_theta=100000.0)  # SmolLM2's value
    return Measurement(
        _gpt_error(smollm, CFG), _gpt_error(smollm, smollm),
        f"{LOGITS}: weights of a rope_theta 100000 model (SmolLM2's) run with LlamaConfig's default 10000",
    )


def check_left_pad_positions() -> Measurement:
    """The torch twin (eager: no compiled step can keep the patched positions), learned positions
    (the GPT-2 preset of the cache check) where the slip shows; the rotary figure goes in the text."""
    import torch_impl.gpt as tg
    from twin_parity import generate_harness as gh

    def slots_as_positions(slots, start):  # forgets that a left-padded row starts later
        return slots[None, :].expand(start.shape[0], -1)

    def error(base, patched: bool) -> float:
        with isolated(), mock.patch.object(tg, "position_ids", slots_as_positions) if patched else _nothing():
            return gh.kv_cache_check("torch", "float32", base=base).max_abs_err

    rope = error(gh.LLAMA_CACHE_CFG, True)
    return Measurement(
        error(gh.CACHE_CFG, True), error(gh.CACHE_CFG, False),
        "max abs error of cached vs uncached logits, torch twin, a left-padded batch of 3 prompts "
        f"(lengths 5, 11, 1), learned positions: positions from the cache slot vs slot minus the row's "
        f"start (rotary positions, the same slip: {rope:.2e}, since a shift common to a row's queries "
        f"and keys cancels in q . k)",
    )


LLAMA_PITFALLS: tuple[Pitfall, ...] = (
    Pitfall(
        "rope-layout", "Rotary layout: half-split vs interleaved",
        "transformers' Llama rotates feature pairs (i, i + hs/2) of each head (rotate_half); Meta's "
        "original Llama and GPT-J rotate adjacent pairs (2i, 2i + 1). Same weights, other pairs: a "
        "different model, no error.",
        "BlockConfig.rope_layout ('half' by default) chooses the pairs in rotate() of both "
        "torch_impl/block.py and jax_impl/block.py; the transformers importer reads half-split.",
        check_rope_layout,
    ),
    Pitfall(
        "qk-permutation", "The q/k permutation between rope layouts",
        "A checkpoint moved between the two layouts needs the rows of q_proj and k_proj permuted "
        "within each head (transformers' convert_llama_weights_to_hf permute); a plain copy loads "
        "without error.",
        "The table's rope_heads column marks those rows (twin_common/params.py) and "
        "relayout_rope() permutes them; weight_conversion/hf_llama_table.py applies it both ways.",
        check_qk_permutation,
    ),
    Pitfall(
        "gqa-repeat", "Grouped-query heads: repeat, not tile",
        "With n_kv_heads < n_heads, query head h reads key/value head h // group: each kv head is "
        "repeated in place (repeat_interleave / jnp.repeat); tiling the set (torch .repeat, "
        "jnp.tile) pairs the wrong heads without an error.",
        "repeat_kv() in both twins' block.py; the float64 reference picks kv head h // group by index.",
        check_gqa_repeat,
    ),
    Pitfall(
        "rmsnorm-eps-flax", "RMSNorm epsilon: nnx.RMSNorm's 1e-6",
        "Flax nnx.RMSNorm defaults to epsilon 1e-6 (Llama 1's value); Llama 2 and SmolLM2 files say "
        "1e-5. Small activations (embeddings of std 0.02) feel it.",
        "Both twins write RMSNorm themselves with BlockConfig.ln_eps, read from the file's rms_norm_eps.",
        check_rmsnorm_eps_flax,
    ),
    Pitfall(
        "rmsnorm-eps-torch", "RMSNorm epsilon: nn.RMSNorm's machine epsilon",
        "torch nn.RMSNorm defaults eps to float32's machine epsilon (1.19e-7), neither Llama's 1e-5 "
        "nor Flax's 1e-6.",
        "RMSNorm in torch_impl/block.py passes BlockConfig.ln_eps.",
        check_rmsnorm_eps_torch,
    ),
    Pitfall(
        "rmsnorm-stat-dtype", "RMSNorm statistic in bfloat16",
        "transformers' LlamaRMSNorm computes mean(x^2) and the division in float32 and rounds once; "
        "a port that keeps bfloat16 throughout rounds the statistic too.",
        "RMSNorm in both twins upcasts to at least float32 before the statistic.",
        check_rmsnorm_stat_dtype,
    ),
    Pitfall(
        "swiglu-swap", "SwiGLU gate and up swapped",
        "down(silu(gate(x)) * up(x)) is not symmetric in gate and up, but their weights have the "
        "same shape: loaded into each other's place they raise nothing.",
        "SwiGLU keeps transformers' names (gate_proj, up_proj, down_proj) and the tables map each by name.",
        check_swiglu_swap,
    ),
    Pitfall(
        "rope-theta-default", "rope_theta default",
        "LlamaConfig defaults rope_theta to 10000; Llama 3 uses 500000, SmolLM2 100000. A port that "
        "assumes the default computes other angles at every position but 0.",
        "weight_conversion/hf_llama.py reads rope_theta (rope_parameters or the 4.x top-level field) "
        "into BlockConfig.rope_theta and refuses every rope type it does not compute.",
        check_rope_theta,
    ),
    Pitfall(
        "left-pad-positions", "Position ids of left-padded rows",
        "In a left-padded batch a short prompt starts at a later cache slot; its positions must "
        "still start at 0. With learned positions a slot used as the position reads the wrong "
        "rows of wpe; with rotary ones a shift shared by a row's queries and keys cancels in q . k.",
        "position_ids() in both twins' gpt.py: cache slot minus the row's first real slot.",
        check_left_pad_positions,
    ),
)  # fmt: skip


def measure_all() -> list[tuple[Pitfall, Measurement]]:
    return [(p, p.check()) for p in LLAMA_PITFALLS]


if __name__ == "__main__":
    import time

    for pitfall in LLAMA_PITFALLS:
        start = time.perf_counter()
        m = pitfall.check()
        print(f"{pitfall.id:20} {m.ignored!s:>24} {m.pinned!s:>24}  {time.perf_counter() - start:5.1f}s  {m.quantity}")
