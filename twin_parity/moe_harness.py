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

from twin_parity import generate_harness as gh
from twin_parity import harness as h
from twin_parity import sharded_rows as sr
from twin_parity import train_harness as th
from twin_common import GPTConfig
from twin_common.moe import compare_routing
from twin_common.precision import matched_precision
from twin_common.tolerances import tolerance_for

# The lesson's (5, 8, 128) input through a MoE block: moe_tiny's block at width 128, experts of 96.
MOE_BLOCK = dataclasses.replace(GPTConfig.moe_tiny().block_config(), d_model=128, block_size=8, mlp_hidden=96)
# The GPT for gradients, training and resume: moe_tiny at block 16 and vocabulary 64 (cheap on CPU).
MOE_GPT = dataclasses.replace(GPTConfig.moe_tiny(), vocab_size=64, block_size=16)
# The GPT for the KV cache: init_std 0.1 for logits of O(1) (peak 3.2; at normal(0,
# 0.02) they are near-uniform and hide cache errors). generate_harness.CACHE_CFG's 0.2 gives this
# model logits of peak 6.1, and float32 rounding at that size alone (relative 2.8e-6, measured)
# reaches 1.7e-5 absolute, over the 1e-5 tolerance without any bug.
MOE_CACHE = dataclasses.replace(GPTConfig.moe_tiny(), block_size=32, init_std=0.1)
# The GPT for generation across frameworks: moe_tiny with the context generate_harness's GPT has
# (96: 8 prompt + 72 new tokens), trained briefly (generate_harness.trained_weights)
MOE_TRAINED = dataclasses.replace(GPTConfig.moe_tiny(), block_size=96)
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
        "routing", list(shape), dtype, "cpu", "cpu",
        f"{direction}: {counts['differ']}/{counts['tokens']} differ, {counts['undecidable']} undecidable", err, err / peak if peak else 0.0,
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
    return gh.generate_check(sampling_name, seed, cfg=MOE_TRAINED)


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


# ------------------------------------------------------------------------------ transformers' Mixtral

# Odd sizes, so that no two dimensions coincide and a swapped one fails on shape or values.
MIXTRAL_VOCAB, MIXTRAL_POSITIONS, MIXTRAL_WIDTH, MIXTRAL_HEADS, MIXTRAL_HIDDEN = 97, 24, 36, 6, 58


def mixtral_config(n_experts: int = 5, top_k: int = 2, n_kv_heads: int = 2, n_layers: int = 2, **overrides):
    """A random small MixtralConfig: rms_norm_eps 1e-5, rope_theta 5000 (not MixtralConfig's 1e6)."""
    from transformers import MixtralConfig

    fields = dict(
        vocab_size=MIXTRAL_VOCAB, max_position_embeddings=MIXTRAL_POSITIONS, hidden_size=MIXTRAL_WIDTH,
        intermediate_size=MIXTRAL_HIDDEN, num_hidden_layers=n_layers, num_attention_heads=MIXTRAL_HEADS,
        num_key_value_heads=n_kv_heads, num_local_experts=n_experts, num_experts_per_tok=top_k,
        rms_norm_eps=1e-5, rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    fields.update(overrides)
    config = MixtralConfig(**fields)
    config._attn_implementation = "eager"
    # transformers 5 runs the experts through torch's grouped_mm by default, which refuses these odd
    # sizes (its strides must be multiples of 16 bytes); "eager" is its per-expert loop
    config._experts_implementation = "eager"
    return config


def new_mixtral(config, seed: int = 0):
    """MixtralForCausalLM with every parameter perturbed by normal(0, 0.5) (its init leaves the
    norms at 1; the large router perturbation spreads the router logits so that routing matters)."""
    import torch
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "gate.weight" in name else h.PERTURB_STD
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def mixtral_outputs(model, idx: np.ndarray) -> dict:
    """transformers' logits, per-layer router logits and load_balancing_loss_func aux loss."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(idx), output_router_logits=True)
    return {"logits": out.logits.numpy().astype(np.float64), "aux": float(out.aux_loss),
            "router_logits": [r.numpy().astype(np.float64) for r in out.router_logits]}  # fmt: skip


def twin_outputs(model, idx: np.ndarray) -> dict:
    """A twin's logits, per-layer router logits and load-balancing loss (its router_losses)."""
    cfg = model.cfg
    if hasattr(model, "training") and not callable(getattr(model, "eval", None)):
        raise TypeError("not a twin")
    try:
        import torch

        is_torch = isinstance(model, torch.nn.Module)
    except ImportError:
        is_torch = False
    if is_torch:
        from torch_impl.moe import router_losses

        with torch.no_grad():
            logits, inter = model(torch.from_numpy(idx), return_intermediates=True)
        to_np = lambda t: t.numpy().astype(np.float64)  # noqa: E731
    else:
        import jax.numpy as jnp

        from jax_impl.moe import router_losses

        logits, inter = model(jnp.asarray(idx, jnp.int32), return_intermediates=True)
        to_np = lambda t: np.asarray(t).astype(np.float64)  # noqa: E731
    routers = [inter[f"blocks.{i}.router_logits"] for i in range(cfg.n_layers)]
    aux = float(router_losses(routers, cfg)[0])
    return {"logits": to_np(logits), "aux": aux,
            "router_logits": [to_np(r).reshape(-1, cfg.n_experts) for r in routers]}  # fmt: skip


def hf_mixtral_pair(framework: str, seed: int = 0, verify: bool = True, **config_overrides):
    """(transformers outputs, twin outputs, twin): a random Mixtral saved with save_pretrained,
    imported into a twin with verify, both run on the same (2, 24) token ids."""
    import tempfile

    from transformers.utils import logging

    from weight_conversion.hf_mixtral import import_hf_mixtral, mixtral_config_from_dir

    hf = new_mixtral(mixtral_config(**config_overrides), seed)
    idx = np.random.default_rng(seed).integers(0, MIXTRAL_VOCAB, (2, MIXTRAL_POSITIONS)).astype(np.int64)
    logging.disable_progress_bar()
    with matched_precision(), tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        cfg = mixtral_config_from_dir(directory)
        twin = th.new_torch_gpt(cfg, "float32", 0) if framework == "torch" else th.new_flax_gpt(cfg, "float32", 0)
        import_hf_mixtral(twin, directory, verify=verify)
        if framework == "jax":
            twin.eval()
        return mixtral_outputs(hf, idx), twin_outputs(twin, idx), twin


def hf_mixtral_check(framework: str, seed: int = 0, **config_overrides) -> h.Result:
    """transformers -> twin, float32: logits (<= 1e-5), router logits (<= 1e-5), the top-k
    choices of every token (identical, but for undecidable tokens) and the aux loss (<= 1e-6
    relative, both float32 means of the same counts)."""
    ref, got, twin = hf_mixtral_pair(framework, seed, **config_overrides)
    tol = tolerance_for("float32").atol
    err = float(np.max(np.abs(ref["logits"] - got["logits"])))
    router_err = max(float(np.max(np.abs(a - b))) for a, b in zip(ref["router_logits"], got["router_logits"]))
    counts = [compare_routing(a, b, twin.cfg.top_k, "float32") for a, b in zip(ref["router_logits"], got["router_logits"])]
    differ = sum(c["differ_decidable"] for c in counts)
    aux_rel = abs(ref["aux"] - got["aux"]) / abs(ref["aux"])
    problems = [name for name, bad in (("logits", not err <= tol), ("router_logits", not router_err <= tol),
                                       ("routing", differ > 0), ("aux_loss", not aux_rel <= 1e-6)) if bad]  # fmt: skip
    peak = float(np.max(np.abs(ref["logits"])))
    return h.Result(
        "hf_mixtral", [2, MIXTRAL_POSITIONS], "float32", "cpu" if framework == "torch" else None,
        "cpu" if framework == "jax" else None, f"transformers->{framework}", err, err / peak, tol,
        not problems, problems[0] if problems else None,
        f"router logits {router_err:.1e}, aux loss relative {aux_rel:.1e}, {differ} tokens routed otherwise"
        if problems else None,
        config={"model": f"mixtral E={twin.cfg.n_experts} k={twin.cfg.top_k}", "router_logits_err": router_err,
                "aux_rel_err": aux_rel, "undecidable": sum(c["undecidable"] for c in counts)},
    )  # fmt: skip


# ------------------------------------------------------------------------------ expert parallelism

SHARDED_MESHES = ((1, 2), (2, 2))  # (data, model); moe_tiny's 4 experts and 2 key/value heads split by 2


def run_jax_sharded() -> list[h.Result]:
    """MOE_GPT on SHARDED_MESHES of simulated CPU devices against one device (sharded_rows): the
    experts split over ``model`` (whole experts per device, the table's EXPERTS rows); GSPMD adds
    their partial outputs with one all-reduce."""
    return sr.run_jax_sharded(MOE_GPT, SHARDED_MESHES)


def torch_sharded_rows(mesh: tuple[int, int] = (1, 2)) -> list[h.Result]:
    """MOE_GPT on ``mesh`` (gloo processes, ExpertParallel) against one device (sharded_rows)."""
    return sr.torch_sharded_rows(MOE_GPT, mesh)


# ------------------------------------------------------------------- rules moe_tiny never takes

# moe_tiny renormalises its top-k weights, is dropless and has a random router (no two logits of a
# token equal), so its rows run none of these branches: a twin that ignored norm_topk_prob=False,
# filled an expert's capacity in another order or broke ties by its library's top-k would pass
# every one of them. Each variant is MOE_BLOCK with one rule at work; the twin that breaks it
# differs from the other (twin_parity/pitfalls/moe.py measures each trap).
VARIANTS = {
    "norm_topk_prob=False": dict(norm_topk_prob=False),  # Mixtral renormalises; Qwen2-MoE does not
    "capacity_factor=0.75": dict(capacity_factor=0.75),  # 15 pairs per expert of 80: a quarter dropped
    "zero router": {},  # every router logit 0: each token's experts are the tie rule's (lower index)
}


def _zeroed_router(build):
    """A block builder whose MoE router weights are zero (a zero-initialised router)."""

    def zeroed(cfg, dtype, device, seed):
        model = build(cfg, dtype, device, seed)
        if hasattr(model.mlp.router, "kernel"):  # Flax: kernel (C, E)
            model.mlp.router.kernel.set_value(0 * model.mlp.router.kernel[...])
        else:
            import torch

            with torch.no_grad():
                model.mlp.router.weight.zero_()
        return model

    return zeroed


def variant_check(variant: str, direction: str, dtype: str = "float32") -> h.Result:
    """The forward check on MOE_BLOCK with one of VARIANTS' rules at work."""
    from unittest import mock

    cfg = dataclasses.replace(MOE_BLOCK, **VARIANTS[variant])
    if variant == "zero router":
        with mock.patch.object(h, "new_torch_block", _zeroed_router(h.new_torch_block)), \
             mock.patch.object(h, "new_flax_block", _zeroed_router(h.new_flax_block)):  # fmt: skip
            r = h.forward_check(cfg, dtype, direction)
    else:
        r = h.forward_check(cfg, dtype, direction)
    r.direction = f"{direction} ({variant})"
    r.config = {"model": "moe block", "n_experts": cfg.n_experts, "top_k": cfg.top_k, "variant": variant}
    return r
