"""Training step in PyTorch: AdamW with the project's pinned hyperparameters, global-norm clipping,
the shared warmup + cosine schedule. Twin of jax_impl/train.py."""

from __future__ import annotations

import functools
import math

import torch

from torch_impl.gpt import GPT, lm_loss, model_loss
from twin_common.checks import check_loss_chunk, check_token_input
from twin_common.train_config import TrainConfig
from twin_common.params import table_for


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


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_; returns the global norm before clipping.

    Sharded (torch_impl/sharding.py), the gradients are DTensors on two meshes (the 2-D mesh for
    tensor-parallel weights, its "data" axis for the rest) and DTensor ops refuse to mix meshes:
    each mesh's norm is taken by DTensor (which reduces over the shards), then they are combined."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    groups: dict = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if list(groups) == [None]:  # one device: torch's own function
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in groups.values()]
    norm = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm


def forward_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None = None,
    data_mean=None, router_losses: bool = True, loss_chunk: int = 0,
) -> torch.Tensor:  # fmt: skip
    """The training loss of model(x) against y (model_loss: the mean cross-entropy, plus an MoE's
    router losses; ``router_losses=False``: the cross-entropy alone, as evaluation reports it), the
    forward under autocast when asked. The Trainer compiles this whole function (not the model
    alone): the float32 upcast of the logits, log-softmax and its backward then fuse into the
    compiled graph instead of running eagerly over (B, T, V) float32 copies after it.
    ``data_mean``: a sharded trainer's mean over its data ranks (torch_impl/moe.py, router_losses).
    ``loss_chunk``: positions per chunk of the cross-entropy (gpt.chunked_loss_fn); 0: all at once."""
    autocast = autocast_dtype is not None
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast):
        if not router_losses:  # lm_loss computes in float32 under autocast too
            return lm_loss(model, model(x, head=False), y, loss_chunk)
        return model_loss(model, x, y, data_mean, loss_chunk)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.AdamW, x: torch.Tensor, y: torch.Tensor,
    tcfg: TrainConfig, step: int, autocast_dtype: torch.dtype | None = None, loss_of=forward_loss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at 0-based ``step``; returns (loss, grad norm before clipping).
    ``loss_of``: forward_loss, or its torch.compile'd version (a sharded trainer's pools MoE
    statistics over its ranks). Nothing here waits for the device: the lr is a Python float,
    clipping scales on the device, and AdamW is fused (CUDA) or foreach."""
    for group in optimizer.param_groups:
        group["lr"] = tcfg.lr_at(step)  # the shared schedule, set explicitly instead of LambdaLR
    optimizer.zero_grad(set_to_none=True)
    loss = loss_of(model, x, y, autocast_dtype)
    loss.backward()
    # scales by grad_clip / (norm + 1e-6) when norm > grad_clip; the JAX twin does the same
    norm = clip_grad_norm(model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
    optimizer.step()
    return loss.detach(), norm.detach()


@torch.no_grad()
def eval_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_of=forward_loss) -> torch.Tensor:
    was_training = model.training
    model.eval()
    loss = loss_of(model, x, y, router_losses=False)  # the cross-entropy, as the JAX twin's eval_loss
    model.train(was_training)
    return loss


class Trainer:
    """A GPT, its AdamW and the step counter: what the training script drives. Twin of
    jax_impl.train.Trainer (same methods, same arguments, NumPy in and out)."""

    def __init__(self, model: GPT, tcfg: TrainConfig, *, compile: bool = False, bf16: bool = False,
                 loss_chunk: int = 0):  # fmt: skip
        """``bf16``: torch.autocast, torch's idiom (matmuls in bf16; LayerNorm, softmax and the loss in
        float32). The JAX twin casts every parameter instead, its idiom: the two mixed-precision
        modes are not numerically twins, and parity is proven in float32. ``loss_chunk``: the
        cross-entropy over that many positions at a time (gpt.chunked_loss_fn: the (B, T, V) float32
        logits never exist at once); 0, the default, computes it over the whole logits."""
        self.model, self.tcfg = model.train(), tcfg
        self.optimizer = make_optimizer(model, tcfg)
        self.device = next(model.parameters()).device
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        # torch.compile traces on first call (fullgraph: a graph break is an error); the optimizer
        # keeps the original parameters. Compiled, the loss is inside the graph (forward_loss).
        loss_of = torch.compile(forward_loss, fullgraph=True) if compile else forward_loss
        self.loss_chunk = check_loss_chunk(loss_chunk)
        self.loss_of = functools.partial(loss_of, loss_chunk=loss_chunk) if loss_chunk else loss_of
        self.step_count = 0

    def _tensor(self, a) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device, non_blocking=True)

    def step(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on NumPy token arrays; returns device scalars (no host sync)."""
        # the model's own id check cannot see values under torch.compile: check the batch on the host
        check_token_input(tuple(x.shape), x.dtype.name, self.model.cfg, (int(x.min()), int(x.max())))
        loss, norm = train_step(
            self.model, self.optimizer, self._tensor(x), self._tensor(y), self.tcfg,
            self.step_count, self.autocast_dtype, self.loss_of,
        )  # fmt: skip
        self.step_count += 1
        return loss, norm

    def eval_loss(self, x, y) -> float:
        return float(eval_loss(self.model, self._tensor(x), self._tensor(y), self.loss_of))

    def state(self) -> tuple[dict, dict, int]:
        """(weights, optimizer moments, step) in the interchange layout."""
        import weight_conversion as wc
        from weight_conversion.optim_state import export_torch_optimizer

        optim, step = export_torch_optimizer(self.model, self.optimizer)
        if step != self.step_count:  # AdamW's own counter drives its bias correction
            raise RuntimeError(f"AdamW is at step {step} but the trainer at {self.step_count}")
        return wc.export(self.model), optim, self.step_count

    def load(self, weights: dict, optim: dict, step: int) -> None:
        import weight_conversion as wc
        from weight_conversion.optim_state import import_torch_optimizer

        wc.import_(self.model, weights)
        import_torch_optimizer(self.model, self.optimizer, optim, step)
        self.step_count = step

    def rng_state(self) -> dict:
        """torch's generators (CPU, and every CUDA device's) as text for the checkpoint's metadata."""
        import base64

        def text(state: torch.Tensor) -> str:
            return base64.b64encode(state.numpy().tobytes()).decode()

        saved = {"torch_rng": text(torch.get_rng_state())}
        if torch.cuda.is_available():
            saved["torch_cuda_rng"] = [text(s) for s in torch.cuda.get_rng_state_all()]
        return saved

    def set_rng_state(self, saved: dict) -> None:
        import base64

        import numpy as np

        def tensor(text: str) -> torch.Tensor:
            return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

        if "torch_rng" in saved:
            torch.set_rng_state(tensor(saved["torch_rng"]))
        if "torch_cuda_rng" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensor(t) for t in saved["torch_cuda_rng"]])

    def sample(self, prompt: list[int], n_new: int, temperature: float = 0.8, seed: int = 0) -> list[int]:
        from torch_impl.generate import continue_prompt

        tokens = continue_prompt(self.model, prompt, n_new, temperature, seed)
        self.model.clear_cache()  # the KV cache is for generation only: leave the model as it was
        self.model.train()
        return tokens
