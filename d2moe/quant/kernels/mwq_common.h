// Shared by the MWQ CPU kernels: the matrix view, fp16 helpers, per-row coefficients, int16 activations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

extern "C" {

struct MwqMat {
    const uint16_t* offset;      // fp16 [out, G]
    const uint16_t* base_scale;  // fp16 [out, G]
    const uint8_t* base;         // [out, 2, in/8]
    const uint16_t* scales[6];   // fp16 [out, G] for planes 3..8, or null (msb: derived)
    const uint8_t* planes[6];    // [out, in/8] for planes 3..8
    int64_t out;
    int64_t in;
    int64_t group_size;
    int64_t codes;  // 1: held as byte codes (see code_row), base and planes then hold codes, not bit-planes
};

}  // extern "C"

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal
            int e = -1;
            do { ++e; man <<= 1; } while (!(man & 0x400));
            bits = sign | (uint32_t)(112 - e) << 23 | (man & 0x3ff) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 112) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

// n (<= 16) fp16 values -> floats in out[0..n)
inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
#if defined(__AVX512F__)
    const __mmask16 k = (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_ps(out, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h)));
#else
    for (int64_t j = 0; j < n; ++j) out[j] = half_to_float(h[j]);
#endif
}

// Lane order: a matrix held as byte codes keeps its offsets and base scales ([out, G] fp16) per 16-row block
// as [G][16 lanes], lane 2i = row i of the block, lane 2i + 1 = row 8 + i (the octet kernel's lanes, so it
// loads a group's 16 rows at once). Row r's value of group g:
inline int64_t lane_index(int64_t r, int64_t G, int64_t g) {
    const int64_t i = r % 16;
    return (r - i) * G + g * 16 + (i < 8 ? 2 * i : 2 * (i - 8) + 1);
}

// Row r's offsets then base scales ([2][G] fp16, row order) from a byte-code matrix's lane order.
inline void row_scalars_of_codes(const MwqMat& m, int64_t r, uint16_t* h) {
    const int64_t G = m.in / m.group_size;
    for (int64_t g = 0; g < G; ++g) {
        h[g] = m.offset[lane_index(r, G, g)];
        h[G + g] = m.base_scale[lane_index(r, G, g)];
    }
}

// Per row: z' [G] and the `bits` coefficients [bits][G] (b0, b1, planes 3..bits) of the masked adds:
// coef = s2, 2*s2, 2*s_i;  z' = z - sum_i s_i.  Plane-major loops over contiguous groups.
// `s2_only` (msb int16 kernel): only coef[0..G) = s2 and z' = z - s2 * (1/2 - 2^(1-bits)).
inline void row_coefficients(const MwqMat& m, int bits, int64_t r, float* zc, float* coef, bool s2_only = false) {
    const int64_t G = m.in / m.group_size;
    if (m.codes) {  // lane order (see lane_index): the row's halves gathered, then the same arithmetic
        thread_local std::vector<uint16_t> h;
        h.resize(2 * G);
        row_scalars_of_codes(m, r, h.data());
        MwqMat v = m;
        v.codes = 0, v.offset = h.data(), v.base_scale = h.data() + G;
        row_coefficients(v, bits, 0, zc, coef, s2_only);
        return;
    }
    const bool msb = bits == 2 || m.scales[0] == nullptr;
    if (s2_only && msb) {
        const float tail = 0.5f - 1.f / (float)(1 << (bits - 1));
#if defined(__AVX512F__)
        // in registers: reading back the masked stores of halves_to_floats element by element stalled on
        // store forwarding (half of the experts_ffn region's own time at 576 columns)
        for (int64_t g0 = 0; g0 < G; g0 += 16) {
            const __mmask16 k = G - g0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g0)) - 1);
            const __m512 s2 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m.base_scale + r * G + g0));
            const __m512 z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m.offset + r * G + g0));
            _mm512_mask_storeu_ps(coef + g0, k, s2);
            _mm512_mask_storeu_ps(zc + g0, k, _mm512_fnmadd_ps(s2, _mm512_set1_ps(tail), z));
        }
        return;
#endif
        for (int64_t g0 = 0; g0 < G; g0 += 16) {
            const int64_t n = G - g0 < 16 ? G - g0 : 16;
            halves_to_floats(m.base_scale + r * G + g0, n, coef + g0);
            halves_to_floats(m.offset + r * G + g0, n, zc + g0);
            for (int64_t j = 0; j < n; ++j) zc[g0 + j] -= coef[g0 + j] * tail;
        }
        return;
    }
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
        const int64_t n = G - g0 < 16 ? G - g0 : 16;
        float s2[16], z[16], si[16];
        halves_to_floats(m.base_scale + r * G + g0, n, s2);
        halves_to_floats(m.offset + r * G + g0, n, z);
        for (int64_t j = 0; j < n; ++j) {
            coef[g0 + j] = s2[j];
            coef[G + g0 + j] = 2.f * s2[j];
        }
        for (int i = 3; i <= bits; ++i) {
            float* c = coef + (i - 1) * G + g0;
            if (msb) {
                const float f = 1.f / (float)(1 << (i - 1));  // s_i = s2 / 2^(i-1)
                for (int64_t j = 0; j < n; ++j) si[j] = s2[j] * f;
            } else {
                halves_to_floats(m.scales[i - 3] + r * G + g0, n, si);
            }
            for (int64_t j = 0; j < n; ++j) {
                c[j] = 2.f * si[j];
                z[j] -= si[j];
            }
        }
        for (int64_t j = 0; j < n; ++j) zc[g0 + j] = z[j];
    }
}

// Row pointers of the np bit-planes of row r: b0, b1, plane 3, ...
inline void row_planes(const MwqMat& m, int bits, int64_t r, const uint8_t** pl) {
    const int64_t rb = m.in / 8;
    pl[0] = m.base + r * 2 * rb;
    pl[1] = pl[0] + rb;
    for (int i = 3; i <= bits; ++i) pl[i - 1] = m.planes[i - 3] + r * rb;
}


// Byte codes (m.codes, msb with 8 planes, out % 64 == 0): the 8-bit msb code of every weight, one byte per
// weight (bit 7: base bit 1, bit 6: base bit 0, bit 8 - i: plane i), in the memory its planes took: rows
// [0, out/4) in `base` ([out, 2, in/8] bytes), then out/8 rows in each of planes 3..8 ([out, in/8] bytes each)
// (a segment each), in the order mwq_octets.h reads. code_row(m, r) is where row r's place in its segment is.
// (No division: a 64-bit idiv per call cost ~1/4 of a one-token 16-row block.)
inline int64_t code_segment(const MwqMat& m, int64_t r) {
    int64_t k = 0;
    for (int64_t end = m.out / 4; r >= end && k < 6; end += m.out / 8) ++k;
    return k;
}
inline const uint8_t* code_row(const MwqMat& m, int64_t r) {
    const int64_t k = code_segment(m, r);
    return k == 0 ? m.base + r * m.in : m.planes[k - 1] + (r - m.out / 4 - (k - 1) * (m.out / 8)) * m.in;
}

// Rows go in octets (8 rows), octet o = rows [8o, 8o + 8); an octet's codes are 512-byte chunks of 64 columns,
// and in a chunk, 32-byte runs h = 0..15 each hold the 8 rows' codes ([row][4 bytes]) of the 4 columns from
// 4 * kKq[h] (the order of mwq_octets.h's transpose). Octets 2j and 2j + 1 in one segment are a pair, stored
// chunk by chunk interleaved (chunk c of 2j, then of 2j + 1: the kernel's 16 rows are one stream); an octet
// whose partner is in another segment is stored alone (its chunks in order).
constexpr int kKq[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
constexpr int64_t kChunkBytes = 512;

inline bool octet_paired(const MwqMat& m, int64_t o) {
    const int64_t p = o ^ 1;
    return 8 * p < m.out && code_segment(m, 8 * o) == code_segment(m, 8 * p);
}

// Where octet o's chunks go: its run starts at row `row` of its segment, its first chunk `offset` bytes in,
// and `stride` bytes from one chunk to the next (a pair's run starts at the even octet's first row).
struct OctetPlace {
    int64_t row, offset, stride;
};
inline OctetPlace octet_place(const MwqMat& m, int64_t o) {
    if (!octet_paired(m, o)) return {8 * o, 0, kChunkBytes};
    return {8 * (o & ~int64_t(1)), (o & 1) * kChunkBytes, 2 * kChunkBytes};
}

// Octet o's first chunk, and the bytes from one of its chunks to the next.
inline const uint8_t* octet_chunks(const MwqMat& m, int64_t o, int64_t& stride) {
    const OctetPlace at = octet_place(m, o);
    stride = at.stride;
    return code_row(m, at.row) + at.offset;
}

// Row r's codes, row-major (in bytes): the portable way back (float decode, planes for the float kernels).
inline void code_row_bytes(const MwqMat& m, int64_t r, uint8_t* row) {
    int64_t stride;
    const uint8_t* octet = octet_chunks(m, r / 8, stride);
    const int64_t i = r % 8;
    for (int64_t c = 0; c < m.in / 64; ++c)
        for (int h = 0; h < 16; ++h) std::memcpy(row + c * 64 + kKq[h] * 4, octet + c * stride + h * 32 + i * 4, 4);
}

// Row r's base and plane bytes rebuilt from its codes into tmp (2 * in + 4 * G bytes, 2-byte aligned: the
// row's codes, then b0, b1, planes 3..8 as row_planes reads them, then its offsets and base scales), and a
// one-row planes view of it: the kernels that read planes run on rows of a byte-code matrix through this
// (float activations), with the same bits as on the planes.
inline MwqMat planes_of_code_row(const MwqMat& m, int64_t r, uint8_t* tmp) {
    const int64_t rb = m.in / 8, G = m.in / m.group_size;
    uint8_t* c = tmp;
    code_row_bytes(m, r, c);
    uint8_t* pl = tmp + m.in;
    for (int64_t k = 0; k < rb; ++k) {
        uint8_t by[8] = {};
        for (int t = 0; t < 8; ++t)
            for (int p = 0; p < 8; ++p) by[p] |= (uint8_t)(((c[8 * k + t] >> p) & 1) << t);
        pl[k] = by[6];                 // base bit 0
        pl[rb + k] = by[7];            // base bit 1
        for (int i = 3; i <= 8; ++i) pl[(i - 1) * rb + k] = by[8 - i];
    }
    MwqMat v{};
    uint16_t* h = reinterpret_cast<uint16_t*>(tmp + 2 * m.in);  // the row's scalars, row order
    row_scalars_of_codes(m, r, h);
    v.offset = h;
    v.base_scale = h + G;
    v.base = pl;
    for (int i = 0; i < 6; ++i) v.planes[i] = pl + (2 + i) * rb;
    v.out = 1, v.in = m.in, v.group_size = m.group_size, v.codes = 0;
    return v;
}

struct QuantX {
    const int16_t* x16;  // [T, in]
    const float* sx;     // [T, G] scale: x ~= x16 * sx
    const float* xs;     // [T, G] exact float sum of x over the group
};

using RowDotI16 = void (*)(const MwqMat&, int64_t, const float*, const float*, const QuantX&, float*, int64_t);

// |x16| <= qmax: 16383 when two columns are summed in int16 (masked kernel), 32767 otherwise (GFNI kernel).
void quantize_tokens(const float* x, int64_t T, int64_t in, int64_t gs, float qmax, int16_t* x16, float* sx,
                     float* xs) {
    const int64_t G = in / gs;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t g = 0; g < G; ++g) {
            const float* xg = x + t * in + g * gs;
            int16_t* qg = x16 + t * in + g * gs;
            float amax = 0.f, sum = 0.f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
            if (gs % 16 == 0) {
                __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
                for (int64_t j = 0; j < gs; j += 16) {
                    const __m512 v = _mm512_loadu_ps(xg + j);
                    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
                    vsum = _mm512_add_ps(vsum, v);
                }
                amax = _mm512_reduce_max_ps(vmax);
                sum = _mm512_reduce_add_ps(vsum);
                const __m512 inv = _mm512_set1_ps(amax > 0.f ? qmax / amax : 0.f);
                for (int64_t j = 0; j < gs; j += 16) {  // round to nearest (MXCSR default), |q| <= qmax
                    const __m512i q32 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + j), inv));
                    _mm256_storeu_si256((__m256i*)(qg + j), _mm512_cvtepi32_epi16(q32));
                }
            } else
#endif
            {
                for (int64_t j = 0; j < gs; ++j) {
                    amax = std::fmax(amax, std::fabs(xg[j]));
                    sum += xg[j];
                }
                const float inv = amax > 0.f ? qmax / amax : 0.f;
                for (int64_t j = 0; j < gs; ++j) qg[j] = (int16_t)std::nearbyint(xg[j] * inv);
            }
            sx[t * G + g] = amax > 0.f ? amax / qmax : 0.f;
            xs[t * G + g] = sum;
        }
}

}  // namespace
