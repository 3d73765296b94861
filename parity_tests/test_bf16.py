"""Each twin alone in bfloat16 against float64: every sublayer on its own input, and the loss."""

from __future__ import annotations

import dataclasses

import pytest

from twin_parity import harness as h
from twin_parity.testing import jax_device, jax_platform_params, torch_device_params
from twin_common import BlockConfig


@pytest.mark.parametrize("impl", ["fused", "math"])
@pytest.mark.parametrize("n_heads", [1, 4])
@pytest.mark.parametrize("tdev", torch_device_params())
def test_torch_sublayers_in_bf16(tdev, n_heads, impl):
    r = h.bf16_sublayer_check("torch", dataclasses.replace(BlockConfig.lesson(n_heads), attn_impl=impl), tdev)
    assert r.passed, r.divergence_detail


@pytest.mark.parametrize("impl", ["fused", "math"])
@pytest.mark.parametrize("n_heads", [1, 4])
@pytest.mark.parametrize("jplat", jax_platform_params())
def test_flax_sublayers_in_bf16(jplat, n_heads, impl):
    cfg = dataclasses.replace(BlockConfig.lesson(n_heads), attn_impl=impl)
    r = h.bf16_sublayer_check("jax", cfg, jax_device(jplat))
    assert r.passed, r.divergence_detail


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_loss_of_bf16_logits(framework):
    pytest.importorskip("torch" if framework == "torch" else "flax", reason=f"the {framework} twin")
    r = h.loss_check(framework)
    assert r.passed, r.divergence_detail
