"""PyTorch <-> NumPy, bit-exact for every float dtype (bfloat16 through ml_dtypes, not float32)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import torch

from twin_common.params import table_for
from weight_conversion.validate import ConversionError, check


def tensor_to_numpy(tensor: torch.Tensor, copy: bool = True) -> np.ndarray:
    """A NumPy copy of ``tensor``. ``.numpy()`` refuses bfloat16, so its bits go through int16.

    ``copy=False``: a view of a CPU tensor's memory where possible, for callers that only read it
    before the tensor can change (writing a file, handing it to JAX, which copies)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        array = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return array.copy() if copy else array


def numpy_to_tensor(array: np.ndarray, device: torch.device | str = "cpu", copy: bool = True) -> torch.Tensor:
    """A tensor from ``array``; ``copy=False`` shares a writable array's memory (load_state_dict
    copies into the parameters anyway, so a second copy would only raise peak memory)."""
    array = np.ascontiguousarray(array)
    copy = copy or not array.flags.writeable  # torch.from_numpy needs writable memory
    if array.dtype == ml_dtypes.bfloat16:
        bits = array.view(np.int16)
        return torch.from_numpy(bits.copy() if copy else bits).view(torch.bfloat16).to(device)
    return torch.from_numpy(array.copy() if copy else array).to(device)


def _param_dtype(model: torch.nn.Module) -> str:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    if len(dtypes) != 1:
        raise ConversionError([f"the torch model mixes parameter dtypes {dtypes}"], "target model")
    return dtypes[0]


def _model_table(model: torch.nn.Module):
    table = table_for(model.cfg)
    state = model.state_dict()
    if set(state) != {spec.torch_key for spec in table} or any(
        tuple(state[s.torch_key].shape) != s.torch_shape for s in table
    ):  # a bug in this project, not in the user's weights
        raise AssertionError(f"conversion table out of date with {type(model).__name__}")
    return table, state


def export_torch(model: torch.nn.Module, copy: bool = True) -> dict[str, np.ndarray]:
    """The model's parameters as {state_dict key: array in torch layout}, in table order
    (``copy=False``: views of CPU parameters, see tensor_to_numpy)."""
    table, state = _model_table(model)
    return {spec.torch_key: tensor_to_numpy(state[spec.torch_key], copy) for spec in table}


def import_torch(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load torch-layout ``arrays`` into ``model`` after checking every key, shape, dtype and value.

    On any problem a ConversionError lists them all and the model is left untouched. The dtype must
    match the model's: load_state_dict would silently cast, which hides a wrong-precision checkpoint.
    """
    table, state = _model_table(model)
    check(arrays, table, _param_dtype(model))
    new_state = {k: numpy_to_tensor(arrays[k], state[k].device, copy=False) for k in state}
    with torch.no_grad():
        model.load_state_dict(new_state, strict=True)
