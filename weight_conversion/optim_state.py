"""AdamW state in the interchange layout, so a run can move between torch.optim and optax.

torch.optim.AdamW keeps, per parameter, ``exp_avg`` (first moment), ``exp_avg_sq`` (second moment)
and ``step``; optax.adamw keeps ``mu`` and ``nu`` as pytrees shaped like the parameters and one
``count`` (twice: in its Adam state and in its schedule state). They are the same numbers: mu is
exp_avg, nu is exp_avg_sq, count is step, in each framework's parameter layout. The interchange
form is {"optim.exp_avg.<torch key>": array, "optim.exp_avg_sq.<torch key>": array} in torch
layout, plus the step as an int; the conversion table maps layouts exactly as for the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from twin_common.params import table_for
from weight_conversion.validate import FLOAT_DTYPES, ConversionError, find_problems

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch's names; optax calls them mu and nu
_OPTAX_NAMES = {"exp_avg": "mu", "exp_avg_sq": "nu"}


def optim_key(moment: str, torch_key: str) -> str:
    """The one spelling of a moment's key in the flat form: "optim.exp_avg.<torch key>"."""
    return f"optim.{moment}.{torch_key}"


def optim_keys(cfg) -> list[str]:
    return [optim_key(m, spec.torch_key) for m in MOMENTS for spec in table_for(cfg)]


def check_optim_arrays(cfg, arrays: Mapping[str, np.ndarray], dtype: str | None = "float32") -> None:
    problems = []
    for moment in MOMENTS:
        prefix = optim_key(moment, "")
        sub = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        problems += [f"{moment}: {p}" for p in find_problems(sub, table_for(cfg), dtype)]
    for key, v in arrays.items():  # a square's running mean; a negative one makes the next step NaN
        v = np.asarray(v)
        if key.startswith("optim.exp_avg_sq.") and v.size and v.dtype.name in FLOAT_DTYPES:
            if np.min(v) < 0:  # NaN is reported above, as non-finite
                problems.append(f"exp_avg_sq: {key[len('optim.exp_avg_sq.'):]!r} has negative values")
    stray = [k for k in arrays if not any(k.startswith(optim_key(m, "")) for m in MOMENTS)]
    problems += [f"unexpected key {k!r}" for k in stray]
    if problems:
        raise ConversionError(problems, "optimizer state")


# ------------------------------------------------------------------------------------------ torch


def export_torch_optimizer(model, optimizer) -> tuple[dict[str, np.ndarray], int]:
    from weight_conversion.torch_side import tensor_to_numpy

    params = dict(model.named_parameters())
    arrays, steps = {}, set()
    for spec in table_for(model.cfg):
        state = optimizer.state.get(params[spec.torch_key], {})
        if not state:  # before the first step torch has no state: zeros, step 0
            zeros = np.zeros(spec.torch_shape, np.float32)
            arrays.update({optim_key(m, spec.torch_key): zeros for m in MOMENTS})
            steps.add(0)
            continue
        for m in MOMENTS:
            arrays[optim_key(m, spec.torch_key)] = tensor_to_numpy(state[m])
        steps.add(int(state["step"]))
    if len(steps) != 1:
        raise ConversionError([f"parameters are at different optimizer steps {sorted(steps)}"], "optimizer state")
    return arrays, steps.pop()


def import_torch_optimizer(model, optimizer, arrays: Mapping[str, np.ndarray], step: int) -> None:
    """Give every parameter its moments and ``step``, all checks first."""
    import torch

    from weight_conversion.torch_side import numpy_to_tensor

    check_optim_arrays(model.cfg, arrays)
    params = dict(model.named_parameters())
    for spec in table_for(model.cfg):
        p = params[spec.torch_key]
        optimizer.state[p] = {
            # torch keeps step as a float32 tensor on the CPU unless the optimizer is capturable/fused
            "step": torch.tensor(float(step), dtype=torch.float32,
                                 device=p.device if optimizer.defaults.get("fused") else "cpu"),
            **{m: numpy_to_tensor(arrays[optim_key(m, spec.torch_key)], p.device) for m in MOMENTS},
        }  # fmt: skip


# ------------------------------------------------------------------------------------------ optax


def export_optax_state(cfg, opt_state) -> tuple[dict[str, np.ndarray], int]:
    import jax
    import optax

    from weight_conversion.flax_side import flax_path

    by_path = {spec.flax_path: spec for spec in table_for(cfg)}
    arrays = {}
    for moment, name in _OPTAX_NAMES.items():
        tree = optax.tree_utils.tree_get(opt_state, name)
        for kp, leaf in jax.tree_util.tree_leaves_with_path(tree):
            spec = by_path[flax_path(kp)]
            arrays[optim_key(moment, spec.torch_key)] = spec.transform.to_torch(np.asarray(leaf))
    counts = {int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")}
    if len(counts) != 1:
        raise ConversionError([f"optax counts disagree: {sorted(counts)}"], "optimizer state")
    return arrays, counts.pop()


def import_optax_state(cfg, opt_state, arrays: Mapping[str, np.ndarray], step: int):
    """A copy of ``opt_state`` (as made by tx.init) holding these moments and count, checks first."""
    import jax
    import jax.numpy as jnp
    import optax

    from weight_conversion.flax_side import flax_path

    check_optim_arrays(cfg, arrays)
    by_path = {spec.flax_path: spec for spec in table_for(cfg)}

    def fill(moment):
        def leaf(kp, old):
            spec = by_path[flax_path(kp)]
            new = spec.transform.to_flax(np.asarray(arrays[optim_key(moment, spec.torch_key)]))
            return jax.device_put(new, old.sharding)

        return jax.tree_util.tree_map_with_path(leaf, optax.tree_utils.tree_get(opt_state, _OPTAX_NAMES[moment]))

    new_state = optax.tree_utils.tree_set(
        opt_state, mu=fill("exp_avg"), nu=fill("exp_avg_sq"), count=jnp.asarray(step, jnp.int32)
    )
    # tree_set put one count array in two places; a jitted step that donates the state would then
    # donate one buffer twice, which XLA refuses. Give every leaf its own buffer.
    return jax.tree.map(lambda a: jnp.array(a, copy=True), new_state)
