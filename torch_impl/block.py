"""Pre-LayerNorm transformer block in PyTorch. Twin of jax_impl/block.py: same classes, same
attribute names in the same order; read the two side by side.

Shapes: B batch, T sequence, C d_model, nh heads, hs head size (C = nh * hs), H hidden (4 * C).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from twin_common import BlockConfig, check_block_input

INTERMEDIATES = ("ln_1", "attn", "resid_1", "ln_2", "mlp", "out")  # in the order they are computed


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def linear(d_in: int, d_out: int, cfg: BlockConfig) -> nn.Linear:
    """nn.Linear with the project's init pinned: normal(0, init_std) weight, zero bias.

    torch's default is kaiming-uniform for weight *and* bias; Flax's is lecun-normal kernel and zero
    bias. Neither is used. The weight is stored (out, in); Flax stores its kernel (in, out).
    """
    layer = nn.Linear(d_in, d_out, bias=cfg.bias)
    nn.init.normal_(layer.weight, mean=0.0, std=cfg.init_std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def layer_norm(cfg: BlockConfig) -> nn.LayerNorm:
    """nn.LayerNorm with eps pinned (torch 1e-5, Flax 1e-6 by default); scale 1, bias 0."""
    return nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)


# SDPA's kernels in the order tried when cfg.attn_kernel == "cudnn": the first that accepts the
# inputs runs, so cuDNN where it can and torch's own kernels where it cannot (the fallback).
CUDNN_FIRST = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH)  # fmt: skip


def sdpa_backends(cfg: BlockConfig, q: torch.Tensor):
    """The context SDPA runs in: cuDNN first on a GPU in bf16/fp16 when cfg.attn_kernel is "cudnn"
    (torch's own priority puts flash attention first), torch's choice otherwise. Decided from the
    config and the tensor, so a compiled graph bakes it in; nothing changes on CPU or in float32."""
    if cfg.attn_kernel == "cudnn" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return sdpa_kernel(list(CUDNN_FIRST), set_priority=True)
    return contextlib.nullcontext()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = linear(cfg.d_model, cfg.d_model, cfg)
        self.k_proj = linear(cfg.d_model, cfg.d_model, cfg)
        self.v_proj = linear(cfg.d_model, cfg.d_model, cfg)
        self.out_proj = linear(cfg.d_model, cfg.d_model, cfg)
        self.attn_dropout = nn.Dropout(cfg.attn_dropout)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.scale = 1.0 / math.sqrt(cfg.d_head)  # pinned, not left to SDPA's default
        self.kv_cache: KVCache | None = None  # set by GPT.setup_cache for generation

    def local_heads(self) -> int:
        """The heads this process computes: nh, or nh / model when q_proj is a tensor-parallel
        DTensor split by output features (torch_impl/sharding.py). JAX needs no such count: its
        arrays keep their global shapes and XLA splits the cache as it splits the projections."""
        w = self.q_proj.weight
        local = w.to_local() if hasattr(w, "to_local") else w
        return local.shape[0] // self.cfg.d_head

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Without ``t``: causal attention over x. With ``t`` (cache slot of x's first token) and
        ``mask`` (B, 1, T, L), True = may attend: x's keys and values are written into the cache
        at slots t..t+T-1 and x attends to the whole cache."""
        B, T, C = x.shape
        hs = self.cfg.d_head
        # torch attention works on (B, nh, T, hs); JAX's on (B, T, nh, hs).
        # -1, not nh: tensor-parallel, a device holds nh / model heads (torch_impl/sharding.py).
        q = self.q_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        if t is not None:
            k, v = self.kv_cache.update(k, v, t)  # (B, nh, L, hs) each
        if self.cfg.attn_impl == "fused":
            with sdpa_backends(self.cfg, q):
                y = F.scaled_dot_product_attention(
                    q, k, v,
                    attn_mask=mask,  # None, or True = attend (nn.MultiheadAttention: the opposite)
                    dropout_p=self.attn_dropout.p if self.training else 0.0,
                    is_causal=mask is None,  # causal without building a mask
                    scale=self.scale,
                )  # (B, nh, T, hs)
        else:
            y = self.math_attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C), or its local C / model features
        return self.resid_dropout(self.out_proj(y))

    def math_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The readable reference: softmax(q k^T / sqrt(hs) + mask) v, softmax in >= float32.
        ``mask`` (True = may attend) defaults to the causal one."""
        T, S = q.shape[-2], k.shape[-2]
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, S)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # True = may attend
        scores = scores.masked_fill(~mask, float("-inf"))
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # bf16 -> f32; f64 stays
        probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(q.dtype)
        probs = self.attn_dropout(probs)
        return probs @ v  # (B, nh, T, hs)


class KVCache(nn.Module):
    """Keys and values of one attention layer for (batch, length) slots, allocated once and
    written in place at the current slot. Buffers (not parameters, not in the state_dict) so that
    .to() moves them and CUDA graphs see fixed addresses."""

    def __init__(
        self, batch: int, length: int, cfg: BlockConfig, dtype: torch.dtype, device,
        heads: int | None = None,
    ):  # fmt: skip
        """``heads``: the heads this process computes (nh, or nh / model tensor-parallel)."""
        super().__init__()
        # (B, nh, L, hs): the layout this framework's attention reads
        shape = (batch, heads or cfg.n_heads, length, cfg.d_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at slots t..t+T-1 (t a 0-d tensor: no host sync, no recompile
        per position) and return the whole cache."""
        slots = t + torch.arange(k.shape[2], device=k.device)  # (T,)
        self.k.index_copy_(2, slots, k)  # in place: the tensor is mutated, nothing is returned
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class MLP(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.fc_in = linear(cfg.d_model, cfg.d_hidden, cfg)
        self.gelu = nn.GELU(approximate=cfg.gelu_approximate)  # "none" = exact erf, torch's default
        self.fc_out = linear(cfg.d_hidden, cfg.d_model, cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.gelu(self.fc_in(x))))  # (B, T, H) inside


class Block(nn.Module):
    """x + Attn(LN1(x)), then + MLP(LN2(.)): the Pre-LN block."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.ln_1 = layer_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = layer_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, return_intermediates: bool = False, t=None, mask=None):
        """``t``, ``mask``: a cached step (see CausalSelfAttention.forward)."""
        param_dtype = dtype_name(self.ln_1.weight.dtype)
        check_block_input(tuple(x.shape), dtype_name(x.dtype), param_dtype, self.cfg)
        ln_1 = self.ln_1(x)
        attn = self.attn(ln_1, t, mask)
        resid_1 = x + attn
        ln_2 = self.ln_2(resid_1)
        mlp = self.mlp(ln_2)
        out = resid_1 + mlp
        if return_intermediates:
            return out, dict(ln_1=ln_1, attn=attn, resid_1=resid_1, ln_2=ln_2, mlp=mlp, out=out)
        return out
