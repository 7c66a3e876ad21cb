/* safety-limits.h: the administrator's safety limits (/etc/needled/limits.yaml, formats.md).
 * (Not named limits.h: lib/ is on the include path, where that name would hide <limits.h>.)
 *
 * Loading is strict and reports every problem at once as diagnostics with file, line,
 * column, dotted field path, code, value and limit. Codes:
 *   yaml-syntax        the YAML could not be read (including refused hostile input)
 *   not-a-mapping      the document is not a mapping
 *   duplicate-key      a key appears twice (at the second one)
 *   unknown-field      a key the format does not have
 *   missing-field      a required key is absent (at the mapping that lacks it)
 *   wrong-type         e.g. "41" quoted where a number is expected, 1.5 for an integer, yes for a boolean
 *   not-finite         .nan or .inf
 *   out-of-range       a value outside its physical range (documented in conf/limits.yaml)
 *   unsupported-version   version is not 1
 *   speed-min-above-max   pen.speed_hz.min > pen.speed_hz.max
 *   warn-not-below-max    pen.warn_temperature_c >= pen.max_temperature_c
 *   stop-not-below-min    pen.stop_battery_percent >= pen.min_battery_percent
 *   depth-out-of-range    max_depth_mm not in (0, 3.0] or depth_tolerance_mm not in [0, 3.0]
 *   not-positive          a duration (or time-out that cannot be off) is 0 or negative
 *   area-speed-outside-pen   an area's max_speed_hz outside pen.speed_hz
 *   area-duration-above-session   an area's max_duration_s above session.max_duration_s
 *   no-allowed-needles    cartridge.allowed_needles is empty
 *   needles-not-positive  an allowed needle count is 0 or negative
 *   duplicate-needles     an allowed needle count is listed twice
 *   no-areas              areas is empty
 *   invalid-area-name     an area name outside [a-z0-9_-] (1..64 characters)
 *   unknown-skin-type     a key of skin_types that is not a Fitzpatrick type I..VI
 *   (skin_types: a repeated type is duplicate-key; a cap outside (0, 3.0] is depth-out-of-range;
 *    an area's max_density_per_cm2 of 0 or less is not-positive, above the bound out-of-range)
 *   unreadable            the file could not be read (nd_limits_load_file's -errno case) */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "diag.h"
#include "digest.h"
#include "util.h"

#define ND_LIMITS_VERSION 1

/* Physical bounds no limits file may leave (see conf/limits.yaml for the reasons). */
#define ND_DEPTH_MAX_MM              3.0
#define ND_SPEED_MIN_HZ              1.0
#define ND_SPEED_MAX_HZ              500.0
#define ND_TEMPERATURE_MIN_C         30.0
#define ND_TEMPERATURE_MAX_C         60.0
#define ND_CURRENT_MAX_MA            10000.0
#define ND_STALL_TIME_MAX_MS         10000
/* The pen's watchdog range (docs/protocol.md, SET_WATCHDOG): a pen accepts nothing else. */
#define ND_PEN_HEARTBEAT_MIN_MS      50
#define ND_PEN_HEARTBEAT_MAX_MS      10000
#define ND_SESSION_DURATION_MAX_S    14400
#define ND_CLIENT_HEARTBEAT_MAX_MS   600000
#define ND_CARTRIDGE_RUNTIME_MAX_S   86400
#define ND_NEEDLES_MAX               1000
#define ND_AREAS_MAX                 64
#define ND_AREA_NAME_MAX             64
#define ND_ALLOWED_NEEDLES_MAX       64
/* Highest puncture density an area's max_density_per_cm2 may name: far above any treatment
 * (a 12-needle cartridge at 150 Hz for 45 min over 1 cm² is under 5e6), so only typos fail. */
#define ND_DENSITY_MAX_PER_CM2       10000000.0

/* Fitzpatrick skin types I..VI, as indexes 0..5 of nd_limits.skin_types. */
typedef enum nd_skin_type {
        ND_SKIN_TYPE_NONE = -1,
        ND_SKIN_TYPE_I,
        ND_SKIN_TYPE_II,
        ND_SKIN_TYPE_III,
        ND_SKIN_TYPE_IV,
        ND_SKIN_TYPE_V,
        ND_SKIN_TYPE_VI,
        ND_SKIN_TYPES_COUNT,
} nd_skin_type;

/* "I".."VI" for a type, NULL for anything else. Static. */
const char *nd_skin_type_to_string(nd_skin_type t);
/* The type named exactly "I".."VI", or ND_SKIN_TYPE_NONE. */
nd_skin_type nd_skin_type_from_string(const char *s);
/* "I, II, III, IV, V, VI", for messages. Static. */
const char *nd_skin_type_names(void);

typedef struct nd_skin_type_limits {
        bool set;               /* the type is in skin_types */
        double max_depth_mm;
        unsigned line;          /* line of the type's entry, for messages */
} nd_skin_type_limits;

typedef struct nd_area_limits {
        char *name;
        double max_depth_mm;
        bool has_max_speed_hz;
        double max_speed_hz;
        bool has_max_duration_s;
        uint32_t max_duration_s;
        bool has_max_density_per_cm2;
        double max_density_per_cm2;     /* punctures per cm² at which a session ends (dose-reached) */
        unsigned line;          /* line of the area's entry in the file, for messages */
} nd_area_limits;

typedef struct nd_limits {
        char *path;             /* the file name given to the loader, or NULL for data */
        char digest[ND_SHA256_HEX_SIZE]; /* SHA-256 hex of the exact bytes loaded */
        unsigned version;

        struct {
                double speed_min_hz;
                double speed_max_hz;
                double depth_tolerance_mm;
                double warn_temperature_c;
                double max_temperature_c;
                double max_current_ma;
                double stall_speed_fraction;
                uint32_t stall_time_ms;
                uint32_t min_battery_percent;
                uint32_t stop_battery_percent;
                uint32_t heartbeat_timeout_ms;
        } pen;
        struct {
                uint32_t max_duration_s;
                uint32_t client_heartbeat_timeout_ms;   /* 0: off */
                bool has_require_skin_type;     /* the key is written (GetLimits mirrors the file) */
                bool require_skin_type;         /* Start needs a skin_type option */
        } session;
        struct {
                bool single_use;
                uint32_t max_runtime_s;
                uint32_t *allowed_needles;
                size_t n_allowed_needles;
        } cartridge;
        nd_area_limits *areas;  /* in file order */
        size_t n_areas;
        bool has_skin_types;    /* the optional skin_types key is written (it may be empty) */
        nd_skin_type_limits skin_types[ND_SKIN_TYPES_COUNT];

        /* Source lines, so messages can say where a limit comes from. */
        struct {
                unsigned speed_hz;
                unsigned max_duration_s;
                unsigned allowed_needles;
        } lines;
} nd_limits;

/* Reads and validates a limits file. Returns 0 with *ret (caller frees); -EINVAL when it is
 * invalid (every problem in diags, *ret NULL); -errno when it cannot be read (one diag with
 * code "unreadable" naming the path and the reason); -ENOMEM. */
int nd_limits_load_file(const char *path, nd_limits **ret, nd_diags *diags);

/* Validates limits held in memory; filename (may be NULL) is used in diagnostics and kept
 * as the limits' path. Same returns as nd_limits_load_file without the -errno case. */
int nd_limits_load_data(const void *data, size_t len, const char *filename, nd_limits **ret,
                        nd_diags *diags);

/* Frees limits; NULL is fine. */
void nd_limits_free(nd_limits *limits);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_limits *, nd_limits_free)

/* The limits of an area by name, or NULL. Borrowed from limits. */
const nd_area_limits *nd_limits_find_area(const nd_limits *limits, const char *name);

/* Fastest speed allowed in an area: the tighter of pen.speed_hz.max and the area's own. */
double nd_limits_area_max_speed_hz(const nd_limits *limits, const nd_area_limits *area);

/* Longest session allowed in an area: the tighter of session.max_duration_s and the area's. */
uint32_t nd_limits_area_max_duration_s(const nd_limits *limits, const nd_area_limits *area);

/* The file name for messages ("limits.yaml"), or "limits" for data. Borrowed. */
const char *nd_limits_display_name(const nd_limits *limits);

/* Where a checked value came from, for the diagnostic: a profile's file and the value's
 * position and text as written, or all zero/NULL for a value from a client. */
typedef struct nd_limits_at {
        const char *file;
        unsigned line;
        unsigned column;
        const char *value;      /* as written; NULL: the number is formatted */
} nd_limits_at;

/* The checks a treatment makes against one area of the limits; each returns 0 when the value
 * is allowed, or -ERANGE after adding one diagnostic (field depth_mm, speed_hz, duration_s or
 * needles) that names the value, the limit and the limits file's line. at may be NULL. */
int nd_limits_area_check_depth(const nd_limits *limits, const nd_area_limits *area, double depth_mm,
                               const nd_limits_at *at, nd_diags *diags);      /* above-area-max */
int nd_limits_area_check_speed(const nd_limits *limits, const nd_area_limits *area, double speed_hz,
                               const nd_limits_at *at, nd_diags *diags);      /* speed-out-of-range */
int nd_limits_area_check_duration(const nd_limits *limits, const nd_area_limits *area, int64_t duration_s,
                                  const nd_limits_at *at, nd_diags *diags);   /* above-duration-max */
int nd_limits_check_needles(const nd_limits *limits, int64_t needles,
                            const nd_limits_at *at, nd_diags *diags);         /* needles-not-allowed */

/* Checks a depth adjustment (SetDepth) against the area's limit: 0 when allowed, -ERANGE
 * with a diagnostic (field "depth_mm"; codes unknown-area, not-finite, out-of-range,
 * above-area-max) when not. */
int nd_limits_check_depth(const nd_limits *limits, const char *area, double depth_mm, nd_diags *diags);

/* Checks a speed adjustment (SetSpeed) against the global range and the area's maximum:
 * 0 when allowed, -ERANGE with a diagnostic (field "speed_hz"; codes unknown-area, not-finite,
 * speed-out-of-range) when not. */
int nd_limits_check_speed(const nd_limits *limits, const char *area, double speed_hz, nd_diags *diags);

/* The deepest setting allowed in an area for a skin type: the lower of the area's max_depth_mm
 * and the type's cap; the area's alone for ND_SKIN_TYPE_NONE or a type without a cap. */
double nd_limits_effective_max_depth_mm(const nd_limits *limits, const nd_area_limits *area, nd_skin_type skin_type);

/* Checks a depth (a profile's at Start, or a SetDepth) against a skin type's cap: 0 when the
 * type has no cap or depth_mm is within it, else -ERANGE with one diagnostic (field depth_mm,
 * code above-skin-type-max) naming the value, the cap and its line. at may be NULL. */
int nd_limits_check_skin_type_depth(const nd_limits *limits, nd_skin_type skin_type, double depth_mm,
                                    const nd_limits_at *at, nd_diags *diags);

/* nd_limits_check_depth for a session with a skin type (ND_SKIN_TYPE_NONE: none): the area's
 * checks, then the type's cap (above-skin-type-max). 0 when allowed, -ERANGE with a diagnostic. */
int nd_limits_check_depth_for_skin(const nd_limits *limits, const char *area, nd_skin_type skin_type,
                                   double depth_mm, nd_diags *diags);
