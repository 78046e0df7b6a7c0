/* test_units - tests of mtp.c's internals that the command line cannot reach.
 *
 * It includes mtp.c itself (without its main) so the static functions are
 * in scope.  Subcommands, each printing "N passed, N failed":
 *   spec-stats               the speculative acceptance rule is lossless
 *   margin                   adaptive depth reads the head's margin into the right bin
 *   rollback MODEL.gguf      verify-then-reject leaves exactly the state of plain decoding,
 *                            and oracle drafts (right, then wrong) give plain decoding's output
 *   draft-copy MODEL.gguf    the head's 4-bit draft copy is close to the head, smaller, and
 *                            leaves the main model's LM head as it was
 *   roundtrip VOCAB.gguf F   decode(encode(text)) == text for every NUL-separated text in F
 */
#define MTP_NO_MAIN
#include "../mtp.c"

static int n_pass, n_fail;

static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s: ", ok ? "ok" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    ok ? n_pass++ : n_fail++;
}

static int finish(void) {
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}

/* ==== spec-stats ====
 * Draw d ~ q, keep it or replace it by the rule, many times; the emitted
 * tokens must follow p.  Fixed seeds keep the test deterministic, and the
 * bounds (chi-square at p ~ 1e-4 for 7 degrees of freedom, total variation
 * 0.01 at 400k draws) would catch any bias of a percent. */

static void set_dist(Dist *d, const float *p, int n) {
    d->n = 0;
    float sum = 0;
    for (int i = 0; i < n; i++) sum += p[i];
    for (int i = 0; i < n; i++)
        if (p[i] > 0) {
            d->ids[d->n] = i;
            d->p[d->n++] = p[i] / sum;
        }
}

static void spec_case(const char *name, const float *p, const float *q, int V) {
    Sampler s;
    SamplerCfg cfg = {.temp = 1, .top_p = 1, .rep_penalty = 1, .rng = 12345};
    sampler_init(&s, &cfg, V);
    Dist dp, dq;
    dist_init(&dp, V);
    dist_init(&dq, V);
    set_dist(&dp, p, V);
    set_dist(&dq, q, V);
    const int N = 400000;
    long count[64] = {0}, kept = 0;
    for (int i = 0; i < N; i++) {
        int32_t d = dist_sample(&dq, &s.cfg.rng), out;
        if (spec_accept(&s, &dp, &dq, d, &out)) {
            out = d;
            kept++;
        }
        count[out]++;
    }
    double chi2 = 0, tv = 0, psum = 0, expected_keep = 0;
    for (int i = 0; i < V; i++) psum += p[i];
    for (int i = 0; i < V; i++) {
        double pi = p[i] / psum, e = pi * N;
        if (e > 0) chi2 += (count[i] - e) * (count[i] - e) / e;
        else if (count[i]) chi2 = INFINITY;
        tv += fabs(count[i] / (double)N - pi) / 2;
        expected_keep += fmin(pi, dist_prob(&dq, i));
    }
    check(chi2 < 35 && tv < 0.01, "%s: emitted tokens follow p (chi2 %.1f, TV %.4f over %d draws)", name, chi2, tv, N);
    check(fabs(kept / (double)N - expected_keep) < 0.01, "%s: acceptance rate %.4f = sum min(p,q) %.4f", name, kept / (double)N, expected_keep);
    dist_free(&dp);
    dist_free(&dq);
    sampler_free(&s);
}

static int cmd_spec_stats(void) {
    float p1[8] = {0.30f, 0.20f, 0.15f, 0.10f, 0.10f, 0.08f, 0.05f, 0.02f};
    float q1[8] = {0.05f, 0.10f, 0.40f, 0.05f, 0.20f, 0.10f, 0.05f, 0.05f};
    spec_case("overlapping supports", p1, q1, 8);
    float p2[8] = {0.5f, 0.3f, 0.2f, 0, 0, 0, 0, 0};     /* target truncated (top-k 3) */
    float q2[8] = {0.1f, 0.1f, 0, 0.4f, 0.4f, 0, 0, 0};  /* draft mass partly outside it */
    spec_case("disjoint-ish supports", p2, q2, 8);
    float p3[8] = {0, 0, 0, 1, 0, 0, 0, 0};              /* greedy target */
    spec_case("one-hot target", p3, q1, 8);
    return finish();
}

/* ==== rollback ====
 * Engine A decodes one token at a time; engine B verifies oracle drafts
 * (the right continuation with a wrong token planted at a varying depth).
 * After every B step, A catches up to the same position and the two states
 * must be bit-identical, and B's output must equal A's. */

typedef struct { int32_t toks[4096]; int n; } Collect;

static int collect(void *ud, int32_t t) {
    Collect *c = ud;
    if (c->n < 4096) c->toks[c->n++] = t;
    return 0;
}

/* A model file with its weights, as main loads it. */
static void model_load(Model *m, const char *path) {
    model_open(m, path);
    load_config(m);
    load_weights(m);
}

static const SamplerCfg GREEDY = {.temp = 0, .top_p = 1, .rep_penalty = 1, .rng = 1};

/* A fixed prompt of n token ids spread over the vocabulary. */
static void test_prompt(int32_t *prompt, int n, int n_vocab) {
    for (int i = 0; i < n; i++) prompt[i] = (i * 97 + 13) % n_vocab;
}

static void engine_open(Engine *e, Model *m, int n_ctx, int spec_max) {
    memset(e, 0, sizeof *e);
    e->model = m;
    pool_init(&e->pool, 2);
    state_init(&e->st, &m->cfg, n_ctx, spec_max);
    scratch_init(&e->s, &m->cfg, n_ctx, 2);
}

static void engine_close(Engine *e) {
    scratch_free(&e->s);
    state_free(&e->st);
    pool_free(&e->pool);
}

/* The first n_past positions of each head of a KV cache ([n_kv_head][n_ctx][head_dim]). */
static int caches_equal(const float *a, const float *b, const Config *c, int n_ctx, int n_past) {
    for (int h = 0; h < c->n_kv_head; h++)
        if (memcmp(a + (size_t)h * n_ctx * c->head_dim, b + (size_t)h * n_ctx * c->head_dim, (size_t)n_past * c->head_dim * sizeof(float)))
            return 0;
    return 1;
}

static int states_equal(const Engine *a, const Engine *b) {
    const Config *c = &a->model->cfg;
    if (a->st.n_past != b->st.n_past || a->st.n_ctx != b->st.n_ctx) return 0;
    for (int l = 0; l < c->n_layer; l++) {
        if (c->recurrent[l]) {
            if (memcmp(a->st.ssm[l], b->st.ssm[l], ssm_floats(c) * sizeof(float)) ||
                memcmp(conv_window(&a->st, c, l), conv_window(&b->st, c, l), conv_window_floats(c) * sizeof(float)))
                return 0;
        } else if (!caches_equal(a->st.k_cache[l], b->st.k_cache[l], c, a->st.n_ctx, a->st.n_past) ||
                   !caches_equal(a->st.v_cache[l], b->st.v_cache[l], c, a->st.n_ctx, a->st.n_past)) {
            return 0;
        }
    }
    return 1;
}

static int cmd_rollback(const char *path) {
    Model m;
    model_load(&m, path);
    const int K = 4, n_gen = 60, n_ctx = 256;
    uint8_t *eog = xcalloc(m.cfg.n_vocab, 1);
    SpecCfg spec = {.n_draft = K};
    Engine ea, eb;
    engine_open(&ea, &m, n_ctx, 1);
    engine_open(&eb, &m, n_ctx, K + 2);
    Sampler sa, sb;
    sampler_init(&sa, &GREEDY, m.cfg.n_vocab);
    sampler_init(&sb, &GREEDY, m.cfg.n_vocab);
    Gen ga, gb;
    gen_init(&ga, &ea, &sa, &spec, 0, eog);
    gen_init(&gb, &eb, &sb, &spec, 0, eog);
    int32_t prompt[12];
    test_prompt(prompt, 12, m.cfg.n_vocab);
    /* the plain continuation is the oracle */
    Collect plain = {0}, spec_out = {0}, scratch = {0};
    int done = 0;
    generate(&ga, prompt, 12, n_gen, NULL, collect, &plain);
    gen_free(&ga);
    state_free(&ea.st);
    state_init(&ea.st, &m.cfg, n_ctx, 1);
    gen_init(&ga, &ea, &sa, &spec, 0, eog);
    gen_feed(&ga, prompt, 12, NULL);
    gen_feed(&gb, prompt, 12, NULL);
    ga.toks[ga.n_toks++] = plain.toks[0];
    gb.toks[gb.n_toks++] = plain.toks[0];
    ga.st.n_gen = gb.st.n_gen = 1;
    int steps = 0, full = 0, rejects = 0, all_equal = 1;
    while (gb.st.n_gen < n_gen - K - 1 && !done) {
        int k = 1 + steps % K, wrong_at = steps % (K + 2);    /* wrong_at >= k: every draft right */
        for (int i = 0; i < k; i++) {
            int32_t right = plain.toks[gb.st.n_gen + i];
            int32_t d = i == wrong_at ? (right + 1) % m.cfg.n_vocab : right;
            gb.toks[gb.n_toks + i] = d;
            gb.q[i].n = 1;
            gb.q[i].ids[0] = d;
            gb.q[i].p[0] = 1;
        }
        int before = gb.st.n_gen;
        advance(&gb, k, n_gen, collect, &spec_out, &done);
        int emitted = gb.st.n_gen - before;
        if (emitted == k + 1) full++;
        else rejects++;
        while (ea.st.n_past < eb.st.n_past) advance(&ga, 0, n_gen, collect, &scratch, &done);
        all_equal &= states_equal(&ea, &eb);
        steps++;
    }
    check(all_equal, "state after verify-then-reject equals plain decoding, bit for bit (%d steps: %d full accepts, %d rejections)", steps, full, rejects);
    check(full > 3 && rejects > 3, "the run exercised both full accepts and rejections");
    int same = spec_out.n > 0 && memcmp(spec_out.toks, plain.toks + 1, spec_out.n * sizeof(int32_t)) == 0;
    check(same, "oracle speculation emits plain decoding's %d tokens", spec_out.n);
    gen_free(&ga);
    gen_free(&gb);
    sampler_free(&sa);
    sampler_free(&sb);
    engine_close(&ea);
    engine_close(&eb);
    free(eog);
    model_free(&m);
    return finish();
}

/* ==== chain ====
 * A chained draft starts from the head's output at the position before it.
 * After a step the head catches up on several accepted rows in one batch;
 * the chain must continue from that batch's last row.  The same drafts,
 * with the catch-up fed one row per call, are the oracle: per-row results
 * do not depend on the batch, so the two must agree bit for bit. */

static int cmd_chain(const char *path) {
    Model m;
    model_load(&m, path);
    const int K = 3, n_prompt = 12, n_ctx = 64;
    uint8_t *eog = xcalloc(m.cfg.n_vocab, 1);
    SpecCfg spec = {.n_draft = K, .draft_vocab = m.cfg.n_vocab};
    Engine e[2];
    Sampler smp[2];
    Gen g[2];
    int32_t prompt[12], drafts[2][3];
    test_prompt(prompt, n_prompt, m.cfg.n_vocab);
    float *logits[2];
    int n_drafts[2];
    for (int v = 0; v < 2; v++) {
        engine_open(&e[v], &m, n_ctx, 1);
        sampler_init(&smp[v], &GREEDY, m.cfg.n_vocab);
        gen_init(&g[v], &e[v], &smp[v], &spec, 1, eog);
        gen_feed(&g[v], prompt, n_prompt, NULL);
        int32_t next = (int32_t)kn_argmax(e[v].s.logits, m.cfg.n_vocab);
        mtp_push(&g[v], g[v].h_last, next);
        g[v].toks[g[v].n_toks++] = next;
        if (v == 1)         /* the oracle: every pending row but the last, one per call */
            while (g[v].n_pend > 1) mtp_catch_up(&g[v], 0, g[v].n_pend - 1);
        n_drafts[v] = draft(&g[v], K);
        memcpy(drafts[v], g[v].toks + g[v].n_toks, sizeof drafts[v]);
        logits[v] = e[v].s.logits;
    }
    check(n_drafts[0] == K && n_drafts[1] == K, "both drafted %d tokens (%d, %d)", K, n_drafts[0], n_drafts[1]);
    check(!memcmp(drafts[0], drafts[1], sizeof drafts[0]) && !memcmp(logits[0], logits[1], m.cfg.n_vocab * sizeof(float)),
          "chained drafts after a %d-row catch-up equal those after one row at a time, logits bit for bit", n_prompt);
    for (int v = 0; v < 2; v++) {
        gen_free(&g[v]);
        sampler_free(&smp[v]);
        engine_close(&e[v]);
    }
    free(eog);
    model_free(&m);
    return finish();
}

/* ==== draft-copy ====
 * Every matrix draft_copy_make replaces must come back as packed Q4_K rows
 * close to the originals: a range-fitted 4-bit code errs by at most a
 * step of range/15 and by ~range/52 rms on a sub-block of 32, so a relative
 * rms error over 0.12 of the weights' rms means a wrong scale or a wrong
 * nibble order, not rounding.  The main model's LM head, whose first rows
 * the drafts' copy comes from, must be left bit for bit as it was. */

static float *mat_floats(const Mat *w) {
    float *out = xmalloc((size_t)w->n_out * w->n_in * sizeof(float));
    for (int64_t i = 0; i < w->n_out; i++) kn_get_row(w->type, w->data, w->row_bytes, i, out + i * w->n_in, w->n_in);
    return out;
}

static int cmd_draft_copy(const char *path) {
    Model m;
    model_load(&m, path);
    if (!m.cfg.n_mtp) die("%s has no MTP head", path);
    MtpHead *head = &m.w.mtp;
    int draft_vocab = m.cfg.n_vocab / 2;
    Mat out_rows = mat_rows(&m.w.output, 0, draft_vocab);
    Mat *mats[DRAFT_MATS];
    int n = draft_mats(head, mats);
    float *before[DRAFT_MATS];
    int worth[DRAFT_MATS], n_worth = 0;
    size_t bytes_before = 0;
    for (int i = 0; i < n; i++) {
        const Mat *w = mats[i] == &head->draft_out ? &out_rows : mats[i];
        worth[i] = draft_copy_worth(w);
        n_worth += worth[i];
        before[i] = mat_floats(w);
        if (worth[i]) bytes_before += (size_t)w->n_out * w->row_bytes;
    }
    float *output_before = mat_floats(&m.w.output);
    Engine e;
    engine_open(&e, &m, 64, 2);
    size_t bytes = draft_copy_make(&e, draft_vocab);
    check(n_worth > 0 && bytes > 0 && bytes < bytes_before, "%d of the head's %d matrices copied: %zu bytes for %zu", n_worth, n, bytes, bytes_before);
    check(head->draft_out.n_out == draft_vocab, "drafts score the first %d tokens (%lld rows)", draft_vocab, (long long)head->draft_out.n_out);
    for (int i = 0; i < n; i++) {
        const Mat *w = mats[i];
        float *after = mat_floats(w);
        double err = 0, ref = 0;
        for (int64_t k = 0; k < w->n_out * w->n_in; k++) {
            err += (double)(after[k] - before[i][k]) * (after[k] - before[i][k]);
            ref += (double)before[i][k] * before[i][k];
        }
        double rel = sqrt(err / (ref > 0 ? ref : 1));
        if (worth[i])
            check(w->type == kn_pack_type(KN_Q4_K) && rel > 0 && rel < 0.12, "matrix %d (%lldx%lld): Q4_K copy, relative rms error %.4f",
                  i, (long long)w->n_out, (long long)w->n_in, rel);
        else
            check(rel == 0, "matrix %d (%lldx%lld): not worth a copy, left as it was", i, (long long)w->n_out, (long long)w->n_in);
        free(after);
        free(before[i]);
    }
    float *output_after = mat_floats(&m.w.output);
    check(!memcmp(output_before, output_after, (size_t)m.w.output.n_out * m.w.output.n_in * sizeof(float)),
          "the main model's LM head is unchanged");
    free(output_before);
    free(output_after);
    engine_close(&e);
    model_free(&m);
    return finish();
}

/* ==== roundtrip ==== */

static int cmd_roundtrip(const char *vocab_path, const char *cases_path) {
    Model m;
    model_open(&m, vocab_path);
    Vocab v;
    vocab_load(&v, &m.gguf);
    size_t len;
    char *all = read_all(cases_path, &len);
    int n_cases = 0, n_ok = 0;
    for (size_t at = 0; at < len;) {
        size_t n = strlen(all + at);
        int32_t *ids;
        int n_ids;
        if (tok_encode(&v.tok, all + at, n, 0, &ids, &n_ids)) die("out of memory");
        char *text = xmalloc((size_t)n_ids * 512 + 64);
        size_t got = 0;
        TokStream ts = {0};
        for (int i = 0; i < n_ids; i++) got += (size_t)tok_stream(&v.tok, &ts, ids[i], text + got, 512);
        got += (size_t)tok_stream_flush(&ts, text + got, 64);
        int ok = got == n && memcmp(text, all + at, n) == 0;
        if (!ok) printf("FAIL: round trip of case %d (%zu bytes -> %zu)\n", n_cases, n, got);
        n_ok += ok;
        n_cases++;
        free(ids);
        free(text);
        at += n + 1;
    }
    check(n_ok == n_cases && n_cases > 0, "decode(encode(x)) == x for %d/%d texts", n_ok, n_cases);
    free(all);
    vocab_free(&v);
    model_free(&m);
    return finish();
}

/* ==== margin ====
 * The bin is twice the top logit's lead over the runner-up, wherever the two
 * sit, with the last bin open-ended. */

static void margin_case(const float *lg, int n, int want, const char *what) {
    int got = margin_bin(lg, n);
    check(got == want, "margin bin %d (want %d): %s", got, want, what);
}

static int cmd_margin(void) {
    margin_case((const float[]){0, 0.2f, 5.0f, 4.9f}, 4, 0, "lead 0.1, runner-up after the top");
    margin_case((const float[]){2, 2, 1}, 3, 0, "a tie");
    margin_case((const float[]){1, 3.3f, 0}, 3, 4, "lead 2.3");
    margin_case((const float[]){-1, 0.25f, -0.25f}, 3, 1, "lead 0.5, negative logits");
    margin_case((const float[]){10, 0, 0, 6.4f}, 4, 7, "lead 3.6: the open-ended last bin");
    margin_case((const float[]){30, -30}, 2, MARGIN_BINS - 1, "lead 60");
    margin_case((const float[]){1}, 1, MARGIN_BINS - 1, "one token: no rival");
    return finish();
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "spec-stats")) return cmd_spec_stats();
    if (argc >= 2 && !strcmp(argv[1], "margin")) return cmd_margin();
    if (argc >= 3 && !strcmp(argv[1], "rollback")) return cmd_rollback(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "chain")) return cmd_chain(argv[2]);
    if (argc >= 3 && !strcmp(argv[1], "draft-copy")) return cmd_draft_copy(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "roundtrip")) return cmd_roundtrip(argv[2], argv[3]);
    fprintf(stderr, "usage: test_units spec-stats | margin | rollback MODEL | chain MODEL | draft-copy MODEL | roundtrip VOCAB CASES\n");
    return 2;
}
