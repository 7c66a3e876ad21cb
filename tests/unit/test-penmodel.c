/* test-penmodel.c: the pen firmware model, driven through protocol bytes with a simulated clock:
 * watchdog timing, dynamics, telemetry sequencing and batching, fault injection, determinism. */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check-main.h"
#include "penmodel.h"
#include "protocol.h"
#include "util.h"

#define T0 (5 * USEC_PER_SEC) /* power-on time: any monotonic origin */
#define MS(x) ((uint64_t) (x) * USEC_PER_MSEC)

/* ---- helpers ---------------------------------------------------------------------------------- */

static nd_penmodel *new_model(uint64_t seed) {
        nd_penmodel_config c;
        nd_penmodel *m = NULL;
        nd_penmodel_config_init(&c);
        c.seed = seed;
        ck_assert_int_eq(nd_penmodel_new(&c, T0, &m), 0);
        return m;
}

static int ctl(nd_penmodel *m, uint64_t t, const nd_control_setup *s, uint8_t *data) {
        uint8_t dummy[ND_PROTO_IDENTITY_SIZE];
        return nd_penmodel_control(m, t, s, data ? data : dummy, ND_PROTO_IDENTITY_SIZE);
}

static void identify(nd_penmodel *m, uint64_t t) {
        nd_control_setup s;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        nd_proto_identity id;
        nd_proto_request_identify(&s, ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR);
        ck_assert_int_eq(ctl(m, t, &s, buf), ND_PROTO_IDENTITY_SIZE);
        ck_assert_int_eq(nd_proto_decode_identity(buf, sizeof buf, 1, 0, &id, NULL), 0);
}

static int simple(nd_penmodel *m, uint64_t t, void (*req)(nd_control_setup *)) {
        nd_control_setup s;
        req(&s);
        return ctl(m, t, &s, NULL);
}

static int set_depth(nd_penmodel *m, uint64_t t, double mm) {
        nd_control_setup s;
        ck_assert_int_eq(nd_proto_request_set_depth(&s, mm), 0);
        return ctl(m, t, &s, NULL);
}

static int set_speed(nd_penmodel *m, uint64_t t, double hz) {
        nd_control_setup s;
        ck_assert_int_eq(nd_proto_request_set_speed(&s, hz), 0);
        return ctl(m, t, &s, NULL);
}

static int set_watchdog(nd_penmodel *m, uint64_t t, unsigned ms) {
        nd_control_setup s = { .request_type = ND_PROTO_REQTYPE_OUT, .request = ND_PROTO_REQ_SET_WATCHDOG,
                               .value = (uint16_t) ms };
        return ctl(m, t, &s, NULL);
}

static int set_telemetry(nd_penmodel *m, uint64_t t, unsigned hz, bool on) {
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];
        if (nd_proto_request_set_telemetry(&s, data, hz, on) < 0) {
                /* a rate the encoder refuses: build it by hand to reach the pen's own check */
                s = (nd_control_setup) { .request_type = ND_PROTO_REQTYPE_OUT, .request = ND_PROTO_REQ_SET_TELEMETRY,
                                         .length = ND_PROTO_SET_TELEMETRY_SIZE };
                data[0] = (uint8_t) hz, data[1] = (uint8_t) (hz >> 8), data[2] = on, data[3] = 0;
        }
        return ctl(m, t, &s, data);
}

static nd_proto_status get_status(nd_penmodel *m, uint64_t t) {
        nd_control_setup s;
        uint8_t buf[ND_PROTO_STATUS_SIZE];
        nd_proto_status st;
        nd_proto_error err;
        nd_proto_request_get_status(&s);
        ck_assert_int_eq(ctl(m, t, &s, buf), ND_PROTO_STATUS_SIZE);
        ck_assert_msg(nd_proto_decode_status(buf, sizeof buf, &st, &err) == 0, "%s", err.message);
        return st;
}

/* A pen identified, with a cartridge, a long watchdog, set points and telemetry at 1 kHz. */
static nd_penmodel *ready_pen(uint64_t seed, double depth_mm, double speed_hz) {
        nd_penmodel *m = new_model(seed);
        identify(m, T0);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "CART-1", 12), 0);
        ck_assert_int_eq(set_watchdog(m, T0, ND_PROTO_WATCHDOG_MAX_MS), 0);
        ck_assert_int_eq(set_depth(m, T0, depth_mm), 0);
        ck_assert_int_eq(set_speed(m, T0, speed_hz), 0);
        return m;
}

/* Collected, decoded telemetry. */
typedef struct collector {
        nd_proto_sample *s;
        size_t n, cap;
        unsigned packets, errors;
        unsigned per_count[ND_PROTO_SAMPLES_PER_PACKET_MAX + 1];
        unsigned error_kinds; /* bit per nd_proto_error_kind */
} collector;

static void collector_done(collector *c) {
        free(c->s);
        *c = (collector) {0};
}

/* Takes every packet due at t. */
static void drain(nd_penmodel *m, uint64_t t, collector *c) {
        uint8_t buf[ND_PROTO_TELEMETRY_MAX_PACKET];
        int len;
        while ((len = nd_penmodel_next_packet(m, t, buf, sizeof buf)) > 0) {
                nd_proto_packet p;
                nd_proto_error err;
                c->packets++;
                if (nd_proto_decode_packet(buf, (size_t) len, &p, &err) < 0) {
                        c->errors++;
                        c->error_kinds |= 1u << err.kind;
                        continue;
                }
                c->per_count[p.n_samples]++;
                for (unsigned i = 0; i < p.n_samples; i++) {
                        if (c->n == c->cap) {
                                c->cap = c->cap ? c->cap * 2 : 1024;
                                c->s = realloc(c->s, c->cap * sizeof *c->s);
                                ck_assert_ptr_nonnull(c->s);
                        }
                        c->s[c->n++] = p.samples[i];
                }
        }
        ck_assert_int_eq(len, 0);
}

/* Polls every step_us from `from` to `to` (inclusive), with a heartbeat every 100 ms. */
static void run(nd_penmodel *m, uint64_t from, uint64_t to, uint64_t step_us, collector *c) {
        uint64_t last_hb = from;
        for (uint64_t t = from; t <= to; t += step_us) {
                if (t - last_hb >= MS(100)) {
                        ck_assert_int_eq(simple(m, t, nd_proto_request_heartbeat), 0);
                        last_hb = t;
                }
                if (c)
                        drain(m, t, c);
                else
                        nd_penmodel_advance(m, t);
        }
}

static nd_penmodel_state state_of(nd_penmodel *m) {
        nd_penmodel_state st;
        nd_penmodel_get_state(m, &st);
        return st;
}

static void assert_consecutive(const collector *c) {
        for (size_t i = 1; i < c->n; i++)
                ck_assert_msg(c->s[i].sequence == (uint32_t) (c->s[i - 1].sequence + 1),
                              "sample %zu: sequence %u after %u", i, c->s[i].sequence, c->s[i - 1].sequence);
}

/* ---- identify and refusals --------------------------------------------------------------------- */

START_TEST(test_identify_and_negotiation) {
        nd_penmodel *m = new_model(1);
        nd_control_setup s;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        nd_proto_identity id;

        /* nothing but IDENTIFY and MOTOR_STOP before IDENTIFY */
        ck_assert_int_eq(simple(m, T0, nd_proto_request_heartbeat), -EPIPE);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_get_status), -EPIPE);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_stop), 0);
        ck_assert(!state_of(m).identified);

        /* another major: STALL */
        nd_proto_request_identify(&s, 2, 0);
        ck_assert_int_eq(ctl(m, T0, &s, buf), -EPIPE);
        ck_assert(!state_of(m).identified);
        /* a newer minor: answered in the pen's own 1.0 */
        nd_proto_request_identify(&s, 1, 3);
        ck_assert_int_eq(ctl(m, T0, &s, buf), ND_PROTO_IDENTITY_SIZE);
        ck_assert_int_eq(nd_proto_decode_identity(buf, sizeof buf, 1, 3, &id, NULL), 0);
        ck_assert_uint_eq(id.protocol_major, 1);
        ck_assert_uint_eq(id.protocol_minor, 0);
        ck_assert_str_eq(id.serial, "SIM0001");
        ck_assert_str_eq(id.model, "needle-sim");
        ck_assert_str_eq(id.firmware_version, "1.0.0");
        ck_assert_double_eq_tol(id.depth_min_mm, 0, 1e-9);
        ck_assert_double_eq_tol(id.depth_max_mm, 2.5, 1e-9);
        ck_assert_double_eq_tol(id.depth_step_mm, 0.05, 1e-9);
        ck_assert_double_eq_tol(id.speed_min_hz, 25, 1e-9);
        ck_assert_double_eq_tol(id.speed_max_hz, 150, 1e-9);
        ck_assert_uint_eq(id.max_telemetry_rate_hz, 1000);
        ck_assert(state_of(m).identified);

        /* a reply buffer too small is a caller bug */
        nd_proto_request_identify(&s, 1, 0);
        ck_assert_int_eq(nd_penmodel_control(m, T0, &s, buf, 10), -EINVAL);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_stall_conditions) {
        nd_penmodel *m = new_model(1);
        nd_control_setup s;
        identify(m, T0);

        ck_assert_int_eq(set_depth(m, T0, 2.5), 0);
        ck_assert_int_eq(set_depth(m, T0, 0), 0);
        ck_assert_int_eq(set_depth(m, T0, 1.05), 0);
        ck_assert_int_eq(set_depth(m, T0, 1.06), -EPIPE);   /* off the 0.05 mm grid */
        ck_assert_int_eq(set_depth(m, T0, 2.55), -EPIPE);   /* beyond range */
        ck_assert_double_eq_tol(state_of(m).set_depth_mm, 1.05, 1e-9); /* refused: unchanged */
        ck_assert_int_eq(set_speed(m, T0, 24.99), -EPIPE);
        ck_assert_int_eq(set_speed(m, T0, 150.01), -EPIPE);
        ck_assert_int_eq(set_speed(m, T0, 77.7), 0);
        ck_assert_double_eq_tol(state_of(m).set_speed_hz, 77.7, 1e-9);
        ck_assert_int_eq(set_watchdog(m, T0, 49), -EPIPE);
        ck_assert_int_eq(set_watchdog(m, T0, 10001), -EPIPE);
        ck_assert_int_eq(set_watchdog(m, T0, 300), 0);
        ck_assert_int_eq(set_telemetry(m, T0, 1001, true), -EPIPE);
        ck_assert_int_eq(set_telemetry(m, T0, 0, true), -EPIPE);
        /* no cartridge: no start */
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), -EPIPE);
        ck_assert(!state_of(m).motor_running);
        /* malformed requests */
        nd_proto_request_get_status(&s);
        s.value = 1;
        ck_assert_int_eq(ctl(m, T0, &s, NULL), -EPIPE);
        s = (nd_control_setup) { .request_type = ND_PROTO_REQTYPE_IN, .request = 0x55, .length = 8 };
        ck_assert_int_eq(ctl(m, T0, &s, NULL), -EPIPE);
        /* a pen with a lower maximum rate refuses more */
        nd_penmodel_config c;
        nd_penmodel *slow = NULL;
        nd_penmodel_config_init(&c);
        c.telemetry_rate_hz = 250;
        ck_assert_int_eq(nd_penmodel_new(&c, T0, &slow), 0);
        identify(slow, T0);
        ck_assert_int_eq(set_telemetry(slow, T0, 251, true), -EPIPE);
        ck_assert_int_eq(set_telemetry(slow, T0, 250, true), 0);
        nd_penmodel_unref(slow);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_config_validation) {
        nd_penmodel_config c;
        nd_penmodel *m = NULL;
#define BAD(stmt) do { nd_penmodel_config_init(&c); stmt; ck_assert_int_eq(nd_penmodel_new(&c, T0, &m), -EINVAL); ck_assert_ptr_null(m); } while (0)
        BAD(c.serial[0] = '\0');
        BAD(c.serial[2] = ' ');
        BAD(memset(c.serial, 'A', sizeof c.serial)); /* not terminated */
        BAD(c.model[0] = '\0');
        BAD(c.firmware_version[1] = '\t');
        BAD(c.battery_percent = 101);
        BAD(c.telemetry_rate_hz = 0);
        BAD(c.telemetry_rate_hz = 1001);
        BAD(c.depth_step_um = 0);
        BAD(c.depth_step_um = 70);
        BAD(c.depth_min_um = 3000);
        BAD(c.speed_min_chz = 0);
        BAD(c.speed_max_chz = 1000);
#undef BAD
        ck_assert_int_eq(nd_penmodel_new(NULL, T0, &m), -EINVAL);
}
END_TEST

/* ---- watchdog ----------------------------------------------------------------------------------- */

START_TEST(test_watchdog_timing) {
        nd_penmodel *m = ready_pen(1, 1.0, 100);
        const unsigned timeout_ms = 200;
        uint64_t t = T0 + MS(1);

        ck_assert_int_eq(set_watchdog(m, t, timeout_ms), 0);
        ck_assert_int_eq(simple(m, t, nd_proto_request_motor_start), 0);
        ck_assert(state_of(m).motor_running);
        /* heartbeats keep it running well past one timeout */
        for (int i = 0; i < 10; i++) {
                t += MS(150);
                ck_assert_int_eq(simple(m, t, nd_proto_request_heartbeat), 0);
                ck_assert(state_of(m).motor_running);
        }
        uint64_t last_hb = t;
        nd_proto_status st = get_status(m, t + MS(50));
        ck_assert_uint_eq(st.watchdog_timeout_ms, timeout_ms);
        ck_assert_uint_eq(st.watchdog_remaining_ms, timeout_ms - 50);
        ck_assert(st.status & ND_PROTO_STATUS_WATCHDOG_ARMED);

        /* not before the timeout ... */
        nd_penmodel_advance(m, last_hb + MS(timeout_ms) - 1);
        ck_assert(state_of(m).motor_running);
        ck_assert_uint_eq(state_of(m).faults, 0);
        /* ... and at it */
        nd_penmodel_advance(m, last_hb + MS(timeout_ms));
        nd_penmodel_state s = state_of(m);
        ck_assert(!s.motor_running);
        ck_assert(!s.watchdog_armed);
        ck_assert_uint_eq(s.faults, ND_PROTO_FAULT_WATCHDOG_EXPIRED);

        /* reported in status, refused start until cleared */
        t = last_hb + MS(timeout_ms) + MS(10);
        st = get_status(m, t);
        ck_assert(!st.motor_running);
        ck_assert_uint_eq(st.faults, ND_PROTO_FAULT_WATCHDOG_EXPIRED);
        ck_assert_uint_eq(st.watchdog_remaining_ms, 0);
        ck_assert_int_eq(simple(m, t, nd_proto_request_motor_start), -EPIPE);
        ck_assert_int_eq(simple(m, t, nd_proto_request_clear_faults), 0);
        ck_assert_uint_eq(state_of(m).faults, 0);
        ck_assert_int_eq(simple(m, t, nd_proto_request_motor_start), 0);
        ck_assert(state_of(m).motor_running);

        /* expiry with the motor already stopped disarms, without a fault */
        ck_assert_int_eq(simple(m, t, nd_proto_request_motor_stop), 0);
        nd_penmodel_advance(m, t + MS(timeout_ms) + MS(1));
        ck_assert(!state_of(m).watchdog_armed);
        ck_assert_uint_eq(state_of(m).faults, 0);

        /* the timeout is lazy-evaluated: a jump far past it gives the same result */
        t += MS(1000);
        ck_assert_int_eq(simple(m, t, nd_proto_request_motor_start), 0);
        nd_penmodel_advance(m, t + 10 * USEC_PER_SEC);
        ck_assert(!state_of(m).motor_running);
        ck_assert_uint_eq(state_of(m).faults, ND_PROTO_FAULT_WATCHDOG_EXPIRED);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_watchdog_in_telemetry) {
        nd_penmodel *m = ready_pen(1, 1.0, 100);
        collector c = {0};
        uint64_t t = T0;
        ck_assert_int_eq(set_watchdog(m, t, 100), 0);
        ck_assert_int_eq(simple(m, t, nd_proto_request_motor_start), 0);
        ck_assert_int_eq(set_telemetry(m, t, 1000, true), 0);
        for (uint64_t u = t; u <= t + MS(300); u += MS(1))
                drain(m, u, &c);
        /* motor bit on up to the deadline, then off with the fault bit: in the sample at 100 ms */
        bool saw_fault = false;
        for (size_t i = 0; i < c.n; i++) {
                uint64_t at = c.s[i].timestamp_us;
                uint64_t deadline = t + MS(100) - T0;
                if (at < deadline)
                        ck_assert(c.s[i].status & ND_PROTO_STATUS_MOTOR_RUNNING);
                else {
                        ck_assert(!(c.s[i].status & ND_PROTO_STATUS_MOTOR_RUNNING));
                        ck_assert(c.s[i].faults & ND_PROTO_FAULT_WATCHDOG_EXPIRED);
                        saw_fault = true;
                }
        }
        ck_assert(saw_fault);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

/* ---- dynamics ----------------------------------------------------------------------------------- */

START_TEST(test_speed_lag) {
        nd_penmodel *m = ready_pen(1, 1.0, 100);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);

        nd_penmodel_advance(m, T0 + MS(10));
        double early = state_of(m).speed_hz;
        ck_assert_msg(early > 5 && early < 20, "after 10 ms: %.2f Hz", early);
        /* one time constant: 1 - 1/e */
        nd_penmodel_advance(m, T0 + MS(ND_PENMODEL_SPEED_TAU_MS));
        double tau = state_of(m).speed_hz;
        ck_assert_msg(fabs(tau - 100 * (1 - exp(-1))) < 2, "after tau: %.2f Hz", tau);
        nd_penmodel_advance(m, T0 + MS(1000));
        ck_assert_double_eq_tol(state_of(m).speed_hz, 100, 0.1);

        /* a new set point is followed with the same lag, down too */
        ck_assert_int_eq(set_speed(m, T0 + MS(1000), 50), 0);
        nd_penmodel_advance(m, T0 + MS(1000 + ND_PENMODEL_SPEED_TAU_MS));
        ck_assert_msg(fabs(state_of(m).speed_hz - (50 + 50 * exp(-1))) < 2, "%.2f", state_of(m).speed_hz);
        /* stop: spins down */
        ck_assert_int_eq(simple(m, T0 + MS(2000), nd_proto_request_motor_stop), 0);
        nd_penmodel_advance(m, T0 + MS(2010));
        ck_assert(state_of(m).speed_hz > 30);
        nd_penmodel_advance(m, T0 + MS(3000));
        ck_assert(state_of(m).speed_hz < 0.1);
        ck_assert_double_eq(state_of(m).current_ma, 0);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_measured_values) {
        nd_penmodel *m = ready_pen(3, 1.5, 120);
        collector c = {0};
        ck_assert_int_eq(set_telemetry(m, T0, 1000, true), 0);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);
        run(m, T0, T0 + MS(2000), MS(1), &c);
        ck_assert_uint_eq(c.errors, 0);

        /* over the last second: depth and speed near the set points with small noise, never equal */
        double depth_sum = 0, speed_sum = 0, depth_min = 10, depth_max = 0;
        size_t n = 0;
        for (size_t i = c.n - 1000; i < c.n; i++, n++) {
                depth_sum += c.s[i].depth_mm;
                speed_sum += c.s[i].speed_hz;
                depth_min = MIN(depth_min, c.s[i].depth_mm);
                depth_max = MAX(depth_max, c.s[i].depth_mm);
                ck_assert(fabs(c.s[i].depth_mm - 1.5) < 0.02);
                ck_assert(fabs(c.s[i].speed_hz - 120) < 1);
                ck_assert(c.s[i].current_ma > 300 && c.s[i].current_ma < 1200);
                ck_assert(c.s[i].temperature_c > 20 && c.s[i].temperature_c < 41);
                ck_assert_uint_eq(c.s[i].battery_percent, 100);
                ck_assert_uint_eq(c.s[i].status, ND_PROTO_STATUS_MOTOR_RUNNING | ND_PROTO_STATUS_CARTRIDGE_PRESENT |
                                                         ND_PROTO_STATUS_WATCHDOG_ARMED);
                ck_assert_uint_eq(c.s[i].faults, 0);
        }
        ck_assert(fabs(depth_sum / n - 1.5) < 0.002);
        ck_assert(fabs(speed_sum / n - 120) < 0.05);
        ck_assert(depth_max - depth_min > 0.002); /* there is noise */
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_thermal_and_battery) {
        nd_penmodel *m = ready_pen(1, 2.5, 150);
        const uint64_t minute = 60 * USEC_PER_SEC;
        double t_start = state_of(m).temperature_c, b_start = state_of(m).battery_percent;

        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);
        run(m, T0, T0 + 2 * minute, MS(50), NULL);
        ck_assert(state_of(m).motor_running);
        double t_hot = state_of(m).temperature_c, b_run = state_of(m).battery_percent;
        ck_assert_msg(t_hot > t_start + 3, "warmed from %.2f to %.2f °C in 2 min", t_start, t_hot);
        ck_assert_msg(t_hot < 41, "too hot for normal running: %.2f °C", t_hot);
        /* 925 mA for 120 s of 1000 mAh: 3.08 % */
        ck_assert_msg(fabs((b_start - b_run) - 3.08) < 0.2, "drained %.3f %%", b_start - b_run);

        ck_assert_int_eq(simple(m, T0 + 2 * minute, nd_proto_request_motor_stop), 0);
        run(m, T0 + 2 * minute, T0 + 4 * minute, MS(50), NULL);
        double t_cool = state_of(m).temperature_c, b_idle = state_of(m).battery_percent;
        ck_assert_msg(t_cool < t_hot - 2, "cooled from %.2f only to %.2f °C", t_hot, t_cool);
        /* idle electronics: 20 mA for 120 s: 0.067 % */
        ck_assert_msg(b_run - b_idle > 0.03 && b_run - b_idle < 0.1, "idle drain %.3f %%", b_run - b_idle);

        /* the wire carries whole percent, rounded up */
        nd_proto_status st = get_status(m, T0 + 4 * minute);
        ck_assert_uint_eq(st.battery_percent, (unsigned) ceil(b_idle));
        ck_assert_double_eq_tol(st.temperature_c, t_cool, 0.006);
        nd_penmodel_unref(m);
}
END_TEST

/* ---- telemetry ----------------------------------------------------------------------------------- */

START_TEST(test_sequence_at_1khz) {
        nd_penmodel *m = ready_pen(1, 1.0, 100);
        collector c = {0};
        const unsigned seconds = 5;

        ck_assert_uint_eq(nd_penmodel_next_due_us(m), UINT64_MAX); /* off after reset */
        ck_assert_int_eq(set_telemetry(m, T0, 1000, true), 0);
        ck_assert_uint_eq(nd_penmodel_next_due_us(m), T0);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);
        run(m, T0, T0 + seconds * USEC_PER_SEC - 1, MS(1), &c);

        ck_assert_uint_eq(c.errors, 0);
        ck_assert_uint_eq(c.n, seconds * 1000);
        /* polled every ms: one sample per packet, one packet per frame */
        ck_assert_uint_eq(c.per_count[1], seconds * 1000);
        assert_consecutive(&c);
        ck_assert_uint_eq(c.s[0].sequence, 0);
        for (size_t i = 0; i < c.n; i++)
                ck_assert_uint_eq(c.s[i].timestamp_us, i * 1000);
        nd_penmodel_state s = state_of(m);
        ck_assert_uint_eq(s.samples_produced, seconds * 1000);
        ck_assert_uint_eq(s.samples_sent, seconds * 1000);
        ck_assert_uint_eq(s.samples_dropped, 0);
        ck_assert_uint_eq(nd_penmodel_next_due_us(m), T0 + seconds * USEC_PER_SEC);
        collector_done(&c);

        /* a rate that does not divide a second keeps its average exactly */
        ck_assert_int_eq(set_telemetry(m, T0 + seconds * USEC_PER_SEC, 300, true), 0);
        run(m, T0 + seconds * USEC_PER_SEC, T0 + (seconds + 1) * USEC_PER_SEC - 1, MS(1), &c);
        /* the sample due at the switch still belongs to the old schedule; the new one starts
         * at the next due time (1 ms later) */
        ck_assert_uint_eq(c.n, 1 + 300);
        assert_consecutive(&c);
        ck_assert_uint_eq(c.s[0].sequence, seconds * 1000);
        ck_assert_uint_eq(c.s[0].timestamp_us, seconds * USEC_PER_SEC);
        for (size_t i = 2; i < c.n; i++) {
                uint32_t gap = c.s[i].timestamp_us - c.s[i - 1].timestamp_us;
                ck_assert_msg(gap == 3333 || gap == 3334, "gap %u µs", gap);
        }
        ck_assert_uint_eq(c.s[300].timestamp_us - c.s[1].timestamp_us, 299u * USEC_PER_SEC / 300);

        /* off: nothing more, and nothing due */
        ck_assert_int_eq(set_telemetry(m, T0 + (seconds + 1) * USEC_PER_SEC, 0, false), 0);
        ck_assert_uint_eq(nd_penmodel_next_due_us(m), UINT64_MAX);
        size_t before = c.n;
        run(m, T0 + (seconds + 1) * USEC_PER_SEC, T0 + (seconds + 2) * USEC_PER_SEC, MS(1), &c);
        ck_assert_uint_eq(c.n, before);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

/* An idle pen coming into use: a raised rate applies one new period after the last sample, not at
 * the slow schedule's next due time (protocol.md §5.4); a lowered one from the next due time. */
START_TEST(test_raised_rate_applies_at_once) {
        nd_penmodel *m = ready_pen(1, 1.0, 100);
        collector c = {0};

        ck_assert_int_eq(set_telemetry(m, T0, 2, true), 0);
        run(m, T0, T0 + MS(1200), MS(1), &c); /* samples at 0, 500 and 1000 ms */
        ck_assert_uint_eq(c.n, 3);
        ck_assert_uint_eq(nd_penmodel_next_due_us(m), T0 + MS(1500));

        /* raised at 1200 ms: the next sample at 1201 ms (one 1 kHz period after the last one, at
         * the earliest the next tick), not at 1500 ms */
        ck_assert_int_eq(set_telemetry(m, T0 + MS(1200), 1000, true), 0);
        ck_assert_uint_le(nd_penmodel_next_due_us(m), T0 + MS(1201));
        run(m, T0 + MS(1201), T0 + MS(1300), MS(1), &c);
        ck_assert_uint_ge(c.n, 3 + 100);
        assert_consecutive(&c);
        ck_assert_uint_le(c.s[3].timestamp_us, (uint32_t) MS(1201));

        /* lowered again: from the next due time, so no two samples crowd */
        uint64_t due = nd_penmodel_next_due_us(m);
        ck_assert_int_eq(set_telemetry(m, T0 + MS(1300), 2, true), 0);
        ck_assert_uint_eq(nd_penmodel_next_due_us(m), due);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_catch_up_batching) {
        nd_penmodel *m = ready_pen(1, 1.0, 100);
        collector c = {0};
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];

        ck_assert_int_eq(nd_penmodel_next_packet(m, T0, buf, sizeof buf - 1), -ENOBUFS);
        ck_assert_int_eq(set_telemetry(m, T0, 1000, true), 0);
        /* a poller 10 ms late each time: full packets, nothing lost */
        run(m, T0 + MS(10), T0 + MS(2000), MS(10), &c);
        ck_assert_uint_eq(c.errors, 0);
        ck_assert_uint_eq(c.n, 2001);
        assert_consecutive(&c);
        ck_assert(c.per_count[3] >= 600);
        ck_assert_uint_eq(state_of(m).samples_dropped, 0);

        /* the queue is due already: next_due says "now" */
        nd_penmodel_advance(m, T0 + MS(2005));
        ck_assert_uint_eq(state_of(m).queued, 5);
        ck_assert_uint_eq(nd_penmodel_next_due_us(m), T0 + MS(2001));
        collector_done(&c);

        /* beyond the bound: the oldest are dropped, the rest stay consecutive */
        uint64_t t = T0 + MS(2000) + USEC_PER_SEC;
        nd_penmodel_state before = state_of(m);
        drain(m, t, &c);
        nd_penmodel_state after = state_of(m);
        ck_assert_uint_eq(c.n, ND_PENMODEL_QUEUE_MAX);
        ck_assert_uint_eq(after.samples_dropped - before.samples_dropped, 1000 - ND_PENMODEL_QUEUE_MAX);
        assert_consecutive(&c);
        ck_assert_uint_eq(c.s[0].sequence, 2001 + 1000 - ND_PENMODEL_QUEUE_MAX);
        ck_assert_uint_eq(c.s[c.n - 1].sequence, 3000);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

/* Runs a fixed scenario and returns every packet byte in one buffer. */
static uint8_t *scenario_bytes(uint64_t seed, size_t *ret_len) {
        nd_penmodel *m = ready_pen(seed, 0.75, 110);
        size_t cap = 64 * 4096, len = 0;
        uint8_t *out = malloc(cap);
        ck_assert_ptr_nonnull(out);
        ck_assert_int_eq(set_telemetry(m, T0, 1000, true), 0);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);
        for (uint64_t t = T0; t < T0 + MS(3000); t += MS(3)) {
                if (t == T0 + MS(1500))
                        ck_assert_int_eq(nd_penmodel_inject_fault(m, t, ND_PENMODEL_FAULT_MOTOR_STALL), 0);
                if ((t - T0) % MS(99) == 0)
                        ck_assert_int_eq(simple(m, t, nd_proto_request_heartbeat), 0);
                int n;
                while ((n = nd_penmodel_next_packet(m, t, out + len, cap - len)) > 0) {
                        len += (size_t) n;
                        ck_assert(cap - len >= ND_PROTO_PACKET_MAX_SIZE);
                }
        }
        nd_penmodel_unref(m);
        *ret_len = len;
        return out;
}

START_TEST(test_determinism) {
        size_t la, lb, lc;
        uint8_t *a = scenario_bytes(42, &la), *b = scenario_bytes(42, &lb), *c = scenario_bytes(43, &lc);
        ck_assert_uint_gt(la, 3000 * ND_PROTO_PACKET_SIZE(1) / 3);
        ck_assert_uint_eq(la, lb);
        ck_assert_mem_eq(a, b, la);
        /* another seed: same lengths, other noise */
        ck_assert_uint_eq(la, lc);
        ck_assert(memcmp(a, c, la) != 0);
        free(a);
        free(b);
        free(c);

        /* the state does not depend on how often one looks (physics on a fixed grid) */
        nd_penmodel *x = ready_pen(5, 1.0, 100), *y = ready_pen(5, 1.0, 100);
        ck_assert_int_eq(simple(x, T0, nd_proto_request_motor_start), 0);
        ck_assert_int_eq(simple(y, T0, nd_proto_request_motor_start), 0);
        for (uint64_t t = T0; t <= T0 + MS(900); t += 137)
                nd_penmodel_advance(x, t);
        nd_penmodel_advance(y, T0 + MS(900));
        nd_penmodel_advance(x, T0 + MS(900));
        ck_assert(state_of(x).speed_hz == state_of(y).speed_hz);
        ck_assert(state_of(x).temperature_c == state_of(y).temperature_c);
        ck_assert(state_of(x).battery_percent == state_of(y).battery_percent);
        /* time never goes back */
        nd_penmodel_advance(x, T0);
        ck_assert_uint_eq(state_of(x).now_us, T0 + MS(900));
        nd_penmodel_unref(x);
        nd_penmodel_unref(y);
}
END_TEST

/* ---- faults ------------------------------------------------------------------------------------------ */

/* "refuse-start": the pen answers MOTOR_START with a STALL and latches nothing, until "clear". */
START_TEST(test_refuse_start) {
        nd_penmodel *m = new_model(1);
        identify(m, T0);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "CART-1", 12), 0);
        ck_assert_int_eq(nd_penmodel_inject_fault(m, T0, ND_PENMODEL_FAULT_REFUSE_START), 0);
        ck_assert_int_eq(set_depth(m, T0, 1.0), 0);
        ck_assert_int_eq(set_speed(m, T0, 100), 0);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), -EPIPE);
        ck_assert(!state_of(m).motor_running);
        ck_assert_uint_eq(state_of(m).faults, 0);
        ck_assert_int_eq(simple(m, T0 + MS(10), nd_proto_request_motor_start), -EPIPE);
        ck_assert_int_eq(nd_penmodel_inject_fault(m, T0 + MS(20), ND_PENMODEL_FAULT_CLEAR), 0);
        ck_assert_int_eq(simple(m, T0 + MS(20), nd_proto_request_motor_start), 0);
        ck_assert(state_of(m).motor_running);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_fault_names) {
        for (int f = 0; f < _ND_PENMODEL_FAULT_MAX; f++)
                ck_assert_int_eq(nd_penmodel_fault_from_string(nd_penmodel_fault_to_string(f)), f);
        ck_assert_int_eq(nd_penmodel_fault_from_string("over-temperature"), ND_PENMODEL_FAULT_OVER_TEMPERATURE);
        ck_assert_int_eq(nd_penmodel_fault_from_string("corrupt-telemetry"), ND_PENMODEL_FAULT_CORRUPT_TELEMETRY);
        ck_assert_int_eq(nd_penmodel_fault_from_string("clear"), ND_PENMODEL_FAULT_CLEAR);
        ck_assert_int_eq(nd_penmodel_fault_from_string("Over-Temperature"), -EINVAL);
        ck_assert_int_eq(nd_penmodel_fault_from_string(""), -EINVAL);
        ck_assert_int_eq(nd_penmodel_fault_from_string(NULL), -EINVAL);
        ck_assert_ptr_null(nd_penmodel_fault_to_string(_ND_PENMODEL_FAULT_MAX));
        nd_penmodel *m = new_model(1);
        ck_assert_int_eq(nd_penmodel_inject_fault(m, T0, _ND_PENMODEL_FAULT_MAX), -EINVAL);
        ck_assert_uint_eq(state_of(m).injected, 0);
        nd_penmodel_unref(m);
}
END_TEST

/* A running pen at 100 Hz / 1 mm streaming for 1 s, then fault f for `ms`; returns the samples
 * of the fault period in c. */
static nd_penmodel *run_with_fault(nd_penmodel_fault f, unsigned ms, collector *c, double *normal_current) {
        nd_penmodel *m = ready_pen(7, 1.0, 100);
        collector warm = {0};
        ck_assert_int_eq(set_telemetry(m, T0, 1000, true), 0);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);
        run(m, T0, T0 + MS(1000), MS(1), &warm);
        ck_assert_uint_eq(warm.errors, 0);
        *normal_current = warm.s[warm.n - 1].current_ma;
        ck_assert(warm.s[warm.n - 1].faults == 0);
        collector_done(&warm);
        ck_assert_int_eq(nd_penmodel_inject_fault(m, T0 + MS(1000), f), 0);
        ck_assert(state_of(m).injected & (1u << f));
        run(m, T0 + MS(1001), T0 + MS(1000 + ms), MS(1), c);
        return m;
}

START_TEST(test_fault_over_temperature) {
        collector c = {0};
        double normal;
        nd_penmodel *m = run_with_fault(ND_PENMODEL_FAULT_OVER_TEMPERATURE, 3000, &c, &normal);
        /* beyond 43 °C within 2 s */
        size_t first_hot = SIZE_MAX;
        for (size_t i = 0; i < c.n && first_hot == SIZE_MAX; i++)
                if (c.s[i].temperature_c > 43)
                        first_hot = i;
        ck_assert_msg(first_hot < 2000, "43 °C after %zu samples", first_hot);
        /* the pen's own backstop at 45 °C stops the motor and latches the fault */
        ck_assert(c.s[c.n - 1].temperature_c >= ND_PENMODEL_OVER_TEMPERATURE_C);
        ck_assert(c.s[c.n - 1].faults & ND_PROTO_FAULT_OVER_TEMPERATURE);
        ck_assert(!(c.s[c.n - 1].status & ND_PROTO_STATUS_MOTOR_RUNNING));
        /* still hot: CLEAR_FAULTS keeps it */
        uint64_t t = T0 + MS(4000);
        ck_assert_int_eq(simple(m, t, nd_proto_request_clear_faults), 0);
        ck_assert(state_of(m).faults & ND_PROTO_FAULT_OVER_TEMPERATURE);
        /* clear: back to normal within a few seconds, then the fault clears */
        ck_assert_int_eq(nd_penmodel_inject_fault(m, t, ND_PENMODEL_FAULT_CLEAR), 0);
        ck_assert_uint_eq(state_of(m).injected, 0);
        run(m, t, t + MS(3000), MS(10), NULL);
        ck_assert(state_of(m).temperature_c < 41);
        ck_assert_int_eq(simple(m, t + MS(3000), nd_proto_request_clear_faults), 0);
        ck_assert_uint_eq(state_of(m).faults, 0);
        ck_assert_int_eq(simple(m, t + MS(3000), nd_proto_request_motor_start), 0);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_fault_motor_stall) {
        collector c = {0};
        double normal;
        nd_penmodel *m = run_with_fault(ND_PENMODEL_FAULT_MOTOR_STALL, 400, &c, &normal);
        /* within 250 ms the measured speed is below 70 % of set (the default limit's fraction)
         * and the current above its normal value */
        nd_proto_sample *s = &c.s[250];
        ck_assert_msg(s->speed_hz < 0.7 * 100, "speed %.2f", s->speed_hz);
        ck_assert_msg(s->current_ma > normal + 200, "current %.0f vs normal %.0f", s->current_ma, normal);
        ck_assert(s->current_ma < 1200); /* a stall, not an over-current */
        ck_assert(s->status & ND_PROTO_STATUS_MOTOR_RUNNING);
        collector_done(&c);
        /* the pen's backstop latches after its own window */
        run(m, T0 + MS(1401), T0 + MS(2500), MS(1), &c);
        ck_assert(c.s[c.n - 1].faults & ND_PROTO_FAULT_MOTOR_STALL);
        ck_assert(!(c.s[c.n - 1].status & ND_PROTO_STATUS_MOTOR_RUNNING));
        /* motor stopped: the stall's cause is gone */
        ck_assert_int_eq(simple(m, T0 + MS(2500), nd_proto_request_clear_faults), 0);
        ck_assert_uint_eq(state_of(m).faults, 0);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_fault_over_current) {
        collector c = {0};
        double normal;
        nd_penmodel *m = run_with_fault(ND_PENMODEL_FAULT_OVER_CURRENT, 100, &c, &normal);
        ck_assert(normal < 1200);
        for (size_t i = 0; i < c.n; i++)
                ck_assert_msg(c.s[i].current_ma > 1200, "sample %zu: %.0f mA", i, c.s[i].current_ma);
        /* the pen's 1500 mA backstop trips after 20 ms; the condition persists while injected */
        ck_assert(c.s[c.n - 1].faults & ND_PROTO_FAULT_OVER_CURRENT);
        ck_assert(!(c.s[c.n - 1].status & ND_PROTO_STATUS_MOTOR_RUNNING));
        ck_assert_int_eq(simple(m, T0 + MS(1100), nd_proto_request_clear_faults), 0);
        ck_assert(state_of(m).faults & ND_PROTO_FAULT_OVER_CURRENT);
        ck_assert_int_eq(nd_penmodel_inject_fault(m, T0 + MS(1100), ND_PENMODEL_FAULT_CLEAR), 0);
        nd_penmodel_advance(m, T0 + MS(1102));
        ck_assert_double_eq(state_of(m).current_ma, 0);
        ck_assert_int_eq(simple(m, T0 + MS(1102), nd_proto_request_clear_faults), 0);
        ck_assert_uint_eq(state_of(m).faults, 0);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_fault_depth_deviation) {
        collector c = {0};
        double normal;
        nd_penmodel *m = run_with_fault(ND_PENMODEL_FAULT_DEPTH_DEVIATION, 200, &c, &normal);
        for (size_t i = 0; i < c.n; i++)
                ck_assert_msg(fabs(c.s[i].depth_mm - 1.0) > 0.5, "sample %zu: %.3f mm", i, c.s[i].depth_mm);
        ck_assert(c.s[c.n - 1].faults & ND_PROTO_FAULT_DEPTH_DEVIATION);
        ck_assert_int_eq(nd_penmodel_inject_fault(m, T0 + MS(1200), ND_PENMODEL_FAULT_CLEAR), 0);
        ck_assert_int_eq(simple(m, T0 + MS(1200), nd_proto_request_clear_faults), 0);
        ck_assert_uint_eq(state_of(m).faults, 0);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_fault_unresponsive) {
        collector c = {0};
        double normal;
        nd_penmodel *m = run_with_fault(ND_PENMODEL_FAULT_UNRESPONSIVE, 1, &c, &normal);
        uint64_t t = T0 + MS(1001);
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];
        collector_done(&c);

        ck_assert_int_eq(simple(m, t, nd_proto_request_heartbeat), -ETIMEDOUT);
        ck_assert_int_eq(simple(m, t, nd_proto_request_motor_stop), -ETIMEDOUT);
        ck_assert_uint_eq(nd_penmodel_next_due_us(m), UINT64_MAX);
        ck_assert_int_eq(nd_penmodel_next_packet(m, t + MS(5), buf, sizeof buf), 0);
        /* nobody feeds the watchdog: the pen stops itself (10 s watchdog of ready_pen) */
        nd_penmodel_advance(m, T0 + MS(1000) + 10 * USEC_PER_SEC);
        ck_assert(!state_of(m).motor_running);
        ck_assert_uint_eq(state_of(m).faults, ND_PROTO_FAULT_WATCHDOG_EXPIRED);

        /* clear: answers and streams again; the silent period is a gap in the sequence */
        t = T0 + MS(12000);
        nd_penmodel_advance(m, t);
        uint32_t next = state_of(m).next_sequence;
        ck_assert_int_eq(nd_penmodel_inject_fault(m, t, ND_PENMODEL_FAULT_CLEAR), 0);
        ck_assert_int_eq(simple(m, t, nd_proto_request_heartbeat), 0);
        run(m, t, t + MS(10), MS(1), &c);
        ck_assert_uint_eq(c.errors, 0);
        ck_assert(c.n >= 10);
        ck_assert_uint_eq(c.s[0].sequence, next);
        ck_assert(state_of(m).samples_dropped > 10000);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_fault_corrupt_telemetry) {
        collector c = {0};
        double normal;
        nd_penmodel *m = run_with_fault(ND_PENMODEL_FAULT_CORRUPT_TELEMETRY, 20, &c, &normal);
        ck_assert_uint_eq(c.n, 0);
        ck_assert_uint_eq(c.errors, 20);
        /* every kind of damage */
        ck_assert(c.error_kinds & (1u << ND_PROTO_ERR_CRC));
        ck_assert(c.error_kinds & (1u << ND_PROTO_ERR_TYPE));
        ck_assert(c.error_kinds & (1u << ND_PROTO_ERR_COUNT));
        ck_assert(c.error_kinds & (1u << ND_PROTO_ERR_RANGE));
        collector_done(&c);
        ck_assert_int_eq(nd_penmodel_inject_fault(m, T0 + MS(1020), ND_PENMODEL_FAULT_CLEAR), 0);
        run(m, T0 + MS(1021), T0 + MS(1040), MS(1), &c);
        ck_assert_uint_eq(c.errors, 0);
        ck_assert_uint_eq(c.n, 20);
        collector_done(&c);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_low_battery) {
        nd_penmodel *m = ready_pen(1, 1.0, 100);
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);
        ck_assert_int_eq(nd_penmodel_set_battery(m, T0 + MS(10), 101), -EINVAL);
        ck_assert_int_eq(nd_penmodel_set_battery(m, T0 + MS(10), 20), 0);
        nd_penmodel_advance(m, T0 + MS(20));
        ck_assert(state_of(m).motor_running);
        ck_assert_uint_eq(get_status(m, T0 + MS(20)).battery_percent, 20);
        ck_assert_int_eq(nd_penmodel_set_battery(m, T0 + MS(30), ND_PENMODEL_LOW_BATTERY_PERCENT), 0);
        nd_penmodel_advance(m, T0 + MS(32));
        ck_assert(!state_of(m).motor_running);
        ck_assert_uint_eq(state_of(m).faults, ND_PROTO_FAULT_LOW_BATTERY);
        ck_assert_int_eq(simple(m, T0 + MS(40), nd_proto_request_clear_faults), 0);
        ck_assert_uint_eq(state_of(m).faults, ND_PROTO_FAULT_LOW_BATTERY);
        ck_assert_int_eq(nd_penmodel_set_battery(m, T0 + MS(50), 80), 0);
        ck_assert_int_eq(simple(m, T0 + MS(50), nd_proto_request_clear_faults), 0);
        ck_assert_uint_eq(state_of(m).faults, 0);
        nd_penmodel_unref(m);
}
END_TEST

START_TEST(test_cartridge) {
        nd_penmodel *m = new_model(1);
        nd_control_setup s;
        uint8_t buf[ND_PROTO_CARTRIDGE_SIZE];
        nd_proto_cartridge c;
        identify(m, T0);

        nd_proto_request_get_cartridge(&s);
        ck_assert_int_eq(ctl(m, T0, &s, buf), ND_PROTO_CARTRIDGE_SIZE);
        ck_assert_int_eq(nd_proto_decode_cartridge(buf, sizeof buf, &c, NULL), 0);
        ck_assert(!c.present);

        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "", 12), -EINVAL);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "has space", 12), -EINVAL);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "0123456789abcdef0123456789abcdefX", 12), -EINVAL);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "C-1", 0), -EINVAL);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "C-1", 256), -EINVAL);
        ck_assert_int_eq(nd_penmodel_eject_cartridge(m, T0), -ENOENT);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "LOT9-0007", 36), 0);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(m, T0, "LOT9-0008", 36), -EBUSY);
        ck_assert_int_eq(ctl(m, T0, &s, buf), ND_PROTO_CARTRIDGE_SIZE);
        ck_assert_int_eq(nd_proto_decode_cartridge(buf, sizeof buf, &c, NULL), 0);
        ck_assert(c.present);
        ck_assert_str_eq(c.id, "LOT9-0007");
        ck_assert_uint_eq(c.needles, 36);
        ck_assert(get_status(m, T0).status & ND_PROTO_STATUS_CARTRIDGE_PRESENT);

        /* ejecting stops the motor */
        ck_assert_int_eq(simple(m, T0, nd_proto_request_motor_start), 0);
        ck_assert_int_eq(nd_penmodel_eject_cartridge(m, T0 + MS(100)), 0);
        ck_assert(!state_of(m).motor_running);
        ck_assert_uint_eq(state_of(m).faults, 0);
        ck_assert_int_eq(ctl(m, T0 + MS(100), &s, buf), ND_PROTO_CARTRIDGE_SIZE);
        ck_assert_int_eq(nd_proto_decode_cartridge(buf, sizeof buf, &c, NULL), 0);
        ck_assert(!c.present);
        ck_assert_int_eq(simple(m, T0 + MS(100), nd_proto_request_motor_start), -EPIPE);

        /* two references: the model lives until the last goes */
        ck_assert_ptr_eq(nd_penmodel_ref(m), m);
        ck_assert_ptr_null(nd_penmodel_unref(m));
        ck_assert_str_eq(nd_penmodel_get_config(m)->serial, "SIM0001");
        nd_penmodel_unref(m);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("penmodel");
        TCase *tc = tcase_create("model");
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, test_identify_and_negotiation);
        tcase_add_test(tc, test_stall_conditions);
        tcase_add_test(tc, test_config_validation);
        tcase_add_test(tc, test_watchdog_timing);
        tcase_add_test(tc, test_watchdog_in_telemetry);
        tcase_add_test(tc, test_speed_lag);
        tcase_add_test(tc, test_measured_values);
        tcase_add_test(tc, test_thermal_and_battery);
        tcase_add_test(tc, test_sequence_at_1khz);
        tcase_add_test(tc, test_raised_rate_applies_at_once);
        tcase_add_test(tc, test_catch_up_batching);
        tcase_add_test(tc, test_determinism);
        tcase_add_test(tc, test_fault_names);
        tcase_add_test(tc, test_refuse_start);
        tcase_add_test(tc, test_fault_over_temperature);
        tcase_add_test(tc, test_fault_motor_stall);
        tcase_add_test(tc, test_fault_over_current);
        tcase_add_test(tc, test_fault_depth_deviation);
        tcase_add_test(tc, test_fault_unresponsive);
        tcase_add_test(tc, test_fault_corrupt_telemetry);
        tcase_add_test(tc, test_low_battery);
        tcase_add_test(tc, test_cartridge);
        suite_add_tcase(s, tc);
        return s;
}
