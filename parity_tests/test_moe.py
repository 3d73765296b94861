"""Mixture-of-Experts twins (``mlp="moe"``): twin against twin, each twin against the float64 NumPy
MoE (twin_common/moe.py: a stable sort and a gather dispatch, unlike the twins' ranks and
dense-masked einsum), the tie rule, the capacity drop order, the router losses, the config checks,
and training, resume, KV cache and generation through the dense checks (twin_parity/moe_harness.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import jax.numpy as jnp
import torch

import jax_impl.moe as jm
import torch_impl.moe as tm
from twin_parity import harness as h
from twin_parity import moe_harness as mh
from twin_common import GPTConfig
from twin_common.moe import capacity, route, router_losses
from twin_common.precision import matched_precision
from twin_common.reference import block_forward
from twin_common.params import table_for

CFG = mh.MOE_BLOCK


def _result_ok(r):
    assert r.passed, (r.max_abs_err, r.first_divergence, r.divergence_detail, r.config)


# ------------------------------------------------------------------------------ twin against twin


@pytest.mark.parametrize("dtype", h.PARITY_DTYPES)
def test_moe_block_twins_match(dtype):
    _result_ok(mh.forward_check(dtype, "torch->jax"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", h.PARITY_DTYPES)
def test_moe_block_twins_match_jax_to_torch(dtype):
    _result_ok(mh.forward_check(dtype, "jax->torch"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_routing_equal_except_undecidable(dtype):
    """512 tokens: float32 routes every token alike; bfloat16 may differ only on flagged tokens."""
    r = mh.routing_check(dtype)
    _result_ok(r)
    if dtype == "float32":
        assert r.config["differ"] == 0 and r.config["undecidable"] == 0, r.config


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_each_twin_matches_float64_reference(framework, capacity_factor):
    """Each twin alone, float64, against the NumPy MoE: every intermediate <= 1e-12, dropless and
    with tokens dropped (capacity 0.75 drops about a quarter of the pairs)."""
    cfg = dataclasses.replace(CFG, capacity_factor=capacity_factor)
    x = h.make_input(h.LESSON_SHAPE, "float64")
    with matched_precision(x64=True):
        if framework == "torch":
            model = h.new_torch_block(cfg, "float64", "cpu", 0)
            got = h.run_torch(model, x, "cpu")
        else:
            model = h.new_flax_block(cfg, "float64", h.jax_devices()["cpu"], 0)
            got = h.run_flax(model, x, h.jax_devices()["cpu"])
    truth = block_forward(h.native_weights(model), x, cfg)
    for name in h.INTERMEDIATES:
        assert np.max(np.abs(got[name] - truth[name])) <= 1e-12, name
    if capacity_factor is not None:  # the drops happened: fewer pairs kept than chosen
        _, _, kept = route(got["router_logits"], cfg)
        assert 0 < (~kept).sum() < kept.size // 2


# ------------------------------------------------------------------------------ the rules


def _both_routes(logits: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    t = tm.route(torch.from_numpy(logits), cfg).numpy()
    j = np.asarray(jm.route(jnp.asarray(logits), cfg))
    return t, j


def test_ties_go_to_the_lower_expert_index():
    """All-equal logits (a zero-initialised router routes every token so) and ties at the cut:
    both twins choose the lower indices; torch.topk on this CPU picks others (the pitfall)."""
    cfg = dataclasses.replace(CFG, n_experts=8, top_k=2)
    logits = np.zeros((3, 8), np.float32)
    logits[1] = [0, 1, 3, 3, 3, 0, 0, 0]  # a three-way tie for two places: experts 2 and 3
    logits[2] = [5, 1, 1, 1, 1, 1, 1, 1]  # 0 first, then a seven-way tie for the second place: 1
    t, j = _both_routes(logits, cfg)
    np.testing.assert_array_equal(t, j)
    assert [sorted(np.nonzero(row)[0].tolist()) for row in t] == [[0, 1], [2, 3], [0, 1]]
    library = torch.topk(torch.from_numpy(logits), 2).indices.sort(-1).values.tolist()
    assert library != [[0, 1], [2, 3], [0, 1]], "torch.topk now breaks ties by index: the pitfall is gone"


def test_route_matches_reference_weights_and_norm_topk_prob():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 4)).astype(np.float64)
    for norm in (True, False):
        cfg = dataclasses.replace(CFG, norm_topk_prob=norm)
        choice, weight, kept = route(logits, cfg)
        dense = np.zeros_like(logits)
        np.put_along_axis(dense, choice, weight * kept, -1)
        with matched_precision(x64=True):
            t, j = _both_routes(logits, cfg)
        assert np.max(np.abs(t - dense)) <= 1e-15 and np.max(np.abs(j - dense)) <= 1e-15
        assert np.allclose(dense.sum(-1), 1.0) == norm  # renormalised weights sum to 1


def test_capacity_drop_order_is_token_then_rank():
    """Four tokens all choosing experts 0 then 1, capacity ceil(0.5 * 2 * 4 / 2) = 2 per expert:
    tokens 0 and 1 keep both choices, tokens 2 and 3 lose both (token order beats choice rank)."""
    cfg = dataclasses.replace(CFG, n_experts=2, top_k=2, capacity_factor=0.5)
    assert capacity(4, 2, 2, 0.5) == 2
    logits = np.tile(np.array([[2.0, 1.0]], np.float32), (4, 1))
    t, j = _both_routes(logits, cfg)
    np.testing.assert_array_equal(t, j)
    assert (t[:2] > 0).all() and (t[2:] == 0).all()
    _, _, kept = route(logits, cfg)
    assert kept.tolist() == [[True, True], [True, True], [False, False], [False, False]]


def test_router_losses_match_reference():
    """Both twins' load-balancing and z losses against float64 NumPy, over two layers pooled."""
    rng = np.random.default_rng(1)
    layers = [rng.standard_normal((2, 8, 4)) * 2 for _ in range(2)]
    ref = router_losses(layers, 2)
    with matched_precision(x64=True):
        t = tm.router_losses([torch.from_numpy(z) for z in layers], CFG)
        j = jm.router_losses([jnp.asarray(z) for z in layers], CFG)
    for got in (t, j):
        assert abs(float(got[0]) - ref[0]) <= 1e-12 and abs(float(got[1]) - ref[1]) <= 1e-12
    assert ref[0] >= 1.0 - 1e-12 and ref[1] > 0  # balance >= 1 (equality: perfectly balanced); z > 0


def test_router_losses_reach_the_gradient():
    """The loss coefficients are live: the router's gradient changes with router_aux_loss_coef."""
    from torch_impl.gpt import GPT, model_loss

    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 64, (2, 16)))
    grads = []
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(mh.MOE_GPT, router_aux_loss_coef=coef, router_z_loss_coef=0.0))
        model_loss(model, idx, idx).backward()
        grads.append(model.blocks[0].mlp.router.weight.grad.clone())
    assert float((grads[0] - grads[1]).abs().max()) > 1e-6


def test_router_runs_in_float32_in_a_bfloat16_model():
    with matched_precision():
        t = h.new_torch_block(CFG, "bfloat16", "cpu", 0)
        j = h.new_flax_block(CFG, "bfloat16", h.jax_devices()["cpu"], 0)
        x = h.make_input(h.LESSON_SHAPE, "bfloat16")
        _, inter_t = t(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16), return_intermediates=True)
        _, inter_j = j(jnp.asarray(x), return_intermediates=True)
    assert inter_t["router_logits"].dtype == torch.float32 and inter_j["router_logits"].dtype == jnp.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the torch trainer's bf16 mode
        _, inter = h.new_torch_block(CFG, "float32", "cpu", 0)(torch.randn(2, 8, 128), return_intermediates=True)
    assert inter["router_logits"].dtype == torch.float32


# ------------------------------------------------------------------------------ table and config


def test_table_rows_for_router_and_stacked_experts():
    rows = {s.torch_key: s for s in table_for(CFG)}
    E, C, H = CFG.n_experts, CFG.d_model, CFG.d_hidden
    assert rows["mlp.router.weight"].torch_shape == (E, C) and rows["mlp.router.weight"].flax_shape == (C, E)
    for name, shape in (("gate_proj", (E, H, C)), ("up_proj", (E, H, C)), ("down_proj", (E, C, H))):
        spec = rows[f"mlp.experts.{name}"]
        assert spec.torch_shape == spec.flax_shape == shape and spec.decay
        assert spec.split.torch_dim(spec) == spec.split.flax_dim(spec) == 0  # whole experts per device
    assert not any(k.startswith("mlp.") and k not in rows for k in dict(h.new_torch_block(CFG, "float32", "cpu", 0).state_dict()))


def test_moe_config_refusals_name_each_field():
    with pytest.raises(ValueError, match="n_experts") as e:
        GPTConfig.llama(mlp="moe", n_experts=None, mlp_bias=True)
    assert "no biases" in str(e.value)
    with pytest.raises(ValueError, match="top_k=3 is more than n_experts=2"):
        GPTConfig.mixtral(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        GPTConfig.mixtral(capacity_factor=0.0)
    with pytest.raises(ValueError, match="only mlp='moe' routes"):
        GPTConfig(n_experts=4)


def test_dense_config_dicts_without_the_moe_fields_still_load():
    from twin_common.config import ADDED_FIELDS, config_differences

    old = {k: v for k, v in GPTConfig().to_dict().items() if k not in ("n_experts", "top_k", "capacity_factor")}
    assert config_differences(old, GPTConfig().to_dict(), what="config", where="old") == []
    assert all(ADDED_FIELDS[k] == getattr(GPTConfig(), k) for k in ("n_experts", "top_k", "norm_topk_prob"))


def test_mixtral_small_preset_shape():
    cfg = GPTConfig.mixtral_small()
    assert (cfg.n_experts, cfg.top_k, cfg.kv_heads, cfg.d_hidden / cfg.d_model) == (8, 2, 2, 3.5)


# ------------------------------------------------------------------------------ training and generation


def test_moe_grad_with_router_losses():
    _result_ok(mh.grad_check("torch->jax"))


def test_moe_adamw_trajectory():
    _result_ok(mh.trajectory_check("torch->jax"))


@pytest.mark.slow
def test_moe_adamw_trajectory_jax_to_torch():
    _result_ok(mh.trajectory_check("jax->torch"))


@pytest.mark.parametrize("first", ["jax", pytest.param("torch", marks=pytest.mark.slow)])
def test_moe_cross_framework_resume(first):
    _result_ok(mh.resume_check(first))


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_moe_kv_cache(framework):
    _result_ok(mh.kv_cache_check(framework))


@pytest.mark.parametrize("sampling", ["greedy", pytest.param("sampled", marks=pytest.mark.slow)])
def test_moe_generate(sampling):
    _result_ok(mh.generate_check(sampling))


# ------------------------------------------------------------------------------ expert parallelism


def test_mesh_refuses_experts_it_cannot_split():
    from twin_common.mesh import MeshShape, mesh_problems

    cfg = dataclasses.replace(mh.MOE_GPT, n_experts=3)
    problems = mesh_problems(MeshShape(1, 2), cfg)
    assert any("n_experts=3" in p and "model=2" in p for p in problems), problems
    assert mesh_problems(MeshShape(2, 2), mh.MOE_GPT) == []


@pytest.mark.slow
def test_jax_expert_parallel_equals_one_device():
    """Experts split over `model` on 2 and 2x2 simulated devices (logits and 5 AdamW steps), as the
    report runs them (the expert axis: test_jax_expert_axis_equals_one_device)."""
    rows = mh.run_jax_sharded()
    assert len(rows) == 2 * len(mh.SHARDED_MESHES)
    for r in rows:
        assert r.passed and "model" in r.config["splits"]["experts"], r


def test_jax_expert_axis_equals_one_device():
    """data=2,expert=2 on 4 simulated devices against one device: logits, gradients of the training
    loss (router losses included), 5 AdamW steps, all within the sharded bound; and the forward's
    collectives are the dispatch's: 2 all-to-alls per MoE layer over the expert-axis groups, nothing else."""
    rows = {r["check"]: r for r in mh.run_jax_expert()}
    assert set(rows) == {"sharded_forward", "sharded_grad", "sharded_train_step", "sharded_collectives"}
    for r in rows.values():
        assert r["passed"], r
    assert rows["sharded_collectives"]["config"]["counts"] == {"all-to-all": 2 * mh.MOE_GPT.n_layers}
    assert rows["sharded_forward"]["config"]["experts"] == "P('expert', None, None)"


@pytest.mark.slow
@pytest.mark.parametrize("sabotage, fails", [
    ("strided-experts", {"sharded_forward", "sharded_grad", "sharded_train_step"}),
    ("no-all-to-all", {"sharded_collectives"}),
])  # fmt: skip
def test_jax_expert_axis_sabotage_is_caught(sabotage, fails):
    """Pairs sent to the wrong expert shard (experts e % S where the table put e // S) fail every
    values row; the dense-masked fallback on expert-split weights gives the right values, and only
    the collectives row sees that GSPMD moved the weights instead of the tokens."""
    rows = mh.run_jax_expert(sabotage=sabotage)
    assert {r["check"] for r in rows if not r["passed"]} == fails, rows


@pytest.mark.parametrize("mesh", mh.TORCH_EXPERT_MESHES, ids=lambda m: f"data={m[0]},expert={m[2]}")
def test_torch_expert_axis_equals_one_device(mesh):
    """gloo processes on an expert axis against one device: the logits of every row, gradients of the
    training loss, 5 AdamW steps, and rank 0's forward collectives (CommDebugMode): 2 all_to_all_single
    per MoE layer, nothing else."""
    rows = {r.check: r for r in mh.torch_expert_rows(mesh)}
    for r in rows.values():
        assert r.passed, (r.check, r.max_abs_err, r.first_divergence, r.config)
    assert rows["sharded_collectives"].config["counts"] == {"all-to-all": 2 * mh.MOE_GPT.n_layers}
    assert rows["sharded_forward"].config["experts"] == "(Shard(dim=0),)"


@pytest.mark.slow
@pytest.mark.parametrize("sabotage, fails", [
    ("strided-experts", {"sharded_forward", "sharded_grad", "sharded_train_step"}),
    ("unpooled-aux", {"sharded_grad", "sharded_train_step"}),
])  # fmt: skip
def test_torch_expert_axis_sabotage_is_caught(sabotage, fails):
    """The wrong expert shard fails every values row; router statistics left per process (no pooling
    over data x expert) leave the logits right and move the loss (measured 1.6e-4 relative at step
    0 on data=2,expert=2) and the gradients."""
    rows = mh.torch_expert_rows((2, 1, 2), sabotage)
    assert {r.check for r in rows if not r.passed} == fails, [(r.check, r.max_abs_err) for r in rows]


def test_expert_mesh_refusals_name_both_numbers():
    """An expert axis the experts do not divide, one on a dense model, a capacity factor with it,
    a batch that (data x expert) does not divide and too few devices: every problem, both numbers."""
    from twin_common.mesh import MeshShape, check_mesh, mesh_problems, parse_mesh

    assert parse_mesh("data=2,expert=2") == MeshShape(2, 1, 2) and str(MeshShape(2, 1, 2)) == "data=2,model=1,expert=2"
    cfg = dataclasses.replace(mh.MOE_GPT, n_experts=6, capacity_factor=1.25)
    with pytest.raises(ValueError) as e:
        check_mesh(MeshShape(2, 1, 4), cfg, n_devices=4, batch_size=4)
    text = str(e.value)
    for part in ("needs 8 devices, but only 4", "n_experts=6 is not divisible by expert=4",
                 "capacity_factor=1.25 with expert=4", "batch size 4 is not divisible by data=2 x expert=4"):
        assert part in text, text
    dense = mesh_problems(MeshShape(1, 1, 2), GPTConfig(d_model=32, n_heads=4))
    assert len(dense) == 1 and "expert=2 needs a Mixture-of-Experts model" in dense[0] and "data=2" in dense[0], dense
    assert mesh_problems(MeshShape(2, 1, 2), mh.MOE_GPT, n_devices=4, batch_size=4) == []


def test_the_table_puts_experts_on_the_expert_axis_when_there_is_one():
    """Split.EXPERTS: over `expert` on a mesh with that axis, over `model` without (the fallback);
    both plans read it from the table."""
    from types import SimpleNamespace

    from jax_impl.sharding import expert_plan as jax_expert_plan
    from jax_impl.sharding import tp_plan as jax_plan
    from torch_impl.sharding import expert_plan as torch_expert_plan
    from torch_impl.sharding import tp_plan as torch_plan
    from twin_common.mesh import MeshShape
    from twin_common.params import Split

    def FakeMesh(names, shape):  # what expert_plan reads of a jax Mesh (this process has one device)
        return SimpleNamespace(axis_names=names, devices=np.empty(shape))

    for mesh, axis in ((MeshShape(1, 2), "model"), (MeshShape(2, 1, 2), "expert"), (MeshShape(1, 2, 2), "expert")):
        plan = jax_plan(mh.MOE_GPT, mesh)
        for spec in table_for(mh.MOE_GPT):
            want = [None] * len(spec.flax_shape)
            if spec.split is not Split.REPLICATED:
                want[spec.split.flax_dim(spec)] = spec.split.mesh_axis(mesh)
            assert tuple(plan[spec.flax_path]) == tuple(want), (mesh, spec)
            if spec.split is Split.EXPERTS:
                assert want == [axis, None, None], (mesh, spec)
    assert type(torch_plan(mh.MOE_GPT)["blocks.0.mlp.experts"]).__name__ == "ExpertParallel"
    assert "blocks.0.mlp.experts" not in torch_plan(mh.MOE_GPT, MeshShape(1, 1, 2))
    # the dispatch goes on each MoE module the table's expert rows name, in both plans
    assert set(torch_expert_plan(mh.MOE_GPT, MeshShape(1, 1, 2))) == {"blocks.0.mlp", "blocks.1.mlp"}
    assert torch_expert_plan(mh.MOE_GPT, MeshShape(1, 2)) == {}
    assert {".".join(map(str, p)) for p in jax_expert_plan(mh.MOE_GPT, FakeMesh(("data", "model", "expert"), (1, 1, 2)))} == {
        "blocks.0.mlp", "blocks.1.mlp"}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(1, 2), (2, 2)])
def test_torch_expert_parallel_equals_one_device(mesh):
    """Experts split over `model` on gloo processes (ExpertParallel): logits and 5 AdamW steps. On
    data=2 the load-balancing loss is the whole batch's (router_losses' data_mean): without it each
    process's loss saw its own rows only, measured 9.8e-5 relative off one device's loss on 2x2."""
    for r in mh.torch_sharded_rows(mesh):
        assert r.passed and "Shard(dim=0)" in r.config["splits"]["experts"], r


def test_jax_bf16_training_keeps_the_router_in_float32():
    """The JAX trainer's bf16 mode casts every parameter but the router's kernel (cast_params is
    what its jitted step calls); a bf16 step runs in the slow variant."""
    from flax import nnx

    from jax_impl.gpt import GPT
    from jax_impl.train import cast_params, split

    model = GPT(mh.MOE_GPT, rngs=nnx.Rngs(0))
    cast = cast_params(split(model)[1], jnp.bfloat16)
    assert cast["blocks"][0]["mlp"]["router"]["kernel"].dtype == jnp.float32
    assert cast["blocks"][0]["mlp"]["experts"]["gate_proj"].dtype == jnp.bfloat16


@pytest.mark.slow
def test_jax_bf16_training_step_runs():
    from flax import nnx

    from jax_impl.gpt import GPT
    from jax_impl.train import Trainer
    from twin_parity.train_harness import TRAJECTORY, token_batch

    loss, _ = Trainer(GPT(mh.MOE_GPT, rngs=nnx.Rngs(0)), TRAJECTORY, bf16=True).step(*token_batch(mh.MOE_GPT, 2, 16, 0, 0))
    assert np.isfinite(float(loss))
