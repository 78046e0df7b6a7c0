/* mtp-convert: turn a Hugging Face Qwen3.5 / Qwen3.6 / Qwen3-Next checkpoint into one GGUF
 * file that keeps the model's multi-token-prediction (MTP) head.
 *
 *   mtp-convert [--type T] [--mtp-type T] [--threads N] HF_DIR OUT.gguf
 *
 * The output has the layout llama.cpp's convert_hf_to_gguf.py produces (same metadata keys,
 * tensor names, shapes, types and value transforms), so llama.cpp reads our files and we read
 * theirs. The MTP head becomes block n_layer: `mtp.fc` -> `blk.N.nextn.eh_proj`, the three MTP
 * norms -> `blk.N.nextn.{enorm,hnorm,shared_head_norm}`, `mtp.layers.0.*` -> `blk.N.*`.
 *
 * Design. Conversion runs in two passes over the safetensors headers, never over the data:
 * the first builds a plan (one recipe per output tensor, with its GGUF shape and type), which
 * is enough to write the whole GGUF header; the second streams each output tensor in chunks of
 * rows. Every transform the format needs is row-local -- a row of the output is a (possibly
 * permuted) row of one source tensor, with its columns possibly permuted and an elementwise
 * function applied -- so memory is a few chunk buffers, whatever the model size. The output is
 * written under a temporary name in the target directory, fsynced and renamed, so a failure
 * never leaves a half-written file under the final name.
 *
 * Quantisers are our own implementations of the ggml block formats (Q8_0, Q5_0, Q4_K, Q5_K,
 * Q6_K). Q8_0 follows the reference rounding bit for bit (llama.cpp's converter writes Q8_0
 * directly, so our q8_0 files are byte-identical to its); the k-quants search scales the same
 * way the reference does but are not promised to be bit-identical to llama-quantize.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "quant.h"

/* ==== Errors and small helpers ==== */

static char temp_path[PATH_MAX];   /* the half-written output, removed on any failure */

static void remove_temp(void)
{
    if (temp_path[0]) unlink(temp_path);
    temp_path[0] = 0;
}

static void die(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "mtp-convert: error: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    remove_temp();
    exit(1);
}

static void on_signal(int sig)
{
    if (temp_path[0]) unlink(temp_path);
    _exit(128 + sig);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory (%zu bytes)", n);
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) die("out of memory");
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p) die("out of memory (%zu bytes)", n);
    return p;
}

static char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    return memcpy(xmalloc(n), s, n);
}

static int starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Whole file into memory, NUL-terminated; NULL if it does not exist. */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT) return NULL;
        die("cannot open %s: %s", path, strerror(errno));
    }
    if (fseek(f, 0, SEEK_END) != 0) die("cannot read %s", path);
    long n = ftell(f);
    if (n < 0) die("cannot read %s", path);
    rewind(f);
    char *buf = xmalloc((size_t)n + 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) die("cannot read %s", path);
    fclose(f);
    buf[n] = 0;
    if (len) *len = (size_t)n;
    return buf;
}

static void pread_all(int fd, void *buf, size_t n, uint64_t off, const char *path)
{
    char *p = buf;
    while (n > 0) {
        ssize_t got = pread(fd, p, n, (off_t)off);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) die("cannot read %s: %s", path, strerror(errno));
        if (got == 0) die("%s is truncated (read past end of file at offset %llu)", path,
                          (unsigned long long)off);
        p += got; n -= (size_t)got; off += (uint64_t)got;
    }
}

/* ==== JSON ==== */

/* A small DOM parser for config, tokenizer and index files. Objects keep their keys in file
 * order, which is the order llama.cpp iterates them in. */

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } JType;

typedef struct Json {
    JType type;
    double num;          /* J_NUM; J_BOOL as 0/1 */
    char *str;           /* J_STR, decoded UTF-8 */
    size_t len;          /* J_STR byte length; J_ARR/J_OBJ child count */
    struct Json *kids;   /* J_ARR/J_OBJ children */
    char **keys;         /* J_OBJ keys, parallel to kids */
} Json;

typedef struct {
    const char *p, *end;
    int depth;
    char *err;
    size_t errlen;
} JParser;

#define JSON_MAX_DEPTH 200

static int jp_fail(JParser *jp, const char *what)
{
    if (jp->err && jp->errlen && !jp->err[0]) snprintf(jp->err, jp->errlen, "%s", what);
    return -1;
}

static void jp_skip_space(JParser *jp)
{
    while (jp->p < jp->end && (*jp->p == ' ' || *jp->p == '\t' || *jp->p == '\n' || *jp->p == '\r'))
        jp->p++;
}

static int jp_literal(JParser *jp, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(jp->end - jp->p) < n || memcmp(jp->p, word, n) != 0) return jp_fail(jp, "bad literal");
    jp->p += n;
    return 0;
}

static int jp_hex4(JParser *jp, unsigned *out)
{
    if (jp->end - jp->p < 4) return jp_fail(jp, "short \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = jp->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return jp_fail(jp, "bad \\u escape");
    }
    jp->p += 4;
    *out = v;
    return 0;
}

static size_t utf8_encode(unsigned cp, char *out)
{
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 63)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12); out[1] = (char)(0x80 | ((cp >> 6) & 63));
        out[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18); out[1] = (char)(0x80 | ((cp >> 12) & 63));
    out[2] = (char)(0x80 | ((cp >> 6) & 63)); out[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* Decoded string; escapes never lengthen their text, so the raw span bounds the output. */
static int jp_string(JParser *jp, char **out, size_t *out_len)
{
    jp->p++;   /* opening quote */
    const char *start = jp->p;
    while (jp->p < jp->end && *jp->p != '"') jp->p += (*jp->p == '\\' && jp->p + 1 < jp->end) ? 2 : 1;
    if (jp->p >= jp->end) return jp_fail(jp, "unterminated string");
    const char *stop = jp->p;
    char *s = xmalloc((size_t)(stop - start) + 1);
    size_t n = 0;
    jp->p = start;
    while (jp->p < stop) {
        unsigned char c = (unsigned char)*jp->p;
        if (c < 0x20) { free(s); return jp_fail(jp, "control character in string"); }
        if (c != '\\') { s[n++] = (char)c; jp->p++; continue; }
        char e = jp->p[1];
        jp->p += 2;
        unsigned cp;
        switch (e) {
        case '"': s[n++] = '"'; break;
        case '\\': s[n++] = '\\'; break;
        case '/': s[n++] = '/'; break;
        case 'b': s[n++] = '\b'; break;
        case 'f': s[n++] = '\f'; break;
        case 'n': s[n++] = '\n'; break;
        case 'r': s[n++] = '\r'; break;
        case 't': s[n++] = '\t'; break;
        case 'u':
            if (jp_hex4(jp, &cp) < 0) { free(s); return -1; }
            if (cp >= 0xD800 && cp < 0xDC00) {
                unsigned lo;
                if (stop - jp->p < 6 || jp->p[0] != '\\' || jp->p[1] != 'u') {
                    free(s); return jp_fail(jp, "lone surrogate in string");
                }
                jp->p += 2;
                if (jp_hex4(jp, &lo) < 0) { free(s); return -1; }
                if (lo < 0xDC00 || lo > 0xDFFF) { free(s); return jp_fail(jp, "bad surrogate pair"); }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp < 0xE000) {
                free(s); return jp_fail(jp, "lone surrogate in string");
            }
            n += utf8_encode(cp, s + n);
            break;
        default: free(s); return jp_fail(jp, "bad escape in string");
        }
    }
    jp->p = stop + 1;
    s[n] = 0;
    *out = s;
    *out_len = n;
    return 0;
}

static int jp_number(JParser *jp, Json *v)
{
    char buf[64];
    size_t n = 0;
    while (jp->p + n < jp->end && n < sizeof buf - 1 && strchr("+-0123456789.eE", jp->p[n])) n++;
    if (n == 0 || n == sizeof buf - 1) return jp_fail(jp, "bad number");
    memcpy(buf, jp->p, n);
    buf[n] = 0;
    char *stop;
    v->num = strtod(buf, &stop);
    if (stop != buf + n) return jp_fail(jp, "bad number");
    v->type = J_NUM;
    jp->p += n;
    return 0;
}

static void json_free(Json *v);

static int jp_value(JParser *jp, Json *v);

/* Arrays and objects share one loop; objects read "key": before each value. */
static int jp_container(JParser *jp, Json *v, int is_obj)
{
    size_t cap = 0;
    v->type = is_obj ? J_OBJ : J_ARR;
    if (++jp->depth > JSON_MAX_DEPTH) return jp_fail(jp, "nesting too deep");
    jp->p++;
    jp_skip_space(jp);
    if (jp->p < jp->end && *jp->p == (is_obj ? '}' : ']')) { jp->p++; jp->depth--; return 0; }
    for (;;) {
        if (v->len == cap) {
            cap = cap ? cap * 2 : 4;
            v->kids = xrealloc(v->kids, cap * sizeof *v->kids);
            if (is_obj) v->keys = xrealloc(v->keys, cap * sizeof *v->keys);
        }
        Json *kid = &v->kids[v->len];
        memset(kid, 0, sizeof *kid);
        if (is_obj) {
            size_t klen;
            jp_skip_space(jp);
            if (jp->p >= jp->end || *jp->p != '"') return jp_fail(jp, "expected object key");
            if (jp_string(jp, &v->keys[v->len], &klen) < 0) return -1;
            jp_skip_space(jp);
            if (jp->p >= jp->end || *jp->p != ':') { free(v->keys[v->len]); return jp_fail(jp, "expected ':'"); }
            jp->p++;
        }
        v->len++;
        if (jp_value(jp, kid) < 0) return -1;
        jp_skip_space(jp);
        if (jp->p < jp->end && *jp->p == ',') { jp->p++; continue; }
        if (jp->p < jp->end && *jp->p == (is_obj ? '}' : ']')) { jp->p++; jp->depth--; return 0; }
        return jp_fail(jp, is_obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int jp_value(JParser *jp, Json *v)
{
    jp_skip_space(jp);
    if (jp->p >= jp->end) return jp_fail(jp, "unexpected end of input");
    switch (*jp->p) {
    case '{': return jp_container(jp, v, 1);
    case '[': return jp_container(jp, v, 0);
    case '"': v->type = J_STR; return jp_string(jp, &v->str, &v->len);
    case 't': v->type = J_BOOL; v->num = 1; return jp_literal(jp, "true");
    case 'f': v->type = J_BOOL; v->num = 0; return jp_literal(jp, "false");
    case 'n': v->type = J_NULL; return jp_literal(jp, "null");
    default: return jp_number(jp, v);
    }
}

/* Parses len bytes of text into *out (free with json_free). Returns 0, or -1 with a message
 * in err. Safe on arbitrary input: this is the fuzzing entry point. */
static int json_parse(const char *text, size_t len, Json *out, char *err, size_t errlen)
{
    JParser jp = { text, text + len, 0, err, errlen };
    if (err && errlen) err[0] = 0;
    memset(out, 0, sizeof *out);
    if (jp_value(&jp, out) < 0) {
        json_free(out);
        return -1;
    }
    jp_skip_space(&jp);
    if (jp.p != jp.end) {
        json_free(out);
        return jp_fail(&jp, "trailing data after JSON value");
    }
    return 0;
}

static void json_free(Json *v)
{
    for (size_t i = 0; (v->type == J_ARR || v->type == J_OBJ) && i < v->len; i++) {
        json_free(&v->kids[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->kids);
    free(v->keys);
    free(v->str);
    memset(v, 0, sizeof *v);
}

static const Json *json_get(const Json *obj, const char *key)
{
    if (!obj || obj->type != J_OBJ) return NULL;
    for (size_t i = 0; i < obj->len; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->kids[i];
    return NULL;
}

static const char *json_str(const Json *v)
{
    return v && v->type == J_STR ? v->str : NULL;
}

/* The file parsed, or NULL when it does not exist; a malformed file is fatal. */
static Json *load_json(const char *path)
{
    size_t len;
    char *text = read_file(path, &len);
    if (!text) return NULL;
    Json *v = xmalloc(sizeof *v);
    char err[128];
    if (json_parse(text, len, v, err, sizeof err) < 0) die("%s is not valid JSON: %s", path, err);
    free(text);
    return v;
}


/* ==== Quantisers ==== */

enum {
    T_F32 = 0, T_F16 = 1, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30
};

static const char *type_name(int t)
{
    switch (t) {
    case T_F32: return "f32";
    case T_F16: return "f16";
    case T_BF16: return "bf16";
    case T_Q5_0: return "q5_0";
    case T_Q8_0: return "q8_0";
    case T_Q4_K: return "q4_k";
    case T_Q5_K: return "q5_k";
    case T_Q6_K: return "q6_k";
    }
    return "?";
}

static int block_elems(int t)
{
    switch (t) {
    case T_Q5_0: case T_Q8_0: return 32;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: return 256;
    }
    return 1;
}

static size_t block_bytes(int t)
{
    switch (t) {
    case T_F32: return 4;
    case T_F16: case T_BF16: return 2;
    case T_Q5_0: return 22;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    }
    return 0;
}

static size_t row_bytes(int t, int64_t n) { return (size_t)(n / block_elems(t)) * block_bytes(t); }


/* Q8_0: d = max|x| / 127, q = round(x * (1/d)). Multiplying by the rounded reciprocal (not
 * dividing) is what ggml's reference and llama.cpp's converter do; it decides the ties. */
static void quant_q8_0(const float *x, uint8_t *out, int64_t n)
{
    for (int64_t b = 0; b < n / 32; b++, x += 32, out += 34) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[i]));
        float d = amax / 127, id = d != 0 ? 1 / d : 0;
        put_u16(out, f32_to_f16(d));
        for (int i = 0; i < 32; i++) out[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);   /* ties away from zero */
    }
}

/* Q5_0: 32 weights as (q - 16) * d; d from the value of largest magnitude, mapped to -16. */
static void quant_q5_0(const float *x, uint8_t *out, int64_t n)
{
    for (int64_t b = 0; b < n / 32; b++, x += 32, out += 22) {
        float amax = 0, vmax = 0;
        for (int i = 0; i < 32; i++)
            if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); vmax = x[i]; }
        float d = vmax / -16, id = d != 0 ? 1 / d : 0;
        put_u16(out, f32_to_f16(d));
        uint32_t high = 0;
        uint8_t *qs = out + 6;
        for (int i = 0; i < 16; i++) {
            int lo = clamp_int((int)(x[i] * id + 16.5f), 0, 31);
            int hi = clamp_int((int)(x[i + 16] * id + 16.5f), 0, 31);
            qs[i] = (uint8_t)((lo & 15) | (hi & 15) << 4);
            high |= (uint32_t)(lo >> 4) << i | (uint32_t)(hi >> 4) << (i + 16);
        }
        for (int i = 0; i < 4; i++) out[2 + i] = (uint8_t)(high >> (8 * i));
    }
}



/* Best x ~= scale * q over q in [-nmax, nmax-1] (weighted). The value of largest magnitude
 * is mapped to the -nmax end, which has one more step than the positive side, so the scale
 * comes out negative when that value is positive. */
static float fit_symmetric(const float *x, const float *w, int n, int nmax)
{
    float amax = 0, vmax = 0;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); vmax = x[i]; }
    if (amax == 0) return 0;
    float best_scale = 0, best_gain = 0;
    for (int step = -9; step <= 9; step++) {
        float iscale = -(nmax + 0.1f * step) / vmax, num = 0, den = 0;
        for (int i = 0; i < n; i++) {
            float q = (float)clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1);
            num += w[i] * x[i] * q;
            den += w[i] * q * q;
        }
        /* the least-squares scale is num/den; the error falls by its gain num^2/den */
        if (den > 0 && num * num > best_gain * den) { best_scale = num / den; best_gain = best_scale * num; }
    }
    return best_scale;
}



/* Q6_K: 256 weights in 16 sub-blocks of 16, x = d * sc * (q - 32) with int8 sc. Weights are
 * stored as 4 low bits (ql) and 2 high bits (qh), interleaved in halves of 128. */
static void quant_q6_k(const float *x, uint8_t *out, int64_t n)
{
    for (int64_t b = 0; b < n / 256; b++, x += 256, out += 210) {
        float scale[16], w[16], max_scale = 0, amax = 0;
        for (int j = 0; j < 16; j++) {
            for (int i = 0; i < 16; i++) w[i] = x[16 * j + i] * x[16 * j + i];
            scale[j] = fit_symmetric(x + 16 * j, w, 16, 32);
            if (fabsf(scale[j]) > amax) { amax = fabsf(scale[j]); max_scale = scale[j]; }
        }
        uint8_t *ql = out, *qh = out + 128;
        int8_t *sc = (int8_t *)(out + 192);
        memset(out, 0, 210);
        if (amax == 0) continue;
        float iscale = -128 / max_scale;
        uint16_t d16 = f32_to_f16(1 / iscale);
        float d = f16_to_f32(d16);
        put_u16(out + 208, d16);
        for (int j = 0; j < 16; j++) sc[j] = (int8_t)clamp_int(nearest_int(iscale * scale[j]), -128, 127);
        for (int e = 0; e < 256; e++) {
            float step = d * sc[e / 16];
            int q = step != 0 ? clamp_int(nearest_int(x[e] / step), -32, 31) + 32 : 32;
            int half = e / 128, l = e % 32, part = (e % 128) / 32;
            uint8_t *low = &ql[64 * half + l + (part & 1) * 32];
            *low |= (uint8_t)((q & 15) << (part >= 2 ? 4 : 0));
            qh[32 * half + l] |= (uint8_t)((q >> 4) << (2 * part));
        }
    }
}

/* One row of n floats into the row format of type t. */
static void encode_row(int t, const float *x, uint8_t *out, int64_t n)
{
    switch (t) {
    case T_F32: memcpy(out, x, (size_t)n * 4); break;
    case T_F16: for (int64_t i = 0; i < n; i++) put_u16(out + 2 * i, f32_to_f16(x[i])); break;
    case T_BF16: for (int64_t i = 0; i < n; i++) put_u16(out + 2 * i, f32_to_bf16(x[i])); break;
    case T_Q8_0: quant_q8_0(x, out, n); break;
    case T_Q5_0: quant_q5_0(x, out, n); break;
    case T_Q4_K: quant_k_affine(x, out, n, 4, 1); break;
    case T_Q5_K: quant_k_affine(x, out, n, 5, 1); break;
    case T_Q6_K: quant_q6_k(x, out, n); break;
    default: die("internal: cannot encode type %d", t);
    }
}

/* ==== Safetensors ==== */

enum { ST_F32, ST_F16, ST_BF16 };

typedef struct {
    char *name;
    int dtype;
    int n_dims;
    int64_t shape[4];
    uint64_t begin, end;      /* byte range within the data section */
    struct StFile *file;
} StTensor;

typedef struct StFile {
    char *path;
    int fd;
    uint64_t data_start;
} StFile;

static size_t st_dtype_size(int dtype) { return dtype == ST_F32 ? 4 : 2; }

static int st_fail(char *err, size_t errlen, const char *fmt, const char *name)
{
    snprintf(err, errlen, fmt, name);
    return -1;
}

/* Parses a safetensors JSON header (len bytes) describing a data section of data_len bytes.
 * Fills *out with n tensors in header order (the caller frees each name, then the array). Returns 0,
 * or -1 with a message in err. Safe on arbitrary input: this is the fuzzing entry point. */
static int st_parse_header(const char *json, size_t len, uint64_t data_len,
                           StTensor **out, int *n_out, char *err, size_t errlen)
{
    Json root;
    *out = NULL;
    *n_out = 0;
    if (json_parse(json, len, &root, err, errlen) < 0) return -1;
    if (root.type != J_OBJ) { json_free(&root); return st_fail(err, errlen, "header is not an object%s", ""); }
    StTensor *ts = xcalloc(root.len, sizeof *ts);
    int n = 0, rc = 0;
    for (size_t i = 0; i < root.len && rc == 0; i++) {
        const char *name = root.keys[i];
        const Json *info = &root.kids[i];
        if (strcmp(name, "__metadata__") == 0) continue;
        const char *dtype = json_str(json_get(info, "dtype"));
        const Json *shape = json_get(info, "shape"), *offs = json_get(info, "data_offsets");
        StTensor *t = &ts[n];
        if (!dtype || !shape || shape->type != J_ARR || !offs || offs->type != J_ARR || offs->len != 2) {
            rc = st_fail(err, errlen, "malformed header entry for %s", name); break;
        }
        if (strcmp(dtype, "BF16") == 0) t->dtype = ST_BF16;
        else if (strcmp(dtype, "F16") == 0) t->dtype = ST_F16;
        else if (strcmp(dtype, "F32") == 0) t->dtype = ST_F32;
        else { rc = st_fail(err, errlen, "tensor %s has an unsupported dtype (only bf16, f16, f32)", name); break; }
        if (shape->len > 4) { rc = st_fail(err, errlen, "tensor %s has more than 4 dimensions", name); break; }
        uint64_t numel = 1;
        t->n_dims = (int)shape->len;
        for (size_t d = 0; d < shape->len; d++) {
            const Json *dim = &shape->kids[d];
            if (dim->type != J_NUM || dim->num < 0 || dim->num > 1e15 || dim->num != floor(dim->num)) {
                rc = st_fail(err, errlen, "tensor %s has a bad shape", name); break;
            }
            t->shape[d] = (int64_t)dim->num;
            if (t->shape[d] && numel > UINT64_MAX / 8 / (uint64_t)t->shape[d]) {
                rc = st_fail(err, errlen, "tensor %s is impossibly large", name); break;
            }
            numel *= (uint64_t)t->shape[d];
        }
        if (rc) break;
        const Json *b = &offs->kids[0], *e = &offs->kids[1];
        if (b->type != J_NUM || e->type != J_NUM || b->num < 0 || e->num < b->num || e->num > (double)data_len) {
            rc = st_fail(err, errlen, "tensor %s has data offsets outside the file (truncated?)", name); break;
        }
        t->begin = (uint64_t)b->num;
        t->end = (uint64_t)e->num;
        if (t->end - t->begin != numel * st_dtype_size(t->dtype)) {
            rc = st_fail(err, errlen, "tensor %s: data size does not match its shape", name); break;
        }
        t->name = xstrdup(name);
        n++;
    }
    json_free(&root);
    if (rc) {
        for (int i = 0; i < n; i++) free(ts[i].name);
        free(ts);
        return -1;
    }
    *out = ts;
    *n_out = n;
    return 0;
}

/* Opens one .safetensors file and appends its tensors to *all. */
static void st_open(const char *path, StTensor **all, int *n_all)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) die("cannot stat %s", path);
    uint64_t size = (uint64_t)st.st_size;
    uint8_t lenbuf[8];
    if (size < 8) die("%s is truncated (no header)", path);
    pread_all(fd, lenbuf, 8, 0, path);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | lenbuf[i];
    if (hlen > size - 8) die("%s is truncated (header of %llu bytes, file of %llu)", path,
                             (unsigned long long)hlen, (unsigned long long)size);
    char *hdr = xmalloc(hlen);
    pread_all(fd, hdr, hlen, 8, path);
    StTensor *ts;
    int n;
    char err[256];
    if (st_parse_header(hdr, hlen, size - 8 - hlen, &ts, &n, err, sizeof err) < 0) die("%s: %s", path, err);
    free(hdr);
    if (n == 0) {   /* no tensor would point at its StFile, so st_free could not release it */
        free(ts);
        close(fd);
        return;
    }
    StFile *file = xmalloc(sizeof *file);
    file->path = xstrdup(path);
    file->fd = fd;
    file->data_start = 8 + hlen;
    *all = xrealloc(*all, (size_t)(*n_all + n) * sizeof **all);
    for (int i = 0; i < n; i++) {
        ts[i].file = file;
        (*all)[(*n_all)++] = ts[i];
    }
    free(ts);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* All tensors of the checkpoint: model.safetensors, or the shards named by the index (in
 * sorted file order, as llama.cpp reads them). */
static void st_load_dir(const char *dir, StTensor **all, int *n_all)
{
    char path[PATH_MAX];
    *all = NULL;
    *n_all = 0;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    Json *index = load_json(path);
    if (!index) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (access(path, F_OK) != 0)
            die("no model.safetensors or model.safetensors.index.json in %s", dir);
        st_open(path, all, n_all);
        return;
    }
    const Json *map = json_get(index, "weight_map");
    if (!map || map->type != J_OBJ) die("%s has no weight_map", path);
    char **files = xmalloc(map->len * sizeof *files);
    size_t n_files = 0;
    for (size_t i = 0; i < map->len; i++) {
        const char *f = json_str(&map->kids[i]);
        if (!f || strchr(f, '/')) die("%s: bad file name for %s", path, map->keys[i]);
        files[n_files++] = (char *)f;
    }
    qsort(files, n_files, sizeof *files, cmp_str);
    for (size_t i = 0; i < n_files; i++) {
        if (i > 0 && strcmp(files[i], files[i - 1]) == 0) continue;
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (access(path, F_OK) != 0) die("shard %s named by the index is missing", path);
        st_open(path, all, n_all);
    }
    char **names = xmalloc((size_t)*n_all * sizeof *names);
    for (int j = 0; j < *n_all; j++) names[j] = (*all)[j].name;
    qsort(names, (size_t)*n_all, sizeof *names, cmp_str);
    for (size_t i = 0; i < map->len; i++) {
        const char *key = map->keys[i];
        if (!bsearch(&key, names, (size_t)*n_all, sizeof *names, cmp_str))
            die("tensor %s listed in the index is missing from %s", key, json_str(&map->kids[i]));
    }
    free(names);
    free(files);
    json_free(index);
    free(index);
}

/* Frees the list from st_load_dir. st_open appends a file's tensors contiguously, so each
 * StFile is released once, at the first tensor that points at it. */
static void st_free(StTensor *all, int n_all)
{
    for (int i = 0; i < n_all; i++) {
        if (i == 0 || all[i].file != all[i - 1].file) {
            close(all[i].file->fd);
            free(all[i].file->path);
            free(all[i].file);
        }
        free(all[i].name);
    }
    free(all);
}

/* count rows of the source, starting at row first, as floats. */
static void st_read_rows(const StTensor *t, int64_t first, int64_t count, int64_t row_len, float *out, void *scratch)
{
    size_t esize = st_dtype_size(t->dtype), n = (size_t)(count * row_len);
    uint64_t off = t->file->data_start + t->begin + (uint64_t)first * (uint64_t)row_len * esize;
    pread_all(t->file->fd, t->dtype == ST_F32 ? (void *)out : scratch, n * esize, off, t->file->path);
    const uint16_t *h = scratch;
    if (t->dtype == ST_BF16) for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(h[i]);
    if (t->dtype == ST_F16) for (size_t i = 0; i < n; i++) out[i] = f16_to_f32(h[i]);
}

/* ==== Model configuration ==== */

typedef enum { ARCH_QWEN35, ARCH_QWEN35MOE, ARCH_QWEN3NEXT } Arch;

static const char *arch_gguf_name[] = { "qwen35", "qwen35moe", "qwen3next" };

typedef struct {
    Arch arch;
    const Json *text, *top;   /* text_config (or the top level) and the top level */
    int64_t hidden, n_layer, n_head, n_head_kv, head_dim, vocab, ctx, ff;
    int64_t n_expert, n_expert_used, moe_ff, shexp_ff;
    int64_t nk, nv, dk, dv, conv_k;
    int n_mtp;                /* MTP layers present in the checkpoint */
    int n_mtp_config;         /* mtp_num_hidden_layers, or -1 when the config has none */
    int reorder_v;            /* qwen35 family with fewer key heads than value heads */
    unsigned char *recurrent; /* per main layer: linear attention */
} Config;

/* text_config wins over the top level, as in llama.cpp. */
static const Json *cfg_get(const Config *c, const char *key)
{
    const Json *v = json_get(c->text, key);
    return v ? v : json_get(c->top, key);
}

static int cfg_has(const Config *c, const char *key)
{
    const Json *v = cfg_get(c, key);
    return v && v->type == J_NUM;
}

static int64_t cfg_int(const Config *c, const char *key)
{
    const Json *v = cfg_get(c, key);
    if (!v || v->type != J_NUM || v->num != floor(v->num) || v->num < 0)
        die("config.json: missing or bad integer \"%s\"", key);
    return (int64_t)v->num;
}

static int64_t cfg_int_or(const Config *c, const char *key, int64_t fallback)
{
    return cfg_has(c, key) ? cfg_int(c, key) : fallback;
}

/* A rope setting, found at the top level or inside rope_parameters / rope_scaling. */
static const Json *cfg_rope(const Config *c, const char *key)
{
    const Json *v = cfg_get(c, key);
    if (v && v->type != J_NULL) return v;
    v = json_get(cfg_get(c, "rope_parameters"), key);
    return v ? v : json_get(cfg_get(c, "rope_scaling"), key);
}

static void load_config(const char *dir, Config *c)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/config.json", dir);
    Json *top = load_json(path);
    if (!top) die("no config.json in %s", dir);
    memset(c, 0, sizeof *c);
    c->top = top;
    c->text = json_get(top, "text_config") ? json_get(top, "text_config") : top;
    const Json *archs = json_get(top, "architectures");
    const char *name = archs && archs->type == J_ARR && archs->len ? json_str(&archs->kids[0]) : NULL;
    if (!name) die("config.json has no architectures entry");
    if (!strcmp(name, "Qwen3_5ForConditionalGeneration") || !strcmp(name, "Qwen3_5ForCausalLM")) c->arch = ARCH_QWEN35;
    else if (!strcmp(name, "Qwen3_5MoeForConditionalGeneration") || !strcmp(name, "Qwen3_5MoeForCausalLM"))
        c->arch = ARCH_QWEN35MOE;
    else if (!strcmp(name, "Qwen3NextForCausalLM")) c->arch = ARCH_QWEN3NEXT;
    else die("unsupported architecture %s (supported: Qwen3_5*, Qwen3_5Moe*, Qwen3NextForCausalLM)", name);

    c->hidden = cfg_int(c, "hidden_size");
    c->n_layer = cfg_int(c, "num_hidden_layers");
    c->n_head = cfg_int(c, "num_attention_heads");
    c->n_head_kv = cfg_int(c, "num_key_value_heads");
    c->head_dim = cfg_int_or(c, "head_dim", c->n_head ? c->hidden / c->n_head : 0);
    c->vocab = cfg_int(c, "vocab_size");
    c->ctx = cfg_int(c, "max_position_embeddings");
    c->ff = cfg_int_or(c, "intermediate_size", 0);
    c->n_expert = cfg_int_or(c, "num_experts", 0);
    c->n_expert_used = cfg_int_or(c, "num_experts_per_tok", 0);
    c->moe_ff = cfg_int_or(c, "moe_intermediate_size", 0);
    c->shexp_ff = cfg_int_or(c, "shared_expert_intermediate_size", 0);
    c->nk = cfg_int(c, "linear_num_key_heads");
    c->nv = cfg_int(c, "linear_num_value_heads");
    c->dk = cfg_int(c, "linear_key_head_dim");
    c->dv = cfg_int(c, "linear_value_head_dim");
    c->conv_k = cfg_int(c, "linear_conv_kernel_dim");
    c->n_mtp_config = (int)cfg_int_or(c, "mtp_num_hidden_layers", -1);
    if (c->arch != ARCH_QWEN35 && (c->n_expert < 1 || c->n_expert_used < 1 || c->moe_ff < 1))
        die("config.json: mixture-of-experts architecture without num_experts, num_experts_per_tok or moe_intermediate_size");
    if (c->n_layer < 1 || c->n_layer > 4096 || c->hidden < 1 || c->nk < 1 || c->nv % c->nk != 0)
        die("config.json: inconsistent sizes (layers %lld, hidden %lld, key heads %lld, value heads %lld)",
            (long long)c->n_layer, (long long)c->hidden, (long long)c->nk, (long long)c->nv);
    c->reorder_v = c->arch != ARCH_QWEN3NEXT && c->nk != c->nv;

    c->recurrent = xcalloc((size_t)c->n_layer, 1);
    const Json *types = cfg_get(c, "layer_types");
    int64_t interval = cfg_int_or(c, "full_attention_interval", 4);
    if (types && types->type == J_ARR) {
        if ((int64_t)types->len != c->n_layer)
            die("config.json: layer_types has %zu entries for %lld layers", types->len, (long long)c->n_layer);
        for (int64_t i = 0; i < c->n_layer; i++) {
            const char *t = json_str(&types->kids[i]);
            if (!t || (strcmp(t, "linear_attention") && strcmp(t, "full_attention")))
                die("config.json: unknown layer type in layer_types[%lld]", (long long)i);
            c->recurrent[i] = strcmp(t, "linear_attention") == 0;
        }
    } else {
        for (int64_t i = 0; i < c->n_layer; i++) c->recurrent[i] = (i + 1) % interval != 0;
    }
}

static void config_free(Config *c)
{
    free(c->recurrent);
    /* c->top is const for the readers; load_config allocated it with load_json */
    json_free((Json *)c->top);
    free((Json *)c->top);
}

/* ==== Tensor plan ==== */

/* Where the rows of an output tensor come from. Output row r belongs to part r / part_rows
 * (an expert, or the whole tensor); its source row is part * part_stride + part_offset +
 * map(r % part_rows), in srcs[part] when every part has its own source, else in srcs[0]. */
typedef enum { ROWS_SAME, ROWS_VHEAD, ROWS_QKVZ_QKV, ROWS_QKVZ_Z } RowMap;
typedef enum { ELEM_SAME, ELEM_PLUS_ONE, ELEM_NEG_EXP } ElemOp;

typedef struct {
    char name[96];
    int n_dims;
    int64_t ne[4];              /* GGUF order: ne[0] is the row length */
    int type;
    int block;                  /* -1 for tensors outside the blocks */
    int quantizable;
    uint64_t offset;
    const StTensor **srcs;
    int n_srcs;
    int64_t part_rows, part_stride, part_offset;
    RowMap rows;
    int64_t vhead_skip, vhead_dim;   /* ROWS_VHEAD: leading rows kept, then heads of this size */
    int64_t col_vhead_dim;           /* > 0: columns reordered by value head of this size */
    ElemOp elem;
} OutTensor;

typedef struct {
    OutTensor *t;
    int n, cap;
} Plan;

static OutTensor *plan_add(Plan *p, int block, const char *suffix, const StTensor *src)
{
    if (p->n == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 64;
        p->t = xrealloc(p->t, (size_t)p->cap * sizeof *p->t);
    }
    OutTensor *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    if (block >= 0) snprintf(t->name, sizeof t->name, "blk.%d.%s", block, suffix);
    else snprintf(t->name, sizeof t->name, "%s", suffix);
    t->block = block;
    t->srcs = xmalloc(sizeof *t->srcs);
    t->srcs[0] = src;
    t->n_srcs = 1;
    /* GGUF dimensions are the source's reversed, less size-1 middle axes (conv1d's [C, 1, K]) */
    for (int d = src->n_dims - 1; d >= 0; d--)
        if (src->shape[d] != 1 || d == 0 || d == src->n_dims - 1) t->ne[t->n_dims++] = src->shape[d];
    t->part_rows = 1;
    for (int d = 1; d < t->n_dims; d++) t->part_rows *= t->ne[d];
    return t;
}

/* Each tensor owns its srcs array, including the per-expert ones handed over by add_expert. */
static void plan_free(Plan *p)
{
    for (int i = 0; i < p->n; i++) free(p->t[i].srcs);
    free(p->t);
}

static void shape_str(const int64_t *shape, int n, char *buf, size_t len)
{
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < n && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (used < len) snprintf(buf + used, len - used, "]");
}

/* The source must have exactly these dimensions (HF order), as the config implies. */
static void expect_shape(const StTensor *t, int n, int64_t d0, int64_t d1, int64_t d2)
{
    int64_t want[3] = { d0, d1, d2 };
    int ok = t->n_dims == n;
    for (int i = 0; ok && i < n; i++) ok = t->shape[i] == want[i];
    if (ok) return;
    char got[96], exp[96];
    shape_str(t->shape, t->n_dims, got, sizeof got);
    shape_str(want, n, exp, sizeof exp);
    die("tensor %s has shape %s but config.json implies %s", t->name, got, exp);
}

/* Per-expert tensors of one block wait here until all of them have been seen. */
typedef struct {
    int block;
    const StTensor **srcs[3];   /* gate, up, down, indexed by expert */
    int seen;
} ExpertSet;

typedef struct {
    const Config *cfg;
    Plan plan;
    ExpertSet *experts;
    int n_expert_sets;
    int *mtp_seen;              /* per MTP layer index: any tensor present */
} Builder;

static const char *proj_names[3] = { "gate_proj", "up_proj", "down_proj" };
static const char *exps_names[3] = { "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight" };

static ExpertSet *expert_set(Builder *b, int block)
{
    for (int i = 0; i < b->n_expert_sets; i++)
        if (b->experts[i].block == block) return &b->experts[i];
    b->experts = xrealloc(b->experts, (size_t)(b->n_expert_sets + 1) * sizeof *b->experts);
    ExpertSet *s = &b->experts[b->n_expert_sets++];
    s->block = block;
    s->seen = 0;
    for (int p = 0; p < 3; p++) s->srcs[p] = xcalloc((size_t)b->cfg->n_expert, sizeof *s->srcs[p]);
    return s;
}

/* One expert's projection; the merged [n_expert] tensors are emitted when the block's last
 * expert tensor arrives (down, gate, up), the position llama.cpp writes them at. */
static void add_expert(Builder *b, int block, const char *rest, const StTensor *t)
{
    const Config *c = b->cfg;
    char *end;
    long e = strtol(rest, &end, 10);
    int proj = -1;
    for (int p = 0; p < 3; p++)
        if (*end == '.' && starts_with(end + 1, proj_names[p]) && !strcmp(end + 1 + strlen(proj_names[p]), ".weight"))
            proj = p;
    if (end == rest || e < 0 || e >= c->n_expert || proj < 0)
        die("unexpected expert tensor %s (config has %lld experts)", t->name, (long long)c->n_expert);
    if (proj == 2) expect_shape(t, 2, c->hidden, c->moe_ff, 0);
    else expect_shape(t, 2, c->moe_ff, c->hidden, 0);
    ExpertSet *s = expert_set(b, block);
    if (s->srcs[proj][e]) die("duplicate tensor %s", t->name);
    s->srcs[proj][e] = t;
    if (++s->seen < 3 * c->n_expert) return;
    for (int k = 0; k < 3; k++) {
        int p = (k + 2) % 3;   /* down, gate, up */
        OutTensor *o = plan_add(&b->plan, block, exps_names[p], s->srcs[p][0]);
        free(o->srcs);
        o->srcs = s->srcs[p];
        o->n_srcs = (int)c->n_expert;
        o->ne[o->n_dims++] = c->n_expert;
    }
}

/* Fused experts: gate_up [E, 2*ff, hidden] splits into gate and up; down is [E, hidden, ff]. */
static void add_fused_experts(Builder *b, int block, const StTensor *t, int is_gate_up)
{
    const Config *c = b->cfg;
    if (!is_gate_up) {
        expect_shape(t, 3, c->n_expert, c->hidden, c->moe_ff);
        plan_add(&b->plan, block, exps_names[2], t);
        return;
    }
    expect_shape(t, 3, c->n_expert, 2 * c->moe_ff, c->hidden);
    for (int p = 0; p < 2; p++) {
        OutTensor *o = plan_add(&b->plan, block, exps_names[p], t);
        o->ne[1] = c->moe_ff;
        o->part_rows = c->moe_ff;
        o->part_stride = 2 * c->moe_ff;
        o->part_offset = p * c->moe_ff;
    }
}

static void set_vhead(const Config *c, OutTensor *o, int64_t skip, int64_t dim)
{
    if (!c->reorder_v) return;
    o->rows = ROWS_VHEAD;
    o->vhead_skip = skip;
    o->vhead_dim = dim;
}

/* A linear-attention (gated delta net) tensor of a main layer. */
static void add_linear_attn(Builder *b, int block, const char *rest, const StTensor *t)
{
    const Config *c = b->cfg;
    const int64_t qk = 2 * c->nk * c->dk, conv_dim = qk + c->nv * c->dv, h = c->hidden;
    OutTensor *o;
    if (!strcmp(rest, "in_proj_qkv.weight") && c->arch != ARCH_QWEN3NEXT) {
        expect_shape(t, 2, conv_dim, h, 0);
        set_vhead(c, plan_add(&b->plan, block, "attn_qkv.weight", t), qk, c->dv);
    } else if (!strcmp(rest, "in_proj_z.weight") && c->arch != ARCH_QWEN3NEXT) {
        expect_shape(t, 2, c->nv * c->dv, h, 0);
        set_vhead(c, plan_add(&b->plan, block, "attn_gate.weight", t), 0, c->dv);
    } else if ((!strcmp(rest, "in_proj_a.weight") || !strcmp(rest, "in_proj_b.weight")) && c->arch != ARCH_QWEN3NEXT) {
        expect_shape(t, 2, c->nv, h, 0);
        set_vhead(c, plan_add(&b->plan, block, rest[8] == 'a' ? "ssm_alpha.weight" : "ssm_beta.weight", t), 0, 1);
    } else if (!strcmp(rest, "in_proj_qkvz.weight") && c->arch == ARCH_QWEN3NEXT) {
        expect_shape(t, 2, c->nk * (2 * c->dk + 2 * (c->nv / c->nk) * c->dv), h, 0);
        o = plan_add(&b->plan, block, "attn_qkv.weight", t);
        o->ne[1] = o->part_rows = conv_dim;
        o->rows = ROWS_QKVZ_QKV;
        o = plan_add(&b->plan, block, "attn_gate.weight", t);
        o->ne[1] = o->part_rows = c->nv * c->dv;
        o->rows = ROWS_QKVZ_Z;
    } else if (!strcmp(rest, "in_proj_ba.weight") && c->arch == ARCH_QWEN3NEXT) {
        expect_shape(t, 2, 2 * c->nv, h, 0);
        plan_add(&b->plan, block, "ssm_ba.weight", t);
    } else if (!strcmp(rest, "conv1d.weight")) {
        expect_shape(t, 3, conv_dim, 1, c->conv_k);
        set_vhead(c, plan_add(&b->plan, block, "ssm_conv1d.weight", t), qk, c->dv);
    } else if (!strcmp(rest, "A_log") || !strcmp(rest, "dt_bias")) {
        expect_shape(t, 1, c->nv, 0, 0);
        o = plan_add(&b->plan, block, rest[0] == 'A' ? "ssm_a" : "ssm_dt.bias", t);
        if (c->reorder_v) o->col_vhead_dim = 1;
        if (rest[0] == 'A') o->elem = ELEM_NEG_EXP;
    } else if (!strcmp(rest, "norm.weight")) {
        expect_shape(t, 1, c->dv, 0, 0);
        plan_add(&b->plan, block, "ssm_norm.weight", t);   /* not zero-centred: no +1 */
    } else if (!strcmp(rest, "out_proj.weight")) {
        expect_shape(t, 2, h, c->nv * c->dv, 0);
        o = plan_add(&b->plan, block, "ssm_out.weight", t);
        if (c->reorder_v) o->col_vhead_dim = c->dv;
    } else {
        die("unknown linear-attention tensor %s for this architecture", t->name);
    }
}

/* Plain renames within a block: HF suffix, GGUF suffix, and the expected HF shape in units of
 * config sizes. */
typedef enum { D_H, D_FF, D_SFF, D_QG, D_KV, D_Q, D_HD, D_E, D_ONE, D_H2, D_NONE } Dim;

static const struct { const char *hf, *gguf; Dim d0, d1; int zero_centred; } block_renames[] = {
    { "input_layernorm.weight", "attn_norm.weight", D_H, D_NONE, 1 },
    { "post_attention_layernorm.weight", "post_attention_norm.weight", D_H, D_NONE, 1 },
    { "self_attn.q_proj.weight", "attn_q.weight", D_QG, D_H, 0 },
    { "self_attn.k_proj.weight", "attn_k.weight", D_KV, D_H, 0 },
    { "self_attn.v_proj.weight", "attn_v.weight", D_KV, D_H, 0 },
    { "self_attn.o_proj.weight", "attn_output.weight", D_H, D_Q, 0 },
    { "self_attn.q_norm.weight", "attn_q_norm.weight", D_HD, D_NONE, 1 },
    { "self_attn.k_norm.weight", "attn_k_norm.weight", D_HD, D_NONE, 1 },
    { "mlp.gate_proj.weight", "ffn_gate.weight", D_FF, D_H, 0 },
    { "mlp.up_proj.weight", "ffn_up.weight", D_FF, D_H, 0 },
    { "mlp.down_proj.weight", "ffn_down.weight", D_H, D_FF, 0 },
    { "mlp.gate.weight", "ffn_gate_inp.weight", D_E, D_H, 0 },
    { "mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight", D_SFF, D_H, 0 },
    { "mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight", D_SFF, D_H, 0 },
    { "mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight", D_H, D_SFF, 0 },
    { "mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight", D_ONE, D_H, 0 },
};

/* MTP-only tensors, all of block n_layer. */
static const struct { const char *hf, *gguf; Dim d0, d1; int zero_centred; } mtp_renames[] = {
    { "mtp.fc.weight", "nextn.eh_proj.weight", D_H, D_H2, 0 },
    { "mtp.norm.weight", "nextn.shared_head_norm.weight", D_H, D_NONE, 1 },
    { "mtp.pre_fc_norm_embedding.weight", "nextn.enorm.weight", D_H, D_NONE, 1 },
    { "mtp.pre_fc_norm_hidden.weight", "nextn.hnorm.weight", D_H, D_NONE, 1 },
};

static int64_t dim_size(const Config *c, Dim d)
{
    switch (d) {
    case D_H: return c->hidden;
    case D_FF: return c->ff;
    case D_SFF: return c->shexp_ff;
    case D_QG: return 2 * c->n_head * c->head_dim;   /* query and its output gate */
    case D_KV: return c->n_head_kv * c->head_dim;
    case D_Q: return c->n_head * c->head_dim;
    case D_HD: return c->head_dim;
    case D_E: return c->n_expert;
    case D_ONE: return 1;
    case D_H2: return 2 * c->hidden;
    case D_NONE: return 0;
    }
    return 0;
}

static void add_renamed(Builder *b, int block, const char *gguf, Dim d0, Dim d1, int zero_centred, const StTensor *t)
{
    const Config *c = b->cfg;
    if (d1 == D_NONE) expect_shape(t, 1, dim_size(c, d0), 0, 0);
    else expect_shape(t, 2, dim_size(c, d0), dim_size(c, d1), 0);
    OutTensor *o = plan_add(&b->plan, block, gguf, t);
    if (zero_centred) o->elem = ELEM_PLUS_ONE;
}

/* Everything after "layers.N." of a main or MTP layer. */
static void add_block_tensor(Builder *b, int block, int layer_is_linear, const char *rest, const StTensor *t)
{
    for (size_t i = 0; i < sizeof block_renames / sizeof *block_renames; i++)
        if (!strcmp(rest, block_renames[i].hf)) {
            add_renamed(b, block, block_renames[i].gguf, block_renames[i].d0, block_renames[i].d1,
                        block_renames[i].zero_centred, t);
            return;
        }
    if (starts_with(rest, "linear_attn.")) {
        if (!layer_is_linear) die("%s is a linear-attention tensor in a full-attention layer (see layer_types)", t->name);
        add_linear_attn(b, block, rest + strlen("linear_attn."), t);
    } else if (starts_with(rest, "mlp.experts.gate_up_proj") || starts_with(rest, "mlp.experts.down_proj")) {
        add_fused_experts(b, block, t, rest[12] == 'g');
    } else if (starts_with(rest, "mlp.experts.")) {
        add_expert(b, block, rest + strlen("mlp.experts."), t);
    } else {
        die("unknown tensor %s", t->name);
    }
}

/* Maps one checkpoint tensor to its output tensor(s), in llama.cpp's naming. */
static void add_source(Builder *b, const StTensor *t)
{
    const Config *c = b->cfg;
    char name[512];
    snprintf(name, sizeof name, "%s", t->name);
    if (starts_with(name, "model.visual.") || starts_with(name, "visual.")) return;   /* vision tower */
    if (starts_with(name, "model.language_model."))
        memmove(name + 6, name + 21, strlen(name + 21) + 1);   /* -> "model." */
    char *end;
    if (!strcmp(name, "model.embed_tokens.weight")) {
        expect_shape(t, 2, c->vocab, c->hidden, 0);
        plan_add(&b->plan, -1, "token_embd.weight", t);
    } else if (!strcmp(name, "lm_head.weight")) {
        expect_shape(t, 2, c->vocab, c->hidden, 0);
        plan_add(&b->plan, -1, "output.weight", t);
    } else if (!strcmp(name, "model.norm.weight")) {
        add_renamed(b, -1, "output_norm.weight", D_H, D_NONE, 1, t);
    } else if (starts_with(name, "model.layers.")) {
        long layer = strtol(name + 13, &end, 10);
        if (end == name + 13 || *end != '.' || layer < 0 || layer >= c->n_layer)
            die("tensor %s: layer index outside the %lld layers of config.json", t->name, (long long)c->n_layer);
        add_block_tensor(b, (int)layer, c->recurrent[layer], end + 1, t);
    } else if (starts_with(name, "mtp.layers.")) {
        long k = strtol(name + 11, &end, 10);
        if (end == name + 11 || *end != '.' || k < 0 || k >= 64) die("bad MTP tensor name %s", t->name);
        b->mtp_seen[k] = 1;
        add_block_tensor(b, (int)(c->n_layer + k), 0, end + 1, t);
    } else {
        for (size_t i = 0; i < sizeof mtp_renames / sizeof *mtp_renames; i++)
            if (!strcmp(name, mtp_renames[i].hf)) {
                add_renamed(b, (int)c->n_layer, mtp_renames[i].gguf, mtp_renames[i].d0, mtp_renames[i].d1,
                            mtp_renames[i].zero_centred, t);
                return;
            }
        die("unknown tensor %s", t->name);
    }
}

/* Decides which output tensors are weight matrices open to quantisation: llama.cpp keeps
 * 1-D tensors, norms, routers and conv kernels in f32. */
static int is_quantizable(const OutTensor *t)
{
    int n_dims = t->n_dims;
    while (n_dims > 1 && t->ne[n_dims - 1] == 1) n_dims--;
    return n_dims >= 2 && ends_with(t->name, ".weight") && !ends_with(t->name, "_norm.weight") &&
           !strstr(t->name, "ffn_gate_inp.weight") && !strstr(t->name, "ffn_gate_inp_shexp.weight") &&
           !strstr(t->name, "ssm_conv1d");
}

static void build_plan(const Config *cfg, const StTensor *srcs, int n_srcs, Plan *plan, int *n_mtp)
{
    Builder b = { cfg, { 0 }, NULL, 0, xcalloc(64, sizeof(int)) };
    for (int i = 0; i < n_srcs; i++) add_source(&b, &srcs[i]);
    for (int i = 0; i < b.n_expert_sets; i++)
        if (b.experts[i].seen < 3 * cfg->n_expert)
            die("block %d has %d of its %lld expert tensors: checkpoint incomplete?", b.experts[i].block,
                b.experts[i].seen, (long long)(3 * cfg->n_expert));
    *n_mtp = 0;
    while (*n_mtp < 64 && b.mtp_seen[*n_mtp]) (*n_mtp)++;
    for (int k = *n_mtp; k < 64; k++)
        if (b.mtp_seen[k]) die("MTP layers are not numbered 0..n-1 (mtp.layers.%d present, %d missing)", k, *n_mtp);
    for (int i = 0; i < b.plan.n; i++) {
        if (b.plan.t[i].block >= cfg->n_layer + *n_mtp)
            die("%s belongs to an MTP block but the checkpoint has no mtp.layers.* tensors", b.plan.t[i].name);
        b.plan.t[i].quantizable = is_quantizable(&b.plan.t[i]);
    }
    free(b.experts);
    free(b.mtp_seen);
    *plan = b.plan;
}

/* ==== Quantisation mix ==== */

typedef enum { MIX_BF16, MIX_F16, MIX_Q8_0, MIX_Q4_K, MIX_Q6_K, MIX_Q4_K_M } Mix;

static const struct { const char *name; Mix mix; int file_type; int base; } mixes[] = {
    { "bf16", MIX_BF16, 32, T_BF16 },
    { "f16", MIX_F16, 1, T_F16 },
    { "q8_0", MIX_Q8_0, 7, T_Q8_0 },
    { "q4_k", MIX_Q4_K, 14, T_Q4_K },
    { "q6_k", MIX_Q6_K, 18, T_Q6_K },
    { "q4_k_m", MIX_Q4_K_M, 15, T_Q4_K },
};

/* A type the row length cannot hold falls back the way llama-quantize does. */
static int fit_type(int type, int64_t row_len)
{
    if (row_len % block_elems(type) == 0) return type;
    int fallback = type == T_Q4_K ? T_Q5_0 : type == T_Q5_K ? T_Q8_0 : type == T_Q6_K ? T_Q8_0 : T_F16;
    return row_len % block_elems(fallback) == 0 ? fallback : T_F16;
}

/* llama.cpp's "use more bits" layers: the first and last eighth, and every third between. */
static int more_bits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

/* The Q4_K_M recipe of llama-quantize, by tensor role. */
static int q4_k_m_type(const OutTensor *t, const Config *c, int n_blocks, int tied)
{
    const char *n = t->name;
    int layer = t->block, moe8 = c->n_expert == 8;
    if (!strcmp(n, "output.weight") || (tied && !strcmp(n, "token_embd.weight")))
        return t->ne[0] % 256 ? T_Q8_0 : T_Q6_K;
    if (strstr(n, "attn_v.weight") || strstr(n, "attn_qkv.weight"))
        return moe8 ? T_Q8_0 : more_bits(layer, n_blocks) ? T_Q6_K : T_Q4_K;
    if (strstr(n, "attn_k.weight")) return moe8 ? T_Q8_0 : T_Q4_K;
    if (strstr(n, "ffn_down")) return more_bits(layer, n_blocks) ? T_Q6_K : T_Q4_K;
    if (strstr(n, "attn_output.weight")) return moe8 ? T_Q5_K : T_Q4_K;
    return T_Q4_K;
}

static void choose_types(Plan *p, const Config *c, Mix mix, int mtp_type)
{
    int n_blocks = (int)c->n_layer, tied = 1;
    for (int i = 0; i < p->n; i++) {
        if (p->t[i].block >= n_blocks) n_blocks = p->t[i].block + 1;
        if (!strcmp(p->t[i].name, "output.weight")) tied = 0;
    }
    for (int i = 0; i < p->n; i++) {
        OutTensor *t = &p->t[i];
        int type;
        if (!t->quantizable) type = T_F32;
        else if (t->block >= c->n_layer) type = mtp_type;
        else if (mix == MIX_Q4_K_M) type = q4_k_m_type(t, c, n_blocks, tied);
        else type = mixes[mix].base;
        t->type = type == T_F32 ? T_F32 : fit_type(type, t->ne[0]);
    }
}

/* ==== Tokenizer ==== */

static const char *QWEN2_SPLIT =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *QWEN35_SPLIT =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

enum { TOK_NORMAL = 1, TOK_CONTROL = 3, TOK_USER_DEFINED = 4, TOK_UNUSED = 5 };

static const char *special_kinds[] = { "bos", "eos", "unk", "sep", "pad", "cls", "mask" };
static const char *special_keys[] = {
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.cls_token_id",
    "tokenizer.ggml.mask_token_id",
};

typedef struct {
    const char *pre;
    char **tokens;              /* vocab entries; strings owned by the JSON or by us */
    int32_t *types;
    int64_t n_tokens;
    char **merges;
    size_t n_merges;
    int64_t special[7];         /* -1 when unset */
    int add_bos, add_eos, nfc;
    char *chat_template;
    Json *tok_json, *tok_cfg;
} Tokenizer;

static const char *detect_pre(const Json *pre_tok)
{
    if (!pre_tok) die("tokenizer.json has no pre_tokenizer");
    const Json *list = json_get(pre_tok, "pretokenizers");
    size_t n = list && list->type == J_ARR ? list->len : 1;
    for (size_t i = 0; i < n; i++) {
        const Json *p = list && list->type == J_ARR ? &list->kids[i] : pre_tok;
        const char *type = json_str(json_get(p, "type"));
        const char *regex = json_str(json_get(json_get(p, "pattern"), "Regex"));
        if (!type || strcmp(type, "Split") || !regex) continue;
        if (!strcmp(regex, QWEN2_SPLIT)) return "qwen2";
        if (!strcmp(regex, QWEN35_SPLIT)) return "qwen35";
        die("tokenizer.json: unknown pre-tokenizer regex (neither Qwen2 nor Qwen3.5)");
    }
    die("tokenizer.json: no Split pre-tokenizer with a regex");
    return NULL;
}

/* llama.cpp marks added tokens that look like <|...|> as control even when not special. */
static int looks_special(const char *s)
{
    size_t n = strlen(s);
    return n >= 4 && starts_with(s, "<|") && ends_with(s, "|>");
}

/* Spaces written as U+2581 in user-defined tokens become real spaces, as llama.cpp does. */
static char *unescape_spaces(const char *s)
{
    char *out = xstrdup(s), *w = out;
    for (const char *r = s; *r;) {
        if (!strncmp(r, "\xe2\x96\x81", 3)) { *w++ = ' '; r += 3; }
        else *w++ = *r++;
    }
    *w = 0;
    return out;
}

static const char *token_content(const Json *entry)
{
    const char *s = json_str(entry);
    return s ? s : json_str(json_get(entry, "content"));
}

/* Special token ids: the added token named in tokenizer_config.json, else config.json's id. */
static void load_special_ids(Tokenizer *tk, const Config *cfg, const Json *added)
{
    for (int k = 0; k < 7; k++) {
        char key[32];
        tk->special[k] = -1;
        snprintf(key, sizeof key, "%s_token", special_kinds[k]);
        const char *content = token_content(json_get(tk->tok_cfg, key));
        for (size_t i = 0; content && added && i < added->len; i++) {
            const char *name = json_str(json_get(&added->kids[i], "content"));
            const Json *id = json_get(&added->kids[i], "id");
            if (name && !strcmp(name, content)) {
                if (id && id->type == J_NUM) tk->special[k] = (int64_t)id->num;
                break;
            }
        }
        snprintf(key, sizeof key, "%s_token_id", special_kinds[k]);
        const Json *id = json_get(cfg->top, key) ? json_get(cfg->top, key) : json_get(cfg->text, key);
        if (tk->special[k] < 0 && id && id->type == J_NUM && id->num >= 0) tk->special[k] = (int64_t)id->num;
        if (tk->special[k] >= tk->n_tokens) tk->special[k] = -1;
        snprintf(key, sizeof key, "add_%s_token", special_kinds[k]);
        const Json *add = json_get(tk->tok_cfg, key);
        if (add && add->type == J_BOOL) {
            if (k == 0) tk->add_bos = (int)add->num;
            if (k == 1) tk->add_eos = (int)add->num;
        }
    }
}

/* BOS/EOS added by a TemplateProcessing post-processor, if the tokenizer has one. */
static void load_template_flags(Tokenizer *tk)
{
    const Json *post = json_get(tk->tok_json, "post_processor");
    const char *type = json_str(json_get(post, "type"));
    const Json *single = json_get(post, "single");
    if (!type || strcmp(type, "TemplateProcessing") || !single || single->type != J_ARR || !single->len) return;
    tk->add_bos = json_get(&single->kids[0], "SpecialToken") != NULL;
    tk->add_eos = single->len > 1 && json_get(&single->kids[single->len - 1], "SpecialToken") != NULL;
}

static void load_chat_template(Tokenizer *tk, const char *dir)
{
    const Json *t = json_get(tk->tok_cfg, "chat_template");
    if (json_str(t)) { tk->chat_template = xstrdup(t->str); return; }
    for (size_t i = 0; t && t->type == J_ARR && i < t->len; i++) {
        const char *name = json_str(json_get(&t->kids[i], "name")), *text = json_str(json_get(&t->kids[i], "template"));
        if (name && text && !strcmp(name, "default")) { tk->chat_template = xstrdup(text); return; }
    }
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    tk->chat_template = read_file(path, NULL);
}

static void load_tokenizer(const char *dir, const Config *cfg, Tokenizer *tk)
{
    char path[PATH_MAX];
    memset(tk, 0, sizeof *tk);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    tk->tok_json = load_json(path);
    if (!tk->tok_json) die("no tokenizer.json in %s", dir);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    tk->tok_cfg = load_json(path);
    if (!tk->tok_cfg) die("no tokenizer_config.json in %s", dir);

    const Json *model = json_get(tk->tok_json, "model");
    if (!json_str(json_get(model, "type")) || strcmp(json_get(model, "type")->str, "BPE"))
        die("tokenizer.json: only BPE tokenizers are supported");
    const Json *vocab = json_get(model, "vocab"), *merges = json_get(model, "merges");
    const Json *added = json_get(tk->tok_json, "added_tokens");
    if (!vocab || vocab->type != J_OBJ || !merges || merges->type != J_ARR)
        die("tokenizer.json: model has no vocab or merges");
    tk->pre = detect_pre(json_get(tk->tok_json, "pre_tokenizer"));

    tk->n_tokens = cfg->vocab;
    tk->tokens = xcalloc((size_t)tk->n_tokens, sizeof *tk->tokens);
    tk->types = xcalloc((size_t)tk->n_tokens, sizeof *tk->types);
    for (size_t i = 0; i < vocab->len; i++) {
        const Json *id = &vocab->kids[i];
        if (id->type != J_NUM || id->num < 0 || id->num >= (double)tk->n_tokens)
            die("tokenizer.json: token %s has id outside vocab_size %lld", vocab->keys[i], (long long)cfg->vocab);
        tk->tokens[(int64_t)id->num] = vocab->keys[i];
        tk->types[(int64_t)id->num] = TOK_NORMAL;
    }
    for (size_t i = 0; added && added->type == J_ARR && i < added->len; i++) {
        const Json *id = json_get(&added->kids[i], "id"), *special = json_get(&added->kids[i], "special");
        const char *content = json_str(json_get(&added->kids[i], "content"));
        if (!id || id->type != J_NUM || !content || id->num < 0 || id->num >= (double)tk->n_tokens)
            die("tokenizer.json: bad added token entry %zu (id outside vocab_size?)", i);
        int64_t k = (int64_t)id->num;
        int is_control = (special && special->type == J_BOOL && special->num) || looks_special(content);
        if (tk->types[k] == TOK_USER_DEFINED) free(tk->tokens[k]);   /* id repeated: drop our earlier copy */
        tk->tokens[k] = is_control ? (char *)content : unescape_spaces(content);
        tk->types[k] = is_control ? TOK_CONTROL : TOK_USER_DEFINED;
    }
    for (int64_t i = 0; i < tk->n_tokens; i++)
        if (!tk->tokens[i]) {
            char pad[32];
            snprintf(pad, sizeof pad, "[PAD%lld]", (long long)i);
            tk->tokens[i] = xstrdup(pad);
            tk->types[i] = TOK_UNUSED;
        }

    tk->n_merges = merges->len;
    tk->merges = xcalloc(merges->len, sizeof *tk->merges);
    for (size_t i = 0; i < merges->len; i++) {
        const Json *m = &merges->kids[i];
        if (json_str(m)) { tk->merges[i] = m->str; continue; }
        if (m->type != J_ARR || m->len != 2 || !json_str(&m->kids[0]) || !json_str(&m->kids[1]))
            die("tokenizer.json: bad merge entry %zu", i);
        size_t n = m->kids[0].len + m->kids[1].len + 2;
        tk->merges[i] = xmalloc(n);
        snprintf(tk->merges[i], n, "%s %s", m->kids[0].str, m->kids[1].str);
    }
    load_special_ids(tk, cfg, added && added->type == J_ARR ? added : NULL);
    load_template_flags(tk);
    load_chat_template(tk, dir);
    const char *norm = json_str(json_get(json_get(tk->tok_json, "normalizer"), "type"));
    tk->nfc = norm && !strcmp(norm, "NFC");
}

/* Frees what load_tokenizer allocated. Ownership follows how each string was made there:
 * user-defined and padding tokens are our copies, other tokens point into tok_json; merges
 * given as strings point into tok_json, those given as pairs were joined by us. */
static void tokenizer_free(Tokenizer *tk)
{
    for (int64_t i = 0; i < tk->n_tokens; i++)
        if (tk->types[i] == TOK_USER_DEFINED || tk->types[i] == TOK_UNUSED) free(tk->tokens[i]);
    const Json *merges = json_get(json_get(tk->tok_json, "model"), "merges");
    for (size_t i = 0; i < tk->n_merges; i++)
        if (!json_str(&merges->kids[i])) free(tk->merges[i]);
    free(tk->tokens);
    free(tk->types);
    free(tk->merges);
    free(tk->chat_template);
    json_free(tk->tok_json);
    free(tk->tok_json);
    json_free(tk->tok_cfg);
    free(tk->tok_cfg);
}

/* ==== GGUF writer ==== */

enum { GV_U32 = 4, GV_I32 = 5, GV_F32 = 6, GV_BOOL = 7, GV_STR = 8, GV_ARR = 9 };
#define GGUF_ALIGN 32

typedef struct {
    FILE *f;
    uint64_t n_kv;
    int counting;     /* first pass over the metadata only counts keys */
} Writer;

static void w_bytes(Writer *w, const void *p, size_t n)
{
    if (!w->counting && n && fwrite(p, 1, n, w->f) != n) die("write failed: %s", strerror(errno));
}

static void w_u32(Writer *w, uint32_t v) { uint8_t b[4] = { (uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24) }; w_bytes(w, b, 4); }
static void w_u64(Writer *w, uint64_t v) { w_u32(w, (uint32_t)v); w_u32(w, (uint32_t)(v >> 32)); }
static void w_str(Writer *w, const char *s) { size_t n = strlen(s); w_u64(w, n); w_bytes(w, s, n); }

static void kv_key(Writer *w, const char *key, uint32_t type) { w->n_kv++; w_str(w, key); w_u32(w, type); }
static void kv_u32(Writer *w, const char *key, uint32_t v) { kv_key(w, key, GV_U32); w_u32(w, v); }
static void kv_f32(Writer *w, const char *key, float v) { kv_key(w, key, GV_F32); w_u32(w, bits_from_f32(v)); }
static void kv_bool(Writer *w, const char *key, int v) { uint8_t b = (uint8_t)!!v; kv_key(w, key, GV_BOOL); w_bytes(w, &b, 1); }
static void kv_str(Writer *w, const char *key, const char *v) { kv_key(w, key, GV_STR); w_str(w, v); }

static void kv_array_head(Writer *w, const char *key, uint32_t elem_type, uint64_t n)
{
    kv_key(w, key, GV_ARR);
    w_u32(w, elem_type);
    w_u64(w, n);
}

static void kv_strs(Writer *w, const char *key, char **v, uint64_t n)
{
    kv_array_head(w, key, GV_STR, n);
    for (uint64_t i = 0; i < n; i++) w_str(w, v[i]);
}

static void kv_i32s(Writer *w, const char *key, const int32_t *v, uint64_t n)
{
    kv_array_head(w, key, GV_I32, n);
    for (uint64_t i = 0; i < n; i++) w_u32(w, (uint32_t)v[i]);
}

static void kv_arch(Writer *w, const Config *c, const char *key, uint32_t v)
{
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch_gguf_name[c->arch], key);
    kv_u32(w, full, v);
}

static void kv_arch_f32(Writer *w, const Config *c, const char *key, float v)
{
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch_gguf_name[c->arch], key);
    kv_f32(w, full, v);
}

/* "hf" -> "Hf", "Qwen3.5-0.8B" -> "Qwen3.5 0.8B": llama.cpp's name from a directory. */
static void dir_title(const char *dir, char *out, size_t len)
{
    char buf[256];
    const char *base = strrchr(dir, '/');
    snprintf(buf, sizeof buf, "%s", base ? base + 1 : dir);
    size_t n = strlen(buf);
    while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
    size_t used = 0;
    out[0] = 0;
    for (char *word = strtok(buf, " -\t"); word; word = strtok(NULL, " -\t")) {
        int has_upper = 0, has_lower = 0;
        for (char *p = word; *p; p++) { has_upper |= *p >= 'A' && *p <= 'Z'; has_lower |= *p >= 'a' && *p <= 'z'; }
        int versionish = (word[0] >= '0' && word[0] <= '9') ||
                         (word[0] == 'v' && word[1] >= '0' && word[1] <= '9' && strspn(word + 1, "0123456789.") == strlen(word + 1));
        if (has_lower && !has_upper && !versionish)
            for (char *p = word; *p; p++) {
                int prev_alpha = p > word && ((p[-1] | 32) >= 'a' && (p[-1] | 32) <= 'z');
                if (!prev_alpha && *p >= 'a' && *p <= 'z') *p = (char)(*p - 32);
            }
        used += (size_t)snprintf(out + used, used < len ? len - used : 0, used ? " %s" : "%s", word);
    }
}

/* "3.6M", or "8x3.7M" for mixtures of experts: llama.cpp's size label. */
static void size_label(const Plan *p, char *out, size_t len)
{
    double shared = 0, expert = 0;
    int64_t expert_sum = 0, n_expert_tensors = 0;
    for (int i = 0; i < p->n; i++) {
        double numel = 1;
        for (int d = 0; d < p->t[i].n_dims; d++) numel *= (double)p->t[i].ne[d];
        if (strstr(p->t[i].name, "_exps.")) {
            int64_t e = p->t[i].ne[p->t[i].n_dims - 1];
            expert += floor(numel / (double)e);
            expert_sum += e;
            n_expert_tensors++;
        } else {
            shared += numel;
        }
    }
    double count = n_expert_tensors ? shared + expert : shared;
    const char *suffix = count > 1e12 ? "T" : count > 1e9 ? "B" : count > 1e6 ? "M" : "K";
    double scaled = count * (count > 1e12 ? 1e-12 : count > 1e9 ? 1e-9 : count > 1e6 ? 1e-6 : 1e-3);
    double whole = nearbyint(scaled);
    int digits = 0;
    for (; whole >= 1; whole = floor(whole / 10)) digits++;
    int decimals = digits >= 2 ? 0 : 2 - digits;
    if (n_expert_tensors)
        snprintf(out, len, "%lldx%.*f%s", (long long)(expert_sum / n_expert_tensors), decimals, scaled, suffix);
    else
        snprintf(out, len, "%.*f%s", decimals, scaled, suffix);
}

/* All metadata, in the key order llama.cpp writes. */
static void write_metadata(Writer *w, const Config *c, const Plan *p, const Tokenizer *tk, const char *dir,
                           int file_type, int n_mtp)
{
    char text[256];
    const int64_t n_blocks = c->n_layer + n_mtp;
    kv_str(w, "general.architecture", arch_gguf_name[c->arch]);
    kv_str(w, "general.type", "model");
    dir_title(dir, text, sizeof text);
    kv_str(w, "general.name", text);
    size_label(p, text, sizeof text);
    kv_str(w, "general.size_label", text);
    kv_arch(w, c, "block_count", (uint32_t)n_blocks);
    kv_arch(w, c, "context_length", (uint32_t)c->ctx);
    kv_arch(w, c, "embedding_length", (uint32_t)c->hidden);
    if (c->ff) kv_arch(w, c, "feed_forward_length", (uint32_t)c->ff);
    kv_arch(w, c, "attention.head_count", (uint32_t)c->n_head);
    kv_arch(w, c, "attention.head_count_kv", (uint32_t)c->n_head_kv);
    const Json *sections = cfg_rope(c, "mrope_section");
    if (sections && sections->type == J_ARR && sections->len <= 4) {
        int32_t s[4] = { 0 };
        for (size_t i = 0; i < sections->len; i++) s[i] = (int32_t)sections->kids[i].num;
        snprintf(text, sizeof text, "%s.rope.dimension_sections", arch_gguf_name[c->arch]);
        kv_i32s(w, text, s, 4);
    }
    const Json *theta = cfg_rope(c, "rope_theta");
    if (!theta || theta->type != J_NUM) die("config.json: no rope_theta");
    kv_arch_f32(w, c, "rope.freq_base", (float)theta->num);
    const Json *eps = cfg_get(c, "rms_norm_eps");
    if (!eps || eps->type != J_NUM) die("config.json: no rms_norm_eps");
    kv_arch_f32(w, c, "attention.layer_norm_rms_epsilon", (float)eps->num);
    if (c->n_expert) {
        kv_arch(w, c, "expert_count", (uint32_t)c->n_expert);
        kv_arch(w, c, "expert_used_count", (uint32_t)c->n_expert_used);
    }
    kv_arch(w, c, "attention.key_length", (uint32_t)c->head_dim);
    kv_arch(w, c, "attention.value_length", (uint32_t)c->head_dim);
    kv_u32(w, "general.file_type", (uint32_t)file_type);
    if (c->moe_ff) kv_arch(w, c, "expert_feed_forward_length", (uint32_t)c->moe_ff);
    if (c->shexp_ff) kv_arch(w, c, "expert_shared_feed_forward_length", (uint32_t)c->shexp_ff);
    if (n_mtp) kv_arch(w, c, "nextn_predict_layers", (uint32_t)n_mtp);
    kv_arch(w, c, "ssm.conv_kernel", (uint32_t)c->conv_k);
    kv_arch(w, c, "ssm.state_size", (uint32_t)c->dk);
    kv_arch(w, c, "ssm.group_count", (uint32_t)c->nk);
    kv_arch(w, c, "ssm.time_step_rank", (uint32_t)c->nv);
    kv_arch(w, c, "ssm.inner_size", (uint32_t)(c->dv * c->nv));
    snprintf(text, sizeof text, "%s.attention.recurrent_layers", arch_gguf_name[c->arch]);
    kv_array_head(w, text, GV_BOOL, (uint64_t)n_blocks);
    for (int64_t i = 0; i < n_blocks; i++) {
        uint8_t b = i < c->n_layer && c->recurrent[i];
        w_bytes(w, &b, 1);
    }
    kv_arch(w, c, "full_attention_interval", (uint32_t)cfg_int_or(c, "full_attention_interval", 4));
    const Json *partial = cfg_rope(c, "partial_rotary_factor");
    double factor = partial && partial->type == J_NUM ? partial->num : 0.25;
    kv_arch(w, c, "rope.dimension_count", (uint32_t)(int64_t)((double)c->head_dim * factor));
    kv_u32(w, "general.quantization_version", 2);

    kv_str(w, "tokenizer.ggml.model", "gpt2");
    kv_str(w, "tokenizer.ggml.pre", tk->pre);
    kv_strs(w, "tokenizer.ggml.tokens", tk->tokens, (uint64_t)tk->n_tokens);
    kv_i32s(w, "tokenizer.ggml.token_type", tk->types, (uint64_t)tk->n_tokens);
    kv_strs(w, "tokenizer.ggml.merges", tk->merges, tk->n_merges);
    for (int k = 0; k < 7; k++)
        if (tk->special[k] >= 0) kv_u32(w, special_keys[k], (uint32_t)tk->special[k]);
    kv_bool(w, "tokenizer.ggml.add_bos_token", tk->add_bos);
    kv_bool(w, "tokenizer.ggml.add_eos_token", tk->add_eos);
    if (tk->chat_template) kv_str(w, "tokenizer.chat_template", tk->chat_template);
    if (tk->nfc) kv_bool(w, "tokenizer.ggml.normalizer.nfc", 1);
}

static uint64_t align_up(uint64_t v) { return (v + GGUF_ALIGN - 1) / GGUF_ALIGN * GGUF_ALIGN; }

static uint64_t tensor_bytes(const OutTensor *t)
{
    uint64_t rows = 1;
    for (int d = 1; d < t->n_dims; d++) rows *= (uint64_t)t->ne[d];
    return rows * row_bytes(t->type, t->ne[0]);
}

static void write_header(Writer *w, const Config *c, Plan *p, const Tokenizer *tk, const char *dir, int file_type, int n_mtp)
{
    Writer count = { NULL, 0, 1 };
    write_metadata(&count, c, p, tk, dir, file_type, n_mtp);
    w_bytes(w, "GGUF", 4);
    w_u32(w, 3);
    w_u64(w, (uint64_t)p->n);
    w_u64(w, count.n_kv);
    write_metadata(w, c, p, tk, dir, file_type, n_mtp);
    uint64_t offset = 0;
    for (int i = 0; i < p->n; i++) {
        OutTensor *t = &p->t[i];
        t->offset = offset;
        w_str(w, t->name);
        w_u32(w, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) w_u64(w, (uint64_t)t->ne[d]);
        w_u32(w, (uint32_t)t->type);
        w_u64(w, offset);
        offset = align_up(offset + tensor_bytes(t));
    }
    static const uint8_t zeros[GGUF_ALIGN];
    long pos = ftell(w->f);
    if (pos < 0) die("cannot tell output position");
    w_bytes(w, zeros, align_up((uint64_t)pos) - (uint64_t)pos);
}

/* ==== Streaming tensor data ==== */

/* Value head o of the output is source head (o % nk) * (nv/nk) + o / nk: HF groups value
 * heads by key head, ggml wants them tiled so a plain repeat of the key heads lines up. */
static int64_t vhead_source(const Config *c, int64_t i, int64_t skip, int64_t dim)
{
    if (i < skip) return i;
    int64_t j = i - skip, head = j / dim, per_k = c->nv / c->nk;
    return skip + ((head % c->nk) * per_k + head / c->nk) * dim + j % dim;
}

/* Qwen3-Next's in_proj_qkvz holds, per key head, [q | k | v | z]; llama.cpp wants all q, all
 * k, all v (attn_qkv) and all z (attn_gate). */
static int64_t qkvz_source(const Config *c, int64_t i, int z)
{
    const int64_t vdim = c->nv / c->nk * c->dv, group = 2 * c->dk + 2 * vdim, qdim = c->nk * c->dk;
    if (z) return i / vdim * group + 2 * c->dk + vdim + i % vdim;
    if (i < qdim) return i / c->dk * group + i % c->dk;
    if (i < 2 * qdim) return (i - qdim) / c->dk * group + c->dk + (i - qdim) % c->dk;
    return (i - 2 * qdim) / vdim * group + 2 * c->dk + (i - 2 * qdim) % vdim;
}

static void source_row(const Config *c, const OutTensor *t, int64_t r, const StTensor **src, int64_t *row)
{
    int64_t part = r / t->part_rows, i = r % t->part_rows, local = i;
    if (t->rows == ROWS_VHEAD) local = vhead_source(c, i, t->vhead_skip, t->vhead_dim);
    else if (t->rows == ROWS_QKVZ_QKV || t->rows == ROWS_QKVZ_Z) local = qkvz_source(c, i, t->rows == ROWS_QKVZ_Z);
    *src = t->srcs[t->n_srcs > 1 ? part : 0];
    *row = (t->n_srcs > 1 ? 0 : part * t->part_stride) + t->part_offset + local;
}

/* Rows [first, first+count) of an output tensor as floats, with every transform applied.
 * Runs of consecutive source rows are read with one call. */
static void fill_rows(const Config *c, const OutTensor *t, int64_t first, int64_t count, float *out,
                      float *tmp, void *scratch)
{
    const int64_t n = t->ne[0];
    for (int64_t r = 0; r < count;) {
        const StTensor *src, *next_src;
        int64_t row, next_row, run = 1;
        source_row(c, t, first + r, &src, &row);
        while (r + run < count) {
            source_row(c, t, first + r + run, &next_src, &next_row);
            if (next_src != src || next_row != row + run) break;
            run++;
        }
        st_read_rows(src, row, run, n, out + r * n, scratch);
        r += run;
    }
    for (int64_t r = 0; t->col_vhead_dim && r < count; r++) {
        float *x = out + r * n;
        memcpy(tmp, x, (size_t)n * sizeof *tmp);
        for (int64_t j = 0; j < n; j++) x[j] = tmp[vhead_source(c, j, 0, t->col_vhead_dim)];
    }
    for (int64_t i = 0; t->elem != ELEM_SAME && i < count * n; i++)
        out[i] = t->elem == ELEM_PLUS_ONE ? out[i] + 1.0f : -expf(out[i]);
}

typedef struct {
    int type;
    const float *x;
    uint8_t *out;
    int64_t n, first, count;
} EncodeJob;

static void *encode_rows(void *arg)
{
    EncodeJob *j = arg;
    size_t rb = row_bytes(j->type, j->n);
    for (int64_t r = j->first; r < j->first + j->count; r++) encode_row(j->type, j->x + r * j->n, j->out + r * rb, j->n);
    return NULL;
}

/* Encodes count rows, split over threads for the slow block formats. */
static void encode_chunk(int type, const float *x, uint8_t *out, int64_t n, int64_t count, int threads)
{
    EncodeJob jobs[64];
    pthread_t ids[64];
    if (threads > 64) threads = 64;
    if (block_elems(type) == 1 || count < 2 * threads) threads = 1;
    int64_t per = (count + threads - 1) / threads;
    int started = 0;
    for (int k = 0; k < threads; k++) {
        int64_t first = k * per, rows = first + per > count ? count - first : per;
        if (rows <= 0) break;
        jobs[k] = (EncodeJob){ type, x, out, n, first, rows };
        if (k == threads - 1 || pthread_create(&ids[k], NULL, encode_rows, &jobs[k]) != 0) encode_rows(&jobs[k]);
        else started = k + 1;
    }
    for (int k = 0; k < started; k++) pthread_join(ids[k], NULL);
}

#define CHUNK_FLOATS (4u << 20)

static void write_tensors(Writer *w, const Config *c, const Plan *p, int threads, int verbose)
{
    int64_t max_row = 1;
    for (int i = 0; i < p->n; i++) if (p->t[i].ne[0] > max_row) max_row = p->t[i].ne[0];
    size_t cap = CHUNK_FLOATS > (size_t)max_row ? CHUNK_FLOATS : (size_t)max_row;
    float *x = xmalloc(cap * sizeof *x), *tmp = xmalloc((size_t)max_row * sizeof *tmp);
    void *scratch = xmalloc(cap * 2);
    uint8_t *out = xmalloc(cap * 4);
    static const uint8_t zeros[GGUF_ALIGN];
    for (int i = 0; i < p->n; i++) {
        const OutTensor *t = &p->t[i];
        const int64_t n = t->ne[0], chunk = (int64_t)(cap / (size_t)n);
        int64_t rows = 1;
        for (int d = 1; d < t->n_dims; d++) rows *= t->ne[d];
        if (verbose) fprintf(stderr, "[%3d/%d] %-40s %-6s\n", i + 1, p->n, t->name, type_name(t->type));
        for (int64_t r = 0; r < rows; r += chunk) {
            int64_t count = rows - r < chunk ? rows - r : chunk;
            fill_rows(c, t, r, count, x, tmp, scratch);
            encode_chunk(t->type, x, out, n, count, threads);
            w_bytes(w, out, (size_t)count * row_bytes(t->type, n));
        }
        uint64_t size = tensor_bytes(t);
        w_bytes(w, zeros, align_up(size) - size);
    }
    free(x); free(tmp); free(scratch); free(out);
}

/* ==== Main ==== */

static int parse_type(const char *s, const char *flag)
{
    for (size_t i = 0; i < sizeof mixes / sizeof *mixes; i++)
        if (!strcmp(s, mixes[i].name)) return (int)i;
    die("%s %s: expected bf16, f16, q8_0, q4_k, q6_k or q4_k_m", flag, s);
    return -1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: mtp-convert [options] HF_DIR OUT.gguf\n"
            "  --type T       bf16 (default), f16, q8_0, q4_k, q6_k, q4_k_m\n"
            "  --mtp-type T   type of the MTP block's matrices (default: q8_0 for 4-bit types, else --type)\n"
            "  --threads N    quantisation threads (default: all cores)\n"
            "  -q             quiet\n");
    exit(2);
}

/* Writes to a temporary file in the target directory; renames only once it is complete and
 * on disk. */
static FILE *open_temp(const char *out_path)
{
    snprintf(temp_path, sizeof temp_path, "%s.tmp.XXXXXX", out_path);
    int fd = mkstemp(temp_path);
    if (fd < 0) { temp_path[0] = 0; die("cannot create %s.tmp.*: %s", out_path, strerror(errno)); }
    fchmod(fd, 0644);
    FILE *f = fdopen(fd, "wb");
    if (!f) die("cannot open temporary output: %s", strerror(errno));
    setvbuf(f, NULL, _IOFBF, 1 << 22);
    return f;
}

static void commit_output(FILE *f, const char *out_path)
{
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) die("cannot write %s: %s", temp_path, strerror(errno));
    if (fclose(f) != 0) die("cannot write %s: %s", temp_path, strerror(errno));
    if (rename(temp_path, out_path) != 0) die("cannot rename to %s: %s", out_path, strerror(errno));
    temp_path[0] = 0;
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", out_path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0; else snprintf(dir, sizeof dir, ".");
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) { fsync(dfd); close(dfd); }
}

#ifndef MTP_NO_MAIN   /* tests/fuzz includes this file for its parsers */
int main(int argc, char **argv)
{
    int mix = 0, mtp_mix = -1, threads = (int)sysconf(_SC_NPROCESSORS_ONLN), verbose = 1;
    const char *dir = NULL, *out_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--type") && i + 1 < argc) mix = parse_type(argv[++i], "--type");
        else if (!strcmp(argv[i], "--mtp-type") && i + 1 < argc) mtp_mix = parse_type(argv[++i], "--mtp-type");
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-q")) verbose = 0;
        else if (argv[i][0] == '-') usage();
        else if (!dir) dir = argv[i];
        else if (!out_path) out_path = argv[i];
        else usage();
    }
    if (!dir || !out_path) usage();
    if (threads < 1) threads = 1;
    if (mtp_mix == MIX_Q4_K_M) die("--mtp-type q4_k_m: the MTP block takes a single type");
    if (mtp_mix < 0) mtp_mix = mixes[mix].base == T_Q4_K ? MIX_Q8_0 : mix;
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) die("%s is not a directory", dir);
    Config cfg;
    load_config(dir, &cfg);
    Tokenizer tk;
    load_tokenizer(dir, &cfg, &tk);
    StTensor *srcs;
    int n_srcs;
    st_load_dir(dir, &srcs, &n_srcs);
    Plan plan;
    build_plan(&cfg, srcs, n_srcs, &plan, &cfg.n_mtp);
    if (cfg.n_mtp == 0)
        fprintf(stderr, "mtp-convert: warning: the checkpoint has no mtp.* tensors; the model will run without MTP\n");
    else if (cfg.n_mtp_config >= 0 && cfg.n_mtp_config != cfg.n_mtp)
        die("config.json says mtp_num_hidden_layers = %d but the checkpoint has %d MTP layers", cfg.n_mtp_config, cfg.n_mtp);
    choose_types(&plan, &cfg, (Mix)mix, mixes[mtp_mix].base);

    FILE *f = open_temp(out_path);
    Writer w = { f, 0, 0 };
    write_header(&w, &cfg, &plan, &tk, dir, mixes[mix].file_type, cfg.n_mtp);
    write_tensors(&w, &cfg, &plan, threads, verbose);
    commit_output(f, out_path);
    if (verbose)
        fprintf(stderr, "mtp-convert: wrote %s (%s, %d tensors, %d MTP layer%s)\n", out_path, mixes[mix].name,
                plan.n, cfg.n_mtp, cfg.n_mtp == 1 ? "" : "s");
    plan_free(&plan);
    st_free(srcs, n_srcs);
    tokenizer_free(&tk);
    config_free(&cfg);
    return 0;
}
#endif
