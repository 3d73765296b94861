"""Sharded parity: each twin on a (data, model) mesh against the same twin on one device, the two
sharded twins against each other, and a run resumed across meshes and frameworks.

The devices are simulated on the CPU, in subprocesses, because both engines fix their devices when
they start: JAX gets 8 CPU devices from XLA_FLAGS=--xla_force_host_platform_device_count=8 (set
before JAX initialises its backend), torch N gloo processes forked by torch.multiprocessing. Each
worker compares its sharded run with a one-device run of the same framework in the same process
and writes Result rows (the report's and the tests' format) plus the arrays the cross-framework
checks need. Every run starts from one init file (the torch twin's init, converted), on the same
batches (train_harness.token_batch).

    python -m twin_parity.sharded_harness jax   OUT INIT --meshes 1x2 2x2 [--resume-save PATH]
    python -m twin_parity.sharded_harness torch OUT INIT --mesh 2x2 [--resume-from PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from twin_parity.harness import Result
from twin_parity.train_harness import OUTPUT_INVARIANT_SUFFIXES, SMALL_GPT, TRAJECTORY, token_batch, uniform_ratio
from twin_common import BlockConfig
from twin_common.mesh import MeshShape

# Tiny, with every kind of parameter, and sizes every tested mesh divides: 4 heads (model 1, 2, 4),
# batch 4 (data 1, 2), MLP width 128. Two layers, so "two all-reduces per block" is seen twice.
GPT_CFG = SMALL_GPT
BLOCK_CFG = BlockConfig(d_model=32, n_heads=4, block_size=16)  # the block alone: all 6 intermediates
TCFG = TRAJECTORY  # 20 AdamW steps, warmup + cosine, clipping
RESUME_AT = TCFG.steps // 2
# float32, sharded vs one device and sharded torch vs sharded JAX: the float32 bound, measured below it
# (see README "Sharded"). Sharded sums add the same terms in another order (each device reduces its
# slice, then the all-reduce adds the slices), a float32 rounding difference of ~1e-7 relative.
SHARDED_TOLERANCE = 1e-5
JAX_MESHES = ((1, 2), (2, 1), (2, 2), (1, 4), (2, 4))
TORCH_MESHES = ((1, 2), (2, 1), (2, 2))
JAX_DEVICES = 8
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
WORKER_TIMEOUT_S = 600  # a hung worker fails the test instead of hanging it


def mesh_name(mesh) -> str:
    return f"{mesh[0]}x{mesh[1]}"


def parse_mesh_name(text: str) -> MeshShape:
    d, m = text.split("x")
    return MeshShape(int(d), int(m))


def expected_all_reduces(cfg=GPT_CFG) -> int:
    """Megatron: per block forward, one after attention's out_proj and one after the MLP's fc_out."""
    return 2 * cfg.n_layers


# ------------------------------------------------------------------------------------- comparing


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


# Rows a worker writes per mesh (forward of the GPT and of the block, gradients, 20 steps, collectives), and one
# more for a resume; parity_report announces its row count from these.
ROWS_PER_MESH = 5
ROWS_PER_RESUME = 1


def compare_named(check: str, ref: dict, got: dict, *, mesh, framework: str, direction: str, model: str,
                  shape, skip=()) -> Result:  # fmt: skip
    """One Result over every named array (in ``ref``'s order): worst error, first name over the bound."""
    worst, peak, first = 0.0, 0.0, None
    for key in ref:
        if key.endswith(tuple(skip)):
            continue
        err = _max_err(ref[key], got[key])
        if not err <= SHARDED_TOLERANCE and first is None:
            first = key
        worst = max(worst, err) if err == err else float("nan")
        peak = max(peak, float(np.max(np.abs(ref[key]))) if np.size(ref[key]) else 0.0)
    detail = None
    if first is not None:
        kept = {k: v for k, v in ref.items() if not k.endswith(tuple(skip))}
        ratio = uniform_ratio(kept, got, lambda _: SHARDED_TOLERANCE)
        if ratio is not None:  # every array off by one factor: no single key is the cause
            first = "all parameters" if check != "sharded_forward" else "all intermediates"
            detail = f"{first} x{ratio:.3g}"
    return Result(
        check, list(shape), "float32", "cpu" if framework != "jax" else None,
        "cpu" if framework != "torch" else None, direction, worst, worst / peak if peak else 0.0,
        SHARDED_TOLERANCE, first is None, first, detail,
        config={"model": model, "framework": framework, "mesh": {"data": mesh[0], "model": mesh[1]}},
    )  # fmt: skip


def compare_training(check: str, ref_losses, ref_weights, losses, weights, *, mesh, framework: str,
                     direction: str) -> Result:  # fmt: skip
    """Per-step loss (relative) and final parameters (absolute), the key bias left out (see
    train_harness.OUTPUT_INVARIANT_SUFFIXES: its value changes no output, its float32 gradient is noise)."""
    rel = [abs(a - b) / abs(a) for a, b in zip(ref_losses, losses)]
    bad = next((s for s, r in enumerate(rel) if not r <= SHARDED_TOLERANCE), None)
    w = compare_named(check, ref_weights, weights, mesh=mesh, framework=framework, direction=direction,
                      model="gpt", shape=[TCFG.batch_size, TCFG.seq_len], skip=OUTPUT_INVARIANT_SUFFIXES)  # fmt: skip
    first = f"loss at step {bad}" if bad is not None else w.first_divergence
    rel_worst = max(rel) if all(r == r for r in rel) else float("nan")
    return dataclasses.replace(w, max_rel_err=rel_worst, passed=first is None, first_divergence=first,
                               divergence_detail=w.divergence_detail if bad is None else None,
                               config={**w.config, "steps": len(losses)})  # fmt: skip


# ----------------------------------------------------------------------------------- HLO counting


def replica_groups(text: str) -> list[list[int]]:
    """XLA's replica_groups in either spelling: {{0,1},{2,3}} or the iota form [2,2]<=[4] /
    [2,2]<=[2,2]T(1,0)."""
    text = text.strip()
    if text.startswith("{"):
        return [[int(v) for v in g.split(",") if v.strip()] for g in re.findall(r"\{([\d,\s]*)\}", text[1:-1])]
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        raise ValueError(f"unrecognised replica_groups {text!r}")
    shape = [int(v) for v in m.group(1).split(",")]
    dims = [int(v) for v in m.group(2).split(",")]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(v) for v in m.group(3).split(",")])
    return ids.reshape(shape).tolist()


def hlo_collectives(hlo: str) -> list[tuple[str, list[list[int]]]]:
    """(op, replica groups) for every collective in a compiled HLO module's text."""
    found = []
    pattern = r"=\s*[^=]*?\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\((.*)"
    for line in hlo.splitlines():
        m = re.search(pattern, line)
        if not m or "-done(" in line:
            continue
        groups = re.search(r"replica_groups=(\{(?:\{[\d,\s]*\},?)*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", line)
        found.append((m.group(1), replica_groups(groups.group(1)) if groups else []))
    return found


def megatron_collectives(model: str, model_size: int) -> dict[str, int]:
    """The forward's collectives in Megatron's scheme: two all-reduces per block over the "model"
    axis (after attn.out_proj and after mlp.fc_out), nothing else; none without tensor parallelism."""
    n_blocks = GPT_CFG.n_layers if model == "gpt" else 1
    return {"all-reduce": 2 * n_blocks} if model_size > 1 else {}


def collectives_row(framework: str, mesh, counts: dict[str, dict[str, int]]) -> Result:
    """One row per framework and mesh: the forward's collectives of each model (``counts``:
    {model: {op: n}}, op spelled as XLA spells it) against ``megatron_collectives``. The numbers of
    a wrong split can be right while the plan moves far more data (an all-gather of activations):
    this row sees what the value rows cannot. max abs err is the count of collectives off."""
    off, first = 0, None
    for model in ("gpt", "block"):
        want, got = megatron_collectives(model, mesh[1]), counts[model]
        for op in sorted(set(want) | set(got)):
            n = abs(got.get(op, 0) - want.get(op, 0))
            off += n
            if n and first is None:
                first = f"{model}: {got.get(op, 0)} {op} (Megatron: {want.get(op, 0)})"
    name = mesh_name(mesh)
    return Result(
        "sharded_collectives", [], "float32", "cpu" if framework == "torch" else None,
        "cpu" if framework == "jax" else None, f"{framework}:{name} forward vs Megatron", float(off), float(off),
        0.0, first is None, first,
        config={"model": "gpt+block", "framework": framework, "mesh": {"data": mesh[0], "model": mesh[1]},
                "counts": counts},
    )  # fmt: skip


def jax_counts(comm: list) -> dict[str, int]:
    """{op: n} of hlo_collectives' list."""
    counts: dict[str, int] = {}
    for op, _ in comm:
        counts[op] = counts.get(op, 0) + 1
    return counts


def model_axis_groups(device_ids: np.ndarray) -> list[list[int]]:
    """The "model" axis groups of a (data, model) array of device ids: its rows."""
    return sorted(sorted(int(i) for i in row) for row in device_ids)


# ------------------------------------------------------------------------------------ JAX worker


def _jax_worker(out: str, init: str, meshes: list[MeshShape], resume_save: str | None, sabotage: bool) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import weight_conversion as wc
    from jax_impl import sharding as S
    from jax_impl.block import Block
    from jax_impl.gpt import GPT, loss_fn
    from jax_impl.train import Trainer, flax_path, split
    from twin_common.precision import matched_precision
    from weight_conversion.safetensors_io import load_file
    from twin_common.params import table_for

    weights, _ = load_file(init)
    block_init = {k.removeprefix("blocks.0."): v for k, v in weights.items() if k.startswith("blocks.0.")}
    x_tok, y_tok = token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, 0)
    x_tok, y_tok = x_tok.astype(np.int32), y_tok.astype(np.int32)
    x_act = np.random.default_rng(1).standard_normal((TCFG.batch_size, TCFG.seq_len, BLOCK_CFG.d_model)).astype(np.float32)
    by_path = {s.flax_path: s for s in table_for(GPT_CFG)}

    def gpt():
        m = GPT(GPT_CFG, rngs=nnx.Rngs(0))
        wc.import_(m, weights)
        return m

    def block():
        m = Block(BLOCK_CFG, rngs=nnx.Rngs(0))
        wc.import_(m, block_init)
        return m

    def forward(model, mesh):  # every intermediate, as NumPy
        if mesh is None:
            return {k: np.asarray(v) for k, v in model(jnp.asarray(x_tok if isinstance(model, GPT) else x_act), return_intermediates=True)[1].items()}
        fn, params, rest = S.make_forward(model, mesh, return_intermediates=True)
        x = x_tok if isinstance(model, GPT) else x_act
        compiled = fn.lower(params, rest, x).compile()  # one compile: its HLO text, then its outputs
        return {k: np.asarray(v) for k, v in compiled(params, rest, x)[1].items()}, compiled.as_text()

    def grads(model, mesh):
        graphdef, params, rest = split(model if mesh is None else S.shard_model(model, mesh))

        def loss_of(p, x, y):
            return loss_fn(nnx.merge(graphdef, p, rest)(x), y)

        kwargs = {}
        if mesh is not None:
            p_sh, _, _, b_sh, _ = S.state_shardings(model, mesh)
            kwargs = {"in_shardings": (p_sh, b_sh, b_sh), "out_shardings": p_sh}
        g = jax.jit(jax.grad(loss_of), **kwargs)(params, x_tok, y_tok)
        return {by_path[flax_path(kp)].torch_key: by_path[flax_path(kp)].transform.to_torch(np.asarray(v))
                for kp, v in jax.tree_util.tree_leaves_with_path(g)}  # fmt: skip

    def train(trainer, steps=range(TCFG.steps)):
        losses = []
        for s in steps:
            x, y = token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, s)
            losses.append(float(trainer.step(x, y)[0]))
        return losses, trainer.state()

    rows, arrays, timings = [], {}, {}
    with matched_precision():
        t0 = time.perf_counter()
        ref_fwd = {"gpt": forward(gpt(), None), "block": forward(block(), None)}
        ref_grad = grads(gpt(), None)
        ref_losses, (ref_weights, _, _) = train(Trainer(gpt(), TCFG))
        timings["one device"] = time.perf_counter() - t0
        for shape in meshes:
            t0 = time.perf_counter()
            mesh = S.init_distributed(shape, GPT_CFG, batch_size=TCFG.batch_size)
            ms, name = shape.shape, mesh_name(shape.shape)
            common = {"mesh": ms, "framework": "jax", "direction": f"jax:1 device->jax:{name}"}
            comm = {}
            for model_name, make in (("gpt", gpt), ("block", block)):
                got, hlo = forward(make(), mesh)
                shp = x_tok.shape if model_name == "gpt" else x_act.shape
                rows.append(compare_named("sharded_forward", ref_fwd[model_name], got, model=model_name, shape=shp, **common))
                comm[model_name] = hlo_collectives(hlo)
            rows.append(collectives_row("jax", ms, {m: jax_counts(c) for m, c in comm.items()}))
            rows.append(compare_named("sharded_grad", ref_grad, grads(gpt(), mesh), model="gpt", shape=x_tok.shape, **common))
            trainer = S.ShardedTrainer(gpt(), TCFG, mesh)
            # the state stays where the shardings say, step after step
            leaf = trainer.params["blocks"][0]["attn"]["q_proj"]["kernel"]
            placement = {"q_proj_kernel_spec": str(leaf.sharding.spec)}
            losses, (w, _, _) = train(trainer)
            mu = optax.tree_utils.tree_get(trainer.opt_state, "mu")["blocks"][0]["attn"]["q_proj"]["kernel"]
            placement.update(q_proj_kernel_spec_after=str(trainer.params["blocks"][0]["attn"]["q_proj"]["kernel"].sharding.spec),
                             q_proj_mu_spec=str(mu.sharding.spec))  # fmt: skip
            rows.append(compare_training("sharded_train_step", ref_losses, ref_weights, losses, w, **common))
            ids = np.vectorize(lambda d: d.id)(mesh.devices)
            arrays[name] = {"losses": losses, "weights": w, "comm": comm, "placement": placement,
                            "model_groups": model_axis_groups(ids)}  # fmt: skip
            timings[name] = time.perf_counter() - t0
        if resume_save:
            from weight_conversion.checkpoint import save_checkpoint

            mesh = S.init_distributed(MeshShape(2, 2), GPT_CFG, batch_size=TCFG.batch_size)
            trainer = S.ShardedTrainer(gpt(), TCFG, mesh)
            losses, (w, optim, step) = train(trainer, range(RESUME_AT))
            save_checkpoint(resume_save, GPT_CFG, w, optim, step, {"framework": "jax", "mesh": "data=2,model=2"})
        if sabotage:  # a wrong plan, to show that the collective check can fail: out_proj split like q_proj
            from twin_common import params as T

            honest = S.table_for
            S.table_for = lambda cfg: tuple(
                dataclasses.replace(s, split=T.Split.OUT_FEATURES) if s.torch_key.endswith("attn.out_proj.weight") else s
                for s in honest(cfg)
            )  # fmt: skip
            try:
                _, hlo = forward(gpt(), S.make_mesh(MeshShape(1, 2)))
            finally:
                S.table_for = honest
            arrays["sabotage"] = {"comm": hlo_collectives(hlo)}
    _write(out, rows, arrays, {"timings_s": timings, "ref_losses": ref_losses, "ref_weights": ref_weights})


# ---------------------------------------------------------------------------------- torch worker


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
    torch.distributed.destroy_process_group()


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


def _torch_worker(out: str, init: str, shape: MeshShape, resume_from: str | None) -> None:
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
    _write(out, rows, arrays, {"timings_s": timings, "ref_losses": ref_losses, "ref_weights": ref_weights})


def _write(out: str, rows, arrays, extra) -> None:
    doc = {"results": [r.to_json() for r in rows], "extra": extra, "runs": arrays}

    def plain(node):
        if isinstance(node, dict):
            return {str(k): plain(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [plain(v) for v in node]
        if isinstance(node, np.ndarray):
            return {"__array__": node.tolist(), "dtype": node.dtype.name}
        if isinstance(node, np.generic):
            return node.item()
        return node

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(plain(doc), f)


# ------------------------------------------------------------------------------------- launching


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
        doc = run_killed_rank(args.out, args.init)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"results": [], "runs": {"killed_rank": doc}}, f)
    elif args.framework == "jax":
        _jax_worker(args.out, args.init, [parse_mesh_name(m) for m in args.meshes], args.resume_save, args.sabotage)
    else:
        _torch_worker(args.out, args.init, parse_mesh_name(args.mesh), args.resume_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
