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


def choose(logits: torch.Tensor, cfg: BlockConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k choices of router logits (N, E): chosen (N, k, E), the one-hot of the
    expert at each choice rank, and weight (N, k), the chosen probabilities of a softmax over all
    experts (Mixtral), renormalised when norm_topk_prob."""
    k = cfg.top_k
    rank = ranks(logits)
    # (N, k, E): one-hot of the expert at each choice rank
    chosen = rank[:, None, :] == torch.arange(k, device=logits.device)[None, :, None]
    probs = torch.softmax(logits, dim=-1)  # over all E experts, then top-k (Mixtral)
    weight = (chosen * probs[:, None, :]).sum(-1)  # (N, k) the chosen probabilities, rank order
    if cfg.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdim=True)
    return chosen, weight


def route(logits: torch.Tensor, cfg: BlockConfig) -> torch.Tensor:
    """Combine weights (N, E) of router logits (N, E): the top_k choices (``choose``), pairs over
    an expert's capacity dropped in (token, choice rank) order; zero for every expert a token does
    not use."""
    N, E = logits.shape
    k = cfg.top_k
    chosen, weight = choose(logits, cfg)
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
        return expert_mlp(x, combine, self.gate_proj, self.up_proj, self.down_proj)


def expert_mlp(x: torch.Tensor, combine: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """The experts' arithmetic on stacked weights (Experts' layout, E of them, or a device's share):
    x (N, C), combine (N, E) -> (N, C)."""
    g = torch.einsum("nc,ehc->neh", x, gate_proj)  # (N, E, H)
    u = torch.einsum("nc,ehc->neh", x, up_proj)  # (N, E, H)
    y = torch.einsum("neh,ech->nec", F.silu(g) * u, down_proj)  # (N, E, C)
    return torch.einsum("ne,nec->nc", combine.to(y.dtype), y)  # (N, C)


def exchange(x: torch.Tensor, chosen: torch.Tensor, weight: torch.Tensor, experts, all_to_all, n_shards: int) -> torch.Tensor:
    """One device's part of expert parallelism (twin_common/moe.py): its tokens x (N, C), their
    choices chosen (N, k, E) and weights (N, k); ``experts`` (x, combine) runs this device's E / S
    experts; ``all_to_all`` (S, P, D) -> (S, P, D) swaps block s with device s of the expert axis.
    Each (token, choice) pair goes to the device holding its expert, in its own slot of a buffer
    of all P = N * k pairs (static shapes: dropless, any routing fits), and comes back the same way."""
    N, k, E = chosen.shape
    C, P, S = x.shape[-1], N * k, n_shards
    # (S, P, E / S): pair p's expert among device s's, one-hot; all zero where s does not hold it
    select = chosen.reshape(P, S, E // S).permute(1, 0, 2).to(x.dtype)
    pairs = x[:, None, :].expand(N, k, C).reshape(P, C)  # (P, C) each pair's token
    send = torch.cat([select.sum(-1, keepdim=True) * pairs[None], select], dim=-1)  # (S, P, C + E/S)
    got = all_to_all(send)  # (S, P, C + E/S): block s holds device s's pairs for this device
    y = experts(got[..., :C].reshape(S * P, C), got[..., C:].reshape(S * P, E // S))  # (S * P, C)
    back = all_to_all(y.reshape(S, P, C))  # (S, P, C): block s, what device s computed for our pairs
    return (back.sum(0).reshape(N, k, C) * weight[..., None].to(x.dtype)).sum(1)  # (N, C)


class MoE(nn.Module):
    """The routed MLP: router, then the weighted sum of the chosen experts' outputs."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        self.router = linear(cfg.d_model, cfg.n_experts, cfg, False)  # weight (E, C), Mixtral's gate
        self.experts = Experts(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)
        # expert parallelism over the mesh's ``expert`` axis: set by the sharding plan
        # (torch_impl/sharding.py, ExpertAllToAll); None on one device or without that axis
        self.dispatch = None

    def forward(self, x: torch.Tensor, return_router_logits: bool = False):
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        logits = router_logits(flat, self.router.weight)  # (N, E), float32
        if self.dispatch is None:
            combine = route(logits, self.cfg)  # (N, E), float32
            mixed = self.experts(flat, combine)  # (N, C)
        else:  # each pair to its expert's device and back (dropless: the mesh refuses a capacity)
            chosen, weight = choose(logits, self.cfg)  # (N, k, E), (N, k) float32
            mixed = self.dispatch(flat, chosen, weight, self.experts)  # (N, C)
        y = self.dropout(mixed.reshape(B, T, C))
        return (y, logits.reshape(B, T, -1)) if return_router_logits else y
