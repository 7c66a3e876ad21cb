/* history.c: Manager.GetHistory and Manager.GetCartridge, read from the ledger off the loop (ledger-reader.c). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bus-int.h"
#include "daemon.h"
#include "errors.h"
#include "history.h"
#include "ledger-reader.h"
#include "log.h"
#include "pen.h"
#include "util.h"

/* Longest cartridge id GetCartridge accepts (the ledger stores longer names, pens send 32). */

typedef struct history_filter {
        const char *pen;
        uint64_t since_us;
        uint64_t before_us;
        uint32_t limit;
} history_filter;

static int parse_filter(sd_bus_message *m, history_filter *f, sd_bus_error *error) {
        int r = sd_bus_message_rewind(m, true);
        if (r >= 0)
                r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a filter a{sv}");
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *key;
                if (sd_bus_message_read(m, "s", &key) < 0)
                        return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed filter");
                if (STREQ(key, "pen")) {
                        if (sd_bus_message_read(m, "v", "s", &f->pen) < 0)
                                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Filter pen must be a string (s)");
                        if (strlen(f->pen) > ND_LEDGER_NAME_MAX)
                                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Filter pen is too long");
                } else if (STREQ(key, "since")) {
                        r = nd_bus_read_variant_uint(m, "Filter since (µs since the epoch)", 0, UINT64_MAX, &f->since_us, error);
                        if (r < 0)
                                return r;
                } else if (STREQ(key, "before")) {
                        r = nd_bus_read_variant_uint(m, "Filter before (µs since the epoch)", 0, UINT64_MAX, &f->before_us, error);
                        if (r < 0)
                                return r;
                } else if (STREQ(key, "limit")) {
                        uint64_t limit;
                        r = nd_bus_read_variant_uint(m, "Filter limit", 0, UINT32_MAX, &limit, error);
                        if (r < 0)
                                return r;
                        f->limit = (uint32_t) limit;
                } else {
                        _cleanup_free_ char *shown = nd_text_sanitize(key, strlen(key), 64);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Unknown filter key '%s' (GetHistory knows pen, since, before, limit)", strempty(shown));
                }
                if (sd_bus_message_exit_container(m) < 0)
                        return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed filter");
        }
        return r < 0 ? sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed filter") : 0;
}

static int append_session(sd_bus_message *reply, const nd_ledger_session *s, const char *area) {
        int r = sd_bus_message_open_container(reply, 'a', "{sv}");
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}", "id", "s", s->id, "pen", "s",
                                          strempty(s->pen_serial), "cartridge", "s", strempty(s->cartridge_id), "profile",
                                          "s", strempty(s->profile_name), "profile_digest", "s", strempty(s->profile_digest),
                                          "limits_digest", "s", strempty(s->limits_digest), "label", "s", strempty(s->label));
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}", "owner_uid", "u", s->owner_uid, "owner_pid", "u",
                                          s->owner_pid, "start", "t", s->start_us, "end", "t", s->end_us, "duration_s", "d",
                                          s->stats.duration_s);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}", "strokes", "t", s->stats.strokes,
                                          "max_depth_mm", "d", s->stats.max_depth_mm, "max_speed_hz", "d",
                                          s->stats.max_speed_hz, "max_temperature_c", "d", s->stats.max_temperature_c,
                                          "max_current_ma", "d", s->stats.max_current_ma, "reason", "s", strempty(s->reason),
                                          "needles", "u", s->needles);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}", "skin_type", "s", strempty(s->skin_type),
                                          "punctures", "t", s->stats.punctures, "density_per_cm2", "d",
                                          s->stats.density_per_cm2, "area_cm2", "d", s->area_cm2);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", "area", "s", strempty(area));
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

/* A reply is built in slices of this many sessions, one slice per loop iteration at idle priority:
 * marshalling 1,000 sessions takes 5-13 ms here (25: under 1 ms), and the pens' samples must not wait that long. */
#define HISTORY_REPLY_SLICE 25u

typedef struct history_reply {
        nd_ledger_job *job;
        sd_bus_message *reply;
        size_t next;                    /* the next session to append */
        uint64_t loop_ns;               /* time spent on the loop building it */
        uint64_t longest_slice_ns;
} history_reply;

static void history_reply_free(void *userdata) {
        history_reply *h = userdata;
        if (!h)
                return;
        nd_ledger_job_free(h->job);
        sd_bus_message_unref(h->reply);
        free(h);
}

static uint64_t monotonic_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * UINT64_C(1000000000) + (uint64_t) ts.tv_nsec;
}

static int history_reply_slice(sd_event_source *s, void *userdata) {
        history_reply *h = userdata;
        nd_ledger_job *job = h->job;
        uint64_t t0 = monotonic_ns();
        size_t end = MIN(job->n_sessions, h->next + HISTORY_REPLY_SLICE);
        int r = 0;

        for (; r >= 0 && h->next < end; h->next++)
                r = append_session(h->reply, &job->sessions[h->next], job->areas ? job->areas[h->next] : NULL);
        if (r >= 0 && h->next < job->n_sessions) {
                uint64_t dt = monotonic_ns() - t0;
                h->loop_ns += dt;
                h->longest_slice_ns = MAX(h->longest_slice_ns, dt);
                return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(h->reply);
        if (r < 0)
                (void) sd_bus_reply_method_errorf(job->message, ND_ERROR_INTERNAL, "Could not build the reply: %s",
                                                  strerror(-r));
        else
                (void) sd_bus_send(NULL, h->reply, NULL);
        uint64_t dt = monotonic_ns() - t0;
        h->loop_ns += dt;
        h->longest_slice_ns = MAX(h->longest_slice_ns, dt);
        /* What the loop spent on the reply (the query ran off the loop), for docs/performance.md. */
        nd_log_debug("GetHistory: %zu sessions; query %.1f ms off the loop, reply %.2f ms on it in %zu "
                     "slice(s), the longest %.3f ms", job->n_sessions, (double) job->query_us / 1000.0,
                     (double) h->loop_ns / 1e6, (job->n_sessions + HISTORY_REPLY_SLICE - 1) / HISTORY_REPLY_SLICE,
                     (double) h->longest_slice_ns / 1e6);
        /* Take the loop's reference back and drop it: the destroy callback frees h. */
        (void) sd_event_source_set_floating(s, false);
        sd_event_source_disable_unref(s);
        return 0;
}

/* The query of a GetHistory is done (on the loop): its reply is built in slices. */
static void history_done(nd_ledger_job *job, void *userdata) {
        nd_daemon *d = userdata;
        history_reply *h = NULL;
        int r;

        if (job->result < 0) {
                (void) sd_bus_reply_method_errorf(job->message, ND_ERROR_STORAGE, "The ledger could not be read: %s",
                                                  job->error);
                nd_ledger_job_free(job);
                return;
        }
        h = calloc(1, sizeof *h);
        if (!h) {
                (void) sd_bus_reply_method_errorf(job->message, ND_ERROR_INTERNAL, "Out of memory");
                nd_ledger_job_free(job);
                return;
        }
        h->job = job;
        r = sd_bus_message_new_method_return(job->message, &h->reply);
        if (r >= 0)
                r = sd_bus_message_open_container(h->reply, 'a', "a{sv}");
        sd_event_source *s = NULL;
        if (r >= 0)
                r = sd_event_add_defer(d->event, &s, history_reply_slice, h);
        if (r >= 0) {
                /* The loop owns the source and, through its destroy callback, h: a reply still being
                 * built when the daemon exits is freed with the loop. */
                (void) sd_event_source_set_destroy_callback(s, history_reply_free);
                (void) sd_event_source_set_priority(s, SD_EVENT_PRIORITY_IDLE);
                (void) sd_event_source_set_description(s, "history-reply");
                (void) sd_event_source_set_floating(s, true);
                return;
        }
        (void) sd_bus_reply_method_errorf(job->message, ND_ERROR_INTERNAL, "Could not build the reply: %s", strerror(-r));
        history_reply_free(h);
}

/* Hands a job to the ledger reader, which answers m from its done callback; on failure answers m
 * here. The ledger is read off the loop: a query on pages out of the page cache takes seconds. */
static void submit_read(nd_daemon *d, sd_bus_message *m, nd_ledger_job *job, nd_ledger_job_done_t done) {
        _cleanup_(nd_ledger_job_freep) nd_ledger_job *owned = job;
        int r;

        if (!d->ledger) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_STORAGE, "The treatment ledger is not available: %s",
                                                  strempty(d->ledger_error));
                return;
        }
        if (!d->ledger_reader) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_STORAGE, "The treatment ledger cannot be read: %s",
                                                  strempty(d->ledger_reader_error));
                return;
        }
        job->message = sd_bus_message_ref(m);
        job->done = done;
        job->userdata = d;
        r = nd_ledger_reader_submit(d->ledger_reader, job);
        if (r == -EAGAIN)
                (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                                  "%u ledger queries are already waiting; try again when they are answered",
                                                  ND_LEDGER_READER_QUEUE_MAX);
        else if (r < 0)
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INTERNAL, "Could not queue the ledger query: %s",
                                                  strerror(-r));
        else
                TAKE_PTR(owned);
}

void nd_history_get_history_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                       const nd_caller *caller, void *userdata) {
        nd_daemon *d = userdata;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        history_filter f = { .limit = 0 };
        nd_ledger_job *job;

        if (!allowed) {
                (void) sd_bus_reply_method_error(m, auth_error);
                return;
        }
        if (parse_filter(m, &f, &error) < 0) {
                (void) sd_bus_reply_method_error(m, &error);
                return;
        }
        job = nd_ledger_job_new(ND_LEDGER_JOB_HISTORY);
        if (!job || (f.pen && !(job->pen_serial = strdup(f.pen)))) {
                nd_ledger_job_free(job);
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INTERNAL, "Out of memory");
                return;
        }
        job->history = (nd_ledger_history_filter) {
                .since_us = f.since_us, .before_us = f.before_us, .limit = f.limit,
        };
        submit_read(d, m, job, history_done);
}

static void cartridge_done(nd_ledger_job *job, void *userdata) {
        _cleanup_(nd_ledger_job_freep) nd_ledger_job *owned = job;
        nd_daemon *d = userdata;
        const nd_ledger_cartridge *c = &job->cartridge;
        const char *state;

        if (job->result == -ENOENT) {
                (void) sd_bus_reply_method_return(job->message, "a{sv}", 6, "id", "s", job->cartridge_id, "state", "s",
                                                  "fresh", "first_used", "t", UINT64_C(0), "runtime_s", "u", 0u,
                                                  "sessions", "u", 0u, "needles", "u", 0u);
                return;
        }
        if (job->result < 0) {
                (void) sd_bus_reply_method_errorf(job->message, ND_ERROR_STORAGE, "The ledger could not be read: %s",
                                                  job->error);
                return;
        }
        state = nd_ledger_cartridge_state_to_string(c->state);
        if (d->limits && c->state != ND_LEDGER_CARTRIDGE_SPENT) {
                bool allowed = false;
                for (size_t i = 0; i < d->limits->cartridge.n_allowed_needles; i++)
                        allowed = allowed || d->limits->cartridge.allowed_needles[i] == c->needles;
                if (!allowed)
                        state = "rejected";
        }
        (void) sd_bus_reply_method_return(job->message, "a{sv}", 6, "id", "s", c->id, "state", "s", state, "first_used",
                                          "t", c->first_used_us, "runtime_s", "u", (uint32_t) c->runtime_s, "sessions",
                                          "u", (uint32_t) MIN(c->sessions, (uint64_t) UINT32_MAX), "needles", "u",
                                          c->needles);
}

int nd_history_method_get_cartridge(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        nd_ledger_job *job;
        const char *id;

        if (sd_bus_message_read(m, "s", &id) < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a cartridge id");
        if (id[0] == '\0' || strlen(id) > ND_CARTRIDGE_ID_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "A cartridge id has 1 to %u bytes", ND_CARTRIDGE_ID_MAX);
        job = nd_ledger_job_new(ND_LEDGER_JOB_CARTRIDGE);
        if (!job)
                return sd_bus_error_set(error, ND_ERROR_INTERNAL, "Out of memory");
        snprintf(job->cartridge_id, sizeof job->cartridge_id, "%s", id);
        submit_read(d, m, job, cartridge_done);
        return 1;
}
