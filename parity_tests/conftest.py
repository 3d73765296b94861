"""Session settings and autouse fixtures only (hypothesis profiles, one torch thread, torch seed state).
The backend matrix the tests parametrize over lives in twin_parity/testing.py: tests import that,
never this file."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from twin_parity.testing import HAVE_TORCH

settings.register_profile(
    "default",
    deadline=None,  # JAX compiles per new shape; the first example of a shape is slow
    max_examples=10,  # each new shape costs JAX ~1 s of op compilation on 2 cores
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

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
