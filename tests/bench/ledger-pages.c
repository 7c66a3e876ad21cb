/* ledger-pages: the ledger's own cost of a GetHistory page, outside the daemon (docs/performance.md,
 * "A clinic's ledger"): pages of LIMIT sessions back through all sessions and through one pen's,
 * on a read-only connection (nd_ledger_open_reader, as the daemon's reader thread), each timed in
 * wall-clock and in this thread's CPU time, so that the figures can be told apart from the
 * machine's load.
 *
 *   ledger-pages DB_PATH PEN [PAGES [LIMIT]]
 *
 * Prints one line per filter: pages, median / p99 / max of wall and CPU ms. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ledger.h"
#include "util.h"

static double now_ms(clockid_t clock) {
        struct timespec ts;
        clock_gettime(clock, &ts);
        return (double) ts.tv_sec * 1e3 + (double) ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;
        return (x > y) - (x < y);
}

static double pct(double *v, size_t n, double p) {
        qsort(v, n, sizeof *v, cmp_double);
        size_t i = (size_t) (p / 100.0 * (double) (n - 1) + 0.5);
        return v[MIN(i, n - 1)];
}

static int run(nd_ledger *l, const char *pen, unsigned pages, unsigned limit) {
        double *wall = calloc(pages, sizeof *wall), *cpu = calloc(pages, sizeof *cpu);
        uint64_t before = 0;
        unsigned n = 0;
        if (!wall || !cpu)
                return -1;
        /* A few pages first: the connection's statements and the first pages of the file. */
        for (unsigned i = 0; i < pages + 3; i++) {
                nd_ledger_history_filter f = { .pen_serial = pen, .before_us = before, .limit = limit };
                nd_ledger_session *a = NULL;
                size_t got = 0;
                double w0 = now_ms(CLOCK_MONOTONIC), c0 = now_ms(CLOCK_THREAD_CPUTIME_ID);
                int r = nd_ledger_history_query(l, &f, &a, &got);
                double c1 = now_ms(CLOCK_THREAD_CPUTIME_ID), w1 = now_ms(CLOCK_MONOTONIC);
                if (r < 0) {
                        fprintf(stderr, "ledger-pages: %s\n", nd_ledger_last_error(l));
                        return -1;
                }
                before = got ? a[got - 1].start_us : 0;
                nd_ledger_session_array_free(a, got);
                if (i >= 3) {
                        wall[n] = w1 - w0;
                        cpu[n] = c1 - c0;
                        n++;
                }
                if (got < limit)
                        break;
        }
        if (n == 0)
                return -1;
        double w50 = pct(wall, n, 50), w99 = pct(wall, n, 99), wmax = wall[n - 1];
        double c50 = pct(cpu, n, 50), c99 = pct(cpu, n, 99), cmax = cpu[n - 1];
        printf("%s: %u pages of %u: wall median %.2f p99 %.2f max %.2f ms; cpu median %.2f p99 %.2f max %.2f ms\n",
               pen ? pen : "all", n, limit, w50, w99, wmax, c50, c99, cmax);
        free(wall);
        free(cpu);
        return 0;
}

int main(int argc, char **argv) {
        _cleanup_(nd_ledger_closep) nd_ledger *l = NULL;
        _cleanup_free_ char *error = NULL;
        if (argc < 3 || argc > 5) {
                fprintf(stderr, "usage: ledger-pages DB_PATH PEN [PAGES [LIMIT]]\n");
                return 2;
        }
        unsigned pages = argc > 3 ? (unsigned) strtoul(argv[3], NULL, 10) : 100;
        unsigned limit = argc > 4 ? (unsigned) strtoul(argv[4], NULL, 10) : 100;
        if (pages == 0 || limit == 0) {
                fprintf(stderr, "ledger-pages: PAGES and LIMIT must be positive\n");
                return 2;
        }
        if (nd_ledger_open_reader(argv[1], &l, &error) < 0) {
                fprintf(stderr, "ledger-pages: %s\n", strempty(error));
                return 1;
        }
        if (run(l, NULL, pages, limit) < 0 || run(l, argv[2], pages, limit) < 0)
                return 1;
        return 0;
}
