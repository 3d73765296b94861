"""Generation with a KV cache in Flax NNX: sampling, the jitted step and the loop.
Twin of torch_impl/generate.py; the framework-neutral parts (checks, layout, uniforms) are in
twin_common/generation.py.

The step is one jax.jit of a pure function of the split model state (nnx.split / nnx.merge), with
the cache donated so XLA updates it in place. It is defined once at module level: the jit cache,
keyed by the graph definition and the shapes, serves every position and every generate call.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.gpt import GPT
from twin_common.generation import Generation, Sampling, Uniforms, check_request, layout

TOP_P_HALVINGS = 32  # bisection steps for the top-p threshold: [0, max p] to max p * 2^-32


def top_p_threshold(probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """(B, 1): the largest tau such that the tokens with p >= tau hold at least top_p of the mass,
    i.e. the top-p set, found by bisection instead of sorting the vocabulary (a sort of 50257
    entries per step costs more than the GPT-2 step's matmuls on a CPU)."""
    lo = jnp.zeros_like(probs[:, :1])  # (B, 1): always satisfies the condition
    hi = probs.max(axis=-1, keepdims=True)  # (B, 1)
    for _ in range(TOP_P_HALVINGS):
        mid = (lo + hi) / 2
        enough = (probs * (probs >= mid)).sum(axis=-1, keepdims=True) >= top_p
        lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
    return lo


def sample(
    logits: jax.Array, u: jax.Array, temperature: jax.Array, top_p: jax.Array,
    *, greedy: bool, top_k: int, use_top_p: bool,
) -> jax.Array:  # fmt: skip
    """(B, V) logits and (B,) uniforms in [0, 1) -> (B,) token ids, by inverse CDF in vocabulary
    order. ``greedy``, ``top_k`` and ``use_top_p`` pick the code path (one compilation each);
    temperature and top_p are traced, so changing them recompiles nothing."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1)  # the first maximal index, as torch.argmax
    z = logits / temperature  # (B, V)
    if top_k:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]  # (B, 1): the k-th largest
        z = jnp.where(z < kth, -jnp.inf, z)
    probs = jax.nn.softmax(z, axis=-1)  # (B, V)
    if use_top_p:
        probs = jnp.where(probs < top_p_threshold(probs, top_p), 0.0, probs)
    cdf = jnp.cumsum(probs, axis=-1)  # (B, V), unnormalised after the filters
    threshold = u * cdf[:, -1]  # (B,)
    idx = (cdf <= threshold[:, None]).sum(axis=-1)  # first id whose CDF exceeds the threshold
    ids = jnp.arange(probs.shape[-1])
    last_kept = jnp.where(probs > 0, ids, -1).max(axis=-1)  # u * total can round up to total
    return jnp.minimum(idx, last_kept)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "greedy", "top_k", "use_top_p"),
    donate_argnames=("cache",),
)
def step(
    graphdef, params, cache, rest, idx, t, start, last, u, temperature, top_p,
    *, greedy: bool, top_k: int, use_top_p: bool,
):  # fmt: skip
    """One prefill (idx (B, T_bucket)) or decode (idx (B, 1)) step on the split model:
    (next tokens (B,), logits (B, V), the updated cache). torch's twin mutates its cache in place;
    here the new cache is returned, and donating the old one lets XLA reuse its memory."""
    model = nnx.merge(graphdef, params, cache, rest)
    logits = model.cached_step(idx, t, start, last)
    token = sample(logits, u, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return token, logits, nnx.state(model, nnx.Cache)


def run(
    model: GPT, prompts, max_new_tokens: int, sampling: Sampling = Sampling(), *, seed: int = 0,
    stop_tokens=(), cache_len: int | None = None, record_logits: bool = False, compile: str | None = None,
    on_step=None,
) -> Generation:  # fmt: skip
    """Generate up to ``max_new_tokens`` after each prompt (lists of token ids, any lengths): one
    prefill, then one token per step; a row stops after a stop token, the loop when all rows have.
    ``compile`` is accepted for the twin's signature and ignored: the step is always jitted.
    ``on_step(i, tokens)`` is called after each token. Everything is validated before anything
    runs (ValueError)."""
    del compile
    rows, cache_len, stops = check_request(prompts, max_new_tokens, model.cfg, cache_len=cache_len,
                                           stop_tokens=stop_tokens)  # fmt: skip
    B = len(rows)
    uniforms = Uniforms(seed)
    if max_new_tokens == 0:
        return Generation([[] for _ in rows], np.zeros((0, B), np.float32), None, 0.0, 0.0, 0)
    lay = layout(rows, cache_len)
    model.eval()
    model.setup_cache(B, cache_len)
    graphdef, params, cache, rest = nnx.split(model, nnx.Param, nnx.Cache, ...)
    modes = dict(greedy=sampling.greedy, top_k=sampling.top_k, use_top_p=sampling.top_p < 1.0)
    temperature = jnp.float32(sampling.temperature or 1.0)  # unused when greedy
    top_p = jnp.float32(sampling.top_p)
    start = jnp.asarray(lay.start, jnp.int32)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * B
    draws, logits_seen = [], []
    t0 = time.perf_counter()
    idx = jnp.asarray(lay.tokens, jnp.int32)
    t, last = jnp.int32(0), jnp.int32(lay.prompt_slots - 1)
    prefill_s = 0.0
    try:
        for i in range(max_new_tokens):
            draws.append(uniforms.next(B))
            token, logits, cache = step(graphdef, params, cache, rest, idx, t, start, last,
                                        jnp.asarray(draws[-1]), temperature, top_p, **modes)  # fmt: skip
            new = np.asarray(token).tolist()  # the one host sync per step, after the step
            if record_logits:
                logits_seen.append(np.asarray(logits))
            if i == 0:
                prefill_s = time.perf_counter() - t0
            for b in range(B):
                if not done[b]:
                    out[b].append(new[b])
                    done[b] = new[b] in stops
            if on_step is not None:
                on_step(i, new)
            if all(done):
                break
            # the next step: the new tokens at slot P + i, logits of that one column
            idx, t, last = token[:, None], jnp.int32(lay.prompt_slots + i), jnp.int32(0)
    finally:
        nnx.update(model, cache)  # the model's cache arrays were donated: hand it the live ones
    decode_s = time.perf_counter() - t0 - prefill_s
    logits = np.stack(logits_seen) if record_logits else None
    return Generation(out, np.stack(draws), logits, prefill_s, decode_s, len(draws) - 1)


def generate(model: GPT, prompts, max_new_tokens: int, sampling: Sampling = Sampling(), **kwargs) -> list[list[int]]:
    """The new tokens of each row (see ``run`` for the arguments)."""
    return run(model, prompts, max_new_tokens, sampling, **kwargs).tokens


def continue_prompt(model: GPT, prompt: list[int], n_new: int, temperature: float = 1.0, seed: int = 0) -> list[int]:
    """Sample ``n_new`` tokens after ``prompt`` (temperature 0: greedy); returns prompt + new tokens.
    The KV-cache path (run, above), for the Trainer's ``sample``. Past block_size the
    context restarts from its last block_size // 2 tokens (one new prefill), with seed + 1."""
    size, tokens = model.cfg.block_size, list(prompt)
    for chunk in range(n_new + 1):
        remaining = len(prompt) + n_new - len(tokens)
        if remaining <= 0:
            break
        context = tokens[-max(1, size // 2) :] if chunk else tokens[-(size - 1) :]
        n = min(remaining, size - len(context))
        tokens += run(model, [context], n, Sampling(temperature), seed=seed + chunk).tokens[0]
    return tokens
