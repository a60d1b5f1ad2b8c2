"""Fakes that stand in for a registered backend class: the factory, config checks and cache keys
read a kind's meaning off its class (avr_core/backends/base.py BackendKind), so a fake put in a
registry must answer that interface as the class it replaces does."""
from __future__ import annotations

import inspect

from avr_core.backends.base import BackendKind, ScorerKind

INTERFACE = sorted({n for c in (BackendKind, ScorerKind) for n in vars(c) if not n.startswith("_")})


def posing_as(real: type, fake: type) -> type:
    """`fake` with `real`'s kind facts and constructor arguments (`from_config` builds the fake)."""
    said = {n: inspect.getattr_static(real, n) for n in INTERFACE if hasattr(real, n)}
    return type(fake.__name__, (fake,), {"__module__": fake.__module__, "__doc__": fake.__doc__, **said})
