/* test-protocol.c: the wire codec: round trips of every request, reply and packet; malformed input
 * of every kind; version negotiation. */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "check-main.h"
#include "protocol.h"
#include "unaligned.h"
#include "util.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

/* Recomputes the CRC of a telemetry packet of len bytes, so a test reaches the checks behind it. */
static void fix_crc(uint8_t *buf, size_t len) {
        nd_write_le32(buf + len - ND_PROTO_PACKET_CRC_SIZE, nd_proto_crc32(buf, len - ND_PROTO_PACKET_CRC_SIZE));
}

static nd_proto_identity sample_identity(void) {
        nd_proto_identity id = {
                .protocol_major = ND_PROTO_VERSION_MAJOR,
                .protocol_minor = ND_PROTO_VERSION_MINOR,
                .serial = "PEN-0042",
                .model = "Needle Pro 2",
                .firmware_version = "2.1.0-rc1",
                .depth_min_mm = 0.2,
                .depth_max_mm = 2.5,
                .depth_step_mm = 0.05,
                .speed_min_hz = 25,
                .speed_max_hz = 150,
                .max_telemetry_rate_hz = 1000,
        };
        return id;
}

static nd_proto_sample make_sample(uint32_t seq) {
        return (nd_proto_sample) {
                .sequence = seq,
                .timestamp_us = 1000u * seq + 7,
                .depth_mm = 1.25,
                .speed_hz = 119.97,
                .current_ma = 612,
                .temperature_c = 31.45,
                .battery_percent = 87,
                .status = ND_PROTO_STATUS_MOTOR_RUNNING | ND_PROTO_STATUS_CARTRIDGE_PRESENT,
                .faults = 0,
        };
}

/* A valid packet of n samples; returns its length. */
static size_t make_packet(uint8_t *buf, unsigned n, uint32_t first) {
        nd_proto_sample s[ND_PROTO_SAMPLES_PER_PACKET_MAX];
        for (unsigned i = 0; i < n; i++)
                s[i] = make_sample(first + i);
        int len = nd_proto_encode_packet(s, n, buf, ND_PROTO_TELEMETRY_MAX_PACKET);
        ck_assert_int_eq(len, (int) ND_PROTO_PACKET_SIZE(n));
        return (size_t) len;
}

/* ---- requests ---------------------------------------------------------------------------------- */

static void parse_ok(const nd_control_setup *setup, const uint8_t *data, nd_proto_request *req) {
        nd_proto_error err;
        int r = nd_proto_parse_request(setup, data, (setup->request_type & 0x80) ? 0 : setup->length, req, &err);
        ck_assert_msg(r == 0, "parse failed: %d %s", r, err.message);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_NONE);
}

START_TEST(test_request_round_trip) {
        nd_control_setup setup;
        nd_proto_request req;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];

        nd_proto_request_identify(&setup, 1, 7);
        ck_assert_uint_eq(setup.request_type, 0xC1);
        ck_assert_uint_eq(setup.request, 0x01);
        ck_assert_uint_eq(setup.value, 0x0107);
        ck_assert_uint_eq(setup.index, 0);
        ck_assert_uint_eq(setup.length, 64);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_IDENTIFY);
        ck_assert_uint_eq(req.host_major, 1);
        ck_assert_uint_eq(req.host_minor, 7);

        nd_proto_request_get_status(&setup);
        ck_assert_uint_eq(setup.length, ND_PROTO_STATUS_SIZE);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_GET_STATUS);

        nd_proto_request_get_cartridge(&setup);
        ck_assert_uint_eq(setup.length, ND_PROTO_CARTRIDGE_SIZE);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_GET_CARTRIDGE);

        ck_assert_int_eq(nd_proto_request_set_depth(&setup, 1.25), 0);
        ck_assert_uint_eq(setup.request_type, 0x41);
        ck_assert_uint_eq(setup.value, 1250);
        ck_assert_uint_eq(setup.length, 0);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_SET_DEPTH);
        ck_assert_uint_eq(req.depth_um, 1250);
        /* rounding to the nearest µm, not truncation */
        ck_assert_int_eq(nd_proto_request_set_depth(&setup, 0.35), 0);
        ck_assert_uint_eq(setup.value, 350);

        ck_assert_int_eq(nd_proto_request_set_speed(&setup, 119.99), 0);
        ck_assert_uint_eq(setup.value, 11999);
        parse_ok(&setup, NULL, &req);
        ck_assert_uint_eq(req.speed_chz, 11999);

        nd_proto_request_motor_start(&setup);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_MOTOR_START);
        nd_proto_request_motor_stop(&setup);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_MOTOR_STOP);
        nd_proto_request_heartbeat(&setup);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_HEARTBEAT);
        nd_proto_request_clear_faults(&setup);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_CLEAR_FAULTS);

        ck_assert_int_eq(nd_proto_request_set_watchdog(&setup, 250), 0);
        parse_ok(&setup, NULL, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_SET_WATCHDOG);
        ck_assert_uint_eq(req.watchdog_timeout_ms, 250);

        ck_assert_int_eq(nd_proto_request_set_telemetry(&setup, data, 500, true), 0);
        ck_assert_uint_eq(setup.length, 4);
        ck_assert_uint_eq(data[0], 500 & 0xff);
        ck_assert_uint_eq(data[1], 500 >> 8);
        ck_assert_uint_eq(data[2], 1);
        ck_assert_uint_eq(data[3], 0);
        parse_ok(&setup, data, &req);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_SET_TELEMETRY);
        ck_assert_uint_eq(req.telemetry_rate_hz, 500);
        ck_assert(req.telemetry_enabled);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&setup, data, 777, false), 0);
        parse_ok(&setup, data, &req);
        ck_assert(!req.telemetry_enabled);
        ck_assert_uint_eq(req.telemetry_rate_hz, 0);
}
END_TEST

START_TEST(test_request_encoder_ranges) {
        nd_control_setup setup;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];

        ck_assert_int_eq(nd_proto_request_set_depth(&setup, -0.1), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_depth(&setup, NAN), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_depth(&setup, INFINITY), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_depth(&setup, 65.536), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_depth(&setup, 65.535), 0);
        ck_assert_int_eq(nd_proto_request_set_speed(&setup, 0), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_speed(&setup, 0.004), -ERANGE); /* rounds to 0 */
        ck_assert_int_eq(nd_proto_request_set_speed(&setup, 655.36), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_speed(&setup, -NAN), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_watchdog(&setup, 49), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_watchdog(&setup, 10001), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_watchdog(&setup, 50), 0);
        ck_assert_int_eq(nd_proto_request_set_watchdog(&setup, 10000), 0);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&setup, data, 0, true), -ERANGE);
        ck_assert_int_eq(nd_proto_request_set_telemetry(&setup, data, 1001, true), -ERANGE);
}
END_TEST

static int parse_err(const nd_control_setup *setup, const uint8_t *data, size_t len, nd_proto_error_kind kind) {
        nd_proto_request req;
        nd_proto_error err;
        int r = nd_proto_parse_request(setup, data, len, &req, &err);
        ck_assert_msg(r < 0, "request 0x%02x accepted", setup->request);
        ck_assert_msg(err.kind == kind, "kind %d, expected %d (%s)", err.kind, kind, err.message);
        ck_assert(strlen(err.message) > 0);
        return r;
}

START_TEST(test_request_malformed) {
        nd_control_setup setup;
        uint8_t data[8] = {0};

        /* not vendor/interface */
        nd_proto_request_get_status(&setup);
        setup.request_type = 0x80; /* standard, device */
        ck_assert_int_eq(parse_err(&setup, NULL, 0, ND_PROTO_ERR_TYPE), -EOPNOTSUPP);
        setup.request_type = 0xC0; /* vendor, device */
        ck_assert_int_eq(parse_err(&setup, NULL, 0, ND_PROTO_ERR_TYPE), -EOPNOTSUPP);
        /* unknown request */
        nd_proto_request_get_status(&setup);
        setup.request = 0x7E;
        ck_assert_int_eq(parse_err(&setup, NULL, 0, ND_PROTO_ERR_TYPE), -EOPNOTSUPP);
        /* wrong interface */
        nd_proto_request_get_status(&setup);
        setup.index = 1;
        ck_assert_int_eq(parse_err(&setup, NULL, 0, ND_PROTO_ERR_RANGE), -EBADMSG);
        /* wrong direction: GET_STATUS as OUT, SET_DEPTH as IN */
        nd_proto_request_get_status(&setup);
        setup.request_type = ND_PROTO_REQTYPE_OUT;
        setup.length = 0;
        ck_assert_int_eq(parse_err(&setup, NULL, 0, ND_PROTO_ERR_TYPE), -EBADMSG);
        ck_assert_int_eq(nd_proto_request_set_depth(&setup, 1.0), 0);
        setup.request_type = ND_PROTO_REQTYPE_IN;
        ck_assert_int_eq(parse_err(&setup, NULL, 0, ND_PROTO_ERR_TYPE), -EBADMSG);
        /* IN wLength too small; larger is fine */
        nd_proto_request_identify(&setup, 1, 0);
        setup.length = 63;
        parse_err(&setup, NULL, 0, ND_PROTO_ERR_LENGTH);
        setup.length = 200;
        nd_proto_request req;
        ck_assert_int_eq(nd_proto_parse_request(&setup, NULL, 0, &req, NULL), 0);
        /* OUT with a data stage where none belongs */
        nd_proto_request_heartbeat(&setup);
        setup.length = 2;
        parse_err(&setup, data, 2, ND_PROTO_ERR_LENGTH);
        /* non-zero wValue where 0 is required */
        nd_proto_request_heartbeat(&setup);
        setup.value = 1;
        parse_err(&setup, NULL, 0, ND_PROTO_ERR_RESERVED);
        nd_proto_request_get_status(&setup);
        setup.value = 3;
        parse_err(&setup, NULL, 0, ND_PROTO_ERR_RESERVED);
        /* MOTOR_STOP is never refused for its wValue */
        nd_proto_request_motor_stop(&setup);
        setup.value = 0xffff;
        ck_assert_int_eq(nd_proto_parse_request(&setup, NULL, 0, &req, NULL), 0);
        ck_assert_int_eq(req.code, ND_PROTO_REQ_MOTOR_STOP);

        /* SET_TELEMETRY data stage */
        ck_assert_int_eq(nd_proto_request_set_telemetry(&setup, data, 100, true), 0);
        parse_err(&setup, data, 3, ND_PROTO_ERR_LENGTH);  /* data shorter than wLength */
        setup.length = 5;
        parse_err(&setup, data, 5, ND_PROTO_ERR_LENGTH);
        setup.length = 4;
        ck_assert_int_eq(nd_proto_parse_request(&setup, NULL, 4, &req, NULL), -EBADMSG); /* no data */
        data[3] = 1;
        parse_err(&setup, data, 4, ND_PROTO_ERR_RESERVED);
        data[3] = 0;
        data[2] = 2;
        parse_err(&setup, data, 4, ND_PROTO_ERR_RANGE);
        data[2] = 1;
        nd_write_le16(data, 0);
        parse_err(&setup, data, 4, ND_PROTO_ERR_RANGE);
        nd_write_le16(data, 1001);
        parse_err(&setup, data, 4, ND_PROTO_ERR_RANGE);
        data[2] = 0;
        nd_write_le16(data, 10);
        parse_err(&setup, data, 4, ND_PROTO_ERR_INCONSISTENT);
        setup.value = 1;
        nd_write_le16(data, 0);
        parse_err(&setup, data, 4, ND_PROTO_ERR_RESERVED);

        /* err may be NULL */
        setup.request = 0x99;
        ck_assert_int_eq(nd_proto_parse_request(&setup, data, 4, &req, NULL), -EOPNOTSUPP);
}
END_TEST

/* ---- version negotiation ------------------------------------------------------------------------ */

START_TEST(test_negotiation) {
        /* the pen answers in the host's minor when it implements it ... */
        ck_assert_int_eq(nd_proto_negotiate(1, 3, 1, 2), 2);
        ck_assert_int_eq(nd_proto_negotiate(1, 3, 1, 3), 3);
        ck_assert_int_eq(nd_proto_negotiate(1, 0, 1, 0), 0);
        /* ... else in its own highest, which a newer host also speaks */
        ck_assert_int_eq(nd_proto_negotiate(1, 0, 1, 5), 0);
        /* another major is refused */
        ck_assert_int_eq(nd_proto_negotiate(1, 0, 2, 0), -EPROTONOSUPPORT);
        ck_assert_int_eq(nd_proto_negotiate(2, 0, 1, 9), -EPROTONOSUPPORT);

        /* the host refuses an unknown major and a minor it did not ask for */
        nd_proto_identity id = sample_identity(), out;
        nd_proto_error err;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE];
        id.protocol_major = 2;
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, sizeof buf), 64);
        ck_assert_int_eq(nd_proto_decode_identity(buf, sizeof buf, 1, 0, &out, &err), -EPROTONOSUPPORT);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_VERSION);
        ck_assert_ptr_nonnull(strstr(err.message, "2.0"));
        id.protocol_major = 1;
        id.protocol_minor = 4;
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, sizeof buf), 64);
        ck_assert_int_eq(nd_proto_decode_identity(buf, sizeof buf, 1, 3, &out, &err), -EPROTONOSUPPORT);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_VERSION);
        ck_assert_int_eq(nd_proto_decode_identity(buf, sizeof buf, 1, 4, &out, &err), 0);
        ck_assert_uint_eq(out.protocol_minor, 4);
        /* an older minor than asked for is fine: the pen's highest */
        ck_assert_int_eq(nd_proto_decode_identity(buf, sizeof buf, 1, 9, &out, &err), 0);
}
END_TEST

/* ---- identify ------------------------------------------------------------------------------------ */

START_TEST(test_identity_round_trip) {
        nd_proto_identity id = sample_identity(), out;
        nd_proto_error err;
        uint8_t buf[ND_PROTO_IDENTITY_SIZE + 8], again[ND_PROTO_IDENTITY_SIZE];

        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, 63), -ENOBUFS);
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, sizeof buf), 64);
        ck_assert_mem_eq(buf, "NPEN\x01\x00\x00\x00PEN-0042\0", 17);
        ck_assert_uint_eq(buf[52], 200 & 0xff); /* depth min 200 µm, little-endian */
        ck_assert_uint_eq(buf[53], 0);
        ck_assert_uint_eq(buf[54], 2500 & 0xff);
        ck_assert_uint_eq(buf[55], 2500 >> 8);
        ck_assert_int_eq(nd_proto_decode_identity(buf, 64, 1, 0, &out, &err), 0);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_NONE);
        ck_assert_str_eq(out.serial, "PEN-0042");
        ck_assert_str_eq(out.model, "Needle Pro 2");
        ck_assert_str_eq(out.firmware_version, "2.1.0-rc1");
        ck_assert_double_eq_tol(out.depth_min_mm, 0.2, 1e-9);
        ck_assert_double_eq_tol(out.depth_max_mm, 2.5, 1e-9);
        ck_assert_double_eq_tol(out.depth_step_mm, 0.05, 1e-9);
        ck_assert_double_eq_tol(out.speed_min_hz, 25, 1e-9);
        ck_assert_double_eq_tol(out.speed_max_hz, 150, 1e-9);
        ck_assert_uint_eq(out.max_telemetry_rate_hz, 1000);
        ck_assert_int_eq(nd_proto_encode_identity(&out, again, sizeof again), 64);
        ck_assert_mem_eq(buf, again, 64);

        /* full-width strings with no NUL are allowed */
        snprintf(id.serial, sizeof id.serial, "ABCDEFGHIJKLMNOP");
        snprintf(id.firmware_version, sizeof id.firmware_version, "123456789012");
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, sizeof buf), 64);
        ck_assert_int_eq(nd_proto_decode_identity(buf, 64, 1, 0, &out, &err), 0);
        ck_assert_str_eq(out.serial, "ABCDEFGHIJKLMNOP");
        ck_assert_str_eq(out.firmware_version, "123456789012");

        /* encoder refuses what the decoder would refuse */
        id = sample_identity();
        snprintf(id.serial, sizeof id.serial, "with space");
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, sizeof buf), -EINVAL);
        id = sample_identity();
        id.model[0] = '\0';
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, sizeof buf), -EINVAL);
        id = sample_identity();
        id.depth_max_mm = NAN;
        ck_assert_int_eq(nd_proto_encode_identity(&id, buf, sizeof buf), -ERANGE);
}
END_TEST

static void identity_bad(const uint8_t *buf, size_t len, int want_r, nd_proto_error_kind kind) {
        nd_proto_identity out;
        nd_proto_error err;
        int r = nd_proto_decode_identity(buf, len, 1, 0, &out, &err);
        ck_assert_msg(r == want_r, "r=%d, expected %d (%s)", r, want_r, err.message);
        ck_assert_msg(err.kind == kind, "kind %d, expected %d (%s)", err.kind, kind, err.message);
        ck_assert(err.message[0] != '\0');
}

START_TEST(test_identity_malformed) {
        nd_proto_identity id = sample_identity();
        uint8_t good[ND_PROTO_IDENTITY_SIZE + 1], b[ND_PROTO_IDENTITY_SIZE + 1];
        ck_assert_int_eq(nd_proto_encode_identity(&id, good, sizeof good), 64);
        good[64] = 0;

        identity_bad(good, 0, -EBADMSG, ND_PROTO_ERR_LENGTH);
        identity_bad(NULL, 0, -EBADMSG, ND_PROTO_ERR_LENGTH);
        identity_bad(good, 63, -EBADMSG, ND_PROTO_ERR_LENGTH);
        identity_bad(good, 65, -EBADMSG, ND_PROTO_ERR_LENGTH);

#define MUTATE(stmt, want_r, want_kind) do { memcpy(b, good, sizeof b); stmt; identity_bad(b, 64, want_r, want_kind); } while (0)
        MUTATE(b[0] = 'X', -EBADMSG, ND_PROTO_ERR_MAGIC);
        MUTATE(b[4] = 2, -EPROTONOSUPPORT, ND_PROTO_ERR_VERSION);
        MUTATE(b[4] = 0, -EPROTONOSUPPORT, ND_PROTO_ERR_VERSION);
        MUTATE(b[5] = 1, -EPROTONOSUPPORT, ND_PROTO_ERR_VERSION);
        MUTATE(b[6] = 1, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(b[7] = 0x80, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(memset(b + 8, 0, 16), -EBADMSG, ND_PROTO_ERR_STRING);       /* empty serial */
        MUTATE(b[9] = ' ', -EBADMSG, ND_PROTO_ERR_STRING);                 /* space in serial */
        MUTATE(b[9] = 0x7f, -EBADMSG, ND_PROTO_ERR_STRING);                /* DEL */
        MUTATE(b[10] = 0xc3, -EBADMSG, ND_PROTO_ERR_STRING);               /* not ASCII */
        MUTATE(b[8 + 15] = 'Z', -EBADMSG, ND_PROTO_ERR_STRING);            /* junk after NUL */
        MUTATE(b[24] = '\n', -EBADMSG, ND_PROTO_ERR_STRING);               /* model */
        MUTATE(b[40 + 11] = '1', -EBADMSG, ND_PROTO_ERR_STRING);           /* firmware padding */
        MUTATE(nd_write_le16(b + 52, 2600), -ERANGE, ND_PROTO_ERR_RANGE);          /* min > max */
        MUTATE(nd_write_le16(b + 54, 5050), -ERANGE, ND_PROTO_ERR_RANGE);          /* beyond 5 mm */
        MUTATE(nd_write_le16(b + 56, 0), -ERANGE, ND_PROTO_ERR_RANGE);             /* step 0 */
        MUTATE(nd_write_le16(b + 56, 70), -ERANGE, ND_PROTO_ERR_RANGE);            /* 2300 µm % 70 != 0 */
        MUTATE(nd_write_le16(b + 58, 0), -ERANGE, ND_PROTO_ERR_RANGE);             /* speed min 0 */
        MUTATE(nd_write_le16(b + 58, 15001), -ERANGE, ND_PROTO_ERR_RANGE);         /* speed min > max */
        MUTATE(nd_write_le16(b + 60, 50001), -ERANGE, ND_PROTO_ERR_RANGE);         /* beyond 500 Hz */
        MUTATE(nd_write_le16(b + 62, 0), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 62, 1001), -ERANGE, ND_PROTO_ERR_RANGE);
#undef MUTATE
        /* err may be NULL */
        nd_proto_identity out;
        ck_assert_int_eq(nd_proto_decode_identity(good, 10, 1, 0, &out, NULL), -EBADMSG);
}
END_TEST

START_TEST(test_check_depth_speed) {
        nd_proto_identity id = sample_identity(); /* 0.2-2.5 step 0.05, 25-150 Hz */
        ck_assert_int_eq(nd_proto_check_depth(&id, 0.2), 0);
        ck_assert_int_eq(nd_proto_check_depth(&id, 1.25), 0);
        ck_assert_int_eq(nd_proto_check_depth(&id, 2.5), 0);
        ck_assert_int_eq(nd_proto_check_depth(&id, 0.35), 0); /* 0.35 is not exact in binary */
        ck_assert_int_eq(nd_proto_check_depth(&id, 1.26), -EDOM);
        ck_assert_int_eq(nd_proto_check_depth(&id, 0.15), -ERANGE);
        ck_assert_int_eq(nd_proto_check_depth(&id, 2.55), -ERANGE);
        ck_assert_int_eq(nd_proto_check_depth(&id, NAN), -ERANGE);
        ck_assert_int_eq(nd_proto_check_speed(&id, 25), 0);
        ck_assert_int_eq(nd_proto_check_speed(&id, 150), 0);
        ck_assert_int_eq(nd_proto_check_speed(&id, 24.99), -ERANGE);
        ck_assert_int_eq(nd_proto_check_speed(&id, 150.01), -ERANGE);
        ck_assert_int_eq(nd_proto_check_speed(&id, -INFINITY), -ERANGE);
}
END_TEST

/* ---- status ------------------------------------------------------------------------------------ */

static nd_proto_status sample_status(void) {
        return (nd_proto_status) {
                .motor_running = true,
                .status = ND_PROTO_STATUS_MOTOR_RUNNING | ND_PROTO_STATUS_WATCHDOG_ARMED,
                .faults = ND_PROTO_FAULT_LOW_BATTERY,
                .battery_percent = 3,
                .temperature_c = -12.34,
                .set_depth_mm = 0.75,
                .set_speed_hz = 120,
                .watchdog_timeout_ms = 500,
                .watchdog_remaining_ms = 499,
                .telemetry_rate_hz = 1000,
                .telemetry_enabled = true,
                .timestamp_us = 0xfedcba98,
        };
}

START_TEST(test_status_round_trip) {
        nd_proto_status st = sample_status(), out;
        nd_proto_error err;
        uint8_t buf[ND_PROTO_STATUS_SIZE], again[ND_PROTO_STATUS_SIZE];

        ck_assert_int_eq(nd_proto_encode_status(&st, buf, 23), -ENOBUFS);
        ck_assert_int_eq(nd_proto_encode_status(&st, buf, sizeof buf), 24);
        ck_assert_int_eq(nd_proto_decode_status(buf, 24, &out, &err), 0);
        ck_assert(out.motor_running);
        ck_assert_uint_eq(out.status, st.status);
        ck_assert_uint_eq(out.faults, ND_PROTO_FAULT_LOW_BATTERY);
        ck_assert_uint_eq(out.battery_percent, 3);
        ck_assert_double_eq_tol(out.temperature_c, -12.34, 1e-9);
        ck_assert_double_eq_tol(out.set_depth_mm, 0.75, 1e-9);
        ck_assert_double_eq_tol(out.set_speed_hz, 120, 1e-9);
        ck_assert_uint_eq(out.watchdog_timeout_ms, 500);
        ck_assert_uint_eq(out.watchdog_remaining_ms, 499);
        ck_assert_uint_eq(out.telemetry_rate_hz, 1000);
        ck_assert(out.telemetry_enabled);
        ck_assert_uint_eq(out.timestamp_us, 0xfedcba98);
        ck_assert_int_eq(nd_proto_encode_status(&out, again, sizeof again), 24);
        ck_assert_mem_eq(buf, again, 24);
}
END_TEST

static void status_bad(const uint8_t *buf, size_t len, int want_r, nd_proto_error_kind kind) {
        nd_proto_status out;
        nd_proto_error err;
        int r = nd_proto_decode_status(buf, len, &out, &err);
        ck_assert_msg(r == want_r, "r=%d, expected %d (%s)", r, want_r, err.message);
        ck_assert_msg(err.kind == kind, "kind %d, expected %d (%s)", err.kind, kind, err.message);
}

START_TEST(test_status_malformed) {
        nd_proto_status st = sample_status();
        uint8_t good[ND_PROTO_STATUS_SIZE + 1] = {0}, b[ND_PROTO_STATUS_SIZE + 1];
        ck_assert_int_eq(nd_proto_encode_status(&st, good, sizeof good), 24);

        status_bad(good, 23, -EBADMSG, ND_PROTO_ERR_LENGTH);
        status_bad(good, 25, -EBADMSG, ND_PROTO_ERR_LENGTH);
        status_bad(NULL, 0, -EBADMSG, ND_PROTO_ERR_LENGTH);
#define MUTATE(stmt, want_r, want_kind) do { memcpy(b, good, sizeof b); stmt; status_bad(b, 24, want_r, want_kind); } while (0)
        MUTATE(b[0] = 2, -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(b[0] = 0, -EBADMSG, ND_PROTO_ERR_INCONSISTENT);       /* stopped but running bit */
        MUTATE(b[1] = 0x08 | b[1], -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(b[2] = 0x40, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(b[3] = 101, -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 4, 12501), -ERANGE, ND_PROTO_ERR_RANGE);      /* 125.01 °C */
        MUTATE(nd_write_le16(b + 4, (uint16_t) -4001), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 6, 5001), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 8, 50001), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 10, 49), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 10, 10001), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 12, 501), -EBADMSG, ND_PROTO_ERR_INCONSISTENT);
        MUTATE(b[1] &= (uint8_t) ~ND_PROTO_STATUS_WATCHDOG_ARMED, -EBADMSG, ND_PROTO_ERR_INCONSISTENT);
        MUTATE(nd_write_le16(b + 14, 1001), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 14, 0), -ERANGE, ND_PROTO_ERR_RANGE);         /* enabled at 0 Hz */
        MUTATE(b[16] = 2, -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(b[17] = 1, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(b[19] = 1, -EBADMSG, ND_PROTO_ERR_RESERVED);
#undef MUTATE
}
END_TEST

/* ---- cartridge --------------------------------------------------------------------------------- */

START_TEST(test_cartridge_round_trip) {
        nd_proto_cartridge c = { .present = true, .needles = 36, .id = "LOT7-000123" }, out;
        nd_proto_error err;
        uint8_t buf[ND_PROTO_CARTRIDGE_SIZE], again[ND_PROTO_CARTRIDGE_SIZE];

        ck_assert_int_eq(nd_proto_encode_cartridge(&c, buf, 35), -ENOBUFS);
        ck_assert_int_eq(nd_proto_encode_cartridge(&c, buf, sizeof buf), 36);
        ck_assert_int_eq(nd_proto_decode_cartridge(buf, 36, &out, &err), 0);
        ck_assert(out.present);
        ck_assert_uint_eq(out.needles, 36);
        ck_assert_str_eq(out.id, "LOT7-000123");
        ck_assert_int_eq(nd_proto_encode_cartridge(&out, again, sizeof again), 36);
        ck_assert_mem_eq(buf, again, 36);

        nd_proto_cartridge none = { .present = false };
        ck_assert_int_eq(nd_proto_encode_cartridge(&none, buf, sizeof buf), 36);
        for (size_t i = 0; i < 36; i++)
                ck_assert_uint_eq(buf[i], 0);
        ck_assert_int_eq(nd_proto_decode_cartridge(buf, 36, &out, &err), 0);
        ck_assert(!out.present);
        ck_assert_str_eq(out.id, "");

        /* 32-character id, no NUL on the wire */
        snprintf(c.id, sizeof c.id, "%s", "0123456789abcdef0123456789ABCDEF");
        ck_assert_int_eq(nd_proto_encode_cartridge(&c, buf, sizeof buf), 36);
        ck_assert_int_eq(nd_proto_decode_cartridge(buf, 36, &out, &err), 0);
        ck_assert_str_eq(out.id, "0123456789abcdef0123456789ABCDEF");

        c.needles = 256;
        ck_assert_int_eq(nd_proto_encode_cartridge(&c, buf, sizeof buf), -ERANGE);
        c.needles = 12;
        c.id[0] = '\0';
        ck_assert_int_eq(nd_proto_encode_cartridge(&c, buf, sizeof buf), -EINVAL);
}
END_TEST

START_TEST(test_cartridge_malformed) {
        nd_proto_cartridge c = { .present = true, .needles = 12, .id = "C1" }, out;
        nd_proto_error err;
        uint8_t good[ND_PROTO_CARTRIDGE_SIZE + 1] = {0}, b[ND_PROTO_CARTRIDGE_SIZE + 1];
        ck_assert_int_eq(nd_proto_encode_cartridge(&c, good, sizeof good), 36);

        ck_assert_int_eq(nd_proto_decode_cartridge(good, 35, &out, &err), -EBADMSG);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_LENGTH);
        ck_assert_int_eq(nd_proto_decode_cartridge(good, 37, &out, &err), -EBADMSG);
        ck_assert_int_eq(err.kind, ND_PROTO_ERR_LENGTH);
#define MUTATE(stmt, want_kind) do { memcpy(b, good, sizeof b); stmt; \
                ck_assert_int_eq(nd_proto_decode_cartridge(b, 36, &out, &err), -EBADMSG); \
                ck_assert_msg(err.kind == want_kind, "kind %d (%s)", err.kind, err.message); } while (0)
        MUTATE(b[0] = 2, ND_PROTO_ERR_RANGE);
        MUTATE(b[1] = 0, ND_PROTO_ERR_INCONSISTENT);                 /* present, 0 needles */
        MUTATE(b[2] = 1, ND_PROTO_ERR_RESERVED);
        MUTATE(b[4] = 0, ND_PROTO_ERR_STRING);                       /* present, empty id */
        MUTATE(b[5] = ' ', ND_PROTO_ERR_STRING);
        MUTATE(b[35] = 'x', ND_PROTO_ERR_STRING);                    /* junk in padding */
        MUTATE((b[0] = 0, b[4] = 0, b[5] = 0), ND_PROTO_ERR_INCONSISTENT); /* absent with needles */
        MUTATE((b[0] = 0, b[1] = 0), ND_PROTO_ERR_INCONSISTENT);     /* absent with an id */
#undef MUTATE
}
END_TEST

/* ---- telemetry ------------------------------------------------------------------------------------ */

START_TEST(test_packet_round_trip) {
        for (unsigned n = 1; n <= ND_PROTO_SAMPLES_PER_PACKET_MAX; n++) {
                uint8_t buf[ND_PROTO_TELEMETRY_MAX_PACKET], again[ND_PROTO_TELEMETRY_MAX_PACKET];
                size_t len = make_packet(buf, n, 41);
                nd_proto_packet p;
                nd_proto_error err;

                ck_assert_uint_eq(len, 8 + 16 * n + 4);
                ck_assert_uint_eq(buf[0], ND_PROTO_PACKET_SAMPLES);
                ck_assert_uint_eq(buf[1], n);
                ck_assert_uint_eq(buf[4], 41);
                ck_assert_int_eq(nd_proto_decode_packet(buf, len, &p, &err), 0);
                ck_assert_uint_eq(p.n_samples, n);
                for (unsigned i = 0; i < n; i++) {
                        nd_proto_sample want = make_sample(41 + i);
                        ck_assert_uint_eq(p.samples[i].sequence, want.sequence);
                        ck_assert_uint_eq(p.samples[i].timestamp_us, want.timestamp_us);
                        ck_assert_double_eq_tol(p.samples[i].depth_mm, want.depth_mm, 1e-9);
                        ck_assert_double_eq_tol(p.samples[i].speed_hz, want.speed_hz, 1e-9);
                        ck_assert_double_eq_tol(p.samples[i].current_ma, want.current_ma, 1e-9);
                        ck_assert_double_eq_tol(p.samples[i].temperature_c, want.temperature_c, 1e-9);
                        ck_assert_uint_eq(p.samples[i].battery_percent, want.battery_percent);
                        ck_assert_uint_eq(p.samples[i].status, want.status);
                        ck_assert_uint_eq(p.samples[i].faults, want.faults);
                }
                ck_assert_int_eq(nd_proto_encode_packet(p.samples, p.n_samples, again, sizeof again), (int) len);
                ck_assert_mem_eq(buf, again, len);
        }

        /* sequence numbers wrap inside a packet */
        uint8_t buf[ND_PROTO_TELEMETRY_MAX_PACKET];
        nd_proto_packet p;
        size_t len = make_packet(buf, 3, 0xffffffffu);
        ck_assert_int_eq(nd_proto_decode_packet(buf, len, &p, NULL), 0);
        ck_assert_uint_eq(p.samples[0].sequence, 0xffffffffu);
        ck_assert_uint_eq(p.samples[1].sequence, 0);
        ck_assert_uint_eq(p.samples[2].sequence, 1);

        /* extremes of every field still decode */
        nd_proto_sample s = {
                .sequence = 5, .timestamp_us = UINT32_MAX, .depth_mm = 5.0, .speed_hz = 500.0,
                .current_ma = 5000, .temperature_c = -40.0, .battery_percent = 100,
                .status = ND_PROTO_STATUS_ALL, .faults = ND_PROTO_FAULT_ALL,
        };
        len = (size_t) nd_proto_encode_packet(&s, 1, buf, sizeof buf);
        ck_assert_int_eq(nd_proto_decode_packet(buf, len, &p, NULL), 0);
        s.temperature_c = 125.0;
        len = (size_t) nd_proto_encode_packet(&s, 1, buf, sizeof buf);
        ck_assert_int_eq(nd_proto_decode_packet(buf, len, &p, NULL), 0);
        ck_assert_double_eq_tol(p.samples[0].temperature_c, 125.0, 1e-9);
}
END_TEST

START_TEST(test_packet_encoder_errors) {
        nd_proto_sample s[4] = { make_sample(1), make_sample(2), make_sample(3), make_sample(4) };
        uint8_t buf[ND_PROTO_TELEMETRY_MAX_PACKET];

        ck_assert_int_eq(nd_proto_encode_packet(s, 0, buf, sizeof buf), -EINVAL);
        ck_assert_int_eq(nd_proto_encode_packet(s, 4, buf, sizeof buf), -EINVAL);
        ck_assert_int_eq(nd_proto_encode_packet(s, 2, buf, ND_PROTO_PACKET_SIZE(2) - 1), -ENOBUFS);
        s[1].sequence = 7;
        ck_assert_int_eq(nd_proto_encode_packet(s, 2, buf, sizeof buf), -EINVAL);
        s[1] = make_sample(2);
        s[1].depth_mm = -1;
        ck_assert_int_eq(nd_proto_encode_packet(s, 2, buf, sizeof buf), -ERANGE);
        s[1] = make_sample(2);
        s[1].current_ma = NAN;
        ck_assert_int_eq(nd_proto_encode_packet(s, 2, buf, sizeof buf), -ERANGE);
        s[1] = make_sample(2);
        s[1].temperature_c = 400;
        ck_assert_int_eq(nd_proto_encode_packet(s, 2, buf, sizeof buf), -ERANGE);
}
END_TEST

static void packet_bad(const uint8_t *buf, size_t len, int want_r, nd_proto_error_kind kind) {
        nd_proto_packet p;
        nd_proto_error err;
        int r = nd_proto_decode_packet(buf, len, &p, &err);
        ck_assert_msg(r == want_r, "len %zu: r=%d, expected %d (%s)", len, r, want_r, err.message);
        ck_assert_msg(err.kind == kind, "len %zu: kind %d, expected %d (%s)", len, err.kind, kind, err.message);
        ck_assert(err.message[0] != '\0');
}

START_TEST(test_packet_malformed) {
        uint8_t good[ND_PROTO_TELEMETRY_MAX_PACKET + 8] = {0}, b[sizeof good];
        size_t len = make_packet(good, 2, 1000);

        /* every length from 0 to beyond the maximum: only the true one decodes */
        packet_bad(NULL, 0, -EBADMSG, ND_PROTO_ERR_LENGTH);
        for (size_t l = 0; l <= sizeof good; l++) {
                if (l == len)
                        continue;
                nd_proto_packet p;
                nd_proto_error err;
                ck_assert_int_eq(nd_proto_decode_packet(good, l, &p, &err), -EBADMSG);
                ck_assert(err.kind == ND_PROTO_ERR_LENGTH || err.kind == ND_PROTO_ERR_CRC);
                /* a truncated or padded packet with a CRC made to fit is still refused */
                if (l >= ND_PROTO_PACKET_SIZE(1) && l <= ND_PROTO_TELEMETRY_MAX_PACKET) {
                        memcpy(b, good, sizeof b);
                        fix_crc(b, l);
                        ck_assert_int_eq(nd_proto_decode_packet(b, l, &p, &err), -EBADMSG);
                        ck_assert_msg(err.kind == ND_PROTO_ERR_COUNT, "len %zu: %s", l, err.message);
                }
        }
        packet_bad(good, 65, -EBADMSG, ND_PROTO_ERR_LENGTH);
        packet_bad(good, 27, -EBADMSG, ND_PROTO_ERR_LENGTH);

        /* any single flipped bit is caught by the CRC */
        for (size_t i = 0; i < len; i++)
                for (int bit = 0; bit < 8; bit++) {
                        memcpy(b, good, sizeof b);
                        b[i] ^= (uint8_t) (1u << bit);
                        packet_bad(b, len, -EBADMSG, ND_PROTO_ERR_CRC);
                }

#define MUTATE(stmt, want_r, want_kind) do { memcpy(b, good, sizeof b); stmt; fix_crc(b, len); packet_bad(b, len, want_r, want_kind); } while (0)
        MUTATE(b[0] = 0x00, -EBADMSG, ND_PROTO_ERR_TYPE);
        MUTATE(b[0] = 0x02, -EBADMSG, ND_PROTO_ERR_TYPE);
        MUTATE(b[1] = 0, -EBADMSG, ND_PROTO_ERR_COUNT);
        MUTATE(b[1] = 1, -EBADMSG, ND_PROTO_ERR_COUNT);
        MUTATE(b[1] = 3, -EBADMSG, ND_PROTO_ERR_COUNT);
        MUTATE(b[1] = 4, -EBADMSG, ND_PROTO_ERR_COUNT);
        MUTATE(b[1] = 255, -EBADMSG, ND_PROTO_ERR_COUNT);
        MUTATE(b[2] = 1, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(b[3] = 1, -EBADMSG, ND_PROTO_ERR_RESERVED);
        /* second sample: offset 8 + 16 */
        MUTATE(b[24 + 15] = 1, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(b[24 + 13] = 0x08, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(b[24 + 14] = 0x40, -EBADMSG, ND_PROTO_ERR_RESERVED);
        MUTATE(nd_write_le16(b + 24 + 4, 5001), -ERANGE, ND_PROTO_ERR_RANGE);          /* depth */
        MUTATE(nd_write_le16(b + 24 + 6, 50001), -ERANGE, ND_PROTO_ERR_RANGE);         /* speed */
        MUTATE(nd_write_le16(b + 24 + 8, 5001), -ERANGE, ND_PROTO_ERR_RANGE);          /* current */
        MUTATE(nd_write_le16(b + 24 + 10, 12501), -ERANGE, ND_PROTO_ERR_RANGE);        /* temperature */
        MUTATE(nd_write_le16(b + 24 + 10, (uint16_t) -4001), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(nd_write_le16(b + 24 + 10, 0x8000), -ERANGE, ND_PROTO_ERR_RANGE);
        MUTATE(b[24 + 12] = 101, -ERANGE, ND_PROTO_ERR_RANGE);                 /* battery */
#undef MUTATE

        /* err may be NULL, and a failed decode names what is wrong */
        nd_proto_packet p;
        nd_proto_error err;
        ck_assert_int_eq(nd_proto_decode_packet(good, 5, &p, NULL), -EBADMSG);
        memcpy(b, good, sizeof b);
        b[len - 1] ^= 0xff;
        ck_assert_int_eq(nd_proto_decode_packet(b, len, &p, &err), -EBADMSG);
        ck_assert_ptr_nonnull(strstr(err.message, "CRC"));
}
END_TEST

START_TEST(test_crc_and_clock) {
        /* the standard CRC-32 check value */
        ck_assert_uint_eq(nd_proto_crc32((const uint8_t *) "123456789", 9), 0xCBF43926u);

        nd_proto_clock c = {0};
        ck_assert_uint_eq(nd_proto_clock_extend(&c, 0xfffffff0u), 0xfffffff0u);
        ck_assert_uint_eq(nd_proto_clock_extend(&c, 0xfffffffeu), 0xfffffffeu);
        ck_assert_uint_eq(nd_proto_clock_extend(&c, 0x00000010u), UINT64_C(0x100000010));
        ck_assert_uint_eq(nd_proto_clock_extend(&c, 0x00000010u), UINT64_C(0x100000010));
        ck_assert_uint_eq(nd_proto_clock_extend(&c, 0xfffffff0u), UINT64_C(0x1fffffff0));
        ck_assert_uint_eq(nd_proto_clock_extend(&c, 0x5u), UINT64_C(0x200000005));
}
END_TEST

START_TEST(test_fault_names) {
        ck_assert_str_eq(nd_proto_fault_name(ND_PROTO_FAULT_OVER_TEMPERATURE), "over-temperature");
        ck_assert_str_eq(nd_proto_fault_name(ND_PROTO_FAULT_MOTOR_STALL), "motor-stall");
        ck_assert_str_eq(nd_proto_fault_name(ND_PROTO_FAULT_OVER_CURRENT), "over-current");
        ck_assert_str_eq(nd_proto_fault_name(ND_PROTO_FAULT_DEPTH_DEVIATION), "depth-deviation");
        ck_assert_str_eq(nd_proto_fault_name(ND_PROTO_FAULT_WATCHDOG_EXPIRED), "heartbeat-lost");
        ck_assert_str_eq(nd_proto_fault_name(ND_PROTO_FAULT_LOW_BATTERY), "low-battery");
        ck_assert_ptr_null(nd_proto_fault_name(0));
        ck_assert_ptr_null(nd_proto_fault_name(0x40));
        ck_assert_ptr_null(nd_proto_fault_name(0x03));
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("protocol");
        TCase *tc = tcase_create("codec");
        tcase_add_test(tc, test_request_round_trip);
        tcase_add_test(tc, test_request_encoder_ranges);
        tcase_add_test(tc, test_request_malformed);
        tcase_add_test(tc, test_negotiation);
        tcase_add_test(tc, test_identity_round_trip);
        tcase_add_test(tc, test_identity_malformed);
        tcase_add_test(tc, test_check_depth_speed);
        tcase_add_test(tc, test_status_round_trip);
        tcase_add_test(tc, test_status_malformed);
        tcase_add_test(tc, test_cartridge_round_trip);
        tcase_add_test(tc, test_cartridge_malformed);
        tcase_add_test(tc, test_packet_round_trip);
        tcase_add_test(tc, test_packet_encoder_errors);
        tcase_add_test(tc, test_packet_malformed);
        tcase_add_test(tc, test_crc_and_clock);
        tcase_add_test(tc, test_fault_names);
        suite_add_tcase(s, tc);
        return s;
}
