"""Matryoshka weight quantization (MWQ): one nested form, two ways to fit it.

Per group (one output row, `group_size` consecutive input columns) the form stores an offset z, a base
scale s2, one scale s_i per sign plane i = 3..max_bits, a 2-bit base code q in {0..3} per weight and one
sign bit sigma_i in {-1, +1} per weight and plane. The b-bit weight is a prefix of that data:

    W_b = z + s2 * q + sum_{i=3..b} s_i * sigma_i          (2 <= b <= max_bits)

* `msb`: uniform 8-bit quantization of the group read by its top bits. With lo' = z - 32 s and
  code c = clamp(floor((w - lo') / s), 0, 255), W_b is the centre of bucket c >> (8 - b) of 2^b equal buckets
  over [lo', lo' + 256 s]; in the nested form s2 = 64 s, s_i = s * 2^(7 - i) (each plane half the previous),
  q = c >> 6 and sigma_i is bit (8 - i) of c. Any width is one integer code and one scale per group.
* `residual` (the D2MoE paper's free plane scales): the scalars (z, s2, s3..s8) of each group and the codes
  are fitted jointly from the msb start, alternating a code step (per weight, the best of the few code
  paths whose top-width value brackets it, plus its current path) with a closed-form weighted least
  squares of the scalars. The objective sums the error over every width 2..max, width b weighted by
  2^(max - b) / (msb's error at b), so every prefix must be good and low widths count most; fitting planes
  one at a time instead (design.md's naive residual) loses 100x at 8 bits. Groups where msb scores better
  keep msb's fit, and a final pass keeps each group's error non-increasing as planes are added.
  On SmolLM2 FFN weights this is 0.998 / 0.97 / 0.86 / 0.78 / 0.66 / 0.67 / 0.88 x msb's squared error at
  2..8 bits, but residual stores one more float16 scale per group and plane (+0.25 bit/weight per plane).
* `gptq` (quant/gptq.py): msb's layout and kernels, codes and grids chosen by a multi-width GPTQ against
  each matrix's output error on calibration activations.

Scalars are rounded to float16 inside `quantize` (they are stored as float16, see pack.py), so
`dequantize` is exactly what a packed blob reconstructs. Pure functions of float32 torch tensors (float64
inside where cancellation would decide codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from d2moe.config import MWQConfig

FP16_MAX = 65504.0
_RESIDUAL_ITERS = 4  # alternations of (codes | scalars)
_WIDTH_WEIGHT = 2.0  # width b weighs _WIDTH_WEIGHT^(max_bits - b) / (msb error at b): low widths first


@dataclass(frozen=True)
class NestedWeight:
    """One quantized matrix [out, in] in the nested form (float32 scalars, exactly float16-representable)."""

    offset: Tensor  # [out, G] z
    base_scale: Tensor  # [out, G] s2
    base: Tensor  # [out, in] uint8 in 0..3
    plane_scales: Tensor  # [P, out, G], plane i = 3..max_bits at index i - 3
    planes: Tensor  # [P, out, in] bool, True means +1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.base.shape[0], self.base.shape[1])

    @property
    def group_size(self) -> int:
        return self.base.shape[1] // self.offset.shape[1]

    @property
    def max_bits(self) -> int:
        return self.planes.shape[0] + 2


# ----------------------------------------------------------------------------------------------- checks


def _check_weight(w: Tensor, cfg: MWQConfig, act_sq: Tensor | None) -> None:
    if w.dim() != 2:
        raise ValueError(f"MWQ quantizes 2-D matrices [out, in], got shape {tuple(w.shape)}")
    if w.shape[1] % cfg.group_size:
        raise ValueError(f"input dim {w.shape[1]} is not a multiple of group_size {cfg.group_size}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty matrix")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or inf")
    if w.abs().max() > FP16_MAX / 2:
        raise ValueError(f"weights exceed +-{FP16_MAX / 2:g}: offsets and scales are stored as float16")
    if act_sq is not None:
        if act_sq.shape != (w.shape[1],):
            raise ValueError(f"act_sq must have shape [in]={w.shape[1]}, got {tuple(act_sq.shape)}")
        if not torch.isfinite(act_sq).all() or (act_sq < 0).any():
            raise ValueError("act_sq must be finite and non-negative")


def check_bits(bits: int, max_bits: int) -> None:
    """Raise ValueError unless 2 <= bits <= max_bits."""
    if not isinstance(bits, int) or not 2 <= bits <= max_bits:
        raise ValueError(f"bits must be an int in 2..{max_bits}, got {bits!r}")


# ------------------------------------------------------------------------------------------ public API


def quantize(w: Tensor, cfg: MWQConfig, act_sq: Tensor | None = None) -> NestedWeight:
    """Quantize `w` [out, in] into the nested form; `act_sq` [in] weights the residual fit's error.

    `gptq` needs the matrix's input Hessian (quant/gptq.py, driven by the converter); alone it is msb's fit."""
    _check_weight(w, cfg, act_sq)
    w = w.detach().to(torch.float32)
    out, n_in = w.shape
    g = w.reshape(out * (n_in // cfg.group_size), cfg.group_size)  # [N, gs], N = out * G
    if cfg.layout == "msb":
        theta, codes = _fit_msb(g, cfg.max_bits)
    else:
        a = None if act_sq is None else act_sq.to(torch.float32).reshape(-1, cfg.group_size).repeat(out, 1)
        theta, codes = _fit_residual(g, cfg.max_bits, a)
    return _to_nested(theta, codes, out, n_in, cfg.max_bits)


def dequantize(q: NestedWeight, bits: int) -> Tensor:
    """Reference reconstruction W_b = z + s2*q + sum_{i=3..b} s_i*sigma_i, float32 [out, in]."""
    check_bits(bits, q.max_bits)
    out, n_in = q.shape
    gs = q.group_size

    def expand(t: Tensor) -> Tensor:  # [out, G] -> [out, in]
        return t[:, :, None].expand(out, t.shape[1], gs).reshape(out, n_in)

    w = expand(q.offset) + expand(q.base_scale) * q.base.to(torch.float32)
    for i in range(3, bits + 1):
        sigma = q.planes[i - 3].to(torch.float32) * 2 - 1
        w = w + expand(q.plane_scales[i - 3]) * sigma
    return w


def relative_error(w: Tensor, q: NestedWeight, bits: int) -> float:
    """||W_b - W||^2 / ||W||^2, the figure the design tables report."""
    return float(((dequantize(q, bits) - w) ** 2).sum() / (w**2).sum().clamp_min(1e-30))


# ---------------------------------------------------------------------------------- group-level helpers
# A group-level fit returns theta [N, K] (z, s2, s3..s_max; K = max_bits) and codes [N, gs] int64 holding
# the 8-bit-style path index k = q * 2^P + sum_i bit_i * 2^(max_bits - i), i.e. msb's code layout.


def _fp16_up(x: Tensor) -> Tensor:
    """Smallest float16 value >= x (x >= 0), returned as float32."""
    h = x.to(torch.float16)
    h = torch.where(h.to(torch.float32) < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.to(torch.float32)


def _fp16(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


def _fit_msb(g: Tensor, max_bits: int) -> tuple[Tensor, Tensor]:
    """Uniform 8-bit grid per group, with z and s2 = 64 s float16 and the grid still covering [min, max]."""
    lo = g.min(dim=1).values
    hi = g.max(dim=1).values
    s0 = (hi - lo) / 256
    z = _fp16(lo + 32 * s0)
    # z is rounded first; widen s so that [z - 32 s, z + 224 s] still covers [lo, hi]
    s = torch.maximum(s0, torch.maximum((z - lo) / 32, (hi - z) / 224))
    s2 = _fp16_up(64 * s)
    s = s2 / 64
    codes = _msb_codes(g, z - 32 * s, s)
    codes = codes >> (8 - max_bits)
    steps = [s2] + [s * 2.0 ** (7 - i) for i in range(3, max_bits + 1)]
    return torch.stack([z, *steps], dim=1), codes


def _msb_codes(g: Tensor, lo: Tensor, s: Tensor) -> Tensor:
    """c = clamp(floor((w - lo) / s), 0, 255), 0 for constant groups (s == 0)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    c = torch.floor((g - lo[:, None]) / safe[:, None]).clamp_(0, 255)
    return torch.where(s[:, None] > 0, c, torch.zeros_like(c)).to(torch.int64)


def _path_signs(max_bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For every code path k: its base q [n_paths] and signs [n_paths, P] (+-1, plane 3 first)."""
    p = max_bits - 2
    k = torch.arange(4 << p, device=device)
    q = (k >> p).to(torch.float32)
    shifts = torch.tensor([max_bits - i for i in range(3, max_bits + 1)], device=device, dtype=torch.int64)
    bits = (k[:, None] >> shifts[None, :]) & 1
    return q, bits.to(torch.float32) * 2 - 1


def _path_design(max_bits: int, device: torch.device) -> Tensor:
    """Per code path the row [1, q, sigma_3 .. sigma_max] that multiplies theta: [paths, K]."""
    q, signs = _path_signs(max_bits, device)
    return torch.cat([torch.ones_like(q)[:, None], q[:, None], signs], dim=1)


def _widths_recon(theta: Tensor, codes: Tensor) -> Tensor:
    """Reconstruction at every width 2..max for each weight: [N, gs, n_widths] (cumulative sum of terms)."""
    terms = _path_design(theta.shape[1], codes.device)[codes] * theta[:, None, :]  # [N, gs, K]
    return terms.cumsum(dim=-1)[..., 1:]


def _width_errors(g: Tensor, theta: Tensor, codes: Tensor, a: Tensor | None) -> Tensor:
    """Weighted squared error per group and width: [N, n_widths]."""
    err = (_widths_recon(theta, codes) - g[..., None]) ** 2
    if a is not None:
        err = err * a[..., None]
    return err.sum(dim=1)


@lru_cache(maxsize=8)
def _path_basis(max_bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per path and width the design row and its outer product, float64 (constants; never mutated)."""
    d = _path_design(max_bits, torch.device("cpu")).double()  # [paths, K]
    use = (torch.arange(max_bits)[None, :] < torch.arange(2, max_bits + 1)[:, None]).double()  # [widths, K]
    db = d[:, None, :] * use[None, :, :]  # [paths, widths, K]
    outer = (db[..., :, None] * db[..., None, :]).permute(2, 3, 0, 1).reshape(-1, db.shape[1])  # [K*K*paths, W]
    return d, db, outer


def _path_tables(max_bits: int, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Constants mapping theta to per-path sums: (Q [K*K, paths], L [K, paths], top [K, paths]), float64.

    For path k with design rows D_b(k) (the first b entries of [1, q, sigma_3..]), W_b(k) = D_b(k) . theta, so
    sum_b lam_b W_b^2 = (theta x theta) . Q_k, sum_b lam_b W_b = theta . L_k and W_max = theta . top_k.
    """
    d, db, outer = _path_basis(max_bits)
    lam64 = lam.double()
    quad = (outer @ lam64).reshape(max_bits * max_bits, -1)
    lin = torch.einsum("pbk,b->kp", db, lam64)
    return quad, lin, d.T.contiguous()


def _best_codes(g: Tensor, theta: Tensor, lam: Tensor, current: Tensor, window: int = 2) -> Tensor:
    """Code step: per weight the path minimising sum_b lam_b (W_b(k) - w)^2, among the 2*window paths whose
    top-width value brackets w and the current path (so the objective never increases).

    sum_b lam_b (W_b(k) - w)^2 = A_k - 2 w B_k + const, A and B from two small GEMMs per group (float64:
    the differences that decide 8-bit codes are ~1e-5 of A). On real weights this window is within 1e-6 of
    the exhaustive search over all 4 * 2^P paths at 1/20 of the cost.
    """
    n, gs = g.shape
    quad, lin, top = _path_tables(theta.shape[1], lam)
    th = theta.double()
    a_k = (th[:, :, None] * th[:, None, :]).reshape(n, -1) @ quad  # [N, paths]
    b_k = th @ lin  # [N, paths]
    vals, order = (th @ top).float().sort(dim=1)  # W_max per path, ascending
    n_paths = vals.shape[1]
    pos = torch.searchsorted(vals, g.contiguous())  # [N, gs]
    row = torch.arange(n, device=g.device)[:, None, None] * n_paths
    idx = (pos[..., None] + torch.arange(-window, window, device=g.device)).clamp_(0, n_paths - 1)
    cand = torch.cat([order.take(idx + row), current[..., None]], dim=-1)  # [N, gs, 2w + 1]
    flat = cand + row
    score = a_k.take(flat) - 2 * g[..., None].double() * b_k.take(flat)
    return cand.gather(2, score.argmin(dim=-1, keepdim=True))[..., 0]


def _solve_scalars(g: Tensor, codes: Tensor, theta: Tensor, lam: Tensor, a: Tensor | None) -> Tensor:
    """Closed-form weighted least squares of theta given codes, objective summed over widths.

    Width b uses the first b entries of theta, so the normal matrix is the per-group Gram matrix of the
    design rows masked by Lambda[k, l] = sum of lam_b over the widths that use both k and l. The Gram matrix
    is built from per-path histograms (design rows depend only on the path). A ridge towards the current
    theta keeps degenerate groups (a plane with one sign everywhere, constant q) where they are.
    """
    n, k_dim = theta.shape
    d = _path_design(k_dim, g.device)  # [paths, K]
    n_paths = d.shape[0]
    flat = (codes + torch.arange(n, device=g.device)[:, None] * n_paths).reshape(-1)
    wa = torch.ones_like(g) if a is None else a
    hist = torch.zeros(n * n_paths, device=g.device).index_add_(0, flat, wa.reshape(-1)).reshape(n, n_paths)
    hist_w = torch.zeros(n * n_paths, device=g.device).index_add_(0, flat, (wa * g).reshape(-1)).reshape(n, n_paths)
    gram = (hist @ (d[:, :, None] * d[:, None, :]).reshape(n_paths, -1)).reshape(n, k_dim, k_dim)
    rhs = hist_w @ d  # [N, K]
    # widths b = 2..K use theta[:b]; entry k (0-based) is used by widths b >= max(2, k + 1)
    first = torch.clamp(torch.arange(k_dim) + 1, min=2) - 2  # index into lam of the first width using k
    tail = lam.flip(0).cumsum(0).flip(0)  # tail[w] = sum of lam over widths >= w
    m = gram * tail[torch.maximum(first[:, None], first[None, :])]
    r = rhs * tail[first]
    m, r, th = m.double(), r.double(), theta.double()
    mu = 1e-7 * m.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None] / k_dim
    new = torch.linalg.solve(m + mu * torch.eye(k_dim, dtype=torch.float64), r + mu[:, :, 0] * th).float()
    ok = torch.isfinite(new).all(1) & (new.abs().amax(1) < FP16_MAX / 2)
    return torch.where(ok[:, None], new, theta)


def _fit_residual(g: Tensor, max_bits: int, a: Tensor | None) -> tuple[Tensor, Tensor]:
    """Alternate codes and least-squares scalars from the msb start; round to float16; keep msb's fit for
    any group where it scores better (degenerate groups); finally make every group's error monotone."""
    theta0, codes0 = _fit_msb(g, max_bits)
    err0 = _width_errors(g, theta0, codes0, a)  # [N, widths]
    total = err0.sum(0)
    width_weight = _WIDTH_WEIGHT ** torch.arange(total.shape[0] - 1, -1, -1, dtype=torch.float32)
    lam = width_weight / total.clamp_min(total.max() * 1e-12 + 1e-30)
    theta, codes = theta0, codes0
    for _ in range(_RESIDUAL_ITERS):
        theta = _solve_scalars(g, codes, theta, lam, a)
        codes = _best_codes(g, theta, lam, codes)
    theta = _fp16(theta)
    codes = _best_codes(g, theta, lam, codes)
    theta0 = _fp16(theta0)  # msb plane scales are float16-exact unless subnormal
    worse = (_width_errors(g, theta, codes, a) * lam).sum(1) > (_width_errors(g, theta0, codes0, a) * lam).sum(1)
    theta = torch.where(worse[:, None], theta0, theta)
    codes = torch.where(worse[:, None], codes0, codes)
    return _monotone(g, theta, codes, a), codes


def _monotone(g: Tensor, theta: Tensor, codes: Tensor, a: Tensor | None) -> Tensor:
    """Per group, keep the error non-increasing as planes are added (refit or drop a plane that hurts).

    With residual r = w - W_{b-1} and plane scale s, err_b = err_{b-1} - 2 s c + s^2 S (c = sum a r sigma,
    S = sum a): the plane hurts iff s^2 S > 2 s c. Then s becomes c / S rounded to float16 if that helps,
    else 0 (the width repeats the previous one).
    """
    theta = theta.clone()
    q, signs = _path_signs(theta.shape[1], g.device)
    wa = torch.ones_like(g) if a is None else a
    big_s = wa.sum(1)
    r = g - theta[:, :1] - theta[:, 1:2] * q[codes]  # [N, gs] residual after the 2-bit base
    for k in range(2, theta.shape[1]):
        sigma = signs[codes, k - 2]
        c = (wa * r * sigma).sum(1)
        s = theta[:, k]
        bad = s * s * big_s > 2 * s * c
        if bad.any():
            best = _fp16(c / big_s.clamp_min(1e-30))
            fix = torch.where(best * best * big_s <= 2 * best * c, best, torch.zeros_like(best))
            theta[:, k] = s = torch.where(bad, fix, s)
        r = r - s[:, None] * sigma
    return theta


def _to_nested(theta: Tensor, codes: Tensor, out: int, n_in: int, max_bits: int) -> NestedWeight:
    """Group-level (theta, path codes) -> NestedWeight tensors."""
    n_groups = theta.shape[0] // out
    p = max_bits - 2
    codes = codes.reshape(out, n_in).to(torch.uint8)
    shifts = torch.tensor([max_bits - i for i in range(3, max_bits + 1)], dtype=torch.uint8)
    planes = ((codes[None] >> shifts[:, None, None]) & 1).bool()  # [P, out, in]
    return NestedWeight(
        offset=theta[:, 0].reshape(out, n_groups).contiguous(),
        base_scale=theta[:, 1].reshape(out, n_groups).contiguous(),
        base=codes >> p,
        plane_scales=theta[:, 2:].T.reshape(p, out, n_groups).contiguous(),
        planes=planes,
    )
