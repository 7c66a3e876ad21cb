/* bus-util.h: what needlectl's D-Bus verbs share: the common options, the connection to
 * needled, naming a pen, turning replies into JSON, and turning D-Bus errors into a message
 * and an exit code. */
#pragma once

#include <getopt.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

#include "contract.h"
#include "util.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(json_object *, json_object_put)
#define _cleanup_json_ _cleanup_(json_object_putp)
#define _cleanup_bus_message_ _cleanup_(sd_bus_message_unrefp)
#define _cleanup_bus_error_ _cleanup_(sd_bus_error_free)

/* The options every D-Bus verb takes. */
typedef struct ctl_common {
        bool user_bus;          /* --session: the session bus instead of the system bus */
        bool json;              /* --json: machine-readable output */
        bool no_ask_password;   /* --no-ask-password: never start interactive authorization */
} ctl_common;

/* getopt_long values of the common options; verbs' own options start at CTL_ARG_VERB. */
enum {
        CTL_ARG_SYSTEM = 0x100,
        CTL_ARG_SESSION,
        CTL_ARG_JSON,
        CTL_ARG_NO_ASK_PASSWORD,
        CTL_ARG_VERB = 0x200,
};

/* The common entries of a struct option table, to put first in a verb's table. */
#define CTL_COMMON_OPTIONS                                                       \
        { "help",            no_argument, NULL, 'h' },                           \
        { "system",          no_argument, NULL, CTL_ARG_SYSTEM },                \
        { "session",         no_argument, NULL, CTL_ARG_SESSION },               \
        { "json",            no_argument, NULL, CTL_ARG_JSON },                  \
        { "no-ask-password", no_argument, NULL, CTL_ARG_NO_ASK_PASSWORD }

/* The help text of the common options, for verbs' usage messages. */
#define CTL_COMMON_HELP                                                                  \
        "      --system           talk to needled on the system bus (the default)\n"     \
        "      --session          talk to needled on the session bus (development)\n"    \
        "      --no-ask-password  do not ask for authentication (polkit agent)\n"        \
        "  -h, --help             show this help\n"

/* The exit codes, one line each, for usage messages (the man page has the same list). */
#define CTL_EXIT_HELP                                                                                 \
        "Exit status: 0 success; 1 refused as invalid; 2 a file cannot be read or written;\n"         \
        "3 not authorized; 4 needled not running or the bus unreachable; 5 no such pen, or it\n"      \
        "left; 6 wrong state or not the session owner; 7 pen fault; 8 no cartridge or spent;\n"       \
        "9 low battery; 10 no limits in force; 11 storage failure; 12 the session ended early;\n"     \
        "64 usage error; 70 internal error. See needlectl(1).\n"

/* Moves common options written before the verb ("needlectl --session list") to after it, in
 * place, so that every verb sees them. Returns argc. */
int ctl_hoist_common_options(int argc, char *argv[]);

/* Handles a common option (c from getopt_long); returns true when c was one. */
bool ctl_common_parse(ctl_common *common, int c);

/* Prints "needlectl VERB: unknown option 'X'" (or missing argument) for getopt's '?'/':'. */
void ctl_bad_option(const char *verb, int argc, char *argv[]);

/* A verb's own option handler: returns 0 when handled, or an exit code (e.g. 64 with the
 * message printed) to return at once. */
typedef int (*ctl_option_handler)(int c, const char *arg, void *userdata);

/* Parses argv (argv[0] the verb) with the common options plus options[] (whose table must
 * start with CTL_COMMON_OPTIONS and end with a NULL entry); positional arguments are left
 * from argv[optind]. Returns -1 to go on, else the exit code to return now (0 after --help). */
int ctl_parse_options(int argc, char *argv[], const struct option *options, ctl_common *common,
                      void (*usage)(FILE *out), ctl_option_handler handler, void *userdata);

/* Checks that the number of positional arguments lies in [min, max]; else prints the usage
 * error and returns 64. Returns -1 to go on. */
int ctl_check_positional(int argc, char *argv[], int min, int max, void (*usage)(FILE *out));

/* ctl_parse_options(), then ctl_check_positional() with [min, max]: the start of a verb whose
 * number of arguments does not depend on its options. Returns -1 to go on, else the exit code. */
int ctl_parse_args(int argc, char *argv[], const struct option *options, ctl_common *common,
                   void (*usage)(FILE *out), ctl_option_handler handler, void *userdata, int min, int max);

/* ---- the verb table (tools/needlectl.c) ---- */

typedef struct ctl_verb ctl_verb;

/* What the dispatcher hands a verb: its positional arguments (options removed), the common
 * options, its own options (args), and the bus when its entry says it needs one. */
typedef struct ctl_invocation {
        const ctl_verb *verb;
        int argc;                  /* positional arguments only */
        char **argv;
        ctl_common common;
        void *args;                /* ctl_verb_syntax.args_size bytes; NULL when 0 */
        sd_bus *bus;               /* connected when ctl_verb.needs_bus, else NULL; not the verb's to free */
} ctl_invocation;

/* How a verb reads its command line. */
typedef struct ctl_verb_syntax {
        void (*usage)(FILE *out);
        const struct option *options;        /* starts with CTL_COMMON_OPTIONS; NULL: only those */
        ctl_option_handler handler;          /* the verb's own options, into args */
        size_t args_size;
        void (*args_init)(void *args);       /* defaults; NULL: all zero */
        void (*args_free)(void *args);       /* frees what check put into args; NULL: nothing */
        int (*check)(ctl_invocation *inv);   /* after parsing, before the bus: -1 to go on, else the exit code */
} ctl_verb_syntax;

/* One entry of needlectl's verb table. */
struct ctl_verb {
        const char *name;
        const char *summary;
        int (*run)(ctl_invocation *inv);     /* returns the exit code */
        const ctl_verb_syntax *syntax;       /* NULL: run_raw gets the command line as it is */
        int (*run_raw)(int argc, char *argv[]);
        int min_args, max_args;              /* positional arguments, checked before check() */
        bool needs_bus;                      /* connect (ctl_connect) before run */
};

/* Runs a verb: argv[0] its name. Parses its options, checks the number of positional
 * arguments, calls its check(), connects when it needs the bus, runs it. Returns the exit code. */
int ctl_verb_dispatch(const ctl_verb *v, int argc, char *argv[]);

/* Connects to the bus the options name, with sane call timeouts and interactive authorization
 * allowed only when asked for on a terminal. On failure prints why and returns the exit code
 * (negative of it is never used: > 0), else 0 and *ret owns a reference. */
int ctl_connect(const ctl_common *common, sd_bus **ret);

/* The exit code for a failed call: from the D-Bus error name, else from r (-errno). */
int ctl_exit_code_for_error(const sd_bus_error *error, int r);

/* Prints "needlectl: WHAT: MESSAGE (ERROR.NAME)" on stderr, in the daemon's words, with a
 * hint where one helps (daemon not running, polkit), and returns the exit code. */
int ctl_log_bus_error(const char *what, const sd_bus_error *error, int r);

/* Prints "needlectl: MESSAGE" on stderr and returns code. */
int ctl_fail(int code, const char *format, ...) _printf_(2, 3);

/* Prints the out-of-memory message and returns the internal-error exit code. */
int ctl_oom(void);

/* Resolves a pen named by serial or object path, or the only pen when name is NULL, to its
 * object path (*ret_path, owned by the caller). On failure prints why and returns the exit
 * code (no pen: 5; several pens and none named: 64), else 0. */
int ctl_resolve_pen(sd_bus *bus, const char *name, char **ret_path);

/* The object paths of the connected pens (*ret, a NULL-terminated strv owned by the caller).
 * On failure prints why and returns the exit code, else 0. */
int ctl_get_pens(sd_bus *bus, char ***ret);

/* Frees a NULL-terminated array of strings. */
void ctl_strv_free(char **l);
DEFINE_TRIVIAL_CLEANUP_FUNC(char **, ctl_strv_free)

/* Reads the next complete value of m (any type) as JSON: a{s*} becomes an object, other arrays
 * and structs arrays, integers numbers, "t" an integer of µs or a count. *ret is owned by the
 * caller (NULL for JSON null never happens). Returns 0 or -errno. */
int ctl_message_read_json(sd_bus_message *m, json_object **ret);

/* Turns a D-Bus property name into its JSON key: "FirmwareVersion" -> "firmware_version". */
char *ctl_property_to_key(const char *name);

/* Reads an a{sv} of properties (as GetAll or PropertiesChanged send it) into obj, keys made
 * with ctl_property_to_key. Returns 0 or -errno. */
int ctl_message_read_properties(sd_bus_message *m, json_object *obj);

/* GetAll of an interface of an object of needled, as a JSON object (*ret owned by the caller).
 * On failure prints why and returns the exit code, else 0. */
int ctl_get_all_properties(sd_bus *bus, const char *path, const char *interface, json_object **ret);

/* Calls a method whose reply is one value of any type and returns it as JSON (*ret owned by
 * the caller). types/... as sd_bus_call_method. On failure prints "WHAT: error" and returns
 * the exit code, else 0. */
int ctl_call_json(sd_bus *bus, const char *what, const char *path, const char *interface,
                  const char *member, json_object **ret, const char *types, ...);

/* Calls a method whose reply carries nothing needlectl uses. On failure prints "WHAT: error"
 * and returns the exit code, else 0. */
int ctl_call(sd_bus *bus, const char *what, const char *path, const char *interface,
             const char *member, const char *types, ...);

/* Accessors that tolerate a missing key or a wrong type (a daemon of another version). */
const char *ctl_json_str(json_object *obj, const char *key);
double ctl_json_double(json_object *obj, const char *key);
int64_t ctl_json_int(json_object *obj, const char *key);
bool ctl_json_bool(json_object *obj, const char *key);

/* Prints obj to stdout as one line of JSON. Returns 0 or the exit code. */
int ctl_print_json(json_object *obj);

/* The serial in a pen's object path (the last element, unescaped), owned by the caller;
 * NULL when out of memory or not a pen path. */
char *ctl_pen_serial_from_path(const char *path);

/* Formats µs since the epoch as local "YYYY-MM-DD HH:MM:SS" into buf; "-" for 0. */
const char *ctl_format_time(uint64_t usec, char *buf, size_t size);

/* Formats µs since the epoch as UTC ISO 8601 with µs, "YYYY-MM-DDTHH:MM:SS.uuuuuuZ" (a FHIR
 * dateTime and instant), into buf (64 bytes suffice); "" for 0. */
const char *ctl_format_iso_utc(uint64_t usec, char *buf, size_t size);

/* Parses a time for --since: "YYYY-MM-DD[ HH:MM[:SS]]" (or with 'T') in local time,
 * "@SECONDS" since the epoch, or "-N{s,m,h,d}" before now. Returns 0 or -EINVAL. */
int ctl_parse_time(const char *s, uint64_t *ret_usec);

/* Parses a finite decimal number. Returns 0 or -EINVAL. */
int ctl_parse_double(const char *s, double *ret);

/* Parses an unsigned decimal number no greater than max. Returns 0 or -EINVAL/-ERANGE. */
int ctl_parse_unsigned(const char *s, uint64_t max, uint64_t *ret);

/* Reads a whole text file (at most max_bytes) into *ret (NUL-terminated, owned by the
 * caller). On failure prints why and returns the exit code (2), else 0. */
int ctl_read_file(const char *path, size_t max_bytes, char **ret);
