/* profile.c: treatment profiles: parsing, validation, pen checks, the profiles directory. */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "profile.h"
#include "yamltree.h"

const char *const nd_profile_indications[] = {
        "acne-scars", "fine-lines", "stretch-marks", "texture", "pigmentation", "scalp", "other", NULL,
};

#define PROFILE_SUFFIX ".yaml"

void nd_profile_free(nd_profile *p) {
        if (!p)
                return;
        free(p->name);
        free(p->indication);
        free(p->area);
        free(p->notes);
        for (size_t i = 0; i < p->n_aftercare; i++)
                free(p->aftercare[i]);
        free(p->aftercare);
        free(p);
}

static bool valid_name(const char *s) {
        size_t len = strlen(s);
        if (len == 0 || len > ND_PROFILE_NAME_MAX)
                return false;
        for (size_t i = 0; i < len; i++)
                if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '-'))
                        return false;
        return true;
}

static bool known_indication(const char *s) {
        for (size_t i = 0; nd_profile_indications[i]; i++)
                if (STREQ(s, nd_profile_indications[i]))
                        return true;
        return false;
}

/* Copies a string read from the tree; false (and oom set) when out of memory. */
static bool copy_string(const nd_yctx *ctx, const char *s, char **ret) {
        *ret = strdup(s);
        if (!*ret)
                ctx->diags->oom = true;
        return *ret != NULL;
}

static void out_of_range(const nd_yctx *ctx, const nd_ynode *n, const char *field, const char *limit,
                         const char *unit) {
        nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "out-of-range", n->scalar, limit,
                     "%s %s is outside the allowed range %s%s", field, n->scalar, limit, unit);
}

static void check_name(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n) {
        const char *s;
        if (nd_yget_string(ctx, n, "name", &s) < 0 || !copy_string(ctx, s, &p->name))
                return;
        p->has_name = true;
        p->name_line = n->line;
        p->name_column = n->column;
        if (!valid_name(s)) {
                _cleanup_free_ char *text = nd_text_sanitize(n->scalar, n->scalar_len, ND_DIAG_VALUE_MAX);
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "name", "invalid-name", s, "[a-z0-9-]{1,64}",
                             "name '%s' must be 1 to %d characters of a-z, 0-9 and '-'", strempty(text),
                             ND_PROFILE_NAME_MAX);
        }
}

static void check_indication(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n) {
        const char *s;
        if (nd_yget_string(ctx, n, "indication", &s) < 0 || !copy_string(ctx, s, &p->indication))
                return;
        p->has_indication = true;
        if (known_indication(s))
                return;

        char list[256] = "";
        for (size_t i = 0; nd_profile_indications[i]; i++) {
                if (i > 0)
                        strncat(list, ", ", sizeof list - strlen(list) - 1);
                strncat(list, nd_profile_indications[i], sizeof list - strlen(list) - 1);
        }
        _cleanup_free_ char *text = nd_text_sanitize(n->scalar, n->scalar_len, ND_DIAG_VALUE_MAX);
        nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "indication", "unknown-indication", s, list,
                     "indication '%s' is not one of: %s", strempty(text), list);
}

static const nd_area_limits *check_area(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n,
                                        const nd_limits *limits) {
        const char *s;
        if (nd_yget_string(ctx, n, "area", &s) < 0 || !copy_string(ctx, s, &p->area))
                return NULL;
        p->has_area = true;
        if (!limits)
                return NULL;
        const nd_area_limits *a = nd_limits_find_area(limits, s);
        if (a)
                return a;

        /* Name the areas there are, so the fix is obvious; bounded so a message stays a line. */
        char list[512] = "";
        for (size_t i = 0; i < limits->n_areas; i++) {
                if (i > 0)
                        strncat(list, ", ", sizeof list - strlen(list) - 1);
                strncat(list, limits->areas[i].name, sizeof list - strlen(list) - 1);
        }
        _cleanup_free_ char *text = nd_text_sanitize(n->scalar, n->scalar_len, ND_DIAG_VALUE_MAX);
        nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "area", "unknown-area", s, NULL,
                     "area '%s' is not defined in %s; the areas are: %s", strempty(text),
                     nd_limits_display_name(limits), list);
        return NULL;
}

static void check_depth(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n, const nd_limits *limits,
                        const nd_area_limits *area) {
        if (nd_yget_number(ctx, n, "depth_mm", &p->depth_mm) < 0)
                return;
        p->has_depth_mm = true;

        char limit[64];
        snprintf(limit, sizeof limit, "more than 0 and at most %g", ND_DEPTH_MAX_MM);
        if (p->depth_mm <= 0)
                out_of_range(ctx, n, "depth_mm", limit, " mm");
        else if (area) {
                nd_limits_at at = { ctx->file, n->line, n->column, n->scalar };
                nd_limits_area_check_depth(limits, area, p->depth_mm, &at, ctx->diags);
        } else if (p->depth_mm > ND_DEPTH_MAX_MM)
                out_of_range(ctx, n, "depth_mm", limit, " mm");
}

static void check_speed(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n, const nd_limits *limits,
                        const nd_area_limits *area) {
        if (nd_yget_number(ctx, n, "speed_hz", &p->speed_hz) < 0)
                return;
        p->has_speed_hz = true;

        char limit[64];
        snprintf(limit, sizeof limit, "more than 0 and at most %g", ND_SPEED_MAX_HZ);
        if (p->speed_hz <= 0)
                out_of_range(ctx, n, "speed_hz", limit, " Hz");
        else if (limits) {
                nd_limits_at at = { ctx->file, n->line, n->column, n->scalar };
                nd_limits_area_check_speed(limits, area, p->speed_hz, &at, ctx->diags);
        } else if (p->speed_hz > ND_SPEED_MAX_HZ)
                out_of_range(ctx, n, "speed_hz", limit, " Hz");
}

/* Reads a positive integer that fits uint32_t; reports out-of-range below 1 or above max. */
static bool get_count(const nd_yctx *ctx, const nd_ynode *n, const char *field, int64_t max,
                      const char *unit, int64_t *ret) {
        if (nd_yget_integer(ctx, n, field, ret) < 0)
                return false;
        if (*ret < 1 || *ret > max) {
                char limit[64];
                snprintf(limit, sizeof limit, "1 to %" PRId64, max);
                out_of_range(ctx, n, field, limit, unit);
                return false;
        }
        return true;
}

static void check_duration(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n, const nd_limits *limits,
                           const nd_area_limits *area) {
        int64_t v;
        if (!get_count(ctx, n, "duration_s", UINT32_MAX, " s", &v))
                return;
        p->has_duration_s = true;
        p->duration_s = (uint32_t) v;
        if (limits) {
                nd_limits_at at = { ctx->file, n->line, n->column, n->scalar };
                nd_limits_area_check_duration(limits, area, v, &at, ctx->diags);
        } else if (v > ND_SESSION_DURATION_MAX_S) {
                char limit[64];
                snprintf(limit, sizeof limit, "1 to %d", ND_SESSION_DURATION_MAX_S);
                out_of_range(ctx, n, "duration_s", limit, " s");
        }
}

static void check_needles(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n, const nd_limits *limits) {
        int64_t v;
        if (!get_count(ctx, n, "needles", UINT32_MAX, "", &v))
                return;
        p->has_needles = true;
        p->needles = (uint32_t) v;
        if (limits) {
                nd_limits_at at = { ctx->file, n->line, n->column, n->scalar };
                nd_limits_check_needles(limits, v, &at, ctx->diags);
        } else if (v > ND_NEEDLES_MAX) {
                char limit[64];
                snprintf(limit, sizeof limit, "1 to %d", ND_NEEDLES_MAX);
                out_of_range(ctx, n, "needles", limit, "");
        }
}

static void check_notes(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n) {
        const char *s;
        if (nd_yget_string(ctx, n, "notes", &s) < 0)
                return;
        if (n->scalar_len > ND_PROFILE_NOTES_MAX) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "notes", "out-of-range", NULL, NULL,
                             "notes is %zu bytes long; at most %d are allowed", n->scalar_len, ND_PROFILE_NOTES_MAX);
                return;
        }
        if (copy_string(ctx, s, &p->notes))
                p->has_notes = true;
}

static void check_aftercare(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n) {
        if (n->kind != ND_YNODE_SEQUENCE) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "aftercare", "wrong-type",
                             n->kind == ND_YNODE_SCALAR ? n->scalar : NULL, NULL,
                             "aftercare must be a list of instructions (lines starting with '- '), not %s",
                             nd_ynode_describe(n));
                return;
        }
        if (n->n_items > ND_PROFILE_AFTERCARE_MAX) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "aftercare", "out-of-range", NULL, NULL,
                             "aftercare has %zu items; at most %d are allowed", n->n_items, ND_PROFILE_AFTERCARE_MAX);
                return;
        }
        char **items = calloc(MAX(n->n_items, (size_t) 1), sizeof(char *));
        if (!items) {
                ctx->diags->oom = true;
                return;
        }
        p->aftercare = items;
        bool ok = true;
        for (size_t i = 0; i < n->n_items; i++) {
                const nd_ynode *item = n->items[i];
                const char *s;
                if (nd_yget_string(ctx, item, "aftercare", &s) < 0) {
                        ok = false;
                        continue;
                }
                if (item->scalar_len > ND_PROFILE_AFTERCARE_ITEM_MAX) {
                        nd_diags_add(ctx->diags, ctx->file, item->line, item->column, "aftercare", "out-of-range",
                                     NULL, NULL, "aftercare item %zu is %zu bytes long; at most %d are allowed",
                                     i + 1, item->scalar_len, ND_PROFILE_AFTERCARE_ITEM_MAX);
                        ok = false;
                        continue;
                }
                if (!copy_string(ctx, s, &p->aftercare[p->n_aftercare]))
                        return;
                p->n_aftercare++;
        }
        p->has_aftercare = ok;
}

static void check_skin_types(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n) {
        if (n->kind != ND_YNODE_SEQUENCE) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "skin_types", "wrong-type",
                             n->kind == ND_YNODE_SCALAR ? n->scalar : NULL, NULL,
                             "skin_types must be a list of Fitzpatrick types such as [I, II, III], not %s",
                             nd_ynode_describe(n));
                return;
        }
        if (n->n_items == 0) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, "skin_types", "out-of-range", NULL,
                             nd_skin_type_names(),
                             "skin_types is empty; list the types the profile is meant for (%s), or leave the key out",
                             nd_skin_type_names());
                return;
        }
        /* Like every has_X: the key is there with the right shape; the types read are kept even
         * when another item is wrong, so their caps are still checked. */
        p->has_skin_types = true;
        for (size_t i = 0; i < n->n_items; i++) {
                const nd_ynode *item = n->items[i];
                const char *s;
                if (nd_yget_string(ctx, item, "skin_types", &s) < 0)
                        continue;
                nd_skin_type t = nd_skin_type_from_string(s);
                if (t == ND_SKIN_TYPE_NONE) {
                        _cleanup_free_ char *text = nd_text_sanitize(item->scalar, item->scalar_len, ND_DIAG_VALUE_MAX);
                        nd_diags_add(ctx->diags, ctx->file, item->line, item->column, "skin_types", "unknown-skin-type",
                                     s, nd_skin_type_names(), "'%s' is not a Fitzpatrick skin type; the types are: %s",
                                     strempty(text), nd_skin_type_names());
                        continue;
                }
                if (p->skin_types[t]) {
                        nd_diags_add(ctx->diags, ctx->file, item->line, item->column, "skin_types", "duplicate-key", s,
                                     NULL, "skin_types lists %s more than once", s);
                        continue;
                }
                p->skin_types[t] = true;
        }
}

/* A listed type whose cap in the limits is below the profile's depth makes the profile wrong
 * for that type: reported at the depth, once per type. */
static void check_skin_type_caps(const nd_yctx *ctx, const nd_profile *p, const nd_ynode *depth,
                                 const nd_limits *limits) {
        if (!limits || !p->has_skin_types || !p->has_depth_mm || !depth)
                return;
        nd_limits_at at = { ctx->file, depth->line, depth->column, depth->scalar };
        for (int t = 0; t < ND_SKIN_TYPES_COUNT; t++)
                if (p->skin_types[t])
                        nd_limits_check_skin_type_depth(limits, (nd_skin_type) t, p->depth_mm, &at, ctx->diags);
}

static void check_passes(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n) {
        int64_t v;
        if (nd_yget_integer(ctx, n, "passes", &v) < 0)
                return;
        if (v < ND_PROFILE_PASSES_MIN || v > ND_PROFILE_PASSES_MAX) {
                char limit[32];
                snprintf(limit, sizeof limit, "%d to %d", ND_PROFILE_PASSES_MIN, ND_PROFILE_PASSES_MAX);
                out_of_range(ctx, n, "passes", limit, "");
                return;
        }
        p->passes = (uint32_t) v;
        p->has_passes = true;
}

static void check_area_cm2(const nd_yctx *ctx, nd_profile *p, const nd_ynode *n) {
        double v;
        if (nd_yget_number(ctx, n, "area_cm2", &v) < 0)
                return;
        if (!(v >= ND_PROFILE_AREA_CM2_MIN) || v > ND_PROFILE_AREA_CM2_MAX) {
                char limit[64];
                snprintf(limit, sizeof limit, "at least %g and at most %g", ND_PROFILE_AREA_CM2_MIN,
                         ND_PROFILE_AREA_CM2_MAX);
                out_of_range(ctx, n, "area_cm2", limit, " cm²");
                return;
        }
        p->area_cm2 = v;
        p->has_area_cm2 = true;
}

double nd_profile_planned_density_per_cm2(const nd_profile *p) {
        if (!p->has_needles || !p->has_speed_hz || !p->has_duration_s || !p->has_area_cm2 || !(p->area_cm2 > 0))
                return -1;
        return (double) p->needles * p->speed_hz * (double) p->duration_s / p->area_cm2;
}

/* The area's density cap: the profile must say its surface, and its planned dose must fit. */
static void check_density(const nd_yctx *ctx, const nd_profile *p, const nd_limits *limits,
                          const nd_area_limits *area, const nd_ynode *area_node, const nd_ynode *area_cm2_node) {
        if (!limits || !area || !area->has_max_density_per_cm2)
                return;
        char limit[32];
        nd_format_number(area->max_density_per_cm2, limit);
        if (!area_cm2_node) {
                nd_diags_add(ctx->diags, ctx->file, area_node->line, area_node->column, "area_cm2", "no-surface", NULL,
                             limit,
                             "area %s has a density cap of %s punctures/cm² (%s line %u) but the profile gives no "
                             "area_cm2, so its dose cannot be judged; add the treated surface in cm²",
                             area->name, limit, nd_limits_display_name(limits), area->line);
                return;
        }
        double planned = nd_profile_planned_density_per_cm2(p);
        if (planned < 0 || planned <= area->max_density_per_cm2)
                return;
        char value[32];
        snprintf(value, sizeof value, "%.0f", planned);
        nd_diags_add(ctx->diags, ctx->file, area_cm2_node->line, area_cm2_node->column, "area_cm2",
                     "above-density-max", value, limit,
                     "the planned dose of %s punctures/cm² (%" PRIu32 " needles x %g Hz x %" PRIu32 " s / %g cm²) "
                     "exceeds the %s punctures/cm² maximum for area %s (%s line %u)",
                     value, p->needles, p->speed_hz, p->duration_s, p->area_cm2, limit, area->name,
                     nd_limits_display_name(limits), area->line);
}

void nd_profile_skin_types_text(const nd_profile *p, char buf[static 32]) {
        size_t used = 0;
        buf[0] = '\0';
        for (int t = 0; p->has_skin_types && t < ND_SKIN_TYPES_COUNT; t++)
                if (p->skin_types[t])
                        used += (size_t) snprintf(buf + used, 32 - used, "%s%s", used ? ", " : "",
                                                  nd_skin_type_to_string((nd_skin_type) t));
}

int nd_profile_check_skin_type(const nd_profile *p, const nd_limits *limits, const char *skin_type,
                               nd_skin_type *ret, nd_diags *diags) {
        *ret = ND_SKIN_TYPE_NONE;
        if (!skin_type || !*skin_type) {
                if (!limits->session.require_skin_type)
                        return 0;
                nd_diags_add(diags, NULL, 0, 0, "skin_type", "missing-field", NULL, nd_skin_type_names(),
                             "the limits require a skin type for every session (session.require_skin_type, %s); "
                             "give the option skin_type (%s)", nd_limits_display_name(limits), nd_skin_type_names());
                return -EINVAL;
        }
        nd_skin_type t = nd_skin_type_from_string(skin_type);
        if (t == ND_SKIN_TYPE_NONE) {
                _cleanup_free_ char *text = nd_text_sanitize(skin_type, strlen(skin_type), ND_DIAG_VALUE_MAX);
                nd_diags_add(diags, NULL, 0, 0, "skin_type", "unknown-skin-type", text, nd_skin_type_names(),
                             "skin type '%s' is not a Fitzpatrick type; the types are: %s", strempty(text),
                             nd_skin_type_names());
                return -EINVAL;
        }
        bool failed = false;
        if (p->has_skin_types && !p->skin_types[t]) {
                char list[32];
                nd_profile_skin_types_text(p, list);
                nd_diags_add(diags, NULL, 0, 0, "skin_type", "skin-type-not-allowed", skin_type, list,
                             "profile %s is meant for skin types %s, not %s", strempty(p->name), list, skin_type);
                failed = true;
        }
        if (p->has_depth_mm && nd_limits_check_skin_type_depth(limits, t, p->depth_mm, NULL, diags) < 0)
                failed = true;
        if (failed)
                return -EINVAL;
        *ret = t;
        return 0;
}

int nd_profile_parse(const void *data, size_t len, const char *filename, const nd_limits *limits,
                     nd_profile **ret, nd_diags *diags) {
        _cleanup_diags_ nd_diags local = ND_DIAGS_INIT;
        nd_yctx ctx = { .file = filename, .diags = &local };
        *ret = NULL;

        _cleanup_(nd_profile_freep) nd_profile *p = calloc(1, sizeof *p);
        if (!p)
                return -ENOMEM;
        nd_sha256_hex(data, len, p->digest);

        if (!limits)
                nd_diags_add(&local, filename, 0, 0, "", "no-limits", NULL, NULL,
                             "no valid safety limits are in force, so area, depth, speed, duration and needles "
                             "could not be checked against them");

        nd_yaml_error error;
        _cleanup_(nd_ynode_freep) nd_ynode *root = NULL;
        int r = nd_yaml_parse(data, len, &root, &error);
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                nd_yaml_error_to_diag(&error, filename, &local);
        else if (!root || root->kind != ND_YNODE_MAPPING)
                nd_diags_add(&local, filename, root ? root->line : 1, root ? root->column : 1, "", "not-a-mapping",
                             root && root->kind == ND_YNODE_SCALAR ? root->scalar : NULL, NULL,
                             "a profile must be a mapping with the keys name, indication, area, depth_mm, "
                             "speed_hz, duration_s and needles, not %s", nd_ynode_describe(root));
        else {
                nd_yfield f[] = {
                        ND_YFIELD_REQUIRED("name"),       ND_YFIELD_REQUIRED("indication"), ND_YFIELD_REQUIRED("area"),
                        ND_YFIELD_REQUIRED("depth_mm"),   ND_YFIELD_REQUIRED("speed_hz"),   ND_YFIELD_REQUIRED("duration_s"),
                        ND_YFIELD_REQUIRED("needles"),    ND_YFIELD_OPTIONAL("notes"),     ND_YFIELD_OPTIONAL("aftercare"),
                        ND_YFIELD_OPTIONAL("skin_types"), ND_YFIELD_OPTIONAL("passes"),    ND_YFIELD_OPTIONAL("area_cm2"),
                };
                nd_ymap_fields(&ctx, root, "", f, ELEMENTSOF(f));

                const nd_area_limits *area = NULL;
                if (f[0].value)
                        check_name(&ctx, p, f[0].value);
                if (f[1].value)
                        check_indication(&ctx, p, f[1].value);
                if (f[2].value)
                        area = check_area(&ctx, p, f[2].value, limits);
                if (f[3].value)
                        check_depth(&ctx, p, f[3].value, limits, area);
                if (f[4].value)
                        check_speed(&ctx, p, f[4].value, limits, area);
                if (f[5].value)
                        check_duration(&ctx, p, f[5].value, limits, area);
                if (f[6].value)
                        check_needles(&ctx, p, f[6].value, limits);
                if (f[7].value)
                        check_notes(&ctx, p, f[7].value);
                if (f[8].value)
                        check_aftercare(&ctx, p, f[8].value);
                if (f[9].value)
                        check_skin_types(&ctx, p, f[9].value);
                if (f[10].value)
                        check_passes(&ctx, p, f[10].value);
                if (f[11].value)
                        check_area_cm2(&ctx, p, f[11].value);
                check_skin_type_caps(&ctx, p, f[3].value, limits);
                if (f[2].value)
                        check_density(&ctx, p, limits, area, f[2].value, f[11].value);
        }

        if (nd_diags_sort(&local) < 0)
                return -ENOMEM;
        if (local.oom)
                return -ENOMEM;
        p->valid = nd_diags_count(&local) == 0;
        if (diags && nd_diags_move(diags, &local) < 0)
                return -ENOMEM;
        if (p->valid) {
                *ret = TAKE_PTR(p);
                return 0;
        }
        if (root && root->kind == ND_YNODE_MAPPING)
                *ret = TAKE_PTR(p);
        return -EINVAL;
}

int nd_profile_load_file(const char *path, const nd_limits *limits, nd_profile **ret, nd_diags *diags) {
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
        return nd_profile_parse(data, len, path, limits, ret, diags);
}

int nd_profile_check_pen(const nd_profile *p, const nd_pen_caps *caps, bool has_cartridge,
                         uint32_t cartridge_needles, nd_diags *diags) {
        size_t before = nd_diags_count(diags);
        bool failed = false;
        char v[32], lo[32], hi[32], step[32], limit[96];

        if (p->has_depth_mm) {
                nd_format_number(p->depth_mm, v);
                nd_format_number(caps->depth_min_mm, lo);
                nd_format_number(caps->depth_max_mm, hi);
                if (p->depth_mm < caps->depth_min_mm - ND_PEN_STEP_TOLERANCE_MM ||
                    p->depth_mm > caps->depth_max_mm + ND_PEN_STEP_TOLERANCE_MM) {
                        snprintf(limit, sizeof limit, "%s to %s mm", lo, hi);
                        nd_diags_add(diags, NULL, 0, 0, "depth_mm", "beyond-pen-range", v, limit,
                                     "depth_mm %s is outside this pen's depth range of %s", v, limit);
                        failed = true;
                } else if (caps->depth_step_mm > 0) {
                        /* The grid starts at the pen's minimum depth. */
                        double k = round((p->depth_mm - caps->depth_min_mm) / caps->depth_step_mm);
                        double on_grid = caps->depth_min_mm + k * caps->depth_step_mm;
                        if (fabs(p->depth_mm - on_grid) > ND_PEN_STEP_TOLERANCE_MM) {
                                double below = on_grid > p->depth_mm ? on_grid - caps->depth_step_mm : on_grid;
                                char a[32], b[32];
                                nd_format_number(caps->depth_step_mm, step);
                                nd_format_number(below, a);
                                nd_format_number(below + caps->depth_step_mm, b);
                                snprintf(limit, sizeof limit, "steps of %s mm from %s mm", step, lo);
                                nd_diags_add(diags, NULL, 0, 0, "depth_mm", "off-step", v, limit,
                                             "depth_mm %s is not on this pen's %s; the nearest settings are %s and %s mm",
                                             v, limit, a, b);
                                failed = true;
                        }
                }
        }

        if (p->has_speed_hz && (p->speed_hz < caps->speed_min_hz || p->speed_hz > caps->speed_max_hz)) {
                nd_format_number(p->speed_hz, v);
                nd_format_number(caps->speed_min_hz, lo);
                nd_format_number(caps->speed_max_hz, hi);
                snprintf(limit, sizeof limit, "%s to %s Hz", lo, hi);
                nd_diags_add(diags, NULL, 0, 0, "speed_hz", "beyond-pen-range", v, limit,
                             "speed_hz %s is outside this pen's speed range of %s", v, limit);
                failed = true;
        }

        if (has_cartridge && p->has_needles && p->needles != cartridge_needles) {
                snprintf(v, sizeof v, "%" PRIu32, p->needles);
                snprintf(limit, sizeof limit, "%" PRIu32, cartridge_needles);
                nd_diags_add(diags, NULL, 0, 0, "needles", "needles-mismatch", v, limit,
                             "the profile is written for %" PRIu32 "-needle cartridges but the inserted cartridge has %" PRIu32 " needles",
                             p->needles, cartridge_needles);
                failed = true;
        }

        if (diags && diags->oom && nd_diags_count(diags) == before)
                return -ENOMEM;
        return failed ? -EINVAL : 0;
}

void nd_profile_set_free(nd_profile_set *set) {
        if (!set)
                return;
        for (size_t i = 0; i < set->n_entries; i++) {
                free(set->entries[i].path);
                free(set->entries[i].file_name);
                nd_profile_free(set->entries[i].profile);
                nd_diags_clear(&set->entries[i].violations);
        }
        free(set->entries);
        free(set);
}

static int compare_strings(const void *a, const void *b) {
        return strcmp(*(const char *const *) a, *(const char *const *) b);
}

static bool has_profile_suffix(const char *name) {
        size_t len = strlen(name), suffix = strlen(PROFILE_SUFFIX);
        return name[0] != '.' && len > suffix && STREQ(name + len - suffix, PROFILE_SUFFIX);
}

static void free_names(char **names, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(names[i]);
        free(names);
}

/* The sorted *.yaml names of a directory. */
static int list_profile_files(const char *dir, char ***ret, size_t *ret_n) {
        DIR *d = opendir(dir);
        if (!d)
                return -errno;

        char **names = NULL;
        size_t n = 0, allocated = 0;
        int r = 0;
        struct dirent *de;
        errno = 0;
        while ((de = readdir(d))) {
                if (!has_profile_suffix(de->d_name))
                        continue;
                if (n == allocated) {
                        size_t want = allocated ? allocated * 2 : 16;
                        char **grown = reallocarray(names, want, sizeof(char *));
                        if (!grown) {
                                r = -ENOMEM;
                                break;
                        }
                        names = grown;
                        allocated = want;
                }
                names[n] = strdup(de->d_name);
                if (!names[n]) {
                        r = -ENOMEM;
                        break;
                }
                n++;
                errno = 0;
        }
        if (r == 0 && errno != 0)
                r = -errno;
        closedir(d);
        if (r < 0) {
                free_names(names, n);
                return r;
        }
        if (n > 0)
                qsort(names, n, sizeof(char *), compare_strings);
        *ret = names;
        *ret_n = n;
        return 0;
}

static int load_entry(nd_profile_entry *e, const char *dir, const char *name, const nd_limits *limits) {
        e->file_name = strdup(name);
        if (!e->file_name || asprintf(&e->path, "%s/%s", dir, name) < 0) {
                e->path = NULL;
                return -ENOMEM;
        }
        int r = nd_profile_load_file(e->path, limits, &e->profile, &e->violations);
        if (r == -ENOMEM || e->violations.oom)
                return -ENOMEM;
        e->valid = r == 0;
        if (!e->profile) {
                e->profile = calloc(1, sizeof(nd_profile));
                if (!e->profile)
                        return -ENOMEM;
        }
        return 0;
}

int nd_profile_dir_load(const char *dir, const nd_limits *limits, nd_profile_set **ret) {
        char **names = NULL;
        size_t n = 0;
        int r = list_profile_files(dir, &names, &n);
        if (r < 0)
                return r;

        _cleanup_(nd_profile_set_freep) nd_profile_set *set = calloc(1, sizeof *set);
        if (!set || (n > 0 && !(set->entries = calloc(n, sizeof(nd_profile_entry))))) {
                free_names(names, n);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n && r == 0; i++) {
                r = load_entry(&set->entries[i], dir, names[i], limits);
                set->n_entries = i + 1;
        }
        free_names(names, n);
        if (r < 0)
                return r;

        /* The first file (in name order) owns a name; later ones are refused, so what
         * LoadProfile(name) arms never depends on which file happens to be read first. */
        for (size_t i = 0; i < set->n_entries; i++) {
                nd_profile_entry *e = &set->entries[i];
                if (!e->profile->has_name)
                        continue;
                for (size_t j = 0; j < i; j++) {
                        const nd_profile_entry *earlier = &set->entries[j];
                        if (!earlier->profile->has_name || !STREQ(earlier->profile->name, e->profile->name))
                                continue;
                        _cleanup_free_ char *name = nd_text_sanitize(e->profile->name, strlen(e->profile->name),
                                                                     ND_DIAG_VALUE_MAX);
                        if (nd_diags_add(&e->violations, e->path, e->profile->name_line, e->profile->name_column,
                                         "name", "duplicate-name", e->profile->name, earlier->file_name,
                                         "name '%s' is already used by %s; installed profiles need unique names",
                                         strempty(name), earlier->file_name) < 0)
                                return -ENOMEM;
                        e->valid = false;
                        e->profile->valid = false;
                        break;
                }
        }
        *ret = TAKE_PTR(set);
        return 0;
}

const nd_profile_entry *nd_profile_set_find(const nd_profile_set *set, const char *name) {
        if (!set || !name)
                return NULL;
        for (size_t i = 0; i < set->n_entries; i++)
                if (set->entries[i].profile->has_name && STREQ(set->entries[i].profile->name, name))
                        return &set->entries[i];
        return NULL;
}
