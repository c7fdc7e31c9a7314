"""Fast CPU expert compute from packed (compressed) MWQ bytes, with the torch path as fallback.

Few tokens: one C call runs the whole SwiGLU expert straight from the bit-planes, so the weights stream once
from the cache's compressed bytes and no float copy of the expert is made. The fastest kernels (msb up to 256
tokens, or any count on byte codes; residual up to 3) quantize the activations to int16 per weight group:
relative output error ~1e-4 per matrix (~4e-4 for a whole expert), well under the 8-bit weight error of
~5e-3; `exact=True` keeps float activations. More tokens (or SMALL_T for the other kernels): the C kernel
decodes blocks of rows to a float32 scratch and a BLAS GEMM does the rest. See mwq_cpu.cpp for the kernels.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from d2moe.quant.kernels.build import load_library
from d2moe.quant.codes import can_hold_codes
from d2moe.quant.kernels.reference import expert_ffn_reference
from d2moe.quant.mwq import check_bits
from d2moe.quant.pack import PackedMatrix, dequantize_packed

DECODE_BLOCK = 1 << 20  # weights decoded to float32 at a time for a many-token product (4 MiB scratch)
SMALL_T = 16  # tokens up to which the fused register kernel beats decode + GEMM (benchmarks/kernels.py)
# (the msb kernel further: up to the kernel's invariant token count, see BoundExpert)
# an expert held as byte codes (quant/codes.py): the code kernel at any count (576 x 192 at 256 tokens: 1.4 ms
# against 2.0 for decode + GEMM; 576 x 1536: 9.2 against 16.8; one core)
CODES_T = 1 << 30
_P = ctypes.c_void_p


class _MwqMat(ctypes.Structure):
    """Mirror of `struct MwqMat` in mwq_cpu.cpp."""

    _fields_ = [
        ("offset", _P),
        ("base_scale", _P),
        ("base", _P),
        ("scales", _P * 6),
        ("planes", _P * 6),
        ("out", ctypes.c_int64),
        ("in_", ctypes.c_int64),
        ("group_size", ctypes.c_int64),
        ("codes", ctypes.c_int64),
    ]


class WidthRuleLayer(ctypes.Structure):
    """Mirror of `struct WidthRuleLayer` in mwq_cpu.cpp: one width-router layer's tensors, built once
    (`width_rule_layer`); the tensors must outlive it (the caller keeps them)."""

    _fields_ = [("A", _P), ("M", _P), ("C", _P), ("v", _P), ("frac", _P), ("widths", _P), ("H", ctypes.c_int64),
                ("r", ctypes.c_int64), ("E", ctypes.c_int64), ("W", ctypes.c_int64)]


def width_rule_layer(A: Tensor, M: Tensor, C: Tensor, v: Tensor, frac: Tensor, widths: Tensor) -> WidthRuleLayer:
    """A [H, r], M [r, E*W], C [E, W], v [W] fp32 contiguous; frac [W] float64; widths [W] int64."""
    (H, r), (E, W) = A.shape, C.shape
    ok = all(t.is_contiguous() and t.dtype == torch.float32 for t in (A, M, C, v))
    if not ok or frac.dtype != torch.float64 or widths.dtype != torch.int64 or tuple(M.shape) != (r, E * W):
        raise ValueError("width_rule_layer: A, M, C, v contiguous fp32, frac float64, widths int64, M [r, E*W]")
    return WidthRuleLayer(A.data_ptr(), M.data_ptr(), C.data_ptr(), v.data_ptr(), frac.data_ptr(),
                          widths.data_ptr(), H, r, E, W)


def _mat(pm: PackedMatrix) -> _MwqMat:
    ptrs = pm.data_ptrs
    n_scales = len(pm.plane_scales)
    m = _MwqMat(ptrs[0], ptrs[1], ptrs[2])
    m.scales[:n_scales] = ptrs[3 : 3 + n_scales]
    m.planes[: len(pm.planes)] = ptrs[3 + n_scales :]
    m.out, m.in_, m.group_size, m.codes = pm.out_features, pm.in_features, pm.group_size, int(pm.codes)
    return m


def _as_input(x: Tensor, features: int) -> Tensor:
    """The C side reads x as a dense float32 [T, features] array: check, never guess."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] != features or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU float32 [T, {features}] tensor, got {x.dtype} {tuple(x.shape)}")
    return x.contiguous()


@dataclass(frozen=True)
class CpuKernel:
    """The compiled library behind a typed interface; stateless apart from the immutable handle."""

    lib: ctypes.CDLL

    def __post_init__(self) -> None:
        vp, i32, i64 = _P, ctypes.c_int, ctypes.c_int64
        self.lib.mwq_matmul.argtypes = [vp, i32, vp, i64, vp, i32, i32]
        self.lib.mwq_decode.argtypes = [vp, i32, vp, i32]
        self.lib.mwq_decode_rows.argtypes = [vp, i32, i64, i64, vp, i32]
        self.lib.mwq_experts_ffn.argtypes = [i32, vp, i32, vp, i64, vp, vp, vp, i32, i32]
        self.lib.mwq_spans_ffn.argtypes = [i32, vp, vp, vp, i64, vp, vp, vp, vp, i32]
        self.lib.mwq_invariant_tokens.argtypes = [vp, i32]
        self.lib.mwq_to_codes.argtypes = [vp, i32]
        self.lib.mwq_int8_linear.argtypes = [vp, vp, i64, i64, vp, i64, vp, i32]
        self.lib.mwq_rms_norm.argtypes = [vp, vp, i64, i64, ctypes.c_float, vp]
        self.lib.mwq_f16_linear.argtypes = [vp, i64, i64, vp, i64, vp, i32]
        self.lib.mwq_f16_blocks_linear.argtypes = [vp, i64, i64, vp, i64, vp, i32]
        self.lib.mwq_q8_blocks_linear.argtypes = [vp, vp, i64, i64, vp, i64, vp, i32]
        self.lib.mwq_width_rule_rows.argtypes = [vp, vp, i64, vp, vp, i64, vp, vp, vp]
        self.lib.mwq_f32_rows_linear.argtypes = [vp, i64, i64, vp, i64, vp]
        self.lib.mwq_width_rule.argtypes = [vp, vp, vp, vp, i64, ctypes.c_double, i64, vp]
        self.lib.mwq_decode_attention.argtypes = [vp, i64, i64, i64, i64, i64, vp, i64, i64, vp, i64, i64, vp, vp,
                                                  ctypes.c_float, vp, i32]
        self.lib.mwq_decode_rope_attention.argtypes = [vp, i64, i64, i64, i64, vp, vp, vp, i64, i64, vp, i64, i64,
                                                       vp, vp, i64, ctypes.c_float, vp, i32]
        for f in (self.lib.mwq_matmul, self.lib.mwq_decode, self.lib.mwq_decode_rows, self.lib.mwq_experts_ffn,
                  self.lib.mwq_spans_ffn,
                  self.lib.mwq_invariant_tokens, self.lib.mwq_int8_linear, self.lib.mwq_rms_norm,
                  self.lib.mwq_f16_linear, self.lib.mwq_f16_blocks_linear, self.lib.mwq_q8_blocks_linear,
                  self.lib.mwq_decode_attention, self.lib.mwq_width_rule_rows, self.lib.mwq_f32_rows_linear,
                  self.lib.mwq_width_rule,
                  self.lib.mwq_to_codes, self.lib.mwq_decode_rope_attention):
            f.restype = i32
        object.__setattr__(self, "_avx512", bool(self.lib.mwq_has_avx512()))  # asked once, not per expert

    @property
    def avx512(self) -> bool:
        return self._avx512

    def supports(self, pm: PackedMatrix) -> bool:
        """The AVX-512 path needs 16-column chunks inside a group; the portable one 8."""
        return pm.group_size % (16 if self.avx512 else 8) == 0

    def matmul(self, x: Tensor, pm: PackedMatrix, bits: int, exact: bool = False) -> Tensor:
        """x [T, in] float32 @ W_bits^T -> [T, out]."""
        check_bits(bits, pm.bits)
        x = _as_input(x, pm.in_features)
        y = torch.empty(x.shape[0], pm.out_features, dtype=torch.float32)
        m = _mat(pm)
        threads = torch.get_num_threads()
        rc = self.lib.mwq_matmul(ctypes.byref(m), bits, x.data_ptr(), x.shape[0], y.data_ptr(), int(exact), threads)
        if rc:
            raise ValueError(f"{pm.name}: unsupported by the CPU kernel (code {rc})")
        return y

    def int8_linear(self, x: Tensor, q: Tensor, scale: Tensor) -> Tensor | None:
        """x [T, K] float32 (contiguous) @ (q * scale[:, None])^T -> [T, N] float32 for a per-row int8 matrix
        (q int8 [N, K] contiguous, scale bfloat16 [N]), T <= 64; None where this build or shape has no kernel
        (no AVX-512 VNNI, K % 64 != 0): the caller keeps torch's. Few-token decode only."""
        N, K = q.shape
        y = torch.empty(x.shape[0], N, dtype=torch.float32)
        rc = self.lib.mwq_int8_linear(q.data_ptr(), scale.data_ptr(), N, K, x.data_ptr(), x.shape[0], y.data_ptr(),
                                      torch.get_num_threads())
        return None if rc else y

    def f16_linear(self, x: Tensor, w: Tensor) -> Tensor | None:
        """x [T, K] float32 (contiguous) @ w^T -> [T, N] float32 for a contiguous float16 w [N, K], weights
        converted in registers and activations kept fp32; the same bits for a token at any T. None where this
        build or shape has no kernel (no AVX-512, K % 16 != 0): the caller keeps torch's."""
        N, K = w.shape
        y = torch.empty(x.shape[0], N, dtype=torch.float32)
        rc = self.lib.mwq_f16_linear(w.data_ptr(), N, K, x.data_ptr(), x.shape[0], y.data_ptr(),
                                     torch.get_num_threads())
        return None if rc else y

    def f16_blocks_linear(self, x: Tensor, blocks: Tensor, rows: int) -> Tensor | None:
        """x [T, K] float32 (contiguous) @ W^T -> [T, rows] float32 for fp16 blocks [ceil(rows/16), K, 16] (see
        models/dense_f16.py `Float16Blocks`). None where this build has no kernel: the caller keeps the reference."""
        K = blocks.shape[1]
        y = torch.empty(x.shape[0], rows, dtype=torch.float32)
        rc = self.lib.mwq_f16_blocks_linear(blocks.data_ptr(), rows, K, x.data_ptr(), x.shape[0], y.data_ptr(),
                                            torch.get_num_threads())
        return None if rc else y

    def q8_blocks_linear(self, x: Tensor, blocks: Tensor, scales: Tensor, rows: int) -> Tensor | None:
        """x [T, K] float32 (contiguous) @ W^T -> [T, rows] float32 for int8 blocks (uint8 [ceil(rows/16), K/4,
        16, 4], weight + 128) with bf16 scales [ceil(rows/16), K/64, 16] (see models/dense.py `Int8Blocks`);
        activations quantized to int8 per 64 columns. None where this build has no kernel (no AVX-512 VNNI)."""
        K = blocks.shape[1] * 4
        y = torch.empty(x.shape[0], rows, dtype=torch.float32)
        rc = self.lib.mwq_q8_blocks_linear(blocks.data_ptr(), scales.data_ptr(), rows, K, x.data_ptr(), x.shape[0],
                                           y.data_ptr(), torch.get_num_threads())
        return None if rc else y

    def decode_attention(self, q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, lengths: Tensor,
                         scale: float) -> Tensor | None:
        """One query per sequence against its cached keys/values, all in one call: q [n, nH, Dk] fp32
        (contiguous); keys [slots, nKV, max_len, Dk] and values [.., Dv] fp32 with contiguous rows (views
        of a cache are fine); slots, lengths int64 [n] -> [n, nH, Dv]. None where this build or shape has
        no kernel (the caller keeps SDPA)."""
        n, nH, Dk = q.shape
        nKV, Dv = keys.shape[1], values.shape[3]
        if keys.stride(3) != 1 or values.stride(3) != 1 or keys.stride(2) != Dk or values.stride(2) != Dv:
            return None
        out = torch.empty(n, nH, Dv, dtype=torch.float32)
        rc = self.lib.mwq_decode_attention(
            q.data_ptr(), n, nH, nKV, Dk, Dv, keys.data_ptr(), keys.stride(0), keys.stride(1), values.data_ptr(),
            values.stride(0), values.stride(1), slots.data_ptr(), lengths.data_ptr(), scale, out.data_ptr(),
            torch.get_num_threads())
        return None if rc else out

    def decode_rope_attention(self, qkv: Tensor, nH: int, nKV: int, cos: Tensor, sin: Tensor, keys: Tensor,
                              values: Tensor, slots: list[int], positions: list[int], scale: float) -> Tensor | None:
        """Decode rows' attention in one call: row i of qkv [n, (nH + 2 nKV) D] fp32 contiguous is one new
        token of cache slot slots[i] at positions[i]; q and k rotated (cos, sin_signed tables [P, D] of Rope,
        contiguous), k and v written into keys / values [slots, nKV, max_len, D] fp32 (rows contiguous),
        attention over positions[i] + 1 positions -> [n, nH * D]. The same bits as rotate, the cache writes
        and decode_attention one by one; None where this build or shape has no kernel."""
        n, D = qkv.shape[0], keys.shape[3]
        if (keys.stride(3) != 1 or values.stride(3) != 1 or keys.stride(2) != D or values.stride(2) != D
                or values.shape[3] != D or cos.shape[-1] != D):
            return None
        out = torch.empty(n, nH * D, dtype=torch.float32)
        rc = self.lib.mwq_decode_rope_attention(
            qkv.data_ptr(), n, nH, nKV, D, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), keys.stride(0),
            keys.stride(1), values.data_ptr(), values.stride(0), values.stride(1), (ctypes.c_int64 * n)(*slots),
            (ctypes.c_int64 * n)(*positions), keys.shape[2], scale, out.data_ptr(), torch.get_num_threads())
        return None if rc else out

    def width_rule(self, layer: WidthRuleLayer, x: Tensor, idx: list[int], weight: list[float], price: float,
                   cap: int) -> list[int] | None:
        """Router two's widths for one token in one call (`WidthRouter.one_token`): x [H] fp32 contiguous;
        `layer` from `width_rule_layer`. None if refused (rank > 256, an expert index out of range)."""
        k = len(idx)
        out = (ctypes.c_int64 * k)()
        rc = self.lib.mwq_width_rule(ctypes.byref(layer), x.data_ptr(), (ctypes.c_int64 * k)(*idx),
                                     (ctypes.c_double * k)(*weight), k, price, cap, out)
        return None if rc else list(out)

    def width_rule_rows(self, layer: WidthRuleLayer, x: Tensor, idx: Tensor, weight: Tensor, price: Tensor,
                        cap: Tensor) -> Tensor | None:
        """`width_rule` for T tokens in one call, each row's widths exactly the one-token call's: x [T, H] fp32,
        idx [T, k] int64, weight [T, k] fp32, price [T] float64, cap [T] int64 (all contiguous) -> [T, k]
        int64. None if refused."""
        T, k = idx.shape
        out = torch.empty(T, k, dtype=torch.int64)
        rc = self.lib.mwq_width_rule_rows(ctypes.byref(layer), x.data_ptr(), T, idx.data_ptr(), weight.data_ptr(), k,
                                          price.data_ptr(), cap.data_ptr(), out.data_ptr())
        return None if rc else out

    def f32_rows_linear(self, x: Tensor, w: Tensor) -> Tensor:
        """x [T, K] fp32 contiguous @ w^T for a contiguous fp32 w [N, K] -> [T, N], each entry one dot product
        in a fixed order: the same bits for a row at any T (routers of a batched step, in one call)."""
        y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        self.lib.mwq_f32_rows_linear(w.data_ptr(), w.shape[0], w.shape[1], x.data_ptr(), x.shape[0], y.data_ptr())
        return y

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """RMSNorm of contiguous fp32 x [..., H] with fp32 weight [H] in one call (the sum of squares in
        double); `models.layers.rms_norm_reference` is the definition."""
        out = torch.empty_like(x)
        H = x.shape[-1]
        self.lib.mwq_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // H, H, eps, out.data_ptr())
        return out

    def can_hold_codes(self, pm: PackedMatrix) -> bool:
        """An 8-plane msb matrix this build has a byte-code kernel for (quant/codes.py)."""
        return can_hold_codes(pm) and not self.lib.mwq_to_codes(ctypes.byref(_mat(pm)), 1)

    def to_codes(self, pm: PackedMatrix) -> PackedMatrix | None:
        """Hold an 8-plane msb matrix as byte codes, in place; None (and nothing written) where this build
        or shape has no byte-code kernel."""
        if not can_hold_codes(pm):
            return None
        m = _mat(pm)
        return None if self.lib.mwq_to_codes(ctypes.byref(m), 0) else replace(pm, codes=True)

    def invariant_tokens(self, pm: PackedMatrix, bits: int) -> int:
        """Most tokens per call that still give each token the bits it gets alone (see mwq_cpu.cpp)."""
        m = _mat(pm)
        return int(self.lib.mwq_invariant_tokens(ctypes.byref(m), bits))

    def decode(self, pm: PackedMatrix, bits: int, rows: tuple[int, int] | None = None) -> Tensor:
        """W_bits as float32 [out, in], or its rows [a, b) (same values as dequantize_packed, up to float
        rounding)."""
        check_bits(bits, pm.bits)
        a, b = rows if rows is not None else (0, pm.out_features)
        w = torch.empty(max(b - a, 0), pm.in_features, dtype=torch.float32)
        m = _mat(pm)
        if self.lib.mwq_decode_rows(ctypes.byref(m), bits, a, b, w.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"{pm.name}: unsupported by the CPU kernel (or rows {a}:{b} out of range)")
        return w

    def experts_ffn(self, bits: int, mats: list[int], weights: Tensor, x: Tensor, inter: int,
                    exact: bool = False) -> Tensor:
        """sum_e weights[e] * SwiGLU_e(x) in one call, for few tokens (x [T, H] float32, checked).

        `mats`: addresses of the (w1, w3, w2) structs of each expert, kept alive by the caller.
        """
        n, t = len(mats) // 3, x.shape[0]
        act = torch.empty(n, t, inter, dtype=torch.float32)
        y = torch.empty(t, x.shape[1], dtype=torch.float32)
        rc = self.lib.mwq_experts_ffn(
            n, (ctypes.c_void_p * len(mats))(*mats), bits, x.data_ptr(), t, weights.data_ptr(), act.data_ptr(),
            y.data_ptr(), int(exact), torch.get_num_threads(),
        )
        if rc:
            raise ValueError(f"expert shapes unsupported by the CPU kernel (code {rc})")
        return y

    def spans_ffn(self, mats: list[int], bits: list[int], spans: list[int], x: Tensor, w: Tensor, y: Tensor,
                  inter: int) -> None:
        """y[a:e] = w[a:e, None] * expert_s(x[a:e]) for every span s = (spans[2s], spans[2s+1]) in one call:
        expert s is mats[3s:3s+3] (addresses of its w1, w3, w2 structs, kept alive by the caller) at bits[s].
        x [N, H], y [N, H] float32 contiguous, w [N] float32; spans disjoint, rows outside them untouched."""
        n = len(bits)
        act = torch.empty(sum(spans[1::2]) - sum(spans[::2]), inter, dtype=torch.float32)
        rc = self.lib.mwq_spans_ffn(
            n, (ctypes.c_void_p * len(mats))(*mats), (ctypes.c_int * n)(*bits), (ctypes.c_int64 * (2 * n))(*spans),
            x.shape[0], x.data_ptr(), w.data_ptr(), act.data_ptr(), y.data_ptr(), torch.get_num_threads(),
        )
        if rc:
            raise ValueError(f"expert shapes or spans unsupported by the CPU kernel (code {rc})")

    def expert_ffn(self, x: Tensor, packed: dict[str, PackedMatrix], bits: int, exact: bool = False) -> Tensor:
        """Whole SwiGLU expert for few tokens in one call (x [T, H] float32); shapes as expert_ffn checks."""
        structs = [_mat(packed[n]) for n in ("w1", "w3", "w2")]
        x = _as_input(x, packed["w1"].in_features)
        addrs = [ctypes.addressof(m) for m in structs]
        return self.experts_ffn(bits, addrs, torch.ones(1), x, packed["w1"].out_features, exact)


class BoundExpert:
    """One expert's packed matrices bound to the kernel at one width: checks and C structs done once.

    A decode step calls ~k experts per layer; building the ctypes structs and re-validating shapes on every
    call cost ~20 % of a step for the default model. The cache keeps one per resident (expert, width).
    """

    def __init__(self, packed: dict[str, PackedMatrix], bits: int, kernel: CpuKernel | None,
                 small_t: int = SMALL_T) -> None:
        self.packed, self.bits, self.kernel, self.small_t = packed, bits, kernel, small_t
        mats = [packed[n] for n in ("w1", "w3", "w2")]
        for pm in mats:
            check_bits(bits, pm.bits)
        self.hidden, self.inter = mats[0].in_features, mats[0].out_features
        self.fast = kernel is not None and all(kernel.supports(pm) for pm in mats)
        if self.fast:
            self._structs = [_mat(pm) for pm in mats]  # kept alive: the addresses below point into them
            self._addrs = [ctypes.addressof(m) for m in self._structs]
            self._unit = torch.ones(1)
        # batching invariance (engine/runner.py): calls of at most this many tokens give each token the result
        # it gets alone; the torch fallback's fp32 GEMM depends on the row count, so it runs a token at a time
        kernel_t = min(kernel.invariant_tokens(pm, bits) for pm in mats) if self.fast else 1
        if self.fast and kernel_t > small_t:  # the msb kernel: one kind up to kernel_t tokens, faster than GEMM
            self.small_t = small_t = kernel_t
        self.invariant_tokens = min(kernel_t, small_t) if self.fast else 1
        if self.fast and all(pm.codes for pm in mats):  # no decode to amortise: the code kernel further up
            self.small_t = max(small_t, CODES_T)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.fast:  # no compiler, or a group size the kernel does not handle
            return expert_ffn_reference(_as_input(x, self.hidden), self.packed, self.bits)
        if x.shape[0] > self.small_t:
            return expert_ffn(x, self.packed, self.bits, self.kernel, self.small_t)
        return self.kernel.experts_ffn(self.bits, self._addrs, self._unit, _as_input(x, self.hidden), self.inter)

    def project(self, matrix: str, x: Tensor) -> Tensor:
        """x [T, in] @ W^T [T, out] for one of the expert's matrices at its width: the pieces experts
        that are not plain SwiGLU are computed from (models/moe.py `expert_runner`)."""
        pm = self.packed[matrix]
        x = _as_input(x, pm.in_features)
        if not self.fast:
            return F.linear(x, dequantize_packed(pm, self.bits))
        if x.shape[0] > self.small_t:
            y = torch.empty(x.shape[0], pm.out_features, dtype=torch.float32)
            for a, b in row_blocks(pm):
                y[:, a:b] = F.linear(x, self.kernel.decode(pm, self.bits, (a, b)))
            return y
        return self.kernel.matmul(x, pm, self.bits)

    @staticmethod
    def run_many(experts: list[BoundExpert], weights: list[float], x: Tensor) -> Tensor | None:
        """sum_e weights[e] * experts[e](x) in one kernel call (one parallel region for the layer), or None
        when the experts cannot share a call (mixed widths or kernels, torch path, too many tokens)."""
        first = experts[0] if experts else None
        if first is None or not all(
            isinstance(e, BoundExpert) and e.fast and e.kernel is first.kernel and e.bits == first.bits
            and e.hidden == first.hidden and e.inter == first.inter for e in experts
        ) or x.shape[0] > first.small_t:
            return None
        addrs = [a for e in experts for a in e._addrs]
        w = torch.tensor(weights, dtype=torch.float32)
        return first.kernel.experts_ffn(first.bits, addrs, w, _as_input(x, first.hidden), first.inter)

    @staticmethod
    def run_spans(pieces: list[tuple[BoundExpert, int, int]], xs: Tensor, ws: Tensor, ys: Tensor) -> bool:
        """ys[a:e] = ws[a:e] * fn(xs[a:e]) for every (fn, a, e) piece, bit for bit as one call per piece,
        in as few kernel calls as the scratch bound allows (a layer's experts share one parallel region).
        xs, ys [N, H] and ws [N, 1] float32 contiguous. False (nothing written) when the pieces cannot share
        a call: torch path, mixed kernels or shapes, a piece beyond its expert's few-token kernel."""
        first = pieces[0][0] if pieces else None
        if first is None or not all(
            isinstance(fn, BoundExpert) and fn.fast and fn.kernel is first.kernel and fn.hidden == first.hidden
            and fn.inter == first.inter and e - a <= fn.small_t for fn, a, e in pieces
        ) or not all(t.is_contiguous() and t.dtype == torch.float32 for t in (xs, ws, ys)):
            return False
        rows_per_call = max(1, DECODE_BLOCK // first.inter)  # the [rows, I] activations stay ~4 MiB
        start = 0
        while start < len(pieces):
            stop, rows = start, 0
            while stop < len(pieces) and (stop == start or rows + pieces[stop][2] - pieces[stop][1] <= rows_per_call):
                rows += pieces[stop][2] - pieces[stop][1]
                stop += 1
            part = pieces[start:stop]
            first.kernel.spans_ffn([m for fn, _, _ in part for m in fn._addrs], [fn.bits for fn, _, _ in part],
                                   [v for _, a, e in part for v in (a, e)], xs, ws, ys, first.inter)
            start = stop
        return True


@cache
def load_kernel(cache_dir: Path | None = None, march: str = "native") -> CpuKernel | None:
    """The compiled CPU kernel (built once into `cache_dir`), or None if it cannot be built. Memoised: the
    handle is immutable, so hot paths (dense matmuls, norms) may ask for it on every call."""
    lib = load_library(cache_dir, march)
    return None if lib is None else CpuKernel(lib)


def expert_ffn(
    x: Tensor,
    packed: dict[str, PackedMatrix],
    bits: int,
    kernel: CpuKernel | None = None,
    small_t: int = SMALL_T,
    exact: bool = False,
) -> Tensor:
    """SwiGLU expert y = w2 @ (silu(w1 @ x) * (w3 @ x)) from packed bytes; x [T, H] float32 -> [T, H].

    `kernel` defaults to the compiled CPU kernel; without one (no compiler, or a group size it does not
    handle) this is the torch path: dequantize to float32 and F.linear. `exact` keeps float activations
    on the few-token path.
    """
    mats = [packed[n] for n in ("w1", "w3", "w2")]  # views validated when the PackedMatrix was made
    for pm in mats:
        check_bits(bits, pm.bits)
    h, i = mats[0].in_features, mats[0].out_features
    if (mats[1].out_features, mats[1].in_features, mats[2].out_features, mats[2].in_features) != (i, h, h, i):
        raise ValueError("w1/w3 must be [I, H] and w2 [H, I]")
    x = _as_input(x, h)
    kernel = kernel if kernel is not None else load_kernel()
    if kernel is None or not all(kernel.supports(pm) for pm in mats):
        return expert_ffn_reference(x, packed, bits)
    if x.shape[0] <= small_t:
        return kernel.expert_ffn(x, packed, bits, exact)
    hid = torch.empty(x.shape[0], i, dtype=torch.float32)
    for a, b in row_blocks(mats[0]):  # gate and up rows of a block, then the down projection's row blocks
        hid[:, a:b] = F.silu(F.linear(x, kernel.decode(mats[0], bits, (a, b)))) * F.linear(
            x, kernel.decode(mats[1], bits, (a, b)))
    y = torch.empty(x.shape[0], h, dtype=torch.float32)
    for a, b in row_blocks(mats[2]):
        y[:, a:b] = F.linear(hid, kernel.decode(mats[2], bits, (a, b)))
    return y


def row_blocks(pm: PackedMatrix, weights: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of about `weights` weights each: a many-token product decodes one such block to float32
    at a time, so its scratch is bounded (4 MiB) whatever the expert's size (a 2048 x 5632 expert decoded
    whole needs 138 MiB, more than a quarter of a tight budget)."""
    rows = max(1, (weights or DECODE_BLOCK) // pm.in_features)
    return [(a, min(a + rows, pm.out_features)) for a in range(0, pm.out_features, rows)]
