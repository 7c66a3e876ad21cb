/* telemetry.h: one pen's telemetry fan-out: Telemetry signal batches (about 20 a second, every
 * sample exactly once, in order) and binary records on SOCK_SEQPACKET sockets handed to
 * OpenTelemetry callers (docs/telemetry.md). A slow reader loses records, counted, and never
 * slows the daemon or any other reader. No allocation per sample. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "telemetry-record.h"

/* One sample as the daemon hands it on. */
typedef struct nd_telemetry_sample {
        uint64_t device_time_us;  /* the pen's clock, extended to 64 bits */
        uint64_t host_time_us;    /* CLOCK_MONOTONIC when the daemon decoded it */
        uint32_t sequence;        /* the pen's sequence number */
        uint32_t flags;           /* status bits | fault bits << 8 (docs/telemetry.md) */
        double depth_mm, speed_hz, current_ma, temperature_c;
        unsigned battery_percent;
} nd_telemetry_sample;

#define ND_TELEMETRY_BATCH_INTERVAL_USEC (50 * UINT64_C(1000))
/* Readers beyond this are refused (each costs a socket and a send per sample). */
#define ND_TELEMETRY_READERS_MAX 64u
/* Callers of WatchTelemetry beyond this are refused (each costs a message per batch). */
#define ND_TELEMETRY_WATCHERS_MAX 64u
/* Kernel send buffer asked for each reader: about a quarter second at 1 kHz. */
#define ND_TELEMETRY_READER_SNDBUF (256 * 1024)

typedef struct nd_telemetry nd_telemetry;

/* Creates the fan-out for the pen object at object_path (copied). */
int nd_telemetry_new(sd_event *event, sd_bus *bus, const char *object_path, nd_telemetry **ret);

/* Flushes the pending batch, closes every reader, frees. NULL is allowed. */
nd_telemetry *nd_telemetry_free(nd_telemetry *t);

/* Hands one sample on: appended to the pending signal batch, written to every reader. */
void nd_telemetry_push(nd_telemetry *t, const nd_telemetry_sample *s);

/* Emits the pending batch now (before SessionEnded, or before the pen object goes). */
void nd_telemetry_flush(nd_telemetry *t);

/* Opens a new reader; *ret_fd is the client's end (CLOEXEC), which the caller sends and
 * closes. Returns 0, -EMFILE when there are too many readers, or -errno. */
int nd_telemetry_open_reader(nd_telemetry *t, int *ret_fd);

/* Opens a new pipe reader (OpenTelemetryPipe): the same records, each written whole to a pipe
 * whose write end never blocks; *ret_fd is the read end (CLOEXEC). As nd_telemetry_open_reader. */
int nd_telemetry_open_pipe_reader(nd_telemetry *t, int *ret_fd);

/* The unique bus name receives this pen's Telemetry signals (unicast) until
 * nd_telemetry_unwatch() or until it leaves the bus. Idempotent. Returns 0, -EINVAL (not a
 * unique name), -EMFILE (too many watchers) or -errno. */
int nd_telemetry_watch(nd_telemetry *t, const char *unique_name);
/* Stops sending to the name; idempotent. Returns 0 or -EINVAL. */
int nd_telemetry_unwatch(nd_telemetry *t, const char *unique_name);
unsigned nd_telemetry_n_watchers(const nd_telemetry *t);

/* Whether anybody wants samples now: a watcher or a reader. */
bool nd_telemetry_has_demand(const nd_telemetry *t);
/* Called with demand true when the first watcher or reader appears, false when the last goes. */
typedef void (*nd_telemetry_demand_fn)(nd_telemetry *t, bool demand, void *userdata);
void nd_telemetry_set_demand_callback(nd_telemetry *t, nd_telemetry_demand_fn fn, void *userdata);

/* Messages waiting in the daemon's bus connection beyond which a Telemetry batch is dropped
 * instead of queued (each batch is one signal per watcher), so that memory stays bounded when the
 * bus does not read; about 0.6 MB of batches at most. */
#define ND_TELEMETRY_BUS_BACKLOG_MAX 256u

/* Readers connected now, and records dropped for all readers so far (for tests/benchmarks). */
unsigned nd_telemetry_n_readers(const nd_telemetry *t);
uint64_t nd_telemetry_dropped_total(const nd_telemetry *t);

/* Encodes one record for a reader with `dropped` records lost so far (exposed for tests). */
void nd_telemetry_encode_record(const nd_telemetry_sample *s, uint32_t dropped,
                                uint8_t out[static ND_TELEMETRY_RECORD_SIZE]);
