"""transformers' GPT-2 layout as rows of a table, composed with the twin table (``table.py``).

transformers stores GPT-2 (``GPT2LMHeadModel``) in two layouts the twins do not use:

- Conv1D: ``c_attn``, ``c_proj`` and ``c_fc`` keep their weight as (in, out) and compute
  ``x @ W + b``; the twins' interchange layout is nn.Linear's (out, in), so W_twin = W_hf.T.
- A fused ``c_attn``: one Conv1D of weight (C, 3C) and bias (3C,) whose output columns are
  q | k | v, where the twins have three (C, C) projections ``q_proj``, ``k_proj``, ``v_proj``.

Each row says: transformers key | twin torch key(s) | transform | transformers shape. A transform
maps one transformers array to its twin arrays (``to_twin``) and back (``to_hf``); both directions
read the same rows. The twin keys then go through the twin table to either framework, so a GPT-2
checkpoint reaches the Flax twin by the same two tables as the torch twin: nothing is guessed
from ``ndim`` or from which keys happen to exist.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import numpy as np

from twin_common import GPTConfig
from twin_common.params import gpt_table


class HFTransform(enum.Enum):
    """How one transformers array becomes its twin array(s) (torch layout), and back."""

    SAME = "same"  # LayerNorm, biases, embeddings, lm_head (an nn.Linear in both)
    CONV1D = "conv1d"  # Conv1D (in, out) <-> nn.Linear (out, in): a transpose
    FUSED = "fused"  # a fused bias (n * C,) <-> n biases (C,): split / concatenate
    FUSED_CONV1D = "fused_conv1d"  # (in, n * out) <-> n weights (out, in): split the columns, transpose each

    @property
    def fused(self) -> bool:
        return self in (HFTransform.FUSED, HFTransform.FUSED_CONV1D)

    @property
    def conv1d(self) -> bool:
        return self in (HFTransform.CONV1D, HFTransform.FUSED_CONV1D)

    def to_twin(self, array: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
        """The ``n`` twin arrays (torch layout) held in one transformers array."""
        parts = np.split(array, n, axis=-1) if self.fused else [array]  # q | k | v: output columns
        return tuple(np.ascontiguousarray(p.T if self.conv1d else p) for p in parts)

    def to_hf(self, arrays: tuple[np.ndarray, ...]) -> np.ndarray:
        """The inverse of ``to_twin``."""
        parts = [a.T if self.conv1d else a for a in arrays]
        return np.ascontiguousarray(np.concatenate(parts, axis=-1) if self.fused else parts[0])

    def twin_shapes(self, hf_shape: tuple[int, ...], n: int) -> tuple[tuple[int, ...], ...]:
        *lead, last = hf_shape
        shape = (*lead, last // n) if self.fused else tuple(hf_shape)
        return ((tuple(reversed(shape)) if self.conv1d else shape),) * n


@dataclasses.dataclass(frozen=True)
class HFSpec:
    hf_key: str  # transformers key without the "transformer." prefix, e.g. "h.0.attn.c_attn.weight"
    twin_keys: tuple[str, ...]  # twin torch state_dict key(s), in the order the columns are fused
    transform: HFTransform
    hf_shape: tuple[int, ...]  # shape in transformers' layout

    @property
    def twin_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.transform.twin_shapes(self.hf_shape, len(self.twin_keys))


SAME, CONV1D, FUSED, FUSED_CONV1D = HFTransform


def hf_gpt2_block_rows(C: int, H: int) -> tuple:
    """One GPT-2 block's rows, keys relative to "h.{i}." (transformers) and "blocks.{i}." (twins)."""
    return (
        # transformers key    twin torch key(s)                                                     transform     transformers shape
        ("ln_1.weight",        ("ln_1.weight",),                                                     SAME,         (C,)),
        ("ln_1.bias",          ("ln_1.bias",),                                                       SAME,         (C,)),
        ("attn.c_attn.weight", ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"), FUSED_CONV1D, (C, 3 * C)),
        ("attn.c_attn.bias",   ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"),       FUSED,        (3 * C,)),
        ("attn.c_proj.weight", ("attn.out_proj.weight",),                                            CONV1D,       (C, C)),
        ("attn.c_proj.bias",   ("attn.out_proj.bias",),                                              SAME,         (C,)),
        ("ln_2.weight",        ("ln_2.weight",),                                                     SAME,         (C,)),
        ("ln_2.bias",          ("ln_2.bias",),                                                       SAME,         (C,)),
        ("mlp.c_fc.weight",    ("mlp.fc_in.weight",),                                                CONV1D,       (C, H)),
        ("mlp.c_fc.bias",      ("mlp.fc_in.bias",),                                                  SAME,         (H,)),
        ("mlp.c_proj.weight",  ("mlp.fc_out.weight",),                                               CONV1D,       (H, C)),
        ("mlp.c_proj.bias",    ("mlp.fc_out.bias",),                                                 SAME,         (C,)),
    )  # fmt: skip


def hf_gpt2_table(cfg: GPTConfig) -> tuple[HFSpec, ...]:
    """Rows for a whole GPT-2: embeddings, every block, final LayerNorm and, when the head is not
    tied to the token embedding, ``lm_head.weight`` (an nn.Linear (V, C) on both sides).

    The rows are checked against the twin table: every twin key is produced exactly once, with the
    shape the twin table expects, so the two tables cannot drift apart."""
    if not cfg.bias:
        raise ValueError("GPT-2 has a bias in every Conv1D and LayerNorm; a config with bias=False has no GPT-2 layout")
    V, T, C, H = cfg.vocab_size, cfg.block_size, cfg.d_model, cfg.mlp_ratio * cfg.d_model
    rows = [HFSpec("wte.weight", ("wte.weight",), SAME, (V, C)), HFSpec("wpe.weight", ("wpe.weight",), SAME, (T, C))]
    for i in range(cfg.n_layers):
        rows += [
            HFSpec(f"h.{i}.{hf}", tuple(f"blocks.{i}.{k}" for k in twin), transform, shape)
            for hf, twin, transform, shape in hf_gpt2_block_rows(C, H)
        ]
    rows += [HFSpec("ln_f.weight", ("ln_f.weight",), SAME, (C,)), HFSpec("ln_f.bias", ("ln_f.bias",), SAME, (C,))]
    if not cfg.tie_embeddings:
        rows.append(HFSpec("lm_head.weight", ("lm_head.weight",), SAME, (V, C)))
    check_composes(rows, cfg, "GPT-2")
    return tuple(rows)


def check_composes(rows, cfg: GPTConfig, what: str) -> None:
    """Every twin key produced exactly once by ``rows``, with the shape the twin table expects."""
    produced = {key: shape for spec in rows for key, shape in zip(spec.twin_keys, spec.twin_shapes)}
    expected = {spec.torch_key: spec.torch_shape for spec in gpt_table(cfg)}
    if produced != expected or sum(len(s.twin_keys) for s in rows) != len(expected):
        raise AssertionError(f"the {what} table is out of date with the twin table")  # a bug here, not in the user's files


def to_twin(hf_arrays: Mapping[str, np.ndarray], table) -> dict[str, np.ndarray]:
    """{transformers key: array} -> {twin torch key: array in torch layout}; keys already checked."""
    out = {}
    for spec in table:
        out.update(zip(spec.twin_keys, spec.transform.to_twin(np.asarray(hf_arrays[spec.hf_key]), len(spec.twin_keys))))
    return out


def to_hf(twin_arrays: Mapping[str, np.ndarray], table) -> dict[str, np.ndarray]:
    """{twin torch key: array} -> {transformers key (no prefix): array in transformers' layout}."""
    return {spec.hf_key: spec.transform.to_hf(tuple(twin_arrays[k] for k in spec.twin_keys)) for spec in table}
