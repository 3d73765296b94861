"""Pitfall checks. Each layer's own defaults: LayerNorm's eps and variance formula, GELU's approximation, the
initialisers, nnx.Embed's output dtype, and Flax's Variable access."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from unittest import mock

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_parity.pitfalls.common import (
    CFG,
    FLOAT32_OUT,
    Measurement,
    flax_layer_norm,
    isolated,
    with_pinned_and_ignored,
)


def check_layernorm_eps() -> Measurement:
    import jax_impl.block as jb

    nnx_default_eps = 1e-6  # nnx.LayerNorm's default epsilon
    ignored, pinned = with_pinned_and_ignored(
        lambda: mock.patch.object(jb, "layer_norm", flax_layer_norm(epsilon=nnx_default_eps))
    )
    return Measurement(ignored, pinned, FLOAT32_OUT)


# The input's mean. E[x^2] - E[x]^2 loses about offset^2 * 2^-24 / var; but even the two-pass
# variance cannot beat the float32 rounding of x itself (about offset * 2^-24 / std in ln_1), so the
# twins' pinned difference grows with the offset too: measured in ln_1 (ignored, pinned) =
# (2.5e-4, 4.4e-6) at 30, (2.8e-3, 1.8e-5) at 100, (3.4e-2, 7.0e-5) at 300. 30 is the largest offset
# where the pinned twins stay inside the float32 tolerance (1e-5).


FAST_VARIANCE_OFFSET = 30.0


def check_layernorm_fast_variance() -> Measurement:
    import jax_impl.block as jb

    x = (FAST_VARIANCE_OFFSET + h.make_input(h.LESSON_SHAPE, "float64")).astype(np.float32)
    ignored, pinned = with_pinned_and_ignored(
        lambda: mock.patch.object(jb, "layer_norm", flax_layer_norm(use_fast_variance=True)),
        x=x, key="ln_1",
    )  # ln_1, not out: out carries the offset, whose float32 ulp would set the error
    return Measurement(
        ignored, pinned,
        f"max abs error of ln_1 in the block (float32), input {FAST_VARIANCE_OFFSET:g} + N(0, 1)",
    )


def check_gelu_approximate() -> Measurement:
    import jax

    import jax_impl.block as jb

    pinned_init = jb.MLP.__init__

    def init_with_library_default(self, *args, **kwargs):
        pinned_init(self, *args, **kwargs)
        self.gelu = jax.nn.gelu  # approximate=True unless told otherwise

    ignored, pinned = with_pinned_and_ignored(
        lambda: mock.patch.object(jb.MLP, "__init__", init_with_library_default)
    )
    return Measurement(ignored, pinned, FLOAT32_OUT)


def check_init_schemes() -> Measurement:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import jax_impl.block as jb
    import torch_impl.block as tb

    d = CFG.d_model
    with isolated(precision=False):
        torch.manual_seed(0)
        torch_default = torch.nn.Linear(d, d).weight.detach().numpy().std()
        flax_default = np.asarray(nnx.Linear(d, d, rngs=nnx.Rngs(0)).kernel[...]).std()
        torch.manual_seed(0)
        t = tb.Block(CFG)
        j = jb.Block(CFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    # every Linear weight of the freshly initialised block (not the harness's perturbed one)
    mats = [s.torch_key for s in wc.block_table(CFG) if len(s.torch_shape) == 2]
    state, flax_w = t.state_dict(), wc.export(j)
    torch_pinned = np.concatenate([state[k].numpy().ravel() for k in mats]).std()
    flax_pinned = np.concatenate([flax_w[k].ravel() for k in mats]).std()
    return Measurement(
        abs(float(torch_default / flax_default) - 1.0), abs(float(torch_pinned / flax_pinned) - 1.0),
        f"|std ratio - 1| of Linear weights, torch vs Flax (defaults: one {d}->{d} layer, "
        f"std {torch_default:.4f} vs {flax_default:.4f}; pinned: the block's 6 weight matrices)",
    )  # fmt: skip


def check_flax_variable_api() -> Measurement:
    import jax.numpy as jnp
    from flax import nnx

    var = nnx.Param(jnp.zeros(3))

    def warning_from(access: Callable[[], object]) -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            access()
        names = sorted({w.category.__name__ for w in caught})
        return ", ".join(names) if names else "no warning"

    return Measurement(
        warning_from(lambda: var.value),
        warning_from(lambda: (var[...], var.get_value())),
        "warning raised on reading an nnx.Param (installed flax)",
    )


def check_embed_dtype() -> Measurement:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.gpt import GPT
    from twin_parity.train_harness import SMALL_GPT

    def to_bf16(model):
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
        return model

    idx = jnp.zeros((1, 4), jnp.int32)
    embed = to_bf16(nnx.Embed(8, 4, rngs=nnx.Rngs(0)))  # built float32, then cast
    gpt = to_bf16(GPT(SMALL_GPT, rngs=nnx.Rngs(0)))
    _, inter = gpt(idx, return_intermediates=True)
    return Measurement(
        jnp.dtype(embed(idx).dtype).name,
        jnp.dtype(inter["embed"].dtype).name,
        "dtype of the embedding output after the parameters are cast to bfloat16",
    )
