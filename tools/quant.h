/* quant.h - the f16/bf16 conversions and the Q4_K/Q5_K quantiser, shared by
 * tools/convert.c (which writes GGUF files with them) and mtp.c (which makes a
 * 4-bit copy of an MTP head's weights to draft from).  Header-only, static
 * inline: each program compiles what it uses. */
#ifndef MTP_QUANT_H
#define MTP_QUANT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ==== Half-precision floats ==== */

static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* Round to nearest even, NaNs forced quiet: the exact rule of llama.cpp's converter. */
static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u = bits_from_f32(f);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)(((u & 0xffff0000u) | 0x00400000u) >> 16);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 0x3ff;
    if (exp == 31) return f32_from_bits(sign | 0x7f800000u | man << 13);
    if (exp == 0) {
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    return f32_from_bits(sign | (exp + 112) << 23 | man << 13);
}

/* Correctly rounded (nearest even), with subnormals, overflow to inf and quiet NaNs. */
static inline uint16_t f32_to_f16(float f)
{
    uint32_t u = bits_from_f32(f), sign = (u >> 16) & 0x8000, a = u & 0x7fffffff;
    if (a > 0x7f800000) return (uint16_t)(sign | 0x7e00 | ((a >> 13) & 0x3ff));
    if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00);   /* rounds past 65504 */
    if (a < 0x38800000) {                                      /* below 2^-14: subnormal */
        float scaled = f32_from_bits(a) * 16777216.0f;         /* exact: units of 2^-24 */
        return (uint16_t)(sign | (uint32_t)nearbyintf(scaled));
    }
    uint32_t half = (a >> 13) - (112 << 10), rest = a & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

static inline void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* ==== Q4_K and Q5_K ==== */

static inline int clamp_int(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Round to nearest, ties to even, for |x| < 2^22: adding 1.5 * 2^23 pushes the fraction out
 * of the mantissa, leaving the integer in its low bits. The k-quant searches round this way. */
static inline int nearest_int(float x)
{
    float v = x + 12582912.0f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x7fffff) - 0x400000;
}

/* Best x ~= scale * q - offset over q in [0, nmax], offset >= 0, minimising the weighted
 * squared error. Candidate scales sweep around range/nmax; each candidate's codes are then
 * refitted by weighted least squares. Candidates quantise relative to the best offset so far,
 * so the sweep explores offsets too (as ggml's does; it lowers the error by about 0.5%).
 * Without search, the range alone: min to max in nmax steps (the draft copy of an MTP
 * head is made at every start, where the sweep would cost ~0.5 s of a 35 ms load, and
 * drafts guessed as well from it). Returns scale and stores offset. */
static inline float fit_affine(const float *x, const float *w, int n, int nmax, int search, float *offset)
{
    float lo = x[0], hi = x[0], sw = 0, sx = 0;
    for (int i = 0; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo;     /* not fminf: a libc call per weight here */
        hi = x[i] > hi ? x[i] : hi;
    }
    if (lo > 0) lo = 0;
    if (hi == lo || !search) {
        *offset = -lo;
        return (hi - lo) / nmax;
    }
    for (int i = 0; i < n; i++) {
        sw += w[i]; sx += w[i] * x[i];
    }
    float best_scale = (hi - lo) / nmax, best_min = lo, best_err = 0;
    for (int i = 0; i < n; i++) {
        float e = best_scale * (float)clamp_int(nearest_int((x[i] - lo) / best_scale), 0, nmax) + lo - x[i];
        best_err += w[i] * e * e;
    }
    int q[32];
    for (int step = 0; step <= 20; step++) {
        float iscale = (nmax - 1.0f + 0.1f * step) / (hi - lo), sq = 0, sqq = 0, sqx = 0;
        for (int i = 0; i < n; i++) {
            q[i] = clamp_int(nearest_int(iscale * (x[i] - lo)), 0, nmax);
            float wq = w[i] * (float)q[i];
            sq += wq; sqq += wq * (float)q[i]; sqx += wq * x[i];
        }
        float det = sw * sqq - sq * sq;
        if (det <= 0) continue;
        float scale = (sw * sqx - sq * sx) / det, min = (sqq * sx - sq * sqx) / det, err = 0;
        if (min > 0) { min = 0; scale = sqx / sqq; }
        for (int i = 0; i < n; i++) {
            float e = scale * (float)q[i] + min - x[i];
            err += w[i] * e * e;
        }
        if (err < best_err) { best_err = err; best_scale = scale; best_min = lo = min; }
    }
    *offset = -best_min;
    return best_scale;
}

/* Six-bit scale and min codes of a Q4_K/Q5_K super-block, packed into 12 bytes. */
static inline void pack_k_scales(const int *ls, const int *lm, uint8_t *q)
{
    for (int j = 0; j < 4; j++) {
        q[j] = (uint8_t)(ls[j] | (ls[j + 4] >> 4) << 6);
        q[j + 4] = (uint8_t)(lm[j] | (lm[j + 4] >> 4) << 6);
        q[j + 8] = (uint8_t)((ls[j + 4] & 15) | (lm[j + 4] & 15) << 4);
    }
}

/* Q4_K and Q5_K: 256 weights in 8 sub-blocks of 32, each x = d*ls*q - dmin*lm, with six-bit
 * ls/lm and super-block d/dmin in f16. Q5_K adds one high bit per weight. */
static inline void quant_k_affine(const float *x, uint8_t *out, int64_t n, int bits, int search)
{
    const int nmax = (1 << bits) - 1;
    const size_t bsize = bits == 4 ? 144 : 176;
    for (int64_t b = 0; b < n / 256; b++, x += 256, out += bsize) {
        float scale[8], offset[8], w[32], max_scale = 0, max_offset = 0;
        for (int j = 0; j < 8; j++) {
            const float *xs = x + 32 * j;
            double ss = 0;
            for (int i = 0; search && i < 32; i++) ss += xs[i] * xs[i];
            float rms = sqrtf((float)(ss / 32));
            for (int i = 0; search && i < 32; i++) w[i] = rms + fabsf(xs[i]);   /* the search's weights */
            scale[j] = fit_affine(xs, w, 32, nmax, search, &offset[j]);
            max_scale = fmaxf(max_scale, scale[j]);
            max_offset = fmaxf(max_offset, offset[j]);
        }
        int ls[8], lm[8];
        float inv_s = max_scale > 0 ? 63 / max_scale : 0, inv_m = max_offset > 0 ? 63 / max_offset : 0;
        for (int j = 0; j < 8; j++) {
            ls[j] = clamp_int(nearest_int(inv_s * scale[j]), 0, 63);
            lm[j] = clamp_int(nearest_int(inv_m * offset[j]), 0, 63);
        }
        uint16_t d16 = f32_to_f16(max_scale / 63), m16 = f32_to_f16(max_offset / 63);
        float d = f16_to_f32(d16), dmin = f16_to_f32(m16);
        put_u16(out, d16);
        put_u16(out + 2, m16);
        pack_k_scales(ls, lm, out + 4);
        uint8_t *qh = bits == 5 ? out + 16 : NULL, *qs = out + (bits == 5 ? 48 : 16);
        if (qh) memset(qh, 0, 32);
        for (int j = 0; j < 8; j++) {
            float step = d * ls[j], min = dmin * lm[j];
            for (int i = 0; i < 32; i++) {
                int q = step > 0 ? clamp_int(nearest_int((x[32 * j + i] + min) / step), 0, nmax) : 0;
                uint8_t *byte = &qs[32 * (j / 2) + i];
                if (j % 2 == 0) *byte = (uint8_t)(q & 15);
                else *byte |= (uint8_t)((q & 15) << 4);
                if (qh) qh[i] |= (uint8_t)((q >> 4) << j);
            }
        }
    }
}

#endif
