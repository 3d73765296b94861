"""``scripts.train --mesh``: the glue between the training CLI and the two sharded trainers (parse and
check the mesh, join the process group, pick the framework's ShardedTrainer, and keep ranks other than
0 from writing). The mesh itself is framework-neutral and lives in twin_common/mesh.py."""

from __future__ import annotations

import os
import sys

from twin_common.mesh import parse_mesh


def setup(framework: str, text: str | None, model_cfg, batch_size: int):
    """``scripts.train --mesh``: parse, check every size (one ValueError, before any work), then join
    the process group (torch, under torchrun) or lay the mesh over the visible devices (JAX).
    Returns the framework's mesh object, or None without --mesh."""
    if not text:
        return None
    if framework not in ("torch", "jax"):
        raise ValueError("--mesh is for --framework torch or jax")
    shape = parse_mesh(text)
    if framework == "torch":
        from torch_impl.sharding import init_distributed
    else:
        from jax_impl.sharding import init_distributed
    return init_distributed(shape, model_cfg, batch_size=batch_size)


def leave_job(code: int, framework: str, device_mesh) -> None:
    """The end of a ``--mesh`` run. A JAX mesh needs nothing. A torch process leaves its process
    groups (after a clean run: barriers, then destroyed; see torch_impl.sharding.finish) and then
    ends at once with ``code``, skipping the interpreter's teardown (torch_impl.sharding.exit_now
    says why); without --mesh, or in JAX, this returns."""
    if framework != "torch" or device_mesh is None:
        return
    from torch_impl.sharding import exit_now, finish

    if code == 0:
        finish(device_mesh)
    exit_now(code)


def sharded_trainer(framework: str, model, tcfg, device_mesh, **kwargs):
    """The framework's ShardedTrainer: the Trainer's methods, over ``device_mesh``."""
    if framework == "torch":
        from torch_impl.sharding import ShardedTrainer
    else:
        from jax_impl.sharding import ShardedTrainer
    return ShardedTrainer(model, tcfg, device_mesh, **kwargs)


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (RANK), process 0 of a multi-host JAX job (JAX_PROCESS_ID), or a
    single process: the one that writes checkpoints, logs and output."""
    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("JAX_PROCESS_ID", "0")) == 0


class FollowerRun:
    """The run folder as a process other than rank 0 sees it: it reads like rank 0 (to resume from
    the same checkpoint) and writes nothing. ``save`` still gathers the trainer's state, because
    gathering is a collective that every rank must join."""

    def __init__(self, run):
        self._run = run

    def __getattr__(self, name):
        return getattr(self._run, name)

    def save(self, trainer, model_cfg, extra) -> str:
        _, _, step = trainer.state()
        return os.path.join(self._run.path, "ckpt", f"step_{step:06d}.safetensors")

    def append_log(self, record) -> None:
        pass

    def truncate_log(self, step) -> None:
        pass

    def remove_temporaries(self) -> list[str]:
        return []

    def start_over(self) -> None:
        pass


def run_for_this_process(run):
    """``run`` on rank 0 (or one process); a FollowerRun elsewhere, with its output silenced."""
    if is_main_process():
        return run
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
    return FollowerRun(run)
