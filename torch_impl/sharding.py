"""Tensor, data and expert parallel for the PyTorch twins on torch.distributed: a DeviceMesh with axes
("data", "model", "expert"), DTensor Linears from a parallelize plan, data parallel over "data" (and
"expert").
Twin of jax_impl/sharding.py: same functions, same order; read the two side by side.

The plan is not written here: it is read from the conversion table's ``split`` column
(twin_common/params.py). A Linear whose weight is split by output features becomes
ColwiseParallel, one split by input features RowwiseParallel; everything else stays whole.

One process per device, started by torchrun (or torch.multiprocessing, forking, in the tests), each
running this same code: gloo on CPU, NCCL on GPU. The DTensor styles insert the two all-reduces per
block; FSDP2's replicate() averages gradients over "data". The one collective written by hand is a
MoE layer's token dispatch on an ``expert`` axis (ExpertAllToAll: dist.all_to_all_single, which gloo
runs on CPU), because where each token goes depends on the router's values.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from torch_impl.moe import exchange, expert_mlp
from torch_impl.train import Trainer
from twin_common.mesh import AXES, MeshShape, check_mesh
from twin_common.params import Split, table_for

# How long a rank waits in a collective for the others before it gives up with an error (gloo's
# and NCCL's default is 10 minutes; a killed peer usually surfaces at once as a closed connection).
DEFAULT_TIMEOUT_S = 120.0
_timeout_s = DEFAULT_TIMEOUT_S  # the one this process group was made with


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(mesh: MeshShape, cfg, *, batch_size: int | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DeviceMesh:  # fmt: skip
    """Join the process group torchrun (or spawn) set up through the environment and build the mesh.

    Every size is checked first, against the world size torchrun announces (WORLD_SIZE), so a
    wrong --mesh fails in every process with the same message before any connection is made."""
    global _timeout_s
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_mesh(mesh, cfg, n_devices=world, batch_size=batch_size, exact_devices=True)
    if not dist.is_initialized():
        backend = "nccl" if device_type() == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        _timeout_s = timeout_s
    return make_mesh(mesh)


def finish(device_mesh: DeviceMesh) -> None:
    """End this process's part of a job that succeeded: a barrier in each of the mesh's process
    groups (every rank has finished every collective), then the groups are destroyed, as torch's
    distributed docs ask of a program before it exits."""
    if not dist.is_initialized():
        return
    for name in device_mesh.mesh_dim_names:
        dist.barrier(group=device_mesh.get_group(name))
    dist.barrier()
    dist.destroy_process_group()


def exit_now(code: int) -> NoReturn:
    """End a process that joined a gloo/NCCL job with ``code``, its output flushed, without the
    interpreter's teardown (os._exit).

    Why: a gloo worker thread frees each collective's tensors after the rank has already moved on.
    When that falls inside interpreter finalization, the thread needs the GIL, Python ends the
    thread, and the C++ runtime aborts the rank after its work is done ("terminate called without
    an active exception", SIGABRT; gdb: ~AsyncAllreduceWork -> decref_pyobject -> take_gil ->
    pthread_exit). Measured on a 2-core CPU, two-process scripts.train runs that resume and sample:
    4 aborts in 110 runs as it was, 1 in 55 with finish() alone (a barrier does not wait for the
    worker thread to free a finished collective), none in 105 with this. Every file the run writes is
    complete by then (written to a temporary name, flushed and renamed), so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def make_mesh(mesh: MeshShape) -> DeviceMesh:
    """The (data, model, expert) DeviceMesh over this process group (ranks in row-major order)."""
    return init_device_mesh(device_type(), mesh.shape, mesh_dim_names=AXES)


def mesh_shape(device_mesh: DeviceMesh) -> MeshShape:
    return MeshShape.of(device_mesh.mesh_dim_names, device_mesh.shape)


def batch_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The ranks a batch's rows split over: "data", or "data" and "expert" flattened into one axis
    when there is an expert axis (DeviceMesh._flatten, as torchtitan builds its data-parallel mesh)."""
    if mesh_shape(device_mesh).expert == 1:
        return device_mesh["data"]
    return device_mesh["data", "expert"]._flatten("data_expert")


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single over ``group`` on (S, ...) blocks, with its gradient: the same exchange
    of the gradient's blocks (block s came from rank s, so its gradient goes back to rank s)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


def _mean_over_rows(param: torch.Tensor, group, n_rows: int) -> None:
    """A post-accumulate-grad hook for experts split over "expert": their gradient -> the whole
    batch's. This rank's experts received, through the all-to-all's backward, the gradients of every
    expert rank's loss (each the mean over that rank's rows); the sum over "data" and a division by
    the number of row shards (data x expert) makes it the mean over all of them. FSDP2's replicate()
    cannot do this one: it reduces when a module's forward ran, and the dispatch reads the stacked
    weights without calling Experts.forward. (JAX differentiates one program of the global loss:
    nothing to add there.)"""
    with torch.no_grad():
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        dist.all_reduce(grad, group=group)
        grad.div_(n_rows)


class ExpertAllToAll(ParallelStyle):
    """A MoE layer's dispatch on a mesh with an ``expert`` axis (MoE.dispatch; applied to the MoE
    module over the "expert" submesh): the stacked experts become DTensors, whole experts per rank
    (the table's EXPERTS split over "expert", Shard(0)); on each rank torch_impl.moe.exchange sends
    every (token, choice) pair of its rows to the rank of its expert and the result back, two
    all_to_all_single over "expert". Twin of jax_impl.sharding.ExpertAllToAll."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from torch.distributed.tensor import Shard, distribute_tensor

        experts = module.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            experts.register_parameter(name, nn.Parameter(distribute_tensor(param.data, device_mesh, [Shard(0)])))
        self.group, self.n_shards = device_mesh.get_group(), device_mesh.size()
        module.dispatch = self
        return module

    def __call__(self, x, chosen, weight, experts):
        all_to_all = functools.partial(_AllToAll.apply, group=self.group)
        local = [p.to_local() for p in (experts.gate_proj, experts.up_proj, experts.down_proj)]  # this rank's experts
        mlp = functools.partial(expert_mlp, gate_proj=local[0], up_proj=local[1], down_proj=local[2])
        return exchange(x, chosen, weight, mlp, all_to_all, self.n_shards)


class ExpertParallel(ParallelStyle):
    """Expert parallelism for a MoE layer's stacked experts (torch_impl/moe.py, Experts): whole
    experts per device (the table's EXPERTS split, Shard(0)); the tokens and combine weights
    enter whole (Replicate), each device runs its own experts, and the weighted sum over experts
    leaves partial sums that one all-reduce completes before the output leaves as a plain tensor.
    torch has no ready-made style for this (ColwiseParallel / RowwiseParallel are for Linears);
    JAX needs none: its PartitionSpec on the stacked arrays is the whole plan."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, device_mesh, [Shard(0)])))

        def whole_inputs(_, args):
            return tuple(DTensor.from_local(a, device_mesh, [Replicate()], run_check=False) for a in args)

        def all_reduced(_, __, out):
            return out.redistribute(device_mesh, [Replicate()]).to_local()

        module.register_forward_pre_hook(whole_inputs)
        module.register_forward_hook(all_reduced)
        return module


def tp_plan(cfg, mesh: MeshShape = MeshShape()) -> dict[str, ColwiseParallel | RowwiseParallel]:
    """{module path: DTensor style} for every Linear the table splits over ``model`` (on ``mesh``:
    stacked experts too when it has no expert axis).

    ColwiseParallel shards weight (out, in) and bias on dim 0 and, with use_local_output (its
    default), hands the next module a plain tensor of C / model local features; RowwiseParallel
    shards weight on dim 1, keeps the bias whole and all-reduces its output."""
    styles = {Split.OUT_FEATURES: ColwiseParallel, Split.IN_FEATURES: RowwiseParallel}
    plan = {}
    for spec in table_for(cfg):
        module, _, name = spec.torch_key.rpartition(".")
        if name == "weight" and spec.split in styles:
            plan[module] = styles[spec.split]()
        elif spec.split is Split.EXPERTS and spec.split.mesh_axis(mesh) == "model":
            plan[module] = ExpertParallel()  # the stacked experts: one style for the module
    # The styles decide the bias placement themselves: check that they agree with the table.
    for spec in table_for(cfg):
        module, _, name = spec.torch_key.rpartition(".")
        if name == "bias" and module in plan:
            colwise = isinstance(plan[module], ColwiseParallel)
            expected = Split.OUT_FEATURES if colwise else Split.REPLICATED
            if spec.split is not expected:
                style = type(plan[module]).__name__
                raise AssertionError(f"{spec.torch_key}: the table says {spec.split}, {style} "
                                     f"does {expected}")
    return plan


def expert_plan(cfg, mesh: MeshShape) -> dict[str, ExpertAllToAll]:
    """{MoE module path: ExpertAllToAll} for every stacked-experts module the table splits over
    ``expert`` on ``mesh`` (none without that axis)."""
    return {spec.torch_key.rsplit(".", 2)[0]: ExpertAllToAll() for spec in table_for(cfg)
            if spec.split.mesh_axis(mesh) == "expert"}  # fmt: skip


def shard_model(model: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
    """Make ``model`` (built on every rank from the same weights) tensor-parallel over "model",
    expert-parallel over "expert" and data-parallel over "data" (and "expert"), in place.
    Parameters become DTensors."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    shape = mesh_shape(device_mesh)
    check_mesh(shape, model.cfg)
    parallelize_module(model, device_mesh["model"], tp_plan(model.cfg, shape))
    experts = expert_plan(model.cfg, shape)
    if experts:
        parallelize_module(model, device_mesh["expert"], experts)
    # Data parallel: FSDP2's replicate() keeps whole copies along "data" (and "expert") and averages
    # gradients after backward (DDP semantics, FSDP2 machinery: it accepts the DTensor parameters
    # above). Experts split over "expert" are left out of it: a hook averages theirs.
    split_experts = {p for path in experts for p in model.get_submodule(path).experts.parameters()}
    data = device_mesh.get_group("data")
    mean = functools.partial(_mean_over_rows, group=data, n_rows=shape.batch_split)
    for p in split_experts:
        p.register_post_accumulate_grad_hook(mean)
    rows = batch_mesh(device_mesh)
    blocks = getattr(model, "blocks", None)
    for block in blocks if blocks is not None else ():
        replicate(block, mesh=rows, ignored_params=split_experts)
    replicate(model, mesh=rows, ignored_params=split_experts)
    return model


def local_rows(x, device_mesh: DeviceMesh):
    """This process's slice of a global batch: rows split over "data" (and "expert", data-major), the
    same on every "model" rank."""
    n = mesh_shape(device_mesh).batch_split
    rows = x.shape[0] // n
    start = batch_mesh(device_mesh).get_local_rank() * rows
    return x[start : start + rows]


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a DTensor's shards put together; a plain tensor as it is)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def place_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (whole, the same on every rank) laid out as ``like``: each rank keeps its own slice.
    src_data_rank=None: every rank already holds the data, so nothing is sent."""
    if not isinstance(like, DTensor):
        return t.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


_COMM_FAILURE_WORDS = ("gloo", "NCCL", "Connection closed", "Timed out", "timed out")


class PeerFailure(RuntimeError):
    """Another process of the job died or hung: this one stops instead of waiting forever."""


class ShardedTrainer(Trainer):
    """torch_impl.train.Trainer on a (data, model, expert) mesh: same methods, same NumPy batches (the
    global batch; each process takes its rows), and state() / load() in the same gathered
    interchange layout, so a checkpoint moves between any mesh, either framework, one device."""

    def __init__(self, model, tcfg, device_mesh: DeviceMesh, *, compile: bool = False, bf16: bool = False):
        check_mesh(mesh_shape(device_mesh), model.cfg, batch_size=tcfg.batch_size)
        self.mesh = device_mesh
        self.timeout_s = _timeout_s
        shard_model(model, device_mesh)
        super().__init__(model, tcfg, compile=compile, bf16=bf16)
        # The parameters AdamW holds, by name. FSDP2 swaps a module's registered parameters for
        # unsharded copies during a forward and, after one without backward (evaluation, sampling),
        # leaves the copies registered: named_parameters() then no longer finds AdamW's state.
        self.params = dict(model.named_parameters())
        # an MoE's load-balancing loss over the whole batch, as on one device (torch_impl/moe.py)
        self.loss_of = functools.partial(self.loss_of, data_mean=self._data_mean_no_grad)

    def _data_mean_no_grad(self, value: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._mean_over_data(value)

    def _mean_over_data(self, value: torch.Tensor) -> torch.Tensor:
        """A per-process mean (over this process's rows) -> the global batch's mean (over "data" and
        "expert": the router losses' statistics pooled as one device pools them)."""
        from torch.distributed.tensor import Partial

        return DTensor.from_local(value, batch_mesh(self.mesh), [Partial("avg")]).full_tensor()

    def step(self, x, y):
        try:
            loss, norm = super().step(local_rows(x, self.mesh), local_rows(y, self.mesh))
            return self._mean_over_data(loss), norm
        except RuntimeError as e:
            # gloo / NCCL: a peer closed its connection, or a collective timed out. DTensor's async
            # collectives surface it as a plain RuntimeError from wait_tensor: match the text too.
            lost_peer = any(w in str(e) for w in _COMM_FAILURE_WORDS)
            if not isinstance(e, dist.DistError) and not lost_peer:
                raise
            raise PeerFailure(
                f"rank {dist.get_rank()}: a collective failed at step {self.step_count}; another "
                f"process of this job has probably died or hung (collective timeout "
                f"{self.timeout_s:.0f} s). "
                f"Resume from the last checkpoint. ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None

    def eval_loss(self, x, y) -> float:
        from torch_impl.train import eval_loss

        local = eval_loss(self.model, self._tensor(local_rows(x, self.mesh)), self._tensor(local_rows(y, self.mesh)), self.loss_of)
        return float(self._mean_over_data(local))

    def state(self):
        """(weights, optimizer moments, step), gathered, in the interchange layout (on every rank)."""
        from weight_conversion.optim_state import MOMENTS, optim_key
        from weight_conversion.torch_side import tensor_to_numpy

        params = self.params
        weights, optim, steps = {}, {}, set()
        for spec in table_for(self.model.cfg):
            p = params[spec.torch_key]
            weights[spec.torch_key] = tensor_to_numpy(gather(p.detach()))
            state = self.optimizer.state.get(p, {})
            for m in MOMENTS:
                optim[optim_key(m, spec.torch_key)] = (
                    tensor_to_numpy(gather(state[m])) if state else np.zeros(spec.torch_shape, np.float32)
                )
            steps.add(int(state["step"]) if state else 0)
        if steps != {self.step_count}:
            raise RuntimeError(f"AdamW is at steps {sorted(steps)} but the trainer at {self.step_count}")
        return weights, optim, self.step_count

    def load(self, weights: dict, optim: dict, step: int) -> None:
        """Every rank reads the same gathered arrays and keeps its own slices; checks first."""
        from weight_conversion.optim_state import MOMENTS, check_optim_arrays, optim_key
        from weight_conversion.torch_side import numpy_to_tensor
        from weight_conversion.validate import check

        table = table_for(self.model.cfg)
        check(weights, table, str(next(self.model.parameters()).dtype).removeprefix("torch."))
        check_optim_arrays(self.model.cfg, optim)
        params = self.params
        with torch.no_grad():
            for spec in table:
                p = params[spec.torch_key]
                p.copy_(place_like(numpy_to_tensor(weights[spec.torch_key]), p))
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(step), dtype=torch.float32),
                    **{m: place_like(numpy_to_tensor(optim[optim_key(m, spec.torch_key)]), p) for m in MOMENTS},
                }
        self.step_count = step
