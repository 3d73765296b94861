#!/usr/bin/env bash
# One-shot check for a GPU machine that has the dependencies but no network: the parity report
# (every torch device x every JAX device, CUDA rows included), the test suite and the training
# benchmark, logs under $OUT (or reports/). Run from the repository root:  bash scripts/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-reports}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, jax, flax; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__)"
} 2>&1 | tee "$out/env.txt"
python -m scripts.parity_report --json "$out/parity.json" 2>"$out/report_progress.txt" | tee "$out/report.txt"
report=${PIPESTATUS[0]}
python -m pytest -q -p no:cacheprovider -ra >"$out/pytest.txt" 2>&1
tests=$?
# GPT-2 124M shape, bf16, batch 16 x 1024: torch eager and torch.compile, then jax.jit with cuDNN attention
timeout 300 python -m scripts.bench_train --model gpt2-padded --bf16 --steps 10 --warmup 3 2>&1 | tee "$out/bench_gpt2.txt" | tail -n 6
timeout 150 python -m scripts.bench_train --model gpt2-padded --bf16 --steps 10 --warmup 3 --modes jax-jit \
    --jax-attention cudnn 2>&1 | tee "$out/bench_gpt2_cudnn.txt" | tail -n 4
timeout 120 python -m scripts.bench_train --steps 20 2>&1 | tee "$out/bench_small.txt" | tail -n 6
tail -n 25 "$out/pytest.txt"
echo "parity report exit $report, pytest exit $tests"
exit $(( report || tests ))
