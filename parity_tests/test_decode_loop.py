"""The decode loops' host side: what each step costs the host and what it feeds the device.

torch: with CUDA graphs (compile="reduce-overhead") a step's outputs live in memory that the next
replay overwrites, so the loop marks each step's start and feeds the next step a copy of the token.
A stand-in for the compiled step, run on CPU, behaves as a CUDA graph does (it poisons its previous
output buffer before each replay) and checks the marking.
Flax: after warm-up a decode step hashes no GraphDef (hashing the model's graph definition costs
milliseconds per call on a GPU host) and copies nothing from the host to the device; with
loop="device" every decode step runs in one jitted call and gives the host loop's tokens."""

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
from twin_common.tolerances import tolerance_for  # noqa: E402

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


@pytest.mark.parametrize("sampling", SAMPLINGS + [Sampling(1.0)], ids=["greedy", "top-k+top-p", "temperature 1"])
def test_the_flax_device_loop_gives_the_host_loops_tokens_in_one_call(flax_model, sampling, monkeypatch):
    """loop="device": the prefill, then one device_loop call for the 11 other steps; the same uniforms,
    the same tokens as the host loop (and as torch's), logits within the float32 bound (measured
    equal bit for bit on the 2-core CPU: the loop body is the host loop's step)."""
    host = jg.run(flax_model, PROMPTS, 12, sampling, seed=3, record_logits=True)
    real, calls, seen = jg.device_loop, [], []
    monkeypatch.setattr(jg, "device_loop", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with jax.transfer_guard_host_to_device("disallow"):  # the per-call arrays are put explicitly, once
        device = jg.run(flax_model, PROMPTS, 12, sampling, seed=3, record_logits=True, loop="device",
                        on_step=lambda i, new: seen.append(i))  # fmt: skip
    assert calls == [1] and seen == list(range(12))
    assert device.tokens == host.tokens and device.steps == host.steps == 11
    np.testing.assert_array_equal(device.uniforms, host.uniforms)
    assert np.max(np.abs(device.logits - host.logits)) <= tolerance_for("float32").atol
    monkeypatch.undo()
    assert device.tokens == tg.generate(_torch_twin(flax_model), PROMPTS, 12, sampling, seed=3)


def test_the_flax_device_loop_compiles_once_for_every_length(flax_model):
    """The number of steps is traced (the per-call arrays have cache_len rows): other lengths reuse
    the compiled loop, and 1 new token (the prefill alone) never calls it."""
    sampling = Sampling(0.7, top_k=5)
    jg.run(flax_model, PROMPTS, 4, sampling, loop="device")
    before = jg.device_loop._cache_size()
    for n in (1, 2, 7, 20):
        gen = jg.run(flax_model, PROMPTS, n, sampling, seed=n, loop="device")
        assert gen.tokens == jg.run(flax_model, PROMPTS, n, sampling, seed=n).tokens, n
        assert [len(row) for row in gen.tokens] == [n, n]
    assert jg.device_loop._cache_size() == before


def test_the_device_loop_is_refused_where_it_cannot_run(flax_model):
    with pytest.raises(ValueError, match=r'loop="device" .* takes no stop_tokens'):
        jg.run(flax_model, PROMPTS, 4, loop="device", stop_tokens=[5])
    with pytest.raises(ValueError, match=r'loop must be "host" or "device", got \'gpu\''):
        jg.run(flax_model, PROMPTS, 4, loop="gpu")
    with pytest.raises(ValueError, match=r'the torch twin runs loop="host" only'):
        tg.run(_torch_twin(flax_model), PROMPTS, 4, loop="device")
