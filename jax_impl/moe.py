"""Mixture-of-Experts MLP in Flax NNX (``mlp="moe"``): a float32 router, token-choice top-k with
ties to the lower expert index, SwiGLU experts stored stacked, dense-masked dispatch, the
load-balancing and z losses. Twin of torch_impl/moe.py; the rules are written out in
twin_common/moe.py.

Shapes: N tokens (B * T, flattened row-major), C d_model, E experts, k top_k, H expert hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_impl.layers import linear
from twin_common import BlockConfig
from twin_common.moe import capacity


def router_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (N, C) @ kernel (C, E) in float32 whatever the compute dtype (float64 stays). JAX has no
    autocast: a bf16 model casts its parameters, so both are cast up here (torch's twin switches
    its autocast off instead)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return x.astype(dtype) @ kernel.astype(dtype)


def ranks(logits: jax.Array) -> jax.Array:
    """(N, E) rank of each expert per token, 0 = chosen first: the experts with a larger logit,
    plus those with an equal logit and a lower index. An explicit rule, the same as torch's twin,
    rather than jax.lax.top_k's (which documents lower index first: the same rule, but torch.topk
    has none, so neither twin leans on its library)."""
    E = logits.shape[-1]
    idx = jnp.arange(E)
    li, lj = logits[:, :, None], logits[:, None, :]  # (N, E, 1) expert e, (N, 1, E) rival j
    # (N, E, E): rival j beats expert e with a larger logit, or an equal one and a lower index
    beats = (lj > li) | ((lj == li) & (idx[None, None, :] < idx[None, :, None]))
    return beats.sum(-1)  # (N, E), a permutation of 0..E-1 per token


def choose(logits: jax.Array, cfg: BlockConfig) -> tuple[jax.Array, jax.Array]:
    """Each token's top_k choices of router logits (N, E): chosen (N, k, E), the one-hot of the
    expert at each choice rank, and weight (N, k), the chosen probabilities of a softmax over all
    experts (Mixtral), renormalised when norm_topk_prob."""
    k = cfg.top_k
    rank = ranks(logits)
    # (N, k, E): one-hot of the expert at each choice rank
    chosen = rank[:, None, :] == jnp.arange(k)[None, :, None]
    probs = jax.nn.softmax(logits, axis=-1)  # over all E experts, then top-k (Mixtral)
    weight = (chosen * probs[:, None, :]).sum(-1)  # (N, k) the chosen probabilities, rank order
    if cfg.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdims=True)
    return chosen, weight


def route(logits: jax.Array, cfg: BlockConfig) -> jax.Array:
    """Combine weights (N, E) of router logits (N, E): the top_k choices (``choose``), pairs over
    an expert's capacity dropped in (token, choice rank) order; zero for every expert a token does
    not use."""
    N, E = logits.shape
    k = cfg.top_k
    chosen, weight = choose(logits, cfg)
    cap = capacity(N, E, k, cfg.capacity_factor)
    if cap is not None:  # pairs counted per expert in (token, rank) order, row-major over (N, k)
        # 1 for an expert's first pair, 2 for its second, ...
        arrival = jnp.cumsum(chosen.reshape(N * k, E), axis=0).reshape(N, k, E)
        chosen = chosen & (arrival <= cap)
    return (chosen * weight[:, :, None]).sum(1)  # (N, E)


def router_losses(router_logits: list[jax.Array], cfg) -> tuple[jax.Array, jax.Array]:
    """(load-balancing loss, z-loss) over every MoE layer's router logits (..., E), tokens pooled."""
    z = jnp.concatenate([g.reshape(-1, g.shape[-1]) for g in router_logits])  # (L * N, E), float32
    E = z.shape[-1]
    probs = jax.nn.softmax(z, axis=-1)  # one softmax: the loss reads probabilities of the logits
    f = (ranks(z) < cfg.top_k).astype(z.dtype).mean(0)  # (E,) pairs routed to e per token; sums to k
    balance = E * jnp.sum(f * probs.mean(0))
    z_loss = jnp.square(jax.nn.logsumexp(z, axis=-1)).mean()
    return balance, z_loss


class Experts(nnx.Module):
    """E SwiGLU experts stacked: gate_proj, up_proj (E, H, C) and down_proj (E, C, H), each expert
    in nn.Linear's (out, in) layout: Mixtral's w1, w3, w2 stacked along a new first axis. The same
    layout as torch's twin (no nnx.Linear wraps them, so Flax's (in, out) kernel convention does not
    apply), so the table maps them without a transform."""

    def __init__(self, cfg: BlockConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        E, C, H = cfg.n_experts, cfg.d_model, cfg.d_hidden
        init = nnx.initializers.normal(stddev=cfg.init_std)
        self.gate_proj = nnx.Param(init(rngs.params(), (E, H, C), param_dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (E, H, C), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (E, C, H), param_dtype))

    def __call__(self, x: jax.Array, combine: jax.Array) -> jax.Array:
        """Every expert on every token, weighted by ``combine`` (N, E) and summed: x (N, C) -> (N, C).
        The sum over experts is the last step, so experts split over devices leave partial sums
        that one all-reduce completes (GSPMD inserts it; jax_impl/sharding.py)."""
        return expert_mlp(x, combine, self.gate_proj[...], self.up_proj[...], self.down_proj[...])


def expert_mlp(x: jax.Array, combine: jax.Array, gate_proj: jax.Array, up_proj: jax.Array, down_proj: jax.Array) -> jax.Array:
    """The experts' arithmetic on stacked weights (Experts' layout, E of them, or a device's share):
    x (N, C), combine (N, E) -> (N, C)."""
    g = jnp.einsum("nc,ehc->neh", x, gate_proj)  # (N, E, H)
    u = jnp.einsum("nc,ehc->neh", x, up_proj)  # (N, E, H)
    y = jnp.einsum("neh,ech->nec", jax.nn.silu(g) * u, down_proj)  # (N, E, C)
    return jnp.einsum("ne,nec->nc", combine.astype(y.dtype), y)  # (N, C)


def exchange(x: jax.Array, chosen: jax.Array, weight: jax.Array, experts, all_to_all, n_shards: int) -> jax.Array:
    """One device's part of expert parallelism (twin_common/moe.py): its tokens x (N, C), their
    choices chosen (N, k, E) and weights (N, k); ``experts`` (x, combine) runs this device's E / S
    experts; ``all_to_all`` (S, P, D) -> (S, P, D) swaps block s with device s of the expert axis.
    Each (token, choice) pair goes to the device holding its expert, in its own slot of a buffer
    of all P = N * k pairs (static shapes: dropless, any routing fits), and comes back the same way."""
    N, k, E = chosen.shape
    C, P, S = x.shape[-1], N * k, n_shards
    # (S, P, E / S): pair p's expert among device s's, one-hot; all zero where s does not hold it
    select = chosen.reshape(P, S, E // S).transpose(1, 0, 2).astype(x.dtype)
    pairs = jnp.broadcast_to(x[:, None, :], (N, k, C)).reshape(P, C)  # (P, C) each pair's token
    send = jnp.concatenate([select.sum(-1, keepdims=True) * pairs[None], select], axis=-1)  # (S, P, C + E/S)
    got = all_to_all(send)  # (S, P, C + E/S): block s holds device s's pairs for this device
    y = experts(got[..., :C].reshape(S * P, C), got[..., C:].reshape(S * P, E // S))  # (S * P, C)
    back = all_to_all(y.reshape(S, P, C))  # (S, P, C): block s, what device s computed for our pairs
    return (back.sum(0).reshape(N, k, C) * weight[..., None].astype(x.dtype)).sum(1)  # (N, C)


class MoE(nnx.Module):
    """The routed MLP: router, then the weighted sum of the chosen experts' outputs."""

    def __init__(self, cfg: BlockConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = linear(cfg.d_model, cfg.n_experts, cfg, False, param_dtype=param_dtype, rngs=rngs)  # kernel (C, E)
        self.experts = Experts(cfg, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.resid_dropout, rngs=rngs)
        # expert parallelism over the mesh's ``expert`` axis: set by the sharding plan
        # (jax_impl/sharding.py, ExpertAllToAll); None on one device or without that axis
        self.dispatch = None

    def __call__(self, x: jax.Array, return_router_logits: bool = False):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        logits = router_logits(flat, self.router.kernel[...])  # (N, E), float32
        if self.dispatch is None:
            combine = route(logits, self.cfg)  # (N, E), float32
            mixed = self.experts(flat, combine)  # (N, C)
        else:  # each pair to its expert's device and back (dropless: the mesh refuses a capacity)
            chosen, weight = choose(logits, self.cfg)  # (N, k, E), (N, k) float32
            mixed = self.dispatch(flat, chosen, weight, self.experts)  # (N, C)
        y = self.dropout(mixed.reshape(B, T, C))
        return (y, logits.reshape(B, T, -1)) if return_router_logits else y
