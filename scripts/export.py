"""Publish a trained model: a run folder or checkpoint -> a weights file or a transformers folder.

    python -m scripts.export --checkpoint runs/torch --out model.safetensors   # the project's weights file
    python -m scripts.export --checkpoint runs/torch --out gpt2-tiny            # GPT2LMHeadModel.from_pretrained loads it

--checkpoint is what scripts.generate takes: a run folder of scripts.train (its latest checkpoint),
a training checkpoint or weights file, or a transformers GPT-2 folder. --out ending in .safetensors
writes one weights file (torch layout, config in its metadata: weight_conversion.load reads it into
either twin); any other --out is a transformers folder (config.json + model.safetensors; the AdamW
moments are not exported) in the layout of the model's family: GPT2LMHeadModel for a GPT-2 block
(which has biases), LlamaForCausalLM for rotary positions (the Llama switches), MixtralForCausalLM
for an MoE MLP. A target that exists is refused unless --overwrite. Everything is written
atomically, then verified: read back into a fresh twin and compared bit for bit, and a transformers
folder is also run against the float64 NumPy model computed from its own file
(import_hf_gpt2 / import_hf_llama / import_hf_mixtral with verify=True).
"""

from __future__ import annotations

import argparse
import os
import sys

from .generate import UsageError, load_config, load_model, resolve
from twin_common.files import cannot_write
from twin_common.precision import matched_precision
from weight_conversion.hf_families import FAMILIES, config_from_dir, export_hf, family_of, import_hf
from weight_conversion.preflight import check_fits


def out_problem(out: str, gpt2: bool, overwrite: bool) -> str | None:
    """Why --out cannot be written, checked before anything is read or built."""
    if not out:
        return "--out is empty: give a .safetensors file or a folder"
    why = cannot_write(out, folder=gpt2)
    if why:
        return f"--out {out}: {why}"
    if gpt2 and os.path.lexists(out) and not os.path.isdir(out):
        return f"--out {out} exists and is not a folder (a name ending in .safetensors writes a weights file)"
    if gpt2 and os.path.isdir(out) and os.listdir(out) and not overwrite:
        return f"--out {out} is not empty; pass --overwrite to replace the model in it (its other files are kept)"
    if not gpt2 and os.path.lexists(out) and not overwrite:
        return f"--out {out} exists; pass --overwrite to replace it"
    return None


def export(checkpoint: str, out: str, *, overwrite: bool = False) -> str:
    """Write ``out`` from ``checkpoint`` and verify it; returns what was verified, in words."""
    import torch

    import weight_conversion as wc
    from torch_impl.gpt import GPT

    gpt2 = not out.endswith(".safetensors")
    kind, path = resolve(checkpoint)
    cfg = load_config(kind, path)
    check_fits(cfg, kind, path)  # the file's tensor headers agree with its config: nothing built yet
    model = load_model("torch", kind, path, cfg)
    source = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if gpt2:
        family = family_of(cfg)
        export_hf(family, model, out, overwrite=overwrite)
        again = GPT(config_from_dir(family, out))
        import_hf(family, again, out, verify=True)
        how = f"read back bit for bit, and within the float32 bound of a float64 NumPy {FAMILIES[family]} of the file"
    else:
        wc.save(model, out)
        again = GPT(cfg)
        wc.load(again, out)
        how = "read back bit for bit"
    back = again.state_dict()
    differ = [k for k, v in source.items() if not torch.equal(v, back[k])]
    if differ:
        raise RuntimeError(f"{out} was written but does not read back as the model: {', '.join(differ)} differ")
    n = sum(v.numel() for k, v in source.items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    return f"wrote {out} ({n:,} parameters from {path}); verified: {how}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint or weights file, or GPT-2 folder")
    p.add_argument("--out", required=True,
                   help="NAME.safetensors: a weights file; anything else: a transformers folder (GPT-2, Llama or Mixtral)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    why = out_problem(args.out, not args.out.endswith(".safetensors"), args.overwrite)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        with matched_precision():
            print(export(args.checkpoint, args.out, overwrite=args.overwrite))
    except (UsageError, ValueError, OSError) as e:  # ConversionError / CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
