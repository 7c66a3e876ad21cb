/* cmd-audit.c: needlectl audit verify, the offline check of the ledger's hash-chained audit trail
 * for a service technician or an auditor. Reads the database read-only (the daemon may be running);
 * the result goes to stdout, problems reading the file to stderr. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ledger.h"
#include "needlectl.h"
#include "util.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(json_object *, json_object_put)

static void audit_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl audit verify [--state-dir DIR | --database FILE] [--anchor SEQ:HASH]\n"
                "                              [--incremental] [--json]\n"
                "\n"
                "Verifies the ledger's audit trail without the daemon: every entry's hash, the\n"
                "chain of hashes from the first entry to the last, the recorded head (count and\n"
                "last hash, so a cut tail shows), and every treatment session and cartridge\n"
                "against the entries that recorded them. The database is opened read-only and\n"
                "may be in use by a running needled.\n"
                "\n"
                "Options:\n"
                "  --state-dir DIR  the daemon's state directory (default %s)\n"
                "  --database FILE  the ledger database itself (default DIR/%s)\n"
                "  --anchor SEQ:HASH  also require entry SEQ to have this hash (the 'anchor' an\n"
                "                   earlier verification printed)\n"
                "  --incremental    with --anchor: verify only from that entry to the head, and\n"
                "                   the sessions those entries recorded (a nightly check costs\n"
                "                   what the day added; what lies before the anchor was verified\n"
                "                   when it was printed). Prints the new anchor.\n"
                "  --json           print one JSON object: {database, intact, entries, sessions,\n"
                "                   head_seq, head_hash, anchor, problem, broken_seq, message}\n"
                "  -h, --help       show this help\n"
                "\n"
                "Whoever can write the database can also rewrite the whole trail with fresh\n"
                "hashes. Keep the anchor printed by each verification elsewhere (a ticket, a\n"
                "printout): a later --anchor verification then proves the trail up to it unchanged.\n"
                "\n"
                "Exit status: 0 intact, 1 broken (the first problem is printed), 2 the database\n"
                "cannot be read, 64 usage error.\n",
                ND_LEDGER_STATE_DIR_DEFAULT, ND_LEDGER_FILE_NAME);
}

static int print_json(const char *path, int r, const nd_ledger_verify_result *v) {
        _cleanup_(json_object_putp) json_object *o = json_object_new_object();
        if (!o)
                return -ENOMEM;
        json_object_object_add(o, "database", json_object_new_string(path));
        if (r < 0) {
                json_object_object_add(o, "intact", NULL);
                json_object_object_add(o, "error", json_object_new_string(v->message));
        } else {
                bool intact = v->broken == ND_LEDGER_INTACT;
                json_object_object_add(o, "intact", json_object_new_boolean(intact));
                json_object_object_add(o, "entries", json_object_new_int64((int64_t) v->entries));
                json_object_object_add(o, "sessions", json_object_new_int64((int64_t) v->sessions));
                json_object_object_add(o, "head_seq", json_object_new_int64((int64_t) v->head_seq));
                json_object_object_add(o, "head_hash", json_object_new_string(v->head_hash));
                char anchor[32 + ND_SHA256_HEX_SIZE];
                snprintf(anchor, sizeof anchor, "%" PRIu64 ":%s", v->head_seq, v->head_hash);
                json_object_object_add(o, "anchor", json_object_new_string(anchor));
                json_object_object_add(o, "problem", intact ? NULL : json_object_new_string(nd_ledger_break_to_string(v->broken)));
                json_object_object_add(o, "broken_seq",
                                       intact || v->broken_seq == 0 ? NULL : json_object_new_int64((int64_t) v->broken_seq));
                json_object_object_add(o, "message", intact ? NULL : json_object_new_string(v->message));
        }
        const char *text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!text)
                return -ENOMEM;
        printf("%s\n", text);
        return 0;
}

/* from_seq: the first entry checked by an incremental verification; 0 for a full one. */
static void print_text(const char *path, const nd_ledger_verify_result *v, uint64_t from_seq) {
        if (v->broken == ND_LEDGER_INTACT && from_seq > 0) {
                printf("%s: audit trail intact from the anchor: entries %" PRIu64 "..%" PRIu64 ", %" PRIu64
                       " sessions checked\n", path, from_seq, v->head_seq, v->sessions);
                printf("anchor: %" PRIu64 ":%s\n", v->head_seq, v->head_hash);
                return;
        }
        if (v->broken == ND_LEDGER_INTACT) {
                printf("%s: audit trail intact: %" PRIu64 " entries, %" PRIu64 " sessions checked\n", path, v->entries,
                       v->sessions);
                printf("anchor: %" PRIu64 ":%s\n", v->head_seq, v->head_hash);
                return;
        }
        if (v->broken_seq > 0)
                printf("%s: audit trail BROKEN at entry %" PRIu64 " (%s): %s\n", path, v->broken_seq,
                       nd_ledger_break_to_string(v->broken), v->message);
        else
                printf("%s: audit trail BROKEN (%s): %s\n", path, nd_ledger_break_to_string(v->broken), v->message);
        printf("entries verified before the problem: %" PRIu64 "\n", v->entries);
}

/* "SEQ:HASH" as printed after "anchor:". */
static int parse_anchor(const char *s, uint64_t *ret_seq, char ret_hash[static ND_SHA256_HEX_SIZE]) {
        char *end = NULL;
        errno = 0;
        if (*s < '1' || *s > '9')
                return -EINVAL;
        unsigned long long seq = strtoull(s, &end, 10);
        if (errno != 0 || !end || *end != ':' || strlen(end + 1) != ND_SHA256_HEX_SIZE - 1)
                return -EINVAL;
        for (const char *p = end + 1; *p; p++)
                if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
                        return -EINVAL;
        *ret_seq = seq;
        memcpy(ret_hash, end + 1, ND_SHA256_HEX_SIZE);
        return 0;
}

static int audit_verify(int argc, char *argv[]) {
        enum { ARG_STATE_DIR = 0x100, ARG_DATABASE, ARG_ANCHOR, ARG_JSON, ARG_INCREMENTAL };
        static const struct option options[] = {
                { "help",      no_argument,       NULL, 'h' },
                { "state-dir", required_argument, NULL, ARG_STATE_DIR },
                { "database",  required_argument, NULL, ARG_DATABASE },
                { "anchor",    required_argument, NULL, ARG_ANCHOR },
                { "json",      no_argument,       NULL, ARG_JSON },
                { "incremental", no_argument,     NULL, ARG_INCREMENTAL },
                { NULL, 0, NULL, 0 }
        };
        const char *state_dir = NULL, *database = NULL, *anchor = NULL;
        uint64_t anchor_seq = 0;
        char anchor_hash[ND_SHA256_HEX_SIZE] = "";
        _cleanup_free_ char *path = NULL;
        bool json = false, incremental = false;
        int c;

        opterr = 0;
        optind = 0;
        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0) {
                switch (c) {
                case 'h':
                        audit_usage(stdout);
                        return NEEDLECTL_EXIT_OK;
                case ARG_STATE_DIR:
                        state_dir = optarg;
                        break;
                case ARG_DATABASE:
                        database = optarg;
                        break;
                case ARG_ANCHOR:
                        anchor = optarg;
                        break;
                case ARG_JSON:
                        json = true;
                        break;
                case ARG_INCREMENTAL:
                        incremental = true;
                        break;
                default:
                        fprintf(stderr, "needlectl audit verify: unknown option or missing value '%s'\n",
                                argv[optind - 1]);
                        audit_usage(stderr);
                        return NEEDLECTL_EXIT_USAGE;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "needlectl audit verify: unexpected argument '%s'\n", argv[optind]);
                audit_usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        if (state_dir && database) {
                fprintf(stderr, "needlectl audit verify: give --state-dir or --database, not both\n");
                return NEEDLECTL_EXIT_USAGE;
        }
        if ((state_dir && !*state_dir) || (database && !*database)) {
                fprintf(stderr, "needlectl audit verify: empty path\n");
                return NEEDLECTL_EXIT_USAGE;
        }
        if (anchor && parse_anchor(anchor, &anchor_seq, anchor_hash) < 0) {
                fprintf(stderr, "needlectl audit verify: --anchor '%s' is not SEQ:HASH (an entry number above 0 "
                        "and 64 lower-case hex digits)\n", anchor);
                return NEEDLECTL_EXIT_USAGE;
        }
        if (incremental && !anchor) {
                fprintf(stderr, "needlectl audit verify: --incremental needs --anchor SEQ:HASH (from an earlier "
                        "verification)\n");
                return NEEDLECTL_EXIT_USAGE;
        }
        if (database)
                path = strdup(database);
        else if (asprintf(&path, "%s/%s", state_dir ? state_dir : ND_LEDGER_STATE_DIR_DEFAULT, ND_LEDGER_FILE_NAME) < 0)
                path = NULL;
        if (!path) {
                fprintf(stderr, "needlectl: out of memory\n");
                return NEEDLECTL_EXIT_UNREADABLE;
        }

        nd_ledger_verify_result v;
        int r = incremental ? nd_ledger_audit_verify_from_anchor(path, anchor_seq, anchor_hash, &v)
                            : nd_ledger_audit_verify_anchored(path, anchor_seq, anchor_hash, &v);
        if (json) {
                int k = print_json(path, r, &v);
                if (k < 0) {
                        fprintf(stderr, "needlectl: cannot print the result: %s\n", strerror(-k));
                        return NEEDLECTL_EXIT_UNREADABLE;
                }
        } else if (r >= 0)
                print_text(path, &v, incremental ? anchor_seq : 0);
        if (r < 0) {
                fprintf(stderr, "needlectl: cannot verify: %s\n", v.message);
                return NEEDLECTL_EXIT_UNREADABLE;
        }
        return v.broken == ND_LEDGER_INTACT ? NEEDLECTL_EXIT_OK : NEEDLECTL_EXIT_INVALID;
}

int verb_audit(int argc, char *argv[]) {
        if (argc < 2) {
                audit_usage(stderr);
                return NEEDLECTL_EXIT_USAGE;
        }
        if (STREQ(argv[1], "--help") || STREQ(argv[1], "-h")) {
                audit_usage(stdout);
                return NEEDLECTL_EXIT_OK;
        }
        if (STREQ(argv[1], "verify"))
                return audit_verify(argc - 1, argv + 1);
        fprintf(stderr, "needlectl audit: unknown subcommand '%s' (only 'verify')\n", argv[1]);
        return NEEDLECTL_EXIT_USAGE;
}
