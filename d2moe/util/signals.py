"""Deferring Ctrl-C across a few statements that must not be cut in half."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then go to the handlers that were there before (Python's:
    a KeyboardInterrupt). Python runs signal handlers between any two bytecodes of the main thread, so an
    interrupt could otherwise land between rewriting memory and recording that it was rewritten.

    The block swaps in a handler that only notes the signal, rather than masking it: a process-directed signal
    goes to any thread that does not mask it (the loader's, OpenMP's), whose C handler still makes the main
    thread run the Python handler at once. Handlers can only be set from the main thread; other threads never
    see KeyboardInterrupt, so there the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, FrameType | None]] = []

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append((signum, frame))

    before = {s: signal.signal(s, note) for s in HELD}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for signum, frame in caught[:1]:  # the first one: it ends the run anyway
            handler = before[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(signum)  # its default action, now that it is restored
