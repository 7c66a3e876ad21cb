/* test-pendev.c: the pen device layer over the simulated transport (the pen model in-process)
 * and over a scripted transport the test answers byte by byte: opening and refusal, commands and
 * their ordering, telemetry order/gaps/duplicates/wrap-around, heartbeats and the pen's
 * watchdog, departure, and freeing from inside every kind of callback. */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check-main.h"
#include "pendev.h"
#include "penmodel.h"
#include "protocol.h"
#include "transport-sim.h"
#include "util.h"

#define TIMEOUT_MS 5000u

/* ---- recording callbacks ---------------------------------------------------------------------- */

typedef struct Rec {
        nd_pendev *p;                /* NULL once freed by the test */
        bool ready;
        unsigned errors[_ND_PENDEV_ERROR_KIND_MAX];
        int last_error[_ND_PENDEV_ERROR_KIND_MAX];
        uint64_t last_count[_ND_PENDEV_ERROR_KIND_MAX];
        bool last_fatal[_ND_PENDEV_ERROR_KIND_MAX];
        uint64_t samples;
        uint32_t seq[64];            /* the first sequence numbers delivered */
        bool have_seq;
        uint32_t last_seq;
        unsigned out_of_order;
        uint64_t last_time_us;
        bool after_free;             /* a callback ran after the pendev was freed */
        /* free the pendev from inside this callback */
        bool free_in_ready, free_in_samples;
        int free_in_error;           /* kind + 1, 0: never */
} Rec;

static void rec_check_alive(Rec *r, nd_pendev *p) {
        if (!r->p)
                r->after_free = true;
        ck_assert_ptr_eq(r->p, p);
}

static void on_ready(nd_pendev *p, void *userdata) {
        Rec *r = userdata;
        rec_check_alive(r, p);
        r->ready = true;
        if (r->free_in_ready)
                r->p = nd_pendev_free(p);
}

static void on_samples(nd_pendev *p, const nd_pendev_sample *s, size_t n, void *userdata) {
        Rec *r = userdata;
        rec_check_alive(r, p);
        ck_assert_uint_ge(n, 1);
        ck_assert_uint_le(n, ND_PROTO_SAMPLES_PER_PACKET_MAX);
        for (size_t i = 0; i < n; i++) {
                if (r->have_seq && s[i].s.sequence != r->last_seq + 1)
                        r->out_of_order++;
                if (r->have_seq && s[i].device_time_us < r->last_time_us)
                        r->out_of_order++;
                if (r->samples < ELEMENTSOF(r->seq))
                        r->seq[r->samples] = s[i].s.sequence;
                r->have_seq = true;
                r->last_seq = s[i].s.sequence;
                r->last_time_us = s[i].device_time_us;
                r->samples++;
        }
        if (r->free_in_samples)
                r->p = nd_pendev_free(p);
}

static void on_error(nd_pendev *p, const nd_pendev_error *e, void *userdata) {
        Rec *r = userdata;
        rec_check_alive(r, p);
        ck_assert_uint_lt(e->kind, _ND_PENDEV_ERROR_KIND_MAX);
        ck_assert_ptr_nonnull(e->message);
        ck_assert_uint_gt(strlen(e->message), 10);
        ck_assert_int_lt(e->error, 0);
        r->errors[e->kind]++;
        r->last_error[e->kind] = e->error;
        r->last_count[e->kind] = e->count;
        r->last_fatal[e->kind] = e->fatal;
        if (r->free_in_error == (int) e->kind + 1)
                r->p = nd_pendev_free(p);
}

static const nd_pendev_callbacks callbacks = {
        .ready = on_ready,
        .samples = on_samples,
        .error = on_error,
};

typedef struct Done {
        unsigned calls;
        int status;
        unsigned order;              /* completion order, from a shared counter */
        nd_proto_status st;
        nd_proto_cartridge cart;
} Done;

static unsigned completion_counter;

static void on_done(nd_pendev *p, int status, void *userdata) {
        Done *d = userdata;
        d->calls++;
        d->status = status;
        d->order = ++completion_counter;
}

static void on_status(nd_pendev *p, int status, const nd_proto_status *st, void *userdata) {
        Done *d = userdata;
        d->calls++;
        d->status = status;
        d->order = ++completion_counter;
        if (st)
                d->st = *st;
        else
                ck_assert_int_lt(status, 0);
}

static void on_cartridge(nd_pendev *p, int status, const nd_proto_cartridge *c, void *userdata) {
        Done *d = userdata;
        d->calls++;
        d->status = status;
        d->order = ++completion_counter;
        if (c)
                d->cart = *c;
}

/* ---- the loop --------------------------------------------------------------------------------- */

static uint64_t mono_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static unsigned slow_factor(void) {
        return getenv("NEEDLED_TEST_VALGRIND") ? 10 : getenv("NEEDLED_TEST_SANITIZED") ? 3 : 1;
}

typedef bool (*cond_fn)(void *arg);

static bool run_until(sd_event *e, cond_fn cond, void *arg, unsigned timeout_ms) {
        uint64_t deadline = mono_us() + (uint64_t) timeout_ms * slow_factor() * USEC_PER_MSEC;
        while (!cond(arg)) {
                if (mono_us() >= deadline)
                        return false;
                ck_assert_int_ge(sd_event_run(e, 10 * USEC_PER_MSEC), 0);
        }
        return true;
}

/* Runs the loop for ms; returns the longest time between two loop turns (µs). A host that stops
 * this process that long stops its heartbeat with it. */
static uint64_t run_for(sd_event *e, unsigned ms) {
        uint64_t now = mono_us(), deadline = now + (uint64_t) ms * USEC_PER_MSEC, longest = 0;
        while (now < deadline) {
                ck_assert_int_ge(sd_event_run(e, 10 * USEC_PER_MSEC), 0);
                uint64_t then = now;
                now = mono_us();
                longest = MAX(longest, now - then);
        }
        return longest;
}

static bool is_ready(void *arg) { return ((Rec *) arg)->ready; }
static bool is_done(void *arg) { return ((Done *) arg)->calls > 0; }

typedef struct ErrWait { Rec *r; nd_pendev_error_kind k; } ErrWait;
static bool has_error(void *arg) { ErrWait *w = arg; return w->r->errors[w->k] > 0; }
static bool two_in_a_row(void *arg) { ErrWait *w = arg; return w->r->last_count[w->k] >= 2; }

/* ---- simulated pen fixture --------------------------------------------------------------------- */

typedef struct Sim {
        sd_event *e;
        nd_penmodel *model;
        nd_transport *t;
        nd_pendev_config config;
        Rec rec;
} Sim;

static void sim_setup(Sim *s, const nd_penmodel_config *mc) {
        nd_penmodel_config def;
        *s = (Sim) { 0 };
        if (!mc) {
                nd_penmodel_config_init(&def);
                mc = &def;
        }
        ck_assert_int_eq(sd_event_new(&s->e), 0);
        ck_assert_int_eq(nd_penmodel_new(mc, mono_us(), &s->model), 0);
        ck_assert_int_eq(nd_transport_sim_new(s->e, s->model, &s->t), 0);
        nd_pendev_config_init(&s->config);
        s->config.heartbeat_timeout_ms = 300 * slow_factor();
        s->config.request_timeout_ms = 200 * slow_factor();
}

static void sim_open(Sim *s) {
        ck_assert_int_eq(nd_pendev_new(s->t, &s->config, &callbacks, &s->rec, &s->rec.p), 0);
        s->t = NULL; /* owned by the pendev */
}

static void sim_open_ready(Sim *s) {
        sim_open(s);
        ck_assert(run_until(s->e, is_ready, &s->rec, TIMEOUT_MS));
}

static void sim_teardown(Sim *s) {
        ck_assert(!s->rec.after_free);
        s->rec.p = nd_pendev_free(s->rec.p);
        nd_transport_free(s->t);
        nd_penmodel_unref(s->model);
        sd_event_unref(s->e);
}

static nd_penmodel_state model_state(Sim *s) {
        nd_penmodel_state st;
        nd_penmodel_advance(s->model, mono_us());
        nd_penmodel_get_state(s->model, &st);
        return st;
}

static void wait_done(Sim *s, Done *d) {
        ck_assert(run_until(s->e, is_done, d, TIMEOUT_MS));
}

static void call_ok(Sim *s, int (*call)(nd_pendev *, nd_pendev_done_fn, void *)) {
        Done d = { 0 };
        ck_assert_int_eq(call(s->rec.p, on_done, &d), 0);
        wait_done(s, &d);
        ck_assert_int_eq(d.status, 0);
}

/* How many windows fed_through() tries before it gives up on the host. */
#define FED_WINDOWS 10

/* Asserts that the heartbeat keeps a running motor's watchdog (watchdog_ms) fed through ms of
 * loop turns: the motor runs on, no watchdog fault, at least 3 heartbeats sent and none failed.
 * The heartbeat runs in this process, so a host that stops the process for half the watchdog or
 * longer stops it too, and the pen rightly stops its motor: a window like that proves nothing
 * about the heartbeat. It is run again, after the fault is cleared and the motor restarted, up
 * to FED_WINDOWS times; a window without such a stall must pass. */
static void fed_through(Sim *s, unsigned ms, unsigned watchdog_ms) {
        for (unsigned i = 0; i < FED_WINDOWS; i++) {
                nd_pendev_stats before, after;
                nd_pendev_get_stats(s->rec.p, &before);
                uint64_t longest = run_for(s->e, ms);
                nd_pendev_get_stats(s->rec.p, &after);
                nd_penmodel_state st = model_state(s);
                bool fed = st.motor_running && !(st.faults & ND_PROTO_FAULT_WATCHDOG_EXPIRED) &&
                           after.heartbeats_sent >= before.heartbeats_sent + 3 &&
                           after.heartbeats_failed == before.heartbeats_failed;
                if (fed)
                        return;
                if (longest < (uint64_t) watchdog_ms * USEC_PER_MSEC / 2) {
                        ck_assert(st.motor_running);
                        ck_assert_uint_eq(st.faults & ND_PROTO_FAULT_WATCHDOG_EXPIRED, 0);
                        ck_assert_uint_ge(after.heartbeats_sent, before.heartbeats_sent + 3);
                        ck_assert_uint_eq(after.heartbeats_failed, before.heartbeats_failed);
                }
                fprintf(stderr, "# window %u: this process stood still for %" PRIu64 " ms (watchdog %u ms): again\n",
                        i + 1, longest / USEC_PER_MSEC, watchdog_ms);
                call_ok(s, nd_pendev_clear_faults);
                call_ok(s, nd_pendev_motor_start);
        }
        ck_abort_msg("the host stopped this process for half the watchdog or longer in each of %u windows",
                     FED_WINDOWS);
}

/* ---- tests over the simulated pen --------------------------------------------------------------- */

START_TEST(test_open_ready) {
        Sim s;
        nd_penmodel_config mc;
        nd_penmodel_config_init(&mc);
        snprintf(mc.serial, sizeof mc.serial, "UNIT-7");
        mc.telemetry_rate_hz = 800;
        sim_setup(&s, &mc);
        s.config.telemetry_rate_hz = 250;
        sim_open(&s);

        /* nothing is accepted but a stop while opening */
        Done d = { 0 };
        ck_assert_int_eq(nd_pendev_get_state(s.rec.p), ND_PENDEV_OPENING);
        ck_assert_str_eq(nd_pendev_get_serial(s.rec.p), "");
        ck_assert_ptr_null(nd_pendev_get_identity(s.rec.p));
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, 1.0, on_done, &d), -EAGAIN);
        ck_assert_int_eq(nd_pendev_query_status(s.rec.p, on_status, &d), -EAGAIN);
        ck_assert_int_eq(nd_pendev_motor_stop(s.rec.p, on_done, &d), 0);
        ck_assert_uint_eq(d.calls, 0);

        ck_assert(run_until(s.e, is_ready, &s.rec, TIMEOUT_MS));
        ck_assert_uint_eq(d.calls, 1);
        ck_assert_int_eq(d.status, 0);
        ck_assert_int_eq(nd_pendev_get_state(s.rec.p), ND_PENDEV_READY);
        ck_assert_str_eq(nd_pendev_get_serial(s.rec.p), "UNIT-7");
        ck_assert_uint_eq(nd_pendev_get_identity(s.rec.p)->max_telemetry_rate_hz, 800);
        ck_assert_uint_eq(nd_pendev_get_telemetry_rate_hz(s.rec.p), 250);
        ck_assert(!nd_pendev_get_cartridge(s.rec.p)->present);
        ck_assert(!nd_pendev_get_status(s.rec.p)->motor_running);

        nd_penmodel_state st = model_state(&s);
        ck_assert(st.identified);
        ck_assert(st.watchdog_armed);
        ck_assert_uint_eq(st.watchdog_timeout_ms, s.config.heartbeat_timeout_ms);
        ck_assert(st.telemetry_enabled);
        ck_assert_uint_eq(st.telemetry_rate_hz, 250);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_rate_clamped_to_pen) {
        Sim s;
        nd_penmodel_config mc;
        nd_penmodel_config_init(&mc);
        mc.telemetry_rate_hz = 200;
        sim_setup(&s, &mc);
        s.config.telemetry_rate_hz = 900;
        sim_open_ready(&s);
        ck_assert_uint_eq(nd_pendev_get_telemetry_rate_hz(s.rec.p), 200);
        ck_assert_uint_eq(model_state(&s).telemetry_rate_hz, 200);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_bad_config) {
        sd_event *e;
        nd_penmodel *m;
        nd_penmodel_config mc;
        nd_pendev_config c;
        nd_pendev *p = NULL;
        nd_transport *t;
        Rec rec = { 0 };

        ck_assert_int_eq(sd_event_new(&e), 0);
        nd_penmodel_config_init(&mc);
        ck_assert_int_eq(nd_penmodel_new(&mc, mono_us(), &m), 0);

        const struct { unsigned timeout, interval, rate; } bad[] = {
                { ND_PROTO_WATCHDOG_MIN_MS - 1, 0, 0 },
                { ND_PROTO_WATCHDOG_MAX_MS + 1, 0, 0 },
                { 500, 500, 0 },
                { 500, 600, 0 },
                { 500, 0, ND_PROTO_TELEMETRY_RATE_MAX_HZ + 1 },
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                nd_pendev_config_init(&c);
                c.heartbeat_timeout_ms = bad[i].timeout;
                c.heartbeat_interval_ms = bad[i].interval;
                c.telemetry_rate_hz = bad[i].rate;
                ck_assert_int_eq(nd_transport_sim_new(e, m, &t), 0);
                /* the transport is freed on failure too (ASan/valgrind would see a leak) */
                ck_assert_int_eq(nd_pendev_new(t, &c, &callbacks, &rec, &p), -EINVAL);
                ck_assert_ptr_null(p);
        }
        ck_assert_int_eq(nd_pendev_new(NULL, NULL, &callbacks, &rec, &p), -EINVAL);
        nd_penmodel_unref(m);
        sd_event_unref(e);
}
END_TEST

typedef struct Count { Rec *r; uint64_t n; } Count;
static bool samples_at_least(void *arg) { Count *c = arg; return c->r->samples >= c->n; }

START_TEST(test_telemetry_in_order) {
        Sim s;
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        Count c = { &s.rec, 300 };
        ck_assert(run_until(s.e, samples_at_least, &c, TIMEOUT_MS));
        ck_assert_uint_eq(s.rec.out_of_order, 0);
        ck_assert_uint_eq(s.rec.seq[0], 0); /* nothing before the first sample was lost */
        nd_pendev_stats st;
        nd_pendev_get_stats(s.rec.p, &st);
        ck_assert_uint_eq(st.gaps, 0);
        ck_assert_uint_eq(st.duplicates, 0);
        ck_assert_uint_eq(st.corrupt_packets, 0);
        ck_assert_uint_eq(st.samples, s.rec.samples);
        ck_assert_uint_ge(st.packets * ND_PROTO_SAMPLES_PER_PACKET_MAX, st.samples);
        ck_assert_uint_eq(s.rec.errors[ND_PENDEV_ERROR_TELEMETRY_STALLED], 0);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_change_watchdog) {
        Sim s;
        Done d;
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        ck_assert_uint_ne(model_state(&s).watchdog_timeout_ms, 100 * slow_factor());
        ck_assert_int_eq(nd_penmodel_insert_cartridge(s.model, mono_us(), "WD-1", 12), 0);

        /* outside the pen's watchdog range: refused before anything is sent */
        ck_assert_int_eq(nd_pendev_set_heartbeat_timeout(s.rec.p, ND_PROTO_WATCHDOG_MIN_MS - 1, on_done, &d), -ERANGE);
        ck_assert_int_eq(nd_pendev_set_heartbeat_timeout(s.rec.p, ND_PROTO_WATCHDOG_MAX_MS + 1, on_done, &d), -ERANGE);

        /* a shorter timeout (a third of the fixture's) reaches the pen, and the heartbeat keeps up
         * with it: the motor runs on for several of the new timeouts */
        const unsigned shorter = 100 * slow_factor(), longer = 10 * shorter;
        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_set_heartbeat_timeout(s.rec.p, shorter, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        ck_assert_uint_eq(model_state(&s).watchdog_timeout_ms, shorter);
        call_ok(&s, nd_pendev_motor_start);
        fed_through(&s, 6 * shorter, shorter);

        /* and back to a longer one */
        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_set_heartbeat_timeout(s.rec.p, longer, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        ck_assert_uint_eq(model_state(&s).watchdog_timeout_ms, longer);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_commands) {
        Sim s;
        Done d;
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(s.model, mono_us(), "LOT-1/0007", 16), 0);

        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_query_cartridge(s.rec.p, on_cartridge, &d), 0);
        ck_assert_uint_eq(d.calls, 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        ck_assert(d.cart.present);
        ck_assert_uint_eq(d.cart.needles, 16);
        ck_assert_str_eq(d.cart.id, "LOT-1/0007");
        ck_assert_str_eq(nd_pendev_get_cartridge(s.rec.p)->id, "LOT-1/0007");

        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, 0.75, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_set_speed(s.rec.p, 110.5, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        nd_penmodel_state st = model_state(&s);
        ck_assert_double_eq_tol(st.set_depth_mm, 0.75, 1e-9);
        ck_assert_double_eq_tol(st.set_speed_hz, 110.5, 1e-9);

        /* checked against the pen's identity before anything is sent */
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, 0.76, on_done, &d), -EDOM);
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, 2.55, on_done, &d), -ERANGE);
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, -0.1, on_done, &d), -ERANGE);
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, NAN, on_done, &d), -ERANGE);
        ck_assert_int_eq(nd_pendev_set_speed(s.rec.p, 10.0, on_done, &d), -ERANGE);
        ck_assert_int_eq(nd_pendev_set_speed(s.rec.p, INFINITY, on_done, &d), -ERANGE);

        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_motor_start(s.rec.p, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        ck_assert(model_state(&s).motor_running);

        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_query_status(s.rec.p, on_status, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        ck_assert(d.st.motor_running);
        ck_assert_double_eq_tol(d.st.set_speed_hz, 110.5, 1e-9);
        ck_assert(nd_pendev_get_status(s.rec.p)->motor_running);

        /* the heartbeat keeps the pen's watchdog fed well past its timeout */
        fed_through(&s, 3 * s.config.heartbeat_timeout_ms, s.config.heartbeat_timeout_ms);

        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_motor_stop(s.rec.p, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        ck_assert(!model_state(&s).motor_running);

        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_clear_faults(s.rec.p, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_command_order_and_stop_overtakes_start) {
        Sim s;
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(s.model, mono_us(), "C-1", 12), 0);

        Done depth = { 0 }, speed = { 0 }, start = { 0 }, status = { 0 }, stop = { 0 };
        completion_counter = 0;
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, 1.0, on_done, &depth), 0);
        ck_assert_int_eq(nd_pendev_set_speed(s.rec.p, 100.0, on_done, &speed), 0);
        ck_assert_int_eq(nd_pendev_motor_start(s.rec.p, on_done, &start), 0);
        ck_assert_int_eq(nd_pendev_query_status(s.rec.p, on_status, &status), 0);
        ck_assert_int_eq(nd_pendev_motor_stop(s.rec.p, on_done, &stop), 0);
        wait_done(&s, &status);
        wait_done(&s, &stop);
        run_for(s.e, 50);
        ck_assert_int_eq(depth.status, 0);
        ck_assert_int_eq(speed.status, 0);
        ck_assert_int_eq(start.status, -ECANCELED);
        ck_assert_int_eq(status.status, 0);
        ck_assert_int_eq(stop.status, 0);
        ck_assert_uint_eq(depth.calls + speed.calls + start.calls + status.calls + stop.calls, 5);
        /* queued commands complete in issue order; the stop went out before those still queued */
        ck_assert_uint_lt(depth.order, speed.order);
        ck_assert_uint_lt(speed.order, start.order);
        ck_assert_uint_lt(start.order, status.order);
        ck_assert_uint_lt(stop.order, status.order);
        ck_assert(!status.st.motor_running);
        ck_assert(!model_state(&s).motor_running);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_pen_refuses) {
        Sim s;
        Done d = { 0 };
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        /* no cartridge: the pen stalls the start */
        ck_assert_int_eq(nd_pendev_motor_start(s.rec.p, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, -EPIPE);
        nd_pendev_stats ps;
        nd_pendev_get_stats(s.rec.p, &ps);
        ck_assert_uint_eq(ps.commands_failed, 1);
        ck_assert_int_eq(nd_pendev_get_state(s.rec.p), ND_PENDEV_READY);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_unresponsive) {
        Sim s;
        Done d = { 0 };
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(s.model, mono_us(), "C-2", 12), 0);
        ck_assert_int_eq(nd_pendev_motor_start(s.rec.p, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);

        ck_assert_int_eq(nd_penmodel_inject_fault(s.model, mono_us(), ND_PENMODEL_FAULT_UNRESPONSIVE), 0);
        ErrWait hb = { &s.rec, ND_PENDEV_ERROR_HEARTBEAT }, stall = { &s.rec, ND_PENDEV_ERROR_TELEMETRY_STALLED };
        ck_assert(run_until(s.e, has_error, &hb, TIMEOUT_MS));
        ck_assert_int_eq(s.rec.last_error[ND_PENDEV_ERROR_HEARTBEAT], -ETIMEDOUT);
        ck_assert(!s.rec.last_fatal[ND_PENDEV_ERROR_HEARTBEAT]);
        ck_assert(run_until(s.e, has_error, &stall, TIMEOUT_MS));
        /* the heartbeat goes on failing, counted in a row; the stall is told once */
        ck_assert(run_until(s.e, two_in_a_row, &hb, TIMEOUT_MS));
        run_for(s.e, s.config.heartbeat_timeout_ms);
        ck_assert_uint_eq(s.rec.errors[ND_PENDEV_ERROR_TELEMETRY_STALLED], 1);

        nd_penmodel_state st = model_state(&s);
        ck_assert(!st.motor_running);
        ck_assert(st.faults & ND_PROTO_FAULT_WATCHDOG_EXPIRED);

        /* it answers again: the stream resumes, the host may clear the fault */
        ck_assert_int_eq(nd_penmodel_inject_fault(s.model, mono_us(), ND_PENMODEL_FAULT_CLEAR), 0);
        uint64_t before = s.rec.samples;
        Count c = { &s.rec, before + 50 };
        ck_assert(run_until(s.e, samples_at_least, &c, TIMEOUT_MS));
        d = (Done) { 0 };
        ck_assert_int_eq(nd_pendev_clear_faults(s.rec.p, on_done, &d), 0);
        wait_done(&s, &d);
        ck_assert_int_eq(d.status, 0);
        ck_assert_uint_eq(model_state(&s).faults, 0);
        sim_teardown(&s);
}
END_TEST

START_TEST(test_corrupt_telemetry) {
        Sim s;
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        Count first = { &s.rec, 10 };
        ck_assert(run_until(s.e, samples_at_least, &first, TIMEOUT_MS));
        ck_assert_int_eq(nd_penmodel_inject_fault(s.model, mono_us(), ND_PENMODEL_FAULT_CORRUPT_TELEMETRY), 0);
        ErrWait w = { &s.rec, ND_PENDEV_ERROR_TELEMETRY_CORRUPT };
        ck_assert(run_until(s.e, has_error, &w, TIMEOUT_MS));
        run_for(s.e, 100);
        /* malformed (-EBADMSG), or a value out of its physical range (-ERANGE) */
        ck_assert(s.rec.last_error[ND_PENDEV_ERROR_TELEMETRY_CORRUPT] == -EBADMSG ||
                  s.rec.last_error[ND_PENDEV_ERROR_TELEMETRY_CORRUPT] == -ERANGE);
        ck_assert_int_eq(nd_penmodel_inject_fault(s.model, mono_us(), ND_PENMODEL_FAULT_CLEAR), 0);
        uint64_t before = s.rec.samples;
        Count c = { &s.rec, before + 50 };
        ck_assert(run_until(s.e, samples_at_least, &c, TIMEOUT_MS));

        nd_pendev_stats ps;
        nd_pendev_get_stats(s.rec.p, &ps);
        ck_assert_uint_ge(ps.corrupt_packets, 10);
        ck_assert_uint_eq(ps.corrupt_packets, s.rec.errors[ND_PENDEV_ERROR_TELEMETRY_CORRUPT]);
        /* the samples of the corrupt packets are missing: one gap, counted */
        ck_assert_uint_eq(ps.gaps, 1);
        ck_assert_uint_ge(ps.missing_samples, ps.corrupt_packets);
        ck_assert_uint_eq(s.rec.last_count[ND_PENDEV_ERROR_TELEMETRY_GAP], ps.missing_samples);
        ck_assert_int_eq(nd_pendev_get_state(s.rec.p), ND_PENDEV_READY);
        sim_teardown(&s);
}
END_TEST

static bool is_gone(void *arg) { return ((Rec *) arg)->errors[ND_PENDEV_ERROR_GONE] > 0; }

START_TEST(test_unplug) {
        Sim s;
        sim_setup(&s, NULL);
        sim_open_ready(&s);
        ck_assert_int_eq(nd_penmodel_inject_fault(s.model, mono_us(), ND_PENMODEL_FAULT_UNRESPONSIVE), 0);
        Done a = { 0 }, b = { 0 }, c = { 0 };
        ck_assert_int_eq(nd_pendev_query_status(s.rec.p, on_status, &a), 0);   /* in flight, unanswered */
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, 1.0, on_done, &b), 0);   /* queued */
        ck_assert_int_eq(nd_pendev_query_cartridge(s.rec.p, on_cartridge, &c), 0); /* queued */
        run_for(s.e, 20);
        ck_assert_int_eq(nd_transport_sim_unplug(nd_pendev_get_transport(s.rec.p)), 0);
        ck_assert(run_until(s.e, is_gone, &s.rec, TIMEOUT_MS));
        run_for(s.e, 50);
        ck_assert_uint_eq(s.rec.errors[ND_PENDEV_ERROR_GONE], 1);
        ck_assert(s.rec.last_fatal[ND_PENDEV_ERROR_GONE]);
        ck_assert_int_eq(s.rec.last_error[ND_PENDEV_ERROR_GONE], -ENODEV);
        ck_assert_uint_eq(a.calls, 1);
        ck_assert_uint_eq(b.calls, 1);
        ck_assert_uint_eq(c.calls, 1);
        ck_assert_int_eq(a.status, -ENODEV);
        ck_assert_int_eq(b.status, -ENODEV);
        ck_assert_int_eq(c.status, -ENODEV);
        ck_assert_int_eq(nd_pendev_get_state(s.rec.p), ND_PENDEV_GONE);
        ck_assert_int_eq(nd_pendev_motor_stop(s.rec.p, on_done, &a), -ENODEV);
        ck_assert_int_eq(nd_pendev_set_speed(s.rec.p, 100, on_done, &a), -ENODEV);
        /* the serial stays readable, for the daemon to match a replug */
        ck_assert_str_eq(nd_pendev_get_serial(s.rec.p), "SIM0001");
        sim_teardown(&s);
}
END_TEST

START_TEST(test_free_in_callbacks) {
        /* from ready */
        Sim s;
        sim_setup(&s, NULL);
        s.rec.free_in_ready = true;
        sim_open(&s);
        ck_assert(run_until(s.e, is_ready, &s.rec, TIMEOUT_MS));
        ck_assert_ptr_null(s.rec.p);
        run_for(s.e, 100);
        sim_teardown(&s);

        /* from samples */
        sim_setup(&s, NULL);
        s.rec.free_in_samples = true;
        sim_open_ready(&s);
        Count c = { &s.rec, 1 };
        ck_assert(run_until(s.e, samples_at_least, &c, TIMEOUT_MS));
        ck_assert_ptr_null(s.rec.p);
        run_for(s.e, 100);
        sim_teardown(&s);

        /* from the departure report, with commands pending */
        sim_setup(&s, NULL);
        s.rec.free_in_error = ND_PENDEV_ERROR_GONE + 1;
        sim_open_ready(&s);
        Done d = { 0 }, d2 = { 0 };
        ck_assert_int_eq(nd_penmodel_inject_fault(s.model, mono_us(), ND_PENMODEL_FAULT_UNRESPONSIVE), 0);
        ck_assert_int_eq(nd_pendev_query_status(s.rec.p, on_status, &d), 0);
        ck_assert_int_eq(nd_pendev_set_depth(s.rec.p, 1.0, on_done, &d2), 0);
        ck_assert_int_eq(nd_transport_sim_unplug(nd_pendev_get_transport(s.rec.p)), 0);
        ck_assert(run_until(s.e, is_gone, &s.rec, TIMEOUT_MS));
        ck_assert_ptr_null(s.rec.p);
        run_for(s.e, 50);
        /* the transport failed what it held before reporting the departure; what was still
         * queued in the pendev was dropped with it */
        ck_assert_uint_eq(d.calls, 1);
        ck_assert_int_eq(d.status, -ENODEV);
        ck_assert(d2.calls == 0 || d2.status == -ENODEV);
        sim_teardown(&s);

        /* from a heartbeat failure */
        sim_setup(&s, NULL);
        s.rec.free_in_error = ND_PENDEV_ERROR_HEARTBEAT + 1;
        sim_open_ready(&s);
        ck_assert_int_eq(nd_penmodel_inject_fault(s.model, mono_us(), ND_PENMODEL_FAULT_UNRESPONSIVE), 0);
        ErrWait w = { &s.rec, ND_PENDEV_ERROR_HEARTBEAT };
        ck_assert(run_until(s.e, has_error, &w, TIMEOUT_MS));
        ck_assert_ptr_null(s.rec.p);
        run_for(s.e, 100);
        sim_teardown(&s);
}
END_TEST

/* ---- a scripted transport: the test answers every request itself ------------------------------- */

#define SCRIPT_MAX 16

typedef struct Scripted {
        nd_transport base;
        struct {
                nd_control_setup setup;
                uint8_t data[8];
                nd_control_done_fn done;
                void *userdata;
                uint32_t timeout_ms;
        } pending[SCRIPT_MAX];
        unsigned n_pending;
        bool streaming;
        bool *freed; /* set when freed */
} Scripted;

static int scripted_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                            uint32_t timeout_ms, nd_control_done_fn done, void *userdata) {
        Scripted *s = (Scripted *) t;
        ck_assert_uint_lt(s->n_pending, SCRIPT_MAX);
        s->pending[s->n_pending].setup = *setup;
        if (!(setup->request_type & ND_CONTROL_DIR_IN) && setup->length > 0)
                memcpy(s->pending[s->n_pending].data, out_data, MIN((size_t) setup->length, sizeof s->pending[0].data));
        s->pending[s->n_pending].done = done;
        s->pending[s->n_pending].userdata = userdata;
        s->pending[s->n_pending].timeout_ms = timeout_ms;
        s->n_pending++;
        return 0;
}

static int scripted_start(nd_transport *t) { ((Scripted *) t)->streaming = true; return 0; }
static void scripted_stop(nd_transport *t) { ((Scripted *) t)->streaming = false; }
static void scripted_free(nd_transport *t) {
        Scripted *s = (Scripted *) t;
        *s->freed = true;
        sd_event_unref(s->base.event);
        free(s->base.description);
        free(s);
}

static const nd_transport_ops scripted_ops = {
        .control = scripted_control,
        .start_stream = scripted_start,
        .stop_stream = scripted_stop,
        .free = scripted_free,
};

static Scripted *scripted_new(sd_event *e, bool *freed) {
        Scripted *s = calloc(1, sizeof *s);
        ck_assert_ptr_nonnull(s);
        s->base.ops = &scripted_ops;
        s->base.event = sd_event_ref(e);
        s->base.description = strdup("scripted");
        s->freed = freed;
        *freed = false;
        return s;
}

static bool has_request(void *arg) { return ((Scripted *) arg)->n_pending > 0; }

/* Completes the oldest pending request with status and reply bytes; returns its bRequest. */
static uint8_t scripted_answer(Scripted *s, int status, const uint8_t *reply, size_t len) {
        ck_assert_uint_gt(s->n_pending, 0);
        nd_control_done_fn done = s->pending[0].done;
        void *ud = s->pending[0].userdata;
        uint8_t request = s->pending[0].setup.request;
        memmove(&s->pending[0], &s->pending[1], (s->n_pending - 1) * sizeof s->pending[0]);
        s->n_pending--;
        done(&s->base, status, reply, len, ud);
        return request;
}

static void identity_bytes(uint8_t *buf, uint8_t major) {
        nd_proto_identity id = {
                .protocol_major = major,
                .depth_min_mm = 0.0, .depth_max_mm = 2.5, .depth_step_mm = 0.05,
                .speed_min_hz = 25.0, .speed_max_hz = 150.0,
                .max_telemetry_rate_hz = 1000,
        };
        strcpy(id.serial, "SCRIPT-1");
        strcpy(id.model, "scripted");
        strcpy(id.firmware_version, "1.0");
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, ND_PROTO_IDENTITY_SIZE), ND_PROTO_IDENTITY_SIZE);
}

typedef struct Script {
        sd_event *e;
        Scripted *t;
        bool freed;
        Rec rec;
        unsigned watchdog_ms; /* what SET_WATCHDOG must ask for */
} Script;

static void script_setup_with(Script *sc, const nd_pendev_config *config) {
        *sc = (Script) { 0 };
        ck_assert_int_eq(sd_event_new(&sc->e), 0);
        sc->t = scripted_new(sc->e, &sc->freed);
        sc->watchdog_ms = config ? config->heartbeat_timeout_ms : ND_PENDEV_HEARTBEAT_TIMEOUT_MS_DEFAULT;
        ck_assert_int_eq(nd_pendev_new(&sc->t->base, config, &callbacks, &sc->rec, &sc->rec.p), 0);
        ck_assert_uint_eq(sc->t->n_pending, 1);
        ck_assert_uint_eq(sc->t->pending[0].setup.request, ND_PROTO_REQ_IDENTIFY);
        ck_assert_uint_eq(sc->t->pending[0].setup.value, ND_PROTO_VERSION_MAJOR << 8 | ND_PROTO_VERSION_MINOR);
}

static void script_setup(Script *sc) {
        script_setup_with(sc, NULL);
}

/* Answers the whole opening sequence successfully. */
static void script_open(Script *sc) {
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        nd_proto_cartridge cart = { .present = false };
        nd_proto_status st = { .status = ND_PROTO_STATUS_WATCHDOG_ARMED, .battery_percent = 80, .temperature_c = 30,
                               .watchdog_timeout_ms = 500, .telemetry_rate_hz = 1000 };

        identity_bytes(buf, ND_PROTO_VERSION_MAJOR);
        ck_assert_uint_eq(scripted_answer(sc->t, ND_PROTO_IDENTITY_SIZE, buf, ND_PROTO_IDENTITY_SIZE), ND_PROTO_REQ_IDENTIFY);
        ck_assert_int_eq(nd_proto_encode_cartridge(&cart, buf, sizeof buf), ND_PROTO_CARTRIDGE_SIZE);
        ck_assert_uint_eq(scripted_answer(sc->t, ND_PROTO_CARTRIDGE_SIZE, buf, ND_PROTO_CARTRIDGE_SIZE), ND_PROTO_REQ_GET_CARTRIDGE);
        ck_assert_int_eq(nd_proto_encode_status(&st, buf, sizeof buf), ND_PROTO_STATUS_SIZE);
        ck_assert_uint_eq(scripted_answer(sc->t, ND_PROTO_STATUS_SIZE, buf, ND_PROTO_STATUS_SIZE), ND_PROTO_REQ_GET_STATUS);
        ck_assert_uint_eq(sc->t->pending[0].setup.value, sc->watchdog_ms);
        ck_assert_uint_eq(scripted_answer(sc->t, 0, NULL, 0), ND_PROTO_REQ_SET_WATCHDOG);
        ck_assert(sc->t->streaming); /* listening before the pen is told to talk */
        ck_assert_uint_eq(scripted_answer(sc->t, 0, NULL, 0), ND_PROTO_REQ_SET_TELEMETRY);
        ck_assert(sc->rec.ready);
        ck_assert_int_eq(nd_pendev_get_state(sc->rec.p), ND_PENDEV_READY);
}

static void script_teardown(Script *sc) {
        ck_assert(!sc->rec.after_free);
        sc->rec.p = nd_pendev_free(sc->rec.p);
        ck_assert(sc->freed);
        sd_event_unref(sc->e);
}

static void feed(Script *sc, uint32_t seq, unsigned n) {
        nd_proto_sample s[ND_PROTO_SAMPLES_PER_PACKET_MAX] = { { 0 } };
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];
        for (unsigned i = 0; i < n; i++) {
                s[i].sequence = seq + i;
                s[i].timestamp_us = (uint32_t) (seq + i) * 1000u;
                s[i].battery_percent = 50;
                s[i].temperature_c = 30;
        }
        int len = nd_proto_encode_packet(s, n, buf, sizeof buf);
        ck_assert_int_gt(len, 0);
        sc->t->base.on_packet(&sc->t->base, buf, (size_t) len, sc->t->base.userdata);
}

START_TEST(test_refuse_unknown_major) {
        Script sc;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        script_setup(&sc);
        identity_bytes(buf, ND_PROTO_VERSION_MAJOR + 1);
        scripted_answer(sc.t, ND_PROTO_IDENTITY_SIZE, buf, sizeof buf);
        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_REFUSED);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_VERSION], 1);
        ck_assert(sc.rec.last_fatal[ND_PENDEV_ERROR_VERSION]);
        ck_assert_int_eq(sc.rec.last_error[ND_PENDEV_ERROR_VERSION], -EPROTONOSUPPORT);
        ck_assert_uint_eq(sc.t->n_pending, 0); /* nothing more is asked of it */
        ck_assert(!sc.t->streaming);
        ck_assert(!sc.rec.ready);
        ck_assert_ptr_null(nd_pendev_get_identity(sc.rec.p));
        Done d = { 0 };
        ck_assert_int_eq(nd_pendev_set_depth(sc.rec.p, 1.0, on_done, &d), -ENOTCONN);
        ck_assert_int_eq(nd_pendev_motor_stop(sc.rec.p, on_done, &d), 0); /* stopping is never refused */
        ck_assert_uint_eq(sc.t->pending[0].setup.request, ND_PROTO_REQ_MOTOR_STOP);
        scripted_answer(sc.t, 0, NULL, 0);
        ck_assert_int_eq(d.status, 0);
        script_teardown(&sc);
}
END_TEST

START_TEST(test_refuse_malformed_identify) {
        static const size_t lengths[] = { 0, 1, 20, ND_PROTO_IDENTITY_SIZE - 1 };
        for (size_t i = 0; i < ELEMENTSOF(lengths) + 2; i++) {
                Script sc;
                uint8_t buf[ND_PROTO_IDENTITY_SIZE];
                script_setup(&sc);
                identity_bytes(buf, ND_PROTO_VERSION_MAJOR);
                size_t len = ND_PROTO_IDENTITY_SIZE;
                int status = ND_PROTO_IDENTITY_SIZE;
                int expected = -EBADMSG;
                if (i < ELEMENTSOF(lengths))
                        len = lengths[i], status = (int) len;
                else if (i == ELEMENTSOF(lengths))
                        memcpy(buf, "EVIL", 4); /* magic */
                else
                        status = -ETIMEDOUT, expected = -ETIMEDOUT, len = 0; /* no answer at all */
                /* a time-out is asked again, ND_PENDEV_OPEN_ATTEMPTS in all; the rest refuse at once */
                for (unsigned a = 1; status == -ETIMEDOUT && a < ND_PENDEV_OPEN_ATTEMPTS; a++) {
                        ck_assert_uint_eq(scripted_answer(sc.t, status, NULL, 0), ND_PROTO_REQ_IDENTIFY);
                        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_OPENING);
                        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_IDENTIFY], 0);
                }
                scripted_answer(sc.t, status, buf, len);
                ck_assert_uint_eq(sc.t->n_pending, 0);
                ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_REFUSED);
                ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_IDENTIFY], 1);
                ck_assert_int_eq(sc.rec.last_error[ND_PENDEV_ERROR_IDENTIFY], expected);
                ck_assert(sc.rec.last_fatal[ND_PENDEV_ERROR_IDENTIFY]);
                ck_assert_str_eq(nd_pendev_get_serial(sc.rec.p), "");
                script_teardown(&sc);
        }
}
END_TEST

/* A request of the opening sequence that times out is asked again with twice the time, up to
 * ND_PENDEV_OPEN_ATTEMPTS in all: a pen answering late after it enumerated is not refused for it.
 * A pen that refuses (STALL) is refused at once. */
START_TEST(test_opening_asks_again_after_a_timeout) {
        nd_pendev_config config;
        nd_pendev_config_init(&config);
        config.request_timeout_ms = 1000;
        Script sc;
        script_setup_with(&sc, &config);
        ck_assert_uint_eq(sc.t->pending[0].timeout_ms, 1000);
        ck_assert_uint_eq(scripted_answer(sc.t, -ETIMEDOUT, NULL, 0), ND_PROTO_REQ_IDENTIFY);
        ck_assert_uint_eq(sc.t->n_pending, 1);
        ck_assert_uint_eq(sc.t->pending[0].setup.request, ND_PROTO_REQ_IDENTIFY);
        ck_assert_uint_eq(sc.t->pending[0].timeout_ms, 2000);
        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_OPENING);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_IDENTIFY], 0);
        /* the second IDENTIFY is answered: opening goes on, each later request with its own 1 s */
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        identity_bytes(buf, ND_PROTO_VERSION_MAJOR);
        ck_assert_uint_eq(scripted_answer(sc.t, ND_PROTO_IDENTITY_SIZE, buf, sizeof buf), ND_PROTO_REQ_IDENTIFY);
        ck_assert_uint_eq(sc.t->pending[0].setup.request, ND_PROTO_REQ_GET_CARTRIDGE);
        ck_assert_uint_eq(sc.t->pending[0].timeout_ms, 1000);
        /* a set-up request that times out three times refuses the pen, with what was tried */
        ck_assert_uint_eq(scripted_answer(sc.t, -ETIMEDOUT, NULL, 0), ND_PROTO_REQ_GET_CARTRIDGE);
        ck_assert_uint_eq(sc.t->pending[0].timeout_ms, 2000);
        ck_assert_uint_eq(scripted_answer(sc.t, -ETIMEDOUT, NULL, 0), ND_PROTO_REQ_GET_CARTRIDGE);
        ck_assert_uint_eq(sc.t->pending[0].timeout_ms, 4000);
        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_OPENING);
        ck_assert_uint_eq(scripted_answer(sc.t, -ETIMEDOUT, NULL, 0), ND_PROTO_REQ_GET_CARTRIDGE);
        ck_assert_uint_eq(sc.t->n_pending, 0);
        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_REFUSED);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_SETUP], 1);
        ck_assert_int_eq(sc.rec.last_error[ND_PENDEV_ERROR_SETUP], -ETIMEDOUT);
        ck_assert(!sc.rec.ready);
        script_teardown(&sc);

        /* a STALL is an answer: no second IDENTIFY */
        script_setup(&sc);
        ck_assert_uint_eq(scripted_answer(sc.t, -EPIPE, NULL, 0), ND_PROTO_REQ_IDENTIFY);
        ck_assert_uint_eq(sc.t->n_pending, 0);
        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_REFUSED);
        ck_assert_int_eq(sc.rec.last_error[ND_PENDEV_ERROR_IDENTIFY], -EPIPE);
        script_teardown(&sc);

        /* each step has its own attempts: a late SET_WATCHDOG, then a late SET_TELEMETRY */
        script_setup(&sc);
        nd_proto_cartridge cart = { .present = false };
        nd_proto_status st = { .battery_percent = 80, .temperature_c = 30, .watchdog_timeout_ms = 500 };
        scripted_answer(sc.t, ND_PROTO_IDENTITY_SIZE, buf, sizeof buf);
        ck_assert_int_eq(nd_proto_encode_cartridge(&cart, buf, sizeof buf), ND_PROTO_CARTRIDGE_SIZE);
        scripted_answer(sc.t, ND_PROTO_CARTRIDGE_SIZE, buf, ND_PROTO_CARTRIDGE_SIZE);
        ck_assert_int_eq(nd_proto_encode_status(&st, buf, sizeof buf), ND_PROTO_STATUS_SIZE);
        scripted_answer(sc.t, ND_PROTO_STATUS_SIZE, buf, ND_PROTO_STATUS_SIZE);
        ck_assert_uint_eq(scripted_answer(sc.t, -ETIMEDOUT, NULL, 0), ND_PROTO_REQ_SET_WATCHDOG);
        ck_assert(!sc.t->streaming);
        ck_assert_uint_eq(scripted_answer(sc.t, 0, NULL, 0), ND_PROTO_REQ_SET_WATCHDOG);
        ck_assert(sc.t->streaming);
        ck_assert_uint_eq(scripted_answer(sc.t, -ETIMEDOUT, NULL, 0), ND_PROTO_REQ_SET_TELEMETRY);
        ck_assert(!sc.rec.ready);
        ck_assert_uint_eq(scripted_answer(sc.t, 0, NULL, 0), ND_PROTO_REQ_SET_TELEMETRY);
        ck_assert(sc.rec.ready);
        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_READY);
        for (unsigned k = 0; k < _ND_PENDEV_ERROR_KIND_MAX; k++)
                ck_assert_uint_eq(sc.rec.errors[k], 0);
        script_teardown(&sc);
}
END_TEST

START_TEST(test_refuse_bad_setup_reply) {
        Script sc;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        script_setup(&sc);
        identity_bytes(buf, ND_PROTO_VERSION_MAJOR);
        scripted_answer(sc.t, ND_PROTO_IDENTITY_SIZE, buf, sizeof buf);
        memset(buf, 0xff, sizeof buf);
        scripted_answer(sc.t, ND_PROTO_CARTRIDGE_SIZE, buf, ND_PROTO_CARTRIDGE_SIZE);
        ck_assert_int_eq(nd_pendev_get_state(sc.rec.p), ND_PENDEV_REFUSED);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_SETUP], 1);
        ck_assert_int_eq(sc.rec.last_error[ND_PENDEV_ERROR_SETUP], -EBADMSG);
        /* identified, so the serial is known even though the pen is refused */
        ck_assert_str_eq(nd_pendev_get_serial(sc.rec.p), "SCRIPT-1");
        script_teardown(&sc);
}
END_TEST

START_TEST(test_sequence_checks) {
        Script sc;
        script_setup(&sc);
        script_open(&sc);

        feed(&sc, 100, 3);                  /* first: any start */
        feed(&sc, 103, 2);
        ck_assert_uint_eq(sc.rec.samples, 5);
        feed(&sc, 110, 1);                  /* 105..109 missing */
        nd_pendev_stats st;
        nd_pendev_get_stats(sc.rec.p, &st);
        ck_assert_uint_eq(st.gaps, 1);
        ck_assert_uint_eq(st.missing_samples, 5);
        ck_assert_uint_eq(sc.rec.last_count[ND_PENDEV_ERROR_TELEMETRY_GAP], 5);
        ck_assert_uint_eq(sc.rec.samples, 6);
        feed(&sc, 109, 3);                  /* 109, 110 repeated, 111 new */
        nd_pendev_get_stats(sc.rec.p, &st);
        ck_assert_uint_eq(st.duplicates, 2);
        ck_assert_uint_eq(sc.rec.samples, 7);
        ck_assert_uint_eq(sc.rec.last_seq, 111);
        feed(&sc, 50, 1);                   /* far behind: dropped, never delivered */
        ck_assert_uint_eq(sc.rec.samples, 7);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_TELEMETRY_DUPLICATE], 3);

        /* corrupt: dropped, counted, the next good packet continues the sequence */
        uint8_t junk[ND_PROTO_PACKET_MAX_SIZE];
        memset(junk, 0x5a, sizeof junk);
        for (size_t len = 0; len <= sizeof junk; len++)
                sc.t->base.on_packet(&sc.t->base, junk, len, sc.t->base.userdata);
        nd_pendev_get_stats(sc.rec.p, &st);
        ck_assert_uint_eq(st.corrupt_packets, sizeof junk + 1);
        feed(&sc, 112, 1);
        ck_assert_uint_eq(sc.rec.samples, 8);
        nd_pendev_get_stats(sc.rec.p, &st);
        ck_assert_uint_eq(st.gaps, 1);

        /* a bogus jump ahead (one CRC-valid packet), then the stream goes on where it was:
         * followed again instead of dropping every later sample as a duplicate */
        feed(&sc, 5000, 1);
        feed(&sc, 113, 2);
        feed(&sc, 115, 1);
        nd_pendev_get_stats(sc.rec.p, &st);
        ck_assert_uint_eq(st.gaps, 2);
        ck_assert_uint_eq(st.resyncs, 1);
        ck_assert_uint_eq(st.duplicates, 3);
        ck_assert_uint_eq(sc.rec.samples, 12);
        ck_assert_uint_eq(sc.rec.last_seq, 115);

        /* a real jump (confirmed by the next packet), then the pen restarts its count */
        feed(&sc, 3000, 1);
        feed(&sc, 3001, 1);
        feed(&sc, 2990, 1);                 /* a little behind, not a return: a duplicate */
        feed(&sc, 0, 2);                    /* far behind: a restart, followed */
        nd_pendev_get_stats(sc.rec.p, &st);
        ck_assert_uint_eq(st.gaps, 3);
        ck_assert_uint_eq(st.duplicates, 4);
        ck_assert_uint_eq(st.resyncs, 2);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_TELEMETRY_RESYNC], 2);
        ck_assert_uint_eq(sc.rec.last_seq, 1);
        ck_assert_uint_eq(sc.rec.samples, 16);

        script_teardown(&sc);
}
END_TEST

START_TEST(test_sequence_wraps) {
        Script sc;
        script_setup(&sc);
        script_open(&sc);
        feed(&sc, UINT32_MAX - 1, 3);       /* ..fffe, ..ffff, 0 */
        feed(&sc, 1, 2);
        nd_pendev_stats st;
        nd_pendev_get_stats(sc.rec.p, &st);
        ck_assert_uint_eq(st.gaps, 0);
        ck_assert_uint_eq(st.duplicates, 0);
        ck_assert_uint_eq(sc.rec.samples, 5);
        ck_assert_uint_eq(sc.rec.out_of_order, 0); /* device time extended past 2^32 µs too */
        ck_assert_uint_eq(sc.rec.last_seq, 2);
        script_teardown(&sc);
}
END_TEST

START_TEST(test_queue_waits_and_gone_fails_queued) {
        Script sc;
        script_setup(&sc);
        script_open(&sc);
        Done a = { 0 }, b = { 0 }, stop = { 0 };
        ck_assert_int_eq(nd_pendev_set_speed(sc.rec.p, 100, on_done, &a), 0);
        ck_assert_int_eq(nd_pendev_set_speed(sc.rec.p, 120, on_done, &b), 0);
        ck_assert_uint_eq(sc.t->n_pending, 1); /* one at a time */
        ck_assert_int_eq(nd_pendev_motor_stop(sc.rec.p, on_done, &stop), 0);
        ck_assert_uint_eq(sc.t->n_pending, 2); /* the stop did not wait */
        ck_assert_uint_eq(sc.t->pending[1].setup.request, ND_PROTO_REQ_MOTOR_STOP);
        /* a refusal of the first does not stall the queue */
        scripted_answer(sc.t, -EPIPE, NULL, 0);
        ck_assert_int_eq(a.status, -EPIPE);
        ck_assert_uint_eq(sc.t->n_pending, 2);
        ck_assert_uint_eq(sc.t->pending[1].setup.request, ND_PROTO_REQ_SET_SPEED);
        ck_assert_uint_eq(sc.t->pending[1].setup.value, 12000);
        /* the link goes: in-flight requests complete through the transport, the rest at once */
        Done c = { 0 };
        ck_assert_int_eq(nd_pendev_query_status(sc.rec.p, on_status, &c), 0); /* queued behind b */
        nd_transport_report_gone(&sc.t->base, -ENODEV);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_GONE], 1);
        ck_assert_uint_eq(c.calls, 1);
        ck_assert_int_eq(c.status, -ENODEV);
        scripted_answer(sc.t, -ENODEV, NULL, 0);
        scripted_answer(sc.t, -ENODEV, NULL, 0);
        ck_assert_int_eq(stop.status, -ENODEV);
        ck_assert_int_eq(b.status, -ENODEV);
        ck_assert_uint_eq(a.calls + b.calls + c.calls + stop.calls, 4);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_GONE], 1);
        script_teardown(&sc);
}
END_TEST

/* A heartbeat may take until the watchdog to be acknowledged, even when the limits' watchdog is
 * longer than the request timeout of the other commands (an emulated or passed-through link). */
START_TEST(test_heartbeat_waits_for_the_watchdog) {
        nd_pendev_config config;
        nd_pendev_config_init(&config);
        config.heartbeat_timeout_ms = 3000;
        config.heartbeat_interval_ms = 100;
        config.request_timeout_ms = 1000;
        Script sc;
        script_setup_with(&sc, &config);
        script_open(&sc);
        Done a = { 0 };
        ck_assert_int_eq(nd_pendev_set_depth(sc.rec.p, 1.0, on_done, &a), 0);
        ck_assert_uint_eq(sc.t->n_pending, 1);
        ck_assert_uint_eq(sc.t->pending[0].setup.request, ND_PROTO_REQ_SET_DEPTH);
        ck_assert_uint_eq(sc.t->pending[0].timeout_ms, 1000);
        scripted_answer(sc.t, 0, NULL, 0);
        ck_assert_int_eq(a.status, 0);
        /* the first heartbeat, a tenth of a second on */
        ck_assert(run_until(sc.e, has_request, sc.t, TIMEOUT_MS));
        ck_assert_uint_eq(sc.t->n_pending, 1);
        ck_assert_uint_eq(sc.t->pending[0].setup.request, ND_PROTO_REQ_HEARTBEAT);
        ck_assert_uint_eq(sc.t->pending[0].timeout_ms, 3000);
        /* a heartbeat the transport times out is a failure, told as such */
        scripted_answer(sc.t, -ETIMEDOUT, NULL, 0);
        ck_assert_uint_eq(sc.rec.errors[ND_PENDEV_ERROR_HEARTBEAT], 1);
        ck_assert_int_eq(sc.rec.last_error[ND_PENDEV_ERROR_HEARTBEAT], -ETIMEDOUT);
        script_teardown(&sc);
}
END_TEST

START_TEST(test_free_with_requests_pending) {
        Script sc;
        script_setup(&sc);
        script_open(&sc);
        Done a = { 0 };
        ck_assert_int_eq(nd_pendev_query_status(sc.rec.p, on_status, &a), 0);
        ck_assert_int_eq(nd_pendev_set_depth(sc.rec.p, 1.0, on_done, &a), 0);
        script_teardown(&sc); /* the transport drops its pending callbacks: nothing may leak */
        ck_assert_uint_eq(a.calls, 0);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("pendev");
        TCase *tc = tcase_create("simulated");
        tcase_set_timeout(tc, 60 * slow_factor());
        tcase_add_test(tc, test_open_ready);
        tcase_add_test(tc, test_rate_clamped_to_pen);
        tcase_add_test(tc, test_bad_config);
        tcase_add_test(tc, test_telemetry_in_order);
        tcase_add_test(tc, test_commands);
        tcase_add_test(tc, test_change_watchdog);
        tcase_add_test(tc, test_command_order_and_stop_overtakes_start);
        tcase_add_test(tc, test_pen_refuses);
        tcase_add_test(tc, test_unresponsive);
        tcase_add_test(tc, test_corrupt_telemetry);
        tcase_add_test(tc, test_unplug);
        tcase_add_test(tc, test_free_in_callbacks);
        suite_add_tcase(s, tc);

        tc = tcase_create("scripted");
        tcase_add_test(tc, test_refuse_unknown_major);
        tcase_add_test(tc, test_refuse_malformed_identify);
        tcase_add_test(tc, test_opening_asks_again_after_a_timeout);
        tcase_add_test(tc, test_refuse_bad_setup_reply);
        tcase_add_test(tc, test_sequence_checks);
        tcase_add_test(tc, test_sequence_wraps);
        tcase_add_test(tc, test_queue_waits_and_gone_fails_queued);
        tcase_add_test(tc, test_free_with_requests_pending);
        tcase_add_test(tc, test_heartbeat_waits_for_the_watchdog);
        suite_add_tcase(s, tc);
        return s;
}
