/* fuzz-profile.c: the profile parser on arbitrary bytes, against fixed limits (the example of
 * formats.md, tests/data/limits-test.yaml), then the pen checks of a simulated pen. Checks the
 * parser's contract: success means a valid profile with every field, -EINVAL means at least one
 * violation. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diag.h"
#include "limits-test.h"
#include "profile.h"
#include "safety-limits.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* tests/data/limits-test.yaml: the example of formats.md, with the optional keys added at load
 * (skin type caps, a density cap on body) so that their rules are fuzzed too. */
static const char LIMITS[] = ND_TEST_LIMITS_YAML;
#define BODY_LINE "  body:        {max_depth_mm: 2.0, max_speed_hz: 150, max_duration_s: 1800}\n"
#define BODY_WITH_DENSITY "  body:        {max_depth_mm: 2.0, max_speed_hz: 150, max_duration_s: 1800, max_density_per_cm2: 20000}\n"
#define SKIN_TYPES "skin_types:\n  IV: {max_depth_mm: 1.0}\n  V:  {max_depth_mm: 0.75}\n  VI: {max_depth_mm: 0.5}\n"

static const nd_pen_caps SIM_PEN = { 0.0, 2.5, 0.05, 25, 150 };

static nd_limits *limits(void) {
        /* Loaded once: the fuzzer calls the target millions of times. */
        static nd_limits *l;
        if (l)
                return l;
        const char *body = strstr(LIMITS, BODY_LINE);
        if (!body)
                abort();
        char *text = NULL;
        if (asprintf(&text, "%.*s%s%s%s", (int) (body - LIMITS), LIMITS, BODY_WITH_DENSITY, body + strlen(BODY_LINE),
                     SKIN_TYPES) < 0)
                abort();
        if (nd_limits_load_data(text, strlen(text), "limits.yaml", &l, NULL) < 0)
                abort();
        free(text);
        if (!l->skin_types[ND_SKIN_TYPE_VI].set || !nd_limits_find_area(l, "body")->has_max_density_per_cm2)
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
                /* The optional keys: a listed type's cap and the area's density cap hold. */
                for (int t = 0; t < ND_SKIN_TYPES_COUNT; t++)
                        if (p->has_skin_types && p->skin_types[t] &&
                            p->depth_mm > nd_limits_effective_max_depth_mm(l, a, (nd_skin_type) t))
                                abort();
                if (a->has_max_density_per_cm2 &&
                    (!p->has_area_cm2 || nd_profile_planned_density_per_cm2(p) > a->max_density_per_cm2))
                        abort();
                /* Start with each type: allowed exactly when listed (or no list) and within the cap,
                 * and then SetDepth to the profile's depth agrees. */
                for (int t = 0; t < ND_SKIN_TYPES_COUNT; t++) {
                        nd_skin_type got;
                        int k = nd_profile_check_skin_type(p, l, nd_skin_type_to_string((nd_skin_type) t), &got, &d);
                        bool want = (!p->has_skin_types || p->skin_types[t]) &&
                                    p->depth_mm <= nd_limits_effective_max_depth_mm(l, a, (nd_skin_type) t);
                        if ((k == 0) != want || (k == 0 && got != (nd_skin_type) t))
                                abort();
                        if (k == 0 && nd_limits_check_depth_for_skin(l, p->area, got, p->depth_mm, &d) != 0)
                                abort();
                }
                nd_diags_clear(&d);
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
