// Dense int8 matrices with a scale per row and 64 columns (models/dense.py `Int8Blocks`), times activations
// quantized to int8 per token and 64 columns: llama.cpp's Q8_0 x Q8_0 product, with VNNI byte multiply-adds.
//
// The fp16 blocked kernel (mwq_f16_dense.h) is bound by fp32 FMAs from a few tokens on (16 multiply-adds per
// instruction); one u8 x s8 multiply-add instruction does 64, and the weights are half the bytes. The
// default model's 49K x 576 head, one core: 16 tokens 8.4 -> 3.0 ms, one token 2.1 -> 1.1 ms.
//
// Layout: blocks [ceil(N/16)][K/4][16][4] uint8 (weight + 128: the unsigned operand of vpdpbusd), so 4 columns
// of 16 rows are one 64-byte load and a token's 4 int8 activations one 32-bit broadcast; scales
// [ceil(N/16)][K/64][16] bf16 (as stored). Per 64 columns: acc = sum (w + 128) x8 = sum w x8 + 128 sum x8,
// exact in int32; the second term is subtracted exactly, then y += float(acc) * (w_scale * x_scale), one
// fused multiply-add per group in column order. Every step depends only on the token's own row, so a token
// gets the same bits at any token count (batch invariance, models/ragged.py).
#pragma once

#include <cmath>
#include <cstring>
#include <limits>

#include "mwq_common.h"

namespace {

constexpr int64_t kQ8Group = 64;

// x [T, K] fp32 -> x8 [T, K] int8 (round to nearest even of x * (127 / amax)), sx [T, K/64] = amax / 127,
// cx [T, K/64] = 128 * sum x8. amax 0: zeros and scale 0. A non-finite amax gives a NaN scale (propagates).
void quantize_q8(const float* x, int64_t T, int64_t K, int8_t* x8, float* sx, int32_t* cx) {
    const int64_t G = K / kQ8Group;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
            const float* xg = x + t * K + g * kQ8Group;
            int8_t* qg = x8 + t * K + g * kQ8Group;
            float amax = 0.f;
#if defined(__AVX512F__)
            __m512 vmax = _mm512_setzero_ps();
            __mmask16 nan = 0;  // max_ps drops NaNs: a NaN counts as an infinite amax
            for (int64_t j = 0; j < kQ8Group; j += 16) {
                const __m512 v = _mm512_loadu_ps(xg + j);
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
                nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            }
            amax = nan ? INFINITY : _mm512_reduce_max_ps(vmax);
#else
            for (int64_t j = 0; j < kQ8Group; ++j)
                amax = std::isnan(xg[j]) ? INFINITY : std::fmax(amax, std::fabs(xg[j]));
#endif
            int32_t sum = 0;
            if (amax > 0.f && std::isfinite(amax)) {
                const float inv = 127.f / amax;  // |x * inv| <= 127 (rounded): no clamp needed
#if defined(__AVX512F__)
                __m512i vsum = _mm512_setzero_si512();
                for (int64_t j = 0; j < kQ8Group; j += 16) {  // round to nearest even (MXCSR default)
                    const __m512i q32 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + j), _mm512_set1_ps(inv)));
                    _mm_storeu_si128((__m128i*)(qg + j), _mm512_cvtsepi32_epi8(q32));
                    vsum = _mm512_add_epi32(vsum, q32);
                }
                sum = _mm512_reduce_add_epi32(vsum);
#else
                for (int64_t j = 0; j < kQ8Group; ++j) {
                    qg[j] = (int8_t)std::nearbyint(xg[j] * inv);
                    sum += qg[j];
                }
#endif
                sx[t * G + g] = amax / 127.f;
            } else {
                for (int64_t j = 0; j < kQ8Group; ++j) qg[j] = 0;
                sx[t * G + g] = std::isfinite(amax) ? 0.f : std::numeric_limits<float>::quiet_NaN();
            }
            cx[t * G + g] = 128 * sum;
        }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr int64_t kQ8Ahead = 4096;  // bytes ahead in the block stream

// One block of 16 rows against TT tokens: y[t * ldy + r] for r < rows.
template <int TT>
void q8_block(const uint8_t* blk, const uint16_t* ws, int64_t K, const int8_t* x8, const float* sx, const int32_t* cx,
              float* y, int64_t ldy, int rows) {
    const int64_t G = K / kQ8Group;
    __m512 out[TT];
    for (int t = 0; t < TT; ++t) out[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m512i acc[TT];
        for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_si512();
        const uint8_t* wg = blk + g * kQ8Group * 16;  // the group's 16 column quads, 64 bytes each
        for (int64_t k = 0; k < kQ8Group / 4; ++k) {
            _mm_prefetch((const char*)(wg + k * 64) + kQ8Ahead, _MM_HINT_T1);
            const __m512i w = _mm512_loadu_si512(wg + k * 64);
            for (int t = 0; t < TT; ++t) {
                int32_t quad;
                std::memcpy(&quad, x8 + t * K + g * kQ8Group + 4 * k, 4);
                acc[t] = _mm512_dpbusd_epi32(acc[t], w, _mm512_set1_epi32(quad));
            }
        }
        const __m512 wsv = _mm512_castsi512_ps(  // 16 bf16 scales -> fp32 (exact)
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(ws + g * 16))), 16));
        for (int t = 0; t < TT; ++t) {
            const __m512i exact = _mm512_sub_epi32(acc[t], _mm512_set1_epi32(cx[t * G + g]));
            out[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(wsv, _mm512_set1_ps(sx[t * G + g])),
                                     out[t]);
        }
    }
    const __mmask16 keep = rows >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
    for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(y + t * ldy, keep, out[t]);
}
#endif

}  // namespace
