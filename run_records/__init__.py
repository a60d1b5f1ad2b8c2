"""Run records: the bookkeeping of a run around the flows' stages. The flows import it; it imports
neither flows/ nor avr_cli/. The modules, lowest first (each imports only those above it):

    record.py      `RunRecord`, the run as an object (runs/<id>/run.json), and `launched`: how `avr` started it
    failure.py     the one line a failed run ends with; a repeated traceback logged once
    report.py      the end of a run as text: outputs, wall-time tables, results, this run's leaderboard rows
    preflight.py   the checks before any work: GPUs, inputs, prompt slices, models, store root, schedule
    lifecycle.py   `start_run` (checks, then the record) and `finish_run` (the summary and the report)
    resume.py      finding the run `avr resume` runs again

Importing this package masks secrets in every log record of the process (avr_core/redact.py),
as importing flows/ does.
"""
from avr_core.redact import install as _install_redaction

_install_redaction()
