"""`avr server`: a Prefect server and its UI, on 127.0.0.1 unless --host (telemetry off: avr_cli/main.py)."""
from __future__ import annotations

import os
import sys


def add_parser(subparsers) -> None:
    sv = subparsers.add_parser("server", help="start a Prefect server and its UI (127.0.0.1 unless --host)")
    sv.add_argument("--host", default=os.environ.get("AVR_SERVER_HOST", "127.0.0.1"),
                    help="address to listen on (default: AVR_SERVER_HOST or 127.0.0.1, here %(default)s)")
    sv.add_argument("--port", type=int, default=4200, help="port of the UI and its API (default: %(default)s)")


def run(args) -> int:
    print(f"Prefect UI: http://{args.host}:{args.port}  -- in another shell: "
          f"export PREFECT_API_URL=http://{args.host}:{args.port}/api", flush=True)
    # the UI's own API address follows these settings, not the --host/--port flags (without them,
    # a server on another port serves a UI that calls 127.0.0.1:4200)
    os.environ["PREFECT_SERVER_API_HOST"], os.environ["PREFECT_SERVER_API_PORT"] = args.host, str(args.port)
    os.execv(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", args.host,
                              "--port", str(args.port)])
