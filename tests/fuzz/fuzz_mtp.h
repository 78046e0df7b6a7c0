/* fuzz_mtp.h - what the libFuzzer harnesses of mtp.c share.
 *
 * The harness includes mtp.c itself (without its main) so the static functions are in scope,
 * built with MTP_FUZZ so that die() returns through die_jump instead of exiting: the loader
 * and the argument parser report bad input with die(), and a fuzzer must go on to the next
 * input.  Everything those functions allocate before they die is reachable from the structs the
 * harness passes in, so it frees that afterwards and LeakSanitizer stays on. */
#define MTP_NO_MAIN
#define MTP_FUZZ
#include "../../mtp.c"

/* Run fn(ctx) with die() coming back here: 0 if fn returned, -1 if it died. */
static int catch_die(void (*fn)(void *), void *ctx) {
    jmp_buf jb;
    if (setjmp(jb)) {
        die_jump = NULL;
        return -1;
    }
    die_jump = &jb;
    fn(ctx);
    die_jump = NULL;
    return 0;
}

/* A property the harness checks: a failure is a finding like a sanitizer's. */
static void expect(int ok, const char *what) {
    if (ok) return;
    fprintf(stderr, "fuzz: check failed: %s\n", what);
    abort();
}

static int valid_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0, need; i < n; i += need)
        if (utf8_prefix(s + i, n - i, &need) != need || !need) return 0;
    return 1;
}

/* Tokenise s[0..n) and stream the ids back out, checking what holds for any vocabulary: the ids
 * are in range, tok_stream never needs more room than its contract names, and what it writes is
 * valid UTF-8.  Returns the ids' bytes as the vocabulary spells them (*raw, malloc'd) and the
 * streamed text (*text, malloc'd). */
static void encode_decode(const Tokenizer *t, const char *s, size_t n, int parse_special,
                          char **raw, size_t *n_raw, char **text, size_t *n_text) {
    int32_t *ids;
    int n_ids;
    expect(tok_encode(t, s, n, parse_special, &ids, &n_ids) == 0, "tok_encode failed");
    int cap = 3 * (t->max_piece + 3);
    size_t total = 0;
    for (int i = 0; i < n_ids; i++) {
        expect(ids[i] >= 0 && ids[i] < t->n_vocab, "id out of range");
        total += t->bytes_at[ids[i] + 1] - t->bytes_at[ids[i]];
    }
    *raw = xmalloc(total);
    *text = xmalloc(3 * total + cap + 3);   /* at most one U+FFFD per byte; room for cap at every call */
    *n_raw = *n_text = 0;
    TokStream st = {0};
    for (int i = 0; i < n_ids; i++) {
        uint32_t at = t->bytes_at[ids[i]], len = t->bytes_at[ids[i] + 1] - at;
        memcpy(*raw + *n_raw, t->bytes + at, len);
        *n_raw += len;
        int got = tok_stream(t, &st, ids[i], *text + *n_text, cap);
        expect(got >= 0, "tok_stream ran out of room");
        *n_text += (size_t)got;
    }
    *n_text += (size_t)tok_stream_flush(&st, *text + *n_text, 3);
    expect(valid_utf8((const unsigned char *)*text, *n_text), "streamed text is not valid UTF-8");
    free(ids);
}
