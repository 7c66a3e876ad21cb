/* test-needle-gadget.c: the pen of needle-gadget without FunctionFS (tools/needle-gadget-core.c):
 * ep0 requests and their STALLs, the motor log's transitions and their times and causes, the
 * USB reset, hostile packets, the control commands and the FunctionFS descriptor blocks. */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "needle-gadget-core.h"
#include "protocol.h"
#include "util.h"

#define T0 (7 * USEC_PER_SEC)
#define MS(x) ((uint64_t) (x) * USEC_PER_MSEC)
#define LOG_MAX 256

/* ---- a motor log in memory ---------------------------------------------------------------------- */

typedef struct log_line {
        uint64_t mono_us;
        char text[NG_REPLY_MAX];
} log_line;

static log_line lines[LOG_MAX];
static unsigned n_lines;

static void on_log(uint64_t mono_us, const char *text, void *userdata) {
        ck_assert_uint_lt(n_lines, LOG_MAX);
        lines[n_lines].mono_us = mono_us;
        snprintf(lines[n_lines].text, sizeof lines[n_lines].text, "%s", text);
        n_lines++;
}

/* The index of the first line at or after from that starts with prefix, or -1. */
static int find_line(unsigned from, const char *prefix) {
        for (unsigned i = from; i < n_lines; i++)
                if (strncmp(lines[i].text, prefix, strlen(prefix)) == 0)
                        return (int) i;
        return -1;
}

static unsigned count_lines(const char *prefix) {
        unsigned n = 0;
        for (unsigned i = 0; i < n_lines; i++)
                n += strncmp(lines[i].text, prefix, strlen(prefix)) == 0;
        return n;
}

/* ---- helpers ---------------------------------------------------------------------------------------- */

static ng_gadget *new_gadget(void) {
        nd_penmodel_config c;
        ng_gadget *g = NULL;
        n_lines = 0;
        nd_penmodel_config_init(&c);
        snprintf(c.serial, sizeof c.serial, "%s", "GADGET-7");
        ck_assert_int_eq(ng_gadget_new(&c, T0, on_log, NULL, &g), 0);
        return g;
}

static int in_request(ng_gadget *g, uint64_t t, const nd_control_setup *s, uint8_t *reply, size_t size) {
        return ng_gadget_control(g, t, s, NULL, 0, reply, size);
}

static int out_request(ng_gadget *g, uint64_t t, void (*make)(nd_control_setup *)) {
        nd_control_setup s;
        make(&s);
        return ng_gadget_control(g, t, &s, NULL, 0, NULL, 0);
}

static void identify(ng_gadget *g, uint64_t t) {
        nd_control_setup s;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        nd_proto_identity id;
        nd_proto_request_identify(&s, ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR);
        ck_assert_int_eq(in_request(g, t, &s, buf, sizeof buf), ND_PROTO_IDENTITY_SIZE);
        ck_assert_int_eq(nd_proto_decode_identity(buf, sizeof buf, 1, 0, &id, NULL), 0);
        ck_assert_str_eq(id.serial, "GADGET-7");
}

static int status(ng_gadget *g, uint64_t t, nd_proto_status *st) {
        nd_control_setup s;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        nd_proto_request_get_status(&s);
        int r = in_request(g, t, &s, buf, sizeof buf);
        if (r < 0)
                return r;
        ck_assert_int_eq(r, ND_PROTO_STATUS_SIZE);
        ck_assert_int_eq(nd_proto_decode_status(buf, (size_t) r, st, NULL), 0);
        return 0;
}

static int set_watchdog(ng_gadget *g, uint64_t t, unsigned ms) {
        nd_control_setup s;
        ck_assert_int_eq(nd_proto_request_set_watchdog(&s, ms), 0);
        return ng_gadget_control(g, t, &s, NULL, 0, NULL, 0);
}

static int set_telemetry(ng_gadget *g, uint64_t t, unsigned rate_hz) {
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, rate_hz, true), 0);
        int r = ng_gadget_data_stage(g, t, &s);
        if (r < 0)
                return r;
        return ng_gadget_control(g, t, &s, data, sizeof data, NULL, 0);
}

static void command_ok(ng_gadget *g, uint64_t t, const char *line) {
        char reply[NG_REPLY_MAX];
        ck_assert_msg(ng_gadget_command(g, t, line, reply, sizeof reply) == 0, "%s -> %s", line, reply);
        ck_assert_msg(strncmp(reply, "ok", 2) == 0, "%s -> %s", line, reply);
}

/* Identified, a cartridge in, the motor running since t with a watchdog of wd_ms. */
static ng_gadget *running_gadget(uint64_t t, unsigned wd_ms) {
        ng_gadget *g = new_gadget();
        identify(g, t);
        command_ok(g, t, "insert-cartridge CART-1 12");
        ck_assert_int_eq(set_watchdog(g, t, wd_ms), 0);
        ck_assert_int_eq(out_request(g, t, nd_proto_request_motor_start), 0);
        return g;
}

/* ---- ep0 ----------------------------------------------------------------------------------------- */

START_TEST(test_before_identify) {
        ng_gadget *g = new_gadget();
        nd_proto_status st;

        ck_assert_int_eq(status(g, T0, &st), -EPIPE);
        ck_assert_int_ge(find_line(0, "event refused type=0xc1 request=0x02"), 0);
        ck_assert_int_eq(out_request(g, T0, nd_proto_request_heartbeat), -EPIPE);
        ck_assert_int_eq(out_request(g, T0, nd_proto_request_motor_stop), 0); /* never refused */
        identify(g, T0 + MS(1));
        ck_assert_int_ge(find_line(0, "event identify host=1.0 serial=GADGET-7"), 0);
        ck_assert_int_eq(status(g, T0 + MS(2), &st), 0);
        ck_assert(!st.motor_running);
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_refusals) {
        ng_gadget *g = new_gadget();
        nd_control_setup s;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];

        /* a 2.x host is refused */
        nd_proto_request_identify(&s, ND_PROTO_VERSION_MAJOR + 1, 0);
        ck_assert_int_eq(in_request(g, T0, &s, buf, sizeof buf), -EPIPE);
        identify(g, T0);
        /* IN with a too short wLength, a class request, another wIndex, an unknown request */
        nd_proto_request_get_status(&s);
        s.length = ND_PROTO_STATUS_SIZE - 1;
        ck_assert_int_eq(in_request(g, T0, &s, buf, sizeof buf), -EPIPE);
        nd_proto_request_get_status(&s);
        s.request_type = 0xA1;
        ck_assert_int_eq(in_request(g, T0, &s, buf, sizeof buf), -EPIPE);
        nd_proto_request_get_status(&s);
        s.index = 1;
        ck_assert_int_eq(in_request(g, T0, &s, buf, sizeof buf), -EPIPE);
        nd_proto_request_get_status(&s);
        s.request = 0x7F;
        ck_assert_int_eq(in_request(g, T0, &s, buf, sizeof buf), -EPIPE);
        /* MOTOR_START without a cartridge; SET_DEPTH off the grid */
        ck_assert_int_eq(out_request(g, T0, nd_proto_request_motor_start), -EPIPE);
        ck_assert_int_eq(nd_proto_request_set_depth(&s, 1.01), 0);
        ck_assert_int_eq(ng_gadget_control(g, T0, &s, NULL, 0, NULL, 0), -EPIPE);
        /* an OUT request with more data than any request carries */
        uint8_t big[ND_PROTO_SET_TELEMETRY_SIZE + 1] = { 0 };
        s = (nd_control_setup) { .request_type = ND_PROTO_REQTYPE_OUT, .request = ND_PROTO_REQ_SET_TELEMETRY,
                                 .length = sizeof big };
        ck_assert_int_eq(ng_gadget_control(g, T0, &s, big, sizeof big, NULL, 0), -EPIPE);
        /* caller bugs */
        ck_assert_int_eq(ng_gadget_control(g, T0, &s, big, 1, NULL, 0), -EINVAL);
        ck_assert_int_eq(ng_gadget_control(NULL, T0, &s, big, sizeof big, NULL, 0), -EINVAL);
        ck_assert_uint_eq(count_lines("motor-"), 0);
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_data_stage) {
        ng_gadget *g = new_gadget();
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];

        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 100, true), 0);
        ck_assert_int_eq(ng_gadget_data_stage(g, T0, &s), -EPIPE); /* not identified */
        identify(g, T0);
        ck_assert_int_eq(ng_gadget_data_stage(g, T0, &s), 1);
        s.length = ND_PROTO_SET_TELEMETRY_SIZE - 1;
        ck_assert_int_eq(ng_gadget_data_stage(g, T0, &s), -EPIPE);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 100, true), 0);
        s.value = 1;
        ck_assert_int_eq(ng_gadget_data_stage(g, T0, &s), -EPIPE);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 100, true), 0);
        s.request = ND_PROTO_REQ_SET_WATCHDOG; /* carries no data */
        ck_assert_int_eq(ng_gadget_data_stage(g, T0, &s), -EPIPE);
        /* the data itself is refused by the model, which then applies nothing */
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 100, true), 0);
        data[3] = 1; /* reserved */
        ck_assert_int_eq(ng_gadget_control(g, T0, &s, data, sizeof data, NULL, 0), -EPIPE);
        nd_penmodel_state st;
        nd_penmodel_get_state(ng_gadget_model(g), &st);
        ck_assert(!st.telemetry_enabled);
        /* unresponsive: no answer at all */
        command_ok(g, T0, "fault unresponsive");
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 100, true), 0);
        ck_assert_int_eq(ng_gadget_data_stage(g, T0, &s), -ETIMEDOUT);
        ck_assert_int_eq(out_request(g, T0, nd_proto_request_heartbeat), -ETIMEDOUT);
        ck_assert_int_ge(find_line(0, "event unanswered"), 0);
        ng_gadget_free(g);
}
END_TEST

/* ---- the motor log ------------------------------------------------------------------------------------ */

START_TEST(test_motor_host) {
        ng_gadget *g = running_gadget(T0, 500);
        int i = find_line(0, "motor-start ");
        ck_assert_int_ge(i, 0);
        ck_assert_str_eq(lines[i].text, "motor-start depth_mm=0.000 speed_hz=25.00");
        ck_assert_uint_eq(lines[i].mono_us, T0);

        nd_control_setup s;
        ck_assert_int_eq(nd_proto_request_set_depth(&s, 1.25), 0);
        ck_assert_int_eq(ng_gadget_control(g, T0 + MS(100), &s, NULL, 0, NULL, 0), 0);
        ck_assert_int_ge(find_line(0, "event depth depth_mm=1.250"), 0);
        ck_assert_int_eq(out_request(g, T0 + MS(200), nd_proto_request_heartbeat), 0);
        ck_assert_int_eq(out_request(g, T0 + MS(300), nd_proto_request_motor_stop), 0);
        i = find_line(0, "motor-stop");
        ck_assert_int_ge(i, 0);
        ck_assert_str_eq(lines[i].text, "motor-stop cause=host");
        ck_assert_uint_eq(lines[i].mono_us, T0 + MS(300));
        /* a second stop is no transition */
        ck_assert_int_eq(out_request(g, T0 + MS(400), nd_proto_request_motor_stop), 0);
        ck_assert_uint_eq(count_lines("motor-stop"), 1);
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_motor_watchdog) {
        /* the motor stops at last feed + timeout, logged with that time however late we look */
        const uint64_t feed = T0 + MS(100) + 37; /* not on the 1 ms physics grid */
        ng_gadget *g = running_gadget(T0, 300);

        ck_assert_int_eq(out_request(g, feed, nd_proto_request_heartbeat), 0);
        ck_assert_uint_eq(ng_gadget_next_wakeup_us(g), feed + NG_OBSERVE_INTERVAL_US);
        ng_gadget_advance(g, feed + MS(299));
        ck_assert_int_lt(find_line(0, "motor-stop"), 0);
        ng_gadget_advance(g, feed + 2 * USEC_PER_SEC);
        int i = find_line(0, "motor-stop");
        ck_assert_int_ge(i, 0);
        ck_assert_str_eq(lines[i].text, "motor-stop cause=watchdog heartbeat_age_us=300000");
        ck_assert_uint_eq(lines[i].mono_us, feed + MS(300));
        /* the stop first, then why */
        ck_assert_int_gt(find_line(0, "event fault-latched faults=heartbeat-lost"), i);
        ck_assert_uint_eq(ng_gadget_next_wakeup_us(g), UINT64_MAX);
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_motor_fault) {
        ng_gadget *g = running_gadget(T0, 1000);
        command_ok(g, T0 + MS(50), "fault over-current");
        ng_gadget_advance(g, T0 + MS(500));
        int i = find_line(0, "motor-stop");
        ck_assert_int_ge(i, 0);
        ck_assert_str_eq(lines[i].text, "motor-stop cause=fault");
        /* the pen latches after 20 ms of over-current: within a physics tick of that */
        ck_assert_uint_ge(lines[i].mono_us, T0 + MS(50) + MS(ND_PENMODEL_OVER_CURRENT_MS) - MS(1));
        ck_assert_uint_le(lines[i].mono_us, T0 + MS(50) + MS(ND_PENMODEL_OVER_CURRENT_MS) + MS(2));
        ck_assert_int_ge(find_line(0, "event fault-latched faults=over-current"), 0);
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_motor_cartridge) {
        ng_gadget *g = running_gadget(T0, 1000);
        command_ok(g, T0 + MS(10), "eject-cartridge");
        int i = find_line(0, "motor-stop");
        ck_assert_int_ge(i, 0);
        ck_assert_str_eq(lines[i].text, "motor-stop cause=cartridge");
        ck_assert_uint_eq(lines[i].mono_us, T0 + MS(10));
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_usb_reset) {
        ng_gadget *g = running_gadget(T0, 1000);
        nd_proto_status st;
        char reply[NG_REPLY_MAX];

        command_ok(g, T0, "battery 50");
        command_ok(g, T0, "fault corrupt-telemetry");
        ck_assert_int_eq(ng_gadget_usb_reset(g, T0 + MS(20)), 0);
        int i = find_line(0, "motor-stop");
        ck_assert_int_ge(i, 0);
        ck_assert_str_eq(lines[i].text, "motor-stop cause=unbind");
        ck_assert_int_gt(find_line((unsigned) i, "event usb-reset"), i);
        /* a restarted firmware: not identified; the hardware state stays */
        ck_assert_int_eq(status(g, T0 + MS(30), &st), -EPIPE);
        identify(g, T0 + MS(40));
        ck_assert_int_eq(status(g, T0 + MS(50), &st), 0);
        ck_assert(!st.motor_running);
        ck_assert(st.status & ND_PROTO_STATUS_CARTRIDGE_PRESENT);
        ck_assert_uint_eq(st.battery_percent, 50);
        ck_assert_int_eq(ng_gadget_command(g, T0 + MS(60), "status", reply, sizeof reply), 0);
        ck_assert_ptr_nonnull(strstr(reply, " injected=corrupt-telemetry "));
        /* a reset with the motor stopped logs no stop */
        ck_assert_int_eq(ng_gadget_usb_reset(g, T0 + MS(70)), 0);
        ck_assert_uint_eq(count_lines("motor-stop"), 1);
        ck_assert_uint_eq(count_lines("event usb-reset"), 2);
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_exit_unresponsive) {
        ng_gadget *g = running_gadget(T0, 5000);
        command_ok(g, T0 + MS(10), "fault unresponsive");
        ck_assert_int_eq(out_request(g, T0 + MS(20), nd_proto_request_motor_stop), -ETIMEDOUT);
        ck_assert_int_lt(find_line(0, "motor-stop"), 0);
        ng_gadget_stop_motor(g, T0 + MS(30), NG_STOP_EXIT);
        int i = find_line(0, "motor-stop");
        ck_assert_int_ge(i, 0);
        ck_assert_str_eq(lines[i].text, "motor-stop cause=exit");
        ck_assert_uint_eq(lines[i].mono_us, T0 + MS(30));
        nd_penmodel_state st;
        nd_penmodel_get_state(ng_gadget_model(g), &st);
        ck_assert(!st.motor_running);
        ng_gadget_free(g);
}
END_TEST

/* ---- interrupt IN ---------------------------------------------------------------------------------------- */

/* Drains the packets due by t; returns how many decoded, counts the refused ones by kind. */
static unsigned drain(ng_gadget *g, uint64_t t, unsigned refused[static ND_PROTO_ERR_INCONSISTENT + 1],
                      uint32_t *last_seq) {
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];
        nd_proto_packet p;
        nd_proto_error err;
        unsigned good = 0;
        int len;
        while ((len = ng_gadget_next_packet(g, t, buf, sizeof buf)) > 0) {
                if (nd_proto_decode_packet(buf, (size_t) len, &p, &err) < 0)
                        refused[err.kind]++;
                else {
                        good++;
                        *last_seq = p.samples[p.n_samples - 1].sequence;
                }
        }
        ck_assert_int_eq(len, 0);
        return good;
}

START_TEST(test_hostile) {
        ng_gadget *g = new_gadget();
        unsigned refused[ND_PROTO_ERR_INCONSISTENT + 1] = { 0 };
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];
        uint32_t seq = 0;
        nd_proto_packet p;

        identify(g, T0);
        ck_assert_int_eq(ng_gadget_next_packet(g, T0, buf, sizeof buf), 0); /* telemetry off */
        ck_assert_uint_eq(ng_gadget_next_packet_us(g), UINT64_MAX);
        ck_assert_int_eq(ng_gadget_next_packet(g, T0, buf, ND_PROTO_PACKET_MAX_SIZE - 1), -ENOBUFS);
        ck_assert_int_eq(set_telemetry(g, T0, 1000), 0);
        ck_assert_int_ge(find_line(0, "event telemetry enabled=1 rate_hz=1000"), 0);
        ck_assert_uint_gt(drain(g, T0 + MS(5), refused, &seq), 0);

        command_ok(g, T0 + MS(5), "hostile bad-crc 2");
        command_ok(g, T0 + MS(5), "hostile truncated");
        command_ok(g, T0 + MS(5), "hostile malformed");
        command_ok(g, T0 + MS(5), "hostile out-of-sequence");
        /* one packet per frame, as a host polling every 1 ms */
        int len[5];
        uint8_t pk[5][ND_PROTO_PACKET_MAX_SIZE];
        for (unsigned k = 0; k < 5; k++) {
                len[k] = ng_gadget_next_packet(g, T0 + MS(6 + k), pk[k], sizeof pk[k]);
                ck_assert_int_gt(len[k], 0);
        }
        nd_proto_error err;
        ck_assert_int_eq(nd_proto_decode_packet(pk[0], (size_t) len[0], &p, &err), -EBADMSG);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_CRC);
        ck_assert_int_eq(nd_proto_decode_packet(pk[1], (size_t) len[1], &p, &err), -EBADMSG);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_CRC);
        ck_assert_int_eq(nd_proto_decode_packet(pk[2], (size_t) len[2], &p, &err), -EBADMSG);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_LENGTH);
        ck_assert_int_eq(nd_proto_decode_packet(pk[3], (size_t) len[3], &p, &err), -EBADMSG);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_TYPE);
        /* out of sequence: valid, but its first sequence number lies behind the last one sent */
        ck_assert_int_eq(nd_proto_decode_packet(pk[4], (size_t) len[4], &p, NULL), 0);
        ck_assert_uint_eq(p.samples[0].sequence + NG_OUT_OF_SEQUENCE_BACK, seq + 5);
        ck_assert_uint_eq(count_lines("event hostile kind="), 5);
        /* then good packets again */
        ck_assert_uint_gt(drain(g, T0 + MS(20), refused, &seq), 0);
        for (size_t k = 0; k < ELEMENTSOF(refused); k++)
                ck_assert_uint_eq(refused[k], 0);
        ng_gadget_free(g);
}
END_TEST

START_TEST(test_batching) {
        ng_gadget *g = new_gadget();
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];
        nd_proto_packet p;
        nd_penmodel_state st;

        identify(g, T0);
        ck_assert_int_eq(set_telemetry(g, T0, 1000), 0);
        while (ng_gadget_next_packet(g, T0 + MS(10) + 500, buf, sizeof buf) > 0)
                ;
        /* nothing queued: wait for the next sample, then the batching time */
        uint64_t next_sample = nd_penmodel_next_due_us(ng_gadget_model(g));
        ck_assert_uint_gt(next_sample, T0 + MS(10) + 500);
        ck_assert_uint_eq(ng_gadget_next_packet_us(g), next_sample + NG_TELEMETRY_BATCH_US);
        /* two samples queued: still waiting for the oldest's batching time */
        ng_gadget_advance(g, next_sample + MS(1));
        nd_penmodel_get_state(ng_gadget_model(g), &st);
        ck_assert_uint_eq(st.queued, 2);
        ck_assert_uint_eq(ng_gadget_next_packet_us(g), next_sample + NG_TELEMETRY_BATCH_US);
        /* three: a full packet, due at once */
        ng_gadget_advance(g, next_sample + MS(2));
        ck_assert_uint_eq(ng_gadget_next_packet_us(g), next_sample);
        int len = ng_gadget_next_packet(g, next_sample + MS(2), buf, sizeof buf);
        ck_assert_int_eq(len, (int) ND_PROTO_PACKET_SIZE(3));
        ck_assert_int_eq(nd_proto_decode_packet(buf, (size_t) len, &p, NULL), 0);
        ck_assert_uint_eq(p.n_samples, 3);
        /* telemetry off: never */
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 0, false), 0);
        ck_assert_int_eq(ng_gadget_control(g, next_sample + MS(3), &s, data, sizeof data, NULL, 0), 0);
        ck_assert_uint_eq(ng_gadget_next_packet_us(g), UINT64_MAX);
        ng_gadget_free(g);
}
END_TEST

/* lost= in the status line: what the queue bound dropped, plus the samples of packets the UDC
 * refused. */
static uint64_t status_lost(ng_gadget *g, uint64_t t) {
        char reply[NG_REPLY_MAX];
        ck_assert_int_eq(ng_gadget_command(g, t, "status", reply, sizeof reply), 0);
        const char *p = strstr(reply, " lost=");
        ck_assert_msg(p, "no lost= in '%s'", reply);
        return strtoull(p + 6, NULL, 10);
}

START_TEST(test_lost_samples) {
        ng_gadget *g = new_gadget();
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];
        nd_penmodel_state st;

        identify(g, T0);
        ck_assert_int_eq(set_telemetry(g, T0, 1000), 0);
        ck_assert_uint_eq(status_lost(g, T0), 0);
        /* nobody polls for a second: the queue keeps its 512 newest, the rest is lost */
        ng_gadget_advance(g, T0 + MS(1000));
        nd_penmodel_get_state(ng_gadget_model(g), &st);
        ck_assert_uint_eq(st.queued, ND_PENMODEL_QUEUE_MAX);
        uint64_t dropped = st.samples_dropped;
        ck_assert_uint_gt(dropped, 400);
        ck_assert_uint_eq(status_lost(g, T0 + MS(1000)), dropped);
        /* a packet the UDC refused: its samples are lost too */
        int len = ng_gadget_next_packet(g, T0 + MS(1000), buf, sizeof buf);
        ck_assert_int_eq(len, (int) ND_PROTO_PACKET_SIZE(3));
        ng_gadget_packet_lost(g, buf, (size_t) len);
        ck_assert_uint_eq(status_lost(g, T0 + MS(1000)), dropped + 3);
        ng_gadget_packet_lost(g, NULL, 0); /* ignored */
        ck_assert_uint_eq(status_lost(g, T0 + MS(1000)), dropped + 3);
        ng_gadget_free(g);
}
END_TEST

/* ---- control commands ---------------------------------------------------------------------------------- */

START_TEST(test_commands) {
        ng_gadget *g = new_gadget();
        char reply[NG_REPLY_MAX], before[NG_REPLY_MAX], longline[NG_COMMAND_LINE_MAX + 8];

        ck_assert_int_eq(ng_gadget_command(g, T0, "status", reply, sizeof reply), 0);
        ck_assert_msg(strncmp(reply, "ok motor=off depth_mm=0.000 speed_hz=25.00 cartridge=none needles=0 fault=none "
                                     "injected=none identified=no watchdog=disarmed telemetry_hz=0 battery=100",
                              strlen("ok motor=off depth_mm=0.000 speed_hz=25.00 cartridge=none needles=0 fault=none "
                                     "injected=none identified=no watchdog=disarmed telemetry_hz=0 battery=100")) == 0,
                      "%s", reply);
        memcpy(before, reply, sizeof before);

        const char *bad[] = {
                "", "   ", "nonsense", "status extra",
                "insert-cartridge", "insert-cartridge CART 0", "insert-cartridge CART 256", "insert-cartridge CART 12x",
                "insert-cartridge CART -1", "insert-cartridge 123456789012345678901234567890123 12",
                "eject-cartridge", "battery", "battery 101", "battery -3", "battery 5 5",
                "fault", "fault on-fire", "hostile", "hostile sideways", "hostile bad-crc 0", "hostile bad-crc 1001",
                "hostile bad-crc x", "a b c d e f",
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                ck_assert_msg(ng_gadget_command(g, T0, bad[i], reply, sizeof reply) < 0, "'%s' accepted", bad[i]);
                ck_assert_msg(strncmp(reply, "error ", 6) == 0, "'%s' -> %s", bad[i], reply);
        }
        memset(longline, 'x', sizeof longline - 1);
        longline[sizeof longline - 1] = '\0';
        ck_assert_int_eq(ng_gadget_command(g, T0, longline, reply, sizeof reply), -E2BIG);
        /* nothing changed, nothing logged */
        ck_assert_int_eq(ng_gadget_command(g, T0, "status", reply, sizeof reply), 0);
        ck_assert_str_eq(reply, before);
        ck_assert_uint_eq(n_lines, 0);

        command_ok(g, T0, "insert-cartridge CART-9 24");
        ck_assert_int_eq(ng_gadget_command(g, T0, "insert-cartridge CART-10 12", reply, sizeof reply), -EBUSY);
        command_ok(g, T0, "battery 40");
        command_ok(g, T0, "fault over-temperature");
        command_ok(g, T0, "hostile out-of-sequence 3");
        ck_assert_int_eq(ng_gadget_command(g, T0, "status", reply, sizeof reply), 0);
        ck_assert_ptr_nonnull(strstr(reply, " cartridge=CART-9 needles=24 "));
        ck_assert_ptr_nonnull(strstr(reply, " injected=over-temperature "));
        ck_assert_ptr_nonnull(strstr(reply, " battery=40"));
        ck_assert_int_ge(find_line(0, "event cartridge inserted id=CART-9 needles=24"), 0);
        ck_assert_int_ge(find_line(0, "event hostile-queued kind=out-of-sequence count=3"), 0);
        command_ok(g, T0, "fault clear");
        command_ok(g, T0, "eject-cartridge");
        ck_assert_int_eq(ng_gadget_command(g, T0, "eject-cartridge", reply, sizeof reply), -ENOENT);
        /* the hostile queue is bounded */
        for (unsigned i = 1; i < NG_HOSTILE_QUEUE_MAX; i++)
                command_ok(g, T0, "hostile bad-crc");
        ck_assert_int_eq(ng_gadget_command(g, T0, "hostile bad-crc", reply, sizeof reply), -ENOSPC);
        ng_gadget_free(g);
}
END_TEST

/* ---- FunctionFS blocks ------------------------------------------------------------------------------------ */

static uint32_t le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

START_TEST(test_descriptors) {
        uint8_t d[NG_DESCRIPTORS_MAX];
        int len = ng_descriptors(d, sizeof d);

        ck_assert_int_gt(len, 0);
        ck_assert_int_eq(ng_descriptors(d, (size_t) len - 1), -ENOBUFS);
        ck_assert_int_eq(ng_descriptors(d, sizeof d), len);
        ck_assert_uint_eq(le32(d), 3);              /* FUNCTIONFS_DESCRIPTORS_MAGIC_V2 */
        ck_assert_uint_eq(le32(d + 4), (uint32_t) len);
        ck_assert_uint_eq(le32(d + 8), 1 | 2 | 4);  /* full, high, super speed */
        ck_assert_uint_eq(le32(d + 12), 2);
        ck_assert_uint_eq(le32(d + 16), 2);
        ck_assert_uint_eq(le32(d + 20), 3);
        /* walk the descriptors: each speed has the interface, then the endpoint */
        const uint8_t intervals[] = { 1, 4, 4 };
        size_t off = 24;
        for (unsigned speed = 0; speed < 3; speed++) {
                const uint8_t *itf = d + off, *ep = itf + itf[0];
                ck_assert_uint_eq(itf[0], 9);
                ck_assert_uint_eq(itf[1], 4);
                ck_assert_uint_eq(itf[2], ND_PROTO_INTERFACE_NUMBER);
                ck_assert_uint_eq(itf[4], 1);
                ck_assert_uint_eq(itf[5], ND_PROTO_INTERFACE_CLASS);
                ck_assert_uint_eq(itf[6], ND_PROTO_INTERFACE_SUBCLASS);
                ck_assert_uint_eq(itf[7], ND_PROTO_INTERFACE_PROTOCOL);
                ck_assert_uint_eq(ep[0], 7);
                ck_assert_uint_eq(ep[1], 5);
                ck_assert_uint_eq(ep[2], ND_PROTO_TELEMETRY_ENDPOINT);
                ck_assert_uint_eq(ep[3], 3); /* interrupt */
                ck_assert_uint_eq(ep[4] | ep[5] << 8, ND_PROTO_TELEMETRY_MAX_PACKET);
                ck_assert_uint_eq(ep[6], intervals[speed]);
                off += itf[0] + ep[0];
                if (speed == 2) {
                        ck_assert_uint_eq(d[off], 6);
                        ck_assert_uint_eq(d[off + 1], 0x30);
                        off += d[off];
                }
        }
        ck_assert_uint_eq(off, (size_t) len);

        uint8_t s[NG_DESCRIPTORS_MAX];
        len = ng_strings(s, sizeof s);
        ck_assert_int_eq(len, 16 + 2 + (int) sizeof NG_INTERFACE_NAME);
        ck_assert_uint_eq(le32(s), 2);
        ck_assert_uint_eq(le32(s + 4), (uint32_t) len);
        ck_assert_uint_eq(s[16] | s[17] << 8, 0x0409);
        ck_assert_str_eq((const char *) s + 18, NG_INTERFACE_NAME);
        ck_assert_int_eq(ng_strings(s, 10), -ENOBUFS);
}
END_TEST

/* The ctl commands' counts and the program's --battery and --telemetry-rate. */
START_TEST(test_parse_unsigned) {
        unsigned v = 7;
        ck_assert_int_eq(ng_parse_unsigned("250", 1, 1000, &v), 0);
        ck_assert_uint_eq(v, 250);
        ck_assert_int_eq(ng_parse_unsigned("1", 1, 1000, &v), 0);
        ck_assert_uint_eq(v, 1);
        ck_assert_int_eq(ng_parse_unsigned("1000", 1, 1000, &v), 0);
        ck_assert_uint_eq(v, 1000);
        ck_assert_int_eq(ng_parse_unsigned("0", 0, 100, &v), 0);
        ck_assert_uint_eq(v, 0);
        v = 7;
        ck_assert_int_eq(ng_parse_unsigned("0", 1, 1000, &v), -ERANGE);
        ck_assert_int_eq(ng_parse_unsigned("1001", 1, 1000, &v), -ERANGE);
        ck_assert_int_eq(ng_parse_unsigned("99999999999999999999999", 1, 1000, &v), -ERANGE);
        ck_assert_int_eq(ng_parse_unsigned("25x", 1, 1000, &v), -EINVAL);
        ck_assert_int_eq(ng_parse_unsigned("-1", 0, 100, &v), -EINVAL);
        ck_assert_int_eq(ng_parse_unsigned(" 5", 0, 100, &v), -EINVAL);
        ck_assert_int_eq(ng_parse_unsigned("+5", 0, 100, &v), -EINVAL);
        ck_assert_int_eq(ng_parse_unsigned("", 0, 100, &v), -EINVAL);
        ck_assert_int_eq(ng_parse_unsigned(NULL, 0, 100, &v), -EINVAL);
        ck_assert_uint_eq(v, 7); /* untouched by a refusal */
}
END_TEST

START_TEST(test_names) {
        for (int c = 0; c < _NG_STOP_MAX; c++)
                ck_assert_ptr_nonnull(ng_stop_cause_to_string((ng_stop_cause) c));
        ck_assert_ptr_null(ng_stop_cause_to_string(_NG_STOP_MAX));
        for (int h = 0; h < _NG_HOSTILE_MAX; h++)
                ck_assert_int_eq(ng_hostile_from_string(ng_hostile_to_string((ng_hostile) h)), h);
        ck_assert_int_eq(ng_hostile_from_string("BAD-CRC"), -EINVAL);
        ck_assert_int_eq(ng_hostile_from_string(NULL), -EINVAL);
        ck_assert_ptr_null(ng_hostile_to_string(_NG_HOSTILE_MAX));
}
END_TEST

static Suite *gadget_suite(void) {
        Suite *s = suite_create("needle-gadget");
        TCase *tc = tcase_create("core");
        tcase_add_test(tc, test_before_identify);
        tcase_add_test(tc, test_refusals);
        tcase_add_test(tc, test_data_stage);
        tcase_add_test(tc, test_motor_host);
        tcase_add_test(tc, test_motor_watchdog);
        tcase_add_test(tc, test_motor_fault);
        tcase_add_test(tc, test_motor_cartridge);
        tcase_add_test(tc, test_usb_reset);
        tcase_add_test(tc, test_exit_unresponsive);
        tcase_add_test(tc, test_hostile);
        tcase_add_test(tc, test_batching);
        tcase_add_test(tc, test_lost_samples);
        tcase_add_test(tc, test_commands);
        tcase_add_test(tc, test_descriptors);
        tcase_add_test(tc, test_names);
        tcase_add_test(tc, test_parse_unsigned);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(gadget_suite());
        srunner_run_all(sr, CK_ENV);
        int failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
