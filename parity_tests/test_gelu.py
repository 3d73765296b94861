"""The Flax twin's exact GELU (erf form, the way torch writes it) against a float64 truth, against
jax.nn.gelu's erfc form and against torch, forward and derivative, in every dtype the twins use."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("flax", reason="needs JAX and Flax")

import jax
import jax.numpy as jnp
import numpy as np

from jax_impl.block import MLP, exact_gelu
from twin_common import BlockConfig

Z = np.linspace(-8.0, 8.0, 4001).astype(np.float32).astype(np.float64)  # float32 inputs, up to |z| = 8 (GELU = x or 0)
ERF = np.array([math.erf(v / math.sqrt(2.0)) for v in Z])
TRUTH = 0.5 * Z * (1.0 + ERF)
DTRUTH = 0.5 * (1.0 + ERF) + Z * np.exp(-0.5 * Z**2) / math.sqrt(2.0 * math.pi)  # Phi(z) + z phi(z)


def _forward_and_derivative(f, z):
    return f(z), jax.grad(lambda a: f(a).sum())(z)


def test_float32_forward_and_derivative_against_float64():
    """Measured max abs error on [-8, 8]: 8.2e-7 forward, 1.8e-7 derivative (jax.nn.gelu's erfc form:
    3.7e-7 / 1.2e-7; torch, the same erf formula: 3.7e-7 / 2.1e-7). The forward's worst case is the
    negative tail, where 1 + erf(x / sqrt 2) cancels: there torch's formula and this one lose
    relative precision that the erfc form keeps; the absolute error stays below 1e-6."""
    z = jnp.asarray(Z, jnp.float32)
    y, dy = _forward_and_derivative(exact_gelu, z)
    assert y.dtype == dy.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(y, np.float64) - TRUTH)) < 1e-6
    assert np.max(np.abs(np.asarray(dy, np.float64) - DTRUTH)) < 4 * np.finfo(np.float32).eps  # derivative <= 1.1
    # and the derivative is the exact GELU's, not the tanh approximation's (which is off by 1e-3)
    tanh_dy = jax.grad(lambda a: jax.nn.gelu(a, approximate=True).sum())(z)
    assert np.max(np.abs(np.asarray(tanh_dy, np.float64) - DTRUTH)) > 1e-4


def test_same_function_as_jax_nn_gelu_exact():
    """The erf and erfc forms agree to float32 rounding, forward and derivative."""
    z = jnp.asarray(Z, jnp.float32)
    y, dy = _forward_and_derivative(exact_gelu, z)
    y_ref, dy_ref = _forward_and_derivative(lambda a: jax.nn.gelu(a, approximate=False), z)
    assert np.max(np.abs(np.asarray(y) - np.asarray(y_ref))) < 1e-6  # measured 7.2e-7 (2 ulps at |y| ~ 5)
    assert np.max(np.abs(np.asarray(dy) - np.asarray(dy_ref))) < 3e-7  # measured 1.2e-7


def test_float64_and_bfloat16_keep_their_dtype():
    with jax.enable_x64(True):
        z = jnp.asarray(Z, jnp.float64)
        y, dy = _forward_and_derivative(exact_gelu, z)
        assert y.dtype == dy.dtype == jnp.float64
        assert np.max(np.abs(np.asarray(y) - TRUTH)) < 1e-14  # measured 8.9e-16
        assert np.max(np.abs(np.asarray(dy) - DTRUTH)) < 1e-14
    z = jnp.asarray(Z, jnp.bfloat16)
    y, dy = _forward_and_derivative(exact_gelu, z)
    assert y.dtype == dy.dtype == jnp.bfloat16
    zb = np.asarray(z, np.float64)  # the bfloat16-rounded inputs
    erf_b = np.array([math.erf(v / math.sqrt(2.0)) for v in zb])
    # one bfloat16 rounding of |y| <= 8 is at most 2^-8 * 8 / 2 = 1.6e-2; allow two (product and sum)
    assert np.max(np.abs(np.asarray(y, np.float64) - 0.5 * zb * (1 + erf_b))) <= 2 * 0.5 * 2**-8 * 8


def test_mlp_uses_it_for_exact_and_jax_nn_gelu_for_tanh():
    exact = MLP(BlockConfig(d_model=8, n_heads=2), rngs=jax_rngs())
    tanh = MLP(BlockConfig(d_model=8, n_heads=2, gelu_approximate="tanh"), rngs=jax_rngs())
    z = jnp.asarray(Z, jnp.float32)
    assert exact.gelu is exact_gelu
    np.testing.assert_array_equal(np.asarray(tanh.gelu(z)), np.asarray(jax.nn.gelu(z, approximate=True)))


def test_matches_torch_forward_and_backward():
    torch = pytest.importorskip("torch", reason="needs torch")
    z32 = Z.astype(np.float32)
    zt = torch.tensor(z32, requires_grad=True)
    yt = torch.nn.functional.gelu(zt)
    yt.sum().backward()
    y, dy = _forward_and_derivative(exact_gelu, jnp.asarray(z32))
    assert np.max(np.abs(np.asarray(y) - yt.detach().numpy())) < 1e-6  # measured 4.8e-7
    assert np.max(np.abs(np.asarray(dy) - zt.grad.numpy())) < 3e-7  # measured 2.4e-7


def jax_rngs():
    from flax import nnx

    return nnx.Rngs(0)
