"""What the test files share (they import this module, never conftest.py or each other): which
backends are present, pytest parameters for the backend matrix with absent backends skipped and the
reason shown, and a deadline for a test body that could block.

Either framework may be missing (a TPU VM with JAX only, say): the tests of the twin that is present,
golden vectors included, still run, and the rest are skipped with the reason.
"""

from __future__ import annotations

import importlib
import signal
from contextlib import contextmanager

import pytest

from twin_parity import harness as h


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


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the body blocks, e.g. on a FIFO."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
