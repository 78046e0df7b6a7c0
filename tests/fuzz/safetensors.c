/* Fuzz target: the converter's safetensors header reader (st_parse_header).  The input is what
 * st_open hands it: the data section's length (8 bytes, little-endian), then the JSON header.
 * Every tensor it accepts must lie inside the data section and fill its byte range exactly. */
#define MTP_NO_MAIN
#include "../../tools/convert.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 8) return 0;
    uint64_t data_len = 0;
    for (int i = 7; i >= 0; i--) data_len = data_len << 8 | data[i];
    StTensor *ts;
    int n;
    char err[256];
    if (st_parse_header((const char *)data + 8, size - 8, data_len, &ts, &n, err, sizeof err) < 0) return 0;
    for (int i = 0; i < n; i++) {
        uint64_t numel = 1;
        for (int d = 0; d < ts[i].n_dims; d++) numel *= (uint64_t)ts[i].shape[d];
        if (ts[i].begin > ts[i].end || ts[i].end > data_len || ts[i].end - ts[i].begin != numel * st_dtype_size(ts[i].dtype))
            abort();
        free(ts[i].name);
    }
    free(ts);
    return 0;
}
