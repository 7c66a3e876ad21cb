/* yamltree.h: a bounded YAML loader for configuration files, and strict typed accessors.
 *
 * The loader runs libyaml's event parser and builds a small tree (scalars, mappings,
 * sequences) that remembers the 1-based line and column of every node, each scalar's style
 * and any tag. Input is hostile until proven otherwise, so the loader refuses, quickly and
 * with bounded memory: documents over ND_YAML_MAX_DOCUMENT_BYTES (before parsing), NUL
 * bytes, anchors and aliases (which is what stops "billion laughs" alias bombs), nesting
 * deeper than ND_YAML_MAX_DEPTH, more than ND_YAML_MAX_NODES nodes, scalars longer than
 * ND_YAML_MAX_SCALAR_BYTES and more than one document.
 *
 * Duplicate keys are marked on each mapping pair (the schema walkers report them).
 *
 * The accessors implement one strict schema for every configuration format: numbers are
 * plain (unquoted) decimal scalars, booleans are exactly `true` or `false`, and strings are
 * any scalar except a null. Each accessor reports a problem as a diagnostic on the value's
 * position and returns -EINVAL; the caller carries on to find every other problem. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "diag.h"
#include "util.h"

#define ND_YAML_MAX_DOCUMENT_BYTES (1024u * 1024u)
#define ND_YAML_MAX_DEPTH          32u
#define ND_YAML_MAX_NODES          10000u
#define ND_YAML_MAX_SCALAR_BYTES   (64u * 1024u)

/* Code of every diagnostic about YAML that could not be loaded into a tree. */
#define ND_YAML_SYNTAX_CODE "yaml-syntax"

typedef enum nd_ynode_kind {
        ND_YNODE_SCALAR,
        ND_YNODE_MAPPING,
        ND_YNODE_SEQUENCE,
} nd_ynode_kind;

typedef enum nd_yscalar_style {
        ND_YSTYLE_PLAIN,
        ND_YSTYLE_SINGLE_QUOTED,
        ND_YSTYLE_DOUBLE_QUOTED,
        ND_YSTYLE_LITERAL,
        ND_YSTYLE_FOLDED,
} nd_yscalar_style;

typedef struct nd_ynode nd_ynode;

typedef struct nd_ypair {
        nd_ynode *key;
        nd_ynode *value;
        bool duplicate;         /* an earlier pair of the same mapping has the same scalar key */
        size_t first;           /* when duplicate: index of that earlier pair */
} nd_ypair;

struct nd_ynode {
        nd_ynode_kind kind;
        unsigned line;          /* 1-based, of the node's first character */
        unsigned column;        /* 1-based, in characters */
        char *tag;              /* as resolved by libyaml ("tag:yaml.org,2002:str"), or NULL */

        /* ND_YNODE_SCALAR: NUL-terminated; never contains a NUL (those are refused) */
        char *scalar;
        size_t scalar_len;
        nd_yscalar_style style;

        /* ND_YNODE_MAPPING */
        nd_ypair *pairs;
        size_t n_pairs;
        size_t n_pairs_allocated;

        /* ND_YNODE_SEQUENCE */
        nd_ynode **items;
        size_t n_items;
        size_t n_items_allocated;
};

typedef enum nd_yaml_error_kind {
        ND_YAML_ERROR_NONE,
        ND_YAML_ERROR_SYNTAX,           /* libyaml's own error (problem text, line, column) */
        ND_YAML_ERROR_TOO_LARGE,
        ND_YAML_ERROR_NUL,
        ND_YAML_ERROR_ALIAS,            /* anchors and aliases */
        ND_YAML_ERROR_TOO_DEEP,
        ND_YAML_ERROR_TOO_MANY_NODES,
        ND_YAML_ERROR_SCALAR_TOO_LONG,
        ND_YAML_ERROR_MULTIPLE_DOCUMENTS,
} nd_yaml_error_kind;

typedef struct nd_yaml_error {
        nd_yaml_error_kind kind;
        unsigned line;          /* 1-based; 0 when not applicable (too large) */
        unsigned column;
        char message[320];      /* a sentence saying what is wrong and where */
} nd_yaml_error;

/* Parses len bytes of YAML into a tree. On success returns 0 and *ret is the root (NULL for
 * an empty document); the caller frees it with nd_ynode_free(). Returns -EINVAL with *error
 * filled in for input that is refused, -ENOMEM. */
int nd_yaml_parse(const void *data, size_t len, nd_ynode **ret, nd_yaml_error *error);

/* Frees a node and everything below it. NULL is fine. */
void nd_ynode_free(nd_ynode *node);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_ynode *, nd_ynode_free)

/* The value of the scalar key `key` in a mapping (first occurrence), or NULL. Borrowed. */
const nd_ynode *nd_ynode_lookup(const nd_ynode *map, const char *key);

/* "a mapping", "a list", "a string", ... for messages. Static. */
const char *nd_ynode_describe(const nd_ynode *node);

/* Reads a file for the loaders: at most ND_YAML_MAX_DOCUMENT_BYTES + 1 bytes, so a file that
 * is too large is noticed without reading it all. Returns 0 with a malloc'd, NUL-terminated
 * buffer the caller frees; -errno when it cannot be read; -EISDIR for a directory and
 * -EBADFD for anything else that is not a regular file (a FIFO would block the reader). */
int nd_yaml_read_file(const char *path, char **ret_data, size_t *ret_len);

/* Adds the diagnostic for a refused document (code ND_YAML_SYNTAX_CODE, field ""). */
int nd_yaml_error_to_diag(const nd_yaml_error *error, const char *file, nd_diags *diags);

/* Where the accessors report: the file name for diagnostics (NULL for client data). */
typedef struct nd_yctx {
        const char *file;
        nd_diags *diags;
} nd_yctx;

/* One key a schema mapping may hold; nd_ymap_fields() fills in key_node and value. */
typedef struct nd_yfield {
        const char *key;
        bool required;
        const nd_ynode *key_node;
        const nd_ynode *value;
} nd_yfield;

#define ND_YFIELD_REQUIRED(k) { .key = (k), .required = true }
#define ND_YFIELD_OPTIONAL(k) { .key = (k), .required = false }

/* Matches the pairs of a mapping against the known fields. Reports, with path as the
 * mapping's dotted path ("" for the document): a node that is not a mapping (wrong-type),
 * keys that are not plain strings and unknown keys (unknown-field, at the key), duplicate
 * keys (duplicate-key, at the second key, field = its dotted path) and required keys that are
 * missing (missing-field, at the mapping). Returns 0 when the node is a mapping (even with
 * problems reported), -EINVAL when it is not. */
int nd_ymap_fields(const nd_yctx *ctx, const nd_ynode *map, const char *path,
                   nd_yfield *fields, size_t n_fields);

/* Strict typed reads of a value; field is its dotted path. 0, or -EINVAL with a diagnostic
 * (wrong-type, not-finite, out-of-range for an integer that does not fit int64_t). */
int nd_yget_number(const nd_yctx *ctx, const nd_ynode *node, const char *field, double *ret);
int nd_yget_integer(const nd_yctx *ctx, const nd_ynode *node, const char *field, int64_t *ret);
int nd_yget_bool(const nd_yctx *ctx, const nd_ynode *node, const char *field, bool *ret);
/* *ret borrows the node's text. */
int nd_yget_string(const nd_yctx *ctx, const nd_ynode *node, const char *field, const char **ret);

/* Formats a number for messages the shortest way that reads back the same ("0.15", "1200"). */
void nd_format_number(double v, char buf[static 32]);
