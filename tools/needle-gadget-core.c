/* needle-gadget-core.c: the pen behind needle-gadget, without FunctionFS (see needle-gadget-core.h). */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "needle-gadget-core.h"
#include "protocol.h"
#include "util.h"

#define UM_PER_MM  1000.0
#define CHZ_PER_HZ 100.0

/* Hostile packet bytes: an unknown packet type, and a non-zero reserved field. */
#define HOSTILE_MALFORMED_TYPE     0xA5u
#define HOSTILE_MALFORMED_RESERVED 0xA5u
#define PACKET_OFFSET_TYPE         0u
#define PACKET_OFFSET_RESERVED     2u
#define PACKET_OFFSET_SEQUENCE     4u
#define PACKET_OFFSET_COUNT        1u

#define COMMAND_ARGS_MAX 4u
#define NAMES_MAX 160u

typedef struct hostile_entry {
        ng_hostile kind;
        unsigned left;
} hostile_entry;

struct ng_gadget {
        nd_penmodel_config config;
        nd_penmodel *model;
        ng_log_fn log;
        void *userdata;

        /* what the motor log has reported so far */
        bool motor_on;
        uint8_t faults;

        hostile_entry hostile[NG_HOSTILE_QUEUE_MAX];
        unsigned hostile_head, hostile_len;
        uint64_t samples_lost_on_link; /* in packets the UDC refused or failed (ng_gadget_packet_lost) */
};

static const char *const stop_causes[_NG_STOP_MAX] = {
        [NG_STOP_HOST] = "host",
        [NG_STOP_WATCHDOG] = "watchdog",
        [NG_STOP_FAULT] = "fault",
        [NG_STOP_CARTRIDGE] = "cartridge",
        [NG_STOP_UNBIND] = "unbind",
        [NG_STOP_EXIT] = "exit",
};

const char *ng_stop_cause_to_string(ng_stop_cause c) {
        return (unsigned) c < ELEMENTSOF(stop_causes) ? stop_causes[c] : NULL;
}

static const char *const hostile_names[_NG_HOSTILE_MAX] = {
        [NG_HOSTILE_MALFORMED] = "malformed",
        [NG_HOSTILE_TRUNCATED] = "truncated",
        [NG_HOSTILE_OUT_OF_SEQUENCE] = "out-of-sequence",
        [NG_HOSTILE_BAD_CRC] = "bad-crc",
};

int ng_hostile_from_string(const char *s) {
        if (!s)
                return -EINVAL;
        for (size_t i = 0; i < ELEMENTSOF(hostile_names); i++)
                if (STREQ(s, hostile_names[i]))
                        return (int) i;
        return -EINVAL;
}

const char *ng_hostile_to_string(ng_hostile h) {
        return (unsigned) h < ELEMENTSOF(hostile_names) ? hostile_names[h] : NULL;
}

_printf_(3, 4) static void logf_at(ng_gadget *g, uint64_t mono_us, const char *fmt, ...) {
        char text[NG_REPLY_MAX];
        va_list ap;

        if (!g->log)
                return;
        va_start(ap, fmt);
        vsnprintf(text, sizeof text, fmt, ap);
        va_end(ap);
        g->log(mono_us, text, g->userdata);
}

/* "over-temperature,heartbeat-lost" for fault bits, "none" for 0. */
static const char *fault_names(uint8_t bits, char *buf, size_t size) {
        size_t off = 0;
        buf[0] = '\0';
        for (unsigned b = 0; b < 8; b++) {
                const char *n = nd_proto_fault_name((uint8_t) (bits & (1u << b)));
                if (n && off < size)
                        off += (size_t) snprintf(buf + off, size - off, "%s%s", off ? "," : "", n);
        }
        return off ? buf : "none";
}

static const char *injected_names(unsigned bits, char *buf, size_t size) {
        size_t off = 0;
        buf[0] = '\0';
        for (int f = 0; f < ND_PENMODEL_FAULT_CLEAR; f++)
                if ((bits & (1u << f)) && off < size)
                        off += (size_t) snprintf(buf + off, size - off, "%s%s", off ? "," : "",
                                                 nd_penmodel_fault_to_string((nd_penmodel_fault) f));
        return off ? buf : "none";
}

/* Compares the model with what the log has said and logs the difference at mono_us: a start, or a
 * stop with the cause hint (or, without one, the fault bits that appeared). */
static void observe(ng_gadget *g, uint64_t mono_us, int cause_hint) {
        nd_penmodel_state st;
        char names[NAMES_MAX];

        nd_penmodel_get_state(g->model, &st);
        uint8_t gained = (uint8_t) (st.faults & ~g->faults);
        if (g->motor_on && !st.motor_running) {
                ng_stop_cause cause = cause_hint >= 0                               ? (ng_stop_cause) cause_hint
                                      : (gained & ND_PROTO_FAULT_WATCHDOG_EXPIRED) ? NG_STOP_WATCHDOG
                                                                                    : NG_STOP_FAULT;
                if (cause == NG_STOP_WATCHDOG)
                        /* how long the pen had gone without a heartbeat: a reader checks the
                         * watchdog against its timeout without knowing when the host last spoke */
                        logf_at(g, mono_us, "motor-stop cause=%s heartbeat_age_us=%" PRIu64,
                                ng_stop_cause_to_string(cause),
                                mono_us >= st.last_heartbeat_us ? mono_us - st.last_heartbeat_us : 0);
                else
                        logf_at(g, mono_us, "motor-stop cause=%s", ng_stop_cause_to_string(cause));
        } else if (!g->motor_on && st.motor_running)
                logf_at(g, mono_us, "motor-start depth_mm=%.3f speed_hz=%.2f", st.set_depth_mm, st.set_speed_hz);
        if (gained)
                logf_at(g, mono_us, "event fault-latched faults=%s", fault_names(gained, names, sizeof names));
        g->motor_on = st.motor_running;
        g->faults = st.faults;
}

void ng_gadget_advance(ng_gadget *g, uint64_t now_us) {
        nd_penmodel_state st;

        nd_penmodel_get_state(g->model, &st);
        /* While the motor runs, step to every physics tick and to the watchdog deadline, so a stop
         * is logged at the moment the firmware made it, however late we look. */
        for (uint64_t t = st.now_us; st.motor_running && t < now_us;) {
                uint64_t next = MIN(t + ND_PENMODEL_TICK_US, now_us);
                if (st.watchdog_armed && st.watchdog_deadline_us > t && st.watchdog_deadline_us < next)
                        next = st.watchdog_deadline_us;
                nd_penmodel_advance(g->model, next);
                nd_penmodel_get_state(g->model, &st);
                t = next;
                if (!st.motor_running)
                        observe(g, t, -1);
        }
        nd_penmodel_advance(g->model, now_us);
        observe(g, now_us, -1);
}

uint64_t ng_gadget_next_wakeup_us(ng_gadget *g) {
        nd_penmodel_state st;
        nd_penmodel_get_state(g->model, &st);
        if (!st.motor_running)
                return UINT64_MAX;
        uint64_t t = st.now_us + NG_OBSERVE_INTERVAL_US;
        return st.watchdog_armed ? MIN(t, st.watchdog_deadline_us) : t;
}

int ng_gadget_new(const nd_penmodel_config *config, uint64_t now_us, ng_log_fn log, void *userdata,
                  ng_gadget **ret) {
        if (!config || !ret)
                return -EINVAL;
        ng_gadget *g = calloc(1, sizeof *g);
        if (!g)
                return -ENOMEM;
        int r = nd_penmodel_new(config, now_us, &g->model);
        if (r < 0) {
                free(g);
                return r;
        }
        g->config = *config;
        g->log = log;
        g->userdata = userdata;
        *ret = g;
        return 0;
}

void ng_gadget_free(ng_gadget *g) {
        if (!g)
                return;
        nd_penmodel_unref(g->model);
        free(g);
}

nd_penmodel *ng_gadget_model(ng_gadget *g) {
        return g->model;
}

/* ---- ep0 ---------------------------------------------------------------------------------------- */

static void log_refused(ng_gadget *g, uint64_t now_us, const nd_control_setup *s, const char *what) {
        logf_at(g, now_us, "event %s type=0x%02x request=0x%02x value=0x%04x index=%u length=%u", what,
                s->request_type, s->request, s->value, s->index, s->length);
}

/* The events of an accepted request (motor transitions are observe()'s). */
static void log_accepted(ng_gadget *g, uint64_t now_us, const nd_control_setup *s, const uint8_t *data, size_t len) {
        nd_proto_request req;
        nd_penmodel_state st;
        char names[NAMES_MAX];

        if (nd_proto_parse_request(s, data, len, &req, NULL) < 0)
                return;
        nd_penmodel_get_state(g->model, &st);
        switch (req.code) {
        case ND_PROTO_REQ_IDENTIFY:
                logf_at(g, now_us, "event identify host=%u.%u serial=%s", req.host_major, req.host_minor,
                        g->config.serial);
                break;
        case ND_PROTO_REQ_SET_DEPTH:
                logf_at(g, now_us, "event depth depth_mm=%.3f", st.set_depth_mm);
                break;
        case ND_PROTO_REQ_SET_SPEED:
                logf_at(g, now_us, "event speed speed_hz=%.2f", st.set_speed_hz);
                break;
        case ND_PROTO_REQ_SET_WATCHDOG:
                logf_at(g, now_us, "event watchdog timeout_ms=%u", st.watchdog_timeout_ms);
                break;
        case ND_PROTO_REQ_SET_TELEMETRY:
                logf_at(g, now_us, "event telemetry enabled=%d rate_hz=%u", st.telemetry_enabled,
                        st.telemetry_enabled ? st.telemetry_rate_hz : 0);
                break;
        case ND_PROTO_REQ_CLEAR_FAULTS:
                logf_at(g, now_us, "event clear-faults remaining=%s", fault_names(st.faults, names, sizeof names));
                break;
        default: /* status, cartridge, heartbeat: too frequent to log; motor: observe() */
                break;
        }
}

int ng_gadget_control(ng_gadget *g, uint64_t now_us, const nd_control_setup *setup, const uint8_t *data,
                      size_t data_len, uint8_t *reply, size_t reply_size) {
        uint8_t out[ND_PROTO_SET_TELEMETRY_SIZE];
        int r;

        if (!g || !setup)
                return -EINVAL;
        bool in = setup->request_type & ND_CONTROL_DIR_IN;
        if (in ? (!reply && reply_size > 0) : (data_len != setup->length || (data_len > 0 && !data)))
                return -EINVAL;

        ng_gadget_advance(g, now_us);
        if (in)
                r = nd_penmodel_control(g->model, now_us, setup, reply, reply_size);
        else if (data_len > sizeof out)
                r = -EPIPE; /* no request of the protocol carries that much */
        else {
                if (data_len > 0)
                        memcpy(out, data, data_len);
                r = nd_penmodel_control(g->model, now_us, setup, out, data_len);
        }
        if (r == -EPIPE)
                log_refused(g, now_us, setup, "refused");
        else if (r == -ETIMEDOUT)
                log_refused(g, now_us, setup, "unanswered");
        else if (r >= 0)
                log_accepted(g, now_us, setup, in ? NULL : data, in ? 0 : data_len);
        observe(g, now_us, NG_STOP_HOST); /* only MOTOR_STOP stops the motor here */
        return r;
}

int ng_gadget_data_stage(ng_gadget *g, uint64_t now_us, const nd_control_setup *setup) {
        nd_control_setup probe_setup;
        uint8_t probe[ND_PROTO_SET_TELEMETRY_SIZE];
        nd_proto_request req;
        nd_penmodel_state st;

        if (!g || !setup || (setup->request_type & ND_CONTROL_DIR_IN) || setup->length == 0)
                return -EINVAL;
        ng_gadget_advance(g, now_us);
        nd_penmodel_get_state(g->model, &st);
        if (st.injected & (1u << ND_PENMODEL_FAULT_UNRESPONSIVE)) {
                log_refused(g, now_us, setup, "unanswered");
                return -ETIMEDOUT;
        }
        /* Everything but the data: checked with the protocol's own parser on a valid data block. */
        if (nd_proto_request_set_telemetry(&probe_setup, probe, ND_PROTO_TELEMETRY_RATE_MIN_HZ, true) < 0 ||
            setup->length != sizeof probe || !st.identified ||
            nd_proto_parse_request(setup, probe, sizeof probe, &req, NULL) < 0) {
                log_refused(g, now_us, setup, "refused");
                return -EPIPE;
        }
        return 1;
}

/* ---- interrupt IN ---------------------------------------------------------------------------------- */

static void put_crc(uint8_t *buf, size_t len) {
        size_t body = len - ND_PROTO_PACKET_CRC_SIZE;
        uint32_t crc = nd_proto_crc32(buf, body);
        for (size_t i = 0; i < ND_PROTO_PACKET_CRC_SIZE; i++)
                buf[body + i] = (uint8_t) (crc >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static void put_le32(uint8_t *p, uint32_t v) {
        for (size_t i = 0; i < sizeof v; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

/* Makes a good packet of len bytes hostile; returns its new length. */
static int make_hostile(ng_hostile kind, uint8_t *buf, int len) {
        switch (kind) {
        case NG_HOSTILE_MALFORMED:
                buf[PACKET_OFFSET_TYPE] = HOSTILE_MALFORMED_TYPE;
                buf[PACKET_OFFSET_RESERVED] = HOSTILE_MALFORMED_RESERVED;
                put_crc(buf, (size_t) len);
                return len;
        case NG_HOSTILE_TRUNCATED:
                return len - (int) ND_PROTO_PACKET_CRC_SIZE - 1;
        case NG_HOSTILE_OUT_OF_SEQUENCE:
                put_le32(buf + PACKET_OFFSET_SEQUENCE, get_le32(buf + PACKET_OFFSET_SEQUENCE) - NG_OUT_OF_SEQUENCE_BACK);
                put_crc(buf, (size_t) len);
                return len;
        case NG_HOSTILE_BAD_CRC:
        default:
                buf[len - (int) ND_PROTO_PACKET_CRC_SIZE] ^= 0x01;
                return len;
        }
}

int ng_gadget_next_packet(ng_gadget *g, uint64_t now_us, uint8_t *buf, size_t size) {
        if (!g || !buf)
                return -EINVAL;
        if (size < ND_PROTO_PACKET_MAX_SIZE)
                return -ENOBUFS;
        ng_gadget_advance(g, now_us);
        int len = nd_penmodel_next_packet(g->model, now_us, buf, size);
        if (len <= 0 || g->hostile_len == 0)
                return len;

        hostile_entry *h = &g->hostile[g->hostile_head];
        uint32_t seq = get_le32(buf + PACKET_OFFSET_SEQUENCE);
        len = make_hostile(h->kind, buf, len);
        logf_at(g, now_us, "event hostile kind=%s sequence=%u length=%d", ng_hostile_to_string(h->kind), seq, len);
        if (--h->left == 0) {
                g->hostile_head = (g->hostile_head + 1) % NG_HOSTILE_QUEUE_MAX;
                g->hostile_len--;
        }
        return len;
}

uint64_t ng_gadget_next_packet_us(ng_gadget *g) {
        nd_penmodel_state st;
        uint64_t oldest = nd_penmodel_next_due_us(g->model);

        if (oldest == UINT64_MAX)
                return UINT64_MAX;
        nd_penmodel_get_state(g->model, &st);
        if (st.queued >= ND_PROTO_SAMPLES_PER_PACKET_MAX)
                return oldest; /* a full packet is waiting */
        return oldest + NG_TELEMETRY_BATCH_US;
}

/* ---- the hardware around the firmware ------------------------------------------------------------- */

/* A fresh firmware (power-on) in the same hardware: cartridge, charge and injections stay. */
static int restart_firmware(ng_gadget *g, uint64_t now_us) {
        nd_penmodel_state st;
        nd_penmodel *m = NULL;
        int r;

        nd_penmodel_get_state(g->model, &st);
        r = nd_penmodel_new(&g->config, now_us, &m);
        if (r < 0)
                return r;
        if (st.cartridge_present)
                r = nd_penmodel_insert_cartridge(m, now_us, st.cartridge_id, st.cartridge_needles);
        if (r >= 0)
                r = nd_penmodel_set_battery(m, now_us, (unsigned) MIN(ceil(st.battery_percent), 100.0));
        for (int f = 0; r >= 0 && f < ND_PENMODEL_FAULT_CLEAR; f++)
                if (st.injected & (1u << f))
                        r = nd_penmodel_inject_fault(m, now_us, (nd_penmodel_fault) f);
        if (r < 0) {
                nd_penmodel_unref(m);
                return r;
        }
        nd_penmodel_unref(g->model);
        g->model = m;
        g->motor_on = false;
        g->faults = 0;
        return 0;
}

void ng_gadget_stop_motor(ng_gadget *g, uint64_t now_us, ng_stop_cause cause) {
        nd_control_setup s;

        ng_gadget_advance(g, now_us);
        if (!g->motor_on)
                return;
        nd_proto_request_motor_stop(&s);
        if (nd_penmodel_control(g->model, now_us, &s, NULL, 0) < 0) {
                /* an unresponsive firmware still loses its host or its power: restart it */
                if (restart_firmware(g, now_us) < 0)
                        return; /* -ENOMEM only; the watchdog still stops the motor */
                logf_at(g, now_us, "motor-stop cause=%s", ng_stop_cause_to_string(cause));
                return;
        }
        observe(g, now_us, (int) cause);
}

int ng_gadget_usb_reset(ng_gadget *g, uint64_t now_us) {
        ng_gadget_stop_motor(g, now_us, NG_STOP_UNBIND);
        int r = restart_firmware(g, now_us);
        if (r < 0)
                return r;
        logf_at(g, now_us, "event usb-reset");
        return 0;
}

/* ---- control commands ---------------------------------------------------------------------------- */

int ng_parse_unsigned(const char *s, unsigned min, unsigned max, unsigned *ret) {
        char *end = NULL;
        if (!s || *s < '0' || *s > '9')
                return -EINVAL;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (*end != '\0')
                return -EINVAL;
        if (errno != 0 || v < min || v > max)
                return -ERANGE;
        *ret = (unsigned) v;
        return 0;
}

_printf_(3, 4) static int reply_ok(char *reply, size_t size, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(reply, size, fmt, ap);
        va_end(ap);
        return 0;
}

_printf_(4, 5) static int reply_error(char *reply, size_t size, int r, const char *fmt, ...) {
        char msg[NG_REPLY_MAX];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        snprintf(reply, size, "error %s", msg);
        return r;
}

void ng_gadget_packet_lost(ng_gadget *g, const uint8_t *packet, size_t len) {
        if (!g || !packet || len <= PACKET_OFFSET_COUNT)
                return;
        g->samples_lost_on_link += packet[PACKET_OFFSET_COUNT];
}

static int command_status(ng_gadget *g, char *reply, size_t size) {
        nd_penmodel_state st;
        char faults[NAMES_MAX], injected[NAMES_MAX];

        nd_penmodel_get_state(g->model, &st);
        return reply_ok(reply, size,
                        "ok motor=%s depth_mm=%.3f speed_hz=%.2f cartridge=%s needles=%u fault=%s injected=%s "
                        "identified=%s watchdog=%s telemetry_hz=%u battery=%.0f sequence=%u lost=%" PRIu64,
                        st.motor_running ? "on" : "off", st.set_depth_mm, st.set_speed_hz,
                        st.cartridge_present ? st.cartridge_id : "none", st.cartridge_needles,
                        fault_names(st.faults, faults, sizeof faults), injected_names(st.injected, injected, sizeof injected),
                        st.identified ? "yes" : "no", st.watchdog_armed ? "armed" : "disarmed",
                        st.telemetry_enabled ? st.telemetry_rate_hz : 0, ceil(st.battery_percent), st.next_sequence,
                        st.samples_dropped + g->samples_lost_on_link);
}

static int command_hostile(ng_gadget *g, uint64_t now_us, char **argv, unsigned argc, char *reply, size_t size) {
        unsigned count = 1;
        int kind;

        if (argc < 2 || argc > 3)
                return reply_error(reply, size, -EINVAL, "usage: hostile malformed|truncated|out-of-sequence|bad-crc [COUNT]");
        kind = ng_hostile_from_string(argv[1]);
        if (kind < 0)
                return reply_error(reply, size, -EINVAL, "unknown hostile kind '%s' (malformed, truncated, out-of-sequence, bad-crc)", argv[1]);
        if (argc == 3 && ng_parse_unsigned(argv[2], 1, NG_HOSTILE_COUNT_MAX, &count) < 0)
                return reply_error(reply, size, -ERANGE, "COUNT must be 1..%u, not '%s'", NG_HOSTILE_COUNT_MAX, argv[2]);
        if (g->hostile_len == NG_HOSTILE_QUEUE_MAX)
                return reply_error(reply, size, -ENOSPC, "%u hostile commands are waiting already", NG_HOSTILE_QUEUE_MAX);
        g->hostile[(g->hostile_head + g->hostile_len) % NG_HOSTILE_QUEUE_MAX] =
                (hostile_entry) { .kind = (ng_hostile) kind, .left = count };
        g->hostile_len++;
        logf_at(g, now_us, "event hostile-queued kind=%s count=%u", argv[1], count);
        return reply_ok(reply, size, "ok kind=%s count=%u", argv[1], count);
}

int ng_gadget_command(ng_gadget *g, uint64_t now_us, const char *line, char *reply, size_t size) {
        char buf[NG_COMMAND_LINE_MAX];
        char *argv[COMMAND_ARGS_MAX + 1], *save = NULL;
        unsigned argc = 0, n;
        int r;

        if (!g || !line || !reply || size == 0)
                return -EINVAL;
        if (strlen(line) >= sizeof buf)
                return reply_error(reply, size, -E2BIG, "command longer than %u bytes", NG_COMMAND_LINE_MAX - 1);
        memcpy(buf, line, strlen(line) + 1);
        for (char *t = strtok_r(buf, " \t\r", &save); t; t = strtok_r(NULL, " \t\r", &save)) {
                if (argc == ELEMENTSOF(argv))
                        return reply_error(reply, size, -E2BIG, "too many arguments");
                argv[argc++] = t;
        }
        if (argc == 0)
                return reply_error(reply, size, -EINVAL, "empty command");

        ng_gadget_advance(g, now_us);
        const char *cmd = argv[0];
        if (STREQ(cmd, "status")) {
                if (argc != 1)
                        return reply_error(reply, size, -EINVAL, "usage: status");
                return command_status(g, reply, size);
        }
        if (STREQ(cmd, "insert-cartridge")) {
                if (argc != 3)
                        return reply_error(reply, size, -EINVAL, "usage: insert-cartridge ID NEEDLES");
                if (ng_parse_unsigned(argv[2], 1, UINT8_MAX, &n) < 0)
                        return reply_error(reply, size, -ERANGE, "NEEDLES must be 1..%u, not '%s'", UINT8_MAX, argv[2]);
                r = nd_penmodel_insert_cartridge(g->model, now_us, argv[1], n);
                if (r == -EBUSY)
                        return reply_error(reply, size, r, "a cartridge is inserted already (eject-cartridge first)");
                if (r < 0)
                        return reply_error(reply, size, r, "bad cartridge id '%s' (1-%u printable characters, no spaces)",
                                           argv[1], ND_PROTO_CARTRIDGE_ID_SIZE);
                logf_at(g, now_us, "event cartridge inserted id=%s needles=%u", argv[1], n);
                return reply_ok(reply, size, "ok cartridge=%s needles=%u", argv[1], n);
        }
        if (STREQ(cmd, "eject-cartridge")) {
                if (argc != 1)
                        return reply_error(reply, size, -EINVAL, "usage: eject-cartridge");
                r = nd_penmodel_eject_cartridge(g->model, now_us);
                if (r < 0)
                        return reply_error(reply, size, r, "no cartridge inserted");
                observe(g, now_us, NG_STOP_CARTRIDGE);
                logf_at(g, now_us, "event cartridge ejected");
                return reply_ok(reply, size, "ok");
        }
        if (STREQ(cmd, "battery")) {
                if (argc != 2)
                        return reply_error(reply, size, -EINVAL, "usage: battery PERCENT");
                if (ng_parse_unsigned(argv[1], 0, ND_PROTO_BATTERY_MAX_PERCENT, &n) < 0)
                        return reply_error(reply, size, -ERANGE, "PERCENT must be 0..%u, not '%s'",
                                           ND_PROTO_BATTERY_MAX_PERCENT, argv[1]);
                r = nd_penmodel_set_battery(g->model, now_us, n);
                if (r < 0)
                        return reply_error(reply, size, r, "cannot set the battery: %s", strerror(-r));
                logf_at(g, now_us, "event battery percent=%u", n);
                return reply_ok(reply, size, "ok battery=%u", n);
        }
        if (STREQ(cmd, "fault")) {
                if (argc != 2)
                        return reply_error(reply, size, -EINVAL, "usage: fault NAME");
                int f = nd_penmodel_fault_from_string(argv[1]);
                if (f < 0)
                        return reply_error(reply, size, -EINVAL,
                                           "unknown fault '%s' (over-temperature, motor-stall, over-current, depth-deviation, "
                                           "unresponsive, corrupt-telemetry, refuse-start, clear)", argv[1]);
                r = nd_penmodel_inject_fault(g->model, now_us, (nd_penmodel_fault) f);
                if (r < 0)
                        return reply_error(reply, size, r, "cannot inject '%s': %s", argv[1], strerror(-r));
                logf_at(g, now_us, "event fault injected=%s", argv[1]);
                return reply_ok(reply, size, "ok fault=%s", argv[1]);
        }
        if (STREQ(cmd, "hostile"))
                return command_hostile(g, now_us, argv, argc, reply, size);
        return reply_error(reply, size, -EINVAL,
                           "unknown command '%s' (status, insert-cartridge, eject-cartridge, battery, fault, hostile)", cmd);
}

/* ---- FunctionFS descriptors -------------------------------------------------------------------------- */

/* Values of the Linux FunctionFS ABI (linux/usb/functionfs.h) and USB 2.0/3.x chapter 9. */
#define FFS_DESCRIPTORS_MAGIC_V2 3u
#define FFS_STRINGS_MAGIC        2u
#define FFS_HAS_FS_DESC          1u
#define FFS_HAS_HS_DESC          2u
#define FFS_HAS_SS_DESC          4u
#define USB_DT_INTERFACE_         4u
#define USB_DT_ENDPOINT_          5u
#define USB_DT_SS_EP_COMP_        0x30u
#define USB_INTERFACE_DESC_SIZE   9u
#define USB_ENDPOINT_DESC_SIZE    7u
#define USB_SS_EP_COMP_DESC_SIZE  6u
#define USB_XFER_INTERRUPT        3u
#define USB_LANGID_EN_US          0x0409u
/* High and super speed: the interval is 2^(bInterval-1) microframes of 125 µs; 4 -> 1 ms, the
 * full-speed bInterval of 1 frame the protocol asks for. */
#define HS_INTERVAL_1MS 4u
#define INTERFACE_STRING_INDEX 1u

typedef struct writer {
        uint8_t *buf;
        size_t size, len;
} writer;

static void put8(writer *w, unsigned v) {
        if (w->len < w->size)
                w->buf[w->len] = (uint8_t) v;
        w->len++;
}

static void put16(writer *w, unsigned v) {
        put8(w, v & 0xffu);
        put8(w, (v >> 8) & 0xffu);
}

static void put32(writer *w, uint32_t v) {
        put16(w, v & 0xffffu);
        put16(w, v >> 16);
}

static void put_interface(writer *w) {
        put8(w, USB_INTERFACE_DESC_SIZE);
        put8(w, USB_DT_INTERFACE_);
        put8(w, ND_PROTO_INTERFACE_NUMBER);
        put8(w, 0); /* alternate setting */
        put8(w, 1); /* endpoints */
        put8(w, ND_PROTO_INTERFACE_CLASS);
        put8(w, ND_PROTO_INTERFACE_SUBCLASS);
        put8(w, ND_PROTO_INTERFACE_PROTOCOL);
        put8(w, INTERFACE_STRING_INDEX);
}

static void put_endpoint(writer *w, unsigned interval) {
        put8(w, USB_ENDPOINT_DESC_SIZE);
        put8(w, USB_DT_ENDPOINT_);
        put8(w, ND_PROTO_TELEMETRY_ENDPOINT);
        put8(w, USB_XFER_INTERRUPT);
        put16(w, ND_PROTO_TELEMETRY_MAX_PACKET);
        put8(w, interval);
}

int ng_descriptors(uint8_t *buf, size_t size) {
        writer w = { .buf = buf, .size = buf ? size : 0 };
        const unsigned fs_count = 2, hs_count = 2, ss_count = 3;

        put32(&w, FFS_DESCRIPTORS_MAGIC_V2);
        put32(&w, 0); /* length, filled in below */
        put32(&w, FFS_HAS_FS_DESC | FFS_HAS_HS_DESC | FFS_HAS_SS_DESC);
        put32(&w, fs_count);
        put32(&w, hs_count);
        put32(&w, ss_count);
        put_interface(&w);
        put_endpoint(&w, ND_PROTO_TELEMETRY_INTERVAL_MS);
        put_interface(&w);
        put_endpoint(&w, HS_INTERVAL_1MS);
        put_interface(&w);
        put_endpoint(&w, HS_INTERVAL_1MS);
        put8(&w, USB_SS_EP_COMP_DESC_SIZE);
        put8(&w, USB_DT_SS_EP_COMP_);
        put8(&w, 0); /* bMaxBurst */
        put8(&w, 0); /* bmAttributes */
        put16(&w, ND_PROTO_TELEMETRY_MAX_PACKET); /* wBytesPerInterval */
        if (w.len > w.size)
                return -ENOBUFS;
        writer head = { .buf = buf + sizeof(uint32_t), .size = sizeof(uint32_t) };
        put32(&head, (uint32_t) w.len);
        return (int) w.len;
}

int ng_strings(uint8_t *buf, size_t size) {
        writer w = { .buf = buf, .size = buf ? size : 0 };

        put32(&w, FFS_STRINGS_MAGIC);
        put32(&w, 0);
        put32(&w, 1); /* strings per language */
        put32(&w, 1); /* languages */
        put16(&w, USB_LANGID_EN_US);
        for (const char *c = NG_INTERFACE_NAME; *c; c++)
                put8(&w, (unsigned char) *c);
        put8(&w, 0);
        if (w.len > w.size)
                return -ENOBUFS;
        writer head = { .buf = buf + sizeof(uint32_t), .size = sizeof(uint32_t) };
        put32(&head, (uint32_t) w.len);
        return (int) w.len;
}
