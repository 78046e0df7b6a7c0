/* neon.c - kernels for AArch64 NEON, with the dot-product extension (sdot)
 * when the target has it.
 *
 * sdot multiplies signed by signed bytes, so unlike AVX2 no format needs
 * the sign trick or the activation block sums: q6_K's -32 and q4_0's -8 are
 * subtracted from the decoded quants, and only the q4_K/q5_K mins and the
 * q4_1/q5_1 offsets meet the activation sums.  The structure otherwise
 * mirrors avx2.c: decode a weight block once, walk the NR activation rows,
 * NR a compile-time constant (KN_ROW_FNS), so each row's arithmetic is the
 * same whatever nr is.
 */
#include "kn_impl.h"

#ifdef KN_ISA_NEON
#include <arm_neon.h>
#include <math.h>

/* ==== Helpers ==== */

static inline float h2f(const uint8_t *p)
{
    __fp16 h;
    memcpy(&h, p, 2);
    return h;
}

/* a.b of signed bytes, summed in fours into int32 lanes.  Without sdot the
 * widening multiplies pair differently, but each build always reduces the
 * same way, which is all determinism needs.  No int16 step can overflow:
 * |a*b| <= 128*127 and two of them fit. */
static inline int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b)
{
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(acc, a, b);
#else
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    return vpadalq_s16(acc, vmlal_high_s8(p, a, b));
#endif
}

static inline int8x16_t s8(uint8x16_t v) { return vreinterpretq_s8_u8(v); }

/* 16 bits to 16 bytes, 16 where the bit is set. */
static inline uint8x16_t bits_to_16s(uint32_t bits)
{
    static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint8x16_t v = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
    return vandq_u8(vtstq_u8(v, vld1q_u8(bit)), vdupq_n_u8(16));
}

/* ==== Legacy formats: q8_0, q4_0, q4_1, q5_0, q5_1 ==== */

static inline int legacy_bytes(int t)
{
    return t == KN_Q8_0 ? KN_Q8_0_BYTES : t == KN_Q4_0 ? KN_Q4_0_BYTES : t == KN_Q4_1 ? KN_Q4_1_BYTES
         : t == KN_Q5_0 ? KN_Q5_0_BYTES : KN_Q5_1_BYTES;
}

/* The 32 quants of a block, elements 0-15 and 16-31, offsets removed
 * (q4_1/q5_1 have none: their min is added separately). */
KN_INLINE int8x16x2_t legacy_quants(const uint8_t *b, int t)
{
    if (t == KN_Q8_0) return (int8x16x2_t){{vld1q_s8((const int8_t *)b + 2), vld1q_s8((const int8_t *)b + 18)}};
    int has_m = t == KN_Q4_1 || t == KN_Q5_1, has_h = t == KN_Q5_0 || t == KN_Q5_1;
    uint8x16_t qs = vld1q_u8(b + legacy_bytes(t) - 16);
    uint8x16_t lo = vandq_u8(qs, vdupq_n_u8(15)), hi = vshrq_n_u8(qs, 4);
    if (has_h) {
        uint32_t qh = kn_rd32(b + 2 + 2 * has_m);
        lo = vorrq_u8(lo, bits_to_16s(qh));
        hi = vorrq_u8(hi, bits_to_16s(qh >> 16));
    }
    uint8x16_t off = vdupq_n_u8(has_m ? 0 : has_h ? 16 : 8);
    return (int8x16x2_t){{s8(vsubq_u8(lo, off)), s8(vsubq_u8(hi, off))}};
}

KN_INLINE float32x4_t legacy_dot(int8x16x2_t q, const int8_t *x)
{
    int32x4_t p = dot16(dot16(vdupq_n_s32(0), q.val[0], vld1q_s8(x)), q.val[1], vld1q_s8(x + 16));
    return vcvtq_f32_s32(p);
}

/* Blocks in pairs: one add into the accumulator per pair, as in avx2.c. */
KN_INLINE void legacy_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    const int bb = legacy_bytes(t), has_m = t == KN_Q4_1 || t == KN_Q5_1;
    const int64_t nb = n / KN_QK;
    float32x4_t acc[KN_REG_ROWS], accv[KN_REG_ROWS];
    float accm[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = accv[r] = vdupq_n_f32(0.0f), accm[r] = 0.0f;
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *b0 = w + b * bb, *b1 = b0 + bb;
        int8x16x2_t q0 = legacy_quants(b0, t), q1 = legacy_quants(b1, t);
        float d0 = h2f(b0), d1 = h2f(b1);
        KN_UNROLL for (int r = 0; r < NR; r++) {
            const int8_t *x = a[r].q + b * KN_QK;
            float32x4_t s = vmulq_f32(legacy_dot(q0, x), vdupq_n_f32(d0 * a[r].d[b]));
            s = vfmaq_f32(s, legacy_dot(q1, x + KN_QK), vdupq_n_f32(d1 * a[r].d[b + 1]));
            acc[r] = vaddq_f32(acc[r], s);
        }
    }
    if (b < nb) {
        const uint8_t *b0 = w + b * bb;
        int8x16x2_t q0 = legacy_quants(b0, t);
        float d0 = h2f(b0);
        KN_UNROLL for (int r = 0; r < NR; r++)
            acc[r] = vfmaq_f32(acc[r], legacy_dot(q0, a[r].q + b * KN_QK), vdupq_n_f32(d0 * a[r].d[b]));
    }
    /* q4_1/q5_1: each min times its activation block's sum, four at a time */
    for (b = 0; has_m && b + 4 <= nb; b += 4) {
        __fp16 mh[4];
        for (int k = 0; k < 4; k++) memcpy(&mh[k], w + (b + k) * bb + 2, 2);
        float32x4_t m = vcvt_f32_f16(vld1_f16(mh));
        KN_UNROLL for (int r = 0; r < NR; r++) accv[r] = vfmaq_f32(accv[r], m, vld1q_f32(a[r].s + b));
    }
    for (; has_m && b < nb; b++) {
        float m = h2f(w + b * bb + 2);
        KN_UNROLL for (int r = 0; r < NR; r++) accm[r] = fmaf(m, a[r].s[b], accm[r]);
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = vaddvq_f32(acc[r]) + (vaddvq_f32(accv[r]) + accm[r]);
}

/* ==== K-quants ====
 * Sub-block dots are weighted by their integer scales in int32 (mla by
 * lane) and converted once per super-block; sub-block outer, rows inner. */

/* q4_K and q5_K: quants 0..15 (0..31) are valid signed bytes as they are;
 * the mins meet pairs of the activation's 16-element sums. */
KN_INLINE void k45_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    const int bb = t == KN_Q4_K ? KN_Q4_K_BYTES : KN_Q5_K_BYTES, has_h = t == KN_Q5_K;
    float32x4_t acc[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < n / KN_QKK; b++) {
        const uint8_t *blk = w + b * bb, *qs = blk + bb - 128;
        uint8_t sc[8], mn[8];
        kn_k4_scales(blk + 4, sc, mn);
        uint8x16_t hb0 = vld1q_u8(blk + 16), hb1 = vld1q_u8(blk + 32);
        int32x4_t s[KN_REG_ROWS];
        KN_UNROLL for (int r = 0; r < NR; r++) s[r] = vdupq_n_s32(0);
        KN_UNROLL for (int g = 0; g < 4; g++) {
            uint8x16_t r0 = vld1q_u8(qs + 32 * g), r1 = vld1q_u8(qs + 32 * g + 16);
            uint8x16_t q[4] = {vandq_u8(r0, vdupq_n_u8(15)), vandq_u8(r1, vdupq_n_u8(15)),
                               vshrq_n_u8(r0, 4), vshrq_n_u8(r1, 4)};
            if (has_h) {
                uint8x16_t sixteen = vdupq_n_u8(16), m0 = vdupq_n_u8((uint8_t)(1 << 2 * g)),
                           m1 = vdupq_n_u8((uint8_t)(2 << 2 * g));
                q[0] = vorrq_u8(q[0], vandq_u8(vtstq_u8(hb0, m0), sixteen));
                q[1] = vorrq_u8(q[1], vandq_u8(vtstq_u8(hb1, m0), sixteen));
                q[2] = vorrq_u8(q[2], vandq_u8(vtstq_u8(hb0, m1), sixteen));
                q[3] = vorrq_u8(q[3], vandq_u8(vtstq_u8(hb1, m1), sixteen));
            }
            KN_UNROLL for (int r = 0; r < NR; r++) {
                const int8_t *x = a[r].q + b * KN_QKK + 64 * g;
                int32x4_t p0 = dot16(dot16(vdupq_n_s32(0), s8(q[0]), vld1q_s8(x)), s8(q[1]), vld1q_s8(x + 16));
                int32x4_t p1 = dot16(dot16(vdupq_n_s32(0), s8(q[2]), vld1q_s8(x + 32)), s8(q[3]), vld1q_s8(x + 48));
                s[r] = vmlaq_n_s32(vmlaq_n_s32(s[r], p0, sc[2 * g]), p1, sc[2 * g + 1]);
                KN_KEEP(s[r]);
            }
        }
        /* acc += da * (d * sum - dmin * mins), as in avx2.c */
        float d = h2f(blk), dmin = h2f(blk + 2);
        int16x8_t mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mn)));
        KN_UNROLL for (int r = 0; r < NR; r++) {
            const int16_t *bs = a[r].bsum + 16 * b;
            int16x8_t pair = vpaddq_s16(vld1q_s16(bs), vld1q_s16(bs + 8));
            int32x4_t mp = vmlal_high_s16(vmull_s16(vget_low_s16(pair), vget_low_s16(mins)), pair, mins);
            float32x4_t v = vfmaq_n_f32(vmulq_n_f32(vcvtq_f32_s32(mp), -dmin), vcvtq_f32_s32(s[r]), d);
            acc[r] = vfmaq_n_f32(acc[r], v, a[r].d[b]);
        }
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = vaddvq_f32(acc[r]);
}

/* q6_K: quants decoded signed (-32..31); each 16 bytes is one sub-block
 * with its own int8 scale. */
KN_INLINE void q6k_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int NR)
{
    float32x4_t acc[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < n / KN_QKK; b++) {
        const uint8_t *blk = w + b * KN_Q6_K_BYTES;
        const int8_t *sc = (const int8_t *)blk + 192;
        int32x4_t s[KN_REG_ROWS];
        KN_UNROLL for (int r = 0; r < NR; r++) s[r] = vdupq_n_s32(0);
        KN_UNROLL for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            KN_UNROLL for (int k = 0; k < 4; k++) KN_UNROLL for (int p = 0; p < 2; p++) {
                uint8x16_t l = vld1q_u8(ql + 32 * (k & 1) + 16 * p);
                uint8x16_t lo = k < 2 ? vandq_u8(l, vdupq_n_u8(15)) : vshrq_n_u8(l, 4);
                uint8x16_t hi = vandq_u8(vshlq_u8(vld1q_u8(qh + 16 * p), vdupq_n_s8((int8_t)(4 - 2 * k))), vdupq_n_u8(0x30));
                int8x16_t q = s8(vsubq_u8(vorrq_u8(lo, hi), vdupq_n_u8(32)));
                int scale = sc[8 * h + 2 * k + p];
                KN_UNROLL for (int r = 0; r < NR; r++) {
                    const int8_t *x = a[r].q + b * KN_QKK + 128 * h + 32 * k + 16 * p;
                    s[r] = vmlaq_n_s32(s[r], dot16(vdupq_n_s32(0), q, vld1q_s8(x)), scale);
                    KN_KEEP(s[r]);
                }
            }
        }
        float d = h2f(blk + 208);
        KN_UNROLL for (int r = 0; r < NR; r++)
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s[r]), vdupq_n_f32(d * a[r].d[b]));
    }
    KN_UNROLL for (int r = 0; r < NR; r++) out[r] = vaddvq_f32(acc[r]);
}

/* ==== Float weights: f32, f16, bf16 against f32 activations ==== */

KN_INLINE float32x4_t float4(const uint8_t *w, int64_t j, int t)
{
    if (t == KN_F32) return vld1q_f32((const float *)w + j);
    if (t == KN_F16) {
        float16x4_t h;
        memcpy(&h, w + 2 * j, 8);
        return vcvt_f32_f16(h);
    }
    uint16x4_t u;
    memcpy(&u, w + 2 * j, 8);
    return vreinterpretq_f32_u32(vshll_n_u16(u, 16));
}

KN_INLINE float float1(const uint8_t *w, int64_t j, int t)
{
    if (t == KN_F32) return ((const float *)w)[j];
    return t == KN_F16 ? h2f(w + 2 * j) : kn_bf16_f32(kn_rd16(w + 2 * j));
}

/* Two accumulators per row hide the FMA latency when nr is 1. */
KN_INLINE void float_row(const uint8_t *w, int64_t n, const kn_arow *a, float *out, int t, int NR)
{
    float32x4_t acc0[KN_REG_ROWS], acc1[KN_REG_ROWS];
    KN_UNROLL for (int r = 0; r < NR; r++) acc0[r] = acc1[r] = vdupq_n_f32(0.0f);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        float32x4_t w0 = float4(w, j, t), w1 = float4(w, j + 4, t);
        KN_UNROLL for (int r = 0; r < NR; r++) {
            acc0[r] = vfmaq_f32(acc0[r], w0, vld1q_f32(a[r].x + j));
            acc1[r] = vfmaq_f32(acc1[r], w1, vld1q_f32(a[r].x + j + 4));
        }
    }
    if (j + 4 <= n) {
        float32x4_t w0 = float4(w, j, t);
        KN_UNROLL for (int r = 0; r < NR; r++) acc0[r] = vfmaq_f32(acc0[r], w0, vld1q_f32(a[r].x + j));
        j += 4;
    }
    KN_UNROLL for (int r = 0; r < NR; r++) {
        float tail = 0.0f;
        for (int64_t k = j; k < n; k++) tail = fmaf(float1(w, k, t), a[r].x[k], tail);
        out[r] = vaddvq_f32(vaddq_f32(acc0[r], acc1[r])) + tail;
    }
}

/* ==== Instantiation and matmul ==== */

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

void kn_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
               const void *act, size_t act_stride, int nr, float *y, int64_t y_stride)
{
    kn_matmul_rows(rows_for(wtype), w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
}

/* ==== Vector ops ==== */

float kn_dot(const float *a, const float *b, int64_t n)
{
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float tail = 0.0f;
    for (; i < n; i++) tail = fmaf(a[i], b[i], tail);
    return vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3))) + tail;
}

void kn_axpy(float *y, float a, const float *x, int64_t n)
{
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

void kn_scale(float *y, float a, int64_t n)
{
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_n_f32(vld1q_f32(y + i), a));
    for (; i < n; i++) y[i] *= a;
}

void kn_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps)
{
    float r = 1.0f / sqrtf(kn_dot(x, x, n) / (float)n + eps);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vmulq_n_f32(vld1q_f32(x + i), r);
        vst1q_f32(out + i, w ? vmulq_f32(v, vld1q_f32(w + i)) : v);
    }
    for (; i < n; i++) out[i] = w ? x[i] * r * w[i] : x[i] * r;
}

/* e^x as in avx2.c: x = n ln2 + r, degree-7 Taylor for e^r, 2^n by
 * exponent; e^88 above 88, 0 below -87 and for NaN. */
static inline float32x4_t exp4(float32x4_t x)
{
    uint32x4_t live = vcgeq_f32(x, vdupq_n_f32(-87.0f));
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    float32x4_t nf = vrndnq_f32(vmulq_n_f32(x, 1.44269504f));
    float32x4_t r = vfmsq_f32(x, nf, vdupq_n_f32(0.693145752f));
    r = vfmsq_f32(r, nf, vdupq_n_f32(1.42860677e-6f));
    static const float c[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    float32x4_t p = vdupq_n_f32(c[0]);
    for (int k = 1; k < 8; k++) p = vfmaq_f32(vdupq_n_f32(c[k]), p, r);
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(nf), vdupq_n_s32(127)), 23);
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vmulq_f32(p, vreinterpretq_f32_s32(e))), live));
}

void kn_swiglu(float *out, const float *gate, const float *up, int64_t n)
{
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t g = vld1q_f32(gate + i);
        float32x4_t silu = vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), exp4(vnegq_f32(g))));
        vst1q_f32(out + i, up ? vmulq_f32(silu, vld1q_f32(up + i)) : silu);
    }
    kn_sc_swiglu(out + i, gate + i, up ? up + i : NULL, n - i);
}

/* As avx2.c's: the largest value by vector maxima, then its first place. */
int64_t kn_argmax(const float *v, int64_t n)
{
    float32x4_t m = vdupq_n_f32(-INFINITY);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) m = vmaxq_f32(m, vld1q_f32(v + i));
    float best = vmaxvq_f32(m);
    for (; i < n; i++) best = v[i] > best ? v[i] : best;
    const float32x4_t b = vdupq_n_f32(best);
    for (i = 0; i + 4 <= n; i += 4)
        if (vmaxvq_u32(vceqq_f32(vld1q_f32(v + i), b))) break;
    while (v[i] != best) i++;
    return i;
}

/* The two-pass form of kn_sc_delta_step on strips of 32 columns: kS, qS and
 * d for a strip take 24 of the 32 vector registers. */
KN_INLINE void delta_strip(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                           float decay, float beta, float qk, float *out, int dk, int dv, int c0, int NV)
{
    float32x4_t ks[8], qs[8], d[8];
    KN_UNROLL for (int u = 0; u < NV; u++) ks[u] = qs[u] = vdupq_n_f32(0.0f);
    for (int j = 0; j < dk; j++) {
        const float *row = S_in + (size_t)j * dv + c0;
        KN_UNROLL for (int u = 0; u < NV; u++) {
            float32x4_t s = vld1q_f32(row + 4 * u);
            ks[u] = vfmaq_n_f32(ks[u], s, k[j]);
            qs[u] = vfmaq_n_f32(qs[u], s, q[j]);
        }
    }
    KN_UNROLL for (int u = 0; u < NV; u++) {
        float32x4_t kv = vmulq_n_f32(ks[u], decay);
        d[u] = vmulq_n_f32(vsubq_f32(vld1q_f32(v + c0 + 4 * u), kv), beta);
        vst1q_f32(out + c0 + 4 * u, vfmaq_n_f32(vmulq_n_f32(qs[u], decay), d[u], qk));
    }
    for (int j = 0; j < dk; j++) {
        const float *row = S_in + (size_t)j * dv + c0;
        float *dst = S_out + (size_t)j * dv + c0;
        KN_UNROLL for (int u = 0; u < NV; u++)
            vst1q_f32(dst + 4 * u, vfmaq_n_f32(vmulq_n_f32(d[u], k[j]), vld1q_f32(row + 4 * u), decay));
    }
}

void kn_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                   float decay, float beta, float *out, int dk, int dv)
{
    if (dv % 4) {
        kn_sc_delta_step(S_in, S_out, q, k, v, decay, beta, out, dk, dv);
        return;
    }
    float qk = kn_dot(q, k, dk);
    int c0 = 0;
    for (; c0 + 32 <= dv; c0 += 32) delta_strip(S_in, S_out, q, k, v, decay, beta, qk, out, dk, dv, c0, 8);
    for (; c0 < dv; c0 += 4) delta_strip(S_in, S_out, q, k, v, decay, beta, qk, out, dk, dv, c0, 1);
}

/* ==== Attention ====
 * The three passes of avx2.c's, on 4-float vectors: scores eight keys at a
 * time, exponentials four at a time, then the weighted sum of value rows in
 * chunks of up to 64 floats held in 16 of the 32 registers across a block
 * of keys.  NEON has no masked loads, so the hd % 4 tail is scalar. */

/* The n < 4 floats at p as a vector, the other lanes set to fill; and back. */
static inline float32x4_t load_part(const float *p, int n, float fill)
{
    float t[4] = {fill, fill, fill, fill};
    memcpy(t, p, (size_t)n * sizeof *t);
    return vld1q_f32(t);
}

static inline void store_part(float *p, float32x4_t x, int n)
{
    float t[4];
    vst1q_f32(t, x);
    memcpy(p, t, (size_t)n * sizeof *t);
}

/* s[u] = q . k_t for t = t0 + u, u < 8.  Positions past the last key repeat
 * it: the lane is computed and ignored, so a key's score never depends on
 * which block it falls in. */
static inline void scores8(const float *q, const float *k, int64_t kv_stride, int t0, int n_keys, int hd,
                           float s[8])
{
    const float *kt[8];
    float32x4_t acc[8];
    float tail[8] = {0};
    KN_UNROLL for (int u = 0; u < 8; u++) {
        kt[u] = k + (size_t)(t0 + u < n_keys ? t0 + u : n_keys - 1) * kv_stride;
        acc[u] = vdupq_n_f32(0.0f);
    }
    int j = 0;
    for (; j + 4 <= hd; j += 4) {
        float32x4_t qj = vld1q_f32(q + j);
        KN_UNROLL for (int u = 0; u < 8; u++) acc[u] = vfmaq_f32(acc[u], qj, vld1q_f32(kt[u] + j));
    }
    for (; j < hd; j++)
        for (int u = 0; u < 8; u++) tail[u] = fmaf(q[j], kt[u][j], tail[u]);
    vst1q_f32(s, vaddq_f32(vpaddq_f32(vpaddq_f32(acc[0], acc[1]), vpaddq_f32(acc[2], acc[3])), vld1q_f32(tail)));
    vst1q_f32(s + 4, vaddq_f32(vpaddq_f32(vpaddq_f32(acc[4], acc[5]), vpaddq_f32(acc[6], acc[7])), vld1q_f32(tail + 4)));
}

/* out[0, 4 NV) += sum_t p[t] v_t over the same range (first: out starts
 * from 0), NV accumulators carried down the keys. */
KN_INLINE void attn_out(const float *p, const float *v, int64_t kv_stride, int n_keys, int first, float *out, int NV)
{
    float32x4_t acc[16];
    KN_UNROLL for (int u = 0; u < NV; u++) acc[u] = first ? vdupq_n_f32(0.0f) : vld1q_f32(out + 4 * u);
    for (int t = 0; t < n_keys; t++) {
        const float *vt = v + (size_t)t * kv_stride;
        KN_UNROLL for (int u = 0; u < NV; u++) acc[u] = vfmaq_n_f32(acc[u], vld1q_f32(vt + 4 * u), p[t]);
    }
    KN_UNROLL for (int u = 0; u < NV; u++) vst1q_f32(out + 4 * u, acc[u]);
}

/* One block of keys over the head's first hd / 4 * 4 floats, in chunks of
 * 64, 16 and 4. */
static void attn_out_block(const float *p, const float *v, int64_t kv_stride, int n_keys, int hd, int first,
                           float *out)
{
    int c = 0;
    for (; c + 64 <= hd; c += 64) attn_out(p, v + c, kv_stride, n_keys, first, out + c, 16);
    for (; c + 16 <= hd; c += 16) attn_out(p, v + c, kv_stride, n_keys, first, out + c, 4);
    for (; c + 4 <= hd; c += 4) attn_out(p, v + c, kv_stride, n_keys, first, out + c, 1);
}

static void attn_head(const float *q, const float *k, const float *v, int64_t kv_stride, int n_keys, int hd,
                      float scale, float *sc, float *out)
{
    float32x4_t mx = vdupq_n_f32(-INFINITY);
    for (int t0 = 0; t0 < n_keys; t0 += 8) {
        float s[8];
        scores8(q, k, kv_stride, t0, n_keys, hd, s);
        float32x4_t s0 = vmulq_n_f32(vld1q_f32(s), scale), s1 = vmulq_n_f32(vld1q_f32(s + 4), scale);
        mx = vmaxq_f32(mx, vmaxq_f32(s0, s1));
        vst1q_f32(s, s0), vst1q_f32(s + 4, s1);
        memcpy(sc + t0, s, (size_t)(n_keys - t0 < 8 ? n_keys - t0 : 8) * sizeof *s);
    }
    /* the padding lanes hold real scores, so the max is right as it is; in
     * the exponentials they are -inf, which exp4 takes to exactly 0 */
    const float32x4_t m = vdupq_n_f32(vmaxvq_f32(mx));
    float32x4_t sum = vdupq_n_f32(0.0f);
    const int nfull = n_keys / 4 * 4, rest = n_keys - nfull;
    for (int t = 0; t < nfull; t += 4) {
        float32x4_t e = exp4(vsubq_f32(vld1q_f32(sc + t), m));
        sum = vaddq_f32(sum, e);
        vst1q_f32(sc + t, e);
    }
    if (rest) {
        float32x4_t e = exp4(vsubq_f32(load_part(sc + nfull, rest, -INFINITY), m));
        sum = vaddq_f32(sum, e);
        store_part(sc + nfull, e, rest);
    }
    for (int t0 = 0; t0 < n_keys; t0 += KN_ATTN_KEYS) {
        int nb = n_keys - t0 < KN_ATTN_KEYS ? n_keys - t0 : KN_ATTN_KEYS;
        attn_out_block(sc + t0, v + (size_t)t0 * kv_stride, kv_stride, nb, hd, t0 == 0, out);
    }
    for (int c = hd / 4 * 4; c < hd; c++) {
        float o = 0.0f;
        for (int t = 0; t < n_keys; t++) o = fmaf(sc[t], v[(size_t)t * kv_stride + c], o);
        out[c] = o;
    }
    kn_scale(out, 1.0f / vaddvq_f32(sum), hd);
}

/* Queries one after another: NEON does not yet share the cache's reads between them. */
void kn_attn_heads(int nq, const float *const *q, float *const *out, const int *n_keys, const float *k,
                   const float *v, int64_t kv_stride, int hd, float scale, float *sc, int64_t sc_stride)
{
    for (int i = 0; i < nq; i++) attn_head(q[i], k, v, kv_stride, n_keys[i], hd, scale, sc + i * sc_stride, out[i]);
}
#endif
