"""A random router two and tier prices written into a tiny store: widths are routed per token (quality is
not the point), so tests can mix tiers that really change the computation."""

from __future__ import annotations

import json

import torch

from d2moe.routing.width_router import LayerRouter, WidthRouter


def calibrate_randomly(store, seed: int = 0) -> None:
    """A random router two and tier prices: enough to route widths per token (quality is not the point)."""
    cfg = json.loads((store / "config.json").read_text())["model"]
    g = torch.Generator().manual_seed(seed)
    H, E, W, r = cfg["hidden_size"], cfg["num_experts"], 7, 4
    layers = {L: LayerRouter(torch.randn(H, r, generator=g) * 0.3, torch.randn(E, r, W, generator=g),
                             torch.randn(E, W, generator=g) - 2, torch.randn(W, generator=g))
              for L in range(cfg["num_layers"]) if L not in cfg["dense_layers"]}
    frac = torch.tensor([(b + 0.5) / 8.5 for b in range(2, 9)])
    # floors too (high's price 0.05 -> at least 5 bits, balanced's 0.2 -> 4, fast's 1.0 -> 2), as calibrate makes
    floors = torch.tensor([float("inf"), 0.8, 0.3, 0.1, 0.03, 0.01, 0.0], dtype=torch.float64)
    WidthRouter(torch.arange(2, 9), frac, layers, floors).save(store / "width_router.safetensors")
    tiers = {"high": {"price": 0.05}, "balanced": {"price": 0.2}, "fast": {"price": 1.0}}
    curve = [{"price": p, "avg_bits": 8 - 4 * p, "byte_frac": 1 - 0.5 * p} for p in (0.0, 0.5, 1.0)]
    (store / "calibration.json").write_text(json.dumps({"tiers": tiers, "price_curve": curve}))
