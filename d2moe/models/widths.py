"""Per-(token, chosen expert) widths: how many bits each expert a token chose runs at (0: skipped).

The request's width applies to every chosen expert unless a rule narrows it. Rules are pure functions of
the routing, the request's widths and, for HOBBIT, the widths already resident (an input, never changed):
- `request_widths`: every chosen expert at its token's width;
- `hobbit_widths` (HOBBIT): a cache miss of low gate weight runs at a lower width, or at the width already
  resident if that is at least the low one; experts past a cumulative gate weight of `skip_after` (in
  descending weight order) are skipped;
- `static_widths` (EdgeMoE): a per-expert width table caps the token's width.
- `routed_widths` (dual routing): router two's choice at each token's price (routing/width_router.py), in
  tensor form; `RoutedWidths`, the rule the engine runs, decides each token by the one-token rule instead
  (the same choices but at float32 ties, and a token's never depend on its neighbours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from d2moe.routing.width_router import WidthRouter

MIN_BITS = 2


def request_widths(idx: torch.Tensor, token_bits: torch.Tensor) -> torch.Tensor:
    """idx [T,k], token_bits [T] -> [T,k]: each chosen expert at its token's width."""
    return token_bits.view(-1, 1).expand_as(idx).clone()


def static_widths(idx: torch.Tensor, token_bits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table [E] per-expert widths of this layer: min(token width, table[expert])."""
    return torch.minimum(request_widths(idx, token_bits), table[idx])


@dataclass(frozen=True)
class HobbitRule:
    low_weight: float = 0.3  # a miss whose gate weight is below this runs at the low width
    skip_after: float = 0.9  # experts after the cumulative weight reaches this are skipped

    def __call__(self, idx: torch.Tensor, weight: torch.Tensor, token_bits: torch.Tensor,
                 resident: torch.Tensor) -> torch.Tensor:
        """idx, weight [T,k]; token_bits [T]; resident [E] usable width per expert (1: none) -> [T,k]."""
        high = request_widths(idx, token_bits)
        low = torch.clamp(high // 2, min=MIN_BITS)
        res = resident[idx]
        cheap = (res < high) & (weight < self.low_weight)
        bits = torch.where(cheap, torch.minimum(torch.maximum(low, res), high), high)
        order = weight.argsort(dim=-1, descending=True, stable=True)
        before = weight.gather(-1, order).cumsum(-1) - weight.gather(-1, order)  # weight ahead of each
        skip = torch.zeros_like(cheap).scatter(-1, order, before >= self.skip_after)
        return torch.where(skip, torch.zeros_like(bits), bits)


def routed_widths(router: WidthRouter, layer: int, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                  token_bits: torch.Tensor, price: torch.Tensor | None) -> torch.Tensor:
    """Router two's widths for tokens with a price, capped at the token's width; tokens without one
    (None or NaN: a fixed-width request) keep their width."""
    return _priced_rows(router, layer, idx, token_bits, price, lambda m: torch.minimum(
        router.widths_for(layer, x[m], idx[m], weight[m], price[m]), request_widths(idx[m], token_bits[m])))


def _priced_rows(router: WidthRouter, layer: int, idx: torch.Tensor, token_bits: torch.Tensor,
                 price: torch.Tensor | None, decide) -> torch.Tensor:
    """[T,k]: every chosen expert at its token's width, except the rows with a price (not NaN) in a layer
    router two covers, which get `decide(mask)` ([rows, k] for the masked rows)."""
    fixed = request_widths(idx, token_bits)
    if price is None or layer not in router.layers:
        return fixed
    routed = ~torch.isnan(price)
    if routed.any():
        fixed[routed] = decide(routed)
    return fixed


@dataclass(frozen=True)
class RoutedWidths:
    """Router two as a width rule: `__call__` for any number of tokens, `one` for a decode step's single
    token (lists in and out; `WidthRouter.one_token`, tested against `__call__`)."""

    router: WidthRouter

    def __call__(self, layer: int, x: torch.Tensor, r, token_bits: torch.Tensor,
                 price: torch.Tensor | None) -> torch.Tensor:
        """Every token by the one-token rule (`rows`): a token's widths never depend on the tokens beside it
        (`routed_widths`, the tensor form, decides alike but at float32 ties)."""
        return self.rows(layer, x, r, token_bits, price)

    def rows(self, layer: int, x: torch.Tensor, r, token_bits: torch.Tensor,
             price: torch.Tensor | None) -> torch.Tensor:
        """`one` for each row of x (a batched step's decode rows) in one call: [T,k], row t as `one` gives it."""
        return _priced_rows(self.router, layer, r.idx, token_bits, price, lambda m: self.router.rows(
            layer, x[m], r.idx[m], r.weight[m], price[m], token_bits[m]))

    def one(self, layer: int, x: torch.Tensor, idx: list[int], weight: list[float], bits: int,
            price: float | None) -> list[int]:
        if price is None or math.isnan(price) or layer not in self.router.layers:
            return [bits] * len(idx)
        return self.router.one_token(layer, x, idx, weight, price, bits)
