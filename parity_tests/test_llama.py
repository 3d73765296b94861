"""The Llama family's block in both twins: RMSNorm, rotary positions (half-split and interleaved),
grouped-query attention, SwiGLU, per-place biases, as config switches on the one twin pair.

Twin against twin through the conversion table, each twin alone against the float64 NumPy reference
(written unlike the twins: complex-number rotation, key/value heads picked by index), the rope
layout change as a permutation of q/k rows, the KV cache holding n_kv_heads, the mesh refusing kv
heads it cannot split, and old GPT-2 configs still describing the same model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import torch

import weight_conversion as wc
from twin_parity import harness as h
from twin_parity import llama_harness as lh
from twin_common import BlockConfig, GPTConfig
from twin_common.config import config_differences
from twin_common.mesh import MeshShape, mesh_problems
from twin_common.precision import matched_precision
from twin_common.reference import block_forward
from twin_common.params import relayout_rope, rope_permutation, table_for

# the lesson's (5, 8, 128) input through a Llama-style block: 4 query heads of 32 (the report's too)
LLAMA_BLOCK = lh.LLAMA_BLOCK


def llama_block(**switches) -> BlockConfig:
    return dataclasses.replace(LLAMA_BLOCK, **switches)


# ------------------------------------------------------------------------------ twin against twin


@pytest.mark.parametrize("direction", h.DIRECTIONS)
@pytest.mark.parametrize(
    "switches",
    [
        dict(n_kv_heads=1, rope_layout="half"),
        dict(n_kv_heads=2, rope_layout="interleaved", attn_bias=True),
        dict(n_kv_heads=None, rope_layout="half", mlp_bias=True),
    ],
    ids=["mqa-half", "gqa-interleaved-attn_bias", "mha-half-mlp_bias"],
)
def test_llama_block_twins_match_float32(switches, direction):
    r = h.forward_check(llama_block(**switches), "float32", direction)
    assert r.passed, (r.max_abs_err, r.first_divergence, r.divergence_detail)


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("rope_layout", ["half", "interleaved"])
def test_each_twin_matches_float64_reference(framework, rope_layout):
    """Each twin alone, float64, against the NumPy block: every intermediate <= 1e-12."""
    cfg = llama_block(rope_layout=rope_layout)
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


# ------------------------------------------------------------------------------ training (the report's rows)


def test_llama_gradients_match():
    r = lh.grad_check("torch->jax")
    assert r.passed and r.max_abs_err <= r.tolerance, (r.max_abs_err, r.divergence_detail)


def test_llama_adamw_trajectory():
    r = lh.trajectory_check("jax->torch")
    assert r.passed, (r.max_abs_err, r.first_divergence, r.divergence_detail)
    assert r.max_rel_err <= 1e-5  # the per-step losses keep TRAIN_TOLERANCE; only the weights' bound is wider


@pytest.mark.parametrize("first", ["jax", pytest.param("torch", marks=pytest.mark.slow)])
def test_llama_cross_framework_resume(first):
    r = lh.resume_check(first)
    assert r.passed, (r.max_abs_err, r.first_divergence, r.divergence_detail)
    assert r.max_rel_err <= 1e-5 and r.config["resumed_step"] == 10  # losses: TRAIN_TOLERANCE


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_llama_kv_cache_on_a_left_padded_batch(framework, dtype):
    r = lh.kv_cache_check(framework, dtype)
    assert r.passed, (r.max_abs_err, r.first_divergence, r.divergence_detail)
    # rotary positions, and the batch really is left-padded: rows 0 and 2 start at slots 6 and 10
    assert r.config["model"] == "llama" and r.config["first_real_slots"] == [6, 0, 10]


@pytest.mark.parametrize("sampling", ["greedy", "top_k", "sampled"])
def test_llama_generate_across_frameworks(sampling):
    r = lh.generate_check(sampling)  # trains llama_tiny once per test process (~15 s on 2 cores)
    assert r.passed, (r.max_abs_err, r.first_divergence)
    assert r.config["model"] == "llama" and r.shape == [2, 72]


def test_llama_jax_sharded_equals_one_device():
    """data=2, model=2 simulated devices: each device holds one key/value head and its two query
    heads (k_proj's kernel split by output features over model), the batch split over data."""
    rows = lh.run_jax_sharded()
    assert [r.check for r in rows] == ["sharded_forward", "sharded_train_step"]
    for r in rows:
        assert r.passed and r.config["splits"]["kv_heads"] == "P(None, 'model')", r


def test_llama_torch_sharded_equals_one_device():
    rows = lh.torch_sharded_rows()
    assert [r.check for r in rows] == ["sharded_forward", "sharded_train_step"]
    for r in rows:
        assert r.passed and r.config["splits"]["kv_heads"] == "(Replicate(), Shard(dim=0))", r


# ------------------------------------------------------------------------------ the rope layouts


def test_rope_permutation_is_transformers_permute_and_inverts():
    """Interleaved -> half-split is transformers' convert_llama_weights_to_hf ``permute``
    (view(nh, hs/2, 2, in).transpose(1, 2)); the other direction undoes it."""
    nh, hs, d_in = 3, 8, 5
    w = np.arange(nh * hs * d_in, dtype=np.float64).reshape(nh * hs, d_in)
    hf_permute = torch.from_numpy(w).view(nh, hs // 2, 2, d_in).transpose(1, 2).reshape(nh * hs, d_in).numpy()
    assert np.array_equal(w[rope_permutation(nh, hs, "half")], hf_permute)
    back = hf_permute[rope_permutation(nh, hs, "interleaved")]
    assert np.array_equal(back, w)


def test_rope_layouts_compute_the_same_function_after_the_permutation():
    """A half-split twin and an interleaved twin given the permuted q/k rows agree (float64);
    without the permutation they do not: the layout is a fact of the checkpoint."""
    half, inter = llama_block(rope_layout="half", attn_bias=True), llama_block(rope_layout="interleaved", attn_bias=True)
    x = h.make_input(h.LESSON_SHAPE, "float64")
    with matched_precision(x64=True):
        a = h.new_torch_block(half, "float64", "cpu", 0)
        b = h.new_torch_block(inter, "float64", "cpu", 1)
        weights = wc.export(a)
        wc.import_(b, relayout_rope(weights, table_for(inter), "interleaved"))
        ya, yb = h.run_torch(a, x, "cpu")["out"], h.run_torch(b, x, "cpu")["out"]
        assert np.max(np.abs(ya - yb)) <= 1e-12
        wc.import_(b, weights)  # the same rows, the other layout
        assert np.max(np.abs(ya - h.run_torch(b, x, "cpu")["out"])) > 1e-2
    rows = {s.torch_key: s.rope_heads for s in table_for(inter)}
    assert rows["attn.q_proj.weight"] == 4 and rows["attn.k_proj.weight"] == 2 and rows["attn.v_proj.weight"] == 0


# --------------------------------------------------------------------------- GQA, cache, mesh


def test_kv_cache_holds_kv_heads():
    from jax_impl.gpt import GPT as FlaxGPT
    from torch_impl.gpt import GPT as TorchGPT
    from flax import nnx

    cfg = GPTConfig.llama_tiny()
    t, f = TorchGPT(cfg), FlaxGPT(cfg, rngs=nnx.Rngs(0))
    t.setup_cache(3, 16)
    f.setup_cache(3, 16)
    assert tuple(t.blocks[0].attn.kv_cache.k.shape) == (3, cfg.kv_heads, 16, cfg.d_head)  # (B, nkv, L, hs)
    assert tuple(f.blocks[0].attn.kv_cache.k[...].shape) == (3, 16, cfg.kv_heads, cfg.d_head)  # (B, L, nkv, hs)


def test_smollm2_preset_has_the_published_shape():
    """SmolLM2-135M's config.json values (twin_common/config.py cites them) and, through the
    parameter table, its parameter count with the head tied: 134,515,008 ("135M")."""
    from twin_common.presets import PRESETS

    cfg = PRESETS["smollm2-135m"]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_hidden) == (30, 576, 9, 3, 64, 1536)
    assert (cfg.vocab_size, cfg.block_size, cfg.rope_theta, cfg.ln_eps, cfg.tie_embeddings) == (49152, 8192, 1e5, 1e-5, True)
    assert sum(int(np.prod(s.torch_shape)) for s in table_for(cfg)) == 134_515_008


def test_mesh_refuses_kv_heads_it_cannot_split():
    problems = mesh_problems(MeshShape(1, 4), GPTConfig.llama_tiny())  # 4 query heads, 2 kv heads
    assert len(problems) == 1 and "n_kv_heads=2" in problems[0] and "model=4" in problems[0]
    assert mesh_problems(MeshShape(2, 2), GPTConfig.llama_tiny()) == []


def test_tensor_parallel_splits_every_new_matrix():
    from twin_common.params import Split

    split = {s.torch_key.removeprefix("blocks.0."): s.split for s in table_for(GPTConfig.llama_tiny())}
    assert split["attn.k_proj.weight"] is Split.OUT_FEATURES and split["attn.v_proj.weight"] is Split.OUT_FEATURES
    assert split["mlp.gate_proj.weight"] is split["mlp.up_proj.weight"] is Split.OUT_FEATURES
    assert split["mlp.down_proj.weight"] is Split.IN_FEATURES and split["ln_1.weight"] is Split.REPLICATED


def _tensor_parallel_generate_rank(rank: int, world: int, port: int, out: str) -> None:
    """One gloo process on mesh (1, 2): greedy generation by llama_tiny and moe_tiny (4 query heads,
    2 key/value heads: one of each per rank), rank 0 writing the tokens and the cache's heads."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # what torchrun sets  # fmt: skip
    import torch.distributed as dist

    from torch_impl import sharding as S
    from torch_impl.generate import continue_prompt as generate
    from torch_impl.gpt import GPT

    torch.set_num_threads(1)
    found = {}
    for name in ("llama_tiny", "moe_tiny"):
        cfg = getattr(GPTConfig, name)()
        device_mesh = S.init_distributed(MeshShape(1, 2), cfg, timeout_s=60)
        torch.manual_seed(0)
        model = S.shard_model(GPT(cfg), device_mesh).eval()
        with torch.no_grad():  # a forward first, as scripts.train evaluates before its sample: FSDP2's
            model(torch.tensor([[3, 1, 4, 1, 5]]))  # replicate() leaves the data-axis copies registered
        tokens = generate(model, [3, 1, 4, 1, 5], 12, temperature=0.0)
        found[name] = {"tokens": tokens, "cache_heads": model.blocks[0].attn.kv_cache.k.shape[1]}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(found, f)
    dist.destroy_process_group()


def test_tensor_parallel_torch_generates_with_the_local_kv_heads(tmp_path):
    """On a tensor-parallel torch rank the KV cache holds that rank's key/value heads (n_kv_heads /
    model, not its query heads), and greedy generation gives one device's tokens (Llama and MoE)."""
    import json
    import socket

    import torch.multiprocessing as mp

    from torch_impl.generate import continue_prompt as generate
    from torch_impl.gpt import GPT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.json")
    mp.start_processes(_tensor_parallel_generate_rank, args=(2, port, out), nprocs=2, start_method="fork")
    with open(out) as f:
        found = json.load(f)
    for name in ("llama_tiny", "moe_tiny"):
        cfg = getattr(GPTConfig, name)()
        torch.manual_seed(0)
        one_device = generate(GPT(cfg).eval(), [3, 1, 4, 1, 5], 12, temperature=0.0)
        assert found[name]["cache_heads"] == cfg.kv_heads // 2 == 1, (name, found[name])
        assert found[name]["tokens"] == one_device, name


def test_preflight_checks_a_rotary_model_without_a_position_table(tmp_path):
    """scripts.generate / scripts.export check a config against its file's tensor headers before
    building a model: a rotary model's file has no wpe and passes; a wrong size is still named."""
    from torch_impl.gpt import GPT
    from weight_conversion.preflight import check_fits
    from weight_conversion.validate import ConversionError

    cfg = GPTConfig.llama_tiny()
    wc.save(GPT(cfg), tmp_path / "llama.safetensors")
    check_fits(cfg, "weights", tmp_path / "llama.safetensors")
    with pytest.raises(ConversionError, match=r"n_layers=3, but the file holds 2 layer"):
        check_fits(dataclasses.replace(cfg, n_layers=3), "weights", tmp_path / "llama.safetensors")


# ------------------------------------------------------------------------------ the config


def test_old_saved_configs_mean_the_gpt2_block():
    """A config saved before the switches existed (the golden file's) loads as the same model,
    and compares equal to today's defaults field by field."""
    _, _, _, old = h.load_golden()
    old = {**old, "n_heads": 4}  # the file stores one config for several head counts
    assert "norm" not in old
    cfg = BlockConfig.from_dict(old)
    assert (cfg.norm, cfg.pos, cfg.kv_heads, cfg.mlp, cfg.d_hidden) == ("layernorm", "learned", cfg.n_heads, "gelu", 4 * cfg.d_model)
    assert config_differences(old, cfg.to_dict(), what="config", where="golden") == []
    assert [s.torch_key for s in table_for(cfg)] == [s.torch_key for s in table_for(BlockConfig(**old))]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(norm="rmsnorm", norm_bias=True), "an RMSNorm has no bias"),
        (dict(pos="rope", d_model=12, n_heads=4), "head size 3 is odd"),
        (dict(rope_layout="pairs"), "rope_layout must be one of"),
        (dict(rope_theta=0.0), "rope_theta must be a finite number > 0"),
        (dict(mlp_hidden=0), "mlp_hidden must be None or a positive int"),
    ],
)
def test_bad_switches_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        BlockConfig(**fields)


def test_rmsnorm_has_no_mean_and_no_bias_rows():
    keys = [s.torch_key for s in table_for(GPTConfig.llama_tiny())]
    assert not any(k.endswith(".bias") for k in keys) and "wpe.weight" not in keys and "lm_head.weight" in keys
