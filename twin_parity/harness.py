"""The parity harness shared by the tests and by ``scripts.parity_report``.

A check builds one twin with its own framework's init, perturbs every parameter (so a swapped bias
or LayerNorm mapping cannot hide behind zeros and ones), converts the weights to the other twin,
runs both on a bit-identical input in eval mode under matched precision, and compares every
intermediate (ln_1, attn, resid_1, ln_2, mlp, out) against the source side. A failing check names
the first sublayer whose error is over tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np

import weight_conversion as wc
from twin_common import BlockConfig
from twin_common.precision import matched_precision
from twin_common.reference import block_forward, block_sublayers, cross_entropy
from twin_common.tolerances import (
    BF16_SOFTMAX_ULPS, BF16_SUBLAYER_ULPS, LOSS_REL_TOLERANCE, ROUNDTRIP_TOLERANCE, tolerance_for,
)

INTERMEDIATES = ("ln_1", "attn", "resid_1", "ln_2", "mlp", "out")
DIRECTIONS = ("torch->jax", "jax->torch")
PARITY_DTYPES = ("float32", "float64", "bfloat16")
LESSON_SHAPE = (5, 8, 128)
NUMPY_DTYPES = wc.FLOAT_DTYPES
# A large-mean input for one float64 forward row. Measured on the 2-core CPU (lesson block, 4 heads):
# the twins agree to 2.3e-13 at mean 1000 (bound 1e-12); a LayerNorm variance computed as
# E[x^2] - E[x]^2 is off by 6.3e-10 at ln_1 there (5.3e-12 at mean 100), and passes every mean-0 row.
LARGE_MEAN = 1000.0
PERTURB_STD = 0.02  # added to every parameter after init (the init std): see the module docstring
GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "block_5x8x128.safetensors")


@dataclasses.dataclass
class Result:
    check: str
    shape: list[int]
    dtype: str
    torch_device: str | None
    jax_device: str | None
    direction: str
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    passed: bool
    first_divergence: str | None  # the sublayer or parameter named by the check's rule, or "error"
    divergence_detail: str | None = None  # its error against its bound, for the report's table
    config: dict = dataclasses.field(default_factory=dict)
    error: str | None = None  # the exception of a check that raised (then passed is False)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- devices


def framework_missing(name: str) -> str | None:
    """Why ``name`` ("torch", "jax" or "transformers") cannot run here (e.g. torch on a TPU VM), or
    None if it can."""
    import importlib
    import importlib.util

    modules = {"torch": ("torch",), "jax": ("jax", "flax", "optax"), "transformers": ("transformers",)}[name]
    if name == "transformers":  # importing it takes seconds: only look for it
        return None if importlib.util.find_spec("transformers") else "transformers is not installed (pip install -e .[dev])"
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as e:
        return f"{name} is not installed ({e})"
    return None


def torch_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def jax_devices() -> dict[str, object]:
    """{platform: first device} for every JAX platform present: cpu always, gpu/tpu if there."""
    import jax

    found = {}
    for platform in ("cpu", "gpu", "tpu"):
        try:
            found[platform] = jax.devices(platform)[0]
        except RuntimeError:  # that backend is not installed or has no devices
            continue
    return found


# ------------------------------------------------------------------------------------ twin builders


def make_input(shape: Iterable[int], dtype: str, seed: int = 0, mean: float = 0.0) -> np.ndarray:
    """A normal input (standard deviation 1, the given mean), drawn in float64 and rounded once to ``dtype``."""
    x = mean + np.random.default_rng(seed).standard_normal(tuple(shape))
    return x.astype(NUMPY_DTYPES[dtype])


def new_torch_block(cfg: BlockConfig, dtype: str, device: str, seed: int):
    import torch

    from torch_impl.block import Block

    torch.manual_seed(seed)
    model = Block(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(PERTURB_STD * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(device=device, dtype=getattr(torch, dtype))


def new_flax_block(cfg: BlockConfig, dtype: str, jax_device, seed: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.block import Block

    with jax.default_device(jax_device):
        model = Block(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
        model.eval()
        key = jax.random.key(seed + 1)
        for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            key, sub = jax.random.split(key)
            value = var.get_value()
            noise = PERTURB_STD * jax.random.normal(sub, value.shape, value.dtype)
            var.set_value((value + noise).astype(dtype))
    return model


def run_torch(model, x: np.ndarray, device: str) -> dict[str, np.ndarray]:
    import torch

    from weight_conversion.torch_side import numpy_to_tensor, tensor_to_numpy

    with torch.no_grad():
        _, inter = model(numpy_to_tensor(x, device), return_intermediates=True)
    return {k: tensor_to_numpy(v).astype(np.float64) for k, v in inter.items()}


def run_flax(model, x: np.ndarray, jax_device) -> dict[str, np.ndarray]:
    import jax

    _, inter = model(jax.device_put(x, jax_device), return_intermediates=True)
    return {k: np.asarray(v).astype(np.float64) for k, v in inter.items()}


def native_weights(model) -> dict[str, np.ndarray]:
    """A twin's parameters as float64 arrays in torch layout, read by each framework's own naming
    rules and NOT through the conversion table: the float64 truth must not move with a converter bug.

    torch: ``state_dict()`` as it is. Flax: ``kernel`` (in, out) is ``weight`` (out, in), and a
    LayerNorm's ``scale`` is ``weight`` (Flax's conventions for nnx.Linear / nnx.LayerNorm)."""
    if any(cls.__module__.startswith("torch.") for cls in type(model).__mro__):
        from weight_conversion.torch_side import tensor_to_numpy

        return {k: tensor_to_numpy(v).astype(np.float64) for k, v in model.state_dict().items()}
    from flax import nnx

    weights = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *module, leaf = (str(p) for p in path)
        value = np.asarray(var.get_value()).astype(np.float64)
        if leaf == "kernel":
            leaf, value = "weight", value.T
        elif leaf == "scale":
            leaf = "weight"
        weights[".".join([*module, leaf])] = value
    return weights


# --------------------------------------------------------------------------------------- compare


def compare(
    reference: Mapping[str, np.ndarray],
    other: Mapping[str, np.ndarray],
    dtype: str,
    truth: Mapping[str, np.ndarray] | None = None,
) -> tuple[float, float, float, bool, str | None, str | None]:
    """(max_abs_err, max_rel_err, tolerance, passed, first_divergence, detail) of the output, with
    every intermediate also held to its own tolerance; the first one over it is the divergence
    point, and ``detail`` gives its error and bound (the output's error may be within tolerance).
    ``truth`` (float64 intermediates from the same weights) enables the bf16 allowance."""
    tol = tolerance_for(dtype)
    first = detail = None
    for name in INTERMEDIATES:
        err = float(np.max(np.abs(reference[name] - other[name])))
        if name == "out":
            bound = tol.bound(reference[name])
        else:
            bound = tol.intermediate_bound(reference[name], None if truth is None else truth[name])
        if not err <= bound:  # "not <=" so that NaN fails
            first, detail = name, f"{name}: {err:.2e} > {bound:.1e}"
            break
    ref, out = reference["out"], other["out"]
    max_abs = float(np.max(np.abs(ref - out)))
    peak = float(np.max(np.abs(ref)))
    max_rel = max_abs / peak if peak else float(max_abs != 0)
    return max_abs, max_rel, tol.bound(ref), first is None, first, detail


def _config_summary(cfg: BlockConfig) -> dict:
    keep = ("n_heads", "attn_impl", "bias", "gelu_approximate")
    return {"model": "block", **{k: v for k, v in cfg.to_dict().items() if k in keep}}


def _device_name(jax_device) -> str | None:
    return None if jax_device is None else jax_device.platform


def _default_jax_device(jax_device):
    return jax_device if jax_device is not None else jax_devices()["cpu"]


# ------------------------------------------------------------------------------------------ checks


def forward_pair(
    cfg: BlockConfig,
    dtype: str,
    direction: str,
    torch_device: str = "cpu",
    jax_device=None,
    shape: Iterable[int] = LESSON_SHAPE,
    seed: int = 0,
    mean: float = 0.0,
) -> tuple[dict, dict]:
    """Build the source twin, convert it into the other, run both.

    Returns (source, target, truth) intermediates; truth is the float64 NumPy reference on the source
    twin's own (rounded) weights and the same input for bfloat16, where the tolerance uses it, and
    None otherwise."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    jax_device = _default_jax_device(jax_device)
    x = make_input(shape, dtype, seed, mean)
    with matched_precision(x64=dtype == "float64"):
        if direction == "torch->jax":
            source = new_torch_block(cfg, dtype, torch_device, seed)
            target = new_flax_block(cfg, dtype, jax_device, seed + 100)  # overwritten below
            wc.torch_to_flax(source, target)
            ref, other = run_torch(source, x, torch_device), run_flax(target, x, jax_device)
        else:
            source = new_flax_block(cfg, dtype, jax_device, seed)
            target = new_torch_block(cfg, dtype, torch_device, seed + 100)  # overwritten below
            wc.flax_to_torch(source, target)
            ref, other = run_flax(source, x, jax_device), run_torch(target, x, torch_device)
    truth = None
    if tolerance_for(dtype).truth_factor is not None:  # from the source's own weights, not the table's
        truth = block_forward(native_weights(source), x, cfg)
    return ref, other, truth


def forward_check(
    cfg: BlockConfig,
    dtype: str,
    direction: str,
    torch_device: str = "cpu",
    jax_device=None,
    shape: Iterable[int] = LESSON_SHAPE,
    seed: int = 0,
    mean: float = 0.0,
) -> Result:
    """``mean``: the input's mean. A large one (LARGE_MEAN) is where a LayerNorm variance computed
    as E[x^2] - E[x]^2 (Flax's fast variance) cancels catastrophically; at mean 0 it cannot be seen."""
    jax_device = _default_jax_device(jax_device)
    shape = list(shape)
    ref, other, truth = forward_pair(cfg, dtype, direction, torch_device, jax_device, shape, seed, mean)
    config = _config_summary(cfg) | ({"input_mean": mean} if mean else {})
    return Result(
        "forward", shape, dtype, torch_device, _device_name(jax_device),
        direction + (f" (input mean {mean:g})" if mean else ""), *compare(ref, other, dtype, truth), config=config,
    )  # fmt: skip


def attention_paths_check(
    framework: str, cfg: BlockConfig, dtype: str, device=None, seed: int = 0
) -> Result:
    """The fused attention path against the explicit math path, within one framework."""
    shape = list(LESSON_SHAPE)
    x = make_input(shape, dtype, seed)
    fused, math_ = (dataclasses.replace(cfg, attn_impl=impl) for impl in ("fused", "math"))
    with matched_precision(x64=dtype == "float64"):
        if framework == "torch":
            device = device or "cpu"
            a = new_torch_block(fused, dtype, device, seed)
            b = new_torch_block(math_, dtype, device, seed + 100)
            b.load_state_dict(a.state_dict())
            ref, other = run_torch(a, x, device), run_torch(b, x, device)
            names = (device, None)
        else:
            device = _default_jax_device(device)
            a = new_flax_block(fused, dtype, device, seed)
            b = new_flax_block(math_, dtype, device, seed + 100)
            wc.import_(b, wc.export(a))
            ref, other = run_flax(a, x, device), run_flax(b, x, device)
            names = (None, device.platform)
    return Result(
        "attn_fused_vs_math", shape, dtype, *names, f"{framework}:fused->math",
        *compare(ref, other, dtype), config=_config_summary(cfg),
    )  # fmt: skip


def roundtrip_check(cfg: BlockConfig, dtype: str, start: str, via_file: bool, seed: int = 0) -> Result:
    """start twin -> other twin -> start twin (in memory, or through a safetensors file each way):
    every parameter must come back bit for bit."""
    jax_device = jax_devices()["cpu"]
    with matched_precision(x64=dtype == "float64"):
        torch_model = new_torch_block(cfg, dtype, "cpu", seed)
        flax_model = new_flax_block(cfg, dtype, jax_device, seed + 100)
        models = [torch_model, flax_model] if start == "torch" else [flax_model, torch_model]
        before = wc.export(models[0])
        with tempfile.TemporaryDirectory() as tmp:
            for i, (src, dst) in enumerate((models, models[::-1])):
                if via_file:
                    path = os.path.join(tmp, f"hop{i}.safetensors")
                    wc.save(src, path)
                    wc.load(dst, path)
                else:
                    wc.import_(dst, wc.export(src))
                if i == 0:  # the middle twin must hold the weights, or a no-op import would pass
                    middle = wc.export(models[1])
        after = wc.export(models[0])
    err, first = 0.0, None
    for stage, got in (("middle", middle), ("back", after)):
        for key, value in before.items():
            diff = float(np.max(np.abs(value.astype(np.float64) - got[key].astype(np.float64))))
            bits = f"u{value.dtype.itemsize}"  # bits, so that -0.0 vs 0.0 or NaN payloads count
            if not np.array_equal(value.view(bits), got[key].view(bits)):
                first = first or f"{key} ({stage})"
                diff = max(diff, np.finfo(np.float64).tiny)  # differing bits are never an error of 0
            err = diff if diff != diff else max(err, diff)  # keep NaN, which max() would drop
    other = "jax" if start == "torch" else "torch"
    return Result(
        "roundtrip", [], dtype, "cpu", "cpu",
        f"{start}->{other}->{start}" + (" (safetensors)" if via_file else ""),
        err, err, ROUNDTRIP_TOLERANCE, first is None, first, config=_config_summary(cfg),
    )  # fmt: skip


def load_golden(path: str = GOLDEN_PATH) -> tuple[dict, np.ndarray, dict[int, dict], dict]:
    """(weights, input, {n_heads: float64 intermediates}, base config dict) from the golden file."""
    import json

    arrays, metadata = wc.load_file(path)
    base = json.loads(metadata["config"])
    weights = {k.removeprefix("weights."): v for k, v in arrays.items() if k.startswith("weights.")}
    refs: dict[int, dict] = {}
    for key, value in arrays.items():
        if key.startswith("reference."):
            _, heads, name = key.split(".")
            refs.setdefault(int(heads.removeprefix("n_heads_")), {})[name] = value
    return weights, arrays["input"], refs, base


def golden_check(
    framework: str, n_heads: int, dtype: str, device=None, path: str = GOLDEN_PATH, defaults: bool = False
) -> Result:
    """One twin alone against the committed float64 reference: needs only its own framework.

    ``defaults=True`` builds the twin from the project's current defaults (``BlockConfig.lesson``)
    instead of the config stored beside the vectors, which were made from torch's values (eps 1e-5,
    exact GELU) by the NumPy reference: a default that both twins share and both got wrong (eps
    1e-6, tanh GELU) passes every twin-vs-twin row and every stored-config row, and fails this one."""
    weights, x, refs, base = load_golden(path)
    cfg = BlockConfig.from_dict({**base, "n_heads": n_heads})
    if defaults:
        cfg = BlockConfig.lesson(n_heads=n_heads)
    weights = {k: v.astype(NUMPY_DTYPES[dtype]) for k, v in weights.items()}
    x = x.astype(NUMPY_DTYPES[dtype])
    with matched_precision(x64=dtype == "float64"):
        if framework == "torch":
            device = device or "cpu"
            model = new_torch_block(cfg, dtype, device, 0)
            wc.import_(model, weights)
            got, names = run_torch(model, x, device), (device, None)
        else:
            device = _default_jax_device(device)
            model = new_flax_block(cfg, dtype, device, 0)
            wc.import_(model, weights)
            got, names = run_flax(model, x, device), (None, device.platform)
    result = Result(
        "defaults" if defaults else "golden", list(x.shape), dtype, *names,
        f"golden->{framework}" + (" (current default config)" if defaults else ""),
        *compare(refs[n_heads], got, dtype), config=_config_summary(cfg),
    )  # fmt: skip
    changed = [f"{k} {v!r} (golden {base[k]!r})" for k, v in cfg.to_dict().items() if k in base and base[k] != v]
    if defaults and not result.passed and changed:  # name the default that moved, beside the sublayer
        result.divergence_detail = f"{result.divergence_detail}; default changed: {', '.join(changed)}"
    return result


def _bf16_ulp(peak: float) -> float:
    return 2.0 ** (math.floor(math.log2(peak)) - tolerance_for("bfloat16").mantissa_bits) if peak else 0.0


def bf16_sublayer_check(framework: str, cfg: BlockConfig, device=None, seed: int = 0) -> Result:
    """One twin alone in bfloat16: each sublayer against float64 applied to the twin's own bf16 input
    to that sublayer, within BF16_SUBLAYER_ULPS. Twin-vs-twin rows cannot see a bug that both
    frameworks would round alike, nor one inside a sublayer that the allowance for the source's own
    error absorbs (LayerNorm statistics in bfloat16 passed them); this row judges each twin alone."""
    x = make_input(LESSON_SHAPE, "bfloat16", seed)
    with matched_precision():
        if framework == "torch":
            device = device or "cpu"
            model = new_torch_block(cfg, "bfloat16", device, seed)
            inter, names = run_torch(model, x, device), (device, None)
        else:
            device = _default_jax_device(device)
            model = new_flax_block(cfg, "bfloat16", device, seed)
            inter, names = run_flax(model, x, device), (None, device.platform)
    truth = block_sublayers(native_weights(model), x, cfg, inter)
    first = detail = None
    for name in INTERMEDIATES:
        err = float(np.max(np.abs(inter[name] - truth[name])))
        ulp = _bf16_ulp(float(np.max(np.abs(truth[name]))))
        if not err <= BF16_SUBLAYER_ULPS[name] * ulp:
            first = name
            detail = f"{name}: {err / ulp:.2f} ulps > {BF16_SUBLAYER_ULPS[name]:g}"
            break
    out_err = float(np.max(np.abs(inter["out"] - truth["out"])))
    peak = float(np.max(np.abs(truth["out"])))
    return Result(
        "sublayers_vs_f64", list(LESSON_SHAPE), "bfloat16", *names, attention_label(framework, cfg),
        out_err, out_err / peak, BF16_SUBLAYER_ULPS["out"] * _bf16_ulp(peak), first is None, first, detail,
        config=_config_summary(cfg),
    )  # fmt: skip


def softmax_check(framework: str, seed: int = 0) -> Result:
    """One twin's bfloat16 math-path attention probabilities against a float64 softmax, element by
    element. At the attention output a softmax computed in bfloat16 hides under the output's own
    rounding (0.52 -> 0.57 ulps); its probabilities cannot hide: with exact scores (entries of q and
    k in {-1, 0, 1}, head size 64, so every score is a multiple of 1/8 that bfloat16 holds exactly)
    and v the identity, ``math_attention`` returns the probabilities themselves (each output is one
    product p * 1, exact), and a float32 softmax rounded once is within half an ulp of float64."""
    import ml_dtypes

    B, T = 4, 64
    cfg = BlockConfig(d_model=T, n_heads=1, block_size=T, attn_impl="math")  # head size T: v = identity
    rng = np.random.default_rng(seed)
    q, k = (rng.integers(-1, 2, (B, T, T)).astype(ml_dtypes.bfloat16) for _ in range(2))  # (B, T, hs)
    scores = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 2, 1) / math.sqrt(T)
    scores = np.where(np.tri(T, dtype=bool), scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    truth = e / e.sum(-1, keepdims=True)  # (B, T, S)
    if framework == "torch":
        import torch

        from torch_impl.block import CausalSelfAttention
        from weight_conversion.torch_side import numpy_to_tensor, tensor_to_numpy

        attn = CausalSelfAttention(cfg).eval()
        eye = torch.eye(T, dtype=torch.bfloat16).expand(B, 1, T, T)  # (B, nh, S, hs)
        with torch.no_grad():  # torch's layout (B, nh, T, hs)
            got = tensor_to_numpy(attn.math_attention(numpy_to_tensor(q[:, None]), numpy_to_tensor(k[:, None]), eye))[:, 0]
        names = ("cpu", None)
    else:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jax_impl.block import CausalSelfAttention

        with jax.default_device(jax_devices()["cpu"]):
            attn = CausalSelfAttention(cfg, rngs=nnx.Rngs(seed))
            attn.eval()
            eye = jnp.broadcast_to(jnp.eye(T, dtype=jnp.bfloat16)[None, :, None, :], (B, T, 1, T))  # (B, S, nh, hs)
            got = np.asarray(attn.math_attention(jnp.asarray(q[:, :, None]), jnp.asarray(k[:, :, None]), eye))[:, :, 0]
        names = (None, "cpu")
    got = got.astype(np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.where(truth > 0, truth, 1.0))) - tolerance_for("bfloat16").mantissa_bits)
    ulps = np.abs(got - truth) / ulp  # masked entries: truth 0, ulp of 1
    b, t, s = np.unravel_index(int(np.argmax(ulps)), ulps.shape)
    worst, err = float(ulps[b, t, s]), float(np.max(np.abs(got - truth)))
    passed = worst <= BF16_SOFTMAX_ULPS
    detail = None if passed else f"attn probabilities: {worst:.2f} ulps > {BF16_SOFTMAX_ULPS:g} (batch {b}, query {t}, key {s})"
    return Result(
        "softmax_vs_f64", [B, T, T], "bfloat16", *names, f"{framework}:math", err, err / float(np.max(truth)),
        BF16_SOFTMAX_ULPS * _bf16_ulp(float(np.max(truth))), passed, None if passed else "attn probabilities", detail,
        config={"model": "attention", "n_heads": 1, "attn_impl": "math"},
    )  # fmt: skip


def attention_label(framework: str, cfg: BlockConfig) -> str:
    """"torch:fused", "jax:math"; the fused path with the library's kernel: "jax:fused/library"."""
    kernel = "/library" if cfg.attn_impl == "fused" and cfg.attn_kernel == "library" else ""
    return f"{framework}:{cfg.attn_impl}{kernel}"


def loss_check(framework: str, seed: int = 0) -> Result:
    """A twin's loss_fn on bfloat16 logits against a float64 cross-entropy of the same logits; the
    tolerance is relative (LOSS_REL_TOLERANCE). Only bfloat16 shows a loss computed in low precision."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    shape = [4, 16, 64]  # (B, T, V): the small GPT's batch
    logits = (3.0 * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16)
    targets = rng.integers(0, shape[-1], shape[:2])
    truth = cross_entropy(logits, targets)
    if framework == "torch":
        import torch

        import torch_impl.gpt as tg
        from weight_conversion.torch_side import numpy_to_tensor

        got, names = float(tg.loss_fn(numpy_to_tensor(logits), torch.from_numpy(targets))), ("cpu", None)
    else:
        import jax
        import jax.numpy as jnp

        import jax_impl.gpt as jg

        with jax.default_device(jax_devices()["cpu"]):
            got = float(jg.loss_fn(jnp.asarray(logits), jnp.asarray(targets, jnp.int32)))
        names = (None, "cpu")
    err = abs(got - truth)
    rel = err / abs(truth)
    passed = rel <= LOSS_REL_TOLERANCE
    return Result(
        "loss_vs_f64", shape, "bfloat16", *names, f"{framework}:loss_fn", err, rel, LOSS_REL_TOLERANCE,
        passed, None if passed else "loss", None if passed else f"loss: relative {rel:.1e} > {LOSS_REL_TOLERANCE:.0e}",
        config={"model": "gpt"},
    )  # fmt: skip
