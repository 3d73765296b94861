"""Mixture-of-Experts MLP in PyTorch (``mlp="moe"``): a float32 router, token-choice top-k with
ties to the lower expert index, SwiGLU experts stored stacked, dense-masked dispatch, the
load-balancing and z losses. Twin of jax_impl/moe.py; the rules are written out in
twin_common/moe.py.

Shapes: N tokens (B * T, flattened row-major), C d_model, E experts, k top_k, H expert hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_impl.layers import linear
from twin_common import BlockConfig
from twin_common.moe import capacity


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, C) @ weight (E, C)^T in float32 whatever the compute dtype (float64 stays). Under
    torch.autocast F.linear would run in bfloat16, so autocast is switched off here."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


def ranks(logits: torch.Tensor) -> torch.Tensor:
    """(N, E) rank of each expert per token, 0 = chosen first: the experts with a larger logit,
    plus those with an equal logit and a lower index. An explicit rule, so a tie goes to the lower
    index whatever torch.topk would do (its documentation promises nothing about ties)."""
    E = logits.shape[-1]
    idx = torch.arange(E, device=logits.device)
    li, lj = logits[:, :, None], logits[:, None, :]  # (N, E, 1) expert e, (N, 1, E) rival j
    # (N, E, E): rival j beats expert e with a larger logit, or an equal one and a lower index
    beats = (lj > li) | ((lj == li) & (idx[None, None, :] < idx[None, :, None]))
    return beats.sum(-1)  # (N, E), a permutation of 0..E-1 per token


def route(logits: torch.Tensor, cfg: BlockConfig) -> torch.Tensor:
    """Combine weights (N, E) of router logits (N, E): softmax over all experts, the top_k kept
    (renormalised when norm_topk_prob), pairs over an expert's capacity dropped in (token, choice
    rank) order; zero for every expert a token does not use."""
    N, E = logits.shape
    k = cfg.top_k
    rank = ranks(logits)
    # (N, k, E): one-hot of the expert at each choice rank
    chosen = rank[:, None, :] == torch.arange(k, device=logits.device)[None, :, None]
    probs = torch.softmax(logits, dim=-1)  # over all E experts, then top-k (Mixtral)
    weight = (chosen * probs[:, None, :]).sum(-1)  # (N, k) the chosen probabilities, rank order
    if cfg.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdim=True)
    cap = capacity(N, E, k, cfg.capacity_factor)
    if cap is not None:  # pairs counted per expert in (token, rank) order, row-major over (N, k)
        # 1 for an expert's first pair, 2 for its second, ...
        arrival = chosen.reshape(N * k, E).cumsum(0).reshape(N, k, E)
        chosen = chosen & (arrival <= cap)
    return (chosen * weight[:, :, None]).sum(1)  # (N, E)


def router_losses(router_logits: list[torch.Tensor], cfg, data_mean=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) over every MoE layer's router logits (..., E), tokens pooled.

    ``data_mean`` (data parallel: the mean of a tensor over the data ranks, each holding an equal
    share of the batch) makes the load-balancing loss the whole batch's: it is a product of two
    means, and the mean of the ranks' products is not it. The other ranks' share of P enters as a
    constant, and the averaging of gradients over the ranks then gives the whole batch's gradient."""
    z = torch.cat([g.reshape(-1, g.shape[-1]) for g in router_logits])  # (L * N, E), float32
    E = z.shape[-1]
    probs = torch.softmax(z, dim=-1)  # one softmax: the loss reads probabilities of the logits
    f = (ranks(z) < cfg.top_k).to(z.dtype).mean(0)  # (E,) pairs routed to e per token; sums to k
    p = probs.mean(0)  # (E,) mean router probability of each expert
    if data_mean is not None:
        f, p = data_mean(f), data_mean(p.detach()) + (p - p.detach())  # value: global; gradient: this rank's
    balance = E * torch.sum(f * p)
    z_loss = torch.logsumexp(z, dim=-1).square().mean()
    return balance, z_loss


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_proj, up_proj (E, H, C) and down_proj (E, C, H), each expert
    in nn.Linear's (out, in) layout: Mixtral's w1, w3, w2 stacked along a new first axis. The Flax
    twin stores the same layout (no Linear module wraps them, so there is no Flax convention to
    follow), so the table maps them without a transform."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        E, C, H = cfg.n_experts, cfg.d_model, cfg.d_hidden
        self.gate_proj = nn.Parameter(torch.empty(E, H, C).normal_(0.0, cfg.init_std))
        self.up_proj = nn.Parameter(torch.empty(E, H, C).normal_(0.0, cfg.init_std))
        self.down_proj = nn.Parameter(torch.empty(E, C, H).normal_(0.0, cfg.init_std))

    def forward(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by ``combine`` (N, E) and summed: x (N, C) -> (N, C).
        The sum over experts is the last step, so experts split over devices leave partial sums
        that one all-reduce completes (torch_impl/sharding.py, ExpertParallel)."""
        g = torch.einsum("nc,ehc->neh", x, self.gate_proj)  # (N, E, H)
        u = torch.einsum("nc,ehc->neh", x, self.up_proj)  # (N, E, H)
        y = torch.einsum("neh,ech->nec", F.silu(g) * u, self.down_proj)  # (N, E, C)
        return torch.einsum("ne,nec->nc", combine.to(y.dtype), y)  # (N, C)


class MoE(nn.Module):
    """The routed MLP: router, then the weighted sum of the chosen experts' outputs."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.router = linear(cfg.d_model, cfg.n_experts, cfg, False)  # weight (E, C), Mixtral's gate
        self.experts = Experts(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor, return_router_logits: bool = False):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        logits = router_logits(flat, self.router.weight)  # (N, E), float32
        combine = route(logits, self.cfg)  # (N, E), float32
        y = self.dropout(self.experts(flat, combine).reshape(B, T, C))
        return (y, logits.reshape(B, T, -1)) if return_router_logits else y
