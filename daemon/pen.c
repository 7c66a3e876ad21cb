/* pen.c: org.needled1.Pen: one connected pen, its treatment state machine, its interlocks, its
 * session and its telemetry. Every telemetry sample is checked against the limits in force in
 * the loop iteration that decoded it; a tripped interlock sends the motor stop at once. */
#include <errno.h>
#include <stdarg.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon.h"
#include "errors.h"
#include "log.h"
#include "pen.h"
#include "pendev.h"
#include "telemetry.h"
#include "transport-sim.h"
#include "util.h"

/* Low-rate properties are announced at most this often (the contract's ~4 Hz). */
#define PROPERTY_COALESCE_USEC (250 * USEC_PER_MSEC)
/* A running session's figures reach the ledger this often. */
#define PROGRESS_INTERVAL_USEC (1000 * USEC_PER_MSEC)
/* After the depth set point changes (or the motor starts), the needle needs time to get there
 * before a difference between set and measured depth means a fault. Counted on the pen's own
 * clock from the moment the pen reports the change in force (see depth_settle_begin()). */
#define DEPTH_SETTLE_US 150000u
/* After a motor start or a speed change the motor needs time to reach its speed: below the
 * stall fraction during this time is spin-up, not a stall (then stall_time_ms applies). */
#define SPINUP_GRACE_US 300000u

_Static_assert(ND_PEN_HEARTBEAT_MIN_MS >= ND_PROTO_WATCHDOG_MIN_MS && ND_PEN_HEARTBEAT_MAX_MS <= ND_PROTO_WATCHDOG_MAX_MS,
               "every heartbeat_timeout_ms the limits file accepts must be one the pen's watchdog accepts");
/* Longest label a client may attach to a session (an opaque reference, no patient data). */
#define LABEL_MAX 128
/* Largest profile YAML a client may send (the loader refuses larger ones too). */
#define PROFILE_DATA_MAX ND_PROFILE_TEXT_MAX

typedef enum pen_prop {
        PROP_STATE        = 1u << 0,  /* State, Fault */
        PROP_PROFILE      = 1u << 1,
        PROP_SETPOINTS    = 1u << 2,  /* DepthMm, SpeedHz */
        PROP_BATTERY      = 1u << 3,
        PROP_TEMPERATURE  = 1u << 4,
        PROP_CARTRIDGE    = 1u << 5,
        PROP_SESSION      = 1u << 6,  /* SessionId */
        PROP_PROGRESS     = 1u << 7,  /* ElapsedS, Strokes */
        PROP_WARNINGS     = 1u << 8,
        PROP_RATE         = 1u << 9,
} pen_prop;

#define PROPS_LOW_RATE (PROP_BATTERY | PROP_TEMPERATURE | PROP_PROGRESS | PROP_WARNINGS)

typedef struct pen_session {
        char id[ND_LEDGER_SESSION_ID_SIZE];
        sd_bus_track *owner;          /* the caller of Start; leaving the bus stops the session */
        char *owner_name;
        uint32_t owner_uid, owner_pid;
        uint64_t running_since_us;    /* CLOCK_MONOTONIC when the motor last started; 0 paused */
        uint64_t elapsed_before_us;   /* running time before the last start */
        uint64_t last_device_time_us; /* for stroke counting */
        double strokes;
        nd_ledger_stats stats;
        double cartridge_runtime_before_s;
        sd_event_source *client_heartbeat;
        /* Depth is checked only on samples the pen measured from depth_check_from_ts on (its
         * 32-bit clock, as in samples), once the pen has told us when the change took effect. */
        bool depth_check_known;
        uint32_t depth_check_from_ts;
        uint32_t stall_check_from_ts; /* likewise for the stall check (spin-up grace) */
        unsigned depth_settle_queries;
        uint32_t last_sample_ts;      /* the pen's clock of the latest sample seen */
        uint64_t stall_since_us;      /* 0: speed fine */
} pen_session;

struct nd_pen {
        nd_daemon *daemon;
        nd_pendev *dev;
        nd_penmodel *model;           /* simulated pens only */
        sd_bus_message *pending_add;  /* Simulator.AddPen waiting for identification */
        sd_bus_message *pending_remove; /* Simulator.RemovePen waiting for the departure */
        char *serial;
        char *path;
        uint32_t generation;
        bool exported;
        nd_telemetry *telemetry;

        nd_pen_state state;
        char *fault;                  /* code while in fault */
        nd_profile *profile;          /* armed */
        char *profile_yaml;           /* its bytes, for the ledger's snapshot */
        double set_depth_mm, set_speed_hz;

        /* Last measured values. */
        bool have_sample;
        double temperature_c;
        unsigned battery_percent;
        uint8_t last_status;
        uint64_t last_sample_mono_us;

        /* The inserted cartridge. */
        bool cartridge_present;
        char cartridge_id[ND_PROTO_CARTRIDGE_ID_SIZE + 1];
        unsigned cartridge_needles;
        bool cartridge_query_pending;
        unsigned stops_in_flight;     /* motor stops sent and not yet acknowledged */

        /* A start in progress: the session is recorded, its commands are on their way to the
         * pen; the Start call itself waits in its pen_op. Cleared when the session ends. */
        bool starting;
        bool session_active;
        pen_session session;

        unsigned dirty;               /* low-rate properties changed since the last announcement */
        sd_event_source *tick;        /* coalescing, progress, duration */
        uint64_t last_progress_us;
};

static const char *const state_names[] = {
        [ND_PEN_IDLE] = "idle", [ND_PEN_ARMED] = "armed", [ND_PEN_RUNNING] = "running",
        [ND_PEN_PAUSED] = "paused", [ND_PEN_FAULT] = "fault",
};

const char *nd_pen_state_to_string(nd_pen_state s) {
        return (size_t) s < ELEMENTSOF(state_names) ? state_names[s] : "fault";
}

const char *nd_pen_get_path(const nd_pen *p) { return p->path; }
const char *nd_pen_get_serial(const nd_pen *p) { return p->serial; }
nd_penmodel *nd_pen_get_model(const nd_pen *p) { return p->model; }
nd_transport *nd_pen_get_transport(const nd_pen *p) { return p->dev ? nd_pendev_get_transport(p->dev) : NULL; }

static uint64_t now_mono_us(const nd_pen *p) {
        uint64_t t = 0;
        (void) sd_event_now(p->daemon->event, CLOCK_MONOTONIC, &t);
        return t;
}

static uint64_t now_realtime_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

bool nd_pen_is_exported(const nd_pen *p) { return p->exported; }
bool nd_pen_in_session(const nd_pen *p) { return p->session_active || p->starting; }

nd_pen *nd_pen_find_by_path(nd_daemon *d, const char *path) {
        for (unsigned i = 0; path && i < d->n_pens; i++)
                if (d->pens[i]->exported && STREQ(d->pens[i]->path, path))
                        return d->pens[i];
        return NULL;
}

static nd_pen *find_by_serial(nd_daemon *d, const char *serial) {
        for (unsigned i = 0; i < d->n_pens; i++)
                if (d->pens[i]->exported && STREQ(d->pens[i]->serial, serial))
                        return d->pens[i];
        return NULL;
}

static const char *pen_log_fields_serial(const nd_pen *p, char *buf, size_t size) {
        snprintf(buf, size, "PEN_SERIAL=%s", p->serial ? p->serial : "");
        return buf;
}

#define pen_log(p, level, ...)                                                              \
        do {                                                                                \
                char _f[64];                                                                \
                nd_log_full(level, (const char *const[]) { pen_log_fields_serial(p, _f, sizeof _f), NULL }, \
                            __VA_ARGS__);                                                   \
        } while (0)

/* ---- Audit --------------------------------------------------------------------------------- */

void nd_pen_audit(nd_daemon *d, const nd_caller *caller, const char *action, const char *object, const char *detail) {
        const char *actor = caller && caller->name ? caller->name : ND_LEDGER_ACTOR_DAEMON;
        uint32_t uid = caller ? caller->uid : (uint32_t) geteuid();
        uint32_t pid = caller ? caller->pid : (uint32_t) getpid();
        int r = d->ledger ? nd_ledger_audit(d->ledger, now_realtime_us(), uid, pid, actor, action, strempty(object),
                                            strempty(detail))
                          : -ENODEV;
        if (r < 0)
                nd_log_full(LOG_ERR, (const char *const[]) { "NEEDLED_EVENT=audit-lost", NULL },
                            "audit entry not recorded (%s): actor=%s uid=%u pid=%u action=%s object=%s detail=%s",
                            d->ledger ? nd_ledger_last_error(d->ledger) : "no ledger", actor, uid, pid, action,
                            strempty(object), strempty(detail));
}

static nd_caller caller_of(sd_bus_message *m) {
        return (nd_caller) { .name = sd_bus_message_get_sender(m), .uid = ND_CALLER_UNKNOWN, .pid = ND_CALLER_UNKNOWN };
}

/* ---- Properties announcements ---------------------------------------------------------------- */

static void pen_emit(nd_pen *p, unsigned props) {
        if (!p->exported || !props)
                return;
        const char *names[16];
        size_t n = 0;
        if (props & PROP_STATE) { names[n++] = "State"; names[n++] = "Fault"; }
        if (props & PROP_PROFILE) names[n++] = "Profile";
        if (props & PROP_SETPOINTS) { names[n++] = "DepthMm"; names[n++] = "SpeedHz"; }
        if (props & PROP_BATTERY) names[n++] = "BatteryPercent";
        if (props & PROP_TEMPERATURE) names[n++] = "TemperatureC";
        if (props & PROP_CARTRIDGE) names[n++] = "Cartridge";
        if (props & PROP_SESSION) names[n++] = "SessionId";
        if (props & PROP_PROGRESS) { names[n++] = "ElapsedS"; names[n++] = "Strokes"; }
        if (props & PROP_WARNINGS) names[n++] = "Warnings";
        if (props & PROP_RATE) names[n++] = "TelemetryRateHz";
        names[n] = NULL;
        char **strv = (char **) names;
        int r = sd_bus_emit_properties_changed_strv(p->daemon->bus, p->path, ND_PEN_INTERFACE, strv);
        if (r < 0)
                pen_log(p, LOG_WARNING, "%s: could not announce property changes: %s", p->serial, strerror(-r));
}

/* State-like properties go out at once; low-rate ones wait for the tick. */
static void pen_changed(nd_pen *p, unsigned props) {
        unsigned now = props & ~PROPS_LOW_RATE;
        p->dirty |= props & PROPS_LOW_RATE;
        if (now)
                pen_emit(p, now);
}

/* ---- Derived values -------------------------------------------------------------------------- */

static double session_elapsed_s(const nd_pen *p) {
        if (!p->session_active)
                return 0.0;
        uint64_t us = p->session.elapsed_before_us;
        if (p->session.running_since_us)
                us += now_mono_us(p) - p->session.running_since_us;
        return (double) us / (double) USEC_PER_SEC;
}

static const nd_area_limits *pen_area(const nd_pen *p, const nd_limits *limits) {
        if (!limits || !p->profile || !p->profile->area)
                return NULL;
        return nd_limits_find_area(limits, p->profile->area);
}

/* What the ledger knows of the inserted cartridge, and whether it may run. */
static const char *cartridge_state(const nd_pen *p, nd_ledger_cartridge *info, bool *known) {
        const nd_limits *limits = p->daemon->limits;
        *known = false;
        if (!p->cartridge_present)
                return "none";
        if (limits) {
                bool allowed = false;
                for (size_t i = 0; i < limits->cartridge.n_allowed_needles; i++)
                        allowed = allowed || limits->cartridge.allowed_needles[i] == p->cartridge_needles;
                if (!allowed)
                        return "rejected";
        }
        if (p->session_active)
                return "in-use";
        if (p->daemon->ledger && nd_ledger_cartridge_get(p->daemon->ledger, p->cartridge_id, info) >= 0) {
                *known = true;
                if (info->state == ND_LEDGER_CARTRIDGE_SPENT)
                        return "spent";
                if (limits && limits->cartridge.max_runtime_s > 0 &&
                    info->runtime_s >= (double) limits->cartridge.max_runtime_s)
                        return "spent";
                return info->state == ND_LEDGER_CARTRIDGE_FRESH ? "fresh" : "in-use";
        }
        return "fresh";
}

/* ---- Property getters -------------------------------------------------------------------------- */

#define PEN_FROM(userdata) ((nd_pen *) (userdata))

static int prop_serial(sd_bus *bus, const char *path, const char *interface, const char *property,
                       sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", PEN_FROM(userdata)->serial);
}

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

static int prop_generation(sd_bus *bus, const char *path, const char *interface, const char *property,
                           sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "u", PEN_FROM(userdata)->generation);
}

static int prop_simulated(sd_bus *bus, const char *path, const char *interface, const char *property,
                          sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "b", PEN_FROM(userdata)->model != NULL);
}

static int prop_state(sd_bus *bus, const char *path, const char *interface, const char *property,
                      sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", nd_pen_state_to_string(PEN_FROM(userdata)->state));
}

static int prop_fault(sd_bus *bus, const char *path, const char *interface, const char *property,
                      sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", strempty(PEN_FROM(userdata)->fault));
}

static int prop_warnings(sd_bus *bus, const char *path, const char *interface, const char *property,
                         sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        const nd_limits *l = p->daemon->limits;
        int r = sd_bus_message_open_container(reply, 'a', "s");
        if (r >= 0 && l && p->have_sample && p->temperature_c >= l->pen.warn_temperature_c)
                r = sd_bus_message_append(reply, "s", "high-temperature");
        if (r >= 0 && l && p->have_sample && p->battery_percent < l->pen.min_battery_percent)
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

static int prop_setpoint(sd_bus *bus, const char *path, const char *interface, const char *property,
                         sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        return sd_bus_message_append(reply, "d", STREQ(property, "DepthMm") ? p->set_depth_mm : p->set_speed_hz);
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

static int prop_battery(sd_bus *bus, const char *path, const char *interface, const char *property,
                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "u", (uint32_t) PEN_FROM(userdata)->battery_percent);
}

static int prop_temperature(sd_bus *bus, const char *path, const char *interface, const char *property,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "d", PEN_FROM(userdata)->temperature_c);
}

static int prop_cartridge(sd_bus *bus, const char *path, const char *interface, const char *property,
                          sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        nd_ledger_cartridge info = { .runtime_s = 0 };
        bool known;
        const char *state = cartridge_state(p, &info, &known);
        double runtime_s = known ? info.runtime_s : 0.0;
        if (p->session_active)
                runtime_s = p->session.cartridge_runtime_before_s + session_elapsed_s(p);
        return sd_bus_message_append(reply, "a{sv}", 4, "id", "s", p->cartridge_present ? p->cartridge_id : "",
                                     "needles", "u", p->cartridge_present ? (uint32_t) p->cartridge_needles : 0u,
                                     "state", "s", state, "runtime_s", "u", (uint32_t) floor(runtime_s));
}

static int prop_session_id(sd_bus *bus, const char *path, const char *interface, const char *property,
                           sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        return sd_bus_message_append(reply, "s", p->session_active ? p->session.id : "");
}

static int prop_elapsed(sd_bus *bus, const char *path, const char *interface, const char *property,
                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "d", session_elapsed_s(PEN_FROM(userdata)));
}

static int prop_strokes(sd_bus *bus, const char *path, const char *interface, const char *property,
                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        return sd_bus_message_append(reply, "t", p->session_active ? (uint64_t) floor(p->session.strokes) : UINT64_C(0));
}

static int prop_rate(sd_bus *bus, const char *path, const char *interface, const char *property,
                     sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "u", (uint32_t) nd_pendev_get_telemetry_rate_hz(PEN_FROM(userdata)->dev));
}

/* ---- Calls waiting for the pen ------------------------------------------------------------------ */

/* A method call whose reply waits for the pen's acknowledgement. Kept on the pen so that a pen
 * that goes away still answers every caller (DeviceGone). */
typedef struct pen_op pen_op;
struct pen_op {
        nd_pen *pen;
        pen_op *next;
        sd_bus_message *call;
        double value;
};

static pen_op *pen_ops; /* all pens' ops: few, short-lived */

static pen_op *op_new(nd_pen *p, sd_bus_message *call, double value) {
        pen_op *op = calloc(1, sizeof *op);
        if (!op)
                return NULL;
        op->pen = p;
        op->call = sd_bus_message_ref(call);
        op->value = value;
        op->next = pen_ops;
        pen_ops = op;
        return op;
}

static void op_free(pen_op *op) {
        for (pen_op **pp = &pen_ops; *pp; pp = &(*pp)->next)
                if (*pp == op) {
                        *pp = op->next;
                        break;
                }
        sd_bus_message_unref(op->call);
        free(op);
}

/* Answers every call still waiting on p with DeviceGone. */
static void ops_fail_all(nd_pen *p, const char *why) {
        for (pen_op *op = pen_ops, *next; op; op = next) {
                next = op->next;
                if (op->pen != p)
                        continue;
                (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_DEVICE_GONE, "Pen %s is gone: %s", p->serial, why);
                op_free(op);
        }
}

static const char *pen_command_error(int status) {
        switch (status) {
        case -EPIPE: return "the pen refused the command";
        case -ETIMEDOUT: return "the pen did not answer";
        case -ENODEV: return "the pen is gone";
        case -ECANCELED: return "a stop overtook the command";
        case -EBADMSG: return "the pen sent a malformed answer";
        default: return "the command failed";
        }
}

/* ---- State ------------------------------------------------------------------------------------- */

static void pen_set_state(nd_pen *p, nd_pen_state state, const char *fault) {
        bool changed = p->state != state || !STREQ(strempty(p->fault), strempty(fault));
        p->state = state;
        free(p->fault);
        p->fault = fault ? strdup(fault) : NULL;
        if (changed) {
                pen_log(p, state == ND_PEN_FAULT ? LOG_WARNING : LOG_INFO, "%s: state %s%s%s", p->serial,
                        nd_pen_state_to_string(state), fault ? ", fault " : "", strempty(fault));
                pen_changed(p, PROP_STATE);
        }
}

static void pen_disarm(nd_pen *p) {
        bool had = p->profile != NULL;
        nd_profile_free(p->profile);
        p->profile = NULL;
        free(p->profile_yaml);
        p->profile_yaml = NULL;
        if (had)
                pen_changed(p, PROP_PROFILE);
}

static void on_stop_acked(nd_pendev *dev, int status, void *userdata) {
        nd_pen *p = userdata;
        if (p->stops_in_flight > 0)
                p->stops_in_flight--;
        if (status < 0)
                pen_log(p, LOG_ERR, "%s: motor stop not acknowledged: %s (the pen's own watchdog stops it "
                        "when the heartbeat stops)", p->serial, pen_command_error(status));
}

/* Sends the motor stop now; it bypasses every queue (pendev.h). */
static void pen_motor_stop(nd_pen *p) {
        if (!p->dev)
                return;
        int r = nd_pendev_motor_stop(p->dev, on_stop_acked, p);
        if (r >= 0)
                p->stops_in_flight++;
        else if (r != -ENODEV)
                pen_log(p, LOG_ERR, "%s: could not send the motor stop: %s", p->serial, strerror(-r));
}

static void session_stats_now(nd_pen *p, nd_ledger_stats *stats) {
        *stats = p->session.stats;
        stats->duration_s = session_elapsed_s(p);
        stats->strokes = (uint64_t) floor(p->session.strokes);
}

static int on_client_heartbeat_timeout(sd_event_source *s, uint64_t usec, void *userdata);

/* Ends the session in progress: records it, announces it, and leaves the pen idle (disarmed)
 * or, after a fault, in fault. The motor stop has been sent already. */
static void session_end(nd_pen *p, const char *reason, const char *fault) {
        if (!p->session_active)
                return;
        nd_daemon *d = p->daemon;
        nd_ledger_stats stats;
        session_stats_now(p, &stats);
        uint64_t end_us = now_realtime_us();

        if (d->ledger) {
                int r = nd_ledger_session_end(d->ledger, p->session.id, end_us, &stats, reason);
                if (r < 0)
                        pen_log(p, LOG_ERR, "%s: the end of session %s (%s) was not recorded: %s", p->serial,
                                p->session.id, reason, nd_ledger_last_error(d->ledger));
        }
        pen_log(p, LOG_NOTICE, "%s: session %s ended: %s after %.1f s, %" PRIu64 " strokes", p->serial,
                p->session.id, reason, stats.duration_s, stats.strokes);

        /* Every sample of the session reaches clients before the signal that ends it. */
        nd_telemetry_flush(p->telemetry);
        if (p->exported)
                (void) sd_bus_emit_signal(d->bus, p->path, ND_PEN_INTERFACE, "SessionEnded", "ss", p->session.id, reason);

        p->starting = false; /* a Start still waiting for the pen learns it from its op */
        sd_bus_track_unref(p->session.owner);
        free(p->session.owner_name);
        sd_event_source_disable_unref(p->session.client_heartbeat);
        memset(&p->session, 0, sizeof p->session);
        p->session_active = false;

        if (fault)
                pen_set_state(p, ND_PEN_FAULT, fault);
        else {
                pen_disarm(p);
                pen_set_state(p, ND_PEN_IDLE, NULL);
        }
        pen_changed(p, PROP_SESSION | PROP_PROGRESS | PROP_CARTRIDGE);
}

/* An interlock tripped: the stop goes out first, then the record. */
static void pen_trip(nd_pen *p, const char *code, const char *why) {
        pen_motor_stop(p);
        char fields[2][96];
        snprintf(fields[0], sizeof fields[0], "PEN_SERIAL=%s", p->serial);
        snprintf(fields[1], sizeof fields[1], "NEEDLED_FAULT=%s", code);
        nd_log_full(LOG_WARNING, (const char *const[]) { fields[0], fields[1], NULL },
                    "%s: interlock %s: %s: motor stopped", p->serial, code, why);
        char action[96];
        snprintf(action, sizeof action, "interlock:%s", code);
        nd_pen_audit(p->daemon, NULL, action, p->serial, why);
        if (p->session_active) {
                char reason[96];
                snprintf(reason, sizeof reason, "fault:%s", code);
                session_end(p, reason, code);
        } else
                pen_set_state(p, ND_PEN_FAULT, code);
}

/* Ends the session for a reason that is not a fault (stop, completion, owner gone, ...). */
static void pen_stop_session(nd_pen *p, const char *reason) {
        pen_motor_stop(p);
        session_end(p, reason, NULL);
}

/* ---- Interlocks --------------------------------------------------------------------------------- */

static void on_settle_status(nd_pendev *dev, int status, const nd_proto_status *st, void *userdata) {
        nd_pen *p = userdata;
        /* Answers come in the order asked: only the latest one counts. */
        if (--p->session.depth_settle_queries > 0 || !p->session_active)
                return;
        if (status < 0) {
                /* The pen does not answer: the heartbeat and telemetry checks deal with that.
                 * Depth is checked again from the next sample on, after the settle time. */
                p->session.depth_check_from_ts = p->session.last_sample_ts + DEPTH_SETTLE_US;
                p->session.stall_check_from_ts = p->session.last_sample_ts + SPINUP_GRACE_US;
        } else {
                p->session.depth_check_from_ts = st->timestamp_us + DEPTH_SETTLE_US;
                p->session.stall_check_from_ts = st->timestamp_us + SPINUP_GRACE_US;
        }
        p->session.depth_check_known = true;
}

/* A new depth (or a motor start) has been acknowledged: the depth check pauses until the pen,
 * asked now, says when that was on its own clock; then the settle time runs from there. A
 * daemon running behind its telemetry thus never judges an old sample against a new set point. */
static void depth_settle_begin(nd_pen *p) {
        p->session.depth_check_known = false;
        if (nd_pendev_query_status(p->dev, on_settle_status, p) >= 0)
                p->session.depth_settle_queries++;
}

/* Checks one sample while a session runs. Returns true when it tripped (the stop is out). */
static bool check_interlocks(nd_pen *p, const nd_pendev_sample *ps, uint64_t now_us) {
        const nd_limits *l = p->daemon->limits;
        const nd_proto_sample *s = &ps->s;
        char why[192];

        if (!l) /* cannot happen while running: limits in force are never dropped */
                return false;
        if (s->faults) {
                const char *code = NULL;
                for (unsigned bit = 1; bit <= ND_PROTO_FAULT_ALL && !code; bit <<= 1)
                        if (s->faults & bit)
                                code = nd_proto_fault_name((uint8_t) bit);
                snprintf(why, sizeof why, "the pen reports fault bits 0x%02x", s->faults);
                pen_trip(p, code ? code : "pen-fault", why);
                return true;
        }
        if (s->battery_percent < l->pen.stop_battery_percent) {
                snprintf(why, sizeof why, "battery %u %% is below the %u %% cut-off", s->battery_percent,
                         l->pen.stop_battery_percent);
                pen_trip(p, "low-battery", why);
                return true;
        }
        if (p->state != ND_PEN_RUNNING)
                return false;
        if (s->temperature_c > l->pen.max_temperature_c) {
                snprintf(why, sizeof why, "handpiece temperature %.2f °C is above the %.2f °C maximum",
                         s->temperature_c, l->pen.max_temperature_c);
                pen_trip(p, "over-temperature", why);
                return true;
        }
        if (s->current_ma > l->pen.max_current_ma) {
                snprintf(why, sizeof why, "motor current %.0f mA is above the %.0f mA maximum", s->current_ma,
                         l->pen.max_current_ma);
                pen_trip(p, "over-current", why);
                return true;
        }
        bool spinning_up = !p->session.depth_check_known ||
                           (int32_t) (s->timestamp_us - p->session.stall_check_from_ts) < 0;
        if (!spinning_up && s->speed_hz < l->pen.stall_speed_fraction * p->set_speed_hz) {
                if (p->session.stall_since_us == 0)
                        p->session.stall_since_us = ps->device_time_us ? ps->device_time_us : 1;
                else if (ps->device_time_us - p->session.stall_since_us >= (uint64_t) l->pen.stall_time_ms * USEC_PER_MSEC) {
                        snprintf(why, sizeof why, "speed %.1f Hz has been below %.0f %% of the %.1f Hz set for %u ms",
                                 s->speed_hz, l->pen.stall_speed_fraction * 100.0, p->set_speed_hz, l->pen.stall_time_ms);
                        pen_trip(p, "motor-stall", why);
                        return true;
                }
        } else
                p->session.stall_since_us = 0;
        if (p->session.depth_check_known && (int32_t) (s->timestamp_us - p->session.depth_check_from_ts) >= 0 &&
            fabs(s->depth_mm - p->set_depth_mm) > l->pen.depth_tolerance_mm) {
                snprintf(why, sizeof why, "measured depth %.3f mm differs from the %.3f mm set by more than %.3f mm",
                         s->depth_mm, p->set_depth_mm, l->pen.depth_tolerance_mm);
                pen_trip(p, "depth-deviation", why);
                return true;
        }
        if (l->cartridge.max_runtime_s > 0 &&
            p->session.cartridge_runtime_before_s + session_elapsed_s(p) >= (double) l->cartridge.max_runtime_s) {
                snprintf(why, sizeof why, "cartridge %s reached its %u s runtime limit", p->cartridge_id,
                         l->cartridge.max_runtime_s);
                pen_trip(p, "cartridge-expired", why);
                return true;
        }
        return false;
}

/* The session's time is up (profile duration, or a tighter limit since it started). */
static void check_duration(nd_pen *p) {
        if (!p->session_active || p->state != ND_PEN_RUNNING || !p->profile)
                return;
        const nd_limits *l = p->daemon->limits;
        double elapsed = session_elapsed_s(p);
        double profile_s = (double) p->profile->duration_s;
        const nd_area_limits *area = pen_area(p, l);
        double limit_s = area ? (double) nd_limits_area_max_duration_s(l, area)
                              : (l ? (double) l->session.max_duration_s : profile_s);
        if (elapsed >= profile_s)
                pen_stop_session(p, "completed");
        else if (elapsed >= limit_s) {
                char why[128];
                snprintf(why, sizeof why, "the session reached the %.0f s maximum of the limits", limit_s);
                pen_trip(p, "session-duration", why);
        }
}

/* ---- Telemetry --------------------------------------------------------------------------------- */

static void on_cartridge(nd_pendev *dev, int status, const nd_proto_cartridge *c, void *userdata);

static void pen_query_cartridge(nd_pen *p) {
        if (p->cartridge_query_pending)
                return;
        if (nd_pendev_query_cartridge(p->dev, on_cartridge, p) >= 0)
                p->cartridge_query_pending = true;
}

static void on_samples(nd_pendev *dev, const nd_pendev_sample *samples, size_t n, void *userdata) {
        nd_pen *p = userdata;
        uint64_t now_us = now_mono_us(p);

        /* A pen refused in on_ready (duplicate serial, no resources) has no telemetry fan-out and
         * waits for its deferred free; what its link still delivers until then is dropped. */
        if (!p->exported)
                return;
        for (size_t i = 0; i < n; i++) {
                const nd_pendev_sample *ps = &samples[i];
                const nd_proto_sample *s = &ps->s;

                if (p->session_active)
                        p->session.last_sample_ts = s->timestamp_us;
                /* Safety first: the stop goes out before anything else is done with the sample. */
                if (p->session_active && (p->state == ND_PEN_RUNNING || p->state == ND_PEN_PAUSED))
                        (void) check_interlocks(p, ps, now_us);

                if (p->session_active && p->state == ND_PEN_RUNNING) {
                        pen_session *ss = &p->session;
                        if (ss->last_device_time_us && ps->device_time_us > ss->last_device_time_us)
                                ss->strokes += s->speed_hz * (double) (ps->device_time_us - ss->last_device_time_us) /
                                               (double) USEC_PER_SEC;
                        ss->last_device_time_us = ps->device_time_us;
                        ss->stats.max_depth_mm = MAX(ss->stats.max_depth_mm, s->depth_mm);
                        ss->stats.max_speed_hz = MAX(ss->stats.max_speed_hz, s->speed_hz);
                        ss->stats.max_temperature_c = MAX(ss->stats.max_temperature_c, s->temperature_c);
                        ss->stats.max_current_ma = MAX(ss->stats.max_current_ma, s->current_ma);
                        p->dirty |= PROP_PROGRESS;
                }

                nd_telemetry_sample ts = {
                        .device_time_us = ps->device_time_us,
                        .host_time_us = now_us,
                        .sequence = s->sequence,
                        .flags = (uint32_t) s->status | (uint32_t) s->faults << 8,
                        .depth_mm = s->depth_mm,
                        .speed_hz = s->speed_hz,
                        .current_ma = s->current_ma,
                        .temperature_c = s->temperature_c,
                        .battery_percent = s->battery_percent,
                };
                nd_telemetry_push(p->telemetry, &ts);

                if (!p->have_sample || s->temperature_c != p->temperature_c)
                        p->dirty |= PROP_TEMPERATURE | PROP_WARNINGS;
                if (!p->have_sample || s->battery_percent != p->battery_percent)
                        p->dirty |= PROP_BATTERY | PROP_WARNINGS;
                bool cartridge_bit = s->status & ND_PROTO_STATUS_CARTRIDGE_PRESENT;
                if (p->have_sample && cartridge_bit != (bool) (p->last_status & ND_PROTO_STATUS_CARTRIDGE_PRESENT))
                        pen_query_cartridge(p);
                p->temperature_c = s->temperature_c;
                p->battery_percent = s->battery_percent;
                p->last_status = s->status;
                p->have_sample = true;
                p->last_sample_mono_us = now_us;
        }
}

static void on_cartridge(nd_pendev *dev, int status, const nd_proto_cartridge *c, void *userdata) {
        nd_pen *p = userdata;
        p->cartridge_query_pending = false;
        if (status < 0) {
                pen_log(p, LOG_WARNING, "%s: cartridge query failed: %s", p->serial, pen_command_error(status));
                return;
        }
        bool was_present = p->cartridge_present;
        char old_id[sizeof p->cartridge_id];
        memcpy(old_id, p->cartridge_id, sizeof old_id);

        p->cartridge_present = c->present;
        snprintf(p->cartridge_id, sizeof p->cartridge_id, "%s", c->present ? c->id : "");
        p->cartridge_needles = c->present ? c->needles : 0;
        if (was_present != p->cartridge_present || !STREQ(old_id, p->cartridge_id)) {
                pen_log(p, LOG_INFO, "%s: cartridge %s%s", p->serial, c->present ? "inserted: " : "removed",
                        c->present ? c->id : "");
                pen_changed(p, PROP_CARTRIDGE);
                /* A cartridge pulled out (or swapped) during a session ends it. */
                if (p->session_active && (!c->present || !STREQ(old_id, p->cartridge_id)))
                        pen_trip(p, "cartridge-removed", "the cartridge was removed during the session");
        }
}

/* ---- The tick: coalesced properties, ledger progress, duration ----------------------------------- */

static int on_tick(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_pen *p = userdata;
        nd_daemon *d = p->daemon;

        check_duration(p);
        if (p->session_active && p->state == ND_PEN_RUNNING && d->ledger &&
            usec - p->last_progress_us >= PROGRESS_INTERVAL_USEC) {
                nd_ledger_stats stats;
                session_stats_now(p, &stats);
                if (nd_ledger_session_progress(d->ledger, p->session.id, now_realtime_us(), &stats) < 0)
                        pen_log(p, LOG_WARNING, "%s: session progress not recorded: %s", p->serial,
                                nd_ledger_last_error(d->ledger));
                p->last_progress_us = usec;
                p->dirty |= PROP_CARTRIDGE;
        }
        if (p->dirty) {
                pen_emit(p, p->dirty);
                p->dirty = 0;
        }
        (void) sd_event_source_set_time(s, usec + PROPERTY_COALESCE_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ON);
}

/* ---- Arrival and departure ----------------------------------------------------------------------- */

/* Serial -> how many times that pen has connected, for Generation. */
typedef struct known_pen {
        char *serial;
        uint32_t generation;
} known_pen;
static known_pen *known_pens;
static size_t n_known_pens;

static uint32_t next_generation(const char *serial) {
        for (size_t i = 0; i < n_known_pens; i++)
                if (STREQ(known_pens[i].serial, serial))
                        return ++known_pens[i].generation;
        known_pen *n = realloc(known_pens, (n_known_pens + 1) * sizeof *n);
        char *copy = strdup(serial);
        if (!n || !copy) {
                free(copy);
                if (n)
                        known_pens = n;
                return 1;
        }
        known_pens = n;
        known_pens[n_known_pens++] = (known_pen) { .serial = copy, .generation = 1 };
        return 1;
}

static void pen_free(nd_pen *p);

static void pen_remove_from_daemon(nd_pen *p) {
        nd_daemon *d = p->daemon;
        for (unsigned i = 0; i < d->n_pens; i++)
                if (d->pens[i] == p) {
                        memmove(d->pens + i, d->pens + i + 1, (d->n_pens - i - 1) * sizeof *d->pens);
                        d->n_pens--;
                        break;
                }
}

/* The pen leaves: its session ends, its object goes, callers waiting on it get DeviceGone. */
static void pen_depart(nd_pen *p, const char *reason) {
        nd_daemon *d = p->daemon;
        if (p->session_active)
                session_end(p, reason, NULL);
        ops_fail_all(p, reason);
        if (p->pending_add) {
                (void) sd_bus_reply_method_errorf(p->pending_add, ND_ERROR_DEVICE_GONE,
                                                  "The simulated pen could not be identified: %s", reason);
                p->pending_add = sd_bus_message_unref(p->pending_add);
        }
        if (p->exported) {
                nd_telemetry_flush(p->telemetry);
                (void) sd_bus_emit_object_removed(d->bus, p->path);
                (void) sd_bus_emit_properties_changed(d->bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "Pens", NULL);
                p->exported = false;
                pen_log(p, LOG_NOTICE, "%s: pen removed (%s)", p->serial, reason);
        }
        if (p->pending_remove) {
                (void) sd_bus_reply_method_return(p->pending_remove, NULL);
                p->pending_remove = sd_bus_message_unref(p->pending_remove);
        }
}

static int on_free_deferred(sd_event_source *s, void *userdata) {
        sd_event_source_unref(s);
        pen_free(userdata);
        return 0;
}

/* Frees the pen from the loop: the pendev's callback that reported the departure is still on
 * the stack. */
static void pen_free_later(nd_pen *p) {
        if (sd_event_add_defer(p->daemon->event, NULL, on_free_deferred, p) < 0)
                pen_log(p, LOG_ERR, "%s: could not schedule the clean-up of the pen; it leaks", strempty(p->serial));
}

static void on_ready(nd_pendev *dev, void *userdata) {
        nd_pen *p = userdata;
        nd_daemon *d = p->daemon;
        const char *serial = nd_pendev_get_serial(dev);
        int r;

        if (find_by_serial(d, serial)) {
                pen_log(p, LOG_ERR, "a second pen with serial %s (%s) is refused: serials must be unique", serial,
                        nd_transport_describe(nd_pendev_get_transport(dev)));
                pen_depart(p, "duplicate serial");
                pen_free_later(p);
                return;
        }
        p->serial = strdup(serial);
        r = p->serial ? sd_bus_path_encode(ND_PEN_PATH_PREFIX, serial, &p->path) : -ENOMEM;
        if (r >= 0)
                r = nd_telemetry_new(d->event, d->bus, p->path, &p->telemetry);
        if (r < 0) {
                pen_log(p, LOG_ERR, "pen %s: cannot serve it: %s", serial, strerror(-r));
                pen_depart(p, "out of resources");
                pen_free_later(p);
                return;
        }
        p->generation = next_generation(serial);
        const nd_proto_cartridge *c = nd_pendev_get_cartridge(dev);
        if (c && c->present) {
                p->cartridge_present = true;
                snprintf(p->cartridge_id, sizeof p->cartridge_id, "%s", c->id);
                p->cartridge_needles = c->needles;
        }
        const nd_proto_status *st = nd_pendev_get_status(dev);
        if (st) {
                p->battery_percent = st->battery_percent;
                p->temperature_c = st->temperature_c;
                p->set_depth_mm = st->set_depth_mm;
                p->set_speed_hz = st->set_speed_hz;
                p->last_status = st->status;
                /* A pen that arrives with its motor running (a daemon restart) is stopped. */
                if (st->motor_running)
                        pen_motor_stop(p);
        }
        p->exported = true;
        (void) sd_bus_emit_object_added(d->bus, p->path);
        (void) sd_bus_emit_properties_changed(d->bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "Pens", NULL);
        const nd_proto_identity *id = nd_pendev_get_identity(dev);
        pen_log(p, LOG_NOTICE, "%s: pen connected: %s, firmware %s, protocol %u.%u, generation %u, %s", serial,
                id->model, id->firmware_version, id->protocol_major, id->protocol_minor, p->generation,
                nd_transport_describe(nd_pendev_get_transport(dev)));
        if (p->pending_add) {
                (void) sd_bus_reply_method_return(p->pending_add, "o", p->path);
                p->pending_add = sd_bus_message_unref(p->pending_add);
        }
}

static void on_error(nd_pendev *dev, const nd_pendev_error *e, void *userdata) {
        nd_pen *p = userdata;
        switch (e->kind) {
        case ND_PENDEV_ERROR_GONE:
                pen_depart(p, "device-lost");
                pen_free_later(p);
                return;
        case ND_PENDEV_ERROR_IDENTIFY:
        case ND_PENDEV_ERROR_VERSION:
        case ND_PENDEV_ERROR_SETUP:
                /* pendev logged the details; the pen never appears on the bus. */
                pen_depart(p, e->message);
                pen_free_later(p);
                return;
        case ND_PENDEV_ERROR_TELEMETRY_CORRUPT:
        case ND_PENDEV_ERROR_TELEMETRY_RESYNC: /* the pen's count restarted: it may have reset */
                if (p->session_active)
                        pen_trip(p, "telemetry-corrupt", e->message);
                return;
        case ND_PENDEV_ERROR_TELEMETRY_STALLED:
        case ND_PENDEV_ERROR_HEARTBEAT:
                if (p->session_active)
                        pen_trip(p, "heartbeat-lost", e->message);
                return;
        case ND_PENDEV_ERROR_TELEMETRY_GAP:
        case ND_PENDEV_ERROR_TELEMETRY_DUPLICATE:
        case _ND_PENDEV_ERROR_KIND_MAX:
                return; /* counted and logged by pendev; the interlocks see every sample that came */
        }
}

static const nd_pendev_callbacks pendev_callbacks = {
        .ready = on_ready,
        .samples = on_samples,
        .error = on_error,
};

int nd_pen_attach(nd_daemon *d, nd_transport *transport, nd_penmodel *model, sd_bus_message *add_call) {
        nd_pen *p = calloc(1, sizeof *p);
        nd_pen **pens = realloc(d->pens, (d->n_pens + 1) * sizeof *pens);
        nd_pendev_config config;
        int r;

        if (pens)
                d->pens = pens;
        if (!p || !pens) {
                free(p);
                nd_transport_free(transport);
                return -ENOMEM;
        }
        d->pens[d->n_pens++] = p;
        p->daemon = d;
        p->pending_add = add_call ? sd_bus_message_ref(add_call) : NULL;
        p->state = ND_PEN_IDLE;
        p->model = model ? nd_penmodel_ref(model) : NULL;
        nd_pendev_config_init(&config);
        if (d->limits)
                config.heartbeat_timeout_ms = d->limits->pen.heartbeat_timeout_ms;
        r = nd_pendev_new(transport, &config, &pendev_callbacks, p, &p->dev);
        if (r >= 0)
                r = sd_event_add_time_relative(d->event, &p->tick, CLOCK_MONOTONIC, PROPERTY_COALESCE_USEC,
                                               USEC_PER_MSEC, on_tick, p);
        if (r < 0) {
                /* The caller answers its call itself. */
                p->pending_add = sd_bus_message_unref(p->pending_add);
                pen_free(p);
                return r;
        }
        return 0;
}

int nd_pen_unplug(nd_pen *p, sd_bus_message *remove_call) {
        nd_transport *t = nd_pen_get_transport(p);
        if (!p->model || !t)
                return -EINVAL;
        if (p->pending_remove)
                return -EBUSY;
        int r = nd_transport_sim_unplug(t);
        if (r >= 0)
                p->pending_remove = sd_bus_message_ref(remove_call);
        return r;
}

static void refresh_cartridge_done(nd_pendev *dev, int status, const nd_proto_cartridge *c, void *userdata) {
        pen_op *op = userdata;
        nd_pen *p = op->pen;
        p->cartridge_query_pending = false;
        on_cartridge(dev, status, c, p);
        if (status < 0)
                (void) sd_bus_reply_method_errorf(op->call, status == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT,
                                                  "Pen %s did not report its cartridge: %s", p->serial,
                                                  pen_command_error(status));
        else
                (void) sd_bus_reply_method_return(op->call, NULL);
        op_free(op);
}

int nd_pen_refresh_cartridge(nd_pen *p, sd_bus_message *call) {
        pen_op *op = op_new(p, call, 0);
        int r = op ? nd_pendev_query_cartridge(p->dev, refresh_cartridge_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        op_free(op);
                return sd_bus_reply_method_errorf(call, ND_ERROR_DEVICE_GONE, "The pen did not answer: %s", strerror(-r));
        }
        return 1;
}

static void pen_free(nd_pen *p) {
        if (!p)
                return;
        pen_depart(p, "daemon-stop");
        pen_remove_from_daemon(p);
        sd_event_source_disable_unref(p->tick);
        nd_pendev_free(p->dev);
        nd_telemetry_free(p->telemetry);
        nd_penmodel_unref(p->model);
        nd_profile_free(p->profile);
        free(p->profile_yaml);
        free(p->fault);
        free(p->serial);
        free(p->path);
        free(p);
}

/* ---- Methods: helpers ------------------------------------------------------------------------ */

/* Runs the bouncer for m; cont finds the pen again by path when the verdict comes, since the
 * pen may have gone in between. */
static int pen_authorize(sd_bus_message *m, nd_pen *p, sd_bus_error *error, nd_auth_done_fn cont) {
        int r = nd_bouncer_check(p->daemon->bouncer, m, cont, p->daemon);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED, "Could not check authorization: %s",
                                         strerror(-r));
        return 1;
}

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

static bool reply_if_busy(nd_pen *p, sd_bus_message *m, const char *what) {
        if (p->state == ND_PEN_FAULT) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "Cannot %s: pen %s is in fault (%s); clear it first",
                                                  what, p->serial, strempty(p->fault));
                return true;
        }
        if (p->session_active || p->starting) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_WRONG_STATE, "Cannot %s: pen %s is %s", what, p->serial,
                                                  p->starting ? "starting" : nd_pen_state_to_string(p->state));
                return true;
        }
        return false;
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
                nd_pen_audit(d, caller, "LoadProfile", p->serial, "refused: invalid profile");
                reply_invalid_profile(m, &diags);
                return;
        }
        char *copy = strndup(yaml, len);
        if (!copy) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INTERNAL, "Out of memory");
                return;
        }
        pen_disarm(p);
        p->profile = TAKE_PTR(profile);
        p->profile_yaml = copy;
        p->set_depth_mm = p->profile->depth_mm;
        p->set_speed_hz = p->profile->speed_hz;
        pen_set_state(p, ND_PEN_ARMED, NULL);
        pen_changed(p, PROP_PROFILE | PROP_SETPOINTS);
        char detail[160];
        snprintf(detail, sizeof detail, "profile %s sha256 %s", p->profile->name, p->profile->digest);
        nd_pen_audit(d, caller, "LoadProfile", p->serial, detail);
        (void) sd_bus_reply_method_return(m, NULL);
}

static bool arm_preconditions(nd_pen *p, sd_bus_message *m) {
        if (reply_if_busy(p, m, "arm a profile"))
                return false;
        if (!p->daemon->limits) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_LIMITS_UNAVAILABLE,
                                                  "No limits are in force (%s): nothing can be armed",
                                                  nd_limits_state_to_string(p->daemon->limits_state));
                return false;
        }
        return true;
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
                yaml = malloc(PROFILE_DATA_MAX + 1);
                len = yaml ? fread(yaml, 1, PROFILE_DATA_MAX + 1, f) : 0;
        }
        if (!yaml || ferror(f) || len > PROFILE_DATA_MAX) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_UNKNOWN_PROFILE, "The profile file %s cannot be read", e->path);
                return;
        }
        arm(p, m, caller, yaml, len, e->path);
}

static int method_load_profile(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, load_profile_authorized);
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

static int method_load_profile_data(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, load_profile_data_authorized);
}

/* ---- Start --------------------------------------------------------------------------------------- */

static int on_owner_gone(sd_bus_track *track, void *userdata) {
        nd_pen *p = userdata;
        if (p->session_active) {
                pen_log(p, LOG_WARNING, "%s: the session owner %s left the bus: stopping", p->serial,
                        strempty(p->session.owner_name));
                nd_pen_audit(p->daemon, NULL, "Stop", p->serial, "client-vanished");
                pen_stop_session(p, "client-vanished");
        }
        return 0;
}

static int on_client_heartbeat_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_pen *p = userdata;
        if (p->session_active) {
                pen_log(p, LOG_WARNING, "%s: the session owner missed its heartbeat: stopping", p->serial);
                nd_pen_audit(p->daemon, NULL, "Stop", p->serial, "client-heartbeat-lost");
                pen_stop_session(p, "client-heartbeat-lost");
        }
        return 0;
}

static void start_failed(nd_pen *p, pen_op *op, int status, const char *step) {
        char why[160];
        snprintf(why, sizeof why, "%s: %s", step, pen_command_error(status));
        if (!p->starting) {
                /* Something ended the session before the motor started: a Stop, an interlock. */
                if (p->state == ND_PEN_FAULT)
                        (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_FAULT,
                                                          "The session ended in fault %s before the motor started",
                                                          strempty(p->fault));
                else
                        (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_WRONG_STATE,
                                                          "The session was stopped before the motor started");
        } else {
                p->starting = false;
                pen_trip(p, "start-failed", why);
                (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_FAULT, "The pen did not start: %s", why);
        }
        op_free(op);
}

static void start_motor_done(nd_pendev *dev, int status, void *userdata) {
        pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || !p->starting) {
                start_failed(p, op, status < 0 ? status : -ECANCELED, "motor start");
                return;
        }
        p->session.running_since_us = now_mono_us(p);
        depth_settle_begin(p);
        p->starting = false;
        pen_set_state(p, ND_PEN_RUNNING, NULL);
        (void) sd_bus_reply_method_return(op->call, "s", p->session.id);
        op_free(op);
}

static void start_speed_done(nd_pendev *dev, int status, void *userdata) {
        pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || !p->starting) {
                start_failed(p, op, status < 0 ? status : -ECANCELED, "set speed");
                return;
        }
        int r = nd_pendev_motor_start(p->dev, start_motor_done, op);
        if (r < 0)
                start_failed(p, op, r, "motor start");
}

static void start_depth_done(nd_pendev *dev, int status, void *userdata) {
        pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || !p->starting) {
                start_failed(p, op, status < 0 ? status : -ECANCELED, "set depth");
                return;
        }
        int r = nd_pendev_set_speed(p->dev, p->set_speed_hz, start_speed_done, op);
        if (r < 0)
                start_failed(p, op, r, "set speed");
}

/* Reads Start's options: label (s). Anything else is refused, so typos do not pass silently. */
static int parse_start_options(sd_bus_message *m, const char **label, sd_bus_error *error) {
        int r = sd_bus_message_rewind(m, true);
        if (r >= 0)
                r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Expected options a{sv}");
        *label = "";
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *key;
                if (sd_bus_message_read(m, "s", &key) < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed options");
                if (STREQ(key, "label")) {
                        if (sd_bus_message_read(m, "v", "s", label) < 0)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option label must be a string (s)");
                        size_t len = strlen(*label);
                        if (len > LABEL_MAX)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                         "Option label is %zu bytes long; at most %u", len, LABEL_MAX);
                        for (const char *c = *label; *c; c++)
                                if ((unsigned char) *c < 0x20 || *c == 0x7f)
                                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                                 "Option label contains a control character");
                } else {
                        _cleanup_free_ char *shown = nd_text_sanitize(key, strlen(key), ND_DIAG_VALUE_MAX);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Unknown option '%s' (Start knows: label)", strempty(shown));
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
        nd_pen_audit(p->daemon, caller, "Start", p->serial, detail ? detail : "refused");
        (void) sd_bus_reply_method_errorf(m, error_name, "%s", message ? message : "Start refused");
}

static void start_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                             const nd_caller *caller, void *userdata) {
        nd_daemon *d = userdata;
        nd_pen *p = continuation_pen(m, allowed, auth_error, d);
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        const nd_limits *l = d->limits;
        const char *label;
        int r;

        if (!p)
                return;
        if (parse_start_options(m, &label, &error) < 0) {
                (void) sd_bus_reply_method_error(m, &error);
                return;
        }
        if (!l) {
                start_refuse(p, m, caller, ND_ERROR_LIMITS_UNAVAILABLE, "No limits are in force: nothing can start");
                return;
        }
        if (p->state == ND_PEN_FAULT) {
                start_refuse(p, m, caller, ND_ERROR_FAULT, "Pen %s is in fault (%s); clear it first", p->serial,
                                                  strempty(p->fault));
                return;
        }
        if (p->state != ND_PEN_ARMED || p->starting || !p->profile) {
                start_refuse(p, m, caller, ND_ERROR_WRONG_STATE, "Pen %s is %s: arm a profile first", p->serial,
                                                  p->starting ? "starting" : nd_pen_state_to_string(p->state));
                return;
        }
        if (!p->cartridge_present) {
                start_refuse(p, m, caller, ND_ERROR_NO_CARTRIDGE, "Pen %s has no cartridge", p->serial);
                return;
        }
        /* The limits may have changed since arming: check again, and the pen's own checks. */
        _cleanup_(nd_profile_freep) nd_profile *again = NULL;
        r = nd_profile_parse(p->profile_yaml, strlen(p->profile_yaml), NULL, l, &again, &diags);
        if (r >= 0) {
                nd_pen_caps caps = pen_caps(p);
                r = nd_profile_check_pen(again, &caps, true, p->cartridge_needles, &diags);
        }
        if (r < 0 || diags.n_items > 0) {
                nd_pen_audit(d, caller, "Start", p->serial, "refused: InvalidProfile: the armed profile no longer passes");
                reply_invalid_profile(m, &diags);
                return;
        }
        nd_ledger_cartridge info;
        bool known;
        const char *cstate = cartridge_state(p, &info, &known);
        if (STREQ(cstate, "rejected")) {
                start_refuse(p, m, caller, ND_ERROR_INVALID_PROFILE,
                                                  "Cartridge %s has %u needles, which the limits do not allow",
                                                  p->cartridge_id, p->cartridge_needles);
                return;
        }
        if (STREQ(cstate, "spent")) {
                start_refuse(p, m, caller, ND_ERROR_CARTRIDGE_SPENT,
                                                  "Cartridge %s has been used already (%s)", p->cartridge_id,
                                                  l->cartridge.single_use ? "single use" : "runtime used up");
                return;
        }
        if (p->battery_percent < l->pen.min_battery_percent) {
                start_refuse(p, m, caller, ND_ERROR_LOW_BATTERY,
                                                  "Battery at %u %%: no start below %u %%", p->battery_percent,
                                                  l->pen.min_battery_percent);
                return;
        }
        if (!d->ledger) {
                start_refuse(p, m, caller, ND_ERROR_STORAGE,
                                                  "The treatment ledger is not available, so the session cannot be recorded "
                                                  "(no record, no treatment): %s", strempty(d->ledger_error));
                return;
        }

        /* Record first, synced; only then the motor. */
        pen_session *ss = &p->session;
        memset(ss, 0, sizeof *ss);
        r = nd_ledger_session_id_new(ss->id);
        nd_ledger_session_start rec = {
                .id = ss->id, .pen_serial = p->serial, .cartridge_id = p->cartridge_id, .needles = p->cartridge_needles,
                .profile_name = p->profile->name, .profile_yaml = p->profile_yaml, .profile_digest = p->profile->digest,
                .limits_digest = l->digest, .label = label, .owner_uid = caller->uid, .owner_pid = caller->pid,
                .owner_name = caller->name, .start_us = now_realtime_us(), .single_use = l->cartridge.single_use,
                .cartridge_max_runtime_s = l->cartridge.max_runtime_s,
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
        r = sd_bus_track_new(d->bus, &ss->owner, on_owner_gone, p);
        if (r >= 0)
                r = sd_bus_track_add_sender(ss->owner, m);
        if (r >= 0 && l->session.client_heartbeat_timeout_ms > 0)
                r = sd_event_add_time_relative(d->event, &ss->client_heartbeat, CLOCK_MONOTONIC,
                                               (uint64_t) l->session.client_heartbeat_timeout_ms * USEC_PER_MSEC,
                                               USEC_PER_MSEC, on_client_heartbeat_timeout, p);
        p->session_active = true;
        p->last_progress_us = now_mono_us(p);
        pen_changed(p, PROP_SESSION | PROP_CARTRIDGE | PROP_PROGRESS);
        if (r < 0 || !ss->owner_name) {
                pen_stop_session(p, "stopped");
                start_refuse(p, m, caller, ND_ERROR_INTERNAL, "Cannot track the session's owner: %s",
                                                  strerror(r < 0 ? -r : ENOMEM));
                return;
        }
        pen_op *op = op_new(p, m, 0);
        r = op ? nd_pendev_set_depth(p->dev, p->set_depth_mm, start_depth_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        op_free(op);
                pen_trip(p, "start-failed", "the depth could not be sent to the pen");
                start_refuse(p, m, caller, ND_ERROR_FAULT, "The pen did not start: %s", strerror(-r));
                return;
        }
        p->starting = true;
        char detail[256];
        snprintf(detail, sizeof detail, "session %s profile %s cartridge %s label %s", ss->id, p->profile->name,
                 p->cartridge_id, label);
        pen_log(p, LOG_NOTICE, "%s: starting %s", p->serial, detail);
}

static int method_start(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, start_authorized);
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
        pen_op *op = userdata;
        (void) sd_bus_reply_method_return(op->call, NULL); /* the stop went out; a lost ack changes nothing */
        op_free(op);
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
        pen_op *op = op_new(p, m, 0);
        int r = op ? nd_pendev_motor_stop(p->dev, pause_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        op_free(op);
                pen_trip(p, "stop-failed", "the motor stop for a pause could not be sent");
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The pen could not be paused: %s", strerror(-r));
                return;
        }
        /* Paused from now: the stop is on its way and bypasses every queue. */
        p->session.elapsed_before_us += now_mono_us(p) - p->session.running_since_us;
        p->session.running_since_us = 0;
        p->session.stall_since_us = 0;
        p->session.last_device_time_us = 0;
        pen_set_state(p, ND_PEN_PAUSED, NULL);
        nd_pen_audit(p->daemon, caller, "Pause", p->serial, p->session.id);
}

static int method_pause(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, pause_authorized);
}

static void resume_done(nd_pendev *dev, int status, void *userdata) {
        pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0 || p->state != ND_PEN_PAUSED || !p->session_active) {
                if (status < 0 && p->session_active) {
                        char why[96];
                        snprintf(why, sizeof why, "motor start on resume: %s", pen_command_error(status));
                        pen_trip(p, "start-failed", why);
                        (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_FAULT, "The pen did not resume: %s", why);
                } else
                        (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_WRONG_STATE, "The session ended before it resumed");
                op_free(op);
                return;
        }
        p->session.running_since_us = now_mono_us(p);
        depth_settle_begin(p);
        pen_set_state(p, ND_PEN_RUNNING, NULL);
        (void) sd_bus_reply_method_return(op->call, NULL);
        op_free(op);
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
        if (l && p->battery_percent < l->pen.min_battery_percent) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_LOW_BATTERY, "Battery at %u %%: no start below %u %%",
                                                  p->battery_percent, l->pen.min_battery_percent);
                return;
        }
        if (l && p->temperature_c > l->pen.max_temperature_c) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The handpiece is at %.1f °C, above the %.1f °C maximum",
                                                  p->temperature_c, l->pen.max_temperature_c);
                return;
        }
        pen_op *op = op_new(p, m, 0);
        int r = op ? nd_pendev_motor_start(p->dev, resume_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        op_free(op);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The pen could not resume: %s", strerror(-r));
                return;
        }
        nd_pen_audit(p->daemon, caller, "Resume", p->serial, p->session.id);
}

static int method_resume(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, resume_authorized);
}

static void setpoint_done(nd_pendev *dev, int status, void *userdata) {
        pen_op *op = userdata;
        nd_pen *p = op->pen;
        bool depth = STREQ(sd_bus_message_get_member(op->call), "SetDepth");
        if (status < 0) {
                (void) sd_bus_reply_method_errorf(op->call, status == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT,
                                                  "The pen did not take the new %s: %s", depth ? "depth" : "speed",
                                                  pen_command_error(status));
                op_free(op);
                return;
        }
        /* The set point as the pen has it: whole µm, whole centi-Hz (docs/protocol.md). */
        if (depth) {
                p->set_depth_mm = round(op->value * 1000.0) / 1000.0;
                if (p->session_active)
                        depth_settle_begin(p);
        } else {
                p->set_speed_hz = round(op->value * 100.0) / 100.0;
                if (p->session_active)
                        depth_settle_begin(p); /* the stall check waits for the new speed too */
        }
        p->session.stall_since_us = 0;
        pen_changed(p, PROP_SETPOINTS);
        (void) sd_bus_reply_method_return(op->call, NULL);
        op_free(op);
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
        r = depth ? nd_limits_check_depth(p->daemon->limits, p->profile->area, value, &diags)
                  : nd_limits_check_speed(p->daemon->limits, p->profile->area, value, &diags);
        if (r < 0) {
                nd_pen_audit(p->daemon, caller, depth ? "SetDepth" : "SetSpeed", p->serial, "refused: beyond the limits");
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
        pen_op *op = op_new(p, m, value);
        r = op ? (depth ? nd_pendev_set_depth(p->dev, value, setpoint_done, op)
                        : nd_pendev_set_speed(p->dev, value, setpoint_done, op))
               : -ENOMEM;
        if (r < 0) {
                if (op)
                        op_free(op);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The new set point could not be sent: %s", strerror(-r));
                return;
        }
        if (depth)
                p->session.depth_check_known = false; /* until the pen has the new depth */
        char detail[96];
        snprintf(detail, sizeof detail, "%s %.3f", depth ? "depth_mm" : "speed_hz", value);
        nd_pen_audit(p->daemon, caller, depth ? "SetDepth" : "SetSpeed", p->serial, detail);
}

static int method_setpoint(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, setpoint_authorized);
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

static int method_heartbeat(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, heartbeat_authorized);
}

/* ---- Stop: no authorization, never refused while the pen is connected ------------------------------- */

static int method_stop(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_pen *p = userdata;
        nd_caller caller = caller_of(m);

        pen_motor_stop(p);
        const char *was = nd_pen_state_to_string(p->state);
        if (p->session_active)
                pen_stop_session(p, "stopped");
        nd_pen_audit(p->daemon, &caller, "Stop", p->serial, was);
        return sd_bus_reply_method_return(m, NULL);
}

/* ---- ClearFault --------------------------------------------------------------------------------------- */

static void clear_faults_done(nd_pendev *dev, int status, void *userdata) {
        pen_op *op = userdata;
        nd_pen *p = op->pen;
        if (status < 0) {
                (void) sd_bus_reply_method_errorf(op->call, status == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT,
                                                  "The pen still reports a fault (%s)", pen_command_error(status));
        } else if (p->state == ND_PEN_FAULT) {
                pen_disarm(p);
                pen_set_state(p, ND_PEN_IDLE, NULL);
                (void) sd_bus_reply_method_return(op->call, NULL);
        } else
                (void) sd_bus_reply_method_return(op->call, NULL);
        op_free(op);
}

/* Whether the condition behind the fault is gone, judged on the latest telemetry. */
static bool fault_condition_gone(nd_pen *p, char *why, size_t size) {
        const nd_limits *l = p->daemon->limits;
        uint64_t silent_us = now_mono_us(p) - p->last_sample_mono_us;
        uint64_t timeout_us = (uint64_t) (l ? l->pen.heartbeat_timeout_ms : ND_PROTO_WATCHDOG_DEFAULT_MS) * USEC_PER_MSEC;
        if (!p->have_sample || silent_us > timeout_us) {
                snprintf(why, size, "no telemetry from the pen for %.1f s", (double) silent_us / (double) USEC_PER_SEC);
                return false;
        }
        /* An over-temperature clears only once the handpiece is below the warning level, so
         * noise around the maximum cannot clear it. */
        double cool_c = l && STREQ(strempty(p->fault), "over-temperature") ? l->pen.warn_temperature_c
                        : l ? l->pen.max_temperature_c : 0.0;
        if (l && p->temperature_c >= cool_c) {
                snprintf(why, size, "the handpiece is still at %.1f °C (it must be below %.1f °C)", p->temperature_c, cool_c);
                return false;
        }
        if (l && p->battery_percent < l->pen.stop_battery_percent) {
                snprintf(why, size, "the battery is still at %u %% (cut-off %u %%)", p->battery_percent,
                         l->pen.stop_battery_percent);
                return false;
        }
        return true;
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
        if (!fault_condition_gone(p, why, sizeof why)) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "Fault %s is not cleared: %s", strempty(p->fault), why);
                return;
        }
        nd_pen_audit(p->daemon, caller, "ClearFault", p->serial, strempty(p->fault));
        /* The pen refuses (STALLs) while its own latched fault's cause remains. */
        pen_op *op = op_new(p, m, 0);
        int r = op ? nd_pendev_clear_faults(p->dev, clear_faults_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        op_free(op);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_FAULT, "The pen cannot be asked to clear its faults: %s",
                                                  strerror(-r));
        }
}

static int method_clear_fault(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return pen_authorize(m, userdata, error, clear_fault_authorized);
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

/* ---- Export ----------------------------------------------------------------------------------------- */

static const sd_bus_vtable pen_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Serial", "s", prop_serial, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Model", "s", prop_identity_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("FirmwareVersion", "s", prop_identity_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("ProtocolVersion", "u", prop_protocol_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Generation", "u", prop_generation, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Simulated", "b", prop_simulated, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("State", "s", prop_state, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Fault", "s", prop_fault, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Warnings", "as", prop_warnings, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Profile", "a{sv}", prop_profile, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("DepthMm", "d", prop_setpoint, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("SpeedHz", "d", prop_setpoint, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("DepthRangeMm", "(dd)", prop_range, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("DepthStepMm", "d", prop_depth_step, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("SpeedRangeHz", "(dd)", prop_range, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("BatteryPercent", "u", prop_battery, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("TemperatureC", "d", prop_temperature, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Cartridge", "a{sv}", prop_cartridge, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("SessionId", "s", prop_session_id, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ElapsedS", "d", prop_elapsed, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Strokes", "t", prop_strokes, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("TelemetryRateHz", "u", prop_rate, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD_WITH_ARGS("LoadProfile", SD_BUS_ARGS("s", name), SD_BUS_NO_RESULT,
                                method_load_profile, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("LoadProfileData", SD_BUS_ARGS("s", yaml), SD_BUS_NO_RESULT,
                                method_load_profile_data, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Start", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("s", session_id),
                                method_start, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Pause", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_pause, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Resume", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_resume, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetDepth", SD_BUS_ARGS("d", mm), SD_BUS_NO_RESULT,
                                method_setpoint, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetSpeed", SD_BUS_ARGS("d", hz), SD_BUS_NO_RESULT,
                                method_setpoint, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Stop", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_stop, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Heartbeat", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                method_heartbeat, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ClearFault", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT,
                                method_clear_fault, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("OpenTelemetry", SD_BUS_NO_ARGS, SD_BUS_RESULT("h", fd),
                                method_open_telemetry, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_ARGS("Telemetry", SD_BUS_ARGS("a(tuddddu)", samples), 0),
        SD_BUS_SIGNAL_WITH_ARGS("SessionEnded", SD_BUS_ARGS("s", session_id, "s", reason), 0),
        SD_BUS_VTABLE_END
};

static int pen_object_find(sd_bus *bus, const char *path, const char *interface, void *userdata, void **found,
                           sd_bus_error *error) {
        nd_pen *p = nd_pen_find_by_path(userdata, path);
        if (!p)
                return 0;
        *found = p;
        return 1;
}

static int pen_enumerate(sd_bus *bus, const char *prefix, void *userdata, char ***nodes, sd_bus_error *error) {
        nd_daemon *d = userdata;
        char **l = calloc(d->n_pens + 1, sizeof *l);
        unsigned n = 0;
        if (!l)
                return -ENOMEM;
        for (unsigned i = 0; i < d->n_pens; i++) {
                if (!d->pens[i]->exported)
                        continue;
                l[n] = strdup(d->pens[i]->path);
                if (!l[n]) {
                        for (unsigned k = 0; k < n; k++)
                                free(l[k]);
                        free(l);
                        return -ENOMEM;
                }
                n++;
        }
        *nodes = l;
        return 1;
}

int nd_pen_export_all(nd_daemon *d) {
        int r = sd_bus_add_fallback_vtable(d->bus, &d->pen_vtable_slot, ND_PEN_PATH_PREFIX, ND_PEN_INTERFACE, pen_vtable,
                                           pen_object_find, d);
        if (r < 0)
                return r;
        return sd_bus_add_node_enumerator(d->bus, &d->pen_enumerator_slot, ND_PEN_PATH_PREFIX, pen_enumerate, d);
}

/* ---- Daemon-wide ------------------------------------------------------------------------------------ */

static void on_watchdog_changed(nd_pendev *dev, int status, void *userdata) {
        nd_pen *p = userdata;
        if (status < 0)
                pen_log(p, LOG_ERR, "%s: the pen did not take the new watchdog timeout: %s", strempty(p->serial),
                        pen_command_error(status));
}

void nd_pen_limits_changed(nd_pen *p, const nd_limits *old) {
        const nd_limits *l = p->daemon->limits;
        /* The pen's own watchdog follows the new limits (the pen stops itself after this long). */
        if (p->dev && (!old || old->pen.heartbeat_timeout_ms != l->pen.heartbeat_timeout_ms) &&
            nd_pendev_get_state(p->dev) == ND_PENDEV_READY) {
                int r = nd_pendev_set_heartbeat_timeout(p->dev, l->pen.heartbeat_timeout_ms, on_watchdog_changed, p);
                if (r < 0)
                        pen_log(p, LOG_ERR, "%s: cannot change the pen's watchdog timeout: %s", strempty(p->serial),
                                strerror(-r));
        }
        if (!p->session_active || !p->profile_yaml)
                return;
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *again = NULL;
        int r = nd_profile_parse(p->profile_yaml, strlen(p->profile_yaml), NULL, l, &again, &diags);
        /* The set points in force count too, since SetDepth/SetSpeed may have moved them. */
        if (r >= 0 && p->profile->area) {
                if (nd_limits_check_depth(l, p->profile->area, p->set_depth_mm, &diags) < 0 ||
                    nd_limits_check_speed(l, p->profile->area, p->set_speed_hz, &diags) < 0)
                        r = -ERANGE;
        }
        if (r < 0 || diags.n_items > 0) {
                pen_log(p, LOG_WARNING, "%s: the new limits forbid the running treatment (%s): stopping", p->serial,
                        diags.n_items ? diags.items[0].message : "invalid");
                nd_pen_audit(p->daemon, NULL, "Stop", p->serial, "limits-changed");
                pen_stop_session(p, "limits-changed");
        }
}

void nd_pen_stop_all(nd_daemon *d, const char *reason) {
        for (unsigned i = 0; i < d->n_pens; i++) {
                nd_pen *p = d->pens[i];
                if (p->session_active) {
                        nd_pen_audit(d, NULL, "Stop", strempty(p->serial), reason);
                        pen_stop_session(p, reason);
                } else
                        pen_motor_stop(p);
        }
}

unsigned nd_pen_stops_in_flight(const nd_daemon *d) {
        unsigned n = 0;
        for (unsigned i = 0; i < d->n_pens; i++)
                n += d->pens[i]->stops_in_flight;
        return n;
}

void nd_pen_free_all(nd_daemon *d, const char *reason) {
        while (d->n_pens > 0) {
                nd_pen *p = d->pens[d->n_pens - 1];
                if (p->session_active)
                        pen_stop_session(p, reason);
                pen_free(p);
        }
        free(d->pens);
        d->pens = NULL;
        while (n_known_pens > 0)
                free(known_pens[--n_known_pens].serial);
        free(known_pens);
        known_pens = NULL;
}
