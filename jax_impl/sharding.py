"""Tensor, data and expert parallel for the Flax NNX twins on jax.sharding: a Mesh with axes ("data",
"model", "expert"), a PartitionSpec per parameter, jax.jit with in/out shardings.
Twin of torch_impl/sharding.py: same functions, same order; read the two side by side.

The specs are not written here: they are read from the conversion table's ``split`` column
(twin_common/params.py), through the table's transform into the Flax layout (kernel (in, out)).
The model code never mentions devices: XLA's SPMD partitioner (GSPMD) propagates the parameter
layouts through the program and inserts the two all-reduces per block itself. The one exception
is a MoE layer on an ``expert`` axis: its token dispatch is written out (ExpertAllToAll:
jax.shard_map with jax.lax.all_to_all), because where each token goes depends on the router's
values, which no layout propagation can see.

One process drives every device of the host (here 8 simulated CPU devices:
XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX starts); across hosts,
jax.distributed.initialize() first, then the same code over jax.devices().
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_impl.moe import exchange, expert_mlp
from jax_impl.train import Trainer, flax_path, make_eval_loss, make_train_step, split
from twin_common.checks import check_token_input
from twin_common.mesh import AXES, MeshShape, check_mesh
from twin_common.params import table_for


def devices() -> list:
    return jax.devices()


def init_distributed(mesh: MeshShape, cfg, *, batch_size: int | None = None) -> Mesh:
    """Check every size against the visible devices, then build the mesh.

    Across hosts (one process per host), JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID in the environment make this call jax.distributed.initialize() first, the
    counterpart of torchrun's rendezvous: jax.devices() then lists every host's devices."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )  # fmt: skip
    check_mesh(mesh, cfg, n_devices=len(devices()), batch_size=batch_size)
    return make_mesh(mesh)


def make_mesh(mesh: MeshShape) -> Mesh:
    """The (data, model, expert) Mesh over the first data * model * expert devices (row-major, as
    torch's ranks)."""
    return Mesh(np.asarray(devices()[: mesh.size]).reshape(mesh.shape), AXES)


def mesh_shape(mesh: Mesh) -> MeshShape:
    return MeshShape.of(mesh.axis_names, mesh.devices.shape)


def batch_axes(mesh: Mesh):
    """The mesh axes a batch's rows split over: "data", and "expert" too when there is one."""
    return ("data", "expert") if mesh_shape(mesh).expert > 1 else "data"


@dataclasses.dataclass(frozen=True)
class ExpertAllToAll:
    """A MoE layer's dispatch on a mesh with an ``expert`` axis (MoE.dispatch): tokens split over
    (data, expert) as the batch is, experts over "expert"; on each device jax_impl.moe.exchange sends
    every (token, choice) pair to the device of its expert and the result back, two
    jax.lax.all_to_all over "expert". Frozen (hashable): it is static structure of the model."""

    mesh: Mesh

    def __call__(self, x, chosen, weight, experts):
        tokens, stacked = PartitionSpec(batch_axes(self.mesh)), PartitionSpec("expert")
        n_shards = mesh_shape(self.mesh).expert
        all_to_all = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0)

        def local(x, chosen, weight, gate_proj, up_proj, down_proj):  # one device's share of each
            mlp = functools.partial(expert_mlp, gate_proj=gate_proj, up_proj=up_proj, down_proj=down_proj)
            return exchange(x, chosen, weight, mlp, all_to_all, n_shards)

        run = jax.shard_map(local, mesh=self.mesh, in_specs=(tokens, tokens, tokens, stacked, stacked, stacked),
                            out_specs=tokens)  # fmt: skip
        # a token count the row shards do not divide (a decode step's few tokens): padded with
        # tokens that choose no expert (chosen all False: sent nowhere, zero out), cut off after
        n, pad = x.shape[0], -x.shape[0] % mesh_shape(self.mesh).batch_split
        x, chosen, weight = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, chosen, weight))
        return run(x, chosen, weight, experts.gate_proj[...], experts.up_proj[...], experts.down_proj[...])[:n]


def tp_plan(cfg, mesh: MeshShape = MeshShape()) -> dict[tuple, PartitionSpec]:
    """{Flax path: PartitionSpec} for every parameter: the table's mesh axis ("model", or "expert"
    for stacked experts on a mesh with that axis) on the dimension the table splits, None (whole)
    elsewhere. Replicated over "data"."""
    plan = {}
    for spec in table_for(cfg):
        dims = [None] * len(spec.flax_shape)
        dim = spec.split.flax_dim(spec)
        if dim is not None:
            dims[dim] = spec.split.mesh_axis(mesh)
        plan[spec.flax_path] = PartitionSpec(*dims)
    return plan


def expert_plan(cfg, mesh: Mesh) -> dict[tuple, ExpertAllToAll]:
    """{MoE module path: ExpertAllToAll} for every stacked-experts module the table splits over
    ``expert`` on ``mesh`` (none without that axis). Given the Mesh itself, which the dispatch's
    shard_map needs; torch's twin takes a MeshShape, its styles get their process group when
    parallelize_module applies them."""
    return {spec.flax_path[:-2]: ExpertAllToAll(mesh) for spec in table_for(cfg)
            if spec.split.mesh_axis(mesh_shape(mesh)) == "expert"}  # fmt: skip


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over "data" (and "expert"); every "model" device of a row group sees
    the same rows."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Lay ``model``'s parameters out over ``mesh`` in place (its other state, dropout RNG keys,
    whole on every device), and with an ``expert`` axis every MoE layer's dispatch set to the
    all-to-all one."""
    shape = mesh_shape(mesh)
    check_mesh(shape, model.cfg)
    plan = tp_plan(model.cfg, shape)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, plan[tuple(path)])))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param))):
        if isinstance(var.get_value(), jax.Array):
            var.set_value(jax.device_put(var.get_value(), replicated(mesh)))
    for path, dispatch in expert_plan(model.cfg, mesh).items():  # ("blocks", i, "mlp"): the MoE
        step = lambda m, k: m[k] if isinstance(k, int) else getattr(m, k)  # noqa: E731
        moe = functools.reduce(step, path, model)
        moe.dispatch = dispatch
    return model


def state_shardings(model: nnx.Module, mesh: Mesh, tx=None):
    """(params, opt_state, rest, batch, scalar) shardings for make_train_step: optimizer moments
    laid out as their parameters, everything else whole."""
    plan = tp_plan(model.cfg, mesh_shape(mesh))
    _, params, rest = split(model)

    def by_path(kp, leaf):  # moments (mu, nu) are keyed by the same paths as the parameters
        path = flax_path(kp)
        if path in plan and getattr(leaf, "ndim", 0) == len(plan[path]):
            return NamedSharding(mesh, plan[path])
        return replicated(mesh)

    p_sh = jax.tree_util.tree_map_with_path(by_path, params)
    o_sh = jax.tree_util.tree_map_with_path(by_path, jax.eval_shape(tx.init, params)) if tx is not None else None
    r_sh = jax.tree.map(lambda _: replicated(mesh), rest)
    return p_sh, o_sh, r_sh, batch_sharding(mesh), replicated(mesh)


def make_forward(model: nnx.Module, mesh: Mesh, *, return_intermediates: bool = False):
    """A jitted (params, rest, x) -> output over ``mesh``, and the (params, rest) to call it with
    (``model`` is laid out over ``mesh`` first)."""
    graphdef, params, rest = split(shard_model(model, mesh))
    p_sh, _, r_sh, b_sh, _ = state_shardings(model, mesh)

    def forward(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x, return_intermediates=return_intermediates)

    return jax.jit(forward, in_shardings=(p_sh, r_sh, b_sh)), params, rest


class ShardedTrainer(Trainer):
    """jax_impl.train.Trainer on a (data, model, expert) mesh: same methods, same NumPy batches (the
    global batch, laid out over "data" and "expert"), and state() / load() in the same gathered interchange layout.
    Parameters, optimizer state and batches stay sharded on the devices between steps: nothing is
    fetched to the host except the loss the caller asks for."""

    def __init__(self, model, tcfg, mesh: Mesh, *, compile: bool = True, bf16: bool = False):
        check_mesh(mesh_shape(mesh), model.cfg, batch_size=tcfg.batch_size)
        self.mesh = mesh
        shard_model(model, mesh)
        self.shardings = None
        super().__init__(model, tcfg, compile=compile, bf16=bf16)
        self.shardings = state_shardings(model, mesh, self.tx)
        self._commit()
        self._train_step = make_train_step(self.graphdef, self.tx, jnp.bfloat16 if bf16 else None, self.shardings)
        self._eval_loss = make_eval_loss(self.graphdef, self.shardings)

    def _commit(self) -> None:
        """Every array on its sharding (fresh ones from split / tx.init / a checkpoint included),
        so the jitted step compiles once and never reshards its inputs."""
        if self.shardings is None:  # during Trainer.__init__: the shardings come next
            return
        p_sh, o_sh, r_sh, _, _ = self.shardings
        self.params, self.opt_state, self.rest = jax.device_put((self.params, self.opt_state, self.rest), (p_sh, o_sh, r_sh))

    def _batch(self, a) -> jax.Array:
        return jax.device_put(np.asarray(a, np.int32), self.shardings[3])

    def step(self, x, y):
        check_token_input(tuple(x.shape), x.dtype.name, self.model.cfg, (int(x.min()), int(x.max())))
        self.params, self.opt_state, self.rest, loss, norm = self._train_step(
            self.params, self.opt_state, self.rest, self._batch(x), self._batch(y)
        )
        self.step_count += 1
        return loss, norm

    def eval_loss(self, x, y) -> float:
        return float(self._eval_loss(self.params, self.rest, self._batch(x), self._batch(y)))
