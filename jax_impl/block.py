"""Pre-LayerNorm transformer block in Flax NNX. Twin of torch_impl/block.py: same classes, same
attribute names in the same order; read the two side by side.

One block, two families, chosen by the config: GPT-2's (LayerNorm, learned positions added by the
GPT, one key/value head per query head, GELU MLP, biases) and Llama's (RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP, no biases).

Shapes: B batch, T sequence, C d_model, nh heads, nkv key/value heads, hs head size (C = nh * hs),
H hidden (cfg.d_hidden).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.layers import linear
from jax_impl.moe import MoE
from twin_common import BlockConfig, check_block_input

INTERMEDIATES = ("ln_1", "attn", "resid_1", "ln_2", "mlp", "out")  # in the order they are computed


def fused_attention(cfg: BlockConfig, q, k, v, mask, scale: float) -> jax.Array:
    """jax.nn.dot_product_attention, with cuDNN's kernel on a GPU in bf16/fp16 when cfg.attn_kernel
    is "cudnn" (JAX's own choice there is XLA's). The platform is only known when the jitted
    function is lowered, so both versions are traced and lax.platform_dependent keeps the one for
    the platform it lowers for: XLA's on CPU and TPU. Inputs cuDNN refuses (it checks shapes and
    dtypes while tracing) fall back to XLA's version. torch's twin: sdpa_backends."""
    attend = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=mask, is_causal=mask is None,
                               scale=scale)  # mask: True = attend, as in torch's SDPA  # fmt: skip
    if cfg.attn_kernel != "cudnn" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return attend()
    try:
        jax.eval_shape(lambda: attend(implementation="cudnn"))  # raises for inputs cuDNN refuses
    except (RuntimeError, ValueError, NotImplementedError, TypeError):  # RuntimeError: no cuDNN (CPU jaxlib)
        return attend()
    return jax.lax.platform_dependent(cuda=lambda: attend(implementation="cudnn"), default=attend)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def layer_norm(cfg: BlockConfig, *, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """nnx.LayerNorm with eps pinned (Flax 1e-6, torch 1e-5 by default) and the two-pass variance
    E[(x - mean)^2] that torch computes (Flax's default fast variance is E[x^2] - E[x]^2)."""
    return nnx.LayerNorm(
        cfg.d_model,
        epsilon=cfg.ln_eps,
        use_fast_variance=False,
        use_bias=cfg.has_norm_bias,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, as transformers' LlamaRMSNorm: the statistic and the
    division in float32 whatever x's dtype (float64 stays), rounded to x's dtype before the scale.

    Written out, not nnx.RMSNorm: that one defaults epsilon to 1e-6 (where Llama 2 uses 1e-5) and
    multiplies by the scale before rounding to x's dtype. The parameter keeps Flax's name, scale."""

    def __init__(self, cfg: BlockConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = cfg.ln_eps  # always explicit (docs/guide.md measures 1e-5 vs 1e-6 vs 1.19e-7)
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 -> f32; f64 stays
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


def norm(cfg: BlockConfig, *, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The block's normalisation: LayerNorm (GPT-2) or RMSNorm (Llama), by ``cfg.norm``."""
    if cfg.norm == "layernorm":
        return layer_norm(cfg, param_dtype=param_dtype, rngs=rngs)
    return RMSNorm(cfg, param_dtype=param_dtype, rngs=rngs)


def rope_angles(pos: jax.Array, cfg: BlockConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin, (B or 1, T, hs / 2), of position ids ``pos`` (B or 1, T) times the frequencies
    theta^(-2i / hs): computed in at least float32 (as transformers), then rounded to ``dtype``."""
    hs = cfg.d_head
    angle_dtype = jnp.promote_types(dtype, jnp.float32)
    inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, hs, 2, dtype=angle_dtype) / hs)
    angles = pos.astype(angle_dtype)[..., None] * inv_freq  # (B or 1, T, hs / 2)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str) -> jax.Array:
    """Rotary positions: each pair (x1, x2) of a head's features turned by its angle. "half": the
    pairs are (i, i + hs/2), transformers' rotate_half; "interleaved": (2i, 2i + 1), Meta's original
    Llama and GPT-J. Same function, permuted features: a checkpoint moves between the layouts by a
    permutation of the q and k rows (twin_common/params.py, ``rope_heads``)."""
    h = x.shape[-1] // 2
    x1, x2 = (x[..., :h], x[..., h:]) if layout == "half" else (x[..., 0::2], x[..., 1::2])
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if layout == "half":
        return jnp.concatenate([y1, y2], axis=-1)
    return jnp.stack([y1, y2], axis=-1).reshape(x.shape)  # (y1_0, y2_0, y1_1, y2_1, ...)


def repeat_kv(k: jax.Array, group: int) -> jax.Array:
    """(B, L, nkv, hs) -> (B, L, nh, hs): key/value head j serves the `group` neighbouring query
    heads j * group .. (j + 1) * group - 1, so each is repeated in place (kv0 kv0 kv1 kv1), not the
    whole set tiled (kv0 kv1 kv0 kv1), which loads without an error and pairs the wrong heads."""
    return jnp.repeat(k, group, axis=2)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        kv = cfg.kv_heads * cfg.d_head  # nkv * hs: C, or less with grouped-query attention
        b, kw = cfg.has_attn_bias, dict(param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(cfg.d_model, cfg.d_model, cfg, b, **kw)
        self.k_proj = linear(cfg.d_model, kv, cfg, b, **kw)
        self.v_proj = linear(cfg.d_model, kv, cfg, b, **kw)
        self.out_proj = linear(cfg.d_model, cfg.d_model, cfg, b, **kw)
        self.attn_dropout = nnx.Dropout(cfg.attn_dropout, rngs=rngs)
        self.resid_dropout = nnx.Dropout(cfg.resid_dropout, rngs=rngs)
        self.scale = 1.0 / math.sqrt(cfg.d_head)  # pinned, not left to the library's default
        # nnx.data: an attribute that is None at construction would otherwise be frozen as static
        # (flax >= 0.12), and a KVCache could not be attached later. torch has no such distinction.
        self.kv_cache: KVCache | None = nnx.data(None)  # set by GPT.setup_cache for generation

    def __call__(
        self, x: jax.Array, t: jax.Array | None = None, mask: jax.Array | None = None,
        pos: jax.Array | None = None,
    ) -> jax.Array:  # fmt: skip
        """Without ``t``: causal attention over x. With ``t`` (cache slot of x's first token) and
        ``mask`` (B, 1, T, L), True = may attend: x's keys and values are written into the cache
        at slots t..t+T-1 and x attends to the whole cache. ``pos`` (B, T): position ids for rotary
        positions (default 0..T-1; a left-padded row's real tokens start at 0)."""
        B, T, C = x.shape
        hs = self.cfg.d_head
        # JAX attention works on (B, T, nh, hs); torch's on (B, nh, T, hs).
        # -1, not nh: tensor-parallel, a device holds nh / model heads (jax_impl/sharding.py).
        q = self.q_proj(x).reshape(B, T, -1, hs)  # (B, T, nh, hs)
        k = self.k_proj(x).reshape(B, T, -1, hs)  # (B, T, nkv, hs)
        v = self.v_proj(x).reshape(B, T, -1, hs)  # (B, T, nkv, hs)
        if self.cfg.pos == "rope":
            pos = jnp.arange(T)[None] if pos is None else pos  # (B or 1, T)
            cos, sin = rope_angles(pos, self.cfg, q.dtype)  # (B or 1, T, hs / 2)
            cos, sin = cos[:, :, None], sin[:, :, None]  # (B or 1, T, 1, hs / 2): every head alike
            q, k = rotate(q, cos, sin, self.cfg.rope_layout), rotate(k, cos, sin, self.cfg.rope_layout)
        if t is not None:
            k, v = self.kv_cache.update(k, v, t)  # (B, L, nkv, hs) each: the cache holds nkv heads
        group = self.cfg.n_heads // self.cfg.kv_heads
        if group > 1:
            k, v = repeat_kv(k, group), repeat_kv(v, group)  # (B, L, nh, hs)
        # Two things force the math path where torch's SDPA needs none: jax.nn.dot_product_attention
        # has no dropout, and it computes its softmax in float32 even for float64 inputs (measured
        # 1.6e-7 max abs against a float64 softmax), so float64 would lose its precision.
        dropout_active = self.cfg.attn_dropout > 0 and not self.attn_dropout.deterministic
        if self.cfg.attn_impl == "fused" and not dropout_active and x.dtype != jnp.float64:
            y = fused_attention(self.cfg, q, k, v, mask, self.scale)
        else:
            y = self.math_attention(q, k, v, mask)
        y = y.reshape(B, T, -1)  # (B, T, C), or its local C / model features
        return self.resid_dropout(self.out_proj(y))

    def math_attention(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """The readable reference: softmax(q k^T / sqrt(hs) + mask) v, softmax in >= float32.
        ``mask`` (True = may attend) defaults to the causal one."""
        T, S = q.shape[1], k.shape[1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.scale  # (B, nh, T, S)
        if mask is None:
            mask = jnp.tril(jnp.ones((T, S), dtype=bool))  # True = may attend
        scores = jnp.where(mask, scores, -jnp.inf)
        softmax_dtype = jnp.promote_types(scores.dtype, jnp.float32)  # bf16 -> f32; f64 stays
        probs = jax.nn.softmax(scores.astype(softmax_dtype), axis=-1).astype(q.dtype)
        probs = self.attn_dropout(probs)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, T, nh, hs)


class KVCache(nnx.Module):
    """Keys and values of one attention layer for (batch, length) slots, allocated once. JAX arrays
    are immutable: ``update`` computes a new array with the slots replaced and stores it in the
    nnx.Cache variable; under jax.jit with the cache donated, XLA does the write in place."""

    def __init__(self, batch: int, length: int, cfg: BlockConfig, dtype, device):
        # (B, L, nkv, hs): the layout this framework's attention reads; nkv key/value heads
        shape = (batch, length, cfg.kv_heads, cfg.d_head)
        # placed explicitly (a Sharding): an array left "uncommitted" would give the first jitted
        # call another cache key than the later ones, which get the step's committed outputs
        self.k = nnx.Cache(jnp.zeros(shape, dtype, device=device))
        self.v = nnx.Cache(jnp.zeros(shape, dtype, device=device))

    def update(self, k: jax.Array, v: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Write k, v (B, T, nkv, hs) at slots t..t+T-1 (t traced: one compilation for every
        position) and return the whole cache."""
        at = (0 * t, t, 0 * t, 0 * t)  # start indices, all of t's integer type (64-bit mode too)
        self.k[...] = jax.lax.dynamic_update_slice(self.k[...], k, at)  # a new array
        self.v[...] = jax.lax.dynamic_update_slice(self.v[...], v, at)
        return self.k[...], self.v[...]


def exact_gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written as torch's kernel writes it: 0.5 x (1 + erf(x / sqrt 2)).

    jax.nn.gelu(approximate=False) is the same function written 0.5 x erfc(-x / sqrt 2). XLA:CPU
    expands erfc into both branches of a piecewise approximation (a polynomial, and an exp times a
    rational function) and a select, and autodiff keeps those pieces for the backward; erf is one
    polynomial. On the 2-core CPU the MLP's forward + backward costs 21.3 CPU ms with erfc, 16.9
    with erf (scripts/repro_gelu.py). A custom_vjp with torch's hand-written derivative
    Phi(x) + x phi(x) was no faster than autodiff of this form, so there is no custom rule."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


_SQRT_HALF = math.sqrt(0.5)  # a Python float keeps x's dtype (bfloat16, float32, float64)


class MLP(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        b, kw = cfg.has_mlp_bias, dict(param_dtype=param_dtype, rngs=rngs)
        self.fc_in = linear(cfg.d_model, cfg.d_hidden, cfg, b, **kw)
        # jax.nn.gelu defaults to approximate=True (tanh); torch's nn.GELU to exact (erf), which
        # exact_gelu computes with torch's formula (jax.nn.gelu's exact form is slow on CPU).
        exact = cfg.gelu_approximate == "none"
        self.gelu = exact_gelu if exact else functools.partial(jax.nn.gelu, approximate=True)
        self.fc_out = linear(cfg.d_hidden, cfg.d_model, cfg, b, **kw)
        self.dropout = nnx.Dropout(cfg.resid_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dropout(self.fc_out(self.gelu(self.fc_in(x))))  # (B, T, H) inside


class SwiGLU(nnx.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv:2002.05202); the names are
    transformers'. Swapping gate and up is a different function that loads without an error."""

    def __init__(self, cfg: BlockConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        b, kw = cfg.has_mlp_bias, dict(param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(cfg.d_model, cfg.d_hidden, cfg, b, **kw)
        self.up_proj = linear(cfg.d_model, cfg.d_hidden, cfg, b, **kw)
        self.down_proj = linear(cfg.d_hidden, cfg.d_model, cfg, b, **kw)
        self.dropout = nnx.Dropout(cfg.resid_dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # (B, T, H) inside, H = d_hidden
        return self.dropout(self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nnx.Module):
    """x + Attn(LN1(x)), then + MLP(LN2(.)): the Pre-LN block."""

    def __init__(self, cfg: BlockConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.ln_1 = norm(cfg, param_dtype=param_dtype, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.ln_2 = norm(cfg, param_dtype=param_dtype, rngs=rngs)
        if cfg.mlp == "moe":
            self.mlp = MoE(cfg, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = (MLP if cfg.mlp == "gelu" else SwiGLU)(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, return_intermediates: bool = False, t=None, mask=None, pos=None):
        """``t``, ``mask``, ``pos``: a cached step and rotary position ids (CausalSelfAttention)."""
        param_dtype = dtype_name(self.ln_1.scale[...].dtype)
        check_block_input(tuple(x.shape), dtype_name(x.dtype), param_dtype, self.cfg)
        ln_1 = self.ln_1(x)
        attn = self.attn(ln_1, t, mask, pos)
        resid_1 = x + attn
        ln_2 = self.ln_2(resid_1)
        if self.cfg.mlp == "moe":  # the router's logits feed the training loss (and the routing checks)
            mlp, router_logits = self.mlp(ln_2, return_router_logits=True)
        else:
            mlp, router_logits = self.mlp(ln_2), None
        out = resid_1 + mlp
        if return_intermediates:
            inter = dict(ln_1=ln_1, attn=attn, resid_1=resid_1, ln_2=ln_2, mlp=mlp, out=out)
            if router_logits is not None:
                inter["router_logits"] = router_logits  # (B, T, E), float32
            return out, inter
        return out
