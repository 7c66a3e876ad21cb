/* test-interlocks.c: the safety decisions of lib/interlocks.c at every boundary: at, just below
 * and just above each limit, the settle and spin-up windows and the stall timing across the pen's
 * 32-bit clock wrap, fault-bit precedence, hysteresis, and failing closed without limits. */
#include <check.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "check-main.h"
#include "interlocks.h"
#include "util.h"

/* Limits built in memory: the values are chosen so that every boundary is exact in binary. */
static uint32_t allowed_needles[] = { 12, 36 };
static nd_area_limits areas[] = {
        { .name = (char *) "cheeks", .max_depth_mm = 1.5, .has_max_duration_s = true, .max_duration_s = 300 },
        { .name = (char *) "scalp", .max_depth_mm = 2.0 },
};

static nd_limits make_limits(void) {
        nd_limits l = { .version = 1 };
        l.pen.speed_min_hz = 50;
        l.pen.speed_max_hz = 150;
        l.pen.depth_tolerance_mm = 0.25;
        l.pen.warn_temperature_c = 41;
        l.pen.max_temperature_c = 43;
        l.pen.max_current_ma = 1200;
        l.pen.stall_speed_fraction = 0.75;
        l.pen.stall_time_ms = 250;
        l.pen.min_battery_percent = 20;
        l.pen.stop_battery_percent = 5;
        l.pen.heartbeat_timeout_ms = 500;
        l.session.max_duration_s = 2700;
        l.cartridge.single_use = true;
        l.cartridge.max_runtime_s = 3600;
        l.cartridge.allowed_needles = allowed_needles;
        l.cartridge.n_allowed_needles = ELEMENTSOF(allowed_needles);
        l.areas = areas;
        l.n_areas = ELEMENTSOF(areas);
        return l;
}

/* A sample well inside every limit, measured at ts (the pen's 32-bit clock). */
static nd_proto_sample good_sample(uint32_t ts) {
        return (nd_proto_sample) {
                .timestamp_us = ts, .depth_mm = 1.0, .speed_hz = 100.0, .current_ma = 600.0,
                .temperature_c = 35.0, .battery_percent = 80,
        };
}

static nd_interlock_input running_input(void) {
        return (nd_interlock_input) {
                .phase = ND_INTERLOCK_PHASE_RUNNING, .set_depth_mm = 1.0, .set_speed_hz = 100.0,
                .cartridge_runtime_s = 10.0, .cartridge_id = "CART-1",
        };
}

/* A session whose settle and spin-up windows are long over at SETTLED_TS. */
#define CHANGE_TS UINT32_C(1000)
#define SETTLED_TS (CHANGE_TS + ND_INTERLOCK_SPINUP_GRACE_US + 1000u)

static nd_interlock_session settled_session(void) {
        nd_interlock_session ss = { 0 };
        nd_interlock_settle_from(&ss, CHANGE_TS);
        return ss;
}

/* ---- one sample: a row per boundary ------------------------------------------------------------ */

typedef enum field {
        F_NONE, F_FAULTS, F_BATTERY, F_TEMPERATURE, F_CURRENT, F_DEPTH, F_RUNTIME, F_SPEED_ONCE,
} field;

typedef struct sample_row {
        const char *what;
        nd_interlock_phase phase;
        field f;
        double value;
        field f2;                 /* a second field, for precedence rows */
        double value2;
        nd_interlock_verdict verdict;
        const char *code;         /* of a trip */
        unsigned warnings;
} sample_row;

#define WT ND_INTERLOCK_WARN_HIGH_TEMPERATURE
#define WB ND_INTERLOCK_WARN_LOW_BATTERY
#define RUN ND_INTERLOCK_PHASE_RUNNING
#define PAUSED ND_INTERLOCK_PHASE_PAUSED
#define IDLE ND_INTERLOCK_PHASE_IDLE
#define NONE ND_INTERLOCK_NONE
#define WARN ND_INTERLOCK_WARN
#define TRIP ND_INTERLOCK_TRIP

static const sample_row sample_rows[] = {
        { "inside every limit", RUN, F_NONE, 0, F_NONE, 0, NONE, NULL, 0 },
        /* the pen's fault bits: lowest bit first, in every phase */
        { "fault over-temperature", RUN, F_FAULTS, 0x01, F_NONE, 0, TRIP, "over-temperature", 0 },
        { "fault motor-stall", RUN, F_FAULTS, 0x02, F_NONE, 0, TRIP, "motor-stall", 0 },
        { "faults 0x03: lowest bit wins", RUN, F_FAULTS, 0x03, F_NONE, 0, TRIP, "over-temperature", 0 },
        { "faults 0x06: lowest bit wins", RUN, F_FAULTS, 0x06, F_NONE, 0, TRIP, "motor-stall", 0 },
        { "fault over-current", RUN, F_FAULTS, 0x04, F_NONE, 0, TRIP, "over-current", 0 },
        { "fault depth-deviation", RUN, F_FAULTS, 0x08, F_NONE, 0, TRIP, "depth-deviation", 0 },
        { "fault watchdog", RUN, F_FAULTS, 0x10, F_NONE, 0, TRIP, "heartbeat-lost", 0 },
        { "fault low-battery", RUN, F_FAULTS, 0x20, F_NONE, 0, TRIP, "low-battery", 0 },
        { "faults 0x30: lowest bit wins", RUN, F_FAULTS, 0x30, F_NONE, 0, TRIP, "heartbeat-lost", 0 },
        { "unknown fault bit", RUN, F_FAULTS, 0x80, F_NONE, 0, TRIP, "pen-fault", 0 },
        { "fault bits while idle", IDLE, F_FAULTS, 0x01, F_NONE, 0, TRIP, "over-temperature", 0 },
        { "fault bits while paused", PAUSED, F_FAULTS, 0x04, F_NONE, 0, TRIP, "over-current", 0 },
        { "fault bits before the battery", RUN, F_FAULTS, 0x02, F_BATTERY, 0, TRIP, "motor-stall", 0 },
        /* battery cut-off 5 %, warning below 20 % */
        { "battery at the cut-off", RUN, F_BATTERY, 5, F_NONE, 0, WARN, NULL, WB },
        { "battery below the cut-off", RUN, F_BATTERY, 4, F_NONE, 0, TRIP, "low-battery", 0 },
        { "battery above the cut-off", RUN, F_BATTERY, 6, F_NONE, 0, WARN, NULL, WB },
        { "battery below the cut-off, paused", PAUSED, F_BATTERY, 4, F_NONE, 0, TRIP, "low-battery", 0 },
        { "battery below the cut-off, idle", IDLE, F_BATTERY, 4, F_NONE, 0, WARN, NULL, WB },
        { "battery at the warning", RUN, F_BATTERY, 20, F_NONE, 0, NONE, NULL, 0 },
        { "battery below the warning", RUN, F_BATTERY, 19, F_NONE, 0, WARN, NULL, WB },
        { "battery before temperature", RUN, F_BATTERY, 4, F_TEMPERATURE, 50, TRIP, "low-battery", 0 },
        /* temperature: warning at 41 °C, trip above 43 °C, while running only */
        { "temperature below the warning", RUN, F_TEMPERATURE, 40.99, F_NONE, 0, NONE, NULL, 0 },
        { "temperature at the warning", RUN, F_TEMPERATURE, 41, F_NONE, 0, WARN, NULL, WT },
        { "temperature below the maximum", RUN, F_TEMPERATURE, 42.99, F_NONE, 0, WARN, NULL, WT },
        { "temperature at the maximum", RUN, F_TEMPERATURE, 43, F_NONE, 0, WARN, NULL, WT },
        { "temperature above the maximum", RUN, F_TEMPERATURE, 43.01, F_NONE, 0, TRIP, "over-temperature", 0 },
        { "temperature above the maximum, paused", PAUSED, F_TEMPERATURE, 50, F_NONE, 0, WARN, NULL, WT },
        { "temperature above the maximum, idle", IDLE, F_TEMPERATURE, 50, F_NONE, 0, WARN, NULL, WT },
        { "temperature before current", RUN, F_TEMPERATURE, 44, F_CURRENT, 5000, TRIP, "over-temperature", 0 },
        /* motor current: trip above 1200 mA */
        { "current below the maximum", RUN, F_CURRENT, 1199, F_NONE, 0, NONE, NULL, 0 },
        { "current at the maximum", RUN, F_CURRENT, 1200, F_NONE, 0, NONE, NULL, 0 },
        { "current above the maximum", RUN, F_CURRENT, 1201, F_NONE, 0, TRIP, "over-current", 0 },
        { "current before depth", RUN, F_CURRENT, 1201, F_DEPTH, 2.0, TRIP, "over-current", 0 },
        /* depth: set 1.0 mm, tolerance 0.25 mm */
        { "depth at the upper tolerance", RUN, F_DEPTH, 1.25, F_NONE, 0, NONE, NULL, 0 },
        { "depth above the upper tolerance", RUN, F_DEPTH, 1.2505, F_NONE, 0, TRIP, "depth-deviation", 0 },
        { "depth inside the upper tolerance", RUN, F_DEPTH, 1.2495, F_NONE, 0, NONE, NULL, 0 },
        { "depth at the lower tolerance", RUN, F_DEPTH, 0.75, F_NONE, 0, NONE, NULL, 0 },
        { "depth below the lower tolerance", RUN, F_DEPTH, 0.7495, F_NONE, 0, TRIP, "depth-deviation", 0 },
        { "depth deviation, paused", PAUSED, F_DEPTH, 0.0, F_NONE, 0, NONE, NULL, 0 },
        { "depth before cartridge runtime", RUN, F_DEPTH, 2.0, F_RUNTIME, 4000, TRIP, "depth-deviation", 0 },
        /* cartridge runtime: 3600 s */
        { "cartridge runtime below the maximum", RUN, F_RUNTIME, 3599.999, F_NONE, 0, NONE, NULL, 0 },
        { "cartridge runtime at the maximum", RUN, F_RUNTIME, 3600, F_NONE, 0, TRIP, "cartridge-expired", 0 },
        { "cartridge runtime above the maximum", RUN, F_RUNTIME, 3600.001, F_NONE, 0, TRIP, "cartridge-expired", 0 },
        { "cartridge runtime, paused", PAUSED, F_RUNTIME, 4000, F_NONE, 0, NONE, NULL, 0 },
        /* speed on one sample starts the stall timer but does not trip */
        { "speed below the stall fraction, first sample", RUN, F_SPEED_ONCE, 74.99, F_NONE, 0, NONE, NULL, 0 },
};

static void apply(nd_proto_sample *s, nd_interlock_input *in, field f, double v) {
        switch (f) {
        case F_NONE: break;
        case F_FAULTS: s->faults = (uint8_t) v; break;
        case F_BATTERY: s->battery_percent = (unsigned) v; break;
        case F_TEMPERATURE: s->temperature_c = v; break;
        case F_CURRENT: s->current_ma = v; break;
        case F_DEPTH: s->depth_mm = v; break;
        case F_RUNTIME: in->cartridge_runtime_s = v; break;
        case F_SPEED_ONCE: s->speed_hz = v; break;
        }
}

START_TEST(test_sample_boundaries) {
        const sample_row *row = &sample_rows[_i];
        nd_limits l = make_limits();
        nd_interlock_input in = running_input();
        nd_interlock_session ss = settled_session();
        nd_proto_sample s = good_sample(SETTLED_TS);
        nd_interlock_result res;

        in.phase = row->phase;
        apply(&s, &in, row->f, row->value);
        apply(&s, &in, row->f2, row->value2);
        nd_interlock_verdict v = nd_interlock_check_sample(&l, &in, &s, 5000000, &ss, &res);
        ck_assert_msg(v == row->verdict, "%s: verdict %s, expected %s", row->what, nd_interlock_verdict_to_string(v),
                      nd_interlock_verdict_to_string(row->verdict));
        if (row->code) {
                ck_assert_ptr_nonnull(res.code);
                ck_assert_msg(STREQ(res.code, row->code), "%s: code %s, expected %s", row->what, res.code, row->code);
                ck_assert_msg(res.message[0] != '\0', "%s: a trip says why", row->what);
        } else {
                ck_assert_msg(res.code == NULL, "%s: no code expected, got %s", row->what, res.code);
                ck_assert_msg(res.warnings == row->warnings, "%s: warnings %#x, expected %#x", row->what, res.warnings,
                              row->warnings);
        }
}
END_TEST

/* No limits in force: a session trips (fail closed), whatever the sample; an idle pen trips
 * only on its own fault bits (nothing can arm or start it without limits). */
START_TEST(test_sample_without_limits_trips) {
        static const nd_interlock_phase phases[] = { PAUSED, RUN };
        nd_interlock_input in = running_input();
        nd_interlock_session ss = settled_session();
        nd_proto_sample s = good_sample(SETTLED_TS);
        nd_interlock_result res;
        in.phase = phases[_i];
        ck_assert_int_eq(nd_interlock_check_sample(NULL, &in, &s, 1, &ss, &res), TRIP);
        ck_assert_str_eq(res.code, ND_INTERLOCK_CODE_NO_LIMITS);
        in.phase = IDLE;
        ck_assert_int_eq(nd_interlock_check_sample(NULL, &in, &s, 1, &ss, &res), NONE);
        ck_assert_ptr_null(res.code);
        s.faults = ND_PROTO_FAULT_OVER_CURRENT;
        ck_assert_int_eq(nd_interlock_check_sample(NULL, &in, &s, 1, &ss, &res), TRIP);
        ck_assert_str_eq(res.code, "over-current");
}
END_TEST

/* The messages name the values and the limits. */
START_TEST(test_trip_messages_name_value_and_limit) {
        nd_limits l = make_limits();
        nd_interlock_input in = running_input();
        nd_interlock_session ss = settled_session();
        nd_proto_sample s = good_sample(SETTLED_TS);
        nd_interlock_result res;
        s.temperature_c = 44.5;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1, &ss, &res), TRIP);
        ck_assert_ptr_nonnull(strstr(res.message, "44.50"));
        ck_assert_ptr_nonnull(strstr(res.message, "43.00"));
        s = good_sample(SETTLED_TS);
        in.cartridge_runtime_s = 3600;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1, &ss, &res), TRIP);
        ck_assert_ptr_nonnull(strstr(res.message, "CART-1"));
        in.cartridge_id = NULL;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1, &ss, &res), TRIP);
        ck_assert_str_eq(res.code, "cartridge-expired");
}
END_TEST

/* ---- stall timing: 250 ms below 75 % of the set speed, on the extended device clock ----------------- */

typedef struct stall_row {
        const char *what;
        uint32_t change_ts;       /* when the speed change took effect (pen clock) */
        uint64_t device_time0_us; /* extended device time of the first slow sample */
        double speed_hz;          /* of both slow samples */
        uint64_t after_us;        /* the second slow sample, this long after the first */
        nd_interlock_verdict verdict;
} stall_row;

#define NEAR_WRAP (UINT32_MAX - 100000u)

static const stall_row stall_rows[] = {
        { "at the fraction: no stall", CHANGE_TS, 5000000, 75.0, 1000000, NONE },
        { "just below, one µs short", CHANGE_TS, 5000000, 74.99, 249999, NONE },
        { "just below, at the stall time", CHANGE_TS, 5000000, 74.99, 250000, TRIP },
        { "just below, past the stall time", CHANGE_TS, 5000000, 74.99, 250001, TRIP },
        { "stopped, at the stall time", CHANGE_TS, 5000000, 0.0, 250000, TRIP },
        /* the pen's 32-bit clock wraps between the two samples; the extended time does not */
        { "across the wrap, short", NEAR_WRAP, (UINT64_C(1) << 32) - 50000, 10.0, 249999, NONE },
        { "across the wrap, at the stall time", NEAR_WRAP, (UINT64_C(1) << 32) - 50000, 10.0, 250000, TRIP },
        /* a stall that begins at device time 0 is timed all the same */
        { "from device time 0 (timed from 1 µs), short", CHANGE_TS, 0, 10.0, 250000, NONE },
        { "from device time 0 (timed from 1 µs), at the stall time", CHANGE_TS, 0, 10.0, 250001, TRIP },
};

START_TEST(test_stall_timing) {
        const stall_row *row = &stall_rows[_i];
        nd_limits l = make_limits();
        nd_interlock_input in = running_input();
        nd_interlock_session ss = { 0 };
        nd_interlock_result res;
        nd_interlock_settle_from(&ss, row->change_ts);
        uint32_t ts0 = row->change_ts + ND_INTERLOCK_SPINUP_GRACE_US;
        nd_proto_sample s = good_sample(ts0);
        s.speed_hz = row->speed_hz;
        s.depth_mm = in.set_depth_mm;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, row->device_time0_us, &ss, &res), NONE);
        s.timestamp_us = ts0 + (uint32_t) row->after_us;
        nd_interlock_verdict v = nd_interlock_check_sample(&l, &in, &s, row->device_time0_us + row->after_us, &ss, &res);
        ck_assert_msg(v == row->verdict, "%s: %s", row->what, nd_interlock_verdict_to_string(v));
        if (v == TRIP)
                ck_assert_str_eq(res.code, "motor-stall");
}
END_TEST

/* A sample at speed in between resets the timer: the stall time counts again from the next slow one. */
START_TEST(test_stall_timer_resets_at_speed) {
        nd_limits l = make_limits();
        nd_interlock_input in = running_input();
        nd_interlock_session ss = settled_session();
        nd_interlock_result res;
        nd_proto_sample s = good_sample(SETTLED_TS);
        s.speed_hz = 50;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1000000, &ss, &res), NONE);
        ck_assert_uint_eq(ss.stall_since_us, 1000000);
        s.speed_hz = 100;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1200000, &ss, &res), NONE);
        ck_assert_uint_eq(ss.stall_since_us, 0);
        s.speed_hz = 50;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1300000, &ss, &res), NONE);
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1549999, &ss, &res), NONE);
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 1550000, &ss, &res), TRIP);
        /* paused: no stall check, and the timer is not touched by the battery-only checks */
        in.phase = PAUSED;
        ss = settled_session();
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 9000000, &ss, &res), NONE);
        ck_assert_uint_eq(ss.stall_since_us, 0);
}
END_TEST

/* ---- the settle (depth) and spin-up (stall) windows, across the wrap ------------------------------ */

typedef struct window_row {
        const char *what;
        bool known;          /* the pen said when the change took effect */
        uint32_t change_ts;
        uint32_t offset_us;  /* of the sample after the change */
        bool check_depth;    /* a deviating depth: trip expected? */
        bool check_stall;    /* a slow speed starts the stall timer? */
} window_row;

static const window_row window_rows[] = {
        { "not known yet", false, CHANGE_TS, 10000000, false, false },
        { "settle: one µs short", true, CHANGE_TS, ND_INTERLOCK_DEPTH_SETTLE_US - 1, false, false },
        { "settle: at the end", true, CHANGE_TS, ND_INTERLOCK_DEPTH_SETTLE_US, true, false },
        { "spin-up: one µs short", true, CHANGE_TS, ND_INTERLOCK_SPINUP_GRACE_US - 1, true, false },
        { "spin-up: at the end", true, CHANGE_TS, ND_INTERLOCK_SPINUP_GRACE_US, true, true },
        { "wrap: settle one µs short", true, UINT32_MAX - 1000, ND_INTERLOCK_DEPTH_SETTLE_US - 1, false, false },
        { "wrap: settle at the end", true, UINT32_MAX - 1000, ND_INTERLOCK_DEPTH_SETTLE_US, true, false },
        { "wrap: spin-up one µs short", true, UINT32_MAX - 1000, ND_INTERLOCK_SPINUP_GRACE_US - 1, true, false },
        { "wrap: spin-up at the end", true, UINT32_MAX - 1000, ND_INTERLOCK_SPINUP_GRACE_US, true, true },
        { "a sample from before the change", true, CHANGE_TS + 500000, (uint32_t) -1000, false, false },
};

START_TEST(test_windows) {
        const window_row *row = &window_rows[_i];
        nd_limits l = make_limits();
        nd_interlock_input in = running_input();
        nd_interlock_session ss = { 0 };
        nd_interlock_result res;
        if (row->known)
                nd_interlock_settle_from(&ss, row->change_ts);
        else {
                nd_interlock_settle_from(&ss, row->change_ts);
                nd_interlock_settle_begin(&ss);
                ck_assert(!ss.settle_known);
        }
        nd_proto_sample s = good_sample(row->change_ts + row->offset_us);
        s.depth_mm = 2.0;
        nd_interlock_verdict v = nd_interlock_check_sample(&l, &in, &s, 7000000, &ss, &res);
        ck_assert_msg((v == TRIP) == row->check_depth, "%s: depth %s", row->what, nd_interlock_verdict_to_string(v));
        s.depth_mm = in.set_depth_mm;
        s.speed_hz = 10;
        ss.stall_since_us = 0;
        ck_assert_int_eq(nd_interlock_check_sample(&l, &in, &s, 7000000, &ss, &res), NONE);
        ck_assert_msg((ss.stall_since_us != 0) == row->check_stall, "%s: stall timer %llu", row->what,
                      (unsigned long long) ss.stall_since_us);
}
END_TEST

START_TEST(test_clock_reached) {
        ck_assert(nd_interlock_clock_reached(100, 100));
        ck_assert(nd_interlock_clock_reached(101, 100));
        ck_assert(!nd_interlock_clock_reached(99, 100));
        ck_assert(nd_interlock_clock_reached(5, UINT32_MAX - 5));          /* across the wrap */
        ck_assert(!nd_interlock_clock_reached(UINT32_MAX - 5, 5));
        ck_assert(nd_interlock_clock_reached(INT32_MAX, 0));               /* just under half the clock */
        ck_assert(!nd_interlock_clock_reached((uint32_t) INT32_MAX + 1, 0)); /* half the clock: behind */
}
END_TEST

/* ---- duration ----------------------------------------------------------------------------------- */

typedef struct duration_row {
        const char *what;
        const char *area;
        double profile_s;
        double elapsed_s;
        nd_interlock_verdict verdict;
} duration_row;

#define COMPLETE ND_INTERLOCK_COMPLETE

static const duration_row duration_rows[] = {
        { "profile: one ms short", NULL, 600, 599.999, NONE },
        { "profile: at its duration", NULL, 600, 600, COMPLETE },
        { "profile: past its duration", NULL, 600, 600.001, COMPLETE },
        { "session max: one ms short", NULL, 3000, 2699.999, NONE },
        { "session max: at it", NULL, 3000, 2700, TRIP },
        { "session max: past it", NULL, 3000, 2700.001, TRIP },
        { "area max: one ms short", "cheeks", 600, 299.999, NONE },
        { "area max: at it", "cheeks", 600, 300, TRIP },
        { "area max: past it", "cheeks", 600, 300.001, TRIP },
        { "area without its own max", "scalp", 3000, 2700, TRIP },
        { "area without its own max, short", "scalp", 3000, 2699.999, NONE },
        { "unknown area: the session max", "elbow", 3000, 2700, TRIP },
        { "both at once: the profile completes", "cheeks", 300, 300, COMPLETE },
};

START_TEST(test_duration) {
        const duration_row *row = &duration_rows[_i];
        nd_limits l = make_limits();
        nd_interlock_result res;
        nd_interlock_verdict v = nd_interlock_check_duration(&l, row->area, row->profile_s, row->elapsed_s, &res);
        ck_assert_msg(v == row->verdict, "%s: %s", row->what, nd_interlock_verdict_to_string(v));
        if (v == TRIP) {
                ck_assert_str_eq(res.code, "session-duration");
                ck_assert_ptr_nonnull(strstr(res.message, row->area && STREQ(row->area, "cheeks") ? "300" : "2700"));
        } else
                ck_assert_ptr_null(res.code);
}
END_TEST

START_TEST(test_duration_without_limits_trips) {
        nd_interlock_result res;
        ck_assert_int_eq(nd_interlock_check_duration(NULL, "cheeks", 600, 0, &res), TRIP);
        ck_assert_str_eq(res.code, ND_INTERLOCK_CODE_NO_LIMITS);
}
END_TEST

/* ---- cartridge ------------------------------------------------------------------------------------ */

START_TEST(test_cartridge) {
        nd_limits l = make_limits();
        ck_assert(nd_interlock_needles_allowed(&l, 12));
        ck_assert(nd_interlock_needles_allowed(&l, 36));
        ck_assert(!nd_interlock_needles_allowed(&l, 11));
        ck_assert(!nd_interlock_needles_allowed(&l, 13));
        ck_assert(!nd_interlock_needles_allowed(NULL, 12));
        ck_assert(!nd_interlock_cartridge_runtime_used_up(&l, 3599.999));
        ck_assert(nd_interlock_cartridge_runtime_used_up(&l, 3600));
        ck_assert(nd_interlock_cartridge_runtime_used_up(&l, 3600.001));
        ck_assert(nd_interlock_cartridge_runtime_used_up(NULL, 0));
        l.cartridge.max_runtime_s = 0; /* no runtime cap */
        ck_assert(!nd_interlock_cartridge_runtime_used_up(&l, 1e9));
}
END_TEST

/* ---- warnings --------------------------------------------------------------------------------------- */

START_TEST(test_warnings) {
        nd_limits l = make_limits();
        ck_assert_uint_eq(nd_interlock_warnings(&l, true, 40.99, 20), 0);
        ck_assert_uint_eq(nd_interlock_warnings(&l, true, 41, 20), WT);
        ck_assert_uint_eq(nd_interlock_warnings(&l, true, 40.99, 19), WB);
        ck_assert_uint_eq(nd_interlock_warnings(&l, true, 57.8, 0), WT | WB);
        ck_assert_uint_eq(nd_interlock_warnings(&l, false, 57.8, 0), 0);
        ck_assert_uint_eq(nd_interlock_warnings(NULL, true, 57.8, 0), 0);
}
END_TEST

/* ---- preconditions: arm, start, resume ----------------------------------------------------------------- */

static nd_interlock_pen ready_pen(void) {
        return (nd_interlock_pen) {
                .armed = true, .cartridge_present = true, .profile_valid = true, .have_sample = true,
                .silent_us = 1000, .temperature_c = 35, .battery_percent = 80,
        };
}

typedef enum pen_field {
        P_NONE, P_NO_LIMITS, P_IN_FAULT, P_PEN_FAULTS, P_NOT_ARMED, P_BUSY, P_NO_CARTRIDGE, P_PROFILE_INVALID,
        P_REJECTED, P_SPENT, P_BATTERY, P_TEMPERATURE,
} pen_field;

typedef struct pre_row {
        const char *what;
        pen_field f, f2;
        double value;         /* P_BATTERY, P_TEMPERATURE */
        nd_interlock_refusal arm, start, resume;
} pre_row;

#define OK ND_INTERLOCK_ALLOWED
#define R_LIMITS ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE
#define R_FAULT ND_INTERLOCK_REFUSE_FAULT
#define R_STATE ND_INTERLOCK_REFUSE_WRONG_STATE
#define R_CART ND_INTERLOCK_REFUSE_NO_CARTRIDGE
#define R_PROFILE ND_INTERLOCK_REFUSE_INVALID_PROFILE
#define R_REJECTED ND_INTERLOCK_REFUSE_CARTRIDGE_REJECTED
#define R_SPENT ND_INTERLOCK_REFUSE_CARTRIDGE_SPENT
#define R_BATTERY ND_INTERLOCK_REFUSE_LOW_BATTERY
#define R_HOT ND_INTERLOCK_REFUSE_OVER_TEMPERATURE

static const pre_row pre_rows[] = {
        { "ready", P_NONE, P_NONE, 0, OK, OK, OK },
        { "no limits", P_NO_LIMITS, P_NONE, 0, R_LIMITS, R_LIMITS, R_LIMITS },
        { "no limits and in fault", P_NO_LIMITS, P_IN_FAULT, 0, R_FAULT, R_LIMITS, R_LIMITS },
        { "in fault", P_IN_FAULT, P_NONE, 0, R_FAULT, R_FAULT, OK },
        { "the pen's own fault latched", P_PEN_FAULTS, P_NONE, 0, R_FAULT, R_FAULT, OK },
        { "latched fault before wrong state", P_PEN_FAULTS, P_NOT_ARMED, 0, R_FAULT, R_FAULT, OK },
        { "not armed", P_NOT_ARMED, P_NONE, 0, OK, R_STATE, OK },
        { "busy", P_BUSY, P_NONE, 0, R_STATE, R_STATE, OK },
        { "fault before busy", P_IN_FAULT, P_BUSY, 0, R_FAULT, R_FAULT, OK },
        { "no cartridge", P_NO_CARTRIDGE, P_NONE, 0, OK, R_CART, OK },
        { "wrong state before no cartridge", P_NOT_ARMED, P_NO_CARTRIDGE, 0, OK, R_STATE, OK },
        { "profile no longer valid", P_PROFILE_INVALID, P_NONE, 0, OK, R_PROFILE, OK },
        { "no cartridge before the profile", P_NO_CARTRIDGE, P_PROFILE_INVALID, 0, OK, R_CART, OK },
        { "cartridge rejected", P_REJECTED, P_NONE, 0, OK, R_REJECTED, OK },
        { "profile before the cartridge's needles", P_PROFILE_INVALID, P_REJECTED, 0, OK, R_PROFILE, OK },
        { "cartridge spent", P_SPENT, P_NONE, 0, OK, R_SPENT, OK },
        { "rejected before spent", P_REJECTED, P_SPENT, 0, OK, R_REJECTED, OK },
        { "battery at the minimum", P_BATTERY, P_NONE, 20, OK, OK, OK },
        { "battery below the minimum", P_BATTERY, P_NONE, 19, OK, R_BATTERY, R_BATTERY },
        { "battery above the minimum", P_BATTERY, P_NONE, 21, OK, OK, OK },
        { "spent before the battery", P_SPENT, P_BATTERY, 0, OK, R_SPENT, R_BATTERY },
        { "temperature at the maximum", P_TEMPERATURE, P_NONE, 43, OK, OK, OK },
        { "temperature above the maximum", P_TEMPERATURE, P_NONE, 43.01, OK, OK, R_HOT },
        { "temperature below the maximum", P_TEMPERATURE, P_NONE, 42.99, OK, OK, OK },
};

static void apply_pen(nd_interlock_pen *p, const nd_limits **l, pen_field f, double v) {
        switch (f) {
        case P_NONE: break;
        case P_NO_LIMITS: *l = NULL; break;
        case P_IN_FAULT: p->in_fault = true; p->fault = "motor-stall"; break;
        case P_PEN_FAULTS: p->pen_faults = ND_PROTO_FAULT_OVER_TEMPERATURE; break;
        case P_NOT_ARMED: p->armed = false; break;
        case P_BUSY: p->busy = true; break;
        case P_NO_CARTRIDGE: p->cartridge_present = false; break;
        case P_PROFILE_INVALID: p->profile_valid = false; break;
        case P_REJECTED: p->cartridge_rejected = true; break;
        case P_SPENT: p->cartridge_spent = true; break;
        case P_BATTERY: p->battery_percent = (uint32_t) v; break;
        case P_TEMPERATURE: p->temperature_c = v; break;
        }
}

START_TEST(test_preconditions) {
        const pre_row *row = &pre_rows[_i];
        nd_limits limits = make_limits();
        const nd_limits *l = &limits;
        nd_interlock_pen p = ready_pen();
        apply_pen(&p, &l, row->f, row->value);
        apply_pen(&p, &l, row->f2, row->f2 == P_BATTERY ? 19 : row->value);
        nd_interlock_refusal arm = nd_interlock_may_arm(l, &p);
        nd_interlock_refusal start = nd_interlock_may_start(l, &p);
        nd_interlock_refusal resume = nd_interlock_may_resume(l, &p);
        ck_assert_msg(arm == row->arm, "%s: arm %s", row->what, nd_interlock_refusal_to_string(arm));
        ck_assert_msg(start == row->start, "%s: start %s", row->what, nd_interlock_refusal_to_string(start));
        ck_assert_msg(resume == row->resume, "%s: resume %s", row->what, nd_interlock_refusal_to_string(resume));
}
END_TEST

/* ---- fault clearing: fresh telemetry, temperature hysteresis, battery -------------------------------- */

typedef struct clear_row {
        const char *what;
        const char *fault;
        bool have_sample;
        uint64_t silent_us;
        double temperature_c;
        uint32_t battery_percent;
        bool may;
        const char *why_has;    /* a word of the reason when refused */
} clear_row;

static const clear_row clear_rows[] = {
        { "all fine", "motor-stall", true, 1000, 35, 80, true, NULL },
        { "no telemetry yet", "motor-stall", false, 0, 35, 80, false, "no telemetry" },
        { "silent for the heartbeat timeout", "motor-stall", true, 500000, 35, 80, true, NULL },
        { "silent one µs longer", "motor-stall", true, 500001, 35, 80, false, "no telemetry" },
        /* over-temperature clears only below the warning level (hysteresis) */
        { "over-temperature, at the warning", "over-temperature", true, 1000, 41, 80, false, "41.0" },
        { "over-temperature, below the warning", "over-temperature", true, 1000, 40.99, 80, true, NULL },
        { "over-temperature, above the warning", "over-temperature", true, 1000, 41.01, 80, false, "41.0" },
        /* any other fault clears below the maximum */
        { "other fault, at the maximum", "depth-deviation", true, 1000, 43, 80, false, "43.0" },
        { "other fault, below the maximum", "depth-deviation", true, 1000, 42.99, 80, true, NULL },
        { "other fault, between warning and maximum", "depth-deviation", true, 1000, 42, 80, true, NULL },
        { "no fault code, below the maximum", NULL, true, 1000, 42.99, 80, true, NULL },
        /* battery: at the cut-off is enough */
        { "battery at the cut-off", "low-battery", true, 1000, 35, 5, true, NULL },
        { "battery below the cut-off", "low-battery", true, 1000, 35, 4, false, "battery" },
        { "battery above the cut-off", "low-battery", true, 1000, 35, 6, true, NULL },
};

START_TEST(test_clear_fault) {
        const clear_row *row = &clear_rows[_i];
        nd_limits l = make_limits();
        nd_interlock_pen p = {
                .in_fault = true, .fault = row->fault, .have_sample = row->have_sample, .silent_us = row->silent_us,
                .temperature_c = row->temperature_c, .battery_percent = row->battery_percent,
        };
        char why[128] = "";
        bool may = nd_interlock_may_clear_fault(&l, &p, why, sizeof why);
        ck_assert_msg(may == row->may, "%s: %s (%s)", row->what, may ? "may" : "may not", why);
        if (row->why_has)
                ck_assert_msg(strstr(why, row->why_has), "%s: '%s' lacks '%s'", row->what, why, row->why_has);
}
END_TEST

START_TEST(test_clear_fault_without_limits) {
        nd_interlock_pen p = { .in_fault = true, .fault = "motor-stall", .have_sample = true, .temperature_c = 20,
                               .battery_percent = 100 };
        char why[64];
        ck_assert(!nd_interlock_may_clear_fault(NULL, &p, why, sizeof why));
        ck_assert_ptr_nonnull(strstr(why, "no limits"));
}
END_TEST

/* ---- the pen's latched fault bits ------------------------------------------------------------------- */

START_TEST(test_pen_fault_code) {
        ck_assert_ptr_null(nd_interlock_pen_fault_code(0));
        ck_assert_str_eq(nd_interlock_pen_fault_code(0x01), "over-temperature");
        ck_assert_str_eq(nd_interlock_pen_fault_code(0x3e), "motor-stall");
        ck_assert_str_eq(nd_interlock_pen_fault_code(0x20), "low-battery");
        ck_assert_ptr_null(nd_interlock_pen_fault_code(0x80)); /* no known bit */
}
END_TEST

/* Only the watchdog's trace alone, the motor stopped, is cleared at connect. */
START_TEST(test_clear_at_connect) {
        static const struct {
                uint8_t faults;
                bool motor_running, clear;
        } rows[] = {
                { 0, false, false },                                             /* nothing latched */
                { ND_PROTO_FAULT_WATCHDOG_EXPIRED, false, true },
                { ND_PROTO_FAULT_WATCHDOG_EXPIRED, true, false },                /* the motor runs */
                { ND_PROTO_FAULT_WATCHDOG_EXPIRED | ND_PROTO_FAULT_OVER_TEMPERATURE, false, false },
                { ND_PROTO_FAULT_OVER_TEMPERATURE, false, false },
                { ND_PROTO_FAULT_ALL, false, false },
                { 0x80, false, false },                                          /* an unknown bit */
                { ND_PROTO_FAULT_WATCHDOG_EXPIRED | 0x80, false, false },
        };
        for (size_t i = 0; i < ELEMENTSOF(rows); i++)
                ck_assert_msg(nd_interlock_clear_at_connect(rows[i].faults, rows[i].motor_running) == rows[i].clear,
                              "row %zu: faults 0x%02x motor %d", i, rows[i].faults, rows[i].motor_running);
}
END_TEST

/* The queue catching up after a clear: 100 ms always, then until a clean sample, at most the
 * heartbeat timeout (500 ms in the test limits unless set). */
START_TEST(test_clear_settling) {
        nd_limits l = make_limits();
        l.pen.heartbeat_timeout_ms = 500;
        static const struct {
                bool no_limits, clean;
                uint64_t since_us;
                bool settling;
        } rows[] = {
                { false, false, 0, true },
                { false, true, 0, true },
                { false, true, ND_INTERLOCK_CLEAR_GRACE_US - 1, true },
                { false, true, ND_INTERLOCK_CLEAR_GRACE_US, false },      /* clean and past 100 ms */
                { false, false, ND_INTERLOCK_CLEAR_GRACE_US, true },      /* not clean yet */
                { false, false, 499999, true },
                { false, false, 500000, false },                          /* the bound: at */
                { false, false, 500001, false },
                { true, false, ND_INTERLOCK_CLEAR_GRACE_US - 1, true },   /* no limits: 100 ms only */
                { true, false, ND_INTERLOCK_CLEAR_GRACE_US, false },
        };
        for (size_t i = 0; i < ELEMENTSOF(rows); i++)
                ck_assert_msg(nd_interlock_clear_settling(rows[i].no_limits ? NULL : &l, rows[i].clean, rows[i].since_us) ==
                                      rows[i].settling,
                              "row %zu", i);
}
END_TEST

/* ---- the enum-to-string tables: every value named, distinct names, nothing past the end -------------- */

static void check_table(const char *(*fn)(unsigned), unsigned max) {
        for (unsigned i = 0; i < max; i++) {
                const char *a = fn(i);
                ck_assert_msg(a && *a, "value %u has no name", i);
                for (unsigned j = 0; j < i; j++)
                        ck_assert_msg(!STREQ(a, fn(j)), "values %u and %u are both '%s'", j, i, a);
        }
        ck_assert_ptr_null(fn(max));
        ck_assert_ptr_null(fn(max + 100));
}

static const char *verdict_name(unsigned v) { return nd_interlock_verdict_to_string((nd_interlock_verdict) v); }
static const char *phase_name(unsigned v) { return nd_interlock_phase_to_string((nd_interlock_phase) v); }
static const char *refusal_name(unsigned v) { return nd_interlock_refusal_to_string((nd_interlock_refusal) v); }

START_TEST(test_string_tables) {
        check_table(verdict_name, _ND_INTERLOCK_VERDICT_MAX);
        check_table(phase_name, _ND_INTERLOCK_PHASE_MAX);
        check_table(refusal_name, _ND_INTERLOCK_REFUSAL_MAX);
        ck_assert_str_eq(nd_interlock_refusal_to_string(ND_INTERLOCK_REFUSE_FAULT), "fault");
        ck_assert_str_eq(nd_interlock_verdict_to_string(ND_INTERLOCK_TRIP), "trip");
}
END_TEST

/* ---- invariants: a caller's mistake aborts, it never judges garbage ------------------------------ */

/* A failed assertion aborts; the test child turns the abort into this exit status, so that a
 * coverage build (-Db_coverage=true) still writes its data at exit (an abort writes none). */
#define ABORTED_EXIT_STATUS 99

static void exit_on_abort(int sig) {
        exit(ABORTED_EXIT_STATUS);
}

START_TEST(test_invariants_abort) {
        signal(SIGABRT, exit_on_abort);
        nd_limits l = make_limits();
        nd_interlock_input in = running_input();
        nd_interlock_session ss = { 0 };
        nd_proto_sample s = good_sample(0);
        nd_interlock_result res;
        nd_interlock_pen p = ready_pen();
        char why[8];
        switch (_i) {
        case 0: nd_interlock_settle_begin(NULL); break;
        case 1: nd_interlock_settle_from(NULL, 0); break;
        case 2: (void) nd_interlock_check_sample(&l, NULL, &s, 0, &ss, &res); break;
        case 3: (void) nd_interlock_check_sample(&l, &in, NULL, 0, &ss, &res); break;
        case 4: (void) nd_interlock_check_sample(&l, &in, &s, 0, NULL, &res); break;
        case 5: (void) nd_interlock_check_sample(&l, &in, &s, 0, &ss, NULL); break;
        case 6: in.phase = _ND_INTERLOCK_PHASE_MAX; (void) nd_interlock_check_sample(&l, &in, &s, 0, &ss, &res); break;
        case 7: (void) nd_interlock_check_duration(&l, NULL, 1, 0, NULL); break;
        case 8: (void) nd_interlock_may_arm(&l, NULL); break;
        case 9: (void) nd_interlock_may_start(&l, NULL); break;
        case 10: (void) nd_interlock_may_resume(&l, NULL); break;
        case 11: (void) nd_interlock_may_clear_fault(&l, NULL, why, sizeof why); break;
        case 12: (void) nd_interlock_may_clear_fault(&l, &p, NULL, sizeof why); break;
        case 13: (void) nd_interlock_may_clear_fault(&l, &p, why, 0); break;
        default: break;
        }
}
END_TEST
#define N_INVARIANTS 14

Suite *nd_test_suite(void) {
        Suite *s = suite_create("interlocks");
        TCase *tc = tcase_create("sample");
        tcase_add_loop_test(tc, test_sample_boundaries, 0, (int) ELEMENTSOF(sample_rows));
        tcase_add_loop_test(tc, test_sample_without_limits_trips, 0, 2);
        tcase_add_test(tc, test_trip_messages_name_value_and_limit);
        suite_add_tcase(s, tc);

        tc = tcase_create("timing");
        tcase_add_loop_test(tc, test_stall_timing, 0, (int) ELEMENTSOF(stall_rows));
        tcase_add_test(tc, test_stall_timer_resets_at_speed);
        tcase_add_loop_test(tc, test_windows, 0, (int) ELEMENTSOF(window_rows));
        tcase_add_test(tc, test_clock_reached);
        suite_add_tcase(s, tc);

        tc = tcase_create("session");
        tcase_add_loop_test(tc, test_duration, 0, (int) ELEMENTSOF(duration_rows));
        tcase_add_test(tc, test_duration_without_limits_trips);
        tcase_add_test(tc, test_cartridge);
        tcase_add_test(tc, test_warnings);
        suite_add_tcase(s, tc);

        tc = tcase_create("preconditions");
        tcase_add_loop_test(tc, test_preconditions, 0, (int) ELEMENTSOF(pre_rows));
        tcase_add_loop_test(tc, test_clear_fault, 0, (int) ELEMENTSOF(clear_rows));
        tcase_add_test(tc, test_clear_fault_without_limits);
        tcase_add_test(tc, test_pen_fault_code);
        tcase_add_test(tc, test_clear_at_connect);
        tcase_add_test(tc, test_clear_settling);
        tcase_add_test(tc, test_string_tables);
        suite_add_tcase(s, tc);

        /* Abort tests need Check's fork mode: not under ASan or valgrind (CK_FORK=no). */
        const char *fork_mode = getenv("CK_FORK");
        if (!fork_mode || !STREQ(fork_mode, "no")) {
                tc = tcase_create("invariants");
                tcase_add_loop_exit_test(tc, test_invariants_abort, ABORTED_EXIT_STATUS, 0, N_INVARIANTS);
                suite_add_tcase(s, tc);
        }
        return s;
}
