"""transformers Llama checkpoints in and out, checked against transformers' own LlamaForCausalLM.

Random small models with odd sizes (vocab 97, 24 positions, width 36, 6 heads of 6, SwiGLU width 58;
no downloads), every parameter perturbed, n_kv_heads 1 (multi-query), 2 (grouped) and 6 (= heads);
float32 on CPU under matched precision. Covers: logits of both twins in both rope layouts, greedy
tokens of the twins' cached generation against ``generate``, export -> ``from_pretrained`` ->
import bit for bit, sharded files, config refusals, and the layout mistake only ``verify=True`` sees.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")
pytest.importorskip("transformers", reason="transformers is a test extra (pip install -e .[dev]); absent here")

import dataclasses
import json
import os

import numpy as np
import torch
from transformers import LlamaForCausalLM

import weight_conversion as wc
import weight_conversion.hf_llama as hl
import weight_conversion.hf_llama_table as hlt
from twin_parity import hf_harness as hh
from twin_common.generation import Sampling
from twin_common.precision import matched_precision
from twin_common.reference import llama_forward
from weight_conversion.validate import ConversionError
from weight_conversion.verify import VerificationError

FRAMEWORKS = ("torch", "jax")
BOUND = 1e-5  # the float32 row of twin_common/tolerances.py


@pytest.fixture(autouse=True)
def _matched_precision():
    with matched_precision():
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(n_kv_heads, overrides): (transformers model, directory it was saved to)}."""
    cache = {}

    def get(n_kv_heads: int = 2, **overrides):
        key = (n_kv_heads, tuple(sorted(overrides.items())))
        if key not in cache:
            model = hh.new_hf_model(hh.llama_config(n_kv_heads, **overrides))
            directory = tmp_path_factory.mktemp("llama")
            model.save_pretrained(directory)
            cache[key] = model, str(directory)
        return cache[key]

    return get


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in wc.export(model).items()}


def idx(seq: int = hh.LLAMA_POSITIONS, batch: int = 2) -> np.ndarray:
    return hh.token_ids(batch, seq, 0, hh.LLAMA_VOCAB)


# -------------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("n_kv_heads, rope_layout", [(1, "half"), (2, "interleaved"), (6, "half")])
def test_logits_match_transformers(framework, n_kv_heads, rope_layout, saved):
    hf, directory = saved(n_kv_heads)
    twin = hh.import_llama_into(framework, directory, rope_layout=rope_layout)
    err, _, _, passed, first, _ = hh.compare_logits(hh.hf_run(hf, idx()), hh.twin_run(twin, idx()))
    assert passed and err <= BOUND, f"first divergence at {first}, logits max abs err {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("n_kv_heads", [1, 2, 6])
@pytest.mark.parametrize("rope_layout", ["half", "interleaved"])
def test_logits_match_transformers_every_variant(framework, n_kv_heads, rope_layout, saved):
    hf, directory = saved(n_kv_heads, attention_bias=True, tie_word_embeddings=n_kv_heads == 6)
    twin = hh.import_llama_into(framework, directory, verify=True, rope_layout=rope_layout)
    err, _, _, passed, first, _ = hh.compare_logits(hh.hf_run(hf, idx()), hh.twin_run(twin, idx()))
    assert passed and err <= BOUND, f"first divergence at {first}, logits max abs err {err:.3g}"


def test_reference_reads_transformers_layout(saved):
    """The NumPy Llama that verify trusts agrees with transformers itself (float64 vs float32)."""
    hf, directory = saved(2)
    with open(os.path.join(directory, "config.json")) as f:
        doc = json.load(f)
    arrays, _ = hl.read_hf_arrays(directory, hl.llama_config_from_dir(directory), prefix="model.")
    ref = llama_forward(arrays, idx(), doc)
    assert np.max(np.abs(ref["logits"] - hh.hf_run(hf, idx())["logits"])) <= BOUND


# ------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_greedy_cached_generation_matches_transformers_generate(framework, saved):
    """The twins' KV-cache generation (rotary positions from the cache slot) against
    ``generate(do_sample=False)``, to the last position."""
    hf, directory = saved(2)
    prompt = [5, 17, 42, 8, 90]
    n_new = hh.LLAMA_POSITIONS - len(prompt)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)[0].tolist()
    twin = hh.import_llama_into(framework, directory)
    if framework == "torch":
        from torch_impl.generate import run
    else:
        from jax_impl.generate import run
    gen = run(twin, [prompt], n_new, Sampling(temperature=0.0), record_logits=True)
    top2 = np.sort(gen.logits[:, 0], axis=-1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 10 * BOUND, "a near tie: the token check would prove nothing"
    assert prompt + gen.tokens[0] == expected


# ------------------------------------------------------------------------------------------ export


def perturbed_twin(framework: str, cfg):
    model = hh.new_twin(framework, cfg)
    rng = np.random.default_rng(7)
    wc.import_(model, {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params(model).items()})
    return model


@pytest.mark.parametrize(
    "framework, rope_layout, tie", [("torch", "half", False), ("jax", "interleaved", True)]
)
def test_export_from_pretrained_import_is_bit_exact(framework, rope_layout, tie, saved, tmp_path):
    _, directory = saved(2)
    cfg = dataclasses.replace(hl.llama_config_from_dir(directory), rope_layout=rope_layout, tie_embeddings=tie)
    twin = perturbed_twin(framework, cfg)
    hl.export_hf_llama(twin, tmp_path / "out")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert np.max(np.abs(hh.hf_run(hf, idx())["logits"] - hh.twin_run(twin, idx())["logits"])) <= BOUND
    hf.save_pretrained(tmp_path / "again")
    back = hh.new_twin(framework, cfg)
    hl.import_hf_llama(back, tmp_path / "again", verify=True)
    mine, theirs = params(twin), params(back)
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)


def test_sharded_checkpoint_loads_like_the_single_file(saved, tmp_path):
    hf, directory = saved(2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    single, sharded = hh.import_llama_into("torch", directory), hh.import_llama_into("jax", str(tmp_path))
    a, b = params(single), params(sharded)
    assert all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- refusals, verify


def test_every_unsupported_config_field_is_named():
    doc = json.loads(json.dumps(hh.llama_config(2).to_dict()))
    doc.update(hidden_act="gelu", head_dim=8, sliding_window=16, pretraining_tp=2,
               rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5})  # fmt: skip
    with pytest.raises(ValueError) as e:
        hl.llama_config_from_hf(doc)
    for name in ("hidden_act='gelu'", "head_dim=8", "sliding_window=16", "pretraining_tp=2", "rope_type='llama3'"):
        assert name in str(e.value)


def test_absent_fields_take_llama_config_defaults():
    """rms_norm_eps 1e-6 and rope_theta 10000 when a file leaves them out (LlamaConfig's defaults),
    and a transformers 4.x file's top-level rope_theta is read."""
    base = dict(hidden_size=36, num_attention_heads=6, intermediate_size=58, num_hidden_layers=1, vocab_size=97)
    cfg = hl.llama_config_from_hf(base)
    assert (cfg.ln_eps, cfg.rope_theta, cfg.kv_heads, cfg.tie_embeddings) == (1e-6, 10000.0, 6, False)
    assert hl.llama_config_from_hf({**base, "rope_theta": 100000.0, "rope_scaling": None}).rope_theta == 100000.0


def test_config_mismatch_is_refused_and_model_untouched(saved):
    _, directory = saved(2)
    cfg = dataclasses.replace(hl.llama_config_from_dir(directory), n_kv_heads=3)
    twin = hh.new_twin("torch", cfg)
    before = params(twin)
    with pytest.raises(ConversionError, match="n_kv_heads"):
        hl.import_hf_llama(twin, directory)
    assert all(np.array_equal(before[k], v) for k, v in params(twin).items())


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_verify_catches_a_missing_qk_permutation(framework, saved, monkeypatch):
    """An interleaved twin loaded without the q/k row permutation: every name, shape and dtype is
    right, the model is wrong. verify names the first attention and puts the old weights back."""
    _, directory = saved(2)
    cfg = dataclasses.replace(hl.llama_config_from_dir(directory), rope_layout="interleaved")
    twin = hh.new_twin(framework, cfg)
    before = params(twin)
    monkeypatch.setattr(hl, "to_twin", lambda arrays, table, cfg: hlt._renamed_to_twin(arrays, table))
    with pytest.raises(VerificationError) as e:
        hl.import_hf_llama(twin, directory, verify=True)
    assert e.value.sublayer == "blocks.0.attn"
    assert all(np.array_equal(before[k], v) for k, v in params(twin).items())
