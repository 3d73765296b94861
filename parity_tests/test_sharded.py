"""Sharded twins: each on a (data, model) mesh of simulated CPU devices against itself on one device
(forward with every intermediate, gradients, 20 AdamW steps), sharded torch against sharded JAX,
a run resumed across meshes and frameworks, and the collectives Megatron predicts.

The workers run in subprocesses (twin_parity/sharded_harness.py): JAX with 8 simulated devices,
torch with one forked gloo process per device. One worker call covers several checks, since
starting one costs seconds. The default run covers every mesh family, tensor parallel (1x4 JAX,
1x2 torch) and both axes together (2x2 in both); the other meshes the issue lists run under
``-m slow``.
"""

from __future__ import annotations

import os

import pytest

from twin_parity import sharded_harness as sh
from twin_parity.testing import HAVE_JAX, HAVE_TORCH

pytestmark = pytest.mark.skipif(not (HAVE_TORCH and HAVE_JAX), reason="needs torch and jax/flax")

DEFAULT_JAX = ("2x2", "1x4")
SLOW_JAX = ("1x2", "2x1", "2x4")
DEFAULT_TORCH = ("1x2", "2x2")
SLOW_TORCH = ("2x1",)


def _params(default, slow):
    return [*default, *(pytest.param(m, marks=pytest.mark.slow) for m in slow)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    sh.write_init(str(path / "init.safetensors"))
    return path


@pytest.fixture(scope="module")
def jax_default(workdir):
    return sh.run_worker("jax", str(workdir / "jax"), str(workdir / "init.safetensors"),
                         "--meshes", *DEFAULT_JAX, "--resume-save", str(workdir / "resume.safetensors"), "--sabotage")  # fmt: skip


@pytest.fixture(scope="module")
def jax_slow(workdir):
    return sh.run_worker("jax", str(workdir / "jax_slow"), str(workdir / "init.safetensors"), "--meshes", *SLOW_JAX)


_torch_docs: dict = {}


@pytest.fixture(scope="module")
def torch_doc(workdir, jax_default):
    """The torch worker for a mesh, run once (1x2 also resumes the JAX 2x2 checkpoint)."""

    def get(mesh: str) -> dict:
        if mesh not in _torch_docs:
            extra = ["--resume-from", str(workdir / "resume.safetensors")] if mesh == "1x2" else []
            _torch_docs[mesh] = sh.run_worker("torch", str(workdir / f"torch_{mesh}"),
                                              str(workdir / "init.safetensors"), "--mesh", mesh, *extra)  # fmt: skip
        return _torch_docs[mesh]

    yield get
    _torch_docs.clear()


def _jax(request, mesh: str) -> dict:
    return request.getfixturevalue("jax_default" if mesh in DEFAULT_JAX else "jax_slow")


def _rows(doc: dict, mesh: str, check: str | None = None):
    shape = sh.parse_mesh_name(mesh)
    d, m = shape.data, shape.model
    return [r for r in doc["results"]
            if r.config["mesh"] == {"data": d, "model": m} and (check is None or r.check == check)]  # fmt: skip


def _assert_rows(rows, expected: set[str]):
    assert {f"{r.check} {r.config['model']}" for r in rows} == expected
    for r in rows:
        assert r.passed, (f"{r.check} ({r.config['model']}, {r.direction}) first over "
                          f"{r.tolerance:.0e} at {r.first_divergence}: max abs err {r.max_abs_err:.2e}")  # fmt: skip
        assert r.max_abs_err <= sh.SHARDED_TOLERANCE


PARITY_ROWS = {"sharded_forward gpt", "sharded_forward block", "sharded_grad gpt", "sharded_train_step gpt"}


# ------------------------------------------------------------------------------------------- JAX


@pytest.mark.parametrize("mesh", _params(DEFAULT_JAX, SLOW_JAX))
def test_jax_sharded_matches_one_device(request, mesh):
    doc = _jax(request, mesh)
    _assert_rows([r for r in _rows(doc, mesh) if r.check != "sharded_collectives"], PARITY_ROWS)
    # parameters and Adam moments stay laid out as the plan says, before and after 20 steps
    placement = doc["runs"][mesh]["placement"]
    assert placement == {"q_proj_kernel_spec": "P(None, 'model')", "q_proj_kernel_spec_after": "P(None, 'model')",
                         "q_proj_mu_spec": "P(None, 'model')"}  # fmt: skip


@pytest.mark.parametrize("mesh", _params(DEFAULT_JAX, SLOW_JAX))
def test_jax_forward_collectives_are_megatrons(request, mesh):
    """Compiled forward: exactly two all-reduces per block, each over the "model" axis, and nothing
    else: no all-gather of parameters, no reduce-scatter, no permute. A plan change that adds or
    moves a collective fails here."""
    run = _jax(request, mesh)["runs"][mesh]
    model_size = sh.parse_mesh_name(mesh).model
    for model, n_blocks in (("gpt", sh.GPT_CFG.n_layers), ("block", 1)):
        found = run["comm"][model]
        if model_size == 1:
            assert found == [], f"{model}: pure data parallel needs no collective in the forward, got {found}"
            continue
        assert [op for op, _ in found] == ["all-reduce"] * 2 * n_blocks, f"{model}: {found}"
        groups = run["model_groups"]
        for _, replica_groups in found:  # [] means one group of every device: the mesh is (1, M)
            assert sorted(map(sorted, replica_groups or [sum(groups, [])])) == groups, (replica_groups, groups)


def test_jax_collective_check_catches_a_wrong_plan(jax_default):
    """The count above can fail: with out_proj split by output features instead of input features,
    XLA must gather the attention's head slices, and the compiled forward shows it."""
    sabotaged = jax_default["runs"]["sabotage"]["comm"]
    assert [op for op, _ in sabotaged] != ["all-reduce"] * 2 * sh.GPT_CFG.n_layers, sabotaged


def test_jax_collective_rows_pass_and_fail_on_a_wrong_plan(jax_default):
    """The report's sharded_collectives rows: Megatron's count on every default mesh; the wrong
    split above (right numbers, extra collectives) fails one, naming the model and the collective."""
    for mesh in DEFAULT_JAX:
        rows = _rows(jax_default, mesh, "sharded_collectives")
        assert len(rows) == 1 and rows[0].passed, rows
    wrong = sh.jax_counts(jax_default["runs"]["sabotage"]["comm"])
    r = sh.collectives_row("jax", (1, 2), {"gpt": wrong, "block": sh.megatron_collectives("block", 2)})
    assert not r.passed and r.max_abs_err > 0, r
    assert r.first_divergence.startswith("gpt: ") and "(Megatron: " in r.first_divergence, r.first_divergence


# ----------------------------------------------------------------------------------------- torch


@pytest.mark.parametrize("mesh", _params(DEFAULT_TORCH, SLOW_TORCH))
def test_torch_sharded_matches_one_device(torch_doc, mesh):
    doc = torch_doc(mesh)
    _assert_rows([r for r in _rows(doc, mesh) if r.check not in ("sharded_resume", "sharded_collectives")], PARITY_ROWS)
    placements = doc["runs"][mesh]["placements"]
    if sh.parse_mesh_name(mesh).model > 1:  # DTensor placements as the table's split column says
        assert placements["blocks.0.attn.q_proj.weight"] == "(Replicate(), Shard(dim=0))"
        assert placements["blocks.0.attn.out_proj.weight"] == "(Replicate(), Shard(dim=1))"
        assert placements["blocks.0.attn.out_proj.bias"] == "(Replicate(), Replicate())"
    assert placements["blocks.0.ln_1.weight"] == "(Replicate(),)"  # whole; replicated over "data"


@pytest.mark.parametrize("mesh", _params(DEFAULT_TORCH, SLOW_TORCH))
def test_torch_forward_collectives_are_megatrons(torch_doc, mesh):
    """CommDebugMode over the forward: exactly one all-reduce in each attn.out_proj and each
    mlp.fc_out (RowwiseParallel, over "model"), none anywhere else, no all-gather."""
    comm = torch_doc(mesh)["runs"][mesh]["comm"]
    model_size = sh.parse_mesh_name(mesh).model
    for model, n_blocks in (("gpt", sh.GPT_CFG.n_layers), ("block", 1)):
        counts, by_module = comm[model]["counts"], comm[model]["by_module"]
        if model_size == 1:
            assert counts == {}, f"{model}: pure data parallel needs no collective in the forward, got {counts}"
            continue
        assert counts == {"all_reduce": 2 * n_blocks}, f"{model}: {counts}"
        leaves = {m: c for m, c in by_module.items() if m.endswith(("attn.out_proj", "mlp.fc_out"))}
        assert len(leaves) == 2 * n_blocks and all(c == {"all_reduce": 1} for c in leaves.values()), by_module


@pytest.mark.parametrize("mesh", DEFAULT_TORCH)
def test_torch_collective_rows_pass(torch_doc, mesh):
    rows = _rows(torch_doc(mesh), mesh, "sharded_collectives")
    assert len(rows) == 1 and rows[0].passed, rows


# ------------------------------------------------------------------------------ across frameworks


def test_torch_2x2_matches_jax_2x2(torch_doc, jax_default):
    """Sharded torch vs sharded JAX on the same (2, 2) mesh, one converted init, the same batches."""
    result = sh.cross_framework(torch_doc("2x2"), jax_default)
    _assert_rows([result], {"sharded_train_step gpt"})


def test_resume_jax_2x2_then_torch_1x2(torch_doc):
    """10 steps JAX on (2, 2), the gathered checkpoint, 10 steps torch on (1, 2): as 20 steps of
    torch on one device."""
    rows = [r for r in torch_doc("1x2")["results"] if r.check == "sharded_resume"]
    _assert_rows(rows, {"sharded_resume gpt"})


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text, message", [
    ("data=2,model=x", "needs an integer size"),
    ("data=2,model", "data=D,model=M"),
    ("data=2,tensor=2", "axes data, model"),
    ("model=2,model=4", "twice"),
    ("data=0", "positive int"),
    ("", "data=D,model=M"),
])  # fmt: skip
def test_mesh_flag_is_parsed_strictly(text, message):
    from twin_common.mesh import parse_mesh

    with pytest.raises(ValueError, match=message):
        parse_mesh(text)


def test_mesh_sizes_are_checked_together_before_any_work():
    """Heads, MLP width, d_model, batch and devices: every problem in one ValueError."""
    from twin_common import GPTConfig
    from twin_common.mesh import MeshShape, check_mesh, parse_mesh

    assert parse_mesh("model=4") == MeshShape(1, 4) and parse_mesh(" data=2 , model=2 ") == MeshShape(2, 2)
    cfg = GPTConfig(d_model=30, n_heads=6, mlp_ratio=1)
    with pytest.raises(ValueError) as e:
        check_mesh(MeshShape(3, 4), cfg, n_devices=8, batch_size=4)
    text = str(e.value)
    for part in ("needs 12 devices, but only 8", "n_heads=6 is not divisible by model=4",
                 "MLP hidden width 30 is not divisible", "d_model=30", "batch size 4 is not divisible by data=3"):
        assert part in text, text
    check_mesh(MeshShape(2, 2), GPTConfig(d_model=32, n_heads=4), n_devices=8, batch_size=4)  # fits


def test_torch_world_size_must_match_the_mesh(monkeypatch):
    """torchrun's WORLD_SIZE against --mesh: a clear error before any process group is made."""
    import torch.distributed as dist

    from torch_impl.sharding import init_distributed
    from twin_common import GPTConfig
    from twin_common.mesh import MeshShape

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"needs 4 processes, but the world size is 3 \(launch with torchrun --nproc-per-node 4\)"):
        init_distributed(MeshShape(2, 2), GPTConfig(d_model=32, n_heads=4))
    assert not dist.is_initialized()


def test_jax_mesh_larger_than_the_devices_is_refused():
    import jax

    from jax_impl.sharding import init_distributed
    from twin_common import GPTConfig
    from twin_common.mesh import MeshShape

    n = len(jax.devices())
    needed = 2 * (n + 1)
    with pytest.raises(ValueError, match=f"needs {needed} devices, but only {n} are visible .*"
                                         f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}\\)"):
        init_distributed(MeshShape(2, n + 1), GPTConfig(d_model=32 * (n + 1), n_heads=4 * (n + 1)))


def test_train_script_refuses_a_bad_mesh_before_writing(tmp_path, capsys):
    from scripts.train import main

    out = tmp_path / "run"
    code = main(["--framework", "jax", "--mesh", "data=2,model=3", "--model", "tiny", "--steps", "2", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "n_heads=2 is not divisible by model=3" in err, err
    assert not out.exists()
    assert main(["--framework", "compare", "--mesh", "model=2", "--out", str(out)]) == 2
    assert "--mesh is for --framework torch or jax" in capsys.readouterr().err


def test_the_plan_comes_from_the_table():
    """Both plans are read from the table's split column, and agree with it."""
    from jax_impl.sharding import tp_plan as jax_plan
    from torch_impl.sharding import tp_plan as torch_plan
    from twin_common import GPTConfig
    from twin_common.params import Split, table_for

    cfg = GPTConfig(d_model=32, n_heads=4, n_layers=1)
    t, j = torch_plan(cfg), jax_plan(cfg)
    assert {k: type(v).__name__ for k, v in t.items()} == {
        "blocks.0.attn.q_proj": "ColwiseParallel", "blocks.0.attn.k_proj": "ColwiseParallel",
        "blocks.0.attn.v_proj": "ColwiseParallel", "blocks.0.attn.out_proj": "RowwiseParallel",
        "blocks.0.mlp.fc_in": "ColwiseParallel", "blocks.0.mlp.fc_out": "RowwiseParallel",
    }  # fmt: skip
    for spec in table_for(cfg):
        pspec = tuple(j[spec.flax_path])
        assert len(pspec) == len(spec.flax_shape)
        if spec.split is Split.REPLICATED:
            assert all(p is None for p in pspec), spec
        else:  # "model" on the Flax dimension the torch one maps to through the transform
            assert pspec.index("model") == spec.split.flax_dim(spec), spec
            assert spec.flax_shape[spec.split.flax_dim(spec)] == spec.torch_shape[spec.split.torch_dim(spec)]


def test_a_killed_rank_stops_the_others_quickly(workdir):
    """Rank 1 of two dies before the first step; rank 0 must stop with a clear error, not wait
    (gloo reports the closed connection; a hung peer would hit the collective timeout instead)."""
    doc = sh.run_worker("killed-rank", str(workdir / "killed"), str(workdir / "init.safetensors"), timeout=300)
    run = doc["runs"]["killed_rank"]
    assert run["still_running_after_timeout"] == []
    assert run["message"].startswith("rank 0: a collective failed at step 0; another process of this job has probably died"), run
    assert run["seconds"] < 30, run  # the collective timeout in this test; measured 0.4 s


# Each leg: the first framework and mesh stop at step 2, the second resumes to the end. Together the
# legs cover every mesh family in the CLI: JAX data x model, torch model, torch data, JAX model, and
# the MoE preset on data x expert in both (the README's expert-axis commands).
TRAIN_SCRIPT_LEGS = [
    ("tiny", ("jax", "data=2,model=2"), ("torch", "model=2")),
    ("tiny", ("torch", "data=2"), ("jax", "model=2")),
    ("moe-tiny", ("jax", "data=2,expert=2"), ("torch", "data=2,expert=2")),
]


def _one_device_sample(ckpt: str, n_new: int, seed: int) -> str:
    """What scripts.train's end-of-run sample prints for ``ckpt``, computed by torch on one device."""
    import torch

    import weight_conversion as wc
    from torch_impl.generate import continue_prompt
    from torch_impl.gpt import GPT
    from twin_common import GPTConfig
    from twin_common import data as D
    from weight_conversion.checkpoint import load_checkpoint, read_checkpoint_metadata

    _, cfg, _ = read_checkpoint_metadata(ckpt)
    cfg = GPTConfig.from_dict(cfg)
    seq_len = cfg.block_size  # scripts.train's default --seq-len
    weights, _, _ = load_checkpoint(ckpt, cfg)
    model = GPT(cfg)
    wc.import_(model, weights)
    train, _ = D.split(D.generated_corpus(), seq_len)
    prompt = list(train[: min(8, seq_len)])
    with torch.no_grad():
        return D.decode(continue_prompt(model.eval(), prompt, n_new, 0.8, seed))


@pytest.mark.parametrize("model, first, second", TRAIN_SCRIPT_LEGS,
                         ids=[f"{m}:" + "->".join(f"{f}:{mesh}" for f, mesh in legs) for m, *legs in TRAIN_SCRIPT_LEGS])
def test_train_script_on_meshes_and_across_frameworks(tmp_path, model, first, second):
    """The command-line path end to end, with the CLI's defaults (validation loss, checkpoints, the
    end-of-run sample): the first leg writes the gathered checkpoint at step 2, the second resumes
    it on another mesh in the other framework to the end, evaluates, checkpoints and samples on a
    tensor-parallel model; rank 0 alone writes, the log holds every step once, and the sample is
    the one a single device draws from the same checkpoint."""
    import json
    import subprocess
    import sys

    out = str(tmp_path / "run")
    common = ["--model", model, "--steps", "4", "--batch-size", "4", "--out", out, "--quiet"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))

    def command(framework, mesh):
        n = 1
        for part in mesh.split(","):
            n *= int(part.split("=")[1])
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
                  if framework == "torch" else [sys.executable])  # fmt: skip
        return launch + ["-m", "scripts.train", "--framework", framework, "--mesh", mesh]

    runs = [command(*first) + ["--stop-at", "2"], command(*second) + ["--resume"]]
    for cmd in runs:  # bytes, not text=True: a sampled "\r" must not become "\n"
        proc = subprocess.run(cmd + common, env={**env, "PYTHONIOENCODING": "utf-8"}, capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "val_loss" in records[-1]  # the default --eval-every ran at the last step
    with open(os.path.join(out, "latest.json")) as f:
        latest = json.load(f)
    assert latest["step"] == 4 and latest["framework"] == second[0]
    assert sorted(os.listdir(os.path.join(out, "ckpt"))) == ["step_000002.safetensors", "step_000004.safetensors"]
    printed = proc.stdout.decode().split("sample:\n", 1)[1].removesuffix("\n")
    expected = _one_device_sample(os.path.join(out, latest["checkpoint"]), n_new=200, seed=0)
    assert printed == expected


# A wrong split in the shared table as the JAX worker sees it: out_proj split by output features
# (like q_proj) instead of input features. Loaded by the worker's interpreter at start-up.
WRONG_SPLIT = """
import os
if os.environ.get("JAX_PLATFORMS") == "cpu":  # the JAX worker only
    import dataclasses
    from jax_impl import sharding as S
    from twin_common import params as T
    honest = S.table_for
    S.table_for = lambda cfg: tuple(
        dataclasses.replace(s, split=T.Split.OUT_FEATURES) if s.torch_key.endswith("attn.out_proj.weight") else s
        for s in honest(cfg))
"""


@pytest.mark.slow
def test_report_fails_a_wrong_shared_split_in_jax_on_its_collectives(monkeypatch, tmp_path, capsys):
    """Right numbers, extra collectives: the value rows pass, the collectives rows fail and name them.
    (The default run covers the row on the same wrong plan: test_jax_collective_rows_pass_and_fail_on_a_wrong_plan.)"""
    from scripts import parity_report

    (tmp_path / "sitecustomize.py").write_text(WRONG_SPLIT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    real = sh.run_worker
    def jax_only(framework, *args, **kwargs):
        if framework != "jax":
            raise RuntimeError("the torch workers are not run here")
        return real(framework, *args, **kwargs)

    monkeypatch.setattr(sh, "run_worker", jax_only)
    # the MoE and Llama sharded rows start their own workers and have their own tests: not this one's
    monkeypatch.setattr(parity_report, "moe_sharded_plan", lambda: iter(()))
    monkeypatch.setattr(parity_report, "llama_sharded_plan", lambda: iter(()))
    assert parity_report.main(["--quiet", "--only", "sharded", "--dtypes", "float32"]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sharded_")]
    collective = [r for r in rows if r.startswith("sharded_collectives")]
    assert len(collective) == 2 and all(" FAIL " in r and "gpt: " in r and "(Megatron: " in r for r in collective), rows
    assert all(" PASS " in r for r in rows if r.startswith("sharded_forward")), rows


def test_workers_write_the_rows_parity_report_announces(jax_default, torch_doc):
    """parity_report counts its rows before it runs (sharded workers return several each) from
    ROWS_PER_MESH and ROWS_PER_RESUME; the workers must write exactly that many."""
    assert len(jax_default["results"]) == sh.ROWS_PER_MESH * len(DEFAULT_JAX)
    assert len(torch_doc("1x2")["results"]) == sh.ROWS_PER_MESH + sh.ROWS_PER_RESUME
    assert len(torch_doc("2x2")["results"]) == sh.ROWS_PER_MESH


def test_llama_torch_sharded_rows_fail_on_kv_heads_tiled(monkeypatch):
    """The torch twin's repeat_kv tiles the key/value heads (kv0 kv1 kv0 kv1) instead of repeating
    each for its group (kv0 kv0 kv1 kv1). On model=2 each rank holds one key/value head, where the
    two agree, while one device pairs query heads 1 and 2 with the wrong head: the Llama sharded
    rows of torch fail, forward first. (The gloo ranks are forked: they run the patched twin too.)"""
    import torch_impl.block as tb
    from twin_parity import llama_harness as lh

    monkeypatch.setattr(tb, "repeat_kv", lambda k, group: k.repeat(1, group, 1, 1))
    rows = lh.torch_sharded_rows()
    assert [(r.check, r.passed, r.first_divergence) for r in rows] == [
        ("sharded_forward", False, "sharded_forward"), ("sharded_train_step", False, "sharded_train_step")]
    assert rows[0].max_abs_err > 100 * rows[0].tolerance, rows[0]

