"""transformers' Llama layout (``LlamaForCausalLM``) as rows of a table, composed with the twin
table (``table.py``).

transformers' Llama keeps every weight in nn.Linear's (out, in) layout, like the twins, so each row
is a rename (transformers key | twin torch key | transformers shape) with the ``SAME`` transform of
the GPT-2 table. One layout fact is not a rename: transformers' Llama checkpoints rotate q and k in
the half-split layout (rotate_half). A twin configured with ``rope_layout="interleaved"`` (Meta's
original layout, GPT-J's) needs the rows of every q and k projection permuted within each head; the
twin table says which rows (its ``rope_heads`` column) and ``relayout_rope`` permutes them, in both
directions, so there is no second mapping for it here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from twin_common import GPTConfig
from weight_conversion.hf_gpt2_table import SAME, HFSpec, check_composes
from weight_conversion.hf_gpt2_table import to_hf as _renamed_to_hf
from weight_conversion.hf_gpt2_table import to_twin as _renamed_to_twin
from twin_common.params import gpt_table, relayout_rope

HF_LAYOUT = "half"  # transformers' LlamaRotaryEmbedding + rotate_half


def hf_llama_block_rows(C: int, K: int, H: int, attn_bias: bool, mlp_bias: bool) -> tuple:
    """One Llama block's rows, keys relative to "layers.{i}." (transformers) and "blocks.{i}." (twins)."""
    rows = (
        # transformers key                   twin torch key          transformers shape
        ("input_layernorm.weight",           "ln_1.weight",          (C,)),
        ("self_attn.q_proj.weight",          "attn.q_proj.weight",   (C, C)),
        ("self_attn.q_proj.bias",            "attn.q_proj.bias",     (C,)),
        ("self_attn.k_proj.weight",          "attn.k_proj.weight",   (K, C)),
        ("self_attn.k_proj.bias",            "attn.k_proj.bias",     (K,)),
        ("self_attn.v_proj.weight",          "attn.v_proj.weight",   (K, C)),
        ("self_attn.v_proj.bias",            "attn.v_proj.bias",     (K,)),
        ("self_attn.o_proj.weight",          "attn.out_proj.weight", (C, C)),
        ("self_attn.o_proj.bias",            "attn.out_proj.bias",   (C,)),
        ("post_attention_layernorm.weight",  "ln_2.weight",          (C,)),
        ("mlp.gate_proj.weight",             "mlp.gate_proj.weight", (H, C)),
        ("mlp.gate_proj.bias",               "mlp.gate_proj.bias",   (H,)),
        ("mlp.up_proj.weight",               "mlp.up_proj.weight",   (H, C)),
        ("mlp.up_proj.bias",                 "mlp.up_proj.bias",     (H,)),
        ("mlp.down_proj.weight",             "mlp.down_proj.weight", (C, H)),
        ("mlp.down_proj.bias",               "mlp.down_proj.bias",   (C,)),
    )  # fmt: skip
    bias = {"self_attn": attn_bias, "mlp": mlp_bias}
    return tuple(r for r in rows if not r[0].endswith(".bias") or bias[r[0].split(".")[0]])


def hf_llama_table(cfg: GPTConfig) -> tuple[HFSpec, ...]:
    """Rows for a whole LlamaForCausalLM: embedding, every block, final norm and, when the head is
    not tied to the embedding, ``lm_head.weight``. Checked against the twin table (every twin key
    produced exactly once, with its shape), so the two tables cannot drift apart."""
    problems = [f"{k}={getattr(cfg, k)!r} (a Llama has {k}={v!r})"
                for k, v in dict(norm="rmsnorm", pos="rope", mlp="swiglu").items() if getattr(cfg, k) != v]  # fmt: skip
    if problems:
        raise ValueError("a config with " + ", ".join(problems) + " has no transformers Llama layout")
    bc = cfg.block_config()
    V, C, H, K = cfg.vocab_size, cfg.d_model, cfg.d_hidden, cfg.kv_heads * cfg.d_head
    rows = [HFSpec("embed_tokens.weight", ("wte.weight",), SAME, (V, C))]
    for i in range(cfg.n_layers):
        rows += [
            HFSpec(f"layers.{i}.{hf}", (f"blocks.{i}.{twin}",), SAME, shape)
            for hf, twin, shape in hf_llama_block_rows(C, K, H, bc.has_attn_bias, bc.has_mlp_bias)
        ]
    rows.append(HFSpec("norm.weight", ("ln_f.weight",), SAME, (C,)))
    if not cfg.tie_embeddings:
        rows.append(HFSpec("lm_head.weight", ("lm_head.weight",), SAME, (V, C)))
    check_composes(rows, cfg, "Llama")
    return tuple(rows)


def to_twin(hf_arrays: Mapping[str, np.ndarray], table, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """{transformers key: array} -> {twin torch key: array}, q/k rows in the twin's rope layout."""
    arrays = _renamed_to_twin(hf_arrays, table)
    if cfg.rope_layout != HF_LAYOUT:
        arrays = relayout_rope(arrays, gpt_table(cfg), cfg.rope_layout)
    return arrays


def to_hf(twin_arrays: Mapping[str, np.ndarray], table, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """{twin torch key: array} -> {transformers key (no prefix): array}, q/k rows half-split."""
    if cfg.rope_layout != HF_LAYOUT:
        twin_arrays = relayout_rope(twin_arrays, gpt_table(cfg), HF_LAYOUT)
    return _renamed_to_hf(twin_arrays, table)
