/* pen-monitor.h: follows one pen over the bus for watch, run and record: its properties, its
 * telemetry socket, its sessions ending, and the pen or the daemon leaving and coming back.
 * Also the live view (tools/cmd-watch.c) that watch and run share. */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "telemetry-record.h"
#include "util.h"

typedef enum ctl_monitor_event {
        CTL_MONITOR_PROPERTIES,    /* the pen's properties changed (props updated) */
        CTL_MONITOR_PEN_GONE,      /* the pen's object went away (unplugged, removed) */
        CTL_MONITOR_PEN_BACK,      /* it came back (props re-read; Generation tells) */
        CTL_MONITOR_DAEMON_GONE,   /* needled left the bus */
        CTL_MONITOR_DAEMON_BACK,   /* needled is back (the pen may or may not be) */
        CTL_MONITOR_SESSION_ENDED, /* SessionEnded: ended_session_id, ended_reason */
        CTL_MONITOR_TELEMETRY_EOF, /* the telemetry socket closed (the pen is going) */
        CTL_MONITOR_LIMITS_CHANGED, /* the Manager's LimitsDigest changed */
} ctl_monitor_event;

typedef struct ctl_monitor ctl_monitor;
typedef void (*ctl_monitor_event_fn)(ctl_monitor *m, ctl_monitor_event event, void *userdata);
typedef void (*ctl_monitor_sample_fn)(ctl_monitor *m, const nd_telemetry_record *rec, void *userdata);

struct ctl_monitor {
        sd_event *event;
        sd_bus *bus;
        char *path;
        char *serial;
        json_object *props;        /* the pen's properties, JSON keys; kept while gone */
        bool present;              /* the pen's object exists */
        bool daemon_present;
        bool want_telemetry;

        int telemetry_fd;
        sd_event_source *telemetry_source;
        nd_telemetry_record last; /* the newest sample */
        bool have_sample;
        uint64_t samples;          /* records received, over every socket opened */
        uint64_t dropped;          /* records the daemon dropped for us, over every socket */
        uint32_t dropped_this_fd;
        uint64_t gaps;             /* sequence numbers never seen (includes dropped ones) */
        bool have_sequence;
        uint32_t next_sequence;
        uint64_t bad_records;      /* datagrams that were not a record we can read */

        char *ended_session_id;    /* of the last SessionEnded */
        char *ended_reason;
        /* SessionRecorded: the ledger's figures of the last session that ended. */
        char *recorded_session_id;
        double recorded_duration_s;
        uint64_t recorded_strokes;
        uint64_t recorded_punctures;    /* 0 from a daemon that does not send them */
        double recorded_density_per_cm2;

        sd_bus_slot *slots[7];
        ctl_monitor_event_fn on_event;
        ctl_monitor_sample_fn on_sample;
        void *userdata;
};

/* Follows the pen at path on bus, which must be attached to event. Subscribes to its signals
 * and reads its properties; with telemetry, also opens its telemetry socket. On failure prints
 * why and returns the exit code, else 0 with *ret owned by the caller (ctl_monitor_free). */
int ctl_monitor_new(sd_event *event, sd_bus *bus, const char *path, bool telemetry, ctl_monitor **ret);

/* Unsubscribes, closes the socket and frees m; returns NULL. */
ctl_monitor *ctl_monitor_free(ctl_monitor *m);
DEFINE_TRIVIAL_CLEANUP_FUNC(ctl_monitor *, ctl_monitor_free)

/* Sets the callbacks (either may be NULL). */
void ctl_monitor_set_callbacks(ctl_monitor *m, ctl_monitor_event_fn on_event, ctl_monitor_sample_fn on_sample,
                               void *userdata);

/* µs of CLOCK_REALTIME and CLOCK_MONOTONIC now. */
uint64_t ctl_now_realtime_usec(void);
uint64_t ctl_now_monotonic_usec(void);

/* ---- the live view (tools/cmd-watch.c) ------------------------------------------------------ */

typedef struct ctl_view ctl_view;
/* Called when the operator asks to quit (q, Ctrl-C, SIGTERM); the default exits the loop. */
typedef void (*ctl_view_quit_fn)(ctl_view *v, void *userdata);

typedef enum ctl_view_mode {
        CTL_VIEW_SCREEN,  /* full-screen terminal view, refreshed 15 times a second */
        CTL_VIEW_LINES,   /* one line of text per update */
        CTL_VIEW_JSON,    /* one JSON object per line per update */
        CTL_VIEW_QUIET,   /* no updates; ctl_view_emit() lines only */
} ctl_view_mode;

/* A key pressed in SCREEN mode other than q; returns true when it was used. */
typedef bool (*ctl_view_key_fn)(ctl_view *v, char key, void *userdata);

/* A view of m's pen on stdout. interval_usec is the time between update lines (LINES/JSON);
 * the screen refreshes faster. title names the command ("watch", "run"). Sets itself as m's
 * callbacks. Returns 0 or -errno; *ret is owned by the caller. */
int ctl_view_new(ctl_monitor *m, ctl_view_mode mode, uint64_t interval_usec, const char *title, ctl_view **ret);

/* Enters the screen (alternate screen, hidden cursor, keys unbuffered) and starts the
 * timers and signal handling. Returns 0 or -errno. */
int ctl_view_start(ctl_view *v);

/* Leaves the screen and restores the terminal as it was (idempotent). */
void ctl_view_stop(ctl_view *v);

/* Frees v, restoring the terminal first; returns NULL. */
ctl_view *ctl_view_free(ctl_view *v);
DEFINE_TRIVIAL_CLEANUP_FUNC(ctl_view *, ctl_view_free)

/* Replaces what q/Ctrl-C/SIGTERM do. */
void ctl_view_set_quit(ctl_view *v, ctl_view_quit_fn quit, void *userdata);

/* Handles keys other than q (SCREEN mode), and replaces the key help at the bottom. */
void ctl_view_set_keys(ctl_view *v, ctl_view_key_fn on_key, void *userdata, const char *help);

/* Forwards monitor events to a second listener (run's session logic) after the view's own. */
void ctl_view_chain_events(ctl_view *v, ctl_monitor_event_fn on_event, void *userdata);

/* Sets the note shown under the view (screen) or printed once as a line (LINES); NULL clears. */
void ctl_view_set_note(ctl_view *v, const char *note);

/* Prints an event line (LINES: text; JSON: {"event": name, ...extra}); extra may be NULL and
 * is consumed. In SCREEN mode it becomes the note. */
void ctl_view_emit(ctl_view *v, const char *event, const char *text, json_object *extra);

/* The mode watch picks for stdout: SCREEN on a terminal (TERM not dumb), else LINES; JSON
 * when asked. */
ctl_view_mode ctl_view_pick_mode(bool json);
