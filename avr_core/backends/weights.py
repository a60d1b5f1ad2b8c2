"""Can a running engine take these weights? Same architecture, same tokenizer, local files.

A policy change (seed -> RSFT -> Stage-1 -> ...) only changes the numbers in the weight tensors:
the architecture, the tokenizer and the chat template stay. vLLM can then copy the new
checkpoint into the loaded model in place (`reload_weights`), in about a second for SmolLM2 on
two cores, where a new engine takes ~24 s here and minutes on a GPU (torch.compile, CUDA
graphs). Anything else needs a new engine, and `reload_problem` says why in one line.

    >>> reload_problem("/models/llama3-8b", "/models/llama3-8b-rsft")   # doctest: +SKIP
    >>> reload_problem("/models/llama3-8b", "/models/qwen2-7b")         # doctest: +SKIP
    'config.json differs in architectures, hidden_size, vocab_size, ...'

What is compared, and why:
- `config.json`, every key but the ones that name or date the file (`_name_or_path`,
  `transformers_version`) or do not reach vLLM's model (`use_cache`, a training switch). The
  dtype is compared unless the engine was started with an explicit one (then the checkpoint is
  cast to it on load, as at a start).
- the tokenizer's files (vocabulary, merges, special tokens, chat template): the engine renders
  prompts with the tokenizer it started with, so a different one would silently change prompts.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# config.json keys that do not shape the loaded model
_CONFIG_IGNORED = {"_name_or_path", "name_or_path", "_model_name_or_path", "transformers_version", "use_cache"}
_DTYPE_KEYS = {"torch_dtype", "dtype"}
# everything that makes the tokenizer and its chat template (absent files count as absent)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
_WEIGHTS = (".safetensors", ".bin", ".pt")


def local_dir(ref: str) -> Path | None:
    """The directory holding `ref`'s files on this machine: `ref` itself, or the snapshot of a
    hub id in the local Hugging Face cache (what the engine loaded); None if neither."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(ref, "config.json")
    except Exception:           # not a repo id, or no cache: the caller starts a new engine
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _config(d: Path, dtype_fixed: bool) -> dict:
    cfg = json.loads((d / "config.json").read_text())
    ignored = _CONFIG_IGNORED | (_DTYPE_KEYS if dtype_fixed else set())
    return {k: v for k, v in cfg.items() if k not in ignored}


# tokenizer_config.json keys that record how the files were loaded, not what they say
# (transformers writes `local_files_only` and `is_local` into a tokenizer it loaded from a directory offline)
_LOADER_KEYS = {"name_or_path", "_name_or_path", "local_files_only", "is_local", "cache_dir", "revision", "token",
                "use_auth_token", "_commit_hash", "force_download", "proxies", "subfolder", "trust_remote_code"}


def _tokenizer_digest(d: Path) -> dict[str, str]:
    def content(name: str) -> bytes:
        raw = (d / name).read_bytes()
        if name != "tokenizer_config.json":
            return raw
        cfg = {k: v for k, v in json.loads(raw).items() if k not in _LOADER_KEYS}
        return json.dumps(cfg, sort_keys=True).encode()
    return {name: hashlib.sha256(content(name)).hexdigest() for name in TOKENIZER_FILES if (d / name).is_file()}


def reload_problem(loaded: str, new: str, dtype_fixed: bool = True) -> str | None:
    """Why the engine holding `loaded` cannot take the weights of `new` in place, or None.
    `dtype_fixed`: the engine was started with an explicit dtype (the config's `dtype`)."""
    a, b = local_dir(loaded), local_dir(new)
    if a is None or b is None:
        return f"{loaded if a is None else new} is not a model directory on this machine"
    if not (b / "config.json").is_file():
        return f"{new} has no config.json"
    ca, cb = _config(a, dtype_fixed), _config(b, dtype_fixed)
    if ca != cb:
        diff = sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k))
        return f"config.json differs in {', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''}"
    ta, tb = _tokenizer_digest(a), _tokenizer_digest(b)
    if ta != tb:
        diff = sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))
        return f"the tokenizer differs ({', '.join(diff)})"
    if not any(f.endswith(_WEIGHTS) for f in os.listdir(b)):
        return f"{new} holds no weights file (*.safetensors, *.bin)"
    return None
