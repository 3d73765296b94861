"""Forward parity: torch block vs Flax block with converted weights, on every backend present."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twin_parity import harness as h
from twin_parity.testing import backend_pairs, jax_device, jax_platform_params, torch_device_params
from twin_common import BlockConfig


def _explain(r: h.Result) -> str:
    return (
        f"{r.check} {r.direction} {r.dtype} torch:{r.torch_device} jax:{r.jax_device} {r.config}: "
        f"max abs err {r.max_abs_err:.3e} > tolerance {r.tolerance:.1e}; "
        f"first diverging sublayer: {r.first_divergence}"
    )


@pytest.mark.parametrize("tdev,jplat", backend_pairs())
@pytest.mark.parametrize("dtype", h.PARITY_DTYPES)
@pytest.mark.parametrize("direction", h.DIRECTIONS)
@pytest.mark.parametrize("n_heads", [1, 4], ids=["single_head", "four_heads"])
def test_lesson_input(tdev, jplat, dtype, direction, n_heads):
    """The (5, 8, 128) input: every sublayer within the dtype's tolerance, both directions."""
    r = h.forward_check(BlockConfig.lesson(n_heads), dtype, direction, tdev, jax_device(jplat))
    assert r.passed, _explain(r)
    assert r.shape == [5, 8, 128]


@st.composite
def configs(draw):
    d_head = draw(st.sampled_from([4, 8, 16, 32]))
    n_heads = draw(st.sampled_from([1, 2, 3, 4]))
    seq = draw(st.integers(1, 12))
    cfg = BlockConfig(
        d_model=d_head * n_heads,
        n_heads=n_heads,
        block_size=draw(st.integers(seq, 16)),
        mlp_ratio=draw(st.sampled_from([1, 2, 4])),
        bias=draw(st.booleans()),
        gelu_approximate=draw(st.sampled_from(["none", "tanh"])),
        attn_impl=draw(st.sampled_from(["fused", "math"])),
    )
    return cfg, (draw(st.integers(1, 4)), seq, cfg.d_model)


@given(case=configs(), direction=st.sampled_from(h.DIRECTIONS), seed=st.integers(0, 2**16))
def test_property_float32(case, direction, seed):
    """Any batch, sequence (1 included), width, head count (1 included), bias, GELU, attention path."""
    cfg, shape = case
    r = h.forward_check(cfg, "float32", direction, shape=shape, seed=seed)
    assert r.passed, _explain(r)


@pytest.mark.slow  # 35 s on 2 cores; float64 parity of the same configs runs in the matrix and golden tests
@given(case=configs(), direction=st.sampled_from(h.DIRECTIONS), seed=st.integers(0, 2**16))
def test_property_float64(case, direction, seed):
    """The same space in float64, where the twins must agree to 1e-12."""
    cfg, shape = case
    r = h.forward_check(cfg, "float64", direction, shape=shape, seed=seed)
    assert r.passed, _explain(r)


@given(case=configs(), direction=st.sampled_from(h.DIRECTIONS), seed=st.integers(0, 2**16))
def test_property_bfloat16(case, direction, seed):
    """The same space in bfloat16, every sublayer held to the bf16 rule (80 seeded cases on a CPU:
    at most 1 ulp at the output)."""
    cfg, shape = case
    r = h.forward_check(cfg, "bfloat16", direction, shape=shape, seed=seed)
    assert r.passed, _explain(r)


@pytest.mark.parametrize("dtype", h.PARITY_DTYPES)
@pytest.mark.parametrize("tdev", torch_device_params())
def test_torch_fused_attention_matches_math(tdev, dtype):
    r = h.attention_paths_check("torch", BlockConfig.lesson(4), dtype, tdev)
    assert r.passed, _explain(r)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # float64 always takes the math path
@pytest.mark.parametrize("jplat", jax_platform_params())
def test_jax_fused_attention_matches_math(jplat, dtype):
    r = h.attention_paths_check("jax", BlockConfig.lesson(4), dtype, jax_device(jplat))
    assert r.passed, _explain(r)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_heads", [1, 4])
@pytest.mark.parametrize("tdev", torch_device_params())
def test_golden_torch_alone(tdev, n_heads, dtype):
    """The torch twin against the committed float64 reference, no JAX involved."""
    r = h.golden_check("torch", n_heads, dtype, tdev)
    assert r.passed, _explain(r)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_heads", [1, 4])
@pytest.mark.parametrize("jplat", jax_platform_params())
def test_golden_jax_alone(jplat, n_heads, dtype):
    """The Flax twin against the committed float64 reference, no torch involved."""
    r = h.golden_check("jax", n_heads, dtype, jax_device(jplat))
    assert r.passed, _explain(r)


def test_golden_file_is_reproducible():
    """scripts.make_golden regenerates the committed weights and input bit for bit."""
    import numpy as np

    from scripts.make_golden import golden_arrays
    from weight_conversion import load_file

    committed, _ = load_file(h.GOLDEN_PATH)
    fresh, _ = golden_arrays()
    assert committed.keys() == fresh.keys()
    for key in committed:
        if key.startswith("reference."):  # float64 sums may round differently on another BLAS
            np.testing.assert_allclose(committed[key], fresh[key], rtol=0, atol=1e-13, err_msg=key)
        else:
            assert np.array_equal(committed[key], fresh[key]), key
