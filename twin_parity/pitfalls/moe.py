"""The Mixture-of-Experts pitfalls, each measured: the effect of the trap planted in the torch twin
(``ignored``) against the JAX twin or the float64 truth, and the same with the project's rule
(``pinned``). parity_tests/test_moe_sabotage.py holds each to "the check sees it"; docs/guide.md
quotes the figures.

The traps are planted by swapping one function of torch_impl/moe.py for ``route_variant`` (a copy
of ``route`` with one switch per trap) or a bent ``router_logits`` / ``router_losses``; everything is
restored before a check returns. MOE block: moe_tiny's block at width 128, 4 experts, top-2, the
lesson's (5, 8, 128) input, float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import numpy as np

import weight_conversion as wc
from twin_parity import harness as h
from twin_parity.moe_harness import MOE_BLOCK
from twin_parity.pitfalls.common import Measurement
from twin_common.moe import capacity, compare_routing, router_losses
from twin_common.precision import matched_precision

OUT = "max abs error of the MoE block output (float32)"


def route_variant(logits, cfg, *, library_topk=False, softmax_after_topk=False, ignore_norm=False, rank_first=False):
    """torch_impl.moe.route with one trap switched on (all off: the real rule, checked by the tests).

    library_topk: the choice by torch.topk, whose tie order is undocumented (on this CPU: higher
    indices first). softmax_after_topk: MaxText's order, a softmax over the k chosen logits, which
    sums to 1 and so equals the renormalised Mixtral weights, not the unrenormalised ones.
    ignore_norm: always renormalise. rank_first: capacity filled by choice rank, then token (all
    first choices before any second choice, GShard's order), instead of token, then rank."""
    import torch

    import torch_impl.moe as tm

    N, E = logits.shape
    k = cfg.top_k
    if library_topk:
        idx = torch.topk(logits, k, dim=-1).indices  # (N, k)
        chosen = torch.nn.functional.one_hot(idx, E).bool()
    else:
        chosen = tm.ranks(logits)[:, None, :] == torch.arange(k)[None, :, None]
    if softmax_after_topk:
        weight = torch.softmax((chosen * logits[:, None, :]).sum(-1), dim=-1)
    else:
        weight = (chosen * torch.softmax(logits, dim=-1)[:, None, :]).sum(-1)
        if cfg.norm_topk_prob or ignore_norm:
            weight = weight / weight.sum(-1, keepdim=True)
    cap = capacity(N, E, k, cfg.capacity_factor)
    if cap is not None:
        order = chosen.transpose(0, 1) if rank_first else chosen  # (k, N, E) or (N, k, E)
        arrival = order.reshape(-1, E).cumsum(0).reshape(order.shape)
        arrival = arrival.transpose(0, 1) if rank_first else arrival
        chosen = chosen & (arrival <= cap)
    return (chosen * weight[:, :, None]).sum(1)


def _pair(cfg, planted, dtype="float32", shape=h.LESSON_SHAPE, router_scale=1.0) -> tuple[dict, dict]:
    """(torch twin with ``planted``, JAX twin) intermediates on one input, the same weights; the
    router's weights times ``router_scale`` first (0: a zero-initialised router, every token a tie)."""
    import torch

    x = h.make_input(shape, dtype)
    with matched_precision(x64=dtype == "float64"):
        t = h.new_torch_block(cfg, dtype, "cpu", 0)
        with torch.no_grad():
            t.mlp.router.weight.mul_(router_scale)
        j = h.new_flax_block(cfg, dtype, h.jax_devices()["cpu"], 100)
        wc.torch_to_flax(t, j)
        with planted:
            got = h.run_torch(t, x, "cpu")
        return got, h.run_flax(j, x, h.jax_devices()["cpu"])


def _block_error(cfg, planted, router_scale=1.0) -> float:
    """Max abs error of the block output (float32), torch twin (with ``planted``) against JAX."""
    got, ref = _pair(cfg, planted, router_scale=router_scale)
    return float(np.max(np.abs(got["out"] - ref["out"])))


def _with_route(**switches):
    import torch_impl.moe as tm

    return mock.patch.object(tm, "route", lambda logits, cfg: route_variant(logits, cfg, **switches))


def check_tie_rule() -> Measurement:
    """A zero router (every token ties): torch.topk's choice against the lower-index rule."""
    cfg = MOE_BLOCK
    return Measurement(_block_error(cfg, _with_route(library_topk=True), router_scale=0.0),
                       _block_error(cfg, contextlib.nullcontext(), router_scale=0.0), OUT)  # fmt: skip


def check_softmax_after_topk() -> Measurement:
    """norm_topk_prob=False: a softmax over the k chosen logits (MaxText's order) is not the k
    probabilities of the softmax over all experts."""
    cfg = dataclasses.replace(MOE_BLOCK, norm_topk_prob=False)
    return Measurement(_block_error(cfg, _with_route(softmax_after_topk=True)),
                       _block_error(cfg, contextlib.nullcontext()), OUT)  # fmt: skip


def check_softmax_after_topk_renormalised() -> Measurement:
    """norm_topk_prob=True: the two orders are the same function (the trap is harmless here)."""
    return Measurement(_block_error(MOE_BLOCK, _with_route(softmax_after_topk=True)),
                       _block_error(MOE_BLOCK, contextlib.nullcontext()), OUT)  # fmt: skip


def check_norm_topk_prob_ignored() -> Measurement:
    cfg = dataclasses.replace(MOE_BLOCK, norm_topk_prob=False)
    return Measurement(_block_error(cfg, _with_route(ignore_norm=True)),
                       _block_error(cfg, contextlib.nullcontext()), OUT)  # fmt: skip


def check_capacity_order() -> Measurement:
    """capacity_factor 0.75 (a quarter of the pairs dropped): rank-first against token-first."""
    cfg = dataclasses.replace(MOE_BLOCK, capacity_factor=0.75)
    return Measurement(_block_error(cfg, _with_route(rank_first=True)),
                       _block_error(cfg, contextlib.nullcontext()), OUT)  # fmt: skip


def check_router_bf16() -> Measurement:
    """A float32 model whose torch router runs in bfloat16 (what torch.autocast does to an
    F.linear router), 4096 tokens, router weights x 10 (router logits of a few units, as a trained
    router's), against the JAX twin's float32 router. Counted: tokens routed to other experts whose
    float32 margin was decidable."""
    import torch

    import torch_impl.moe as tm

    def bf16_router(x, weight):
        return torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()).float()

    def differ(planted) -> int:
        got, ref = _pair(MOE_BLOCK, planted, "float32", BF16_ROUTER_SHAPE, router_scale=10.0)
        return compare_routing(ref["router_logits"], got["router_logits"], MOE_BLOCK.top_k, "float32")["differ_decidable"]

    return Measurement(differ(mock.patch.object(tm, "router_logits", bf16_router)),
                       differ(contextlib.nullcontext()), "tokens of 4096 routed to other experts (float32 model)")  # fmt: skip


BF16_ROUTER_SHAPE = (512, 8, 128)


def _loss_error(bent) -> tuple[float, float]:
    """Relative errors (load balancing, z) of torch's router_losses (``bent``: with a trap) against
    the float64 NumPy losses, on two layers of random router logits."""
    import torch

    import torch_impl.moe as tm

    layers = [np.random.default_rng(s).standard_normal((4, 16, 8)) * 2 for s in range(2)]
    ref = router_losses(layers, 2)
    with matched_precision(x64=True):
        got = (bent or tm.router_losses)([torch.from_numpy(z) for z in layers], dataclasses.replace(MOE_BLOCK, n_experts=8))
    return abs(float(got[0]) - ref[0]) / ref[0], abs(float(got[1]) - ref[1]) / ref[1]


def double_softmax_losses(router_logits, cfg):
    """The trap: the load-balancing loss reads softmax(softmax(logits))."""
    import torch

    import torch_impl.moe as tm

    z = torch.cat([g.reshape(-1, g.shape[-1]) for g in router_logits])
    probs2 = torch.softmax(torch.softmax(z, -1), -1)  # probabilities passed where logits belong
    f = (tm.ranks(z) < cfg.top_k).to(z.dtype).mean(0)
    return z.shape[-1] * torch.sum(f * probs2.mean(0)), tm.router_losses(router_logits, cfg)[1]


def z_loss_variants(router_logits, cfg, *, negated=False, summed=False):
    """The traps: the z-loss negated (it then rewards large logits) or summed instead of averaged
    (its weight then grows with the batch)."""
    import torch

    import torch_impl.moe as tm

    balance, _ = tm.router_losses(router_logits, cfg)
    z = torch.cat([g.reshape(-1, g.shape[-1]) for g in router_logits])
    sq = torch.logsumexp(z, dim=-1).square()
    z_loss = sq.sum() if summed else sq.mean()
    return balance, -z_loss if negated else z_loss


def check_aux_double_softmax() -> Measurement:
    return Measurement(_loss_error(double_softmax_losses)[0], _loss_error(None)[0],
                       "relative error of the load-balancing loss (float64)")  # fmt: skip


def check_z_loss_sign() -> Measurement:
    return Measurement(_loss_error(lambda g, c: z_loss_variants(g, c, negated=True))[1], _loss_error(None)[1],
                       "relative error of the z-loss (float64)")  # fmt: skip


def check_z_loss_mean() -> Measurement:
    return Measurement(_loss_error(lambda g, c: z_loss_variants(g, c, summed=True))[1], _loss_error(None)[1],
                       "relative error of the z-loss (float64)")  # fmt: skip


CHECKS = {
    "ties broken by the library's top-k": check_tie_rule,
    "softmax after top-k, not renormalised": check_softmax_after_topk,
    "norm_topk_prob ignored": check_norm_topk_prob_ignored,
    "router in bfloat16": check_router_bf16,
    "capacity drop order rank-first": check_capacity_order,
    "aux loss with a double softmax": check_aux_double_softmax,
    "z-loss negated": check_z_loss_sign,
    "z-loss summed, not averaged": check_z_loss_mean,
}
