"""Parity report: run the twin-parity matrix on every backend present and print the results.

    python -m scripts.parity_report [--json PATH] [--dtypes float32 ...] [--heads 1 4]

Checks, for every torch device x every JAX device present (CPU always; CUDA / GPU / TPU when there):
  forward             torch block vs Flax block on the (5, 8, 128) input, weights converted in both
                      directions, every intermediate compared; float32, float64, bfloat16
  attn_fused_vs_math  fused attention against the explicit math path, within each framework
  golden              each twin alone against the committed float64 reference
  roundtrip           torch -> Flax -> torch and back through safetensors files, bit for bit
  grad                every parameter gradient (and the block's input gradient), block and small GPT
  train_step          20 AdamW steps (warmup + cosine, clipping) of a small GPT in both frameworks
  resume              10 steps in one framework, checkpoint, 10 more in the other
  sharded_*           each twin on (data, model) meshes of simulated CPU devices vs one device:
                      forward, gradients, 20 AdamW steps; sharded torch vs sharded JAX; a resume
                      from JAX on (2, 2) into torch on (1, 2) (subprocesses; --skip-sharded)
All run under matched precision (full-float32 matmuls in both frameworks). Exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from parity_tests import harness as h
from twin_common import BlockConfig
from twin_common.precision import describe as describe_precision
from twin_common.precision import matched_precision
from twin_common.tolerances import TOLERANCES
from weight_conversion.safetensors_io import write_atomic

HEAD_COUNTS = (1, 4)  # the lesson's single head, and several heads


def training_plan(dtypes):
    """Rows for gradients, 20-step AdamW trajectories and cross-framework resume (CPU, float32/64)."""
    from parity_tests import train_harness as th

    for model in ("block", "gpt"):
        for dtype in (d for d in dtypes if d in ("float32", "float64")):
            for direction in h.DIRECTIONS:
                yield (f"grad {model} {direction} {dtype}",
                       lambda m=model, d=dtype, r=direction: th.grad_check(m, d, r))
    if "float32" in dtypes:
        for direction in h.DIRECTIONS:
            yield (f"train_step 20 x AdamW {direction}", lambda r=direction: th.trajectory_check(r)[0])
        for first in ("torch", "jax"):
            yield (f"resume 10 + 10 steps from {first}", lambda f=first: th.resume_check(f))


def sharded_unavailable() -> str | None:
    """Why the sharded rows cannot run here, or None."""
    import multiprocessing

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no torch.distributed gloo backend"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "the torch workers fork their ranks, which this platform cannot"
    return None


def sharded_plan():
    """The sharded rows: one JAX worker (8 simulated devices, meshes 2x2 and 1x4, plus the resume
    checkpoint), torch workers on 1x2 (with the resume) and 2x2, and sharded torch vs sharded JAX."""
    import tempfile

    from parity_tests import sharded_harness as sh

    tmp = tempfile.TemporaryDirectory()
    init, ckpt = os.path.join(tmp.name, "init.safetensors"), os.path.join(tmp.name, "resume.safetensors")
    docs = {}

    def jax_rows():
        sh.write_init(init)
        docs["jax"] = sh.run_worker("jax", os.path.join(tmp.name, "jax"), init, "--meshes", "2x2", "1x4",
                                    "--resume-save", ckpt)  # fmt: skip
        return docs["jax"]["results"]

    def torch_rows(mesh):
        extra = ["--resume-from", ckpt] if mesh == "1x2" else []
        docs[mesh] = sh.run_worker("torch", os.path.join(tmp.name, f"torch_{mesh}"), init, "--mesh", mesh, *extra)
        return docs[mesh]["results"]

    def cross():
        rows = [sh.cross_framework(docs["2x2"], docs["jax"])]
        tmp.cleanup()
        return rows

    yield "sharded jax 2x2, 1x4 (8 simulated CPU devices)", jax_rows
    for mesh in ("1x2", "2x2"):
        yield f"sharded torch {mesh} (gloo processes)", lambda m=mesh: torch_rows(m)
    yield "sharded torch 2x2 vs jax 2x2", cross


def plan(dtypes, heads, torch_devices, jax_devices):
    """Yield (label, thunk) for every check of the matrix."""
    for n_heads in heads:
        cfg = BlockConfig.lesson(n_heads=n_heads)
        for tdev in torch_devices:
            for jname, jdev in jax_devices.items():
                for dtype in dtypes:
                    for direction in h.DIRECTIONS:
                        yield (
                            f"forward {direction} {dtype} heads={n_heads} torch:{tdev} jax:{jname}",
                            lambda c=cfg, d=dtype, r=direction, t=tdev, j=jdev: h.forward_check(c, d, r, t, j),
                        )
    cfg = BlockConfig.lesson(n_heads=max(heads))
    for dtype in dtypes:
        for tdev in torch_devices:
            yield (f"attention paths torch:{tdev} {dtype}",
                   lambda d=dtype, t=tdev: h.attention_paths_check("torch", cfg, d, t))
        for jname, jdev in jax_devices.items():
            if dtype == "float64":  # the Flax twin takes the math path for float64: nothing to compare
                continue
            yield (f"attention paths jax:{jname} {dtype}",
                   lambda d=dtype, j=jdev: h.attention_paths_check("jax", cfg, d, j))
    for dtype in (d for d in dtypes if d in ("float32", "float64")):  # golden refs are not bf16
        for n_heads in heads:
            for tdev in torch_devices:
                yield (f"golden torch:{tdev} {dtype} heads={n_heads}",
                       lambda d=dtype, n=n_heads, t=tdev: h.golden_check("torch", n, d, t))
            for jname, jdev in jax_devices.items():
                yield (f"golden jax:{jname} {dtype} heads={n_heads}",
                       lambda d=dtype, n=n_heads, j=jdev: h.golden_check("jax", n, d, j))
    for dtype in tuple(dtypes) + (("float16",) if "bfloat16" in dtypes else ()):
        for start in ("torch", "jax"):
            yield (f"roundtrip {start} {dtype}",
                   lambda d=dtype, s=start: h.roundtrip_check(cfg, d, s, via_file=True))


def metadata(torch_devices, jax_devices, elapsed: float) -> dict:
    import flax
    import jax
    import jaxlib
    import numpy
    import torch

    with matched_precision():  # what every check ran under
        precision_in_checks = describe_precision()
    meta = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": numpy.__version__,
        },
        "torch_devices": {
            d: (torch.cuda.get_device_name(0) if d == "cuda" else platform.processor() or "cpu")
            for d in torch_devices
        },
        "jax_devices": {name: str(dev.device_kind) for name, dev in jax_devices.items()},
        "precision": precision_in_checks,
        "parity_checks_run_pinned": True,
        "tolerances": {k: {"atol": t.atol, "ulps": t.ulps, "reason": t.reason} for k, t in TOLERANCES.items()},
        "input_shape": list(h.LESSON_SHAPE),
        "elapsed_s": round(elapsed, 2),
    }  # fmt: skip
    return meta


def format_table(results) -> str:
    headers = ("check", "model", "direction", "dtype", "torch", "jax", "heads", "max abs err",
               "max rel err", "tolerance", "result", "first divergence")  # fmt: skip
    rows = [
        (r.check, r.config.get("model", "block"), r.direction, r.dtype, r.torch_device or "-", r.jax_device or "-",
         str(r.config.get("n_heads", "-")), f"{r.max_abs_err:.2e}", f"{r.max_rel_err:.2e}",
         f"{r.tolerance:.1e}", "PASS" if r.passed else "FAIL", r.first_divergence or "-")
        for r in results
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--dtypes", nargs="+", default=list(h.PARITY_DTYPES),
                        choices=h.PARITY_DTYPES, help="dtypes to check (default: all)")
    parser.add_argument("--heads", nargs="+", type=int, default=list(HEAD_COUNTS),
                        help="head counts at d_model 128 (default: 1 4)")
    parser.add_argument("--skip-training", action="store_true",
                        help="forward, attention, golden and roundtrip checks only (under 30 s)")
    parser.add_argument("--skip-sharded", action="store_true",
                        help="leave out the sharded rows (subprocesses with simulated devices, ~1-3 min)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    bad_heads = [n for n in args.heads if n < 1 or 128 % n]
    if bad_heads:
        parser.error(f"--heads must divide d_model=128; got {bad_heads}")

    start = time.perf_counter()
    torch_devices, jax_devices = h.torch_devices(), h.jax_devices()
    checks = list(plan(args.dtypes, args.heads, torch_devices, jax_devices))
    if not args.skip_training:
        checks += list(training_plan(args.dtypes))
    skipped_sharded = "--skip-sharded" if args.skip_sharded or args.skip_training else sharded_unavailable()
    if skipped_sharded is None and "float32" in args.dtypes:
        checks += list(sharded_plan())
    elif not args.quiet:
        print(f"sharded rows skipped: {skipped_sharded or 'float32 not among --dtypes'}", file=sys.stderr)
    if not args.quiet:
        print(f"running {len(checks)} checks; torch devices {torch_devices}, "
              f"jax devices {list(jax_devices)}", file=sys.stderr)  # fmt: skip
    results = []
    for i, (label, run) in enumerate(checks, 1):
        result = run()
        group = result if isinstance(result, list) else [result]  # a sharded worker returns several
        results.extend(group)
        if not args.quiet:
            verdict = "ok" if all(r.passed for r in group) else "FAIL"
            print(f"[{i:3d}/{len(checks)}] {verdict:4s} {label}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start

    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed in {elapsed:.1f} s "
          f"(matmul precision pinned to 'highest' in both frameworks)")  # fmt: skip
    if args.json:
        doc = {"meta": metadata(torch_devices, jax_devices, elapsed),
               "results": [r.to_json() for r in results]}  # fmt: skip
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        write_atomic(args.json, json.dumps(doc, indent=2).encode())
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
