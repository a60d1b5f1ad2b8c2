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
