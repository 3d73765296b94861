"""Training-step benchmark for both twins: ms/step, tokens/s and FLOP/s (nanoGPT's formula).

    python -m scripts.bench_train                       # small model; CPU, or GPU when present
    python -m scripts.bench_train --model wide          # 4 layers x 256: a second shape
    python -m scripts.bench_train --profile             # and the top ops of each framework's step
    python -m scripts.bench_train --threads 1           # both frameworks on one core
    python -m scripts.bench_train --model gpt2-padded --bf16   # GPT-2 124M shape, 16 x 1024 tokens
    python -m scripts.bench_train --model smollm2-135m --bf16  # SmolLM2-135M's shape, 2 x 8192 tokens
    python -m scripts.bench_train --model gpt2-padded --bf16 --attention cudnn library   # each attention kernel
    python -m scripts.bench_train --model gpt2-padded --bf16 --loss-chunk 0 2048   # the loss whole and chunked
    python -m scripts.bench_train --mesh data=2,model=2 --cpu-devices 8   # JAX sharded, + collectives

Every mode is built and warmed up first (compilation excluded), then the modes take turns, one
step each, for --steps rounds, so that load from other processes falls on all of them alike; the
device is synchronised around every step. The table gives the median wall time and the median
process CPU time per step (summed over the process's threads; on a loaded machine it is the
steadier of the two) and each as a ratio to torch eager. Figures print, nothing is asserted:
speed targets live here, not in the tests.
FLOPs per token = 6 N + 12 L H Q T (N parameters without the position embedding, L layers,
H heads, Q head size, T sequence length), as nanoGPT's estimate_mfu counts them. MFU divides the
achieved FLOP/s by the GPU's dense bf16 tensor-core peak (989 TF/s for an H100 or H200 SXM, 312 for
an A100: NVIDIA's datasheets, without sparsity), whatever the dtype the step runs in.
--attention: the fused attention's kernel on a GPU in bf16 (the config's attn_kernel): "cudnn"
(cuDNN first, the default) or "library" (torch SDPA's own choice, XLA's in JAX); several values
give one mode per kernel. It changes nothing on CPU.
--loss-chunk: the cross-entropy over that many positions at a time (the (B, T, V) float32 logits
never exist at once; 0, the default: all at once); several values give one mode per value. The
"memory" column: JAX, the compiled step's temporary buffers (XLA's memory_analysis; the
parameters, optimizer state and batch come on top); torch on CUDA, the peak allocated during its
timed steps, everything included; torch on CPU has no allocator statistics ("-").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import os
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch too

import numpy as np  # noqa: E402

from twin_parity.harness import framework_missing  # noqa: E402
from twin_common import GPTConfig  # noqa: E402
from twin_common.presets import presets  # noqa: E402
from twin_common.train_config import TrainConfig  # noqa: E402

MODELS = {name: (cfg, 16) for name, cfg in presets("small", "wide", "gpt2-padded", "llama-tiny").items()}  # (config, batch)
MODELS["mixtral-small"] = (presets("mixtral-small")["mixtral-small"], 4)
MODELS["smollm2-135m"] = (presets("smollm2-135m")["smollm2-135m"], 2)  # 2 x 8192 tokens a step
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def flops_per_token(cfg: GPTConfig, seq_len: int, n_params: int) -> float:
    # without wpe, as nanoGPT counts (a rotary model has none to leave out)
    n = n_params - (cfg.block_size * cfg.d_model if cfg.pos == "learned" else 0)
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.d_head * seq_len


@dataclasses.dataclass
class Mode:
    name: str
    step: Callable[[], None]  # one training step on the next batch
    sync: Callable[[], None]  # wait for the device
    n_params: int
    profile: Callable[[int], object]  # steps -> scripts.profile_ops.Profile
    memory: Callable[[], int | None] = lambda: None  # bytes (see --loss-chunk in the docstring)
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)


def torch_mode(name, cfg, tcfg, batches, compile_: bool, bf16: bool, device: str, loss_chunk: int = 0) -> Mode:
    import torch

    from .profile_ops import profile_torch
    from torch_impl.gpt import GPT
    from torch_impl.train import Trainer

    torch.manual_seed(0)
    trainer = Trainer(GPT(cfg).to(device), tcfg, compile=compile_, bf16=bf16, loss_chunk=loss_chunk)
    it = itertools.count()
    cuda = device == "cuda"
    peak = [None]

    def step():
        if cuda:  # the allocator records at allocation time: no sync needed to read the peak
            torch.cuda.reset_peak_memory_stats()
        trainer.step(*batches[next(it) % len(batches)])
        if cuda:
            peak[0] = max(peak[0] or 0, torch.cuda.max_memory_allocated())

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    return Mode(name, step, sync, n_params, lambda steps: profile_torch(step, sync, steps, name), lambda: peak[0])


def jax_mode(name, cfg, tcfg, batches, bf16: bool, device=None, loss_chunk: int = 0) -> Mode:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.gpt import GPT
    from jax_impl.train import Trainer

    with jax.default_device(device):  # the Trainer keeps its state where the model was built
        trainer = Trainer(GPT(cfg, rngs=nnx.Rngs(0)), tcfg, bf16=bf16, loss_chunk=loss_chunk)

    def compiled():
        x, y = (jnp.asarray(a, jnp.int32) for a in batches[0])
        return trainer._train_step.lower(trainer.params, trainer.opt_state, trainer.rest, x, y).compile()

    mode = trainer_mode(name, trainer, batches, lambda: compiled().as_text())
    mode.memory = lambda: compiled().memory_analysis().temp_size_in_bytes
    return mode


def trainer_mode(name, trainer, batches, hlo) -> Mode:
    """A Mode around a JAX Trainer (plain or sharded); ``hlo()``: its compiled step's text."""
    import jax

    from .profile_ops import profile_jax

    it = itertools.count()
    last = []

    def step():
        last[:] = [trainer.step(*batches[next(it) % len(batches)])[0]]

    def sync():
        if last:
            jax.block_until_ready(last[0])

    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainer.params))
    return Mode(name, step, sync, n_params, lambda steps: profile_jax(step, sync, hlo(), steps))


def time_interleaved(modes: list[Mode], warmup: int, rounds: int) -> None:
    """Warm every mode up, then ``rounds`` rounds of one timed step per mode (the order rotates)."""
    for m in list(modes):
        try:
            for _ in range(warmup):
                m.step()
            m.sync()
        except Exception as e:  # noqa: BLE001  (one mode that cannot run, e.g. a compile error: time the rest)
            print(f"  {m.name} failed in warm-up, left out: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            modes.remove(m)
    for r in range(rounds):
        for m in modes[r % len(modes):] + modes[: r % len(modes)]:
            wall, cpu = time.perf_counter(), time.process_time()
            m.step()
            m.sync()
            m.wall.append(time.perf_counter() - wall)
            m.cpu.append(time.process_time() - cpu)


def jax_sharded_mode(name, cfg, tcfg, batches, mesh_text: str, bf16: bool) -> tuple[Mode, list]:
    """JAX ShardedTrainer on --mesh, and the collectives of its compiled step."""
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
    return trainer_mode(name, trainer, batches, lambda: hlo), collective_bytes(hlo, mesh, cfg, tcfg, shape)


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}


def collective_bytes(hlo: str, mesh, cfg, tcfg, shape) -> list[tuple[str, str, str]]:
    """Bytes each device sends into all-reduces per step, by mesh axis, from the compiled HLO, next
    to Megatron's count: per block 2 all-reduces of (B / data) * T * C activations forward and 2
    backward over "model"; over "data", one all-reduce of the (local) gradients."""
    import re

    from twin_parity.sharded_hlo import axis_groups, model_axis_groups, replica_groups
    from twin_common.params import table_for

    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    model_groups, data_groups = model_axis_groups(ids), axis_groups(ids, 0)
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
        groups = sorted(map(sorted, replica_groups(g.group(1)))) if g else every
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
    p.add_argument("--batch-size", type=int, help="default: the model's (16; mixtral-small 4, smollm2-135m 2)")
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
    p.add_argument("--attention", nargs="+", choices=["cudnn", "library"], default=["cudnn"],
                   help="the fused attention's kernel on a GPU in bf16, one mode per value (default: cudnn)")
    p.add_argument("--loss-chunk", nargs="+", type=int, default=[0], metavar="N",
                   help="the cross-entropy over N positions at a time, one mode per value (default: 0, all at once)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where both frameworks run (auto: CUDA and a JAX GPU when present)")
    p.add_argument("--threads", type=int,
                   help="run both frameworks on this many cores (CPU affinity and torch.set_num_threads; "
                        "XLA sizes its pool from the affinity). Default: each framework's own default")
    p.add_argument("--profile", action="store_true", help="after timing, print each mode's top ops")
    p.add_argument("--top", type=int, default=12, help="ops per framework in the --profile table")
    args = p.parse_args(argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.cpu_devices}"
    if any(n < 0 for n in args.loss_chunk):
        p.error(f"--loss-chunk must be >= 0 (0: no chunking), got {args.loss_chunk}")
    if args.mesh:
        if args.loss_chunk != [0]:
            p.error("--loss-chunk is for the one-device trainers, not --mesh")
        args.modes = ["jax-sharded"]
    if args.threads:  # before jax and torch start their thread pools
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    # A machine may have one framework only (a TPU VM has no torch): run the modes it can.
    missing = {name: reason for name in ("torch", "jax") if (reason := framework_missing(name))}
    names = [m for m in args.modes if m.split("-")[0] not in missing]
    for name, reason in missing.items():
        skipped = [m for m in args.modes if m.startswith(name)]
        if skipped:
            print(f"skipped {', '.join(skipped)}: {reason}", file=sys.stderr)
    if not names:
        print("nothing to run: " + "; ".join(missing.values()), file=sys.stderr)
        return 1
    torch = None if "torch" in missing else importlib.import_module("torch")
    jax = None if "jax" in missing else importlib.import_module("jax")
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)
    cfg, default_batch = MODELS[args.model]
    batch = args.batch_size or default_batch
    seq = args.seq_len or cfg.block_size
    tcfg = TrainConfig(steps=args.warmup + args.steps + 1, batch_size=batch, seq_len=seq, warmup_steps=1)
    rng = np.random.default_rng(0)
    batches = [tuple(rng.integers(0, cfg.vocab_size, (2, batch, seq)).astype(np.int64)) for _ in range(4)]
    cuda = torch is not None and torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not cuda:
        p.error("--device cuda: torch sees no CUDA device" if torch else "--device cuda needs torch")
    jax_device = None
    if jax is not None:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if args.device == "cuda" and not gpus:
            p.error("--device cuda: JAX sees no GPU")
        jax_device = gpus[0] if gpus and args.device != "cpu" else jax.devices("cpu")[0]
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    load = os.getloadavg()[0]
    torch_text = f"{torch.__version__} on {gpu or 'cpu'} ({torch.get_num_threads()} threads)" if torch else "-"
    jax_text = f"{jax.__version__} on {jax_device.platform}" if jax else "-"
    print(f"model {args.model} ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
          f"vocab {cfg.vocab_size}), batch {batch} x {seq}, {'bf16' if args.bf16 else 'float32'}; "
          f"torch {torch_text}, jax {jax_text}; attention kernel {' / '.join(args.attention)}; "
          f"loss chunk {' / '.join(str(n) if n else 'none' for n in args.loss_chunk)}; "
          f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, load average {load:.2f}",
          file=sys.stderr)  # fmt: skip
    modes, comm = [], None
    for name, kernel, chunk in itertools.product(names, dict.fromkeys(args.attention), dict.fromkeys(args.loss_chunk)):
        c = dataclasses.replace(cfg, attn_kernel=kernel)
        variant = [kernel] * (len(args.attention) > 1) + [f"loss chunk {chunk or 'none'}"] * (chunk > 0 or len(args.loss_chunk) > 1)
        label = f"{name} ({', '.join(variant)})" if variant else name
        print(f"  {label}: building and warming up ...", file=sys.stderr, flush=True)
        if name.startswith("torch"):
            modes.append(torch_mode(label, c, tcfg, batches, name == "torch-compile", args.bf16, device, chunk))
        elif name == "jax-sharded":
            mode, comm = jax_sharded_mode(f"jax-jit, mesh {args.mesh}", c, tcfg, batches, args.mesh, args.bf16)
            modes.append(mode)
        else:
            modes.append(jax_mode(label, c, tcfg, batches, args.bf16, jax_device, chunk))
    print(f"  timing {args.steps} interleaved rounds ...", file=sys.stderr, flush=True)
    time_interleaved(modes, args.warmup, args.steps)
    base = next((m for m in modes if m.name.startswith("torch-eager")), None)
    rows = []
    for m in modes:
        ms, cpu_ms = statistics.median(m.wall) * 1e3, statistics.median(m.cpu) * 1e3
        tokens = batch * seq / (ms / 1e3)
        tflops = tokens * flops_per_token(cfg, seq, m.n_params) / 1e12
        ratio = (f"{ms / (statistics.median(base.wall) * 1e3):.2f}x", f"{cpu_ms / (statistics.median(base.cpu) * 1e3):.2f}x") if base else ("-", "-")
        memory = m.memory()
        rows.append((m.name, f"{ms:.2f}", ratio[0], f"{cpu_ms:.2f}", ratio[1], f"{tokens:,.0f}", f"{tflops:.3f}",
                     f"{100 * tflops / peak:.1f}%" if peak else "-", f"{m.n_params / 1e6:.2f}M",
                     f"{memory / 2**20:,.0f} MiB" if memory is not None else "-"))  # fmt: skip
    headers = ("mode", "ms/step (median)", "vs eager", "CPU ms/step", "vs eager", "tokens/s", "TFLOP/s", "MFU", "params",
               "memory")  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    for line in (headers, ["-" * w for w in widths], *rows):
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))
    if peak:
        print(f"MFU: nanoGPT's FLOP count per token x tokens/s over {peak:.0f} TF/s, the dense bf16 peak of the {gpu}")
    if comm:
        print("\ncollectives per training step, per device (from the compiled program):")
        headers = ("collective", "count", "bytes")
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *comm)]
        for line in (headers, ["-" * w for w in widths], *comm):
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
        if jax.devices()[0].platform == "cpu":
            print("(simulated CPU devices share this machine's cores: the ms/step above says nothing about "
                  "sharded speed; the collective bytes are what a real mesh would move)")
    print(f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; {args.steps} rounds, modes interleaved",
          file=sys.stderr)  # fmt: skip
    if args.profile:
        from .profile_ops import by_kind

        for m in modes:
            prof = m.profile(max(3, min(args.steps, 10)))
            print()
            print(prof.table(args.top))
            if m.name.startswith("jax-jit"):
                print("  by kind:  " + ", ".join(f"{k} {100 * share:.0f}%" for k, _, share in by_kind(prof)[:8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
