"""A bound for any per-token width router: every (token, chosen expert)'s width chosen with hindsight.

On the held-out text itself, calibration's cost collection (`d2moe/routing/collect.py`) prices each width of
each chosen expert with the Fisher diagonal of the true next-token loss: what the width would cost this very
token, to second order, knowing the answer, which no router has at run time. Each (token, expert) then takes
argmin_b cost_b + price * bytes_b / bytes_widest, at the price whose choices average the byte target (and, like
router two, optionally never below a floor width); the model runs with exactly those widths. If this oracle
misses a quality target at a byte budget, a router that predicts the same costs cannot meet it either: the gap
is the quantized experts' (or the second-order costs'), not the router's predictions.

`benchmarks.pareto --methods oracle` adds its rows to the Pareto table (it runs the cost collection on the
held-out tokens first: ~3 minutes for the default model's 8,192 tokens at one thread).
"""

from __future__ import annotations

import torch

from d2moe.models.widths import request_widths
from d2moe.routing.calibrate import width_bytes
from d2moe.routing.collect import LayerRecord, collect, token_windows

TARGETS = (0.75, 0.5, 0.3)  # byte fractions of the widest width (the tiers' targets)
FLOORS = (2, 3)


def choose(cost: torch.Tensor, frac: torch.Tensor, price: float, allowed: torch.Tensor) -> torch.Tensor:
    """cost [N, k, W] (0 at the widest), frac [W] bytes of each width / widest, allowed [W] bool -> [N, k]
    index of each (token, expert)'s width: the cheapest cost + price * bytes among the allowed widths."""
    total = cost + price * frac
    return total.masked_fill(~allowed, float("inf")).argmin(-1)


def byte_frac(choices: list[torch.Tensor], frac: torch.Tensor) -> float:
    """Mean bytes / widest over every chosen expert of every token and layer."""
    return torch.cat([frac[c].flatten() for c in choices]).mean().item()


def price_for(costs: list[torch.Tensor], frac: torch.Tensor, target: float, allowed: torch.Tensor,
              iters: int = 60) -> float:
    """The smallest price (bisected in log space) whose choices need at most `target` of the widest bytes;
    the choices' bytes fall as the price rises. A target below the narrowest allowed width gets a price
    that picks it everywhere."""
    lo, hi = 1e-12, 1e6
    if byte_frac([choose(c, frac, lo, allowed) for c in costs], frac) <= target:
        return lo
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        if byte_frac([choose(c, frac, mid, allowed) for c in costs], frac) > target:
            lo = mid
        else:
            hi = mid
    return hi


class OracleRule:
    """The oracle's widths as an engine width rule, for perplexity windows of `context` tokens run in order
    (`benchmarks.pareto.evaluate`). Each window's n-th call for a layer reads rows [n C, (n+1) C) of the
    records; an expert the engine chose where the record (the widest model's routing) did not gets the widest
    width (counted in `unmatched`); calls of other sizes (the pipelined engine's look-ahead on one row) keep
    the token's width."""

    def __init__(self, records: dict[int, LayerRecord], choices: dict[int, torch.Tensor], widths: list[int],
                 context: int) -> None:
        self.records, self.context = records, context
        self.widths = {L: torch.tensor(widths)[c] for L, c in choices.items()}  # [N, k] bits
        self.widest = widths[-1]
        self.calls = dict.fromkeys(records, 0)
        self.unmatched = self.total = 0

    def __call__(self, layer: int, x: torch.Tensor, r, token_bits: torch.Tensor, price) -> torch.Tensor:
        T = x.shape[0]
        if T != self.context or layer not in self.records:
            return request_widths(r.idx, token_bits)
        n = self.calls[layer]
        self.calls[layer] += 1
        rows = slice(n * T, (n + 1) * T)
        known, bits = self.records[layer].idx[rows], self.widths[layer][rows]
        match = r.idx[:, :, None] == known[:, None, :]  # [T, k, k]: engine slot -> record slot
        found = match.any(-1)
        out = torch.full_like(r.idx, self.widest)
        out[found] = bits.gather(1, match.float().argmax(-1))[found]
        self.unmatched += int((~found).sum())
        self.total += found.numel()
        return torch.minimum(out, request_widths(r.idx, token_bits))


def oracle_points(model, ids: list[int], tokens: int, context: int, targets=TARGETS, floors=FLOORS,
                  progress=None) -> list[tuple[str, str, OracleRule, None]]:
    """(method, setting, rule, price) rows for `benchmarks.pareto`: the cost collection on the held-out
    windows, then one rule per (floor, target)."""
    widths, fracs = width_bytes(model.reader)
    frac = torch.tensor(fracs)
    records = collect(model, token_windows(ids, context, tokens), widths, progress)
    costs = [r.cost for r in records.values()]
    points = []
    for floor in floors:
        allowed = torch.tensor(widths) >= floor
        for target in [t for t in targets if t >= frac[allowed].min()]:  # below the floor's bytes: no choice
            price = price_for(costs, frac, target, allowed)
            choices = {L: choose(records[L].cost, frac, price, allowed) for L in records}
            points.append(("oracle", f"floor {floor}, {int(100 * target)} %",
                           OracleRule(records, choices, widths, context), None))
    return points
