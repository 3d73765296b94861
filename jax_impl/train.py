"""Training step in JAX: optax AdamW with the project's pinned hyperparameters, global-norm clipping,
the shared warmup + cosine schedule, one jax.jit-compiled step with donated buffers.
Twin of torch_impl/train.py.

NNX modules are split into a static graph definition and pytrees of arrays (parameters, and the
rest: dropout RNG state); the jitted step is a pure function of those pytrees, as optax expects.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_impl.gpt import GPT, loss_fn
from twin_common.train_config import TrainConfig
from weight_conversion.table import table_for


def flax_path(keypath) -> tuple:
    """A pytree key path into an nnx.State -> the table's Flax path, e.g. ("blocks", 0, "ln_1", "scale")."""
    return tuple(k.key for k in keypath if isinstance(k, jax.tree_util.DictKey))


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_'s rule: scale by min(1, max_norm / (norm + 1e-6)).

    optax.clip_by_global_norm scales by max_norm / norm with no epsilon, a relative difference of
    1e-6 / norm in every clipped step; small, but it compounds through Adam's moments."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(model: GPT, tcfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW with a decay mask built from the conversion table (matrices only)."""
    decay = {spec.flax_path: spec.decay for spec in table_for(model.cfg)}
    mask = lambda params: jax.tree_util.tree_map_with_path(lambda kp, _: decay[flax_path(kp)], params)  # noqa: E731
    lrs = jnp.asarray(tcfg.lr_table(), dtype=jnp.float32)
    schedule = lambda count: lrs[jnp.minimum(count, lrs.shape[0] - 1)]  # noqa: E731  the shared table
    adamw = optax.adamw(
        schedule, b1=tcfg.beta1, b2=tcfg.beta2, eps=tcfg.eps, eps_root=0.0,
        weight_decay=tcfg.weight_decay, mask=mask,
    )  # fmt: skip
    if tcfg.grad_clip > 0:
        return optax.chain(clip_by_global_norm_like_torch(tcfg.grad_clip), adamw)
    return optax.chain(optax.identity(), adamw)  # same state structure with and without clipping


def split(model: GPT):
    """(graphdef, params, rest): the static structure, the trainable arrays, everything else."""
    return nnx.split(model, nnx.Param, ...)


def make_train_step(graphdef, tx: optax.GradientTransformation, compute_dtype=None):
    """A jitted (params, opt_state, rest, x, y) -> (params, opt_state, rest, loss, grad_norm).

    params and opt_state are donated: XLA updates them in place instead of keeping two copies.
    ``compute_dtype`` (e.g. bfloat16) runs forward and backward in that dtype against float32
    master weights."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, rest, x, y):
        def loss_of(p):
            if compute_dtype is not None:
                p = jax.tree.map(lambda a: a.astype(compute_dtype), p)
            model = nnx.merge(graphdef, p, rest)
            loss = loss_fn(model(x), y)
            return loss, nnx.state(model, nnx.Not(nnx.Param))  # dropout RNG state moves on

        (loss, rest_out), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, rest_out, loss, optax.tree.norm(grads)

    return train_step


def make_eval_loss(graphdef):
    @jax.jit
    def eval_loss(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return loss_fn(model(x), y)

    return eval_loss


def to_numpy_tree(tree) -> dict:
    return {flax_path(kp): np.asarray(leaf) for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}
