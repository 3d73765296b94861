"""The pitfalls catalogue: numeric traps when porting between PyTorch and JAX/Flax, each with an
executable check that measures the trap's effect when it is ignored and the result with this
project's pin in place.

Every number comes from running code (``measure_all()``); nothing here is a stored constant. Unless
a check says otherwise it runs on the lesson block (``BlockConfig.lesson(4)``, input (5, 8, 128)),
float32, eval mode, torch twin built and perturbed by the harness and its weights moved into the
Flax twin by the converter, both run under ``matched_precision()``.

Anything a check changes (a module attribute, a twin's method, torch's RNG, a precision context)
is restored before it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from unittest import mock

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_common import BlockConfig
from twin_common.precision import matched_precision

CFG = BlockConfig.lesson(4)
FLOAT32_OUT = "max abs error of the block output (float32)"


@dataclasses.dataclass(frozen=True)
class Measurement:
    ignored: float | str  # e.g. max abs error of the block output, or "TypeError" for an exception
    pinned: float | str  # the same quantity with the project's pin
    quantity: str  # one short phrase: what the numbers are


@dataclasses.dataclass(frozen=True)
class Pitfall:
    id: str  # short slug, e.g. "layernorm-eps"
    title: str
    differs: str  # one sentence: what differs between the frameworks (with the default values)
    pinned_by: str  # one sentence: how this project pins it (names the file/function)
    check: Callable[[], Measurement]


# ------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _isolated(precision: bool = True):
    """torch's global RNG restored on exit (the harness seeds it), and matched precision."""
    import torch

    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
        if precision:
            stack.enter_context(matched_precision())
        yield


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _cpu():
    return h.jax_devices()["cpu"]


def _torch_block(cfg: BlockConfig = CFG, dtype: str = "float32"):
    return h.new_torch_block(cfg, dtype, "cpu", seed=0)


def _flax_block(cfg: BlockConfig = CFG, dtype: str = "float32", device=None):
    return h.new_flax_block(cfg, dtype, device or _cpu(), seed=100)  # overwritten by the converter


def _twin_error(
    cfg: BlockConfig = CFG,
    x: np.ndarray | None = None,
    build_flax: Callable | None = None,
    arrays: Callable[[dict], dict] | None = None,
    key: str = "out",
) -> float:
    """Max abs difference of intermediate ``key`` between the torch twin and the Flax twin that
    ``build_flax`` builds (default: the project's), given the torch twin's weights (edited by
    ``arrays`` if given), on ``x`` (default: the lesson input)."""
    x = h.make_input(h.LESSON_SHAPE, "float32") if x is None else x
    with _isolated():
        t = _torch_block(cfg)
        j = (build_flax or _flax_block)(cfg)
        weights = wc.export(t)
        wc.import_(j, arrays(dict(weights)) if arrays else weights)
        return _max_abs(h.run_torch(t, x, "cpu")[key], h.run_flax(j, x, _cpu())[key])


def _with_pinned_and_ignored(ignored_ctx: Callable[[], contextlib.AbstractContextManager], **kw):
    """(error with the trap in place, error with the project's pin) for the same twin pair."""
    with ignored_ctx():
        ignored = _twin_error(**kw)
    return ignored, _twin_error(**kw)


def flax_layer_norm(**overrides):
    """jax_impl.block.layer_norm with some of nnx.LayerNorm's own defaults let back in."""
    from flax import nnx

    def layer_norm(cfg, *, param_dtype, rngs):
        kwargs = dict(epsilon=cfg.ln_eps, use_fast_variance=False, use_bias=cfg.bias)
        kwargs.update(overrides)
        return nnx.LayerNorm(cfg.d_model, param_dtype=param_dtype, rngs=rngs, **kwargs)

    return layer_norm


# --------------------------------------------------------------------------------------- the checks


def check_layernorm_eps() -> Measurement:
    import jax_impl.block as jb

    nnx_default_eps = 1e-6  # nnx.LayerNorm's default epsilon
    ignored, pinned = _with_pinned_and_ignored(
        lambda: mock.patch.object(jb, "layer_norm", flax_layer_norm(epsilon=nnx_default_eps))
    )
    return Measurement(ignored, pinned, FLOAT32_OUT)


# The input's mean. E[x^2] - E[x]^2 loses about offset^2 * 2^-24 / var; but even the two-pass
# variance cannot beat the float32 rounding of x itself (about offset * 2^-24 / std in ln_1), so the
# twins' pinned difference grows with the offset too: measured in ln_1 (ignored, pinned) =
# (2.5e-4, 4.4e-6) at 30, (2.8e-3, 1.8e-5) at 100, (3.4e-2, 7.0e-5) at 300. 30 is the largest offset
# where the pinned twins stay inside the float32 tolerance (1e-5).
FAST_VARIANCE_OFFSET = 30.0


def check_layernorm_fast_variance() -> Measurement:
    import jax_impl.block as jb

    x = (FAST_VARIANCE_OFFSET + h.make_input(h.LESSON_SHAPE, "float64")).astype(np.float32)
    ignored, pinned = _with_pinned_and_ignored(
        lambda: mock.patch.object(jb, "layer_norm", flax_layer_norm(use_fast_variance=True)),
        x=x, key="ln_1",
    )  # ln_1, not out: out carries the offset, whose float32 ulp would set the error
    return Measurement(
        ignored, pinned,
        f"max abs error of ln_1 in the block (float32), input {FAST_VARIANCE_OFFSET:g} + N(0, 1)",
    )


def check_gelu_approximate() -> Measurement:
    import jax

    import jax_impl.block as jb

    pinned_init = jb.MLP.__init__

    def init_with_library_default(self, *args, **kwargs):
        pinned_init(self, *args, **kwargs)
        self.gelu = jax.nn.gelu  # approximate=True unless told otherwise

    ignored, pinned = _with_pinned_and_ignored(
        lambda: mock.patch.object(jb.MLP, "__init__", init_with_library_default)
    )
    return Measurement(ignored, pinned, FLOAT32_OUT)


SQUARE_WEIGHTS = tuple(f"attn.{p}_proj.weight" for p in ("q", "k", "v", "out"))


def check_linear_layout() -> Measurement:
    def copied_as_is(weights: dict) -> dict:
        # import_ transposes every Linear weight; transposing first lands the torch (out, in) array
        # in the (in, out) kernel untouched, i.e. a copy without the transpose
        for key in SQUARE_WEIGHTS:
            weights[key] = np.ascontiguousarray(weights[key].T)
        return weights

    ignored = _twin_error(arrays=copied_as_is)
    pinned = _twin_error()
    return Measurement(
        ignored, pinned,
        "max abs error of the block output (float32), the 4 square attention weights copied "
        "untransposed (the MLP's (512, 128) / (128, 512) ones would fail on shape)",
    )  # fmt: skip


def check_fused_qkv_split() -> Measurement:
    C = CFG.d_model

    def split(order: str) -> Callable[[dict], dict]:
        def load_from_fused(weights: dict) -> dict:
            # a GPT-2-style c_attn: q, k, v stacked into one (3C, C) weight and one (3C,) bias
            fused_w = np.concatenate([weights[f"attn.{p}_proj.weight"] for p in "qkv"], axis=0)
            fused_b = np.concatenate([weights[f"attn.{p}_proj.bias"] for p in "qkv"], axis=0)
            for i, p in enumerate(order):
                weights[f"attn.{p}_proj.weight"] = np.ascontiguousarray(fused_w[i * C : (i + 1) * C])
                weights[f"attn.{p}_proj.bias"] = np.ascontiguousarray(fused_b[i * C : (i + 1) * C])
            return weights

        return load_from_fused

    ignored = _twin_error(arrays=split("kqv"))  # chunk 0 (really q) read as k, chunk 1 as q
    pinned = _twin_error(arrays=split("qkv"))
    return Measurement(
        ignored, pinned, "max abs error of the block output (float32), q/k/v split from a fused (3C, C) weight"
    )


def check_attention_scale() -> Measurement:
    cfg = dataclasses.replace(CFG, attn_impl="math")
    wrong = 1.0 / math.sqrt(cfg.d_model)  # 1/sqrt(128) instead of 1/sqrt(d_head) = 1/sqrt(32)

    def flax_with_wrong_scale(cfg):
        model = _flax_block(cfg)
        model.attn.scale = wrong
        return model

    ignored = _twin_error(cfg, build_flax=flax_with_wrong_scale)
    pinned = _twin_error(cfg)
    return Measurement(ignored, pinned, "max abs error of the block output (float32, math attention path)")


def _causal_attention_f64(q, k, v) -> np.ndarray:
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(hs)
    scores = np.where(np.tri(T, dtype=bool), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


def check_bool_mask_meaning() -> Measurement:
    import torch
    import torch.nn.functional as F

    B, T, C = h.LESSON_SHAPE
    nh = CFG.n_heads
    shape = (B, nh, T, C // nh)
    q, k, v = (h.make_input(shape, "float32", seed) for seed in (1, 2, 3))
    truth = _causal_attention_f64(q, k, v)
    qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))
    mha_mask = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)  # nn.MultiheadAttention: True = masked
    with _isolated():
        wrong = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mha_mask).numpy()
        right = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).numpy()
    ignored = _max_abs(wrong, truth)  # NaN if a fully masked row came out NaN: kept, not hidden
    nan = " (NaN rows)" if np.isnan(wrong).any() else ""
    return Measurement(
        ignored, _max_abs(right, truth),
        f"max abs error of SDPA vs float64 causal attention, random (B, nh, T, hs) = {shape}, "
        f"float32{nan}",
    )


def check_softmax_dtype_bf16() -> Measurement:
    import torch

    B, T, C = h.LESSON_SHAPE
    nh, hs = CFG.n_heads, CFG.d_head
    x = h.make_input(h.LESSON_SHAPE, "bfloat16")
    with _isolated(), torch.no_grad():
        t = _torch_block(CFG, "bfloat16")
        attn = t.attn
        ln_1 = t.ln_1(torch.from_numpy(x.view(np.int16)).view(torch.bfloat16))
        q, k = (getattr(attn, f"{p}_proj")(ln_1).view(B, T, nh, hs).transpose(1, 2) for p in "qk")
        # the probabilities themselves: the project's math_attention with v = I returns them exactly
        eye = torch.eye(T, dtype=torch.bfloat16).expand(B, nh, T, T)
        pinned = attn.math_attention(q, k, eye)  # softmax in float32, rounded once to bfloat16
        scores = (q @ k.transpose(-2, -1)) * attn.scale  # bfloat16, as the twin computes them
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        e = torch.exp(scores - scores.amax(-1, keepdim=True))  # bfloat16 exp, sum and divide
        ignored = e / e.sum(-1, keepdim=True)
        truth = torch.softmax(scores.double(), -1)  # float64 softmax of the same bfloat16 scores
    return Measurement(
        _max_abs(ignored.double(), truth), _max_abs(pinned.double(), truth),
        "max abs error of the attention probabilities (bfloat16 block, torch math path) vs a float64 "
        "softmax of the same scores",
    )


def check_matmul_precision() -> Measurement:
    import jax
    import torch

    device = jax.devices()[0]  # the default backend: where JAX's default precision matters
    x = h.make_input(h.LESSON_SHAPE, "float32")

    def twin_error(jax_precision: str) -> float:
        with _isolated(precision=False), jax.default_matmul_precision(jax_precision):
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")
            try:
                t = _torch_block()
                j = _flax_block(device=device)
                wc.torch_to_flax(t, j)
                return _max_abs(h.run_torch(t, x, "cpu")["out"], h.run_flax(j, x, device)["out"])
            finally:
                torch.set_float32_matmul_precision(before)

    return Measurement(
        twin_error("default"), twin_error("highest"),
        f"max abs error of the block output (float32), JAX on {device.platform}, torch on cpu",
    )


def check_adamw_defaults() -> Measurement:
    import jax
    import optax
    import torch
    from flax import nnx

    from jax_impl.gpt import loss_fn as flax_loss
    from twin_parity import train_harness as th
    from torch_impl.gpt import loss_fn as torch_loss

    cfg, tcfg = th.SMALL_GPT, th.TRAJECTORY
    lr = tcfg.lr  # constant: only the optimizer defaults differ between the two sides
    with _isolated():
        t, j = th.converted_pair(cfg, "float32", "torch->jax")
        t.train()
        opt = torch.optim.AdamW(t.parameters(), lr=lr)  # library defaults: wd 1e-2, every param
        j.eval()  # no dropout in SMALL_GPT; eval keeps the RNG state untouched under jit
        graphdef, params, rest = nnx.split(j, nnx.Param, ...)
        tx = optax.adamw(lr)  # library defaults: wd 1e-4, every param (no mask)
        opt_state = tx.init(params)

        @jax.jit
        def flax_step(params, opt_state, x, y):
            loss_of = lambda p: flax_loss(nnx.merge(graphdef, p, rest)(x), y)  # noqa: E731
            grads = jax.grad(loss_of)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        for step in range(tcfg.steps):
            x, y = th.token_batch(cfg, tcfg.batch_size, tcfg.seq_len, tcfg.seed, step)
            opt.zero_grad(set_to_none=True)
            torch_loss(t(torch.from_numpy(x)), torch.from_numpy(y)).backward()
            opt.step()
            params, opt_state = flax_step(params, opt_state, x.astype(np.int32), y.astype(np.int32))
        nnx.update(j, params)
        ignored, _, _ = th._compare_weights(wc.export(t), wc.export(j))
    with _isolated(precision=False):
        pinned = th.trajectory_check("torch->jax", tcfg)[0].max_abs_err
    return Measurement(
        ignored, pinned,
        f"max abs parameter difference after {tcfg.steps} AdamW steps on SMALL_GPT (float32, "
        "attn.k_proj.bias excluded)",
    )


def check_dropout_rng() -> Measurement:
    cfg = dataclasses.replace(CFG, attn_dropout=0.1, resid_dropout=0.1)
    x = h.make_input(h.LESSON_SHAPE, "float32")

    def twin_error(train: bool) -> float:
        with _isolated():
            t = _torch_block(cfg)
            j = _flax_block(cfg)
            wc.torch_to_flax(t, j)
            if train:
                t.train()
                j.train()
            return _max_abs(h.run_torch(t, x, "cpu")["out"], h.run_flax(j, x, _cpu())["out"])

    return Measurement(
        twin_error(train=True), twin_error(train=False),
        "max abs error of the block output (float32), dropout 0.1, train mode vs eval mode",
    )


def check_bf16_numpy() -> Measurement:
    import torch

    from weight_conversion.torch_side import tensor_to_numpy

    with _isolated():
        params = dict(_torch_block(dtype="bfloat16").named_parameters())
    try:
        next(iter(params.values())).detach().numpy()
        raised = "no error"
    except TypeError:
        raised = "TypeError"
    detour_err = exact_err = 0.0
    changed = total = 0
    for p in params.values():
        exact = p.detach().to(torch.float64).numpy()  # every bfloat16 value is exact in float64
        detour = p.detach().to(torch.float16).numpy().astype(np.float64)
        pinned = tensor_to_numpy(p)
        if pinned.view(np.int16).tobytes() != p.detach().view(torch.int16).numpy().tobytes():
            exact_err = max(exact_err, np.finfo(np.float64).tiny)  # differing bits are never 0
        detour_err = max(detour_err, _max_abs(detour, exact))
        exact_err = max(exact_err, _max_abs(pinned.astype(np.float64), exact))
        changed += int(np.sum(detour != exact))
        total += exact.size
    return Measurement(
        detour_err, exact_err,
        f"max abs error of the block's bfloat16 weights after a float16 detour ({changed} of "
        f"{total} values changed; .numpy() itself: {raised})",
    )


def check_init_schemes() -> Measurement:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import jax_impl.block as jb
    import torch_impl.block as tb

    d = CFG.d_model
    with _isolated(precision=False):
        torch.manual_seed(0)
        torch_default = torch.nn.Linear(d, d).weight.detach().numpy().std()
        flax_default = np.asarray(nnx.Linear(d, d, rngs=nnx.Rngs(0)).kernel[...]).std()
        torch.manual_seed(0)
        t = tb.Block(CFG)
        j = jb.Block(CFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    # every Linear weight of the freshly initialised block (not the harness's perturbed one)
    mats = [s.torch_key for s in wc.block_table(CFG) if len(s.torch_shape) == 2]
    state, flax_w = t.state_dict(), wc.export(j)
    torch_pinned = np.concatenate([state[k].numpy().ravel() for k in mats]).std()
    flax_pinned = np.concatenate([flax_w[k].ravel() for k in mats]).std()
    return Measurement(
        abs(float(torch_default / flax_default) - 1.0), abs(float(torch_pinned / flax_pinned) - 1.0),
        f"|std ratio - 1| of Linear weights, torch vs Flax (defaults: one {d}->{d} layer, "
        f"std {torch_default:.4f} vs {flax_default:.4f}; pinned: the block's 6 weight matrices)",
    )  # fmt: skip


def check_flax_variable_api() -> Measurement:
    import jax.numpy as jnp
    from flax import nnx

    var = nnx.Param(jnp.zeros(3))

    def warning_from(access: Callable[[], object]) -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            access()
        names = sorted({w.category.__name__ for w in caught})
        return ", ".join(names) if names else "no warning"

    return Measurement(
        warning_from(lambda: var.value),
        warning_from(lambda: (var[...], var.get_value())),
        "warning raised on reading an nnx.Param (installed flax)",
    )


def check_embed_dtype() -> Measurement:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.gpt import GPT
    from twin_parity.train_harness import SMALL_GPT

    def to_bf16(model):
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
        return model

    idx = jnp.zeros((1, 4), jnp.int32)
    embed = to_bf16(nnx.Embed(8, 4, rngs=nnx.Rngs(0)))  # built float32, then cast
    gpt = to_bf16(GPT(SMALL_GPT, rngs=nnx.Rngs(0)))
    _, inter = gpt(idx, return_intermediates=True)
    return Measurement(
        jnp.dtype(embed(idx).dtype).name,
        jnp.dtype(inter["embed"].dtype).name,
        "dtype of the embedding output after the parameters are cast to bfloat16",
    )


PITFALLS: tuple[Pitfall, ...] = (
    Pitfall(
        "layernorm-eps", "LayerNorm epsilon",
        "torch nn.LayerNorm adds eps = 1e-5 to the variance, Flax nnx.LayerNorm eps = 1e-6.",
        "BlockConfig.ln_eps = 1e-5 (twin_common/config.py) is passed to both twins' layer_norm() "
        "in torch_impl/block.py and jax_impl/block.py.",
        check_layernorm_eps,
    ),
    Pitfall(
        "layernorm-fast-variance", "LayerNorm fast variance",
        "nnx.LayerNorm defaults to use_fast_variance=True, E[x^2] - E[x]^2, which cancels "
        "catastrophically for inputs with a large mean; torch computes the two-pass E[(x - mean)^2].",
        "jax_impl/block.py layer_norm() passes use_fast_variance=False.",
        check_layernorm_fast_variance,
    ),
    Pitfall(
        "gelu-approximate", "GELU approximation",
        "jax.nn.gelu defaults to approximate=True (tanh), torch nn.GELU to approximate='none' (exact erf).",
        "BlockConfig.gelu_approximate = 'none' feeds nn.GELU(approximate=...) in torch_impl/block.py "
        "and, in jax_impl/block.py, exact_gelu (torch's erf formula) or jax.nn.gelu(approximate=True).",
        check_gelu_approximate,
    ),
    Pitfall(
        "linear-layout", "Linear weight layout",
        "torch nn.Linear stores weight as (out, in) and computes x @ W.T; Flax nnx.Linear stores "
        "kernel as (in, out) and computes x @ K, so a square weight copied as is loads without error.",
        "The conversion table (twin_common/params.py) marks every Linear weight Transform.TRANSPOSE.",
        check_linear_layout,
    ),
    Pitfall(
        "fused-qkv-split", "Fused QKV split order",
        "Checkpoints such as GPT-2's c_attn store q, k, v stacked in one (3C, C) weight; splitting "
        "it in another order (e.g. k, q, v) loads without error and computes wrong attention.",
        "Both twins keep separate q_proj/k_proj/v_proj, and the table in twin_common/params.py "
        "names each by key, so no split order is inferred.",
        check_fused_qkv_split,
    ),
    Pitfall(
        "attention-scale", "Attention score scale",
        "Scores must be scaled by 1/sqrt(d_head); 1/sqrt(d_model) (or no scale) is a common porting "
        "slip, and SDPA/dot_product_attention each apply their own default when none is given.",
        "CausalSelfAttention.scale = 1/sqrt(d_head) in both torch_impl/block.py and "
        "jax_impl/block.py, passed explicitly to every attention path.",
        check_attention_scale,
    ),
    Pitfall(
        "bool-mask-meaning", "Boolean attention mask meaning",
        "nn.MultiheadAttention's boolean attn_mask means True = masked out, "
        "F.scaled_dot_product_attention's means True = may attend.",
        "torch_impl/block.py calls SDPA with is_causal=True and no mask; the math paths build "
        "tril(...) with True = may attend in both twins.",
        check_bool_mask_meaning,
    ),
    Pitfall(
        "softmax-dtype-bf16", "Softmax dtype under bfloat16",
        "A softmax written out (exp, sum, divide) on bfloat16 scores rounds to bfloat16 at every "
        "step, while fused kernels and torch.softmax compute in float32 inside.",
        "math_attention() in torch_impl/block.py and jax_impl/block.py upcasts scores to at least "
        "float32 before the softmax.",
        check_softmax_dtype_bf16,
    ),
    Pitfall(
        "matmul-precision", "float32 matmul precision",
        "JAX's default float32 matmul precision is TF32 on Ampere/Hopper GPUs and bfloat16 passes "
        "on TPU, while torch keeps float32 matmuls in full float32 by default.",
        "twin_common/precision.py matched_precision() sets 'highest' in both frameworks around "
        "every parity check.",
        check_matmul_precision,
    ),
    Pitfall(
        "adamw-defaults", "AdamW defaults",
        "torch.optim.AdamW defaults to weight_decay=1e-2, optax.adamw to 1e-4, and optax decays "
        "every parameter unless given a mask.",
        "twin_common/train_config.py TrainConfig pins every hyperparameter and the decay mask comes "
        "from ParamSpec.decay (twin_common/params.py) in both torch_impl/train.py and "
        "jax_impl/train.py.",
        check_adamw_defaults,
    ),
    Pitfall(
        "dropout-rng", "Dropout random streams",
        "torch and JAX draw dropout masks from unrelated RNGs (a global Philox/MT state vs explicit "
        "keys), so the two frameworks' train-mode outputs cannot be matched.",
        "Parity checks run both twins in eval mode (harness.new_torch_block/new_flax_block call "
        ".eval()); training parity uses dropout 0.",
        check_dropout_rng,
    ),
    Pitfall(
        "bf16-numpy", "bfloat16 to NumPy",
        "NumPy has no bfloat16: a torch bfloat16 tensor's .numpy() raises TypeError, and a detour "
        "through float16 rounds values outside float16's range (tiny ones into subnormals or to 0, "
        "huge ones to inf).",
        "weight_conversion/torch_side.py tensor_to_numpy() reinterprets the bits as "
        "ml_dtypes.bfloat16 via int16.",
        check_bf16_numpy,
    ),
    Pitfall(
        "init-schemes", "Default initialisation",
        "torch nn.Linear defaults to kaiming-uniform weights (std 1/sqrt(3 fan_in)) and uniform "
        "biases, Flax nnx.Linear to lecun-normal kernels (std 1/sqrt(fan_in)) and zero biases.",
        "linear() in torch_impl/block.py and jax_impl/block.py inits every weight normal(0, "
        "BlockConfig.init_std = 0.02) and every bias zero.",
        check_init_schemes,
    ),
    Pitfall(
        "flax-variable-api", "Flax NNX Variable access",
        "Flax NNX moved Variable access: .value emits a DeprecationWarning in flax 0.12.8; arrays "
        "are read with var[...] and values with get_value()/set_value().",
        "The project reads and writes parameters only with [...], get_value() and set_value() "
        "(e.g. harness.new_flax_block, weight_conversion/flax_side.py).",
        check_flax_variable_api,
    ),
    Pitfall(
        "embed-dtype", "nnx.Embed output dtype",
        "nnx.Embed fixes its output dtype when it is built (dtype=None means the param dtype at "
        "construction), so after casting the parameters for bfloat16 compute it still returns "
        "float32; torch's nn.Embedding returns its weight's current dtype.",
        "jax_impl/gpt.py casts the embedding sum to the parameters' current dtype.",
        check_embed_dtype,
    ),
)  # fmt: skip


def measure_all() -> list[tuple[Pitfall, Measurement]]:
    return [(p, p.check()) for p in PITFALLS]


if __name__ == "__main__":
    import time

    for pitfall in PITFALLS:
        start = time.perf_counter()
        m = pitfall.check()
        print(f"{pitfall.id:24} {m.ignored!s:>24} {m.pinned!s:>24}  {time.perf_counter() - start:5.1f}s  {m.quantity}")
