"""torch.compile sees the torch GPT as one graph: the token-id range check that reads values on the
host runs only in eager mode, and the Trainer checks each batch on the host instead (as the JAX
Trainer does for jax.jit)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch twin")

from torch_impl.gpt import GPT  # noqa: E402
from torch_impl.train import Trainer  # noqa: E402
from twin_common import GPTConfig  # noqa: E402
from twin_common.train_config import TrainConfig  # noqa: E402

TINY = GPTConfig(vocab_size=64, block_size=16, n_layers=1, d_model=32, n_heads=4)


def test_the_compiled_forward_has_no_graph_break():
    """Reading idx.min()/idx.max() on the host split the graph in three (2 breaks) per forward."""
    import torch._dynamo

    torch.manual_seed(0)
    model = GPT(TINY).eval()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randint(0, TINY.vocab_size, (2, 8)))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_the_eager_model_still_names_out_of_range_ids():
    model = GPT(TINY).eval()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\), got values in \[-1, 64\]"):
        model(torch.tensor([[-1, 64, 3]]))


@pytest.mark.parametrize("bad", [64, -1])
def test_the_trainer_checks_the_batch_on_the_host(bad):
    torch.manual_seed(0)
    model = GPT(TINY)
    trainer = Trainer(model, TrainConfig(steps=2, batch_size=2, seq_len=8), compile=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = np.zeros((2, 8), np.int64)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        trainer.step(x, np.zeros((2, 8), np.int64))
    assert trainer.step_count == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_compiled_training_step_holds_the_loss_in_one_graph_and_matches_eager(monkeypatch):
    """Trainer(compile=True) compiles forward + cross-entropy as one fullgraph function (the loss no
    longer runs eagerly over the logits after the compiled model); three float32 steps give eager's
    losses and norms. aot_eager (dynamo + AOTAutograd, no code generation) keeps the test cheap."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from torch_impl.train import forward_loss

    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    seen = {}

    def compile_(fn, **kwargs):
        seen.update(fn=fn, **kwargs)
        return real_compile(fn, **{**kwargs, "backend": counter})

    tcfg = TrainConfig(steps=4, batch_size=2, seq_len=8)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8))) for _ in range(3)]
    results = {}
    torch._dynamo.reset()
    for compiled in (False, True):
        monkeypatch.setattr(torch, "compile", compile_)
        torch.manual_seed(0)
        trainer = Trainer(GPT(TINY), tcfg, compile=compiled)
        monkeypatch.setattr(torch, "compile", real_compile)
        results[compiled] = [tuple(float(v) for v in trainer.step(*b)) for b in batches]
    torch._dynamo.reset()
    assert seen["fn"] is forward_loss and seen["fullgraph"] is True
    assert counter.frame_count == 1, "one graph: the forward and the loss, for every step"
    assert results[True] == results[False]


def test_the_compiled_moe_step_carries_the_router_losses(monkeypatch):
    """An MoE model's compiled forward + loss is still one fullgraph function, and its loss is
    model_loss's (cross-entropy plus the router's load-balancing and z losses) as in eager mode;
    evaluation reports the cross-entropy alone, as the JAX twin's eval_loss."""
    import dataclasses

    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from torch_impl.gpt import loss_fn, model_loss

    cfg = dataclasses.replace(GPTConfig.moe_tiny(), vocab_size=64, block_size=16)
    counter = CompileCounterWithBackend("aot_eager")
    real_compile = torch.compile
    tcfg = TrainConfig(steps=4, batch_size=2, seq_len=8)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 64, (2, 8)), rng.integers(0, 64, (2, 8))
    torch._dynamo.reset()
    results = {}
    for compiled in (False, True):
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counter}))
        torch.manual_seed(0)
        trainer = Trainer(GPT(cfg), tcfg, compile=compiled)
        monkeypatch.setattr(torch, "compile", real_compile)
        with torch.no_grad():
            expected = model_loss(trainer.model.eval(), torch.from_numpy(x), torch.from_numpy(y))
            cross_entropy = loss_fn(trainer.model(torch.from_numpy(x)), torch.from_numpy(y))
        trainer.model.train()
        results[compiled] = (float(trainer.step(x, y)[0]), trainer.eval_loss(x, y))
        assert results[compiled][0] == pytest.approx(float(expected), rel=1e-6)
        with torch.no_grad():  # after the step: what evaluation must report
            after = loss_fn(trainer.model.eval()(torch.from_numpy(x)), torch.from_numpy(y))
        assert results[compiled][1] == pytest.approx(float(after), rel=1e-6)
    torch._dynamo.reset()
    assert counter.frame_count == 2, "one graph for the training loss, one for evaluation"
    assert float(expected) > float(cross_entropy)  # the router losses are in it
    assert results[True] == results[False]
