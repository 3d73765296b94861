"""Byte-level training data shared by both training twins: the default corpus, the user's text,
the train/validation split and the batch order, all framework-free and deterministic.

Batches are a pure function of (seed, split, step): both frameworks see the same tokens, and a run
resumed at step s continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from twin_common.files import NotRegularFileError, open_regular

VAL_FRACTION = 0.1

_NOUNS = ("cat", "dog", "bird", "fox", "owl", "bee", "cow", "hen")
_VERBS = ("sees", "likes", "chases", "finds", "hears", "helps")
_ADJS = ("red", "big", "old", "shy", "fast", "calm")


@functools.lru_cache(maxsize=4)  # bytes are immutable: every caller may share one copy
def generated_corpus(n_bytes: int = 400_000, seed: int = 1234) -> bytes:
    """A synthetic corpus with structure a small model can learn: short sentences from a tiny
    grammar and sums whose answers follow from the question ("37+48=85."). Made, not downloaded
    or copied, so it is the same on every machine and carries no third-party text."""
    rng = np.random.default_rng(seed)
    lines, size = [], 0
    while size < n_bytes:
        if rng.random() < 0.5:
            a, b = (int(v) for v in rng.integers(0, 100, 2))
            line = f"{a}+{b}={a + b}."
        else:
            subject, obj = rng.choice(_NOUNS, 2)
            line = f"the {rng.choice(_ADJS)} {subject} {rng.choice(_VERBS)} the {obj}."
        lines.append(line)
        size += len(line) + 1
    return ("\n".join(lines) + "\n").encode("ascii")[:n_bytes]


MAX_TEXT_BYTES = 256 << 20  # byte-level tokens become int64: 256 MiB of text is 2 GiB of tokens


def load_text(path: str | os.PathLike) -> bytes:
    """Read the user's text file as bytes; ValueError for a missing, empty, binary, oversized or
    non-regular file (a FIFO or a device such as /dev/zero is refused before anything is read)."""
    path = os.fspath(path)
    if not path:
        raise ValueError("--data is empty: give the path of a text file")
    try:
        fd, st = open_regular(path)
    except FileNotFoundError:
        raise ValueError(f"--data {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--data {path}: is a directory, not a text file") from None
    except NotRegularFileError:
        raise ValueError(f"--data {path}: not a regular file (a device, FIFO or socket); give a text file") from None
    except OSError as e:
        raise ValueError(f"--data {path}: cannot open it ({e.strerror})") from None
    try:
        if st.st_size > MAX_TEXT_BYTES:
            raise ValueError(f"--data {path}: {st.st_size} bytes is more than the {MAX_TEXT_BYTES >> 20} MiB "
                             f"this byte-level trainer holds in memory")  # fmt: skip
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)  # bounded, should the file grow while being read
    finally:
        os.close(fd)
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"--data {path}: grew past {MAX_TEXT_BYTES >> 20} MiB while being read")
    if not data:
        raise ValueError(f"--data {path}: the file is empty")
    if b"\x00" in data[:65536]:
        raise ValueError(f"--data {path}: looks binary (contains NUL bytes); give a text file")
    try:
        data[:65536].decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < 65536 - 4:  # not merely a multi-byte character cut at the boundary
            raise ValueError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data


def split(data: bytes, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays: the last VAL_FRACTION of the bytes is validation."""
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    n_val = max(seq_len + 2, int(len(tokens) * VAL_FRACTION))
    if len(tokens) - n_val < seq_len + 2:
        raise ValueError(
            f"the text has {len(tokens)} bytes, too few for seq_len={seq_len} with a validation "
            f"split: need at least {2 * (seq_len + 2)}"
        )
    return tokens[:-n_val], tokens[-n_val:]


def batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, stream: int = 0):
    """(inputs, targets) of shape (batch_size, seq_len): random windows chosen by (seed, stream, step).

    stream 0 is training, stream 1 validation."""
    starts = np.random.default_rng([seed, stream, step]).integers(0, len(tokens) - seq_len - 1, batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = tokens[idx]
    return windows[:, :-1], windows[:, 1:]


def unigram_loss(tokens: np.ndarray) -> float:
    """Cross-entropy (nats) of predicting each byte from the byte frequencies alone: the loss a
    model that learned nothing about context would reach."""
    counts = np.bincount(tokens, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
