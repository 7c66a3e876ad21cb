/* make-ledger: writes a test ledger of N treatment sessions through the ledger API, the way the
 * daemon writes them (a clinic's years of records), for the ledger benchmarks and tests.
 *
 *   make-ledger [--pens K] [--seed S] [--per-day D] [--profiles DIR] STATE_DIR N
 *
 * Every session: LoadProfile, Start, session-begin, two SetDepth, Stop, session-end (7 audit
 * entries), a fresh single-use cartridge, one of the shipped profiles (its YAML as snapshot), D
 * sessions a day (20: about 13.7 years for 100,000) on K pens (3) in clinic hours, ending in the
 * past. Deterministic for a seed except the random session ids. Not synced while it writes
 * (nd_ledger_set_bulk_load); the file is checkpointed and closed at the end. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "digest.h"
#include "ledger.h"
#include "util.h"

#define PENS_DEFAULT 3u
#define PER_DAY_DEFAULT 20u
#define PROFILES_MAX 32
#define PROFILE_BYTES_MAX (64 * 1024)
#define DAY_US (86400 * USEC_PER_SEC)
#define CLINIC_OPENS_S (8 * 3600)
#define CLINIC_HOURS_S (10 * 3600)
#define NEEDLES_DEFAULT 12u
#define LIMITS_TEXT "limits: version 1 (make-ledger)"
#define PROGRESS_EVERY 10000u

typedef struct profile {
        char name[128];
        char *yaml;
        char digest[ND_SHA256_HEX_SIZE];
        double depth_mm;
        double duration_s;
} profile;

static inline void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

/* xorshift64*: reproducible figures for a seed. */
static uint64_t rng_state = UINT64_C(0x9e3779b97f4a7c15);
static uint64_t rng_next(void) {
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        return rng_state * UINT64_C(2685821657736338717);
}
static double rng_unit(void) {
        return (double) (rng_next() >> 11) / (double) (UINT64_C(1) << 53);
}

static double yaml_number(const char *yaml, const char *key, double fallback) {
        const char *p = strstr(yaml, key);
        if (!p)
                return fallback;
        p += strlen(key);
        while (*p == ':' || *p == ' ')
                p++;
        char *end;
        double v = strtod(p, &end);
        return end == p ? fallback : v;
}

static int profile_load(const char *dir, const char *file, profile *p) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, file);
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        if (!f)
                return -errno;
        p->yaml = calloc(1, PROFILE_BYTES_MAX + 1);
        if (!p->yaml)
                return -ENOMEM;
        size_t n = fread(p->yaml, 1, PROFILE_BYTES_MAX, f);
        nd_sha256_hex(p->yaml, n, p->digest);
        snprintf(p->name, sizeof p->name, "%.*s", (int) (strlen(file) - strlen(".yaml")), file);
        p->depth_mm = yaml_number(p->yaml, "depth_mm", 1.0);
        p->duration_s = yaml_number(p->yaml, "duration_s", 600);
        return 0;
}

static int profiles_load(const char *dir, profile *out, size_t *n) {
        _cleanup_(closedirp) DIR *d = opendir(dir);
        if (!d)
                return -errno;
        struct dirent *de;
        char *names[PROFILES_MAX];
        size_t k = 0;
        while ((de = readdir(d)) && k < PROFILES_MAX) {
                size_t len = strlen(de->d_name);
                if (len > 5 && STREQ(de->d_name + len - 5, ".yaml"))
                        names[k++] = strdup(de->d_name);
        }
        /* readdir's order differs between file systems: sort, for the same ledger everywhere. */
        qsort(names, k, sizeof names[0], (int (*)(const void *, const void *)) strcmp);
        *n = 0;
        for (size_t i = 0; i < k; i++) {
                if (names[i] && profile_load(dir, names[i], &out[*n]) >= 0)
                        (*n)++;
                free(names[i]);
        }
        return *n > 0 ? 0 : -ENOENT;
}

static int die(nd_ledger *l, const char *what) {
        fprintf(stderr, "make-ledger: %s: %s\n", what, nd_ledger_last_error(l));
        return EXIT_FAILURE;
}

static int audit(nd_ledger *l, uint64_t t_us, const char *actor, const char *action, const char *pen,
                 const char *detail) {
        return nd_ledger_audit(l, t_us, 1000, 4242, actor, action, pen, detail);
}

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "pens", required_argument, NULL, 'k' },
                { "seed", required_argument, NULL, 's' },
                { "per-day", required_argument, NULL, 'd' },
                { "profiles", required_argument, NULL, 'p' },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        unsigned pens = PENS_DEFAULT, per_day = PER_DAY_DEFAULT;
        const char *profiles_dir = MAKE_LEDGER_PROFILES_DIR;
        profile profiles[PROFILES_MAX] = { 0 };
        size_t n_profiles = 0;
        _cleanup_(nd_ledger_closep) nd_ledger *l = NULL;
        _cleanup_free_ char *error = NULL;
        int c;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0) {
                switch (c) {
                case 'k': pens = (unsigned) strtoul(optarg, NULL, 10); break;
                case 's': rng_state = strtoull(optarg, NULL, 0) | 1u; break;
                case 'd': per_day = (unsigned) strtoul(optarg, NULL, 10); break;
                case 'p': profiles_dir = optarg; break;
                case 'h':
                        printf("make-ledger [--pens K] [--seed S] [--per-day D] [--profiles DIR] STATE_DIR N\n");
                        return EXIT_SUCCESS;
                default:
                        return 2;
                }
        }
        if (argc - optind != 2 || pens == 0 || per_day == 0) {
                fprintf(stderr, "usage: make-ledger [--pens K] [--seed S] [--per-day D] [--profiles DIR] STATE_DIR N\n");
                return 2;
        }
        const char *state_dir = argv[optind];
        char *end;
        unsigned long long n = strtoull(argv[optind + 1], &end, 10);
        if (*end || n == 0) {
                fprintf(stderr, "make-ledger: N must be a positive number: %s\n", argv[optind + 1]);
                return 2;
        }
        if (profiles_load(profiles_dir, profiles, &n_profiles) < 0) {
                fprintf(stderr, "make-ledger: no profiles (*.yaml) in %s\n", profiles_dir);
                return EXIT_FAILURE;
        }
        int r = nd_ledger_open(state_dir, &l, &error);
        if (r < 0) {
                fprintf(stderr, "make-ledger: %s\n", strempty(error));
                return EXIT_FAILURE;
        }
        (void) nd_ledger_set_bulk_load(l, true);

        char limits_digest[ND_SHA256_HEX_SIZE];
        nd_sha256_hex(LIMITS_TEXT, strlen(LIMITS_TEXT), limits_digest);
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        uint64_t days = (n + per_day - 1) / per_day;
        /* Midnight (UTC) days + 1 ago: the last day's sessions end before now. */
        uint64_t day0_us = ((uint64_t) now.tv_sec / 86400 - days - 1) * DAY_US;
        uint64_t slot_us = (uint64_t) CLINIC_HOURS_S * USEC_PER_SEC / per_day;

        for (unsigned long long i = 0; i < n; i++) {
                const profile *p = &profiles[rng_next() % n_profiles];
                char serial[32], cart[32], actor[32], label[64], detail[256];
                char id[ND_LEDGER_SESSION_ID_SIZE];
                uint64_t day = i / per_day, slot = i % per_day;
                uint64_t start_us = day0_us + day * DAY_US + (uint64_t) CLINIC_OPENS_S * USEC_PER_SEC + slot * slot_us +
                                    rng_next() % (slot_us / 4);
                double duration_s = p->duration_s * (0.5 + 0.5 * rng_unit());
                uint64_t end_us = start_us + (uint64_t) (duration_s * 1e6);
                double speed_hz = 100 + 40 * rng_unit();

                snprintf(serial, sizeof serial, "NP-%04u", (unsigned) (i % pens) + 1);
                snprintf(cart, sizeof cart, "CART-%010llu", i + 1);
                snprintf(actor, sizeof actor, ":1.%llu", 100 + i % 5000);
                snprintf(label, sizeof label, "client %05" PRIu64, rng_next() % 20000);
                if (nd_ledger_session_id_new(id) < 0)
                        return EXIT_FAILURE;

                snprintf(detail, sizeof detail, "profile %s sha256 %s", p->name, p->digest);
                if (audit(l, start_us - 30 * USEC_PER_SEC, actor, "LoadProfile", serial, detail) < 0)
                        return die(l, "LoadProfile audit");
                nd_ledger_session_start s = {
                        .id = id, .pen_serial = serial, .cartridge_id = cart, .needles = NEEDLES_DEFAULT,
                        .profile_name = p->name, .profile_yaml = p->yaml, .profile_digest = p->digest,
                        .limits_digest = limits_digest, .label = label, .owner_uid = 1000, .owner_pid = 4242,
                        .owner_name = actor, .start_us = start_us, .single_use = true, .cartridge_max_runtime_s = 3600,
                };
                if (nd_ledger_session_begin(l, &s) < 0)
                        return die(l, "session begin");
                snprintf(detail, sizeof detail, "session %s profile %s cartridge %s label %s", id, p->name, cart, label);
                if (audit(l, start_us, actor, "Start", serial, detail) < 0)
                        return die(l, "Start audit");
                for (int k = 1; k <= 2; k++) {
                        snprintf(detail, sizeof detail, "depth_mm %.3f", p->depth_mm - 0.05 * k);
                        if (audit(l, start_us + (uint64_t) (duration_s * 1e6 * k / 3), actor, "SetDepth", serial, detail) < 0)
                                return die(l, "SetDepth audit");
                }
                if (audit(l, end_us, actor, "Stop", serial, "running") < 0)
                        return die(l, "Stop audit");
                nd_ledger_stats st = {
                        .duration_s = duration_s, .strokes = (uint64_t) (duration_s * speed_hz),
                        .max_depth_mm = p->depth_mm + 0.02 * rng_unit(), .max_speed_hz = speed_hz,
                        .max_temperature_c = 33 + 5 * rng_unit(), .max_current_ma = 300 + 400 * rng_unit(),
                };
                if (nd_ledger_session_end(l, id, end_us, &st, "stopped") < 0)
                        return die(l, "session end");
                if ((i + 1) % PROGRESS_EVERY == 0)
                        fprintf(stderr, "make-ledger: %llu of %llu sessions\n", i + 1, n);
        }
        for (size_t i = 0; i < n_profiles; i++)
                free(profiles[i].yaml);
        printf("%s: %llu sessions, %llu audit entries, %u pens\n", nd_ledger_path(l), n, n * 7, pens);
        return EXIT_SUCCESS;
}
