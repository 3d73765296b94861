"""Check a set of arrays against a conversion table before anything is written to a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np

from twin_common.params import ParamSpec

# Every floating dtype the converter moves, by name. NumPy has no bfloat16: ml_dtypes provides it,
# and it is the same 16-bit layout torch and JAX use, so conversion is a reinterpretation of bits.
FLOAT_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


class ConversionError(ValueError):
    """Raised with every problem found, one per line, each naming its key. Nothing was applied."""

    def __init__(self, problems: Sequence[str], what: str = "weights"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) with the {what}; nothing was applied:\n{lines}"
        )


def find_problems(
    arrays: Mapping[str, np.ndarray],
    table: Sequence[ParamSpec],
    expected_dtype: str | None,
) -> list[str]:
    """All problems of ``arrays`` (torch keys, torch layout) against ``table``, in table order."""
    return find_problems_by_shape(arrays, {spec.torch_key: spec.torch_shape for spec in table}, expected_dtype)


def find_problems_by_shape(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    expected_dtype: str | None,
    layout: str = "torch layout",
) -> list[str]:
    """All problems of ``arrays`` against {key: expected shape}: missing and unexpected keys,
    wrong shapes, non-float or wrong dtypes, NaN/Inf values."""
    problems: list[str] = []
    for key, shape in shapes.items():
        if key not in arrays:
            problems.append(f"missing key {key!r} (expected shape {shape})")
    for key in arrays:
        if key not in shapes:
            problems.append(f"unexpected key {key!r}")
    for key, array in arrays.items():
        if key not in shapes:
            continue
        array = np.asarray(array)
        if tuple(array.shape) != tuple(shapes[key]):
            problems.append(
                f"wrong shape for {key!r}: got {tuple(array.shape)}, expected {tuple(shapes[key])} ({layout})"
            )
        name = array.dtype.name
        if name not in FLOAT_DTYPES:
            problems.append(
                f"wrong dtype for {key!r}: got {name}, expected a float dtype "
                f"({', '.join(FLOAT_DTYPES)})"
            )
            continue
        if expected_dtype is not None and name != expected_dtype:
            problems.append(f"wrong dtype for {key!r}: got {name}, the target has {expected_dtype}")
        bad = count_nonfinite(array)
        if bad:
            problems.append(f"non-finite values in {key!r}: {bad} of {array.size} are NaN or Inf")
    return problems


_CHUNK = 1 << 16  # elements per step of the exact count: small temporaries, still vectorised


def count_nonfinite(array: np.ndarray) -> int:
    """How many elements of a float array are NaN or +-Inf, with no float64 copy of the array.

    float32/float64: one reduction (a sum is NaN or Inf exactly when an element is, or when it
    overflows; only then are the elements counted). float16 would overflow its sum: counted
    directly. bfloat16: NumPy's isfinite goes through a slow per-element loop for it, so its bits
    are read instead: a bfloat16 is non-finite exactly when its 8 exponent bits are all ones."""
    if array.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.add.reduce(array, axis=None)):
                return 0
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == FLOAT_DTYPES["bfloat16"]:
        bits = flat.view(np.uint16)
        return sum(
            int(np.count_nonzero((bits[i : i + _CHUNK] & 0x7F80) == 0x7F80)) for i in range(0, bits.size, _CHUNK)
        )
    return sum(int(np.count_nonzero(~np.isfinite(flat[i : i + _CHUNK]))) for i in range(0, flat.size, _CHUNK))


def check(
    arrays: Mapping[str, np.ndarray],
    table: Sequence[ParamSpec],
    expected_dtype: str | None,
    what: str = "weights",
) -> None:
    problems = find_problems(arrays, table, expected_dtype)
    if problems:
        raise ConversionError(problems, what)
