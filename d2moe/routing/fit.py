"""Fitting router two and calibrating the tiers, from the costs `collect.py` measured.

Router two (per MoE layer, `width_router.py`) is fitted by least squares in log space to the measured
cost of every width below the widest, for every (token, chosen expert) of the calibration text. Then the
tiers: at a price p each (token, expert) takes argmin_b cost_b + p * bytes_b / bytes_widest; the mean
byte fraction falls as p rises, so each tier's price is found by bisection on the calibration tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from d2moe.routing.collect import LayerRecord
from d2moe.routing.tiers import TIER_BYTE_TARGETS, PricePoint, interpolate_price
from d2moe.routing.width_router import LayerRouter, WidthRouter, layer_log_costs

LOG_FLOOR = 1e-12  # costs below this are "free" (log space needs a floor)


@dataclass(frozen=True)
class FitConfig:
    rank: int = 16  # width of the token projection A [H, r]
    steps: int = 300  # full-batch Adam steps per layer
    lr: float = 0.02
    weight_decay: float = 1e-4
    seed: int = 0


def fit_layer(rec: LayerRecord, num_experts: int, cfg: FitConfig) -> tuple[LayerRouter, float]:
    """Least squares on log costs; returns the layer's router and its final mean squared log error."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = rec.x.float()
    H, W = x.shape[1], rec.cost.shape[-1]
    target = rec.cost[..., :-1].clamp_min(LOG_FLOOR).log()  # [T, k, W-1]
    mean = target.mean(dim=(0, 1))
    A = (torch.randn(H, cfg.rank, generator=g) / math.sqrt(H)).requires_grad_()
    B = torch.zeros(num_experts, cfg.rank, W - 1, requires_grad=True)
    C = mean.repeat(num_experts, 1).clone().requires_grad_()
    v = torch.zeros(W - 1, requires_grad=True)
    opt = torch.optim.Adam([A, B, C, v], lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            opt.zero_grad()
            pred = layer_log_costs(x @ A, B, C, v, rec.idx, rec.weight)
            loss = (pred - target).pow(2).mean()
            loss.backward()
            opt.step()
    pad = lambda t: torch.cat([t.detach(), torch.zeros(*t.shape[:-1], 1)], dim=-1)  # the widest: pinned later
    return LayerRouter(A.detach().contiguous(), pad(B), pad(C), pad(v)), float(loss.detach())


def fit_router(records: dict[int, LayerRecord], widths: list[int], byte_frac: list[float], num_experts: int,
               cfg: FitConfig, progress: Callable[[str, int], None] | None = None) -> tuple[WidthRouter, dict[int, float]]:
    layers, errors = {}, {}
    for layer, rec in records.items():
        layers[layer], errors[layer] = fit_layer(rec, num_experts, cfg)
        if progress:
            progress("fit", 1)
    router = WidthRouter(torch.tensor(widths), torch.tensor(byte_frac, dtype=torch.float32), layers)
    return router, errors


# ---- tiers ------------------------------------------------------------------------------------------------


def predicted_costs(router: WidthRouter, records: dict[int, LayerRecord]) -> dict[int, torch.Tensor]:
    """Router two's log costs for every calibration (token, expert): what it will decide from at run time."""
    with torch.no_grad():
        return {L: router.log_costs(L, r.x, r.idx, r.weight) for L, r in records.items()}


def outcome(router: WidthRouter, log_costs: dict[int, torch.Tensor], records: dict[int, LayerRecord],
            price: float) -> tuple[float, float, float]:
    """(mean byte fraction, mean width, measured cost per token) of router two's choices at `price`."""
    frac, bits, cost, n, tokens = 0.0, 0.0, 0.0, 0, 0
    for L, lc in log_costs.items():
        price_t = torch.full((lc.shape[0],), price)
        choice = router.choose(lc, price_t)  # [T, k] widths
        i = torch.searchsorted(router.widths, choice)
        frac += float(router.byte_frac[i].sum())
        bits += float(choice.sum())
        cost += float(records[L].cost.gather(-1, i[..., None]).sum())
        n += choice.numel()
        tokens = choice.shape[0]
    return frac / n, bits / n, cost / max(tokens, 1)


def price_curve(router: WidthRouter, records: dict[int, LayerRecord], points: int = 33) -> list[PricePoint]:
    """Mean width and byte fraction over a log grid of prices (for --avg-bits and the plots)."""
    lc = predicted_costs(router, records)
    hi = max(float(c[..., :-1].exp().max()) for c in lc.values()) * 10 + 1e-9
    lo = hi * 1e-9
    prices = [0.0] + [lo * (hi / lo) ** (i / (points - 2)) for i in range(points - 1)]
    out = []
    for p in prices:
        frac, bits, _ = outcome(router, lc, records, p)
        out.append(PricePoint(p, bits, frac))
    return out


def with_floors(router: WidthRouter, records: dict[int, LayerRecord]) -> WidthRouter:
    """Router two with a width floor per price: at a price where its own choices average b bits or more on
    the calibration tokens, no chosen expert runs below b. Tiers and the price curve are then calibrated on
    the floored router (the floor raises the bytes at a price)."""
    curve = price_curve(replace(router, floor_prices=None), records)
    widths = router.widths.tolist()
    prices = [math.inf] + [interpolate_price(curve, "avg_bits", float(b)) for b in widths[1:]]
    for i in range(1, len(prices)):  # non-increasing by construction; kept so against float ties
        prices[i] = min(prices[i], prices[i - 1])
    return replace(router, floor_prices=torch.tensor(prices, dtype=torch.float64))


def tier_prices(router: WidthRouter, records: dict[int, LayerRecord], iters: int = 40) -> dict[str, dict]:
    """Bisection (in log price) for each tier's byte target on the calibration tokens."""
    lc = predicted_costs(router, records)
    hi = max(float(c[..., :-1].exp().max()) for c in lc.values()) * 10 + 1e-9
    out = {}
    for tier, target in TIER_BYTE_TARGETS.items():
        a, b = math.log(hi * 1e-12), math.log(hi)
        for _ in range(iters):
            mid = (a + b) / 2
            frac, _, _ = outcome(router, lc, records, math.exp(mid))
            a, b = (mid, b) if frac > target else (a, mid)
        price = math.exp(b)
        frac, bits, cost = outcome(router, lc, records, price)
        out[tier] = {"price": price, "byte_frac": frac, "avg_bits": bits, "predicted_kl_per_token": cost}
    return out
