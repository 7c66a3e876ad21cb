/* needlectl: the command line for needled's operators, administrators and technicians. */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "bus-util.h"
#include "needlectl.h"
#include "util.h"

#define ANY INT_MAX

/* Every verb: its name and summary, how it runs, how many positional arguments it takes
 * (checked before it runs) and whether it needs the bus (connected before it runs). */
static const ctl_verb verbs[] = {
        /* Offline: each reads its own command line. */
        { "check-limits",  "check a limits file offline (like nginx -t)", .run_raw = verb_check_limits },
        { "check-profile", "check a treatment profile offline against a limits file", .run_raw = verb_check_profile },
        { "audit",         "verify the ledger's hash-chained audit trail", .run_raw = verb_audit },
        /* Through the daemon's D-Bus API.
         *  name             summary                                                   run            syntax                   min max  bus */
        { "list",          "list the connected pens",                                  verb_list,     &ctl_syntax_list,        NULL, 0, 0,   true },
        { "status",        "show the daemon and its pens, or one pen in detail",       verb_status,   &ctl_syntax_status,      NULL, 0, 1,   true },
        { "watch",         "live view of a pen (terminal), or one line per update",    verb_watch,    &ctl_syntax_watch,       NULL, 0, 1,   true },
        { "profiles",      "list the installed treatment profiles",                    verb_profiles, &ctl_syntax_profiles,    NULL, 0, 0,   true },
        { "validate",      "check a treatment profile against the limits in force",    verb_validate, &ctl_syntax_validate,    NULL, 1, 1,   true },
        { "arm",           "arm a pen with an installed profile or a profile file",    verb_arm,      &ctl_syntax_arm,         NULL, 1, 2,   true },
        { "run",           "arm, start and stay with a session until it ends",         verb_run,      &ctl_syntax_run,         NULL, 0, 1,   true },
        { "start",         "start the armed profile (--wait/--watch to stay attached)", verb_start,   &ctl_syntax_start,       NULL, 0, 1,   true },
        { "pause",         "pause the session (its owner only)",                       verb_simple,   &ctl_syntax_pause,       NULL, 0, 1,   true },
        { "resume",        "resume a paused session (its owner only)",                 verb_simple,   &ctl_syntax_resume,      NULL, 0, 1,   true },
        { "stop",          "stop a pen, or --all; always allowed",                     verb_stop,     &ctl_syntax_stop,        NULL, 0, 1,   true },
        { "set-depth",     "change the depth set point (the session's owner only)",    verb_setter,   &ctl_syntax_set_depth,   NULL, 1, 2,   true },
        { "set-speed",     "change the speed set point (the session's owner only)",    verb_setter,   &ctl_syntax_set_speed,   NULL, 1, 2,   true },
        { "clear-fault",   "return a pen from fault to idle",                          verb_simple,   &ctl_syntax_clear_fault, NULL, 0, 1,   true },
        { "limits",        "show the limits in force and their digest",                verb_limits,   &ctl_syntax_limits,      NULL, 0, 0,   true },
        { "reload-limits", "make the daemon re-read its limits file",                  verb_reload_limits, &ctl_syntax_reload_limits, NULL, 0, 0, true },
        { "history",       "list treatment sessions from the ledger",                  verb_history,  &ctl_syntax_history,     NULL, 0, 0,   true },
        { "export",        "write treatment sessions for other systems (CSV)",         verb_export,   &ctl_syntax_export,      NULL, 0, 0,   true },
        { "cartridge",     "what the ledger knows of a cartridge",                     verb_cartridge, &ctl_syntax_cartridge,  NULL, 1, 1,   true },
        { "record",        "record a pen's telemetry to CSV",                          verb_record,   &ctl_syntax_record,      NULL, 0, 1,   true },
        /* COMMAND [PEN] [ARGS...]: sim's check() counts them per command. */
        { "sim",           "drive the simulator (needled --simulate)",                 verb_sim,      &ctl_syntax_sim,         NULL, 0, ANY, true },
};

static void usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl [--version] [--help] COMMAND [ARGS...]\n"
                "\n"
                "Commands:\n");
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
                fprintf(out, "  %-15s %s\n", verbs[i].name, verbs[i].summary);
        fprintf(out, "\nRun 'needlectl COMMAND --help' for a command's options.\n");
}

int main(int argc, char *argv[]) {
        if (argc < 2) {
                usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        ctl_hoist_common_options(argc, argv); /* "needlectl --session list" */
        if (STREQ(argv[1], "--help") || STREQ(argv[1], "-h") || STREQ(argv[1], "help")) {
                usage(stdout);
                return NEEDLECTL_EXIT_OK;
        }
        if (STREQ(argv[1], "--version")) {
                printf("needlectl %s\n", PACKAGE_VERSION);
                return NEEDLECTL_EXIT_OK;
        }
        for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
                if (STREQ(argv[1], verbs[i].name))
                        return ctl_verb_dispatch(&verbs[i], argc - 1, argv + 1);

        fprintf(stderr, "needlectl: unknown command '%s'; 'needlectl --help' lists them.\n", argv[1]);
        return NEEDLECTL_EXIT_USAGE;
}
