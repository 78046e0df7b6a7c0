/* Fuzz target: loading the tokenizer from GGUF metadata (vocab_load, tok_init: tokens, types,
 * merges, pre-tokenizer, specials), then encoding and decoding a fixed text with whatever
 * vocabulary came out of it.  The input is a GGUF image; the seeds are cut-down vocabularies. */
#include "fuzz_mtp.h"

typedef struct { Gguf gguf; Vocab v; } Job;

static void load(void *ctx) {
    Job *j = ctx;
    vocab_load(&j->v, &j->gguf);
}

/* letters, digits, spaces and newlines, a decomposed accent, invalid UTF-8, specials */
static const char sample[] = "Hello <|im_start|>world<think> 1234 e\xcc\x81\xcc\xa3 \xff\xe2\x82 \xf0\x9f\x98\x80\n\n  it's\r\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static Job j;
    char err[256];
    memset(&j, 0, sizeof j);
    if (gguf_parse(&j.gguf, data, size, err, sizeof err) == 0 && catch_die(load, &j) == 0) {
        for (int parse_special = 0; parse_special < 2; parse_special++) {
            char *raw, *text;
            size_t n_raw, n_text;
            encode_decode(&j.v.tok, sample, sizeof sample - 1, parse_special, &raw, &n_raw, &text, &n_text);
            free(raw);
            free(text);
        }
        vocab_free(&j.v);
    }
    gguf_free(&j.gguf);
    return 0;
}
