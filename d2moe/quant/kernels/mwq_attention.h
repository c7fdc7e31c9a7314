// Decode attention: one new query per sequence against that sequence's cached keys and values, every
// sequence of a batched step and every head in one call (models/ragged.py; the single-request decoder's
// one-token steps too).
//
// A batched step of 16 sequences called torch's SDPA 16 times per layer on ~60 positions each: ~35 us a call,
// almost all of it dispatch (16 x 30 layers = 480 calls, ~17 ms of a 131 ms step). Here each (sequence,
// head) is scores = scale * q.k_j over its own length, a max-subtracted softmax (exp in AVX-512) and the
// weighted sum of values, in a fixed order: a sequence's result never depends on the others in the call
// (batch invariance). Grouped-query attention maps head h to kv head h / (nH / nKV).
#pragma once

#include "mwq_common.h"

namespace {

#if defined(__AVX512F__)
// e^x for 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' expf
// coefficients), times 2^n. Relative error ~2 ulp; x below -87 gives 0 (the softmax's masked tail).
inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// out[0..Dv) = softmax_j(scale * q.k_j) v_j over j < L; k rows of Dk floats, v rows of Dv (both % 16 == 0).
// scores: L floats of scratch.
inline void attend_one(const float* q, const float* k, const float* v, int64_t L, int64_t Dk, int64_t Dv,
                       float scale, float* scores, float* out) {
    float m = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dk; d += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + j * Dk + d), acc);
        scores[j] = hsum(acc) * scale;
        m = scores[j] > m ? scores[j] : m;
    }
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= L; j += 16) {
        const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(m)));
        _mm512_storeu_ps(scores + j, p);
        sum = _mm512_add_ps(sum, p);
    }
    if (j < L) {
        const __mmask16 t = (__mmask16)((1u << (L - j)) - 1);
        const __m512 p = _mm512_maskz_mov_ps(t, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, scores + j),
                                                                      _mm512_set1_ps(m))));
        _mm512_mask_storeu_ps(scores + j, t, p);
        sum = _mm512_add_ps(sum, p);
    }
    const float inv = 1.f / hsum(sum);
    for (int64_t d = 0; d < Dv; d += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < L; ++i)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[i]), _mm512_loadu_ps(v + i * Dv + d), acc);
        _mm512_storeu_ps(out + d, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
    }
}
#endif

}  // namespace
