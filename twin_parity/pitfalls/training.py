"""Pitfall checks. Numerics around training: float32 matmul precision, AdamW's defaults, dropout's
random streams."""

from __future__ import annotations

import dataclasses

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_parity.pitfalls.common import (
    CFG,
    Measurement,
    cpu,
    flax_block,
    isolated,
    max_abs,
    torch_block,
    twin_error,
)


def check_matmul_precision() -> Measurement:
    import jax
    import torch

    device = jax.devices()[0]  # the default backend: where JAX's default precision matters
    x = h.make_input(h.LESSON_SHAPE, "float32")

    def twin_error(jax_precision: str) -> float:
        with isolated(precision=False), jax.default_matmul_precision(jax_precision):
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")
            try:
                t = torch_block()
                j = flax_block(device=device)
                wc.torch_to_flax(t, j)
                return max_abs(h.run_torch(t, x, "cpu")["out"], h.run_flax(j, x, device)["out"])
            finally:
                torch.set_float32_matmul_precision(before)

    return Measurement(
        twin_error("default"), twin_error("highest"),
        f"max abs error of the block output (float32), JAX on {device.platform}, torch on cpu",
    )


def check_adamw_defaults() -> Measurement:
    import jax
    import optax
    import torch
    from flax import nnx

    from jax_impl.gpt import loss_fn as flax_loss
    from twin_parity import train_harness as th
    from torch_impl.gpt import loss_fn as torch_loss

    cfg, tcfg = th.SMALL_GPT, th.TRAJECTORY
    lr = tcfg.lr  # constant: only the optimizer defaults differ between the two sides
    with isolated():
        t, j = th.converted_pair(cfg, "float32", "torch->jax")
        t.train()
        opt = torch.optim.AdamW(t.parameters(), lr=lr)  # library defaults: wd 1e-2, every param
        j.eval()  # no dropout in SMALL_GPT; eval keeps the RNG state untouched under jit
        graphdef, params, rest = nnx.split(j, nnx.Param, ...)
        tx = optax.adamw(lr)  # library defaults: wd 1e-4, every param (no mask)
        opt_state = tx.init(params)

        @jax.jit
        def flax_step(params, opt_state, x, y):
            loss_of = lambda p: flax_loss(nnx.merge(graphdef, p, rest)(x), y)  # noqa: E731
            grads = jax.grad(loss_of)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        for step in range(tcfg.steps):
            x, y = th.token_batch(cfg, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step)
            opt.zero_grad(set_to_none=True)
            torch_loss(t(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
            params, opt_state = flax_step(params, opt_state, x.astype(np.int32), y.astype(np.int32))
        nnx.update(j, params)
        ignored, _, _ = th._compare_weights(wc.export(t), wc.export(j))
    with isolated(precision=False):
        pinned = th.trajectory_check("torch->jax", tcfg)[0].max_abs_err
    return Measurement(
        ignored, pinned,
        f"max abs parameter difference after {tcfg.steps} AdamW steps on SMALL_GPT (float32, "
        "attn.k_proj.bias excluded)",
    )


def check_dropout_rng() -> Measurement:
    cfg = dataclasses.replace(CFG, attn_dropout=0.1, resid_dropout=0.1)
    x = h.make_input(h.LESSON_SHAPE, "float32")

    def twin_error(train: bool) -> float:
        with isolated():
            t = torch_block(cfg)
            j = flax_block(cfg)
            wc.torch_to_flax(t, j)
            if train:
                t.train()
                j.train()
            return max_abs(h.run_torch(t, x, "cpu")["out"], h.run_flax(j, x, cpu())["out"])

    return Measurement(
        twin_error(train=True), twin_error(train=False),
        "max abs error of the block output (float32), dropout 0.1, train mode vs eval mode",
    )
