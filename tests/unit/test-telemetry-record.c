/* test-telemetry-record.c: the OpenTelemetry record codec (lib/telemetry-record.c) against the
 * layout of docs/telemetry.md, byte for byte, and encode/decode round trips; the little-endian
 * helpers it is built on (lib/unaligned.h). */
#include <check.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "check-main.h"
#include "telemetry-record.h"
#include "unaligned.h"
#include "util.h"

static nd_telemetry_record sample_record(void) {
        return (nd_telemetry_record) {
                .sequence = 0xfffffffeu,
                .device_time_us = UINT64_C(0x0123456789abcdef),
                .host_time_us = UINT64_C(0xfedcba9876543210),
                .dropped = 7,
                .flags = ND_TELEMETRY_FLAG_MOTOR_RUNNING | ND_TELEMETRY_FLAG_CARTRIDGE | (0x21u << ND_TELEMETRY_FAULT_SHIFT),
                .depth_mm = 1.25,
                .speed_hz = 99.5,
                .current_ma = 812.0625,
                .temperature_c = -3.5,
                .battery_percent = 64,
        };
}

START_TEST(test_le_helpers) {
        uint8_t b[8];
        nd_write_le16(b, 0x1234);
        ck_assert_uint_eq(b[0], 0x34);
        ck_assert_uint_eq(b[1], 0x12);
        ck_assert_uint_eq(nd_read_le16(b), 0x1234);
        nd_write_le32(b, 0xa1b2c3d4u);
        ck_assert_mem_eq(b, ((uint8_t[]) { 0xd4, 0xc3, 0xb2, 0xa1 }), 4);
        ck_assert_uint_eq(nd_read_le32(b), 0xa1b2c3d4u);
        nd_write_le64(b, UINT64_C(0x0102030405060708));
        ck_assert_mem_eq(b, ((uint8_t[]) { 8, 7, 6, 5, 4, 3, 2, 1 }), 8);
        ck_assert_uint_eq(nd_read_le64(b), UINT64_C(0x0102030405060708));
        /* 1.0 is 0x3ff0000000000000 in binary64 */
        nd_write_le_double(b, 1.0);
        ck_assert_mem_eq(b, ((uint8_t[]) { 0, 0, 0, 0, 0, 0, 0xf0, 0x3f }), 8);
        ck_assert(nd_read_le_double(b) == 1.0);
        /* any alignment */
        uint8_t odd[9] = { 0 };
        nd_write_le32(odd + 1, 0xdeadbeefu);
        ck_assert_uint_eq(nd_read_le32(odd + 1), 0xdeadbeefu);
        ck_assert_uint_eq(odd[0], 0);
}
END_TEST

/* The offsets of docs/telemetry.md's table, checked on the encoder's bytes. */
START_TEST(test_encode_layout) {
        nd_telemetry_record r = sample_record();
        uint8_t out[ND_TELEMETRY_RECORD_SIZE];
        memset(out, 0xaa, sizeof out);
        nd_telemetry_record_encode(&r, out);
        ck_assert_uint_eq(nd_read_le16(out + 0), 1);
        ck_assert_uint_eq(nd_read_le16(out + 2), 72);
        ck_assert_uint_eq(nd_read_le32(out + 4), r.sequence);
        ck_assert_uint_eq(nd_read_le64(out + 8), r.device_time_us);
        ck_assert_uint_eq(nd_read_le64(out + 16), r.host_time_us);
        ck_assert_uint_eq(nd_read_le32(out + 24), 7);
        ck_assert_uint_eq(nd_read_le32(out + 28), 0x2103);
        ck_assert(nd_read_le_double(out + 32) == 1.25);
        ck_assert(nd_read_le_double(out + 40) == 99.5);
        ck_assert(nd_read_le_double(out + 48) == 812.0625);
        ck_assert(nd_read_le_double(out + 56) == -3.5);
        ck_assert_uint_eq(out[64], 64);
        for (size_t i = 65; i < ND_TELEMETRY_RECORD_SIZE; i++)
                ck_assert_msg(out[i] == 0, "reserved byte %zu is 0x%02x", i, out[i]);
}
END_TEST

START_TEST(test_round_trip) {
        const double values[] = { 0.0, -0.0, 1e-300, DBL_MAX, -DBL_MIN, 123.456, INFINITY, -INFINITY };
        for (size_t i = 0; i < ELEMENTSOF(values); i++) {
                nd_telemetry_record r = sample_record(), back;
                r.depth_mm = values[i];
                r.speed_hz = values[ELEMENTSOF(values) - 1 - i];
                r.sequence = (uint32_t) i;
                r.battery_percent = (uint8_t) (i * 10);
                uint8_t out[ND_TELEMETRY_RECORD_SIZE];
                nd_telemetry_record_encode(&r, out);
                ck_assert_int_eq(nd_telemetry_record_decode(out, sizeof out, &back), 0);
                r.version = ND_TELEMETRY_RECORD_VERSION;
                r.size = ND_TELEMETRY_RECORD_SIZE;
                ck_assert_uint_eq(back.version, r.version);
                ck_assert_uint_eq(back.size, r.size);
                ck_assert_uint_eq(back.sequence, r.sequence);
                ck_assert_uint_eq(back.device_time_us, r.device_time_us);
                ck_assert_uint_eq(back.host_time_us, r.host_time_us);
                ck_assert_uint_eq(back.dropped, r.dropped);
                ck_assert_uint_eq(back.flags, r.flags);
                /* bit for bit, so -0.0 and the infinities survive too */
                ck_assert_mem_eq(&back.depth_mm, &r.depth_mm, sizeof(double));
                ck_assert_mem_eq(&back.speed_hz, &r.speed_hz, sizeof(double));
                ck_assert_mem_eq(&back.current_ma, &r.current_ma, sizeof(double));
                ck_assert_mem_eq(&back.temperature_c, &r.temperature_c, sizeof(double));
                ck_assert_uint_eq(back.battery_percent, r.battery_percent);
        }
        /* NaN too (compared as bits) */
        nd_telemetry_record r = sample_record(), back;
        r.temperature_c = NAN;
        uint8_t out[ND_TELEMETRY_RECORD_SIZE];
        nd_telemetry_record_encode(&r, out);
        ck_assert_int_eq(nd_telemetry_record_decode(out, sizeof out, &back), 0);
        ck_assert(isnan(back.temperature_c));
}
END_TEST

START_TEST(test_battery_clamped) {
        nd_telemetry_record r = sample_record(), back;
        r.battery_percent = 200;
        uint8_t out[ND_TELEMETRY_RECORD_SIZE];
        nd_telemetry_record_encode(&r, out);
        ck_assert_int_eq(nd_telemetry_record_decode(out, sizeof out, &back), 0);
        ck_assert_uint_eq(back.battery_percent, 100);
}
END_TEST

/* A later minor layout appends fields: a longer record whose size field says so is read. */
START_TEST(test_decode_longer_record) {
        nd_telemetry_record r = sample_record(), back;
        uint8_t out[ND_TELEMETRY_RECORD_SIZE + 8];
        memset(out, 0x5a, sizeof out);
        nd_telemetry_record_encode(&r, out);
        nd_write_le16(out + 2, sizeof out);
        ck_assert_int_eq(nd_telemetry_record_decode(out, sizeof out, &back), 0);
        ck_assert_uint_eq(back.size, sizeof out);
        ck_assert_uint_eq(back.sequence, r.sequence);
}
END_TEST

START_TEST(test_decode_refuses_malformed) {
        nd_telemetry_record r = sample_record(), back = { .sequence = 42 };
        uint8_t good[ND_TELEMETRY_RECORD_SIZE + 1], bad[ND_TELEMETRY_RECORD_SIZE + 1];
        nd_telemetry_record_encode(&r, good);

        /* short */
        ck_assert_int_eq(nd_telemetry_record_decode(good, ND_TELEMETRY_RECORD_SIZE - 1, &back), -EBADMSG);
        ck_assert_int_eq(nd_telemetry_record_decode(good, 0, &back), -EBADMSG);
        ck_assert_int_eq(nd_telemetry_record_decode(NULL, ND_TELEMETRY_RECORD_SIZE, &back), -EBADMSG);
        /* another version */
        memcpy(bad, good, sizeof good);
        nd_write_le16(bad + 0, 2);
        ck_assert_int_eq(nd_telemetry_record_decode(bad, ND_TELEMETRY_RECORD_SIZE, &back), -EBADMSG);
        /* a size field that disagrees with the datagram: smaller than version 1, or than n */
        memcpy(bad, good, sizeof good);
        nd_write_le16(bad + 2, ND_TELEMETRY_RECORD_SIZE - 1);
        ck_assert_int_eq(nd_telemetry_record_decode(bad, ND_TELEMETRY_RECORD_SIZE, &back), -EBADMSG);
        ck_assert_int_eq(nd_telemetry_record_decode(good, ND_TELEMETRY_RECORD_SIZE + 1, &back), -EBADMSG);
        /* a refused record leaves *ret alone */
        ck_assert_uint_eq(back.sequence, 42);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("telemetry-record");
        TCase *tc = tcase_create("codec");
        tcase_add_test(tc, test_le_helpers);
        tcase_add_test(tc, test_encode_layout);
        tcase_add_test(tc, test_round_trip);
        tcase_add_test(tc, test_battery_clamped);
        tcase_add_test(tc, test_decode_longer_record);
        tcase_add_test(tc, test_decode_refuses_malformed);
        suite_add_tcase(s, tc);
        return s;
}
