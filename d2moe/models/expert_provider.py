"""The interface between the MoE block and wherever expert weights live.

The block states its demand set for a layer, a list of (expert, bits, tokens), and consumes experts in
batches, in the order the provider makes them ready (resident ones first), like mixtral-offloading's
`load_experts` generator: a batch is everything ready now, so a decode step can run it in one kernel call
while the provider's loader keeps reading. A provider may hand back an expert at a lower width than
demanded (graceful degradation); the block does not need to know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from d2moe.models.layers import linear, swiglu
from d2moe.models.names import expert_name

# x [T, H] float32 -> y [T, H] float32; providers' experts also offer project(matrix, x) (one matrix)
ExpertFn = Callable[[torch.Tensor], torch.Tensor]
Demand = tuple[int, int, int]  # (expert, bits, tokens that chose it at that width)
ReadyBatch = list[tuple[int, int, ExpertFn]]  # (expert, demanded bits, fn) for every expert ready now
PREFETCH_MAX_TOKENS = 4  # next-layer predictions only in decode-sized steps (a prefill needs every expert)


def weighted_sum(fns: list[ExpertFn], weights: list[float], x: torch.Tensor) -> torch.Tensor:
    """sum_i weights[i] * fns[i](x). Expert types may offer `run_many(fns, weights, x)` to do it in one
    call (the CPU kernel runs a layer's experts in one parallel region); it returns None to decline."""
    many = getattr(type(fns[0]), "run_many", None) if fns else None
    if many is not None and (y := many(fns, weights, x)) is not None:
        return y
    out = torch.zeros_like(x)
    for fn, w in zip(fns, weights):
        out.add_(fn(x), alpha=w)
    return out


class ExpertProvider(Protocol):
    def experts(self, layer: int, demands: list[Demand], hold: bool = False) -> Iterator[ReadyBatch]:
        """Yield batches covering every demanded (expert, bits) exactly once, in ready order. A batch's
        functions stay valid until the generator resumes, or with `hold` until it is exhausted."""
        ...

    def wants_prefetch(self, layer: int, bits: int) -> bool:
        """Whether a prediction for `layer` could help (False: skip computing it)."""
        ...

    def prefetch(self, layer: int, demands: list[Demand]) -> None:
        """A hint: `layer` will probably demand these soon (providers without I/O ignore it)."""
        ...

    def warm(self, predictions: list[tuple[int, list[Demand]]]) -> None:
        """After a prefill: read ahead what the first decode step will probably demand, layer by layer."""
        ...


class TensorExpert:
    """One unquantized expert: called, it is the SwiGLU FFN; `project` applies one of its matrices (for
    experts that are not plain SwiGLU, see models/moe.py `expert_runner`)."""

    def __init__(self, w: dict[str, torch.Tensor]) -> None:
        self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w["w1"], self.w["w3"], self.w["w2"])

    def project(self, matrix: str, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.w[matrix])


class TensorExpertProvider:
    """Unquantized experts held as float tensors (the reference path; `bits` is ignored)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def experts(self, layer: int, demands: list[Demand], hold: bool = False) -> Iterator[ReadyBatch]:
        batch: ReadyBatch = []
        for expert, bits, _ in demands:
            w = {m: self.tensors[expert_name(layer, expert, m)] for m in ("w1", "w3", "w2")}
            batch.append((expert, bits, TensorExpert(w)))
        yield batch

    def wants_prefetch(self, layer: int, bits: int) -> bool:
        return False

    def prefetch(self, layer: int, demands: list[Demand]) -> None:
        pass

    def warm(self, predictions: list[tuple[int, list[Demand]]]) -> None:
        pass
