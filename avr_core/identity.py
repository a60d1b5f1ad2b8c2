"""What a model or dataset given by NAME is, for a cache key: its revision or a content digest.

A name alone is not an identity: a hub id gets new upstream snapshots (Llama-3-8B-Instruct's
`generation_config` eos fix), a local path can be re-pointed. Keying by name would give a stale
cache hit after either, and lets Ray workers holding different snapshots compute shards of one
key (docs/RELIABILITY.md "Identity across machines"). So:

* a hub id (`org/name`) -> the commit sha of the snapshot that will be loaded: online the hub's
  answer for the revision (`HfApi().model_info`), offline (`HF_HUB_OFFLINE=1`) the snapshot the
  local HF cache points that revision at -- what `from_pretrained` loads in either mode;
* a local directory (the embedded SmolLM2 conversion included) -> `local_digest`;
* an `hf://<dataset>:<split>` prompt set -> the dataset repository's commit sha, the same way.

Resolving is cheap (small files, at most one hub request) and memoised for the process: the
driver computes each identity once per run (`forget` starts a run afresh), workers once each.
A name that cannot be resolved is an error in one line, never silently keyed by name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Weights are keyed by file name and size, never read: hashing an 8B model is ~16 GB of reads
# (a 27B reward model ~54 GB), minutes per run, while a re-saved or re-pointed model changes its
# config, index or sizes anyway. Anything else this big is treated the same way.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx")
SMALL_BYTES = 16 << 20

_MEMO: dict[tuple, str] = {}


class IdentityError(RuntimeError):
    """A model or dataset name whose revision or content cannot be determined here."""


def forget() -> None:
    """Drop the memoised identities: the next run resolves every name again."""
    _MEMO.clear()


def model_identity(ref: str, revision: str | None = None) -> str:
    """`sha256:<digest>` for a local directory (an `embedded:` model after its one-off conversion),
    `hf:<commit sha>` for a hub id; memoised per process."""
    key = ("model", ref, revision)
    if key not in _MEMO:
        _MEMO[key] = _model_identity(ref, revision)
    return _MEMO[key]


def dataset_identity(dataset: str, revision: str | None = None) -> str:
    """`hf:<commit sha>` of the hub dataset `org/name`; memoised per process."""
    key = ("dataset", dataset, revision)
    if key not in _MEMO:
        _MEMO[key] = "hf:" + hub_revision(dataset, "dataset", revision)
    return _MEMO[key]


def _model_identity(ref: str, revision: str | None) -> str:
    from avr_core.model_refs import EMBEDDED_PREFIX, model_ref_problem, resolve_model_path

    if ref.startswith(EMBEDDED_PREFIX):
        ref = resolve_model_path(ref)          # its converted directory: content, like any local path
    if problem := model_ref_problem(ref):
        raise IdentityError(f"model {ref!r}: {problem}")
    p = Path(ref).expanduser()
    if p.is_dir():
        return "sha256:" + local_digest(p)
    return "hf:" + hub_revision(ref, "model", revision)


def local_digest(path: str | os.PathLike) -> str:
    """sha256 over a model directory: every small file's name and content (config.json,
    generation_config.json, tokenizer files, the safetensors index), and every weight file's
    name and size (see WEIGHT_SUFFIXES). Hidden entries (`.cache`, `.git`) are left out: they
    are download bookkeeping, not the model. Modification times are left out so that a copy of
    the same model on another machine gets the same digest.
    """
    root = Path(path).expanduser()
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        size = f.stat().st_size
        if f.suffix in WEIGHT_SUFFIXES or size > SMALL_BYTES:
            h.update(f"{rel.as_posix()}\0size={size}\0".encode())
        else:
            h.update(f"{rel.as_posix()}\0".encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, read now: a test or a run may set it late."""
    from huggingface_hub import constants

    flag = lambda k: os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")  # noqa: E731
    return flag("HF_HUB_OFFLINE") or flag("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    """The HF hub cache directory, read from the environment now (huggingface_hub reads it once)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hub_revision(repo_id: str, repo_type: str, revision: str | None = None) -> str:
    """The commit sha of `repo_id` at `revision` (default: main) that a load would use."""
    if offline():
        sha = cached_revision(repo_id, repo_type, revision)
        if sha is None:
            raise IdentityError(
                f"{repo_type} {repo_id!r}: the hub is offline (HF_HUB_OFFLINE) and the HF cache "
                f"({hub_cache()}) has no snapshot of it{_at(revision)}: download it while online, or "
                f"point the config at a local directory")
        return sha
    try:
        from huggingface_hub import HfApi

        info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision)
        return info.sha
    except Exception as e:  # the hub unreachable: a load falls back to the cache; so does the key
        sha = cached_revision(repo_id, repo_type, revision)
        if sha is None:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise IdentityError(f"{repo_type} {repo_id!r}: cannot resolve its revision{_at(revision)} on the hub "
                                f"({why}) and the HF cache ({hub_cache()}) has no snapshot of it") from None
        return sha


def cached_revision(repo_id: str, repo_type: str, revision: str | None = None) -> str | None:
    """The commit sha the local HF cache resolves `revision` to (its refs file, or the snapshot
    of that sha), or None when the cache has no snapshot of it."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=hub_cache(),
                                 local_files_only=True)
    except Exception:   # LocalEntryNotFoundError and friends: nothing cached for this revision
        return None
    return Path(path).name


def package_versions() -> dict[str, str | None]:
    """torch, transformers and vllm as installed here (None: not installed); read from package
    metadata, so nothing heavy is imported."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "vllm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""
