/* cmd-manager.c: needlectl's verbs about the daemon as a whole, through org.needled1.Manager:
 * profiles, validate, limits, reload-limits, history, cartridge. Data goes to stdout (text for
 * people, or one JSON document with --json); errors go to stderr. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "bus-util.h"
#include "fhir.h"
#include "needlectl.h"

/* ---- profiles ------------------------------------------------------------------------------- */

static void profiles_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl profiles [--json] [--system|--session]\n"
                "\n"
                "Lists the treatment profiles installed on the daemon's side (its profiles\n"
                "directory), each checked against the limits in force, with the violations of\n"
                "those that are not valid.\n"
                "\n"
                "Options:\n"
                "      --json             a JSON array of objects, one per profile: name, area,\n"
                "                         indication, depth_mm, speed_hz, duration_s, needles,\n"
                "                         valid, violations [[field, code, message]...], and the\n"
                "                         daemon's other keys (digest, notes, aftercare, ...)\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

static void print_violations(json_object *violations, const char *prefix) {
        size_t n = json_object_is_type(violations, json_type_array) ? json_object_array_length(violations) : 0;
        for (size_t i = 0; i < n; i++) {
                json_object *v = json_object_array_get_idx(violations, i);
                const char *field = json_object_get_string(json_object_array_get_idx(v, 0));
                const char *message = json_object_get_string(json_object_array_get_idx(v, 2));
                if (field && field[0])
                        printf("%s%s: %s\n", prefix, field, strempty(message));
                else
                        printf("%s%s\n", prefix, strempty(message));
        }
}

const ctl_verb_syntax ctl_syntax_profiles = { .usage = profiles_usage };

int verb_profiles(ctl_invocation *inv) {
        sd_bus *bus = inv->bus;
        int r;

        _cleanup_json_ json_object *profiles = NULL;
        r = ctl_call_json(bus, "cannot list the profiles", ND_MANAGER_PATH, ND_MANAGER_INTERFACE,
                          "GetProfiles", &profiles, NULL);
        if (r != 0)
                return r;
        if (inv->common.json)
                return ctl_print_json(profiles);

        size_t n = json_object_array_length(profiles);
        if (n == 0) {
                printf("No profiles are installed.\n");
                return 0;
        }
        printf("%-28s %-12s %-14s %8s %7s %8s %7s  %s\n", "NAME", "AREA", "INDICATION", "DEPTH", "SPEED",
               "DURATION", "NEEDLES", "VALID");
        for (size_t i = 0; i < n; i++) {
                json_object *p = json_object_array_get_idx(profiles, i);
                printf("%-28s %-12s %-14s %5.2f mm %4.0f Hz %6.0f s %7" PRId64 "  %s\n", ctl_json_str(p, "name"),
                       ctl_json_str(p, "area"), ctl_json_str(p, "indication"), ctl_json_double(p, "depth_mm"),
                       ctl_json_double(p, "speed_hz"), ctl_json_double(p, "duration_s"),
                       ctl_json_int(p, "needles"), ctl_json_bool(p, "valid") ? "yes" : "NO");
                json_object *violations;
                if (json_object_object_get_ex(p, "violations", &violations))
                        print_violations(violations, "    ");
        }
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}

/* ---- validate ------------------------------------------------------------------------------- */

static void validate_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl validate FILE [--json] [--system|--session]\n"
                "\n"
                "Sends a treatment profile (YAML; '-' reads standard input) to needled, which\n"
                "checks it against the limits in force without arming anything. Prints every\n"
                "violation, one per line: FILE: FIELD: MESSAGE (FILE: MESSAGE for the document\n"
                "as a whole). A valid profile prints nothing. For a check without a daemon, see\n"
                "'needlectl check-profile'; the pen's own checks (depth steps, the cartridge's\n"
                "needles) happen when a profile is armed.\n"
                "\n"
                "Options:\n"
                "      --json             a JSON array of {file, field, code, message} ([] when\n"
                "                         valid); code is the daemon's stable identifier\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

/* The file is read before anything is asked of the daemon. */
static int validate_check(ctl_invocation *inv) {
        char **yaml = inv->args;
        int r = ctl_read_file(inv->argv[0], ND_PROFILE_TEXT_MAX, yaml);
        return r != 0 ? r : -1;
}

static void validate_args_free(void *args) {
        free(*(char **) args);
}

const ctl_verb_syntax ctl_syntax_validate = {
        .usage = validate_usage,
        .args_size = sizeof(char *),
        .check = validate_check,
        .args_free = validate_args_free,
};

int verb_validate(ctl_invocation *inv) {
        const char *file = inv->argv[0], *yaml = *(char **) inv->args;
        sd_bus *bus = inv->bus;
        int r;
        _cleanup_json_ json_object *violations = NULL;
        r = ctl_call_json(bus, "cannot validate the profile", ND_MANAGER_PATH, ND_MANAGER_INTERFACE,
                          "ValidateProfile", &violations, "s", yaml);
        if (r != 0)
                return r;

        size_t n = json_object_array_length(violations);
        if (inv->common.json) {
                _cleanup_json_ json_object *out = json_object_new_array();
                if (!out)
                        return ctl_oom();
                for (size_t i = 0; i < n; i++) {
                        json_object *v = json_object_array_get_idx(violations, i);
                        json_object *o = json_object_new_object();
                        if (!o)
                                return ctl_oom();
                        json_object_array_add(out, o);
                        json_object_object_add(o, "file", json_object_new_string(file));
                        json_object_object_add(o, "field", json_object_get(json_object_array_get_idx(v, 0)));
                        json_object_object_add(o, "code", json_object_get(json_object_array_get_idx(v, 1)));
                        json_object_object_add(o, "message", json_object_get(json_object_array_get_idx(v, 2)));
                }
                r = ctl_print_json(out);
                if (r != 0)
                        return r;
        } else {
                _cleanup_free_ char *prefix = NULL;
                if (asprintf(&prefix, "%s: ", file) < 0)
                        return ctl_oom();
                print_violations(violations, prefix);
                if (fflush(stdout) != 0)
                        return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
        }
        return n > 0 ? NEEDLECTL_EXIT_INVALID : NEEDLECTL_EXIT_OK;
}

/* ---- limits --------------------------------------------------------------------------------- */

static void limits_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl limits [--json] [--system|--session]\n"
                "\n"
                "Shows the safety limits in force in the daemon: where they come from, their\n"
                "state (ok, invalid, missing), the SHA-256 digest recorded with every session,\n"
                "when they were loaded, the error of the last failed load, and every value.\n"
                "\n"
                "Options:\n"
                "      --json             one JSON object: {path, state, digest, loaded_at (us\n"
                "                         since the epoch, 0 when none), error, limits (the\n"
                "                         values, nested as in the file; null when none)}\n"
                CTL_COMMON_HELP "\n"
                "With no limits in force the state and error are printed and the exit status\n"
                "is 10.\n" CTL_EXIT_HELP);
}

static void print_yaml_value(json_object *v, int indent);

static void print_yaml_scalar(json_object *v) {
        switch (json_object_get_type(v)) {
        case json_type_double: printf("%g", json_object_get_double(v)); break;
        case json_type_array: {
                printf("[");
                for (size_t i = 0; i < json_object_array_length(v); i++) {
                        if (i > 0)
                                printf(", ");
                        print_yaml_scalar(json_object_array_get_idx(v, i));
                }
                printf("]");
                break;
        }
        default: printf("%s", json_object_get_string(v)); break;
        }
}

static void print_yaml_value(json_object *v, int indent) {
        /* json-c's iterator API, not its foreach macro (a GNU statement expression). */
        struct json_object_iterator it = json_object_iter_begin(v), end = json_object_iter_end(v);
        for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
                const char *key = json_object_iter_peek_name(&it);
                json_object *value = json_object_iter_peek_value(&it);
                if (json_object_is_type(value, json_type_object)) {
                        printf("%*s%s:\n", indent, "", key);
                        print_yaml_value(value, indent + 2);
                } else {
                        printf("%*s%s: ", indent, "", key);
                        print_yaml_scalar(value);
                        printf("\n");
                }
        }
}

const ctl_verb_syntax ctl_syntax_limits = { .usage = limits_usage };

int verb_limits(ctl_invocation *inv) {
        sd_bus *bus = inv->bus;
        int r;

        _cleanup_json_ json_object *manager = NULL;
        r = ctl_get_all_properties(bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, &manager);
        if (r != 0)
                return r;

        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *reply = NULL;
        _cleanup_json_ json_object *limits = NULL;
        int exit_code = 0;
        r = sd_bus_call_method(bus, ND_BUS_NAME, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "GetLimits",
                               &error, &reply, NULL);
        if (r < 0) {
                exit_code = ctl_exit_code_for_error(&error, r);
                if (exit_code != NEEDLECTL_EXIT_NO_LIMITS)
                        return ctl_log_bus_error("cannot read the limits", &error, r);
        } else {
                r = ctl_message_read_json(reply, &limits);
                if (r < 0)
                        return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot read the limits: %s", strerror(-r));
        }

        if (inv->common.json) {
                _cleanup_json_ json_object *out = json_object_new_object();
                if (!out)
                        return ctl_oom();
                json_object_object_add(out, "path", json_object_new_string(ctl_json_str(manager, "limits_path")));
                json_object_object_add(out, "state", json_object_new_string(ctl_json_str(manager, "limits_state")));
                json_object_object_add(out, "digest", json_object_new_string(ctl_json_str(manager, "limits_digest")));
                json_object_object_add(out, "loaded_at", json_object_new_int64(ctl_json_int(manager, "limits_loaded_at")));
                json_object_object_add(out, "error", json_object_new_string(ctl_json_str(manager, "limits_error")));
                json_object_object_add(out, "limits", TAKE_PTR(limits));
                r = ctl_print_json(out);
                if (r != 0)
                        return r;
        } else {
                char when[64];
                const char *digest = ctl_json_str(manager, "limits_digest");
                const char *lerror = ctl_json_str(manager, "limits_error");
                printf("Path:    %s\n", ctl_json_str(manager, "limits_path"));
                printf("State:   %s\n", ctl_json_str(manager, "limits_state"));
                printf("Digest:  %s\n", digest[0] ? digest : "-");
                printf("Loaded:  %s\n",
                       ctl_format_time((uint64_t) ctl_json_int(manager, "limits_loaded_at"), when, sizeof when));
                if (lerror[0])
                        printf("Error:   %s\n", lerror);
                if (limits) {
                        printf("\n");
                        print_yaml_value(limits, 0);
                }
                if (fflush(stdout) != 0)
                        return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
        }
        if (exit_code != 0)
                fprintf(stderr, "needlectl: no limits are in force: %s (%s); nothing can be armed or started\n",
                        strempty(error.message), error.name);
        return exit_code;
}

/* ---- reload-limits -------------------------------------------------------------------------- */

static void reload_limits_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl reload-limits [--json] [--system|--session] [--no-ask-password]\n"
                "\n"
                "Makes needled re-read its safety limits file (check it first with 'needlectl\n"
                "check-limits FILE'). Needs polkit authorization org.needled1.configure. A bad\n"
                "file is refused with its problems and the limits in force stay in force; a\n"
                "running treatment outside the new limits is stopped (limits-changed).\n"
                "Prints the path and SHA-256 digest of the limits now in force.\n"
                "\n"
                "Options:\n"
                "      --json             one JSON object: {path, digest}\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

const ctl_verb_syntax ctl_syntax_reload_limits = { .usage = reload_limits_usage };

int verb_reload_limits(ctl_invocation *inv) {
        sd_bus *bus = inv->bus;
        int r;

        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        r = sd_bus_call_method(bus, ND_BUS_NAME, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "ReloadLimits",
                               &error, NULL, NULL);
        if (r < 0) {
                int code = ctl_log_bus_error("the limits were not reloaded", &error, r);
                if (sd_bus_error_has_name(&error, ND_ERROR_PREFIX "InvalidLimits"))
                        fprintf(stderr, "needlectl: the limits in force are unchanged\n");
                return code;
        }
        _cleanup_json_ json_object *manager = NULL;
        r = ctl_get_all_properties(bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, &manager);
        if (r != 0)
                return r;
        if (inv->common.json) {
                _cleanup_json_ json_object *out = json_object_new_object();
                if (!out)
                        return ctl_oom();
                json_object_object_add(out, "path", json_object_new_string(ctl_json_str(manager, "limits_path")));
                json_object_object_add(out, "digest", json_object_new_string(ctl_json_str(manager, "limits_digest")));
                return ctl_print_json(out);
        }
        printf("Limits reloaded from %s, sha256 %s\n", ctl_json_str(manager, "limits_path"),
               ctl_json_str(manager, "limits_digest"));
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}

/* ---- history -------------------------------------------------------------------------------- */

/* The daemon's largest reply (the contract's, ND_LEDGER_HISTORY_LIMIT_MAX): needlectl asks for
 * pages of this size and pages back with the filter key before. */
#define HISTORY_PAGE_MAX 1000u

static void history_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl history [--pen SERIAL] [--since TIME] [--before TIME]\n"
                "                         [--limit N | --all] [--json]\n"
                "                         [--system|--session] [--no-ask-password]\n"
                "\n"
                "Lists treatment sessions from the daemon's ledger, newest first. Needs polkit\n"
                "authorization org.needled1.read-history. The daemon answers at most 1000\n"
                "sessions a call; needlectl asks page after page (the filter key before) until\n"
                "it has what was asked: every session since TIME with --since, N with --limit,\n"
                "all with --all, else the newest 1000. When there are more sessions than it\n"
                "shows, it says so on stderr.\n"
                "\n"
                "Options:\n"
                "      --pen SERIAL       only this pen's sessions\n"
                "      --since TIME       only sessions started at or after TIME: YYYY-MM-DD,\n"
                "                         'YYYY-MM-DD HH:MM[:SS]' (local time), @SECONDS since\n"
                "                         the epoch, or -N{s,m,h,d} before now (e.g. -7d)\n"
                "      --before TIME      only sessions started before TIME (same forms)\n"
                "      --limit N          at most N sessions\n"
                "      --all              every session that passes the filters\n"
                "      --json             a JSON array of the daemon's entries: id, pen, cartridge,\n"
                "                         profile, profile_digest, limits_digest, label, owner_uid,\n"
                "                         start, end (us since the epoch; end 0 while running),\n"
                "                         duration_s, strokes, max_depth_mm, max_temperature_c,\n"
                "                         max_current_ma, reason (empty while running), skin_type\n"
                "                         (empty when none), punctures, density_per_cm2 (0 without\n"
                "                         a treated surface), area_cm2, ...\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

typedef struct history_args {
        const char *pen;
        uint64_t since_usec;
        bool have_since;
        uint64_t before_usec;
        bool have_before;
        uint64_t limit;
        bool have_limit;
        bool all;
} history_args;

enum { ARG_PEN = CTL_ARG_VERB, ARG_SINCE, ARG_LIMIT, ARG_BEFORE, ARG_ALL };

static int history_option(int c, const char *arg, void *userdata) {
        history_args *a = userdata;
        uint64_t v;
        switch (c) {
        case ARG_PEN:
                if (arg[0] == '\0')
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "history: --pen needs a serial");
                a->pen = arg;
                return 0;
        case ARG_SINCE:
                if (ctl_parse_time(arg, &a->since_usec) < 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE,
                                        "history: --since '%s' is not a time (YYYY-MM-DD[ HH:MM[:SS]], @SECONDS, -Nd)",
                                        arg);
                a->have_since = true;
                return 0;
        case ARG_BEFORE:
                if (ctl_parse_time(arg, &a->before_usec) < 0 || a->before_usec == 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE,
                                        "history: --before '%s' is not a time (YYYY-MM-DD[ HH:MM[:SS]], @SECONDS, -Nd)",
                                        arg);
                a->have_before = true;
                return 0;
        case ARG_LIMIT:
                if (ctl_parse_unsigned(arg, UINT32_MAX, &v) < 0 || v == 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "history: --limit takes a whole number from 1, not '%s'", arg);
                a->limit = v;
                a->have_limit = true;
                return 0;
        case ARG_ALL:
                a->all = true;
                return 0;
        default:
                return NEEDLECTL_EXIT_USAGE;
        }
}

/* One GetHistory call: sessions of the filter started before before_usec (0: no bound). */
static int history_page(sd_bus *bus, const history_args *a, uint64_t before_usec, uint32_t limit,
                        json_object **ret) {
        _cleanup_bus_message_ sd_bus_message *m = NULL, *reply = NULL;
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        int r = sd_bus_message_new_method_call(bus, &m, ND_BUS_NAME, ND_MANAGER_PATH, ND_MANAGER_INTERFACE,
                                               "GetHistory");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "{sv}");
        if (r >= 0 && a->pen)
                r = sd_bus_message_append(m, "{sv}", "pen", "s", a->pen);
        if (r >= 0 && a->have_since)
                r = sd_bus_message_append(m, "{sv}", "since", "t", a->since_usec);
        if (r >= 0 && before_usec)
                r = sd_bus_message_append(m, "{sv}", "before", "t", before_usec);
        if (r >= 0)
                r = sd_bus_message_append(m, "{sv}", "limit", "u", limit);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return ctl_log_bus_error("cannot ask for the history", NULL, r);
        r = sd_bus_call(bus, m, 0, &error, &reply);
        if (r < 0)
                return ctl_log_bus_error("cannot read the history", &error, r);
        r = ctl_message_read_json(reply, ret);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot read the history: %s", strerror(-r));
        return 0;
}

/* Pages back through the history into *ret until want sessions (0: all) or no more; *ret_more
 * says whether sessions that pass the filters were left out. A page asks for sessions before the
 * last start + 1 µs and skips the ids it already has, so sessions that share a start time at a
 * page's edge are neither lost nor shown twice. */
static int history_collect(sd_bus *bus, const history_args *a, uint64_t want, json_object **ret, bool *ret_more) {
        _cleanup_json_ json_object *all = json_object_new_array();
        uint64_t before = a->have_before ? a->before_usec : 0;
        uint64_t edge_start = 0;
        bool more = false;
        int r;

        if (!all)
                return ctl_oom();
        for (;;) {
                _cleanup_json_ json_object *page = NULL;
                size_t have = json_object_array_length(all);
                uint64_t left = want ? want - have : HISTORY_PAGE_MAX;
                size_t edge_count = 0;
                while (have > 0 && edge_count < have &&
                       (uint64_t) ctl_json_int(json_object_array_get_idx(all, have - 1 - edge_count), "start") == edge_start)
                        edge_count++;
                /* One more than is wanted, to know whether there is more, and the repeats. */
                uint32_t ask = (uint32_t) MIN((uint64_t) HISTORY_PAGE_MAX, left + 1 + edge_count);
                r = history_page(bus, a, before, ask, &page);
                if (r != 0)
                        return r;
                size_t n = json_object_array_length(page), added = 0;
                for (size_t i = 0; i < n; i++) {
                        json_object *s = json_object_array_get_idx(page, i);
                        uint64_t start = (uint64_t) ctl_json_int(s, "start");
                        bool seen = false;
                        /* Only the sessions at the previous page's last start time can repeat. */
                        for (size_t j = have; !seen && j-- > 0;) {
                                json_object *o = json_object_array_get_idx(all, j);
                                if ((uint64_t) ctl_json_int(o, "start") != edge_start)
                                        break;
                                seen = start == edge_start && STREQ(ctl_json_str(o, "id"), ctl_json_str(s, "id"));
                        }
                        if (seen)
                                continue;
                        if (want && json_object_array_length(all) >= want) {
                                more = true;
                                break;
                        }
                        json_object_array_add(all, json_object_get(s));
                        added++;
                }
                if (more || n < ask || added == 0)
                        break;
                json_object *last = json_object_array_get_idx(all, json_object_array_length(all) - 1);
                edge_start = (uint64_t) ctl_json_int(last, "start");
                before = edge_start + 1;
        }
        *ret = TAKE_PTR(all);
        *ret_more = more;
        return 0;
}

/* Calls each() for every session that passes the filters, newest first, one page of history in
 * memory at a time (what export streams). Paged as history_collect: a page asks for sessions
 * before the last start + 1 µs and skips the ids of the previous page's last start time. each()
 * returns 0 or an exit code, which stops the walk and is returned. */
static int history_foreach(sd_bus *bus, const history_args *a, int (*each)(json_object *s, void *userdata),
                           void *userdata) {
        _cleanup_json_ json_object *edge_ids = json_object_new_array(); /* ids seen at edge_start */
        uint64_t before = a->have_before ? a->before_usec : 0, edge_start = 0;
        int r;

        if (!edge_ids)
                return ctl_oom();
        for (;;) {
                _cleanup_json_ json_object *page = NULL;
                size_t edge_n = json_object_array_length(edge_ids);
                const uint32_t ask = HISTORY_PAGE_MAX;
                r = history_page(bus, a, before, ask, &page);
                if (r != 0)
                        return r;
                size_t n = json_object_array_length(page), added = 0;
                for (size_t i = 0; i < n; i++) {
                        json_object *s = json_object_array_get_idx(page, i);
                        bool seen = false;
                        if ((uint64_t) ctl_json_int(s, "start") == edge_start)
                                for (size_t j = 0; !seen && j < edge_n; j++)
                                        seen = STREQ(json_object_get_string(json_object_array_get_idx(edge_ids, j)),
                                                     ctl_json_str(s, "id"));
                        if (seen)
                                continue;
                        r = each(s, userdata);
                        if (r != 0)
                                return r;
                        added++;
                }
                if (n < ask)
                        return 0;
                if (added == 0) /* a whole page at one start time, all seen: never silently stop */
                        return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "more than %u sessions share the start time %" PRIu64
                                        " us: they cannot be paged", HISTORY_PAGE_MAX, edge_start);
                /* The next page: before the last start + 1, skipping the ids at that start (all of
                 * them are in this page, which holds everything from its last start on). */
                edge_start = (uint64_t) ctl_json_int(json_object_array_get_idx(page, n - 1), "start");
                json_object_put(edge_ids);
                edge_ids = json_object_new_array();
                if (!edge_ids)
                        return ctl_oom();
                for (size_t i = n; i-- > 0;) {
                        json_object *s = json_object_array_get_idx(page, i);
                        if ((uint64_t) ctl_json_int(s, "start") != edge_start)
                                break;
                        if (json_object_array_add(edge_ids, json_object_new_string(ctl_json_str(s, "id"))) < 0)
                                return ctl_oom();
                }
                before = edge_start + 1;
        }
}

static const struct option history_options[] = {
        CTL_COMMON_OPTIONS,
        { "pen",    required_argument, NULL, ARG_PEN },
        { "since",  required_argument, NULL, ARG_SINCE },
        { "before", required_argument, NULL, ARG_BEFORE },
        { "limit",  required_argument, NULL, ARG_LIMIT },
        { "all",    no_argument,       NULL, ARG_ALL },
        { NULL, 0, NULL, 0 }
};

const ctl_verb_syntax ctl_syntax_history = {
        .usage = history_usage,
        .options = history_options,
        .handler = history_option,
        .args_size = sizeof(history_args),
};

int verb_history(ctl_invocation *inv) {
        const history_args args = *(const history_args *) inv->args;
        sd_bus *bus = inv->bus;
        int r;

        uint64_t want = args.have_limit ? args.limit : args.all || args.have_since ? 0 : HISTORY_PAGE_MAX;
        _cleanup_json_ json_object *sessions = NULL;
        if (args.all && args.have_limit)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "history: --all and --limit exclude each other");
        bool more = false;
        r = history_collect(bus, &args, want, &sessions, &more);
        if (r != 0)
                return r;
        size_t n = json_object_array_length(sessions);
        if (more)
                fprintf(stderr, "needlectl: showing the newest %zu sessions; there are older ones (--all, --since, "
                        "--before or --limit show them)\n", n);
        if (inv->common.json)
                return ctl_print_json(sessions);

        if (n == 0) {
                printf("No sessions.\n");
                return 0;
        }
        printf("%-19s  %-12s %-24s %-12s %9s %8s %10s %9s %-4s  %-22s %-16s %s\n", "START", "PEN", "PROFILE", "CARTRIDGE",
               "DURATION", "STROKES", "PUNCTURES", "PER-CM2", "SKIN", "END", "LABEL", "ID");
        for (size_t i = 0; i < n; i++) {
                json_object *s = json_object_array_get_idx(sessions, i);
                char when[64];
                const char *reason = ctl_json_str(s, "reason");
                char density[32] = "-";
                if (ctl_json_double(s, "area_cm2") > 0)
                        snprintf(density, sizeof density, "%.0f", ctl_json_double(s, "density_per_cm2"));
                const char *skin = ctl_json_str(s, "skin_type");
                printf("%-19s  %-12s %-24s %-12s %7.1f s %8" PRId64 " %10" PRId64 " %9s %-4s  %-22s %-16s %s\n",
                       ctl_format_time((uint64_t) ctl_json_int(s, "start"), when, sizeof when), ctl_json_str(s, "pen"),
                       ctl_json_str(s, "profile"), ctl_json_str(s, "cartridge"), ctl_json_double(s, "duration_s"),
                       ctl_json_int(s, "strokes"), ctl_json_int(s, "punctures"), density, skin[0] ? skin : "-",
                       ctl_json_int(s, "end") == 0 ? "(running)" : reason,
                       ctl_json_str(s, "label")[0] ? ctl_json_str(s, "label") : "-", ctl_json_str(s, "id"));
        }
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}

/* ---- export -------------------------------------------------------------------------------- */

static void export_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl export --format csv|fhir [--pen SERIAL] [--since TIME]\n"
                "                        [--before TIME] [--system|--session] [--no-ask-password]\n"
                "\n"
                "Writes every treatment session of the ledger that passes the filters to stdout,\n"
                "for spreadsheets and clinic systems (paged like 'history --all'). Needs polkit\n"
                "authorization org.needled1.read-history.\n"
                "--format csv: RFC 4180, oldest first, one header line, then one line a session:\n"
                "id, pen, cartridge, needles, profile, profile_digest, limits_digest, label,\n"
                "owner_uid, start and end (UTC, ISO 8601, µs; end empty while running),\n"
                "duration_s, strokes, max_depth_mm, max_speed_hz, max_temperature_c,\n"
                "max_current_ma, reason.\n"
                "--format fhir: an HL7 FHIR R4 Bundle (JSON, type collection), newest first,\n"
                "written as the pages come: a Procedure per session (status from the end\n"
                "reason, performedPeriod, bodySite from the profile's area, the label as an\n"
                "identifier, digests, skin type and dose as notes) and a Device per pen and\n"
                "cartridge, once each, with name-based urn:uuid fullUrls (docs/export.md).\n"
                "\n"
                "Options:\n"
                "      --format FORMAT    csv or fhir\n"
                "      --pen SERIAL       only this pen's sessions\n"
                "      --since TIME       only sessions started at or after TIME (as history)\n"
                "      --before TIME      only sessions started before TIME\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

enum { ARG_FORMAT = ARG_ALL + 1 };

typedef enum export_format { EXPORT_NONE, EXPORT_CSV, EXPORT_FHIR } export_format;

typedef struct export_args {
        history_args history;   /* first: history_option() takes it */
        export_format format;
} export_args;

static int export_option(int c, const char *arg, void *userdata) {
        export_args *a = userdata;
        if (c == ARG_FORMAT) {
                if (STREQ(arg, "csv"))
                        a->format = EXPORT_CSV;
                else if (STREQ(arg, "fhir"))
                        a->format = EXPORT_FHIR;
                else
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "export: --format '%s' is not known (csv or fhir)", arg);
                return 0;
        }
        if (c == ARG_LIMIT || c == ARG_ALL)
                return NEEDLECTL_EXIT_USAGE;
        return history_option(c, arg, &a->history);
}

/* A CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break. */
static void csv_field(const char *s, bool last) {
        if (strpbrk(s, ",\"\r\n")) {
                putchar('"');
                for (; *s; s++) {
                        if (*s == '"')
                                putchar('"');
                        putchar(*s);
                }
                putchar('"');
        } else
                fputs(s, stdout);
        fputs(last ? "\r\n" : ",", stdout);
}

static const struct option export_options[] = {
        CTL_COMMON_OPTIONS,
        { "format", required_argument, NULL, ARG_FORMAT },
        { "pen",    required_argument, NULL, ARG_PEN },
        { "since",  required_argument, NULL, ARG_SINCE },
        { "before", required_argument, NULL, ARG_BEFORE },
        { NULL, 0, NULL, 0 }
};

static int export_check(ctl_invocation *inv) {
        const export_args *args = inv->args;
        if (args->format == EXPORT_NONE)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "export: --format csv or --format fhir is required");
        return -1;
}

const ctl_verb_syntax ctl_syntax_export = {
        .usage = export_usage,
        .options = export_options,
        .handler = export_option,
        .args_size = sizeof(export_args),
        .check = export_check,
};

static int fhir_each(json_object *s, void *userdata) {
        int r = ctl_fhir_writer_add(userdata, s);
        if (r == -ENOMEM)
                return ctl_oom();
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output: %s", strerror(-r));
        return 0;
}

/* The FHIR Bundle, written as the pages come (newest first): bounded memory at any ledger size. */
static int export_fhir(sd_bus *bus, const history_args *args) {
        ctl_fhir_writer *w = ctl_fhir_writer_new(stdout);
        if (!w)
                return ctl_oom();
        int r = history_foreach(bus, args, fhir_each, w);
        if (r == 0 && ctl_fhir_writer_finish(w) < 0)
                r = ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
        ctl_fhir_writer_free(w);
        return r;
}

int verb_export(ctl_invocation *inv) {
        const export_args *eargs = inv->args;
        const history_args args = eargs->history;
        sd_bus *bus = inv->bus;
        int r;

        if (eargs->format == EXPORT_FHIR)
                return export_fhir(bus, &args);

        _cleanup_json_ json_object *sessions = NULL;
        bool more = false;
        r = history_collect(bus, &args, 0, &sessions, &more);
        if (r != 0)
                return r;

        static const char *const header[] = {
                "id", "pen", "cartridge", "needles", "profile", "profile_digest", "limits_digest", "label",
                "owner_uid", "start", "end", "duration_s", "strokes", "max_depth_mm", "max_speed_hz",
                "max_temperature_c", "max_current_ma", "reason",
        };
        for (size_t i = 0; i < ELEMENTSOF(header); i++)
                csv_field(header[i], i + 1 == ELEMENTSOF(header));
        for (size_t i = json_object_array_length(sessions); i-- > 0;) {
                json_object *s = json_object_array_get_idx(sessions, i);
                char num[64], t1[64], t2[64];
                csv_field(ctl_json_str(s, "id"), false);
                csv_field(ctl_json_str(s, "pen"), false);
                csv_field(ctl_json_str(s, "cartridge"), false);
                snprintf(num, sizeof num, "%" PRId64, ctl_json_int(s, "needles"));
                csv_field(num, false);
                csv_field(ctl_json_str(s, "profile"), false);
                csv_field(ctl_json_str(s, "profile_digest"), false);
                csv_field(ctl_json_str(s, "limits_digest"), false);
                csv_field(ctl_json_str(s, "label"), false);
                snprintf(num, sizeof num, "%" PRId64, ctl_json_int(s, "owner_uid"));
                csv_field(num, false);
                csv_field(ctl_format_iso_utc((uint64_t) ctl_json_int(s, "start"), t1, sizeof t1), false);
                csv_field(ctl_format_iso_utc((uint64_t) ctl_json_int(s, "end"), t2, sizeof t2), false);
                snprintf(num, sizeof num, "%.3f", ctl_json_double(s, "duration_s"));
                csv_field(num, false);
                snprintf(num, sizeof num, "%" PRId64, ctl_json_int(s, "strokes"));
                csv_field(num, false);
                static const char *const maxima[] = { "max_depth_mm", "max_speed_hz", "max_temperature_c",
                                                      "max_current_ma" };
                for (size_t k = 0; k < ELEMENTSOF(maxima); k++) {
                        snprintf(num, sizeof num, "%.3f", ctl_json_double(s, maxima[k]));
                        csv_field(num, false);
                }
                csv_field(ctl_json_str(s, "reason"), true);
        }
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}

/* ---- cartridge ------------------------------------------------------------------------------ */

static void cartridge_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl cartridge ID [--json] [--system|--session]\n"
                "\n"
                "Shows what the daemon's ledger knows of a needle cartridge: its state (fresh\n"
                "when never used, in-use, spent, rejected), when it was first used, its\n"
                "accumulated run time and how many sessions used it.\n"
                "\n"
                "Options:\n"
                "      --json             one JSON object: {id, state, first_used (us since the\n"
                "                         epoch, 0 when never used), runtime_s, sessions,\n"
                "                         needles, ...}\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

static int cartridge_check(ctl_invocation *inv) {
        if (inv->argv[0][0] == '\0')
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "cartridge: the id is empty");
        return -1;
}

const ctl_verb_syntax ctl_syntax_cartridge = { .usage = cartridge_usage, .check = cartridge_check };

int verb_cartridge(ctl_invocation *inv) {
        const char *id = inv->argv[0];
        sd_bus *bus = inv->bus;
        int r;
        _cleanup_json_ json_object *c = NULL;
        _cleanup_free_ char *what = NULL;
        if (asprintf(&what, "cannot look up cartridge %s", id) < 0)
                return ctl_oom();
        r = ctl_call_json(bus, what, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "GetCartridge", &c, "s", id);
        if (r != 0)
                return r;
        if (inv->common.json) {
                json_object_object_add(c, "id", json_object_new_string(id));
                return ctl_print_json(c);
        }
        char when[64];
        int64_t needles = ctl_json_int(c, "needles");
        printf("Cartridge:   %s\n", id);
        printf("State:       %s\n", ctl_json_str(c, "state"));
        if (needles > 0)
                printf("Needles:     %" PRId64 "\n", needles);
        else
                printf("Needles:     -\n");
        printf("First used:  %s\n", ctl_format_time((uint64_t) ctl_json_int(c, "first_used"), when, sizeof when));
        printf("Run time:    %" PRId64 " s\n", ctl_json_int(c, "runtime_s"));
        printf("Sessions:    %" PRId64 "\n", ctl_json_int(c, "sessions"));
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}
