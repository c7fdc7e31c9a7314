// Dense per-row int8 matrices (models/dense.py `Int8Matrix`: W ~= q * scale[:, None], q int8 [N, K], scale
// bf16 [N]) times a few tokens, for decode: the attention projections and the head of an int8-dense store.
//
// torch's `_weight_int8pack_mm` converts every weight to bf16 and runs ~8 G weights/s on one core here. This
// kernel quantizes the activations to int16 per 64-column group (as the msb expert kernel does: relative
// error ~1e-4 per product, below the bf16 activations torch uses) and multiplies the sign-extended int8
// weights with VNNI int16 multiply-adds: 64 weights per load, two conversions and two multiply-adds.
// Each token's arithmetic is the same at any token count (token tiles share only the weight loads), so
// calls split at any size give every token the same bits (batch invariance, models/ragged.py).
#pragma once

#include "mwq_common.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// y[t * ldy] = scale * sum_g sx[t, g] * sum_{j in g} q[j] * x16[t, j] for TT tokens; K % 64 == 0, gs = 64.
template <int TT>
void int8_row_dot(const int8_t* q, float scale, int64_t K, const QuantX& x, float* y, int64_t ldy) {
    const int64_t G = K / 64;
    __m512 out[TT];
    for (int t = 0; t < TT; ++t) out[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const __m512i w = _mm512_loadu_si512(q + g * 64);
        const __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(w));
        const __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(w, 1));
        for (int t = 0; t < TT; ++t) {
            const int16_t* xt = x.x16 + t * K + g * 64;
            __m512i acc = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xt));
            acc = _mm512_dpwssd_epi32(acc, hi, _mm512_loadu_si512(xt + 32));
            out[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(x.sx[t * G + g]), out[t]);
        }
    }
    for (int t = 0; t < TT; ++t) y[t * ldy] = hsum(out[t]) * scale;
}
#endif

}  // namespace
