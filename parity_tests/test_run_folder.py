"""Run-folder rules (scripts.run_folder) and the training CLI on bad input: every refusal is a clear
error with the folder left exactly as it was; --resume takes the configs from the checkpoint."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

from twin_parity.testing import deadline  # noqa: E402
from scripts import train as T  # noqa: E402
from scripts.run_folder import RunDir, RunError, check_extra  # noqa: E402
from weight_conversion.checkpoint import read_checkpoint_metadata  # noqa: E402

ZERO_RNG = base64.b64encode(bytes(5056)).decode()  # the right size, but torch refuses an all-zero state
FAST = ["--model", "tiny", "--batch-size", "2", "--seq-len", "8", "--eval-every", "0", "--sample", "0", "--quiet"]


def _main(out, *extra, framework="torch") -> int:
    return T.main(["--framework", framework, "--out", str(out), *extra])


def _snapshot(folder) -> dict:
    return {
        os.path.relpath(os.path.join(root, n), folder): pathlib.Path(root, n).read_bytes()
        for root, _, names in os.walk(folder) for n in names
    }  # fmt: skip


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A torch run of 4 steps stopped at step 2, with non-default flags; copied per test."""
    out = tmp_path_factory.mktemp("runs") / "stopped"
    assert _main(out, *FAST, "--steps", "4", "--stop-at", "2", "--lr", "1e-3", "--warmup", "1", "--seed", "3") == 0
    return out


@pytest.fixture
def run(stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out


# ------------------------------------------------------------------------------------------ flags


BAD_FLAGS = {
    "grad_clip_nan": (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    "seq_len_0": (["--seq-len", "0"], "--seq-len must be >= 1"),
    "data_empty": (["--data", ""], "--data is empty"),
    "ckpt_every_negative": (["--ckpt-every", "-1"], "--ckpt-every must be >= 0"),
    "eval_every_negative": (["--eval-every", "-1"], "--eval-every must be >= 0"),
    "warmup_past_steps": (["--warmup", "10", "--steps", "5"], "--warmup 10 is longer than the run"),
    "seed_negative": (["--seed", "-1"], "--seed must be >= 0"),
    "lr_inf": (["--lr", "inf"], "--lr must be a finite number > 0"),
    "weight_decay_nan": (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    "dropout_one": (["--dropout", "1"], "--dropout must be in [0, 1)"),
    "min_lr_zero": (["--min-lr", "0"], "--min-lr must be a finite number > 0"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_is_refused_before_anything_is_written(case, tmp_path, capsys):
    flags, fragment = BAD_FLAGS[case]
    out = tmp_path / "run"
    assert _main(out, "--model", "tiny", *flags) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    assert _main(out, *FAST, "--steps", "1") == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_device_cuda_without_cuda_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for framework in ("torch", "jax", "compare"):  # JAX ignores --device: refused, not ignored
        assert _main(tmp_path / "run", *FAST, "--device", "cuda", framework=framework) == 2
        assert "this torch has no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_data_that_is_not_a_regular_file_is_refused_without_reading(kind, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    if kind == "fifo":
        os.mkfifo(data)
    else:
        data.symlink_to("/dev/zero")
    with deadline(20):
        assert _main(tmp_path / "run", *FAST, "--data", str(data)) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- latest.json


def _latest(run) -> dict:
    return json.loads((run / "latest.json").read_text())


LATEST_CHANGES = {
    "step_string": lambda d: d | {"step": "2"},
    "step_missing": lambda d: {k: v for k, v in d.items() if k != "step"},
    "step_bool": lambda d: d | {"step": True},
    "step_disagrees": lambda d: d | {"step": 3},
    "framework_unknown": lambda d: d | {"framework": "tensorflow"},
    "names_dev_zero": lambda d: d | {"checkpoint": "/dev/zero"},
    "names_parent": lambda d: d | {"checkpoint": "../stopped/ckpt/step_000002.safetensors"},
    "hash_missing": lambda d: {k: v for k, v in d.items() if k != "content_hash"},
    "hash_other": lambda d: d | {"content_hash": "xxh3_128:" + "0" * 32},
    "a_list": lambda d: [d],
}


@pytest.mark.parametrize("case", list(LATEST_CHANGES))
def test_bad_latest_json_is_refused_and_the_folder_unchanged(case, run, capsys):
    (run / "latest.json").write_text(json.dumps(LATEST_CHANGES[case](_latest(run))))
    before = _snapshot(run)
    with deadline(30):
        assert _main(run, "--resume", "--quiet") == 2
    assert "error:" in capsys.readouterr().err
    assert _snapshot(run) == before


@pytest.mark.parametrize("kind", ["dev_zero", "fifo"])
def test_checkpoint_replaced_by_a_device_or_fifo_is_refused_without_hanging(kind, run, capsys):
    ckpt = run / _latest(run)["checkpoint"]
    ckpt.unlink()
    if kind == "fifo":
        os.mkfifo(ckpt)
    else:
        ckpt.symlink_to("/dev/zero")
    with deadline(20):
        assert _main(run, "--resume", "--quiet") == 2
    assert "not a regular file" in capsys.readouterr().err


def test_latest_json_that_is_a_fifo_is_refused(run, capsys):
    (run / "latest.json").unlink()
    os.mkfifo(run / "latest.json")
    with deadline(20):
        assert _main(run, "--resume", "--quiet") == 2
    assert "not a regular file" in capsys.readouterr().err


# ------------------------------------------------------------------------ the checkpoint's extras


def test_check_extra_names_each_problem(run):
    step, _, extra = read_checkpoint_metadata(run / _latest(run)["checkpoint"])
    assert check_extra(extra, step) == []  # control
    cases = {
        "lacks data": {k: v for k, v in extra.items() if k != "data"},
        "unknown entries 'x'": extra | {"x": 1},
        "unknown framework 'tf'": extra | {"framework": "tf"},
        "train config is invalid": extra | {"train_config": extra["train_config"] | {"lr": "fast"}},
        "past the end of its own schedule": extra | {"train_config": extra["train_config"] | {"steps": 1}},
        "holds 4 bytes": extra | {"rng": {"torch_rng": "AAAAAA=="}},
        "not base64": extra | {"rng": {"torch_rng": "***"}},
        "refused by torch": extra | {"rng": {"torch_rng": ZERO_RNG}},
        "loss must be a finite number": extra | {"loss": float("nan")},
        "is {'jax_rng'": extra | {"framework": "jax"},
    }
    for fragment, bad in cases.items():
        problems = check_extra(bad, step)
        assert any(fragment in p for p in problems), (fragment, problems)


def test_resume_refuses_a_checkpoint_with_bad_extras_and_leaves_the_folder(run, capsys):
    """A checkpoint written with a valid content hash but an RNG state torch refuses (a buggy
    writer): refused before the log is truncated or anything else is touched."""
    from weight_conversion.checkpoint import load_checkpoint, save_checkpoint

    path = run / _latest(run)["checkpoint"]
    weights, optim, meta = load_checkpoint(path, T.MODELS["tiny"])
    extra = {k: meta[k] for k in ("framework", "train_config", "data", "rng", "loss")}
    extra["rng"] = {"torch_rng": ZERO_RNG}
    save_checkpoint(path, T.MODELS["tiny"], weights, optim, meta["step"], extra)
    latest = _latest(run)
    latest["content_hash"] = read_checkpoint_metadata_hash(path)
    (run / "latest.json").write_text(json.dumps(latest))
    before = _snapshot(run)
    assert _main(run, "--resume", "--quiet") == 2
    assert "refused by torch" in capsys.readouterr().err
    assert _snapshot(run) == before


def read_checkpoint_metadata_hash(path) -> str:
    from weight_conversion.safetensors_io import HASH_KEY, read_header

    return read_header(path).metadata[HASH_KEY]


# --------------------------------------------------------------------------------------- resume


def test_resume_takes_every_setting_from_the_checkpoint(run, capsys):
    assert _main(run, "--resume", "--quiet", "--sample", "0", "--eval-every", "0") == 0
    step, _, extra = read_checkpoint_metadata(run / _latest(run)["checkpoint"])
    assert step == 4
    assert extra["train_config"]["lr"] == 1e-3 and extra["train_config"]["seed"] == 3
    assert extra["train_config"]["batch_size"] == 2 and extra["train_config"]["warmup_steps"] == 1


def test_resume_names_each_conflicting_flag(run, capsys):
    before = _snapshot(run)
    assert _main(run, "--resume", "--quiet", "--lr", "5e-3", "--seed", "4", "--steps", "9") == 2
    err = capsys.readouterr().err
    for flag in ("--lr 0.005", "--seed 4", "--steps 9"):
        assert flag in err, err
    assert _snapshot(run) == before


def test_larger_steps_extends_a_finished_run_and_smaller_is_refused(run, capsys):
    assert _main(run, "--resume", "--quiet", "--sample", "0") == 0  # finish: step 4
    assert _main(run, "--resume", "--quiet", "--steps", "3") == 2
    assert "already finished its 4 steps" in capsys.readouterr().err
    assert _main(run, "--resume", "--quiet", "--sample", "0", "--steps", "6") == 0
    assert "extending the run from 4 to 6 steps" in capsys.readouterr().err
    assert _latest(run)["step"] == 6
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))  # numbered as the checkpoints are


def test_an_old_log_numbered_from_0_is_renumbered_on_resume(run):
    """Run folders written before steps were numbered from 1 stay readable: on resume their lines
    are renumbered, so the log has one numbering throughout."""
    log = run / "log.jsonl"
    old = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**r, "step": r["step"] - 1}) + "\n" for r in old))
    assert _main(run, "--resume", "--quiet", "--sample", "0") == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 5))
    assert [r["loss"] for r in lines[: len(old)]] == [r["loss"] for r in old]


def test_run_stopped_before_its_first_checkpoint_restarts_with_resume(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    (out / "log.jsonl").write_text('{"step": 0, "loss": 5.0}\n{"step": 1, "lo')  # cut by a kill
    tmp = out / "ckpt" / ".step_000002.safetensors.abc123.tmp"
    tmp.write_bytes(b"half a checkpoint")
    before = _snapshot(out)
    assert _main(out, *FAST, "--steps", "2") == 2
    assert "--resume to start it over from step 0" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert _main(out, *FAST, "--steps", "2", "--resume") == 0
    assert "starting over from step 0" in capsys.readouterr().err
    assert not tmp.exists()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_removes_temporaries_left_by_a_kill(run, capsys):
    tmp = run / ".latest.json.xyz.tmp"
    tmp.write_text("{")
    assert RunDir(str(run)).temporaries() == [str(tmp)]
    assert _main(run, "--resume", "--quiet", "--sample", "0") == 0
    assert not tmp.exists()


def test_resume_of_nothing_says_so(tmp_path, capsys):
    assert _main(tmp_path / "none", *FAST, "--resume") == 2
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_read_latest_alone_without_the_cli(run):
    latest = RunDir(str(run)).read_latest()
    assert latest["step"] == 2 and latest["framework"] == "torch"
    (run / "latest.json").write_text("{}")
    with pytest.raises(RunError, match="'step' must be an integer"):
        RunDir(str(run)).read_latest()


def test_run_folder_from_before_content_hashes_still_resumes(run, capsys):
    """latest.json with a sha256 and a checkpoint without content_hash (the earlier format): the
    sha256 verifies the bytes, and the run resumes."""
    import hashlib

    import safetensors.numpy

    from weight_conversion.safetensors_io import HASH_KEY, load_file

    latest = _latest(run)
    path = run / latest["checkpoint"]
    arrays, metadata = load_file(path)
    del metadata[HASH_KEY]
    safetensors.numpy.save_file(arrays, path, metadata=metadata)
    del latest["content_hash"]
    latest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "latest.json").write_text(json.dumps(latest))
    assert _main(run, "--resume", "--quiet", "--sample", "0") == 0
    latest["sha256"] = "0" * 64  # control: a wrong sha256 is refused
    (run / "latest.json").write_text(json.dumps(latest))
    assert _main(run, "--resume", "--quiet") == 2
