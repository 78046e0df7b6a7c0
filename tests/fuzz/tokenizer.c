/* Fuzz target: the tokenizer (tok_encode, tok_stream) on arbitrary bytes with the real Qwen3
 * vocabulary (tests/fixtures/tokenizer/qwen3-vocab.gguf, or $MTP_FUZZ_VOCAB).  The first input
 * byte's bit 0 says whether control tokens are parsed; the text is the rest.  (Texts of 64 KB and
 * more, where a piece cache comes in, would slow the fuzzer a hundredfold: tests/test_robust.py
 * checks those.)  Checked besides memory safety and encode_decode's checks:
 *   - without NFC the ids' bytes are exactly the input: nothing lost, doubled or reordered;
 *   - with NFC, encoding those bytes again gives the same bytes (normalising is idempotent);
 *   - when those bytes are valid UTF-8, the streamed text is exactly them. */
#include "fuzz_mtp.h"

static Model model;
static Vocab vocab;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    const char *path = getenv("MTP_FUZZ_VOCAB");
    model_open(&model, path ? path : "tests/fixtures/tokenizer/qwen3-vocab.gguf");
    vocab_load(&vocab, &model.gguf);
    return 0;
}

static int same(const char *a, size_t na, const char *b, size_t nb) { return na == nb && !memcmp(a, b, na); }

static void check_plain(const char *s, size_t n, int parse_special) {
    Tokenizer plain = vocab.tok;
    plain.nfc = 0;
    char *raw, *text;
    size_t n_raw, n_text;
    encode_decode(&plain, s, n, parse_special, &raw, &n_raw, &text, &n_text);
    expect(same(raw, n_raw, s, n), "without NFC the ids do not spell the input");
    free(raw);
    free(text);
}

static void check_nfc(const char *s, size_t n, int parse_special) {
    char *raw, *text, *raw2, *text2;
    size_t n_raw, n_text, n_raw2, n_text2;
    encode_decode(&vocab.tok, s, n, parse_special, &raw, &n_raw, &text, &n_text);
    encode_decode(&vocab.tok, raw, n_raw, parse_special, &raw2, &n_raw2, &text2, &n_text2);
    expect(same(raw, n_raw, raw2, n_raw2), "NFC is not idempotent");
    expect(!valid_utf8((const unsigned char *)raw, n_raw) || same(raw, n_raw, text, n_text),
           "streamed text differs from the ids' bytes");
    free(raw);
    free(text);
    free(raw2);
    free(text2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    check_plain((const char *)data + 1, size - 1, data[0] & 1);
    check_nfc((const char *)data + 1, size - 1, data[0] & 1);
    return 0;
}
