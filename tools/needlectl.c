/* needlectl: the command line for needled's operators, administrators and technicians. */
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "bus-util.h"
#include "needlectl.h"
#include "util.h"

typedef struct verb {
        const char *name;
        int (*run)(int argc, char *argv[]);
        const char *summary;
} verb;

static const verb verbs[] = {
        { "check-limits",  verb_check_limits,  "check a limits file offline (like nginx -t)" },
        { "check-profile", verb_check_profile, "check a treatment profile offline against a limits file" },
        { "audit",         verb_audit,         "verify the ledger's hash-chained audit trail" },
        /* Through the daemon's D-Bus API. */
        { "list",          verb_list,          "list the connected pens" },
        { "status",        verb_status,        "show the daemon and its pens, or one pen in detail" },
        { "watch",         verb_watch,         "live view of a pen (terminal), or one line per update" },
        { "profiles",      verb_profiles,      "list the installed treatment profiles" },
        { "validate",      verb_validate,      "check a treatment profile against the limits in force" },
        { "arm",           verb_arm,           "arm a pen with an installed profile or a profile file" },
        { "run",           verb_run,           "arm, start and stay with a session until it ends" },
        { "start",         verb_start,         "start the armed profile (--wait/--watch to stay attached)" },
        { "pause",         verb_pause,         "pause the session (its owner only)" },
        { "resume",        verb_resume,        "resume a paused session (its owner only)" },
        { "stop",          verb_stop,          "stop a pen, or --all; always allowed" },
        { "set-depth",     verb_set_depth,     "change the depth set point (the session's owner only)" },
        { "set-speed",     verb_set_speed,     "change the speed set point (the session's owner only)" },
        { "clear-fault",   verb_clear_fault,   "return a pen from fault to idle" },
        { "limits",        verb_limits,        "show the limits in force and their digest" },
        { "reload-limits", verb_reload_limits, "make the daemon re-read its limits file" },
        { "history",       verb_history,       "list treatment sessions from the ledger" },
        { "export",        verb_export,        "write treatment sessions for other systems (CSV)" },
        { "cartridge",     verb_cartridge,     "what the ledger knows of a cartridge" },
        { "record",        verb_record,        "record a pen's telemetry to CSV" },
        { "sim",           verb_sim,           "drive the simulator (needled --simulate)" },
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
                        return verbs[i].run(argc - 1, argv + 1);

        fprintf(stderr, "needlectl: unknown command '%s'; 'needlectl --help' lists them.\n", argv[1]);
        return NEEDLECTL_EXIT_USAGE;
}
