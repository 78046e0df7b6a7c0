/* Fuzz target: the GGUF parser and the model loader (gguf_parse, load_config, load_weights).
 *
 * The input is a GGUF image.  It is parsed as it is, so truncation at every byte is tried, and
 * then again followed by 16 MB of 0xFF bytes that stand for the tensor data: an input holding only
 * a model's header (the seeds are the fixtures' headers) then gets through the parser into
 * load_config and load_weights, which check every count, shape and type against each other.
 * (0xFF, not zeros: a header that runs on into the padding reads huge lengths there and stops,
 * where zeros would make millions of valid empty entries and slow the fuzzer to a crawl.) */
#include "fuzz_mtp.h"

enum { MAX_INPUT = 1 << 20, PAD = 16 << 20 };
static uint8_t *image;   /* all 0xFF, but for the input while it runs */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    image = xmalloc(MAX_INPUT + PAD);
    memset(image, 0xFF, MAX_INPUT + PAD);
    return 0;
}

static void load(void *ctx) {
    load_config(ctx);
    load_weights(ctx);
}

static void parse_and_load(const uint8_t *base, size_t size) {
    static Model m;   /* static for its size: it holds every layer */
    char err[256];
    memset(&m, 0, sizeof m);
    if (gguf_parse(&m.gguf, base, size, err, sizeof err) == 0) catch_die(load, &m);
    else if (!err[0]) abort();   /* every failure names its cause */
    for (int i = 0; i < m.n_owned; i++) free(m.owned[i]);
    free(m.owned);
    gguf_free(&m.gguf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > MAX_INPUT) return 0;
    parse_and_load(data, size);
    memcpy(image, data, size);
    parse_and_load(image, size + PAD);
    memset(image, 0xFF, size);
    return 0;
}
