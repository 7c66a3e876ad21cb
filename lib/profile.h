/* profile.h: treatment profiles (formats.md): parsing, validation against the limits, the
 * pen's own checks at arming, and the installed profiles directory.
 *
 * Violations are diagnostics whose (field, code, message) travel over D-Bus as a(sss).
 * Codes (the contract of dbus-api.md):
 *   document level (field ""): yaml-syntax, not-a-mapping, no-limits;
 *     duplicate-key (field = the repeated key's name)
 *   per field: unknown-field, missing-field, wrong-type, not-finite, out-of-range,
 *     invalid-name, unknown-indication, unknown-area, above-area-max (depth),
 *     speed-out-of-range, above-duration-max, needles-not-allowed;
 *     with the optional skin type and dose keys: unknown-skin-type, above-skin-type-max (depth),
 *     above-density-max, no-surface (a density cap applies but area_cm2 is absent); a type
 *     listed twice in skin_types is duplicate-key
 *   only at Start with a skin type (nd_profile_check_skin_type): skin-type-not-allowed,
 *     above-skin-type-max, unknown-skin-type, missing-field (the limits require a skin type)
 *   only when arming on a pen: beyond-pen-range, off-step, needles-mismatch
 *   only in the installed profiles directory: duplicate-name, unreadable */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "diag.h"
#include "digest.h"
#include "safety-limits.h"
#include "util.h"

#define ND_PROFILE_NAME_MAX       64
#define ND_PROFILE_NOTES_MAX      2048    /* bytes */
#define ND_PROFILE_AFTERCARE_MAX  20      /* items */
#define ND_PROFILE_AFTERCARE_ITEM_MAX 256 /* bytes per item */
/* Grid tolerance of nd_profile_check_pen: depths are decimals like 1.05 that doubles
 * cannot hold exactly. */
#define ND_PEN_STEP_TOLERANCE_MM  1e-6
#define ND_PROFILE_PASSES_MIN     1
#define ND_PROFILE_PASSES_MAX     10
#define ND_PROFILE_AREA_CM2_MAX   1000.0  /* the treated surface: at most this */
#define ND_PROFILE_AREA_CM2_MIN   0.01    /* and at least this (1 mm²): a density stays finite */

typedef struct nd_profile {
        /* Each has_X says the key was present with a value of the right type; the value may
         * still break a rule (then valid is false and the violation says which). */
        bool has_name, has_indication, has_area, has_depth_mm, has_speed_hz, has_duration_s,
             has_needles, has_notes, has_aftercare, has_skin_types, has_passes, has_area_cm2;
        char *name;
        char *indication;
        char *area;
        double depth_mm;
        double speed_hz;
        uint32_t duration_s;
        uint32_t needles;
        char *notes;
        char **aftercare;
        size_t n_aftercare;
        bool skin_types[ND_SKIN_TYPES_COUNT];   /* the Fitzpatrick types it is meant for (has_skin_types) */
        uint32_t passes;
        double area_cm2;                        /* the treated surface */

        unsigned name_line;     /* position of the name's value, for later messages */
        unsigned name_column;

        bool valid;             /* no violation at all (checked against limits) */
        char digest[ND_SHA256_HEX_SIZE]; /* SHA-256 hex of the exact bytes parsed */
} nd_profile;

/* What a pen can do (its DepthRangeMm, DepthStepMm and SpeedRangeHz properties). */
typedef struct nd_pen_caps {
        double depth_min_mm;
        double depth_max_mm;
        double depth_step_mm;   /* <= 0: any depth in range */
        double speed_min_hz;
        double speed_max_hz;
} nd_pen_caps;

/* The indications a profile may name, NULL-terminated. */
extern const char *const nd_profile_indications[];

/* Parses and validates a profile. filename (may be NULL) is used in diagnostics. limits may
 * be NULL: then one "no-limits" violation is added and the structural checks still run.
 * Returns 0 when valid; -EINVAL with every violation in diags (and *ret still set to what
 * could be read when the document was a mapping, else NULL); -ENOMEM. The caller frees *ret. */
int nd_profile_parse(const void *data, size_t len, const char *filename, const nd_limits *limits,
                     nd_profile **ret, nd_diags *diags);

/* Reads a profile file and parses it as above. Returns -errno (with one "unreadable" diag)
 * when the file cannot be read. */
int nd_profile_load_file(const char *path, const nd_limits *limits, nd_profile **ret, nd_diags *diags);

/* Frees a profile; NULL is fine. */
void nd_profile_free(nd_profile *p);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_profile *, nd_profile_free)

/* The skin types a profile is meant for as "I, II, III" (buf gets "" when it lists none). */
void nd_profile_skin_types_text(const nd_profile *p, char buf[static 32]);

/* May this (valid) profile start on a patient of skin_type under limits? skin_type NULL or ""
 * means none given. Checks, reporting every failure (field skin_type unless noted):
 * missing-field (none given but session.require_skin_type), unknown-skin-type (not I..VI),
 * skin-type-not-allowed (the profile lists skin_types without it), above-skin-type-max (field
 * depth_mm: deeper than the type's cap). Returns 0 with *ret the type (ND_SKIN_TYPE_NONE when
 * none given), or -EINVAL with diagnostics. */
int nd_profile_check_skin_type(const nd_profile *p, const nd_limits *limits, const char *skin_type,
                               nd_skin_type *ret, nd_diags *diags);

/* The profile's planned dose in punctures per cm² (needles x speed_hz x duration_s / area_cm2),
 * or -1 when it lacks one of those keys. */
double nd_profile_planned_density_per_cm2(const nd_profile *p);

/* The pen's checks at arming: depth within the pen's range and on its step grid, speed
 * within its range, and, when a cartridge is inserted, its needle count equal to the
 * profile's. 0 when all pass; -EINVAL with a diag per failure (beyond-pen-range, off-step,
 * needles-mismatch). Fields the profile lacks are not checked (the parse reported them). */
int nd_profile_check_pen(const nd_profile *p, const nd_pen_caps *caps, bool has_cartridge,
                         uint32_t cartridge_needles, nd_diags *diags);

/* One file of the profiles directory. */
typedef struct nd_profile_entry {
        char *path;             /* full path of the file */
        char *file_name;        /* "acne-scars-cheeks.yaml" */
        nd_profile *profile;    /* never NULL; empty (all has_X false) when unreadable or not a mapping */
        nd_diags violations;    /* empty when valid */
        bool valid;
} nd_profile_entry;

typedef struct nd_profile_set {
        nd_profile_entry *entries;      /* sorted by file name */
        size_t n_entries;
} nd_profile_set;

/* Loads every *.yaml file of dir (sorted by file name) against limits (may be NULL). Files
 * that cannot be read, are too large or are invalid become entries with violations; a name
 * already used by an earlier file gets "duplicate-name". Returns 0 with *ret (caller frees),
 * -errno when the directory cannot be read, -ENOMEM. */
int nd_profile_dir_load(const char *dir, const nd_limits *limits, nd_profile_set **ret);

/* The entry whose profile has this name (the first one, which owns the name), or NULL. */
const nd_profile_entry *nd_profile_set_find(const nd_profile_set *set, const char *name);

/* Frees a set and its entries; NULL is fine. */
void nd_profile_set_free(nd_profile_set *set);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_profile_set *, nd_profile_set_free)
