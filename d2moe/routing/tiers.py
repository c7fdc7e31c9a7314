"""Quality tiers: what a request asks for, resolved to what the engine runs.

`max` and `min` are fixed widths (the store's widest and 2 bits). The others are router-two prices
calibrated on calibration text so that the chosen experts' bytes average a target fraction of their bytes
at the widest width: `high` 75 %, `balanced` 50 %, `fast` 30 %. `--avg-bits X` is resolved the same way on
the calibrated curve of (price -> mean width). A store without a calibrated router runs every tier at a
fixed width of about the same bytes (`fallback_bits`).
"""

from __future__ import annotations

from dataclasses import dataclass

TIERS = ("max", "high", "balanced", "fast", "min")
TIER_BYTE_TARGETS = {"high": 0.75, "balanced": 0.50, "fast": 0.30}  # of the widest width's expert bytes


@dataclass(frozen=True)
class WidthChoice:
    """Per request: a fixed width, or router two at a price (bits is then the widest it may pick)."""

    bits: int
    price: float | None = None

    @property
    def routed(self) -> bool:
        return self.price is not None


@dataclass(frozen=True)
class PricePoint:
    price: float
    avg_bits: float
    byte_frac: float


def interpolate_price(curve: list[PricePoint], key: str, target: float) -> float:
    """The price at which `key` (avg_bits or byte_frac, both falling as price rises) reaches `target`,
    linearly interpolated between calibrated points; clamped to the curve's ends."""
    pts = sorted(curve, key=lambda p: p.price)
    vals = [getattr(p, key) for p in pts]
    if target >= vals[0]:
        return pts[0].price
    if target <= vals[-1]:
        return pts[-1].price
    for a, b, va, vb in zip(pts, pts[1:], vals, vals[1:]):
        if va >= target >= vb:
            f = 0.0 if va == vb else (va - target) / (va - vb)
            return a.price + f * (b.price - a.price)
    return pts[-1].price
