#!/usr/bin/env bash
# One-shot check for a GPU machine that has the dependencies but no network, in order of value:
#   1 env.txt       versions and devices
#   2 train.txt     bench_train, GPT-2 124M shape, bf16, 16 x 1024, MFU: torch eager, torch.compile
#                   (the Trainer), jax.jit with cuDNN attention; then torch.compile and jax.jit with
#                   the cross-entropy in chunks of 4096 positions (--loss-chunk; ms/step and memory);
#                   then torch eager and jax.jit with the library's kernel (XLA's in JAX)
#   3 generate.txt  bench_generate, GPT-2 124M shape, float32, prompt 128 + 64 tokens: batch 1 with
#                   torch eager, compile default and reduce-overhead, the Flax twin with its host
#                   and device loops, transformers eager and static+compile; batch 8 with torch
#                   eager, reduce-overhead, Flax, transformers
#   4 report.txt    the parity report, every torch device x every JAX device (report.json beside it)
#   5 tests.txt     the CUDA / GPU-parametrised tests
#   summary.txt     each stage's exit status and wall time
# Each stage runs under its own timeout (then 1 s to exit before it is killed) and the next runs
# whatever it returned; the exit status is 0 only if every stage passed. Each stage's log is written
# as it runs and its line of summary.txt when it ends. Logs go to $OUT (or reports/). Run from the repository root:
#   bash scripts/gpu_check.sh
# GPU_CHECK_SMOKE=1 runs the same stages with tiny models and few steps (342 s and 871 s, every stage passing,
# on a 2-core x86-64 CPU shared with other jobs), to prove every command line before the GPU run.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-reports}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
failed=0
smoke=${GPU_CHECK_SMOKE:-0}

stage() {  # stage NAME TIMEOUT_S LOG COMMAND...
    local name=$1 limit=$2 log=$3 start rc
    shift 3
    start=$(date +%s)
    echo "== $name: $*" | tee -a "$out/$log"
    timeout --kill-after=1 "$limit" "$@" >>"$out/$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    echo "$name: exit $rc in $(( $(date +%s) - start )) s$([ "$rc" -eq 124 ] && echo ' (timed out)')" | tee -a "$summary"
}

if [ "$smoke" = 1 ]; then
    train=(--model small --steps 2 --warmup 1)
    gen=(--models small-4x128 --prompt-len 8 --new-tokens 8)
    report=(--dtypes float32 bfloat16 --heads 4 --skip-sharded)
    chunk=64
    limits=(60 900 600 600 900 900 900 600)
else  # 465 s in all, 473 s with each stage's 1 s grace: under 8 minutes. torch.compile of the 124M
    # model takes ~40-60 s per graph set; the chunked loss unrolls one checkpointed region per chunk
    # into the graph: 4 chunks of 4096 (16 x 1024 positions), each one's logits 0.8 GB in float32
    train=(--model gpt2-padded --bf16 --steps 6 --warmup 3)
    gen=(--models gpt2 --prompt-len 128 --new-tokens 64)
    report=(--skip-sharded)
    chunk=4096
    limits=(10 120 70 40 120 35 45 25)
fi

stage env "${limits[0]}" env.txt bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c \"import torch, jax, flax, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('jax', jax.__version__, jax.devices()); print('flax', flax.__version__); print('transformers', transformers.__version__)\""
stage train "${limits[1]}" train.txt python -m scripts.bench_train "${train[@]}" \
    --modes torch-eager torch-compile jax-jit --attention cudnn
stage train_chunk "${limits[2]}" train.txt python -m scripts.bench_train "${train[@]}" \
    --modes torch-compile jax-jit --attention cudnn --loss-chunk "$chunk"
stage train_library "${limits[3]}" train.txt python -m scripts.bench_train "${train[@]}" \
    --modes torch-eager jax-jit --attention library
stage generate_b1 "${limits[4]}" generate.txt python -m scripts.bench_generate "${gen[@]}" --batches 1 \
    --torch-compile default reduce-overhead --hf-static --no-uncached --loop host device
stage generate_b8 "${limits[5]}" generate.txt python -m scripts.bench_generate "${gen[@]}" --batches 8 \
    --torch-compile reduce-overhead --no-uncached
stage report "${limits[6]}" report.txt python -m scripts.parity_report --json "$out/report.json" "${report[@]}"
stage tests "${limits[7]}" tests.txt python -m pytest -q -p no:cacheprovider -k "cuda or gpu" parity_tests
exit $failed
