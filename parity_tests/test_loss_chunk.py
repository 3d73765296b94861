"""The chunked LM cross-entropy (gpt.chunked_loss_fn, Trainer(loss_chunk=N)): the loss and every
gradient equal the whole-logits loss's within the dtype's tolerance in each twin, torch's chunked
gradients equal JAX's, the (B, T, V) logits are never held for the backward, the compiled torch
step keeps one graph, and a bad chunk size is refused in both twins."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import jax_impl.gpt as jg  # noqa: E402
import jax_impl.train as jt  # noqa: E402
import torch_impl.gpt as tg  # noqa: E402
import torch_impl.train as tt  # noqa: E402
from twin_common import GPTConfig  # noqa: E402
from twin_common.train_config import TrainConfig  # noqa: E402
from twin_parity import train_harness as th  # noqa: E402

# SMALL_GPT's batch is 4 x 16 = 64 positions: 5 leaves a last chunk of 4, 16 divides it, 64 is
# one chunk, 1000 is more than there is
CHUNKS = [5, 16, 64, 1000]
TINY = GPTConfig(vocab_size=64, block_size=16, n_layers=1, d_model=32, n_heads=4)
# A head whose logits dominate the step's memory: (B * T, V) = (1024, 4096) float32 is 16 MiB,
# against 0.5 MiB for the largest other activation (B * T x 4 * d_model)
WIDE_VOCAB = GPTConfig(vocab_size=4096, block_size=64, n_layers=1, d_model=32, n_heads=4)


def _explain(r) -> str:
    return f"{r.direction}: max abs {r.max_abs_err:.3g} (bound {r.tolerance:g}), worst {r.first_divergence} {r.divergence_detail}"


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_chunked_loss_and_gradients_equal_the_whole_loss(framework, chunk):
    r = th.loss_chunk_check(framework, "float32", chunk)
    assert r.passed, _explain(r)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_chunked_loss_in_float64(framework):
    r = th.loss_chunk_check(framework, "float64", 5)
    assert r.passed, _explain(r)


@pytest.mark.parametrize("direction", ["torch->jax", "jax->torch"])
def test_chunked_gradients_match_across_frameworks(direction):
    r = th.grad_check("gpt", "float32", direction, loss_chunk=24)  # 64 positions: 24, 24, 16
    assert r.passed, _explain(r)


def test_a_chunked_loss_that_drops_the_short_last_chunk_fails(monkeypatch):
    """The check above can fail: the JAX twin without the remainder (the last 4 of 64 positions,
    each chunk's sum still over the full count) is caught."""
    honest = jg.chunked_loss_fn

    def without_remainder(head, x, targets, chunk):
        n = x.shape[0] * x.shape[1] // chunk * chunk
        flat, labels = x.reshape(-1, x.shape[-1])[:n], targets.reshape(-1)[:n]
        return honest(head, flat[None], labels[None], chunk) * n / (x.shape[0] * x.shape[1])

    monkeypatch.setattr(jg, "chunked_loss_fn", without_remainder)
    r = th.loss_chunk_check("jax", "float32", 5)
    assert not r.passed and r.first_divergence is not None, _explain(r)


def test_jax_backward_never_holds_the_whole_logits():
    """XLA's buffer assignment for the gradient: the whole loss needs temporaries bigger than the
    (B * T, V) float32 logits; chunks of 32 positions need less than half of them (jax.checkpoint
    inside lax.map: without it the scan would keep every chunk's logits for the backward)."""
    model = jg.GPT(WIDE_VOCAB, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).integers(0, WIDE_VOCAB.vocab_size, (16, 64)), jnp.int32)
    logits_bytes = 16 * 64 * WIDE_VOCAB.vocab_size * 4

    def temp_bytes(chunk: int) -> int:
        grad = jax.jit(jax.grad(lambda p: jg.model_loss(nnx.merge(graphdef, p, rest), x, x, chunk)))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(32)
    assert whole >= logits_bytes, f"whole loss: {whole} temporary bytes, logits {logits_bytes}"
    assert chunked < logits_bytes / 2, f"chunks of 32: {chunked} temporary bytes, logits {logits_bytes}"


def test_torch_autograd_saves_no_logits_when_chunked():
    """The shapes of the tensors autograd saves for the backward: the whole loss keeps the
    (B * T, V) logits (log-softmax's output); chunked, no (rows, V) tensor at all (each chunk's
    logits are recomputed by checkpoint in the backward)."""
    torch.manual_seed(0)
    model = tg.GPT(WIDE_VOCAB)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, WIDE_VOCAB.vocab_size, (16, 64)))
    V = WIDE_VOCAB.vocab_size

    def saved_shapes(chunk: int) -> list[tuple[int, ...]]:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = tg.model_loss(model, x, x, loss_chunk=chunk)
        loss.backward()
        return shapes

    assert (16 * 64, V) in saved_shapes(0)
    chunked = saved_shapes(32)
    assert chunked and not [s for s in chunked if s[-1:] == (V,)], chunked


def test_the_compiled_chunked_step_is_one_graph_and_matches_eager(monkeypatch):
    """Trainer(compile=True, loss_chunk=5): forward and the chunked loss in one fullgraph function
    (the loop over chunks unrolled, checkpointing inside), three steps equal to eager's chunked
    steps, and within the training parity bound (TRAIN_TOLERANCE, relative) of the unchunked ones. aot_eager keeps the test cheap."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    tcfg = TrainConfig(steps=4, batch_size=2, seq_len=8)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8))) for _ in range(3)]
    results = {}
    torch._dynamo.reset()
    for compiled, chunk in ((False, 0), (False, 5), (True, 5)):
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counter}))
        torch.manual_seed(0)
        trainer = tt.Trainer(tg.GPT(TINY), tcfg, compile=compiled, loss_chunk=chunk)
        monkeypatch.setattr(torch, "compile", real_compile)
        results[compiled, chunk] = np.array([[float(v) for v in trainer.step(*b)] for b in batches])
    torch._dynamo.reset()
    assert counter.frame_count == 1, "one graph: the forward and the chunked loss"
    assert np.array_equal(results[True, 5], results[False, 5])
    np.testing.assert_allclose(results[False, 5], results[False, 0], rtol=th.TRAIN_TOLERANCE, atol=0)  # sums in another order


def test_the_jax_trainer_chunked_matches_unchunked():
    """Three jitted optax steps with loss_chunk=5 against loss_chunk=0: losses and norms within the
    training parity bound (TRAIN_TOLERANCE, relative), as torch's above."""
    tcfg = TrainConfig(steps=4, batch_size=2, seq_len=8)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8))) for _ in range(3)]
    results = {}
    for chunk in (0, 5):
        trainer = jt.Trainer(jg.GPT(TINY, rngs=nnx.Rngs(0)), tcfg, loss_chunk=chunk)
        results[chunk] = np.array([[float(v) for v in trainer.step(*b)] for b in batches])
        results[chunk, "eval"] = trainer.eval_loss(*batches[0])
    np.testing.assert_allclose(results[5], results[0], rtol=th.TRAIN_TOLERANCE, atol=0)
    assert results[5, "eval"] == pytest.approx(results[0, "eval"], rel=th.TRAIN_TOLERANCE)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_a_bad_chunk_size_is_refused_by_both_trainers(bad):
    tcfg = TrainConfig(steps=2, batch_size=2, seq_len=8)
    message = r"loss_chunk must be an int >= 0 \(0: no chunking\), got"
    with pytest.raises(ValueError, match=message):
        tt.Trainer(tg.GPT(TINY), tcfg, loss_chunk=bad)
    with pytest.raises(ValueError, match=message):
        jt.Trainer(jg.GPT(TINY, rngs=nnx.Rngs(0)), tcfg, loss_chunk=bad)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_training_script_takes_a_loss_chunk(tmp_path, framework):
    """scripts.train --loss-chunk 7 (64 positions per step: 9 chunks of 7 and one of 1) logs the
    losses of the unchunked run within the training parity bound."""
    import json

    from scripts import train as T

    fast = ["--framework", framework, "--model", "tiny", "--batch-size", "4", "--seq-len", "16", "--steps", "6",
            "--warmup", "2", "--eval-every", "0", "--sample", "0", "--quiet"]  # fmt: skip
    losses = {}
    for chunk in (0, 7):
        out = tmp_path / f"chunk{chunk}"
        assert T.main([*fast, "--out", str(out), "--loss-chunk", str(chunk)]) == 0
        losses[chunk] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses[7]) == 6
    np.testing.assert_allclose(losses[7], losses[0], rtol=th.TRAIN_TOLERANCE, atol=0)


def test_the_training_script_refuses_a_bad_loss_chunk(tmp_path, capsys):
    from scripts import train as T

    base = ["--framework", "jax", "--model", "tiny", "--quiet"]
    assert T.main([*base, "--out", str(tmp_path / "a"), "--loss-chunk", "-3"]) == 2
    assert "--loss-chunk must be >= 0, got -3" in capsys.readouterr().err
    assert T.main([*base, "--out", str(tmp_path / "b"), "--loss-chunk", "8", "--mesh", "data=1,model=1"]) == 2
    assert "--loss-chunk is for one device, not --mesh" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
