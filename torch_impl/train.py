"""Training step in PyTorch: AdamW with the project's pinned hyperparameters, global-norm clipping,
the shared warmup + cosine schedule. Twin of jax_impl/train.py."""

from __future__ import annotations

import torch

from torch_impl.gpt import GPT, loss_fn
from twin_common.train_config import TrainConfig
from weight_conversion.table import table_for


def make_optimizer(model: GPT, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over two groups built from the conversion table: matrices decayed, the rest not."""
    decay = {spec.torch_key: spec.decay for spec in table_for(model.cfg)}
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for k, p in params.items() if decay[k]], "weight_decay": tcfg.weight_decay},
        {"params": [p for k, p in params.items() if not decay[k]], "weight_decay": 0.0},
    ]
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        groups, lr=tcfg.lr_at(0), betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps,
        fused=on_cuda,  # one kernel for every parameter on GPU; the foreach path on CPU
    )  # fmt: skip


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.AdamW, x: torch.Tensor, y: torch.Tensor,
    tcfg: TrainConfig, step: int, autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at 0-based ``step``; returns (loss, grad norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = tcfg.lr_at(step)  # the shared schedule, set explicitly instead of LambdaLR
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = model(x)
    loss = loss_fn(logits, y)
    loss.backward()
    if tcfg.grad_clip > 0:
        # scales by grad_clip / (norm + 1e-6) when norm > grad_clip; the JAX twin does the same
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    optimizer.step()
    return loss.detach(), norm.detach()


@torch.no_grad()
def eval_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    loss = loss_fn(model(x), y)
    model.train(was_training)
    return loss
