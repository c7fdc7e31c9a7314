"""What a cached slice is worth: pure scoring functions, tested alone.

Decode visits the MoE layers in a cycle, so an access pattern larger than the cache is the case where
LRU is worst (it evicts exactly the layer needed next). Belady's rule evicts the slice whose next use is
furthest away; we estimate that as

    E[layers until next use] = d + (1/p - 1) * n

where d is the slice's layer distance ahead of the current layer (1 = the next layer), n the number of
MoE layers and p the probability that a visit to its layer needs it (an exponential moving average of
"this slice was needed", per (layer, expert, slice)). It folds together what EdgeMoE and HOBBIT score
with: frequency (p) and layer distance (d). Since only an expert's top slice may go, lower planes
outlive their higher ones: a low plane is needed by every width, so its p is never below its higher
planes' p.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

PolicyName = Literal["d2moe", "lru", "edgemoe"]
MIN_P = 1e-3


@dataclass(frozen=True)
class CachePolicy:
    """Eviction scoring. `d2moe`: expected distance to the next use; `lru`: time since the last use;
    `edgemoe`: layer distance over usage frequency (EdgeMoE's two signals as a plain ratio)."""

    name: PolicyName = field(default="d2moe", metadata={"help": "d2moe (expected next use), lru or edgemoe"})
    decay: float = field(default=0.8, metadata={"help": "weight of history in the usage average, per visit"})

    def __post_init__(self) -> None:
        if self.name not in ("d2moe", "lru", "edgemoe"):
            raise ValueError(f"unknown cache policy {self.name!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError("decay must be in [0, 1)")


def layer_distance(layer_pos: np.ndarray | int, current_pos: int, n: int) -> np.ndarray | int:
    """MoE-layer visits from the current one until `layer_pos` runs again: 1 (next) .. n (current, again)."""
    return (np.asarray(layer_pos) - current_pos - 1) % n + 1


def expected_next_use(p: np.ndarray | float, distance: np.ndarray | int, n: int) -> np.ndarray:
    """Belady estimate of layer visits until a slice is needed again (larger: evict first)."""
    p = np.maximum(np.asarray(p, dtype=np.float64), MIN_P)
    return np.asarray(distance, dtype=np.float64) + (1.0 / p - 1.0) * n


def update_usage(p: np.ndarray, needed: np.ndarray, decay: float) -> np.ndarray:
    """One visit's update of the usage averages: p <- decay * p + (1 - decay) * needed."""
    return decay * p + (1.0 - decay) * needed.astype(np.float64)


def eviction_scores(
    policy: CachePolicy,
    p_top: np.ndarray,
    layer_pos: np.ndarray,
    last_use: np.ndarray,
    current_pos: int,
    clock: int,
    n: int,
) -> np.ndarray:
    """Score each candidate's top slice; the largest goes first. Arrays broadcast per candidate."""
    if policy.name == "lru":
        return np.asarray(clock - last_use, dtype=np.float64)
    d = layer_distance(layer_pos, current_pos, n)
    if policy.name == "edgemoe":
        return np.asarray(d, dtype=np.float64) / np.maximum(np.asarray(p_top, dtype=np.float64), MIN_P)
    return expected_next_use(p_top, d, n)
