/* needled: the daemon's entry point. Parses the command line and runs the loop; everything
 * else lives in the daemon library so that tests link the same code. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "config.h"
#include "daemon.h"
#include "log.h"

static void help(void) {
        printf("Usage: needled [OPTIONS]\n"
               "\n"
               "The needled system daemon: owns the USB link to microneedling pens, enforces the\n"
               "safety limits, records every treatment and serves the D-Bus API org.needled1.\n"
               "\n"
               "  --session            use the session bus (development: callers with this user\n"
               "                       id are trusted, no polkit)\n"
               "  --simulate           export org.needled1.Simulator; start with no pens and\n"
               "                       do not look for USB pens\n"
               "  --limits FILE        safety limits (default %s)\n"
               "  --profiles DIR       installed treatment profiles (default %s)\n"
               "  --state-dir DIR      where the ledger lives (default $STATE_DIRECTORY,\n"
               "                       else /var/lib/needled)\n"
               "  --polkit-timeout MS  deny when polkit has not answered in MS ms (default %u)\n"
               "  --verbose            log debug messages\n"
               "  --version            print the version and exit\n"
               "  --help               print this help and exit\n",
               LIMITS_PATH_DEFAULT, PROFILES_DIR_DEFAULT, ND_POLKIT_TIMEOUT_MS_DEFAULT);
}

int main(int argc, char *argv[]) {
        enum { ARG_SESSION = 0x100, ARG_SIMULATE, ARG_LIMITS, ARG_PROFILES, ARG_STATE_DIR,
               ARG_POLKIT_TIMEOUT, ARG_VERBOSE, ARG_VERSION, ARG_HELP };
        static const struct option options[] = {
                { "session",        no_argument,       NULL, ARG_SESSION },
                { "simulate",       no_argument,       NULL, ARG_SIMULATE },
                { "limits",         required_argument, NULL, ARG_LIMITS },
                { "profiles",       required_argument, NULL, ARG_PROFILES },
                { "state-dir",      required_argument, NULL, ARG_STATE_DIR },
                { "polkit-timeout", required_argument, NULL, ARG_POLKIT_TIMEOUT },
                { "verbose",        no_argument,       NULL, ARG_VERBOSE },
                { "version",        no_argument,       NULL, ARG_VERSION },
                { "help",           no_argument,       NULL, ARG_HELP },
                { NULL, 0, NULL, 0 }
        };
        nd_daemon_options opts = {
                .limits_path = LIMITS_PATH_DEFAULT,
                .profiles_dir = PROFILES_DIR_DEFAULT,
                .polkit_timeout_ms = ND_POLKIT_TIMEOUT_MS_DEFAULT,
        };
        int c;

        while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0) {
                switch (c) {
                case ARG_SESSION: opts.session_bus = true; break;
                case ARG_SIMULATE: opts.simulate = true; break;
                case ARG_LIMITS: opts.limits_path = optarg; break;
                case ARG_PROFILES: opts.profiles_dir = optarg; break;
                case ARG_STATE_DIR: opts.state_dir = optarg; break;
                case ARG_POLKIT_TIMEOUT: {
                        char *end;
                        unsigned long ms = strtoul(optarg, &end, 10);
                        if (*optarg == '\0' || *end != '\0' || ms == 0 || ms > 600000) {
                                fprintf(stderr, "needled: --polkit-timeout takes 1..600000 ms, not '%s'\n", optarg);
                                return EXIT_FAILURE;
                        }
                        opts.polkit_timeout_ms = (unsigned) ms;
                        break;
                }
                case ARG_VERBOSE: opts.verbose = true; break;
                case ARG_VERSION: printf("needled %s\n", PACKAGE_VERSION); return EXIT_SUCCESS;
                case ARG_HELP: help(); return EXIT_SUCCESS;
                default: return EXIT_FAILURE; /* getopt printed why */
                }
        }
        if (optind < argc) {
                fprintf(stderr, "needled: unexpected argument '%s'; see --help\n", argv[optind]);
                return EXIT_FAILURE;
        }
        return nd_daemon_main(&opts) < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
