"""Generation benchmark: prefill time and decode tokens/s of both twins, with and without the KV
cache, next to transformers' ``generate`` (GPT-2 or Llama, as the model) on the same weights, in one
process.

    python -m scripts.bench_generate                                  # small-4x128 and GPT-2 124M shape
    python -m scripts.bench_generate --models small-4x128 --batches 1 # a quick run
    python -m scripts.bench_generate --models gpt2-graph --batches 1 --loop host device --no-hf --no-uncached
                                                                      # the host's cost per decode step
    python -m scripts.bench_generate --models gpt2 --new-tokens 32    # fewer decode steps
    python -m scripts.bench_generate --models smollm2-135m --batches 1 # SmolLM2-135M's shape (Llama)
    python -m scripts.bench_generate --models llama-tiny --prompt-len 16 --new-tokens 32  # context 64
    python -m scripts.bench_generate --models gpt2 --device cuda --torch-compile default reduce-overhead \
        --hf-static --no-uncached                                     # on a GPU, every fast path

For each model and batch size: the cached path (one prefill of the prompt, then one token per
step; greedy), the naive path (a full forward over the whole context for every token: its cost
per token is measured at the final context length, prompt + new tokens), and transformers'
generate with its own cache, GPT2LMHeadModel's or LlamaForCausalLM's as the model's family (when
transformers is installed; --hf-static adds its fastest path, a static cache with the forward
under torch.compile, "reduce-overhead" on CUDA: the fair anchor for the compiled twins).
--torch-compile adds the torch twin's step under torch.compile in each mode given. --loop device
adds the Flax twin with every decode step in one jitted fori_loop (jax_impl.generate.run(
loop="device")). --device places torch and transformers there and JAX on that kind of device
(auto: a GPU when present, for both). On a known GPU each row's ms/token sits beside the
weight-read floor: the parameters' bytes over the memory bandwidth, what one token must at least
cost at batch 1 (each step reads every weight once). The weights are the same in all three
(random, converted through the project's table and the transformers mapping). Every path is
warmed up first (the JAX step and torch.compile compile there), and the benchmark checks that the
timed JAX call compiled nothing. Ratios come from the same run; on a shared machine the absolute
figures move, the ratios much less.
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

# small-4x128: byte-level, context for prompt 128 + 128 new tokens; gpt2: GPT-2 124M's shape;
# gpt2-graph: GPT-2's 12 blocks at width 8, so that a step costs what the host does per step;
# llama-tiny: the Llama block, byte-level, context 64; smollm2-135m: SmolLM2-135M's shape; random
# weights in all
MODELS = presets("small-4x128", "gpt2", "gpt2-graph", "llama-tiny", "smollm2-135m")
GREEDY = Sampling(temperature=0.0)
# memory bandwidth in TB/s (vendor datasheets: H100 SXM 3.35, H200 4.8, A100 80GB SXM 2.039)
BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.039}


def build(cfg: GPTConfig, with_hf: bool, device: str = "cpu"):
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
    models["torch"].to(device)
    if with_hf:  # the same weights written as a transformers directory (GPT-2 or Llama), read back by transformers
        import tempfile

        from transformers import AutoModelForCausalLM

        from weight_conversion.hf_families import export_hf, family_of

        with tempfile.TemporaryDirectory() as folder:
            export_hf(family_of(cfg), models["torch"], folder)
            models["hf"] = AutoModelForCausalLM.from_pretrained(folder).eval().to(device)
    return models


def time_cached(framework: str, model, prompts, n_new: int, cache_len: int, compile: str | None = None,
                loop: str = "host") -> dict:  # fmt: skip
    if framework == "torch":
        from torch_impl.generate import run
    else:
        from jax_impl.generate import run
    warm_start = time.perf_counter()
    for _ in range(3 if compile else 1):  # compiles prefill and decode (JAX, torch.compile; CUDA graphs
        run(model, prompts, 2, GREEDY, cache_len=cache_len, compile=compile, loop=loop)  # record on a later call)
    warm = time.perf_counter() - warm_start
    compiled_before = _jax_compilations()
    gen = run(model, prompts, n_new, GREEDY, cache_len=cache_len, compile=compile, loop=loop)
    compiled = _jax_compilations() - compiled_before
    B = len(prompts)
    return {"prefill_ms": gen.prefill_s * 1e3, "ms_per_step": gen.decode_s / gen.steps * 1e3,
            "tokens_per_s": B * gen.steps / gen.decode_s, "warmup_s": warm, "compiled_in_timed_call": compiled,
            "tokens": gen.tokens}  # fmt: skip


def _jax_compilations() -> int:
    from jax_impl.generate import device_loop, loop_step

    return sum(f._cache_size() if hasattr(f, "_cache_size") else 0 for f in (loop_step, device_loop))


def time_uncached(framework: str, model, prompts, length: int, repeats: int) -> dict:
    """The naive step: a full forward over ``length`` tokens for one new token."""
    B = len(prompts)
    context = np.resize(np.asarray(prompts[0]), (B, length))
    if framework == "torch":
        import torch

        x = torch.from_numpy(context.astype(np.int64)).to(model.wte.weight.device)
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


def time_hf(model, prompts, n_new: int, static: bool = False) -> dict:
    """transformers' generate; ``static``: its static cache with the forward under torch.compile
    ("reduce-overhead", CUDA graphs, on CUDA; "default" elsewhere), as its docs recommend."""
    import torch

    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=0)
    forward = model.forward
    if static:
        mode = "reduce-overhead" if model.device.type == "cuda" else "default"
        model.forward = torch.compile(forward, mode=mode, fullgraph=True)
        kwargs.update(cache_implementation="static", disable_compile=True)  # compiled here, once
    try:
        return _time_hf(model, ids, n_new, kwargs, warmups=3 if static else 1)
    finally:
        model.forward = forward


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_hf(model, ids, n_new: int, kwargs: dict, warmups: int) -> dict:
    import torch

    with torch.no_grad():
        for _ in range(warmups):  # both lengths: a static cache has one shape per length
            for n in (1, n_new):
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync(model.device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _sync(model.device)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kwargs)
        _sync(model.device)
        total = time.perf_counter() - start
    B, steps = ids.shape[0], n_new - 1
    decode = max(total - prefill, 1e-9)
    return {"prefill_ms": prefill * 1e3, "ms_per_step": decode / steps * 1e3, "tokens_per_s": B * steps / decode,
            "tokens": out[:, ids.shape[1]:].tolist(), "warmup_s": 0.0}  # fmt: skip


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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where torch, transformers and JAX run (auto: CUDA / a JAX GPU when present)")
    parser.add_argument("--torch-compile", nargs="+", default=[], metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune"],
                        help="also time the torch twin's step under torch.compile in these modes")
    parser.add_argument("--loop", nargs="+", choices=["host", "device"], default=["host"],
                        help="the Flax twin's decode loop(s): one jitted call per step (host, the default) "
                             "and/or every step in one jitted fori_loop (device)")
    parser.add_argument("--hf-static", action="store_true",
                        help="also time transformers' static cache + torch.compile path")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument("--no-uncached", action="store_true", help="skip the naive path")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.new_tokens < 3 or args.prompt_len < 1:
        parser.error("--new-tokens must be >= 3 and --prompt-len >= 1")
    import flax
    import jax
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if device == "cuda":
        try:
            jax_device = jax.devices("gpu")[0]
        except RuntimeError:
            parser.error("--device cuda: JAX sees no GPU")
    else:
        jax_device = jax.devices("cpu")[0]
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
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    bandwidth = next((v for k, v in BANDWIDTH_TBS.items() if gpu and k in gpu), None)
    print(f"# {versions}; {gpu or 'CPU'} (torch, transformers), JAX on {jax_device.platform}; torch threads "
          f"{torch.get_num_threads()}; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, float32"
          + (f"; weight-read floor at {bandwidth} TB/s" if bandwidth else ""))  # fmt: skip
    header = (f"{'model':12} {'B':>2} {'path':38} {'prefill ms':>10} {'ms/token step':>13} {'tokens/s':>9} "
              f"{'floor ms':>8}  notes")  # fmt: skip
    print(header)
    print("-" * len(header))
    length = args.prompt_len + args.new_tokens
    for name in args.models:
        cfg = MODELS[name]
        if length > cfg.block_size:
            parser.error(f"prompt + new tokens = {length} exceeds {name}'s block_size {cfg.block_size}")
        with matched_precision(), jax.default_device(jax_device):
            models = build(cfg, with_hf, device)
            n_params = sum(p.numel() for p in models["torch"].parameters())
            floor = n_params * 4 / (bandwidth * 1e12) * 1e3 if bandwidth else None  # float32 weights
            rng = np.random.default_rng(0)
            for B in args.batches:
                prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).tolist()
                rows = {}

                def emit(path: str, r: dict) -> None:  # printed as measured: a cut-short run keeps its rows
                    rows[path] = r
                    print(_row(name, B, path, r, rows, length, floor), flush=True)

                if with_hf:  # first: the other rows compare with it
                    emit("transformers", time_hf(models["hf"], prompts, args.new_tokens))
                    if args.hf_static:
                        emit("transformers static+compile", time_hf(models["hf"], prompts, args.new_tokens, static=True))
                for fw in ("jax", "torch"):
                    if not args.no_uncached:
                        emit(f"{fw} uncached", time_uncached(fw, models[fw], prompts, length, args.uncached_repeats))
                    for loop in args.loop if fw == "jax" else ["host"]:
                        path = f"{fw} cached" + (" loop=device" if loop == "device" else "")
                        emit(path, time_cached(fw, models[fw], prompts, args.new_tokens, length, loop=loop))
                    for mode in args.torch_compile if fw == "torch" else ():
                        emit(f"torch cached compile={mode}",
                             time_cached(fw, models[fw], prompts, args.new_tokens, length, compile=mode))  # fmt: skip
            del models
    return 0


def _row(name: str, B: int, path: str, r: dict, rows: dict, length: int, floor: float | None) -> str:
    notes = []
    fw = path.split()[0]
    if "uncached" in path:
        notes.append(f"one full forward over {length} tokens per token")
    else:
        if r["warmup_s"]:
            notes.append(f"warm-up {r['warmup_s']:.1f} s")
        if fw == "jax":
            notes.append(f"compiled in timed call: {r['compiled_in_timed_call']}")
        if "loop=device" in path and "jax cached" in rows:
            notes.append(f"{rows['jax cached']['ms_per_step'] / r['ms_per_step']:.2f}x the host loop's speed")
            notes.append("tokens = the host loop's" if r["tokens"] == rows["jax cached"]["tokens"]
                         else "tokens differ from the host loop's")  # fmt: skip
        if f"{fw} uncached" in rows and fw != "transformers":
            notes.append(f"{rows[f'{fw} uncached']['ms_per_step'] / r['ms_per_step']:.1f}x the naive step")
        if "transformers" in rows and path != "transformers":
            notes.append(f"{rows['transformers']['ms_per_step'] / r['ms_per_step']:.2f}x transformers' speed")
            same = r["tokens"] == rows["transformers"]["tokens"]
            notes.append("tokens = transformers'" if same else "tokens differ from transformers'")
    prefill = f"{r['prefill_ms']:10.2f}" if "prefill_ms" in r else f"{'-':>10}"
    floor_text = f"{floor:8.3f}" if floor is not None else f"{'-':>8}"
    return (f"{name:12} {B:>2} {path:38} {prefill} {r['ms_per_step']:13.3f} {r['tokens_per_s']:9.1f} {floor_text}  "
            + "; ".join(notes))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
