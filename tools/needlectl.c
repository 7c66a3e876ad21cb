/* needlectl: the command line for needled's operators, administrators and technicians. */
#include <stdio.h>
#include <string.h>

#include "config.h"
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
