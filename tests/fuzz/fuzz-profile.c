/* fuzz-profile.c: the profile parser on arbitrary bytes, against fixed limits (the example of
 * formats.md, tests/data/limits-test.yaml), then the pen checks of a simulated pen. Checks the
 * parser's contract: success means a valid profile with every field, -EINVAL means at least one
 * violation. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "diag.h"
#include "limits-test.h"
#include "profile.h"
#include "safety-limits.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* tests/data/limits-test.yaml: the example of formats.md. */
static const char LIMITS[] = ND_TEST_LIMITS_YAML;

static const nd_pen_caps SIM_PEN = { 0.0, 2.5, 0.05, 25, 150 };

static nd_limits *limits(void) {
        /* Loaded once: the fuzzer calls the target millions of times. */
        static nd_limits *l;
        if (!l && nd_limits_load_data(LIMITS, strlen(LIMITS), "limits.yaml", &l, NULL) < 0)
                abort();
        return l;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const nd_limits *l = limits();
        nd_diags d = ND_DIAGS_INIT;
        nd_profile *p = NULL;

        int r = nd_profile_parse(data, size, NULL, l, &p, &d);
        if (r == 0) {
                if (!p || !p->valid || nd_diags_count(&d) != 0 || !p->has_name || !p->has_indication ||
                    !p->has_area || !p->has_depth_mm || !p->has_speed_hz || !p->has_duration_s || !p->has_needles)
                        abort();
                const nd_area_limits *a = nd_limits_find_area(l, p->area);
                if (!a || !(p->depth_mm > 0 && p->depth_mm <= a->max_depth_mm) ||
                    !(p->speed_hz >= l->pen.speed_min_hz && p->speed_hz <= nd_limits_area_max_speed_hz(l, a)) ||
                    p->duration_s > nd_limits_area_max_duration_s(l, a))
                        abort();
                /* What was validated, the daemon re-checks on adjustment: it must agree. */
                if (nd_limits_check_depth(l, p->area, p->depth_mm, &d) != 0 ||
                    nd_limits_check_speed(l, p->area, p->speed_hz, &d) != 0)
                        abort();
        } else if (r == -EINVAL) {
                if (p && p->valid)
                        abort();
                if (nd_diags_count(&d) == 0)
                        abort();
        } else if (r != -ENOMEM)
                abort();

        if (p) {
                int k = nd_profile_check_pen(p, &SIM_PEN, true, 12, &d);
                if (k != 0 && k != -EINVAL)
                        abort();
        }
        for (size_t i = 0; i < nd_diags_count(&d); i++) {
                char *line = nd_diag_format(&d.items[i]);
                if (!line || !*d.items[i].code || !*d.items[i].message)
                        abort();
                free(line);
        }
        nd_profile_free(p);
        nd_diags_clear(&d);
        return 0;
}
