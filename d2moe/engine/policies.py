"""`--policy NAME`: the peers' ideas as switches on the one engine, so a benchmark compares ideas, not
implementations (the D2MoE paper re-implements its baselines the same way).

| policy          | provider   | eviction score      | prefetch          | bases first | nested | degrade | widths   |
|-----------------|------------|---------------------|-------------------|-------------|--------|---------|----------|
| d2moe           | pipelined  | expected next use   | next-layer fitted | yes         | yes    | yes     | request  |
| lru             | synchronous| least recently used | none              | -           | yes    | no      | request  |
| hold            | everything resident at the request's width, read before the first step                   |
| matryoshka-free | pipelined  | expected next use   | next-layer fitted | yes         | no     | no      | request  |
| edgemoe         | pipelined  | distance / frequency| expert transitions| no          | yes    | no      | static   |
| hobbit          | pipelined  | expected next use   | next-layer router | no          | yes    | no      | hobbit   |

- next-layer router: the next MoE layer's router applied to the current residual stream (HOBBIT, AdapMoE);
  next-layer fitted: d2moe's guess fitted by `d2moe calibrate` (routing/next_guess.py), the router's where
  the store has none.
- nested = a resident lower width is reused when a higher one is read (and the reverse); matryoshka-free
  keeps separate per-width copies, emulated by dropping an expert's slices whenever a different width is
  demanded (one copy at a time: generous to it, since real per-width copies would also cost memory).
- edgemoe: per-expert static widths from measured sensitivity (`calibration.json`, written by `d2moe
  calibrate`; without it every expert runs at the request's width), eviction by frequency x layer distance,
  and prefetch of the experts that followed this layer's experts most often in the past (EdgeMoE profiles
  those transitions offline; here they are counted online).
- hobbit: a cache miss of low gate weight is read at a lower width (or served at the width already
  resident), experts past a cumulative gate weight of 0.9 are skipped (`models/widths.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PolicySpec:
    name: str
    provider: Literal["pipelined", "sync", "hold"] = "pipelined"
    eviction: Literal["d2moe", "lru", "edgemoe"] = "d2moe"
    prefetch: Literal["fitted", "router", "transition", "none"] = "fitted"
    bases_first: bool = True  # a short cache reads every demanded expert's base before anyone's planes
    nested: bool = True  # reuse resident lower planes across widths
    degrade: bool = True  # may compute with the planes it has when high planes are late (--no-stall)
    widths: Literal["request", "hobbit", "static"] = "request"


POLICY_SPECS: dict[str, PolicySpec] = {
    "d2moe": PolicySpec("d2moe"),
    "lru": PolicySpec("lru", provider="sync", eviction="lru", prefetch="none", degrade=False),
    "hold": PolicySpec("hold", provider="hold", prefetch="none", degrade=False),
    "matryoshka-free": PolicySpec("matryoshka-free", nested=False, degrade=False),
    "edgemoe": PolicySpec("edgemoe", eviction="edgemoe", prefetch="transition", bases_first=False, degrade=False,
                          widths="static"),
    "hobbit": PolicySpec("hobbit", prefetch="router", bases_first=False, degrade=False, widths="hobbit"),
}
POLICIES: tuple[str, ...] = tuple(POLICY_SPECS)


def policy_spec(name: str) -> PolicySpec:
    try:
        return POLICY_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
