"""Argument types of the command line: each turns bad input into a one-line argparse error."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bits(value: str) -> int:
    b = int(value)
    if not 2 <= b <= 8:
        raise argparse.ArgumentTypeError("bits must be between 2 and 8")
    return b


def at_least(low: int) -> Callable[[str], int]:
    """An integer >= `low`."""

    def parse(value: str) -> int:
        n = int(value)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return n

    parse.__name__ = "integer"  # argparse's message: "invalid integer value: 'x'"
    return parse


def duration(unit: str, per_second: float) -> Callable[[str], float]:
    """A positive, finite duration given in `unit`, returned in seconds."""

    def parse(value: str) -> float:
        t = float(value)
        if not t > 0 or t == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit}")
        return t / per_second

    return parse


positive = at_least(1)
non_negative = at_least(0)
milliseconds = duration("milliseconds", 1000.0)
seconds = duration("seconds", 1.0)


def threads(value: str) -> int | str:
    """A thread count (at least 1) or `auto`."""
    if value == "auto":
        return value
    try:
        return positive(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of threads (at least 1) or auto") from None
