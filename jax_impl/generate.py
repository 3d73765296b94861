"""Generation with a KV cache in Flax NNX: sampling, the jitted step and the loop.
Twin of torch_impl/generate.py; the framework-neutral parts (checks, layout, uniforms) are in
twin_common/generation.py.

The step is one jax.jit of a pure function of the split model state (nnx.split / nnx.merge), with
the cache donated so XLA updates it in place. It is defined once at module level: the jit cache,
keyed by the split's static structure (SplitSpec) and the shapes, serves every position and every
generate call. Per token the host does one jitted call on device-resident arrays and one read of
the tokens: no graph hashing, no pytree flattening in Python, no host-to-device copy.
``run(..., loop="device")`` goes further: after the prefill, every decode step runs inside one
jitted ``jax.lax.fori_loop`` (device_loop), the host waiting once for all the tokens.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.gpt import GPT
from twin_common.generation import Generation, Sampling, Uniforms, check_request, checked_tokens, layout

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


def step(
    graphdef, params, cache, rest, idx, t, start, last, u, temperature, top_p,
    *, greedy: bool, top_k: int, use_top_p: bool,
):  # fmt: skip
    """One prefill (idx (B, T_bucket)) or decode (idx (B, 1)) step on the split model:
    (next tokens (B,), logits (B, V), the updated cache). torch's twin mutates its cache in place;
    here the new cache is returned (loop_step donates the old one, so XLA reuses its memory)."""
    model = nnx.merge(graphdef, params, cache, rest)
    logits = model.cached_step(idx, t, start, last)
    token = sample(logits, u, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return token, logits, nnx.state(model, nnx.Cache)


class SplitSpec:
    """The static half of a split model (graphdef and the treedefs of params, cache, rest), hashed
    by identity. jax.jit hashes its static arguments on every call, and hashing a GraphDef walks
    the whole graph (milliseconds for GPT-2 on a GPU host's CPU, per token): split_spec hashes it
    once per generate call and hands the step this object, whose hash costs nothing."""

    __slots__ = ("graphdef", "treedefs")

    def __init__(self, graphdef, treedefs):
        self.graphdef, self.treedefs = graphdef, treedefs


@functools.lru_cache(maxsize=16)
def split_spec(graphdef, treedefs) -> SplitSpec:
    """One SplitSpec per distinct (graphdef, treedefs): equal models share it, and its compilations."""
    return SplitSpec(graphdef, treedefs)


def step_on_leaves(
    spec: SplitSpec, params, cache, rest, idx, n, schedule, start, uniforms, temperature, top_p,
    *, greedy: bool, top_k: int, use_top_p: bool,
):  # fmt: skip
    """Step ``n`` of the loop on flat lists of arrays (flattening nnx.State runs Python code per
    leaf; a list of arrays is flattened by jit's C++ path). ``n`` is a device scalar, and the step
    reads its slot, column and uniforms from the per-call arrays ``schedule`` (2, steps) and
    ``uniforms`` (steps, B) itself: indexing them on the host would dispatch an op per step, where
    torch's twin takes a view. Returns (tokens (B,), logits (B, V), the cache's arrays, the next
    step's idx (B, 1), n + 1)."""
    params, cache, rest = (jax.tree.unflatten(d, a) for d, a in zip(spec.treedefs, (params, cache, rest)))
    t, last = schedule[0, n], schedule[1, n]
    token, logits, cache = step(spec.graphdef, params, cache, rest, idx, t, start, last, uniforms[n], temperature,
                                top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)  # fmt: skip
    return token, logits, jax.tree.leaves(cache), token[:, None], n + 1


# one step per call from the host loop (run, loop="host"), the cache donated
loop_step = jax.jit(step_on_leaves, static_argnames=("spec", "greedy", "top_k", "use_top_p"), donate_argnames=("cache",))


@functools.partial(
    jax.jit,
    static_argnames=("spec", "greedy", "top_k", "use_top_p", "record_logits"),
    donate_argnames=("cache",),
)
def device_loop(
    spec: SplitSpec, params, cache, rest, idx, n, end, schedule, start, uniforms, temperature, top_p, logits,
    *, greedy: bool, top_k: int, use_top_p: bool, record_logits: bool,
):  # fmt: skip
    """Steps n..end-1 of the loop in one jax.lax.fori_loop: step_on_leaves, the step counter, the
    next idx and the cache carried on the device, step i's tokens written into row i of a
    (cache_len, B) array (the per-call arrays' shape, so end, like n, is traced: one compilation
    for every max_new_tokens). ``logits``: the prefill's (B, V), for the shape of the record.
    Returns (tokens (cache_len, B), logits (cache_len, B, V) or None, the cache's arrays)."""
    tokens = jnp.zeros(uniforms.shape, idx.dtype)  # the carried idx is the previous step's tokens
    record = jnp.zeros(uniforms.shape + logits.shape[1:], logits.dtype) if record_logits else None

    def body(i, carry):
        tokens, record, cache, idx = carry
        token, logits, cache, idx, _ = step_on_leaves(
            spec, params, cache, rest, idx, i, schedule, start, uniforms, temperature, top_p,
            greedy=greedy, top_k=top_k, use_top_p=use_top_p,
        )  # fmt: skip
        return tokens.at[i].set(token), record.at[i].set(logits) if record_logits else None, cache, idx

    tokens, record, cache, _ = jax.lax.fori_loop(n, end, body, (tokens, record, cache, idx))
    return tokens, record, cache


def run(
    model: GPT, prompts, max_new_tokens: int, sampling: Sampling = Sampling(), *, seed: int = 0,
    stop_tokens=(), cache_len: int | None = None, record_logits: bool = False, compile: str | None = None,
    on_step=None, loop: str = "host",
) -> Generation:  # fmt: skip
    """Generate up to ``max_new_tokens`` after each prompt (lists of token ids, any lengths): one
    prefill, then one token per step; a row stops after a stop token, the loop when all rows have.
    ``compile`` is accepted for the twin's signature and ignored: the step is always jitted.
    ``on_step(i, tokens)`` is called after each token. ``loop``: "host" (one jitted call per step)
    or "device" (after the prefill, every step in one jitted fori_loop, device_loop: the same
    tokens; no stop tokens, since the loop does not stop early; on_step is then called for each
    step once all have run). Everything is validated before anything runs (ValueError)."""
    del compile
    if loop not in ("host", "device"):
        raise ValueError(f'loop must be "host" or "device", got {loop!r}')
    if loop == "device" and stop_tokens:
        raise ValueError('loop="device" runs every step without looking at the tokens: it takes no stop_tokens')
    rows, cache_len, stops = check_request(prompts, max_new_tokens, model.cfg, cache_len=cache_len,
                                           stop_tokens=stop_tokens)  # fmt: skip
    B = len(rows)
    uniforms = Uniforms(seed)
    if max_new_tokens == 0:
        return Generation([[] for _ in rows], np.zeros((0, B), np.float32), None, 0.0, 0.0, 0)
    lay = layout(rows, cache_len)
    model.eval()
    model.setup_cache(B, cache_len)
    graphdef, *states = nnx.split(model, nnx.Param, nnx.Cache, ...)
    (params, p_def), (cache, c_def), (rest, r_def) = (jax.tree.flatten(s) for s in states)
    spec = split_spec(graphdef, (p_def, c_def, r_def))
    modes = dict(greedy=sampling.greedy, top_k=sampling.top_k, use_top_p=sampling.top_p < 1.0)
    # Everything the loop feeds the step goes to the model's device once, here (explicitly: no
    # implicit host-to-device copy happens in the loop); per step only the previous step's outputs.
    # The per-call arrays have cache_len rows whatever max_new_tokens is: one shape, one compilation.
    draws = np.stack([uniforms.next(B) for _ in range(max_new_tokens)])  # (steps, B)
    padded = np.zeros((cache_len, B), np.float32)
    padded[:max_new_tokens] = draws
    schedule = np.zeros((2, cache_len), np.int32)  # (slot t, column last) of each step
    schedule[0, 1:max_new_tokens] = np.arange(lay.prompt_slots, lay.prompt_slots + max_new_tokens - 1)
    schedule[1, 0] = lay.prompt_slots - 1
    device = params[0].sharding
    if isinstance(device, jax.sharding.NamedSharding):  # a sharded model: the loop's arrays replicated on its mesh
        device = jax.sharding.NamedSharding(device.mesh, jax.sharding.PartitionSpec())
    on_device = (padded, schedule, lay.start, np.float32(sampling.temperature or 1.0), np.float32(sampling.top_p),
                 lay.tokens, np.int32(0), np.int32(max_new_tokens))  # fmt: skip
    u_all, schedule, start, temperature, top_p, idx, n, end = jax.device_put(on_device, device)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * B
    logits_seen = []
    t0 = time.perf_counter()
    prefill_s = 0.0
    steps = 0
    try:
        for i in range(max_new_tokens):
            if i == 1 and loop == "device":  # the remaining steps in one call, their tokens read once
                tokens, record, cache = device_loop(spec, params, cache, rest, idx, n, end, schedule, start, u_all,
                                                    temperature, top_p, logits, **modes, record_logits=record_logits)  # fmt: skip
                device_tokens, device_logits = np.asarray(tokens), np.asarray(record) if record_logits else None
            if loop == "device" and i >= 1:
                token, logits = device_tokens[i], device_logits[i] if record_logits else None
            else:
                token, logits, cache, idx, n = loop_step(spec, params, cache, rest, idx, n, schedule, start, u_all,
                                                         temperature, top_p, **modes)  # fmt: skip
            steps += 1
            new = checked_tokens(np.asarray(token).tolist(), i)  # the one host sync per step, after the step
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
    finally:
        # the model's cache arrays were donated: hand it the live ones
        nnx.update(model, jax.tree.unflatten(c_def, cache))
    decode_s = time.perf_counter() - t0 - prefill_s
    logits = np.stack(logits_seen) if record_logits else None
    return Generation(out, draws[:steps], logits, prefill_s, decode_s, steps - 1)


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
