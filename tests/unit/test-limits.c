/* test-limits.c: loading the safety limits file: every rule, every position, all at once. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check-main.h"
#include "diag.h"
#include "digest.h"
#include "limits-test.h"
#include "safety-limits.h"
#include "util.h"
#include "yamltree.h"

/* tests/data/limits-test.yaml: the example of formats.md (cheeks is on line 25, body on 30). */
static const char VALID_LIMITS[] = ND_TEST_LIMITS_YAML;

static char *mutate(const char *text, const char *from, const char *to) {
        const char *at = strstr(text, from);
        ck_assert_msg(at, "'%s' not in the text", from);
        char *out = NULL;
        ck_assert_int_ge(asprintf(&out, "%.*s%s%s", (int) (at - text), text, to, at + strlen(from)), 0);
        return out;
}

/* All diagnostics as text, for failure messages. */
static char *dump(const nd_diags *d) {
        size_t cap = 1;
        for (size_t i = 0; i < nd_diags_count(d); i++)
                cap += strlen(d->items[i].message) + strlen(d->items[i].code) + strlen(d->items[i].field) + 64;
        char *s = malloc(cap), *p = s;
        *p = '\0';
        for (size_t i = 0; i < nd_diags_count(d); i++)
                p += sprintf(p, "\n  %u:%u %s [%s] %s", d->items[i].line, d->items[i].column, d->items[i].field,
                             d->items[i].code, d->items[i].message);
        return s;
}

static void assert_diag(const nd_diag *g, const char *file, unsigned line, unsigned column, const char *field,
                        const char *code) {
        ck_assert_msg(STREQ(g->code, code) && STREQ(g->field, field) && g->line == line && g->column == column,
                      "expected %u:%u %s [%s], got %u:%u %s [%s] %s", line, column, field, code, g->line,
                      g->column, g->field, g->code, g->message);
        if (file)
                ck_assert_str_eq(g->file, file);
        else
                ck_assert_ptr_null(g->file);
        ck_assert_str_ne(g->message, "");
}

START_TEST(test_example_is_valid) {
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_limits_freep) nd_limits *l = NULL;
        int r = nd_limits_load_data(VALID_LIMITS, strlen(VALID_LIMITS), "limits.yaml", &l, &d);
        _cleanup_free_ char *text = dump(&d);
        ck_assert_msg(r == 0, "refused:%s", text);
        ck_assert_uint_eq(nd_diags_count(&d), 0);

        ck_assert_uint_eq(l->version, 1);
        ck_assert(l->pen.speed_min_hz == 50 && l->pen.speed_max_hz == 150);
        ck_assert(l->pen.depth_tolerance_mm == 0.15);
        ck_assert(l->pen.warn_temperature_c == 41 && l->pen.max_temperature_c == 43);
        ck_assert(l->pen.max_current_ma == 1200);
        ck_assert(l->pen.stall_speed_fraction == 0.7);
        ck_assert_uint_eq(l->pen.stall_time_ms, 250);
        ck_assert_uint_eq(l->pen.min_battery_percent, 20);
        ck_assert_uint_eq(l->pen.stop_battery_percent, 5);
        ck_assert_uint_eq(l->pen.heartbeat_timeout_ms, 500);
        ck_assert_uint_eq(l->session.max_duration_s, 2700);
        ck_assert_uint_eq(l->session.client_heartbeat_timeout_ms, 0);
        ck_assert(l->cartridge.single_use);
        ck_assert_uint_eq(l->cartridge.max_runtime_s, 3600);
        static const uint32_t needles[] = { 12, 14, 16, 24, 36, 42 };
        ck_assert_uint_eq(l->cartridge.n_allowed_needles, ELEMENTSOF(needles));
        for (size_t i = 0; i < ELEMENTSOF(needles); i++)
                ck_assert_uint_eq(l->cartridge.allowed_needles[i], needles[i]);

        static const struct { const char *name; double depth; unsigned line; } areas[] = {
                { "periorbital", 0.5, 21 }, { "forehead", 0.75, 22 }, { "nose", 0.5, 23 },
                { "perioral", 0.75, 24 },   { "cheeks", 1.5, 25 },    { "chin", 1.5, 26 },
                { "neck", 1.0, 27 },        { "decollete", 0.75, 28 }, { "scalp", 1.5, 29 },
                { "body", 2.0, 30 },
        };
        ck_assert_uint_eq(l->n_areas, ELEMENTSOF(areas));
        for (size_t i = 0; i < ELEMENTSOF(areas); i++) {
                const nd_area_limits *a = nd_limits_find_area(l, areas[i].name);
                ck_assert_ptr_eq(a, &l->areas[i]);
                ck_assert(a->max_depth_mm == areas[i].depth);
                ck_assert_uint_eq(a->line, areas[i].line);
                ck_assert(a->has_max_speed_hz == STREQ(areas[i].name, "body"));
                ck_assert(a->has_max_duration_s == STREQ(areas[i].name, "body"));
        }
        const nd_area_limits *body = nd_limits_find_area(l, "body");
        ck_assert(body->max_speed_hz == 150);
        ck_assert_uint_eq(body->max_duration_s, 1800);
        ck_assert_ptr_null(nd_limits_find_area(l, "elbow"));
        ck_assert_ptr_null(nd_limits_find_area(l, NULL));

        ck_assert_uint_eq(l->lines.speed_hz, 3);
        ck_assert_uint_eq(l->lines.max_duration_s, 14);
        ck_assert_uint_eq(l->lines.allowed_needles, 19);
        ck_assert_str_eq(l->path, "limits.yaml");
        ck_assert_str_eq(nd_limits_display_name(l), "limits.yaml");

        char hex[ND_SHA256_HEX_SIZE];
        nd_sha256_hex(VALID_LIMITS, strlen(VALID_LIMITS), hex);
        ck_assert_str_eq(l->digest, hex);
}
END_TEST

START_TEST(test_shipped_limits_valid) {
        const char *root = getenv("NEEDLED_SOURCE_ROOT");
        ck_assert_msg(root, "NEEDLED_SOURCE_ROOT is not set");
        _cleanup_free_ char *path = NULL;
        ck_assert_int_ge(asprintf(&path, "%s/conf/limits.yaml", root), 0);

        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_limits_freep) nd_limits *l = NULL;
        int r = nd_limits_load_file(path, &l, &d);
        _cleanup_free_ char *text = dump(&d);
        ck_assert_msg(r == 0, "conf/limits.yaml refused:%s", text);

        /* The shipped defaults are formats.md's. */
        _cleanup_(nd_limits_freep) nd_limits *example = NULL;
        ck_assert_int_eq(nd_limits_load_data(VALID_LIMITS, strlen(VALID_LIMITS), NULL, &example, NULL), 0);
        ck_assert(memcmp(&l->pen, &example->pen, sizeof l->pen) == 0);
        ck_assert(memcmp(&l->session, &example->session, sizeof l->session) == 0);
        ck_assert_uint_eq(l->n_areas, example->n_areas);
        for (size_t i = 0; i < l->n_areas; i++) {
                ck_assert_str_eq(l->areas[i].name, example->areas[i].name);
                ck_assert(l->areas[i].max_depth_mm == example->areas[i].max_depth_mm);
        }

        /* The digest is of the file's bytes, and area lines point into the file. */
        char *data;
        size_t len;
        ck_assert_int_eq(nd_yaml_read_file(path, &data, &len), 0);
        char hex[ND_SHA256_HEX_SIZE];
        nd_sha256_hex(data, len, hex);
        ck_assert_str_eq(l->digest, hex);
        const char *cheeks = strstr(data, "\n  cheeks:");
        ck_assert_ptr_nonnull(cheeks);
        unsigned line = 2;
        for (const char *p = data; p < cheeks; p++)
                line += *p == '\n';
        ck_assert_uint_eq(nd_limits_find_area(l, "cheeks")->line, line);
        free(data);
}
END_TEST

typedef struct limits_case {
        const char *from;
        const char *to;
        const char *code;
        const char *field;
        unsigned line;
        unsigned column;
} limits_case;

/* One change to the valid example each, and the single problem it must produce. */
static const limits_case cases[] = {
        { "version: 1", "version: 2", "unsupported-version", "version", 1, 10 },
        { "version: 1", "version: \"1\"", "wrong-type", "version", 1, 10 },
        { "version: 1", "version: 1.0", "wrong-type", "version", 1, 10 },
        { "{min: 50, max: 150}", "{min: 160, max: 150}", "speed-min-above-max", "pen.speed_hz.min", 3, 19 },
        { "{min: 50, max: 150}", "{min: 50, max: 600}", "out-of-range", "pen.speed_hz.max", 3, 28 },
        { "{min: 50, max: 150}", "{min: 0, max: 150}", "out-of-range", "pen.speed_hz.min", 3, 19 },
        { "{min: 50, max: 150}", "{min: 50}", "missing-field", "pen.speed_hz.max", 3, 13 },
        { "{min: 50, max: 150}", "[50, 150]", "wrong-type", "pen.speed_hz", 3, 13 },
        { "depth_tolerance_mm: 0.15", "depth_tolerance_mm: 3.5", "depth-out-of-range", "pen.depth_tolerance_mm", 4, 23 },
        { "depth_tolerance_mm: 0.15", "depth_tolerance_mm: -0.1", "depth-out-of-range", "pen.depth_tolerance_mm", 4, 23 },
        { "warn_temperature_c: 41", "warn_temperature_c: \"41\"", "wrong-type", "pen.warn_temperature_c", 5, 23 },
        { "warn_temperature_c: 41", "warn_temperature_c: '41'", "wrong-type", "pen.warn_temperature_c", 5, 23 },
        { "warn_temperature_c: 41", "warn_temperature_c: 43", "warn-not-below-max", "pen.warn_temperature_c", 5, 23 },
        { "warn_temperature_c: 41", "warn_temperature_c: 25", "out-of-range", "pen.warn_temperature_c", 5, 23 },
        { "max_temperature_c: 43", "max_temperature_c: .inf", "not-finite", "pen.max_temperature_c", 6, 22 },
        { "max_temperature_c: 43", "max_temperature_c: -.Inf", "not-finite", "pen.max_temperature_c", 6, 22 },
        { "max_current_ma: 1200", "max_current_ma: .nan", "not-finite", "pen.max_current_ma", 7, 19 },
        { "max_current_ma: 1200", "max_current_ma: 20000", "out-of-range", "pen.max_current_ma", 7, 19 },
        { "max_current_ma: 1200", "max_current_ma: 0x4b0", "wrong-type", "pen.max_current_ma", 7, 19 },
        { "max_current_ma: 1200", "max_current_ma: 1e999", "out-of-range", "pen.max_current_ma", 7, 19 },
        { "max_current_ma: 1200", "max_current_ma:", "wrong-type", "pen.max_current_ma", 7, 3 },
        { "stall_speed_fraction: 0.7", "stall_speed_fraction: 1.0", "out-of-range", "pen.stall_speed_fraction", 8, 25 },
        { "stall_time_ms: 250", "stall_time_ms: 250.5", "wrong-type", "pen.stall_time_ms", 9, 18 },
        { "stall_time_ms: 250", "stall_time_ms: 0", "not-positive", "pen.stall_time_ms", 9, 18 },
        { "stall_time_ms: 250", "stall_time_ms: -5", "not-positive", "pen.stall_time_ms", 9, 18 },
        { "stall_time_ms: 250", "stall_time_ms: 99999999999999999999", "out-of-range", "pen.stall_time_ms", 9, 18 },
        { "min_battery_percent: 20", "min_battery_percent: 101", "out-of-range", "pen.min_battery_percent", 10, 24 },
        { "stop_battery_percent: 5", "stop_battery_percent: 20", "stop-not-below-min", "pen.stop_battery_percent", 11, 25 },
        { "heartbeat_timeout_ms: 500", "heartbeat_timeout_ms: 0", "out-of-range", "pen.heartbeat_timeout_ms", 12, 25 },
        { "heartbeat_timeout_ms: 500", "heartbeat_timeout_ms: 49", "out-of-range", "pen.heartbeat_timeout_ms", 12, 25 },
        { "heartbeat_timeout_ms: 500", "heartbeat_timeout_ms: 20000", "out-of-range", "pen.heartbeat_timeout_ms", 12, 25 },
        { "max_duration_s: 2700", "max_duration_s: 0", "not-positive", "session.max_duration_s", 14, 19 },
        { "max_duration_s: 2700", "max_duration_s: 20000", "out-of-range", "session.max_duration_s", 14, 19 },
        { "max_duration_s: 2700", "max_duration_s: 1000", "area-duration-above-session", "areas.body.max_duration_s", 30, 71 },
        { "client_heartbeat_timeout_ms: 0", "client_heartbeat_timeout_ms: -1", "out-of-range", "session.client_heartbeat_timeout_ms", 15, 32 },
        { "single_use: true", "single_use: yes", "wrong-type", "cartridge.single_use", 17, 15 },
        { "single_use: true", "single_use: on", "wrong-type", "cartridge.single_use", 17, 15 },
        { "single_use: true", "single_use: \"true\"", "wrong-type", "cartridge.single_use", 17, 15 },
        { "single_use: true", "single_use: True", "wrong-type", "cartridge.single_use", 17, 15 },
        { "max_runtime_s: 3600", "max_runtime_s: 0", "not-positive", "cartridge.max_runtime_s", 18, 18 },
        { "allowed_needles: [12, 14, 16, 24, 36, 42]", "allowed_needles: []", "no-allowed-needles", "cartridge.allowed_needles", 19, 20 },
        { "allowed_needles: [12, 14, 16, 24, 36, 42]", "allowed_needles: [12, 14, 12]", "duplicate-needles", "cartridge.allowed_needles", 19, 29 },
        { "allowed_needles: [12, 14, 16, 24, 36, 42]", "allowed_needles: [0, 14]", "needles-not-positive", "cartridge.allowed_needles", 19, 21 },
        { "allowed_needles: [12, 14, 16, 24, 36, 42]", "allowed_needles: [12, 14.5]", "wrong-type", "cartridge.allowed_needles", 19, 25 },
        { "allowed_needles: [12, 14, 16, 24, 36, 42]", "allowed_needles: 12", "wrong-type", "cartridge.allowed_needles", 19, 20 },
        { "allowed_needles: [12, 14, 16, 24, 36, 42]", "allowed_needles: [12, 5000]", "out-of-range", "cartridge.allowed_needles", 19, 25 },
        { "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_depth_mm: 3.5}", "depth-out-of-range", "areas.cheeks.max_depth_mm", 25, 31 },
        { "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_depth_mm: 0}", "depth-out-of-range", "areas.cheeks.max_depth_mm", 25, 31 },
        { "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_depth_mm: .NaN}", "not-finite", "areas.cheeks.max_depth_mm", 25, 31 },
        { "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_speed_hz: 100}", "missing-field", "areas.cheeks.max_depth_mm", 25, 16 },
        { "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_depth_mm: 1.5, colour: red}", "unknown-field", "areas.cheeks.colour", 25, 36 },
        { "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_depth_mm: 1.5, max_depth_mm: 1.0}", "duplicate-key", "areas.cheeks.max_depth_mm", 25, 36 },
        { "cheeks:      {max_depth_mm: 1.5}", "cheeks:      1.5", "wrong-type", "areas.cheeks", 25, 16 },
        { "cheeks:", "Cheeks:", "invalid-area-name", "areas", 25, 3 },
        { "cheeks:", "left cheek:", "invalid-area-name", "areas", 25, 3 },
        /* the later of the two is the duplicate */
        { "cheeks:", "neck:", "duplicate-key", "areas.neck", 27, 3 },
        { "max_speed_hz: 150", "max_speed_hz: 160", "area-speed-outside-pen", "areas.body.max_speed_hz", 30, 50 },
        { "max_speed_hz: 150", "max_speed_hz: 40", "area-speed-outside-pen", "areas.body.max_speed_hz", 30, 50 },
        { "max_speed_hz: 150", "max_speed_hz: 900", "out-of-range", "areas.body.max_speed_hz", 30, 50 },
        { "max_duration_s: 1800", "max_duration_s: 0", "not-positive", "areas.body.max_duration_s", 30, 71 },
        { "max_duration_s: 1800", "max_duration_s: 1800.5", "wrong-type", "areas.body.max_duration_s", 30, 71 },
        { "  max_current_ma: 1200\n", "  max_current_ma: 1200\n  bogus: 1\n", "unknown-field", "pen.bogus", 8, 3 },
        { "  max_current_ma: 1200\n", "  max_current_ma: 1200\n  max_current_ma: 1000\n", "duplicate-key", "pen.max_current_ma", 8, 3 },
        { "  max_current_ma: 1200\n", "", "missing-field", "pen.max_current_ma", 3, 3 },
        { "session:\n  max_duration_s: 2700\n  client_heartbeat_timeout_ms: 0\n", "", "missing-field", "session", 1, 1 },
        { "version: 1\n", "", "missing-field", "version", 1, 1 },
        { "version: 1\n", "version: 1\nversion: 1\n", "duplicate-key", "version", 2, 1 },
        { "version: 1\n", "version: 1\nVersion: 1\n", "unknown-field", "Version", 2, 1 },
};

START_TEST(test_single_violation) {
        const limits_case *c = &cases[_i];
        _cleanup_free_ char *text = mutate(VALID_LIMITS, c->from, c->to);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = (nd_limits *) 1;
        int r = nd_limits_load_data(text, strlen(text), "limits.yaml", &l, &d);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(r == -EINVAL, "case %d ('%s' -> '%s') accepted", _i, c->from, c->to);
        ck_assert_ptr_null(l);
        ck_assert_msg(nd_diags_count(&d) == 1, "case %d ('%s' -> '%s'): %zu problems:%s", _i, c->from, c->to,
                      nd_diags_count(&d), got);
        assert_diag(&d.items[0], "limits.yaml", c->line, c->column, c->field, c->code);
}
END_TEST

START_TEST(test_all_at_once) {
        static const char text[] =
                "version: 2\n"
                "pen:\n"
                "  speed_hz: {min: 160, max: 150}\n"
                "  depth_tolerance_mm: 3.5\n"
                "  warn_temperature_c: \"41\"\n"
                "  max_temperature_c: 43\n"
                "  max_current_ma: .nan\n"
                "  stall_speed_fraction: 0.7\n"
                "  stall_time_ms: 250.5\n"
                "  min_battery_percent: 5\n"
                "  stop_battery_percent: 5\n"
                "  heartbeat_timeout_ms: 0\n"
                "  bogus: 1\n"
                "session:\n"
                "  max_duration_s: 2700\n"
                "cartridge:\n"
                "  single_use: yes\n"
                "  max_runtime_s: 3600\n"
                "  allowed_needles: [12, 12, 0]\n"
                "areas:\n"
                "  Cheeks: {max_depth_mm: 1.5}\n"
                "  body: {max_depth_mm: 0, max_speed_hz: 200, max_duration_s: 3000}\n"
                "  neck: {max_depth_mm: 1.0}\n"
                "  neck: {max_depth_mm: 1.0}\n";
        static const struct { unsigned line, column; const char *field, *code; } expected[] = {
                { 1, 10, "version", "unsupported-version" },
                { 3, 19, "pen.speed_hz.min", "speed-min-above-max" },
                { 4, 23, "pen.depth_tolerance_mm", "depth-out-of-range" },
                { 5, 23, "pen.warn_temperature_c", "wrong-type" },
                { 7, 19, "pen.max_current_ma", "not-finite" },
                { 9, 18, "pen.stall_time_ms", "wrong-type" },
                { 11, 25, "pen.stop_battery_percent", "stop-not-below-min" },
                { 12, 25, "pen.heartbeat_timeout_ms", "out-of-range" },
                { 13, 3, "pen.bogus", "unknown-field" },
                { 15, 3, "session.client_heartbeat_timeout_ms", "missing-field" },
                { 17, 15, "cartridge.single_use", "wrong-type" },
                { 19, 25, "cartridge.allowed_needles", "duplicate-needles" },
                { 19, 29, "cartridge.allowed_needles", "needles-not-positive" },
                { 21, 3, "areas", "invalid-area-name" },
                { 22, 24, "areas.body.max_depth_mm", "depth-out-of-range" },
                { 22, 62, "areas.body.max_duration_s", "area-duration-above-session" },
                { 24, 3, "areas.neck", "duplicate-key" },
        };
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = NULL;
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), "/etc/needled/limits.yaml", &l, &d), -EINVAL);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(nd_diags_count(&d) == ELEMENTSOF(expected), "%zu problems:%s", nd_diags_count(&d), got);
        for (size_t i = 0; i < ELEMENTSOF(expected); i++)
                assert_diag(&d.items[i], "/etc/needled/limits.yaml", expected[i].line, expected[i].column,
                            expected[i].field, expected[i].code);

        /* Messages name the value and the limit. */
        const nd_diag *g = nd_diags_find(&d, "area-duration-above-session", NULL);
        ck_assert_str_eq(g->value, "3000");
        ck_assert_str_eq(g->limit, "2700 s");
        ck_assert_msg(strstr(g->message, "3000") && strstr(g->message, "2700"), "%s", g->message);
        g = nd_diags_find(&d, "depth-out-of-range", "pen.depth_tolerance_mm");
        ck_assert_str_eq(g->value, "3.5");
        ck_assert_str_eq(g->limit, "0 to 3 mm");
        g = nd_diags_find(&d, "duplicate-key", NULL);
        ck_assert_msg(strstr(g->message, "line 23"), "%s", g->message);
}
END_TEST

START_TEST(test_no_areas) {
        const char *areas = strstr(VALID_LIMITS, "areas:");
        _cleanup_free_ char *text = NULL;
        ck_assert_int_ge(asprintf(&text, "%.*sareas: {}\n", (int) (areas - VALID_LIMITS), VALID_LIMITS), 0);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = NULL;
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), "l.yaml", &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "l.yaml", 20, 8, "areas", "no-areas");

        free(text);
        ck_assert_int_ge(asprintf(&text, "%.*sareas: [cheeks]\n", (int) (areas - VALID_LIMITS), VALID_LIMITS), 0);
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), "l.yaml", &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "l.yaml", 20, 8, "areas", "wrong-type");
}
END_TEST

START_TEST(test_section_not_mapping) {
        _cleanup_free_ char *text = mutate(VALID_LIMITS,
                                           "session:\n  max_duration_s: 2700\n  client_heartbeat_timeout_ms: 0\n",
                                           "session: 2700\n");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = NULL;
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), "l.yaml", &l, &d), -EINVAL);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(nd_diags_count(&d) == 1, "%s", got);
        assert_diag(&d.items[0], "l.yaml", 13, 10, "session", "wrong-type");
}
END_TEST

START_TEST(test_document_not_mapping) {
        static const struct { const char *text; unsigned line, column; } docs[] = {
                { "", 1, 1 }, { "# nothing\n", 1, 1 }, { "- version: 1\n", 1, 1 }, { "\n\n42\n", 3, 1 },
                { "---\n", 2, 1 }, /* libyaml puts an empty document's null after it */
        };
        for (size_t i = 0; i < ELEMENTSOF(docs); i++) {
                _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
                nd_limits *l = NULL;
                ck_assert_int_eq(nd_limits_load_data(docs[i].text, strlen(docs[i].text), "l.yaml", &l, &d), -EINVAL);
                ck_assert_uint_eq(nd_diags_count(&d), 1);
                assert_diag(&d.items[0], "l.yaml", docs[i].line, docs[i].column, "", "not-a-mapping");
        }
}
END_TEST

START_TEST(test_yaml_syntax) {
        _cleanup_free_ char *text = mutate(VALID_LIMITS, "  max_current_ma: 1200\n", "  max_current_ma: [1200\n");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = NULL;
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), "l.yaml", &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "l.yaml", 8, 23, "", "yaml-syntax");
        ck_assert_msg(strstr(d.items[0].message, "line 8, column 23"), "%s", d.items[0].message);
}
END_TEST

START_TEST(test_hostile) {
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = NULL;

        static const char bomb[] = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                                   "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n";
        ck_assert_int_eq(nd_limits_load_data(bomb, strlen(bomb), "l.yaml", &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "l.yaml", 1, 4, "", "yaml-syntax");

        size_t big_len = 2u * 1024 * 1024;
        _cleanup_free_ char *big = malloc(big_len);
        memset(big, ' ', big_len);
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_limits_load_data(big, big_len, "l.yaml", &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "l.yaml", 0, 0, "", "yaml-syntax");

        _cleanup_free_ char *nul = strdup(VALID_LIMITS);
        nul[strstr(nul, "1200") - nul] = '\0';
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_limits_load_data(nul, strlen(VALID_LIMITS), "l.yaml", &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "l.yaml", 7, 19, "", "yaml-syntax");
        ck_assert_msg(strstr(d.items[0].message, "NUL"), "%s", d.items[0].message);

        size_t depth = 10000;
        _cleanup_free_ char *deep = malloc(2 * depth + 1);
        memset(deep, '[', depth);
        memset(deep + depth, ']', depth);
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_limits_load_data(deep, 2 * depth, "l.yaml", &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "l.yaml", 1, ND_YAML_MAX_DEPTH + 1, "", "yaml-syntax");
        ck_assert_ptr_null(l);
}
END_TEST

START_TEST(test_file_errors) {
        char dir[] = "/tmp/test-limits-XXXXXX";
        ck_assert_ptr_nonnull(mkdtemp(dir));
        char path[300];
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = (nd_limits *) 1;

        snprintf(path, sizeof path, "%s/missing.yaml", dir);
        ck_assert_int_eq(nd_limits_load_file(path, &l, &d), -ENOENT);
        ck_assert_ptr_null(l);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], path, 0, 0, "", "unreadable");
        ck_assert_msg(strstr(d.items[0].message, path) && strstr(d.items[0].message, strerror(ENOENT)), "%s",
                      d.items[0].message);

        nd_diags_clear(&d);
        ck_assert_int_eq(nd_limits_load_file(dir, &l, &d), -EISDIR);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        ck_assert_msg(strstr(d.items[0].message, strerror(EISDIR)), "%s", d.items[0].message);

        if (geteuid() != 0) {
                snprintf(path, sizeof path, "%s/secret.yaml", dir);
                int fd = open(path, O_CREAT | O_WRONLY, 0);
                ck_assert_int_ge(fd, 0);
                close(fd);
                nd_diags_clear(&d);
                ck_assert_int_eq(nd_limits_load_file(path, &l, &d), -EACCES);
                ck_assert_msg(strstr(d.items[0].message, strerror(EACCES)), "%s", d.items[0].message);
                unlink(path);
        }

        /* A valid file: path and digest kept. */
        snprintf(path, sizeof path, "%s/limits.yaml", dir);
        FILE *f = fopen(path, "w");
        fputs(VALID_LIMITS, f);
        fclose(f);
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_limits_load_file(path, &l, &d), 0);
        ck_assert_str_eq(l->path, path);
        char hex[ND_SHA256_HEX_SIZE];
        nd_sha256_hex(VALID_LIMITS, strlen(VALID_LIMITS), hex);
        ck_assert_str_eq(l->digest, hex);
        nd_limits_free(l);
        unlink(path);
        rmdir(dir);
}
END_TEST

START_TEST(test_data_without_file_name) {
        _cleanup_free_ char *text = mutate(VALID_LIMITS, "max_current_ma: 1200", "max_current_ma: 0");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_limits *l = NULL;
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), NULL, &l, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        ck_assert_ptr_null(d.items[0].file);
        _cleanup_free_ char *line = nd_diag_format(&d.items[0]);
        ck_assert_str_eq(line, "<data>:7:19: pen.max_current_ma: pen.max_current_ma 0 is outside the allowed range 1 to 10000 mA");
        /* Without a list, the verdict alone. */
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), NULL, &l, NULL), -EINVAL);
}
END_TEST

static nd_limits *example_limits(void) {
        nd_limits *l = NULL;
        ck_assert_int_eq(nd_limits_load_data(VALID_LIMITS, strlen(VALID_LIMITS), "/etc/needled/limits.yaml", &l, NULL), 0);
        return l;
}

START_TEST(test_check_depth) {
        _cleanup_(nd_limits_freep) nd_limits *l = example_limits();
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;

        ck_assert_int_eq(nd_limits_check_depth(l, "cheeks", 1.5, &d), 0);
        ck_assert_int_eq(nd_limits_check_depth(l, "cheeks", 0.05, &d), 0);
        ck_assert_int_eq(nd_limits_check_depth(l, "periorbital", 0.5, &d), 0);
        ck_assert_uint_eq(nd_diags_count(&d), 0);

        ck_assert_int_eq(nd_limits_check_depth(l, "cheeks", 2.0, &d), -ERANGE);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], NULL, 0, 0, "depth_mm", "above-area-max");
        ck_assert_str_eq(d.items[0].message, "depth_mm 2 exceeds the 1.5 mm maximum for area cheeks (limits.yaml line 25)");
        ck_assert_str_eq(d.items[0].value, "2");
        ck_assert_str_eq(d.items[0].limit, "1.5");

        nd_diags_clear(&d);
        ck_assert_int_eq(nd_limits_check_depth(l, "periorbital", 0.55, &d), -ERANGE);
        ck_assert_str_eq(d.items[0].code, "above-area-max");
        ck_assert_int_eq(nd_limits_check_depth(l, "cheeks", 0, &d), -ERANGE);
        ck_assert_str_eq(d.items[1].code, "out-of-range");
        ck_assert_int_eq(nd_limits_check_depth(l, "cheeks", -1, &d), -ERANGE);
        ck_assert_str_eq(d.items[2].code, "out-of-range");
        ck_assert_int_eq(nd_limits_check_depth(l, "cheeks", NAN, &d), -ERANGE);
        ck_assert_str_eq(d.items[3].code, "not-finite");
        ck_assert_int_eq(nd_limits_check_depth(l, "cheeks", INFINITY, &d), -ERANGE);
        ck_assert_str_eq(d.items[4].code, "not-finite");
        ck_assert_int_eq(nd_limits_check_depth(l, "elbow", 0.1, &d), -ERANGE);
        ck_assert_str_eq(d.items[5].code, "unknown-area");
        ck_assert_str_eq(d.items[5].field, "area");
        ck_assert_int_eq(nd_limits_check_depth(l, NULL, 0.1, &d), -ERANGE);
        ck_assert_str_eq(d.items[6].code, "unknown-area");
}
END_TEST

START_TEST(test_check_speed) {
        _cleanup_(nd_limits_freep) nd_limits *l = NULL;
        _cleanup_free_ char *text = mutate(VALID_LIMITS, "max_speed_hz: 150", "max_speed_hz: 120");
        ck_assert_int_eq(nd_limits_load_data(text, strlen(text), "limits.yaml", &l, NULL), 0);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;

        ck_assert_int_eq(nd_limits_check_speed(l, "cheeks", 50, &d), 0);
        ck_assert_int_eq(nd_limits_check_speed(l, "cheeks", 150, &d), 0);
        ck_assert_int_eq(nd_limits_check_speed(l, "body", 120, &d), 0);
        ck_assert_uint_eq(nd_diags_count(&d), 0);

        ck_assert_int_eq(nd_limits_check_speed(l, "cheeks", 151, &d), -ERANGE);
        assert_diag(&d.items[0], NULL, 0, 0, "speed_hz", "speed-out-of-range");
        ck_assert_str_eq(d.items[0].message, "speed_hz 151 is outside the allowed 50 to 150 Hz for area cheeks (limits.yaml line 3)");
        ck_assert_int_eq(nd_limits_check_speed(l, "cheeks", 49.5, &d), -ERANGE);
        ck_assert_str_eq(d.items[1].code, "speed-out-of-range");
        /* The area's own, tighter maximum. */
        ck_assert_int_eq(nd_limits_check_speed(l, "body", 121, &d), -ERANGE);
        ck_assert_str_eq(d.items[2].message, "speed_hz 121 is outside the allowed 50 to 120 Hz for area body (limits.yaml line 30)");
        ck_assert_str_eq(d.items[2].limit, "50 to 120 Hz");
        ck_assert_int_eq(nd_limits_check_speed(l, "body", NAN, &d), -ERANGE);
        ck_assert_str_eq(d.items[3].code, "not-finite");
        ck_assert_int_eq(nd_limits_check_speed(l, "knee", 100, &d), -ERANGE);
        ck_assert_str_eq(d.items[4].code, "unknown-area");
        ck_assert_uint_eq(nd_diags_count(&d), 5);
}
END_TEST

START_TEST(test_area_checks) {
        _cleanup_(nd_limits_freep) nd_limits *l = example_limits();
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        const nd_area_limits *body = nd_limits_find_area(l, "body"), *neck = nd_limits_find_area(l, "neck");
        nd_limits_at at = { "p.yaml", 7, 13, "2000" };

        ck_assert_int_eq(nd_limits_area_check_duration(l, body, 1800, NULL, &d), 0);
        ck_assert_int_eq(nd_limits_area_check_duration(l, neck, 2700, NULL, &d), 0);
        ck_assert_int_eq(nd_limits_area_check_duration(l, body, 2000, &at, &d), -ERANGE);
        assert_diag(&d.items[0], "p.yaml", 7, 13, "duration_s", "above-duration-max");
        ck_assert_str_eq(d.items[0].message, "duration_s 2000 exceeds the 1800 s maximum for area body (limits.yaml line 30)");
        ck_assert_int_eq(nd_limits_area_check_duration(l, neck, 2701, NULL, &d), -ERANGE);
        ck_assert_str_eq(d.items[1].message, "duration_s 2701 exceeds the 2700 s session maximum (limits.yaml line 14)");
        ck_assert_int_eq(nd_limits_area_check_duration(l, NULL, 2701, NULL, &d), -ERANGE);

        ck_assert_int_eq(nd_limits_check_needles(l, 36, NULL, &d), 0);
        ck_assert_int_eq(nd_limits_check_needles(l, 20, NULL, &d), -ERANGE);
        ck_assert_str_eq(d.items[3].code, "needles-not-allowed");
        ck_assert_str_eq(d.items[3].message, "needles 20 is not an allowed cartridge; allowed: 12, 14, 16, 24, 36, 42 (limits.yaml line 19)");

        ck_assert_int_eq(nd_limits_area_check_depth(l, neck, 1.0, NULL, &d), 0);
        ck_assert_int_eq(nd_limits_area_check_depth(l, neck, 1.0000001, NULL, &d), -ERANGE);
        ck_assert_uint_eq(nd_diags_count(&d), 5);
        ck_assert(nd_limits_area_max_speed_hz(l, body) == 150);
        ck_assert_uint_eq(nd_limits_area_max_duration_s(l, body), 1800);
        ck_assert_uint_eq(nd_limits_area_max_duration_s(l, neck), 2700);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("limits");
        TCase *tc = tcase_create("load");
        tcase_add_test(tc, test_example_is_valid);
        tcase_add_test(tc, test_shipped_limits_valid);
        tcase_add_loop_test(tc, test_single_violation, 0, ELEMENTSOF(cases));
        tcase_add_test(tc, test_all_at_once);
        tcase_add_test(tc, test_no_areas);
        tcase_add_test(tc, test_section_not_mapping);
        tcase_add_test(tc, test_document_not_mapping);
        tcase_add_test(tc, test_yaml_syntax);
        tcase_add_test(tc, test_hostile);
        tcase_add_test(tc, test_file_errors);
        tcase_add_test(tc, test_data_without_file_name);
        suite_add_tcase(s, tc);

        tc = tcase_create("checks");
        tcase_add_test(tc, test_check_depth);
        tcase_add_test(tc, test_check_speed);
        tcase_add_test(tc, test_area_checks);
        suite_add_tcase(s, tc);
        return s;
}
