"""The hindsight width oracle of benchmarks/oracle_widths.py: its choice, its price search, its rule."""

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.oracle_widths import OracleRule, byte_frac, choose, price_for
from d2moe.routing.collect import LayerRecord

WIDTHS = [2, 3, 4, 5, 6, 7, 8]
FRAC = torch.tensor([0.28, 0.40, 0.52, 0.64, 0.76, 0.88, 1.0])


def costs(seed: int, n: int = 64, k: int = 3) -> torch.Tensor:
    """[n, k, W] costs falling with width, 0 at the widest (as calibration's collection gives)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(n, k, len(WIDTHS), generator=g) * torch.logspace(0, -3, len(WIDTHS))
    c = steps.flip(-1).cumsum(-1).flip(-1)
    c[..., -1] = 0
    return c


def test_choice_ends_and_floor():
    c = costs(0)
    every = torch.ones(len(WIDTHS), dtype=torch.bool)
    assert (choose(c, FRAC, 0.0, every) == len(WIDTHS) - 1).all()  # free bytes: the widest
    assert (choose(c, FRAC, 1e9, every) == 0).all()  # bytes priceless: the narrowest
    floor3 = torch.tensor(WIDTHS) >= 3
    assert (choose(c, FRAC, 1e9, floor3) == 1).all()  # never below the floor


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.3, 0.95))
def test_price_meets_the_byte_target(seed, target):
    layers = [costs(seed + i) for i in range(3)]
    every = torch.ones(len(WIDTHS), dtype=torch.bool)
    price = price_for(layers, FRAC, target, every)
    assert byte_frac([choose(c, FRAC, price, every) for c in layers], FRAC) <= target + 1e-6
    # the smallest such price: a little less spends more than the target
    assert byte_frac([choose(c, FRAC, price * 0.98, every) for c in layers], FRAC) > target - 0.02


def test_rule_follows_experts_not_slots():
    C, k = 4, 2
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]] * 2)  # two windows of C rows
    rec = LayerRecord(torch.zeros(2 * C, 8), idx, torch.ones(2 * C, k), torch.zeros(2 * C, k, 7),
                      torch.zeros(2 * C, k, 7))
    choices = torch.arange(2 * C * k).view(2 * C, k) % 7  # width index per (row, slot)
    rule = OracleRule({5: rec}, {5: choices}, WIDTHS, C)
    bits8 = torch.full((C,), 8)
    one = rule(5, torch.zeros(1, 8), SimpleNamespace(idx=idx[:1]), bits8[:1], None)
    assert one.tolist() == [[8, 8]]  # a look-ahead row: the token's width, no window consumed
    w0 = rule(5, torch.zeros(C, 8), SimpleNamespace(idx=idx[:C]), bits8, None)
    assert w0.tolist() == torch.tensor(WIDTHS)[choices[:C]].tolist()
    swapped = idx[C:].flip(-1).clone()
    swapped[0, 0] = 7  # an expert the record's routing did not choose
    w1 = rule(5, torch.zeros(C, 8), SimpleNamespace(idx=swapped), bits8, None)
    want = torch.tensor(WIDTHS)[choices[C:]].flip(-1)
    want[0, 0] = 8
    assert w1.tolist() == want.tolist()
    assert (rule.unmatched, rule.total) == (1, 2 * C * k)
    capped = OracleRule({5: rec}, {5: torch.full((2 * C, k), 6)}, WIDTHS, C)
    assert (capped(5, torch.zeros(C, 8), SimpleNamespace(idx=idx[:C]), torch.full((C,), 4), None) == 4).all()
