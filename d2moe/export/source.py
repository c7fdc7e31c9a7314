"""A store opened for export at one width: dense tensors in float, each expert dequantized at that width.

Export reads experts the way the engine does (StoreReader: the b-bit prefix of each blob, CRC-checked) and
rebuilds W_b = z + s2*q + sum_i s_i*sigma_i in float32 (quant/pack.py's `dequantize_packed`, the definition
the engine's kernels are tested against), so an exported model computes what d2moe computes at that width.
"""

from __future__ import annotations

from pathlib import Path

import torch

from d2moe.config import ModelConfig
from d2moe.models.dense import Int8Matrix, dequantize_int8, load_dense
from d2moe.models.names import EXPERT_MATRICES, is_expert_name
from d2moe.quant.pack import PackedMatrix, dequantize_packed, unpack_expert
from d2moe.storage.format import DENSE_FILE, StoreConfig, StoreError
from d2moe.storage.reader import StoreReader

_EXPERT = "layers.{}.experts.{}.{}"


class ExportSource:
    """One store at one width. Experts are read one layer at a time (the packed prefixes of the layer being
    exported stay cached: fused layouts take every expert's w1 and w3 before any w2)."""

    def __init__(self, path: Path, bits: int) -> None:
        self.path = Path(path)
        self.reader = StoreReader(self.path)  # StoreError for a missing or damaged store
        lo, hi = self.reader.min_bits, self.reader.max_bits
        if not lo <= bits <= hi:
            self.reader.close()
            raise StoreError(f"{self.path} holds experts at {lo}..{hi} bits; --bits {bits} is not one of them")
        self.bits = bits
        try:
            stored = load_dense(self.path / DENSE_FILE, fuse=False)
        except FileNotFoundError:
            self.reader.close()
            raise StoreError(f"{self.path / DENSE_FILE}: missing; the store is incomplete") from None
        self.int8_dense = any(isinstance(t, Int8Matrix) for t in stored.values())
        self.dense: dict[str, torch.Tensor] = {
            n: dequantize_int8(t) if isinstance(t, Int8Matrix) else t for n, t in stored.items()}
        self._layer = -1
        self._packed: dict[int, dict[str, PackedMatrix]] = {}

    @property
    def config(self) -> StoreConfig:
        return self.reader.config

    @property
    def model(self) -> ModelConfig:
        return self.reader.config.model

    @property
    def dense_dtype(self) -> torch.dtype:
        """The dtype the store keeps its dense matrices in (torch.int8 for `convert --dense-dtype int8`)."""
        if self.int8_dense:
            return torch.int8
        return self.dense["embed"].dtype

    def names(self) -> list[str]:
        """Every canonical tensor of the model: the dense ones, then each expert's matrices."""
        m = self.model
        experts = [_EXPERT.format(L, e, w) for L in m.moe_layers for e in range(m.num_experts) for w in EXPERT_MATRICES]
        return list(self.dense) + experts

    def shape(self, name: str) -> tuple[int, ...]:
        if not is_expert_name(name):
            return tuple(self.dense[name].shape)
        matrix = name.rsplit(".", 1)[1]
        return next((o, i) for n, o, i in self.config.expert_shapes if n == matrix)

    def tensor(self, name: str) -> torch.Tensor:
        """A canonical tensor: dense as stored (int8 dequantized), experts in float32 at the export width."""
        if not is_expert_name(name):
            return self.dense[name]
        _, layer, _, expert, matrix = name.split(".")
        return dequantize_packed(self.packed(int(layer), int(expert))[matrix], self.bits)

    def packed(self, layer: int, expert: int) -> dict[str, PackedMatrix]:
        """The expert's matrices at the export width, as views of its packed prefix (read once per layer)."""
        if layer != self._layer:
            self._layer, self._packed = layer, {}
        if expert not in self._packed:
            buf = self.reader.read_expert(layer, expert, self.bits)
            self._packed[expert] = unpack_expert(self.config.layout, buf, self.bits)
        return self._packed[expert]

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> ExportSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
