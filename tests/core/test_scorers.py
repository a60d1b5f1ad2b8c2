"""The method's judge prompt reaches the backend's judge scorer through `scorers.make_scorer`;
the backend itself has no prompt (fake backend objects only, no model loaded)."""
import avr_core.backends as backends
from avr_core.prompts import FORCED_RATING_PREFIX, JUDGE_SAMPLING, judge_conversation
from avr_core.scorers import judge_frame, make_scorer

CONV = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_judge_frame_is_the_judge_prompt_with_the_forced_rating():
    framed = judge_frame(CONV)
    assert framed[:-1] == judge_conversation(CONV[:-1], "4", JUDGE_SAMPLING)
    assert framed[-1] == {"role": "assistant", "content": FORCED_RATING_PREFIX.lstrip()}
    assert CONV == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]   # not mutated


def test_make_scorer_passes_the_frame_only_to_judge_scorers(monkeypatch):
    built = []

    class FakeJudgeBackend:      # stands in for backends.hf.JudgeScorer: records what it was built with
        def __init__(self, path, frame=None, **kw):
            built.append(("judge", frame))

    class FakeRewardBackend:
        def __init__(self, path, **kw):
            built.append(("hf_rm", kw))

    import avr_core.backends.hf as hf
    from tests.backends.fake_kinds import posing_as  # the factory reads a kind's facts off its class
    monkeypatch.setattr(hf, "JudgeScorer", posing_as(hf.JudgeScorer, FakeJudgeBackend))
    monkeypatch.setattr(hf, "HFRewardScorer", posing_as(hf.HFRewardScorer, FakeRewardBackend))
    monkeypatch.setattr(backends, "resolve_model_path", lambda p: p)
    backends.clear_cache()
    model = {"path": "m", "dtype": "float32", "trust_remote_code": False}
    try:
        s = make_scorer({"kind": "judge", "model": model, "batch_size": 1, "max_length": 8})
        assert built == [("judge", judge_frame)] and make_scorer(
            {"kind": "judge", "model": model, "batch_size": 1, "max_length": 8}) is s     # cached
        backends.make_scorer({"kind": "judge", "model": model, "batch_size": 1, "max_length": 8})
        assert built[-1] == ("judge", None)            # no frame: a different instance, not the framed one
        make_scorer({"kind": "hf_rm", "model": model, "batch_size": 1, "max_length": 8})
        assert built[-1][0] == "hf_rm" and "frame" not in built[-1][1]
    finally:
        backends.clear_cache()
