"""transformers' Mixtral layout (``MixtralForCausalLM``) as rows of a table, composed with the twin
table (``table.py``).

A Mixtral file keeps every weight in nn.Linear's (out, in) layout, like the twins, and its attention
and norms under Llama's names. The MoE MLP is where the layouts differ: the files hold one matrix per
expert (``block_sparse_moe.experts.{e}.w1 / w3 / w2.weight``, gate / up / down, as Mistral's
reference code names them) and the router as ``block_sparse_moe.gate.weight`` (E, C); the twins stack
the experts along a new first axis (``mlp.experts.gate_proj`` (E, H, C), ...). A row here is either
a rename (one transformers key, one twin key) or a stack (E transformers keys, in expert order, one
twin key): both directions read the same rows.

transformers 5 itself holds the experts fused in memory (``mlp.experts.gate_up_proj`` (E, 2H, C),
gate rows then up rows, and ``mlp.experts.down_proj`` (E, C, H)) and converts to and from the
per-expert keys when it loads and saves (its ``conversion_mapping.py``): files written by
``save_pretrained`` of transformers 5.24 carry the per-expert keys, and so do Mistral's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from twin_common import GPTConfig
from weight_conversion.hf_llama_table import hf_llama_block_rows
from twin_common.params import gpt_table

# per expert: transformers name -> twin stacked parameter (w1: gate, w3: up, w2: down; Mistral's names)
EXPERT_ROWS = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


@dataclasses.dataclass(frozen=True)
class MixtralSpec:
    hf_keys: tuple[str, ...]  # transformers keys without the "model." prefix; E of them for a stack
    twin_key: str  # twin torch state_dict key
    hf_shape: tuple[int, ...]  # shape of each transformers array
    stacked: bool = False  # the twin array is the transformers arrays stacked along a new axis 0

    @property
    def twin_shape(self) -> tuple[int, ...]:
        return (len(self.hf_keys), *self.hf_shape) if self.stacked else self.hf_shape


def hf_mixtral_table(cfg: GPTConfig) -> tuple[MixtralSpec, ...]:
    """Rows for a whole MixtralForCausalLM, checked against the twin table (every twin key
    produced exactly once, with its shape), so the two tables cannot drift apart."""
    want = dict(norm="rmsnorm", pos="rope", mlp="moe", norm_topk_prob=True, capacity_factor=None)
    problems = [f"{k}={getattr(cfg, k)!r} (Mixtral: {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    bc = cfg.block_config() if not problems else None
    if bc is not None and bc.has_attn_bias:
        problems.append("attention biases (Mixtral has none)")
    if problems:
        raise ValueError("a config with " + ", ".join(problems) + " has no transformers Mixtral layout")
    V, C, H, K, E = cfg.vocab_size, cfg.d_model, cfg.d_hidden, cfg.kv_heads * cfg.d_head, cfg.n_experts
    rows = [MixtralSpec(("embed_tokens.weight",), "wte.weight", (V, C))]
    for i in range(cfg.n_layers):
        attn = [r for r in hf_llama_block_rows(C, K, H, False, False) if not r[0].startswith("mlp.")]
        rows += [MixtralSpec((f"layers.{i}.{hf}",), f"blocks.{i}.{twin}", shape) for hf, twin, shape in attn]
        p = f"layers.{i}.block_sparse_moe."
        rows.append(MixtralSpec((p + "gate.weight",), f"blocks.{i}.mlp.router.weight", (E, C)))
        for w, twin in EXPERT_ROWS:
            shape = (C, H) if w == "w2" else (H, C)
            keys = tuple(f"{p}experts.{e}.{w}.weight" for e in range(E))
            rows.append(MixtralSpec(keys, f"blocks.{i}.mlp.experts.{twin}", shape, stacked=True))
    rows.append(MixtralSpec(("norm.weight",), "ln_f.weight", (C,)))
    if not cfg.tie_embeddings:
        rows.append(MixtralSpec(("lm_head.weight",), "lm_head.weight", (V, C)))
    produced = [(s.twin_key, s.twin_shape) for s in rows]
    if sorted(produced) != sorted((s.torch_key, s.torch_shape) for s in gpt_table(cfg)):
        raise AssertionError("the Mixtral table is out of date with the twin table")  # a bug here
    return tuple(rows)


def hf_shapes(table) -> dict[str, tuple[int, ...]]:
    """{transformers key: shape} of every array a Mixtral file of this table holds."""
    return {key: spec.hf_shape for spec in table for key in spec.hf_keys}


def to_twin(hf_arrays: Mapping[str, np.ndarray], table) -> dict[str, np.ndarray]:
    """{transformers key: array} -> {twin torch key: array}: renames, and per-expert arrays stacked."""
    out = {}
    for spec in table:
        parts = [np.asarray(hf_arrays[k]) for k in spec.hf_keys]
        out[spec.twin_key] = np.ascontiguousarray(np.stack(parts)) if spec.stacked else parts[0]
    return out


def to_hf(twin_arrays: Mapping[str, np.ndarray], table) -> dict[str, np.ndarray]:
    """{twin torch key: array} -> {transformers key (no prefix): array}: stacks split per expert."""
    out = {}
    for spec in table:
        a = np.asarray(twin_arrays[spec.twin_key])
        out.update(zip(spec.hf_keys, (np.ascontiguousarray(x) for x in a) if spec.stacked else (a,)))
    return out
