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

/* Is s[0..n) already NFC? A sufficient test: all its characters are stable. */
static int nfc_is_stable(const Tokenizer *t, const unsigned char *s, size_t n) {
    for (size_t i = 0, len; i < n; i += len) {
        if (s[i] < 0x80) { len = 1; continue; }
        if (!(char_info(t, utf8_decode(s + i, n - i, &len)) & CH_NFC_STABLE)) return 0;
    }
    return 1;
}

static int nfc_normalize(const Tokenizer *t, TokWork *w, const unsigned char *s, size_t n) {
    w->n_norm = 0;
    w->n_seq = 0;
    for (size_t i = 0, len; i < n; i += len) {
        uint32_t cp = utf8_decode(s + i, n - i, &len);
        if ((char_info(t, cp) & CH_NFC_STABLE) && flush_run(w)) return -1;
        if (decompose(w, cp)) return -1;
    }
    return flush_run(w);
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
    if (c0.kind == CH_LETTER) return run_end(t, s, n, pos, CH_LETTER);
    if ((c0.kind == CH_OTHER || c0.kind == CH_SPACE) && c1.kind == CH_LETTER)
        return run_end(t, s, n, pos + c0.len, CH_LETTER);
    if (c0.kind == CH_NUMBER) return pos + c0.len;
    if (c0.kind == CH_OTHER || (c0.cp == ' ' && c1.kind == CH_OTHER))
        return run_end(t, s, n, run_end(t, s, n, pos + (c0.kind != CH_OTHER), CH_OTHER), CH_NEWLINE);

    /* whitespace: find the run's end, its last character and where its last \r or \n ends */
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
    if (sym_reserve(w, n)) return -1;
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
        snprintf(err, errlen, "out of memory for a vocabulary of %d tokens", t->n_vocab);
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
        t->bytes_at[id] = n;
        for (size_t i = 0, cl; i < len; i += cl) {
            uint32_t cp = utf8_decode(s + i, len - i, &cl);
            if (!is_special(t, id) && cp < 324 && cp_byte[cp] >= 0) t->bytes[n++] = (char)cp_byte[cp];
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
        const char *space = memchr(m->s, ' ', m->n);
        size_t n_left = space ? (size_t)(space - m->s) : 0, n_right = space ? m->n - n_left - 1 : 0;
        int32_t left = space ? vocab_find(t, m->s, n_left) : -1;
        int32_t right = space ? vocab_find(t, space + 1, n_right) : -1;
        memcpy(joined, m->s, n_left);
        memcpy(joined + n_left, m->s + n_left + 1, n_right);
        int32_t merged = space ? vocab_find(t, joined, n_left + n_right) : -1;
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
    for (int32_t id = 0; id < t->n_vocab; id++) n += is_special(t, id);
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

/* Tokens of type 3 (control) and 4 (user-defined) are the special tokens cut out of the text whole.
 * With types NULL every token is an ordinary one. pre names the split regex: "qwen2" or "qwen35". */
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
    if (t->nfc && !nfc_is_stable(t, s, n)) {
        if (nfc_normalize(t, w, s, n)) return -1;
        s = (const unsigned char *)w->norm;
        n = w->n_norm;
    }
    for (size_t pos = 0, end; pos < n; pos = end) {
        end = piece_end(t, s, n, pos);
        if (bpe_piece(t, w, s + pos, end - pos)) return -1;
    }
    return 0;
}

/* Tokenise text[0..len). *ids is malloc'd (NULL when *n_ids is 0); -1 when out of memory or past
 * INT_MAX tokens, with nothing to free. */
static int tok_encode(const Tokenizer *t, const char *text, size_t len, int parse_special,
                      int32_t **ids, int *n_ids) {
    TokWork w = {0};
    const unsigned char *s = (const unsigned char *)text;
    int rc = 0;
    for (size_t pos = 0, at, special_len; pos < len && rc == 0; pos += at + special_len) {
        int32_t special = -1;
        at = find_special(t, s + pos, len - pos, parse_special, &special, &special_len);
        rc = encode_plain(t, &w, s + pos, at);
        if (rc == 0 && special >= 0) rc = ids_push(&w, special);
    }
    work_free(&w);
    if (rc || w.n_ids > 0x7FFFFFFF) {
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

/* The bytes token id stands for (special tokens as their text). Copies at most cap bytes to buf and
 * returns the full length, like snprintf; 0 for an id outside the vocabulary. */
static int tok_piece(const Tokenizer *t, int32_t id, char *buf, int cap) {
    if (id < 0 || id >= t->n_vocab) return 0;
    int len = (int)(t->bytes_at[id + 1] - t->bytes_at[id]);
    if (cap > 0) memcpy(buf, t->bytes + t->bytes_at[id], (size_t)(len < cap ? len : cap));
    return len;
}

/* Streaming detokenisation. A token can end inside a UTF-8 character (CJK and emoji are often split
 * over byte tokens), so the trailing bytes of a character that is not finished yet are held back in
 * the stream until the next token completes it. Bytes that cannot be (part of) valid UTF-8 come out as
 * U+FFFD, one per maximal ill-formed subsequence as in Unicode's recommended practice (what HF's
 * lossy decode prints too). Start with TokStream st = {0}. */
typedef struct { char pending[8]; int n_pending; } TokStream;

typedef struct { char *out; int cap, n; } TokSink;

static int sink_put(TokSink *k, const void *bytes, size_t n) {
    if ((size_t)(k->cap - k->n) < n) return -1;
    memcpy(k->out + k->n, bytes, n);
    k->n += (int)n;
    return 0;
}

/* Emit the complete characters of s[0..n), return how many trailing bytes form an unfinished one. */
static int stream_bytes(TokSink *k, const unsigned char *s, size_t n, size_t *held) {
    size_t i = 0;
    while (i < n) {
        size_t need, valid = utf8_prefix(s + i, n - i, &need);
        if (need && valid == n - i && valid < need) break;
        if (need && valid == need) {
            if (sink_put(k, s + i, need)) return -1;
            i += need;
        } else {
            if (sink_put(k, "\xEF\xBF\xBD", 3)) return -1;
            i += valid ? valid : 1;
        }
    }
    *held = n - i;
    return 0;
}

/* Append token id's bytes to the stream and write what is complete to out; returns the bytes written,
 * or -1 (stream unchanged) if cap is too small: 3 * (t->max_piece + 3) always suffices. */
static int tok_stream(const Tokenizer *t, TokStream *st, int32_t id, char *out, int cap) {
    if (id < 0 || id >= t->n_vocab) return 0;
    const unsigned char *piece = (const unsigned char *)t->bytes + t->bytes_at[id];
    size_t n = t->bytes_at[id + 1] - t->bytes_at[id], used = 0, held;
    TokSink k = {out, cap, 0};
    TokStream next = *st;
    /* finish the held-back character a byte at a time: it needs at most 3 more */
    while (next.n_pending > 0 && used < n) {
        next.pending[next.n_pending++] = (char)piece[used++];
        if (stream_bytes(&k, (const unsigned char *)next.pending, (size_t)next.n_pending, &held)) return -1;
        if (held == (size_t)next.n_pending) continue;
        if (held) used--;   /* the byte that broke the character starts afresh below */
        next.n_pending = 0;
    }
    if (next.n_pending == 0) {
        if (stream_bytes(&k, piece + used, n - used, &held)) return -1;
        memcpy(next.pending, piece + n - held, held);
        next.n_pending = (int)held;
    }
    *st = next;
    return k.n;
}

/* At the end of generation: a character left unfinished becomes one U+FFFD. Returns bytes written. */
static int tok_stream_flush(TokStream *st, char *out, int cap) {
    if (st->n_pending == 0) return 0;
    if (cap < 3) return -1;
    memcpy(out, "\xEF\xBF\xBD", 3);
    st->n_pending = 0;
    return 3;
}
