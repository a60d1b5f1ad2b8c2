"""Store integrity for every kind of stage: a damaged input artifact (a data file or a trained
model's weights no longer matching its manifest) stops the stage before any work, naming the
artifact and the file, and nothing of the stage is written. The sharded-stage case is in
test_stage1_flow.py; here: training, reference log-probs, judge, learning signal, TTS curve,
and a generation stage whose *policy* is a damaged trained model."""
import pytest

import tasks.evaluate as ev
import tasks.learning_signal as sg
import tasks.scaling as sc
import tasks.synthesis as syn
import tasks.training as tr
from avr_core.store import Store
from tasks.runtime.skeleton import InputIntegrityError


def artifact(store: Store, stage: str, records: dict[str, list[dict]], files: dict[str, bytes] | None = None):
    w = store.writer(stage, f"{stage}-key", {}, [], "test")
    w.commit_shard(0, records, {})
    for rel, data in (files or {}).items():
        w.write_file(rel, data)
    return w.finalize()


def damage(store: Store, ref, rel: str) -> None:
    """Same size, other bytes: only the sha256 can tell."""
    path = store.path(ref, rel)
    data = bytearray(store.fs.cat_file(path))
    data[-2] ^= 1
    store.write_atomic(path, bytes(data))


@pytest.fixture
def setup(tmp_path):
    store = Store(str(tmp_path))
    cfg = {"store": {"root": str(tmp_path)}, "policy": {"dtype": "float32"}, "shard_size": 4,
           "rsft": {"max_length": 64}, "po": {"max_length": 64, "micro_batch_size": 1, "loss": "dpo"},
           "scorer": {"kind": "fake"},
           "eval": {"judge": {"kind": "local"}, "position_bias_n": 0, "df_gamed": "", "lc_min_annotations": 10,
                    "smoke": False},
           "generator": {"kind": "hf"}, "respond": {"sampling": {}}}
    rec = {"records": [{"id": "a", "answer_score": 1.0, "instruction": "x", "reference": "y"}]}
    data = artifact(store, "select", {"rsft": [{"id": "a"}], "pairs": [{"id": "a"}]})
    model = artifact(store, "rsft", {}, {"model/model.safetensors": b"weights" * 100, "model/config.json": b"{}"})
    return store, cfg, data, model, artifact(store, "respond", rec), artifact(store, "eval_prompts", rec)


def calls(cfg, data, model, answers, prompts):
    policy = tr.policy_of(cfg, model)
    return {
        "train_sft (data)": (lambda: tr.train_sft.fn(cfg, {"path": "embedded:smollm2-135m-instruct"}, data), data,
                             "data/rsft-00000.jsonl"),   # a model given by name: keyed by its content
        "train_po (base model)": (lambda: tr.train_po.fn(cfg, policy, data, answers), model, "model/model.safetensors"),
        "reference_logps (reference model)": (lambda: tr.reference_logps.fn(cfg, policy, data), model,
                                              "model/model.safetensors"),
        "judge (prompts)": (lambda: ev.judge.fn(cfg, answers, prompts), prompts, "data/records-00000.jsonl"),
        "learning_signal (trained)": (lambda: sg.learning_signal.fn(cfg, prompts, answers), answers,
                                      "data/records-00000.jsonl"),
        "tts_curve (answers)": (lambda: sc.tts_curve.fn(cfg, answers), answers, "data/records-00000.jsonl"),
        "respond (policy = trained model)": (lambda: syn.respond.fn(cfg, policy, prompts), model,
                                             "model/config.json"),
    }


CASES = ["train_sft (data)", "train_po (base model)", "reference_logps (reference model)", "judge (prompts)",
         "learning_signal (trained)", "tts_curve (answers)", "respond (policy = trained model)"]


@pytest.mark.parametrize("case", CASES)
def test_stage_refuses_a_damaged_input_and_writes_nothing(setup, case, monkeypatch):
    store, cfg, data, model, answers, prompts = setup
    monkeypatch.setattr(syn, "make_generator", lambda *a: pytest.fail("a model was loaded"))
    call, victim, rel = calls(cfg, data, model, answers, prompts)[case]
    before = sorted(p for p in store.fs.find(store._base))
    damage(store, victim, rel)
    with pytest.raises(InputIntegrityError, match=rf"{victim.stage}/{victim.key}: {rel}: sha256 differs"):
        call()
    assert sorted(p for p in store.fs.find(store._base)) == before    # not a file more
