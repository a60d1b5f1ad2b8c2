"""The pilot of the `signal_v2` preset (issue 25): which constraint kinds can the seed learn, how
often are its answers cut at the cap, and how fast does the chosen generator sample?

    .venv/bin/python scripts/signal_pilot.py                  # ~5 min on 2 cores; prints a markdown table

For each candidate kind, PER_KIND single-constraint prompts on training topics (a seed of its own, so
none is a row of the prompt files); the seed answers each SAMPLES times as `respond` does (T 0.7,
top-p 0.8, the preset's respond cap) on the generator `signal_v2` uses, and the `rules` scorer checks every answer.
A kind is kept when its pass rate lies in [0.15, 0.85]: below it nothing is learnable in an hour,
above it there is nothing to learn. The result is written into docs/PERFORMANCE.md by hand, with
the date, BEFORE the `signal_v2` run.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.make_signal_prompts import TEMPLATES, TOPICS, TRAIN_TOPICS, kinds  # noqa: E402

CANDIDATES = ["startend:end_checker", "detectable_content:postscript", "detectable_format:title",
              "length_constraints:number_words", "length_constraints:number_sentences", "keywords:existence",
              "keywords:forbidden_words", "detectable_format:number_bullet_lists", "punctuation:no_comma",
              "change_case:english_lowercase", "startend:quotation", "detectable_format:json_format"]
PER_KIND, SAMPLES = 12, 2


def pilot_rows(registry) -> list[dict]:
    rng = random.Random(4242)
    rows = []
    for cid in CANDIDATES:
        for j in range(PER_KIND):
            topic = rng.choice(TRAIN_TOPICS)
            kwargs = kinds(rng, TOPICS[topic], v2=True)[cid]
            text = f"{rng.choice(TEMPLATES).format(t=topic)} {registry[cid](cid).build_description(**kwargs).strip()}"
            rows.append({"id": f"pilot-{cid}-{j}", "messages": [{"role": "user", "content": text}],
                         "constraints": [{"id": cid, "kwargs": kwargs}]})
    return rows


def main() -> int:
    from avr_core.backends import make_generator
    from avr_core.backends.base import SamplingParams
    from avr_core.backends.rules import RulesScorer, _registry
    from avr_core.config import load_config, section

    cfg = section(load_config("signal_v2"), "policy", "generator", "respond")
    cap = cfg["respond"]["sampling"]["max_new_tokens"]
    rows = pilot_rows(_registry())
    scorer = RulesScorer.from_rows(rows, "pilot")
    t0 = time.perf_counter()
    gen = make_generator(cfg["policy"], cfg["generator"])
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = gen.generate([r["messages"] for r in rows], SamplingParams(n=SAMPLES, temperature=0.7, top_p=0.8,
                                                                     max_new_tokens=cap, seed=0))
    t_gen = time.perf_counter() - t0
    print(f"generator {cfg['generator']['kind']}: engine start {t_load:.1f} s; {len(rows)} prompts x {SAMPLES} "
          f"samples in {t_gen:.1f} s ({gen.stats.tokens_generated} tokens, "
          f"{gen.stats.tokens_generated / t_gen:.0f} tok/s); cut at cap {cap}: {gen.stats.cut_at_cap} of "
          f"{gen.stats.samples} ({gen.stats.cut_at_cap / max(1, gen.stats.samples):.0%})\n")
    kept = []
    print("| kind | passed / answers | pass rate | kept (0.15-0.85) |\n|---|---:|---:|---|")
    for cid in CANDIDATES:
        mine = [(r, o) for r, o in zip(rows, outs) if r["constraints"][0]["id"] == cid]
        ok = sum(scorer.check(r["messages"][-1]["content"], a)[0] for r, o in mine for a in o)
        n = sum(len(o) for _, o in mine)
        print(f"| {cid} | {ok} / {n} | {ok / n:.2f} | {'yes' if 0.15 <= ok / n <= 0.85 else 'no'} |")
        kept += [cid] if 0.15 <= ok / n <= 0.85 else []
    print(f"\nKINDS_V2 = {kept}")
    gen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
