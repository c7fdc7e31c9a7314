"""Deferring Ctrl-C across a few statements that must not be cut in half."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (then Python raises them as usual): Python runs signal
    handlers between any two bytecodes, so a KeyboardInterrupt could otherwise land between rewriting memory
    and recording that it was rewritten."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
