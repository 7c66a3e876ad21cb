/* fuzz-limits.c: the limits loader on arbitrary bytes. Besides not crashing, it checks the
 * loader's contract: success means limits and no diagnostic, -EINVAL means at least one
 * diagnostic and no limits, and every diagnostic is complete. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "diag.h"
#include "safety-limits.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_diags(const nd_diags *d) {
        for (size_t i = 0; i < nd_diags_count(d); i++) {
                const nd_diag *g = &d->items[i];
                if (!g->code || !*g->code || !g->field || !g->message || !*g->message)
                        abort();
                char *line = nd_diag_format(g);
                if (!line)
                        abort();
                free(line);
        }
        char *all = nd_diags_join(d, "; ");
        if (!all)
                abort();
        free(all);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = NULL;

        int r = nd_limits_load_data(data, size, "fuzz.yaml", &l, &d);
        if (r == 0) {
                if (!l || nd_diags_count(&d) != 0 || l->n_areas == 0 || l->cartridge.n_allowed_needles == 0 ||
                    !(l->pen.speed_min_hz <= l->pen.speed_max_hz) ||
                    !(l->pen.warn_temperature_c < l->pen.max_temperature_c) ||
                    !(l->pen.stop_battery_percent < l->pen.min_battery_percent))
                        abort();
                for (size_t i = 0; i < l->n_areas; i++) {
                        const nd_area_limits *a = &l->areas[i];
                        if (!(a->max_depth_mm > 0 && a->max_depth_mm <= ND_DEPTH_MAX_MM))
                                abort();
                        if (nd_limits_check_depth(l, a->name, a->max_depth_mm, &d) != 0 ||
                            nd_limits_check_depth(l, a->name, a->max_depth_mm + 0.01, &d) != -ERANGE ||
                            nd_limits_check_speed(l, a->name, nd_limits_area_max_speed_hz(l, a), &d) != 0 ||
                            nd_limits_check_speed(l, a->name, l->pen.speed_max_hz + 1, &d) != -ERANGE)
                                abort();
                }
        } else if (r == -EINVAL) {
                if (l || nd_diags_count(&d) == 0)
                        abort();
        } else if (r != -ENOMEM)
                abort();

        check_diags(&d);
        nd_limits_free(l);
        nd_diags_clear(&d);
        return 0;
}
