/* fuzz-protocol.c: every decoder of the pen protocol, and the pen's request parser, on arbitrary
 * bytes. The first byte picks the decoder, the rest is its input. Beyond "no crash", whatever
 * decodes must encode back to the very same bytes and hold values within their ranges. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "penmodel.h"
#include "protocol.h"
#include "unaligned.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum {
        TARGET_PACKET,
        TARGET_IDENTITY,
        TARGET_STATUS,
        TARGET_CARTRIDGE,
        TARGET_REQUEST,
        TARGET_MODEL,
        _TARGET_MAX,
};

#define SETUP_SIZE 8u /* bmRequestType, bRequest, wValue, wIndex, wLength */
#define MODEL_STEP_US 700u

static void require(int cond) {
        if (!cond)
                abort();
}

static void fuzz_packet(const uint8_t *buf, size_t len) {
        nd_proto_packet p;
        nd_proto_error err;
        uint8_t again[ND_PROTO_TELEMETRY_MAX_PACKET];

        if (nd_proto_decode_packet(buf, len, &p, &err) < 0) {
                require(err.kind != ND_PROTO_ERR_NONE && err.message[0] != '\0');
                return;
        }
        require(p.n_samples >= 1 && p.n_samples <= ND_PROTO_SAMPLES_PER_PACKET_MAX);
        for (unsigned i = 0; i < p.n_samples; i++) {
                const nd_proto_sample *s = &p.samples[i];
                require(s->depth_mm >= 0 && s->depth_mm <= ND_PROTO_DEPTH_MAX_MM);
                require(s->speed_hz >= 0 && s->speed_hz <= ND_PROTO_SPEED_MAX_HZ);
                require(s->current_ma >= 0 && s->current_ma <= ND_PROTO_CURRENT_MAX_MA);
                require(s->temperature_c >= ND_PROTO_TEMPERATURE_MIN_C && s->temperature_c <= ND_PROTO_TEMPERATURE_MAX_C);
                require(s->battery_percent <= ND_PROTO_BATTERY_MAX_PERCENT);
                require(!(s->status & ~ND_PROTO_STATUS_ALL) && !(s->faults & ~ND_PROTO_FAULT_ALL));
        }
        int n = nd_proto_encode_packet(p.samples, p.n_samples, again, sizeof again);
        require(n >= 0 && (size_t) n == len && memcmp(buf, again, len) == 0);
}

static void fuzz_identity(const uint8_t *buf, size_t len) {
        nd_proto_identity id;
        nd_proto_error err;
        uint8_t again[ND_PROTO_IDENTITY_SIZE];

        if (len < 2)
                return;
        /* the host's stated version comes first */
        if (nd_proto_decode_identity(buf + 2, len - 2, buf[0], buf[1], &id, &err) < 0) {
                require(err.kind != ND_PROTO_ERR_NONE && err.message[0] != '\0');
                return;
        }
        require(id.protocol_major == buf[0] && id.protocol_minor <= buf[1]);
        require(id.depth_min_mm <= id.depth_max_mm && id.depth_step_mm > 0);
        require(id.speed_min_hz > 0 && id.speed_min_hz <= id.speed_max_hz);
        require(strlen(id.serial) > 0 && strlen(id.model) > 0 && strlen(id.firmware_version) > 0);
        /* the depth range's own ends pass the pen's rule */
        require(nd_proto_check_depth(&id, id.depth_min_mm) == 0 && nd_proto_check_depth(&id, id.depth_max_mm) == 0);
        require(nd_proto_check_speed(&id, id.speed_min_hz) == 0 && nd_proto_check_speed(&id, id.speed_max_hz) == 0);
        int n = nd_proto_encode_identity(&id, again, sizeof again);
        require(n == ND_PROTO_IDENTITY_SIZE && memcmp(buf + 2, again, sizeof again) == 0);
}

static void fuzz_status(const uint8_t *buf, size_t len) {
        nd_proto_status st;
        nd_proto_error err;
        uint8_t again[ND_PROTO_STATUS_SIZE];

        if (nd_proto_decode_status(buf, len, &st, &err) < 0) {
                require(err.kind != ND_PROTO_ERR_NONE && err.message[0] != '\0');
                return;
        }
        require(st.watchdog_remaining_ms <= st.watchdog_timeout_ms);
        int n = nd_proto_encode_status(&st, again, sizeof again);
        require(n == ND_PROTO_STATUS_SIZE && memcmp(buf, again, sizeof again) == 0);
}

static void fuzz_cartridge(const uint8_t *buf, size_t len) {
        nd_proto_cartridge c;
        nd_proto_error err;
        uint8_t again[ND_PROTO_CARTRIDGE_SIZE];

        if (nd_proto_decode_cartridge(buf, len, &c, &err) < 0) {
                require(err.kind != ND_PROTO_ERR_NONE && err.message[0] != '\0');
                return;
        }
        require(c.present ? (c.needles > 0 && c.id[0] != '\0') : (c.needles == 0 && c.id[0] == '\0'));
        int n = nd_proto_encode_cartridge(&c, again, sizeof again);
        require(n == ND_PROTO_CARTRIDGE_SIZE && memcmp(buf, again, sizeof again) == 0);
}

static nd_control_setup setup_of(const uint8_t *p) {
        return (nd_control_setup) {
                .request_type = p[0],
                .request = p[1],
                .value = nd_read_le16(p + 2),
                .index = nd_read_le16(p + 4),
                .length = nd_read_le16(p + 6),
        };
}

static void fuzz_request(const uint8_t *buf, size_t len) {
        nd_proto_request req;
        nd_proto_error err;

        if (len < SETUP_SIZE)
                return;
        nd_control_setup setup = setup_of(buf);
        if (nd_proto_parse_request(&setup, buf + SETUP_SIZE, len - SETUP_SIZE, &req, &err) < 0)
                require(err.kind != ND_PROTO_ERR_NONE && err.message[0] != '\0');
        else
                require(req.code == setup.request);
}

/* A sequence of requests into a pen model: setup, then wLength bytes of OUT data; the pen's
 * replies must always decode, and the telemetry it sends too. */
static void fuzz_model(const uint8_t *buf, size_t len) {
        nd_penmodel_config c;
        nd_penmodel *m = NULL;
        uint64_t now = 1000000;

        nd_penmodel_config_init(&c);
        if (nd_penmodel_new(&c, now, &m) < 0)
                abort();
        (void) nd_penmodel_insert_cartridge(m, now, "FUZZ-1", 12);
        while (len >= SETUP_SIZE) {
                nd_control_setup setup = setup_of(buf);
                uint8_t io[256];
                buf += SETUP_SIZE;
                len -= SETUP_SIZE;
                if (!(setup.request_type & ND_CONTROL_DIR_IN)) {
                        size_t n = setup.length < len ? setup.length : len;
                        if (setup.length > sizeof io)
                                break;
                        memset(io, 0, sizeof io);
                        memcpy(io, buf, n);
                        buf += n;
                        len -= n;
                } else if (setup.length > sizeof io)
                        setup.length = sizeof io;
                now += MODEL_STEP_US * (1u + setup.request % 8u);
                int r = nd_penmodel_control(m, now, &setup, io, sizeof io);
                require(r == -EPIPE || r >= 0);
                if (r > 0 && setup.request == ND_PROTO_REQ_GET_STATUS) {
                        nd_proto_status st;
                        require(nd_proto_decode_status(io, (size_t) r, &st, NULL) == 0);
                }
                if (r > 0 && setup.request == ND_PROTO_REQ_IDENTIFY) {
                        nd_proto_identity id;
                        require(nd_proto_decode_identity(io, (size_t) r, (uint8_t) (setup.value >> 8),
                                                         (uint8_t) setup.value, &id, NULL) == 0);
                }
                uint8_t pkt[ND_PROTO_PACKET_MAX_SIZE];
                int n;
                while ((n = nd_penmodel_next_packet(m, now, pkt, sizeof pkt)) > 0) {
                        nd_proto_packet p;
                        require(nd_proto_decode_packet(pkt, (size_t) n, &p, NULL) == 0);
                }
                require(n == 0);
        }
        nd_penmodel_unref(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size < 1)
                return 0;
        const uint8_t *buf = data + 1;
        size_t len = size - 1;
        switch (data[0] % _TARGET_MAX) {
        case TARGET_PACKET:
                fuzz_packet(buf, len);
                break;
        case TARGET_IDENTITY:
                fuzz_identity(buf, len);
                break;
        case TARGET_STATUS:
                fuzz_status(buf, len);
                break;
        case TARGET_CARTRIDGE:
                fuzz_cartridge(buf, len);
                break;
        case TARGET_REQUEST:
                fuzz_request(buf, len);
                break;
        case TARGET_MODEL:
                fuzz_model(buf, len);
                break;
        }
        return 0;
}
