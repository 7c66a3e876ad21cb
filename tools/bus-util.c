/* bus-util.c: the connection to needled, pens by name, replies as JSON, errors as exit codes. */
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <time.h>

#include "bus-util.h"
#include "needlectl.h"

/* D-Bus's own default; long enough for a polkit check, short enough that a wedged daemon is
 * reported rather than waited on for ever. */
#define CALL_TIMEOUT_USEC (25 * USEC_PER_SEC)
/* With an authentication agent a person may be typing a password. */
#define CALL_TIMEOUT_INTERACTIVE_USEC (120 * USEC_PER_SEC)

bool ctl_common_parse(ctl_common *common, int c) {
        switch (c) {
        case CTL_ARG_SYSTEM: common->user_bus = false; return true;
        case CTL_ARG_SESSION: common->user_bus = true; return true;
        case CTL_ARG_JSON: common->json = true; return true;
        case CTL_ARG_NO_ASK_PASSWORD: common->no_ask_password = true; return true;
        default: return false;
        }
}

void ctl_bad_option(const char *verb, int argc, char *argv[]) {
        const char *opt = optind > 0 && optind <= argc ? argv[optind - 1] : "?";
        if (optopt != 0 && optopt < CTL_ARG_SYSTEM && isprint(optopt) && opt[0] == '-' && opt[1] != '-')
                fprintf(stderr, "needlectl %s: unknown option or missing argument: '-%c'\n", verb, optopt);
        else
                fprintf(stderr, "needlectl %s: unknown option or missing argument: '%s'\n", verb, opt);
        fprintf(stderr, "Run 'needlectl %s --help' for its options.\n", verb);
}

int ctl_fail(int code, const char *format, ...) {
        va_list ap;
        va_start(ap, format);
        fputs("needlectl: ", stderr);
        vfprintf(stderr, format, ap);
        fputc('\n', stderr);
        va_end(ap);
        return code;
}

int ctl_oom(void) {
        return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "out of memory");
}

int ctl_connect(const ctl_common *common, sd_bus **ret) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = NULL;
        const char *which = common->user_bus ? "session" : "system";
        int r = common->user_bus ? sd_bus_open_user(&bus) : sd_bus_open_system(&bus);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_NO_DAEMON, "cannot connect to the %s bus: %s%s", which, strerror(-r),
                                common->user_bus && r == -ENOMEDIUM ? " (no DBUS_SESSION_BUS_ADDRESS)" : "");
        bool interactive = !common->no_ask_password && !common->user_bus && isatty(STDIN_FILENO);
        (void) sd_bus_set_allow_interactive_authorization(bus, interactive);
        (void) sd_bus_set_method_call_timeout(bus, interactive ? CALL_TIMEOUT_INTERACTIVE_USEC : CALL_TIMEOUT_USEC);
        /* sd_bus_open_* connect lazily; fail here, with the bus named, not at the first call. */
        r = sd_bus_get_unique_name(bus, &(const char *) { NULL });
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_NO_DAEMON, "cannot connect to the %s bus: %s", which, strerror(-r));
        *ret = TAKE_PTR(bus);
        return 0;
}

typedef struct error_code {
        const char *name;
        int code;
} error_code;

static const error_code error_codes[] = {
        { ND_ERROR_INVALID_PROFILE,      NEEDLECTL_EXIT_INVALID },
        { ND_ERROR_INVALID_LIMITS,       NEEDLECTL_EXIT_INVALID },
        { ND_ERROR_LIMIT_EXCEEDED,       NEEDLECTL_EXIT_INVALID },
        { ND_ERROR_UNKNOWN_PROFILE,      NEEDLECTL_EXIT_INVALID },
        { ND_ERROR_LIMITS_UNAVAILABLE,   NEEDLECTL_EXIT_NO_LIMITS },
        { ND_ERROR_WRONG_STATE,          NEEDLECTL_EXIT_WRONG_STATE },
        { ND_ERROR_NOT_OWNER,            NEEDLECTL_EXIT_WRONG_STATE },
        { ND_ERROR_NO_CARTRIDGE,         NEEDLECTL_EXIT_CARTRIDGE },
        { ND_ERROR_CARTRIDGE_SPENT,      NEEDLECTL_EXIT_CARTRIDGE },
        { ND_ERROR_LOW_BATTERY,          NEEDLECTL_EXIT_LOW_BATTERY },
        { ND_ERROR_FAULT,                NEEDLECTL_EXIT_FAULT },
        { ND_ERROR_DEVICE_GONE,          NEEDLECTL_EXIT_NO_PEN },
        { ND_ERROR_STORAGE,              NEEDLECTL_EXIT_STORAGE },
        { SD_BUS_ERROR_ACCESS_DENIED,                 NEEDLECTL_EXIT_NOT_AUTHORIZED },
        { SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED, NEEDLECTL_EXIT_NOT_AUTHORIZED },
        { SD_BUS_ERROR_SERVICE_UNKNOWN,               NEEDLECTL_EXIT_NO_DAEMON },
        { SD_BUS_ERROR_NAME_HAS_NO_OWNER,             NEEDLECTL_EXIT_NO_DAEMON },
        { SD_BUS_ERROR_NO_REPLY,                      NEEDLECTL_EXIT_NO_DAEMON },
        { SD_BUS_ERROR_TIMEOUT,                       NEEDLECTL_EXIT_NO_DAEMON },
        { SD_BUS_ERROR_DISCONNECTED,                  NEEDLECTL_EXIT_NO_DAEMON },
        { SD_BUS_ERROR_NO_SERVER,                     NEEDLECTL_EXIT_NO_DAEMON },
        { SD_BUS_ERROR_UNKNOWN_OBJECT,                NEEDLECTL_EXIT_NO_PEN },
        { ND_ERROR_UNKNOWN_PEN,                      NEEDLECTL_EXIT_NO_PEN },
        { SD_BUS_ERROR_NO_MEMORY,                     NEEDLECTL_EXIT_SOFTWARE },
};

int ctl_exit_code_for_error(const sd_bus_error *error, int r) {
        if (error && sd_bus_error_is_set(error)) {
                for (size_t i = 0; i < ELEMENTSOF(error_codes); i++)
                        if (sd_bus_error_has_name(error, error_codes[i].name))
                                return error_codes[i].code;
                /* Any other refusal, including error names of a later API version. */
                return NEEDLECTL_EXIT_INVALID;
        }
        switch (r) {
        case -ENOMEM: return NEEDLECTL_EXIT_SOFTWARE;
        case -ETIMEDOUT: case -ECONNRESET: case -ENOTCONN: case -ECONNREFUSED: case -ENOENT:
                return NEEDLECTL_EXIT_NO_DAEMON;
        case -EBADMSG: case -ENXIO: case -EPROTO: return NEEDLECTL_EXIT_SOFTWARE;
        default: return NEEDLECTL_EXIT_INVALID;
        }
}

int ctl_log_bus_error(const char *what, const sd_bus_error *error, int r) {
        int code = ctl_exit_code_for_error(error, r);
        if (error && sd_bus_error_is_set(error)) {
                const char *hint = "";
                if (code == NEEDLECTL_EXIT_NO_DAEMON && !sd_bus_error_has_name(error, SD_BUS_ERROR_NO_REPLY) &&
                    !sd_bus_error_has_name(error, SD_BUS_ERROR_TIMEOUT))
                        hint = "\nneedlectl: is needled running? (needled on the system bus; --session for a development daemon)";
                else if (sd_bus_error_has_name(error, SD_BUS_ERROR_NO_REPLY) ||
                         sd_bus_error_has_name(error, SD_BUS_ERROR_TIMEOUT))
                        hint = "\nneedlectl: needled did not answer in time";
                else if (sd_bus_error_has_name(error, SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED))
                        hint = "\nneedlectl: this needs authentication; run it in a session with a polkit agent";
                fprintf(stderr, "needlectl: %s: %s (%s)%s\n", what, strempty(error->message), error->name, hint);
        } else if (r == -ETIMEDOUT) {
                fprintf(stderr, "needlectl: %s: needled did not answer in time\n", what);
        } else {
                fprintf(stderr, "needlectl: %s: %s\n", what, strerror(-r));
        }
        return code;
}

void ctl_strv_free(char **l) {
        if (!l)
                return;
        for (char **s = l; *s; s++)
                free(*s);
        free(l);
}

int ctl_get_pens(sd_bus *bus, char ***ret) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_(ctl_strv_freep) char **pens = NULL;
        int r = sd_bus_get_property_strv(bus, ND_BUS_NAME, ND_MANAGER_PATH, ND_MANAGER_INTERFACE,
                                         "Pens", &error, &pens);
        if (r < 0)
                return ctl_log_bus_error("cannot list the pens", &error, r);
        if (!pens) {
                pens = calloc(1, sizeof *pens);
                if (!pens)
                        return ctl_oom();
        }
        *ret = TAKE_PTR(pens);
        return 0;
}

char *ctl_pen_serial_from_path(const char *path) {
        char *serial = NULL;
        if (sd_bus_path_decode(path, ND_PEN_PATH_PREFIX, &serial) <= 0)
                return NULL;
        return serial;
}

int ctl_resolve_pen(sd_bus *bus, const char *name, char **ret_path) {
        _cleanup_(ctl_strv_freep) char **pens = NULL;
        int r = ctl_get_pens(bus, &pens);
        if (r != 0)
                return r;
        size_t n = 0;
        while (pens[n])
                n++;

        if (!name) {
                if (n == 0)
                        return ctl_fail(NEEDLECTL_EXIT_NO_PEN, "no pen is connected");
                if (n > 1) {
                        fprintf(stderr, "needlectl: %zu pens are connected; name one by serial or path:", n);
                        for (size_t i = 0; i < n; i++) {
                                _cleanup_free_ char *serial = ctl_pen_serial_from_path(pens[i]);
                                fprintf(stderr, " %s", serial ? serial : pens[i]);
                        }
                        fputc('\n', stderr);
                        return NEEDLECTL_EXIT_USAGE;
                }
                *ret_path = strdup(pens[0]);
                return *ret_path ? 0 : ctl_oom();
        }

        _cleanup_free_ char *path = NULL;
        if (name[0] == '/') {
                if (!sd_bus_object_path_is_valid(name))
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "'%s' is not a D-Bus object path", name);
                path = strdup(name);
        } else if (name[0] == '\0') {
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "the pen's serial is empty");
        } else if (sd_bus_path_encode(ND_PEN_PATH_PREFIX, name, &path) < 0) {
                return ctl_oom();
        }
        if (!path)
                return ctl_oom();
        for (size_t i = 0; i < n; i++)
                if (STREQ(pens[i], path)) {
                        *ret_path = TAKE_PTR(path);
                        return 0;
                }
        if (n == 0)
                return ctl_fail(NEEDLECTL_EXIT_NO_PEN, "no pen %s: no pen is connected", name);
        fprintf(stderr, "needlectl: no pen %s is connected; connected:", name);
        for (size_t i = 0; i < n; i++) {
                _cleanup_free_ char *serial = ctl_pen_serial_from_path(pens[i]);
                fprintf(stderr, " %s", serial ? serial : pens[i]);
        }
        fputc('\n', stderr);
        return NEEDLECTL_EXIT_NO_PEN;
}

/* ---- replies as JSON ------------------------------------------------------------------------ */

static int read_dict_json(sd_bus_message *m, const char *contents, json_object **ret);

static int read_basic_json(sd_bus_message *m, char type, json_object **ret) {
        union {
                uint8_t y; int b; int16_t n; uint16_t q; int32_t i; uint32_t u;
                int64_t x; uint64_t t; double d; const char *s; int h;
        } v;
        int r = sd_bus_message_read_basic(m, type, &v);
        if (r < 0)
                return r;
        json_object *o;
        switch (type) {
        case 'y': o = json_object_new_int64(v.y); break;
        case 'b': o = json_object_new_boolean(v.b); break;
        case 'n': o = json_object_new_int64(v.n); break;
        case 'q': o = json_object_new_int64(v.q); break;
        case 'i': o = json_object_new_int64(v.i); break;
        case 'u': o = json_object_new_int64(v.u); break;
        case 'x': o = json_object_new_int64(v.x); break;
        case 't': o = v.t <= INT64_MAX ? json_object_new_int64((int64_t) v.t) : json_object_new_uint64(v.t); break;
        case 'd': o = json_object_new_double(v.d); break;
        case 's': case 'o': case 'g': o = json_object_new_string(v.s); break;
        case 'h': o = json_object_new_int64(v.h); break;
        default: return -EBADMSG;
        }
        if (!o)
                return -ENOMEM;
        *ret = o;
        return 0;
}

int ctl_message_read_json(sd_bus_message *m, json_object **ret) {
        char type;
        const char *contents;
        int r = sd_bus_message_peek_type(m, &type, &contents);
        if (r < 0)
                return r;
        if (r == 0)
                return -EBADMSG;

        switch (type) {
        case SD_BUS_TYPE_ARRAY: {
                if (contents[0] == SD_BUS_TYPE_DICT_ENTRY_BEGIN)
                        return read_dict_json(m, contents, ret);
                _cleanup_json_ json_object *array = json_object_new_array();
                if (!array)
                        return -ENOMEM;
                r = sd_bus_message_enter_container(m, type, contents);
                if (r < 0)
                        return r;
                while ((r = sd_bus_message_at_end(m, false)) == 0) {
                        json_object *item = NULL;
                        r = ctl_message_read_json(m, &item);
                        if (r < 0)
                                return r;
                        json_object_array_add(array, item);
                }
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
                *ret = TAKE_PTR(array);
                return 0;
        }
        case SD_BUS_TYPE_STRUCT: {
                _cleanup_json_ json_object *array = json_object_new_array();
                if (!array)
                        return -ENOMEM;
                r = sd_bus_message_enter_container(m, type, contents);
                if (r < 0)
                        return r;
                while ((r = sd_bus_message_at_end(m, false)) == 0) {
                        json_object *item = NULL;
                        r = ctl_message_read_json(m, &item);
                        if (r < 0)
                                return r;
                        json_object_array_add(array, item);
                }
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
                *ret = TAKE_PTR(array);
                return 0;
        }
        case SD_BUS_TYPE_VARIANT:
                r = sd_bus_message_enter_container(m, type, contents);
                if (r < 0)
                        return r;
                r = ctl_message_read_json(m, ret);
                if (r < 0)
                        return r;
                return sd_bus_message_exit_container(m);
        default:
                return read_basic_json(m, type, ret);
        }
}

/* a{K*}: an object keyed by the (string) keys; other key types become strings too. */
static int read_dict_json(sd_bus_message *m, const char *contents, json_object **ret) {
        _cleanup_json_ json_object *obj = json_object_new_object();
        if (!obj)
                return -ENOMEM;
        /* contents is "{K...}": the entry's own contents are everything inside the braces. */
        size_t len = strlen(contents);
        if (len < 4)
                return -EBADMSG;
        _cleanup_free_ char *entry = strndup(contents + 1, len - 2);
        if (!entry)
                return -ENOMEM;
        int r = sd_bus_message_enter_container(m, SD_BUS_TYPE_ARRAY, contents);
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, SD_BUS_TYPE_DICT_ENTRY, entry)) > 0) {
                _cleanup_json_ json_object *key = NULL;
                json_object *value = NULL;
                r = read_basic_json(m, entry[0], &key);
                if (r < 0)
                        return r;
                r = ctl_message_read_json(m, &value);
                if (r < 0)
                        return r;
                json_object_object_add(obj, json_object_get_string(key), value);
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        r = sd_bus_message_exit_container(m);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(obj);
        return 0;
}

char *ctl_property_to_key(const char *name) {
        size_t len = strlen(name);
        char *key = malloc(2 * len + 1);
        if (!key)
                return NULL;
        char *p = key;
        for (size_t i = 0; i < len; i++) {
                if (isupper((unsigned char) name[i])) {
                        if (i > 0)
                                *p++ = '_';
                        *p++ = (char) tolower((unsigned char) name[i]);
                } else {
                        *p++ = name[i];
                }
        }
        *p = '\0';
        return key;
}

int ctl_message_read_properties(sd_bus_message *m, json_object *obj) {
        int r = sd_bus_message_enter_container(m, SD_BUS_TYPE_ARRAY, "{sv}");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_enter_container(m, SD_BUS_TYPE_DICT_ENTRY, "sv")) > 0) {
                const char *name;
                json_object *value = NULL;
                r = sd_bus_message_read_basic(m, 's', &name);
                if (r < 0)
                        return r;
                r = ctl_message_read_json(m, &value);
                if (r < 0)
                        return r;
                _cleanup_free_ char *key = ctl_property_to_key(name);
                if (!key) {
                        json_object_put(value);
                        return -ENOMEM;
                }
                json_object_object_add(obj, key, value);
                r = sd_bus_message_exit_container(m);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(m);
}

int ctl_get_all_properties(sd_bus *bus, const char *path, const char *interface, json_object **ret) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *reply = NULL;
        int r = sd_bus_call_method(bus, ND_BUS_NAME, path, "org.freedesktop.DBus.Properties", "GetAll", &error,
                                   &reply, "s", interface);
        if (r < 0)
                return ctl_log_bus_error(path, &error, r);
        _cleanup_json_ json_object *obj = json_object_new_object();
        if (!obj)
                return ctl_oom();
        r = ctl_message_read_properties(reply, obj);
        if (r < 0)
                return ctl_log_bus_error("cannot read the properties", NULL, r);
        *ret = TAKE_PTR(obj);
        return 0;
}

static int call_va(sd_bus *bus, const char *what, const char *path, const char *interface, const char *member,
                   json_object **ret, const char *types, va_list ap) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *m = NULL, *reply = NULL;
        int r = sd_bus_message_new_method_call(bus, &m, ND_BUS_NAME, path, interface, member);
        if (r >= 0 && types)
                r = sd_bus_message_appendv(m, types, ap);
        if (r < 0)
                return ctl_log_bus_error(what, NULL, r);
        r = sd_bus_call(bus, m, 0, &error, &reply);
        if (r < 0)
                return ctl_log_bus_error(what, &error, r);
        if (ret) {
                r = ctl_message_read_json(reply, ret);
                if (r < 0)
                        return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "%s: cannot read the reply: %s", what, strerror(-r));
        }
        return 0;
}

int ctl_call_json(sd_bus *bus, const char *what, const char *path, const char *interface, const char *member,
                  json_object **ret, const char *types, ...) {
        va_list ap;
        va_start(ap, types);
        int r = call_va(bus, what, path, interface, member, ret, types, ap);
        va_end(ap);
        return r;
}

int ctl_call(sd_bus *bus, const char *what, const char *path, const char *interface, const char *member,
             const char *types, ...) {
        va_list ap;
        va_start(ap, types);
        int r = call_va(bus, what, path, interface, member, NULL, types, ap);
        va_end(ap);
        return r;
}

const char *ctl_json_str(json_object *obj, const char *key) {
        json_object *v;
        if (!obj || !json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_string))
                return "";
        return json_object_get_string(v);
}

double ctl_json_double(json_object *obj, const char *key) {
        json_object *v;
        if (!obj || !json_object_object_get_ex(obj, key, &v) ||
            !(json_object_is_type(v, json_type_double) || json_object_is_type(v, json_type_int)))
                return NAN;
        return json_object_get_double(v);
}

int64_t ctl_json_int(json_object *obj, const char *key) {
        json_object *v;
        if (!obj || !json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_int))
                return 0;
        return json_object_get_int64(v);
}

bool ctl_json_bool(json_object *obj, const char *key) {
        json_object *v;
        if (!obj || !json_object_object_get_ex(obj, key, &v) || !json_object_is_type(v, json_type_boolean))
                return false;
        return json_object_get_boolean(v);
}

int ctl_print_json(json_object *obj) {
        const char *text = json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return ctl_oom();
        if (puts(text) < 0 || fflush(stdout) != 0)
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write the output: %s", strerror(errno));
        return 0;
}

/* ---- parsing and formatting ----------------------------------------------------------------- */

const char *ctl_format_time(uint64_t usec, char *buf, size_t size) {
        if (usec == 0) {
                snprintf(buf, size, "-");
                return buf;
        }
        time_t t = (time_t) (usec / USEC_PER_SEC);
        struct tm tm;
        if (!localtime_r(&t, &tm) || strftime(buf, size, "%Y-%m-%d %H:%M:%S", &tm) == 0)
                snprintf(buf, size, "@%" PRIu64, usec / USEC_PER_SEC);
        return buf;
}

const char *ctl_format_iso_utc(uint64_t usec, char *buf, size_t size) {
        if (usec == 0) {
                buf[0] = '\0';
                return buf;
        }
        time_t t = (time_t) (usec / USEC_PER_SEC);
        struct tm tm;
        char day[32];
        if (!gmtime_r(&t, &tm) || strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm) == 0)
                day[0] = '\0';
        snprintf(buf, size, "%s.%06" PRIu64 "Z", day, usec % USEC_PER_SEC);
        return buf;
}

int ctl_parse_time(const char *s, uint64_t *ret_usec) {
        if (s[0] == '@') {
                uint64_t secs;
                if (ctl_parse_unsigned(s + 1, UINT64_MAX / USEC_PER_SEC, &secs) < 0)
                        return -EINVAL;
                *ret_usec = secs * USEC_PER_SEC;
                return 0;
        }
        if (s[0] == '-') {
                static const struct { char unit; uint64_t usec; } units[] = {
                        { 's', USEC_PER_SEC }, { 'm', 60 * USEC_PER_SEC },
                        { 'h', 3600 * USEC_PER_SEC }, { 'd', 86400 * USEC_PER_SEC },
                };
                size_t len = strlen(s);
                if (len < 3)
                        return -EINVAL;
                for (size_t i = 0; i < ELEMENTSOF(units); i++) {
                        if (s[len - 1] != units[i].unit)
                                continue;
                        _cleanup_free_ char *digits = strndup(s + 1, len - 2);
                        uint64_t n;
                        if (!digits)
                                return -ENOMEM;
                        if (ctl_parse_unsigned(digits, UINT32_MAX, &n) < 0)
                                return -EINVAL;
                        struct timespec now;
                        clock_gettime(CLOCK_REALTIME, &now);
                        uint64_t now_usec = (uint64_t) now.tv_sec * USEC_PER_SEC + (uint64_t) now.tv_nsec / NSEC_PER_USEC;
                        uint64_t delta = n * units[i].usec;
                        *ret_usec = delta < now_usec ? now_usec - delta : 0;
                        return 0;
                }
                return -EINVAL;
        }
        static const char *const formats[] = {
                "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d",
        };
        for (size_t i = 0; i < ELEMENTSOF(formats); i++) {
                struct tm tm = { .tm_isdst = -1 };
                const char *end = strptime(s, formats[i], &tm);
                if (!end || *end != '\0')
                        continue;
                time_t t = mktime(&tm);
                if (t == (time_t) -1 || t < 0)
                        return -EINVAL;
                *ret_usec = (uint64_t) t * USEC_PER_SEC;
                return 0;
        }
        return -EINVAL;
}

int ctl_parse_double(const char *s, double *ret) {
        char *end;
        errno = 0;
        double v = strtod(s, &end);
        if (s[0] == '\0' || isspace((unsigned char) s[0]) || *end != '\0' || errno != 0 || !isfinite(v))
                return -EINVAL;
        *ret = v;
        return 0;
}

int ctl_parse_unsigned(const char *s, uint64_t max, uint64_t *ret) {
        char *end;
        if (!isdigit((unsigned char) s[0]))
                return -EINVAL;
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (*end != '\0')
                return -EINVAL;
        if (errno == ERANGE || v > max)
                return -ERANGE;
        *ret = v;
        return 0;
}

int ctl_read_file(const char *path, size_t max_bytes, char **ret) {
        bool is_stdin = STREQ(path, "-");
        _cleanup_fclose_ FILE *f = is_stdin ? fdopen(dup(STDIN_FILENO), "r") : fopen(path, "re");
        if (is_stdin)
                path = "standard input";
        if (!f)
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot read %s: %s", path, strerror(errno));
        struct stat st;
        if (fstat(fileno(f), &st) < 0)
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot read %s: %s", path, strerror(errno));
        if (S_ISDIR(st.st_mode))
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot read %s: %s", path, strerror(EISDIR));
        _cleanup_free_ char *buf = malloc(max_bytes + 2);
        if (!buf)
                return ctl_oom();
        size_t n = fread(buf, 1, max_bytes + 1, f);
        if (ferror(f))
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot read %s: %s", path, strerror(errno ? errno : EIO));
        if (n > max_bytes)
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "%s is larger than %zu bytes, more than needled accepts",
                                path, max_bytes);
        if (memchr(buf, '\0', n))
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "%s holds a NUL byte: not a text file", path);
        buf[n] = '\0';
        *ret = TAKE_PTR(buf);
        return 0;
}

int ctl_parse_options(int argc, char *argv[], const struct option *options, ctl_common *common,
                      void (*usage)(FILE *out), ctl_option_handler handler, void *userdata) {
        int c;
        /* 15 significant digits: what a double holds exactly in decimal, so 0.05 prints as
         * 0.05 and not 0.050000000000000003. Integral doubles keep their ".0". */
        (void) json_c_set_serialization_double_format("%.15g", JSON_C_OPTION_GLOBAL);
        opterr = 0;
        optind = 0;
        /* '+' would stop at the first positional argument; permuting lets options follow
         * the pen's name, as people type them ("needlectl start PEN1 --label A"). */
        while ((c = getopt_long(argc, argv, ":h", options, NULL)) >= 0) {
                if (c == 'h') {
                        usage(stdout);
                        return NEEDLECTL_EXIT_OK;
                }
                if (ctl_common_parse(common, c))
                        continue;
                if (c == '?' || c == ':' || !handler) {
                        ctl_bad_option(argv[0], argc, argv);
                        return NEEDLECTL_EXIT_USAGE;
                }
                int r = handler(c, optarg, userdata);
                if (r != 0)
                        return r;
        }
        return -1;
}

int ctl_check_positional(int argc, char *argv[], int min, int max, void (*usage)(FILE *out)) {
        int n = argc - optind;
        if (n >= min && n <= max)
                return -1;
        if (n < min)
                fprintf(stderr, "needlectl %s: missing argument\n", argv[0]);
        else
                fprintf(stderr, "needlectl %s: unexpected argument '%s'\n", argv[0], argv[optind + max]);
        usage(stderr);
        return NEEDLECTL_EXIT_USAGE;
}

int ctl_parse_args(int argc, char *argv[], const struct option *options, ctl_common *common,
                   void (*usage)(FILE *out), ctl_option_handler handler, void *userdata, int min, int max) {
        int r = ctl_parse_options(argc, argv, options, common, usage, handler, userdata);
        if (r >= 0)
                return r;
        return ctl_check_positional(argc, argv, min, max, usage);
}

static const struct option common_only_options[] = { CTL_COMMON_OPTIONS, { NULL, 0, NULL, 0 } };

static void free_verb_args(const ctl_verb_syntax *s, void *args) {
        if (args && s->args_free)
                s->args_free(args);
        free(args);
}

int ctl_verb_dispatch(const ctl_verb *v, int argc, char *argv[]) {
        assert(v && argc >= 1);
        if (!v->syntax)
                return v->run_raw(argc, argv);
        const ctl_verb_syntax *s = v->syntax;
        assert(s->usage && v->run && v->min_args >= 0 && v->min_args <= v->max_args);

        ctl_invocation inv = { .verb = v };
        if (s->args_size > 0) {
                inv.args = calloc(1, s->args_size);
                if (!inv.args)
                        return ctl_oom();
                if (s->args_init)
                        s->args_init(inv.args);
        }
        int r = ctl_parse_args(argc, argv, s->options ? s->options : common_only_options, &inv.common, s->usage,
                               s->handler, inv.args, v->min_args, v->max_args);
        if (r < 0) {
                inv.argc = argc - optind;
                inv.argv = argv + optind;
                if (s->check)
                        r = s->check(&inv);
        }
        if (r < 0 && v->needs_bus) {
                int c = ctl_connect(&inv.common, &inv.bus);
                if (c != 0)
                        r = c;
        }
        if (r < 0)
                r = v->run(&inv);
        if (inv.bus)
                sd_bus_flush_close_unref(inv.bus);
        free_verb_args(s, inv.args);
        return r;
}

int ctl_hoist_common_options(int argc, char *argv[]) {
        static const char *const common[] = { "--system", "--session", "--json", "--no-ask-password" };
        int k = 1;
        while (k < argc) {
                bool is_common = false;
                for (size_t i = 0; i < ELEMENTSOF(common); i++)
                        if (STREQ(argv[k], common[i]))
                                is_common = true;
                if (!is_common)
                        break;
                k++;
        }
        if (k == 1 || k >= argc)
                return argc;
        /* argv[1..k-1] are common options, argv[k] the verb: rotate the verb to the front. */
        char *verb = argv[k];
        memmove(argv + 2, argv + 1, (size_t) (k - 1) * sizeof *argv);
        argv[1] = verb;
        return argc;
}
