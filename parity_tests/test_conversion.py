"""The weight converter: table coverage, bit-exact round trips, layout, validation, safetensors
interop with the official library, corrupt files, atomic writes and config checks.

Everything runs on CPU with a small block (d_model 32) so the whole file takes a few seconds.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import dataclasses
import json
import os
import stat
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.torch
import torch
from flax import nnx

import weight_conversion as wc
import weight_conversion.safetensors_io as st_io
from twin_parity import harness
from twin_common import BlockConfig
from twin_common.precision import MATMUL_PRECISION, matched_precision
from twin_common.params import Transform
from weight_conversion.torch_side import tensor_to_numpy

CFG = BlockConfig(d_model=32, n_heads=2, block_size=8)  # C = 32, H = 128
CPU = harness.jax_devices()["cpu"]
DTYPES = ("float32", "float64", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------ helpers


def torch_block(cfg: BlockConfig = CFG, dtype: str = "float32", seed: int = 0):
    return harness.new_torch_block(cfg, dtype, "cpu", seed)


def flax_block(cfg: BlockConfig = CFG, dtype: str = "float32", seed: int = 0):
    # The harness builds under matched_precision; the same matmul setting here shares its jit cache.
    with jax.default_matmul_precision(MATMUL_PRECISION):
        return harness.new_flax_block(cfg, dtype, CPU, seed)


def make_block(framework: str, cfg: BlockConfig = CFG, dtype: str = "float32", seed: int = 0):
    return torch_block(cfg, dtype, seed) if framework == "torch" else flax_block(cfg, dtype, seed)


def bits(array) -> np.ndarray:
    """The raw bits of a float array, so -0.0 vs 0.0 and NaN payloads count as differences."""
    array = np.ascontiguousarray(np.asarray(array))
    return array.view(f"u{array.dtype.itemsize}").copy()


def raw_params(model) -> dict:
    """Every parameter of either twin in its own layout, as a bit pattern plus dtype name."""
    if isinstance(model, torch.nn.Module):
        items = ((k, tensor_to_numpy(v)) for k, v in model.state_dict().items())
    else:
        items = (
            (path, np.asarray(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
        )
    return {k: (a.dtype.name, a.shape, bits(a)) for k, a in items}


def assert_same_params(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key][:2] == after[key][:2], key
        assert np.array_equal(before[key][2], after[key][2]), f"{key} changed"


def assert_same_arrays(a: dict, b: dict) -> None:
    """Two {torch key: array} dicts with the same keys, dtypes, shapes and bits."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert np.array_equal(bits(a[key]), bits(b[key])), key


def assert_arrays_differ(a: dict, b: dict) -> None:
    """Guard: the target starts with other weights, so a no-op import cannot pass."""
    assert all(not np.array_equal(bits(a[k]), bits(b[k])) for k in a if a[k].ndim == 2)


# -------------------------------------------------------------------------------- 1. table coverage


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_table_covers_exactly_both_twins_parameters(bias):
    """Table keys/paths/shapes equal torch state_dict and Flax nnx.Param state, with and without bias."""
    cfg = dataclasses.replace(CFG, bias=bias)
    table = wc.table_for(cfg)
    state = torch_block(cfg).state_dict()
    params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(flax_block(cfg), nnx.Param))}

    torch_keys = [s.torch_key for s in table]
    flax_paths = [s.flax_path for s in table]
    assert len(set(torch_keys)) == len(torch_keys) and len(set(flax_paths)) == len(flax_paths)
    assert set(torch_keys) == set(state)
    assert set(flax_paths) == set(params)
    assert len(table) == (16 if bias else 8)  # 6 Linear + 2 LayerNorm weights, and a bias each
    for spec in table:
        assert tuple(state[spec.torch_key].shape) == spec.torch_shape, spec.torch_key
        assert tuple(params[spec.flax_path].get_value().shape) == spec.flax_shape, spec.flax_path
        # Every 2-D weight is a Linear (torch (out, in) vs Flax (in, out)); 1-D ones are not moved.
        expected = Transform.TRANSPOSE if len(spec.torch_shape) == 2 else Transform.IDENTITY
        assert spec.transform is expected, spec.torch_key
    assert any(k.endswith(".bias") for k in torch_keys) == bias


def test_table_pairs_same_named_modules():
    """Each row pairs the same submodule in both twins (weight->kernel/scale, bias->bias): no swaps."""
    tm, fm = torch_block(), flax_block()
    for spec in wc.table_for(CFG):
        module, leaf = spec.torch_key.rsplit(".", 1)
        assert spec.flax_path[:-1] == tuple(module.split(".")), spec
        torch_module, flax_module = tm.get_submodule(module), fm
        for part in spec.flax_path[:-1]:
            flax_module = getattr(flax_module, part)
        if leaf == "bias":
            assert spec.flax_path[-1] == "bias", spec
        elif isinstance(torch_module, torch.nn.Linear):
            assert isinstance(flax_module, nnx.Linear) and spec.flax_path[-1] == "kernel", spec
        else:
            assert isinstance(torch_module, torch.nn.LayerNorm), spec
            assert isinstance(flax_module, nnx.LayerNorm) and spec.flax_path[-1] == "scale", spec


# ----------------------------------------------------------------------------- 2. bit-exact trips


@pytest.mark.parametrize("via_file", [False, True], ids=["memory", "file"])
@pytest.mark.parametrize("start", ["torch", "jax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_is_bit_exact(dtype, start, via_file):
    """start twin -> other twin -> start twin returns every parameter bit for bit."""
    result = harness.roundtrip_check(CFG, dtype, start, via_file)
    assert result.passed, result.first_divergence
    assert result.max_abs_err == 0
    assert result.dtype == dtype and result.direction.startswith(start)


def test_bfloat16_torch_flax_torch_hop_preserves_bits():
    """export() of a bf16 torch block equals, as uint16 bits, that of a fresh block after a Flax hop."""
    source, target = torch_block(dtype="bfloat16", seed=0), torch_block(dtype="bfloat16", seed=7)
    middle = flax_block(dtype="bfloat16", seed=3)
    before = wc.export(source)
    assert all(a.dtype == ml_dtypes.bfloat16 for a in before.values())
    assert_arrays_differ(before, wc.export(target))

    wc.torch_to_flax(source, middle)
    wc.flax_to_torch(middle, target)
    after = wc.export(target)

    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == ml_dtypes.bfloat16, key
        assert np.array_equal(before[key].view(np.uint16), after[key].view(np.uint16)), key
    assert_same_params(raw_params(source), raw_params(target))  # and the torch tensors themselves


# ---------------------------------------------------------------------------- 3. transposition


@pytest.mark.parametrize("layer", ["attn.q_proj", "mlp.fc_in"])
def test_linear_weight_is_transposed_into_flax_kernel(layer):
    """The Flax kernel after torch_to_flax is exactly W.T of the torch weight (square and not)."""
    tm, fm = torch_block(seed=0), flax_block(seed=1)
    w = tensor_to_numpy(tm.get_submodule(layer).weight)
    if w.shape[0] == w.shape[1]:
        assert not np.array_equal(w, w.T)  # so W and W.T are told apart
    wc.torch_to_flax(tm, fm)
    node = fm
    for part in layer.split("."):
        node = getattr(node, part)
    kernel = np.asarray(node.kernel.get_value())
    assert kernel.shape == w.shape[::-1]
    assert np.array_equal(bits(kernel), bits(w.T))
    bias = tensor_to_numpy(tm.get_submodule(layer).bias)
    assert np.array_equal(bits(np.asarray(node.bias.get_value())), bits(bias))


@pytest.mark.parametrize("layer", ["attn.q_proj", "mlp.fc_in"])
def test_linear_gives_same_output_in_both_twins(layer):
    """torch Linear, Flax Linear and x @ W.T + b agree in float64 after conversion."""
    with matched_precision(x64=True):
        tm, fm = torch_block(dtype="float64", seed=0), flax_block(dtype="float64", seed=1)
        wc.torch_to_flax(tm, fm)
        x = harness.make_input((3, 5, CFG.d_model), "float64", seed=4)
        torch_layer = tm.get_submodule(layer)
        flax_layer = fm
        for part in layer.split("."):
            flax_layer = getattr(flax_layer, part)
        w, b = tensor_to_numpy(torch_layer.weight), tensor_to_numpy(torch_layer.bias)
        expected = x @ w.T + b
        with torch.no_grad():
            got_torch = torch_layer(torch.from_numpy(x)).numpy()
        got_flax = np.asarray(flax_layer(jnp.asarray(x)))
    assert got_flax.dtype == np.float64 and got_torch.dtype == np.float64
    assert got_flax.shape == expected.shape == got_torch.shape
    assert np.max(np.abs(got_torch - expected)) < 1e-12
    assert np.max(np.abs(got_flax - expected)) < 1e-12
    assert np.max(np.abs(got_flax - got_torch)) < 1e-12
    # The untransposed weight would give a clearly different result (so the check has teeth).
    if w.shape[0] == w.shape[1]:
        assert np.max(np.abs(x @ w + b - expected)) > 1e-3


# ----------------------------------------------------------------------------------- 4. validation


def corrupted_arrays() -> tuple[dict, list[str]]:
    """export() of a torch block with seven problems at once, and the keys each one names."""
    arrays = wc.export(torch_block(seed=0))
    C = CFG.d_model
    del arrays["ln_1.bias"]  # missing
    arrays["attn.extra.weight"] = np.zeros((C, C), np.float32)  # unexpected
    arrays["attn.k_proj.weight"] = np.zeros((C, C + 1), np.float32)  # wrong shape
    arrays["attn.v_proj.weight"] = arrays["attn.v_proj.weight"].astype(np.float64)  # wrong float dtype
    arrays["ln_2.weight"] = np.ones(C, np.int32)  # int dtype
    arrays["mlp.fc_in.weight"] = arrays["mlp.fc_in.weight"].copy()
    arrays["mlp.fc_in.weight"][3, 5] = np.nan
    arrays["mlp.fc_out.bias"] = arrays["mlp.fc_out.bias"].copy()
    arrays["mlp.fc_out.bias"][1] = np.inf
    keys = [
        "ln_1.bias", "attn.extra.weight", "attn.k_proj.weight", "attn.v_proj.weight",
        "ln_2.weight", "mlp.fc_in.weight", "mlp.fc_out.bias",
    ]  # fmt: skip
    return arrays, keys


@pytest.mark.parametrize("target", ["torch", "flax"])
def test_every_problem_is_reported_and_target_untouched(target):
    """Missing/unexpected key, wrong shape, wrong/int dtype, NaN, Inf: all named, nothing applied."""
    arrays, keys = corrupted_arrays()
    model = make_block(target, seed=11)  # other weights than the source: a partial apply would show
    before = raw_params(model)
    with pytest.raises(wc.ConversionError) as info:
        wc.import_(model, arrays)
    err = info.value
    message = str(err)
    for key in keys:
        assert repr(key) in message, key
        assert any(repr(key) in p for p in err.problems), key
    assert len(err.problems) == len(keys)
    kinds = {
        "ln_1.bias": "missing", "attn.extra.weight": "unexpected", "attn.k_proj.weight": "shape",
        "attn.v_proj.weight": "float64", "ln_2.weight": "int32", "mlp.fc_in.weight": "non-finite",
        "mlp.fc_out.bias": "non-finite",
    }  # fmt: skip
    for key, kind in kinds.items():
        assert any(repr(key) in p and kind in p for p in err.problems), (key, kind)
    assert_same_params(before, raw_params(model))


@pytest.mark.parametrize("target", ["torch", "flax"])
def test_transposed_nonsquare_weight_is_caught(target):
    """A (H, C) array where torch layout wants (C, H) for mlp.fc_out.weight is a wrong-shape error."""
    arrays = wc.export(torch_block(seed=0))
    arrays["mlp.fc_out.weight"] = np.ascontiguousarray(arrays["mlp.fc_out.weight"].T)
    assert arrays["mlp.fc_out.weight"].shape == (CFG.d_hidden, CFG.d_model)
    model = make_block(target, seed=11)
    before = raw_params(model)
    with pytest.raises(wc.ConversionError) as info:
        wc.import_(model, arrays)
    assert len(info.value.problems) == 1
    (problem,) = info.value.problems
    assert "'mlp.fc_out.weight'" in problem and "wrong shape" in problem
    assert str((CFG.d_model, CFG.d_hidden)) in problem
    assert_same_params(before, raw_params(model))


def test_valid_arrays_import_into_both_twins():
    """Control for the validation tests: the uncorrupted export imports and changes the target."""
    source = torch_block(seed=0)
    arrays = wc.export(source)
    for target in (torch_block(seed=11), flax_block(seed=11)):
        before = wc.export(target)
        assert_arrays_differ(arrays, before)
        wc.import_(target, arrays)
        assert_same_arrays(arrays, wc.export(target))


# ------------------------------------------------------------------------ 5. safetensors interop


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_our_file_loads_in_safetensors_torch(dtype, tmp_path):
    """wc.save writes a file safetensors.torch.load_file reads back as the same tensors and metadata."""
    model = torch_block(dtype=dtype)
    path = tmp_path / "block.safetensors"
    wc.save(model, path)
    loaded = safetensors.torch.load_file(path)
    state = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype == getattr(torch, dtype), key
        assert loaded[key].shape == tensor.shape, key
        assert torch.equal(loaded[key], tensor), key
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert json.loads(metadata["config"]) == CFG.to_dict()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_torch_file_loads_into_flax(dtype, tmp_path):
    """A file from safetensors.torch.save_file (no config metadata) loads into the Flax twin exactly."""
    model = torch_block(dtype=dtype, seed=0)
    path = tmp_path / "official.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    fm = flax_block(dtype=dtype, seed=5)
    expected = wc.export(model)
    assert_arrays_differ(expected, wc.export(fm))
    metadata = wc.load(fm, path)
    assert "config" not in metadata
    assert_same_arrays(expected, wc.export(fm))
    kernel = np.asarray(fm.attn.q_proj.kernel.get_value())
    assert np.array_equal(bits(kernel), bits(expected["attn.q_proj.weight"].T))


def test_our_file_loads_in_safetensors_flax(tmp_path):
    """safetensors.flax.load_file on a wc.save file gives the torch-layout arrays unchanged."""
    model = flax_block(seed=2)
    path = tmp_path / "block.safetensors"
    wc.save(model, path)
    loaded = safetensors.flax.load_file(path)
    expected = wc.export(model)
    assert loaded.keys() == expected.keys()
    for key, array in expected.items():
        assert isinstance(loaded[key], jax.Array)
        got = np.asarray(loaded[key])
        assert got.dtype == np.float32 and got.shape == array.shape, key
        assert np.array_equal(bits(got), bits(array)), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_file_bytes_match_reference_writer(dtype, tmp_path):
    """wc.save_file writes the same bytes as safetensors.torch.save_file given the same metadata
    (here only the content hash wc.save_file adds)."""
    model = torch_block(dtype=dtype)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    wc.save_file(wc.export(model), ours)
    with safetensors.safe_open(ours, "np") as f:
        metadata = f.metadata()
    assert list(metadata) == [st_io.HASH_KEY]
    safetensors.torch.save_file(model.state_dict(), theirs, metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()


# ---------------------------------------------------------------------- 6. corrupt / bad files


def _good_bytes(tmp_path) -> bytes:
    path = tmp_path / "good.safetensors"
    wc.save(torch_block(seed=0), path)
    data = path.read_bytes()
    path.unlink()
    return data


def _write(tmp_path, data: bytes):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    return path


BAD_FILES = {
    # name: (make path from (tmp_path, good bytes), words the message must contain)
    "empty": (lambda d, g: _write(d, b""), "0 bytes is too short"),
    "four_bytes": (lambda d, g: _write(d, g[:4]), "4 bytes is too short"),
    "truncated_10": (lambda d, g: _write(d, g[:-10]), "truncated"),
    "header_past_end": (
        lambda d, g: _write(d, struct.pack("<Q", len(g)) + g[8:]),
        "runs past the end",
    ),
    "non_json_header": (
        lambda d, g: _write(d, struct.pack("<Q", 16) + b"{not json,,,!!!}" + g[8:]),
        "not JSON",
    ),
    "missing": (lambda d, g: d / "does_not_exist.safetensors", "no such checkpoint file"),
    "directory": (lambda d, g: (d / "a_dir.safetensors").mkdir() or d / "a_dir.safetensors", "directory"),
}


@pytest.mark.parametrize("target", ["torch", "flax"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_checkpoint_error_and_model_untouched(case, target, tmp_path):
    """Each corrupt, truncated, missing or directory path is a CheckpointError naming path and reason."""
    make_path, reason = BAD_FILES[case]
    path = make_path(tmp_path, _good_bytes(tmp_path))
    model = make_block(target, seed=11)
    before = raw_params(model)
    with pytest.raises(wc.CheckpointError) as info:
        wc.load(model, path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    assert reason in str(info.value)
    assert_same_params(before, raw_params(model))


@pytest.mark.parametrize(
    "metadata", ["config", ["config"], {"config": 5}], ids=["string", "list", "int_value"]
)
def test_malformed_metadata_is_a_checkpoint_error(metadata, tmp_path):
    """A header whose __metadata__ is not a str -> str object is a CheckpointError, not a TypeError."""
    raw = json.dumps({"__metadata__": metadata}).encode()
    path = _write(tmp_path, struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(wc.CheckpointError):
        wc.load(torch_block(), path)


def test_good_file_loads_as_control(tmp_path):
    """Control for the corrupt-file tests: the unmodified bytes load into both twins."""
    path = _write(tmp_path, _good_bytes(tmp_path))
    expected = wc.export(torch_block(seed=0))
    for model in (torch_block(seed=11), flax_block(seed=11)):
        wc.load(model, path)
        assert_same_arrays(expected, wc.export(model))


# ------------------------------------------------------------------------------ 7. atomic writes


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_old_file_and_leaves_no_temporaries(failing, monkeypatch, tmp_path):
    """If fsync (or the final rename) raises, the old file keeps its bytes and no temp file is left."""
    path = tmp_path / "block.safetensors"
    wc.save(torch_block(seed=0), path)
    old = path.read_bytes()
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(st_io.os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        wc.save(torch_block(seed=1), path)
    assert calls, f"os.{failing} was never reached"
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == [path.name]

    monkeypatch.undo()  # control: the same write succeeds without the fault and changes the file
    wc.save(torch_block(seed=1), path)
    assert path.read_bytes() != old
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_saved_file_gets_normal_permissions(tmp_path):
    """A checkpoint is written with the umask's default mode (0644 under umask 022), not 0600."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "block.safetensors"
        wc.save(torch_block(seed=0), path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------- 8. config checks


@pytest.mark.parametrize("target", ["torch", "flax"])
@pytest.mark.parametrize(
    "field, value", [("ln_eps", 1e-6), ("gelu_approximate", "tanh")], ids=["ln_eps", "gelu"]
)
def test_config_mismatch_is_refused(field, value, target, tmp_path):
    """A file saved with one ln_eps/gelu_approximate refuses a model with another, naming the field."""
    path = tmp_path / "block.safetensors"
    wc.save(torch_block(CFG, seed=0) if target == "flax" else flax_block(CFG, seed=0), path)
    model = make_block(target, dataclasses.replace(CFG, **{field: value}), seed=11)
    before = raw_params(model)
    with pytest.raises(wc.ConversionError) as info:
        wc.load(model, path)
    assert len(info.value.problems) == 1  # only that field: nothing else differs
    assert repr(field) in info.value.problems[0]
    assert repr(field) in str(info.value)
    assert_same_params(before, raw_params(model))


@pytest.mark.parametrize("target", ["torch", "flax"])
@pytest.mark.parametrize(
    "change",
    [{"attn_impl": "math"}, {"attn_dropout": 0.1}, {"resid_dropout": 0.1}],
    ids=["attn_impl", "attn_dropout", "resid_dropout"],
)
def test_runtime_field_difference_loads(change, target, tmp_path):
    """A config differing only in attn_impl or dropout loads, and the weights arrive exactly."""
    path = tmp_path / "block.safetensors"
    source = torch_block(CFG, seed=0) if target == "flax" else flax_block(CFG, seed=0)
    wc.save(source, path)
    model = make_block(target, dataclasses.replace(CFG, **change), seed=11)
    metadata = wc.load(model, path)
    assert json.loads(metadata["config"]) == CFG.to_dict()
    assert_same_arrays(wc.export(source), wc.export(model))


def test_float64_into_flax_outside_x64_mode_is_refused():
    """A float64 Flax model used outside x64 mode would get its weights truncated to float32."""
    with matched_precision(x64=True):
        fm = flax_block(dtype="float64", seed=1)
        before = raw_params(fm)
    source = wc.export(torch_block(dtype="float64", seed=0))
    with pytest.raises(wc.ConversionError, match="x64"):
        wc.import_(fm, source)
    assert_same_params(before, raw_params(fm))


def test_converted_flax_model_does_not_alias_the_source_arrays():
    """JAX's device_put on the CPU aliases a 64-byte-aligned C-contiguous NumPy array instead of
    copying it; torch_to_flax hands JAX views of torch's parameters (64-byte aligned), so without a
    copy, training the torch model would change the Flax one (biases, LayerNorm scales)."""
    tb, fb = torch_block(seed=0), flax_block(seed=5)
    wc.torch_to_flax(tb, fb)
    before = {k: v.copy() for k, v in wc.export(fb).items()}  # export itself may be a view
    with torch.no_grad():
        for p in tb.parameters():
            p.add_(1.0)
    assert_same_arrays(before, wc.export(fb))
    arrays = wc.export(torch_block(seed=1), copy=False)  # the caller's (aligned) arrays
    wc.import_(fb, arrays)
    before = {k: v.copy() for k, v in wc.export(fb).items()}
    for a in arrays.values():
        a += 1.0
    assert_same_arrays(before, wc.export(fb))
