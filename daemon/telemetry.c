/* telemetry.c: signal batching for watchers, SOCK_SEQPACKET and pipe readers (see telemetry.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <limits.h>
#include <sys/socket.h>
#include <unistd.h>

#include "daemon.h"
#include "log.h"
#include "telemetry.h"
#include "util.h"

/* Samples held between two batches; at 1 kHz a batch holds about 50. Reaching this flushes. */
#define BATCH_CAPACITY 512u

typedef struct reader {
        int fd;                      /* our end, non-blocking */
        bool pipe;                   /* a pipe's write end (OpenTelemetryPipe), else a socket */
        sd_event_source *hangup;     /* notices the client closing its end */
        uint32_t dropped;            /* records this reader lost so far */
        nd_telemetry *owner;
} reader;

struct nd_telemetry {
        sd_event *event;
        sd_bus *bus;
        char *path;
        sd_event_source *batch_timer;
        /* BATCH_CAPACITY samples, allocated apart and not zeroed: a batch fills from the start and
         * is sent every 50 ms, so only its first entries are used while the loop keeps up and
         * the rest of the memory is never touched. */
        nd_telemetry_sample *batch;
        unsigned n_batch;
        reader *readers[ND_TELEMETRY_READERS_MAX];
        unsigned n_readers;
        uint64_t dropped_total;
        uint64_t batches_dropped;    /* Telemetry signals not queued: the bus backlog was full */
        bool backlog_reported;       /* logged once per backlog episode */
        /* The callers of WatchTelemetry(): sd-bus drops a name from it when it leaves the bus. */
        sd_bus_track *watchers;
        /* Told when demand (watchers + readers) appears or goes. */
        nd_telemetry_demand_fn demand_fn;
        void *demand_userdata;
        bool had_demand;
        struct watcher_check *checks[ND_TELEMETRY_WATCHERS_MAX];
};

/* A GetNameOwner in flight for a new watcher; telemetry is NULLed when the fan-out goes first. */
typedef struct watcher_check {
        nd_telemetry *telemetry;
        char *name;
} watcher_check;

/* Tells the owner when there is demand now and there was none, or the reverse. */
static void telemetry_demand_update(nd_telemetry *t) {
        bool demand = nd_telemetry_has_demand(t);
        if (demand == t->had_demand)
                return;
        t->had_demand = demand;
        if (t->demand_fn)
                t->demand_fn(t, demand, t->demand_userdata);
}

void nd_telemetry_encode_record(const nd_telemetry_sample *s, uint32_t dropped,
                                uint8_t out[static ND_TELEMETRY_RECORD_SIZE]) {
        nd_telemetry_record_encode(&(const nd_telemetry_record) {
                .sequence = s->sequence,
                .device_time_us = s->device_time_us,
                .host_time_us = s->host_time_us,
                .dropped = dropped,
                .flags = s->flags,
                .depth_mm = s->depth_mm,
                .speed_hz = s->speed_hz,
                .current_ma = s->current_ma,
                .temperature_c = s->temperature_c,
                .battery_percent = (uint8_t) MIN(s->battery_percent, (unsigned) UINT8_MAX),
        }, out);
}

static void reader_free(reader *rd) {
        if (!rd)
                return;
        sd_event_source_unref(rd->hangup);
        if (rd->fd >= 0)
                close(rd->fd);
        free(rd);
}

static void telemetry_remove_reader(nd_telemetry *t, unsigned i) {
        reader_free(t->readers[i]);
        t->readers[i] = t->readers[--t->n_readers];
        t->readers[t->n_readers] = NULL;
        telemetry_demand_update(t);
}

/* The client closed its end (EPOLLHUP/EPOLLRDHUP): the reader goes. */
static int on_reader_hangup(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        reader *rd = userdata;
        nd_telemetry *t = rd->owner;
        for (unsigned i = 0; i < t->n_readers; i++)
                if (t->readers[i] == rd) {
                        nd_log_debug("%s: telemetry reader closed its socket (%u records dropped for it)",
                                     t->path, rd->dropped);
                        telemetry_remove_reader(t, i);
                        break;
                }
        return 0;
}

/* One Telemetry signal with the pending batch, addressed to destination. */
static int telemetry_send_batch(nd_telemetry *t, const char *destination) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        int r = sd_bus_message_new_signal(t->bus, &m, t->path, ND_PEN_INTERFACE, "Telemetry");
        if (r >= 0)
                r = sd_bus_message_set_destination(m, destination);
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "(tuddddu)");
        for (unsigned i = 0; r >= 0 && i < t->n_batch; i++) {
                const nd_telemetry_sample *s = &t->batch[i];
                r = sd_bus_message_append(m, "(tuddddu)", s->device_time_us, s->sequence, s->depth_mm,
                                          s->speed_hz, s->current_ma, s->temperature_c, s->flags);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_send(t->bus, m, NULL);
        return r;
}

static void telemetry_emit_batch(nd_telemetry *t) {
        if (t->n_batch == 0)
                return;
        if (sd_bus_is_open(t->bus) <= 0) {
                /* Shutting down: sd-bus closed the connection when the loop ended. */
                t->n_batch = 0;
                return;
        }
        /* A bus that takes no more (the bus daemon starved of CPU, or stopped) leaves every message
         * in the daemon's own connection: one signal a watcher every 50 ms would pile up there
         * without bound. Beyond the backlog bound, batches are dropped (a watcher sees a gap in
         * the sequence numbers); fd readers are not affected. */
        uint64_t queued = 0;
        unsigned n_watchers = sd_bus_track_count(t->watchers);
        if (sd_bus_get_n_queued_write(t->bus, &queued) >= 0 && queued >= ND_TELEMETRY_BUS_BACKLOG_MAX) {
                t->batches_dropped += n_watchers;
                if (!t->backlog_reported)
                        nd_log_warning("%s: %" PRIu64 " messages wait to be written to the bus: Telemetry signals are "
                                       "dropped until it takes them (telemetry sockets and pipes go on)",
                                       t->path, queued);
                t->backlog_reported = true;
                t->n_batch = 0;
                return;
        }
        if (t->backlog_reported) {
                nd_log_notice("%s: the bus takes messages again; %" PRIu64 " Telemetry signals dropped so far", t->path,
                              t->batches_dropped);
                t->backlog_reported = false;
        }
        /* Unicast to each watcher: a client that did not ask receives nothing. */
        for (const char *name = sd_bus_track_first(t->watchers); name; name = sd_bus_track_next(t->watchers)) {
                int r = telemetry_send_batch(t, name);
                if (r < 0)
                        nd_log_warning("%s: could not send a Telemetry batch of %u samples to %s: %s", t->path,
                                       t->n_batch, name, strerror(-r));
        }
        t->n_batch = 0;
}

static int on_batch_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_telemetry *t = userdata;
        telemetry_emit_batch(t);
        /* Re-armed only while samples flow, so an idle pen costs no wake-ups. */
        return sd_event_source_set_enabled(s, SD_EVENT_OFF);
}

/* The last watcher left the bus or unwatched: sd-bus wants an empty track with a handler freed
 * (it calls the handler again otherwise); the next WatchTelemetry makes a new one. */
static int on_watchers_empty(sd_bus_track *track, void *userdata) {
        nd_telemetry *t = userdata;
        if (t->watchers == track)
                t->watchers = sd_bus_track_unref(t->watchers);
        telemetry_demand_update(t);
        return 0;
}

int nd_telemetry_new(sd_event *event, sd_bus *bus, const char *object_path, nd_telemetry **ret) {
        nd_telemetry *t = calloc(1, sizeof *t);
        int r;
        if (!t)
                return -ENOMEM;
        t->event = sd_event_ref(event);
        t->bus = sd_bus_ref(bus);
        t->path = strdup(object_path);
        t->batch = malloc(BATCH_CAPACITY * sizeof *t->batch);
        if (!t->path || !t->batch) {
                nd_telemetry_free(t);
                return -ENOMEM;
        }
        r = sd_event_add_time_relative(event, &t->batch_timer, CLOCK_MONOTONIC, ND_TELEMETRY_BATCH_INTERVAL_USEC,
                                       USEC_PER_MSEC, on_batch_timer, t);
        if (r >= 0)
                r = sd_event_source_set_enabled(t->batch_timer, SD_EVENT_OFF);
        if (r < 0) {
                nd_telemetry_free(t);
                return r;
        }
        *ret = t;
        return 0;
}

nd_telemetry *nd_telemetry_free(nd_telemetry *t) {
        if (!t)
                return NULL;
        t->demand_fn = NULL; /* nobody to tell any more */
        for (unsigned i = 0; i < ELEMENTSOF(t->checks); i++)
                if (t->checks[i])
                        t->checks[i]->telemetry = NULL;
        if (t->bus)
                telemetry_emit_batch(t);
        while (t->n_readers > 0)
                telemetry_remove_reader(t, t->n_readers - 1);
        sd_bus_track_unref(t->watchers);
        sd_event_source_disable_unref(t->batch_timer);
        sd_bus_unref(t->bus);
        sd_event_unref(t->event);
        free(t->batch);
        free(t->path);
        free(t);
        return NULL;
}

void nd_telemetry_flush(nd_telemetry *t) {
        if (!t)
                return;
        telemetry_emit_batch(t);
        (void) sd_event_source_set_enabled(t->batch_timer, SD_EVENT_OFF);
}

void nd_telemetry_push(nd_telemetry *t, const nd_telemetry_sample *s) {
        if (sd_bus_track_count(t->watchers) == 0)
                t->n_batch = 0; /* nobody watches: no batch, no timer, no wake-up */
        else if (t->n_batch == BATCH_CAPACITY)
                telemetry_emit_batch(t);
        if (sd_bus_track_count(t->watchers) > 0)
                t->batch[t->n_batch++] = *s;
        if (t->n_batch == 1) {
                int enabled = SD_EVENT_OFF;
                (void) sd_event_source_get_enabled(t->batch_timer, &enabled);
                if (enabled == SD_EVENT_OFF) {
                        (void) sd_event_source_set_time_relative(t->batch_timer, ND_TELEMETRY_BATCH_INTERVAL_USEC);
                        (void) sd_event_source_set_enabled(t->batch_timer, SD_EVENT_ONESHOT);
                }
        }

        if (t->n_readers == 0)
                return;
        uint8_t record[ND_TELEMETRY_RECORD_SIZE];
        for (unsigned i = 0; i < t->n_readers;) {
                reader *rd = t->readers[i];
                nd_telemetry_encode_record(s, rd->dropped, record);
                /* A pipe takes a write of at most PIPE_BUF whole or not at all (O_NONBLOCK). */
                ssize_t n = rd->pipe ? write(rd->fd, record, sizeof record)
                                     : send(rd->fd, record, sizeof record, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (n == (ssize_t) sizeof record) {
                        i++;
                        continue;
                }
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) {
                        rd->dropped++;
                        t->dropped_total++;
                        i++;
                        continue;
                }
                nd_log_debug("%s: telemetry reader gone (%s)", t->path, n < 0 ? strerror(errno) : "short send");
                telemetry_remove_reader(t, i);
        }
}

/* Registers our end of a new reader (a socket, or the write end of a pipe) and hands the
 * client's end to *ret_fd; takes both fds on success. */
static int reader_add(nd_telemetry *t, bool pipe, int *ours, int *theirs, int *ret_fd) {
        reader *rd = calloc(1, sizeof *rd);
        if (!rd)
                return -ENOMEM;
        rd->owner = t;
        rd->fd = -1;
        rd->pipe = pipe;
        /* A socket reports EPOLLRDHUP when its peer goes; the write end of a pipe EPOLLERR once
         * the read end is closed. */
        int r = sd_event_add_io(t->event, &rd->hangup, *ours, pipe ? EPOLLERR : EPOLLRDHUP, on_reader_hangup, rd);
        if (r < 0) {
                reader_free(rd);
                return r;
        }
        rd->fd = TAKE_FD(*ours);
        t->readers[t->n_readers++] = rd;
        *ret_fd = TAKE_FD(*theirs);
        telemetry_demand_update(t);
        return 0;
}

int nd_telemetry_open_reader(nd_telemetry *t, int *ret_fd) {
        int pair[2];
        int sndbuf = ND_TELEMETRY_READER_SNDBUF;

        if (t->n_readers >= ND_TELEMETRY_READERS_MAX)
                return -EMFILE;
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, pair) < 0)
                return -errno;
        _cleanup_close_ int ours = pair[0], theirs = pair[1];
        /* The client's end blocks as usual; only ours must never block. */
        int flags = fcntl(theirs, F_GETFL);
        if (flags < 0 || fcntl(theirs, F_SETFL, flags & ~O_NONBLOCK) < 0)
                return -errno;
        (void) setsockopt(ours, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);

        return reader_add(t, false, &ours, &theirs, ret_fd);
}

int nd_telemetry_open_pipe_reader(nd_telemetry *t, int *ret_fd) {
        _Static_assert(ND_TELEMETRY_RECORD_SIZE <= PIPE_BUF, "a record must be written whole to a pipe");
        int pair[2];

        if (t->n_readers >= ND_TELEMETRY_READERS_MAX)
                return -EMFILE;
        if (pipe2(pair, O_CLOEXEC) < 0)
                return -errno;
        _cleanup_close_ int theirs = pair[0], ours = pair[1];
        /* Only our end must never block; the client's end is as pipes usually are. */
        int flags = fcntl(ours, F_GETFL);
        if (flags < 0 || fcntl(ours, F_SETFL, flags | O_NONBLOCK) < 0)
                return -errno;
        /* As much buffer as a socket reader gets; the system's cap may refuse it (64 KiB stays). */
        (void) fcntl(ours, F_SETPIPE_SZ, ND_TELEMETRY_READER_SNDBUF);

        return reader_add(t, true, &ours, &theirs, ret_fd);
}

/* The answer to the GetNameOwner sent after a watcher was added: a name that had left the bus
 * before the match on its departure was in place is dropped here. */
static int on_watcher_owner_checked(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        watcher_check *c = userdata;
        if (c->telemetry && sd_bus_message_is_method_error(reply, SD_BUS_ERROR_NAME_HAS_NO_OWNER)) {
                nd_log_debug("%s: telemetry watcher %s left before it was tracked", c->telemetry->path, c->name);
                (void) nd_telemetry_unwatch(c->telemetry, c->name);
        }
        return 0;
}

static void watcher_check_free(void *userdata) {
        watcher_check *c = userdata;
        if (c->telemetry) {
                for (unsigned i = 0; i < ELEMENTSOF(c->telemetry->checks); i++)
                        if (c->telemetry->checks[i] == c)
                                c->telemetry->checks[i] = NULL;
        }
        free(c->name);
        free(c);
}

int nd_telemetry_watch(nd_telemetry *t, const char *name) {
        int r;
        if (!name || name[0] != ':')
                return -EINVAL;
        if (t->watchers && sd_bus_track_contains(t->watchers, name))
                return 0;
        if (sd_bus_track_count(t->watchers) >= ND_TELEMETRY_WATCHERS_MAX)
                return -EMFILE;
        if (!t->watchers) {
                r = sd_bus_track_new(t->bus, &t->watchers, on_watchers_empty, t);
                if (r < 0)
                        return r;
        }
        r = sd_bus_track_add_name(t->watchers, name);
        if (r < 0)
                return r;
        /* Sent after the match sd_bus_track just asked for, so the bus answers it later: either
         * the name is still there (and its departure will be seen) or this says it is gone. At
         * most ND_TELEMETRY_WATCHERS_MAX checks are in flight; beyond, the match alone remains. */
        unsigned free_slot = ELEMENTSOF(t->checks);
        for (unsigned i = 0; i < ELEMENTSOF(t->checks); i++)
                if (!t->checks[i]) {
                        free_slot = i;
                        break;
                }
        if (free_slot < ELEMENTSOF(t->checks)) {
                watcher_check *c = calloc(1, sizeof *c);
                if (c && (c->name = strdup(name))) {
                        _cleanup_(sd_bus_slot_unrefp) sd_bus_slot *slot = NULL;
                        c->telemetry = t;
                        r = sd_bus_call_method_async(t->bus, &slot, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                                     "org.freedesktop.DBus", "GetNameOwner", on_watcher_owner_checked,
                                                     c, "s", name);
                        if (r >= 0) {
                                t->checks[free_slot] = c;
                                (void) sd_bus_slot_set_destroy_callback(slot, watcher_check_free);
                                (void) sd_bus_slot_set_floating(slot, true);
                                c = NULL;
                        }
                }
                if (c) {
                        free(c->name);
                        free(c);
                }
        }
        telemetry_demand_update(t);
        return 0;
}

int nd_telemetry_unwatch(nd_telemetry *t, const char *name) {
        if (!name)
                return -EINVAL;
        /* Non-recursive tracking: one removal drops the name however often it watched. */
        if (t->watchers && sd_bus_track_contains(t->watchers, name))
                (void) sd_bus_track_remove_name(t->watchers, name);
        telemetry_demand_update(t);
        return 0;
}

unsigned nd_telemetry_n_watchers(const nd_telemetry *t) { return t ? sd_bus_track_count(t->watchers) : 0; }

bool nd_telemetry_has_demand(const nd_telemetry *t) {
        return t && (t->n_readers > 0 || sd_bus_track_count(t->watchers) > 0);
}

void nd_telemetry_set_demand_callback(nd_telemetry *t, nd_telemetry_demand_fn fn, void *userdata) {
        t->demand_fn = fn;
        t->demand_userdata = userdata;
        t->had_demand = nd_telemetry_has_demand(t);
}

unsigned nd_telemetry_n_readers(const nd_telemetry *t) { return t ? t->n_readers : 0; }
uint64_t nd_telemetry_dropped_total(const nd_telemetry *t) { return t ? t->dropped_total : 0; }
