"""Generation benchmark: prefill time and decode tokens/s of both twins, with and without the KV
cache, next to transformers' GPT-2 ``generate`` on the same weights, in one process.

    python -m scripts.bench_generate                                  # small-4x128 and GPT-2 124M shape
    python -m scripts.bench_generate --models small-4x128 --batches 1 # a quick run
    python -m scripts.bench_generate --models gpt2 --new-tokens 32    # fewer decode steps

For each model and batch size: the cached path (one prefill of the prompt, then one token per
step; greedy), the naive path (a full forward over the whole context for every token: its cost
per token is measured at the final context length, prompt + new tokens), and transformers'
GPT2LMHeadModel.generate with its own cache (when transformers is installed). The weights are
the same in all three (random, converted through the project's table and a GPT-2 mapping). Every
path is warmed up first (the JAX step and torch.compile compile there), and the benchmark checks
that the timed JAX call compiled nothing. Ratios come from the same run; on a shared machine the
absolute figures move, the ratios much less.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from twin_common import GPTConfig
from twin_common.presets import presets
from twin_common.generation import Sampling
from twin_common.precision import matched_precision

# small-4x128: byte-level, context for prompt 128 + 128 new tokens; gpt2: GPT-2 124M's shape, random weights
MODELS = presets("small-4x128", "gpt2")
GREEDY = Sampling(temperature=0.0)


def build(cfg: GPTConfig, with_hf: bool):
    import torch
    from flax import nnx

    import weight_conversion as wc
    from jax_impl.gpt import GPT as FlaxGPT
    from torch_impl.gpt import GPT as TorchGPT

    torch.manual_seed(0)
    models = {"torch": TorchGPT(cfg).eval()}
    models["jax"] = FlaxGPT(cfg, rngs=nnx.Rngs(0))
    weights = wc.export(models["torch"])
    wc.import_(models["jax"], weights)
    models["jax"].eval()
    if with_hf:  # the same weights written as a transformers GPT-2 directory, read back by transformers
        import tempfile

        from transformers import GPT2LMHeadModel

        from weight_conversion.hf_gpt2 import export_hf_gpt2

        with tempfile.TemporaryDirectory() as folder:
            export_hf_gpt2(models["torch"], folder)
            models["hf"] = GPT2LMHeadModel.from_pretrained(folder).eval()
    return models


def time_cached(framework: str, model, prompts, n_new: int, cache_len: int) -> dict:
    if framework == "torch":
        from torch_impl.generate import run
    else:
        from jax_impl.generate import run
    warm_start = time.perf_counter()
    run(model, prompts, 2, GREEDY, cache_len=cache_len)  # compiles prefill and decode (JAX)
    warm = time.perf_counter() - warm_start
    compiled_before = _jax_compilations()
    gen = run(model, prompts, n_new, GREEDY, cache_len=cache_len)
    compiled = _jax_compilations() - compiled_before
    B = len(prompts)
    return {"prefill_ms": gen.prefill_s * 1e3, "ms_per_step": gen.decode_s / gen.steps * 1e3,
            "tokens_per_s": B * gen.steps / gen.decode_s, "warmup_s": warm, "compiled_in_timed_call": compiled,
            "tokens": gen.tokens}  # fmt: skip


def _jax_compilations() -> int:
    from jax_impl.generate import step

    return step._cache_size() if hasattr(step, "_cache_size") else 0


def time_uncached(framework: str, model, prompts, length: int, repeats: int) -> dict:
    """The naive step: a full forward over ``length`` tokens for one new token."""
    B = len(prompts)
    context = np.resize(np.asarray(prompts[0]), (B, length))
    if framework == "torch":
        import torch

        x = torch.from_numpy(context.astype(np.int64))
        with torch.no_grad():
            forward = lambda: int(model(x)[:, -1].argmax(-1)[0])  # noqa: E731
            forward()
            start = time.perf_counter()
            for _ in range(repeats):
                forward()
    else:
        import jax
        import jax.numpy as jnp
        from flax import nnx

        graphdef, state = nnx.split(model)
        jitted = jax.jit(lambda s, x: jnp.argmax(nnx.merge(graphdef, s)(x)[:, -1], -1))
        x = jnp.asarray(context, jnp.int32)
        forward = lambda: int(jitted(state, x)[0])  # noqa: E731
        forward()
        start = time.perf_counter()
        for _ in range(repeats):
            forward()
    seconds = (time.perf_counter() - start) / repeats
    return {"ms_per_step": seconds * 1e3, "tokens_per_s": B / seconds}


def time_hf(model, prompts, n_new: int) -> dict:
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kwargs)
        total = time.perf_counter() - start
    B, steps = len(prompts), n_new - 1
    decode = max(total - prefill, 1e-9)
    return {"prefill_ms": prefill * 1e3, "ms_per_step": decode / steps * 1e3, "tokens_per_s": B * steps / decode,
            "tokens": out[:, ids.shape[1]:].tolist()}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small-4x128", "gpt2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--uncached-repeats", type=int, default=3, help="naive steps timed (default: 3)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument("--no-uncached", action="store_true", help="skip the naive path")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.new_tokens < 3 or args.prompt_len < 1:
        parser.error("--new-tokens must be >= 3 and --prompt-len >= 1")
    import flax
    import jax
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with_hf = not args.no_hf
    if with_hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: skipping its generate", file=sys.stderr)
            with_hf = False
    versions = f"torch {torch.__version__}, jax {jax.__version__}, flax {flax.__version__}"
    if with_hf:
        versions += f", transformers {transformers.__version__}"
    print(f"# {versions}; torch threads {torch.get_num_threads()}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, float32")  # fmt: skip
    header = f"{'model':6} {'B':>2} {'path':16} {'prefill ms':>10} {'ms/token step':>13} {'tokens/s':>9}  notes"
    print(header)
    print("-" * len(header))
    length = args.prompt_len + args.new_tokens
    for name in args.models:
        cfg = MODELS[name]
        if length > cfg.block_size:
            parser.error(f"prompt + new tokens = {length} exceeds {name}'s block_size {cfg.block_size}")
        with matched_precision():
            models = build(cfg, with_hf)
            rng = np.random.default_rng(0)
            for B in args.batches:
                prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
                rows = {}
                for fw in ("torch", "jax"):
                    rows[f"{fw} cached"] = time_cached(fw, models[fw], prompts, args.new_tokens, length)
                    if not args.no_uncached:
                        rows[f"{fw} uncached"] = time_uncached(fw, models[fw], prompts, length, args.uncached_repeats)
                if with_hf:
                    rows["transformers"] = time_hf(models["hf"], prompts, args.new_tokens)
                for path, r in rows.items():
                    notes = []
                    fw = path.split()[0]
                    if path.endswith("cached") and not path.endswith("uncached"):
                        notes.append(f"warm-up {r['warmup_s']:.1f} s")
                        if fw == "jax":
                            notes.append(f"compiled in timed call: {r['compiled_in_timed_call']}")
                        if f"{fw} uncached" in rows:
                            notes.append(f"{rows[f'{fw} uncached']['ms_per_step'] / r['ms_per_step']:.1f}x the naive step")
                        if "transformers" in rows:
                            notes.append(f"{rows['transformers']['ms_per_step'] / r['ms_per_step']:.2f}x transformers' speed")
                            same = r["tokens"] == rows["transformers"]["tokens"]
                            notes.append("tokens = transformers'" if same else "tokens differ from transformers'")
                    if path.endswith("uncached"):
                        notes.append(f"one full forward over {length} tokens per token")
                    prefill = f"{r['prefill_ms']:10.1f}" if "prefill_ms" in r else f"{'-':>10}"
                    print(f"{name:6} {B:>2} {path:16} {prefill} {r['ms_per_step']:13.1f} {r['tokens_per_s']:9.1f}  "
                          + "; ".join(notes), flush=True)  # fmt: skip
            del models
    return 0


if __name__ == "__main__":
    sys.exit(main())
