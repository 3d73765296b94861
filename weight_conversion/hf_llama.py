"""transformers Llama checkpoints (``LlamaForCausalLM``), into and out of either twin.

A transformers Llama directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Its weights go through two tables: ``hf_llama_table`` (renames,
and the q/k row permutation when the twin uses the interleaved rope layout) to the twin's torch
layout, then the twin table (``table.py``) to either framework.

    cfg = llama_config_from_dir("smollm2/")             # config.json -> GPTConfig
    model = GPT(cfg)                                    # either twin
    import_hf_llama(model, "smollm2/", verify=True)     # checked, then run against a NumPy Llama
    export_hf_llama(model, "out/")                      # LlamaForCausalLM.from_pretrained("out/") loads it

Every config field the twins do not compute is refused, each named (rope scaling other than the
default, a head size other than hidden_size / num_attention_heads, an activation other than SiLU,
sliding windows and any field this importer does not know); every problem with the tensors is
reported at once and the model is left untouched. ``verify=True`` runs the imported twin against
``twin_common.reference.llama_forward``, a float64 NumPy Llama that reads transformers' arrays and
config.json directly and so shares no code with the tables it checks.
"""

from __future__ import annotations

import json
import os

from twin_common import GPTConfig
from twin_common.config import RUNTIME_FIELDS, config_differences
from weight_conversion.hf_gpt2 import hf_directory_contents, read_config, read_hf_arrays, write_hf_directory
from weight_conversion.hf_llama_table import hf_llama_table, to_hf, to_twin
from weight_conversion.validate import ConversionError, find_problems_by_shape

__all__ = ["export_hf_llama", "hf_config_from_llama", "import_hf_llama", "llama_config_from_dir", "llama_config_from_hf"]

PREFIX = "model."  # LlamaForCausalLM's keys (lm_head.weight has none)

# transformers name -> (twin field, LlamaConfig default): read into the GPTConfig.
MAPPED = {
    "vocab_size": ("vocab_size", 32000),
    "hidden_size": ("d_model", 4096),
    "intermediate_size": ("mlp_hidden", 11008),
    "num_hidden_layers": ("n_layers", 32),
    "num_attention_heads": ("n_heads", 32),
    "num_key_value_heads": ("n_kv_heads", None),  # None: num_attention_heads
    "max_position_embeddings": ("block_size", 2048),
    "rms_norm_eps": ("ln_eps", 1e-6),  # LlamaConfig's default is 1e-6; Llama 2 files say 1e-5
    "initializer_range": ("init_std", 0.02),
    "tie_word_embeddings": ("tie_embeddings", False),
    "attention_dropout": ("attn_dropout", 0.0),
    "attention_bias": ("attn_bias", False),  # q, k, v and o together
    "mlp_bias": ("mlp_bias", False),  # gate, up and down together
}
# Fields that change what LlamaForCausalLM computes, with the one value the twins compute.
COMPUTED = {"hidden_act": "silu", "pretraining_tp": 1, "model_type": "llama"}
# Fields that do not change the function of the weights (generation, tokenizer, bookkeeping).
IGNORED = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "_name_or_path", "output_hidden_states", "output_attentions",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "tokenizer_class", "torchscript", "_attn_implementation_autoset",
})  # fmt: skip
ROPE_DEFAULT_THETA = 10000.0  # LlamaConfig's; Llama 3 (500000) and SmolLM2 (100000) say otherwise


def _rope_theta(hf_config: dict, problems: list) -> float:
    """rope_theta from transformers 5's ``rope_parameters`` or 4.x's top-level ``rope_theta`` and
    ``rope_scaling``; any rope type but "default" (linear, dynamic, yarn, llama3, ...) is refused."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    theta = hf_config.get("rope_theta", ROPE_DEFAULT_THETA)
    for name, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, dict):
            problems.append(f"{name}={d!r} is not a JSON object")
            continue
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            problems.append(f"{name} rope_type={kind!r}: the twins compute only the default rotary embedding")
        extra = sorted(set(d) - {"rope_type", "type", "rope_theta"})
        if kind == "default" and extra:
            problems.append(f"{name} has {extra}: the twins compute only rope_theta")
        theta = d.get("rope_theta", theta)
    return theta


def llama_config_from_hf(hf_config: dict) -> GPTConfig:
    """The GPTConfig of a transformers Llama config (config.json as a dict; absent fields take
    LlamaConfig's defaults). Raises ValueError naming every field the twins do not compute."""
    return config_from_hf(hf_config, "Llama", MAPPED, COMPUTED, IGNORED, GPTConfig.llama)


def config_from_hf(hf_config: dict, family: str, mapped: dict, computed: dict, ignored, build) -> GPTConfig:
    """The GPTConfig of a Llama-family config.json (``family``: "Llama", "Mixtral"): ``mapped``
    fields read (absent: their defaults), ``computed`` ones held to the one value the twins compute,
    ``ignored`` ones skipped, any other with a value refused; every problem named at once. ``build``
    makes the config (GPTConfig.llama, GPTConfig.mixtral) from the twin fields and rope_theta."""
    if not isinstance(hf_config, dict):
        raise ValueError(f"a {family} config is a JSON object (dict), got {type(hf_config).__name__}")
    problems = []
    for name, value_computed in computed.items():
        value = hf_config.get(name, value_computed)
        if value != value_computed:
            problems.append(f"{name}={value!r}: the twins compute only {name}={value_computed!r}")
    fields = {twin: (default if hf_config.get(hf) is None else hf_config[hf]) for hf, (twin, default) in mapped.items()}
    theta = _rope_theta(hf_config, problems)
    C, nh = fields["d_model"], fields["n_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and isinstance(C, int) and isinstance(nh, int) and nh > 0 and head_dim * nh != C:
        problems.append(f"head_dim={head_dim!r}: the twins compute head size hidden_size / num_attention_heads = {C / nh:g}")
    known = set(mapped) | set(computed) | ignored | {"rope_theta", "rope_scaling", "rope_parameters", "head_dim"}
    for name in sorted(set(hf_config) - known):
        if hf_config[name] not in (None, False):  # sliding_window, layer_types, softcapping, ...
            problems.append(f"{name}={hf_config[name]!r}: the twins do not compute it")
    if problems:
        raise ValueError(f"{family} config not supported by the twins:\n" + "\n".join(f"  - {p}" for p in problems))
    if fields["n_kv_heads"] == nh:
        fields["n_kv_heads"] = None  # the twins' spelling of "one key/value head per query head"
    try:
        return build(**fields, rope_theta=float(theta) if isinstance(theta, int) else theta)
    except ValueError as e:
        raise ValueError(f"{family} config gives an invalid GPTConfig: {e}") from None


def llama_config_from_dir(directory: str | os.PathLike) -> GPTConfig:
    """``llama_config_from_hf`` of ``directory/config.json``."""
    return llama_config_from_hf(read_config(directory))


def hf_config_from_llama(cfg: GPTConfig) -> dict:
    """The config.json that makes transformers' LlamaForCausalLM compute what a twin of ``cfg``
    computes (whatever the twin's rope layout: the exported weights are half-split)."""
    hf_llama_table(cfg)  # raises for what has no Llama layout
    if cfg.resid_dropout:
        raise ValueError(f"resid_dropout={cfg.resid_dropout!r}: LlamaForCausalLM has no residual dropout")
    bc = cfg.block_config()
    twin = {**cfg.to_dict(), "n_kv_heads": cfg.kv_heads, "mlp_hidden": cfg.d_hidden,
            "attn_bias": bc.has_attn_bias, "mlp_bias": bc.has_mlp_bias}  # fmt: skip
    doc = {"architectures": ["LlamaForCausalLM"], **COMPUTED}
    doc.update({hf: twin[name] for hf, (name, _) in MAPPED.items()})
    doc.update(head_dim=cfg.d_head, rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
    return doc


def import_hf_llama(model, directory: str | os.PathLike, *, verify: bool = False) -> None:
    """Load a transformers Llama directory into either twin (built from a matching GPTConfig; its
    rope_layout may be either: interleaved twins get their q/k rows permuted).

    Every problem (config fields, then missing / unexpected / wrong-shape / wrong-dtype / non-finite
    tensors) comes back in one ConversionError and the model is untouched. ``verify=True`` then runs
    the twin against the float64 NumPy Llama of ``twin_common.reference`` on a probe input; on a
    divergence the old weights are restored and a VerificationError names the first sublayer."""
    from weight_conversion import import_
    from twin_common.frameworks import model_dtype
    from weight_conversion.verify import apply_verified

    where = os.fspath(directory)
    hf_doc = read_config(directory)
    hf_cfg = llama_config_from_hf(hf_doc)
    ignore = RUNTIME_FIELDS | {"rope_layout"}  # the layout is the twin's choice; the table permutes
    problems = config_differences(hf_cfg.to_dict(), model.cfg.to_dict(), what="config", where=where, ignore=ignore)
    if problems:
        raise ConversionError(problems, f"transformers Llama directory {where}")
    table = hf_llama_table(model.cfg)
    arrays, problems = read_hf_arrays(
        directory, model.cfg, prefix=PREFIX, embedding="embed_tokens.weight", ignore=_is_inv_freq_buffer
    )
    problems += find_problems_by_shape(
        arrays, {s.hf_key: s.hf_shape for s in table}, model_dtype(model), layout="transformers layout"
    )
    if problems:
        raise ConversionError(problems, f"transformers Llama directory {where}")
    twin_arrays = to_twin(arrays, table, model.cfg)
    if not verify:
        return import_(model, twin_arrays)
    from twin_common.reference import llama_forward

    apply_verified(
        model, lambda: import_(model, twin_arrays), lambda probe: llama_forward(arrays, probe, hf_doc),
        what=f"import of {where}",
    )  # fmt: skip


def _is_inv_freq_buffer(key: str) -> bool:
    """Files written by transformers before 4.31 hold each layer's rotary frequencies as
    "layers.{i}.self_attn.rotary_emb.inv_freq": a constant computed from rope_theta, not a weight
    (transformers drops it on load too)."""
    return key.endswith(".rotary_emb.inv_freq")


def export_hf_llama(model, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` (LlamaForCausalLM's keys,
    q/k rows in transformers' half-split layout, a tied head omitted as transformers saves it) from
    either twin, atomically; a non-empty folder only with ``overwrite`` (as ``export_hf_gpt2``)."""
    from weight_conversion import export
    from twin_common.frameworks import model_dtype

    directory, present = hf_directory_contents(directory, overwrite)  # refused before any work
    doc = {**hf_config_from_llama(model.cfg), "dtype": model_dtype(model)}  # from_pretrained keeps this dtype
    cfg_doc = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    arrays = to_hf(export(model), hf_llama_table(model.cfg), model.cfg)
    arrays = {(k if k == "lm_head.weight" else PREFIX + k): v for k, v in arrays.items()}
    write_hf_directory(directory, arrays, cfg_doc, present)
