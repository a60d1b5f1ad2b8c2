"""Learning signal: did training move the configured scorer? An honest paired measurement.

    >>> paired_difference({"p1": 5.0, "p2": 6.0}, {"p1": 5.5, "p2": 6.5})  # doctest: +NORMALIZE_WHITESPACE
    {'n': 2, 'mean_a': 5.5, 'mean_b': 6.0, 'mean_diff': 0.5, 'std_diff': 0.0, 'se': 0.0, 'ci95': [0.5, 0.5],
     'b_better': 2, 'a_better': 0, 'ties': 0, 'bootstrap_ci95': [0.5, 0.5], 'sign_test_p': 0.5}

On a 135M model with the judge scorer the difference may be small or negative; report it as is.
"""
from __future__ import annotations

import math
import random
import re


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict:
    """Mean of b - a over prompts scored in both, with its standard error and a normal 95% CI."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("no prompt was scored for both models")
    d = [b[i] - a[i] for i in ids]
    n = len(d)
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    se = std / math.sqrt(n)
    r = lambda x: round(x, 6)  # noqa: E731
    return {"n": n, "mean_a": r(sum(a[i] for i in ids) / n), "mean_b": r(sum(b[i] for i in ids) / n),
            "mean_diff": r(mean), "std_diff": r(std), "se": r(se), "ci95": [r(mean - 1.96 * se), r(mean + 1.96 * se)],
            "b_better": sum(x > 0 for x in d), "a_better": sum(x < 0 for x in d), "ties": sum(x == 0 for x in d),
            "bootstrap_ci95": [r(x) for x in bootstrap_ci(d)],
            "sign_test_p": r(sign_test(sum(x > 0 for x in d), sum(x < 0 for x in d)))}


def bootstrap_ci(d: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% CI of the mean of `d` over prompt resamples (seeded: the same every time).
    Scores are bounded and ties dominate, so the normal CI is checked against this one.

    >>> bootstrap_ci([0.0, 0.0, 1.0, 1.0])
    (0.0, 1.0)
    """
    rng, n = random.Random(seed), len(d)
    means = sorted(sum(rng.choices(d, k=n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test (ties dropped): P(a split at least this uneven | no effect).

    >>> round(sign_test(9, 1), 4)
    0.0215
    """
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def refinement_outcomes(records: list[dict]) -> dict:
    """How often the refinements of stage-1 synthesis beat their y0, from `rm_score` records
    (``answer_score`` = r(y0), every refinement's ``score``).

    >>> refs = lambda *s: [{"refinements": [{"score": x} for x in s]}]
    >>> o = refinement_outcomes([{"answer_score": 0.5, "critiques": refs(1.0, 0.5)},
    ...                          {"answer_score": 1.0, "critiques": refs(0.0)}])
    >>> o["better"], o["equal"], o["worse"], o["prompts_with_better"], o["mean_y0"], o["mean_best_gain"]
    (1, 1, 1, 1, 0.75, -0.25)
    """
    out = {"prompts": len(records), "mean_y0": 0.0, "refinements": 0, "better": 0, "equal": 0, "worse": 0,
           "prompts_with_better": 0, "mean_best_gain": 0.0}
    gains = []
    for r in records:
        s0 = r["answer_score"]
        scores = [f["score"] for c in r.get("critiques", []) for f in c.get("refinements", []) if "score" in f]
        out["refinements"] += len(scores)
        out["better"] += sum(s > s0 for s in scores)
        out["equal"] += sum(s == s0 for s in scores)
        out["worse"] += sum(s < s0 for s in scores)
        out["prompts_with_better"] += any(s > s0 for s in scores)
        gains.append(max(scores, default=s0) - s0)
    if records:
        out["mean_y0"] = round(sum(r["answer_score"] for r in records) / len(records), 6)
        out["mean_best_gain"] = round(sum(gains) / len(gains), 6)
    return out


def per_constraint(verdicts: list[tuple[str, bool]]) -> dict[str, list[int]]:
    """(constraint id, satisfied) pairs -> {id: [satisfied, total]}.

    >>> per_constraint([("a", True), ("a", False), ("b", True)])
    {'a': [1, 2], 'b': [1, 1]}
    """
    out: dict[str, list[int]] = {}
    for cid, ok in verdicts:
        c = out.setdefault(cid, [0, 0])
        c[0] += bool(ok)
        c[1] += 1
    return dict(sorted(out.items()))


def _ci(d: dict) -> str:
    lo, hi = d["ci95"]
    verdict = "CI excludes 0" if lo > 0 or hi < 0 else "CI includes 0: no evidence"
    return f"{d['mean_diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {verdict}"


def cut_at_cap(manifests: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """artifact -> (answers cut at the token cap, samples) for every sampling stage among
    `manifests` (artifact -> manifest), from the backend counters each stage records.

    >>> cut_at_cap({"refine/ab": {"counts": {"backend_samples": 8, "backend_cut_at_cap": 6}},
    ...             "select/cd": {"counts": {}}})
    {'refine/ab': (6, 8)}
    """
    return {a: (m["counts"].get("backend_cut_at_cap", 0), m["counts"]["backend_samples"])
            for a, m in manifests.items() if m["counts"].get("backend_samples")}


def signal_markdown(report: dict) -> str:
    """The `signal` preset's report: held-out comparisons, test-time scaling, synthesis counts."""
    lines = [f"### Learning signal (scorer: {report['scorer']}, {report['heldout']} held-out prompts)", "",
             "| comparison | n | mean A | mean B | B − A | 95% CI | reading | B better / A better / ties |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for name, d in report["comparisons"].items():
        lines.append(f"| {name} | {d['n']} | {d['mean_a']:.4f} | {d['mean_b']:.4f} | {_ci(d)} | "
                     f"{d['b_better']} / {d['a_better']} / {d['ties']} |")
    lines += ["", "The same comparisons checked two more ways (scores are bounded and ties dominate):", "",
              "| comparison | paired bootstrap 95% CI (10,000 resamples) | sign test p (B better vs A better) | "
              "bootstrap clustered by topic, 95% CI (topics) |", "|---|---|---:|---|"]
    for name, d in report["comparisons"].items():
        if "bootstrap_ci95" in d:
            lo, hi = d["bootstrap_ci95"]
            lines.append(f"| {name} | [{lo:+.4f}, {hi:+.4f}] | {d['sign_test_p']:.4f} | {_clustered(d)} |")
    if any(d.get("cluster_bootstrap_ci95") for d in report["comparisons"].values()):
        lines += ["", "The clustered bootstrap resamples whole topics (10,000 resamples, seed 0): if it includes 0 "
                  "where the normal CI does not, the difference is carried by a few topics."]
    if report.get("training"):
        lines += ["", "Training, as it ran (optimizer steps taken; planned = epochs x examples / global batch):", "",
                  "| model | examples or pairs | optimizer steps | planned | final loss |", "|---|---:|---:|---:|---:|"]
        for name, t in report["training"].items():
            lines.append(f"| {name} | {t['examples']} | {t['steps']} | {t['planned_steps']} | {t['final_loss']} |")
    if not report["tts"]:
        lines += ["", "Test-time scaling: not part of this run (tts.rounds = 0); run it on its own with "
                  "`tts.rounds=3` added to this run's command (every other stage comes from the cache)."]
        return _constraints_and_synthesis(lines, report)
    lines += ["", "Test-time scaling of the Stage-1 model (greedy; R refinement rounds; paired vs R = 0):", "",
              "| R | n | mean | R − R0 | 95% CI | reading | better / worse than R0 | mean words |",
              "|---:|---:|---:|---:|---|---|---|---:|"]
    for row in report["tts"]:
        d = row["vs_r0"]
        lines.append(f"| {row['R']} | {row['n']} | {row['mean']:.4f} | {_ci(d)} | {d['b_better']} / {d['a_better']} | "
                     f"{row['mean_words']:.1f} |")
    return _constraints_and_synthesis(lines, report)


def _clustered(d: dict) -> str:
    """The clustered CI cell: "—" where the prompts carry no topic (the `signal` and `signal_v2` files)."""
    ci = d.get("cluster_bootstrap_ci95")
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}] ({d['topics']})" if ci else "—"


def _rate(pair: list[int]) -> str:
    return f"{pair[0]}/{pair[1]} ({pair[0] / pair[1]:.2f})" if pair[1] else "—"


def _formats(lines: list[str], report: dict) -> None:
    """The unasked-format and template tables (issue 36 item 2), when the report has them."""
    if not report.get("formats"):
        return
    lines += ["", "Unasked formats on the held-out prompts: asked = the prompt asks for the format and the answer "
              "meets it; unasked = the prompt does not ask and the answer shows it anyway; selectivity = asked − "
              "unasked (a prompt-independent template has selectivity near 0):", "",
              "| format | model | asked | unasked | selectivity |", "|---|---|---:|---:|---:|"]
    for kind in FORMATS:
        for model, f in report["formats"].items():
            r, sel = f[kind], f[kind]["selectivity"]
            lines.append(f"| {kind} | {model} | {_rate(r['asked'])} | {_rate(r['unasked'])} | "
                         f"{'—' if sel is None else f'{sel:+.2f}'} |")
    if not report.get("template"):
        return
    yes = lambda v: "—" if v is None else ("yes" if v else "no")  # noqa: E731
    lines += ["", "Template artefact (rule fixed before the run): Stage-1 uses a template for a format if its unasked "
              "rate is at least 0.50 and at least 0.25 above the seed's; following the instruction needs its "
              "selectivity to exceed the seed's:", "",
              "| format | unasked rate, seed → Stage-1 | template | selectivity, seed → Stage-1 | "
              "selectivity above the seed's |", "|---|---|---|---|---|"]
    num = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    seed, stage1 = report["formats"]["seed"], report["formats"]["stage1"]
    for kind, t in report["template"].items():
        lines.append(f"| {kind} | {num(seed[kind]['unasked_rate'])} → {num(stage1[kind]['unasked_rate'])} | "
                     f"{yes(t['template'])} | {num(seed[kind]['selectivity'])} → {num(stage1[kind]['selectivity'])} | "
                     f"{yes(t['selectivity_up'])} |")


def _constraints_and_synthesis(lines: list[str], report: dict) -> str:
    lines += ["", "Per constraint on the held-out prompts (satisfied / total):", "",
              "| constraint | " + " | ".join(report["per_constraint"]) + " |",
              "|---|" + "---:|" * len(report["per_constraint"])]
    ids = sorted({c for v in report["per_constraint"].values() for c in v})
    for c in ids:
        cells = [f"{v[c][0]}/{v[c][1]}" if c in v else "-" for v in report["per_constraint"].values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    _formats(lines, report)
    lines += ["", "Stage-1 synthesis: how often refinements beat y0, and what selection kept:", "",
              "| synthesis | prompts | mean r(y0) | refinements | better / equal / worse than y0 | "
              "prompts with a better one | mean best gain |", "|---|---:|---:|---:|---|---:|---:|"]
    for name, s in report["synthesis"].items():
        o = s["outcomes"]
        lines.append(f"| {name} | {o['prompts']} | {o['mean_y0']:.4f} | {o['refinements']} | "
                     f"{o['better']} / {o['equal']} / {o['worse']} | {o['prompts_with_better']} | "
                     f"{o['mean_best_gain']:+.4f} |")
    for name, s in report["synthesis"].items():
        kept = ", ".join(f"{k}={v}" for k, v in sorted(s["select_counts"].items()) if not k.startswith("backend_"))
        lines.append(f"\n`select` ({name}): {kept}")
    if report.get("cut_at_cap"):
        lines += ["", "Answers cut at their token cap (stopped by max_new_tokens, not finished), per sampling stage:",
                  "", "| stage | artifact | cut / samples | share |", "|---|---|---:|---:|"]
        for art, (cut, n) in report["cut_at_cap"].items():
            lines.append(f"| {art.split('/')[0]} | {art} | {cut} / {n} | {cut / n:.0%} |")
    return "\n".join(lines) + "\n"


# -- diagnostics of issue 36 (docs/PERFORMANCE.md "Learning signal, third attempt", items 1, 3, 4) ---------------
# The task sentence of every signal prompt (scripts/make_signal_prompts.py TEMPLATES), topic captured: a row
# without a `topic` field (v2's rows, the v3 file's secondary set) names its topic in this sentence.
TASKS = [re.compile(p) for p in (
    r"Write a short paragraph about (.+?)\.", r"Explain (.+?) to a ten-year-old\.",
    r"Give some practical tips about (.+?)\.", r"Describe (.+?) in a few sentences\.",
    r"Write a very short story that involves (.+?)\.", r"Write a short note to a friend about (.+?)\.",
    r"What are the benefits of (.+?)\?", r"Write a short announcement for a community event about (.+?)\.")]


def task_topic(prompt: str) -> str | None:
    """The topic a signal prompt's task sentence names (None: not one of the templates).

    >>> task_topic("Give some practical tips about bridges. Answer with less than 20 words.")
    'bridges'
    >>> task_topic("Tell me a joke.") is None
    True
    """
    for p in TASKS:
        m = p.match(prompt)
        if m:
            return m.group(1)
    return None


def prompt_topics(rows: list[dict]) -> dict[str, str] | None:
    """id -> topic for raw prompt-file rows (``id``, ``prompt``, optional ``topic``). None when no row
    carries a ``topic`` (the `signal` and `signal_v2` files): those presets have no clustered CI. A row
    without one takes the topic its task sentence names (`task_topic`; v2's rows, all made from the
    templates); failing that, its own id, so it is a cluster of one (never merged with others by guess).

    >>> prompt_topics([{"id": "a", "prompt": "Explain owls to a ten-year-old.", "topic": "owls"},
    ...                {"id": "b", "prompt": "Describe maps in a few sentences."}, {"id": "c", "prompt": "Hi."}])
    {'a': 'owls', 'b': 'maps', 'c': 'c'}
    >>> prompt_topics([{"id": "a", "prompt": "Explain owls to a ten-year-old."}]) is None
    True
    """
    if not any(r.get("topic") for r in rows):
        return None
    return {r["id"]: r.get("topic") or task_topic(r.get("prompt", "")) or r["id"] for r in rows if "id" in r}


def clustered_bootstrap_ci(d: dict[str, float], topics: dict[str, str], resamples: int = 10_000,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile 95% CI of the mean of `d` (id -> paired difference) when whole topics are resampled
    with replacement (every prompt of a drawn topic): prompts on one topic are not independent, so
    a gain carried by a few topics shows here as a wide CI. Seeded: the same every time.

    >>> t = {"a": "x", "b": "x", "c": "y", "d": "y"}
    >>> clustered_bootstrap_ci({"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0}, t)   # one topic carries it all
    (0.0, 1.0)
    >>> clustered_bootstrap_ci({"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}, t)   # the same gain on each
    (0.5, 0.5)
    """
    sums: dict[str, list[float]] = {}
    for i, x in d.items():
        s = sums.setdefault(topics.get(i, i), [0.0, 0])
        s[0] += x
        s[1] += 1
    rng, clusters = random.Random(seed), list(sums.values())
    means = []
    for _ in range(resamples):
        drawn = rng.choices(clusters, k=len(clusters))
        means.append(sum(s for s, _ in drawn) / sum(n for _, n in drawn))
    means.sort()
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def clustered_difference(a: dict[str, float] | None, b: dict[str, float] | None,
                         topics: dict[str, str] | None) -> dict:
    """The topic-clustered CI of b − a over the prompts scored in both; None where topics or scores are missing.

    >>> clustered_difference({"p": 0.0, "q": 0.0}, {"p": 1.0, "q": 0.0}, None)
    {'cluster_bootstrap_ci95': None, 'topics': None}
    """
    ids = sorted(set(a or {}) & set(b or {}))
    if topics is None or not ids:
        return {"cluster_bootstrap_ci95": None, "topics": None}
    ci = clustered_bootstrap_ci({i: b[i] - a[i] for i in ids}, topics)
    return {"cluster_bootstrap_ci95": [round(x, 6) for x in ci], "topics": len({topics.get(i, i) for i in ids})}


# What "shows the format" means when the prompt did not ask for it: IFEval's own checks (the patterns of
# if_verifiable's TitleChecker, PostscriptChecker("P.S."), CommaChecker, BulletListChecker), written out
# because importing the registry costs seconds (langdetect, nltk); tests/core/test_learning_signal_diagnostics.py
# checks they agree. Bullets: at least one line IFEval counts as a bullet ("*" not followed by "*", or "-").
FORMATS = {"title": "detectable_format:title", "P.S.": "detectable_content:postscript",
           "no comma": "punctuation:no_comma", "bullets": "detectable_format:number_bullet_lists"}
_SHOWS = {
    "detectable_format:title": lambda y: any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", y)),
    "detectable_content:postscript": lambda y: bool(re.search(r"\s*p\.\s?s\..*$", y.lower(), flags=re.MULTILINE)),
    "punctuation:no_comma": lambda y: "," not in y,
    "detectable_format:number_bullet_lists":
        lambda y: bool(re.search(r"^\s*\*[^\*].*$|^\s*-.*$", y, flags=re.MULTILINE)),
}


def shows_format(kind: str, answer: str) -> bool:
    """Does `answer` show format `kind` (an IFEval id of FORMATS) whatever was asked? An empty answer
    shows nothing (IFEval's strict rule).

    >>> [shows_format(k, "<<Owls>>\\n* hoot\\nP.S. bye") for k in FORMATS.values()]
    [True, True, True, True]
    >>> [shows_format(k, "Owls, at night.") for k in FORMATS.values()]
    [False, False, False, False]
    """
    return bool(answer.strip()) and _SHOWS[kind](answer)


def unasked_formats(judged: list[tuple[str, list[tuple[str, bool]]]]) -> dict[str, dict]:
    """Per format kind, from (answer, [(constraint id, met)]) per prompt: asked = [met, prompts that ask
    for it], unasked = [answers showing it, prompts that do not], their rates, and selectivity = asked
    rate − unasked rate (None where a side has no prompt). A model that always writes a title has
    unasked rate 1 and selectivity 0 on titles.

    >>> u = unasked_formats([("<<A>> hi", [("detectable_format:title", True)]),
    ...                      ("<<B>> yo", [("punctuation:no_comma", True)]),
    ...                      ("a, b", [("punctuation:no_comma", False)])])
    >>> u["title"]
    {'asked': [1, 1], 'unasked': [1, 2], 'asked_rate': 1.0, 'unasked_rate': 0.5, 'selectivity': 0.5}
    """
    out = {}
    for name, kind in FORMATS.items():
        asked = [ok for _, vs in judged for cid, ok in vs if cid == kind]
        unasked = [shows_format(kind, y) for y, vs in judged if kind not in {cid for cid, _ in vs}]
        rate = lambda xs: round(sum(xs) / len(xs), 6) if xs else None  # noqa: E731
        a, u = rate(asked), rate(unasked)
        out[name] = {"asked": [sum(asked), len(asked)], "unasked": [sum(unasked), len(unasked)], "asked_rate": a,
                     "unasked_rate": u, "selectivity": None if a is None or u is None else round(a - u, 6)}
    return out


def template_rule(seed: dict[str, dict], stage1: dict[str, dict]) -> dict[str, dict]:
    """The pre-registered template-artefact rule per format kind, from two `unasked_formats` results:
    template = Stage-1's unasked rate ≥ 0.50 and ≥ 0.25 above the seed's; selectivity_up = Stage-1's
    selectivity exceeds the seed's (needed to call it instruction following). None: a rate is missing.

    >>> r = lambda u, s: {"title": {"unasked_rate": u, "selectivity": s}}
    >>> template_rule(r(0.1, 0.6), r(0.9, 0.1))["title"]
    {'template': True, 'selectivity_up': False}
    >>> template_rule(r(0.3, 0.2), r(0.5, 0.4))["title"]   # 0.50 but only 0.20 above the seed
    {'template': False, 'selectivity_up': True}
    """
    out = {}
    for name in stage1:
        s, t = seed.get(name, {}), stage1[name]
        us, ut = s.get("unasked_rate"), t.get("unasked_rate")
        ss, st = s.get("selectivity"), t.get("selectivity")
        out[name] = {"template": None if us is None or ut is None else ut >= 0.50 and ut - us >= 0.25 - 1e-9,
                     "selectivity_up": None if ss is None or st is None else st > ss}
    return out
