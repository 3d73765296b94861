"""A model family's GPT on (data, model) meshes against one device, in each framework: the forward
logits and 5 AdamW steps' losses. The report's MoE rows (experts over ``model``) and Llama rows
(key/value heads over ``model``) both run here, each with its own config; the dense GPT's sharded
rows (gradients, collectives, resume) are sharded_harness.py's workers.

JAX runs in a subprocess started with 4 simulated CPU devices (both engines fix their devices when
they start); torch runs as gloo processes forked from this one. The config reaches the JAX
subprocess as its JSON dict.

    python -m twin_parity.sharded_rows jax-sharded CONFIG_JSON 1x2 2x2
"""

from __future__ import annotations

import numpy as np

from twin_parity import harness as h
from twin_parity import train_harness as th
from twin_parity.generate_harness import model_name
from twin_parity.sharded_compare import mesh_name, parse_mesh_name
from twin_common import GPTConfig
from twin_common.precision import matched_precision

STEPS = 5  # AdamW steps each mesh's run is compared over
# The parameters whose split a row records: key/value heads for every family, the experts of an MoE
SPLIT_PARAMS = {"kv_heads": ("attn", "k_proj"), "experts": ("mlp", "experts", "gate_proj")}


def _splits(cfg: GPTConfig, describe) -> dict:
    """{what: how it is placed} for SPLIT_PARAMS present in ``cfg``; ``describe(path)`` reads one."""
    names = [n for n in SPLIT_PARAMS if n != "experts" or cfg.mlp == "moe"]
    return {n: describe(SPLIT_PARAMS[n]) for n in names}


def _row(check: str, err: float, framework: str, mesh, cfg: GPTConfig, splits: dict) -> h.Result:
    tcfg, ok, name = th.TRAJECTORY, err <= th.TRAIN_TOLERANCE, mesh_name(mesh)
    return h.Result(
        check, [tcfg.batch_size, tcfg.seq_len], "float32", "cpu" if framework == "torch" else None,
        "cpu" if framework == "jax" else None, f"{framework}:1 device->{framework}:{name}", err, err,
        th.TRAIN_TOLERANCE, ok, None if ok else check, config={"model": model_name(cfg), "splits": splits, "steps": STEPS},
    )  # fmt: skip


def _batches(cfg: GPTConfig) -> list:
    tcfg = th.TRAJECTORY
    return [th.token_batch(cfg, tcfg.batch_size, tcfg.seq_len, 0, s) for s in range(STEPS)]


def _loss_error(ref: list[float], got: list[float]) -> float:
    return max(abs(a - b) / abs(a) for a, b in zip(ref, got))


def jax_sharded_rows(cfg: GPTConfig, meshes) -> list[h.Result]:
    """JAX on each (data, model) mesh of simulated CPU devices against one device, in this process
    (which must have started with XLA_FLAGS=--xla_force_host_platform_device_count >= 4). The table
    says what splits over ``model`` (q/k/v by heads, whole experts); GSPMD adds the collectives."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl import sharding as S
    from jax_impl.gpt import GPT
    from jax_impl.train import Trainer
    from twin_common.mesh import MeshShape

    tcfg, batches = th.TRAJECTORY, _batches(cfg)
    x = jnp.asarray(batches[0][0], jnp.int32)
    rows = []
    with matched_precision():
        ref = np.asarray(GPT(cfg, rngs=nnx.Rngs(0))(x))
        one = Trainer(GPT(cfg, rngs=nnx.Rngs(0)), tcfg)
        ref_losses = [float(one.step(*b)[0]) for b in batches]
        for mesh in meshes:
            m = S.make_mesh(MeshShape(*mesh))
            forward, params, rest = S.make_forward(GPT(cfg, rngs=nnx.Rngs(0)), m)
            err = float(np.max(np.abs(np.asarray(forward(params, rest, x)) - ref)))
            trainer = S.ShardedTrainer(GPT(cfg, rngs=nnx.Rngs(0)), tcfg, m)
            losses = [float(trainer.step(*b)[0]) for b in batches]

            def describe(path):
                node = trainer.params["blocks"][0]
                for key in path:
                    node = node[key]
                return str(getattr(node, "kernel", node).sharding.spec)

            splits = _splits(cfg, describe)
            rows += [_row(check, e, "jax", mesh, cfg, splits)
                     for check, e in (("sharded_forward", err), ("sharded_train_step", _loss_error(ref_losses, losses)))]  # fmt: skip
    return rows


def run_jax_sharded(cfg: GPTConfig, meshes, timeout: float = 600) -> list[h.Result]:
    """jax_sharded_rows in a subprocess with 4 simulated CPU devices."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "twin_parity.sharded_rows", "jax-sharded", json.dumps(cfg.to_dict()),
           *map(mesh_name, meshes)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"the sharded {model_name(cfg)} worker failed:\n{proc.stderr[-3000:]}")
    return [h.Result(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _torch_rank(rank: int, world: int, port: int, out: str, mesh: tuple[int, int], cfg: GPTConfig) -> None:
    """One gloo process of the torch run on ``mesh`` (data, model): logits and STEPS AdamW steps'
    losses of ``cfg``, written by rank 0 with the placements of the split parameters."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # what torchrun sets  # fmt: skip
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # FSDP2's hooks, harmless here
    import torch

    from torch_impl import sharding as S
    from torch_impl.gpt import GPT
    from twin_common.mesh import MeshShape

    torch.set_num_threads(1)
    tcfg, batches = th.TRAJECTORY, _batches(cfg)
    device_mesh = S.init_distributed(MeshShape(*mesh), cfg, batch_size=tcfg.batch_size, timeout_s=60)
    torch.manual_seed(0)
    model = S.shard_model(GPT(cfg), device_mesh).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(S.local_rows(batches[0][0], device_mesh))).numpy()
    torch.manual_seed(0)
    trainer = S.ShardedTrainer(GPT(cfg), tcfg, device_mesh)
    losses = [float(trainer.step(*b)[0]) for b in batches]
    def describe(path):
        node = trainer.model.blocks[0]
        for key in path:  # a Linear (its weight) or a parameter (the stacked experts)
            node = getattr(node, key)
        return str(getattr(node, "weight", node).placements)

    splits = _splits(cfg, describe)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"logits": logits.tolist(), "losses": losses, "splits": splits}, f)
    torch.distributed.destroy_process_group()


def torch_sharded_rows(cfg: GPTConfig, mesh: tuple[int, int] = (1, 2)) -> list[h.Result]:
    """torch on ``mesh`` (gloo processes, forked) against one device in this process: the forward
    logits of rank 0's rows and STEPS AdamW steps' losses."""
    import json
    import os
    import socket
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from torch_impl.gpt import GPT
    from torch_impl.train import Trainer

    batches = _batches(cfg)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.start_processes(_torch_rank, args=(mesh[0] * mesh[1], port, out, mesh, cfg), nprocs=mesh[0] * mesh[1],
                           start_method="fork")  # fmt: skip
        with open(out) as f:
            doc = json.load(f)
    with matched_precision():
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        with torch.no_grad():
            ref = model(torch.from_numpy(batches[0][0][: batches[0][0].shape[0] // mesh[0]])).numpy()
        torch.manual_seed(0)
        one = Trainer(GPT(cfg), th.TRAJECTORY)
        ref_losses = [float(one.step(*b)[0]) for b in batches]
    err = float(np.max(np.abs(np.asarray(doc["logits"]) - ref)))
    return [_row(check, e, "torch", mesh, cfg, doc["splits"])
            for check, e in (("sharded_forward", err), ("sharded_train_step", _loss_error(ref_losses, doc["losses"])))]  # fmt: skip


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) < 4 or sys.argv[1] != "jax-sharded":
        sys.exit("usage: python -m twin_parity.sharded_rows jax-sharded CONFIG_JSON DxM [DxM ...]")
    config = GPTConfig.from_dict(json.loads(sys.argv[2]))
    meshes = [parse_mesh_name(text).shape for text in sys.argv[3:]]
    print(json.dumps([r.to_json() for r in jax_sharded_rows(config, meshes)]))
