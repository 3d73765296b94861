"""Pitfall checks. Moving weights between the frameworks: Linear's layout, a fused q|k|v split,
bfloat16 through NumPy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from twin_parity.pitfalls.common import CFG, Measurement, isolated, max_abs, torch_block, twin_error


SQUARE_WEIGHTS = tuple(f"attn.{p}_proj.weight" for p in ("q", "k", "v", "out"))


def check_linear_layout() -> Measurement:
    def copied_as_is(weights: dict) -> dict:
        # import_ transposes every Linear weight; transposing first lands the torch (out, in) array
        # in the (in, out) kernel untouched, i.e. a copy without the transpose
        for key in SQUARE_WEIGHTS:
            weights[key] = np.ascontiguousarray(weights[key].T)
        return weights

    ignored = twin_error(arrays=copied_as_is)
    pinned = twin_error()
    return Measurement(
        ignored, pinned,
        "max abs error of the block output (float32), the 4 square attention weights copied "
        "untransposed (the MLP's (512, 128) / (128, 512) ones would fail on shape)",
    )  # fmt: skip


def check_fused_qkv_split() -> Measurement:
    C = CFG.d_model

    def split(order: str) -> Callable[[dict], dict]:
        def load_from_fused(weights: dict) -> dict:
            # a GPT-2-style c_attn: q, k, v stacked into one (3C, C) weight and one (3C,) bias
            fused_w = np.concatenate([weights[f"attn.{p}_proj.weight"] for p in "qkv"], axis=0)
            fused_b = np.concatenate([weights[f"attn.{p}_proj.bias"] for p in "qkv"], axis=0)
            for i, p in enumerate(order):
                weights[f"attn.{p}_proj.weight"] = np.ascontiguousarray(fused_w[i * C : (i + 1) * C])
                weights[f"attn.{p}_proj.bias"] = np.ascontiguousarray(fused_b[i * C : (i + 1) * C])
            return weights

        return load_from_fused

    ignored = twin_error(arrays=split("kqv"))  # chunk 0 (really q) read as k, chunk 1 as q
    pinned = twin_error(arrays=split("qkv"))
    return Measurement(
        ignored, pinned, "max abs error of the block output (float32), q/k/v split from a fused (3C, C) weight"
    )


def check_bf16_numpy() -> Measurement:
    import torch

    from weight_conversion.torch_side import tensor_to_numpy

    with isolated():
        params = dict(torch_block(dtype="bfloat16").named_parameters())
    try:
        next(iter(params.values())).detach().numpy()
        raised = "no error"
    except TypeError:
        raised = "TypeError"
    detour_err = exact_err = 0.0
    changed = total = 0
    for p in params.values():
        exact = p.detach().to(torch.float64).numpy()  # every bfloat16 value is exact in float64
        detour = p.detach().to(torch.float16).numpy().astype(np.float64)
        pinned = tensor_to_numpy(p)
        if pinned.view(np.int16).tobytes() != p.detach().view(torch.int16).numpy().tobytes():
            exact_err = max(exact_err, np.finfo(np.float64).tiny)  # differing bits are never 0
        detour_err = max(detour_err, max_abs(detour, exact))
        exact_err = max(exact_err, max_abs(pinned.astype(np.float64), exact))
        changed += int(np.sum(detour != exact))
        total += exact.size
    return Measurement(
        detour_err, exact_err,
        f"max abs error of the block's bfloat16 weights after a float16 detour ({changed} of "
        f"{total} values changed; .numpy() itself: {raised})",
    )
