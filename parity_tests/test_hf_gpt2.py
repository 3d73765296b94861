"""GPT-2 checkpoints in and out, checked against transformers' own GPT2LMHeadModel.

Tiny random models (vocab 96, 16 positions, width 32, 4 heads; no downloads), every parameter
perturbed; float32 on CPU under matched precision. Covers: logits of both twins against
transformers (1 and 3 layers, seq 1 and full length, eager and sdpa), greedy tokens against
``generate(do_sample=False)``, export -> ``from_pretrained``, the prefix-less file variant, config
refusals, bad files reported at once, and the two layout mistakes only ``verify=True`` catches.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")
pytest.importorskip("transformers", reason="transformers is a test extra (pip install -e .[dev]); absent here")

import dataclasses
import os
import shutil

import numpy as np
import torch
from transformers import GPT2LMHeadModel

import weight_conversion as wc
import weight_conversion.hf_gpt2 as hg
import weight_conversion.hf_gpt2_table as ht
from twin_parity import hf_harness as hh
from twin_common import GPTConfig
from twin_common.precision import matched_precision
from twin_common.reference import gpt2_forward, read_gpt2_config
from weight_conversion.safetensors_io import load_file, save_file
from weight_conversion.verify import VerificationError

FRAMEWORKS = ("torch", "jax")
BOUND = 1e-5  # the float32 row of twin_common/tolerances.py


@pytest.fixture(autouse=True)
def _matched_precision():
    with matched_precision():
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(n_layers, attn_implementation): (transformers model, directory it was saved to)}."""
    cache = {}

    def get(n_layers: int = 2, attn: str = "eager", **overrides):
        key = (n_layers, attn, tuple(sorted(overrides.items())))
        if key not in cache:
            model = hh.new_hf_model(hh.hf_config(n_layers, attn, **overrides))
            directory = tmp_path_factory.mktemp("hf")
            model.save_pretrained(directory)
            cache[key] = model, str(directory)
        return cache[key]

    return get


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in wc.export(model).items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


# -------------------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("attn", hh.ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_logits_match_transformers(framework, n_layers, attn, saved):
    hf, directory = saved(n_layers, attn)
    twin = hh.import_into(framework, directory)
    for seq in (1, hh.POSITIONS):  # one token, and the full context
        idx = hh.token_ids(3, seq)
        reference, other = hh.hf_run(hf, idx), hh.twin_run(twin, idx)
        err, _, _, passed, first, _ = hh.compare_logits(reference, other)
        assert passed, f"seq {seq}: first divergence at {first}, logits max abs err {err:.3g}"
        assert err <= BOUND


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu"])
def test_other_gelu_spellings_match_transformers(activation, saved):
    hf, directory = saved(2, "sdpa", activation_function=activation)
    idx = hh.token_ids(2, hh.POSITIONS)
    err = hh.compare_logits(hh.hf_run(hf, idx), hh.twin_run(hh.import_into("torch", directory), idx))[0]
    assert err <= BOUND


def test_reference_reads_transformers_layout(saved):
    """The NumPy GPT-2 that verify trusts agrees with transformers itself (float64 vs float32)."""
    hf, directory = saved(3, "eager")
    arrays, _ = hg.read_hf_arrays(directory, hg.gpt2_config_from_dir(directory))
    idx = hh.token_ids(2, hh.POSITIONS)
    ref = gpt2_forward(arrays, idx, read_gpt2_config(directory))
    assert np.max(np.abs(ref["logits"] - hh.hf_run(hf, idx)["logits"])) <= BOUND


# ------------------------------------------------------------------------------------- generation


def greedy(model, prompt: list[int], n_new: int) -> tuple[list[int], float]:
    """Greedy decoding through the twin's full forward; also the smallest top-1 / top-2 logit gap
    seen, so a tie (where two correct implementations may pick differently) is detected."""
    tokens, gap = list(prompt), np.inf
    size = model.cfg.block_size
    for _ in range(n_new):
        # Padded on the right to block_size: causal attention keeps the padding out of position
        # len(tokens) - 1, and one input shape spares JAX's eager ops a compilation per length.
        padded = np.array([tokens + [0] * (size - len(tokens))])
        logits = hh.twin_run(model, padded)["logits"][0, len(tokens) - 1]
        top2 = np.sort(logits)[-2:]
        gap = min(gap, top2[1] - top2[0])
        tokens.append(int(np.argmax(logits)))
    return tokens, gap


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_greedy_tokens_match_transformers_generate(framework, saved):
    hf, directory = saved(2, "sdpa")
    prompt, n_new = [5, 17, 42, 8], hh.POSITIONS - 4
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, pad_token_id=0,
        )[0].tolist()  # fmt: skip
    tokens, gap = greedy(hh.import_into(framework, directory), prompt, n_new)
    assert gap > 10 * BOUND, f"top-2 logits {gap:.2g} apart: a legitimate tie, the token check proves nothing"
    assert tokens == expected


# ------------------------------------------------------------------------------------------ export


def perturbed_twin(framework: str, cfg: GPTConfig):
    """A twin with every parameter moved off its init (the harness's PERTURB_STD)."""
    model = hh.new_twin(framework, cfg)
    rng = np.random.default_rng(7)
    wc.import_(model, {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params(model).items()})
    return model


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_export_loads_in_transformers_with_same_logits(framework, tie, tmp_path):
    cfg = GPTConfig(vocab_size=96, block_size=16, n_layers=2, d_model=32, n_heads=4,
                    gelu_approximate="tanh", tie_embeddings=tie)  # fmt: skip
    twin = perturbed_twin(framework, cfg)
    out = tmp_path / "exported"
    hg.export_hf_gpt2(twin, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = hh.token_ids(2, 16)
    assert np.max(np.abs(hh.hf_run(hf, idx)["logits"] - hh.twin_run(twin, idx)["logits"])) <= BOUND
    again = hh.new_twin(framework, hg.gpt2_config_from_dir(out))
    hg.import_hf_gpt2(again, out, verify=True)
    assert_same(params(again), params(twin))  # out and back in: bit for bit


def test_export_into_a_folder_holding_a_model_is_refused_unless_overwrite(tmp_path):
    """A folder that already holds a model (here sharded, as save_pretrained writes a large one):
    refused and untouched; with overwrite=True the new model replaces it and no stale weight file
    (old shards, their index, another framework's weights) is left for a loader to pick up."""
    cfg = GPTConfig(vocab_size=96, block_size=16, n_layers=1, d_model=32, n_heads=4, gelu_approximate="tanh")
    first, second = perturbed_twin("torch", cfg), hh.new_twin("torch", cfg)
    hg.export_hf_gpt2(first, tmp_path)
    old = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin"]  # fmt: skip
    for name in stale:
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / "tokenizer.json").write_text("{}")
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with pytest.raises(ValueError, match="is not empty .*overwrite=True"):
        hg.export_hf_gpt2(second, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    hg.export_hf_gpt2(second, tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (tmp_path / "model.safetensors").read_bytes() != old["model.safetensors"]
    back = hh.new_twin("jax", cfg)
    hg.import_hf_gpt2(back, tmp_path)
    assert_same(params(back), params(second))


def test_bias_free_model_has_no_gpt2_layout(tmp_path):
    cfg = GPTConfig(vocab_size=96, block_size=16, n_layers=1, d_model=32, n_heads=4, bias=False)
    with pytest.raises(ValueError, match="bias"):
        hg.export_hf_gpt2(hh.new_twin("torch", cfg), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------- file variants, presets


def test_prefixless_file_with_mask_buffers_loads(saved, tmp_path):
    """Older files (the hub's "gpt2") have no "transformer." prefix and keep each layer's causal
    mask as "h.{i}.attn.bias" / "masked_bias"; they load, and so does a tied head saved as a copy."""
    hf, directory = saved(2, "eager")
    arrays, metadata = load_file(os.path.join(directory, "model.safetensors"))
    arrays = {k.removeprefix("transformer."): v for k, v in arrays.items()}
    for i in range(2):
        arrays[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        arrays[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    arrays["lm_head.weight"] = arrays["wte.weight"].copy()
    save_file(arrays, tmp_path / "model.safetensors", metadata)
    shutil.copyfile(os.path.join(directory, "config.json"), tmp_path / "config.json")
    twin = hh.import_into("torch", str(tmp_path), verify=True)
    reference = hh.import_into("jax", directory)
    assert_same(params(twin), params(reference))


def test_sharded_checkpoint_loads(saved, tmp_path):
    hf, directory = saved(2, "eager")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # several model-0000k-of-0000n files
    assert not (tmp_path / "model.safetensors").exists()
    assert_same(params(hh.import_into("torch", str(tmp_path), verify=True)), params(hh.import_into("torch", directory)))


def test_presets_are_gpt2_shapes():
    counts = {}
    for name in ("gpt2_124m", "gpt2_355m", "gpt2_774m", "gpt2_1558m"):
        cfg = getattr(GPTConfig, name)()
        assert (cfg.vocab_size, cfg.block_size, cfg.gelu_approximate, cfg.ln_eps, cfg.tie_embeddings) == (
            50257, 1024, "tanh", 1e-5, True)  # fmt: skip
        counts[name] = sum(int(np.prod(s.torch_shape)) for s in wc.table_for(cfg))
        assert hg.gpt2_config_from_hf(hg.hf_config_from_gpt(cfg)) == cfg  # config.json out and back in
    # The published parameter counts (transformers' GPT2LMHeadModel, head tied).
    assert counts == {"gpt2_124m": 124_439_808, "gpt2_355m": 354_823_168,
                      "gpt2_774m": 774_030_080, "gpt2_1558m": 1_557_611_200}  # fmt: skip
    assert GPTConfig.nanogpt_124m_padded().vocab_size == 50304


# --------------------------------------------------------------------------------------- refusals


def test_config_refusals_name_every_field():
    bad = dict(
        n_embd=32, n_head=4, n_layer=1, vocab_size=96, n_positions=16,
        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, add_cross_attention=True,
        scale_attn_weights=False, activation_function="relu", n_inner=50, embd_pdrop=0.0,
    )  # fmt: skip
    with pytest.raises(ValueError) as info:
        hg.gpt2_config_from_hf(bad)
    message = str(info.value)
    for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
                  "scale_attn_weights", "activation_function", "n_inner", "embd_pdrop"):  # fmt: skip
        assert field in message
    with pytest.raises(ValueError, match="model_type"):
        hg.gpt2_config_from_hf({"model_type": "llama"})


def test_config_mapping():
    cfg = hg.gpt2_config_from_hf({"n_embd": 64, "n_head": 2, "n_layer": 3, "vocab_size": 100, "n_positions": 32,
                                  "layer_norm_epsilon": 1e-6, "n_inner": 128, "activation_function": "gelu",
                                  "tie_word_embeddings": False})  # fmt: skip
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.vocab_size, cfg.block_size) == (64, 2, 3, 100, 32)
    assert (cfg.ln_eps, cfg.mlp_ratio, cfg.gelu_approximate, cfg.tie_embeddings) == (1e-6, 2, "none", False)
    defaults = dataclasses.replace(GPTConfig.gpt2_124m(), attn_dropout=0.1, resid_dropout=0.1)
    assert hg.gpt2_config_from_hf({}) == defaults  # GPT2Config's defaults are GPT-2 small


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_bad_file_reports_every_problem_and_leaves_model_untouched(framework, saved, tmp_path):
    _, directory = saved(2, "eager")
    arrays, metadata = load_file(os.path.join(directory, "model.safetensors"))
    del arrays["transformer.h.0.ln_1.bias"]  # missing
    arrays["transformer.h.0.attn.c_attn.weight"] = arrays["transformer.h.0.attn.c_attn.weight"][:, :64]  # shape
    arrays["transformer.h.1.attn.q_proj.weight"] = np.zeros((32, 32), np.float32)  # unexpected
    arrays["transformer.ln_f.weight"] = arrays["transformer.ln_f.weight"].astype(np.float64)  # dtype
    arrays["transformer.wpe.weight"] = np.full_like(arrays["transformer.wpe.weight"], np.nan)  # non-finite
    save_file(arrays, tmp_path / "model.safetensors", metadata)
    shutil.copyfile(os.path.join(directory, "config.json"), tmp_path / "config.json")
    twin = hh.new_twin(framework, hg.gpt2_config_from_dir(directory))
    before = params(twin)
    with pytest.raises(wc.ConversionError) as info:
        hg.import_hf_gpt2(twin, tmp_path)
    problems = info.value.problems
    assert len(problems) == 5, problems
    for key in ("h.0.ln_1.bias", "h.0.attn.c_attn.weight", "h.1.attn.q_proj.weight", "ln_f.weight", "wpe.weight"):
        assert any(key in p for p in problems), key
    assert_same(params(twin), before)


def test_tied_head_that_differs_from_wte_is_refused(saved, tmp_path):
    _, directory = saved(2, "eager")
    arrays, metadata = load_file(os.path.join(directory, "model.safetensors"))
    arrays["lm_head.weight"] = arrays["transformer.wte.weight"] + 1.0
    save_file(arrays, tmp_path / "model.safetensors", metadata)
    shutil.copyfile(os.path.join(directory, "config.json"), tmp_path / "config.json")
    with pytest.raises(wc.ConversionError, match="lm_head.weight"):
        hh.import_into("torch", str(tmp_path))


def test_config_mismatch_with_model_is_refused(saved):
    _, directory = saved(2, "eager")
    twin = hh.new_twin("torch", dataclasses.replace(hg.gpt2_config_from_dir(directory), gelu_approximate="none"))
    with pytest.raises(wc.ConversionError, match="gelu_approximate"):
        hg.import_hf_gpt2(twin, directory)


# ------------------------------------------------------------------------------ verify's catches


def _sabotaged_table(monkeypatch, change):
    """Make the GPT-2 table make one mistake that no name, shape or dtype check can see."""
    original = ht.hf_gpt2_table

    def table(cfg):
        return tuple(change(spec) for spec in original(cfg))

    monkeypatch.setattr(hg, "hf_gpt2_table", table)


def _swap_k_v(spec):
    if spec.hf_key.endswith("attn.c_attn.weight"):
        q, k, v = spec.twin_keys
        return dataclasses.replace(spec, twin_keys=(q, v, k))
    return spec


def _untransposed_c_proj(spec):
    if spec.hf_key.endswith("attn.c_proj.weight"):
        return dataclasses.replace(spec, transform=ht.HFTransform.SAME)  # (C, C): the shape still fits
    return spec


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("mistake", [_swap_k_v, _untransposed_c_proj], ids=["k_v_swap", "untransposed_c_proj"])
def test_verify_catches_layout_mistakes(mistake, framework, saved, monkeypatch):
    hf, directory = saved(2, "eager")
    _sabotaged_table(monkeypatch, mistake)
    idx = hh.token_ids(2, hh.POSITIONS)
    silent = hh.import_into(framework, directory)  # loads without a single error...
    err = np.max(np.abs(hh.hf_run(hf, idx)["logits"] - hh.twin_run(silent, idx)["logits"]))
    assert err > 100 * BOUND  # ...and computes another function
    twin = hh.new_twin(framework, hg.gpt2_config_from_dir(directory))
    before = params(twin)
    with pytest.raises(VerificationError) as info:
        hg.import_hf_gpt2(twin, directory, verify=True)
    assert info.value.sublayer == "blocks.0.attn"  # the first sublayer the mistake touches
    assert_same(params(twin), before)  # old weights restored


def _epsilon_dropped(monkeypatch):  # the mapping forgets layer_norm_epsilon: the twins' 1e-5
    monkeypatch.delitem(hg.MAPPED, "layer_norm_epsilon")


def _gelu_new_read_as_exact(monkeypatch):
    monkeypatch.setitem(hg.ACTIVATIONS, "gelu_new", "none")


def _exact_gelu_read_as_tanh(monkeypatch):
    monkeypatch.setitem(hg.ACTIVATIONS, "gelu", "tanh")


CONFIG_MAPPING_BUGS = {  # bug: (config overrides, the first sublayer verify names)
    "epsilon dropped": (_epsilon_dropped, hh.OTHER_CONFIG, "blocks.0.ln_1"),
    "gelu_new read as exact": (_gelu_new_read_as_exact, {}, "blocks.0.mlp"),
    "exact gelu read as tanh": (_exact_gelu_read_as_tanh, hh.OTHER_CONFIG, "blocks.0.mlp"),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("bug", list(CONFIG_MAPPING_BUGS))
def test_a_config_mapping_bug_fails_verify_and_the_float64_row(bug, framework, monkeypatch, tmp_path):
    """verify's reference reads config.json itself, so a mapping bug cannot move it; float64, since
    a GELU kind moves this width-32 model's float32 logits by only 7.9e-6 (under 1e-5)."""
    plant, overrides, sublayer = CONFIG_MAPPING_BUGS[bug]
    hh.new_hf_model(hh.hf_config(1, "eager", **overrides)).double().save_pretrained(tmp_path)
    plant(monkeypatch)
    with matched_precision(x64=True):
        twin = hh.new_twin(framework, hg.gpt2_config_from_dir(tmp_path), "float64")
        before = params(twin)
        with pytest.raises(VerificationError) as info:
            hg.import_hf_gpt2(twin, tmp_path, verify=True)
    assert info.value.sublayer == sublayer, str(info.value)
    assert_same(params(twin), before)  # old weights restored
    r = hh.hf_gpt2_check(framework, 1, hh.POSITIONS, "eager", dtype="float64", **overrides)
    assert not r.passed and r.first_divergence == "blocks.0", r.divergence_detail


def test_verify_catches_a_twin_table_mistake(monkeypatch):
    """Twin <-> twin: a k/v swap in the twin table loads silently; verify names the sublayer."""
    import weight_conversion.flax_side as fs
    from twin_common.params import table_for

    cfg = GPTConfig(vocab_size=96, block_size=16, n_layers=2, d_model=32, n_heads=4)
    source, target = perturbed_twin("torch", cfg), hh.new_twin("jax", cfg)
    wc.torch_to_flax(source, target, verify=True)  # the real table passes
    swap = {"k_proj": "v_proj", "v_proj": "k_proj"}
    monkeypatch.setattr(fs, "table_for", lambda c: tuple(
        dataclasses.replace(s, flax_path=tuple(swap.get(p, p) for p in s.flax_path)) for s in table_for(c)))
    before = params(target)
    with pytest.raises(VerificationError) as info:
        wc.torch_to_flax(perturbed_twin("torch", cfg), target, verify=True)
    assert info.value.sublayer == "blocks.0.attn"
    assert_same(params(target), before)


def test_verify_refuses_bfloat16_before_changing_anything():
    from weight_conversion.verify import apply_verified

    cfg = GPTConfig(vocab_size=96, block_size=16, n_layers=1, d_model=32, n_heads=4)
    target = hh.new_twin("torch", cfg).bfloat16()
    with pytest.raises(ValueError, match="float32 and float64"):
        apply_verified(target, lambda: pytest.fail("applied"), lambda probe: pytest.fail("ran"), "bf16")


def test_block_conversion_verifies_in_both_directions():
    """A block (not a GPT), in float64: verify runs JAX in x64 mode with a float64 probe.
    (float32 twin <-> twin verify is covered by the GPT test above.)"""
    from twin_parity import harness

    dtype = "float64"
    with matched_precision(x64=True):
        cfg = harness.BlockConfig(d_model=32, n_heads=2, block_size=8)
        torch_block = harness.new_torch_block(cfg, dtype, "cpu", 0)
        flax_block = harness.new_flax_block(cfg, dtype, harness.jax_devices()["cpu"], 1)
        wc.torch_to_flax(torch_block, flax_block, verify=True)
        wc.flax_to_torch(flax_block, harness.new_torch_block(cfg, dtype, "cpu", 2), verify=True)


def test_gpt2_table_is_checked_against_the_twin_table(monkeypatch):
    """Rows that drift from the twin table (here: the MLP's c_proj row lost) fail at construction."""
    rows = ht.hf_gpt2_block_rows
    monkeypatch.setattr(ht, "hf_gpt2_block_rows", lambda C, H: rows(C, H)[:-2])
    with pytest.raises(AssertionError, match="out of date"):
        ht.hf_gpt2_table(GPTConfig(vocab_size=96, block_size=16, n_layers=1, d_model=32, n_heads=4))


def test_verify_bound_scales_with_the_values():
    from twin_common.tolerances import verify_bound

    small, large = np.full(3, 0.5), np.full(3, 1000.0)
    assert verify_bound("float32", small) == BOUND  # the table's atol for O(1) values
    one_ulp_at_1000 = float(np.spacing(np.float32(1000.0)))  # 6.1e-5: rounding, not a mistake
    assert one_ulp_at_1000 > BOUND and one_ulp_at_1000 <= verify_bound("float32", large) < 0.34


def test_abstract_flax_model_is_filled_and_verified(saved):
    """nnx.eval_shape builds the Flax twin without allocating weights; the import fills it."""
    from flax import nnx

    from jax_impl.gpt import GPT

    hf, directory = saved(2, "eager")
    model = nnx.eval_shape(lambda: GPT(hg.gpt2_config_from_dir(directory), rngs=nnx.Rngs(0)))
    hg.import_hf_gpt2(model, directory, verify=True)
    model.eval()
    idx = hh.token_ids(2, hh.POSITIONS)
    assert np.max(np.abs(hh.hf_run(hf, idx)["logits"] - hh.twin_run(model, idx)["logits"])) <= BOUND
