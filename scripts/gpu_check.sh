#!/usr/bin/env bash
# The prepared accelerator check (scripts/gpu_check.py): vLLM sampling, HF and vLLM reward scoring,
# reference log-probs, ZeRO-3 DPO on every visible GPU, one evaluation answer; the embedded model
# only (no hub). Prints a table (step, device, seconds, tokens/s, peak memory); non-zero on any failure.
#   bash scripts/gpu_check.sh           # NVIDIA GPUs, <= 8 min
#   bash scripts/gpu_check.sh --cpu     # the same steps on CPU (vLLM: .venv-vllm), <= 10 min
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${AVR_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)      # the GPU image has no .venv
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
if [ "${1:-}" = "--cpu" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec timeout 620 "$PY" scripts/gpu_check.py "$@"
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing); run 'bash scripts/gpu_check.sh --cpu'" >&2
  exit 2
fi
nvidia-smi -L
exec timeout 500 "$PY" scripts/gpu_check.py "$@"
