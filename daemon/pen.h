/* pen.h: one connected pen: its treatment state machine, the interlocks checked on every telemetry
 * sample, session ownership, telemetry intake, arrival and departure. Its D-Bus adapter is
 * pen-dbus.h. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <systemd/sd-bus.h>

#include "audit.h"
#include "interlocks.h"
#include "daemon.h"
#include "ledger.h"
#include "log.h"
#include "pendev.h"
#include "telemetry.h"
#include "safety-limits.h"
#include "penmodel.h"
#include "profile.h"
#include "transport.h"

typedef enum nd_pen_state {
        ND_PEN_IDLE,
        ND_PEN_ARMED,
        ND_PEN_RUNNING,
        ND_PEN_PAUSED,
        ND_PEN_FAULT,
        _ND_PEN_STATE_MAX,
} nd_pen_state;

/* The kebab name of a state ("idle", "armed", ...; static; NULL out of range). */
const char *nd_pen_state_to_string(nd_pen_state s);

/* Takes ownership of transport and starts opening the pen behind it. The pen appears on the
 * bus once identified; a pen that cannot be identified is logged and dropped. model is the
 * simulated pen's model (a reference is taken), NULL for hardware. add_call (may be NULL) is
 * answered with the pen's path once identified, or with an error; on a failure returned here
 * the caller answers it. */
int nd_pen_attach(nd_daemon *d, nd_transport *transport, nd_penmodel *model, sd_bus_message *add_call);

/* Whether the pen is on the bus (identified), and whether a session is in progress. */
bool nd_pen_is_exported(const nd_pen *p);
bool nd_pen_in_session(const nd_pen *p);

/* Unplugs a simulated pen; remove_call is answered once it is gone. -EINVAL for hardware. */
int nd_pen_unplug(nd_pen *p, sd_bus_message *remove_call);

/* Asks the pen for its cartridge and answers call once the Cartridge property is up to date.
 * Returns 1 (answered later) or what sd_bus_reply_method_errorf returns. */
int nd_pen_refresh_cartridge(nd_pen *p, sd_bus_message *call);

/* The pen's object path (owned by the pen). */
const char *nd_pen_get_path(const nd_pen *p);
/* The pen's serial (owned by the pen). */
const char *nd_pen_get_serial(const nd_pen *p);
/* The simulated pen's model (borrowed), NULL for hardware. */
nd_penmodel *nd_pen_get_model(const nd_pen *p);
/* The simulated pen's transport (borrowed), NULL for hardware. */
nd_transport *nd_pen_get_transport(const nd_pen *p);
/* The connected pen at object path, or NULL. */
nd_pen *nd_pen_find_by_path(nd_daemon *d, const char *path);

/* The limits were replaced (old is still valid during the call): a running session that is
 * no longer within them is stopped with reason limits-changed. */
void nd_pen_limits_changed(nd_pen *p, const nd_limits *old);

/* Stops every motor at once and ends every session with reason (shutdown). */
void nd_pen_stop_all(nd_daemon *d, const char *reason);
/* Motor stops sent and not yet acknowledged, over all pens. */
unsigned nd_pen_stops_in_flight(const nd_daemon *d);

/* Removes every pen (daemon shutdown): ends their sessions with reason, frees them. */
void nd_pen_free_all(nd_daemon *d, const char *reason);


/* ---- Shared with the bus adapter (pen-dbus.c) ------------------------------------------------ */

typedef enum pen_prop {
        PROP_STATE        = 1u << 0,  /* State, Fault */
        PROP_PROFILE      = 1u << 1,
        PROP_SETPOINTS    = 1u << 2,  /* DepthMm, SpeedHz */
        PROP_BATTERY      = 1u << 3,
        PROP_TEMPERATURE  = 1u << 4,
        PROP_CARTRIDGE    = 1u << 5,
        PROP_SESSION      = 1u << 6,  /* SessionId, SkinType */
        PROP_PROGRESS     = 1u << 7,  /* ElapsedS, Strokes, Punctures, DensityPerCm2 */
        PROP_WARNINGS     = 1u << 8,
        PROP_RATE         = 1u << 9,
} pen_prop;

/* Properties of the pen's vtable whose announced values are remembered (one bit each). */
#define ND_PEN_ANNOUNCED_MAX 64

/* Sampling while the pen is idle, unarmed and nobody reads or watches: enough for the coalesced
 * properties (at most about 4 Hz) and the idle checks (temperature, battery, latched faults: an
 * idle motor's temperature changes over seconds), and a fraction of the wake-ups. */
#define ND_PEN_IDLE_SAMPLING_HZ 2u

#define PROPS_LOW_RATE (PROP_BATTERY | PROP_TEMPERATURE | PROP_PROGRESS | PROP_WARNINGS)

/* A cartridge as the Cartridge property shows it, with what the ledger knows of it. */
typedef struct nd_pen_cartridge_view {
        bool present;
        char id[ND_PROTO_CARTRIDGE_ID_SIZE + 1];
        unsigned needles;
        bool known;                   /* the ledger has a record of it: info */
        nd_ledger_cartridge info;
} nd_pen_cartridge_view;

typedef struct nd_pen_session {
        char id[ND_LEDGER_SESSION_ID_SIZE];
        sd_bus_track *owner;          /* the caller of Start; leaving the bus stops the session */
        char *owner_name;
        uint32_t owner_uid, owner_pid;
        uint64_t running_since_us;    /* CLOCK_MONOTONIC when the motor last started; 0 paused */
        uint64_t elapsed_before_us;   /* running time before the last start */
        uint64_t last_device_time_us; /* for stroke counting */
        double strokes;
        nd_ledger_stats stats;
        nd_skin_type skin_type;       /* the Start option; ND_SKIN_TYPE_NONE when none was given */
        uint32_t needles;             /* the cartridge's, at Start: punctures = strokes x needles */
        double area_cm2;              /* the profile's treated surface; 0: none (no density) */
        double cartridge_runtime_before_s;
        char cartridge_id[ND_PROTO_CARTRIDGE_ID_SIZE + 1]; /* the session's */
        bool single_use;              /* the limits' cartridge rules recorded at Start, for the */
        uint32_t cartridge_max_runtime_s; /* cartridge's state once the session ends */
        const char *cartridge_state_before; /* nd_pen_cartridge_state() at Start (static), shown while starting */
        sd_event_source *client_heartbeat;
        /* The settle and spin-up windows and the stall timing (lib/interlocks.h): depth is
         * checked only on samples the pen measured once a change took effect, as it says. */
        nd_interlock_session interlock;
        unsigned depth_settle_queries;
        uint32_t last_sample_ts;      /* the pen's clock of the latest sample seen */
} nd_pen_session;

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
        bool export_waiting;          /* identified; on the bus once its cartridge is looked up */
        bool arrived_motor_running;   /* its motor ran when it connected (a daemon restart) */
        nd_telemetry *telemetry;

        nd_pen_state state;
        char *fault;                  /* code while in fault */
        nd_profile *profile;          /* armed */
        char *profile_yaml;           /* its bytes, for the ledger's snapshot */
        double set_depth_mm, set_speed_hz;

        /* Last measured values. */
        bool have_sample;
        double temperature_c;
        uint32_t battery_percent;
        uint8_t last_status;
        uint8_t pen_faults;           /* fault bits the pen reports latched (latest sample or status) */
        uint64_t faults_cleared_mono_us; /* when the pen last confirmed a ClearFault */
        bool clean_since_clear;          /* a sample without fault bits came since */
        uint64_t last_sample_mono_us;

        /* The inserted cartridge. */
        bool cartridge_present;
        char cartridge_id[ND_PROTO_CARTRIDGE_ID_SIZE + 1];
        unsigned cartridge_needles;
        bool cartridge_query_pending;
        /* What the ledger knows of the inserted cartridge, looked up off the loop (ledger-reader.h)
         * when the cartridge changes and after a session on it: valid once cartridge_lookup_done.
         * A completion that is not of the latest lookup (cartridge_lookup_seq) is ignored. */
        bool cartridge_lookup_done;
        bool cartridge_lookup_failed; /* the latest lookup failed: Start refuses (Storage) and looks again */
        nd_ledger_cartridge cartridge_info;
        bool cartridge_known;         /* cartridge_info holds the ledger's record */
        uint32_t cartridge_lookup_seq;
        /* What the Cartridge property shows: the inserted cartridge once its lookup is done; until
         * then the cartridge shown before (a removal is shown at once), so that a cartridge the
         * ledger knows as spent is never shown as fresh. */
        nd_pen_cartridge_view cartridge_shown;
        unsigned stops_in_flight;     /* motor stops sent and not yet acknowledged */

        /* A start in progress: the session is recorded, its commands are on their way to the
         * pen; the Start call itself waits in its nd_pen_op. Cleared when the session ends. */
        bool starting;
        bool session_active;
        nd_pen_session session;

        unsigned dirty;               /* low-rate properties changed since the last announcement */
        unsigned sampling_hz_asked;   /* the rate last asked of the pen (0: not yet streaming) */
        /* Fingerprints of the values last announced, by pen vtable index (pen-dbus.c), so that
         * PropertiesChanged carries only values that changed. */
        uint64_t announced_hash[ND_PEN_ANNOUNCED_MAX];
        uint64_t announced_known;     /* bit i: announced_hash[i] is set */
        sd_event_source *tick;        /* coalescing, progress, duration */
        uint64_t last_progress_us;
};

/* A method call whose reply waits for the pen's acknowledgement. Kept on the daemon's list so
 * that a pen that goes away still answers every caller (DeviceGone). */
typedef enum nd_pen_op_wait {
        ND_PEN_OP_WAITS_PEN,          /* for the pen's acknowledgement (its callback has the op) */
        ND_PEN_OP_WAITS_CARTRIDGE,    /* answered once the Cartridge property is up to date */
        ND_PEN_OP_WAITS_START,        /* a Start run again once the cartridge's lookup is done */
} nd_pen_op_wait;

struct nd_pen_op {
        nd_pen *pen;
        nd_pen_op *next;
        sd_bus_message *call;
        double value;
        nd_pen_op_wait waits;
        char *caller_name;            /* ND_PEN_OP_WAITS_START: the caller, as authorized */
        uint32_t caller_uid, caller_pid;
};

static inline const char *nd_pen_log_fields_serial(const nd_pen *p, char *buf, size_t size) {
        snprintf(buf, size, "PEN_SERIAL=%s", p->serial ? p->serial : "");
        return buf;
}

/* Logs one line with the pen's PEN_SERIAL= journal field. */
#define pen_log(p, level, ...)                                                              \
        do {                                                                                \
                char _f[64];                                                                \
                nd_log_full(level, (const char *const[]) { nd_pen_log_fields_serial(p, _f, sizeof _f), NULL }, \
                            __VA_ARGS__);                                                   \
        } while (0)

/* Logs "<message>: <strerror(|r|)>" with the pen's PEN_SERIAL= field and evaluates to -|r|:
 * return pen_log_errno(p, LOG_ERR, r, "..."). */
#define pen_log_errno(p, level, r, ...)                                                     \
        __extension__ ({                                                                    \
                char _f[64];                                                                \
                nd_log_full_errno(level, (const char *const[]) { nd_pen_log_fields_serial(p, _f, sizeof _f), NULL }, \
                                  (r), __VA_ARGS__);                                        \
        })

/* The loop's CLOCK_MONOTONIC now. */
uint64_t nd_pen_now_mono_us(const nd_pen *p);
/* Marks properties changed: state-like ones are announced at once, low-rate ones at the tick. */
void nd_pen_changed(nd_pen *p, unsigned props);
/* Running time of the session in progress (0 without one). */
double nd_pen_session_elapsed_s(const nd_pen *p);
/* The dose of the session in progress (lib/dose.h): punctures, and per cm² (0 without a
 * surface); both 0 without a session. */
uint64_t nd_pen_session_punctures(const nd_pen *p);
double nd_pen_session_density_per_cm2(const nd_pen *p);
/* What the ledger knows of the inserted cartridge ("none", "rejected", "in-use", "spent",
 * "fresh"; static), from the lookup made off the loop (never a ledger read: see
 * nd_pen_cartridge_lookup_pending()); *known tells whether info was filled from the ledger. */
const char *nd_pen_cartridge_state(const nd_pen *p, nd_ledger_cartridge *info, bool *known);
/* The same for what the Cartridge property shows (nd_pen.cartridge_shown); *view is set to it. */
const char *nd_pen_cartridge_shown_state(const nd_pen *p, const nd_pen_cartridge_view **view);
/* Whether the ledger's answer about the inserted cartridge is still on its way (Start waits). */
bool nd_pen_cartridge_lookup_pending(const nd_pen *p);
/* Looks up the inserted cartridge in the ledger again, off the loop (after a failed lookup). */
void nd_pen_cartridge_lookup(nd_pen *p);
/* Looks again for every pen whose lookup is on its way (the reader went: its jobs are dropped). */
void nd_pen_cartridge_lookup_all(nd_daemon *d);
/* Runs a Start that waited for the cartridge's lookup (pen-dbus.c); frees op. */
void nd_pen_start_resume(nd_pen_op *op);
/* A pending call on p (a reference on call is taken); NULL without memory. */
nd_pen_op *nd_pen_op_new(nd_pen *p, sd_bus_message *call, double value);
/* Unlinks and frees op (its call must have been answered). */
void nd_pen_op_free(nd_pen_op *op);
/* Human words for a pendev command status (static). */
const char *nd_pen_command_error(int status);
/* Sets state and fault code (copied; NULL: none), announcing a change. */
void nd_pen_set_state(nd_pen *p, nd_pen_state state, const char *fault);
/* Asks the pen for full-rate sampling when a session may run (armed, starting, running, paused,
 * fault) or somebody reads or watches its telemetry, and for ND_PEN_IDLE_SAMPLING_HZ otherwise.
 * With call (a method call) and a raise to full rate queued, call is answered once the pen has
 * acknowledged it and 1 is returned; otherwise 0 and the caller answers. */
int nd_pen_update_sampling(nd_pen *p, sd_bus_message *call);
/* The pen's latest reading, for the preconditions of lib/interlocks.h. */
nd_interlock_pen nd_pen_interlock_reading(const nd_pen *p);
/* Drops the armed profile. */
void nd_pen_disarm(nd_pen *p);
/* Sends the motor stop now; it bypasses every queue. */
void nd_pen_motor_stop(nd_pen *p);
/* An interlock tripped: motor stop, log, audit, then the session ends in fault code. */
void nd_pen_trip(nd_pen *p, const char *code, const char *why);
/* Ends the session for a reason that is not a fault (stop, completion, owner gone, ...). */
void nd_pen_stop_session(nd_pen *p, const char *reason);
/* Whether clients see the session in progress (SessionId, SkinType, the cartridge in use): from
 * the moment its motor started; a start in progress is not shown. */
bool nd_pen_session_announced(const nd_pen *p);
/* A start that never reached the motor (the pen refused it, or a command before it failed): not a
 * session. The ledger voids its record (nd_ledger_session_void: the cartridge as it was), the
 * pen stays armed, and nothing is announced, as nothing was. Returns 0, or -errno when the record
 * could not be voided: the session then ends as "stopped" (recorded, announced) instead. */
int nd_pen_start_void(nd_pen *p, const char *why);
/* A new depth or speed (or a motor start) was acknowledged: the depth and stall checks wait
 * until the pen says when, on its clock, and then the settle time. */
void nd_pen_depth_settle_begin(nd_pen *p);
/* The session owner left the bus (sd_bus_track handler): the session stops. */
int nd_pen_on_owner_gone(sd_bus_track *track, void *userdata);
/* The session owner missed its heartbeat (timer handler): the session stops. */
int nd_pen_on_client_heartbeat_timeout(sd_event_source *s, uint64_t usec, void *userdata);
