"""The safetensors reader and writer on bad input: malformed headers (checked against the safetensors
library on the same bytes), paths that are not files, huge files, changed bytes (content hash), and
training checkpoints whose metadata or optimizer state does not add up."""

from __future__ import annotations

import json
import os
import resource
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import weight_conversion.safetensors_io as st_io
from twin_common import GPTConfig
from weight_conversion.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from weight_conversion.optim_state import optim_keys
from twin_common.params import table_for
from twin_parity.testing import deadline
from weight_conversion.validate import ConversionError, count_nonfinite

TINY = GPTConfig(vocab_size=16, block_size=8, n_layers=1, d_model=8, n_heads=2)


def _file(tmp_path, header: str | bytes, body: bytes = b"\0" * 16, name="bad.safetensors"):
    raw = header.encode() if isinstance(header, str) else header
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def _library_accepts(path) -> bool:
    try:
        with safetensors.safe_open(path, "numpy") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # noqa: BLE001 - any refusal by the library counts
        return False
    return True


T = '"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}'
MALFORMED = {
    # name: header text (the body is 16 zero bytes)
    "utf8_bom": b"\xef\xbb\xbf{" + T.encode() + b"}",
    "float_offset": '{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16.0]}}',
    "exponent_offset": '{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,1.6e1]}}',
    "string_dimension": '{"t":{"dtype":"F32","shape":["2",2],"data_offsets":[0,16]}}',
    "bool_dimension": '{"t":{"dtype":"F32","shape":[true,2],"data_offsets":[0,16]}}',
    "negative_dimension": '{"t":{"dtype":"F32","shape":[-2,-2],"data_offsets":[0,16]}}',
    "dimension_2_64": '{"t":{"dtype":"F32","shape":[18446744073709551616,2],"data_offsets":[0,16]}}',
    "infinity_dimension": '{"t":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,16]}}',
    "count_wraps_to_zero": '{"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}',
    "offset_2_64": '{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,18446744073709551616]}}',
    "metadata_list": '{"__metadata__":[],' + T + "}",
    "metadata_zero": '{"__metadata__":0,' + T + "}",
    "metadata_int_value": '{"__metadata__":{"a":1},' + T + "}",
    "deeply_nested": "[" * 100_000 + "]" * 100_000,
    "trailing_nul": "{" + T + "}\0",
    "three_offsets": '{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16,16]}}',
    "reversed_offsets": '{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[16,0]}}',
    "entry_not_object": '{"t":5}',
    "missing_shape": '{"t":{"dtype":"F32","data_offsets":[0,16]}}',
    "lowercase_dtype": '{"t":{"dtype":"f32","shape":[2,2],"data_offsets":[0,16]}}',
    "gap_before_data": '{"t":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
    # refused here although safetensors 0.8 reads them: ambiguous or against the format's text
    "duplicated_key": "{" + T + "," + T.replace("[2,2]", "[4]") + "}",
    "duplicated_metadata_key": '{"__metadata__":{"a":"b","a":"c"},' + T + "}",
    "metadata_null": '{"__metadata__":null,' + T + "}",
}
LIBRARY_LENIENT = {"duplicated_key", "duplicated_metadata_key", "metadata_null"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_is_a_checkpoint_error_like_the_librarys_refusal(case, tmp_path):
    path = _file(tmp_path, MALFORMED[case])
    assert _library_accepts(path) == (case in LIBRARY_LENIENT), "the library's verdict changed"
    with deadline(20), pytest.raises(st_io.CheckpointError) as info:
        st_io.load_file(path)
    assert str(path) in str(info.value)


def test_control_the_well_formed_header_loads_in_both(tmp_path):
    path = _file(tmp_path, "{" + T + "}")
    assert _library_accepts(path)
    arrays, metadata = st_io.load_file(path)
    assert arrays["t"].shape == (2, 2) and metadata == {}


def test_bad_entry_names_the_tensor(tmp_path):
    path = _file(tmp_path, '{"weights.0":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}}')
    with pytest.raises(st_io.CheckpointError, match=r"tensor 'weights.0'.*needs 24 bytes"):
        st_io.load_file(path)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero_symlink", "directory"])
def test_path_that_is_not_a_regular_file_is_refused_without_reading(kind, tmp_path):
    path = tmp_path / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero_symlink":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    with deadline(10), pytest.raises(st_io.CheckpointError, match="not a regular file|directory"):
        st_io.load_file(path)


def test_huge_file_is_refused_from_its_header_without_reading_it(tmp_path):
    """A valid 16-byte tensor followed by 8 GiB (sparse) of trailing data: refused from the header,
    with no large allocation (the reader used to read the whole file first)."""
    path = _file(tmp_path, "{" + T + "}")
    os.truncate(path, 8 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with deadline(20), pytest.raises(st_io.CheckpointError, match="trailing bytes"):
        st_io.load_file(path)
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 64 << 10, f"peak memory grew by {grew_kib} KiB"


# ---------------------------------------------------------------------------------- content hash


def _arrays():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((4, 5)).astype(np.float32),
            "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16)}  # fmt: skip


def test_every_flipped_bit_in_tensor_data_is_caught(tmp_path):
    path = tmp_path / "w.safetensors"
    st_io.save_file(_arrays(), path, {"note": "x"})
    good = path.read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    for i in range(8 + n, len(good)):  # every byte of the data section
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(bad))
        with pytest.raises(st_io.CheckpointError, match="content hash mismatch"):
            st_io.load_file(path)
    path.write_bytes(good)  # control
    arrays, metadata = st_io.load_file(path)
    assert metadata["note"] == "x" and metadata[st_io.HASH_KEY].startswith("xxh3_128:")


def test_changed_metadata_value_is_caught(tmp_path):
    path = tmp_path / "w.safetensors"
    st_io.save_file(_arrays(), path, {"step": "12"})
    path.write_bytes(path.read_bytes().replace(b'"step":"12"', b'"step":"13"'))
    with pytest.raises(st_io.CheckpointError, match="content hash mismatch"):
        st_io.load_file(path)


def test_file_without_a_hash_from_another_tool_loads_and_bfloat16_crosses_both_ways(tmp_path):
    """safetensors' NumPy API reads and writes BF16 once ml_dtypes is imported, both directions."""
    arrays = _arrays()
    theirs = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(arrays, theirs, metadata={"k": "v"})
    loaded, metadata = st_io.load_file(theirs)
    assert metadata == {"k": "v"}
    ours = tmp_path / "ours.safetensors"
    st_io.save_file(arrays, ours)
    back = safetensors.numpy.load_file(ours)
    for key, array in arrays.items():
        for got in (loaded[key], back[key]):
            assert got.dtype == array.dtype and np.array_equal(got.view(np.uint8), array.view(np.uint8)), key
    with pytest.raises(st_io.CheckpointError, match="no content_hash"):
        st_io.load_file(theirs, require_hash=True)


def test_noncontiguous_and_big_endian_arrays_are_written_as_little_endian_rows(tmp_path):
    a = np.arange(12, dtype=">f4").reshape(3, 4).T
    path = tmp_path / "w.safetensors"
    st_io.save_file({"a": a}, path)
    assert np.array_equal(safetensors.numpy.load_file(path)["a"], a)
    assert np.array_equal(st_io.load_file(path)[0]["a"], a)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_nonfinite_count_is_exact_without_a_float64_copy(dtype):
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    a = np.ones(200_003, dt)
    a[[5, 70_000, -1]] = [np.nan, np.inf, -np.inf]
    big = np.full(1000, ml_dtypes.finfo(dt).max, dt)  # a sum that overflows although every value is finite
    assert count_nonfinite(a) == 3
    assert count_nonfinite(a[::-1]) == 3  # a view with negative strides
    assert count_nonfinite(big) == 0
    assert count_nonfinite(np.ones(10, dt)) == 0


# -------------------------------------------------------------------------- training checkpoints


def _train_state(step: int = 3):
    rng = np.random.default_rng(1)
    weights = {s.torch_key: rng.standard_normal(s.torch_shape).astype(np.float32) for s in table_for(TINY)}
    optim = {k: (np.abs(rng.standard_normal(weights[k.split(".", 2)[2]].shape)) * (step > 0)).astype(np.float32)
             for k in optim_keys(TINY)}  # fmt: skip
    return weights, optim


def _write(path, metadata: dict, weights, optim):
    """A training checkpoint with arbitrary metadata and a valid content hash (a buggy writer)."""
    arrays = {f"model.{k}": v for k, v in weights.items()} | dict(optim)
    st_io.save_file(arrays, path, metadata)


def _metadata(**change) -> dict:
    meta = {"format": FORMAT, "config": json.dumps(TINY.to_dict()), "step": "3", "extra": json.dumps({"a": 1})}
    return {k: v for k, v in (meta | change).items() if v is not None}


def test_control_a_consistent_training_checkpoint_loads(tmp_path):
    weights, optim = _train_state()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, TINY, weights, optim, 3, {"a": 1})
    w, o, meta = load_checkpoint(path, TINY)
    assert meta["step"] == 3 and meta["a"] == 1 and w.keys() == weights.keys()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"config": "[1, 2]"}, "config is not a JSON object"),
        ({"extra": '"text"'}, "extra is not a JSON object"),
        ({"extra": "[" * 50_000}, "extra is not JSON"),
        ({"config": None}, "missing config"),
        ({"step": "-5"}, "step must be an integer"),
        ({"step": "3.0"}, "step must be an integer"),
        ({"step": str(2**40)}, "step must be an integer"),
        ({"step": "0"}, "step is 0 but its optimizer moments are not zero"),
    ],
    ids=["config_list", "extra_string", "extra_deep", "no_config", "negative_step", "float_step", "huge_step",
         "step0_with_moments"],
)
def test_bad_training_checkpoint_metadata_is_a_checkpoint_error(change, fragment, tmp_path):
    weights, optim = _train_state()
    path = tmp_path / "c.safetensors"
    _write(path, _metadata(**change), weights, optim)
    with pytest.raises(st_io.CheckpointError) as info:
        load_checkpoint(path, TINY)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_step_after_zero_second_moments_is_refused(tmp_path):
    weights, optim = _train_state(step=0)
    path = tmp_path / "c.safetensors"
    _write(path, _metadata(step="4"), weights, optim)
    with pytest.raises(st_io.CheckpointError, match="second moments are all zero"):
        load_checkpoint(path, TINY)


def test_negative_second_moment_is_refused(tmp_path):
    weights, optim = _train_state()
    key = next(k for k in optim if k.startswith("optim.exp_avg_sq."))
    optim[key] = optim[key].copy()
    optim[key].flat[0] = -1e-3
    path = tmp_path / "c.safetensors"
    _write(path, _metadata(), weights, optim)
    with pytest.raises(ConversionError, match="negative values"):
        load_checkpoint(path, TINY)


def test_training_checkpoint_without_a_content_hash_is_refused(tmp_path):
    weights, optim = _train_state()
    path = tmp_path / "c.safetensors"
    arrays = {f"model.{k}": v for k, v in weights.items()} | optim
    safetensors.numpy.save_file(arrays, path, metadata=_metadata())
    with pytest.raises(st_io.CheckpointError, match="no content_hash"):
        load_checkpoint(path, TINY)


def test_swapped_moments_are_refused_on_import():
    """exp_avg (signed) given as exp_avg_sq: the import refuses the negative second moments."""
    from weight_conversion.optim_state import check_optim_arrays

    _, optim = _train_state()
    rng = np.random.default_rng(2)
    signed = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in optim.items()}
    swapped = {k: signed[k.replace("exp_avg_sq", "exp_avg")] if "exp_avg_sq" in k else v for k, v in optim.items()}
    check_optim_arrays(TINY, optim)  # control
    with pytest.raises(ConversionError, match="exp_avg_sq: .* has negative values"):
        check_optim_arrays(TINY, swapped)
