"""The JAX sharded worker: in one process with 8 simulated CPU devices, the GPT (and its block) on each
mesh against one device: forward, gradients, 20 AdamW steps, the collectives XLA placed, and the
checkpoint the cross-framework resume starts from."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from twin_parity.train_harness import token_batch
from twin_common.mesh import MeshShape
from twin_parity.sharded_compare import (
    BLOCK_CFG,
    GPT_CFG,
    RESUME_AT,
    TCFG,
    collectives_row,
    compare_named,
    compare_training,
    mesh_name,
    write_results,
)
from twin_parity.sharded_hlo import hlo_collectives, jax_counts, model_axis_groups


def jax_worker(out: str, init: str, meshes: list[MeshShape], resume_save: str | None, sabotage: bool) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import weight_conversion as wc
    from jax_impl import sharding as S
    from jax_impl.block import Block
    from jax_impl.gpt import GPT, loss_fn
    from jax_impl.train import Trainer, flax_path, split
    from twin_common.precision import matched_precision
    from weight_conversion.safetensors_io import load_file
    from twin_common.params import table_for

    weights, _ = load_file(init)
    block_init = {k.removeprefix("blocks.0."): v for k, v in weights.items() if k.startswith("blocks.0.")}
    x_tok, y_tok = token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, 0)
    x_tok, y_tok = x_tok.astype(np.int32), y_tok.astype(np.int32)
    x_act = np.random.default_rng(1).standard_normal((TCFG.batch_size, TCFG.seq_len, BLOCK_CFG.d_model)).astype(np.float32)
    by_path = {s.flax_path: s for s in table_for(GPT_CFG)}

    def gpt():
        m = GPT(GPT_CFG, rngs=nnx.Rngs(0))
        wc.import_(m, weights)
        return m

    def block():
        m = Block(BLOCK_CFG, rngs=nnx.Rngs(0))
        wc.import_(m, block_init)
        return m

    def forward(model, mesh):  # every intermediate, as NumPy
        if mesh is None:
            return {k: np.asarray(v) for k, v in model(jnp.asarray(x_tok if isinstance(model, GPT) else x_act), return_intermediates=True)[1].items()}
        fn, params, rest = S.make_forward(model, mesh, return_intermediates=True)
        x = x_tok if isinstance(model, GPT) else x_act
        compiled = fn.lower(params, rest, x).compile()  # one compile: its HLO text, then its outputs
        return {k: np.asarray(v) for k, v in compiled(params, rest, x)[1].items()}, compiled.as_text()

    def grads(model, mesh):
        graphdef, params, rest = split(model if mesh is None else S.shard_model(model, mesh))

        def loss_of(p, x, y):
            return loss_fn(nnx.merge(graphdef, p, rest)(x), y)

        kwargs = {}
        if mesh is not None:
            p_sh, _, _, b_sh, _ = S.state_shardings(model, mesh)
            kwargs = {"in_shardings": (p_sh, b_sh, b_sh), "out_shardings": p_sh}
        g = jax.jit(jax.grad(loss_of), **kwargs)(params, x_tok, y_tok)
        return {by_path[flax_path(kp)].torch_key: by_path[flax_path(kp)].transform.to_torch(np.asarray(v))
                for kp, v in jax.tree_util.tree_leaves_with_path(g)}  # fmt: skip

    def train(trainer, steps=range(TCFG.steps)):
        losses = []
        for s in steps:
            x, y = token_batch(GPT_CFG, TCFG.batch_size, TCFG.seq_len, TCFG.seed, s)
            losses.append(float(trainer.step(x, y)[0]))
        return losses, trainer.state()

    rows, arrays, timings = [], {}, {}
    with matched_precision():
        t0 = time.perf_counter()
        ref_fwd = {"gpt": forward(gpt(), None), "block": forward(block(), None)}
        ref_grad = grads(gpt(), None)
        ref_losses, (ref_weights, _, _) = train(Trainer(gpt(), TCFG))
        timings["one device"] = time.perf_counter() - t0
        for shape in meshes:
            t0 = time.perf_counter()
            mesh = S.init_distributed(shape, GPT_CFG, batch_size=TCFG.batch_size)
            ms, name = shape.shape, mesh_name(shape.shape)
            common = {"mesh": ms, "framework": "jax", "direction": f"jax:1 device->jax:{name}"}
            comm = {}
            for model_name, make in (("gpt", gpt), ("block", block)):
                got, hlo = forward(make(), mesh)
                shp = x_tok.shape if model_name == "gpt" else x_act.shape
                rows.append(compare_named("sharded_forward", ref_fwd[model_name], got, model=model_name, shape=shp, **common))
                comm[model_name] = hlo_collectives(hlo)
            rows.append(collectives_row("jax", ms, {m: jax_counts(c) for m, c in comm.items()}))
            rows.append(compare_named("sharded_grad", ref_grad, grads(gpt(), mesh), model="gpt", shape=x_tok.shape, **common))
            trainer = S.ShardedTrainer(gpt(), TCFG, mesh)
            # the state stays where the shardings say, step after step
            leaf = trainer.params["blocks"][0]["attn"]["q_proj"]["kernel"]
            placement = {"q_proj_kernel_spec": str(leaf.sharding.spec)}
            losses, (w, _, _) = train(trainer)
            mu = optax.tree_utils.tree_get(trainer.opt_state, "mu")["blocks"][0]["attn"]["q_proj"]["kernel"]
            placement.update(q_proj_kernel_spec_after=str(trainer.params["blocks"][0]["attn"]["q_proj"]["kernel"].sharding.spec),
                             q_proj_mu_spec=str(mu.sharding.spec))  # fmt: skip
            rows.append(compare_training("sharded_train_step", ref_losses, ref_weights, losses, w, **common))
            ids = np.vectorize(lambda d: d.id)(mesh.devices)
            arrays[name] = {"losses": losses, "weights": w, "comm": comm, "placement": placement,
                            "model_groups": model_axis_groups(ids)}  # fmt: skip
            timings[name] = time.perf_counter() - t0
        if resume_save:
            from weight_conversion.checkpoint import save_checkpoint

            mesh = S.init_distributed(MeshShape(2, 2), GPT_CFG, batch_size=TCFG.batch_size)
            trainer = S.ShardedTrainer(gpt(), TCFG, mesh)
            losses, (w, optim, step) = train(trainer, range(RESUME_AT))
            save_checkpoint(resume_save, GPT_CFG, w, optim, step, {"framework": "jax", "mesh": "data=2,model=2"})
        if sabotage:  # a wrong plan, to show that the collective check can fail: out_proj split like q_proj
            from twin_common import params as T

            honest = S.table_for
            S.table_for = lambda cfg: tuple(
                dataclasses.replace(s, split=T.Split.OUT_FEATURES) if s.torch_key.endswith("attn.out_proj.weight") else s
                for s in honest(cfg)
            )  # fmt: skip
            try:
                _, hlo = forward(gpt(), S.make_mesh(MeshShape(1, 2)))
            finally:
                S.table_for = honest
            arrays["sabotage"] = {"comm": hlo_collectives(hlo)}
    write_results(out, rows, arrays, {"timings_s": timings, "ref_losses": ref_losses, "ref_weights": ref_weights})
