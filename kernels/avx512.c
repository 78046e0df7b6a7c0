/* avx512.c - kernels for x86-64 with AVX-512 F, BW and VL (and VNNI when
 * the target has it).
 *
 * Only the formats that carry most of a model's bytes are widened: q8_0,
 * the K-quants and the float types.  Everything else, and the vector ops
 * (short, memory-bound), use the AVX2 kernels, which this build compiles too.
 *
 * The int8 dots follow avx2.c, 64 bytes at a time.  AVX-512 has no vpsignb,
 * so q8_0's signed weights meet the activations as |w| against x negated
 * under the mask of negative w.  With VNNI, vpdpbusd and vpdpwssd fold the
 * widening multiply-adds and the accumulation into one instruction, and
 * q8_0, q4_K and q6_K are read packed sixteen rows to a register (KN_*_X16).
 *
 * The per-row kernels were first written without an AVX-512 machine; the
 * packed ones were written and measured on an AVX-512 VNNI Xeon, where
 * ./test_kernels passes for the whole file.
 */
#include "kn_impl.h"

#ifdef KN_ISA_AVX512
#include <immintrin.h>
#include <math.h>

/* ==== Helpers ==== */

static inline __m512i load64(const void *p) { return _mm512_loadu_si512(p); }
static inline __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline __m512i bytes(int v) { return _mm512_set1_epi8((char)v); }
static inline float h2f(const uint8_t *p) { return _cvtsh_ss(kn_rd16(p)); }

static inline __m512i join(__m256i lo, __m256i hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* Unsigned bytes u times signed bytes s, summed in fours into int32 lanes
 * and added to acc. */
static inline __m512i dot_us(__m512i acc, __m512i u, __m512i s)
{
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

/* The same with each int16 pair sum weighted by the int16 in sc. */
static inline __m512i dot_us_scaled(__m512i acc, __m512i u, __m512i s, __m512i sc)
{
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(u, s), sc);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), sc));
#endif
}

/* Int16 lanes 0-15 all element e0 of v, lanes 16-31 all element e1. */
KN_INLINE __m512i pick16x2(__m512i v, int e0, int e1)
{
    return _mm512_permutexvar_epi16(_mm512_set_epi32(e1 * 0x10001, e1 * 0x10001, e1 * 0x10001, e1 * 0x10001,
                                                     e1 * 0x10001, e1 * 0x10001, e1 * 0x10001, e1 * 0x10001,
                                                     e0 * 0x10001, e0 * 0x10001, e0 * 0x10001, e0 * 0x10001,
                                                     e0 * 0x10001, e0 * 0x10001, e0 * 0x10001, e0 * 0x10001), v);
}

/* Int16 lanes 8k..8k+7 all element e+k of v, k = 0..3. */
KN_INLINE __m512i pick16x4(__m512i v, int e)
{
    int a = e * 0x10001, b = (e + 1) * 0x10001, c = (e + 2) * 0x10001, d = (e + 3) * 0x10001;
    return _mm512_permutexvar_epi16(_mm512_set_epi32(d, d, d, d, c, c, c, c, b, b, b, b, a, a, a, a), v);
}

/* ==== q8_0 ====
 * Two blocks per register.  A lone last block goes through the same code
 * with the second half masked to zero. */
KN_INLINE void q8_0_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int NR)
{
    const int64_t nb = n / KN_QK;
    const __m512i dup2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {
        const int two = b + 1 < nb;
        const __mmask64 keep = two ? ~(__mmask64)0 : 0xffffffffu;
        const uint8_t *b0 = w + b * KN_Q8_0_BYTES, *b1 = b0 + KN_Q8_0_BYTES;
        __m512i q = join(load32(b0 + 2), two ? load32(b1 + 2) : _mm256_setzero_si256());
        __m512i u = _mm512_abs_epi8(q);
        __mmask64 neg = _mm512_movepi8_mask(q);
        uint32_t dh = kn_rd16(b0) | (two ? (uint32_t)kn_rd16(b1) << 16 : 0);
        __m512 dw = _mm512_permutexvar_ps(dup2, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dh))));
        KN_UNROLL for (int r = 0; r < NR; r++) {
            __m512i x = _mm512_maskz_loadu_epi8(keep, a[r].q + b * KN_QK);
            __m512i sx = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
            __m512i p = dot_us(_mm512_setzero_si512(), u, sx);
            __m512 da = _mm512_permutexvar_ps(dup2, _mm512_castps128_ps512(_mm_maskz_loadu_ps(two ? 3 : 1, a[r].d + b)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, da), acc[r]);
        }
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

#ifdef __AVX512VNNI__
/* ==== Packed sixteen rows to a register (KN_*_X16, kn_impl.h) ====
 * Lane l of every vector is output row l of the group: four weights of
 * each of the 16 rows meet four activation bytes broadcast to all lanes in
 * one vpdpbusd, then one scale per lane.  No horizontal sums, and a block's
 * weights are unpacked once for all NR activation rows. */

/* init plus the dot of nk (4 or 8) chunks of 16 rows x 4 unsigned weights
 * with activation bytes x[0..4nk), four per chunk.  Eight go in two
 * interleaved chains: a chain of eight dependent vpdpbusd is longer than
 * the out-of-order window overlaps well. */
KN_INLINE __m512i dot_x16(__m512i init, const __m512i *q, const int8_t *x, int nk)
{
    const int two = nk == 8;
    __m512i s1 = _mm512_setzero_si512();
    KN_UNROLL for (int k = 0; k < nk; k += 1 + two) {
        init = _mm512_dpbusd_epi32(init, q[k], _mm512_set1_epi32((int)kn_rd32((const uint8_t *)x + 4 * k)));
        if (two) s1 = _mm512_dpbusd_epi32(s1, q[k + 1], _mm512_set1_epi32((int)kn_rd32((const uint8_t *)x + 4 * k + 4)));
    }
    return two ? _mm512_add_epi32(init, s1) : init;
}

/* Prefetch distances (kn_prefetch_weights): asking for the lines X16_AHEAD
 * bytes on into L1 gained 10-20% on weights in L2 or L3 and 15-30% on
 * weights streamed from memory, at every nr (one loss: q8_0, one
 * activation row, weights in L3, -13%).  The L2 stream X16_AHEAD_L2 bytes
 * on is what keeps several activation rows fed from memory:
 * ./test_kernels --bench -t 2 q8_0 (weights from memory, 1024x3584 and
 * 3584x1024, two runs, Zen 4): 3 rows 19.0-23.9 -> 29.0-32.5 GB/s, 8 rows
 * 17.4-19.6 -> 27.2-37.4, one row 25.4-30.1 -> 27.5-31.4; at -t 1, 8 rows
 * 10.1-13.0 -> 17.6-20.2 (8 and 32 KB ahead did about as well as 16). */
#define X16_AHEAD 2048
#define X16_AHEAD_L2 16384
KN_INLINE void prefetch_x16(const uint8_t *p, int bytes) { kn_prefetch_weights(p, bytes, X16_AHEAD, X16_AHEAD_L2); }

/* Bits of a where c is set, of b elsewhere. */
static inline __m512i select_bits(__m512i c, __m512i a, __m512i b) { return _mm512_ternarylogic_epi32(c, a, b, 0xca); }

/* vpshufb indices for word i of a 128-bit lane: its byte e into the low
 * byte of the word, and of its upper int16 half too if both; 0x80 zeroes. */
static inline int word_byte_index(int i, int e, int both)
{
    uint32_t b = (uint32_t)(4 * i + e);
    return (int)(0x80008000u | (both ? b : 0x80u) << 16 | b);
}

/* Int32 lane l = byte e of word l of v; with both, byte e in both int16 halves. */
KN_INLINE __m512i word_byte(__m512i v, int e, int both)
{
    return _mm512_shuffle_epi8(v, _mm512_set4_epi32(word_byte_index(3, e, both), word_byte_index(2, e, both),
                                                    word_byte_index(1, e, both), word_byte_index(0, e, both)));
}

/* q8_0: a block is eight chunks of the stored weights (w + 128); the
 * activation block sums take the 128 back out. */
KN_INLINE void q8_0x16_group(const uint8_t *w, int64_t n, const kn_arow *a, __m512 *acc, int NR)
{
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / KN_QK; b++, w += KN_X16_BLOCK) {
        prefetch_x16(w, KN_X16_BLOCK);
        __m512 dw = _mm512_cvtph_ps(load32(w));
        __m512i q[8];
        KN_UNROLL for (int k = 0; k < 8; k++) {   /* kept in registers: GCC reloads them per row otherwise */
            q[k] = load64(w + 32 + 64 * k);
            KN_KEEP(q[k]);
        }
        KN_UNROLL for (int r = 0; r < NR; r++) {
            const int8_t *x = a[r].q + b * KN_QK;
            __m512i s = dot_x16(_mm512_setzero_si512(), q, x, 8);
            /* d_a * sum((w + 128) x) - 128 * s, s = d_a * sum(x) */
            __m512 t = _mm512_fmsub_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a[r].d[b]),
                                       _mm512_set1_ps(128.0f * a[r].s[b]));
            acc[r] = _mm512_fmadd_ps(dw, t, acc[r]);
        }
    }
}

/* q4_K: per 64 elements, eight chunks whose low nibbles are sub-block 2g
 * and whose high nibbles, left in place (16 q, up to 240), are sub-block
 * 2g+1; its scale is divided by 16 to match.  In int32, with |x| <= 127:
 * sub-block sums at most 32 * 240 * 127 = 975360 in magnitude (exact in
 * float, < 2^24), then weighted by their scale in float; the mins meet the
 * activation sums over their sub-blocks, bsum_2j + bsum_2j+1 (|.| <= 4064),
 * at most 8 * 63 * 4064 = 2048256. */
KN_INLINE void q4kx16_group(const uint8_t *w, int64_t n, const kn_arow *a, __m512 *acc, int NR)
{
    const __m512i lo = bytes(15), six = bytes(0x3f), top = bytes(0x30);
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / KN_QKK; b++, w += KN_Q4_K_X16_BLOCK) {
        /* kn_k4_scales for 16 rows: scales 0-3, 4-7, mins 0-3, 4-7 as bytes of each lane's word */
        const uint8_t *sw = w + KN_Q4_K_X16_SCALES;
        __m512i s0 = load64(sw), s1 = load64(sw + 64), s2 = load64(sw + 128);
        __m512i sm[4] = {
            _mm512_and_si512(s0, six),
            select_bits(lo, s2, _mm512_and_si512(_mm512_srli_epi32(s0, 2), top)),
            _mm512_and_si512(s1, six),
            select_bits(lo, _mm512_srli_epi32(s2, 4), _mm512_and_si512(_mm512_srli_epi32(s1, 2), top)),
        };
        __m512 sc[8];
        __m512i mn[8];
        KN_UNROLL for (int j = 0; j < 8; j++) {
            sc[j] = _mm512_cvtepi32_ps(word_byte(sm[j / 4], j % 4, 0));
            if (j & 1) sc[j] = _mm512_mul_ps(sc[j], _mm512_set1_ps(1.0f / 16));
            mn[j] = word_byte(sm[2 + j / 4], j % 4, 1);
        }
        __m512 sum[KN_REG_ROWS];
        __m512i mins[KN_REG_ROWS];
        KN_UNROLL for (int r = 0; r < NR; r++) sum[r] = _mm512_setzero_ps(), mins[r] = _mm512_setzero_si512();
        for (int g = 0; g < 4; g++) {
            __m512i q[16];
            prefetch_x16(w + KN_Q4_K_X16_QS + 512 * g, 512);
            KN_UNROLL for (int k = 0; k < 8; k++) {
                __m512i v = load64(w + KN_Q4_K_X16_QS + 64 * (8 * g + k));
                q[k] = _mm512_and_si512(v, lo);
                q[8 + k] = _mm512_andnot_si512(lo, v);
            }
            KN_UNROLL for (int r = 0; r < NR; r++) {
                const int8_t *x = a[r].q + b * KN_QKK + 64 * g;
                const uint8_t *bs = (const uint8_t *)(a[r].bsum + 16 * b + 4 * g);
                __m512i t0 = dot_x16(_mm512_setzero_si512(), q, x, 8);
                __m512i t1 = dot_x16(_mm512_setzero_si512(), q + 8, x + 32, 8);
                sum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t0), sc[2 * g], sum[r]);
                sum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t1), sc[2 * g + 1], sum[r]);
                mins[r] = _mm512_dpwssd_epi32(mins[r], mn[2 * g], _mm512_set1_epi32((int)kn_rd32(bs)));
                mins[r] = _mm512_dpwssd_epi32(mins[r], mn[2 * g + 1], _mm512_set1_epi32((int)kn_rd32(bs + 4)));
            }
        }
        /* acc += d_a * (d * sum - dmin * mins) */
        __m512 d = _mm512_cvtph_ps(load32(w)), dmin = _mm512_cvtph_ps(load32(w + 32));
        KN_UNROLL for (int r = 0; r < NR; r++) {
            __m512 v = _mm512_fmsub_ps(sum[r], d, _mm512_mul_ps(_mm512_cvtepi32_ps(mins[r]), dmin));
            acc[r] = _mm512_fmadd_ps(v, _mm512_set1_ps(a[r].d[b]), acc[r]);
        }
    }
}

/* q6_K: per 16-element sub-block, the X, Y, Z chunks give four chunks of
 * six-bit weights.  Each sub-block's dot starts from -32 * bsum, which takes
 * q6_K's -32 out exactly: in int32 it ends at |sum (q - 32) x| <= 16 * 32 *
 * 127 = 65024, after at most 32 * 2032 + 16 * 63 * 127 = 193040 on the way;
 * to float it is exact, and so is its product with an int8 scale (< 2^24). */
KN_INLINE void q6kx16_group(const uint8_t *w, int64_t n, const kn_arow *a, __m512 *acc, int NR)
{
    const __m512i six = bytes(0x3f);
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / KN_QKK; b++, w += KN_Q6_K_X16_BLOCK) {
        __m512 sum[KN_REG_ROWS];
        int32_t init[KN_REG_ROWS][16];
        KN_UNROLL for (int r = 0; r < NR; r++) {
            sum[r] = _mm512_setzero_ps();
            __m512i bs = _mm512_slli_epi32(_mm512_cvtepi16_epi32(load32(a[r].bsum + 16 * b)), 5);
            _mm512_storeu_si512(init[r], _mm512_sub_epi32(_mm512_setzero_si512(), bs));
        }
        for (int s = 0; s < 16; s++) {
            const uint8_t *p = w + KN_Q6_K_X16_Q + 192 * s;
            prefetch_x16(p, 192);
            __m512i x = load64(p), y = load64(p + 64), z = load64(p + 128);
            __m512i t = select_bits(bytes(0x03), _mm512_srli_epi32(x, 6), _mm512_srli_epi32(y, 4));
            __m512i q[4] = {
                _mm512_and_si512(x, six), _mm512_and_si512(y, six), _mm512_and_si512(z, six),
                _mm512_and_si512(select_bits(bytes(0x0f), t, _mm512_srli_epi32(z, 2)), six),
            };
            __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + KN_Q6_K_X16_SCALES + 16 * s))));
            KN_UNROLL for (int r = 0; r < NR; r++) {
                __m512i t4 = dot_x16(_mm512_set1_epi32(init[r][s]), q, a[r].q + b * KN_QKK + 16 * s, 4);
                sum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t4), sc, sum[r]);
            }
        }
        __m512 d = _mm512_cvtph_ps(load32(w));
        KN_UNROLL for (int r = 0; r < NR; r++)
            acc[r] = _mm512_fmadd_ps(sum[r], _mm512_mul_ps(d, _mm512_set1_ps(a[r].d[b])), acc[r]);
    }
}

KN_INLINE void x16_rows(const uint8_t *w, size_t w_row_bytes, int64_t n, int64_t i0, int64_t i1,
                        const kn_arow *a, float *y, int64_t y_stride, int t, int NR)
{
    for (int64_t i = i0; i < i1; i += KN_PACK_ROWS) {
        __m512 acc[KN_REG_ROWS];
        const uint8_t *g = w + (size_t)i * w_row_bytes;
        if (t == KN_Q8_0_X16) q8_0x16_group(g, n, a, acc, NR);
        else if (t == KN_Q4_K_X16) q4kx16_group(g, n, a, acc, NR);
        else q6kx16_group(g, n, a, acc, NR);
        __mmask16 keep = i1 - i >= KN_PACK_ROWS ? 0xffff : (__mmask16)((1u << (i1 - i)) - 1);
        KN_UNROLL for (int r = 0; r < NR; r++) _mm512_mask_storeu_ps(y + (size_t)r * y_stride + i, keep, acc[r]);
    }
}

KN_X16_FNS(x16_q8_0, x16_rows, KN_Q8_0_X16,)
KN_X16_FNS(x16_q4_K, x16_rows, KN_Q4_K_X16,)
KN_X16_FNS(x16_q6_K, x16_rows, KN_Q6_K_X16,)

static const kn_x16_fn *x16_for(int t)
{
    switch (t) {
    case KN_Q8_0_X16: return x16_q8_0;
    case KN_Q4_K_X16: return x16_q4_K;
    case KN_Q6_K_X16: return x16_q6_K;
    default: return NULL;
    }
}
#endif

/* ==== K-quants ==== */

/* q4_K and q5_K: one register is a 64-element group, sub-blocks 2g and 2g+1. */
KN_INLINE void k45_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    const int bb = t == KN_Q4_K ? KN_Q4_K_BYTES : KN_Q5_K_BYTES, has_h = t == KN_Q5_K;
    __m512 acc[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / KN_QKK; b++) {
        const uint8_t *blk = w + b * bb, *qs = blk + bb - 128;
        uint8_t sc[8], mn[8];
        kn_k4_scales(blk + 4, sc, mn);
        __m512i sc8 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sc)));
        __m512i hb = has_h ? _mm512_broadcast_i64x4(load32(blk + 16)) : _mm512_setzero_si512();
        __m512i s[KN_REG_ROWS];
        KN_UNROLL for (int r = 0; r < NR; r++) s[r] = _mm512_setzero_si512();
        KN_UNROLL for (int g = 0; g < 4; g++) {
            __m256i raw = load32(qs + 32 * g);
            __m512i q = _mm512_and_si512(join(raw, _mm256_srli_epi16(raw, 4)), bytes(15));
            if (has_h) {
                __m512i bit = join(_mm256_set1_epi8((char)(1 << 2 * g)), _mm256_set1_epi8((char)(2 << 2 * g)));
                q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(hb, bit), bytes(16)));
            }
            __m512i scv = pick16x2(sc8, 2 * g, 2 * g + 1);
            KN_UNROLL for (int r = 0; r < NR; r++) {
                s[r] = dot_us_scaled(s[r], q, load64(a[r].q + b * KN_QKK + 64 * g), scv);
                KN_KEEP(s[r]);
            }
        }
        /* acc += da * (d * sum - dmin * mins), as in avx2.c */
        __m512 d = _mm512_set1_ps(h2f(blk)), dmin = _mm512_set1_ps(h2f(blk + 2));
        __m128i m8 = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)mn));
        __m256i mdup = _mm256_set_m128i(_mm_unpackhi_epi16(m8, m8), _mm_unpacklo_epi16(m8, m8));
        KN_UNROLL for (int r = 0; r < NR; r++) {
            __m256i mp = _mm256_madd_epi16(load32(a[r].bsum + 16 * b), mdup);
            __m512 m = _mm512_mul_ps(_mm512_cvtepi32_ps(join(mp, _mm256_setzero_si256())), dmin);
            __m512 v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(s[r]), d, m);
            acc[r] = _mm512_fmadd_ps(v, _mm512_set1_ps(a[r].d[b]), acc[r]);
        }
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* q6_K: per 128-element half, one register holds chunks 0-1 (low nibbles)
 * and one chunks 2-3 (high nibbles); the two bit pairs each chunk takes
 * from qh are moved into place by per-64-bit-lane shifts, the bytes they
 * cross into being masked off.  -32 returns through the activation sums. */
KN_INLINE void q6k_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int NR)
{
    const __m512i lo = bytes(15), top = bytes(0x30);
    const __m512i shl = _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4), shr = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    __m512 acc[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / KN_QKK; b++) {
        const uint8_t *blk = w + b * KN_Q6_K_BYTES, *sc = blk + 192;
        __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)));
        __m512i s[KN_REG_ROWS];
        KN_UNROLL for (int r = 0; r < NR; r++) s[r] = _mm512_setzero_si512();
        KN_UNROLL for (int h = 0; h < 2; h++) {
            __m512i l = load64(blk + 64 * h), hh = _mm512_broadcast_i64x4(load32(blk + 128 + 32 * h));
            __m512i q[2] = {
                _mm512_or_si512(_mm512_and_si512(l, lo), _mm512_and_si512(_mm512_sllv_epi64(hh, shl), top)),
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), lo), _mm512_and_si512(_mm512_srlv_epi64(hh, shr), top)),
            };
            KN_UNROLL for (int k = 0; k < 2; k++) {
                __m512i scv = pick16x4(sc16, 8 * h + 4 * k);
                KN_UNROLL for (int r = 0; r < NR; r++) {
                    s[r] = dot_us_scaled(s[r], q[k], load64(a[r].q + b * KN_QKK + 128 * h + 64 * k), scv);
                    KN_KEEP(s[r]);
                }
            }
        }
        float d = h2f(blk + 208);
        __m256i sc16y = _mm512_castsi512_si256(sc16);
        KN_UNROLL for (int r = 0; r < NR; r++) {
            __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(load32(a[r].bsum + 16 * b), sc16y), 5);
            __m512i sr = _mm512_sub_epi32(s[r], join(off, _mm256_setzero_si256()));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sr), _mm512_set1_ps(d * a[r].d[b]), acc[r]);
        }
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* ==== Float weights ==== */

KN_INLINE __m512 float16x(const uint8_t *w, int64_t j, int t)
{
    if (t == KN_F32) return _mm512_loadu_ps((const float *)w + j);
    __m256i h = load32(w + 2 * j);
    if (t == KN_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

KN_INLINE float float1(const uint8_t *w, int64_t j, int t)
{
    if (t == KN_F32) return ((const float *)w)[j];
    return t == KN_F16 ? h2f(w + 2 * j) : kn_bf16_f32(kn_rd16(w + 2 * j));
}

KN_INLINE void float_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    __m512 acc0[KN_REG_ROWS], acc1[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        __m512 w0 = float16x(w, j, t), w1 = float16x(w, j + 16, t);
        KN_UNROLL for (int r = 0; r < NR; r++) {
            acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(a[r].x + j), acc0[r]);
            acc1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(a[r].x + j + 16), acc1[r]);
        }
    }
    if (j + 16 <= n) {
        __m512 w0 = float16x(w, j, t);
        KN_UNROLL for (int r = 0; r < NR; r++) acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(a[r].x + j), acc0[r]);
        j += 16;
    }
    KN_UNROLL for (int r = 0; r < NR; r++) {
        float tail = 0.0f;
        for (int64_t k = j; k < n; k++) tail = fmaf(float1(w, k, t), a[r].x[k], tail);
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + tail;
    }
}

/* ==== Instantiation and public entry points ==== */

KN_ROW_FNS(rows_f32, float_row, KN_F32,)
KN_ROW_FNS(rows_f16, float_row, KN_F16,)
KN_ROW_FNS(rows_bf16, float_row, KN_BF16,)
KN_ROW_FNS(rows_q8_0, q8_0_row,)
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
    case KN_Q4_K: return rows_q4_K;
    case KN_Q5_K: return rows_q5_K;
    case KN_Q6_K: return rows_q6_K;
    default: return NULL;
    }
}

void kn_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
               const void *act, size_t act_stride, int nr, float *y, int64_t y_stride)
{
    const kn_row_fn *fns = rows_for(wtype);
#ifdef __AVX512VNNI__
    const kn_x16_fn *x16 = x16_for(wtype);
    if (x16) {
        kn_matmul_x16(x16, w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
        return;
    }
#endif
    if (fns) kn_matmul_rows(fns, w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
    else kn_avx2_matmul(wtype, w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
}

float kn_dot(const float *a, const float *b, int64_t n) { return kn_avx2_dot(a, b, n); }
void  kn_axpy(float *y, float a, const float *x, int64_t n) { kn_avx2_axpy(y, a, x, n); }
void  kn_scale(float *y, float a, int64_t n) { kn_avx2_scale(y, a, n); }
void  kn_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) { kn_avx2_rmsnorm(out, x, w, n, eps); }
void  kn_swiglu(float *out, const float *gate, const float *up, int64_t n) { kn_avx2_swiglu(out, gate, up, n); }
int64_t kn_argmax(const float *v, int64_t n) { return kn_avx2_argmax(v, n); }

/* ==== Gated DeltaNet step ====
 * avx2.c's two-pass strips, sixteen columns to a register: a strip of 64
 * columns keeps kS, qS and d in twelve registers down all dk rows. */
KN_INLINE void delta_strip(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                           float decay, float beta, float qk, float *out, int dk, int dv, int c0, int NV)
{
    __m512 ks[4], qs[4], d[4];
    KN_UNROLL for (int u = 0; u < NV; u++) ks[u] = qs[u] = _mm512_setzero_ps();
    for (int j = 0; j < dk; j++) {
        const float *row = S_in + (size_t)j * dv + c0;
        __m512 kj = _mm512_set1_ps(k[j]), qj = _mm512_set1_ps(q[j]);
        KN_UNROLL for (int u = 0; u < NV; u++) {
            __m512 s = _mm512_loadu_ps(row + 16 * u);
            ks[u] = _mm512_fmadd_ps(kj, s, ks[u]);
            qs[u] = _mm512_fmadd_ps(qj, s, qs[u]);
        }
    }
    __m512 dec = _mm512_set1_ps(decay);
    KN_UNROLL for (int u = 0; u < NV; u++) {
        __m512 kv = _mm512_mul_ps(dec, ks[u]);
        d[u] = _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_sub_ps(_mm512_loadu_ps(v + c0 + 16 * u), kv));
        _mm512_storeu_ps(out + c0 + 16 * u, _mm512_fmadd_ps(_mm512_set1_ps(qk), d[u], _mm512_mul_ps(dec, qs[u])));
    }
    for (int j = 0; j < dk; j++) {
        const float *row = S_in + (size_t)j * dv + c0;
        float *dst = S_out + (size_t)j * dv + c0;
        __m512 kj = _mm512_set1_ps(k[j]);
        KN_UNROLL for (int u = 0; u < NV; u++)
            _mm512_storeu_ps(dst + 16 * u, _mm512_fmadd_ps(dec, _mm512_loadu_ps(row + 16 * u), _mm512_mul_ps(kj, d[u])));
    }
}

void kn_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                   float decay, float beta, float *out, int dk, int dv)
{
    if (dv % 16) {
        kn_avx2_delta_step(S_in, S_out, q, k, v, decay, beta, out, dk, dv);
        return;
    }
    float qk = kn_avx2_dot(q, k, dk);
    int c0 = 0;
    for (; c0 + 64 <= dv; c0 += 64) delta_strip(S_in, S_out, q, k, v, decay, beta, qk, out, dk, dv, c0, 4);
    for (; c0 < dv; c0 += 16) delta_strip(S_in, S_out, q, k, v, decay, beta, qk, out, dk, dv, c0, 1);
}

/* ==== Activation quantisation ====
 * kn_ref_act_prepare's bytes for 32-element blocks, sixteen lanes at a
 * time: the same largest |x| (as bits), the same float products, the same
 * round-half-away-from-zero by truncating x*id +- 0.5, the same sums.  The
 * portable loop ran ~0.7 ns per float on the build machine, on the main
 * thread between pool jobs, ~6% of a 4-token verify.  K-quant blocks and
 * float weights take the portable one. */

/* (int)(t + (t < 0 ? -0.5f : 0.5f)) per lane, as kn_round */
static inline __m512i round_half_away(__m512 t)
{
    __mmask16 neg = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_cvttps_epi32(_mm512_add_ps(t, _mm512_mask_blend_ps(neg, _mm512_set1_ps(0.5f), _mm512_set1_ps(-0.5f))));
}

void kn_act_prepare(int wtype, const float *x, int64_t n, void *out)
{
    if (kn_is_float(wtype) || kn_act_block(wtype) != KN_QK) {
        kn_ref_act_prepare(wtype, x, n, out);
        return;
    }
    int8_t *q = out;
    float *d = (float *)(q + n), *s = d + n / KN_QK;
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    for (int64_t b = 0; b < n / KN_QK; b++) {
        __m512 x0 = _mm512_loadu_ps(x + KN_QK * b), x1 = _mm512_loadu_ps(x + KN_QK * b + 16);
        __m512i bits = _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(x0), magnitude),
                                        _mm512_and_si512(_mm512_castps_si512(x1), magnitude));
        float amax = kn_bits_f32(_mm512_reduce_max_epu32(bits));
        __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m512i q0 = round_half_away(_mm512_mul_ps(x0, id)), q1 = round_half_away(_mm512_mul_ps(x1, id));
        _mm_storeu_si128((__m128i *)(q + KN_QK * b), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(q + KN_QK * b + 16), _mm512_cvtepi32_epi8(q1));
        d[b] = amax / 127.0f;
        s[b] = d[b] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

/* ==== Attention ====
 * avx2.c's blocks (and driver) with sixteen floats to a register, for head
 * sizes that are multiples of 16; others take the AVX2 steps. */

/* Lane u of the result is the sum of the 16 lanes of a[u]: quarters folded
 * pairwise across registers, then within 128-bit lanes. */
static inline __m256 sum_lanes16x8(const __m512 a[8])
{
    __m512 p[4], q[2];
    KN_UNROLL for (int i = 0; i < 4; i++)      /* quarters of a[2i] and a[2i+1]: 0+2, 1+3 */
        p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
    KN_UNROLL for (int i = 0; i < 2; i++)      /* quarter u of q[i]: four partial sums of a[4i + u] */
        q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x88), _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xdd));
    __m512 r = _mm512_add_ps(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
    r = _mm512_add_ps(r, _mm512_shuffle_ps(r, r, 0x4e));   /* quarter u: sums of a[u], a[4+u], twice */
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), r));
}

/* As avx2.c's attn_scores: keys past the last repeat it, so a key's score
 * never depends on which block it falls in. */
static float attn_scores16(const float *q, const float *k, int64_t kv_stride, int t0, int t1, int n_keys, int hd,
                           float scale, float *sc)
{
    const __m256 sv = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int t = t0; t < t1; t += 8) {
        const float *kt[8];
        __m512 acc[8];
        KN_UNROLL for (int u = 0; u < 8; u++) {
            kt[u] = k + (size_t)(t + u < n_keys ? t + u : n_keys - 1) * kv_stride;
            acc[u] = _mm512_setzero_ps();
        }
        for (int j = 0; j < hd; j += 16) {
            __m512 qj = _mm512_loadu_ps(q + j);
            KN_UNROLL for (int u = 0; u < 8; u++) acc[u] = _mm512_fmadd_ps(qj, _mm512_loadu_ps(kt[u] + j), acc[u]);
        }
        __m256 s = _mm256_mul_ps(sv, sum_lanes16x8(acc));
        mx = _mm256_max_ps(mx, s);
        float lanes[8];
        _mm256_storeu_ps(lanes, s);
        memcpy(sc + t, lanes, (size_t)(t1 - t < 8 ? t1 - t : 8) * sizeof *lanes);
    }
    float m[8], best = -INFINITY;
    _mm256_storeu_ps(m, mx);
    for (int u = 0; u < 8; u++) best = m[u] > best ? m[u] : best;
    return best;
}

/* A chunk of up to 64 floats of the head: even and odd keys in separate
 * accumulators, so that two FMA chains hide each other's latency, added
 * at the end of the block. */
KN_INLINE void attn_values16(const float *p, const float *v, int64_t kv_stride, int n_keys, int first, float *out, int NV)
{
    __m512 even[4], odd[4];
    KN_UNROLL for (int u = 0; u < NV; u++) {
        even[u] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + 16 * u);
        odd[u] = _mm512_setzero_ps();
    }
    int t = 0;
    for (; t + 2 <= n_keys; t += 2) {
        const float *v0 = v + (size_t)t * kv_stride, *v1 = v0 + kv_stride;
        __m512 p0 = _mm512_set1_ps(p[t]), p1 = _mm512_set1_ps(p[t + 1]);
        KN_UNROLL for (int u = 0; u < NV; u++) {
            even[u] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v0 + 16 * u), even[u]);
            odd[u] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(v1 + 16 * u), odd[u]);
        }
    }
    if (t < n_keys) {
        __m512 p0 = _mm512_set1_ps(p[t]);
        KN_UNROLL for (int u = 0; u < NV; u++) even[u] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(v + (size_t)t * kv_stride + 16 * u), even[u]);
    }
    KN_UNROLL for (int u = 0; u < NV; u++) _mm512_storeu_ps(out + 16 * u, _mm512_add_ps(even[u], odd[u]));
}

static void attn_values_block16(const float *p, const float *v, int64_t kv_stride, int n_keys, int hd, int first, float *out)
{
    int c = 0;
    for (; c + 64 <= hd; c += 64) attn_values16(p, v + c, kv_stride, n_keys, first, out + c, 4);
    for (; c < hd; c += 16) attn_values16(p, v + c, kv_stride, n_keys, first, out + c, 1);
}

static const kn_attn_steps attn_steps16 = {attn_scores16, attn_values_block16};

void kn_attn_heads(int nq, const float *const *q, float *const *out, const int *n_keys, const float *k,
                   const float *v, int64_t kv_stride, int hd, float scale, float *sc, int64_t sc_stride)
{
    kn_avx2_attn_heads(hd % 16 ? &kn_avx2_attn_steps : &attn_steps16, nq, q, out, n_keys, k, v, kv_stride, hd,
                       scale, sc, sc_stride);
}
#endif
