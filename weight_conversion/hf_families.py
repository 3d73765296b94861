"""The transformers families the converter reads and writes, in one place: config.json's
``model_type`` -> the module (``weight_conversion.hf_<family>``) whose functions follow one naming
rule (``<family>_config_from_dir``, ``import_hf_<family>``, ``export_hf_<family>``), and the family
a twin config is written as."""

from __future__ import annotations

import importlib

FAMILIES = {"gpt2": "GPT-2", "llama": "Llama", "mixtral": "Mixtral"}  # model_type -> name in messages


def family_of(cfg) -> str:
    """The transformers layout a twin config is exported as: Mixtral for an MoE MLP, Llama for
    rotary positions, GPT-2 otherwise (each exporter refuses, naming the field, a config its layout
    cannot hold)."""
    if cfg.mlp == "moe":
        return "mixtral"
    return "llama" if cfg.pos == "rope" else "gpt2"


def converter(family: str):
    """``weight_conversion.hf_<family>`` (ValueError naming the known families for another)."""
    if family not in FAMILIES:
        raise ValueError(f"no transformers converter for model_type {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"weight_conversion.hf_{family}")


def config_from_dir(family: str, directory):
    return getattr(converter(family), f"{family}_config_from_dir")(directory)


def import_hf(family: str, model, directory, *, verify: bool = False) -> None:
    getattr(converter(family), f"import_hf_{family}")(model, directory, verify=verify)


def export_hf(family: str, model, directory, *, overwrite: bool = False) -> None:
    getattr(converter(family), f"export_hf_{family}")(model, directory, overwrite=overwrite)
