"""Training parity: gradients, AdamW trajectories and cross-framework resume.

Every check starts both twins from one initialisation moved by the converter (never two RNGs that
happen to agree), feeds them the same batches, and compares in torch layout through the table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_parity.harness import Result
from twin_common import BlockConfig, GPTConfig
from twin_common.precision import matched_precision
from twin_common.tolerances import tolerance_for
from twin_common.train_config import TrainConfig
from twin_common.params import table_for

# Small enough for 2 CPU cores, with every kind of parameter: tied embeddings, several blocks.
SMALL_GPT = GPTConfig(vocab_size=64, block_size=16, n_layers=2, d_model=32, n_heads=4)
TRAJECTORY = TrainConfig(steps=20, batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup_steps=5)
# float32 on CPU, per-step loss relative difference and final parameters: measured 2.3e-7 and 9.8e-7
# here, so 10x headroom, while a wrong pinned default (clipping epsilon, decay mask) costs more.
TRAIN_TOLERANCE = 1e-5
# The key bias adds q . b_k to every score in a row, and softmax ignores a constant added to a row:
# its exact gradient is 0 and its value changes no output. In float32 its gradient is rounding noise
# (~1e-10), which Adam divides by its own RMS, so each framework moves it by a different random walk
# of size ~lr: measured 1.8e-5 apart after 20 steps while every other parameter stays within 7.2e-7.
# Parameter parity is meaningless for it; test_train.py checks that it really changes no output.
OUTPUT_INVARIANT_SUFFIXES = ("attn.k_proj.bias",)


def token_batch(cfg: GPTConfig, batch: int, seq: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for ``step``: a pure function of (seed, step), identical for both twins."""
    tokens = np.random.default_rng([seed, step]).integers(0, cfg.vocab_size, (batch, seq + 1))
    return tokens[:, :-1].astype(np.int64), tokens[:, 1:].astype(np.int64)


# ---------------------------------------------------------------------------------------- builders


def new_torch_gpt(cfg: GPTConfig, dtype: str, seed: int):
    import torch

    from torch_impl.gpt import GPT

    torch.manual_seed(seed)
    return GPT(cfg).to(dtype=getattr(torch, dtype))


def new_flax_gpt(cfg: GPTConfig, dtype: str, seed: int):
    """On JAX's CPU device, like the torch twin here: training parity rows are CPU rows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.gpt import GPT

    with jax.default_device(h.jax_devices()["cpu"]):
        return GPT(cfg, param_dtype=getattr(jnp, dtype), rngs=nnx.Rngs(seed))


def place(torch_model, flax_model, torch_device: str = "cpu", jax_device=None):
    """Move a pair built on the CPUs to the given devices (jax_device None: stays on JAX's CPU);
    returns the pair. The Trainers then keep their state and batches where the model is."""
    import jax
    from flax import nnx

    torch_model.to(torch_device)
    if jax_device is not None:
        nnx.update(flax_model, jax.device_put(nnx.state(flax_model), jax_device))
    return torch_model, flax_model


def _jax_name(jax_device) -> str:
    return "cpu" if jax_device is None else jax_device.platform


def converted_pair(cfg, dtype: str, direction: str, seed: int = 0):
    """(torch model, flax model) with the same weights, moved in ``direction``."""
    if isinstance(cfg, BlockConfig):
        t = h.new_torch_block(cfg, dtype, "cpu", seed)
        j = h.new_flax_block(cfg, dtype, h.jax_devices()["cpu"], seed + 100)
    else:
        t, j = new_torch_gpt(cfg, dtype, seed), new_flax_gpt(cfg, dtype, seed + 100)
    if direction == "torch->jax":
        wc.torch_to_flax(t, j)
    else:
        wc.flax_to_torch(j, t)
    return t, j


# ------------------------------------------------------------------------------------------- grads


def _torch_grads(model, inputs: np.ndarray, cotangent_or_targets: np.ndarray, is_gpt: bool, loss_chunk: int = 0):
    """Every parameter's gradient (a block's: and the input's) by torch key; a GPT's also its loss
    (key "loss"), with the cross-entropy over ``loss_chunk`` positions at a time when > 0."""
    from torch_impl.gpt import model_loss
    from weight_conversion.torch_side import numpy_to_tensor, tensor_to_numpy

    model.eval()
    model.zero_grad(set_to_none=True)
    x = numpy_to_tensor(inputs)
    if is_gpt:
        loss = model_loss(model, x, numpy_to_tensor(cotangent_or_targets), loss_chunk=loss_chunk)  # + router losses
    else:
        x.requires_grad_(True)
        loss = (model(x) * numpy_to_tensor(cotangent_or_targets)).sum()
    loss.backward()
    grads = {k: tensor_to_numpy(p.grad) for k, p in model.named_parameters()}
    if not is_gpt:
        grads["input"] = tensor_to_numpy(x.grad)
    else:
        grads["loss"] = tensor_to_numpy(loss.detach())
    return grads


def _flax_grads(model, inputs: np.ndarray, cotangent_or_targets: np.ndarray, is_gpt: bool, loss_chunk: int = 0):
    """The twin of _torch_grads, in torch layout by torch key."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.gpt import model_loss
    from weight_conversion.flax_side import flax_path

    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, other = jnp.asarray(inputs), jnp.asarray(cotangent_or_targets)

    def loss_of(p, x):
        m = nnx.merge(graphdef, p, rest)
        return model_loss(m, x, other, loss_chunk) if is_gpt else (m(x) * other).sum()

    if is_gpt:
        loss, g_params = jax.jit(jax.value_and_grad(loss_of))(params, x)
        g_x = None
    else:
        g_params, g_x = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(params, x)
    by_path = {spec.flax_path: spec for spec in table_for(model.cfg)}
    grads = {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(g_params):
        spec = by_path[flax_path(kp)]
        grads[spec.torch_key] = spec.transform.to_torch(np.asarray(leaf))
    if g_x is not None:
        grads["input"] = np.asarray(g_x)
    else:
        grads["loss"] = np.asarray(loss)
    return grads


def grad_check(
    model: str, dtype: str, direction: str, seed: int = 0, gpt_cfg: GPTConfig = SMALL_GPT, loss_chunk: int = 0
) -> Result:
    """Every parameter gradient (and, for the block, the input gradient) of both twins; a GPT's
    loss includes an MoE's router losses (``model_loss``), its cross-entropy over ``loss_chunk``
    positions at a time when > 0."""
    import jax

    is_gpt = model == "gpt"
    cfg = gpt_cfg if is_gpt else BlockConfig.lesson(4)
    with matched_precision(x64=dtype == "float64"):
        t, j = converted_pair(cfg, dtype, direction, seed)
        if is_gpt:
            inputs, other = token_batch(cfg, 4, cfg.block_size, seed, 0)
            j_inputs, j_other = inputs.astype(np.int32), other.astype(np.int32)
        else:
            inputs = h.make_input(h.LESSON_SHAPE, dtype, seed)
            other = h.make_input(h.LESSON_SHAPE, dtype, seed + 1)  # a fixed cotangent
            j_inputs, j_other = inputs, other
        g_t = _torch_grads(t, inputs, other, is_gpt, loss_chunk)
        with jax.default_device(h.jax_devices()["cpu"]):
            g_j = _flax_grads(j, j_inputs, j_other, is_gpt, loss_chunk)
    ref, got = (g_t, g_j) if direction == "torch->jax" else (g_j, g_t)
    tol = tolerance_for(dtype)
    order = (["input"] if "input" in ref else []) + [s.torch_key for s in table_for(cfg)]
    worst, peak = 0.0, 0.0
    for key in order:
        a, b = ref[key].astype(np.float64), got[key].astype(np.float64)
        worst, peak = _worse(worst, float(np.max(np.abs(a - b)))), max(peak, float(np.max(np.abs(a))))
    first, detail = worst_offender({k: ref[k] for k in order}, {k: got[k] for k in order}, tol.bound)
    worst_rel = worst / peak if peak else float(worst != 0)  # against the largest gradient
    shape = list(h.LESSON_SHAPE) if not is_gpt else [4, cfg.block_size]
    return Result(
        "grad", shape, dtype, "cpu", "cpu", direction, worst, worst_rel, tol.atol or 0.0,
        first is None, first, detail, config={"model": model, **dataclasses.asdict(cfg)},
    )  # fmt: skip


def loss_chunk_check(framework: str, dtype: str, chunk: int, seed: int = 0, gpt_cfg: GPTConfig = SMALL_GPT) -> Result:
    """One twin's loss and every parameter gradient with the cross-entropy over ``chunk`` positions
    at a time (gpt.chunked_loss_fn) against the same twin's loss over the whole logits: the same
    weights and batch (4 x block_size positions), the dtype's tolerance. Chunking changes only the
    order of the sums (the loss's over positions, the head's gradient over chunks)."""
    import jax

    B, T = 4, gpt_cfg.block_size
    with matched_precision(x64=dtype == "float64"):
        t, j = converted_pair(gpt_cfg, dtype, "torch->jax", seed)
        inputs, targets = token_batch(gpt_cfg, B, T, seed, 0)
        if framework == "torch":
            whole, chunked = (_torch_grads(t, inputs, targets, True, c) for c in (0, chunk))
        else:
            with jax.default_device(h.jax_devices()["cpu"]):
                ids, labels = inputs.astype(np.int32), targets.astype(np.int32)
                whole, chunked = (_flax_grads(j, ids, labels, True, c) for c in (0, chunk))
    tol = tolerance_for(dtype)
    order = ["loss"] + [s.torch_key for s in table_for(gpt_cfg)]
    worst = _worst(float(np.max(np.abs(whole[k].astype(np.float64) - chunked[k].astype(np.float64)))) for k in order)
    peak = max(float(np.max(np.abs(whole[k]))) for k in order)
    first, detail = worst_offender({k: whole[k] for k in order}, {k: chunked[k] for k in order}, tol.bound)
    return Result(
        "loss_chunk", [B, T], dtype, "cpu" if framework == "torch" else None, "cpu" if framework == "jax" else None,
        f"{framework}: chunks of {chunk} vs whole", worst, worst / peak if peak else float(worst != 0),
        tol.atol or 0.0, first is None, first, detail, config={"model": "gpt", **dataclasses.asdict(gpt_cfg)},
    )  # fmt: skip


# -------------------------------------------------------------------------------------- training


class _Run:
    """A Trainer fed the shared batches by step index."""

    def __init__(self, trainer, tcfg: TrainConfig):
        self.trainer, self.tcfg = trainer, tcfg

    def step(self, step: int) -> float:
        """Train on batch ``step``; the learning rate and Adam's bias correction follow the
        trainer's own step count, which a resume restores (a wrong one shows up as divergence)."""
        x, y = token_batch(self.trainer.model.cfg, self.tcfg.batch_size, self.tcfg.seq_len, self.tcfg.seed, step)
        return float(self.trainer.step(x, y)[0])

    def export(self):
        return self.trainer.state()

    def load(self, weights, optim, step):
        self.trainer.load(weights, optim, step)

    def __getattr__(self, name):  # optimizer, opt_state, model, ...
        return getattr(self.trainer, name)


def TorchRun(model, tcfg: TrainConfig) -> _Run:  # noqa: N802  (reads like the class it wraps)
    from torch_impl.train import Trainer

    return _Run(Trainer(model, tcfg), tcfg)


def FlaxRun(model, tcfg: TrainConfig) -> _Run:  # noqa: N802
    from jax_impl.train import Trainer

    return _Run(Trainer(model, tcfg), tcfg)


def _run(framework: str, model, tcfg):
    return TorchRun(model, tcfg) if framework == "torch" else FlaxRun(model, tcfg)


def _worse(a: float, b: float) -> float:
    """max() that keeps NaN (Python's max drops a NaN that is not its first argument)."""
    return a if a != a else b if b != b else max(a, b)


def _worst(values) -> float:
    worst = 0.0
    for v in values:
        worst = _worse(worst, v)
    return worst


def uniform_ratio(ref: dict, got: dict, bound) -> float | None:
    """c if ``got`` is ``c * ref`` for every array (each within ``bound`` once scaled) while ``ref``
    itself is not within it, else None. A data-parallel gradient summed instead of averaged, or a
    loss scaled twice, multiplies every gradient by one factor: blaming one key would mislead."""
    a = np.concatenate([np.asarray(v, np.float64).ravel() for v in ref.values()])
    b = np.concatenate([np.asarray(got[k], np.float64).ravel() for k in ref])
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or not np.any(a):
        return None
    c = float(a @ b / (a @ a))  # least squares
    scaled_ok = all(np.max(np.abs(c * np.asarray(v, np.float64) - np.asarray(got[k], np.float64)), initial=0.0)
                    <= bound(np.asarray(v, np.float64)) for k, v in ref.items())  # fmt: skip
    unscaled_ok = all(np.max(np.abs(np.asarray(v, np.float64) - np.asarray(got[k], np.float64)), initial=0.0)
                      <= bound(np.asarray(v, np.float64)) for k, v in ref.items())  # fmt: skip
    return c if scaled_ok and not unscaled_ok else None


def worst_offender(ref: dict, got: dict, bound) -> tuple[str | None, str | None]:
    """(name, detail) of the parameter to blame, or (None, None) if every one is within its bound.

    The rule: among the arrays whose max abs error exceeds ``bound(reference)``, the one with the
    largest relative error max|a - b| / max|a|. A bug in one parameter (its conversion, its optimizer
    state) reaches every gradient and every later update, so the first key over its bound in table
    order (the embedding, the input) is rarely where the cause is; the largest relative error is."""
    ratio = uniform_ratio(ref, got, bound)
    if ratio is not None:  # one cause scaled everything (a gradient averaged over the wrong count)
        return "all parameters", f"all parameters x{ratio:.3g} (every array within its bound once scaled)"
    name, rel_worst, detail = None, -1.0, None
    for key, a in ref.items():
        a, b = a.astype(np.float64), got[key].astype(np.float64)
        err = float(np.max(np.abs(a - b)))
        if err <= bound(a):
            continue
        peak = float(np.max(np.abs(a)))
        rel = err / peak if peak else float("inf")
        rel = float("inf") if rel != rel else rel  # NaN: the worst there is
        if rel > rel_worst:
            name, rel_worst = key, rel
            detail = f"{key}: {err:.2e} > {bound(a):.1e}, relative {rel:.1e} (largest relative error)"
    return name, detail


def _compare_weights(a: dict, b: dict, bound: float = TRAIN_TOLERANCE) -> tuple[float, str | None, str | None]:
    """(max abs error, parameter to blame, detail) over every parameter but the output-invariant."""
    keys = [k for k in a if not k.endswith(OUTPUT_INVARIANT_SUFFIXES)]
    worst = _worst(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in keys)
    first, detail = worst_offender({k: a[k] for k in keys}, {k: b[k] for k in keys}, lambda _: bound)
    return worst, first, detail


def trajectory_check(
    direction: str, tcfg: TrainConfig = TRAJECTORY, seed: int = 0, torch_device: str = "cpu", jax_device=None,
    cfg: GPTConfig = SMALL_GPT, weight_tolerance: float = TRAIN_TOLERANCE,
) -> tuple[Result, dict]:  # fmt: skip
    """Both twins train ``tcfg.steps`` steps from one converted init: per-step loss relative
    difference within TRAIN_TOLERANCE, final parameters within ``weight_tolerance`` (TRAIN_TOLERANCE
    unless a caller gives a measured reason for another)."""
    with matched_precision():
        t, j = place(*converted_pair(cfg, "float32", direction, seed), torch_device, jax_device)
        runs = {"torch": TorchRun(t, tcfg), "jax": FlaxRun(j, tcfg)}
        losses = {name: [run.step(s) for s in range(tcfg.steps)] for name, run in runs.items()}
        weights = {name: run.export()[0] for name, run in runs.items()}
    ref_name, other = ("torch", "jax") if direction == "torch->jax" else ("jax", "torch")
    rel = [abs(a - b) / abs(a) for a, b in zip(losses[ref_name], losses[other])]  # NaN stays NaN
    w_err, w_first, w_detail = _compare_weights(weights[ref_name], weights[other], weight_tolerance)
    bad_step = next((s for s, r in enumerate(rel) if not r <= TRAIN_TOLERANCE), None)
    first = f"loss at step {bad_step}" if bad_step is not None else w_first
    detail = f"loss at step {bad_step}: relative {rel[bad_step]:.1e}" if bad_step is not None else w_detail
    result = Result(
        "train_step", [tcfg.batch_size, tcfg.seq_len], "float32", torch_device, _jax_name(jax_device), direction,
        w_err, _worst(rel), weight_tolerance, first is None, first, detail,
        config={"model": "gpt", "steps": tcfg.steps, **dataclasses.asdict(cfg)},
    )  # fmt: skip
    return result, losses


def resume_check(
    first: str, tcfg: TrainConfig = TRAJECTORY, seed: int = 0, path: str | None = None,
    torch_device: str = "cpu", jax_device=None, cfg: GPTConfig = SMALL_GPT, weight_tolerance: float = TRAIN_TOLERANCE,
) -> Result:  # fmt: skip
    """Train half the steps in ``first``, save weights + AdamW state to one safetensors file, resume
    in the other framework for the rest; compare with an uninterrupted run in the second one: losses
    within TRAIN_TOLERANCE, final parameters within ``weight_tolerance`` (as trajectory_check's)."""
    import os
    import tempfile

    from weight_conversion.checkpoint import load_checkpoint, save_checkpoint

    second = "jax" if first == "torch" else "torch"
    half = tcfg.steps // 2
    direction = f"{first}->{second}"
    with matched_precision(), tempfile.TemporaryDirectory() as tmp:
        t, j = place(*converted_pair(cfg, "float32", "torch->jax", seed), torch_device, jax_device)
        t2, j2 = place(*converted_pair(cfg, "float32", "torch->jax", seed), torch_device, jax_device)
        a = _run(first, t if first == "torch" else j, tcfg)
        for s in range(half):
            a.step(s)
        ckpt = path or os.path.join(tmp, "resume.safetensors")
        weights, optim, saved_step = a.export()
        save_checkpoint(ckpt, cfg, weights, optim, saved_step, {"framework": first})
        b = _run(second, t2 if second == "torch" else j2, tcfg)
        weights, optim, meta = load_checkpoint(ckpt, cfg)
        b.load(weights, optim, meta["step"])
        resumed_step = int(b.export()[2])  # the schedule and Adam's bias correction count from here
        resumed_losses = [b.step(s) for s in range(half, tcfg.steps)]
        resumed = b.export()[0]
        tt, jj = place(*converted_pair(cfg, "float32", "torch->jax", seed), torch_device, jax_device)
        straight = _run(second, tt if second == "torch" else jj, tcfg)
        straight_losses = [straight.step(s) for s in range(tcfg.steps)][half:]
        uninterrupted = straight.export()[0]
    rel = _worst(abs(a_ - b_) / abs(a_) for a_, b_ in zip(straight_losses, resumed_losses))
    w_err, w_first, w_detail = _compare_weights(uninterrupted, resumed, weight_tolerance)
    passed = rel <= TRAIN_TOLERANCE and w_first is None and resumed_step == int(saved_step)
    first = None if passed else (w_first or "loss after resume")
    detail = None if passed else (w_detail or f"loss after resume: relative {rel:.1e}")
    if resumed_step != int(saved_step):  # the cause of every difference after it: named first
        first = "optimizer step count"
        detail = f"optimizer step count: {second} resumed at step {resumed_step}, the checkpoint was saved at {saved_step}"
    return Result(
        "resume", [tcfg.batch_size, tcfg.seq_len], "float32", torch_device, _jax_name(jax_device), direction,
        w_err, rel, weight_tolerance, passed, first, detail,
        config={"model": "gpt", "steps": tcfg.steps, "resumed_at": half, "resumed_step": resumed_step},
    )  # fmt: skip
