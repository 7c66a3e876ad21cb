/* bench-trace.h: what needled-bench's probes (bench-hooks.c) write to the benchmark client. */
#pragma once

#include <stdint.h>

/* The environment variable naming the descriptor needled-bench writes its trace to. */
#define BENCH_TRACE_FD_ENV "NEEDLED_BENCH_TRACE_FD"

enum {
        BENCH_TRACE_PEN_EPOCH = 1, /* a simulated pen powered on at time_us; serial set */
        BENCH_TRACE_MOTOR_STOP = 2, /* a motor stop command reached the transport at time_us */
};

/* One trace record, written whole (below PIPE_BUF) in host byte order: both ends are on one host. */
typedef struct bench_trace {
        uint32_t kind;
        uint32_t reserved;
        uint64_t time_us;  /* CLOCK_MONOTONIC, µs */
        char serial[24];   /* NUL-terminated; BENCH_TRACE_PEN_EPOCH only */
} bench_trace;

_Static_assert(sizeof(bench_trace) == 40, "bench_trace is a fixed 40 bytes");
