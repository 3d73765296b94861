"""The one tolerance table. Each entry says why its value is what it is; nothing else in the project
compares twin outputs with a tolerance of its own.

All checks compare max |a - b| over every element (never allclose defaults). max_rel_err in reports
is max |a - b| / max |reference|, a norm-wise ratio that does not blow up near zero elements.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    dtype: str
    atol: float | None  # a fixed bound on max abs error, or
    ulps: int | None  # a bound in units of the dtype's ulp at max |reference|
    mantissa_bits: int
    reason: str
    # For intermediates only (never the output): also allow this multiple of the source twin's own
    # error against a float64 truth. See "bfloat16" below; None means no such allowance.
    truth_factor: float | None = None

    def bound(self, reference: np.ndarray) -> float:
        """The allowed max abs error when comparing against ``reference``."""
        if self.atol is not None:
            return self.atol
        peak = float(np.max(np.abs(reference))) if np.size(reference) else 0.0
        if peak == 0.0:
            return 0.0
        return self.ulps * 2.0 ** (math.floor(math.log2(peak)) - self.mantissa_bits)

    def intermediate_bound(self, reference: np.ndarray, truth: np.ndarray | None) -> float:
        """The bound for a sublayer inside the block, used to locate the first divergence."""
        bound = self.bound(reference)
        if self.truth_factor is not None and truth is not None:
            own_error = float(np.max(np.abs(np.asarray(reference, np.float64) - truth)))
            bound = max(bound, self.truth_factor * own_error)
        return bound


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(
        "float32", atol=1e-5, ulps=None, mantissa_bits=23,
        reason="the bound transformers' PyTorch/Flax equivalence tests use (huggingface/transformers "
        "PR #15841: every error above 1e-5 was a real bug); "
        "measured 2.4e-7 to 4.8e-7 at (5, 8, 128) on a 2-core CPU, so 20x headroom for "
        "other summation orders, while a wrong default (eps, GELU, layout) costs 1e-4 or more",
    ),
    "float64": Tolerance(
        "float64", atol=1e-12, ulps=None, mantissa_bits=52,
        reason="float64 eps is 2.2e-16; sums of at most 4 * d_model O(1) terms keep honest "
        "rounding differences below 1e-13, so 1e-12 fails only on a real difference",
    ),
    "bfloat16": Tolerance(
        "bfloat16", atol=None, ulps=2, mantissa_bits=7,
        reason="both twins accumulate in float32 and round each sublayer to bfloat16; when the "
        "two float32 sums straddle a rounding boundary the outputs differ by one bf16 ulp, and "
        "the block rounds twice on the residual path (resid_1, then out), so a flip in resid_1 "
        "plus a flip in out is two ulps: measured 1 ulp (1.56e-2 at max|y| in [2, 4)) in 22 of "
        "24 seeded CPU cases and 2 ulps (3.12e-2) in 2. Inside the block a flip also propagates "
        "(LayerNorm divides by the std, the MLP mixes 512 inputs; measured 1.5-2 ulps at ln_2 "
        "and mlp), so a sublayer may also differ by up to 2x the source twin's own bf16 error "
        "against a float64 truth (flash-attention's test rule)",
        truth_factor=2.0,
    ),
}

# Each twin alone in bfloat16, each sublayer against float64 applied to that sublayer's own bf16
# input (twin_common.reference.block_sublayers), in ulps of max |truth|. Measured on the 2-core CPU
# (both twins, fused and math attention, 1 and 4 heads, 4 seeds): LayerNorm and the residual adds
# 0.50 (exactly rounded: float32 inside, one rounding), attn 0.83, mlp 1.34 (q, k, v, the
# probabilities and the hidden layer are rounded inside). Statistics of a LayerNorm computed in
# bfloat16 measure 2.0-2.2 ulps, squared deviations cast to bfloat16 before the mean 1.3-1.5.
BF16_SUBLAYER_ULPS = {"ln_1": 1.0, "attn": 2.0, "resid_1": 1.0, "ln_2": 1.0, "mlp": 2.0, "out": 1.0}
# The attention probabilities of the bfloat16 math path, each element against a float64 softmax of
# the same (exact) scores, in ulps of that element: a softmax in float32 rounded once is within 0.5
# ulp plus float32's own error (~2^-16 of a bfloat16 ulp); measured 0.4995 in both twins. exp, sum
# and divide in bfloat16 measure 1.92 ulps (both twins; harness.softmax_check).
BF16_SOFTMAX_ULPS = 0.51
# loss_fn on bfloat16 logits against a float64 cross-entropy of the same logits, relative: measured
# 1.0e-7 (float32 inside, both twins); the loss computed in bfloat16 is 7.5e-4 (Flax) to 3.8e-3
# (torch), per-token losses cast to bfloat16 before the mean 7.5e-4.
LOSS_REL_TOLERANCE = 1e-5

# Conversion must not change a single bit, whatever the dtype.
ROUNDTRIP_TOLERANCE = 0.0


def tolerance_for(dtype: str) -> Tolerance:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no parity tolerance for dtype {dtype}; have {sorted(TOLERANCES)}") from None


def verify_bound(dtype: str, reference: np.ndarray) -> float:
    """The bound ``verify=True`` holds one sublayer of a converted model to, against its source.

    For float32/float64 this is the table's atol scaled by max |reference| once that exceeds 1:
    rounding error is relative to the size of the numbers, and a real checkpoint's activations
    are not the lesson's O(1) values (one float32 ulp at |x| = 1000 is 6.1e-5, already over the
    fixed 1e-5). Below 1 it is the table's atol unchanged. A conversion mistake is not a rounding
    error: a k/v swap or a missed transpose moves a sublayer by a large fraction of its own size
    (measured at GPT-2 124M's shape, random weights: 2.4 and 2.6 at the first attention output,
    5.1 and 5.0 at the logits), far above 1e-5 relative.
    """
    tol = tolerance_for(dtype)
    if tol.atol is None:
        raise ValueError(f"verify supports float32 and float64 models, not {dtype}: convert in float32, then cast")
    peak = float(np.max(np.abs(reference))) if np.size(reference) else 0.0
    return tol.atol * max(1.0, peak)
