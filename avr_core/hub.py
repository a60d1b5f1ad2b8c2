"""Whether this process may reach the Hugging Face hub: the user's choice, never a silent default.

Two explicit switches, the environment first (it is what every HF library reads):

- ``HF_HUB_OFFLINE`` exported in the shell: ``1`` offline, ``0`` online, whatever the preset says;
- else the config key ``hub.offline`` (``conf/tiny.yaml``: true, so the CPU preset never tries
  the network; ``conf/base.yaml``: false, so an online machine downloads what ``paper`` names).

`apply_mode` turns the config's choice into ``HF_HUB_OFFLINE`` before any HF library is imported
(they read it once, at import). Every hub error ends with `mode_line()`: which mode is in force,
who set it, and how to change it.
"""
from __future__ import annotations

import os

_SOURCE = "AVR_HUB_MODE_FROM"   # who chose the mode: "env" or "config" (for the error line)


def apply_mode(offline: bool) -> None:
    """Set HF_HUB_OFFLINE from the config's `hub.offline` unless the user exported it."""
    if "HF_HUB_OFFLINE" in os.environ and os.environ.get(_SOURCE) != "config":
        os.environ[_SOURCE] = "env"
        return
    os.environ[_SOURCE] = "config"
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    else:
        os.environ.pop("HF_HUB_OFFLINE", None)


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def mode_line() -> str:
    """One line: the hub mode in force, who set it, and the way to change it."""
    by_env = os.environ.get(_SOURCE) != "config" and "HF_HUB_OFFLINE" in os.environ
    if is_offline():
        how = "unset HF_HUB_OFFLINE (or export HF_HUB_OFFLINE=0)" if by_env else "set hub.offline=false"
        return (f"hub mode: offline ({'HF_HUB_OFFLINE in the environment' if by_env else 'hub.offline=true'}); "
                f"to download, {how}")
    return ("hub mode: online; without internet, set hub.offline=true or export HF_HUB_OFFLINE=1 "
            "(the local cache is then used)")


# What an engine needs of a model repository (weights, configs, tokenizer, chat template): not
# the other formats some repositories also carry (original/*.pth, *.gguf, ...).
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def fetch_weights(ref: str, revision: str | None = None) -> str:
    """A local directory holding model `ref`: `ref` itself when it is one, else the hub
    snapshot, downloaded now (with progress, in the hub mode in force) or found in the cache.

    An engine given a hub id downloads inside its start, under its start timeout: a 54 GB reward
    model on a slow link would then look like a hung start (review F13). Fetched first, the
    start times the start only, and a model that cannot be had fails here, in one line.

    >>> fetch_weights("/models/llama3-8b")          # a directory: as it is   # doctest: +SKIP
    '/models/llama3-8b'
    """
    if os.path.isdir(os.path.expanduser(ref)):
        return ref
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ref, revision=revision, allow_patterns=WEIGHT_PATTERNS,
                                 local_files_only=is_offline())
    except Exception as e:   # noqa: BLE001 -- any failure is the same one line for the user
        why = str(e).splitlines()[0] if str(e) else ""
        at = f" at {revision}" if revision else ""
        raise FileNotFoundError(f"model {ref!r}{at} could not be had ({type(e).__name__}: {why}); "
                                f"{mode_line()}") from None
