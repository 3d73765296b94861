"""Read and write safetensors files from NumPy arrays, bfloat16 included, with no torch or jax.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes. The ``safetensors`` package's NumPy front end cannot load
BF16 (it has no NumPy dtype for it), so this module reads and writes the format itself with
ml_dtypes' bfloat16; the tests check that files written here load in ``safetensors.torch`` and
``safetensors.flax`` and the other way round.

Writes are atomic: the file is written under a temporary name in the same folder, flushed to disk,
and renamed over the target, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping

import numpy as np

from weight_conversion.validate import FLOAT_DTYPES

_TO_CODE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_FROM_CODE = {code: name for name, code in _TO_CODE.items()}
_NUMPY = {**FLOAT_DTYPES, **{n: np.dtype(n) for n in _TO_CODE if n not in FLOAT_DTYPES}}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class CheckpointError(ValueError):
    """A safetensors file that cannot be read: missing, truncated, corrupt or not safetensors."""


def to_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name in sorted(arrays):  # sorted, as the reference writer does: byte-identical files
        array = np.asarray(arrays[name])
        if array.dtype.name not in _TO_CODE:
            raise TypeError(f"cannot store {name!r} of dtype {array.dtype.name} in safetensors")
        blob = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        data = blob.tobytes()
        header[name] = {
            "dtype": _TO_CODE[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def from_bytes(data: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict]:
    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{source} is not a valid safetensors file: {why}")

    if len(data) < 8:
        raise fail(f"{len(data)} bytes is too short to hold the header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise fail(f"header length {n} runs past the end of the {len(data)}-byte file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail(f"__metadata__ must map str to str, got {metadata!r:.80}")
    body = memoryview(data)[8 + n :]
    entries = []
    for name, info in header.items():
        try:
            dtype = _NUMPY[_FROM_CODE[info["dtype"]]]
            shape = tuple(int(s) for s in info["shape"])
            begin, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise fail(f"bad header entry for {name!r}: {info!r}") from None
        entries.append((begin, stop, name, dtype, shape))
    arrays, end = {}, 0
    for begin, stop, name, dtype, shape in sorted(entries):
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin != end or stop - begin != size:
            raise fail(f"{name!r} has data_offsets {[begin, stop]} but needs {size} bytes at {end}")
        if stop > len(body):
            raise fail(f"{name!r} ends at byte {stop} of a {len(body)}-byte body (truncated?)")
        end = stop
        arrays[name] = (
            np.frombuffer(body[begin:stop], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
        )
    if end != len(body):
        raise fail(f"{len(body) - end} trailing bytes after the last tensor")
    return arrays, metadata


def save_file(
    arrays: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file, fsync, rename)."""
    write_atomic(path, to_bytes(arrays, metadata))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old file or the new one:
    a temporary file in the same folder, flushed to disk, renamed over the target."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes it 0600; give it what open() would
        os.replace(tmp, path)
        _fsync_folder(folder)  # make the rename itself survive a crash
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, or what a plain open() would create under the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def load_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read ``path``; returns (arrays, metadata). Raises CheckpointError with the reason."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint file: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}") from None
    return from_bytes(data, source=path)
