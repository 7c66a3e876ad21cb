/* transport-sim.c: the pen model behind the nd_transport interface, on sd-event timers. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "transport-sim.h"
#include "util.h"

typedef struct sim_request {
        struct sim_request *next;
        nd_control_setup setup;
        uint8_t *data;          /* OUT: the copied data stage; IN: room for the reply */
        uint32_t timeout_ms;
        uint64_t submitted_us;
        nd_control_done_fn done;
        void *userdata;
} sim_request;

typedef struct sim_transport sim_transport;
struct sim_transport {
        nd_transport base; /* first: the interface casts */
        sim_transport *prev, *next; /* every simulated transport of the process (all_sims) */
        nd_penmodel *model; /* a reference of our own */

        sd_event_source *control_timer; /* answers the queue head, or times it out */
        sd_event_source *stream_timer;  /* the next telemetry due time */
        sd_event_source *gone_defer;    /* the unplug, reported from the loop */

        sim_request *head, *tail;       /* EP0 is one pipe: requests are served in order */
        bool head_unanswered;           /* the model did not answer the head: waiting for its timeout */

        bool streaming;
        bool unplugged;
        unsigned dispatching;           /* inside an event handler: a free must wait for it */
        bool free_requested;
};

/* Packets of every simulated pen on one loop that are due together go out in one dispatch
 * (on_stream_timer), so pens sampling in step cost one loop turn per sample period, not one per
 * pen. At most this many pens are served by one dispatch; the rest by their own timers. */
#define SIM_BATCH_MAX 32

static const nd_transport_ops sim_ops;
static sim_transport *all_sims; /* the daemon is single-threaded, as its loop is */

static sim_transport *sim_of(nd_transport *t) {
        return t && t->ops == &sim_ops ? (sim_transport *) t : NULL;
}

/* The current CLOCK_MONOTONIC time, not the loop's cached iteration time: a timeout counts from
 * the real moment of submission, and the model sees when a request really arrived. */
static uint64_t loop_now(sim_transport *s) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static void request_free(sim_request *r) {
        if (r) {
                free(r->data);
                free(r);
        }
}

static sim_request *queue_pop(sim_transport *s) {
        sim_request *r = s->head;
        if (r) {
                s->head = r->next;
                if (!s->head)
                        s->tail = NULL;
                r->next = NULL;
        }
        s->head_unanswered = false;
        return r;
}

static void really_free(sim_transport *s) {
        sim_request *r;
        if (s->prev)
                s->prev->next = s->next;
        else if (all_sims == s)
                all_sims = s->next;
        if (s->next)
                s->next->prev = s->prev;
        while ((r = queue_pop(s)))
                request_free(r);
        sd_event_source_disable_unref(s->control_timer);
        sd_event_source_disable_unref(s->stream_timer);
        sd_event_source_disable_unref(s->gone_defer);
        nd_penmodel_unref(s->model);
        sd_event_unref(s->base.event);
        free(s->base.description);
        free(s);
}

/* Event handlers bracket their callbacks with enter/leave: a callback may free the transport,
 * and the memory must outlive the handler. leave() returns true when the transport is gone. */
static void enter(sim_transport *s) {
        s->dispatching++;
}

static bool leave(sim_transport *s) {
        if (--s->dispatching == 0 && s->free_requested) {
                really_free(s);
                return true;
        }
        return false;
}

/* Arms a one-shot timer at an absolute CLOCK_MONOTONIC time (1 µs accuracy). */
static int arm(sd_event_source *src, uint64_t when_us) {
        int r = sd_event_source_set_time(src, when_us);
        if (r < 0)
                return r;
        return sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
}

/* At a sample period this long or longer (the idle rate, 2 Hz) a sample rides on the next
 * control request (the host's heartbeat, every 125 ms: on_control_timer serves what is due
 * first); its own timer is a backstop half a period late (250 ms at 2 Hz: past the next
 * heartbeat). So an idle pen wakes the loop for its heartbeats only. A sample's device time is
 * its due time however late it is delivered. At shorter periods (full rate; a re-rate re-arms
 * from its reply) samples are served on time. */
#define SIM_COALESCE_FROM_USEC (100 * USEC_PER_MSEC)

static void stream_rearm(sim_transport *s) {
        if (!s->streaming || s->unplugged || s->free_requested)
                return;
        uint64_t now = loop_now(s), due = nd_penmodel_next_due_us(s->model);
        if (due == UINT64_MAX)
                due = now + ND_TRANSPORT_SIM_IDLE_POLL_MS * USEC_PER_MSEC;
        else if (due > now) {
                unsigned rate = nd_penmodel_telemetry_rate_hz(s->model);
                uint64_t period = rate > 0 ? USEC_PER_SEC / rate : 0;
                if (period >= SIM_COALESCE_FROM_USEC)
                        due += period / 2;
        }
        (void) arm(s->stream_timer, MAX(due, now));
}

static void control_rearm(sim_transport *s) {
        if (!s->head || s->unplugged || s->free_requested) {
                (void) sd_event_source_set_enabled(s->control_timer, SD_EVENT_OFF);
                return;
        }
        if (!s->head_unanswered) {
                (void) arm(s->control_timer, loop_now(s));
                return;
        }
        if (s->head->timeout_ms == 0) {
                /* no timeout: like a hung EP0 under libusb with timeout 0, it waits for ever */
                (void) sd_event_source_set_enabled(s->control_timer, SD_EVENT_OFF);
                return;
        }
        (void) arm(s->control_timer, s->head->submitted_us + (uint64_t) s->head->timeout_ms * USEC_PER_MSEC);
}

static bool stream_due(const sim_transport *s, uint64_t now);
static void stream_serve(sim_transport *s, uint64_t now);

static int on_control_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        sim_transport *s = userdata;
        sim_request *r = s->head;
        int status;

        if (!r || s->unplugged)
                return 0;
        enter(s);
        /* Telemetry due by now goes first, as a pen sends it before its answer (at the idle rate
         * this is how samples ride on the heartbeat's wake-up: stream_rearm). */
        uint64_t now = loop_now(s);
        if (stream_due(s, now)) {
                stream_serve(s, now);
                stream_rearm(s);
                r = s->head;
                if (!r || s->unplugged || s->free_requested) {
                        leave(s);
                        return 0;
                }
        }
        if (s->head_unanswered)
                status = -ETIMEDOUT;
        else {
                bool in = r->setup.request_type & ND_CONTROL_DIR_IN;
                status = nd_penmodel_control(s->model, loop_now(s), &r->setup, r->data, r->setup.length);
                if (status == -ETIMEDOUT) {
                        s->head_unanswered = true;
                        control_rearm(s);
                        leave(s);
                        return 0;
                }
                if (!in && status > 0)
                        status = 0;
        }

        queue_pop(s);
        /* a request may have changed the telemetry schedule */
        stream_rearm(s);
        if (r->done) {
                bool in = r->setup.request_type & ND_CONTROL_DIR_IN;
                size_t len = in && status > 0 ? (size_t) status : 0;
                r->done(&s->base, status, len > 0 ? r->data : NULL, len, r->userdata);
        }
        request_free(r);
        if (!s->free_requested)
                control_rearm(s);
        leave(s);
        return 0;
}

static bool stream_due(const sim_transport *s, uint64_t now) {
        return s->streaming && !s->unplugged && !s->free_requested && nd_penmodel_next_due_us(s->model) <= now;
}

static void stream_serve(sim_transport *s, uint64_t now) {
        uint8_t buf[ND_PROTO_TELEMETRY_MAX_PACKET];

        while (s->streaming && !s->unplugged && !s->free_requested) {
                int len = nd_penmodel_next_packet(s->model, now, buf, sizeof buf);
                if (len <= 0)
                        break;
                if (s->base.on_packet)
                        s->base.on_packet(&s->base, buf, (size_t) len, s->base.userdata);
        }
}

/* Serves this pen and every other simulated pen on the same loop with a packet due now: their
 * own timers are then re-armed past now and do not fire for it. Each transport is entered
 * before any callback runs, so a callback that frees one of them (its own or another) leaves
 * the memory in place until it is left. */
static int on_stream_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        sim_transport *s = userdata, *batch[SIM_BATCH_MAX];
        size_t n = 0;

        uint64_t now = loop_now(s);
        enter(s);
        batch[n++] = s;
        for (sim_transport *o = all_sims; o && n < SIM_BATCH_MAX; o = o->next)
                if (o != s && o->base.event == s->base.event && o->dispatching == 0 && stream_due(o, now)) {
                        enter(o);
                        batch[n++] = o;
                }
        for (size_t i = 0; i < n; i++)
                stream_serve(batch[i], now);
        for (size_t i = 0; i < n; i++) {
                stream_rearm(batch[i]);
                leave(batch[i]);
        }
        return 0;
}

static int on_gone(sd_event_source *src, void *userdata) {
        sim_transport *s = userdata;
        sim_request *r;

        enter(s);
        while (!s->free_requested && (r = queue_pop(s))) {
                if (r->done)
                        r->done(&s->base, -ENODEV, NULL, 0, r->userdata);
                request_free(r);
        }
        if (!s->free_requested)
                nd_transport_report_gone(&s->base, -ENODEV);
        leave(s);
        return 0;
}

/* ---- Operations ----------------------------------------------------------------------------------- */

static int sim_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                       uint32_t timeout_ms, nd_control_done_fn done, void *userdata) {
        sim_transport *s = (sim_transport *) t; /* ops are only reached through our own table */
        bool in = setup->request_type & ND_CONTROL_DIR_IN;

        sim_request *r = calloc(1, sizeof *r);
        if (!r)
                return -ENOMEM;
        if (setup->length > 0) {
                r->data = malloc(setup->length);
                if (!r->data) {
                        free(r);
                        return -ENOMEM;
                }
                if (in)
                        memset(r->data, 0, setup->length);
                else
                        memcpy(r->data, out_data, setup->length);
        }
        r->setup = *setup;
        r->timeout_ms = timeout_ms;
        r->submitted_us = loop_now(s);
        r->done = done;
        r->userdata = userdata;

        bool was_empty = !s->head;
        if (s->tail)
                s->tail->next = r;
        else
                s->head = r;
        s->tail = r;
        if (was_empty)
                control_rearm(s);
        return 0;
}

static int sim_start_stream(nd_transport *t) {
        sim_transport *s = (sim_transport *) t; /* ops are only reached through our own table */
        if (s->unplugged)
                return -ENODEV;
        if (s->streaming)
                return 0;
        s->streaming = true;
        /* poll at once: samples may be waiting */
        return arm(s->stream_timer, loop_now(s));
}

static void sim_stop_stream(nd_transport *t) {
        sim_transport *s = (sim_transport *) t; /* ops are only reached through our own table */
        s->streaming = false;
        (void) sd_event_source_set_enabled(s->stream_timer, SD_EVENT_OFF);
}

static void sim_free(nd_transport *t) {
        sim_transport *s = sim_of(t);
        if (!s)
                return;
        s->free_requested = true;
        (void) sd_event_source_set_enabled(s->control_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(s->stream_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(s->gone_defer, SD_EVENT_OFF);
        if (s->dispatching == 0)
                really_free(s);
}

static const nd_transport_ops sim_ops = {
        .control = sim_control,
        .start_stream = sim_start_stream,
        .stop_stream = sim_stop_stream,
        .free = sim_free,
};

int nd_transport_sim_new(sd_event *e, nd_penmodel *model, nd_transport **ret) {
        int r;

        if (!e || !model || !ret)
                return -EINVAL;
        sim_transport *s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->base.ops = &sim_ops;
        s->base.event = sd_event_ref(e);
        s->model = nd_penmodel_ref(model);
        if (asprintf(&s->base.description, "simulated pen %s", nd_penmodel_get_config(model)->serial) < 0) {
                s->base.description = NULL;
                r = -ENOMEM;
                goto fail;
        }
        r = sd_event_add_time(e, &s->control_timer, CLOCK_MONOTONIC, 0, 1, on_control_timer, s);
        if (r < 0)
                goto fail;
        r = sd_event_add_time(e, &s->stream_timer, CLOCK_MONOTONIC, 0, 1, on_stream_timer, s);
        if (r < 0)
                goto fail;
        r = sd_event_add_defer(e, &s->gone_defer, on_gone, s);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_description(s->control_timer, "sim-pen-control");
        (void) sd_event_source_set_description(s->stream_timer, "sim-pen-telemetry");
        (void) sd_event_source_set_description(s->gone_defer, "sim-pen-unplug");
        if ((r = sd_event_source_set_enabled(s->control_timer, SD_EVENT_OFF)) < 0 ||
            (r = sd_event_source_set_enabled(s->stream_timer, SD_EVENT_OFF)) < 0 ||
            (r = sd_event_source_set_enabled(s->gone_defer, SD_EVENT_OFF)) < 0)
                goto fail;
        s->next = all_sims;
        if (all_sims)
                all_sims->prev = s;
        all_sims = s;
        *ret = &s->base;
        return 0;

fail:
        really_free(s);
        return r;
}

int nd_transport_sim_unplug(nd_transport *t) {
        sim_transport *s = sim_of(t);
        if (!s)
                return -EINVAL;
        if (s->unplugged)
                return 0;
        s->unplugged = true;
        s->streaming = false;
        (void) sd_event_source_set_enabled(s->stream_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(s->control_timer, SD_EVENT_OFF);
        return sd_event_source_set_enabled(s->gone_defer, SD_EVENT_ONESHOT);
}

nd_penmodel *nd_transport_sim_get_model(nd_transport *t) {
        sim_transport *s = sim_of(t);
        return s ? s->model : NULL;
}
