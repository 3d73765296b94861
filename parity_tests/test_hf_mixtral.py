"""transformers' MixtralForCausalLM directories into and out of both twins: logits, router logits,
top-k choices and the load-balancing loss against transformers itself on random small configs,
verify against the float64 NumPy Mixtral, the per-expert keys stacked by the table, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")
pytest.importorskip("transformers", reason="transformers is a test extra")

import torch

import weight_conversion.hf_mixtral_table as mt
from twin_parity import moe_harness as mh
from twin_parity import train_harness as th
from twin_common.precision import matched_precision
from weight_conversion.hf_mixtral import export_hf_mixtral, import_hf_mixtral, mixtral_config_from_dir, mixtral_config_from_hf
from weight_conversion.validate import ConversionError
from weight_conversion.verify import VerificationError


@pytest.mark.parametrize("framework", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_twin_matches_transformers_mixtral(framework):
    """Logits and router logits <= 1e-5, identical expert choices, aux loss equal to transformers'
    load_balancing_loss_func (imported with verify=True)."""
    r = mh.hf_mixtral_check(framework)
    assert r.passed, (r.first_divergence, r.divergence_detail)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_twin_matches_transformers_mixtral_top3_of_8_mha(framework):
    r = mh.hf_mixtral_check(framework, seed=3, n_experts=8, top_k=3, n_kv_heads=6)
    assert r.passed, (r.first_divergence, r.divergence_detail)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers.utils import logging

    logging.disable_progress_bar()
    directory = str(tmp_path_factory.mktemp("mixtral"))
    model = mh.new_mixtral(mh.mixtral_config(), 0)
    model.save_pretrained(directory)
    return directory, model


def test_files_hold_per_expert_keys_the_table_stacks(saved):
    directory, _ = saved
    from safetensors import safe_open

    with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
        keys = set(f.keys())
    table = mt.hf_mixtral_table(mixtral_config_from_dir(directory))
    assert {k if k == "lm_head.weight" else "model." + k for k in mt.hf_shapes(table)} == keys
    assert "model.layers.1.block_sparse_moe.experts.4.w2.weight" in keys
    stacked = [s for s in table if s.stacked]
    assert len(stacked) == 3 * 2 and all(len(s.hf_keys) == 5 for s in stacked)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_export_loads_in_transformers_and_round_trips_bit_exact(saved, tmp_path, framework):
    from transformers import MixtralForCausalLM

    directory, hf = saved
    with matched_precision():
        cfg = mixtral_config_from_dir(directory)
        twin = th.new_torch_gpt(cfg, "float32", 0) if framework == "torch" else th.new_flax_gpt(cfg, "float32", 0)
        import_hf_mixtral(twin, directory)
        export_hf_mixtral(twin, tmp_path)
        again = MixtralForCausalLM.from_pretrained(tmp_path, experts_implementation="eager", attn_implementation="eager").eval()
    for (k, a), (k2, b) in zip(sorted(hf.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    idx = np.random.default_rng(0).integers(0, mh.MIXTRAL_VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(hf(torch.from_numpy(idx)).logits, again(torch.from_numpy(idx)).logits)


def test_verify_catches_gate_and_up_swapped(saved, monkeypatch):
    """w1 (gate) and w3 (up) have the same shape: only running the model tells them apart. The
    twin's previous weights are restored."""
    directory, _ = saved
    cfg = mixtral_config_from_dir(directory)
    twin = th.new_torch_gpt(cfg, "float32", 0)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    monkeypatch.setattr(mt, "EXPERT_ROWS", (("w3", "gate_proj"), ("w1", "up_proj"), ("w2", "down_proj")))
    with matched_precision(), pytest.raises(VerificationError, match="blocks.0.mlp"):
        import_hf_mixtral(twin, directory, verify=True)
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())


def test_missing_expert_and_config_mismatch_named(saved, tmp_path):
    directory, _ = saved
    from safetensors.numpy import load_file, save_file

    arrays = load_file(os.path.join(directory, "model.safetensors"))
    del arrays["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    save_file(arrays, str(tmp_path / "model.safetensors"))
    with open(os.path.join(directory, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    twin = th.new_torch_gpt(mixtral_config_from_dir(directory), "float32", 0)
    with pytest.raises(ConversionError, match=r"missing key 'layers.0.block_sparse_moe.experts.3.w1.weight'"):
        import_hf_mixtral(twin, tmp_path)
    import dataclasses

    other = th.new_torch_gpt(dataclasses.replace(mixtral_config_from_dir(directory), top_k=1), "float32", 0)
    with pytest.raises(ConversionError, match="top_k"):
        import_hf_mixtral(other, directory)


def test_unsupported_config_fields_each_named(saved):
    directory, _ = saved
    with open(os.path.join(directory, "config.json")) as f:
        doc = json.load(f)
    doc.update(router_jitter_noise=0.1, sliding_window=16, shared_expert_intermediate_size=64, hidden_act="gelu",
               rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})  # fmt: skip
    with pytest.raises(ValueError) as e:
        mixtral_config_from_hf(doc)
    for name in ("router_jitter_noise=0.1", "sliding_window=16", "shared_expert_intermediate_size=64", "hidden_act='gelu'", "yarn"):
        assert name in str(e.value), name


def test_twin_without_a_mixtral_layout_refused():
    import dataclasses

    from twin_common import GPTConfig

    for change in (dict(norm_topk_prob=False), dict(capacity_factor=1.25)):
        with pytest.raises(ValueError, match=next(iter(change))):
            mt.hf_mixtral_table(dataclasses.replace(GPTConfig.moe_tiny(), **change))
    with pytest.raises(ValueError, match="mlp='swiglu'"):
        mt.hf_mixtral_table(GPTConfig.llama_tiny())
