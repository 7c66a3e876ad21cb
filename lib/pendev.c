/* pendev.c: the pen device layer (see pendev.h).
 *
 * Re-entrancy: any user callback may free the pendev. Every entry from the loop (transport
 * callbacks, the timer) holds a dispatch count; nd_pendev_free() inside a callback frees the
 * transport at once (so no callback can follow) but leaves the struct to be released when the
 * outermost dispatch returns. After each user callback the code checks p->freed and stops. */
#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "pendev.h"

/* Telemetry problems are logged at most this many times per window, then summarised. */
#define LOG_BURST_PER_WINDOW 3u
#define LOG_WINDOW_USEC      (1 * USEC_PER_SEC)

#define TIMER_ACCURACY_USEC 1
#define MESSAGE_MAX         256u
#define SEQUENCE_HALF_RANGE UINT32_C(0x80000000) /* ahead by less than this: a gap, else behind */

typedef enum command_kind {
        CMD_IDENTIFY,
        CMD_OPEN_CARTRIDGE,
        CMD_OPEN_STATUS,
        CMD_SET_WATCHDOG,
        CMD_SET_TELEMETRY,
        CMD_HEARTBEAT,
        CMD_SET_DEPTH,
        CMD_SET_SPEED,
        CMD_MOTOR_START,
        CMD_MOTOR_STOP,
        CMD_CLEAR_FAULTS,
        CMD_QUERY_STATUS,
        CMD_QUERY_CARTRIDGE,
        CMD_CHANGE_WATCHDOG,     /* SET_WATCHDOG on a pen that is ready (the limits changed) */
        CMD_CHANGE_TELEMETRY,    /* SET_TELEMETRY on a pen that is ready (re-rate, §5.4) */
} command_kind;

static const char *const command_names[] = {
        [CMD_IDENTIFY] = "IDENTIFY",
        [CMD_OPEN_CARTRIDGE] = "GET_CARTRIDGE",
        [CMD_OPEN_STATUS] = "GET_STATUS",
        [CMD_SET_WATCHDOG] = "SET_WATCHDOG",
        [CMD_SET_TELEMETRY] = "SET_TELEMETRY",
        [CMD_HEARTBEAT] = "HEARTBEAT",
        [CMD_SET_DEPTH] = "SET_DEPTH",
        [CMD_SET_SPEED] = "SET_SPEED",
        [CMD_MOTOR_START] = "MOTOR_START",
        [CMD_MOTOR_STOP] = "MOTOR_STOP",
        [CMD_CLEAR_FAULTS] = "CLEAR_FAULTS",
        [CMD_QUERY_STATUS] = "GET_STATUS",
        [CMD_QUERY_CARTRIDGE] = "GET_CARTRIDGE",
        [CMD_CHANGE_WATCHDOG] = "SET_WATCHDOG",
        [CMD_CHANGE_TELEMETRY] = "SET_TELEMETRY",
};

typedef struct command command;
struct command {
        nd_pendev *pendev;
        command_kind kind;
        nd_control_setup setup;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE]; /* the OUT data stage, when there is one */
        uint32_t timeout_ms;
        unsigned attempt;        /* opening requests: 0 the first time, then one more per timeout */
        bool submitted;
        bool cancelled;          /* a queued motor start overtaken by a motor stop */
        unsigned watchdog_ms;    /* CMD_CHANGE_WATCHDOG: the new timeout */
        unsigned rate_hz;        /* CMD_CHANGE_TELEMETRY: the new sampling rate */
        nd_pendev_done_fn done;
        nd_pendev_status_fn status_done;
        nd_pendev_cartridge_fn cartridge_done;
        void *userdata;
        command *prev, *next;
};

typedef struct command_list {
        command *head, *tail;
} command_list;

typedef struct ratelimit {
        uint64_t window_start_us;
        unsigned logged;
        uint64_t suppressed;
} ratelimit;

struct nd_pendev {
        nd_transport *transport;
        sd_event *event;
        nd_pendev_config config;
        nd_pendev_callbacks cb;
        void *userdata;

        nd_pendev_state state;
        unsigned dispatching;
        bool freed;

        nd_proto_identity identity;
        bool have_identity;
        nd_proto_status status;
        bool have_status;
        nd_proto_cartridge cartridge;
        bool have_cartridge;
        unsigned telemetry_rate_hz;
        /* What the pen samples at now (nd_pendev_set_sampling_rate); 0: telemetry_rate_hz. The
         * stall check allows for the slower of it and a change on its way. */
        unsigned sampling_rate_hz;
        unsigned stall_rate_hz;
        char serial_field[sizeof "PEN_SERIAL=" + ND_PROTO_SERIAL_SIZE];

        command_list queue;      /* ordinary commands, the head in flight when submitted */
        command_list bypass;     /* motor stops and heartbeats in flight */

        sd_event_source *timer;  /* heartbeat and telemetry-stall check */
        bool heartbeat_in_flight;
        uint64_t heartbeat_failures_in_row;

        bool streaming;
        bool have_sequence;
        uint32_t next_sequence;
        bool jumped;                 /* the last packet jumped ahead ... */
        uint32_t before_jump;        /* ... from here ... */
        uint64_t jump_packet;        /* ... in this packet (stats.packets) */
        nd_proto_clock clock;
        uint64_t last_packet_us;
        bool stall_reported;

        ratelimit log_limits[_ND_PENDEV_ERROR_KIND_MAX];
        nd_pendev_stats stats;
};

static const char *const nd_pendev_error_kind_table[_ND_PENDEV_ERROR_KIND_MAX] = {
        [ND_PENDEV_ERROR_IDENTIFY] = "identify-failed",
        [ND_PENDEV_ERROR_VERSION] = "protocol-version",
        [ND_PENDEV_ERROR_SETUP] = "setup-failed",
        [ND_PENDEV_ERROR_TELEMETRY_CORRUPT] = "telemetry-corrupt",
        [ND_PENDEV_ERROR_TELEMETRY_GAP] = "telemetry-gap",
        [ND_PENDEV_ERROR_TELEMETRY_DUPLICATE] = "telemetry-duplicate",
        [ND_PENDEV_ERROR_TELEMETRY_RESYNC] = "telemetry-resync",
        [ND_PENDEV_ERROR_TELEMETRY_STALLED] = "telemetry-stalled",
        [ND_PENDEV_ERROR_HEARTBEAT] = "heartbeat-failed",
        [ND_PENDEV_ERROR_GONE] = "device-gone",
};

DEFINE_STRING_TABLE_TO_STRING(nd_pendev_error_kind, nd_pendev_error_kind)

static uint64_t monotonic_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

/* ---- logging and error reports ---- */

static const char *pendev_name(const nd_pendev *p) {
        return p->have_identity ? p->identity.serial : nd_transport_describe(p->transport);
}

static void pendev_logv(nd_pendev *p, int level, const char *fmt, va_list ap) _printf_(3, 0);
static void pendev_logv(nd_pendev *p, int level, const char *fmt, va_list ap) {
        char message[MESSAGE_MAX];
        const char *fields[] = { p->have_identity ? p->serial_field : NULL, NULL };

        vsnprintf(message, sizeof message, fmt, ap);
        nd_log_full(level, fields, "pen %s: %s", pendev_name(p), message);
}

static void pendev_log(nd_pendev *p, int level, const char *fmt, ...) _printf_(3, 4);
static void pendev_log(nd_pendev *p, int level, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        pendev_logv(p, level, fmt, ap);
        va_end(ap);
}

/* Logs (rate-limited for telemetry kinds) and hands one problem to the error callback.
 * Returns false when the callback freed the pendev. */
static bool pendev_report(nd_pendev *p, nd_pendev_error_kind kind, int error, bool fatal, uint64_t count,
                          const char *fmt, ...) _printf_(6, 7);
static bool pendev_report(nd_pendev *p, nd_pendev_error_kind kind, int error, bool fatal, uint64_t count,
                          const char *fmt, ...) {
        char message[MESSAGE_MAX];
        va_list ap;
        bool limited = kind == ND_PENDEV_ERROR_TELEMETRY_CORRUPT || kind == ND_PENDEV_ERROR_TELEMETRY_GAP ||
                       kind == ND_PENDEV_ERROR_TELEMETRY_DUPLICATE || kind == ND_PENDEV_ERROR_TELEMETRY_RESYNC ||
                       kind == ND_PENDEV_ERROR_HEARTBEAT;

        va_start(ap, fmt);
        vsnprintf(message, sizeof message, fmt, ap);
        va_end(ap);

        if (limited) {
                ratelimit *rl = &p->log_limits[kind];
                uint64_t now = monotonic_usec();
                if (now - rl->window_start_us >= LOG_WINDOW_USEC) {
                        if (rl->suppressed > 0)
                                pendev_log(p, LOG_WARNING, "%" PRIu64 " more %s problems not logged in the last %.1f s",
                                           rl->suppressed, nd_pendev_error_kind_table[kind],
                                           (double) (now - rl->window_start_us) / USEC_PER_SEC);
                        rl->window_start_us = now;
                        rl->logged = 0;
                        rl->suppressed = 0;
                }
                if (rl->logged < LOG_BURST_PER_WINDOW) {
                        rl->logged++;
                        pendev_log(p, LOG_WARNING, "%s: %s", nd_pendev_error_kind_table[kind], message);
                } else
                        rl->suppressed++;
        } else
                pendev_log(p, fatal ? LOG_ERR : LOG_WARNING, "%s: %s", nd_pendev_error_kind_table[kind], message);

        if (p->cb.error && !p->freed) {
                nd_pendev_error e = {
                        .kind = kind, .error = error, .fatal = fatal, .count = count, .message = message,
                };
                p->cb.error(p, &e, p->userdata);
        }
        return !p->freed;
}

/* ---- lifetime ---- */

static void command_list_append(command_list *l, command *c) {
        c->next = NULL;
        c->prev = l->tail;
        if (l->tail)
                l->tail->next = c;
        else
                l->head = c;
        l->tail = c;
}

static void command_list_remove(command_list *l, command *c) {
        if (c->prev)
                c->prev->next = c->next;
        else
                l->head = c->next;
        if (c->next)
                c->next->prev = c->prev;
        else
                l->tail = c->prev;
        c->prev = c->next = NULL;
}

static void command_list_free(command_list *l) {
        while (l->head) {
                command *c = l->head;
                command_list_remove(l, c);
                free(c);
        }
}

static void pendev_destroy(nd_pendev *p) {
        command_list_free(&p->queue);
        command_list_free(&p->bypass);
        sd_event_source_disable_unref(p->timer);
        sd_event_unref(p->event);
        free(p);
}

static void pendev_enter(nd_pendev *p) {
        p->dispatching++;
}

static void pendev_leave(nd_pendev *p) {
        if (--p->dispatching == 0 && p->freed)
                pendev_destroy(p);
}

nd_pendev *nd_pendev_free(nd_pendev *p) {
        if (!p || p->freed)
                return NULL;
        p->freed = true;
        /* first, so that no transport callback can reach us any more */
        nd_transport_free(TAKE_PTR(p->transport));
        p->timer = sd_event_source_disable_unref(p->timer);
        if (p->dispatching == 0)
                pendev_destroy(p);
        return NULL;
}

/* ---- commands ---- */

static void on_command_done(nd_transport *t, int status, const uint8_t *data, size_t len, void *userdata);

static int command_submit(nd_pendev *p, command *c) {
        int r = nd_transport_control(p->transport, &c->setup, c->data, c->timeout_ms, on_command_done, c);
        if (r >= 0)
                c->submitted = true;
        return r;
}

static command *command_new(nd_pendev *p, command_kind kind) {
        command *c = calloc(1, sizeof *c);
        if (!c)
                return NULL;
        c->pendev = p;
        c->kind = kind;
        c->timeout_ms = p->config.request_timeout_ms;
        return c;
}

/* Completes a command that never reached the pen (cancelled, or the link went away). */
static void command_complete_unsent(nd_pendev *p, command *c, int status) {
        if (c->done)
                c->done(p, status, c->userdata);
        else if (c->status_done)
                c->status_done(p, status, NULL, c->userdata);
        else if (c->cartridge_done)
                c->cartridge_done(p, status, NULL, c->userdata);
}

/* Sends the head of the queue when nothing is in flight. Runs from the loop only, as it may
 * complete cancelled commands. Returns false when a callback freed the pendev. */
static bool queue_pump(nd_pendev *p) {
        while (p->queue.head && !p->queue.head->submitted) {
                command *c = p->queue.head;
                int r = c->cancelled ? -ECANCELED : command_submit(p, c);
                if (r >= 0)
                        return true;
                command_list_remove(&p->queue, c);
                if (r != -ECANCELED)
                        pendev_log(p, LOG_WARNING, "cannot send %s: %s", command_names[c->kind], strerror(-r));
                p->stats.commands_failed++;
                command_complete_unsent(p, c, r);
                free(c);
                if (p->freed)
                        return false;
        }
        return true;
}

/* Queues an ordinary command; sent at once when the queue is idle. Called from the API, so it
 * never runs a callback: a failure to send is returned. */
static int queue_command(nd_pendev *p, command *c) {
        bool idle = !p->queue.head;
        if (idle) {
                int r = command_submit(p, c);
                if (r < 0) {
                        free(c);
                        return r;
                }
        }
        command_list_append(&p->queue, c);
        return 0;
}

static int check_state(const nd_pendev *p) {
        switch (p->state) {
        case ND_PENDEV_READY: return 0;
        case ND_PENDEV_OPENING: return -EAGAIN;
        case ND_PENDEV_REFUSED: return -ENOTCONN;
        case ND_PENDEV_GONE:
        default: return -ENODEV;
        }
}

/* The common start of every public request: a pen that may take it, and a new command for it
 * (the caller sets its callback and request, then queues it or frees it). */
static int command_begin(nd_pendev *p, command_kind kind, void *userdata, command **ret) {
        if (!p)
                return -EINVAL;
        int r = check_state(p);
        if (r < 0)
                return r;
        command *c = command_new(p, kind);
        if (!c)
                return -ENOMEM;
        c->userdata = userdata;
        *ret = c;
        return 0;
}

/* ---- opening ---- */

static bool pendev_refuse(nd_pendev *p, nd_pendev_error_kind kind, int error, const char *fmt, ...) _printf_(4, 5);
static bool pendev_refuse(nd_pendev *p, nd_pendev_error_kind kind, int error, const char *fmt, ...) {
        char message[MESSAGE_MAX];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(message, sizeof message, fmt, ap);
        va_end(ap);
        p->state = ND_PENDEV_REFUSED;
        if (p->streaming) {
                nd_transport_stop_stream(p->transport);
                p->streaming = false;
        }
        p->timer = sd_event_source_disable_unref(p->timer);
        return pendev_report(p, kind, error, true, 1, "pen refused: %s", message);
}

/* Sends one request of the opening sequence; attempt and timeout_ms as open_ask_again() sets
 * them, 0 and 0 the first time (the request timeout). */
static int open_step_attempt(nd_pendev *p, command_kind kind, unsigned attempt, uint32_t timeout_ms) {
        command *c = command_new(p, kind);
        int r;

        if (!c)
                return -ENOMEM;
        c->attempt = attempt;
        if (timeout_ms > 0)
                c->timeout_ms = timeout_ms;
        switch (kind) {
        case CMD_IDENTIFY:
                nd_proto_request_identify(&c->setup, ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR);
                break;
        case CMD_OPEN_CARTRIDGE:
                nd_proto_request_get_cartridge(&c->setup);
                break;
        case CMD_OPEN_STATUS:
                nd_proto_request_get_status(&c->setup);
                break;
        case CMD_SET_WATCHDOG:
                r = nd_proto_request_set_watchdog(&c->setup, p->config.heartbeat_timeout_ms);
                if (r < 0) {
                        free(c);
                        return r;
                }
                break;
        case CMD_SET_TELEMETRY:
                r = nd_proto_request_set_telemetry(&c->setup, c->data, p->telemetry_rate_hz, true);
                if (r < 0) {
                        free(c);
                        return r;
                }
                break;
        default:
                free(c);
                return -EINVAL;
        }
        return queue_command(p, c);
}

static int open_step(nd_pendev *p, command_kind kind) {
        return open_step_attempt(p, kind, 0, 0);
}

static bool open_continue(nd_pendev *p, command_kind next) {
        int r = open_step(p, next);
        if (r < 0)
                return pendev_refuse(p, ND_PENDEV_ERROR_SETUP, r, "cannot send %s: %s", command_names[next],
                                     strerror(-r));
        return true;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata);

static int heartbeat_timer_start(nd_pendev *p) {
        uint64_t interval = (uint64_t) p->config.heartbeat_interval_ms * USEC_PER_MSEC;
        int r = sd_event_add_time_relative(p->event, &p->timer, CLOCK_MONOTONIC, interval, TIMER_ACCURACY_USEC,
                                           on_timer, p);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(p->timer, SD_EVENT_ON);
        (void) sd_event_source_set_description(p->timer, "pen-heartbeat");
        return 0;
}

/* A request of the opening sequence that timed out is sent again, with twice the time to answer.
 * Each only reads or sets a value (docs/protocol.md §2), so asking twice does no harm, and a pen
 * that has just enumerated, or an emulated one on a busy host, may answer its first requests late
 * (the booted-system test saw IDENTIFY time out after a replug). Returns false when the pendev
 * was freed. */
static bool open_ask_again(nd_pendev *p, const command *c) {
        unsigned attempt = c->attempt + 1;
        uint32_t timeout_ms = c->timeout_ms > UINT32_MAX / 2 ? UINT32_MAX : c->timeout_ms * 2;

        assert(attempt < ND_PENDEV_OPEN_ATTEMPTS);
        pendev_log(p, LOG_NOTICE, "%s: no answer within %" PRIu32 " ms, asking again (attempt %u of %u, "
                   "waiting up to %" PRIu32 " ms)", command_names[c->kind], c->timeout_ms, attempt + 1,
                   ND_PENDEV_OPEN_ATTEMPTS, timeout_ms);
        int r = open_step_attempt(p, c->kind, attempt, timeout_ms);
        if (r < 0)
                return pendev_refuse(p, c->kind == CMD_IDENTIFY ? ND_PENDEV_ERROR_IDENTIFY : ND_PENDEV_ERROR_SETUP,
                                     r, "cannot send %s again: %s", command_names[c->kind], strerror(-r));
        return true;
}

/* Handles a reply during opening. Returns false when the pendev was freed. */
static bool open_handle_reply(nd_pendev *p, command *c, int status, const uint8_t *data, size_t len) {
        nd_proto_error err = { 0 };
        char tries[64] = "";
        int r;

        if (status == -ENODEV)
                return true; /* on_gone follows and says so, once */
        if (status == -ETIMEDOUT && c->attempt + 1 < ND_PENDEV_OPEN_ATTEMPTS)
                return open_ask_again(p, c);
        if (status < 0) {
                if (c->attempt > 0)
                        snprintf(tries, sizeof tries, " (asked %u times, the last with %" PRIu32 " ms to answer)",
                                 c->attempt + 1, c->timeout_ms);
                if (c->kind == CMD_IDENTIFY)
                        return pendev_refuse(p, ND_PENDEV_ERROR_IDENTIFY, status, "IDENTIFY failed: %s%s",
                                             strerror(-status), tries);
                return pendev_refuse(p, ND_PENDEV_ERROR_SETUP, status, "%s failed: %s%s", command_names[c->kind],
                                     strerror(-status), tries);
        }

        switch (c->kind) {
        case CMD_IDENTIFY:
                r = nd_proto_decode_identity(data, len, ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR,
                                             &p->identity, &err);
                if (r == -EPROTONOSUPPORT)
                        return pendev_refuse(p, ND_PENDEV_ERROR_VERSION, r,
                                             "speaks a protocol this host does not (host %u.%u): %s",
                                             ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR, err.message);
                if (r < 0)
                        return pendev_refuse(p, ND_PENDEV_ERROR_IDENTIFY, r, "malformed IDENTIFY reply (%zu bytes): %s",
                                             len, err.message);
                p->have_identity = true;
                snprintf(p->serial_field, sizeof p->serial_field, "PEN_SERIAL=%s", p->identity.serial);
                p->telemetry_rate_hz = p->config.telemetry_rate_hz;
                if (p->telemetry_rate_hz == 0 || p->telemetry_rate_hz > p->identity.max_telemetry_rate_hz) {
                        if (p->telemetry_rate_hz != 0)
                                pendev_log(p, LOG_NOTICE, "telemetry rate %u Hz asked, the pen does at most %u Hz",
                                           p->telemetry_rate_hz, p->identity.max_telemetry_rate_hz);
                        p->telemetry_rate_hz = p->identity.max_telemetry_rate_hz;
                }
                pendev_log(p, LOG_INFO, "identified: model %s, firmware %s, protocol %u.%u, on %s",
                           p->identity.model, p->identity.firmware_version, p->identity.protocol_major,
                           p->identity.protocol_minor, nd_transport_describe(p->transport));
                return open_continue(p, CMD_OPEN_CARTRIDGE);

        case CMD_OPEN_CARTRIDGE:
                r = nd_proto_decode_cartridge(data, len, &p->cartridge, &err);
                if (r < 0)
                        return pendev_refuse(p, ND_PENDEV_ERROR_SETUP, r, "malformed GET_CARTRIDGE reply: %s",
                                             err.message);
                p->have_cartridge = true;
                return open_continue(p, CMD_OPEN_STATUS);

        case CMD_OPEN_STATUS:
                r = nd_proto_decode_status(data, len, &p->status, &err);
                if (r < 0)
                        return pendev_refuse(p, ND_PENDEV_ERROR_SETUP, r, "malformed GET_STATUS reply: %s",
                                             err.message);
                p->have_status = true;
                return open_continue(p, CMD_SET_WATCHDOG);

        case CMD_SET_WATCHDOG:
                /* the watchdog now runs on the pen: heartbeat from here on */
                r = heartbeat_timer_start(p);
                if (r < 0)
                        return pendev_refuse(p, ND_PENDEV_ERROR_SETUP, r, "cannot start the heartbeat timer: %s",
                                             strerror(-r));
                /* the stream first, so that no packet is sent before we listen */
                r = nd_transport_start_stream(p->transport);
                if (r < 0)
                        return pendev_refuse(p, ND_PENDEV_ERROR_SETUP, r, "cannot start the telemetry stream: %s",
                                             strerror(-r));
                p->streaming = true;
                return open_continue(p, CMD_SET_TELEMETRY);

        case CMD_SET_TELEMETRY:
                p->state = ND_PENDEV_READY;
                p->last_packet_us = monotonic_usec();
                pendev_log(p, LOG_INFO, "ready: telemetry at %u Hz, heartbeat every %u ms (watchdog %u ms)",
                           p->telemetry_rate_hz, p->config.heartbeat_interval_ms, p->config.heartbeat_timeout_ms);
                if (p->cb.ready)
                        p->cb.ready(p, p->userdata);
                return !p->freed;

        default:
                return true;
        }
}

/* ---- command completion ---- */

static bool handle_heartbeat_reply(nd_pendev *p, int status) {
        p->heartbeat_in_flight = false;
        if (status >= 0) {
                if (p->heartbeat_failures_in_row > 0)
                        pendev_log(p, LOG_NOTICE, "heartbeat acknowledged again after %" PRIu64 " failures",
                                   p->heartbeat_failures_in_row);
                p->heartbeat_failures_in_row = 0;
                return true;
        }
        if (status == -ENODEV)
                return true; /* reported once as gone */
        p->stats.heartbeats_failed++;
        p->heartbeat_failures_in_row++;
        return pendev_report(p, ND_PENDEV_ERROR_HEARTBEAT, status, false, p->heartbeat_failures_in_row,
                             "heartbeat not acknowledged: %s (%" PRIu64 " in a row)", strerror(-status),
                             p->heartbeat_failures_in_row);
}

static bool handle_command_reply(nd_pendev *p, command *c, int status, const uint8_t *data, size_t len) {
        nd_proto_error err = { 0 };

        if (status >= 0)
                status = 0;
        switch (c->kind) {
        case CMD_QUERY_STATUS: {
                nd_proto_status st;
                if (status == 0 && nd_proto_decode_status(data, len, &st, &err) < 0) {
                        pendev_log(p, LOG_WARNING, "malformed GET_STATUS reply: %s", err.message);
                        status = -EBADMSG;
                }
                if (status == 0) {
                        p->status = st;
                        p->have_status = true;
                }
                if (status < 0)
                        p->stats.commands_failed++;
                else
                        p->stats.commands_ok++;
                if (c->status_done)
                        c->status_done(p, status, status == 0 ? &st : NULL, c->userdata);
                break;
        }
        case CMD_QUERY_CARTRIDGE: {
                nd_proto_cartridge cart;
                if (status == 0 && nd_proto_decode_cartridge(data, len, &cart, &err) < 0) {
                        pendev_log(p, LOG_WARNING, "malformed GET_CARTRIDGE reply: %s", err.message);
                        status = -EBADMSG;
                }
                if (status == 0) {
                        p->cartridge = cart;
                        p->have_cartridge = true;
                }
                if (status < 0)
                        p->stats.commands_failed++;
                else
                        p->stats.commands_ok++;
                if (c->cartridge_done)
                        c->cartridge_done(p, status, status == 0 ? &cart : NULL, c->userdata);
                break;
        }
        case CMD_CHANGE_TELEMETRY:
                if (status >= 0) {
                        p->sampling_rate_hz = c->rate_hz;
                        p->stall_rate_hz = c->rate_hz;
                        p->last_packet_us = monotonic_usec();
                }
                if (status < 0) {
                        p->stats.commands_failed++;
                        if (status != -ENODEV)
                                pendev_log(p, LOG_WARNING, "SET_TELEMETRY (%u Hz) failed: %s", c->rate_hz,
                                           strerror(-status));
                } else
                        p->stats.commands_ok++;
                if (c->done)
                        c->done(p, status, c->userdata);
                break;
        case CMD_CHANGE_WATCHDOG:
                if (status >= 0) {
                        /* The pen has the new timeout: heartbeat at the new pace, and count
                         * telemetry silence against it when it was the default. */
                        if (p->config.telemetry_stall_ms == p->config.heartbeat_timeout_ms)
                                p->config.telemetry_stall_ms = c->watchdog_ms;
                        p->config.heartbeat_timeout_ms = c->watchdog_ms;
                        p->config.heartbeat_interval_ms = c->watchdog_ms / ND_PENDEV_HEARTBEAT_DIVISOR_DEFAULT;
                        pendev_log(p, LOG_INFO, "watchdog now %u ms, heartbeat every %u ms", p->config.heartbeat_timeout_ms,
                                   p->config.heartbeat_interval_ms);
                }
                _fallthrough_;
        default:
                if (status < 0) {
                        p->stats.commands_failed++;
                        if (status != -ENODEV)
                                pendev_log(p, c->kind == CMD_MOTOR_STOP ? LOG_ERR : LOG_WARNING, "%s failed: %s",
                                           command_names[c->kind], strerror(-status));
                } else
                        p->stats.commands_ok++;
                if (c->done)
                        c->done(p, status, c->userdata);
                break;
        }
        return !p->freed;
}

static void on_command_done(nd_transport *t, int status, const uint8_t *data, size_t len, void *userdata) {
        command *c = userdata;
        nd_pendev *p = c->pendev;
        bool queued = c->kind != CMD_MOTOR_STOP && c->kind != CMD_HEARTBEAT;
        bool alive;

        pendev_enter(p);
        command_list_remove(queued ? &p->queue : &p->bypass, c);

        switch (c->kind) {
        case CMD_IDENTIFY: case CMD_OPEN_CARTRIDGE: case CMD_OPEN_STATUS:
        case CMD_SET_WATCHDOG: case CMD_SET_TELEMETRY:
                alive = p->state == ND_PENDEV_OPENING ? open_handle_reply(p, c, status, data, len) : true;
                break;
        case CMD_HEARTBEAT:
                alive = handle_heartbeat_reply(p, status);
                break;
        default:
                alive = handle_command_reply(p, c, status, data, len);
                break;
        }
        free(c);
        if (alive && queued)
                (void) queue_pump(p);
        pendev_leave(p);
}

/* ---- heartbeat and stall check ---- */

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_pendev *p = userdata;

        pendev_enter(p);
        (void) sd_event_source_set_time_relative(s, (uint64_t) p->config.heartbeat_interval_ms * USEC_PER_MSEC);

        if (p->heartbeat_in_flight)
                p->stats.heartbeats_skipped++;
        else {
                command *c = command_new(p, CMD_HEARTBEAT);
                int r = -ENOMEM;
                if (c) {
                        nd_proto_request_heartbeat(&c->setup);
                        /* The pen has until its watchdog to acknowledge a heartbeat: the silence the
                         * limits allow the link (pen.heartbeat_timeout_ms), not the request timeout of
                         * the other commands. A later answer is a heartbeat lost. */
                        c->timeout_ms = p->config.heartbeat_timeout_ms;
                        r = command_submit(p, c);
                }
                if (r >= 0) {
                        command_list_append(&p->bypass, c);
                        p->heartbeat_in_flight = true;
                        p->stats.heartbeats_sent++;
                } else {
                        free(c);
                        if (r != -ENODEV)
                                (void) handle_heartbeat_reply(p, r);
                }
        }

        if (!p->freed && p->state == ND_PENDEV_READY && !p->stall_reported && p->config.telemetry_stall_ms > 0) {
                uint64_t now = monotonic_usec();
                uint64_t silent_us = now - p->last_packet_us;
                uint64_t stall_us = (uint64_t) p->config.telemetry_stall_ms * USEC_PER_MSEC;
                /* A pen re-rated down sends a sample per period: silence is a stall only after
                 * several periods at the slower rate. */
                if (p->stall_rate_hz > 0)
                        stall_us = MAX(stall_us, ND_PENDEV_STALL_PERIODS * USEC_PER_SEC / p->stall_rate_hz);
                if (silent_us >= stall_us) {
                        p->stall_reported = true;
                        p->stats.stalls++;
                        (void) pendev_report(p, ND_PENDEV_ERROR_TELEMETRY_STALLED, -ETIMEDOUT, false, 1,
                                             "no telemetry for %" PRIu64 " ms", silent_us / USEC_PER_MSEC);
                }
        }
        pendev_leave(p);
        return 0;
}

/* ---- telemetry ---- */

static bool deliver(nd_pendev *p, nd_pendev_sample *batch, size_t *n) {
        if (*n == 0)
                return true;
        p->stats.samples += *n;
        if (p->cb.samples)
                p->cb.samples(p, batch, *n, p->userdata);
        *n = 0;
        return !p->freed;
}

static void on_packet(nd_transport *t, const uint8_t *data, size_t len, void *userdata) {
        nd_pendev *p = userdata;
        nd_proto_packet pkt;
        nd_proto_error err = { 0 };
        nd_pendev_sample batch[ND_PROTO_SAMPLES_PER_PACKET_MAX];
        size_t n = 0;
        int r;

        if (!p->streaming)
                return;
        pendev_enter(p);
        p->last_packet_us = monotonic_usec();
        if (p->stall_reported) {
                p->stall_reported = false;
                pendev_log(p, LOG_NOTICE, "telemetry resumed");
        }

        r = nd_proto_decode_packet(data, len, &pkt, &err);
        if (r < 0) {
                p->stats.corrupt_packets++;
                (void) pendev_report(p, ND_PENDEV_ERROR_TELEMETRY_CORRUPT, r, false, 1,
                                     "packet of %zu bytes dropped: %s", len, err.message);
                goto out;
        }
        p->stats.packets++;

        for (unsigned i = 0; i < pkt.n_samples; i++) {
                const nd_proto_sample *s = &pkt.samples[i];
                uint32_t ahead = s->sequence - p->next_sequence;

                if (p->have_sequence && ahead != 0) {
                        if (!deliver(p, batch, &n))
                                goto out;
                        uint32_t behind = p->next_sequence - s->sequence;
                        if (ahead < SEQUENCE_HALF_RANGE) {
                                p->stats.gaps++;
                                p->stats.missing_samples += ahead;
                                p->jumped = true;
                                p->before_jump = p->next_sequence;
                                p->jump_packet = p->stats.packets;
                                if (!pendev_report(p, ND_PENDEV_ERROR_TELEMETRY_GAP, -EBADMSG, false, ahead,
                                                   "%" PRIu32 " samples missing: expected sequence %" PRIu32 ", got %" PRIu32,
                                                   ahead, p->next_sequence, s->sequence))
                                        goto out;
                        } else if (behind > ND_PENDEV_DUPLICATE_WINDOW || (p->jumped && s->sequence == p->before_jump)) {
                                /* a pen that restarted its count, or a stream resuming where it was
                                 * before a bogus jump: follow it rather than drop it for ever */
                                p->stats.resyncs++;
                                p->jumped = false;
                                p->clock = (nd_proto_clock) { 0 }; /* its timestamps went back too */
                                if (!pendev_report(p, ND_PENDEV_ERROR_TELEMETRY_RESYNC, -EBADMSG, false, 1,
                                                   "sequence went back from %" PRIu32 " to %" PRIu32 ", following it",
                                                   p->next_sequence, s->sequence))
                                        goto out;
                        } else {
                                p->stats.duplicates++;
                                if (!pendev_report(p, ND_PENDEV_ERROR_TELEMETRY_DUPLICATE, -EBADMSG, false, 1,
                                                   "sample %" PRIu32 " dropped: repeated or out of order, expected %" PRIu32,
                                                   s->sequence, p->next_sequence))
                                        goto out;
                                continue;
                        }
                } else if (p->jumped && p->stats.packets != p->jump_packet)
                        p->jumped = false; /* a later packet went on from the jump: it was real */
                p->have_sequence = true;
                p->next_sequence = s->sequence + 1;
                batch[n++] = (nd_pendev_sample) {
                        .device_time_us = nd_proto_clock_extend(&p->clock, s->timestamp_us),
                        .s = *s,
                };
        }
        (void) deliver(p, batch, &n);
out:
        pendev_leave(p);
}

static void on_gone(nd_transport *t, int status, void *userdata) {
        nd_pendev *p = userdata;

        pendev_enter(p);
        p->state = ND_PENDEV_GONE;
        p->streaming = false;
        p->timer = sd_event_source_disable_unref(p->timer);
        if (!pendev_report(p, ND_PENDEV_ERROR_GONE, status, true, 1, "link gone: %s", strerror(-status)))
                goto out;
        /* commands not yet sent never will be; those in flight complete through the transport */
        for (command *c = p->queue.head, *next; c; c = next) {
                next = c->next;
                if (c->submitted)
                        continue;
                command_list_remove(&p->queue, c);
                p->stats.commands_failed++;
                command_complete_unsent(p, c, -ENODEV);
                free(c);
                if (p->freed)
                        goto out;
        }
out:
        pendev_leave(p);
}

/* ---- public API ---- */

void nd_pendev_config_init(nd_pendev_config *c) {
        *c = (nd_pendev_config) { 0 };
}

int nd_pendev_new(nd_transport *transport, const nd_pendev_config *config,
                  const nd_pendev_callbacks *callbacks, void *userdata, nd_pendev **ret) {
        nd_pendev *p;
        int r;

        if (!transport || !ret) {
                nd_transport_free(transport);
                return -EINVAL;
        }
        p = calloc(1, sizeof *p);
        if (!p) {
                nd_transport_free(transport);
                return -ENOMEM;
        }
        p->transport = transport;
        p->event = sd_event_ref(transport->event);
        p->state = ND_PENDEV_OPENING;
        if (config)
                p->config = *config;
        if (callbacks)
                p->cb = *callbacks;
        p->userdata = userdata;

        if (p->config.heartbeat_timeout_ms == 0)
                p->config.heartbeat_timeout_ms = ND_PENDEV_HEARTBEAT_TIMEOUT_MS_DEFAULT;
        if (p->config.heartbeat_interval_ms == 0)
                p->config.heartbeat_interval_ms = p->config.heartbeat_timeout_ms / ND_PENDEV_HEARTBEAT_DIVISOR_DEFAULT;
        if (p->config.request_timeout_ms == 0)
                p->config.request_timeout_ms = ND_PENDEV_REQUEST_TIMEOUT_MS_DEFAULT;
        if (p->config.telemetry_stall_ms == 0)
                p->config.telemetry_stall_ms = p->config.heartbeat_timeout_ms;
        if (p->config.heartbeat_timeout_ms < ND_PROTO_WATCHDOG_MIN_MS ||
            p->config.heartbeat_timeout_ms > ND_PROTO_WATCHDOG_MAX_MS ||
            p->config.heartbeat_interval_ms == 0 ||
            p->config.heartbeat_interval_ms >= p->config.heartbeat_timeout_ms ||
            p->config.telemetry_rate_hz > ND_PROTO_TELEMETRY_RATE_MAX_HZ) {
                nd_log_error("%s: bad pen configuration: heartbeat timeout %u ms (%u..%u), interval %u ms, "
                             "telemetry %u Hz (at most %u)",
                             nd_transport_describe(transport), p->config.heartbeat_timeout_ms,
                             ND_PROTO_WATCHDOG_MIN_MS, ND_PROTO_WATCHDOG_MAX_MS, p->config.heartbeat_interval_ms,
                             p->config.telemetry_rate_hz, ND_PROTO_TELEMETRY_RATE_MAX_HZ);
                nd_pendev_free(p);
                return -EINVAL;
        }

        nd_transport_set_callbacks(transport, on_packet, on_gone, p);
        r = open_step(p, CMD_IDENTIFY);
        if (r < 0) {
                r = nd_log_error_errno(r, "%s: cannot send IDENTIFY", nd_transport_describe(transport));
                nd_pendev_free(p);
                return r;
        }
        *ret = p;
        return 0;
}

nd_pendev_state nd_pendev_get_state(const nd_pendev *p) {
        return p->state;
}

const char *nd_pendev_get_serial(const nd_pendev *p) {
        return p->have_identity ? p->identity.serial : "";
}

const nd_proto_identity *nd_pendev_get_identity(const nd_pendev *p) {
        return p->have_identity ? &p->identity : NULL;
}

const nd_proto_status *nd_pendev_get_status(const nd_pendev *p) {
        return p->have_status ? &p->status : NULL;
}

const nd_proto_cartridge *nd_pendev_get_cartridge(const nd_pendev *p) {
        return p->have_cartridge ? &p->cartridge : NULL;
}

unsigned nd_pendev_get_telemetry_rate_hz(const nd_pendev *p) {
        return p->state == ND_PENDEV_OPENING ? 0 : p->telemetry_rate_hz;
}

void nd_pendev_get_stats(const nd_pendev *p, nd_pendev_stats *ret) {
        *ret = p->stats;
}

nd_transport *nd_pendev_get_transport(nd_pendev *p) {
        return p->transport;
}

static int simple_command(nd_pendev *p, command_kind kind, nd_pendev_done_fn done, void *userdata) {
        command *c;
        int r = command_begin(p, kind, userdata, &c);
        if (r < 0)
                return r;
        c->done = done;
        switch (kind) {
        case CMD_MOTOR_START: nd_proto_request_motor_start(&c->setup); break;
        case CMD_CLEAR_FAULTS: nd_proto_request_clear_faults(&c->setup); break;
        default: free(c); return -EINVAL;
        }
        return queue_command(p, c);
}

int nd_pendev_set_depth(nd_pendev *p, double depth_mm, nd_pendev_done_fn done, void *userdata) {
        command *c;
        int r = command_begin(p, CMD_SET_DEPTH, userdata, &c);
        if (r < 0)
                return r;
        c->done = done;
        r = nd_proto_check_depth(&p->identity, depth_mm);
        if (r >= 0)
                r = nd_proto_request_set_depth(&c->setup, depth_mm);
        if (r < 0) {
                free(c);
                return r;
        }
        return queue_command(p, c);
}

int nd_pendev_set_speed(nd_pendev *p, double speed_hz, nd_pendev_done_fn done, void *userdata) {
        command *c;
        int r = command_begin(p, CMD_SET_SPEED, userdata, &c);
        if (r < 0)
                return r;
        c->done = done;
        r = nd_proto_check_speed(&p->identity, speed_hz);
        if (r >= 0)
                r = nd_proto_request_set_speed(&c->setup, speed_hz);
        if (r < 0) {
                free(c);
                return r;
        }
        return queue_command(p, c);
}

int nd_pendev_set_heartbeat_timeout(nd_pendev *p, unsigned timeout_ms, nd_pendev_done_fn done, void *userdata) {
        command *c;
        int r = command_begin(p, CMD_CHANGE_WATCHDOG, userdata, &c);
        if (r < 0)
                return r;
        r = nd_proto_request_set_watchdog(&c->setup, timeout_ms);
        if (r < 0) {
                free(c);
                return r;
        }
        c->watchdog_ms = timeout_ms;
        c->done = done;
        /* A shorter timeout: heartbeat at its pace from now on, before the pen has it, so the
         * pen is never left longer than its new timeout without a heartbeat. */
        unsigned interval_ms = timeout_ms / ND_PENDEV_HEARTBEAT_DIVISOR_DEFAULT;
        if (interval_ms < p->config.heartbeat_interval_ms) {
                p->config.heartbeat_interval_ms = interval_ms;
                if (p->timer)
                        (void) sd_event_source_set_time_relative(p->timer, (uint64_t) interval_ms * USEC_PER_MSEC);
        }
        return queue_command(p, c);
}

int nd_pendev_set_sampling_rate(nd_pendev *p, unsigned rate_hz, nd_pendev_done_fn done, void *userdata) {
        command *c;
        int r = command_begin(p, CMD_CHANGE_TELEMETRY, userdata, &c);
        if (r < 0)
                return r;
        if (rate_hz == 0 || rate_hz > p->telemetry_rate_hz)
                rate_hz = p->telemetry_rate_hz;
        r = nd_proto_request_set_telemetry(&c->setup, c->data, rate_hz, true);
        if (r < 0) {
                free(c);
                return r;
        }
        c->rate_hz = rate_hz;
        c->done = done;
        unsigned now_hz = p->sampling_rate_hz ? p->sampling_rate_hz : p->telemetry_rate_hz;
        p->stall_rate_hz = MIN(now_hz, rate_hz);
        return queue_command(p, c);
}

unsigned nd_pendev_get_sampling_rate_hz(const nd_pendev *p) {
        if (p->state == ND_PENDEV_OPENING)
                return 0;
        return p->sampling_rate_hz ? p->sampling_rate_hz : p->telemetry_rate_hz;
}

int nd_pendev_motor_start(nd_pendev *p, nd_pendev_done_fn done, void *userdata) {
        return simple_command(p, CMD_MOTOR_START, done, userdata);
}

int nd_pendev_clear_faults(nd_pendev *p, nd_pendev_done_fn done, void *userdata) {
        return simple_command(p, CMD_CLEAR_FAULTS, done, userdata);
}

int nd_pendev_motor_stop(nd_pendev *p, nd_pendev_done_fn done, void *userdata) {
        command *c;
        int r;

        if (!p)
                return -EINVAL;
        if (p->state == ND_PENDEV_GONE)
                return -ENODEV;
        c = command_new(p, CMD_MOTOR_STOP);
        if (!c)
                return -ENOMEM;
        c->done = done;
        c->userdata = userdata;
        nd_proto_request_motor_stop(&c->setup);
        r = command_submit(p, c);
        if (r < 0) {
                pendev_log(p, LOG_ERR, "cannot send MOTOR_STOP: %s", strerror(-r));
                free(c);
                return r;
        }
        command_list_append(&p->bypass, c);
        /* a start still waiting in the queue must not run after this stop */
        for (command *q = p->queue.head; q; q = q->next)
                if (q->kind == CMD_MOTOR_START && !q->submitted)
                        q->cancelled = true;
        return 0;
}

int nd_pendev_query_status(nd_pendev *p, nd_pendev_status_fn done, void *userdata) {
        command *c;
        int r = command_begin(p, CMD_QUERY_STATUS, userdata, &c);
        if (r < 0)
                return r;
        c->status_done = done;
        nd_proto_request_get_status(&c->setup);
        return queue_command(p, c);
}

int nd_pendev_query_cartridge(nd_pendev *p, nd_pendev_cartridge_fn done, void *userdata) {
        command *c;
        int r = command_begin(p, CMD_QUERY_CARTRIDGE, userdata, &c);
        if (r < 0)
                return r;
        c->cartridge_done = done;
        nd_proto_request_get_cartridge(&c->setup);
        return queue_command(p, c);
}
