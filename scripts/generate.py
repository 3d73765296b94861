"""Generate text with the GPT twin (KV cache), in PyTorch, JAX, or both side by side.

    python -m scripts.generate --framework torch --checkpoint runs/torch --prompt "The cat "
    python -m scripts.generate --framework compare --checkpoint runs/torch --prompt "12+7=" \\
        --max-new-tokens 48 --temperature 0.8 --top-k 40 --seed 1
    python -m scripts.generate --framework jax --checkpoint gpt2-dir --prompt-ids 464,3797 --temperature 0

--checkpoint is a run folder of scripts.train (its latest.json), a project safetensors file
(weight_conversion.save or a training checkpoint), or a transformers GPT-2, Llama or Mixtral
directory (config.json + model.safetensors; its model_type says which). The project's 256-token
models read the prompt as UTF-8 bytes; a transformers directory uses its own tokenizer files
through transformers when they are there, otherwise give
--prompt-ids; without a tokenizer the output is ids, the prompt's and the new ones apart:
"464 3797 | 11 262 ...". Several --prompt (or --prompt-ids) make one left-padded batch.

compare runs both twins on the same weights and seed, prints both continuations, whether they are
identical (and, if not, whether the first difference is one float32 cannot decide), and the
largest per-step logit difference. Progress and tokens/s go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from twin_common import GPTConfig
from twin_common import data as D
from twin_common.generation import Sampling, compare_generations
from twin_common.precision import matched_precision
from weight_conversion.hf_families import FAMILIES, config_from_dir, import_hf
from weight_conversion.preflight import check_fits


DEFAULT_NEW_TOKENS = 64


class UsageError(Exception):
    """A problem with the command line or the checkpoint; printed without a traceback."""


# ------------------------------------------------------------------------------------ checkpoints


def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and all(
        os.path.exists(os.path.join(path, n)) for n in ("config.json", "model.safetensors")
    ) or all(os.path.exists(os.path.join(path, n)) for n in ("config.json", "model.safetensors.index.json"))


def _hf_family(path: str) -> str:
    """The family of a transformers directory, from its config.json's model_type (GPT-2's files
    written before model_type existed have none: GPT-2)."""
    from weight_conversion.hf_gpt2 import read_config

    try:
        doc = read_config(path)
    except ValueError as e:  # unreadable JSON
        raise UsageError(str(e)) from None
    family = doc.get("model_type", "gpt2") if isinstance(doc, dict) else None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: config.json holds {type(doc).__name__}, not a JSON object")
    if family not in FAMILIES:
        raise UsageError(f"{path}: config.json's model_type is {family!r}; transformers directories this "
                         f"command reads: {', '.join(FAMILIES)}")  # fmt: skip
    return family


def resolve(path: str) -> tuple[str, str]:
    """(kind, file or folder): kind is a transformers family ("gpt2", "llama", "mixtral"), "train"
    (a training checkpoint) or "weights"."""
    if _is_hf_dir(path):
        return _hf_family(path), path
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "latest.json")):
            raise UsageError(f"{path} is neither a run folder (no latest.json) nor a GPT-2 directory "
                             f"(config.json + model.safetensors)")  # fmt: skip
        from .train import RunDir, RunError

        try:
            return "train", RunDir(path).read_latest()["path"]
        except RunError as e:
            raise UsageError(str(e)) from None
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    from weight_conversion.checkpoint import FORMAT
    from weight_conversion.safetensors_io import load_file

    _, metadata = load_file(path)
    return ("train" if metadata.get("format") == FORMAT else "weights"), path


def load_config(kind: str, path: str) -> GPTConfig:
    if kind in FAMILIES:
        return config_from_dir(kind, path)
    from weight_conversion.safetensors_io import load_file

    _, metadata = load_file(path)
    if "config" not in metadata:
        raise UsageError(f"{path} records no model config (write it with weight_conversion.save)")
    try:
        return GPTConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: the recorded config is not a GPT config ({e})") from None


def load_model(framework: str, kind: str, path: str, cfg: GPTConfig, verify: bool = True):
    """A twin in eval mode with the checkpoint's weights (every key, shape and value checked). A
    transformers GPT-2 directory is also verified (unless ``verify`` is False): the twin is run
    against a float64 NumPy GPT-2 computed straight from the file's arrays, which catches what names
    and shapes cannot (a swapped q/k/v split, a missed transpose of a square matrix)."""
    if framework == "torch":
        from torch_impl.gpt import GPT

        model = GPT(cfg)  # generation runs under torch.no_grad (torch_impl.generate.run)
    else:
        from flax import nnx

        from jax_impl.gpt import GPT

        model = GPT(cfg, rngs=nnx.Rngs(0))
    import weight_conversion as wc

    if kind in FAMILIES:
        import_hf(kind, model, path, verify=verify)
    elif kind == "train":
        from weight_conversion.checkpoint import load_checkpoint

        weights, _, _ = load_checkpoint(path, cfg)
        wc.import_(model, weights)
    else:
        wc.load(model, path)
    model.eval()
    return model


# --------------------------------------------------------------------------------------- prompts


class Tokenizer:
    """Bytes for the project's 256-token models; a GPT-2 directory's own tokenizer if present."""

    def __init__(self, kind: str, path: str, cfg: GPTConfig):
        self.hf = None
        if kind in FAMILIES:
            folder = path
            has_files = os.path.exists(os.path.join(folder, "tokenizer.json")) or all(
                os.path.exists(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")
            )
            if has_files:
                from transformers import AutoTokenizer

                self.hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.bytes = kind not in FAMILIES and cfg.vocab_size == 256

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return list(self.hf.encode(text))
        if self.bytes:
            return list(text.encode("utf-8"))
        raise UsageError("this checkpoint has no tokenizer here: give the prompt as --prompt-ids 1,2,3")

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids)
        if self.bytes:
            return D.decode(ids)
        return " ".join(map(str, ids))

    def show(self, prompt: list[int], new: list[int]) -> str:
        """One printed row: text reads on from its prompt; token ids (no tokenizer) would run
        together, so a " | " marks where the prompt ends and the new ids begin."""
        if self.hf is not None or self.bytes:
            return self.decode(prompt) + self.decode(new)
        return f"{self.decode(prompt)} | {self.decode(new)}".rstrip()


def parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


# ------------------------------------------------------------------------------------------ run


def _progress(name: str, total: int, quiet: bool):
    live = not quiet and sys.stderr.isatty()  # a counter that rewrites its line; logs get the summary

    def on_step(i, tokens):
        if live and (i + 1 == total or (i + 1) % 8 == 0):
            print(f"\r{name}: {i + 1}/{total} tokens", end="", file=sys.stderr, flush=True)

    return on_step


def generate_with(framework: str, model, prompts, args, sampling: Sampling, record: bool):
    if framework == "torch":
        from torch_impl.generate import run
    else:
        from jax_impl.generate import run
    gen = run(model, prompts, args.max_new_tokens, sampling, seed=args.seed, stop_tokens=args.stop_ids,
              cache_len=args.cache_len, record_logits=record, compile=args.compile,
              on_step=_progress(framework, args.max_new_tokens, args.quiet))  # fmt: skip
    if not args.quiet:
        n = sum(len(t) for t in gen.tokens)
        rate = gen.steps * len(prompts) / gen.decode_s if gen.decode_s > 0 else float("nan")
        print(f"\r{framework}: {n} tokens; prefill (first token) {gen.prefill_s * 1e3:.1f} ms, "
              f"decode {gen.steps} steps in {gen.decode_s:.2f} s = {rate:,.1f} tokens/s "
              f"(batch {len(prompts)}, the first call includes compilation)", file=sys.stderr)  # fmt: skip
    return gen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--framework", choices=["torch", "jax", "compare"], required=True)
    p.add_argument("--checkpoint", required=True, help="run folder, safetensors file or GPT-2 directory")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="prompt as comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {DEFAULT_NEW_TOKENS}, or as many as fit in the model's block_size after the "
                        f"longest prompt (a larger value given here is refused)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0: all (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this mass; 1: all (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the NumPy uniforms both twins use (default: 0)")
    p.add_argument("--stop-ids", type=parse_ids, default=[], metavar="IDS",
                   help="comma-separated token ids that end a row (kept in the output)")
    p.add_argument("--cache-len", type=int, help="KV cache slots (default: the model's block_size)")
    p.add_argument("--compile", metavar="MODE", help='torch: torch.compile the step with this mode, e.g. '
                   '"default" or "reduce-overhead" (CUDA graphs); JAX is always jitted')  # fmt: skip
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="GPT-2 directory: skip running the imported twin against a float64 reference of the file")
    p.add_argument("--quiet", action="store_true", help="no progress or timing on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
        kind, path = resolve(args.checkpoint)
        cfg = load_config(kind, path)
        check_fits(cfg, kind, path)  # the headers, before any allocation
        tok = Tokenizer(kind, path, cfg)
        prompts = [tok.encode(p) for p in args.prompt] + [parse_ids(p) for p in args.prompt_ids]
        if not prompts:
            raise UsageError("give at least one --prompt or --prompt-ids")
        if args.max_new_tokens is None:  # the default fits the model: its cache holds block_size slots
            args.max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, cfg.block_size - max(map(len, prompts))))
        frameworks = ["torch", "jax"] if args.framework == "compare" else [args.framework]
        results = {}
        with matched_precision():
            for fw in frameworks:
                model = load_model(fw, kind, path, cfg, verify=args.verify)
                results[fw] = generate_with(fw, model, prompts, args, sampling, record=args.framework == "compare")
    except (UsageError, ValueError, OSError) as e:  # ConversionError / CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    for b, prompt in enumerate(prompts):
        for fw, gen in results.items():
            label = f"[{fw}] " if len(results) > 1 else ""
            print(f"{label}{tok.show(prompt, gen.tokens[b])}")
    if args.framework == "compare":
        report = compare_generations(results["torch"], results["jax"], sampling)
        print(f"identical: {'yes' if report['identical'] else 'no'}")
        print(f"largest per-step logit difference: {report['max_logit_diff']:.2e}")
        for row in report["rows"]:
            if row["first_difference"] is not None:
                verdict = ("undecidable in float32 (margin {:.1e} below the 1e-5 tolerance)".format(row["margin"])
                           if row.get("undecidable") else "NOT explained by float32 rounding")  # fmt: skip
                if "margin" not in row:
                    verdict = "lengths differ"
                print(f"row {row['row']}: first difference at new token {row['first_difference']}: {verdict}")
        return 0 if report["identical"] or report["explained"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
