// Dense fp16 matrices (the attention projections and head of an fp16-dense store) times fp32 activations.
//
// torch's CPU fp16 GEMM has no fast kernel: it rounds the activations to fp16 and costs time linear in the
// rows (the default model's 49K x 576 head: 3 ms for one row, 48 ms for 16; a batched decode step of 16
// sequences spent over half its time there). Here each weight is loaded once per tile of 4 output rows and
// converted to fp32 in registers (F16C), then used for 4 tokens at a time with fp32 FMAs: time grows with
// rows only through arithmetic (16 rows ~= 4x one, not 16x), and activations stay fp32 (more exact).
// Batch invariance (models/ragged.py): each (row, token) dot product is one fp32 accumulator per 16 columns
// in column order, then one fixed horizontal sum, whatever tile or token count it is computed in.
#pragma once

#include "mwq_common.h"
#include "mwq_float.h"

namespace {

#if defined(__AVX512F__)
// y[t * ldy + r] = sum_k w[r * K + k] * x[t * K + k] for R rows and TT tokens; K % 16 == 0.
template <int R, int TT>
void f16_tile(const uint16_t* w, int64_t K, const float* x, float* y, int64_t ldy) {
    __m512 acc[R][TT];
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + r * K + k)));
        for (int t = 0; t < TT; ++t) {
            const __m512 xv = _mm512_loadu_ps(x + t * K + k);
            for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) y[t * ldy + r] = hsum(acc[r][t]);
}

// R output rows starting at w against every token: tiles of 4 tokens, then one at a time. (Converting the
// rows to fp32 once per row tile instead is slower here: the FMAs, not the conversions, bound a 4x4 tile.)
template <int R>
void f16_rows(const uint16_t* w, int64_t K, const float* x, int64_t T, float* y, int64_t ldy) {
    int64_t t = 0;
    for (; T - t >= 4; t += 4) f16_tile<R, 4>(w, K, x + t * K, y + t * ldy, ldy);
    for (; t < T; ++t) f16_tile<R, 1>(w, K, x + t * K, y + t * ldy, ldy);
}
#endif

}  // namespace

// ---- blocked fp16: [N/16 blocks][K][16 rows] ----------------------------------------------------------------
// models/dense_f16.py `Float16Blocks`: the 16 rows of a block side by side per column, so a column's 16 weights are
// one load and each token's activation one broadcast: no horizontal sums, and a weight conversion is shared by
// every token of the tile (the row-major tiles above run ~27 G multiply-adds/s on one core from 4 tokens on,
// this ~50). Each (row, token) sums its columns in two chains, even and odd columns, added at the end: the
// same bits at any token count (batch invariance).
#if defined(__AVX512F__)
constexpr int64_t kF16Ahead = 8192;  // bytes ahead in the block stream (running on into the next block)
template <int TT>
void f16_block(const uint16_t* blk, int64_t K, const float* x, float* y, int64_t ldy, int rows) {
    __m512 a[TT], b[TT];
    for (int t = 0; t < TT; ++t) a[t] = b[t] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        _mm_prefetch((const char*)(blk + k * 16) + kF16Ahead, _MM_HINT_T1);  // one line per 2 columns: the stream
        const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + k * 16)));
        const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + k * 16 + 16)));
        for (int t = 0; t < TT; ++t) {
            a[t] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[t * K + k]), a[t]);
            b[t] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[t * K + k + 1]), b[t]);
        }
    }
    const __mmask16 keep = rows >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
    for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(y + t * ldy, keep, _mm512_add_ps(a[t], b[t]));
}
#endif
