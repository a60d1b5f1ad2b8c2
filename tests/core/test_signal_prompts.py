"""The prompt sets of the `signal` presets: the shipped files are what scripts/make_signal_prompts.py
writes, and v2 keeps the design docs/PERFORMANCE.md "Learning signal, second attempt" states (the
same kind mix in training and held-out, held-out topics never trained on, one or two constraints)."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from scripts.make_signal_prompts import HELDOUT_TOPICS, KINDS_V2, TRAIN, V1_HELDOUT

ROOT = Path(__file__).resolve().parents[2]
V1, V2 = ROOT / "avr_core/data/signal_prompts.jsonl", ROOT / "avr_core/data/signal_prompts_v2.jsonl"


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_shipped_files_are_what_the_script_writes(tmp_path):
    before = {p: p.read_bytes() for p in (V1, V2)}
    for args in ([], ["--v2"]):
        subprocess.run([sys.executable, "scripts/make_signal_prompts.py", *args], cwd=ROOT, check=True,
                       capture_output=True)
    assert {p: p.read_bytes() for p in (V1, V2)} == before


def test_v2_has_the_same_kind_mix_in_training_and_heldout_on_disjoint_topics():
    v2 = rows(V2)
    train, heldout = v2[:TRAIN], [r for r in v2 if r["split"] == "heldout"]
    assert len(heldout) == 200 and all(1 <= len(r["constraints"]) <= 2 for r in train + heldout)
    share = lambda rs: {k: v / len(rs) for k, v in Counter(c["id"] for r in rs for c in r["constraints"]).items()}  # noqa: E731
    assert set(share(train)) == set(share(heldout)) == set(KINDS_V2)
    assert all(abs(share(train)[k] - share(heldout)[k]) < 0.03 for k in KINDS_V2), (share(train), share(heldout))
    first_48 = share(train[:48])                 # any slice has the mix (quota), not just the whole split
    assert all(abs(first_48[k] - share(train)[k]) < 0.05 for k in KINDS_V2)
    assert not any(t in r["prompt"] for r in train for t in HELDOUT_TOPICS)
    assert all(any(t in r["prompt"] for t in HELDOUT_TOPICS) for r in heldout)
    assert len({r["prompt"] for r in v2}) == len(v2)          # the rules scorer looks a prompt up by its text


def test_v2_ends_with_the_old_presets_heldout_prompts_verbatim():
    old = rows(V1)[TRAIN:TRAIN + V1_HELDOUT]
    tail = rows(V2)[-V1_HELDOUT:]
    assert [(r["prompt"], r["constraints"]) for r in tail] == [(r["prompt"], r["constraints"]) for r in old]
