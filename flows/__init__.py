"""Prefect flows. Importing this package -- the CLI, `avr serve`, a worker running a deployment --
masks secrets in every log record of the process (avr_core/redact.py)."""
from avr_core.redact import install as _install_redaction

_install_redaction()
