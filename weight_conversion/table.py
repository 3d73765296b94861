"""The one conversion table: every parameter's PyTorch key, Flax NNX path and layout transform.

Both directions read the same rows (torch -> flax applies ``Transform.to_flax``, flax -> torch its
inverse ``Transform.to_torch``); nothing is inferred from ``ndim`` or from which keys happen to exist.

The interchange layout is PyTorch's: a flat mapping of state_dict keys to arrays in torch layout.
That is what the safetensors files hold, so a file written by either side loads in the other and in
any tool that reads PyTorch safetensors checkpoints.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from twin_common import BlockConfig, GPTConfig

FlaxPath = tuple  # of str (attribute names) and int (list indices), e.g. ("attn", "q_proj", "kernel")


class Transform(enum.Enum):
    """How a torch-layout array becomes a Flax-layout array, and back."""

    IDENTITY = "identity"
    # torch nn.Linear.weight is (out, in) and computes x @ W.T; Flax nnx.Linear.kernel is (in, out)
    # and computes x @ K. So K = W.T, and the transform is its own inverse.
    TRANSPOSE = "transpose"

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.T) if self is Transform.TRANSPOSE else array

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.T) if self is Transform.TRANSPOSE else array

    def flax_shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(torch_shape)) if self is Transform.TRANSPOSE else torch_shape


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    torch_key: str  # state_dict key, e.g. "attn.q_proj.weight"
    flax_path: FlaxPath  # attribute path in the nnx.Module, e.g. ("attn", "q_proj", "kernel")
    transform: Transform
    torch_shape: tuple[int, ...]  # shape in torch layout, from the config

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.transform.flax_shape(self.torch_shape)

    @property
    def decay(self) -> bool:
        """Whether AdamW decays it: matrices (Linear weights, embeddings) yes; biases and LayerNorm
        parameters no (GPT-2 / nanoGPT's rule). Both optimizers build their masks from this."""
        return len(self.torch_shape) >= 2


ID, T = Transform.IDENTITY, Transform.TRANSPOSE


def block_table(
    cfg: BlockConfig, torch_prefix: str = "", flax_prefix: FlaxPath = ()
) -> tuple[ParamSpec, ...]:
    """Rows for one Pre-LN block, in the twins' attribute order.

    ``torch_prefix``/``flax_prefix`` place the block inside a larger model (e.g. "blocks.3." and
    ("blocks", 3)), so a whole model's table is the concatenation of its parts' tables.
    """
    C, H = cfg.d_model, cfg.d_hidden
    rows = (
        # torch key              Flax path                        transform  torch shape
        ("ln_1.weight",          ("ln_1", "scale"),               ID,        (C,)),
        ("ln_1.bias",            ("ln_1", "bias"),                ID,        (C,)),
        ("attn.q_proj.weight",   ("attn", "q_proj", "kernel"),    T,         (C, C)),
        ("attn.q_proj.bias",     ("attn", "q_proj", "bias"),      ID,        (C,)),
        ("attn.k_proj.weight",   ("attn", "k_proj", "kernel"),    T,         (C, C)),
        ("attn.k_proj.bias",     ("attn", "k_proj", "bias"),      ID,        (C,)),
        ("attn.v_proj.weight",   ("attn", "v_proj", "kernel"),    T,         (C, C)),
        ("attn.v_proj.bias",     ("attn", "v_proj", "bias"),      ID,        (C,)),
        ("attn.out_proj.weight", ("attn", "out_proj", "kernel"),  T,         (C, C)),
        ("attn.out_proj.bias",   ("attn", "out_proj", "bias"),    ID,        (C,)),
        ("ln_2.weight",          ("ln_2", "scale"),               ID,        (C,)),
        ("ln_2.bias",            ("ln_2", "bias"),                ID,        (C,)),
        ("mlp.fc_in.weight",     ("mlp", "fc_in", "kernel"),      T,         (H, C)),
        ("mlp.fc_in.bias",       ("mlp", "fc_in", "bias"),        ID,        (H,)),
        ("mlp.fc_out.weight",    ("mlp", "fc_out", "kernel"),     T,         (C, H)),
        ("mlp.fc_out.bias",      ("mlp", "fc_out", "bias"),       ID,        (C,)),
    )  # fmt: skip
    return tuple(
        ParamSpec(torch_prefix + key, tuple(flax_prefix) + path, transform, shape)
        for key, path, transform, shape in rows
        if cfg.bias or not key.endswith(".bias")
    )


def gpt_table(cfg: GPTConfig) -> tuple[ParamSpec, ...]:
    """Rows for the GPT: embeddings, every block (the block's rows under "blocks.i."), final
    LayerNorm and, when not tied to the token embedding, the LM head."""
    V, T_, C = cfg.vocab_size, cfg.block_size, cfg.d_model
    bc = cfg.block_config()
    rows = [
        ParamSpec("wte.weight", ("wte", "embedding"), ID, (V, C)),  # both store (vocab, C)
        ParamSpec("wpe.weight", ("wpe", "embedding"), ID, (T_, C)),
    ]
    for i in range(cfg.n_layers):
        rows += block_table(bc, f"blocks.{i}.", ("blocks", i))
    rows.append(ParamSpec("ln_f.weight", ("ln_f", "scale"), ID, (C,)))
    if cfg.bias:
        rows.append(ParamSpec("ln_f.bias", ("ln_f", "bias"), ID, (C,)))
    if not cfg.tie_embeddings:
        rows.append(ParamSpec("lm_head.weight", ("lm_head", "kernel"), T, (V, C)))
    return tuple(rows)


def table_for(cfg) -> tuple[ParamSpec, ...]:
    """The conversion table for a model built from ``cfg``."""
    if isinstance(cfg, BlockConfig):
        return block_table(cfg)
    if isinstance(cfg, GPTConfig):
        return gpt_table(cfg)
    raise TypeError(f"no conversion table for config type {type(cfg).__name__}")
