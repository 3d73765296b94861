"""The one config both twins are built from.

Every field that has a framework default on either side is spelled out here, so neither twin ever
falls back on a library default (docs/guide.md measures what each one costs):

- ``ln_eps``: torch ``nn.LayerNorm`` defaults to 1e-5, ``nnx.LayerNorm`` to 1e-6.
- ``gelu_approximate``: torch ``nn.GELU`` defaults to exact (erf), ``jax.nn.gelu`` to tanh.
- ``init_std``: torch ``nn.Linear`` inits kaiming-uniform weight *and* bias, Flax ``nnx.Linear``
  lecun-normal kernel and zero bias. Both twins use GPT-2's normal(0, 0.02) weights and zero biases.
- Flax ``nnx.LayerNorm(use_fast_variance=True)`` computes E[x^2] - E[x]^2; both twins compute the
  two-pass E[(x - mean)^2] that torch uses (pinned in jax_impl, not configurable).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

AttnImpl = Literal["fused", "math"]
AttnKernel = Literal["cudnn", "library"]
GeluApprox = Literal["none", "tanh"]

# Fields that change how a block runs or is initialised, not the function its weights compute: a
# checkpoint may be loaded into a config that differs from its own only in these.
RUNTIME_FIELDS = frozenset({"attn_impl", "attn_kernel", "attn_dropout", "resid_dropout", "init_std"})


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def config_differences(saved: dict, current: dict, *, what: str, where: str, ignore=frozenset()) -> list[str]:
    """One message per field (outside ``ignore``) whose value in ``saved`` differs from ``current``;
    a field present on one side only counts too."""
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

    def __post_init__(self) -> None:
        problems = []
        for name in ("d_model", "n_heads", "block_size", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not problems and self.d_model % self.n_heads:
            problems.append(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if not isinstance(self.bias, bool):
            problems.append(f"bias must be a bool, got {self.bias!r}")
        if self.gelu_approximate not in ("none", "tanh"):
            problems.append(
                f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}"
            )
        if self.attn_impl not in ("fused", "math"):
            problems.append(f"attn_impl must be 'fused' or 'math', got {self.attn_impl!r}")
        if self.attn_kernel not in ("cudnn", "library"):
            problems.append(f"attn_kernel must be 'cudnn' or 'library', got {self.attn_kernel!r}")
        for name in ("attn_dropout", "resid_dropout"):
            p = getattr(self, name)
            if not _is_real(p) or not 0.0 <= p < 1.0:
                problems.append(f"{name} must be a number in [0, 1), got {p!r}")
        for name in ("ln_eps", "init_std"):
            v = getattr(self, name)
            if not _is_real(v) or not 0.0 < v < math.inf:
                problems.append(f"{name} must be a finite number > 0, got {v!r}")
        if problems:
            raise ValueError("invalid BlockConfig: " + "; ".join(problems))

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_hidden(self) -> int:
        return self.mlp_ratio * self.d_model

    @classmethod
    def lesson(cls, n_heads: int = 1) -> "BlockConfig":
        """The original lesson's block: d_model 128, a single head, sequences of 8."""
        return cls(d_model=128, n_heads=n_heads, block_size=8)


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
