"""Train the GPT twin in PyTorch or JAX, or both side by side, byte-level.

    python -m scripts.train --framework torch --out runs/torch          # or --framework jax
    python -m scripts.train --framework torch --out runs/torch --resume # continue from a checkpoint
    python -m scripts.train --framework compare --out runs/compare      # both, same init and batches

The default corpus is generated (see twin_common.data); --data PATH trains on your own text file.
A run directory holds ckpt/step_NNNNNN.safetensors (weights + AdamW state, either framework can load
it), latest.json (which checkpoint is current, with its hash) and log.jsonl (one line per step).
Checkpoints are written to a temporary name and renamed, and latest.json is replaced only after the
checkpoint it names is complete, so a crash at any point leaves the last good checkpoint usable.
A checkpoint written by one framework resumes in the other (--resume with the other --framework).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

from scripts.compare import compare as run_compare
from scripts.run_folder import RunDir, RunError
from scripts.trainers import MODELS, configs, load_data, make_trainer, progress, val_loss
from twin_common import data as D
from twin_common.config import config_differences
from twin_common.precision import matched_precision

__all__ = ["MODELS", "RunDir", "RunError", "build_parser", "main", "train_one"]


def train_one(args) -> int:
    model_cfg, tcfg = configs(args)
    text, data_info = load_data(args)
    train, val = D.split(text, tcfg.seq_len)
    run = RunDir(args.out)
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
    loss, last_val = float("nan"), None
    with progress(tcfg.steps, trainer.step_count, args.quiet, args.framework) as bar:
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
                record["val_loss"] = last_val = val_loss(trainer, val, tcfg)
            run.append_log(record)
            if args.ckpt_every and done % args.ckpt_every == 0 and done < stop:
                run.save(trainer, model_cfg, extra(loss))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", val="-" if last_val is None else f"{last_val:.4f}",
                                tok_s=f"{tokens_per_step / elapsed:,.0f}")  # fmt: skip
    path = run.save(trainer, model_cfg, extra(loss))
    final_val = val_loss(trainer, val, tcfg)
    print(f"{args.framework}: step {trainer.step_count}, train loss {loss:.4f}, val loss {final_val:.4f}, "
          f"unigram baseline {baseline:.4f} nats; checkpoint {path}")  # fmt: skip
    if args.sample and trainer.step_count == tcfg.steps:
        prompt = list(train[: min(8, tcfg.seq_len)])
        text_out = D.decode(trainer.sample(prompt, args.sample, temperature=0.8, seed=tcfg.seed))
        print("sample:\n" + text_out)
    return 0


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
    p.add_argument("--sample", type=int, default=200, help="bytes of text to sample at the end; 0: none (default: %(default)s)")
    p.add_argument("--no-chaos-reference", dest="chaos_reference", action="store_false",
                   help="compare: skip the third run (torch with the other attention path: the same "
                        "function, other rounding) that measures how fast training amplifies rounding")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.framework == "compare" and args.resume:
        print("error: --resume is for --framework torch or jax", file=sys.stderr)
        return 2
    precision = contextlib.nullcontext() if args.fast_matmul else matched_precision()
    try:
        with precision:
            return run_compare(args) if args.framework == "compare" else train_one(args)
    except (RunError, ValueError) as e:  # ConversionError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
