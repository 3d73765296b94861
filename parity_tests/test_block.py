"""Twin behaviour outside the parity numbers: structure, bad input, modes, pinned defaults."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_impl.block as jb
import torch_impl.block as tb
from twin_parity import harness as h
from twin_common import BlockConfig
from weight_conversion.torch_side import numpy_to_tensor, tensor_to_numpy

CFG = BlockConfig(d_model=32, n_heads=4, block_size=8)


def _pair(cfg=CFG, dtype="float32"):
    t = h.new_torch_block(cfg, dtype, "cpu", 0)
    j = h.new_flax_block(cfg, dtype, h.jax_devices()["cpu"], 1)
    import weight_conversion as wc

    wc.torch_to_flax(t, j)
    return t, j


def _flax_children(module) -> list[str]:
    """Attribute names of an nnx.Module that hold layers (submodules or functions), in order."""
    return [k for k, v in vars(module).items() if not k.startswith("_") and (isinstance(v, nnx.Module) or callable(v))]


@pytest.mark.parametrize("name", ["Block", "CausalSelfAttention", "MLP"])
def test_twins_have_the_same_layers_in_the_same_order(name):
    """Same class names and same attribute names in the same order on both sides."""
    cfg = CFG
    t_cls, j_cls = getattr(tb, name), getattr(jb, name)
    t = t_cls(cfg)
    j = j_cls(cfg, rngs=nnx.Rngs(0))
    assert [n for n, _ in t.named_children()] == _flax_children(j)
    assert tb.INTERMEDIATES == jb.INTERMEDIATES == h.INTERMEDIATES


BAD_INPUTS = {
    "rank 2": ((8, 32), "float32", "rank 2"),
    "rank 4": ((1, 2, 8, 32), "float32", "rank 4"),
    "wrong width": ((2, 8, 16), "float32", "last dimension is 16"),
    "too long": ((2, 9, 32), "float32", "exceeds the configured block_size=8"),
    "empty batch": ((0, 8, 32), "float32", "empty"),
    "int input": ((2, 8, 32), "int32", "unsupported input dtype int32"),
    "dtype mismatch": ((2, 8, 32), "float64", "does not match the block's parameter dtype float32"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_the_same_value_error_on_both_twins(case):
    shape, dtype, fragment = BAD_INPUTS[case]
    t, j = _pair()
    x = np.zeros(shape, dtype)
    with pytest.raises(ValueError) as t_err:
        t(torch.from_numpy(x))
    with jax.enable_x64(True):  # so float64 input stays float64 for the check to see
        with pytest.raises(ValueError) as j_err:
            j(jnp.asarray(x))
    assert fragment in str(t_err.value)
    assert str(t_err.value) == str(j_err.value)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(n_heads=0), "n_heads must be a positive int"),
        (dict(gelu_approximate="sigmoid"), "gelu_approximate"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(attn_dropout=1.0), "attn_dropout"),
        (dict(ln_eps=0.0), "ln_eps"),
        (dict(ln_eps=float("inf")), "ln_eps must be a finite number"),
        (dict(init_std=float("nan")), "init_std"),
        (dict(resid_dropout="0.1"), "resid_dropout must be a number"),
        (dict(bias="yes"), "bias must be a bool"),
    ],
)
def test_bad_config_is_a_value_error(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        BlockConfig(**kwargs)


def test_config_round_trips_through_dict_and_rejects_unknown_fields():
    assert BlockConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown BlockConfig fields"):
        BlockConfig.from_dict({**CFG.to_dict(), "n_layers": 2})


@pytest.mark.parametrize("attn_impl", ["fused", "math"])
def test_dropout_acts_in_training_and_not_in_eval(attn_impl):
    """Both twins default to training mode; eval is deterministic and equals the no-dropout twin."""
    cfg = BlockConfig(d_model=32, n_heads=4, block_size=8, attn_dropout=0.3, resid_dropout=0.3, attn_impl=attn_impl)
    t, j = _pair(cfg)
    x = h.make_input((2, 8, 32), "float32", 0)
    t.train()
    j.train()
    t_train = tensor_to_numpy(t(numpy_to_tensor(x)))
    j_train = np.asarray(j(jnp.asarray(x)))
    t.eval()
    j.eval()
    t_eval = tensor_to_numpy(t(numpy_to_tensor(x)))
    j_eval, j_eval2 = np.asarray(j(jnp.asarray(x))), np.asarray(j(jnp.asarray(x)))
    assert np.array_equal(j_eval, j_eval2)
    assert np.max(np.abs(t_eval - j_eval)) < 1e-5
    assert np.max(np.abs(t_train - t_eval)) > 1e-2
    assert np.max(np.abs(j_train - j_eval)) > 1e-2


def test_layer_norm_variance_is_two_pass_like_torch():
    """Flax's default fast variance E[x^2]-E[x]^2 cancels catastrophically on inputs with a large
    mean; the twin pins the two-pass variance, and matches torch where the default does not."""
    cfg = BlockConfig(d_model=128, n_heads=4)
    x = (1e3 + np.random.default_rng(0).standard_normal((4, 128))).astype(np.float32)
    ref = tensor_to_numpy(tb.layer_norm(cfg)(torch.from_numpy(x)).detach())
    ours = np.asarray(jb.layer_norm(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))(jnp.asarray(x)))
    fast = np.asarray(nnx.LayerNorm(128, epsilon=cfg.ln_eps, rngs=nnx.Rngs(0))(jnp.asarray(x)))
    assert np.max(np.abs(ours - ref)) < 1e-3
    assert np.max(np.abs(fast - ref)) > 1e-2


def test_pinned_defaults_differ_from_the_library_defaults():
    """The values the twins pin are not what the libraries would pick by themselves."""
    assert nnx.LayerNorm(4, rngs=nnx.Rngs(0)).epsilon == 1e-6 != CFG.ln_eps == torch.nn.LayerNorm(4).eps
    x = jnp.linspace(-3, 3, 101)
    exact = np.asarray(jax.nn.gelu(x, approximate=False))
    assert np.max(np.abs(np.asarray(jax.nn.gelu(x)) - exact)) > 1e-4  # jax's default is tanh
    t_gelu = torch.nn.GELU()(torch.from_numpy(np.array(x)))
    assert np.max(np.abs(t_gelu.numpy() - exact)) < 1e-6  # torch's default is exact
    j = jb.Block(CFG, rngs=nnx.Rngs(0))
    kernel = np.asarray(j.attn.q_proj.kernel[...])
    assert abs(kernel.std() - CFG.init_std) < 0.003 and np.all(np.asarray(j.attn.q_proj.bias[...]) == 0)
    t = tb.Block(CFG)
    assert abs(t.attn.q_proj.weight.std().item() - CFG.init_std) < 0.003
    assert torch.all(t.attn.q_proj.bias == 0)


def test_matched_precision_pins_inside_and_restores_outside():
    from twin_common.precision import describe, matched_precision

    before = describe()
    with matched_precision(x64=True):
        inside = describe()
        assert jnp.ones(1, jnp.float64).dtype == jnp.float64
    assert inside["torch_float32_matmul_precision"] == "highest"
    assert inside["jax_default_matmul_precision"] == "highest" and inside["jax_enable_x64"]
    assert describe() == before


def test_matched_precision_for_one_framework_leaves_the_other_alone():
    """A torch-only command pins torch and never imports JAX (scripts.train --framework torch
    imported JAX's runtime only for this); an unknown framework name is refused."""
    import subprocess
    import sys

    code = ("import sys; from twin_common.precision import matched_precision\n"
            "import torch\n"
            "with matched_precision(frameworks=('torch',)):\n"
            "    assert torch.get_float32_matmul_precision() == 'highest'\n"
            "print('jax' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    from twin_common.precision import matched_precision

    with pytest.raises(ValueError, match="unknown frameworks \\['tensorflow'\\]"):
        with matched_precision(frameworks=("tensorflow",)):
            pass
