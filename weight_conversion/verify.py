"""Verify a conversion by running it: source and target on one probe input, sublayer by sublayer.

Names, shapes and dtypes cannot catch a missed transpose of a square matrix or a q/k/v split in the
wrong order: such weights load without a single error. Running both models can. ``apply_verified``
applies a conversion to a target model, runs the target and the source on a probe, and if any
sublayer differs beyond ``twin_common.tolerances.verify_bound`` it puts the target's old weights
back and raises a VerificationError naming the first diverging sublayer.

Sublayers are named as the twins name them: "embed", "blocks.{i}.ln_1" ... "blocks.{i}.out",
"ln_f", "logits" for a GPT; "ln_1" ... "out" for a block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from twin_common.frameworks import framework_of
from twin_common.frameworks import model_dtype
from twin_common.precision import matched_precision
from twin_common.tolerances import verify_bound

PROBE_SEED = 1234
PROBE_BATCH, PROBE_MAX_SEQ = 2, 16


class VerificationError(ValueError):
    """A converted model does not compute what its source computes; its old weights were restored."""

    def __init__(self, sublayer: str, max_abs_err: float, bound: float, what: str):
        self.sublayer, self.max_abs_err, self.bound = sublayer, max_abs_err, bound
        super().__init__(
            f"{what}: the converted model diverges from its source first at {sublayer!r} "
            f"(max abs error {max_abs_err:.3g} > {bound:.3g}); a layout mistake in the conversion "
            f"(a transposed or swapped weight) looks like this. The target's previous weights were restored."
        )


def _is_gpt(model) -> bool:
    return hasattr(model, "blocks")


def probe_input(model) -> np.ndarray:
    """Seeded token ids (2, min(16, block_size)) for a GPT; a standard-normal (2, min(16,
    block_size), d_model) input in the model's dtype for a block."""
    cfg = model.cfg
    rng = np.random.default_rng(PROBE_SEED)
    shape = (PROBE_BATCH, min(PROBE_MAX_SEQ, cfg.block_size))
    if _is_gpt(model):
        return rng.integers(0, cfg.vocab_size, shape).astype(np.int32)
    return rng.standard_normal((*shape, cfg.d_model)).astype(model_dtype(model))


# ------------------------------------------------------------------------------------------ traces


def trace(model, probe: np.ndarray) -> dict[str, np.ndarray]:
    """Every sublayer of either twin on ``probe``, in eval mode, as float64 NumPy arrays, in the
    order they are computed. A GPT's blocks are re-run on their own inputs for their insides."""
    dtype = model_dtype(model)
    with matched_precision(x64=dtype == "float64"):
        return _trace_torch(model, probe) if framework_of(model) == "torch" else _trace_flax(model, probe)


def _expand(model, run_block, inter: Mapping) -> dict:
    """GPT intermediates (embed, blocks.i, ln_f, logits) -> per-sublayer ones."""
    out = {"embed": inter["embed"]}
    x = inter["embed"]
    for i, block in enumerate(model.blocks):
        out.update({f"blocks.{i}.{k}": v for k, v in run_block(block, x).items()})
        x = inter[f"blocks.{i}"]
    out["ln_f"], out["logits"] = inter["ln_f"], inter["logits"]
    return out


def _trace_torch(model, probe: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    from weight_conversion.torch_side import numpy_to_tensor, tensor_to_numpy

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = numpy_to_tensor(probe, device)
            if _is_gpt(model):
                _, inter = model(x.long(), return_intermediates=True)
                inter = _expand(model, lambda block, h: block(h, return_intermediates=True)[1], inter)
            else:
                _, inter = model(x, return_intermediates=True)
    finally:
        model.train(was_training)
    return {k: tensor_to_numpy(v).astype(np.float64) for k, v in inter.items()}


def _trace_flax(model, probe: np.ndarray) -> dict[str, np.ndarray]:
    import jax.numpy as jnp
    from flax import nnx

    dropouts = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout)]
    modes = [m.deterministic for m in dropouts]
    model.eval()
    try:
        x = jnp.asarray(probe)
        if _is_gpt(model):
            _, inter = model(x, return_intermediates=True)
            inter = _expand(model, lambda block, h: block(h, return_intermediates=True)[1], inter)
        else:
            _, inter = model(x, return_intermediates=True)
    finally:
        for m, mode in zip(dropouts, modes):  # put train/eval mode back as it was
            m.deterministic = mode
    return {k: np.asarray(v).astype(np.float64) for k, v in inter.items()}


# ------------------------------------------------------------------------------------------ compare


def first_divergence(
    source: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray], dtype: str
) -> tuple[str, float, float] | None:
    """(sublayer, max abs error, bound) of the first sublayer over its bound, or None."""
    for name, ref in source.items():
        err = float(np.max(np.abs(ref - target[name])))
        bound = verify_bound(dtype, ref)
        if not err <= bound:  # "not <=" so that NaN fails
            return name, err, bound
    return None


# ------------------------------------------------------------------------------------- apply, check


def _snapshot(model):
    """The target's current parameter values, cheap to take and to put back."""
    if framework_of(model) == "torch":
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from flax import nnx

    return [(var, var.get_value()) for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]  # immutable arrays


def _restore(model, snapshot) -> None:
    if framework_of(model) == "torch":
        import torch

        with torch.no_grad():
            model.load_state_dict(snapshot, strict=True)
        return
    for var, value in snapshot:
        var.set_value(value)


def apply_verified(
    target,
    apply: Callable[[], None],
    source_trace: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    what: str,
) -> None:
    """Run ``apply()`` (which loads new weights into ``target``), then compare ``target`` with the
    source on the probe; on a divergence restore the old weights and raise VerificationError."""
    dtype = model_dtype(target)
    verify_bound(dtype, np.zeros(1))  # refuses a dtype verify has no bound for, before anything changes
    snapshot = _snapshot(target)
    apply()
    probe = probe_input(target)
    found = first_divergence(source_trace(probe), trace(target, probe), dtype)
    if found is not None:
        _restore(target, snapshot)
        raise VerificationError(*found, what=what)
