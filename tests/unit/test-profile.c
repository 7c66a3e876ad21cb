/* test-profile.c: treatment profiles: every rule, every position, all at once; pen checks;
 * the profiles directory; the shipped profiles. */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check-main.h"
#include "diag.h"
#include "digest.h"
#include "dose.h"
#include "limits-test.h"
#include "profile.h"
#include "safety-limits.h"
#include "util.h"
#include "yamltree.h"

/* tests/data/limits-test.yaml: the example of formats.md (cheeks is on line 25, body on 30). */
static const char LIMITS[] = ND_TEST_LIMITS_YAML;

/* The profile example of formats.md. */
static const char PROFILE[] =
        "name: acne-scars-cheeks\n"
        "indication: acne-scars\n"
        "area: cheeks\n"
        "depth_mm: 1.25\n"
        "speed_hz: 120\n"
        "duration_s: 900\n"
        "needles: 12\n"
        "notes: \"Three passes, cross-hatched.\"\n"
        "aftercare:\n"
        "  - No make-up for 24 hours\n"
        "  - SPF 30+ and no direct sun for 7 days\n";

/* What the simulated pen can do (dbus-api.md). */
static const nd_pen_caps SIM_PEN = { 0.0, 2.5, 0.05, 25, 150 };

static nd_limits *limits;

static void setup(void) {
        ck_assert_int_eq(nd_limits_load_data(LIMITS, strlen(LIMITS), "/etc/needled/limits.yaml", &limits, NULL), 0);
}

static void teardown(void) {
        nd_limits_free(limits);
        limits = NULL;
}

static char *mutate(const char *text, const char *from, const char *to) {
        const char *at = strstr(text, from);
        ck_assert_msg(at, "'%s' not in the text", from);
        char *out = NULL;
        ck_assert_int_ge(asprintf(&out, "%.*s%s%s", (int) (at - text), text, to, at + strlen(from)), 0);
        return out;
}

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
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        int r = nd_profile_parse(PROFILE, strlen(PROFILE), "acne.yaml", limits, &p, &d);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(r == 0, "refused:%s", got);
        ck_assert_uint_eq(nd_diags_count(&d), 0);
        ck_assert(p->valid);
        ck_assert(p->has_name && p->has_indication && p->has_area && p->has_depth_mm && p->has_speed_hz &&
                  p->has_duration_s && p->has_needles && p->has_notes && p->has_aftercare);
        ck_assert_str_eq(p->name, "acne-scars-cheeks");
        ck_assert_str_eq(p->indication, "acne-scars");
        ck_assert_str_eq(p->area, "cheeks");
        ck_assert(p->depth_mm == 1.25);
        ck_assert(p->speed_hz == 120);
        ck_assert_uint_eq(p->duration_s, 900);
        ck_assert_uint_eq(p->needles, 12);
        ck_assert_str_eq(p->notes, "Three passes, cross-hatched.");
        ck_assert_uint_eq(p->n_aftercare, 2);
        ck_assert_str_eq(p->aftercare[0], "No make-up for 24 hours");
        ck_assert_str_eq(p->aftercare[1], "SPF 30+ and no direct sun for 7 days");
        ck_assert_uint_eq(p->name_line, 1);
        ck_assert_uint_eq(p->name_column, 7);
        char hex[ND_SHA256_HEX_SIZE];
        nd_sha256_hex(PROFILE, strlen(PROFILE), hex);
        ck_assert_str_eq(p->digest, hex);
}
END_TEST

START_TEST(test_optional_keys_and_limits_edges) {
        /* No notes, no aftercare, every value exactly at its limit. */
        static const char text[] =
                "name: x\nindication: other\narea: body\ndepth_mm: 2.0\nspeed_hz: 150\nduration_s: 1800\nneedles: 42\n";
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), NULL, limits, &p, &d), 0);
        ck_assert(!p->has_notes && !p->has_aftercare);
        ck_assert_ptr_null(p->notes);
        ck_assert_uint_eq(p->n_aftercare, 0);

        /* An empty aftercare list is fine too. */
        _cleanup_free_ char *empty = mutate(PROFILE, "aftercare:\n  - No make-up for 24 hours\n  - SPF 30+ and no direct sun for 7 days\n",
                                            "aftercare: []\n");
        nd_profile *q = NULL;
        ck_assert_int_eq(nd_profile_parse(empty, strlen(empty), NULL, limits, &q, &d), 0);
        ck_assert(q->has_aftercare);
        ck_assert_uint_eq(q->n_aftercare, 0);
        nd_profile_free(q);
}
END_TEST

typedef struct profile_case {
        const char *from;
        const char *to;
        const char *code;
        const char *field;
        unsigned line;
        unsigned column;
} profile_case;

/* One change to the valid example each, and the single violation it must produce. */
static const profile_case cases[] = {
        { "name: acne-scars-cheeks",
          "name: Acne Scars", "invalid-name", "name", 1, 7 },
        { "name: acne-scars-cheeks",
          "name: acne_scars", "invalid-name", "name", 1, 7 },
        { "name: acne-scars-cheeks",
          "name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "invalid-name", "name", 1, 7 },
        { "name: acne-scars-cheeks",
          "name: ''", "invalid-name", "name", 1, 7 },
        { "name: acne-scars-cheeks",
          "name: [a]", "wrong-type", "name", 1, 7 },
        { "name: acne-scars-cheeks",
          "name:", "wrong-type", "name", 1, 1 },
        { "indication: acne-scars",
          "indication: wrinkles", "unknown-indication", "indication", 2, 13 },
        { "indication: acne-scars",
          "indication: Acne-Scars", "unknown-indication", "indication", 2, 13 },
        { "indication: acne-scars",
          "indication: {a: b}", "wrong-type", "indication", 2, 13 },
        { "area: cheeks",
          "area: elbow", "unknown-area", "area", 3, 7 },
        { "area: cheeks",
          "area: ~", "wrong-type", "area", 3, 7 },
        { "depth_mm: 1.25",
          "depth_mm: 2.0", "above-area-max", "depth_mm", 4, 11 },
        { "depth_mm: 1.25",
          "depth_mm: 1.5000001", "above-area-max", "depth_mm", 4, 11 },
        { "depth_mm: 1.25",
          "depth_mm: 0", "out-of-range", "depth_mm", 4, 11 },
        { "depth_mm: 1.25",
          "depth_mm: -1", "out-of-range", "depth_mm", 4, 11 },
        { "depth_mm: 1.25",
          "depth_mm: .nan", "not-finite", "depth_mm", 4, 11 },
        { "depth_mm: 1.25",
          "depth_mm: \"1.25\"", "wrong-type", "depth_mm", 4, 11 },
        { "depth_mm: 1.25",
          "depth_mm: 1,25", "wrong-type", "depth_mm", 4, 11 },
        { "speed_hz: 120",
          "speed_hz: 160", "speed-out-of-range", "speed_hz", 5, 11 },
        { "speed_hz: 120",
          "speed_hz: 40", "speed-out-of-range", "speed_hz", 5, 11 },
        { "speed_hz: 120",
          "speed_hz: 0", "out-of-range", "speed_hz", 5, 11 },
        { "speed_hz: 120",
          "speed_hz: -.inf", "not-finite", "speed_hz", 5, 11 },
        { "speed_hz: 120",
          "speed_hz: '120'", "wrong-type", "speed_hz", 5, 11 },
        { "duration_s: 900",
          "duration_s: 3000", "above-duration-max", "duration_s", 6, 13 },
        { "duration_s: 900",
          "duration_s: 900.5", "wrong-type", "duration_s", 6, 13 },
        { "duration_s: 900",
          "duration_s: 0", "out-of-range", "duration_s", 6, 13 },
        { "duration_s: 900",
          "duration_s: -5", "out-of-range", "duration_s", 6, 13 },
        { "duration_s: 900",
          "duration_s: 99999999999", "out-of-range", "duration_s", 6, 13 },
        { "duration_s: 900",
          "duration_s: 99999999999999999999", "out-of-range", "duration_s", 6, 13 },
        { "needles: 12",
          "needles: 20", "needles-not-allowed", "needles", 7, 10 },
        { "needles: 12",
          "needles: 12.0", "wrong-type", "needles", 7, 10 },
        { "needles: 12",
          "needles: 0", "out-of-range", "needles", 7, 10 },
        { "needles: 12",
          "needles: twelve", "wrong-type", "needles", 7, 10 },
        { "notes: \"Three passes, cross-hatched.\"",
          "notes: nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn", "out-of-range", "notes", 8, 8 },
        { "notes: \"Three passes, cross-hatched.\"",
          "notes: [a, b]", "wrong-type", "notes", 8, 8 },
        { "notes: \"Three passes, cross-hatched.\"",
          "notes:", "wrong-type", "notes", 8, 1 },
        { "aftercare:\n  - No make-up for 24 hours\n  - SPF 30+ and no direct sun for 7 days\n",
          "aftercare: none\n", "wrong-type", "aftercare", 9, 12 },
        { "  - No make-up for 24 hours\n",
          "  - [nested]\n", "wrong-type", "aftercare", 10, 5 },
        { "  - No make-up for 24 hours\n",
          "  - xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n", "out-of-range", "aftercare", 10, 5 },
        { "  - No make-up for 24 hours\n",
          "  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n  - item\n", "out-of-range", "aftercare", 10, 3 },
        { "needles: 12\n",
          "needles: 12\ncolour: red\n", "unknown-field", "colour", 8, 1 },
        { "needles: 12\n",
          "needles: 12\nneedles: 14\n", "duplicate-key", "needles", 8, 1 },
        { "needles: 12\n",
          "", "missing-field", "needles", 1, 1 },
        { "name: acne-scars-cheeks\n",
          "", "missing-field", "name", 1, 1 },
};

START_TEST(test_single_violation) {
        const profile_case *c = &cases[_i];
        _cleanup_free_ char *text = mutate(PROFILE, c->from, c->to);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        int r = nd_profile_parse(text, strlen(text), "p.yaml", limits, &p, &d);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(r == -EINVAL, "case %d ('%s' -> '%s') accepted", _i, c->from, c->to);
        ck_assert_msg(nd_diags_count(&d) == 1, "case %d ('%s' -> '%s'): %zu violations:%s", _i, c->from, c->to,
                      nd_diags_count(&d), got);
        assert_diag(&d.items[0], "p.yaml", c->line, c->column, c->field, c->code);
        /* Still a profile, with what could be read, marked invalid. */
        ck_assert_ptr_nonnull(p);
        ck_assert(!p->valid);
        ck_assert(p->has_area == !STREQ(c->field, "area") || STREQ(c->code, "unknown-area"));
}
END_TEST

START_TEST(test_messages) {
        _cleanup_free_ char *text = mutate(PROFILE, "depth_mm: 1.25", "depth_mm: 2.0");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), NULL, limits, &p, &d), -EINVAL);
        ck_assert_str_eq(d.items[0].message, "depth_mm 2.0 exceeds the 1.5 mm maximum for area cheeks (limits.yaml line 25)");
        ck_assert_str_eq(d.items[0].value, "2.0");
        ck_assert_str_eq(d.items[0].limit, "1.5");
        ck_assert(p->has_depth_mm && p->depth_mm == 2.0);

        /* The joined form is what InvalidProfile carries. */
        _cleanup_free_ char *joined = nd_diags_join(&d, "; ");
        ck_assert_str_eq(joined, d.items[0].message);
}
END_TEST

START_TEST(test_area_tightens) {
        /* body: max 1800 s of its own; speed stays within the pen's 150. */
        _cleanup_free_ char *a = mutate(PROFILE, "area: cheeks", "area: body");
        _cleanup_free_ char *text = mutate(a, "duration_s: 900", "duration_s: 2000");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), "b.yaml", limits, &p, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "b.yaml", 6, 13, "duration_s", "above-duration-max");
        ck_assert_str_eq(d.items[0].message, "duration_s 2000 exceeds the 1800 s maximum for area body (limits.yaml line 30)");

        /* A tighter area speed. */
        nd_limits *tight = NULL;
        _cleanup_free_ char *lt = mutate(LIMITS, "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_depth_mm: 1.5, max_speed_hz: 100}");
        ck_assert_int_eq(nd_limits_load_data(lt, strlen(lt), "limits.yaml", &tight, NULL), 0);
        nd_diags_clear(&d);
        nd_profile *q = NULL;
        ck_assert_int_eq(nd_profile_parse(PROFILE, strlen(PROFILE), "c.yaml", tight, &q, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], "c.yaml", 5, 11, "speed_hz", "speed-out-of-range");
        ck_assert_str_eq(d.items[0].limit, "50 to 100 Hz");
        nd_profile_free(q);
        nd_limits_free(tight);
}
END_TEST

START_TEST(test_all_at_once) {
        static const char text[] =
                "name: Bad Name\n"
                "indication: wrinkles\n"
                "area: cheeks\n"
                "depth_mm: 2.0\n"
                "speed_hz: 200\n"
                "duration_s: 3000\n"
                "needles: 20\n"
                "colour: red\n"
                "depth_mm: 1.0\n"
                "aftercare: [ok, [bad]]\n";
        static const struct { unsigned line, column; const char *field, *code; } expected[] = {
                { 1, 7, "name", "invalid-name" },
                { 2, 13, "indication", "unknown-indication" },
                { 4, 11, "depth_mm", "above-area-max" },
                { 5, 11, "speed_hz", "speed-out-of-range" },
                { 6, 13, "duration_s", "above-duration-max" },
                { 7, 10, "needles", "needles-not-allowed" },
                { 8, 1, "colour", "unknown-field" },
                { 9, 1, "depth_mm", "duplicate-key" },
                { 10, 17, "aftercare", "wrong-type" },
        };
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), "all.yaml", limits, &p, &d), -EINVAL);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(nd_diags_count(&d) == ELEMENTSOF(expected), "%zu violations:%s", nd_diags_count(&d), got);
        for (size_t i = 0; i < ELEMENTSOF(expected); i++)
                assert_diag(&d.items[i], "all.yaml", expected[i].line, expected[i].column, expected[i].field,
                            expected[i].code);
        /* The first depth_mm is the one read. */
        ck_assert(p->depth_mm == 2.0);
        ck_assert(!p->has_aftercare);
        ck_assert_uint_eq(p->n_aftercare, 1);
}
END_TEST

START_TEST(test_no_limits) {
        _cleanup_free_ char *a = mutate(PROFILE, "depth_mm: 1.25", "depth_mm: 5.0");
        _cleanup_free_ char *text = mutate(a, "needles: 12\n", "");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), "n.yaml", NULL, &p, &d), -EINVAL);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(nd_diags_count(&d) == 3, "%s", got);
        assert_diag(&d.items[0], "n.yaml", 0, 0, "", "no-limits");
        assert_diag(&d.items[1], "n.yaml", 1, 1, "needles", "missing-field");
        assert_diag(&d.items[2], "n.yaml", 4, 11, "depth_mm", "out-of-range");
        ck_assert_ptr_nonnull(p);

        /* A profile that is fine in itself still is not valid without limits. */
        nd_diags_clear(&d);
        nd_profile *q = NULL;
        ck_assert_int_eq(nd_profile_parse(PROFILE, strlen(PROFILE), NULL, NULL, &q, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], NULL, 0, 0, "", "no-limits");
        ck_assert(!q->valid && q->has_area);
        nd_profile_free(q);
}
END_TEST

START_TEST(test_document_level) {
        static const struct { const char *text; const char *code; unsigned line, column; } docs[] = {
                { "", "not-a-mapping", 1, 1 },
                { "- name: x\n", "not-a-mapping", 1, 1 },
                { "just text\n", "not-a-mapping", 1, 1 },
                { "name: x\n  bad: indent\n", "yaml-syntax", 2, 6 },
                { "name: &a x\narea: *a\n", "yaml-syntax", 1, 7 },
                { "name: x\n---\nname: y\n", "yaml-syntax", 2, 1 },
        };
        for (size_t i = 0; i < ELEMENTSOF(docs); i++) {
                _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
                nd_profile *p = (nd_profile *) 1;
                ck_assert_int_eq(nd_profile_parse(docs[i].text, strlen(docs[i].text), "d.yaml", limits, &p, &d), -EINVAL);
                ck_assert_ptr_null(p);
                _cleanup_free_ char *got = dump(&d);
                ck_assert_msg(nd_diags_count(&d) == 1, "doc %zu:%s", i, got);
                assert_diag(&d.items[0], "d.yaml", docs[i].line, docs[i].column, "", docs[i].code);
        }
}
END_TEST

START_TEST(test_hostile) {
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_profile *p = NULL;

        char bomb[1024], *w = bomb;
        w = stpcpy(w, "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
        for (char c = 'b'; c <= 'i'; c++)
                w += sprintf(w, "%c: &%c [*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c]\n", c, c, c - 1, c - 1, c - 1, c - 1,
                             c - 1, c - 1, c - 1, c - 1, c - 1);
        ck_assert_int_eq(nd_profile_parse(bomb, strlen(bomb), NULL, limits, &p, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], NULL, 1, 4, "", "yaml-syntax");
        ck_assert_msg(strstr(d.items[0].message, "aliases are not supported"), "%s", d.items[0].message);

        size_t big_len = 2u * 1024 * 1024;
        _cleanup_free_ char *big = malloc(big_len);
        memset(big, '\n', big_len);
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_profile_parse(big, big_len, NULL, limits, &p, &d), -EINVAL);
        assert_diag(&d.items[0], NULL, 0, 0, "", "yaml-syntax");
        ck_assert_msg(strstr(d.items[0].message, "1 MiB"), "%s", d.items[0].message);

        static const char nul[] = "name: x\0\n";
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_profile_parse(nul, sizeof nul - 1, NULL, limits, &p, &d), -EINVAL);
        assert_diag(&d.items[0], NULL, 1, 8, "", "yaml-syntax");

        size_t depth = 10000;
        _cleanup_free_ char *deep = malloc(4 * depth + 1);
        char *q = deep;
        for (size_t i = 0; i < depth; i++)
                q = stpcpy(q, "- ");
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_profile_parse(deep, strlen(deep), NULL, limits, &p, &d), -EINVAL);
        assert_diag(&d.items[0], NULL, 1, 2 * ND_YAML_MAX_DEPTH + 1, "", "yaml-syntax");
        ck_assert_msg(strstr(d.items[0].message, "nesting"), "%s", d.items[0].message);
        ck_assert_ptr_null(p);
}
END_TEST

static nd_profile *parse_valid(const char *text) {
        nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), NULL, limits, &p, NULL), 0);
        return p;
}

START_TEST(test_pen_checks) {
        _cleanup_(nd_profile_freep) nd_profile *p = parse_valid(PROFILE);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;

        ck_assert_int_eq(nd_profile_check_pen(p, &SIM_PEN, false, 0, &d), 0);
        ck_assert_int_eq(nd_profile_check_pen(p, &SIM_PEN, true, 12, &d), 0);
        ck_assert_uint_eq(nd_diags_count(&d), 0);

        ck_assert_int_eq(nd_profile_check_pen(p, &SIM_PEN, true, 16, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], NULL, 0, 0, "needles", "needles-mismatch");
        ck_assert_str_eq(d.items[0].message, "the profile is written for 12-needle cartridges but the inserted cartridge has 16 needles");

        /* Decimal depths on a 0.05 mm grid are not exact in binary: all must pass. */
        for (int k = 1; k <= 50; k++) {
                char buf[16];
                snprintf(buf, sizeof buf, "%d.%02d", (k * 5) / 100, (k * 5) % 100);
                p->depth_mm = strtod(buf, NULL);
                nd_diags_clear(&d);
                ck_assert_msg(nd_profile_check_pen(p, &SIM_PEN, false, 0, &d) == 0, "%s mm refused: %s", buf,
                              nd_diags_count(&d) ? d.items[0].message : "");
        }

        nd_diags_clear(&d);
        p->depth_mm = 1.23;
        ck_assert_int_eq(nd_profile_check_pen(p, &SIM_PEN, false, 0, &d), -EINVAL);
        assert_diag(&d.items[0], NULL, 0, 0, "depth_mm", "off-step");
        ck_assert_str_eq(d.items[0].message, "depth_mm 1.23 is not on this pen's steps of 0.05 mm from 0 mm; the nearest settings are 1.2 and 1.25 mm");
        p->depth_mm = 1.2500011;
        ck_assert_int_eq(nd_profile_check_pen(p, &SIM_PEN, false, 0, &d), -EINVAL);
        ck_assert_str_eq(d.items[1].code, "off-step");
        p->depth_mm = 1.2500009;
        ck_assert_int_eq(nd_profile_check_pen(p, &SIM_PEN, false, 0, &d), 0);

        nd_diags_clear(&d);
        p->depth_mm = 2.75;
        p->speed_hz = 160;
        ck_assert_int_eq(nd_profile_check_pen(p, &SIM_PEN, true, 14, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 3);
        assert_diag(&d.items[0], NULL, 0, 0, "depth_mm", "beyond-pen-range");
        ck_assert_str_eq(d.items[0].limit, "0 to 2.5 mm");
        assert_diag(&d.items[1], NULL, 0, 0, "speed_hz", "beyond-pen-range");
        ck_assert_str_eq(d.items[1].limit, "25 to 150 Hz");
        assert_diag(&d.items[2], NULL, 0, 0, "needles", "needles-mismatch");

        /* A pen whose range starts above 0: the grid starts there (0.2, 0.3, ...). */
        static const nd_pen_caps dermapen = { 0.2, 3.0, 0.1, 50, 120 };
        nd_diags_clear(&d);
        p->depth_mm = 0.1;
        p->speed_hz = 100;
        ck_assert_int_eq(nd_profile_check_pen(p, &dermapen, false, 0, &d), -EINVAL);
        ck_assert_str_eq(d.items[0].code, "beyond-pen-range");
        p->depth_mm = 0.7;
        ck_assert_int_eq(nd_profile_check_pen(p, &dermapen, false, 0, &d), 0);
        p->depth_mm = 0.75;
        ck_assert_int_eq(nd_profile_check_pen(p, &dermapen, false, 0, &d), -EINVAL);
        ck_assert_str_eq(d.items[1].code, "off-step");

        /* Fields the profile lacks are not checked. */
        nd_profile empty = { .valid = false };
        ck_assert_int_eq(nd_profile_check_pen(&empty, &SIM_PEN, true, 16, NULL), 0);
}
END_TEST

START_TEST(test_shipped_profiles) {
        const char *root = getenv("NEEDLED_SOURCE_ROOT");
        ck_assert_msg(root, "NEEDLED_SOURCE_ROOT is not set");
        _cleanup_free_ char *limits_path = NULL, *dir = NULL;
        ck_assert_int_ge(asprintf(&limits_path, "%s/conf/limits.yaml", root), 0);
        ck_assert_int_ge(asprintf(&dir, "%s/conf/profiles.d", root), 0);
        _cleanup_(nd_limits_freep) nd_limits *shipped = NULL;
        ck_assert_int_eq(nd_limits_load_file(limits_path, &shipped, NULL), 0);

        _cleanup_(nd_profile_set_freep) nd_profile_set *set = NULL;
        ck_assert_int_eq(nd_profile_dir_load(dir, shipped, &set), 0);
        ck_assert_uint_ge(set->n_entries, 6);

        static const char *const required[] = {
                "acne-scars-cheeks", "fine-lines-periorbital", "forehead-lines", "neck-texture",
                "stretch-marks-body", "scalp",
        };
        for (size_t i = 0; i < ELEMENTSOF(required); i++)
                ck_assert_msg(nd_profile_set_find(set, required[i]), "%s missing", required[i]);

        for (size_t i = 0; i < set->n_entries; i++) {
                const nd_profile_entry *e = &set->entries[i];
                _cleanup_free_ char *got = dump(&e->violations);
                ck_assert_msg(e->valid && e->profile->valid, "%s:%s", e->file_name, got);
                /* The file is named after the profile. */
                char expected[128];
                snprintf(expected, sizeof expected, "%s.yaml", e->profile->name);
                ck_assert_str_eq(e->file_name, expected);
                /* And every one can be armed on a simulated pen with its cartridge. */
                nd_diags d = ND_DIAGS_INIT;
                ck_assert_msg(nd_profile_check_pen(e->profile, &SIM_PEN, true, e->profile->needles, &d) == 0,
                              "%s: %s", e->file_name, nd_diags_count(&d) ? d.items[0].message : "");
                nd_diags_clear(&d);
        }
}
END_TEST

static void write_file(const char *dir, const char *name, const char *text) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        FILE *f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        fputs(text, f);
        fclose(f);
}

static void remove_tree(const char *dir) {
        DIR *d = opendir(dir);
        if (!d)
                return;
        struct dirent *de;
        while ((de = readdir(d))) {
                if (STREQ(de->d_name, ".") || STREQ(de->d_name, ".."))
                        continue;
                char path[512];
                snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
                if (unlink(path) < 0)
                        rmdir(path);
        }
        closedir(d);
        rmdir(dir);
}

START_TEST(test_dir_load) {
        char dir[] = "/tmp/test-profile-XXXXXX";
        ck_assert_ptr_nonnull(mkdtemp(dir));

        write_file(dir, "b-acne.yaml", PROFILE);
        _cleanup_free_ char *same_name = mutate(PROFILE, "depth_mm: 1.25", "depth_mm: 1.0");
        write_file(dir, "c-copy.yaml", same_name);
        _cleanup_free_ char *bad = mutate(PROFILE, "name: acne-scars-cheeks", "name: deep-one");
        _cleanup_free_ char *bad2 = mutate(bad, "depth_mm: 1.25", "depth_mm: 2.5");
        write_file(dir, "a-deep.yaml", bad2);
        write_file(dir, "d-list.yaml", "- not\n- a mapping\n");
        write_file(dir, "ignored.yml", "name: nope\n");
        write_file(dir, ".hidden.yaml", "name: nope\n");
        write_file(dir, "notes.txt", "hello\n");
        char sub[512];
        snprintf(sub, sizeof sub, "%s/e-dir.yaml", dir);
        ck_assert_int_eq(mkdir(sub, 0755), 0);
        /* Over the size bound. */
        char path[512];
        snprintf(path, sizeof path, "%s/f-big.yaml", dir);
        FILE *f = fopen(path, "w");
        for (size_t i = 0; i < 2 * 1024 * 1024; i++)
                fputc('#', f);
        fclose(f);

        _cleanup_(nd_profile_set_freep) nd_profile_set *set = NULL;
        ck_assert_int_eq(nd_profile_dir_load(dir, limits, &set), 0);
        ck_assert_uint_eq(set->n_entries, 6);
        static const char *const order[] = { "a-deep.yaml", "b-acne.yaml", "c-copy.yaml", "d-list.yaml",
                                             "e-dir.yaml", "f-big.yaml" };
        for (size_t i = 0; i < ELEMENTSOF(order); i++) {
                ck_assert_str_eq(set->entries[i].file_name, order[i]);
                ck_assert_ptr_nonnull(set->entries[i].profile);
        }

        const nd_profile_entry *e = &set->entries[0];
        ck_assert(!e->valid);
        ck_assert_str_eq(e->profile->name, "deep-one");
        ck_assert_uint_eq(nd_diags_count(&e->violations), 1);
        snprintf(path, sizeof path, "%s/a-deep.yaml", dir);
        assert_diag(&e->violations.items[0], path, 4, 11, "depth_mm", "above-area-max");
        ck_assert_str_eq(e->path, path);

        e = &set->entries[1];
        ck_assert(e->valid && e->profile->valid);
        ck_assert_uint_eq(nd_diags_count(&e->violations), 0);

        e = &set->entries[2];
        ck_assert(!e->valid && !e->profile->valid);
        ck_assert_uint_eq(nd_diags_count(&e->violations), 1);
        snprintf(path, sizeof path, "%s/c-copy.yaml", dir);
        assert_diag(&e->violations.items[0], path, 1, 7, "name", "duplicate-name");
        ck_assert_msg(strstr(e->violations.items[0].message, "b-acne.yaml"), "%s", e->violations.items[0].message);

        e = &set->entries[3];
        ck_assert(!e->valid && !e->profile->has_name);
        ck_assert_str_eq(e->violations.items[0].code, "not-a-mapping");

        e = &set->entries[4];
        ck_assert(!e->valid);
        ck_assert_str_eq(e->violations.items[0].code, "unreadable");
        ck_assert_msg(strstr(e->violations.items[0].message, strerror(EISDIR)), "%s", e->violations.items[0].message);

        e = &set->entries[5];
        ck_assert(!e->valid);
        ck_assert_str_eq(e->violations.items[0].code, "yaml-syntax");

        /* Lookup finds the owner of a name, not the later duplicate. */
        ck_assert_ptr_eq(nd_profile_set_find(set, "acne-scars-cheeks"), &set->entries[1]);
        ck_assert_ptr_eq(nd_profile_set_find(set, "deep-one"), &set->entries[0]);
        ck_assert_ptr_null(nd_profile_set_find(set, "nope"));
        ck_assert_ptr_null(nd_profile_set_find(set, NULL));

        remove_tree(dir);

        nd_profile_set *none = NULL;
        ck_assert_int_eq(nd_profile_dir_load(dir, limits, &none), -ENOENT);
        ck_assert_ptr_null(none);
}
END_TEST

START_TEST(test_empty_dir_and_load_file) {
        char dir[] = "/tmp/test-profile-XXXXXX";
        ck_assert_ptr_nonnull(mkdtemp(dir));
        _cleanup_(nd_profile_set_freep) nd_profile_set *set = NULL;
        ck_assert_int_eq(nd_profile_dir_load(dir, limits, &set), 0);
        ck_assert_uint_eq(set->n_entries, 0);

        char path[512];
        snprintf(path, sizeof path, "%s/missing.yaml", dir);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_profile *p = (nd_profile *) 1;
        ck_assert_int_eq(nd_profile_load_file(path, limits, &p, &d), -ENOENT);
        ck_assert_ptr_null(p);
        assert_diag(&d.items[0], path, 0, 0, "", "unreadable");

        write_file(dir, "ok.yaml", PROFILE);
        snprintf(path, sizeof path, "%s/ok.yaml", dir);
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_profile_load_file(path, limits, &p, &d), 0);
        ck_assert(p->valid);
        nd_profile_free(p);
        remove_tree(dir);
}
END_TEST


/* ---- skin types, passes, surface, dose ------------------------------------------------------ */

/* LIMITS with skin types IV/V/VI capped at 1.0/0.75/0.5 mm (lines 31-34) and a density cap on
 * cheeks (line 25) that the example below meets exactly: 12 x 120 x 900 / 60 = 21600. */
static char *skin_limits_text(const char *extra_session) {
        _cleanup_free_ char *base = NULL, *capped = NULL;
        ck_assert_int_ge(asprintf(&base, "%s%s", LIMITS,
                                  "skin_types:\n  IV: {max_depth_mm: 1.0}\n  V:  {max_depth_mm: 0.75}\n  VI: {max_depth_mm: 0.5}\n"), 0);
        capped = mutate(base, "cheeks:      {max_depth_mm: 1.5}", "cheeks:      {max_depth_mm: 1.5, max_density_per_cm2: 21600}");
        return mutate(capped, "  client_heartbeat_timeout_ms: 0\n", extra_session);
}

static nd_limits *skin_limits(const char *extra_session) {
        _cleanup_free_ char *text = skin_limits_text(extra_session);
        nd_limits *l = NULL;
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        int r = nd_limits_load_data(text, strlen(text), "limits.yaml", &l, &d);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(r == 0, "limits refused:%s", got);
        return l;
}

/* The example with the new keys on lines 12-14. */
static char *skin_profile_text(void) {
        char *s = NULL;
        ck_assert_int_ge(asprintf(&s, "%sskin_types: [I, II, III]\npasses: 3\narea_cm2: 60\n", PROFILE), 0);
        return s;
}

START_TEST(test_skin_profile_valid) {
        _cleanup_(nd_limits_freep) nd_limits *l = skin_limits("  client_heartbeat_timeout_ms: 0\n");
        _cleanup_free_ char *text = skin_profile_text();
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        int r = nd_profile_parse(text, strlen(text), "p.yaml", l, &p, &d);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(r == 0, "refused:%s", got);
        ck_assert(p->has_skin_types && p->has_passes && p->has_area_cm2);
        ck_assert(p->skin_types[ND_SKIN_TYPE_I] && p->skin_types[ND_SKIN_TYPE_II] && p->skin_types[ND_SKIN_TYPE_III]);
        ck_assert(!p->skin_types[ND_SKIN_TYPE_IV] && !p->skin_types[ND_SKIN_TYPE_V] && !p->skin_types[ND_SKIN_TYPE_VI]);
        ck_assert_uint_eq(p->passes, 3);
        ck_assert(p->area_cm2 == 60);
        ck_assert(nd_profile_planned_density_per_cm2(p) == 21600);
        char types[32];
        nd_profile_skin_types_text(p, types);
        ck_assert_str_eq(types, "I, II, III");

        /* Today's example has none of the new keys, and is still valid under these limits
         * everywhere but an area with a density cap. */
        _cleanup_(nd_profile_freep) nd_profile *plain = NULL;
        _cleanup_free_ char *forehead = mutate(PROFILE, "area: cheeks\ndepth_mm: 1.25", "area: forehead\ndepth_mm: 0.75");
        ck_assert_int_eq(nd_profile_parse(forehead, strlen(forehead), NULL, l, &plain, NULL), 0);
        ck_assert(!plain->has_skin_types && !plain->has_passes && !plain->has_area_cm2);
        ck_assert(nd_profile_planned_density_per_cm2(plain) < 0);
        nd_profile_skin_types_text(plain, types);
        ck_assert_str_eq(types, "");

        /* Boundaries that pass: passes 1 and 10, area_cm2 1000 and just above 0, every type,
         * the dose exactly at the cap and just below it. */
        static const struct { const char *from, *to; } ok[] = {
                { "passes: 3", "passes: 1" },
                { "passes: 3", "passes: 10" },
                { "area_cm2: 60", "area_cm2: 60.01" },
                { "skin_types: [I, II, III]", "skin_types: [III, I]" },
                { "skin_types: [I, II, III]\n", "" },
                { "passes: 3\n", "" },
                { "depth_mm: 1.25", "depth_mm: 1.0" },
        };
        for (size_t i = 0; i < ELEMENTSOF(ok); i++) {
                _cleanup_free_ char *t = mutate(text, ok[i].from, ok[i].to);
                _cleanup_diags_ nd_diags e = ND_DIAGS_INIT;
                _cleanup_(nd_profile_freep) nd_profile *q = NULL;
                r = nd_profile_parse(t, strlen(t), NULL, l, &q, &e);
                _cleanup_free_ char *g = dump(&e);
                ck_assert_msg(r == 0, "form %zu refused:%s", i, g);
        }
        /* With every type, but at VI's depth (the shallowest cap). */
        _cleanup_free_ char *all = mutate(text, "skin_types: [I, II, III]", "skin_types: [I, II, III, IV, V, VI]");
        _cleanup_free_ char *shallow = mutate(all, "depth_mm: 1.25", "depth_mm: 0.5");
        _cleanup_(nd_profile_freep) nd_profile *q = NULL;
        ck_assert_int_eq(nd_profile_parse(shallow, strlen(shallow), NULL, l, &q, NULL), 0);
        /* A large surface: 1000 cm² at the top of the range. */
        _cleanup_free_ char *wide = mutate(text, "area_cm2: 60", "area_cm2: 1000");
        _cleanup_(nd_profile_freep) nd_profile *w = NULL;
        ck_assert_int_eq(nd_profile_parse(wide, strlen(wide), NULL, l, &w, NULL), 0);
        ck_assert(w->area_cm2 == 1000);
}
END_TEST

static const profile_case skin_cases[] = {
        { "skin_types: [I, II, III]", "skin_types: [I, II, VII]", "unknown-skin-type", "skin_types", 12, 21 },
        { "skin_types: [I, II, III]", "skin_types: [I, ii]", "unknown-skin-type", "skin_types", 12, 17 },
        { "skin_types: [I, II, III]", "skin_types: [1]", "unknown-skin-type", "skin_types", 12, 14 },
        { "skin_types: [I, II, III]", "skin_types: [I, II, I]", "duplicate-key", "skin_types", 12, 21 },
        { "skin_types: [I, II, III]", "skin_types: []", "out-of-range", "skin_types", 12, 13 },
        { "skin_types: [I, II, III]", "skin_types: I", "wrong-type", "skin_types", 12, 13 },
        { "skin_types: [I, II, III]", "skin_types: {I: true}", "wrong-type", "skin_types", 12, 13 },
        { "skin_types: [I, II, III]", "skin_types: [I, [II]]", "wrong-type", "skin_types", 12, 17 },
        /* a listed type whose cap is below the depth: at the depth, just above IV's 1.0 */
        { "skin_types: [I, II, III]", "skin_types: [I, II, III, IV]", "above-skin-type-max", "depth_mm", 4, 11 },
        { "passes: 3", "passes: 0", "out-of-range", "passes", 13, 9 },
        { "passes: 3", "passes: 11", "out-of-range", "passes", 13, 9 },
        { "passes: 3", "passes: -1", "out-of-range", "passes", 13, 9 },
        { "passes: 3", "passes: 2.5", "wrong-type", "passes", 13, 9 },
        { "passes: 3", "passes: \"3\"", "wrong-type", "passes", 13, 9 },
        { "area_cm2: 60", "area_cm2: 0", "out-of-range", "area_cm2", 14, 11 },
        { "area_cm2: 60", "area_cm2: -5", "out-of-range", "area_cm2", 14, 11 },
        { "area_cm2: 60", "area_cm2: 0.0099", "out-of-range", "area_cm2", 14, 11 },
        { "area_cm2: 60", "area_cm2: 1e-320", "out-of-range", "area_cm2", 14, 11 },
        { "area_cm2: 60", "area_cm2: 1000.01", "out-of-range", "area_cm2", 14, 11 },
        { "area_cm2: 60", "area_cm2: .nan", "not-finite", "area_cm2", 14, 11 },
        { "area_cm2: 60", "area_cm2: \"60\"", "wrong-type", "area_cm2", 14, 11 },
        /* the planned dose: just above the cap */
        { "area_cm2: 60", "area_cm2: 59.99", "above-density-max", "area_cm2", 14, 11 },
        { "speed_hz: 120", "speed_hz: 121", "above-density-max", "area_cm2", 14, 11 },
        { "duration_s: 900", "duration_s: 901", "above-density-max", "area_cm2", 14, 11 },
        /* a density cap and no surface: at the area */
        { "area_cm2: 60\n", "", "no-surface", "area_cm2", 3, 7 },
};

START_TEST(test_skin_single_violation) {
        const profile_case *c = &skin_cases[_i];
        _cleanup_(nd_limits_freep) nd_limits *l = skin_limits("  client_heartbeat_timeout_ms: 0\n");
        _cleanup_free_ char *base = skin_profile_text();
        _cleanup_free_ char *text = mutate(base, c->from, c->to);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        int r = nd_profile_parse(text, strlen(text), "p.yaml", l, &p, &d);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(r == -EINVAL, "case %d ('%s' -> '%s') accepted", _i, c->from, c->to);
        ck_assert_msg(nd_diags_count(&d) == 1, "case %d ('%s' -> '%s'): %zu violations:%s", _i, c->from, c->to,
                      nd_diags_count(&d), got);
        assert_diag(&d.items[0], "p.yaml", c->line, c->column, c->field, c->code);
        ck_assert(!p->valid);
}
END_TEST

START_TEST(test_skin_messages) {
        _cleanup_(nd_limits_freep) nd_limits *l = skin_limits("  client_heartbeat_timeout_ms: 0\n");
        _cleanup_free_ char *base = skin_profile_text();
        _cleanup_free_ char *deep = mutate(base, "skin_types: [I, II, III]", "skin_types: [IV, V, VI]");
        _cleanup_free_ char *text = mutate(deep, "area_cm2: 60", "area_cm2: 50");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), NULL, l, &p, &d), -EINVAL);
        _cleanup_free_ char *got = dump(&d);
        ck_assert_msg(nd_diags_count(&d) == 4, "%s", got);
        /* Every type deeper than its cap, once each, then the dose. */
        unsigned lines = 0;  /* the fixture's lines: "skin_types:" is the next one */
        for (const char *c = LIMITS; *c; c++)
                lines += *c == '\n';
        char want[3][160];
        snprintf(want[0], sizeof want[0], "depth_mm 1.25 exceeds the 1 mm maximum for skin type IV (limits.yaml line %u)", lines + 2);
        snprintf(want[1], sizeof want[1], "depth_mm 1.25 exceeds the 0.75 mm maximum for skin type V (limits.yaml line %u)", lines + 3);
        snprintf(want[2], sizeof want[2], "depth_mm 1.25 exceeds the 0.5 mm maximum for skin type VI (limits.yaml line %u)", lines + 4);
        ck_assert_str_eq(d.items[0].message, want[0]);
        ck_assert_str_eq(d.items[1].message, want[1]);
        ck_assert_str_eq(d.items[2].message, want[2]);
        ck_assert_str_eq(d.items[3].code, "above-density-max");
        ck_assert_str_eq(d.items[3].message,
                         "the planned dose of 25920 punctures/cm² (12 needles x 120 Hz x 900 s / 50 cm²) exceeds the 21600 "
                         "punctures/cm² maximum for area cheeks (limits.yaml line 25)");
        ck_assert_str_eq(d.items[3].value, "25920");
        ck_assert_str_eq(d.items[3].limit, "21600");

        nd_diags_clear(&d);
        _cleanup_free_ char *bare = mutate(base, "area_cm2: 60\n", "");
        _cleanup_(nd_profile_freep) nd_profile *q = NULL;
        ck_assert_int_eq(nd_profile_parse(bare, strlen(bare), NULL, l, &q, &d), -EINVAL);
        ck_assert_str_eq(d.items[0].message,
                         "area cheeks has a density cap of 21600 punctures/cm² (limits.yaml line 25) but the profile gives "
                         "no area_cm2, so its dose cannot be judged; add the treated surface in cm²");

        /* Without limits the new keys are still read and checked for shape. */
        nd_diags_clear(&d);
        _cleanup_(nd_profile_freep) nd_profile *n = NULL;
        ck_assert_int_eq(nd_profile_parse(base, strlen(base), NULL, NULL, &n, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        ck_assert_str_eq(d.items[0].code, "no-limits");
        ck_assert(n->has_skin_types && n->has_passes && n->has_area_cm2);
}
END_TEST

START_TEST(test_skin_type_at_start) {
        _cleanup_(nd_limits_freep) nd_limits *l = skin_limits("  client_heartbeat_timeout_ms: 0\n");
        _cleanup_(nd_limits_freep) nd_limits *required = skin_limits("  client_heartbeat_timeout_ms: 0\n  require_skin_type: true\n");
        _cleanup_free_ char *text = skin_profile_text();
        _cleanup_(nd_profile_freep) nd_profile *p = NULL;
        ck_assert_int_eq(nd_profile_parse(text, strlen(text), NULL, l, &p, NULL), 0);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_skin_type t = ND_SKIN_TYPE_VI;

        /* None given: fine unless the limits require one. */
        ck_assert_int_eq(nd_profile_check_skin_type(p, l, NULL, &t, &d), 0);
        ck_assert_int_eq(t, ND_SKIN_TYPE_NONE);
        ck_assert_int_eq(nd_profile_check_skin_type(p, l, "", &t, &d), 0);
        ck_assert_uint_eq(nd_diags_count(&d), 0);
        ck_assert_int_eq(nd_profile_check_skin_type(p, required, NULL, &t, &d), -EINVAL);
        assert_diag(&d.items[0], NULL, 0, 0, "skin_type", "missing-field");
        ck_assert_int_eq(nd_profile_check_skin_type(p, required, "", &t, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 2);

        /* A type the profile is meant for. */
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_profile_check_skin_type(p, l, "II", &t, &d), 0);
        ck_assert_int_eq(t, ND_SKIN_TYPE_II);
        ck_assert_int_eq(nd_profile_check_skin_type(p, required, "III", &t, &d), 0);
        ck_assert_int_eq(t, ND_SKIN_TYPE_III);
        ck_assert_uint_eq(nd_diags_count(&d), 0);

        /* Not meant for IV, and deeper than IV's cap: both, at once. */
        ck_assert_int_eq(nd_profile_check_skin_type(p, l, "IV", &t, &d), -EINVAL);
        ck_assert_int_eq(t, ND_SKIN_TYPE_NONE);
        ck_assert_uint_eq(nd_diags_count(&d), 2);
        assert_diag(&d.items[0], NULL, 0, 0, "skin_type", "skin-type-not-allowed");
        ck_assert_str_eq(d.items[0].message, "profile acne-scars-cheeks is meant for skin types I, II, III, not IV");
        assert_diag(&d.items[1], NULL, 0, 0, "depth_mm", "above-skin-type-max");

        /* Not a type at all. */
        nd_diags_clear(&d);
        ck_assert_int_eq(nd_profile_check_skin_type(p, l, "iv", &t, &d), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        assert_diag(&d.items[0], NULL, 0, 0, "skin_type", "unknown-skin-type");
        ck_assert_int_eq(nd_profile_check_skin_type(p, l, "VII\n", &t, &d), -EINVAL);
        ck_assert_str_eq(d.items[1].value, "VII\\x0a");

        /* A profile without skin_types: only the caps, at / just below / just above. */
        static const struct { const char *depth, *type; int want; } caps[] = {
                { "depth_mm: 1.0", "IV", 0 },        { "depth_mm: 0.95", "IV", 0 },
                { "depth_mm: 1.05", "IV", -EINVAL }, { "depth_mm: 0.75", "V", 0 },
                { "depth_mm: 0.8", "V", -EINVAL },   { "depth_mm: 0.5", "VI", 0 },
                { "depth_mm: 0.55", "VI", -EINVAL }, { "depth_mm: 1.5", "I", 0 },
        };
        for (size_t i = 0; i < ELEMENTSOF(caps); i++) {
                _cleanup_free_ char *t1 = mutate(PROFILE, "depth_mm: 1.25", caps[i].depth);
                _cleanup_(nd_profile_freep) nd_profile *q = NULL;
                _cleanup_diags_ nd_diags e = ND_DIAGS_INIT;
                _cleanup_free_ char *forehead = mutate(t1, "area: cheeks", "area: chin");
                ck_assert_int_eq(nd_profile_parse(forehead, strlen(forehead), NULL, l, &q, NULL), 0);
                ck_assert_msg(nd_profile_check_skin_type(q, l, caps[i].type, &t, &e) == caps[i].want, "case %zu", i);
                if (caps[i].want < 0) {
                        ck_assert_uint_eq(nd_diags_count(&e), 1);
                        ck_assert_str_eq(e.items[0].code, "above-skin-type-max");
                } else
                        ck_assert_int_eq(t, nd_skin_type_from_string(caps[i].type));
        }
}
END_TEST

START_TEST(test_dose) {
        ck_assert_uint_eq(nd_dose_punctures(0, 12), 0);
        ck_assert_uint_eq(nd_dose_punctures(1000, 12), 12000);
        ck_assert_uint_eq(nd_dose_punctures(1000, 0), 0);
        ck_assert_uint_eq(nd_dose_punctures(UINT64_MAX / 2, 12), UINT64_MAX);
        ck_assert_uint_eq(nd_dose_punctures(UINT64_MAX / 12, 12), (UINT64_MAX / 12) * 12);

        ck_assert(nd_dose_density_per_cm2(12000, 60) == 200);
        ck_assert(nd_dose_density_per_cm2(12000, 0) == 0);
        ck_assert(nd_dose_density_per_cm2(12000, -1) == 0);
        ck_assert(nd_dose_density_per_cm2(UINT64_MAX, 1e-320) == DBL_MAX); /* finite: the ledger records it */
        ck_assert(nd_dose_density_per_cm2(12000, NAN) == 0);
        ck_assert(nd_dose_density_per_cm2(12000, INFINITY) == 0);

        _cleanup_(nd_limits_freep) nd_limits *l = skin_limits("  client_heartbeat_timeout_ms: 0\n");
        const nd_area_limits *cheeks = nd_limits_find_area(l, "cheeks"), *neck = nd_limits_find_area(l, "neck");
        ck_assert(!nd_dose_reached(cheeks, 21599.99));
        ck_assert(nd_dose_reached(cheeks, 21600));
        ck_assert(nd_dose_reached(cheeks, 21600.01));
        ck_assert(!nd_dose_reached(cheeks, 0));
        ck_assert(!nd_dose_reached(neck, 1e9));
        ck_assert(!nd_dose_reached(NULL, 1e9));
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("profile");
        TCase *tc = tcase_create("parse");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_example_is_valid);
        tcase_add_test(tc, test_optional_keys_and_limits_edges);
        tcase_add_loop_test(tc, test_single_violation, 0, ELEMENTSOF(cases));
        tcase_add_test(tc, test_messages);
        tcase_add_test(tc, test_area_tightens);
        tcase_add_test(tc, test_all_at_once);
        tcase_add_test(tc, test_no_limits);
        tcase_add_test(tc, test_document_level);
        tcase_add_test(tc, test_hostile);
        suite_add_tcase(s, tc);

        tc = tcase_create("pen");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_pen_checks);
        suite_add_tcase(s, tc);

        tc = tcase_create("skin-types-and-dose");
        tcase_add_test(tc, test_skin_profile_valid);
        tcase_add_loop_test(tc, test_skin_single_violation, 0, ELEMENTSOF(skin_cases));
        tcase_add_test(tc, test_skin_messages);
        tcase_add_test(tc, test_skin_type_at_start);
        tcase_add_test(tc, test_dose);
        suite_add_tcase(s, tc);

        tc = tcase_create("dir");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_shipped_profiles);
        tcase_add_test(tc, test_dir_load);
        tcase_add_test(tc, test_empty_dir_and_load_file);
        suite_add_tcase(s, tc);
        return s;
}
