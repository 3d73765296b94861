"""Train the GPT twin in PyTorch or JAX, or both side by side, byte-level.

    python -m scripts.train --framework torch --out runs/torch          # or --framework jax
    python -m scripts.train --framework torch --out runs/torch --resume # continue from a checkpoint
    python -m scripts.train --framework compare --out runs/compare      # both, same init and batches

The default corpus is generated (see twin_common.data); --data PATH trains on your own text file.
A run directory holds ckpt/step_NNNNNN.safetensors (weights + AdamW state, either framework can load
it), latest.json (which checkpoint is current, with its sha256) and log.jsonl (one line per step).
Checkpoints are written to a temporary name and renamed, and latest.json is replaced only after the
checkpoint it names is complete, so a crash at any point leaves the last good checkpoint usable.
A checkpoint written by one framework resumes in the other (--resume with the other --framework).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from twin_common import GPTConfig
from twin_common import data as D
from twin_common.config import config_differences
from twin_common.mesh import run_for_this_process, sharded_trainer
from twin_common.mesh import setup as mesh_setup
from twin_common.precision import matched_precision
from twin_common.train_config import TrainConfig
from weight_conversion.safetensors_io import write_atomic

MODELS = {
    "tiny": GPTConfig(vocab_size=256, block_size=32, n_layers=1, d_model=32, n_heads=2),
    "small": GPTConfig(vocab_size=256, block_size=64, n_layers=2, d_model=128, n_heads=4),
    "gpt2": GPTConfig.gpt2_124m(),
}
KEEP_CHECKPOINTS = 3
COMPARE_BOUND = 1e-4  # issue 3: per-step relative loss difference between the twins, float32 CPU


class RunError(Exception):
    """A problem with the user's input or run directory; printed without a traceback."""


# ------------------------------------------------------------------------------------ run folder


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: str, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode())


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.latest = os.path.join(path, "latest.json")
        self.log = os.path.join(path, "log.jsonl")

    def exists(self) -> bool:
        return os.path.exists(self.latest)

    def leftovers(self) -> list[str]:
        """Files of an earlier run (one may have crashed before its first checkpoint)."""
        names = ("latest.json", "log.jsonl", "ckpt", "compare.json")
        return [n for n in names if os.path.exists(os.path.join(self.path, n))]

    def read_latest(self) -> dict:
        if not self.exists():
            raise RunError(f"{self.path} has no checkpoint to resume from (no latest.json)")
        try:
            with open(self.latest) as f:
                latest = json.load(f)
            ckpt = os.path.join(self.path, latest["checkpoint"])
            expected = latest["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{self.latest} is unreadable ({e}); the run cannot be resumed") from None
        if not os.path.exists(ckpt):
            raise RunError(f"{self.latest} names {ckpt}, which does not exist")
        if _sha256(ckpt) != expected:
            raise RunError(f"checkpoint {ckpt} is corrupt or truncated: its sha256 does not match latest.json")
        return {**latest, "path": ckpt}

    def save(self, trainer, model_cfg, extra: dict) -> str:
        from weight_conversion.checkpoint import save_checkpoint

        weights, optim, step = trainer.state()
        os.makedirs(os.path.join(self.path, "ckpt"), exist_ok=True)
        rel = os.path.join("ckpt", f"step_{step:06d}.safetensors")
        path = os.path.join(self.path, rel)
        save_checkpoint(path, model_cfg, weights, optim, step, extra)
        _write_json_atomic(self.latest, {"checkpoint": rel, "sha256": _sha256(path), "step": step,
                                         "framework": extra["framework"]})  # fmt: skip
        self._prune(keep=rel)
        return path

    def _prune(self, keep: str) -> None:
        folder = os.path.join(self.path, "ckpt")
        names = sorted(n for n in os.listdir(folder) if n.startswith("step_") and n.endswith(".safetensors"))
        for name in names[:-KEEP_CHECKPOINTS]:
            if os.path.join("ckpt", name) != keep:
                os.unlink(os.path.join(folder, name))

    def append_log(self, record: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop log lines past ``step`` (written after the checkpoint a crash left us with)."""
        if not os.path.exists(self.log):
            return
        keep = []
        with open(self.log) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    continue
        write_atomic(self.log, "".join(keep).encode())


# ---------------------------------------------------------------------------------------- setup


def load_data(args) -> tuple[bytes, dict]:
    if args.data:
        text = D.load_text(args.data)
        return text, {"source": os.path.abspath(args.data), "sha256": hashlib.sha256(text).hexdigest()}
    text = D.generated_corpus()
    return text, {"source": "generated", "sha256": hashlib.sha256(text).hexdigest()}


def make_trainer(framework: str, model_cfg: GPTConfig, tcfg: TrainConfig, args, weights=None):
    """A Trainer for ``framework``; with ``weights`` (interchange arrays) as its initial weights."""
    import weight_conversion as wc

    if framework == "torch":
        import torch

        from torch_impl.gpt import GPT
        from torch_impl.train import Trainer

        torch.manual_seed(tcfg.seed)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = GPT(model_cfg).to(device)
        if weights is not None:
            wc.import_(model, weights)
        if getattr(args, "device_mesh", None) is not None:
            return sharded_trainer("torch", model, tcfg, args.device_mesh, compile=args.compile, bf16=args.bf16)
        return Trainer(model, tcfg, compile=args.compile, bf16=args.bf16)
    from flax import nnx

    from jax_impl.gpt import GPT
    from jax_impl.train import Trainer

    model = GPT(model_cfg, rngs=nnx.Rngs(tcfg.seed))
    if weights is not None:
        wc.import_(model, weights)
    if getattr(args, "device_mesh", None) is not None:
        return sharded_trainer("jax", model, tcfg, args.device_mesh, bf16=args.bf16)
    return Trainer(model, tcfg, bf16=args.bf16)


def configs(args) -> tuple[GPTConfig, TrainConfig]:
    model_cfg = dataclasses.replace(MODELS[args.model], attn_dropout=args.dropout, resid_dropout=args.dropout)
    seq_len = args.seq_len or model_cfg.block_size
    if seq_len > model_cfg.block_size:
        raise RunError(f"--seq-len {seq_len} exceeds the model's block_size {model_cfg.block_size}")
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr,
        min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
        warmup_steps=min(args.warmup, args.steps), weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed,
    )  # fmt: skip
    return model_cfg, tcfg


def _progress(total: int, initial: int, quiet: bool, desc: str):
    if quiet:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _val_loss(trainer, val, tcfg: TrainConfig, batches: int = 4) -> float:
    losses = [
        trainer.eval_loss(*D.batch(val, tcfg.batch_size, tcfg.seq_len, tcfg.seed, i, stream=1))
        for i in range(batches)
    ]
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------------ run


def train_one(args) -> int:
    model_cfg, tcfg = configs(args)
    text, data_info = load_data(args)
    train, val = D.split(text, tcfg.seq_len)
    args.device_mesh = mesh_setup(args.framework, args.mesh, model_cfg, tcfg.batch_size)  # None without --mesh
    run = run_for_this_process(RunDir(args.out))
    if args.stop_at is not None and not 1 <= args.stop_at <= tcfg.steps:
        raise RunError(f"--stop-at must be between 1 and --steps={tcfg.steps}, got {args.stop_at}")
    stop = tcfg.steps if args.stop_at is None else args.stop_at
    if args.resume:
        latest = run.read_latest()
        if latest["step"] >= stop:
            print(f"nothing to do: {args.out} is already at step {latest['step']} "
                  f"(stopping point {stop}); its checkpoint is left as it is")  # fmt: skip
            return 0
    elif run.leftovers():
        raise RunError(
            f"{args.out} already holds files of a run ({', '.join(run.leftovers())}); pass "
            f"--resume to continue it, or choose another --out"
        )
    trainer = make_trainer(args.framework, model_cfg, tcfg, args)
    if args.resume:
        from weight_conversion.checkpoint import load_checkpoint

        weights, optim, meta = load_checkpoint(latest["path"], model_cfg)
        problems = config_differences(meta["train_config"], tcfg.to_dict(), what="train config",
                                      where=latest["path"])  # fmt: skip
        if meta["data"]["sha256"] != data_info["sha256"]:
            problems.append(f"the checkpoint was trained on {meta['data']['source']}, not on this data")
        if problems:
            raise RunError("cannot resume:\n  - " + "\n  - ".join(problems))
        trainer.load(weights, optim, meta["step"])
        if meta["framework"] == args.framework:
            trainer.set_rng_state(meta.get("rng", {}))
        run.truncate_log(meta["step"])
        print(f"resumed {meta['framework']} checkpoint at step {meta['step']} in {args.framework}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)

    def extra(loss: float) -> dict:
        return {"framework": args.framework, "train_config": tcfg.to_dict(), "data": data_info,
                "rng": trainer.rng_state(), "loss": loss}  # fmt: skip

    baseline = D.unigram_loss(train)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    loss, last_val = float("nan"), float("nan")
    with _progress(tcfg.steps, trainer.step_count, args.quiet, args.framework) as bar:
        while trainer.step_count < stop:
            step = trainer.step_count
            start = time.perf_counter()
            loss_t, norm_t = trainer.step(*D.batch(train, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step))
            loss, norm = float(loss_t), float(norm_t)
            elapsed = time.perf_counter() - start
            if not math.isfinite(loss):
                last = run.read_latest()["path"] if run.exists() else "none written yet"
                print(f"error: loss became {loss} at step {step}; stopping without saving. "
                      f"Last good checkpoint: {last}", file=sys.stderr)  # fmt: skip
                return 3
            record = {"step": step, "loss": loss, "grad_norm": norm, "lr": tcfg.lr_at(step)}
            done = trainer.step_count
            if args.eval_every and (done % args.eval_every == 0 or done == tcfg.steps):
                record["val_loss"] = last_val = _val_loss(trainer, val, tcfg)
            run.append_log(record)
            if args.ckpt_every and done % args.ckpt_every == 0 and done < stop:
                run.save(trainer, model_cfg, extra(loss))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", val=f"{last_val:.4f}",
                                tok_s=f"{tokens_per_step / elapsed:,.0f}")  # fmt: skip
    path = run.save(trainer, model_cfg, extra(loss))
    val_loss = _val_loss(trainer, val, tcfg)
    print(f"{args.framework}: step {trainer.step_count}, train loss {loss:.4f}, val loss {val_loss:.4f}, "
          f"unigram baseline {baseline:.4f} nats; checkpoint {path}")  # fmt: skip
    if args.sample and trainer.step_count == tcfg.steps:
        prompt = list(train[: min(8, tcfg.seq_len)])
        text_out = D.decode(trainer.sample(prompt, args.sample, temperature=0.8, seed=tcfg.seed))
        print("sample:\n" + text_out)
    return 0


def compare(args) -> int:
    """Both twins from one init (torch's, converted) on the same batches; PNG + JSON of the losses."""
    model_cfg, tcfg = configs(args)
    text, data_info = load_data(args)
    train, val = D.split(text, tcfg.seq_len)
    os.makedirs(args.out, exist_ok=True)
    import weight_conversion as wc

    trainers = {"torch": make_trainer("torch", model_cfg, tcfg, args)}
    init = wc.export(trainers["torch"].model)
    trainers["jax"] = make_trainer("jax", model_cfg, tcfg, args, weights=init)
    if args.chaos_reference:
        math_cfg = dataclasses.replace(model_cfg, attn_impl="math" if model_cfg.attn_impl == "fused" else "fused")
        trainers[REFERENCE] = make_trainer("torch", math_cfg, tcfg, args, weights=init)
    losses: dict[str, list[float]] = {name: [] for name in trainers}
    val_losses: dict[str, list] = {name: [] for name in trainers}
    with _progress(tcfg.steps, 0, args.quiet, "compare") as bar:
        for step in range(tcfg.steps):
            x, y = D.batch(train, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step)
            for name, trainer in trainers.items():
                losses[name].append(float(trainer.step(x, y)[0]))
                if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == tcfg.steps):
                    val_losses[name].append([step + 1, _val_loss(trainer, val, tcfg)])
            if not all(math.isfinite(v[-1]) for v in losses.values()):  # noqa: SIM110
                print(f"error: a loss became non-finite at step {step}: "
                      f"torch {losses['torch'][-1]}, jax {losses['jax'][-1]}", file=sys.stderr)  # fmt: skip
                return 3
            if bar is not None:
                bar.update(1)
                bar.set_postfix(torch=f"{losses['torch'][-1]:.4f}", jax=f"{losses['jax'][-1]:.4f}",
                                rel=f"{abs(losses['torch'][-1] - losses['jax'][-1]) / losses['torch'][-1]:.1e}")
    rel = [abs(a - b) / abs(a) for a, b in zip(losses["torch"], losses["jax"])]
    baseline = D.unigram_loss(train)
    doc = {
        "model_config": model_cfg.to_dict(), "train_config": tcfg.to_dict(), "data": data_info,
        "unigram_baseline": baseline, "losses": losses, "val_losses": val_losses,
        "rel_diff": rel, "max_rel_diff": max(rel), "bound": COMPARE_BOUND,
    }  # fmt: skip
    horizon = tcfg.steps
    if args.chaos_reference:
        chaos = [abs(a - b) / abs(a) for a, b in zip(losses["torch"], losses[REFERENCE])]
        horizon = next((s for s, r in enumerate(chaos) if r > COMPARE_BOUND), tcfg.steps)
        doc.update(chaos_rel_diff=chaos, chaos_horizon=horizon)
    within = max(rel[:horizon]) if horizon else 0.0
    doc["max_rel_diff_before_horizon"] = within
    _write_json_atomic(os.path.join(args.out, "compare.json"), doc)
    png = os.path.join(args.out, "compare.png")
    plot_compare(doc, png)
    worst = int(np.argmax(rel))
    print(f"max relative loss difference torch vs jax: {max(rel):.2e} at step {worst} "
          f"(bound {COMPARE_BOUND:.0e}); final loss torch {losses['torch'][-1]:.4f}, "
          f"jax {losses['jax'][-1]:.4f}; unigram baseline {baseline:.4f}")  # fmt: skip
    if args.chaos_reference:
        if horizon < tcfg.steps:
            print(f"chaos horizon: torch against itself with the other attention path (same function, "
                  f"other rounding) differs by more than {COMPARE_BOUND:.0e} from step {horizon} on; "
                  f"before it torch and jax differ by at most {within:.2e}")  # fmt: skip
        else:
            print(f"reference: torch against itself with the other attention path stays within "
                  f"{COMPARE_BOUND:.0e} for all {tcfg.steps} steps (max {max(chaos):.2e})")  # fmt: skip
    print(f"wrote {png} and {os.path.join(args.out, 'compare.json')}")
    return 0 if within <= COMPARE_BOUND else 1


REFERENCE = "torch, other attention path"


def plot_compare(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
    steps = np.arange(1, len(doc["losses"]["torch"]) + 1)
    top.plot(steps, doc["losses"]["torch"], label="PyTorch", lw=2.5, alpha=0.6)
    top.plot(steps, doc["losses"]["jax"], label="JAX / Flax NNX", lw=1, ls="--", color="black")
    top.axhline(doc["unigram_baseline"], color="gray", ls=":", label="unigram baseline")
    top.set_ylabel("training loss (nats)")
    top.set_title("Same init, same batches: the two twins' loss curves")
    top.legend()
    def positive(values):  # exact agreement (0) has no place on a log axis: leave a gap
        values = np.asarray(values, dtype=np.float64)
        return np.where(values > 0, values, np.nan)

    bottom.semilogy(steps, positive(doc["rel_diff"]), ".", ms=3, color="tab:red", label="torch vs jax")
    if "chaos_rel_diff" in doc:
        bottom.semilogy(steps, positive(doc["chaos_rel_diff"]), ".", ms=3, color="tab:blue", alpha=0.6,
                        label="torch fused vs torch math attention")  # fmt: skip
    bottom.axhline(doc["bound"], color="gray", ls=":", label=f"bound {doc['bound']:.0e}")
    bottom.set_ylabel("relative loss difference")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--framework", choices=["torch", "jax", "compare"], required=True)
    p.add_argument("--out", required=True, help="run directory (checkpoints, log, plots)")
    p.add_argument("--data", help="a UTF-8 text file to train on (default: the generated corpus)")
    p.add_argument("--model", choices=sorted(MODELS), default="small", help="model size (default: small)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, help="default: the model's block_size")
    # 3e-4: at 1e-3 training on the default corpus turns chaotic after ~110 steps (two float32 runs
    # that differ only in rounding, torch against torch, drift apart by 1e-2); at 3e-4 the twins
    # stay within 6e-6 for 300 steps and still reach 1.34 nats against a 3.22 unigram baseline.
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr", type=float, help="end of the cosine decay (default: lr / 10)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip; 0 disables (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0, help="attention and residual dropout (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="init and batch order (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps; 0: never (default: %(default)s)")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps; 0: only at the end (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="checkpoint and stop at STEP (the schedule still spans --steps); resume later, "
                        "in either framework")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile the model (JAX is always jitted)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    p.add_argument("--fast-matmul", action="store_true",
                   help="leave matmul precision at the frameworks' defaults (TF32 on GPU) instead of pinning")
    p.add_argument("--device", choices=["cpu", "cuda"], help="torch device (default: cuda if present)")
    p.add_argument("--mesh", metavar="data=D,model=M",
                   help="tensor (model) and data parallel over D*M devices: JAX over the visible devices; "
                        "torch under torchrun --nproc-per-node D*M (README: Sharded)")
    p.add_argument("--sample", type=int, default=200, help="bytes of text to sample at the end; 0: none (default: %(default)s)")
    p.add_argument("--no-chaos-reference", dest="chaos_reference", action="store_false",
                   help="compare: skip the third run (torch with the other attention path: the same "
                        "function, other rounding) that measures how fast training amplifies rounding")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.framework == "compare" and (args.resume or args.mesh):
        print(f"error: {'--resume' if args.resume else '--mesh'} is for --framework torch or jax", file=sys.stderr)
        return 2
    precision = contextlib.nullcontext() if args.fast_matmul else matched_precision()
    try:
        with precision:
            return compare(args) if args.framework == "compare" else train_one(args)
    except (RunError, ValueError) as e:  # ConversionError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
