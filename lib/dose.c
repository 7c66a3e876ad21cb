/* dose.c: punctures, density and the density cap (see dose.h). */
#include <float.h>
#include <math.h>

#include "dose.h"

uint64_t nd_dose_punctures(uint64_t strokes, uint32_t needles) {
        if (needles > 0 && strokes > UINT64_MAX / needles)
                return UINT64_MAX;
        return strokes * needles;
}

double nd_dose_density_per_cm2(uint64_t punctures, double area_cm2) {
        if (!isfinite(area_cm2) || !(area_cm2 > 0))
                return 0;
        double density = (double) punctures / area_cm2;
        /* Profiles keep area_cm2 >= ND_PROFILE_AREA_CM2_MIN; the ledger refuses a non-finite
         * figure, so a session's end must never depend on that bound alone. */
        return isfinite(density) ? density : DBL_MAX;
}

bool nd_dose_reached(const nd_area_limits *area, double density_per_cm2) {
        if (!area || !area->has_max_density_per_cm2 || !(density_per_cm2 > 0))
                return false;
        return density_per_cm2 >= area->max_density_per_cm2;
}
