/* telemetry-record.c: the OpenTelemetry record codec (see telemetry-record.h). */
#include <assert.h>
#include <errno.h>
#include <string.h>

#include "telemetry-record.h"
#include "unaligned.h"
#include "util.h"

/* Offsets of docs/telemetry.md's table. */
enum {
        OFF_VERSION = 0,
        OFF_SIZE = 2,
        OFF_SEQUENCE = 4,
        OFF_DEVICE_TIME = 8,
        OFF_HOST_TIME = 16,
        OFF_DROPPED = 24,
        OFF_FLAGS = 28,
        OFF_DEPTH = 32,
        OFF_SPEED = 40,
        OFF_CURRENT = 48,
        OFF_TEMPERATURE = 56,
        OFF_BATTERY = 64,
        OFF_RESERVED = 65,
        OFF_END = 72,
};
_Static_assert(OFF_END == ND_TELEMETRY_RECORD_SIZE, "record version 1 is 72 bytes");
_Static_assert(ND_TELEMETRY_RECORD_RECV_SIZE >= ND_TELEMETRY_RECORD_SIZE, "a reader asks for a whole record");
_Static_assert(ND_TELEMETRY_RECORD_SIZE <= UINT16_MAX, "the size field is a u16");

#define BATTERY_PERCENT_MAX 100u

void nd_telemetry_record_encode(const nd_telemetry_record *r, uint8_t out[static ND_TELEMETRY_RECORD_SIZE]) {
        assert(r);
        memset(out, 0, ND_TELEMETRY_RECORD_SIZE);
        nd_write_le16(out + OFF_VERSION, ND_TELEMETRY_RECORD_VERSION);
        nd_write_le16(out + OFF_SIZE, ND_TELEMETRY_RECORD_SIZE);
        nd_write_le32(out + OFF_SEQUENCE, r->sequence);
        nd_write_le64(out + OFF_DEVICE_TIME, r->device_time_us);
        nd_write_le64(out + OFF_HOST_TIME, r->host_time_us);
        nd_write_le32(out + OFF_DROPPED, r->dropped);
        nd_write_le32(out + OFF_FLAGS, r->flags);
        nd_write_le_double(out + OFF_DEPTH, r->depth_mm);
        nd_write_le_double(out + OFF_SPEED, r->speed_hz);
        nd_write_le_double(out + OFF_CURRENT, r->current_ma);
        nd_write_le_double(out + OFF_TEMPERATURE, r->temperature_c);
        out[OFF_BATTERY] = (uint8_t) MIN((unsigned) r->battery_percent, BATTERY_PERCENT_MAX);
        /* OFF_RESERVED..OFF_END stay zero */
}

int nd_telemetry_record_decode(const void *buf, size_t n, nd_telemetry_record *ret) {
        const uint8_t *p = buf;
        assert(ret);
        if (!p || n < ND_TELEMETRY_RECORD_SIZE)
                return -EBADMSG;
        nd_telemetry_record r = {
                .version = nd_read_le16(p + OFF_VERSION),
                .size = nd_read_le16(p + OFF_SIZE),
                .sequence = nd_read_le32(p + OFF_SEQUENCE),
                .device_time_us = nd_read_le64(p + OFF_DEVICE_TIME),
                .host_time_us = nd_read_le64(p + OFF_HOST_TIME),
                .dropped = nd_read_le32(p + OFF_DROPPED),
                .flags = nd_read_le32(p + OFF_FLAGS),
                .depth_mm = nd_read_le_double(p + OFF_DEPTH),
                .speed_hz = nd_read_le_double(p + OFF_SPEED),
                .current_ma = nd_read_le_double(p + OFF_CURRENT),
                .temperature_c = nd_read_le_double(p + OFF_TEMPERATURE),
                .battery_percent = p[OFF_BATTERY],
        };
        if (r.version != ND_TELEMETRY_RECORD_VERSION || r.size < ND_TELEMETRY_RECORD_SIZE || r.size != n)
                return -EBADMSG;
        *ret = r;
        return 0;
}
