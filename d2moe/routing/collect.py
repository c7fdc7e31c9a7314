"""Calibration pass: what every width of every chosen expert would cost, token by token.

On calibration windows the model runs at the store's widest width, in fp32 and with autograd, and the
next-token loss is differentiated with respect to each MoE layer's output. To second order, adding an error
d to that output at token t raises the loss by 1/2 d^T F_t d, with F_t approximated by the squared gradient
(the empirical Fisher diagonal, as in HAWQ/GPTQ-style sensitivity). For each chosen expert k of token t and
each width b, d = gate_k * (E_b(x_t) - E_widest(x_t)) is computed exactly, so

    cost[t, k, b] = 1/2 * sum_h F_t[h] * d[h]^2

is the KL to the widest model that width b adds (summed over the window's tokens, so comparable across
layers). These costs train router two (`fit.py`) and give each expert's sensitivity and popularity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.engine.model import LoadedModel
from d2moe.models.dense import as_float
from d2moe.models.decoder import MoEDecoder
from d2moe.models.expert_provider import TensorExpert, TensorExpertProvider
from d2moe.models.moe import expert_runner, route_layer, weighted_expert
from d2moe.models.names import expert_name
from d2moe.quant.pack import dequantize_packed, unpack_expert


@dataclass(frozen=True)
class LayerRecord:
    """Calibration data of one MoE layer, every calibration token."""

    x: torch.Tensor  # [T, H] MoE inputs
    idx: torch.Tensor  # [T, k] chosen experts
    weight: torch.Tensor  # [T, k] gate weights
    cost: torch.Tensor  # [T, k, W] loss increase per width (0 at the widest)
    rel_err: torch.Tensor  # [T, k, W] |E_b(x) - E_widest(x)|^2 / |E_widest(x)|^2


def expert_matrices(model: LoadedModel, layer: int, expert: int, bits: int) -> tuple[torch.Tensor, ...]:
    """(w1, w3, w2) of one expert at `bits`, dequantized to fp32 from the store."""
    layout = model.reader.config.layout
    packed = unpack_expert(layout, model.reader.read_expert(layer, expert, bits), bits)
    return tuple(dequantize_packed(packed[n], bits) for n in ("w1", "w3", "w2"))


def _teacher(model: LoadedModel, widest: int) -> MoEDecoder:
    """The model at its widest width as an fp32, differentiable decoder (dense int8 dequantized)."""
    cfg = model.config
    dense = {k: as_float(v) for k, v in model.decoder.w.items()}
    tensors = {}
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            for name, m in zip(("w1", "w3", "w2"), expert_matrices(model, layer, e, widest)):
                tensors[expert_name(layer, e, name)] = m
    return MoEDecoder(cfg, dense, TensorExpertProvider(tensors))


@contextmanager
def deterministic() -> Iterator[None]:
    """torch's deterministic algorithms for the block: with two or more threads the backward pass's Fisher
    diagonals otherwise differ run to run (~1e-5), and router two, fitted on them, decides differently
    enough to move a tier's held-out perplexity by up to 0.4 %."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def collect(model: LoadedModel, windows: torch.Tensor, widths: list[int],
            progress: Callable[[str, int], None] | None = None) -> dict[int, LayerRecord]:
    """Per MoE layer: inputs, routing and the cost of every width, over `windows` [N, C] of token ids.
    Pass 1 runs the windows (forward + backward) keeping each layer's inputs and Fisher diagonals; pass 2
    dequantizes every expert once per width and prices all its tokens."""
    cfg = model.config
    widest = widths[-1]
    teacher = _teacher(model, widest)
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {L: [] for L in cfg.moe_layers}
    for window in windows:
        taps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def tap(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            probe = torch.zeros_like(y, requires_grad=True)  # its gradient is d loss / d (layer output)
            taps[layer] = (x.detach(), probe)
            return y + probe

        teacher.tap = tap
        tokens = window.view(1, -1)
        with torch.enable_grad(), deterministic():
            logits = teacher.run(tokens, teacher.new_cache(1, tokens.shape[1]), widest)
            loss = F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:], reduction="sum")
            loss.backward()
        teacher.tap = None
        for layer, (x, y) in taps.items():
            seen[layer].append((x.float(), y.grad.detach().float() ** 2))
        if progress:
            progress("windows", 1)
    records = {}
    with torch.no_grad():
        for layer, parts in seen.items():
            x, fisher = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            records[layer] = _record(model, teacher, layer, x, fisher, widths)
            if progress:
                progress("layers", 1)
    return records


def _record(model: LoadedModel, teacher: MoEDecoder, layer: int, x: torch.Tensor, fisher: torch.Tensor,
            widths: list[int]) -> LayerRecord:
    cfg, prefix = model.config, f"layers.{layer}."
    routing = route_layer(x, teacher.w, prefix, cfg)
    runner = expert_runner(teacher.w, prefix, cfg)  # experts that are not plain SwiGLU (GPT-OSS)
    T, k = routing.idx.shape
    cost = torch.zeros(T, k, len(widths))
    rel = torch.zeros(T, k, len(widths))
    for e in routing.idx.unique().tolist():
        t, slot = (routing.idx == e).nonzero(as_tuple=True)
        xe = x[t]
        gate = routing.weight[t, slot].float()[:, None]

        def out(mats: tuple[torch.Tensor, ...], e: int = e) -> torch.Tensor:
            """The expert's gate-weighted contribution to the layer output."""
            return weighted_expert(e, TensorExpert(dict(zip(("w1", "w3", "w2"), mats))), xe, gate, runner, cfg)

        full = out(tuple(teacher.provider.tensors[expert_name(layer, e, n)] for n in ("w1", "w3", "w2")))
        norm = full.pow(2).sum(-1).clamp_min(1e-30)
        for i, b in enumerate(widths[:-1]):
            d = out(expert_matrices(model, layer, e, b)) - full
            cost[t, slot, i] = 0.5 * (fisher[t] * d**2).sum(-1)
            rel[t, slot, i] = d.pow(2).sum(-1) / norm
    return LayerRecord(x, routing.idx, routing.weight.float(), cost, rel)


def token_windows(ids: list[int], context: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of `context` tokens from the first `max_tokens` ids: [N, context]."""
    n = min(len(ids), max_tokens) // context
    if n == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens; it needs at least one window of {context}")
    return torch.tensor(ids[: n * context]).view(n, context)
