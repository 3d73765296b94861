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

from jax_impl.gpt import GPT, lm_loss, model_loss
from twin_common.checks import check_loss_chunk, check_token_input
from twin_common.train_config import TrainConfig
from weight_conversion.flax_side import flax_path
from twin_common.params import table_for


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

    def mask(params):
        return jax.tree_util.tree_map_with_path(lambda kp, _: decay[flax_path(kp)], params)

    # the shared schedule as a table, one entry past the last step (= min_lr, as lr_at gives torch),
    # in the parameters' dtype: a float32 table rounds a float64 run's rate by up to 6e-8 relative
    # (5e-11 in a float64 weight after one step; torch keeps Python floats)
    dtype = jnp.result_type(*jax.tree.leaves(nnx.state(model, nnx.Param)))
    lrs = jnp.asarray(tcfg.lr_table(tcfg.steps + 1), dtype=dtype)
    schedule = lambda count: lrs[jnp.minimum(count, tcfg.steps)]  # noqa: E731
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


def cast_params(params, dtype):
    """Every parameter in ``dtype`` (bf16 compute), except an MoE router's kernel: the router runs
    in float32 whatever the compute dtype (twin_common/moe.py), on its float32 master weights, as
    torch's twin does with autocast switched off around it."""

    def cast(kp, a):
        return a if flax_path(kp)[-2:] == ("router", "kernel") else a.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def make_train_step(graphdef, tx: optax.GradientTransformation, compute_dtype=None, shardings=None,
                    loss_chunk: int = 0):  # fmt: skip
    """A jitted (params, opt_state, rest, x, y) -> (params, opt_state, rest, loss, grad_norm).

    params and opt_state are donated: XLA updates them in place instead of keeping two copies.
    ``compute_dtype`` (e.g. bfloat16) runs forward and backward in that dtype against float32
    master weights. ``shardings``: (params, opt_state, rest, batch, scalar) shardings over a mesh
    (jax_impl/sharding.py); the step then takes and returns arrays laid out so, and XLA's SPMD
    partitioner inserts the collectives. ``loss_chunk``: see Trainer."""
    kwargs = {}
    if shardings is not None:
        p, o, r, b, s = shardings
        kwargs = {"in_shardings": (p, o, r, b, b), "out_shardings": (p, o, r, s, s)}

    @functools.partial(jax.jit, donate_argnums=(0, 1), **kwargs)
    def train_step(params, opt_state, rest, x, y):
        def loss_of(p):
            if compute_dtype is not None:
                p = cast_params(p, compute_dtype)
            # Fresh Variables for the RNG state inside this trace: NNX refuses to mutate (advance a
            # dropout RNG) a Variable that was created at an outer trace level.
            model = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest))
            loss = model_loss(model, x, y, loss_chunk)  # + the router losses of an MoE model
            return loss, nnx.state(model, nnx.Not(nnx.Param))  # dropout RNG state moves on

        (loss, rest_out), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, rest_out, loss, optax.tree.norm(grads)

    return train_step


def make_eval_loss(graphdef, shardings=None, loss_chunk: int = 0):
    kwargs = {}
    if shardings is not None:  # as make_train_step's
        p, _, r, b, s = shardings
        kwargs = {"in_shardings": (p, r, b, b), "out_shardings": s}

    @functools.partial(jax.jit, **kwargs)
    def eval_loss(params, rest, x, y):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return lm_loss(model, model(x, head=False), y, loss_chunk)

    return eval_loss


class Trainer:
    """A GPT split for the jitted step, its optax state and the step counter: what the training
    script drives. Twin of torch_impl.train.Trainer (same methods, same arguments, NumPy in and out)."""

    def __init__(self, model: GPT, tcfg: TrainConfig, *, compile: bool = True, bf16: bool = False,
                 loss_chunk: int = 0):  # fmt: skip
        """``bf16``: every parameter cast to bfloat16 inside the step, float32 master copies kept
        (JAX's idiom; torch's twin uses autocast, which keeps LayerNorm in float32). ``loss_chunk``:
        the cross-entropy over that many positions at a time (gpt.chunked_loss_fn: the (B, T, V)
        float32 logits never exist at once); 0, the default, computes it over the whole logits."""
        del compile  # always jax.jit-compiled; the flag exists for the torch twin's torch.compile
        self.model, self.tcfg = model, tcfg
        model.train()
        self.tx = make_optimizer(model, tcfg)
        self.graphdef, self.params, self.rest = split(model)
        self.opt_state = self.tx.init(self.params)
        self._commit()
        self.loss_chunk = check_loss_chunk(loss_chunk)
        self._train_step = make_train_step(self.graphdef, self.tx, jnp.bfloat16 if bf16 else None,
                                           loss_chunk=loss_chunk)  # fmt: skip
        self._eval_loss = make_eval_loss(self.graphdef, loss_chunk=loss_chunk)
        self.step_count = 0

    def step(self, x, y) -> tuple[jax.Array, jax.Array]:
        """One optimizer step on NumPy token arrays; returns device scalars (no host sync)."""
        # the model's own id check cannot see values under jit: check the batch on the host
        check_token_input(tuple(x.shape), x.dtype.name, self.model.cfg, (int(x.min()), int(x.max())))
        # int32 on the host: jnp.asarray(x, jnp.int32) would dispatch a conversion op per array
        # (measured 0.15 ms each on the 2-core CPU, np.asarray 2 us); jit copies NumPy arrays in itself
        self.params, self.opt_state, self.rest, loss, norm = self._train_step(
            self.params, self.opt_state, self.rest, np.asarray(x, np.int32), np.asarray(y, np.int32)
        )
        self.step_count += 1
        return loss, norm

    def _commit(self) -> None:
        """Place the state on the default device explicitly. Fresh arrays from nnx.split / tx.init
        are uncommitted, the step's outputs committed, and jit compiles once for each kind: without
        this the first two steps compile twice."""
        device = jax.tree.leaves(self.params)[0].sharding  # where the model was built
        state = (self.params, self.opt_state, self.rest)
        self.params, self.opt_state, self.rest = jax.device_put(state, device)

    def eval_loss(self, x, y) -> float:
        return float(self._eval_loss(self.params, self.rest, jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)))

    def sync_model(self) -> GPT:
        """Write the trained arrays back into the nnx.Module (the jitted step works on copies)."""
        nnx.update(self.model, self.params, self.rest)
        return self.model

    def state(self) -> tuple[dict, dict, int]:
        """(weights, optimizer moments, step) in the interchange layout."""
        import weight_conversion as wc
        from weight_conversion.optim_state import export_optax_state

        optim, count = export_optax_state(self.model.cfg, self.opt_state)
        if count != self.step_count:  # optax's own counter drives its bias correction and schedule
            raise RuntimeError(f"optax is at step {count} but the trainer at {self.step_count}")
        return wc.export(self.sync_model()), optim, self.step_count

    def load(self, weights: dict, optim: dict, step: int) -> None:
        import weight_conversion as wc
        from weight_conversion.optim_state import import_optax_state

        wc.import_(self.sync_model(), weights)
        _, self.params, self.rest = split(self.model)
        self.opt_state = import_optax_state(self.model.cfg, self.tx.init(self.params), optim, step)
        self._commit()
        self.step_count = step

    def rng_state(self) -> dict:
        keys = nnx.state(self.sync_model(), nnx.RngKey)
        leaves = jax.tree_util.tree_leaves_with_path(keys)
        key_data = lambda k: np.asarray(jax.random.key_data(k)).tolist()  # noqa: E731
        return {"jax_rng": {"/".join(map(str, flax_path(kp))): key_data(k) for kp, k in leaves}}

    def set_rng_state(self, saved: dict) -> None:
        if "jax_rng" not in saved:
            return
        model = self.sync_model()
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.RngKey)):
            data = saved["jax_rng"].get("/".join(map(str, path)))
            if data is not None:
                var.set_value(jax.random.wrap_key_data(jnp.asarray(data, jnp.uint32)))
        _, self.params, self.rest = split(model)
        self._commit()

    def sample(self, prompt: list[int], n_new: int, temperature: float = 0.8, seed: int = 0) -> list[int]:
        from jax_impl.generate import continue_prompt

        tokens = continue_prompt(self.sync_model(), prompt, n_new, temperature, seed)
        self.model.clear_cache()  # the KV cache is for generation only: leave the model as it was
        self.model.train()
        return tokens
