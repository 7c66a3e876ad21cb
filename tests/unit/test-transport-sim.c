/* test-transport-sim.c: the simulated transport on a real sd-event loop: requests over it,
 * a second of telemetry with nothing lost or repeated, timeouts, unplug, and freeing with work
 * in flight. */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check-main.h"
#include "penmodel.h"
#include "protocol.h"
#include "transport-sim.h"
#include "util.h"

#define TIMEOUT_MS 1000u

static uint64_t mono_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

typedef struct fixture {
        sd_event *e;
        nd_penmodel *model;
        nd_transport *t;
} fixture;

static void fixture_init(fixture *f) {
        nd_penmodel_config c;
        memset(f, 0, sizeof *f);
        ck_assert_int_ge(sd_event_new(&f->e), 0);
        nd_penmodel_config_init(&c);
        ck_assert_int_eq(nd_penmodel_new(&c, mono_now(), &f->model), 0);
        ck_assert_int_eq(nd_transport_sim_new(f->e, f->model, &f->t), 0);
}

static void fixture_done(fixture *f) {
        nd_transport_free(f->t);
        nd_penmodel_unref(f->model);
        sd_event_unref(f->e);
}

/* Runs the loop until *flag is set or timeout_us passed; returns *flag. */
static bool run_until(sd_event *e, const bool *flag, uint64_t timeout_us) {
        uint64_t deadline = mono_now() + timeout_us;
        while (!*flag) {
                uint64_t now = mono_now();
                if (now >= deadline)
                        break;
                ck_assert_int_ge(sd_event_run(e, deadline - now), 0);
        }
        return *flag;
}

static void run_for(sd_event *e, uint64_t us) {
        bool never = false;
        run_until(e, &never, us);
}

/* One completed request. */
typedef struct completion {
        bool done;
        int status;
        uint8_t data[ND_PROTO_IDENTITY_SIZE];
        size_t len;
        unsigned order;
        uint64_t at_us;
} completion;

static unsigned completion_counter;

static void on_done(nd_transport *t, int status, const uint8_t *data, size_t len, void *userdata) {
        completion *c = userdata;
        ck_assert(!c->done); /* exactly once */
        c->done = true;
        c->status = status;
        c->len = len;
        c->order = completion_counter++;
        c->at_us = mono_now();
        ck_assert(len <= sizeof c->data);
        if (len > 0) {
                ck_assert_ptr_nonnull(data);
                memcpy(c->data, data, len);
        }
}

static void submit(fixture *f, const nd_control_setup *s, const uint8_t *data, uint32_t timeout_ms, completion *c) {
        memset(c, 0, sizeof *c);
        ck_assert_int_eq(nd_transport_control(f->t, s, data, timeout_ms, on_done, c), 0);
        ck_assert(!c->done); /* never inside the submitting call */
}

static void submit_simple(fixture *f, void (*req)(nd_control_setup *), completion *c) {
        nd_control_setup s;
        req(&s);
        submit(f, &s, NULL, TIMEOUT_MS, c);
}

static void identify(fixture *f) {
        nd_control_setup s;
        completion c;
        nd_proto_request_identify(&s, ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR);
        submit(f, &s, NULL, TIMEOUT_MS, &c);
        ck_assert(run_until(f->e, &c.done, USEC_PER_SEC));
        ck_assert_int_eq(c.status, ND_PROTO_IDENTITY_SIZE);
}

/* ---- requests ------------------------------------------------------------------------------------ */

START_TEST(test_identify_over_sim) {
        fixture f;
        fixture_init(&f);
        nd_control_setup s;
        completion c, stall, out, order[3];
        nd_proto_identity id;
        nd_proto_error err;

        ck_assert_str_eq(nd_transport_describe(f.t), "simulated pen SIM0001");
        ck_assert_ptr_eq(nd_transport_sim_get_model(f.t), f.model);

        nd_proto_request_identify(&s, 1, 0);
        submit(&f, &s, NULL, TIMEOUT_MS, &c);
        ck_assert(run_until(f.e, &c.done, USEC_PER_SEC));
        ck_assert_int_eq(c.status, ND_PROTO_IDENTITY_SIZE);
        ck_assert_uint_eq(c.len, ND_PROTO_IDENTITY_SIZE);
        ck_assert_msg(nd_proto_decode_identity(c.data, c.len, 1, 0, &id, &err) == 0, "%s", err.message);
        ck_assert_str_eq(id.serial, "SIM0001");

        /* a refused request is a STALL */
        ck_assert_int_eq(nd_proto_request_set_depth(&s, 3.0), 0);
        submit(&f, &s, NULL, TIMEOUT_MS, &stall);
        /* an OUT request: status 0, no data */
        ck_assert_int_eq(nd_proto_request_set_depth(&s, 1.0), 0);
        submit(&f, &s, NULL, TIMEOUT_MS, &out);
        ck_assert(run_until(f.e, &out.done, USEC_PER_SEC));
        ck_assert(stall.done);
        ck_assert_int_eq(stall.status, -EPIPE);
        ck_assert_int_eq(out.status, 0);
        ck_assert_uint_eq(out.len, 0);
        nd_penmodel_state st;
        nd_penmodel_get_state(f.model, &st);
        ck_assert_double_eq_tol(st.set_depth_mm, 1.0, 1e-9);

        /* in submission order, as on one EP0 */
        submit_simple(&f, nd_proto_request_get_status, &order[0]);
        submit_simple(&f, nd_proto_request_heartbeat, &order[1]);
        submit_simple(&f, nd_proto_request_get_cartridge, &order[2]);
        ck_assert(run_until(f.e, &order[2].done, USEC_PER_SEC));
        ck_assert(order[0].done && order[1].done);
        ck_assert_uint_lt(order[0].order, order[1].order);
        ck_assert_uint_lt(order[1].order, order[2].order);
        nd_proto_status status;
        nd_proto_cartridge cart;
        ck_assert_int_eq(nd_proto_decode_status(order[0].data, order[0].len, &status, NULL), 0);
        ck_assert_int_eq(nd_proto_decode_cartridge(order[2].data, order[2].len, &cart, NULL), 0);
        ck_assert(!cart.present);

        /* fire and forget: no callback, still done */
        nd_proto_request_heartbeat(&s);
        ck_assert_int_eq(nd_transport_control(f.t, &s, NULL, TIMEOUT_MS, NULL, NULL), 0);
        run_for(f.e, 5 * USEC_PER_MSEC);
        nd_penmodel_get_state(f.model, &st);
        ck_assert(st.watchdog_armed);

        /* the base checks arguments */
        s = (nd_control_setup) { .request_type = ND_PROTO_REQTYPE_OUT, .request = ND_PROTO_REQ_SET_TELEMETRY, .length = 4 };
        ck_assert_int_eq(nd_transport_control(f.t, &s, NULL, TIMEOUT_MS, on_done, &c), -EINVAL);
        fixture_done(&f);
}
END_TEST

/* ---- telemetry ----------------------------------------------------------------------------------- */

typedef struct stream {
        unsigned packets, errors;
        uint64_t samples;
        bool have_last;
        uint32_t last_seq;
        unsigned gaps, repeats;
        nd_transport *free_me; /* free the transport from inside on_packet */
        bool freed;
} stream;

static void on_packet(nd_transport *t, const uint8_t *data, size_t len, void *userdata) {
        stream *st = userdata;
        nd_proto_packet p;
        ck_assert(!st->freed);
        st->packets++;
        if (nd_proto_decode_packet(data, len, &p, NULL) < 0) {
                st->errors++;
                return;
        }
        for (unsigned i = 0; i < p.n_samples; i++) {
                uint32_t seq = p.samples[i].sequence;
                if (st->have_last && seq != (uint32_t) (st->last_seq + 1)) {
                        if ((int32_t) (seq - st->last_seq) <= 0)
                                st->repeats++;
                        else
                                st->gaps++;
                }
                st->have_last = true;
                st->last_seq = seq;
                st->samples++;
        }
        if (st->free_me) {
                nd_transport_free(st->free_me);
                st->free_me = NULL;
                st->freed = true;
        }
}

static void on_gone_fail(nd_transport *t, int status, void *userdata) {
        ck_abort_msg("on_gone with %d", status);
}

START_TEST(test_telemetry_one_second) {
        fixture f;
        fixture_init(&f);
        stream st = {0};
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];
        completion c;

        nd_transport_set_callbacks(f.t, on_packet, on_gone_fail, &st);
        identify(&f);
        ck_assert_int_eq(nd_penmodel_insert_cartridge(f.model, mono_now(), "CART-9", 16), 0);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 1000, true), 0);
        uint64_t enabled_before = mono_now();
        submit(&f, &s, data, TIMEOUT_MS, &c);
        ck_assert_int_eq(nd_transport_start_stream(f.t), 0);
        ck_assert_int_eq(nd_transport_start_stream(f.t), 0); /* idempotent */
        ck_assert(run_until(f.e, &c.done, USEC_PER_SEC));
        ck_assert_int_eq(c.status, 0);

        run_for(f.e, USEC_PER_SEC);
        nd_transport_stop_stream(f.t);
        uint64_t elapsed_ms = (mono_now() - enabled_before) / USEC_PER_MSEC;
        unsigned packets = st.packets;
        run_for(f.e, 20 * USEC_PER_MSEC);
        ck_assert_uint_eq(st.packets, packets); /* stopped means stopped */

        nd_penmodel_state ms;
        nd_penmodel_get_state(f.model, &ms);
        ck_assert_uint_eq(st.errors, 0);
        ck_assert_uint_eq(st.gaps, 0);
        ck_assert_uint_eq(st.repeats, 0);
        ck_assert_uint_eq(ms.samples_dropped, 0);
        ck_assert_uint_eq(st.samples, ms.samples_sent);
        /* the stream flowed for the second, and no more samples came than its time allows (a
         * slow machine only batches more samples per packet; exactness is samples == sent) */
        ck_assert_msg(st.samples >= 500 && st.samples <= elapsed_ms + 1, "%" PRIu64 " samples in %" PRIu64 " ms",
                      st.samples, elapsed_ms);
        ck_assert_uint_le(st.packets, st.samples);
        fixture_done(&f);
}
END_TEST

START_TEST(test_free_inside_on_packet) {
        fixture f;
        fixture_init(&f);
        stream st = {0};
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];
        completion c;

        nd_transport_set_callbacks(f.t, on_packet, on_gone_fail, &st);
        identify(&f);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 1000, true), 0);
        submit(&f, &s, data, TIMEOUT_MS, &c);
        ck_assert(run_until(f.e, &c.done, USEC_PER_SEC));
        run_for(f.e, 20 * USEC_PER_MSEC); /* let samples queue up: several packets due at once */
        /* a request pending too: freeing drops its callback */
        completion pending;
        submit_simple(&f, nd_proto_request_get_status, &pending);
        st.free_me = f.t;
        ck_assert_int_eq(nd_transport_start_stream(f.t), 0);
        ck_assert(run_until(f.e, &st.freed, USEC_PER_SEC));
        f.t = NULL;
        run_for(f.e, 30 * USEC_PER_MSEC);
        ck_assert_uint_eq(st.packets, 1);
        /* the pending request may have completed before the packet, but never after the free */
        fixture_done(&f);
}
END_TEST

/* Pens sampling in step are served by one dispatch: every loop iteration that delivers a packet
 * delivers one of each pen; a pen on another loop is never served by this one; freeing another
 * pen from inside a batch stops its packets at once. */
#define IN_STEP_PENS 3

typedef struct in_step {
        sd_event *running;           /* the loop inside sd_event_run() now */
        sd_event *e;
        nd_transport *t[IN_STEP_PENS + 1];
        nd_penmodel *m[IN_STEP_PENS + 1];
        stream st[IN_STEP_PENS + 1];
        uint64_t iteration[IN_STEP_PENS + 1]; /* the loop iteration of each pen's last packet */
        unsigned mixed;              /* iterations in which some pens got a packet and others not */
        unsigned together;           /* iterations in which every pen got a packet */
        bool counting;
        int free_pen;                /* pen 0 frees this pen on its next packet (-1: none) */
        bool freed_seen;             /* a packet reached a freed pen */
        int free_mode;               /* test_free_other_inside_batch: FREE_* */
        unsigned n_freed;
} in_step;

enum { FREE_NONE, FREE_NOT_YET_SERVED, FREE_ALREADY_SERVED };

static in_step *in_step_fixture;

static void check_iteration(in_step *x, uint64_t it) {
        /* called by pen 0 (every pen is due with it): how many pens were served in it */
        unsigned served = 0;
        for (unsigned i = 1; i < IN_STEP_PENS; i++)
                served += x->t[i] && x->iteration[i] == it;
        if (!x->counting)
                return;
        if (served == IN_STEP_PENS - 1 - (x->free_pen == -2))
                x->together++;
        else
                x->mixed++;
}

static void on_packet_in_step(nd_transport *t, const uint8_t *data, size_t len, void *userdata) {
        in_step *x = in_step_fixture;
        unsigned i = (unsigned) (uintptr_t) userdata;
        uint64_t it;

        ck_assert_ptr_eq(t->event, x->running); /* served by its own loop only */
        if (!x->t[i])
                x->freed_seen = true;
        on_packet(t, data, len, &x->st[i]);
        ck_assert_int_ge(sd_event_get_iteration(t->event, &it), 0);
        x->iteration[i] = it;
}

/* Runs loop e for us, or until *until reaches until_n (when until is given), one iteration at a
 * time; after each iteration in which pen 0 got a packet, counts whether the other pens got
 * theirs in that same iteration, then frees x->free_pen if asked (between batches). */
static void run_in_step_until(in_step *x, sd_event *e, uint64_t us, const unsigned *until, unsigned until_n) {
        uint64_t deadline = mono_now() + us;
        for (uint64_t now; (now = mono_now()) < deadline && !(until && *until >= until_n);) {
                uint64_t before;
                ck_assert_int_ge(sd_event_get_iteration(e, &before), 0);
                x->running = e;
                ck_assert_int_ge(sd_event_run(e, deadline - now), 0);
                x->running = NULL;
                if (e == x->e && x->iteration[0] > before) {
                        check_iteration(x, x->iteration[0]);
                        if (x->free_pen >= 0) {
                                nd_transport_free(x->t[x->free_pen]);
                                x->t[x->free_pen] = NULL;
                                x->free_pen = -2;
                        }
                }
        }
}

/* Identifies the pen and turns its telemetry on at 1 kHz, without waiting for the answers. */
static void start_streaming(nd_transport *t) {
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];

        nd_proto_request_identify(&s, ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR);
        ck_assert_int_eq(nd_transport_control(t, &s, NULL, TIMEOUT_MS, NULL, NULL), 0);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 1000, true), 0);
        ck_assert_int_eq(nd_transport_control(t, &s, data, TIMEOUT_MS, NULL, NULL), 0);
        ck_assert_int_eq(nd_transport_start_stream(t), 0);
}

static void run_in_step(in_step *x, sd_event *e, uint64_t us) {
        run_in_step_until(x, e, us, NULL, 0);
}

START_TEST(test_pens_in_step_one_dispatch) {
        in_step x = { .free_pen = -1 };
        sd_event *other;
        nd_penmodel_config c;

        in_step_fixture = &x;
        ck_assert_int_ge(sd_event_new(&x.e), 0);
        ck_assert_int_ge(sd_event_new(&other), 0);
        uint64_t power_on = mono_now() / USEC_PER_MSEC * USEC_PER_MSEC; /* one phase for all */
        for (unsigned i = 0; i <= IN_STEP_PENS; i++) {
                nd_penmodel_config_init(&c);
                c.seed = i + 1;
                ck_assert_int_eq(nd_penmodel_new(&c, power_on, &x.m[i]), 0);
                /* the last pen lives on another loop, in step with the others all the same */
                ck_assert_int_eq(nd_transport_sim_new(i < IN_STEP_PENS ? x.e : other, x.m[i], &x.t[i]), 0);
                nd_transport_set_callbacks(x.t[i], on_packet_in_step, on_gone_fail, (void *) (uintptr_t) i);
                start_streaming(x.t[i]);
        }
        run_in_step(&x, x.e, 50 * USEC_PER_MSEC);
        run_in_step(&x, other, 5 * USEC_PER_MSEC);
        /* counted batches, not a time: a slow machine (valgrind) only takes longer */
        x.counting = true;
        run_in_step_until(&x, x.e, 20 * USEC_PER_SEC, &x.together, 100);
        /* the other loop was not run meanwhile: its pen got nothing from this one */
        uint64_t other_samples = x.st[IN_STEP_PENS].samples;
        ck_assert_uint_ge(x.together, 100);
        ck_assert_msg(x.mixed == 0, "%u iterations served some pens and not others (%u all)", x.mixed, x.together);

        /* pen 2 freed between batches; the batches go on without it, nothing reaches it */
        x.free_pen = 2;
        x.together = x.mixed = 0;
        run_in_step_until(&x, x.e, 20 * USEC_PER_SEC, &x.together, 30);
        ck_assert(!x.freed_seen);
        ck_assert_uint_ge(x.together, 30);
        ck_assert_uint_eq(x.mixed, 0);
        for (unsigned i = 0; i < IN_STEP_PENS; i++) {
                ck_assert_uint_eq(x.st[i].gaps, 0);
                ck_assert_uint_eq(x.st[i].repeats, 0);
                ck_assert_uint_eq(x.st[i].errors, 0);
        }
        ck_assert_uint_eq(x.st[IN_STEP_PENS].samples, other_samples);

        for (unsigned i = 0; i <= IN_STEP_PENS; i++) {
                nd_transport_free(x.t[i]);
                nd_penmodel_unref(x.m[i]);
        }
        sd_event_unref(other);
        sd_event_unref(x.e);
        in_step_fixture = NULL;
}
END_TEST

/* A pen freed by another pen's callback inside a batch gets nothing more: one that was entered
 * in the batch but not yet served, and one that was already served in it. */
static void on_packet_free_other(nd_transport *t, const uint8_t *data, size_t len, void *userdata) {
        in_step *x = in_step_fixture;
        unsigned i = (unsigned) (uintptr_t) userdata;
        uint64_t it;

        if (!x->t[i]) {
                x->freed_seen = true;
                return;
        }
        ck_assert_int_ge(sd_event_get_iteration(t->event, &it), 0);
        on_packet(t, data, len, &x->st[i]);
        x->iteration[i] = it;
        for (unsigned j = 0; x->free_mode != FREE_NONE && j < IN_STEP_PENS; j++) {
                bool served = x->iteration[j] == it;
                if (j == i || !x->t[j] || served != (x->free_mode == FREE_ALREADY_SERVED))
                        continue;
                nd_transport_free(x->t[j]);
                x->t[j] = NULL;
                x->n_freed++;
                x->free_mode = FREE_NONE;
        }
}

static void run_until_freed(in_step *x, unsigned n_freed) {
        uint64_t deadline = mono_now() + 10 * USEC_PER_SEC;
        while (x->n_freed < n_freed && mono_now() < deadline)
                ck_assert_int_ge(sd_event_run(x->e, 10 * USEC_PER_MSEC), 0);
        ck_assert_uint_eq(x->n_freed, n_freed);
}

START_TEST(test_free_other_inside_batch) {
        in_step x = { .free_pen = -1 };
        nd_penmodel_config c;

        in_step_fixture = &x;
        ck_assert_int_ge(sd_event_new(&x.e), 0);
        uint64_t power_on = mono_now() / USEC_PER_MSEC * USEC_PER_MSEC;
        for (unsigned i = 0; i < IN_STEP_PENS; i++) {
                nd_penmodel_config_init(&c);
                ck_assert_int_eq(nd_penmodel_new(&c, power_on, &x.m[i]), 0);
                ck_assert_int_eq(nd_transport_sim_new(x.e, x.m[i], &x.t[i]), 0);
                nd_transport_set_callbacks(x.t[i], on_packet_free_other, on_gone_fail, (void *) (uintptr_t) i);
                start_streaming(x.t[i]);
        }
        run_for(x.e, 30 * USEC_PER_MSEC);
        /* the first pen served in an iteration frees one the batch has entered, not yet served */
        x.free_mode = FREE_NOT_YET_SERVED;
        run_until_freed(&x, 1);
        run_for(x.e, 20 * USEC_PER_MSEC);
        /* the later of the two left frees the one served before it in the same batch */
        x.free_mode = FREE_ALREADY_SERVED;
        run_until_freed(&x, 2);
        unsigned left = 0;
        for (unsigned i = 0; i < IN_STEP_PENS; i++)
                if (x.t[i])
                        left = i;
        uint64_t before = x.st[left].samples;
        run_for(x.e, 50 * USEC_PER_MSEC);
        ck_assert_uint_gt(x.st[left].samples, before); /* the batch goes on for the pen left */
        ck_assert(!x.freed_seen);                      /* nothing reached a freed pen */
        ck_assert_uint_eq(x.st[left].gaps + x.st[left].repeats + x.st[left].errors, 0);
        for (unsigned i = 0; i < IN_STEP_PENS; i++) {
                nd_transport_free(x.t[i]);
                nd_penmodel_unref(x.m[i]);
        }
        sd_event_unref(x.e);
        in_step_fixture = NULL;
}
END_TEST

/* ---- faults, unplug, free ----------------------------------------------------------------------- */

START_TEST(test_unresponsive_times_out) {
        fixture f;
        fixture_init(&f);
        stream st = {0};
        completion first, second, after;
        nd_control_setup s;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];

        nd_transport_set_callbacks(f.t, on_packet, on_gone_fail, &st);
        identify(&f);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&s, data, 1000, true), 0);
        submit(&f, &s, data, TIMEOUT_MS, &after);
        ck_assert_int_eq(nd_transport_start_stream(f.t), 0);
        ck_assert(run_until(f.e, &after.done, USEC_PER_SEC));
        run_for(f.e, 20 * USEC_PER_MSEC);
        ck_assert_uint_gt(st.samples, 0);

        ck_assert_int_eq(nd_penmodel_inject_fault(f.model, mono_now(), ND_PENMODEL_FAULT_UNRESPONSIVE), 0);
        uint64_t submitted = mono_now();
        nd_proto_request_heartbeat(&s);
        submit(&f, &s, NULL, 100, &first);
        submit(&f, &s, NULL, 50, &second);
        uint64_t samples = st.samples;
        ck_assert(run_until(f.e, &second.done, USEC_PER_SEC));
        ck_assert(first.done);
        ck_assert_int_eq(first.status, -ETIMEDOUT);
        ck_assert_int_eq(second.status, -ETIMEDOUT);
        /* not before its timeout; the second waited behind the first */
        ck_assert_uint_ge(first.at_us - submitted, 100 * USEC_PER_MSEC);
        ck_assert_uint_lt(first.order, second.order);
        ck_assert_uint_eq(st.samples, samples); /* and no telemetry */

        /* clear: answers again and streams again (noticed by the idle poll) */
        ck_assert_int_eq(nd_penmodel_inject_fault(f.model, mono_now(), ND_PENMODEL_FAULT_CLEAR), 0);
        submit_simple(&f, nd_proto_request_heartbeat, &after);
        ck_assert(run_until(f.e, &after.done, USEC_PER_SEC));
        ck_assert_int_eq(after.status, 0);
        run_for(f.e, 50 * USEC_PER_MSEC);
        ck_assert_uint_gt(st.samples, samples);
        ck_assert_uint_eq(st.errors, 0);
        ck_assert_uint_eq(st.gaps, 1); /* the silent period */
        fixture_done(&f);
}
END_TEST

typedef struct gone_state {
        bool gone;
        int status;
        unsigned calls;
        completion *pending; /* must have completed before on_gone */
} gone_state;

static void on_gone_record(nd_transport *t, int status, void *userdata) {
        gone_state *g = userdata;
        g->gone = true;
        g->status = status;
        g->calls++;
        ck_assert(t->gone);
        if (g->pending)
                ck_assert(g->pending->done);
        /* requests after the departure fail at once */
        nd_control_setup s;
        nd_proto_request_heartbeat(&s);
        ck_assert_int_eq(nd_transport_control(t, &s, NULL, TIMEOUT_MS, on_done, NULL), -ENODEV);
}

static void on_packet_ignore(nd_transport *t, const uint8_t *data, size_t len, void *userdata) {
}

START_TEST(test_unplug) {
        fixture f;
        fixture_init(&f);
        gone_state g = {0};
        completion pending;

        nd_transport_set_callbacks(f.t, on_packet_ignore, on_gone_record, &g);
        identify(&f);
        ck_assert_int_eq(nd_transport_start_stream(f.t), 0);
        submit_simple(&f, nd_proto_request_get_status, &pending);
        g.pending = &pending;
        ck_assert_int_eq(nd_transport_sim_unplug(f.t), 0);
        ck_assert_int_eq(nd_transport_sim_unplug(f.t), 0); /* idempotent */
        ck_assert(!g.gone);                                   /* reported from the loop */
        ck_assert(!pending.done);
        ck_assert(run_until(f.e, &g.gone, USEC_PER_SEC));
        ck_assert_int_eq(pending.status, -ENODEV);
        ck_assert_int_eq(g.status, -ENODEV);
        run_for(f.e, 20 * USEC_PER_MSEC);
        ck_assert_uint_eq(g.calls, 1);

        nd_control_setup s;
        nd_proto_request_heartbeat(&s);
        ck_assert_int_eq(nd_transport_control(f.t, &s, NULL, TIMEOUT_MS, NULL, NULL), -ENODEV);
        ck_assert_int_eq(nd_transport_start_stream(f.t), -ENODEV);
        nd_transport_stop_stream(f.t);
        fixture_done(&f);
}
END_TEST

static void on_done_unexpected(nd_transport *t, int status, const uint8_t *data, size_t len, void *userdata) {
        ck_abort_msg("callback after free: status %d", status);
}

START_TEST(test_free_with_pending) {
        fixture f;
        fixture_init(&f);
        nd_control_setup s;

        nd_transport_set_callbacks(f.t, on_packet_ignore, on_gone_fail, NULL);
        nd_proto_request_identify(&s, 1, 0);
        for (int i = 0; i < 3; i++)
                ck_assert_int_eq(nd_transport_control(f.t, &s, NULL, TIMEOUT_MS, on_done_unexpected, NULL), 0);
        ck_assert_int_eq(nd_transport_start_stream(f.t), 0);
        nd_transport_free(f.t);
        f.t = NULL;
        run_for(f.e, 30 * USEC_PER_MSEC);

        /* also with an unanswered request waiting for its timeout, and after an unplug */
        ck_assert_int_eq(nd_transport_sim_new(f.e, f.model, &f.t), 0);
        ck_assert_int_eq(nd_penmodel_inject_fault(f.model, mono_now(), ND_PENMODEL_FAULT_UNRESPONSIVE), 0);
        ck_assert_int_eq(nd_transport_control(f.t, &s, NULL, 20, on_done_unexpected, NULL), 0);
        run_for(f.e, 5 * USEC_PER_MSEC);
        ck_assert_int_eq(nd_transport_sim_unplug(f.t), 0);
        nd_transport_free(f.t);
        f.t = NULL;
        run_for(f.e, 40 * USEC_PER_MSEC);

        /* the transport kept its own reference on the model */
        ck_assert_int_eq(nd_transport_sim_new(f.e, f.model, &f.t), 0);
        nd_penmodel_unref(f.model);
        f.model = NULL;
        ck_assert_ptr_nonnull(nd_transport_sim_get_model(f.t));
        ck_assert_int_eq(nd_penmodel_inject_fault(nd_transport_sim_get_model(f.t), mono_now(), ND_PENMODEL_FAULT_CLEAR), 0);
        identify(&f);
        fixture_done(&f);
}
END_TEST

typedef struct free_in_done {
        nd_transport *t;
        unsigned calls;
} free_in_done;

static void on_done_free(nd_transport *t, int status, const uint8_t *data, size_t len, void *userdata) {
        free_in_done *x = userdata;
        x->calls++;
        ck_assert_int_eq(status, ND_PROTO_IDENTITY_SIZE);
        nd_transport_free(x->t);
        x->t = NULL;
}

START_TEST(test_free_inside_done) {
        fixture f;
        fixture_init(&f);
        free_in_done x = { .t = f.t };
        nd_control_setup s;
        bool never = false;

        nd_proto_request_identify(&s, 1, 0);
        ck_assert_int_eq(nd_transport_control(f.t, &s, NULL, TIMEOUT_MS, on_done_free, &x), 0);
        ck_assert_int_eq(nd_transport_control(f.t, &s, NULL, TIMEOUT_MS, on_done_unexpected, NULL), 0);
        f.t = NULL;
        run_until(f.e, &never, 30 * USEC_PER_MSEC);
        ck_assert_uint_eq(x.calls, 1);
        ck_assert_ptr_null(x.t);
        fixture_done(&f);
}
END_TEST

START_TEST(test_not_a_sim_transport) {
        ck_assert_int_eq(nd_transport_sim_unplug(NULL), -EINVAL);
        ck_assert_ptr_null(nd_transport_sim_get_model(NULL));
        nd_transport *t = NULL;
        ck_assert_int_eq(nd_transport_sim_new(NULL, NULL, &t), -EINVAL);
        ck_assert_ptr_null(t);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("transport-sim");
        TCase *tc = tcase_create("sim");
        tcase_set_timeout(tc, 60);
        tcase_add_test(tc, test_identify_over_sim);
        tcase_add_test(tc, test_telemetry_one_second);
        tcase_add_test(tc, test_free_inside_on_packet);
        tcase_add_test(tc, test_pens_in_step_one_dispatch);
        tcase_add_test(tc, test_free_other_inside_batch);
        tcase_add_test(tc, test_unresponsive_times_out);
        tcase_add_test(tc, test_unplug);
        tcase_add_test(tc, test_free_with_pending);
        tcase_add_test(tc, test_free_inside_done);
        tcase_add_test(tc, test_not_a_sim_transport);
        suite_add_tcase(s, tc);
        return s;
}
