"""The torch sharded worker: one gloo process per simulated device (forked), each a rank of the
sharded trainer, compared here with one device; and a run whose rank is killed mid-collective."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from twin_parity.train_harness import token_batch
from twin_common.mesh import MeshShape
from twin_parity.sharded_compare import (
    BLOCK_CFG,
    GPT_CFG,
    RESUME_AT,
    TCFG,
    collectives_row,
    compare_named,
    compare_training,
    mesh_name,
    write_results,
)


def _torch_rank(rank: int, world: int, port: int, out: str, init: str, shape: MeshShape, resume_from) -> None:
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # what torchrun sets  # fmt: skip
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # FSDP2's hooks, harmless here
    import torch
    from torch.distributed.tensor.debug import CommDebugMode

    import weight_conversion as wc
    from torch_impl import sharding as S
    from torch_impl.block import Block
    from torch_impl.gpt import GPT, loss_fn
    from weight_conversion.safetensors_io import load_file

    torch.set_num_threads(1)  # N processes share 2 cores
    torch.set_float32_matmul_precision("highest")  # torch's CPU default, pinned as in matched_precision
    weights, _ = load_file(init)
    block_init = {k.removeprefix("blocks.0."): v for k, v in weights.items() if k.startswith("blocks.0.")}
    device_mesh = S.init_distributed(shape, GPT_CFG, batch_size=TCFG.batch_size, timeout_s=60)
    data_rank, model_rank = device_mesh.get_local_rank("data"), device_mesh.get_local_rank("model")
    x_tok, y_tok = token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, 0)
    x_act = np.random.default_rng(1).standard_normal((TCFG.batch_size, TCFG.seq_len, BLOCK_CFG.d_model)).astype(np.float32)
    result = {}

    def build(cls, cfg, w):
        torch.manual_seed(0)
        m = cls(cfg)
        wc.import_(m, w)
        return m

    # forward: every intermediate of this process's rows, and the collectives it issued
    for name, model, x in (("gpt", build(GPT, GPT_CFG, weights), x_tok), ("block", build(Block, BLOCK_CFG, block_init), x_act)):
        S.shard_model(model, device_mesh)
        model.eval()
        comm = CommDebugMode()
        with torch.no_grad(), comm:
            _, inter = model(torch.from_numpy(S.local_rows(x, device_mesh)), return_intermediates=True)
        result[f"fwd/{name}"] = {k: v.numpy() for k, v in inter.items()}
        counts = {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}
        by_module = {mod: {str(op).split(".")[-1]: n for op, n in d.get("forward", {}).items()}
                     for mod, d in comm.comm_module_counts.items() if d.get("forward")}  # fmt: skip
        result[f"comm/{name}"] = {"counts": counts, "by_module": by_module}
    # gradients of the GPT loss on the global batch (each process: its rows; FSDP2 averages)
    trainer = S.ShardedTrainer(build(GPT, GPT_CFG, weights), TCFG, device_mesh)
    loss = loss_fn(trainer.model(torch.from_numpy(S.local_rows(x_tok, device_mesh))),
                   torch.from_numpy(S.local_rows(y_tok, device_mesh)))  # fmt: skip
    loss.backward()
    result["grad"] = {k: S.gather(p.grad).numpy().copy() for k, p in trainer.model.named_parameters()}
    losses = []
    for s in range(TCFG.steps):
        losses.append(float(trainer.step(*token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, s))[0]))
    result["losses"], result["weights"] = losses, trainer.state()[0]
    placements = {k: str(getattr(p, "placements", None)) for k, p in trainer.model.named_parameters()}
    result["placements"] = placements
    if resume_from:
        from weight_conversion.checkpoint import load_checkpoint

        resumed = S.ShardedTrainer(build(GPT, GPT_CFG, weights), TCFG, device_mesh)
        w, optim, meta = load_checkpoint(resume_from, GPT_CFG)
        resumed.load(w, optim, meta["step"])
        result["resume_losses"] = [
            float(resumed.step(*token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, s))[0])
            for s in range(meta["step"], TCFG.steps)
        ]
        result["resume_weights"] = resumed.state()[0]
    if model_rank == 0:
        _pickle_free_save(os.path.join(out, f"rank_{data_rank}.npz"), result)
    S.finish(device_mesh)


def _killed_rank(rank: int, port: int, out: str, init: str) -> None:
    """Two ranks on (1, 2): rank 1 dies (os._exit) before the first step, rank 0 steps and must fail
    with PeerFailure instead of waiting; it writes what happened and how long it took."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import torch

    import weight_conversion as wc
    from torch_impl import sharding as S
    from torch_impl.gpt import GPT
    from weight_conversion.safetensors_io import load_file

    torch.set_num_threads(1)
    device_mesh = S.init_distributed(MeshShape(1, 2), GPT_CFG, batch_size=TCFG.batch_size, timeout_s=30)
    model = GPT(GPT_CFG)
    wc.import_(model, load_file(init)[0])
    trainer = S.ShardedTrainer(model, TCFG, device_mesh)
    if rank == 1:
        os._exit(1)  # as if killed
    start = time.perf_counter()
    try:
        trainer.step(*token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, 0))
        outcome = "no error"
    except S.PeerFailure as e:
        outcome = str(e)
    with open(os.path.join(out, "killed_rank.json"), "w") as f:
        json.dump({"message": outcome, "seconds": time.perf_counter() - start}, f)
    os._exit(0)  # the process group cannot be shut down cleanly without its peer


def run_killed_rank(out: str, init: str, timeout: float = 120) -> dict:
    """Fork the two ranks of _killed_rank (torch.multiprocessing, fork), wait at most ``timeout``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_killed_rank, args=(r, port, out, init)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    with open(os.path.join(out, "killed_rank.json")) as f:
        return {**json.load(f), "still_running_after_timeout": alive}


def _pickle_free_save(path: str, tree: dict) -> None:
    """A nested dict of arrays / lists / numbers as one .npz of flat keys plus JSON for the rest."""
    flat, other = {}, {}

    def walk(prefix, node):
        if isinstance(node, dict) and node:  # an empty dict (no collectives) is kept as JSON below
            for k, v in node.items():
                walk(f"{prefix}{k}|", v)
        elif isinstance(node, np.ndarray):
            flat[prefix[:-1]] = node
        else:
            other[prefix[:-1]] = node

    walk("", tree)
    np.savez(path, __json__=np.frombuffer(json.dumps(other).encode(), np.uint8), **flat)


def _pickle_free_load(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        flat = {k: f[k] for k in f.files}
    tree: dict = {}
    for key, value in [*json.loads(flat.pop("__json__").tobytes()).items(), *flat.items()]:
        node = tree
        *parents, leaf = key.split("|")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def torch_worker(out: str, init: str, shape: MeshShape, resume_from: str | None) -> None:
    """Fork one process per simulated device (this process has imported torch but run nothing, so
    forking is safe and the children skip the imports), then compare with one device here."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    mp.start_processes(_torch_rank, args=(shape.size, port, out, init, shape, resume_from),
                       nprocs=shape.size, start_method="fork")  # fmt: skip
    timings = {"sharded": time.perf_counter() - t0}
    import torch

    import weight_conversion as wc
    from torch_impl.block import Block
    from torch_impl.gpt import GPT, loss_fn
    from torch_impl.train import Trainer
    from weight_conversion.safetensors_io import load_file

    torch.set_float32_matmul_precision("highest")  # matched_precision's torch half, without importing JAX
    t0 = time.perf_counter()
    weights, _ = load_file(init)
    parts = [_pickle_free_load(os.path.join(out, f"rank_{d}.npz")) for d in range(shape.data)]
    got = parts[0]
    name = mesh_name(shape.shape)
    common = {"mesh": shape.shape, "framework": "torch", "direction": f"torch:1 device->torch:{name}"}
    rows = []

    def build(cls, cfg, w):
        torch.manual_seed(0)
        m = cls(cfg)
        wc.import_(m, w)
        return m.eval()

    block_init = {k.removeprefix("blocks.0."): v for k, v in weights.items() if k.startswith("blocks.0.")}
    x_tok, y_tok = token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, 0)
    x_act = np.random.default_rng(1).standard_normal((TCFG.batch_size, TCFG.seq_len, BLOCK_CFG.d_model)).astype(np.float32)
    for model_name, model, x in (("gpt", build(GPT, GPT_CFG, weights), x_tok), ("block", build(Block, BLOCK_CFG, block_init), x_act)):
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in model(torch.from_numpy(x), return_intermediates=True)[1].items()}
        sharded = {k: np.concatenate([p[f"fwd/{model_name}"][k] for p in parts]) for k in ref}
        rows.append(compare_named("sharded_forward", ref, sharded, model=model_name, shape=x.shape, **common))
    model = build(GPT, GPT_CFG, weights)
    loss_fn(model(torch.from_numpy(x_tok)), torch.from_numpy(y_tok)).backward()
    ref_grad = {k: p.grad.numpy() for k, p in model.named_parameters()}
    rows.append(compare_named("sharded_grad", ref_grad, got["grad"], model="gpt", shape=x_tok.shape, **common))
    trainer = Trainer(build(GPT, GPT_CFG, weights).train(), TCFG)
    ref_losses = [float(trainer.step(*token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, s))[0])
                  for s in range(TCFG.steps)]  # fmt: skip
    ref_weights = trainer.state()[0]
    rows.append(compare_training("sharded_train_step", ref_losses, ref_weights, got["losses"], got["weights"], **common))
    if resume_from:
        rows.append(compare_training(
            "sharded_resume", ref_losses[RESUME_AT:], ref_weights, got["resume_losses"], got["resume_weights"],
            mesh=shape.shape, framework="both", direction=f"jax:2x2 (10 steps)->torch:{name} (10 steps)",
        ))  # fmt: skip
    comm = {k.split("/")[1]: v for k, v in got.items() if k.startswith("comm/")}  # CommDebugMode's spelling
    rows.append(collectives_row("torch", shape.shape, {m: {op.replace("_", "-"): n for op, n in c["counts"].items()}
                                                       for m, c in comm.items()}))  # fmt: skip
    timings["one device"] = time.perf_counter() - t0
    arrays = {name: {"losses": got["losses"], "weights": got["weights"], "comm": {k.split("/")[1]: v for k, v in got.items() if k.startswith("comm/")},
                     "placements": got["placements"]}}  # fmt: skip
    write_results(out, rows, arrays, {"timings_s": timings, "ref_losses": ref_losses, "ref_weights": ref_weights})
