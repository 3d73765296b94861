"""Checkpoint I/O benchmark at GPT-2-124M's shape: conversion, save + load, hashing, peak memory.

    python -m scripts.bench_io                 # GPT-2 124M shape (vocab 50257), float32
    python -m scripts.bench_io --model small   # a quick run

Speed, as ratios measured in one process with the operations interleaved (so load on the machine
hits them alike), medians of --repeats rounds:
  - torch_to_flax against a plain np.copy of every array (target <= 2x), and its validation alone;
  - wc.save + wc.load (atomic write with fsync, content hash, every check) against
    safetensors.torch.save_file + load_file + load_state_dict (target <= 1.2x);
  - the content hash candidates (xxh3-128, blake2b, sha256) over the same bytes.
Memory: each operation runs in a fresh subprocess; extra peak = peak resident memory during the
operation (VmHWM, reset through /proc/self/clear_refs) minus resident memory just before it,
as a multiple of the model's parameter bytes (target <= 1.1x for save and for load).
Figures print, nothing is asserted: speed targets live here, not in the tests.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from twin_common import GPTConfig
from twin_common.presets import presets

MODELS = presets("gpt2", "small")  # gpt2: GPT-2 124M (the I/O figures depend on its shapes only)
TARGETS = {"conversion": 2.0, "save_load": 1.2, "memory": 1.1}


def torch_model(cfg: GPTConfig):
    import torch

    from torch_impl.gpt import GPT

    torch.manual_seed(0)
    return GPT(cfg)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(op: str, model: str, path: str) -> None:
    """Subprocess body: one operation, its extra peak resident memory printed as JSON."""
    import safetensors.torch

    import weight_conversion as wc

    m = torch_model(MODELS[model])
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _status("VmRSS")
    if op == "save":
        wc.save(m, path)
    elif op == "load":
        wc.load(m, path)
    elif op == "st_save":
        safetensors.torch.save_file(m.state_dict(), path)
    elif op == "st_load":
        m.load_state_dict(safetensors.torch.load_file(path))
    print(json.dumps({"extra": _status("VmHWM") - before, "model_bytes": nbytes}))


def _memory(op: str, model: str, path: str) -> float:
    out = subprocess.run([sys.executable, "-m", f"{__package__}.bench_io", "--measure-memory", op, "--model", model,
                          "--path", path], capture_output=True, text=True, check=True)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["extra"] / result["model_bytes"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--measure-memory", choices=["save", "load", "st_save", "st_load"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_memory:
        measure_memory(args.measure_memory, args.model, args.path)
        return 0

    import safetensors.torch
    import xxhash
    from flax import nnx

    import weight_conversion as wc
    from jax_impl.gpt import GPT as FlaxGPT
    from twin_common.params import table_for
    from weight_conversion.validate import find_problems

    cfg = MODELS[args.model]
    tm = torch_model(cfg)
    fm = FlaxGPT(cfg, rngs=nnx.Rngs(0))
    arrays = wc.export(tm)
    nbytes = sum(a.nbytes for a in arrays.values())
    folder = tempfile.mkdtemp(prefix="bench_io_", dir=os.environ.get("BENCH_IO_DIR"))
    ours, theirs = os.path.join(folder, "ours.safetensors"), os.path.join(folder, "theirs.safetensors")
    table = table_for(cfg)

    def st_save():
        safetensors.torch.save_file(tm.state_dict(), theirs)

    def st_load():
        tm.load_state_dict(safetensors.torch.load_file(theirs))

    ops = {
        "np.copy of every array": lambda: {k: np.copy(v) for k, v in arrays.items()},
        "torch_to_flax": lambda: wc.torch_to_flax(tm, fm),
        "validation alone": lambda: find_problems(arrays, table, "float32"),
        "xxh3_128": lambda: [xxhash.xxh3_128(memoryview(v.reshape(-1).view(np.uint8))).digest() for v in arrays.values()],
        "blake2b": lambda: [hashlib.blake2b(memoryview(v.reshape(-1).view(np.uint8))).digest() for v in arrays.values()],
        "sha256": lambda: [hashlib.sha256(memoryview(v.reshape(-1).view(np.uint8))).digest() for v in arrays.values()],
        "wc.save": lambda: wc.save(tm, ours),
        "wc.load": lambda: wc.load(tm, ours),
        "safetensors.torch save": st_save,
        "safetensors.torch load + load_state_dict": st_load,
    }
    times: dict[str, list[float]] = {name: [] for name in ops}
    for name, op in ops.items():  # warm-up: first-call costs (imports, JAX's first device_put)
        op()
    for _ in range(args.repeats):
        for name, op in ops.items():
            gc.collect()
            start = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}

    import jax
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; torch {torch.__version__}, "
          f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"model: {args.model} {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}; "
          f"{nbytes / 1e6:.0f} MB of float32 parameters; {args.repeats} interleaved rounds, medians")
    for name, t in med.items():
        print(f"  {name:42s} {t * 1e3:9.1f} ms   ({nbytes / t / 1e9:5.2f} GB/s)")
    conversion = med["torch_to_flax"] / med["np.copy of every array"]
    validation = med["validation alone"] / med["np.copy of every array"]
    ours_sl = med["wc.save"] + med["wc.load"]
    theirs_sl = med["safetensors.torch save"] + med["safetensors.torch load + load_state_dict"]
    print(f"torch_to_flax / np.copy: {conversion:.2f}x (target <= {TARGETS['conversion']}x); "
          f"validation alone {validation:.2f}x")
    print(f"save + load / safetensors.torch: {ours_sl / theirs_sl:.2f}x (target <= {TARGETS['save_load']}x); "
          f"save {med['wc.save'] / med['safetensors.torch save']:.2f}x, "
          f"load {med['wc.load'] / med['safetensors.torch load + load_state_dict']:.2f}x")
    print(f"content hash xxh3-128: {med['xxh3_128'] / ours_sl * 100:.1f}% of save + load "
          f"(sha256 would be {med['sha256'] / med['xxh3_128']:.0f}x slower, blake2b "
          f"{med['blake2b'] / med['xxh3_128']:.0f}x)")
    mem = {op: _memory(op, args.model, ours if op in ("save", "load") else theirs)
           for op in ("save", "load", "st_save", "st_load")}  # fmt: skip
    print(f"extra peak memory, x model size (target <= {TARGETS['memory']}x): wc.save {mem['save']:.2f}x, "
          f"wc.load {mem['load']:.2f}x; safetensors.torch save {mem['st_save']:.2f}x, "
          f"load + load_state_dict {mem['st_load']:.2f}x")
    for path in (ours, theirs):
        os.unlink(path)
    os.rmdir(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
