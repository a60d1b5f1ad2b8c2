"""A SIGTERM that lands inside a finalizer is not lost (avr_cli/supervisor.py `redeliver_signal`):
Python swallows an exception raised in `__del__`, so the worker's hook raises the signal again and
its handler stops the run from ordinary code, with no "Exception ignored" traceback."""
import gc
import signal
import sys
import time

import pytest
from prefect.exceptions import TerminationSignal

from avr_cli.supervisor import redeliver_signal


class _SignalledWhileFinalised:
    def __del__(self):          # what the SIGTERM handler does when the signal arrives in here
        raise TerminationSignal(signal=signal.SIGTERM)


def test_a_sigterm_raised_in_a_finaliser_reaches_ordinary_code(capsys):
    seen = []
    before_hook, before_handler = sys.unraisablehook, signal.getsignal(signal.SIGTERM)

    def handler(sig, _frame):
        raise TerminationSignal(signal=sig)
    signal.signal(signal.SIGTERM, handler)
    sys.unraisablehook = lambda u: redeliver_signal(u, seen.append)
    try:
        with pytest.raises(TerminationSignal) as stopped:
            obj = _SignalledWhileFinalised()
            del obj
            gc.collect()
            for _ in range(200):            # the raised signal's handler runs at the next bytecode
                time.sleep(0.005)
        assert stopped.value.signal == signal.SIGTERM
        assert seen == [] and "Exception ignored" not in capsys.readouterr().err
    finally:
        sys.unraisablehook = before_hook
        signal.signal(signal.SIGTERM, before_handler)


def test_other_unraisable_exceptions_go_to_the_previous_hook():
    seen = []

    class Boom:
        def __del__(self):
            raise ValueError("in a finaliser")
    before = sys.unraisablehook
    sys.unraisablehook = lambda u: redeliver_signal(u, seen.append)
    try:
        obj = Boom()
        del obj
        gc.collect()
    finally:
        sys.unraisablehook = before
    assert [type(u.exc_value) for u in seen] == [ValueError]
