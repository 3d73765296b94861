"""Which framework a model belongs to, and its one parameter dtype, asked of either twin without
importing either twin (the floor imports no twin): a torch module's classes live in ``torch.*``."""

from __future__ import annotations

import numpy as np

FRAMEWORKS = ("torch", "jax")


def framework_of(model) -> str:
    """"torch" for a torch.nn.Module, "jax" for anything else (a Flax NNX module)."""
    return "torch" if any(cls.__module__.startswith("torch.") for cls in type(model).__mro__) else "jax"


def model_dtype(model) -> str:
    """The one parameter dtype of either twin, as a bare name ("float32"); ValueError if it mixes."""
    if framework_of(model) == "torch":
        names = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    else:
        from flax import nnx

        names = {np.dtype(v.get_value().dtype).name for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if len(names) != 1:
        raise ValueError(f"the model mixes parameter dtypes {sorted(names)}")
    return names.pop()
