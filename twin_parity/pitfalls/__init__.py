"""The pitfalls catalogue: numeric traps when porting between PyTorch and JAX/Flax, each with an
executable check that measures the trap's effect when it is ignored and the result with this
project's pin in place.

The checks live by what they prove: layers.py (each layer's defaults), attention.py, weights.py
(moving weights across), training.py (matmul precision, AdamW, dropout); common.py holds what they
share. Every number comes from running code (``measure_all()``); nothing here is a stored constant. Unless
a check says otherwise it runs on the lesson block (``BlockConfig.lesson(4)``, input (5, 8, 128)),
float32, eval mode, torch twin built and perturbed by the harness and its weights moved into the
Flax twin by the converter, both run under ``matched_precision()``.

Anything a check changes (a module attribute, a twin's method, torch's RNG, a precision context)
is restored before it returns.
"""

from __future__ import annotations

from twin_parity.pitfalls.attention import (
    check_attention_scale,
    check_bool_mask_meaning,
    check_softmax_dtype_bf16,
)
from twin_parity.pitfalls.common import Measurement, Pitfall, flax_layer_norm
from twin_parity.pitfalls.layers import (
    check_embed_dtype,
    check_flax_variable_api,
    check_gelu_approximate,
    check_init_schemes,
    check_layernorm_eps,
    check_layernorm_fast_variance,
)
from twin_parity.pitfalls.training import (
    check_adamw_defaults,
    check_dropout_rng,
    check_matmul_precision,
)
from twin_parity.pitfalls.weights import (
    check_bf16_numpy,
    check_fused_qkv_split,
    check_linear_layout,
)

__all__ = ["PITFALLS", "Measurement", "Pitfall", "flax_layer_norm", "measure_all"]

PITFALLS: tuple[Pitfall, ...] = (
    Pitfall(
        "layernorm-eps", "LayerNorm epsilon",
        "torch nn.LayerNorm adds eps = 1e-5 to the variance, Flax nnx.LayerNorm eps = 1e-6.",
        "BlockConfig.ln_eps = 1e-5 (twin_common/config.py) is passed to both twins' layer_norm() "
        "in torch_impl/block.py and jax_impl/block.py.",
        check_layernorm_eps,
    ),
    Pitfall(
        "layernorm-fast-variance", "LayerNorm fast variance",
        "nnx.LayerNorm defaults to use_fast_variance=True, E[x^2] - E[x]^2, which cancels "
        "catastrophically for inputs with a large mean; torch computes the two-pass E[(x - mean)^2].",
        "jax_impl/block.py layer_norm() passes use_fast_variance=False.",
        check_layernorm_fast_variance,
    ),
    Pitfall(
        "gelu-approximate", "GELU approximation",
        "jax.nn.gelu defaults to approximate=True (tanh), torch nn.GELU to approximate='none' (exact erf).",
        "BlockConfig.gelu_approximate = 'none' feeds nn.GELU(approximate=...) in torch_impl/block.py "
        "and, in jax_impl/block.py, exact_gelu (torch's erf formula) or jax.nn.gelu(approximate=True).",
        check_gelu_approximate,
    ),
    Pitfall(
        "linear-layout", "Linear weight layout",
        "torch nn.Linear stores weight as (out, in) and computes x @ W.T; Flax nnx.Linear stores "
        "kernel as (in, out) and computes x @ K, so a square weight copied as is loads without error.",
        "The conversion table (twin_common/params.py) marks every Linear weight Transform.TRANSPOSE.",
        check_linear_layout,
    ),
    Pitfall(
        "fused-qkv-split", "Fused QKV split order",
        "Checkpoints such as GPT-2's c_attn store q, k, v stacked in one (3C, C) weight; splitting "
        "it in another order (e.g. k, q, v) loads without error and computes wrong attention.",
        "Both twins keep separate q_proj/k_proj/v_proj, and the table in twin_common/params.py "
        "names each by key, so no split order is inferred.",
        check_fused_qkv_split,
    ),
    Pitfall(
        "attention-scale", "Attention score scale",
        "Scores must be scaled by 1/sqrt(d_head); 1/sqrt(d_model) (or no scale) is a common porting "
        "slip, and SDPA/dot_product_attention each apply their own default when none is given.",
        "CausalSelfAttention.scale = 1/sqrt(d_head) in both torch_impl/block.py and "
        "jax_impl/block.py, passed explicitly to every attention path.",
        check_attention_scale,
    ),
    Pitfall(
        "bool-mask-meaning", "Boolean attention mask meaning",
        "nn.MultiheadAttention's boolean attn_mask means True = masked out, "
        "F.scaled_dot_product_attention's means True = may attend.",
        "torch_impl/block.py calls SDPA with is_causal=True and no mask; the math paths build "
        "tril(...) with True = may attend in both twins.",
        check_bool_mask_meaning,
    ),
    Pitfall(
        "softmax-dtype-bf16", "Softmax dtype under bfloat16",
        "A softmax written out (exp, sum, divide) on bfloat16 scores rounds to bfloat16 at every "
        "step, while fused kernels and torch.softmax compute in float32 inside.",
        "math_attention() in torch_impl/block.py and jax_impl/block.py upcasts scores to at least "
        "float32 before the softmax.",
        check_softmax_dtype_bf16,
    ),
    Pitfall(
        "matmul-precision", "float32 matmul precision",
        "JAX's default float32 matmul precision is TF32 on Ampere/Hopper GPUs and bfloat16 passes "
        "on TPU, while torch keeps float32 matmuls in full float32 by default.",
        "twin_common/precision.py matched_precision() sets 'highest' in both frameworks around "
        "every parity check.",
        check_matmul_precision,
    ),
    Pitfall(
        "adamw-defaults", "AdamW defaults",
        "torch.optim.AdamW defaults to weight_decay=1e-2, optax.adamw to 1e-4, and optax decays "
        "every parameter unless given a mask.",
        "twin_common/train_config.py TrainConfig pins every hyperparameter and the decay mask comes "
        "from ParamSpec.decay (twin_common/params.py) in both torch_impl/train.py and "
        "jax_impl/train.py.",
        check_adamw_defaults,
    ),
    Pitfall(
        "dropout-rng", "Dropout random streams",
        "torch and JAX draw dropout masks from unrelated RNGs (a global Philox/MT state vs explicit "
        "keys), so the two frameworks' train-mode outputs cannot be matched.",
        "Parity checks run both twins in eval mode (harness.new_torch_block/new_flax_block call "
        ".eval()); training parity uses dropout 0.",
        check_dropout_rng,
    ),
    Pitfall(
        "bf16-numpy", "bfloat16 to NumPy",
        "NumPy has no bfloat16: a torch bfloat16 tensor's .numpy() raises TypeError, and a detour "
        "through float16 rounds values outside float16's range (tiny ones into subnormals or to 0, "
        "huge ones to inf).",
        "weight_conversion/torch_side.py tensor_to_numpy() reinterprets the bits as "
        "ml_dtypes.bfloat16 via int16.",
        check_bf16_numpy,
    ),
    Pitfall(
        "init-schemes", "Default initialisation",
        "torch nn.Linear defaults to kaiming-uniform weights (std 1/sqrt(3 fan_in)) and uniform "
        "biases, Flax nnx.Linear to lecun-normal kernels (std 1/sqrt(fan_in)) and zero biases.",
        "linear() in torch_impl/block.py and jax_impl/block.py inits every weight normal(0, "
        "BlockConfig.init_std = 0.02) and every bias zero.",
        check_init_schemes,
    ),
    Pitfall(
        "flax-variable-api", "Flax NNX Variable access",
        "Flax NNX moved Variable access: .value emits a DeprecationWarning in flax 0.12.8; arrays "
        "are read with var[...] and values with get_value()/set_value().",
        "The project reads and writes parameters only with [...], get_value() and set_value() "
        "(e.g. harness.new_flax_block, weight_conversion/flax_side.py).",
        check_flax_variable_api,
    ),
    Pitfall(
        "embed-dtype", "nnx.Embed output dtype",
        "nnx.Embed fixes its output dtype when it is built (dtype=None means the param dtype at "
        "construction), so after casting the parameters for bfloat16 compute it still returns "
        "float32; torch's nn.Embedding returns its weight's current dtype.",
        "jax_impl/gpt.py casts the embedding sum to the parameters' current dtype.",
        check_embed_dtype,
    ),
)  # fmt: skip


def measure_all() -> list[tuple[Pitfall, Measurement]]:
    return [(p, p.check()) for p in PITFALLS]
