"""Each MoE pitfall planted in the torch twin must be seen by the check that guards it: the twin
comparison (1e-5 in float32), the routing comparison, or the float64 router losses. If one of these
passes with the trap in, the MoE checks have gone blind (twin_parity/pitfalls/moe.py plants them)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import torch

import torch_impl.moe as tm
from twin_parity.pitfalls import moe as mp
from twin_common.tolerances import tolerance_for

F32 = tolerance_for("float32").atol


@pytest.mark.parametrize(
    "check", [mp.check_tie_rule, mp.check_softmax_after_topk, mp.check_norm_topk_prob_ignored, mp.check_capacity_order],
    ids=["library top-k ties", "softmax after top-k", "norm_topk_prob ignored", "capacity drop order"],
)
def test_planted_routing_bug_fails_the_twin_check(check):
    m = check()
    assert m.ignored > F32 and m.pinned <= F32, m


def test_softmax_order_is_harmless_once_renormalised():
    """The same switch with norm_topk_prob=True: equal in exact arithmetic, within float32 here."""
    m = mp.check_softmax_after_topk_renormalised()
    assert m.ignored <= F32 and m.pinned <= F32, m


@pytest.mark.slow
def test_router_in_bf16_routes_tokens_otherwise():
    m = mp.check_router_bf16()
    assert m.ignored > 0 and m.pinned == 0, m


@pytest.mark.parametrize(
    "check", [mp.check_aux_double_softmax, mp.check_z_loss_sign, mp.check_z_loss_mean],
    ids=["aux double softmax", "z-loss sign", "z-loss sum"],
)
def test_planted_loss_bug_fails_against_float64(check):
    m = check()
    assert m.ignored > 1e-6 and m.pinned <= 1e-12, m


def test_route_variant_without_traps_is_the_twin_route():
    """The sabotage copy must be the real rule when no trap is on, or the tests above prove nothing."""
    logits = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 4)))
    logits[:8] = 0.0  # ties too
    for change in ({}, dict(norm_topk_prob=False), dict(capacity_factor=0.75)):
        cfg = dataclasses.replace(mp.MOE_BLOCK, **change)
        assert torch.equal(mp.route_variant(logits, cfg), tm.route(logits, cfg)), change


@pytest.mark.parametrize("variant,trap", [
    ("norm_topk_prob=False", dict(ignore_norm=True)), ("norm_topk_prob=False", dict(softmax_after_topk=True)),
    ("capacity_factor=0.75", dict(rank_first=True)), ("zero router", dict(library_topk=True)),
], ids=["norm_topk_prob ignored", "softmax after top-k", "capacity drop order", "library top-k ties"])  # fmt: skip
def test_each_routing_trap_fails_a_report_row(variant, trap):
    """moe_tiny's config takes none of these branches, so its own rows cannot see the traps; the
    report's variant rows (moe_harness.VARIANTS) run each and name the MoE MLP."""
    from twin_parity import moe_harness as mh

    assert mh.variant_check(variant, "jax->torch").passed
    with mp._with_route(**trap):
        r = mh.variant_check(variant, "jax->torch")
    assert not r.passed and r.first_divergence == "mlp", r.divergence_detail
