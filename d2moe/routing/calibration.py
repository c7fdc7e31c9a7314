"""A store's calibration as the engine reads it: tier prices, the price curve, EdgeMoE's static widths,
router two and the fitted next-layer guess. `calibration.json` is written last by `d2moe calibrate`, so it
marks a complete calibration; without it the store runs fixed widths (`--bits`, tiers `max` and `min`) and
reads ahead by the router's own guess."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from d2moe.config import ModelConfig
from d2moe.routing.next_guess import NEXT_GUESS_FILE, load_next_guess
from d2moe.routing.tiers import TIER_BYTE_TARGETS, PricePoint, WidthChoice, interpolate_price
from d2moe.routing.width_router import ROUTER_FILE, WidthRouter
from d2moe.storage.format import StoreError

CALIBRATION_FILE = "calibration.json"
# 2: router two with its width floors (width_router.py); 3: deterministic costs (collect.py), and the default
# model calibrated on 16 windows; 4: the fitted next-layer guess (next_guess.py)
CALIBRATION_VERSION = 4


@dataclass(frozen=True)
class Calibration:
    tiers: dict[str, dict]
    curve: list[PricePoint]
    static_widths: dict[int, torch.Tensor]
    router: WidthRouter | None
    next_guess: dict[str, torch.Tensor]  # dense-weight entries layers.N.guess(_b); empty: the router guesses

    def choice(self, *, max_bits: int, tier: str | None = None, avg_bits: float | None = None) -> WidthChoice:
        """A tier or an average width as what the engine runs: fixed ends, router-two prices between."""
        if avg_bits is not None:
            if self.router is None:
                raise StoreError("--avg-bits needs a calibrated width router: run `d2moe calibrate` on the store")
            return WidthChoice(max_bits, interpolate_price(self.curve, "avg_bits", avg_bits))
        if tier in (None, "max"):
            return WidthChoice(max_bits)
        if tier == "min":
            return WidthChoice(2)
        if self.router is None or tier not in self.tiers:
            raise StoreError(f"tier {tier!r} needs a calibrated width router: run `d2moe calibrate` on the store")
        return WidthChoice(max_bits, float(self.tiers[tier]["price"]))


def load_calibration(store: Path, cfg: ModelConfig | None = None) -> Calibration | None:
    """The store's calibration, or None; with `cfg`, its fitted next-layer guess too (checked against it)."""
    f = Path(store) / CALIBRATION_FILE
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
        router_file = Path(store) / d.get("router", ROUTER_FILE)
        router = WidthRouter.load(router_file) if router_file.is_file() else None
        curve = [PricePoint(**p) for p in d.get("price_curve", [])]
        static = {int(k): torch.tensor(v, dtype=torch.int64) for k, v in (d.get("static_widths") or {}).items()}
        guess = {}
        if cfg is not None and "next_guess" in d:  # calibrated before version 4: the router guesses
            f = Path(store) / d["next_guess"].get("file", NEXT_GUESS_FILE)
            guess = load_next_guess(f, cfg)
        return Calibration(d.get("tiers", {}), curve, static, router, guess)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
        raise StoreError(f"{f}: cannot read the calibration ({e}); re-run `d2moe calibrate`") from None


__all__ = ["CALIBRATION_FILE", "CALIBRATION_VERSION", "Calibration", "TIER_BYTE_TARGETS", "load_calibration"]
