/* make-ledger-schema2.c: wrote tests/data/ledger-schema2.sqlite with the schema-2 ledger code
 * (commit f8c79d7), through the ledger's own API, as needled would. Not built by meson: it is
 * kept to say how the fixture was made. Built and run once against that commit's libneedle:
 *
 *   cc -std=gnu11 -Ilib -Ibuild tests/data/make-ledger-schema2.c build/lib/libneedle.a \
 *      $(pkg-config --cflags --libs sqlite3 libsystemd yaml-0.1 nettle libusb-1.0 zlib) -lm
 *   cp tests/data/ledger-schema1.sqlite DIR/ledger.sqlite && ./a.out DIR
 *
 * Starts from the schema-1 fixture (so the file holds rows and entries of both schemas: NULL
 * dose columns, schema-1 session details), opens it (migrating it to schema 2), closes its
 * running session as a restart, then adds: sessions with a skin type, a surface and a dose, two
 * profiles and two limits digests, a reusable cartridge run twice, entries whose text holds hex
 * digests, a session id and non-ASCII text, and one session left running. */
#include <stdio.h>
#include <string.h>

#include "ledger.h"
#include "util.h"

#define T0_US UINT64_C(1700000000000000)

static const char yaml_a[] = "name: cheeks-acne\nindication: acne-scars\narea: cheeks\ndepth_mm: 1.25\nduration_s: 600\n";
static const char yaml_b[] = "name: forehead-fine\nindication: fine-lines\narea: forehead\ndepth_mm: 0.5\n";
static const char dig_a[] = "3f2b8c0e5d7a41f6b9e2c1d0a8f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5";
static const char dig_b[] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
static const char lim_1[] = "aa11bb22cc33dd44ee55ff6600770088009911aa22bb33cc44dd55ee66ff7788";
static const char lim_2[] = "LIMITS-v2 (not hex)";

static int begin(nd_ledger *l, const char *pen, const char *cart, bool single, uint32_t cap, const char *yaml,
                 const char *name, const char *dig, const char *lim, const char *label, const char *skin, double area,
                 uint64_t t, char id[static ND_LEDGER_SESSION_ID_SIZE]) {
        int r = nd_ledger_session_id_new(id);
        if (r < 0)
                return r;
        nd_ledger_session_start s = {
                .id = id, .pen_serial = pen, .cartridge_id = cart, .needles = 12, .profile_name = name,
                .profile_yaml = yaml, .profile_digest = dig, .limits_digest = lim, .label = label,
                .owner_uid = 1000, .owner_pid = 77, .owner_name = ":1.77", .start_us = t, .single_use = single,
                .cartridge_max_runtime_s = cap, .skin_type = skin, .area_cm2 = area,
        };
        return nd_ledger_session_begin(l, &s);
}

int main(int argc, char *argv[]) {
        _cleanup_(nd_ledger_closep) nd_ledger *l = NULL;
        _cleanup_free_ char *error = NULL;
        char id[ND_LEDGER_SESSION_ID_SIZE], detail[256];
        int r;

        if (argc != 2)
                return 64;
        if (nd_ledger_open(argv[1], &l, &error) < 0) {
                fprintf(stderr, "%s\n", strempty(error));
                return 1;
        }
        uint64_t t = T0_US + 5000 * USEC_PER_SEC;
        r = nd_ledger_recover(l, t);
        for (unsigned i = 0; r >= 0 && i < 4; i++, t += 1000 * USEC_PER_SEC) {
                char cart[16];
                bool a = i % 2 == 0;
                snprintf(cart, sizeof cart, "S2CART%u", i);
                snprintf(detail, sizeof detail, "profile %s sha256 %s", a ? "cheeks-acne" : "forehead-fine", a ? dig_a : dig_b);
                if ((r = nd_ledger_audit(l, t - 1, 1000, 77, ":1.77", "LoadProfile", "PEN3", detail)) < 0 ||
                    (r = begin(l, "PEN3", cart, true, 0, a ? yaml_a : yaml_b, a ? "cheeks-acne" : "forehead-fine",
                               a ? dig_a : dig_b, i < 2 ? lim_1 : lim_2, i == 1 ? "Zoë · 2nd visit" : "",
                               (const char *[]) { "II", "", "IV", "VI" }[i], a ? 40 : 0, t, id)) < 0)
                        break;
                snprintf(detail, sizeof detail, "session %s profile x", id);
                nd_ledger_stats st = { .duration_s = 60.5 + i, .strokes = 7200 + i, .max_depth_mm = 1.2,
                                       .max_speed_hz = 120, .max_temperature_c = 34.5, .max_current_ma = 410,
                                       .punctures = (7200 + i) * 12, .density_per_cm2 = a ? (7200 + i) * 12 / 40.0 : 0 };
                if ((r = nd_ledger_audit(l, t, 1000, 77, ":1.77", "Start", "PEN3", detail)) < 0 ||
                    (r = nd_ledger_session_progress(l, id, t + 30 * USEC_PER_SEC, &st)) < 0 ||
                    (r = nd_ledger_session_end(l, id, t + 61 * USEC_PER_SEC, &st,
                                               i == 3 ? "fault:over-temperature" : "completed")) < 0)
                        break;
        }
        /* A reusable cartridge, twice. */
        for (unsigned i = 0; r >= 0 && i < 2; i++, t += 1000 * USEC_PER_SEC) {
                nd_ledger_stats st = { .duration_s = 100, .strokes = 100, .punctures = 1200 };
                if ((r = begin(l, "PEN4", "REUSE1", false, 3600, yaml_b, "forehead-fine", dig_b, lim_1, "", "III", 0, t, id)) < 0 ||
                    (r = nd_ledger_session_end(l, id, t + 100 * USEC_PER_SEC, &st, "stopped")) < 0)
                        break;
        }
        if (r >= 0)
                r = nd_ledger_audit(l, t, 0, 1, ":1.2", "interlock:over-temperature", "PEN3", "42.0 °C");
        if (r >= 0)
                r = begin(l, "PEN4", "S2RUN", true, 0, yaml_a, "cheeks-acne", dig_a, lim_1, "left running", "I", 40, t + 1, id);
        if (r < 0) {
                fprintf(stderr, "%s\n", nd_ledger_last_error(l));
                return 1;
        }
        return 0;
}
