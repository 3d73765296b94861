"""Training checkpoints both frameworks read and write: one safetensors file holding the weights
("model.<torch key>") and the AdamW moments ("optim.exp_avg.<key>", "optim.exp_avg_sq.<key>"), all
in torch layout, with the step and the configs in its metadata. Written atomically, with a content
hash (only this project writes the format, so a checkpoint without one is refused); loaded with the
metadata checked from the header first (format, step, config, extras), then every key, shape, dtype
and value, the second moments (>= 0) and the step against the moments, before anything is used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from twin_common.config import config_differences
from weight_conversion.optim_state import check_optim_arrays
from weight_conversion.safetensors_io import HASH_KEY, CheckpointError, load_file, read_header, save_file
from twin_common.params import table_for
from weight_conversion.validate import ConversionError, find_problems

FORMAT = "torch-flax-twins/train-checkpoint/1"
MAX_STEP = 2**31 - 1  # optax keeps its step count in an int32


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


def load_checkpoint(path: str | os.PathLike, cfg, *, require_hash: bool = True) -> tuple[dict, dict, dict]:
    """(weights, optimizer arrays, meta) where meta has "step", "config" and the saved extras.

    Raises CheckpointError for an unreadable file or unreadable metadata, and ConversionError
    (listing every problem) for one that does not fit ``cfg``. ``require_hash=False`` only for
    checkpoints from before content hashes, whose bytes were verified another way."""
    where = os.fspath(path)
    step, saved_cfg, extra = read_checkpoint_metadata(where, require_hash=require_hash)
    problems = config_differences(saved_cfg, cfg.to_dict(), what="config", where=where)
    if problems:
        raise ConversionError(problems, f"checkpoint {where}")
    arrays, _ = load_file(where, require_hash=require_hash, mapped=True)  # the trainers copy them in
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
    # At step 0 every moment is zero (no gradient yet); after a step the second moments are not all
    # zero (they are squares of gradients). Anything else means the step and the state disagree.
    if step == 0 and any(np.any(v) for v in optim.values()):
        raise CheckpointError(f"{where}: its step is 0 but its optimizer moments are not zero")
    if step > 0 and not any(np.any(v) for k, v in optim.items() if k.startswith("optim.exp_avg_sq.")):
        raise CheckpointError(f"{where}: its step is {step} but its second moments are all zero (step 0's state)")
    return weights, optim, {"step": step, "config": saved_cfg, **extra}


def read_checkpoint_metadata(path: str | os.PathLike, *, require_hash: bool = True) -> tuple[int, dict, dict]:
    """(step, model config dict, extras dict) from a training checkpoint's header alone: cheap,
    and every problem is a CheckpointError naming the file."""
    where = os.fspath(path)
    metadata = read_header(where).metadata

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{where} has unreadable metadata: {why}")

    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a training checkpoint (format {metadata.get('format')!r:.80})")
    if require_hash and HASH_KEY not in metadata:
        raise fail(f"no {HASH_KEY} (every training checkpoint is written with one)")
    missing = [k for k in ("config", "step", "extra") if k not in metadata]
    if missing:
        raise fail(f"missing {', '.join(missing)}")
    text = metadata["step"]
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_STEP):
        raise fail(f"step must be an integer 0..{MAX_STEP}, got {text[:40]!r}")
    parsed = {}
    for key in ("config", "extra"):
        try:
            parsed[key] = json.loads(metadata[key])
        except (ValueError, RecursionError):
            raise fail(f"{key} is not JSON: {metadata[key][:80]!r}") from None
        if not isinstance(parsed[key], dict):
            raise fail(f"{key} is not a JSON object: {metadata[key][:80]!r}")
    return int(text), parsed["config"], parsed["extra"]
