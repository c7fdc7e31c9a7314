"""Clipped grids for the msb layout: per group the range [lo, hi] that serves every width at once.

msb's grid covers each group's [min, max]: one outlier stretches the 4 buckets of the 2-bit base over a range
most weights never reach. The layout leaves two free numbers per group, the offset z and the step s (base
scale 64 s); every width reads the same grid (W_b = centre of bucket c >> (8 - b) of 2^b equal buckets over
[z - 32 s, z + 224 s], c = clamp(floor((w - lo) / s), 0, 255)). So a clipped grid is stored, read and
computed exactly like msb's: same bytes, same kernels, and the b-bit expert is still a prefix.

`clip_grid` searches per group the range [lo + a r, hi - b r] (r = hi - lo; a, b from a coarse 7 x 7 grid in
0..0.3, then +-2 steps of 0.0125 around the best) that minimises the error summed over the widths,

    sum_b lam_b sum_j act_j (W_b,j - w_j)^2,     lam_b = base^(max_bits - b) / (msb's error at b),

act_j the mean squared input of column j (the diagonal of the input Hessian, or the checkpoint's shipped
activation statistics). Widths count relative to what msb achieves, low widths `base` times more per bit.
The unclipped range (a = b = 0) is a candidate and gives msb's grid bit for bit, and a candidate replaces it
only when strictly better, so the search never does worse than min/max on its objective.

The activation weighting is what makes clipping pay: on the default model clipping by weights alone (act = 1)
barely moves perplexity, while with act (msb's rounding, base 3) 2-bit perplexity falls from 1208 to 186 and
3-bit from 116 to 80 (README, "Fitting the nested codes"). quant/gptq.py runs GPTQ on these grids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from d2moe.config import MWQConfig
from d2moe.quant.mwq import NestedWeight, _check_weight, _fit_msb, _fp16, _fp16_up, _to_nested, _width_errors

CLIP_BASE = 3.0  # lam_b ~ CLIP_BASE^(max_bits - b) / msb error at b
COARSE = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)  # shrink of each end, fraction of the group's range
FINE = 0.0125  # refinement step around the best coarse pair


def grid_from_range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """msb's float16 grid covering [lo, hi] (exactly as mwq._fit_msb builds it): (z, s), lo' = z - 32 s."""
    s0 = (hi - lo) / 256
    z = _fp16(lo + 32 * s0)
    s = torch.maximum(s0, torch.maximum((z - lo) / 32, (hi - z) / 224))
    return z, _fp16_up(64 * s) / 64


def grid_errors(g: Tensor, a: Tensor | None, z: Tensor, s: Tensor, max_bits: int) -> Tensor:
    """act-weighted squared error per group at widths 2..max_bits of floor codes on grid (z, s): [N, W].
    g [N, gs], a [N, gs] or None, z and s [N]. A group with s == 0 reconstructs z at every width."""
    live = s > 0
    safe = torch.where(live, s, torch.ones_like(s))[:, None]
    x = (g - (z[:, None] - 32 * safe)) / safe  # weights in units of the 8-bit step
    c = torch.floor(x).clamp_(0, 255)
    out = []
    for b in range(2, max_bits + 1):
        step = 2.0 ** (8 - b)
        e = (torch.floor(c / step) + 0.5).mul_(step).sub_(x).square_()
        out.append((e if a is None else e * a).sum(1))
    err = torch.stack(out, 1) * (safe * safe)
    flat = (g - z[:, None]).square()
    flat = (flat if a is None else flat * a).sum(1, keepdim=True)
    return torch.where(live[:, None], err, flat.expand_as(err))


def width_weights(g: Tensor, a: Tensor | None, max_bits: int, base: float = CLIP_BASE) -> Tensor:
    """lam [W]: base^(max_bits - b) / (msb's act-weighted error at b over all groups g), summing to 1."""
    theta, codes = _fit_msb(g, max_bits)
    err = _width_errors(g, theta, codes, a).sum(0).double()
    err = err.clamp_min(err.max() * 1e-12 + 1e-30)
    lam = base ** torch.arange(len(err) - 1, -1, -1, dtype=torch.float64) / err
    return (lam / lam.sum()).float()


def clip_grid(g: Tensor, a: Tensor | None, lam: Tensor, max_bits: int) -> tuple[Tensor, Tensor]:
    """Per group the clipped grid (z, s) [N] minimising sum_b lam_b * grid_errors (lam [W] or [N, W])."""
    lo, hi = g.min(1).values, g.max(1).values
    r = hi - lo
    zero = torch.zeros_like(lo)

    def score(al: Tensor, be: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, s = grid_from_range(lo + al * r, hi - be * r)
        return (grid_errors(g, a, z, s, max_bits) * lam).sum(1), z, s

    best_obj, best_z, best_s = score(zero, zero)  # msb's grid: kept unless a candidate is strictly better
    best_a, best_b = zero, zero

    def consider(al: Tensor, be: Tensor) -> None:
        nonlocal best_obj, best_z, best_s, best_a, best_b
        obj, z, s = score(al, be)
        m = obj < best_obj
        best_obj, best_z, best_s = torch.where(m, obj, best_obj), torch.where(m, z, best_z), torch.where(m, s, best_s)
        best_a, best_b = torch.where(m, al, best_a), torch.where(m, be, best_b)

    for al in COARSE:
        for be in COARSE:
            if al or be:
                consider(zero + al, zero + be)
    a0, b0 = best_a, best_b
    for da in (-2, -1, 0, 1, 2):
        for db in (-2, -1, 0, 1, 2):
            if da or db:
                consider((a0 + da * FINE).clamp_min(0), (b0 + db * FINE).clamp_min(0))
    return best_z, best_s


def codes_on_grid(g: Tensor, z: Tensor, s: Tensor) -> Tensor:
    """msb's 8-bit codes of groups g [N, gs] on grid (z, s): clamp(floor((w - lo) / s), 0, 255), 0 if s == 0."""
    live = s > 0
    safe = torch.where(live, s, torch.ones_like(s))[:, None]
    c = torch.floor((g - (z[:, None] - 32 * safe)) / safe).clamp_(0, 255).long()
    return torch.where(live[:, None], c, torch.zeros_like(c))


def quantize_clip(w: Tensor, cfg: MWQConfig, act_sq: Tensor | None = None, base: float = CLIP_BASE) -> NestedWeight:
    """msb's layout with per-group clipped grids chosen against the act_sq-weighted error over every width
    (`act_sq` [in]: mean squared input per column; None weighs every column alike). Codes are msb's rounding."""
    _check_weight(w, cfg, act_sq)
    w = w.detach().to(torch.float32)
    out, n_in = w.shape
    gs, mb = cfg.group_size, cfg.max_bits
    g = w.reshape(-1, gs)
    a = None if act_sq is None else act_sq.to(torch.float32).reshape(-1, gs).repeat(out, 1)
    z, s = clip_grid(g, a, width_weights(g, a, mb, base), mb)
    codes = codes_on_grid(g, z, s) >> (8 - mb)
    theta = torch.stack([z, 64 * s, *(s * 2.0 ** (7 - i) for i in range(3, mb + 1))], dim=1)
    return _to_nested(theta, codes, out, n_in, mb)
