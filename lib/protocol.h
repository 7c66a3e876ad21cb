/* protocol.h: the USB wire protocol between needled and the pen (docs/protocol.md), as pure
 * encode/decode functions. No I/O, no allocation, no global state.
 *
 * Both sides live here so the daemon, the pen model and the tests share one codec:
 *   host side: nd_proto_request_*() build control requests; nd_proto_decode_*() check and
 *              decode the pen's replies and telemetry packets into host units (mm, Hz, mA, °C);
 *   pen side:  nd_proto_parse_request() checks a control request the pen received;
 *              nd_proto_encode_*() build the replies and telemetry packets.
 *
 * Every decoder takes (const uint8_t *buf, size_t len), checks every byte it reads against len,
 * and on bad input returns a negative errno, fills *err (when not NULL) with a kind and a
 * message naming what is wrong, and leaves *ret in an unspecified but harmless state.
 *
 * Wire conventions: little-endian, fixed sizes, integer units (µm, centi-Hz, mA, centi-°C, ms,
 * µs); strings are fixed-size ASCII fields, NUL-padded, not necessarily NUL-terminated. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport.h"

/* ---- The device ---------------------------------------------------------------------------- */

#define ND_PROTO_USB_VID_DEFAULT      0x1209u /* pid.codes */
#define ND_PROTO_USB_PID_DEFAULT      0x0001u /* pid.codes test PID */
#define ND_PROTO_INTERFACE_CLASS      0xFFu   /* vendor-specific */
#define ND_PROTO_INTERFACE_SUBCLASS   0x4Eu   /* 'N': this protocol */
#define ND_PROTO_INTERFACE_PROTOCOL   0x01u   /* == ND_PROTO_VERSION_MAJOR */
#define ND_PROTO_INTERFACE_NUMBER     0u      /* wIndex of every control request */
#define ND_PROTO_TELEMETRY_ENDPOINT   0x81u   /* interrupt IN */
#define ND_PROTO_TELEMETRY_MAX_PACKET 64u     /* wMaxPacketSize of the interrupt endpoint */
#define ND_PROTO_TELEMETRY_INTERVAL_MS 1u     /* bInterval (full speed: frames of 1 ms) */
#define ND_PROTO_EP0_MAX_PACKET       64u

/* Protocol version. A host speaks exactly one major; minors of a major only add. */
#define ND_PROTO_VERSION_MAJOR 1u
#define ND_PROTO_VERSION_MINOR 0u

/* ---- Control requests (EP0) ------------------------------------------------------------------ */

/* bmRequestType: vendor type, interface recipient. */
#define ND_PROTO_REQTYPE_OUT 0x41u /* host-to-device | vendor | interface */
#define ND_PROTO_REQTYPE_IN  0xC1u /* device-to-host | vendor | interface */

typedef enum nd_proto_request_code {
        ND_PROTO_REQ_IDENTIFY      = 0x01, /* IN  wValue = host version (major << 8 | minor) */
        ND_PROTO_REQ_GET_STATUS    = 0x02, /* IN  */
        ND_PROTO_REQ_GET_CARTRIDGE = 0x03, /* IN  */
        ND_PROTO_REQ_SET_DEPTH     = 0x10, /* OUT wValue = depth µm */
        ND_PROTO_REQ_SET_SPEED     = 0x11, /* OUT wValue = speed centi-Hz */
        ND_PROTO_REQ_MOTOR_START   = 0x12, /* OUT */
        ND_PROTO_REQ_MOTOR_STOP    = 0x13, /* OUT, never refused (any wValue, before IDENTIFY too) */
        ND_PROTO_REQ_HEARTBEAT     = 0x20, /* OUT: arms/feeds the watchdog */
        ND_PROTO_REQ_SET_WATCHDOG  = 0x21, /* OUT wValue = timeout ms; also feeds the watchdog */
        ND_PROTO_REQ_SET_TELEMETRY = 0x22, /* OUT data: nd_proto set-telemetry block (4 bytes) */
        ND_PROTO_REQ_CLEAR_FAULTS  = 0x23, /* OUT: clears latched faults whose cause is gone */
} nd_proto_request_code;

/* Sizes of the data stages. IN requests must ask for at least this much (wLength >=); the pen
 * answers exactly this many bytes. OUT requests carry exactly this many. */
#define ND_PROTO_IDENTITY_SIZE      64u
#define ND_PROTO_STATUS_SIZE        24u
#define ND_PROTO_CARTRIDGE_SIZE     36u
#define ND_PROTO_SET_TELEMETRY_SIZE 4u

/* Fixed string fields (bytes on the wire; decoded strings get one more byte for the NUL). */
#define ND_PROTO_SERIAL_SIZE       16u
#define ND_PROTO_MODEL_SIZE        16u
#define ND_PROTO_FIRMWARE_SIZE     12u
#define ND_PROTO_CARTRIDGE_ID_SIZE 32u

#define ND_PROTO_MAGIC "NPEN" /* first 4 bytes of the IDENTIFY reply */
#define ND_PROTO_MAGIC_SIZE 4u

/* Watchdog: default after reset and the range SET_WATCHDOG accepts. */
#define ND_PROTO_WATCHDOG_DEFAULT_MS 500u
#define ND_PROTO_WATCHDOG_MIN_MS     50u
#define ND_PROTO_WATCHDOG_MAX_MS     10000u

/* Telemetry rates a pen may advertise (IDENTIFY max_telemetry_rate_hz is within these). */
#define ND_PROTO_TELEMETRY_RATE_MIN_HZ 1u
#define ND_PROTO_TELEMETRY_RATE_MAX_HZ 1000u

/* ---- Status and fault bits (STATUS reply and every telemetry sample) -------------------------- */

#define ND_PROTO_STATUS_MOTOR_RUNNING     0x01u
#define ND_PROTO_STATUS_CARTRIDGE_PRESENT 0x02u
#define ND_PROTO_STATUS_WATCHDOG_ARMED    0x04u
#define ND_PROTO_STATUS_ALL               0x07u /* other bits are reserved, sent as 0 */

/* Latched by the pen's own firmware checks (its hard backstops, see docs/protocol.md), which are
 * looser than the daemon's limits: the daemon does its own interlocks on the measured values.
 * Any fault bit set: the motor is stopped and MOTOR_START is refused. */
#define ND_PROTO_FAULT_OVER_TEMPERATURE 0x01u
#define ND_PROTO_FAULT_MOTOR_STALL      0x02u
#define ND_PROTO_FAULT_OVER_CURRENT     0x04u
#define ND_PROTO_FAULT_DEPTH_DEVIATION  0x08u
#define ND_PROTO_FAULT_WATCHDOG_EXPIRED 0x10u /* host heartbeat lost while the motor ran */
#define ND_PROTO_FAULT_LOW_BATTERY      0x20u
#define ND_PROTO_FAULT_ALL              0x3Fu

/* The D-Bus fault code of one fault bit ("over-temperature", ..., "heartbeat-lost",
 * "low-battery"); NULL when bit is not exactly one known fault bit. Static string. */
const char *nd_proto_fault_name(uint8_t bit);

/* ---- Telemetry (interrupt IN 0x81) ----------------------------------------------------------- */

#define ND_PROTO_PACKET_SAMPLES      0x01u /* packet type */
#define ND_PROTO_PACKET_HEADER_SIZE  8u
#define ND_PROTO_SAMPLE_SIZE         16u
#define ND_PROTO_PACKET_CRC_SIZE     4u
#define ND_PROTO_SAMPLES_PER_PACKET_MAX 3u /* 8 + 3 * 16 + 4 = 60 <= 64 */
#define ND_PROTO_PACKET_SIZE(count) \
        (ND_PROTO_PACKET_HEADER_SIZE + (count) * ND_PROTO_SAMPLE_SIZE + ND_PROTO_PACKET_CRC_SIZE)
#define ND_PROTO_PACKET_MAX_SIZE ND_PROTO_PACKET_SIZE(ND_PROTO_SAMPLES_PER_PACKET_MAX)

/* Physical ranges: a decoded value outside these is an error (-ERANGE), not a measurement. */
#define ND_PROTO_DEPTH_MAX_MM         5.0
#define ND_PROTO_SPEED_MAX_HZ         500.0
#define ND_PROTO_CURRENT_MAX_MA       5000.0
#define ND_PROTO_TEMPERATURE_MIN_C    (-40.0)
#define ND_PROTO_TEMPERATURE_MAX_C    125.0
#define ND_PROTO_BATTERY_MAX_PERCENT  100u

/* One telemetry sample in host units. */
typedef struct nd_proto_sample {
        uint32_t sequence;      /* consecutive from sample to sample, wraps 0xffffffff -> 0 */
        uint32_t timestamp_us;  /* device clock when measured; wraps every 2^32 µs (~71.6 min),
                                 * see nd_proto_clock_extend() */
        double depth_mm;        /* measured needle depth, 0.001 mm resolution */
        double speed_hz;        /* measured stroke rate, 0.01 Hz resolution */
        double current_ma;      /* motor current, 1 mA resolution */
        double temperature_c;   /* handpiece temperature, 0.01 °C resolution */
        unsigned battery_percent;
        uint8_t status;         /* ND_PROTO_STATUS_* */
        uint8_t faults;         /* ND_PROTO_FAULT_* */
} nd_proto_sample;

/* One decoded telemetry packet: 1..ND_PROTO_SAMPLES_PER_PACKET_MAX consecutive samples. */
typedef struct nd_proto_packet {
        unsigned n_samples;
        nd_proto_sample samples[ND_PROTO_SAMPLES_PER_PACKET_MAX];
} nd_proto_packet;

/* Extends 32-bit device timestamps to 64 bits. Feed every sample's timestamp in order; correct
 * as long as consecutive samples are less than 2^32 µs apart (the pen's clock only moves on). */
typedef struct nd_proto_clock {
        bool valid;
        uint64_t last_us;
} nd_proto_clock;

/* Returns the 64-bit device time of ts: the first call returns ts itself, each later one the
 * previous value plus the forward distance (uint32_t)(ts - previous) modulo 2^32. */
uint64_t nd_proto_clock_extend(nd_proto_clock *c, uint32_t ts);

/* ---- Errors ----------------------------------------------------------------------------------- */

typedef enum nd_proto_error_kind {
        ND_PROTO_ERR_NONE = 0,
        ND_PROTO_ERR_LENGTH,    /* too short, too long, wLength wrong */
        ND_PROTO_ERR_CRC,       /* telemetry CRC mismatch */
        ND_PROTO_ERR_TYPE,      /* unknown packet type, request, direction or request type */
        ND_PROTO_ERR_COUNT,     /* sample count 0, too large, or not matching the length */
        ND_PROTO_ERR_RESERVED,  /* a reserved field or bit is not 0 */
        ND_PROTO_ERR_RANGE,     /* a value outside its physical or protocol range */
        ND_PROTO_ERR_MAGIC,     /* IDENTIFY reply does not start with ND_PROTO_MAGIC */
        ND_PROTO_ERR_VERSION,   /* protocol major unknown, or minor not the one negotiated */
        ND_PROTO_ERR_STRING,    /* a string field empty, unprintable or not NUL-padded */
        ND_PROTO_ERR_INCONSISTENT, /* fields contradict each other */
} nd_proto_error_kind;

#define ND_PROTO_ERROR_MESSAGE_MAX 128u

typedef struct nd_proto_error {
        nd_proto_error_kind kind;
        char message[ND_PROTO_ERROR_MESSAGE_MAX]; /* e.g. "telemetry: bad CRC 0x12345678, expected 0x..." */
} nd_proto_error;

/* ---- Decoded replies (host units) ------------------------------------------------------------- */

typedef struct nd_proto_identity {
        uint8_t protocol_major, protocol_minor; /* the version the pen answers in */
        char serial[ND_PROTO_SERIAL_SIZE + 1];  /* 1..16 chars, 0x21..0x7e (no spaces) */
        char model[ND_PROTO_MODEL_SIZE + 1];    /* 1..16 chars, 0x20..0x7e */
        char firmware_version[ND_PROTO_FIRMWARE_SIZE + 1]; /* 1..12 chars, 0x20..0x7e */
        double depth_min_mm, depth_max_mm, depth_step_mm;  /* wire: µm */
        double speed_min_hz, speed_max_hz;                 /* wire: centi-Hz */
        unsigned max_telemetry_rate_hz;
} nd_proto_identity;

typedef struct nd_proto_status {
        bool motor_running;
        uint8_t status;                /* ND_PROTO_STATUS_* */
        uint8_t faults;                /* ND_PROTO_FAULT_* */
        unsigned battery_percent;
        double temperature_c;
        double set_depth_mm, set_speed_hz;
        unsigned watchdog_timeout_ms;
        unsigned watchdog_remaining_ms; /* 0 when not armed */
        unsigned telemetry_rate_hz;
        bool telemetry_enabled;
        uint32_t timestamp_us;          /* device clock now, same clock as telemetry */
} nd_proto_status;

typedef struct nd_proto_cartridge {
        bool present;
        unsigned needles;                          /* 1..255 when present, else 0 */
        char id[ND_PROTO_CARTRIDGE_ID_SIZE + 1];   /* 1..32 chars 0x21..0x7e when present, else "" */
} nd_proto_cartridge;

/* A control request as the pen sees it after nd_proto_parse_request(). */
typedef struct nd_proto_request {
        nd_proto_request_code code;
        uint8_t host_major, host_minor;  /* IDENTIFY */
        uint16_t depth_um;               /* SET_DEPTH */
        uint16_t speed_chz;              /* SET_SPEED */
        uint16_t watchdog_timeout_ms;    /* SET_WATCHDOG */
        uint16_t telemetry_rate_hz;      /* SET_TELEMETRY (0 when disabling) */
        bool telemetry_enabled;          /* SET_TELEMETRY */
} nd_proto_request;

/* ---- Host side: requests ------------------------------------------------------------------------
 * Each fills *setup (and the data stage where there is one); the caller submits them with
 * nd_transport_control(). Range errors: -ERANGE (value not representable on the wire). */

void nd_proto_request_identify(nd_control_setup *setup, uint8_t host_major, uint8_t host_minor);
void nd_proto_request_get_status(nd_control_setup *setup);
void nd_proto_request_get_cartridge(nd_control_setup *setup);
/* depth_mm rounded to whole µm; -ERANGE when negative, not finite or above 65.535 mm. */
int nd_proto_request_set_depth(nd_control_setup *setup, double depth_mm);
/* speed_hz rounded to centi-Hz; -ERANGE when <= 0, not finite or above 655.35 Hz. */
int nd_proto_request_set_speed(nd_control_setup *setup, double speed_hz);
void nd_proto_request_motor_start(nd_control_setup *setup);
void nd_proto_request_motor_stop(nd_control_setup *setup);
void nd_proto_request_heartbeat(nd_control_setup *setup);
/* -ERANGE outside ND_PROTO_WATCHDOG_MIN_MS..ND_PROTO_WATCHDOG_MAX_MS. */
int nd_proto_request_set_watchdog(nd_control_setup *setup, unsigned timeout_ms);
/* enabled: rate_hz in 1..ND_PROTO_TELEMETRY_RATE_MAX_HZ; disabled: rate_hz ignored (sent as 0).
 * Fills data[ND_PROTO_SET_TELEMETRY_SIZE]. -ERANGE for a bad rate. */
int nd_proto_request_set_telemetry(nd_control_setup *setup, uint8_t data[static ND_PROTO_SET_TELEMETRY_SIZE],
                                   unsigned rate_hz, bool enabled);
void nd_proto_request_clear_faults(nd_control_setup *setup);

/* ---- Host side: decoding replies and telemetry ---------------------------------------------- */

/* Decodes an IDENTIFY reply to a request that stated host_major.host_minor. Errors: -EBADMSG
 * (length, magic, strings, reserved bytes), -EPROTONOSUPPORT (major differs from host_major,
 * or minor above host_minor: the host refuses an unknown major), -ERANGE (capabilities out of
 * range or inconsistent: min > max, step 0, range not a whole number of steps, rate 0). */
int nd_proto_decode_identity(const uint8_t *buf, size_t len, uint8_t host_major, uint8_t host_minor,
                             nd_proto_identity *ret, nd_proto_error *err);
/* Decodes a STATUS reply. -EBADMSG (length, reserved, contradiction), -ERANGE (values). */
int nd_proto_decode_status(const uint8_t *buf, size_t len, nd_proto_status *ret, nd_proto_error *err);
/* Decodes a CARTRIDGE reply. -EBADMSG (length, reserved, strings, present without id/needles). */
int nd_proto_decode_cartridge(const uint8_t *buf, size_t len, nd_proto_cartridge *ret, nd_proto_error *err);
/* Decodes one telemetry packet. Checks, in order: length (header + CRC at least, at most
 * ND_PROTO_TELEMETRY_MAX_PACKET), CRC, type, count (1..3 and the length matching it), reserved
 * bytes and bits, physical ranges. -EBADMSG for all but the ranges, -ERANGE for those. */
int nd_proto_decode_packet(const uint8_t *buf, size_t len, nd_proto_packet *ret, nd_proto_error *err);

/* ---- Pen side ------------------------------------------------------------------------------------ */

/* Checks a received control request against the protocol (not against the pen's state or
 * capabilities): request type, direction, wIndex, wValue/wLength rules, OUT data layout
 * (data holds len bytes, the OUT data stage). -EOPNOTSUPP unknown request or not vendor/interface,
 * -EBADMSG malformed. The pen STALLs on any error. */
int nd_proto_parse_request(const nd_control_setup *setup, const uint8_t *data, size_t len,
                           nd_proto_request *ret, nd_proto_error *err);

/* The pen's answer to a host stating host_major.host_minor, for a pen implementing
 * pen_major.0..pen_minor: the minor it answers in (host_minor if it implements it, else its
 * own highest, which the host also implements). -EPROTONOSUPPORT when the majors differ. */
int nd_proto_negotiate(uint8_t pen_major, uint8_t pen_minor, uint8_t host_major, uint8_t host_minor);

/* Encoders write exactly their size into buf (size >= it, else -ENOBUFS) and return that size.
 * Values are rounded to wire units; -ERANGE / -EINVAL when a value or string cannot be sent. */
int nd_proto_encode_identity(const nd_proto_identity *id, uint8_t *buf, size_t size);
int nd_proto_encode_status(const nd_proto_status *st, uint8_t *buf, size_t size);
int nd_proto_encode_cartridge(const nd_proto_cartridge *c, uint8_t *buf, size_t size);
/* Encodes n (1..3) consecutive samples; samples[i].sequence must be samples[0].sequence + i
 * (-EINVAL otherwise). Appends the CRC. Returns ND_PROTO_PACKET_SIZE(n). */
int nd_proto_encode_packet(const nd_proto_sample *samples, unsigned n, uint8_t *buf, size_t size);

/* ---- Shared helpers --------------------------------------------------------------------------- */

/* CRC-32 (zlib's crc32, IEEE 802.3 polynomial) of a telemetry packet's bytes. */
uint32_t nd_proto_crc32(const uint8_t *buf, size_t len);

/* Wire-unit conversions with rounding; -ERANGE when not finite, negative or too large for u16. */
int nd_proto_depth_to_um(double depth_mm, uint16_t *ret);
int nd_proto_speed_to_chz(double speed_hz, uint16_t *ret);

/* The rule the pen applies to SET_DEPTH / SET_SPEED: 0 when allowed, -ERANGE outside the pen's
 * range, -EDOM off the depth step grid (depth_min + k * step, compared in whole µm). */
int nd_proto_check_depth(const nd_proto_identity *id, double depth_mm);
int nd_proto_check_speed(const nd_proto_identity *id, double speed_hz);
