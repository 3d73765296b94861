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


class Split(enum.Enum):
    """How a parameter is divided across the ``model`` (tensor-parallel) mesh axis, in words that
    hold in both layouts. Megatron-LM's scheme (Shoeybi et al. 2019, arXiv:1909.08053, section 3):
    a layer split by output features needs its whole input and yields a slice of its output; the
    next layer, split by input features, takes that slice and yields a partial sum, which one
    all-reduce completes. Attention and MLP each pair the two, so a block needs two all-reduces.

    Each framework turns this into its own plan (jax_impl/sharding.py: a PartitionSpec per
    parameter; torch_impl/sharding.py: ColwiseParallel / RowwiseParallel per Linear); neither
    restates which parameter splits how.
    """

    REPLICATED = "replicated"  # every device holds all of it
    OUT_FEATURES = "out"  # torch weight (out, in): dim 0; Flax kernel (in, out): dim 1; bias: dim 0
    IN_FEATURES = "in"  # torch weight (out, in): dim 1; Flax kernel (in, out): dim 0
    # Stacked MoE experts (E, ...): whole experts per device, dim 0 in both layouts, over the
    # ``expert`` mesh axis when there is one: tokens travel to their experts by all-to-all
    # (twin_common/moe.py, "Expert parallelism"). Without it, over ``model``: each device runs its
    # own experts on every token and one all-reduce adds the partial outputs (the dense-masked
    # dispatch makes that a plain sum).
    EXPERTS = "experts"

    def mesh_axis(self, mesh) -> str | None:
        """The mesh axis (twin_common/mesh.py) this split divides its dimension over, on ``mesh``
        (a MeshShape): None for a replicated parameter."""
        if self is Split.REPLICATED:
            return None
        if self is Split.EXPERTS and mesh.expert > 1:
            return "expert"
        return "model"

    def torch_dim(self, spec: "ParamSpec") -> int | None:
        """The torch-layout dimension split (across ``mesh_axis``; None: replicated)."""
        if self is Split.REPLICATED:
            return None
        if self is Split.EXPERTS:
            return 0
        if len(spec.torch_shape) == 1:  # a bias: it has only output features
            if self is Split.IN_FEATURES:
                raise ValueError(f"{spec.torch_key}: a bias has no input features to split")
            return 0
        return 0 if self is Split.OUT_FEATURES else 1

    def flax_dim(self, spec: "ParamSpec") -> int | None:
        """The Flax-layout dimension split: the torch one, through the transform."""
        dim = self.torch_dim(spec)
        if dim is None or spec.transform is not Transform.TRANSPOSE:
            return dim
        return len(spec.torch_shape) - 1 - dim


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    torch_key: str  # state_dict key, e.g. "attn.q_proj.weight"
    flax_path: FlaxPath  # attribute path in the nnx.Module, e.g. ("attn", "q_proj", "kernel")
    transform: Transform
    torch_shape: tuple[int, ...]  # shape in torch layout, from the config
    split: Split = Split.REPLICATED  # across the tensor-parallel ``model`` mesh axis
    # q and k projections with rotary positions: the number of heads whose rows (torch dim 0) follow
    # the rope layout, so that a change of layout permutes them (``rope_permutation``); 0 elsewhere
    rope_heads: int = 0

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return self.transform.flax_shape(self.torch_shape)

    @property
    def decay(self) -> bool:
        """Whether AdamW decays it: matrices (Linear weights, embeddings) yes; biases and LayerNorm
        parameters no (GPT-2 / nanoGPT's rule). Both optimizers build their masks from this."""
        return len(self.torch_shape) >= 2


ID, T = Transform.IDENTITY, Transform.TRANSPOSE
REP, OUT, IN, EXP = Split.REPLICATED, Split.OUT_FEATURES, Split.IN_FEATURES, Split.EXPERTS


def block_table(
    cfg: BlockConfig, torch_prefix: str = "", flax_prefix: FlaxPath = ()
) -> tuple[ParamSpec, ...]:
    """Rows for one Pre-LN block, in the twins' attribute order.

    ``torch_prefix``/``flax_prefix`` place the block inside a larger model (e.g. "blocks.3." and
    ("blocks", 3)), so a whole model's table is the concatenation of its parts' tables.
    """
    C, H, K = cfg.d_model, cfg.d_hidden, cfg.kv_heads * cfg.d_head  # K: C, or less with GQA
    # rows of q / k follow the rope layout in nh / nkv heads (0: no rotary positions, no layout)
    rq, rk = (cfg.n_heads, cfg.kv_heads) if cfg.pos == "rope" else (0, 0)
    mlp = (
        # torch key              Flax path                        transform  torch shape  split  rope
        ("mlp.fc_in.weight",     ("mlp", "fc_in", "kernel"),      T,         (H, C),      OUT,   0),
        ("mlp.fc_in.bias",       ("mlp", "fc_in", "bias"),        ID,        (H,),        OUT,   0),
        ("mlp.fc_out.weight",    ("mlp", "fc_out", "kernel"),     T,         (C, H),      IN,    0),
        ("mlp.fc_out.bias",      ("mlp", "fc_out", "bias"),       ID,        (C,),        REP,   0),
    ) if cfg.mlp == "gelu" else (  # SwiGLU: gate and up split alike, so silu(gate) * up stays local
        ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"),  T,         (H, C),      OUT,   0),
        ("mlp.gate_proj.bias",   ("mlp", "gate_proj", "bias"),    ID,        (H,),        OUT,   0),
        ("mlp.up_proj.weight",   ("mlp", "up_proj", "kernel"),    T,         (H, C),      OUT,   0),
        ("mlp.up_proj.bias",     ("mlp", "up_proj", "bias"),      ID,        (H,),        OUT,   0),
        ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"),  T,         (C, H),      IN,    0),
        ("mlp.down_proj.bias",   ("mlp", "down_proj", "bias"),    ID,        (C,),        REP,   0),
    )  # fmt: skip
    if cfg.mlp == "moe":  # twin_common/moe.py: a float32 router and E stacked SwiGLU experts
        E = cfg.n_experts
        mlp = (
            # the experts keep nn.Linear's (out, in) per expert on both sides: no transform
            # torch key               Flax path                        trans  torch shape split rope
            ("mlp.router.weight",     ("mlp", "router", "kernel"),     T,     (E, C),     REP,  0),
            ("mlp.experts.gate_proj", ("mlp", "experts", "gate_proj"), ID,    (E, H, C),  EXP,  0),
            ("mlp.experts.up_proj",   ("mlp", "experts", "up_proj"),   ID,    (E, H, C),  EXP,  0),
            ("mlp.experts.down_proj", ("mlp", "experts", "down_proj"), ID,    (E, C, H),  EXP,  0),
        )  # fmt: skip
    rows = (
        # split over `model`: OUT keeps whole heads per device (k and v: whole key/value heads, so
        # model must divide nkv); IN leaves partial sums that one all-reduce completes, so that
        # layer's bias is REP (added once, after the all-reduce).
        # torch key              Flax path                        transform  torch shape  split  rope
        ("ln_1.weight",          ("ln_1", "scale"),               ID,        (C,),        REP,   0),
        ("ln_1.bias",            ("ln_1", "bias"),                ID,        (C,),        REP,   0),
        ("attn.q_proj.weight",   ("attn", "q_proj", "kernel"),    T,         (C, C),      OUT,   rq),
        ("attn.q_proj.bias",     ("attn", "q_proj", "bias"),      ID,        (C,),        OUT,   rq),
        ("attn.k_proj.weight",   ("attn", "k_proj", "kernel"),    T,         (K, C),      OUT,   rk),
        ("attn.k_proj.bias",     ("attn", "k_proj", "bias"),      ID,        (K,),        OUT,   rk),
        ("attn.v_proj.weight",   ("attn", "v_proj", "kernel"),    T,         (K, C),      OUT,   0),
        ("attn.v_proj.bias",     ("attn", "v_proj", "bias"),      ID,        (K,),        OUT,   0),
        ("attn.out_proj.weight", ("attn", "out_proj", "kernel"),  T,         (C, C),      IN,    0),
        ("attn.out_proj.bias",   ("attn", "out_proj", "bias"),    ID,        (C,),        REP,   0),
        ("ln_2.weight",          ("ln_2", "scale"),               ID,        (C,),        REP,   0),
        ("ln_2.bias",            ("ln_2", "bias"),                ID,        (C,),        REP,   0),
    ) + mlp  # fmt: skip
    bias = {"ln_1": cfg.has_norm_bias, "ln_2": cfg.has_norm_bias, "attn": cfg.has_attn_bias,
            "mlp": cfg.has_mlp_bias}  # fmt: skip
    return tuple(
        ParamSpec(torch_prefix + key, tuple(flax_prefix) + path, transform, shape, split, rope)
        for key, path, transform, shape, split, rope in rows
        if not key.endswith(".bias") or bias[key.split(".")[0]]
    )


def gpt_table(cfg: GPTConfig) -> tuple[ParamSpec, ...]:
    """Rows for the GPT: embeddings, every block (the block's rows under "blocks.i."), final
    LayerNorm and, when not tied to the token embedding, the LM head."""
    V, T_, C = cfg.vocab_size, cfg.block_size, cfg.d_model
    bc = cfg.block_config()
    # Embeddings, ln_f and the LM head stay replicated over `model`: at this project's sizes
    # (vocabulary 256) a replicated table costs little memory and no communication, while splitting
    # it by vocabulary would need a masked lookup plus an all-reduce, and for the tied head a
    # vocabulary-parallel cross-entropy (Megatron's), all beyond the two all-reduces per block.
    rows = [ParamSpec("wte.weight", ("wte", "embedding"), ID, (V, C))]  # both store (vocab, C)
    if cfg.pos == "learned":  # rotary positions have no table
        rows.append(ParamSpec("wpe.weight", ("wpe", "embedding"), ID, (T_, C)))
    for i in range(cfg.n_layers):
        rows += block_table(bc, f"blocks.{i}.", ("blocks", i))
    rows.append(ParamSpec("ln_f.weight", ("ln_f", "scale"), ID, (C,)))
    if bc.has_norm_bias:
        rows.append(ParamSpec("ln_f.bias", ("ln_f", "bias"), ID, (C,)))
    if not cfg.tie_embeddings:
        rows.append(ParamSpec("lm_head.weight", ("lm_head", "kernel"), T, (V, C)))
    return tuple(rows)


def rope_permutation(n_heads: int, head_size: int, to_layout: str) -> np.ndarray:
    """Row order that carries a rotary q or k projection (rows: n_heads heads of head_size) from
    the other layout into ``to_layout``: ``new = old[perm]``.

    A head's features pair up as (i, i + hs/2) in the half-split layout (transformers) and as
    (2i, 2i + 1) in the interleaved one (Meta's Llama, GPT-J). Moving rows 2i -> i and
    2i + 1 -> hs/2 + i turns interleaved into half-split (transformers' convert_llama_weights_to_hf
    ``permute``); its inverse goes back. Within each head only: heads keep their order."""
    half = head_size // 2
    # new i <- old to_half[i]
    to_half = np.concatenate([np.arange(0, head_size, 2), np.arange(1, head_size, 2)])
    within = to_half if to_layout == "half" else np.argsort(to_half)
    if to_layout not in ("half", "interleaved") or head_size != 2 * half:
        raise ValueError(f"no rope permutation to {to_layout!r} for head size {head_size}")
    return (np.arange(n_heads)[:, None] * head_size + within[None, :]).reshape(-1)


def relayout_rope(arrays: dict, table, to_layout: str) -> dict:
    """``arrays`` ({torch key: torch-layout array}) of a model in the other rope layout, with the
    rows of every table row that has ``rope_heads`` permuted into ``to_layout``; the rest as is."""
    out = dict(arrays)
    for spec in table:
        if spec.rope_heads and spec.torch_key in out:
            perm = rope_permutation(spec.rope_heads, spec.torch_shape[0] // spec.rope_heads, to_layout)
            out[spec.torch_key] = np.ascontiguousarray(np.asarray(out[spec.torch_key])[perm])
    return out


def table_for(cfg) -> tuple[ParamSpec, ...]:
    """The conversion table for a model built from ``cfg``."""
    if isinstance(cfg, BlockConfig):
        return block_table(cfg)
    if isinstance(cfg, GPTConfig):
        return gpt_table(cfg)
    raise TypeError(f"no conversion table for config type {type(cfg).__name__}")
