/* test_audit.c: builds the ledger that tests/cli/test_audit.py checks `needlectl audit verify`
 * against, through the ledger's own API (as needled would): usage: test_audit DIR; or
 * test_audit --open DIR, which only opens (and so migrates) the ledger in DIR.
 * Three finished sessions, one left running, and an audit entry after each: 11 entries in all. */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "ledger.h"
#include "util.h"

#define T0_US UINT64_C(1700000000000000)

static int begin(nd_ledger *l, const char *pen, const char *cartridge, uint64_t t_us, char id[static ND_LEDGER_SESSION_ID_SIZE]) {
        int r = nd_ledger_session_id_new(id);
        if (r < 0)
                return r;
        nd_ledger_session_start s = {
                .id = id,
                .pen_serial = pen,
                .cartridge_id = cartridge,
                .needles = 12,
                .profile_name = "forehead-lines",
                .profile_yaml = "name: forehead-lines\narea: forehead\ndepth_mm: 0.5\n",
                .profile_digest = "d1",
                .limits_digest = "d2",
                .label = "appt-7",
                .owner_uid = 1000,
                .owner_pid = 31,
                .owner_name = ":1.42",
                .start_us = t_us,
                .single_use = true,
        };
        return nd_ledger_session_begin(l, &s);
}

int main(int argc, char *argv[]) {
        _cleanup_(nd_ledger_closep) nd_ledger *l = NULL;
        _cleanup_free_ char *error = NULL;
        char id[ND_LEDGER_SESSION_ID_SIZE];
        int r;

        /* --open DIR: only opens the ledger there (migrating it to this build's schema). */
        bool open_only = argc == 3 && STREQ(argv[1], "--open");
        if (argc != 2 && !open_only) {
                fprintf(stderr, "usage: %s [--open] DIR\n", argv[0]);
                return 64;
        }
        r = nd_ledger_open(argv[argc - 1], &l, &error);
        if (r < 0) {
                fprintf(stderr, "%s\n", strempty(error));
                return 1;
        }
        if (open_only)
                return 0;
        for (unsigned i = 0; i < 3; i++) {
                char cartridge[16];
                nd_ledger_stats st = { .duration_s = 30, .strokes = 3600, .max_depth_mm = 0.5, .max_speed_hz = 120 };
                uint64_t t = T0_US + i * 100 * USEC_PER_SEC;
                snprintf(cartridge, sizeof cartridge, "CART%u", i);
                if ((r = begin(l, "PEN1", cartridge, t, id)) < 0 ||
                    (r = nd_ledger_audit(l, t + 1, 1000, 31, ":1.42", "SetDepth", "PEN1", "depth_mm=0.5")) < 0 ||
                    (r = nd_ledger_session_end(l, id, t + 30 * USEC_PER_SEC, &st, "completed")) < 0)
                        break;
        }
        if (r >= 0)
                r = begin(l, "PEN2", "CART9", T0_US + 1000 * USEC_PER_SEC, id);
        if (r >= 0)
                r = nd_ledger_audit(l, T0_US + 1001 * USEC_PER_SEC, 1000, 31, ":1.42", "Pause", "PEN2", "");
        if (r < 0) {
                fprintf(stderr, "%s\n", nd_ledger_last_error(l));
                return 1;
        }
        return 0;
}
