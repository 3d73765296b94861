"""Pre-LayerNorm transformer block in PyTorch. Twin of jax_impl/block.py: same classes, same
attribute names in the same order; read the two side by side.

One block, two families, chosen by the config: GPT-2's (LayerNorm, learned positions added by the
GPT, one key/value head per query head, GELU MLP, biases) and Llama's (RMSNorm, rotary positions,
grouped-query attention, SwiGLU MLP, no biases).

Shapes: B batch, T sequence, C d_model, nh heads, nkv key/value heads, hs head size (C = nh * hs),
H hidden (cfg.d_hidden).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_impl.layers import linear
from torch_impl.moe import MoE
from twin_common import BlockConfig, check_block_input

INTERMEDIATES = ("ln_1", "attn", "resid_1", "ln_2", "mlp", "out")  # in the order they are computed


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_norm(cfg: BlockConfig) -> nn.LayerNorm:
    """nn.LayerNorm with eps pinned (torch 1e-5, Flax 1e-6 by default); scale 1, bias 0."""
    return nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.has_norm_bias)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, as transformers' LlamaRMSNorm: the statistic and the
    division in float32 whatever x's dtype (float64 stays), rounded to x's dtype before the scale.

    Written out, not nn.RMSNorm: that one defaults eps to float32's machine epsilon (1.19e-7, where
    Llama 2 uses 1e-5) and computes a bfloat16 input's statistic in bfloat16."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.eps = cfg.ln_eps  # always explicit (docs/guide.md measures 1e-5 vs 1e-6 vs 1.19e-7)
        self.weight = nn.Parameter(torch.ones(cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> f32; f64 stays
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def norm(cfg: BlockConfig) -> nn.Module:
    """The block's normalisation: LayerNorm (GPT-2) or RMSNorm (Llama), by ``cfg.norm``."""
    return layer_norm(cfg) if cfg.norm == "layernorm" else RMSNorm(cfg)


def rope_angles(pos: torch.Tensor, cfg: BlockConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (B or 1, T, hs / 2), of position ids ``pos`` (B or 1, T) times the frequencies
    theta^(-2i / hs): computed in at least float32 (as transformers), then rounded to ``dtype``."""
    hs = cfg.d_head
    angle_dtype = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=angle_dtype, device=pos.device) / hs)
    angles = pos.to(angle_dtype)[..., None] * inv_freq  # (B or 1, T, hs / 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotary positions: each pair (x1, x2) of a head's features turned by its angle. "half": the
    pairs are (i, i + hs/2), transformers' rotate_half; "interleaved": (2i, 2i + 1), Meta's original
    Llama and GPT-J. Same function, permuted features: a checkpoint moves between the layouts by a
    permutation of the q and k rows (twin_common/params.py, ``rope_heads``)."""
    h = x.shape[-1] // 2
    x1, x2 = (x[..., :h], x[..., h:]) if layout == "half" else (x[..., 0::2], x[..., 1::2])
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if layout == "half":
        return torch.cat([y1, y2], dim=-1)
    return torch.stack([y1, y2], dim=-1).flatten(-2)  # (y1_0, y2_0, y1_1, y2_1, ...)


def repeat_kv(k: torch.Tensor, group: int) -> torch.Tensor:
    """(B, nkv, L, hs) -> (B, nh, L, hs): key/value head j serves the `group` neighbouring query
    heads j * group .. (j + 1) * group - 1, so each is repeated in place (kv0 kv0 kv1 kv1), not the
    whole set tiled (kv0 kv1 kv0 kv1), which loads without an error and pairs the wrong heads."""
    return k.repeat_interleave(group, dim=1)


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
        kv = cfg.kv_heads * cfg.d_head  # nkv * hs: C, or less with grouped-query attention
        b = cfg.has_attn_bias
        self.q_proj = linear(cfg.d_model, cfg.d_model, cfg, b)
        self.k_proj = linear(cfg.d_model, kv, cfg, b)
        self.v_proj = linear(cfg.d_model, kv, cfg, b)
        self.out_proj = linear(cfg.d_model, cfg.d_model, cfg, b)
        self.attn_dropout = nn.Dropout(cfg.attn_dropout)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.scale = 1.0 / math.sqrt(cfg.d_head)  # pinned, not left to SDPA's default
        self.kv_cache: KVCache | None = None  # set by GPT.setup_cache for generation

    def local_kv_heads(self) -> int:
        """The key/value heads this process holds (its cache's heads): nkv, or nkv / model when
        k_proj is a tensor-parallel DTensor split by output features (torch_impl/sharding.py). JAX
        needs no such count: its arrays keep their global shapes and XLA splits the cache as it
        splits the projections."""
        w = self.k_proj.weight
        local = w.to_local() if hasattr(w, "to_local") else w
        return local.shape[0] // self.cfg.d_head

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | None = None, mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Without ``t``: causal attention over x. With ``t`` (cache slot of x's first token) and
        ``mask`` (B, 1, T, L), True = may attend: x's keys and values are written into the cache
        at slots t..t+T-1 and x attends to the whole cache. ``pos`` (B, T): position ids for rotary
        positions (default 0..T-1; a left-padded row's real tokens start at 0)."""
        B, T, C = x.shape
        hs = self.cfg.d_head
        # torch attention works on (B, nh, T, hs); JAX's on (B, T, nh, hs).
        # -1, not nh: tensor-parallel, a device holds nh / model heads (torch_impl/sharding.py).
        q = self.q_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, -1, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.cfg.pos == "rope":
            pos = torch.arange(T, device=x.device)[None] if pos is None else pos  # (B or 1, T)
            cos, sin = rope_angles(pos, self.cfg, q.dtype)  # (B or 1, T, hs / 2)
            cos, sin = cos[:, None], sin[:, None]  # (B or 1, 1, T, hs / 2): every head alike
            q, k = rotate(q, cos, sin, self.cfg.rope_layout), rotate(k, cos, sin, self.cfg.rope_layout)
        if t is not None:
            k, v = self.kv_cache.update(k, v, t)  # (B, nkv, L, hs) each: the cache holds nkv heads
        group = self.cfg.n_heads // self.cfg.kv_heads
        if group > 1:
            k, v = repeat_kv(k, group), repeat_kv(v, group)  # (B, nh, L, hs)
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
        """``heads``: the key/value heads this process holds (nkv; nkv / model tensor-parallel)."""
        super().__init__()
        # (B, nkv, L, hs): the layout this framework's attention reads; nkv key/value heads
        shape = (batch, heads or cfg.kv_heads, length, cfg.d_head)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at slots t..t+T-1 (t a 0-d tensor: no host sync, no recompile
        per position) and return the whole cache."""
        slots = t + torch.arange(k.shape[2], device=k.device)  # (T,)
        self.k.index_copy_(2, slots, k)  # in place: the tensor is mutated, nothing is returned
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class MLP(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        b = cfg.has_mlp_bias
        self.fc_in = linear(cfg.d_model, cfg.d_hidden, cfg, b)
        self.gelu = nn.GELU(approximate=cfg.gelu_approximate)  # "none" = exact erf, torch's default
        self.fc_out = linear(cfg.d_hidden, cfg.d_model, cfg, b)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.gelu(self.fc_in(x))))  # (B, T, H) inside


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)) (Shazeer 2020, arXiv:2002.05202); the names are
    transformers'. Swapping gate and up is a different function that loads without an error."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        b = cfg.has_mlp_bias
        self.gate_proj = linear(cfg.d_model, cfg.d_hidden, cfg, b)
        self.up_proj = linear(cfg.d_model, cfg.d_hidden, cfg, b)
        self.down_proj = linear(cfg.d_hidden, cfg.d_model, cfg, b)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, H) inside, H = d_hidden
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """x + Attn(LN1(x)), then + MLP(LN2(.)): the Pre-LN block."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.ln_1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm(cfg)
        if cfg.mlp == "moe":
            self.mlp = MoE(cfg)
        else:
            self.mlp = (MLP if cfg.mlp == "gelu" else SwiGLU)(cfg)

    def forward(self, x: torch.Tensor, return_intermediates: bool = False, t=None, mask=None, pos=None):
        """``t``, ``mask``, ``pos``: a cached step and rotary position ids (CausalSelfAttention)."""
        param_dtype = dtype_name(self.ln_1.weight.dtype)
        check_block_input(tuple(x.shape), dtype_name(x.dtype), param_dtype, self.cfg)
        ln_1 = self.ln_1(x)
        attn = self.attn(ln_1, t, mask, pos)
        resid_1 = x + attn
        ln_2 = self.ln_2(resid_1)
        if self.cfg.mlp == "moe":  # the router's logits feed the training loss (and the routing checks)
            mlp, router_logits = self.mlp(ln_2, return_router_logits=True)
        else:
            mlp, router_logits = self.mlp(ln_2), None
        out = resid_1 + mlp
        if return_intermediates:
            inter = dict(ln_1=ln_1, attn=attn, resid_1=resid_1, ln_2=ln_2, mlp=mlp, out=out)
            if router_logits is not None:
                inter["router_logits"] = router_logits  # (B, T, E), float32
            return out, inter
        return out
