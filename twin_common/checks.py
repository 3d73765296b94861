"""Input validation shared by both twins, so the same bad input gets the same ValueError on each."""

from __future__ import annotations

from twin_common.config import BlockConfig

# dtype names as both frameworks print them (str(torch.float32) is "torch.float32"; callers pass
# the bare name). float16 is accepted by the twins but has no parity target of its own.
SUPPORTED_DTYPES = ("float32", "float64", "bfloat16", "float16")


def check_block_input(
    shape: tuple[int, ...], dtype: str, param_dtype: str, cfg: BlockConfig
) -> None:
    """Raise ValueError if an input of this shape and dtype cannot go through a block of ``cfg``.

    ``dtype`` and ``param_dtype`` are bare dtype names ("float32", "bfloat16", ...). The input dtype
    must equal the parameter dtype: torch would raise a cryptic matmul error and Flax would silently
    promote, so both twins refuse instead and the caller converts one or the other.
    """
    if len(shape) != 3:
        raise ValueError(
            f"expected input of shape (batch, seq, d_model) = (B, T, {cfg.d_model}), "
            f"got rank {len(shape)} shape {tuple(shape)}"
        )
    batch, seq, width = shape
    if width != cfg.d_model:
        raise ValueError(
            f"input last dimension is {width}, but the block has d_model={cfg.d_model}"
        )
    if seq > cfg.block_size:
        raise ValueError(
            f"input sequence length {seq} exceeds the configured block_size={cfg.block_size}"
        )
    if batch < 1 or seq < 1:
        raise ValueError(f"input has an empty batch or sequence dimension: shape {tuple(shape)}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"unsupported input dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    if dtype != param_dtype:
        raise ValueError(
            f"input dtype {dtype} does not match the block's parameter dtype {param_dtype}; "
            f"cast the input or convert the model first"
        )


def check_token_input(shape: tuple[int, ...], dtype: str, cfg, value_range=None) -> None:
    """Raise ValueError unless token ids of this shape/dtype can go through a GPT of ``cfg``.

    ``value_range`` is (min, max) of the ids when the caller can see them (not under jax.jit, where
    they are abstract). Out-of-range ids matter because torch raises on them while JAX's gather does
    not: nnx.Embed returns NaN rows for ids >= vocab_size and wraps negative ids to the end of the
    table. Under jit the JAX Trainer checks the NumPy batch before it goes to the device.
    """
    if len(shape) != 2:
        raise ValueError(f"expected token ids of shape (batch, seq), got rank {len(shape)} shape {tuple(shape)}")
    batch, seq = shape
    if batch < 1 or seq < 1:
        raise ValueError(f"token ids have an empty batch or sequence dimension: shape {tuple(shape)}")
    if seq > cfg.block_size:
        raise ValueError(f"sequence length {seq} exceeds the configured block_size={cfg.block_size}")
    if not (dtype.startswith("int") or dtype.startswith("uint")):
        raise ValueError(f"token ids must be integers, got dtype {dtype}")
    if value_range is not None:
        low, high = value_range
        if low < 0 or high >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got values in [{low}, {high}]")


def check_loss_chunk(chunk) -> int:
    """The LM loss's chunk size (positions per chunk; 0: the whole (B, T, V) logits at once), or a
    ValueError. Any positive size works: B * T need not be a multiple of it (the last chunk is
    shorter), and one at or above B * T is a single chunk."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
        raise ValueError(f"loss_chunk must be an int >= 0 (0: no chunking), got {chunk!r}")
    return chunk
