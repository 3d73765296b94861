"""Each twin's AdamW alone against a float64 NumPy AdamW written from the published algorithm.

The train_step and resume rows compare the twins with each other, so a mistake both share passes
them: the decay rule of the conversion table (``ParamSpec.decay``), a default in ``TrainConfig``,
the warmup + cosine schedule both read from ``TrainConfig.lr_at``. This check runs one twin's
Trainer in float64 and, at every step, applies a NumPy AdamW to the weights and the gradient that
twin had before the step:

- global-norm clipping as ``torch.nn.utils.clip_grad_norm_`` documents it (scale by
  max_norm / (norm + 1e-6) where that is below 1);
- Adam's bias-corrected moments and decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight
  Decay Regularization", ICLR 2019, Algorithm 2; torch.optim.AdamW's documented update), decay on
  every parameter with two or more dimensions and on nothing else (nanoGPT's ``configure_optimizers``);
- linear warmup from lr / warmup_steps, then a cosine from lr to min_lr (nanoGPT's ``get_lr``).

Its hyperparameters are ``REFERENCE``, written here, not read from ``TrainConfig``: a shared default
that moved (beta2 0.999, optax's weight decay 1e-4) fails the row, and the row names it. No code of
the twins, the table or TrainConfig computes the reference's update.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from twin_common import GPTConfig
from twin_common.train_config import TrainConfig
from twin_common.precision import matched_precision
from twin_common.tolerances import tolerance_for
from twin_parity import train_harness as th
from twin_parity.harness import Result

# The project's training values (README "Training"): nanoGPT's GPT-2 recipe (betas 0.9 / 0.95,
# weight decay 0.1, clipping at 1.0) with the peak and floor learning rates this project trains at.
REFERENCE = dict(lr=3e-3, min_lr=3e-4, warmup_steps=20, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                 grad_clip=1.0)  # fmt: skip
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6)
# The run: short, so that it crosses the end of warmup into the cosine and ends on min_lr.
STEPS, WARMUP = 8, 3
# A small GPT whose first gradients' global norm (2.6 to 3.4 over these steps, measured) is above
# grad_clip, so every step is clipped and the clipping rule is exercised.
OPT_GPT = GPTConfig(vocab_size=64, block_size=16, n_layers=2, d_model=32, n_heads=4, init_std=0.2)


def reference_lr(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """nanoGPT's get_lr for 0-based optimizer steps: linear warmup, cosine to min_lr at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    ratio = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class NumpyAdamW:
    """AdamW with global-norm clipping, float64, on {torch key: array} dicts (torch layout)."""

    def __init__(self, steps: int, warmup: int, **hyper):
        self.steps, self.warmup, self.h = steps, warmup, hyper
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.clipped = 0

    def lr(self, step: int) -> float:
        return reference_lr(step, self.steps, self.warmup, self.h["lr"], self.h["min_lr"])

    def step(self, step: int, weights: dict, grads: dict) -> dict:
        h = self.h
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
        scale = min(1.0, h["grad_clip"] / (norm + CLIP_EPS)) if h["grad_clip"] > 0 else 1.0
        self.clipped += scale < 1.0
        lr, t = self.lr(step), step + 1
        out = {}
        for key, g in grads.items():
            w, g = weights[key].astype(np.float64), scale * g.astype(np.float64)
            m = self.m[key] = h["beta1"] * self.m.get(key, 0.0) + (1 - h["beta1"]) * g
            v = self.v[key] = h["beta2"] * self.v.get(key, 0.0) + (1 - h["beta2"]) * g * g
            m_hat, v_hat = m / (1 - h["beta1"] ** t), v / (1 - h["beta2"] ** t)
            decay = h["weight_decay"] if w.ndim >= 2 else 0.0  # matrices only
            out[key] = w - lr * decay * w - lr * m_hat / (np.sqrt(v_hat) + h["eps"])
        return out


def _shared_causes(cfg: GPTConfig, tcfg: TrainConfig) -> list[str]:
    """What the twins share and the reference does not: TrainConfig defaults, the table's decay
    column, the schedule. Named beside the failing parameter, so the row says where to look."""
    from twin_common.params import table_for

    defaults = TrainConfig()
    causes = [f"default changed: {k} {getattr(defaults, k)!r} (reference {v!r})"
              for k, v in REFERENCE.items() if getattr(defaults, k) != v]  # fmt: skip
    wrong = [s.torch_key for s in table_for(cfg) if s.decay != (len(s.torch_shape) >= 2)]
    if wrong:
        causes.append(f"the table's decay column differs from 'matrices only' at {', '.join(wrong[:3])}"
                      + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))  # fmt: skip
    ref = NumpyAdamW(tcfg.steps, tcfg.warmup_steps, **REFERENCE)
    off = [s for s in range(tcfg.steps) if not math.isclose(tcfg.lr_at(s), ref.lr(s), rel_tol=1e-12)]
    if off:
        s = off[0]
        causes.append(f"TrainConfig.lr_at({s}) = {tcfg.lr_at(s):.4g}, reference {ref.lr(s):.4g}")
    return causes


def _flax_grads_compiled_once():
    """th._flax_grads with one jitted gradient for every step (it builds a new one per call)."""
    import jax
    from flax import nnx

    from jax_impl.gpt import model_loss
    from twin_common.params import table_for
    from weight_conversion.flax_side import flax_path

    def loss_of(params, graphdef, rest, x, y):
        return model_loss(nnx.merge(graphdef, params, rest), x, y)

    grad = jax.jit(jax.grad(loss_of), static_argnums=1)

    def grads_of(model, x, y, _is_gpt):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        by_path = {spec.flax_path: spec for spec in table_for(model.cfg)}
        leaves = jax.tree_util.tree_leaves_with_path(grad(params, graphdef, rest, x, y))
        return {(s := by_path[flax_path(kp)]).torch_key: s.transform.to_torch(np.asarray(g)) for kp, g in leaves}

    return grads_of


def optimizer_check(framework: str, seed: int = 0, cfg: GPTConfig = OPT_GPT) -> Result:
    """``framework``'s Trainer for STEPS float64 steps, each step against NumpyAdamW applied to the
    same weights and gradient; the first step and parameter over the float64 bound are named."""
    import jax

    import weight_conversion as wc
    from twin_parity.harness import jax_devices

    tcfg = dataclasses.replace(TrainConfig(), steps=STEPS, warmup_steps=WARMUP, batch_size=4, seq_len=cfg.block_size)
    run_tcfg = dataclasses.replace(tcfg, **{k: getattr(TrainConfig(), k) for k in REFERENCE if k != "warmup_steps"})
    tol = tolerance_for("float64")
    ref = NumpyAdamW(STEPS, WARMUP, **{k: v for k, v in REFERENCE.items() if k != "warmup_steps"})
    worst, peak, first, detail = 0.0, 0.0, None, None
    with matched_precision(x64=True), jax.default_device(jax_devices()["cpu"]):
        model = (th.new_torch_gpt if framework == "torch" else th.new_flax_gpt)(cfg, "float64", seed)
        run = th._run(framework, model, run_tcfg)
        grads_of = th._torch_grads if framework == "torch" else _flax_grads_compiled_once()
        for step in range(STEPS):
            x, y = th.token_batch(cfg, tcfg.batch_size, tcfg.seq_len, seed, step)
            if framework == "jax":
                x, y = x.astype(np.int32), y.astype(np.int32)
            current = run.sync_model() if framework == "jax" else model  # the JAX step donates its arrays
            before = wc.export(current)
            grads = {k: g for k, g in grads_of(current, x, y, True).items() if k != "loss"}  # parameters only
            run.step(step)
            after, want = run.export()[0], ref.step(step, before, grads)
            errs = {k: float(np.max(np.abs(after[k] - want[k]))) for k in want}
            worst = th._worse(worst, th._worst(errs.values()))
            peak = max(peak, max(float(np.max(np.abs(w))) for w in want.values()))
            name, why = th.worst_offender(want, {k: after[k] for k in want}, lambda _: tol.atol)
            if name is not None and first is None:
                first, detail = f"step {step}: {name}", f"step {step}: {why}"
                break
    if first is not None:
        causes = _shared_causes(cfg, run_tcfg)
        detail = "; ".join([detail, *causes])
    device = ("cpu", None) if framework == "torch" else (None, "cpu")
    return Result(
        "optimizer_vs_f64", [tcfg.batch_size, tcfg.seq_len], "float64", *device, f"{framework} vs NumPy AdamW",
        worst, worst / peak if peak else worst, tol.atol, first is None, first, detail,
        config={"model": "gpt", "steps": STEPS, "warmup_steps": WARMUP, "clipped_steps": ref.clipped,
                **{k: getattr(run_tcfg, k) for k in REFERENCE}},
    )  # fmt: skip
