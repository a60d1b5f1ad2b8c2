import pytest

from avr_core.parsing import extract_rating, is_redundant, is_unchanged, parse_forced_rating


@pytest.mark.parametrize("text,want", [
    ("Good. Rating: [[7]]", 7),
    ("Rating: [[10]]", 10),
    ("Rating: [[1]]", 1),
    ("Rating: [[0]]", None),          # outside 1..10: unparsable, re-sampled
    ("Rating: [[11]]", None),
    ("Rating: [[-3]]", None),
    ("Rating: 7", None),
    ("no rating at all", None),
    ("[[4]] first, then [[9]]", 4),   # the first [[k]] counts, as in the release
    ("Rating: [[7.5]]", None),
])
def test_extract_rating(text, want):
    assert extract_rating(text) == want


@pytest.mark.parametrize("text,want", [("7]]", 7), ("10]]\n", 10), (" 3", 3), ("0]]", None), ("x", None), ("", None)])
def test_parse_forced_rating(text, want):
    assert parse_forced_rating(text) == want


def test_redundancy_word_run_at_threshold():
    assert is_redundant("very " * 60)
    assert not is_redundant("very " * 59)


def test_redundancy_symbol_run():
    assert is_redundant("!!" + " ok !!" * 59 + " x")  # "!!" occurs 60 times
    assert not is_redundant("a normal sentence, with punctuation.")


def test_redundancy_non_latin_counts_characters():
    assert is_redundant("好" * 60)
    assert not is_redundant("好" * 10)


def test_redundancy_threshold_is_configurable():
    assert is_redundant("ha " * 5, threshold=5)


def test_unchanged_copy_ignores_whitespace():
    assert is_unchanged("  The answer  is 4.\n", "The answer is 4.")
    assert not is_unchanged("The answer is 4!", "The answer is 4.")
