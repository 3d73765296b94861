"""scripts.generate as a user runs it (run folder, safetensors file, GPT-2 directory, bad input), and
the twins' greedy tokens against transformers' GPT-2 generate on the same weights."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import torch  # noqa: E402

import weight_conversion as wc  # noqa: E402
from twin_parity import train_harness as th  # noqa: E402
from scripts import generate as G  # noqa: E402
from scripts import train as T  # noqa: E402
from twin_common import GPTConfig  # noqa: E402
from twin_common.precision import matched_precision  # noqa: E402


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = T.main(["--framework", "torch", "--out", str(out), "--model", "tiny", "--steps", "3", "--batch-size", "4",
                   "--seq-len", "16", "--eval-every", "0", "--sample", "0", "--quiet"])  # fmt: skip
    assert code == 0
    return out


def test_compare_from_a_run_folder(run_folder, capsys):
    code = G.main(["--framework", "compare", "--checkpoint", str(run_folder), "--prompt", "The ", "--prompt", "1+",
                   "--max-new-tokens", "20", "--temperature", "0.9", "--top-k", "30", "--seed", "3"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "identical: yes" in out and "largest per-step logit difference" in out
    assert out.count("[torch] The ") == 1 and out.count("[jax] 1+") == 1
    assert "tokens/s" in err


def test_a_project_safetensors_file(tmp_path, capsys):
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layers=1, d_model=32, n_heads=2)
    path = tmp_path / "model.safetensors"
    wc.save(th.new_torch_gpt(cfg, "float32", 0), path)
    for framework in ("torch", "jax"):
        code = G.main(["--framework", framework, "--checkpoint", str(path), "--prompt", "hi", "--max-new-tokens", "8",
                       "--temperature", "0", "--quiet"])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.startswith("hi") and err == ""
    assert torch.is_grad_enabled(), "the script switched autograd off for the whole process"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "x" * 40], "exceeds the model's block_size"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "nan"], "top_p"),
        (["--top-k", "-2"], "top_k"),
        (["--prompt-ids", "1,999"], "outside the vocabulary"),
        (["--prompt-ids", "1,a"], "comma-separated integers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_folder, capsys, extra, message):
    argv = ["--framework", "torch", "--checkpoint", str(run_folder), "--max-new-tokens", "4", "--quiet"]
    if not any(a.startswith("--prompt") for a in extra):
        argv += ["--prompt", "ab"]
    code = G.main(argv + extra)
    _, err = capsys.readouterr()
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    code = G.main(["--framework", "jax", "--checkpoint", str(tmp_path), "--prompt", "a"])
    assert code == 2 and "neither a run folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------- transformers


def _hf_pair(cfg: GPTConfig):
    pytest.importorskip("transformers", reason="transformers is a test extra")
    from scripts.bench_generate import build

    return build(cfg, with_hf=True)


def test_greedy_tokens_equal_transformers_generate():
    """Both twins against GPT2LMHeadModel.generate(do_sample=False), weights mapped from the twins."""
    cfg = GPTConfig(vocab_size=97, block_size=48, n_layers=2, d_model=32, n_heads=4, gelu_approximate="tanh",
                    init_std=0.2)  # fmt: skip
    from jax_impl.generate import generate as jax_generate
    from torch_impl.generate import generate as torch_generate
    from twin_common.generation import Sampling

    with matched_precision():
        models = _hf_pair(cfg)
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)).tolist()
        with torch.no_grad():
            hf = models["hf"].generate(torch.tensor(prompts), attention_mask=torch.ones(2, 9, dtype=torch.long),
                                       max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)  # fmt: skip
        expected = hf[:, 9:].tolist()
        assert torch_generate(models["torch"], prompts, 30, Sampling(0.0)) == expected
        assert jax_generate(models["jax"], prompts, 30, Sampling(0.0)) == expected


def test_a_gpt2_directory(tmp_path, capsys):
    pytest.importorskip("weight_conversion.hf_gpt2", reason="GPT-2 import is not in this checkout yet")
    cfg = GPTConfig(vocab_size=97, block_size=48, n_layers=1, d_model=32, n_heads=4, gelu_approximate="tanh")
    models = _hf_pair(cfg)
    models["hf"].save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    code = G.main(["--framework", "compare", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7",
                   "--max-new-tokens", "12", "--temperature", "0"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "identical: yes" in out
    # ids without a tokenizer: the prompt's, a visible boundary, the 12 new ones (not "5 6 711 ...")
    rows = [line for line in out.splitlines() if line.startswith("[")]
    assert len(rows) == 2 and all(re.fullmatch(r"\[(torch|jax)\] 5 6 7 \| (\d+ ){11}\d+", r) for r in rows), rows
    code = G.main(["--framework", "torch", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7", "--quiet",
                   "--max-new-tokens", "3"])  # fmt: skip
    assert re.fullmatch(r"5 6 7 \| \d+ \d+ \d+\n", capsys.readouterr().out) and code == 0
    code = G.main(["--framework", "torch", "--checkpoint", str(tmp_path), "--prompt", "hello", "--quiet"])
    assert code == 2 and "--prompt-ids" in capsys.readouterr().err  # no tokenizer files in that folder


def test_a_gpt2_directory_is_verified_by_default(tmp_path, capsys, monkeypatch):
    """A k/v swap in the GPT-2 table's split loads without any name or shape error; the CLI's import
    runs the twin against a float64 reference computed from the file itself and refuses it (exit 2,
    naming the sublayer), unless --no-verify."""
    pytest.importorskip("weight_conversion.hf_gpt2", reason="GPT-2 import is not in this checkout yet")
    import dataclasses

    import weight_conversion.hf_gpt2 as hg
    import weight_conversion.hf_gpt2_table as ht
    from torch_impl.gpt import GPT

    cfg = GPTConfig(vocab_size=97, block_size=48, n_layers=1, d_model=32, n_heads=4, gelu_approximate="tanh",
                    init_std=0.2)  # fmt: skip
    torch.manual_seed(0)
    hg.export_hf_gpt2(GPT(cfg), tmp_path)
    original = ht.hf_gpt2_table

    def swapped(c):
        return tuple(dataclasses.replace(s, twin_keys=(s.twin_keys[0], s.twin_keys[2], s.twin_keys[1]))
                     if s.hf_key.endswith("attn.c_attn.weight") else s for s in original(c))  # fmt: skip

    monkeypatch.setattr(hg, "hf_gpt2_table", swapped)
    argv = ["--framework", "torch", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7",
            "--max-new-tokens", "2", "--temperature", "0", "--quiet"]  # fmt: skip
    assert G.main(argv) == 2
    err = capsys.readouterr().err
    assert "blocks.0.attn" in err, err
    assert G.main([*argv, "--no-verify"]) == 0


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_a_llama_or_mixtral_directory(tmp_path, capsys, family):
    """scripts.generate reads a transformers Llama or Mixtral folder by its model_type (grouped-query
    attention and rotary positions; routed experts), verifies it against the float64 NumPy model,
    and both twins continue the prompt with the same greedy tokens. A config.json that claims a
    billion layers beside a 1-layer file is refused from the headers, before any model is built."""
    import json

    pytest.importorskip("transformers")
    from twin_parity import hf_harness as hh
    from twin_parity import moe_harness as mh

    if family == "llama":
        hf = hh.new_hf_model(hh.llama_config(2, n_layers=1))
    else:
        hf = mh.new_mixtral(mh.mixtral_config(n_layers=1), 0)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    with matched_precision():
        code = G.main(["--framework", "compare", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7",
                       "--max-new-tokens", "6", "--temperature", "0"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "identical: yes" in out, out
    doc = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**doc, "num_hidden_layers": 10**9}))
    code = G.main(["--framework", "torch", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7"])
    err = capsys.readouterr().err
    assert code == 2 and "num_hidden_layers=1000000000, but the file holds 1 layer(s)" in err, err
    (tmp_path / "config.json").write_text(json.dumps({**doc, "model_type": "qwen2"}))
    code = G.main(["--framework", "torch", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7"])
    err = capsys.readouterr().err
    assert code == 2 and "model_type is 'qwen2'" in err and "gpt2, llama, mixtral" in err, err


def test_the_readme_generate_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Every `python -m scripts.generate` line of the README, as written, against a run folder of the
    README's training command (its default model; 2 steps instead of 300: the step count changes no
    size). The default --max-new-tokens fits the model's block_size after the prompt."""
    import shlex

    readme = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
    with open(readme, encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines() if line.startswith("python -m scripts.generate ")]
    commands = [c for c in commands if "runs/torch" in c]
    assert len(commands) >= 2, commands
    monkeypatch.chdir(tmp_path)
    assert T.main(["--framework", "torch", "--out", "runs/torch", "--steps", "2", "--eval-every", "0",
                   "--sample", "0", "--quiet"]) == 0  # fmt: skip
    for command in commands:
        code = G.main(shlex.split(command)[3:] + ["--quiet"])
        out, err = capsys.readouterr()
        assert code == 0, (command, err)
        assert out.strip(), command
    code = G.main(["--framework", "torch", "--checkpoint", "runs/torch", "--prompt", "The cat ", "--max-new-tokens", "64"])
    assert code == 2 and "exceeds the model's block_size=64" in capsys.readouterr().err
