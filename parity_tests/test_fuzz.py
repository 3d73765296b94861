"""Seeded fuzzing of every file and flag the project reads: safetensors weight files (ours, with a
content hash, and another tool's, without), training checkpoints, latest.json, and the training CLI.

Each generated case must end in a typed refusal (CheckpointError / ConversionError / RunError, or
exit code 2 from the CLI) or in a load whose content equals what was written; never an untyped
exception, a hang (each case runs under a SIGALRM deadline), a silent acceptance of changed content
in a file the project wrote, a file the safetensors library refuses but we accept, or a model or run
folder changed by a refusal. Every test prints its counts (``pytest -s`` shows them).

The default run makes 2,800 cases in about 30 s of CPU time; ``-m slow`` (or FUZZ_SLOW=1) runs 5x
as many per seed, for two more seeds. ``FUZZ_SCALE=N`` multiplies both.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import random
import shutil
import signal
import struct

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs both frameworks")
pytest.importorskip("flax", reason="needs both frameworks")

import safetensors  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402

import weight_conversion as wc  # noqa: E402
import weight_conversion.safetensors_io as st_io  # noqa: E402
from scripts import train as T  # noqa: E402
from scripts.run_folder import RunDir, RunError, check_extra  # noqa: E402
from torch_impl.gpt import GPT  # noqa: E402
from weight_conversion.checkpoint import load_checkpoint, read_checkpoint_metadata  # noqa: E402

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
TYPED = (st_io.CheckpointError, wc.ConversionError, RunError)
TINY = T.MODELS["tiny"]


OK = ("refused", "accepted", "accepted_unhashed")  # accepted: content equal to what was written


class Hang(BaseException):  # not an Exception: nothing under test can swallow it
    pass


class Tally:
    def __init__(self, name: str):
        self.name, self.counts, self.failures = name, collections.Counter(), []

    def run(self, label: str, fn, seconds: int = 5):
        """fn() -> "accepted" / "refused" / a failure text; exceptions are classified here."""

        def expire(signum, frame):
            raise Hang()

        old = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            outcome = fn()
        except TYPED:
            outcome = "refused"
        except Hang:
            outcome = "hang"
        except Exception as e:  # noqa: BLE001 - the point: any other exception is a finding
            outcome = f"untyped {type(e).__name__}: {str(e)[:120]}"
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        kind = outcome if outcome in OK else outcome.split(":")[0].split(" ")[0]
        self.counts[kind] += 1
        if kind not in OK:
            self.failures.append(f"{label}: {outcome}")

    def check(self):
        total = sum(self.counts.values())
        print(f"\nfuzz {self.name}: {total} cases, {self.counts['refused']} refused, "
              f"{self.counts['accepted']} accepted with unchanged content, "
              f"{self.counts['accepted_unhashed']} accepted without a hash to check (another tool's file, "
              f"read by the library too), {len(self.failures)} failures {dict(self.counts)}")  # fmt: skip
        assert not self.failures, f"{len(self.failures)} of {total} cases failed:\n" + "\n".join(self.failures[:30])


# --------------------------------------------------------------------------------- mutations


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header_text: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header_text)) + header_text + body


NASTY_NUMBERS = [-1, -(2**63), 2**63, 2**64, 2**64 + 16, 1.5, 16.0, "16", True, None, [], {}, 10**400]


def _mutate_header(rng: random.Random, data: bytes) -> bytes:
    header, body = _header(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    choice = rng.randrange(14)
    if choice == 0:
        entry["dtype"] = rng.choice(["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL", "f32", "F8_E4M3", "", 5, None])
    elif choice == 1:
        entry["shape"] = [rng.choice(NASTY_NUMBERS + [0, 1, 3])] * rng.randrange(0, 4)
    elif choice == 2:
        entry["shape"] = entry["shape"] + [rng.choice([1, 2, 0])]
    elif choice == 3:
        i = rng.randrange(2)
        entry["data_offsets"][i] = rng.choice(NASTY_NUMBERS + [entry["data_offsets"][i] + rng.choice([-4, -1, 1, 4])])
    elif choice == 4:
        entry["data_offsets"] = entry["data_offsets"][::-1] if rng.random() < 0.5 else entry["data_offsets"] + [0]
    elif choice == 5:
        del entry[rng.choice(list(entry))]
    elif choice == 6:
        header["__metadata__"] = rng.choice([None, [], 0, "x", {"a": 1}, {"a": None}, {"a": {"b": "c"}}])
    elif choice == 7:
        other = rng.choice(names)
        header[name]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    elif choice == 8:  # a duplicated key, which json.dumps cannot write: splice it in as text
        text = json.dumps(header, separators=(",", ":"))
        dup = json.dumps({name: entry}, separators=(",", ":"))[1:-1]
        return _pack((text[:-1] + "," + dup + "}").encode(), body)
    elif choice == 9:
        return _pack(b"\xef\xbb\xbf" + json.dumps(header).encode(), body)
    elif choice == 10:
        depth = rng.choice([10, 1000, 100_000])
        return _pack(("[" * depth + "]" * depth).encode(), body)
    elif choice == 11:
        header[name + "_copy"] = dict(entry)
    elif choice == 12:
        meta = header.setdefault("__metadata__", {})
        if meta:
            key = rng.choice(list(meta))
            meta[key] = meta[key][:-1] + rng.choice("0af ")
    else:
        header[name]["shape"] = list(reversed(entry["shape"]))  # same size, other shape
    text = json.dumps(header, separators=(",", ":")).encode()
    return _pack(text + b" " * rng.choice([0, 0, 3]), body)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    choice = rng.randrange(6)
    if choice <= 1:  # bit flips anywhere, or in the data section
        n = struct.unpack("<Q", bytes(data[:8]))[0]
        start = 8 + n if choice == 1 and 8 + n < len(data) else 0
        for _ in range(rng.choice([1, 1, 2, 5])):
            data[rng.randrange(start, len(data))] ^= 1 << rng.randrange(8)
    elif choice == 2:
        del data[rng.randrange(len(data)) :]
    elif choice == 3:
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100])))
    elif choice == 4:
        lie = rng.choice([0, 1, 7, len(data), 2**63, 2**64 - 1, struct.unpack("<Q", bytes(data[:8]))[0] + rng.choice([-8, -1, 1, 8])])
        data[:8] = struct.pack("<Q", lie % 2**64)
    else:
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256)
    return bytes(data)


def _mutate(rng, data: bytes) -> bytes:
    return _mutate_header(rng, data) if rng.random() < 0.5 else _mutate_bytes(rng, data)


def _library_accepts(path) -> bool:
    try:
        with safetensors.safe_open(path, "numpy") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # noqa: BLE001
        return False
    return True


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a
    )


# ---------------------------------------------------------------------------- weight files


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fuzz_weight_files(tmp_path, seed: int, cases: int) -> Tally:
    torch.manual_seed(0)
    source, target = GPT(TINY), GPT(TINY)
    ours = tmp_path / "ours.safetensors"
    wc.save(source, ours)
    theirs = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(wc.export(source), theirs)
    bases = {"ours": (ours.read_bytes(), *st_io.load_file(ours)), "theirs": (theirs.read_bytes(), *st_io.load_file(theirs))}
    rng = random.Random(seed)
    tally = Tally(f"safetensors weight files (seed {seed})")
    path = tmp_path / "case.safetensors"
    for i in range(cases):
        kind = "ours" if i % 3 else "theirs"
        good, arrays, metadata = bases[kind]
        path.write_bytes(_mutate(rng, good))

        def case(kind=kind, arrays=arrays, metadata=metadata):
            before = _params(target)
            try:
                got_arrays, got_metadata = st_io.load_file(path)
            except st_io.CheckpointError:
                try:  # the whole path into a model: refused too, and the model untouched
                    wc.load(target, path)
                except TYPED:
                    pass
                else:
                    return "load_file refused a file wc.load accepted"
                after = _params(target)
                return "refused" if all(torch.equal(before[k], after[k]) for k in before) else "model changed"
            if not _library_accepts(path):
                return "laxer than safetensors: accepted a file the library refuses"
            if kind == "theirs":  # no hash: a change in the data cannot be seen, as in the library
                return "accepted_unhashed"
            if not (_same(arrays, got_arrays) and metadata == got_metadata):
                return "silent acceptance of changed content"
            return "accepted"

        tally.run(f"{kind} case {i}", case)
    return tally


@pytest.mark.parametrize("seed", [0])
def test_fuzz_weight_files(tmp_path, seed):
    _fuzz_weight_files(tmp_path, seed, 1500 * SCALE).check()


# ----------------------------------------------------------------------- training checkpoints


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert T.main(["--framework", "torch", "--out", str(out), "--model", "tiny", "--batch-size", "2",
                   "--seq-len", "8", "--steps", "3", "--stop-at", "2", "--eval-every", "0", "--sample", "0",
                   "--quiet"]) == 0  # fmt: skip
    return out


def _checkpoint_refused(path) -> str:
    """load_checkpoint plus the run folder's check of the extras: what a resume checks."""
    weights, optim, meta = load_checkpoint(path, TINY)
    step, _, extra = read_checkpoint_metadata(path)
    return "refused" if check_extra(extra, step) else "accepted"


def _semantic_mutation(rng: random.Random, arrays: dict, metadata: dict) -> tuple[dict, dict]:
    """A change that is wrong however it is hashed: the checks must refuse it."""
    arrays, metadata = dict(arrays), dict(metadata)
    extra = json.loads(metadata["extra"])
    choice = rng.randrange(10)
    if choice == 0:
        metadata["step"] = rng.choice(["-5", "0", "x", "", "1e3", " 2", str(2**31), "99"])
    elif choice == 1:
        del extra[rng.choice(sorted(extra))]
    elif choice == 2:
        extra["framework"] = rng.choice(["tf", "", None, 1, "Torch"])
    elif choice == 3:
        extra["rng"] = rng.choice([None, [], {}, {"torch_rng": "***"}, {"torch_rng": "AAAA"}, {"jax_rng": {}},
                                   {"torch_rng": extra["rng"]["torch_rng"][:-8]}])  # fmt: skip
    elif choice == 4:
        extra["train_config"] = rng.choice([None, [], "x", extra["train_config"] | {"lr": "x"},
                                            extra["train_config"] | {"steps": 1}, extra["train_config"] | {"bogus": 1}])  # fmt: skip
    elif choice == 5:
        key = rng.choice([k for k in arrays if k.startswith("optim.exp_avg_sq.")])
        arrays[key] = arrays[key].copy()
        arrays[key].flat[rng.randrange(arrays[key].size)] = rng.choice([-1e-6, -1.0, np.nan, np.inf])
    elif choice == 6:
        key = rng.choice(sorted(arrays))
        arrays[key] = rng.choice([arrays[key].astype(np.float64), arrays[key].reshape(-1)[:-1] if arrays[key].size > 1 else np.zeros(3, np.float32), arrays[key].astype(np.float16)])
    elif choice == 7:
        del arrays[rng.choice(sorted(arrays))]
    elif choice == 8:
        metadata["config"] = json.dumps(rng.choice([[], "x", {}, json.loads(metadata["config"]) | {"d_model": 64}]))
    else:
        extra["data"] = rng.choice([None, {}, {"source": "generated"}, {"source": 1, "sha256": "0" * 64}, {"source": "g", "sha256": "xyz"}])
    metadata["extra"] = json.dumps(extra)
    return arrays, metadata


def _fuzz_checkpoints(tmp_path, run_folder, seed: int, cases: int) -> Tally:
    ckpt = run_folder / json.loads((run_folder / "latest.json").read_text())["checkpoint"]
    good = ckpt.read_bytes()
    arrays, metadata = st_io.load_file(ckpt)
    rng = random.Random(seed)
    tally = Tally(f"training checkpoints (seed {seed})")
    path = tmp_path / "case.safetensors"
    for i in range(cases):
        if i % 2:  # bytes changed after writing: the content hash or the parser must refuse
            path.write_bytes(_mutate(rng, good))
        else:  # a consistent file (valid hash) with wrong contents: the checks must refuse
            bad_arrays, bad_meta = _semantic_mutation(rng, arrays, metadata)
            bad_meta.pop(st_io.HASH_KEY)
            st_io.save_file(bad_arrays, path, bad_meta)

        def case(changed_bytes=bool(i % 2)):
            outcome = _checkpoint_refused(path)
            if outcome == "accepted" and changed_bytes:  # e.g. swapped offsets of two all-zero biases
                got_arrays, got_metadata = st_io.load_file(path)
                if _same(arrays, got_arrays) and got_metadata == metadata:
                    return "accepted"
            return "silent acceptance of a changed checkpoint" if outcome == "accepted" else outcome

        tally.run(f"checkpoint case {i}", case)
    return tally


def test_fuzz_training_checkpoints(tmp_path, run_folder):
    _fuzz_checkpoints(tmp_path, run_folder, 0, 600 * SCALE).check()


# ----------------------------------------------------------------------------------- latest.json


def _snapshot(folder) -> dict:
    return {os.path.join(r, n): pathlib.Path(r, n).read_bytes() if os.path.isfile(os.path.join(r, n)) else None
            for r, _, names in os.walk(folder) for n in names}  # fmt: skip


LATEST_VALUES = [None, True, -1, 0, 1, 2, 3, 2**31, 1.5, "2", "", "torch", "jax", [], {}, "/dev/zero",
                 "ckpt/step_000002.safetensors", "ckpt/step_000001.safetensors", "../run/ckpt/step_000002.safetensors",
                 "ckpt", "latest.json", "xxh3_128:" + "0" * 32, "0" * 64]  # fmt: skip


def _fuzz_latest(tmp_path, run_folder, seed: int, cases: int) -> Tally:
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    os.mkfifo(run / "fifo")
    (run / "ckpt" / "step_000001.safetensors").symlink_to("/dev/zero")
    good_text = (run / "latest.json").read_text()
    good = json.loads(good_text)
    rng = random.Random(seed)
    tally = Tally(f"latest.json (seed {seed})")
    for i in range(cases):
        doc = dict(good)
        choice = rng.randrange(4)
        if choice == 0:
            doc[rng.choice(sorted(good))] = rng.choice(LATEST_VALUES)
        elif choice == 1:
            del doc[rng.choice(sorted(good))]
        elif choice == 2:
            doc = rng.choice([[], None, "x", 5, {"checkpoint": "fifo", "step": 2}])
        text = json.dumps(doc).encode() if choice != 3 else _mutate_bytes(rng, good_text.encode())
        (run / "latest.json").write_bytes(text)
        before = _snapshot(run)

        def case(doc=doc):
            try:
                latest = RunDir(str(run)).read_latest()
                RunDir(str(run)).load(latest, TINY)
            except TYPED:
                return "refused" if _snapshot(run) == before else "run folder changed by a refusal"
            same = {k: latest[k] for k in good if k in latest} == {k: v for k, v in good.items() if k in latest}
            return "accepted" if same else "silent acceptance of a changed latest.json"

        tally.run(f"latest case {i}", case)
    return tally


def test_fuzz_latest_json(tmp_path, run_folder):
    _fuzz_latest(tmp_path, run_folder, 0, 400 * SCALE).check()


# ----------------------------------------------------------------------------------------- flags


BAD = {  # flag: values the CLI must refuse
    "--steps": ["0", "-3", "x", "1.5"], "--batch-size": ["0", "-1"], "--seq-len": ["0", "-8", "999"],
    "--lr": ["0", "-1e-3", "inf", "nan", "-inf"], "--min-lr": ["0", "nan", "inf"], "--warmup": ["-1", "400"],
    "--weight-decay": ["nan", "-0.1", "inf"], "--grad-clip": ["nan", "-1", "inf"], "--dropout": ["1", "-0.5", "nan"],
    "--seed": ["-1", str(2**32), "x"], "--eval-every": ["-1"], "--ckpt-every": ["-1"], "--sample": ["-5"],
    "--data": ["", "/dev/zero", "{fifo}", "{dir}", "{missing}"], "--out": ["{file}", ""], "--device": ["cuda", "tpu"],
    "--model": ["huge"], "--framework": ["tf"], "--stop-at": ["0", "-1", "1000"],
}  # fmt: skip
GOOD = {"--steps": ["2", "3"], "--batch-size": ["2"], "--lr": ["1e-3"], "--warmup": ["1"], "--seed": ["0", "7"],
        "--eval-every": ["0"], "--dropout": ["0.1"], "--grad-clip": ["0", "0.5"]}  # fmt: skip


def _fuzz_cli(tmp_path, run_folder, seed: int, cases: int) -> Tally:
    places = {"{fifo}": tmp_path / "fifo", "{dir}": tmp_path, "{missing}": tmp_path / "missing.txt",
              "{file}": tmp_path / "a_file"}  # fmt: skip
    os.mkfifo(places["{fifo}"])
    places["{file}"].write_text("not a folder")
    resumable = tmp_path / "resumable"
    shutil.copytree(run_folder, resumable)
    rng = random.Random(seed)
    tally = Tally(f"training CLI flags (seed {seed})")
    for i in range(cases):
        resume = i % 4 == 0
        out = resumable if resume else tmp_path / f"new_{i}"
        flags = {"--framework": rng.choice(["torch", "jax"]), "--out": str(out), "--model": "tiny", "--quiet": None,
                 "--sample": "0", "--seq-len": "8"}  # fmt: skip
        for flag in rng.sample(sorted(GOOD), rng.randrange(3)):
            flags[flag] = rng.choice(GOOD[flag])
        if resume:  # a flag that conflicts with the checkpoint (lr 3e-4... seed 0, batch 2)
            flags["--resume"] = None
            flag, value = rng.choice([("--lr", "5e-3"), ("--seed", "9"), ("--batch-size", "3"), ("--model", "small"),
                                      ("--steps", "7"), ("--dropout", "0.2"), ("--warmup", "2")])  # fmt: skip
            flags[flag] = value
        for flag in rng.sample(sorted(BAD), rng.choice([1, 1, 2, 3])):
            if resume and flag == "--out":
                continue
            value = rng.choice(BAD[flag])
            flags[flag] = str(places[value]) if value in places else value
        argv = [x for k, v in flags.items() for x in ((k,) if v is None else (k, v))]
        before = _snapshot(resumable)

        def case(argv=argv, out=out, resume=resume):
            try:
                code = T.main(argv)
            except SystemExit as e:  # argparse: a value of the wrong type, an unknown choice
                code = e.code
            if code != 2:
                return f"exit code {code} for {argv}"
            if _snapshot(resumable) != before:
                return f"run folder changed by {argv}"
            if not resume and os.path.isdir(out) and out != tmp_path:
                return f"{out} was created by a refused {argv}"
            return "refused"

        tally.run(f"cli case {i}", case, seconds=20)
    return tally


def test_fuzz_cli_flags(tmp_path, run_folder, capsys):
    tally = _fuzz_cli(tmp_path, run_folder, 0, 300 * SCALE)
    with capsys.disabled():
        tally.check()


# ------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_everything_more(tmp_path, run_folder, seed, capsys, request):
    """About 5 minutes per seed on 2 cores: runs only when asked for (-m slow, or FUZZ_SLOW=1),
    since a plain `python -m pytest` selects every marker."""
    markexpr = request.config.getoption("markexpr") or ""
    if not (os.environ.get("FUZZ_SLOW") or ("slow" in markexpr and "not slow" not in markexpr)):
        pytest.skip("the long fuzz run: select it with -m slow or FUZZ_SLOW=1")
    for fuzz, n, sub in ((_fuzz_weight_files, 7500, "w"), (_fuzz_checkpoints, 3000, "c"),
                         (_fuzz_latest, 2000, "l"), (_fuzz_cli, 1500, "f")):  # fmt: skip
        folder = tmp_path / sub
        folder.mkdir()
        tally = fuzz(folder, seed, n * SCALE) if fuzz is _fuzz_weight_files else fuzz(folder, run_folder, seed, n * SCALE)
        with capsys.disabled():
            tally.check()
