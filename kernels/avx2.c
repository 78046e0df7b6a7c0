/* avx2.c - kernels for x86-64 with AVX2, FMA and F16C.
 *
 * Quantised weights meet int8 activations in vpmaddubsw, which multiplies
 * unsigned by signed bytes.  Formats whose quants are unsigned (q4_1, q5_1
 * and the K-quants, whose offsets are folded in through the activation
 * block sums) go in as they are; the signed ones (q8_0, q4_0, q5_0) go in as
 * |w| against sign(x, w), which is why activations stop at -127.
 *
 * Speculative verification dots K+1 activation rows with the same weights,
 * so each kernel decodes a weight block once and then walks the rows.  The
 * row count is a compile-time constant in each instantiation (KN_ROW_FNS), so
 * per-row accumulators stay in registers, and every row runs the very same
 * instruction sequence whatever nr is: the determinism contract holds by
 * construction, not by care.
 *
 * The AVX-512 build compiles this file too and calls kn_avx2_matmul for the
 * formats it does not widen.
 */
#include "kn_impl.h"

#ifdef KN_BUILD_AVX2
#include <immintrin.h>
#include <math.h>

/* ==== Helpers ==== */

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float h2f(const uint8_t *p) { return _cvtsh_ss(kn_rd16(p)); }
static inline __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline __m128i load16(const void *p) { return _mm_loadu_si128((const __m128i *)p); }
static inline __m128i load8(const void *p) { return _mm_loadl_epi64((const __m128i *)p); }
static inline __m256i bytes(int v) { return _mm256_set1_epi8((char)v); }

/* Unsigned bytes u times signed bytes s, summed in fours into int32 lanes.
 * The int16 middle step cannot saturate: u <= 63 or (u <= 128, |s| <= 127). */
static inline __m256i dot_us(__m256i u, __m256i s)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* The same, each int16 pair sum weighted by the int16 in sc before pairing. */
static inline __m256i dot_us_scaled(__m256i u, __m256i s, __m256i sc)
{
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc);
}

/* both: eight int16 repeated in both 128-bit lanes.  Result: the low lane
 * filled with element e0, the high lane with element e1. */
KN_INLINE __m256i pick16(__m256i both, int e0, int e1)
{
    __m128i m0 = _mm_set1_epi16((short)(2 * e0 | (2 * e0 + 1) << 8));
    __m128i m1 = _mm_set1_epi16((short)(2 * e1 | (2 * e1 + 1) << 8));
    return _mm256_shuffle_epi8(both, _mm256_set_m128i(m1, m0));
}

/* 32 bits to 32 bytes, 0xff where the bit is set. */
static inline __m256i bits_to_bytes(uint32_t x)
{
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201ll);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* Prefetch distances (kn_prefetch_weights): asking for the lines AHEAD
 * bytes on into L1 took --no-mtp decode of the built-in model (2 threads,
 * AMD EPYC Zen 3, weights from memory) from 286 to 391 tok/s at 2048 bytes
 * in legacy_row (381 at 4096); the packed q8_0 kernel streamed one 1536 x
 * 512 matrix after another 10-20% faster at 4096 than at 2048.  No L2
 * stream: the one avx512.c gains from cost this file 10-20% at one row
 * (./test_kernels-avx2 --bench -t 2 q8_0 on a Zen 4, two runs: 31-37 ->
 * 24-30 GB/s from memory), and no AVX2-only machine was at hand to say
 * more. */
#define AHEAD 4096
KN_INLINE void prefetch_ahead(const uint8_t *p, int bytes) { kn_prefetch_weights(p, bytes, AHEAD, 0); }

/* ==== Legacy formats: q8_0, q4_0, q4_1, q5_0, q5_1 ==== */

static inline int legacy_bytes(int t)
{
    return t == KN_Q8_0 ? KN_Q8_0_BYTES : t == KN_Q4_0 ? KN_Q4_0_BYTES : t == KN_Q4_1 ? KN_Q4_1_BYTES
         : t == KN_Q5_0 ? KN_Q5_0_BYTES : KN_Q5_1_BYTES;
}

/* The 32 quants of a block in element order: signed (offset removed) for
 * the formats without a min, unsigned for q4_1/q5_1. */
KN_INLINE __m256i legacy_quants(const uint8_t *b, int t)
{
    if (t == KN_Q8_0) return load32(b + 2);
    int has_m = t == KN_Q4_1 || t == KN_Q5_1, has_h = t == KN_Q5_0 || t == KN_Q5_1;
    __m128i qs = load16(b + legacy_bytes(t) - 16);
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), bytes(15));
    if (has_h) q = _mm256_or_si256(q, _mm256_and_si256(bits_to_bytes(kn_rd32(b + 2 + 2 * has_m)), bytes(16)));
    return has_m ? q : _mm256_sub_epi8(q, bytes(has_h ? 16 : 8));
}

/* One block against one activation block, as 8 int32 partial sums. */
KN_INLINE __m256i legacy_dot(__m256i q, __m256i u, const int8_t *x, int has_m)
{
    __m256i xv = load32(x);
    return dot_us(u, has_m ? xv : _mm256_sign_epi8(xv, q));
}

/* Four blocks' int32 partial sums folded into one vector holding block k in
 * lanes k and 4+k, so one conversion, one multiply and one fma per row serve
 * four blocks.  The fold is nine shuffles and adds, cheaper per row than the
 * three float steps per block it replaces (measured: about 1.35x the
 * multi-row throughput of converting each block on its own). */
static inline __m256i fold4(__m256i p0, __m256i p1, __m256i p2, __m256i p3)
{
    __m256i t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
    __m256i t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(p2, p3), _mm256_unpackhi_epi32(p2, p3));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
}

/* Blocks go in fours: each weight block is decoded once, its weight scale
 * joins the other three in one vector, and per row the work is the integer
 * dots, one fold, one conversion and one fma with the product of the weight
 * and activation scale vectors (the activation scales come in as one
 * 16-byte broadcast load).  Leftover blocks take the same path one at a
 * time.  Every step is an explicit mul, fma or add, leaving the compiler
 * nothing to contract differently from one row-count instantiation to
 * another. */
KN_INLINE void legacy_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    const int bb = legacy_bytes(t), has_m = t == KN_Q4_1 || t == KN_Q5_1;
    const int64_t nb = n / KN_QK;
    __m256 acc[KN_REG_ROWS], accv[KN_REG_ROWS];
    float accm[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = accv[r] = _mm256_setzero_ps(), accm[r] = 0.0f;
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const uint8_t *b0 = w + b * bb;
        prefetch_ahead(b0, 4 * bb);
        __m256i q[4], u[4];
        uint16_t dh[4];
        KN_UNROLL for (int k = 0; k < 4; k++) {
            q[k] = legacy_quants(b0 + k * bb, t);
            u[k] = has_m ? q[k] : _mm256_sign_epi8(q[k], q[k]);
            dh[k] = kn_rd16(b0 + k * bb);
        }
        __m128 d4 = _mm_cvtph_ps(load8(dh));
        __m256 dw = _mm256_insertf128_ps(_mm256_castps128_ps256(d4), d4, 1);
        KN_UNROLL for (int r = 0; r < NR; r++) {
            const int8_t *x = a[r].q + b * KN_QK;
            __m256i s = fold4(legacy_dot(q[0], u[0], x, has_m), legacy_dot(q[1], u[1], x + KN_QK, has_m),
                              legacy_dot(q[2], u[2], x + 2 * KN_QK, has_m), legacy_dot(q[3], u[3], x + 3 * KN_QK, has_m));
            __m256 dd = _mm256_mul_ps(dw, _mm256_broadcast_ps((const __m128 *)(a[r].d + b)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), dd, acc[r]);
        }
    }
    for (; b < nb; b++) {
        const uint8_t *b0 = w + b * bb;
        __m256i q0 = legacy_quants(b0, t), u0 = has_m ? q0 : _mm256_sign_epi8(q0, q0);
        __m256 d0 = _mm256_set1_ps(h2f(b0));
        KN_UNROLL for (int r = 0; r < NR; r++) {
            __m256 dd = _mm256_mul_ps(d0, _mm256_broadcast_ss(a[r].d + b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(legacy_dot(q0, u0, a[r].q + b * KN_QK, has_m)), dd, acc[r]);
        }
    }
    /* q4_1/q5_1: each min times its activation block's sum, eight blocks
     * to a vector so no scalar latency chain runs through the row */
    for (b = 0; has_m && b + 8 <= nb; b += 8) {
        uint16_t mh[8];
        for (int k = 0; k < 8; k++) mh[k] = kn_rd16(w + (b + k) * bb + 2);
        __m256 m = _mm256_cvtph_ps(load16(mh));
        KN_UNROLL for (int r = 0; r < NR; r++) accv[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(a[r].s + b), accv[r]);
    }
    for (; has_m && b < nb; b++) {
        float m = h2f(w + b * bb + 2);
        KN_UNROLL for (int r = 0; r < NR; r++) accm[r] = fmaf(m, a[r].s[b], accm[r]);
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = hsum8(acc[r]) + (hsum8(accv[r]) + accm[r]);
}

/* ==== K-quants ====
 * Per super-block and row, the sub-block dots weighted by their integer
 * scales are summed in int32 and converted once.  The loops run sub-block
 * outer, row inner: one decoded sub-block and its scale vector are live at
 * a time next to the nr int32 sums, which keeps everything in registers. */

/* q4_K and q5_K: the mins meet the activation's 16-element sums, a pair of
 * which covers a 32-element sub-block. */
KN_INLINE void k45_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    const int bb = t == KN_Q4_K ? KN_Q4_K_BYTES : KN_Q5_K_BYTES, has_h = t == KN_Q5_K;
    __m256 acc[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / KN_QKK; b++) {
        const uint8_t *blk = w + b * bb, *qs = blk + bb - 128;
        uint8_t sc[8], mn[8];
        kn_k4_scales(blk + 4, sc, mn);
        __m256i sc2 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(load8(sc)));
        __m256i hb = has_h ? load32(blk + 16) : _mm256_setzero_si256();
        __m256i s[KN_REG_ROWS];
        KN_UNROLL for (int r = 0; r < NR; r++) s[r] = _mm256_setzero_si256();
        KN_UNROLL for (int g = 0; g < 4; g++) {
            __m256i raw = load32(qs + 32 * g);
            __m256i q0 = _mm256_and_si256(raw, bytes(15));
            __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), bytes(15));
            if (has_h) {
                __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * g), bytes(1));
                __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(hb, 2 * g + 1), bytes(1));
                q0 = _mm256_or_si256(q0, _mm256_slli_epi16(h0, 4));
                q1 = _mm256_or_si256(q1, _mm256_slli_epi16(h1, 4));
            }
            __m256i sv0 = pick16(sc2, 2 * g, 2 * g), sv1 = pick16(sc2, 2 * g + 1, 2 * g + 1);
            KN_UNROLL for (int r = 0; r < NR; r++) {
                const int8_t *x = a[r].q + b * KN_QKK + 64 * g;
                s[r] = _mm256_add_epi32(s[r], _mm256_add_epi32(dot_us_scaled(q0, load32(x), sv0),
                                                               dot_us_scaled(q1, load32(x + 32), sv1)));
                KN_KEEP(s[r]);
            }
        }
        /* acc += da * (d * sum - dmin * mins): the weight scales are
         * broadcast once per block, the activation scale once per row */
        __m256 d = _mm256_set1_ps(h2f(blk)), dmin = _mm256_set1_ps(h2f(blk + 2));
        __m128i m8 = _mm_cvtepu8_epi16(load8(mn));
        __m256i mdup = _mm256_set_m128i(_mm_unpackhi_epi16(m8, m8), _mm_unpacklo_epi16(m8, m8));
        KN_UNROLL for (int r = 0; r < NR; r++) {
            __m256i mp = _mm256_madd_epi16(load32(a[r].bsum + 16 * b), mdup);
            __m256 v = _mm256_fmsub_ps(_mm256_cvtepi32_ps(s[r]), d, _mm256_mul_ps(_mm256_cvtepi32_ps(mp), dmin));
            acc[r] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(a[r].d + b), acc[r]);
        }
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = hsum8(acc[r]);
}

/* q6_K: quants decoded unsigned (0..63); the -32 comes back as 32 times the
 * sum over sub-blocks of scale * activation sum.  A 32-byte chunk spans two
 * 16-element sub-blocks, so its scale vector holds one per 128-bit lane. */
KN_INLINE void q6k_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int NR)
{
    const __m256i lo = bytes(15), top = bytes(0x30);
    __m256 acc[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / KN_QKK; b++) {
        const uint8_t *blk = w + b * KN_Q6_K_BYTES, *sc = blk + 192;
        __m256i s[KN_REG_ROWS];
        KN_UNROLL for (int r = 0; r < NR; r++) s[r] = _mm256_setzero_si256();
        KN_UNROLL for (int h = 0; h < 2; h++) {
            __m256i l0 = load32(blk + 64 * h), l1 = load32(blk + 64 * h + 32), hh = load32(blk + 128 + 32 * h);
            __m256i s8 = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(load8(sc + 8 * h)));
            KN_UNROLL for (int k = 0; k < 4; k++) {
                __m256i l = k & 1 ? l1 : l0;
                __m256i ql = _mm256_and_si256(k < 2 ? l : _mm256_srli_epi16(l, 4), lo);
                __m256i qh = k == 0 ? _mm256_slli_epi16(hh, 4) : k == 1 ? _mm256_slli_epi16(hh, 2)
                           : k == 2 ? hh : _mm256_srli_epi16(hh, 2);
                __m256i q = _mm256_or_si256(ql, _mm256_and_si256(qh, top));
                __m256i sv = pick16(s8, 2 * k, 2 * k + 1);
                KN_UNROLL for (int r = 0; r < NR; r++) {
                    s[r] = _mm256_add_epi32(s[r], dot_us_scaled(q, load32(a[r].q + b * KN_QKK + 128 * h + 32 * k), sv));
                    KN_KEEP(s[r]);
                }
            }
        }
        float d = h2f(blk + 208);
        __m256i sc16 = _mm256_cvtepi8_epi16(load16(sc));
        KN_UNROLL for (int r = 0; r < NR; r++) {
            __m256i off = _mm256_madd_epi16(load32(a[r].bsum + 16 * b), sc16);
            __m256i sr = _mm256_sub_epi32(s[r], _mm256_slli_epi32(off, 5));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sr), _mm256_set1_ps(d * a[r].d[b]), acc[r]);
        }
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = hsum8(acc[r]);
}

/* ==== Float weights: f32, f16, bf16 against f32 activations ==== */

KN_INLINE __m256 float8(const uint8_t *w, int64_t j, int t)
{
    if (t == KN_F32) return _mm256_loadu_ps((const float *)w + j);
    __m128i h = load16(w + 2 * j);
    if (t == KN_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

KN_INLINE float float1(const uint8_t *w, int64_t j, int t)
{
    if (t == KN_F32) return ((const float *)w)[j];
    return t == KN_F16 ? h2f(w + 2 * j) : kn_bf16_f32(kn_rd16(w + 2 * j));
}

/* Two accumulators per row hide the FMA latency when nr is 1. */
KN_INLINE void float_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    __m256 acc0[KN_REG_ROWS], acc1[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 w0 = float8(w, j, t), w1 = float8(w, j + 8, t);
        KN_UNROLL for (int r = 0; r < NR; r++) {
            acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a[r].x + j), acc0[r]);
            acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(a[r].x + j + 8), acc1[r]);
        }
    }
    if (j + 8 <= n) {
        __m256 w0 = float8(w, j, t);
        KN_UNROLL for (int r = 0; r < NR; r++) acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a[r].x + j), acc0[r]);
        j += 8;
    }
    KN_UNROLL for (int r = 0; r < NR; r++) {
        float tail = 0.0f;
        for (int64_t k = j; k < n; k++) tail = fmaf(float1(w, k, t), a[r].x[k], tail);
        out[r] = hsum8(_mm256_add_ps(acc0[r], acc1[r])) + tail;
    }
}

/* ==== q8_0 packed sixteen rows to two registers (KN_Q8_0_X16, kn_impl.h) ====
 * Lane l of a vector is output row l (or 8 + l) of the group: four weights
 * of each of eight rows meet four activation bytes broadcast to all lanes,
 * so a block needs no horizontal sums (the unpacked kernel's fold4 was a
 * third of its instructions per activation row).  Each weight vector gives
 * |w| once and then serves every activation row as |w| against sign(x, w),
 * as in legacy_row. */
#if KN_X16_Q8_0_BIAS == 0
KN_INLINE void q8_0x16_group(const uint8_t *w, int64_t n, const kn_arow *a, __m256 acc[][2], int NR)
{
    const __m256i ones = _mm256_set1_epi16(1);
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / KN_QK; b++, w += KN_X16_BLOCK) {
        prefetch_ahead(w, KN_X16_BLOCK);
        KN_UNROLL for (int h = 0; h < 2; h++) {   /* rows 0-7, then 8-15: fewer live sums than both at once */
            const uint8_t *wh = w + 2 * KN_PACK_ROWS + 32 * h;
            __m256i s[KN_REG_ROWS];
            KN_UNROLL for (int r = 0; r < NR; r++) s[r] = _mm256_setzero_si256();
            for (int k = 0; k < KN_QK / 4; k++) {
                __m256i q = load32(wh + 4 * KN_PACK_ROWS * k), u = _mm256_sign_epi8(q, q);
                KN_UNROLL for (int r = 0; r < NR; r++) {
                    __m256i x = _mm256_set1_epi32((int)kn_rd32((const uint8_t *)a[r].q + b * KN_QK + 4 * k));
                    s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, q)), ones));
                }
            }
            __m256 d = _mm256_cvtph_ps(load16(w + 16 * h));
            KN_UNROLL for (int r = 0; r < NR; r++)
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_mul_ps(d, _mm256_set1_ps(a[r].d[b])), acc[r][h]);
        }
    }
}

/* Rows [i0, i1) of a packed matrix, a group at a time; a slice's last
 * group may be partial (the matrix's padding rows are computed, not kept). */
KN_INLINE void q8_0x16_rows(const uint8_t *w, size_t w_row_bytes, int64_t n, int64_t i0, int64_t i1,
                            const kn_arow *a, float *y, int64_t y_stride, int NR)
{
    for (int64_t i = i0; i < i1; i += KN_PACK_ROWS) {
        __m256 acc[KN_REG_ROWS][2];
        q8_0x16_group(w + (size_t)i * w_row_bytes, n, a, acc, NR);
        int keep = i1 - i < KN_PACK_ROWS ? (int)(i1 - i) : KN_PACK_ROWS;
        KN_UNROLL for (int r = 0; r < NR; r++) {
            float *out = y + (size_t)r * y_stride + i;
            if (keep == KN_PACK_ROWS) {
                _mm256_storeu_ps(out, acc[r][0]);
                _mm256_storeu_ps(out + 8, acc[r][1]);
            } else {
                float all[KN_PACK_ROWS];
                _mm256_storeu_ps(all, acc[r][0]);
                _mm256_storeu_ps(all + 8, acc[r][1]);
                memcpy(out, all, (size_t)keep * sizeof(float));
            }
        }
    }
}

KN_X16_FNS(x16_q8_0, q8_0x16_rows,)
#endif

/* ==== Instantiation per format and row count ==== */

KN_ROW_FNS(rows_f32, float_row, KN_F32,)
KN_ROW_FNS(rows_f16, float_row, KN_F16,)
KN_ROW_FNS(rows_bf16, float_row, KN_BF16,)
KN_ROW_FNS(rows_q8_0, legacy_row, KN_Q8_0,)
KN_ROW_FNS(rows_q4_0, legacy_row, KN_Q4_0,)
KN_ROW_FNS(rows_q4_1, legacy_row, KN_Q4_1,)
KN_ROW_FNS(rows_q5_0, legacy_row, KN_Q5_0,)
KN_ROW_FNS(rows_q5_1, legacy_row, KN_Q5_1,)
KN_ROW_FNS(rows_q4_K, k45_row, KN_Q4_K,)
KN_ROW_FNS(rows_q5_K, k45_row, KN_Q5_K,)
KN_ROW_FNS(rows_q6_K, q6k_row,)

static const kn_row_fn *rows_for(int t)
{
    switch (t) {
    case KN_F32: return rows_f32;
    case KN_F16: return rows_f16;
    case KN_BF16: return rows_bf16;
    case KN_Q8_0: return rows_q8_0;
    case KN_Q4_0: return rows_q4_0;
    case KN_Q4_1: return rows_q4_1;
    case KN_Q5_0: return rows_q5_0;
    case KN_Q5_1: return rows_q5_1;
    case KN_Q4_K: return rows_q4_K;
    case KN_Q5_K: return rows_q5_K;
    case KN_Q6_K: return rows_q6_K;
    default: return NULL;
    }
}

void kn_avx2_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
                    const void *act, size_t act_stride, int nr, float *y, int64_t y_stride)
{
#if KN_X16_Q8_0_BIAS == 0
    if (wtype == KN_Q8_0_X16) {
        kn_matmul_x16(x16_q8_0, w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
        return;
    }
#endif
    kn_matmul_rows(rows_for(wtype), w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
}

/* ==== Vector ops ==== */

float kn_avx2_dot(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    return hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3))) + tail;
}

void kn_avx2_axpy(float *y, float a, const float *x, int64_t n)
{
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

void kn_avx2_scale(float *y, float a, int64_t n)
{
    __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(av, _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] *= a;
}

void kn_avx2_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps)
{
    float r = 1.0f / sqrtf(kn_avx2_dot(x, x, n) / (float)n + eps);
    __m256 rv = _mm256_set1_ps(r);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), rv);
        _mm256_storeu_ps(out + i, w ? _mm256_mul_ps(v, _mm256_loadu_ps(w + i)) : v);
    }
    for (; i < n; i++) out[i] = w ? x[i] * r * w[i] : x[i] * r;
}

/* e^x for x in [-87, 88]: x = n ln2 + r with |r| <= ln2/2, e^r by its
 * degree-7 Taylor polynomial (truncation < 6e-9; measured max relative error
 * 7.6e-8 over [-87, 0]), 2^n into the exponent field.  Above 88 it is e^88;
 * below -87, and for NaN, it is 0: what is lost is under float's smallest
 * normal, and a softmax can pad its lanes with -inf. */
static inline __m256 exp8(__m256 x)
{
    __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 nf = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693145752f), x);      /* ln2 split: hi + lo */
    r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(1.42860677e-6f), r);
    static const float c[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m256 p = _mm256_set1_ps(c[0]);
    for (int k = 1; k < 8; k++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[k]));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

void kn_avx2_swiglu(float *out, const float *gate, const float *up, int64_t n)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(out + i, up ? _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)) : silu);
    }
    kn_sc_swiglu(out + i, gate + i, up ? up + i : NULL, n - i);
}

/* The largest value in one pass of vector maxima, then the first place it
 * occurs: two branch-free sweeps instead of a serial compare per element. */
int64_t kn_avx2_argmax(const float *v, int64_t n)
{
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(v + i));
    float best = hmax8(m);
    for (; i < n; i++) best = v[i] > best ? v[i] : best;
    const __m256 b = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + i), b, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
    while (v[i] != best) i++;
    return i;
}

/* The two-pass form of kn_sc_delta_step, on strips of 32 columns: kS and qS
 * for a strip are 8 registers carried down all dk rows. */
KN_INLINE void delta_strip(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                           float decay, float beta, float qk, float *out, int dk, int dv, int c0, int NV)
{
    __m256 ks[4], qs[4], d[4];
    KN_UNROLL for (int u = 0; u < NV; u++) ks[u] = qs[u] = _mm256_setzero_ps();
    for (int j = 0; j < dk; j++) {
        const float *row = S_in + (size_t)j * dv + c0;
        __m256 kj = _mm256_set1_ps(k[j]), qj = _mm256_set1_ps(q[j]);
        KN_UNROLL for (int u = 0; u < NV; u++) {
            __m256 s = _mm256_loadu_ps(row + 8 * u);
            ks[u] = _mm256_fmadd_ps(kj, s, ks[u]);
            qs[u] = _mm256_fmadd_ps(qj, s, qs[u]);
        }
    }
    __m256 dec = _mm256_set1_ps(decay);
    KN_UNROLL for (int u = 0; u < NV; u++) {
        __m256 kv = _mm256_mul_ps(dec, ks[u]);
        d[u] = _mm256_mul_ps(_mm256_set1_ps(beta), _mm256_sub_ps(_mm256_loadu_ps(v + c0 + 8 * u), kv));
        _mm256_storeu_ps(out + c0 + 8 * u, _mm256_fmadd_ps(_mm256_set1_ps(qk), d[u], _mm256_mul_ps(dec, qs[u])));
    }
    for (int j = 0; j < dk; j++) {
        const float *row = S_in + (size_t)j * dv + c0;
        float *dst = S_out + (size_t)j * dv + c0;
        __m256 kj = _mm256_set1_ps(k[j]);
        KN_UNROLL for (int u = 0; u < NV; u++)
            _mm256_storeu_ps(dst + 8 * u, _mm256_fmadd_ps(dec, _mm256_loadu_ps(row + 8 * u), _mm256_mul_ps(kj, d[u])));
    }
}

void kn_avx2_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                        float decay, float beta, float *out, int dk, int dv)
{
    if (dv % 8) {
        kn_sc_delta_step(S_in, S_out, q, k, v, decay, beta, out, dk, dv);
        return;
    }
    float qk = kn_avx2_dot(q, k, dk);
    int c0 = 0;
    for (; c0 + 32 <= dv; c0 += 32) delta_strip(S_in, S_out, q, k, v, decay, beta, qk, out, dk, dv, c0, 4);
    for (; c0 < dv; c0 += 8) delta_strip(S_in, S_out, q, k, v, decay, beta, qk, out, dk, dv, c0, 1);
}

/* ==== Attention ====
 * Three passes over the head, each running one instruction sequence per
 * position whatever n_keys is: scores eight keys at a time (one
 * accumulator per key, so eight independent FMA chains share each load of
 * q), their exponentials eight at a time, then the weighted sum of value
 * rows in chunks of up to 64 floats whose accumulators stay in registers
 * across a block of keys.  hd need not be a multiple of 8: its last partial
 * vector is read with masked loads, which touch no memory past the row. */

/* Lanes [0, n) set, n clamped to [0, 8]. */
static inline __m256i lanes_below(int n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Lane u of the result is the sum of the lanes of a[u]. */
static inline __m256 hsum8x8(const __m256 a[8])
{
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* The n < 8 floats at p as a vector, the other lanes set to fill; and back. */
static inline __m256 load_part(const float *p, int n, float fill)
{
    float t[8] = {fill, fill, fill, fill, fill, fill, fill, fill};
    memcpy(t, p, (size_t)n * sizeof *t);
    return _mm256_loadu_ps(t);
}

static inline void store_part(float *p, __m256 x, int n)
{
    float t[8];
    _mm256_storeu_ps(t, x);
    memcpy(p, t, (size_t)n * sizeof *t);
}

/* q . k_t for t = t0..t0+7 in lanes 0..7.  Positions past the last key
 * repeat it: the lane is computed and ignored, so a key's score never
 * depends on which block it falls in. */
static inline __m256 scores8(const float *q, const float *k, int64_t kv_stride, int t0, int n_keys, int hd,
                             __m256i tail)
{
    const float *kt[8];
    __m256 acc[8];
    KN_UNROLL for (int u = 0; u < 8; u++) {
        kt[u] = k + (size_t)(t0 + u < n_keys ? t0 + u : n_keys - 1) * kv_stride;
        acc[u] = _mm256_setzero_ps();
    }
    int j = 0;
    for (; j + 8 <= hd; j += 8) {
        __m256 qj = _mm256_loadu_ps(q + j);
        KN_UNROLL for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(kt[u] + j), acc[u]);
    }
    if (j < hd) {
        __m256 qj = _mm256_maskload_ps(q + j, tail);
        KN_UNROLL for (int u = 0; u < 8; u++)
            acc[u] = _mm256_fmadd_ps(qj, _mm256_maskload_ps(kt[u] + j, tail), acc[u]);
    }
    return hsum8x8(acc);
}

/* sc[t] = scale * q . k_t for t in [t0, t1), eight keys at a time from t0
 * (a multiple of 8); returns their max. */
static float attn_scores(const float *q, const float *k, int64_t kv_stride, int t0, int t1, int n_keys, int hd,
                         float scale, float *sc)
{
    const __m256i tail = lanes_below(hd % 8);
    const __m256 sv = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int t = t0; t < t1; t += 8) {
        __m256 s = _mm256_mul_ps(sv, scores8(q, k, kv_stride, t, n_keys, hd, tail));
        mx = _mm256_max_ps(mx, s);
        if (t1 - t >= 8) _mm256_storeu_ps(sc + t, s);
        else store_part(sc + t, s, t1 - t);
    }
    /* the padding lanes hold real scores, so the max is right as it is */
    return hmax8(mx);
}

/* out[0, 8*(NV-1) + last) += sum_t p[t] v_t over the same range (first:
 * out starts from 0), NV accumulators carried down the keys; last < 8 reads
 * the final vector masked. */
KN_INLINE void attn_out(const float *p, const float *v, int64_t kv_stride, int n_keys, int first, float *out,
                        int NV, int last)
{
    const __m256i mask = lanes_below(last);
    __m256 acc[8];
    KN_UNROLL for (int u = 0; u < NV; u++)
        acc[u] = first ? _mm256_setzero_ps()
               : u == NV - 1 && last < 8 ? load_part(out + 8 * u, last, 0.0f) : _mm256_loadu_ps(out + 8 * u);
    for (int t = 0; t < n_keys; t++) {
        const float *vt = v + (size_t)t * kv_stride;
        __m256 pt = _mm256_broadcast_ss(p + t);
        KN_UNROLL for (int u = 0; u < NV; u++) {
            __m256 x = u == NV - 1 && last < 8 ? _mm256_maskload_ps(vt + 8 * u, mask) : _mm256_loadu_ps(vt + 8 * u);
            acc[u] = _mm256_fmadd_ps(pt, x, acc[u]);
        }
    }
    KN_UNROLL for (int u = 0; u < NV; u++) {
        if (u == NV - 1 && last < 8) store_part(out + 8 * u, acc[u], last);
        else _mm256_storeu_ps(out + 8 * u, acc[u]);
    }
}

/* One block of keys over the whole head, in chunks of 64, 32 and 8 floats.
 * Between blocks the accumulators pass through out, which keeps each
 * output's sum in key order. */
static void attn_values(const float *p, const float *v, int64_t kv_stride, int n_keys, int hd, int first, float *out)
{
    int c = 0;
    for (; c + 64 <= hd; c += 64) attn_out(p, v + c, kv_stride, n_keys, first, out + c, 8, 8);
    if (c + 32 <= hd) attn_out(p, v + c, kv_stride, n_keys, first, out + c, 4, 8), c += 32;
    for (; c < hd; c += 8) attn_out(p, v + c, kv_stride, n_keys, first, out + c, 1, hd - c < 8 ? hd - c : 8);
}

const kn_attn_steps kn_avx2_attn_steps = {attn_scores, attn_values};

/* exp(sc[t] - max) over a query's n scores, in place; returns their sum.
 * The exponentials of -inf padding lanes are exactly 0. */
static float softmax_numerators(float *sc, int n, float max)
{
    const __m256 m = _mm256_set1_ps(max);
    const int nfull = n / 8 * 8, rest = n - nfull;
    __m256 sum = _mm256_setzero_ps();
    for (int t0 = 0; t0 < nfull; t0 += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t0), m));
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(sc + t0, e);
    }
    if (rest) {
        __m256 e = exp8(_mm256_sub_ps(load_part(sc + nfull, rest, -INFINITY), m));
        sum = _mm256_add_ps(sum, e);
        store_part(sc + nfull, e, rest);
    }
    return hsum8(sum);
}

/* Keys and values are swept in blocks of KN_ATTN_KEYS, every query taking
 * its part of a block before the next block is read, so each block comes
 * from memory once and from L1/L2 for the other queries.  A query's own
 * sequence of operations is that of a single query: its scores in the same
 * blocks from key 0, its value sums in the same blocks. */
void kn_avx2_attn_heads(const kn_attn_steps *steps, int nq, const float *const *q, float *const *out,
                        const int *n_keys, const float *k, const float *v, int64_t kv_stride, int hd, float scale,
                        float *sc, int64_t sc_stride)
{
    float mx[KN_ATTN_MAX_Q], sum[KN_ATTN_MAX_Q];
    int most = 0;
    for (int i = 0; i < nq; i++) {
        mx[i] = -INFINITY;
        most = n_keys[i] > most ? n_keys[i] : most;
    }
    for (int b0 = 0; b0 < most; b0 += KN_ATTN_KEYS)
        for (int i = 0; i < nq; i++)
            if (b0 < n_keys[i]) {
                int end = b0 + KN_ATTN_KEYS < n_keys[i] ? b0 + KN_ATTN_KEYS : n_keys[i];
                float m = steps->scores(q[i], k, kv_stride, b0, end, n_keys[i], hd, scale, sc + i * sc_stride);
                mx[i] = m > mx[i] ? m : mx[i];
            }
    for (int i = 0; i < nq; i++) sum[i] = softmax_numerators(sc + i * sc_stride, n_keys[i], mx[i]);
    for (int b0 = 0; b0 < most; b0 += KN_ATTN_KEYS)
        for (int i = 0; i < nq; i++)
            if (b0 < n_keys[i]) {
                int nb = n_keys[i] - b0 < KN_ATTN_KEYS ? n_keys[i] - b0 : KN_ATTN_KEYS;
                steps->values(sc + i * sc_stride + b0, v + (size_t)b0 * kv_stride, kv_stride, nb, hd, b0 == 0, out[i]);
            }
    for (int i = 0; i < nq; i++) kn_avx2_scale(out[i], 1.0f / sum[i], hd);
}
#endif

/* ==== Public entry points of the AVX2 build ==== */

#ifdef KN_ISA_AVX2
void kn_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
               const void *act, size_t act_stride, int nr, float *y, int64_t y_stride)
{
    kn_avx2_matmul(wtype, w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
}

float kn_dot(const float *a, const float *b, int64_t n) { return kn_avx2_dot(a, b, n); }
void  kn_axpy(float *y, float a, const float *x, int64_t n) { kn_avx2_axpy(y, a, x, n); }
void  kn_scale(float *y, float a, int64_t n) { kn_avx2_scale(y, a, n); }
void  kn_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) { kn_avx2_rmsnorm(out, x, w, n, eps); }
void  kn_swiglu(float *out, const float *gate, const float *up, int64_t n) { kn_avx2_swiglu(out, gate, up, n); }
int64_t kn_argmax(const float *v, int64_t n) { return kn_avx2_argmax(v, n); }

void kn_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                   float decay, float beta, float *out, int dk, int dv)
{
    kn_avx2_delta_step(S_in, S_out, q, k, v, decay, beta, out, dk, dv);
}

void kn_attn_heads(int nq, const float *const *q, float *const *out, const int *n_keys, const float *k,
                   const float *v, int64_t kv_stride, int hd, float scale, float *sc, int64_t sc_stride)
{
    kn_avx2_attn_heads(&kn_avx2_attn_steps, nq, q, out, n_keys, k, v, kv_stride, hd, scale, sc, sc_stride);
}
#endif
