"""`--threads auto` (engine/threads.py): the pure choice between thread counts, the probe schedule and a busy
machine simulated by step times that depend on the count (an engine whose count changes while it runs gives
the same tokens and logprobs as one fixed count: tests/unit/test_ragged.py)."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import EngineConfig
from d2moe.engine.threads import ThreadGovernor, ThreadPolicy, fastest, governed



def _times(**by_count: dict[int, list[float]]) -> dict:
    return {int(k[1:]): {r: deque(v) for r, v in rows.items()} for k, rows in by_count.items()}


def test_fastest_needs_a_margin_and_compares_equal_steps() -> None:
    t = _times(t1={1: [0.020, 0.021]}, t2={1: [0.015, 0.016], 16: [0.05]})
    assert fastest(t, 1, 0.1) == 2  # 25 % faster
    assert fastest(t, 2, 0.1) == 2  # 1 is slower: stay
    assert fastest(_times(t1={1: [0.020]}, t2={1: [0.0185]}), 1, 0.1) == 1  # 7.5 % is within the margin
    assert fastest(_times(t1={16: [0.05]}, t2={1: [0.001]}), 1, 0.1) == 1  # no step size in common: stay
    three = _times(t1={1: [0.06]}, t2={1: [0.05], 4: [0.2]}, t4={1: [0.02], 4: [0.01]})
    assert fastest(three, 1, 0.1) == 4  # the fastest of several, on the sizes each shares with the current


@settings(max_examples=50, deadline=None)
@given(most=st.integers(1, 16), every=st.integers(1, 8), probe=st.integers(1, 4), steps=st.integers(1, 200))
def test_schedule_probes_every_other_count_then_returns(most: int, every: int, probe: int, steps: int) -> None:
    """With equal step times nothing switches; probes run `probe` steps each, take the other candidates in
    turn, and a count's probe that loses waits twice as long before the next (at most 32 x `every`)."""
    policy = ThreadPolicy(most, every=every, probe=probe)
    gov = ThreadGovernor(policy)
    seen = []
    for _ in range(steps):
        n = gov.threads()
        seen.append(n)
        gov.record(n, 1, 0.01)
    assert gov.current == most
    assert set(seen) <= set(policy.candidates())
    others = [c for c in policy.candidates() if c != most]
    if not others:
        assert set(seen) == {most}
        return
    runs, k = [], 0  # (count, length) of each run of equal counts
    while k < len(seen):
        j = k
        while j < len(seen) and seen[j] == seen[k]:
            j += 1
        runs.append((seen[k], j - k))
        k = j
    probes = [r for r in runs if r[0] != most]
    assert all(length == probe for _, length in probes[:-1])  # every probe but a cut-off last one is whole
    assert [c for c, _ in probes] == [others[i % len(others)] for i in range(len(probes))]
    gaps = [length for c, length in runs[:-1] if c == most]  # steps at the current count before each probe
    for i, gap in enumerate(gaps):
        assert gap == min(every * 2 ** (i // len(others)), 32 * every)


def _simulate(gov: ThreadGovernor, step_time, steps: int) -> list[int]:
    counts = []
    for i in range(steps):
        n = gov.threads()
        counts.append(n)
        gov.record(n, 1, step_time(i, n))
    return counts


def test_busy_machine_moves_to_one_thread_and_back() -> None:
    """Steps 0-299: another process holds a core, 2 threads take 4x as long as 1; then it stops and 2 threads
    are 15 % faster. The governor leaves 2 threads at its first probe, probes them ever more rarely while the
    machine is busy, and returns once it quiets."""
    gov = ThreadGovernor(ThreadPolicy(2, every=16, probe=3))

    def step_time(i: int, n: int) -> float:
        if i < 300:
            return 0.060 if n == 2 else 0.015
        return 0.0150 if n == 2 else 0.0175

    counts = _simulate(gov, step_time, 900)
    assert counts[:16] == [2] * 16 and counts[16:19] == [1, 1, 1]
    busy = counts[19:300]
    assert busy.count(2) <= 4 * 3  # probes of 2 threads after 16, 32, 64, 128 steps: 12 steps of 281
    back = counts.index(2, 300)
    assert back < 300 + 512 + 3 and counts[-100:].count(2) >= 97  # quiet again: back to 2 threads


def test_governed_sets_the_count_and_records(monkeypatch: pytest.MonkeyPatch) -> None:
    old = torch.get_num_threads()
    gov = ThreadGovernor(ThreadPolicy(2, every=1, probe=1), current=2)
    try:
        with governed(gov, 5):
            assert torch.get_num_threads() == 2
        with governed(gov, 5):
            assert torch.get_num_threads() == 1  # the probe
        assert list(gov.times) == [2, 1] and all(5 in rows for rows in gov.times.values())
        with pytest.raises(RuntimeError), governed(gov, 7):
            raise RuntimeError  # a failed step is not timed
        assert all(7 not in rows for rows in gov.times.values())
        with governed(None, 3):
            pass  # no governor: nothing set
    finally:
        torch.set_num_threads(old)


def test_bad_policy_is_refused() -> None:
    for bad in ({"most": 0}, {"most": 2, "margin": 1.0}, {"most": 2, "probe": 0}):
        with pytest.raises(ValueError, match="thread policy"):
            ThreadPolicy(**bad)


def test_auto_is_off_by_default_and_builds_a_governor() -> None:
    from d2moe.engine.threads import governor_for

    assert governor_for(EngineConfig()) is None
    gov = governor_for(replace(EngineConfig(), adaptive_threads=True))
    assert gov is not None and gov.current == torch.get_num_threads()
