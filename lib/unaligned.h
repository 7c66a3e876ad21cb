/* unaligned.h: little-endian integers and IEEE 754 doubles read from and written to byte
 * buffers at any alignment: the one place where needled turns wire bytes into numbers (the
 * USB protocol, telemetry records). */
#pragma once

#include <stdint.h>
#include <string.h>

_Static_assert(sizeof(double) == sizeof(uint64_t), "doubles travel as IEEE 754 binary64");

static inline uint16_t nd_read_le16(const uint8_t *p) {
        return (uint16_t) (p[0] | (uint16_t) p[1] << 8);
}

static inline uint32_t nd_read_le32(const uint8_t *p) {
        return (uint32_t) p[0] | (uint32_t) p[1] << 8 | (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static inline uint64_t nd_read_le64(const uint8_t *p) {
        return (uint64_t) nd_read_le32(p) | (uint64_t) nd_read_le32(p + 4) << 32;
}

static inline void nd_write_le16(uint8_t *p, uint16_t v) {
        p[0] = (uint8_t) v;
        p[1] = (uint8_t) (v >> 8);
}

static inline void nd_write_le32(uint8_t *p, uint32_t v) {
        nd_write_le16(p, (uint16_t) v);
        nd_write_le16(p + 2, (uint16_t) (v >> 16));
}

static inline void nd_write_le64(uint8_t *p, uint64_t v) {
        nd_write_le32(p, (uint32_t) v);
        nd_write_le32(p + 4, (uint32_t) (v >> 32));
}

/* A double as the 8 little-endian bytes of its binary64 bits. */
static inline double nd_read_le_double(const uint8_t *p) {
        uint64_t bits = nd_read_le64(p);
        double d;
        memcpy(&d, &bits, sizeof d);
        return d;
}

static inline void nd_write_le_double(uint8_t *p, double d) {
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        nd_write_le64(p, bits);
}
