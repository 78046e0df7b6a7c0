/* scalar.c - everything about the formats, plus the portable kernels.
 *
 * This file is compiled into every build.  It owns what must not differ
 * between instruction sets: the ggml type table, exact dequantisation, the
 * prepared-activation layout (kn_ref_act_prepare), the double-precision
 * references the tests trust, and the CPU check.  It also holds portable
 * kernels (kn_sc_*): the whole implementation when no SIMD file applies, and
 * the fallback for formats a SIMD file leaves alone.
 *
 * The portable matmul dequantises each weight chunk once to floats and dots
 * it with every activation row.  That is slower than integer dots but it is
 * one code path for all eleven formats, and it is trivially deterministic:
 * each (row, activation) pair is summed in a fixed order whatever nr is.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "kn_impl.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#endif

/* ==== Dequantisation, one block run per format ==== */

typedef void (*kn_deq_fn)(const uint8_t *b, float *y, int64_t nblocks);

static void dq_f32(const uint8_t *b, float *y, int64_t nb) { memcpy(y, b, (size_t)nb * 4); }

static void dq_f16(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++) y[i] = kn_f16_f32(kn_rd16(b + 2 * i));
}

static void dq_bf16(const uint8_t *b, float *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++) y[i] = kn_bf16_f32(kn_rd16(b + 2 * i));
}

/* q4_0, q4_1, q5_0, q5_1 differ only in whether they carry a min (then the
 * quants are unsigned) and a fifth bit plane. */
KN_INLINE void dq_legacy(const uint8_t *b, float *y, int64_t nb, int bytes, int has_m, int has_h)
{
    int off = has_m ? 0 : has_h ? 16 : 8;
    for (; nb > 0; nb--, b += bytes, y += KN_QK) {
        float d = kn_f16_f32(kn_rd16(b)), m = has_m ? kn_f16_f32(kn_rd16(b + 2)) : 0.0f;
        uint32_t qh = has_h ? kn_rd32(b + 2 + 2 * has_m) : 0;
        const uint8_t *qs = b + bytes - 16;
        for (int j = 0; j < 16; j++) {
            int x0 = (int)((qs[j] & 15) | ((qh >> j) << 4 & 16)) - off;
            int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 16)) - off;
            y[j] = has_m ? x0 * d + m : x0 * d;
            y[j + 16] = has_m ? x1 * d + m : x1 * d;
        }
    }
}

static void dq_q4_0(const uint8_t *b, float *y, int64_t nb) { dq_legacy(b, y, nb, KN_Q4_0_BYTES, 0, 0); }
static void dq_q4_1(const uint8_t *b, float *y, int64_t nb) { dq_legacy(b, y, nb, KN_Q4_1_BYTES, 1, 0); }
static void dq_q5_0(const uint8_t *b, float *y, int64_t nb) { dq_legacy(b, y, nb, KN_Q5_0_BYTES, 0, 1); }
static void dq_q5_1(const uint8_t *b, float *y, int64_t nb) { dq_legacy(b, y, nb, KN_Q5_1_BYTES, 1, 1); }

static void dq_q8_0(const uint8_t *b, float *y, int64_t nb)
{
    for (; nb > 0; nb--, b += KN_Q8_0_BYTES, y += KN_QK) {
        float d = kn_f16_f32(kn_rd16(b));
        for (int j = 0; j < KN_QK; j++) y[j] = (int8_t)b[2 + j] * d;
    }
}

/* q4_K and q5_K: four groups of 64, each the low then the high nibbles of 32
 * bytes; q5_K's bit plane gives group g its bits 2g (low) and 2g+1 (high). */
KN_INLINE void dq_k45(const uint8_t *b, float *y, int64_t nb, int bytes, int has_h)
{
    for (; nb > 0; nb--, b += bytes, y += KN_QKK) {
        float d = kn_f16_f32(kn_rd16(b)), dmin = kn_f16_f32(kn_rd16(b + 2));
        uint8_t sc[8], mn[8];
        kn_k4_scales(b + 4, sc, mn);
        const uint8_t *qh = b + 16, *qs = b + bytes - 128;
        for (int g = 0; g < 4; g++) {
            float d1 = d * sc[2 * g], m1 = dmin * mn[2 * g];
            float d2 = d * sc[2 * g + 1], m2 = dmin * mn[2 * g + 1];
            for (int l = 0; l < 32; l++) {
                int h1 = has_h ? (qh[l] >> (2 * g) & 1) << 4 : 0;
                int h2 = has_h ? (qh[l] >> (2 * g + 1) & 1) << 4 : 0;
                y[64 * g + l] = d1 * ((qs[32 * g + l] & 15) + h1) - m1;
                y[64 * g + 32 + l] = d2 * ((qs[32 * g + l] >> 4) + h2) - m2;
            }
        }
    }
}

static void dq_q4_K(const uint8_t *b, float *y, int64_t nb) { dq_k45(b, y, nb, KN_Q4_K_BYTES, 0); }
static void dq_q5_K(const uint8_t *b, float *y, int64_t nb) { dq_k45(b, y, nb, KN_Q5_K_BYTES, 1); }

/* q6_K: two halves of 128; in each, 64 ql bytes give elements l, l+32 (low
 * nibbles) and l+64, l+96 (high), and qh byte l their top two bits. */
static void dq_q6_K(const uint8_t *b, float *y, int64_t nb)
{
    for (; nb > 0; nb--, b += KN_Q6_K_BYTES, y += KN_QKK) {
        float d = kn_f16_f32(kn_rd16(b + 208));
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            const int8_t *sc = (const int8_t *)(b + 192) + 8 * h;
            float *yh = y + 128 * h;
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = (int)((ql[l] & 15) | (qh[l] & 3) << 4) - 32;
                int q2 = (int)((ql[l + 32] & 15) | (qh[l] >> 2 & 3) << 4) - 32;
                int q3 = (int)((ql[l] >> 4) | (qh[l] >> 4 & 3) << 4) - 32;
                int q4 = (int)((ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4) - 32;
                yh[l] = d * sc[is] * q1;
                yh[l + 32] = d * sc[is + 2] * q2;
                yh[l + 64] = d * sc[is + 4] * q3;
                yh[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

/* ==== Type table ==== */

typedef struct {
    const char *name;
    int64_t elems;          /* per block */
    size_t bytes;           /* per block */
    kn_deq_fn deq;
} kn_type_info;

static const kn_type_info *type_info(int t)
{
    static const kn_type_info f32 = {"f32", 1, 4, dq_f32}, f16 = {"f16", 1, 2, dq_f16},
        bf16 = {"bf16", 1, 2, dq_bf16}, q4_0 = {"q4_0", KN_QK, KN_Q4_0_BYTES, dq_q4_0},
        q4_1 = {"q4_1", KN_QK, KN_Q4_1_BYTES, dq_q4_1}, q5_0 = {"q5_0", KN_QK, KN_Q5_0_BYTES, dq_q5_0},
        q5_1 = {"q5_1", KN_QK, KN_Q5_1_BYTES, dq_q5_1}, q8_0 = {"q8_0", KN_QK, KN_Q8_0_BYTES, dq_q8_0},
        q4_K = {"q4_K", KN_QKK, KN_Q4_K_BYTES, dq_q4_K}, q5_K = {"q5_K", KN_QKK, KN_Q5_K_BYTES, dq_q5_K},
        q6_K = {"q6_K", KN_QKK, KN_Q6_K_BYTES, dq_q6_K};
    switch (t) {
    case KN_F32: return &f32;
    case KN_F16: return &f16;
    case KN_BF16: return &bf16;
    case KN_Q4_0: return &q4_0;
    case KN_Q4_1: return &q4_1;
    case KN_Q5_0: return &q5_0;
    case KN_Q5_1: return &q5_1;
    case KN_Q8_0: return &q8_0;
    case KN_Q4_K: return &q4_K;
    case KN_Q5_K: return &q5_K;
    case KN_Q6_K: return &q6_K;
    default: return NULL;
    }
}

int kn_type_supported(int type) { return type_info(type) != NULL; }

const char *kn_type_name(int type)
{
    static _Thread_local char buf[24];
    const kn_type_info *t = type_info(type);
    if (t) return t->name;
    if (type == KN_Q8_0_X16) return "q8_0x16";
    if (type == KN_Q4_K_X16) return "q4_Kx16";
    if (type == KN_Q6_K_X16) return "q6_Kx16";
    snprintf(buf, sizeof buf, "type %d", type);
    return buf;
}

int64_t kn_block_elems(int type) { return type_info(type) ? type_info(type)->elems : 0; }
size_t  kn_block_bytes(int type) { return type_info(type) ? type_info(type)->bytes : 0; }

size_t kn_row_bytes(int type, int64_t n)
{
    const kn_type_info *t = type_info(type);
    return t ? (size_t)(n / t->elems) * t->bytes : 0;
}

void kn_dequant_row(int type, const void *row, float *out, int64_t n)
{
    const kn_type_info *t = type_info(type);
    t->deq(row, out, n / t->elems);
}

/* ==== Packed weights ====
 * Packing is plain byte shuffling, the same for every build; whether a
 * build asks for it depends on whether it has the kernel.  A layout
 * (kn_impl.h) is two steps: each row's block is rewritten to its "row form"
 * of the same size (x16_form: q8_0's weights stored +128, q6_K's three
 * bytes per four weights, q4_K as it is), then every field of the row form
 * goes to its place in the group's block, lane l of a field of size bytes
 * at dst + size*l (x16_fields).  kn_get_row runs both steps backwards and
 * dequantises the rebuilt block, so it is exact by construction. */

int kn_pack_type(int type)
{
#if defined(KN_ISA_AVX512) && defined(__AVX512VNNI__)
    if (type == KN_Q8_0 || type == KN_Q4_K || type == KN_Q6_K) return 0x100 + type;
#elif defined(KN_ISA_AVX2)
    if (type == KN_Q8_0) return KN_Q8_0_X16;
#endif
    return type;
}

static int64_t kn_groups(int64_t n_out) { return (n_out + KN_PACK_ROWS - 1) / KN_PACK_ROWS; }

size_t kn_pack_bytes(int type, int64_t n_out, int64_t n_in)
{
    int64_t rows = kn_pack_type(type) == type ? n_out : kn_groups(n_out) * KN_PACK_ROWS;
    return (size_t)rows * kn_row_bytes(type, n_in);
}

typedef struct { int16_t src, dst, size; } x16_field;
#define X16_MAX_FIELDS 65
#define X16_WORD (4 * KN_PACK_ROWS)     /* a field of one word per row */

/* The fields of a type's row form and the offset of lane 0's copy in the
 * group block; returns how many. */
static int x16_fields(int type, x16_field *f)
{
    int n = 0;
    switch (type) {
    case KN_Q8_0:                       /* d | 8 words of weights */
        f[n++] = (x16_field){0, 0, 2};
        for (int k = 0; k < 8; k++) f[n++] = (x16_field){(int16_t)(2 + 4 * k), (int16_t)(2 * KN_PACK_ROWS + X16_WORD * k), 4};
        break;
    case KN_Q4_K:                       /* d | dmin | 3 scale words | 32 words of nibbles */
        f[n++] = (x16_field){0, 0, 2};
        f[n++] = (x16_field){2, 2 * KN_PACK_ROWS, 2};
        for (int k = 0; k < 35; k++) f[n++] = (x16_field){(int16_t)(4 + 4 * k), (int16_t)(KN_Q4_K_X16_SCALES + X16_WORD * k), 4};
        break;
    case KN_Q6_K:                       /* 16 x (X, Y, Z words) | 16 scales | d */
        for (int k = 0; k < 48; k++) f[n++] = (x16_field){(int16_t)(4 * k), (int16_t)(KN_Q6_K_X16_Q + X16_WORD * k), 4};
        for (int s = 0; s < 16; s++) f[n++] = (x16_field){(int16_t)(192 + s), (int16_t)(KN_Q6_K_X16_SCALES + KN_PACK_ROWS * s), 1};
        f[n++] = (x16_field){208, 0, 2};
        break;
    }
    return n;
}

/* Where q6_K keeps elements 4k..4k+3: the ql word holding their low
 * nibbles at bit *lo_shift of each byte, the qh word holding their top bit
 * pairs at *hi_shift (as dq_q6_K reads them). */
static void q6_word_at(int k, int *lo, int *lo_shift, int *hi, int *hi_shift)
{
    int h = k / 32, quad = k % 32 / 8, l = 4 * (k % 8);
    *lo = 64 * h + 32 * (quad & 1) + l, *lo_shift = 4 * (quad >> 1);
    *hi = 128 + 32 * h + l, *hi_shift = 2 * quad;
}

/* q6_K's weights of block in to the X, Y, Z words of kn_impl.h in out, or
 * back; out starts as a copy of in. */
static void q6_xyz(const uint8_t *in, uint8_t *out, int to_xyz)
{
    if (!to_xyz) memset(out, 0, 192);
    for (int s = 0; s < 16; s++) {
        uint32_t q[4], w[3];
        int lo[4], ls[4], hi[4], hs[4];
        for (int c = 0; c < 4; c++) q6_word_at(4 * s + c, &lo[c], &ls[c], &hi[c], &hs[c]);
        if (to_xyz) {
            for (int c = 0; c < 4; c++)
                q[c] = (kn_rd32(in + lo[c]) >> ls[c] & 0x0f0f0f0fu) | (kn_rd32(in + hi[c]) >> hs[c] & 0x03030303u) << 4;
            w[0] = q[0] | (q[3] & 0x03030303u) << 6;
            w[1] = q[1] | (q[3] & 0x0c0c0c0cu) << 4;
            w[2] = q[2] | (q[3] & 0x30303030u) << 2;
            memcpy(out + 12 * s, w, 12);
            continue;
        }
        memcpy(w, in + 12 * s, 12);
        for (int c = 0; c < 3; c++) q[c] = w[c] & 0x3f3f3f3fu;
        q[3] = (w[0] >> 6 & 0x03030303u) | (w[1] >> 4 & 0x0c0c0c0cu) | (w[2] >> 2 & 0x30303030u);
        for (int c = 0; c < 4; c++) {
            uint32_t l = kn_rd32(out + lo[c]) | (q[c] & 0x0f0f0f0fu) << ls[c];
            uint32_t h = kn_rd32(out + hi[c]) | (q[c] >> 4 & 0x03030303u) << hs[c];
            memcpy(out + lo[c], &l, 4), memcpy(out + hi[c], &h, 4);
        }
    }
}

/* A block to its row form (to_form) or back. */
KN_INLINE void x16_form(int type, const uint8_t *in, uint8_t *out, int to_form)
{
    memcpy(out, in, kn_block_bytes(type));
    if (type == KN_Q8_0 && KN_X16_Q8_0_BIAS)   /* +128 on a byte is flipping its top bit */
        for (int k = 0; k < KN_QK / 4; k++) {
            uint32_t v = kn_rd32(in + 2 + 4 * k) ^ 0x80808080u;
            memcpy(out + 2 + 4 * k, &v, 4);
        }
    if (type == KN_Q6_K) q6_xyz(in, out, to_form);
}

/* Lanes 0..15 of a field from the 16 row forms, a constant size apart so
 * that each copy is one move. */
KN_INLINE void x16_spread(uint8_t *dst, const uint8_t *form, int size)
{
    for (int l = 0; l < KN_PACK_ROWS; l++) memcpy(dst + size * l, form + KN_Q6_K_BYTES * l, (size_t)size);
}

/* kn_pack for one type, instantiated per type so that the block size, the
 * fields and the row form are constants: packing runs at load time over
 * every matrix. */
KN_INLINE void x16_pack(int type, const uint8_t *w, size_t w_row_bytes, int64_t n_out, int64_t n_in, uint8_t *o)
{
    static const uint8_t zero_block[KN_Q6_K_BYTES];
    x16_field f[X16_MAX_FIELDS];
    int nf = x16_fields(type, f);
    size_t bb = kn_block_bytes(type);
    uint8_t form[KN_PACK_ROWS][KN_Q6_K_BYTES];
    for (int64_t g = 0; g < kn_groups(n_out); g++)
        for (int64_t b = 0; b < n_in / kn_block_elems(type); b++, o += KN_PACK_ROWS * bb) {
            for (int l = 0; l < KN_PACK_ROWS; l++) {
                int64_t i = g * KN_PACK_ROWS + l;
                x16_form(type, i < n_out ? w + (size_t)i * w_row_bytes + b * bb : zero_block, form[l], 1);
            }
            for (int k = 0; k < nf; k++) {
                uint8_t *d = o + f[k].dst;
                const uint8_t *src = form[0] + f[k].src;
                if (f[k].size == 4) x16_spread(d, src, 4);
                else if (f[k].size == 2) x16_spread(d, src, 2);
                else x16_spread(d, src, 1);
            }
        }
}

void kn_pack(int type, const void *w, size_t w_row_bytes, int64_t n_out, int64_t n_in, void *out)
{
    switch (kn_pack_type(type)) {
    case KN_Q8_0_X16: x16_pack(KN_Q8_0, w, w_row_bytes, n_out, n_in, out); break;
    case KN_Q4_K_X16: x16_pack(KN_Q4_K, w, w_row_bytes, n_out, n_in, out); break;
    case KN_Q6_K_X16: x16_pack(KN_Q6_K, w, w_row_bytes, n_out, n_in, out); break;
    default: memcpy(out, w, (size_t)n_out * w_row_bytes);
    }
}

void kn_get_row(int type, const void *w, size_t w_row_bytes, int64_t i, float *out, int64_t n)
{
    int src = kn_unpacked(type), l = (int)(i % KN_PACK_ROWS);
    if (src == type) {
        kn_dequant_row(type, (const uint8_t *)w + (size_t)i * w_row_bytes, out, n);
        return;
    }
    x16_field f[X16_MAX_FIELDS];
    int nf = x16_fields(src, f);
    size_t bb = kn_block_bytes(src);
    int64_t be = kn_block_elems(src);
    const uint8_t *g = (const uint8_t *)w + (size_t)(i - l) * w_row_bytes;
    uint8_t form[KN_Q6_K_BYTES], blk[KN_Q6_K_BYTES];
    for (int64_t b = 0; b < n / be; b++, g += KN_PACK_ROWS * bb) {
        for (int k = 0; k < nf; k++) memcpy(form + f[k].src, g + f[k].dst + f[k].size * l, (size_t)f[k].size);
        x16_form(src, form, blk, 0);
        kn_dequant_row(src, blk, out + b * be, be);
    }
}

/* ==== Activation preparation ==== */

size_t kn_act_row_bytes(int wtype, int64_t n)
{
    size_t bytes = kn_is_float(wtype) ? (size_t)n * 4
                 : kn_is_kquant(wtype) ? (size_t)n + (size_t)(n / KN_QKK) * 4 + (size_t)(n / 16) * 2
                 : (size_t)n + (size_t)(n / KN_QK) * 8;
    return (bytes + KN_ACT_ALIGN - 1) / KN_ACT_ALIGN * KN_ACT_ALIGN;
}

/* Round half away from zero without libm, so this stays a tight loop. */
static inline int kn_round(float v) { return (int)(v + (v < 0 ? -0.5f : 0.5f)); }

KN_VECTORIZE void kn_ref_act_prepare(int wtype, const float *x, int64_t n, void *out)
{
    if (kn_is_float(wtype)) {
        memcpy(out, x, (size_t)n * 4);
        return;
    }
    int64_t bs = kn_act_block(wtype);
    int8_t *q = out;
    float *d = (float *)(q + n);
    for (int64_t b = 0; b < n / bs; b++) {
        const float *xb = x + b * bs;
        /* the largest |x| as the largest bit pattern with the sign cleared
         * (same order for floats >= 0): GCC vectorises an integer max, not
         * a float one (nor fmaxf, which it calls libm for, per element) */
        uint32_t amax_bits = 0;
        for (int64_t j = 0; j < bs; j++) {
            uint32_t u;
            memcpy(&u, xb + j, 4);
            u &= 0x7fffffffu;
            amax_bits = u > amax_bits ? u : amax_bits;
        }
        float amax = kn_bits_f32(amax_bits);
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int64_t j = 0; j < bs; j++) {
            q[b * bs + j] = (int8_t)kn_round(xb[j] * id);
            sum += q[b * bs + j];
        }
        d[b] = amax / 127.0f;
        if (bs == KN_QK) d[n / KN_QK + b] = d[b] * (float)sum;
    }
    if (bs == KN_QKK) {
        int16_t *bsum = (int16_t *)(d + n / KN_QKK);
        for (int64_t g = 0; g < n / 16; g++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += q[16 * g + j];
            bsum[g] = (int16_t)s;
        }
    }
}

/* The AVX-512 build quantises 32-element blocks with vector code that
 * writes these same bytes (tests/test_kernels.c checks it); every other
 * build uses this one. */
#ifndef KN_ISA_AVX512
void kn_act_prepare(int wtype, const float *x, int64_t n, void *out) { kn_ref_act_prepare(wtype, x, n, out); }
#endif

/* ==== Portable vector ops ==== */

/* Eight interleaved partial sums: the compiler can vectorise this without
 * reassociating, and the summation order is fixed by the code alone. */
#define KN_LANES 8

static inline float kn_lanes_sum(const float s[KN_LANES])
{
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

float kn_sc_dot(const float *a, const float *b, int64_t n)
{
    float s[KN_LANES] = {0};
    int64_t i = 0;
    for (; i + KN_LANES <= n; i += KN_LANES)
        for (int l = 0; l < KN_LANES; l++) s[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s[0] += a[i] * b[i];
    return kn_lanes_sum(s);
}

/* The same, against int8 activations. */
static float sc_dot_q8(const float *a, const int8_t *q, int64_t n)
{
    float s[KN_LANES] = {0};
    for (int64_t i = 0; i < n; i += KN_LANES)
        for (int l = 0; l < KN_LANES; l++) s[l] += a[i + l] * (float)q[i + l];
    return kn_lanes_sum(s);
}

void kn_sc_axpy(float *y, float a, const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void kn_sc_scale(float *y, float a, int64_t n)
{
    for (int64_t i = 0; i < n; i++) y[i] *= a;
}

void kn_sc_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps)
{
    float r = 1.0f / sqrtf(kn_sc_dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w ? x[i] * r * w[i] : x[i] * r;
}

void kn_sc_swiglu(float *out, const float *gate, const float *up, int64_t n)
{
    for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * (up ? up[i] : 1.0f);
}

int64_t kn_sc_argmax(const float *v, int64_t n)
{
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Portable in every build: the taps' layout lets the compiler vectorise it. */
KN_VECTORIZE void kn_causal_conv(float *restrict out, const float *restrict win, const float *restrict taps, int K, int64_t C)
{
    for (int64_t c = 0; c < C; c++) out[c] = taps[c] * win[c];
    for (int t = 1; t < K; t++)
        for (int64_t c = 0; c < C; c++) out[c] += taps[t * C + c] * win[t * C + c];
}

/* Delta step in two passes over S instead of three: with kS = k^T S and
 * qS = q^T S taken from the old state,
 *   kv = decay*kS,  d = beta*(v - kv),  out = decay*qS + (q.k) d,
 * and the state update S_out = decay*S_in + k d^T is the only pass that
 * writes.  Columns are independent, so S is walked in strips of columns small
 * enough for kS, qS and d to stay in registers (or L1) across the rows; a
 * strip's update reads only the cells it writes, so S_out may be S_in. */
#define KN_DELTA_COLS 64

void kn_sc_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                      float decay, float beta, float *out, int dk, int dv)
{
    float qk = kn_sc_dot(q, k, dk);
    for (int c0 = 0; c0 < dv; c0 += KN_DELTA_COLS) {
        int nc = dv - c0 < KN_DELTA_COLS ? dv - c0 : KN_DELTA_COLS;
        float ks[KN_DELTA_COLS] = {0}, qs[KN_DELTA_COLS] = {0}, d[KN_DELTA_COLS];
        for (int j = 0; j < dk; j++) {
            const float *row = S_in + (size_t)j * dv + c0;
            for (int c = 0; c < nc; c++) {
                ks[c] += k[j] * row[c];
                qs[c] += q[j] * row[c];
            }
        }
        for (int c = 0; c < nc; c++) {
            d[c] = beta * (v[c0 + c] - decay * ks[c]);
            out[c0 + c] = decay * qs[c] + qk * d[c];
        }
        for (int j = 0; j < dk; j++) {
            const float *row = S_in + (size_t)j * dv + c0;
            float *dst = S_out + (size_t)j * dv + c0;
            for (int c = 0; c < nc; c++) dst[c] = decay * row[c] + k[j] * d[c];
        }
    }
}

/* The per-key form: one dot per score, one axpy per value row into out,
 * which stays in L1 however long the cache is.  Normalising once at the end
 * saves a division per key.  Queries one after another: the portable build
 * does not share the cache's reads between them. */
static void sc_attn_head(const float *q, const float *k, const float *v, int64_t kv_stride, int n_keys, int hd,
                         float scale, float *sc, float *out)
{
    float mx = -INFINITY, sum = 0.0f;
    for (int t = 0; t < n_keys; t++) {
        sc[t] = scale * kn_sc_dot(q, k + (size_t)t * kv_stride, hd);
        mx = fmaxf(mx, sc[t]);
    }
    for (int t = 0; t < n_keys; t++) sum += sc[t] = expf(sc[t] - mx);
    memset(out, 0, (size_t)hd * sizeof *out);
    for (int t = 0; t < n_keys; t++) kn_sc_axpy(out, sc[t], v + (size_t)t * kv_stride, hd);
    kn_sc_scale(out, 1.0f / sum, hd);
}

void kn_sc_attn_heads(int nq, const float *const *q, float *const *out, const int *n_keys, const float *k,
                      const float *v, int64_t kv_stride, int hd, float scale, float *sc, int64_t sc_stride)
{
    for (int i = 0; i < nq; i++) sc_attn_head(q[i], k, v, kv_stride, n_keys[i], hd, scale, sc + i * sc_stride, out[i]);
}

/* ==== Portable matmul ==== */

/* Weights are dequantised in chunks of this many elements: a multiple of
 * every block size, and small enough to stay in L1 across the nr rows. */
#define KN_CHUNK 256

void kn_sc_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
                  const void *act, size_t act_stride, int nr, float *y, int64_t y_stride)
{
    const kn_type_info *t = type_info(wtype);
    int64_t ab = kn_act_block(wtype);
    float wf[KN_CHUNK];
    for (int64_t i = i0; i < i1; i++) {
        const uint8_t *row = (const uint8_t *)w + (size_t)i * w_row_bytes;
        float acc[KN_MAX_ROWS] = {0};
        for (int64_t off = 0; off < n_in; off += KN_CHUNK) {
            int64_t len = n_in - off < KN_CHUNK ? n_in - off : KN_CHUNK;
            t->deq(row + (size_t)(off / t->elems) * t->bytes, wf, len / t->elems);
            for (int r = 0; r < nr; r++) {
                const uint8_t *a = (const uint8_t *)act + (size_t)r * act_stride;
                if (kn_is_float(wtype)) {
                    acc[r] += kn_sc_dot(wf, (const float *)a + off, len);
                    continue;
                }
                const float *d = kn_act_d(a, n_in);
                for (int64_t b = off; b < off + len; b += ab)
                    acc[r] += d[b / ab] * sc_dot_q8(wf + (b - off), (const int8_t *)a + b, ab);
            }
        }
        for (int r = 0; r < nr; r++) y[(size_t)r * y_stride + i] = acc[r];
    }
}

/* ==== References for the tests ==== */

void kn_ref_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
                   const float *x, int64_t x_stride, int nr, float *y, int64_t y_stride)
{
    float *wf = malloc((size_t)n_in * sizeof *wf);
    for (int64_t i = i0; i < i1; i++) {
        kn_get_row(wtype, w, w_row_bytes, i, wf, n_in);
        for (int r = 0; r < nr; r++) {
            double s = 0.0;
            for (int64_t j = 0; j < n_in; j++) s += (double)wf[j] * x[(size_t)r * x_stride + j];
            y[(size_t)r * y_stride + i] = (float)s;
        }
    }
    free(wf);
}

/* The recurrence exactly as written, one column at a time, in double. */
void kn_ref_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                       float decay, float beta, float *out, int dk, int dv)
{
    for (int c = 0; c < dv; c++) {
        double kv = 0.0, o = 0.0;
        for (int j = 0; j < dk; j++) {
            S_out[(size_t)j * dv + c] = S_in[(size_t)j * dv + c] * decay;
            kv += (double)k[j] * S_out[(size_t)j * dv + c];
        }
        double d = beta * (v[c] - kv);
        for (int j = 0; j < dk; j++) {
            S_out[(size_t)j * dv + c] = (float)(S_out[(size_t)j * dv + c] + k[j] * d);
            o += (double)q[j] * S_out[(size_t)j * dv + c];
        }
        out[c] = (float)o;
    }
}

/* Softmax attention as defined, in double; the max is subtracted only to
 * keep exp in range. */
void kn_ref_attn_head(const float *q, const float *k, const float *v, int64_t kv_stride, int n_keys, int hd,
                      float scale, float *out)
{
    double *p = malloc((size_t)n_keys * sizeof *p);
    double mx = -INFINITY, sum = 0.0;
    for (int t = 0; t < n_keys; t++) {
        double s = 0.0;
        for (int j = 0; j < hd; j++) s += (double)q[j] * k[(size_t)t * kv_stride + j];
        p[t] = scale * s;
        mx = fmax(mx, p[t]);
    }
    for (int t = 0; t < n_keys; t++) sum += p[t] = exp(p[t] - mx);
    for (int j = 0; j < hd; j++) {
        double o = 0.0;
        for (int t = 0; t < n_keys; t++) o += p[t] * v[(size_t)t * kv_stride + j];
        out[j] = (float)(o / sum);
    }
    free(p);
}

/* ==== Build identity and CPU check ==== */

const char *kn_isa(void)
{
#if defined(KN_ISA_AVX512)
    return "avx512";
#elif defined(KN_ISA_AVX2)
    return "avx2";
#elif defined(KN_ISA_NEON)
    return "neon";
#else
    return "scalar";
#endif
}

static inline int kn_missing(char *why, size_t n, const char *feature)
{
    if (why && n) snprintf(why, n, "this binary was built for %s but this CPU lacks %s; rebuild it "
                           "here with 'make' (or 'make ARCH=scalar')", kn_isa(), feature);
    return 0;
}

/* Only a guard, not a guarantee: -march lets the compiler use the target's
 * instructions anywhere, including code that runs before main calls this
 * (startup code, main's own prologue).  In practice compilers emit the wide
 * instructions only in vectorised loops, so as long as main calls this
 * first, a binary built for a bigger CPU gets this message, not SIGILL.
 * The x86 version is compiled for the baseline ISA so it cannot trip over
 * what it checks. */
#if defined(__x86_64__)
#define KN_NEED(feat) \
    if (!__builtin_cpu_supports(feat)) return kn_missing(why, n, feat)

__attribute__((target("arch=x86-64")))
int kn_cpu_ok(char *why, size_t n)
{
    __builtin_cpu_init();
#ifdef __AVX__
    KN_NEED("avx");
#endif
#ifdef __AVX2__
    KN_NEED("avx2");
#endif
#ifdef __FMA__
    KN_NEED("fma");
#endif
#ifdef __F16C__
    unsigned eax, ebx, ecx, edx;           /* clang's builtin does not know f16c */
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_F16C)) return kn_missing(why, n, "f16c");
#endif
#ifdef __BMI2__
    KN_NEED("bmi2");
#endif
#ifdef __AVX512F__
    KN_NEED("avx512f");
#endif
#ifdef __AVX512BW__
    KN_NEED("avx512bw");
#endif
#ifdef __AVX512VL__
    KN_NEED("avx512vl");
#endif
#ifdef __AVX512DQ__
    KN_NEED("avx512dq");
#endif
#ifdef __AVX512VNNI__
    KN_NEED("avx512vnni");
#endif
#ifdef __AVX512VBMI__
    KN_NEED("avx512vbmi");
#endif
    return 1;
}
#elif defined(__aarch64__) && defined(__linux__)
/* Linux hwcap bits (asm/hwcap.h), spelled out to keep the header list short. */
#define KN_HWCAP_ASIMDHP (1ul << 10)
#define KN_HWCAP_ASIMDDP (1ul << 20)

int kn_cpu_ok(char *why, size_t n)
{
    unsigned long hw = getauxval(AT_HWCAP);
    (void)hw;
#ifdef __ARM_FEATURE_DOTPROD
    if (!(hw & KN_HWCAP_ASIMDDP)) return kn_missing(why, n, "the dot-product extension (asimddp)");
#endif
#ifdef __ARM_FEATURE_FP16_VECTOR_ARITHMETIC
    if (!(hw & KN_HWCAP_ASIMDHP)) return kn_missing(why, n, "half-precision arithmetic (asimdhp)");
#endif
    return 1;
}
#else
int kn_cpu_ok(char *why, size_t n)
{
    (void)why, (void)n;
    return 1;
}
#endif

/* ==== Public entry points of the portable build ==== */

#ifdef KN_ISA_SCALAR
void kn_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
               const void *act, size_t act_stride, int nr, float *y, int64_t y_stride)
{
    kn_sc_matmul(wtype, w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
}

float kn_dot(const float *a, const float *b, int64_t n) { return kn_sc_dot(a, b, n); }
void  kn_axpy(float *y, float a, const float *x, int64_t n) { kn_sc_axpy(y, a, x, n); }
void  kn_scale(float *y, float a, int64_t n) { kn_sc_scale(y, a, n); }
void  kn_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) { kn_sc_rmsnorm(out, x, w, n, eps); }
void  kn_swiglu(float *out, const float *gate, const float *up, int64_t n) { kn_sc_swiglu(out, gate, up, n); }
int64_t kn_argmax(const float *v, int64_t n) { return kn_sc_argmax(v, n); }

void kn_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                   float decay, float beta, float *out, int dk, int dv)
{
    kn_sc_delta_step(S_in, S_out, q, k, v, decay, beta, out, dk, dv);
}

void kn_attn_heads(int nq, const float *const *q, float *const *out, const int *n_keys, const float *k,
                   const float *v, int64_t kv_stride, int hd, float scale, float *sc, int64_t sc_stride)
{
    kn_sc_attn_heads(nq, q, out, n_keys, k, v, kv_stride, hd, scale, sc, sc_stride);
}
#endif
