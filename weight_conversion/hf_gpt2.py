"""GPT-2 checkpoints in transformers' layout, into and out of either twin.

A transformers GPT-2 directory holds ``config.json`` and ``model.safetensors``. Its weights go
through two tables: ``hf_gpt2_table`` (fused ``c_attn`` split into q/k/v, Conv1D's (in, out)
transposed) to the twin's torch layout, then the twin table (``table.py``) to either framework.

    cfg = gpt2_config_from_dir("gpt2/")                 # config.json -> GPTConfig
    model = GPT(cfg)                                    # either twin
    import_hf_gpt2(model, "gpt2/", verify=True)        # checked, then run against a NumPy GPT-2
    export_hf_gpt2(model, "out/")                       # GPT2LMHeadModel.from_pretrained("out/") loads it

Every problem is reported at once (config fields the twins do not compute; missing, unexpected,
wrong-shape, wrong-dtype and non-finite tensors) and the model is left untouched. ``verify=True``
runs the imported twin against ``twin_common.reference.gpt2_forward``, a float64 NumPy GPT-2 that
reads transformers' arrays directly (fused ``c_attn`` as is, Conv1D as ``x @ W``) and config.json
itself (epsilon, GELU kind, layers, heads), and so shares no code and no mapped value with the
tables and the config mapping it checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np

from twin_common import GPTConfig
from twin_common.config import RUNTIME_FIELDS, config_differences
from weight_conversion.hf_gpt2_table import hf_gpt2_table, to_hf, to_twin
from twin_common.files import umask, write_atomic
from weight_conversion.safetensors_io import CheckpointError, load_file, save_file
from weight_conversion.validate import ConversionError, find_problems_by_shape

__all__ = ["export_hf_gpt2", "gpt2_config_from_dir", "gpt2_config_from_hf", "import_hf_gpt2", "hf_config_from_gpt"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint: {"weight_map": {key: shard file}}
PREFIX = "transformer."  # GPT2LMHeadModel's keys; a saved GPT2Model, and the hub's "gpt2" file, have none

# activation_function -> the twins' gelu_approximate. Measured on the 2-core CPU (torch 2.13) over
# 2,000,001 points in [-10, 10], float32: "gelu_new" (transformers' own tanh formula) and
# "gelu_pytorch_tanh" (F.gelu(approximate="tanh"), what the torch twin runs) differ by 4.8e-7, one
# ulp; both are 6.7e-7 from a float64 tanh GELU. Exact "gelu" is 4.7e-4 from them: a different function.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
TO_ACTIVATION = {"tanh": "gelu_new", "none": "gelu"}

# Fields that change what GPT2LMHeadModel computes, with the value the twins compute. Any other value
# is refused, each field named. (transformers' GPT2Config defaults in parentheses.)
COMPUTED = {
    "scale_attn_weights": True,  # (True) scores / sqrt(head size); False drops the scale
    "scale_attn_by_inverse_layer_idx": False,  # (False) True also divides layer i's scores by i + 1
    "reorder_and_upcast_attn": False,  # (False) True runs another attention path (scaled q, fp32 upcast)
    "add_cross_attention": False,  # (False) True adds encoder-decoder attention the twins do not have
}
# Fields read into the GPTConfig: transformers name -> (twin field, GPT2Config default).
MAPPED = {
    "vocab_size": ("vocab_size", 50257),
    "n_positions": ("block_size", 1024),
    "n_embd": ("d_model", 768),
    "n_layer": ("n_layers", 12),
    "n_head": ("n_heads", 12),
    "layer_norm_epsilon": ("ln_eps", 1e-5),
    "attn_pdrop": ("attn_dropout", 0.1),
    "resid_pdrop": ("resid_dropout", 0.1),
    "initializer_range": ("init_std", 0.02),
    "tie_word_embeddings": ("tie_embeddings", True),
}


def gpt2_config_from_hf(hf_config: dict) -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 config (config.json as a dict; absent fields take
    GPT2Config's defaults). Raises ValueError naming every field the twins do not compute."""
    if not isinstance(hf_config, dict):
        raise ValueError(f"a GPT-2 config is a JSON object (dict), got {type(hf_config).__name__}")

    def get(name: str, default):  # absent or null: GPT2Config's default
        value = hf_config.get(name)
        return default if value is None else value

    problems = []
    if hf_config.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type is {hf_config['model_type']!r}, not 'gpt2'")
    for name, computed in COMPUTED.items():
        if name in hf_config and hf_config[name] != computed:
            problems.append(f"{name}={hf_config[name]!r}: the twins compute only {name}={computed!r}")
    activation = get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        problems.append(f"activation_function={activation!r}: the twins compute only {sorted(ACTIVATIONS)}")
    fields = {twin: get(hf, default) for hf, (twin, default) in MAPPED.items()}
    n_inner = hf_config.get("n_inner")  # None: 4 * n_embd
    d_model = fields["d_model"]
    mlp_ratio = 4
    if n_inner is not None:
        if isinstance(d_model, int) and d_model > 0 and isinstance(n_inner, int) and n_inner % d_model == 0:
            mlp_ratio = n_inner // d_model
        else:
            problems.append(f"n_inner={n_inner!r}: the twins' MLP width is a whole multiple of n_embd={d_model!r}")
    embd_pdrop = get("embd_pdrop", 0.1)
    if embd_pdrop != fields["resid_dropout"]:
        problems.append(
            f"embd_pdrop={embd_pdrop!r} differs from resid_pdrop={fields['resid_dropout']!r}: the twins apply "
            f"resid_dropout to the embeddings too (set both to one value; inference uses neither)"
        )
    if problems:
        raise ValueError("GPT-2 config not supported by the twins:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        return GPTConfig(
            **fields, mlp_ratio=mlp_ratio, bias=True, gelu_approximate=ACTIVATIONS[activation], attn_impl="fused"
        )
    except ValueError as e:
        raise ValueError(f"GPT-2 config gives an invalid GPTConfig: {e}") from None


def gpt2_config_from_dir(directory: str | os.PathLike) -> GPTConfig:
    """``gpt2_config_from_hf`` of ``directory/config.json``."""
    return gpt2_config_from_hf(read_config(directory))


def hf_config_from_gpt(cfg: GPTConfig) -> dict:
    """The config.json that makes transformers' GPT2LMHeadModel compute what a twin of ``cfg`` computes."""
    hf_gpt2_table(cfg)  # raises for what has no GPT-2 layout (bias=False)
    doc = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    doc.update({hf: getattr(cfg, twin) for hf, (twin, _) in MAPPED.items()})
    doc.update(COMPUTED)
    doc.update(
        activation_function=TO_ACTIVATION[cfg.gelu_approximate],
        n_inner=None if cfg.mlp_ratio == 4 else cfg.mlp_ratio * cfg.d_model,
        embd_pdrop=cfg.resid_dropout,  # the twins drop the embedding sum with resid_dropout
        # 50256 is <|endoftext|> in GPT-2's tokenizer; another vocabulary has no known special token.
        bos_token_id=50256 if cfg.vocab_size == 50257 else None,
        eos_token_id=50256 if cfg.vocab_size == 50257 else None,
    )
    return doc


# ------------------------------------------------------------------------------------------- read


def read_config(directory) -> dict:
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no {CONFIG_FILE} in {os.fspath(directory)} (a transformers model directory has one)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _is_causal_mask_buffer(key: str) -> bool:
    """Older GPT-2 files store each layer's causal mask as "h.{i}.attn.bias" (the hub's "gpt2":
    transformers PR #24113) and "h.{i}.attn.masked_bias" (vLLM PR #271 lists files with both).
    They are constants, not weights: transformers ignores them on load
    (GPT2PreTrainedModel._keys_to_ignore_on_load_unexpected), and so does this importer."""
    parts = key.split(".")
    return len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias")


def read_weights(directory: str) -> tuple[dict[str, np.ndarray], list[str]]:
    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.exists(single) or not os.path.exists(index):
        return load_file(single)[0], []
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    arrays, problems = {}, []
    for shard in shards:
        if os.path.basename(shard) != shard:  # the index names files in this folder, nothing else
            raise CheckpointError(f"{index} names a shard outside its folder: {shard!r}")
        for key, array in load_file(os.path.join(directory, shard))[0].items():
            if weight_map.get(key) != shard:
                problems.append(f"{key!r} is in {shard} but the index puts it in {weight_map.get(key)!r}")
            arrays[key] = array
    problems += [f"the index lists {k!r} but {v} does not hold it" for k, v in weight_map.items() if k not in arrays]
    return arrays, problems


def read_hf_arrays(
    directory, cfg, *, prefix: str = PREFIX, embedding: str = "wte.weight", ignore=_is_causal_mask_buffer
) -> tuple[dict[str, np.ndarray], list[str]]:
    """(arrays keyed without ``prefix``, problems) from ``directory/model.safetensors`` or, where
    there is none, from the shards that ``model.safetensors.index.json`` lists. Keys for which
    ``ignore`` is true (constant buffers) are dropped; a tied head's saved copy must equal
    ``embedding`` and is dropped too."""
    arrays, problems = read_weights(os.fspath(directory))
    out = {}
    for key, array in arrays.items():
        name = key.removeprefix(prefix)
        if name in out:
            problems.append(f"both {name!r} and {prefix + name!r} are present")
        elif not ignore(name):
            out[name] = array
    if cfg.tie_embeddings and "lm_head.weight" in out:  # tied: a copy of the embedding, if saved at all
        head = out.pop("lm_head.weight")
        wte = out.get(embedding)
        if wte is None or head.shape != wte.shape or not np.array_equal(head, wte):
            problems.append(f"'lm_head.weight' differs from {embedding!r} but the config ties them (tie_word_embeddings)")
    return out, problems


def import_hf_gpt2(model, directory: str | os.PathLike, *, verify: bool = False) -> None:
    """Load a transformers GPT-2 directory into either twin (built from a matching GPTConfig).

    Every problem (config fields, then missing / unexpected / wrong-shape / wrong-dtype / non-finite
    tensors) comes back in one ConversionError and the model is untouched. ``verify=True`` then runs
    the twin against the float64 NumPy GPT-2 of ``twin_common.reference`` on a probe input; on a
    divergence the old weights are restored and a VerificationError names the first sublayer."""
    from weight_conversion import import_
    from weight_conversion.verify import apply_verified
    from twin_common.frameworks import model_dtype

    where = os.fspath(directory)
    hf_cfg = gpt2_config_from_dir(directory)
    problems = config_differences(
        hf_cfg.to_dict(), model.cfg.to_dict(), what="config", where=where, ignore=RUNTIME_FIELDS
    )
    if problems:
        raise ConversionError(problems, f"transformers GPT-2 directory {where}")
    table = hf_gpt2_table(model.cfg)
    arrays, problems = read_hf_arrays(directory, model.cfg)
    dtype = model_dtype(model)
    problems += find_problems_by_shape(
        arrays, {s.hf_key: s.hf_shape for s in table}, dtype, layout="transformers layout"
    )
    if problems:
        raise ConversionError(problems, f"transformers GPT-2 directory {where}")
    twin_arrays = to_twin(arrays, table)
    if not verify:
        return import_(model, twin_arrays)
    from twin_common.reference import gpt2_forward, read_gpt2_config

    # The reference reads config.json itself: nothing mapped by gpt2_config_from_hf reaches it.
    raw_config = read_gpt2_config(directory)
    apply_verified(
        model, lambda: import_(model, twin_arrays), lambda probe: gpt2_forward(arrays, probe, raw_config),
        what=f"import of {where}",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ write


# Files that hold a model's weights in a transformers folder (any framework, single or sharded):
# a stale one beside the new model.safetensors would be read instead of it, or with it.
STALE_WEIGHTS = re.compile(r"(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                           r"|(model\.safetensors|pytorch_model\.bin|tf_model\.h5|flax_model\.msgpack)\.index\.json")


def export_hf_gpt2(model, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` (GPT2LMHeadModel's keys,
    "transformer." prefix, tied head omitted as transformers saves it) from either twin.

    A new directory is built under a temporary name and renamed into place, so it appears complete
    or not at all; an empty one is filled. A folder that holds anything is refused (ValueError)
    unless ``overwrite``: then each file is replaced atomically, weights first, and every other
    weights file (old shards and their index, other frameworks' weights) is removed afterwards, so
    no loader can pick up the old model; other files (a tokenizer) are kept."""
    from weight_conversion import export
    from twin_common.frameworks import model_dtype

    directory, present = hf_directory_contents(directory, overwrite)
    doc = {**hf_config_from_gpt(model.cfg), "dtype": model_dtype(model)}  # from_pretrained keeps this dtype
    cfg_doc = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    arrays = to_hf(export(model), hf_gpt2_table(model.cfg))
    arrays = {(k if k == "lm_head.weight" else PREFIX + k): v for k, v in arrays.items()}
    write_hf_directory(directory, arrays, cfg_doc, present)


def hf_directory_contents(directory: str | os.PathLike, overwrite: bool) -> tuple[str, list[str]]:
    """(absolute path, names in it) of a folder an exporter may write: a path that is not a folder
    is refused, and so is a folder that holds anything unless ``overwrite`` (ValueError). Called
    before any conversion work, so a refusal costs nothing."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory} exists and is not a directory")
    present = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise ValueError(f"{directory} is not empty ({shown}); pass overwrite=True (scripts.export: --overwrite) "
                         f"to replace the model in it, or choose an empty folder")  # fmt: skip
    return directory, present


def write_hf_directory(directory: str, arrays: dict, cfg_doc: bytes, present: list[str]) -> None:
    """``directory/model.safetensors`` and ``directory/config.json`` (``directory, present``: from
    hf_directory_contents). A new directory is built under a temporary name and renamed into place,
    so it appears complete or not at all; into an existing one each file is replaced atomically,
    weights first, and every other weights file in ``present`` is removed afterwards."""
    if os.path.isdir(directory):
        save_file(arrays, os.path.join(directory, WEIGHTS_FILE), {"format": "pt"})  # transformers needs "pt"
        write_atomic(os.path.join(directory, CONFIG_FILE), cfg_doc)
        # indexes first: a crash in between leaves model.safetensors, which loaders prefer anyway
        for name in sorted(present, key=lambda n: not n.endswith(".index.json")):
            if name != WEIGHTS_FILE and STALE_WEIGHTS.fullmatch(name):
                os.unlink(os.path.join(directory, name))
        return
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", suffix=".tmp", dir=parent)
    try:
        save_file(arrays, os.path.join(tmp, WEIGHTS_FILE), {"format": "pt"})
        write_atomic(os.path.join(tmp, CONFIG_FILE), cfg_doc)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700; give it what mkdir would
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
