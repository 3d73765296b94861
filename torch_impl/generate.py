"""Generation with a KV cache in PyTorch: sampling, the compiled-ready step and the loop.
Twin of jax_impl/generate.py; the framework-neutral parts (checks, layout, uniforms) are in
twin_common/generation.py.

The step is written for torch.compile(fullgraph=True) and CUDA graphs: static shapes, positions as
tensors, the cache mutated in place, no host sync inside (the loop reads the tokens after it).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from torch_impl.gpt import GPT
from twin_common.generation import Generation, Sampling, Uniforms, check_request, checked_tokens, layout

TOP_P_HALVINGS = 32  # bisection steps for the top-p threshold: [0, max p] to max p * 2^-32


def top_p_threshold(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(B, 1): the largest tau such that the tokens with p >= tau hold at least top_p of the mass,
    i.e. the top-p set, found by bisection instead of sorting the vocabulary (a sort of 50257
    entries per step costs more than the GPT-2 step's matmuls on a CPU)."""
    lo = torch.zeros_like(probs[:, :1])  # (B, 1): always satisfies the condition
    hi = probs.amax(dim=-1, keepdim=True)  # (B, 1)
    for _ in range(TOP_P_HALVINGS):
        mid = (lo + hi) / 2
        enough = (probs * (probs >= mid)).sum(dim=-1, keepdim=True) >= top_p
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    return lo


def sample(
    logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
    *, greedy: bool, top_k: int, use_top_p: bool,
) -> torch.Tensor:  # fmt: skip
    """(B, V) logits and (B,) uniforms in [0, 1) -> (B,) token ids, by inverse CDF in vocabulary
    order. ``greedy``, ``top_k`` and ``use_top_p`` pick the code path (one graph each);
    temperature and top_p are 0-d tensors, so changing them recompiles nothing."""
    logits = logits.float()
    if greedy:
        return logits.argmax(dim=-1)  # the first maximal index, as jnp.argmax
    z = logits / temperature  # (B, V)
    if top_k:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)  # (B, V)
    if use_top_p:
        probs = probs.masked_fill(probs < top_p_threshold(probs, top_p), 0.0)
    cdf = probs.cumsum(dim=-1)  # (B, V), unnormalised after the filters
    threshold = u * cdf[:, -1]  # (B,)
    idx = (cdf <= threshold[:, None]).sum(dim=-1)  # first id whose CDF exceeds the threshold
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last_kept = torch.where(probs > 0, ids, -1).amax(dim=-1)  # u * total can round up to total
    return torch.minimum(idx, last_kept)


def step(
    model: GPT, idx: torch.Tensor, t: torch.Tensor, start: torch.Tensor, last: torch.Tensor,
    u: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
    *, greedy: bool, top_k: int, use_top_p: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One prefill (idx (B, T_bucket)) or decode (idx (B, 1)) step:
    (next tokens (B,), logits (B, V))."""
    logits = model.cached_step(idx, t, start, last)
    token = sample(logits, u, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    return token, logits


_COMPILED: dict[str, object] = {}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def compiled_step(mode: str | None = "default"):
    """``step`` under torch.compile(fullgraph=True: a graph break is an error); one compiled
    function per mode ("default", "reduce-overhead" for CUDA graphs, ...), kept for the process."""
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[mode]


@torch.no_grad()
def run(
    model: GPT, prompts, max_new_tokens: int, sampling: Sampling = Sampling(), *, seed: int = 0,
    stop_tokens=(), cache_len: int | None = None, record_logits: bool = False, compile: str | None = None,
    on_step=None, loop: str = "host",
) -> Generation:  # fmt: skip
    """Generate up to ``max_new_tokens`` after each prompt (lists of token ids, any lengths): one
    prefill, then one token per step; a row stops after a stop token, the loop when all rows have.
    ``compile``: None (eager) or a torch.compile mode. ``on_step(i, tokens)`` is called after each
    token. ``loop``: "host" only; the JAX twin's "device" (every decode step in one compiled loop)
    has no torch counterpart here: torch launches each step from the host, and its way to a cheap
    launch is a CUDA graph per step (compile="reduce-overhead"). Everything is validated before
    anything runs (ValueError)."""
    if loop != "host":
        raise ValueError(f'the torch twin runs loop="host" only (its fast path is compile="reduce-overhead"), got {loop!r}')
    rows, cache_len, stops = check_request(prompts, max_new_tokens, model.cfg, cache_len=cache_len,
                                           stop_tokens=stop_tokens)  # fmt: skip
    B = len(rows)
    uniforms = Uniforms(seed)
    if max_new_tokens == 0:
        return Generation([[] for _ in rows], np.zeros((0, B), np.float32), None, 0.0, 0.0, 0)
    lay = layout(rows, cache_len)
    model.eval()
    model.setup_cache(B, cache_len)
    device = model.wte.weight.device
    fn = step if compile is None else compiled_step(compile)
    graphs = compile in CUDA_GRAPH_MODES
    modes = dict(greedy=sampling.greedy, top_k=sampling.top_k, use_top_p=sampling.top_p < 1.0)
    # Everything the loop feeds the step goes to the device once, here: per step only views of
    # these and the previous step's token (no host-to-device copy per token).
    # cache_len rows whatever max_new_tokens is: the views the step gets keep one base shape, so a
    # compiled step is not compiled again for another max_new_tokens
    draws = np.stack([uniforms.next(B) for _ in range(max_new_tokens)])  # (steps, B)
    padded = np.zeros((cache_len, B), np.float32)
    padded[:max_new_tokens] = draws
    to_device = lambda v, dtype: torch.as_tensor(v, dtype=dtype, device=device)  # noqa: E731
    u_all = to_device(padded, torch.float32)
    temperature = to_device(sampling.temperature or 1.0, torch.float32)  # unused when greedy
    top_p = to_device(sampling.top_p, torch.float32)
    start = to_device(lay.start, torch.long)
    slots = to_device(np.arange(lay.prompt_slots, lay.prompt_slots + cache_len), torch.long)
    zero = to_device(0, torch.long)
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * B
    logits_seen = []
    t0 = time.perf_counter()
    idx = to_device(lay.tokens, torch.long)
    t, last = zero, to_device(lay.prompt_slots - 1, torch.long)
    prefill_s = 0.0
    steps = 0
    for i in range(max_new_tokens):
        if graphs:  # a new step begins: the graphs may reuse the memory of the last replay's outputs
            torch.compiler.cudagraph_mark_step_begin()
        token, logits = fn(model, idx, t, start, last, u_all[i], temperature, top_p, **modes)
        steps += 1
        new = checked_tokens(token.tolist(), i)  # the one host sync per step, after the step
        if record_logits:
            logits_seen.append(logits.cpu().numpy())
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
        # the next step: the new tokens at slot P + i, logits of that one column. A CUDA graph's
        # output lives in memory its next replay overwrites: the step gets a copy of the token.
        idx, t, last = token[:, None].clone() if graphs else token[:, None], slots[i], zero
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
