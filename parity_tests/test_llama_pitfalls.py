"""The Llama pitfalls: each must bite when ignored and be fixed by its pin (the measurement), and
each, planted in a twin or the converter, must make one of the project's own checks fail (the
sabotage). Thresholds for the ignored side sit well below what was measured (2-core CPU, torch
2.13, jax 0.10.2, flax 0.12.8; the measured value is in each comment)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import dataclasses

import jax
import torch

import jax_impl.block as jb
import torch_impl.block as tb
import torch_impl.gpt as tg
from twin_parity import generate_harness as gh
from twin_parity import harness as h
from twin_parity.pitfalls.llama import LLAMA_PITFALLS
from twin_common import GPTConfig
from twin_common.tolerances import TOLERANCES

F32 = TOLERANCES["float32"].atol  # 1e-5

# pitfall id -> (ignored must be above this, pinned must be at most this)
THRESHOLDS = {
    "rope-layout": (5e-3, F32),  # measured 2.7e-2
    "qk-permutation": (5e-3, F32),  # measured 2.7e-2
    "gqa-repeat": (0.1, F32),  # measured 0.88
    "rmsnorm-eps-flax": (1e-3, F32),  # measured 5.2e-3
    "rmsnorm-eps-torch": (1e-3, F32),  # measured 5.7e-3
    "rmsnorm-stat-dtype": (1.2, 1.0),  # ulps: measured 1.53 vs 0.90; the sublayer bound is 1 ulp
    "swiglu-swap": (2e-2, F32),  # measured 0.12
    "rope-theta-default": (2e-3, F32),  # measured 1.3e-2
    "left-pad-positions": (1.0, F32),  # measured 7.1 (learned positions)
}


def test_thresholds_cover_every_pitfall():
    assert list(THRESHOLDS) == [p.id for p in LLAMA_PITFALLS]


@pytest.mark.parametrize("pitfall", LLAMA_PITFALLS, ids=lambda p: p.id)
def test_llama_pitfall_bites_and_pin_holds(pitfall):
    m = pitfall.check()
    above, at_most = THRESHOLDS[pitfall.id]
    assert m.pinned <= at_most, f"pin does not hold: {m}"  # a NaN fails here too
    assert m.ignored > above, f"trap no longer shows: {m}"


# ------------------------------------------------------------------------ sabotage: planted, caught

LLAMA_BLOCK = dataclasses.replace(GPTConfig.llama_tiny().block_config(), d_model=128, block_size=8, mlp_hidden=344)


def hf_check(framework: str, n_kv_heads: int = 2, layout: str = "half"):
    pytest.importorskip("transformers", reason="transformers is a test extra")
    from twin_parity import hf_harness as hh

    return hh.hf_llama_check(framework, n_kv_heads, layout)


def test_sabotage_rope_layout_swapped_in_the_flax_twin(monkeypatch):
    right = jb.rotate
    other = {"half": "interleaved", "interleaved": "half"}
    monkeypatch.setattr(jb, "rotate", lambda x, cos, sin, layout: right(x, cos, sin, other[layout]))
    r = h.forward_check(LLAMA_BLOCK, "float32", "torch->jax")
    assert not r.passed and r.first_divergence == "attn"


def test_sabotage_missing_qk_permutation(monkeypatch):
    import weight_conversion.hf_llama as hl
    import weight_conversion.hf_llama_table as hlt

    monkeypatch.setattr(hl, "to_twin", lambda arrays, table, cfg: hlt._renamed_to_twin(arrays, table))
    r = hf_check("torch", layout="interleaved")
    assert not r.passed and r.first_divergence == "blocks.0"


def test_sabotage_gqa_tiled(monkeypatch):
    monkeypatch.setattr(tb, "repeat_kv", lambda k, group: k.repeat(1, group, 1, 1))
    r = hf_check("torch")
    assert not r.passed and r.first_divergence == "blocks.0"


def test_sabotage_rmsnorm_library_defaults(monkeypatch):
    from flax import nnx

    def flax_default(cfg, *, param_dtype, rngs):  # epsilon 1e-6
        return nnx.RMSNorm(cfg.d_model, param_dtype=param_dtype, rngs=rngs)

    monkeypatch.setattr(jb, "norm", flax_default)
    assert not hf_check("jax").passed
    monkeypatch.setattr(tb, "norm", lambda cfg: torch.nn.RMSNorm(cfg.d_model))  # eps: machine epsilon
    assert not hf_check("torch").passed


def test_sabotage_rmsnorm_statistic_in_bf16(monkeypatch):
    def bf16_statistic(self, x):  # mean(x^2) taken in x's dtype
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    monkeypatch.setattr(tb.RMSNorm, "forward", bf16_statistic)
    make_input = h.make_input  # larger inputs (x 3, as the measurement) make the rounding show
    monkeypatch.setattr(h, "make_input", lambda shape, dtype, seed=0: make_input(shape, dtype, seed) * 3)
    r = h.bf16_sublayer_check("torch", LLAMA_BLOCK)
    assert not r.passed and r.first_divergence == "ln_1"


def test_sabotage_swiglu_gate_up_swapped(monkeypatch):
    def swapped(self, x):  # silu on the up projection, the gate multiplied in
        return self.down_proj(self.gate_proj(x) * jax.nn.silu(self.up_proj(x)))

    monkeypatch.setattr(jb.SwiGLU, "__call__", swapped)
    r = h.forward_check(LLAMA_BLOCK, "float32", "torch->jax")
    assert not r.passed and r.first_divergence == "mlp"


def test_sabotage_rope_theta_default(monkeypatch):
    import weight_conversion.hf_llama as hl

    monkeypatch.setattr(hl, "_rope_theta", lambda hf_config, problems: hl.ROPE_DEFAULT_THETA)
    r = hf_check("jax")  # the file says 5000
    assert not r.passed and r.first_divergence == "blocks.0"


def test_sabotage_left_pad_positions(monkeypatch):
    monkeypatch.setattr(tg, "position_ids", lambda slots, start: slots[None, :].expand(start.shape[0], -1))
    assert not gh.kv_cache_check("torch", "float32").passed  # learned positions: caught
    # rotary positions: a shift shared by a row's queries and keys cancels, within rounding
    assert gh.kv_cache_check("torch", "float32", base=gh.LLAMA_CACHE_CFG).passed


@pytest.mark.parametrize("field, variant", [("attention_bias", 2), ("tie_word_embeddings", 3)])
def test_a_dropped_llama_config_field_fails_its_hf_llama_row(monkeypatch, field, variant):
    """The config mapping forgets a field it reads (attention biases, a tied head): the import then
    refuses the file, naming the field, and the report's row fails. Only the hf_llama rows with
    biases and a tied head (llama_harness.HF_VARIANTS) run that path; the others pass."""
    pytest.importorskip("transformers", reason="transformers is a test extra")
    import weight_conversion.hf_llama as hl
    from twin_parity import hf_harness as hh
    from twin_parity import llama_harness as lh

    n_kv, layout, overrides = lh.HF_VARIANTS[variant]
    assert overrides.get(field) is True
    monkeypatch.delitem(hl.MAPPED, field)
    with pytest.raises(ValueError, match=f"{field}=True: the twins do not compute it"):
        hh.hf_llama_check("torch", n_kv, layout, **overrides)


def test_sabotage_rotary_decode_positions_from_the_padded_slot(monkeypatch):
    """Prefill with the true positions, then every decode step's rotary position taken from its
    cache slot (the padded index): a left-padded row's new query and key sit start positions away
    from its cached keys, and only a padded row shows it. The Llama kv_cache row fails at the first
    decode step of row 0 (5 prompt tokens after 6 pads: position 5); row 1, unpadded, stays right."""
    honest = tg.position_ids

    def decode_from_slot(slots, start):
        return honest(slots, start) if slots.shape[0] > 1 else slots[None, :].expand(start.shape[0], -1)

    monkeypatch.setattr(tg, "position_ids", decode_from_slot)
    from twin_parity import llama_harness as lh

    r = lh.kv_cache_check("torch", "float32")
    assert not r.passed and r.first_divergence == "row 0 position 5", r.divergence_detail
    assert "decode step 1;" in r.divergence_detail

