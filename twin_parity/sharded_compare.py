"""What the sharded workers and the launcher share: the model, batch and meshes they run, the bound
they are held to, the comparisons that turn two runs into a Result row, and the worker's output file."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from twin_parity.harness import Result
from twin_parity.train_harness import OUTPUT_INVARIANT_SUFFIXES, SMALL_GPT, TRAJECTORY, uniform_ratio
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


def write_results(out: str, rows, arrays, extra) -> None:
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
