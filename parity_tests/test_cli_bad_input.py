"""The CLIs against bad input, generated: unwritable and wrong-kind output paths, non-empty targets,
configs that disagree with their tensors (huge sizes included), runs left behind by an interruption.
Every case must end in exit 2 with an ``error:`` message (one line, or one line and the list of every
mismatch), no traceback, and the folder it ran in byte for byte as it was. Also: Ctrl-C during
training, --threads, and train-then-export as the README writes them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

from scripts import export as E  # noqa: E402
from scripts import generate as G  # noqa: E402
from scripts import parity_report as R  # noqa: E402
from scripts import train as T  # noqa: E402
from twin_common import GPTConfig  # noqa: E402

REPO = str(pathlib.Path(__file__).resolve().parents[1])
TINY = ["--model", "tiny", "--batch-size", "4", "--steps", "2"]  # the README's flags, at their smallest
HUGE = 10**9  # a size whose model would take gigabytes (n_layer) or terabytes (vocab, positions)


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished tiny torch run and a small GPT-2 folder, made once; each case copies what it needs."""
    import torch

    from torch_impl.gpt import GPT
    from weight_conversion.hf_gpt2 import export_hf_gpt2

    root = tmp_path_factory.mktemp("made")
    assert T.main(["--framework", "torch", "--out", str(root / "run"), *TINY, "--quiet", "--sample", "0"]) == 0
    torch.manual_seed(0)
    export_hf_gpt2(GPT(GPTConfig(vocab_size=96, block_size=16, n_layers=2, d_model=32, n_heads=4,
                                 gelu_approximate="tanh")), root / "gpt2")  # fmt: skip
    return root


def _read_only_dir(path: pathlib.Path) -> pathlib.Path:
    """A folder nothing can be written into: mode 0555, and for root (who ignores modes) the
    immutable attribute; skips where neither holds."""
    path.mkdir()
    path.chmod(0o555)
    if E.cannot_write(path, folder=True) is None:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True) if shutil.which("chattr") else None
        if done is None or done.returncode or E.cannot_write(path, folder=True) is None:
            path.chmod(0o755)
            pytest.skip("cannot make a read-only folder here (root, no chattr +i)")
    return path


def _writable_again(root: pathlib.Path) -> None:
    """Undo _read_only_dir, so that pytest can remove the case's folder."""
    for folder in root.rglob("ro"):
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def _snapshot(root: pathlib.Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, p.read_bytes() if p.is_file() else None)
    return out


@contextlib.contextmanager
def memory_cap(extra: int = 2 << 30):
    """At most ``extra`` more bytes of address space while a case runs: a case that builds the model
    its config describes fails with MemoryError here instead of exhausting the machine."""
    with open("/proc/self/status") as f:
        vm = int(next(line for line in f if line.startswith("VmSize:")).split()[1]) * 1024
    old = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


# ---------------------------------------------------------------------------- the bad-input cases


def _gpt2_with(made, tmp, **changes) -> str:
    folder = tmp / "gpt2"
    shutil.copytree(made / "gpt2", folder)
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**doc, **changes}))
    return str(folder)


def _weights_file_saying(made, tmp, **changes) -> str:
    """A weights file (weight_conversion.save's format) whose recorded config disagrees with it."""
    from weight_conversion.safetensors_io import load_file, save_file

    cfg = GPTConfig(vocab_size=96, block_size=16, n_layers=2, d_model=32, n_heads=4, gelu_approximate="tanh")
    import weight_conversion as wc
    from torch_impl.gpt import GPT

    path = tmp / "w.safetensors"
    wc.save(GPT(cfg), path)
    arrays, metadata = load_file(str(path))
    save_file(arrays, path, {**metadata, "config": json.dumps({**cfg.to_dict(), **changes})})
    return str(path)


def _run_whose_checkpoint_says(made, tmp, **changes) -> str:
    """A run folder whose latest checkpoint (hash and latest.json consistent) records a config that
    disagrees with its tensors."""
    from twin_common.files import write_json_atomic
    from weight_conversion.checkpoint import save_checkpoint
    from weight_conversion.safetensors_io import HASH_KEY, load_file, read_header

    run = tmp / "run"
    shutil.copytree(made / "run", run)
    latest = json.loads((run / "latest.json").read_text())
    path = run / latest["checkpoint"]
    arrays, metadata = load_file(str(path))
    cfg = dataclasses.replace(GPTConfig.from_dict(json.loads(metadata["config"])), **changes)
    weights = {k.removeprefix("model."): v for k, v in arrays.items() if k.startswith("model.")}
    optim = {k: v for k, v in arrays.items() if k.startswith("optim.")}
    save_checkpoint(path, cfg, weights, optim, int(metadata["step"]), json.loads(metadata["extra"]))
    write_json_atomic(str(run / "latest.json"), {**latest, HASH_KEY: read_header(path).metadata[HASH_KEY]})
    return str(run)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _cases():
    """(id, cli, build) with build(made, tmp) -> argv; tmp is the folder the case may not change."""
    ro = lambda tmp: _read_only_dir(tmp / "ro")  # noqa: E731
    file_ = lambda tmp: _write(tmp / "f", "x")  # noqa: E731
    train = lambda out, *more: ["--framework", "torch", "--out", str(out), *TINY, *more]  # noqa: E731
    gen = lambda ckpt: ["--framework", "torch", "--checkpoint", str(ckpt), "--prompt-ids", "1,2"]  # noqa: E731
    yield "train/out-under-read-only", T, lambda m, t: train(ro(t) / "run")
    yield "train/out-is-read-only", T, lambda m, t: train(ro(t))
    yield "train/out-is-a-file", T, lambda m, t: train(file_(t))
    yield "train/out-under-a-file", T, lambda m, t: train(file_(t) / "run")
    yield "train/threads-0", T, lambda m, t: train(t / "run", "--threads", "0")
    yield "train/interrupted-before-first-checkpoint", T, lambda m, t: train(
        _write(t / "run" / "log.jsonl", '{"step": 1, "loss": 5.0}\n{"st').parent)  # cut by a kill
    yield "train/resume-checkpoint-says-huge-n_layers", T, lambda m, t: [
        "--framework", "torch", "--out", _run_whose_checkpoint_says(m, t, n_layers=HUGE), "--resume"]
    yield "train/resume-checkpoint-says-huge-block_size", T, lambda m, t: [
        "--framework", "jax", "--out", _run_whose_checkpoint_says(m, t, block_size=HUGE), "--resume"]
    yield "parity_report/json-under-read-only", R, lambda m, t: ["--json", str(ro(t) / "r.json")]
    yield "parity_report/json-is-a-folder", R, lambda m, t: ["--json", str(t)]
    yield "parity_report/json-under-a-file", R, lambda m, t: ["--json", str(file_(t) / "r.json")]
    for field, value in (("n_layer", HUGE), ("n_positions", HUGE), ("vocab_size", HUGE), ("n_embd", 64),
                         ("n_layer", 3)):  # fmt: skip
        yield f"generate/gpt2-config-{field}={value}", G, lambda m, t, f=field, v=value: gen(_gpt2_with(m, t, **{f: v}))
    yield "generate/weights-file-says-huge-n_layers", G, lambda m, t: gen(_weights_file_saying(m, t, n_layers=HUGE))
    yield "generate/checkpoint-says-huge-vocab", G, lambda m, t: gen(_run_whose_checkpoint_says(m, t, vocab_size=HUGE))
    yield "export/into-a-non-empty-folder", E, lambda m, t: [
        "--checkpoint", str(m / "run"), "--out", str(shutil.copytree(m / "gpt2", t / "g"))]
    yield "export/over-an-existing-file", E, lambda m, t: [
        "--checkpoint", str(m / "run"), "--out", str(_write(t / "x.safetensors", "x"))]
    yield "export/file-under-read-only", E, lambda m, t: ["--checkpoint", str(m / "run"), "--out", str(ro(t) / "x.safetensors")]
    yield "export/folder-under-read-only", E, lambda m, t: ["--checkpoint", str(m / "run"), "--out", str(ro(t) / "g")]
    yield "export/gpt2-config-n_layer-huge", E, lambda m, t: [
        "--checkpoint", _gpt2_with(m, t, n_layer=HUGE), "--out", str(t / "out.safetensors")]
    yield "export/missing-checkpoint", E, lambda m, t: ["--checkpoint", str(t / "nothing"), "--out", str(t / "o")]


CASES = list(_cases())


@pytest.mark.parametrize("name,cli,build", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_an_error_line_exit_2_and_nothing_touched(made, tmp_path, capsys, name, cli, build):
    work = tmp_path / "work"
    work.mkdir()
    argv = build(made, work)
    before = _snapshot(work)
    capsys.readouterr()
    try:
        start = time.perf_counter()
        with memory_cap():
            code = cli.main(argv)
        seconds = time.perf_counter() - start
        out, err = capsys.readouterr()
        after = _snapshot(work)
    finally:
        _writable_again(work)
    assert code == 2, (code, err[-2000:])
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, err
    extra = err.splitlines()[1:]  # a list of every mismatch may follow the one error line
    assert all(line.startswith("  - ") for line in extra), err
    assert after == before, "the case changed files"
    assert seconds < 30, f"refused only after {seconds:.0f} s"  # before anything was built or run
    if "huge" in name or "config" in name:
        assert "config" in err and re.search(r"layer|positions|vocab|n_embd|block_size|shape", err), err


# ------------------------------------------------------------------------ Ctrl-C, --threads, export


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.parametrize("framework", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_ctrl_c_during_training_is_one_line_with_how_to_resume(tmp_path, framework):
    """SIGINT (what Ctrl-C sends) after the first checkpoint: exit 130, no traceback, one line with
    the step reached, the last checkpoint and the command that resumes; that command resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "scripts.train", "--framework", framework, "--out", str(out), "--model", "tiny",
           "--batch-size", "4", "--ckpt-every", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "latest.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.count("interrupted") == 1, err[-2000:]
    last = err.strip().splitlines()[-1].split("\r")[-1]
    match = re.fullmatch(r"interrupted at step (\d+); last checkpoint: (\S+); resume with: (.+)", last)
    assert match, last
    step, ckpt, resume = int(match[1]), match[2], match[3]
    assert os.path.exists(ckpt) and step >= int(re.search(r"step_(\d+)", ckpt)[1])
    at = json.loads((out / "latest.json").read_text())["step"]
    assert resume == f"python -m scripts.train --framework {framework} --out {out} --resume"
    again = subprocess.run([sys.executable, *resume.split()[1:], "--stop-at", str(at + 1), "--quiet"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "latest.json").read_text())["step"] == at + 1


def test_threads_sets_torch_openmp_and_xla_before_the_frameworks_start(tmp_path, monkeypatch):
    """The command (in a fresh process, so that torch starts under it) leaves torch with one thread;
    for JAX, whose XLA reads its flags when its backend starts, --threads sets them in the environment."""
    code = (
        "import os, sys\n"
        "from scripts import train as T\n"
        "assert 'torch' not in sys.modules\n"
        f"rc = T.main(['--framework', 'torch', '--out', {str(tmp_path / 'run')!r}, '--model', 'tiny', '--steps', '1',"
        " '--batch-size', '4', '--threads', '1', '--quiet', '--sample', '0'])\n"
        "import torch\n"
        "print(rc, torch.get_num_threads(), torch.get_num_interop_threads(), os.environ['OMP_NUM_THREADS'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2].split() == ["0", "1", "1", "1"]
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "")  # restored after the test
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    T.set_threads(1, "jax")
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                       "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")  # fmt: skip
    assert os.environ["OMP_NUM_THREADS"] == "1"


def test_train_then_export_as_the_readme_writes_it(made, tmp_path, capsys):
    """A run folder -> a weights file and a transformers folder, each verified; wc.load given a
    training checkpoint names the functions that read it."""
    import weight_conversion as wc
    from torch_impl.gpt import GPT

    for out in (tmp_path / "model.safetensors", tmp_path / "gpt2-tiny"):
        assert E.main(["--checkpoint", str(made / "run"), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(f"wrote {out} (") and "verified: read back bit for bit" in printed
    assert sorted(os.listdir(tmp_path / "gpt2-tiny")) == ["config.json", "model.safetensors"]
    model = GPT(T.MODELS["tiny"])
    wc.load(model, tmp_path / "model.safetensors")
    latest = json.loads((made / "run" / "latest.json").read_text())
    with pytest.raises(ValueError, match=r"is a training checkpoint .*load_checkpoint.*scripts.export"):
        wc.load(model, made / "run" / latest["checkpoint"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2-tiny")
    assert hf.config.n_layer == T.MODELS["tiny"].n_layers


@pytest.mark.parametrize("preset, family, hf_class", [("llama_tiny", "Llama", "LlamaForCausalLM"),
                                                      ("moe_tiny", "Mixtral", "MixtralForCausalLM")])  # fmt: skip
def test_export_writes_the_transformers_layout_of_the_models_family(tmp_path, capsys, preset, family, hf_class):
    """A Llama-style or MoE weights file -> a LlamaForCausalLM / MixtralForCausalLM folder, verified
    against its float64 NumPy model; transformers loads it and computes the twin's logits."""
    import numpy as np
    import torch

    import weight_conversion as wc
    from torch_impl.gpt import GPT

    torch.manual_seed(0)
    model = GPT(getattr(GPTConfig, preset)()).eval()
    wc.save(model, tmp_path / "model.safetensors")
    out = tmp_path / "hf"
    assert E.main(["--checkpoint", str(tmp_path / "model.safetensors"), "--out", str(out)]) == 0
    assert f"float64 NumPy {family} of the file" in capsys.readouterr().out
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, hf_class).from_pretrained(out).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(hf(idx).logits.numpy(), model(idx).numpy(), atol=1e-5, rtol=0)
