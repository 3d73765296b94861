"""GPT-2 and Llama parity against transformers, shared by test_hf_gpt2.py, test_hf_llama.py and
``scripts.parity_report``.

transformers' ``GPT2LMHeadModel`` (or ``LlamaForCausalLM``) is built from a small ``GPT2Config`` with random weights (no
download), every parameter perturbed after init (its init leaves biases at 0 and LayerNorm at 1, where
a swapped bias or LayerNorm mapping would hide), saved with ``save_pretrained``, imported into a twin
with ``weight_conversion.hf_gpt2``, and both are run on the same token ids.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np

from parity_tests.harness import PERTURB_STD, Result
from twin_common.precision import matched_precision
from twin_common.tolerances import tolerance_for

VOCAB, POSITIONS, WIDTH, HEADS = 96, 16, 32, 4  # tiny: the whole file runs in seconds
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


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
    """Logits and the hidden states, keyed like the twins' intermediates: transformers' hidden
    state 0 is the embedding sum, i (1 <= i < n) is block i-1's output, n is after ln_f."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(idx), output_hidden_states=True)
    n = len(out.hidden_states) - 1
    names = ["embed", *(f"blocks.{i}" for i in range(n - 1)), "ln_f"]
    found = {name: h.double().numpy() for name, h in zip(names, out.hidden_states)}
    found["logits"] = out.logits.double().numpy()
    return found


def new_twin(framework: str, cfg):
    if framework == "torch":
        from torch_impl.gpt import GPT

        return GPT(cfg).eval()
    from flax import nnx

    from jax_impl.gpt import GPT

    model = GPT(cfg, rngs=nnx.Rngs(0))
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


def import_into(framework: str, directory: str, verify: bool = False):
    from weight_conversion.hf_gpt2 import gpt2_config_from_dir, import_hf_gpt2

    model = new_twin(framework, gpt2_config_from_dir(directory))
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


def compare_logits(reference: dict, other: dict) -> tuple[float, float, float, bool, str | None]:
    """(max_abs_err, max_rel_err, tolerance, passed, first_divergence) at the logits, float32 bound,
    every hidden-state point also held to it to name the first divergence."""
    bound = tolerance_for("float32").atol
    first = next((k for k in reference if not np.max(np.abs(reference[k] - other[k])) <= bound), None)
    err = float(np.max(np.abs(reference["logits"] - other["logits"])))
    peak = float(np.max(np.abs(reference["logits"])))
    return err, err / peak, bound, first is None, first


def hf_gpt2_check(framework: str, n_layers: int, seq: int, attn_implementation: str, seed: int = 0) -> Result:
    """transformers -> twin: import a saved GPT2LMHeadModel, compare logits (float32, CPU)."""
    from transformers.utils import logging

    hf = new_hf_model(hf_config(n_layers, attn_implementation), seed)
    idx = token_ids(2, seq, seed)
    logging.disable_progress_bar()  # save_pretrained's bar would interleave with the report's lines
    with matched_precision(), tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        twin = import_into(framework, directory)
        reference, other = hf_run(hf, idx), twin_run(twin, idx)
    return Result(
        "hf_gpt2", [2, seq], "float32", "cpu" if framework == "torch" else None,
        "cpu" if framework == "jax" else None, f"transformers({attn_implementation})->{framework}",
        *compare_logits(reference, other),
        config={"model": f"gpt2 {n_layers}L T={seq}", "n_layers": n_layers, "n_heads": HEADS,
                "attn": attn_implementation, "seq": seq},
    )  # fmt: skip


def hf_llama_check(framework: str, n_kv_heads: int, rope_layout: str, seed: int = 0) -> Result:
    """transformers -> twin: import a saved LlamaForCausalLM (2 layers, 6 heads of 6, n_kv_heads
    key/value heads) into a twin of ``rope_layout``, compare logits (float32, CPU)."""
    from transformers.utils import logging

    hf = new_hf_model(llama_config(n_kv_heads), seed)
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
        config={"model": f"llama kv={n_kv_heads}", "n_heads": LLAMA_HEADS, "n_kv_heads": n_kv_heads,
                "rope_layout": rope_layout},
    )  # fmt: skip
