"""Check a config against the tensor headers of the file it came with, before any model is built.

A config drives allocation: a GPT-2 ``config.json`` saying ``"n_layer": 1000000000`` (or a huge
``n_positions`` or ``vocab_size``) next to a 2-layer ``model.safetensors`` would build a model of
gigabytes before the first weight is compared. The headers (names, dtypes, shapes; read with bounded
reads, no tensor data) say what the file holds, so every disagreement is found first and reported
together, and no table or model is made for a size the file does not have.

    check_fits(cfg, "gpt2", directory)     # a transformers GPT-2 directory (one file or shards)
    check_fits(cfg, "llama", directory)    # a transformers Llama directory ("mixtral": Mixtral)
    check_fits(cfg, "weights", path)       # weight_conversion.save's file, or a training checkpoint
"""

from __future__ import annotations

import json
import os
import re

from weight_conversion.validate import ConversionError

HF_PREFIX = {"gpt2": "transformer.", "llama": "model.", "mixtral": "model."}  # lm_head.weight has none
_LAYER = {"gpt2": re.compile(r"h\.(\d+)\."), "weights": re.compile(r"blocks\.(\d+)\."),
          "llama": re.compile(r"layers\.(\d+)\."), "mixtral": re.compile(r"layers\.(\d+)\.")}  # fmt: skip
# constants some transformers files carry besides the weights: GPT-2's causal mask, rotary inverse
# frequencies of older Llama files
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_EMBEDDING = {"gpt2": "wte.weight", "llama": "embed_tokens.weight", "mixtral": "embed_tokens.weight",
              "weights": "wte.weight"}  # fmt: skip


LLAMA_NAMES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_positions": "max_position_embeddings"}


def header_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from one safetensors file's header."""
    from weight_conversion.safetensors_io import read_header

    return {name: tuple(shape) for name, _, shape, _, _ in read_header(path).entries}


def gpt2_header_shapes(directory: str, family: str = "gpt2") -> dict[str, tuple[int, ...]]:
    """{name without the family's prefix ("transformer.", "model."): shape} of a transformers
    directory, from model.safetensors or from every shard its index lists (names checked to stay
    in the folder)."""
    from weight_conversion.hf_gpt2 import INDEX_FILE, WEIGHTS_FILE
    from weight_conversion.safetensors_io import CheckpointError

    single, index = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, INDEX_FILE)
    if os.path.exists(single) or not os.path.exists(index):
        files = [single]
    else:
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
        if not all(isinstance(n, str) and os.path.basename(n) == n for n in files):
            raise CheckpointError(f"{index} names a shard outside its folder")
        files = [os.path.join(directory, n) for n in files]
    shapes = {}
    for path in files:
        for name, shape in header_shapes(path).items():
            name = name.removeprefix(HF_PREFIX[family])
            if not _BUFFER.fullmatch(name):
                shapes[name] = shape
    return shapes


def config_problems(cfg, shapes: dict[str, tuple[int, ...]], layout: str) -> list[str]:
    """Every way ``cfg`` (a GPTConfig) disagrees with the tensors ``shapes`` describes. ``layout``:
    "gpt2", "llama", "mixtral" (transformers' names) or "weights" (the twins' torch layout). The sizes that drive
    allocation are compared first; the full table (one row per tensor) is made only when they agree,
    so its length is bounded by what the file holds."""
    def field(hf: str, twin: str) -> str:  # the config's own name for a size
        if layout == "weights":
            return twin
        return hf if layout == "gpt2" else LLAMA_NAMES.get(hf, hf)

    layers = {int(m.group(1)) for k in shapes if (m := _LAYER[layout].match(k))}
    problems = []
    held = f"{len(layers)} layer(s)" + (f" (numbered {min(layers)} to {max(layers)})" if layers else "")
    if cfg.n_layers != len(layers) or layers != set(range(len(layers))):
        problems.append(f"config {field('n_layer', 'n_layers')}={cfg.n_layers}, but the file holds {held}")
    embedding = _EMBEDDING[layout]
    sizes = [(embedding, (field("vocab_size", "vocab_size"), field("n_embd", "d_model")), (cfg.vocab_size, cfg.d_model))]
    if cfg.pos == "learned":  # rotary positions (the Llama family) have no position table
        sizes.append(
            ("wpe.weight", (field("n_positions", "block_size"), field("n_embd", "d_model")), (cfg.block_size, cfg.d_model))
        )
    for key, fields, want in sizes:
        got = shapes.get(key)
        if got is None:
            problems.append(f"the file has no {key!r} (expected shape {want})")
        elif tuple(got) != want:
            said = ", ".join(f"{f}={v}" for f, v in zip(fields, want))
            problems.append(f"config {said} means {key!r} of shape {want}, but the file's is {tuple(got)}")
    if problems:
        return problems
    if layout == "gpt2":
        from weight_conversion.hf_gpt2_table import hf_gpt2_table

        expected = {s.hf_key: tuple(s.hf_shape) for s in hf_gpt2_table(cfg)}
    elif layout == "llama":
        from weight_conversion.hf_llama_table import hf_llama_table

        expected = {s.hf_key: tuple(s.hf_shape) for s in hf_llama_table(cfg)}
    elif layout == "mixtral":
        from weight_conversion.hf_mixtral_table import hf_mixtral_table, hf_shapes

        expected = {k: tuple(v) for k, v in hf_shapes(hf_mixtral_table(cfg)).items()}
    else:
        from twin_common.params import table_for

        expected = {s.torch_key: tuple(s.torch_shape) for s in table_for(cfg)}
    if cfg.tie_embeddings and "lm_head.weight" in shapes:  # a tied head saved as a copy of wte
        expected["lm_head.weight"] = expected[embedding]
    problems += [f"missing tensor {k!r} (expected shape {s})" for k, s in expected.items() if k not in shapes]
    problems += [f"unexpected tensor {k!r}" for k in shapes if k not in expected]
    problems += [f"{k!r}: the config means shape {s}, the file's is {shapes[k]}"
                 for k, s in expected.items() if k in shapes and tuple(shapes[k]) != s]  # fmt: skip
    return problems


def check_fits(cfg, kind: str, path: str | os.PathLike) -> None:
    """Raise one ConversionError naming every disagreement between ``cfg`` and the file (``kind``
    "gpt2", "llama", "mixtral": a transformers directory of that family; "weights":
    weight_conversion.save's file; "train": a training
    checkpoint, whose weights are "model.<key>" beside AdamW's "optim." moments) before anything is
    allocated."""
    path = os.fspath(path)
    if kind in HF_PREFIX:
        shapes, layout = gpt2_header_shapes(path, kind), kind
    elif kind == "train":
        shapes = header_shapes(path)
        shapes, layout = {k.removeprefix("model."): s for k, s in shapes.items() if not k.startswith("optim.")}, "weights"
    else:
        shapes, layout = header_shapes(path), "weights"
    problems = config_problems(cfg, shapes, layout)
    if problems:
        raise ConversionError(problems, f"config of {path} against its tensors (checked before building the model)")
