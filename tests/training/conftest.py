"""Fixtures for the training tests: a tiny random Llama (hidden 64, 2 layers) that carries the
real SmolLM2 tokenizer and ChatML template, so every step takes well under a second on CPU."""

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    from avr_core.model_refs import resolve_model_path
    return resolve_model_path("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tok(smollm2_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tests.tiny_models import tiny_llama as make

    return make(str(tmp_path_factory.mktemp("tiny-llama")))


def conversation(i: int) -> list[dict]:
    """A 6-turn RSFT conversation [x, y0, JUDGE, c, REFINE, y*] (docs/DESIGN.md step 5)."""
    return [{"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i + 1}."},
            {"role": "user", "content": "Judge the answer above."},
            {"role": "assistant", "content": "The sum is wrong.\n\nRating: [[2]]"},
            {"role": "user", "content": "Improve the answer."},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]


def sft_rows(n: int = 4) -> list[dict]:
    return [{"id": f"s{i}", "messages": conversation(i), "source": "test"} for i in range(n)]


def pair_rows(n: int = 4) -> list[dict]:
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}, I think, maybe more."}],
             "reward_margin": 0.5 + 0.1 * i, "score_chosen": 1.0, "score_rejected": 0.5 - 0.1 * i}
            for i in range(n)]
