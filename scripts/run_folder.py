"""A training run's folder, and every rule about it, in one place.

    runs/x/ckpt/step_NNNNNN.safetensors   weights + AdamW state (either framework loads it)
    runs/x/latest.json                    which checkpoint is current, with its hash
    runs/x/log.jsonl                      one line per step

Checkpoints are written to a temporary name and renamed, and latest.json is replaced only after the
checkpoint it names is complete, so a crash at any point leaves the last good checkpoint usable.
"""

from __future__ import annotations

import hashlib
import json
import os

from weight_conversion.safetensors_io import write_atomic

KEEP_CHECKPOINTS = 3


class RunError(Exception):
    """A problem with the user's input or run directory; printed without a traceback."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode())


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.latest = os.path.join(path, "latest.json")
        self.log = os.path.join(path, "log.jsonl")

    def exists(self) -> bool:
        return os.path.exists(self.latest)

    def leftovers(self) -> list[str]:
        """Files of an earlier run (one may have crashed before its first checkpoint)."""
        names = ("latest.json", "log.jsonl", "ckpt", "compare.json")
        return [n for n in names if os.path.exists(os.path.join(self.path, n))]

    def read_latest(self) -> dict:
        if not self.exists():
            raise RunError(f"{self.path} has no checkpoint to resume from (no latest.json)")
        try:
            with open(self.latest) as f:
                latest = json.load(f)
            ckpt = os.path.join(self.path, latest["checkpoint"])
            expected = latest["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{self.latest} is unreadable ({e}); the run cannot be resumed") from None
        if not os.path.exists(ckpt):
            raise RunError(f"{self.latest} names {ckpt}, which does not exist")
        if _sha256(ckpt) != expected:
            raise RunError(f"checkpoint {ckpt} is corrupt or truncated: its sha256 does not match latest.json")
        return {**latest, "path": ckpt}

    def save(self, trainer, model_cfg, extra: dict) -> str:
        from weight_conversion.checkpoint import save_checkpoint

        weights, optim, step = trainer.state()
        os.makedirs(os.path.join(self.path, "ckpt"), exist_ok=True)
        rel = os.path.join("ckpt", f"step_{step:06d}.safetensors")
        path = os.path.join(self.path, rel)
        save_checkpoint(path, model_cfg, weights, optim, step, extra)
        write_json_atomic(self.latest, {"checkpoint": rel, "sha256": _sha256(path), "step": step,
                                         "framework": extra["framework"]})  # fmt: skip
        self._prune(keep=rel)
        return path

    def _prune(self, keep: str) -> None:
        folder = os.path.join(self.path, "ckpt")
        names = sorted(n for n in os.listdir(folder) if n.startswith("step_") and n.endswith(".safetensors"))
        for name in names[:-KEEP_CHECKPOINTS]:
            if os.path.join("ckpt", name) != keep:
                os.unlink(os.path.join(folder, name))

    def append_log(self, record: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines past ``step`` (written after the checkpoint a crash left us with)."""
        if not os.path.exists(self.log):
            return
        keep = []
        with open(self.log) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    continue
        write_atomic(self.log, "".join(keep).encode())
