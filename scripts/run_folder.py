"""A training run's folder, and every rule about it, in one place.

    runs/x/ckpt/step_NNNNNN.safetensors   weights + AdamW state (either framework loads it)
    runs/x/latest.json                    which checkpoint is current, with its content hash
    runs/x/log.jsonl                      one line per step: "step" N is the N-th step done (1, 2,
                                          ...), the number the console and step_NNNNNN use

Checkpoints are written to a temporary name and renamed, and latest.json is replaced only after the
checkpoint it names is complete, so a crash at any point leaves the last good checkpoint usable.
Temporary files a crash leaves behind are removed on the next start.

Everything is checked before the folder is touched: latest.json (a JSON object with the fields and
types below, naming a regular file under ckpt/ whose step and hash agree with it) and the
checkpoint's metadata (framework, train config, data, RNG state, step) — see ``check_extra``. A
refused resume leaves every file as it was.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re

from weight_conversion.checkpoint import MAX_STEP, load_checkpoint, read_checkpoint_metadata
from twin_common.files import NotRegularFileError, cannot_write, open_regular, write_atomic, write_json_atomic
from weight_conversion.safetensors_io import HASH_KEY, CheckpointError, read_header

KEEP_CHECKPOINTS = 3
FRAMEWORKS = ("torch", "jax")
MAX_LATEST_BYTES = 1 << 16  # latest.json is ~200 bytes; anything much larger is not ours
_CKPT_NAME = re.compile(r"ckpt/step_(\d{6,10})\.safetensors")
_HEX = re.compile(r"[0-9a-f]+")
EXTRA_KEYS = frozenset({"framework", "train_config", "data", "rng", "loss"})
TORCH_RNG_BYTES = 5056  # torch.get_rng_state(): the CPU generator's Mersenne Twister state


class RunError(Exception):
    """A problem with the user's input or run directory; printed without a traceback."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.latest = os.path.join(path, "latest.json")
        self.log = os.path.join(path, "log.jsonl")
        self.ckpt = os.path.join(path, "ckpt")

    # ------------------------------------------------------------------------------ what is there

    def problem_with_path(self) -> str | None:
        """Why ``path`` cannot be a run folder (it is a file, say), or None."""
        if not self.path:
            return "--out is empty: give a folder for the run"
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            return f"--out {self.path} exists and is not a folder"
        for folder in (self.path, self.ckpt):  # checked now, before anything is built or run
            if folder == self.path or os.path.isdir(folder):
                why = cannot_write(folder, folder=True)
                if why:
                    return f"--out {self.path}: {why}"
        return None

    def exists(self) -> bool:
        """Whether the run has a checkpoint (its latest.json)."""
        return os.path.lexists(self.latest)

    def leftovers(self) -> list[str]:
        """Files of an earlier run (one may have crashed before its first checkpoint)."""
        names = ("latest.json", "log.jsonl", "ckpt", "compare.json")
        return [n for n in names if os.path.lexists(os.path.join(self.path, n))]

    def temporaries(self) -> list[str]:
        """Temporary files that write_atomic leaves when the process is killed mid-write."""
        found = []
        for folder in (self.path, self.ckpt):
            if os.path.isdir(folder):
                found += [os.path.join(folder, n) for n in os.listdir(folder)
                          if n.startswith(".") and n.endswith(".tmp")]  # fmt: skip
        return sorted(found)

    # ------------------------------------------------------------------------------------ reading

    def read_latest(self) -> dict:
        """latest.json, checked: {"checkpoint", "step", "framework", "path", and its hash}.

        The checkpoint it names must be a regular file under ckpt/ with that step in its name, and
        its content hash (in its header) must be the one recorded here; nothing large is read."""
        if not self.exists():
            raise RunError(f"{self.path} has no checkpoint to resume from (no latest.json)")

        def bad(why: str) -> RunError:
            return RunError(f"{self.latest} is unusable ({why}); the run cannot be resumed")

        try:
            fd, st = open_regular(self.latest)
            try:
                if st.st_size > MAX_LATEST_BYTES:
                    raise bad(f"{st.st_size} bytes, not a latest.json written by this script")
                raw = os.read(fd, MAX_LATEST_BYTES + 1)
            finally:
                os.close(fd)
            latest = json.loads(raw.decode("utf-8"))
        except (IsADirectoryError, NotRegularFileError):
            raise bad("not a regular file") from None
        except OSError as e:
            raise bad(e.strerror or str(e)) from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad(f"not JSON: {e}") from None
        if not isinstance(latest, dict):
            raise bad("not a JSON object")
        step, name, framework = latest.get("step"), latest.get("checkpoint"), latest.get("framework")
        if not (_is_int(step) and 0 <= step <= MAX_STEP):
            raise bad(f"'step' must be an integer 0..{MAX_STEP}, got {step!r:.40}")
        if framework not in FRAMEWORKS:
            raise bad(f"'framework' must be one of {FRAMEWORKS}, got {framework!r:.40}")
        match = _CKPT_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None or int(match.group(1)) != step:
            raise bad(f"'checkpoint' must be ckpt/step_{step:06d}.safetensors, got {name!r:.80}")
        content_hash, sha256 = latest.get(HASH_KEY), latest.get("sha256")
        if not isinstance(content_hash, str) and not (isinstance(sha256, str) and _HEX.fullmatch(sha256)):
            raise bad(f"no {HASH_KEY!r} (or, from older versions, 'sha256') string")
        path = os.path.join(self.path, name)
        if not os.path.lexists(path):
            raise RunError(f"{self.latest} names {path}, which does not exist")
        try:
            header = read_header(path)
        except CheckpointError as e:
            raise RunError(f"checkpoint {path} is corrupt or truncated: {e}") from None
        if isinstance(content_hash, str):
            if header.metadata.get(HASH_KEY) != content_hash:
                raise RunError(f"checkpoint {path} is corrupt or was replaced: its content hash is not "
                               f"the one in latest.json")  # fmt: skip
        elif _sha256(path) != sha256:  # latest.json from before content hashes; header checked above
            raise RunError(f"checkpoint {path} is corrupt or truncated: its sha256 does not match latest.json")
        # "legacy": a checkpoint from before content hashes, verified here by latest.json's sha256
        return {"checkpoint": name, "step": step, "framework": framework, "path": path,
                "legacy": not isinstance(content_hash, str)}  # fmt: skip

    def load(self, latest: dict, model_cfg) -> tuple[dict, dict, dict]:
        """(weights, optim, meta) of the checkpoint latest.json names, every part checked."""
        path = latest["path"]
        try:
            step, _, extra = read_checkpoint_metadata(path, require_hash=not latest["legacy"])
        except CheckpointError as e:
            raise RunError(str(e)) from None
        problems = check_extra(extra, step)
        if step != latest["step"]:
            problems.append(f"its step is {step}, latest.json says {latest['step']}")
        if extra.get("framework") != latest["framework"]:
            problems.append(f"its framework is {extra.get('framework')!r:.40}, latest.json says {latest['framework']!r}")
        if problems:
            raise RunError(f"checkpoint {path} cannot be resumed:\n  - " + "\n  - ".join(problems))
        return load_checkpoint(path, model_cfg, require_hash=not latest["legacy"])

    # ------------------------------------------------------------------------------------ writing

    def save(self, trainer, model_cfg, extra: dict) -> str:
        from weight_conversion.checkpoint import save_checkpoint

        weights, optim, step = trainer.state()
        os.makedirs(self.ckpt, exist_ok=True)
        rel = f"ckpt/step_{step:06d}.safetensors"
        path = os.path.join(self.path, rel)
        save_checkpoint(path, model_cfg, weights, optim, step, extra)
        content_hash = read_header(path).metadata[HASH_KEY]
        write_json_atomic(self.latest, {"checkpoint": rel, HASH_KEY: content_hash, "step": step,
                                        "framework": extra["framework"]})  # fmt: skip
        self._prune(keep=rel)
        return path

    def _prune(self, keep: str) -> None:
        names = sorted(n for n in os.listdir(self.ckpt) if n.startswith("step_") and n.endswith(".safetensors"))
        for name in names[:-KEEP_CHECKPOINTS]:
            if f"ckpt/{name}" != keep:
                os.unlink(os.path.join(self.ckpt, name))

    def remove_temporaries(self) -> list[str]:
        found = self.temporaries()
        for path in found:
            os.unlink(path)
        return found

    def start_over(self) -> None:
        """Forget a run that stopped before its first checkpoint: its log and temporaries."""
        if os.path.lexists(self.log):
            os.unlink(self.log)
        self.remove_temporaries()

    def append_log(self, record: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines past ``step`` (written after the checkpoint a crash left us with). A log
        written before steps were numbered from 1 (its first line is step 0: the step's 0-based
        index) is renumbered on the way, so a resumed old run has one numbering throughout."""
        if not os.path.exists(self.log):
            return
        records = []
        with open(self.log) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if _is_int(record["step"]):
                        records.append(record)
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    continue
        shift = 1 if records and records[0]["step"] == 0 else 0  # the old 0-based numbering
        keep = [{**r, "step": r["step"] + shift} for r in records if r["step"] + shift <= step]
        write_atomic(self.log, "".join(json.dumps(r) + "\n" for r in keep).encode())


# ----------------------------------------------------------------------- the checkpoint's extras


def check_extra(extra: dict, step: int) -> list[str]:
    """Every problem with a training checkpoint's ``extra`` metadata (what this script stores next
    to the weights: framework, train config, data, RNG state, loss), for a checkpoint at ``step``."""
    from twin_common.train_config import TrainConfig

    problems = []
    missing, unknown = sorted(EXTRA_KEYS - set(extra)), sorted(set(extra) - EXTRA_KEYS)
    if missing:
        problems.append(f"its metadata lacks {', '.join(missing)}")
    if unknown:
        problems.append(f"its metadata has unknown entries {', '.join(map(repr, unknown))}")
    framework = extra.get("framework")
    if "framework" in extra and framework not in FRAMEWORKS:
        problems.append(f"unknown framework {framework!r:.40} (expected one of {FRAMEWORKS})")
    if "train_config" in extra:
        try:
            tcfg = TrainConfig.from_dict(extra["train_config"]) if isinstance(extra["train_config"], dict) else None
        except (ValueError, TypeError) as e:
            tcfg, why = None, str(e)
        else:
            why = "not a JSON object"
        if tcfg is None:
            problems.append(f"its train config is invalid: {why[:200]}")
        elif step > tcfg.steps:
            problems.append(f"its step {step} is past the end of its own schedule ({tcfg.steps} steps)")
    data = extra.get("data")
    if "data" in extra and not (
        isinstance(data, dict) and isinstance(data.get("source"), str)
        and isinstance(data.get("sha256"), str) and len(data["sha256"]) == 64 and _HEX.fullmatch(data["sha256"])
    ):  # fmt: skip
        problems.append(f"its data entry must be {{'source': str, 'sha256': 64 hex digits}}, got {data!r:.80}")
    loss = extra.get("loss")
    if "loss" in extra and not (isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)):
        problems.append(f"its loss must be a finite number, got {loss!r:.40}")
    if "rng" in extra and framework in FRAMEWORKS:
        problems += [f"its RNG state: {p}" for p in _rng_problems(extra["rng"], framework)]
    return problems


def _rng_problems(rng, framework: str) -> list[str]:
    if not isinstance(rng, dict):
        return [f"not a JSON object: {rng!r:.60}"]
    if framework == "jax":
        keys = rng.get("jax_rng")
        if set(rng) != {"jax_rng"} or not isinstance(keys, dict):
            return ["a JAX checkpoint's RNG state is {'jax_rng': {path: [2 uint32]}}"]
        return [
            f"key {path!r:.60} is not two integers 0..2^32-1: {data!r:.60}" for path, data in keys.items()
            if not (isinstance(data, list) and len(data) == 2 and all(_is_int(v) and 0 <= v < 2**32 for v in data))
        ]  # fmt: skip
    if "torch_rng" not in rng or not set(rng) <= {"torch_rng", "torch_cuda_rng"}:
        return ["a torch checkpoint's RNG state is {'torch_rng': base64, optionally 'torch_cuda_rng': [base64]}"]
    problems = []
    for name, texts in (("torch_rng", [rng["torch_rng"]]), ("torch_cuda_rng", rng.get("torch_cuda_rng", []))):
        if not isinstance(texts, list):
            problems.append(f"{name} is not a list")
            continue
        for text in texts:
            try:
                raw = base64.b64decode(text, validate=True) if isinstance(text, str) else None
            except (binascii.Error, ValueError):
                raw = None
            if raw is None:
                problems.append(f"{name} is not base64 text")
            elif name == "torch_rng" and len(raw) != TORCH_RNG_BYTES:
                problems.append(f"{name} holds {len(raw)} bytes, not the generator's {TORCH_RNG_BYTES}")
            elif name == "torch_rng" and (why := _torch_rng_refusal(raw)):
                problems.append(f"{name} is refused by torch: {why}")
    return problems


def _torch_rng_refusal(raw: bytes) -> str | None:
    """torch's own verdict on a CPU generator state (tried on a throwaway generator), if torch is here."""
    try:
        import torch
    except ImportError:
        return None
    try:
        torch.Generator().set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except RuntimeError as e:
        return str(e)[:120]
    return None
