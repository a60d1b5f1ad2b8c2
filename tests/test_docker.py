"""docker/ without a Docker engine (none runs in CI): the compose file through a spec-compliant
validator (compose-spec, bindings of the Rust compose_spec crate), the Dockerfile through
dockerfile-parse plus the rules we hold it to (known instructions, pinned base image and
packages, files it copies exist)."""
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def test_compose_file_is_valid_compose_spec():
    from compose_spec import PyCompose

    text = (ROOT / "docker" / "compose.yaml").read_text()
    c = PyCompose.from_yaml(text)                        # raises ValueError with line/column on any error
    assert set(c.service_names()) == {"postgres", "prefect-server", "gpu-worker"}
    d = yaml.safe_load(text)
    assert all(p.startswith("127.0.0.1:") for s in d["services"].values() for p in s.get("ports", []))
    worker = d["services"]["gpu-worker"]
    assert "artifacts:/artifacts" in worker["volumes"] and worker["deploy"]["resources"]["reservations"]["devices"]
    assert worker["environment"]["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"   # from the host, never a literal


def test_the_validator_rejects_a_broken_compose_file():
    from compose_spec import PyCompose
    with pytest.raises(ValueError, match="portz"):
        PyCompose.from_yaml("services:\n  web:\n    image: nginx\n    portz: ['80:80']\n")


def test_dockerfile_parses_and_is_pinned():
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(ROOT / "docker" / "Dockerfile"))
    ins = [i["instruction"] for i in df.structure if i["instruction"] != "COMMENT"]
    assert ins[0] == "FROM" and set(ins) <= INSTRUCTIONS
    assert ":" in df.baseimage and not df.baseimage.endswith(":latest")
    for i in df.structure:
        if i["instruction"] == "COPY":
            for src in i["value"].split()[:-1]:
                assert (ROOT / src).exists(), src
        if i["instruction"] == "RUN" and "pip install" in i["value"]:
            assert "constraints-gpu.txt" in i["value"] or "==" in i["value"], i["value"]
    gpu = (ROOT / "docker" / "constraints-gpu.txt").read_text()
    assert "-c ../constraints.txt" in gpu           # one stack: the GPU set is the shared pins plus CUDA builds
    pins = [ln for f in (gpu, (ROOT / "constraints.txt").read_text()) for ln in f.splitlines() if ln and ln[0] != "#"]
    assert {p.split("==")[0] for p in pins if "==" in p} >= {"vllm", "torch", "transformers", "prefect", "deepspeed",
                                                          "alpaca-eval", "fastapi"}
    assert "-c constraints.txt" in (ROOT / "constraints-cpu.txt").read_text()
