"""Write the constraint prompt sets of the `signal` presets (deterministic: the same files every time).

    .venv/bin/python scripts/make_signal_prompts.py        # avr_core/data/signal_prompts.jsonl (`signal`)
    .venv/bin/python scripts/make_signal_prompts.py --v2   # avr_core/data/signal_prompts_v2.jsonl (`signal_v2`)
    .venv/bin/python scripts/make_signal_prompts.py --v3   # avr_core/data/signal_prompts_v3.jsonl (`signal_v3`)

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

v3 (issue 36, docs/PERFORMANCE.md "Learning signal, third attempt") draws only KINDS_V3, the six
kinds v2's Stage-1 model met more often or as often (the formats, forbidden words, word limits), by
the same quota, the same templates and the same checker texts. Rows 0..384 train on v2's training
topics, 384..684 are held out on HELDOUT_TOPICS_V3 (24 topics no earlier file uses), and 684..884 are
v2's 200 held-out rows verbatim (split "heldout_v2": the secondary set). Its own rows carry their
`topic`, for the bootstrap clustered by topic.
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
OUT_V3 = ROOT / "avr_core" / "data" / "signal_prompts_v3.jsonl"
TRAIN_V3, HELDOUT_V3 = 384, 300       # 96 RSFT- + 288 DPO-synthesis prompts; 300 held out (the power calculation)
# v2's Stage-1 model gained on or held these (docs/PERFORMANCE.md, v2's per-constraint table); out: the
# sentence limits and required keywords (traded off, -9 and -9 prompts) and JSON (at the floor, 2 -> 0 of 33)
KINDS_V3 = ["detectable_content:postscript", "detectable_format:title", "punctuation:no_comma",
            "keywords:forbidden_words", "detectable_format:number_bullet_lists", "length_constraints:number_words"]

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
# v3's held-out topics: in no row of the v1 or v2 file, and no topic above is part of one (or the reverse)
HELDOUT_TOPICS_V3 = {
    "glaciers": ["ice", "cold", "slow"], "origami": ["paper", "fold", "shapes"],
    "windmills": ["wind", "blades", "power"], "jellyfish": ["sea", "sting", "float"],
    "hot air balloons": ["basket", "float", "sky"], "knitting": ["yarn", "needles", "scarf"],
    "sandcastles": ["beach", "sand", "bucket"], "telescopes": ["stars", "lens", "planets"],
    "hedgehogs": ["spines", "garden", "small"], "kayaks": ["paddle", "lake", "boat"],
    "tulips": ["flowers", "spring", "bulbs"], "volunteering": ["help", "community", "time"],
    "maps": ["roads", "find", "places"], "dinosaurs": ["fossils", "bones", "extinct"],
    "ice skating": ["rink", "skates", "balance"], "pancakes": ["flour", "syrup", "pan"],
    "the post office": ["letters", "stamps", "mail"], "coral reefs": ["fish", "ocean", "colorful"],
    "hiking boots": ["feet", "trail", "walk"], "flea markets": ["old", "buy", "stalls"],
    "puppets": ["strings", "show", "hands"], "whales": ["ocean", "big", "swim"],
    "compost": ["soil", "food", "worms"], "paper airplanes": ["fold", "fly", "throw"],
}

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


def prompt_row(row_id: str, i: int, task: str, pool: dict, chosen: list[str], registry, train: int = TRAIN,
               topic: str | None = None) -> dict:
    """The row: the task, then each chosen constraint's IFEval description; the constraints as data
    (rows before `train` are training rows; `topic`, when given, is stored too)."""
    texts = [registry[cid](cid).build_description(**pool[cid]).strip() for cid in chosen]
    return {"id": row_id, "prompt": " ".join([task, *texts]),
            "constraints": [{"id": cid, "kwargs": pool[cid]} for cid in chosen],
            "split": "train" if i < train else "heldout", **({"topic": topic} if topic else {})}


def clashes(cid: str, chosen: list[str], conflicts) -> bool:
    return any(c in conflicts.get(cid, ()) or cid in conflicts.get(c, ()) or {c, cid} in EXTRA_CONFLICTS
               for c in chosen)


def row_by_quota(i: int, rng: random.Random, topics: list[str], kinds_used: dict, n: int, registry,
                 conflicts, v3: bool = False) -> dict:
    """A prompt with `n` constraints: the least-used kinds of `kinds_used` (kind -> uses so far,
    updated here) that do not clash, ties broken at random. v3: its id prefix, split boundary and
    held-out topics, and the topic stored in the row."""
    topic = rng.choice(topics)
    task = rng.choice(TEMPLATES).format(t=topic)
    pool = kinds(rng, (HELDOUT_TOPICS_V3 | TOPICS)[topic] if v3 else TOPICS[topic], v2=True)
    chosen: list[str] = []
    for cid in sorted(kinds_used, key=lambda k: (kinds_used[k], rng.random())):
        if len(chosen) < n and not clashes(cid, chosen, conflicts):
            chosen.append(cid)
    for cid in chosen:
        kinds_used[cid] += 1
    if v3:
        return prompt_row(f"sv3-{i:04d}", i, task, pool, chosen, registry, TRAIN_V3, topic)
    return prompt_row(f"sv2-{i:04d}", i, task, pool, chosen, registry)


def rows_by_quota(rng: random.Random, splits, kind_list: list[str], seen: set, registry, conflicts,
                  v3: bool = False) -> list[dict]:
    """`splits` = [(rows, topics), ...]: each split's rows by quota over `kind_list` (a quota per
    split: the same mix in train and held-out), one or two constraints alternating, every prompt
    text once (`seen` holds the texts already used, and is updated)."""
    rows: list[dict] = []
    for count, topics in splits:
        used = dict.fromkeys(kind_list, 0)
        for _ in range(count):
            i, n = len(rows), 1 + len(rows) % 2
            r = row_by_quota(i, rng, topics, used, n, registry, conflicts, v3)
            while r["prompt"] in seen:               # the scorer looks a prompt up by its text
                for c in r["constraints"]:
                    used[c["id"]] -= 1
                r = row_by_quota(i, rng, topics, used, n, registry, conflicts, v3)
            seen.add(r["prompt"])
            rows.append(r)
    return rows


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def main_v2(registry, conflicts) -> int:
    v1 = read_rows(OUT)[TRAIN:TRAIN + V1_HELDOUT]
    rng = random.Random(SEED + 2)
    rows = rows_by_quota(rng, ((TRAIN, TRAIN_TOPICS), (HELDOUT_V2, HELDOUT_TOPICS)), KINDS_V2,
                         {r["prompt"] for r in v1}, registry, conflicts)
    rows += [{**r, "split": "heldout_v1"} for r in v1]
    OUT_V2.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows ({TRAIN} train, {HELDOUT_V2} held-out, {V1_HELDOUT} v1 held-out) "
          f"to {OUT_V2.relative_to(ROOT)}")
    return 0


def main_v3(registry, conflicts) -> int:
    """v2's training topics (the method's data source is unchanged), new held-out topics, then v2's
    held-out rows verbatim (split "heldout_v2")."""
    v2 = read_rows(OUT_V2)[TRAIN:TRAIN + HELDOUT_V2]
    rng = random.Random(SEED + 3)
    rows = rows_by_quota(rng, ((TRAIN_V3, TRAIN_TOPICS), (HELDOUT_V3, list(HELDOUT_TOPICS_V3))), KINDS_V3,
                         {r["prompt"] for r in v2}, registry, conflicts, v3=True)
    rows += [{**r, "split": "heldout_v2"} for r in v2]
    OUT_V3.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows ({TRAIN_V3} train, {HELDOUT_V3} held-out, {HELDOUT_V2} v2 held-out) "
          f"to {OUT_V3.relative_to(ROOT)}")
    return 0


def main() -> int:
    from if_verifiable.ifeval import instructions_registry

    registry, conflicts = instructions_registry.INSTRUCTION_DICT, instructions_registry.INSTRUCTION_CONFLICTS
    if "--v2" in sys.argv[1:]:
        return main_v2(registry, conflicts)
    if "--v3" in sys.argv[1:]:
        return main_v3(registry, conflicts)
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
