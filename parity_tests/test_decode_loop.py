"""The decode loops' host side: what each step costs the host and what it feeds the device.

torch: with CUDA graphs (compile="reduce-overhead") a step's outputs live in memory that the next
replay overwrites, so the loop marks each step's start and feeds the next step a copy of the token.
A stand-in for the compiled step, run on CPU, behaves as a CUDA graph does (it poisons its previous
output buffer before each replay) and checks the marking.
Flax: after warm-up a decode step hashes no GraphDef (hashing the model's graph definition costs
milliseconds per call on a GPU host) and copies nothing from the host to the device."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch twin")
pytest.importorskip("flax", reason="the Flax twin")

import jax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import jax_impl.generate as jg  # noqa: E402
import torch_impl.generate as tg  # noqa: E402
import weight_conversion as wc  # noqa: E402
from jax_impl.gpt import GPT as FlaxGPT  # noqa: E402
from torch_impl.gpt import GPT as TorchGPT  # noqa: E402
from twin_common import GPTConfig  # noqa: E402
from twin_common.generation import Sampling  # noqa: E402

TINY = GPTConfig(vocab_size=64, block_size=32, n_layers=1, d_model=32, n_heads=2, init_std=0.2)
PROMPTS = [[1, 2, 3], [9]]
SAMPLINGS = [Sampling(0.0), Sampling(0.9, top_k=8, top_p=0.9)]


class GraphLikeStep:
    """tg.step as a CUDA graph runs it: outputs in one static buffer, rewritten by every replay;
    the previous replay's output is garbage once a new step has been marked."""

    def __init__(self, check_marks: bool = True):
        self.check_marks = check_marks
        self.token_buffer = None
        self.marks = self.calls = 0
        self.fed_own_output = False

    def mark(self):
        self.marks += 1

    def __call__(self, model, idx, *args, **kwargs):
        self.calls += 1
        assert self.marks == self.calls or not self.check_marks, "cudagraph_mark_step_begin() must precede every step"
        if self.token_buffer is not None:
            self.fed_own_output |= idx.untyped_storage().data_ptr() == self.token_buffer.untyped_storage().data_ptr()
            self.token_buffer.add_(1).remainder_(TINY.vocab_size)  # the replay overwrites the last output
        token, logits = tg.step(model, idx, *args, **kwargs)
        if self.token_buffer is None:
            self.token_buffer = token.clone()
        self.token_buffer.copy_(token)
        return self.token_buffer, logits


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_the_cuda_graph_loop_marks_each_step_and_feeds_a_copy_of_the_token(sampling, monkeypatch):
    torch.manual_seed(0)
    model = TorchGPT(TINY)
    eager = tg.generate(model, PROMPTS, 12, sampling, seed=3)
    fake = GraphLikeStep()
    monkeypatch.setitem(tg._COMPILED, "reduce-overhead", fake)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", fake.mark)
    graphed = tg.generate(model, PROMPTS, 12, sampling, seed=3, compile="reduce-overhead")
    assert fake.calls == 12 and fake.marks == 12
    assert not fake.fed_own_output, "the next step read the graph's output buffer, not a copy"
    assert graphed == eager


def test_the_stand_in_graph_corrupts_a_loop_that_feeds_the_output_back(monkeypatch):
    """The check above can fail: the same loop with the copy removed gives other tokens."""
    torch.manual_seed(0)
    model = TorchGPT(TINY)
    eager = tg.generate(model, PROMPTS, 12, Sampling(0.0))
    fake = GraphLikeStep(check_marks=False)  # the loop neither marks nor copies in this mode
    monkeypatch.setitem(tg._COMPILED, "max-autotune-no-cudagraphs", fake)
    corrupted = tg.generate(model, PROMPTS, 12, Sampling(0.0), compile="max-autotune-no-cudagraphs")
    assert fake.fed_own_output and corrupted != eager


@pytest.fixture(scope="module")
def flax_model():
    torch.manual_seed(0)
    model = FlaxGPT(TINY, rngs=nnx.Rngs(0))
    wc.import_(model, wc.export(TorchGPT(TINY)))
    return model


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled"])
def test_a_flax_decode_step_hashes_no_graph_and_copies_nothing_to_the_device(flax_model, sampling, monkeypatch):
    """Between the first and the last token, no GraphDef is hashed and nothing is put on the device
    (explicitly or implicitly: the transfer guard refuses implicit host-to-device copies)."""
    jg.run(flax_model, PROMPTS, 12, sampling, seed=3)  # warm-up: compiles prefill and decode
    graphdef_type = type(nnx.split(flax_model)[0])
    counts = {"hash": 0, "device_put": 0}
    real_hash, real_put = graphdef_type.__hash__, jax.device_put

    def counting_hash(self):
        counts["hash"] += 1
        return real_hash(self)

    def counting_put(*args, **kwargs):
        counts["device_put"] += 1
        return real_put(*args, **kwargs)

    monkeypatch.setattr(graphdef_type, "__hash__", counting_hash)
    monkeypatch.setattr(jax, "device_put", counting_put)
    seen = []
    with jax.transfer_guard_host_to_device("disallow"):
        gen = jg.run(flax_model, PROMPTS, 12, sampling, seed=3, on_step=lambda i, _: seen.append(dict(counts)))
    assert len(seen) == 12
    assert counts["hash"] >= 1 and counts["device_put"] >= 1, "the instrumentation saw nothing: it is broken"
    assert seen[-1] == seen[0], f"per step after the first: {seen[0]} -> {seen[-1]} in 11 steps"
    monkeypatch.undo()
    assert gen.tokens == tg.generate(_torch_twin(flax_model), PROMPTS, 12, sampling, seed=3)


def _torch_twin(flax_model):
    model = TorchGPT(TINY)
    wc.import_(model, wc.export(flax_model))
    return model
