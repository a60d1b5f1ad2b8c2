"""The prompt sets of the `signal` presets: the shipped files are what scripts/make_signal_prompts.py
writes, and v2 keeps the design docs/PERFORMANCE.md "Learning signal, second attempt" states (the
same kind mix in training and held-out, held-out topics never trained on, one or two constraints);
v3 keeps the pre-registered design of "Learning signal, third attempt" (the six kinds only, held-out
topics no earlier file uses, v2's held-out rows as the secondary set)."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from scripts.make_signal_prompts import (
    HELDOUT_TOPICS,
    HELDOUT_TOPICS_V3,
    HELDOUT_V3,
    KINDS_V2,
    KINDS_V3,
    TEMPLATES,
    TOPICS,
    TRAIN,
    TRAIN_TOPICS,
    TRAIN_V3,
    V1_HELDOUT,
)

ROOT = Path(__file__).resolve().parents[2]
V1, V2 = ROOT / "avr_core/data/signal_prompts.jsonl", ROOT / "avr_core/data/signal_prompts_v2.jsonl"
V3 = ROOT / "avr_core/data/signal_prompts_v3.jsonl"


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_shipped_files_are_what_the_script_writes(tmp_path):
    before = {p: p.read_bytes() for p in (V1, V2, V3)}
    for args in ([], ["--v2"], ["--v3"]):
        subprocess.run([sys.executable, "scripts/make_signal_prompts.py", *args], cwd=ROOT, check=True,
                       capture_output=True)
    assert {p: p.read_bytes() for p in (V1, V2, V3)} == before


def share(rs):
    return {k: v / len(rs) for k, v in Counter(c["id"] for r in rs for c in r["constraints"]).items()}


def test_v2_has_the_same_kind_mix_in_training_and_heldout_on_disjoint_topics():
    v2 = rows(V2)
    train, heldout = v2[:TRAIN], [r for r in v2 if r["split"] == "heldout"]
    assert len(heldout) == 200 and all(1 <= len(r["constraints"]) <= 2 for r in train + heldout)
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


def test_v3_draws_only_the_six_kinds_with_the_same_mix_in_training_and_heldout():
    v3 = rows(V3)
    train, heldout = v3[:TRAIN_V3], v3[TRAIN_V3:TRAIN_V3 + HELDOUT_V3]
    assert [r["split"] for r in v3] == ["train"] * TRAIN_V3 + ["heldout"] * HELDOUT_V3 + ["heldout_v2"] * 200
    assert len(KINDS_V3) == 6 and set(KINDS_V3) < set(KINDS_V2)
    dropped = {"length_constraints:number_sentences", "keywords:existence", "detectable_format:json_format"}
    assert not dropped & set(KINDS_V3)
    for split in (train, heldout):               # one or two constraints alternating, each kind a sixth (quota):
        assert share(split) == dict.fromkeys(KINDS_V3, 0.25), share(split)   # 1.5 constraints a prompt / 6
        assert [len(r["constraints"]) for r in split] == [1, 2] * (len(split) // 2)
    first_48 = share(train[:48])                 # any slice has the mix, not just the whole split
    assert all(abs(first_48[k] - 0.25) < 0.05 for k in KINDS_V3)
    assert len({r["prompt"] for r in v3}) == len(v3)          # the rules scorer looks a prompt up by its text
    assert len({r["id"] for r in v3}) == len(v3)


def test_v3_heldout_topics_are_new_and_never_trained_on():
    v3 = rows(V3)
    train, heldout = v3[:TRAIN_V3], v3[TRAIN_V3:TRAIN_V3 + HELDOUT_V3]
    new, old = set(HELDOUT_TOPICS_V3), set(TOPICS)            # TOPICS: every v1 and v2 topic, train and held-out
    assert len(new) == 24 and not any(a in b or b in a for a in new for b in old)
    assert {r["topic"] for r in train} <= set(TRAIN_TOPICS)   # training: v2's training topics, never v2's held-out
    assert {r["topic"] for r in heldout} == new
    for r in heldout:                            # the task is a template about the row's own topic, and nothing older
        assert any(r["prompt"].startswith(t.format(t=r["topic"])) for t in TEMPLATES)
        assert not any(t in r["prompt"] for t in old)
    assert not any(t in r["prompt"] for r in train for t in new)
    assert not any(t in r["prompt"] for r in train for t in HELDOUT_TOPICS)


def test_v3_ends_with_v2s_heldout_rows_verbatim():
    old = [r for r in rows(V2) if r["split"] == "heldout"]
    tail = rows(V3)[TRAIN_V3 + HELDOUT_V3:]
    assert len(old) == 200 and tail == [{**r, "split": "heldout_v2"} for r in old]
