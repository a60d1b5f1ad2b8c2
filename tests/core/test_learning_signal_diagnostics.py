"""The diagnostics issue 36 pre-registered for `signal_v3` (docs/PERFORMANCE.md "Learning signal, third
attempt", items 1, 3, 4): the bootstrap clustered by topic, unasked formats, the template rule, and
that an old preset's report (prompts without topics) still renders."""
import json
import re
from pathlib import Path

from avr_core.learning_signal import (
    FORMATS,
    clustered_bootstrap_ci,
    clustered_difference,
    paired_difference,
    prompt_topics,
    shows_format,
    signal_markdown,
    task_topic,
    template_rule,
    unasked_formats,
)

DATA = Path(__file__).resolve().parents[2] / "avr_core" / "data"
rows = lambda name: [json.loads(x) for x in (DATA / name).read_text().splitlines() if x.strip()]  # noqa: E731


def test_one_topic_carrying_the_gain_gives_a_wide_clustered_ci_and_equal_gains_a_narrow_one():
    topics = {f"{t}{i}": t for t in "abcdefgh" for i in range(5)}
    carried = {i: (1.0 if t == "a" else 0.0) for i, t in topics.items()}         # mean 0.125, all from topic a
    spread = {i: (1.0 if i.endswith("0") else 0.0) for i in topics}             # 0.2 on every topic
    lo, hi = clustered_bootstrap_ci(carried, topics)
    assert lo == 0.0 and hi >= 0.3
    assert clustered_bootstrap_ci(spread, topics) == (0.2, 0.2)
    # the prompt-level bootstrap sees 40 independent prompts and is narrower on the same data
    plo, phi = paired_difference({i: 0.0 for i in carried}, carried)["bootstrap_ci95"]
    assert phi - plo < hi - lo
    assert clustered_bootstrap_ci(carried, topics) == (lo, hi)                 # seeded: the same every time


def test_clustered_difference_is_absent_without_topics_and_counts_topics_with_them():
    a, b = {"p": 0.0, "q": 0.0, "r": 0.0}, {"p": 1.0, "q": 1.0, "r": 0.0}
    assert clustered_difference(a, b, None) == {"cluster_bootstrap_ci95": None, "topics": None}
    assert clustered_difference(a, None, {"p": "x"})["cluster_bootstrap_ci95"] is None
    d = clustered_difference(a, b, {"p": "x", "q": "x", "r": "y"})
    assert d["topics"] == 2 and d["cluster_bootstrap_ci95"][0] <= 2 / 3 <= d["cluster_bootstrap_ci95"][1]


def test_topics_of_the_prompt_files():
    v3 = rows("signal_prompts_v3.jsonl")
    topics = prompt_topics(v3)
    assert all(task_topic(r["prompt"]) == r["topic"] for r in v3 if "topic" in r)   # the templates name the topic
    headline = {topics[r["id"]] for r in v3[384:684]}
    secondary = {topics[r["id"]] for r in v3[684:884]}
    assert len(headline) == 24 and len(secondary) == 12 and not headline & secondary
    assert all(topics[r["id"]] != r["id"] for r in v3)                            # no id fallback was needed
    assert prompt_topics(rows("signal_prompts_v2.jsonl")) is None                  # old files: no clustered CI
    assert prompt_topics(rows("signal_prompts.jsonl")) is None


def test_shows_format_agrees_with_the_ifeval_checkers():
    from avr_core.backends.rules import _registry

    registry = _registry()
    answers = ["<<A Title>>\nSome text.", "<<  >> empty title", "Text.\nP.S. see you", "Text. p. s. lower",
               "Hello, world", "No commas here", "* one\n* two", "- dash item", "**bold** only", "  * indented",
               "Plain text.", "mid p.s. text"]
    for kind in FORMATS.values():
        checker = registry[kind](kind)
        checker.build_description(**({"postscript_marker": "P.S."} if kind.endswith("postscript") else
                                     {"num_bullets": 1} if kind.endswith("lists") else {}))
        for y in answers:
            expect = checker.check_following(y)
            if kind.endswith("lists"):     # at least one bullet, where IFEval asks for exactly num_bullets
                expect = bool(re.findall(r"^\s*\*[^\*].*$", y, flags=re.M) + re.findall(r"^\s*-.*$", y, flags=re.M))
            assert shows_format(kind, y) == bool(expect), (kind, y)
    assert not any(shows_format(k, "  ") for k in FORMATS.values())              # empty: strict, shows nothing


def test_unasked_and_asked_rates_on_hand_written_answers():
    judged = [
        ("<<Owls>>\nOwls hoot at night.", [("detectable_format:title", True)]),            # asked, met
        ("Owls hoot, at night.", [("detectable_format:title", False)]),                     # asked, missed
        ("<<Maps>>\nMaps help.\nP.S. bring one", [("punctuation:no_comma", True)]),         # title + P.S. unasked
        ("* whales\n* swim", [("detectable_format:number_bullet_lists", True)]),            # asked bullets
        ("Whales, big ones.", [("detectable_content:postscript", False)]),                  # asked P.S., missed
    ]
    u = unasked_formats(judged)
    assert u["title"] == {"asked": [1, 2], "unasked": [1, 3], "asked_rate": 0.5, "unasked_rate": 0.333333,
                          "selectivity": 0.166667}
    assert u["P.S."]["asked"] == [0, 1] and u["P.S."]["unasked"] == [1, 4]
    assert u["no comma"]["asked"] == [1, 1] and u["no comma"]["unasked"] == [2, 4]   # the owl title and bullets
    assert u["bullets"]["asked"] == [1, 1] and u["bullets"]["unasked"] == [0, 4]
    assert unasked_formats([])["title"]["selectivity"] is None


def test_template_rule_on_made_up_rates():
    f = lambda u, s: {"unasked_rate": u, "selectivity": s}  # noqa: E731
    seed = {"title": f(0.10, 0.50), "P.S.": f(0.30, 0.40), "no comma": f(0.40, 0.20), "bullets": f(None, None)}
    stage1 = {"title": f(0.90, 0.05), "P.S.": f(0.55, 0.45), "no comma": f(0.45, 0.30), "bullets": f(0.8, 0.1)}
    t = template_rule(seed, stage1)
    assert t["title"] == {"template": True, "selectivity_up": False}       # a template, not instruction following
    assert t["P.S."] == {"template": True, "selectivity_up": True}         # exactly 0.25 above counts
    assert t["no comma"] == {"template": False, "selectivity_up": True}    # only 0.05 above the seed
    assert t["bullets"] == {"template": None, "selectivity_up": None}


def _report(**more) -> dict:
    comparison = paired_difference({"p": 0.0, "q": 0.5}, {"p": 1.0, "q": 0.5})
    return {"scorer": "rules", "heldout": 2, "comparisons": {"seed -> stage1": comparison}, "tts": [],
            "per_constraint": {"seed": {"punctuation:no_comma": [1, 2]}}, "synthesis": {}, **more}


def test_an_old_style_report_still_renders():
    md = signal_markdown(_report())                                          # no topics, no formats (v1/v2 JSON)
    assert "| seed -> stage1 | 2 |" in md and "bootstrap clustered by topic" in md
    assert "| — |" in md and "Unasked formats" not in md and "Per constraint" in md


def test_a_v3_report_prints_the_clustered_ci_and_the_format_tables():
    seed = unasked_formats([("a, b", [("detectable_format:title", False)]), ("<<T>> c", [])])
    stage1 = unasked_formats([("<<T>> a", [("detectable_format:title", True)]), ("<<T>> c", [])])
    report = _report(formats={"seed": seed, "stage1": stage1}, template=template_rule(seed, stage1))
    report["comparisons"]["seed -> stage1"].update(cluster_bootstrap_ci95=[0.0, 0.5], topics=2)
    md = signal_markdown(report)
    assert "| [+0.0000, +0.5000] (2) |" in md
    assert md.index("Per constraint") < md.index("Unasked formats") < md.index("Template artefact")
    assert "| title | stage1 | 1/1 (1.00) | 1/1 (1.00) | +0.00 |" in md
    assert "| title | 1.00 → 1.00 | no | -1.00 → 0.00 | yes |" in md     # always a title: 1.00 unasked for both
