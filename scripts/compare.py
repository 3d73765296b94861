"""--framework compare: both twins from one init (torch's, converted) on the same batches, with a
PNG and a JSON of the two loss curves, and optionally a third run (torch with the other attention
path) that shows how fast training amplifies rounding."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np

from twin_common.files import write_json_atomic
from .trainers import configs, load_data, make_trainer, progress, val_loss
from twin_common import data as D

COMPARE_BOUND = 1e-4  # per-step relative loss difference between the twins, float32 CPU
REFERENCE = "torch, other attention path"


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
    with progress(tcfg.steps, 0, args.quiet, "compare") as bar:
        for step in range(tcfg.steps):
            x, y = D.batch(train, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step)
            for name, trainer in trainers.items():
                losses[name].append(float(trainer.step(x, y)[0]))
                if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == tcfg.steps):
                    val_losses[name].append([step + 1, val_loss(trainer, val, tcfg)])
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
    write_json_atomic(os.path.join(args.out, "compare.json"), doc)
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
