// Few-token kernels on int16 activations (AVX-512BW): masked int16 plane sums (any method), and GFNI
// bit-transposes back to msb integer codes (for mwq_octets.h). Without AVX-512 both are absent.
#pragma once

#include "mwq_float.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- few tokens: accumulate int16 activations per plane (32 lanes per op) ------------------------------
// x is quantized per token and per weight group: x16 = round(x / sx_g), |x16| <= 16383, so a masked sum of
// two 32-column chunks still fits int16. Per plane the masked sums are scaled once per group:
//   msb: planes are powers of two of s2 -> integer multiply-add (VNNI) into one int32 accumulator;
//   residual: per plane int32 -> float, times the plane coefficient.
// The constant part sum_g z'_g * sum(x_g) is taken in float from the unquantized x.

inline __mmask32 load_mask32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return (__mmask32)v;
}

inline __m512i dot_acc(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

template <int NP, int TT, bool MSB, int UC>
void row_dot_i16(const MwqMat& m, int64_t r, const float* zc, const float* coef, const QuantX& q, float* y,
                 int64_t ldy) {
    const int64_t G = m.in / m.group_size, upg = m.group_size / (32 * UC);
    const uint8_t* pl[8];
    row_planes(m, NP, r, pl);
    __m512i mult[NP];
    for (int p = 0; p < NP; ++p) {  // plane coefficient / lowest plane's: b0 2^(NP-2), b1 2^(NP-1), i 2^(NP-i)
        const int shift = p == 0 ? NP - 2 : (p == 1 ? NP - 1 : NP - 1 - p);
        mult[p] = _mm512_set1_epi16((int16_t)(1 << shift));
    }
    const __m512i ones = _mm512_set1_epi16(1);
    const float msb_unit = std::ldexp(1.f, 2 - NP);  // coefficient of the lowest plane / s2
    __m512 out[TT];
    float cst[TT];
    for (int t = 0; t < TT; ++t) {
        out[t] = _mm512_setzero_ps();
        cst[t] = 0.f;
    }
    for (int64_t g = 0; g < G; ++g) {
        __m512i acc[TT];
        __m512 v[TT];
        for (int t = 0; t < TT; ++t) {
            cst[t] += zc[g] * q.xs[t * G + g];
            acc[t] = _mm512_setzero_si512();
            v[t] = _mm512_setzero_ps();
        }
        for (int64_t u = 0; u < upg; ++u) {
            const int64_t col = (g * upg + u) * 32 * UC;
            __m512i xc[TT][UC];
            for (int t = 0; t < TT; ++t)
                for (int c = 0; c < UC; ++c) xc[t][c] = _mm512_loadu_si512(q.x16 + t * m.in + col + 32 * c);
            for (int p = 0; p < NP; ++p) {
                const __mmask32 k0 = load_mask32(pl[p] + col / 8);
                const __mmask32 k1 = UC == 2 ? load_mask32(pl[p] + col / 8 + 4) : 0;
                for (int t = 0; t < TT; ++t) {
                    __m512i a = _mm512_maskz_mov_epi16(k0, xc[t][0]);
                    if (UC == 2) a = _mm512_mask_add_epi16(a, k1, a, xc[t][UC - 1]);
                    if (MSB) {
                        acc[t] = dot_acc(acc[t], a, mult[p]);
                    } else {
                        const __m512 f = _mm512_cvtepi32_ps(_mm512_madd_epi16(a, ones));
                        v[t] = _mm512_fmadd_ps(f, _mm512_set1_ps(coef[p * G + g]), v[t]);
                    }
                }
            }
        }
        for (int t = 0; t < TT; ++t) {
            const float sx = q.sx[t * G + g];
            if (MSB)
                out[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(coef[g] * msb_unit * sx), out[t]);
            else
                out[t] = _mm512_fmadd_ps(v[t], _mm512_set1_ps(sx), out[t]);
        }
    }
    for (int t = 0; t < TT; ++t) y[t * ldy] = hsum(out[t]) + cst[t];
}

template <int NP, bool MSB, int UC>
RowDotI16 pick_i16_t(int tt) {
    switch (tt) {
        case 3: return row_dot_i16<NP, 3, MSB, UC>;
        case 2: return row_dot_i16<NP, 2, MSB, UC>;
        default: return row_dot_i16<NP, 1, MSB, UC>;
    }
}

template <int NP>
RowDotI16 pick_i16(int tt, bool msb, int uc) {
    if (msb) return uc == 2 ? pick_i16_t<NP, true, 2>(tt) : pick_i16_t<NP, true, 1>(tt);
    return uc == 2 ? pick_i16_t<NP, false, 2>(tt) : pick_i16_t<NP, false, 1>(tt);
}

RowDotI16 dot_i16_for(int bits, int tt, bool msb, int uc) {
    switch (bits) {
        case 2: return pick_i16<2>(tt, msb, uc);
        case 3: return pick_i16<3>(tt, msb, uc);
        case 4: return pick_i16<4>(tt, msb, uc);
        case 5: return pick_i16<5>(tt, msb, uc);
        case 6: return pick_i16<6>(tt, msb, uc);
        case 7: return pick_i16<7>(tt, msb, uc);
        default: return pick_i16<8>(tt, msb, uc);
    }
}
constexpr int kI16MaxTokens = 3;

// ---- msb, up to 16 tokens: 8x8 bit transposes (GFNI) turn the planes back into integer codes ------------
// For 64 columns, the 8-byte words of the (up to 8) planes, most significant first (b1, b0, plane 3, ...),
// are byte-transposed (VBMI permute) and bit-transposed (GF2P8AFFINEQB) into one byte per column: the msb
// code c_b * 2^(8 - bits). With W = z' + (s2 / 64) * code, a row is sum_g [z'_g sum(x_g) +
// (s2_g / 64) sx_g sum_j code_j x16_j]; mwq_octets.h multiplies the codes, whatever the width.
#if defined(__GFNI__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
// tokens up to which planes go through the msb kernel (byte codes: any count). It beats decode + GEMM far
// beyond: 576 x 1536 at 16 tokens 0.84 ms against 2.4, 576 x 192 0.12 against 0.34 (one core).
constexpr int kGfniMaxTokens = 256;

struct GfniTables {
    alignas(64) uint8_t perm[64];  // qword k <- byte k of every plane word
    alignas(64) uint8_t sel[64];   // byte (k, j) = 1 << j: picks column j's bit out of each plane byte
};
constexpr GfniTables make_gfni_tables() {
    GfniTables t{};
    for (int k = 0; k < 8; ++k)
        for (int p = 0; p < 8; ++p) {
            t.perm[k * 8 + p] = (uint8_t)(p * 8 + k);
            t.sel[k * 8 + p] = (uint8_t)(1 << p);
        }
    return t;
}
constexpr GfniTables kGfniTables = make_gfni_tables();

inline int64_t load64(const uint8_t* p) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

// Codes of 64 columns starting at byte `byte` of each plane row (NP planes; missing planes read as 0).
template <int NP>
inline __m512i msb_codes64(const uint8_t* const* pl, int64_t byte) {
    auto word = [&](int k) -> int64_t {  // k-th most significant plane: b1, b0, plane 3, ...
        if (k >= NP) return 0;
        return load64((k == 0 ? pl[1] : k == 1 ? pl[0] : pl[k]) + byte);
    };
    __m512i v = _mm512_castsi128_si512(_mm_set_epi64x(word(1), word(0)));
    v = _mm512_inserti64x2(v, _mm_set_epi64x(word(3), word(2)), 1);
    v = _mm512_inserti64x2(v, _mm_set_epi64x(word(5), word(4)), 2);
    v = _mm512_inserti64x2(v, _mm_set_epi64x(word(7), word(6)), 3);
    const __m512i t = _mm512_permutexvar_epi8(_mm512_load_si512(kGfniTables.perm), v);
    return _mm512_gf2p8affine_epi64_epi8(_mm512_load_si512(kGfniTables.sel), t, 0);
}

// The plane words of 8 consecutive 64-column chunks at once: one 64-byte load per plane (512 columns), then
// an 8x8 transpose of 64-bit lanes (unpack, then two rounds of 128-bit lane shuffles) gives each chunk its
// NP words in msb_codes64's order: 1 load and 3 shuffles per chunk instead of 8 scalar loads and 7 inserts.
template <int NP>
inline void msb_codes512(const uint8_t* const* pl, int64_t byte, __m512i* codes) {
    __m512i w[8];
    for (int k = 0; k < 8; ++k)  // k-th most significant plane: b1, b0, plane 3, ...
        w[k] = k < NP ? _mm512_loadu_si512(k == 0 ? pl[1] + byte : k == 1 ? pl[0] + byte : pl[k] + byte)
                      : _mm512_setzero_si512();
    __m512i a[8], b[8];
    for (int k = 0; k < 4; ++k) {  // a[k]: (w2k, w2k+1) pairs of even chunks; a[k+4]: of odd chunks
        a[k] = _mm512_unpacklo_epi64(w[2 * k], w[2 * k + 1]);
        a[k + 4] = _mm512_unpackhi_epi64(w[2 * k], w[2 * k + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // h: even / odd chunks
        const __m512i* s = a + 4 * h;
        b[4 * h + 0] = _mm512_shuffle_i64x2(s[0], s[1], 0x88);  // lanes 0, 2 of each: chunks 2h+0, 2h+4
        b[4 * h + 1] = _mm512_shuffle_i64x2(s[2], s[3], 0x88);
        b[4 * h + 2] = _mm512_shuffle_i64x2(s[0], s[1], 0xdd);  // lanes 1, 3 of each: chunks 2h+2, 2h+6
        b[4 * h + 3] = _mm512_shuffle_i64x2(s[2], s[3], 0xdd);
    }
    const __m512i perm = _mm512_load_si512(kGfniTables.perm), sel = _mm512_load_si512(kGfniTables.sel);
    for (int h = 0; h < 2; ++h)
        for (int q = 0; q < 2; ++q) {
            const __m512i lo = b[4 * h + 2 * q], hi = b[4 * h + 2 * q + 1];
            const __m512i c0 = _mm512_shuffle_i64x2(lo, hi, 0x88), c1 = _mm512_shuffle_i64x2(lo, hi, 0xdd);
            codes[h + 2 * q] = _mm512_gf2p8affine_epi64_epi8(sel, _mm512_permutexvar_epi8(perm, c0), 0);
            codes[h + 2 * q + 4] = _mm512_gf2p8affine_epi64_epi8(sel, _mm512_permutexvar_epi8(perm, c1), 0);
        }
}

#else
constexpr int kGfniMaxTokens = 0;
#endif
#else
constexpr int kI16MaxTokens = 0;
constexpr int kGfniMaxTokens = 0;
#endif

}  // namespace
