/* cmd-check.c: needlectl check-limits and check-profile, offline checks of configuration
 * files (like nginx -t). Problems go to stdout, one per line as FILE:LINE:COLUMN: FIELD:
 * MESSAGE (or as a JSON array), so editors and scripts can jump to them; anything else goes
 * to stderr. */
#include <errno.h>
#include <getopt.h>
#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "diag.h"
#include "needlectl.h"
#include "profile.h"
#include "safety-limits.h"
#include "util.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(json_object *, json_object_put)

static void check_limits_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl check-limits FILE [--json]\n"
                "\n"
                "Checks a safety limits file (normally %s) without a daemon and prints\n"
                "every problem, one per line: FILE:LINE:COLUMN: FIELD: MESSAGE.\n"
                "A valid file prints nothing.\n"
                "\n"
                "Options:\n"
                "  --json     print a JSON array of {file, line, column, field, code, message,\n"
                "             value, limit} instead ([] when valid)\n"
                "  -h, --help show this help\n"
                "\n"
                "Exit status: 0 valid, 1 invalid, 2 the file cannot be read, 64 usage error.\n",
                LIMITS_PATH_DEFAULT);
}

static void check_profile_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl check-profile FILE [--limits FILE] [--json]\n"
                "\n"
                "Checks a treatment profile without a daemon, against a limits file, and prints\n"
                "every problem, one per line: FILE:LINE:COLUMN: FIELD: MESSAGE.\n"
                "A valid profile prints nothing. The pen's own checks (depth steps, cartridge)\n"
                "happen only when the profile is armed on a pen.\n"
                "\n"
                "Options:\n"
                "  --limits FILE  the limits to check against (default %s)\n"
                "  --json         print a JSON array of {file, line, column, field, code,\n"
                "                 message, value, limit} instead ([] when valid)\n"
                "  -h, --help     show this help\n"
                "\n"
                "When the limits file is itself invalid, its problems are printed too, the\n"
                "profile is checked for everything that does not need limits, a no-limits\n"
                "problem says what could not be checked, and the exit status is 1.\n"
                "\n"
                "Exit status: 0 valid, 1 invalid, 2 a file cannot be read, 64 usage error.\n",
                LIMITS_PATH_DEFAULT);
}

typedef struct check_args {
        const char *file;
        const char *limits_path;
        bool json;
} check_args;

enum { ARG_JSON = 0x100, ARG_LIMITS };

/* Returns -1 to go on, or the exit code to return now. */
static int parse_args(int argc, char *argv[], bool with_limits, check_args *args,
                      void (*usage)(FILE *out)) {
        static const struct option options[] = {
                { "help",   no_argument,       NULL, 'h' },
                { "json",   no_argument,       NULL, ARG_JSON },
                { "limits", required_argument, NULL, ARG_LIMITS },
                { NULL, 0, NULL, 0 }
        };
        int c;

        opterr = 0;
        optind = 0;
        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0) {
                switch (c) {
                case 'h':
                        usage(stdout);
                        return NEEDLECTL_EXIT_OK;
                case ARG_JSON:
                        args->json = true;
                        break;
                case ARG_LIMITS:
                        if (with_limits) {
                                args->limits_path = optarg;
                                break;
                        }
                        fprintf(stderr, "needlectl %s: unknown option '--limits'\n", argv[0]);
                        usage(stderr);
                        return NEEDLECTL_EXIT_USAGE;
                default:
                        fprintf(stderr, "needlectl %s: unknown option '%s'\n", argv[0], argv[optind - 1]);
                        usage(stderr);
                        return NEEDLECTL_EXIT_USAGE;
                }
        }
        if (argc - optind != 1) {
                fprintf(stderr, "needlectl %s: expected exactly one FILE\n", argv[0]);
                usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        args->file = argv[optind];
        return -1;
}

static json_object *json_string_or_null(const char *s) {
        return s ? json_object_new_string(s) : NULL;
}

static json_object *json_position(unsigned v) {
        return v > 0 ? json_object_new_int64(v) : NULL;
}

static int print_json(const nd_diags *diags) {
        _cleanup_(json_object_putp) json_object *array = json_object_new_array();
        if (!array)
                return -ENOMEM;
        for (size_t i = 0; i < nd_diags_count(diags); i++) {
                const nd_diag *d = &diags->items[i];
                json_object *o = json_object_new_object();
                if (!o)
                        return -ENOMEM;
                json_object_array_add(array, o);
                json_object_object_add(o, "file", json_string_or_null(d->file));
                json_object_object_add(o, "line", json_position(d->line));
                json_object_object_add(o, "column", json_position(d->column));
                json_object_object_add(o, "field", json_object_new_string(d->field));
                json_object_object_add(o, "code", json_object_new_string(d->code));
                json_object_object_add(o, "message", json_object_new_string(d->message));
                json_object_object_add(o, "value", json_string_or_null(d->value));
                json_object_object_add(o, "limit", json_string_or_null(d->limit));
        }
        const char *text = json_object_to_json_string_ext(array, JSON_C_TO_STRING_PLAIN |
                                                                 JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return -ENOMEM;
        puts(text);
        return 0;
}

static int print_text(const nd_diags *diags) {
        for (size_t i = 0; i < nd_diags_count(diags); i++) {
                _cleanup_free_ char *line = nd_diag_format(&diags->items[i]);
                if (!line)
                        return -ENOMEM;
                puts(line);
        }
        return 0;
}

static int report(const nd_diags *diags, bool json) {
        int r = json ? print_json(diags) : print_text(diags);
        if (r >= 0 && fflush(stdout) != 0)
                r = -errno;
        if (r < 0) {
                fprintf(stderr, "needlectl: cannot print the result: %s\n", strerror(-r));
                return NEEDLECTL_EXIT_UNREADABLE;
        }
        return nd_diags_count(diags) > 0 ? NEEDLECTL_EXIT_INVALID : NEEDLECTL_EXIT_OK;
}

/* Explains a load that could not even start (-errno) on stderr; the diag has the reason. */
static int unreadable(const char *what, int r, const nd_diags *diags) {
        if (r == -ENOMEM || nd_diags_count(diags) == 0)
                fprintf(stderr, "needlectl: %s: %s\n", what, strerror(-r));
        else
                fprintf(stderr, "needlectl: %s\n", diags->items[nd_diags_count(diags) - 1].message);
        return NEEDLECTL_EXIT_UNREADABLE;
}

int verb_check_limits(int argc, char *argv[]) {
        check_args args = { .limits_path = LIMITS_PATH_DEFAULT };
        int r = parse_args(argc, argv, false, &args, check_limits_usage);
        if (r >= 0)
                return r;

        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        _cleanup_(nd_limits_freep) nd_limits *limits = NULL;
        r = nd_limits_load_file(args.file, &limits, &diags);
        if (r < 0 && r != -EINVAL)
                return unreadable(args.file, r, &diags);
        return report(&diags, args.json);
}

int verb_check_profile(int argc, char *argv[]) {
        check_args args = { .limits_path = LIMITS_PATH_DEFAULT };
        int r = parse_args(argc, argv, true, &args, check_profile_usage);
        if (r >= 0)
                return r;

        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        _cleanup_(nd_limits_freep) nd_limits *limits = NULL;
        r = nd_limits_load_file(args.limits_path, &limits, &diags);
        if (r < 0 && r != -EINVAL)
                return unreadable(args.limits_path, r, &diags);

        /* With invalid limits, limits is NULL: the profile still gets its structural checks
         * and a no-limits problem, and the limits' own problems stay in the report. */
        _cleanup_(nd_profile_freep) nd_profile *profile = NULL;
        r = nd_profile_load_file(args.file, limits, &profile, &diags);
        if (r < 0 && r != -EINVAL)
                return unreadable(args.file, r, &diags);
        return report(&diags, args.json);
}
