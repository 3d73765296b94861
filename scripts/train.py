"""Train the GPT twin in PyTorch or JAX, or both side by side, byte-level.

    python -m scripts.train --framework torch --out runs/torch          # or --framework jax
    python -m scripts.train --framework torch --out runs/torch --resume # continue from a checkpoint
    python -m scripts.train --framework compare --out runs/compare      # both, same init and batches

The default corpus is generated (see twin_common.data); --data PATH trains on your own text file.
A run directory holds ckpt/step_NNNNNN.safetensors (weights + AdamW state, either framework can load
it), latest.json (which checkpoint is current, with its hash) and log.jsonl (one line per step, numbered from 1 like the checkpoints).
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

import dataclasses

from .compare import compare as run_compare
from .run_folder import RunDir, RunError, check_extra
from .trainers import MODELS, configs, data_info, load_data, make_trainer, progress, val_loss
from twin_common import GPTConfig
from twin_common import data as D
from twin_common.config import RUNTIME_FIELDS, config_differences
from .sharded_run import leave_job, run_for_this_process
from .sharded_run import setup as mesh_setup
from twin_common.precision import matched_precision
from twin_common.train_config import TrainConfig
from weight_conversion.checkpoint import read_checkpoint_metadata
from weight_conversion.preflight import check_fits

__all__ = ["MODELS", "RunDir", "RunError", "build_parser", "main", "train_one"]


# Flags that set a TrainConfig field; on --resume each comes from the checkpoint unless given.
TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr",
               "min_lr": "min_lr", "warmup": "warmup_steps", "weight_decay": "weight_decay",
               "grad_clip": "grad_clip", "seed": "seed"}  # fmt: skip


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resume_plan(args, explicit: set[str], run: RunDir) -> dict:
    """Everything a resume needs, checked, with the folder untouched: the configs come from the
    checkpoint, and each flag the user gave must agree with it (a larger --steps extends a
    finished run). Raises RunError naming every conflict."""
    latest = run.read_latest()
    try:
        step, saved_cfg, extra = read_checkpoint_metadata(latest["path"], require_hash=not latest["legacy"])
        model_cfg = GPTConfig.from_dict(saved_cfg)
        check_fits(model_cfg, "train", latest["path"])  # the tensor headers, before a model is built
    except (ValueError, TypeError) as e:
        raise RunError(f"checkpoint {latest['path']} cannot be resumed: {e}") from None
    problems = check_extra(extra, step)
    if problems:
        raise RunError(f"checkpoint {latest['path']} cannot be resumed:\n  - " + "\n  - ".join(problems))
    saved = TrainConfig.from_dict(extra["train_config"])
    conflicts, changes = [], {}
    if "model" in explicit:
        wanted = dataclasses.replace(MODELS[args.model], attn_dropout=model_cfg.attn_dropout,
                                     resid_dropout=model_cfg.resid_dropout)  # fmt: skip
        conflicts += [f"--model {args.model}: {d}" for d in config_differences(
            saved_cfg, wanted.to_dict(), what="config", where="the checkpoint", ignore=RUNTIME_FIELDS)]  # fmt: skip
    if "dropout" in explicit and args.dropout != model_cfg.attn_dropout:
        conflicts.append(f"--dropout {args.dropout} conflicts with the checkpoint's dropout {model_cfg.attn_dropout}")
    for dest, field in TRAIN_FLAGS.items():
        if dest not in explicit or getattr(args, dest) == getattr(saved, field):
            continue
        value, was = getattr(args, dest), getattr(saved, field)
        if dest == "steps" and step == saved.steps and value > saved.steps:
            changes["steps"] = value  # extend a finished run
        elif dest == "steps" and step == saved.steps:
            conflicts.append(f"--steps {value}: the run already finished its {saved.steps} steps; give "
                             f"more to extend it")  # fmt: skip
        else:
            conflicts.append(f"{_flag(dest)} {value} conflicts with the checkpoint's train config field "
                             f"{field!r} = {was!r}")  # fmt: skip
    text, info = _resume_data(args, explicit, extra["data"], conflicts)
    if conflicts:
        raise RunError(f"cannot resume {args.out} (leave out a flag to take the checkpoint's value):\n  - "
                       + "\n  - ".join(conflicts))  # fmt: skip
    tcfg = dataclasses.replace(saved, **changes)
    return {"latest": latest, "model_cfg": model_cfg, "tcfg": tcfg, "text": text, "data_info": info,
            "extended_from": saved.steps if changes else None}  # fmt: skip


def _resume_data(args, explicit, saved: dict, conflicts: list) -> tuple[bytes, dict]:
    """The checkpoint's training text: --data if given, else the source it records; same sha256."""
    if "data" in explicit:
        text, info = load_data(args)
        if info["sha256"] != saved["sha256"]:
            conflicts.append(f"--data {args.data} is not the text the checkpoint was trained on ({saved['source']})")
        return text, info
    if saved["source"] == "generated":
        text = D.generated_corpus()
    else:
        try:
            text = D.load_text(saved["source"])
        except ValueError as e:
            raise RunError(f"the checkpoint was trained on {saved['source']}, which cannot be read now ({e}); "
                           f"pass --data with the same text") from None  # fmt: skip
    info = data_info(text, saved["source"])
    if info["sha256"] != saved["sha256"]:
        conflicts.append(f"{saved['source']} changed since the checkpoint was written (its sha256 differs)")
    return text, info


def train_one(args, explicit: set[str] = frozenset()) -> int:
    run = RunDir(args.out)
    plan, start_over = None, False
    if args.resume and run.exists():
        plan = resume_plan(args, explicit, run)
        model_cfg, tcfg, text, info = plan["model_cfg"], plan["tcfg"], plan["text"], plan["data_info"]
    else:
        if run.leftovers() and not args.resume:
            what = ("a run at its checkpoint" if run.exists() else
                    "a run that stopped before its first checkpoint")  # fmt: skip
            hint = ("--resume to continue it" if run.exists() else
                    "--resume to start it over from step 0")  # fmt: skip
            raise RunError(f"{args.out} already holds files of {what} ({', '.join(run.leftovers())}); "
                           f"pass {hint}, or choose another --out")  # fmt: skip
        if args.resume and not run.leftovers():
            raise RunError(f"--resume: {args.out} holds no run to resume; leave out --resume to start one")
        start_over = args.resume  # the run stopped before its first checkpoint: begin again
        model_cfg, tcfg = configs(args, explicit)
        text, info = load_data(args)
    train, val = D.split(text, tcfg.seq_len)
    args.device_mesh = mesh_setup(args.framework, args.mesh, model_cfg, tcfg.batch_size)  # None without --mesh
    run = run_for_this_process(run)  # ranks other than 0 read the folder and write nothing
    if args.stop_at is not None and not 1 <= args.stop_at <= tcfg.steps:
        raise RunError(f"--stop-at must be between 1 and --steps={tcfg.steps}, got {args.stop_at}")
    stop = tcfg.steps if args.stop_at is None else args.stop_at
    if plan is not None and plan["latest"]["step"] >= stop:
        print(f"nothing to do: {args.out} is already at step {plan['latest']['step']} "
              f"(stopping point {stop}); its checkpoint is left as it is")  # fmt: skip
        return 0
    trainer = make_trainer(args.framework, model_cfg, tcfg, args)
    if plan is not None:
        weights, optim, meta = run.load(plan["latest"], model_cfg)
        trainer.load(weights, optim, meta["step"])
        if meta["framework"] == args.framework:
            trainer.set_rng_state(meta["rng"])
    # Every check has passed: only now is the run folder written to.
    os.makedirs(args.out, exist_ok=True)
    for path in run.remove_temporaries():
        print(f"removed {path}, left by an interrupted write", file=sys.stderr)
    if start_over:
        run.start_over()
        print(f"{args.out} has no checkpoint (the run stopped before its first one): starting over "
              f"from step 0", file=sys.stderr)  # fmt: skip
    if plan is not None:
        run.truncate_log(meta["step"])
        print(f"resumed {meta['framework']} checkpoint at step {meta['step']} in {args.framework}", file=sys.stderr)
        if plan["extended_from"] is not None:
            print(f"extending the run from {plan['extended_from']} to {tcfg.steps} steps: the cosine "
                  f"schedule now spans {tcfg.steps} steps, so the learning rate rises from "
                  f"{tcfg.min_lr:.2e} to {tcfg.lr_at(meta['step']):.2e} at step {meta['step']}", file=sys.stderr)

    def extra(loss: float) -> dict:
        return {"framework": args.framework, "train_config": tcfg.to_dict(), "data": info,
                "rng": trainer.rng_state(), "loss": loss}  # fmt: skip

    try:
        return _loop(args, run, trainer, model_cfg, tcfg, train, val, stop, extra)
    except KeyboardInterrupt:
        last = run.read_latest()["path"] if run.exists() else "none yet"
        print(f"interrupted at step {trainer.step_count}; last checkpoint: {last}; resume with: python -m "
              f"scripts.train --framework {args.framework} --out {args.out} --resume", file=sys.stderr)  # fmt: skip
        return 130


def _loop(args, run, trainer, model_cfg, tcfg, train, val, stop, extra) -> int:
    """Steps from the trainer's count to ``stop``: log, evaluate, checkpoint; then the last
    checkpoint, the final losses and (at the end of the run) a sample."""
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
                last = (run.read_latest()["path"] if run.exists() else
                        "none written yet (--resume starts the run over, taking the flags you give)")  # fmt: skip
                print(f"error: loss became {loss} at step {trainer.step_count}; stopping without saving. "
                      f"Last good checkpoint: {last}", file=sys.stderr)  # fmt: skip
                return 3
            done = trainer.step_count
            # "step": steps done, as the console and the checkpoint names count (the learning rate
            # is the one this step used: the schedule's 0-based index)
            record = {"step": done, "loss": loss, "grad_norm": norm, "lr": tcfg.lr_at(step)}
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
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint, with the checkpoint's settings (a flag "
                        "given must agree with them; a larger --steps extends a finished run)")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="checkpoint and stop at STEP (the schedule still spans --steps); resume later, "
                        "in either framework")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile the model (JAX is always jitted)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    p.add_argument("--loss-chunk", type=int, default=0, metavar="N",
                   help="the cross-entropy over N positions at a time, so the (batch, seq, vocab) float32 logits "
                        "never exist at once; 0: all at once (default: %(default)s)")
    p.add_argument("--fast-matmul", action="store_true",
                   help="leave matmul precision at the frameworks' defaults (TF32 on GPU) instead of pinning")
    p.add_argument("--device", choices=["cpu", "cuda"], help="torch device (default: cuda if present)")
    p.add_argument("--mesh", metavar="data=D,model=M,expert=X",
                   help="data, tensor (model) and, for a MoE model, expert parallel over D*M*X devices (any "
                        "axis left out is 1): JAX over the visible devices; torch under torchrun "
                        "--nproc-per-node D*M*X (README: Sharded)")
    p.add_argument("--sample", type=int, default=200, help="bytes of text to sample at the end; 0: none (default: %(default)s)")
    p.add_argument("--no-chaos-reference", dest="chaos_reference", action="store_false",
                   help="compare: skip the third run (torch with the other attention path: the same "
                        "function, other rounding) that measures how fast training amplifies rounding")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads: torch's intra- and inter-op threads and OpenMP's (OMP_NUM_THREADS); "
                        "N=1 also turns off XLA's multi-threaded Eigen on the CPU. Set before either "
                        "framework starts (default: each framework's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def flag_problems(args, explicit: set[str]) -> list[str]:
    """Every flag value that cannot work, found before anything is built or written."""
    problems = []
    for dest, low in (("steps", 1), ("batch_size", 1), ("seq_len", 1), ("warmup", 0), ("eval_every", 0),
                      ("ckpt_every", 0), ("sample", 0), ("seed", 0), ("loss_chunk", 0)):  # fmt: skip
        value = getattr(args, dest)
        if value is not None and value < low:
            problems.append(f"{_flag(dest)} must be >= {low}, got {value}")
    if args.seed >= 2**32:
        problems.append(f"--seed must be below 2^32, got {args.seed}")
    for dest, positive in (("lr", True), ("min_lr", True), ("weight_decay", False), ("grad_clip", False)):
        value = getattr(args, dest)
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            problems.append(f"{_flag(dest)} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    if not (math.isfinite(args.dropout) and 0 <= args.dropout < 1):
        problems.append(f"--dropout must be in [0, 1), got {args.dropout}")
    if "warmup" in explicit and not args.resume and args.warmup > args.steps:
        problems.append(f"--warmup {args.warmup} is longer than the run (--steps {args.steps})")
    if args.stop_at is not None and (args.stop_at < 1 or (not args.resume and args.stop_at > args.steps)):
        problems.append(f"--stop-at must be between 1 and --steps={args.steps}, got {args.stop_at}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if args.data is not None and not args.data:
        problems.append("--data is empty: give the path of a text file")
    why = RunDir(args.out).problem_with_path()
    if why:
        problems.append(why)
    if args.device == "cuda":  # a torch option; refused for JAX too rather than silently ignored
        import torch

        if not torch.cuda.is_available():
            problems.append("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if args.framework == "compare" and args.resume:
        problems.append("--resume is for --framework torch or jax")
    if args.framework == "compare" and args.mesh:
        problems.append("--mesh is for --framework torch or jax")
    if args.loss_chunk and args.mesh:
        problems.append("--loss-chunk is for one device, not --mesh")
    return problems


def explicit_flags(argv) -> set[str]:
    """The destinations of the flags the user gave (parsed again with no defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def set_threads(n: int, framework: str) -> None:
    """--threads: OpenMP's and XLA's through the environment (read when the libraries start, so
    before either framework is imported), torch's through its own calls."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    if n == 1 and framework != "torch":
        # XLA's CPU backend has no thread-count flag; this is the one-thread setting it has.
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), flags]))
    if framework != "jax":
        import torch

        torch.set_num_threads(n)
        with contextlib.suppress(RuntimeError):  # refused once inter-op work has started
            torch.set_num_interop_threads(n)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    explicit = explicit_flags(sys.argv[1:] if argv is None else argv)
    problems = flag_problems(args, explicit)
    if problems:
        print("error: " + "\nerror: ".join(problems), file=sys.stderr)
        return 2
    if args.threads is not None:
        set_threads(args.threads, args.framework)
    code = _run(args, explicit)
    leave_job(code, args.framework, getattr(args, "device_mesh", None))  # torchrun: does not return
    return code


def _run(args, explicit: set[str]) -> int:
    frameworks = ("torch", "jax") if args.framework == "compare" else (args.framework,)
    precision = contextlib.nullcontext() if args.fast_matmul else matched_precision(frameworks=frameworks)
    try:
        with precision:
            return run_compare(args) if args.framework == "compare" else train_one(args, explicit)
    except (RunError, ValueError) as e:  # ConversionError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or in compare (which keeps no checkpoints)
        print(f"interrupted; {args.out} holds no new checkpoint from this run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
