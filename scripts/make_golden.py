"""Regenerate the golden vectors: fixed weights, the (5, 8, 128) input and float64 references.

    python -m scripts.make_golden [--force]

The weights and input are drawn from NumPy's PCG64 with a fixed seed and stored in float32; the
references are computed by the float64 NumPy implementation (twin_common.reference), which shares no
code with either twin. Neither framework is needed, so the file is the same wherever it is made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from twin_parity.harness import GOLDEN_PATH, LESSON_SHAPE
from twin_common import BlockConfig
from twin_common.reference import block_forward
from weight_conversion import block_table, load_file, save_file

SEED = 20261127
HEAD_COUNTS = (1, 4)  # the lesson's single head, and several heads over the same weights


def golden_arrays() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    base = BlockConfig(d_model=LESSON_SHAPE[2], n_heads=1, block_size=LESSON_SHAPE[1])
    rng = np.random.default_rng(SEED)
    weights = {}
    for spec in block_table(base):
        if spec.torch_key.startswith("ln_") and spec.torch_key.endswith(".weight"):
            value = 1.0 + 0.1 * rng.standard_normal(spec.torch_shape)  # LayerNorm scale near 1
        else:  # weights like the init, biases non-zero so a misplaced bias cannot hide
            value = base.init_std * rng.standard_normal(spec.torch_shape)
        weights[spec.torch_key] = value.astype(np.float32)
    x = rng.standard_normal(LESSON_SHAPE).astype(np.float32)
    arrays = {"input": x, **{f"weights.{k}": v for k, v in weights.items()}}
    for n_heads in HEAD_COUNTS:
        cfg = BlockConfig.from_dict({**base.to_dict(), "n_heads": n_heads})
        for name, value in block_forward(weights, x, cfg).items():
            arrays[f"reference.n_heads_{n_heads}.{name}"] = value
    config = {k: v for k, v in base.to_dict().items() if k != "n_heads"}
    metadata = {
        "config": json.dumps(config, sort_keys=True),
        "description": "Pre-LN block golden vectors: float32 weights and input, float64 "
        "references per head count (all intermediates), from twin_common.reference",
        "seed": str(SEED),
    }
    return arrays, metadata


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=GOLDEN_PATH, help="where to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite a file that differs")
    args = parser.parse_args(argv)
    arrays, metadata = golden_arrays()
    if os.path.exists(args.out):
        old, _ = load_file(args.out)
        same = old.keys() == arrays.keys() and all(np.array_equal(old[k], arrays[k]) for k in old)
        if same:
            print(f"{args.out} is up to date")
            return 0
        if not args.force:
            print(f"{args.out} exists and differs from what this script makes; --force overwrites",
                  file=sys.stderr)
            return 1
    save_file(arrays, args.out, metadata)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1024:.0f} KiB, {len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
