/* manager.c: org.needled1.Manager on /org/needled, and the ObjectManager there. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "daemon.h"
#include "ledger-state.h"
#include "errors.h"
#include "history.h"
#include "log.h"
#include "manager.h"
#include "pen.h"
#include "pen-dbus.h"
#include "profile.h"
#include "simulator.h"
#include "util.h"

static uint64_t now_realtime_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

/* ---- Limits -------------------------------------------------------------------------------- */

int nd_manager_load_limits(nd_daemon *d, bool at_startup, char **error) {
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        nd_limits *limits = NULL;
        int r = nd_limits_load_file(d->opts.limits_path, &limits, &diags);

        if (r < 0) {
                _cleanup_free_ char *joined = NULL;
                /* Every problem, each as "path:line:column: field: message". */
                for (size_t i = 0; i < diags.n_items; i++) {
                        _cleanup_free_ char *line = nd_diag_format(&diags.items[i]);
                        char *n = NULL;
                        if (!line || asprintf(&n, "%s%s%s", joined ? joined : "", joined ? "; " : "", line) < 0)
                                return -ENOMEM;
                        free(joined);
                        joined = n;
                }
                if (!joined && asprintf(&joined, "%s: %s", d->opts.limits_path, strerror(-r)) < 0)
                        return -ENOMEM;
                nd_log_full(LOG_ERR, (const char *const[]) { "NEEDLED_EVENT=limits-invalid", NULL },
                            "%s limits %s: %s%s", at_startup ? "cannot load" : "cannot reload",
                            d->opts.limits_path, joined,
                            d->limits ? " (the limits in force stay in force)"
                                      : " (no limits in force: arming and starting are refused)");
                free(d->limits_error);
                d->limits_error = TAKE_PTR(joined);
                if (!d->limits)
                        d->limits_state = r == -ENOENT ? ND_LIMITS_MISSING : ND_LIMITS_INVALID;
                if (error)
                        *error = strdup(d->limits_error);
                if (d->bus)
                        (void) sd_bus_emit_properties_changed(d->bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE,
                                                              "LimitsState", "LimitsError", NULL);
                return r;
        }

        nd_limits *old = d->limits;
        d->limits = limits;
        d->limits_state = ND_LIMITS_OK;
        d->limits_loaded_at_us = now_realtime_us();
        free(d->limits_error);
        d->limits_error = NULL;
        nd_log_full(LOG_NOTICE, (const char *const[]) { "NEEDLED_EVENT=limits-loaded", NULL },
                    "limits %s loaded (sha256 %s, %zu areas)", d->opts.limits_path, limits->digest, limits->n_areas);
        if (d->bus)
                (void) sd_bus_emit_properties_changed(d->bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "LimitsState",
                                                      "LimitsError", "LimitsDigest", "LimitsLoadedAt", NULL);
        /* A running treatment stays only while it is within the new limits. */
        for (unsigned i = 0; i < d->n_pens; i++)
                nd_pen_limits_changed(d->pens[i], old);
        nd_limits_free(old);
        return 0;
}

/* ---- Properties ------------------------------------------------------------------------------ */

static int property_version(sd_bus *bus, const char *path, const char *interface, const char *property,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", PACKAGE_VERSION);
}

static int property_features(sd_bus *bus, const char *path, const char *interface, const char *property,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        int r = sd_bus_message_open_container(reply, 'a', "s");
        if (r >= 0)
                r = sd_bus_message_append(reply, "sssss", "telemetry-fd", "ledger", "client-heartbeat",
                                          "telemetry-watch", "telemetry-pipe");
        if (r >= 0 && d->opts.simulate)
                r = sd_bus_message_append(reply, "s", "simulator");
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

static int property_pens(sd_bus *bus, const char *path, const char *interface, const char *property,
                         sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        int r = sd_bus_message_open_container(reply, 'a', "o");
        for (unsigned i = 0; r >= 0 && i < d->n_pens; i++)
                if (nd_pen_is_exported(d->pens[i]))
                        r = sd_bus_message_append(reply, "o", nd_pen_get_path(d->pens[i]));
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

static int property_limits_path(sd_bus *bus, const char *path, const char *interface, const char *property,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        return sd_bus_message_append(reply, "s", d->opts.limits_path);
}

static int property_limits_state(sd_bus *bus, const char *path, const char *interface, const char *property,
                                 sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        return sd_bus_message_append(reply, "s", nd_limits_state_to_string(d->limits_state));
}

static int property_limits_error(sd_bus *bus, const char *path, const char *interface, const char *property,
                                 sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        return sd_bus_message_append(reply, "s", strempty(d->limits_error));
}

static int property_limits_digest(sd_bus *bus, const char *path, const char *interface, const char *property,
                                  sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        return sd_bus_message_append(reply, "s", d->limits ? d->limits->digest : "");
}

static int property_limits_loaded_at(sd_bus *bus, const char *path, const char *interface, const char *property,
                                     sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        return sd_bus_message_append(reply, "t", d->limits ? d->limits_loaded_at_us : UINT64_C(0));
}

/* ---- GetLimits ------------------------------------------------------------------------------- */

/* Appends {key: variant(a{sv})} and leaves the inner dictionary open. */
static int open_dict_entry_dict(sd_bus_message *m, const char *key) {
        int r = sd_bus_message_open_container(m, 'e', "sv");
        if (r >= 0)
                r = sd_bus_message_append(m, "s", key);
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'v', "a{sv}");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "{sv}");
        return r;
}

static int close_dict_entry_dict(sd_bus_message *m) {
        int r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        return r;
}

/* The limits as nested dictionaries mirroring the YAML (GetLimits). */
int nd_manager_append_limits(sd_bus_message *m, const nd_limits *l) {
        int r = sd_bus_message_open_container(m, 'a', "{sv}");
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "{sv}", "version", "u", (uint32_t) l->version);
        if (r >= 0)
                r = open_dict_entry_dict(m, "pen");
        if (r >= 0)
                r = open_dict_entry_dict(m, "speed_hz");
        if (r >= 0)
                r = sd_bus_message_append(m, "{sv}{sv}", "min", "d", l->pen.speed_min_hz, "max", "d", l->pen.speed_max_hz);
        if (r >= 0)
                r = close_dict_entry_dict(m);
        if (r >= 0)
                r = sd_bus_message_append(m, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}",
                                          "depth_tolerance_mm", "d", l->pen.depth_tolerance_mm,
                                          "warn_temperature_c", "d", l->pen.warn_temperature_c,
                                          "max_temperature_c", "d", l->pen.max_temperature_c,
                                          "max_current_ma", "d", l->pen.max_current_ma,
                                          "stall_speed_fraction", "d", l->pen.stall_speed_fraction,
                                          "stall_time_ms", "u", l->pen.stall_time_ms,
                                          "min_battery_percent", "u", l->pen.min_battery_percent,
                                          "stop_battery_percent", "u", l->pen.stop_battery_percent,
                                          "heartbeat_timeout_ms", "u", l->pen.heartbeat_timeout_ms);
        if (r >= 0)
                r = close_dict_entry_dict(m);
        if (r >= 0)
                r = open_dict_entry_dict(m, "session");
        if (r >= 0)
                r = sd_bus_message_append(m, "{sv}{sv}", "max_duration_s", "d", (double) l->session.max_duration_s,
                                          "client_heartbeat_timeout_ms", "u", l->session.client_heartbeat_timeout_ms);
        if (r >= 0 && l->session.has_require_skin_type)
                r = sd_bus_message_append(m, "{sv}", "require_skin_type", "b", (int) l->session.require_skin_type);
        if (r >= 0)
                r = close_dict_entry_dict(m);
        if (r >= 0)
                r = open_dict_entry_dict(m, "cartridge");
        if (r >= 0)
                r = sd_bus_message_append(m, "{sv}{sv}", "single_use", "b", (int) l->cartridge.single_use,
                                          "max_runtime_s", "d", (double) l->cartridge.max_runtime_s);
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'e', "sv");
        if (r >= 0)
                r = sd_bus_message_append(m, "s", "allowed_needles");
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'v', "au");
        if (r >= 0)
                r = sd_bus_message_append_array(m, 'u', l->cartridge.allowed_needles,
                                                l->cartridge.n_allowed_needles * sizeof(uint32_t));
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = close_dict_entry_dict(m);
        if (r >= 0)
                r = open_dict_entry_dict(m, "areas");
        for (size_t i = 0; r >= 0 && i < l->n_areas; i++) {
                const nd_area_limits *a = &l->areas[i];
                r = open_dict_entry_dict(m, a->name);
                if (r >= 0)
                        r = sd_bus_message_append(m, "{sv}", "max_depth_mm", "d", a->max_depth_mm);
                if (r >= 0 && a->has_max_speed_hz)
                        r = sd_bus_message_append(m, "{sv}", "max_speed_hz", "d", a->max_speed_hz);
                if (r >= 0 && a->has_max_duration_s)
                        r = sd_bus_message_append(m, "{sv}", "max_duration_s", "d", (double) a->max_duration_s);
                if (r >= 0 && a->has_max_density_per_cm2)
                        r = sd_bus_message_append(m, "{sv}", "max_density_per_cm2", "d", a->max_density_per_cm2);
                if (r >= 0)
                        r = close_dict_entry_dict(m);
        }
        if (r >= 0)
                r = close_dict_entry_dict(m);
        if (r >= 0 && l->has_skin_types) {
                r = open_dict_entry_dict(m, "skin_types");
                for (int t = 0; r >= 0 && t < ND_SKIN_TYPES_COUNT; t++) {
                        if (!l->skin_types[t].set)
                                continue;
                        r = open_dict_entry_dict(m, nd_skin_type_to_string((nd_skin_type) t));
                        if (r >= 0)
                                r = sd_bus_message_append(m, "{sv}", "max_depth_mm", "d", l->skin_types[t].max_depth_mm);
                        if (r >= 0)
                                r = close_dict_entry_dict(m);
                }
                if (r >= 0)
                        r = close_dict_entry_dict(m);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        return r;
}

static int method_get_limits(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int r;

        if (!d->limits)
                return sd_bus_error_setf(error, ND_ERROR_LIMITS_UNAVAILABLE,
                                         "No limits are in force (%s is %s%s%s)", d->opts.limits_path,
                                         nd_limits_state_to_string(d->limits_state),
                                         d->limits_error ? ": " : "", strempty(d->limits_error));
        r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0)
                r = nd_manager_append_limits(reply, d->limits);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Could not build the reply: %s", strerror(-r));
        return sd_bus_send(NULL, reply, NULL);
}

/* ---- ReloadLimits ---------------------------------------------------------------------------- */

static void reload_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                              const nd_caller *caller, void *userdata) {
        nd_daemon *d = userdata;
        _cleanup_free_ char *error = NULL;

        if (!allowed) {
                (void) sd_bus_reply_method_error(m, auth_error);
                return;
        }
        int r = nd_manager_load_limits(d, false, &error);
        nd_audit(d, caller, "ReloadLimits", "", r < 0 ? "refused: invalid limits" : d->limits->digest);
        if (r < 0) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INVALID_LIMITS, "%s", error ? error : "invalid limits");
                return;
        }
        (void) sd_bus_reply_method_return(m, NULL);
}

/* ---- Profiles -------------------------------------------------------------------------------- */

/* Appends a(sss) of (field, code, message). */
int nd_manager_append_violations(sd_bus_message *m, const nd_diags *diags) {
        int r = sd_bus_message_open_container(m, 'a', "(sss)");
        for (size_t i = 0; r >= 0 && diags && i < diags->n_items; i++)
                r = sd_bus_message_append(m, "(sss)", diags->items[i].field, diags->items[i].code,
                                          diags->items[i].message);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        return r;
}

static int method_validate_profile(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        const char *yaml;
        int r;

        r = sd_bus_message_read(m, "s", &yaml);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Expected one string, the profile's YAML");
        size_t len = strlen(yaml);
        if (len > ND_PROFILE_TEXT_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "The profile is %zu bytes long; at most %u", len,
                                         ND_PROFILE_TEXT_MAX);
        r = nd_profile_parse(yaml, len, NULL, d->limits, &p, &diags);
        if (r == -ENOMEM)
                return sd_bus_error_set(error, ND_ERROR_INTERNAL, "Out of memory");
        r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0)
                r = nd_manager_append_violations(reply, &diags);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Could not build the reply: %s", strerror(-r));
        return sd_bus_send(NULL, reply, NULL);
}

/* Appends a profile's keys into an open a{sv} (shared with Pen.Profile). with_extras adds the
 * operator's texts (notes, aftercare), for GetProfiles. */
int nd_manager_append_profile_fields(sd_bus_message *m, const nd_profile *p, bool with_extras) {
        int r = sd_bus_message_append(m, "{sv}{sv}{sv}", "name", "s", strempty(p->name), "area", "s",
                                      strempty(p->area), "indication", "s", strempty(p->indication));
        if (r >= 0)
                r = sd_bus_message_append(m, "{sv}{sv}{sv}{sv}", "depth_mm", "d", p->has_depth_mm ? p->depth_mm : 0.0,
                                          "speed_hz", "d", p->has_speed_hz ? p->speed_hz : 0.0,
                                          "duration_s", "d", p->has_duration_s ? (double) p->duration_s : 0.0,
                                          "needles", "u", p->has_needles ? p->needles : 0u);
        if (r >= 0)
                r = sd_bus_message_append(m, "{sv}", "digest", "s", p->digest);
        if (r >= 0 && p->has_skin_types) {
                r = sd_bus_message_open_container(m, 'e', "sv");
                if (r >= 0)
                        r = sd_bus_message_append(m, "s", "skin_types");
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'v', "as");
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'a', "s");
                for (int t = 0; r >= 0 && t < ND_SKIN_TYPES_COUNT; t++)
                        if (p->skin_types[t])
                                r = sd_bus_message_append(m, "s", nd_skin_type_to_string((nd_skin_type) t));
                for (int k = 0; r >= 0 && k < 3; k++)
                        r = sd_bus_message_close_container(m);
        }
        if (r >= 0 && p->has_passes)
                r = sd_bus_message_append(m, "{sv}", "passes", "u", p->passes);
        if (r >= 0 && p->has_area_cm2)
                r = sd_bus_message_append(m, "{sv}", "area_cm2", "d", p->area_cm2);
        if (r >= 0 && with_extras) {
                r = sd_bus_message_append(m, "{sv}", "notes", "s", strempty(p->notes));
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'e', "sv");
                if (r >= 0)
                        r = sd_bus_message_append(m, "s", "aftercare");
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'v', "as");
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'a', "s");
                for (size_t i = 0; r >= 0 && i < p->n_aftercare; i++)
                        r = sd_bus_message_append(m, "s", p->aftercare[i]);
                for (int k = 0; r >= 0 && k < 3; k++)
                        r = sd_bus_message_close_container(m);
        }
        return r;
}

static int method_get_profiles(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        _cleanup_(nd_profile_set_freep) nd_profile_set *set = NULL;
        int r;

        r = nd_profile_dir_load(d->opts.profiles_dir, d->limits, &set);
        if (r == -ENOENT)
                set = NULL; /* no profiles directory: no installed profiles */
        else if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot read the profiles directory %s: %s",
                                         d->opts.profiles_dir, strerror(-r));

        r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "a{sv}");
        for (size_t i = 0; r >= 0 && set && i < set->n_entries; i++) {
                const nd_profile_entry *e = &set->entries[i];
                r = sd_bus_message_open_container(reply, 'a', "{sv}");
                if (r >= 0)
                        r = nd_manager_append_profile_fields(reply, e->profile, true);
                if (r >= 0)
                        r = sd_bus_message_append(reply, "{sv}{sv}", "valid", "b", (int) e->valid, "file", "s",
                                                  e->path);
                if (r >= 0)
                        r = sd_bus_message_open_container(reply, 'e', "sv");
                if (r >= 0)
                        r = sd_bus_message_append(reply, "s", "violations");
                if (r >= 0)
                        r = sd_bus_message_open_container(reply, 'v', "a(sss)");
                if (r >= 0)
                        r = nd_manager_append_violations(reply, &e->violations);
                for (int k = 0; r >= 0 && k < 3; k++)
                        r = sd_bus_message_close_container(reply);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Could not build the reply: %s", strerror(-r));
        return sd_bus_send(NULL, reply, NULL);
}

/* ---- Pens by serial, and paths of pens that are gone ------------------------------------------- */

/* The longest serial FindPen looks for (pens send at most 32 bytes; the ledger stores 64). */
#define FIND_PEN_SERIAL_MAX 64u

static int method_find_pen(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        const char *serial;
        int r = sd_bus_message_read(m, "s", &serial);
        if (r < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected one string, the pen's serial");
        size_t len = strlen(serial);
        if (len == 0 || len > FIND_PEN_SERIAL_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "The serial is %zu bytes long; 1 to %u",
                                         len, FIND_PEN_SERIAL_MAX);
        for (unsigned i = 0; i < d->n_pens; i++)
                if (nd_pen_is_exported(d->pens[i]) && STREQ(nd_pen_get_serial(d->pens[i]), serial))
                        return sd_bus_reply_method_return(m, "o", nd_pen_get_path(d->pens[i]));
        _cleanup_free_ char *shown = nd_text_sanitize(serial, len, FIND_PEN_SERIAL_MAX);
        return sd_bus_error_setf(error, ND_ERROR_UNKNOWN_PEN, "No pen with serial '%s' is connected",
                                 strempty(shown));
}

/* Runs before the pens' fallback vtable for every message to a path below /org/needled/pen/:
 * a path with no connected pen behind it (a pen that was unplugged, or never connected) gets
 * the named error UnknownPen instead of sd-bus's anonymous UnknownObject. */
static int on_pen_path_message(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        const char *path = sd_bus_message_get_path(m);

        if (sd_bus_message_is_method_call(m, NULL, NULL) <= 0)
                return 0;
        if (!path || strncmp(path, ND_PEN_PATH_PREFIX "/", strlen(ND_PEN_PATH_PREFIX "/")) != 0)
                return 0; /* /org/needled/pen itself: introspection of the pens' parent */
        if (nd_pen_find_by_path(d, path))
                return 0; /* the pen's vtable answers */
        return sd_bus_error_setf(error, ND_ERROR_UNKNOWN_PEN,
                                 "No pen is connected at %s: it was unplugged or never connected "
                                 "(Manager.Pens lists the pens, Manager.FindPen finds one by serial)", path);
}

/* The daemon's own object is listed by GetManagedObjects on /org/needled too, so that a client
 * that starts from the object manager (GDBusObjectManagerClient, dbus-next) sees the Manager and
 * the Simulator without a second proxy. sd-bus lists only what lies below the manager's path by
 * itself; an enumerator on that path may name the path itself. */
static int enumerate_manager_object(sd_bus *bus, const char *prefix, void *userdata, char ***nodes,
                                    sd_bus_error *error) {
        char **l = calloc(2, sizeof *l);
        if (!l)
                return -ENOMEM;
        l[0] = strdup(ND_MANAGER_PATH);
        if (!l[0]) {
                free(l);
                return -ENOMEM;
        }
        *nodes = l;
        return 1;
}

/* ---- Export ------------------------------------------------------------------------------------ */

/* Every method goes through the bouncer (daemon/bouncer.c): the vtable knows no other handler. */
static const nd_method manager_methods[] = {
        { "GetLimits", NULL, method_get_limits },
        { "ReloadLimits", reload_authorized, NULL },
        { "ValidateProfile", NULL, method_validate_profile },
        { "GetProfiles", NULL, method_get_profiles },
        { "GetHistory", nd_history_get_history_authorized, NULL },
        { "GetCartridge", NULL, nd_history_method_get_cartridge },
        { "FindPen", NULL, method_find_pen },
};

static int manager_dispatch(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        return nd_bouncer_dispatch(d->bouncer, m, manager_methods, ELEMENTSOF(manager_methods), d, d, error);
}

static const sd_bus_vtable manager_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Version", "s", property_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Features", "as", property_features, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Pens", "ao", property_pens, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("LimitsPath", "s", property_limits_path, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("LimitsState", "s", property_limits_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("LimitsError", "s", property_limits_error, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("LimitsDigest", "s", property_limits_digest, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("LimitsLoadedAt", "t", property_limits_loaded_at, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("LedgerState", "s", nd_ledger_state_property_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("LedgerError", "s", nd_ledger_state_property_error, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD_WITH_ARGS("GetLimits", SD_BUS_NO_ARGS, SD_BUS_RESULT("a{sv}", limits),
                                manager_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ReloadLimits", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                manager_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ValidateProfile", SD_BUS_ARGS("s", yaml), SD_BUS_RESULT("a(sss)", violations),
                                manager_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetProfiles", SD_BUS_NO_ARGS, SD_BUS_RESULT("aa{sv}", profiles),
                                manager_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetHistory", SD_BUS_ARGS("a{sv}", filter), SD_BUS_RESULT("aa{sv}", sessions),
                                manager_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetCartridge", SD_BUS_ARGS("s", id), SD_BUS_RESULT("a{sv}", cartridge),
                                manager_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("FindPen", SD_BUS_ARGS("s", serial), SD_BUS_RESULT("o", pen),
                                manager_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END
};

int nd_manager_export(nd_daemon *d) {
        int r = sd_bus_add_object_vtable(d->bus, &d->manager_slot, ND_MANAGER_PATH, ND_MANAGER_INTERFACE,
                                         manager_vtable, d);
        if (r < 0)
                return r;
        r = sd_bus_add_object_manager(d->bus, &d->object_manager_slot, ND_MANAGER_PATH);
        if (r < 0)
                return r;
        /* Floating slots: they live as long as the connection. */
        r = sd_bus_add_node_enumerator(d->bus, NULL, ND_MANAGER_PATH, enumerate_manager_object, d);
        if (r < 0)
                return r;
        r = sd_bus_add_fallback(d->bus, NULL, ND_PEN_PATH_PREFIX, on_pen_path_message, d);
        if (r < 0)
                return r;
        r = nd_pen_export_all(d);
        if (r < 0)
                return r;
        if (d->opts.simulate) {
                r = nd_simulator_export(d);
                if (r < 0)
                        return r;
        }
        return 0;
}
