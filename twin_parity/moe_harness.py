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


# ------------------------------------------------------------------------------ the expert axis

# (data, model, expert) meshes with an expert axis: moe_tiny's 4 experts, 2 per device, tokens split
# over (data, expert). JAX on 4 simulated devices, torch on gloo processes.
JAX_EXPERT_MESHES = ((2, 1, 2),)
TORCH_EXPERT_MESHES = ((1, 1, 2), (2, 1, 2))
EXPERT_STEPS = 5
ROWS_PER_EXPERT_MESH = 4  # forward, gradients, AdamW steps, collectives
# what each sabotage breaks: "strided-experts" (both): pairs sent to device e % S while the table
# holds experts e // S's block there (the values rows fail); "no-all-to-all" (JAX): the dense-masked
# fallback on expert-split weights, GSPMD's collectives in place of the dispatch (values right, the
# collectives row fails); "unpooled-aux" (torch): each process's load-balancing statistics its own.
JAX_SABOTAGES = ("strided-experts", "no-all-to-all")


def expected_expert_collectives(cfg=MOE_GPT) -> dict[str, int]:
    """A forward's collectives on a mesh with an expert axis (model 1): two all-to-alls per MoE layer
    (the pairs out to their experts' devices, the results back), nothing else (every other layer
    runs on its own rows with replicated weights)."""
    return {"all-to-all": 2 * cfg.n_layers}


def _expert_rows(framework: str, mesh, ref: dict, got: dict, comm: dict, groups_ok: bool, placement: str) -> list[h.Result]:
    """The four rows of one framework on one expert mesh: logits, gradients (every parameter, torch
    layout), the losses and final parameters of EXPERT_STEPS AdamW steps, and the forward's
    collectives against expected_expert_collectives."""
    from twin_parity.sharded_compare import SHARDED_TOLERANCE

    name = f"data={mesh[0]},expert={mesh[2]}"
    direction = f"{framework}:1 device->{framework}:{name}"
    devices = ("cpu", None) if framework == "torch" else (None, "cpu")
    config = {"model": "moe", "mesh": {"data": mesh[0], "model": mesh[1], "expert": mesh[2]}, "experts": placement}

    def worst(a: dict, b: dict) -> tuple[float, float, str | None]:
        errs = {k: float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a}
        peak = max(float(np.max(np.abs(np.asarray(v)))) for v in a.values())
        bad = next((k for k, e in errs.items() if not e <= SHARDED_TOLERANCE), None)
        e = max(errs.values())
        return e, e / peak if peak else 0.0, bad

    rows = []
    e, rel, bad = worst({"logits": ref["logits"]}, {"logits": got["logits"]})
    rows.append(("sharded_forward", e, rel, bad))
    e, rel, bad = worst(ref["grads"], got["grads"])
    rows.append(("sharded_grad", e, rel, bad))
    loss_rel = [abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"])]
    e, rel, bad = worst(ref["weights"], got["weights"])
    bad_step = next((f"loss at step {i}" for i, r in enumerate(loss_rel) if not r <= SHARDED_TOLERANCE), None)
    rows.append(("sharded_train_step", e, max(loss_rel), bad_step or bad))
    want = expected_expert_collectives()
    off = sum(abs(comm.get(op, 0) - want.get(op, 0)) for op in set(want) | set(comm))
    first = None if off == 0 and groups_ok else (
        f"{comm} (expected {want})" if off else "all-to-all not over the expert axis groups")  # fmt: skip
    out = [h.Result(check, [th.TRAJECTORY.batch_size, th.TRAJECTORY.seq_len], "float32", *devices, direction,
                    e, rel, SHARDED_TOLERANCE, bad is None, bad, None, config={**config, "steps": EXPERT_STEPS})
           for check, e, rel, bad in rows]  # fmt: skip
    out.append(h.Result("sharded_collectives", [], "float32", *devices, f"{framework}:{name} forward vs 2 all-to-all per MoE layer",
                        float(off), float(off), 0.0, first is None, first, None, config={**config, "counts": comm}))  # fmt: skip
    return out


def _strided(exchange):
    """Sabotage, for either twin's ``exchange``: expert e sent to device e % S (strided) while the
    table puts experts e // S's block on device s (Shard(0)): a plausible slip that runs, with
    every shape right."""

    def sabotaged(x, chosen, weight, experts, all_to_all, n_shards):
        N, k, E = chosen.shape
        strided = chosen.reshape(N, k, E // n_shards, n_shards).swapaxes(-1, -2).reshape(N, k, E)
        return exchange(x, strided, weight, experts, all_to_all, n_shards)

    return sabotaged


def jax_expert_rows(sabotage: str | None = None) -> list[h.Result]:
    """JAX on JAX_EXPERT_MESHES (simulated CPU devices: this process must have started with
    XLA_FLAGS=--xla_force_host_platform_device_count >= 4) against one device: logits, gradients of
    the training loss (cross-entropy + router losses), EXPERT_STEPS AdamW steps, and the forward's
    collectives read from the compiled HLO. ``sabotage``: one of JAX_SABOTAGES (some row must fail)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl import sharding as S
    from jax_impl.gpt import GPT, model_loss
    from jax_impl.train import Trainer, flax_path, split
    from twin_common.mesh import MeshShape
    from twin_common.params import table_for
    from twin_parity.sharded_hlo import axis_groups, hlo_collectives, jax_counts

    if sabotage == "strided-experts":
        S.exchange = _strided(S.exchange)
    elif sabotage == "no-all-to-all":
        S.ExpertAllToAll.__call__ = lambda self, x, chosen, weight, experts: experts(x, (chosen * weight[..., None]).sum(1))
    elif sabotage is not None:
        raise ValueError(f"no JAX sabotage {sabotage!r}")
    cfg, tcfg = MOE_GPT, th.TRAJECTORY
    batches = [th.token_batch(cfg, tcfg.batch_size, tcfg.seq_len, 0, s) for s in range(EXPERT_STEPS)]
    x, y = (jnp.asarray(a, jnp.int32) for a in batches[0])
    by_path = {spec.flax_path: spec for spec in table_for(cfg)}

    def run(mesh) -> dict:
        model = GPT(cfg, rngs=nnx.Rngs(0))
        if mesh is None:
            graphdef, params, rest = split(model)
            fwd, grad = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x)), {}
            text = ""
        else:
            fwd, params, rest = S.make_forward(model, mesh)
            compiled = fwd.lower(params, rest, x).compile()
            fwd, text = compiled, compiled.as_text()
            graphdef = split(model)[0]
            p_sh, _, r_sh, b_sh, _ = S.state_shardings(model, mesh)
            grad = {"in_shardings": (p_sh, r_sh, b_sh, b_sh), "out_shardings": p_sh}
        g = jax.jit(jax.grad(lambda p, r, x, y: model_loss(nnx.merge(graphdef, p, r), x, y)), **grad)(params, rest, x, y)
        trainer = (Trainer(GPT(cfg, rngs=nnx.Rngs(0)), tcfg) if mesh is None
                   else S.ShardedTrainer(GPT(cfg, rngs=nnx.Rngs(0)), tcfg, mesh))  # fmt: skip
        losses = [float(trainer.step(*b)[0]) for b in batches]
        return {"logits": np.asarray(fwd(params, rest, x)), "losses": losses, "weights": trainer.state()[0], "hlo": text,
                "grads": {by_path[flax_path(kp)].torch_key: by_path[flax_path(kp)].transform.to_torch(np.asarray(v))
                          for kp, v in jax.tree_util.tree_leaves_with_path(g)},
                "placement": str(getattr(trainer.params["blocks"][0]["mlp"]["experts"]["gate_proj"].sharding, "spec", None))}  # fmt: skip

    rows = []
    with matched_precision():
        ref = run(None)
        for mesh in JAX_EXPERT_MESHES:
            got = run(S.make_mesh(MeshShape(*mesh)))
            found = hlo_collectives(got["hlo"])
            expert_groups = axis_groups(np.arange(int(np.prod(mesh))).reshape(mesh), 2)
            groups_ok = all(sorted(sorted(g) for g in groups) == expert_groups
                            for op, groups in found if op == "all-to-all")  # fmt: skip
            rows += _expert_rows("jax", mesh, ref, got, jax_counts(found), groups_ok, got["placement"])
    return rows


TORCH_SABOTAGES = ("strided-experts", "unpooled-aux")


def _torch_expert_rank(rank: int, world: int, port: int, out: str, mesh: tuple[int, int, int], sabotage) -> None:
    """One gloo process of the torch expert-axis run on ``mesh`` (data, model, expert): its rows'
    logits and the forward's collectives (CommDebugMode), the gathered gradients of the training loss
    and EXPERT_STEPS AdamW steps (losses, final weights), written to ``out``.RANK."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # what torchrun sets  # fmt: skip
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # FSDP2's hooks, harmless here
    import torch
    from torch.distributed.tensor.debug import CommDebugMode

    from torch_impl import sharding as S
    from torch_impl.gpt import GPT
    from twin_common.mesh import MeshShape

    if sabotage == "strided-experts":
        S.exchange = _strided(S.exchange)
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")  # torch's CPU default, pinned as in matched_precision
    cfg, tcfg = MOE_GPT, th.TRAJECTORY
    device_mesh = S.init_distributed(MeshShape(*mesh), cfg, batch_size=tcfg.batch_size, timeout_s=60)
    batches = [th.token_batch(cfg, tcfg.batch_size, tcfg.seq_len, 0, s) for s in range(EXPERT_STEPS)]
    local = [(S.local_rows(x, device_mesh), S.local_rows(y, device_mesh)) for x, y in batches]

    def trainer():
        torch.manual_seed(0)
        t = S.ShardedTrainer(GPT(cfg), tcfg, device_mesh)
        if sabotage == "unpooled-aux":  # each process's router statistics its own rows'
            t.loss_of = t.loss_of.func
        return t

    torch.manual_seed(0)
    model = S.shard_model(GPT(cfg), device_mesh).eval()
    comm = CommDebugMode()
    with torch.no_grad(), comm:
        logits = model(torch.from_numpy(local[0][0])).numpy()
    counts = {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}
    t = trainer()
    t.loss_of(t.model, torch.from_numpy(local[0][0]), torch.from_numpy(local[0][1])).backward()
    grads = {k: S.gather(p.grad).numpy().tolist() for k, p in t.model.named_parameters()}
    t = trainer()
    losses = [float(t.step(*b)[0]) for b in batches]
    weights = {k: v.tolist() for k, v in t.state()[0].items()}
    doc = {"row": S.batch_mesh(device_mesh).get_local_rank(), "logits": logits.tolist(), "counts": counts}
    if rank == 0:
        doc.update(grads=grads, losses=losses, weights=weights, placement=str(t.model.blocks[0].mlp.experts.gate_proj.placements))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(doc, f)
    S.finish(device_mesh)


def torch_expert_rows(mesh: tuple[int, int, int] = (2, 1, 2), sabotage: str | None = None) -> list[h.Result]:
    """torch on ``mesh`` (gloo processes, forked) against one device in this process: the logits of
    every row, the gradients of the training loss, EXPERT_STEPS AdamW steps, and the forward's
    collectives (CommDebugMode on rank 0). ``sabotage``: one of TORCH_SABOTAGES (some row must fail)."""
    import json
    import os
    import socket
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from torch_impl.gpt import GPT
    from torch_impl.gpt import model_loss
    from torch_impl.train import Trainer

    if sabotage not in (None, *TORCH_SABOTAGES):
        raise ValueError(f"no torch sabotage {sabotage!r}")
    cfg, tcfg = MOE_GPT, th.TRAJECTORY
    batches = [th.token_batch(cfg, tcfg.batch_size, tcfg.seq_len, 0, s) for s in range(EXPERT_STEPS)]
    world = int(np.prod(mesh))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.start_processes(_torch_expert_rank, args=(world, port, out, mesh, sabotage), nprocs=world, start_method="fork")
        docs = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                docs.append(json.load(f))
    by_row = {d["row"]: np.asarray(d["logits"]) for d in docs}  # model ranks of a row group agree
    got = {"logits": np.concatenate([by_row[i] for i in sorted(by_row)]), "losses": docs[0]["losses"],
           "grads": docs[0]["grads"], "weights": docs[0]["weights"]}  # fmt: skip
    with matched_precision():
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        x, y = (torch.from_numpy(a) for a in batches[0])
        with torch.no_grad():
            logits = model(x).numpy()
        torch.manual_seed(0)
        model = GPT(cfg)
        model_loss(model, x, y).backward()
        grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
        torch.manual_seed(0)
        one = Trainer(GPT(cfg), tcfg)
        ref = {"logits": logits, "grads": grads, "losses": [float(one.step(*b)[0]) for b in batches],
               "weights": one.state()[0]}  # fmt: skip
    # CommDebugMode names c10d's ops: dist.all_to_all_single is alltoall_base_
    counts = {("all-to-all" if op.startswith("alltoall") else op): n for op, n in docs[0]["counts"].items()}
    return _expert_rows("torch", mesh, ref, got, counts, True, docs[0]["placement"])


def run_jax_expert(timeout: float = 600, sabotage: str | None = None) -> list[dict]:
    """jax_expert_rows in a subprocess with 4 simulated CPU devices; the rows as dicts (``sabotage``:
    one of JAX_SABOTAGES)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "twin_parity.moe_harness", "jax-expert", *([sabotage] if sabotage else [])],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"the sharded MoE worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] != ["jax-expert"] or len(sys.argv) > 3:
        sys.exit("usage: python -m twin_parity.moe_harness jax-expert [SABOTAGE]")
    print(json.dumps([r.to_json() for r in jax_expert_rows(*sys.argv[2:])]))
