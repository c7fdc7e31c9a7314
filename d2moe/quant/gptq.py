"""Multi-width GPTQ in the msb layout: nested codes chosen against the layer's output error at every width.

The stored form is msb's exactly (pack.py and the kernels see no difference): per group an offset z and
base scale s2 = 64 s (float16), per weight one 8-bit code c, and the b-bit weight is the centre of bucket
c >> (8 - b) of 2^b equal buckets over [z - 32 s, z + 224 s]. Only the *values* differ from the `msb` fit:

* GPTQ (Frantar et al. 2022, as the D2MoE paper does for its base): columns are quantized in order and each
  column's error is pushed onto the columns not yet quantized through the inverse Hessian H = X^T X of the
  matrix's calibration inputs (upper Cholesky factor U of H^-1, lazy updates every BLOCK columns).
* Every width at once: the 8-bit code fixes all widths, so one compensated target T_b is kept per width
  (T_b absorbs only width b's errors: each width is its own GPTQ problem), and each column takes the code
  minimising sum_b lam_b (T_b - W_b(c))^2 among the codes of the per-width targets and of their lam-weighted
  mean. lam_b = base^(max_bits - b) / (msb's error at b) on this matrix: widths count relative to what
  plain msb achieves, low widths `base` times more per bit (base 1: no width favoured).
* A group's grid (z, s) is the clipped grid (quant/clip.py) of the lam-weighted mean target when the group
  is reached: the range [lo + a r, hi - b r] minimising the diag(H)-weighted error over every width, widths
  weighted with base CLIP_BASE = 3 (clip_base=None: msb's min/max grid, the fit before clipping).

Nesting stays exact by construction (one 8-bit code per weight, planes are its bits). Held-out Hamlet
perplexity (2,048 tokens) on the default model, min/max grids -> clipped grids: 2 bits 700 -> 168, 3 bits
90.2 -> 80.3, 4 bits 62.7 -> 62.4, 5 bits 58.9 -> 58.4, 6 bits 57.7 -> 58.4, 8 bits 60.3 -> 57.7 (msb: 1203,
116.4, 65.3, 59.9, 57.65, 58.2; README, "Fitting the nested codes").

`quantize_gptq` is the batched fast path; `quantize_gptq_reference` the slow textbook one (float64, one
matrix, explicit inverse-Hessian downdates after every column, no lazy blocks); tests compare them.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from d2moe.config import MWQConfig
from d2moe.quant.clip import CLIP_BASE, clip_grid
from d2moe.quant.mwq import NestedWeight, _check_weight, _fit_msb, _to_nested

DAMP = 0.01  # Hessian damping, fraction of the mean diagonal (GPTQ's default)
BLOCK = 16  # columns between lazy (GEMM) updates of the later columns
WIDTH_BASE = 2.0  # lam_b ~ WIDTH_BASE^(max_bits - b) / msb error at b


@lru_cache(maxsize=8)
def _code_values(max_bits: int) -> Tensor:
    """V[c, b - 2] = bucket centre of code c at width b, in units of the max_bits step: [2^max_bits, W]."""
    c = torch.arange(1 << max_bits, dtype=torch.float64)[:, None]
    step = 2.0 ** (max_bits - torch.arange(2, max_bits + 1, dtype=torch.float64))[None, :]
    return step * (torch.floor(c / step) + 0.5)


def _grid(g: Tensor, max_bits: int, a: Tensor, lam: Tensor | None) -> tuple[Tensor, Tensor]:
    """The grid of groups g [B, out, gs]: (z, s) [B, out] with lo = z - 32 s, float16-exact z and 64 s.
    lam [B, W] given: the clipped grid (quant/clip.py) weighted by a [B, gs] (the group's diag(H));
    None: msb's min/max grid."""
    B, out, gs = g.shape
    flat = g.reshape(-1, gs)
    if lam is None:
        theta, _ = _fit_msb(flat, max_bits)
        z, s = theta[:, 0], theta[:, 1] / 64
    else:
        z, s = clip_grid(flat, a[:, None, :].expand(B, out, gs).reshape(-1, gs),
                         lam[:, None, :].expand(B, out, lam.shape[1]).reshape(-1, lam.shape[1]), max_bits)
    return z.reshape(B, out), s.reshape(B, out)


def width_weights(w: Tensor, h: Tensor, cfg: MWQConfig, base: float = WIDTH_BASE) -> Tensor:
    """lam [B, W]: base^(max - b) / (msb's diag(H)-weighted squared error at width b), per matrix.
    w [B, out, in], h [B, in, in]."""
    from d2moe.quant.mwq import _width_errors

    B, out, n = w.shape
    gs = cfg.group_size
    a = h.diagonal(dim1=1, dim2=2).clamp_min(0)  # [B, in]
    lam = []
    for i in range(B):
        g = w[i].reshape(-1, gs)
        theta, codes = _fit_msb(g, cfg.max_bits)
        err = _width_errors(g, theta, codes, a[i].reshape(-1, gs).repeat(out, 1)).sum(0).double()  # [W]
        err = err.clamp_min(err.max() * 1e-12 + 1e-30)
        lam.append(base ** torch.arange(len(err) - 1, -1, -1, dtype=torch.float64) / err)
    lam = torch.stack(lam)
    return (lam / lam.sum(1, keepdim=True)).float()


def _inverse_factor(h: Tensor) -> Tensor:
    """Damped H [B, n, n] -> upper Cholesky factor U of H^-1 [B, n, n] float64."""
    h = h.double().clone()
    d = h.diagonal(dim1=1, dim2=2)
    dead = d <= 0
    # a column no calibration input reaches: H_jj = 1 and no cross terms, so it is rounded like msb and passes
    # no error on (GPTQ zeroes such weights; here they may still matter on other text)
    d[dead] = 1.0
    d += DAMP * d.mean(-1, keepdim=True)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _nested_from_codes(z: Tensor, s: Tensor, codes: Tensor, max_bits: int) -> NestedWeight:
    """msb grid (z, s) [out, G] + 8-bit codes [out, in] -> NestedWeight at max_bits (planes 3..max)."""
    out, n_in = codes.shape
    steps = [64 * s] + [s * 2.0 ** (7 - i) for i in range(3, max_bits + 1)]
    theta = torch.stack([z, *steps], dim=-1).reshape(-1, max_bits)
    return _to_nested(theta, (codes.long() >> (8 - max_bits)).reshape(-1, n_in // z.shape[1]), out, n_in, max_bits)


def quantize_gptq(w: Tensor, h: Tensor, cfg: MWQConfig, base: float = WIDTH_BASE,
                  clip_base: float | None = CLIP_BASE) -> list[NestedWeight]:
    """Matrices w [B, out, in] with input Hessians h [B, in, in] -> B NestedWeights in the msb layout.
    `clip_base` weighs the widths of the clipped grid search (None: msb's min/max grids)."""
    for i in range(w.shape[0]):
        _check_weight(w[i], cfg, None)
    B, out, n = w.shape
    gs, mb = cfg.group_size, cfg.max_bits
    n_w = mb - 1
    w = w.detach().float()
    lam = width_weights(w, h, cfg, base)  # [B, W]
    clam = None if clip_base is None else width_weights(w, h, cfg, clip_base)  # [B, W] of the grid search
    hdiag = h.diagonal(dim1=1, dim2=2).clamp_min(0).float()  # [B, n]
    u = _inverse_factor(h).float()
    ut = u.transpose(1, 2).contiguous()  # [B, n, n]: ut[b, k, j] = U[b, j, k]
    vtab = _code_values(mb).float()  # [2^mb, W] bucket centres in units of the max_bits step
    top = (1 << mb) - 1
    # one target per width, column-major: column j is the contiguous block T[j] [B, out, W]
    T = w.permute(2, 0, 1)[..., None].repeat(1, 1, 1, n_w)  # [n, B, out, W]
    lam_c = lam[:, None, :]  # [B, 1, W]
    lam_k = lam[:, None, None, :]  # [B, 1, 1, W]
    n_g = n // gs
    Z, S = torch.empty(B, out, n_g), torch.empty(B, out, n_g)
    codes = torch.empty(n, B, out, dtype=torch.int64)
    for gi in range(n_g):
        g0 = gi * gs
        mean = (T[g0 : g0 + gs] * lam_c).sum(-1).permute(1, 2, 0)  # [B, out, gs] lam-weighted mean target
        z, s = _grid(mean, mb, hdiag[:, g0 : g0 + gs], clam)
        Z[..., gi], S[..., gi] = z, s
        unit = s * 2.0 ** (8 - mb)  # code step at max_bits, [B, out]
        live = (unit > 0)[..., None]  # [B, out, 1]; dead groups keep code 0 (W_b = z)
        lo = (z - 32 * s)[..., None]  # [B, out, 1]
        safe = torch.where(live, unit[..., None], torch.ones_like(lo))
        for c0 in range(g0, g0 + gs, BLOCK):
            c1 = min(c0 + BLOCK, g0 + gs)
            errs = torch.empty(c1 - c0, B, out, n_w)
            for j in range(c0, c1):
                x = (T[j] - lo) / safe  # [B, out, W] targets in code units
                xm = (x * lam_c).sum(-1, keepdim=True)
                cand = torch.cat([x, xm], -1).floor_().clamp_(0, top).long()  # [B, out, K = W + 1]
                score = ((vtab[cand] - x[:, :, None, :]) ** 2 * lam_k).sum(-1)  # [B, out, K]
                c = cand.gather(-1, score.argmin(-1, keepdim=True)).masked_fill_(~live, 0)[..., 0]  # [B, out]
                codes[j] = c
                e = (x - vtab[c]).mul_(safe * live / u[:, j, j, None, None])  # [B, out, W] error / U_jj
                errs[j - c0] = e
                if j + 1 < c1:
                    T[j + 1 : c1] -= ut[:, j + 1 : c1, j].T[:, :, None, None] * e
            if c1 < n:  # every later column at once: one batched GEMM per block
                upd = torch.bmm(ut[:, c1:, c0:c1], errs.permute(1, 0, 2, 3).reshape(B, c1 - c0, -1))
                T[c1:] -= upd.reshape(B, n - c1, out, n_w).transpose(0, 1)  # [n - c1, B, out, W]
    codes = codes.permute(1, 2, 0)  # [B, out, n]
    return [_nested_from_codes(Z[i], S[i], codes[i], mb) for i in range(B)]


def quantize_gptq_reference(w: Tensor, h: Tensor, cfg: MWQConfig, base: float = WIDTH_BASE,
                            clip_base: float | None = CLIP_BASE) -> NestedWeight:
    """Slow reference of `quantize_gptq` for one matrix w [out, in], h [in, in]: float64, the inverse Hessian
    downdated explicitly after each column (OBS), all targets updated after every column, codes scored among
    the same candidates (each width's floor code and the lam-weighted mean's). Codes can differ from the fast
    path only at near-ties (float32 vs float64, lazy vs eager updates)."""
    _check_weight(w, cfg, None)
    out, n = w.shape
    gs, mb = cfg.group_size, cfg.max_bits
    lam = width_weights(w[None].float(), h[None], cfg, base)[0].double()  # [W]
    clam = None if clip_base is None else width_weights(w[None].float(), h[None], cfg, clip_base)
    hdiag = h.diagonal().clamp_min(0).float()[None]  # [1, n]
    hd = h.double().clone()
    d = hd.diagonal()
    dead = d <= 0
    d[dead] = 1.0
    d += DAMP * d.mean()
    hinv = torch.linalg.inv(hd)
    vtab = _code_values(mb)  # [2^mb, W]
    T = w.double()[None].repeat(mb - 1, 1, 1)  # [W, out, n]
    Z, S = torch.empty(out, n // gs), torch.empty(out, n // gs)
    codes = torch.empty(out, n, dtype=torch.int64)
    for j in range(n):
        if j % gs == 0:
            z, s = _grid(torch.einsum("woj,w->oj", T[:, :, j : j + gs], lam).float()[None], mb,
                         hdiag[:, j : j + gs], clam)
            z, s = z[0], s[0]
            Z[:, j // gs], S[:, j // gs] = z, s
            unit = (s * 2.0 ** (8 - mb)).double()
            lo = (z - 32 * s).double()
            live = unit > 0
        x = (T[:, :, j].T - lo[:, None]) / torch.where(live, unit, 1.0)[:, None]  # [out, W] in code units
        cand = torch.cat([x, (x * lam).sum(-1, keepdim=True)], -1).floor().clamp(0, (1 << mb) - 1).long()
        score = ((vtab[cand] - x[:, None, :]) ** 2 * lam).sum(-1)  # [out, K]
        c = torch.where(live, cand.gather(-1, score.argmin(-1, keepdim=True))[:, 0], 0)
        codes[:, j] = c
        e = torch.where(live[:, None], T[:, :, j].T - lo[:, None] - unit[:, None] * vtab[c], 0.0).T  # [W, out]
        T -= e[:, :, None] * (hinv[j] / hinv[j, j])[None, None, :]  # columns < j have hinv[j, k] = 0
        hinv = hinv - torch.outer(hinv[:, j], hinv[j]) / hinv[j, j]  # remove column j (OBS downdate)
    return _nested_from_codes(Z, S, codes, mb)
