"""Training parity: gradients, AdamW trajectories, cross-framework resume, the sabotages those checks
must catch, the pinned optimizer defaults, GPT input validation and training checkpoints.

Everything runs on CPU with the harness's SMALL_GPT. Most of the time is XLA compiling the jitted
optax step: every FlaxRun jits a new function and compiles it twice (its first call gets
uncommitted arrays from tx.init/nnx.split, later calls the step's committed outputs), about 2.5 s
per compile on 2 cores. A persistent compilation cache in a temporary folder, for this module only,
lets identical steps (same HLO) be compiled once; see _fast_and_steady.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jax_impl.train as jt
import torch_impl.train as tt
import weight_conversion as wc
import weight_conversion.checkpoint as ckpt
import weight_conversion.optim_state as optim_state
from twin_parity import harness as h
from twin_parity.train_harness import (
    OUTPUT_INVARIANT_SUFFIXES,
    SMALL_GPT,
    TRAIN_TOLERANCE,
    TRAJECTORY,
    FlaxRun,
    TorchRun,
    converted_pair,
    grad_check,
    new_torch_gpt,
    resume_check,
    token_batch,
    trajectory_check,
)
from twin_common import BlockConfig
from twin_common.precision import matched_precision
from twin_common.train_config import TrainConfig
from weight_conversion.safetensors_io import CheckpointError
from twin_common.params import ParamSpec, table_for
from weight_conversion.torch_side import numpy_to_tensor, tensor_to_numpy
from weight_conversion.validate import ConversionError

@pytest.fixture(scope="module", autouse=True)
def _fast_and_steady(tmp_path_factory):
    """While this module runs: JAX's persistent compilation cache in a fresh folder, and one torch
    thread (these models are tiny; with two threads on a 2-core machine that is also running
    something else, 20 torch steps took 0.4 to 16 s instead of 0.05 s). Then as before."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = {
        name: getattr(jax.config, name)
        for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    cc.set_cache_dir(str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()  # the cache is set up once per process: make it look again
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()
    torch.set_num_threads(threads)


def _explain(r: h.Result) -> str:
    return (
        f"{r.check} {r.direction} {r.dtype} {r.config.get('model', '')}: max abs err "
        f"{r.max_abs_err:.3e}, max rel err {r.max_rel_err:.3e}, tolerance {r.tolerance:.1e}; "
        f"first divergence: {r.first_divergence}"
    )


@functools.lru_cache(maxsize=None)
def _trajectory(direction: str):
    """The unpatched trajectory_check, run once per direction and shared by the tests that read it."""
    return trajectory_check(direction)


# ------------------------------------------------------------------------------------ 1. gradients


@pytest.mark.parametrize("direction", h.DIRECTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model", ["block", "gpt"])
def test_gradients_match(model, dtype, direction):
    """Every parameter gradient (and the block's input gradient) within the dtype's tolerance."""
    r = grad_check(model, dtype, direction)
    assert r.passed, _explain(r)


# ----------------------------------------------------------------------------------- 2. trajectory


@pytest.mark.parametrize("direction", h.DIRECTIONS)
def test_adamw_trajectories_match(direction):
    """20 AdamW steps from one converted init: losses and final weights within TRAIN_TOLERANCE."""
    r, losses = _trajectory(direction)
    assert r.passed, _explain(r)
    rel = [abs(a - b) / abs(a) for a, b in zip(losses["torch"], losses["jax"])]
    assert len(rel) == TRAJECTORY.steps
    worst = int(np.argmax(rel))
    assert all(x <= TRAIN_TOLERANCE for x in rel), (
        f"per-step loss rel diff {rel[worst]:.3e} at step {worst} > {TRAIN_TOLERANCE:.0e}"
    )


@pytest.mark.parametrize("direction", h.DIRECTIONS)
def test_optimizer_moves_the_loss(direction):
    """Trained losses differ from the untrained model's losses on the same batches (batches differ
    per step, so "the loss changed" alone would hold even with lr = 0)."""
    _, losses = _trajectory(direction)
    with matched_precision():
        untrained, _ = converted_pair(SMALL_GPT, "float32", direction)
        fresh = []
        for s in range(TRAJECTORY.steps):
            x, y = token_batch(SMALL_GPT, TRAJECTORY.batch_size, TRAJECTORY.seq_len, TRAJECTORY.seed, s)
            fresh.append(float(tt.eval_loss(untrained, numpy_to_tensor(x), numpy_to_tensor(y))))
    for name in ("torch", "jax"):
        gaps = [abs(a - b) for a, b in zip(losses[name], fresh)]
        # step 0's loss is taken before the first update: it must be the untrained model's
        assert gaps[0] <= 1e-5, f"{name}: step-0 loss {losses[name][0]} is not the untrained {fresh[0]}"
        # measured 4.8e-2 (torch, step 13); an optimizer that does nothing gives ~0
        assert max(gaps) > 1e-2, f"{name}: the loss never moved more than {max(gaps):.2e} from untrained"


# --------------------------------------------------------------------------------------- 3. resume


@pytest.mark.parametrize("first", ["torch", "jax"])
def test_resume_in_the_other_framework(first):
    """Half the steps in one framework, checkpoint, the rest in the other = uninterrupted run."""
    r = resume_check(first)
    assert r.passed, _explain(r)


# ------------------------------------------------------------------------------------ 4. sabotage


def _swap_moments(arrays):
    other = {"exp_avg": "exp_avg_sq", "exp_avg_sq": "exp_avg"}
    out = {}
    for key, value in arrays.items():
        _, moment, rest = key.split(".", 2)
        out[f"optim.{other[moment]}.{rest}"] = value
    return out


@pytest.mark.parametrize("into", ["optax", "torch"])
def test_swapped_moments_on_import_fail_resume(monkeypatch, into):
    """exp_avg and exp_avg_sq swapped when the checkpoint is imported: resume parity must fail.
    (The import itself now refuses the negative second moments this makes; that check is bypassed
    here so the harness's own sensitivity is still tested.)"""
    monkeypatch.setattr(optim_state, "check_optim_arrays", lambda *args, **kwargs: None)
    if into == "optax":
        real = optim_state.import_optax_state
        patched = lambda cfg, state, arrays, step: real(cfg, state, _swap_moments(arrays), step)  # noqa: E731
        monkeypatch.setattr(optim_state, "import_optax_state", patched)
        r = resume_check("torch")
    else:
        real = optim_state.import_torch_optimizer
        patched = lambda model, opt, arrays, step: real(model, opt, _swap_moments(arrays), step)  # noqa: E731
        monkeypatch.setattr(optim_state, "import_torch_optimizer", patched)
        r = resume_check("jax")
    assert not r.passed and r.first_divergence is not None, f"swapped moments went unnoticed: {_explain(r)}"


def test_nan_divergence_shows_in_the_reported_errors(monkeypatch):
    """A resume that turns the weights to NaN must report a non-finite or over-tolerance error,
    not only passed=False (the report prints these numbers next to FAIL)."""
    monkeypatch.setattr(optim_state, "check_optim_arrays", lambda *args, **kwargs: None)  # see above
    real = optim_state.import_torch_optimizer
    patched = lambda model, opt, arrays, step: real(model, opt, _swap_moments(arrays), step)  # noqa: E731
    monkeypatch.setattr(optim_state, "import_torch_optimizer", patched)
    r = resume_check("jax")
    assert not r.passed
    assert not r.max_abs_err <= r.tolerance, f"NaN weights reported as max abs err {r.max_abs_err}"
    assert not r.max_rel_err <= r.tolerance, f"NaN losses reported as max rel err {r.max_rel_err}"


@pytest.mark.parametrize("first", ["torch", "jax"])
def test_resume_with_step_reset_fails(monkeypatch, first):
    """The checkpoint's step lost (resumed at 0): Adam's bias correction restarts, parity must fail."""
    real = ckpt.load_checkpoint

    def load_at_step_zero(path, cfg):
        weights, optim, meta = real(path, cfg)
        assert meta["step"] == TRAJECTORY.steps // 2  # the sabotage changes something
        return weights, optim, {**meta, "step": 0}

    monkeypatch.setattr(ckpt, "load_checkpoint", load_at_step_zero)
    r = resume_check(first)
    assert not r.passed, f"a resume at step 0 went unnoticed: {_explain(r)}"


def test_optax_default_weight_decay_fails_trajectory(monkeypatch):
    """optax.adamw's own weight_decay (1e-4) on the JAX side only, instead of TrainConfig's 0.1."""
    optax_default = inspect.signature(optax.adamw).parameters["weight_decay"].default
    assert optax_default == 1e-4 and optax_default != TRAJECTORY.weight_decay
    real = jt.make_optimizer

    def make_optimizer(model, tcfg):  # the JAX side only: torch still gets TrainConfig's value
        return real(model, dataclasses.replace(tcfg, weight_decay=optax_default))

    monkeypatch.setattr(jt, "make_optimizer", make_optimizer)
    r, _ = trajectory_check("torch->jax")
    assert not r.passed, f"optax's default weight decay went unnoticed: {_explain(r)}"


def test_optax_own_clipping_is_below_the_tolerance(monkeypatch):
    """optax.clip_by_global_norm (max_norm / norm) instead of torch's max_norm / (norm + 1e-6): too
    small for the trajectory check to see, so this documents its size rather than expecting failure.

    Measured on a 2-core CPU with TRAJECTORY (clipping active at steps 0-4, grad norms 1.13-1.56):
    per-step JAX losses with either clip are bit-identical (rel diff 0.0); final weights differ by at
    most 1.2e-7 (k_proj.bias aside: 6.8e-6, output-invariant noise); against torch the check's
    max abs err is 7.16e-7 with optax's clip vs 7.21e-7 with the torch-style clip, and its per-step
    loss rel err 2.3e-7 with either. With grad_clip=0.1
    (clipped every step) the loss diff is 1.1e-7 relative. All well under TRAIN_TOLERANCE = 1e-5:
    Adam divides the update by the RMS of the gradients, so a 1e-6 relative change in one step's
    scale almost cancels. If this test fails, the difference grew: make it a failing sabotage.
    """
    with matched_precision():  # clipping must actually fire, or this measures nothing
        t, _ = converted_pair(SMALL_GPT, "float32", "torch->jax")
        opt = tt.make_optimizer(t.train(), TRAJECTORY)
        x, y = token_batch(SMALL_GPT, TRAJECTORY.batch_size, TRAJECTORY.seq_len, TRAJECTORY.seed, 0)
        _, norm = tt.train_step(t, opt, numpy_to_tensor(x), numpy_to_tensor(y), TRAJECTORY, 0)
    assert float(norm) > TRAJECTORY.grad_clip, f"step-0 grad norm {float(norm):.3f} is not clipped"

    _, base_losses = _trajectory("torch->jax")  # before the patch
    monkeypatch.setattr(jt, "clip_by_global_norm_like_torch", optax.clip_by_global_norm)
    r, losses = trajectory_check("torch->jax")
    jax_vs_jax = max(abs(a - b) / abs(a) for a, b in zip(base_losses["jax"], losses["jax"]))
    assert jax_vs_jax < TRAIN_TOLERANCE / 10, f"optax's clip moved the JAX losses by {jax_vs_jax:.3e}"
    assert r.passed, f"optax's clip is now visible to the trajectory check: {_explain(r)}"


class _DecayEverything(ParamSpec):
    @property
    def decay(self) -> bool:
        return True


def test_optax_without_decay_mask_fails_trajectory(monkeypatch):
    """optax.adamw decaying biases and LayerNorm parameters too (no mask): parity must fail."""
    real = jt.table_for
    monkeypatch.setattr(
        jt, "table_for",
        lambda cfg: tuple(_DecayEverything(**dataclasses.asdict(s)) for s in real(cfg)),
    )  # fmt: skip
    r, _ = trajectory_check("torch->jax")
    assert not r.passed, f"decaying biases and LayerNorm went unnoticed: {_explain(r)}"


# ---------------------------------------------------------------------------- 5. key-bias claim


def test_key_bias_changes_no_output_but_query_bias_does():
    """The claim behind OUTPUT_INVARIANT_SUFFIXES: b_k adds q . b_k to a whole score row, which
    softmax ignores; b_q perturbed the same way must change the output (the control)."""
    assert OUTPUT_INVARIANT_SUFFIXES == ("attn.k_proj.bias",)
    cfg = BlockConfig.lesson(4)
    x = h.make_input(h.LESSON_SHAPE, "float32", 0)
    v = (10.0 * np.random.default_rng(7).standard_normal(cfg.d_model)).astype(np.float32)  # 500x init std
    change = {}
    with matched_precision():
        t, j = converted_pair(cfg, "float32", "torch->jax")
        before_t, before_j = t(torch.from_numpy(x)).detach().numpy(), np.asarray(j(jnp.asarray(x)))
        for name in ("k_proj", "q_proj"):
            t_bias, j_bias = getattr(t.attn, name).bias, getattr(j.attn, name).bias
            saved_t, saved_j = t_bias.detach().clone(), j_bias.get_value()
            with torch.no_grad():
                t_bias.add_(torch.from_numpy(v))
            j_bias.set_value(saved_j + v)
            after_t, after_j = t(torch.from_numpy(x)).detach().numpy(), np.asarray(j(jnp.asarray(x)))
            change[name, "torch"] = float(np.max(np.abs(after_t - before_t)))
            change[name, "jax"] = float(np.max(np.abs(after_j - before_j)))
            with torch.no_grad():  # back to the unperturbed block for the next bias
                t_bias.copy_(saved_t)
            j_bias.set_value(saved_j)
    for twin in ("torch", "jax"):  # measured 2.4e-7 (k) and 0.25 (q) in both
        k, q = change["k_proj", twin], change["q_proj", twin]
        assert k < 1e-5, f"{twin}: the key bias moved the block's output by {k:.3e}"
        assert q > 1e-3, f"{twin}: the query bias (the control) moved it only {q:.3e}"


# --------------------------------------------------------------------------- 6. pinned defaults


PINNED = TrainConfig(steps=12, warmup_steps=4, lr=2e-3, min_lr=1e-4, beta1=0.8, beta2=0.9, eps=1e-7,
                     weight_decay=0.05, batch_size=2, seq_len=8)  # fmt: skip  every value a non-default


def test_torch_param_groups_follow_the_table():
    """Exactly the table's decay params (ndim >= 2) decay at TrainConfig.weight_decay, the rest at 0;
    betas and eps are TrainConfig's."""
    t, _ = converted_pair(SMALL_GPT, "float32", "torch->jax")
    opt = tt.make_optimizer(t, PINNED)
    name_of = {id(p): k for k, p in t.named_parameters()}
    by_decay: dict[float, list[str]] = {}
    for group in opt.param_groups:
        assert group["betas"] == (PINNED.beta1, PINNED.beta2), f"betas {group['betas']}"
        assert group["eps"] == PINNED.eps, f"eps {group['eps']}"
        by_decay.setdefault(group["weight_decay"], []).extend(name_of[id(p)] for p in group["params"])
    assert set(by_decay) == {PINNED.weight_decay, 0.0}, f"weight decays in use: {sorted(by_decay)}"
    table = table_for(SMALL_GPT)
    decayed, plain = by_decay[PINNED.weight_decay], by_decay[0.0]
    assert sorted(decayed + plain) == sorted(s.torch_key for s in table), "every parameter exactly once"
    assert set(decayed) == {s.torch_key for s in table if s.decay}
    assert set(decayed) == {k for k, p in t.named_parameters() if p.ndim >= 2}
    assert "wte.weight" in decayed and "ln_f.weight" in plain and "blocks.0.attn.q_proj.bias" in plain


def test_optax_count_advances_one_per_step():
    """Every optax count (Adam's and the schedule's) reads the number of steps taken."""
    with matched_precision():
        _, j = converted_pair(SMALL_GPT, "float32", "torch->jax")
        run = FlaxRun(j, TRAJECTORY)  # the trajectory's step: compiled already
        for s in range(3):
            counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(run.opt_state, "count")]
            assert len(counts) >= 2 and set(counts) == {s}, f"before step {s}: counts {counts}"
            run.step(s)
        counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(run.opt_state, "count")]
        assert set(counts) == {3}, f"after 3 steps: counts {counts}"


def test_lr_schedule_shape():
    """Linear warmup to lr at the end of warmup, cosine down to min_lr at ``steps``."""
    c = PINNED
    warm = [c.lr_at(s) for s in range(c.warmup_steps)]
    assert warm[0] == pytest.approx(c.lr / c.warmup_steps, rel=1e-12)
    steps = np.diff(warm)
    assert np.allclose(steps, c.lr / c.warmup_steps, rtol=1e-12), f"warmup not linear: {warm}"
    assert c.lr_at(c.warmup_steps - 1) == pytest.approx(c.lr, rel=1e-12)
    assert max(c.lr_table()) == pytest.approx(c.lr, rel=1e-12)
    decay = [c.lr_at(s) for s in range(c.warmup_steps, c.steps + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:])), f"not decaying after warmup: {decay}"
    assert c.lr_at(c.steps) == pytest.approx(c.min_lr, rel=1e-12)
    assert min(c.lr_table()) > c.min_lr  # the last step still sits just above the floor
    assert c.lr_table() == [c.lr_at(s) for s in range(c.steps)]


def test_torch_lr_after_train_step_is_lr_at():
    """train_step(step=s) leaves every param group's lr at lr_at(s)."""
    with matched_precision():
        t, _ = converted_pair(SMALL_GPT, "float32", "torch->jax")
        run = TorchRun(t, PINNED)
        for s in range(PINNED.warmup_steps + 2):  # across the warmup / cosine boundary
            run.step(s)
            lrs = {g["lr"] for g in run.optimizer.param_groups}
            assert lrs == {PINNED.lr_at(s)}, f"step {s}: param group lr {lrs}, lr_at {PINNED.lr_at(s)}"


# -------------------------------------------------------------------------- 7. input validation


BAD_TOKENS = {
    "rank 1": (np.zeros(8, np.int64), "expected token ids of shape (batch, seq), got rank 1 shape (8,)"),
    "float ids": (np.zeros((2, 8), np.float32), "token ids must be integers, got dtype float32"),
    "too long": (np.zeros((2, 17), np.int64), "sequence length 17 exceeds the configured block_size=16"),
    "id = vocab_size": (np.array([[0, 5, 64]]), "token ids must be in [0, 64), got values in [0, 64]"),
    "negative id": (np.array([[3, -1, 7]]), "token ids must be in [0, 64), got values in [-1, 7]"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_tokens_get_the_same_value_error_on_both_gpts(case):
    """Same ValueError text from both GPTs. The id checks matter for JAX: its gather never raises
    (nnx.Embed's jnp.take gives NaN rows for id >= vocab_size and wraps a negative id to row
    vocab_size + id), where torch raises IndexError."""
    tokens, message = BAD_TOKENS[case]
    t, j = converted_pair(SMALL_GPT, "float32", "torch->jax")
    j_tokens = tokens.astype(np.int32) if tokens.dtype.kind == "i" else tokens
    with pytest.raises(ValueError) as t_err:
        t(torch.from_numpy(tokens))
    with pytest.raises(ValueError) as j_err:
        j(jnp.asarray(j_tokens))
    assert str(t_err.value) == message
    assert str(j_err.value) == message


def test_jax_embedding_gather_does_not_raise_on_bad_ids():
    """Why the twins check ids: torch's embedding raises, JAX's silently returns NaN for
    id >= vocab_size and the last row for -1. The GPT's check cannot run under jit (ids are
    abstract there), so the jitted training step relies on the data being in range."""
    t, j = converted_pair(SMALL_GPT, "float32", "torch->jax")
    with pytest.raises(IndexError):
        t.wte(torch.tensor([[64]]))
    rows = np.asarray(j.wte(jnp.asarray([[64, -1]], jnp.int32)))[0]
    table = np.asarray(j.wte.embedding[...])
    assert np.isnan(rows[0]).all(), "id 64 should read as NaN (jnp.take's fill mode)"
    assert np.array_equal(rows[1], table[63]), "id -1 should wrap to the last row"


# ------------------------------------------------------------------------------- 8. checkpoints


def _write_checkpoint(path, cfg=SMALL_GPT, drop: str | None = None):
    t, _ = converted_pair(cfg, "float32", "torch->jax")
    run = TorchRun(t, PINNED)
    weights, optim, step = run.export()
    assert len(optim) == 2 * len(table_for(cfg))
    if drop is not None:
        del optim[drop]
    ckpt.save_checkpoint(path, cfg, weights, optim, step, {"framework": "torch"})


def test_checkpoint_from_another_config_is_refused(tmp_path):
    """A checkpoint of a 2-layer GPT loaded as a 3-layer one: ConversionError naming n_layers only."""
    path = tmp_path / "c.safetensors"
    _write_checkpoint(path)
    ckpt.load_checkpoint(path, SMALL_GPT)  # control: the right config loads
    with pytest.raises(ConversionError) as err:
        ckpt.load_checkpoint(path, dataclasses.replace(SMALL_GPT, n_layers=3))
    assert len(err.value.problems) == 1 and "'n_layers'" in err.value.problems[0], str(err.value)


def test_checkpoint_missing_an_optim_key_is_refused(tmp_path):
    """One second-moment array missing: ConversionError naming the moment and the parameter."""
    path = tmp_path / "c.safetensors"
    _write_checkpoint(path, drop="optim.exp_avg_sq.blocks.1.mlp.fc_out.bias")
    with pytest.raises(ConversionError) as err:
        ckpt.load_checkpoint(path, SMALL_GPT)
    assert len(err.value.problems) == 1, str(err.value)
    problem = err.value.problems[0]
    assert "exp_avg_sq" in problem and "'blocks.1.mlp.fc_out.bias'" in problem and "missing" in problem


def test_weights_file_is_not_a_training_checkpoint(tmp_path):
    """A file from weight_conversion.save (weights only, format "pt") is a CheckpointError."""
    path = tmp_path / "w.safetensors"
    t, _ = converted_pair(SMALL_GPT, "float32", "torch->jax")
    wc.save(t, path)
    assert wc.load(t, path)["format"] == "pt"  # control: it is a good weights file
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        ckpt.load_checkpoint(path, SMALL_GPT)


def test_untied_head_round_trips_and_matches():
    """tie_embeddings=False: torch -> flax -> torch is bit-exact, lm_head included, and both GPTs
    give the same logits within 1e-5."""
    cfg = dataclasses.replace(SMALL_GPT, tie_embeddings=False)
    t, j = converted_pair(cfg, "float32", "torch->jax")
    back = new_torch_gpt(cfg, "float32", seed=5)
    before = {k: tensor_to_numpy(v) for k, v in back.state_dict().items()}
    original = {k: tensor_to_numpy(v) for k, v in t.state_dict().items()}
    assert "lm_head.weight" in original
    assert not np.array_equal(before["lm_head.weight"], original["lm_head.weight"])  # a no-op can't pass
    assert not np.allclose(original["lm_head.weight"], original["wte.weight"])  # really untied
    wc.flax_to_torch(j, back)
    after = {k: tensor_to_numpy(v) for k, v in back.state_dict().items()}
    assert after.keys() == original.keys()
    for key in original:
        assert np.array_equal(after[key].view(np.uint32), original[key].view(np.uint32)), f"{key} changed"
    x, _ = token_batch(cfg, 2, cfg.block_size, 0, 0)
    with matched_precision():
        logits_t = t.eval()(torch.from_numpy(x)).detach().numpy()
        j.eval()
        logits_j = np.asarray(j(jnp.asarray(x, jnp.int32)))
    err = float(np.max(np.abs(logits_t - logits_j)))
    assert err <= 1e-5, f"untied-head logits differ by {err:.3e}"
    assert not math.isnan(err)
