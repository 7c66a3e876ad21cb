/* cmd-pen.c: needlectl's verbs about pens, through org.needled1.Pen: list, status, arm, start,
 * run, pause, resume, stop, set-depth, set-speed, clear-fault.
 *
 * The session owner is the bus connection that called Start, and needled stops a session whose
 * owner leaves the bus. So a treatment driven from the command line needs a needlectl that
 * stays connected: run (or start --wait/--watch), which also heartbeats when the limits ask
 * for it, shows progress, takes pause/resume/depth/speed from keys or standard input, and
 * stops the session on Ctrl-C. */
#include <assert.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "bus-util.h"
#include "needlectl.h"
#include "pen-monitor.h"

/* Heartbeats go out at this fraction of the daemon's timeout: two may be lost or late. */
#define HEARTBEAT_DIVISOR 3
#define HEARTBEAT_MIN_USEC (20 * USEC_PER_MSEC)
/* After asking for Stop, how long to wait for SessionEnded before leaving anyway. */
#define STOP_WAIT_USEC (3 * USEC_PER_SEC)
/* Speed keys in run's screen change the set point by this much. */
#define SPEED_KEY_STEP_HZ 5.0
#define COMMAND_LINE_MAX 256

/* ---- shared --------------------------------------------------------------------------------- */

/* The optional PEN before npos trailing positional arguments, or NULL (the only pen). */
static const char *pen_argument(const ctl_invocation *inv, int npos) {
        return inv->argc > npos ? inv->argv[0] : NULL;
}

static int get_pen_json(sd_bus *bus, const char *path, json_object **ret) {
        json_object *pen = NULL;
        int r = ctl_get_all_properties(bus, path, ND_PEN_INTERFACE, &pen);
        if (r != 0)
                return r;
        json_object_object_add(pen, "path", json_object_new_string(path));
        *ret = pen;
        return 0;
}

/* "what" for messages about a pen: "PEN1: verb". */
static char *pen_what(const char *path, const char *action) {
        _cleanup_free_ char *serial = ctl_pen_serial_from_path(path);
        char *what = NULL;
        if (asprintf(&what, "%s: %s", serial ? serial : path, action) < 0)
                return NULL;
        return what;
}

static int pen_call(sd_bus *bus, const char *path, const char *action, const char *member, const char *types, ...) {
        _cleanup_free_ char *what = pen_what(path, action);
        if (!what)
                return ctl_oom();
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *m = NULL;
        int r = sd_bus_message_new_method_call(bus, &m, ND_BUS_NAME, path, ND_PEN_INTERFACE, member);
        if (r >= 0 && types) {
                va_list ap;
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
        }
        if (r < 0)
                return ctl_log_bus_error(what, NULL, r);
        r = sd_bus_call(bus, m, 0, &error, NULL);
        if (r < 0) {
                int code = ctl_log_bus_error(what, &error, r);
                if (sd_bus_error_has_name(&error, ND_ERROR_PREFIX "NotOwner"))
                        fprintf(stderr, "needlectl: only the program that started the session may do this; "
                                        "use the keys or --commands of 'needlectl run'\n");
                else if (sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_OBJECT) ||
                         sd_bus_error_has_name(&error, ND_ERROR_UNKNOWN_PEN))
                        fprintf(stderr, "needlectl: the pen is gone\n");
                return code;
        }
        return 0;
}

/* ---- list ----------------------------------------------------------------------------------- */

static void list_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl list [--json] [--system|--session]\n"
                "\n"
                "Lists the connected pens: serial, model, state, battery, cartridge, armed profile.\n"
                "\n"
                "Options:\n"
                "      --json             a JSON array with one object per pen, as 'status PEN\n"
                "                         --json' prints it\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

static int get_all_pens(sd_bus *bus, json_object **ret) {
        _cleanup_(ctl_strv_freep) char **pens = NULL;
        int r = ctl_get_pens(bus, &pens);
        if (r != 0)
                return r;
        _cleanup_json_ json_object *array = json_object_new_array();
        if (!array)
                return ctl_oom();
        for (char **p = pens; *p; p++) {
                json_object *pen = NULL;
                r = get_pen_json(bus, *p, &pen);
                if (r == NEEDLECTL_EXIT_NO_PEN)
                        continue; /* left between the two calls */
                if (r != 0)
                        return r;
                json_object_array_add(array, pen);
        }
        *ret = TAKE_PTR(array);
        return 0;
}

const ctl_verb_syntax ctl_syntax_list = { .usage = list_usage };

int verb_list(ctl_invocation *inv) {
        sd_bus *bus = inv->bus;
        int r;
        _cleanup_json_ json_object *pens = NULL;
        r = get_all_pens(bus, &pens);
        if (r != 0)
                return r;
        if (inv->common.json)
                return ctl_print_json(pens);
        size_t n = json_object_array_length(pens);
        if (n == 0) {
                printf("No pens are connected.\n");
                return 0;
        }
        printf("%-16s %-14s %-8s %7s %-18s %s\n", "SERIAL", "MODEL", "STATE", "BATTERY", "CARTRIDGE", "PROFILE");
        for (size_t i = 0; i < n; i++) {
                json_object *p = json_object_array_get_idx(pens, i), *cartridge = NULL, *profile = NULL;
                json_object_object_get_ex(p, "cartridge", &cartridge);
                json_object_object_get_ex(p, "profile", &profile);
                char cart[64];
                if (ctl_json_str(cartridge, "id")[0])
                        snprintf(cart, sizeof cart, "%s (%s)", ctl_json_str(cartridge, "id"), ctl_json_str(cartridge, "state"));
                else
                        snprintf(cart, sizeof cart, "-");
                const char *state = ctl_json_str(p, "state");
                const char *fault = ctl_json_str(p, "fault");
                char state_text[64];
                snprintf(state_text, sizeof state_text, "%s%s%s", state, fault[0] ? ":" : "", fault);
                printf("%-16s %-14s %-8s %6" PRId64 "%% %-18s %s%s\n", ctl_json_str(p, "serial"), ctl_json_str(p, "model"),
                       state_text, ctl_json_int(p, "battery_percent"), cart,
                       ctl_json_str(profile, "name")[0] ? ctl_json_str(profile, "name") : "-",
                       ctl_json_bool(p, "simulated") ? "  [simulated]" : "");
        }
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}

/* ---- status --------------------------------------------------------------------------------- */

static void status_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl status [PEN] [--json] [--system|--session]\n"
                "\n"
                "Without PEN: the daemon (version, features, limits) and every connected pen.\n"
                "With PEN (serial or object path): that pen in detail.\n"
                "\n"
                "Options:\n"
                "      --json             with PEN, one JSON object of the pen's properties with\n"
                "                         snake_case keys (serial, model, firmware_version,\n"
                "                         protocol_version, generation, simulated, state, fault,\n"
                "                         warnings, profile {...}, depth_mm, speed_hz,\n"
                "                         depth_range_mm [min, max], depth_step_mm,\n"
                "                         speed_range_hz [min, max], battery_percent,\n"
                "                         temperature_c, cartridge {id, needles, state,\n"
                "                         runtime_s}, session_id, elapsed_s, strokes,\n"
                "                         punctures, density_per_cm2, skin_type,\n"
                "                         telemetry_rate_hz) plus path; without PEN, {version,\n"
                "                         features, pens [...], limits_path, limits_state,\n"
                "                         limits_error, limits_digest, limits_loaded_at,\n"
                "                         ledger_state, ledger_error}\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

static void print_pen(json_object *p) {
        json_object *profile = NULL, *cartridge = NULL, *warnings = NULL, *range = NULL, *speed_range = NULL;
        json_object_object_get_ex(p, "profile", &profile);
        json_object_object_get_ex(p, "cartridge", &cartridge);
        json_object_object_get_ex(p, "warnings", &warnings);
        json_object_object_get_ex(p, "depth_range_mm", &range);
        json_object_object_get_ex(p, "speed_range_hz", &speed_range);

        printf("%s (%s)\n", ctl_json_str(p, "serial"), ctl_json_str(p, "path"));
        printf("  Model:        %s, firmware %s, protocol %" PRId64 "%s\n", ctl_json_str(p, "model"),
               ctl_json_str(p, "firmware_version"), ctl_json_int(p, "protocol_version"),
               ctl_json_bool(p, "simulated") ? " (simulated)" : "");
        const char *fault = ctl_json_str(p, "fault");
        printf("  State:        %s%s%s\n", ctl_json_str(p, "state"), fault[0] ? ", fault " : "", fault);
        printf("  Warnings:     ");
        size_t nw = json_object_is_type(warnings, json_type_array) ? json_object_array_length(warnings) : 0;
        for (size_t i = 0; i < nw; i++)
                printf("%s%s", i ? ", " : "", json_object_get_string(json_object_array_get_idx(warnings, i)));
        printf("%s\n", nw ? "" : "-");
        if (profile && json_object_object_length(profile) > 0)
                printf("  Profile:      %s (%s, %s): %.2f mm, %.0f Hz, %.0f s, %" PRId64 " needles\n",
                       ctl_json_str(profile, "name"), ctl_json_str(profile, "indication"), ctl_json_str(profile, "area"),
                       ctl_json_double(profile, "depth_mm"), ctl_json_double(profile, "speed_hz"),
                       ctl_json_double(profile, "duration_s"), ctl_json_int(profile, "needles"));
        else
                printf("  Profile:      -\n");
        printf("  Set points:   depth %.2f mm, speed %.1f Hz\n", ctl_json_double(p, "depth_mm"),
               ctl_json_double(p, "speed_hz"));
        if (json_object_is_type(range, json_type_array) && json_object_is_type(speed_range, json_type_array))
                printf("  Capabilities: depth %g to %g mm in %g mm steps, speed %g to %g Hz, telemetry %" PRId64 " Hz\n",
                       json_object_get_double(json_object_array_get_idx(range, 0)),
                       json_object_get_double(json_object_array_get_idx(range, 1)), ctl_json_double(p, "depth_step_mm"),
                       json_object_get_double(json_object_array_get_idx(speed_range, 0)),
                       json_object_get_double(json_object_array_get_idx(speed_range, 1)),
                       ctl_json_int(p, "telemetry_rate_hz"));
        printf("  Battery:      %" PRId64 " %%\n", ctl_json_int(p, "battery_percent"));
        printf("  Temperature:  %.1f C\n", ctl_json_double(p, "temperature_c"));
        if (ctl_json_str(cartridge, "id")[0])
                printf("  Cartridge:    %s, %" PRId64 " needles, %s, %" PRId64 " s used\n", ctl_json_str(cartridge, "id"),
                       ctl_json_int(cartridge, "needles"), ctl_json_str(cartridge, "state"),
                       ctl_json_int(cartridge, "runtime_s"));
        else
                printf("  Cartridge:    none\n");
        const char *session = ctl_json_str(p, "session_id");
        if (session[0]) {
                printf("  Session:      %s, %.1f s elapsed, %" PRId64 " strokes\n", session,
                       ctl_json_double(p, "elapsed_s"), ctl_json_int(p, "strokes"));
                const char *skin = ctl_json_str(p, "skin_type");
                printf("  Dose:         %" PRId64 " punctures, %.0f per cm², skin type %s\n", ctl_json_int(p, "punctures"),
                       ctl_json_double(p, "density_per_cm2"), skin[0] ? skin : "-");
        }
        else
                printf("  Session:      -\n");
        printf("  Generation:   %" PRId64 "\n", ctl_json_int(p, "generation"));
}

const ctl_verb_syntax ctl_syntax_status = { .usage = status_usage };

int verb_status(ctl_invocation *inv) {
        sd_bus *bus = inv->bus;
        int r;

        if (inv->argc > 0) {
                _cleanup_free_ char *path = NULL;
                _cleanup_json_ json_object *pen = NULL;
                r = ctl_resolve_pen(bus, inv->argv[0], &path);
                if (r != 0)
                        return r;
                r = get_pen_json(bus, path, &pen);
                if (r != 0)
                        return r;
                if (inv->common.json)
                        return ctl_print_json(pen);
                print_pen(pen);
                return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
        }

        _cleanup_json_ json_object *manager = NULL, *pens = NULL;
        r = ctl_get_all_properties(bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, &manager);
        if (r != 0)
                return r;
        r = get_all_pens(bus, &pens);
        if (r != 0)
                return r;
        if (inv->common.json) {
                json_object_object_add(manager, "pens", TAKE_PTR(pens));
                return ctl_print_json(manager);
        }
        json_object *features = NULL;
        json_object_object_get_ex(manager, "features", &features);
        printf("needled %s on the %s bus\n", ctl_json_str(manager, "version"), inv->common.user_bus ? "session" : "system");
        printf("  Features:     ");
        for (size_t i = 0; features && i < json_object_array_length(features); i++)
                printf("%s%s", i ? ", " : "", json_object_get_string(json_object_array_get_idx(features, i)));
        printf("\n");
        const char *digest = ctl_json_str(manager, "limits_digest");
        printf("  Limits:       %s, %s%s%s\n", ctl_json_str(manager, "limits_path"), ctl_json_str(manager, "limits_state"),
               digest[0] ? ", sha256 " : "", digest);
        if (ctl_json_str(manager, "limits_error")[0])
                printf("  Limits error: %s\n", ctl_json_str(manager, "limits_error"));
        if (ctl_json_str(manager, "ledger_state")[0])
                printf("  Ledger:       %s%s%s\n", ctl_json_str(manager, "ledger_state"),
                       ctl_json_str(manager, "ledger_error")[0] ? ": " : "", ctl_json_str(manager, "ledger_error"));
        size_t n = json_object_array_length(pens);
        printf("  Pens:         %zu\n", n);
        for (size_t i = 0; i < n; i++) {
                printf("\n");
                print_pen(json_object_array_get_idx(pens, i));
        }
        return fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
}

/* ---- arm ------------------------------------------------------------------------------------ */

static void arm_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl arm [PEN] PROFILE|FILE [--system|--session] [--no-ask-password]\n"
                "\n"
                "Arms a pen with a treatment profile: an installed profile by name (see\n"
                "'needlectl profiles'), or a profile file of your own, sent to the daemon. An\n"
                "argument with a '/' or a '.' in it is a FILE (profile names have neither: use\n"
                "./NAME.yaml for a file in the current directory). The daemon checks it against\n"
                "the limits in force, the pen's range and step and the fitted cartridge, and\n"
                "prints every violation when it refuses. Needs polkit org.needled1.operate.\n"
                "PEN (serial or object path) may be omitted when one pen is connected.\n"
                "\n"
                "Options:\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

static bool is_profile_file(const char *arg) {
        return strchr(arg, '/') || strchr(arg, '.');
}

/* Arms path with an installed profile or a file. Returns 0 or the exit code (printed). */
static int arm_pen(sd_bus *bus, const char *path, const char *profile) {
        if (!is_profile_file(profile)) {
                int r = pen_call(bus, path, "cannot arm", "LoadProfile", "s", profile);
                if (r == NEEDLECTL_EXIT_INVALID)
                        fprintf(stderr, "needlectl: 'needlectl profiles' lists the installed profiles\n");
                return r;
        }
        _cleanup_free_ char *yaml = NULL;
        int r = ctl_read_file(profile, ND_PROFILE_TEXT_MAX, &yaml);
        if (r != 0)
                return r;
        return pen_call(bus, path, "cannot arm", "LoadProfileData", "s", yaml);
}

static int arm_check(ctl_invocation *inv) {
        const char *profile = inv->argv[inv->argc - 1];
        if (profile[0] == '\0')
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "arm: the profile name is empty");
        /* A file that cannot be read fails before anything is asked of the daemon. */
        _cleanup_free_ char *probe = NULL;
        int r;
        if (is_profile_file(profile) && (r = ctl_read_file(profile, ND_PROFILE_TEXT_MAX, &probe)) != 0)
                return r;
        return -1;
}

const ctl_verb_syntax ctl_syntax_arm = { .usage = arm_usage, .check = arm_check };

int verb_arm(ctl_invocation *inv) {
        _cleanup_free_ char *path = NULL;
        int r = ctl_resolve_pen(inv->bus, pen_argument(inv, 1), &path);
        if (r != 0)
                return r;
        return arm_pen(inv->bus, path, inv->argv[inv->argc - 1]);
}

/* ---- simple pen methods --------------------------------------------------------------------- */

typedef struct simple_verb {
        const char *name;
        const char *member;
        const char *action;   /* for messages: "cannot pause" */
        const char *help;
} simple_verb;

static const simple_verb simple_verbs[] = {
        { "pause", "Pause", "cannot pause",
          "Pauses the running session: the motor stops, the session stays open. Only the\n"
          "session's owner (the needlectl run that started it) may pause; from another\n"
          "program the daemon answers NotOwner (exit 6): press p in 'needlectl run --watch',\n"
          "or send 'pause' to 'needlectl run --commands'. Needs polkit org.needled1.operate.\n" },
        { "resume", "Resume", "cannot resume",
          "Resumes a paused session with the current set points. Owner only, as pause.\n" },
        { "clear-fault", "ClearFault", "cannot clear the fault",
          "Returns a pen in fault to idle once the condition is gone (the daemon says\n"
          "which condition persists otherwise). Does nothing when the pen is not in\n"
          "fault. Needs polkit org.needled1.operate.\n" },
};

static const simple_verb *find_simple(const char *name) {
        for (size_t i = 0; i < ELEMENTSOF(simple_verbs); i++)
                if (STREQ(simple_verbs[i].name, name))
                        return &simple_verbs[i];
        assert(!"the verb table names only simple verbs here");
        return &simple_verbs[0];
}

static void simple_usage(FILE *out, const char *name) {
        const simple_verb *sv = find_simple(name);
        fprintf(out, "Usage: needlectl %s [PEN] [--system|--session] [--no-ask-password]\n\n%s\n"
                     "PEN (serial or object path) may be omitted when one pen is connected.\n\n"
                     "Options:\n" CTL_COMMON_HELP "\n" CTL_EXIT_HELP,
                sv->name, sv->help);
}

static void pause_usage(FILE *out) { simple_usage(out, "pause"); }
static void resume_usage(FILE *out) { simple_usage(out, "resume"); }
static void clear_fault_usage(FILE *out) { simple_usage(out, "clear-fault"); }
const ctl_verb_syntax ctl_syntax_pause = { .usage = pause_usage };
const ctl_verb_syntax ctl_syntax_resume = { .usage = resume_usage };
const ctl_verb_syntax ctl_syntax_clear_fault = { .usage = clear_fault_usage };

/* pause, resume, clear-fault: one method without arguments on the pen. */
int verb_simple(ctl_invocation *inv) {
        const simple_verb *sv = find_simple(inv->verb->name);
        _cleanup_free_ char *path = NULL;
        int r = ctl_resolve_pen(inv->bus, pen_argument(inv, 0), &path);
        if (r != 0)
                return r;
        return pen_call(inv->bus, path, sv->action, sv->member, NULL);
}

/* ---- set-depth, set-speed ------------------------------------------------------------------- */

static void setter_usage(FILE *out, const char *name) {
        bool depth = STREQ(name, "set-depth");
        fprintf(out,
                "Usage: needlectl %s [PEN] %s [--system|--session] [--no-ask-password]\n"
                "\n"
                "Changes the %s set point of the running or paused session, in %s. The daemon\n"
                "checks it against the limits of the profile's area and the pen's range%s.\n"
                "Only the session's owner (the needlectl run that started it) may do this; from\n"
                "another program the daemon answers NotOwner (exit 6): use '%s' with\n"
                "'needlectl run --commands'%s. Needs polkit org.needled1.operate.\n"
                "PEN (serial or object path) may be omitted when one pen is connected.\n"
                "\n"
                "Options:\n" CTL_COMMON_HELP "\n" CTL_EXIT_HELP,
                name, depth ? "MM" : "HZ", depth ? "depth" : "speed", depth ? "millimetres" : "Hz",
                depth ? " and step" : "", depth ? "depth MM" : "speed HZ",
                depth ? ", or +/- in 'needlectl run --watch'" : ", or >/< in 'needlectl run --watch'");
}

static void set_depth_usage(FILE *out) { setter_usage(out, "set-depth"); }
static void set_speed_usage(FILE *out) { setter_usage(out, "set-speed"); }

/* The value (the last argument) is a number: checked before anything is asked of the daemon. */
static int setter_check(ctl_invocation *inv) {
        double *value = inv->args;
        if (ctl_parse_double(inv->argv[inv->argc - 1], value) < 0)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "%s: '%s' is not a number", inv->verb->name, inv->argv[inv->argc - 1]);
        return -1;
}

const ctl_verb_syntax ctl_syntax_set_depth = { .usage = set_depth_usage, .args_size = sizeof(double), .check = setter_check };
const ctl_verb_syntax ctl_syntax_set_speed = { .usage = set_speed_usage, .args_size = sizeof(double), .check = setter_check };

/* set-depth, set-speed. */
int verb_setter(ctl_invocation *inv) {
        bool depth = STREQ(inv->verb->name, "set-depth");
        _cleanup_free_ char *path = NULL;
        int r = ctl_resolve_pen(inv->bus, pen_argument(inv, 1), &path);
        if (r != 0)
                return r;
        return pen_call(inv->bus, path, depth ? "cannot set the depth" : "cannot set the speed",
                        depth ? "SetDepth" : "SetSpeed", "d", *(const double *) inv->args);
}

/* ---- stop ----------------------------------------------------------------------------------- */

static void stop_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl stop [PEN | --all] [--system|--session]\n"
                "\n"
                "Stops the motor now and ends the session in progress (reason 'stopped'). Anyone\n"
                "who can reach the daemon may stop any pen: no authorization, no owner check,\n"
                "never refused while the pen is connected, and harmless when nothing runs.\n"
                "PEN (serial or object path) may be omitted when one pen is connected.\n"
                "\n"
                "Options:\n"
                "      --all              stop every connected pen (succeeds with none)\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

enum { ARG_ALL = CTL_ARG_VERB, ARG_LABEL, ARG_WAIT, ARG_WATCH, ARG_PROFILE, ARG_QUIET, ARG_COMMANDS, ARG_INTERVAL,
       ARG_SKIN_TYPE };

static int stop_option(int c, const char *arg, void *userdata) {
        if (c != ARG_ALL)
                return NEEDLECTL_EXIT_USAGE;
        *(bool *) userdata = true;
        return 0;
}

/* With --all, no PEN. */
static int stop_check(ctl_invocation *inv) {
        bool all = *(const bool *) inv->args;
        if (all && inv->argc > 0) {
                fprintf(stderr, "needlectl stop: unexpected argument '%s'\n", inv->argv[0]);
                stop_usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        return -1;
}

static const struct option stop_options[] = {
        CTL_COMMON_OPTIONS,
        { "all", no_argument, NULL, ARG_ALL },
        { NULL, 0, NULL, 0 }
};

const ctl_verb_syntax ctl_syntax_stop = {
        .usage = stop_usage,
        .options = stop_options,
        .handler = stop_option,
        .args_size = sizeof(bool),
        .check = stop_check,
};

int verb_stop(ctl_invocation *inv) {
        bool all = *(const bool *) inv->args;
        sd_bus *bus = inv->bus;
        int r;
        if (!all) {
                _cleanup_free_ char *path = NULL;
                r = ctl_resolve_pen(bus, pen_argument(inv, 0), &path);
                if (r != 0)
                        return r;
                return pen_call(bus, path, "cannot stop", "Stop", NULL);
        }
        _cleanup_(ctl_strv_freep) char **pens = NULL;
        r = ctl_get_pens(bus, &pens);
        if (r != 0)
                return r;
        /* Every pen is asked, whatever happened to the one before: a failure must not leave a
         * later pen running. The first failure decides the exit status. */
        int result = 0;
        for (char **p = pens; *p; p++) {
                r = pen_call(bus, *p, "cannot stop", "Stop", NULL);
                if (r != 0 && result == 0)
                        result = r;
        }
        return result;
}

/* ---- run, start ----------------------------------------------------------------------------- */

typedef struct run_args {
        const char *label;
        const char *skin_type;          /* Fitzpatrick I..VI, or NULL */
        const char *profile;
        bool wait;
        bool watch;
        bool quiet;
        bool commands;
        uint64_t interval_usec;
} run_args;

typedef struct run_ctx {
        sd_event *event;
        sd_bus *bus;
        ctl_monitor *m;
        ctl_view *v;
        const char *path;
        char *session_id;
        bool ended;
        bool stopping;
        int exit_code;
        char *summary;              /* printed after the screen is left */
        uint64_t heartbeat_usec;    /* 0: not required */
        sd_event_source *heartbeat_timer;
        sd_bus_slot *heartbeat_slot;
        sd_event_source *stop_timer;
        sd_event_source *commands_source;
        char command[COMMAND_LINE_MAX];
        size_t command_len;
} run_ctx;

static int exit_code_for_reason(const char *reason) {
        if (STREQ(reason, "completed") || STREQ(reason, "dose-reached"))
                return NEEDLECTL_EXIT_OK;
        if (strncmp(reason, "fault:", strlen("fault:")) == 0)
                return NEEDLECTL_EXIT_FAULT;
        if (STREQ(reason, "device-lost"))
                return NEEDLECTL_EXIT_NO_PEN;
        return NEEDLECTL_EXIT_ENDED;
}

static void run_finish(run_ctx *c, int code, const char *event, const char *text, json_object *extra) {
        if (c->ended)
                return;
        c->ended = true;
        c->exit_code = code;
        free(c->summary);
        c->summary = strdup(text);
        ctl_view_emit(c->v, event, text, extra);
        sd_event_exit(c->event, code);
}

/* Reads the client heartbeat timeout the limits in force ask for (0: none). */
static uint64_t read_heartbeat_usec(sd_bus *bus) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *reply = NULL;
        _cleanup_json_ json_object *limits = NULL;
        if (sd_bus_call_method(bus, ND_BUS_NAME, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "GetLimits",
                               &error, &reply, NULL) < 0 ||
            ctl_message_read_json(reply, &limits) < 0)
                return 0;
        json_object *session = NULL;
        json_object_object_get_ex(limits, "session", &session);
        int64_t ms = ctl_json_int(session, "client_heartbeat_timeout_ms");
        if (ms <= 0)
                return 0;
        return MAX((uint64_t) ms * USEC_PER_MSEC / HEARTBEAT_DIVISOR, HEARTBEAT_MIN_USEC);
}

static int on_heartbeat_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        run_ctx *c = userdata;
        c->heartbeat_slot = sd_bus_slot_unref(c->heartbeat_slot);
        const sd_bus_error *e = sd_bus_message_get_error(reply);
        /* After the session ended the daemon refuses (WrongState): SessionEnded tells the rest. */
        if (e && !c->ended && sd_bus_error_has_name(e, SD_BUS_ERROR_ACCESS_DENIED))
                ctl_view_emit(c->v, "heartbeat-refused", "needled refused the heartbeat: not authorized", NULL);
        return 0;
}

static int on_heartbeat_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        run_ctx *c = userdata;
        if (c->heartbeat_usec == 0 || c->ended)
                return 0;
        if (!c->heartbeat_slot)
                (void) sd_bus_call_method_async(c->bus, &c->heartbeat_slot, ND_BUS_NAME, c->path,
                                                ND_PEN_INTERFACE, "Heartbeat", on_heartbeat_reply, c, NULL);
        (void) sd_event_source_set_time_relative(s, c->heartbeat_usec);
        (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static int setup_heartbeat(run_ctx *c) {
        c->heartbeat_usec = read_heartbeat_usec(c->bus);
        if (c->heartbeat_usec == 0) {
                if (c->heartbeat_timer)
                        (void) sd_event_source_set_enabled(c->heartbeat_timer, SD_EVENT_OFF);
                return 0;
        }
        if (!c->heartbeat_timer)
                return sd_event_add_time_relative(c->event, &c->heartbeat_timer, CLOCK_MONOTONIC, c->heartbeat_usec,
                                                  1, on_heartbeat_timer, c);
        (void) sd_event_source_set_time_relative(c->heartbeat_timer, c->heartbeat_usec);
        return sd_event_source_set_enabled(c->heartbeat_timer, SD_EVENT_ONESHOT);
}

static int on_stop_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        run_ctx *c = userdata;
        run_finish(c, NEEDLECTL_EXIT_ENDED, "session-ended",
                   "Stop was sent; needled did not confirm the session's end in time", NULL);
        return 0;
}

static void run_quit(ctl_view *v, void *userdata) {
        run_ctx *c = userdata;
        /* Stop has been answered already: the motor is stopped, and the stop timer bounds
         * the wait for SessionEnded. (timeout(1) and a terminal both may signal twice.) */
        if (c->stopping)
                return;
        c->stopping = true;
        ctl_view_emit(c->v, "stopping", "Stopping the session", NULL);
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        int r = sd_bus_call_method(c->bus, ND_BUS_NAME, c->path, ND_PEN_INTERFACE, "Stop", &error, NULL, NULL);
        if (r < 0) {
                _cleanup_free_ char *text = NULL;
                int code = ctl_exit_code_for_error(&error, r);
                if (asprintf(&text, "Stop failed: %s (%s)", error.message ? error.message : strerror(-r),
                             error.name ? error.name : "errno") < 0)
                        text = NULL;
                run_finish(c, code, "stop-failed", text ? text : "Stop failed", NULL);
                return;
        }
        (void) sd_event_add_time_relative(c->event, &c->stop_timer, CLOCK_MONOTONIC, STOP_WAIT_USEC, USEC_PER_MSEC,
                                          on_stop_timeout, c);
}

static void run_event(ctl_monitor *m, ctl_monitor_event event, void *userdata) {
        run_ctx *c = userdata;
        _cleanup_free_ char *text = NULL;
        switch (event) {
        case CTL_MONITOR_SESSION_ENDED: {
                if (!c->session_id || !STREQ(strempty(m->ended_session_id), c->session_id))
                        return;
                const char *reason = strempty(m->ended_reason);
                /* The ledger's figures (SessionRecorded) when the daemon sent them; else the last
                 * announced properties (a daemon without SessionRecorded). */
                bool recorded = STREQ(strempty(m->recorded_session_id), c->session_id);
                double elapsed_s = recorded ? m->recorded_duration_s : ctl_json_double(m->props, "elapsed_s");
                int64_t strokes = recorded ? (int64_t) m->recorded_strokes : ctl_json_int(m->props, "strokes");
                int64_t punctures = recorded ? (int64_t) m->recorded_punctures : ctl_json_int(m->props, "punctures");
                double density_per_cm2 = recorded ? m->recorded_density_per_cm2
                                                  : ctl_json_double(m->props, "density_per_cm2");
                json_object *extra = json_object_new_object();
                if (extra) {
                        json_object_object_add(extra, "session_id", json_object_new_string(c->session_id));
                        json_object_object_add(extra, "reason", json_object_new_string(reason));
                        json_object_object_add(extra, "elapsed_s", json_object_new_double(elapsed_s));
                        json_object_object_add(extra, "strokes", json_object_new_int64(strokes));
                        json_object_object_add(extra, "punctures", json_object_new_int64(punctures));
                        json_object_object_add(extra, "density_per_cm2", json_object_new_double(density_per_cm2));
                }
                if (asprintf(&text, "Session %s ended: %s (%.1f s, %" PRId64 " strokes, %" PRId64 " punctures, %.0f/cm²)",
                             c->session_id, reason, elapsed_s, strokes, punctures, density_per_cm2) < 0)
                        text = NULL;
                run_finish(c, exit_code_for_reason(reason), "session-ended", text ? text : reason, extra);
                return;
        }
        case CTL_MONITOR_PEN_GONE:
                run_finish(c, NEEDLECTL_EXIT_NO_PEN, "pen-gone", "The pen left; the session is over (device-lost)", NULL);
                return;
        case CTL_MONITOR_DAEMON_GONE:
                run_finish(c, NEEDLECTL_EXIT_NO_DAEMON, "daemon-gone",
                           "needled left the bus; the session is over (the ledger records it as daemon-restart)", NULL);
                return;
        case CTL_MONITOR_LIMITS_CHANGED:
                (void) setup_heartbeat(c);
                return;
        default:
                return;
        }
}

/* A control from a key or a command line; prints what went wrong. */
static void run_control(run_ctx *c, const char *member, const char *types, double value) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        int r = types ? sd_bus_call_method(c->bus, ND_BUS_NAME, c->path, ND_PEN_INTERFACE, member, &error, NULL,
                                           types, value)
                      : sd_bus_call_method(c->bus, ND_BUS_NAME, c->path, ND_PEN_INTERFACE, member, &error, NULL,
                                           NULL);
        _cleanup_free_ char *text = NULL;
        if (r < 0) {
                if (asprintf(&text, "%s refused: %s (%s)", member, error.message ? error.message : strerror(-r),
                             error.name ? error.name : "errno") >= 0)
                        ctl_view_emit(c->v, "refused", text, NULL);
                return;
        }
        if (types && asprintf(&text, "%s %g: done", member, value) >= 0)
                ctl_view_emit(c->v, "done", text, NULL);
        else if (!types && asprintf(&text, "%s: done", member) >= 0)
                ctl_view_emit(c->v, "done", text, NULL);
}

static bool run_key(ctl_view *v, char key, void *userdata) {
        run_ctx *c = userdata;
        json_object *p = c->m->props;
        double step = ctl_json_double(p, "depth_step_mm");
        switch (key) {
        case 'p': case ' ':
                run_control(c, STREQ(ctl_json_str(p, "state"), "paused") ? "Resume" : "Pause", NULL, 0);
                return true;
        case '+': case '=':
                run_control(c, "SetDepth", "d", ctl_json_double(p, "depth_mm") + (isfinite(step) ? step : 0.05));
                return true;
        case '-':
                run_control(c, "SetDepth", "d", ctl_json_double(p, "depth_mm") - (isfinite(step) ? step : 0.05));
                return true;
        case '>': case '.':
                run_control(c, "SetSpeed", "d", ctl_json_double(p, "speed_hz") + SPEED_KEY_STEP_HZ);
                return true;
        case '<': case ',':
                run_control(c, "SetSpeed", "d", ctl_json_double(p, "speed_hz") - SPEED_KEY_STEP_HZ);
                return true;
        default:
                return false;
        }
}

static void run_command(run_ctx *c, char *line) {
        char *argv[3] = { NULL };
        int n = 0;
        for (char *save = NULL, *tok = strtok_r(line, " \t\r", &save); tok && n < 3; tok = strtok_r(NULL, " \t\r", &save))
                argv[n++] = tok;
        if (n == 0)
                return;
        double value;
        if (n == 1 && STREQ(argv[0], "pause"))
                run_control(c, "Pause", NULL, 0);
        else if (n == 1 && STREQ(argv[0], "resume"))
                run_control(c, "Resume", NULL, 0);
        else if (n == 1 && STREQ(argv[0], "stop"))
                run_quit(c->v, c);
        else if (n == 2 && STREQ(argv[0], "depth") && ctl_parse_double(argv[1], &value) == 0)
                run_control(c, "SetDepth", "d", value);
        else if (n == 2 && STREQ(argv[0], "speed") && ctl_parse_double(argv[1], &value) == 0)
                run_control(c, "SetSpeed", "d", value);
        else
                ctl_view_emit(c->v, "bad-command",
                              "Unknown command; commands: pause, resume, depth MM, speed HZ, stop", NULL);
}

static int on_commands(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        run_ctx *c = userdata;
        char buf[COMMAND_LINE_MAX];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (n <= 0) {
                /* End of the commands: the session goes on until it ends or is stopped. */
                c->commands_source = sd_event_source_disable_unref(c->commands_source);
                return 0;
        }
        for (ssize_t i = 0; i < n && !c->ended; i++) {
                if (buf[i] == '\n') {
                        c->command[c->command_len] = '\0';
                        run_command(c, c->command);
                        c->command_len = 0;
                } else if (c->command_len < sizeof c->command - 1) {
                        c->command[c->command_len++] = buf[i];
                }
        }
        return 0;
}

static void run_ctx_done(run_ctx *c) {
        sd_event_source_disable_unref(c->heartbeat_timer);
        sd_event_source_disable_unref(c->stop_timer);
        sd_event_source_disable_unref(c->commands_source);
        sd_bus_slot_unref(c->heartbeat_slot);
        free(c->session_id);
        free(c->summary);
}

static int start_session(sd_bus *bus, const char *path, const char *label, const char *skin_type, char **ret_id) {
        _cleanup_free_ char *what = pen_what(path, "cannot start");
        if (!what)
                return ctl_oom();
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *m = NULL, *reply = NULL;
        int r = sd_bus_message_new_method_call(bus, &m, ND_BUS_NAME, path, ND_PEN_INTERFACE, "Start");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "{sv}");
        if (r >= 0 && label)
                r = sd_bus_message_append(m, "{sv}", "label", "s", label);
        if (r >= 0 && skin_type)
                r = sd_bus_message_append(m, "{sv}", "skin_type", "s", skin_type);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return ctl_log_bus_error(what, NULL, r);
        r = sd_bus_call(bus, m, 0, &error, &reply);
        if (r < 0) {
                int code = ctl_log_bus_error(what, &error, r);
                if (sd_bus_error_has_name(&error, ND_ERROR_PREFIX "WrongState"))
                        fprintf(stderr, "needlectl: arm a profile first ('needlectl arm', or 'needlectl run --profile')\n");
                return code;
        }
        const char *id;
        r = sd_bus_message_read(reply, "s", &id);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot read the session id: %s", strerror(-r));
        *ret_id = strdup(id);
        return *ret_id ? 0 : ctl_oom();
}

/* Starts (after arming, with a profile) and stays attached until the session ends. */
static int run_session(sd_bus *bus, const ctl_common *common, const char *pen, const run_args *args,
                       const char *title) {
        _cleanup_free_ char *path = NULL;
        int r = ctl_resolve_pen(bus, pen, &path);
        if (r != 0)
                return r;
        _cleanup_(sd_event_unrefp) sd_event *event = NULL;
        r = sd_event_default(&event);
        if (r >= 0)
                r = sd_bus_attach_event(bus, event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot set up the event loop: %s", strerror(-r));

        ctl_view_mode mode = args->quiet ? CTL_VIEW_QUIET
                           : args->watch ? ctl_view_pick_mode(common->json)
                           : common->json ? CTL_VIEW_JSON : CTL_VIEW_LINES;
        if (args->profile) {
                r = arm_pen(bus, path, args->profile);
                if (r != 0)
                        return r;
        }
        /* The monitor subscribes before Start: the session's end cannot be missed. */
        _cleanup_(ctl_monitor_freep) ctl_monitor *m = NULL;
        r = ctl_monitor_new(event, bus, path, mode != CTL_VIEW_QUIET, &m);
        if (r != 0)
                return r;

        run_ctx c = { .event = event, .bus = bus, .m = m, .path = path };
        _cleanup_(ctl_view_freep) ctl_view *v = NULL;
        r = ctl_view_new(m, mode, args->interval_usec, title, &v);
        if (r < 0) {
                run_ctx_done(&c);
                return ctl_oom();
        }
        c.v = v;
        ctl_view_set_quit(v, run_quit, &c);
        ctl_view_chain_events(v, run_event, &c);
        ctl_view_set_keys(v, run_key, &c,
                          "q or Ctrl-C: stop the session and quit   p: pause/resume   +/-: depth   >/<: speed");

        r = start_session(bus, path, args->label, args->skin_type, &c.session_id);
        if (r != 0) {
                run_ctx_done(&c);
                return r;
        }
        if (setup_heartbeat(&c) < 0) {
                /* Without heartbeats a session that needs them would stop: do not run it. */
                (void) sd_bus_call_method(bus, ND_BUS_NAME, path, ND_PEN_INTERFACE, "Stop", NULL, NULL, NULL);
                run_ctx_done(&c);
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot schedule heartbeats; the session was stopped");
        }
        if (args->commands) {
                r = sd_event_add_io(event, &c.commands_source, STDIN_FILENO, EPOLLIN, on_commands, &c);
                if (r < 0) {
                        (void) sd_bus_call_method(bus, ND_BUS_NAME, path, ND_PEN_INTERFACE, "Stop", NULL, NULL,
                                                  NULL);
                        run_ctx_done(&c);
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "--commands: cannot read standard input: %s", strerror(-r));
                }
        }

        _cleanup_free_ char *started = NULL;
        json_object *extra = json_object_new_object();
        if (extra) {
                json_object_object_add(extra, "session_id", json_object_new_string(c.session_id));
                json_object_object_add(extra, "heartbeat_ms", json_object_new_int64((int64_t) (c.heartbeat_usec / USEC_PER_MSEC)));
                json_object_object_add(extra, "skin_type", json_object_new_string(strempty(args->skin_type)));
        }
        if (asprintf(&started, "Session %s started on %s%s%s%s. It lasts while needlectl runs: Ctrl-C stops it.",
                     c.session_id, m->serial, args->skin_type ? ", skin type " : "", strempty(args->skin_type),
                     c.heartbeat_usec ? " (heartbeats on)" : "") < 0)
                started = NULL;
        ctl_view_emit(v, "session-started", started ? started : c.session_id, extra);

        r = ctl_view_start(v);
        if (r < 0) {
                ctl_view_stop(v);
                (void) sd_bus_call_method(bus, ND_BUS_NAME, path, ND_PEN_INTERFACE, "Stop", NULL, NULL, NULL);
                run_ctx_done(&c);
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot start the view; the session was stopped: %s", strerror(-r));
        }
        r = sd_event_loop(event);
        ctl_view_stop(v);
        if (mode == CTL_VIEW_SCREEN && c.summary)
                printf("%s\n", c.summary);
        int code = r < 0 ? ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "the event loop failed: %s", strerror(-r)) : c.exit_code;
        run_ctx_done(&c);
        return code;
}

static int run_option(int c, const char *arg, void *userdata) {
        run_args *a = userdata;
        double s;
        switch (c) {
        case ARG_LABEL: a->label = arg; return 0;
        case ARG_SKIN_TYPE: a->skin_type = arg; return 0;
        case ARG_PROFILE:
                if (arg[0] == '\0')
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "--profile needs a profile name or file");
                a->profile = arg;
                return 0;
        case ARG_WAIT: a->wait = true; return 0;
        case ARG_WATCH: a->watch = true; a->wait = true; return 0;
        case ARG_QUIET: a->quiet = true; return 0;
        case ARG_COMMANDS: a->commands = true; return 0;
        case ARG_INTERVAL:
                if (ctl_parse_double(arg, &s) < 0 || s < 0.05 || s > 3600)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "--interval takes 0.05 to 3600 seconds, not '%s'", arg);
                a->interval_usec = (uint64_t) llround(s * (double) USEC_PER_SEC);
                return 0;
        default: return NEEDLECTL_EXIT_USAGE;
        }
}

#define RUN_OPTIONS_HELP                                                                                 \
        "      --label L          an opaque reference for the ledger (e.g. an appointment id;\n"         \
        "                         never patient data), at most 128 bytes\n"                              \
        "      --skin-type T      the patient's Fitzpatrick skin type, I to VI: needled refuses a\n"    \
        "                         profile not meant for it or deeper than its cap in the limits,\n"     \
        "                         and caps depth changes (required when the limits say\n"              \
        "                         require_skin_type: true)\n"                                          \
        "      --watch            show the live view of 'needlectl watch' (on a terminal) with\n"        \
        "                         keys: q or Ctrl-C stop the session, p pause/resume, +/- depth\n"       \
        "                         by one pen step, >/< speed by 5 Hz\n"                                  \
        "      --quiet            print only the session's start and end\n"                              \
        "      --interval S       seconds between progress lines (default 1)\n"                          \
        "      --commands         read controls from standard input, one per line: pause,\n"             \
        "                         resume, depth MM, speed HZ, stop\n"                                    \
        "      --json             JSON lines: progress objects as 'watch --json' prints them,\n"          \
        "                         and events {time, event, pen, message, ...}: session-started\n"       \
        "                         (session_id, heartbeat_ms, skin_type), session-ended (session_id,\n"  \
        "                         reason, elapsed_s, strokes, punctures, density_per_cm2),\n"          \
        "                         stopping, done, refused, pen-gone, ...\n"

static void run_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl run [PEN] [--profile PROFILE|FILE] [--label L] [--skin-type T]\n"
                "                     [--watch|--quiet]\n"
                "                     [--commands] [--json] [--system|--session] [--no-ask-password]\n"
                "\n"
                "Runs a treatment session and stays with it: arms the pen with --profile (an\n"
                "installed profile's name, or a FILE: anything with a '/' or '.'), or uses the\n"
                "profile already armed; starts it; then shows progress, one line a second (or the\n"
                "live view with --watch), until the session ends. needlectl is the session's\n"
                "owner: needled stops the session when its owner leaves the bus, so the session\n"
                "lasts exactly as long as this command. Ctrl-C, SIGTERM or q stop the session\n"
                "(Stop) and wait, at most 3 s, for its end. When the limits set\n"
                "client_heartbeat_timeout_ms, run sends Heartbeat at a third of that period.\n"
                "PEN (serial or object path) may be omitted when one pen is connected.\n"
                "Needs polkit org.needled1.operate.\n"
                "\n"
                "Options:\n"
                "      --profile P        arm P first (installed name or FILE)\n"
                RUN_OPTIONS_HELP
                CTL_COMMON_HELP "\n"
                "Exit status: 0 when the session completed (or reached its dose: dose-reached); 7\n"
                "when a fault ended it; 5 when the\n"
                "pen left; 12 when it ended otherwise (stopped, Ctrl-C, client-heartbeat-lost,\n"
                "limits-changed); and the codes below when it could not start.\n" CTL_EXIT_HELP);
}

static void run_args_init(void *userdata) {
        *(run_args *) userdata = (run_args) { .interval_usec = USEC_PER_SEC };
}

static int run_check(ctl_invocation *inv) {
        const run_args *args = inv->args;
        if (args->watch && args->quiet)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "run: --watch and --quiet exclude each other");
        /* A profile file that cannot be read fails before anything is asked of the daemon. */
        _cleanup_free_ char *probe = NULL;
        int r;
        if (args->profile && is_profile_file(args->profile) &&
            (r = ctl_read_file(args->profile, ND_PROFILE_TEXT_MAX, &probe)) != 0)
                return r;
        return -1;
}

static const struct option run_options[] = {
        CTL_COMMON_OPTIONS,
        { "label",    required_argument, NULL, ARG_LABEL },
        { "skin-type", required_argument, NULL, ARG_SKIN_TYPE },
        { "profile",  required_argument, NULL, ARG_PROFILE },
        { "watch",    no_argument,       NULL, ARG_WATCH },
        { "quiet",    no_argument,       NULL, ARG_QUIET },
        { "commands", no_argument,       NULL, ARG_COMMANDS },
        { "interval", required_argument, NULL, ARG_INTERVAL },
        { NULL, 0, NULL, 0 }
};

const ctl_verb_syntax ctl_syntax_run = {
        .usage = run_usage,
        .options = run_options,
        .handler = run_option,
        .args_size = sizeof(run_args),
        .args_init = run_args_init,
        .check = run_check,
};

int verb_run(ctl_invocation *inv) {
        return run_session(inv->bus, &inv->common, pen_argument(inv, 0), inv->args, "run");
}

static void start_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl start [PEN] [--label L] [--skin-type T] [--wait|--watch] [--json]\n"
                "                       [--system|--session] [--no-ask-password]\n"
                "\n"
                "Starts the session of the armed profile (see 'needlectl arm') and prints its id.\n"
                "\n"
                "The program that calls Start owns the session, and needled stops a session whose\n"
                "owner leaves the bus (reason client-vanished). Without --wait or --watch, start\n"
                "therefore returns at once and the session ends with it: that is only useful to\n"
                "check that a start is accepted. To treat, use --wait or --watch, which stay\n"
                "attached exactly as 'needlectl run' does (see its help for keys, --commands and\n"
                "heartbeats), or 'needlectl run --profile P', which also arms.\n"
                "PEN (serial or object path) may be omitted when one pen is connected.\n"
                "Needs polkit org.needled1.operate.\n"
                "\n"
                "Options:\n"
                "      --wait             stay attached, one progress line a second, until the\n"
                "                         session ends (Ctrl-C stops it)\n"
                RUN_OPTIONS_HELP
                "                         Without --wait: {session_id}\n"
                CTL_COMMON_HELP "\n"
                "With --wait/--watch the exit status is that of 'needlectl run'.\n" CTL_EXIT_HELP);
}

static int start_check(ctl_invocation *inv) {
        const run_args *args = inv->args;
        if (args->watch && args->quiet)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "start: --watch and --quiet exclude each other");
        if ((args->quiet || args->commands) && !args->wait)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "start: --quiet and --commands need --wait or --watch");
        return -1;
}

static const struct option start_options[] = {
        CTL_COMMON_OPTIONS,
        { "label",    required_argument, NULL, ARG_LABEL },
        { "skin-type", required_argument, NULL, ARG_SKIN_TYPE },
        { "wait",     no_argument,       NULL, ARG_WAIT },
        { "watch",    no_argument,       NULL, ARG_WATCH },
        { "quiet",    no_argument,       NULL, ARG_QUIET },
        { "commands", no_argument,       NULL, ARG_COMMANDS },
        { "interval", required_argument, NULL, ARG_INTERVAL },
        { NULL, 0, NULL, 0 }
};

const ctl_verb_syntax ctl_syntax_start = {
        .usage = start_usage,
        .options = start_options,
        .handler = run_option,
        .args_size = sizeof(run_args),
        .args_init = run_args_init,
        .check = start_check,
};

int verb_start(ctl_invocation *inv) {
        const run_args *args = inv->args;
        const char *pen = pen_argument(inv, 0);
        sd_bus *bus = inv->bus;
        if (args->wait)
                return run_session(bus, &inv->common, pen, args, "start");

        _cleanup_free_ char *path = NULL, *id = NULL;
        int r = ctl_resolve_pen(bus, pen, &path);
        if (r != 0)
                return r;
        r = start_session(bus, path, args->label, args->skin_type, &id);
        if (r != 0)
                return r;
        if (inv->common.json) {
                _cleanup_json_ json_object *o = json_object_new_object();
                if (!o)
                        return ctl_oom();
                json_object_object_add(o, "session_id", json_object_new_string(id));
                r = ctl_print_json(o);
        } else {
                printf("%s\n", id);
                r = fflush(stdout) == 0 ? 0 : ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output");
        }
        fprintf(stderr, "needlectl: note: session %s ends now, as needlectl exits: needled stops a session when the\n"
                        "needlectl: program that started it leaves the bus (client-vanished). To treat, use\n"
                        "needlectl: 'needlectl start --wait', '--watch', or 'needlectl run'.\n", id);
        return r;
}
