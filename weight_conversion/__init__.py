"""Move weights between the PyTorch and Flax NNX twins, in memory or through safetensors files.

One table (``twin_common.params``) drives both directions. Everything is checked before
anything is applied: a ConversionError lists every missing or unexpected key, wrong shape, wrong
dtype and non-finite value, and the target model is left untouched.

torch and jax are imported only by the functions that need them, so a machine with one framework
can still read and write checkpoints for its twin.

    torch_to_flax(torch_block, flax_block)      # in memory
    flax_to_torch(flax_block, torch_block, verify=True)  # and run both on a probe input
    save(torch_block, "block.safetensors")      # either twin; torch layout + config in metadata
    load(flax_block, "block.safetensors")       # either twin
"""

from __future__ import annotations

import json
import os

import numpy as np

from twin_common.config import RUNTIME_FIELDS, config_differences
from twin_common.frameworks import framework_of
from weight_conversion.safetensors_io import CheckpointError, load_file, read_header, save_file
from twin_common.params import ParamSpec, Transform, block_table, table_for
from weight_conversion.validate import FLOAT_DTYPES, ConversionError

__all__ = [
    "CheckpointError", "ConversionError", "FLOAT_DTYPES", "ParamSpec", "Transform",
    "block_table", "export", "flax_to_torch", "import_", "load", "load_file", "save",
    "save_file", "table_for", "torch_to_flax",
]  # fmt: skip


def export(model, copy: bool = True) -> dict[str, np.ndarray]:
    """Parameters of either twin as {torch state_dict key: NumPy array in torch layout}.

    ``copy=False`` (torch): views of the CPU parameters, valid until the model changes; what
    save and torch_to_flax use, so they never hold a second copy of the model."""
    if framework_of(model) == "torch":
        from weight_conversion.torch_side import export_torch

        return export_torch(model, copy)
    from weight_conversion.flax_side import export_flax

    return export_flax(model)


def import_(model, arrays) -> None:
    """Load {torch key: torch-layout array} into either twin, all checks first."""
    if framework_of(model) == "torch":
        from weight_conversion.torch_side import import_torch

        return import_torch(model, arrays)
    from weight_conversion.flax_side import import_flax

    return import_flax(model, arrays)


def torch_to_flax(torch_model, flax_model, *, verify: bool = False) -> None:
    """Copy the torch twin's weights into the Flax twin. ``verify=True`` then runs both on a probe
    input and, if any sublayer differs beyond the tolerance table, restores the Flax twin's old
    weights and raises a VerificationError naming the first diverging sublayer."""
    _convert(torch_model, flax_model, verify, "torch -> Flax conversion")


def flax_to_torch(flax_model, torch_model, *, verify: bool = False) -> None:
    """The other direction of ``torch_to_flax``, with the same ``verify``."""
    _convert(flax_model, torch_model, verify, "Flax -> torch conversion")


def _convert(source, target, verify: bool, what: str) -> None:
    if not verify:  # copy=False: torch views; the Flax side copies each array onto its device
        return import_(target, export(source, copy=False))
    from weight_conversion.verify import apply_verified, trace

    apply_verified(target, lambda: import_(target, export(source)), lambda probe: trace(source, probe), what)


def save(model, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    """Write either twin's parameters to a safetensors file (atomically), config in the metadata."""
    metadata = {"format": "pt", "config": json.dumps(model.cfg.to_dict(), sort_keys=True)}
    metadata.update(extra_metadata or {})
    save_file(export(model, copy=False), path, metadata)


def load(model, path: str | os.PathLike) -> dict[str, str]:
    """Load a safetensors file written by either twin (or any torch-layout file) into ``model``.

    If the file records a config, it must describe the same function as the model's (fields in
    RUNTIME_FIELDS, such as attn_impl or dropout, may differ); otherwise a ConversionError names each
    differing field. Returns the file's metadata.
    """
    from weight_conversion.checkpoint import FORMAT

    if read_header(path).metadata.get("format") == FORMAT:  # before its arrays are read
        raise ConversionError(
            [f"{os.fspath(path)} is a training checkpoint (weights and AdamW moments), not a weights file: "
             f"read it with weight_conversion.checkpoint.load_checkpoint(path, cfg) and wc.import_(model, "
             f"weights), or turn it into one with python -m scripts.export"],
            f"checkpoint {os.fspath(path)}",
        )  # fmt: skip
    arrays, metadata = load_file(path, mapped=True)  # import_ copies them into the model
    problems = []
    if "config" in metadata:
        try:
            saved = json.loads(metadata["config"])
        except json.JSONDecodeError:
            saved = None
            problems.append(f"the file's config metadata is not JSON: {metadata['config'][:80]!r}")
        if saved is not None and not isinstance(saved, dict):
            problems.append(f"the file's config metadata is not a JSON object: {metadata['config'][:80]!r}")
        if isinstance(saved, dict):
            ours = model.cfg.to_dict()
            problems += config_differences(
                saved, ours, what="config", where=os.fspath(path), ignore=RUNTIME_FIELDS
            )
    if problems:
        raise ConversionError(problems, f"checkpoint {os.fspath(path)}")
    try:
        import_(model, arrays)
    except ConversionError as e:  # say which file the bad weights came from
        raise ConversionError(e.problems, f"checkpoint {os.fspath(path)}") from None
    return metadata
