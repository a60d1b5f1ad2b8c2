"""`avr artifacts`: list / show / lineage / verify read manifests directly, no server; verify
catches a modified or truncated data file and a stage directory without its manifest."""
import json

import pytest

from avr_cli.main import main
from avr_core import catalog
from avr_core.store import Store


@pytest.fixture()
def store(tmp_path):
    s = Store(str(tmp_path))
    w = s.writer("prompts", "p1", {"file_sha256": "abc", "slice": [0, 2], "split": "stage1_sft"}, [], "v")
    w.commit_shard(0, {"records": [{"id": "a"}, {"id": "b"}]}, {})
    prompts = w.finalize()
    w = s.writer("respond", "r1", {"policy": {"path": "embedded:x"}}, [prompts], "v")
    w.commit_shard(0, {"records": [{"id": "a", "answer": "y0"}]}, {})
    respond = w.finalize()
    w = s.writer("po", "m1", {"policy": {"path": "/x", "artifact": "respond/r1"}}, [respond], "v")
    w.write_file("model/weights.bin", b"0123456789")
    w.finalize()
    return s


def test_list_show_lineage(store, capsys):
    assert {r["artifact"] for r in catalog.list_rows(store)} == {"prompts/p1", "respond/r1", "po/m1"}
    lines = catalog.lineage(store, catalog.resolve(store, "po/m1"))
    assert lines[0].startswith("po/m1") and lines[1].strip().startswith("respond/r1")
    assert "file_sha256=abc slice=[0, 2]" in lines[2] and "policy=embedded:x" in lines[1]
    assert main(["artifacts", "show", "m1", "--store", store.root]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "po"
    assert main(["artifacts", "lineage", "nope", "--store", store.root]) == 2


def test_verify_catches_modified_truncated_and_unfinished(store, tmp_path, capsys):
    assert catalog.verify(store) == []
    (tmp_path / "po/m1/model/weights.bin").write_bytes(b"0123456780")            # same size, other bytes
    (tmp_path / "respond/r1/data/records-00000.jsonl").write_text('{"id": "a"')  # truncated
    (tmp_path / "critique/c9/data").mkdir(parents=True)                          # no manifest
    problems = catalog.verify(store)
    assert any("po/m1: model/weights.bin: sha256 differs" in p for p in problems)
    assert any("respond/r1: data/records-00000.jsonl: size" in p for p in problems)
    assert any(p.startswith("critique/c9: no manifest.json") for p in problems)
    assert main(["artifacts", "verify", "--store", store.root]) == 1
    assert "3 problem(s)" in capsys.readouterr().err


def test_recompute_reason_names_what_changed(store):
    def make(key, config, code, inputs=("prompts/p1",)):
        w = store.writer("respond", key, config, [store.ref(*i.split("/")) for i in inputs], code)
        w.commit_shard(0, {"records": []}, {})
        return w.finalize()
    assert catalog.recompute_reason(store, store.ref("prompts", "p1")) == "first artifact of this stage in the store"
    base = {"policy": {"path": "embedded:x"}}
    assert catalog.recompute_reason(store, make("r2", {"policy": {"path": "other"}}, "v")) == "changed config"
    assert catalog.recompute_reason(store, make("r3", base, "v2")) == "new code version"
    assert "new inputs" in catalog.recompute_reason(store, make("r4", base, "v", ("respond/r1",)))
