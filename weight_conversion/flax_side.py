"""Flax NNX <-> NumPy, bit-exact for every float dtype (jax arrays convert to ml_dtypes bfloat16)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twin_common.params import FlaxPath, table_for
from weight_conversion.validate import ConversionError, find_problems


def flax_path(keypath) -> FlaxPath:
    """A pytree key path into an nnx.State (parameters, gradients, optax moments) -> the table's Flax
    path, e.g. ("blocks", 0, "ln_1", "scale")."""
    return tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))


def _variable(model: nnx.Module, path: FlaxPath) -> nnx.Variable:
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _model_table(model: nnx.Module):
    table = table_for(model.cfg)
    params = {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if set(params) != {spec.flax_path for spec in table} or any(
        tuple(params[s.flax_path].get_value().shape) != s.flax_shape for s in table
    ):  # a bug in this project, not in the user's weights
        raise AssertionError(f"conversion table out of date with {type(model).__name__}")
    return table, params


def export_flax(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as {torch state_dict key: array in torch layout}, in table order."""
    table, params = _model_table(model)
    return {
        spec.torch_key: spec.transform.to_torch(np.asarray(params[spec.flax_path].get_value()))
        for spec in table
    }


def import_flax(model: nnx.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load torch-layout ``arrays`` into ``model`` after checking every key, shape, dtype and value.

    On any problem a ConversionError lists them all and the model is left untouched. Each new array
    goes to the device (sharding) of the value it replaces.
    """
    table, params = _model_table(model)
    dtypes = sorted({jnp.dtype(v.get_value().dtype).name for v in params.values()})
    if len(dtypes) != 1:
        raise ConversionError([f"the Flax model mixes parameter dtypes {dtypes}"], "target model")
    problems = find_problems(arrays, table, dtypes[0])
    if dtypes[0] == "float64" and not jax.config.jax_enable_x64:
        # The model was built in x64 mode but this call runs outside it: device_put would
        # silently truncate every array to float32.
        problems.append(
            "float64 weights need JAX's x64 mode here (twin_common.precision.matched_precision("
            "x64=True) or jax.config.update('jax_enable_x64', True)); without it JAX truncates "
            "them to float32"
        )
    if problems:
        raise ConversionError(problems)
    for spec in table:
        var = params[spec.flax_path]
        old = var.get_value()
        new = spec.transform.to_flax(np.asarray(arrays[spec.torch_key]))
        if new.flags.c_contiguous:  # device_put on the CPU may alias (not copy) an aligned C-contiguous
            new = new.copy()        # array: the model would change when the caller's array does
        if isinstance(old, jax.Array):
            var.set_value(jax.device_put(new, old.sharding))
        else:  # an abstract model from nnx.eval_shape: place on the default device
            var.set_value(jnp.asarray(new))
