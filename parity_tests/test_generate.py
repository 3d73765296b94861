"""KV-cache generation: cached logits equal the uncached forward in each framework, the twins pick
the same tokens from the same seed, the step compiles once, and bad requests are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("torch", reason="generation parity needs both frameworks")
pytest.importorskip("flax", reason="generation parity needs both frameworks")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import jax_impl.generate as jg  # noqa: E402
import torch_impl.generate as tg  # noqa: E402
import weight_conversion as wc  # noqa: E402
from twin_parity import generate_harness as gh  # noqa: E402
from twin_parity import train_harness as th  # noqa: E402
from twin_common import GPTConfig  # noqa: E402
from twin_common.generation import (  # noqa: E402
    LOGIT_TOL, Generation, Sampling, compare_generations, decision_margin, kept_probabilities,
)
from twin_common.precision import matched_precision  # noqa: E402

TINY = GPTConfig(vocab_size=64, block_size=40, n_layers=1, d_model=32, n_heads=2, init_std=0.2)
RUNS = {"torch": tg.run, "jax": jg.run}


@pytest.fixture(scope="module")
def pair():
    with matched_precision():
        t, j = th.new_torch_gpt(TINY, "float32", 0), th.new_flax_gpt(TINY, "float32", 1)
        wc.torch_to_flax(t, j)
    return {"torch": t, "jax": j}


# ------------------------------------------------------------------------- cached vs uncached


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cached_logits_equal_the_uncached_forward_at_every_position(framework, dtype):
    result = gh.kv_cache_check(framework, dtype)
    assert result.passed, f"{result.direction} {dtype}: {result.max_abs_err:.2e} at {result.first_divergence}"


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cached_logits_on_the_math_attention_path(framework):
    result = gh.kv_cache_check(framework, "float32", attn_impl="math")
    assert result.passed, f"{result.direction}: {result.max_abs_err:.2e} at {result.first_divergence}"


# -------------------------------------------------------------------------- across frameworks


@pytest.mark.parametrize("sampling", ["greedy", "sampled", "top_k"])
def test_both_twins_generate_the_same_tokens_from_the_same_seed(sampling):
    a, b, report = gh.generate_pair(sampling)
    assert all(len(row) >= 64 for row in a.tokens), "fewer than 64 steps compared"
    assert report["max_logit_diff"] <= LOGIT_TOL, report
    # identical, or every first difference sits where float32 cannot decide (never a looser check)
    assert report["identical"] or report["explained"], report


def test_sampling_follows_the_seed_and_differs_from_greedy():
    with matched_precision():
        model = gh.trained_pair()[0]
        prompts = [list(gh.GEN_PROMPTS[0])]
        greedy = tg.generate(model, prompts, 32, gh.SAMPLINGS["greedy"])
        s0 = tg.generate(model, prompts, 32, gh.SAMPLINGS["sampled"], seed=0)
        s1 = tg.generate(model, prompts, 32, gh.SAMPLINGS["sampled"], seed=1)
        assert s0 == tg.generate(model, prompts, 32, gh.SAMPLINGS["sampled"], seed=0)
    assert s0 != s1 and s0 != greedy


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize(
    "sampling", [Sampling(0.7), Sampling(0.7, top_k=10), Sampling(1.3, top_p=0.6), Sampling(0.9, top_k=12, top_p=0.8)],
    ids=["temperature", "top_k", "top_p", "top_k+top_p"],
)
def test_sampling_draws_the_reference_distribution(framework, sampling):
    """A grid of N uniforms through the twin's inverse CDF gives each token a share equal to its
    float64 reference probability (after the same top-k / top-p filters), up to the grid's 1/N."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 50).astype(np.float32)
    n = 4000
    u = ((np.arange(n) + 0.5) / n).astype(np.float32)
    modes = dict(greedy=False, top_k=sampling.top_k, use_top_p=sampling.top_p < 1)
    if framework == "torch":
        tokens = tg.sample(torch.tensor(np.tile(logits, (n, 1))), torch.tensor(u), torch.tensor(sampling.temperature),
                           torch.tensor(sampling.top_p), **modes).numpy()  # fmt: skip
    else:
        tokens = np.asarray(jg.sample(jnp.tile(logits, (n, 1)), jnp.asarray(u), jnp.float32(sampling.temperature),
                                      jnp.float32(sampling.top_p), **modes))  # fmt: skip
    share = np.bincount(tokens, minlength=logits.size) / n
    expected = kept_probabilities(logits, sampling)
    assert np.all(share[expected == 0] == 0), "a filtered-out token was drawn"
    assert np.max(np.abs(share - expected)) <= 1.0 / n + 1e-6


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_greedy_is_the_first_argmax(framework):
    logits = np.array([[0.5, 2.0, 2.0, -1.0]], np.float32)  # a tie: both frameworks take index 1
    args = (np.zeros(1, np.float32), 1.0, 1.0)
    if framework == "torch":
        token = tg.sample(torch.tensor(logits), *map(torch.tensor, args), greedy=True, top_k=0, use_top_p=False)
    else:
        token = jg.sample(jnp.asarray(logits), *map(jnp.asarray, args), greedy=True, top_k=0, use_top_p=False)
    assert int(token[0]) == 1


def _generation(tokens, logits, u):
    return Generation([tokens], np.asarray([[x] for x in u], np.float32), np.asarray(logits, np.float32)[:, None],
                      0.0, 0.0, len(tokens) - 1)  # fmt: skip


def test_a_token_difference_is_explained_only_where_float32_cannot_decide():
    """The detector behind the cross-framework check: a greedy flip between two logits 1e-7 apart
    is undecidable; a flip between logits 0.5 apart is a bug and is reported as one."""
    greedy = Sampling(0.0)
    close = [[0.0, 1.0, 1.0 + 1e-7, -2.0]]
    assert decision_margin(close[0], 0.5, greedy) < LOGIT_TOL
    report = compare_generations(_generation([2], close, [0.5]), _generation([1], close, [0.5]), greedy)
    assert not report["identical"] and report["explained"]
    far = [[0.0, 1.0, 1.5, -2.0]]
    report = compare_generations(_generation([2], far, [0.5]), _generation([1], far, [0.5]), greedy)
    assert not report["explained"] and report["rows"][0]["margin"] == pytest.approx(0.5)
    # sampled: a threshold that lands on a CDF step is undecidable, one mid-interval is not
    logits = np.log(np.array([0.25, 0.25, 0.5]))
    s = Sampling(1.0)
    assert decision_margin(logits, 0.25, s) < LOGIT_TOL
    assert decision_margin(logits, 0.4, s) > 0.04  # 0.1 from the step at 0.5, times T / 2


# ---------------------------------------------------------------------------------- compilation


def test_jax_step_compiles_once_per_shape_not_per_token_prompt_or_call(pair):
    if not hasattr(jg.loop_step, "_cache_size"):
        pytest.skip("this jax has no jit _cache_size() to count compilations with")
    model = pair["jax"]
    with matched_precision():
        size = jg.loop_step._cache_size
        before = size()
        jg.run(model, [[1, 2, 3]], 6, Sampling(0.0))
        assert size() - before == 2, "one prefill and one decode compilation"
        jg.run(model, [[4, 5, 6, 7, 8, 9, 10]], 9, Sampling(0.0))  # another length, same bucket
        jg.run(model, [[1] * 16], 3, Sampling(0.0))  # 16 tokens: still the 16-slot bucket
        assert size() - before == 2, "recompiled within a bucket or for another call"
        jg.run(model, [[1, 2]], 4, Sampling(0.5, top_p=0.9))
        jg.run(model, [[1, 2, 3]], 5, Sampling(1.5, top_p=0.5), seed=3)  # new values, same mode
        assert size() - before == 4, "temperature / top_p values must not recompile"


def test_torch_decode_step_has_no_graph_break(pair):
    model = pair["torch"]
    model.eval()
    model.setup_cache(2, TINY.block_size)
    args = (torch.tensor([[3], [4]]), torch.tensor(5), torch.tensor([0, 2]), torch.tensor(0),
            torch.tensor([0.3, 0.8]), torch.tensor(0.9), torch.tensor(0.9))  # fmt: skip
    explanation = torch._dynamo.explain(tg.step)(model, *args, greedy=False, top_k=8, use_top_p=True)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    model.clear_cache()


def test_torch_compiled_step_compiles_once_and_matches_eager(pair, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setitem(tg._COMPILED, "counting", torch.compile(tg.step, backend=counter, fullgraph=True, dynamic=False))
    model = pair["torch"]
    with matched_precision():
        eager = tg.generate(model, [[1, 2, 3], [7]], 8, Sampling(0.8, top_k=5))
        compiled = tg.generate(model, [[1, 2, 3], [7]], 8, Sampling(0.8, top_k=5), compile="counting")
        tg.generate(model, [[5, 6, 7, 8, 9], [2, 2]], 12, Sampling(1.2, top_k=5), compile="counting", seed=4)
    assert compiled == eager
    assert counter.frame_count == 2, "one prefill and one decode graph for every position and call"
    torch._dynamo.reset()


# ------------------------------------------------------------------------- batches, stops, errors


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_padded_batch_row_generates_what_it_generates_alone(framework, pair):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    with matched_precision():
        together = RUNS[framework](pair[framework], prompts, 10, Sampling(0.0)).tokens
        alone = [RUNS[framework](pair[framework], [p], 10, Sampling(0.0)).tokens[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_row_stops_after_its_stop_token(framework, pair):
    prompts = [[5, 6, 7], [9, 9]]
    with matched_precision():
        free = RUNS[framework](pair[framework], prompts, 12, Sampling(0.0)).tokens
        stop = free[0][3]
        stopped = RUNS[framework](pair[framework], prompts, 12, Sampling(0.0), stop_tokens=[stop]).tokens
    cut = free[0].index(stop) + 1
    assert stopped[0] == free[0][:cut]
    other = free[1].index(stop) + 1 if stop in free[1] else len(free[1])
    assert stopped[1] == free[1][:other]


BAD_REQUESTS = [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 64]]), "outside the vocabulary"),
    (dict(prompts=[[1, -1]]), "outside the vocabulary"),
    (dict(prompts=[[1] * 30], max_new_tokens=11), "exceeds the model's block_size=40"),
    (dict(sampling=dict(temperature=-0.5)), "temperature"),
    (dict(sampling=dict(temperature=math.nan)), "temperature"),
    (dict(sampling=dict(top_k=-1)), "top_k"),
    (dict(sampling=dict(top_p=0.0)), "top_p"),
    (dict(sampling=dict(top_p=1.5)), "top_p"),
    (dict(sampling=dict(top_p=math.nan)), "top_p"),
    (dict(stop_tokens=[99]), "stop token 99"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
]


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("bad,message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_are_refused_before_anything_runs(framework, bad, message):
    model = (th.new_torch_gpt if framework == "torch" else th.new_flax_gpt)(TINY, "float32", 0)
    request = dict(prompts=[[1, 2]], max_new_tokens=4, stop_tokens=())
    request.update({k: v for k, v in bad.items() if k != "sampling"})
    with pytest.raises(ValueError, match=message):
        RUNS[framework](model, request.pop("prompts"), request.pop("max_new_tokens"),
                        Sampling(**bad.get("sampling", {})), **request)  # fmt: skip
    assert all(block.attn.kv_cache is None for block in model.blocks), "the model was touched"


def test_the_trainers_sample_past_block_size_matches_across_frameworks(pair):
    """generate.continue_prompt (the Trainers' sample) restarts the context past block_size; both twins agree."""
    from jax_impl.generate import continue_prompt as jax_generate
    from torch_impl.generate import continue_prompt as torch_generate

    with matched_precision():
        a = torch_generate(pair["torch"], [1, 2, 3], 70, temperature=0.8, seed=5)
        b = jax_generate(pair["jax"], [1, 2, 3], 70, temperature=0.8, seed=5)
    assert len(a) == 73 and a == b
    assert all(block.attn.kv_cache is not None for block in pair["torch"].blocks)  # kept for reuse


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_step_with_no_token_left_is_refused_not_returned_as_minus_one(framework):
    """Non-finite logits leave no token with a positive probability: ``sample`` gives -1 there, and
    ``run`` must say so at that step instead of feeding -1 to the embedding at the next."""
    model = (th.new_torch_gpt if framework == "torch" else th.new_flax_gpt)(TINY, "float32", 0)
    weights = wc.export(model)
    weights["ln_f.weight"] = np.full_like(weights["ln_f.weight"], np.nan)  # every logit NaN
    if framework == "torch":
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    else:
        model.ln_f.scale.set_value(jnp.asarray(weights["ln_f.weight"]))
    with matched_precision(), pytest.raises(ValueError, match=r"step 0: no token of row\(s\) \[0\] .* not finite"):
        RUNS[framework](model, [[1, 2]], 4, Sampling(temperature=0.8, top_k=5))
