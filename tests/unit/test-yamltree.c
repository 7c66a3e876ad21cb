/* test-yamltree.c: the bounded YAML loader, the strict accessors, diagnostics and digests. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check-main.h"
#include "diag.h"
#include "digest.h"
#include "util.h"
#include "yamltree.h"

static nd_ynode *parse_ok(const char *text) {
        nd_ynode *root = NULL;
        nd_yaml_error error;
        int r = nd_yaml_parse(text, strlen(text), &root, &error);
        ck_assert_msg(r == 0, "parse failed: %d %s", r, error.message);
        return root;
}

static nd_yaml_error parse_fail(const void *data, size_t len) {
        nd_ynode *root = (nd_ynode *) 1;
        nd_yaml_error error;
        int r = nd_yaml_parse(data, len, &root, &error);
        ck_assert_int_eq(r, -EINVAL);
        ck_assert_ptr_null(root);
        ck_assert_str_ne(error.message, "");
        return error;
}

static void assert_pos(const nd_ynode *n, unsigned line, unsigned column) {
        ck_assert_ptr_nonnull(n);
        ck_assert_uint_eq(n->line, line);
        ck_assert_uint_eq(n->column, column);
}

/* ---- tree shape, positions, styles, tags ---- */

START_TEST(test_positions_styles_tags) {
        static const char text[] =
                "# comment\n"
                "a: 1\n"
                "b: \"x\"\n"
                "c:\n"
                "  - 'y'\n"
                "  - !!str 5\n"
                "d: {e: f, g: [h, i]}\n"
                "j: |\n"
                "  literal\n"
                "k: >\n"
                "  folded\n";
        _cleanup_(nd_ynode_freep) nd_ynode *root = parse_ok(text);

        ck_assert_int_eq(root->kind, ND_YNODE_MAPPING);
        assert_pos(root, 2, 1);
        ck_assert_uint_eq(root->n_pairs, 6);

        assert_pos(root->pairs[0].key, 2, 1);
        ck_assert_str_eq(root->pairs[0].key->scalar, "a");
        const nd_ynode *a = root->pairs[0].value;
        assert_pos(a, 2, 4);
        ck_assert_str_eq(a->scalar, "1");
        ck_assert_int_eq(a->style, ND_YSTYLE_PLAIN);
        ck_assert_ptr_null(a->tag);

        const nd_ynode *b = nd_ynode_lookup(root, "b");
        assert_pos(b, 3, 4);
        ck_assert_int_eq(b->style, ND_YSTYLE_DOUBLE_QUOTED);
        ck_assert_str_eq(b->scalar, "x");

        const nd_ynode *c = nd_ynode_lookup(root, "c");
        ck_assert_int_eq(c->kind, ND_YNODE_SEQUENCE);
        assert_pos(c, 5, 3);
        ck_assert_uint_eq(c->n_items, 2);
        assert_pos(c->items[0], 5, 5);
        ck_assert_int_eq(c->items[0]->style, ND_YSTYLE_SINGLE_QUOTED);
        assert_pos(c->items[1], 6, 5);
        ck_assert_str_eq(c->items[1]->tag, "tag:yaml.org,2002:str");
        ck_assert_str_eq(c->items[1]->scalar, "5");

        const nd_ynode *d = nd_ynode_lookup(root, "d");
        ck_assert_int_eq(d->kind, ND_YNODE_MAPPING);
        assert_pos(d, 7, 4);
        assert_pos(d->pairs[0].key, 7, 5);
        const nd_ynode *g = nd_ynode_lookup(d, "g");
        assert_pos(g, 7, 14);
        assert_pos(g->items[1], 7, 18);

        const nd_ynode *j = nd_ynode_lookup(root, "j");
        ck_assert_int_eq(j->style, ND_YSTYLE_LITERAL);
        ck_assert_str_eq(j->scalar, "literal\n");
        ck_assert_int_eq(nd_ynode_lookup(root, "k")->style, ND_YSTYLE_FOLDED);
        ck_assert_ptr_null(nd_ynode_lookup(root, "missing"));
}
END_TEST

START_TEST(test_empty_documents) {
        static const char *const empties[] = { "", "# only a comment\n", "\n\n" };
        for (size_t i = 0; i < ELEMENTSOF(empties); i++) {
                nd_ynode *root = (nd_ynode *) 1;
                ck_assert_int_eq(nd_yaml_parse(empties[i], strlen(empties[i]), &root, NULL), 0);
                ck_assert_msg(root == NULL, "'%s' should have no root", empties[i]);
        }
        /* An explicit document with no content holds one null scalar. */
        static const char *const nulls[] = { "---\n", "--- \n...\n", "~\n" };
        for (size_t i = 0; i < ELEMENTSOF(nulls); i++) {
                nd_ynode *root = NULL;
                ck_assert_int_eq(nd_yaml_parse(nulls[i], strlen(nulls[i]), &root, NULL), 0);
                ck_assert_ptr_nonnull(root);
                ck_assert_int_eq(root->kind, ND_YNODE_SCALAR);
                ck_assert_str_eq(nd_ynode_describe(root), "nothing (null)");
                nd_ynode_free(root);
        }
}
END_TEST

START_TEST(test_empty_value_points_at_key) {
        _cleanup_(nd_ynode_freep) nd_ynode *root = parse_ok("a: 1\n  \nbee:\nc: 2\n");
        const nd_ynode *v = nd_ynode_lookup(root, "bee");
        ck_assert_str_eq(v->scalar, "");
        assert_pos(v, 3, 1);
}
END_TEST

START_TEST(test_duplicate_keys_marked) {
        _cleanup_(nd_ynode_freep) nd_ynode *root = parse_ok("a: 1\nb: 2\na: 3\nc: 4\na: 5\n\"b\": 6\n");
        ck_assert_uint_eq(root->n_pairs, 6);
        ck_assert(!root->pairs[0].duplicate);
        ck_assert(!root->pairs[1].duplicate);
        ck_assert(root->pairs[2].duplicate);
        ck_assert_uint_eq(root->pairs[2].first, 0);
        ck_assert(!root->pairs[3].duplicate);
        ck_assert(root->pairs[4].duplicate);
        ck_assert_uint_eq(root->pairs[4].first, 0);
        ck_assert(root->pairs[5].duplicate);
        ck_assert_uint_eq(root->pairs[5].first, 1);
        /* Lookup sees the first occurrence. */
        ck_assert_str_eq(nd_ynode_lookup(root, "a")->scalar, "1");
}
END_TEST

START_TEST(test_many_duplicate_keys_fast) {
        /* 4000 keys, all the same: sorting keeps the marking O(n log n). */
        size_t n = 4000;
        _cleanup_free_ char *text = malloc(n * 8 + 1);
        char *p = text;
        for (size_t i = 0; i < n; i++)
                p = stpcpy(p, "k: 1\n");
        _cleanup_(nd_ynode_freep) nd_ynode *root = parse_ok(text);
        ck_assert_uint_eq(root->n_pairs, n);
        for (size_t i = 1; i < n; i++) {
                ck_assert(root->pairs[i].duplicate);
                ck_assert_uint_eq(root->pairs[i].first, 0);
        }
}
END_TEST

/* ---- refused input ---- */

START_TEST(test_syntax_error_position) {
        /* libyaml: a mapping value where none may be. */
        static const char text[] = "a: 1\nb: c: d\n";
        nd_yaml_error e = parse_fail(text, strlen(text));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_SYNTAX);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 5);
        ck_assert_msg(strstr(e.message, "mapping values are not allowed"), "%s", e.message);
        ck_assert_msg(strstr(e.message, "line 2, column 5"), "%s", e.message);
}
END_TEST

START_TEST(test_syntax_error_unclosed_flow) {
        static const char text[] = "a: [1, 2\nb: 3\n";
        nd_yaml_error e = parse_fail(text, strlen(text));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_SYNTAX);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 2);
        ck_assert_msg(strstr(e.message, "did not find expected ',' or ']'"), "%s", e.message);
        ck_assert_msg(strstr(e.message, "flow sequence"), "%s", e.message);
        ck_assert_msg(strstr(e.message, "line 1, column 4"), "context mark: %s", e.message);
}
END_TEST

START_TEST(test_invalid_utf8) {
        static const char text[] = "a: 1\nb: \xff\n";
        nd_yaml_error e = parse_fail(text, strlen(text));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_SYNTAX);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 4);
        ck_assert_msg(strstr(e.message, "offset 8"), "%s", e.message);
}
END_TEST

START_TEST(test_too_large) {
        size_t len = 2u * 1024 * 1024;
        _cleanup_free_ char *big = malloc(len);
        memset(big, '#', len);
        nd_yaml_error e = parse_fail(big, len);
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_TOO_LARGE);
        ck_assert_uint_eq(e.line, 0);
        ck_assert_msg(strstr(e.message, "1 MiB"), "%s", e.message);

        /* One byte over the bound is refused, the bound itself is not. */
        e = parse_fail(big, ND_YAML_MAX_DOCUMENT_BYTES + 1);
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_TOO_LARGE);
        memcpy(big, "a: 1\n", 5);
        nd_ynode *root = NULL;
        ck_assert_int_eq(nd_yaml_parse(big, ND_YAML_MAX_DOCUMENT_BYTES, &root, NULL), 0);
        ck_assert_str_eq(nd_ynode_lookup(root, "a")->scalar, "1");
        nd_ynode_free(root);
}
END_TEST

START_TEST(test_nul_byte) {
        static const char text[] = "a: 1\nbé: x\0y\n";
        nd_yaml_error e = parse_fail(text, sizeof text - 1);
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_NUL);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 6); /* characters, not bytes: é is one column */
        ck_assert_msg(strstr(e.message, "offset 11"), "%s", e.message);
}
END_TEST

START_TEST(test_nul_escape) {
        static const char text[] = "a: 1\nb: \"x\\0y\"\n";
        nd_yaml_error e = parse_fail(text, strlen(text));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_NUL);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 4);
}
END_TEST

START_TEST(test_alias_bomb) {
        /* The classic "billion laughs": 9 levels of 9 aliases each. */
        char text[2048], *p = text;
        p = stpcpy(p, "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
        for (char c = 'b'; c <= 'i'; c++) {
                p += sprintf(p, "%c: &%c [", c, c);
                for (int i = 0; i < 9; i++)
                        p += sprintf(p, "%s*%c", i ? "," : "", c - 1);
                p = stpcpy(p, "]\n");
        }
        nd_yaml_error e = parse_fail(text, strlen(text));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_ALIAS);
        ck_assert_uint_eq(e.line, 1);
        ck_assert_uint_eq(e.column, 4);
        ck_assert_msg(strstr(e.message, "anchor"), "%s", e.message);
}
END_TEST

START_TEST(test_alias_and_anchor) {
        static const char alias[] = "a: 1\nb: *x\n";
        nd_yaml_error e = parse_fail(alias, strlen(alias));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_ALIAS);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 4);

        static const char anchor[] = "a: 1\nb: &x 2\n";
        e = parse_fail(anchor, strlen(anchor));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_ALIAS);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 4);

        static const char merge[] = "base: &b {x: 1}\nother:\n  <<: *b\n";
        e = parse_fail(merge, strlen(merge));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_ALIAS);
        ck_assert_uint_eq(e.line, 1);
        ck_assert_uint_eq(e.column, 7);
}
END_TEST

static char *nested_flow(size_t depth) {
        char *s = malloc(2 * depth + 1);
        memset(s, '[', depth);
        memset(s + depth, ']', depth);
        s[2 * depth] = '\0';
        return s;
}

START_TEST(test_depth_bound) {
        _cleanup_free_ char *ok = nested_flow(ND_YAML_MAX_DEPTH);
        nd_ynode *root = parse_ok(ok);
        nd_ynode_free(root);

        _cleanup_free_ char *over = nested_flow(ND_YAML_MAX_DEPTH + 1);
        nd_yaml_error e = parse_fail(over, strlen(over));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_TOO_DEEP);
        ck_assert_uint_eq(e.line, 1);
        ck_assert_uint_eq(e.column, ND_YAML_MAX_DEPTH + 1);
}
END_TEST

START_TEST(test_deep_nesting_10000) {
        _cleanup_free_ char *flow = nested_flow(10000);
        nd_yaml_error e = parse_fail(flow, strlen(flow));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_TOO_DEEP);
        ck_assert_uint_eq(e.column, ND_YAML_MAX_DEPTH + 1);

        /* Block style: "- - - - ... x" */
        size_t depth = 10000;
        _cleanup_free_ char *block = malloc(2 * depth + 3);
        char *p = block;
        for (size_t i = 0; i < depth; i++)
                p = stpcpy(p, "- ");
        strcpy(p, "x\n");
        e = parse_fail(block, strlen(block));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_TOO_DEEP);
        ck_assert_uint_eq(e.line, 1);
        ck_assert_uint_eq(e.column, 2 * ND_YAML_MAX_DEPTH + 1);

        /* Mappings: "a: {a: {a: ..." */
        _cleanup_free_ char *maps = malloc(5 * depth + 2);
        p = maps;
        for (size_t i = 0; i < depth; i++)
                p = stpcpy(p, "a: {");
        strcpy(p, "\n");
        e = parse_fail(maps, strlen(maps));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_TOO_DEEP);
}
END_TEST

static char *flow_list(size_t n) {
        char *s = malloc(2 * n + 3), *p = s;
        *p++ = '[';
        for (size_t i = 0; i < n; i++) {
                *p++ = '0';
                *p++ = ',';
        }
        p[-1] = ']';
        *p = '\0';
        return s;
}

START_TEST(test_node_bound) {
        /* The list itself is a node: 9999 items make 10000 nodes. */
        _cleanup_free_ char *ok = flow_list(ND_YAML_MAX_NODES - 1);
        nd_ynode *root = parse_ok(ok);
        ck_assert_uint_eq(root->n_items, ND_YAML_MAX_NODES - 1);
        nd_ynode_free(root);

        _cleanup_free_ char *over = flow_list(ND_YAML_MAX_NODES);
        nd_yaml_error e = parse_fail(over, strlen(over));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_TOO_MANY_NODES);
        ck_assert_uint_eq(e.line, 1);
        ck_assert_uint_eq(e.column, 2 * ND_YAML_MAX_NODES);
}
END_TEST

START_TEST(test_scalar_bound) {
        size_t n = ND_YAML_MAX_SCALAR_BYTES;
        _cleanup_free_ char *text = malloc(n + 16);
        strcpy(text, "a: ");
        memset(text + 3, 'x', n);
        strcpy(text + 3 + n, "\n");
        nd_ynode *root = parse_ok(text);
        ck_assert_uint_eq(nd_ynode_lookup(root, "a")->scalar_len, n);
        nd_ynode_free(root);

        memset(text + 3, 'x', n + 1);
        strcpy(text + 4 + n, "\n");
        nd_yaml_error e = parse_fail(text, strlen(text));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_SCALAR_TOO_LONG);
        ck_assert_uint_eq(e.line, 1);
        ck_assert_uint_eq(e.column, 4);
}
END_TEST

START_TEST(test_multiple_documents) {
        static const char text[] = "a: 1\n---\nb: 2\n";
        nd_yaml_error e = parse_fail(text, strlen(text));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_MULTIPLE_DOCUMENTS);
        ck_assert_uint_eq(e.line, 2);
        ck_assert_uint_eq(e.column, 1);

        static const char explicit_end[] = "---\na: 1\n...\n---\nb: 2\n";
        e = parse_fail(explicit_end, strlen(explicit_end));
        ck_assert_int_eq(e.kind, ND_YAML_ERROR_MULTIPLE_DOCUMENTS);
        ck_assert_uint_eq(e.line, 4);
}
END_TEST

START_TEST(test_error_to_diag) {
        static const char text[] = "a: *x\n";
        nd_yaml_error e = parse_fail(text, strlen(text));
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        ck_assert_int_eq(nd_yaml_error_to_diag(&e, "f.yaml", &d), 0);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        ck_assert_str_eq(d.items[0].code, "yaml-syntax");
        ck_assert_str_eq(d.items[0].field, "");
        ck_assert_str_eq(d.items[0].file, "f.yaml");
        ck_assert_uint_eq(d.items[0].line, 1);
        ck_assert_uint_eq(d.items[0].column, 4);
}
END_TEST

/* ---- typed accessors ---- */

typedef struct access_case {
        const char *yaml_value;
        char type;              /* n number, i integer, b bool, s string */
        const char *code;       /* NULL: accepted */
} access_case;

static const access_case access_cases[] = {
        { "41", 'n', NULL },          { "-1.5e3", 'n', NULL },      { ".5", 'n', NULL },
        { "+7.", 'n', NULL },         { "!!float 2.5", 'n', NULL }, { "!!int 3", 'n', NULL },
        { "\"41\"", 'n', "wrong-type" }, { "'41'", 'n', "wrong-type" }, { "0x10", 'n', "wrong-type" },
        { "1_000", 'n', "wrong-type" }, { "abc", 'n', "wrong-type" }, { "", 'n', "wrong-type" },
        { "~", 'n', "wrong-type" },   { "[1]", 'n', "wrong-type" }, { "{a: 1}", 'n', "wrong-type" },
        { "!!str 4", 'n', "wrong-type" }, { "!x 4", 'n', "wrong-type" }, { "1e", 'n', "wrong-type" },
        { ".nan", 'n', "not-finite" }, { ".NaN", 'n', "not-finite" }, { ".inf", 'n', "not-finite" },
        { "-.inf", 'n', "not-finite" }, { "+.INF", 'n', "not-finite" }, { "1e999", 'n', "out-of-range" },
        { "12", 'i', NULL },          { "-3", 'i', NULL },          { "1.0", 'i', "wrong-type" },
        { "1e3", 'i', "wrong-type" }, { "99999999999999999999", 'i', "out-of-range" },
        { "!!float 1", 'i', "wrong-type" }, { ".inf", 'i', "not-finite" },
        { "true", 'b', NULL },        { "false", 'b', NULL },       { "yes", 'b', "wrong-type" },
        { "no", 'b', "wrong-type" },  { "on", 'b', "wrong-type" },  { "off", 'b', "wrong-type" },
        { "True", 'b', "wrong-type" }, { "\"true\"", 'b', "wrong-type" }, { "1", 'b', "wrong-type" },
        { "!!bool true", 'b', NULL },
        { "hello world", 's', NULL }, { "\"quoted\"", 's', NULL },  { "123", 's', NULL },
        { "!!str x", 's', NULL },     { "! x", 's', NULL },         { "", 's', "wrong-type" },
        { "null", 's', "wrong-type" }, { "~", 's', "wrong-type" },  { "[a]", 's', "wrong-type" },
        { "!!int 5", 's', "wrong-type" },
};

START_TEST(test_accessors) {
        const access_case *c = &access_cases[_i];
        _cleanup_free_ char *text = NULL;
        ck_assert_int_ge(asprintf(&text, "k: %s\n", c->yaml_value), 0);
        _cleanup_(nd_ynode_freep) nd_ynode *root = parse_ok(text);
        const nd_ynode *v = nd_ynode_lookup(root, "k");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_yctx ctx = { "t.yaml", &d };
        double num;
        int64_t integer;
        bool b;
        const char *s;
        int r;

        switch (c->type) {
        case 'n': r = nd_yget_number(&ctx, v, "k", &num); break;
        case 'i': r = nd_yget_integer(&ctx, v, "k", &integer); break;
        case 'b': r = nd_yget_bool(&ctx, v, "k", &b); break;
        default:  r = nd_yget_string(&ctx, v, "k", &s); break;
        }
        if (!c->code) {
                ck_assert_msg(r == 0 && nd_diags_count(&d) == 0, "'%s' as %c refused: %s", c->yaml_value, c->type,
                              nd_diags_count(&d) ? d.items[0].message : "?");
                return;
        }
        ck_assert_msg(r == -EINVAL, "'%s' as %c accepted", c->yaml_value, c->type);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        ck_assert_str_eq(d.items[0].code, c->code);
        ck_assert_str_eq(d.items[0].field, "k");
        ck_assert_str_eq(d.items[0].file, "t.yaml");
        ck_assert_uint_eq(d.items[0].line, 1);
        ck_assert_uint_eq(d.items[0].column, c->yaml_value[0] ? 4 : 1);
}
END_TEST

START_TEST(test_accessor_values) {
        _cleanup_(nd_ynode_freep) nd_ynode *root = parse_ok("n: -1.25e1\ni: -42\nb: false\ns: 'it''s'\n");
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_yctx ctx = { NULL, &d };
        double n;
        int64_t i;
        bool b = true;
        const char *s;
        ck_assert_int_eq(nd_yget_number(&ctx, nd_ynode_lookup(root, "n"), "n", &n), 0);
        ck_assert(n == -12.5);
        ck_assert_int_eq(nd_yget_integer(&ctx, nd_ynode_lookup(root, "i"), "i", &i), 0);
        ck_assert_int_eq(i, -42);
        ck_assert_int_eq(nd_yget_bool(&ctx, nd_ynode_lookup(root, "b"), "b", &b), 0);
        ck_assert(!b);
        ck_assert_int_eq(nd_yget_string(&ctx, nd_ynode_lookup(root, "s"), "s", &s), 0);
        ck_assert_str_eq(s, "it's");
}
END_TEST

START_TEST(test_map_fields) {
        static const char text[] =
                "top:\n"
                "  want: 1\n"
                "  extra: 2\n"
                "  want: 3\n"
                "  ? [complex]\n"
                "  : 4\n";
        _cleanup_(nd_ynode_freep) nd_ynode *root = parse_ok(text);
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        nd_yctx ctx = { "m.yaml", &d };
        nd_yfield f[] = { ND_YFIELD_REQUIRED("want"), ND_YFIELD_REQUIRED("need"), ND_YFIELD_OPTIONAL("maybe") };

        ck_assert_int_eq(nd_ymap_fields(&ctx, nd_ynode_lookup(root, "top"), "top", f, ELEMENTSOF(f)), 0);
        ck_assert_str_eq(f[0].value->scalar, "1");
        assert_pos(f[0].key_node, 2, 3);
        ck_assert_ptr_null(f[1].value);
        ck_assert_ptr_null(f[2].value);

        ck_assert_uint_eq(nd_diags_count(&d), 4);
        ck_assert_str_eq(d.items[0].code, "unknown-field");
        ck_assert_str_eq(d.items[0].field, "top.extra");
        ck_assert_uint_eq(d.items[0].line, 3);
        ck_assert_uint_eq(d.items[0].column, 3);
        ck_assert_msg(strstr(d.items[0].message, "want, need, maybe"), "%s", d.items[0].message);
        ck_assert_str_eq(d.items[1].code, "duplicate-key");
        ck_assert_str_eq(d.items[1].field, "top.want");
        ck_assert_uint_eq(d.items[1].line, 4);
        ck_assert_uint_eq(d.items[1].column, 3);
        ck_assert_msg(strstr(d.items[1].message, "first at line 2"), "%s", d.items[1].message);
        ck_assert_str_eq(d.items[2].code, "unknown-field");
        ck_assert_str_eq(d.items[2].field, "top");
        ck_assert_uint_eq(d.items[2].line, 5);
        ck_assert_uint_eq(d.items[2].column, 5);
        ck_assert_str_eq(d.items[3].code, "missing-field");
        ck_assert_str_eq(d.items[3].field, "top.need");
        ck_assert_uint_eq(d.items[3].line, 2);
        ck_assert_uint_eq(d.items[3].column, 3);

        /* Not a mapping at all. */
        nd_diags_clear(&d);
        _cleanup_(nd_ynode_freep) nd_ynode *list = parse_ok("- 1\n");
        ck_assert_int_eq(nd_ymap_fields(&ctx, list, "", f, ELEMENTSOF(f)), -EINVAL);
        ck_assert_uint_eq(nd_diags_count(&d), 1);
        ck_assert_str_eq(d.items[0].code, "wrong-type");
}
END_TEST

START_TEST(test_format_number) {
        char buf[32];
        nd_format_number(0.15, buf);
        ck_assert_str_eq(buf, "0.15");
        nd_format_number(1200, buf);
        ck_assert_str_eq(buf, "1200");
        nd_format_number(10000, buf);
        ck_assert_str_eq(buf, "10000");
        nd_format_number(-2.5, buf);
        ck_assert_str_eq(buf, "-2.5");
        nd_format_number(1.0 / 3.0, buf);
        ck_assert(strtod(buf, NULL) == 1.0 / 3.0);
}
END_TEST

/* ---- reading files ---- */

START_TEST(test_read_file) {
        char dir[] = "/tmp/test-yamltree-XXXXXX";
        ck_assert_ptr_nonnull(mkdtemp(dir));
        char path[256];
        char *data = NULL;
        size_t len = 0;

        snprintf(path, sizeof path, "%s/missing.yaml", dir);
        ck_assert_int_eq(nd_yaml_read_file(path, &data, &len), -ENOENT);
        ck_assert_int_eq(nd_yaml_read_file(dir, &data, &len), -EISDIR);

        snprintf(path, sizeof path, "%s/fifo.yaml", dir);
        ck_assert_int_eq(mkfifo(path, 0600), 0);
        ck_assert_int_eq(nd_yaml_read_file(path, &data, &len), -EBADFD);
        unlink(path);

        /* A 3 MiB file: only the bound plus one byte is read. */
        snprintf(path, sizeof path, "%s/big.yaml", dir);
        FILE *f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        for (int i = 0; i < 3 * 1024; i++)
                for (int j = 0; j < 1024; j++)
                        fputc('#', f);
        fclose(f);
        ck_assert_int_eq(nd_yaml_read_file(path, &data, &len), 0);
        ck_assert_uint_eq(len, ND_YAML_MAX_DOCUMENT_BYTES + 1);
        free(data);
        unlink(path);

        snprintf(path, sizeof path, "%s/small.yaml", dir);
        f = fopen(path, "w");
        fputs("a: 1\n", f);
        fclose(f);
        ck_assert_int_eq(nd_yaml_read_file(path, &data, &len), 0);
        ck_assert_uint_eq(len, 5);
        ck_assert_str_eq(data, "a: 1\n");
        free(data);
        unlink(path);

        snprintf(path, sizeof path, "%s/empty.yaml", dir);
        f = fopen(path, "w");
        fclose(f);
        ck_assert_int_eq(nd_yaml_read_file(path, &data, &len), 0);
        ck_assert_uint_eq(len, 0);
        ck_assert_str_eq(data, "");
        free(data);
        unlink(path);

        if (geteuid() != 0) {
                snprintf(path, sizeof path, "%s/secret.yaml", dir);
                f = fopen(path, "w");
                fclose(f);
                chmod(path, 0);
                ck_assert_int_eq(nd_yaml_read_file(path, &data, &len), -EACCES);
                unlink(path);
        }
        rmdir(dir);
}
END_TEST

/* ---- diagnostics ---- */

START_TEST(test_diag_format_and_join) {
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT;
        ck_assert_int_eq(nd_diags_add(&d, "limits.yaml", 31, 22, "areas.cheeks.max_depth_mm", "depth-out-of-range",
                                      "3.5", "3 mm", "areas.cheeks.max_depth_mm %s is too deep", "3.5"), 0);
        ck_assert_int_eq(nd_diags_add(&d, NULL, 0, 0, "", "no-limits", NULL, NULL, "no limits"), 0);
        ck_assert_int_eq(nd_diags_add(NULL, "x", 1, 1, "f", "c", NULL, NULL, "ignored"), 0);
        ck_assert_uint_eq(nd_diags_count(&d), 2);
        ck_assert_uint_eq(nd_diags_count(NULL), 0);

        _cleanup_free_ char *one = nd_diag_format(&d.items[0]);
        ck_assert_str_eq(one, "limits.yaml:31:22: areas.cheeks.max_depth_mm: areas.cheeks.max_depth_mm 3.5 is too deep");
        _cleanup_free_ char *two = nd_diag_format(&d.items[1]);
        ck_assert_str_eq(two, "<data>:0:0: (document): no limits");
        ck_assert_ptr_null(d.items[1].file);
        ck_assert_ptr_null(d.items[1].value);
        ck_assert_str_eq(d.items[0].value, "3.5");
        ck_assert_str_eq(d.items[0].limit, "3 mm");

        _cleanup_free_ char *joined = nd_diags_join(&d, "; ");
        ck_assert_str_eq(joined, "areas.cheeks.max_depth_mm 3.5 is too deep; no limits");
        nd_diags empty = ND_DIAGS_INIT;
        _cleanup_free_ char *none = nd_diags_join(&empty, "; ");
        ck_assert_str_eq(none, "");

        ck_assert_ptr_eq(nd_diags_find(&d, "no-limits", NULL), &d.items[1]);
        ck_assert_ptr_eq(nd_diags_find(&d, "depth-out-of-range", "areas.cheeks.max_depth_mm"), &d.items[0]);
        ck_assert_ptr_null(nd_diags_find(&d, "depth-out-of-range", "other"));
}
END_TEST

START_TEST(test_diag_sort_and_move) {
        _cleanup_diags_ nd_diags d = ND_DIAGS_INIT, other = ND_DIAGS_INIT;
        static const unsigned pos[][2] = { { 5, 1 }, { 2, 9 }, { 2, 3 }, { 0, 0 }, { 5, 1 }, { 1, 1 } };
        for (size_t i = 0; i < ELEMENTSOF(pos); i++)
                nd_diags_add(&d, "f", pos[i][0], pos[i][1], "x", "c", NULL, NULL, "%zu", i);
        ck_assert_int_eq(nd_diags_sort(&d), 0);
        static const char *const order[] = { "3", "5", "2", "1", "0", "4" };
        for (size_t i = 0; i < ELEMENTSOF(order); i++)
                ck_assert_str_eq(d.items[i].message, order[i]);

        nd_diags_add(&other, "g", 1, 1, "y", "c2", NULL, NULL, "moved");
        ck_assert_int_eq(nd_diags_move(&d, &other), 0);
        ck_assert_uint_eq(nd_diags_count(&other), 0);
        ck_assert_uint_eq(nd_diags_count(&d), 7);
        ck_assert_str_eq(d.items[6].message, "moved");
}
END_TEST

START_TEST(test_sanitize) {
        _cleanup_free_ char *a = nd_text_sanitize("plain é text", strlen("plain é text"), 80);
        ck_assert_str_eq(a, "plain é text");
        _cleanup_free_ char *b = nd_text_sanitize("esc\x1b[31mred\n", strlen("esc\x1b[31mred\n"), 80);
        ck_assert_str_eq(b, "esc\\x1b[31mred\\x0a");
        _cleanup_free_ char *c = nd_text_sanitize("bad\xff\xc3", 5, 80);
        ck_assert_str_eq(c, "bad\\xff\\xc3");
        _cleanup_free_ char *d = nd_text_sanitize("abcdefghij", 10, 5);
        ck_assert_str_eq(d, "abcde...");
        /* Never cut inside a character. */
        _cleanup_free_ char *e = nd_text_sanitize("aéé", strlen("aéé"), 4);
        ck_assert_str_eq(e, "aé...");
}
END_TEST

START_TEST(test_sha256) {
        char hex[ND_SHA256_HEX_SIZE];
        nd_sha256_hex("abc", 3, hex);
        ck_assert_str_eq(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        nd_sha256_hex(NULL, 0, hex);
        ck_assert_str_eq(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("yamltree");
        TCase *tc = tcase_create("tree");
        tcase_add_test(tc, test_positions_styles_tags);
        tcase_add_test(tc, test_empty_documents);
        tcase_add_test(tc, test_empty_value_points_at_key);
        tcase_add_test(tc, test_duplicate_keys_marked);
        tcase_add_test(tc, test_many_duplicate_keys_fast);
        suite_add_tcase(s, tc);

        tc = tcase_create("refused");
        tcase_add_test(tc, test_syntax_error_position);
        tcase_add_test(tc, test_syntax_error_unclosed_flow);
        tcase_add_test(tc, test_invalid_utf8);
        tcase_add_test(tc, test_too_large);
        tcase_add_test(tc, test_nul_byte);
        tcase_add_test(tc, test_nul_escape);
        tcase_add_test(tc, test_alias_bomb);
        tcase_add_test(tc, test_alias_and_anchor);
        tcase_add_test(tc, test_depth_bound);
        tcase_add_test(tc, test_deep_nesting_10000);
        tcase_add_test(tc, test_node_bound);
        tcase_add_test(tc, test_scalar_bound);
        tcase_add_test(tc, test_multiple_documents);
        tcase_add_test(tc, test_error_to_diag);
        suite_add_tcase(s, tc);

        tc = tcase_create("schema");
        tcase_add_loop_test(tc, test_accessors, 0, ELEMENTSOF(access_cases));
        tcase_add_test(tc, test_accessor_values);
        tcase_add_test(tc, test_map_fields);
        tcase_add_test(tc, test_format_number);
        tcase_add_test(tc, test_read_file);
        suite_add_tcase(s, tc);

        tc = tcase_create("diag");
        tcase_add_test(tc, test_diag_format_and_join);
        tcase_add_test(tc, test_diag_sort_and_move);
        tcase_add_test(tc, test_sanitize);
        tcase_add_test(tc, test_sha256);
        suite_add_tcase(s, tc);
        return s;
}
