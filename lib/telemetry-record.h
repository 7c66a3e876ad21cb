/* telemetry-record.h: the binary record on an OpenTelemetry socket (docs/telemetry.md), encoded
 * by the daemon and decoded by its clients (needlectl) with the same code. */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* Record layout version 1: 72 bytes, little-endian. */
#define ND_TELEMETRY_RECORD_VERSION 1u
#define ND_TELEMETRY_RECORD_SIZE    72u
/* What a reader should ask recv() for: a later minor layout may append fields. */
#define ND_TELEMETRY_RECORD_RECV_SIZE 256u

/* The flags field: the pen's status bits in bits 0-7, its fault bits in bits 8-15. */
#define ND_TELEMETRY_FLAG_MOTOR_RUNNING  (1u << 0)
#define ND_TELEMETRY_FLAG_CARTRIDGE      (1u << 1)
#define ND_TELEMETRY_FLAG_WATCHDOG_ARMED (1u << 2)
#define ND_TELEMETRY_FAULT_SHIFT         8u
#define ND_TELEMETRY_FLAG_FAULT_MASK     (0xffu << ND_TELEMETRY_FAULT_SHIFT)

/* One record, decoded. version and size are ignored by the encoder (it writes its own). */
typedef struct nd_telemetry_record {
        uint16_t version;
        uint16_t size;
        uint32_t sequence;
        uint64_t device_time_us;
        uint64_t host_time_us;
        uint32_t dropped;
        uint32_t flags;
        double depth_mm;
        double speed_hz;
        double current_ma;
        double temperature_c;
        uint8_t battery_percent;   /* 0-100; the encoder clamps larger values to 100 */
} nd_telemetry_record;

/* Writes r as a version 1 record (reserved bytes zero). */
void nd_telemetry_record_encode(const nd_telemetry_record *r, uint8_t out[static ND_TELEMETRY_RECORD_SIZE]);

/* Decodes one datagram of n bytes. Returns 0, or -EBADMSG when it is shorter than a version 1
 * record, its version is not 1, or its size field is below 72 or disagrees with n (a longer
 * record of a later minor layout is accepted: its known fields are read). */
int nd_telemetry_record_decode(const void *buf, size_t n, nd_telemetry_record *ret);
