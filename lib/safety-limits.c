/* safety-limits.c: loading and enforcing the safety limits file (see safety-limits.h, formats.md). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safety-limits.h"
#include "yamltree.h"

/* Bounds of values that are not depths or speeds; each is explained in conf/limits.yaml. */
#define STALL_FRACTION_MIN   0.05
#define STALL_FRACTION_MAX   0.95
#define CURRENT_MIN_MA       1.0
#define PERCENT_MAX          100

typedef struct loader {
        nd_yctx ctx;
        nd_limits *limits;
} loader;

/* How a value outside its range is reported: below the minimum as low_code (not-positive
 * for durations, whose minimum is 1), above the maximum as high_code. */
typedef struct range {
        double min;
        double max;
        bool min_exclusive;
        const char *unit;       /* "mm", "Hz", ... or "" */
        const char *low_code;
        const char *high_code;
} range;

static const range RANGE_SPEED = { ND_SPEED_MIN_HZ, ND_SPEED_MAX_HZ, false, "Hz", "out-of-range", "out-of-range" };
static const range RANGE_TOLERANCE = { 0, ND_DEPTH_MAX_MM, false, "mm", "depth-out-of-range", "depth-out-of-range" };
static const range RANGE_AREA_DEPTH = { 0, ND_DEPTH_MAX_MM, true, "mm", "depth-out-of-range", "depth-out-of-range" };
static const range RANGE_TEMPERATURE = { ND_TEMPERATURE_MIN_C, ND_TEMPERATURE_MAX_C, false, "°C", "out-of-range", "out-of-range" };
static const range RANGE_CURRENT = { CURRENT_MIN_MA, ND_CURRENT_MAX_MA, false, "mA", "out-of-range", "out-of-range" };
static const range RANGE_STALL_FRACTION = { STALL_FRACTION_MIN, STALL_FRACTION_MAX, false, "", "out-of-range", "out-of-range" };
static const range RANGE_STALL_TIME = { 1, ND_STALL_TIME_MAX_MS, false, "ms", "not-positive", "out-of-range" };
static const range RANGE_PERCENT = { 0, PERCENT_MAX, false, "%", "out-of-range", "out-of-range" };
static const range RANGE_PEN_HEARTBEAT = { ND_PEN_HEARTBEAT_MIN_MS, ND_PEN_HEARTBEAT_MAX_MS, false, "ms", "out-of-range",
                                           "out-of-range" };
static const range RANGE_SESSION = { 1, ND_SESSION_DURATION_MAX_S, false, "s", "not-positive", "out-of-range" };
static const range RANGE_CLIENT_HEARTBEAT = { 0, ND_CLIENT_HEARTBEAT_MAX_MS, false, "ms", "out-of-range", "out-of-range" };
static const range RANGE_RUNTIME = { 1, ND_CARTRIDGE_RUNTIME_MAX_S, false, "s", "not-positive", "out-of-range" };
static const range RANGE_NEEDLES = { 1, ND_NEEDLES_MAX, false, "", "needles-not-positive", "out-of-range" };
static const range RANGE_DENSITY = { 0, ND_DENSITY_MAX_PER_CM2, true, "per cm²", "not-positive", "out-of-range" };

static const char *const SKIN_TYPE_NAMES[ND_SKIN_TYPES_COUNT] = { "I", "II", "III", "IV", "V", "VI" };

const char *nd_skin_type_to_string(nd_skin_type t) {
        if (t < 0 || t >= ND_SKIN_TYPES_COUNT)
                return NULL;
        return SKIN_TYPE_NAMES[t];
}

nd_skin_type nd_skin_type_from_string(const char *s) {
        for (int i = 0; s && i < ND_SKIN_TYPES_COUNT; i++)
                if (STREQ(s, SKIN_TYPE_NAMES[i]))
                        return (nd_skin_type) i;
        return ND_SKIN_TYPE_NONE;
}

const char *nd_skin_type_names(void) {
        return "I, II, III, IV, V, VI";
}

void nd_limits_free(nd_limits *l) {
        if (!l)
                return;
        for (size_t i = 0; i < l->n_areas; i++)
                free(l->areas[i].name);
        free(l->areas);
        free(l->cartridge.allowed_needles);
        free(l->path);
        free(l);
}

static void with_unit(char *buf, size_t size, double v, const char *unit) {
        char num[32];
        nd_format_number(v, num);
        snprintf(buf, size, "%s%s%s", num, *unit && !STREQ(unit, "%") ? " " : "", unit);
}


/* Reports v when it is outside r; returns true when it is inside. */
static bool check_range(loader *L, const nd_ynode *n, const char *field, double v, const range *r) {
        bool low = r->min_exclusive ? !(v > r->min) : !(v >= r->min);
        bool high = !(v <= r->max);
        if (!low && !high)
                return true;

        char lo[48], hi[48], text[128];
        nd_format_number(r->min, lo);
        with_unit(hi, sizeof hi, r->max, r->unit);
        if (r->min_exclusive)
                snprintf(text, sizeof text, "more than %s and at most %s", lo, hi);
        else
                snprintf(text, sizeof text, "%s to %s", lo, hi);

        const char *code = low ? r->low_code : r->high_code;
        if (STREQ(code, "not-positive"))
                nd_diags_add(L->ctx.diags, L->ctx.file, n->line, n->column, field, code, n->scalar, text,
                             "%s must be greater than 0, not %s (allowed: %s)", field, n->scalar, text);
        else
                nd_diags_add(L->ctx.diags, L->ctx.file, n->line, n->column, field, code, n->scalar, text,
                             "%s %s is outside the allowed range %s", field, n->scalar, text);
        return false;
}

/* Reads a number within r. Returns true when it is present, well-typed and in range. */
static bool get_number(loader *L, const nd_yfield *f, const char *field, const range *r, double *ret) {
        double v;
        if (!f->value || nd_yget_number(&L->ctx, f->value, field, &v) < 0)
                return false;
        *ret = v;
        return check_range(L, f->value, field, v, r);
}

static bool get_uint32(loader *L, const nd_yfield *f, const char *field, const range *r, uint32_t *ret) {
        int64_t v;
        if (!f->value || nd_yget_integer(&L->ctx, f->value, field, &v) < 0)
                return false;
        if (!check_range(L, f->value, field, (double) v, r))
                return false;
        *ret = (uint32_t) v;
        return true;
}

static void load_pen(loader *L, const nd_ynode *node, bool *speed_ok) {
        nd_limits *l = L->limits;
        nd_yfield f[] = {
                ND_YFIELD_REQUIRED("speed_hz"),             ND_YFIELD_REQUIRED("depth_tolerance_mm"),
                ND_YFIELD_REQUIRED("warn_temperature_c"),   ND_YFIELD_REQUIRED("max_temperature_c"),
                ND_YFIELD_REQUIRED("max_current_ma"),       ND_YFIELD_REQUIRED("stall_speed_fraction"),
                ND_YFIELD_REQUIRED("stall_time_ms"),        ND_YFIELD_REQUIRED("min_battery_percent"),
                ND_YFIELD_REQUIRED("stop_battery_percent"), ND_YFIELD_REQUIRED("heartbeat_timeout_ms"),
        };
        *speed_ok = false;
        if (nd_ymap_fields(&L->ctx, node, "pen", f, ELEMENTSOF(f)) < 0)
                return;

        if (f[0].value) {
                nd_yfield s[] = { ND_YFIELD_REQUIRED("min"), ND_YFIELD_REQUIRED("max") };
                l->lines.speed_hz = f[0].key_node->line;
                if (nd_ymap_fields(&L->ctx, f[0].value, "pen.speed_hz", s, ELEMENTSOF(s)) == 0) {
                        bool min_ok = get_number(L, &s[0], "pen.speed_hz.min", &RANGE_SPEED, &l->pen.speed_min_hz);
                        bool max_ok = get_number(L, &s[1], "pen.speed_hz.max", &RANGE_SPEED, &l->pen.speed_max_hz);
                        if (min_ok && max_ok && l->pen.speed_min_hz > l->pen.speed_max_hz) {
                                char max_text[32];
                                nd_format_number(l->pen.speed_max_hz, max_text);
                                nd_diags_add(L->ctx.diags, L->ctx.file, s[0].value->line, s[0].value->column,
                                             "pen.speed_hz.min", "speed-min-above-max", s[0].value->scalar, max_text,
                                             "pen.speed_hz.min %s is above pen.speed_hz.max %s; the minimum must not exceed the maximum",
                                             s[0].value->scalar, s[1].value->scalar);
                        } else
                                *speed_ok = min_ok && max_ok;
                }
        }

        get_number(L, &f[1], "pen.depth_tolerance_mm", &RANGE_TOLERANCE, &l->pen.depth_tolerance_mm);
        bool warn_ok = get_number(L, &f[2], "pen.warn_temperature_c", &RANGE_TEMPERATURE, &l->pen.warn_temperature_c);
        bool max_ok = get_number(L, &f[3], "pen.max_temperature_c", &RANGE_TEMPERATURE, &l->pen.max_temperature_c);
        if (warn_ok && max_ok && !(l->pen.warn_temperature_c < l->pen.max_temperature_c))
                nd_diags_add(L->ctx.diags, L->ctx.file, f[2].value->line, f[2].value->column,
                             "pen.warn_temperature_c", "warn-not-below-max", f[2].value->scalar, f[3].value->scalar,
                             "pen.warn_temperature_c %s must be below pen.max_temperature_c %s, or the warning would never come before the stop",
                             f[2].value->scalar, f[3].value->scalar);

        get_number(L, &f[4], "pen.max_current_ma", &RANGE_CURRENT, &l->pen.max_current_ma);
        get_number(L, &f[5], "pen.stall_speed_fraction", &RANGE_STALL_FRACTION, &l->pen.stall_speed_fraction);
        get_uint32(L, &f[6], "pen.stall_time_ms", &RANGE_STALL_TIME, &l->pen.stall_time_ms);

        bool min_bat_ok = get_uint32(L, &f[7], "pen.min_battery_percent", &RANGE_PERCENT, &l->pen.min_battery_percent);
        bool stop_bat_ok = get_uint32(L, &f[8], "pen.stop_battery_percent", &RANGE_PERCENT, &l->pen.stop_battery_percent);
        if (min_bat_ok && stop_bat_ok && !(l->pen.stop_battery_percent < l->pen.min_battery_percent))
                nd_diags_add(L->ctx.diags, L->ctx.file, f[8].value->line, f[8].value->column,
                             "pen.stop_battery_percent", "stop-not-below-min", f[8].value->scalar, f[7].value->scalar,
                             "pen.stop_battery_percent %s must be below pen.min_battery_percent %s, or a session could start with too little battery to run",
                             f[8].value->scalar, f[7].value->scalar);

        get_uint32(L, &f[9], "pen.heartbeat_timeout_ms", &RANGE_PEN_HEARTBEAT, &l->pen.heartbeat_timeout_ms);
}

static bool load_session(loader *L, const nd_ynode *node) {
        nd_limits *l = L->limits;
        nd_yfield f[] = { ND_YFIELD_REQUIRED("max_duration_s"), ND_YFIELD_REQUIRED("client_heartbeat_timeout_ms"),
                          ND_YFIELD_OPTIONAL("require_skin_type") };
        if (nd_ymap_fields(&L->ctx, node, "session", f, ELEMENTSOF(f)) < 0)
                return false;
        if (f[2].value && nd_yget_bool(&L->ctx, f[2].value, "session.require_skin_type", &l->session.require_skin_type) == 0)
                l->session.has_require_skin_type = true;
        bool duration_ok = get_uint32(L, &f[0], "session.max_duration_s", &RANGE_SESSION, &l->session.max_duration_s);
        if (f[0].value)
                l->lines.max_duration_s = f[0].value->line;
        get_uint32(L, &f[1], "session.client_heartbeat_timeout_ms", &RANGE_CLIENT_HEARTBEAT,
                   &l->session.client_heartbeat_timeout_ms);
        return duration_ok;
}

static void load_needles(loader *L, const nd_ynode *seq) {
        static const char field[] = "cartridge.allowed_needles";
        nd_limits *l = L->limits;

        l->lines.allowed_needles = seq->line;
        if (seq->kind != ND_YNODE_SEQUENCE) {
                nd_diags_add(L->ctx.diags, L->ctx.file, seq->line, seq->column, field, "wrong-type",
                             seq->kind == ND_YNODE_SCALAR ? seq->scalar : NULL, NULL,
                             "%s must be a list of needle counts such as [12, 16, 36], not %s",
                             field, nd_ynode_describe(seq));
                return;
        }
        if (seq->n_items == 0) {
                nd_diags_add(L->ctx.diags, L->ctx.file, seq->line, seq->column, field, "no-allowed-needles",
                             NULL, NULL, "%s is empty; list at least one cartridge needle count", field);
                return;
        }
        if (seq->n_items > ND_ALLOWED_NEEDLES_MAX) {
                nd_diags_add(L->ctx.diags, L->ctx.file, seq->line, seq->column, field, "out-of-range", NULL, NULL,
                             "%s lists %zu needle counts; at most %d are allowed", field, seq->n_items,
                             ND_ALLOWED_NEEDLES_MAX);
                return;
        }
        l->cartridge.allowed_needles = calloc(seq->n_items, sizeof(uint32_t));
        if (!l->cartridge.allowed_needles) {
                L->ctx.diags->oom = true;
                return;
        }
        for (size_t i = 0; i < seq->n_items; i++) {
                const nd_ynode *item = seq->items[i];
                nd_yfield f = { .value = item };
                uint32_t v;
                if (!get_uint32(L, &f, field, &RANGE_NEEDLES, &v))
                        continue;
                bool repeated = false;
                for (size_t j = 0; j < l->cartridge.n_allowed_needles; j++)
                        if (l->cartridge.allowed_needles[j] == v)
                                repeated = true;
                if (repeated) {
                        nd_diags_add(L->ctx.diags, L->ctx.file, item->line, item->column, field, "duplicate-needles",
                                     item->scalar, NULL, "%s lists %s more than once", field, item->scalar);
                        continue;
                }
                l->cartridge.allowed_needles[l->cartridge.n_allowed_needles++] = v;
        }
}

static void load_cartridge(loader *L, const nd_ynode *node) {
        nd_limits *l = L->limits;
        nd_yfield f[] = { ND_YFIELD_REQUIRED("single_use"), ND_YFIELD_REQUIRED("max_runtime_s"), ND_YFIELD_REQUIRED("allowed_needles") };
        if (nd_ymap_fields(&L->ctx, node, "cartridge", f, ELEMENTSOF(f)) < 0)
                return;
        if (f[0].value)
                nd_yget_bool(&L->ctx, f[0].value, "cartridge.single_use", &l->cartridge.single_use);
        get_uint32(L, &f[1], "cartridge.max_runtime_s", &RANGE_RUNTIME, &l->cartridge.max_runtime_s);
        if (f[2].value)
                load_needles(L, f[2].value);
}

static bool valid_area_name(const char *s, size_t len) {
        if (len == 0 || len > ND_AREA_NAME_MAX)
                return false;
        for (size_t i = 0; i < len; i++)
                if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_' || s[i] == '-'))
                        return false;
        return true;
}

static void load_area(loader *L, const nd_ynode *areas, size_t index, bool speed_ok, bool session_ok) {
        nd_limits *l = L->limits;
        const nd_ypair *pair = &areas->pairs[index];
        const nd_ynode *key = pair->key;
        char path[ND_AREA_NAME_MAX + 16], field[ND_AREA_NAME_MAX + 48];

        if (key->kind != ND_YNODE_SCALAR || !valid_area_name(key->scalar, key->scalar_len)) {
                nd_diags_add(L->ctx.diags, L->ctx.file, key->line, key->column, "areas", "invalid-area-name",
                             key->kind == ND_YNODE_SCALAR ? key->scalar : NULL, "[a-z0-9_-]{1,64}",
                             "area name '%s' must be 1 to %d characters of a-z, 0-9, '_' and '-'",
                             key->kind == ND_YNODE_SCALAR ? key->scalar : "(not a name)", ND_AREA_NAME_MAX);
                return;
        }
        snprintf(path, sizeof path, "areas.%s", key->scalar);
        if (pair->duplicate) {
                nd_diags_add(L->ctx.diags, L->ctx.file, key->line, key->column, path, "duplicate-key", key->scalar,
                             NULL, "area '%s' appears twice in areas (first at line %u)", key->scalar,
                             areas->pairs[pair->first].key->line);
                return;
        }

        nd_area_limits *a = &l->areas[l->n_areas];
        *a = (nd_area_limits) { .line = key->line };
        a->name = strdup(key->scalar);
        if (!a->name) {
                L->ctx.diags->oom = true;
                return;
        }
        l->n_areas++;

        nd_yfield f[] = { ND_YFIELD_REQUIRED("max_depth_mm"), ND_YFIELD_OPTIONAL("max_speed_hz"), ND_YFIELD_OPTIONAL("max_duration_s"),
                          ND_YFIELD_OPTIONAL("max_density_per_cm2") };
        if (nd_ymap_fields(&L->ctx, pair->value, path, f, ELEMENTSOF(f)) < 0)
                return;

        snprintf(field, sizeof field, "%s.max_depth_mm", path);
        get_number(L, &f[0], field, &RANGE_AREA_DEPTH, &a->max_depth_mm);

        snprintf(field, sizeof field, "%s.max_speed_hz", path);
        if (f[1].value && get_number(L, &f[1], field, &RANGE_SPEED, &a->max_speed_hz)) {
                a->has_max_speed_hz = true;
                if (speed_ok && (a->max_speed_hz < l->pen.speed_min_hz || a->max_speed_hz > l->pen.speed_max_hz)) {
                        char lo[32], hi[32], text[80];
                        nd_format_number(l->pen.speed_min_hz, lo);
                        nd_format_number(l->pen.speed_max_hz, hi);
                        snprintf(text, sizeof text, "%s to %s Hz", lo, hi);
                        nd_diags_add(L->ctx.diags, L->ctx.file, f[1].value->line, f[1].value->column, field,
                                     "area-speed-outside-pen", f[1].value->scalar, text,
                                     "%s %s is outside pen.speed_hz (%s, line %u); an area may only tighten the global range",
                                     field, f[1].value->scalar, text, l->lines.speed_hz);
                }
        }

        snprintf(field, sizeof field, "%s.max_duration_s", path);
        if (f[2].value && get_uint32(L, &f[2], field, &RANGE_SESSION, &a->max_duration_s)) {
                a->has_max_duration_s = true;
                if (session_ok && a->max_duration_s > l->session.max_duration_s) {
                        char text[32];
                        snprintf(text, sizeof text, "%" PRIu32 " s", l->session.max_duration_s);
                        nd_diags_add(L->ctx.diags, L->ctx.file, f[2].value->line, f[2].value->column, field,
                                     "area-duration-above-session", f[2].value->scalar, text,
                                     "%s %s is above session.max_duration_s %" PRIu32 " (line %u); an area may only tighten the global limit",
                                     field, f[2].value->scalar, l->session.max_duration_s, l->lines.max_duration_s);
                }
        }

        snprintf(field, sizeof field, "%s.max_density_per_cm2", path);
        if (f[3].value && get_number(L, &f[3], field, &RANGE_DENSITY, &a->max_density_per_cm2))
                a->has_max_density_per_cm2 = true;
}

static void load_skin_types(loader *L, const nd_ynode *node) {
        nd_limits *l = L->limits;
        if (node->kind != ND_YNODE_MAPPING) {
                nd_diags_add(L->ctx.diags, L->ctx.file, node->line, node->column, "skin_types", "wrong-type",
                             node->kind == ND_YNODE_SCALAR ? node->scalar : NULL, NULL,
                             "skin_types must be a mapping of Fitzpatrick types (%s) to {max_depth_mm: N}, not %s",
                             nd_skin_type_names(), nd_ynode_describe(node));
                return;
        }
        l->has_skin_types = true;
        for (size_t i = 0; i < node->n_pairs; i++) {
                const nd_ypair *pair = &node->pairs[i];
                const nd_ynode *key = pair->key;
                nd_skin_type t = key->kind == ND_YNODE_SCALAR ? nd_skin_type_from_string(key->scalar) : ND_SKIN_TYPE_NONE;
                if (t == ND_SKIN_TYPE_NONE) {
                        _cleanup_free_ char *text = key->kind == ND_YNODE_SCALAR
                                ? nd_text_sanitize(key->scalar, key->scalar_len, ND_DIAG_VALUE_MAX) : NULL;
                        nd_diags_add(L->ctx.diags, L->ctx.file, key->line, key->column, "skin_types", "unknown-skin-type",
                                     key->kind == ND_YNODE_SCALAR ? key->scalar : NULL, nd_skin_type_names(),
                                     "'%s' is not a Fitzpatrick skin type; the types are: %s",
                                     text ? text : "(not a name)", nd_skin_type_names());
                        continue;
                }
                char path[32], field[64];
                snprintf(path, sizeof path, "skin_types.%s", key->scalar);
                if (pair->duplicate || l->skin_types[t].set) {
                        nd_diags_add(L->ctx.diags, L->ctx.file, key->line, key->column, path, "duplicate-key", key->scalar,
                                     NULL, "skin type %s appears twice in skin_types (first at line %u)", key->scalar,
                                     l->skin_types[t].line);
                        continue;
                }
                l->skin_types[t] = (nd_skin_type_limits) { .set = true, .line = key->line };

                nd_yfield f[] = { ND_YFIELD_REQUIRED("max_depth_mm") };
                if (nd_ymap_fields(&L->ctx, pair->value, path, f, ELEMENTSOF(f)) < 0)
                        continue;
                snprintf(field, sizeof field, "%s.max_depth_mm", path);
                get_number(L, &f[0], field, &RANGE_AREA_DEPTH, &l->skin_types[t].max_depth_mm);
        }
}

static void load_areas(loader *L, const nd_ynode *node, bool speed_ok, bool session_ok) {
        if (node->kind != ND_YNODE_MAPPING) {
                nd_diags_add(L->ctx.diags, L->ctx.file, node->line, node->column, "areas", "wrong-type",
                             node->kind == ND_YNODE_SCALAR ? node->scalar : NULL, NULL,
                             "areas must be a mapping of area names to their limits, not %s", nd_ynode_describe(node));
                return;
        }
        if (node->n_pairs == 0) {
                nd_diags_add(L->ctx.diags, L->ctx.file, node->line, node->column, "areas", "no-areas", NULL, NULL,
                             "areas is empty; define at least one area, or no profile can be used");
                return;
        }
        if (node->n_pairs > ND_AREAS_MAX) {
                nd_diags_add(L->ctx.diags, L->ctx.file, node->line, node->column, "areas", "out-of-range", NULL, NULL,
                             "areas defines %zu areas; at most %d are allowed", node->n_pairs, ND_AREAS_MAX);
                return;
        }
        L->limits->areas = calloc(node->n_pairs, sizeof(nd_area_limits));
        if (!L->limits->areas) {
                L->ctx.diags->oom = true;
                return;
        }
        for (size_t i = 0; i < node->n_pairs; i++)
                load_area(L, node, i, speed_ok, session_ok);
}

static void load_root(loader *L, const nd_ynode *root) {
        nd_limits *l = L->limits;

        if (!root || root->kind != ND_YNODE_MAPPING) {
                nd_diags_add(L->ctx.diags, L->ctx.file, root ? root->line : 1, root ? root->column : 1, "",
                             "not-a-mapping", root && root->kind == ND_YNODE_SCALAR ? root->scalar : NULL, NULL,
                             "the limits file must be a mapping with the keys version, pen, session, cartridge and areas, not %s",
                             nd_ynode_describe(root));
                return;
        }

        nd_yfield f[] = {
                ND_YFIELD_REQUIRED("version"), ND_YFIELD_REQUIRED("pen"), ND_YFIELD_REQUIRED("session"), ND_YFIELD_REQUIRED("cartridge"), ND_YFIELD_REQUIRED("areas"),
                ND_YFIELD_OPTIONAL("skin_types"),
        };
        nd_ymap_fields(&L->ctx, root, "", f, ELEMENTSOF(f));

        int64_t version;
        if (f[0].value && nd_yget_integer(&L->ctx, f[0].value, "version", &version) == 0) {
                if (version != ND_LIMITS_VERSION)
                        nd_diags_add(L->ctx.diags, L->ctx.file, f[0].value->line, f[0].value->column, "version",
                                     "unsupported-version", f[0].value->scalar, "1",
                                     "version %s is not supported; this needled reads version %d", f[0].value->scalar,
                                     ND_LIMITS_VERSION);
                else
                        l->version = ND_LIMITS_VERSION;
        }

        bool speed_ok = false, session_ok = false;
        if (f[1].value)
                load_pen(L, f[1].value, &speed_ok);
        if (f[2].value)
                session_ok = load_session(L, f[2].value);
        if (f[3].value)
                load_cartridge(L, f[3].value);
        if (f[4].value)
                load_areas(L, f[4].value, speed_ok, session_ok);
        if (f[5].value)
                load_skin_types(L, f[5].value);
}

int nd_limits_load_data(const void *data, size_t len, const char *filename, nd_limits **ret,
                        nd_diags *diags) {
        _cleanup_diags_ nd_diags local = ND_DIAGS_INIT;
        *ret = NULL;

        _cleanup_(nd_limits_freep) nd_limits *l = calloc(1, sizeof *l);
        if (!l)
                return -ENOMEM;
        if (filename) {
                l->path = strdup(filename);
                if (!l->path)
                        return -ENOMEM;
        }
        nd_sha256_hex(data, len, l->digest);

        nd_yaml_error error;
        _cleanup_(nd_ynode_freep) nd_ynode *root = NULL;
        int r = nd_yaml_parse(data, len, &root, &error);
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                nd_yaml_error_to_diag(&error, filename, &local);
        else {
                loader L = { .ctx = { .file = filename, .diags = &local }, .limits = l };
                load_root(&L, root);
        }

        if (nd_diags_sort(&local) < 0)
                return -ENOMEM;
        if (local.oom)
                return -ENOMEM;
        if (nd_diags_count(&local) > 0) {
                if (diags && nd_diags_move(diags, &local) < 0)
                        return -ENOMEM;
                return -EINVAL;
        }
        *ret = TAKE_PTR(l);
        return 0;
}

int nd_limits_load_file(const char *path, nd_limits **ret, nd_diags *diags) {
        _cleanup_free_ char *data = NULL;
        size_t len;

        *ret = NULL;
        int r = nd_yaml_read_file(path, &data, &len);
        if (r == -ENOMEM)
                return r;
        if (r < 0) {
                nd_diags_add(diags, path, 0, 0, "", "unreadable", NULL, NULL, "cannot read %s: %s", path,
                             r == -EBADFD ? "not a regular file" : strerror(-r));
                return r;
        }
        return nd_limits_load_data(data, len, path, ret, diags);
}

const nd_area_limits *nd_limits_find_area(const nd_limits *l, const char *name) {
        if (!l || !name)
                return NULL;
        for (size_t i = 0; i < l->n_areas; i++)
                if (STREQ(l->areas[i].name, name))
                        return &l->areas[i];
        return NULL;
}

double nd_limits_area_max_speed_hz(const nd_limits *l, const nd_area_limits *a) {
        if (a && a->has_max_speed_hz)
                return MIN(a->max_speed_hz, l->pen.speed_max_hz);
        return l->pen.speed_max_hz;
}

uint32_t nd_limits_area_max_duration_s(const nd_limits *l, const nd_area_limits *a) {
        if (a && a->has_max_duration_s)
                return MIN(a->max_duration_s, l->session.max_duration_s);
        return l->session.max_duration_s;
}

const char *nd_limits_display_name(const nd_limits *l) {
        if (!l || !l->path || !*l->path)
                return "limits";
        const char *slash = strrchr(l->path, '/');
        return slash && slash[1] ? slash + 1 : l->path;
}

static const nd_limits_at NO_POSITION = { NULL, 0, 0, NULL };

/* The value as written, or formatted from the number when it came from a client. */
static const char *value_text(const nd_limits_at *at, double v, char buf[static 32]) {
        if (at->value)
                return at->value;
        nd_format_number(v, buf);
        return buf;
}

int nd_limits_area_check_depth(const nd_limits *l, const nd_area_limits *a, double depth_mm,
                               const nd_limits_at *at, nd_diags *diags) {
        if (!at)
                at = &NO_POSITION;
        if (depth_mm <= a->max_depth_mm)
                return 0;
        char value[32], limit[32];
        nd_format_number(a->max_depth_mm, limit);
        nd_diags_add(diags, at->file, at->line, at->column, "depth_mm", "above-area-max",
                     value_text(at, depth_mm, value), limit,
                     "depth_mm %s exceeds the %s mm maximum for area %s (%s line %u)",
                     value_text(at, depth_mm, value), limit, a->name, nd_limits_display_name(l), a->line);
        return -ERANGE;
}

int nd_limits_area_check_speed(const nd_limits *l, const nd_area_limits *a, double speed_hz,
                               const nd_limits_at *at, nd_diags *diags) {
        if (!at)
                at = &NO_POSITION;
        double max = nd_limits_area_max_speed_hz(l, a);
        if (speed_hz >= l->pen.speed_min_hz && speed_hz <= max)
                return 0;

        bool area_tighter = a && a->has_max_speed_hz && a->max_speed_hz < l->pen.speed_max_hz;
        char value[32], lo[32], hi[32], limit[80], area_text[ND_AREA_NAME_MAX + 16] = "";
        nd_format_number(l->pen.speed_min_hz, lo);
        nd_format_number(max, hi);
        snprintf(limit, sizeof limit, "%s to %s Hz", lo, hi);
        if (a)
                snprintf(area_text, sizeof area_text, " for area %s", a->name);
        nd_diags_add(diags, at->file, at->line, at->column, "speed_hz", "speed-out-of-range",
                     value_text(at, speed_hz, value), limit,
                     "speed_hz %s is outside the allowed %s%s (%s line %u)",
                     value_text(at, speed_hz, value), limit, area_text, nd_limits_display_name(l),
                     area_tighter ? a->line : l->lines.speed_hz);
        return -ERANGE;
}

int nd_limits_area_check_duration(const nd_limits *l, const nd_area_limits *a, int64_t duration_s,
                                  const nd_limits_at *at, nd_diags *diags) {
        if (!at)
                at = &NO_POSITION;
        uint32_t max = nd_limits_area_max_duration_s(l, a);
        if (duration_s <= (int64_t) max)
                return 0;

        char value[32], limit[32];
        snprintf(value, sizeof value, "%" PRId64, duration_s);
        snprintf(limit, sizeof limit, "%" PRIu32, max);
        bool area_tighter = a && a->has_max_duration_s && a->max_duration_s < l->session.max_duration_s;
        if (area_tighter)
                nd_diags_add(diags, at->file, at->line, at->column, "duration_s", "above-duration-max",
                             at->value ? at->value : value, limit,
                             "duration_s %s exceeds the %s s maximum for area %s (%s line %u)",
                             at->value ? at->value : value, limit, a->name, nd_limits_display_name(l), a->line);
        else
                nd_diags_add(diags, at->file, at->line, at->column, "duration_s", "above-duration-max",
                             at->value ? at->value : value, limit,
                             "duration_s %s exceeds the %s s session maximum (%s line %u)",
                             at->value ? at->value : value, limit, nd_limits_display_name(l),
                             l->lines.max_duration_s);
        return -ERANGE;
}

int nd_limits_check_needles(const nd_limits *l, int64_t needles, const nd_limits_at *at, nd_diags *diags) {
        if (!at)
                at = &NO_POSITION;
        for (size_t i = 0; i < l->cartridge.n_allowed_needles; i++)
                if ((int64_t) l->cartridge.allowed_needles[i] == needles)
                        return 0;

        char value[32], allowed[ND_ALLOWED_NEEDLES_MAX * 12 + 1] = "";
        size_t used = 0;
        for (size_t i = 0; i < l->cartridge.n_allowed_needles && used < sizeof allowed; i++)
                used += (size_t) snprintf(allowed + used, sizeof allowed - used, "%s%" PRIu32, i > 0 ? ", " : "",
                                          l->cartridge.allowed_needles[i]);
        snprintf(value, sizeof value, "%" PRId64, needles);
        nd_diags_add(diags, at->file, at->line, at->column, "needles", "needles-not-allowed",
                     at->value ? at->value : value, allowed,
                     "needles %s is not an allowed cartridge; allowed: %s (%s line %u)",
                     at->value ? at->value : value, allowed, nd_limits_display_name(l), l->lines.allowed_needles);
        return -ERANGE;
}

int nd_limits_check_depth(const nd_limits *l, const char *area, double depth_mm, nd_diags *diags) {
        const nd_area_limits *a = nd_limits_find_area(l, area);
        char value[32];
        if (!a) {
                _cleanup_free_ char *name = nd_text_sanitize(strempty(area), strlen(strempty(area)), ND_AREA_NAME_MAX);
                nd_diags_add(diags, NULL, 0, 0, "area", "unknown-area", name, NULL,
                             "area '%s' is not defined in %s", strempty(name), nd_limits_display_name(l));
                return -ERANGE;
        }
        if (!isfinite(depth_mm)) {
                nd_diags_add(diags, NULL, 0, 0, "depth_mm", "not-finite", NULL, NULL,
                             "depth_mm must be a finite number");
                return -ERANGE;
        }
        if (depth_mm <= 0) {
                nd_format_number(depth_mm, value);
                nd_diags_add(diags, NULL, 0, 0, "depth_mm", "out-of-range", value, "more than 0 mm",
                             "depth_mm %s must be more than 0 mm", value);
                return -ERANGE;
        }
        return nd_limits_area_check_depth(l, a, depth_mm, NULL, diags);
}

int nd_limits_check_speed(const nd_limits *l, const char *area, double speed_hz, nd_diags *diags) {
        const nd_area_limits *a = nd_limits_find_area(l, area);
        if (!a) {
                _cleanup_free_ char *name = nd_text_sanitize(strempty(area), strlen(strempty(area)), ND_AREA_NAME_MAX);
                nd_diags_add(diags, NULL, 0, 0, "area", "unknown-area", name, NULL,
                             "area '%s' is not defined in %s", strempty(name), nd_limits_display_name(l));
                return -ERANGE;
        }
        if (!isfinite(speed_hz)) {
                nd_diags_add(diags, NULL, 0, 0, "speed_hz", "not-finite", NULL, NULL,
                             "speed_hz must be a finite number");
                return -ERANGE;
        }
        return nd_limits_area_check_speed(l, a, speed_hz, NULL, diags);
}

double nd_limits_effective_max_depth_mm(const nd_limits *l, const nd_area_limits *a, nd_skin_type t) {
        double max = a ? a->max_depth_mm : ND_DEPTH_MAX_MM;
        if (t >= 0 && t < ND_SKIN_TYPES_COUNT && l->skin_types[t].set)
                max = MIN(max, l->skin_types[t].max_depth_mm);
        return max;
}

int nd_limits_check_skin_type_depth(const nd_limits *l, nd_skin_type t, double depth_mm, const nd_limits_at *at,
                                    nd_diags *diags) {
        if (!at)
                at = &NO_POSITION;
        if (t < 0 || t >= ND_SKIN_TYPES_COUNT || !l->skin_types[t].set || depth_mm <= l->skin_types[t].max_depth_mm)
                return 0;
        char value[32], limit[32];
        nd_format_number(l->skin_types[t].max_depth_mm, limit);
        nd_diags_add(diags, at->file, at->line, at->column, "depth_mm", "above-skin-type-max",
                     value_text(at, depth_mm, value), limit,
                     "depth_mm %s exceeds the %s mm maximum for skin type %s (%s line %u)",
                     value_text(at, depth_mm, value), limit, nd_skin_type_to_string(t), nd_limits_display_name(l),
                     l->skin_types[t].line);
        return -ERANGE;
}

int nd_limits_check_depth_for_skin(const nd_limits *l, const char *area, nd_skin_type t, double depth_mm,
                                   nd_diags *diags) {
        int r = nd_limits_check_depth(l, area, depth_mm, diags);
        if (r < 0)
                return r;
        return nd_limits_check_skin_type_depth(l, t, depth_mm, NULL, diags);
}
