/* telemetry.c: signal batching and SOCK_SEQPACKET readers (see telemetry.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
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
};

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

static void telemetry_emit_batch(nd_telemetry *t) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        int r;

        if (t->n_batch == 0)
                return;
        if (sd_bus_is_open(t->bus) <= 0) {
                /* Shutting down: sd-bus closed the connection when the loop ended. */
                t->n_batch = 0;
                return;
        }
        r = sd_bus_message_new_signal(t->bus, &m, t->path, ND_PEN_INTERFACE, "Telemetry");
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
        if (r < 0)
                nd_log_warning("%s: could not emit a Telemetry batch of %u samples: %s", t->path, t->n_batch,
                               strerror(-r));
        t->n_batch = 0;
}

static int on_batch_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_telemetry *t = userdata;
        telemetry_emit_batch(t);
        /* Re-armed only while samples flow, so an idle pen costs no wake-ups. */
        return sd_event_source_set_enabled(s, SD_EVENT_OFF);
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
        if (t->bus)
                telemetry_emit_batch(t);
        while (t->n_readers > 0)
                telemetry_remove_reader(t, t->n_readers - 1);
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
        if (t->n_batch == BATCH_CAPACITY)
                telemetry_emit_batch(t);
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
                ssize_t n = send(rd->fd, record, sizeof record, MSG_DONTWAIT | MSG_NOSIGNAL);
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

int nd_telemetry_open_reader(nd_telemetry *t, int *ret_fd) {
        int pair[2];
        int sndbuf = ND_TELEMETRY_READER_SNDBUF;
        int r;

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

        reader *rd = calloc(1, sizeof *rd);
        if (!rd)
                return -ENOMEM;
        rd->owner = t;
        rd->fd = -1;
        r = sd_event_add_io(t->event, &rd->hangup, ours, EPOLLRDHUP, on_reader_hangup, rd);
        if (r < 0) {
                reader_free(rd);
                return r;
        }
        rd->fd = TAKE_FD(ours);
        t->readers[t->n_readers++] = rd;
        *ret_fd = TAKE_FD(theirs);
        return 0;
}

unsigned nd_telemetry_n_readers(const nd_telemetry *t) { return t ? t->n_readers : 0; }
uint64_t nd_telemetry_dropped_total(const nd_telemetry *t) { return t ? t->dropped_total : 0; }
