"""GPT in PyTorch: embeddings, a stack of the Pre-LN blocks, final norm, LM head (GPT-2's or, by
the config's switches, the Llama family's: no position table, rotary positions inside the blocks).
Twin of jax_impl/gpt.py. Shapes: B batch, T sequence, C d_model, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from torch_impl.block import Block, KVCache, dtype_name, norm
from twin_common import GPTConfig
from twin_common.checks import check_loss_chunk, check_token_input


def embedding(n: int, d: int, cfg: GPTConfig) -> nn.Embedding:
    """nn.Embedding with init pinned to normal(0, init_std) (torch: N(0, 1); Flax: scaled normal)."""
    layer = nn.Embedding(n, d)
    nn.init.normal_(layer.weight, mean=0.0, std=cfg.init_std)
    return layer


def position_ids(slots: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token: its cache slot minus its row's first real slot (left padding
    shifts a short prompt right; its first token is still position 0). Padding slots get 0."""
    return (slots[None, :] - start[:, None]).clamp(min=0)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        bc = cfg.block_config()
        self.wte = embedding(cfg.vocab_size, cfg.d_model, cfg)
        # rotary positions (cfg.pos == "rope") live in the attention: no position table
        self.wpe = embedding(cfg.block_size, cfg.d_model, cfg) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.resid_dropout)
        self.blocks = nn.ModuleList([Block(bc) for _ in range(cfg.n_layers)])
        self.ln_f = norm(bc)
        if cfg.tie_embeddings:
            self.lm_head = None  # logits use wte's matrix: one tensor, one state_dict key
        else:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)

    def forward(self, idx: torch.Tensor, return_intermediates: bool = False, head: bool = True):
        """The logits (B, T, V); ``head=False``: the final norm's output (B, T, C) instead, for a loss
        that applies the head itself (chunked). The losses call the model, never ``features`` alone:
        a sharded model's hooks (FSDP2's replicate, the tensor-parallel styles) run on forward."""
        x, inter = self.features(idx, return_intermediates)
        if not head:
            return (x, inter) if return_intermediates else x
        logits = self.head(x)  # (B, T, V)
        inter["logits"] = logits
        return (logits, inter) if return_intermediates else logits

    def features(self, idx: torch.Tensor, return_intermediates: bool = False):
        """(the final norm's output (B, T, C), intermediates): the model up to its LM head."""
        # Reading the ids' values on the host breaks a torch.compile graph (and costs two device syncs
        # per step on CUDA): compiled, the model leaves them to the Trainer, which checks the batch.
        compiling = torch.compiler.is_compiling()
        value_range = (int(idx.min()), int(idx.max())) if idx.numel() and not compiling else None
        check_token_input(tuple(idx.shape), dtype_name(idx.dtype), self.cfg, value_range)
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.embed(idx, pos)  # (B, T, C)
        inter = {"embed": x}
        for i, block in enumerate(self.blocks):
            if return_intermediates and self.cfg.mlp == "moe":
                x, block_inter = block(x, return_intermediates=True)
                inter[f"blocks.{i}.router_logits"] = block_inter["router_logits"]  # (B, T, E)
            else:
                x = block(x)
            inter[f"blocks.{i}"] = x
        x = self.ln_f(x)
        inter["ln_f"] = x
        return x, inter

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus, with learned positions, those of ``pos`` (T,) or (B, T)."""
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        return self.drop(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(x, self.wte.weight)  # x @ wte.T: (..., V)
        return self.lm_head(x)  # (..., V)

    # ------------------------------------------------------------------------------ generation

    def setup_cache(self, batch: int, length: int) -> None:
        """Give every attention layer a KVCache of (batch, length) slots; one that fits is kept
        (same buffers across generate calls: no reallocation, no recompilation)."""
        w = self.wte.weight
        for block in self.blocks:
            cache, heads = block.attn.kv_cache, block.attn.local_kv_heads()
            if cache is None or cache.k.shape[:3] != (batch, heads, length) or (
                cache.k.dtype != w.dtype or cache.k.device != w.device
            ):
                block.attn.kv_cache = KVCache(batch, length, block.cfg, w.dtype, w.device, heads)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def cached_step(
        self, idx: torch.Tensor, t: torch.Tensor, start: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, V) of column ``last`` of idx (B, T), whose tokens go into cache slots
        t..t+T-1. ``start`` (B,): slot of each row's first real token (left padding; see
        twin_common.generation). t, start, last are tensors: no host sync, one graph for all steps.
        Token ids are checked on the host before the step (twin_common.generation.check_request)."""
        B, T = idx.shape
        L = self.blocks[0].attn.kv_cache.k.shape[2]
        slots = t + torch.arange(T, device=idx.device)  # (T,) cache slot of each query
        pos = position_ids(slots, start)  # (B, T)
        keys = torch.arange(L, device=idx.device)  # (L,) cache slot of each key
        # query at slot q sees keys start[b] <= s <= q; a padding query sees itself only (an
        # all-masked row would give NaN, and NaN * 0 would leak into the real rows' outputs)
        mask = (keys <= slots[:, None]) & ((keys >= start[:, None, None]) | (keys == slots[:, None]))
        # mask: (B, T, L)
        x = self.embed(idx, pos)  # (B, T, C)
        for block in self.blocks:  # mask (B, 1, T, L): the same for every head
            x = block(x, t=t, mask=mask[:, None], pos=pos)
        x = torch.index_select(x, 1, last.reshape(1))[:, 0]  # (B, C)
        return self.head(self.ln_f(x))  # (B, V)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position, computed in at least float32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> f32; f64 stays
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def chunked_loss_fn(head, x: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """loss_fn(head(x), targets) over ``chunk`` positions at a time: only one chunk's (chunk, V)
    logits exist at once, never the (B, T, V) ones, and the backward recomputes each chunk's
    (activation checkpointing) instead of keeping them. The same log-softmax in at least float32
    per position; the mean is the sum of the chunks' sums over B * T (the last chunk may be
    shorter)."""
    C = x.shape[-1]
    x, targets = x.reshape(-1, C), targets.reshape(-1)  # (N, C), (N,)
    N = x.shape[0]

    def chunk_sum(xc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        logits = head(xc)  # (chunk, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, tc, reduction="sum")

    # a Python loop: torch.compile unrolls it into the one graph (the JAX twin needs lax.map)
    sums = [checkpoint(chunk_sum, x[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
            for i in range(0, N, chunk)]  # fmt: skip
    return torch.stack(sums).sum() / N


def lm_loss(model: GPT, x: torch.Tensor, targets: torch.Tensor, loss_chunk: int = 0) -> torch.Tensor:
    """The cross-entropy of the LM head on ``x``, the final norm's output (B, T, C): loss_fn on the
    whole (B, T, V) logits, or with ``loss_chunk`` > 0 chunked_loss_fn over that many positions."""
    if check_loss_chunk(loss_chunk):
        return chunked_loss_fn(model.head, x, targets, loss_chunk)
    return loss_fn(model.head(x), targets)


def model_loss(
    model: GPT, idx: torch.Tensor, targets: torch.Tensor, data_mean=None, loss_chunk: int = 0
) -> torch.Tensor:
    """The training loss: lm_loss, plus with an MoE MLP the router's load-balancing loss and z-loss
    (torch_impl/moe.py) times their config coefficients (``data_mean``: see router_losses)."""
    cfg = model.cfg
    if cfg.mlp != "moe":
        return lm_loss(model, model(idx, head=False), targets, loss_chunk)
    from torch_impl.moe import router_losses

    x, inter = model(idx, return_intermediates=True, head=False)
    balance, z_loss = router_losses([inter[f"blocks.{i}.router_logits"] for i in range(cfg.n_layers)], cfg, data_mean)
    return lm_loss(model, x, targets, loss_chunk) + cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z_loss
