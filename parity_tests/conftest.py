"""Shared fixtures: the backend matrix, with absent backends skipped and the reason shown.

Either framework may be missing (a TPU VM with JAX only, say): the tests of the twin that is present,
golden vectors included, still run, and the rest are skipped with the reason.
"""

from __future__ import annotations

import importlib
import os

import pytest
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

def _importable(*names: str) -> bool:
    try:
        for name in names:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


HAVE_TORCH = _importable("torch")
HAVE_JAX = _importable("jax", "flax")
_JAX = h.jax_devices() if HAVE_JAX else {}
_TORCH = h.torch_devices() if HAVE_TORCH else []


def _torch_missing(device: str) -> str | None:
    if not HAVE_TORCH:
        return "torch is not installed"
    return None if device in _TORCH else f"torch has no {device.upper()} device"


def _jax_missing(platform: str) -> str | None:
    if not HAVE_JAX:
        return "jax/flax are not installed"
    return None if platform in _JAX else f"jax has no {platform.upper()} device"


def backend_pairs():
    """Every torch device x every JAX platform; the ones not present are skipped, with a reason."""
    pairs = []
    for tdev in ("cpu", "cuda"):
        for jplat in ("cpu", "gpu", "tpu"):
            missing = [m for m in (_torch_missing(tdev), _jax_missing(jplat)) if m]
            marks = [pytest.mark.skip(reason="; ".join(missing))] if missing else []
            pairs.append(pytest.param(tdev, jplat, id=f"torch_{tdev}-jax_{jplat}", marks=marks))
    return pairs


def jax_device(platform: str):
    return _JAX.get(platform)


def torch_device_params():
    return [
        pytest.param(d, id=f"torch_{d}", marks=[pytest.mark.skip(reason=m)] if (m := _torch_missing(d)) else [])
        for d in ("cpu", "cuda")
    ]


def jax_platform_params():
    return [
        pytest.param(p, id=f"jax_{p}", marks=[pytest.mark.skip(reason=m)] if (m := _jax_missing(p)) else [])
        for p in ("cpu", "gpu", "tpu")
    ]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The models here are tiny: with two torch threads on a 2-core machine that is also running
    JAX's threads, a step took 0.4 to 16 s instead of 0.05 s (measured in test_train.py)."""
    if not HAVE_TORCH:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_torch_seed_state():
    """The harness seeds torch's global generator; leave it as each test found it."""
    if not HAVE_TORCH:
        yield
        return
    import torch

    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)
