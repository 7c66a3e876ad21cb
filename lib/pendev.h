/* pendev.h: one pen, above any nd_transport (USB or simulated), on the caller's sd-event loop.
 *
 * Opening (started by nd_pendev_new, all asynchronous): IDENTIFY (the host's protocol version;
 * an unknown major or a malformed reply refuses the pen), GET_CARTRIDGE, GET_STATUS,
 * SET_WATCHDOG (the heartbeat timeout), start of the interrupt stream, SET_TELEMETRY (on, at
 * the configured rate). A request of these that times out is asked again, with twice the time
 * (ND_PENDEV_OPEN_ATTEMPTS); any other failure refuses the pen at once. Then `ready` runs, a
 * heartbeat goes out periodically, and every telemetry packet is decoded into samples handed to
 * `samples` in sequence order.
 *
 * Problems are reported through `error`, one call per problem, and counted (nd_pendev_stats);
 * each is also logged (log.h) with the pen's serial as PEN_SERIAL= journal field. Telemetry
 * problems are rate-limited in the log (first one, then a summary per second), never in
 * the callback.
 *
 * Commands complete through their callback, from the event loop, never inside the call that
 * issued them; a command refused at once returns -errno and its callback never runs.
 * Ordinary commands go out one at a time in issue order. Motor stop bypasses that queue: it is
 * submitted at once in any state but `gone` (the protocol never refuses it, even before
 * IDENTIFY), and motor starts still queued behind it are cancelled (-ECANCELED) so that a stop
 * cannot be overtaken by an older start. Heartbeats bypass the queue too.
 *
 * Freeing a pendev frees its transport; callbacks never run after nd_pendev_free(). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "protocol.h"
#include "transport.h"
#include "util.h"

typedef struct nd_pendev nd_pendev;

/* A sample up to this far behind the expected sequence number is a duplicate (dropped);
 * further behind, the pen's count restarted: followed from there (RESYNC). */
#define ND_PENDEV_DUPLICATE_WINDOW 1024u

/* Defaults for nd_pendev_config fields left at 0. */
#define ND_PENDEV_HEARTBEAT_TIMEOUT_MS_DEFAULT ND_PROTO_WATCHDOG_DEFAULT_MS
#define ND_PENDEV_HEARTBEAT_DIVISOR_DEFAULT    4u   /* heartbeat every timeout / 4 */
#define ND_PENDEV_REQUEST_TIMEOUT_MS_DEFAULT   1000u
/* A request of the opening sequence that times out is sent again, each time with twice the time
 * to answer: at most this many times in all (1 + 2 + 4 s at the default request timeout). */
#define ND_PENDEV_OPEN_ATTEMPTS 3u
/* A pen sampling slower than the stall time allows is stalled after this many silent periods. */
#define ND_PENDEV_STALL_PERIODS 4u

typedef struct nd_pendev_config {
        /* Watchdog timeout set on the pen: it stops its motor when the host is silent this
         * long. ND_PROTO_WATCHDOG_MIN_MS..ND_PROTO_WATCHDOG_MAX_MS; 0: the default. */
        unsigned heartbeat_timeout_ms;
        /* Period of the heartbeat; 0: heartbeat_timeout_ms / ND_PENDEV_HEARTBEAT_DIVISOR_DEFAULT.
         * Must be below heartbeat_timeout_ms. */
        unsigned heartbeat_interval_ms;
        /* Telemetry rate asked of the pen; 0 or above its maximum: the pen's maximum. */
        unsigned telemetry_rate_hz;
        /* Time-out of every control request; 0: ND_PENDEV_REQUEST_TIMEOUT_MS_DEFAULT. */
        unsigned request_timeout_ms;
        /* No telemetry packet for this long while streaming is reported (once, until packets
         * come again); 0: heartbeat_timeout_ms. */
        unsigned telemetry_stall_ms;
} nd_pendev_config;

typedef enum nd_pendev_state {
        ND_PENDEV_OPENING,  /* identifying and setting up */
        ND_PENDEV_READY,    /* identified, streaming, heartbeating */
        ND_PENDEV_REFUSED,  /* identification or set-up failed: only motor stop is accepted */
        ND_PENDEV_GONE,     /* the link is gone: nothing is accepted */
} nd_pendev_state;

typedef enum nd_pendev_error_kind {
        ND_PENDEV_ERROR_IDENTIFY,            /* IDENTIFY failed or its reply is malformed (fatal) */
        ND_PENDEV_ERROR_VERSION,             /* the pen speaks an unknown protocol major (fatal) */
        ND_PENDEV_ERROR_SETUP,               /* a set-up request failed or its reply is bad (fatal) */
        ND_PENDEV_ERROR_TELEMETRY_CORRUPT,   /* a packet failed to decode: dropped */
        ND_PENDEV_ERROR_TELEMETRY_GAP,       /* sequence jumped ahead: `count` samples missing */
        ND_PENDEV_ERROR_TELEMETRY_DUPLICATE, /* sequence repeated or went back a little: sample dropped */
        ND_PENDEV_ERROR_TELEMETRY_RESYNC,    /* sequence went back far, or back to where it was before a
                                              * jump ahead (the jump was bogus): followed from there */
        ND_PENDEV_ERROR_TELEMETRY_STALLED,   /* no packet for telemetry_stall_ms while streaming */
        ND_PENDEV_ERROR_HEARTBEAT,           /* a heartbeat was not acknowledged */
        ND_PENDEV_ERROR_GONE,                /* the link went away (fatal) */
        _ND_PENDEV_ERROR_KIND_MAX,
} nd_pendev_error_kind;

typedef struct nd_pendev_error {
        nd_pendev_error_kind kind;
        int error;           /* -errno: -EBADMSG corrupt, -EPROTONOSUPPORT version, ... */
        bool fatal;          /* the pen is now refused or gone */
        uint64_t count;      /* GAP: samples missing; HEARTBEAT: failures in a row; else 1 */
        const char *message; /* one line with context; valid during the call */
} nd_pendev_error;

/* A telemetry sample with its device time extended to 64 bits (nd_proto_clock_extend). */
typedef struct nd_pendev_sample {
        uint64_t device_time_us;
        nd_proto_sample s;
} nd_pendev_sample;

typedef struct nd_pendev_stats {
        uint64_t packets;          /* telemetry packets decoded */
        uint64_t samples;          /* samples delivered */
        uint64_t corrupt_packets;  /* packets that failed to decode */
        uint64_t gaps;             /* sequence gaps ... */
        uint64_t missing_samples;  /* ... and the samples they lost */
        uint64_t duplicates;       /* samples dropped as repeated or out of order */
        uint64_t resyncs;          /* sequence followed from a new place (see RESYNC) */
        uint64_t stalls;           /* telemetry stalls reported */
        uint64_t heartbeats_sent;
        uint64_t heartbeats_failed;
        uint64_t heartbeats_skipped; /* the previous one was still in flight */
        uint64_t commands_ok;
        uint64_t commands_failed;
} nd_pendev_stats;

typedef struct nd_pendev_callbacks {
        /* Identified and set up; identity, cartridge and status are available. */
        void (*ready)(nd_pendev *p, void *userdata);
        /* n >= 1 consecutive samples, in order; the array is valid during the call. */
        void (*samples)(nd_pendev *p, const nd_pendev_sample *samples, size_t n, void *userdata);
        /* One problem (see nd_pendev_error_kind). May be NULL. */
        void (*error)(nd_pendev *p, const nd_pendev_error *error, void *userdata);
} nd_pendev_callbacks;

/* A command's completion: 0, or -EPIPE the pen refused it, -ETIMEDOUT no answer, -ENODEV gone,
 * -ECANCELED (a queued motor start overtaken by a motor stop), -EBADMSG a malformed reply,
 * -EIO other. */
typedef void (*nd_pendev_done_fn)(nd_pendev *p, int status, void *userdata);
/* Completion of a status query; st is valid during the call when status is 0. */
typedef void (*nd_pendev_status_fn)(nd_pendev *p, int status, const nd_proto_status *st, void *userdata);
/* Completion of a cartridge query; c is valid during the call when status is 0. */
typedef void (*nd_pendev_cartridge_fn)(nd_pendev *p, int status, const nd_proto_cartridge *c, void *userdata);

/* Fills *c with the defaults (all 0: every field takes its documented default). */
void nd_pendev_config_init(nd_pendev_config *c);

/* Takes ownership of transport (freed with the pendev, also on failure) and starts opening
 * the pen from the event loop. config may be NULL (defaults). Returns 0 and *ret (the caller
 * owns it: nd_pendev_free), -EINVAL for a bad config, -ENOMEM. */
int nd_pendev_new(nd_transport *transport, const nd_pendev_config *config,
                  const nd_pendev_callbacks *callbacks, void *userdata, nd_pendev **ret);

/* Frees the pen and its transport; pending callbacks are dropped. NULL allowed; returns NULL. */
nd_pendev *nd_pendev_free(nd_pendev *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_pendev *, nd_pendev_free)

nd_pendev_state nd_pendev_get_state(const nd_pendev *p);
/* The pen's serial ("" until identified); owned by p. The daemon recognises a replug by it. */
const char *nd_pendev_get_serial(const nd_pendev *p);
/* The identity from IDENTIFY, NULL until identified; owned by p. */
const nd_proto_identity *nd_pendev_get_identity(const nd_pendev *p);
/* The last status / cartridge the pen reported (queried at open and by the queries below),
 * NULL until the first answer; owned by p. */
const nd_proto_status *nd_pendev_get_status(const nd_pendev *p);
const nd_proto_cartridge *nd_pendev_get_cartridge(const nd_pendev *p);
/* The telemetry rate in force (asked of the pen at open), 0 before. */
unsigned nd_pendev_get_telemetry_rate_hz(const nd_pendev *p);
/* Re-rates the pen's sampling (SET_TELEMETRY while streaming, protocol §5.4): rate_hz from 1 to
 * the rate set at opening (nd_pendev_get_telemetry_rate_hz); 0 or above it: that rate. Queued
 * like any command; done (may be NULL) runs once the pen acknowledged it. */
int nd_pendev_set_sampling_rate(nd_pendev *p, unsigned rate_hz, nd_pendev_done_fn done, void *userdata);
/* The rate the pen samples at now (after the last acknowledged re-rate); 0 while opening. */
unsigned nd_pendev_get_sampling_rate_hz(const nd_pendev *p);
/* Counters since creation. */
void nd_pendev_get_stats(const nd_pendev *p, nd_pendev_stats *ret);
/* The transport underneath (borrowed), e.g. for its description. */
nd_transport *nd_pendev_get_transport(nd_pendev *p);

/* Commands. Each returns 0 when queued or sent (done runs later; done may be NULL), or at once
 * -EAGAIN while opening, -ENOTCONN when refused, -ENODEV when gone, -ERANGE / -EDOM for a
 * value outside the pen's range / off its depth step grid, -ENOMEM. */
int nd_pendev_set_depth(nd_pendev *p, double depth_mm, nd_pendev_done_fn done, void *userdata);
int nd_pendev_set_speed(nd_pendev *p, double speed_hz, nd_pendev_done_fn done, void *userdata);
int nd_pendev_motor_start(nd_pendev *p, nd_pendev_done_fn done, void *userdata);
/* Changes the pen's watchdog timeout (ND_PROTO_WATCHDOG_MIN_MS..MAX_MS, else -ERANGE), e.g. after
 * the limits changed; the heartbeat follows at timeout / ND_PENDEV_HEARTBEAT_DIVISOR_DEFAULT. A
 * shorter timeout shortens the heartbeat interval at once, before the pen has it. */
int nd_pendev_set_heartbeat_timeout(nd_pendev *p, unsigned timeout_ms, nd_pendev_done_fn done, void *userdata);
/* Accepted in every state but gone, sent at once (see above). */
int nd_pendev_motor_stop(nd_pendev *p, nd_pendev_done_fn done, void *userdata);
int nd_pendev_clear_faults(nd_pendev *p, nd_pendev_done_fn done, void *userdata);
int nd_pendev_query_status(nd_pendev *p, nd_pendev_status_fn done, void *userdata);
int nd_pendev_query_cartridge(nd_pendev *p, nd_pendev_cartridge_fn done, void *userdata);

/* A static name for an error kind ("telemetry-corrupt", ...); NULL when out of range. */
const char *nd_pendev_error_kind_to_string(nd_pendev_error_kind k);
