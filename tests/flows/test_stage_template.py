"""docs/DESIGN.md "Adding a stage" runs as written: its two code blocks (the method in avr_core/, the
stage in tasks/) and its config section are copied out of the page into a temporary directory,
imported, and the stage is run under Prefect on the tiny preset's prompts, with a scripted generator
(tests/fakes.py; control flow only). A copied template that no longer runs fails here."""
import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import tasks.synthesis as t
from avr_core.config import load_config
from avr_core.store import Store
from tasks.runtime.ledger import STAGE_LOG
from tests.fakes import FakeGenerator

pytestmark = pytest.mark.usefixtures("prefect_harness")
DESIGN = Path(__file__).resolve().parents[2] / "docs" / "DESIGN.md"


def template_blocks() -> tuple[str, str, str]:
    """(method, stage, config) from the "Adding a stage" section."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text[text.index("## Adding a stage"):]
    section = section[:section.find("\n## ", 5)] if "\n## " in section[5:] else section
    blocks = re.findall(r"```(python|yaml)\n(.*?)```", section, flags=re.S)
    python = [b for kind, b in blocks if kind == "python"]
    config = [b for kind, b in blocks if kind == "yaml"]
    assert len(python) == 2 and len(config) == 1, "the section has two python blocks and one yaml block"
    return python[0], python[1], config[0]


def test_the_design_pages_stage_template_runs(tmp_path, monkeypatch):
    method, stage_src, config = template_blocks()
    assert "from avr_core import paraphrase as core" in stage_src
    (tmp_path / "template_method.py").write_text(method)
    (tmp_path / "template_stage.py").write_text(
        stage_src.replace("from avr_core import paraphrase as core", "import template_method as core"))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("template_method", "template_stage"):
        sys.modules.pop(name, None)
    stage_mod = importlib.import_module("template_stage")
    fake, made = FakeGenerator(answer="Please reword it."), []
    monkeypatch.setattr(stage_mod, "make_generator", lambda policy, backend: made.append(policy) or fake)

    cfg = OmegaConf.to_container(load_config("tiny", [f"store.root={tmp_path / 'store'}", "data.stage1_sft=[0,5]",
                                                      "shard_size=2"]), resolve=True)
    cfg.update(yaml.safe_load(config))
    prompts = t.prompts(cfg, "stage1_sft")
    ref = stage_mod.paraphrase(cfg, cfg["policy"], prompts)

    store = Store(cfg["store"]["root"])
    records = store.read_records(ref)
    assert [r["paraphrase"] for r in records] == ["Please reword it."] * 5
    m = store.manifest(ref)
    assert m["counts"]["input_records"] == 5 and m["counts"]["paraphrase_dropped"] == 0 and m["shards"] == 3
    assert made and fake.stats.requests == 5 and m["counts"]["backend_requests"] == 5

    looked_up = len(made)
    again = stage_mod.paraphrase(cfg, cfg["policy"], prompts)      # a cache hit: no backend is asked for
    assert again == ref and len(made) == looked_up and STAGE_LOG[-1]["cached"]
    cfg["paraphrase"]["sampling"]["temperature"] = 0.2             # its config section is in the key
    assert stage_mod.paraphrase.ref(cfg, cfg["policy"], prompts) != ref
