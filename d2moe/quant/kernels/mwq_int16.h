// Few-token kernels on int16 activations (AVX-512BW): masked int16 plane sums (any method) and GFNI
// bit-transposes back to msb integer codes. Without AVX-512 both are absent (kI16MaxTokens = 0).
#pragma once

#include "mwq_float.h"

namespace {

constexpr int64_t kRows8MaxIn = 4096;  // rows8_dot_gfni's stack copy of 8 rows' base bytes: 8 x in/8 each

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
// (s2_g / 64) sx_g sum_j code_j x16_j]: two VNNI multiply-adds per 64 columns and token, whatever the width.
#if defined(__GFNI__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
constexpr int kGfniMaxTokens = 16;

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

// sum_g a[g] * b[g] over G floats, as a 16-lane vector (to be summed with the row's other lanes)
inline __m512 dot_lanes(const float* a, const float* b, int64_t G) {
    __m512 c = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const __mmask16 k = G - g0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g0)) - 1);
        c = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + g0), _mm512_maskz_loadu_ps(k, b + g0), c);
    }
    return c;
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

// One row's accumulation for TT tokens over 64-column chunks of msb codes (bytes, value code * 2^(8 - bits)),
// in column order: per chunk two VNNI int16 multiply-adds per token, per weight group one int32 -> float
// multiply-add. The plane kernels (codes rebuilt by GFNI) and the byte-code kernel share it, so both give
// the same bits.
template <int TT>
struct CodeRow {
    const MwqMat& m;
    const float* zc;
    const float* s2;
    const QuantX& q;
    int64_t G, upg, g = 0, u = 0;  // groups, chunks per group, group, chunk within it
    __m512 out[TT];
    __m512i acc[TT];
    CodeRow(const MwqMat& mat, const float* z, const float* s, const QuantX& qx)
        : m(mat), zc(z), s2(s), q(qx), G(mat.in / mat.group_size), upg(mat.group_size / 64) {
        for (int t = 0; t < TT; ++t) {
            out[t] = _mm512_setzero_ps();
            acc[t] = _mm512_setzero_si512();
        }
    }
    inline __attribute__((always_inline)) void consume(__m512i codes, int64_t col) {
        const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes));
        const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(codes, 1));
        for (int t = 0; t < TT; ++t) {
            const int16_t* xt = q.x16 + t * m.in + col;
            acc[t] = _mm512_dpwssd_epi32(acc[t], lo, _mm512_loadu_si512(xt));
            acc[t] = _mm512_dpwssd_epi32(acc[t], hi, _mm512_loadu_si512(xt + 32));
        }
        if (++u == upg) {
            const float unit = s2[g] * (1.f / 64.f);
            for (int t = 0; t < TT; ++t) {
                out[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(unit * q.sx[t * G + g]), out[t]);
                acc[t] = _mm512_setzero_si512();
            }
            u = 0;
            ++g;
        }
    }
    // y[t * ldy] = the row's product, + sum_g z'_g * sum(x_g)
    void finish(float* y, int64_t ldy) {
        for (int t = 0; t < TT; ++t) y[t * ldy] = hsum(_mm512_add_ps(out[t], dot_lanes(zc, q.xs + t * G, G)));
    }
};

template <int NP, int TT>
void row_dot_gfni(const MwqMat& m, int64_t r, const float* zc, const float* s2, const QuantX& q, float* y,
                  int64_t ldy) {
    const int64_t chunks = m.in / 64;
    const uint8_t* pl[8];
    row_planes(m, NP, r, pl);
    CodeRow<TT> row(m, zc, s2, q);
    int64_t c = 0;
    for (; c + 8 <= chunks; c += 8) {
        __m512i codes[8];
        msb_codes512<NP>(pl, c * 8, codes);
        for (int j = 0; j < 8; ++j) row.consume(codes[j], (c + j) * 64);
    }
    for (; c < chunks; ++c) row.consume(msb_codes64<NP>(pl, c * 8), c * 64);
    row.finish(y, ldy);
}

// row_dot_gfni on a matrix held as byte codes (m.codes): each chunk is one load, its low 8 - NP bits masked
// off (the NP-bit code is the 8-bit code's prefix). The same bits as row_dot_gfni on the planes.
template <int NP, int TT>
void row_dot_codes(const MwqMat& m, int64_t r, const float* zc, const float* s2, const QuantX& q, float* y,
                   int64_t ldy) {
    const uint8_t* row_codes = code_row(m, r);
    const __m512i mask = _mm512_set1_epi8((char)(uint8_t)(0xff << (8 - NP)));
    CodeRow<TT> row(m, zc, s2, q);
    for (int64_t col = 0; col < m.in; col += 64) {
        const __m512i codes = _mm512_loadu_si512(row_codes + col);
        row.consume(NP == 8 ? codes : _mm512_and_si512(codes, mask), col);
    }
    row.finish(y, ldy);
}

// The same products for 8 consecutive rows at once: their plane bytes are contiguous (8 x in/8 = in bytes per
// plane, in % 64 == 0), so msb_codes512 decodes them as one stream of 512-column blocks, with no 64-column
// tail per row (the default model's 192-column down rows were 3 tails each: 17 vector ops per chunk instead
// of ~6). Each row's chunks are consumed in column order with row_dot_gfni's arithmetic: the same bits.
// zc, s2: [8, G] per-row coefficients; row i, token t -> y[t * ldy + i]. Rows of at most kRows8MaxIn columns.
template <int NP, int TT>
void rows8_dot_gfni(const MwqMat& m, int64_t r0, const float* zc, const float* s2, const QuantX& q, float* y,
                    int64_t ldy) {
    const int64_t G = m.in / m.group_size, upg = m.group_size / 64, cpr = m.in / 64, rb = m.in / 8;
    const uint8_t* pl[8];
    row_planes(m, NP, r0, pl);
    // the base stores each row's bit-0 and bit-1 bytes side by side ([out, 2, in/8]): gather the 8 rows'
    // of each into one run, as the sign planes ([out, in/8]) already are
    alignas(64) uint8_t b01[2][kRows8MaxIn];
    for (int i = 0; i < 8; ++i) {
        std::memcpy(b01[0] + i * rb, pl[0] + 2 * i * rb, rb);
        std::memcpy(b01[1] + i * rb, pl[0] + 2 * i * rb + rb, rb);
    }
    pl[0] = b01[0];
    pl[1] = b01[1];
    __m512 out[TT];
    __m512i acc[TT];
    for (int t = 0; t < TT; ++t) {
        out[t] = _mm512_setzero_ps();
        acc[t] = _mm512_setzero_si512();
    }
    int64_t row = 0, c = 0, g = 0, u = 0;  // row in the block, chunk in the row, group, chunk in the group
    for (int64_t b = 0; b < m.in; b += 64) {  // 64 bytes of each plane: 8 chunks of the 8 rows' sequence
        __m512i codes[8];
        msb_codes512<NP>(pl, b, codes);
        for (int j = 0; j < 8; ++j) {
            const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes[j]));
            const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(codes[j], 1));
            for (int t = 0; t < TT; ++t) {
                const int16_t* xt = q.x16 + t * m.in + c * 64;
                acc[t] = _mm512_dpwssd_epi32(acc[t], lo, _mm512_loadu_si512(xt));
                acc[t] = _mm512_dpwssd_epi32(acc[t], hi, _mm512_loadu_si512(xt + 32));
            }
            if (++u == upg) {
                const float unit = s2[row * G + g] * (1.f / 64.f);
                for (int t = 0; t < TT; ++t) {
                    out[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(unit * q.sx[t * G + g]),
                                             out[t]);
                    acc[t] = _mm512_setzero_si512();
                }
                u = 0;
                ++g;
            }
            if (++c == cpr) {  // the row is done: + sum_g z'_g * sum(x_g), as row_dot_gfni
                for (int t = 0; t < TT; ++t) {
                    y[t * ldy + row] = hsum(_mm512_add_ps(out[t], dot_lanes(zc + row * G, q.xs + t * G, G)));
                    out[t] = _mm512_setzero_ps();
                }
                c = g = 0;
                ++row;
            }
        }
    }
}

// row_dot_codes for 4 rows at once (zc, s2: [4, G]; row i, token t -> y[t * ldy + i]): four independent
// accumulation chains per activation load instead of one. Each row's arithmetic is row_dot_codes's.
template <int NP, int TT>
void rows4_dot_codes(const MwqMat& m, int64_t r0, const float* zc, const float* s2, const QuantX& q, float* y,
                     int64_t ldy) {
    constexpr int R = 4;
    const int64_t G = m.in / m.group_size, upg = m.group_size / 64;
    const uint8_t* rc[R];
    for (int i = 0; i < R; ++i) rc[i] = code_row(m, r0 + i);
    const __m512i mask = _mm512_set1_epi8((char)(uint8_t)(0xff << (8 - NP)));
    __m512 out[R][TT];
    __m512i acc[R][TT];
    for (int i = 0; i < R; ++i)
        for (int t = 0; t < TT; ++t) {
            out[i][t] = _mm512_setzero_ps();
            acc[i][t] = _mm512_setzero_si512();
        }
    int64_t g = 0, u = 0;
    for (int64_t col = 0; col < m.in; col += 64) {
        __m512i xl[TT], xh[TT];
        for (int t = 0; t < TT; ++t) {
            xl[t] = _mm512_loadu_si512(q.x16 + t * m.in + col);
            xh[t] = _mm512_loadu_si512(q.x16 + t * m.in + col + 32);
        }
        // the next 4 rows' bytes (adjacent when in one code block): the hardware prefetcher does not follow
        // four interleaved streams
        for (int i = 0; i < R; ++i) _mm_prefetch((const char*)(rc[0] + R * m.in + R * col + 64 * i), _MM_HINT_T0);
        for (int i = 0; i < R; ++i) {
            __m512i codes = _mm512_loadu_si512(rc[i] + col);
            if (NP < 8) codes = _mm512_and_si512(codes, mask);
            const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes));
            const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(codes, 1));
            for (int t = 0; t < TT; ++t) {
                acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], lo, xl[t]);
                acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], hi, xh[t]);
            }
        }
        if (++u == upg) {
            for (int i = 0; i < R; ++i) {
                const float unit = s2[i * G + g] * (1.f / 64.f);
                for (int t = 0; t < TT; ++t) {
                    out[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][t]), _mm512_set1_ps(unit * q.sx[t * G + g]),
                                                out[i][t]);
                    acc[i][t] = _mm512_setzero_si512();
                }
            }
            u = 0;
            ++g;
        }
    }
    for (int i = 0; i < R; ++i)
        for (int t = 0; t < TT; ++t)
            y[t * ldy + i] = hsum(_mm512_add_ps(out[i][t], dot_lanes(zc + i * G, q.xs + t * G, G)));
}

template <int NP>
RowDotI16 pick_codes(int tt) {
    switch (tt) {
        case 8: return row_dot_codes<NP, 8>;
        case 4: return row_dot_codes<NP, 4>;
        case 3: return row_dot_codes<NP, 3>;
        case 2: return row_dot_codes<NP, 2>;
        default: return row_dot_codes<NP, 1>;
    }
}

template <int NP>
RowDotI16 pick_codes4(int tt) {
    return tt == 2 ? rows4_dot_codes<NP, 2> : tt == 1 ? rows4_dot_codes<NP, 1> : nullptr;
}

// The byte-code kernel for a width and a token tile: one row at a time, or 4 (tiles of 1 or 2 tokens; else null).
RowDotI16 dot_codes_for(int bits, int tt, bool four = false) {
    switch (bits) {
        case 2: return four ? pick_codes4<2>(tt) : pick_codes<2>(tt);
        case 3: return four ? pick_codes4<3>(tt) : pick_codes<3>(tt);
        case 4: return four ? pick_codes4<4>(tt) : pick_codes<4>(tt);
        case 5: return four ? pick_codes4<5>(tt) : pick_codes<5>(tt);
        case 6: return four ? pick_codes4<6>(tt) : pick_codes<6>(tt);
        case 7: return four ? pick_codes4<7>(tt) : pick_codes<7>(tt);
        default: return four ? pick_codes4<8>(tt) : pick_codes<8>(tt);
    }
}

// The GFNI kernel for NP planes and a tile of tt tokens: one row at a time, or 8 (rows8_dot_gfni).
template <int NP, bool EIGHT>
RowDotI16 pick_gfni(int tt) {
    switch (tt) {
        case 8: return EIGHT ? rows8_dot_gfni<NP, 8> : row_dot_gfni<NP, 8>;
        case 4: return EIGHT ? rows8_dot_gfni<NP, 4> : row_dot_gfni<NP, 4>;
        case 3: return EIGHT ? rows8_dot_gfni<NP, 3> : row_dot_gfni<NP, 3>;
        case 2: return EIGHT ? rows8_dot_gfni<NP, 2> : row_dot_gfni<NP, 2>;
        default: return EIGHT ? rows8_dot_gfni<NP, 1> : row_dot_gfni<NP, 1>;
    }
}

template <int NP>
RowDotI16 pick_gfni(int tt, bool eight) {
    return eight ? pick_gfni<NP, true>(tt) : pick_gfni<NP, false>(tt);
}

RowDotI16 dot_gfni_for(int bits, int tt, bool eight = false) {
    switch (bits) {
        case 2: return pick_gfni<2>(tt, eight);
        case 3: return pick_gfni<3>(tt, eight);
        case 4: return pick_gfni<4>(tt, eight);
        case 5: return pick_gfni<5>(tt, eight);
        case 6: return pick_gfni<6>(tt, eight);
        case 7: return pick_gfni<7>(tt, eight);
        default: return pick_gfni<8>(tt, eight);
    }
}
#else
constexpr int kGfniMaxTokens = 0;
RowDotI16 dot_gfni_for(int, int, bool = false) { return nullptr; }
RowDotI16 dot_codes_for(int, int, bool = false) { return nullptr; }
#endif
#else
constexpr int kI16MaxTokens = 0;
constexpr int kGfniMaxTokens = 0;
RowDotI16 dot_gfni_for(int, int, bool = false) { return nullptr; }
RowDotI16 dot_codes_for(int, int, bool = false) { return nullptr; }
#endif

}  // namespace
