"""Training-step benchmark for both twins: ms/step, tokens/s and FLOP/s (nanoGPT's formula).

    python -m scripts.bench_train                       # small model; CPU, or GPU when present
    python -m scripts.bench_train --model gpt2 --bf16   # GPT-2 124M shape, 16 x 1024 tokens
    python -m scripts.bench_train --mesh data=2,model=2 --cpu-devices 8   # JAX sharded, + collectives

Each mode is warmed up (compilation excluded), then timed over --steps steps with the device
synchronised around every step; the median is reported. Figures print, nothing is asserted: speed
targets live here, not in the tests.
FLOPs per token = 6 N + 12 L H Q T (N parameters without the position embedding, L layers,
H heads, Q head size, T sequence length), as nanoGPT's estimate_mfu counts them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch too

import numpy as np  # noqa: E402

from parity_tests.harness import framework_missing  # noqa: E402
from twin_common import GPTConfig  # noqa: E402
from twin_common.train_config import TrainConfig  # noqa: E402

MODELS = {
    "small": (GPTConfig(vocab_size=256, block_size=64, n_layers=2, d_model=128, n_heads=4), 16),
    "gpt2": (GPTConfig.nanogpt_124m_padded(), 16),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def flops_per_token(cfg: GPTConfig, seq_len: int, n_params: int) -> float:
    n = n_params - cfg.block_size * cfg.d_model  # without wpe, as nanoGPT counts
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq_len


def time_steps(step, sync, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def bench_torch(cfg, tcfg, batches, compile_: bool, bf16: bool, warmup: int, steps: int, device: str):
    import torch

    from torch_impl.gpt import GPT
    from torch_impl.train import Trainer

    torch.manual_seed(0)
    trainer = Trainer(GPT(cfg).to(device), tcfg, compile=compile_, bf16=bf16)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    it = iter(range(10**9))

    def step():
        trainer.step(*batches[next(it) % len(batches)])

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return time_steps(step, sync, warmup, steps), n_params


def bench_jax(cfg, tcfg, batches, bf16: bool, warmup: int, steps: int):
    import jax
    from flax import nnx

    from jax_impl.gpt import GPT
    from jax_impl.train import Trainer

    trainer = Trainer(GPT(cfg, rngs=nnx.Rngs(0)), tcfg, bf16=bf16)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainer.params))
    it = iter(range(10**9))
    last = []

    def step():
        last[:] = [trainer.step(*batches[next(it) % len(batches)])[0]]

    times = time_steps(step, lambda: last and jax.block_until_ready(last[0]), warmup, steps)
    return times, n_params


def bench_jax_sharded(cfg, tcfg, batches, mesh_text: str, bf16: bool, warmup: int, steps: int):
    """JAX ShardedTrainer on --mesh: step times, and the collectives of the compiled step."""
    import jax
    from flax import nnx

    from jax_impl import sharding as S
    from jax_impl.gpt import GPT
    from twin_common.mesh import parse_mesh

    shape = parse_mesh(mesh_text)
    mesh = S.init_distributed(shape, cfg, batch_size=tcfg.batch_size)
    trainer = S.ShardedTrainer(GPT(cfg, rngs=nnx.Rngs(0)), tcfg, mesh, bf16=bf16)
    x, y = batches[0]
    hlo = trainer._train_step.lower(trainer.params, trainer.opt_state, trainer.rest, trainer._batch(x),
                                    trainer._batch(y)).compile().as_text()  # fmt: skip
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainer.params))
    it = iter(range(10**9))
    last = []

    def step():
        last[:] = [trainer.step(*batches[next(it) % len(batches)])[0]]

    times = time_steps(step, lambda: last and jax.block_until_ready(last[0]), warmup, steps)
    return times, n_params, collective_bytes(hlo, mesh, cfg, tcfg, shape)


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}


def collective_bytes(hlo: str, mesh, cfg, tcfg, shape) -> list[tuple[str, str, str]]:
    """Bytes each device sends into all-reduces per step, by mesh axis, from the compiled HLO, next
    to Megatron's count: per block 2 all-reduces of (B / data) * T * C activations forward and 2
    backward over "model"; over "data", one all-reduce of the (local) gradients."""
    import re

    from parity_tests.sharded_harness import _replica_groups, model_axis_groups
    from weight_conversion.table import table_for

    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    model_groups, data_groups = model_axis_groups(ids), model_axis_groups(ids.T)
    every = [sorted(int(i) for i in ids.flat)]
    measured: dict[str, int] = {}
    counts: dict[str, int] = {}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(", line)
        if not m or "-done(" in line:
            continue
        payload = sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                      for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))  # fmt: skip
        g = re.search(r"replica_groups=(\{(?:\{[\d,\s]*\},?)*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", line)
        groups = sorted(map(sorted, _replica_groups(g.group(1)))) if g else every
        groups = groups or every
        axis = ("model" if groups == model_groups else "data" if groups == data_groups
                else "both" if groups == every else "other")  # fmt: skip
        key = f"{m.group(2)} over {axis}"
        measured[key] = measured.get(key, 0) + payload
        counts[key] = counts.get(key, 0) + 1
    B, T, C = tcfg.batch_size // shape.data, tcfg.seq_len, cfg.d_model
    act = 4 * B * T * C  # float32 bytes of one (B / data, T, C) activation
    grads = sum(4 * int(np.prod(s.flax_shape)) // (shape.model if s.split.flax_dim(s) is not None else 1)
                for s in table_for(cfg))  # fmt: skip
    analytic = {"model": 4 * cfg.n_layers * act if shape.model > 1 else 0, "data": grads if shape.data > 1 else 0}
    rows = [(k, f"{counts[k]}", f"{v:,}") for k, v in sorted(measured.items())]
    rows.append(("analytic: model axis, 4 per block x (B/data)*T*C", f"{4 * cfg.n_layers if shape.model > 1 else 0}",
                 f"{analytic['model']:,}"))  # fmt: skip
    rows.append(("analytic: data axis, the local gradients", "-", f"{analytic['data']:,}"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--batch-size", type=int, help="default: 16")
    p.add_argument("--seq-len", type=int, help="default: the model's block_size")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    p.add_argument("--modes", nargs="+", default=["torch-eager", "torch-compile", "jax-jit"],
                   choices=["torch-eager", "torch-compile", "jax-jit"])
    p.add_argument("--mesh", metavar="data=D,model=M",
                   help="JAX only: the sharded trainer over this mesh, with the collectives of its step")
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help="simulate N CPU devices for JAX (XLA_FLAGS, set before JAX starts)")
    p.add_argument("--jax-attention", choices=["xla", "cudnn"],
                   help="force jax.nn.dot_product_attention's implementation (default: JAX chooses)")
    args = p.parse_args(argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.cpu_devices}"
    if args.mesh:
        args.modes = ["jax-sharded"]

    # A machine may have one framework only (a TPU VM has no torch): run the modes it can.
    missing = {name: reason for name in ("torch", "jax") if (reason := framework_missing(name))}
    modes = [m for m in args.modes if m.split("-")[0] not in missing]
    for name, reason in missing.items():
        skipped = [m for m in args.modes if m.startswith(name)]
        if skipped:
            print(f"skipped {', '.join(skipped)}: {reason}", file=sys.stderr)
    if not modes:
        print("nothing to run: " + "; ".join(missing.values()), file=sys.stderr)
        return 1
    torch = None if "torch" in missing else importlib.import_module("torch")
    jax = None if "jax" in missing else importlib.import_module("jax")
    if jax is not None:
        import jax_impl.block

        jax_impl.block.ATTENTION_IMPLEMENTATION = args.jax_attention
    cfg, default_batch = MODELS[args.model]
    batch = args.batch_size or default_batch
    seq = args.seq_len or cfg.block_size
    tcfg = TrainConfig(steps=args.warmup + args.steps + 1, batch_size=batch, seq_len=seq, warmup_steps=1)
    rng = np.random.default_rng(0)
    batches = [tuple(rng.integers(0, cfg.vocab_size, (2, batch, seq)).astype(np.int64)) for _ in range(4)]
    device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    print(f"model {args.model} ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
          f"vocab {cfg.vocab_size}), batch {batch} x {seq}, {'bf16' if args.bf16 else 'float32'}; "
          f"torch {torch.__version__ + ' on ' + (gpu or 'cpu') if torch else '-'}, "
          f"jax {jax.__version__ + ' on ' + jax.devices()[0].platform if jax else '-'} "
          f"(attention: {args.jax_attention or 'JAX chooses'})",
          file=sys.stderr)  # fmt: skip
    rows, comm = [], None
    for mode in modes:
        print(f"  {mode}: warming up and timing ...", file=sys.stderr, flush=True)
        if mode.startswith("torch"):
            times, n = bench_torch(cfg, tcfg, batches, mode == "torch-compile", args.bf16, args.warmup, args.steps, device)
            gc.collect()  # the trainer is gone: give its GPU memory back before the next mode
            if device == "cuda":
                torch.cuda.empty_cache()
        elif mode == "jax-sharded":
            times, n, comm = bench_jax_sharded(cfg, tcfg, batches, args.mesh, args.bf16, args.warmup, args.steps)
            mode = f"jax-jit, mesh {args.mesh}"
        else:
            times, n = bench_jax(cfg, tcfg, batches, args.bf16, args.warmup, args.steps)
        ms = statistics.median(times) * 1e3
        tokens = batch * seq / (ms / 1e3)
        tflops = tokens * flops_per_token(cfg, seq, n) / 1e12
        rows.append((mode, f"{ms:.2f}", f"{tokens:,.0f}", f"{tflops:.3f}",
                     f"{100 * tflops / peak:.1f}%" if peak else "-", f"{n / 1e6:.2f}M"))  # fmt: skip
    headers = ("mode", "ms/step (median)", "tokens/s", "TFLOP/s", "MFU", "params")
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    for line in (headers, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    if comm:
        print("\ncollectives per training step, per device (from the compiled program):")
        headers = ("collective", "count", "bytes")
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *comm)]
        for line in (headers, ["-" * w for w in widths], *comm):
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
        if jax.devices()[0].platform == "cpu":
            print("(simulated CPU devices share this machine's cores: the ms/step above says nothing about "
                  "sharded speed; the collective bytes are what a real mesh would move)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
