"""Every shipped config loads; bad keys, types, values and overrides are named."""

import pytest

from avr_core.config import CONF_DIR, ConfigError, load_config, parse_overrides

PRESETS = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_config_loads(preset):
    cfg = load_config(preset)
    assert cfg.critique.k >= 1


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_opens_with_the_command_that_runs_it(preset):
    head = (CONF_DIR / f"{preset}.yaml").read_text().splitlines()[:6]
    assert any(line.lstrip("# ").startswith("avr run --preset") for line in head)


def test_paper_preset_is_the_papers_setting():
    cfg = load_config("paper")
    assert "Llama-3-8B-Instruct" in cfg.policy.path and "Skywork-Reward-Gemma-2-27B" in cfg.scorer.model.path
    assert cfg.generator.kind == "vllm" and cfg.scorer.kind == "vllm_rm"   # the authors scored on vLLM too
    assert (cfg.critique.k, cfg.refine.m) == (2, 2) and not cfg.critique.force_rating
    for stage in ("respond", "critique", "refine"):
        assert (cfg[stage].sampling.temperature, cfg[stage].sampling.top_p) == (0.7, 0.8)


def test_tiny_forces_ratings():
    assert load_config("tiny").critique.force_rating


def test_overrides_apply():
    cfg = load_config("tiny", ["critique.k=3", "store.root=/tmp/x"])
    assert cfg.critique.k == 3 and cfg.store.root == "/tmp/x"


@pytest.mark.parametrize("override,named", [
    (["critique.kk=1"], "critique.kk"),
    (["critique.k=abc"], "critique.k"),
    (["critique.k=-1"], "critique.k"),
    (["refine.sampling.temperature=9"], "refine.sampling.temperature"),
    (["respond.sampling.top_p=0"], "respond.sampling.top_p"),
    (["generator.kind=tgi"], "generator.kind"),
    (["scale.engine=spark"], "scale.engine"),
    (["policy.path="], "policy.path"),
    (["nosuchsection.x=1"], "nosuchsection"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("tiny", override)


@pytest.mark.parametrize("bad", ["critique.k", "=3", "a b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([bad])


@pytest.mark.parametrize("item, starts, phrase", [
    # issue 34: each was a YAML or OmegaConf traceback (or a line naming no key)
    ("critique.k=[1", "override 'critique.k=[1': key 'critique.k': not valid YAML", "expected ',' or ']'"),
    ("policy.path=a: b: c", "override 'policy.path=a: b: c': key 'policy.path': not valid YAML", "quote it"),
    ("policy.path=${bad", "override 'policy.path=${bad': key 'policy.path': ", "${bad"),
    ("data.prompts=a\x01b", "override 'data.prompts=a\\x01b': key 'data.prompts': a control character",
     "'\\x01', character 15"),
    ("policy.path=a\nb", "override 'policy.path=a\\nb': key 'policy.path': a control character", "'\\n'"),
    ("policy.path=${nope.key}", "override 'policy.path=${nope.key}': key 'policy.path': ", "'nope.key' not found"),
    ("store.root=${oc.env:AVR_NO_SUCH_VAR}", "override 'store.root=${oc.env:AVR_NO_SUCH_VAR}': key 'store.root': ",
     "AVR_NO_SUCH_VAR"),
])
def test_a_bad_override_is_one_line_naming_the_item_and_key(item, starts, phrase):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [item])
    assert str(e.value).startswith(starts) and phrase in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, line, phrase", [
    (b"preset: mine\ncritique:\n  k: 2\n  x\x01: 3\n", 4, "unacceptable character #x0001"),
    (b"preset: mine\x07\n", 1, "unacceptable character #x0007"),
    (b"preset: mine\ncritique:\n  k: \xff\n", 3, "not UTF-8"),
    (b"preset: mine\ncritique:\n  k: ${nope.x}\n", 3, "key 'critique.k': Interpolation key 'nope.x' not found"),
])
def test_a_preset_file_with_control_bytes_or_a_dangling_interpolation_is_one_line(tmp_path, text, line, phrase):
    p = tmp_path / "mine.yaml"
    p.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(e.value).startswith(f"{p}:{line}: ") and phrase in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_a_preset_file_names_file_and_key(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("critique:\n  kay: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "mine.yaml" in str(e.value) and "critique.kay" in str(e.value)


def test_invalid_yaml_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("critique: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(p))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset not found"):
        load_config("nope")


def test_avr_store_env(monkeypatch):
    monkeypatch.setenv("AVR_STORE", "/tmp/envstore")
    assert load_config("tiny").store.root == "/tmp/envstore"
    assert load_config("tiny", ["store.root=/tmp/o"]).store.root == "/tmp/o"


def test_ray_actors_without_gpus_refuse_a_backend_that_asks_for_one():
    # review D2: a Ray actor with num_gpus=0 sees no GPU (tasks/runtime/ray_workers.py no_gpu_env)
    with pytest.raises(ConfigError, match="scale.gpus_per_worker"):
        load_config("tiny", ["scale.engine=ray", "generator.kind=vllm", "generator.gpus=[0]"])
    load_config("tiny", ["scale.engine=ray", "generator.kind=vllm", "generator.gpus=[0]", "scale.gpus_per_worker=1"])
    load_config("tiny", ["scale.engine=ray"])                          # CPU backends on CPU actors: fine


def test_paper_time_shares_every_gpu_between_kept_policy_and_reward_model_engines():
    # issue 31 (review F5): a 6+2 split left 6 GPUs idle while the reward model scored. Both
    # roles span every visible GPU, both are kept, and the one not in use sleeps (CUDA sleep
    # mode): a switch is a wake, not a restart (tests/backends/test_factory_engines.py).
    c = load_config("paper", [])
    assert c.generator.keep_engine and c.scorer.keep_engine
    assert not c.generator.gpus and not c.scorer.gpus
    assert c.generator.data_parallel_size == 0 and c.scorer.data_parallel_size == 0   # one engine per GPU
    assert c.scorer.tensor_parallel_size == 1                # review C7: a 27B RM fits one 80 GB GPU


def test_kinds_and_losses_the_config_accepts_are_the_registries():
    """Issue 33: config validation reads the backend registries; its loss names equal the losses'."""
    from avr_core.backends import GENERATORS, SCORERS
    from avr_core.config import LOSSES
    from avr_core.losses import PREFERENCE_LOSSES
    from avr_core.training.recipe import LOSSES as TRAINED

    assert LOSSES == ("sft", *PREFERENCE_LOSSES) == TRAINED
    for key, registry in (("generator.kind", GENERATORS), ("scorer.kind", SCORERS)):
        with pytest.raises(ConfigError, match=f"key '{key}': must be one of {', '.join(registry)}"):
            load_config("tiny", [f"{key}=nope"])
