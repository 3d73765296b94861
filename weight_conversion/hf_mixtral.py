"""transformers Mixtral checkpoints (``MixtralForCausalLM``), into and out of either twin.

A Mixtral directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Its weights go through two tables: ``hf_mixtral_table`` (renames,
and the per-expert ``w1 / w3 / w2`` matrices stacked into the twins' (E, ...) experts) to the twin's
torch layout, then the twin table (``table.py``) to either framework.

    cfg = mixtral_config_from_dir("mixtral/")             # config.json -> GPTConfig
    model = GPT(cfg)                                      # either twin
    import_hf_mixtral(model, "mixtral/", verify=True)     # checked, then run against a NumPy Mixtral
    export_hf_mixtral(model, "out/")                      # MixtralForCausalLM.from_pretrained("out/") loads it

Mixtral's router is the twins' with ``norm_topk_prob=True`` and no capacity (dropless); its config
has no field for either, so a twin with another setting has no Mixtral layout. Every config field the
twins do not compute is refused, each named (router jitter noise, sliding windows, rope scaling, a
head size other than hidden_size / num_attention_heads, an activation other than SiLU, any unknown
field). ``verify=True`` runs the imported twin against ``twin_common.reference.llama_forward``, whose
Mixtral branch reads the per-expert arrays and config.json directly (a gather dispatch, Mixtral's
top-k on probabilities), sharing no code with the tables it checks.
"""

from __future__ import annotations

import functools
import json
import os

from twin_common import GPTConfig
from twin_common.config import RUNTIME_FIELDS, config_differences
from weight_conversion.hf_gpt2 import hf_directory_contents, read_config, read_hf_arrays, write_hf_directory
from weight_conversion.hf_llama import IGNORED, config_from_hf
from weight_conversion.hf_mixtral_table import hf_mixtral_table, hf_shapes, to_hf, to_twin
from weight_conversion.validate import ConversionError, find_problems_by_shape

__all__ = ["export_hf_mixtral", "hf_config_from_mixtral", "import_hf_mixtral", "mixtral_config_from_dir",
           "mixtral_config_from_hf"]  # fmt: skip

PREFIX = "model."  # MixtralForCausalLM's keys (lm_head.weight has none)

# transformers name -> (twin field, MixtralConfig default in transformers 5.24)
MAPPED = {
    "vocab_size": ("vocab_size", 32000),
    "hidden_size": ("d_model", 4096),
    "intermediate_size": ("mlp_hidden", 14336),  # each expert's hidden width
    "num_hidden_layers": ("n_layers", 32),
    "num_attention_heads": ("n_heads", 32),
    "num_key_value_heads": ("n_kv_heads", 8),
    "max_position_embeddings": ("block_size", 4096 * 32),
    "rms_norm_eps": ("ln_eps", 1e-5),
    "initializer_range": ("init_std", 0.02),
    "tie_word_embeddings": ("tie_embeddings", False),
    "attention_dropout": ("attn_dropout", 0.0),
    "num_local_experts": ("n_experts", 8),
    "num_experts_per_tok": ("top_k", 2),
    "router_aux_loss_coef": ("router_aux_loss_coef", 0.001),
}
# Fields that change what MixtralForCausalLM computes, with the one value the twins compute.
COMPUTED = {"hidden_act": "silu", "model_type": "mixtral", "router_jitter_noise": 0.0, "sliding_window": None}
ROPE_DEFAULT_THETA = 1e6  # MixtralConfig's
MIXTRAL_IGNORED = IGNORED | {"output_router_logits"}  # whether forward returns router logits: not the function


def mixtral_config_from_hf(hf_config: dict) -> GPTConfig:
    """The GPTConfig of a transformers Mixtral config (config.json as a dict; absent fields take
    MixtralConfig's defaults). Raises ValueError naming every field the twins do not compute."""
    with_default_theta = {"rope_theta": ROPE_DEFAULT_THETA, **hf_config} if isinstance(hf_config, dict) else hf_config
    build = functools.partial(GPTConfig.mixtral, router_z_loss_coef=0.0)  # Mixtral has no z-loss
    return config_from_hf(with_default_theta, "Mixtral", MAPPED, COMPUTED, MIXTRAL_IGNORED, build)


def mixtral_config_from_dir(directory: str | os.PathLike) -> GPTConfig:
    """``mixtral_config_from_hf`` of ``directory/config.json``."""
    return mixtral_config_from_hf(read_config(directory))


def hf_config_from_mixtral(cfg: GPTConfig) -> dict:
    """The config.json that makes transformers' MixtralForCausalLM compute what a twin of ``cfg``
    computes. (router_z_loss_coef, a training setting Mixtral's config has no field for, is not
    written.)"""
    hf_mixtral_table(cfg)  # raises for what has no Mixtral layout
    if cfg.resid_dropout:
        raise ValueError(f"resid_dropout={cfg.resid_dropout!r}: MixtralForCausalLM has no residual dropout")
    if cfg.rope_layout != "half":
        raise ValueError(f"rope_layout={cfg.rope_layout!r}: export a Mixtral from a half-split (transformers) twin")
    twin = {**cfg.to_dict(), "n_kv_heads": cfg.kv_heads, "mlp_hidden": cfg.d_hidden}
    doc = {"architectures": ["MixtralForCausalLM"], **COMPUTED}
    doc.update({hf: twin[name] for hf, (name, _) in MAPPED.items()})
    doc.update(head_dim=cfg.d_head, rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
    return doc


def import_hf_mixtral(model, directory: str | os.PathLike, *, verify: bool = False) -> None:
    """Load a transformers Mixtral directory into either twin (built from a matching GPTConfig).

    Every problem (config fields, then missing / unexpected / wrong-shape / wrong-dtype / non-finite
    tensors, each expert's named) comes back in one ConversionError and the model is untouched.
    ``verify=True`` then runs the twin against the float64 NumPy Mixtral on a probe input; on a
    divergence (router logits included) the old weights are restored and a VerificationError names
    the first sublayer."""
    from weight_conversion import import_
    from twin_common.frameworks import model_dtype
    from weight_conversion.verify import apply_verified

    where = os.fspath(directory)
    hf_doc = read_config(directory)
    hf_cfg = mixtral_config_from_hf(hf_doc)
    problems = config_differences(hf_cfg.to_dict(), model.cfg.to_dict(), what="config", where=where, ignore=RUNTIME_FIELDS)
    if problems:
        raise ConversionError(problems, f"transformers Mixtral directory {where}")
    if model.cfg.rope_layout != "half":
        raise ConversionError([f"rope_layout={model.cfg.rope_layout!r}: import into a half-split twin"], where)
    table = hf_mixtral_table(model.cfg)
    arrays, problems = read_hf_arrays(directory, model.cfg, prefix=PREFIX, embedding="embed_tokens.weight",
                                      ignore=lambda key: False)  # fmt: skip
    problems += find_problems_by_shape(arrays, hf_shapes(table), model_dtype(model), layout="transformers layout")
    if problems:
        raise ConversionError(problems, f"transformers Mixtral directory {where}")
    twin_arrays = to_twin(arrays, table)
    if not verify:
        return import_(model, twin_arrays)
    from twin_common.reference import llama_forward

    apply_verified(
        model, lambda: import_(model, twin_arrays), lambda probe: llama_forward(arrays, probe, hf_doc),
        what=f"import of {where}",
    )  # fmt: skip


def export_hf_mixtral(model, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` (MixtralForCausalLM's
    per-expert keys, a tied head omitted as transformers saves it) from either twin, atomically; a
    non-empty folder only with ``overwrite`` (as ``export_hf_gpt2``)."""
    from weight_conversion import export
    from twin_common.frameworks import model_dtype

    directory, present = hf_directory_contents(directory, overwrite)  # refused before any work
    doc = {**hf_config_from_mixtral(model.cfg), "dtype": model_dtype(model)}
    cfg_doc = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    arrays = to_hf(export(model), hf_mixtral_table(model.cfg))
    arrays = {(k if k == "lm_head.weight" else PREFIX + k): v for k, v in arrays.items()}
    write_hf_directory(directory, arrays, cfg_doc, present)
