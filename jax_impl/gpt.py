"""GPT in Flax NNX: embeddings, a stack of the Pre-LN blocks, final LayerNorm, LM head.
Twin of torch_impl/gpt.py. Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_impl.block import Block, dtype_name, layer_norm
from twin_common import GPTConfig
from twin_common.checks import check_token_input


def embedding(n: int, d: int, cfg: GPTConfig, *, param_dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """nnx.Embed with init pinned to normal(0, init_std) (Flax: scaled normal; torch: N(0, 1))."""
    return nnx.Embed(
        n, d,
        embedding_init=nnx.initializers.normal(stddev=cfg.init_std),
        param_dtype=param_dtype,
        rngs=rngs,
    )  # fmt: skip


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        bc = cfg.block_config()
        self.wte = embedding(cfg.vocab_size, cfg.d_model, cfg, param_dtype=param_dtype, rngs=rngs)
        self.wpe = embedding(cfg.block_size, cfg.d_model, cfg, param_dtype=param_dtype, rngs=rngs)
        self.drop = nnx.Dropout(cfg.resid_dropout, rngs=rngs)
        # NNX needs nnx.List (flax >= 0.12) to see modules inside a list; torch needs nn.ModuleList.
        self.blocks = nnx.List([Block(bc, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = layer_norm(bc, param_dtype=param_dtype, rngs=rngs)
        if cfg.tie_embeddings:
            self.lm_head = None  # logits use wte's matrix: one array, one checkpoint key
        else:
            self.lm_head = nnx.Linear(
                cfg.d_model, cfg.vocab_size, use_bias=False,
                kernel_init=nnx.initializers.normal(stddev=cfg.init_std),
                param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip

    def __call__(self, idx: jax.Array, return_intermediates: bool = False):
        try:  # the ids' values are only visible outside jit; under jit the Trainer checks the batch
            value_range = (int(idx.min()), int(idx.max())) if idx.size else None
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            value_range = None
        check_token_input(tuple(idx.shape), dtype_name(idx.dtype), self.cfg, value_range)
        B, T = idx.shape
        pos = jnp.arange(T)
        # nnx.Embed fixes its output dtype when built (dtype=None means "the param dtype then"), so
        # once the parameters are cast (bf16 compute) it would still return float32: follow the
        # parameters explicitly. torch's nn.Embedding returns the weight's current dtype.
        x = (self.wte(idx) + self.wpe(pos)).astype(self.wte.embedding[...].dtype)
        x = self.drop(x)  # (B, T, C)
        inter = {"embed": x}
        for i, block in enumerate(self.blocks):
            x = block(x)
            inter[f"blocks.{i}"] = x
        x = self.ln_f(x)
        inter["ln_f"] = x
        if self.lm_head is None:
            logits = x @ self.wte.embedding[...].T  # (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        inter["logits"] = logits
        return (logits, inter) if return_intermediates else logits


def loss_fn(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over every position, computed in at least float32."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32; f64 stays
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def generate(model: GPT, prompt: list[int], n_new: int, temperature: float = 1.0, seed: int = 0) -> list[int]:
    """Sample ``n_new`` tokens after ``prompt`` (temperature 0: greedy).

    A causal model's logits at position t ignore later positions, so the context is padded on the
    right to block_size and one jitted forward serves every step (no recompilation per length)."""
    model.eval()
    size = model.cfg.block_size
    forward = nnx.jit(lambda m, ctx: m(ctx))
    rng = np.random.default_rng(seed)
    tokens = list(prompt)
    for _ in range(n_new):
        context = tokens[-size:]
        padded = jnp.asarray([context + [0] * (size - len(context))], dtype=jnp.int32)
        logits = np.asarray(forward(model, padded)[0, len(context) - 1], dtype=np.float64)
        if temperature == 0:
            tokens.append(int(logits.argmax()))
        else:
            z = logits / temperature
            probs = np.exp(z - z.max())
            tokens.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    return tokens
