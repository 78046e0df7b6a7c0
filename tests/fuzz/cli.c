/* Fuzz target: the command-line parser (parse_args).  The input is the arguments after the
 * program name, separated by NUL bytes.  --help prints the usage and exits, as it should, so
 * inputs with it are skipped.  When parsing succeeds the options must be within their ranges. */
#include "fuzz_mtp.h"

enum { MAX_ARGS = 64 };

typedef struct { int argc; char **argv; Options o; } Job;

static void parse(void *ctx) {
    Job *j = ctx;
    parse_args(j->argc, j->argv, &j->o);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = xmalloc(size + 1), name[] = "mtp-gen";
    memcpy(buf, data, size);
    buf[size] = 0;
    char *argv[MAX_ARGS + 2] = {name};
    int argc = 1;
    for (char *p = buf; p <= buf + size && argc <= MAX_ARGS; p += strlen(p) + 1) {
        if (!strcmp(p, "-h") || !strcmp(p, "--help")) argc = 0;
        if (argc == 0) break;
        argv[argc++] = p;
    }
    Job j = {.argc = argc, .argv = argv};
    if (argc && catch_die(parse, &j) == 0) {
        const Options *o = &j.o;
        expect(o->model && !(o->prompt && o->prompt_file), "model or prompt options inconsistent");
        expect(o->n_predict >= -1 && o->n_ctx >= 0 && o->n_ctx <= 1 << 24, "-n or -c out of range");
        expect(o->n_threads >= 0 && o->n_threads <= 1024, "-t out of range");
        expect(o->spec.n_draft >= 0 && o->spec.n_draft <= MAX_DRAFT, "--draft out of range");
        expect(o->sampling.temp >= 0 && o->sampling.top_p >= 0 && o->sampling.top_p <= 1 &&
               o->sampling.min_p >= 0 && o->sampling.min_p <= 1 && o->sampling.rep_penalty > 0,
               "sampling options out of range");
    }
    free(buf);
    return 0;
}
