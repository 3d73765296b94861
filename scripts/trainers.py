"""What both training modes (one framework, or the two side by side) build from the command line:
the model and training configs, the data, the trainers, the progress bar, the validation loss."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys

import numpy as np

from .run_folder import RunError
from twin_common import GPTConfig
from twin_common.presets import presets
from twin_common import data as D
from .sharded_run import sharded_trainer
from twin_common.train_config import TrainConfig

MODELS = presets("tiny", "small", "gpt2-padded", "llama-tiny", "moe-tiny")


def data_info(text: bytes, source: str) -> dict:
    return {"source": source, "sha256": hashlib.sha256(text).hexdigest()}


def load_data(args) -> tuple[bytes, dict]:
    if args.data is not None:
        text = D.load_text(args.data)
        return text, data_info(text, os.path.abspath(args.data))
    text = D.generated_corpus()
    return text, data_info(text, "generated")


def make_trainer(framework: str, model_cfg: GPTConfig, tcfg: TrainConfig, args, weights=None):
    """A Trainer for ``framework``; with ``weights`` (interchange arrays) as its initial weights."""
    import weight_conversion as wc

    if framework == "torch":
        import torch

        from torch_impl.gpt import GPT
        from torch_impl.train import Trainer

        torch.manual_seed(tcfg.seed)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = GPT(model_cfg).to(device)
        if weights is not None:
            wc.import_(model, weights)
        if getattr(args, "device_mesh", None) is not None:
            return sharded_trainer("torch", model, tcfg, args.device_mesh, compile=args.compile, bf16=args.bf16)
        return Trainer(model, tcfg, compile=args.compile, bf16=args.bf16, loss_chunk=args.loss_chunk)
    from flax import nnx

    from jax_impl.gpt import GPT
    from jax_impl.train import Trainer

    model = GPT(model_cfg, rngs=nnx.Rngs(tcfg.seed))
    if weights is not None:
        wc.import_(model, weights)
    if getattr(args, "device_mesh", None) is not None:
        return sharded_trainer("jax", model, tcfg, args.device_mesh, bf16=args.bf16)
    return Trainer(model, tcfg, bf16=args.bf16, loss_chunk=args.loss_chunk)


def configs(args, explicit=frozenset()) -> tuple[GPTConfig, TrainConfig]:
    """The configs the flags describe; ``explicit``: the flags the user gave (the rest are defaults)."""
    model_cfg = dataclasses.replace(MODELS[args.model], attn_dropout=args.dropout, resid_dropout=args.dropout)
    seq_len = model_cfg.block_size if args.seq_len is None else args.seq_len
    if seq_len > model_cfg.block_size:
        raise RunError(f"--seq-len {seq_len} exceeds the model's block_size {model_cfg.block_size}")
    if "warmup" in explicit and args.warmup > args.steps:
        raise RunError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps})")
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr,
        min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
        warmup_steps=min(args.warmup, args.steps), weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, seed=args.seed,
    )  # fmt: skip
    return model_cfg, tcfg


def progress(total: int, initial: int, quiet: bool, desc: str):
    if quiet:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def val_loss(trainer, val, tcfg: TrainConfig, batches: int = 4) -> float:
    losses = [
        trainer.eval_loss(*D.batch(val, tcfg.batch_size, tcfg.seq_len, tcfg.seed, i, stream=1))
        for i in range(batches)
    ]
    return float(np.mean(losses))
