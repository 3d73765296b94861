"""The Linear every PyTorch module of the twins builds from, its init pinned. Twin of
jax_impl/layers.py. Its own module because both block.py and moe.py (which block.py builds on) use it.
"""

from __future__ import annotations

from torch import nn

from twin_common import BlockConfig


def linear(d_in: int, d_out: int, cfg: BlockConfig, bias: bool) -> nn.Linear:
    """nn.Linear with the project's init pinned: normal(0, init_std) weight, zero bias.

    torch's default is kaiming-uniform for weight *and* bias; Flax's is lecun-normal kernel and zero
    bias. Neither is used. The weight is stored (out, in); Flax stores its kernel (in, out).
    """
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(layer.weight, mean=0.0, std=cfg.init_std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
