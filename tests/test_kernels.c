/* test_kernels.c - checks the compiled kernels against references, and
 * measures them.
 *
 *   ./test_kernels                 run every check, end with "N passed, N failed"
 *   ./test_kernels --bench [-t T] [TYPE]  weights streamed per second by kn_matmul
 *                                (every format, or only TYPE, e.g. q8_0)
 *
 * Weights are random bytes with sane scale fields, so every bit pattern of
 * every format is exercised.  Each output is compared with kn_ref_matmul
 * (exact dequantisation, f32 activations, double sums) within a tolerance
 * derived from how activations are quantised, not tuned to pass: an int8
 * activation with block scale d = amax/127 is off by at most d/2, so the
 * product may be off by sum |w_j| d_j/2; on top of that, f32 summation is
 * allowed (n/4 + 8) units of roundoff on sum |w_j x_j|, times 16 for the
 * cancellation inside q4_1/q5_1/K-quant min terms.
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "../kernels/kernels.h"

/* ==== Checks and randomness ==== */

static int n_pass, n_fail;

static void report(int ok, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s  ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) n_pass++; else n_fail++;
}

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

static float frand(void) { return (float)(rnd() >> 8) * (2.0f / 16777216.0f) - 1.0f; }

static void *xalloc(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

static const int all_types[] = {KN_F32, KN_F16, KN_BF16, KN_Q8_0, KN_Q4_0, KN_Q4_1, KN_Q5_0,
                                KN_Q5_1, KN_Q4_K, KN_Q5_K, KN_Q6_K};
#define N_TYPES (int)(sizeof all_types / sizeof all_types[0])

static int is_quant(int t) { return t != KN_F32 && t != KN_F16 && t != KN_BF16; }

/* ==== An independent element-by-element reading of the formats ==== */

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return rd16(p) | (uint32_t)rd16(p + 2) << 16; }

static float half(uint16_t h)
{
    int e = h >> 10 & 31, m = h & 1023;
    float v = e ? ldexpf((float)(1024 + m), e - 25) : ldexpf((float)m, -24);
    return h & 0x8000 ? -v : v;
}

static float bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ggml's rule for the 6-bit scale (which=0) or min (which=1) of sub-block j */
static int k4_field(const uint8_t *s, int j, int which)
{
    if (j < 4) return s[j + 4 * which] & 63;
    return which ? (s[j + 4] >> 4) | (s[j] >> 6) << 4 : (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
}

static float elem(int type, const uint8_t *row, int64_t j)
{
    int k = (int)(j % 32), lo = k < 16, kk = k % 16;
    switch (type) {
    case KN_F32: { float f; memcpy(&f, row + 4 * j, 4); return f; }
    case KN_F16: return half(rd16(row + 2 * j));
    case KN_BF16: return bf16(rd16(row + 2 * j));
    case KN_Q8_0: { const uint8_t *b = row + j / 32 * 34; return (int8_t)b[2 + k] * half(rd16(b)); }
    case KN_Q4_0: case KN_Q4_1: case KN_Q5_0: case KN_Q5_1: {
        int has_m = type == KN_Q4_1 || type == KN_Q5_1, has_h = type == KN_Q5_0 || type == KN_Q5_1;
        int bytes = 18 + 2 * has_m + 4 * has_h;
        const uint8_t *b = row + j / 32 * bytes, *qs = b + bytes - 16;
        int q = lo ? qs[kk] & 15 : qs[kk] >> 4;
        if (has_h) q |= (int)(rd32(b + 2 + 2 * has_m) >> k & 1) << 4;
        float d = half(rd16(b));
        return has_m ? q * d + half(rd16(b + 2)) : (q - (has_h ? 16 : 8)) * d;
    }
    case KN_Q4_K: case KN_Q5_K: {
        int bytes = type == KN_Q4_K ? 144 : 176, e = (int)(j % 256), sub = e / 32, l = e % 32;
        const uint8_t *b = row + j / 256 * bytes, *qs = b + bytes - 128;
        int q = sub & 1 ? qs[32 * (sub / 2) + l] >> 4 : qs[32 * (sub / 2) + l] & 15;
        if (type == KN_Q5_K) q += (b[16 + l] >> sub & 1) << 4;
        float d1 = half(rd16(b)) * k4_field(b + 4, sub, 0), m1 = half(rd16(b + 2)) * k4_field(b + 4, sub, 1);
        return d1 * q - m1;
    }
    case KN_Q6_K: {
        int e = (int)(j % 256), h = e / 128, quad = e % 128 / 32, l = e % 32;
        const uint8_t *b = row + j / 256 * 210, *ql = b + 64 * h, *qh = b + 128 + 32 * h;
        int low = ql[l + 32 * (quad & 1)];
        int q = ((quad < 2 ? low & 15 : low >> 4) | (qh[l] >> (2 * quad) & 3) << 4) - 32;
        int sc = ((const int8_t *)b)[192 + 8 * h + l / 16 + 2 * quad];
        return half(rd16(b + 208)) * sc * q;
    }
    }
    return NAN;
}

/* ==== Random weights ==== */

/* A half with random sign and mantissa and an exponent in [e0, e1]. */
static uint16_t rand_half(int e0, int e1, int allow_neg)
{
    int e = e0 + (int)(rnd() % (uint32_t)(e1 - e0 + 1));
    return (uint16_t)((allow_neg ? (rnd() & 1) << 15 : 0) | e << 10 | (rnd() & 1023));
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }

/* Random bytes (or every byte fill, if fill >= 0), then every scale field
 * overwritten with a plausible half: d around 2^-8..2^-5 (quants times d
 * give weights of order 0.01-1), mins of either sign for q4_1/q5_1. */
static void rand_weights(int type, uint8_t *w, int64_t n_out, int64_t n_in, int fill)
{
    size_t rb = kn_row_bytes(type, n_in);
    for (size_t i = 0; i < rb * (size_t)n_out; i++) w[i] = (uint8_t)(fill < 0 ? (int)rnd() : fill);
    int64_t nb = n_out * n_in / kn_block_elems(type);
    size_t bb = kn_block_bytes(type);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *p = w + (size_t)b * bb;
        switch (type) {
        case KN_F32: { float f = frand(); memcpy(p, &f, 4); break; }
        case KN_F16: put16(p, rand_half(11, 16, 1)); break;
        case KN_BF16: put16(p, (uint16_t)((rnd() & 1) << 15 | (123 + rnd() % 5) << 7 | (rnd() & 127))); break;
        case KN_Q8_0: case KN_Q4_0: case KN_Q5_0: put16(p, rand_half(7, 10, 0)); break;
        case KN_Q4_1: case KN_Q5_1: put16(p, rand_half(7, 10, 0)); put16(p + 2, rand_half(7, 13, 1)); break;
        case KN_Q4_K: case KN_Q5_K: put16(p, rand_half(5, 8, 0)); put16(p + 2, rand_half(5, 8, 0)); break;
        case KN_Q6_K: put16(p + 208, rand_half(3, 6, 0)); break;
        }
    }
}

/* Activations of mixed scale: mostly O(1), some blocks tiny, a few outliers,
 * so per-block scaling matters. */
static void rand_acts(float *x, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
        float v = frand() + frand() + frand();
        if (rnd() % 64 == 0) v *= 20.0f;
        x[j] = (j / 32) % 7 == 3 ? v * 1e-3f : v;
    }
}

/* ==== Format checks ==== */

static void test_formats(void)
{
    static const struct { int type; const char *name; int64_t elems; size_t bytes; } want[] = {
        {KN_F32, "f32", 1, 4}, {KN_F16, "f16", 1, 2}, {KN_BF16, "bf16", 1, 2},
        {KN_Q4_0, "q4_0", 32, 18}, {KN_Q4_1, "q4_1", 32, 20}, {KN_Q5_0, "q5_0", 32, 22},
        {KN_Q5_1, "q5_1", 32, 24}, {KN_Q8_0, "q8_0", 32, 34}, {KN_Q4_K, "q4_K", 256, 144},
        {KN_Q5_K, "q5_K", 256, 176}, {KN_Q6_K, "q6_K", 256, 210},
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        ok &= kn_type_supported(want[i].type) && !strcmp(kn_type_name(want[i].type), want[i].name) &&
              kn_block_elems(want[i].type) == want[i].elems && kn_block_bytes(want[i].type) == want[i].bytes &&
              kn_row_bytes(want[i].type, 1024) == (size_t)(1024 / want[i].elems) * want[i].bytes;
    ok &= !kn_type_supported(23) && !strcmp(kn_type_name(23), "type 23");
    report(ok, "type table: names, block sizes, row bytes, unknown types");

    for (int ti = 0; ti < N_TYPES; ti++) {
        int t = all_types[ti];
        int64_t n = 512;
        uint8_t *w = xalloc(kn_row_bytes(t, n) * 4);
        float *y = xalloc(sizeof(float) * (size_t)n);
        rand_weights(t, w, 4, n, -1);
        double worst = 0.0;
        for (int row = 0; row < 4; row++) {
            const uint8_t *wr = w + (size_t)row * kn_row_bytes(t, n);
            kn_dequant_row(t, wr, y, n);
            for (int64_t j = 0; j < n; j++) {
                float e = elem(t, wr, j);
                double err = fabs((double)y[j] - e) / (fabs((double)e) + 1e-3);
                if (!(err <= worst)) worst = isnan(err) ? INFINITY : err;
            }
        }
        report(worst <= 1e-6, "dequant %-5s matches an element-wise decoding (max rel err %.1e)",
               kn_type_name(t), worst);
        free(w), free(y);
    }
}

/* ==== Matmul checks ==== */

typedef struct {
    int type, ptype;         /* the weights' format; the layout kn_matmul gets (kn_pack_type) */
    int64_t n_in, n_out;
    size_t rb, ab;           /* weight row bytes, activation row stride */
    uint8_t *w, *pw, *act;   /* weights; the same packed for kn_matmul (or w) */
    float *x;                /* KN_MAX_ROWS rows of n_in */
} mm_case;

/* fill < 0: random weights and activations.  Otherwise every weight byte
 * is fill (bar the scale halves) and activation row r is the constant
 * +-(r+1), which quantises to +-127 throughout: the largest sums the
 * integer kernels can meet.  packed: the layout this build packs the type
 * into, as the model does when it copies the weights; else the weights as
 * stored, as the model reads them when they stay mapped. */
static void mm_setup(mm_case *c, int type, int64_t n_in, int64_t n_out, int fill, int packed)
{
    c->type = type, c->ptype = packed ? kn_pack_type(type) : type, c->n_in = n_in, c->n_out = n_out;
    c->rb = kn_row_bytes(type, n_in);
    c->ab = kn_act_row_bytes(c->ptype, n_in) + 64;  /* a stride bigger than needed */
    c->w = xalloc(c->rb * (size_t)n_out);
    c->act = xalloc(c->ab * KN_MAX_ROWS);
    c->x = xalloc(sizeof(float) * (size_t)(n_in * KN_MAX_ROWS));
    rand_weights(type, c->w, n_out, n_in, fill);
    c->pw = xalloc(kn_pack_bytes(type, n_out, n_in));
    if (c->ptype != type) kn_pack(type, c->w, c->rb, n_out, n_in, c->pw);
    else memcpy(c->pw, c->w, c->rb * (size_t)n_out);
    for (int r = 0; r < KN_MAX_ROWS; r++) {
        float *x = c->x + r * n_in;
        rand_acts(x, n_in);
        if (fill >= 0)
            for (int64_t j = 0; j < n_in; j++) x[j] = (float)(r & 1 ? -(r + 1) : r + 1);
        else if (r == 5)
            memset(x, 0, sizeof(float) * (size_t)n_in);   /* all-zero row */
        kn_act_prepare(c->ptype, x, n_in, c->act + r * c->ab);   /* as the model does, for the packed type */
    }
}

static void mm_free(mm_case *c) { free(c->w), free(c->pw), free(c->act), free(c->x); }

/* kn_matmul for act rows [r0, r0+nr) over [i0, i1), into y (n_out per row). */
static void mm_run(const mm_case *c, int r0, int nr, int64_t i0, int64_t i1, float *y)
{
    kn_matmul(c->ptype, c->pw, c->rb, c->n_in, i0, i1, c->act + (size_t)r0 * c->ab, c->ab, nr,
              y + (size_t)r0 * c->n_out, c->n_out);
}

/* Worst error / tolerance ratio over all outputs; > 1 fails. */
static double mm_accuracy(const mm_case *c, const float *y, double *rel_rms)
{
    int64_t n = c->n_in, bs = is_quant(c->type) ? kn_block_elems(c->type) : 0;
    float *wf = xalloc(sizeof(float) * (size_t)n), *yref = xalloc(sizeof(float) * (size_t)(c->n_out * KN_MAX_ROWS));
    kn_ref_matmul(c->type, c->w, c->rb, n, 0, c->n_out, c->x, n, KN_MAX_ROWS, yref, c->n_out);
    double worst = 0.0, se = 0.0, sr = 0.0;
    for (int64_t i = 0; i < c->n_out; i++) {
        kn_dequant_row(c->type, c->w + (size_t)i * c->rb, wf, n);
        for (int r = 0; r < KN_MAX_ROWS; r++) {
            const float *x = c->x + r * n;
            double qb = 0.0, mag = 0.0, e = 0.0;
            for (int64_t j = 0; j < n; j++) {
                if (bs && j % bs == 0) {
                    float amax = 0.0f;
                    int flat = 1;      /* all of magnitude amax: quantised exactly, to +-127 */
                    for (int64_t k = j; k < j + bs; k++) amax = fmaxf(amax, fabsf(x[k]));
                    for (int64_t k = j; k < j + bs; k++) flat &= fabsf(x[k]) == amax;
                    e = flat ? 0.0 : amax / 127.0 / 2.0;
                }
                double ej = bs ? e + 4.0 * 0x1p-24 * fabs(x[j]) : 0.0;
                qb += fabs(wf[j]) * ej;
                mag += fabs(wf[j]) * (fabs(x[j]) + ej);
            }
            double tol = qb * 1.001 + 16.0 * ((double)n / 4 + 8) * 0x1p-24 * mag + 1e-30;
            double got = y[r * c->n_out + i], ref = yref[r * c->n_out + i];
            double ratio = fabs(got - ref) / tol;
            if (!(ratio <= worst)) worst = isnan(ratio) ? INFINITY : ratio;
            se += (got - ref) * (got - ref), sr += ref * ref;
        }
    }
    *rel_rms = sqrt(se / (sr + 1e-300));
    free(wf), free(yref);
    return worst;
}

/* Every (nr, first act row, slicing) must reproduce the nr=8 result bit for bit.
 * Slices of a packed matrix are cut on its row groups, as the model cuts them. */
static int mm_deterministic(const mm_case *c, const float *y8)
{
    size_t ny = (size_t)(c->n_out * KN_MAX_ROWS);
    float *y = xalloc(sizeof(float) * ny);
    int ok = 1;
    int64_t align = c->ptype != c->type ? KN_PACK_ROWS : 1;
    for (int nr = 1; nr <= KN_MAX_ROWS; nr++) {
        int r0 = (int)(rnd() % (uint32_t)(KN_MAX_ROWS - nr + 1));
        memset(y, 0xff, sizeof(float) * ny);
        for (int64_t i0 = 0; i0 < c->n_out;) {       /* ragged slices, as threads would cut them */
            int64_t i1 = i0 + align * (1 + (int64_t)(rnd() % (uint32_t)((c->n_out - i0 + align - 1) / align)));
            if (i1 > c->n_out) i1 = c->n_out;
            mm_run(c, r0, nr, i0, i1, y);
            i0 = i1;
        }
        ok &= !memcmp(y + (size_t)r0 * c->n_out, y8 + (size_t)r0 * c->n_out,
                      sizeof(float) * (size_t)(c->n_out * nr));
    }
    free(y);
    return ok;
}

/* kn_get_row of the packed matrix equals the source row dequantised. */
static int mm_packed_rows(const mm_case *c)
{
    float *a = xalloc(sizeof(float) * (size_t)c->n_in), *b = xalloc(sizeof(float) * (size_t)c->n_in);
    int ok = 1;
    for (int64_t i = 0; i < c->n_out; i++) {
        kn_dequant_row(c->type, c->w + (size_t)i * c->rb, a, c->n_in);
        kn_get_row(c->ptype, c->pw, c->rb, i, b, c->n_in);
        ok &= !memcmp(a, b, sizeof(float) * (size_t)c->n_in);
    }
    free(a), free(b);
    return ok;
}

/* kn_act_prepare against the layout's definition, kn_ref_act_prepare, byte
 * for byte, for every weight format's activation blocks: rows of ordinary
 * values, rows with zero blocks, -0, denormals and huge values, and rows
 * whose scaled values land exactly on .5 (the rounding goes away from 0). */
static void test_act_prepare(void)
{
    static const int types[] = {KN_F32, KN_Q8_0, KN_Q4_0, KN_Q4_K, KN_Q6_K};
    const int64_t n = 1024;
    float *x = xalloc(sizeof(float) * n);
    int same = 1, rows = 0;
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        int t = kn_pack_type(types[ti]);
        size_t bytes = kn_act_row_bytes(t, n);
        uint8_t *a = xalloc(bytes), *b = xalloc(bytes);
        for (int kind = 0; kind < 4; kind++, rows++) {
            for (int64_t i = 0; i < n; i++) {
                float v = frand();
                if (kind == 1) v = i % 96 < 32 ? 0.0f : i % 7 == 0 ? -0.0f : i % 5 == 0 ? 1e-40f * v : v * 1e30f;
                if (kind == 2) v = (float)((int)(frand() * 254) / 2) + (i % 2 ? 0.5f : -0.5f);   /* halves */
                if (kind == 3) v = i % 32 == 0 ? 127.0f : (float)((int)(frand() * 127)) + 0.5f * (float)(i % 3 - 1);
                x[i] = v;
            }
            memset(a, 0xa5, bytes);
            memset(b, 0xa5, bytes);
            kn_act_prepare(t, x, n, a);
            kn_ref_act_prepare(t, x, n, b);
            same &= !memcmp(a, b, bytes);
        }
        free(a), free(b);
    }
    free(x);
    report(same, "kn_act_prepare writes kn_ref_act_prepare's bytes (%d rows over 5 formats, with zeros, -0, denormals, huge values, .5 ties)", rows);
}

/* One weight format in one layout (packed: see mm_setup): accuracy against
 * the reference, bit identity across nr and slices, packed rows reading
 * back, and the integer extremes. */
static void test_matmul_layout(int t, int packed)
{
    static const int64_t n_outs[] = {1, 7, 33, 130};
    int64_t bs = kn_block_elems(t) == 1 ? 8 : kn_block_elems(t);
    int64_t n_ins[] = {bs == 8 ? 7 : bs, 2 * bs, 3 * bs + (bs == 8 ? 5 : 0), 2 * 256 + 3 * bs, 1024};
    char name[32];
    snprintf(name, sizeof name, "%s%s", kn_type_name(t), packed || kn_pack_type(t) == t ? "" : " as stored");
    double worst = 0.0, rms = 0.0;
    int det = 1, cases = 0, packed_rows = 1;
    for (size_t a = 0; a < sizeof n_ins / sizeof n_ins[0]; a++)
        for (size_t b = 0; b < sizeof n_outs / sizeof n_outs[0]; b++) {
            if (n_ins[a] % kn_block_elems(t)) continue;
            mm_case c;
            mm_setup(&c, t, n_ins[a], n_outs[b], -1, packed);
            float *y8 = xalloc(sizeof(float) * (size_t)(c.n_out * KN_MAX_ROWS));
            mm_run(&c, 0, KN_MAX_ROWS, 0, c.n_out, y8);
            double rr, wr = mm_accuracy(&c, y8, &rr);
            if (!(wr <= worst)) worst = wr;
            if (rr > rms) rms = rr;
            det &= mm_deterministic(&c, y8);
            if (c.ptype != c.type) packed_rows &= mm_packed_rows(&c);
            cases++;
            free(y8);
            mm_free(&c);
        }
    report(worst <= 1.0, "matmul %-5s vs reference, %d shapes x 8 rows: worst err/tol %.3f, rel rms err %.1e",
           name, cases, worst, rms);
    report(det, "matmul %-5s bit-identical for nr 1..8 and ragged row slices", name);
    if (packed && kn_pack_type(t) != t)
        report(packed_rows, "matmul %-5s packed as %s: every row reads back exactly", name, kn_type_name(kn_pack_type(t)));
    if (!is_quant(t)) return;
    /* all quants at a bit pattern's extreme (0xff: q4_K/q5_K scales,
     * mins and quants at their maximum, q6_K's q at 63; 0x80: q8_0 at
     * -128) against activations at +-127: overflow or saturation in an
     * integer dot shows here, where random bytes never get near it */
    worst = 0.0;
    for (int fill = 0x80; fill <= 0xff; fill += 0x7f) {
        mm_case c;
        mm_setup(&c, t, 1024, 33, fill, packed);
        float *y8 = xalloc(sizeof(float) * (size_t)(c.n_out * KN_MAX_ROWS));
        mm_run(&c, 0, KN_MAX_ROWS, 0, c.n_out, y8);
        double rr, wr = mm_accuracy(&c, y8, &rr);
        if (!(wr <= worst)) worst = wr;
        free(y8);
        mm_free(&c);
    }
    report(worst <= 1.0, "matmul %-5s all weight bytes 0x80 or 0xff, activations +-127: worst err/tol %.3f", name, worst);
}

/* Formats this build packs are checked in both layouts: the model reads
 * them as stored when it cannot copy the weights (more than half the RAM). */
static void test_matmul(void)
{
    for (int ti = 0; ti < N_TYPES; ti++) {
        test_matmul_layout(all_types[ti], 1);
        if (kn_pack_type(all_types[ti]) != all_types[ti]) test_matmul_layout(all_types[ti], 0);
    }
}

/* ==== Vector op checks ==== */

static const int64_t vec_lens[] = {1, 7, 8, 33, 256, 1000, 4099};
#define N_LENS (int)(sizeof vec_lens / sizeof vec_lens[0])
#define ULP 0x1p-24

static void rand_vec(float *v, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++) v[i] = frand() * scale;
}

static void test_vector_ops(void)
{
    float *a = xalloc(4 * 4100), *b = xalloc(4 * 4100), *y = xalloc(4 * 4100), *y0 = xalloc(4 * 4100);
    double w_dot = 0, w_axpy = 0, w_scale = 0, w_rms = 0, w_swi = 0, w_silu = 0, w_conv = 0;
    int argmax_ok = 1;
    for (int li = 0; li < N_LENS; li++) {
        int64_t n = vec_lens[li];
        rand_vec(a, n, 2.0f), rand_vec(b, n, 3.0f);
        double s = 0, mag = 0;
        for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i], mag += fabs((double)a[i] * b[i]);
        w_dot = fmax(w_dot, fabs(kn_dot(a, b, n) - s) / ((n / 4.0 + 8) * ULP * mag));

        const float ca = 0.37f, cs = -1.7f;
        rand_vec(y0, n, 1.0f);
        memcpy(y, y0, 4 * (size_t)n);
        kn_axpy(y, ca, a, n);
        for (int64_t i = 0; i < n; i++) {
            double ref = y0[i] + (double)ca * a[i];
            w_axpy = fmax(w_axpy, fabs(y[i] - ref) / (2 * ULP * (fabs(y0[i]) + fabs(ca * a[i])) + 1e-30));
        }
        memcpy(y, y0, 4 * (size_t)n);
        kn_scale(y, cs, n);
        for (int64_t i = 0; i < n; i++)
            w_scale = fmax(w_scale, fabs(y[i] - (double)cs * y0[i]) / (ULP * fabs(cs * y0[i]) + 1e-30));

        for (int with_w = 0; with_w < 2; with_w++) {
            double ss = 0;
            for (int64_t i = 0; i < n; i++) ss += (double)a[i] * a[i];
            double r = 1.0 / sqrt(ss / n + 1e-6);
            kn_rmsnorm(y, a, with_w ? b : NULL, n, 1e-6f);
            for (int64_t i = 0; i < n; i++) {
                double ref = a[i] * r * (with_w ? b[i] : 1.0);
                w_rms = fmax(w_rms, fabs(y[i] - ref) / (((n / 4.0 + 16) * ULP) * fabs(ref) + 1e-30));
            }
        }

        rand_vec(a, n, 12.0f);
        static const float extremes[] = {-200.0f, -90.0f, 0.0f, 90.0f, 200.0f};
        for (int64_t i = 0; i < n && i < 5; i++) a[i] = extremes[i];   /* exp overflow and underflow */
        kn_swiglu(y, a, b, n);
        for (int64_t i = 0; i < n; i++) {
            double ref = a[i] / (1.0 + exp(-(double)a[i])) * b[i];
            w_swi = fmax(w_swi, fabs(y[i] - ref) / (8 * ULP * fabs(ref) + 1e-30));
        }
        kn_swiglu(y, a, NULL, n);
        for (int64_t i = 0; i < n; i++) {
            double ref = a[i] / (1.0 + exp(-(double)a[i]));
            w_silu = fmax(w_silu, fabs(y[i] - ref) / (8 * ULP * fabs(ref) + 1e-30));
        }

        for (int64_t at = 0; at < n; at += 1 + at / 3) {   /* the largest at `at`, a tie after it, or all equal */
            rand_vec(y, n, 1.0f);
            y[at] = 2.0f;
            if (at + 5 < n) y[at + 5] = 2.0f;
            argmax_ok &= kn_argmax(y, n) == at;
        }
        for (int64_t i = 0; i < n; i++) y[i] = -3.0f;
        argmax_ok &= kn_argmax(y, n) == 0;

        /* conv over K = 4 rows of n/4 channels: b holds the taps, a the window */
        int64_t C = n / 4;
        kn_causal_conv(y, a, b, 4, C);
        for (int64_t c = 0; c < C; c++) {
            double ref = 0, cmag = 0;
            for (int t = 0; t < 4; t++) ref += (double)b[t * C + c] * a[t * C + c], cmag += fabs((double)b[t * C + c] * a[t * C + c]);
            w_conv = fmax(w_conv, fabs(y[c] - ref) / (4 * ULP * cmag + 1e-30));
        }
    }
    report(w_dot <= 1, "kn_dot vs double, n = 1..4099: worst err/tol %.3f (tol (n/4+8) ulp of sum|ab|)", w_dot);
    report(w_axpy <= 1, "kn_axpy within 2 ulp: worst %.3f", w_axpy);
    report(w_scale <= 1, "kn_scale within 1 ulp: worst %.3f", w_scale);
    report(w_rms <= 1, "kn_rmsnorm (with and without weight) vs double: worst err/tol %.3f", w_rms);
    report(w_swi <= 1, "kn_swiglu vs double within 8 ulp (+1e-30), gates up to +-200: worst %.3f", w_swi);
    report(w_silu <= 1, "kn_swiglu without up (SiLU) vs double within 8 ulp: worst %.3f", w_silu);
    report(argmax_ok, "kn_argmax = the first index of the largest, n = 1..4099, the largest anywhere, ties, all equal");
    report(w_conv <= 1, "kn_causal_conv (K = 4) vs double within 4 ulp of sum|w x|: worst %.3f", w_conv);
    free(a), free(b), free(y), free(y0);
}

/* Several chained steps, as a sequence would run, on normalised q and k;
 * odd steps write a second buffer (a speculative token's slot), which must
 * leave the input state untouched. */
static void test_delta(void)
{
    static const int dims[][2] = {{32, 32}, {128, 128}, {16, 40}, {64, 24}, {64, 64}, {48, 80}};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        int dk = dims[di][0], dv = dims[di][1];
        size_t ns = (size_t)dk * dv;
        float *S = xalloc(4 * ns), *S2 = xalloc(4 * ns), *Sr = xalloc(4 * ns), *Sr2 = xalloc(4 * ns);
        float *Sk = xalloc(4 * ns), *q = xalloc(4 * (size_t)dk), *k = xalloc(4 * (size_t)dk);
        float *v = xalloc(4 * (size_t)dv), *o = xalloc(4 * (size_t)dv), *orf = xalloc(4 * (size_t)dv);
        rand_vec(S, (int64_t)ns, 0.5f);
        memcpy(Sr, S, 4 * ns);
        double worst = 0;
        int input_kept = 1;
        for (int step = 0; step < 6; step++) {
            rand_vec(q, dk, 1.0f), rand_vec(k, dk, 1.0f), rand_vec(v, dv, 1.0f);
            double nq = sqrt(kn_dot(q, q, dk)), nk = sqrt(kn_dot(k, k, dk));
            for (int j = 0; j < dk; j++) q[j] = (float)(q[j] / nq), k[j] = (float)(k[j] / nk);
            float decay = 0.5f + 0.5f * (float)(rnd() % 1000) / 1000, beta = (float)(rnd() % 1000) / 1000;
            float *dst = step & 1 ? S2 : S, *dst_r = step & 1 ? Sr2 : Sr;
            memcpy(Sk, S, 4 * ns);
            kn_delta_step(S, dst, q, k, v, decay, beta, o, dk, dv);
            kn_ref_delta_step(Sr, dst_r, q, k, v, decay, beta, orf, dk, dv);
            if (dst != S) {
                input_kept &= !memcmp(Sk, S, 4 * ns);
                float *t = S; S = S2, S2 = t;
                t = Sr, Sr = Sr2, Sr2 = t;
            }
            double scale = 0;
            for (size_t i = 0; i < ns; i++) scale = fmax(scale, fabs(Sr[i]));
            for (size_t i = 0; i < ns; i++) worst = fmax(worst, fabs(S[i] - Sr[i]) / scale);
            for (int c = 0; c < dv; c++) worst = fmax(worst, fabs(o[c] - orf[c]) / scale);
        }
        report(worst <= 1e-5 && input_kept,
               "kn_delta_step dk=%d dv=%d, 6 steps in place and out of place vs double: worst err %.1e of max|S|%s",
               dk, dv, worst, input_kept ? "" : ", input state modified");
        free(S), free(S2), free(Sr), free(Sr2), free(Sk), free(q), free(k), free(v), free(o), free(orf);
    }
}

/* ==== Attention checks ==== */

/* The accuracy kn_attn_head's exp must have, which the tolerances below
 * assume: libm's expf is within an ulp, the SIMD ones within 1.3 ulp
 * (7.6e-8, measured for avx2.c's); test_attn_exp checks it. */
#define EXP_ERR 2e-7

/* One query through kn_attn_heads. */
static void attn_one(const float *q, const float *k, const float *v, int64_t stride, int n, int hd, float scale,
                     float *sc, float *out)
{
    kn_attn_heads(1, &q, &out, &n, k, v, stride, hd, scale, sc, n);
}

/* Roughly N(0,1): three uniforms on [-1, 1] have variance 1/3 each. */
static float nrand(void) { return frand() + frand() + frand(); }

/* A cache of n positions holding two heads each, kv_stride = 2*hd + 3 apart,
 * the tested head second so that its last row ends the data.  Every other
 * float, and 16 past the end, is NaN: a read outside the head's rows
 * poisons the result.  Returns the buffer; the head starts at + hd + 3. */
static float *attn_cache(int hd, int n)
{
    int64_t stride = 2 * hd + 3;
    size_t len = (size_t)n * stride + 16;
    float *c = xalloc(sizeof(float) * len);
    for (size_t i = 0; i < len; i++) c[i] = NAN;
    for (int t = 0; t < n; t++)
        for (int j = 0; j < hd; j++) c[(size_t)t * stride + hd + 3 + j] = nrand();
    return c;
}

/* Worst |got - ref| / tol over the head's outputs; *err_vmax gets the worst
 * |got - ref| / max|v|.  tol is first order in the unit roundoff u.  With
 * s_t the exact scores, m their max and p_t the exact probabilities, a kernel
 * computes e^(s_t - m) (1 + eta_t) with |eta_t| <= d_t, d_t the sum of
 *   - the dot product's error, (hd/4 + 8) u scale sum_j |q_j k_tj|, the
 *     bound kn_dot is held to;
 *   - the rounding of the scaling and of the subtraction of the max,
 *     u (|s_t| + |s_t - m|) (an error in m shifts every score alike and
 *     cancels in the softmax);
 *   - exp's own, EXP_ERR.
 * Normalising, p_t moves by at most p_t (d_t + A), A = sum_u p_u d_u, so out_j
 * by sum_t p_t d_t |v_tj| + A M_j, M_j = sum_t p_t |v_tj|.  The sum of the
 * exponentials and the weighted sum of value rows are sums of n positive,
 * resp. n terms bounded by sum_t e_t |v_tj|: (n - 1) u each, in whatever
 * order, relative to M_j; the unfused products, 1/sum, the final scaling and
 * the reference's rounding to float take one u each: (2n + 4) u M_j in all.
 * A SIMD exp flushes values under e^-87 < 2e-38 to 0: n 2e-38 max|v| at
 * most.  The factor 1.01 covers the higher-order terms (d_t stays < 0.01). */
static double attn_accuracy(const float *q, const float *k, const float *v, int64_t stride, int n, int hd,
                            float scale, const float *got, double *err_vmax)
{
    double *p = xalloc(sizeof(double) * (size_t)n), *d = xalloc(sizeof(double) * (size_t)n);
    double mx = -INFINITY, sum = 0, a = 0, vmax = 0, worst = 0;
    for (int t = 0; t < n; t++) {
        double st = 0, mag = 0;
        for (int j = 0; j < hd; j++) {
            st += (double)q[j] * k[(size_t)t * stride + j];
            mag += fabs((double)q[j] * k[(size_t)t * stride + j]);
            vmax = fmax(vmax, fabs(v[(size_t)t * stride + j]));
        }
        p[t] = scale * st, d[t] = (hd / 4.0 + 8) * ULP * scale * mag;
        mx = fmax(mx, p[t]);
    }
    for (int t = 0; t < n; t++) {
        d[t] += ULP * (fabs(p[t]) + fabs(p[t] - mx)) + EXP_ERR;
        sum += p[t] = exp(p[t] - mx);
    }
    for (int t = 0; t < n; t++) p[t] /= sum, a += p[t] * d[t];
    float *ref = xalloc(sizeof(float) * (size_t)hd);
    kn_ref_attn_head(q, k, v, stride, n, hd, scale, ref);
    *err_vmax = 0;
    for (int j = 0; j < hd; j++) {
        double m = 0, e = 0;
        for (int t = 0; t < n; t++) {
            double av = fabs(v[(size_t)t * stride + j]);
            m += p[t] * av, e += p[t] * d[t] * av;
        }
        double tol = 1.01 * (e + a * m + (2.0 * n + 4) * ULP * m) + n * 2e-38 * vmax;
        double err = fabs((double)got[j] - ref[j]);
        if (!(err / tol <= worst)) worst = isnan(err) ? INFINITY : err / tol;
        *err_vmax = fmax(*err_vmax, err / vmax);
    }
    free(p), free(d), free(ref);
    return worst;
}

/* Every key count against the reference, with scores of order 1 (a model's
 * usual case) and of order 30 (q scaled up, so most probabilities underflow
 * and the flush to 0 matters).  The head sizes take every chunk width of the
 * SIMD output loops (96 = 64 + 32) and ragged tails (13, 3).  Also: sc and out
 * are not overrun, and the same values in a contiguous cache give the same
 * bits (the result depends on the inputs only, not on where they sit). */
static void test_attn(void)
{
    static const int hds[] = {8, 64, 96, 128, 256, 13, 3}, keys[] = {1, 2, 7, 33, 500, 4099};
    const float guard = 12345.0f;
    for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++) {
        int hd = hds[hi];
        double worst = 0, worst_v = 0;
        int guards_ok = 1, same = 1;
        for (size_t ki = 0; ki < sizeof keys / sizeof keys[0]; ki++)
            for (int spread = 0; spread < 2; spread++) {
                int n = keys[ki];
                int64_t stride = 2 * hd + 3;
                float *kc = attn_cache(hd, n), *vc = attn_cache(hd, n);
                const float *k = kc + hd + 3, *v = vc + hd + 3;
                float *q = xalloc(sizeof(float) * (size_t)(hd + 16)), *sc = xalloc(sizeof(float) * (size_t)(n + 8));
                float *out = xalloc(sizeof(float) * (size_t)(hd + 8)), *out2 = xalloc(sizeof(float) * (size_t)hd);
                for (int j = 0; j < hd + 16; j++) q[j] = j < hd ? nrand() * (spread ? 30.0f : 1.0f) : NAN;
                for (int i = 0; i < 8; i++) sc[n + i] = out[hd + i] = guard;
                float scale = 1.0f / sqrtf((float)hd);
                attn_one(q, k, v, stride, n, hd, scale, sc, out);
                for (int i = 0; i < 8; i++) guards_ok &= sc[n + i] == guard && out[hd + i] == guard;
                double ev, r = attn_accuracy(q, k, v, stride, n, hd, scale, out, &ev);
                if (!(r <= worst)) worst = r;
                worst_v = fmax(worst_v, ev);

                float *k2 = xalloc(sizeof(float) * (size_t)n * hd), *v2 = xalloc(sizeof(float) * (size_t)n * hd);
                for (int t = 0; t < n; t++) {
                    memcpy(k2 + (size_t)t * hd, k + (size_t)t * stride, sizeof(float) * (size_t)hd);
                    memcpy(v2 + (size_t)t * hd, v + (size_t)t * stride, sizeof(float) * (size_t)hd);
                }
                attn_one(q, k2, v2, hd, n, hd, scale, sc, out2);
                same &= !memcmp(out, out2, sizeof(float) * (size_t)hd);
                free(kc), free(vc), free(q), free(sc), free(out), free(out2), free(k2), free(v2);
            }
        report(worst <= 1 && guards_ok && same,
               "kn_attn_heads, one query, hd=%-3d n_keys 1..4099, scores ~1 and ~30: worst err/tol %.3f, err %.1e of max|v|%s%s",
               hd, worst, worst_v, guards_ok ? "" : ", sc or out overrun", same ? "" : ", layout changes the result");
    }
}

/* Up to KN_ATTN_MAX_Q queries in one call, each with its own key count (as
 * the tokens of a verify batch see one more key each, and several query
 * heads share one KV head): every output has the bits of its query alone.
 * Key counts straddle the kernels' 8-key groups and 128-key blocks. */
static void test_attn_multi(void)
{
    static const int hds[] = {64, 256, 13}, bases[] = {1, 6, 120, 127, 500};
    int same = 1, calls = 0;
    for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++)
        for (size_t bi = 0; bi < sizeof bases / sizeof bases[0]; bi++)
            for (int nq = 1; nq <= KN_ATTN_MAX_Q; nq += nq < 4 ? 1 : 4) {
                int hd = hds[hi], most = bases[bi] + nq, n_keys[KN_ATTN_MAX_Q];
                int64_t stride = 2 * hd + 3;
                float *kc = attn_cache(hd, most), *vc = attn_cache(hd, most);
                float *qs = xalloc(sizeof(float) * (size_t)(nq * hd)), *outs = xalloc(sizeof(float) * (size_t)(nq * hd));
                float *one = xalloc(sizeof(float) * (size_t)hd), *sc = xalloc(sizeof(float) * (size_t)(nq * most));
                const float *q[KN_ATTN_MAX_Q];
                float *o[KN_ATTN_MAX_Q];
                for (int i = 0; i < nq * hd; i++) qs[i] = nrand() * (bi & 1 ? 8.0f : 1.0f);
                for (int i = 0; i < nq; i++) {
                    q[i] = qs + i * hd, o[i] = outs + i * hd;
                    n_keys[i] = i % 3 == 2 ? bases[bi] + i / 2 : bases[bi] + 1 + i;   /* some repeat, not sorted */
                }
                kn_attn_heads(nq, q, o, n_keys, kc + hd + 3, vc + hd + 3, stride, hd, 0.125f, sc, most);
                for (int i = 0; i < nq; i++) {
                    attn_one(q[i], kc + hd + 3, vc + hd + 3, stride, n_keys[i], hd, 0.125f, sc, one);
                    same &= !memcmp(one, o[i], sizeof(float) * (size_t)hd);
                }
                calls++;
                free(kc), free(vc), free(qs), free(outs), free(one), free(sc);
            }
    report(same, "kn_attn_heads with 1..%d queries of different key counts: each equals its query alone, bit for bit "
           "(%d calls)", KN_ATTN_MAX_Q, calls);
}

/* Two keys whose scores are 0 and -x, value rows 0 and 1: every output is
 * e^-x / (1 + e^-x) computed from the kernel's exp, so its relative error is
 * exp's (times 1/(1 + e^-x) <= 1) plus the rounding of 1 + e^-x, of its
 * reciprocal and of the product, 3 u.  Past x = 87 a SIMD exp flushes to 0,
 * an absolute error under 2e-38. */
static void test_attn_exp(void)
{
    enum { HD = 8 };
    float q[HD] = {1}, k[2 * HD] = {0}, v[2 * HD] = {0}, sc[2], out[HD];
    for (int j = 0; j < HD; j++) v[HD + j] = 1.0f;
    double worst = 0, rel = 0;
    for (int i = 0; i < 20000; i++) {
        float x = i < 2 ? 87.0f * i : 100.0f * (frand() + 1.0f) / 2.0f;
        k[HD] = -x;
        attn_one(q, k, v, HD, 2, HD, 1.0f, sc, out);
        double ref = exp(-(double)x) / (1.0 + exp(-(double)x));
        for (int j = 0; j < HD; j++) {
            double err = fabs(out[j] - ref), tol = ref * (EXP_ERR + 3 * ULP) + 2e-38;
            if (!(err / tol <= worst)) worst = isnan(err) ? INFINITY : err / tol;
            if (x <= 87.0f) rel = fmax(rel, err / ref);
        }
    }
    report(worst <= 1, "kn_attn_heads' exp, via two scores x apart, x in [0, 100]: max rel err %.1e for x <= 87, "
           "worst err/tol %.3f (tol %.0e + 3 ulp relative, 2e-38 absolute)", rel, worst, EXP_ERR);
}

/* ==== Micro-benchmark ====
 * GB/s of weights streamed by kn_matmul, cold (rotating through enough
 * copies of the matrix to defeat the caches, as decoding does) and hot
 * (one matrix again and again), split over T threads by output rows.
 * Each figure is the best of 7 runs of about 40 ms, which keeps it
 * meaningful on a machine that is busy with other work. */

typedef struct {
    const mm_case *c;
    int copies, nr, iters, tid, nthreads;
    uint8_t *wbase;
    float *y;
    pthread_barrier_t *bar;
} bench_job;

static void *bench_worker(void *p)
{
    bench_job *j = p;
    const mm_case *c = j->c;
    int64_t i0 = c->n_out * j->tid / j->nthreads, i1 = c->n_out * (j->tid + 1) / j->nthreads;
    for (int it = 0; it < j->iters; it++) {
        const uint8_t *w = j->wbase + (size_t)(it % j->copies) * kn_pack_bytes(c->type, c->n_out, c->n_in);
        kn_matmul(c->ptype, w, c->rb, c->n_in, i0, i1, c->act, c->ab, j->nr, j->y, c->n_out);
        if (j->nthreads > 1) pthread_barrier_wait(j->bar);
    }
    return NULL;
}

/* CPU time, not wall time: the figures then hold on a shared, busy machine
 * (each thread is charged only while it runs). */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double bench_run(const mm_case *c, uint8_t *wbase, int copies, int nr, int iters, int nthreads)
{
    pthread_t th[64];
    bench_job jobs[64];
    pthread_barrier_t bar;
    float *y = xalloc(sizeof(float) * (size_t)(c->n_out * KN_MAX_ROWS));
    pthread_barrier_init(&bar, NULL, (unsigned)nthreads);
    double t0 = cpu_now();
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (bench_job){c, copies, nr, iters, t, nthreads, wbase, y, &bar};
        pthread_create(&th[t], NULL, bench_worker, &jobs[t]);
    }
    for (int t = 0; t < nthreads; t++) pthread_join(th[t], NULL);
    double dt = (cpu_now() - t0) / nthreads;
    pthread_barrier_destroy(&bar);
    free(y);
    return (double)c->rb * c->n_out * iters / dt / 1e9;
}

/* The index in all_types of the format named name, or -1. */
static int type_named(const char *name)
{
    for (int ti = 0; ti < N_TYPES; ti++)
        if (!strcmp(name, kn_type_name(all_types[ti]))) return ti;
    return -1;
}

/* Every format, or only all_types[only] when only >= 0. */
static void bench(int nthreads, int only)
{
    static const int64_t shapes[][2] = {{1024, 3584}, {3584, 1024}};   /* n_out x n_in */
    static const int nrs[] = {1, 2, 3, 4, 8, 9, 16};
    printf("kn_matmul weight GB/s, isa %s, %d thread(s); cold = rotating over >= 256 MB, hot = one matrix\n",
           kn_isa(), nthreads);
    printf("%-5s %-10s %-4s", "type", "out x in", "");
    for (size_t k = 0; k < sizeof nrs / sizeof nrs[0]; k++) printf("  nr=%-2d ", nrs[k]);
    printf("\n");
    int first = only < 0 ? 0 : only, end = only < 0 ? N_TYPES : only + 1;
    for (int ti = first; ti < end; ti++)
        for (size_t s = 0; s < 2; s++) {
            mm_case c;
            mm_setup(&c, all_types[ti], shapes[s][1], shapes[s][0], -1, 1);
            size_t mb = kn_pack_bytes(c.type, c.n_out, c.n_in);
            int copies = (int)((256u << 20) / mb + 1);
            uint8_t *wbase = xalloc(mb * (size_t)copies);
            for (int k = 0; k < copies; k++) memcpy(wbase + mb * (size_t)k, c.pw, mb);
            for (int hot = 0; hot < 2; hot++) {
                printf("%-5s %4lldx%-5lld %-4s", kn_type_name(c.type), (long long)c.n_out, (long long)c.n_in,
                       hot ? "hot" : "cold");
                for (size_t k = 0; k < sizeof nrs / sizeof nrs[0]; k++) {
                    int n_copies = hot ? 1 : copies;
                    double gbs = bench_run(&c, wbase, n_copies, nrs[k], 4, nthreads);   /* warm up */
                    int iters = (int)(gbs * 1e9 * 0.04 / (double)mb) + 1;              /* about 40 ms */
                    for (int trial = 0; trial < 7; trial++)
                        gbs = fmax(gbs, bench_run(&c, wbase, n_copies, nrs[k], iters, nthreads));
                    printf(" %7.2f", gbs);
                    fflush(stdout);
                }
                printf("\n");
            }
            free(wbase);
            mm_free(&c);
        }
}

int main(int argc, char **argv)
{
    char why[256];
    if (!kn_cpu_ok(why, sizeof why)) {
        fprintf(stderr, "test_kernels: %s\n", why);
        return 2;
    }
    int do_bench = 0, nthreads = 1;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bench")) do_bench = 1;
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) nthreads = atoi(argv[++i]);
        else if (do_bench && !only && argv[i][0] != '-') only = argv[i];
        else {
            fprintf(stderr, "usage: %s [--bench [-t THREADS] [TYPE]]\n", argv[0]);
            return 2;
        }
    }
    if (nthreads < 1 || nthreads > 64) nthreads = 1;
    if (do_bench) {
        int ti = only ? type_named(only) : -1;
        if (only && ti < 0) {
            fprintf(stderr, "test_kernels: no format named %s\n", only);
            return 2;
        }
        bench(nthreads, ti);
        return 0;
    }
    printf("kernels: %s\n", kn_isa());
    test_formats();
    test_act_prepare();
    test_matmul();
    test_vector_ops();
    test_delta();
    test_attn();
    test_attn_multi();
    test_attn_exp();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail != 0;
}
