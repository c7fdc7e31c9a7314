// Float kernels: decode 16 (portable: 8) columns in registers per masked add per plane, then FMA with a
// tile of up to 8 tokens (row_dot), or store the decoded row (row_decode, for prefill GEMMs).
#pragma once

#include "mwq_common.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool kAvx512 = true;

inline float hsum(__m512 v) {  // (gcc 12's _mm512_reduce_add_ps trips -Wuninitialized)
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4e));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4e));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xb1));
    return _mm512_cvtss_f32(v);
}

inline __mmask16 load_mask(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return (__mmask16)v;
}

// y[t * ldy] = sum_col W[r, col] * x[t * ldx + col] for TT tokens; NP planes (= bits).
template <int NP, int TT>
void row_dot(const MwqMat& m, int64_t r, const float* zc, const float* coef, const float* x, int64_t ldx,
             float* y, int64_t ldy) {
    constexpr int U = TT >= 4 ? 1 : 4 / TT;  // independent accumulators per token (FMA latency)
    const int64_t G = m.in / m.group_size, cpg = m.group_size / 16;
    const uint8_t* pl[8];
    row_planes(m, NP, r, pl);
    __m512 acc[TT][U];
    for (int t = 0; t < TT; ++t)
        for (int u = 0; u < U; ++u) acc[t][u] = _mm512_setzero_ps();
    int64_t chunk = 0;
    for (int64_t g = 0; g < G; ++g) {
        __m512 c[NP];
        for (int p = 0; p < NP; ++p) c[p] = _mm512_set1_ps(coef[p * G + g]);
        const __m512 z = _mm512_set1_ps(zc[g]);
        for (int64_t j = 0; j < cpg; ++j, ++chunk) {
            const int64_t col = chunk * 16;
            __m512 w = z;
            for (int p = 0; p < NP; ++p) w = _mm512_mask_add_ps(w, load_mask(pl[p] + col / 8), w, c[p]);
            for (int t = 0; t < TT; ++t)
                acc[t][chunk % U] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * ldx + col), acc[t][chunk % U]);
        }
    }
    for (int t = 0; t < TT; ++t) {
        __m512 s = acc[t][0];
        for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[t][u]);
        y[t * ldy] = hsum(s);
    }
}

// Row r's weights into w_out, 16 columns at a time: z + the coefficient of each plane whose bit is set, added
// in plane order. mask(p, col) is plane p's 16-column mask at col.
template <int NP, class Mask>
inline void decode_row16(const MwqMat& m, const float* zc, const float* coef, float* w_out, Mask mask) {
    const int64_t G = m.in / m.group_size, cpg = m.group_size / 16;
    int64_t chunk = 0;
    for (int64_t g = 0; g < G; ++g) {
        __m512 c[NP];
        for (int p = 0; p < NP; ++p) c[p] = _mm512_set1_ps(coef[p * G + g]);
        const __m512 z = _mm512_set1_ps(zc[g]);
        for (int64_t j = 0; j < cpg; ++j, ++chunk) {
            const int64_t col = chunk * 16;
            __m512 w = z;
            for (int p = 0; p < NP; ++p) w = _mm512_mask_add_ps(w, mask(p, col), w, c[p]);
            _mm512_storeu_ps(w_out + col, w);
        }
    }
}

template <int NP>
void row_decode(const MwqMat& m, int64_t r, const float* zc, const float* coef, float* w_out) {
    const uint8_t* pl[8];
    row_planes(m, NP, r, pl);
    decode_row16<NP>(m, zc, coef, w_out, [&](int p, int64_t col) { return load_mask(pl[p] + col / 8); });
}

// row_decode on a matrix held as byte codes (mwq_common.h code_row): the row's codes gathered from its
// octet, then plane p's 16-column mask is one bit test of 16 code bytes (base bit 0: code bit 6, bit 1: bit
// 7, plane i: bit 8 - i): the same floats.
template <int NP>
void row_decode_codes(const MwqMat& m, int64_t r, const float* zc, const float* coef, float* w_out) {
    thread_local std::vector<uint8_t> row;
    row.resize(m.in);
    code_row_bytes(m, r, row.data());
    const uint8_t* codes = row.data();
    __m128i sel[NP];
    for (int p = 0; p < NP; ++p) sel[p] = _mm_set1_epi8((char)(1 << (p == 0 ? 6 : p == 1 ? 7 : 7 - p)));
    decode_row16<NP>(m, zc, coef, w_out, [&](int p, int64_t col) {
        return _mm_test_epi8_mask(_mm_loadu_si128((const __m128i*)(codes + col)), sel[p]);
    });
}

#else
constexpr bool kAvx512 = false;

template <int NP>
inline void decode_8(const uint8_t* const* pl, int64_t byte, float z, const float* c, int64_t G, int64_t g,
                     float* w) {
    for (int k = 0; k < 8; ++k) w[k] = z;
    for (int p = 0; p < NP; ++p) {
        const uint8_t b = pl[p][byte];
        const float cp = c[p * G + g];
        for (int k = 0; k < 8; ++k) w[k] += ((b >> k) & 1) ? cp : 0.f;
    }
}

template <int NP, int TT>
void row_dot(const MwqMat& m, int64_t r, const float* zc, const float* coef, const float* x, int64_t ldx,
             float* y, int64_t ldy) {
    const int64_t G = m.in / m.group_size, bpg = m.group_size / 8;
    const uint8_t* pl[8];
    row_planes(m, NP, r, pl);
    float acc[TT][8] = {};
    float w[8];
    for (int64_t g = 0; g < G; ++g) {
        for (int64_t j = 0; j < bpg; ++j) {
            const int64_t byte = g * bpg + j;
            decode_8<NP>(pl, byte, zc[g], coef, G, g, w);
            for (int t = 0; t < TT; ++t)
                for (int k = 0; k < 8; ++k) acc[t][k] += w[k] * x[t * ldx + byte * 8 + k];
        }
    }
    for (int t = 0; t < TT; ++t) {
        float s = 0.f;
        for (int k = 0; k < 8; ++k) s += acc[t][k];
        y[t * ldy] = s;
    }
}

template <int NP>
void row_decode(const MwqMat& m, int64_t r, const float* zc, const float* coef, float* w_out) {
    const int64_t G = m.in / m.group_size, bpg = m.group_size / 8;
    const uint8_t* pl[8];
    row_planes(m, NP, r, pl);
    for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < bpg; ++j) decode_8<NP>(pl, g * bpg + j, zc[g], coef, G, g, w_out + (g * bpg + j) * 8);
}
#endif

}  // namespace
