"""Per-expert input Hessians for GPTQ, collected layer by layer from the source model on calibration text.

All calibration windows run as one batch through the unquantized (fp32) source model. At each MoE layer the
provider below computes every expert on the tokens routed to it, accumulating H = X^T X of the inputs of w1
and w3 (the layer's hidden states, [H, H]) and of w2 (the SwiGLU activations, [I, I]); when the layer is done
it hands the layer's Hessians to `on_layer`, which quantizes and writes that layer's experts before the next
layer runs. So at most one layer's experts and Hessians are in memory, and the converter's (layer, expert)
write order is kept. The stream that reaches later layers is the fp32 teacher's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig
from d2moe.models.decoder import MoEDecoder
from d2moe.models.expert_provider import Demand, ReadyBatch

log = logging.getLogger(__name__)

WINDOW = 256  # tokens per calibration window
LayerHessians = dict[int, tuple[torch.Tensor, torch.Tensor]]  # expert -> (H of w1/w3 [H, H], H of w2 [I, I])


def calibration_windows(tokenizer_file: Path, texts: list[Path], n_tokens: int, window: int = WINDOW) -> torch.Tensor:
    """About `n_tokens` tokens of `texts` as non-overlapping windows [n, window], spread evenly over all of
    them (deterministic)."""
    from tokenizers import Tokenizer

    if not Path(tokenizer_file).is_file():
        raise FileNotFoundError(f"{tokenizer_file}: GPTQ calibration needs the checkpoint's tokenizer.json")
    tok = Tokenizer.from_file(str(tokenizer_file))
    pool = []
    for path in texts:
        ids = torch.tensor(tok.encode(Path(path).read_text(encoding="utf-8", errors="replace"),
                                      add_special_tokens=False).ids, dtype=torch.long)
        pool.append(ids[: ids.numel() // window * window].view(-1, window))
    pool_t = torch.cat(pool) if pool else torch.empty(0, window, dtype=torch.long)
    if pool_t.shape[0] == 0:
        raise ValueError(f"calibration texts hold fewer than {window} tokens")
    n = max(1, min(pool_t.shape[0], n_tokens // window))
    pick = torch.linspace(0, pool_t.shape[0] - 1, n).round().long()
    return pool_t[pick]


class _HessianProvider:
    """ExpertProvider over fp32 source experts that accumulates each expert's input Hessians."""

    def __init__(self, cfg: ModelConfig, get_expert: Callable[[int, int], tuple[torch.Tensor, ...]],
                 on_layer: Callable[[int, LayerHessians], None]) -> None:
        self.cfg, self.get_expert, self.on_layer = cfg, get_expert, on_layer

    def experts(self, layer: int, demands: list[Demand], hold: bool = False) -> Iterator[ReadyBatch]:
        hess: LayerHessians = {}
        batch: ReadyBatch = []
        for expert, bits, _ in demands:
            w1, w3, w2 = self.get_expert(layer, expert)

            def fn(x: torch.Tensor, w1=w1, w3=w3, w2=w2, expert=expert) -> torch.Tensor:
                a = F.silu(x @ w1.T) * (x @ w3.T)  # [T, I]
                h_in, h_mid = x.T @ x, a.T @ a
                if expert in hess:
                    h_in, h_mid = hess[expert][0] + h_in, hess[expert][1] + h_mid
                hess[expert] = (h_in, h_mid)
                return a @ w2.T

            batch.append((expert, bits, fn))
        yield batch
        # the block has run every expert of this layer: quantize it before the next layer
        H, I = self.cfg.hidden_size, self.cfg.expert_intermediate
        for e in range(self.cfg.num_experts):
            hess.setdefault(e, (torch.zeros(H, H), torch.zeros(I, I)))  # no calibration token chose it
        self.on_layer(layer, hess)

    def wants_prefetch(self, layer: int, bits: int) -> bool:
        return False

    def prefetch(self, layer: int, demands: list[Demand]) -> None:
        pass


@torch.inference_mode()
def collect_hessians(
    cfg: ModelConfig,
    dense: dict[str, torch.Tensor],
    get_expert: Callable[[int, int], tuple[torch.Tensor, ...]],
    windows: torch.Tensor,
    on_layer: Callable[[int, LayerHessians], None],
) -> None:
    """Run `windows` [n, T] through the fp32 model (`dense` weights, experts from `get_expert(layer, e)` ->
    (w1, w3, w2) float32) and call `on_layer(layer, hessians)` for every MoE layer, in order."""
    seen: list[int] = []

    def record(layer: int, hess: LayerHessians) -> None:
        seen.append(layer)
        on_layer(layer, hess)

    decoder = MoEDecoder(cfg, dense, _HessianProvider(cfg, get_expert, record))
    decoder.forward(windows, decoder.new_cache(windows.shape[0], windows.shape[1]), 8, last_only=True)
    if seen != list(cfg.moe_layers):
        raise RuntimeError(f"calibration pass visited MoE layers {seen}, expected {list(cfg.moe_layers)}")
