/* bandwidth - how fast this machine streams memory into the cores.
 *
 * Decoding is bound by reading every weight once per token, so the useful
 * ceiling for tok/s is (read bandwidth) / (bytes of weights per token).  This
 * measures that read bandwidth the way decode uses it: N threads each summing
 * its own slice of a buffer much larger than the caches, best of several
 * passes.  Usage: bandwidth [-t THREADS] [-m MEGABYTES]; prints GB/s.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    const uint64_t *data;   /* this thread's slice */
    size_t n;               /* words in it */
    uint64_t sum;           /* kept so the reads cannot be optimised away */
} Slice;

static void *read_slice(void *arg) {
    Slice *s = arg;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i + 4 <= s->n; i += 4) {
        a += s->data[i];
        b ^= s->data[i + 1];
        c += s->data[i + 2];
        d ^= s->data[i + 3];
    }
    s->sum = a + b + c + d;
    return NULL;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    int threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    size_t mb = 1024;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-t")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-m")) mb = (size_t)atol(argv[i + 1]);
    }
    if (threads < 1 || threads > 256 || mb < 64) {
        fprintf(stderr, "usage: bandwidth [-t THREADS (1..256)] [-m MEGABYTES (>= 64)]\n");
        return 1;
    }
    size_t words = mb * 1024 * 1024 / 8;
    uint64_t *buf = malloc(words * 8);
    if (!buf) {
        fprintf(stderr, "bandwidth: cannot allocate %zu MB\n", mb);
        return 1;
    }
    for (size_t i = 0; i < words; i++) buf[i] = i * 0x9E3779B97F4A7C15ULL;
    pthread_t tid[256];
    Slice sl[256];
    double best = 0;
    uint64_t check = 0;
    for (int pass = 0; pass < 8; pass++) {
        double t0 = now_s();
        for (int t = 0; t < threads; t++) {
            sl[t] = (Slice){buf + words / threads * t, words / threads, 0};
            pthread_create(&tid[t], NULL, read_slice, &sl[t]);
        }
        for (int t = 0; t < threads; t++) {
            pthread_join(tid[t], NULL);
            check += sl[t].sum;
        }
        double gbs = words * 8.0 / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("%.2f GB/s read, %d threads, %zu MB buffer (checksum %llx)\n", best, threads, mb, (unsigned long long)(check & 0xff));
    free(buf);
    return 0;
}
