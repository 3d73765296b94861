"""The named models every command line offers: one name, one model, in every script. A script offers
the subset it can run (``--model`` / ``--models`` choices), never its own variant under a shared name.
"""

from __future__ import annotations

from twin_common.config import GPTConfig

PRESETS: dict[str, GPTConfig] = {
    # byte-level models (vocabulary 256: no tokenizer), exact GELU
    "tiny": GPTConfig(vocab_size=256, block_size=32, n_layers=1, d_model=32, n_heads=2),
    "small": GPTConfig(vocab_size=256, block_size=64, n_layers=2, d_model=128, n_heads=4),
    "wide": GPTConfig(vocab_size=256, block_size=64, n_layers=4, d_model=256, n_heads=4),
    # the generation benchmark's small model: context long enough for prompt 128 + 128 new tokens,
    # tanh GELU as GPT-2 (transformers' GPT2LMHeadModel runs the same weights)
    "small-4x128": GPTConfig(vocab_size=256, block_size=256, n_layers=4, d_model=128, n_heads=4,
                             gelu_approximate="tanh"),  # fmt: skip
    # GPT-2 124M's graph (12 blocks, tied head, tanh GELU) at width 8 and a byte vocabulary: the
    # arithmetic is negligible, so a decode step's time is what the host spends per step
    "gpt2-graph": GPTConfig(vocab_size=256, block_size=256, n_layers=12, d_model=8, n_heads=2,
                            gelu_approximate="tanh"),  # fmt: skip
    # GPT-2 124M itself (its checkpoints load), and nanoGPT's training shape of it (vocabulary padded
    # to 50304, exact GELU: GPT-2's checkpoints do not load)
    "gpt2": GPTConfig.gpt2_124m(),
    "gpt2-padded": GPTConfig.nanogpt_124m_padded(),
    # the Llama block (RMSNorm, rotary positions, grouped-query attention, SwiGLU, no biases) and
    # its routed-MLP form, byte-level; Mixtral's proportions at a size a benchmark can run
    "llama-tiny": GPTConfig.llama_tiny(),
    # SmolLM2-135M's shape (30 layers of 576, 9 query heads sharing 3 key/value heads, vocabulary
    # 49152, context 8192, tied head): a real small Llama for the benchmarks, random weights
    "smollm2-135m": GPTConfig.smollm2_135m(),
    "moe-tiny": GPTConfig.moe_tiny(),  # 4 SwiGLU experts, top-2, router losses in the training loss
    "mixtral-small": GPTConfig.mixtral_small(),  # dense-masked dispatch runs all 8 experts per token
}


def presets(*names: str) -> dict[str, GPTConfig]:
    """The named presets, in the order given: what one script offers."""
    return {name: PRESETS[name] for name in names}
