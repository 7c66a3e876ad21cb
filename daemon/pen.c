/* pen.c: one connected pen: its treatment state machine, its interlocks, its session and its
 * telemetry intake. Every telemetry sample is checked against the limits in force in the loop
 * iteration that decoded it; a tripped interlock sends the motor stop at once. The bus adapter
 * (properties, methods, vtable) is pen-dbus.c. */
#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon.h"
#include "dose.h"
#include "errors.h"
#include "log.h"
#include "ledger-reader.h"
#include "pen.h"
#include "pen-dbus.h"
#include "pendev.h"
#include "telemetry.h"
#include "transport-sim.h"
#include "util.h"

/* Low-rate properties are announced at most this often (the contract's ~4 Hz). */
#define PROPERTY_COALESCE_USEC (250 * USEC_PER_MSEC)
/* A running session's figures reach the ledger this often. */
#define PROGRESS_INTERVAL_USEC (1000 * USEC_PER_MSEC)
/* Fault bits in samples the pen measured before it took a ClearFault may still arrive after its
 * acknowledgement (telemetry and control travel apart): an idle pen's fault bits count from this
 * long after the clear on. A fault still latched then is seen on the next sample. */

_Static_assert(ND_PEN_HEARTBEAT_MIN_MS >= ND_PROTO_WATCHDOG_MIN_MS && ND_PEN_HEARTBEAT_MAX_MS <= ND_PROTO_WATCHDOG_MAX_MS,
               "every heartbeat_timeout_ms the limits file accepts must be one the pen's watchdog accepts");

static const char *const nd_pen_state_table[_ND_PEN_STATE_MAX] = {
        [ND_PEN_IDLE] = "idle", [ND_PEN_ARMED] = "armed", [ND_PEN_RUNNING] = "running",
        [ND_PEN_PAUSED] = "paused", [ND_PEN_FAULT] = "fault",
};

DEFINE_STRING_TABLE_TO_STRING(nd_pen_state, nd_pen_state)

const char *nd_pen_get_path(const nd_pen *p) { return p->path; }
const char *nd_pen_get_serial(const nd_pen *p) { return p->serial; }
nd_penmodel *nd_pen_get_model(const nd_pen *p) { return p->model; }
nd_transport *nd_pen_get_transport(const nd_pen *p) { return p->dev ? nd_pendev_get_transport(p->dev) : NULL; }

uint64_t nd_pen_now_mono_us(const nd_pen *p) {
        uint64_t t = 0;
        (void) sd_event_now(p->daemon->event, CLOCK_MONOTONIC, &t);
        return t;
}


bool nd_pen_is_exported(const nd_pen *p) { return p->exported; }
bool nd_pen_in_session(const nd_pen *p) { return p->session_active || p->starting; }

nd_pen *nd_pen_find_by_path(nd_daemon *d, const char *path) {
        for (unsigned i = 0; path && i < d->n_pens; i++)
                if (d->pens[i]->exported && STREQ(d->pens[i]->path, path))
                        return d->pens[i];
        return NULL;
}

/* The pen on the bus, or about to be (its cartridge being looked up), with serial. */
static nd_pen *find_by_serial(nd_daemon *d, const char *serial) {
        for (unsigned i = 0; i < d->n_pens; i++)
                if ((d->pens[i]->exported || d->pens[i]->export_waiting) && STREQ(d->pens[i]->serial, serial))
                        return d->pens[i];
        return NULL;
}

/* ---- Properties announcements ---------------------------------------------------------------- */

static void pen_emit(nd_pen *p, unsigned props) {
        if (!p->exported || !props)
                return;
        const char *names[24];
        size_t n = 0;
        if (props & PROP_STATE) { names[n++] = "State"; names[n++] = "Fault"; }
        if (props & PROP_PROFILE) names[n++] = "Profile";
        if (props & PROP_SETPOINTS) { names[n++] = "DepthMm"; names[n++] = "SpeedHz"; }
        if (props & PROP_BATTERY) names[n++] = "BatteryPercent";
        if (props & PROP_TEMPERATURE) names[n++] = "TemperatureC";
        if (props & PROP_CARTRIDGE) names[n++] = "Cartridge";
        if (props & PROP_SESSION) { names[n++] = "SessionId"; names[n++] = "SkinType"; }
        if (props & PROP_PROGRESS) {
                names[n++] = "ElapsedS";
                names[n++] = "Strokes";
                names[n++] = "Punctures";
                names[n++] = "DensityPerCm2";
        }
        if (props & PROP_WARNINGS) names[n++] = "Warnings";
        if (props & PROP_RATE) names[n++] = "TelemetryRateHz";
        names[n] = NULL;
        if (nd_pen_keep_changed_properties(p, names) == 0)
                return; /* nothing changed after all */
        char **strv = (char **) names;
        int r = sd_bus_emit_properties_changed_strv(p->daemon->bus, p->path, ND_PEN_INTERFACE, strv);
        if (r < 0)
                (void) pen_log_errno(p, LOG_WARNING, r, "%s: could not announce property changes", p->serial);
}

/* Whether the pen samples at its idle rate: then its samples come at most every few hundred ms
 * and are announced as they come, and the tick sleeps (an idle pen wakes nobody up for nothing). */
static bool pen_idling(const nd_pen *p) {
        return p->dev && p->sampling_hz_asked > 0 && !p->session_active && !p->starting &&
               p->sampling_hz_asked < nd_pendev_get_telemetry_rate_hz(p->dev);
}

/* Makes sure the tick runs (it turns itself off while the pen idles). */
static void pen_tick_wake(nd_pen *p) {
        int enabled = SD_EVENT_OFF;
        if (!p->tick || sd_event_source_get_enabled(p->tick, &enabled) < 0 || enabled != SD_EVENT_OFF)
                return;
        (void) sd_event_source_set_time_relative(p->tick, PROPERTY_COALESCE_USEC);
        (void) sd_event_source_set_enabled(p->tick, SD_EVENT_ON);
}

/* State-like properties go out at once; low-rate ones wait for the tick. */
void nd_pen_changed(nd_pen *p, unsigned props) {
        unsigned now = props & ~PROPS_LOW_RATE;
        p->dirty |= props & PROPS_LOW_RATE;
        if (now)
                pen_emit(p, now);
        if (p->dirty)
                pen_tick_wake(p);
}

/* ---- Derived values -------------------------------------------------------------------------- */

double nd_pen_session_elapsed_s(const nd_pen *p) {
        if (!p->session_active)
                return 0.0;
        uint64_t us = p->session.elapsed_before_us;
        if (p->session.running_since_us)
                us += nd_pen_now_mono_us(p) - p->session.running_since_us;
        return (double) us / (double) USEC_PER_SEC;
}

/* The state of cartridge v under the limits in force, from what the ledger knows of it. */
static const char *view_state(const nd_limits *limits, const nd_pen_cartridge_view *v) {
        if (!v->present)
                return "none";
        if (limits && !nd_interlock_needles_allowed(limits, v->needles))
                return "rejected";
        if (!v->known)
                return "fresh";
        if (v->info.state == ND_LEDGER_CARTRIDGE_SPENT)
                return "spent";
        if (limits && nd_interlock_cartridge_runtime_used_up(limits, v->info.runtime_s))
                return "spent";
        return v->info.state == ND_LEDGER_CARTRIDGE_FRESH ? "fresh" : "in-use";
}

/* The inserted cartridge, with what its latest lookup found. */
static void current_view(const nd_pen *p, nd_pen_cartridge_view *v) {
        *v = (nd_pen_cartridge_view) {
                .present = p->cartridge_present,
                .needles = p->cartridge_present ? p->cartridge_needles : 0,
                .known = p->cartridge_present && p->cartridge_known,
        };
        snprintf(v->id, sizeof v->id, "%s", p->cartridge_present ? p->cartridge_id : "");
        if (v->known)
                v->info = p->cartridge_info;
}

/* What the ledger knows of the inserted cartridge, and whether it may run. */
const char *nd_pen_cartridge_state(const nd_pen *p, nd_ledger_cartridge *info, bool *known) {
        const nd_limits *limits = p->daemon->limits;
        *known = false;
        if (!p->cartridge_present)
                return "none";
        if (limits && !nd_interlock_needles_allowed(limits, p->cartridge_needles))
                return "rejected";
        if (p->session_active)
                /* A start in progress shows the cartridge as it was: it may yet be voided. */
                return p->starting && p->session.cartridge_state_before ? p->session.cartridge_state_before : "in-use";
        nd_pen_cartridge_view v;
        current_view(p, &v);
        if (v.known) {
                *info = v.info;
                *known = true;
        }
        return view_state(limits, &v);
}

const char *nd_pen_cartridge_shown_state(const nd_pen *p, const nd_pen_cartridge_view **view) {
        const nd_limits *limits = p->daemon->limits;
        const nd_pen_cartridge_view *v = &p->cartridge_shown;
        *view = v;
        if (v->present && p->session_active && !(limits && !nd_interlock_needles_allowed(limits, v->needles)))
                return p->starting && p->session.cartridge_state_before ? p->session.cartridge_state_before : "in-use";
        return view_state(limits, v);
}

bool nd_pen_cartridge_lookup_pending(const nd_pen *p) {
        return p->cartridge_present && !p->cartridge_lookup_done;
}

/* ---- Calls waiting for the pen ------------------------------------------------------------------ */

nd_pen_op *nd_pen_op_new(nd_pen *p, sd_bus_message *call, double value) {
        nd_pen_op *op = calloc(1, sizeof *op);
        if (!op)
                return NULL;
        op->pen = p;
        op->call = sd_bus_message_ref(call);
        op->value = value;
        op->next = p->daemon->pen_ops;
        p->daemon->pen_ops = op;
        return op;
}

void nd_pen_op_free(nd_pen_op *op) {
        for (nd_pen_op **pp = &op->pen->daemon->pen_ops; *pp; pp = &(*pp)->next)
                if (*pp == op) {
                        *pp = op->next;
                        break;
                }
        sd_bus_message_unref(op->call);
        free(op->caller_name);
        free(op);
}

/* Answers every call still waiting on p with DeviceGone. */
static void pen_ops_fail_all(nd_pen *p, const char *why) {
        for (nd_pen_op *op = p->daemon->pen_ops, *next; op; op = next) {
                next = op->next;
                if (op->pen != p)
                        continue;
                (void) sd_bus_reply_method_errorf(op->call, ND_ERROR_DEVICE_GONE, "Pen %s is gone: %s", p->serial, why);
                nd_pen_op_free(op);
        }
}

/* ---- What the ledger knows of the cartridge ---------------------------------------------------- */

/* Matches a lookup's completion with the pen instance and the lookup it is for. */
static uint64_t lookup_tag(const nd_pen *p) {
        return (uint64_t) p->generation << 32 | p->cartridge_lookup_seq;
}

/* The Cartridge property shows the inserted cartridge, as last looked up; announced if it changed. */
static void cartridge_show(nd_pen *p) {
        current_view(p, &p->cartridge_shown);
        nd_pen_changed(p, PROP_CARTRIDGE);
}

/* Answers the calls that waited for the cartridge's lookup: refreshes, AddPen, Start (run again). */
static void cartridge_waiters_resume(nd_pen *p) {
        if (p->pending_add && p->exported) {
                (void) sd_bus_reply_method_return(p->pending_add, "o", p->path);
                p->pending_add = sd_bus_message_unref(p->pending_add);
        }
        for (;;) {
                nd_pen_op *oldest = NULL; /* ops are prepended: the last one found came first */
                for (nd_pen_op *op = p->daemon->pen_ops; op; op = op->next)
                        if (op->pen == p && op->waits != ND_PEN_OP_WAITS_PEN)
                                oldest = op;
                if (!oldest)
                        break;
                if (oldest->waits == ND_PEN_OP_WAITS_START)
                        nd_pen_start_resume(oldest);
                else {
                        (void) sd_bus_reply_method_return(oldest->call, NULL);
                        nd_pen_op_free(oldest);
                }
        }
}

/* The lookup of the inserted cartridge is done: result 0 (c filled), -ENOENT (never used) or -errno. */
static void pen_export(nd_pen *p);

static void cartridge_lookup_finish(nd_pen *p, int result, const nd_ledger_cartridge *c, const char *error) {
        p->cartridge_lookup_done = true;
        p->cartridge_lookup_failed = result < 0 && result != -ENOENT;
        p->cartridge_known = result >= 0;
        if (result >= 0)
                p->cartridge_info = *c;
        else
                memset(&p->cartridge_info, 0, sizeof p->cartridge_info);
        if (p->cartridge_lookup_failed)
                pen_log(p, LOG_WARNING, "%s: what the ledger knows of cartridge %s could not be read (%s): no start until it can",
                        p->serial, p->cartridge_id, strempty(error));
        cartridge_show(p);
        if (p->export_waiting) {
                /* A pen that has just connected goes on the bus with its cartridge known. */
                p->export_waiting = false;
                pen_export(p);
                return;
        }
        cartridge_waiters_resume(p);
}

static void on_cartridge_looked_up(nd_ledger_job *job, void *userdata) {
        _cleanup_(nd_ledger_job_freep) nd_ledger_job *owned = job;
        nd_pen *p = find_by_serial(userdata, job->pen_serial);
        /* The pen left (or came back: another generation), or another cartridge or lookup came since. */
        if (!p || job->tag != lookup_tag(p) || !p->cartridge_present || !STREQ(p->cartridge_id, job->cartridge_id))
                return;
        pen_log(p, LOG_DEBUG, "%s: cartridge %s looked up in the ledger in %" PRIu64 " us", p->serial,
                        p->cartridge_id, job->query_us);
        cartridge_lookup_finish(p, job->result, &job->cartridge, job->error);
}

void nd_pen_cartridge_lookup(nd_pen *p) {
        nd_daemon *d = p->daemon;
        if (d->shutting_down)
                return; /* the reader is going; nothing starts any more */
        p->cartridge_lookup_seq++;
        p->cartridge_lookup_done = false;
        p->cartridge_lookup_failed = false;
        /* No cartridge, or no ledger (Start answers Storage): nothing to ask. */
        if (!p->cartridge_present || !d->ledger) {
                cartridge_lookup_finish(p, -ENOENT, NULL, NULL);
                return;
        }
        if (d->ledger_reader) {
                nd_ledger_job *job = nd_ledger_job_new(ND_LEDGER_JOB_CARTRIDGE);
                int r = -ENOMEM;
                if (job && (job->pen_serial = strdup(p->serial))) {
                        snprintf(job->cartridge_id, sizeof job->cartridge_id, "%s", p->cartridge_id);
                        /* One per cartridge change or session end: never refused for a busy queue. */
                        job->unbounded = true;
                        job->done = on_cartridge_looked_up;
                        job->userdata = d;
                        job->tag = lookup_tag(p);
                        r = nd_ledger_reader_submit(d->ledger_reader, job);
                        if (r >= 0)
                                return;
                }
                nd_ledger_job_free(job);
                (void) pen_log_errno(p, LOG_WARNING, r, "%s: cannot look cartridge %s up off the loop; reading it here",
                                     p->serial, p->cartridge_id);
        } else if (!d->cartridge_sync_logged) {
                d->cartridge_sync_logged = true;
                nd_log_warning("the ledger has no reader thread (%s): cartridges are looked up on the event loop",
                               strempty(d->ledger_reader_error));
        }
        nd_ledger_cartridge c;
        int r = nd_ledger_cartridge_get(d->ledger, p->cartridge_id, &c);
        cartridge_lookup_finish(p, r, &c, r < 0 ? nd_ledger_last_error(d->ledger) : NULL);
}

void nd_pen_cartridge_lookup_all(nd_daemon *d) {
        for (unsigned i = 0; i < d->n_pens; i++)
                if (nd_pen_cartridge_lookup_pending(d->pens[i]))
                        nd_pen_cartridge_lookup(d->pens[i]);
}

/* A session on cartridge id ended: what the ledger did with the cartridge (lib/ledger.c:
 * nd_ledger_session_end spends it when single use or past its runtime cap) is shown at once, then
 * read back. */
static void cartridge_session_ended(nd_pen *p, const char *id, double runtime_s, bool single_use,
                                    uint32_t max_runtime_s) {
        nd_ledger_cartridge after = { .runtime_s = runtime_s };
        snprintf(after.id, sizeof after.id, "%s", id);
        after.needles = p->cartridge_shown.needles;
        after.state = single_use || (max_runtime_s > 0 && runtime_s >= (double) max_runtime_s) ?
                      ND_LEDGER_CARTRIDGE_SPENT : ND_LEDGER_CARTRIDGE_IN_USE;
        if (p->cartridge_shown.present && STREQ(p->cartridge_shown.id, id)) {
                p->cartridge_shown.known = true;
                p->cartridge_shown.info = after;
        }
        if (p->cartridge_present && STREQ(p->cartridge_id, id)) {
                p->cartridge_known = true;
                p->cartridge_info = after;
                nd_pen_cartridge_lookup(p);
        }
}

const char *nd_pen_command_error(int status) {
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

/* ---- Sampling on demand ------------------------------------------------------------------------ */

static void on_full_rate_acknowledged(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        /* The arming is done either way; a failed re-rate is logged by pendev. */
        (void) sd_bus_reply_method_return(op->call, NULL);
        nd_pen_op_free(op);
}

static bool pen_wants_full_rate(const nd_pen *p) {
        return p->state != ND_PEN_IDLE || p->profile || p->session_active || p->starting ||
               nd_telemetry_has_demand(p->telemetry);
}

int nd_pen_update_sampling(nd_pen *p, sd_bus_message *call) {
        if (!p->dev || !p->exported || !p->telemetry || p->sampling_hz_asked == 0)
                return 0;
        unsigned full = nd_pendev_get_telemetry_rate_hz(p->dev);
        unsigned want = pen_wants_full_rate(p) ? full : MIN(ND_PEN_IDLE_SAMPLING_HZ, full);
        if (want == p->sampling_hz_asked)
                return 0;
        nd_pen_op *op = call && want == full ? nd_pen_op_new(p, call, 0) : NULL;
        int r = nd_pendev_set_sampling_rate(p->dev, want, op ? on_full_rate_acknowledged : NULL, op);
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
                if (r != -ENODEV)
                        pen_log(p, LOG_WARNING, "%s: could not re-rate the telemetry to %u Hz: %s", p->serial, want,
                                strerror(-r));
                return 0;
        }
        pen_log(p, LOG_DEBUG, "%s: sampling at %u Hz (%s)", p->serial, want, want == full ? "in use" : "idle");
        p->sampling_hz_asked = want;
        if (want == full)
                pen_tick_wake(p);
        return op ? 1 : 0;
}

static void on_telemetry_demand(nd_telemetry *t, bool demand, void *userdata) {
        (void) nd_pen_update_sampling(userdata, NULL);
}

void nd_pen_set_state(nd_pen *p, nd_pen_state state, const char *fault) {
        assert((size_t) state < _ND_PEN_STATE_MAX);
        assert((state == ND_PEN_FAULT) == (fault != NULL)); /* a fault state has a code, no other has */
        bool changed = p->state != state || !STREQ(strempty(p->fault), strempty(fault));
        p->state = state;
        free(p->fault);
        p->fault = fault ? strdup(fault) : NULL;
        if (changed) {
                pen_log(p, state == ND_PEN_FAULT ? LOG_WARNING : LOG_INFO, "%s: state %s%s%s", p->serial,
                        nd_pen_state_to_string(state), fault ? ", fault " : "", strempty(fault));
                /* A session's cartridge runtime stops or starts moving with the motor: its value
                 * now goes out with the state (the progress tick announces it only every second). */
                nd_pen_changed(p, PROP_STATE | (p->session_active ? PROP_CARTRIDGE : 0));
                (void) nd_pen_update_sampling(p, NULL);
        }
}

void nd_pen_disarm(nd_pen *p) {
        bool had = p->profile != NULL;
        nd_profile_free(p->profile);
        p->profile = NULL;
        free(p->profile_yaml);
        p->profile_yaml = NULL;
        if (had) {
                nd_pen_changed(p, PROP_PROFILE);
                (void) nd_pen_update_sampling(p, NULL);
        }
}

static void on_stop_acked(nd_pendev *dev, int status, void *userdata) {
        nd_pen *p = userdata;
        if (p->stops_in_flight > 0)
                p->stops_in_flight--;
        if (status < 0)
                pen_log(p, LOG_ERR, "%s: motor stop not acknowledged: %s (the pen's own watchdog stops it "
                        "when the heartbeat stops)", p->serial, nd_pen_command_error(status));
}

/* Sends the motor stop now; it bypasses every queue (pendev.h). */
void nd_pen_motor_stop(nd_pen *p) {
        if (!p->dev)
                return;
        int r = nd_pendev_motor_stop(p->dev, on_stop_acked, p);
        if (r >= 0)
                p->stops_in_flight++;
        else if (r != -ENODEV)
                (void) pen_log_errno(p, LOG_ERR, r, "%s: could not send the motor stop", p->serial);
}

uint64_t nd_pen_session_punctures(const nd_pen *p) {
        if (!p->session_active)
                return 0;
        return nd_dose_punctures((uint64_t) floor(p->session.strokes), p->session.needles);
}

double nd_pen_session_density_per_cm2(const nd_pen *p) {
        if (!p->session_active)
                return 0;
        return nd_dose_density_per_cm2(nd_pen_session_punctures(p), p->session.area_cm2);
}

static void session_stats_now(nd_pen *p, nd_ledger_stats *stats) {
        *stats = p->session.stats;
        stats->duration_s = nd_pen_session_elapsed_s(p);
        stats->strokes = (uint64_t) floor(p->session.strokes);
        stats->punctures = nd_pen_session_punctures(p);
        stats->density_per_cm2 = nd_pen_session_density_per_cm2(p);
}

/* Ends the session in progress: records it, announces it, and leaves the pen idle (disarmed)
 * or, after a fault, in fault. The motor stop has been sent already. */
static void session_end(nd_pen *p, const char *reason, const char *fault) {
        if (!p->session_active)
                return;
        nd_daemon *d = p->daemon;
        nd_ledger_stats stats;
        session_stats_now(p, &stats);
        uint64_t end_us = nd_now_realtime_us();

        /* A session ended while starting (a Stop, an interlock, the pen gone, a void that failed)
         * is a recorded session all the same: it is announced before its end is. */
        if (p->starting) {
                p->starting = false; /* a Start still waiting for the pen learns it from its op */
                nd_pen_changed(p, PROP_SESSION | PROP_CARTRIDGE | PROP_PROGRESS);
        }
        bool recorded = false;
        if (d->ledger) {
                int r = nd_ledger_session_end(d->ledger, p->session.id, end_us, &stats, reason);
                if (r < 0)
                        pen_log(p, LOG_ERR, "%s: the end of session %s (%s) was not recorded: %s", p->serial,
                                p->session.id, reason, nd_ledger_last_error(d->ledger));
                recorded = r >= 0;
        }
        /* What the ledger now knows of the cartridge, shown with the end (and read back). */
        cartridge_session_ended(p, p->session.cartridge_id, p->session.cartridge_runtime_before_s + stats.duration_s,
                                p->session.single_use, p->session.cartridge_max_runtime_s);
        pen_log(p, LOG_NOTICE, "%s: session %s ended: %s after %.1f s, %" PRIu64 " strokes, %" PRIu64 " punctures",
                p->serial, p->session.id, reason, stats.duration_s, stats.strokes, stats.punctures);

        /* Every sample of the session reaches clients before the signal that ends it. */
        nd_telemetry_flush(p->telemetry);
        /* The recorded figures first, so that a client has them when SessionEnded comes. */
        nd_pen_emit_session_recorded(p, p->session.id, reason, end_us, &stats, recorded);
        if (p->exported)
                (void) sd_bus_emit_signal(d->bus, p->path, ND_PEN_INTERFACE, "SessionEnded", "ss", p->session.id, reason);

        sd_bus_track_unref(p->session.owner);
        free(p->session.owner_name);
        sd_event_source_disable_unref(p->session.client_heartbeat);
        memset(&p->session, 0, sizeof p->session);
        p->session.skin_type = ND_SKIN_TYPE_NONE;
        p->session_active = false;

        if (fault)
                nd_pen_set_state(p, ND_PEN_FAULT, fault);
        else {
                nd_pen_disarm(p);
                nd_pen_set_state(p, ND_PEN_IDLE, NULL);
        }
        nd_pen_changed(p, PROP_SESSION | PROP_PROGRESS | PROP_CARTRIDGE);
}

/* An interlock tripped: the stop goes out first, then the record. */
void nd_pen_trip(nd_pen *p, const char *code, const char *why) {
        nd_pen_motor_stop(p);
        char fields[2][96];
        snprintf(fields[0], sizeof fields[0], "PEN_SERIAL=%s", p->serial);
        snprintf(fields[1], sizeof fields[1], "NEEDLED_FAULT=%s", code);
        nd_log_full(LOG_WARNING, (const char *const[]) { fields[0], fields[1], NULL },
                    "%s: interlock %s: %s: motor stopped", p->serial, code, why);
        char action[96];
        snprintf(action, sizeof action, "interlock:%s", code);
        nd_audit(p->daemon, NULL, action, p->serial, why);
        if (p->session_active) {
                char reason[96];
                snprintf(reason, sizeof reason, "fault:%s", code);
                session_end(p, reason, code);
        } else
                nd_pen_set_state(p, ND_PEN_FAULT, code);
}

/* Ends the session for a reason that is not a fault (stop, completion, owner gone, ...). */
void nd_pen_stop_session(nd_pen *p, const char *reason) {
        nd_pen_motor_stop(p);
        session_end(p, reason, NULL);
}

bool nd_pen_session_announced(const nd_pen *p) {
        return p->session_active && !p->starting;
}

int nd_pen_start_void(nd_pen *p, const char *why) {
        nd_daemon *d = p->daemon;
        assert(p->session_active && p->starting);
        /* Never refused, and harmless: nothing the pen was asked before it may start the motor. */
        nd_pen_motor_stop(p);
        int r = d->ledger ? nd_ledger_session_void(d->ledger, p->session.id, nd_now_realtime_us(), why) : -ENOTCONN;
        if (r < 0) {
                pen_log(p, LOG_ERR, "%s: session %s did not start (%s) and could not be voided: %s; it ends as stopped",
                        p->serial, p->session.id, why, d->ledger ? nd_ledger_last_error(d->ledger) : "no ledger");
                session_end(p, "stopped", NULL);
                return r;
        }
        pen_log(p, LOG_NOTICE, "%s: session %s did not start (%s): voided, cartridge %s as it was, profile still armed",
                p->serial, p->session.id, why, p->cartridge_id);
        sd_bus_track_unref(p->session.owner);
        free(p->session.owner_name);
        sd_event_source_disable_unref(p->session.client_heartbeat);
        memset(&p->session, 0, sizeof p->session);
        p->session.skin_type = ND_SKIN_TYPE_NONE;
        p->session_active = false;
        p->starting = false;
        /* The ledger put the cartridge back as it was (what is shown); read it back all the same. */
        nd_pen_cartridge_lookup(p);
        /* Nothing of the attempt was announced: these find every value as last announced. */
        nd_pen_changed(p, PROP_SESSION | PROP_CARTRIDGE | PROP_PROGRESS);
        return 0;
}

/* ---- Interlocks --------------------------------------------------------------------------------- */

static void on_settle_status(nd_pendev *dev, int status, const nd_proto_status *st, void *userdata) {
        nd_pen *p = userdata;
        /* Answers come in the order asked: only the latest one counts. */
        if (--p->session.depth_settle_queries > 0 || !p->session_active)
                return;
        /* The pen does not answer: the heartbeat and telemetry checks deal with that. Depth is
         * checked again from the next sample on, after the settle time. */
        nd_interlock_settle_from(&p->session.interlock, status < 0 ? p->session.last_sample_ts : st->timestamp_us);
}

/* A new depth (or a motor start) has been acknowledged: the depth check pauses until the pen,
 * asked now, says when that was on its own clock; then the settle time runs from there. A
 * daemon running behind its telemetry thus never judges an old sample against a new set point. */
void nd_pen_depth_settle_begin(nd_pen *p) {
        nd_interlock_settle_begin(&p->session.interlock);
        if (nd_pendev_query_status(p->dev, on_settle_status, p) >= 0)
                p->session.depth_settle_queries++;
}

nd_interlock_pen nd_pen_interlock_reading(const nd_pen *p) {
        return (nd_interlock_pen) {
                .in_fault = p->state == ND_PEN_FAULT,
                .fault = p->fault,
                .pen_faults = p->pen_faults,
                .armed = p->state == ND_PEN_ARMED && p->profile,
                .busy = p->session_active || p->starting,
                .cartridge_present = p->cartridge_present,
                .profile_valid = true,
                .have_sample = p->have_sample,
                .silent_us = nd_pen_now_mono_us(p) - p->last_sample_mono_us,
                .temperature_c = p->temperature_c,
                .battery_percent = p->battery_percent,
        };
}

/* Where the pen is for the sample checks; false when no check applies (a start in progress,
 * already in fault, a fault just cleared). */
static bool interlock_phase(const nd_pen *p, uint64_t now_us, nd_interlock_phase *ret) {
        if (p->session_active && p->state == ND_PEN_RUNNING)
                *ret = ND_INTERLOCK_PHASE_RUNNING;
        else if (p->session_active && p->state == ND_PEN_PAUSED)
                *ret = ND_INTERLOCK_PHASE_PAUSED;
        else if (!p->session_active && !p->starting && (p->state == ND_PEN_IDLE || p->state == ND_PEN_ARMED) &&
                 !nd_interlock_clear_settling(p->daemon->limits, p->clean_since_clear, now_us - p->faults_cleared_mono_us))
                *ret = ND_INTERLOCK_PHASE_IDLE;
        else
                return false;
        return true;
}

/* Checks one sample (lib/interlocks.c decides); a trip stops the motor at once. Returns true
 * when it tripped. */
static bool check_interlocks(nd_pen *p, const nd_pendev_sample *ps, uint64_t now_us) {
        nd_interlock_input in = {
                .set_depth_mm = p->set_depth_mm,
                .set_speed_hz = p->set_speed_hz,
                .cartridge_runtime_s = p->session.cartridge_runtime_before_s + nd_pen_session_elapsed_s(p),
                .cartridge_id = p->cartridge_id,
        };
        nd_interlock_result res;

        if (!interlock_phase(p, now_us, &in.phase))
                return false;
        if (nd_interlock_check_sample(p->daemon->limits, &in, &ps->s, ps->device_time_us, &p->session.interlock, &res) !=
            ND_INTERLOCK_TRIP)
                return false;
        nd_pen_trip(p, res.code, res.message);
        return true;
}

/* The session's time is up (profile duration, or a tighter limit since it started). */
static void check_duration(nd_pen *p) {
        if (!p->session_active || p->state != ND_PEN_RUNNING || !p->profile)
                return;
        nd_interlock_result res;
        switch (nd_interlock_check_duration(p->daemon->limits, p->profile->area, (double) p->profile->duration_s,
                                            nd_pen_session_elapsed_s(p), &res)) {
        case ND_INTERLOCK_COMPLETE:
                nd_pen_stop_session(p, "completed");
                break;
        case ND_INTERLOCK_TRIP:
                nd_pen_trip(p, res.code, res.message);
                break;
        case ND_INTERLOCK_NONE:
        case ND_INTERLOCK_WARN:
        case _ND_INTERLOCK_VERDICT_MAX:
                break;
        }
}

/* The area's density cap reached: the planned dose is delivered, a normal end (lib/dose.c
 * decides). Checked after every batch of samples, so the session overshoots by at most a
 * batch's strokes. */
static void check_dose(nd_pen *p) {
        if (!p->session_active || p->state != ND_PEN_RUNNING || !p->profile)
                return;
        const nd_area_limits *area = nd_limits_find_area(p->daemon->limits, p->profile->area);
        if (nd_dose_reached(area, nd_pen_session_density_per_cm2(p)))
                nd_pen_stop_session(p, "dose-reached");
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
        uint64_t now_us = nd_pen_now_mono_us(p);

        /* A pen refused in on_ready (duplicate serial, no resources) has no telemetry fan-out and
         * waits for its deferred free; what its link still delivers until then is dropped. */
        if (!p->exported)
                return;
        for (size_t i = 0; i < n; i++) {
                const nd_pendev_sample *ps = &samples[i];
                const nd_proto_sample *s = &ps->s;

                if (p->session_active)
                        p->session.last_sample_ts = s->timestamp_us;
                p->pen_faults = s->faults;
                if (!s->faults)
                        p->clean_since_clear = true;
                /* Safety first: the stop goes out before anything else is done with the sample. A
                 * fault the pen latched counts in every state, idle and armed too. */
                (void) check_interlocks(p, ps, now_us);

                if (p->session_active && p->state == ND_PEN_RUNNING) {
                        nd_pen_session *ss = &p->session;
                        if (ss->last_device_time_us && ps->device_time_us > ss->last_device_time_us)
                                ss->strokes += s->speed_hz * (double) (ps->device_time_us - ss->last_device_time_us) /
                                               (double) USEC_PER_SEC;
                        ss->last_device_time_us = ps->device_time_us;
                        ss->stats.max_depth_mm = MAX(ss->stats.max_depth_mm, s->depth_mm);
                        ss->stats.max_speed_hz = MAX(ss->stats.max_speed_hz, s->speed_hz);
                        ss->stats.max_temperature_c = MAX(ss->stats.max_temperature_c, s->temperature_c);
                        ss->stats.max_current_ma = MAX(ss->stats.max_current_ma, s->current_ma);
                        p->dirty |= PROP_PROGRESS | PROP_CARTRIDGE; /* its runtime_s follows ElapsedS */
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
        check_dose(p);
        if (pen_idling(p) && p->dirty) {
                pen_emit(p, p->dirty); /* at the idle rate, within the coalescing bound */
                p->dirty = 0;
        }
}

static void on_cartridge(nd_pendev *dev, int status, const nd_proto_cartridge *c, void *userdata) {
        nd_pen *p = userdata;
        p->cartridge_query_pending = false;
        if (status < 0) {
                pen_log(p, LOG_WARNING, "%s: cartridge query failed: %s", p->serial, nd_pen_command_error(status));
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
                /* Shown once the ledger has said what it knows of it (a removal at once). */
                nd_pen_cartridge_lookup(p);
                /* A cartridge pulled out (or swapped) during a session ends it. */
                if (p->session_active && (!c->present || !STREQ(old_id, p->cartridge_id)))
                        nd_pen_trip(p, "cartridge-removed", "the cartridge was removed during the session");
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
                if (nd_ledger_session_progress(d->ledger, p->session.id, nd_now_realtime_us(), &stats) < 0)
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
        return sd_event_source_set_enabled(s, pen_idling(p) ? SD_EVENT_OFF : SD_EVENT_ON);
}

/* ---- Arrival and departure ----------------------------------------------------------------------- */

/* How many times the pen with serial has connected (for Generation), counting this time. */
static uint32_t next_generation(nd_daemon *d, const char *serial) {
        for (size_t i = 0; i < d->n_known_pens; i++)
                if (STREQ(d->known_pens[i].serial, serial))
                        return ++d->known_pens[i].generation;
        nd_known_pen *n = realloc(d->known_pens, (d->n_known_pens + 1) * sizeof *n);
        char *copy = strdup(serial);
        if (!n || !copy) {
                free(copy);
                if (n)
                        d->known_pens = n;
                return 1;
        }
        d->known_pens = n;
        d->known_pens[d->n_known_pens++] = (nd_known_pen) { .serial = copy, .generation = 1 };
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
        p->export_waiting = false; /* gone before it was on the bus: its lookup's answer is dropped */
        if (p->session_active)
                session_end(p, reason, NULL);
        pen_ops_fail_all(p, reason);
        if (p->pending_add) {
                (void) sd_bus_reply_method_errorf(p->pending_add, ND_ERROR_DEVICE_GONE,
                                                  "The simulated pen could not be identified: %s", reason);
                p->pending_add = sd_bus_message_unref(p->pending_add);
        }
        if (p->exported) {
                nd_telemetry_flush(p->telemetry);
                (void) sd_bus_emit_object_removed(d->bus, p->path);
                /* Gone before Pens is announced, so that the announced value no longer lists it. */
                p->exported = false;
                (void) sd_bus_emit_properties_changed(d->bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "Pens", NULL);
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

/* The pen answered the CLEAR_FAULTS of clear_watchdog_trace(). */
static void on_watchdog_trace_cleared(nd_pendev *dev, int status, void *userdata) {
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        nd_pen_op_free(op);
        if (status < 0) {
                pen_log(p, LOG_WARNING, "%s: the pen kept its watchdog fault (%s): in fault until an operator clears it",
                        p->serial, nd_pen_command_error(status));
                return;
        }
        /* Only if nothing else happened since: a new fault bit, a fault of the daemon's own. */
        if (p->state != ND_PEN_FAULT || !p->fault || !STREQ(p->fault, "heartbeat-lost") ||
            (p->pen_faults & ~ND_PROTO_FAULT_WATCHDOG_EXPIRED))
                return;
        p->pen_faults = 0;
        p->faults_cleared_mono_us = nd_pen_now_mono_us(p);
        p->clean_since_clear = false;
        nd_pen_disarm(p);
        nd_pen_set_state(p, ND_PEN_IDLE, NULL);
}

/* A pen that connects with only its watchdog's trace latched (its previous host went away while
 * the motor ran: that session was closed and recorded then) is cleared and idle: see
 * nd_interlock_clear_at_connect(). Logged and audited; until the pen answers it is in fault. */
static void clear_watchdog_trace(nd_pen *p) {
        pen_log(p, LOG_NOTICE,
                "%s: the pen's watchdog stopped its motor when its previous host went away; clearing that fault",
                p->serial);
        nd_audit(p->daemon, NULL, "ClearFault", p->serial, "heartbeat-lost: latched before this connection");
        nd_pen_op *op = nd_pen_op_new(p, NULL, 0);
        int r = op ? nd_pendev_clear_faults(p->dev, on_watchdog_trace_cleared, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
                (void) pen_log_errno(p, LOG_WARNING, r, "%s: cannot ask the pen to clear its watchdog fault", p->serial);
        }
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
                (void) pen_log_errno(p, LOG_ERR, r, "pen %s: cannot serve it", serial);
                pen_depart(p, "out of resources");
                pen_free_later(p);
                return;
        }
        p->generation = next_generation(d, serial);
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
                p->pen_faults = st->faults;
                /* A pen that arrives with its motor running (a daemon restart) is stopped. */
                if (st->motor_running)
                        nd_pen_motor_stop(p);
                p->arrived_motor_running = st->motor_running;
        }
        /* On the bus (and AddPen answered) once the ledger has said what it knows of its
         * cartridge: a spent one is never shown fresh, not even at arrival. Samples that come
         * meanwhile are dropped (on_samples), the motor being stopped. */
        p->export_waiting = true;
        nd_pen_cartridge_lookup(p);
}

/* The pen goes on the bus: identified, its cartridge looked up. */
static void pen_export(nd_pen *p) {
        nd_daemon *d = p->daemon;
        nd_pendev *dev = p->dev;
        const char *serial = p->serial;
        p->exported = true;
        nd_pen_remember_announced(p);
        /* Streaming at full rate since opening; from here on only as fast as somebody needs. */
        p->sampling_hz_asked = nd_pendev_get_telemetry_rate_hz(dev);
        nd_telemetry_set_demand_callback(p->telemetry, on_telemetry_demand, p);
        (void) nd_pen_update_sampling(p, NULL);
        (void) sd_bus_emit_object_added(d->bus, p->path);
        (void) sd_bus_emit_properties_changed(d->bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "Pens", NULL);
        const nd_proto_identity *id = nd_pendev_get_identity(dev);
        pen_log(p, LOG_NOTICE, "%s: pen connected: %s, firmware %s, protocol %u.%u, generation %u, %s", serial,
                id->model, id->firmware_version, id->protocol_major, id->protocol_minor, p->generation,
                nd_transport_describe(nd_pendev_get_transport(dev)));
        /* A pen that arrives with a fault latched is in fault from the start. */
        const char *latched = nd_interlock_pen_fault_code(p->pen_faults);
        if (p->pen_faults) {
                char why[64];
                snprintf(why, sizeof why, "the pen reports fault bits 0x%02x", p->pen_faults);
                nd_pen_trip(p, latched ? latched : "pen-fault", why);
                if (nd_interlock_clear_at_connect(p->pen_faults, p->arrived_motor_running))
                        clear_watchdog_trace(p);
        }
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
                        nd_pen_trip(p, "telemetry-corrupt", e->message);
                return;
        case ND_PENDEV_ERROR_TELEMETRY_STALLED:
        case ND_PENDEV_ERROR_HEARTBEAT:
                /* A pen that stops answering is in fault whatever it was doing: idle or armed, it
                 * must not be armed or started as if it were fine. */
                if (p->session_active || (p->exported && (p->state == ND_PEN_IDLE || p->state == ND_PEN_ARMED)))
                        nd_pen_trip(p, "heartbeat-lost", e->message);
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
        nd_pen_op *op = userdata;
        nd_pen *p = op->pen;
        p->cartridge_query_pending = false;
        on_cartridge(dev, status, c, p);
        if (status < 0)
                (void) sd_bus_reply_method_errorf(op->call, status == -ENODEV ? ND_ERROR_DEVICE_GONE : ND_ERROR_FAULT,
                                                  "Pen %s did not report its cartridge: %s", p->serial,
                                                  nd_pen_command_error(status));
        else if (nd_pen_cartridge_lookup_pending(p)) {
                op->waits = ND_PEN_OP_WAITS_CARTRIDGE; /* answered by cartridge_waiters_resume() */
                return;
        } else
                (void) sd_bus_reply_method_return(op->call, NULL);
        nd_pen_op_free(op);
}

int nd_pen_refresh_cartridge(nd_pen *p, sd_bus_message *call) {
        nd_pen_op *op = nd_pen_op_new(p, call, 0);
        int r = op ? nd_pendev_query_cartridge(p->dev, refresh_cartridge_done, op) : -ENOMEM;
        if (r < 0) {
                if (op)
                        nd_pen_op_free(op);
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

/* ---- Session ownership ---------------------------------------------------------------------- */

int nd_pen_on_owner_gone(sd_bus_track *track, void *userdata) {
        nd_pen *p = userdata;
        if (p->session_active && sd_bus_is_open(sd_bus_track_get_bus(track)) <= 0) {
                /* Not the owner leaving: our own connection is closing, which drops every tracked
                 * name before it says Disconnected (and the daemon exits). Recorded as that stop. */
                pen_log(p, LOG_WARNING, "%s: the bus connection is gone: stopping", p->serial);
                nd_audit(p->daemon, NULL, "Stop", p->serial, "bus-lost");
                nd_pen_stop_session(p, "stopped");
        } else if (p->session_active) {
                pen_log(p, LOG_WARNING, "%s: the session owner %s left the bus: stopping", p->serial,
                        strempty(p->session.owner_name));
                nd_audit(p->daemon, NULL, "Stop", p->serial, "client-vanished");
                nd_pen_stop_session(p, "client-vanished");
        }
        return 0;
}

int nd_pen_on_client_heartbeat_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_pen *p = userdata;
        if (p->session_active) {
                pen_log(p, LOG_WARNING, "%s: the session owner missed its heartbeat: stopping", p->serial);
                nd_audit(p->daemon, NULL, "Stop", p->serial, "client-heartbeat-lost");
                nd_pen_stop_session(p, "client-heartbeat-lost");
        }
        return 0;
}

/* ---- Daemon-wide ------------------------------------------------------------------------------------ */

static void on_watchdog_changed(nd_pendev *dev, int status, void *userdata) {
        nd_pen *p = userdata;
        if (status < 0)
                pen_log(p, LOG_ERR, "%s: the pen did not take the new watchdog timeout: %s", strempty(p->serial),
                        nd_pen_command_error(status));
}

void nd_pen_limits_changed(nd_pen *p, const nd_limits *old) {
        const nd_limits *l = p->daemon->limits;
        /* The pen's own watchdog follows the new limits (the pen stops itself after this long). */
        if (p->dev && (!old || old->pen.heartbeat_timeout_ms != l->pen.heartbeat_timeout_ms) &&
            nd_pendev_get_state(p->dev) == ND_PENDEV_READY) {
                int r = nd_pendev_set_heartbeat_timeout(p->dev, l->pen.heartbeat_timeout_ms, on_watchdog_changed, p);
                if (r < 0)
                        (void) pen_log_errno(p, LOG_ERR, r, "%s: cannot change the pen's watchdog timeout",
                                             strempty(p->serial));
        }
        /* Whether the cartridge is rejected or used up follows the limits (no ledger read). */
        nd_pen_changed(p, PROP_CARTRIDGE);
        if (!p->session_active || !p->profile_yaml)
                return;
        _cleanup_diags_ nd_diags diags = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *again = NULL;
        int r = nd_profile_parse(p->profile_yaml, strlen(p->profile_yaml), NULL, l, &again, &diags);
        /* The set points in force count too, since SetDepth/SetSpeed may have moved them, and so
         * does the session's skin type (its cap, the profile's types, require_skin_type). */
        if (r >= 0 && p->profile->area) {
                nd_skin_type t;
                if (nd_limits_check_depth_for_skin(l, p->profile->area, p->session.skin_type, p->set_depth_mm, &diags) < 0 ||
                    nd_limits_check_speed(l, p->profile->area, p->set_speed_hz, &diags) < 0 ||
                    nd_profile_check_skin_type(again, l, nd_skin_type_to_string(p->session.skin_type), &t, &diags) < 0)
                        r = -ERANGE;
        }
        if (r < 0 || diags.n_items > 0) {
                pen_log(p, LOG_WARNING, "%s: the new limits forbid the running treatment (%s): stopping", p->serial,
                        diags.n_items ? diags.items[0].message : "invalid");
                nd_audit(p->daemon, NULL, "Stop", p->serial, "limits-changed");
                nd_pen_stop_session(p, "limits-changed");
        }
}

void nd_pen_stop_all(nd_daemon *d, const char *reason) {
        for (unsigned i = 0; i < d->n_pens; i++) {
                nd_pen *p = d->pens[i];
                if (p->session_active) {
                        nd_audit(d, NULL, "Stop", strempty(p->serial), reason);
                        nd_pen_stop_session(p, reason);
                } else
                        nd_pen_motor_stop(p);
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
                        nd_pen_stop_session(p, reason);
                pen_free(p);
        }
        free(d->pens);
        d->pens = NULL;
        while (d->n_known_pens > 0)
                free(d->known_pens[--d->n_known_pens].serial);
        free(d->known_pens);
        d->known_pens = NULL;
}
