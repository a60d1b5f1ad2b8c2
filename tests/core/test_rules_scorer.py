"""The `rules` scorer (avr_core/backends/rules.py): hand-made answers with known constraint
satisfaction, the lookup by prompt text, the loud failures, and the `signal` preset's data."""
import json

import pytest

import avr_core.backends as backends
from avr_core.backends.base import Scorer
from avr_core.backends.rules import RulesScorer
from avr_core.config import load_config
from avr_core.inputs import InputError, load_prompts

WORDS = {"id": "length_constraints:number_words", "kwargs": {"num_words": 10, "relation": "less than"}}
SENTENCES = {"id": "length_constraints:number_sentences", "kwargs": {"num_sentences": 3, "relation": "less than"}}
BULLETS = {"id": "detectable_format:number_bullet_lists", "kwargs": {"num_bullets": 2}}
PARAGRAPHS = {"id": "length_constraints:number_paragraphs", "kwargs": {"num_paragraphs": 2}}
KEYWORDS = {"id": "keywords:existence", "kwargs": {"keywords": ["river"]}}
FORBIDDEN = {"id": "keywords:forbidden_words", "kwargs": {"forbidden_words": ["very"]}}
LOWER = {"id": "change_case:english_lowercase", "kwargs": {}}
END = {"id": "startend:end_checker", "kwargs": {"end_phrase": "That is all."}}
JSON = {"id": "detectable_format:json_format", "kwargs": {}}

ROWS = [{"id": "a", "prompt": "Describe a river.", "constraints": [WORDS, KEYWORDS, FORBIDDEN, LOWER]},
        {"id": "b", "prompt": "List two fruits.", "constraints": [BULLETS, END]},
        {"id": "c", "prompt": "Give a fact as data.", "constraints": [JSON]},
        {"id": "d", "prompt": "Two short paragraphs.", "constraints": [PARAGRAPHS, SENTENCES]},
        {"id": "e", "prompt": "No constraints here."}]


@pytest.fixture()
def scorer(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return RulesScorer(str(path))


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("prompt, answer, want", [
    # 4 constraints: < 10 words, "river", not "very", all lowercase
    ("Describe a river.", "the river runs slowly to the sea.", 1.0),
    ("Describe a river.", "The river runs slowly to the sea.", 0.75),                  # a capital letter
    ("Describe a river.", "the river is very long and runs very slowly to the sea.", 0.5),   # 12 words, "very"
    ("Describe a river.", "The stream is very long and runs very slowly to the sea.", 0.0),
    ("Describe a river.", "", 0.0),                                                     # empty follows nothing
    # exactly 2 bullets, ending phrase
    ("List two fruits.", "* apple\n* pear\nThat is all.", 1.0),
    ("List two fruits.", "* apple\n* pear\n* plum\nThat is all.", 0.5),
    ("List two fruits.", "* apple\n* pear\nThat is all. Bye.", 0.5),
    ("Give a fact as data.", '```json\n{"fact": "water boils at 100 C"}\n```', 1.0),
    ("Give a fact as data.", "Water boils at 100 C.", 0.0),
    # 2 paragraphs split by ***, < 3 sentences (counted by the library's rule-based splitter)
    ("Two short paragraphs.", "One sentence.\n***\nAnother one.", 1.0),
    ("Two short paragraphs.", "One. Two. Three.\n***\nFour.", 0.5),
    ("Two short paragraphs.", "One. Two. Three. Four.", 0.0),
])
def test_fraction_of_constraints_satisfied(scorer, prompt, answer, want):
    assert scorer.score([conv(prompt, answer)]) == [want]


def test_is_a_scorer_and_counts_calls_not_time(scorer):
    assert isinstance(scorer, Scorer)
    scorer.score([conv("Describe a river.", "x"), conv("List two fruits.", "y")])
    assert (scorer.stats.calls, scorer.stats.requests) == (1, 2)


def test_lookup_uses_the_last_user_turn_and_ignores_surrounding_space(scorer):
    multi = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "  Describe a river.\n"},
             {"role": "assistant", "content": "the river runs."}]
    assert scorer.score([multi]) == [1.0]
    assert scorer.check("Describe a river.", "The river runs.") == [True, True, True, False]


def test_unknown_prompt_fails_loudly(scorer):
    with pytest.raises(KeyError, match="prompt not in"):
        scorer.score([conv("A prompt nobody wrote.", "x")])
    with pytest.raises(KeyError, match="prompt not in"):           # a row without constraints is not scored
        scorer.score([conv("No constraints here.", "x")])


@pytest.mark.parametrize("bad, match", [
    ({"id": "keywords:nonexistent", "kwargs": {}}, "unknown constraint id"),
    ({"id": "length_constraints:number_words", "kwargs": {"num_words": 5}}, r"kwargs missing \['relation'\]"),
    ({"id": "length_constraints:number_words", "kwargs": {"words": 5}}, "bad kwargs"),
])
def test_bad_constraints_are_refused_at_load(bad, match):
    with pytest.raises(ValueError, match=match):
        RulesScorer.from_rows([{"messages": [{"role": "user", "content": "x"}], "constraints": [bad]}])


def test_the_same_prompt_with_two_constraint_sets_is_refused():
    rows = [{"messages": [{"role": "user", "content": "x"}], "constraints": [c]} for c in (JSON, LOWER)]
    with pytest.raises(ValueError, match="twice"):
        RulesScorer.from_rows(rows)


def test_inputs_validate_the_constraints_field(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "x", "constraints": [{"id": "punctuation:no_comma"}]}) + "\n")
    assert load_prompts(p)[0]["constraints"] == [{"id": "punctuation:no_comma", "kwargs": {}}]
    for bad, field in [([], "constraints"), ([{"kwargs": {}}], "constraints[0].id"),
                       ([{"id": "a", "kwargs": [1]}], "constraints[0].kwargs")]:
        p.write_text(json.dumps({"prompt": "x", "constraints": bad}) + "\n")
        with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
            load_prompts(p)


def test_factory_builds_it_from_the_scorer_section(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    backends.clear_cache()
    try:
        s = backends.make_scorer({"kind": "rules", "constraints": str(path), "model": {"path": "unused"}})
        assert isinstance(s, RulesScorer) and s.score([conv("Give a fact as data.", "{}")]) == [1.0]
    finally:
        backends.clear_cache()


def test_signal_preset_loads_and_its_prompt_set_is_sound():
    cfg = load_config("signal")
    assert (cfg.flow, cfg.scorer.kind, cfg.scorer.constraints) == ("signal", "rules", cfg.data.prompts)
    rows = load_prompts(f"{backends.__file__.rsplit('/avr_core/', 1)[0]}/{cfg.data.prompts}")
    assert len(rows) >= 300 and all(r.get("constraints") for r in rows)
    held = set(range(*cfg.data.heldout))
    trained = set(range(*cfg.data.stage1_sft)) | set(range(*cfg.data.stage1_po))
    assert len(held) >= 64 and not held & trained                  # held-out rows are never trained on
    s = RulesScorer.from_rows(rows)                                  # every constraint checks (ids, kwargs)
    assert len(s.constraints) == len(rows)                           # every prompt text is unique
    with pytest.raises(Exception, match="scorer.constraints"):
        load_config("signal", ["scorer.constraints="])
