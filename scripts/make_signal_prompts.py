"""Write the constraint prompt sets of the `signal` presets (deterministic: the same files every time).

    .venv/bin/python scripts/make_signal_prompts.py        # avr_core/data/signal_prompts.jsonl (`signal`)
    .venv/bin/python scripts/make_signal_prompts.py --v2   # avr_core/data/signal_prompts_v2.jsonl (`signal_v2`)

Each row is an everyday task (a template x a topic) with one to three verifiable constraints
appended, IFEval-style. The constraint sentences are the IFEval checkers' own
`build_description(**kwargs)` text and the constraints are stored as data next to the prompt
(`{"id": IFEval instruction id, "kwargs": {...}}`), so the `rules` scorer checks exactly what the
prompt asked. Written for this project (Apache-2.0, as the repository); no benchmark data is used.

Rows 0..TRAIN-1 are training prompts (topics TRAIN_TOPICS); rows TRAIN.. are the held-out prompts:
their topics never occur in a training row, so the held-out measurement is on new tasks with the
same kinds of constraint.

v2 (issue 25, docs/PERFORMANCE.md "Learning signal, second attempt") keeps the topics, templates and
checkers but draws only KINDS_V2, the kinds the pilot (scripts/signal_pilot.py) found learnable
(seed pass rate between 0.15 and 0.85), one or two per prompt, by quota: every prompt takes the
least-used kinds so far, so any slice of the file has the same kind mix. Rows 0..360 train,
360..560 held out (HELDOUT_TOPICS), and 560..624 are the v1 file's first 64 held-out rows verbatim
(the old `signal` preset's measurement, re-scored on the new model).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "avr_core" / "data" / "signal_prompts.jsonl"
TRAIN, HELDOUT = 360, 120
SEED = 17
OUT_V2 = ROOT / "avr_core" / "data" / "signal_prompts_v2.jsonl"
HELDOUT_V2, V1_HELDOUT = 200, 64
# the kinds the pilot kept (seed pass rate in [0.15, 0.85]; docs/PERFORMANCE.md "Pilot"); dropped: the
# end phrase (0.12), lowercase and quotation (0.04); never drawn: capital letters and paragraphs
KINDS_V2 = ["detectable_content:postscript", "detectable_format:title", "length_constraints:number_words",
            "length_constraints:number_sentences", "keywords:existence", "keywords:forbidden_words",
            "detectable_format:number_bullet_lists", "punctuation:no_comma", "detectable_format:json_format"]

TEMPLATES = [
    "Write a short paragraph about {t}.",
    "Explain {t} to a ten-year-old.",
    "Give some practical tips about {t}.",
    "Describe {t} in a few sentences.",
    "Write a very short story that involves {t}.",
    "Write a short note to a friend about {t}.",
    "What are the benefits of {t}?",
    "Write a short announcement for a community event about {t}.",
]

# topic -> words a natural answer may use (keywords to require or forbid)
TOPICS = {
    "rainbows": ["light", "rain", "colors"], "bicycles": ["wheels", "ride", "exercise"],
    "coffee": ["morning", "beans", "cup"], "gardening": ["plants", "soil", "water"],
    "the ocean": ["waves", "fish", "blue"], "recycling": ["plastic", "waste", "planet"],
    "libraries": ["books", "read", "quiet"], "volcanoes": ["lava", "eruption", "mountain"],
    "sleep": ["rest", "night", "bed"], "honeybees": ["honey", "flowers", "hive"],
    "learning a language": ["words", "practice", "speak"], "the moon": ["night", "sky", "earth"],
    "bread baking": ["flour", "oven", "dough"], "public transport": ["bus", "train", "city"],
    "chess": ["board", "game", "move"], "running": ["legs", "exercise", "fast"],
    "snow": ["cold", "winter", "white"], "music lessons": ["practice", "instrument", "teacher"],
    "camping": ["tent", "fire", "nature"], "saving money": ["budget", "bank", "spend"],
    "trees": ["leaves", "forest", "roots"], "photography": ["camera", "light", "picture"],
    "friendship": ["trust", "friends", "time"], "the weather": ["rain", "sun", "wind"],
    "cats": ["pet", "purr", "play"], "dogs": ["pet", "walk", "loyal"],
    "the internet": ["computer", "information", "online"], "soup": ["hot", "vegetables", "bowl"],
    "mountains": ["climb", "high", "snow"], "birthdays": ["cake", "party", "gift"],
    "museums": ["art", "history", "visit"], "electric cars": ["battery", "energy", "drive"],
    "time management": ["plan", "tasks", "schedule"], "rivers": ["water", "flow", "fish"],
    "the sun": ["light", "energy", "hot"], "board games": ["play", "family", "dice"],
    "drinking water": ["health", "body", "glass"], "farming": ["crops", "food", "land"],
    "kites": ["wind", "fly", "string"], "teamwork": ["together", "goal", "help"],
    "breakfast": ["morning", "eggs", "food"], "the library card": ["books", "free", "borrow"],
    # held-out topics: never in a training row
    "lighthouses": ["light", "ships", "coast"], "penguins": ["ice", "birds", "swim"],
    "solar panels": ["sun", "energy", "roof"], "picnics": ["food", "park", "blanket"],
    "fireflies": ["light", "night", "insects"], "umbrellas": ["rain", "dry", "open"],
    "deserts": ["sand", "hot", "dry"], "trains": ["tracks", "travel", "station"],
    "pottery": ["clay", "wheel", "hands"], "owls": ["night", "birds", "eyes"],
    "thunderstorms": ["lightning", "rain", "loud"], "bridges": ["river", "cross", "build"],
}
HELDOUT_TOPICS = list(TOPICS)[-12:]
TRAIN_TOPICS = [t for t in TOPICS if t not in HELDOUT_TOPICS]

END_PHRASES = ["Is there anything else I can help with?", "Hope this helps.", "That is all.", "Have a nice day."]

# pairs never put together (besides IFEval's own conflict table)
EXTRA_CONFLICTS = [{"startend:end_checker", "startend:quotation"},
                   {"startend:end_checker", "detectable_content:postscript"},
                   {"detectable_content:postscript", "startend:quotation"},
                   {"detectable_format:number_bullet_lists", "length_constraints:number_paragraphs"},
                   {"keywords:existence", "keywords:forbidden_words"}]


def kinds(rng: random.Random, words: list[str], v2: bool = False) -> dict:
    """IFEval instruction id -> its kwargs, drawn for one prompt. v2: tighter word limits (the seed
    met "less than 30..60 words" 88% of the time in the pilot: nothing to learn)."""
    w = rng.sample(words, 3)
    return {
        "length_constraints:number_words": {"num_words": rng.choice([15, 20, 25, 30] if v2 else [30, 40, 50, 60]),
                                            "relation": "less than"},
        "length_constraints:number_sentences": {"num_sentences": rng.choice([2, 3, 4]), "relation": "less than"},
        "length_constraints:number_paragraphs": {"num_paragraphs": 2},
        "detectable_format:number_bullet_lists": {"num_bullets": rng.choice([2, 3, 4])},
        "keywords:existence": {"keywords": sorted(w[:rng.choice([1, 2])])},
        "keywords:forbidden_words": {"forbidden_words": [w[2]]},
        "change_case:english_lowercase": {},
        "change_case:english_capital": {},
        "startend:end_checker": {"end_phrase": rng.choice(END_PHRASES)},
        "detectable_format:json_format": {},
        "punctuation:no_comma": {},
        "detectable_format:title": {},
        "startend:quotation": {},
        "detectable_content:postscript": {"postscript_marker": "P.S."},
    }


def row(i: int, rng: random.Random, topics: list[str], registry, conflicts) -> dict:
    topic = rng.choice(topics)
    task = rng.choice(TEMPLATES).format(t=topic)
    pool = kinds(rng, TOPICS[topic])
    n = rng.choice([1, 2, 2, 3])
    chosen: list[str] = []
    for cid in rng.sample(sorted(pool), len(pool)):
        if len(chosen) == n:
            break
        if not clashes(cid, chosen, conflicts):
            chosen.append(cid)
    return prompt_row(f"sig-{i:04d}", i, task, pool, chosen, registry)


def prompt_row(row_id: str, i: int, task: str, pool: dict, chosen: list[str], registry) -> dict:
    """The row: the task, then each chosen constraint's IFEval description; the constraints as data."""
    texts = [registry[cid](cid).build_description(**pool[cid]).strip() for cid in chosen]
    return {"id": row_id, "prompt": " ".join([task, *texts]),
            "constraints": [{"id": cid, "kwargs": pool[cid]} for cid in chosen],
            "split": "train" if i < TRAIN else "heldout"}


def clashes(cid: str, chosen: list[str], conflicts) -> bool:
    return any(c in conflicts.get(cid, ()) or cid in conflicts.get(c, ()) or {c, cid} in EXTRA_CONFLICTS
               for c in chosen)


def row_by_quota(i: int, rng: random.Random, topics: list[str], kinds_used: dict, n: int, registry,
                 conflicts) -> dict:
    """A prompt with `n` constraints: the least-used kinds of `kinds_used` (kind -> uses so far,
    updated here) that do not clash, ties broken at random."""
    topic = rng.choice(topics)
    task = rng.choice(TEMPLATES).format(t=topic)
    pool = kinds(rng, TOPICS[topic], v2=True)
    chosen: list[str] = []
    for cid in sorted(kinds_used, key=lambda k: (kinds_used[k], rng.random())):
        if len(chosen) < n and not clashes(cid, chosen, conflicts):
            chosen.append(cid)
    for cid in chosen:
        kinds_used[cid] += 1
    return prompt_row(f"sv2-{i:04d}", i, task, pool, chosen, registry)


def main_v2(registry, conflicts) -> int:
    v1 = [json.loads(line) for line in OUT.read_text(encoding="utf-8").splitlines()][TRAIN:TRAIN + V1_HELDOUT]
    rng = random.Random(SEED + 2)
    rows, seen = [], {r["prompt"] for r in v1}
    for count, topics in ((TRAIN, TRAIN_TOPICS), (HELDOUT_V2, HELDOUT_TOPICS)):
        used = dict.fromkeys(KINDS_V2, 0)            # a quota per split: the same mix in train and held-out
        for _ in range(count):
            i, n = len(rows), 1 + len(rows) % 2      # one or two constraints, alternating
            r = row_by_quota(i, rng, topics, used, n, registry, conflicts)
            while r["prompt"] in seen:               # every prompt text once: the scorer looks it up by text
                for c in r["constraints"]:
                    used[c["id"]] -= 1
                r = row_by_quota(i, rng, topics, used, n, registry, conflicts)
            seen.add(r["prompt"])
            rows.append(r)
    rows += [{**r, "split": "heldout_v1"} for r in v1]
    OUT_V2.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows ({TRAIN} train, {HELDOUT_V2} held-out, {V1_HELDOUT} v1 held-out) "
          f"to {OUT_V2.relative_to(ROOT)}")
    return 0


def main() -> int:
    from if_verifiable.ifeval import instructions_registry

    registry, conflicts = instructions_registry.INSTRUCTION_DICT, instructions_registry.INSTRUCTION_CONFLICTS
    if "--v2" in sys.argv[1:]:
        return main_v2(registry, conflicts)
    rng = random.Random(SEED)
    rows, seen = [], set()
    for i in range(TRAIN + HELDOUT):
        r = row(i, rng, TRAIN_TOPICS if i < TRAIN else HELDOUT_TOPICS, registry, conflicts)
        while r["prompt"] in seen:     # every prompt text once: the scorer looks a prompt up by its text
            r = row(i, rng, TRAIN_TOPICS if i < TRAIN else HELDOUT_TOPICS, registry, conflicts)
        seen.add(r["prompt"])
        rows.append(r)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows ({TRAIN} train, {HELDOUT} held-out) to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
