"""Read and write safetensors files from NumPy arrays, bfloat16 included, with a content hash.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes.

Reading: the header is read with a bounded read (at most 100 MB, and never past the file's end) and
checked here, at least as strictly as the ``safetensors`` library checks it (the tests feed both the
same malformed files), so every bad file is a CheckpointError naming the file, and the tensor where
there is one, before anything large is allocated. Paths that are not regular files (a FIFO,
/dev/zero, a folder) are refused from ``os.fstat`` before a byte is read. The tensors themselves are
read through ``safetensors.safe_open`` (memory-mapped, one tensor at a time; with ml_dtypes imported
its NumPy API reads and writes BF16), largest first, and the mapping is reopened every
``_REMAP_BYTES`` so the pages already copied out stop counting against memory: peak memory is about
one copy of the tensors.

Content hash: safetensors has no checksum, so a flipped bit in tensor data would load silently.
Every file written here carries ``content_hash`` in its metadata: xxh3-128 (xxhash) over the
metadata (without the hash), each tensor's name, dtype and shape, and the xxh3-128 of each tensor's
bytes, in name order (so tensors can be read in any order). It is checked on load; a file without
one (from another tool) still loads. xxh3 is a checksum against
accidental change (bit rot, a truncated copy, an edited file), not a signature against an attacker.

Writes are atomic: the file is written under a temporary name in the same folder, flushed to disk,
and renamed over the target, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' NumPy API needs)
import numpy as np
import xxhash

from twin_common.files import NotRegularFileError, open_regular, write_atomic  # noqa: F401  (write_atomic: re-exported)

from weight_conversion.validate import FLOAT_DTYPES

_TO_CODE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_FROM_CODE = {code: name for name, code in _TO_CODE.items()}
_NUMPY = {**FLOAT_DTYPES, **{n: np.dtype(n) for n in _TO_CODE if n not in FLOAT_DTYPES}}
MAX_HEADER = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)
_MAX_DIM = 2**63 - 1  # NumPy's intp: a larger dimension cannot be an array
_REMAP_BYTES = 16 << 20  # reopen the memory map after this many bytes (see the module docstring)

HASH_KEY = "content_hash"
HASH_ALGORITHM = "xxh3_128"
_HASH_RE = re.compile(rf"{HASH_ALGORITHM}:[0-9a-f]{{32}}")
_PLACEHOLDER = f"{HASH_ALGORITHM}:{'0' * 32}"


class CheckpointError(ValueError):
    """A safetensors file that cannot be read: missing, truncated, corrupt or not safetensors."""


class _HeaderError(Exception):
    """Raised inside the header parser; turned into a CheckpointError naming the file."""


# ------------------------------------------------------------------------------------ the header


def _object(pairs: list) -> dict:
    """json object hook: a key given twice is an error (json.loads would keep the last)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _HeaderError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_float(text: str):
    raise _HeaderError(f"non-integer number {text[:40]} (shapes and offsets are integers)")


def _no_constant(text: str):
    raise _HeaderError(f"{text} is not JSON")


def _parse_header(raw: bytes) -> tuple[dict, list[tuple[str, np.dtype, tuple, int, int]]]:
    """(metadata, [(name, dtype, shape, begin, end)]) from the header bytes; _HeaderError if bad."""
    if raw[:1] != b"{":  # as safetensors: no BOM, no leading whitespace
        raise _HeaderError(f"header does not start with '{{' (starts with {raw[:8]!r})")
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_object, parse_float=_no_float, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise _HeaderError(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise _HeaderError("header is not JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, or an integer with more than 4300 digits
        raise _HeaderError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _HeaderError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _HeaderError(f"__metadata__ must map str to str, got {json.dumps(metadata)[:80]}")
    entries = []
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise _HeaderError(f"{where}: entry is not an object: {json.dumps(info)[:80]}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise _HeaderError(f"{where}: entry lacks {', '.join(missing)}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in _FROM_CODE:
            raise _HeaderError(f"{where}: unsupported dtype {json.dumps(code)[:40]}")
        if not isinstance(shape, list) or not all(_is_uint(d, _MAX_DIM) for d in shape):
            raise _HeaderError(f"{where}: shape must be a list of integers 0..2^63-1, got {json.dumps(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o, 2**64 - 1) for o in offsets)):
            raise _HeaderError(f"{where}: data_offsets must be two integers 0..2^64-1, got {json.dumps(offsets)[:80]}")
        entries.append((name, _NUMPY[_FROM_CODE[code]], tuple(shape), offsets[0], offsets[1]))
    return metadata, entries


def _is_uint(value, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _check_layout(entries, body: int) -> None:
    """Tensors must tile the data section exactly, in offset order, each of the size its shape says."""
    end = 0
    for name, dtype, shape, begin, stop in sorted(entries, key=lambda e: (e[3], e[4])):
        size = dtype.itemsize
        for d in shape:  # exact integer arithmetic: no wrap-around to a small or zero size
            size *= d
        if begin != end or stop - begin != size:
            raise _HeaderError(
                f"tensor {name!r}: data_offsets {[begin, stop]} but its shape {list(shape)} of "
                f"{_TO_CODE[dtype.name]} needs {size} bytes starting at {end}"
            )
        if stop > body:
            raise _HeaderError(f"tensor {name!r} ends at byte {stop} of a {body}-byte data section (truncated?)")
        end = stop
    if end != body:
        raise _HeaderError(f"{body - end} trailing bytes after the last tensor")


class Header:
    """A checked header: ``metadata`` (str -> str) and ``entries`` (name, dtype, shape, begin, end)."""

    def __init__(self, path: str, metadata: dict, entries: list, size: int):
        self.path, self.metadata, self.entries, self.size = path, metadata, entries, size


def read_header(path: str | os.PathLike) -> Header:
    """The file's checked header, with bounded reads: nothing is allocated beyond the header."""
    path = os.fspath(path)

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {why}")

    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint file: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}") from None
    except NotRegularFileError:
        raise CheckpointError(f"checkpoint path is not a regular file (a device, FIFO or socket): {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path}: {e.strerror}") from None
    try:
        size = st.st_size
        if size < 8:
            raise fail(f"{size} bytes is too short to hold the header length")
        head = os.pread(fd, 8, 0)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise fail(f"header length {n} runs past the end of the {size}-byte file (truncated?)"
                       if n <= MAX_HEADER else f"header length {n} exceeds the {MAX_HEADER}-byte limit")
        raw = _pread_all(fd, n, 8)
        if len(raw) != n:
            raise fail(f"the file shrank while being read (header of {n} bytes, got {len(raw)})")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        metadata, entries = _parse_header(raw)
        _check_layout(entries, size - 8 - n)
    except _HeaderError as e:
        raise fail(str(e)) from None
    return Header(path, metadata, entries, size)


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, min(n - got, 1 << 24), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# ------------------------------------------------------------------------------- content hash


def _content_hash(metadata: Mapping[str, str], entries, digests: Mapping[str, bytes]) -> str:
    """The hash of the metadata (without the hash itself), the tensor list and each tensor's digest
    (``_digest`` of its bytes), all in name order."""
    doc = {
        "metadata": {k: v for k, v in metadata.items() if k != HASH_KEY},
        "tensors": [[name, _TO_CODE[np.dtype(dtype).name], list(shape)] for name, dtype, shape in entries],
    }
    h = xxhash.xxh3_128(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    for name, _, _ in sorted(entries, key=lambda e: e[0]):
        h.update(digests[name])
    return f"{HASH_ALGORITHM}:{h.hexdigest()}"


def _digest(data: memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def _raw(array: np.ndarray) -> memoryview:
    """The array's bytes, little-endian and C-contiguous (a copy only if it is neither already)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    return memoryview(array.reshape(-1).view(np.uint8))


# -------------------------------------------------------------------------------------- read


def load_file(
    path: str | os.PathLike, *, require_hash: bool = False, mapped: bool = False
) -> tuple[dict[str, np.ndarray], dict]:
    """Read ``path``; returns (arrays, metadata). Raises CheckpointError with the reason.

    The content hash is checked when the file has one; ``require_hash`` makes a missing one an error
    (for formats only this project writes). ``mapped=True`` (when torch is installed): the arrays
    are copy-on-write views of a memory map of the file, read through safetensors' torch front end
    with no copy, for callers that copy them into a model straight away (as safetensors.torch's
    own load_file does); the default gives arrays in their own memory."""
    header = read_header(path)
    path, metadata = header.path, header.metadata
    expected = metadata.get(HASH_KEY)
    if expected is not None and not _HASH_RE.fullmatch(expected):
        raise CheckpointError(f"{path}: unknown {HASH_KEY} {expected[:60]!r} (expected {HASH_ALGORITHM}:<32 hex digits>)")
    if expected is None and any(isinstance(v, str) and _HASH_RE.fullmatch(v) for v in metadata.values()):
        raise CheckpointError(f"{path}: its {HASH_KEY} entry is damaged (a hash is stored under another key)")
    if expected is None and require_hash:
        raise CheckpointError(f"{path} has no {HASH_KEY} in its metadata; every file of this format carries one")
    largest_first = sorted(header.entries, key=lambda e: (e[3] - e[4], e[0]))
    digests: dict[str, bytes] | None = {} if expected else None
    arrays = _read_mapped(path, largest_first, digests) if mapped else None
    if arrays is None:
        arrays = _read_tensors(path, largest_first, digests)
    if digests is not None:
        computed = _content_hash(metadata, [(n, d, s) for n, d, s, _, _ in header.entries], digests)
        if computed != expected:
            raise CheckpointError(
                f"{path}: content hash mismatch: the file changed after it was written (stored {expected}, "
                f"computed {computed}); it cannot be trusted"
            )
    arrays = {name: arrays[name] for name, *_ in sorted(header.entries)}
    return arrays, dict(metadata)


_MAPPED_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def _read_mapped(path: str, entries, digests: dict | None) -> dict[str, np.ndarray] | None:
    """Zero-copy views through safe_open(framework="pt"); None if torch is missing or a dtype has
    no NumPy view there."""
    if any(dtype.name not in _MAPPED_DTYPES for _, dtype, *_ in entries):
        return None
    try:
        import torch
    except ImportError:
        return None
    from safetensors import SafetensorError, safe_open

    arrays: dict[str, np.ndarray] = {}
    name = "?"
    try:
        with safe_open(path, framework="pt") as f:
            for name, dtype, shape, _, _ in entries:
                tensor = f.get_tensor(name)
                if tensor.dtype == torch.bfloat16:  # .numpy() has no bfloat16: view the bits
                    array = tensor.view(torch.int16).numpy().view(dtype)
                else:
                    array = tensor.numpy()
                if array.dtype != dtype or array.shape != shape:
                    raise CheckpointError(f"{path}: tensor {name!r} changed while the file was read")
                if digests is not None:
                    digests[name] = _digest(_raw(array))
                arrays[name] = array
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, MemoryError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None
    return arrays


def _read_tensors(path: str, entries, digests: dict | None) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    arrays: dict[str, np.ndarray] = {}
    i = 0
    while i < len(entries):
        try:
            with safe_open(path, framework="numpy") as f:
                mapped = 0
                while i < len(entries) and mapped < _REMAP_BYTES:
                    name, dtype, shape, begin, stop = entries[i]
                    array = f.get_tensor(name)
                    if array.dtype != dtype or array.shape != shape:
                        raise CheckpointError(f"{path}: tensor {name!r} changed while the file was read")
                    if digests is not None:
                        digests[name] = _digest(_raw(array))
                    arrays[name] = array
                    mapped += stop - begin
                    i += 1
        except (SafetensorError, OSError, ValueError, TypeError, MemoryError) as e:
            if isinstance(e, CheckpointError):
                raise
            name = entries[i][0] if i < len(entries) else "?"
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from None
    return arrays


# ------------------------------------------------------------------------------------- write


def save_file(
    arrays: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``arrays`` to ``path`` atomically (temporary file, fsync, rename), with a content hash.

    Tensors are written in name order, one at a time, straight from their buffers (a contiguous
    little-endian array is not copied): the file is never built in memory."""
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    metadata[HASH_KEY] = _PLACEHOLDER
    header: dict = {"__metadata__": metadata}
    items, offset = [], 0
    for name in sorted(arrays):  # sorted, as the reference writer does: byte-identical files
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        array = np.asarray(arrays[name])
        if array.dtype.name not in _TO_CODE:
            raise TypeError(f"cannot store {name!r} of dtype {array.dtype.name} in safetensors")
        header[name] = {"dtype": _TO_CODE[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}  # fmt: skip
        items.append((name, array))
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    needle = f"{json.dumps(HASH_KEY)}:{json.dumps(_PLACEHOLDER)}".encode()
    slot = 8 + raw.index(needle) + len(needle) - 1 - 32  # where the 32 hex digits go, in the file
    digests: dict[str, bytes] = {}

    def write(f) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, array in items:
            data = _raw(array)
            digests[name] = _digest(data)
            f.write(data)
        f.seek(slot)  # the hash is known only now; it has a fixed width, so the header keeps its size
        value = _content_hash(metadata, [(n, a.dtype, a.shape) for n, a in items], digests)
        f.write(value[len(HASH_ALGORITHM) + 1 :].encode())

    write_atomic(path, write)
