"""Framework-neutral pieces of generation, shared by torch_impl/generate.py and jax_impl/generate.py:
the sampling settings and their checks, the batch layout (left padding, buckets), the random
numbers, and the detector of steps whose token the float32 tolerance cannot decide.

Randomness: both twins draw their uniforms from one seeded NumPy generator (``Uniforms``) and turn
each into a token by the inverse CDF of the same filtered distribution, so the same seed gives the
same tokens in both frameworks. torch.multinomial and jax.random.categorical use different
generators and algorithms: they could never agree.

Batch layout (left padding): the prompts of a batch are right-aligned at one slot P = the longest
prompt, so every row writes its next token at the same cache slot t and one scalar position drives
the step (static shapes, one compiled step). Row b's first real token sits at slot ``start[b]``;
its position id at slot s is s - start[b], so a padded row computes exactly what it computes alone.
Padding slots are masked out of every real query. Per-row positions (each row its own write index)
would save the padded slots but need a scatter per row in the cache update.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np

from twin_common.tolerances import tolerance_for

PAD_ID = 0  # token written into padding slots; masked out, so any id in the vocabulary works
MIN_BUCKET = 16  # prompts are padded (on the right, after the real tokens) to a power of two >= this


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy (argmax); top_k 0 and top_p 1: no filter.

    Order, the same in both twins: logits / temperature, keep the top_k largest, softmax, keep the
    smallest prefix (largest probabilities first) whose mass reaches top_p, pick by inverse CDF."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not (0.0 <= t < math.inf):
            problems.append(f"temperature must be a finite number >= 0, got {t!r}")
        if not _is_int(k) or k < 0:
            problems.append(f"top_k must be an int >= 0 (0: no top-k filter), got {k!r}")
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not (0.0 < p <= 1.0):
            problems.append(f"top_p must be a number in (0, 1] (1: no top-p filter), got {p!r}")
        if problems:
            raise ValueError("invalid sampling settings: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a batch of prompts sits in the cache. See the module docstring."""

    tokens: np.ndarray  # (B, bucket) int32: left-padded prompts, then PAD_ID up to the bucket
    start: np.ndarray  # (B,) int32: slot of each row's first real token
    prompt_slots: int  # P: the longest prompt; logits of slot P - 1 give the first new token
    cache_len: int  # slots in the cache (static shape)


def bucket(n: int, cache_len: int) -> int:
    """The prefill length for a prompt of n slots: the next power of two >= max(n, MIN_BUCKET),
    at most cache_len. One compiled prefill serves every prompt length in a bucket."""
    return min(cache_len, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def check_request(
    prompts, max_new_tokens, cfg, *, cache_len=None, stop_tokens: Iterable[int] = ()
) -> tuple[list[list[int]], int, frozenset]:
    """Validate a generation request on the host; ValueError naming every problem.

    Returns (prompts as lists of int, cache_len, stop tokens). ``cache_len`` defaults to the
    model's block_size; it must hold the longest prompt plus max_new_tokens."""
    problems = []
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r:.80}")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, np.ndarray):
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            problems.append(f"prompt {i} is not a list of token ids: {p!r:.80}")
            continue
        if not p:
            problems.append(f"prompt {i} is empty: generation needs at least one token to start from")
            continue
        bad = [x for x in p if not _is_int(x) or not 0 <= x < cfg.vocab_size]
        if bad:
            problems.append(f"prompt {i} has ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
            continue
        rows.append([int(x) for x in p])
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        problems.append(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if cache_len is None:
        cache_len = cfg.block_size
    elif not _is_int(cache_len) or cache_len < 1:
        problems.append(f"cache_len must be a positive int, got {cache_len!r}")
    stops = []
    for s in stop_tokens:
        if not _is_int(s) or not 0 <= s < cfg.vocab_size:
            problems.append(f"stop token {s!r} is outside the vocabulary [0, {cfg.vocab_size})")
        else:
            stops.append(int(s))
    if not problems:
        longest = max(len(r) for r in rows)
        total = longest + max_new_tokens
        if total > cfg.block_size:
            problems.append(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} = {total} exceeds "
                f"the model's block_size={cfg.block_size}"
            )
        elif total > cache_len:
            problems.append(f"prompt length {longest} + max_new_tokens {max_new_tokens} = {total} exceeds cache_len={cache_len}")
    if problems:
        raise ValueError("invalid generation request: " + "; ".join(problems))
    return rows, int(cache_len), frozenset(stops)


def layout(prompts: list[list[int]], cache_len: int) -> Layout:
    P = max(len(p) for p in prompts)
    width = bucket(P, cache_len)
    tokens = np.full((len(prompts), width), PAD_ID, dtype=np.int32)
    start = np.empty(len(prompts), dtype=np.int32)
    for b, p in enumerate(prompts):
        start[b] = P - len(p)
        tokens[b, start[b] : P] = p
    return Layout(tokens, start, P, cache_len)


class Uniforms:
    """One float32 uniform in [0, 1) per row per step, from a seeded NumPy generator: the only
    randomness in generation, identical for both twins."""

    def __init__(self, seed: int):
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.rng = np.random.default_rng(seed)

    def next(self, batch: int) -> np.ndarray:
        return self.rng.random(batch, dtype=np.float32)


def checked_tokens(new: list[int], step: int) -> list[int]:
    """The ids one step sampled, refused if a row got -1: ``sample`` returns -1 where the filters
    left no token with a positive probability, which happens only when the logits are not finite
    (NaN or inf: softmax gives NaN everywhere). Without this check the -1 would index the embedding
    at the next step and fail there, far from the cause."""
    bad = [b for b, token in enumerate(new) if token < 0]
    if bad:
        raise ValueError(
            f"generation step {step}: no token of row(s) {bad} has a positive probability after the "
            f"temperature, top-k and top-p filters; the model's logits are not finite (NaN or inf)"
        )
    return new


# ------------------------------------------------------------------------- undecidable tokens

LOGIT_TOL = tolerance_for("float32").atol  # the twins' float32 logits may differ by this much


def kept_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The sampling distribution of one row in float64, in vocabulary order, after the top-k and
    top-p filters (normalised): what both twins compute in float32."""
    z = np.asarray(logits, np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < z.size:
        kth = np.sort(z)[::-1][sampling.top_k - 1]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        ps = np.sort(p)[::-1]
        above = np.cumsum(ps) - ps  # mass of the strictly more probable tokens (ties aside)
        tau = ps[np.count_nonzero(above < sampling.top_p) - 1]  # the least probable kept token
        p = np.where(p >= tau, p, 0.0)
        p /= p.sum()
    return p


def decision_margin(logits: np.ndarray, u: float, sampling: Sampling) -> float:
    """How far one row's token choice is from flipping, in logit units, so it compares with the
    float32 tolerance on logits (LOGIT_TOL). Greedy: the gap between the two largest logits.
    Sampled: the smallest of (the k-th minus the (k+1)-th scaled logit, the distance of the top-p
    mass to a token boundary, the distance of the drawn threshold u * total to a CDF step), the
    masses converted to logits by T / 2 (a logit error d changes each probability p by at most
    about 2 p d / T, so the CDF by 2 d / T). Below LOGIT_TOL the twins may legitimately differ."""
    logits = np.asarray(logits, np.float64)
    if logits.size < 2:
        return math.inf
    if sampling.greedy:
        top2 = np.sort(logits)[-2:]
        return float(top2[1] - top2[0])
    T = sampling.temperature
    margins = []
    z = np.sort(logits)[::-1] / T
    if sampling.top_k and sampling.top_k < z.size:
        margins.append((z[sampling.top_k - 1] - z[sampling.top_k]) * T)
    if sampling.top_p < 1.0:
        zk = z[: sampling.top_k] if sampling.top_k else z
        ps = np.exp(zk - zk[0])
        ps /= ps.sum()
        above = np.cumsum(ps) - ps
        margins.append(float(np.min(np.abs(above - sampling.top_p))) * T / 2)
    cdf = np.cumsum(kept_probabilities(logits, sampling))
    margins.append(float(np.min(np.abs(cdf - u * cdf[-1]))) * T / 2)
    return float(min(margins))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or of the end of the shorter), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclasses.dataclass
class Generation:
    """What one generate call produced (both twins return this from ``run``)."""

    tokens: list[list[int]]  # new tokens per row, up to and including a stop token
    uniforms: np.ndarray  # (steps, B) float32: the draws used at each step
    logits: np.ndarray | None  # (steps, B, V) float32 or float64 when recorded, else None
    prefill_s: float  # wall time of the prefill (first token included)
    decode_s: float  # wall time of the remaining steps
    steps: int  # decode steps run after the prefill


def compare_generations(a: Generation, b: Generation, sampling: Sampling) -> dict:
    """Cross-framework verdict: tokens identical? If not, was the first differing step one the
    float32 tolerance cannot decide (see decision_margin)? Largest per-step logit difference over
    the steps both runs share before any divergence (after it the contexts differ)."""
    report = {"identical": a.tokens == b.tokens, "rows": []}
    worst = 0.0
    for row, (ta, tb) in enumerate(zip(a.tokens, b.tokens)):
        k = first_difference(ta, tb)
        shared = len(ta) if k is None else k + 1  # step k's logits still share a context
        if a.logits is not None and b.logits is not None and shared:
            diff = np.abs(a.logits[:shared, row].astype(np.float64) - b.logits[:shared, row].astype(np.float64))
            worst = max(worst, float(diff.max()))
        entry = {"row": row, "first_difference": k}
        if k is not None and k < min(len(ta), len(tb)) and a.logits is not None:
            margin = decision_margin(a.logits[k, row], float(a.uniforms[k, row]), sampling)
            entry.update(margin=margin, undecidable=margin < LOGIT_TOL)
        report["rows"].append(entry)
    report["max_logit_diff"] = worst
    report["explained"] = all(r.get("undecidable", r["first_difference"] is None) for r in report["rows"])
    return report
