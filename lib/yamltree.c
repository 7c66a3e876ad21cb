/* yamltree.c: bounded YAML loading on libyaml's event parser, and the strict schema accessors.
 *
 * Why events and not yaml_parser_load(): the document loader resolves aliases into a node
 * graph and has no bounds of its own, so an alias bomb or a deeply nested document costs
 * memory and time before we could look at it. With events every limit is checked before
 * the node it concerns exists. */
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <yaml.h>

#include "yamltree.h"

#define YAML_TAG_STR   "tag:yaml.org,2002:str"
#define YAML_TAG_INT   "tag:yaml.org,2002:int"
#define YAML_TAG_FLOAT "tag:yaml.org,2002:float"
#define YAML_TAG_BOOL  "tag:yaml.org,2002:bool"
#define YAML_TAG_MAP   "tag:yaml.org,2002:map"
#define YAML_TAG_SEQ   "tag:yaml.org,2002:seq"
#define YAML_TAG_NON_SPECIFIC "!"

/* How much of a user-written key or value a message quotes. */
#define MESSAGE_TEXT_MAX 80

typedef struct parse_state {
        const unsigned char *data;
        size_t len;
        nd_ynode *root;
        nd_ynode *stack[ND_YAML_MAX_DEPTH];
        size_t depth;
        size_t n_nodes;
        unsigned n_documents;
        nd_yaml_error *error;
} parse_state;

_printf_(5, 6)
static int set_error(nd_yaml_error *error, nd_yaml_error_kind kind, unsigned line, unsigned column,
                     const char *fmt, ...) {
        error->kind = kind;
        error->line = line;
        error->column = column;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(error->message, sizeof error->message, fmt, ap);
        va_end(ap);
        return -EINVAL;
}

/* 1-based line and column (in characters, like libyaml) of a byte offset. */
static void offset_position(const unsigned char *data, size_t len, size_t offset,
                            unsigned *ret_line, unsigned *ret_column) {
        unsigned line = 1, column = 1;
        for (size_t i = 0; i < offset && i < len; i++) {
                if (data[i] == '\n' || (data[i] == '\r' && (i + 1 >= len || data[i + 1] != '\n'))) {
                        line++;
                        column = 1;
                } else if ((data[i] & 0xc0) != 0x80 && data[i] != '\r')
                        column++;
        }
        *ret_line = line;
        *ret_column = column;
}

void nd_ynode_free(nd_ynode *node) {
        if (!node)
                return;
        for (size_t i = 0; i < node->n_pairs; i++) {
                nd_ynode_free(node->pairs[i].key);
                nd_ynode_free(node->pairs[i].value);
        }
        for (size_t i = 0; i < node->n_items; i++)
                nd_ynode_free(node->items[i]);
        free(node->pairs);
        free(node->items);
        free(node->scalar);
        free(node->tag);
        free(node);
}

static int grow(void **array, size_t *allocated, size_t used, size_t item_size) {
        if (used < *allocated)
                return 0;
        size_t want = *allocated ? *allocated * 2 : 4;
        void *n = reallocarray(*array, want, item_size);
        if (!n)
                return -ENOMEM;
        *array = n;
        *allocated = want;
        return 0;
}

/* Hangs a new node under the innermost open collection (or makes it the root). The node is
 * owned by the tree as soon as this returns 0, so one free of the root cleans up. */
static int attach(parse_state *s, nd_ynode *node) {
        if (s->depth == 0) {
                s->root = node;
                return 0;
        }
        nd_ynode *parent = s->stack[s->depth - 1];
        if (parent->kind == ND_YNODE_SEQUENCE) {
                if (grow((void **) &parent->items, &parent->n_items_allocated, parent->n_items,
                         sizeof(nd_ynode *)) < 0)
                        return -ENOMEM;
                parent->items[parent->n_items++] = node;
                return 0;
        }
        if (parent->n_pairs > 0 && !parent->pairs[parent->n_pairs - 1].value) {
                parent->pairs[parent->n_pairs - 1].value = node;
                return 0;
        }
        if (grow((void **) &parent->pairs, &parent->n_pairs_allocated, parent->n_pairs,
                 sizeof(nd_ypair)) < 0)
                return -ENOMEM;
        parent->pairs[parent->n_pairs++] = (nd_ypair) { .key = node };
        return 0;
}

static int new_node(parse_state *s, nd_ynode_kind kind, const yaml_event_t *ev,
                    const yaml_char_t *tag, const yaml_char_t *anchor, nd_ynode **ret) {
        unsigned line = (unsigned) ev->start_mark.line + 1, column = (unsigned) ev->start_mark.column + 1;

        if (anchor)
                return set_error(s->error, ND_YAML_ERROR_ALIAS, line, column,
                                 "anchor '&%.64s' at line %u, column %u: anchors and aliases are not supported",
                                 (const char *) anchor, line, column);
        if (++s->n_nodes > ND_YAML_MAX_NODES)
                return set_error(s->error, ND_YAML_ERROR_TOO_MANY_NODES, line, column,
                                 "more than %u nodes (line %u, column %u): the document is too large",
                                 ND_YAML_MAX_NODES, line, column);

        nd_ynode *node = calloc(1, sizeof *node);
        if (!node)
                return -ENOMEM;
        node->kind = kind;
        node->line = line;
        node->column = column;
        if (tag) {
                node->tag = strdup((const char *) tag);
                if (!node->tag) {
                        free(node);
                        return -ENOMEM;
                }
        }
        if (attach(s, node) < 0) {
                nd_ynode_free(node);
                return -ENOMEM;
        }
        *ret = node;
        return 0;
}

static int compare_pair_keys(const void *a, const void *b) {
        const nd_ypair *x = *(const nd_ypair *const *) a, *y = *(const nd_ypair *const *) b;
        size_t lx = x->key->scalar_len, ly = y->key->scalar_len;
        int c = memcmp(x->key->scalar, y->key->scalar, MIN(lx, ly));
        if (c != 0)
                return c;
        if (lx != ly)
                return lx < ly ? -1 : 1;
        /* Same key: keep document order, so the first occurrence leads its run. */
        return x < y ? -1 : (x > y ? 1 : 0);
}

/* Marks every pair whose scalar key already appeared earlier in the mapping. Sorting keeps
 * this O(n log n) even for a mapping with thousands of keys. */
static int mark_duplicates(nd_ynode *map) {
        if (map->n_pairs < 2)
                return 0;
        nd_ypair **sorted = calloc(map->n_pairs, sizeof(nd_ypair *));
        if (!sorted)
                return -ENOMEM;
        size_t n = 0;
        for (size_t i = 0; i < map->n_pairs; i++)
                if (map->pairs[i].key->kind == ND_YNODE_SCALAR)
                        sorted[n++] = &map->pairs[i];
        qsort(sorted, n, sizeof(nd_ypair *), compare_pair_keys);
        for (size_t i = 1; i < n; i++) {
                const nd_ypair *prev = sorted[i - 1];
                nd_ypair *cur = sorted[i];
                if (prev->key->scalar_len == cur->key->scalar_len &&
                    memcmp(prev->key->scalar, cur->key->scalar, cur->key->scalar_len) == 0) {
                        cur->duplicate = true;
                        cur->first = prev->duplicate ? prev->first : (size_t) (prev - map->pairs);
                }
        }
        free(sorted);
        return 0;
}

static int handle_scalar(parse_state *s, const yaml_event_t *ev) {
        unsigned line = (unsigned) ev->start_mark.line + 1, column = (unsigned) ev->start_mark.column + 1;
        size_t length = ev->data.scalar.length;

        if (length > ND_YAML_MAX_SCALAR_BYTES)
                return set_error(s->error, ND_YAML_ERROR_SCALAR_TOO_LONG, line, column,
                                 "value at line %u, column %u is %zu bytes long; at most %u are allowed",
                                 line, column, length, ND_YAML_MAX_SCALAR_BYTES);
        /* A "\0" escape in a double-quoted scalar: C strings downstream would be cut short. */
        if (memchr(ev->data.scalar.value, '\0', length))
                return set_error(s->error, ND_YAML_ERROR_NUL, line, column,
                                 "value at line %u, column %u contains a NUL character (an escape like \\0)",
                                 line, column);

        nd_ynode *node;
        int r = new_node(s, ND_YNODE_SCALAR, ev, ev->data.scalar.tag, ev->data.scalar.anchor, &node);
        if (r < 0)
                return r;
        node->scalar = malloc(length + 1);
        if (!node->scalar)
                return -ENOMEM;
        memcpy(node->scalar, ev->data.scalar.value, length);
        node->scalar[length] = '\0';
        node->scalar_len = length;
        /* An empty value ("key:" and nothing) has no characters of its own; libyaml puts it
         * where the next token starts, often on another line. Point at its key instead. */
        if (length == 0 && !node->tag && s->depth > 0 && ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE) {
                const nd_ynode *parent = s->stack[s->depth - 1];
                if (parent->kind == ND_YNODE_MAPPING && parent->pairs[parent->n_pairs - 1].value == node) {
                        node->line = parent->pairs[parent->n_pairs - 1].key->line;
                        node->column = parent->pairs[parent->n_pairs - 1].key->column;
                }
        }
        switch (ev->data.scalar.style) {
        case YAML_SINGLE_QUOTED_SCALAR_STYLE: node->style = ND_YSTYLE_SINGLE_QUOTED; break;
        case YAML_DOUBLE_QUOTED_SCALAR_STYLE: node->style = ND_YSTYLE_DOUBLE_QUOTED; break;
        case YAML_LITERAL_SCALAR_STYLE:       node->style = ND_YSTYLE_LITERAL; break;
        case YAML_FOLDED_SCALAR_STYLE:        node->style = ND_YSTYLE_FOLDED; break;
        default:                              node->style = ND_YSTYLE_PLAIN; break;
        }
        return 0;
}

static int handle_collection_start(parse_state *s, const yaml_event_t *ev, nd_ynode_kind kind) {
        unsigned line = (unsigned) ev->start_mark.line + 1, column = (unsigned) ev->start_mark.column + 1;
        const yaml_char_t *tag, *anchor;
        if (kind == ND_YNODE_MAPPING) {
                tag = ev->data.mapping_start.tag;
                anchor = ev->data.mapping_start.anchor;
        } else {
                tag = ev->data.sequence_start.tag;
                anchor = ev->data.sequence_start.anchor;
        }
        if (s->depth >= ND_YAML_MAX_DEPTH)
                return set_error(s->error, ND_YAML_ERROR_TOO_DEEP, line, column,
                                 "nesting deeper than %u levels at line %u, column %u",
                                 ND_YAML_MAX_DEPTH, line, column);

        nd_ynode *node;
        int r = new_node(s, kind, ev, tag, anchor, &node);
        if (r < 0)
                return r;
        s->stack[s->depth++] = node;
        return 0;
}

static int handle_event(parse_state *s, const yaml_event_t *ev) {
        unsigned line = (unsigned) ev->start_mark.line + 1, column = (unsigned) ev->start_mark.column + 1;

        switch (ev->type) {
        case YAML_DOCUMENT_START_EVENT:
                if (++s->n_documents > 1)
                        return set_error(s->error, ND_YAML_ERROR_MULTIPLE_DOCUMENTS, line, column,
                                         "a second document starts at line %u, column %u; one document per file",
                                         line, column);
                return 0;
        case YAML_ALIAS_EVENT:
                return set_error(s->error, ND_YAML_ERROR_ALIAS, line, column,
                                 "alias '*%.64s' at line %u, column %u: anchors and aliases are not supported",
                                 (const char *) ev->data.alias.anchor, line, column);
        case YAML_SCALAR_EVENT:
                return handle_scalar(s, ev);
        case YAML_SEQUENCE_START_EVENT:
                return handle_collection_start(s, ev, ND_YNODE_SEQUENCE);
        case YAML_MAPPING_START_EVENT:
                return handle_collection_start(s, ev, ND_YNODE_MAPPING);
        case YAML_MAPPING_END_EVENT:
                if (s->depth == 0)
                        return -EPROTO;
                if (mark_duplicates(s->stack[s->depth - 1]) < 0)
                        return -ENOMEM;
                s->depth--;
                return 0;
        case YAML_SEQUENCE_END_EVENT:
                if (s->depth == 0)
                        return -EPROTO;
                s->depth--;
                return 0;
        default:
                return 0;
        }
}

static int libyaml_error(const yaml_parser_t *parser, const parse_state *s) {
        unsigned line, column;

        switch (parser->error) {
        case YAML_MEMORY_ERROR:
                return -ENOMEM;
        case YAML_READER_ERROR:
                /* The reader reports a byte offset, not a mark. */
                offset_position(s->data, s->len, parser->problem_offset, &line, &column);
                if (parser->problem_value >= 0)
                        return set_error(s->error, ND_YAML_ERROR_SYNTAX, line, column,
                                         "YAML syntax error at line %u, column %u: %s (byte 0x%02x at offset %zu)",
                                         line, column, strempty(parser->problem),
                                         (unsigned) parser->problem_value, parser->problem_offset);
                return set_error(s->error, ND_YAML_ERROR_SYNTAX, line, column,
                                 "YAML syntax error at line %u, column %u: %s (offset %zu)",
                                 line, column, strempty(parser->problem), parser->problem_offset);
        default:
                line = (unsigned) parser->problem_mark.line + 1;
                column = (unsigned) parser->problem_mark.column + 1;
                if (parser->context)
                        return set_error(s->error, ND_YAML_ERROR_SYNTAX, line, column,
                                         "YAML syntax error at line %u, column %u: %s (%s at line %u, column %u)",
                                         line, column, strempty(parser->problem), parser->context,
                                         (unsigned) parser->context_mark.line + 1,
                                         (unsigned) parser->context_mark.column + 1);
                return set_error(s->error, ND_YAML_ERROR_SYNTAX, line, column,
                                 "YAML syntax error at line %u, column %u: %s",
                                 line, column, strempty(parser->problem));
        }
}

int nd_yaml_parse(const void *data, size_t len, nd_ynode **ret, nd_yaml_error *error) {
        nd_yaml_error ignored;
        if (!error)
                error = &ignored;
        *error = (nd_yaml_error) { .kind = ND_YAML_ERROR_NONE };
        *ret = NULL;
        if (!data && len > 0)
                return -EINVAL;

        if (len > ND_YAML_MAX_DOCUMENT_BYTES)
                return set_error(error, ND_YAML_ERROR_TOO_LARGE, 0, 0,
                                 "the document is larger than %u bytes (1 MiB)", ND_YAML_MAX_DOCUMENT_BYTES);

        const unsigned char *nul = len > 0 ? memchr(data, '\0', len) : NULL;
        if (nul) {
                unsigned line, column;
                size_t offset = (size_t) (nul - (const unsigned char *) data);
                offset_position(data, len, offset, &line, &column);
                return set_error(error, ND_YAML_ERROR_NUL, line, column,
                                 "NUL byte at offset %zu (line %u, column %u): the file must be UTF-8 text",
                                 offset, line, column);
        }

        parse_state s = { .data = data, .len = len, .error = error };
        yaml_parser_t parser;
        if (!yaml_parser_initialize(&parser))
                return -ENOMEM;
        yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING);
        yaml_parser_set_input_string(&parser, len > 0 ? data : (const unsigned char *) "", len);

        int r = 0;
        for (bool done = false; !done && r == 0;) {
                yaml_event_t ev;
                if (!yaml_parser_parse(&parser, &ev)) {
                        r = libyaml_error(&parser, &s);
                        break;
                }
                done = ev.type == YAML_STREAM_END_EVENT;
                r = handle_event(&s, &ev);
                yaml_event_delete(&ev);
        }
        yaml_parser_delete(&parser);

        if (r < 0) {
                nd_ynode_free(s.root);
                return r;
        }
        *ret = s.root;
        return 0;
}

const nd_ynode *nd_ynode_lookup(const nd_ynode *map, const char *key) {
        if (!map || map->kind != ND_YNODE_MAPPING)
                return NULL;
        for (size_t i = 0; i < map->n_pairs; i++)
                if (map->pairs[i].key->kind == ND_YNODE_SCALAR && STREQ(map->pairs[i].key->scalar, key))
                        return map->pairs[i].value;
        return NULL;
}

int nd_yaml_read_file(const char *path, char **ret_data, size_t *ret_len) {
        /* O_NONBLOCK: opening a FIFO must not hang the daemon; it is refused below. */
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return -errno;
        struct stat st;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (S_ISDIR(st.st_mode))
                return -EISDIR;
        if (!S_ISREG(st.st_mode))
                return -EBADFD;

        size_t cap = MIN((size_t) st.st_size, (size_t) ND_YAML_MAX_DOCUMENT_BYTES) + 1, len = 0;
        _cleanup_free_ char *buf = malloc(cap + 1);
        if (!buf)
                return -ENOMEM;
        /* The file may grow between fstat and read: read to EOF, but never past the bound. */
        while (len < (size_t) ND_YAML_MAX_DOCUMENT_BYTES + 1) {
                if (len == cap) {
                        size_t want = MIN(cap * 2, (size_t) ND_YAML_MAX_DOCUMENT_BYTES + 1);
                        char *n = realloc(buf, want + 1);
                        if (!n)
                                return -ENOMEM;
                        buf = n;
                        cap = want;
                }
                ssize_t k = read(fd, buf + len, cap - len);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
        }
        buf[len] = '\0';
        *ret_data = TAKE_PTR(buf);
        *ret_len = len;
        return 0;
}

int nd_yaml_error_to_diag(const nd_yaml_error *error, const char *file, nd_diags *diags) {
        return nd_diags_add(diags, file, error->line, error->column, "", ND_YAML_SYNTAX_CODE, NULL, NULL,
                            "%s", error->message);
}

/* ---- the strict schema ---- */

static bool is_plain_null(const nd_ynode *n) {
        return n->kind == ND_YNODE_SCALAR && n->style == ND_YSTYLE_PLAIN && !n->tag &&
               (n->scalar_len == 0 || STREQ(n->scalar, "~") || STREQ(n->scalar, "null") ||
                STREQ(n->scalar, "Null") || STREQ(n->scalar, "NULL"));
}

static const char *skip_sign(const char *s) {
        return (*s == '+' || *s == '-') ? s + 1 : s;
}

static size_t skip_digits(const char *s) {
        size_t n = 0;
        while (s[n] >= '0' && s[n] <= '9')
                n++;
        return n;
}

/* [-+]?[0-9]+ */
static bool is_decimal_integer(const char *s) {
        s = skip_sign(s);
        size_t n = skip_digits(s);
        return n > 0 && s[n] == '\0';
}

/* [-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?: YAML 1.2's core schema float, in
 * decimal only (no hex, octal or "1_000" spellings in a safety file). */
static bool is_decimal_number(const char *s) {
        s = skip_sign(s);
        size_t whole = skip_digits(s), frac = 0;
        s += whole;
        if (*s == '.') {
                s++;
                frac = skip_digits(s);
                s += frac;
        }
        if (whole == 0 && frac == 0)
                return false;
        if (*s == 'e' || *s == 'E') {
                s = skip_sign(s + 1);
                size_t exp = skip_digits(s);
                if (exp == 0)
                        return false;
                s += exp;
        }
        return *s == '\0';
}

static bool is_non_finite(const char *s) {
        static const char *const spellings[] = { ".inf", ".Inf", ".INF", ".nan", ".NaN", ".NAN" };
        const char *u = skip_sign(s);
        for (size_t i = 0; i < ELEMENTSOF(spellings); i++)
                if (STREQ(u, spellings[i]))
                        return true;
        return false;
}

static bool is_boolean_text(const char *s) {
        return STREQ(s, "true") || STREQ(s, "false");
}

const char *nd_ynode_describe(const nd_ynode *n) {
        if (!n || is_plain_null(n))
                return "nothing (null)";
        switch (n->kind) {
        case ND_YNODE_MAPPING:
                return "a mapping";
        case ND_YNODE_SEQUENCE:
                return "a list";
        case ND_YNODE_SCALAR:
        default:
                if (n->style != ND_YSTYLE_PLAIN)
                        return "quoted text";
                if (is_boolean_text(n->scalar))
                        return "a boolean";
                if (is_decimal_number(n->scalar) || is_non_finite(n->scalar))
                        return "a number";
                return "text";
        }
}

/* A sanitized copy of a scalar for messages; "" on OOM (the diag add will notice OOM too). */
static char *message_text(const nd_ynode *n) {
        if (!n || n->kind != ND_YNODE_SCALAR)
                return strdup("");
        return nd_text_sanitize(n->scalar, n->scalar_len, MESSAGE_TEXT_MAX);
}

static const char *scalar_value(const nd_ynode *n) {
        return n && n->kind == ND_YNODE_SCALAR ? n->scalar : NULL;
}

static bool tag_is(const nd_ynode *n, const char *tag) {
        return n->tag && STREQ(n->tag, tag);
}

/* A scalar carrying a tag the schema does not know. Reported as wrong-type; returns true. */
static void report_bad_tag(const nd_yctx *ctx, const nd_ynode *n, const char *field, const char *what) {
        _cleanup_free_ char *tag = nd_text_sanitize(n->tag, strlen(n->tag), MESSAGE_TEXT_MAX);
        nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "wrong-type", scalar_value(n), NULL,
                     "%s has the tag '%s'; %s is expected, written without a tag",
                     field, strempty(tag), what);
}

static int report_wrong_type(const nd_yctx *ctx, const nd_ynode *n, const char *field, const char *what) {
        _cleanup_free_ char *text = message_text(n);
        if (n->kind == ND_YNODE_SCALAR && !is_plain_null(n))
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "wrong-type", n->scalar, NULL,
                             "%s must be %s, not %s '%s'", field, what, nd_ynode_describe(n), strempty(text));
        else
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "wrong-type", scalar_value(n), NULL,
                             "%s must be %s, not %s", field, what, nd_ynode_describe(n));
        return -EINVAL;
}

static locale_t c_locale(void) {
        /* Numbers in the files use '.', whatever LC_NUMERIC the process runs with. glibc hands
         * out a static object for "C", so this neither allocates nor needs freeing. */
        static locale_t loc = (locale_t) 0;
        if (!loc)
                loc = newlocale(LC_NUMERIC_MASK, "C", (locale_t) 0);
        return loc;
}

/* Shared by the number and integer reads: type and finiteness checks. */
static int check_numeric_scalar(const nd_yctx *ctx, const nd_ynode *n, const char *field,
                                const char *what, bool integer) {
        if (n->kind != ND_YNODE_SCALAR || is_plain_null(n))
                return report_wrong_type(ctx, n, field, what);
        if (n->tag && !tag_is(n, YAML_TAG_INT) && !(tag_is(n, YAML_TAG_FLOAT) && !integer)) {
                report_bad_tag(ctx, n, field, what);
                return -EINVAL;
        }
        if (n->style != ND_YSTYLE_PLAIN) {
                _cleanup_free_ char *text = message_text(n);
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "wrong-type", n->scalar, NULL,
                             "%s must be %s, but '%s' is quoted, which makes it text; write it without quotes",
                             field, what, strempty(text));
                return -EINVAL;
        }
        if (is_non_finite(n->scalar)) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "not-finite", n->scalar, NULL,
                             "%s is %s; only finite numbers are accepted", field, n->scalar);
                return -EINVAL;
        }
        if (integer && is_decimal_number(n->scalar) && !is_decimal_integer(n->scalar)) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "wrong-type", n->scalar, NULL,
                             "%s must be a whole number, not %s", field, n->scalar);
                return -EINVAL;
        }
        if (!is_decimal_number(n->scalar))
                return report_wrong_type(ctx, n, field, what);
        return 0;
}

int nd_yget_number(const nd_yctx *ctx, const nd_ynode *n, const char *field, double *ret) {
        int r = check_numeric_scalar(ctx, n, field, "a number", false);
        if (r < 0)
                return r;
        locale_t loc = c_locale();
        if (!loc) {
                ctx->diags->oom = true;
                return -ENOMEM;
        }
        double v = strtod_l(n->scalar, NULL, loc);
        if (!isfinite(v)) {
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "out-of-range", n->scalar, NULL,
                             "%s %s is too large to be represented", field, n->scalar);
                return -EINVAL;
        }
        *ret = v;
        return 0;
}

int nd_yget_integer(const nd_yctx *ctx, const nd_ynode *n, const char *field, int64_t *ret) {
        int r = check_numeric_scalar(ctx, n, field, "a whole number", true);
        if (r < 0)
                return r;
        errno = 0;
        long long v = strtoll(n->scalar, NULL, 10);
        if (errno == ERANGE) {
                _cleanup_free_ char *text = message_text(n);
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "out-of-range", n->scalar, NULL,
                             "%s %s is too large to be represented", field, strempty(text));
                return -EINVAL;
        }
        *ret = (int64_t) v;
        return 0;
}

int nd_yget_bool(const nd_yctx *ctx, const nd_ynode *n, const char *field, bool *ret) {
        if (n->kind != ND_YNODE_SCALAR || is_plain_null(n))
                return report_wrong_type(ctx, n, field, "true or false");
        if (n->tag && !tag_is(n, YAML_TAG_BOOL)) {
                report_bad_tag(ctx, n, field, "true or false");
                return -EINVAL;
        }
        if (n->style != ND_YSTYLE_PLAIN || !is_boolean_text(n->scalar)) {
                _cleanup_free_ char *text = message_text(n);
                nd_diags_add(ctx->diags, ctx->file, n->line, n->column, field, "wrong-type", n->scalar, NULL,
                             "%s must be true or false (unquoted), not '%s'; yes/no/on/off are not booleans here",
                             field, strempty(text));
                return -EINVAL;
        }
        *ret = n->scalar[0] == 't';
        return 0;
}

int nd_yget_string(const nd_yctx *ctx, const nd_ynode *n, const char *field, const char **ret) {
        if (n->kind != ND_YNODE_SCALAR || is_plain_null(n))
                return report_wrong_type(ctx, n, field, "text");
        if (n->tag && !tag_is(n, YAML_TAG_STR) && !tag_is(n, YAML_TAG_NON_SPECIFIC)) {
                report_bad_tag(ctx, n, field, "text");
                return -EINVAL;
        }
        *ret = n->scalar;
        return 0;
}

static const char *where(const char *path) {
        return path && *path ? path : "the document";
}

static char *field_path(const char *path, const char *key) {
        char *s = NULL;
        if (asprintf(&s, "%s%s%s", strempty(path), path && *path ? "." : "", key) < 0)
                return NULL;
        return s;
}

/* "a, b and c" of the known keys, for unknown-field messages. */
static char *known_keys(const nd_yfield *fields, size_t n_fields) {
        size_t total = 1;
        for (size_t i = 0; i < n_fields; i++)
                total += strlen(fields[i].key) + 2;
        char *s = malloc(total), *p = s;
        if (!s)
                return NULL;
        for (size_t i = 0; i < n_fields; i++) {
                if (i > 0)
                        p = stpcpy(p, ", ");
                p = stpcpy(p, fields[i].key);
        }
        *p = '\0';
        return s;
}

int nd_ymap_fields(const nd_yctx *ctx, const nd_ynode *map, const char *path,
                   nd_yfield *fields, size_t n_fields) {
        for (size_t i = 0; i < n_fields; i++)
                fields[i].key_node = fields[i].value = NULL;

        if (map->kind != ND_YNODE_MAPPING || is_plain_null(map)) {
                nd_diags_add(ctx->diags, ctx->file, map->line, map->column, path, "wrong-type",
                             scalar_value(map), NULL, "%s must be a mapping of keys to values, not %s",
                             where(path), nd_ynode_describe(map));
                return -EINVAL;
        }
        if (map->tag && !tag_is(map, YAML_TAG_MAP)) {
                _cleanup_free_ char *tag = nd_text_sanitize(map->tag, strlen(map->tag), MESSAGE_TEXT_MAX);
                nd_diags_add(ctx->diags, ctx->file, map->line, map->column, path, "wrong-type", NULL, NULL,
                             "%s has the tag '%s'; a mapping is expected, written without a tag",
                             where(path), strempty(tag));
        }

        for (size_t i = 0; i < map->n_pairs; i++) {
                const nd_ypair *pair = &map->pairs[i];
                const nd_ynode *key = pair->key;

                if (key->kind != ND_YNODE_SCALAR) {
                        nd_diags_add(ctx->diags, ctx->file, key->line, key->column, path, "unknown-field", NULL,
                                     NULL, "keys of %s must be plain names, not %s", where(path),
                                     nd_ynode_describe(key));
                        continue;
                }

                _cleanup_free_ char *name = message_text(key);
                _cleanup_free_ char *fpath = field_path(path, strempty(name));
                if (!name || !fpath) {
                        ctx->diags->oom = true;
                        return -ENOMEM;
                }
                if (pair->duplicate) {
                        nd_diags_add(ctx->diags, ctx->file, key->line, key->column, fpath, "duplicate-key",
                                     key->scalar, NULL, "key '%s' appears twice in %s (first at line %u, column %u)",
                                     name, where(path), map->pairs[pair->first].key->line,
                                     map->pairs[pair->first].key->column);
                        continue;
                }
                size_t j;
                for (j = 0; j < n_fields; j++)
                        if (STREQ(fields[j].key, key->scalar))
                                break;
                if (j < n_fields) {
                        fields[j].key_node = key;
                        fields[j].value = pair->value;
                        continue;
                }
                _cleanup_free_ char *known = known_keys(fields, n_fields);
                nd_diags_add(ctx->diags, ctx->file, key->line, key->column, fpath, "unknown-field", key->scalar,
                             NULL, "unknown key '%s' in %s; the keys are: %s", name, where(path),
                             strempty(known));
        }

        for (size_t i = 0; i < n_fields; i++) {
                if (!fields[i].required || fields[i].value)
                        continue;
                _cleanup_free_ char *fpath = field_path(path, fields[i].key);
                nd_diags_add(ctx->diags, ctx->file, map->line, map->column, fpath ? fpath : fields[i].key,
                             "missing-field", NULL, NULL, "required key '%s' is missing from %s",
                             fields[i].key, where(path));
        }
        return 0;
}

void nd_format_number(double v, char buf[static 32]) {
        /* The shortest %g rendering that reads back as the same double: 0.15, not 0.1499... */
        locale_t loc = c_locale();
        locale_t saved = loc ? uselocale(loc) : (locale_t) 0;
        if (v == trunc(v) && fabs(v) < 1e15) {
                snprintf(buf, 32, "%.0f", v);
                if (saved)
                        uselocale(saved);
                return;
        }
        for (int precision = 1; precision <= 17; precision++) {
                snprintf(buf, 32, "%.*g", precision, v);
                if (!loc || strtod_l(buf, NULL, loc) == v)
                        break;
        }
        if (saved)
                uselocale(saved);
}
