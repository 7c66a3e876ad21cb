/* umockdev-pen: needled without --simulate, in this process, with a needle pen emulated under
 * umockdev (tests/usb/fakepen.c, the pen model behind it), for the bus tests: the daemon's real
 * libusb path finds the pen at start-up and exports it as a Pen object with Simulated false.
 *
 * umockdev's testbed belongs to the process that creates it, so the daemon cannot be exec'd:
 * the testbed and the pen are set up here and then the daemon's own main loop runs here too
 * (nd_daemon_main from needled-core, the code the daemon runs). SIGUSR1 unplugs the pen (from
 * the daemon's loop, so the harness is driven from one thread as in tests/usb). SIGUSR2 writes
 * the pen's own telemetry counters to the --stats file (replaced whole, by rename): a pen whose
 * host falls behind drops its oldest samples, as a real pen does, and a test may then allow
 * exactly those gaps.
 *
 * Usage: umockdev-wrapper umockdev-pen [--serial S] [--cartridge ID:NEEDLES] [--telemetry-rate HZ]
 *                                      [--limits FILE] [--profiles DIR] [--state-dir DIR]
 *                                      [--stats FILE] [--verbose]
 * Exit: 0 after SIGTERM, 1 on error, 77 when not under umockdev-wrapper. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "daemon.h"
#include "log.h"
/* after util.h (through daemon.h): GLib redefines MIN/MAX the same way, with an #undef first */
#include "fakepen.h"

/* Under ASan: the umockdev preload library comes first in LD_PRELOAD, where ASan wants its
 * runtime; the order does not matter here (the preload only forwards the calls it wraps), so the
 * check is turned off, as in tests/usb. ASAN_OPTIONS from the environment still applies on top. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) {
        return "verify_asan_link_order=0";
}

#define EXIT_SKIP 77
#define FAKE_DEVNUM 2u
#define FAKE_PORT 1u

static int on_unplug_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        FakePen *pen = userdata;
        fprintf(stderr, "umockdev-pen: SIGUSR1: unplugging the pen\n");
        fakepen_unplug(pen);
        return sd_event_source_set_enabled(s, SD_EVENT_OFF);
}

typedef struct StatsTarget {
        FakePen *pen;
        const char *path;
} StatsTarget;

/* Writes "produced N\nsent N\ndropped N\n" to path.tmp, then renames it over path, so that a
 * reader sees the whole of one report or none. */
static int on_stats_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        StatsTarget *t = userdata;
        nd_penmodel_state st;
        char tmp[4096];
        (void) s;
        (void) si;

        nd_penmodel_get_state(fakepen_lock(t->pen), &st);
        fakepen_unlock(t->pen);
        if (snprintf(tmp, sizeof tmp, "%s.tmp", t->path) >= (int) sizeof tmp) {
                fprintf(stderr, "umockdev-pen: --stats path too long\n");
                return 0;
        }
        FILE *f = fopen(tmp, "we");
        if (!f) {
                fprintf(stderr, "umockdev-pen: %s: %s\n", tmp, strerror(errno));
                return 0;
        }
        fprintf(f, "produced %" PRIu64 "\nsent %" PRIu64 "\ndropped %" PRIu64 "\n",
                st.samples_produced, st.samples_sent, st.samples_dropped);
        if (fclose(f) != 0 || rename(tmp, t->path) < 0)
                fprintf(stderr, "umockdev-pen: %s: %s\n", t->path, strerror(errno));
        return 0;
}

/* Fits a cartridge given as ID:NEEDLES into the model, as if inserted before the pen was plugged. */
static int insert_cartridge(FakePen *pen, const char *spec) {
        const char *colon = strrchr(spec, ':');
        char id[64];
        char *end;
        if (!colon || colon == spec || (size_t) (colon - spec) >= sizeof id)
                return -EINVAL;
        unsigned long needles = strtoul(colon + 1, &end, 10);
        if (*end != '\0' || needles == 0 || needles > 255)
                return -EINVAL;
        memcpy(id, spec, (size_t) (colon - spec));
        id[colon - spec] = '\0';
        nd_penmodel *m = fakepen_lock(pen);
        int r = nd_penmodel_insert_cartridge(m, fakepen_now_us(), id, (unsigned) needles);
        fakepen_unlock(pen);
        return r;
}

int main(int argc, char *argv[]) {
        enum { ARG_SERIAL = 0x100, ARG_CARTRIDGE, ARG_RATE, ARG_LIMITS, ARG_PROFILES, ARG_STATE_DIR, ARG_STATS, ARG_VERBOSE };
        static const struct option options[] = {
                { "serial",    required_argument, NULL, ARG_SERIAL },
                { "cartridge", required_argument, NULL, ARG_CARTRIDGE },
                { "telemetry-rate", required_argument, NULL, ARG_RATE },
                { "limits",    required_argument, NULL, ARG_LIMITS },
                { "profiles",  required_argument, NULL, ARG_PROFILES },
                { "state-dir", required_argument, NULL, ARG_STATE_DIR },
                { "stats",     required_argument, NULL, ARG_STATS },
                { "verbose",   no_argument,       NULL, ARG_VERBOSE },
                { NULL, 0, NULL, 0 }
        };
        nd_daemon_options opts = {
                .limits_path = LIMITS_PATH_DEFAULT,
                .profiles_dir = PROFILES_DIR_DEFAULT,
                .polkit_timeout_ms = ND_POLKIT_TIMEOUT_MS_DEFAULT,
        };
        nd_penmodel_config config;
        const char *cartridge = NULL;
        StatsTarget stats = { .path = NULL };
        int c;

        nd_penmodel_config_init(&config);
        snprintf(config.serial, sizeof config.serial, "%s", "USB0001");
        snprintf(config.model, sizeof config.model, "%s", "needle-usb");
        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0) {
                switch (c) {
                case ARG_SERIAL:
                        if (strlen(optarg) == 0 || strlen(optarg) >= sizeof config.serial) {
                                fprintf(stderr, "umockdev-pen: --serial takes 1 to %zu characters\n", sizeof config.serial - 1);
                                return EXIT_FAILURE;
                        }
                        snprintf(config.serial, sizeof config.serial, "%s", optarg);
                        break;
                case ARG_CARTRIDGE: cartridge = optarg; break;
                case ARG_RATE: {
                        char *end;
                        unsigned long hz = strtoul(optarg, &end, 10);
                        if (*optarg == '\0' || *end != '\0' || hz < ND_PROTO_TELEMETRY_RATE_MIN_HZ ||
                            hz > ND_PROTO_TELEMETRY_RATE_MAX_HZ) {
                                fprintf(stderr, "umockdev-pen: --telemetry-rate takes %u to %u Hz\n",
                                        ND_PROTO_TELEMETRY_RATE_MIN_HZ, ND_PROTO_TELEMETRY_RATE_MAX_HZ);
                                return EXIT_FAILURE;
                        }
                        config.telemetry_rate_hz = (unsigned) hz;
                        break;
                }
                case ARG_LIMITS: opts.limits_path = optarg; break;
                case ARG_PROFILES: opts.profiles_dir = optarg; break;
                case ARG_STATE_DIR: opts.state_dir = optarg; break;
                case ARG_STATS: stats.path = optarg; break;
                case ARG_VERBOSE: opts.verbose = true; break;
                default: return EXIT_FAILURE;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "umockdev-pen: unexpected argument '%s'\n", argv[optind]);
                return EXIT_FAILURE;
        }

        /* Every thread umockdev, GLib or libusb start inherits this mask: the daemon's signals
         * (and the unplug signal) must reach the loop's signalfd, never a thread's default
         * action, which would end the process without the daemon's clean shutdown. */
        sigset_t mask;
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, SIGUSR1);
        sigaddset(&mask, SIGUSR2);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) {
                fprintf(stderr, "umockdev-pen: sigprocmask: %s\n", strerror(errno));
                return EXIT_FAILURE;
        }

        /* The testbed must exist before libusb starts. */
        UMockdevTestbed *tb = umockdev_testbed_new();
        if (!umockdev_in_mock_environment()) {
                fprintf(stderr, "SKIP: not running under umockdev-wrapper\n");
                g_object_unref(tb);
                return EXIT_SKIP;
        }
        FakePen *pen = fakepen_new(tb, &config, FAKE_DEVNUM, FAKE_PORT);
        if (cartridge && insert_cartridge(pen, cartridge) < 0) {
                fprintf(stderr, "umockdev-pen: bad --cartridge '%s' (ID:NEEDLES)\n", cartridge);
                fakepen_free(pen);
                g_object_unref(tb);
                return EXIT_FAILURE;
        }

        /* nd_daemon_main runs on the loop it is given: the unplug signal joins it there. */
        sd_event *event = NULL;
        int r = sd_event_default(&event);
        if (r >= 0)
                r = sd_event_add_signal(event, NULL, SIGUSR1, on_unplug_signal, pen);
        stats.pen = pen;
        if (r >= 0 && stats.path)
                r = sd_event_add_signal(event, NULL, SIGUSR2, on_stats_signal, &stats);
        opts.event = event;
        if (r >= 0)
                r = nd_daemon_main(&opts);
        if (r < 0)
                fprintf(stderr, "umockdev-pen: %s\n", strerror(-r));

        sd_event_unref(event);
        fakepen_free(pen);
        g_object_unref(tb);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
