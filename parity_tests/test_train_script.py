"""scripts.train as a user runs it: bad input, checkpoints, NaN, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

from scripts import train as T  # noqa: E402
from weight_conversion.checkpoint import load_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--model", "tiny", "--batch-size", "4", "--seq-len", "16", "--eval-every", "0",
        "--sample", "0", "--quiet"]  # fmt: skip


def _run(out, *extra) -> int:
    return T.main(["--framework", "torch", "--out", str(out), *FAST, *extra])


def _final_weights(out) -> dict:
    with open(os.path.join(out, "latest.json")) as f:
        latest = json.load(f)
    weights, _, meta = load_checkpoint(os.path.join(out, latest["checkpoint"]), T.MODELS["tiny"])
    return weights, meta


def _snapshot(folder) -> dict:
    return {
        os.path.join(root, n): pathlib.Path(root, n).read_bytes()
        for root, _, names in os.walk(folder) for n in names
    }  # fmt: skip


@pytest.mark.parametrize(
    "content,fragment",
    [(None, "no such file"), (b"", "empty"), (b"abc\x00\x01\x02" * 10, "binary"), (b"\xff\xfe" * 50, "UTF-8")],
    ids=["missing", "empty", "binary", "not-utf8"],
)
def test_bad_data_file_is_a_clear_error_and_writes_nothing(tmp_path, capsys, content, fragment):
    data = tmp_path / "corpus.txt"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "run"
    assert _run(out, "--steps", "2", "--data", str(data)) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_text_too_short_for_the_sequence_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("hello world\n")
    assert _run(tmp_path / "run", "--steps", "2", "--data", str(data)) == 2
    assert "too few for seq_len=16" in capsys.readouterr().err


def test_user_data_trains_and_resumes_in_the_other_framework(tmp_path):
    """--data, --stop-at in torch, --resume in JAX: a cross-framework run through the CLI."""
    data = tmp_path / "corpus.txt"
    data.write_text("a small text, repeated so the model has something to fit.\n" * 40)
    out = tmp_path / "run"
    assert _run(out, "--steps", "6", "--stop-at", "3", "--data", str(data)) == 0
    assert _final_weights(out)[1]["step"] == 3
    code = T.main(["--framework", "jax", "--out", str(out), *FAST, "--steps", "6", "--data", str(data), "--resume"])
    assert code == 0
    weights, meta = _final_weights(out)
    assert meta["step"] == 6 and meta["framework"] == "jax"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))  # numbered as the checkpoints are


def test_existing_run_is_not_overwritten_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps", "2") == 0
    before = _snapshot(out)
    assert _run(out, "--steps", "2") == 2
    assert "already holds files of a run" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_refuses_another_config_and_a_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps", "4", "--stop-at", "2") == 0
    before = _snapshot(out)
    assert _run(out, "--steps", "4", "--resume", "--lr", "5e-3") == 2
    assert "train config field 'lr'" in capsys.readouterr().err
    assert T.main(["--framework", "torch", "--out", str(out), *FAST[2:], "--model", "small",
                   "--seq-len", "16", "--steps", "4", "--resume"]) == 2  # fmt: skip
    assert "config field 'd_model'" in capsys.readouterr().err
    assert _snapshot(out) == before
    ckpt = out / json.loads((out / "latest.json").read_text())["checkpoint"]
    ckpt.write_bytes(ckpt.read_bytes()[:-100])  # truncated
    assert _run(out, "--steps", "4", "--resume") == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import torch

    import torch_impl.train as tt

    real = tt.train_step

    def poisoned(model, optimizer, x, y, tcfg, step, *rest):  # rest: autocast dtype, loss function
        loss, norm = real(model, optimizer, x, y, tcfg, step, *rest)
        return (torch.tensor(float("nan")) if step == 3 else loss), norm

    monkeypatch.setattr(tt, "train_step", poisoned)
    out = tmp_path / "run"
    assert _run(out, "--steps", "6", "--ckpt-every", "2") == 3
    err = capsys.readouterr().err
    assert "loss became nan at step 4" in err and "step_000002" in err  # the 4th step (0-based index 3)
    _, meta = _final_weights(out)
    assert meta["step"] == 2  # the checkpoint before the NaN, intact (sha256 checked on load)
    assert T.RunDir(str(out)).read_latest()["step"] == 2


# The JAX leg takes ~35 s on 2 cores (a fresh process compiles the step three times); the torch leg
# keeps the kill-and-resume path in the default run, and cross-framework resume is tested above.
@pytest.mark.parametrize("framework", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, framework):
    """Kill a training process with SIGKILL after its first checkpoint; --resume finishes the run
    with the same final weights, bit for bit, as a run that was never interrupted."""
    steps, args = 200, ["--steps", "200", "--ckpt-every", "5"]
    cmd = [sys.executable, "-m", "scripts.train", "--framework", framework, *FAST, *args]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(straight)], cwd=REPO, check=True, capture_output=True)

    proc = subprocess.Popen([*cmd, "--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "latest.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    at = json.loads((killed / "latest.json").read_text())["step"]
    assert 0 < at < steps
    subprocess.run([*cmd, "--out", str(killed), "--resume"], cwd=REPO, check=True, capture_output=True)

    a, meta_a = _final_weights(straight)
    b, meta_b = _final_weights(killed)
    assert meta_a["step"] == meta_b["step"] == steps
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key} differs after kill at step {at} and resume"


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bf16_mixed_precision_trains_with_float32_master_weights(tmp_path, framework):
    """--bf16: bfloat16 compute (torch autocast / JAX cast of the parameters), float32 checkpoints."""
    out = tmp_path / "run"
    code = T.main(["--framework", framework, "--out", str(out), *FAST, "--steps", "12", "--lr", "3e-3",
                   "--warmup", "2", "--bf16"])  # fmt: skip
    assert code == 0
    weights, _ = _final_weights(out)  # load_checkpoint insists on float32
    assert all(v.dtype == np.float32 for v in weights.values())
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < losses[0] - 0.1, f"bf16 training did not learn: {losses}"


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--steps", "3") == 0
    before = _snapshot(out)
    assert T.main(["--framework", "jax", "--out", str(out), *FAST, "--steps", "3", "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _snapshot(out) == before


def test_leftovers_of_a_crashed_run_are_not_appended_to(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 0, "loss": 5.0}\n{"step": 1, "lo')  # cut by a crash
    before = _snapshot(out)
    assert _run(out, "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint (log.jsonl)" in err and "--resume to start it over" in err
    assert _snapshot(out) == before
    assert _run(out, "--steps", "2", "--stop-at", "0") == 2
    assert "--stop-at must be between 1" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_progress_bar_shows_no_validation_loss_before_the_first_evaluation(tmp_path, capsys):
    fast = [a for a in FAST if a != "--quiet"]
    assert T.main(["--framework", "torch", "--out", str(tmp_path / "run"), *fast, "--steps", "2",
                   "--eval-every", "2"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "val=-" in err and "val=nan" not in err
