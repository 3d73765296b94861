"""The suite must catch a wrong port: each test breaks one thing on purpose and expects a failure
at the right sublayer. If one of these passes, the parity checks have gone blind."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import dataclasses
import json

import jax
import numpy as np
import pytest

import jax_impl.block as jb
import weight_conversion.flax_side
import weight_conversion.torch_side
from twin_parity import harness as h
from twin_parity.bf16_bugs import BF16_BUGS, LLAMA_BF16_BUGS
from twin_parity.pitfalls import flax_layer_norm
from scripts import parity_report
from twin_common import BlockConfig
from twin_common.params import Transform, table_for

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
    code = parity_report.main(["--json", str(out), "--dtypes", "float64", "--heads", "4", "--quiet", "--only", "forward"])
    assert code == 1
    doc = json.loads(out.read_text())
    forward = [r for r in doc["results"] if r["check"] == "forward" and r["config"]["model"] == "block"]  # not RMSNorm ones
    assert forward and all(not r["passed"] and r["first_divergence"] == "ln_1" for r in forward)
    assert "FAIL" in capsys.readouterr().out


# -------------------------------------------------------------------------- bfloat16-only bugs


def _one_twin_bf16_rows(framework):
    rows = [h.bf16_sublayer_check(framework, dataclasses.replace(CFG, attn_impl=impl)) for impl in ("fused", "math")]
    return rows + [h.softmax_check(framework), h.loss_check(framework)]


@pytest.mark.parametrize("name", list(BF16_BUGS))
def test_bf16_only_bug_fails_a_one_twin_row(name):
    """Each bug computes exactly the right thing in float32: the twin-vs-twin rows let all but one
    of them through (bf16_bugs.py has the measurements); the rows against float64 must not. A
    softmax in bfloat16 hides under the attention output's rounding: its probabilities show it."""
    framework, bug = BF16_BUGS[name]
    with bug():
        failed = [r for r in _one_twin_bf16_rows(framework) if not r.passed]
    assert failed, f"{name} went unnoticed"
    expected = "loss" if "loss" in name else "attn probabilities" if "softmax" in name else "ln_1"
    assert all(r.first_divergence == expected for r in failed), [r.divergence_detail for r in failed]


@pytest.mark.parametrize("name", list(LLAMA_BF16_BUGS))
def test_llama_bf16_only_bug_fails_its_one_twin_row(name):
    """The Llama block's bfloat16 traps: an RMSNorm statistic in bfloat16 (ln_1 of the sublayer row)
    and rotary angles in bfloat16 (the rope row, at the first position whose angle is off; the
    lesson's 8 positions hide it from the sublayer row). Neither moves a twin-vs-twin row."""
    from twin_parity import llama_harness as lh

    framework, bug = LLAMA_BF16_BUGS[name]
    with bug():
        r = lh.rope_check(framework) if "rotary" in name else lh.bf16_sublayer_check(framework, "math")
    assert not r.passed, f"{name} went unnoticed"
    assert r.first_divergence.startswith("cos at position ") if "rotary" in name else r.first_divergence == "ln_1", r.divergence_detail


def test_the_softmax_sabotage_keeps_the_real_methods_signature():
    """A sabotage must replace the method it claims to: the real math_attention takes ``mask``
    (the KV cache passes it), so a replacement without it would fail for the wrong reason."""
    import inspect

    import torch_impl.block as tb

    for name in [n for n in BF16_BUGS if "softmax" in n]:
        framework, bug = BF16_BUGS[name]
        cls = (tb if framework == "torch" else jb).CausalSelfAttention
        real = inspect.signature(cls.math_attention)
        with bug():
            assert inspect.signature(cls.math_attention).parameters.keys() == real.parameters.keys(), name


# ------------------------------------------------------------------------------------ locators


def _cache_slot_stuck_after_second_decode_step(monkeypatch):
    """A KV cache whose write slot stops advancing after the second decode step (torch twin): every
    later step overwrites that slot."""
    import torch

    import torch_impl.block as tb

    honest = tb.KVCache.update

    def update(self, k, v, t):
        if k.shape[2] == 1:  # a decode step
            first = self.__dict__.setdefault("first_decode_slot", int(t))
            t = torch.clamp(t, max=first + 1)
        return honest(self, k, v, t)

    monkeypatch.setattr(tb.KVCache, "update", update)


def test_kv_cache_row_names_the_first_position_over_its_bound(monkeypatch):
    """Decode step 3 is the first to read the stuck slot: row 0 (prompt length 5) at position 7,
    not the worst position near the end of the block."""
    from twin_parity import generate_harness as gh

    _cache_slot_stuck_after_second_decode_step(monkeypatch)
    r = gh.kv_cache_check("torch", "float64")
    assert not r.passed
    assert r.first_divergence == "row 0 position 7", r.divergence_detail
    assert "decode step 3; rule: the first position over the bound" in r.divergence_detail


def test_grad_row_says_all_parameters_when_every_gradient_is_scaled(monkeypatch):
    """A data-parallel gradient summed over two replicas instead of averaged: every gradient x2."""
    from twin_parity import train_harness as th

    honest = th._flax_grads
    monkeypatch.setattr(th, "_flax_grads", lambda *a: {k: 2 * v for k, v in honest(*a).items()})
    r = th.grad_check("gpt", "float32", "torch->jax")
    assert not r.passed and r.first_divergence == "all parameters", r.divergence_detail
    assert r.divergence_detail.startswith("all parameters x2 ")
    one = th.worst_offender({"a": np.ones(3), "b": np.ones(2)}, {"a": 2 * np.ones(3), "b": np.ones(2)}, lambda _: 1e-5)
    assert one[0] == "a"  # one array off: that array, not "all parameters"


def _shared_default(monkeypatch, **defaults):
    """BlockConfig's own defaults changed, as a wrong edit to twin_common/config.py would: both twins
    read them, so every twin-vs-twin row agrees."""
    from twin_common import config

    init = config.BlockConfig.__init__
    names = [f.name for f in dataclasses.fields(config.BlockConfig) if f.init][-len(init.__defaults__):]
    values = dict(zip(names, init.__defaults__)) | defaults
    monkeypatch.setattr(init, "__defaults__", tuple(values[n] for n in names))


@pytest.mark.parametrize("default,where", [(dict(gelu_approximate="tanh"), "mlp")])  # eps 1e-6: the report test below
def test_a_wrong_shared_default_fails_the_defaults_row(monkeypatch, default, where):
    _shared_default(monkeypatch, **default)
    assert BlockConfig.lesson(4).to_dict().items() >= default.items()
    assert h.forward_check(BlockConfig.lesson(4), "float64", "torch->jax").passed  # both twins share it
    for framework in ("torch", "jax"):
        assert h.golden_check(framework, 4, "float64").passed  # the stored config does not move
        r = h.golden_check(framework, 4, "float64", defaults=True)
        assert not r.passed and r.first_divergence == where, r.divergence_detail
        (field, value), = default.items()
        assert f"default changed: {field} {value!r}" in r.divergence_detail


def _top_k_keeps_one_more(monkeypatch):
    """torch's sampler keeps the k + 1 largest logits instead of k."""
    import torch_impl.generate as tg

    honest = tg.sample

    def sample(logits, u, temperature, top_p, *, greedy, top_k, use_top_p):
        return honest(logits, u, temperature, top_p, greedy=greedy, top_k=top_k + 1 if top_k else 0, use_top_p=use_top_p)

    monkeypatch.setattr(tg, "sample", sample)


def test_llama_generate_row_names_a_top_k_keeping_one_more(monkeypatch):
    from twin_parity import llama_harness as lh

    _top_k_keeps_one_more(monkeypatch)
    r = lh.generate_check("top_k")
    assert not r.passed and r.config["model"] == "llama"
    assert r.first_divergence.startswith("torch row ") and r.first_divergence.endswith("outside the top-k/top-p set")


def test_llama_resume_row_names_a_dropped_optimizer_step_count(monkeypatch):
    """The resumed trainer starts its step count at 0 (the checkpoint's step dropped on the way
    in): the learning-rate schedule and Adam's bias correction restart. The row names the count,
    the cause, not the parameter that moved most because of it."""
    import torch_impl.train as tt
    from twin_parity import llama_harness as lh

    honest = tt.Trainer.load
    monkeypatch.setattr(tt.Trainer, "load", lambda self, weights, optim, step: honest(self, weights, optim, 0))
    r = lh.resume_check("jax")  # 10 steps in JAX, resumed in torch
    assert not r.passed and r.first_divergence == "optimizer step count", r.divergence_detail
    assert r.divergence_detail == "optimizer step count: torch resumed at step 0, the checkpoint was saved at 10"
    assert r.max_abs_err > r.tolerance  # and the weights did move apart


def _cells(out: str) -> list[tuple[str, str]]:
    """(row, first-divergence cell) of every row of the report's table."""
    lines = out.splitlines()
    start = lines[0].index("first divergence")
    return [(line, line[start:]) for line in lines[2:] if line and not line.startswith(" ") and len(line) > start]


def test_report_names_a_top_k_keeping_one_more(monkeypatch, capsys):
    """The top-k-only generate row fails and names the twin, row and token; greedy and the
    top-p-cut sampled row cannot see it."""
    from scripts import parity_report

    _top_k_keeps_one_more(monkeypatch)
    assert parity_report.main(["--quiet", "--only", "generate", "--dtypes", "float32"]) == 1
    cells = {line.split()[3]: (line, cell) for line, cell in _cells(capsys.readouterr().out)}  # by sampling
    assert " FAIL " in cells["top_k"][0], cells
    assert cells["top_k"][1].startswith("torch row ") and cells["top_k"][1].endswith("outside the top-k/top-p set"), cells
    assert " PASS " in cells["greedy"][0], cells


def test_report_names_each_planted_bug_in_its_row(monkeypatch, capsys):
    """Four bugs at once, each in another code path, one float64 report: a fast-variance LayerNorm
    (Flax), a wrong shared default (BlockConfig eps 1e-6), an epsilon dropped by the transformers
    config mapping, a KV-cache slot never advanced after the second decode step (torch). Each fails
    its own row with the cell that locates it; the rows that cannot see a bug still pass."""
    import weight_conversion.hf_gpt2 as hg
    from scripts import parity_report

    monkeypatch.setattr(jb, "layer_norm", flax_layer_norm(use_fast_variance=True))
    _shared_default(monkeypatch, ln_eps=1e-6)
    monkeypatch.delitem(hg.MAPPED, "layer_norm_epsilon")
    _cache_slot_stuck_after_second_decode_step(monkeypatch)
    code = parity_report.main(["--quiet", "--only", "forward", "defaults", "hf_gpt2", "kv_cache",
                               "--dtypes", "float64", "--heads", "4"])  # fmt: skip
    assert code == 1
    failed = {}
    for line, cell in _cells(capsys.readouterr().out):
        if " FAIL " in line:
            failed.setdefault(line.split()[0], []).append((line, cell))
        else:
            assert " PASS " in line and "input mean" not in line and "eps=0.001" not in line, line
    assert [c for _, c in failed["forward"]] and all("input mean 1000" in l and c.startswith("ln_1: ") for l, c in failed["forward"])
    assert len(failed["defaults"]) == 2 and all(
        c.startswith("ln_1: ") and c.endswith("default changed: ln_eps 1e-06 (golden 1e-05)") for _, c in failed["defaults"])
    assert len(failed["hf_gpt2"]) == 2 and all("eps=0.001" in l and c.startswith("blocks.0: ") for l, c in failed["hf_gpt2"])
    # the stuck slot is the torch twin's KVCache: the GPT's row and the Llama preset's row both fail
    assert sorted(line.split()[1] for line, _ in failed["kv_cache"]) == ["gpt", "llama"], failed["kv_cache"]
    for line, cell in failed["kv_cache"]:
        assert "torch:" in line and "(decode step 3; rule: the first position over the bound" in cell, cell
    [gpt] = [cell for line, cell in failed["kv_cache"] if line.split()[1] == "gpt"]
    assert gpt.startswith("row 0 position 7 (decode step 3; rule: the first position over the bound"), gpt


# ------------------------------------------------------------ shared training rules (optimizer_vs_f64)


def _train_default(monkeypatch, **defaults):
    """TrainConfig's own defaults changed, as a wrong edit to twin_common/train_config.py would:
    both training twins read them, so train_step and resume agree."""
    from twin_common.train_config import TrainConfig

    init = TrainConfig.__init__
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.init][-len(init.__defaults__):]
    values = dict(zip(names, init.__defaults__)) | defaults
    monkeypatch.setattr(init, "__defaults__", tuple(values[n] for n in names))


def _decay_every_parameter(monkeypatch):
    """The table's decay column says "decay" for biases and norms too (optax's unmasked adamw): one
    column both optimizers build their masks from."""
    from twin_common.params import ParamSpec

    monkeypatch.setattr(ParamSpec, "decay", property(lambda self: True))


def _warmup_one_step_late(monkeypatch):
    """The schedule both twins read starts warmup at 0 instead of lr / warmup_steps."""
    from twin_common.train_config import TrainConfig

    honest = TrainConfig.lr_at
    monkeypatch.setattr(TrainConfig, "lr_at", lambda self, s: honest(self, s - 1) if s < self.warmup_steps else honest(self, s))


SHARED_TRAINING_BUGS = {
    # bug -> (plant, framework whose row is run, the first divergence, the cause named in the detail)
    "decay on every parameter": (_decay_every_parameter, "torch", "step 0: ", "decay column differs from 'matrices only' at "),
    "beta2 0.999 (both libraries' default)": (lambda mp: _train_default(mp, beta2=0.999), "jax", "step 1: ",
                                              "default changed: beta2 0.999 (reference 0.95)"),  # step 0: Adam's bias correction cancels beta2
    "warmup one step late": (_warmup_one_step_late, "torch", "step 0: ", "TrainConfig.lr_at(0) = "),
}


@pytest.mark.parametrize("bug", list(SHARED_TRAINING_BUGS))
def test_a_shared_training_bug_passes_train_step_and_fails_the_optimizer_row(monkeypatch, bug):
    """A mistake both twins share cannot fail a twin-vs-twin row; each twin against the NumPy AdamW
    written in optimizer_harness fails, names the first step and says which shared rule moved."""
    from twin_parity import optimizer_harness as oh

    plant, framework, first, cause = SHARED_TRAINING_BUGS[bug]
    plant(monkeypatch)
    r = oh.optimizer_check(framework)
    assert not r.passed and r.first_divergence.startswith(first), r.divergence_detail
    assert cause in r.divergence_detail, r.divergence_detail
    if bug == "decay on every parameter":  # the twins agree with each other: train_step passes
        from twin_parity import train_harness as th

        assert th.trajectory_check("torch->jax")[0].passed
        assert r.first_divergence.split(": ")[1].endswith(("bias", "weight")) and "ln" in r.divergence_detail


def test_clipping_without_torchs_epsilon_fails_the_jax_optimizer_row(monkeypatch):
    """optax.clip_by_global_norm (max_norm / norm) instead of torch's max_norm / (norm + 1e-6): the
    clipped gradient moves by 1e-6 / norm relative (norm about 3 here), 7.9e-11 in a float64 weight
    after one step (measured); the row against NumPy, bound 1e-12, sees it at step 0."""
    import optax

    import jax_impl.train as jt
    from twin_parity import optimizer_harness as oh

    monkeypatch.setattr(jt, "clip_by_global_norm_like_torch", optax.clip_by_global_norm)
    r = oh.optimizer_check("jax")
    assert not r.passed and r.first_divergence.startswith("step 0: "), r.divergence_detail
