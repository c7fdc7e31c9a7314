"""Sizes, sampling, cache accounting, perplexity windows."""

from __future__ import annotations

import math

import pytest
import torch

from d2moe.cache.expert_cache import BudgetError, ExpertCache
from d2moe.engine.perplexity import perplexity, windows
from d2moe.engine.sampling import SamplingParams, sample, top_p_filter
from d2moe.util.sizes import parse_size


@pytest.mark.parametrize(
    "text,n", [("64MiB", 64 * 2**20), ("1.5GB", 1_500_000_000), ("512k", 512_000), ("4096", 4096), ("2 GiB", 2 * 2**30)]
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "abc", "12XB", "-5MB", "0.1"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_top_p_keeps_smallest_nucleus():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert torch.allclose(top_p_filter(p, 0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(top_p_filter(p, 0.5), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_sampling_greedy_and_seeded():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert sample(logits, SamplingParams()) == 1
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    a = [sample(logits, params, torch.Generator().manual_seed(5)) for _ in range(3)]
    b = [sample(logits, params, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a == b
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_cache_evicts_lru_within_budget():
    c = ExpertCache(100)
    for e in range(3):
        c.make_room(40)
        c.put((0, e), torch.zeros(40, dtype=torch.uint8), 8)
    assert c.used_bytes <= 100 and c.get((0, 0)) is None and c.get((0, 2)) is not None
    c.get((0, 1))  # touch: expert 2 is now least recent
    c.make_room(40)
    c.put((0, 3), torch.zeros(40, dtype=torch.uint8), 8)
    assert c.get((0, 2)) is None and c.get((0, 1)) is not None
    with pytest.raises(BudgetError):
        c.make_room(101)


def test_perplexity_definition():
    assert windows(list(range(10)), 9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail is dropped
    V = 5

    def uniform(x):
        return torch.zeros(1, x.shape[1], V)

    res = perplexity([i % V for i in range(9)], uniform, 9, 4)
    assert res.predicted == 6 and math.isclose(res.perplexity, V, rel_tol=1e-6)


def test_interrupts_wait_for_the_end_of_a_deferred_block() -> None:
    """util/signals.py: a Ctrl-C inside the block is raised after it, never in the middle, also when another
    thread receives it (the kernel hands a process-directed signal to any thread that does not mask it; a
    sigmask on the main thread alone let it through: a fresh clone's run failed so)."""
    import signal
    import threading

    from d2moe.util.signals import interrupts_deferred

    def from_another_thread() -> None:  # raise() there: its C handler has run when the thread ends
        t = threading.Thread(target=signal.raise_signal, args=(signal.SIGINT,))
        t.start()
        t.join()

    # Python's own handler, even where the run inherited SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    runs = []
    try:
        for i in range(6):
            done = []
            try:
                with interrupts_deferred():
                    if i % 2:
                        signal.raise_signal(signal.SIGINT)  # this thread
                    else:
                        from_another_thread()
                    for _ in range(1000):  # bytecodes at which the Python handler runs
                        pass
                    done.append("rewritten")
                    done.append("recorded")
            except KeyboardInterrupt:
                done.append("interrupted")
            runs.append(done)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert runs == [["rewritten", "recorded", "interrupted"]] * 6
    assert signal.getsignal(signal.SIGINT) is previous
