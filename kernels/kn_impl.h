/* kn_impl.h - what the kernel files share and the model code never sees.
 *
 * What lives here is written exactly once:
 *   - which instruction set this build's kernels target (KN_ISA_*), decided
 *     from the compiler's target macros, so every kernel file agrees;
 *   - the ggml block layouts and the half/bfloat conversions;
 *   - the layout of prepared activation rows, which kn_ref_act_prepare in
 *     scalar.c defines (kn_act_prepare writes the same bytes in every build)
 *     and every matmul kernel reads;
 *   - the multi-row scaffolding the SIMD matmuls are instantiated with.
 */
#ifndef KN_IMPL_H
#define KN_IMPL_H

#include <stdint.h>
#include <string.h>
#include "kernels.h"

/* ==== Instruction set of this build ==== */

#if defined(KN_FORCE_SCALAR)
#  define KN_ISA_SCALAR 1
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
      defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#  define KN_ISA_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#  define KN_ISA_AVX2 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#  define KN_ISA_NEON 1
#else
#  define KN_ISA_SCALAR 1
#endif

/* The AVX-512 kernels reuse the AVX2 ones for the formats they do not widen. */
#if defined(KN_ISA_AVX512) || defined(KN_ISA_AVX2)
#  define KN_BUILD_AVX2 1
#endif

#define KN_INLINE static inline __attribute__((always_inline))

/* GCC at -O2 vectorises only loops that need no epilogue or runtime checks;
 * hot portable loops ask for its full vectoriser (clang's -O2 has it). */
#if defined(__GNUC__) && !defined(__clang__)
#define KN_VECTORIZE __attribute__((optimize("O3")))
#else
#define KN_VECTORIZE
#endif

/* ==== Half and bfloat ==== */

static inline float kn_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half to float, exact, without relying on hardware or _Float16. */
static inline float kn_f16_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff;
    if (e == 31) return kn_bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) {                         /* zero or subnormal: m * 2^-24 */
        float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return kn_bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

static inline float kn_bf16_f32(uint16_t h) { return kn_bits_f32((uint32_t)h << 16); }

static inline uint16_t kn_rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t kn_rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* ==== ggml block layouts ====
 * Blocks are packed and unaligned; d, m, dmin are IEEE halves.  The field
 * order is given beside each size; offsets are spelled out where used. */

#define KN_QK     32      /* legacy block */
#define KN_QKK    256     /* K-quant super-block */

#define KN_Q4_0_BYTES 18  /* d | qs[16]: lo nibbles elems 0..15, hi 16..31, q-8 */
#define KN_Q4_1_BYTES 20  /* d | m | qs[16]: q*d + m */
#define KN_Q5_0_BYTES 22  /* d | qh[4] | qs[16]: bit j of qh is bit 4 of elem j, q-16 */
#define KN_Q5_1_BYTES 24  /* d | m | qh[4] | qs[16] */
#define KN_Q8_0_BYTES 34  /* d | int8 qs[32] */
#define KN_Q4_K_BYTES 144 /* d | dmin | scales[12] | qs[128] */
#define KN_Q5_K_BYTES 176 /* d | dmin | scales[12] | qh[32] | qs[128] */
#define KN_Q6_K_BYTES 210 /* ql[128] | qh[64] | int8 scales[16] | d */

/* The 12 scale bytes of q4_K/q5_K hold eight 6-bit scales and eight 6-bit
 * mins: bytes 0-3 and 4-7 carry scales/mins 0-3 in their low six bits and
 * the top two bits of scales/mins 4-7; bytes 8-11 carry the low four bits
 * of scales 4-7 (low nibble) and mins 4-7 (high nibble). */
static inline void kn_k4_scales(const uint8_t *s12, uint8_t sc[8], uint8_t mn[8])
{
    uint32_t a = kn_rd32(s12), b = kn_rd32(s12 + 4), c = kn_rd32(s12 + 8);
    uint32_t w[4] = {
        a & 0x3f3f3f3fu,
        (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u),
        b & 0x3f3f3f3fu,
        ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u),
    };
    memcpy(sc, w, 8);
    memcpy(mn, w + 2, 8);
}

/* KN_Q8_0_X16 (kernels.h, packed weights): per group of 16 rows, per
 * 32-element block, KN_X16_BLOCK bytes:
 *   f16 d[16] (row l's block scale) | 8 chunks of 64 bytes: bytes 4l..4l+3 of
 *   chunk k are elements 4k..4k+3 of row l, plus KN_X16_Q8_0_BIAS.
 * The VNNI build stores them + 128, unsigned, so that vpdpbusd can take
 * the weights as its unsigned operand and the int8 activations as the
 * signed one; the activation block sums (s below) take the 128 back out.
 * The AVX2 build packs them as they are: its vpmaddubsw would saturate on
 * the unsigned form, so it goes by |w| and sign(x, w) and would only have
 * to undo the bias.  The layout exists only in memory, so each build has
 * the encoding its kernels read fastest.  Padding rows have d = 0 and
 * weights 0. */
#if defined(KN_ISA_AVX512) && defined(__AVX512VNNI__)
#  define KN_X16_Q8_0_BIAS 128
#else
#  define KN_X16_Q8_0_BIAS 0
#endif
#define KN_X16_BLOCK (2 * KN_PACK_ROWS + KN_PACK_ROWS * KN_QK)   /* = 16 * KN_Q8_0_BYTES */

/* KN_Q4_K_X16: per group of 16 rows, per super-block, KN_Q4_K_X16_BLOCK
 * bytes, each field of the q4_K block side by side for the 16 rows:
 *   f16 d[16] | f16 dmin[16] | 35 chunks of 64 bytes: bytes 4l..4l+3 of
 *   chunk k are bytes 4+4k..7+4k of row l's block, so chunks 0-2 are the
 *   scale words and chunk 3+8g+m holds elements 64g+4m..64g+4m+3 of row l
 *   in its low nibbles and the 32 elements after them in its high nibbles.
 * The scale words unpack for all 16 rows with kn_k4_scales's word
 * operations, one vector each.  Padding rows are zero. */
#define KN_Q4_K_X16_BLOCK (KN_PACK_ROWS * KN_Q4_K_BYTES)
#define KN_Q4_K_X16_SCALES (4 * KN_PACK_ROWS)                    /* offset of the scale chunks */
#define KN_Q4_K_X16_QS (KN_Q4_K_X16_SCALES + 3 * 4 * KN_PACK_ROWS)  /* offset of the nibble chunks */

/* KN_Q6_K_X16: per group of 16 rows, per super-block, KN_Q6_K_X16_BLOCK
 * bytes:
 *   f16 d[16] | int8 scales[16][16] (sub-block s of row l at 16s+l) |
 *   per 16-element sub-block s, chunks X, Y, Z of 64 bytes: byte 4l+e of X,
 *   Y, Z holds element 16s+e, 16s+4+e, 16s+8+e of row l in its low six bits
 *   (q6_K's q, 0..63, before the -32) and bits 0-1, 2-3, 4-5 of element
 *   16s+12+e in its top two.
 * Three bytes for four six-bit weights is what keeps the source's size;
 * the first three come out with one AND each, the fourth with three shifts,
 * two bit selects and an AND, instead of combining a nibble and a bit pair
 * for every weight.  Padding rows are zero. */
#define KN_Q6_K_X16_BLOCK (KN_PACK_ROWS * KN_Q6_K_BYTES)
#define KN_Q6_K_X16_SCALES (2 * KN_PACK_ROWS)
#define KN_Q6_K_X16_Q (KN_Q6_K_X16_SCALES + 16 * KN_PACK_ROWS)

/* The format a packed type was made from (0x100 less); any other type is
 * its own.  The model prepares activations for the type it multiplies by,
 * packed or not, so whatever depends on the format asks this first. */
static inline int kn_unpacked(int t)
{
    return t == KN_Q8_0_X16 || t == KN_Q4_K_X16 || t == KN_Q6_K_X16 ? t - 0x100 : t;
}

static inline int kn_is_kquant(int t)
{
    t = kn_unpacked(t);
    return t == KN_Q4_K || t == KN_Q5_K || t == KN_Q6_K;
}
static inline int kn_is_float(int t) { return t == KN_F32 || t == KN_F16 || t == KN_BF16; }

/* ==== Prepared activation rows ====
 * Float weights take the f32 row as is.  Quantised weights take the row
 * quantised symmetrically to int8 in [-127, 127] (never -128, so the AVX2
 * sign trick can negate it) with one f32 scale per activation block:
 *   legacy weights (block 32):  int8 q[n] | f32 d[n/32] | f32 s[n/32]
 *       s = d * sum(q), for the q4_1/q5_1 offset term;
 *   K-quant weights (block 256): int8 q[n] | f32 d[n/256] | i16 bsum[n/16]
 *       bsum = sum of q over each 16 elements, for the mins and q6_K's -32.
 * Activation blocks are exactly as wide as the weight blocks, so every
 * weight block meets exactly one activation scale. */

#define KN_ACT_ALIGN 64

static inline int64_t kn_act_block(int wtype) { return kn_is_kquant(wtype) ? KN_QKK : KN_QK; }
static inline const float *kn_act_d(const void *act, int64_t n)
{
    return (const float *)((const int8_t *)act + n);
}
static inline const float *kn_act_s(const void *act, int64_t n)
{
    return kn_act_d(act, n) + n / KN_QK;
}
static inline const int16_t *kn_act_bsum(const void *act, int64_t n)
{
    return (const int16_t *)(kn_act_d(act, n) + n / KN_QKK);
}

/* ==== Scaffolding for the SIMD matmuls ====
 * Each SIMD file writes one row kernel per format family: one weight row
 * against NR activation rows, NR a compile-time constant.  KN_ROW_FNS
 * instantiates it for NR = 1..8 so per-row accumulators live in registers
 * and every row runs the same instruction sequence whatever nr is (the
 * determinism contract); kn_matmul_rows walks the output rows. */

typedef struct {
    const int8_t *q;           /* quantised: int8 values */
    const float *x, *d, *s;    /* float rows; block scales; legacy block sums */
    const int16_t *bsum;       /* K-quant 16-element sums */
} kn_arow;

typedef void (*kn_row_fn)(const uint8_t *w, int64_t n, const kn_arow *a, float *out);

/* Activation rows a kernel keeps sums for in registers.  Calls with more
 * (up to KN_MAX_ROWS) go in passes of at most this many over each weight
 * row or packed group, whose bytes the second pass finds in L1: a 9-token
 * verify then reads the weights from memory once, in one call per slice. */
#define KN_REG_ROWS 8

#define KN_UNROLL _Pragma("GCC unroll 8")

/* An empty asm that claims to change v.  Integer adds are associative, so
 * GCC rebuilds a running int32 sum as a tree over all its products, which
 * keeps them all live at once and spills them; pinning the running sum
 * after each step keeps the loop as written. */
#if defined(__aarch64__)
#define KN_KEEP(v) __asm__("" : "+w"(v))
#elif defined(KN_EMULATE_AVX512)        /* avx512_emu.h: no register holds 512 bits */
#define KN_KEEP(v) __asm__("" : "+m"(v))
#else
#define KN_KEEP(v) __asm__("" : "+x"(v))
#endif

/* Weights stream through once per token, and the hardware prefetchers
 * leave their loads' latency exposed.  Kernels ask for the lines l1_ahead
 * bytes on into L1 and, where it pays, l2_ahead bytes on into L2 (0: not)
 * as they walk a row or a packed group, at distances measured in each ISA
 * file; each call covers the bytes its caller is about to read, so the
 * prefetches walk the stream without gaps. */
KN_INLINE void kn_prefetch_weights(const uint8_t *p, int bytes, int l1_ahead, int l2_ahead)
{
    KN_UNROLL for (int k = 0; k < bytes; k += 64) {
        __builtin_prefetch(p + l1_ahead + k, 0, 3);
        if (l2_ahead) __builtin_prefetch(p + l2_ahead + k, 0, 2);
    }
}

#define KN_ROW_FN(name, call, nr) \
    static void name##_##nr(const uint8_t *w, int64_t n, const kn_arow *a, float *out) { call; }
#define KN_ROW_FNS(name, kernel, ...)                                                    \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 1), 1)                             \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 2), 2)                             \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 3), 3)                             \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 4), 4)                             \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 5), 5)                             \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 6), 6)                             \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 7), 7)                             \
    KN_ROW_FN(name, kernel(w, n, a, out, __VA_ARGS__ 8), 8)                             \
    static const kn_row_fn name[KN_REG_ROWS] = {name##_1, name##_2, name##_3, name##_4, \
                                                name##_5, name##_6, name##_7, name##_8};

/* Packed matrices (KN_*_X16) go a group of KN_PACK_ROWS rows at a time, so
 * their kernels take the whole slice [i0, i1) (which starts on a group);
 * KN_X16_FNS instantiates them per NR as KN_ROW_FNS does the row kernels,
 * and kn_matmul_x16 calls one. */
typedef void (*kn_x16_fn)(const uint8_t *w, size_t w_row_bytes, int64_t n, int64_t i0, int64_t i1,
                          const kn_arow *a, float *y, int64_t y_stride);

#define KN_X16_FN(name, call, nr)                                                                       \
    static void name##_##nr(const uint8_t *w, size_t rb, int64_t n, int64_t i0, int64_t i1, const kn_arow *a, \
                            float *y, int64_t ys) { call; }
#define KN_X16_FNS(name, kernel, ...)                                                   \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 1), 1)               \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 2), 2)               \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 3), 3)               \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 4), 4)               \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 5), 5)               \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 6), 6)               \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 7), 7)               \
    KN_X16_FN(name, kernel(w, rb, n, i0, i1, a, y, ys, __VA_ARGS__ 8), 8)               \
    static const kn_x16_fn name[KN_REG_ROWS] = {name##_1, name##_2, name##_3, name##_4, \
                                                name##_5, name##_6, name##_7, name##_8};

static inline void kn_act_rows(const void *act, size_t act_stride, int64_t n_in, int nr, kn_arow *a)
{
    for (int r = 0; r < nr; r++) {
        const uint8_t *p = (const uint8_t *)act + (size_t)r * act_stride;
        a[r] = (kn_arow){(const int8_t *)p, (const float *)p, kn_act_d(p, n_in), kn_act_s(p, n_in),
                         kn_act_bsum(p, n_in)};
    }
}

/* Rows in the pass over activation rows [r, nr). */
static inline int kn_pass_rows(int nr, int r) { return nr - r < KN_REG_ROWS ? nr - r : KN_REG_ROWS; }

static inline void kn_matmul_rows(const kn_row_fn *fns, const void *w, size_t w_row_bytes, int64_t n_in,
                                  int64_t i0, int64_t i1, const void *act, size_t act_stride, int nr,
                                  float *y, int64_t y_stride)
{
    kn_arow a[KN_MAX_ROWS];
    kn_act_rows(act, act_stride, n_in, nr, a);
    for (int64_t i = i0; i < i1; i++) {
        float o[KN_MAX_ROWS];
        for (int r = 0; r < nr; r += KN_REG_ROWS)
            fns[kn_pass_rows(nr, r) - 1]((const uint8_t *)w + (size_t)i * w_row_bytes, n_in, a + r, o + r);
        for (int r = 0; r < nr; r++) y[(size_t)r * y_stride + i] = o[r];
    }
}

static inline void kn_matmul_x16(const kn_x16_fn *fns, const void *w, size_t w_row_bytes, int64_t n_in,
                                 int64_t i0, int64_t i1, const void *act, size_t act_stride, int nr,
                                 float *y, int64_t y_stride)
{
    kn_arow a[KN_MAX_ROWS];
    kn_act_rows(act, act_stride, n_in, nr, a);
    /* one pass takes the whole slice; several go group by group, so each
     * group's weights are still in L1 for the next pass */
    int64_t span = nr <= KN_REG_ROWS ? i1 - i0 : KN_PACK_ROWS;
    for (int64_t g = i0; g < i1; g += span) {
        int64_t end = g + span < i1 ? g + span : i1;
        for (int r = 0; r < nr; r += KN_REG_ROWS)
            fns[kn_pass_rows(nr, r) - 1](w, w_row_bytes, n_in, g, end, a + r, y + (size_t)r * y_stride, y_stride);
    }
}

/* ==== Attention ====
 * The SIMD kernels sweep the value rows in blocks of this many keys, the
 * accumulators passing through out between blocks.  128 keys (128 KB of
 * value rows at hd = 256) stay in L2 across the chunks of the head: at 4099
 * keys 5-20% faster than one sweep over all keys, where 32 or 64 keys lost
 * up to 20% with 4 KB row strides. */
#define KN_ATTN_KEYS 128

/* ==== Portable kernels, always compiled (scalar.c) ====
 * The SIMD files fall back to these for anything they do not accelerate. */

void  kn_sc_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
                   const void *act, size_t act_stride, int nr, float *y, int64_t y_stride);
float kn_sc_dot(const float *a, const float *b, int64_t n);
void  kn_sc_axpy(float *y, float a, const float *x, int64_t n);
void  kn_sc_scale(float *y, float a, int64_t n);
void  kn_sc_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
void  kn_sc_swiglu(float *out, const float *gate, const float *up, int64_t n);
int64_t kn_sc_argmax(const float *v, int64_t n);
void  kn_sc_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                       float decay, float beta, float *out, int dk, int dv);
void  kn_sc_attn_heads(int nq, const float *const *q, float *const *out, const int *n_keys, const float *k,
                       const float *v, int64_t kv_stride, int hd, float scale, float *sc, int64_t sc_stride);

/* ==== AVX2 kernels (avx2.c), also the base of the AVX-512 build ==== */
#ifdef KN_BUILD_AVX2
void  kn_avx2_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
                     const void *act, size_t act_stride, int nr, float *y, int64_t y_stride);
float kn_avx2_dot(const float *a, const float *b, int64_t n);
void  kn_avx2_axpy(float *y, float a, const float *x, int64_t n);
void  kn_avx2_scale(float *y, float a, int64_t n);
void  kn_avx2_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
void  kn_avx2_swiglu(float *out, const float *gate, const float *up, int64_t n);
int64_t kn_avx2_argmax(const float *v, int64_t n);
void  kn_avx2_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                         float decay, float beta, float *out, int dk, int dv);
/* kn_attn_heads walks keys in blocks of KN_ATTN_KEYS and asks, per query
 * and block, for two steps that an instruction set provides. */
typedef struct {
    /* sc[t] = scale * q . k_t for t in [t0, t1) (t0 a multiple of 8, keys past
     * n_keys never read); returns the max of those scores */
    float (*scores)(const float *q, const float *k, int64_t kv_stride, int t0, int t1, int n_keys, int hd,
                    float scale, float *sc);
    /* out (first: from 0) += sum over t < n_keys of p[t] v_t, v_t = v + t*kv_stride */
    void (*values)(const float *p, const float *v, int64_t kv_stride, int n_keys, int hd, int first, float *out);
} kn_attn_steps;
extern const kn_attn_steps kn_avx2_attn_steps;
void  kn_avx2_attn_heads(const kn_attn_steps *steps, int nq, const float *const *q, float *const *out,
                         const int *n_keys, const float *k, const float *v, int64_t kv_stride, int hd, float scale,
                         float *sc, int64_t sc_stride);
#endif

#endif
