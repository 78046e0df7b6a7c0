/* kernels.h - the numeric kernels mtp-gen's model code calls.
 *
 * The model never sees intrinsics: it calls these functions, and exactly one
 * implementation of them is compiled in, chosen by the compiler's target
 * macros (kernels/avx512.c, kernels/avx2.c, kernels/neon.c, or the portable
 * kernels/scalar.c).  The scalar file also provides kn_ref_*: the reference
 * every SIMD kernel is tested against (tests/test_kernels.c).
 *
 * Weights are GGUF tensors in ggml's block formats, row-major: a matrix of
 * n_out rows of n_in elements, each row row_bytes long, read straight from
 * the mmapped file.
 *
 * Determinism contract (speculative decoding depends on it): the value
 * computed for output row i and activation row r is bit-identical whatever
 * the number of activation rows nr and whatever slice [i0, i1) it falls in.
 * So verifying K+1 tokens in one call gives exactly the logits of K+1
 * single-token calls, and greedy output with MTP equals output without it.
 */
#ifndef KERNELS_H
#define KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* GGUF / ggml tensor type ids */
enum {
    KN_F32 = 0, KN_F16 = 1, KN_Q4_0 = 2, KN_Q4_1 = 3, KN_Q5_0 = 6, KN_Q5_1 = 7,
    KN_Q8_0 = 8, KN_Q4_K = 12, KN_Q5_K = 13, KN_Q6_K = 14, KN_BF16 = 30,
};

/* Activation rows one kn_matmul call takes; callers split bigger batches.
 * 16 covers a verify of up to 15 drafts in one pass over the weights. */
#define KN_MAX_ROWS 16

/* ---- tensor formats ---- */
int         kn_type_supported(int type);          /* 1 for the types above */
const char *kn_type_name(int type);               /* "q4_K", or "type 23" style for unknown */
int64_t     kn_block_elems(int type);             /* elements per block (1 for float types) */
size_t      kn_block_bytes(int type);             /* bytes per block */
size_t      kn_row_bytes(int type, int64_t n);    /* n must be a multiple of kn_block_elems */
void        kn_dequant_row(int type, const void *row, float *out, int64_t n);

/* ---- matrix x activation rows ----
 * Activations are prepared once per matrix product (quantised to 8-bit
 * blocks for quantised weights, kept f32 for float weights) and then shared
 * by every thread's slice of output rows.  wtype is the type kn_matmul
 * gets, packed (below) or not. */
size_t kn_act_row_bytes(int wtype, int64_t n_in);
void   kn_act_prepare(int wtype, const float *x /*[n_in]*/, int64_t n_in, void *out /*[kn_act_row_bytes]*/);

/* y[r*y_stride + i] = W[i] . x[r]  for i in [i0, i1), r in [0, nr), nr <= KN_MAX_ROWS.
 * act: nr prepared rows, act_stride bytes apart. */
void kn_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
               const void *act, size_t act_stride, int nr, float *y, int64_t y_stride);

/* ---- packed weights ----
 * A build may want a format rearranged for its kernels: with AVX-512 VNNI,
 * q8_0, q4_K and q6_K are read as KN_Q8_0_X16, KN_Q4_K_X16 and KN_Q6_K_X16
 * (0x100 plus the source type), sixteen rows interleaved so that one
 * instruction advances sixteen output rows at once (instead of one row and
 * a horizontal sum at the end).  The model packs each matrix once at load
 * time.  A packed matrix has the same bytes per row as its source, so row
 * offsets that are multiples of KN_PACK_ROWS still find their group at
 * row * row_bytes; the last group is padded to KN_PACK_ROWS rows
 * (kn_pack_bytes).  kn_matmul slices of a packed matrix start on a multiple
 * of KN_PACK_ROWS and end on one or at n_out. */
#define KN_PACK_ROWS 16
enum { KN_Q8_0_X16 = 0x108, KN_Q4_K_X16 = 0x10c, KN_Q6_K_X16 = 0x10e };

int    kn_pack_type(int type);                      /* the layout this build wants for type: a packed one, or type */
size_t kn_pack_bytes(int type, int64_t n_out, int64_t n_in);   /* bytes of kn_pack's output */
void   kn_pack(int type, const void *w, size_t w_row_bytes, int64_t n_out, int64_t n_in, void *out);
/* row i of a matrix of any type, packed or not, as n floats */
void   kn_get_row(int type, const void *w, size_t w_row_bytes, int64_t i, float *out, int64_t n);

/* ---- vector ops ---- */
float kn_dot(const float *a, const float *b, int64_t n);
void  kn_axpy(float *y, float a, const float *x, int64_t n);          /* y += a*x */
void  kn_scale(float *y, float a, int64_t n);                          /* y *= a */
void  kn_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps); /* w may be NULL */
void  kn_swiglu(float *out, const float *gate, const float *up, int64_t n);        /* silu(gate)*up; up NULL: silu(gate) */
int64_t kn_argmax(const float *v, int64_t n);   /* first index of the largest of v[0..n), n >= 1, no NaNs */
/* Depthwise causal conv, one token: out[c] = sum_t taps[t*C+c] * win[t*C+c]
 * over the K rows of C channels that end at the token (taps transposed from
 * ggml's [C][K] so that every pass runs over contiguous channels). */
void  kn_causal_conv(float *out, const float *win, const float *taps, int K, int64_t C);

/* One Gated DeltaNet step for one value head, state S[dk][dv] (row j = key dim j):
 *   S = decay*S_in;  kv = k^T S;  S += k (x) beta*(v - kv);  out = q^T S;  S_out = S
 * S_out may be S_in (a decode step) or a separate slot (a speculative token's
 * state, written without first copying the previous one). */
void  kn_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                    float decay, float beta, float *out, int dk, int dv);

/* nq <= KN_ATTN_MAX_Q queries against one head of the cache, query i over
 * its first n_keys[i] >= 1 positions:
 *   sc[t] = scale * q[i] . k_t;  p = softmax(sc);  out[i] = sum_t p[t] v_t
 * k_t = k + t*kv_stride, v_t = v + t*kv_stride (floats), each hd long, so a
 * head of a cache that interleaves several is read in place.  sc is scratch,
 * query i's at sc + i*sc_stride, sc_stride >= n_keys[i].  The queries of a
 * verify batch's tokens and the query heads that share a KV head go in one
 * call, so the cache is read once for all of them; yet each result depends
 * only on its own query and keys, bit for bit: speculative verification must
 * reproduce a plain decode step exactly. */
#define KN_ATTN_MAX_Q 16
void  kn_attn_heads(int nq, const float *const *q, float *const *out, const int *n_keys, const float *k,
                    const float *v, int64_t kv_stride, int hd, float scale, float *sc, int64_t sc_stride);

/* ---- build identity ----
 * kn_isa: "avx512", "avx2", "neon" or "scalar".  kn_cpu_ok: 0 (with a reason
 * in why) if this CPU lacks an instruction set extension the build was
 * compiled for; main must call it before anything else (see scalar.c). */
const char *kn_isa(void);
int         kn_cpu_ok(char *why, size_t n);

/* reference (scalar) versions, always compiled, for the kernel tests; w may be packed */
void  kn_ref_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
                    const float *x, int64_t x_stride, int nr, float *y, int64_t y_stride);
void  kn_ref_act_prepare(int wtype, const float *x, int64_t n_in, void *out);   /* the layout's definition */
void  kn_ref_delta_step(const float *S_in, float *S_out, const float *q, const float *k, const float *v,
                        float decay, float beta, float *out, int dk, int dv);
void  kn_ref_attn_head(const float *q, const float *k, const float *v, int64_t kv_stride, int n_keys, int hd,
                       float scale, float *out);

#endif
