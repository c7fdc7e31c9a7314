"""Compute threads chosen from the engine's own step times (`--threads auto`).

torch's and the expert kernel's OpenMP regions wait at barriers, so on a machine where another process wants
a core, a thread that loses it stalls every region: one default-model decode row ran 66 tok/s on 2 threads
alone and 15 beside one busy loop, where 1 thread ran 57 either way (README, "Load test"). No thread count
is right for both cases, and which case holds changes while a server runs. So the engine runs at its
current count, now and then runs a few steps at each other candidate (1, half the cores, all of them), and
switches to one that was faster by a margin on steps of the same size. The decision is a pure function of
the recorded times (`fastest`); `ThreadGovernor` only keeps them and the probe schedule. Outputs do not
depend on the count: the kernels give every row the same bits at any thread count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from statistics import median

import torch

Times = dict[int, dict[int, deque]]  # threads -> rows of the step -> recent step seconds


@dataclass(frozen=True)
class ThreadPolicy:
    most: int  # the most threads (the cores)
    every: int = 32  # steps at the current count between two probes
    probe: int = 3  # steps per probe
    margin: float = 0.1  # another count must be this much faster (fraction of step time) to take over
    keep: int = 16  # step times kept per (threads, rows)

    def __post_init__(self) -> None:
        if self.most < 1 or self.every < 1 or self.probe < 1 or self.keep < 1 or not 0 <= self.margin < 1:
            raise ValueError("thread policy: most, every, probe and keep at least 1, margin in [0, 1)")

    def candidates(self) -> tuple[int, ...]:
        return tuple(sorted({1, max(1, self.most // 2), self.most}))


def fastest(times: Times, current: int, margin: float) -> int:
    """The count to run at: the one whose steps took the least time relative to `current`'s, comparing only
    step sizes (rows) both have run, when that is more than `margin` less; else `current`. Pure."""
    mine = times.get(current, {})
    best, best_ratio = current, 1.0 - margin
    for n, by_rows in sorted(times.items()):
        common = [r for r in by_rows if n != current and by_rows[r] and mine.get(r)]
        if not common:
            continue
        ratio = median(median(by_rows[r]) / median(mine[r]) for r in common)
        if ratio < best_ratio:
            best, best_ratio = n, ratio
    return best


@dataclass
class ThreadGovernor:
    """The probe schedule around `fastest`. A probe that loses doubles the wait before that count is tried
    again (up to `every` x 32 steps): on a busy machine a probe of all the cores costs several times a normal
    step, so it must become rare; any switch resets the waits. A probe's count starts with no history, so
    it is judged on what it measures now, not on steps from before the machine changed."""

    policy: ThreadPolicy
    current: int = 0  # 0: start at policy.most
    times: Times = field(default_factory=dict)
    _since: int = 0  # steps at the current count since the last probe
    _probing: int | None = None
    _left: int = 0
    _turn: int = 0  # which other candidate the next probe runs
    _wait: dict[int, int] = field(default_factory=dict)  # steps before a count is probed again

    def __post_init__(self) -> None:
        self.current = self.current or self.policy.most

    def threads(self) -> int:
        """The thread count for the next step."""
        others = [c for c in self.policy.candidates() if c != self.current]
        if self._probing is None and others:
            c = others[self._turn % len(others)]
            if self._since >= self._wait.get(c, self.policy.every):
                self._probing, self._left = c, self.policy.probe
                self.times.pop(c, None)
        return self._probing if self._probing is not None else self.current

    def record(self, threads: int, rows: int, seconds: float) -> None:
        """A step of `rows` rows took `seconds` at `threads` threads."""
        by_rows = self.times.setdefault(threads, {})
        by_rows.setdefault(rows, deque(maxlen=self.policy.keep)).append(seconds)
        if self._probing is not None and threads == self._probing:
            self._left -= 1
            if self._left <= 0:
                probed, self._probing, self._since = self._probing, None, 0
                best = fastest(self.times, self.current, self.policy.margin)
                if best != self.current:
                    self.current, self._wait = best, {}
                else:
                    self._wait[probed] = min(2 * self._wait.get(probed, self.policy.every), 32 * self.policy.every)
                    self._turn += 1
        elif threads == self.current:
            self._since += 1

def governor_for(engine) -> ThreadGovernor | None:
    """A governor over 1..torch's thread count when the engine config asks for one (`adaptive_threads`)."""
    return ThreadGovernor(ThreadPolicy(torch.get_num_threads())) if engine.adaptive_threads else None


@contextmanager
def governed(governor: ThreadGovernor | None, rows: int) -> Iterator[None]:
    """Run one step of `rows` rows at the governor's thread count and record its time (None: as set)."""
    if governor is None:
        yield
        return
    n = governor.threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    t0 = time.perf_counter()
    yield
    governor.record(n, rows, time.perf_counter() - t0)
