"""`python -m avr_core.training --spec spec.json` -- see avr_core/training/launch.py."""
import sys

from avr_core.training.launch import main

if __name__ == "__main__":
    sys.exit(main())
