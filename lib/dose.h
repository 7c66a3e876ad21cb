/* dose.h: the dose a session delivers, measured from the pen's own strokes: punctures
 * (strokes x the cartridge's needles), the density over the treated surface, and when an
 * area's max_density_per_cm2 ends a session (dose-reached). Pure functions. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "safety-limits.h"

/* Punctures of strokes whole strokes of a cartridge of needles; saturates at UINT64_MAX. */
uint64_t nd_dose_punctures(uint64_t strokes, uint32_t needles);

/* Punctures per cm² over area_cm2; 0 when the surface is unknown (area_cm2 <= 0 or not finite). */
double nd_dose_density_per_cm2(uint64_t punctures, double area_cm2);

/* Whether a measured density has reached the area's max_density_per_cm2 (false when the area
 * has no density cap, or the surface is unknown: density_per_cm2 0). */
bool nd_dose_reached(const nd_area_limits *area, double density_per_cm2);
