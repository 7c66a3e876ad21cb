/* protocol.c: encode/decode of the pen's USB protocol (docs/protocol.md). Pure functions. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <zlib.h>

#include "protocol.h"
#include "unaligned.h"
#include "util.h"

/* Wire units per host unit. */
#define UM_PER_MM     1000.0
#define CHZ_PER_HZ    100.0
#define CC_PER_C      100.0

/* ---- Byte layouts (offsets within each block) -------------------------------------------------- */

/* IDENTIFY reply */
enum {
        ID_OFF_MAGIC = 0,
        ID_OFF_MAJOR = 4,
        ID_OFF_MINOR = 5,
        ID_OFF_RESERVED = 6, /* u16, 0 */
        ID_OFF_SERIAL = 8,
        ID_OFF_MODEL = ID_OFF_SERIAL + ND_PROTO_SERIAL_SIZE,       /* 24 */
        ID_OFF_FIRMWARE = ID_OFF_MODEL + ND_PROTO_MODEL_SIZE,      /* 40 */
        ID_OFF_DEPTH_MIN = ID_OFF_FIRMWARE + ND_PROTO_FIRMWARE_SIZE, /* 52 */
        ID_OFF_DEPTH_MAX = 54,
        ID_OFF_DEPTH_STEP = 56,
        ID_OFF_SPEED_MIN = 58,
        ID_OFF_SPEED_MAX = 60,
        ID_OFF_RATE_MAX = 62,
        ID_END = 64,
};
_Static_assert(ID_OFF_DEPTH_MIN == 52, "IDENTIFY layout");
_Static_assert(ID_END == ND_PROTO_IDENTITY_SIZE, "IDENTIFY size");

/* STATUS reply */
enum {
        ST_OFF_MOTOR = 0,
        ST_OFF_STATUS = 1,
        ST_OFF_FAULTS = 2,
        ST_OFF_BATTERY = 3,
        ST_OFF_TEMPERATURE = 4,
        ST_OFF_SET_DEPTH = 6,
        ST_OFF_SET_SPEED = 8,
        ST_OFF_WD_TIMEOUT = 10,
        ST_OFF_WD_REMAINING = 12,
        ST_OFF_RATE = 14,
        ST_OFF_TELEMETRY_ON = 16,
        ST_OFF_RESERVED = 17, /* 3 bytes, 0 */
        ST_OFF_TIMESTAMP = 20,
        ST_END = 24,
};
_Static_assert(ST_END == ND_PROTO_STATUS_SIZE, "STATUS size");

/* CARTRIDGE reply */
enum {
        CA_OFF_PRESENT = 0,
        CA_OFF_NEEDLES = 1,
        CA_OFF_RESERVED = 2, /* u16, 0 */
        CA_OFF_ID = 4,
        CA_END = CA_OFF_ID + ND_PROTO_CARTRIDGE_ID_SIZE,
};
_Static_assert(CA_END == ND_PROTO_CARTRIDGE_SIZE, "CARTRIDGE size");

/* SET_TELEMETRY data stage */
enum {
        TE_OFF_RATE = 0,
        TE_OFF_ENABLE = 2,
        TE_OFF_RESERVED = 3,
        TE_END = 4,
};
_Static_assert(TE_END == ND_PROTO_SET_TELEMETRY_SIZE, "SET_TELEMETRY size");

/* Telemetry packet header and sample */
enum {
        PK_OFF_TYPE = 0,
        PK_OFF_COUNT = 1,
        PK_OFF_RESERVED = 2, /* u16, 0 */
        PK_OFF_FIRST_SEQ = 4,
        PK_HEADER_END = 8,
};
_Static_assert(PK_HEADER_END == ND_PROTO_PACKET_HEADER_SIZE, "packet header size");

enum {
        SA_OFF_TIMESTAMP = 0,
        SA_OFF_DEPTH = 4,
        SA_OFF_SPEED = 6,
        SA_OFF_CURRENT = 8,
        SA_OFF_TEMPERATURE = 10,
        SA_OFF_BATTERY = 12,
        SA_OFF_STATUS = 13,
        SA_OFF_FAULTS = 14,
        SA_OFF_RESERVED = 15,
        SA_END = 16,
};
_Static_assert(SA_END == ND_PROTO_SAMPLE_SIZE, "sample size");
_Static_assert(ND_PROTO_PACKET_MAX_SIZE <= ND_PROTO_TELEMETRY_MAX_PACKET, "a packet fits wMaxPacketSize");
_Static_assert(ND_PROTO_PACKET_SIZE(ND_PROTO_SAMPLES_PER_PACKET_MAX + 1) > ND_PROTO_TELEMETRY_MAX_PACKET,
               "as many samples per packet as fit");

/* ---- Errors ------------------------------------------------------------------------------------ */

_printf_(4, 5)
static int fail(nd_proto_error *err, nd_proto_error_kind kind, int r, const char *fmt, ...) {
        if (err) {
                va_list ap;
                err->kind = kind;
                va_start(ap, fmt);
                vsnprintf(err->message, sizeof err->message, fmt, ap);
                va_end(ap);
        }
        return r;
}

static void ok(nd_proto_error *err) {
        if (err) {
                err->kind = ND_PROTO_ERR_NONE;
                err->message[0] = '\0';
        }
}

/* ---- Strings ---------------------------------------------------------------------------------- */

/* A fixed field holds 1..size characters in [lo, 0x7e], then only NULs. Copies it into out
 * (size + 1 bytes). */
static int get_string(const uint8_t *p, size_t size, uint8_t lo, bool may_be_empty, char *out,
                      const char *what, nd_proto_error *err) {
        size_t n = 0;
        while (n < size && p[n] != 0)
                n++;
        for (size_t i = 0; i < n; i++)
                if (p[i] < lo || p[i] > 0x7e)
                        return fail(err, ND_PROTO_ERR_STRING, -EBADMSG,
                                    "%s: byte %zu is 0x%02x, not printable ASCII", what, i, p[i]);
        for (size_t i = n; i < size; i++)
                if (p[i] != 0)
                        return fail(err, ND_PROTO_ERR_STRING, -EBADMSG,
                                    "%s: byte %zu after the terminating NUL is 0x%02x, not NUL padding",
                                    what, i, p[i]);
        if (n == 0 && !may_be_empty)
                return fail(err, ND_PROTO_ERR_STRING, -EBADMSG, "%s: empty", what);
        memcpy(out, p, n);
        out[n] = '\0';
        return 0;
}

/* Validates s for a field of size bytes (same rules as get_string) and writes it NUL-padded. */
static int put_string(uint8_t *p, size_t size, uint8_t lo, bool may_be_empty, const char *s) {
        size_t n = strnlen(s, size + 1);
        if (n > size || (n == 0 && !may_be_empty))
                return -EINVAL;
        for (size_t i = 0; i < n; i++)
                if ((uint8_t) s[i] < lo || (uint8_t) s[i] > 0x7e)
                        return -EINVAL;
        memset(p, 0, size);
        memcpy(p, s, n);
        return 0;
}

#define PRINTABLE_NO_SPACE 0x21
#define PRINTABLE 0x20

/* ---- Shared helpers --------------------------------------------------------------------------- */

const char *nd_proto_fault_name(uint8_t bit) {
        switch (bit) {
        case ND_PROTO_FAULT_OVER_TEMPERATURE: return "over-temperature";
        case ND_PROTO_FAULT_MOTOR_STALL:      return "motor-stall";
        case ND_PROTO_FAULT_OVER_CURRENT:     return "over-current";
        case ND_PROTO_FAULT_DEPTH_DEVIATION:  return "depth-deviation";
        case ND_PROTO_FAULT_WATCHDOG_EXPIRED: return "heartbeat-lost";
        case ND_PROTO_FAULT_LOW_BATTERY:      return "low-battery";
        default:                              return NULL;
        }
}

uint64_t nd_proto_clock_extend(nd_proto_clock *c, uint32_t ts) {
        if (!c->valid) {
                c->valid = true;
                c->last_us = ts;
        } else
                c->last_us += (uint32_t) (ts - (uint32_t) c->last_us);
        return c->last_us;
}

uint32_t nd_proto_crc32(const uint8_t *buf, size_t len) {
        /* zlib takes uInt lengths; telemetry packets are far below that. */
        uLong crc = crc32(0L, Z_NULL, 0);
        while (len > 0) {
                uInt chunk = (uInt) MIN(len, (size_t) UINT32_MAX);
                crc = crc32(crc, buf, chunk);
                buf += chunk;
                len -= chunk;
        }
        return (uint32_t) crc;
}

/* Rounds value * scale to an integer in [0, max]. */
static int to_wire(double value, double scale, uint32_t max, uint32_t *ret) {
        if (!isfinite(value))
                return -ERANGE;
        double scaled = round(value * scale);
        if (scaled < 0 || scaled > (double) max)
                return -ERANGE;
        *ret = (uint32_t) scaled;
        return 0;
}

static int to_wire16(double value, double scale, uint16_t *ret) {
        uint32_t v;
        int r = to_wire(value, scale, UINT16_MAX, &v);
        if (r < 0)
                return r;
        *ret = (uint16_t) v;
        return 0;
}

int nd_proto_depth_to_um(double depth_mm, uint16_t *ret) {
        return to_wire16(depth_mm, UM_PER_MM, ret);
}

int nd_proto_speed_to_chz(double speed_hz, uint16_t *ret) {
        return to_wire16(speed_hz, CHZ_PER_HZ, ret);
}

int nd_proto_check_depth(const nd_proto_identity *id, double depth_mm) {
        uint16_t d, lo, hi, step;
        if (nd_proto_depth_to_um(depth_mm, &d) < 0 || nd_proto_depth_to_um(id->depth_min_mm, &lo) < 0 ||
            nd_proto_depth_to_um(id->depth_max_mm, &hi) < 0 || nd_proto_depth_to_um(id->depth_step_mm, &step) < 0)
                return -ERANGE;
        if (d < lo || d > hi)
                return -ERANGE;
        if (step == 0 || (d - lo) % step != 0)
                return -EDOM;
        return 0;
}

int nd_proto_check_speed(const nd_proto_identity *id, double speed_hz) {
        uint16_t s, lo, hi;
        if (nd_proto_speed_to_chz(speed_hz, &s) < 0 || nd_proto_speed_to_chz(id->speed_min_hz, &lo) < 0 ||
            nd_proto_speed_to_chz(id->speed_max_hz, &hi) < 0)
                return -ERANGE;
        if (s < lo || s > hi)
                return -ERANGE;
        return 0;
}

int nd_proto_negotiate(uint8_t pen_major, uint8_t pen_minor, uint8_t host_major, uint8_t host_minor) {
        if (pen_major != host_major)
                return -EPROTONOSUPPORT;
        return MIN(pen_minor, host_minor);
}

/* ---- Host side: requests ---------------------------------------------------------------------- */

static void setup_fill(nd_control_setup *setup, bool in, nd_proto_request_code code, uint16_t value,
                       uint16_t length) {
        *setup = (nd_control_setup) {
                .request_type = in ? ND_PROTO_REQTYPE_IN : ND_PROTO_REQTYPE_OUT,
                .request = (uint8_t) code,
                .value = value,
                .index = ND_PROTO_INTERFACE_NUMBER,
                .length = length,
        };
}

void nd_proto_request_identify(nd_control_setup *setup, uint8_t host_major, uint8_t host_minor) {
        setup_fill(setup, true, ND_PROTO_REQ_IDENTIFY, (uint16_t) (host_major << 8 | host_minor),
                   ND_PROTO_IDENTITY_SIZE);
}

void nd_proto_request_get_status(nd_control_setup *setup) {
        setup_fill(setup, true, ND_PROTO_REQ_GET_STATUS, 0, ND_PROTO_STATUS_SIZE);
}

void nd_proto_request_get_cartridge(nd_control_setup *setup) {
        setup_fill(setup, true, ND_PROTO_REQ_GET_CARTRIDGE, 0, ND_PROTO_CARTRIDGE_SIZE);
}

int nd_proto_request_set_depth(nd_control_setup *setup, double depth_mm) {
        uint16_t um;
        int r = nd_proto_depth_to_um(depth_mm, &um);
        if (r < 0)
                return r;
        setup_fill(setup, false, ND_PROTO_REQ_SET_DEPTH, um, 0);
        return 0;
}

int nd_proto_request_set_speed(nd_control_setup *setup, double speed_hz) {
        uint16_t chz;
        int r = nd_proto_speed_to_chz(speed_hz, &chz);
        if (r < 0)
                return r;
        if (chz == 0)
                return -ERANGE;
        setup_fill(setup, false, ND_PROTO_REQ_SET_SPEED, chz, 0);
        return 0;
}

void nd_proto_request_motor_start(nd_control_setup *setup) {
        setup_fill(setup, false, ND_PROTO_REQ_MOTOR_START, 0, 0);
}

void nd_proto_request_motor_stop(nd_control_setup *setup) {
        setup_fill(setup, false, ND_PROTO_REQ_MOTOR_STOP, 0, 0);
}

void nd_proto_request_heartbeat(nd_control_setup *setup) {
        setup_fill(setup, false, ND_PROTO_REQ_HEARTBEAT, 0, 0);
}

int nd_proto_request_set_watchdog(nd_control_setup *setup, unsigned timeout_ms) {
        if (timeout_ms < ND_PROTO_WATCHDOG_MIN_MS || timeout_ms > ND_PROTO_WATCHDOG_MAX_MS)
                return -ERANGE;
        setup_fill(setup, false, ND_PROTO_REQ_SET_WATCHDOG, (uint16_t) timeout_ms, 0);
        return 0;
}

int nd_proto_request_set_telemetry(nd_control_setup *setup, uint8_t data[static ND_PROTO_SET_TELEMETRY_SIZE],
                                   unsigned rate_hz, bool enabled) {
        if (!enabled)
                rate_hz = 0;
        else if (rate_hz < ND_PROTO_TELEMETRY_RATE_MIN_HZ || rate_hz > ND_PROTO_TELEMETRY_RATE_MAX_HZ)
                return -ERANGE;
        nd_write_le16(data + TE_OFF_RATE, (uint16_t) rate_hz);
        data[TE_OFF_ENABLE] = enabled;
        data[TE_OFF_RESERVED] = 0;
        setup_fill(setup, false, ND_PROTO_REQ_SET_TELEMETRY, 0, ND_PROTO_SET_TELEMETRY_SIZE);
        return 0;
}

void nd_proto_request_clear_faults(nd_control_setup *setup) {
        setup_fill(setup, false, ND_PROTO_REQ_CLEAR_FAULTS, 0, 0);
}

/* ---- Host side: decoders ---------------------------------------------------------------------- */

static int check_length(size_t len, size_t want, const char *what, nd_proto_error *err) {
        if (len != want)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "%s: %zu bytes, expected %zu", what, len, want);
        return 0;
}

int nd_proto_decode_identity(const uint8_t *buf, size_t len, uint8_t host_major, uint8_t host_minor,
                             nd_proto_identity *ret, nd_proto_error *err) {
        int r;

        if (!buf && len > 0)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "identify: no data");
        r = check_length(len, ND_PROTO_IDENTITY_SIZE, "identify", err);
        if (r < 0)
                return r;
        if (memcmp(buf + ID_OFF_MAGIC, ND_PROTO_MAGIC, ND_PROTO_MAGIC_SIZE) != 0)
                return fail(err, ND_PROTO_ERR_MAGIC, -EBADMSG,
                            "identify: magic %02x %02x %02x %02x, expected \"" ND_PROTO_MAGIC "\"",
                            buf[0], buf[1], buf[2], buf[3]);
        uint8_t major = buf[ID_OFF_MAJOR], minor = buf[ID_OFF_MINOR];
        if (major != host_major)
                return fail(err, ND_PROTO_ERR_VERSION, -EPROTONOSUPPORT,
                            "identify: pen speaks protocol %u.%u, this host only major %u", major, minor,
                            host_major);
        if (minor > host_minor)
                return fail(err, ND_PROTO_ERR_VERSION, -EPROTONOSUPPORT,
                            "identify: pen answered in protocol %u.%u, newer than the %u.%u asked for", major,
                            minor, host_major, host_minor);
        if (nd_read_le16(buf + ID_OFF_RESERVED) != 0)
                return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "identify: reserved bytes 6-7 are not 0");

        nd_proto_identity id = { .protocol_major = major, .protocol_minor = minor };
        r = get_string(buf + ID_OFF_SERIAL, ND_PROTO_SERIAL_SIZE, PRINTABLE_NO_SPACE, false, id.serial,
                       "identify: serial", err);
        if (r < 0)
                return r;
        r = get_string(buf + ID_OFF_MODEL, ND_PROTO_MODEL_SIZE, PRINTABLE, false, id.model, "identify: model", err);
        if (r < 0)
                return r;
        r = get_string(buf + ID_OFF_FIRMWARE, ND_PROTO_FIRMWARE_SIZE, PRINTABLE, false, id.firmware_version,
                       "identify: firmware version", err);
        if (r < 0)
                return r;

        uint16_t dmin = nd_read_le16(buf + ID_OFF_DEPTH_MIN), dmax = nd_read_le16(buf + ID_OFF_DEPTH_MAX),
                 dstep = nd_read_le16(buf + ID_OFF_DEPTH_STEP), smin = nd_read_le16(buf + ID_OFF_SPEED_MIN),
                 smax = nd_read_le16(buf + ID_OFF_SPEED_MAX), rate = nd_read_le16(buf + ID_OFF_RATE_MAX);
        if (dmax > ND_PROTO_DEPTH_MAX_MM * UM_PER_MM)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "identify: depth max %u µm beyond %.1f mm", dmax,
                            ND_PROTO_DEPTH_MAX_MM);
        if (dmin > dmax)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "identify: depth min %u µm above max %u µm", dmin,
                            dmax);
        if (dstep == 0 || (dmax - dmin) % dstep != 0)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE,
                            "identify: depth step %u µm does not divide the range %u-%u µm", dstep, dmin, dmax);
        if (smax > ND_PROTO_SPEED_MAX_HZ * CHZ_PER_HZ)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "identify: speed max %u cHz beyond %.0f Hz", smax,
                            ND_PROTO_SPEED_MAX_HZ);
        if (smin == 0 || smin > smax)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "identify: speed range %u-%u cHz is empty", smin,
                            smax);
        if (rate < ND_PROTO_TELEMETRY_RATE_MIN_HZ || rate > ND_PROTO_TELEMETRY_RATE_MAX_HZ)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "identify: max telemetry rate %u Hz not in %u-%u",
                            rate, ND_PROTO_TELEMETRY_RATE_MIN_HZ, ND_PROTO_TELEMETRY_RATE_MAX_HZ);

        id.depth_min_mm = dmin / UM_PER_MM;
        id.depth_max_mm = dmax / UM_PER_MM;
        id.depth_step_mm = dstep / UM_PER_MM;
        id.speed_min_hz = smin / CHZ_PER_HZ;
        id.speed_max_hz = smax / CHZ_PER_HZ;
        id.max_telemetry_rate_hz = rate;
        *ret = id;
        ok(err);
        return 0;
}

static int check_temperature(int16_t cc, const char *what, nd_proto_error *err) {
        if (cc < ND_PROTO_TEMPERATURE_MIN_C * CC_PER_C || cc > ND_PROTO_TEMPERATURE_MAX_C * CC_PER_C)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "%s: temperature %.2f °C outside %.0f..%.0f °C",
                            what, cc / CC_PER_C, ND_PROTO_TEMPERATURE_MIN_C, ND_PROTO_TEMPERATURE_MAX_C);
        return 0;
}

int nd_proto_decode_status(const uint8_t *buf, size_t len, nd_proto_status *ret, nd_proto_error *err) {
        int r;

        if (!buf && len > 0)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "status: no data");
        r = check_length(len, ND_PROTO_STATUS_SIZE, "status", err);
        if (r < 0)
                return r;
        uint8_t motor = buf[ST_OFF_MOTOR], status = buf[ST_OFF_STATUS], faults = buf[ST_OFF_FAULTS],
                battery = buf[ST_OFF_BATTERY], telemetry_on = buf[ST_OFF_TELEMETRY_ON];
        if (buf[ST_OFF_RESERVED] != 0 || nd_read_le16(buf + ST_OFF_RESERVED + 1) != 0)
                return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "status: reserved bytes 17-19 are not 0");
        if (status & ~ND_PROTO_STATUS_ALL)
                return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "status: reserved status bits 0x%02x set",
                            status & ~ND_PROTO_STATUS_ALL);
        if (faults & ~ND_PROTO_FAULT_ALL)
                return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "status: reserved fault bits 0x%02x set",
                            faults & ~ND_PROTO_FAULT_ALL);
        if (motor > 1 || telemetry_on > 1)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "status: motor state %u / telemetry flag %u not 0 or 1",
                            motor, telemetry_on);
        if (!!(status & ND_PROTO_STATUS_MOTOR_RUNNING) != motor)
                return fail(err, ND_PROTO_ERR_INCONSISTENT, -EBADMSG,
                            "status: motor state %u contradicts the running bit", motor);
        if (battery > ND_PROTO_BATTERY_MAX_PERCENT)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "status: battery %u%% above 100%%", battery);
        int16_t cc = (int16_t) nd_read_le16(buf + ST_OFF_TEMPERATURE);
        r = check_temperature(cc, "status", err);
        if (r < 0)
                return r;
        uint16_t depth = nd_read_le16(buf + ST_OFF_SET_DEPTH), speed = nd_read_le16(buf + ST_OFF_SET_SPEED),
                 wd = nd_read_le16(buf + ST_OFF_WD_TIMEOUT), remaining = nd_read_le16(buf + ST_OFF_WD_REMAINING),
                 rate = nd_read_le16(buf + ST_OFF_RATE);
        if (depth > ND_PROTO_DEPTH_MAX_MM * UM_PER_MM)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "status: set depth %u µm beyond %.1f mm", depth,
                            ND_PROTO_DEPTH_MAX_MM);
        if (speed > ND_PROTO_SPEED_MAX_HZ * CHZ_PER_HZ)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "status: set speed %u cHz beyond %.0f Hz", speed,
                            ND_PROTO_SPEED_MAX_HZ);
        if (wd < ND_PROTO_WATCHDOG_MIN_MS || wd > ND_PROTO_WATCHDOG_MAX_MS)
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "status: watchdog timeout %u ms not in %u-%u", wd,
                            ND_PROTO_WATCHDOG_MIN_MS, ND_PROTO_WATCHDOG_MAX_MS);
        if (remaining > wd)
                return fail(err, ND_PROTO_ERR_INCONSISTENT, -EBADMSG,
                            "status: watchdog remaining %u ms above its timeout %u ms", remaining, wd);
        if (remaining > 0 && !(status & ND_PROTO_STATUS_WATCHDOG_ARMED))
                return fail(err, ND_PROTO_ERR_INCONSISTENT, -EBADMSG,
                            "status: watchdog remaining %u ms but not armed", remaining);
        if (rate > ND_PROTO_TELEMETRY_RATE_MAX_HZ || (telemetry_on && rate < ND_PROTO_TELEMETRY_RATE_MIN_HZ))
                return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "status: telemetry rate %u Hz not in %u-%u", rate,
                            ND_PROTO_TELEMETRY_RATE_MIN_HZ, ND_PROTO_TELEMETRY_RATE_MAX_HZ);

        *ret = (nd_proto_status) {
                .motor_running = motor,
                .status = status,
                .faults = faults,
                .battery_percent = battery,
                .temperature_c = cc / CC_PER_C,
                .set_depth_mm = depth / UM_PER_MM,
                .set_speed_hz = speed / CHZ_PER_HZ,
                .watchdog_timeout_ms = wd,
                .watchdog_remaining_ms = remaining,
                .telemetry_rate_hz = rate,
                .telemetry_enabled = telemetry_on,
                .timestamp_us = nd_read_le32(buf + ST_OFF_TIMESTAMP),
        };
        ok(err);
        return 0;
}

int nd_proto_decode_cartridge(const uint8_t *buf, size_t len, nd_proto_cartridge *ret, nd_proto_error *err) {
        int r;

        if (!buf && len > 0)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "cartridge: no data");
        r = check_length(len, ND_PROTO_CARTRIDGE_SIZE, "cartridge", err);
        if (r < 0)
                return r;
        uint8_t present = buf[CA_OFF_PRESENT], needles = buf[CA_OFF_NEEDLES];
        if (nd_read_le16(buf + CA_OFF_RESERVED) != 0)
                return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "cartridge: reserved bytes 2-3 are not 0");
        if (present > 1)
                return fail(err, ND_PROTO_ERR_RANGE, -EBADMSG, "cartridge: present flag %u not 0 or 1", present);

        nd_proto_cartridge c = { .present = present, .needles = needles };
        r = get_string(buf + CA_OFF_ID, ND_PROTO_CARTRIDGE_ID_SIZE, PRINTABLE_NO_SPACE, !present, c.id,
                       "cartridge: id", err);
        if (r < 0)
                return r;
        if (present && needles == 0)
                return fail(err, ND_PROTO_ERR_INCONSISTENT, -EBADMSG, "cartridge: present with 0 needles");
        if (!present && (needles != 0 || c.id[0] != '\0'))
                return fail(err, ND_PROTO_ERR_INCONSISTENT, -EBADMSG,
                            "cartridge: absent but has needles %u or an id", needles);
        *ret = c;
        ok(err);
        return 0;
}

int nd_proto_decode_packet(const uint8_t *buf, size_t len, nd_proto_packet *ret, nd_proto_error *err) {
        if (!buf && len > 0)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "telemetry: no data");
        if (len < ND_PROTO_PACKET_SIZE(1))
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "telemetry: packet of %zu bytes, shorter than %u",
                            len, ND_PROTO_PACKET_SIZE(1));
        if (len > ND_PROTO_TELEMETRY_MAX_PACKET)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "telemetry: packet of %zu bytes, longer than %u",
                            len, ND_PROTO_TELEMETRY_MAX_PACKET);

        size_t body = len - ND_PROTO_PACKET_CRC_SIZE;
        uint32_t crc = nd_proto_crc32(buf, body), sent = nd_read_le32(buf + body);
        if (crc != sent)
                return fail(err, ND_PROTO_ERR_CRC, -EBADMSG, "telemetry: CRC 0x%08x, computed 0x%08x over %zu bytes",
                            sent, crc, body);
        if (buf[PK_OFF_TYPE] != ND_PROTO_PACKET_SAMPLES)
                return fail(err, ND_PROTO_ERR_TYPE, -EBADMSG, "telemetry: unknown packet type 0x%02x",
                            buf[PK_OFF_TYPE]);
        unsigned count = buf[PK_OFF_COUNT];
        if (count < 1 || count > ND_PROTO_SAMPLES_PER_PACKET_MAX)
                return fail(err, ND_PROTO_ERR_COUNT, -EBADMSG, "telemetry: sample count %u not in 1-%u", count,
                            ND_PROTO_SAMPLES_PER_PACKET_MAX);
        if (len != ND_PROTO_PACKET_SIZE(count))
                return fail(err, ND_PROTO_ERR_COUNT, -EBADMSG,
                            "telemetry: %u samples need %u bytes, packet has %zu", count,
                            ND_PROTO_PACKET_SIZE(count), len);
        if (nd_read_le16(buf + PK_OFF_RESERVED) != 0)
                return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "telemetry: reserved header bytes are not 0");

        nd_proto_packet p = { .n_samples = count };
        uint32_t seq = nd_read_le32(buf + PK_OFF_FIRST_SEQ);
        for (unsigned i = 0; i < count; i++) {
                const uint8_t *s = buf + PK_HEADER_END + i * ND_PROTO_SAMPLE_SIZE;
                uint16_t depth = nd_read_le16(s + SA_OFF_DEPTH), speed = nd_read_le16(s + SA_OFF_SPEED),
                         current = nd_read_le16(s + SA_OFF_CURRENT);
                int16_t cc = (int16_t) nd_read_le16(s + SA_OFF_TEMPERATURE);
                uint8_t battery = s[SA_OFF_BATTERY], status = s[SA_OFF_STATUS], faults = s[SA_OFF_FAULTS];

                if (s[SA_OFF_RESERVED] != 0)
                        return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "telemetry: sample %u: reserved byte not 0", i);
                if (status & ~ND_PROTO_STATUS_ALL)
                        return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG,
                                    "telemetry: sample %u: reserved status bits 0x%02x set", i,
                                    status & ~ND_PROTO_STATUS_ALL);
                if (faults & ~ND_PROTO_FAULT_ALL)
                        return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG,
                                    "telemetry: sample %u: reserved fault bits 0x%02x set", i,
                                    faults & ~ND_PROTO_FAULT_ALL);
                if (depth > ND_PROTO_DEPTH_MAX_MM * UM_PER_MM)
                        return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "telemetry: sample %u: depth %.3f mm beyond %.1f mm",
                                    i, depth / UM_PER_MM, ND_PROTO_DEPTH_MAX_MM);
                if (speed > ND_PROTO_SPEED_MAX_HZ * CHZ_PER_HZ)
                        return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "telemetry: sample %u: speed %.2f Hz beyond %.0f Hz",
                                    i, speed / CHZ_PER_HZ, ND_PROTO_SPEED_MAX_HZ);
                if (current > ND_PROTO_CURRENT_MAX_MA)
                        return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "telemetry: sample %u: current %u mA beyond %.0f mA",
                                    i, current, ND_PROTO_CURRENT_MAX_MA);
                if (battery > ND_PROTO_BATTERY_MAX_PERCENT)
                        return fail(err, ND_PROTO_ERR_RANGE, -ERANGE, "telemetry: sample %u: battery %u%% above 100%%",
                                    i, battery);
                /* check_temperature()'s test, with the message formatted only on failure: this runs
                 * for every sample, 1000 times a second per pen (docs/performance.md). */
                if (cc < ND_PROTO_TEMPERATURE_MIN_C * CC_PER_C || cc > ND_PROTO_TEMPERATURE_MAX_C * CC_PER_C)
                        return fail(err, ND_PROTO_ERR_RANGE, -ERANGE,
                                    "telemetry: sample %u: temperature %.2f °C outside %.0f..%.0f °C", i,
                                    cc / CC_PER_C, ND_PROTO_TEMPERATURE_MIN_C, ND_PROTO_TEMPERATURE_MAX_C);

                p.samples[i] = (nd_proto_sample) {
                        .sequence = seq + i,
                        .timestamp_us = nd_read_le32(s + SA_OFF_TIMESTAMP),
                        .depth_mm = depth / UM_PER_MM,
                        .speed_hz = speed / CHZ_PER_HZ,
                        .current_ma = current,
                        .temperature_c = cc / CC_PER_C,
                        .battery_percent = battery,
                        .status = status,
                        .faults = faults,
                };
        }
        *ret = p;
        ok(err);
        return 0;
}

/* ---- Pen side ------------------------------------------------------------------------------------ */

int nd_proto_parse_request(const nd_control_setup *setup, const uint8_t *data, size_t len,
                           nd_proto_request *ret, nd_proto_error *err) {
        bool in = setup->request_type & ND_CONTROL_DIR_IN;
        uint8_t want_type = in ? ND_PROTO_REQTYPE_IN : ND_PROTO_REQTYPE_OUT;

        if (setup->request_type != want_type)
                return fail(err, ND_PROTO_ERR_TYPE, -EOPNOTSUPP,
                            "request: bmRequestType 0x%02x is not vendor/interface", setup->request_type);
        if (setup->index != ND_PROTO_INTERFACE_NUMBER)
                return fail(err, ND_PROTO_ERR_RANGE, -EBADMSG, "request 0x%02x: wIndex %u is not interface %u",
                            setup->request, setup->index, ND_PROTO_INTERFACE_NUMBER);

        nd_proto_request r = { .code = (nd_proto_request_code) setup->request };
        bool want_in;
        size_t want_len;   /* exact for OUT, minimum for IN */
        bool value_zero;   /* wValue must be 0 */

        switch (setup->request) {
        case ND_PROTO_REQ_IDENTIFY:
                want_in = true, want_len = ND_PROTO_IDENTITY_SIZE, value_zero = false;
                r.host_major = (uint8_t) (setup->value >> 8);
                r.host_minor = (uint8_t) setup->value;
                break;
        case ND_PROTO_REQ_GET_STATUS:
                want_in = true, want_len = ND_PROTO_STATUS_SIZE, value_zero = true;
                break;
        case ND_PROTO_REQ_GET_CARTRIDGE:
                want_in = true, want_len = ND_PROTO_CARTRIDGE_SIZE, value_zero = true;
                break;
        case ND_PROTO_REQ_SET_DEPTH:
                want_in = false, want_len = 0, value_zero = false;
                r.depth_um = setup->value;
                break;
        case ND_PROTO_REQ_SET_SPEED:
                want_in = false, want_len = 0, value_zero = false;
                r.speed_chz = setup->value;
                break;
        case ND_PROTO_REQ_MOTOR_STOP:
                /* Stopping must never be refused for a detail of the request: any wValue. */
                want_in = false, want_len = 0, value_zero = false;
                break;
        case ND_PROTO_REQ_MOTOR_START:
        case ND_PROTO_REQ_HEARTBEAT:
        case ND_PROTO_REQ_CLEAR_FAULTS:
                want_in = false, want_len = 0, value_zero = true;
                break;
        case ND_PROTO_REQ_SET_WATCHDOG:
                want_in = false, want_len = 0, value_zero = false;
                r.watchdog_timeout_ms = setup->value;
                break;
        case ND_PROTO_REQ_SET_TELEMETRY:
                want_in = false, want_len = ND_PROTO_SET_TELEMETRY_SIZE, value_zero = true;
                break;
        default:
                return fail(err, ND_PROTO_ERR_TYPE, -EOPNOTSUPP, "request: unknown bRequest 0x%02x", setup->request);
        }

        if (in != want_in)
                return fail(err, ND_PROTO_ERR_TYPE, -EBADMSG, "request 0x%02x: wrong direction (%s)", setup->request,
                            in ? "IN" : "OUT");
        if (in ? setup->length < want_len : setup->length != want_len)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "request 0x%02x: wLength %u, expected %s%zu",
                            setup->request, setup->length, in ? "at least " : "", want_len);
        if (!in && len != want_len)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "request 0x%02x: data stage of %zu bytes, expected %zu",
                            setup->request, len, want_len);
        if (!in && len > 0 && !data)
                return fail(err, ND_PROTO_ERR_LENGTH, -EBADMSG, "request 0x%02x: no data stage", setup->request);
        if (value_zero && setup->value != 0)
                return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "request 0x%02x: wValue 0x%04x is not 0",
                            setup->request, setup->value);

        if (setup->request == ND_PROTO_REQ_SET_TELEMETRY) {
                uint16_t rate = nd_read_le16(data + TE_OFF_RATE);
                uint8_t enable = data[TE_OFF_ENABLE];
                if (data[TE_OFF_RESERVED] != 0)
                        return fail(err, ND_PROTO_ERR_RESERVED, -EBADMSG, "set-telemetry: reserved byte 3 is not 0");
                if (enable > 1)
                        return fail(err, ND_PROTO_ERR_RANGE, -EBADMSG, "set-telemetry: enable flag %u not 0 or 1",
                                    enable);
                if (!enable && rate != 0)
                        return fail(err, ND_PROTO_ERR_INCONSISTENT, -EBADMSG,
                                    "set-telemetry: rate %u Hz with telemetry disabled (must be 0)", rate);
                if (enable && (rate < ND_PROTO_TELEMETRY_RATE_MIN_HZ || rate > ND_PROTO_TELEMETRY_RATE_MAX_HZ))
                        return fail(err, ND_PROTO_ERR_RANGE, -EBADMSG, "set-telemetry: rate %u Hz not in %u-%u", rate,
                                    ND_PROTO_TELEMETRY_RATE_MIN_HZ, ND_PROTO_TELEMETRY_RATE_MAX_HZ);
                r.telemetry_rate_hz = rate;
                r.telemetry_enabled = enable;
        }

        *ret = r;
        ok(err);
        return 0;
}

int nd_proto_encode_identity(const nd_proto_identity *id, uint8_t *buf, size_t size) {
        uint16_t dmin, dmax, dstep, smin, smax;

        if (size < ND_PROTO_IDENTITY_SIZE)
                return -ENOBUFS;
        if (nd_proto_depth_to_um(id->depth_min_mm, &dmin) < 0 || nd_proto_depth_to_um(id->depth_max_mm, &dmax) < 0 ||
            nd_proto_depth_to_um(id->depth_step_mm, &dstep) < 0 || nd_proto_speed_to_chz(id->speed_min_hz, &smin) < 0 ||
            nd_proto_speed_to_chz(id->speed_max_hz, &smax) < 0 || id->max_telemetry_rate_hz > UINT16_MAX)
                return -ERANGE;

        uint8_t out[ND_PROTO_IDENTITY_SIZE] = {0};
        memcpy(out + ID_OFF_MAGIC, ND_PROTO_MAGIC, ND_PROTO_MAGIC_SIZE);
        out[ID_OFF_MAJOR] = id->protocol_major;
        out[ID_OFF_MINOR] = id->protocol_minor;
        if (put_string(out + ID_OFF_SERIAL, ND_PROTO_SERIAL_SIZE, PRINTABLE_NO_SPACE, false, id->serial) < 0 ||
            put_string(out + ID_OFF_MODEL, ND_PROTO_MODEL_SIZE, PRINTABLE, false, id->model) < 0 ||
            put_string(out + ID_OFF_FIRMWARE, ND_PROTO_FIRMWARE_SIZE, PRINTABLE, false, id->firmware_version) < 0)
                return -EINVAL;
        nd_write_le16(out + ID_OFF_DEPTH_MIN, dmin);
        nd_write_le16(out + ID_OFF_DEPTH_MAX, dmax);
        nd_write_le16(out + ID_OFF_DEPTH_STEP, dstep);
        nd_write_le16(out + ID_OFF_SPEED_MIN, smin);
        nd_write_le16(out + ID_OFF_SPEED_MAX, smax);
        nd_write_le16(out + ID_OFF_RATE_MAX, (uint16_t) id->max_telemetry_rate_hz);
        memcpy(buf, out, sizeof out);
        return ND_PROTO_IDENTITY_SIZE;
}

static int temperature_to_wire(double c, int16_t *ret) {
        if (!isfinite(c))
                return -ERANGE;
        double cc = round(c * CC_PER_C);
        if (cc < INT16_MIN || cc > INT16_MAX)
                return -ERANGE;
        *ret = (int16_t) cc;
        return 0;
}

int nd_proto_encode_status(const nd_proto_status *st, uint8_t *buf, size_t size) {
        uint16_t depth, speed;
        int16_t cc;

        if (size < ND_PROTO_STATUS_SIZE)
                return -ENOBUFS;
        if (nd_proto_depth_to_um(st->set_depth_mm, &depth) < 0 || nd_proto_speed_to_chz(st->set_speed_hz, &speed) < 0 ||
            temperature_to_wire(st->temperature_c, &cc) < 0 || st->battery_percent > UINT8_MAX ||
            st->watchdog_timeout_ms > UINT16_MAX || st->watchdog_remaining_ms > UINT16_MAX ||
            st->telemetry_rate_hz > UINT16_MAX)
                return -ERANGE;

        uint8_t out[ND_PROTO_STATUS_SIZE] = {0};
        out[ST_OFF_MOTOR] = st->motor_running;
        out[ST_OFF_STATUS] = st->status;
        out[ST_OFF_FAULTS] = st->faults;
        out[ST_OFF_BATTERY] = (uint8_t) st->battery_percent;
        nd_write_le16(out + ST_OFF_TEMPERATURE, (uint16_t) cc);
        nd_write_le16(out + ST_OFF_SET_DEPTH, depth);
        nd_write_le16(out + ST_OFF_SET_SPEED, speed);
        nd_write_le16(out + ST_OFF_WD_TIMEOUT, (uint16_t) st->watchdog_timeout_ms);
        nd_write_le16(out + ST_OFF_WD_REMAINING, (uint16_t) st->watchdog_remaining_ms);
        nd_write_le16(out + ST_OFF_RATE, (uint16_t) st->telemetry_rate_hz);
        out[ST_OFF_TELEMETRY_ON] = st->telemetry_enabled;
        nd_write_le32(out + ST_OFF_TIMESTAMP, st->timestamp_us);
        memcpy(buf, out, sizeof out);
        return ND_PROTO_STATUS_SIZE;
}

int nd_proto_encode_cartridge(const nd_proto_cartridge *c, uint8_t *buf, size_t size) {
        if (size < ND_PROTO_CARTRIDGE_SIZE)
                return -ENOBUFS;
        if (c->needles > UINT8_MAX)
                return -ERANGE;

        uint8_t out[ND_PROTO_CARTRIDGE_SIZE] = {0};
        out[CA_OFF_PRESENT] = c->present;
        out[CA_OFF_NEEDLES] = (uint8_t) c->needles;
        if (put_string(out + CA_OFF_ID, ND_PROTO_CARTRIDGE_ID_SIZE, PRINTABLE_NO_SPACE, !c->present, c->id) < 0)
                return -EINVAL;
        memcpy(buf, out, sizeof out);
        return ND_PROTO_CARTRIDGE_SIZE;
}

int nd_proto_encode_packet(const nd_proto_sample *samples, unsigned n, uint8_t *buf, size_t size) {
        if (n < 1 || n > ND_PROTO_SAMPLES_PER_PACKET_MAX)
                return -EINVAL;
        if (size < ND_PROTO_PACKET_SIZE(n))
                return -ENOBUFS;

        uint8_t out[ND_PROTO_PACKET_MAX_SIZE] = {0};
        out[PK_OFF_TYPE] = ND_PROTO_PACKET_SAMPLES;
        out[PK_OFF_COUNT] = (uint8_t) n;
        nd_write_le32(out + PK_OFF_FIRST_SEQ, samples[0].sequence);
        for (unsigned i = 0; i < n; i++) {
                const nd_proto_sample *s = samples + i;
                uint8_t *p = out + PK_HEADER_END + i * ND_PROTO_SAMPLE_SIZE;
                uint16_t depth, speed, current;
                int16_t cc;

                if (s->sequence != (uint32_t) (samples[0].sequence + i))
                        return -EINVAL;
                if (nd_proto_depth_to_um(s->depth_mm, &depth) < 0 || nd_proto_speed_to_chz(s->speed_hz, &speed) < 0 ||
                    to_wire16(s->current_ma, 1.0, &current) < 0 || temperature_to_wire(s->temperature_c, &cc) < 0 ||
                    s->battery_percent > UINT8_MAX)
                        return -ERANGE;
                nd_write_le32(p + SA_OFF_TIMESTAMP, s->timestamp_us);
                nd_write_le16(p + SA_OFF_DEPTH, depth);
                nd_write_le16(p + SA_OFF_SPEED, speed);
                nd_write_le16(p + SA_OFF_CURRENT, current);
                nd_write_le16(p + SA_OFF_TEMPERATURE, (uint16_t) cc);
                p[SA_OFF_BATTERY] = (uint8_t) s->battery_percent;
                p[SA_OFF_STATUS] = s->status;
                p[SA_OFF_FAULTS] = s->faults;
        }
        size_t body = ND_PROTO_PACKET_SIZE(n) - ND_PROTO_PACKET_CRC_SIZE;
        nd_write_le32(out + body, nd_proto_crc32(out, body));
        memcpy(buf, out, ND_PROTO_PACKET_SIZE(n));
        return (int) ND_PROTO_PACKET_SIZE(n);
}
