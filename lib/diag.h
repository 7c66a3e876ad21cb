/* diag.h: diagnostics about configuration input (limits files, treatment profiles).
 *
 * A diagnostic says where a problem is (file, 1-based line and column), what it concerns (a
 * dotted field path such as "pen.speed_hz.min", or "" for the document itself), a stable
 * kebab-case code for programs, and a sentence for people that names the value and the limit.
 * Loaders collect every problem of an input into one nd_diags so a person can fix them all
 * in one go. */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "util.h"

typedef struct nd_diag {
        char *file;     /* NULL for data that did not come from a file (e.g. sent by a client) */
        unsigned line;  /* 1-based; 0 when not applicable */
        unsigned column;/* 1-based, in characters; 0 when not applicable */
        char *field;    /* dotted path, "" for the document; never NULL */
        char *code;     /* stable kebab-case identifier; never NULL */
        char *message;  /* one sentence naming the value and the limit; never NULL */
        char *value;    /* the offending value as written (sanitized, bounded), or NULL */
        char *limit;    /* the limit that was broken, as text, or NULL */
} nd_diag;

typedef struct nd_diags {
        nd_diag *items;
        size_t n_items;
        size_t n_allocated;
        bool oom;       /* an add failed for lack of memory: the list is incomplete */
} nd_diags;

#define ND_DIAGS_INIT { .items = NULL }

/* Longest rendering of a user-supplied value inside a message or diag->value, in bytes. */
#define ND_DIAG_VALUE_MAX 120

/* Appends a diagnostic; every string is copied (file, value, limit may be NULL; field NULL
 * means ""). The message is printf-formatted. A NULL list is accepted and ignored.
 * Returns 0, or -ENOMEM (and sets d->oom). */
_printf_(9, 10)
int nd_diags_add(nd_diags *d, const char *file, unsigned line, unsigned column, const char *field,
                 const char *code, const char *value, const char *limit, const char *fmt, ...);

/* Number of diagnostics in the list (0 for NULL). */
size_t nd_diags_count(const nd_diags *d);

/* The first diagnostic with this code (and field, unless field is NULL), or NULL. Borrowed. */
const nd_diag *nd_diags_find(const nd_diags *d, const char *code, const char *field);

/* Moves every diagnostic of src to the end of dst; src is left empty. Returns 0 or -ENOMEM
 * (then src keeps what was not moved). */
int nd_diags_move(nd_diags *dst, nd_diags *src);

/* Orders the list by line, then column, keeping the order of equal positions (so a file's
 * problems read top to bottom, document-level ones first). Returns 0 or -ENOMEM. */
int nd_diags_sort(nd_diags *d);

/* Frees every diagnostic; the list is empty and reusable afterwards. */
void nd_diags_clear(nd_diags *d);

/* Formats one diagnostic as "FILE:LINE:COLUMN: FIELD: MESSAGE" (FILE "<data>" when there is
 * none, FIELD "(document)" for ""). Returns a string the caller frees, or NULL on OOM. */
char *nd_diag_format(const nd_diag *diag);

/* Joins every message with sep between them (e.g. "; " for a D-Bus error message).
 * Returns a string the caller frees ("" for an empty list), or NULL on OOM. */
char *nd_diags_join(const nd_diags *d, const char *sep);

/* Renders untrusted text for a message: control characters become \xNN, invalid UTF-8 bytes
 * become \xNN, and text beyond max_bytes is cut at a character boundary and ends in "...".
 * Returns a string the caller frees, or NULL on OOM. */
char *nd_text_sanitize(const char *s, size_t len, size_t max_bytes);

static inline void nd_diags_clearp(nd_diags *d) { nd_diags_clear(d); }
#define _cleanup_diags_ _cleanup_(nd_diags_clearp)
