"""GPT in Flax NNX: embeddings, a stack of the Pre-LN blocks, final norm, LM head (GPT-2's or, by
the config's switches, the Llama family's: no position table, rotary positions inside the blocks).
Twin of torch_impl/gpt.py. Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_impl.block import Block, KVCache, dtype_name, norm
from twin_common import GPTConfig
from twin_common.checks import check_loss_chunk, check_token_input


def embedding(n: int, d: int, cfg: GPTConfig, *, param_dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """nnx.Embed with init pinned to normal(0, init_std) (Flax: scaled normal; torch: N(0, 1))."""
    return nnx.Embed(
        n, d,
        embedding_init=nnx.initializers.normal(stddev=cfg.init_std),
        param_dtype=param_dtype,
        rngs=rngs,
    )  # fmt: skip


def position_ids(slots: jax.Array, start: jax.Array) -> jax.Array:
    """(B, T) position of each token: its cache slot minus its row's first real slot (left padding
    shifts a short prompt right; its first token is still position 0). Padding slots get 0."""
    return jnp.maximum(slots[None, :] - start[:, None], 0)


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        bc = cfg.block_config()
        self.wte = embedding(cfg.vocab_size, cfg.d_model, cfg, param_dtype=param_dtype, rngs=rngs)
        # rotary positions (cfg.pos == "rope") live in the attention: no position table
        wpe = cfg.pos == "learned"
        self.wpe = embedding(cfg.block_size, cfg.d_model, cfg, param_dtype=param_dtype, rngs=rngs) if wpe else None
        self.drop = nnx.Dropout(cfg.resid_dropout, rngs=rngs)
        # NNX needs nnx.List (flax >= 0.12) to see modules inside a list; torch needs nn.ModuleList.
        self.blocks = nnx.List([Block(bc, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = norm(bc, param_dtype=param_dtype, rngs=rngs)
        if cfg.tie_embeddings:
            self.lm_head = None  # logits use wte's matrix: one array, one checkpoint key
        else:
            self.lm_head = nnx.Linear(
                cfg.d_model, cfg.vocab_size, use_bias=False,
                kernel_init=nnx.initializers.normal(stddev=cfg.init_std),
                param_dtype=param_dtype, rngs=rngs,
            )  # fmt: skip

    def __call__(self, idx: jax.Array, return_intermediates: bool = False, head: bool = True):
        """The logits (B, T, V); ``head=False``: the final norm's output (B, T, C) instead, for a loss
        that applies the head itself (chunked). (torch's twin must go through its forward for a
        sharded model's hooks; an NNX module has none, the twin keeps the same call.)"""
        x, inter = self.features(idx, return_intermediates)
        if not head:
            return (x, inter) if return_intermediates else x
        logits = self.head(x)  # (B, T, V)
        inter["logits"] = logits
        return (logits, inter) if return_intermediates else logits

    def features(self, idx: jax.Array, return_intermediates: bool = False):
        """(the final norm's output (B, T, C), intermediates): the model up to its LM head."""
        try:  # the ids' values are only visible outside jit; under jit the Trainer checks the batch
            value_range = (int(idx.min()), int(idx.max())) if idx.size else None
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
            value_range = None
        check_token_input(tuple(idx.shape), dtype_name(idx.dtype), self.cfg, value_range)
        B, T = idx.shape
        pos = jnp.arange(T)
        x = self.embed(idx, pos)  # (B, T, C)
        inter = {"embed": x}
        for i, block in enumerate(self.blocks):
            if return_intermediates and self.cfg.mlp == "moe":
                x, block_inter = block(x, return_intermediates=True)
                inter[f"blocks.{i}.router_logits"] = block_inter["router_logits"]  # (B, T, E)
            else:
                x = block(x)
            inter[f"blocks.{i}"] = x
        x = self.ln_f(x)
        inter["ln_f"] = x
        return x, inter

    def embed(self, idx: jax.Array, pos: jax.Array) -> jax.Array:
        """Token embeddings plus, with learned positions, those of ``pos`` (T,) or (B, T)."""
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        # nnx.Embed fixes its output dtype when built (dtype=None means "the param dtype then"), so
        # once the parameters are cast (bf16 compute) it would still return float32: follow the
        # parameters explicitly. torch's nn.Embedding returns the weight's current dtype.
        return self.drop(x.astype(self.wte.embedding[...].dtype))

    def head(self, x: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return x @ self.wte.embedding[...].T  # (..., V)
        return self.lm_head(x)  # (..., V)

    # ------------------------------------------------------------------------------ generation

    def setup_cache(self, batch: int, length: int) -> None:
        """Give every attention layer a KVCache of (batch, length) slots; one that fits is kept
        (same shapes across generate calls: no recompilation)."""
        w = self.wte.embedding[...]
        for block in self.blocks:
            cache = block.attn.kv_cache
            if cache is None or cache.k[...].shape[:2] != (batch, length) or (
                cache.k[...].dtype != w.dtype or cache.k[...].sharding != w.sharding
            ):
                block.attn.kv_cache = KVCache(batch, length, block.cfg, w.dtype, w.sharding)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def cached_step(
        self, idx: jax.Array, t: jax.Array, start: jax.Array, last: jax.Array
    ) -> jax.Array:
        """Logits (B, V) of column ``last`` of idx (B, T), whose tokens go into cache slots
        t..t+T-1. ``start`` (B,): slot of each row's first real token (left padding; see
        twin_common.generation). t, start, last are traced: one compilation for all steps.
        Token ids are checked on the host before the step (twin_common.generation.check_request)."""
        B, T = idx.shape
        L = self.blocks[0].attn.kv_cache.k[...].shape[1]
        slots = t + jnp.arange(T)  # (T,) cache slot of each query
        pos = position_ids(slots, start)  # (B, T)
        keys = jnp.arange(L)  # (L,) cache slot of each key
        # query at slot q sees keys start[b] <= s <= q; a padding query sees itself only (an
        # all-masked row would give NaN, and NaN * 0 would leak into the real rows' outputs)
        mask = (keys <= slots[:, None]) & ((keys >= start[:, None, None]) | (keys == slots[:, None]))
        # mask: (B, T, L)
        x = self.embed(idx, pos)  # (B, T, C)
        for block in self.blocks:  # mask (B, 1, T, L): the same for every head
            x = block(x, t=t, mask=mask[:, None], pos=pos)
        x = jax.lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False)  # (B, C)
        return self.head(self.ln_f(x))  # (B, V)


def loss_fn(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over every position, computed in at least float32."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32; f64 stays
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def chunked_loss_fn(head, x: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """loss_fn(head(x), targets) over ``chunk`` positions at a time: only one chunk's (chunk, V)
    logits exist at once, never the (B, T, V) ones, and the backward recomputes each chunk's
    (activation checkpointing) instead of keeping them. The same log-softmax in at least float32
    per position; the mean is the sum of the chunks' sums over B * T (the last chunk may be
    shorter)."""
    C = x.shape[-1]
    x, targets = x.reshape(-1, C), targets.reshape(-1)  # (N, C), (N,)
    N = x.shape[0]

    @jax.checkpoint
    def chunk_sum(xc: jax.Array, tc: jax.Array) -> jax.Array:
        logits = head(xc)  # (chunk, V)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        return optax.softmax_cross_entropy_with_integer_labels(logits, tc).sum()

    # lax.map: one loop (a scan) over the equal chunks, then the shorter last one; a Python loop
    # would unroll into the program, and a scan needs chunks of one shape (torch's twin slices)
    full = N // chunk * chunk
    chunks = (x[:full].reshape(-1, chunk, C), targets[:full].reshape(-1, chunk))
    sums = jax.lax.map(lambda a: chunk_sum(*a), chunks)
    if full < N:
        sums = jnp.concatenate([sums, chunk_sum(x[full:], targets[full:])[None]])
    return sums.sum() / N


def lm_loss(model: GPT, x: jax.Array, targets: jax.Array, loss_chunk: int = 0) -> jax.Array:
    """The cross-entropy of the LM head on ``x``, the final norm's output (B, T, C): loss_fn on the
    whole (B, T, V) logits, or with ``loss_chunk`` > 0 chunked_loss_fn over that many positions."""
    if check_loss_chunk(loss_chunk):
        return chunked_loss_fn(model.head, x, targets, loss_chunk)
    return loss_fn(model.head(x), targets)


def model_loss(model: GPT, idx: jax.Array, targets: jax.Array, loss_chunk: int = 0) -> jax.Array:
    """The training loss: lm_loss, plus with an MoE MLP the router's load-balancing loss and z-loss
    (jax_impl/moe.py) times their config coefficients. (torch's twin takes a ``data_mean`` for its
    data-parallel processes; a jitted step over a sharded batch already sees the whole batch.)"""
    cfg = model.cfg
    if cfg.mlp != "moe":
        return lm_loss(model, model(idx, head=False), targets, loss_chunk)
    from jax_impl.moe import router_losses

    x, inter = model(idx, return_intermediates=True, head=False)
    balance, z_loss = router_losses([inter[f"blocks.{i}.router_logits"] for i in range(cfg.n_layers)], cfg)
    return lm_loss(model, x, targets, loss_chunk) + cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z_loss
