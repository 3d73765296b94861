"""The benchmark's per-op profiles name real ops with their share of the step (no timings asserted:
speed targets live in scripts/bench_train.py, which prints figures)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import jax
import jax.numpy as jnp
import numpy as np
import torch

from scripts import bench_train
from scripts.profile_ops import by_kind, hlo_op_names, profile_jax, profile_torch


def test_jax_profile_names_the_thunks_of_a_matmul_and_its_backward():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 64)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 32)), jnp.float32)
    grad = jax.jit(jax.grad(lambda w: jnp.tanh(x @ w).sum()))
    grad(w).block_until_ready()
    hlo = grad.lower(w).compile().as_text()
    names = hlo_op_names(hlo)
    assert any(v.endswith("dot_general") for v in names.values()), names
    out = []
    prof = profile_jax(lambda: out.append(grad(w)), lambda: out[-1].block_until_ready(), hlo, steps=3)
    assert prof.rows and prof.ops_ms_per_step > 0 and prof.wall_ms_per_step > 0
    assert abs(sum(r.share for r in prof.rows) - 1.0) < 1e-6
    assert any(r.what for r in prof.rows)  # thunks matched to the HLO's primitives
    assert any("matmul" in kind for kind, _, _ in by_kind(prof))
    assert "ms/step" in prof.table(5)


def test_torch_profile_lists_aten_ops():
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(256, 64)

    def step():
        w.grad = None
        torch.tanh(x @ w).sum().backward()

    prof = profile_torch(step, lambda: None, steps=3)
    assert any(r.name == "aten::mm" for r in prof.rows)
    assert abs(sum(r.share for r in prof.rows) - 1.0) < 1e-6


def test_bench_interleaves_modes_and_prints_ratios(capsys):
    assert bench_train.main(["--modes", "torch-eager", "jax-jit", "--steps", "2", "--warmup", "1", "--profile", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "torch-eager" in out and "jax-jit" in out and "1.00x" in out
    assert "aten::" in out and "by kind:" in out


def test_sharded_bench_counts_the_collectives_megatron_predicts():
    """`bench_train --mesh data=2,model=2` on 4 simulated devices (a subprocess: the device count is
    fixed before JAX starts): the small GPT (2 blocks) all-reduces 8 times over `model` per step,
    2 per block forward and 2 backward, as the analytic row says; no all-gather appears."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench_train", "--mesh", "data=2,model=2", "--cpu-devices", "4",
         "--steps", "1", "--warmup", "1"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("  ")[0].strip(): line.split() for line in proc.stdout.splitlines() if "  " in line}
    assert rows["all-reduce over model"][-2] == "8", proc.stdout
    assert rows["analytic: model axis, 4 per block x (B/data)*T*C"][-2] == "8", proc.stdout
    assert not any(k.startswith("all-gather") for k in rows), proc.stdout


def test_the_gpu_check_fits_in_eight_minutes_and_measures_both_levers(tmp_path):
    """scripts/gpu_check.sh as the GPU run would go (not the smoke settings), with `timeout` replaced
    by a stand-in that records its arguments instead of running the stage: the stages' limits plus
    each one's grace before the kill add up to at most 480 s, the train bench measures the chunked
    loss and the decode bench the Flax device loop."""
    import os
    import stat
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "timeout"
    fake.write_text('#!/bin/sh\nprintf "%s " "$@" | tr "\\n" " " >> "$OUT/calls.txt"\necho >> "$OUT/calls.txt"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path), "GPU_CHECK_SMOKE": "0"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    total = 0
    for call in calls:
        grace, limit = call.split()[:2]
        assert grace.startswith("--kill-after="), call
        total += int(limit) + int(grace.split("=")[1])
    assert total <= 480, f"{len(calls)} stages: {total} s with the grace periods"
    assert any("scripts.bench_train" in c and "--loss-chunk 4096" in c for c in calls), calls
    assert any("scripts.bench_generate" in c and "--loop host device" in c for c in calls), calls
    assert len((tmp_path / "summary.txt").read_text().splitlines()) == len(calls)
