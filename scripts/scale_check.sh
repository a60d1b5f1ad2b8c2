#!/usr/bin/env bash
# Issue 15 end to end on this machine (<= 10 min on 2 cores): stage shards on a local Ray cluster
# with 2 workers (a killed worker costs one shard), and the store on an S3 server started on
# 127.0.0.1 (two racing processes compute once, a rerun is a full cache hit, verify passes).
# Last line: `scale-out ok: <shards per worker>, <s3 cache-hit rerun>`; non-zero naming what failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec timeout 600 .venv/bin/python scripts/scale_check.py "$@"
