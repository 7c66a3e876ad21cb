/* diag.c: the diagnostics list (see diag.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diag.h"

/* Placeholder for data with no file name, chosen so "FILE:LINE:COLUMN" stays parseable. */
#define DIAG_NO_FILE "<data>"
#define DIAG_DOCUMENT_FIELD "(document)"

static void diag_free_contents(nd_diag *diag) {
        free(diag->file);
        free(diag->field);
        free(diag->code);
        free(diag->message);
        free(diag->value);
        free(diag->limit);
}

static int strdup_opt(const char *s, char **ret) {
        if (!s) {
                *ret = NULL;
                return 0;
        }
        *ret = strdup(s);
        return *ret ? 0 : -ENOMEM;
}

static int diags_reserve(nd_diags *d, size_t extra) {
        if (d->n_items + extra <= d->n_allocated)
                return 0;
        size_t want = MAX(d->n_allocated * 2, d->n_items + extra);
        want = MAX(want, (size_t) 8);
        if (want > SIZE_MAX / sizeof(nd_diag))
                return -ENOMEM;
        nd_diag *n = realloc(d->items, want * sizeof(nd_diag));
        if (!n)
                return -ENOMEM;
        d->items = n;
        d->n_allocated = want;
        return 0;
}

int nd_diags_add(nd_diags *d, const char *file, unsigned line, unsigned column, const char *field,
                 const char *code, const char *value, const char *limit, const char *fmt, ...) {
        if (!d)
                return 0;

        nd_diag diag = { .line = line, .column = column };
        va_list ap;
        va_start(ap, fmt);
        int r = vasprintf(&diag.message, fmt, ap);
        va_end(ap);
        if (r < 0) {
                diag.message = NULL;
                goto oom;
        }
        if (strdup_opt(file && *file ? file : NULL, &diag.file) < 0 ||
            strdup_opt(field ? field : "", &diag.field) < 0 ||
            strdup_opt(code, &diag.code) < 0 || !diag.code ||
            strdup_opt(limit, &diag.limit) < 0)
                goto oom;
        if (value) {
                diag.value = nd_text_sanitize(value, strlen(value), ND_DIAG_VALUE_MAX);
                if (!diag.value)
                        goto oom;
        }
        if (diags_reserve(d, 1) < 0)
                goto oom;
        d->items[d->n_items++] = diag;
        return 0;

oom:
        diag_free_contents(&diag);
        d->oom = true;
        return -ENOMEM;
}

size_t nd_diags_count(const nd_diags *d) {
        return d ? d->n_items : 0;
}

const nd_diag *nd_diags_find(const nd_diags *d, const char *code, const char *field) {
        if (!d || !code)
                return NULL;
        for (size_t i = 0; i < d->n_items; i++)
                if (STREQ(d->items[i].code, code) && (!field || STREQ(d->items[i].field, field)))
                        return &d->items[i];
        return NULL;
}

int nd_diags_move(nd_diags *dst, nd_diags *src) {
        if (!src || src->n_items == 0)
                return 0;
        if (diags_reserve(dst, src->n_items) < 0)
                return -ENOMEM;
        memcpy(dst->items + dst->n_items, src->items, src->n_items * sizeof(nd_diag));
        dst->n_items += src->n_items;
        dst->oom = dst->oom || src->oom;
        free(src->items);
        *src = (nd_diags) ND_DIAGS_INIT;
        return 0;
}

static bool diag_before(const nd_diag *a, const nd_diag *b) {
        return a->line < b->line || (a->line == b->line && a->column < b->column);
}

int nd_diags_sort(nd_diags *d) {
        if (!d || d->n_items < 2)
                return 0;
        /* Bottom-up merge sort: stable, and O(n log n) even for hostile inputs. */
        nd_diag *tmp = malloc(d->n_items * sizeof(nd_diag));
        if (!tmp)
                return -ENOMEM;
        nd_diag *src = d->items, *dst = tmp;
        size_t n = d->n_items;
        for (size_t width = 1; width < n; width *= 2) {
                for (size_t lo = 0; lo < n; lo += 2 * width) {
                        size_t mid = MIN(lo + width, n), hi = MIN(lo + 2 * width, n), i = lo, j = mid, k = lo;
                        while (i < mid && j < hi)
                                dst[k++] = diag_before(&src[j], &src[i]) ? src[j++] : src[i++];
                        while (i < mid)
                                dst[k++] = src[i++];
                        while (j < hi)
                                dst[k++] = src[j++];
                }
                nd_diag *swap = src;
                src = dst;
                dst = swap;
        }
        if (src != d->items)
                memcpy(d->items, src, n * sizeof(nd_diag));
        free(tmp);
        return 0;
}

void nd_diags_clear(nd_diags *d) {
        if (!d)
                return;
        for (size_t i = 0; i < d->n_items; i++)
                diag_free_contents(&d->items[i]);
        free(d->items);
        *d = (nd_diags) ND_DIAGS_INIT;
}

char *nd_diag_format(const nd_diag *diag) {
        char *s = NULL;
        if (asprintf(&s, "%s:%u:%u: %s: %s",
                     diag->file ? diag->file : DIAG_NO_FILE, diag->line, diag->column,
                     diag->field && *diag->field ? diag->field : DIAG_DOCUMENT_FIELD,
                     diag->message) < 0)
                return NULL;
        return s;
}

char *nd_diags_join(const nd_diags *d, const char *sep) {
        size_t sep_len = strlen(strempty(sep)), total = 1;
        for (size_t i = 0; i < nd_diags_count(d); i++)
                total += strlen(d->items[i].message) + (i > 0 ? sep_len : 0);

        char *s = malloc(total), *p = s;
        if (!s)
                return NULL;
        for (size_t i = 0; i < nd_diags_count(d); i++) {
                if (i > 0)
                        p = stpcpy(p, strempty(sep));
                p = stpcpy(p, d->items[i].message);
        }
        *p = '\0';
        return s;
}

/* Length of the valid UTF-8 sequence at s (at most len bytes), or 0 if it is not valid.
 * Overlong forms, surrogates and code points above U+10FFFF are not valid. */
static size_t utf8_sequence_length(const unsigned char *s, size_t len) {
        unsigned char c = s[0];
        size_t n;
        uint32_t cp;
        if (c < 0x80)
                return 1;
        if (c >= 0xc2 && c <= 0xdf) {
                n = 2;
                cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
                n = 3;
                cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
                n = 4;
                cp = c & 0x07;
        } else
                return 0;
        if (n > len)
                return 0;
        for (size_t i = 1; i < n; i++) {
                if ((s[i] & 0xc0) != 0x80)
                        return 0;
                cp = (cp << 6) | (s[i] & 0x3f);
        }
        if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
                return 0;
        return n;
}

char *nd_text_sanitize(const char *s, size_t len, size_t max_bytes) {
        static const char ellipsis[] = "...";
        /* Worst case: every byte becomes a 4-byte escape, plus the ellipsis. */
        size_t cap = MIN(len, max_bytes) * 4 + sizeof ellipsis + 1;
        char *out = malloc(cap), *p = out;
        if (!out)
                return NULL;

        const unsigned char *u = (const unsigned char *) s;
        size_t i = 0;
        while (i < len) {
                size_t n = utf8_sequence_length(u + i, len - i);
                bool escape = n == 0 || u[i] < 0x20 || u[i] == 0x7f;
                size_t out_n = escape ? 4 : n;
                if ((size_t) (p - out) + out_n > max_bytes) {
                        p = stpcpy(p, ellipsis);
                        break;
                }
                if (escape) {
                        p += snprintf(p, 5, "\\x%02x", u[i]);
                        i++;
                } else {
                        memcpy(p, u + i, n);
                        p += n;
                        i += n;
                }
        }
        *p = '\0';
        return out;
}
