"""End-to-end fine-tuning of router two against the widest model's next-token distribution.

The least-squares fit (`fit.py`) learns each width's cost from an additive, second-order estimate; the
decisions it makes interact across experts and layers in ways that estimate cannot see (it was measured
~2x off). This pass trains the router on what it is for, as the paper does: the KL from the widest model to
the model whose experts run at the router's widths, plus the bytes they read,

    loss = sum_t KL(p_widest(t) || p_routed(t)) + price * sum_{layer, t, k} E_q[bytes_b / bytes_widest]

with the argmin made soft: q[t,k,b] = softmax_b(-(c[t,k,b] / price + frac[b]) / tau), c the router's
predicted costs. One router serves every tier, so each window is trained at a price drawn log-uniformly
between the `high` and `fast` tiers' prices (the Lagrange multiplier of their byte budgets); the tiers are
re-calibrated afterwards. Expert outputs at every width come from the store's own dequantized prefixes, so
the student is exactly what the engine computes (up to fp32 vs the kernel's rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.engine.model import LoadedModel
from d2moe.models.layers import swiglu
from d2moe.models.moe import expert_runner, route_layer
from d2moe.routing.collect import _teacher, expert_matrices
from d2moe.routing.width_router import LayerRouter, WidthRouter


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 64  # one calibration window per step
    lr: float = 0.005
    tau: float = 0.05  # softness of the width choice, in units of the widest expert's byte fraction
    seed: int = 0


def _stacked_experts(model: LoadedModel, layer: int, widths: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Per expert: (w1, w3, w2) at every width below the widest, stacked [W-1, ...] (fp32)."""
    out = []
    for e in range(model.config.num_experts):
        mats = [expert_matrices(model, layer, e, b) for b in widths[:-1]]
        out.append(tuple(torch.stack([m[i] for m in mats]) for i in range(3)))
    return out


def soft_choice(log_cost: torch.Tensor, price: float, frac: torch.Tensor, tau: float) -> torch.Tensor:
    """log_cost [T,k,W] -> q [T,k,W]: the softened argmin_b cost_b + price * frac_b (ties to hard argmin
    as tau -> 0)."""
    score = log_cost.exp() / price + frac
    return (-score / tau).softmax(dim=-1)


def _width_delta(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, q: torch.Tensor,
                 experts: list[tuple[torch.Tensor, ...]], full: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """sum_k weight_k * sum_{b<widest} q_b * (E_b(x) - E_widest(x)): what the routed widths change in the
    layer's output. x [T,H], idx/weight [T,k], q [T,k,W]."""
    delta = torch.zeros_like(x)
    for e in idx.unique().tolist():
        t, slot = (idx == e).nonzero(as_tuple=True)
        xe = x[t]  # [n, H]
        w1, w3, w2 = experts[e]  # [W-1, I, H], [W-1, I, H], [W-1, H, I]
        h = F.silu(torch.einsum("nh,bih->bni", xe, w1)) * torch.einsum("nh,bih->bni", xe, w3)
        low = torch.einsum("bni,bhi->bnh", h, w2)  # [W-1, n, H]
        ref = swiglu(xe, *full[e])  # [n, H]
        mix = torch.einsum("nb,bnh->nh", q[t, slot, :-1], low - ref)
        delta = delta.index_add(0, t, weight[t, slot, None] * mix)
    return delta


def finetune(model: LoadedModel, router: WidthRouter, windows: torch.Tensor, prices: tuple[float, float],
             cfg: FinetuneConfig = FinetuneConfig(),
             progress: Callable[[str, int], None] | None = None) -> tuple[WidthRouter, list[dict]]:
    """Return a fine-tuned copy of `router` and the per-step log (kl, byte fraction, price)."""
    widths = router.widths.tolist()
    frac = router.byte_frac
    teacher = _teacher(model, widths[-1])
    if any(expert_runner(teacher.w, f"layers.{L}.", model.config) is not None for L in router.layers):
        raise ValueError("router-two fine-tuning supports plain SwiGLU experts only; calibrate without it")
    layers = sorted(router.layers)
    experts = {L: _stacked_experts(model, L, widths) for L in layers}
    full = {L: [expert_matrices(model, L, e, widths[-1]) for e in range(model.config.num_experts)]
            for L in layers}
    params = {L: {n: getattr(router.layers[L], n).clone().requires_grad_() for n in ("A", "B", "C", "v")}
              for L in layers}
    opt = torch.optim.Adam([p for d in params.values() for p in d.values()], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    lo, hi = math.log(min(prices)), math.log(max(prices))
    log: list[dict] = []
    for step in range(cfg.steps):
        tokens = windows[step % len(windows)].view(1, -1)
        price = math.exp(lo + (hi - lo) * float(torch.rand(1, generator=g)))
        with torch.no_grad():
            teacher.tap = None
            target = teacher.run(tokens, teacher.new_cache(1, tokens.shape[1]), widths[-1])[0, :-1].float()
        used = []

        def tap(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            p = params[layer]
            r = route_layer(x, teacher.w, f"layers.{layer}.", model.config)
            view = WidthRouter(router.widths, frac, {layer: LayerRouter(p["A"], p["B"], p["C"], p["v"])})
            q = soft_choice(view.log_costs(layer, x, r.idx, r.weight), price, frac, cfg.tau)  # [T, k, W]
            used.append((q * frac).sum(-1))  # [T, k]
            return y + _width_delta(x, r.idx, r.weight.float(), q, experts[layer], full[layer])

        teacher.tap = tap
        with torch.enable_grad():
            logits = teacher.run(tokens, teacher.new_cache(1, tokens.shape[1]), widths[-1])[0, :-1].float()
            kl = F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="sum")
            bytes_used = torch.stack([u.sum() for u in used]).sum()
            loss = kl + price * bytes_used
            opt.zero_grad()
            loss.backward()
            opt.step()
        teacher.tap = None
        n = sum(u.numel() for u in used)
        log.append({"step": step, "loss": float(loss.detach()), "kl_per_token": float(kl.detach()) / logits.shape[0],
                    "byte_frac": float(bytes_used.detach()) / n,
                    "price": price})
        if progress:
            progress("finetune", 1)
    tuned = {L: LayerRouter(*(params[L][n].detach().contiguous() for n in ("A", "B", "C", "v"))) for L in layers}
    return WidthRouter(router.widths, frac, tuned), log
