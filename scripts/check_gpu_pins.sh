#!/usr/bin/env bash
# Prove the GPU image's pinned set resolves (docker/Dockerfile, README "Paper scale on GPUs"): pip's own
# resolver, a dry run of `pip install -c docker/constraints-gpu.txt -e ".[gpu]"` (no CUDA wheel is
# installed; pip reads the metadata), then the versions it picked are checked against constraints.txt,
# the set the CPU machines and CI run. CI calls it on every change (~1 min).
#   bash scripts/check_gpu_pins.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
report="$(mktemp)"; log="$(mktemp)"
trap 'rm -f "$report" "$log"' EXIT
if ! "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" \
      -c docker/constraints-gpu.txt -e ".[gpu]" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -30 >&2
  echo "check_gpu_pins: the GPU set does not resolve (pip's words above)" >&2
  exit 1
fi
"$PY" - "$report" <<'PY'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()   # alpaca_eval == alpaca-eval (PEP 503)
picked = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
want = {}
for f in ("constraints.txt", "docker/constraints-gpu.txt"):
    for ln in open(f):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)", ln)
        if m:
            want[norm(m[1])] = m[2]
bad = [f"{n}: pinned {v}, resolved {picked.get(n, 'absent')}" for n, v in want.items()
       if picked.get(n, "").split("+")[0] != v]
if bad:
    sys.exit("check_gpu_pins: the GPU set resolved off its pins: " + "; ".join(bad))
print("GPU set resolves: " + " ".join(f"{n}=={picked[n]}" for n in
      ("vllm", "torch", "transformers", "prefect", "fastapi", "deepspeed")))
PY
