"""Router two: per token and chosen expert, a predicted cost for every width; a byte price picks the width.

What it predicts: c[t,k,b], the expected increase of the next-token loss (KL to the full-width model, to
second order: the Fisher-weighted squared error the width adds to the layer's output) if the k-th expert
token t chose runs at width b instead of the store's widest. Predicted in log space from the token's MoE
input x_t, the expert's gate weight and the expert's identity (per layer):

    log c[t,k,:] = (x_t A) B[e_k] + C[e_k] + w_k v            A [H, r], B [E, r, W], C [E, W], v [W]

Choosing: width b* = argmin_b c[t,k,b] + price * bytes[b] / bytes[widest]. Losses and bytes add up over
tokens, experts and layers, so one price is the Lagrange multiplier of one byte budget: a request's tier is
just its price (calibrated per tier on calibration text, `tiers.py`), and tokens with different prices run
in one batch. Price 0 always picks the widest width (cost 0 there by definition); a large price the
narrowest. The per-token overhead is one [H, r] matvec per MoE layer plus [k, r, W] products.

Floor: at a price where the router alone averages b bits or more, no chosen expert runs below b
(`floor_prices`, set by `d2moe calibrate`: routing/fit.py `with_floors`). The costs are fitted, not exact,
and a cheap-looking drop to 2-3 bits was what cost most: on the default model the floor took `balanced`
from +10.3 % to +6.5 % perplexity at about the same bytes (README, "Width choice at equal bytes").
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from d2moe.models.dense_f16 import contiguous_f32
from d2moe.quant.kernels.cpu import WidthRuleLayer, load_kernel, width_rule_layer

ROUTER_FILE = "width_router.safetensors"
_EXP_MAX = 709.0  # math.exp raises above ~709.78 where torch and C give inf


def layer_log_costs(z: torch.Tensor, B: torch.Tensor, C: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """z = x A [T,r], B [E,r,W], C [E,W], v [W], idx/weight [T,k] -> (z B[e] + C[e] + w v) [T,k,W]. Every
    expert's row is computed ([T,r] @ [r,E*W]) and the chosen ones gathered: cheaper, forward and backward,
    than gathering B per (token, expert) ([T,k,r,W]; `layer_log_costs_reference`)."""
    T, (E, r, W), k = z.shape[0], B.shape, idx.shape[1]
    every = (z @ B.permute(1, 0, 2).reshape(r, E * W)).view(T, E, W) + C  # [T, E, W]
    return every.gather(1, idx[..., None].expand(T, k, W)) + weight[..., None] * v


def layer_log_costs_reference(z, B, C, v, idx, weight) -> torch.Tensor:
    return torch.einsum("tr,tkrw->tkw", z, B[idx]) + C[idx] + weight[..., None] * v


@dataclass(frozen=True)
class LayerRouter:
    A: torch.Tensor  # [H, r]
    B: torch.Tensor  # [E, r, W]
    C: torch.Tensor  # [E, W]
    v: torch.Tensor  # [W]

    @cached_property
    def every_expert(self) -> torch.Tensor:
        """B as one [r, E*W] matrix (`layer_log_costs` reshapes it per call; decode reuses this copy)."""
        E, r, W = self.B.shape
        return self.B.permute(1, 0, 2).reshape(r, E * W).contiguous()

    @cached_property
    def plain(self) -> tuple[list[list[float]], list[float]]:
        """C and v as Python lists, for the one-token path."""
        return self.C.tolist(), self.v.tolist()


@dataclass(frozen=True)
class WidthRouter:
    widths: torch.Tensor  # [W] int64, ascending; the last is the store's widest
    byte_frac: torch.Tensor  # [W] bytes of an expert at each width / bytes at the widest
    layers: dict[int, LayerRouter]  # by model layer index
    # [W] float64, non-increasing: at price p no chosen expert runs below widths[i] while p <= floor_prices[i]
    # (floor_prices[0] = inf); None: no floor (routers calibrated before floors)
    floor_prices: torch.Tensor | None = None

    def floor_of(self, price: torch.Tensor) -> torch.Tensor:
        """price [T] -> the narrowest width router two may choose at each price [T]."""
        if self.floor_prices is None:
            return self.widths[torch.zeros_like(price, dtype=torch.int64)]
        n = (price.float().double()[:, None] <= self.floor_prices[None, :]).sum(-1)
        return self.widths[(n - 1).clamp(min=0)]

    def _floor_one(self, price: float) -> int:
        """`floor_of` for one price, compared as float32 as the batched path's price tensors hold it, so both
        paths floor a token alike."""
        if self.floor_prices is None:
            return int(self.widths[0])
        _, widths = self._plain
        p = array("f", (price,))[0]
        return widths[max(sum(p <= f for f in self._floors) - 1, 0)]

    @cached_property
    def _floors(self) -> list[float]:
        return [] if self.floor_prices is None else self.floor_prices.tolist()

    def log_costs(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [T,H] (the MoE block's input), idx/weight [T,k] -> predicted log cost [T,k,W]; cost at the
        widest width is pinned to 0 (exp(-inf))."""
        p = self.layers[layer]
        out = layer_log_costs(x.float() @ p.A, p.B, p.C, p.v, idx, weight.float())  # [T, k, W]
        out[..., -1] = float("-inf")
        return out

    def choose(self, log_cost: torch.Tensor, price: torch.Tensor) -> torch.Tensor:
        """log_cost [T,k,W], price [T] (>= 0) -> widths [T,k]: argmin of cost + price * byte fraction."""
        total = log_cost.exp() + price.view(-1, 1, 1) * self.byte_frac
        chosen = self.widths[total.argmin(dim=-1)]
        return chosen if self.floor_prices is None else torch.maximum(chosen, self.floor_of(price)[:, None])

    def one_token(self, layer: int, x: torch.Tensor, idx: list[int], weight: list[float], price: float,
                  cap: int) -> list[int]:
        """Decode's fast path of `widths_for` (capped at `cap`) for one token x [1,H]: the kernel library's
        one-call rule (~8 us with its glue), else two small matmuls and k*W scalars in Python (`one_token_reference`, ~13
        us; 28 calls a token were ~4 % of a decode step). Decisions equal `widths_for`'s except at ties within
        float32 rounding (tested against it)."""
        kernel = load_kernel()
        if kernel is not None:
            xf = contiguous_f32(x.reshape(-1))
            out = kernel.width_rule(self._kernel_layers[layer], xf, idx, weight, price, cap)
            if out is not None:
                floor = self._floor_one(price)
                return [min(max(w, floor), cap) for w in out] if floor > self.widths[0] else out
        return self.one_token_reference(layer, x, idx, weight, price, cap)

    def rows(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, price: torch.Tensor,
             cap: torch.Tensor) -> torch.Tensor:
        """`one_token` for every row of x [T,H] (idx/weight [T,k], price [T] >= 0, cap [T]) -> [T,k] int64, each
        row exactly as `one_token` gives it: a batched step's decode rows in one call of the kernel library's
        rule (per row ~8 us of Python glue saved), else row by row."""
        kernel = load_kernel()
        out = None
        if kernel is not None:
            out = kernel.width_rule_rows(self._kernel_layers[layer], contiguous_f32(x), idx.contiguous(),
                                         weight.float().contiguous(), price.double().contiguous(),
                                         cap.to(torch.int64).contiguous())
        if out is None:
            return torch.tensor([self.one_token(layer, x[t : t + 1], idx[t].tolist(), weight[t].tolist(),
                                                float(price[t]), int(cap[t])) for t in range(x.shape[0])],
                                dtype=torch.int64).view(idx.shape)
        if self.floor_prices is not None:
            floors = torch.tensor([self._floor_one(p) for p in price.tolist()], dtype=torch.int64)
            out = torch.minimum(torch.maximum(out, floors[:, None]), cap.to(torch.int64)[:, None])
        return out

    def one_token_reference(self, layer: int, x: torch.Tensor, idx: list[int], weight: list[float], price: float,
                            cap: int) -> list[int]:
        """`one_token` in Python: two small matmuls, then k*W scalars instead of ~15 tensor ops."""
        p = self.layers[layer]
        row = ((x.float() @ p.A) @ p.every_expert).view(-1).tolist()  # [E*W]
        C, v = p.plain
        frac, widths = self._plain
        W = len(widths)
        last = price * frac[-1]  # the widest width's cost is 0 by definition
        floor = self._floor_one(price)
        out = []
        for e, g in zip(idx, weight):
            best, choice, ce, base = last, W - 1, C[e], e * W
            for j in range(W - 1):
                t = row[base + j] + ce[j] + g * v[j]
                c = (math.exp(t) if t < _EXP_MAX else math.inf) + price * frac[j]  # torch's exp overflows to inf
                if c < best or (c == best and j < choice):
                    best, choice = c, j
            out.append(min(max(widths[choice], floor), cap))
        return out

    @cached_property
    def _kernel_layers(self) -> dict[int, WidthRuleLayer]:
        """Each layer's tensors for the kernel's rule, built once; `_kernel_tensors` keeps them alive."""
        return {layer: width_rule_layer(*tensors) for layer, tensors in self._kernel_tensors.items()}

    @cached_property
    def _kernel_tensors(self) -> dict[int, tuple[torch.Tensor, ...]]:
        frac, widths = self.byte_frac.double().contiguous(), self.widths.to(torch.int64).contiguous()
        return {layer: (p.A.float().contiguous(), p.every_expert.float().contiguous(), p.C.float().contiguous(),
                        p.v.float().contiguous(), frac, widths) for layer, p in self.layers.items()}

    @cached_property
    def _plain(self) -> tuple[list[float], list[int]]:
        return self.byte_frac.tolist(), self.widths.tolist()

    def widths_for(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                   price: torch.Tensor) -> torch.Tensor:
        return self.choose(self.log_costs(layer, x, idx, weight), price)

    # ---- files ---------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        tensors = {"widths": self.widths, "byte_frac": self.byte_frac}
        if self.floor_prices is not None:
            tensors["floor_prices"] = self.floor_prices.contiguous()
        for layer, p in self.layers.items():
            for name in ("A", "B", "C", "v"):
                tensors[f"layers.{layer}.{name}"] = getattr(p, name).contiguous()
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: Path) -> WidthRouter:
        t = load_file(str(path))
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in t.items():
            if key.startswith("layers."):
                _, layer, name = key.split(".")
                layers.setdefault(int(layer), {})[name] = value.float()
        floors = t["floor_prices"].double() if "floor_prices" in t else None
        return cls(t["widths"].long(), t["byte_frac"].float(), {k: LayerRouter(**v) for k, v in layers.items()},
                   floors)


def load_width_router(store: Path) -> WidthRouter | None:
    f = Path(store) / ROUTER_FILE
    return WidthRouter.load(f) if f.is_file() else None
