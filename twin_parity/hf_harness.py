"""GPT-2 and Llama parity against transformers, shared by test_hf_gpt2.py, test_hf_llama.py and
``scripts.parity_report``.

transformers' ``GPT2LMHeadModel`` (or ``LlamaForCausalLM``) is built from a small ``GPT2Config``
(``LlamaConfig``) with random weights (no download), every parameter perturbed after init (its init
leaves biases at 0 and LayerNorm at 1, where a swapped bias or LayerNorm mapping would hide), saved
with ``save_pretrained``, imported into a twin with ``weight_conversion.hf_gpt2`` (``hf_llama``), and
both are run on the same token ids.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

from twin_parity.harness import PERTURB_STD, Result
from twin_common.precision import matched_precision
from twin_common.tolerances import tolerance_for

VOCAB, POSITIONS, WIDTH, HEADS = 96, 16, 32, 4  # tiny: the whole file runs in seconds
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# Not GPT-2's own epsilon (1e-5) nor its GELU ("gelu_new", tanh): a config mapping that drops either
# field gives the twins' defaults and passes every row built from GPT-2's config.
OTHER_CONFIG = {"layer_norm_epsilon": 1e-3, "activation_function": "gelu"}


def hf_config(n_layers: int = 2, attn_implementation: str = "eager", **overrides):
    from transformers import GPT2Config

    fields = dict(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH, n_layer=n_layers, n_head=HEADS,
        bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 is outside this vocabulary
    )  # fmt: skip
    fields.update(overrides)
    config = GPT2Config(**fields)
    config._attn_implementation = attn_implementation
    return config


# Llama: odd sizes, so that no two dimensions coincide and a swapped one fails on shape or values.
LLAMA_VOCAB, LLAMA_POSITIONS, LLAMA_WIDTH, LLAMA_HEADS, LLAMA_HIDDEN = 97, 24, 36, 6, 58


def llama_config(n_kv_heads: int, n_layers: int = 2, attn_implementation: str = "eager", **overrides):
    """A random small LlamaConfig: head size 6, rms_norm_eps 1e-5 and rope_theta 5000 (neither
    LlamaConfig's default, so a default quietly used instead of the file's value shows)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=LLAMA_VOCAB, max_position_embeddings=LLAMA_POSITIONS, hidden_size=LLAMA_WIDTH,
        intermediate_size=LLAMA_HIDDEN, num_hidden_layers=n_layers, num_attention_heads=LLAMA_HEADS,
        num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5, rope_theta=5000.0, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    fields.update(overrides)
    config = LlamaConfig(**fields)
    config._attn_implementation = attn_implementation
    return config


def new_hf_model(config, seed: int = 0):
    import torch
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    model = (LlamaForCausalLM if config.model_type == "llama" else GPT2LMHeadModel)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # tied: wte and lm_head are one tensor, perturbed once
            p.add_(PERTURB_STD * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def hf_run(model, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Logits and every hidden state, keyed like the twins' intermediates, in the order computed:
    transformers' hidden state 0 is the embedding sum, i (1 <= i < n) is block i-1's output and n
    is after ln_f, so the last block's own output is taken by a forward hook on that block (without
    it a 1-layer model would show only ``ln_f``, never ``blocks.0``)."""
    import torch

    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers  # GPT-2, Llama
    last = {}
    hook = blocks[-1].register_forward_hook(
        lambda module, args, out: last.update(h=out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(idx), output_hidden_states=True)
    finally:
        hook.remove()
    n = len(blocks)
    hidden = [*out.hidden_states[:n], last["h"], out.hidden_states[n]]
    names = ["embed", *(f"blocks.{i}" for i in range(n)), "ln_f"]
    found = {name: h.double().numpy() for name, h in zip(names, hidden)}
    found["logits"] = out.logits.double().numpy()
    return found


def new_twin(framework: str, cfg, dtype: str = "float32"):
    if framework == "torch":
        import torch

        from torch_impl.gpt import GPT

        return GPT(cfg).to(getattr(torch, dtype)).eval()
    import jax.numpy as jnp
    from flax import nnx

    from jax_impl.gpt import GPT

    model = GPT(cfg, param_dtype=getattr(jnp, dtype), rngs=nnx.Rngs(0))
    model.eval()
    return model


def twin_run(model, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The twin's logits and its intermediates at transformers' hidden-state points."""
    if hasattr(model, "parameters"):
        import torch

        with torch.no_grad():
            _, inter = model(torch.as_tensor(idx), return_intermediates=True)
        return {k: v.double().numpy() for k, v in inter.items()}
    _, inter = model(idx, return_intermediates=True)
    return {k: np.asarray(v, np.float64) for k, v in inter.items()}


def import_into(framework: str, directory: str, verify: bool = False, dtype: str = "float32"):
    from weight_conversion.hf_gpt2 import gpt2_config_from_dir, import_hf_gpt2

    model = new_twin(framework, gpt2_config_from_dir(directory), dtype)
    import_hf_gpt2(model, directory, verify=verify)
    return model


def import_llama_into(framework: str, directory: str, verify: bool = False, **switches):
    """A twin of the Llama in ``directory`` (``switches``: e.g. rope_layout="interleaved")."""
    from weight_conversion.hf_llama import import_hf_llama, llama_config_from_dir

    model = new_twin(framework, dataclasses.replace(llama_config_from_dir(directory), **switches))
    import_hf_llama(model, directory, verify=verify)
    return model


def token_ids(batch: int, seq: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)


def compare_logits(
    reference: dict, other: dict, dtype: str = "float32"
) -> tuple[float, float, float, bool, str | None, str | None]:
    """(max_abs_err, max_rel_err, tolerance, passed, first_divergence, detail) at the logits, the
    dtype's bound, every hidden-state point (embed, each block's output, ln_f) also held to it, in
    the order computed, to name the first divergence."""
    bound = tolerance_for(dtype).atol
    first = detail = None
    for key in reference:
        err = float(np.max(np.abs(reference[key] - other[key])))
        if not err <= bound:
            first, detail = key, f"{key}: {err:.2e} > {bound:.0e}"
            break
    err = float(np.max(np.abs(reference["logits"] - other["logits"])))
    peak = float(np.max(np.abs(reference["logits"])))
    return err, err / peak, bound, first is None, first, detail


def hf_gpt2_check(
    framework: str, n_layers: int, seq: int, attn_implementation: str, seed: int = 0, dtype: str = "float32",
    **overrides,
) -> Result:  # fmt: skip
    """transformers -> twin: import a saved GPT2LMHeadModel, compare logits and every hidden state
    (CPU). ``dtype`` float64 holds them to 1e-12, where a wrong GELU kind or epsilon cannot hide
    (tanh vs exact GELU moves this width-32 model's float32 logits by 7.9e-6, under 1e-5);
    ``overrides`` are GPT2Config fields (layer_norm_epsilon, activation_function)."""
    import torch
    from transformers.utils import logging

    hf = new_hf_model(hf_config(n_layers, attn_implementation, **overrides), seed).to(getattr(torch, dtype))
    idx = token_ids(2, seq, seed)
    logging.disable_progress_bar()  # save_pretrained's bar would interleave with the report's lines
    with matched_precision(x64=dtype == "float64"), tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        twin = import_into(framework, directory, dtype=dtype)
        reference, other = hf_run(hf, idx), twin_run(twin, idx)
    err, rel, bound, passed, first, detail = compare_logits(reference, other, dtype)
    name = f"gpt2 {n_layers}L T={seq}" + "".join(f" {SHORT.get(k, k)}={v}" for k, v in overrides.items())
    return Result(
        "hf_gpt2", [2, seq], dtype, "cpu" if framework == "torch" else None,
        "cpu" if framework == "jax" else None, f"transformers({attn_implementation})->{framework}",
        err, rel, bound, passed, first, detail,
        config={"model": name, "n_layers": n_layers, "n_heads": HEADS, "attn": attn_implementation, "seq": seq,
                **overrides},
    )  # fmt: skip


# transformers config fields as the table's model column shortens them
SHORT = {"layer_norm_epsilon": "eps", "activation_function": "act", "attention_bias": "bias",
         "tie_word_embeddings": "tied"}  # fmt: skip


def hf_llama_check(framework: str, n_kv_heads: int, rope_layout: str, seed: int = 0, **overrides) -> Result:
    """transformers -> twin: import a saved LlamaForCausalLM (2 layers, 6 heads of 6, n_kv_heads
    key/value heads, LlamaConfig ``overrides``) into a twin of ``rope_layout``, compare logits
    (float32, CPU)."""
    from transformers.utils import logging

    hf = new_hf_model(llama_config(n_kv_heads, **overrides), seed)
    idx = token_ids(2, LLAMA_POSITIONS, seed, LLAMA_VOCAB)
    logging.disable_progress_bar()
    with matched_precision(), tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        twin = import_llama_into(framework, directory, rope_layout=rope_layout)
        reference, other = hf_run(hf, idx), twin_run(twin, idx)
    return Result(
        "hf_llama", [2, LLAMA_POSITIONS], "float32", "cpu" if framework == "torch" else None,
        "cpu" if framework == "jax" else None, f"transformers->{framework} ({rope_layout} rope)",
        *compare_logits(reference, other),
        config={"model": f"llama kv={n_kv_heads}" + "".join(f" {SHORT.get(k, k)}" for k, v in overrides.items() if v),
                "n_heads": LLAMA_HEADS, "n_kv_heads": n_kv_heads, "rope_layout": rope_layout, **overrides},
    )  # fmt: skip
