/* bench-hooks.c: the two probes of needled-bench, the daemon as built for the benchmarks.
 *
 * needled-bench is needled's own main.c and daemon library, linked with
 * -Wl,--wrap=nd_transport_control,--wrap=nd_penmodel_new: the linker sends the daemon's calls of
 * those two functions here first. Nothing else differs, and neither probe runs per telemetry
 * sample. When NEEDLED_BENCH_TRACE_FD names an open descriptor (a pipe from the benchmark
 * client), each probe writes one fixed-size bench_trace record to it:
 *
 *   - BENCH_TRACE_PEN_EPOCH when a simulated pen is created: the CLOCK_MONOTONIC µs its device
 *     clock counts from (the pen model's power-on; its samples' device_time_us are relative to
 *     it), with the pen's serial: so the client can turn a sample's device time back into the
 *     host clock and measure pen-to-client latency;
 *   - BENCH_TRACE_MOTOR_STOP when a motor stop command reaches the transport (the moment the
 *     daemon hands it to the USB stack, or to the simulated pen), before it is submitted.
 *
 * Without the variable the probes only forward the call. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench-trace.h"
#include "penmodel.h"
#include "protocol.h"
#include "transport.h"

int __real_nd_transport_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                                uint32_t timeout_ms, nd_control_done_fn done, void *userdata);
int __wrap_nd_transport_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                                uint32_t timeout_ms, nd_control_done_fn done, void *userdata);
int __real_nd_penmodel_new(const nd_penmodel_config *c, uint64_t now_us, nd_penmodel **ret);
int __wrap_nd_penmodel_new(const nd_penmodel_config *c, uint64_t now_us, nd_penmodel **ret);

/* -1: not looked up yet; -2: no trace wanted. */
static int trace_fd = -1;

static int trace_get_fd(void) {
        if (trace_fd == -1) {
                const char *s = getenv(BENCH_TRACE_FD_ENV);
                char *end = NULL;
                long fd = s ? strtol(s, &end, 10) : -1;
                trace_fd = s && *s && end && *end == '\0' && fd >= 0 && fd <= INT32_MAX ? (int) fd : -2;
        }
        return trace_fd;
}

static uint64_t monotonic_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static void trace_write(const bench_trace *rec) {
        int fd = trace_get_fd();
        if (fd < 0)
                return;
        /* A pipe write of less than PIPE_BUF is atomic; a client that stopped reading must not
         * wedge the daemon, so a full pipe loses the record (the client then reports it). */
        ssize_t n;
        do
                n = write(fd, rec, sizeof *rec);
        while (n < 0 && errno == EINTR);
}

int __wrap_nd_transport_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                                uint32_t timeout_ms, nd_control_done_fn done, void *userdata) {
        if (setup && setup->request == ND_PROTO_REQ_MOTOR_STOP && trace_get_fd() >= 0) {
                bench_trace rec = { .kind = BENCH_TRACE_MOTOR_STOP, .time_us = monotonic_us() };
                trace_write(&rec);
        }
        return __real_nd_transport_control(t, setup, out_data, timeout_ms, done, userdata);
}

int __wrap_nd_penmodel_new(const nd_penmodel_config *c, uint64_t now_us, nd_penmodel **ret) {
        int r = __real_nd_penmodel_new(c, now_us, ret);
        if (r >= 0 && c && trace_get_fd() >= 0) {
                bench_trace rec = { .kind = BENCH_TRACE_PEN_EPOCH, .time_us = now_us };
                _Static_assert(sizeof rec.serial > ND_PROTO_SERIAL_SIZE, "room for a serial and its NUL");
                strncpy(rec.serial, c->serial, sizeof rec.serial - 1);
                trace_write(&rec);
        }
        return r;
}
