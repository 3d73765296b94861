"""Shared fixtures: the backend matrix, with absent backends skipped and the reason shown."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from parity_tests import harness as h

settings.register_profile(
    "default",
    deadline=None,  # JAX compiles per new shape; the first example of a shape is slow
    max_examples=10,  # each new shape costs JAX ~1 s of op compilation on 2 cores
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_JAX = h.jax_devices()
_TORCH = h.torch_devices()


def backend_pairs():
    """Every torch device x every JAX platform; the ones not present are skipped, with a reason."""
    pairs = []
    for tdev in ("cpu", "cuda"):
        for jplat in ("cpu", "gpu", "tpu"):
            missing = []
            if tdev not in _TORCH:
                missing.append("torch has no CUDA device")
            if jplat not in _JAX:
                missing.append(f"jax has no {jplat.upper()} device")
            marks = [pytest.mark.skip(reason="; ".join(missing))] if missing else []
            pairs.append(pytest.param(tdev, jplat, id=f"torch_{tdev}-jax_{jplat}", marks=marks))
    return pairs


def jax_device(platform: str):
    return _JAX[platform]


def torch_device_params():
    return [
        pytest.param(d, id=f"torch_{d}", marks=[] if d in _TORCH else [pytest.mark.skip(reason=f"torch has no {d.upper()} device")])
        for d in ("cpu", "cuda")
    ]


def jax_platform_params():
    return [
        pytest.param(p, id=f"jax_{p}", marks=[] if p in _JAX else [pytest.mark.skip(reason=f"jax has no {p.upper()} device")])
        for p in ("cpu", "gpu", "tpu")
    ]


@pytest.fixture(autouse=True)
def _restore_torch_seed_state():
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)
