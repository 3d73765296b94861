"""The parity report as a user meets it: on a machine without torch, with a check that raises, and
with a failure that only an intermediate shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from twin_parity.testing import HAVE_JAX, HAVE_TORCH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sys.modules["torch"] = None makes every "import torch" raise ImportError, as on a TPU VM.
NO_TORCH = 'import sys\nsys.modules["torch"] = None\n'


def _without_torch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO])}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not HAVE_JAX, reason="jax/flax are not installed")
def test_report_runs_the_flax_checks_without_torch(tmp_path):
    out = tmp_path / "report.json"
    proc = _without_torch(tmp_path, "-m", "scripts.parity_report", "--quiet", "--skip-training",
                          "--dtypes", "float64", "--heads", "4", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["meta"]["versions"]["torch"] is None and "torch" in doc["meta"]["missing_frameworks"]
    ran = {(r["check"], r["direction"]) for r in doc["results"]}
    assert ran == {("golden", "golden->jax"), ("defaults", "golden->jax (current default config)"),
                   ("kv_cache", "jax: cached vs uncached")}  # fmt: skip
    skipped = {s["check"] for s in doc["skipped"]}
    # the torch twin's golden, defaults and kv_cache rows (the GPT's and the Llama preset's), every
    # row that needs both twins (the Llama block's two float64 forward rows and MoE routing too),
    # and the float64 transformers rows (transformers' model is torch); hf_llama rows are float32
    # only, so none are planned here; the Llama preset's JAX kv_cache row runs
    assert skipped == {"forward", "attn_fused_vs_math", "golden", "defaults", "roundtrip", "kv_cache", "hf_gpt2",
                       "routing"}  # fmt: skip
    assert all("torch is not installed" in s["reason"] for s in doc["skipped"])
    assert "4 passed, 0 failed, 19 skipped" in proc.stdout and "torch is not installed" in proc.stdout
    assert sorted(r["config"]["model"] for r in doc["results"] if r["check"] == "kv_cache") == ["gpt", "llama"]


@pytest.mark.skipif(not HAVE_JAX, reason="jax/flax are not installed")
def test_benchmark_runs_jax_without_torch(tmp_path):
    proc = _without_torch(tmp_path, "-m", "scripts.bench_train", "--steps", "1", "--warmup", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped torch-eager, torch-compile: torch is not installed" in proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:]]
    assert rows == ["jax-jit"]


needs_both = pytest.mark.skipif(not (HAVE_TORCH and HAVE_JAX), reason="needs both frameworks")


@needs_both
def test_a_raising_check_is_a_failed_row_and_the_rest_still_runs(monkeypatch, tmp_path, capsys):
    from twin_parity import harness as h
    from scripts import parity_report
    from weight_conversion import ConversionError

    real = h.forward_check

    def raising(cfg, dtype, direction, *args, **kwargs):
        # the lesson block's row only: the Llama and MoE rows go through forward_check too
        if direction == "jax->torch" and cfg.mlp == "gelu":
            raise ConversionError(["attn.q_proj.weight: shape (4, 4), expected (128, 128)"])
        return real(cfg, dtype, direction, *args, **kwargs)

    monkeypatch.setattr(h, "forward_check", raising)
    out = tmp_path / "report.json"
    code = parity_report.main(["--quiet", "--skip-training", "--dtypes", "float64", "--heads", "4", "--json", str(out)])
    assert code == 1
    results = json.loads(out.read_text())["results"]
    errors = [r for r in results if r["error"]]
    assert len(errors) == 1 and not errors[0]["passed"] and errors[0]["check"] == "forward"
    assert "ConversionError" in errors[0]["error"] and "attn.q_proj.weight" in errors[0]["error"]
    assert sum(r["passed"] for r in results) == len(results) - 1  # golden, attention, roundtrip rows ran
    table = capsys.readouterr().out
    assert "error: ConversionError" in table and "attn.q_proj.weight" in table


@needs_both
def test_table_names_the_failing_intermediate_when_the_output_is_within_tolerance(monkeypatch, capsys):
    """nnx's own LayerNorm eps: the output is off by ~3e-6 (under 1e-5), ln_1 by more than 1e-5. The
    row's max abs err column (the output's) is under its tolerance; the last column must say why it
    fails anyway: which sublayer, its error and its bound."""
    import jax_impl.block as jb
    from twin_parity.pitfalls import flax_layer_norm
    from scripts import parity_report

    monkeypatch.setattr(jb, "layer_norm", flax_layer_norm(epsilon=1e-6))
    assert parity_report.main(["--quiet", "--skip-training", "--dtypes", "float32", "--heads", "4"]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["forward", "block"]]
    assert rows
    for row in rows:
        cells = row.split()
        out_err, tolerance = float(cells[7]), float(cells[9])
        assert out_err <= tolerance and cells[10] == "FAIL"
        err, bound = float(cells[12]), float(cells[14])
        assert cells[11] == "ln_1:" and err > bound == tolerance, row


@needs_both
def test_a_crashed_worker_shows_its_cause_and_the_row_that_depends_on_it_says_so(monkeypatch, tmp_path, capsys):
    """The torch 2x2 worker dies on a plan error: its row shows the error's last line (the cause,
    not the traceback's first), and the torch-vs-JAX row, which compares its results, names it."""
    from twin_parity import sharded_harness as sh
    from scripts import parity_report

    cause = "ValueError: blocks.0.attn.v_proj.bias: the table says OUT, RowwiseParallel does REPLICATED"
    stderr = f"Traceback (most recent call last):\n  File \"sharding.py\", line 1, in plan\n    raise ValueError\n{cause}\n"
    real = sh.run_worker

    def run_worker(framework, out, init, *args, **kwargs):
        if framework == "torch" and "2x2" in args:  # the real launcher, on a process that failed
            monkeypatch.setattr(sh.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
            return real(framework, out, init, *args, **kwargs)
        return {"results": [], "runs": {}}

    monkeypatch.setattr(sh, "run_worker", run_worker)
    monkeypatch.setattr(sh, "write_init", lambda path: None)
    # the MoE and Llama sharded rows start their own workers (sharded_rows), not sh.run_worker: not this test's
    monkeypatch.setattr(parity_report, "moe_sharded_plan", lambda: iter(()))
    monkeypatch.setattr(parity_report, "llama_sharded_plan", lambda: iter(()))
    assert parity_report.main(["--quiet", "--only", "sharded", "--dtypes", "float32"]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sharded")]
    assert len(rows) == 2, rows
    assert rows[0].endswith(f"error: RuntimeError: torch worker failed (exit 1): ... {cause}"), rows[0]
    assert "KeyError" not in rows[1]
    assert rows[1].endswith("error: DependencyFailed: not run: it compares the results of sharded torch 2x2, "
                            "which failed above"), rows[1]  # fmt: skip


def test_skip_training_help_names_the_checks_it_leaves_out_and_those_it_runs(capsys):
    """The help is built from TRAINING_CHECKS; the plans must agree with it, check by check."""
    from scripts import parity_report as pr

    with pytest.raises(SystemExit):
        pr.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    left_out, still_run = help_text.split("--skip-training", 1)[1].split("still run", 1)[0].split(";", 1)
    dtypes = ["float32", "float64", "bfloat16"]
    training = {p.check for p in pr.training_plan(dtypes)}
    others = {p.check for p in pr.plan(dtypes, [4], ["cpu"], {"cpu": None})} | {p.check for p in pr.hf_plan(dtypes)}
    others |= {p.check for p in pr.llama_plan(dtypes, skip_training=True)}
    assert "hf_llama" in others
    # --skip-training leaves out the Llama rows that train and keeps the rest (its kv_cache rows too)
    assert {p.check for p in pr.llama_plan(dtypes, skip_training=False)} - others == {"grad", "train_step", "resume",
                                                                                       "generate"}  # fmt: skip
    assert "kv_cache" in {p.check for p in pr.llama_plan(dtypes, skip_training=True)}
    assert training == set(pr.TRAINING_CHECKS)
    assert all(name in left_out for name in training) and "sharded" in left_out
    assert all(name in still_run for name in others), (others, still_run)
    assert not any(name in still_run for name in training)


@needs_both
def test_the_moe_sharded_rows_are_announced_as_the_harness_makes_them():
    """Each MoE sharded check announces the rows its harness returns (the harness tests check each
    run's row count against the same numbers): two per model-axis mesh and four per expert mesh, in
    both engines (JAX: one worker for the model-axis meshes, one for the expert meshes)."""
    from scripts import parity_report as pr
    from twin_parity import moe_harness as mh

    planned = list(pr.moe_sharded_plan())
    expert = [p for p in planned if "expert=" in p.label]
    assert [p.rows for p in planned if p not in expert and "jax" not in p.label] == [2, 2]
    assert [p.rows for p in expert if "torch" in p.label] == [mh.ROWS_PER_EXPERT_MESH] * len(mh.TORCH_EXPERT_MESHES)
    assert [p.rows for p in planned if p not in expert and "jax" in p.label] == [2 * len(mh.SHARDED_MESHES)]
    assert [p.rows for p in expert if "jax" in p.label] == [mh.ROWS_PER_EXPERT_MESH * len(mh.JAX_EXPERT_MESHES)]
    assert mh.ROWS_PER_EXPERT_MESH == 4 and len(mh.TORCH_EXPERT_MESHES) == 2 and sum(p.rows for p in planned) == 20


@pytest.mark.skipif(not (HAVE_JAX and HAVE_TORCH), reason="needs both frameworks")
def test_training_generate_and_kv_cache_rows_run_on_every_device_pair(monkeypatch):
    """On a machine with a CUDA device and a JAX GPU (stand-ins here: the plan only names devices),
    the train_step, resume, generate and kv_cache rows are planned for every torch device x JAX
    device, and each row's check is called with its own devices (the CPU's JAX device as None)."""
    from scripts import parity_report as R
    from twin_parity import generate_harness as gh
    from twin_parity import train_harness as th

    gpu = object()
    calls = []

    def recorder(name):
        return lambda *args, **kwargs: calls.append((name, args, kwargs))

    for module, name in ((th, "resume_check"), (gh, "generate_check"), (gh, "kv_cache_check")):
        monkeypatch.setattr(module, name, recorder(name))
    # the plan takes trajectory_check's first result
    monkeypatch.setattr(th, "trajectory_check", lambda *a, **kw: [calls.append(("trajectory_check", a, kw))])
    torch_devices, jax_devices = ["cpu", "cuda"], {"cpu": None, "gpu": gpu}
    planned = list(R.training_plan(["float32"], torch_devices, jax_devices))
    planned += [p for p in R.plan(["float32"], [4], torch_devices, jax_devices) if p.check == "kv_cache"]
    for p in planned:
        if p.check != "grad":
            p.run()
    pairs = {(t, j) for t in ("cpu", "cuda") for j in (None, gpu)}
    for name in ("trajectory_check", "resume_check", "generate_check"):
        seen = {(kw["torch_device"], kw["jax_device"]) for n, _, kw in calls if n == name}
        assert seen == pairs, (name, seen)
    kv = {(a[0], kw["device"]) for n, a, kw in calls if n == "kv_cache_check"}
    assert kv == {("torch", None), ("torch", "cuda"), ("jax", None), ("jax", gpu)}, kv
