"""The suite must catch a wrong port: each test breaks one thing on purpose and expects a failure
at the right sublayer. If one of these passes, the parity checks have gone blind."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import dataclasses
import json

import jax
import pytest

import jax_impl.block as jb
import weight_conversion.flax_side
import weight_conversion.torch_side
from parity_tests import harness as h
from parity_tests.bf16_bugs import BF16_BUGS, NOT_SEEN
from parity_tests.pitfalls import flax_layer_norm
from scripts import parity_report
from twin_common import BlockConfig
from weight_conversion.table import Transform, table_for

CFG = BlockConfig.lesson(n_heads=4)


def _sabotage_table(monkeypatch, edit):
    """Make both converter sides use ``edit(table)`` instead of the real table."""

    def broken_table_for(cfg):
        return tuple(edit(list(table_for(cfg))))

    monkeypatch.setattr(weight_conversion.torch_side, "table_for", broken_table_for)
    monkeypatch.setattr(weight_conversion.flax_side, "table_for", broken_table_for)


def _replace(table, key, **changes):
    return [dataclasses.replace(s, **changes) if s.torch_key == key else s for s in table]


def _swap_paths(table, key_a, key_b):
    a = next(s for s in table if s.torch_key == key_a)
    b = next(s for s in table if s.torch_key == key_b)
    table = _replace(table, key_a, flax_path=b.flax_path)
    return [dataclasses.replace(s, flax_path=a.flax_path) if s.torch_key == key_b else s for s in table]


SABOTAGED_TABLES = {
    # a square weight copied without its transpose: every shape check still passes
    "out_proj not transposed": (lambda t: _replace(t, "attn.out_proj.weight", transform=Transform.IDENTITY), "attn"),
    "q and k swapped": (lambda t: _swap_paths(t, "attn.q_proj.weight", "attn.k_proj.weight"), "attn"),
    "ln_1 and ln_2 biases swapped": (lambda t: _swap_paths(t, "ln_1.bias", "ln_2.bias"), "ln_1"),
    "v and out biases swapped": (lambda t: _swap_paths(t, "attn.v_proj.bias", "attn.out_proj.bias"), "attn"),
}


@pytest.mark.parametrize("case", list(SABOTAGED_TABLES))
@pytest.mark.parametrize("direction", h.DIRECTIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wrong_table_entry_fails_at_its_sublayer(monkeypatch, case, direction, dtype):
    """In bfloat16 the float64 truth (which widens the sublayer bounds) comes from the source twin's
    own weights: built through the table, it moved with the bug, and jax->torch rows then passed
    ("q and k swapped", "ln_1 and ln_2 biases swapped") or blamed `out`."""
    edit, where = SABOTAGED_TABLES[case]
    _sabotage_table(monkeypatch, edit)
    r = h.forward_check(CFG, dtype, direction)
    assert not r.passed
    assert r.first_divergence == where


def test_flax_default_layer_norm_eps_fails_at_ln_1(monkeypatch):
    """nnx.LayerNorm's own eps (1e-6 instead of 1e-5): 3e-6 at the output, but ln_1 is over 1e-5."""
    monkeypatch.setattr(jb, "layer_norm", flax_layer_norm(epsilon=1e-6))
    r = h.forward_check(CFG, "float32", "torch->jax")
    assert not r.passed and r.first_divergence == "ln_1"


def test_flax_default_gelu_fails_at_mlp(monkeypatch):
    """jax.nn.gelu's default tanh approximation instead of exact erf GELU."""
    pinned_init = jb.MLP.__init__

    def init_with_library_default(self, *args, **kwargs):
        pinned_init(self, *args, **kwargs)
        self.gelu = jax.nn.gelu  # approximate=True unless told otherwise

    monkeypatch.setattr(jb.MLP, "__init__", init_with_library_default)
    r = h.forward_check(CFG, "float32", "jax->torch")
    assert not r.passed and r.first_divergence == "mlp"


def test_report_exits_nonzero_and_names_the_sublayer(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(jb, "layer_norm", flax_layer_norm(epsilon=1e-6))
    out = tmp_path / "report.json"
    code = parity_report.main(["--json", str(out), "--dtypes", "float64", "--heads", "4", "--quiet"])
    assert code == 1
    doc = json.loads(out.read_text())
    forward = [r for r in doc["results"] if r["check"] == "forward" and r["config"]["model"] == "block"]  # not RMSNorm ones
    assert forward and all(not r["passed"] and r["first_divergence"] == "ln_1" for r in forward)
    assert "FAIL" in capsys.readouterr().out


# -------------------------------------------------------------------------- bfloat16-only bugs


def _one_twin_bf16_rows(framework):
    rows = [h.bf16_sublayer_check(framework, dataclasses.replace(CFG, attn_impl=impl)) for impl in ("fused", "math")]
    return rows + [h.loss_check(framework)]


SEEN = [name for name in BF16_BUGS if name not in NOT_SEEN]


@pytest.mark.parametrize("name", SEEN)
def test_bf16_only_bug_fails_a_one_twin_row(name):
    """Each bug computes exactly the right thing in float32: the twin-vs-twin rows let all but one
    of them through (bf16_bugs.py has the measurements); the rows against float64 must not."""
    framework, bug = BF16_BUGS[name]
    with bug():
        failed = [r for r in _one_twin_bf16_rows(framework) if not r.passed]
    assert failed, f"{name} went unnoticed"
    expected = "loss" if "loss" in name else "ln_1"
    assert all(r.first_divergence == expected for r in failed), [r.divergence_detail for r in failed]


@pytest.mark.parametrize("name", NOT_SEEN)
@pytest.mark.xfail(strict=True, reason="below the output's own rounding (measured in bf16_bugs.py)")
def test_bf16_softmax_bug_is_not_seen_at_the_attention_output(name):
    """Recorded, not hidden: if a check starts to see this bug, this xfail turns into a failure."""
    framework, bug = BF16_BUGS[name]
    with bug():
        assert not all(r.passed for r in _one_twin_bf16_rows(framework))
