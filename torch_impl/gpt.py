"""GPT in PyTorch: embeddings, a stack of the Pre-LN blocks, final LayerNorm, LM head.
Twin of jax_impl/gpt.py. Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_impl.block import Block, dtype_name, layer_norm
from twin_common import GPTConfig
from twin_common.checks import check_token_input


def embedding(n: int, d: int, cfg: GPTConfig) -> nn.Embedding:
    """nn.Embedding with init pinned to normal(0, init_std) (torch: N(0, 1); Flax: scaled normal)."""
    layer = nn.Embedding(n, d)
    nn.init.normal_(layer.weight, mean=0.0, std=cfg.init_std)
    return layer


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        bc = cfg.block_config()
        self.wte = embedding(cfg.vocab_size, cfg.d_model, cfg)
        self.wpe = embedding(cfg.block_size, cfg.d_model, cfg)
        self.drop = nn.Dropout(cfg.resid_dropout)
        self.blocks = nn.ModuleList([Block(bc) for _ in range(cfg.n_layers)])
        self.ln_f = layer_norm(bc)
        if cfg.tie_embeddings:
            self.lm_head = None  # logits use wte's matrix: one tensor, one state_dict key
        else:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)

    def forward(self, idx: torch.Tensor, return_intermediates: bool = False):
        # Reading the ids' values on the host breaks a torch.compile graph (and costs two device syncs
        # per step on CUDA): compiled, the model leaves them to the Trainer, which checks the batch.
        compiling = torch.compiler.is_compiling()
        value_range = (int(idx.min()), int(idx.max())) if idx.numel() and not compiling else None
        check_token_input(tuple(idx.shape), dtype_name(idx.dtype), self.cfg, value_range)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        inter = {"embed": x}
        for i, block in enumerate(self.blocks):
            x = block(x)
            inter[f"blocks.{i}"] = x
        x = self.ln_f(x)
        inter["ln_f"] = x
        if self.lm_head is None:
            logits = F.linear(x, self.wte.weight)  # x @ wte.T: (B, T, V)
        else:
            logits = self.lm_head(x)  # (B, T, V)
        inter["logits"] = logits
        return (logits, inter) if return_intermediates else logits


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position, computed in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> f32; f64 stays
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def generate(model: GPT, prompt: list[int], n_new: int, temperature: float = 1.0, seed: int = 0) -> list[int]:
    """Sample ``n_new`` tokens after ``prompt`` (temperature 0: greedy)."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = list(prompt)
    for _ in range(n_new):
        context = torch.tensor([tokens[-model.cfg.block_size :]], device=device)
        logits = model(context)[0, -1].float().cpu()
        if temperature == 0:
            tokens.append(int(logits.argmax()))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tokens
