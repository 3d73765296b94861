"""Parity report: run the twin-parity matrix on every backend present and print the results.

    python -m scripts.parity_report [--json PATH] [--dtypes float32 ...] [--heads 1 4]

Checks, for every torch device x every JAX device present (CPU always; CUDA / GPU / TPU when there):
  forward             torch block vs Flax block on the (5, 8, 128) input, weights converted in both
                      directions, every intermediate compared; float32, float64, bfloat16
  attn_fused_vs_math  fused attention against the explicit math path, within each framework
  golden              each twin alone against the committed float64 reference
  defaults            each twin built from the current default config against the same reference
  sublayers_vs_f64    each twin alone in bfloat16: every sublayer against float64 on its own input
  softmax_vs_f64      each twin's bfloat16 math-path attention probabilities against a float64 softmax
  loss_vs_f64         each twin's loss on bfloat16 logits against a float64 cross-entropy
  roundtrip           torch -> Flax -> torch and back through safetensors files, bit for bit
  grad                every parameter gradient (and the block's input gradient), block and small GPT
  optimizer_vs_f64    each twin's AdamW alone, 8 float64 steps, against a NumPy AdamW with the
                      project's values written in the check (decay on matrices only, clipping,
                      warmup + cosine): a default, decay rule or schedule both twins share and both
                      got wrong passes train_step and fails here
  train_step          20 AdamW steps (warmup + cosine, clipping) of a small GPT in both frameworks
  resume              10 steps in one framework, checkpoint, 10 more in the other
  hf_gpt2             transformers' GPT2LMHeadModel (random weights, saved with save_pretrained) imported
                      into each twin: logits and every block's hidden state, 1 and 3 layers, seq 1 and
                      16, eager and sdpa attention; float64 rows (1e-12) with GPT-2's config and with
                      epsilon 1e-3 and exact GELU;
                      skipped, with the reason, where transformers is not installed
  kv_cache            within each framework: cached generation against the uncached forward at every
                      position of a left-padded batch, float32 and float64
  generate            torch vs JAX on a briefly trained GPT: per-step logits and the greedy, top-k
                      and sampled tokens (72 steps, same seed)
  llama               the Llama preset (GPTConfig.llama_tiny's block: RMSNorm, rotary positions, 4
                      query heads sharing 2 key/value heads, SwiGLU): its "llama" rows of forward
                      (every dtype; both rope layouts in float32), grad, train_step, resume, kv_cache
                      (float32 and float64, the left-padded batch) and generate (a briefly trained
                      llama_tiny) are the dense checks run on the Llama config; its sharded_forward
                      and sharded_train_step (5 steps) rows put it on data=2, model=2 (key/value
                      heads over model) against one device; in bfloat16 each twin's Llama block
                      alone against float64 (sublayers_vs_f64) and its rotary cos/sin at 4096
                      positions (rope_vs_f64)
  hf_llama            transformers' LlamaForCausalLM imported into each twin: logits and every
                      block's hidden state, grouped (2 kv heads) and multi-head, half-split and
                      interleaved rope (float32; skipped where transformers is not installed)
  routing             the MoE preset (GPTConfig.moe_tiny's block): the experts each of 512 tokens
                      chooses, identical in both twins except tokens whose margin the dtype cannot
                      decide; its "moe" rows of forward, grad, train_step, resume, kv_cache, generate
                      and sharded_* are the dense checks run on the MoE preset, and three forward
                      rows run the rules its config skips (norm_topk_prob=False, a capacity factor,
                      a zero router whose ties the lower-index rule decides)
  hf_mixtral          transformers' MixtralForCausalLM imported into each twin: logits, router logits,
                      expert choices and the load-balancing loss
  sharded_*           each twin on (data, model) meshes of simulated CPU devices vs one device:
                      forward, gradients, 20 AdamW steps; sharded torch vs sharded JAX; a resume
                      from JAX on (2, 2) into torch on (1, 2) (subprocesses; --skip-sharded); the
                      MoE preset also on meshes with an expert axis (tokens sent to their experts
                      by all-to-all): forward, gradients, 5 AdamW steps and the all-to-all count
All run under matched precision (full-float32 matmuls in both frameworks). Exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

from twin_parity import harness as h
from twin_common import BlockConfig
from twin_common.precision import describe as describe_precision
from twin_common.precision import matched_precision
from twin_common.tolerances import TOLERANCES
from twin_common.files import cannot_write, write_atomic

HEAD_COUNTS = (1, 4)  # the lesson's single head, and several heads


class Planned(NamedTuple):
    label: str  # one progress line
    check: str  # the check's name in the table
    needs: tuple[str, ...]  # frameworks it needs: ("torch",), ("jax",) or both
    run: Callable[[], h.Result]
    rows: int = 1  # rows it adds to the table (a sharded worker returns several)


# The checks --skip-training leaves out (training_plan's), named in its help.
TRAINING_CHECKS = ("grad", "optimizer_vs_f64", "train_step", "resume", "generate")


def training_plan(dtypes, torch_devices=("cpu",), jax_devices=None):
    """Rows for gradients (CPU, float32/64) and each twin's AdamW against NumPy (CPU, float64), then
    on every torch device x JAX device: 20-step AdamW trajectories, cross-framework resume and
    generation (float32)."""
    from twin_parity import train_harness as th

    both = ("torch", "jax")
    for model in ("block", "gpt"):
        for dtype in (d for d in dtypes if d in ("float32", "float64")):
            for direction in h.DIRECTIONS:
                yield Planned(f"grad {model} {direction} {dtype}", "grad", both,
                              lambda m=model, d=dtype, r=direction: th.grad_check(m, d, r))
    if "float64" in dtypes:  # each twin's AdamW alone against a float64 NumPy AdamW (CPU)
        from twin_parity import optimizer_harness as oh

        for framework in ("torch", "jax"):
            yield Planned(f"optimizer {framework} vs NumPy AdamW float64", "optimizer_vs_f64", (framework,),
                          lambda f=framework: oh.optimizer_check(f))  # fmt: skip
    if "float32" not in dtypes:
        return
    from twin_parity import generate_harness as gh

    # JAX's CPU device is passed as None: the harness builds there (and names it "cpu")
    pairs = [(t, j, None if j == "cpu" else d) for t in torch_devices for j, d in (jax_devices or {"cpu": None}).items()]
    for tdev, jname, jdev in pairs:
        where = f"torch:{tdev} jax:{jname}"
        for direction in h.DIRECTIONS:
            yield Planned(f"train_step 20 x AdamW {direction} {where}", "train_step", both,
                          lambda r=direction, t=tdev, j=jdev: th.trajectory_check(r, torch_device=t, jax_device=j)[0])
        for first in ("torch", "jax"):
            yield Planned(f"resume 10 + 10 steps from {first} {where}", "resume", both,
                          lambda f=first, t=tdev, j=jdev: th.resume_check(f, torch_device=t, jax_device=j))
        for sampling in gh.SAMPLINGS:  # needs a trained model: trains one (80 steps, once) first
            yield Planned(f"generate torch<->jax {sampling} {where}", "generate", both,
                          lambda s=sampling, t=tdev, j=jdev: gh.generate_check(s, torch_device=t, jax_device=j))


def hf_plan(dtypes):
    """Rows against transformers' GPT-2 (CPU, float32 and float64): each twin's logits and hidden
    states vs GPT2LMHeadModel's."""
    from twin_parity import hf_harness as hh

    for fw in ("torch", "jax"):
        needs = ("torch", "transformers") + (("jax",) if fw == "jax" else ())
        for n in (1, 3) if "float32" in dtypes else ():
            for seq in (1, hh.POSITIONS):
                for attn in hh.ATTN_IMPLEMENTATIONS:
                    yield Planned(f"hf_gpt2 transformers({attn})->{fw} layers={n} seq={seq}", "hf_gpt2", needs,
                                  lambda f=fw, n=n, t=seq, a=attn: hh.hf_gpt2_check(f, n, t, a))
        # float64 (1e-12), where a dropped epsilon or a misread GELU kind cannot hide; GPT-2's own
        # config, and one with another epsilon and exact GELU
        for overrides in ({}, hh.OTHER_CONFIG) if "float64" in dtypes else ():
            config = " ".join(f"{k}={v}" for k, v in overrides.items()) or "GPT-2's config"
            yield Planned(f"hf_gpt2 transformers(eager)->{fw} float64 {config}", "hf_gpt2", needs,
                          lambda f=fw, o=overrides: hh.hf_gpt2_check(f, 1, hh.POSITIONS, "eager", dtype="float64", **o))


def llama_plan(dtypes, skip_training: bool):
    """Rows for the Llama block (twin_parity/llama_harness.py: llama_tiny's RMSNorm, rotary positions,
    grouped-query attention, SwiGLU): forward in each dtype (half-split rope; interleaved too in
    float32); each twin's KV cache against its uncached forward (float32, float64); unless
    --skip-training, gradients, AdamW, a cross-framework resume and generation of the llama GPT;
    transformers' LlamaForCausalLM against each twin (float32, grouped and multi-head, both rope
    layouts). Its sharded rows come with the other sharded rows (llama_sharded_plan)."""
    from twin_parity import generate_harness as gh
    from twin_parity import hf_harness as hh
    from twin_parity import llama_harness as lh

    both = ("torch", "jax")
    for dtype in dtypes:
        for layout in lh.ROPE_LAYOUTS if dtype == "float32" else ("half",):
            for direction in h.DIRECTIONS:
                yield Planned(f"llama forward {direction} {dtype} rope={layout}", "forward", both,
                              lambda d=dtype, r=direction, lay=layout: lh.forward_check(d, r, lay))  # fmt: skip
    if "bfloat16" in dtypes:  # each twin alone against float64: its sublayers, its rotary angles
        for framework in both:
            for impl in ("fused", "math"):
                yield Planned(f"llama bf16 sublayers vs float64 {framework} {impl}", "sublayers_vs_f64", (framework,),
                              lambda f=framework, i=impl: lh.bf16_sublayer_check(f, i))  # fmt: skip
            yield Planned(f"llama bf16 rope vs float64 {framework} ({lh.ROPE_POSITIONS} positions)", "rope_vs_f64",
                          (framework,), lambda f=framework: lh.rope_check(f))  # fmt: skip
    for dtype in (d for d in dtypes if d in ("float32", "float64")):
        for fw in both:
            yield Planned(f"llama kv_cache {fw} cached vs uncached {dtype}", "kv_cache", (fw,),
                          lambda f=fw, d=dtype: lh.kv_cache_check(f, d))  # fmt: skip
    if not skip_training:
        for dtype in (d for d in dtypes if d in ("float32", "float64")):
            for direction in h.DIRECTIONS:
                yield Planned(f"llama grad gpt {direction} {dtype}", "grad", both,
                              lambda d=dtype, r=direction: lh.grad_check(r, d))  # fmt: skip
        if "float32" in dtypes:
            for direction in h.DIRECTIONS:
                yield Planned(f"llama train_step 20 x AdamW {direction}", "train_step", both,
                              lambda r=direction: lh.trajectory_check(r))  # fmt: skip
            for first in both:
                yield Planned(f"llama resume 10 + 10 steps from {first}", "resume", both,
                              lambda f=first: lh.resume_check(f))  # fmt: skip
            for sampling in gh.SAMPLINGS:  # trains llama_tiny (80 steps, once) first
                yield Planned(f"llama generate torch<->jax {sampling}", "generate", both,
                              lambda s=sampling: lh.generate_check(s))  # fmt: skip
    for fw in both if "float32" in dtypes else ():
        needs = ("torch", "transformers") + (("jax",) if fw == "jax" else ())
        for n_kv, layout, overrides in lh.HF_VARIANTS:
            extra = "".join(f" {hh.SHORT.get(k, k)}" for k, v in overrides.items() if v)
            yield Planned(f"hf_llama transformers->{fw} kv_heads={n_kv} rope={layout}{extra}", "hf_llama", needs,
                          lambda f=fw, k=n_kv, lay=layout, o=overrides: hh.hf_llama_check(f, k, lay, **o))  # fmt: skip


def moe_plan(dtypes, skip_training: bool):
    """Rows for the Mixture-of-Experts preset (twin_parity/moe_harness.py): forward and routing in
    each dtype; unless --skip-training, gradients, AdamW, resume, KV cache, generate and transformers'
    Mixtral. Its sharded rows (expert parallelism) come with the other sharded rows (moe_sharded_plan)."""
    from twin_parity import moe_harness as mh

    both = ("torch", "jax")
    for dtype in dtypes:
        for direction in h.DIRECTIONS:
            yield Planned(f"moe forward {direction} {dtype}", "forward", both,
                          lambda d=dtype, r=direction: mh.forward_check(d, r))  # fmt: skip
        yield Planned(f"moe routing {dtype}", "routing", both, lambda d=dtype: mh.routing_check(d))
    for variant in mh.VARIANTS if "float32" in dtypes else ():  # the rules moe_tiny's own config skips
        for direction in h.DIRECTIONS:
            yield Planned(f"moe forward {direction} float32 {variant}", "forward", both,
                          lambda v=variant, r=direction: mh.variant_check(v, r))  # fmt: skip
    if skip_training or "float32" not in dtypes:
        return
    for label, run in mh.checks(skip_training=False):
        if label.split()[1] not in ("forward", "routing"):
            yield Planned(label, label.split()[1], both, run)
    for fw in both:
        yield Planned(f"hf_mixtral transformers->{fw}", "hf_mixtral", ("torch", "transformers", fw),
                      lambda f=fw: mh.hf_mixtral_check(f))  # fmt: skip


def sharded_unavailable() -> str | None:
    """Why the sharded rows cannot run here, or None."""
    import multiprocessing

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no torch.distributed gloo backend"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "the torch workers fork their ranks, which this platform cannot"
    return None


def sharded_plan():
    """The sharded rows: one JAX worker (8 simulated devices, meshes 2x2 and 1x4, plus the resume
    checkpoint), torch workers on 1x2 (with the resume) and 2x2, and sharded torch vs sharded JAX."""
    import tempfile

    from twin_parity import sharded_harness as sh

    tmp = tempfile.TemporaryDirectory()
    init, ckpt = os.path.join(tmp.name, "init.safetensors"), os.path.join(tmp.name, "resume.safetensors")
    docs = {}

    def jax_rows():
        sh.write_init(init)
        docs["jax"] = sh.run_worker("jax", os.path.join(tmp.name, "jax"), init, "--meshes", "2x2", "1x4",
                                    "--resume-save", ckpt)  # fmt: skip
        return docs["jax"]["results"]

    def torch_rows(mesh):
        extra = ["--resume-from", ckpt] if mesh == "1x2" else []
        docs[mesh] = sh.run_worker("torch", os.path.join(tmp.name, f"torch_{mesh}"), init, "--mesh", mesh, *extra)
        return docs[mesh]["results"]

    def cross():
        try:
            failed = [label for key, label in (("2x2", "sharded torch 2x2"), ("jax", "sharded jax")) if key not in docs]
            if failed:  # compares their results: there is nothing to compare
                raise DependencyFailed(f"not run: it compares the results of {' and '.join(failed)}, which failed above")
            return [sh.cross_framework(docs["2x2"], docs["jax"])]
        finally:
            tmp.cleanup()

    both = ("torch", "jax")
    per_mesh, resume = sh.ROWS_PER_MESH, sh.ROWS_PER_RESUME
    yield Planned("sharded jax 2x2, 1x4 (8 simulated CPU devices)", "sharded", both, jax_rows, 2 * per_mesh)
    for mesh in ("1x2", "2x2"):
        yield Planned(f"sharded torch {mesh} (gloo processes)", "sharded", both, lambda m=mesh: torch_rows(m),
                      per_mesh + (resume if mesh == "1x2" else 0))  # fmt: skip
    yield Planned("sharded torch 2x2 vs jax 2x2", "sharded", both, cross)


def moe_sharded_plan():
    """The MoE sharded rows: JAX on 1x2 and 2x2 simulated devices (experts over model) and on
    data=2,expert=2 (experts over expert, tokens dispatched by all-to-all) in one subprocess; torch on
    1x2 and 2x2 (experts over model) and on expert=2 and data=2,expert=2 (gloo processes); each
    mesh's forward and training against one device, the expert meshes' gradients and collectives too."""
    from twin_parity import moe_harness as mh

    both = ("torch", "jax")
    yield Planned("moe sharded jax 1x2, 2x2 (experts over model)", "sharded", both,
                  mh.run_jax_sharded, 2 * len(mh.SHARDED_MESHES))  # fmt: skip
    yield Planned("moe sharded jax data=2,expert=2 (4 simulated CPU devices, all-to-all)", "sharded", both,
                  lambda: [h.Result(**r) for r in mh.run_jax_expert()],
                  mh.ROWS_PER_EXPERT_MESH * len(mh.JAX_EXPERT_MESHES))  # fmt: skip
    for mesh in ((1, 2), (2, 2)):
        yield Planned(f"moe sharded torch {mesh[0]}x{mesh[1]} (gloo processes, experts over model)", "sharded",
                      both, lambda m=mesh: mh.torch_sharded_rows(m), 2)  # fmt: skip
    for mesh in mh.TORCH_EXPERT_MESHES:
        yield Planned(f"moe sharded torch data={mesh[0]},expert={mesh[2]} (gloo processes, all-to-all)", "sharded",
                      both, lambda m=mesh: mh.torch_expert_rows(m), mh.ROWS_PER_EXPERT_MESH)  # fmt: skip


def llama_sharded_plan():
    """The Llama sharded rows: JAX on 2x2 simulated devices in a subprocess, torch on 2x2 (gloo
    processes), forward and training against one device, key/value heads over model."""
    from twin_parity import llama_harness as lh

    both = ("torch", "jax")
    meshes = ", ".join(f"{d}x{m}" for d, m in lh.SHARDED_MESHES)
    yield Planned(f"llama sharded jax {meshes} (kv heads over model)", "sharded", both, lh.run_jax_sharded,
                  2 * len(lh.SHARDED_MESHES))  # fmt: skip
    for mesh in lh.SHARDED_MESHES:
        yield Planned(f"llama sharded torch {mesh[0]}x{mesh[1]} (gloo processes, kv heads over model)", "sharded",
                      both, lambda m=mesh: lh.torch_sharded_rows(m), 2)  # fmt: skip


def _still_run() -> str:
    """The checks --skip-training keeps, in plan order, read from the plans themselves."""
    dtypes = list(h.PARITY_DTYPES)
    names = [p.check for p in plan(dtypes, [4], ["cpu"], {"cpu": None})] + [p.check for p in hf_plan(dtypes)]
    names += [p.check for p in llama_plan(dtypes, skip_training=True)]
    names += [p.check for p in moe_plan(dtypes, skip_training=True)]
    kept = [n for n in dict.fromkeys(names) if n not in TRAINING_CHECKS]
    return ", ".join(kept[:-1]) + " and " + kept[-1]


def plan(dtypes, heads, torch_devices, jax_devices):
    """Yield a Planned check for every cell of the matrix. A framework that is not installed comes
    with torch_devices == [None] or jax_devices == {"cpu": None}: its checks are planned (and then
    skipped by main) so that the report can say what it did not run."""
    both = ("torch", "jax")
    for n_heads in heads:
        cfg = BlockConfig.lesson(n_heads=n_heads)
        for tdev in torch_devices:
            for jname, jdev in jax_devices.items():
                for dtype in dtypes:
                    for direction in h.DIRECTIONS:
                        yield Planned(
                            f"forward {direction} {dtype} heads={n_heads} torch:{tdev} jax:{jname}", "forward", both,
                            lambda c=cfg, d=dtype, r=direction, t=tdev, j=jdev: h.forward_check(c, d, r, t, j),
                        )
    cfg = BlockConfig.lesson(n_heads=max(heads))
    if "float64" in dtypes:  # where a fast-variance LayerNorm (E[x^2] - E[x]^2) cancels
        yield Planned(f"forward torch->jax float64 input mean {h.LARGE_MEAN:g}", "forward", both,
                      lambda: h.forward_check(cfg, "float64", "torch->jax", mean=h.LARGE_MEAN))
    for dtype in dtypes:
        for tdev in torch_devices:
            yield Planned(f"attention paths torch:{tdev} {dtype}", "attn_fused_vs_math", ("torch",),
                          lambda d=dtype, t=tdev: h.attention_paths_check("torch", cfg, d, t))
        for jname, jdev in jax_devices.items():
            if dtype == "float64":  # the Flax twin takes the math path for float64: nothing to compare
                continue
            yield Planned(f"attention paths jax:{jname} {dtype}", "attn_fused_vs_math", ("jax",),
                          lambda d=dtype, j=jdev: h.attention_paths_check("jax", cfg, d, j))
    for dtype in (d for d in dtypes if d in ("float32", "float64")):  # golden refs are not bf16
        for n_heads in heads:
            for tdev in torch_devices:
                yield Planned(f"golden torch:{tdev} {dtype} heads={n_heads}", "golden", ("torch",),
                              lambda d=dtype, n=n_heads, t=tdev: h.golden_check("torch", n, d, t))
            for jname, jdev in jax_devices.items():
                yield Planned(f"golden jax:{jname} {dtype} heads={n_heads}", "golden", ("jax",),
                              lambda d=dtype, n=n_heads, j=jdev: h.golden_check("jax", n, d, j))
    if "float64" in dtypes:  # the project's current defaults against the library-independent vectors
        for tdev in torch_devices:
            yield Planned(f"defaults torch:{tdev} float64", "defaults", ("torch",),
                          lambda t=tdev: h.golden_check("torch", max(heads), "float64", t, defaults=True))
        for jname, jdev in jax_devices.items():
            yield Planned(f"defaults jax:{jname} float64", "defaults", ("jax",),
                          lambda j=jdev: h.golden_check("jax", max(heads), "float64", j, defaults=True))
    if "bfloat16" in dtypes:  # each twin alone against float64: sublayers and the loss
        for framework, devices in (("torch", {t: t for t in torch_devices}), ("jax", jax_devices)):
            for dname, dev in devices.items():
                # on a GPU the fused path runs cuDNN's kernel (attn_kernel="cudnn", the default): a
                # second fused row there covers the library's own kernel (XLA's in JAX)
                kernels = ("cudnn", "library") if dname not in ("cpu", None) else ("cudnn",)
                variants = [("fused", k) for k in kernels] + [("math", "cudnn")]
                for impl, kernel in variants:
                    c = dataclasses.replace(cfg, attn_impl=impl, attn_kernel=kernel)
                    name = impl if kernel == "cudnn" or impl == "math" else f"{impl}/{kernel}"
                    yield Planned(f"bf16 sublayers vs float64 {framework}:{dname} {name}", "sublayers_vs_f64",
                                  (framework,), lambda f=framework, c=c, d=dev: h.bf16_sublayer_check(f, c, d))
            yield Planned(f"bf16 softmax vs float64 {framework}", "softmax_vs_f64", (framework,),
                          lambda f=framework: h.softmax_check(f))
            yield Planned(f"bf16 loss vs float64 {framework}", "loss_vs_f64", (framework,),
                          lambda f=framework: h.loss_check(f))
    for dtype in tuple(dtypes) + (("float16",) if "bfloat16" in dtypes else ()):
        for start in ("torch", "jax"):
            yield Planned(f"roundtrip {start} {dtype}", "roundtrip", both,
                          lambda d=dtype, s=start: h.roundtrip_check(cfg, d, s, via_file=True))
    from twin_parity import generate_harness as gh

    for dtype in (d for d in dtypes if d in ("float32", "float64")):
        for framework, devices in (("torch", {t: t for t in torch_devices}), ("jax", jax_devices)):
            for dname, dev in devices.items():
                dev = None if dname in ("cpu", None) else dev  # None: the harness's CPU default
                yield Planned(f"kv_cache {framework}:{dname} cached vs uncached {dtype}", "kv_cache", (framework,),
                              lambda f=framework, d=dtype, v=dev: gh.kv_cache_check(f, d, device=v))


class DependencyFailed(RuntimeError):
    """A row that compares the results of rows that failed: it names them instead of a KeyError."""


def error_result(item: Planned, error: BaseException) -> h.Result:
    """A check that raised is a failed row carrying the error; the rest of the report still runs."""
    message = f"{type(error).__name__}: {error}".strip()
    return h.Result(item.check, [], "-", None, None, item.label, float("nan"), float("nan"), float("nan"),
                    False, "error", config={}, error=message)  # fmt: skip


def metadata(torch_devices, jax_devices, elapsed: float, missing: dict) -> dict:
    import importlib

    import numpy

    with matched_precision():  # what every check ran under
        precision_in_checks = describe_precision()
    versions = {"numpy": numpy.__version__}
    for name in ("torch", "jax", "jaxlib", "flax"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    torch_names = {}
    if "torch" not in missing:
        import torch

        torch_names = {d: (torch.cuda.get_device_name(0) if d == "cuda" else platform.processor() or "cpu")
                       for d in torch_devices}  # fmt: skip
    meta = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "missing_frameworks": missing,
        "torch_devices": torch_names,
        "jax_devices": {name: str(dev.device_kind) for name, dev in jax_devices.items() if dev is not None},
        "precision": precision_in_checks,
        "parity_checks_run_pinned": True,
        "tolerances": {k: {"atol": t.atol, "ulps": t.ulps, "reason": t.reason} for k, t in TOLERANCES.items()},
        "input_shape": list(h.LESSON_SHAPE),
        "elapsed_s": round(elapsed, 2),
    }  # fmt: skip
    return meta


def _divergence_cell(r: h.Result) -> str:
    if r.error is not None:  # the JSON has it in full
        lines = [line.strip() for line in r.error.splitlines() if line.strip()]
        # A worker's error carries its traceback: the cause is its last line, not the first.
        cause = lines[-1][:160]
        head = "" if len(lines) == 1 else lines[0].rstrip(":")[: max(20, 200 - len(cause))] + ": ... "
        return f"error: {head}{cause}"
    return r.divergence_detail or r.first_divergence or "-"


def format_table(results) -> str:
    headers = ("check", "model", "direction", "dtype", "torch", "jax", "heads", "max abs err",
               "max rel err", "tolerance", "result", "first divergence")  # fmt: skip
    rows = [
        (r.check, r.config.get("model", "block"), r.direction, r.dtype, r.torch_device or "-", r.jax_device or "-",
         str(r.config.get("n_heads", "-")), f"{r.max_abs_err:.2e}", f"{r.max_rel_err:.2e}",
         f"{r.tolerance:.1e}", "PASS" if r.passed else "FAIL", _divergence_cell(r))
        for r in results
    ]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--dtypes", nargs="+", default=list(h.PARITY_DTYPES),
                        choices=h.PARITY_DTYPES, help="dtypes to check (default: all)")
    parser.add_argument("--heads", nargs="+", type=int, default=list(HEAD_COUNTS),
                        help="head counts at d_model 128 (default: 1 4)")
    parser.add_argument("--skip-training", action="store_true",
                        help=f"leave out the checks that train ({', '.join(TRAINING_CHECKS)}) and the sharded rows; "
                             f"{_still_run()} still run")  # fmt: skip
    parser.add_argument("--skip-sharded", action="store_true",
                        help="leave out the sharded rows (subprocesses with simulated devices, ~1-3 min)")
    parser.add_argument("--only", nargs="+", metavar="CHECK",
                        help="run only these checks (names as in the table's first column; 'sharded' for all sharded rows)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    bad_heads = [n for n in args.heads if n < 1 or 128 % n]
    if bad_heads:
        parser.error(f"--heads must divide d_model=128; got {bad_heads}")
    why = args.json is not None and cannot_write(args.json, folder=False)
    if why:  # found now, not after minutes of checks
        print(f"error: --json {args.json}: {why}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    # A machine may have one framework only (a TPU VM has no torch): run what it can, list the rest.
    missing = {name: reason for name in ("torch", "jax", "transformers") if (reason := h.framework_missing(name))}
    torch_devices = [None] if "torch" in missing else h.torch_devices()
    jax_devices = {"cpu": None} if "jax" in missing else h.jax_devices()
    planned = list(plan(args.dtypes, args.heads, torch_devices, jax_devices))
    if not args.skip_training:
        planned += list(training_plan(args.dtypes, torch_devices, jax_devices))
    planned += list(hf_plan(args.dtypes))
    planned += list(llama_plan(args.dtypes, args.skip_training))
    planned += list(moe_plan(args.dtypes, args.skip_training))
    if args.only:
        known = sorted({p.check for p in planned} | {"sharded"})
        unknown = [c for c in args.only if c not in known]
        if unknown:
            parser.error(f"--only: no check named {unknown} with these options; known: {', '.join(known)}")
        planned = [p for p in planned if p.check in args.only]
    why = lambda p: "; ".join(missing[f] for f in p.needs if f in missing)  # noqa: E731
    checks = [p for p in planned if not why(p)]
    skipped = [p for p in planned if why(p)]
    if args.skip_sharded or args.skip_training:
        skipped_sharded = "--skip-sharded" if args.skip_sharded else "--skip-training"
    elif "torch" in missing or "jax" in missing:
        skipped_sharded = "they need both frameworks"
    else:
        skipped_sharded = sharded_unavailable()
    if args.only and "sharded" not in args.only:
        skipped_sharded = "--only"
    if skipped_sharded is None and "float32" in args.dtypes:
        checks += list(sharded_plan()) + list(moe_sharded_plan()) + list(llama_sharded_plan())
    elif not args.quiet and "float32" in args.dtypes:
        print(f"sharded rows skipped: {skipped_sharded}", file=sys.stderr)
    if not args.quiet:
        rows = sum(p.rows for p in checks)
        print(f"running {len(checks)} checks ({rows} rows); torch devices {torch_devices}, "
              f"jax devices {list(jax_devices)}", file=sys.stderr)  # fmt: skip
    results = []
    for i, item in enumerate(checks, 1):
        try:
            result = item.run()
        except Exception as e:  # noqa: BLE001  (a raising check is a failed row, not a crashed report)
            result = error_result(item, e)
        group = result if isinstance(result, list) else [result]  # a sharded worker returns several
        results.extend(group)
        if not args.quiet:
            verdict = "ok" if all(r.passed for r in group) else "FAIL"
            print(f"[{i:3d}/{len(checks)}] {verdict:4s} {item.label}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start

    print(format_table(results) if results else "(no check could run)")
    failed = [r for r in results if not r.passed]
    if skipped:
        print(f"\nskipped {len(skipped)} checks:")
        for reason in sorted({why(p) for p in skipped}):
            same = [p for p in skipped if why(p) == reason]
            print(f"  {len(same)} ({', '.join(dict.fromkeys(p.check for p in same))}): {reason}")
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed, {len(skipped)} skipped in {elapsed:.1f} s "
          f"(matmul precision pinned to 'highest' in both frameworks)")  # fmt: skip
    if args.json:
        doc = {"meta": metadata(torch_devices, jax_devices, elapsed, missing),
               "results": [r.to_json() for r in results],
               "skipped": [{"check": p.check, "label": p.label, "reason": why(p)} for p in skipped]}  # fmt: skip
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        write_atomic(args.json, json.dumps(doc, indent=2).encode())
        print(f"wrote {args.json}")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
