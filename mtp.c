/* mtp-gen - Qwen3.5 / Qwen3.6 / Qwen3-Next inference on the CPU, with speculative
 * decoding by the model's own multi-token-prediction (MTP) head.
 *
 * The story of a token, top to bottom:
 *
 *   GGUF file   - mmapped read-only; tensors point straight into the mapping.
 *   Model       - config from the metadata, weights as (type, pointer, shape);
 *                 dense matrices then move to huge pages, in the layout the
 *                 kernels read fastest.
 *   State       - per-sequence KV caches for the full-attention layers, conv
 *                 inputs and recurrent state for the Gated DeltaNet layers,
 *                 kept so that a speculative batch rolls back by moving an
 *                 index, or by a short replay, instead of copying state.
 *   Forward     - the hybrid stack: 3 DeltaNet layers then 1 gated attention
 *                 layer (per the file), SwiGLU FFN, final norm, LM head, over
 *                 a batch of tokens at consecutive positions.
 *   MTP         - the head blk.{n_layer}: draft tokens from the main model's
 *                 last hidden state (with a 4-bit copy of the head's weights
 *                 when the file's are wider), verify them in one batched
 *                 forward call, keep the accepted prefix, roll the state back.
 *   Sampler     - greedy, temperature / top-k / top-p / min-p / repetition
 *                 penalty, and the lossless speculative acceptance rule.
 *   Tokenizer   - byte-level BPE with Qwen's pre-tokenizer and NFC.
 *   CLI         - llama.cpp-like flags; text to stdout, everything else to stderr.
 *
 * Matrix products and the other hot loops live in kernels/ (one file per
 * instruction set behind kernels/kernels.h); this file never sees intrinsics.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "kernels/kernels.h"
#include "tools/quant.h"

/* ==== Utilities ==== */

#ifdef MTP_FUZZ
/* Fuzz builds only (tests/fuzz): a harness points this at its jmp_buf so that
 * the loader's and parse_args' errors come back to it and the next input runs. */
#include <setjmp.h>
static jmp_buf *die_jump;
#endif

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("mtp-gen: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
#ifdef MTP_FUZZ
    if (die_jump) longjmp(*die_jump, 1);
#endif
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes", n);
    return p;
}

static void *xcalloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) die("allocation too large");
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) die("out of memory allocating %zu bytes", count * size);
    return p;
}

/* Zeroed memory starting on a cache line, for the buffers the kernels
 * stream (KV caches, recurrent states, activations): a large calloc block
 * starts 16 bytes into a page, so every 64-byte vector load from it would
 * touch two lines (aligning them took a fifth off the CPU time of a
 * speculative run on the 10 MB model, most of it in attention).
 * The block calloc returned is kept just below the aligned pointer;
 * release with afree. */
static void *acalloc(size_t count, size_t size) {
    if (size && count > (SIZE_MAX - 64 - sizeof(void *)) / size) die("allocation too large");
    char *base = xcalloc(count * size + 64 + sizeof(void *), 1);
    void **p = (void **)(((uintptr_t)base + sizeof(void *) + 63) & ~(uintptr_t)63);
    p[-1] = base;
    return p;
}

static void afree(void *p) {
    if (p) free(((void **)p)[-1]);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

typedef struct { const char *s; uint64_t n; } Str;   /* a string inside the file, not NUL-terminated */

static int str_eq(Str a, const char *b) { return a.n == strlen(b) && memcmp(a.s, b, a.n) == 0; }

/* ==== GGUF file ====
 * GGUF v2/v3: magic, version, tensor count, metadata count, metadata
 * key/value pairs, tensor infos, then aligned tensor data.  Every length and
 * offset is checked against the mapping before use, because the file is
 * untrusted input. */

enum { GG_U8, GG_I8, GG_U16, GG_I16, GG_U32, GG_I32, GG_F32, GG_BOOL, GG_STR, GG_ARR, GG_U64, GG_I64, GG_F64, GG_NTYPES };

typedef struct {
    Str key;
    uint32_t type;
    union {
        uint64_t u; int64_t i; double f; Str str;
        struct { uint32_t type; uint64_t n; const uint8_t *data; } arr;  /* raw elements in the file */
    } v;
} GgufKV;

typedef struct {
    Str name;
    uint32_t n_dims;
    int64_t ne[4];          /* ne[0] is the contiguous dimension */
    uint32_t type;
    uint64_t offset;        /* from the start of the data section */
    const uint8_t *data;
    size_t nbytes;
} GgufTensor;

typedef struct {
    const uint8_t *base;    /* the whole file, mmapped */
    size_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    GgufKV *kv;             /* [n_kv] */
    GgufTensor *tensors;    /* [n_tensors] */
} Gguf;

typedef struct { const uint8_t *p, *end; char *err; size_t errlen; } Cursor;

static int cur_fail(Cursor *c, const char *what) {
    if (!c->err[0]) snprintf(c->err, c->errlen, "truncated or corrupt GGUF (%s)", what);
    return -1;
}

static int cur_take(Cursor *c, size_t n, const uint8_t **out, const char *what) {
    if ((size_t)(c->end - c->p) < n) return cur_fail(c, what);
    *out = c->p;
    c->p += n;
    return 0;
}

static int cur_u32(Cursor *c, uint32_t *v, const char *what) {
    const uint8_t *p;
    if (cur_take(c, 4, &p, what)) return -1;
    memcpy(v, p, 4);
    return 0;
}

static int cur_u64(Cursor *c, uint64_t *v, const char *what) {
    const uint8_t *p;
    if (cur_take(c, 8, &p, what)) return -1;
    memcpy(v, p, 8);
    return 0;
}

static int cur_str(Cursor *c, Str *s, const char *what) {
    uint64_t n;
    const uint8_t *p;
    if (cur_u64(c, &n, what) || n > (uint64_t)(c->end - c->p) || cur_take(c, n, &p, what)) return cur_fail(c, what);
    s->s = (const char *)p;
    s->n = n;
    return 0;
}

static const size_t gg_scalar_size[GG_NTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static int gguf_read_value(Cursor *c, uint32_t type, GgufKV *kv, int depth) {
    const uint8_t *p;
    if (type >= GG_NTYPES) return cur_fail(c, "unknown metadata type");
    if (type == GG_STR) return cur_str(c, &kv->v.str, "string value");
    if (type == GG_ARR) {
        uint32_t et;
        uint64_t n;
        if (depth > 0) return cur_fail(c, "nested array");
        if (cur_u32(c, &et, "array type") || cur_u64(c, &n, "array length")) return -1;
        if (et >= GG_NTYPES || et == GG_ARR) return cur_fail(c, "array element type");
        kv->v.arr.type = et;
        kv->v.arr.n = n;
        kv->v.arr.data = c->p;
        if (et == GG_STR) {
            for (uint64_t i = 0; i < n; i++) {
                Str s;
                if (cur_str(c, &s, "string array")) return -1;
            }
            return 0;
        }
        if (n > (uint64_t)(c->end - c->p) / gg_scalar_size[et]) return cur_fail(c, "array data");
        c->p += n * gg_scalar_size[et];
        return 0;
    }
    if (cur_take(c, gg_scalar_size[type], &p, "scalar value")) return -1;
    switch (type) {
    case GG_U8: case GG_BOOL: kv->v.u = p[0]; break;
    case GG_I8: kv->v.i = (int8_t)p[0]; break;
    case GG_U16: { uint16_t x; memcpy(&x, p, 2); kv->v.u = x; break; }
    case GG_I16: { int16_t x; memcpy(&x, p, 2); kv->v.i = x; break; }
    case GG_U32: { uint32_t x; memcpy(&x, p, 4); kv->v.u = x; break; }
    case GG_I32: { int32_t x; memcpy(&x, p, 4); kv->v.i = x; break; }
    case GG_F32: { float x; memcpy(&x, p, 4); kv->v.f = x; break; }
    case GG_U64: memcpy(&kv->v.u, p, 8); break;
    case GG_I64: memcpy(&kv->v.i, p, 8); break;
    case GG_F64: memcpy(&kv->v.f, p, 8); break;
    }
    return 0;
}

static int gguf_tensor_info(Cursor *c, GgufTensor *t) {
    if (cur_str(c, &t->name, "tensor name") || cur_u32(c, &t->n_dims, "tensor dims")) return -1;
    if (t->n_dims < 1 || t->n_dims > 4) return cur_fail(c, "tensor rank");
    for (int d = 0; d < 4; d++) t->ne[d] = 1;
    /* the element count, not just each dimension, stays below 2^48: products of ne[] never overflow */
    uint64_t elems = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        uint64_t ne;
        if (cur_u64(c, &ne, "tensor shape")) return -1;
        if (ne == 0 || ne > ((uint64_t)1 << 48) / elems) return cur_fail(c, "tensor shape");
        elems *= ne;
        t->ne[d] = (int64_t)ne;
    }
    return cur_u32(c, &t->type, "tensor type") || cur_u64(c, &t->offset, "tensor offset") ? -1 : 0;
}

/* Bytes of a tensor, or 0 when its type is unknown or its rows don't fit its blocks. */
static size_t gguf_tensor_bytes(const GgufTensor *t) {
    if (!kn_type_supported((int)t->type) || t->ne[0] % kn_block_elems((int)t->type)) return 0;
    uint64_t rows = (uint64_t)t->ne[1] * (uint64_t)t->ne[2] * (uint64_t)t->ne[3];
    uint64_t row = kn_row_bytes((int)t->type, t->ne[0]);
    if (rows > ((uint64_t)1 << 44) / (row ? row : 1)) return 0;
    return (size_t)(rows * row);
}

/* Parse an in-memory GGUF image.  Tensors of an unsupported type keep
 * data = NULL; the model loader names them if it needs them. */
static int gguf_parse(Gguf *g, const uint8_t *base, size_t size, char *err, size_t errlen) {
    Cursor c = {base, base + size, err, errlen};
    uint32_t magic;
    uint64_t alignment = 32;
    memset(g, 0, sizeof *g);
    err[0] = 0;
    g->base = base;
    g->size = size;
    if (cur_u32(&c, &magic, "header") || magic != 0x46554747u) {
        snprintf(err, errlen, "not a GGUF file (bad magic)");
        return -1;
    }
    if (cur_u32(&c, &g->version, "version")) return -1;
    if (g->version < 2 || g->version > 3) {
        snprintf(err, errlen, "unsupported GGUF version %u (need 2 or 3)", g->version);
        return -1;
    }
    if (cur_u64(&c, &g->n_tensors, "tensor count") || cur_u64(&c, &g->n_kv, "metadata count")) return -1;
    /* every entry takes at least 8 bytes of the file: a cheap bound before allocating */
    if (g->n_kv > size / 8 || g->n_tensors > size / 8) return cur_fail(&c, "counts larger than the file");
    g->kv = xcalloc(g->n_kv, sizeof *g->kv);
    g->tensors = xcalloc(g->n_tensors, sizeof *g->tensors);
    for (uint64_t i = 0; i < g->n_kv; i++) {
        GgufKV *kv = &g->kv[i];
        if (cur_str(&c, &kv->key, "metadata key") || cur_u32(&c, &kv->type, "metadata type") ||
            gguf_read_value(&c, kv->type, kv, 0))
            return -1;
        if (str_eq(kv->key, "general.alignment")) {
            if (kv->type != GG_U32 || kv->v.u == 0 || (kv->v.u & (kv->v.u - 1))) return cur_fail(&c, "general.alignment");
            alignment = kv->v.u;
        }
    }
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (gguf_tensor_info(&c, &g->tensors[i])) return -1;
    size_t data_off = (size_t)(c.p - base);
    data_off = (data_off + alignment - 1) / alignment * alignment;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        GgufTensor *t = &g->tensors[i];
        t->nbytes = gguf_tensor_bytes(t);
        if (!t->nbytes) continue;
        if (t->offset % alignment || data_off > size || t->offset > size - data_off || t->nbytes > size - data_off - t->offset) {
            snprintf(err, errlen, "tensor '%.*s' data lies past the end of the file (truncated download?)", (int)t->name.n, t->name.s);
            return -1;
        }
        t->data = base + data_off + t->offset;
    }
    return 0;
}

static void gguf_free(Gguf *g) {
    free(g->kv);
    free(g->tensors);
    memset(g, 0, sizeof *g);
}

static const GgufKV *gguf_find(const Gguf *g, const char *key) {
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (str_eq(g->kv[i].key, key)) return &g->kv[i];
    return NULL;
}

static const GgufTensor *gguf_tensor(const Gguf *g, const char *name) {
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (str_eq(g->tensors[i].name, name)) return &g->tensors[i];
    return NULL;
}

static int kv_is_int(const GgufKV *kv) {
    return kv && kv->type != GG_F32 && kv->type != GG_F64 && kv->type != GG_STR && kv->type != GG_ARR;
}

/* Integer metadata with a default; a key of the wrong type is an error, not a silent default. */
static int64_t meta_int(const Gguf *g, const char *key, int64_t def) {
    const GgufKV *kv = gguf_find(g, key);
    if (!kv) return def;
    if (!kv_is_int(kv)) die("metadata '%s' has type %u, expected an integer", key, kv->type);
    int is_signed = kv->type == GG_I8 || kv->type == GG_I16 || kv->type == GG_I32 || kv->type == GG_I64;
    return is_signed ? kv->v.i : (int64_t)(kv->v.u > INT64_MAX ? INT64_MAX : kv->v.u);
}

static double meta_float(const Gguf *g, const char *key, double def) {
    const GgufKV *kv = gguf_find(g, key);
    if (!kv) return def;
    if (kv->type == GG_F32 || kv->type == GG_F64) return kv->v.f;
    return (double)meta_int(g, key, 0);
}

/* An array of integers or bools, the only arrays arr_int can read. */
static int arr_is_int(const GgufKV *kv) {
    if (kv->type != GG_ARR) return 0;
    uint32_t et = kv->v.arr.type;
    return et != GG_F32 && et != GG_F64 && et != GG_STR;
}

/* Element i of an integer or bool array. */
static int64_t arr_int(const GgufKV *kv, uint64_t i) {
    const uint8_t *p = kv->v.arr.data + i * gg_scalar_size[kv->v.arr.type];
    switch (kv->v.arr.type) {
    case GG_U8: case GG_BOOL: return p[0];
    case GG_I8: return (int8_t)p[0];
    case GG_U16: { uint16_t x; memcpy(&x, p, 2); return x; }
    case GG_I16: { int16_t x; memcpy(&x, p, 2); return x; }
    case GG_U32: { uint32_t x; memcpy(&x, p, 4); return x; }
    case GG_I32: { int32_t x; memcpy(&x, p, 4); return x; }
    default: { int64_t x; memcpy(&x, p, 8); return x; }
    }
}

/* The strings of a string array, in order (already bounds-checked by the parser). */
static Str *arr_strings(const GgufKV *kv) {
    Str *out = xcalloc(kv->v.arr.n, sizeof *out);
    const uint8_t *p = kv->v.arr.data;
    for (uint64_t i = 0; i < kv->v.arr.n; i++) {
        uint64_t n;
        memcpy(&n, p, 8);
        out[i].s = (const char *)p + 8;
        out[i].n = n;
        p += 8 + n;
    }
    return out;
}

typedef struct { const uint8_t *base; size_t size; } Mapping;

/* The built-in default model (issue 8): a small Qwen3.5 with MTP head trained by
 * tools/train/train_mtp.py, embedded by tools/train/model.S and used when no -m is
 * given.  Weak, so builds without it (test_units, no GGUF yet) link; then size is 0. */
extern const uint8_t mtp_default_model[] __attribute__((weak));
extern const uint64_t mtp_default_model_size __attribute__((weak));
#define BUILTIN_MODEL "<built-in>"
static size_t builtin_model_size(void) {
    return &mtp_default_model_size ? (size_t)mtp_default_model_size : 0;
}

/* mmap the file read-only; the model's weights are used in place. */
static Mapping map_file(const char *path) {
    Mapping m = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open model '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat '%s': %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) die("'%s' is a directory, not a GGUF file", path);
    if (st.st_size < 24) die("'%s' is not a GGUF file (only %lld bytes)", path, (long long)st.st_size);
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) die("cannot mmap '%s': %s", path, strerror(errno));
    close(fd);
    m.base = p;
    m.size = (size_t)st.st_size;
    return m;
}

/* ==== Model ====
 * Config holds the hyper-parameters read from the metadata, Weights the
 * tensors (pointers into the mapping).  The converter has already folded
 * the +1 into the zero-centred norm weights (not ssm_norm), stored ssm_a as
 * -exp(A_log), and, for qwen35/qwen35moe, reordered the value heads so that
 * value head h uses key head h % n_key_heads ("tiled"); qwen3next files keep
 * Hugging Face's grouping, value head h uses key head h / (n_v / n_k). */

enum { ARCH_QWEN35, ARCH_QWEN35MOE, ARCH_QWEN3NEXT };
static const char *const arch_names[] = {"qwen35", "qwen35moe", "qwen3next"};

#define MAX_LAYERS 256

typedef struct {
    int arch;
    int n_layer;            /* main decoder layers (block_count minus MTP layers) */
    int n_mtp;              /* MTP blocks after them (0 or 1) */
    int dim;                /* embedding_length */
    int n_vocab;
    int n_ctx_train;
    float eps;              /* RMSNorm epsilon */
    /* gated full attention */
    int n_head, n_kv_head, head_dim;
    int n_rot;              /* leading dims of each head that get RoPE */
    float rope_theta;
    /* Gated DeltaNet */
    int conv_kernel;        /* causal conv width (4) */
    int n_k_heads, n_v_heads;
    int k_head_dim, v_head_dim;
    int conv_dim;           /* channels through the conv: q, k (n_k_heads*k_head_dim each), v (n_v_heads*v_head_dim) */
    int v_tiled;            /* value head h uses key head h % n_k_heads (else h / (n_v/n_k)) */
    /* feed-forward */
    int ffn_dim;            /* dense SwiGLU width */
    int n_expert, n_expert_used, expert_ffn_dim, shared_ffn_dim;
    uint8_t recurrent[MAX_LAYERS];  /* per main layer: 1 DeltaNet, 0 full attention */
} Config;

typedef struct {
    int type;               /* KN_* weight format */
    const void *data;       /* n_out rows of row_bytes, in the mapping */
    int64_t n_in, n_out;
    size_t row_bytes;
} Mat;

typedef struct {
    const float *attn_norm;     /* [dim] */
    const float *post_norm;     /* [dim] before the FFN */
    /* Gated DeltaNet (recurrent layers) */
    Mat qkv;                    /* [conv_dim][dim] */
    Mat z;                      /* [n_v_heads*v_head_dim][dim] output gate */
    Mat alpha, beta;            /* [n_v_heads][dim] (qwen35); qwen3next packs both in ba */
    Mat ba;                     /* [2*n_v_heads][dim] per key-head group: beta then alpha */
    const float *ssm_a;         /* [n_v_heads] -exp(A_log) */
    const float *dt_bias;       /* [n_v_heads] */
    const float *conv_taps;     /* [conv_kernel][conv_dim]: ggml's [conv_dim][conv_kernel] transposed */
    const float *ssm_norm;      /* [v_head_dim] */
    Mat ssm_out;                /* [dim][n_v_heads*v_head_dim] */
    /* gated full attention */
    Mat wq;                     /* [n_head*head_dim*2][dim]: per head, query then gate */
    Mat wk, wv;                 /* [n_kv_head*head_dim][dim] */
    Mat wo;                     /* [dim][n_head*head_dim] */
    const float *q_norm, *k_norm; /* [head_dim] */
    /* dense FFN */
    Mat ffn_gate, ffn_up;       /* [ffn_dim][dim] */
    Mat ffn_down;               /* [dim][ffn_dim] */
    /* MoE FFN */
    Mat router;                 /* [n_expert][dim] */
    Mat exp_gate, exp_up;       /* [n_expert*exp_stride][dim]: expert e's gate rows start at row e*exp_stride
                                   of exp_gate, its up rows at e*exp_stride + exp_up_at of exp_up */
    int64_t exp_stride, exp_up_at; /* separate tensors: expert_ffn_dim, 0; fused gate_up: 2*expert_ffn_dim, expert_ffn_dim */
    Mat exp_down;               /* [n_expert*dim][expert_ffn_dim] */
    Mat sh_gate, sh_up;         /* [shared_ffn_dim][dim] */
    Mat sh_down;                /* [dim][shared_ffn_dim] */
    Mat sh_router;              /* [1][dim] scalar gate of the shared expert */
} Layer;

typedef struct {
    Mat eh_proj;                /* [dim][2*dim]: input is concat(enorm(embedding), hnorm(hidden)) */
    const float *enorm, *hnorm; /* [dim] */
    const float *head_norm;     /* [dim] shared_head_norm, or output_norm when absent */
    Layer block;                /* a full-attention decoder block */
    Mat draft_out;              /* [n][dim] the LM head drafts score: output, or a 4-bit copy of its first n rows */
} MtpHead;

typedef struct {
    Mat token_embd;             /* [n_vocab][dim] */
    Mat output;                 /* [n_vocab][dim] LM head (token_embd when tied) */
    const float *output_norm;   /* [dim] */
    Layer layers[MAX_LAYERS];
    MtpHead mtp;                /* valid when config.n_mtp */
} Weights;

typedef struct {
    Mapping file;
    Gguf gguf;
    Config cfg;
    Weights w;
    float **owned;              /* norm vectors converted to f32 (stored in another type) */
    int n_owned;
    uint8_t *placed;            /* [placed_size] dense matrices moved out of the mapping (place_weights), or NULL */
    size_t placed_size;
    uint8_t *draft_copy;        /* the head's 4-bit copy (draft_copy_make), or NULL */
} Model;

static const GgufTensor *need_tensor(const Model *m, const char *name) {
    const GgufTensor *t = gguf_tensor(&m->gguf, name);
    if (!t) die("model is missing tensor '%s'", name);
    if (!kn_type_supported((int)t->type)) die("tensor '%s' has type %s, which mtp-gen does not support", name, kn_type_name((int)t->type));
    if (!t->data) die("tensor '%s': row of %lld elements does not fit %s blocks", name, (long long)t->ne[0], kn_type_name((int)t->type));
    return t;
}

static void check_shape(const char *name, const GgufTensor *t, int64_t ne0, int64_t ne1, int64_t ne2) {
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != ne2 || t->ne[3] != 1)
        die("tensor '%s' has shape [%lld, %lld, %lld], expected [%lld, %lld, %lld]", name, (long long)t->ne[0],
            (long long)t->ne[1], (long long)t->ne[2], (long long)ne0, (long long)ne1, (long long)ne2);
}

/* A matrix of n_out (x n_mat stacked experts) rows of n_in. */
static Mat load_mat3(const Model *m, const char *name, int64_t n_in, int64_t n_out, int64_t n_mat) {
    const GgufTensor *t = need_tensor(m, name);
    check_shape(name, t, n_in, n_out, n_mat);
    return (Mat){(int)t->type, t->data, n_in, n_out * n_mat, kn_row_bytes((int)t->type, n_in)};
}

static Mat load_mat(const Model *m, const char *name, int64_t n_in, int64_t n_out) {
    return load_mat3(m, name, n_in, n_out, 1);
}

/* n floats the model frees with itself */
static float *owned_floats(Model *m, int64_t n) {
    float *v = xmalloc((size_t)n * sizeof *v);
    m->owned = realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *m->owned);
    if (!m->owned) die("out of memory");
    m->owned[m->n_owned++] = v;
    return v;
}

/* A 1-D f32 vector; other float types are converted once into owned memory. */
static const float *load_vec(Model *m, const char *name, int64_t n) {
    const GgufTensor *t = need_tensor(m, name);
    if (t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] != n)
        die("tensor '%s' has %lld elements, expected %lld", name, (long long)(t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3]), (long long)n);
    if (t->type == KN_F32) return (const float *)t->data;
    float *v = owned_floats(m, n);
    int64_t row = t->ne[0];
    for (int64_t r = 0; r < n / row; r++)
        kn_dequant_row((int)t->type, t->data + r * kn_row_bytes((int)t->type, row), v + r * row, row);
    return v;
}

static int has_tensor(const Model *m, const char *name) { return gguf_tensor(&m->gguf, name) != NULL; }

#define TNAME(buf, ...) (snprintf(buf, sizeof buf, __VA_ARGS__), buf)

/* Read one config value "<arch>.<key>", required unless def >= 0. */
static int64_t arch_int(const Model *m, const char *key, int64_t def) {
    char full[128];
    int64_t v = meta_int(&m->gguf, TNAME(full, "%s.%s", arch_names[m->cfg.arch], key), def);
    if (v < 0) die("model metadata lacks '%s'", full);
    return v;
}

static double arch_float(const Model *m, const char *key, double def) {
    char full[128];
    return meta_float(&m->gguf, TNAME(full, "%s.%s", arch_names[m->cfg.arch], key), def);
}

/* Bounds that keep every later size computation far from overflow: a model
 * outside them is rejected before anything is allocated. */
static void check_range(const char *what, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) die("model has an implausible %s (%lld; allowed %lld..%lld)", what, (long long)v, (long long)lo, (long long)hi);
}

static void load_config(Model *m) {
    Config *c = &m->cfg;
    const GgufKV *arch = gguf_find(&m->gguf, "general.architecture");
    if (!arch || arch->type != GG_STR) die("model has no general.architecture");
    c->arch = -1;
    for (int i = 0; i < 3; i++)
        if (str_eq(arch->v.str, arch_names[i])) c->arch = i;
    if (c->arch < 0) die("architecture '%.*s' is not supported (mtp-gen runs qwen35, qwen35moe, qwen3next)", (int)arch->v.str.n, arch->v.str.s);
    int64_t blocks = arch_int(m, "block_count", -1);
    c->n_mtp = (int)arch_int(m, "nextn_predict_layers", 0);
    check_range("block_count", blocks, 1, MAX_LAYERS - 1);
    check_range("nextn_predict_layers", c->n_mtp, 0, 1);
    c->n_layer = (int)(blocks - c->n_mtp);
    check_range("number of main layers", c->n_layer, 1, MAX_LAYERS - 1);
    c->dim = (int)arch_int(m, "embedding_length", -1);
    c->n_ctx_train = (int)arch_int(m, "context_length", 4096);
    c->eps = (float)arch_float(m, "attention.layer_norm_rms_epsilon", 1e-6);
    c->n_head = (int)arch_int(m, "attention.head_count", -1);
    c->n_kv_head = (int)arch_int(m, "attention.head_count_kv", -1);
    c->head_dim = (int)arch_int(m, "attention.key_length", -1);
    c->n_rot = (int)arch_int(m, "rope.dimension_count", c->head_dim);
    c->rope_theta = (float)arch_float(m, "rope.freq_base", 1e7);
    c->conv_kernel = (int)arch_int(m, "ssm.conv_kernel", -1);
    c->k_head_dim = (int)arch_int(m, "ssm.state_size", -1);
    c->n_k_heads = (int)arch_int(m, "ssm.group_count", -1);
    c->n_v_heads = (int)arch_int(m, "ssm.time_step_rank", -1);
    int64_t inner = arch_int(m, "ssm.inner_size", -1);
    check_range("embedding_length", c->dim, 32, 1 << 16);
    check_range("context_length", c->n_ctx_train, 1, 1 << 24);
    check_range("attention.head_count", c->n_head, 1, 1024);
    check_range("attention.head_count_kv", c->n_kv_head, 1, c->n_head);
    check_range("attention.key_length", c->head_dim, 2, 1024);
    check_range("rope.dimension_count", c->n_rot, 0, c->head_dim);
    check_range("ssm.conv_kernel", c->conv_kernel, 1, 16);
    check_range("ssm.state_size", c->k_head_dim, 1, 1024);
    check_range("ssm.group_count", c->n_k_heads, 1, 1024);
    check_range("ssm.time_step_rank", c->n_v_heads, c->n_k_heads, 4096);
    check_range("ssm.inner_size", inner, c->n_v_heads, 1 << 20);
    if (c->n_head % c->n_kv_head || c->n_v_heads % c->n_k_heads || inner % c->n_v_heads || c->n_rot % 2)
        die("model head counts are inconsistent (heads %d/%d, ssm heads %d/%d, rope dims %d)", c->n_head, c->n_kv_head,
            c->n_v_heads, c->n_k_heads, c->n_rot);
    if (c->n_head / c->n_kv_head > KN_ATTN_MAX_Q)
        die("model has %d query heads per KV head; at most %d are supported", c->n_head / c->n_kv_head, KN_ATTN_MAX_Q);
    c->v_head_dim = (int)(inner / c->n_v_heads);
    c->conv_dim = 2 * c->n_k_heads * c->k_head_dim + (int)inner;
    c->v_tiled = c->arch != ARCH_QWEN3NEXT;
    if (c->arch == ARCH_QWEN35) {
        c->ffn_dim = (int)arch_int(m, "feed_forward_length", -1);
        check_range("feed_forward_length", c->ffn_dim, 1, 1 << 20);
    } else {
        c->n_expert = (int)arch_int(m, "expert_count", -1);
        c->n_expert_used = (int)arch_int(m, "expert_used_count", -1);
        c->expert_ffn_dim = (int)arch_int(m, "expert_feed_forward_length", -1);
        c->shared_ffn_dim = (int)arch_int(m, "expert_shared_feed_forward_length", 0);
        check_range("expert_count", c->n_expert, 1, 4096);
        check_range("expert_used_count", c->n_expert_used, 1, c->n_expert);
        check_range("expert_feed_forward_length", c->expert_ffn_dim, 1, 1 << 20);
        check_range("expert_shared_feed_forward_length", c->shared_ffn_dim, 0, 1 << 20);
    }
    const GgufKV *toks = gguf_find(&m->gguf, "tokenizer.ggml.tokens");
    if (!toks || toks->type != GG_ARR || toks->v.arr.type != GG_STR) die("model has no tokenizer.ggml.tokens");
    check_range("vocabulary size", (int64_t)toks->v.arr.n, 1, 1 << 22);
    c->n_vocab = (int)toks->v.arr.n;
    /* which layers are recurrent: the per-layer array when present, else every
     * full_attention_interval-th layer is full attention */
    char key[128];
    const GgufKV *rec = gguf_find(&m->gguf, TNAME(key, "%s.attention.recurrent_layers", arch_names[c->arch]));
    int64_t interval = arch_int(m, "full_attention_interval", 4);
    check_range("full_attention_interval", interval, 1, MAX_LAYERS);
    if (rec && (!arr_is_int(rec) || rec->v.arr.n < (uint64_t)c->n_layer))
        die("metadata '%s' must be an array of at least %d booleans", key, c->n_layer);
    for (int l = 0; l < c->n_layer; l++)
        c->recurrent[l] = rec ? arr_int(rec, l) != 0 : (l + 1) % interval != 0;
}

static void load_attention(Model *m, Layer *L, int l) {
    const Config *c = &m->cfg;
    char n[128];
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_kv_head * c->head_dim;
    L->wq = load_mat(m, TNAME(n, "blk.%d.attn_q.weight", l), c->dim, 2 * q_dim);
    L->wk = load_mat(m, TNAME(n, "blk.%d.attn_k.weight", l), c->dim, kv_dim);
    L->wv = load_mat(m, TNAME(n, "blk.%d.attn_v.weight", l), c->dim, kv_dim);
    L->wo = load_mat(m, TNAME(n, "blk.%d.attn_output.weight", l), q_dim, c->dim);
    L->q_norm = load_vec(m, TNAME(n, "blk.%d.attn_q_norm.weight", l), c->head_dim);
    L->k_norm = load_vec(m, TNAME(n, "blk.%d.attn_k_norm.weight", l), c->head_dim);
}

static void load_deltanet(Model *m, Layer *L, int l) {
    const Config *c = &m->cfg;
    char n[128];
    int inner = c->n_v_heads * c->v_head_dim;
    L->qkv = load_mat(m, TNAME(n, "blk.%d.attn_qkv.weight", l), c->dim, c->conv_dim);
    L->z = load_mat(m, TNAME(n, "blk.%d.attn_gate.weight", l), c->dim, inner);
    if (c->arch == ARCH_QWEN3NEXT) {
        L->ba = load_mat(m, TNAME(n, "blk.%d.ssm_ba.weight", l), c->dim, 2 * c->n_v_heads);
    } else {
        L->alpha = load_mat(m, TNAME(n, "blk.%d.ssm_alpha.weight", l), c->dim, c->n_v_heads);
        L->beta = load_mat(m, TNAME(n, "blk.%d.ssm_beta.weight", l), c->dim, c->n_v_heads);
    }
    L->ssm_a = load_vec(m, TNAME(n, "blk.%d.ssm_a", l), c->n_v_heads);
    L->dt_bias = load_vec(m, TNAME(n, "blk.%d.ssm_dt.bias", l), c->n_v_heads);
    const float *conv = load_vec(m, TNAME(n, "blk.%d.ssm_conv1d.weight", l), (int64_t)c->conv_dim * c->conv_kernel);
    float *taps = owned_floats(m, (int64_t)c->conv_dim * c->conv_kernel);
    for (int ch = 0; ch < c->conv_dim; ch++)
        for (int t = 0; t < c->conv_kernel; t++) taps[(int64_t)t * c->conv_dim + ch] = conv[(int64_t)ch * c->conv_kernel + t];
    L->conv_taps = taps;
    L->ssm_norm = load_vec(m, TNAME(n, "blk.%d.ssm_norm.weight", l), c->v_head_dim);
    L->ssm_out = load_mat(m, TNAME(n, "blk.%d.ssm_out.weight", l), inner, c->dim);
}

static void load_ffn(Model *m, Layer *L, int l) {
    const Config *c = &m->cfg;
    char n[128];
    if (c->arch == ARCH_QWEN35) {
        L->ffn_gate = load_mat(m, TNAME(n, "blk.%d.ffn_gate.weight", l), c->dim, c->ffn_dim);
        L->ffn_up = load_mat(m, TNAME(n, "blk.%d.ffn_up.weight", l), c->dim, c->ffn_dim);
        L->ffn_down = load_mat(m, TNAME(n, "blk.%d.ffn_down.weight", l), c->ffn_dim, c->dim);
        return;
    }
    L->router = load_mat(m, TNAME(n, "blk.%d.ffn_gate_inp.weight", l), c->dim, c->n_expert);
    if (has_tensor(m, TNAME(n, "blk.%d.ffn_gate_up_exps.weight", l))) {    /* per expert: gate rows, then up rows */
        L->exp_gate = L->exp_up = load_mat3(m, n, c->dim, 2 * (int64_t)c->expert_ffn_dim, c->n_expert);
        L->exp_stride = 2 * (int64_t)c->expert_ffn_dim;
        L->exp_up_at = c->expert_ffn_dim;
    } else {
        L->exp_gate = load_mat3(m, TNAME(n, "blk.%d.ffn_gate_exps.weight", l), c->dim, c->expert_ffn_dim, c->n_expert);
        L->exp_up = load_mat3(m, TNAME(n, "blk.%d.ffn_up_exps.weight", l), c->dim, c->expert_ffn_dim, c->n_expert);
        L->exp_stride = c->expert_ffn_dim;
    }
    L->exp_down = load_mat3(m, TNAME(n, "blk.%d.ffn_down_exps.weight", l), c->expert_ffn_dim, c->dim, c->n_expert);
    if (c->shared_ffn_dim) {
        L->sh_gate = load_mat(m, TNAME(n, "blk.%d.ffn_gate_shexp.weight", l), c->dim, c->shared_ffn_dim);
        L->sh_up = load_mat(m, TNAME(n, "blk.%d.ffn_up_shexp.weight", l), c->dim, c->shared_ffn_dim);
        L->sh_down = load_mat(m, TNAME(n, "blk.%d.ffn_down_shexp.weight", l), c->shared_ffn_dim, c->dim);
        const GgufTensor *t = need_tensor(m, TNAME(n, "blk.%d.ffn_gate_inp_shexp.weight", l));
        if (t->ne[0] != c->dim || t->ne[1] * t->ne[2] * t->ne[3] != 1) die("tensor '%s' must have %d elements", n, c->dim);
        L->sh_router = (Mat){(int)t->type, t->data, c->dim, 1, kn_row_bytes((int)t->type, c->dim)};
    }
}

static void load_block(Model *m, Layer *L, int l, int recurrent) {
    char n[128];
    L->attn_norm = load_vec(m, TNAME(n, "blk.%d.attn_norm.weight", l), m->cfg.dim);
    L->post_norm = load_vec(m, TNAME(n, "blk.%d.post_attention_norm.weight", l), m->cfg.dim);
    if (recurrent)
        load_deltanet(m, L, l);
    else
        load_attention(m, L, l);
    load_ffn(m, L, l);
}

static void load_mtp_head(Model *m) {
    const Config *c = &m->cfg;
    Weights *w = &m->w;
    char n[128];
    int l = c->n_layer;
    MtpHead *h = &w->mtp;
    h->eh_proj = load_mat(m, TNAME(n, "blk.%d.nextn.eh_proj.weight", l), 2 * c->dim, c->dim);
    h->enorm = load_vec(m, TNAME(n, "blk.%d.nextn.enorm.weight", l), c->dim);
    h->hnorm = load_vec(m, TNAME(n, "blk.%d.nextn.hnorm.weight", l), c->dim);
    h->head_norm = has_tensor(m, TNAME(n, "blk.%d.nextn.shared_head_norm.weight", l)) ? load_vec(m, n, c->dim) : w->output_norm;
    load_block(m, &h->block, l, 0);
}

/* ---- placement ----
 * Decoding streams every dense weight once per token.  Copied out of the
 * file mapping into one anonymous buffer on huge pages, they stream faster
 * (prefetchers run past 4 KB boundaries, far fewer TLB misses: +6% decode
 * on a 0.8 GB q8_0 file), and the copy can take the layout this build's
 * kernels read fastest (kn_pack_type: q8_0 interleaved for AVX-512 VNNI).
 * Expert tensors stay mapped (a token reads only its few experts, and they
 * may not fit in RAM), and so does everything when the matrices would take
 * more than half the RAM or the buffer cannot be had: weights are then used
 * in place, as stored, by the same kernels. */

static int layer_mats(Layer *L, Mat **out) {
    Mat *all[] = {&L->qkv, &L->z, &L->alpha, &L->beta, &L->ba, &L->ssm_out, &L->wq, &L->wk, &L->wv, &L->wo,
                  &L->ffn_gate, &L->ffn_up, &L->ffn_down, &L->router, &L->sh_gate, &L->sh_up, &L->sh_down, &L->sh_router};
    int n = 0;
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (all[i]->data) out[n++] = all[i];
    return n;
}

#define MATS_PER_LAYER 18

static size_t placed_bytes(const Mat *w) {
    size_t b = kn_pack_bytes(w->type, w->n_out, w->n_in);
    return (b + 63) / 64 * 64;
}

/* madvise the whole pages within [p, p + bytes). */
static void pages_advise(const void *p, size_t bytes, int advice) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)p + page - 1) / page * page, hi = ((uintptr_t)p + bytes) / page * page;
    if (hi > lo) madvise((void *)lo, hi - lo, advice);
}

/* The mapping's pages of a matrix: mapped in one call before it is copied
 * (a page fault per 4 KB made loading 3x slower), given back after, since
 * they are not read again. */
static void matrix_pages(const Model *m, const Mat *w, int advice) {
    if (m->file.base != mtp_default_model) pages_advise(w->data, (size_t)w->n_out * w->row_bytes, advice);
}

static void place_weights(Model *m) {
    const Config *c = &m->cfg;
    Weights *w = &m->w;
    int n_blocks = c->n_layer + c->n_mtp, n = 0;
    Mat **mats = xcalloc((size_t)n_blocks * MATS_PER_LAYER + 3, sizeof *mats);
    mats[n++] = &w->token_embd;
    if (w->output.data != w->token_embd.data) mats[n++] = &w->output;
    if (c->n_mtp) mats[n++] = &w->mtp.eh_proj;
    for (int l = 0; l < c->n_layer; l++) n += layer_mats(&w->layers[l], mats + n);
    if (c->n_mtp) n += layer_mats(&w->mtp.block, mats + n);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += placed_bytes(mats[i]);
    double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    void *buf = total > 0 && (double)total <= ram / 2 ? mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) : MAP_FAILED;
    if (buf == MAP_FAILED) {
        free(mats);
        return;
    }
    madvise(buf, total, MADV_HUGEPAGE);
    int tied = w->output.data == w->token_embd.data;
    uint8_t *at = buf;
    for (int i = 0; i < n; i++) {
        Mat *x = mats[i];
        size_t bytes = placed_bytes(x);
        matrix_pages(m, x, MADV_POPULATE_READ);
        kn_pack(x->type, x->data, x->row_bytes, x->n_out, x->n_in, at);
        matrix_pages(m, x, MADV_DONTNEED);
        x->type = kn_pack_type(x->type);
        x->data = at;
        at += bytes;
    }
    if (tied) w->output = w->token_embd;
    mprotect(buf, total, PROT_READ);
    m->placed = buf;
    m->placed_size = total;
    free(mats);
}

static void load_weights(Model *m) {
    const Config *c = &m->cfg;
    Weights *w = &m->w;
    w->token_embd = load_mat(m, "token_embd.weight", c->dim, c->n_vocab);
    w->output = has_tensor(m, "output.weight") ? load_mat(m, "output.weight", c->dim, c->n_vocab) : w->token_embd;
    w->output_norm = load_vec(m, "output_norm.weight", c->dim);
    for (int l = 0; l < c->n_layer; l++) load_block(m, &w->layers[l], l, c->recurrent[l]);
    if (c->n_mtp) load_mtp_head(m);
    place_weights(m);
    w->mtp.draft_out = w->output;
}


/* Map and parse the file; config and weights come after, since a
 * vocabulary-only file is enough for --tokenize. */
static void model_open(Model *m, const char *path) {
    char err[256];
    memset(m, 0, sizeof *m);
    if (!strcmp(path, BUILTIN_MODEL) && builtin_model_size()) {
        m->file.base = mtp_default_model;         /* embedded by tools/train/model.S, used in place */
        m->file.size = builtin_model_size();
    } else
        m->file = map_file(path);
    if (gguf_parse(&m->gguf, m->file.base, m->file.size, err, sizeof err)) die("%s: %s", path, err);
}

static void model_free(Model *m) {
    if (m->placed) munmap(m->placed, m->placed_size);
    afree(m->draft_copy);
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    gguf_free(&m->gguf);
    if (m->file.base != mtp_default_model) munmap((void *)m->file.base, m->file.size);
}

/* ==== Thread pool ====
 * Workers are started once and wait for a new generation number.  They spin
 * briefly first (a decode step dispatches a few hundred small jobs, so
 * sleeping between them would cost more than the work) and then park on a
 * condition variable, so an idle REPL burns no CPU.  The calling thread runs
 * share 0 of every job itself. */

typedef void (*PoolFn)(void *ctx, int ith, int nth);

typedef struct {
    int n_threads;
    pthread_t *threads;         /* [n_threads-1] workers */
    pthread_mutex_t mu;
    pthread_cond_t wake;
    atomic_uint_fast64_t generation;
    atomic_int pending;         /* workers still running the current job */
    PoolFn fn;
    void *ctx;
    int quit;
    double *speed;              /* [n_threads] each thread's relative speed on matrix products (mean ~1) */
    double *busy_ms;            /* [n_threads] each thread's time on its share of the last one */
} Pool;

typedef struct { Pool *pool; int ith; } PoolWorker;

#define SPIN_ITERS 20000
#define YIELD_ITERS 2000

static void *pool_worker(void *arg) {
    PoolWorker *me = arg;
    Pool *p = me->pool;
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen;
        /* after a short spin, yield while polling: on a core shared with
         * another busy process, a worker that only spins takes the time the
         * calling thread needs to hand it the next job (8x slower decode) */
        for (int i = 0; (gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen && i < SPIN_ITERS + YIELD_ITERS; i++)
            if (i >= SPIN_ITERS) sched_yield();
        if (gen == seen) {
            pthread_mutex_lock(&p->mu);
            while ((gen = atomic_load(&p->generation)) == seen) pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        seen = gen;
        if (p->quit) break;
        p->fn(p->ctx, me->ith, p->n_threads);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
    }
    free(me);
    return NULL;
}

static void pool_init(Pool *p, int n_threads) {
    memset(p, 0, sizeof *p);
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->threads = xcalloc((size_t)n_threads, sizeof *p->threads);
    p->speed = xcalloc((size_t)n_threads, sizeof *p->speed);
    p->busy_ms = xcalloc((size_t)n_threads, sizeof *p->busy_ms);
    for (int i = 0; i < n_threads; i++) p->speed[i] = 1;
    for (int i = 1; i < n_threads; i++) {
        PoolWorker *w = xmalloc(sizeof *w);
        *w = (PoolWorker){p, i};
        if (pthread_create(&p->threads[i - 1], NULL, pool_worker, w)) die("cannot start thread %d", i);
    }
}

static void pool_kick(Pool *p) {
    atomic_store(&p->pending, p->n_threads - 1);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
}

static void pool_run(Pool *p, PoolFn fn, void *ctx) {
    if (p->n_threads == 1) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    pool_kick(p);
    fn(ctx, 0, p->n_threads);
    /* spin, then yield: when the machine is oversubscribed a descheduled
     * worker needs this core more than we need to poll */
    for (int i = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; i++)
        if (i > 10000) sched_yield();
}

static void pool_free(Pool *p) {
    if (p->n_threads > 1) {
        p->quit = 1;
        pool_kick(p);
        for (int i = 0; i < p->n_threads - 1; i++) pthread_join(p->threads[i], NULL);
    }
    free(p->threads);
    free(p->speed);
    free(p->busy_ms);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->wake);
}

/* Share [*lo, *hi) of n items for thread ith of nth, in multiples of align
 * so that neighbouring threads never write the same cache line. */
static void pool_share(int64_t n, int ith, int nth, int64_t align, int64_t *lo, int64_t *hi) {
    int64_t units = (n + align - 1) / align;
    *lo = units * ith / nth * align;
    *hi = units * (ith + 1) / nth * align;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

/* Thread ith's share [*lo, *hi) of n items in proportion to the threads'
 * measured speeds: on a shared machine (or one with fast and slow cores)
 * one CPU can run 10-25% slower than another for seconds at a time, and
 * with equal shares the faster thread spent that long waiting. */
static void pool_share_by_speed(const Pool *p, int64_t n, int ith, int64_t *lo, int64_t *hi) {
    double total = 0, before = 0;
    for (int i = 0; i < p->n_threads; i++) {
        if (i == ith) before = total;
        total += p->speed[i];
    }
    *lo = (int64_t)(n * before / total + 0.5);
    *hi = ith == p->n_threads - 1 ? n : (int64_t)(n * (before + p->speed[ith]) / total + 0.5);
}

/* After a job shared by speed: move each thread's speed a little towards
 * its rate on it relative to the others' (items per ms; one job's timing is
 * noisy, and the job kinds differ, so only the ratio is used, smoothed).
 * Pools of more than SPEED_THREADS threads keep equal shares. */
#define SPEED_THREADS 64

static void pool_learn_speed(Pool *p, int64_t n) {
    double rate[SPEED_THREADS], mean = 0;
    int nt = p->n_threads;
    if (nt > SPEED_THREADS) return;
    for (int i = 0; i < nt; i++) {
        int64_t lo, hi;
        pool_share_by_speed(p, n, i, &lo, &hi);
        if (hi - lo < 4 || p->busy_ms[i] <= 0) return;     /* too little to time */
        rate[i] = (double)(hi - lo) / p->busy_ms[i];
        mean += rate[i] / nt;
    }
    for (int i = 0; i < nt; i++) {
        double r = rate[i] / mean;
        p->speed[i] = 0.9 * p->speed[i] + 0.1 * (r < 0.25 ? 0.25 : r > 4 ? 4 : r);
    }
}

/* ==== Matrix products ====
 * y[r] = W x[r] for a batch of activation rows.  Activations are prepared
 * once per input (quantised to the kernel's 8-bit blocks), then each thread
 * takes a slice of output rows (sized by its measured speed) and, for each
 * small tile of weight rows, runs every group of KN_MAX_ROWS activation
 * rows: the tile stays in cache, so a batch of tokens reads the weights
 * from memory once (a batch of one group takes its slice in one call).
 * Products that share an input (q/k/v, gate/up, the DeltaNet projections)
 * go out as one job, so a step waits on the pool half as often; a SwiGLU's
 * gate and up run tile by tile side by side, and the thread that made a
 * tile of both applies the activation to it, so that work is shared out
 * too instead of running on one thread between jobs. */

#define MATMUL_TILE 16
#define MAX_PRODUCTS 4

typedef struct { const Mat *w; float *y; /* [n][w->n_out] */ } Product;

typedef struct {
    Product prod[MAX_PRODUCTS];
    const uint8_t *act[MAX_PRODUCTS]; /* [n][act_bytes] prepared input of each product */
    size_t act_bytes[MAX_PRODUCTS];
    int64_t first_tile[MAX_PRODUCTS + 1]; /* product i owns tiles [first_tile[i], first_tile[i+1]) */
    int count, n;
    const float *x;             /* [n][n_in] the f32 input, for the reference kernel */
    int glu;                    /* products 0 and 1 are a SwiGLU's gate and up: silu(gate) * up into gate's y */
    Pool *pool;
} MatmulJob;

/* --ref-kernels: every product through the scalar reference (f32 activations,
 * double accumulation).  Slow; it separates the error of a quantised file
 * from the error of 8-bit activations when checking against a float reference. */
static int g_ref_kernels;

static void matmul_tile(const MatmulJob *j, int p, int64_t i0, int64_t i1) {
    const Mat *w = j->prod[p].w;
    float *y = j->prod[p].y;
    for (int r = 0; r < j->n; r += KN_MAX_ROWS) {
        int nr = j->n - r < KN_MAX_ROWS ? j->n - r : KN_MAX_ROWS;
        if (g_ref_kernels)
            kn_ref_matmul(w->type, w->data, w->row_bytes, w->n_in, i0, i1, j->x + (int64_t)r * w->n_in, w->n_in, nr,
                          y + (int64_t)r * w->n_out, w->n_out);
        else
            kn_matmul(w->type, w->data, w->row_bytes, w->n_in, i0, i1, j->act[p] + (size_t)r * j->act_bytes[p],
                      j->act_bytes[p], nr, y + (int64_t)r * w->n_out, w->n_out);
    }
}

/* Tiles per kernel call: a batch of more than KN_MAX_ROWS tokens runs each
 * small tile for all its row groups while the tile is in cache; a smaller
 * batch has one row group, so a thread takes its whole slice in one call
 * (per-tile calls cost 10-15% of a decode: each restarts the weight
 * prefetches, and a SwiGLU's alternating gate and up tiles left them
 * fetching the wrong matrix). */
static int64_t tiles_per_call(const MatmulJob *j, int64_t t0, int64_t t1) {
    return j->n <= KN_MAX_ROWS && t1 > t0 ? t1 - t0 : 1;
}

/* Output rows [*i0, *i1) of tiles [t, t + span) of a product of n_out rows
 * (t counted from the product's first tile). */
static void tile_rows(int64_t t, int64_t span, int64_t n_out, int64_t *i0, int64_t *i1) {
    *i0 = t * MATMUL_TILE;
    *i1 = (t + span) * MATMUL_TILE < n_out ? (t + span) * MATMUL_TILE : n_out;
}

static void tiles_run(const MatmulJob *j, int64_t lo, int64_t hi) {
    for (int p = 0; p < j->count; p++) {
        int64_t t0 = lo > j->first_tile[p] ? lo : j->first_tile[p], t1 = hi < j->first_tile[p + 1] ? hi : j->first_tile[p + 1];
        int64_t span = tiles_per_call(j, t0, t1), i0, i1;
        for (int64_t t = t0; t < t1; t += span) {
            tile_rows(t - j->first_tile[p], span, j->prod[p].w->n_out, &i0, &i1);
            matmul_tile(j, p, i0, i1);
        }
    }
}

/* Tiles [lo, hi) of a SwiGLU's gate and up, then the activation over them:
 * each output is computed the same way whatever the batch (the activation's
 * vector steps start at a multiple of 16 either way, and its scalar tail is
 * the matrix's last rows), so a verify still reproduces single steps. */
static void glu_tiles_run(const MatmulJob *j, int64_t lo, int64_t hi) {
    int64_t span = tiles_per_call(j, lo, hi), i0, i1;
    for (int64_t t = lo; t < hi; t += span) {
        tile_rows(t, span, j->prod[0].w->n_out, &i0, &i1);
        matmul_tile(j, 0, i0, i1);
        matmul_tile(j, 1, i0, i1);
        for (int r = 0; r < j->n; r++) {
            float *g = j->prod[0].y + (int64_t)r * j->prod[0].w->n_out + i0;
            kn_swiglu(g, g, j->prod[1].y + (int64_t)r * j->prod[0].w->n_out + i0, i1 - i0);
        }
    }
}

static void matmul_worker(void *ctx, int ith, int nth) {
    const MatmulJob *j = ctx;
    int64_t lo, hi;
    (void)nth;
    double t0 = now_ms();
    pool_share_by_speed(j->pool, j->first_tile[j->glu ? 1 : j->count], ith, &lo, &hi);
    if (j->glu) glu_tiles_run(j, lo, hi);
    else tiles_run(j, lo, hi);
    j->pool->busy_ms[ith] = now_ms() - t0;
}

/* ==== State ====
 * Everything one sequence carries from token to token.  Full-attention
 * layers keep K/V per position; the cache is truncated by moving n_past back.
 * DeltaNet layers keep a conv window and a [k_head_dim][v_head_dim]
 * recurrent state per value head.
 *
 * Speculation must be able to keep any prefix of a batch.  A layer's conv
 * inputs are rows: the committed window (the last conv_kernel-1 inputs)
 * from row conv_at, then the batch's, so keeping a prefix of j tokens is
 * moving conv_at on by j.  The recurrent states are large (18 MB per copy for the
 * 0.8B model), and writing one copy per token made a 3-token verify 10%
 * dearer.  A speculative batch's first token is always kept (it is the last
 * accepted one), so it updates the state in place as a decode step does;
 * the later tokens evolve a second copy, ssm_last, and their DeltaNet
 * inputs are recorded.  Keeping the whole batch (the commonest outcome when
 * the head drafts well) swaps ssm_last in; keeping 1 < j < all tokens
 * replays tokens 1..j-1 on the state in place, with the same arithmetic as
 * plain decoding, bit for bit; keeping only the first costs nothing. */

#define UBATCH 32               /* tokens per forward call in prefill */

typedef struct {
    int n_ctx;                  /* positions the caches can hold */
    int n_past;                 /* committed positions */
    int spec_max;               /* 1 + the longest speculative batch (sizes spec_rows; >1: ssm_last exists) */
    int conv_at;                /* row of conv where the committed conv window starts */
    float *k_cache[MAX_LAYERS]; /* full-attention layers: [n_kv_head][n_ctx][head_dim]; head-major, so
                                 * that attention streams one head's keys from consecutive lines (with the
                                 * heads interleaved per position it took ~25% longer at head_dim 64) */
    float *v_cache[MAX_LAYERS]; /* same shape */
    float *conv[MAX_LAYERS];    /* recurrent layers: [conv_kernel-1+UBATCH][conv_dim] conv inputs: the
                                 * committed window (the last conv_kernel-1) from row conv_at, then a batch's */
    float *ssm[MAX_LAYERS];     /* recurrent layers: [n_v_heads][k_head_dim][v_head_dim], committed */
    float *spec_rows[MAX_LAYERS]; /* recurrent layers: [spec_max-1][spec_row_floats] the DeltaNet inputs of
                                   * a speculative batch's tokens after the first: q k v after conv and norms, decay, beta */
    float *ssm_last[MAX_LAYERS]; /* recurrent layers, once spec_max > 1: shaped as ssm, the state after a
                                  * speculative batch's last token, which keeping the whole batch adopts */
    int spec_n;                 /* tokens in the speculative batch forward() ran last */
    float *mtp_k, *mtp_v;       /* the MTP block's own cache: [n_kv_head][n_ctx][head_dim] */
    int mtp_n;                  /* teacher-forced MTP cache entries: positions 0..mtp_n-1 */
} State;

static size_t conv_window_floats(const Config *c) { return (size_t)(c->conv_kernel - 1) * c->conv_dim; }
/* The committed conv window of recurrent layer l: its rows from conv_at. */
static float *conv_window(const State *st, const Config *c, int l) { return st->conv[l] + (size_t)st->conv_at * c->conv_dim; }
static size_t ssm_floats(const Config *c) { return (size_t)c->n_v_heads * c->k_head_dim * c->v_head_dim; }
static size_t spec_row_floats(const Config *c) { return (size_t)c->conv_dim + 2 * (size_t)c->n_v_heads; }

/* A recurrent layer's buffers sized by the longest speculative batch,
 * zeroed: the rows it records and, once there can be one, the state after
 * it (state_init, state_grow_spec). */
static void alloc_spec_buffers(State *s, const Config *c, int layer, int spec_max) {
    s->spec_rows[layer] = acalloc((spec_max - 1) * spec_row_floats(c), sizeof(float));
    if (spec_max > 1 && !s->ssm_last[layer]) s->ssm_last[layer] = acalloc(ssm_floats(c), sizeof(float));
}

static void state_init(State *s, const Config *c, int n_ctx, int spec_max) {
    memset(s, 0, sizeof *s);
    s->n_ctx = n_ctx;
    s->spec_max = spec_max;
    size_t kv = (size_t)n_ctx * c->n_kv_head * c->head_dim;
    for (int l = 0; l < c->n_layer; l++) {
        if (c->recurrent[l]) {
            alloc_spec_buffers(s, c, l, spec_max);
            s->conv[l] = acalloc((size_t)(c->conv_kernel - 1 + UBATCH) * c->conv_dim, sizeof(float));
            s->ssm[l] = acalloc(ssm_floats(c), sizeof(float));
        } else {
            s->k_cache[l] = acalloc(kv, sizeof(float));
            s->v_cache[l] = acalloc(kv, sizeof(float));
        }
    }
    if (c->n_mtp) {
        s->mtp_k = acalloc(kv, sizeof(float));
        s->mtp_v = acalloc(kv, sizeof(float));
    }
}

static void state_free(State *s) {
    for (int l = 0; l < MAX_LAYERS; l++) {
        afree(s->k_cache[l]);
        afree(s->v_cache[l]);
        afree(s->conv[l]);
        afree(s->ssm[l]);
        afree(s->ssm_last[l]);
        afree(s->spec_rows[l]);
    }
    afree(s->mtp_k);
    afree(s->mtp_v);
}

/* ==== Forward ====
 * One call runs the main model over n <= UBATCH tokens at positions
 * n_past.. and leaves, per row, the hidden state after the final norm (the
 * MTP head's input) and optionally the logits.  Every per-token computation
 * is the same code whatever n is, so a K+1-token verify reproduces K+1
 * single-token steps bit for bit (see the determinism contract in
 * kernels/kernels.h). */

enum { LOGITS_NONE, LOGITS_LAST, LOGITS_ALL };   /* which rows of a batch get logits */

typedef struct {
    float *x;                   /* [UBATCH][dim] residual stream */
    float *xn;                  /* [UBATCH][dim] normed input of a sub-layer */
    float *proj;                /* [UBATCH][max projection width] */
    float *gate;                /* [UBATCH][max gate width] */
    float *mix;                 /* [UBATCH][max mixer output width] */
    float *k, *v;               /* [UBATCH][n_kv_head*head_dim] */
    float *out;                 /* [UBATCH][dim] a sub-layer's output */
    float *ab;                  /* [UBATCH][2*n_v_heads] alpha/beta logits; also router logits [UBATCH][n_expert] */
    float *decay, *beta;        /* [UBATCH][n_v_heads] */
    float *att;                 /* [n_threads][KN_ATTN_MAX_Q][n_ctx] attention scores */
    float *ffn_a, *ffn_b;       /* [UBATCH][max ffn width] */
    float *moe_w;               /* [UBATCH][n_expert] routing weight (0 when unused) */
    float *moe_x, *moe_y;       /* [UBATCH][dim] rows gathered for one expert */
    int *moe_rows;              /* [UBATCH] */
    float *hidden;              /* [UBATCH][dim] after the final norm */
    float *logits;              /* [UBATCH][n_vocab] */
    float *mtp_in;              /* [UBATCH][2*dim] MTP head input before eh_proj */
    float *inv_freq;            /* [n_rot/2] RoPE frequencies */
    float *rope_cos, *rope_sin; /* [n_rot/2] at the position being rotated */
    uint8_t *act;               /* [UBATCH][max activation row bytes] prepared activations */
} Scratch;

typedef struct {
    Model *model;
    Pool pool;
    State st;
    Scratch s;
} Engine;

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

static void scratch_init(Scratch *s, const Config *c, int n_ctx, int n_threads) {
    size_t B = UBATCH, q_dim = (size_t)c->n_head * c->head_dim, inner = (size_t)c->n_v_heads * c->v_head_dim;
    size_t proj = max_sz(2 * q_dim, (size_t)c->conv_dim);
    size_t mix = max_sz(q_dim, inner);
    size_t ffn = max_sz((size_t)c->ffn_dim, max_sz((size_t)c->expert_ffn_dim, (size_t)c->shared_ffn_dim));
    size_t max_in = max_sz(max_sz(2 * (size_t)c->dim, mix), ffn);
    s->x = acalloc(B * c->dim, sizeof(float));
    s->xn = acalloc(B * c->dim, sizeof(float));
    s->proj = acalloc(B * proj, sizeof(float));
    s->gate = acalloc(B * mix, sizeof(float));
    s->mix = acalloc(B * mix, sizeof(float));
    s->k = acalloc(B * c->n_kv_head * c->head_dim, sizeof(float));
    s->v = acalloc(B * c->n_kv_head * c->head_dim, sizeof(float));
    s->out = acalloc(B * c->dim, sizeof(float));
    s->ab = acalloc(B * max_sz(2 * (size_t)c->n_v_heads, (size_t)c->n_expert), sizeof(float));
    s->decay = acalloc(B * c->n_v_heads, sizeof(float));
    s->beta = acalloc(B * c->n_v_heads, sizeof(float));
    s->att = acalloc((size_t)n_threads * KN_ATTN_MAX_Q * n_ctx, sizeof(float));
    s->ffn_a = acalloc(B * ffn, sizeof(float));
    s->ffn_b = acalloc(B * ffn, sizeof(float));
    s->moe_w = acalloc(B * max_sz(1, (size_t)c->n_expert), sizeof(float));
    s->moe_x = acalloc(B * c->dim, sizeof(float));
    s->moe_y = acalloc(B * c->dim, sizeof(float));
    s->moe_rows = acalloc(B, sizeof(int));
    s->hidden = acalloc(B * c->dim, sizeof(float));
    s->logits = acalloc(B * c->n_vocab, sizeof(float));
    s->mtp_in = acalloc(B * 2 * c->dim, sizeof(float));
    s->inv_freq = acalloc((size_t)c->n_rot / 2 + 1, sizeof(float));
    s->rope_cos = acalloc((size_t)c->n_rot / 2 + 1, sizeof(float));
    s->rope_sin = acalloc((size_t)c->n_rot / 2 + 1, sizeof(float));
    for (int i = 0; i < c->n_rot / 2; i++) s->inv_freq[i] = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)c->n_rot);
    s->act = acalloc(B * MAX_PRODUCTS, kn_act_row_bytes(KN_F32, (int64_t)max_in) + 64);
}

static void scratch_free(Scratch *s) {
    float *bufs[] = {s->x, s->xn, s->proj, s->gate, s->mix, s->k, s->v, s->out, s->ab, s->decay,
                     s->beta, s->att, s->ffn_a, s->ffn_b, s->moe_w, s->moe_x, s->moe_y, s->hidden, s->logits, s->mtp_in,
                     s->inv_freq, s->rope_cos, s->rope_sin};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) afree(bufs[i]);
    afree(s->moe_rows);
    afree(s->act);
}

/* y_i[n][w_i->n_out] = W_i x[n][n_in] for count products of the same input
 * (with glu, then y_0 = silu(y_0) * y_1).  The input is prepared once per
 * weight format the products use. */
static void matmul_job(Engine *e, const float *x, int n, const Product *prod, int count, int glu) {
    MatmulJob job = {.count = count, .n = n, .x = x, .glu = glu, .pool = &e->pool};
    const uint8_t *next = e->s.act;
    for (int p = 0; p < count; p++) {
        const Mat *w = prod[p].w;
        job.prod[p] = prod[p];
        job.act_bytes[p] = kn_act_row_bytes(w->type, w->n_in);
        job.first_tile[p + 1] = job.first_tile[p] + (w->n_out + MATMUL_TILE - 1) / MATMUL_TILE;
        int q = 0;
        while (q < p && prod[q].w->type != w->type) q++;
        if (q < p) {    /* same weight format as an earlier product: share its preparation */
            job.act[p] = job.act[q];
            continue;
        }
        job.act[p] = next;
        for (int r = 0; r < n; r++) kn_act_prepare(w->type, x + (int64_t)r * w->n_in, w->n_in, (uint8_t *)next + r * job.act_bytes[p]);
        next += (size_t)n * job.act_bytes[p];
    }
    pool_run(&e->pool, matmul_worker, &job);
    if (e->pool.n_threads > 1) pool_learn_speed(&e->pool, job.first_tile[glu ? 1 : count]);
}

static void matmul_set(Engine *e, const float *x, int n, const Product *prod, int count) { matmul_job(e, x, n, prod, count, 0); }

/* y[n][w->n_out] = W x[n][w->n_in] */
static void matmul(Engine *e, const Mat *w, const float *x, int n, float *y) {
    matmul_set(e, x, n, &(Product){w, y}, 1);
}

static void rmsnorm_rows(float *out, const float *x, const float *w, int n, int dim, float eps) {
    for (int r = 0; r < n; r++) kn_rmsnorm(out + (int64_t)r * dim, x + (int64_t)r * dim, w, dim, eps);
}

static void add_rows(float *x, const float *y, int64_t count) {
    for (int64_t i = 0; i < count; i++) x[i] += y[i];
}

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static float softplusf(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* NeoX-style rotary embedding on the first n_rot dims: pairs (i, i + n_rot/2).
 * Qwen3.5's interleaved multi-axis RoPE reduces to this for text, where the
 * temporal, height and width positions are all the token position.  The
 * angles of a position are computed once for all its heads (rope_at). */
static void rope_at(Scratch *s, int n_rot, int pos) {
    for (int i = 0; i < n_rot / 2; i++) {
        float angle = (float)pos * s->inv_freq[i];
        s->rope_cos[i] = cosf(angle);
        s->rope_sin[i] = sinf(angle);
    }
}

static void rope(const Scratch *s, float *v, int n_rot) {
    int half = n_rot / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half], c = s->rope_cos[i], sn = s->rope_sin[i];
        v[i] = a * c - b * sn;
        v[i + half] = b * c + a * sn;
    }
}

/* ---- gated full attention ---- */

typedef struct {
    const Config *c;
    const float *q;             /* [n][2*q_dim]: per head, query then gate */
    const float *k_cache, *v_cache;
    float *out;                 /* [n][q_dim] */
    float *scores;              /* [nth][KN_ATTN_MAX_Q][n_ctx] */
    int n_ctx, n, pos0;
    int rows;                   /* tokens per work item: their queries of one KV head's group fit one kernel call */
} AttnJob;

/* Tokens [r0, r1) against KV head kvh: all their query heads that share it
 * in one kernel call, which reads that part of the cache once for them. */
static void attn_group(const AttnJob *j, int kvh, int r0, int r1, float *sc) {
    const Config *c = j->c;
    int hd = c->head_dim, group = c->n_head / c->n_kv_head, nq = 0;
    const float *q[KN_ATTN_MAX_Q];
    float *o[KN_ATTN_MAX_Q];
    int n_keys[KN_ATTN_MAX_Q];
    for (int r = r0; r < r1; r++)
        for (int h = kvh * group; h < (kvh + 1) * group; h++, nq++) {
            q[nq] = j->q + (int64_t)r * 2 * c->n_head * hd + (int64_t)h * 2 * hd;
            o[nq] = j->out + (int64_t)r * c->n_head * hd + (int64_t)h * hd;
            n_keys[nq] = j->pos0 + r + 1;
        }
    int64_t head = (int64_t)kvh * j->n_ctx * hd;
    kn_attn_heads(nq, q, o, n_keys, j->k_cache + head, j->v_cache + head, hd, hd,
                  1.0f / sqrtf((float)hd), sc, j->n_ctx);
    for (int i = 0; i < nq; i++) {
        const float *gate = q[i] + hd;
        for (int d = 0; d < hd; d++) o[i][d] *= sigmoidf(gate[d]);
    }
}

/* Work items go KV head by KV head, so a thread that takes several chunks
 * of one head finds its keys and values in cache after the first; chunks
 * are of equal size (a 9-token verify is 3+3+3 tokens, not 4+4+1), so the
 * threads' shares are too. */
static void attn_worker(void *ctx, int ith, int nth) {
    const AttnJob *j = ctx;
    int n_kv = j->c->n_kv_head, chunks = (j->n + j->rows - 1) / j->rows;
    int64_t lo, hi;
    pool_share((int64_t)chunks * n_kv, ith, nth, 1, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        int chunk = (int)(i % chunks), r0 = j->n * chunk / chunks, r1 = j->n * (chunk + 1) / chunks;
        attn_group(j, (int)(i / chunks), r0, r1, j->scores + (int64_t)ith * KN_ATTN_MAX_Q * j->n_ctx);
    }
}

/* Per row of s.k/s.v (and of q: [n][2*q_dim], query then gate per head,
 * unless NULL): q and k through their norms and RoPE at pos0 + row, k and
 * v into the cache. */
static void qkv_place(Engine *e, const Layer *L, float *k_cache, float *v_cache, float *q, int n, int pos0) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    int hd = c->head_dim, q_dim = c->n_head * hd, kv_dim = c->n_kv_head * hd;
    for (int r = 0; r < n; r++) {
        rope_at(s, c->n_rot, pos0 + r);
        for (int h = 0; q && h < c->n_head; h++) {
            float *qh = q + (int64_t)r * 2 * q_dim + (int64_t)h * 2 * hd;
            kn_rmsnorm(qh, qh, L->q_norm, hd, c->eps);
            rope(s, qh, c->n_rot);
        }
        for (int h = 0; h < c->n_kv_head; h++) {
            int64_t at = ((int64_t)h * e->st.n_ctx + pos0 + r) * hd;
            kn_rmsnorm(k_cache + at, s->k + (int64_t)r * kv_dim + h * hd, L->k_norm, hd, c->eps);
            rope(s, k_cache + at, c->n_rot);
            memcpy(v_cache + at, s->v + (int64_t)r * kv_dim + h * hd, hd * sizeof *v_cache);
        }
    }
}

/* x += attention(xn) for n tokens at pos0.., appending their K/V to the cache. */
static void attention(Engine *e, const Layer *L, float *k_cache, float *v_cache, int n, int pos0) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    matmul_set(e, s->xn, n, (Product[]){{&L->wq, s->proj}, {&L->wk, s->k}, {&L->wv, s->v}}, 3);
    qkv_place(e, L, k_cache, v_cache, s->proj, n, pos0);
    AttnJob job = {c, s->proj, k_cache, v_cache, s->mix, s->att, e->st.n_ctx, n, pos0, KN_ATTN_MAX_Q / (c->n_head / c->n_kv_head)};
    pool_run(&e->pool, attn_worker, &job);
    matmul(e, &L->wo, s->mix, n, s->out);
    add_rows(s->x, s->out, (int64_t)n * c->dim);
}

/* ---- Gated DeltaNet ---- */

typedef struct {
    const Config *c;
    float *ssm;                 /* [n_v_heads][k_head_dim][v_head_dim] the committed state */
    float *last;                /* NULL: the rows update ssm in place; else shaped as ssm, where a
                                 * speculative batch's heads evolve after its first row */
    int n;
    const float *qkv;           /* [n] rows qkv_stride apart: q, k, v after conv, SiLU and the q/k L2 norms */
    const float *decay, *beta;  /* [n] rows gate_stride apart: [n_v_heads] */
    int64_t qkv_stride, gate_stride;
    const float *z;             /* [n][n_v_heads*v_head_dim] output gate; NULL: a commit's replay, output unused */
    const float *norm;          /* [v_head_dim] the gated RMSNorm's weight */
    float *out;                 /* [n][n_v_heads*v_head_dim] */
} DeltaJob;

/* The job's rows on thread ith's share of the value heads, each head's
 * output then through the gated RMSNorm, norm(o) * w * silu(z). */
static void delta_worker(void *ctx, int ith, int nth) {
    const DeltaJob *j = ctx;
    const Config *c = j->c;
    int dk = c->k_head_dim, dv = c->v_head_dim, group = c->n_v_heads / c->n_k_heads;
    size_t head_floats = (size_t)dk * dv;
    int64_t lo, hi;
    pool_share(c->n_v_heads, ith, nth, 1, &lo, &hi);
    for (int h = (int)lo; h < hi; h++) {
        int kh = c->v_tiled ? h % c->n_k_heads : h / group;
        float *S = j->ssm + h * head_floats, *after = j->last ? j->last + h * head_floats : S;
        for (int r = 0; r < j->n; r++) {
            const float *row = j->qkv + r * j->qkv_stride;
            const float *q = row + kh * dk, *k = row + c->n_k_heads * dk + kh * dk;
            const float *v = row + 2 * c->n_k_heads * dk + h * dv;
            float *o = j->out + (int64_t)r * c->n_v_heads * dv + h * dv;
            kn_delta_step(r > 1 ? after : S, r > 0 ? after : S, q, k, v, j->decay[r * j->gate_stride + h],
                          j->beta[r * j->gate_stride + h], o, dk, dv);
            if (!j->z) continue;
            kn_rmsnorm(o, o, j->norm, dv, c->eps);
            kn_swiglu(o, j->z + (int64_t)r * c->n_v_heads * dv + h * dv, o, dv);
        }
    }
}

static void l2norm_scaled(float *v, int n, float scale) {
    float ss = kn_dot(v, v, n);
    kn_scale(v, scale / sqrtf(ss + 1e-6f), n);
}

/* Per value head of token r: decay = exp(ssm_a * softplus(alpha + dt_bias)), beta = sigmoid(beta). */
static void deltanet_gates(Engine *e, const Layer *L, int r) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    int nv = c->n_v_heads, group = nv / c->n_k_heads;
    for (int h = 0; h < nv; h++) {
        float a, b;
        if (c->arch == ARCH_QWEN3NEXT) {    /* per key-head group: [beta x group, alpha x group] */
            const float *g = s->ab + (int64_t)r * 2 * nv + (h / group) * 2 * group;
            b = g[h % group];
            a = g[group + h % group];
        } else {
            a = s->ab[(int64_t)r * 2 * nv + h];
            b = s->ab[(int64_t)r * 2 * nv + nv + h];
        }
        s->decay[r * nv + h] = expf(L->ssm_a[h] * softplusf(a + L->dt_bias[h]));
        s->beta[r * nv + h] = sigmoidf(b);
    }
}

typedef struct { Engine *e; const Layer *L; int layer, n, spec; } DeltaRowsJob;

/* Token r of a batch, from its projections to the DeltaNet's inputs:
 * depthwise causal conv over its window of the layer's conv rows (the
 * committed window, then the batch), SiLU, the q/k L2 norms and the gates;
 * a speculative token after the first also records those inputs for a
 * commit to replay.  Tokens are independent here, so a batch's share out
 * over the threads: run on the main thread alone between pool jobs, this
 * was ~6% of a 4-token verify. */
static void deltanet_row(const DeltaRowsJob *j, int r) {
    Engine *e = j->e;
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    State *st = &e->st;
    int C = c->conv_dim, dk = c->k_head_dim, nv = c->n_v_heads;
    float *y = s->proj + (int64_t)r * C;
    kn_causal_conv(y, conv_window(st, c, j->layer) + (int64_t)r * C, j->L->conv_taps, c->conv_kernel, C);
    kn_swiglu(y, y, NULL, C);
    for (int h = 0; h < c->n_k_heads; h++) {
        l2norm_scaled(y + h * dk, dk, 1.0f / sqrtf((float)dk));
        l2norm_scaled(y + (c->n_k_heads + h) * dk, dk, 1.0f);
    }
    deltanet_gates(e, j->L, r);
    if (j->spec && r > 0) {
        float *rec = st->spec_rows[j->layer] + (r - 1) * spec_row_floats(c);
        memcpy(rec, y, C * sizeof(float));
        memcpy(rec + C, s->decay + r * nv, nv * sizeof(float));
        memcpy(rec + C + nv, s->beta + r * nv, nv * sizeof(float));
    }
}

static void deltanet_rows_worker(void *ctx, int ith, int nth) {
    for (int r = ith; r < ((const DeltaRowsJob *)ctx)->n; r += nth) deltanet_row(ctx, r);
}

/* The batch's DeltaNet inputs: its conv inputs after the committed window,
 * then each token on its own (one token stays on this thread: a pool job
 * would only add its synchronisation). */
static void deltanet_inputs(Engine *e, const Layer *L, int layer, int n, int spec) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    memcpy(conv_window(&e->st, c, layer) + conv_window_floats(c), s->proj, (size_t)n * c->conv_dim * sizeof(float));
    DeltaRowsJob job = {e, L, layer, n, spec};
    if (n > 1) pool_run(&e->pool, deltanet_rows_worker, &job);
    else deltanet_rows_worker(&job, 0, 1);
}

static void deltanet(Engine *e, const Layer *L, int layer, int n, int spec) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    int nv = c->n_v_heads;
    if (c->arch == ARCH_QWEN3NEXT) {
        matmul_set(e, s->xn, n, (Product[]){{&L->qkv, s->proj}, {&L->z, s->gate}, {&L->ba, s->ab}}, 3);
    } else {    /* alpha then beta into one [n][2*nv] block */
        matmul_set(e, s->xn, n, (Product[]){{&L->qkv, s->proj}, {&L->z, s->gate}, {&L->alpha, s->out}, {&L->beta, s->out + (int64_t)n * nv}}, 4);
        for (int r = 0; r < n; r++) {
            memcpy(s->ab + (int64_t)r * 2 * nv, s->out + (int64_t)r * nv, nv * sizeof(float));
            memcpy(s->ab + (int64_t)r * 2 * nv + nv, s->out + (int64_t)n * nv + (int64_t)r * nv, nv * sizeof(float));
        }
    }
    deltanet_inputs(e, L, layer, n, spec);
    DeltaJob job = {c, e->st.ssm[layer], spec ? e->st.ssm_last[layer] : NULL, n, s->proj, s->decay, s->beta, c->conv_dim, nv, s->gate, L->ssm_norm, s->mix};
    pool_run(&e->pool, delta_worker, &job);
    matmul(e, &L->ssm_out, s->mix, n, s->out);
    add_rows(s->x, s->out, (int64_t)n * c->dim);
}

/* ---- feed-forward ---- */

/* out[n][dim] = down(silu(gate xn) * up xn) */
static void swiglu_ffn(Engine *e, const Mat *gate, const Mat *up, const Mat *down, const float *xin, int n, float *out) {
    Scratch *s = &e->s;
    matmul_job(e, xin, n, (Product[]){{gate, s->ffn_a}, {up, s->ffn_b}}, 2, 1);
    matmul(e, down, s->ffn_a, n, out);
}

static Mat mat_rows(const Mat *m, int64_t first, int64_t count) {
    return (Mat){m->type, (const uint8_t *)m->data + first * m->row_bytes, m->n_in, count, m->row_bytes};
}

/* Softmax router, top-k experts per token, weights renormalised over the chosen ones. */
static void moe_route(Engine *e, const Layer *L, int n) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    int E = c->n_expert;
    matmul(e, &L->router, s->xn, n, s->ab);
    memset(s->moe_w, 0, (size_t)n * E * sizeof(float));
    for (int r = 0; r < n; r++) {
        float *lg = s->ab + (int64_t)r * E, mx = -INFINITY, sum = 0, chosen = 0;
        for (int x = 0; x < E; x++) mx = lg[x] > mx ? lg[x] : mx;
        for (int x = 0; x < E; x++) sum += lg[x] = expf(lg[x] - mx);
        for (int k = 0; k < c->n_expert_used; k++) {
            int best = -1;
            for (int x = 0; x < E; x++)
                if (s->moe_w[r * E + x] == 0 && (best < 0 || lg[x] > lg[best])) best = x;
            s->moe_w[r * E + best] = lg[best] / sum;
            chosen += lg[best] / sum;
        }
        for (int x = 0; x < E; x++) s->moe_w[r * E + x] /= chosen;
    }
}

/* Each expert's weights are read once for all the batch rows routed to it;
 * a row sums its experts in expert order whatever the batch, so routing and
 * results don't depend on what else is in the batch. */
static void moe_ffn(Engine *e, const Layer *L, int n) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    int E = c->n_expert, F = c->expert_ffn_dim, D = c->dim;
    moe_route(e, L, n);
    memset(s->out, 0, (size_t)n * D * sizeof(float));
    for (int x = 0; x < E; x++) {
        int m = 0;
        for (int r = 0; r < n; r++)
            if (s->moe_w[r * E + x] > 0) {
                s->moe_rows[m] = r;
                memcpy(s->moe_x + (int64_t)m++ * D, s->xn + (int64_t)r * D, D * sizeof(float));
            }
        if (!m) continue;
        Mat g = mat_rows(&L->exp_gate, x * L->exp_stride, F), u = mat_rows(&L->exp_up, x * L->exp_stride + L->exp_up_at, F);
        Mat d = mat_rows(&L->exp_down, (int64_t)x * D, D);
        swiglu_ffn(e, &g, &u, &d, s->moe_x, m, s->moe_y);
        for (int i = 0; i < m; i++) kn_axpy(s->out + (int64_t)s->moe_rows[i] * D, s->moe_w[s->moe_rows[i] * E + x], s->moe_y + (int64_t)i * D, D);
    }
    if (c->shared_ffn_dim) {
        swiglu_ffn(e, &L->sh_gate, &L->sh_up, &L->sh_down, s->xn, n, s->moe_y);
        matmul(e, &L->sh_router, s->xn, n, s->moe_x);
        for (int r = 0; r < n; r++) kn_axpy(s->out + (int64_t)r * D, sigmoidf(s->moe_x[r]), s->moe_y + (int64_t)r * D, D);
    }
}

static void ffn(Engine *e, const Layer *L, int n) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    if (c->arch == ARCH_QWEN35)
        swiglu_ffn(e, &L->ffn_gate, &L->ffn_up, &L->ffn_down, s->xn, n, s->out);
    else
        moe_ffn(e, L, n);
    add_rows(s->x, s->out, (int64_t)n * c->dim);
}

/* One decoder block on s->x: mixer (DeltaNet or attention) then FFN, each pre-normed with a residual. */
static void block(Engine *e, const Layer *L, int layer, int recurrent, float *k_cache, float *v_cache, int n, int pos0, int spec) {
    const Config *c = &e->model->cfg;
    Scratch *s = &e->s;
    rmsnorm_rows(s->xn, s->x, L->attn_norm, n, c->dim, c->eps);
    if (recurrent)
        deltanet(e, L, layer, n, spec);
    else
        attention(e, L, k_cache, v_cache, n, pos0);
    rmsnorm_rows(s->xn, s->x, L->post_norm, n, c->dim, c->eps);
    ffn(e, L, n);
}

static void embed(Engine *e, const int32_t *tokens, int n, float *out) {
    const Mat *te = &e->model->w.token_embd;
    for (int r = 0; r < n; r++)
        kn_get_row(te->type, te->data, te->row_bytes, tokens[r], out + (int64_t)r * te->n_in, te->n_in);
}

/* Room in every recurrent layer's conv rows for n more after the committed
 * window: when the rows run out, the window moves back to row 0 (one copy
 * of conv_kernel-1 rows every ~UBATCH tokens, where each token used to
 * copy its whole window into a slot). */
static void conv_make_room(State *st, const Config *c, int n) {
    if (st->conv_at + n <= UBATCH) return;
    for (int l = 0; l < c->n_layer; l++)
        if (c->recurrent[l]) memmove(st->conv[l], conv_window(st, c, l), conv_window_floats(c) * sizeof(float));
    st->conv_at = 0;
}

/* Logits over the first n_vocab tokens for n rows of normed hidden state. */
static void lm_head(Engine *e, const Mat *out, const float *hidden, int n, float *logits, int n_vocab) {
    if (n_vocab > out->n_out) die("internal: logits of %d tokens asked of a head of %lld", n_vocab, (long long)out->n_out);
    Mat head = mat_rows(out, 0, n_vocab);
    matmul(e, &head, hidden, n, logits);
}

/* Run n <= UBATCH tokens at positions n_past...  Leaves s.hidden[n][dim]
 * (after the final norm) and the logits asked for (LOGITS_LAST: the last row,
 * in s.logits row 0).  Without spec the tokens are committed; with spec the
 * caller keeps a prefix with state_commit(). */
static void forward(Engine *e, const int32_t *tokens, int n, int spec, int logits) {
    const Model *m = e->model;
    const Config *c = &m->cfg;
    Scratch *s = &e->s;
    State *st = &e->st;
    int pos0 = st->n_past;
    conv_make_room(st, c, n);
    embed(e, tokens, n, s->x);
    for (int l = 0; l < c->n_layer; l++)
        block(e, &m->w.layers[l], l, c->recurrent[l], st->k_cache[l], st->v_cache[l], n, pos0, spec);
    rmsnorm_rows(s->hidden, s->x, m->w.output_norm, n, c->dim, c->eps);
    if (logits == LOGITS_ALL)
        lm_head(e, &m->w.output, s->hidden, n, s->logits, c->n_vocab);
    else if (logits == LOGITS_LAST)
        lm_head(e, &m->w.output, s->hidden + (int64_t)(n - 1) * c->dim, 1, s->logits, c->n_vocab);
    if (!spec) {
        st->n_past += n;
        st->conv_at += n;
    }
    st->spec_n = spec ? n : 0;
}

typedef struct { Engine *e; int n_replay; } CommitJob;

/* Every recurrent layer's replay in one pool job: one synchronisation per
 * commit, not one per layer.  The outputs land in scratch, unused. */
static void commit_worker(void *ctx, int ith, int nth) {
    const CommitJob *cj = ctx;
    const Config *c = &cj->e->model->cfg;
    State *st = &cj->e->st;
    int64_t row = (int64_t)spec_row_floats(c);
    for (int l = 0; l < c->n_layer; l++) {
        if (!c->recurrent[l]) continue;
        const float *rows = st->spec_rows[l];
        DeltaJob job = {c, st->ssm[l], NULL, cj->n_replay, rows, rows + c->conv_dim, rows + c->conv_dim + c->n_v_heads,
                        row, row, NULL, NULL, cj->e->s.mix};
        delta_worker(&job, ith, nth);
    }
}

/* Keep the first n_keep >= 1 tokens of the speculative batch forward() just
 * ran: their conv inputs are in the rows already, the first token's recurrent
 * update is in the state, and the others' are replayed from the recorded
 * inputs, unless the whole batch is kept: then the state after its last
 * token is there to take (a pointer swap per layer). */
static void state_commit(Engine *e, int n_keep) {
    const Config *c = &e->model->cfg;
    State *st = &e->st;
    CommitJob job = {e, n_keep - 1};
    if (n_keep > 1 && n_keep == st->spec_n)
        for (int l = 0; l < c->n_layer; l++) {
            float *kept = st->ssm_last[l];
            st->ssm_last[l] = st->ssm[l];
            st->ssm[l] = kept;
        }
    else if (job.n_replay > 0)
        pool_run(&e->pool, commit_worker, &job);
    st->n_past += n_keep;
    st->conv_at += n_keep;
}

/* ==== MTP head ====
 * blk.{n_layer}: x = eh_proj · [RMSNorm(embed(t_next), enorm), RMSNorm(h, hnorm)],
 * one gated-attention decoder block with its own KV cache, shared_head_norm,
 * and the main model's LM head.  h is the main model's hidden state after
 * output_norm at the position that produced t_next, and the row runs at that
 * position.  Chained drafts feed the head its own normed output as h.
 * Teacher-forced rows for every accepted position keep its cache in step
 * with the main model's; rows written by chained drafts are overwritten by
 * the next call, since every call truncates the cache to its first position.
 *
 * Drafts may score only the first n_vocab tokens (--draft-vocab): BPE ids
 * follow merge order, so the first tens of thousands cover most of the text,
 * and the LM head of a 248k vocabulary is otherwise most of a draft's cost.
 * The default, the first half up to 32768, also holds for the built-in
 * model's 4096 tokens: its head is a third of a draft there, and K = 1
 * acceptance on the held-out prompts stayed 953/1080 (954/1079 with all).
 * A token outside the subset is simply never drafted; verification keeps the
 * output exact either way. */

/* Rows i < n: hidden h[i] and token toks[i] at position pos0+i.  Only the
 * rows whose output is asked for run the whole block (all with LOGITS_ALL,
 * the last with LOGITS_LAST); the others, the teacher-forced rows of a
 * catch-up, only need their K/V in the head's cache, which saves their
 * attention and feed-forward.  Leaves the computed rows' normed output in
 * s.hidden and their logits over n_vocab tokens in s.logits, from row 0. */
static void mtp_forward(Engine *e, const float *h, const int32_t *toks, int n, int pos0, int logits, int n_vocab) {
    const Model *m = e->model;
    const Config *c = &m->cfg;
    const MtpHead *head = &m->w.mtp;
    Scratch *s = &e->s;
    int D = c->dim;
    embed(e, toks, n, s->out);
    for (int r = 0; r < n; r++) {
        float *in = s->mtp_in + (int64_t)r * 2 * D;
        kn_rmsnorm(in, s->out + (int64_t)r * D, head->enorm, D, c->eps);
        kn_rmsnorm(in + D, h + (int64_t)r * D, head->hnorm, D, c->eps);
    }
    matmul(e, &head->eh_proj, s->mtp_in, n, s->x);
    int n_full = logits == LOGITS_ALL ? n : logits == LOGITS_LAST, n_kv = n - n_full;
    if (n_kv) {
        rmsnorm_rows(s->xn, s->x, head->block.attn_norm, n_kv, D, c->eps);
        matmul_set(e, s->xn, n_kv, (Product[]){{&head->block.wk, s->k}, {&head->block.wv, s->v}}, 2);
        qkv_place(e, &head->block, e->st.mtp_k, e->st.mtp_v, NULL, n_kv, pos0);
    }
    if (!n_full) return;
    memmove(s->x, s->x + (int64_t)n_kv * D, (size_t)n_full * D * sizeof(float));
    block(e, &head->block, -1, 0, e->st.mtp_k, e->st.mtp_v, n_full, pos0 + n_kv, 0);
    rmsnorm_rows(s->hidden, s->x, head->head_norm, n_full, D, c->eps);
    lm_head(e, &head->draft_out, s->hidden, n_full, s->logits, n_vocab);
}

/* ---- the draft copy ----
 * A draft only has to guess well: verification keeps the output exact
 * whatever weights the head drafts with.  When the file stores the head
 * wider than Q4_K's 4.5 bits a weight (q8_0, f16, ...), drafts run on a Q4_K
 * copy made at start, which reads half the bytes or less per draft: its
 * scales come from each sub-block's range (no error search: that took
 * ~0.5 s of a 35 ms start and guessed no better).  On the built-in q8_0
 * model, K = 1 acceptance on the held-out prompts was 963/1074 (960/1077
 * with the head as stored), and --draft-max 4 ran ~10% faster (README.md,
 * Speed).  --draft-exact keeps the file's weights, as --mtp-logits-out does
 * (its logits are checked against the reference). */

typedef struct { const Mat *src; uint8_t *dst; /* [src->n_out][kn_row_bytes(KN_Q4_K, n_in)] */ } QuantJob;

static void quantize_rows_worker(void *ctx, int ith, int nth) {
    const QuantJob *j = ctx;
    const Mat *w = j->src;
    size_t rb = kn_row_bytes(KN_Q4_K, w->n_in);
    float *row = xmalloc((size_t)w->n_in * sizeof(float));
    int64_t lo, hi;
    pool_share(w->n_out, ith, nth, 1, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        kn_get_row(w->type, w->data, w->row_bytes, i, row, w->n_in);
        quant_k_affine(row, j->dst + i * rb, w->n_in, 4, 0);
    }
    free(row);
}

static int draft_copy_worth(const Mat *w) {
    return w->data && w->n_in % kn_block_elems(KN_Q4_K) == 0 && kn_row_bytes(KN_Q4_K, w->n_in) < w->row_bytes;
}

/* *w replaced by its packed Q4_K copy at *at (advanced); the old bytes go
 * back to the system when they were a placed copy of the head's own. */
static void draft_copy_mat(Engine *e, Mat *w, uint8_t **at, int release) {
    const Model *m = e->model;
    size_t rb = kn_row_bytes(KN_Q4_K, w->n_in), bytes = kn_pack_bytes(KN_Q4_K, w->n_out, w->n_in);
    QuantJob job = {w, xmalloc(rb * (size_t)w->n_out)};
    pool_run(&e->pool, quantize_rows_worker, &job);
    kn_pack(KN_Q4_K, job.dst, rb, w->n_out, w->n_in, *at);
    free(job.dst);
    if (release && m->placed && (const uint8_t *)w->data >= m->placed && (const uint8_t *)w->data < m->placed + m->placed_size)
        pages_advise(w->data, (size_t)w->n_out * w->row_bytes, MADV_DONTNEED);
    *w = (Mat){kn_pack_type(KN_Q4_K), *at, w->n_in, w->n_out, rb};
    *at += (bytes + 63) / 64 * 64;
}

/* The matrices a draft reads, the candidates for the copy: the block's
 * dense ones, eh_proj, and the drafts' LM head (last). */
#define DRAFT_MATS (MATS_PER_LAYER + 2)

static int draft_mats(MtpHead *head, Mat **out) {
    int n = layer_mats(&head->block, out);
    out[n++] = &head->eh_proj;
    out[n++] = &head->draft_out;
    return n;
}

/* From here on drafts score the first draft_vocab tokens, with 4-bit copies
 * of the head's dense matrices and of those LM head rows where the copy is
 * smaller than the file's.  Returns the copies' bytes. */
static size_t draft_copy_make(Engine *e, int draft_vocab) {
    Model *m = e->model;
    MtpHead *head = &m->w.mtp;
    Mat *mats[DRAFT_MATS];
    head->draft_out = mat_rows(&m->w.output, 0, draft_vocab);
    int n = draft_mats(head, mats);
    size_t total = 0;
    for (int i = 0; i < n; i++)
        if (draft_copy_worth(mats[i])) total += (kn_pack_bytes(KN_Q4_K, mats[i]->n_out, mats[i]->n_in) + 63) / 64 * 64;
    if (!total) return 0;
    uint8_t *at = m->draft_copy = acalloc(total, 1);
    for (int i = 0; i < n; i++)
        if (draft_copy_worth(mats[i])) draft_copy_mat(e, mats[i], &at, mats[i] != &head->draft_out);
    return total;
}

/* ==== Sampler ====
 * Logits become a sparse distribution: repetition penalty over the recent
 * tokens, temperature, top-k (a bounded heap, no full sort of a 248k
 * vocabulary), min-p (a cut on the logits, before any exp), top-p over the
 * sorted survivors.  Temperature 0 is greedy: a one-hot distribution at the
 * argmax (lowest id on ties).  The speculative acceptance rule below works on
 * these distributions, so drafts and targets see exactly the same transforms. */

typedef struct {
    float temp, top_p, min_p, rep_penalty;
    int top_k, rep_last_n;
    uint64_t rng;
} SamplerCfg;

typedef struct {
    int n;                      /* candidates, most probable first */
    int32_t *ids;               /* [n_vocab] capacity */
    float *p;                   /* [n_vocab] probabilities summing to 1 */
} Dist;

typedef struct {
    SamplerCfg cfg;
    int n_vocab;
    float *work;                /* [n_vocab] transformed logits */
    float *dense;               /* [n_vocab] zero except while a rule runs */
    uint8_t *seen;              /* [n_vocab] penalty bookkeeping */
} Sampler;

static void sampler_init(Sampler *s, const SamplerCfg *cfg, int n_vocab) {
    s->cfg = *cfg;
    s->n_vocab = n_vocab;
    s->work = xcalloc(n_vocab, sizeof(float));
    s->dense = xcalloc(n_vocab, sizeof(float));
    s->seen = xcalloc(n_vocab, 1);
}

static void sampler_free(Sampler *s) {
    free(s->work);
    free(s->dense);
    free(s->seen);
}

static void dist_init(Dist *d, int n_vocab) {
    d->n = 0;
    d->ids = xcalloc(n_vocab, sizeof *d->ids);
    d->p = xcalloc(n_vocab, sizeof *d->p);
}

static void dist_free(Dist *d) {
    free(d->ids);
    free(d->p);
}

/* xorshift64*: small, fast, and reproducible across platforms for --seed */
static float rng_uniform(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (float)((x * 0x2545F4914F6CDD1DULL) >> 40) / (float)(1 << 24);
}

/* Penalise tokens that appeared in the last rep_last_n of hist (llama.cpp's rule:
 * positive logits are divided, negative ones multiplied). */
static void apply_penalty(Sampler *s, float *lg, int V, const int32_t *hist, int n_hist) {
    const SamplerCfg *c = &s->cfg;
    int from = c->rep_last_n > 0 && n_hist > c->rep_last_n ? n_hist - c->rep_last_n : 0;
    for (int i = from; i < n_hist; i++) {
        int32_t t = hist[i];
        if (t >= V || s->seen[t]) continue;
        s->seen[t] = 1;
        lg[t] = lg[t] > 0 ? lg[t] / c->rep_penalty : lg[t] * c->rep_penalty;
    }
    for (int i = from; i < n_hist; i++)
        if (hist[i] < V) s->seen[hist[i]] = 0;
}

/* Min-heap of candidate ids keyed by logit: keeps the k largest. */
static void heap_sift(int32_t *heap, int n, const float *lg, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && lg[heap[l]] < lg[heap[m]]) m = l;
        if (r < n && lg[heap[r]] < lg[heap[m]]) m = r;
        if (m == i) return;
        int32_t t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
}

static const float *g_sort_p;
static int cmp_prob_desc(const void *a, const void *b) {
    float pa = g_sort_p[*(const int32_t *)a], pb = g_sort_p[*(const int32_t *)b];
    if (pa != pb) return pa < pb ? 1 : -1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

/* Logits of the first V tokens (not modified) -> distribution d, with
 * hist[0..n_hist) the sequence so far. */
static void sampler_dist(Sampler *s, const float *logits, int V, const int32_t *hist, int n_hist, Dist *d) {
    const SamplerCfg *c = &s->cfg;
    float *lg = s->work;
    const float *src = logits;          /* greedy without a penalty copies nothing */
    if (c->rep_penalty != 1.0f && c->rep_last_n != 0) {
        memcpy(lg, logits, (size_t)V * sizeof *lg);
        apply_penalty(s, lg, V, hist, n_hist);
        src = lg;
    }
    if (c->temp <= 0) {
        d->n = 1;
        d->ids[0] = (int32_t)kn_argmax(src, V);
        d->p[0] = 1;
        return;
    }
    if (src != lg) memcpy(lg, logits, (size_t)V * sizeof *lg);
    float mx = lg[kn_argmax(lg, V)];
    float cut = c->min_p > 0 ? mx + c->temp * logf(c->min_p) : -INFINITY;  /* p >= min_p * p_max */
    int k = c->top_k > 0 && c->top_k < V ? c->top_k : V, n = 0;
    for (int i = 0; i < V; i++) {
        if (lg[i] < cut) continue;
        if (n < k) {
            d->ids[n++] = i;
            if (n == k)
                for (int j = k / 2 - 1; j >= 0; j--) heap_sift(d->ids, k, lg, j);
        } else if (lg[i] > lg[d->ids[0]]) {
            d->ids[0] = i;
            heap_sift(d->ids, k, lg, 0);
        }
    }
    double sum = 0;
    for (int i = 0; i < n; i++) sum += lg[d->ids[i]] = expf((lg[d->ids[i]] - mx) / c->temp);
    for (int i = 0; i < n; i++) lg[d->ids[i]] = (float)(lg[d->ids[i]] / sum);
    g_sort_p = lg;
    qsort(d->ids, n, sizeof *d->ids, cmp_prob_desc);
    double keep = 0;
    int m = 0;
    while (m < n && (m == 0 || keep < c->top_p)) keep += lg[d->ids[m++]];
    for (int i = 0; i < m; i++) d->p[i] = (float)(lg[d->ids[i]] / keep);
    d->n = m;
}

static int32_t dist_sample(const Dist *d, uint64_t *rng) {
    if (d->n == 1) return d->ids[0];
    float u = rng_uniform(rng), acc = 0;
    for (int i = 0; i < d->n; i++)
        if (u < (acc += d->p[i])) return d->ids[i];
    return d->ids[d->n - 1];
}

static float dist_prob(const Dist *d, int32_t id) {
    for (int i = 0; i < d->n; i++)
        if (d->ids[i] == id) return d->p[i];
    return 0;
}

/* Lossless speculative sampling (Leviathan et al., Chen et al.): a draft
 * drawn from q is kept with probability min(1, p(d)/q(d)); otherwise the
 * replacement is drawn from normalize(max(0, p - q)).  The emitted token is
 * then distributed exactly as p.  Returns 1 when the draft is kept, else 0
 * with the replacement in *out.  Greedy (one-hot p and q) reduces to
 * "keep the draft iff it is the argmax". */
static int spec_accept(Sampler *s, const Dist *p, const Dist *q, int32_t draft, int32_t *out) {
    float pd = dist_prob(p, draft), qd = dist_prob(q, draft);
    if (qd > 0 && pd >= qd) return 1;
    if (qd > 0 && pd > 0 && rng_uniform(&s->cfg.rng) * qd < pd) return 1;
    for (int i = 0; i < q->n; i++) s->dense[q->ids[i]] = q->p[i];
    double total = 0;
    for (int i = 0; i < p->n; i++) {
        float r = p->p[i] - s->dense[p->ids[i]];
        total += r > 0 ? r : 0;
    }
    *out = p->ids[0];
    if (total > 0) {
        double u = rng_uniform(&s->cfg.rng) * total, acc = 0;
        for (int i = 0; i < p->n; i++) {
            float r = p->p[i] - s->dense[p->ids[i]];
            if (r > 0 && u < (acc += r)) {
                *out = p->ids[i];
                break;
            }
        }
    }
    for (int i = 0; i < q->n; i++) s->dense[q->ids[i]] = 0;
    return 0;
}

/* ==== Tokenizer ====
 * Byte-level BPE as Hugging Face tokenizers runs it for Qwen3 / Qwen3.5 (the ground truth):
 *   1. special tokens (<|im_start|>, <think>, ...) are cut out of the raw text, longest first;
 *   2. each stretch between them is NFC-normalised on its own;
 *   3. Qwen's split regex, matched by hand, cuts it into pieces;
 *   4. each piece's bytes become byte-level symbols, merged pairwise by merge rank.
 * The input need not be valid UTF-8: an invalid byte is a character of its own that belongs to no
 * Unicode class and composes with nothing, and it still maps to its byte-level token, so decoding the
 * ids gives back exactly the bytes that went in (after NFC). */
#include "tools/unicode_tables.h"

typedef struct { const char *s; uint32_t n; } TokStr;   /* a string from the GGUF file, not NUL-terminated */

enum { TOK_NORMAL = 1, TOK_CONTROL = 3, TOK_USER = 4 };  /* the tokenizer.ggml.token_type values that matter */

typedef struct { int32_t left, right, rank, merged; } TokMerge;   /* rank < 0: empty slot */
typedef struct { int32_t id; uint32_t len; } TokSpecial;

typedef struct Tokenizer {
    int n_vocab;
    int nfc;                /* normalise to NFC first: tok_init sets it, since every Qwen3/3.5 GGUF
                               declares tokenizer.ggml.normalizer.nfc; clear it for one that does not */
    int marks_are_letters;  /* qwen35: \p{M} joins \p{L} in the split regex */
    int max_piece;          /* longest decoded token, in bytes */
    uint8_t *type;          /* token_type per id */
    char *text;             /* the token strings as the file spells them, back to back */
    uint32_t *text_at;      /* n_vocab + 1 offsets into text */
    char *bytes;            /* what each token decodes to */
    uint32_t *bytes_at;     /* n_vocab + 1 offsets into bytes */
    int32_t *vocab_slot;    /* open-addressing hash of token text -> id; -1 = empty */
    uint32_t vocab_mask;
    TokMerge *merge_slot;   /* open-addressing hash of (left id, right id) -> rank and merged id */
    uint32_t merge_mask;
    int32_t byte_token[256];        /* the token of each byte's byte-level character */
    TokSpecial *special;            /* control and user-defined tokens, longest first */
    int n_special;
    uint8_t special_first[2][32];   /* bytes a special can start with: [0] user-defined only, [1] all */
    uint8_t *bmp_info;              /* char_info() of every BMP code point, precomputed */
} Tokenizer;

/* ==== Tokenizer: Unicode ==== */

/* How the split regex sees a character. \s is the White_Space property, as in the Oniguruma engine
 * HF tokenizers uses; \r and \n get their own kind because the regex names them. CH_NFC_STABLE marks a
 * starter with NFC_Quick_Check=Yes: nothing after it can combine with anything before it. */
enum { CH_END, CH_OTHER, CH_LETTER, CH_NUMBER, CH_SPACE, CH_NEWLINE, CH_KIND = 7, CH_NFC_STABLE = 8 };

/* An invalid byte b decodes to the pseudo code point TOK_INVALID + b, above Unicode's range. */
#define TOK_INVALID 0x110000u

enum { HANGUL_S = 0xAC00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11A7,
       HANGUL_LN = 19, HANGUL_VN = 21, HANGUL_TN = 28, HANGUL_SN = HANGUL_LN * HANGUL_VN * HANGUL_TN };

static int uc_range_cmp(const void *key, const void *elem) {
    uint32_t cp = *(const uint32_t *)key;
    const UcRange *r = elem;
    return cp < r->lo ? -1 : cp > r->hi;
}

static uint32_t uc_lookup(const UcRange *table, size_t n, uint32_t cp) {
    const UcRange *r = bsearch(&cp, table, n, sizeof *table, uc_range_cmp);
    return r ? r->value : 0;
}

static uint32_t combining_class(uint32_t cp) {
    return cp < 0x300 ? 0 : uc_lookup(uc_ccc, sizeof uc_ccc / sizeof *uc_ccc, cp);
}

static int uc_decomp_cmp(const void *key, const void *elem) {
    uint32_t cp = *(const uint32_t *)key, at = ((const UcDecomp *)elem)->cp;
    return (cp > at) - (cp < at);
}

static int uc_comp_cmp(const void *key, const void *elem) {
    const uint32_t *pair = key;
    const UcComp *c = elem;
    if (pair[0] != c->first) return pair[0] < c->first ? -1 : 1;
    return (pair[1] > c->second) - (pair[1] < c->second);
}

static uint8_t char_info_lookup(uint32_t cp, int marks_are_letters) {
    if (cp >= TOK_INVALID) return CH_OTHER | CH_NFC_STABLE;
    uint8_t kind = CH_OTHER;
    switch (uc_lookup(uc_class, sizeof uc_class / sizeof *uc_class, cp)) {
    case UC_LETTER: kind = CH_LETTER; break;
    case UC_MARK:   kind = marks_are_letters ? CH_LETTER : CH_OTHER; break;
    case UC_NUMBER: kind = CH_NUMBER; break;
    case UC_SPACE:  kind = cp == '\r' || cp == '\n' ? CH_NEWLINE : CH_SPACE; break;
    }
    if (!combining_class(cp) && !uc_lookup(uc_nfc_qc, sizeof uc_nfc_qc / sizeof *uc_nfc_qc, cp)) kind |= CH_NFC_STABLE;
    return kind;
}

static uint8_t char_info(const Tokenizer *t, uint32_t cp) {
    return cp < 0x10000 ? t->bmp_info[cp] : char_info_lookup(cp, t->marks_are_letters);
}

/* Length of the well-formed UTF-8 prefix at s[0..n), at most one character (Unicode table 3-7);
 * *need gets the length the lead byte announces, 0 if s[0] cannot start a character. */
static size_t utf8_prefix(const unsigned char *s, size_t n, size_t *need) {
    unsigned char b = s[0], lo = 0x80, hi = 0xBF;
    if (b < 0x80) return *need = 1;
    if (b < 0xC2 || b > 0xF4) return *need = 0;
    *need = b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;     /* no surrogates */
    if (b == 0xF0) lo = 0x90;     /* no overlong 4-byte forms */
    if (b == 0xF4) hi = 0x8F;     /* nothing above U+10FFFF */
    if (n < 2 || s[1] < lo || s[1] > hi) return 1;
    size_t k = 2;
    while (k < *need && k < n && (s[k] & 0xC0) == 0x80) k++;
    return k;
}

/* The character at s[0..n), n >= 1, and its length in *len. */
static uint32_t utf8_decode(const unsigned char *s, size_t n, size_t *len) {
    static const unsigned char lead_bits[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
    size_t need, k = utf8_prefix(s, n, &need);
    if (need == 0 || k < need) {
        *len = 1;
        return TOK_INVALID + s[0];
    }
    uint32_t cp = s[0] & lead_bits[need];
    for (size_t i = 1; i < need; i++) cp = cp << 6 | (s[i] & 0x3F);
    *len = need;
    return cp;
}

static size_t utf8_encode(uint32_t cp, char *out) {
    if (cp >= TOK_INVALID) { out[0] = (char)(cp - TOK_INVALID); return 1; }
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ==== Tokenizer: scratch buffers of one tok_encode call ==== */

typedef struct { int32_t id, prev, next; } BpeSym;               /* id -1: merged into its left */
typedef struct { int32_t rank, pos; const TokMerge *merge; } BpeCand;

typedef struct {
    int32_t *ids;   size_t n_ids, ids_cap;
    char *norm;     size_t n_norm, norm_cap;   /* NFC of the current stretch of text */
    uint32_t *seq;  size_t n_seq, seq_cap;     /* decomposed characters awaiting composition */
    uint32_t *seq_tmp;                         /* merge-sort buffer, seq_cap long */
    BpeSym *sym;    size_t sym_cap;
    BpeCand *heap;                             /* 3 * sym_cap long: m-1 pairs + 2 per merge */
    struct TokCacheSlot *cache;                /* merged pieces, for long texts only */
} TokWork;

/* Room for need elements of elem bytes in buf, which holds *cap; the new buffer, or NULL when out of
 * memory (buf is then still valid). */
static void *tok_grow(void *buf, size_t *cap, size_t need, size_t elem) {
    if (buf && need <= *cap) return buf;
    size_t n = *cap ? *cap : 256;
    while (n < need) n *= 2;
    void *p = realloc(buf, n * elem);
    if (p) *cap = n;
    return p;
}

static int ids_push(TokWork *w, int32_t id) {
    int32_t *p = tok_grow(w->ids, &w->ids_cap, w->n_ids + 1, sizeof *p);
    if (!p) return -1;
    w->ids = p;
    w->ids[w->n_ids++] = id;
    return 0;
}

static int norm_reserve(TokWork *w, size_t extra) {
    char *p = tok_grow(w->norm, &w->norm_cap, w->n_norm + extra, 1);
    if (!p) return -1;
    w->norm = p;
    return 0;
}

static int seq_push(TokWork *w, uint32_t packed) {
    size_t cap = w->seq_cap;
    uint32_t *p = tok_grow(w->seq, &cap, w->n_seq + 1, sizeof *p);
    if (!p) return -1;
    w->seq = p;
    if (cap != w->seq_cap) {
        uint32_t *tmp = realloc(w->seq_tmp, cap * sizeof *tmp);
        if (!tmp) return -1;
        w->seq_tmp = tmp;
        w->seq_cap = cap;
    }
    w->seq[w->n_seq++] = packed;
    return 0;
}

static int sym_reserve(TokWork *w, size_t n) {
    size_t cap = w->sym_cap;
    BpeSym *p = tok_grow(w->sym, &cap, n, sizeof *p);
    if (!p) return -1;
    w->sym = p;
    if (cap != w->sym_cap) {
        BpeCand *heap = realloc(w->heap, 3 * cap * sizeof *heap);
        if (!heap) return -1;
        w->heap = heap;
        w->sym_cap = cap;
    }
    return 0;
}

static void work_free(TokWork *w) {
    free(w->norm);
    free(w->seq);
    free(w->seq_tmp);
    free(w->sym);
    free(w->heap);
    free(w->cache);
}

/* ==== Tokenizer: NFC ====
 * Characters are decomposed into w->seq, packed as ccc << 24 | code point, until a stable character
 * arrives; then the run is put in canonical order, recomposed and written out. */

static int decompose(TokWork *w, uint32_t cp) {
    if (cp - HANGUL_S < HANGUL_SN) {
        uint32_t s = cp - HANGUL_S, trail = s % HANGUL_TN;
        if (seq_push(w, HANGUL_L + s / (HANGUL_VN * HANGUL_TN))) return -1;
        if (seq_push(w, HANGUL_V + s % (HANGUL_VN * HANGUL_TN) / HANGUL_TN)) return -1;
        return trail ? seq_push(w, HANGUL_T + trail) : 0;
    }
    const UcDecomp *d = cp < 0xC0 ? NULL : bsearch(&cp, uc_decomp, sizeof uc_decomp / sizeof *uc_decomp,
                                                   sizeof *uc_decomp, uc_decomp_cmp);
    if (!d) return seq_push(w, combining_class(cp) << 24 | cp);
    for (uint32_t i = 0; i < (d->at_len & 7); i++) {
        uint32_t part = uc_decomp_cps[(d->at_len >> 3) + i];
        if (seq_push(w, combining_class(part) << 24 | part)) return -1;
    }
    return 0;
}

static uint32_t compose_pair(uint32_t first, uint32_t second) {
    if (first - HANGUL_L < HANGUL_LN && second - HANGUL_V < HANGUL_VN)
        return HANGUL_S + ((first - HANGUL_L) * HANGUL_VN + second - HANGUL_V) * HANGUL_TN;
    if (first - HANGUL_S < HANGUL_SN && (first - HANGUL_S) % HANGUL_TN == 0 && second - HANGUL_T - 1 < HANGUL_TN - 1)
        return first + second - HANGUL_T;
    uint32_t pair[2] = {first, second};
    const UcComp *c = bsearch(pair, uc_comp, sizeof uc_comp / sizeof *uc_comp, sizeof *uc_comp, uc_comp_cmp);
    return c ? c->composite : 0;
}

/* Canonical ordering: a stable sort by combining class. Merge sort, as a run of non-starters can be
 * a megabyte of combining marks, where insertion sort would go quadratic. */
static void sort_by_ccc(uint32_t *a, uint32_t *tmp, size_t n) {
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) tmp[k++] = (a[j] >> 24) < (a[i] >> 24) ? a[j++] : a[i++];
            while (i < mid) tmp[k++] = a[i++];
            while (j < hi) tmp[k++] = a[j++];
        }
        memcpy(a, tmp, n * sizeof *a);
    }
}

/* Canonical composition in place; returns the new length. A character joins the last starter unless
 * something between them has a combining class of its own >= the character's (it is blocked). */
static size_t compose_run(uint32_t *seq, size_t n) {
    size_t out = 0, starter = (size_t)-1;
    uint32_t last_ccc = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = seq[i] & 0xFFFFFF, ccc = seq[i] >> 24;
        if (starter != (size_t)-1 && (out == starter + 1 || last_ccc < ccc)) {
            uint32_t composite = compose_pair(seq[starter] & 0xFFFFFF, cp);
            if (composite) {
                seq[starter] = combining_class(composite) << 24 | composite;
                continue;
            }
        }
        seq[out++] = seq[i];
        last_ccc = ccc;
        if (ccc == 0) starter = out - 1;
    }
    return out;
}

static int flush_run(TokWork *w) {
    uint32_t *seq = w->seq;
    for (size_t i = 0; i < w->n_seq;) {
        size_t j = i;
        while (j < w->n_seq && seq[j] >> 24) j++;
        if (j - i > 1) sort_by_ccc(seq + i, w->seq_tmp, j - i);
        i = j + 1;
    }
    size_t n = compose_run(seq, w->n_seq);
    if (norm_reserve(w, 4 * n)) return -1;
    for (size_t i = 0; i < n; i++) w->n_norm += utf8_encode(seq[i] & 0xFFFFFF, w->norm + w->n_norm);
    w->n_seq = 0;
    return 0;
}

/* Decompose and recompose s[0..n): a stable character and the unstable ones after it. */
static int normalize_run(TokWork *w, const unsigned char *s, size_t n) {
    for (size_t i = 0, len; i < n; i += len)
        if (decompose(w, utf8_decode(s + i, n - i, &len))) return -1;
    return flush_run(w);
}

static int norm_append(TokWork *w, const unsigned char *s, size_t n) {
    if (norm_reserve(w, n)) return -1;
    memcpy(w->norm + w->n_norm, s, n);
    w->n_norm += n;
    return 0;
}

/* NFC of s[0..n). The text falls into runs that each begin at a stable character; a run with nothing
 * unstable in it is NFC already and is copied, the others are decomposed and recomposed. Returns 0 if
 * all of s is NFC already (w->norm unused), 1 if w->norm now holds its NFC, -1 if out of memory. */
static int nfc_normalize(const Tokenizer *t, TokWork *w, const unsigned char *s, size_t n) {
    size_t copied = 0, run = 0, len;   /* s[copied..run) is NFC and not yet in w->norm */
    int dirty = 0;
    w->n_norm = 0;
    for (size_t i = 0; i <= n; i += len) {
        len = 1;
        if (i < n && s[i] >= 0x80 && !(char_info(t, utf8_decode(s + i, n - i, &len)) & CH_NFC_STABLE)) {
            dirty = 1;
            continue;
        }
        if (dirty) {
            if (norm_append(w, s + copied, run - copied) || normalize_run(w, s + run, i - run)) return -1;
            copied = i;
            dirty = 0;
        }
        run = i;
    }
    if (copied == 0) return 0;
    return norm_append(w, s + copied, n - copied) ? -1 : 1;
}

/* ==== Tokenizer: pre-tokenizer ====
 * Qwen's split regex, matched by hand at each position, leftmost alternative first:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N} | ?[^\s\p{L}\p{N}]+[\r\n]*
 *   | \s*[\r\n]+ | \s+(?!\S) | \s+
 * qwen35 reads [\p{L}\p{M}] wherever qwen2 has \p{L}; counting marks as letters gives exactly that,
 * since a mark taken by the optional leading class would begin the same letter run anyway. */

typedef struct { uint32_t cp; size_t len; int kind; } TokChar;

static TokChar char_at(const Tokenizer *t, const unsigned char *s, size_t n, size_t pos) {
    TokChar c = {0, 0, CH_END};
    if (pos < n) {
        c.cp = utf8_decode(s + pos, n - pos, &c.len);
        c.kind = char_info(t, c.cp) & CH_KIND;
    }
    return c;
}

static size_t run_end(const Tokenizer *t, const unsigned char *s, size_t n, size_t pos, int kind) {
    for (TokChar c; (c = char_at(t, s, n, pos)).kind == kind;) pos += c.len;
    return pos;
}

/* Length of the contraction at s[0] == '\'' (n bytes left), or 0. Oniguruma's case-insensitive match
 * uses Unicode case folding, under which U+017F LATIN SMALL LETTER LONG S is an s too. */
static size_t contraction_len(const unsigned char *s, size_t n) {
    if (n < 2) return 0;
    int c1 = s[1] | 0x20, c2 = n > 2 ? s[2] | 0x20 : 0;
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
    if (n > 2 && s[1] == 0xC5 && s[2] == 0xBF) return 3;
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
    return 0;
}

static size_t piece_end(const Tokenizer *t, const unsigned char *s, size_t n, size_t pos) {
    TokChar c0 = char_at(t, s, n, pos), c1 = char_at(t, s, n, pos + c0.len);
    size_t len;
    if (c0.cp == '\'' && (len = contraction_len(s + pos, n - pos))) return pos + len;
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (c0.kind == CH_LETTER) return run_end(t, s, n, pos, CH_LETTER);
    if ((c0.kind == CH_OTHER || c0.kind == CH_SPACE) && c1.kind == CH_LETTER)
        return run_end(t, s, n, pos + c0.len, CH_LETTER);
    if (c0.kind == CH_NUMBER) return pos + c0.len;
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    if (c0.kind == CH_OTHER || (c0.cp == ' ' && c1.kind == CH_OTHER))
        return run_end(t, s, n, run_end(t, s, n, pos + (c0.kind != CH_OTHER), CH_OTHER), CH_NEWLINE);

    /* c0 is whitespace: find the run's end, its last character and where its last \r or \n ends */
    size_t end = pos, last = pos, after_newline = 0;
    for (TokChar c; (c = char_at(t, s, n, end)).kind == CH_SPACE || c.kind == CH_NEWLINE;) {
        last = end;
        end += c.len;
        if (c.kind == CH_NEWLINE) after_newline = end;
    }
    if (after_newline) return after_newline;    /* \s*[\r\n]+ backs off to the last newline */
    if (end == n || last == pos) return end;    /* \s+(?!\S) at the end of the text, or a lone \s+ */
    return last;                                /* \s+(?!\S) leaves the last space to the next word */
}

/* ==== Tokenizer: BPE ==== */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

static uint32_t hash_pair(int32_t left, int32_t right) {
    uint64_t h = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32);
}

static int32_t vocab_find(const Tokenizer *t, const char *s, size_t n) {
    for (uint32_t i = hash_bytes(s, n) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        int32_t id = t->vocab_slot[i];
        if (id < 0) return -1;
        if (t->text_at[id + 1] - t->text_at[id] == n && !memcmp(t->text + t->text_at[id], s, n)) return id;
    }
}

static const TokMerge *merge_find(const Tokenizer *t, int32_t left, int32_t right) {
    for (uint32_t i = hash_pair(left, right) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const TokMerge *m = &t->merge_slot[i];
        if (m->rank < 0) return NULL;
        if (m->left == left && m->right == right) return m;
    }
}

/* The candidate heap pops the lowest rank first and, among equal ranks, the leftmost pair: the order
 * HF applies merges in. */
static int cand_before(BpeCand a, BpeCand b) {
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void heap_push(BpeCand *heap, size_t *n, BpeCand c) {
    size_t i = (*n)++;
    for (; i > 0 && cand_before(c, heap[(i - 1) / 2]); i = (i - 1) / 2) heap[i] = heap[(i - 1) / 2];
    heap[i] = c;
}

static BpeCand heap_pop(BpeCand *heap, size_t *n) {
    BpeCand top = heap[0], last = heap[--*n];
    size_t i = 0;
    for (size_t child; (child = 2 * i + 1) < *n; i = child) {
        if (child + 1 < *n && cand_before(heap[child + 1], heap[child])) child++;
        if (!cand_before(heap[child], last)) break;
        heap[i] = heap[child];
    }
    heap[i] = last;
    return top;
}

static void push_pair(const Tokenizer *t, TokWork *w, size_t *n_heap, int32_t pos) {
    if (pos < 0 || w->sym[pos].next < 0) return;
    int32_t next = w->sym[pos].next;
    const TokMerge *m = merge_find(t, w->sym[pos].id, w->sym[next].id);
    if (m) heap_push(w->heap, n_heap, (BpeCand){m->rank, pos, m});
}

/* Merge the byte-level symbols of one piece and append the resulting ids. A popped candidate is stale
 * when either of its symbols has since been merged into something else. */
static int bpe_piece(const Tokenizer *t, TokWork *w, const unsigned char *s, size_t n) {
    if (n > INT32_MAX || sym_reserve(w, n)) return -1;
    BpeSym *sym = w->sym;
    for (size_t i = 0; i < n; i++)
        sym[i] = (BpeSym){t->byte_token[s[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
    size_t n_heap = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, w, &n_heap, (int32_t)i);
    while (n_heap) {
        BpeCand c = heap_pop(w->heap, &n_heap);
        int32_t right = sym[c.pos].next;
        if (right < 0 || sym[c.pos].id != c.merge->left || sym[right].id != c.merge->right) continue;
        sym[c.pos].id = c.merge->merged;
        sym[c.pos].next = sym[right].next;
        if (sym[right].next >= 0) sym[sym[right].next].prev = c.pos;
        sym[right].id = -1;
        push_pair(t, w, &n_heap, sym[c.pos].prev);
        push_pair(t, w, &n_heap, c.pos);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        if (ids_push(w, sym[i].id)) return -1;
    return 0;
}

/* Words repeat, so long texts keep a direct-mapped cache of merged pieces: a hit skips the merging. */
enum { CACHE_SLOTS = 1 << 12, CACHE_PIECE = 26, CACHE_IDS = 8, CACHE_MIN_TEXT = 1 << 16 };
typedef struct TokCacheSlot {   /* 64 bytes; len 0 = empty */
    uint32_t hash;
    uint8_t len, n_ids;
    char piece[CACHE_PIECE];
    int32_t ids[CACHE_IDS];
} TokCacheSlot;

static int encode_piece(const Tokenizer *t, TokWork *w, const unsigned char *s, size_t n) {
    TokCacheSlot *slot = NULL;
    if (w->cache && n <= CACHE_PIECE) {
        uint32_t hash = hash_bytes((const char *)s, n);
        slot = &w->cache[hash & (CACHE_SLOTS - 1)];
        if (slot->hash == hash && slot->len == n && !memcmp(slot->piece, s, n)) {
            for (int i = 0; i < slot->n_ids; i++)
                if (ids_push(w, slot->ids[i])) return -1;
            return 0;
        }
        slot->hash = hash;
        slot->len = 0;
    }
    size_t first = w->n_ids;
    if (bpe_piece(t, w, s, n)) return -1;
    if (slot && w->n_ids - first <= CACHE_IDS) {
        slot->len = (uint8_t)n;
        slot->n_ids = (uint8_t)(w->n_ids - first);
        memcpy(slot->piece, s, n);
        memcpy(slot->ids, w->ids + first, slot->n_ids * sizeof *slot->ids);
    }
    return 0;
}

/* ==== Tokenizer: loading ==== */

/* GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves and the 68 others are
 * moved, in byte order, to U+0100 onwards, so every byte is a visible character. */
static void byte_alphabet(uint32_t byte_cp[256], int16_t cp_byte[324]) {
    uint32_t moved = 256;
    for (int i = 0; i < 324; i++) cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        byte_cp[b] = printable ? (uint32_t)b : moved++;
        cp_byte[byte_cp[b]] = (int16_t)b;
    }
}

static void tok_free(Tokenizer *t) {
    free(t->type);
    free(t->text);
    free(t->text_at);
    free(t->bytes);
    free(t->bytes_at);
    free(t->vocab_slot);
    free(t->merge_slot);
    free(t->special);
    free(t->bmp_info);
    memset(t, 0, sizeof *t);
}

/* Open-addressing tables are kept at most half full. */
static uint32_t table_size(size_t n) {
    uint32_t size = 1024;
    while (size < 2 * n) size *= 2;
    return size;
}

static int load_vocab(Tokenizer *t, const TokStr *tokens, const int32_t *types, char *err, size_t errlen) {
    size_t total = 0;
    for (int i = 0; i < t->n_vocab; i++) total += tokens[i].n;
    uint32_t size = table_size((size_t)t->n_vocab);
    t->type = malloc((size_t)t->n_vocab);
    t->text = malloc(total + 1);
    t->text_at = malloc(((size_t)t->n_vocab + 1) * sizeof *t->text_at);
    t->vocab_slot = malloc(size * sizeof *t->vocab_slot);
    if (!t->type || !t->text || !t->text_at || !t->vocab_slot || total >= UINT32_MAX) {
        snprintf(err, errlen, "cannot hold a vocabulary of %d tokens in memory", t->n_vocab);
        return -1;
    }
    memset(t->vocab_slot, 0xFF, size * sizeof *t->vocab_slot);
    t->vocab_mask = size - 1;
    t->text_at[0] = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const TokStr *tok = &tokens[id];
        t->type[id] = types && types[id] > 0 && types[id] < 256 ? (uint8_t)types[id] : TOK_NORMAL;
        memcpy(t->text + t->text_at[id], tok->s, tok->n);
        t->text_at[id + 1] = t->text_at[id] + tok->n;
        if (vocab_find(t, tok->s, tok->n) >= 0) continue;   /* a duplicate string keeps its first id */
        uint32_t i = hash_bytes(tok->s, tok->n) & t->vocab_mask;
        while (t->vocab_slot[i] >= 0) i = (i + 1) & t->vocab_mask;
        t->vocab_slot[i] = id;
    }
    return 0;
}

static int is_special(const Tokenizer *t, int32_t id) {
    return (t->type[id] == TOK_CONTROL || t->type[id] == TOK_USER) && t->text_at[id + 1] > t->text_at[id];
}

/* What each token decodes to: byte-level characters back to their bytes; special tokens, and any
 * character outside the byte alphabet, as their own text. */
static int load_pieces(Tokenizer *t, const uint32_t byte_cp[256], const int16_t cp_byte[324],
                       char *err, size_t errlen) {
    t->bytes = malloc(t->text_at[t->n_vocab] + 1);
    t->bytes_at = malloc(((size_t)t->n_vocab + 1) * sizeof *t->bytes_at);
    if (!t->bytes || !t->bytes_at) {
        snprintf(err, errlen, "out of memory for the token pieces");
        return -1;
    }
    uint32_t n = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const unsigned char *s = (const unsigned char *)t->text + t->text_at[id];
        size_t len = t->text_at[id + 1] - t->text_at[id];
        int byte_level = !is_special(t, id);
        t->bytes_at[id] = n;
        for (size_t i = 0, cl; i < len; i += cl) {
            uint32_t cp = utf8_decode(s + i, len - i, &cl);
            if (byte_level && cp < 324 && cp_byte[cp] >= 0) t->bytes[n++] = (char)cp_byte[cp];
            else for (size_t k = 0; k < cl; k++) t->bytes[n++] = (char)s[i + k];
        }
        if ((int)(n - t->bytes_at[id]) > t->max_piece) t->max_piece = (int)(n - t->bytes_at[id]);
    }
    t->bytes_at[t->n_vocab] = n;
    for (int b = 0; b < 256; b++) {
        char utf8[4];
        t->byte_token[b] = vocab_find(t, utf8, utf8_encode(byte_cp[b], utf8));
        if (t->byte_token[b] < 0) {
            snprintf(err, errlen, "vocabulary has no byte-level token for byte 0x%02X", b);
            return -1;
        }
    }
    return 0;
}

static int load_merges(Tokenizer *t, const TokStr *merges, int n_merges, char *err, size_t errlen) {
    uint32_t size = table_size((size_t)n_merges);
    size_t longest = 0;
    for (int r = 0; r < n_merges; r++) longest = merges[r].n > longest ? merges[r].n : longest;
    t->merge_slot = malloc(size * sizeof *t->merge_slot);
    char *joined = malloc(longest + 1);
    if (!t->merge_slot || !joined) {
        free(joined);
        snprintf(err, errlen, "out of memory for %d merges", n_merges);
        return -1;
    }
    for (uint32_t i = 0; i < size; i++) t->merge_slot[i].rank = -1;
    t->merge_mask = size - 1;
    for (int32_t rank = 0; rank < n_merges; rank++) {
        const TokStr *m = &merges[rank];
        const char *space = memchr(m->s, ' ', m->n);   /* byte-level tokens never hold a raw space */
        int32_t left = -1, right = -1, merged = -1;
        if (space) {
            size_t n_left = (size_t)(space - m->s), n_right = m->n - n_left - 1;
            memcpy(joined, m->s, n_left);
            memcpy(joined + n_left, space + 1, n_right);
            left = vocab_find(t, m->s, n_left);
            right = vocab_find(t, space + 1, n_right);
            merged = vocab_find(t, joined, n_left + n_right);
        }
        if (left < 0 || right < 0 || merged < 0) {
            snprintf(err, errlen, "merge %d '%.*s' is not two vocabulary tokens whose join is one", rank,
                     (int)(m->n < 200 ? m->n : 200), m->s);
            free(joined);
            return -1;
        }
        uint32_t i = hash_pair(left, right) & t->merge_mask;
        while (t->merge_slot[i].rank >= 0 && (t->merge_slot[i].left != left || t->merge_slot[i].right != right))
            i = (i + 1) & t->merge_mask;
        if (t->merge_slot[i].rank < 0) t->merge_slot[i] = (TokMerge){left, right, rank, merged};
    }
    free(joined);
    return 0;
}

static int special_cmp(const void *a, const void *b) {
    const TokSpecial *x = a, *y = b;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int load_specials(Tokenizer *t, char *err, size_t errlen) {
    size_t n = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) n += (size_t)is_special(t, id);
    t->special = malloc((n + 1) * sizeof *t->special);
    if (!t->special) {
        snprintf(err, errlen, "out of memory for the special tokens");
        return -1;
    }
    for (int32_t id = 0; id < t->n_vocab; id++) {
        if (!is_special(t, id)) continue;
        uint32_t len = t->text_at[id + 1] - t->text_at[id];
        unsigned char first = (unsigned char)t->text[t->text_at[id]];
        t->special[t->n_special++] = (TokSpecial){id, len};
        t->special_first[1][first >> 3] |= (uint8_t)(1u << (first & 7));
        if (t->type[id] == TOK_USER) t->special_first[0][first >> 3] |= (uint8_t)(1u << (first & 7));
    }
    qsort(t->special, (size_t)t->n_special, sizeof *t->special, special_cmp);
    return 0;
}

/* Load the vocabulary (tokenizer.ggml.tokens, token_type, merges, pre); the strings are copied, so the
 * GGUF may go away after. types has n_vocab entries, or is NULL to make every token an ordinary one;
 * types 3 (control) and 4 (user-defined) are the special tokens cut out of the text whole. pre names
 * the split regex: "qwen2" or "qwen35". Returns 0, or -1 with a message in err. */
static int tok_init(Tokenizer *t, const TokStr *tokens, const int32_t *types, int n_vocab,
                    const TokStr *merges, int n_merges, const char *pre, char *err, size_t errlen) {
    memset(t, 0, sizeof *t);
    if (!pre || (strcmp(pre, "qwen2") && strcmp(pre, "qwen35"))) {
        snprintf(err, errlen, "unsupported pre-tokenizer '%s' (known: qwen2, qwen35)", pre ? pre : "");
        return -1;
    }
    if (n_vocab <= 0 || n_merges < 0) {
        snprintf(err, errlen, "bad vocabulary: %d tokens, %d merges", n_vocab, n_merges);
        return -1;
    }
    t->n_vocab = n_vocab;
    t->nfc = 1;
    t->marks_are_letters = !strcmp(pre, "qwen35");
    uint32_t byte_cp[256];
    int16_t cp_byte[324];
    byte_alphabet(byte_cp, cp_byte);
    if (load_vocab(t, tokens, types, err, errlen) || load_pieces(t, byte_cp, cp_byte, err, errlen) ||
        load_merges(t, merges, n_merges, err, errlen) || load_specials(t, err, errlen)) {
        tok_free(t);
        return -1;
    }
    t->bmp_info = malloc(0x10000);
    if (!t->bmp_info) {
        snprintf(err, errlen, "out of memory for the character table");
        tok_free(t);
        return -1;
    }
    for (uint32_t cp = 0; cp < 0x10000; cp++) t->bmp_info[cp] = char_info_lookup(cp, t->marks_are_letters);
    return 0;
}

/* ==== Tokenizer: encoding ==== */

/* Where the first special token in s[0..n) starts (n if none), its id and length. At each position the
 * longest special wins. Control tokens count only with parse_special; user-defined ones (<think> and
 * <tool_call> in Qwen3) always do, as in HF tokenizers and llama.cpp. */
static size_t find_special(const Tokenizer *t, const unsigned char *s, size_t n, int parse_special,
                           int32_t *id, size_t *len) {
    const uint8_t *first = t->special_first[parse_special != 0];
    for (size_t i = 0; i < n; i++) {
        if (!(first[s[i] >> 3] >> (s[i] & 7) & 1)) continue;
        for (int k = 0; k < t->n_special; k++) {
            const TokSpecial *sp = &t->special[k];
            if (sp->len > n - i || (!parse_special && t->type[sp->id] != TOK_USER)) continue;
            if (!memcmp(s + i, t->text + t->text_at[sp->id], sp->len)) {
                *id = sp->id;
                *len = sp->len;
                return i;
            }
        }
    }
    *len = 0;
    return n;
}

/* Text without special tokens: normalise, split, merge. */
static int encode_plain(const Tokenizer *t, TokWork *w, const unsigned char *s, size_t n) {
    int normalized = t->nfc ? nfc_normalize(t, w, s, n) : 0;
    if (normalized < 0) return -1;
    if (normalized) {
        s = (const unsigned char *)w->norm;
        n = w->n_norm;
    }
    for (size_t pos = 0, end; pos < n; pos = end) {
        end = piece_end(t, s, n, pos);
        if (encode_piece(t, w, s + pos, end - pos)) return -1;
    }
    return 0;
}

/* Tokenise text[0..len). *ids is malloc'd (NULL when *n_ids is 0). Returns 0, or -1 with nothing to
 * free when out of memory (or past INT32_MAX tokens, or a single piece over 2 GB). */
static int tok_encode(const Tokenizer *t, const char *text, size_t len, int parse_special,
                      int32_t **ids, int *n_ids) {
    TokWork w = {0};
    const unsigned char *s = (const unsigned char *)text;
    int rc = 0;
    if (len >= CACHE_MIN_TEXT) w.cache = calloc(CACHE_SLOTS, sizeof *w.cache);   /* none: just slower */
    for (size_t pos = 0, at, special_len; pos < len && rc == 0; pos += at + special_len) {
        int32_t special = -1;
        at = find_special(t, s + pos, len - pos, parse_special, &special, &special_len);
        rc = encode_plain(t, &w, s + pos, at);
        if (rc == 0 && special >= 0) rc = ids_push(&w, special);
    }
    work_free(&w);
    if (rc || w.n_ids > INT32_MAX) {
        free(w.ids);
        *ids = NULL;
        *n_ids = 0;
        return -1;
    }
    *ids = w.ids;
    *n_ids = (int)w.n_ids;
    return 0;
}

/* ==== Tokenizer: decoding ==== */

/* Streaming detokenisation. A token can end inside a UTF-8 character (CJK and emoji are often split
 * over byte tokens), so the trailing bytes of a character that is not finished yet are held back in
 * the stream until the next token completes it. Bytes that cannot be (part of) valid UTF-8 come out as
 * U+FFFD, one per maximal ill-formed subsequence as in Unicode's recommended practice (what HF's
 * lossy decode prints too). Start with TokStream st = {0}. */
typedef struct { char pending[8]; int n_pending; } TokStream;

typedef struct { char *out; int cap, n; } TokSink;

static int sink_put(TokSink *sink, const void *bytes, size_t n) {
    if ((size_t)(sink->cap - sink->n) < n) return -1;
    memcpy(sink->out + sink->n, bytes, n);
    sink->n += (int)n;
    return 0;
}

/* Emit the complete characters of s[0..n), return how many trailing bytes form an unfinished one. */
static int stream_bytes(TokSink *sink, const unsigned char *s, size_t n, size_t *held) {
    size_t i = 0;
    while (i < n) {
        size_t need, valid = utf8_prefix(s + i, n - i, &need);
        if (need && valid == n - i && valid < need) break;
        if (need && valid == need) {
            if (sink_put(sink, s + i, need)) return -1;
            i += need;
        } else {
            if (sink_put(sink, "\xEF\xBF\xBD", 3)) return -1;
            i += valid ? valid : 1;
        }
    }
    *held = n - i;
    return 0;
}

/* Append token id's bytes to the stream and write what is complete to out; returns the bytes written,
 * or -1 (stream unchanged) if cap is too small: 3 * (t->max_piece + 3) always suffices. Special tokens
 * come out as their text, so a caller that hides control tokens skips them before this. */
static int tok_stream(const Tokenizer *t, TokStream *st, int32_t id, char *out, int cap) {
    if (id < 0 || id >= t->n_vocab) return 0;
    const unsigned char *piece = (const unsigned char *)t->bytes + t->bytes_at[id];
    size_t n = t->bytes_at[id + 1] - t->bytes_at[id], used = 0, held;
    TokSink sink = {out, cap > 0 ? cap : 0, 0};
    TokStream next = *st;
    /* finish the held-back character a byte at a time: it needs at most 3 more */
    while (next.n_pending > 0 && used < n) {
        next.pending[next.n_pending++] = (char)piece[used++];
        if (stream_bytes(&sink, (const unsigned char *)next.pending, (size_t)next.n_pending, &held)) return -1;
        if (held == (size_t)next.n_pending) continue;
        if (held) used--;   /* the byte that broke the character starts afresh below */
        next.n_pending = 0;
    }
    if (next.n_pending == 0) {
        if (stream_bytes(&sink, piece + used, n - used, &held)) return -1;
        memcpy(next.pending, piece + n - held, held);
        next.n_pending = (int)held;
    }
    *st = next;
    return sink.n;
}

/* At the end of generation: a character left unfinished becomes one U+FFFD. Returns bytes written. */
static int tok_stream_flush(TokStream *st, char *out, int cap) {
    if (st->n_pending == 0) return 0;
    if (cap < 3) return -1;
    memcpy(out, "\xEF\xBF\xBD", 3);
    st->n_pending = 0;
    return 3;
}

/* ==== Generation: prefill, draft, verify, accept ====
 * The sequence is toks[0..n_toks): all but the last token are in the main
 * model's state (n_past == n_toks - 1 once generation runs); the last one is
 * the next input.  A step drafts k tokens with the MTP head, runs
 * [last, d1..dk] through the main model in one speculative call, keeps the
 * longest accepted prefix plus the main model's own next token, and commits
 * exactly the emitted tokens.  MTP rows (hidden state, next token) for every
 * committed position wait in `pending` and enter the head's cache in one
 * batch when the next draft needs them, so keeping the head in step costs
 * almost nothing when drafting is off (k = 0). */

#define MAX_DRAFT 16
#define PEND_CAP (2 * UBATCH + MAX_DRAFT + 1)
#define MARGIN_BINS 8           /* half-logit bins of the head's margin, the last open-ended */

typedef struct {
    int n_draft;                /* drafts per step; the cap when adaptive */
    int adaptive;               /* choose k per step from measured acceptance and costs */
    float p_min;                /* stop drafting below this draft probability */
    int draft_vocab;            /* drafts score the first draft_vocab tokens */
    int optimistic;             /* keep every draft unverified (lossy) */
} SpecCfg;

typedef struct {
    int n_prompt, n_gen;
    double load_ms, prompt_ms, gen_ms, first_token_ms;
    long steps, drafted, tested, accepted;
    long tested_at[MAX_DRAFT], accepted_at[MAX_DRAFT];
    double draft_ms, verify_ms, rollback_ms;
    double *token_ms;           /* [n_gen] arrival time of each generated token */
    int token_cap;
} Stats;

typedef int (*EmitFn)(void *ud, int32_t token);   /* nonzero stops generation */

typedef struct {
    Engine *e;
    Sampler *smp;
    SpecCfg spec;
    int use_mtp;                /* the head is kept in step and drafts */
    int32_t *toks;              /* [n_ctx + MAX_DRAFT + 1] the sequence, drafts appended while verifying */
    int n_toks;
    float *pend_h;              /* [PEND_CAP][dim] MTP rows not yet in the head's cache */
    int32_t *pend_t;            /* [PEND_CAP] their next tokens */
    int n_pend;
    float *h_last;              /* [dim] hidden state of the last position the main model ran */
    Dist p, q[MAX_DRAFT];
    float sure[MARGIN_BINS];    /* running P(a draft is accepted | the drafts before it were, its margin in bin b) */
    int sure_n[MARGIN_BINS];    /* weight of sure[b]: 1 (the prior alone) plus observations, up to SURE_SPAN */
    int draft_bin[MAX_DRAFT];   /* this step's drafts' margin bins */
    double t_chain;             /* running cost in ms of a chained draft */
    double t_row;               /* running cost in ms of one more token in a verify */
    double t_verify[MAX_DRAFT + 2]; /* running cost in ms of a verify of n tokens (its forward pass and
                                     * the commit of the tokens kept) */
    double t_forward;           /* the last verify's forward pass, ms */
    double spec_ms, spec_tokens; /* running time and tokens of a drafting step: drafts, verify, commit */
    int probe;                  /* steps since drafting was last tried (adaptive) */
    int probe_gap;              /* steps between probes: doubles while probes fail, so a useless head costs ~nothing */
    int probing;                /* this step's draft is a probe */
    int since_explore;          /* drafting steps: every EXPLORE_GAP-th verifies one draft past the stop */
    int drafted;                /* the last step drafted, so the head's pending rows are only its accepted tokens */
    const uint8_t *eog;         /* [n_vocab] end-of-generation tokens */
    int ignore_eos;
    int verbose;                /* one stderr line per speculative step */
    volatile sig_atomic_t *stop;
    FILE *mtp_logits_out;       /* when set: teacher-forced MTP logits of the prompt positions */
    Stats st;
} Gen;

static void gen_init(Gen *g, Engine *e, Sampler *smp, const SpecCfg *spec, int use_mtp, const uint8_t *eog) {
    const Config *c = &e->model->cfg;
    memset(g, 0, sizeof *g);
    g->e = e;
    g->smp = smp;
    g->spec = *spec;
    g->use_mtp = use_mtp;
    g->eog = eog;
    g->toks = xcalloc((size_t)e->st.n_ctx + MAX_DRAFT + 1, sizeof *g->toks);
    g->pend_h = xcalloc((size_t)PEND_CAP * c->dim, sizeof(float));
    g->pend_t = xcalloc(PEND_CAP, sizeof *g->pend_t);
    g->h_last = xcalloc(c->dim, sizeof(float));
    dist_init(&g->p, c->n_vocab);
    for (int i = 0; i < MAX_DRAFT; i++) dist_init(&g->q[i], c->n_vocab);
    /* prior: the chance the top token wins if the runner-up were its only rival */
    for (int b = 0; b < MARGIN_BINS; b++) {
        g->sure[b] = 1.0f / (1.0f + expf(-(b + 0.5f) / 2));
        g->sure_n[b] = 1;
    }
}

static void gen_free(Gen *g) {
    free(g->toks);
    free(g->pend_h);
    free(g->pend_t);
    free(g->h_last);
    free(g->st.token_ms);
    dist_free(&g->p);
    for (int i = 0; i < MAX_DRAFT; i++) dist_free(&g->q[i]);
}

static void mtp_push(Gen *g, const float *h, int32_t next) {
    int D = g->e->model->cfg.dim;
    memcpy(g->pend_h + (int64_t)g->n_pend * D, h, D * sizeof(float));
    g->pend_t[g->n_pend++] = next;
}

/* Feed all but the last `leave` pending rows to the head; with want_logits
 * the last fed row's draft logits and output are left in s.logits and
 * s.hidden, and with mtp_logits_out every row's logits go there. */
static void mtp_catch_up(Gen *g, int want_logits, int leave) {
    Engine *e = g->e;
    int D = e->model->cfg.dim, V = e->model->cfg.n_vocab, done = 0, todo = g->n_pend - leave;
    while (done < todo) {
        int n = todo - done < UBATCH ? todo - done : UBATCH;
        int last = done + n == todo;
        int logits = g->mtp_logits_out ? LOGITS_ALL : last && want_logits ? LOGITS_LAST : LOGITS_NONE;
        mtp_forward(e, g->pend_h + (int64_t)done * D, g->pend_t + done, n, e->st.mtp_n, logits,
                    g->mtp_logits_out ? V : g->spec.draft_vocab);
        if (g->mtp_logits_out) {
            if (fwrite(e->s.logits, sizeof(float) * V, n, g->mtp_logits_out) != (size_t)n) die("cannot write MTP logits: %s", strerror(errno));
            memmove(e->s.logits, e->s.logits + (int64_t)(n - 1) * V, V * sizeof(float));
        }
        e->st.mtp_n += n;
        done += n;
    }
    memmove(g->pend_h, g->pend_h + (int64_t)done * D, (size_t)leave * D * sizeof(float));
    memmove(g->pend_t, g->pend_t + done, (size_t)leave * sizeof *g->pend_t);
    g->n_pend = leave;
}

/* Append tokens to the sequence and run every not-yet-processed one through
 * the main model, UBATCH at a time, queueing their MTP rows.  logits_out,
 * when given, receives every row's logits.  Leaves the last row's logits in
 * s.logits row 0 and its hidden state in h_last. */
static void gen_feed(Gen *g, const int32_t *tokens, int n, FILE *logits_out) {
    Engine *e = g->e;
    const Config *c = &e->model->cfg;
    memcpy(g->toks + g->n_toks, tokens, n * sizeof *tokens);
    g->n_toks += n;
    while (e->st.n_past < g->n_toks) {
        int p0 = e->st.n_past, m = g->n_toks - p0 < UBATCH ? g->n_toks - p0 : UBATCH;
        forward(e, g->toks + p0, m, 0, logits_out ? LOGITS_ALL : LOGITS_LAST);
        if (logits_out) {
            if (fwrite(e->s.logits, sizeof(float) * c->n_vocab, m, logits_out) != (size_t)m) die("cannot write logits: %s", strerror(errno));
            memmove(e->s.logits, e->s.logits + (int64_t)(m - 1) * c->n_vocab, c->n_vocab * sizeof(float));
        }
        memcpy(g->h_last, e->s.hidden + (int64_t)(m - 1) * c->dim, c->dim * sizeof(float));
        if (!g->use_mtp) continue;
        for (int r = 0; r < m && p0 + r + 1 < g->n_toks; r++) mtp_push(g, e->s.hidden + (int64_t)r * c->dim, g->toks[p0 + r + 1]);
        if (g->n_pend >= UBATCH) mtp_catch_up(g, 0, 0);
    }
}

/* Softmax probability of the top logit: how sure the head is of a greedy draft. */
static float top_prob(const float *lg, int n) {
    float mx = lg[kn_argmax(lg, n)];
    double sum = 0;
    for (int i = 0; i < n; i++) sum += expf(lg[i] - mx);
    return (float)(1.0 / sum);
}

static void ema(double *v, double x) { *v = *v > 0 ? 0.75 * *v + 0.25 * x : x; }

static double elapsed_since(double t0) { return now_ms() - t0; }

/* Adaptive depth decides per draft, not per step.  Each draft comes with
 * the head's margin (its top logit minus the runner-up), and sure[] maps
 * the margin to the chance the draft is accepted, learned from the
 * verifications; the product along the chain is the chance that every
 * draft so far survives, which is what the draft adds in expected tokens.
 * By the marginal rule for tokens per ms, a draft made is kept while that
 * chance pays for its verify row, and another is made while it would pay
 * for a draft and a row too, both priced at the rate speculative steps
 * produce tokens.  A k per step chosen from acceptance by draft position
 * (the policy before this one) stopped at 3-4 drafts on the built-in
 * model, where confident chains run much longer: the margin tells them
 * apart (acceptance 0.37 below a margin of 0.25, 0.99 above 3).  Plain
 * steps come back when drafting steps produce tokens slower than a plain
 * step would, with a one-draft probe now and then to recover. */

/* The head's margin in half-logit bins: how sure it is of a draft, read
 * without a softmax over the vocabulary (a second pass for the runner-up
 * costs a few us where the softmax cost ~30). */
static int margin_bin(const float *lg, int n) {
    int64_t top = kn_argmax(lg, n);
    float second = -INFINITY;
    for (int i = 0; i < n; i++)
        if (i != top && lg[i] > second) second = lg[i];
    float bin = 2 * (lg[top] - second);
    return bin < MARGIN_BINS - 1 ? (int)bin : MARGIN_BINS - 1;
}

/* What t ms cost in tokens at the rate speculative steps produce them; 0
 * until measured, so that the first steps draft to the cap and measure
 * the costs. */
static double in_tokens(const Gen *g, double t) {
    return g->spec.adaptive && g->spec_ms > 0 ? t * g->spec_tokens / g->spec_ms : 0;
}

/* Every EXPLORE_GAP drafting steps, a step that stops on the price verifies
 * the one draft past the stop too: a margin bin whose estimate once fell
 * below the price would otherwise never be verified again to correct it. */
#define EXPLORE_GAP 8

/* Draft up to k tokens after the sequence's last token into toks[n_toks..];
 * returns how many. */
static int draft(Gen *g, int k) {
    Engine *e = g->e;
    int32_t *drafts = g->toks + g->n_toks;
    double row_price = in_tokens(g, g->t_row), draft_price = row_price + in_tokens(g, g->t_chain), chance = 1, t0 = 0;
    int explore = g->spec.adaptive && ++g->since_explore % EXPLORE_GAP == 0;
    /* a chained draft starts from the head's output at the position before
     * it, which each call leaves in s.hidden row 0 */
    mtp_catch_up(g, 1, 0);
    int n = 0, chained = 0;
    for (; n < k; n++) {
        if (n == 1) t0 = now_ms();
        if (n > 0) {
            mtp_forward(e, e->s.hidden, &drafts[n - 1], 1, e->st.mtp_n + n - 1, LOGITS_LAST, g->spec.draft_vocab);
            chained++;
        }
        if (g->spec.p_min > 0 && top_prob(e->s.logits, g->spec.draft_vocab) < g->spec.p_min) break;
        if (g->spec.adaptive) chance *= g->sure[g->draft_bin[n] = margin_bin(e->s.logits, g->spec.draft_vocab)];
        sampler_dist(g->smp, e->s.logits, g->spec.draft_vocab, g->toks, g->n_toks + n, &g->q[n]);
        drafts[n] = dist_sample(&g->q[n], &g->smp->cfg.rng);
        if (chance < row_price) {
            n += explore;
            break;
        }
        if (chance < draft_price) {
            n++;
            break;
        }
    }
    if (chained) ema(&g->t_chain, elapsed_since(t0) / chained);
    return n;
}

/* The step's cap on drafts: all of it while drafting steps produce tokens
 * faster than plain ones, else none, or one for a probe now and then. */
static int choose_k(Gen *g) {
    if (!g->spec.adaptive) return g->spec.n_draft;
    if (g->t_verify[1] <= 0) return 0;          /* a plain step first: its time is the bar */
    if (g->spec_ms <= 0 || g->spec_tokens / g->spec_ms >= 1 / g->t_verify[1]) return g->spec.n_draft;
    if (!g->probe_gap) g->probe_gap = 1;
    if (++g->probe >= g->probe_gap) {
        g->probe = 0;
        g->probing = 1;
        return 1;
    }
    return 0;
}

/* A probe that found nothing makes the next one twice as rare (up to every
 * 64 steps: at most ~0.5% of a decode's time when nothing is ever accepted);
 * an accepted one makes the next step a probe too, so that a head that
 * starts to guess well (text turning repetitive, say) gets the few
 * observations it needs to be trusted again within a few steps rather than
 * one every 16. */
#define PROBE_GAP_MAX 64

static void probe_result(Gen *g, int n_accepted) {
    if (!g->probing) return;
    g->probing = 0;
    g->probe_gap = n_accepted ? 1 : (g->probe_gap < PROBE_GAP_MAX ? 2 * g->probe_gap : PROBE_GAP_MAX);
}

/* Emit tokens until end-of-generation, the budget, or a stop request;
 * returns how many were emitted. */
static int emit_tokens(Gen *g, const int32_t *toks, int n, int budget, EmitFn emit, void *ud, int *done) {
    int j = 0;
    while (j < n && !*done) {
        int32_t t = toks[j++];
        if (g->st.n_gen >= g->st.token_cap) {
            g->st.token_cap = g->st.token_cap ? 2 * g->st.token_cap : 256;
            g->st.token_ms = realloc(g->st.token_ms, g->st.token_cap * sizeof(double));
            if (!g->st.token_ms) die("out of memory");
        }
        g->st.token_ms[g->st.n_gen++] = now_ms();
        int eog = !g->ignore_eos && g->eog[t];
        if (emit(ud, t) || eog || g->st.n_gen >= budget || (g->stop && *g->stop)) *done = 1;
    }
    return j;
}

/* A margin bin's acceptance starts as its prior worth one observation and
 * is a plain mean with it until SURE_SPAN observations, then a moving
 * average over about as many. */
#define SURE_SPAN 32

/* Verify [last, d1..dk]: the longest accepted prefix, then one token of the
 * main model's own, into out[]; returns the number of accepted drafts. */
static int verify(Gen *g, int n_draft, int32_t *out) {
    Engine *e = g->e;
    const Config *c = &e->model->cfg;
    const int32_t *drafts = g->toks + g->n_toks;
    double t0 = now_ms();
    forward(e, g->toks + g->n_toks - 1, n_draft + 1, n_draft > 0, n_draft > 0 ? LOGITS_ALL : LOGITS_LAST);
    g->t_forward = elapsed_since(t0);
    g->st.verify_ms += g->t_forward;
    int n_acc = 0;
    for (;; n_acc++) {
        sampler_dist(g->smp, e->s.logits + (int64_t)n_acc * c->n_vocab, c->n_vocab, g->toks, g->n_toks + n_acc, &g->p);
        if (n_acc == n_draft) {
            out[n_acc] = dist_sample(&g->p, &g->smp->cfg.rng);
            break;
        }
        g->st.tested_at[n_acc]++;
        if (!g->spec.optimistic && !spec_accept(g->smp, &g->p, &g->q[n_acc], drafts[n_acc], &out[n_acc])) break;
        g->st.accepted_at[n_acc]++;
        out[n_acc] = drafts[n_acc];
    }
    for (int i = 0; g->spec.adaptive && i < n_draft && i <= n_acc; i++) {
        int b = g->draft_bin[i];
        if (g->sure_n[b] < SURE_SPAN) g->sure_n[b]++;
        g->sure[b] += ((float)(i < n_acc) - g->sure[b]) / (float)g->sure_n[b];
    }
    if (n_draft) {
        g->st.steps++;
        g->st.drafted += n_draft;
        g->st.tested += n_acc < n_draft ? n_acc + 1 : n_draft;
        g->st.accepted += n_acc;
    }
    return n_acc;
}

/* Verify the n_draft drafts waiting in toks[n_toks..], emit, and commit
 * exactly the emitted tokens (the verify's hidden row i belongs to the
 * position whose next token is out[i]); returns how many. */
static int advance(Gen *g, int n_draft, int budget, EmitFn emit, void *ud, int *done) {
    Engine *e = g->e;
    const Config *c = &e->model->cfg;
    int32_t out[MAX_DRAFT + 1];
    int n_acc = verify(g, n_draft, out);
    probe_result(g, n_acc);
    if (g->verbose && n_draft) {
        fprintf(stderr, "[mtp] pos %d drafted", e->st.n_past);
        for (int i = 0; i < n_draft; i++) fprintf(stderr, " %d", g->toks[g->n_toks + i]);
        fprintf(stderr, " | accepted %d | next %d\n", n_acc, out[n_acc]);
    }
    int n_out = emit_tokens(g, out, n_acc + 1, budget, emit, ud, done);
    double t0 = now_ms();
    if (n_draft) state_commit(e, n_out);
    ema(&g->t_verify[n_draft + 1], g->t_forward + elapsed_since(t0));   /* keeping tokens is part of a verify's price */
    if (n_draft && g->t_verify[1] > 0) ema(&g->t_row, fmax(0, (g->t_verify[n_draft + 1] - g->t_verify[1]) / n_draft));
    for (int i = 0; g->use_mtp && i < n_out; i++) mtp_push(g, e->s.hidden + (int64_t)i * c->dim, out[i]);
    memcpy(g->h_last, e->s.hidden + (int64_t)(n_out - 1) * c->dim, c->dim * sizeof(float));
    memcpy(g->toks + g->n_toks, out, n_out * sizeof *out);
    g->n_toks += n_out;
    g->st.rollback_ms += elapsed_since(t0);
    return n_out;
}

/* How many drafts this step may have: the policy's k within the context and the budget. */
static int draft_room(Gen *g, int budget) {
    const State *st = &g->e->st;
    int k = g->use_mtp ? choose_k(g) : 0, room = st->n_ctx - st->n_past - 1, left = budget - g->st.n_gen - 1;
    if (k > room) k = room;
    if (k > left) k = left;
    return k > 0 ? k : 0;
}

/* One step from the sequence's last token: draft with the head, then verify. */
static void gen_step(Gen *g, int budget, EmitFn emit, void *ud, int *done) {
    if (g->use_mtp && g->n_pend >= UBATCH) mtp_catch_up(g, 0, 0);
    int k = draft_room(g, budget);
    /* rows that only keep the head in step are not a draft's cost: after
     * steps without drafts there are many, and counting them made drafting
     * look as dear as a decode step.  The few a drafting step leaves (its
     * accepted tokens) go in the next draft's batch: a pass of their own
     * would read the head's weights once more per step. */
    if (k && !g->drafted && g->n_pend > 1) mtp_catch_up(g, 0, 1);
    g->drafted = k > 0;
    double t0 = now_ms();
    int n_draft = k ? draft(g, k) : 0;
    if (k) g->st.draft_ms += elapsed_since(t0);
    int n_out = advance(g, n_draft, budget, emit, ud, done);
    if (k) {
        ema(&g->spec_ms, elapsed_since(t0));
        ema(&g->spec_tokens, n_out);
    }
}

/* Feed the prompt (appended to whatever the sequence holds), then generate
 * up to budget tokens. */
static void generate(Gen *g, const int32_t *prompt, int n_prompt, int budget, FILE *logits_out, EmitFn emit, void *ud) {
    Engine *e = g->e;
    double t0 = now_ms();
    gen_feed(g, prompt, n_prompt, logits_out);
    if (g->mtp_logits_out) {
        mtp_catch_up(g, 0, 0);
        g->mtp_logits_out = NULL;
    }
    g->st.n_prompt += n_prompt;
    g->st.prompt_ms += elapsed_since(t0);
    if (budget <= 0) return;
    t0 = now_ms();
    int done = 0;
    sampler_dist(g->smp, e->s.logits, e->model->cfg.n_vocab, g->toks, g->n_toks, &g->p);
    int32_t first = dist_sample(&g->p, &g->smp->cfg.rng);
    emit_tokens(g, &first, 1, budget, emit, ud, &done);
    g->st.first_token_ms = elapsed_since(t0);
    if (g->use_mtp) mtp_push(g, g->h_last, first);
    g->toks[g->n_toks++] = first;
    while (!done && e->st.n_past < e->st.n_ctx) gen_step(g, budget, emit, ud, &done);
    if (!done) fprintf(stderr, "mtp-gen: context full (%d tokens): stopping; use -c for a larger context\n", e->st.n_ctx);
    g->st.gen_ms += elapsed_since(t0);
}

/* ==== CLI ====
 * llama.cpp-like flags.  Generated text alone goes to stdout, flushed per
 * token so pipes see it as it comes; load info, timings and errors go to
 * stderr.  Every error is one line and a non-zero exit. */

typedef struct {
    const char *model, *prompt, *prompt_file, *logits_out, *mtp_logits_out, *stats_json;
    int n_predict, n_ctx, n_threads;
    int display_prompt, quiet, verbose, tokenize_only, print_ids, ignore_eos;
    int draft_exact;            /* drafts use the head's weights as stored, not a 4-bit copy */
    int mtp;                    /* -1 auto (on when the model has a head), 0 off, 1 asked for */
    int interactive, chat, think, hide_think, ctx_shift;
    const char *system;
    SamplerCfg sampling;
    long long seed;
    SpecCfg spec;
} Options;

static void usage(FILE *f) {
    fputs(
"usage: mtp-gen -m MODEL.gguf [options]\n"
"\n"
"Generate text with a Qwen3.5 / Qwen3.6 / Qwen3-Next GGUF model, drafting tokens\n"
"with the model's own MTP head and verifying them in one batched pass.\n"
"\n"
"input and output:\n"
"  -m, --model FILE        GGUF model file (qwen35, qwen35moe, qwen3next); default: the\n"
"                          built-in model (a small Qwen3.5 + MTP trained on Python code, tools/train/)\n"
"  -p, --prompt TEXT       prompt; '-' reads it from stdin (default when stdin is not a terminal)\n"
"  -f, --file FILE         read the prompt from FILE\n"
"  -n, --n-predict N       tokens to generate (default 128, in chat until the reply ends;\n"
"                          -1 = until end of text or context)\n"
"  -c, --ctx-size N        context size in tokens (default min(4096, the model's))\n"
"  -t, --threads N         threads (default: physical cores)\n"
"      --no-display-prompt do not echo the prompt before the generated text\n"
"      --ids               print generated token ids instead of text\n"
"      --tokenize          print the prompt's token ids and exit\n"
"      --logits-out FILE   write float32 logits of every prompt position [n_prompt x n_vocab]\n"
"      --mtp-logits-out FILE  write the MTP head's teacher-forced float32 logits for the prompt\n"
"                          [n_prompt-1 x n_vocab]: row i from position i's hidden state and token i+1\n"
"      --ignore-eos        keep generating past end-of-text tokens\n"
"      --ref-kernels       scalar reference kernels (f32 activations): slow, for checking accuracy\n"
"  -q, --quiet             nothing on stderr but errors\n"
"  -v, --verbose           per-step speculation details on stderr\n"
"\n"
"sampling:\n"
"      --temp T            temperature (default 0.8; 0 = greedy)\n"
"      --top-k N           keep the N most likely tokens (default 40; 0 = off)\n"
"      --top-p P           nucleus sampling (default 0.95; 1 = off)\n"
"      --min-p P           drop tokens below P x the top probability (default 0.05; 0 = off)\n"
"      --repeat-penalty R  penalise recent tokens (default 1.0 = off)\n"
"      --repeat-last-n N   tokens the penalty looks back over (default 64)\n"
"  -s, --seed N            random seed (default: from the clock)\n"
"\n"
"speculative decoding with the MTP head (on by default when the model has one):\n"
"      --draft N           tokens drafted per step (default 2; 0 = off)\n"
"      --draft-max N       adaptive: up to N drafts a step, each kept while the head's confidence\n"
"                          pays for it (acceptance and costs measured as it runs; 0 when none pays)\n"
"      --draft-p-min P     stop drafting when the head's probability falls below P (default 0)\n"
"      --draft-vocab N     drafts score only the first N token ids (default: half the vocabulary,\n"
"                          at most 32768; 0 = all): the LM head is much of a draft's cost\n"
"      --draft-exact       draft with the head's weights as stored (default: a 4-bit copy of\n"
"                          the head when its weights are wider; the output is the same either way)\n"
"      --mtp               ask for speculation (warns if the model has no MTP head)\n"
"      --no-mtp            plain decoding\n"
"      --mtp-optimistic    keep drafts without verifying them: faster, but the output is NOT\n"
"                          the model's own (lossy); for experiments only\n"
"      --stats-json FILE   write timing and acceptance statistics as JSON\n"
"\n"
"chat (ChatML, the template of every Qwen3.5 / Qwen3.6 / Qwen3-Next model):\n"
"  -i, --interactive       chat in the terminal; the default when stdin and stdout are terminals\n"
"                          and no prompt is given.  -p / -f then give the first message\n"
"      --chat              apply the chat template to the -p / -f prompt too (prints only the reply)\n"
"      --system TEXT       system prompt\n"
"      --think, --no-think replies think first (default), or get an empty think block\n"
"      --hide-think        do not show the thinking (on a terminal it is shown faint)\n"
"      --ctx-shift         when the context fills, drop the oldest turns and read the rest again\n"
"                          (default: say so and stop the reply; /reset starts over)\n"
"  -h, --help              this text\n", f);
}

static long long parse_int(const char *flag, const char *v, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi) die("%s expects an integer in %lld..%lld, got '%s'", flag, lo, hi, v);
    return x;
}

static float parse_float(const char *flag, const char *v, float lo, float hi) {
    char *end;
    errno = 0;
    float x = strtof(v, &end);
    if (!*v || *end || errno || !(x >= lo && x <= hi)) die("%s expects a number in %g..%g, got '%s'", flag, lo, hi, v);
    return x;
}

static int physical_cores(void) {
    int logical = (int)sysconf(_SC_NPROCESSORS_ONLN), cores = 0;
    char seen[4096] = "", path[128], buf[64];
    for (int i = 0; i < logical; i++) {
        FILE *f = fopen(TNAME(path, "/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list", i), "r");
        if (!f) return logical > 0 ? logical : 1;
        if (fgets(buf, sizeof buf, f) && !strstr(seen, buf) && strlen(seen) + strlen(buf) < sizeof seen - 1) {
            strcat(seen, buf);
            cores++;
        }
        fclose(f);
    }
    return cores > 0 ? cores : 1;
}

static void parse_args(int argc, char **argv, Options *o) {
    memset(o, 0, sizeof *o);
    o->n_predict = -2;          /* unset: resolved once we know whether this is a chat */
    o->display_prompt = 1;
    o->think = 1;
    o->mtp = -1;
    o->seed = -1;
    o->sampling = (SamplerCfg){.temp = 0.8f, .top_p = 0.95f, .min_p = 0.05f, .rep_penalty = 1.0f, .top_k = 40, .rep_last_n = 64};
    o->spec = (SpecCfg){.n_draft = 2, .draft_vocab = -1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define FLAG(s, l) (!strcmp(a, s) || !strcmp(a, l))
#define VALUE() (i + 1 < argc ? argv[++i] : (die("%s needs a value", a), ""))
        if (FLAG("-h", "--help")) { usage(stdout); exit(0); }
        else if (FLAG("-m", "--model")) o->model = VALUE();
        else if (FLAG("-p", "--prompt")) o->prompt = VALUE();
        else if (FLAG("-f", "--file")) o->prompt_file = VALUE();
        else if (FLAG("-n", "--n-predict")) o->n_predict = (int)parse_int(a, VALUE(), -1, INT32_MAX);
        else if (FLAG("-c", "--ctx-size")) o->n_ctx = (int)parse_int(a, VALUE(), 1, 1 << 24);
        else if (FLAG("-t", "--threads")) o->n_threads = (int)parse_int(a, VALUE(), 1, 1024);
        else if (FLAG("-s", "--seed")) o->seed = parse_int(a, VALUE(), -1, INT64_MAX);
        else if (FLAG("-q", "--quiet")) o->quiet = 1;
        else if (FLAG("-v", "--verbose")) o->verbose = 1;
        else if (!strcmp(a, "--temp")) o->sampling.temp = parse_float(a, VALUE(), 0, 100);
        else if (!strcmp(a, "--top-k")) o->sampling.top_k = (int)parse_int(a, VALUE(), 0, INT32_MAX);
        else if (!strcmp(a, "--top-p")) o->sampling.top_p = parse_float(a, VALUE(), 0, 1);
        else if (!strcmp(a, "--min-p")) o->sampling.min_p = parse_float(a, VALUE(), 0, 1);
        else if (!strcmp(a, "--repeat-penalty")) o->sampling.rep_penalty = parse_float(a, VALUE(), 0.01f, 100);
        else if (!strcmp(a, "--repeat-last-n")) o->sampling.rep_last_n = (int)parse_int(a, VALUE(), -1, INT32_MAX);
        else if (!strcmp(a, "--no-display-prompt")) o->display_prompt = 0;
        else if (!strcmp(a, "--ids")) o->print_ids = 1;
        else if (!strcmp(a, "--tokenize")) o->tokenize_only = 1;
        else if (!strcmp(a, "--logits-out")) o->logits_out = VALUE();
        else if (!strcmp(a, "--mtp-logits-out")) o->mtp_logits_out = VALUE();
        else if (!strcmp(a, "--ignore-eos")) o->ignore_eos = 1;
        else if (!strcmp(a, "--draft")) o->spec.n_draft = (int)parse_int(a, VALUE(), 0, MAX_DRAFT), o->spec.adaptive = 0;
        else if (!strcmp(a, "--draft-max")) o->spec.n_draft = (int)parse_int(a, VALUE(), 1, MAX_DRAFT), o->spec.adaptive = 1;
        else if (!strcmp(a, "--draft-p-min")) o->spec.p_min = parse_float(a, VALUE(), 0, 1);
        else if (!strcmp(a, "--draft-vocab")) o->spec.draft_vocab = (int)parse_int(a, VALUE(), 0, INT32_MAX);
        else if (!strcmp(a, "--mtp")) o->mtp = 1;
        else if (!strcmp(a, "--no-mtp")) o->mtp = 0;
        else if (!strcmp(a, "--mtp-optimistic")) o->spec.optimistic = 1;
        else if (!strcmp(a, "--draft-exact")) o->draft_exact = 1;
        else if (!strcmp(a, "--ref-kernels")) g_ref_kernels = 1;
        else if (!strcmp(a, "--stats-json")) o->stats_json = VALUE();
        else if (FLAG("-i", "--interactive")) o->interactive = 1;
        else if (!strcmp(a, "--chat")) o->chat = 1;
        else if (!strcmp(a, "--system")) o->system = VALUE();
        else if (!strcmp(a, "--think")) o->think = 1;
        else if (!strcmp(a, "--no-think")) o->think = 0;
        else if (!strcmp(a, "--hide-think")) o->hide_think = 1;
        else if (!strcmp(a, "--ctx-shift")) o->ctx_shift = 1;
        else die("unknown option '%s' (see --help)", a);
#undef FLAG
#undef VALUE
    }
    if (!o->model && !builtin_model_size()) die("no model given (use -m MODEL.gguf; see --help)");
    if (!o->model) o->model = BUILTIN_MODEL;
    if (o->prompt && o->prompt_file) die("give the prompt with -p or -f, not both");
    if (o->spec.n_draft == 0) o->mtp = 0;
    if (!o->prompt && !o->prompt_file && !o->tokenize_only && isatty(0) && isatty(1)) o->interactive = 1;
    if (o->interactive && (o->logits_out || o->mtp_logits_out || o->print_ids || o->tokenize_only))
        die("chat (-i) does not combine with --logits-out, --mtp-logits-out, --ids or --tokenize");
    if (o->interactive && o->n_predict == 0) die("-n 0 leaves no room for replies in chat");
    if (o->n_predict == -2) o->n_predict = o->interactive ? -1 : 128;
    if (o->chat) o->display_prompt = 0;
}

/* The whole of a file (or stdin for "-"), NUL-terminated. */
static char *read_all(const char *path, size_t *len) {
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    if (!f) die("cannot open prompt file '%s': %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = xmalloc(cap);
    for (size_t got; (got = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
        n += got;
        if (cap - n - 1 == 0) {
            if (cap > ((size_t)1 << 32)) die("prompt larger than 4 GB");
            buf = realloc(buf, cap *= 2);
            if (!buf) die("out of memory reading the prompt");
        }
    }
    if (ferror(f)) die("cannot read prompt '%s': %s", path, strerror(errno));
    if (f != stdin) fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* ---- tokenizer from the GGUF metadata ---- */

typedef struct {
    Tokenizer tok;
    uint8_t *eog;               /* [n_vocab] tokens that end generation */
    uint8_t *hidden;            /* [n_vocab] control tokens, never printed as text */
} Vocab;

static TokStr *tok_strs(const GgufKV *kv) {
    Str *s = arr_strings(kv);
    TokStr *t = xcalloc(kv->v.arr.n, sizeof *t);
    for (uint64_t i = 0; i < kv->v.arr.n; i++) {
        if (s[i].n > UINT32_MAX) die("token %llu is too long", (unsigned long long)i);
        t[i] = (TokStr){s[i].s, (uint32_t)s[i].n};
    }
    free(s);
    return t;
}

static void vocab_load(Vocab *v, const Gguf *g) {
    const GgufKV *toks = gguf_find(g, "tokenizer.ggml.tokens"), *merges = gguf_find(g, "tokenizer.ggml.merges");
    const GgufKV *types = gguf_find(g, "tokenizer.ggml.token_type"), *pre = gguf_find(g, "tokenizer.ggml.pre");
    const GgufKV *model = gguf_find(g, "tokenizer.ggml.model");
    if (!toks || toks->type != GG_ARR || toks->v.arr.type != GG_STR) die("model has no tokenizer.ggml.tokens");
    if (!model || model->type != GG_STR || !str_eq(model->v.str, "gpt2")) die("tokenizer model must be 'gpt2' (byte-level BPE)");
    if (!merges || merges->type != GG_ARR || merges->v.arr.type != GG_STR) die("model has no tokenizer.ggml.merges");
    if (toks->v.arr.n > (1u << 22) || merges->v.arr.n > (1u << 23)) die("tokenizer is implausibly large");
    int n_vocab = (int)toks->v.arr.n;
    int32_t *type = NULL;
    if (types) {
        if (!arr_is_int(types) || types->v.arr.n != (uint64_t)n_vocab)
            die("tokenizer.ggml.token_type must be %d integers", n_vocab);
        type = xcalloc(n_vocab, sizeof *type);
        for (int i = 0; i < n_vocab; i++) type[i] = (int32_t)arr_int(types, i);
    }
    char pre_name[32] = "qwen2", err[256];
    if (pre && pre->type == GG_STR) snprintf(pre_name, sizeof pre_name, "%.*s", (int)(pre->v.str.n < 31 ? pre->v.str.n : 31), pre->v.str.s);
    TokStr *ts = tok_strs(toks), *ms = tok_strs(merges);
    int rc = tok_init(&v->tok, ts, type, n_vocab, ms, (int)merges->v.arr.n, pre_name, err, sizeof err);
    free(ts);
    free(ms);
    if (rc) {
        free(type);   /* so the fuzz harness, whose die() returns, stays leak-free */
        die("tokenizer: %s", err);
    }
    const GgufKV *nfc = gguf_find(g, "tokenizer.ggml.normalizer.nfc");
    if (nfc && kv_is_int(nfc)) v->tok.nfc = nfc->v.u != 0;
    v->eog = xcalloc(n_vocab, 1);
    v->hidden = xcalloc(n_vocab, 1);
    for (int i = 0; type && i < n_vocab; i++) v->hidden[i] = type[i] == 3;
    const char *eog_keys[] = {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"};
    for (int i = 0; i < 3; i++) {
        int64_t id = meta_int(g, eog_keys[i], -1);
        if (id >= 0 && id < n_vocab) v->eog[id] = 1;
    }
    Str *names = arr_strings(toks);
    for (int i = 0; i < n_vocab; i++)
        if (v->hidden[i] && (str_eq(names[i], "<|im_end|>") || str_eq(names[i], "<|endoftext|>"))) v->eog[i] = 1;
    free(names);
    free(type);
}

static void vocab_free(Vocab *v) {
    tok_free(&v->tok);
    free(v->eog);
    free(v->hidden);
}

/* ---- output ---- */

typedef struct {
    const Vocab *vocab;
    TokStream stream;
    int print_ids;
    int n_printed;
    char *buf;                  /* [3 * (max_piece + 3)]: enough for any token tok_stream emits */
} Printer;

/* The reader of stdout went away (EPIPE, as SIGPIPE is ignored): end quietly, as the signal
 * would have.  Any other write error is reported. */
static void out_failed(void) {
    if (errno != EPIPE) die("cannot write the output: %s", strerror(errno));
    exit(0);
}

static void out_write(const char *s, size_t n) {
    if (n && fwrite(s, 1, n, stdout) != n) out_failed();
}

/* stdout is buffered, so a failed write may show only here. */
static void out_flush(void) {
    if (fflush(stdout)) out_failed();
}

static void printer_init(Printer *p, const Vocab *v, int print_ids) {
    memset(p, 0, sizeof *p);
    p->vocab = v;
    p->print_ids = print_ids;
    p->buf = xmalloc(3 * ((size_t)v->tok.max_piece + 3) + 32);
}

static int print_token(void *ud, int32_t t) {
    Printer *p = ud;
    int cap = 3 * (p->vocab->tok.max_piece + 3);
    if (p->print_ids)
        out_write(p->buf, (size_t)snprintf(p->buf, (size_t)cap + 32, "%s%d", p->n_printed++ ? " " : "", t));
    else if (!p->vocab->hidden[t])
        out_write(p->buf, (size_t)tok_stream(&p->vocab->tok, &p->stream, t, p->buf, cap));
    out_flush();
    return 0;
}

static void printer_finish(Printer *p) {
    if (p->print_ids)
        out_write("\n", 1);
    else
        out_write(p->buf, (size_t)tok_stream_flush(&p->stream, p->buf, 3 * (p->vocab->tok.max_piece + 3)));
    out_flush();
    free(p->buf);
}

/* ---- statistics ---- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Inter-token latency percentile: speculation makes tokens arrive in bursts. */
static double itl_percentile(const Stats *s, double q) {
    if (s->n_gen < 2) return 0;
    double *d = xmalloc((size_t)(s->n_gen - 1) * sizeof *d);
    for (int i = 1; i < s->n_gen; i++) d[i - 1] = s->token_ms[i] - s->token_ms[i - 1];
    qsort(d, (size_t)s->n_gen - 1, sizeof *d, cmp_double);
    double v = d[(int)(q * (s->n_gen - 2) + 0.5)];
    free(d);
    return v;
}

static double rate(double n, double ms) { return ms > 0 ? n * 1000.0 / ms : 0; }

static long peak_rss_mb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss / 1024;
}

/* Weight bytes one decode step streams: every main-model matrix, the LM
 * head, and of the experts only the routed share; not the embedding rows
 * (one row each) nor the MTP block (drafts only). */
static double weight_bytes_per_token(const Model *m) {
    const Config *c = &m->cfg;
    char mtp_prefix[32];
    snprintf(mtp_prefix, sizeof mtp_prefix, "blk.%d.", c->n_layer);
    int tied = !gguf_tensor(&m->gguf, "output.weight");
    double bytes = 0;
    for (uint64_t i = 0; i < m->gguf.n_tensors; i++) {
        const GgufTensor *t = &m->gguf.tensors[i];
        if ((str_eq(t->name, "token_embd.weight") && !tied) ||
            (t->name.n > strlen(mtp_prefix) && !memcmp(t->name.s, mtp_prefix, strlen(mtp_prefix))))
            continue;
        int expert = t->name.n > 5 && memmem(t->name.s, t->name.n, "_exps", 5);
        bytes += expert ? (double)t->nbytes * c->n_expert_used / c->n_expert : (double)t->nbytes;
    }
    return bytes;
}

static void print_stats(const Gen *g, const Model *m, int mtp) {
    const Stats *s = &g->st;
    double gb = weight_bytes_per_token(m) / 1e9;
    fprintf(stderr, "mtp-gen: load %.0f ms | prompt %d tok, %.1f tok/s | gen %d tok, %.2f tok/s (%.1f GB/s of weights) | first token %.1f ms | peak RSS %ld MB\n",
            s->load_ms, s->n_prompt, rate(s->n_prompt, s->prompt_ms), s->n_gen, rate(s->n_gen, s->gen_ms),
            rate(s->n_gen, s->gen_ms) * gb, s->first_token_ms, peak_rss_mb());
    if (!mtp) return;
    fprintf(stderr, "mtp-gen: mtp: steps %ld | drafted %ld | tested %ld | accepted %ld (%.1f%%) | mean accepted/step %.2f | draft %.0f ms, verify %.0f ms, rollback %.2f ms | itl p50 %.1f ms, p95 %.1f ms\n",
            s->steps, s->drafted, s->tested, s->accepted, s->tested ? 100.0 * s->accepted / s->tested : 0,
            s->steps ? (double)s->accepted / s->steps : 0, s->draft_ms, s->verify_ms, s->rollback_ms,
            itl_percentile(s, 0.5), itl_percentile(s, 0.95));
    fprintf(stderr, "mtp-gen: mtp: acceptance by draft position:");
    for (int i = 0; i < MAX_DRAFT && s->tested_at[i]; i++) fprintf(stderr, " %d:%.0f%%", i + 1, 100.0 * s->accepted_at[i] / s->tested_at[i]);
    fputc('\n', stderr);
}

static void write_stats_json(const char *path, const Gen *g, const Model *m) {
    const Stats *s = &g->st;
    FILE *f = fopen(path, "w");
    if (!f) die("cannot write stats to '%s': %s", path, strerror(errno));
    fprintf(f, "{\n  \"n_prompt\": %d, \"n_gen\": %d, \"load_ms\": %.3f, \"prompt_ms\": %.3f, \"gen_ms\": %.3f,\n"
               "  \"prompt_tok_s\": %.3f, \"gen_tok_s\": %.3f, \"first_token_ms\": %.3f,\n"
               "  \"itl_p50_ms\": %.3f, \"itl_p95_ms\": %.3f, \"peak_rss_mb\": %ld, \"model_bytes\": %zu, \"weight_bytes_per_token\": %.0f,\n"
               "  \"mtp\": %s, \"steps\": %ld, \"drafted\": %ld, \"tested\": %ld, \"accepted\": %ld,\n"
               "  \"acceptance\": %.4f, \"mean_accepted_per_step\": %.4f,\n"
               "  \"draft_ms\": %.3f, \"verify_ms\": %.3f, \"rollback_ms\": %.3f,\n  \"accepted_at\": [",
            s->n_prompt, s->n_gen, s->load_ms, s->prompt_ms, s->gen_ms, rate(s->n_prompt, s->prompt_ms), rate(s->n_gen, s->gen_ms),
            s->first_token_ms, itl_percentile(s, 0.5), itl_percentile(s, 0.95), peak_rss_mb(), m->file.size, weight_bytes_per_token(m),
            g->use_mtp ? "true" : "false", s->steps, s->drafted, s->tested, s->accepted,
            s->tested ? (double)s->accepted / s->tested : 0, s->steps ? (double)s->accepted / s->steps : 0,
            s->draft_ms, s->verify_ms, s->rollback_ms);
    for (int i = 0; i < MAX_DRAFT && s->tested_at[i]; i++) fprintf(f, "%s%ld", i ? ", " : "", s->accepted_at[i]);
    fprintf(f, "],\n  \"tested_at\": [");
    for (int i = 0; i < MAX_DRAFT && s->tested_at[i]; i++) fprintf(f, "%s%ld", i ? ", " : "", s->tested_at[i]);
    fprintf(f, "],\n  \"verify_ms_by_batch\": [");
    for (int i = 1; i < MAX_DRAFT + 2; i++) fprintf(f, "%s%.3f", i > 1 ? ", " : "", g->t_verify[i]);
    fprintf(f, "]\n}\n");
    if (fclose(f)) die("cannot write stats to '%s': %s", path, strerror(errno));
}

/* ==== REPL ====
 * Interactive chat on top of generate(): every turn appends its tokens to the
 * sequence, and the caches already hold everything before it, so a turn
 * costs only its own tokens.  The MTP head stays in step even while drafting
 * is switched off, so /mtp on works at any point of a conversation.  The
 * template is ChatML, recognised rather than interpreted: every Qwen family
 * speaks it, and a Jinja engine would be a project of its own. */

/* ---- growable text ---- */

typedef struct { char *s; size_t n, cap; } Buf;   /* s is NUL-terminated once anything was put */

static void buf_insert(Buf *b, size_t at, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1);
        b->s = realloc(b->s, b->cap);
        if (!b->s) die("out of memory");
    }
    memmove(b->s + at + n, b->s + at, b->n - at);
    memcpy(b->s + at, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void buf_put(Buf *b, const char *s, size_t n) { buf_insert(b, b->n, s, n); }
static void buf_puts(Buf *b, const char *s) { buf_put(b, s, strlen(s)); }

static void buf_printf(Buf *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    buf_put(b, tmp, n < (int)sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void buf_erase(Buf *b, size_t from, size_t to) {
    if (from == to) return;     /* also keeps an empty, never-allocated buffer untouched */
    memmove(b->s + from, b->s + to, b->n - to + 1);
    b->n -= to - from;
}

static void buf_clear(Buf *b) {
    b->n = 0;
    if (b->s) b->s[0] = 0;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(xmalloc(n), s, n);
}

/* ---- chat template ----
 * <|im_start|>system\nSYSTEM<|im_end|>\n                  first turn only, when set
 * <|im_start|>user\nTEXT<|im_end|>\n<|im_start|>assistant\n
 * then "<think>\n\n</think>\n\n" when thinking is off (Qwen3's and Qwen3.5's
 * enable_thinking=false), or "<think>\n" when thinking is on and the template
 * opens the block itself (Qwen3.5's does, Qwen3's leaves it to the model).
 * Past replies stay in the context as generated, thinking included: Qwen's
 * templates strip old thinking, which would mean re-processing history. */

typedef struct {
    int32_t im_start, im_end;           /* ChatML's turn markers */
    int32_t think_open, think_close;    /* <think> and </think>, -1 when the vocabulary lacks them */
    int opens_think;                    /* the generation prompt opens the think block */
    int think;                          /* replies think first; off inserts an empty think block */
    char *system;                       /* system prompt, or NULL */
} Chat;

/* Whether the part of the template after its last add_generation_prompt
 * emits a bare "<think>\n" (escaped or literal newline, either quote). */
static int template_opens_think(Str tpl) {
    const char *gen = NULL, *end = tpl.s + tpl.n;
    for (const char *p = tpl.s; (p = memmem(p, (size_t)(end - p), "add_generation_prompt", 21)); p++) gen = p;
    if (!gen) return 0;
    static const char *const forms[] = {"<think>\\n'", "<think>\\n\"", "<think>\n'", "<think>\n\""};
    for (int i = 0; i < 4; i++)
        if (memmem(gen, (size_t)(end - gen), forms[i], strlen(forms[i]))) return 1;
    return 0;
}

static int32_t token_named(const Vocab *v, const char *text) { return vocab_find(&v->tok, text, strlen(text)); }

static void chat_init(Chat *ch, const Gguf *gg, const Vocab *v, int think, const char *system) {
    const GgufKV *tpl = gguf_find(gg, "tokenizer.chat_template");
    memset(ch, 0, sizeof *ch);
    ch->im_start = token_named(v, "<|im_start|>");
    ch->im_end = token_named(v, "<|im_end|>");
    ch->think_open = token_named(v, "<think>");
    ch->think_close = token_named(v, "</think>");
    if (tpl && tpl->type != GG_STR) die("tokenizer.chat_template is not a string");
    if (ch->im_start < 0 || ch->im_end < 0)
        die("chat needs ChatML's <|im_start|> and <|im_end|> tokens, and this model's vocabulary lacks them");
    if (tpl && !memmem(tpl->v.str.s, tpl->v.str.n, "<|im_start|>", 12))
        die("this model's chat template is not ChatML (<|im_start|>role ... <|im_end|>), the only one mtp-gen supports");
    if (ch->think_open < 0 || ch->think_close < 0) ch->think_open = ch->think_close = -1;
    ch->opens_think = tpl && ch->think_open >= 0 && template_opens_think(tpl->v.str);
    ch->think = think;
    ch->system = system ? xstrdup(system) : NULL;
}

static void chat_set_system(Chat *ch, const char *system) {
    free(ch->system);
    ch->system = system ? xstrdup(system) : NULL;
}

/* What ends the previous reply before a new turn: nothing at the start,
 * the newline after its <|im_end|>, or the whole end marker when the reply
 * was cut short (budget, Ctrl-C, full context). */
static const char *chat_lead(const Chat *ch, const int32_t *toks, int n_toks) {
    if (n_toks == 0) return "";
    return toks[n_toks - 1] == ch->im_end ? "\n" : "<|im_end|>\n";
}

/* A user turn and the opening of the reply after lead (see chat_lead);
 * with_system starts a conversation. */
static char *chat_turn(const Chat *ch, const char *lead, const char *user, int with_system) {
    Buf b = {0};
    buf_puts(&b, lead);
    if (with_system && ch->system) {
        buf_puts(&b, "<|im_start|>system\n");
        buf_puts(&b, ch->system);
        buf_puts(&b, "<|im_end|>\n");
    }
    buf_puts(&b, "<|im_start|>user\n");
    buf_puts(&b, user);
    buf_puts(&b, "<|im_end|>\n<|im_start|>assistant\n");
    if (ch->think_open >= 0 && !ch->think)
        buf_puts(&b, "<think>\n\n</think>\n\n");
    else if (ch->opens_think)
        buf_puts(&b, "<think>\n");
    return b.s;
}

/* --chat: a one-shot prompt (text, consumed) becomes the first turn of a conversation. */
static char *chat_prompt(const Gguf *gg, const Vocab *v, const Options *o, char *text, size_t *len) {
    Chat ch;
    chat_init(&ch, gg, v, o->think, o->system);
    char *body = chat_turn(&ch, "", text, 1);
    free(text);
    free(ch.system);
    *len = strlen(body);
    return body;
}

/* ---- terminal ---- */

static struct termios g_tty_saved;
static int g_tty_raw;

static void term_write(const char *s, size_t n) {
    while (n) {
        ssize_t w = write(1, s, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void term_puts(const char *s) { term_write(s, strlen(s)); }

static int term_cols(void) {
    struct winsize ws;
    return ioctl(1, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 ? ws.ws_col : 80;
}

/* Back to the mode the terminal had; also runs at exit, so a die() while
 * editing leaves no raw terminal behind. */
static void tty_restore(void) {
    if (!g_tty_raw) return;
    term_puts("\x1b[?2004l");
    tcsetattr(0, TCSANOW, &g_tty_saved);
    g_tty_raw = 0;
}

/* Keys as bytes, no echo, no signals (Ctrl-C is a key while editing), and
 * bracketed paste so a paste's newlines arrive marked as such.  TCSANOW, not
 * TCSAFLUSH: what was typed during a reply is kept. */
static int tty_raw(void) {
    struct termios t;
    if (tcgetattr(0, &g_tty_saved)) return -1;
    t = g_tty_saved;
    t.c_iflag &= ~(tcflag_t)(BRKINT | ICRNL | INPCK | ISTRIP | IXON);
    t.c_lflag &= ~(tcflag_t)(ECHO | ICANON | IEXTEN | ISIG);
    t.c_cflag |= CS8;
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (tcsetattr(0, TCSANOW, &t)) return -1;
    g_tty_raw = 1;
    term_puts("\x1b[?2004h");
    return 0;
}

/* One byte of input, -1 at end of input or after timeout_ms (< 0: wait). */
static int read_byte(int timeout_ms) {
    struct pollfd p = {0, POLLIN, 0};
    if (timeout_ms >= 0 && poll(&p, 1, timeout_ms) <= 0) return -1;
    unsigned char c;
    ssize_t r;
    while ((r = read(0, &c, 1)) < 0 && errno == EINTR) {}
    return r == 1 ? c : -1;
}

static int input_pending(void) {
    struct pollfd p = {0, POLLIN, 0};
    return poll(&p, 1, 0) > 0;
}

enum { K_UP = 256, K_DOWN, K_LEFT, K_RIGHT, K_HOME, K_END, K_DEL, K_WORD_LEFT, K_WORD_RIGHT, K_PASTE_ON, K_PASTE_OFF, K_OTHER };

/* A key: a byte, or one of K_* for the escape sequences terminals send.
 * A lone Escape or an unknown sequence is K_OTHER. */
static int read_key(void) {
    static const struct { const char *seq; int key; } seqs[] = {
        {"[A", K_UP}, {"[B", K_DOWN}, {"[C", K_RIGHT}, {"[D", K_LEFT}, {"OA", K_UP}, {"OB", K_DOWN},
        {"OC", K_RIGHT}, {"OD", K_LEFT}, {"[H", K_HOME}, {"[F", K_END}, {"OH", K_HOME}, {"OF", K_END},
        {"[1~", K_HOME}, {"[7~", K_HOME}, {"[4~", K_END}, {"[8~", K_END}, {"[3~", K_DEL},
        {"[1;5C", K_WORD_RIGHT}, {"[1;5D", K_WORD_LEFT}, {"[1;3C", K_WORD_RIGHT}, {"[1;3D", K_WORD_LEFT},
        {"[200~", K_PASTE_ON}, {"[201~", K_PASTE_OFF},
    };
    int c = read_byte(-1);
    if (c != 27) return c;
    char seq[16];
    int n = 0;
    if ((c = read_byte(50)) != '[' && c != 'O') return K_OTHER;
    seq[n++] = (char)c;
    while (n < (int)sizeof seq - 1 && (c = read_byte(50)) >= 0) {
        seq[n++] = (char)c;
        if (c >= 0x40 && c <= 0x7E) break;
    }
    seq[n] = 0;
    for (size_t i = 0; i < sizeof seqs / sizeof *seqs; i++)
        if (!strcmp(seq, seqs[i].seq)) return seqs[i].key;
    return K_OTHER;
}

/* Columns a character takes: 0 for combining marks and joiners, 2 for East
 * Asian wide characters and emoji, else 1. */
static int char_cols(uint32_t cp) {
    static const uint32_t wide[][2] = {
        {0x1100, 0x115F}, {0x2E80, 0x303E}, {0x3041, 0x33FF}, {0x3400, 0x4DBF}, {0x4E00, 0x9FFF},
        {0xA000, 0xA4CF}, {0xAC00, 0xD7A3}, {0xF900, 0xFAFF}, {0xFE30, 0xFE4F}, {0xFF00, 0xFF60},
        {0xFFE0, 0xFFE6}, {0x1F300, 0x1F64F}, {0x1F900, 0x1F9FF}, {0x20000, 0x3FFFD},
    };
    if (cp == 0x200B || cp == 0x200D || (cp >= 0xFE00 && cp <= 0xFE0F) || (cp < TOK_INVALID && combining_class(cp))) return 0;
    for (size_t i = 0; i < sizeof wide / sizeof *wide; i++)
        if (cp >= wide[i][0] && cp <= wide[i][1]) return 2;
    return 1;
}

/* ---- line editor ----
 * The line is a UTF-8 buffer that may hold newlines (a paste, or lines
 * continued with a trailing backslash).  Every change redraws it all: back
 * to the prompt's first row, clear below, print, put the cursor where it
 * belongs.  Simple, and cheap at the speed of typing. */

enum { ED_LINE, ED_CANCEL, ED_EXIT };  /* how a read ended: a line, Ctrl-C on a line, Ctrl-C/D or end of input */
enum { ED_MORE = -1 };                 /* a key handled, keep editing */
#define ED_PROMPT "> "
#define ED_CONT "... "                 /* before each continued line */
#define HIST_MAX 1000

typedef struct {
    int tty;                    /* stdin and stdout are terminals: edit; otherwise read plain lines */
    Buf line;                   /* the text being edited */
    size_t pos;                 /* cursor, a byte offset on a character boundary */
    int cursor_row;             /* screen rows from the prompt's first row to the cursor */
    int pasting;                /* inside a bracketed paste: Enter is a newline of the text */
    char *hist[HIST_MAX + 1];   /* past lines, oldest first, and the line being edited at n_hist */
    int n_hist, hist_at;
} LineEd;

static size_t prev_char(const Buf *b, size_t i) {
    while (i > 0 && (b->s[--i] & 0xC0) == 0x80) {}
    return i;
}

static size_t next_char(const Buf *b, size_t i) {
    if (i < b->n) i++;
    while (i < b->n && (b->s[i] & 0xC0) == 0x80) i++;
    return i;
}

static size_t line_start(const Buf *b, size_t i) {
    while (i > 0 && b->s[i - 1] != '\n') i--;
    return i;
}

static size_t line_end(const Buf *b, size_t i) {
    while (i < b->n && b->s[i] != '\n') i++;
    return i;
}

static int is_blank(char c) { return c == ' ' || c == '\t' || c == '\n'; }

static size_t word_left(const Buf *b, size_t i) {
    while (i > 0 && is_blank(b->s[i - 1])) i--;
    while (i > 0 && !is_blank(b->s[i - 1])) i--;
    return i;
}

static size_t word_right(const Buf *b, size_t i) {
    while (i < b->n && is_blank(b->s[i])) i++;
    while (i < b->n && !is_blank(b->s[i])) i++;
    return i;
}

/* Screen row and column after the prompt and line[0..upto).  A column equal
 * to the width means the terminal's pending wrap: the cursor is shown at the
 * start of the next row. */
static void ed_locate(const Buf *b, size_t upto, int cols, int *row, int *col) {
    int r = 0, c = (int)strlen(ED_PROMPT);
    for (size_t i = 0, len; i < upto; i += len) {
        uint32_t cp = utf8_decode((const unsigned char *)b->s + i, b->n - i, &len);
        if (cp == '\n') {
            r++;
            c = (int)strlen(ED_CONT);
            continue;
        }
        int w = char_cols(cp);
        if (c + w > cols) {
            r++;
            c = 0;
        }
        c += w;
    }
    *row = r;
    *col = c;
}

static void ed_refresh(LineEd *e) {
    int cols = term_cols(), row, col, crow, ccol;
    Buf out = {0};
    if (e->cursor_row) buf_printf(&out, "\x1b[%dA", e->cursor_row);
    buf_puts(&out, "\r\x1b[J" ED_PROMPT);
    for (size_t i = 0; i < e->line.n; i++) {
        char c = e->line.s[i];
        if (c == '\n')
            buf_puts(&out, "\r\n" ED_CONT);
        else
            buf_put(&out, c == '\t' ? " " : &e->line.s[i], 1);
    }
    ed_locate(&e->line, e->line.n, cols, &row, &col);
    if (col >= cols) {
        buf_puts(&out, "\r\n");
        row++;
    }
    ed_locate(&e->line, e->pos, cols, &crow, &ccol);
    if (ccol >= cols) {
        crow++;
        ccol = 0;
    }
    if (row > crow) buf_printf(&out, "\x1b[%dA", row - crow);
    buf_puts(&out, "\r");
    if (ccol) buf_printf(&out, "\x1b[%dC", ccol);
    e->cursor_row = crow;
    term_write(out.s, out.n);
    free(out.s);
}

/* Leave the cursor below the whole line, ready for what comes next. */
static void ed_finish(LineEd *e, const char *mark) {
    e->pos = e->line.n;
    ed_refresh(e);
    term_puts(mark);
    term_puts("\r\n");
}

static void ed_insert(LineEd *e, const char *s, size_t n) {
    buf_insert(&e->line, e->pos, s, n);
    e->pos += n;
}

/* A typed character: its lead byte came as the key, the rest follows. */
static void ed_insert_char(LineEd *e, int lead) {
    char ch[4] = {(char)lead};
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1, n = 1;
    for (int c; n < need && (c = read_byte(100)) >= 0; n++) ch[n] = (char)c;
    ed_insert(e, ch, n);
}

static void hist_move(LineEd *e, int dir) {
    int to = e->hist_at + dir;
    if (to < 0 || to > e->n_hist) return;
    free(e->hist[e->hist_at]);
    e->hist[e->hist_at] = xstrdup(e->line.s ? e->line.s : "");
    e->hist_at = to;
    buf_clear(&e->line);
    buf_puts(&e->line, e->hist[to]);
    e->pos = e->line.n;
}

static void hist_add(LineEd *e, const char *line) {
    if (!line[0] || (e->n_hist && !strcmp(e->hist[e->n_hist - 1], line))) return;
    if (e->n_hist == HIST_MAX) {
        free(e->hist[0]);
        memmove(e->hist, e->hist + 1, (HIST_MAX - 1) * sizeof *e->hist);
        e->n_hist--;
    }
    e->hist[e->n_hist++] = xstrdup(line);
}

/* Enter: a newline inside a paste or after a trailing backslash, else the line is done. */
static int ed_enter(LineEd *e) {
    Buf *b = &e->line;
    if (e->pasting || input_pending()) {   /* input already waiting: a paste without bracketed-paste support */
        ed_insert(e, "\n", 1);
        return ED_MORE;
    }
    if (b->n && b->s[b->n - 1] == '\\') {
        b->s[b->n - 1] = '\n';
        e->pos = b->n;
        return ED_MORE;
    }
    ed_finish(e, "");
    return ED_LINE;
}

static int ed_key(LineEd *e, int key) {
    Buf *b = &e->line;
    size_t p;
    switch (key) {
    case -1: ed_finish(e, ""); return ED_EXIT;
    case 3: ed_finish(e, "^C"); return b->n ? ED_CANCEL : ED_EXIT;
    case 4:
        if (!b->n) { ed_finish(e, ""); return ED_EXIT; }
        buf_erase(b, e->pos, next_char(b, e->pos));
        break;
    case '\r': case '\n':
        if (ed_enter(e) == ED_LINE) return ED_LINE;
        break;
    case 1: case K_HOME: e->pos = line_start(b, e->pos); break;
    case 5: case K_END: e->pos = line_end(b, e->pos); break;
    case 2: case K_LEFT: e->pos = prev_char(b, e->pos); break;
    case 6: case K_RIGHT: e->pos = next_char(b, e->pos); break;
    case K_WORD_LEFT: e->pos = word_left(b, e->pos); break;
    case K_WORD_RIGHT: e->pos = word_right(b, e->pos); break;
    case 8: case 127:
        p = prev_char(b, e->pos);
        buf_erase(b, p, e->pos);
        e->pos = p;
        break;
    case K_DEL: buf_erase(b, e->pos, next_char(b, e->pos)); break;
    case 11: buf_erase(b, e->pos, line_end(b, e->pos)); break;
    case 21:
        p = line_start(b, e->pos);
        buf_erase(b, p, e->pos);
        e->pos = p;
        break;
    case 23:
        p = word_left(b, e->pos);
        buf_erase(b, p, e->pos);
        e->pos = p;
        break;
    case 12:
        term_puts("\x1b[H\x1b[2J");
        e->cursor_row = 0;
        break;
    case 16: case K_UP: hist_move(e, -1); break;
    case 14: case K_DOWN: hist_move(e, +1); break;
    case K_PASTE_ON: e->pasting = 1; break;
    case K_PASTE_OFF: e->pasting = 0; break;
    case '\t': ed_insert(e, "\t", 1); break;
    default:
        if (key >= 32 && key < 256 && key != 127) ed_insert_char(e, key);
    }
    ed_refresh(e);
    return ED_MORE;
}

/* Without a terminal: a line at a time, a trailing backslash continuing it. */
static int plain_read(char **out) {
    Buf b = {0};
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = -1;
    int got = 0;
    if (isatty(0)) fputs(ED_PROMPT, stderr);
    while ((n = getline(&line, &cap, stdin)) > 0) {
        got = 1;
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        int more = n && line[n - 1] == '\\';
        buf_put(&b, line, (size_t)n - more);
        if (!more) break;
        buf_put(&b, "\n", 1);
        if (isatty(0)) fputs(ED_CONT, stderr);
    }
    free(line);
    if (!got) return ED_EXIT;
    *out = b.s ? b.s : xstrdup("");
    return ED_LINE;
}

/* Read one line (*out is malloc'd) with editing when on a terminal. */
static int ed_read(LineEd *e, char **out) {
    if (!e->tty || tty_raw()) return plain_read(out);
    buf_clear(&e->line);
    e->pos = 0;
    e->cursor_row = 0;
    e->pasting = 0;
    e->hist[e->n_hist] = xstrdup("");
    e->hist_at = e->n_hist;
    ed_refresh(e);
    int rc;
    while ((rc = ed_key(e, read_key())) == ED_MORE) {}
    tty_restore();
    free(e->hist[e->n_hist]);
    if (rc == ED_LINE) {
        *out = xstrdup(e->line.s ? e->line.s : "");
        hist_add(e, *out);
    }
    return rc;
}

static void ed_init(LineEd *e) {
    memset(e, 0, sizeof *e);
    e->tty = isatty(0) && isatty(1);
    if (e->tty) atexit(tty_restore);
}

static void ed_free(LineEd *e) {
    for (int i = 0; i < e->n_hist; i++) free(e->hist[i]);
    free(e->line.s);
}

/* ---- showing a reply ----
 * Control tokens never show, nor do the tags of a think block; what is
 * between the tags is faint (SGR 2) on a terminal, or hidden. */

typedef struct {
    const Vocab *vocab;
    const Chat *chat;
    TokStream stream;
    char *buf;                  /* one token's text */
    int cap;
    int thinking;               /* inside <think> ... </think> */
    int hide_think;
    int can_faint;              /* stdout is a terminal */
    int faint;                  /* SGR 2 is on */
    int last;                   /* the last byte shown of this reply, 0 before any */
} Show;

static void show_init(Show *s, const Vocab *v, const Chat *ch, int hide_think) {
    memset(s, 0, sizeof *s);
    s->vocab = v;
    s->chat = ch;
    s->hide_think = hide_think;
    s->can_faint = isatty(1);
    s->cap = 3 * (v->tok.max_piece + 3);
    s->buf = xmalloc((size_t)s->cap);
}

static void show_bytes(Show *s, const char *p, int n) {
    if (n <= 0) return;
    if (s->can_faint && s->faint != s->thinking) {
        out_write(s->thinking ? "\x1b[2m" : "\x1b[22m", s->thinking ? 4 : 5);
        s->faint = s->thinking;
    }
    out_write(p, (size_t)n);
    s->last = (unsigned char)p[n - 1];
}

static void show_flush(Show *s) { show_bytes(s, s->buf, tok_stream_flush(&s->stream, s->buf, s->cap)); }

/* A reply starts inside a think block when its prompt left one open. */
static void show_begin(Show *s, const int32_t *prompt, int n) {
    s->last = s->thinking = 0;
    for (int i = 0; i < n; i++)
        if (prompt[i] == s->chat->think_open || prompt[i] == s->chat->think_close) s->thinking = prompt[i] == s->chat->think_open;
}

static int show_token(void *ud, int32_t t) {
    Show *s = ud;
    if (t == s->chat->think_open || t == s->chat->think_close) {
        show_flush(s);
        s->thinking = t == s->chat->think_open;
    } else if (!s->vocab->hidden[t] && !(s->thinking && s->hide_think)) {
        show_bytes(s, s->buf, tok_stream(&s->vocab->tok, &s->stream, t, s->buf, s->cap));
    }
    out_flush();
    return 0;
}

static void show_end(Show *s) {
    show_flush(s);
    if (s->faint) out_write("\x1b[22m", 5);
    if (s->last && s->last != '\n') out_write("\n", 1);
    s->faint = s->thinking = 0;
    out_flush();
}

/* ---- the session ---- */

typedef struct {
    Gen *g;
    const Model *model;
    const Vocab *vocab;
    const Options *o;
    Chat chat;
    Show show;
    LineEd ed;
    SpecCfg spec_on;            /* what /mtp on restores */
    int budget;                 /* tokens per reply */
} Repl;

/* Back to an empty sequence: the caches are just truncated, but DeltaNet
 * state has to restart from zeros. */
static void repl_forget(Gen *g) {
    State *st = &g->e->st;
    const Config *c = &g->e->model->cfg;
    for (int l = 0; l < c->n_layer; l++)
        if (c->recurrent[l]) {
            memset(st->conv[l], 0, conv_window_floats(c) * sizeof(float));
            memset(st->ssm[l], 0, ssm_floats(c) * sizeof(float));
        }
    st->n_past = st->conv_at = st->mtp_n = 0;
    g->n_toks = g->n_pend = 0;
}

/* Room for a longer speculative batch: rows to record its tokens in (and
 * the state after it, if there was no speculation before). */
static void state_grow_spec(State *st, const Config *c, int spec_max) {
    if (spec_max <= st->spec_max) return;
    for (int l = 0; l < c->n_layer; l++) {
        if (!c->recurrent[l]) continue;
        afree(st->spec_rows[l]);
        alloc_spec_buffers(st, c, l, spec_max);
    }
    st->spec_max = spec_max;
}

/* The counters /stats and the per-turn line show cover one turn. */
static void stats_reset(Stats *s) {
    Stats keep = *s;
    memset(s, 0, sizeof *s);
    s->load_ms = keep.load_ms;
    s->token_ms = keep.token_ms;
    s->token_cap = keep.token_cap;
}

static void turn_summary(const Gen *g) {
    const Stats *s = &g->st;
    int faint = isatty(2);
    fprintf(stderr, "%s[prompt %d tok, %.1f tok/s | reply %d tok, %.2f tok/s", faint ? "\x1b[2m" : "", s->n_prompt,
            rate(s->n_prompt, s->prompt_ms), s->n_gen, rate(s->n_gen, s->gen_ms));
    if (s->steps)
        fprintf(stderr, " | mtp %.0f%% accepted, %.2f tok/step", s->tested ? 100.0 * s->accepted / s->tested : 0,
                (double)(s->steps + s->accepted) / s->steps);
    fprintf(stderr, "]%s\n", faint ? "\x1b[22m" : "");
}

static void encode_text(const Vocab *v, const char *text, int32_t **ids, int *n) {
    if (tok_encode(&v->tok, text, strlen(text), 1, ids, n)) die("out of memory tokenising a message");
}

/* Whether a user turn starts at toks[i]: <|im_start|> then "user\n". */
static int user_turn_at(const Repl *r, const int32_t *toks, int n, int i) {
    const Tokenizer *t = &r->vocab->tok;
    char got[5];
    size_t k = 0;
    if (toks[i] != r->chat.im_start) return 0;
    for (int j = i + 1; j < n && k < sizeof got; j++)
        for (uint32_t b = t->bytes_at[toks[j]]; b < t->bytes_at[toks[j] + 1] && k < sizeof got; b++) got[k++] = t->bytes[b];
    return k == sizeof got && !memcmp(got, "user\n", sizeof got);
}

/* Make room for a turn of n tokens, the first n_lead closing the previous
 * reply.  Without --ctx-shift a turn that does not fit is refused.  With it,
 * once less than a quarter of the context would be left for the reply, the
 * oldest turns go: the system block and the newest turns that fit in half
 * the context are kept and read again (DeltaNet state cannot forget a
 * prefix).  After a shift *ids / *n hold the whole new prompt.  Returns -1
 * when the turn cannot be taken. */
static int repl_room(Repl *r, int32_t **ids, int *n, int n_lead) {
    Gen *g = r->g;
    int n_ctx = g->e->st.n_ctx, reserve = r->o->ctx_shift ? n_ctx / 4 : 1;
    if (g->n_toks + *n + reserve <= n_ctx) return 0;
    if (!r->o->ctx_shift) {
        fprintf(stderr, "context full (%d of %d tokens used, this message needs %d): /reset starts a new conversation; "
                        "a larger -c or --ctx-shift avoids this\n", g->n_toks, n_ctx, *n);
        return -1;
    }
    int head = 0, keep = g->n_toks, dropped = 0;
    while (head < g->n_toks && !user_turn_at(r, g->toks, g->n_toks, head)) head++;
    for (int i = g->n_toks - 1; i >= head; i--)
        if (user_turn_at(r, g->toks, g->n_toks, i)) {
            if (head + (g->n_toks - i) + *n > n_ctx / 2) break;
            keep = i;
        }
    int lead = keep == g->n_toks ? n_lead : 0;  /* no reply is left to close */
    int total = head + (g->n_toks - keep) + *n - lead;
    if (total + 1 > n_ctx) {
        fprintf(stderr, "this message (%d tokens) does not fit the context (%d tokens): use a larger -c\n", *n, n_ctx);
        return -1;
    }
    for (int i = head; i < keep; i++) dropped += user_turn_at(r, g->toks, g->n_toks, i);
    int32_t *all = xmalloc((size_t)total * sizeof *all);
    memcpy(all, g->toks, (size_t)head * sizeof *all);
    memcpy(all + head, g->toks + keep, (size_t)(g->n_toks - keep) * sizeof *all);
    memcpy(all + head + (g->n_toks - keep), *ids + lead, (size_t)(*n - lead) * sizeof *all);
    fprintf(stderr, "[context shift: dropped the %d oldest turn%s (%d tokens); reading the %d kept again]\n", dropped,
            dropped == 1 ? "" : "s", keep - head, total);
    free(*ids);
    *ids = all;
    *n = total;
    repl_forget(g);
    return 0;
}

/* One exchange: the user's text as a ChatML turn after the conversation so
 * far, and the reply streamed as it comes. */
static void repl_turn(Repl *r, const char *user) {
    Gen *g = r->g;
    const char *lead = chat_lead(&r->chat, g->toks, g->n_toks);
    char *text = chat_turn(&r->chat, lead, user, g->n_toks == 0);
    int32_t *ids, *lead_ids;
    int n, n_lead;
    encode_text(r->vocab, lead, &lead_ids, &n_lead);   /* the lead ends at a special token: counted alone */
    encode_text(r->vocab, text, &ids, &n);
    free(lead_ids);
    free(text);
    if (repl_room(r, &ids, &n, n_lead) == 0) {
        stats_reset(&g->st);
        *g->stop = 0;
        show_begin(&r->show, ids, n);
        generate(g, ids, n, r->budget, NULL, show_token, &r->show);
        show_end(&r->show);
        if (*g->stop) fputs("[stopped]\n", stderr);
        *g->stop = 0;
        if (!r->o->quiet) turn_summary(g);
        if (g->e->st.n_past >= g->e->st.n_ctx)
            fputs(r->o->ctx_shift ? "[the context is full: the next message drops the oldest turns]\n"
                                  : "[the context is full: /reset starts a new conversation]\n", stderr);
    }
    free(ids);
}

/* ---- saving a conversation ----
 * A file holds the conversation as text (for people: `strings` shows it)
 * and everything generation continues from: the tokens, the full-attention
 * KV caches up to n_past, the committed DeltaNet conv and recurrent state,
 * the MTP head's cache with its pending rows, and the sampler's random state.
 * The model is named by its file size and a hash of its metadata and tensor
 * table, so another model's file is refused before anything changes.  Numbers
 * are in the machine's byte order (little-endian on every mtp-gen target). */

#define SAVE_MAGIC "MTPGCHAT"   /* also closes the file, so a truncated one is caught */
#define SAVE_VERSION 2

typedef struct {
    char magic[8];
    uint32_t version, n_layer;
    uint64_t model_bytes, model_hash;
    int32_t n_toks, n_past, mtp_n, n_pend;
    int32_t dim, kv_dim, conv_floats, ssm_floats;
    uint64_t rng;
    uint64_t text_bytes;        /* the conversation as text, right after the header */
    char model_name[64];        /* the model's file name, for the message refusing another model */
} SaveHeader;

_Static_assert(sizeof(SaveHeader) == 144, "the save header is written as it is laid out: no padding");

/* FNV-1a of the file up to its tensor data: metadata, vocabulary, tensor table. */
static uint64_t model_hash(const Model *m) {
    size_t end = m->file.size;
    for (uint64_t i = 0; i < m->gguf.n_tensors; i++) {
        const uint8_t *d = m->gguf.tensors[i].data;
        if (d && (size_t)(d - m->file.base) < end) end = (size_t)(d - m->file.base);
    }
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < end; i++) h = (h ^ m->file.base[i]) * 0x100000001b3ULL;
    return h;
}

static SaveHeader save_header(const Repl *r) {
    const Gen *g = r->g;
    const Config *c = &r->model->cfg;
    const char *name = strrchr(r->o->model, '/');
    SaveHeader h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, SAVE_MAGIC, sizeof h.magic);
    h.version = SAVE_VERSION;
    h.n_layer = (uint32_t)c->n_layer;
    h.model_bytes = r->model->file.size;
    h.model_hash = model_hash(r->model);
    h.n_toks = g->n_toks;
    h.n_past = g->e->st.n_past;
    h.mtp_n = g->e->st.mtp_n;
    h.n_pend = g->n_pend;
    h.dim = c->dim;
    h.kv_dim = c->n_kv_head * c->head_dim;
    h.conv_floats = (int32_t)conv_window_floats(c);
    h.ssm_floats = (int32_t)ssm_floats(c);
    h.rng = g->smp->cfg.rng;
    snprintf(h.model_name, sizeof h.model_name, "%s", name ? name + 1 : r->o->model);
    return h;
}

typedef int (*IoFn)(FILE *f, void *p, size_t n);   /* nonzero on failure */

static int io_write(FILE *f, void *p, size_t n) { return fwrite(p, 1, n, f) != n; }
static int io_read(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) != n; }

/* A KV cache's first n positions, head after head. */
static int cache_io(FILE *f, IoFn io, float *cache, const Config *c, int n_ctx, int n) {
    int err = 0;
    for (int h = 0; h < c->n_kv_head && !err; h++)
        err = io(f, cache + (size_t)h * n_ctx * c->head_dim, (size_t)n * c->head_dim * sizeof(float));
    return err;
}

/* The state in file order, one walk for both directions. */
static int state_io(Repl *r, FILE *f, IoFn io, const SaveHeader *h) {
    Gen *g = r->g;
    State *st = &g->e->st;
    const Config *c = &r->model->cfg;
    size_t cs = conv_window_floats(c), ss = ssm_floats(c);
    int err = io(f, g->toks, (size_t)h->n_toks * sizeof *g->toks);
    for (int l = 0; l < c->n_layer && !err; l++)
        if (c->recurrent[l])
            err = io(f, conv_window(st, c, l), cs * sizeof(float)) || io(f, st->ssm[l], ss * sizeof(float));
        else
            err = cache_io(f, io, st->k_cache[l], c, st->n_ctx, h->n_past) || cache_io(f, io, st->v_cache[l], c, st->n_ctx, h->n_past);
    if (c->n_mtp && !err) err = cache_io(f, io, st->mtp_k, c, st->n_ctx, h->mtp_n) || cache_io(f, io, st->mtp_v, c, st->n_ctx, h->mtp_n);
    return err || io(f, g->pend_h, (size_t)h->n_pend * c->dim * sizeof(float)) || io(f, g->pend_t, (size_t)h->n_pend * sizeof *g->pend_t);
}

/* Every token's text, template markers included. */
static Buf conversation_text(const Repl *r) {
    const Tokenizer *t = &r->vocab->tok;
    Buf b = {0};
    for (int i = 0; i < r->g->n_toks; i++) {
        int32_t id = r->g->toks[i];
        buf_put(&b, t->bytes + t->bytes_at[id], t->bytes_at[id + 1] - t->bytes_at[id]);
    }
    return b;
}

static void repl_save(Repl *r, const char *path) {
    SaveHeader h = save_header(r);
    Buf text = conversation_text(r);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    h.text_bytes = text.n;
    FILE *f = fopen(tmp, "wb");
    int err = !f || fwrite(&h, sizeof h, 1, f) != 1 || fwrite(text.s ? text.s : "", 1, text.n, f) != text.n ||
              state_io(r, f, io_write, &h) || fwrite(SAVE_MAGIC, 1, 8, f) != 8;
    if (f && fclose(f)) err = 1;
    if (err || rename(tmp, path)) {
        fprintf(stderr, "cannot save to '%s': %s\n", path, strerror(errno));
        remove(tmp);
    } else {
        fprintf(stderr, "[saved %d tokens to %s]\n", h.n_toks, path);
    }
    free(text.s);
}

/* Whether a header fits this model and context; why says what is wrong. */
static int load_check(const Repl *r, const SaveHeader *h, char *why, size_t n) {
    SaveHeader want = save_header(r);
    int n_ctx = r->g->e->st.n_ctx, mtp = r->model->cfg.n_mtp;
    if (memcmp(h->magic, SAVE_MAGIC, sizeof h->magic))
        snprintf(why, n, "is not an mtp-gen conversation file");
    else if (h->version != SAVE_VERSION)
        snprintf(why, n, "has format version %u; this mtp-gen reads version %u", h->version, SAVE_VERSION);
    else if (h->model_bytes != want.model_bytes || h->model_hash != want.model_hash || h->n_layer != want.n_layer ||
             h->dim != want.dim || h->kv_dim != want.kv_dim || h->conv_floats != want.conv_floats || h->ssm_floats != want.ssm_floats)
        snprintf(why, n, "was saved with another model (%.63s), not %s", h->model_name, want.model_name);
    else if (h->n_toks < 0 || h->n_toks >= n_ctx)
        snprintf(why, n, "holds %d tokens and the context %d: use a larger -c", h->n_toks, n_ctx);
    else if (h->n_past < 0 || h->n_past > h->n_toks || h->n_past < h->n_toks - 1 || h->n_pend < 0 || h->n_pend > PEND_CAP ||
             h->mtp_n < 0 || (mtp ? h->mtp_n + h->n_pend != h->n_past : h->mtp_n || h->n_pend) || h->text_bytes > ((uint64_t)1 << 40))
        snprintf(why, n, "is corrupt (inconsistent counts)");
    else
        return 1;
    return 0;
}

static int tokens_valid(const int32_t *toks, int n, int n_vocab) {
    for (int i = 0; i < n; i++)
        if (toks[i] < 0 || toks[i] >= n_vocab) return 0;
    return 1;
}

static void repl_load(Repl *r, const char *path) {
    Gen *g = r->g;
    SaveHeader h;
    char why[256] = "", end[8];
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open '%s': %s\n", path, strerror(errno));
        return;
    }
    if (fread(&h, sizeof h, 1, f) != 1)
        snprintf(why, sizeof why, "is too short to be an mtp-gen conversation file");
    else if (load_check(r, &h, why, sizeof why)) {
        repl_forget(g);
        if (fseek(f, (long)h.text_bytes, SEEK_CUR) || state_io(r, f, io_read, &h) || fread(end, 1, 8, f) != 8 ||
            memcmp(end, SAVE_MAGIC, 8) || !tokens_valid(g->toks, h.n_toks, r->model->cfg.n_vocab)) {
            repl_forget(g);
            snprintf(why, sizeof why, "is truncated or corrupt (the conversation was reset)");
        } else {
            g->n_toks = h.n_toks;
            g->e->st.n_past = h.n_past;
            g->e->st.mtp_n = h.mtp_n;
            g->n_pend = h.n_pend;
            g->smp->cfg.rng = h.rng;
        }
    }
    fclose(f);
    if (why[0])
        fprintf(stderr, "cannot load '%s': it %s\n", path, why);
    else
        fprintf(stderr, "[loaded %s: %d tokens]\n", path, g->n_toks);
}

/* ---- commands ---- */

static const char repl_help[] =
    "  /help            this list\n"
    "  /reset           start a new conversation\n"
    "  /system [TEXT]   show the system prompt, or set it and start a new conversation ('-' removes it)\n"
    "  /think on|off    let replies think first, or skip thinking (an empty think block)\n"
    "  /mtp on|off|N    speculative decoding with the MTP head: on, off, or N drafts per step\n"
    "  /stats           speed and acceptance of the last reply\n"
    "  /save FILE       save the conversation with its state (KV cache, DeltaNet state, MTP cache)\n"
    "  /load FILE       continue a saved conversation where it stopped\n"
    "  /quit            leave (so do Ctrl-D and Ctrl-C at an empty prompt)\n"
    "  Ctrl-C stops a reply.  Editing: arrows, Home/End, Ctrl-A/E/U/W/K, Up/Down for history;\n"
    "  end a line with \\ to continue it; start it with // to send text beginning with /.\n";

static void repl_system(Repl *r, const char *arg) {
    if (!*arg) {
        fprintf(stderr, "[system prompt: %s]\n", r->chat.system ? r->chat.system : "none");
        return;
    }
    chat_set_system(&r->chat, strcmp(arg, "-") ? arg : NULL);
    repl_forget(r->g);
    fprintf(stderr, "[system prompt %s; new conversation]\n", r->chat.system ? "set" : "removed");
}

static void repl_think(Repl *r, const char *arg) {
    if (r->chat.think_open < 0)
        fputs("this model's vocabulary has no <think> tokens\n", stderr);
    else if (!strcmp(arg, "on") || !strcmp(arg, "off"))
        r->chat.think = !strcmp(arg, "on");
    else
        fputs("usage: /think on|off\n", stderr);
    fprintf(stderr, "[thinking %s]\n", r->chat.think ? "on" : "off");
}

static void repl_mtp(Repl *r, const char *arg) {
    Gen *g = r->g;
    SpecCfg spec = g->spec;
    char *end;
    long k = strtol(arg, &end, 10);
    if (!g->use_mtp) {
        fputs("this model has no MTP head: decoding without speculation\n", stderr);
        return;
    }
    if (!strcmp(arg, "on"))
        spec = r->spec_on;
    else if (!strcmp(arg, "off") || (*arg && !*end && k >= 0 && k <= MAX_DRAFT))
        spec.n_draft = strcmp(arg, "off") ? (int)k : 0, spec.adaptive = 0;
    else if (*arg)
        fprintf(stderr, "usage: /mtp on|off|N with N in 0..%d\n", MAX_DRAFT);
    state_grow_spec(&g->e->st, &r->model->cfg, spec.n_draft + 2);
    g->spec = spec;
    if (spec.n_draft)
        fprintf(stderr, "[mtp on: %s%d draft%s per step]\n", spec.adaptive ? "adaptive, up to " : "", spec.n_draft, spec.n_draft == 1 ? "" : "s");
    else
        fputs("[mtp off]\n", stderr);
}

/* Run a command line; returns 1 to quit. */
static int repl_command(Repl *r, char *line) {
    char *arg = line + strcspn(line, " \t");
    if (*arg) *arg++ = 0;
    arg += strspn(arg, " \t");
    for (size_t n = strlen(arg); n && is_blank(arg[n - 1]);) arg[--n] = 0;
    if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) return 1;
    if (!strcmp(line, "/help")) fputs(repl_help, stderr);
    else if (!strcmp(line, "/reset")) repl_forget(r->g), fputs("[new conversation]\n", stderr);
    else if (!strcmp(line, "/system")) repl_system(r, arg);
    else if (!strcmp(line, "/think")) repl_think(r, arg);
    else if (!strcmp(line, "/mtp")) repl_mtp(r, arg);
    else if (!strcmp(line, "/stats")) print_stats(r->g, r->model, r->g->use_mtp && r->g->spec.n_draft > 0);
    else if ((!strcmp(line, "/save") || !strcmp(line, "/load")) && !*arg) fprintf(stderr, "usage: %s FILE\n", line);
    else if (!strcmp(line, "/save")) repl_save(r, arg);
    else if (!strcmp(line, "/load")) repl_load(r, arg);
    else fprintf(stderr, "unknown command '%s' (/help lists them)\n", line);
    return 0;
}

/* The chat: first (from -p or -f) is the opening message when given. */
static void repl_run(Gen *g, const Model *m, const Vocab *v, const Options *o, const char *first) {
    Repl r = {.g = g, .model = m, .vocab = v, .o = o};
    chat_init(&r.chat, &m->gguf, v, o->think, o->system);
    show_init(&r.show, v, &r.chat, o->hide_think);
    ed_init(&r.ed);
    r.budget = o->n_predict < 0 ? INT32_MAX : o->n_predict;
    r.spec_on = g->spec;
    if (r.spec_on.n_draft == 0) r.spec_on.n_draft = 2;
    if (o->mtp == 0) g->spec.n_draft = g->spec.adaptive = 0;
    if (!o->quiet) fputs("mtp-gen: chat: /help lists the commands; Ctrl-C stops a reply; Ctrl-D quits\n", stderr);
    if (first) repl_turn(&r, first);
    for (int quit = 0; !quit;) {
        char *line;
        int rc = ed_read(&r.ed, &line);
        if (rc == ED_EXIT) break;
        if (rc == ED_CANCEL) continue;
        if (line[0] == '/' && line[1] != '/')
            quit = repl_command(&r, line);
        else if (line[strspn(line, " \t\n")])
            repl_turn(&r, line + (line[0] == '/'));
        free(line);
    }
    ed_free(&r.ed);
    free(r.show.buf);
    free(r.chat.system);
}

/* ---- main ---- */

static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig) {
    if (g_interrupted) _exit(130);
    g_interrupted = 1;
}

static uint64_t seed_from(long long seed) {
    uint64_t x = seed >= 0 ? (uint64_t)seed : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    x = (x ^ 0x9E3779B97F4A7C15ULL) * 0xBF58476D1CE4E5B9ULL;
    return x ? x : 1;
}

static char *prompt_text(const Options *o, size_t *len) {
    if (o->prompt_file) return read_all(o->prompt_file, len);
    if (o->prompt && strcmp(o->prompt, "-")) {
        *len = strlen(o->prompt);
        char *p = xmalloc(*len + 1);
        memcpy(p, o->prompt, *len + 1);
        return p;
    }
    if (!o->prompt && isatty(0)) die("no prompt given (use -p TEXT, -f FILE, or pipe it on stdin)");
    return read_all("-", len);
}

/* The prompt, one generation, its statistics. */
static void run_once(Gen *g, const Model *m, const Vocab *v, const Options *o, const char *text, size_t text_len,
                     const int32_t *prompt, int n_prompt) {
    FILE *logits = NULL;
    if (o->logits_out && !(logits = fopen(o->logits_out, "wb"))) die("cannot open '%s': %s", o->logits_out, strerror(errno));
    if (o->mtp_logits_out) {
        if (!g->use_mtp) die("--mtp-logits-out needs a model with an MTP head and speculation on");
        if (!(g->mtp_logits_out = fopen(o->mtp_logits_out, "wb"))) die("cannot open '%s': %s", o->mtp_logits_out, strerror(errno));
    }
    FILE *mtp_logits = g->mtp_logits_out;
    if (o->display_prompt && !o->print_ids) {
        out_write(text, text_len);
        out_flush();
    }
    Printer pr;
    printer_init(&pr, v, o->print_ids);
    generate(g, prompt, n_prompt, o->n_predict < 0 ? INT32_MAX : o->n_predict, logits, print_token, &pr);
    printer_finish(&pr);
    if (logits && fclose(logits)) die("cannot write '%s': %s", o->logits_out, strerror(errno));
    if (mtp_logits && fclose(mtp_logits)) die("cannot write '%s': %s", o->mtp_logits_out, strerror(errno));
    if (g_interrupted && !o->quiet) fprintf(stderr, "mtp-gen: interrupted\n");
    if (!o->quiet) print_stats(g, m, g->use_mtp);
    if (o->stats_json) write_stats_json(o->stats_json, g, m);
}

#ifndef MTP_NO_MAIN
int main(int argc, char **argv) {
    Options o;
    parse_args(argc, argv, &o);
    char why[256];
    if (!kn_cpu_ok(why, sizeof why)) die("%s", why);
    double t0 = now_ms();
    Model model;
    model_open(&model, o.model);
    Vocab vocab;
    vocab_load(&vocab, &model.gguf);
    const Config *c = &model.cfg;
    int n_ctx = 0;
    if (!o.tokenize_only) {
        if (model.gguf.n_tensors == 0) die("'%s' holds only a vocabulary (no tensors): only --tokenize works with it", o.model);
        load_config(&model);
        load_weights(&model);
        n_ctx = o.n_ctx ? o.n_ctx : (c->n_ctx_train < 4096 ? c->n_ctx_train : 4096);
        if (n_ctx > c->n_ctx_train) die("-c %d exceeds the model's context length %d", n_ctx, c->n_ctx_train);
    }

    size_t text_len = 0;
    char *text = o.interactive && !o.prompt && !o.prompt_file ? NULL : prompt_text(&o, &text_len);
    if (o.chat && !o.interactive) text = chat_prompt(&model.gguf, &vocab, &o, text, &text_len);
    /* A token spells at most max_piece bytes and NFC shrinks text at most fourfold, so a prompt
     * past this length cannot fit: refuse it before spending seconds and memory tokenising it. */
    if (n_ctx && text_len / 4 / (size_t)vocab.tok.max_piece >= (size_t)n_ctx)
        die("the prompt of %zu bytes cannot fit in a context of %d tokens (use a larger -c)", text_len, n_ctx);
    int32_t *prompt = NULL;
    int n_prompt = 0;
    if (text && tok_encode(&vocab.tok, text, text_len, 1, &prompt, &n_prompt)) die("out of memory tokenising the prompt");
    if (o.tokenize_only) {
        for (int i = 0; i < n_prompt; i++) printf("%s%d", i ? " " : "", prompt[i]);
        printf("\n");
        free(prompt);
        free(text);
        vocab_free(&vocab);
        model_free(&model);
        return 0;
    }
    if (n_prompt == 0 && !o.interactive) die("the prompt is empty (0 tokens)");
    if (n_prompt >= n_ctx) die("the prompt has %d tokens but the context holds %d (use a larger -c)", n_prompt, n_ctx);
    int n_cpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    int n_threads = o.n_threads ? o.n_threads : physical_cores();
    if (n_threads > n_cpu) {
        fprintf(stderr, "mtp-gen: warning: -t %d is more than the %d CPUs; using %d\n", n_threads, n_cpu, n_cpu);
        n_threads = n_cpu;
    }
    int use_mtp = (o.mtp != 0 || o.interactive) && c->n_mtp > 0;   /* a chat keeps the head in step for /mtp on */
    if (o.spec.draft_vocab < 0) o.spec.draft_vocab = c->n_vocab / 2 < 32768 ? c->n_vocab / 2 : 32768;
    if (o.spec.draft_vocab == 0 || o.spec.draft_vocab > c->n_vocab) o.spec.draft_vocab = c->n_vocab;
    if (o.mtp == 1 && !c->n_mtp) fprintf(stderr, "mtp-gen: warning: --mtp asked, but this model has no MTP head: decoding without speculation\n");

    Engine e = {.model = &model};
    pool_init(&e.pool, n_threads);
    size_t draft_copy = use_mtp && !o.draft_exact && !o.mtp_logits_out ? draft_copy_make(&e, o.spec.draft_vocab) : 0;
    state_init(&e.st, c, n_ctx, use_mtp ? o.spec.n_draft + 2 : 1);
    scratch_init(&e.s, c, n_ctx, n_threads);
    o.sampling.rng = seed_from(o.seed);
    Sampler smp;
    sampler_init(&smp, &o.sampling, c->n_vocab);
    Gen g;
    gen_init(&g, &e, &smp, &o.spec, use_mtp, vocab.eog);
    g.ignore_eos = o.ignore_eos;
    g.verbose = o.verbose;
    g.stop = &g_interrupted;
    g.st.load_ms = elapsed_since(t0);
    if (!o.quiet) {
        fprintf(stderr, "mtp-gen: %s: %s, %d layers, dim %d, vocab %d, %.2f GB, kernels %s, %d threads, ctx %d\n", o.model,
                arch_names[c->arch], c->n_layer, c->dim, c->n_vocab, model.file.size / 1e9, kn_isa(), n_threads, n_ctx);
        double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
        if (ram > 0 && (double)model.file.size > ram)
            fprintf(stderr, "mtp-gen: note: the model (%.1f GB) is larger than RAM (%.1f GB): weights are paged in from disk as "
                            "they are used, so speed is bound by the disk\n", model.file.size / 1e9, ram / 1e9);
        if (use_mtp && o.mtp != 0)
            fprintf(stderr, "mtp-gen: MTP head found: speculative decoding on (%s%d draft%s per step%s%s)\n",
                    o.spec.adaptive ? "adaptive, up to " : "", o.spec.n_draft, o.spec.n_draft == 1 ? "" : "s",
                    draft_copy ? ", drafting from a 4-bit copy of the head" : "",
                    o.spec.optimistic ? ", optimistic: output is not verified" : "");
    }
    signal(SIGINT, on_sigint);
    if (o.interactive)
        repl_run(&g, &model, &vocab, &o, text);
    else
        run_once(&g, &model, &vocab, &o, text, text_len, prompt, n_prompt);

    gen_free(&g);
    sampler_free(&smp);
    scratch_free(&e.s);
    state_free(&e.st);
    pool_free(&e.pool);
    free(prompt);
    free(text);
    vocab_free(&vocab);
    model_free(&model);
    return 0;
}
#endif
