"""Reading the collectives out of compiled XLA HLO text: which ops, over which device groups. The JAX
worker counts them (Megatron predicts two all-reduces per block forward, each over a model-axis group);
scripts.bench_train prints them."""

from __future__ import annotations

import re

import numpy as np

from twin_parity.sharded_compare import COLLECTIVES


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


def jax_counts(comm: list) -> dict[str, int]:
    """{op: n} of hlo_collectives' list."""
    counts: dict[str, int] = {}
    for op, _ in comm:
        counts[op] = counts.get(op, 0) + 1
    return counts


def axis_groups(device_ids: np.ndarray, axis: int) -> list[list[int]]:
    """The device groups along one axis of an array of device ids (a mesh's devices): its lines along it."""
    ids = np.moveaxis(np.asarray(device_ids), axis, -1)
    return sorted(sorted(int(i) for i in row) for row in ids.reshape(-1, ids.shape[-1]))


def model_axis_groups(device_ids: np.ndarray) -> list[list[int]]:
    """The "model" axis groups of a (data, model[, expert]) array of device ids."""
    return axis_groups(device_ids, 1)
