"""Training checkpoints both frameworks read and write: one safetensors file holding the weights
("model.<torch key>") and the AdamW moments ("optim.exp_avg.<key>", "optim.exp_avg_sq.<key>"), all
in torch layout, with the step and the configs in its metadata. Written atomically; loaded with
every key, shape, dtype and value checked, and the model config compared, before anything is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from twin_common.config import config_differences
from weight_conversion.optim_state import check_optim_arrays
from weight_conversion.safetensors_io import CheckpointError, load_file, save_file
from weight_conversion.table import table_for
from weight_conversion.validate import ConversionError, find_problems

FORMAT = "torch-flax-twins/train-checkpoint/1"


def save_checkpoint(
    path: str | os.PathLike,
    cfg,
    weights: Mapping[str, np.ndarray],
    optim: Mapping[str, np.ndarray],
    step: int,
    extra: Mapping[str, object] | None = None,
) -> None:
    """``extra`` values must be JSON-serialisable (train config, data position, framework...)."""
    arrays = {f"model.{k}": v for k, v in weights.items()}
    arrays.update(optim)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "step": str(int(step)),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    save_file(arrays, path, metadata)


def load_checkpoint(path: str | os.PathLike, cfg) -> tuple[dict, dict, dict]:
    """(weights, optimizer arrays, meta) where meta has "step", "config" and the saved extras.

    Raises CheckpointError for an unreadable file and ConversionError (listing every problem) for
    one that does not fit ``cfg``."""
    arrays, metadata = load_file(path)
    where = os.fspath(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a training checkpoint (format {metadata.get('format')!r})")
    try:
        saved_cfg = json.loads(metadata["config"])
        step = int(metadata["step"])
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where} has unreadable metadata: {e}") from None
    problems = config_differences(saved_cfg, cfg.to_dict(), what="config", where=where)
    if problems:
        raise ConversionError(problems, f"checkpoint {where}")
    weights = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optim = {k: v for k, v in arrays.items() if k.startswith("optim.")}
    stray = [k for k in arrays if not k.startswith(("model.", "optim."))]
    problems = find_problems(weights, table_for(cfg), "float32") + [f"unexpected key {k!r}" for k in stray]
    if problems:
        raise ConversionError(problems, f"checkpoint {where}")
    try:
        check_optim_arrays(cfg, optim)
    except ConversionError as e:
        raise ConversionError(e.problems, f"checkpoint {where}") from None
    return weights, optim, {"step": step, "config": saved_cfg, **extra}
