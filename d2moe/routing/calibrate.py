"""`d2moe calibrate`: measure every width's cost on calibration text, fit router two, calibrate the tiers,
fit the next-layer guess (next_guess.py), and write `calibration.json`, `width_router.safetensors` and
`next_guess.safetensors` into the store.

Every file is written to a temporary name and renamed into place, calibration.json last:
a store has a usable calibration exactly when calibration.json exists, so an interrupted run leaves the
store as it was (a store without them runs fixed widths).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from d2moe.engine.model import LoadedModel
from d2moe.routing.calibration import CALIBRATION_FILE, CALIBRATION_VERSION
from d2moe.routing.collect import LayerRecord, collect, token_windows
from d2moe.routing.finetune import FinetuneConfig, finetune
from d2moe.routing.fit import FitConfig, fit_router, price_curve, tier_prices, with_floors
from d2moe.routing.next_guess import NEXT_GUESS_FILE, fit_next_guess, save_next_guess
from d2moe.routing.width_router import ROUTER_FILE


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def expert_stats(records: dict[int, LayerRecord], num_experts: int, widths: list[int]) -> dict:
    """Popularity (share of chosen slots) and sensitivity (mean cost and relative output error per width)
    of every expert, by layer."""
    out = {}
    for layer, r in records.items():
        flat = r.idx.reshape(-1)
        count = torch.bincount(flat, minlength=num_experts).float()
        cost = torch.zeros(num_experts, len(widths)).index_add_(0, flat, r.cost.reshape(-1, len(widths)))
        rel = torch.zeros(num_experts, len(widths)).index_add_(0, flat, r.rel_err.reshape(-1, len(widths)))
        per = count.clamp_min(1)[:, None]
        out[str(layer)] = {
            "popularity": (count / count.sum()).tolist(),
            "mean_cost": (cost / per).tolist(),
            "rel_error": (rel / per).tolist(),
        }
    return out


def static_widths(stats: dict, widths: list[int], byte_frac: list[float], target: float = 0.5,
                  iters: int = 40) -> dict[str, list[int]]:
    """EdgeMoE's per-expert widths: one width per expert from its mean cost, at the price where the
    popularity-weighted byte fraction meets `target` (the `balanced` budget)."""
    layers = sorted(stats, key=int)
    cost = torch.tensor([stats[L]["mean_cost"] for L in layers])  # [L, E, W]
    pop = torch.tensor([stats[L]["popularity"] for L in layers])  # [L, E]
    frac = torch.tensor(byte_frac)

    def pick(price: float) -> torch.Tensor:
        return (cost + price * frac).argmin(-1)  # [L, E] width index

    def used(i: torch.Tensor) -> float:
        return float((frac[i] * pop).sum() / pop.sum())

    a, b = -30.0, 10.0
    for _ in range(iters):
        mid = (a + b) / 2
        a, b = (mid, b) if used(pick(10**mid)) > target else (a, mid)
    choice = pick(10**b)
    return {L: [widths[int(i)] for i in row] for L, row in zip(layers, choice)}


def width_bytes(reader) -> tuple[list[int], list[float]]:
    """The store's widths, narrowest first, and each width's expert bytes as a fraction of the widest's."""
    widths = list(range(reader.min_bits, reader.max_bits + 1))
    layout = reader.config.layout
    return widths, [layout.prefix_bytes(b) / layout.prefix_bytes(widths[-1]) for b in widths]


def calibrate(model: LoadedModel, ids: list[int], *, tokens: int = 4096, context: int = 256,
              fit: FitConfig = FitConfig(), tune: FinetuneConfig | None = None,
              sources: list[str] | None = None,
              progress: Callable[[str, int], None] | None = None) -> dict:
    """Run the whole calibration on token `ids` and write it into the model's store; returns the summary."""
    t0 = time.perf_counter()
    widths, byte_frac = width_bytes(model.reader)
    windows = token_windows(ids, context, tokens)
    records = collect(model, windows, widths, progress)
    router, fit_error = fit_router(records, widths, byte_frac, model.config.num_experts, fit, progress)
    tune_log: list[dict] = []
    if tune is not None and tune.steps > 0:
        first = tier_prices(router, records)
        prices = (first["high"]["price"], first["fast"]["price"])
        router, tune_log = finetune(model, router, windows, prices, tune, progress)
    router = with_floors(router, records)
    guess, guess_report = fit_next_guess(records, model.decoder.w, model.config, progress=progress)
    stats = expert_stats(records, model.config.num_experts, widths)
    summary = {
        "version": CALIBRATION_VERSION,
        "sources": sources or [],
        "tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "tokens": int(windows.numel()),
        "context": context,
        "widths": widths,
        "byte_frac": byte_frac,
        "fit": asdict(fit) | {"mean_squared_log_error": fit_error and sum(fit_error.values()) / len(fit_error)},
        "finetune": tune and asdict(tune) | {"log": tune_log[-8:]},
        "tiers": tier_prices(router, records),
        "price_curve": [asdict(p) for p in price_curve(router, records)],
        "experts": stats,
        "static_widths": static_widths(stats, widths, byte_frac),
        "router": ROUTER_FILE,
        "next_guess": guess_report,
        "seconds": None,
    }
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    store = Path(model.path)
    _atomic_write(store / ROUTER_FILE, router.save)
    _atomic_write(store / NEXT_GUESS_FILE, lambda p: save_next_guess(guess, p))
    _atomic_write(store / CALIBRATION_FILE, lambda p: p.write_text(json.dumps(summary, indent=1)))
    return summary
