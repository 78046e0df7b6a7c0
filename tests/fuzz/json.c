/* Fuzz target: the converter's JSON parser (json_parse), which reads config.json, tokenizer.json
 * and the safetensors index.  The input is the text.  A rejected text must come with a message. */
#define MTP_NO_MAIN
#include "../../tools/convert.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Json v;
    char err[128];
    if (json_parse((const char *)data, size, &v, err, sizeof err) == 0) {
        json_get(&v, "architectures");
        json_free(&v);
    } else if (!err[0]) {
        abort();
    }
    return 0;
}
