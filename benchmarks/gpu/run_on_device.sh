#!/usr/bin/env bash
# Take kvferry's GPU figures in as few device calls as possible.
#
# Usage (from the repository root, on a machine with one CUDA GPU):
#   bash benchmarks/gpu/run_on_device.sh PHASE [PHASE ...]
# Phases, each sized to finish well inside a 10-minute call on an H100:
#   env       GPU, driver, torch/triton/transformers versions
#   tests     pytest -m gpu over tests/kernels and tests/engine (bf16 kernels, cuda_ipc
#             across two processes, GPU engine parity with transformers, CUDA graphs)
#   micro     fused RMSNorm/rope kernels vs torch ops; Triton vs SDPA prefill attention
#   transfer  gather/scatter and cuda_ipc GB/s vs device copy bandwidth
#   decode    decode step time vs the HBM roofline (batch 1/16/64, context 1K/4K)
#   prefill   4K-prompt prefill vs the bf16 GEMM peak
#   offline   32 concurrent requests vs transformers generate
#   ttft      8K-prompt time to first token, cold vs fully cached
# Results (JSON per benchmark, pytest junit XML, logs) go to $OUT when it is set (the
# device tool's folder), else to results/gpu/. No network is needed: models are random
# weights with real shapes, built from transformers configs.
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-results/gpu}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0

run() {  # run NAME CMD...: log to $OUT_DIR/NAME.log, remember failures, keep going
  local name="$1"; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

bench() {  # bench SCRIPT [ARGS...]: one benchmark script, JSON to $OUT_DIR/gpu_SCRIPT.json
  local script="$1"; shift
  run "$script" "$PY" "benchmarks/gpu/$script.py" --out "$OUT_DIR/gpu_$script.json" "$@"
}

[ "$#" -gt 0 ] || { sed -n 2,18p "$0"; exit 2; }
for phase in "$@"; do
  case "$phase" in
    env)
      run env bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name())'; git log -1 --format='%H %cd' 2>/dev/null || true"
      ;;
    tests)
      run tests "$PY" -m pytest -q -m gpu tests/kernels tests/engine tests/cluster/test_transport_auto.py -p no:cacheprovider \
        --junitxml="$OUT_DIR/gpu_tests.xml" --timeout=300
      ;;
    micro)
      bench fused_ops
      bench prefill_attention_choice
      ;;
    transfer) bench transfer_bandwidth ;;
    decode) bench decode_roofline ;;
    prefill) bench prefill_throughput ;;
    offline) bench offline_throughput ;;
    ttft) bench ttft_cached ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
exit "$status"
