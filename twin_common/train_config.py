"""Training hyperparameters shared by both training twins, with every optimizer default pinned.

torch.optim.AdamW and optax.adamw disagree on defaults: weight decay 1e-2 vs 1e-4, and optax decays
every parameter unless given a mask while nanoGPT-style torch code decays only matrices. Both twins
take every value from here and the decay mask from the conversion table (``ParamSpec.decay``).
"""

from __future__ import annotations

import dataclasses
import math

from twin_common.config import DictConfig, _is_real


@dataclasses.dataclass(frozen=True)
class TrainConfig(DictConfig):
    steps: int = 300  # optimizer steps; the cosine schedule ends here
    batch_size: int = 16
    seq_len: int = 64  # tokens per sequence; at most the model's block_size
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-4  # floor of the cosine decay
    warmup_steps: int = 20  # linear warmup from lr / warmup_steps
    beta1: float = 0.9
    beta2: float = 0.95  # GPT-2 / nanoGPT; both libraries default to 0.999
    eps: float = 1e-8  # the same default in both, pinned anyway
    weight_decay: float = 0.1  # torch defaults to 1e-2, optax to 1e-4
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0  # data order and init

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            problems.append(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32):
            problems.append(f"seed must be an int in 0..2^32-1, got {self.seed!r}")
        reals = ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip")
        not_finite = [n for n in reals if not (_is_real(getattr(self, n)) and math.isfinite(getattr(self, n)))]
        problems += [f"{n} must be a finite number, got {getattr(self, n)!r}" for n in not_finite]
        if not not_finite:  # NaN compares false with everything: only order-check real numbers
            if not 0 < self.min_lr <= self.lr:
                problems.append(f"need 0 < min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")
            for name in ("beta1", "beta2"):
                if not 0 <= getattr(self, name) < 1:
                    problems.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
            if not self.eps > 0 or self.weight_decay < 0 or self.grad_clip < 0:
                problems.append("eps must be > 0, weight_decay and grad_clip >= 0")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)

    def lr_table(self, n: int | None = None) -> list[float]:
        """lr_at for steps 0..n-1 (default: every step), the one schedule both twins read."""
        return [self.lr_at(s) for s in range(self.steps if n is None else n)]

