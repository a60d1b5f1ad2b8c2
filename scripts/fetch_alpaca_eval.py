"""Reproduce avr_core/data/alpaca_eval/alpaca_eval_805.json from the alpaca-eval sdist on PyPI.

    python scripts/fetch_alpaca_eval.py [--out avr_core/data/alpaca_eval/alpaca_eval_805.json]

Needs only a package index (no Hugging Face hub). Both checksums are verified.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "alpaca_eval-0.6.6.tar.gz"
SDIST_SHA256 = "94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de"
MEMBER = "alpaca_eval-0.6.6/example/outputs.json"
FILE_SHA256 = "4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent
                                        / "avr_core/data/alpaca_eval/alpaca_eval_805.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "alpaca-eval==0.6.6", "-d", tmp], check=True)
        sdist = Path(tmp) / SDIST
        got = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if got != SDIST_SHA256:
            print(f"{sdist.name}: sha256 {got} != expected {SDIST_SHA256}", file=sys.stderr)
            return 1
        with tarfile.open(sdist) as tf:
            data = tf.extractfile(MEMBER).read()
    got = hashlib.sha256(data).hexdigest()
    if got != FILE_SHA256:
        print(f"{MEMBER}: sha256 {got} != expected {FILE_SHA256}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(data)
    print(f"wrote {args.out} (805 instructions, sha256 {got[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
