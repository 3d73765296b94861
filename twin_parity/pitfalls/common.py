"""What every pitfall check shares: the lesson block, the Measurement and Pitfall records, and the
helpers that build a twin pair, restore torch's RNG and measure the error between the twins."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_common import BlockConfig
from twin_common.precision import matched_precision

CFG = BlockConfig.lesson(4)
FLOAT32_OUT = "max abs error of the block output (float32)"


@dataclasses.dataclass(frozen=True)
class Measurement:
    ignored: float | str  # e.g. max abs error of the block output, or "TypeError" for an exception
    pinned: float | str  # the same quantity with the project's pin
    quantity: str  # one short phrase: what the numbers are


@dataclasses.dataclass(frozen=True)
class Pitfall:
    id: str  # short slug, e.g. "layernorm-eps"
    title: str
    differs: str  # one sentence: what differs between the frameworks (with the default values)
    pinned_by: str  # one sentence: how this project pins it (names the file/function)
    check: Callable[[], Measurement]


# ------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def isolated(precision: bool = True):
    """torch's global RNG restored on exit (the harness seeds it), and matched precision."""
    import torch

    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
        if precision:
            stack.enter_context(matched_precision())
        yield


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def cpu():
    return h.jax_devices()["cpu"]


def torch_block(cfg: BlockConfig = CFG, dtype: str = "float32"):
    return h.new_torch_block(cfg, dtype, "cpu", seed=0)


def flax_block(cfg: BlockConfig = CFG, dtype: str = "float32", device=None):
    return h.new_flax_block(cfg, dtype, device or cpu(), seed=100)  # overwritten by the converter


def twin_error(
    cfg: BlockConfig = CFG,
    x: np.ndarray | None = None,
    build_flax: Callable | None = None,
    arrays: Callable[[dict], dict] | None = None,
    key: str = "out",
) -> float:
    """Max abs difference of intermediate ``key`` between the torch twin and the Flax twin that
    ``build_flax`` builds (default: the project's), given the torch twin's weights (edited by
    ``arrays`` if given), on ``x`` (default: the lesson input)."""
    x = h.make_input(h.LESSON_SHAPE, "float32") if x is None else x
    with isolated():
        t = torch_block(cfg)
        j = (build_flax or flax_block)(cfg)
        weights = wc.export(t)
        wc.import_(j, arrays(dict(weights)) if arrays else weights)
        return max_abs(h.run_torch(t, x, "cpu")[key], h.run_flax(j, x, cpu())[key])


def with_pinned_and_ignored(ignored_ctx: Callable[[], contextlib.AbstractContextManager], **kw):
    """(error with the trap in place, error with the project's pin) for the same twin pair."""
    with ignored_ctx():
        ignored = twin_error(**kw)
    return ignored, twin_error(**kw)


def flax_layer_norm(**overrides):
    """jax_impl.block.layer_norm with some of nnx.LayerNorm's own defaults let back in."""
    from flax import nnx

    def layer_norm(cfg, *, param_dtype, rngs):
        kwargs = dict(epsilon=cfg.ln_eps, use_fast_variance=False, use_bias=cfg.bias)
        kwargs.update(overrides)
        return nnx.LayerNorm(cfg.d_model, param_dtype=param_dtype, rngs=rngs, **kwargs)

    return layer_norm
