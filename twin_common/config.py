"""The one config both twins are built from.

Every field that has a framework default on either side is spelled out here, so neither twin ever
falls back on a library default (docs/guide.md measures what each one costs):

- ``ln_eps``: torch ``nn.LayerNorm`` defaults to 1e-5, ``nnx.LayerNorm`` to 1e-6.
- ``gelu_approximate``: torch ``nn.GELU`` defaults to exact (erf), ``jax.nn.gelu`` to tanh.
- ``init_std``: torch ``nn.Linear`` inits kaiming-uniform weight *and* bias, Flax ``nnx.Linear``
  lecun-normal kernel and zero bias. Both twins use GPT-2's normal(0, 0.02) weights and zero biases.
- Flax ``nnx.LayerNorm(use_fast_variance=True)`` computes E[x^2] - E[x]^2; both twins compute the
  two-pass E[(x - mean)^2] that torch uses (pinned in jax_impl, not configurable).
- ``norm="rmsnorm"`` uses ``ln_eps`` too: Flax ``nnx.RMSNorm`` defaults to 1e-6 and torch
  ``nn.RMSNorm`` to float32's machine epsilon (1.19e-7), Llama 1 used 1e-6 and Llama 2 1e-5. Both
  twins write the norm themselves (statistic in float32 whatever the compute dtype, as transformers'
  LlamaRMSNorm) and pass ``ln_eps``.
- ``rope_theta``: rotary base; transformers' LlamaConfig defaults to 10000, Llama 3 uses 500000
  and SmolLM2 100000, so a checkpoint's value is always read, never assumed.

The Llama-family switches (``norm``, ``pos``, ``n_kv_heads``, ``mlp``, the per-place biases) default
to GPT-2's block, so a config or checkpoint written before they existed describes the same model.

The Mixture-of-Experts switch (``mlp="moe"``, twin_common/moe.py describes the routing rules) pins
what libraries leave to their top-k, their softmax placement and their loss code: ties go to the
lower expert index, the router runs in float32 whatever the compute dtype, ``norm_topk_prob`` says
whether the k chosen weights are renormalised (Mixtral: yes), ``capacity_factor`` None is dropless.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

AttnImpl = Literal["fused", "math"]
AttnKernel = Literal["cudnn", "library"]
GeluApprox = Literal["none", "tanh"]
Norm = Literal["layernorm", "rmsnorm"]
Pos = Literal["learned", "rope"]
RopeLayout = Literal["half", "interleaved"]
Mlp = Literal["gelu", "swiglu", "moe"]

# Fields that change how a block runs or is initialised, not the function its weights compute: a
# checkpoint may be loaded into a config that differs from its own only in these.
RUNTIME_FIELDS = frozenset({
    "attn_impl", "attn_kernel", "attn_dropout", "resid_dropout", "init_std",
    "router_aux_loss_coef", "router_z_loss_coef",  # training-loss weights, not the forward
})  # fmt: skip


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Fields added after checkpoints and golden files were first written, with the value that
# reproduces the model those files describe: a saved config without the field means this value.
ADDED_FIELDS = {
    "attn_kernel": "cudnn", "norm": "layernorm", "pos": "learned", "rope_theta": 10000.0, "rope_layout": "half",
    "n_kv_heads": None, "mlp": "gelu", "mlp_hidden": None, "attn_bias": None, "mlp_bias": None,
    "norm_bias": None, "n_experts": None, "top_k": 2, "norm_topk_prob": True, "capacity_factor": None,
    "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.0,
}  # fmt: skip


def config_differences(saved: dict, current: dict, *, what: str, where: str, ignore=frozenset()) -> list[str]:
    """One message per field (outside ``ignore``) whose value in ``saved`` differs from ``current``;
    a field present on one side only counts too (except an ADDED_FIELDS field absent from ``saved``,
    which means its old value)."""
    saved = {**{k: v for k, v in ADDED_FIELDS.items() if k in current}, **saved}
    return [
        f"{what} field {k!r} is {saved.get(k)!r} in {where} but {current.get(k)!r} here"
        for k in sorted((set(saved) | set(current)) - set(ignore))
        if saved.get(k) != current.get(k)
    ]


class DictConfig:
    """to_dict / from_dict for the frozen config dataclasses (checkpoints store configs as JSON)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class BlockConfig(DictConfig):
    d_model: int = 128  # width of the residual stream; the lesson's (5, 8, 128) input
    n_heads: int = 4  # 1 is the single-head case of the lesson; d_model must divide evenly
    block_size: int = 64  # longest sequence accepted; longer input is a ValueError on both twins
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model, as in GPT-2
    bias: bool = True  # biases in every Linear and LayerNorm (GPT-2 has them; many newer models not)
    ln_eps: float = 1e-5  # torch's default; nnx.LayerNorm would silently use 1e-6
    gelu_approximate: GeluApprox = "none"  # torch's name: "none" = exact erf GELU, "tanh" = GPT-2's
    attn_impl: AttnImpl = "fused"  # "fused": SDPA / jax.nn.dot_product_attention; "math": explicit
    # The fused path's kernel on a GPU in bf16/fp16: "cudnn" tries cuDNN's fused attention first and
    # falls back to the library's choice where cuDNN cannot run (CPU, float32, unsupported shapes);
    # "library": torch SDPA's / JAX's own choice (JAX's is XLA's). No effect on other devices/dtypes.
    attn_kernel: AttnKernel = "cudnn"
    attn_dropout: float = 0.0  # dropout on attention probabilities (training only)
    resid_dropout: float = 0.0  # dropout on each sublayer's output before the residual add
    init_std: float = 0.02  # normal(0, init_std) for every weight matrix, zeros for biases
    # ---- the Llama family's block (defaults: GPT-2's)
    norm: Norm = "layernorm"  # "rmsnorm": x / sqrt(mean(x^2) + ln_eps) * weight, no mean, no bias
    pos: Pos = "learned"  # "rope": rotary positions inside attention; "learned": the GPT adds wpe
    rope_theta: float = 10000.0  # rotary base (Llama 2: 10000, Llama 3: 500000, SmolLM2: 100000)
    # "half": transformers' rotate_half; "interleaved": adjacent pairs (Meta's Llama, GPT-J)
    rope_layout: RopeLayout = "half"
    n_kv_heads: int | None = None  # key/value heads; None: n_heads. 1: multi-query; between: grouped
    # "swiglu": down(silu(gate(x)) * up(x)) (Llama); "gelu": fc_out(gelu(fc_in(x))); "moe": routed
    mlp: Mlp = "gelu"
    mlp_hidden: int | None = None  # MLP hidden width; None: mlp_ratio * d_model
    attn_bias: bool | None = None  # biases of q/k/v/out projections; None: ``bias``
    mlp_bias: bool | None = None  # biases of the MLP's Linears; None: ``bias``
    norm_bias: bool | None = None  # LayerNorm bias; None: ``bias`` (an RMSNorm has none)
    # ---- Mixture-of-Experts MLP (mlp="moe"; twin_common/moe.py): SwiGLU experts, token-choice top-k
    n_experts: int | None = None  # experts per MoE layer (Mixtral 8); required with mlp="moe"
    top_k: int = 2  # experts each token is routed to (Mixtral 2)
    norm_topk_prob: bool = True  # renormalise the k chosen softmax weights to sum 1 (Mixtral: yes)
    # None: dropless; c: each expert takes at most ceil(c * k * N / E) of N tokens
    capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch 0.01; Mixtral 0.001)
    router_z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE 0.001; Mixtral none)

    def __post_init__(self) -> None:
        _check_block_fields(self, "BlockConfig")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else self.mlp_ratio * self.d_model

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_heads, or n_heads when unset); each serves n_heads / kv_heads
        query heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def has_attn_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    @property
    def has_mlp_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    @property
    def has_norm_bias(self) -> bool:
        if self.norm == "rmsnorm":
            return False
        return self.bias if self.norm_bias is None else self.norm_bias

    @classmethod
    def lesson(cls, n_heads: int = 1) -> "BlockConfig":
        """The original lesson's block: d_model 128, a single head, sequences of 8."""
        return cls(d_model=128, n_heads=n_heads, block_size=8)


_CHOICES = {
    "gelu_approximate": ("none", "tanh"), "attn_impl": ("fused", "math"), "attn_kernel": ("cudnn", "library"),
    "norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "rope_layout": ("half", "interleaved"),
    "mlp": ("gelu", "swiglu", "moe"),
}  # fmt: skip


def _check_block_fields(cfg, kind: str) -> None:
    """The checks of every field a block reads, for BlockConfig and GPTConfig alike."""
    problems = []
    for name in ("d_model", "n_heads", "block_size", "mlp_ratio"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive int, got {value!r}")
    if not problems and cfg.d_model % cfg.n_heads:
        problems.append(
            f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}"
        )
    if not isinstance(cfg.bias, bool):
        problems.append(f"bias must be a bool, got {cfg.bias!r}")
    for name in ("attn_bias", "mlp_bias", "norm_bias"):
        if getattr(cfg, name) not in (None, True, False):
            problems.append(f"{name} must be None or a bool, got {getattr(cfg, name)!r}")
    if cfg.norm == "rmsnorm" and cfg.norm_bias:
        problems.append("norm_bias=True with norm='rmsnorm': an RMSNorm has no bias")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            problems.append(f"{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    for name in ("attn_dropout", "resid_dropout"):
        p = getattr(cfg, name)
        if not _is_real(p) or not 0.0 <= p < 1.0:
            problems.append(f"{name} must be a number in [0, 1), got {p!r}")
    for name in ("ln_eps", "init_std", "rope_theta"):
        v = getattr(cfg, name)
        if not _is_real(v) or not 0.0 < v < math.inf:
            problems.append(f"{name} must be a finite number > 0, got {v!r}")
    for name in ("n_kv_heads", "mlp_hidden"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"{name} must be None or a positive int, got {v!r}")
    heads_ok = isinstance(cfg.n_heads, int) and cfg.n_heads >= 1
    if heads_ok and isinstance(cfg.n_kv_heads, int) and cfg.n_kv_heads >= 1 and cfg.n_heads % cfg.n_kv_heads:
        problems.append(
            f"n_heads={cfg.n_heads} is not divisible by n_kv_heads={cfg.n_kv_heads} "
            f"(each key/value head serves a whole group of query heads)"
        )
    if not problems and cfg.pos == "rope" and cfg.d_head % 2:
        problems.append(f"rotary positions rotate pairs of features: head size {cfg.d_head} is odd")
    problems += _moe_problems(cfg)
    if problems:
        raise ValueError(f"invalid {kind}: " + "; ".join(problems))


def _moe_problems(cfg) -> list[str]:
    """The checks of the Mixture-of-Experts fields: required and consistent with mlp="moe", inert
    (at their defaults) otherwise, so a dense config cannot carry a routing setting it ignores."""
    problems = []
    if cfg.mlp != "moe":
        if cfg.n_experts is not None or cfg.capacity_factor is not None:
            problems.append(f"n_experts / capacity_factor are set but mlp={cfg.mlp!r} (only mlp='moe' routes)")
        return problems
    E, k = cfg.n_experts, cfg.top_k
    if not isinstance(E, int) or isinstance(E, bool) or E < 1:
        problems.append(f"mlp='moe' needs n_experts, a positive int; got {E!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        problems.append(f"top_k must be a positive int, got {k!r}")
    elif isinstance(E, int) and not isinstance(E, bool) and k > E:
        problems.append(f"top_k={k} is more than n_experts={E}")
    if not isinstance(cfg.norm_topk_prob, bool):
        problems.append(f"norm_topk_prob must be a bool, got {cfg.norm_topk_prob!r}")
    c = cfg.capacity_factor
    if c is not None and (not _is_real(c) or not 0.0 < c < math.inf):
        problems.append(f"capacity_factor must be None (dropless) or a finite number > 0, got {c!r}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        v = getattr(cfg, name)
        if not _is_real(v) or not 0.0 <= v < math.inf:
            problems.append(f"{name} must be a finite number >= 0, got {v!r}")
    if cfg.has_mlp_bias:
        problems.append("mlp='moe' experts and router have no biases (as Mixtral): set mlp_bias=False or bias=False")
    return problems


@dataclasses.dataclass(frozen=True)
class GPTConfig(DictConfig):
    """A GPT made of the same Pre-LN blocks: embeddings, n_layers blocks, final LayerNorm, LM head."""

    vocab_size: int = 256  # bytes: the training scripts are byte-level, so no tokenizer is needed
    block_size: int = 64  # context length; also the size of the position embedding table
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    mlp_ratio: int = 4
    bias: bool = True
    ln_eps: float = 1e-5
    gelu_approximate: GeluApprox = "none"
    attn_impl: AttnImpl = "fused"
    attn_kernel: AttnKernel = "cudnn"
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0  # also applied to the embedding sum, as in GPT-2
    init_std: float = 0.02
    tie_embeddings: bool = True  # LM head reuses the token embedding (GPT-2); False: its own matrix
    norm: Norm = "layernorm"  # the block's fields below: see BlockConfig; ln_f follows ``norm``
    pos: Pos = "learned"  # "rope": no wpe table, positions rotate q and k inside every block
    rope_theta: float = 10000.0
    rope_layout: RopeLayout = "half"
    n_kv_heads: int | None = None
    mlp: Mlp = "gelu"
    mlp_hidden: int | None = None
    attn_bias: bool | None = None
    mlp_bias: bool | None = None
    norm_bias: bool | None = None
    n_experts: int | None = None
    top_k: int = 2
    norm_topk_prob: bool = True
    capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            problems.append(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))
        self.block_config()  # validates the fields it shares with BlockConfig

    def block_config(self) -> BlockConfig:
        shared = {f.name for f in dataclasses.fields(BlockConfig)}
        return BlockConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in shared})

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def d_hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else self.mlp_ratio * self.d_model

    @classmethod
    def llama(cls, **fields) -> "GPTConfig":
        """The Llama family's block (Touvron et al. 2023, as transformers' LlamaConfig computes it):
        RMSNorm, rotary positions in the half-split layout, SwiGLU MLP, no biases, untied head.
        ``fields`` give the shape (and may override any switch)."""
        llama = dict(norm="rmsnorm", pos="rope", rope_layout="half", mlp="swiglu", bias=False,
                     tie_embeddings=False, ln_eps=1e-5, rope_theta=10000.0)  # fmt: skip
        return cls(**{**llama, **fields})

    @classmethod
    def llama_tiny(cls) -> "GPTConfig":
        """A byte-level Llama-style model for the tests and the training script: 2 layers, 64 wide,
        4 query heads sharing 2 key/value heads, SwiGLU hidden width 176 (about 8/3 * 64, as Llama)."""
        return cls.llama(vocab_size=256, block_size=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                         mlp_hidden=176)  # fmt: skip

    @classmethod
    def mixtral(cls, **fields) -> "GPTConfig":
        """Mixtral's block (Jiang et al. 2024, as transformers' MixtralConfig computes it): a Llama
        block whose MLP is routed, 8 SwiGLU experts, top-2, the two weights renormalised, dropless,
        rope_theta 1e6. ``fields`` give the shape (and may override any switch)."""
        moe = dict(mlp="moe", n_experts=8, top_k=2, norm_topk_prob=True, capacity_factor=None,
                   rope_theta=1e6, router_aux_loss_coef=0.001)  # fmt: skip
        return cls.llama(**{**moe, **fields})

    @classmethod
    def moe_tiny(cls) -> "GPTConfig":
        """A byte-level Mixture-of-Experts model for the tests and the training script: llama_tiny's
        attention, 4 SwiGLU experts of width 64, top-2, dropless, load-balancing and z-loss on."""
        return cls.mixtral(vocab_size=256, block_size=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                           mlp_hidden=64, n_experts=4, top_k=2, rope_theta=10000.0,
                           router_aux_loss_coef=0.01, router_z_loss_coef=0.001)  # fmt: skip

    @classmethod
    def mixtral_small(cls) -> "GPTConfig":
        """Mixtral 8x7B's proportions at a benchmark size: 8 experts, top-2, expert width 3.5 x
        d_model (14336 / 4096), 4 query heads per key/value head (32 / 8), vocabulary 32000,
        rope_theta 1e6, RMSNorm eps 1e-5; 8 layers of width 512 (Mixtral: 32 of 4096). Random weights."""
        return cls.mixtral(vocab_size=32000, block_size=1024, n_layers=8, d_model=512, n_heads=8, n_kv_heads=2,
                           mlp_hidden=1792)  # fmt: skip

    @classmethod
    def smollm2_135m(cls) -> "GPTConfig":
        """SmolLM2-135M's shapes, as its config.json gives them (https://huggingface.co/HuggingFaceTB/
        SmolLM2-135M/blob/main/config.json; read here through copies that name it as their source,
        e.g. https://huggingface.co/jucanbe/SmolLM2-FT-DPO/blob/fbda8d99fea4cfaa73c6feabae4cb983dabc60d7/
        config.json): hidden_size 576, num_hidden_layers 30, num_attention_heads 9,
        num_key_value_heads 3 (head_dim 64), intermediate_size 1536, vocab_size 49152, rms_norm_eps
        1e-5, rope_theta 100000, tie_word_embeddings true, max_position_embeddings 8192. SmolLM
        (version 1) differs: context 2048, rope_theta 10000. For benchmarks, with random weights."""
        return cls.llama(vocab_size=49152, block_size=8192, n_layers=30, d_model=576, n_heads=9, n_kv_heads=3,
                         mlp_hidden=1536, ln_eps=1e-5, rope_theta=100000.0, tie_embeddings=True)  # fmt: skip

    @classmethod
    def nanogpt_124m_padded(cls) -> "GPTConfig":
        """GPT-2 small's shape as nanoGPT trains it: the vocabulary padded to 50304 (a multiple of
        64, for faster matmuls) and the project's exact GELU. Not GPT-2: its checkpoints do not load."""
        return cls(vocab_size=50304, block_size=1024, n_layers=12, d_model=768, n_heads=12)

    @classmethod
    def gpt2(cls, n_layers: int, d_model: int, n_heads: int) -> "GPTConfig":
        """A GPT-2 (Radford et al. 2019, as transformers' GPT2Config): 50257 BPE tokens, 1024
        positions, tanh GELU ("gelu_new"), LayerNorm eps 1e-5, LM head tied to the token embedding."""
        return cls(
            vocab_size=50257, block_size=1024, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            ln_eps=1e-5, gelu_approximate="tanh", tie_embeddings=True,
        )  # fmt: skip

    @classmethod
    def gpt2_124m(cls) -> "GPTConfig":
        """GPT-2 small ("gpt2"): 12 layers, 768 wide, 12 heads."""
        return cls.gpt2(n_layers=12, d_model=768, n_heads=12)

    @classmethod
    def gpt2_355m(cls) -> "GPTConfig":
        """GPT-2 medium ("gpt2-medium"): 24 layers, 1024 wide, 16 heads."""
        return cls.gpt2(n_layers=24, d_model=1024, n_heads=16)

    @classmethod
    def gpt2_774m(cls) -> "GPTConfig":
        """GPT-2 large ("gpt2-large"): 36 layers, 1280 wide, 20 heads."""
        return cls.gpt2(n_layers=36, d_model=1280, n_heads=20)

    @classmethod
    def gpt2_1558m(cls) -> "GPTConfig":
        """GPT-2 XL ("gpt2-xl", 1.5B): 48 layers, 1600 wide, 25 heads."""
        return cls.gpt2(n_layers=48, d_model=1600, n_heads=25)
