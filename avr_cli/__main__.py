"""`python -m avr_cli ...` is `avr ...` (avr_cli/supervisor.py starts the worker this way)."""
import sys

from avr_cli.main import main

sys.exit(main())
