/* pen-dbus.c: the org.needled1.Pen bus adapter: properties, method handlers (each through the
 * bouncer), the vtable and the object enumeration. The state they act on is pen.c's. */
#include <errno.h>
#include <stddef.h>
#include <stdarg.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "audit.h"
#include "contract.h"
#include "daemon.h"
#include "errors.h"
#include "log.h"
#include "manager.h"
#include "pen.h"
#include "pen-dbus.h"
#include "pendev.h"
#include "telemetry.h"
#include "util.h"


static nd_caller caller_of(sd_bus_message *m) {
        return (nd_caller) { .name = sd_bus_message_get_sender(m), .uid = ND_CALLER_UNKNOWN, .pid = ND_CALLER_UNKNOWN };
}

/* ---- Property getters -------------------------------------------------------------------------- */

#define PEN_FROM(userdata) ((nd_pen *) (userdata))

static int prop_identity_string(sd_bus *bus, const char *path, const char *interface, const char *property,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        const nd_proto_identity *id = nd_pendev_get_identity(PEN_FROM(userdata)->dev);
        const char *v = "";
        if (id)
                v = STREQ(property, "Model") ? id->model : id->firmware_version;
        return sd_bus_message_append(reply, "s", v);
}

static int prop_protocol_version(sd_bus *bus, const char *path, const char *interface, const char *property,
                                 sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        const nd_proto_identity *id = nd_pendev_get_identity(PEN_FROM(userdata)->dev);
        return sd_bus_message_append(reply, "u", id ? (uint32_t) id->protocol_major : 0u);
}

static int prop_simulated(sd_bus *bus, const char *path, const char *interface, const char *property,
                          sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "b", PEN_FROM(userdata)->model != NULL);
}

static int prop_state(sd_bus *bus, const char *path, const char *interface, const char *property,
                      sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", nd_pen_state_to_string(PEN_FROM(userdata)->state));
}

static int prop_warnings(sd_bus *bus, const char *path, const char *interface, const char *property,
                         sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        const nd_limits *l = p->daemon->limits;
        unsigned w = nd_interlock_warnings(l, p->have_sample, p->temperature_c, p->battery_percent);
        int r = sd_bus_message_open_container(reply, 'a', "s");
        if (r >= 0 && (w & ND_INTERLOCK_WARN_HIGH_TEMPERATURE))
                r = sd_bus_message_append(reply, "s", "high-temperature");
        if (r >= 0 && (w & ND_INTERLOCK_WARN_LOW_BATTERY))
                r = sd_bus_message_append(reply, "s", "low-battery");
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

static int prop_profile(sd_bus *bus, const char *path, const char *interface, const char *property,
                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        int r = sd_bus_message_open_container(reply, 'a', "{sv}");
        if (r >= 0 && p->profile)
                r = nd_manager_append_profile_fields(reply, p->profile, false);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

static int prop_range(sd_bus *bus, const char *path, const char *interface, const char *property,
                      sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        const nd_proto_identity *id = nd_pendev_get_identity(PEN_FROM(userdata)->dev);
        if (!id)
                return sd_bus_message_append(reply, "(dd)", 0.0, 0.0);
        if (STREQ(property, "DepthRangeMm"))
                return sd_bus_message_append(reply, "(dd)", id->depth_min_mm, id->depth_max_mm);
        return sd_bus_message_append(reply, "(dd)", id->speed_min_hz, id->speed_max_hz);
}

static int prop_depth_step(sd_bus *bus, const char *path, const char *interface, const char *property,
                           sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        const nd_proto_identity *id = nd_pendev_get_identity(PEN_FROM(userdata)->dev);
        return sd_bus_message_append(reply, "d", id ? id->depth_step_mm : 0.0);
}

static int prop_cartridge(sd_bus *bus, const char *path, const char *interface, const char *property,
                          sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        const nd_pen_cartridge_view *v;
        /* What the lookup made off the loop found: never a ledger read here (every Get, GetAll,
         * GetManagedObjects and announcement comes through). */
        const char *state = nd_pen_cartridge_shown_state(p, &v);
        double runtime_s = v->known ? v->info.runtime_s : 0.0;
        if (p->session_active && v->present)
                runtime_s = p->session.cartridge_runtime_before_s + nd_pen_session_elapsed_s(p);
        return sd_bus_message_append(reply, "a{sv}", 4, "id", "s", v->present ? v->id : "",
                                     "needles", "u", v->present ? (uint32_t) v->needles : 0u,
                                     "state", "s", state, "runtime_s", "u", (uint32_t) floor(runtime_s));
}

static int prop_session_id(sd_bus *bus, const char *path, const char *interface, const char *property,
                           sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        return sd_bus_message_append(reply, "s", nd_pen_session_announced(p) ? p->session.id : "");
}

static int prop_elapsed(sd_bus *bus, const char *path, const char *interface, const char *property,
                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "d", nd_pen_session_elapsed_s(PEN_FROM(userdata)));
}

static int prop_strokes(sd_bus *bus, const char *path, const char *interface, const char *property,
                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        return sd_bus_message_append(reply, "t", p->session_active ? (uint64_t) floor(p->session.strokes) : UINT64_C(0));
}

static int prop_punctures(sd_bus *bus, const char *path, const char *interface, const char *property,
                          sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "t", nd_pen_session_punctures(PEN_FROM(userdata)));
}

static int prop_density(sd_bus *bus, const char *path, const char *interface, const char *property,
                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "d", nd_pen_session_density_per_cm2(PEN_FROM(userdata)));
}

static int prop_skin_type(sd_bus *bus, const char *path, const char *interface, const char *property,
                          sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        return sd_bus_message_append(reply, "s", nd_pen_session_announced(p) ? strempty(nd_skin_type_to_string(p->session.skin_type)) : "");
}

static int prop_rate(sd_bus *bus, const char *path, const char *interface, const char *property,
                     sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "u", (uint32_t) nd_pendev_get_telemetry_rate_hz(PEN_FROM(userdata)->dev));
}

/* ---- Methods: helpers ------------------------------------------------------------------------ */

/* The pen a continuation is for, or NULL after replying (denied, or the pen is gone). */
static nd_pen *continuation_pen(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error, nd_daemon *d) {
        if (!allowed) {
                (void) sd_bus_reply_method_error(m, auth_error);
                return NULL;
        }
        nd_pen *p = nd_pen_find_by_path(d, sd_bus_message_get_path(m));
        if (!p)
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_DEVICE_GONE, "The pen %s is not connected any more",
                                                  strempty(sd_bus_message_get_path(m)));
        return p;
}

/* The named D-Bus error of each refusal of lib/interlocks.c. */
static const char *const refusal_errors[_ND_INTERLOCK_REFUSAL_MAX] = {
        [ND_INTERLOCK_ALLOWED] = NULL,
        [ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE] = ND_ERROR_LIMITS_UNAVAILABLE,
        [ND_INTERLOCK_REFUSE_FAULT] = ND_ERROR_FAULT,
        [ND_INTERLOCK_REFUSE_WRONG_STATE] = ND_ERROR_WRONG_STATE,
        [ND_INTERLOCK_REFUSE_NO_CARTRIDGE] = ND_ERROR_NO_CARTRIDGE,
        [ND_INTERLOCK_REFUSE_INVALID_PROFILE] = ND_ERROR_INVALID_PROFILE,
        [ND_INTERLOCK_REFUSE_CARTRIDGE_REJECTED] = ND_ERROR_INVALID_PROFILE,
        [ND_INTERLOCK_REFUSE_CARTRIDGE_SPENT] = ND_ERROR_CARTRIDGE_SPENT,
        [ND_INTERLOCK_REFUSE_LOW_BATTERY] = ND_ERROR_LOW_BATTERY,
        [ND_INTERLOCK_REFUSE_OVER_TEMPERATURE] = ND_ERROR_FAULT,
};

const char *nd_pen_refusal_error_name(nd_interlock_refusal r) {
        /* Anything unexpected is a fault, never a success. */
        if ((size_t) r >= ELEMENTSOF(refusal_errors) || !refusal_errors[r])
                return r == ND_INTERLOCK_ALLOWED ? NULL : ND_ERROR_FAULT;
        return refusal_errors[r];
}

/* The fault a pen is held in: the daemon's code, else the one the pen itself reports latched. */
static const char *pen_fault_shown(const nd_pen *p) {
        if (p->fault)
                return p->fault;
        const char *latched = nd_interlock_pen_fault_code(p->pen_faults);
        return latched ? latched : (p->pen_faults ? "pen-fault" : "");
}

/* Replies and returns false unless a profile may be armed now (lib/interlocks.c decides). */
static bool arm_preconditions(nd_pen *p, sd_bus_message *m) {
        const char *what = "arm a profile";
        nd_interlock_pen reading = nd_pen_interlock_reading(p);
        nd_interlock_refusal refusal = nd_interlock_may_arm(p->daemon->limits, &reading);
        switch (refusal) {
        case ND_INTERLOCK_ALLOWED:
                return true;
        case ND_INTERLOCK_REFUSE_FAULT:
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "Cannot %s: pen %s is in fault (%s); clear it first",
                                                  what, p->serial, pen_fault_shown(p));
                return false;
        case ND_INTERLOCK_REFUSE_WRONG_STATE:
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_WRONG_STATE, "Cannot %s: pen %s is %s", what, p->serial,
                                                  p->starting ? "starting" : nd_pen_state_to_string(p->state));
                return false;
        case ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE:
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_LIMITS_UNAVAILABLE,
                                                  "No limits are in force (%s): nothing can be armed",
                                                  nd_limits_state_to_string(p->daemon->limits_state));
                return false;
        default:
                (void) sd_bus_reply_method_errorf(m, nd_pen_refusal_error_name(refusal), "Cannot %s: %s", what,
                                                  strempty(nd_interlock_refusal_to_string(refusal)));
                return false;
        }
}

/* Replies InvalidProfile listing every violation. */
static void reply_invalid_profile(sd_bus_message *m, const nd_diags *diags) {
        _cleanup_free_ char *list = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&list, &len);
        if (f) {
                for (size_t i = 0; i < diags->n_items; i++)
                        fprintf(f, "%s%s: %s [%s]", i ? "; " : "", diags->items[i].field[0] ? diags->items[i].field : "(document)",
                                diags->items[i].message, diags->items[i].code);
                fclose(f);
        }
        (void) sd_bus_reply_method_errorf(m, ND_ERROR_INVALID_PROFILE, "The profile is not valid (%zu problem%s): %s",
                                          diags->n_items, diags->n_items == 1 ? "" : "s", strempty(list));
}

static nd_pen_caps pen_caps(const nd_pen *p) {
        const nd_proto_identity *id = nd_pendev_get_identity(p->dev);
        return (nd_pen_caps) {
                .depth_min_mm = id->depth_min_mm, .depth_max_mm = id->depth_max_mm, .depth_step_mm = id->depth_step_mm,
                .speed_min_hz = id->speed_min_hz, .speed_max_hz = id->speed_max_hz,
        };
}

/* ---- LoadProfile / LoadProfileData --------------------------------------------------------------- */

static void arm(nd_pen *p, sd_bus_message *m, const nd_caller *caller, const char *yaml, size_t len, const char *file) {
        nd_daemon *d = p->daemon;
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *profile = NULL;
        int r;

        r = nd_profile_parse(yaml, len, file, d->limits, &profile, &diags);
        if (r == -ENOMEM) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INTERNAL, "Out of memory");
                return;
        }
        if (r >= 0) {
                nd_pen_caps caps = pen_caps(p);
                r = nd_profile_check_pen(profile, &caps, p->cartridge_present, p->cartridge_needles, &diags);
        }
        if (r < 0 || diags.n_items > 0) {
                nd_audit(d, caller, "LoadProfile", p->serial, "refused: invalid profile");
                reply_invalid_profile(m, &diags);
                return;
        }
        char *copy = strndup(yaml, len);
        if (!copy) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INTERNAL, "Out of memory");
                return;
        }
        nd_pen_disarm(p);
        p->profile = TAKE_PTR(profile);
        p->profile_yaml = copy;
        p->set_depth_mm = p->profile->depth_mm;
        p->set_speed_hz = p->profile->speed_hz;
        /* Full-rate sampling before arming completes: the reply waits for the pen's
         * acknowledgement when the pen was idling. */
        bool answered_later = nd_pen_update_sampling(p, m) > 0;
        nd_pen_set_state(p, ND_PEN_ARMED, NULL);
        nd_pen_changed(p, PROP_PROFILE | PROP_SETPOINTS);
        char detail[160];
        snprintf(detail, sizeof detail, "profile %s sha256 %s", p->profile->name, p->profile->digest);
        nd_audit(d, caller, "LoadProfile", p->serial, detail);
        if (!answered_later)
                (void) sd_bus_reply_method_return(m, NULL);
}

static void load_profile_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                    const nd_caller *caller, void *userdata) {
        nd_daemon *d = userdata;
        nd_pen *p = continuation_pen(m, allowed, auth_error, d);
        const char *name;
        if (!p)
                return;
        if (sd_bus_message_rewind(m, true) < 0 || sd_bus_message_read(m, "s", &name) < 0) {
                (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_INVALID_ARGS, "Expected a profile name");
                return;
        }
        if (!arm_preconditions(p, m))
                return;

        _cleanup_(nd_profile_set_freep) nd_profile_set *set = NULL;
        int r = nd_profile_dir_load(d->opts.profiles_dir, d->limits, &set);
        const nd_profile_entry *e = r >= 0 ? nd_profile_set_find(set, name) : NULL;
        if (!e) {
                _cleanup_free_ char *shown = nd_text_sanitize(name, strlen(name), ND_DIAG_VALUE_MAX);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_UNKNOWN_PROFILE, "No installed profile is named '%s' (in %s)",
                                                  strempty(shown), d->opts.profiles_dir);
                return;
        }
        _cleanup_free_ char *yaml = NULL;
        size_t len = 0;
        _cleanup_fclose_ FILE *f = fopen(e->path, "re");
        if (f) {
                yaml = malloc(ND_PROFILE_TEXT_MAX + 1);
                len = yaml ? fread(yaml, 1, ND_PROFILE_TEXT_MAX + 1, f) : 0;
        }
        if (!yaml || ferror(f)) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_UNKNOWN_PROFILE, "The profile file %s cannot be read", e->path);
                return;
        }
        if (len > ND_PROFILE_TEXT_MAX) {
                nd_audit(d, caller, "LoadProfile", p->serial, "refused: invalid profile: too long");
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INVALID_PROFILE,
                                                  "The profile file %s is longer than %u bytes, the largest profile there may be",
                                                  e->path, ND_PROFILE_TEXT_MAX);
                return;
        }
        arm(p, m, caller, yaml, len, e->path);
}

static void load_profile_data_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                         const nd_caller *caller, void *userdata) {
        nd_pen *p = continuation_pen(m, allowed, auth_error, userdata);
        const char *yaml;
        if (!p)
                return;
        if (sd_bus_message_rewind(m, true) < 0 || sd_bus_message_read(m, "s", &yaml) < 0) {
                (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_INVALID_ARGS, "Expected the profile's YAML");
                return;
        }
        size_t len = strlen(yaml);
        if (len > ND_PROFILE_TEXT_MAX) {
                (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_INVALID_ARGS, "The profile is %zu bytes long; at most %u",
                                                  len, ND_PROFILE_TEXT_MAX);
                return;
        }
        if (!arm_preconditions(p, m))
                return;
        arm(p, m, caller, yaml, len, NULL);
}

/* ---- Start --------------------------------------------------------------------------------------- */

/* Replies to a Start whose motor never started: the pen refused (or a command before the start
 * failed), the record is voided, the pen stays armed (nd_pen_start_void). */
static void start_void_reply(nd_pen *p, sd_bus_message *call, const char *error_name, const char *why) {
        if (nd_pen_start_void(p, why) < 0) {
                (void) sd_bus_reply_method_errorf(call, error_name,
                                                  "Pen %s did not start (%s); the record could not be voided, so the "
                                                  "session is recorded as stopped", p->serial, why);
                return;
        }
        (void) sd_bus_reply_method_errorf(call, error_name,
                                          "Pen %s did not start (%s): no session was started, cartridge %s is as it "
                                          "was and the profile is still armed", p->serial, why, p->cartridge_id);
}

/* A step of Start failed with status. Before the motor start was sent (set depth, set speed), or
 * when the pen refused it (-EPIPE: it answered no), the motor has not run: the attempt is voided.
 * When the motor start's outcome is unknown (no answer, a malformed one, a stop overtaking it),
 * it may have run: the motor is stopped and the session ends in fault heartbeat-lost (the pen
 * does not answer as it must), or device-lost when the pen is gone. */
static void start_failed(nd_pen *p, nd_pen_op *op, int status, const char *step, bool motor_start) {
        char why[160];
        snprintf(why, sizeof why, "%s: %s", step, nd_pen_command_error(status));
        if (!p->starting) {
                /* Something ended the session before the motor started: a Stop, an interlock. */
                if (p->state == ND_PEN_FAULT)
                        (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_FAULT,
                                                          "The session ended in fault %s before the motor started",
                                                          strempty(p->fault));
                else
                        (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_WRONG_STATE,
                                                          "The session was stopped before the motor started");
        } else if (!motor_start || status == -EPIPE)
                start_void_reply(p, op->call, status == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT, why);
        else if (status == -ENODEV) {
                nd_pen_stop_session(p, "device-lost");
                (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_DEVICE_GONE, "Pen %s went away during the start (%s)",
                                                  p->serial, why);
        } else {
                nd_pen_trip(p, "heartbeat-lost", why);
                (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_FAULT,
                                                  "Pen %s did not answer the motor start as it must (%s): it may have "
                                                  "run, so the session ended in fault heartbeat-lost", p->serial, why);
        }
        nd_pen_op_free(op);
}

static void start_motor_done(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || !p->starting) {
                start_failed(p, op, status < 0 ? status : -ECANCELED, "motor start", true);
                return;
        }
        p->session.running_since_us = nd_pen_now_mono_us(p);
        nd_pen_depth_settle_begin(p);
        p->starting = false;
        /* The session exists for clients from now on: its id first, then the state. */
        nd_pen_changed(p, PROP_SESSION | PROP_CARTRIDGE | PROP_PROGRESS);
        nd_pen_set_state(p, ND_PEN_RUNNING, NULL);
        (void) sd_bus_reply_method_return(op->call, "s", p->session.id);
        nd_pen_op_free(op);
}

static void start_speed_done(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || !p->starting) {
                start_failed(p, op, status < 0 ? status : -ECANCELED, "set speed", false);
                return;
        }
        int r = nd_pendev_motor_start(p->dev, start_motor_done, op);
        if (r < 0)
                start_failed(p, op, r, "motor start", false); /* not sent */
}

static void start_depth_done(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || !p->starting) {
                start_failed(p, op, status < 0 ? status : -ECANCELED, "set depth", false);
                return;
        }
        int r = nd_pendev_set_speed(p->dev, p->set_speed_hz, start_speed_done, op);
        if (r < 0)
                start_failed(p, op, r, "set speed", false);
}

/* Reads Start's options: label (s). Anything else is refused, so typos do not pass silently. */
/* Reads Start's options: label (s) and skin_type (s; checked by nd_profile_check_skin_type, so
 * a value that is not a type is an InvalidProfile violation, not a bad argument). */
static int parse_start_options(sd_bus_message *m, const char **label, const char **skin_type, sd_bus_error *error) {
        int r = sd_bus_message_rewind(m, true);
        if (r >= 0)
                r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Expected options a{sv}");
        *label = "";
        *skin_type = NULL;
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *key;
                if (sd_bus_message_read(m, "s", &key) < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed options");
                if (STREQ(key, "label")) {
                        if (sd_bus_message_read(m, "v", "s", label) < 0)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option label must be a string (s)");
                        size_t len = strlen(*label);
                        if (len > ND_SESSION_LABEL_MAX)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                         "Option label is %zu bytes long; at most %u", len, ND_SESSION_LABEL_MAX);
                        for (const char *c = *label; *c; c++)
                                if ((unsigned char) *c < 0x20 || *c == 0x7f)
                                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                                 "Option label contains a control character");
                } else if (STREQ(key, "skin_type")) {
                        if (sd_bus_message_read(m, "v", "s", skin_type) < 0)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                         "Option skin_type must be a string (s): I, II, III, IV, V or VI");
                } else {
                        _cleanup_free_ char *shown = nd_text_sanitize(key, strlen(key), ND_DIAG_VALUE_MAX);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Unknown option '%s' (Start knows: label, skin_type)", strempty(shown));
                }
                if (sd_bus_message_exit_container(m) < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed options");
        }
        return r < 0 ? sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed options") : 0;
}

/* Refuses a Start: the refusal goes to the audit trail, then the reply. */
_printf_(5, 6)
static void start_refuse(nd_pen *p, sd_bus_message *m, const nd_caller *caller, const char *error_name,
                         const char *fmt, ...) {
        _cleanup_free_ char *message = NULL;
        _cleanup_free_ char *detail = NULL;
        va_list ap;
        va_start(ap, fmt);
        int r = vasprintf(&message, fmt, ap);
        va_end(ap);
        if (r < 0)
                message = NULL;
        if (asprintf(&detail, "refused: %s: %s", error_name + strlen(ND_ERROR_PREFIX),
                     message ? message : "") < 0)
                detail = NULL;
        nd_audit(p->daemon, caller, "Start", p->serial, detail ? detail : "refused");
        (void) sd_bus_reply_method_errorf(m, error_name, "%s", message ? message : "Start refused");
}

static void start_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                             const nd_caller *caller, void *userdata) {
        nd_daemon *d = userdata;
        nd_pen *p = continuation_pen(m, allowed, auth_error, d);
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        const nd_limits *l = d->limits;
        const char *label, *skin_type_text;
        nd_skin_type skin_type = ND_SKIN_TYPE_NONE;
        double area_cm2 = 0.0;          /* the profile's treated surface; 0: none */
        const char *cartridge_before = "fresh"; /* the Cartridge state shown before this start */
        int r;

        if (!p)
                return;
        /* What the ledger knows of the cartridge is on its way (it was just inserted, or a session
         * on it just ended): this Start runs again when it comes. */
        if (nd_pen_cartridge_lookup_pending(p)) {
                nd_pen_op *op = nd_pen_op_new(p, m, 0);
                if (op && (op->caller_name = strdup(caller->name))) {
                        op->waits = ND_PEN_OP_WAITS_START;
                        op->caller_uid = caller->uid;
                        op->caller_pid = caller->pid;
                        return;
                }
                if (op)
                        nd_pen_op_free(op);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INTERNAL, "Out of memory");
                return;
        }
        if (p->cartridge_present && p->cartridge_lookup_failed) {
                nd_pen_cartridge_lookup(p); /* for the next Start */
                start_refuse(p, m, caller, ND_ERROR_STORAGE,
                             "What the ledger knows of cartridge %s could not be read, so it cannot be trusted to run",
                             p->cartridge_id);
                return;
        }
        if (parse_start_options(m, &label, &skin_type_text, &error) < 0) {
                (void) sd_bus_reply_method_error(m, &error);
                return;
        }
        /* The limits may have changed since arming: the armed profile is checked again, with the
         * pen's own checks; lib/interlocks.c decides, in its order, what refuses the start. */
        nd_interlock_pen reading = nd_pen_interlock_reading(p);
        nd_ledger_cartridge info;
        bool known = false;
        if (l && p->profile_yaml && p->cartridge_present) {
                _cleanup_(nd_profile_freep) nd_profile *again = NULL;
                r = nd_profile_parse(p->profile_yaml, strlen(p->profile_yaml), NULL, l, &again, &diags);
                if (r >= 0) {
                        nd_pen_caps caps = pen_caps(p);
                        r = nd_profile_check_pen(again, &caps, true, p->cartridge_needles, &diags);
                }
                /* The patient's skin type: meant for by the profile, within its cap, and given when
                 * the limits require one (lib/profile.c decides). */
                if (r >= 0 && diags.n_items == 0)
                        r = nd_profile_check_skin_type(again, l, skin_type_text, &skin_type, &diags);
                if (again && again->has_area_cm2)
                        area_cm2 = again->area_cm2;
                reading.profile_valid = r >= 0 && diags.n_items == 0;
                const char *cstate = nd_pen_cartridge_state(p, &info, &known);
                cartridge_before = cstate;
                reading.cartridge_rejected = STREQ(cstate, "rejected");
                reading.cartridge_spent = STREQ(cstate, "spent");
        }
        nd_interlock_refusal refusal = nd_interlock_may_start(l, &reading);
        switch (refusal) {
        case ND_INTERLOCK_ALLOWED:
                break;
        case ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE:
                start_refuse(p, m, caller, ND_ERROR_LIMITS_UNAVAILABLE, "No limits are in force: nothing can start");
                return;
        case ND_INTERLOCK_REFUSE_FAULT:
                start_refuse(p, m, caller, ND_ERROR_FAULT, "Pen %s is in fault (%s); clear it first", p->serial,
                             pen_fault_shown(p));
                return;
        case ND_INTERLOCK_REFUSE_WRONG_STATE:
                start_refuse(p, m, caller, ND_ERROR_WRONG_STATE, "Pen %s is %s: arm a profile first", p->serial,
                             p->starting ? "starting" : nd_pen_state_to_string(p->state));
                return;
        case ND_INTERLOCK_REFUSE_NO_CARTRIDGE:
                start_refuse(p, m, caller, ND_ERROR_NO_CARTRIDGE, "Pen %s has no cartridge", p->serial);
                return;
        case ND_INTERLOCK_REFUSE_INVALID_PROFILE: {
                /* The codes, and the skin type asked for, so the trail shows why. */
                char codes[256] = "";
                for (size_t i = 0; i < diags.n_items; i++)
                        snprintf(codes + strlen(codes), sizeof codes - strlen(codes), "%s%s", i ? "," : "",
                                 diags.items[i].code);
                _cleanup_free_ char *shown = skin_type_text ? nd_text_sanitize(skin_type_text, strlen(skin_type_text), 16) : NULL;
                _cleanup_free_ char *detail = NULL;
                if (asprintf(&detail, "refused: InvalidProfile: %s (skin-type %s)", codes,
                             shown && *shown ? shown : "none") < 0)
                        detail = NULL;
                nd_audit(d, caller, "Start", p->serial, detail ? detail : "refused: InvalidProfile");
                reply_invalid_profile(m, &diags);
                return;
        }
        case ND_INTERLOCK_REFUSE_CARTRIDGE_REJECTED:
                start_refuse(p, m, caller, ND_ERROR_INVALID_PROFILE,
                             "Cartridge %s has %u needles, which the limits do not allow", p->cartridge_id,
                             p->cartridge_needles);
                return;
        case ND_INTERLOCK_REFUSE_CARTRIDGE_SPENT:
                start_refuse(p, m, caller, ND_ERROR_CARTRIDGE_SPENT, "Cartridge %s has been used already (%s)",
                             p->cartridge_id, l->cartridge.single_use ? "single use" : "runtime used up");
                return;
        case ND_INTERLOCK_REFUSE_LOW_BATTERY:
                start_refuse(p, m, caller, ND_ERROR_LOW_BATTERY, "Battery at %u %%: no start below %u %%",
                             p->battery_percent, l->pen.min_battery_percent);
                return;
        case ND_INTERLOCK_REFUSE_OVER_TEMPERATURE:
        case _ND_INTERLOCK_REFUSAL_MAX:
                start_refuse(p, m, caller, nd_pen_refusal_error_name(refusal), "Pen %s may not start (%s)", p->serial,
                             strempty(nd_interlock_refusal_to_string(refusal)));
                return;
        }
        if (!d->ledger) {
                start_refuse(p, m, caller, ND_ERROR_STORAGE,
                                                  "The treatment ledger is not available, so the session cannot be recorded "
                                                  "(no record, no treatment): %s", strempty(d->ledger_error));
                return;
        }

        /* Record first, synced; only then the motor. */
        nd_pen_session *ss = &p->session;
        memset(ss, 0, sizeof *ss);
        ss->skin_type = ND_SKIN_TYPE_NONE;
        r = nd_ledger_session_id_new(ss->id);
        nd_ledger_session_start rec = {
                .id = ss->id, .pen_serial = p->serial, .cartridge_id = p->cartridge_id, .needles = p->cartridge_needles,
                .profile_name = p->profile->name, .profile_yaml = p->profile_yaml, .profile_digest = p->profile->digest,
                .limits_digest = l->digest, .label = label, .owner_uid = caller->uid, .owner_pid = caller->pid,
                .owner_name = caller->name, .start_us = nd_now_realtime_us(), .single_use = l->cartridge.single_use,
                .cartridge_max_runtime_s = l->cartridge.max_runtime_s,
                .skin_type = nd_skin_type_to_string(skin_type),
                .area_cm2 = area_cm2,
        };
        if (r >= 0)
                r = nd_ledger_session_begin(d->ledger, &rec);
        if (r == -ESTALE) {
                start_refuse(p, m, caller, ND_ERROR_CARTRIDGE_SPENT, "Cartridge %s may not run again: %s",
                                                  p->cartridge_id, nd_ledger_last_error(d->ledger));
                return;
        }
        if (r < 0) {
                pen_log(p, LOG_ERR, "%s: session not recorded, not started: %s", p->serial, nd_ledger_last_error(d->ledger));
                start_refuse(p, m, caller, ND_ERROR_STORAGE,
                                                  "The session could not be recorded, so it does not start: %s",
                                                  nd_ledger_last_error(d->ledger));
                return;
        }
        ss->owner_name = strdup(caller->name);
        ss->owner_uid = caller->uid;
        ss->owner_pid = caller->pid;
        ss->cartridge_runtime_before_s = known ? info.runtime_s : 0.0;
        snprintf(ss->cartridge_id, sizeof ss->cartridge_id, "%s", p->cartridge_id);
        ss->single_use = rec.single_use;
        ss->cartridge_max_runtime_s = rec.cartridge_max_runtime_s;
        ss->skin_type = skin_type;
        ss->needles = p->cartridge_needles;
        ss->area_cm2 = rec.area_cm2;
        ss->cartridge_state_before = cartridge_before;
        r = sd_bus_track_new(d->bus, &ss->owner, nd_pen_on_owner_gone, p);
        if (r >= 0)
                r = sd_bus_track_add_sender(ss->owner, m);
        if (r >= 0 && l->session.client_heartbeat_timeout_ms > 0)
                r = sd_event_add_time_relative(d->event, &ss->client_heartbeat, CLOCK_MONOTONIC,
                                               (uint64_t) l->session.client_heartbeat_timeout_ms * USEC_PER_MSEC,
                                               USEC_PER_MSEC, nd_pen_on_client_heartbeat_timeout, p);
        /* Recorded, not yet announced: clients see the session once its motor runs
         * (start_motor_done); a start that never reaches the motor is voided, unseen. */
        p->session_active = true;
        p->starting = true;
        p->last_progress_us = nd_pen_now_mono_us(p);
        if (r < 0 || !ss->owner_name) {
                char why[96];
                snprintf(why, sizeof why, "cannot track the session's owner: %s", strerror(r < 0 ? -r : ENOMEM));
                start_void_reply(p, m, ND_ERROR_INTERNAL, why);
                return;
        }
        nd_pen_op *op = nd_pen_op_new(p, m, 0);
        r = op ? nd_pendev_set_depth(p->dev, p->set_depth_mm, start_depth_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
                char why[96];
                snprintf(why, sizeof why, "the depth could not be sent to the pen: %s", strerror(-r));
                start_void_reply(p, m, r == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT, why);
                return;
        }
        char detail[320];
        snprintf(detail, sizeof detail, "session %s profile %s cartridge %s label %s skin-type %s", ss->id,
                 p->profile->name, p->cartridge_id, label, skin_type == ND_SKIN_TYPE_NONE ? "none" : nd_skin_type_to_string(skin_type));
        pen_log(p, LOG_NOTICE, "%s: starting %s", p->serial, detail);
}

void nd_pen_start_resume(nd_pen_op *op) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = sd_bus_message_ref(op->call);
        _cleanup_free_ char *name = TAKE_PTR(op->caller_name);
        nd_caller caller = { .name = name, .uid = op->caller_uid, .pid = op->caller_pid };
        nd_daemon *d = op->pen->daemon;
        nd_pen_op_free(op);
        start_authorized(m, true, NULL, &caller, d);
}

/* ---- Owner-only adjustments ------------------------------------------------------------------------ */

/* Replies and returns false unless m's sender owns the session in progress. */
static bool check_owner(nd_pen *p, sd_bus_message *m, const char *what) {
        if (!p->session_active) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_WRONG_STATE, "Cannot %s: pen %s has no session in progress (%s)",
                                                  what, p->serial, nd_pen_state_to_string(p->state));
                return false;
        }
        if (!STREQ(strempty(sd_bus_message_get_sender(m)), strempty(p->session.owner_name))) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_NOT_OWNER,
                                                  "Cannot %s: the session on pen %s belongs to %s", what, p->serial,
                                                  strempty(p->session.owner_name));
                return false;
        }
        return true;
}

static void pause_done(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        (void) sd_bus_reply_method_return(op->call, NULL); /* the stop went out; a lost ack changes nothing */
        nd_pen_op_free(op);
}

static void pause_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                             const nd_caller *caller, void *userdata) {
        nd_pen *p = continuation_pen(m, allowed, auth_error, userdata);
        if (!p || !check_owner(p, m, "pause"))
                return;
        if (p->state != ND_PEN_RUNNING) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_WRONG_STATE, "Cannot pause: pen %s is %s", p->serial,
                                                  p->starting ? "starting" : nd_pen_state_to_string(p->state));
                return;
        }
        nd_pen_op *op = nd_pen_op_new(p, m, 0);
        int r = op ? nd_pendev_motor_stop(p->dev, pause_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
                nd_pen_trip(p, "stop-failed", "the motor stop for a pause could not be sent");
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The pen could not be paused: %s", strerror(-r));
                return;
        }
        /* Paused from now: the stop is on its way and bypasses every queue. */
        p->session.elapsed_before_us += nd_pen_now_mono_us(p) - p->session.running_since_us;
        p->session.running_since_us = 0;
        p->session.interlock.stall_since_us = 0;
        p->session.last_device_time_us = 0;
        /* The running figures stop here: the Cartridge's runtime and the progress as they end up,
         * not as the last tick left them (up to a second behind). */
        nd_pen_changed(p, PROP_CARTRIDGE | PROP_PROGRESS);
        nd_pen_set_state(p, ND_PEN_PAUSED, NULL);
        nd_audit(p->daemon, caller, "Pause", p->serial, p->session.id);
}

static void resume_done(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || p->state != ND_PEN_PAUSED || !p->session_active) {
                if (status < 0 && p->session_active) {
                        char why[96];
                        snprintf(why, sizeof why, "motor start on resume: %s", nd_pen_command_error(status));
                        if (status == -EPIPE)
                                /* The pen answered no: the motor is still stopped, the session stays paused. */
                                (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_FAULT,
                                                                  "Pen %s did not resume (%s): the session stays paused",
                                                                  p->serial, why);
                        else {
                                /* No answer (or not one): it may be running; stop it, in fault. */
                                nd_pen_trip(p, "heartbeat-lost", why);
                                (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_FAULT, "The pen did not resume: %s",
                                                                  why);
                        }
                } else
                        (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_WRONG_STATE, "The session ended before it resumed");
                nd_pen_op_free(op);
                return;
        }
        p->session.running_since_us = nd_pen_now_mono_us(p);
        nd_pen_depth_settle_begin(p);
        nd_pen_set_state(p, ND_PEN_RUNNING, NULL);
        (void) sd_bus_reply_method_return(op->call, NULL);
        nd_pen_op_free(op);
}

static void resume_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                              const nd_caller *caller, void *userdata) {
        nd_pen *p = continuation_pen(m, allowed, auth_error, userdata);
        const nd_limits *l;
        if (!p || !check_owner(p, m, "resume"))
                return;
        l = p->daemon->limits;
        if (p->state != ND_PEN_PAUSED) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_WRONG_STATE, "Cannot resume: pen %s is %s", p->serial,
                                                  nd_pen_state_to_string(p->state));
                return;
        }
        nd_interlock_pen reading = nd_pen_interlock_reading(p);
        nd_interlock_refusal refusal = nd_interlock_may_resume(l, &reading);
        switch (refusal) {
        case ND_INTERLOCK_ALLOWED:
                break;
        case ND_INTERLOCK_REFUSE_LOW_BATTERY:
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_LOW_BATTERY, "Battery at %u %%: no start below %u %%",
                                                  p->battery_percent, l->pen.min_battery_percent);
                return;
        case ND_INTERLOCK_REFUSE_OVER_TEMPERATURE:
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The handpiece is at %.1f °C, above the %.1f °C maximum",
                                                  p->temperature_c, l->pen.max_temperature_c);
                return;
        default:
                (void) sd_bus_reply_method_errorf(m, nd_pen_refusal_error_name(refusal), "Cannot resume: %s",
                                                  strempty(nd_interlock_refusal_to_string(refusal)));
                return;
        }
        nd_pen_op *op = nd_pen_op_new(p, m, 0);
        int r = op ? nd_pendev_motor_start(p->dev, resume_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The pen could not resume: %s", strerror(-r));
                return;
        }
        nd_audit(p->daemon, caller, "Resume", p->serial, p->session.id);
}

static void setpoint_done(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        bool depth = STREQ(sd_bus_message_get_member(op->call), "SetDepth");
        if (status < 0) {
                (void) sd_bus_reply_method_errorf(op->call, status == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT,
                                                  "The pen did not take the new %s: %s", depth ? "depth" : "speed",
                                                  nd_pen_command_error(status));
                nd_pen_op_free(op);
                return;
        }
        /* The set point as the pen has it: whole µm, whole centi-Hz (docs/protocol.md). */
        if (depth) {
                p->set_depth_mm = round(op->value * 1000.0) / 1000.0;
                if (p->session_active)
                        nd_pen_depth_settle_begin(p);
        } else {
                p->set_speed_hz = round(op->value * 100.0) / 100.0;
                if (p->session_active)
                        nd_pen_depth_settle_begin(p); /* the stall check waits for the new speed too */
        }
        p->session.interlock.stall_since_us = 0;
        nd_pen_changed(p, PROP_SETPOINTS);
        (void) sd_bus_reply_method_return(op->call, NULL);
        nd_pen_op_free(op);
}

static void setpoint_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                const nd_caller *caller, void *userdata) {
        nd_pen *p = continuation_pen(m, allowed, auth_error, userdata);
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        bool depth;
        double value;
        int r;

        if (!p)
                return;
        depth = STREQ(sd_bus_message_get_member(m), "SetDepth");
        if (sd_bus_message_rewind(m, true) < 0 || sd_bus_message_read(m, "d", &value) < 0) {
                (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_INVALID_ARGS, "Expected one double");
                return;
        }
        if (!isfinite(value)) {
                (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_INVALID_ARGS, "%s must be a finite number",
                                                  depth ? "The depth" : "The speed");
                return;
        }
        if (!check_owner(p, m, depth ? "set the depth" : "set the speed"))
                return;
        if (p->state != ND_PEN_RUNNING && p->state != ND_PEN_PAUSED) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_WRONG_STATE, "Pen %s is starting", p->serial);
                return;
        }
        const nd_proto_identity *id = nd_pendev_get_identity(p->dev);
        r = depth ? nd_limits_check_depth_for_skin(p->daemon->limits, p->profile->area, p->session.skin_type, value, &diags)
                  : nd_limits_check_speed(p->daemon->limits, p->profile->area, value, &diags);
        if (r < 0) {
                nd_audit(p->daemon, caller, depth ? "SetDepth" : "SetSpeed", p->serial, "refused: beyond the limits");
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_LIMIT_EXCEEDED, "%s",
                                                  diags.n_items ? diags.items[0].message : "beyond the limits");
                return;
        }
        r = depth ? nd_proto_check_depth(id, value) : nd_proto_check_speed(id, value);
        if (r < 0) {
                if (depth)
                        (void) sd_bus_reply_method_errorf(m, ND_ERROR_LIMIT_EXCEEDED,
                                                          r == -EDOM ? "depth %.3f mm is not on the pen's %.3f mm grid"
                                                                     : "depth %.3f mm is outside the pen's %.3f to %.3f mm",
                                                          value, r == -EDOM ? id->depth_step_mm : id->depth_min_mm,
                                                          id->depth_max_mm);
                else
                        (void) sd_bus_reply_method_errorf(m, ND_ERROR_LIMIT_EXCEEDED,
                                                          "speed %.2f Hz is outside the pen's %.2f to %.2f Hz", value,
                                                          id->speed_min_hz, id->speed_max_hz);
                return;
        }
        nd_pen_op *op = nd_pen_op_new(p, m, value);
        r = op ? (depth ? nd_pendev_set_depth(p->dev, value, setpoint_done, op)
                        : nd_pendev_set_speed(p->dev, value, setpoint_done, op))
               : -ENOMEM;
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The new set point could not be sent: %s", strerror(-r));
                return;
        }
        if (depth)
                nd_interlock_settle_begin(&p->session.interlock); /* until the pen has the new depth */
        char detail[96];
        snprintf(detail, sizeof detail, "%s %.3f", depth ? "depth_mm" : "speed_hz", value);
        nd_audit(p->daemon, caller, depth ? "SetDepth" : "SetSpeed", p->serial, detail);
}

static void heartbeat_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                 const nd_caller *caller, void *userdata) {
        nd_pen *p = continuation_pen(m, allowed, auth_error, userdata);
        if (!p || !check_owner(p, m, "send a heartbeat"))
                return;
        if (p->session.client_heartbeat) {
                const nd_limits *l = p->daemon->limits;
                (void) sd_event_source_set_time_relative(p->session.client_heartbeat,
                                                         (uint64_t) l->session.client_heartbeat_timeout_ms * USEC_PER_MSEC);
                (void) sd_event_source_set_enabled(p->session.client_heartbeat, SD_EVENT_ONESHOT);
        }
        (void) sd_bus_reply_method_return(m, NULL);
}

/* ---- Stop: no authorization, never refused while the pen is connected ------------------------------- */

static int method_stop(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        nd_caller caller = caller_of(m);

        nd_pen_motor_stop(p);
        const char *was = nd_pen_state_to_string(p->state);
        if (p->session_active)
                nd_pen_stop_session(p, "stopped");
        nd_audit(p->daemon, &caller, "Stop", p->serial, was);
        return sd_bus_reply_method_return(m, NULL);
}

/* ---- ClearFault --------------------------------------------------------------------------------------- */

static void clear_faults_done(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0) {
                (void) sd_bus_reply_method_errorf(op->call, status == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT,
                                                  "The pen still reports a fault (%s)", nd_pen_command_error(status));
        } else if (p->state == ND_PEN_FAULT) {
                /* The pen took it: what it reported latched before is gone. */
                p->pen_faults = 0;
                p->faults_cleared_mono_us = nd_pen_now_mono_us(p);
                p->clean_since_clear = false;
                nd_pen_disarm(p);
                nd_pen_set_state(p, ND_PEN_IDLE, NULL);
                (void) sd_bus_reply_method_return(op->call, NULL);
        } else
                (void) sd_bus_reply_method_return(op->call, NULL);
        nd_pen_op_free(op);
}

static void clear_fault_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                   const nd_caller *caller, void *userdata) {
        nd_pen *p = continuation_pen(m, allowed, auth_error, userdata);
        char why[160];
        if (!p)
                return;
        if (p->state != ND_PEN_FAULT) {
                (void) sd_bus_reply_method_return(m, NULL); /* nothing to clear */
                return;
        }
        nd_interlock_pen reading = nd_pen_interlock_reading(p);
        if (!nd_interlock_may_clear_fault(p->daemon->limits, &reading, why, sizeof why)) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "Fault %s is not cleared: %s", strempty(p->fault), why);
                return;
        }
        nd_audit(p->daemon, caller, "ClearFault", p->serial, strempty(p->fault));
        /* The pen refuses (STALLs) while its own latched fault's cause remains. */
        nd_pen_op *op = nd_pen_op_new(p, m, 0);
        int r = op ? nd_pendev_clear_faults(p->dev, clear_faults_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The pen cannot be asked to clear its faults: %s",
                                                  strerror(-r));
        }
}

/* ---- OpenTelemetry ------------------------------------------------------------------------------------ */

static int method_open_telemetry(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        _cleanup_close_ int fd = -1;
        int r = nd_telemetry_open_reader(p->telemetry, &fd);
        if (r == -EMFILE)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED, "Pen %s has %u telemetry readers already",
                                         p->serial, ND_TELEMETRY_READERS_MAX);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot open a telemetry socket: %s", strerror(-r));
        return sd_bus_reply_method_return(m, "h", fd);
}

static int method_open_telemetry_pipe(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        _cleanup_close_ int fd = -1;
        int r = nd_telemetry_open_pipe_reader(p->telemetry, &fd);
        if (r == -EMFILE)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED, "Pen %s has %u telemetry readers already",
                                         p->serial, ND_TELEMETRY_READERS_MAX);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot open a telemetry pipe: %s", strerror(-r));
        return sd_bus_reply_method_return(m, "h", fd);
}

static int method_watch_telemetry(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        int r = nd_telemetry_watch(p->telemetry, sd_bus_message_get_sender(m));
        if (r == -EMFILE)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED, "Pen %s has %u telemetry watchers already",
                                         p->serial, ND_TELEMETRY_WATCHERS_MAX);
        if (r == -EINVAL)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS,
                                        "WatchTelemetry needs a caller with a unique bus name");
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot watch the telemetry: %s", strerror(-r));
        return sd_bus_reply_method_return(m, NULL);
}

static int method_unwatch_telemetry(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        (void) nd_telemetry_unwatch(p->telemetry, sd_bus_message_get_sender(m));
        return sd_bus_reply_method_return(m, NULL);
}

void nd_pen_emit_session_recorded(nd_pen *p, const char *session_id, const char *reason, uint64_t end_us,
                                  const nd_ledger_stats *stats, bool recorded) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        sd_bus *bus = p->daemon->bus;
        if (!p->exported || !bus || sd_bus_is_open(bus) <= 0)
                return;
        int r = sd_bus_message_new_signal(bus, &m, p->path, ND_PEN_INTERFACE, "SessionRecorded");
        if (r >= 0)
                r = sd_bus_message_append(m, "s", session_id);
        if (r >= 0)
                r = sd_bus_message_append(m, "a{sv}", 11, "reason", "s", reason, "end", "t", end_us, "duration_s", "d",
                                          stats->duration_s, "strokes", "t", stats->strokes, "punctures", "t",
                                          stats->punctures, "density_per_cm2", "d", stats->density_per_cm2,
                                          "max_depth_mm", "d",
                                          stats->max_depth_mm, "max_speed_hz", "d", stats->max_speed_hz,
                                          "max_temperature_c", "d", stats->max_temperature_c, "max_current_ma", "d",
                                          stats->max_current_ma, "recorded", "b", (int) recorded);
        if (r >= 0)
                r = sd_bus_send(bus, m, NULL);
        if (r < 0)
                pen_log(p, LOG_WARNING, "%s: could not emit SessionRecorded for %s: %s", p->serial, session_id,
                        strerror(-r));
}

/* ---- Export ----------------------------------------------------------------------------------------- */

/* Plain fields are read by offset (sd-bus's own getter; a NULL string reads as ""): the vtable's
 * userdata is the nd_pen that pen_object_find returns. */
_Static_assert(sizeof(((nd_pen *) NULL)->generation) == sizeof(uint32_t), "Generation is read as u");
_Static_assert(sizeof(((nd_pen *) NULL)->battery_percent) == sizeof(uint32_t), "BatteryPercent is read as u");
_Static_assert(sizeof(((nd_pen *) NULL)->set_depth_mm) == sizeof(double), "DepthMm is read as d");

/* Every method goes through the bouncer (daemon/bouncer.c): the vtable knows no other handler.
 * Methods that need authorization continue with the daemon and find the pen again by path, since
 * it may have gone while polkit was asked. */
static const nd_method pen_methods[] = {
        { "LoadProfile", load_profile_authorized, NULL },
        { "LoadProfileData", load_profile_data_authorized, NULL },
        { "Start", start_authorized, NULL },
        { "Pause", pause_authorized, NULL },
        { "Resume", resume_authorized, NULL },
        { "SetDepth", setpoint_authorized, NULL },
        { "SetSpeed", setpoint_authorized, NULL },
        { "Heartbeat", heartbeat_authorized, NULL },
        { "ClearFault", clear_fault_authorized, NULL },
        { "Stop", NULL, method_stop },
        { "OpenTelemetry", NULL, method_open_telemetry },
        { "OpenTelemetryPipe", NULL, method_open_telemetry_pipe },
        { "WatchTelemetry", NULL, method_watch_telemetry },
        { "UnwatchTelemetry", NULL, method_unwatch_telemetry },
};

static int pen_dispatch(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        return nd_bouncer_dispatch(p->daemon->bouncer, m, pen_methods, ELEMENTSOF(pen_methods), p, p->daemon, error);
}

static const sd_bus_vtable pen_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Serial", "s", NULL, offsetof(nd_pen, serial), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Model", "s", prop_identity_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("FirmwareVersion", "s", prop_identity_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("ProtocolVersion", "u", prop_protocol_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Generation", "u", NULL, offsetof(nd_pen, generation), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Simulated", "b", prop_simulated, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("State", "s", prop_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Fault", "s", NULL, offsetof(nd_pen, fault), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Warnings", "as", prop_warnings, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Profile", "a{sv}", prop_profile, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("DepthMm", "d", NULL, offsetof(nd_pen, set_depth_mm), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("SpeedHz", "d", NULL, offsetof(nd_pen, set_speed_hz), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("DepthRangeMm", "(dd)", prop_range, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("DepthStepMm", "d", prop_depth_step, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("SpeedRangeHz", "(dd)", prop_range, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("BatteryPercent", "u", NULL, offsetof(nd_pen, battery_percent), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("TemperatureC", "d", NULL, offsetof(nd_pen, temperature_c), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Cartridge", "a{sv}", prop_cartridge, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("SessionId", "s", prop_session_id, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ElapsedS", "d", prop_elapsed, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Strokes", "t", prop_strokes, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Punctures", "t", prop_punctures, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("DensityPerCm2", "d", prop_density, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("SkinType", "s", prop_skin_type, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("TelemetryRateHz", "u", prop_rate, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD_WITH_ARGS("LoadProfile", SD_BUS_ARGS("s", name), SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("LoadProfileData", SD_BUS_ARGS("s", yaml), SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Start", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("s", session_id),
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Pause", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Resume", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetDepth", SD_BUS_ARGS("d", mm), SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetSpeed", SD_BUS_ARGS("d", hz), SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Stop", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Heartbeat", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ClearFault", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("OpenTelemetry", SD_BUS_NO_ARGS, SD_BUS_RESULT("h", fd),
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("OpenTelemetryPipe", SD_BUS_NO_ARGS, SD_BUS_RESULT("h", fd),
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("WatchTelemetry", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("UnwatchTelemetry", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                pen_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_ARGS("Telemetry", SD_BUS_ARGS("a(tuddddu)", samples), 0),
        SD_BUS_SIGNAL_WITH_ARGS("SessionEnded", SD_BUS_ARGS("s", session_id, "s", reason), 0),
        SD_BUS_SIGNAL_WITH_ARGS("SessionRecorded", SD_BUS_ARGS("s", session_id, "a{sv}", figures), 0),
        SD_BUS_VTABLE_END
};

/* ---- Announcements carry only changes ------------------------------------------------------------- */

/* FNV-1a, 64 bits: a fingerprint of a value's text form. */
static uint64_t fingerprint(const char *s, size_t n) {
        uint64_t h = UINT64_C(14695981039346656037);
        for (size_t i = 0; i < n; i++) {
                h ^= (unsigned char) s[i];
                h *= UINT64_C(1099511628211);
        }
        return h;
}

/* The fingerprint of one property's current value, through the getter clients reach. */
static int property_fingerprint(nd_pen *p, const sd_bus_vtable *v, uint64_t *ret) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        const char *sig = v->x.property.signature;
        int r = sd_bus_message_new_signal(p->daemon->bus, &m, p->path, ND_PEN_INTERFACE, "Fingerprint");
        if (r < 0)
                return r;
        if (v->x.property.get)
                r = v->x.property.get(p->daemon->bus, p->path, ND_PEN_INTERFACE, v->x.property.member, m, p, &error);
        else {
                const uint8_t *field = (const uint8_t *) p + v->x.property.offset;
                if (STREQ(sig, "s"))
                        r = sd_bus_message_append(m, "s", strempty(*(char *const *) (const void *) field));
                else if (STREQ(sig, "u"))
                        r = sd_bus_message_append(m, "u", *(const uint32_t *) (const void *) field);
                else if (STREQ(sig, "d"))
                        r = sd_bus_message_append(m, "d", *(const double *) (const void *) field);
                else
                        r = -EOPNOTSUPP;
        }
        if (r >= 0)
                r = sd_bus_message_seal(m, 1, 0);
        if (r < 0)
                return r;
        _cleanup_free_ char *text = NULL;
        size_t size = 0;
        _cleanup_(fclosep) FILE *f = open_memstream(&text, &size);
        if (!f)
                return -errno;
        r = sd_bus_message_dump(m, f, 0);
        if (r < 0)
                return r;
        if (fflush(f) != 0)
                return -EIO;
        *ret = fingerprint(text, size);
        return 0;
}

static const sd_bus_vtable *find_property(const char *name, unsigned *index) {
        unsigned i = 0;
        for (const sd_bus_vtable *v = pen_vtable; v->type != _SD_BUS_VTABLE_END; v++)
                if (v->type == _SD_BUS_VTABLE_PROPERTY) {
                        if (STREQ(v->x.property.member, name)) {
                                *index = i;
                                return i < ND_PEN_ANNOUNCED_MAX ? v : NULL;
                        }
                        i++;
                }
        return NULL;
}

size_t nd_pen_keep_changed_properties(nd_pen *p, const char **names) {
        size_t kept = 0;
        for (size_t i = 0; names[i]; i++) {
                unsigned index = 0;
                uint64_t h = 0;
                const sd_bus_vtable *v = find_property(names[i], &index);
                /* Whatever cannot be fingerprinted is announced, as before. */
                bool changed = !v || property_fingerprint(p, v, &h) < 0;
                if (!changed) {
                        uint64_t bit = UINT64_C(1) << index;
                        changed = !(p->announced_known & bit) || p->announced_hash[index] != h;
                        p->announced_hash[index] = h;
                        p->announced_known |= bit;
                }
                if (changed)
                        names[kept++] = names[i];
        }
        names[kept] = NULL;
        return kept;
}

void nd_pen_remember_announced(nd_pen *p) {
        unsigned index = 0;
        p->announced_known = 0;
        for (const sd_bus_vtable *v = pen_vtable; v->type != _SD_BUS_VTABLE_END; v++) {
                if (v->type != _SD_BUS_VTABLE_PROPERTY)
                        continue;
                uint64_t h;
                if (index < ND_PEN_ANNOUNCED_MAX && (v->flags & SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE) &&
                    property_fingerprint(p, v, &h) >= 0) {
                        p->announced_hash[index] = h;
                        p->announced_known |= UINT64_C(1) << index;
                }
                index++;
        }
}

static int pen_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
                           sd_bus_error *error) {
        nd_pen *p = nd_pen_find_by_path(userdata, path);
        if (!p)
                return 0;
        *found = p;
        return 1;
}

/* Frees a NULL-terminated list of strings. */
static void strv_freep(char ***l) {
        for (char **i = *l; i && *i; i++)
                free(*i);
        free(*l);
}

static int pen_enumerate(sd_bus *bus, const char *prefix, void *userdata, char ***nodes, sd_bus_error *error) {
        nd_daemon *d = userdata;
        _cleanup_(strv_freep) char **l = calloc(d->n_pens + 1, sizeof *l);
        unsigned n = 0;
        if (!l)
                return -ENOMEM;
        for (unsigned i = 0; i < d->n_pens; i++) {
                if (!d->pens[i]->exported)
                        continue;
                l[n] = strdup(d->pens[i]->path);
                if (!l[n])
                        return -ENOMEM;
                n++;
        }
        *nodes = TAKE_PTR(l);
        return 1;
}

int nd_pen_export_all(nd_daemon *d) {
        int r = sd_bus_add_fallback_vtable(d->bus, &d->pen_vtable_slot, ND_PEN_PATH_PREFIX, ND_PEN_INTERFACE, pen_vtable,
                                           pen_object_find, d);
        if (r < 0)
                return r;
        return sd_bus_add_node_enumerator(d->bus, &d->pen_enumerator_slot, ND_PEN_PATH_PREFIX, pen_enumerate, d);
}
