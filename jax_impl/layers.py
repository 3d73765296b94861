"""The Linear every Flax module of the twins builds from, its init pinned. Twin of
torch_impl/layers.py. Its own module because both block.py and moe.py (which block.py builds on) use it.
"""

from __future__ import annotations

from flax import nnx

from twin_common import BlockConfig


def linear(
    d_in: int, d_out: int, cfg: BlockConfig, bias: bool, *, param_dtype, rngs: nnx.Rngs
) -> nnx.Linear:
    """nnx.Linear with the project's init pinned: normal(0, init_std) kernel, zero bias.

    Flax's default is lecun-normal kernel and zero bias; torch's is kaiming-uniform for weight *and*
    bias. Neither is used. The kernel is stored (in, out); torch stores its weight (out, in).
    """
    return nnx.Linear(
        d_in, d_out,
        use_bias=bias,
        kernel_init=nnx.initializers.normal(stddev=cfg.init_std),
        bias_init=nnx.initializers.zeros_init(),
        param_dtype=param_dtype,
        rngs=rngs,
    )
