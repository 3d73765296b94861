"""Per-op profiles of one training step in each framework, for ``bench_train --profile``.

JAX: a ``jax.profiler`` trace of a few steps (its Perfetto JSON, read with the standard library);
every XLA:CPU thunk (one fusion, dot or copy of the compiled step) is one event, named like the
instruction in the compiled HLO, whose metadata says which jaxpr primitive it came from (``erfc``,
``transpose(jvp())/dot_general`` = a matmul of the backward pass, ...).
torch: ``torch.profiler`` over the same number of steps, self time per aten op.

Both tables give time per step and the share of the summed op time; host-side work (Python,
dispatch, argument handling) is what the wall time per step adds on top.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass


@dataclass
class OpRow:
    name: str  # the HLO instruction or aten op
    what: str  # where it came from (jaxpr primitive path; "" for torch)
    ms_per_step: float
    share: float  # of the summed op time per step


@dataclass
class Profile:
    framework: str
    rows: list[OpRow]  # every op, largest first
    ops_ms_per_step: float  # summed op time per step
    wall_ms_per_step: float  # wall time per step while profiling (the profiler adds a little)

    def table(self, top: int) -> str:
        lines = [
            f"{self.framework}: ops {self.ops_ms_per_step:.2f} ms/step summed, wall {self.wall_ms_per_step:.2f} ms/step "
            f"while profiled; top {top} ops",
            f"  {'ms/step':>8}  {'share':>6}  op",
        ]
        for r in self.rows[:top]:
            what = f"  [{r.what}]" if r.what else ""
            lines.append(f"  {r.ms_per_step:8.3f}  {100 * r.share:5.1f}%  {r.name}{what}")
        return "\n".join(lines)


# HLO instruction -> the op_name of its metadata, e.g. "jit(train_step)/transpose(jvp())/dot_general"
_HLO_OP = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"')
# trace events that are not one op of the step: the executor's wrappers, PjRt, Python frames
_NOT_OPS = ("ThunkExecutor", "PjitFunction", "CommonPjRt", "Handle input", "ParseArguments", "$")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> primitive path (jit(...)/ prefix removed) for the entry computation."""
    entry = hlo_text[hlo_text.find("\nENTRY"):]
    names = {}
    for line in entry.splitlines():
        m = _HLO_OP.match(line)
        if m:
            names[m.group(1)] = m.group(2).split("/", 1)[-1]
    return names


def _rows(per_op_us: dict[str, float], steps: int, what: dict[str, str]) -> tuple[list[OpRow], float]:
    total = sum(per_op_us.values())
    rows = [OpRow(k, what.get(k, ""), v / steps / 1e3, v / total if total else 0.0)
            for k, v in sorted(per_op_us.items(), key=lambda kv: -kv[1])]  # fmt: skip
    return rows, total / steps / 1e3


def profile_jax(step, sync, hlo_text: str, steps: int) -> Profile:
    """Trace ``steps`` calls of ``step`` (already compiled and warm); ``hlo_text`` is the compiled
    step's HLO (``jitted.lower(...).compile().as_text()``), used to name each thunk's origin."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            wall = time.perf_counter() - start
        files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {tmp}")
        with gzip.open(files[0]) as f:
            events = json.load(f)["traceEvents"]
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
            per_op[e["name"]] += float(e.get("dur", 0.0))
    rows, ops_ms = _rows(per_op, steps, hlo_op_names(hlo_text))
    return Profile("jax.jit", rows, ops_ms, wall / steps * 1e3)


def profile_torch(step, sync, steps: int, label: str = "torch") -> Profile:
    """torch.profiler over ``steps`` calls of ``step``: self time of each aten op, CPU and CUDA."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - start
    per_op: dict[str, float] = {}
    for evt in prof.key_averages():
        self_us = evt.self_cpu_time_total + getattr(evt, "self_device_time_total", 0.0)
        if self_us > 0:
            per_op[evt.key] = self_us
    rows, ops_ms = _rows(per_op, steps, {})
    return Profile(label, rows, ops_ms, wall / steps * 1e3)


def jax_kind(row: OpRow) -> str:
    """A coarse label for a JAX thunk: pass (forward / backward) and what it computes."""
    pass_ = "backward" if "transpose(" in row.what else "forward"
    if row.name.startswith("dot") or row.what.endswith("dot_general"):
        kind = "matmul"
    elif row.name.startswith(("copy", "transpose")) or "copy_" in row.name:
        kind = "copy/transpose"
    else:
        kind = row.what.rsplit("/", 1)[-1] or "?"
    return f"{pass_} {kind}"


def by_kind(profile: Profile, kind=jax_kind) -> list[tuple[str, float, float]]:
    """(kind, ms/step, share) summed over the rows, largest first."""
    sums: dict[str, float] = collections.defaultdict(float)
    for r in profile.rows:
        sums[kind(r)] += r.ms_per_step
    return sorted(((k, v, v / profile.ops_ms_per_step) for k, v in sums.items()), key=lambda t: -t[1])
