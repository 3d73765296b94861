"""Pin matched numerical settings in both frameworks.

Defaults differ: JAX runs float32 matmuls on Ampere/Hopper GPUs as TF32 (about 10 mantissa bits)
and on TPUs as bfloat16 passes, while PyTorch keeps float32 matmuls in full float32 (jax issues
#12008, #14157, #18934 for GPUs; #1856, #10413 for TPUs). This project has run on CPUs only, where
both defaults are full float32; the size of the GPU effect at (5, 8, 128) is not measured here
(scripts/gpu_check.sh reports it on a GPU machine). Every parity check runs inside
``matched_precision()``.
"""

from __future__ import annotations

import contextlib
import importlib.util

MATMUL_PRECISION = "highest"  # JAX's name; torch.set_float32_matmul_precision uses the same word


def _x64_context(enabled: bool):
    import jax

    if hasattr(jax, "enable_x64"):  # jax >= 0.8
        return jax.enable_x64(enabled)
    from jax.experimental import enable_x64, disable_x64  # older jax

    return enable_x64() if enabled else disable_x64()


@contextlib.contextmanager
def matched_precision(x64: bool = False, frameworks: tuple[str, ...] = ("torch", "jax")):
    """Full-precision float32 matmuls in torch and JAX (whichever are installed) for the block.

    ``x64=True`` also turns on JAX's 64-bit mode, without which JAX truncates float64 to float32.
    ``frameworks``: the ones this process runs; a one-framework command names its own, so that a
    torch run does not import JAX (and its runtime) only to pin a setting it never reads.
    Both settings are restored on exit.
    """
    unknown = set(frameworks) - {"torch", "jax"}
    if unknown:
        raise ValueError(f"matched_precision: unknown frameworks {sorted(unknown)}; known: torch, jax")
    with contextlib.ExitStack() as stack:
        if "torch" in frameworks and importlib.util.find_spec("torch") is not None:
            import torch

            before = torch.get_float32_matmul_precision()
            matmul = torch.backends.cuda.matmul
            cuda_before = getattr(matmul, "fp32_precision", None)  # torch >= 2.9's own TF32 switch
            if cuda_before is not None:  # callbacks run last-in first-out: this one runs last
                stack.callback(setattr, matmul, "fp32_precision", cuda_before)
            torch.set_float32_matmul_precision(MATMUL_PRECISION)  # also turns TF32 off for matmuls
            stack.callback(torch.set_float32_matmul_precision, before)
        if "jax" in frameworks and importlib.util.find_spec("jax") is not None:
            import jax

            stack.enter_context(jax.default_matmul_precision(MATMUL_PRECISION))
            stack.enter_context(_x64_context(x64))
        yield


def describe() -> dict:
    """The precision settings in force, for the report's metadata."""
    info: dict = {"pinned_matmul_precision": MATMUL_PRECISION}
    if importlib.util.find_spec("torch") is not None:
        import torch

        info["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 spells TF32 control this way
            info["torch_cuda_matmul_fp32_precision"] = matmul.fp32_precision
        else:
            info["torch_cuda_matmul_allow_tf32"] = matmul.allow_tf32
    if importlib.util.find_spec("jax") is not None:
        import jax

        info["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
        info["jax_enable_x64"] = bool(jax.config.jax_enable_x64)
    return info
