// Octets: the msb int16 kernel (any width; planes up to kGfniMaxTokens tokens, byte codes any count) and the
// byte-code layout it reads.
//
// The kernel takes 16 output rows at a time, as two octets (8 rows each). An octet's 8-bit msb codes are
// 512-byte chunks of 64 columns; a chunk is 8 units of 64 bytes, and each half of a unit is one group of 4
// columns (a "kq") of the 8 rows, [row][4 bytes], kq in the order kKq (what the in-register 8 x 16 dword
// transpose below produces). Widening 32 such bytes to int16 gives 16 int32 lanes (row r, column pair p), and
// one 64-bit broadcast of the token's 4 int16 activations of that kq serves every lane: one VNNI multiply-add
// per 8 rows x 4 columns, activations read straight from L1, and no horizontal sums. The row-major kernels
// this replaced spent most of their time in per-(row, token) reductions and scale broadcasts: a default-model
// expert (576 x 192) at 12 tokens took 163 us, now 65; a bench8x decode layer (2 experts of 576 x 1536 held
// as codes, one token, from DRAM) 373 us, now ~315.
//
// Arithmetic, the same for every (row, token) whatever the tile, source or call (batch invariance, and the
// same bits from planes as from byte codes): I_c = the exact int32 sum over 64-column chunk c of code x x16;
// y = 0; for each chunk c (group g): y = fma(float(I_c), (s2_g / 64) * sx_g, y); then for each group g:
// y = fma(z'_g, sum(x_g), y). A lane holds one row: the two column-pair lanes of a row are added as integers
// first (exact), and two octets share one float vector (even lanes: octet A, odd: octet B).
//
// Byte codes (MwqMat.codes) are held in this layout, in the memory the planes took (mwq_common.h code_row:
// out % 64 == 0, a plane holds out/8 rows; octets paired chunk by chunk; offsets and scales in lane order).
// Planes are turned into the same chunks on the fly (GFNI codes of 16 whole rows into a per-thread scratch of
// 16 x in bytes, then the transpose per chunk into 1 KB).
#pragma once

#include "mwq_int16.h"

namespace {

// One matrix's 16-row block for one token tile (rows from r0; how many; lane coefficients; activations; y, ldy).
using OctetsDot = void (*)(const MwqMat&, int64_t, int, const float*, const float*, const QuantX&, float*, int64_t);

#if defined(__GFNI__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
// 8 rows' codes of one 64-column chunk (row-major: dword j = columns 4j..4j+3) -> the octet chunk (512 bytes).
// Dword unpacks pair rows, qword unpacks make 4-row groups per 128-bit lane, and one two-source qword
// permute per output unit puts rows 0-3 and 4-7 of one kq side by side (the order kKq follows from it).
inline void rows_to_octet_chunk(const __m512i* r, uint8_t* out) {
    __m512i lo[4], hi[4], q[8];
    for (int k = 0; k < 4; ++k) {
        lo[k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        hi[k] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 0-3, rows 4-7: lane L of q[4h + j] = dword 4L + j of the 4 rows
        q[4 * h + 0] = _mm512_unpacklo_epi64(lo[2 * h], lo[2 * h + 1]);
        q[4 * h + 1] = _mm512_unpackhi_epi64(lo[2 * h], lo[2 * h + 1]);
        q[4 * h + 2] = _mm512_unpacklo_epi64(hi[2 * h], hi[2 * h + 1]);
        q[4 * h + 3] = _mm512_unpackhi_epi64(hi[2 * h], hi[2 * h + 1]);
    }
    const __m512i i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int j = 0; j < 4; ++j) {
        _mm512_storeu_si512(out + 128 * j, _mm512_permutex2var_epi64(q[j], i0, q[j + 4]));
        _mm512_storeu_si512(out + 128 * j + 64, _mm512_permutex2var_epi64(q[j], i1, q[j + 4]));
    }
}

// Chunks of two octets from byte codes (B may repeat A). The kernel outruns DRAM at a few tokens, and left
// to the hardware prefetcher a one-token call streamed ~10 GB/s (a plain read here: ~17 GB/s): each chunk
// requests the lines kCodeAhead chunks further into L2 (a pair's chunks run on into the next block's). Into
// L1, or nearer, was slower (the L1 miss buffers are then busy with prefetches; measured 2 to 16 chunks).
constexpr int64_t kCodeAhead = 8;
struct CodeChunks {
    const uint8_t* a;
    const uint8_t* b;
    int64_t sa, sb;  // bytes from chunk to chunk
    inline void load(int64_t c) {
        for (int k = 0; k < 8; ++k) {
            _mm_prefetch((const char*)(a + (c + kCodeAhead) * sa + 64 * k), _MM_HINT_T1);
            _mm_prefetch((const char*)(b + (c + kCodeAhead) * sb + 64 * k), _MM_HINT_T1);
        }
    }
    inline const uint8_t* chunk(int o, int64_t c) const { return o ? b + c * sb : a + c * sa; }
};

// Chunks of 16 rows rebuilt from NP planes (rows past `rows` read as code 0). The rows are decoded whole first,
// one after another (msb_codes512: one 64-byte load per plane for 8 chunks), into a row-major scratch, and each
// chunk is transposed from there when the kernel reaches it: reading the planes of 16 rows side by side, chunk
// by chunk, was ~20 % slower from DRAM at one token (many short strided streams); so was a prefetch of the
// next block's planes in the memory-starved engine, whose loader's reads it competes with.
template <int NP>
struct PlaneChunks {
    const uint8_t* codes;  // [16][in] row-major
    int rows;
    int64_t in;
    alignas(64) uint8_t buf[2 * kChunkBytes];
    PlaneChunks(const MwqMat& m, int64_t r0, int n) : rows(n), in(m.in) {
        thread_local std::vector<uint8_t> scratch;
        scratch.resize(16 * m.in + 64);
        uint8_t* base = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
        codes = base;
        const int64_t chunks = m.in / 64;
        for (int i = 0; i < 16; ++i) {
            uint8_t* row = base + i * m.in;
            if (i >= n) {
                std::memset(row, 0, m.in);
                continue;
            }
            const uint8_t* pl[8];
            row_planes(m, NP, r0 + i, pl);
            int64_t c = 0;
            for (; c + 8 <= chunks; c += 8) {
                __m512i cs[8];
                msb_codes512<NP>(pl, c * 8, cs);
                for (int j = 0; j < 8; ++j) _mm512_store_si512(row + (c + j) * 64, cs[j]);
            }
            for (; c < chunks; ++c) _mm512_store_si512(row + c * 64, msb_codes64<NP>(pl, c * 8));
        }
    }
    inline void load(int64_t c) {
        for (int o = 0; o < 2; ++o) {
            __m512i r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm512_load_si512(codes + (8 * o + i) * in + c * 64);
            rows_to_octet_chunk(r, buf + o * kChunkBytes);
        }
    }
    inline const uint8_t* chunk(int o, int64_t) const { return buf + o * kChunkBytes; }
};

// y[t * ldy + i] for TT tokens and the block's first `rows` (<= 16) rows: rows 0-7 from octet chunk 0, 8-15
// from chunk 1. unit, zc: [G][16] per-lane coefficients (lane 2i: row i, lane 2i + 1: row 8 + i): s2 / 64, z'.
template <int NP, int TT, class Src>
void octets_dot(Src& src, const MwqMat& m, const float* unit, const float* zc, const QuantX& q, float* y,
                int64_t ldy, int rows) {
    constexpr int U = TT == 1 ? 2 : 1;  // accumulator chains per octet and token (VNNI latency at one token)
    const int64_t G = m.in / m.group_size, upg = m.group_size / 64, chunks = m.in / 64;
    const __m512i mask = _mm512_set1_epi8((char)(uint8_t)(0xff << (8 - NP)));
    __m512 out[TT];
    for (int t = 0; t < TT; ++t) out[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
        src.load(c);
        const uint8_t* pa = src.chunk(0, c);
        const uint8_t* pb = src.chunk(1, c);
        __m512i acc[2][TT][U];
        for (int o = 0; o < 2; ++o)
            for (int t = 0; t < TT; ++t)
                for (int u = 0; u < U; ++u) acc[o][t][u] = _mm512_setzero_si512();
        for (int u = 0; u < 8; ++u) {
            __m512i ra = _mm512_loadu_si512(pa + 64 * u), rb = _mm512_loadu_si512(pb + 64 * u);
            if (NP < 8) {
                ra = _mm512_and_si512(ra, mask);
                rb = _mm512_and_si512(rb, mask);
            }
            const __m512i a0 = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(ra));
            const __m512i a1 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(ra, 1));
            const __m512i b0 = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(rb));
            const __m512i b1 = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(rb, 1));
            const int64_t ka = c * 64 + 4 * kKq[2 * u], kb = c * 64 + 4 * kKq[2 * u + 1];
            for (int t = 0; t < TT; ++t) {
                const int16_t* xt = q.x16 + t * m.in;
                int64_t xa, xb;
                std::memcpy(&xa, xt + ka, 8);
                std::memcpy(&xb, xt + kb, 8);
                const __m512i va = _mm512_set1_epi64(xa), vb = _mm512_set1_epi64(xb);
                __m512i& s = acc[0][t][u % U];
                __m512i& d = acc[1][t][u % U];
                s = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(s, a0, va), a1, vb);
                d = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(d, b0, va), b1, vb);
            }
        }
        const int64_t g = c / upg;
        const __m512 un = _mm512_loadu_ps(unit + g * 16);
        for (int t = 0; t < TT; ++t) {
            __m512i sa = acc[0][t][0], sb = acc[1][t][0];
            if (U == 2) {
                sa = _mm512_add_epi32(sa, acc[0][t][U - 1]);
                sb = _mm512_add_epi32(sb, acc[1][t][U - 1]);
            }
            sa = _mm512_add_epi32(sa, _mm512_shuffle_epi32(sa, _MM_PERM_CDAB));  // row total in both its lanes
            sb = _mm512_add_epi32(sb, _mm512_shuffle_epi32(sb, _MM_PERM_CDAB));
            const __m512 v = _mm512_cvtepi32_ps(_mm512_mask_blend_epi32(0xaaaa, sa, sb));
            out[t] = _mm512_fmadd_ps(v, _mm512_mul_ps(un, _mm512_set1_ps(q.sx[t * G + g])), out[t]);
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        const __m512 z = _mm512_loadu_ps(zc + g * 16);
        for (int t = 0; t < TT; ++t) out[t] = _mm512_fmadd_ps(z, _mm512_set1_ps(q.xs[t * G + g]), out[t]);
    }
    const __m512i rows_of_lanes = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __mmask16 keep = rows >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
    for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(y + t * ldy, keep, _mm512_permutexvar_ps(rows_of_lanes, out[t]));
}

template <int NP, int TT>
void octets_block(const MwqMat& m, int64_t r0, int rows, const float* unit, const float* zc, const QuantX& q,
                  float* y, int64_t ldy) {
    if (m.codes) {
        CodeChunks src{};
        src.a = octet_chunks(m, r0 / 8, src.sa);
        if (rows > 8)
            src.b = octet_chunks(m, r0 / 8 + 1, src.sb);
        else
            src.b = src.a, src.sb = src.sa;
        octets_dot<NP, TT>(src, m, unit, zc, q, y, ldy, rows);
    } else {
        PlaneChunks<NP> src(m, r0, rows);
        octets_dot<NP, TT>(src, m, unit, zc, q, y, ldy, rows);
    }
}

template <int NP>
OctetsDot pick_octets(int tt) {
    switch (tt) {
        case 8: return octets_block<NP, 8>;
        case 4: return octets_block<NP, 4>;
        case 2: return octets_block<NP, 2>;
        default: return octets_block<NP, 1>;
    }
}

OctetsDot octets_for(int bits, int tt) {
    switch (bits) {
        case 2: return pick_octets<2>(tt);
        case 3: return pick_octets<3>(tt);
        case 4: return pick_octets<4>(tt);
        case 5: return pick_octets<5>(tt);
        case 6: return pick_octets<6>(tt);
        case 7: return pick_octets<7>(tt);
        default: return pick_octets<8>(tt);
    }
}

// The block's per-lane coefficients from a byte-code matrix's lane-ordered scalars (mwq_common.h lane_index),
// with row_coefficients' arithmetic: unit = s2 / 64, z' = z - s2 * (1/2 - 2^(1 - bits)) (one fused op).
inline void octet_lanes_of_codes(const MwqMat& m, int bits, int64_t r0, float* unit, float* zc) {
    const int64_t G = m.in / m.group_size;
    const __m512 tail = _mm512_set1_ps(0.5f - 1.f / (float)(1 << (bits - 1)));
    for (int64_t g = 0; g < G; ++g) {
        const __m512 s2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(m.base_scale + r0 * G + g * 16)));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(m.offset + r0 * G + g * 16)));
        _mm512_storeu_ps(unit + g * 16, _mm512_mul_ps(s2, _mm512_set1_ps(1.f / 64.f)));
        _mm512_storeu_ps(zc + g * 16, _mm512_fnmadd_ps(s2, tail, z));
    }
}

// The block's per-lane coefficients (see octets_dot) from each row's z' and s2 ([G] each, row-major [16][G]).
// One gather per group and array (the scalar loop with its lane arithmetic was ~10 % of a one-token call).
inline void octet_lanes(const float* zc_rows, const float* s2_rows, int64_t G, int rows, float* unit, float* zc) {
    const __m512i lane_rows = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __mmask16 valid = _mm512_cmplt_epi32_mask(lane_rows, _mm512_set1_epi32(rows));
    const __m512i at = _mm512_mullo_epi32(lane_rows, _mm512_set1_epi32((int)G));
    for (int64_t g = 0; g < G; ++g) {
        const __m512i idx = _mm512_add_epi32(at, _mm512_set1_epi32((int)g));
        const __m512 s2 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, s2_rows, 4);
        _mm512_storeu_ps(unit + g * 16, _mm512_mul_ps(s2, _mm512_set1_ps(1.f / 64.f)));
        _mm512_storeu_ps(zc + g * 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, zc_rows, 4));
    }
}
#else
OctetsDot octets_for(int, int) { return nullptr; }
inline void octet_lanes(const float*, const float*, int64_t, int, float*, float*) {}
inline void octet_lanes_of_codes(const MwqMat&, int, int64_t, float*, float*) {}
#endif

}  // namespace
