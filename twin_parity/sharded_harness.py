"""Sharded parity: each twin on a (data, model) mesh against the same twin on one device, the two
sharded twins against each other, and a run resumed across meshes and frameworks.

The devices are simulated on the CPU, in subprocesses, because both engines fix their devices when
they start: JAX gets 8 CPU devices from XLA_FLAGS=--xla_force_host_platform_device_count=8 (set
before JAX initialises its backend), torch N gloo processes forked by torch.multiprocessing. Each
worker compares its sharded run with a one-device run of the same framework in the same process
and writes Result rows (the report's and the tests' format) plus the arrays the cross-framework
checks need. Every run starts from one init file (the torch twin's init, converted), on the same
batches (train_harness.token_batch).

This module launches the workers and compares across frameworks; the workers are
sharded_jax_worker.py and sharded_torch_worker.py, what they share is sharded_compare.py, and the HLO
reading is sharded_hlo.py.

    python -m twin_parity.sharded_harness jax   OUT INIT --meshes 1x2 2x2 [--resume-save PATH]
    python -m twin_parity.sharded_harness torch OUT INIT --mesh 2x2 [--resume-from PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from twin_parity.harness import Result
from twin_parity.sharded_compare import (  # noqa: F401  (SHARDED_TOLERANCE, ROWS_PER_*, the collectives row: read here)
    GPT_CFG,
    JAX_DEVICES,
    JAX_MESHES,
    ROWS_PER_MESH,
    ROWS_PER_RESUME,
    SHARDED_TOLERANCE,
    WORKER_TIMEOUT_S,
    collectives_row,
    compare_training,
    megatron_collectives,
    mesh_name,
    parse_mesh_name,
)
from twin_parity.sharded_hlo import jax_counts  # noqa: F401  (the tests read it here)


def _unplain(node):
    if isinstance(node, dict):
        if "__array__" in node:
            return np.asarray(node["__array__"], dtype=node["dtype"])
        return {k: _unplain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unplain(v) for v in node]
    return node


def write_init(path: str) -> None:
    """The one init every run starts from: the torch twin's (seed 0), in the interchange file."""
    from twin_parity.train_harness import new_torch_gpt

    import weight_conversion as wc

    wc.save(new_torch_gpt(GPT_CFG, "float32", 0), path)


def run_worker(framework: str, out: str, init: str, *args: str, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """Run a worker in a fresh interpreter; its results as a dict (rows as Result)."""
    env = dict(os.environ)
    if framework == "jax":
        # 8 simulated devices. Backend optimisation level 0: LLVM compiles the CPU code ~2x faster
        # (the cost of these checks is compiling ~20 small programs). XLA's own passes, the SPMD
        # partitioner that places the collectives among them, still run in full; the sharded and
        # the one-device programs are built with the same flags and compared with each other.
        flags = f"--xla_force_host_platform_device_count={JAX_DEVICES} --xla_backend_optimization_level=0"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "twin_parity.sharded_harness", framework, out, init, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "results.json")) as f:
        doc = _unplain(json.load(f))
    doc["results"] = [Result(**r) for r in doc["results"]]
    return doc


def cross_framework(torch_doc: dict, jax_doc: dict, mesh=(2, 2)) -> Result:
    """Sharded torch vs sharded JAX on the same mesh: per-step loss and final parameters."""
    name = mesh_name(mesh)
    t, j = torch_doc["runs"][name], jax_doc["runs"][name]
    return compare_training("sharded_train_step", t["losses"], t["weights"], j["losses"], j["weights"],
                            mesh=mesh, framework="both", direction=f"torch:{name}->jax:{name}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("framework", choices=["jax", "torch", "killed-rank"])
    p.add_argument("out")
    p.add_argument("init")
    p.add_argument("--meshes", nargs="+", default=[mesh_name(m) for m in JAX_MESHES])
    p.add_argument("--mesh", default="2x2")
    p.add_argument("--resume-save")
    p.add_argument("--resume-from")
    p.add_argument("--sabotage", action="store_true", help="jax: also compile a wrong plan's forward")
    args = p.parse_args(argv)
    if args.framework == "killed-rank":
        from twin_parity.sharded_torch_worker import run_killed_rank

        doc = run_killed_rank(args.out, args.init)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"results": [], "runs": {"killed_rank": doc}}, f)
    elif args.framework == "jax":
        from twin_parity.sharded_jax_worker import jax_worker

        jax_worker(args.out, args.init, [parse_mesh_name(m) for m in args.meshes], args.resume_save, args.sabotage)
    else:
        from twin_parity.sharded_torch_worker import torch_worker

        torch_worker(args.out, args.init, parse_mesh_name(args.mesh), args.resume_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
