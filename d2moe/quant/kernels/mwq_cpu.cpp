// MWQ CPU kernels: products with nested (2-bit base + sign planes) weights straight from packed bytes.
//
// Layout (see d2moe/quant/pack.py): per matrix [out, in], G = in / group_size groups per row
//   offset z, base scale s2: fp16 [out, G]; base: uint8 [out, 2, in/8] (bit-planes 0 and 1 of the 2-bit
//   code); plane i = 3..bits: uint8 [out, in/8], scale fp16 [out, G] (residual) or s2 / 2^(i-1) (msb).
//   Bit t of byte k of a row is column 8k + t, so 16 (32) columns are one uint16 (uint32) lane mask.
//
// With sigma = 2*bit - 1 the weight is  W = z' + s2*b0 + 2*s2*b1 + sum_i 2*s_i*bit_i,  z' = z - sum_i s_i.
// Kernels, all reading only the packed bytes (chosen per matrix and token count by int16_kind):
//  * msb, 1..16 tokens (any count for byte codes), `octets_dot` (mwq_octets.h): 16 rows at a time, 8x8 bit
//    transposes (VBMI + GFNI) rebuild the 8-bit msb codes of 64 columns from the planes (or byte codes are
//    read as they are), VNNI int16 multiply-adds with one activation broadcast per 8 rows x 4 columns.
//  * residual, 1..3 tokens, `row_dot_i16`: per plane one masked int16 add per 32 columns, int32 -> float,
//    times the plane's scale (~2x the float kernel).
//    Both quantize activations to int16 per token and weight group (msb: 15 bits, residual: 14 bits), which
//    adds ~1e-4 relative error per matrix (exact=1 turns them off).
//  * otherwise `row_dot`: each 16-column chunk is decoded in registers by one masked float add per plane
//    and used for a tile of up to 8 tokens.
//  * prefill: `mwq_decode` writes float32 rows for a BLAS GEMM.
// mwq_experts_ffn runs whole SwiGLU experts (one, or a decode step's chosen experts for the same tokens)
// in one parallel region (gate/up rows, then down rows) and sums them with their combine weights.
// Threads: OpenMP over output rows (the process's libgomp, shared with torch).
// The AVX-512 kernels need group_size % 16 == 0 (masked int16: % 32, GFNI: % 64); the portable path % 8.
//
// Files: mwq_common.h (view, coefficients, byte-code layout, int16 activations), mwq_float.h (float kernels),
// mwq_int16.h (masked int16 kernel, GFNI code rebuild), mwq_octets.h (the msb kernel and its layout),
// mwq_int8_dense.h (per-row int8 dense matrices), mwq_q8_dense.h (int8 blocks x int8 activations),
// mwq_f16_dense.h (fp16 dense matrices), mwq_attention.h (decode attention), this file (dispatch, threading,
// C API).

#include "mwq_common.h"
#include "mwq_float.h"
#include "mwq_int16.h"
#include "mwq_octets.h"
#include "mwq_int8_dense.h"
#include "mwq_f16_dense.h"
#include "mwq_q8_dense.h"
#include "mwq_attention.h"

namespace {

using RowDot = void (*)(const MwqMat&, int64_t, const float*, const float*, const float*, int64_t, float*, int64_t);
using RowDecode = void (*)(const MwqMat&, int64_t, const float*, const float*, float*);

template <int NP>
RowDot pick_dot(int tt) {
    switch (tt) {
        case 8: return row_dot<NP, 8>;
        case 4: return row_dot<NP, 4>;
        case 3: return row_dot<NP, 3>;
        case 2: return row_dot<NP, 2>;
        default: return row_dot<NP, 1>;
    }
}

RowDot dot_for(int bits, int tt) {
    switch (bits) {
        case 2: return pick_dot<2>(tt);
        case 3: return pick_dot<3>(tt);
        case 4: return pick_dot<4>(tt);
        case 5: return pick_dot<5>(tt);
        case 6: return pick_dot<6>(tt);
        case 7: return pick_dot<7>(tt);
        default: return pick_dot<8>(tt);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
RowDecode decode_codes_for(int bits) {
    switch (bits) {
        case 2: return row_decode_codes<2>;
        case 3: return row_decode_codes<3>;
        case 4: return row_decode_codes<4>;
        case 5: return row_decode_codes<5>;
        case 6: return row_decode_codes<6>;
        case 7: return row_decode_codes<7>;
        default: return row_decode_codes<8>;
    }
}
#else
RowDecode decode_codes_for(int) { return nullptr; }
#endif

RowDecode decode_for(int bits) {
    switch (bits) {
        case 2: return row_decode<2>;
        case 3: return row_decode<3>;
        case 4: return row_decode<4>;
        case 5: return row_decode<5>;
        case 6: return row_decode<6>;
        case 7: return row_decode<7>;
        default: return row_decode<8>;
    }
}

bool supported(const MwqMat& m, int bits) {
    if (bits < 2 || bits > 8 || m.group_size <= 0 || m.in % m.group_size) return false;
    return m.group_size % (kAvx512 ? 16 : 8) == 0;
}

// Which kernel reads the rows for T tokens: 2 = GFNI msb codes, 1 = masked int16 sums (both on int16
// activations), 0 = float register decode.
inline bool is_msb(const MwqMat& m, int bits) { return bits == 2 || m.scales[0] == nullptr; }
int int16_kind(const MwqMat& m, int bits, int64_t T) {
    if (m.group_size > 1024) return 0;
    // byte codes: no decode to amortise, so the code kernel beats decode + GEMM at any token count
    if ((T <= kGfniMaxTokens || (m.codes && kGfniMaxTokens > 0)) && m.group_size % 64 == 0 && is_msb(m, bits))
        return 2;
    if (T <= kI16MaxTokens && m.group_size % 32 == 0) return 1;
    return 0;
}

// Activations quantized for the int16 kernels, owned buffers ([T, in] int16, [T, G] scales and sums).
struct QuantBuffers {
    std::vector<int16_t> x16;
    std::vector<float> sx, xs;
    QuantX view() const { return QuantX{x16.data(), sx.data(), xs.data()}; }
    void fill(const float* x, int64_t T, int64_t in, int64_t gs, float qmax) {
        x16.resize(T * in);
        sx.resize(T * (in / gs));
        xs.resize(T * (in / gs));
        quantize_tokens(x, T, in, gs, qmax, x16.data(), sx.data(), xs.data());
    }
};

// One matrix's rows for T tokens: blocks of 16 rows through the octet kernel (int16 activations, msb, see
// int16_kind), else one row at a time in token tiles (8, 4, 3, 2, 1): the masked int16 kernel, or register
// decode. Per-row coefficients computed once per call.
struct RowWork {
    const MwqMat& m;
    int bits;
    std::vector<float> zc, coef, lane_unit, lane_zc;
    RowDot tiles[9] = {};      // float register decode, per tile size
    OctetsDot octets[9] = {};  // 16-row blocks on int16 activations, per tile size (8, 4, 2, 1)
    RowDotI16 masked[4] = {};  // masked int16 kernel, per token count 1..3
    RowWork(const MwqMat& mat, int b)
        : m(mat), bits(b), zc(16 * (mat.in / mat.group_size)), coef(16 * b * (mat.in / mat.group_size)),
          lane_unit(16 * (mat.in / mat.group_size)), lane_zc(16 * (mat.in / mat.group_size)) {
        for (int tt : {8, 4, 3, 2, 1}) tiles[tt] = dot_for(bits, tt);
        if (kGfniMaxTokens > 0)
            for (int tt : {8, 4, 2, 1}) octets[tt] = octets_for(bits, tt);
#if defined(__AVX512F__) && defined(__AVX512BW__)
        for (int t = 1; t <= kI16MaxTokens; ++t)
            masked[t] = dot_i16_for(bits, t, is_msb(m, bits), m.group_size % 64 == 0 ? 2 : 1);
#endif
    }
    // Rows per call of dot(): a 16-row block for the octet kernel, else 1 (either handles any count up to it).
    int64_t rows_per_call(int64_t T, const QuantX* qx) const {
        return qx != nullptr && int16_kind(m, bits, T) == 2 ? 16 : 1;
    }
    // y[t * ldy + i] = (W x_t)[r + i] for all T tokens and the n (<= 16) rows from r (r % 16 == 0 when n > 1).
    void dot(int64_t r, const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy, const QuantX* qx,
             int64_t n = 1) {
        const int kind = qx != nullptr ? int16_kind(m, bits, T) : 0;
        if (kind == 2) {
            const int64_t G = m.in / m.group_size;
            if (m.codes) {  // scalars already in lane order
                octet_lanes_of_codes(m, bits, r, lane_unit.data(), lane_zc.data());
            } else {
                for (int64_t i = 0; i < n; ++i)
                    row_coefficients(m, bits, r + i, zc.data() + i * G, coef.data() + i * G, /*s2_only=*/true);
                octet_lanes(zc.data(), coef.data(), G, (int)n, lane_unit.data(), lane_zc.data());
            }
            int64_t t = 0;
            for (int tt : {8, 4, 2, 1})
                for (; T - t >= tt; t += tt) {
                    const QuantX qt{qx->x16 + t * m.in, qx->sx + t * G, qx->xs + t * G};
                    octets[tt](m, r, (int)n, lane_unit.data(), lane_zc.data(), qt, y + t * ldy, ldy);
                }
            return;
        }
        for (int64_t i = 0; i < n; ++i) {
            if (m.codes) {  // byte codes, a kernel that reads planes: this row's planes rebuilt
                row_tmp.resize(2 * m.in + 4 * (m.in / m.group_size));
                const MwqMat v = planes_of_code_row(m, r + i, row_tmp.data());
                dot_row(v, 0, x, ldx, T, y + i, ldy, qx, kind);
            } else {
                dot_row(m, r + i, x, ldx, T, y + i, ldy, qx, kind);
            }
        }
    }

  private:
    std::vector<uint8_t> row_tmp;
    void dot_row(const MwqMat& mm, int64_t r, const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy,
                 const QuantX* qx, int kind) {
        if (kind == 1) {
            row_coefficients(mm, bits, r, zc.data(), coef.data(), /*s2_only=*/true);
            masked[T](mm, r, zc.data(), coef.data(), *qx, y, ldy);
            return;
        }
        row_coefficients(mm, bits, r, zc.data(), coef.data());
        int64_t t = 0;
        for (int tt : {8, 4, 3, 2, 1})
            for (; T - t >= tt; t += tt) tiles[tt](mm, r, zc.data(), coef.data(), x + t * ldx, ldx, y + t * ldy, ldy);
    }
};

// Quantized activations when an int16 kernel applies to this matrix and T, else null (float x is read).
const QuantX* maybe_quantize(QuantBuffers& buf, QuantX& view, const MwqMat& m, int bits, const float* x,
                             int64_t T) {
    const int kind = int16_kind(m, bits, T);
    if (kind == 0) return nullptr;
    buf.fill(x, T, m.in, m.group_size, kind == 2 ? 32767.f : 16383.f);
    view = buf.view();
    return &view;
}

// Byte codes from planes, in place, in octet order (see code_row in mwq_common.h); the caller checked the
// shape (out % 64 == 0, in % 64 == 0) and that this build has the code kernels.
void planes_to_codes(MwqMat& m) {
    std::vector<uint8_t> codes(m.out * m.in);  // row r's place at r * in, as if the segments were one array
#if defined(__GFNI__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
    for (int64_t o = 0; o < m.out / 8; ++o) {
        const uint8_t* pl[8][8];
        for (int i = 0; i < 8; ++i) row_planes(m, 8, 8 * o + i, pl[i]);
        const OctetPlace at = octet_place(m, o);
        uint8_t* dst = codes.data() + at.row * m.in + at.offset;
        for (int64_t c = 0; c < m.in / 64; ++c) {
            __m512i rows[8];
            for (int i = 0; i < 8; ++i) rows[i] = msb_codes64<8>(pl[i], c * 8);
            rows_to_octet_chunk(rows, dst + c * at.stride);
        }
    }
#endif  // (else unreachable: mwq_to_codes refuses builds without the code kernels)
    m.codes = 1;
    for (int64_t o = 0; o < m.out / 8; ++o)
        std::memcpy(const_cast<uint8_t*>(code_row(m, 8 * o)), codes.data() + o * 8 * m.in, 8 * m.in);
    const int64_t G = m.in / m.group_size;  // offsets and base scales into lane order (lane_index)
    std::vector<uint16_t> h(m.out * G);
    for (uint16_t* a : {const_cast<uint16_t*>(m.offset), const_cast<uint16_t*>(m.base_scale)}) {
        for (int64_t r = 0; r < m.out; ++r)
            for (int64_t g = 0; g < G; ++g) h[lane_index(r, G, g)] = a[r * G + g];
        std::memcpy(a, h.data(), h.size() * 2);
    }
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

#if defined(__AVX512F__)
// exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), Cephes' degree-6 polynomial for
// exp(r), times 2^n: within 8.4e-8 relative of exp over [-87, 88] (measured; clamped outside, where silu
// gives v or -0).
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(y, n);
}
#endif

// a[i] = silu(a[i]) * up[i], i < n: SwiGLU's product, elementwise (a value gets the same bits from every
// caller). AVX-512: 16 at a time with exp16; std::exp per value took ~8 % of a 12-token expert call.
inline void silu_mul(float* a, const float* up, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(k, a + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
        const __m512 s = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        _mm512_mask_storeu_ps(a + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, up + i)));
    }
#endif
    for (; i < n; ++i) a[i] = silu(a[i]) * up[i];
}

// 0 when an expert's (w1, w3, w2) run at `bits` with w1/w3 [I, H] and w2 [H, I]; -1: a width or group this
// build does not run, -2: shapes that are not one SwiGLU expert of the layer's size.
inline int expert_unfit(const MwqMat* const* m, int bits, int64_t I, int64_t H) {
    if (!supported(*m[0], bits) || !supported(*m[1], bits) || !supported(*m[2], bits)) return -1;
    if (m[0]->out != I || m[0]->in != H || m[1]->out != I || m[1]->in != H || m[2]->out != H || m[2]->in != I)
        return -2;
    return 0;
}

// Rows [r, r + rows) of one expert's SwiGLU hidden layer for T tokens: a[t * I + r + i] = silu(gate) * up,
// with `up` a caller scratch of n1 x T (both calls below take this one block, so they share its bits).
inline void gate_up_block(RowWork& w1, RowWork& w3, int64_t r, int64_t rows, const float* x, int64_t H, int64_t T,
                          const QuantX* qx, float* a, int64_t I, float* up, int64_t n1) {
    w1.dot(r, x, H, T, a + r, I, qx, rows);
    w3.dot(r, x, H, T, up, n1, qx, rows);
    for (int64_t t = 0; t < T; ++t) silu_mul(a + t * I + r, up + t * n1, rows);
}

}  // namespace

extern "C" {

int mwq_has_avx512() { return kAvx512 ? 1 : 0; }

// y [T, out] = x [T, in] @ W_bits^T.  exact != 0: float activations throughout (no int16 few-token kernel).
// Returns 0, or -1 if the shape is unsupported.
int mwq_matmul(const MwqMat* m, int bits, const float* x, int64_t T, float* y, int exact, int nthreads) {
    if (!supported(*m, bits)) return -1;
    QuantBuffers qbuf;
    QuantX qview;
    const QuantX* qx = exact ? nullptr : maybe_quantize(qbuf, qview, *m, bits, x, T);
#pragma omp parallel num_threads(nthreads)
    {
        RowWork work(*m, bits);
        const int64_t n = work.rows_per_call(T, qx);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (m->out + n - 1) / n; ++b)
            work.dot(b * n, x, m->in, T, y + b * n, m->out, qx, std::min(n, m->out - b * n));
    }
    return 0;
}

// The most tokens (1..kGfniMaxTokens) one call may take while every token is computed exactly as it would be alone:
// token tiles share arithmetic, but the kernel kind (int16 activations or float) changes with T. A batch
// split into calls of at most this many tokens per matrix gives each token the same bits at any batch size.
int mwq_invariant_tokens(const MwqMat* m, int bits) {
    const int first = int16_kind(*m, bits, 1);
    int t = 1;
    const int most = kGfniMaxTokens > 16 ? kGfniMaxTokens : 16;
    while (t < most && int16_kind(*m, bits, t + 1) == first) ++t;
    return t;
}

// Rows [r0, r1) of W_bits as float32 [r1 - r0, in] (for GEMM on large token counts, a block of rows at a
// time so the float copy stays small whatever the matrix).
int mwq_decode_rows(const MwqMat* m, int bits, int64_t r0, int64_t r1, float* w, int nthreads) {
    if (!supported(*m, bits) || r0 < 0 || r1 > m->out || r0 > r1) return -1;
    // byte codes exist only where mwq_to_codes found the code kernels (AVX-512), so decode_codes is set then
    const RowDecode decode = decode_for(bits), decode_codes = decode_codes_for(bits);
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t G = m->in / m->group_size;
        std::vector<float> zc(G), coef(bits * G);
#pragma omp for schedule(static)
        for (int64_t r = r0; r < r1; ++r) {
            row_coefficients(*m, bits, r, zc.data(), coef.data());
            (m->codes ? decode_codes : decode)(*m, r, zc.data(), coef.data(), w + (r - r0) * m->in);
        }
    }
    return 0;
}

// Turn an msb matrix of 8 planes into byte codes in place (see code_row); its views then read codes.
// Returns 0, or -1 when it cannot be held that way (not msb / 8 planes, out % 8, in % 64, no code kernel).
// check_only: only say whether it could.
int mwq_to_codes(MwqMat* m, int check_only) {
    if (kGfniMaxTokens == 0 || m->codes || m->scales[0] != nullptr || m->planes[5] == nullptr || m->out % 64 ||
        m->in % 64 || m->group_size % 64 || m->group_size > 1024 || !supported(*m, 8))
        return -1;
    if (check_only) return 0;
    planes_to_codes(*m);
    return 0;
}

// W_bits as float32 [out, in].
int mwq_decode(const MwqMat* m, int bits, float* w, int nthreads) {
    return mwq_decode_rows(m, bits, 0, m->out, w, nthreads);
}

// n SwiGLU experts on the same T tokens, summed: y [T, H] = sum_e weights[e] * expert_e(x).
// mats: 3n pointers (w1, w3, w2 of expert 0, then of expert 1, ...); act: caller scratch [n, T, I].
// One parallel region per layer instead of one per expert: gate/up rows of all experts, then down rows,
// where each thread owns output rows and sums over experts in order (no atomics, fixed summation order).
int mwq_experts_ffn(int n, const MwqMat* const* mats, int bits, const float* x, int64_t T, const float* weights,
                    float* act, float* y, int exact, int nthreads) {
    if (n <= 0) return -3;
    const int64_t I = mats[0]->out, H = mats[0]->in, gs = mats[0]->group_size;
    for (int e = 0; e < n; ++e) {
        if (const int rc = expert_unfit(mats + 3 * e, bits, I, H)) return rc;
        if (mats[3 * e]->group_size != gs || mats[3 * e + 1]->group_size != gs || mats[3 * e + 2]->group_size != gs)
            return -2;
    }
    QuantBuffers qx_buf;
    QuantX qx_view;
    const QuantX* qx = exact ? nullptr : maybe_quantize(qx_buf, qx_view, *mats[0], bits, x, T);
    std::vector<QuantBuffers> qa_buf(n);
    std::vector<QuantX> qa_view(n);
    std::vector<const QuantX*> qa(n, nullptr);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<RowWork> g1, g3, g2;
        g1.reserve(n), g3.reserve(n), g2.reserve(n);
        for (int e = 0; e < n; ++e) {
            g1.emplace_back(*mats[3 * e], bits);
            g3.emplace_back(*mats[3 * e + 1], bits);
            g2.emplace_back(*mats[3 * e + 2], bits);
        }
        std::vector<float> up(16 * T), part(16 * T);
        // rows per call: the most any expert takes (a layer's experts may be held as codes or planes)
        int64_t n1 = 1, n2 = 1;
        for (int e = 0; e < n; ++e) n1 = std::max(n1, g1[e].rows_per_call(T, qx));
        const int64_t b1 = (I + n1 - 1) / n1;  // blocks per expert
#pragma omp for schedule(static)
        for (int64_t k = 0; k < n * b1; ++k) {
            const int64_t e = k / b1, r = k % b1 * n1, rows = std::min(n1, I - r);
            float* a = act + e * T * I;
            gate_up_block(g1[e], g3[e], r, rows, x, H, T, qx, a, I, up.data(), n1);
        }  // implicit barrier: every act complete
#pragma omp for schedule(static)
        for (int e = 0; e < n; ++e)
            qa[e] = exact ? nullptr : maybe_quantize(qa_buf[e], qa_view[e], *mats[3 * e + 2], bits, act + e * T * I, T);
        // implicit barrier: qa visible to all threads
        // Expert-major: a thread streams one expert's planes at a time (interleaving all experts' rows
        // meant 8 planes x n experts of concurrent streams, and was slower at 8 bits). Static schedules of
        // equal loops give a thread the same rows for every e, so `nowait` is safe and y needs no atomics.
        for (int e = 0; e < n; ++e) n2 = std::max(n2, g2[e].rows_per_call(T, qa[e]));
        for (int e = 0; e < n; ++e) {
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < (H + n2 - 1) / n2; ++b) {
                const int64_t r = b * n2, rows = std::min(n2, H - r);
                g2[e].dot(r, act + e * T * I, I, T, part.data(), n2, qa[e], rows);
                for (int64_t i = 0; i < rows; ++i)
                    for (int64_t t = 0; t < T; ++t) {
                        // product rounded, then added (no fused multiply-add): the same bits as torch's
                        // `y * w` then `index_add_`, so a lone decode row equals the batched step's grouping
                        const volatile float prod = weights[e] * part[t * n2 + i];
                        y[t * H + r + i] = (e ? y[t * H + r + i] : 0.f) + prod;
                    }
            }
        }
    }
    return 0;
}

// A batched step's expert products in one call: span s runs SwiGLU expert s (mats 3s..3s+2, width bits[s])
// on its rows [spans[2s], spans[2s+1]) of x [N, H], and y's rows = w[row] * expert(row): one product, rounded
// once, the bits `mwq_experts_ffn` (one expert, weight 1) then torch's `y * w` give. Spans are disjoint; rows
// outside every span are left as they are. act: caller scratch [sum of span rows, I]. One parallel region
// for all of a layer's experts: per-expert calls from Python cost ~60 us each (ctypes, tensors, slicing),
// more than a 16-row step's kernel time for a small expert, and each opened its own parallel region.
// Dynamic schedules: spans differ in rows, and a thread that loses its core holds up only its own block.
int mwq_spans_ffn(int n, const MwqMat* const* mats, const int* bits, const int64_t* spans, int64_t N,
                  const float* x, const float* w, float* act, float* y, int nthreads) {
    if (n <= 0) return -3;
    const int64_t I = mats[0]->out, H = mats[0]->in;
    int64_t most = 1;
    std::vector<int64_t> at(n);  // each span's first row in act
    for (int s = 0; s < n; ++s) {
        at[s] = s ? at[s - 1] + spans[2 * s - 1] - spans[2 * s - 2] : 0;
        if (const int rc = expert_unfit(mats + 3 * s, bits[s], I, H)) return rc;
        if (mats[3 * s + 1]->group_size != mats[3 * s]->group_size) return -2;  // gate and up share x's quantization
        if (spans[2 * s] < 0 || spans[2 * s + 1] <= spans[2 * s] || spans[2 * s + 1] > N) return -4;
        most = std::max(most, spans[2 * s + 1] - spans[2 * s]);
    }
    std::vector<QuantBuffers> qx_buf(n), qa_buf(n);
    std::vector<QuantX> qx_view(n), qa_view(n);
    std::vector<const QuantX*> qx(n, nullptr), qa(n, nullptr);
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<RowWork> g1, g3, g2;
        g1.reserve(n), g3.reserve(n), g2.reserve(n);
        for (int s = 0; s < n; ++s) {
            g1.emplace_back(*mats[3 * s], bits[s]);
            g3.emplace_back(*mats[3 * s + 1], bits[s]);
            g2.emplace_back(*mats[3 * s + 2], bits[s]);
        }
        std::vector<float> up(16 * most), part(16 * most);
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < n; ++s)
            qx[s] = maybe_quantize(qx_buf[s], qx_view[s], *mats[3 * s], bits[s], x + spans[2 * s] * H,
                                   spans[2 * s + 1] - spans[2 * s]);
        // implicit barrier: qx visible to all threads
        int64_t n1 = 1, n2 = 1;
        for (int s = 0; s < n; ++s) n1 = std::max(n1, g1[s].rows_per_call(spans[2 * s + 1] - spans[2 * s], qx[s]));
        const int64_t b1 = (I + n1 - 1) / n1;  // blocks per span
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < n * b1; ++k) {
            const int64_t s = k / b1, r = k % b1 * n1, rows = std::min(n1, I - r);
            const int64_t a0 = spans[2 * s], T = spans[2 * s + 1] - a0;
            float* a = act + at[s] * I;
            gate_up_block(g1[s], g3[s], r, rows, x + a0 * H, H, T, qx[s], a, I, up.data(), n1);
        }  // implicit barrier: every act complete
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < n; ++s)
            qa[s] = maybe_quantize(qa_buf[s], qa_view[s], *mats[3 * s + 2], bits[s], act + at[s] * I,
                                   spans[2 * s + 1] - spans[2 * s]);
        // implicit barrier: qa visible to all threads
        for (int s = 0; s < n; ++s) n2 = std::max(n2, g2[s].rows_per_call(spans[2 * s + 1] - spans[2 * s], qa[s]));
        const int64_t b2 = (H + n2 - 1) / n2;
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < n * b2; ++k) {
            const int64_t s = k / b2, r = k % b2 * n2, rows = std::min(n2, H - r);
            const int64_t a0 = spans[2 * s], T = spans[2 * s + 1] - a0;
            g2[s].dot(r, act + at[s] * I, I, T, part.data(), n2, qa[s], rows);
            for (int64_t i = 0; i < rows; ++i)
                for (int64_t t = 0; t < T; ++t) y[(a0 + t) * H + r + i] = w[a0 + t] * part[t * n2 + i];
        }
    }
    return 0;
}

// y [T, N] = x [T, K] @ (q * scale[:, None])^T for a per-row int8 matrix (q int8 [N, K], scale bf16 [N]),
// T <= 64. Returns 0, or -1 when this build or shape has no such kernel (the caller keeps torch's).
int mwq_int8_linear(const int8_t* q, const uint16_t* scale, int64_t N, int64_t K, const float* x, int64_t T,
                    float* y, int nthreads) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (K % 64 != 0 || T < 1 || T > 64) return -1;
    QuantBuffers buf;
    buf.fill(x, T, K, 64, 32767.f);
    const QuantX qx = buf.view();
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < N; ++r) {
        const int8_t* row = q + r * K;
        const float s = bf16_to_float(scale[r]);
        int64_t t = 0;
        for (; T - t >= 4; t += 4) {
            const QuantX xt{qx.x16 + t * K, qx.sx + t * (K / 64), qx.xs + t * (K / 64)};
            int8_row_dot<4>(row, s, K, xt, y + t * N + r, N);
        }
        for (; t < T; ++t) {
            const QuantX xt{qx.x16 + t * K, qx.sx + t * (K / 64), qx.xs + t * (K / 64)};
            int8_row_dot<1>(row, s, K, xt, y + t * N + r, N);
        }
    }
    return 0;
#else
    (void)q, (void)scale, (void)N, (void)K, (void)x, (void)T, (void)y, (void)nthreads;
    return -1;
#endif
}

// out [n, H] = x / sqrt(mean(x^2) + eps) * w, fp32 rows (RMSNorm): one call for a decode step's norm, where
// torch's composite takes six ops. Each row is computed alone (batch invariant).
int mwq_rms_norm(const float* x, const float* w, int64_t n, int64_t H, float eps, float* out) {
    for (int64_t r = 0; r < n; ++r) {
        const float* xr = x + r * H;
        float* o = out + r * H;
        double ss = 0.0;
        for (int64_t j = 0; j < H; ++j) ss += (double)xr[j] * xr[j];
        const float inv = (float)(1.0 / std::sqrt(ss / (double)H + (double)eps));
        for (int64_t j = 0; j < H; ++j) o[j] = w[j] * (xr[j] * inv);
    }
    return 0;
}

// y [T, N] = x [T, K] @ w^T for an fp16 matrix w [N, K] and fp32 x (mwq_f16_dense.h); K % 16 == 0.
int mwq_f16_linear(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t T, float* y, int nthreads) {
#if defined(__AVX512F__)
    if (K % 16 != 0 || T < 1) return -1;
    // Up to 3 tokens the weights stream from memory once: one row at a time reads them sequentially (the
    // head of the default model, one token: 2.1 ms; tiles of 4 or 8 interleaved rows 4.9 ms; torch 3.3 ms).
    // From 4 tokens on the FMAs bound it: tiles of 4 rows x 4 tokens share each load.
    const int64_t TB = 64;  // tokens per block: its activations stay in L2 across row tiles
    const int64_t R = T < 4 ? 1 : 4, tiles = N / R;
#pragma omp parallel num_threads(nthreads)
    for (int64_t t0 = 0; t0 < T; t0 += TB) {
        const int64_t tb = T - t0 < TB ? T - t0 : TB;
        const float* xb = x + t0 * K;
        float* yb = y + t0 * N;
#pragma omp for schedule(static)
        for (int64_t i = 0; i <= tiles; ++i) {
            if (i == tiles) {
                for (int64_t r = tiles * R; r < N; ++r) f16_rows<1>(w + r * K, K, xb, tb, yb + r, N);
            } else if (R == 1) {
                f16_rows<1>(w + i * K, K, xb, tb, yb + i, N);
            } else {
                f16_rows<4>(w + i * 4 * K, K, xb, tb, yb + i * 4, N);
            }
        }
    }
    return 0;
#else
    (void)w, (void)N, (void)K, (void)x, (void)T, (void)y, (void)nthreads;
    return -1;
#endif
}

// y [T, N] = x [T, K] @ w^T for a blocked fp16 matrix (mwq_f16_dense.h f16_block; blocks [ceil(N/16)][K][16],
// rows past N zero); K % 2 == 0. Blocks are split over threads; each block's bytes stream once per 8 tokens,
// and the next ones are prefetched into L2 (left to the hardware prefetcher one token streamed far below DRAM
// speed, as in mwq_octets.h).
int mwq_f16_blocks_linear(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t T, float* y,
                          int nthreads) {
#if defined(__AVX512F__)
    if (K % 2 != 0 || T < 1) return -1;
    const int64_t nb = (N + 15) / 16, bytes = 32 * K;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nb; ++b) {
        const uint16_t* blk = w + b * 16 * K;
        const int rows = (int)std::min<int64_t>(16, N - b * 16);
        int64_t t = 0;
        for (; T - t >= 8; t += 8) f16_block<8>(blk, K, x + t * K, y + t * N + b * 16, N, rows);
        for (; T - t >= 4; t += 4) f16_block<4>(blk, K, x + t * K, y + t * N + b * 16, N, rows);
        for (; t < T; ++t) f16_block<1>(blk, K, x + t * K, y + t * N + b * 16, N, rows);
    }
    return 0;
#else
    (void)w, (void)N, (void)K, (void)x, (void)T, (void)y, (void)nthreads;
    return -1;
#endif
}

// y [T, N] = x [T, K] @ W^T for int8 blocks (mwq_q8_dense.h: blocks [ceil(N/16)][K/4][16][4] uint8 = w + 128,
// scales [ceil(N/16)][K/64][16] bf16); K % 64 == 0. The activations are quantized once per call (each token
// alone), then blocks are split over threads, each streaming once per 8 tokens.
int mwq_q8_blocks_linear(const uint8_t* w, const uint16_t* ws, int64_t N, int64_t K, const float* x, int64_t T,
                         float* y, int nthreads) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    if (K % kQ8Group != 0 || T < 1 || N < 1) return -1;
    const int64_t G = K / kQ8Group, nb = (N + 15) / 16;
    std::vector<int8_t> x8((size_t)(T * K));
    std::vector<float> sx((size_t)(T * G));
    std::vector<int32_t> cx((size_t)(T * G));
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t)
            quantize_q8(x + t * K, 1, K, x8.data() + t * K, sx.data() + t * G, cx.data() + t * G);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t* blk = w + b * 16 * K;
            const uint16_t* wsb = ws + b * 16 * G;
            const int rows = (int)std::min<int64_t>(16, N - b * 16);
            float* yb = y + b * 16;
            int64_t t = 0;
            for (; T - t >= 8; t += 8)
                q8_block<8>(blk, wsb, K, x8.data() + t * K, sx.data() + t * G, cx.data() + t * G, yb + t * N, N, rows);
            for (; T - t >= 4; t += 4)
                q8_block<4>(blk, wsb, K, x8.data() + t * K, sx.data() + t * G, cx.data() + t * G, yb + t * N, N, rows);
            for (; t < T; ++t)
                q8_block<1>(blk, wsb, K, x8.data() + t * K, sx.data() + t * G, cx.data() + t * G, yb + t * N, N, rows);
        }
    }
    return 0;
#else
    (void)w, (void)ws, (void)N, (void)K, (void)x, (void)T, (void)y, (void)nthreads;
    return -1;
#endif
}

// Decode rows' attention in one call: row i is one new token of the sequence in cache slot slots[i] at
// position positions[i] (models/layers.py `attention` for one token, models/ragged.py for a step of decode
// rows). Its q and k of qkv [n, (nH + 2 nKV) D] are rotated as Rope.rotate does (x cos + roll(x, D/2)
// sin_signed with the tables' row at the position: the product x cos rounded, then one fused multiply-add,
// as torch's addcmul), k and v written at the position of its slot (keys of (slot, kv head) at k + slot *
// k_slot + head * k_head, rows of D floats; values likewise), then attend_one over position + 1 cached
// positions, as mwq_decode_attention. The same bits as those steps op by op, ~20 torch ops a layer saved.
// cos, sin: [P, D] tables. out [n, nH * D]. Rows must not share a slot.
int mwq_decode_rope_attention(const float* qkv, int64_t n, int64_t nH, int64_t nKV, int64_t D, const float* cos,
                              const float* sin, float* kc, int64_t k_slot, int64_t k_head, float* vc,
                              int64_t v_slot, int64_t v_head, const int64_t* slots, const int64_t* positions,
                              int64_t max_len, float scale, float* out, int nthreads) {
#if defined(__AVX512F__)
    if (D % 32 != 0 || nKV <= 0 || nH % nKV != 0 || n <= 0) return -1;
    int64_t longest = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (positions[i] < 0 || positions[i] >= max_len) return -1;
        longest = positions[i] + 1 > longest ? positions[i] + 1 : longest;
    }
    const int64_t half = D / 2, group = nH / nKV, width = (nH + 2 * nKV) * D;
    std::vector<float> q((size_t)(n * nH * D));
    for (int64_t i = 0; i < n; ++i) {
        const float *c = cos + positions[i] * D, *s = sin + positions[i] * D, *x = qkv + i * width;
        auto rotate = [&](const float* xh, float* y) {
            for (int64_t d = 0; d < D; d += 16) {
                const int64_t r = d < half ? d + half : d - half;  // roll(x, D/2)[d] = x[d - D/2 mod D]
                const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(xh + d), _mm512_loadu_ps(c + d));
                _mm512_storeu_ps(y + d, _mm512_fmadd_ps(_mm512_loadu_ps(xh + r), _mm512_loadu_ps(s + d), t));
            }
        };
        for (int64_t h = 0; h < nH; ++h) rotate(x + h * D, q.data() + (i * nH + h) * D);
        for (int64_t h = 0; h < nKV; ++h) {
            rotate(x + (nH + h) * D, kc + slots[i] * k_slot + h * k_head + positions[i] * D);
            std::memcpy(vc + slots[i] * v_slot + h * v_head + positions[i] * D, x + (nH + nKV + h) * D,
                        D * sizeof(float));
        }
    }
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> scores(longest + 16);
#pragma omp for schedule(static)
        for (int64_t w = 0; w < n * nH; ++w) {
            const int64_t i = w / nH, h = w % nH, kv = h / group;
            attend_one(q.data() + w * D, kc + slots[i] * k_slot + kv * k_head, vc + slots[i] * v_slot + kv * v_head,
                       positions[i] + 1, D, D, scale, scores.data(), out + w * D);
        }
    }
    return 0;
#else
    (void)qkv, (void)n, (void)nH, (void)nKV, (void)D, (void)cos, (void)sin, (void)kc, (void)k_slot, (void)k_head;
    (void)vc, (void)v_slot, (void)v_head, (void)slots, (void)positions, (void)max_len, (void)scale, (void)out;
    (void)nthreads;
    return -1;
#endif
}

// Decode attention (mwq_attention.h): n queries q [n, nH, Dk], query i of sequence slots[i] with lengths[i]
// cached positions; keys of (slot, kv head) at k + slot * k_slot + head * k_head, rows of Dk floats (values
// likewise with Dv). out [n, nH, Dv]. Returns -1 where this build has no kernel or Dk, Dv % 16 != 0.
int mwq_decode_attention(const float* q, int64_t n, int64_t nH, int64_t nKV, int64_t Dk, int64_t Dv,
                         const float* k, int64_t k_slot, int64_t k_head, const float* v, int64_t v_slot,
                         int64_t v_head, const int64_t* slots, const int64_t* lengths, float scale, float* out,
                         int nthreads) {
#if defined(__AVX512F__)
    if (Dk % 16 != 0 || Dv % 16 != 0 || nKV <= 0 || nH % nKV != 0) return -1;
    int64_t longest = 0;
    for (int64_t i = 0; i < n; ++i) longest = lengths[i] > longest ? lengths[i] : longest;
    const int64_t group = nH / nKV;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> scores(longest + 16);
#pragma omp for schedule(static)
        for (int64_t w = 0; w < n * nH; ++w) {
            const int64_t i = w / nH, h = w % nH, kv = h / group;
            attend_one(q + w * Dk, k + slots[i] * k_slot + kv * k_head, v + slots[i] * v_slot + kv * v_head,
                       lengths[i], Dk, Dv, scale, scores.data(), out + w * Dv);
        }
    }
    return 0;
#else
    (void)q, (void)n, (void)nH, (void)nKV, (void)Dk, (void)Dv, (void)k, (void)k_slot, (void)k_head, (void)v;
    (void)v_slot, (void)v_head, (void)slots, (void)lengths, (void)scale, (void)out, (void)nthreads;
    return -1;
#endif
}

// Router two's widths for one decode token (routing/width_router.py `WidthRouter.one_token`, whose Python
// loop `one_token_reference` this is): z = x A (A [H, r]); per chosen expert e with gate weight g, for each
// width j < W-1 c_j = exp(z . M[:, e*W + j] + C[e, j] + g v[j]) + price frac[j] (M = B as [r, E*W]),
// c_{W-1} = price frac[W-1]; the first smallest c wins; out = min(widths[j*], cap). Costs in double, as
// Python's floats. One layer's tensors come as a struct built once (a ctypes call costs ~0.1 us an argument).
struct WidthRuleLayer {
    const float* A;
    const float* M;
    const float* C;
    const float* v;
    const double* frac;
    const int64_t* widths;
    int64_t H, r, E, W;
};

}  // extern "C"

namespace {
// Router two's widths for one token (the body of mwq_width_rule and of each row of mwq_width_rule_rows).
int width_rule_one(const WidthRuleLayer* L, const float* x, const int64_t* idx, const double* weight, int64_t k,
                   double price, int64_t cap, int64_t* out) {
    const int64_t H = L->H, r = L->r, E = L->E, W = L->W;
    if (r > 256 || W < 1) return -1;
    float z[256] = {};
    for (int64_t h = 0; h < H; ++h)
        for (int64_t q = 0; q < r; ++q) z[q] += x[h] * L->A[h * r + q];
    const double last = price * L->frac[W - 1];
    for (int64_t i = 0; i < k; ++i) {
        const int64_t e = idx[i];
        if (e < 0 || e >= E) return -2;
        double best = last;
        int64_t choice = W - 1;
        for (int64_t j = 0; j + 1 < W; ++j) {
            float row = 0.f;
            for (int64_t q = 0; q < r; ++q) row += z[q] * L->M[q * E * W + e * W + j];
            const double t = (double)row + (double)L->C[e * W + j] + weight[i] * (double)L->v[j];
            const double c = std::exp(t) + price * L->frac[j];
            if (c < best || (c == best && j < choice)) best = c, choice = j;
        }
        out[i] = L->widths[choice] < cap ? L->widths[choice] : cap;
    }
    return 0;
}
}  // namespace

extern "C" {

int mwq_width_rule(const WidthRuleLayer* L, const float* x, const int64_t* idx, const double* weight, int64_t k,
                   double price, int64_t cap, int64_t* out) {
    return width_rule_one(L, x, idx, weight, k, price, cap, out);
}

// mwq_width_rule for T tokens in one call: row t is x + t * H, idx/weight/out + t * k (weights fp32, widened
// to double exactly as a Python float list holds them), price[t], cap[t]. Each row's widths are exactly the
// one-token call's (batch invariance: a decode row is routed alike alone or in a batched step).
int mwq_width_rule_rows(const WidthRuleLayer* L, const float* x, int64_t T, const int64_t* idx, const float* weight,
                        int64_t k, const double* price, const int64_t* cap, int64_t* out) {
    if (k > 64) return -1;
    double w[64];
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t i = 0; i < k; ++i) w[i] = (double)weight[t * k + i];
        const int rc = width_rule_one(L, x + t * L->H, idx + t * k, w, k, price[t], cap[t], out + t * k);
        if (rc) return rc;
    }
    return 0;
}

// y [T, N] = x [T, K] @ w^T for fp32 w [N, K] (routers), each (token, row) one dot product in a fixed order
// (16 lanes over the columns, then a fixed horizontal sum and the tail): the same bits at any T, which MKL's
// GEMM does not give (a row's bits change from 1 to 2 rows), so a batched step routes a token as it is
// routed alone in one call instead of one call per row.
int mwq_f32_rows_linear(const float* w, int64_t N, int64_t K, const float* x, int64_t T, float* y) {
    for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
            const float* a = x + t * K;
            const float* b = w + n * K;
            int64_t j = 0;
            float s = 0.f;
#if defined(__AVX512F__)
            __m512 acc = _mm512_setzero_ps();
            for (; j + 16 <= K; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
            s = hsum(acc);
#endif
            for (; j < K; ++j) s += a[j] * b[j];
            y[t * N + n] = s;
        }
    return 0;
}

}  // extern "C"
