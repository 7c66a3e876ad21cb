/* ledger.c: the treatment ledger on SQLite (see ledger.h and docs/ledger.md). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>
#include <systemd/sd-id128.h>
#include <unistd.h>

#include "ledger.h"

/* Long enough for a writer that holds the lock for one commit; short enough never to stall the
 * event loop noticeably. Another process holding the database longer gets -EBUSY (Storage). */
#define LEDGER_BUSY_TIMEOUT_MS 250
#define REASON_MAX 64
#define HASH_HEX_LEN (ND_SHA256_HEX_SIZE - 1)
#define ROW_DIGEST_PREFIX "row-sha256="
#define AUDIT_ACTION_BEGIN "session-begin"
#define AUDIT_ACTION_END "session-end"
#define AUDIT_ACTION_VOID "session-void"
/* The connection's page cache: 256 KiB. The ledger's work is a few small writes per session and
 * the odd history query; the kernel's page cache holds the file anyway. SQLite's default (2 MiB)
 * would let a long-running daemon's heap grow with the ledger (quick_check alone reads every
 * page at start). */
#define LEDGER_CACHE_PRAGMA "PRAGMA cache_size=-256"
/* nd_ledger_open_deferred() checks files up to this size at open (reading 1 MiB: a few ms cold). */
#define LEDGER_CHECK_AT_OPEN_MAX_BYTES (1024 * 1024)
#define VERIFY_CACHE_PRAGMAS "PRAGMA cache_size=-65536; PRAGMA mmap_size=4294967296"
#define LEDGER_SYNC_OFF 0
#define LEDGER_SYNC_NORMAL 1
#define LEDGER_SYNC_FULL 2

/* The domain tags make a digest of one kind of record unusable as another kind's. */
#define AUDIT_HASH_TAG "needled-audit-v1\n"
#define SESSION_BEGIN_TAG "needled-session-begin-v1\n"
#define SESSION_END_TAG "needled-session-end-v1\n"

static const char zero_hash[ND_SHA256_HEX_SIZE] =
        "0000000000000000000000000000000000000000000000000000000000000000";

struct nd_ledger {
        sqlite3 *db;
        char *path;
        int synchronous;        /* the PRAGMA synchronous in force; -1: unknown */
        bool bulk_load;         /* nd_ledger_set_bulk_load(): nothing synced (test ledgers only) */
        bool unchecked;         /* opened with nd_ledger_open_deferred(), its check not yet passed */
        struct pending_audit *pending;  /* audit entries held while unchecked, oldest first */
        size_t n_pending;
        char error[1024];
};

/* An audit entry made while the file's integrity check runs, written once it has passed. */
struct pending_audit {
        uint64_t time_us;
        uint32_t uid, pid;
        char *actor, *action, *object, *detail;
};

static inline void sqlite3_finalizep(sqlite3_stmt **s) {
        if (*s)
                sqlite3_finalize(*s);
}
static inline void sqlite3_closep(sqlite3 **db) {
        if (*db)
                sqlite3_close_v2(*db);
}
#define _cleanup_stmt_ _cleanup_(sqlite3_finalizep)

/* ---- errors ---- */

/* The errno class of an SQLite result code (see ledger.h for what callers do with it). */
static int errno_from_sqlite(sqlite3 *db, int rc) {
        int sys = db ? sqlite3_system_errno(db) : 0;

        switch (rc & 0xff) {
        case SQLITE_FULL:
                return -ENOSPC;
        case SQLITE_READONLY:
        case SQLITE_CANTOPEN:
        case SQLITE_PERM:
        case SQLITE_AUTH:
                return -EROFS;
        case SQLITE_CORRUPT:
        case SQLITE_NOTADB:
        case SQLITE_FORMAT:
                return -EBADMSG;
        case SQLITE_BUSY:
        case SQLITE_LOCKED:
                return -EBUSY;
        case SQLITE_NOMEM:
                return -ENOMEM;
        case SQLITE_INTERRUPT:
                return -EINTR;
        case SQLITE_CONSTRAINT:
                return -EEXIST;
        case SQLITE_IOERR:
                if (sys == ENOSPC || sys == EDQUOT)
                        return -ENOSPC;
                if (sys == EROFS || sys == EACCES || sys == EPERM)
                        return -EROFS;
                return -EIO;
        default:
                return -EIO;
        }
}

_printf_(3, 4)
static int set_error(nd_ledger *l, int r, const char *fmt, ...) {
        va_list ap;
        int n = snprintf(l->error, sizeof l->error, "%s: ", l->path);
        if (n < 0 || (size_t) n >= sizeof l->error)
                n = 0;
        va_start(ap, fmt);
        vsnprintf(l->error + n, sizeof l->error - (size_t) n, fmt, ap);
        va_end(ap);
        return r;
}

/* Records an SQLite failure with what was being done; returns its -errno. */
static int sql_error(nd_ledger *l, int rc, const char *what) {
        int r = errno_from_sqlite(l->db, rc);
        int sys = sqlite3_system_errno(l->db);

        if (sys != 0 && (rc & 0xff) != SQLITE_CONSTRAINT)
                return set_error(l, r, "%s: %s (%s)", what, sqlite3_errmsg(l->db), strerror(sys));
        return set_error(l, r, "%s: %s", what, sqlite3_errmsg(l->db));
}

/* ---- argument checks ---- */

static bool utf8_valid(const char *s) {
        const unsigned char *p = (const unsigned char *) s;

        while (*p) {
                unsigned c = *p, n;
                uint32_t cp;
                if (c < 0x80) {
                        p++;
                        continue;
                } else if ((c & 0xe0) == 0xc0) {
                        n = 1;
                        cp = c & 0x1f;
                } else if ((c & 0xf0) == 0xe0) {
                        n = 2;
                        cp = c & 0x0f;
                } else if ((c & 0xf8) == 0xf0) {
                        n = 3;
                        cp = c & 0x07;
                } else
                        return false;
                for (unsigned i = 1; i <= n; i++) {
                        if ((p[i] & 0xc0) != 0x80)
                                return false;
                        cp = (cp << 6) | (p[i] & 0x3f);
                }
                /* Overlong forms, surrogates and values beyond Unicode are not UTF-8. */
                if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
                    (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)
                        return false;
                p += n + 1;
        }
        return true;
}

/* Text must be present, valid UTF-8 (it goes out over D-Bus) and bounded. */
static int check_text(nd_ledger *l, const char *field, const char *s, size_t max, bool allow_empty) {
        if (!s)
                return set_error(l, -EINVAL, "%s is missing", field);
        size_t n = strnlen(s, max + 1);
        if (n > max)
                return set_error(l, -EINVAL, "%s is longer than %zu bytes", field, max);
        if (n == 0 && !allow_empty)
                return set_error(l, -EINVAL, "%s is empty", field);
        if (!utf8_valid(s))
                return set_error(l, -EINVAL, "%s is not valid UTF-8", field);
        return 0;
}

static bool is_session_id(const char *s) {
        if (!s || strlen(s) != ND_LEDGER_SESSION_ID_SIZE - 1)
                return false;
        for (size_t i = 0; i < ND_LEDGER_SESSION_ID_SIZE - 1; i++) {
                bool dash = i == 8 || i == 13 || i == 18 || i == 23;
                if (dash ? s[i] != '-' : !((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
                        return false;
        }
        return true;
}

static int check_session_id(nd_ledger *l, const char *id) {
        if (!is_session_id(id))
                return set_error(l, -EINVAL, "'%s' is not a session id (a lower-case UUID)", strempty(id));
        return 0;
}

/* Reasons are the kebab codes of SessionEnded: "completed", "fault:over-temperature", ... */
static int check_reason(nd_ledger *l, const char *reason) {
        if (!reason || !*reason || strlen(reason) > REASON_MAX)
                return set_error(l, -EINVAL, "end reason '%s' is empty or too long", strempty(reason));
        for (const char *p = reason; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-' || *p == ':'))
                        return set_error(l, -EINVAL, "end reason '%s' is not a kebab code", reason);
        return 0;
}

static bool value_ok(double v) {
        return isfinite(v) && v >= 0;
}

static int check_stats(nd_ledger *l, const nd_ledger_stats *st) {
        if (!st)
                return set_error(l, -EINVAL, "no session figures");
        if (!value_ok(st->duration_s) || !value_ok(st->max_depth_mm) || !value_ok(st->max_speed_hz) ||
            !value_ok(st->max_current_ma) || !isfinite(st->max_temperature_c))
                return set_error(l, -EINVAL, "session figures must be finite (and not negative)");
        if (st->strokes > (uint64_t) INT64_MAX)
                return set_error(l, -EINVAL, "stroke count %" PRIu64 " out of range", st->strokes);
        if (st->punctures > (uint64_t) INT64_MAX || !value_ok(st->density_per_cm2))
                return set_error(l, -EINVAL, "puncture figures out of range");
        return 0;
}

static bool time_ok(uint64_t t_us) {
        return t_us <= (uint64_t) INT64_MAX;
}

/* ---- canonical encodings for the hashes (docs/ledger.md, "Hashes") ---- */

typedef struct enc {
        char *data;
        size_t len, cap;
        bool oom;
} enc;

static void enc_done(enc *e) {
        free(e->data);
        *e = (enc) { 0 };
}

static void enc_bytes(enc *e, const void *p, size_t n) {
        if (e->oom)
                return;
        if (e->len + n + 1 > e->cap) {
                size_t cap = MAX(e->cap * 2, e->len + n + 1);
                char *d = realloc(e->data, MAX(cap, (size_t) 256));
                if (!d) {
                        e->oom = true;
                        return;
                }
                e->data = d;
                e->cap = MAX(cap, (size_t) 256);
        }
        memcpy(e->data + e->len, p, n);
        e->len += n;
}

static void enc_fmt(enc *e, const char *fmt, ...) _printf_(2, 3);
static void enc_fmt(enc *e, const char *fmt, ...) {
        char buf[64];
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        if (n < 0 || (size_t) n >= sizeof buf) {
                e->oom = true;
                return;
        }
        enc_bytes(e, buf, (size_t) n);
}

/* i<decimal>\n ; r<16 hex digits of the IEEE-754 bits>\n ; t<length>:<bytes>\n ;
 * b<length>:<bytes>\n ; n\n. Locale-independent and unambiguous: every field says its type and
 * text says its length before its bytes. */
/* prefix, the decimal digits of v, suffix, as enc_fmt() would write them, without printf
 * (verification encodes millions of numbers). */
static void enc_number(enc *e, char prefix, int64_t v, char suffix) {
        char buf[24];
        size_t i = sizeof buf;
        uint64_t u = v < 0 ? (uint64_t) 0 - (uint64_t) v : (uint64_t) v;
        buf[--i] = suffix;
        do {
                buf[--i] = (char) ('0' + u % 10);
                u /= 10;
        } while (u);
        if (v < 0)
                buf[--i] = '-';
        buf[--i] = prefix;
        enc_bytes(e, buf + i, sizeof buf - i);
}
static void enc_int(enc *e, int64_t v) {
        enc_number(e, 'i', v, '\n');
}
static void enc_real(enc *e, double v) {
        uint64_t bits;
        memcpy(&bits, &v, sizeof bits);
        enc_fmt(e, "r%016" PRIx64 "\n", bits);
}
static void enc_text(enc *e, const char *s, size_t n) {
        enc_number(e, 't', (int64_t) n, ':');
        enc_bytes(e, s, n);
        enc_bytes(e, "\n", 1);
}
static void enc_str(enc *e, const char *s) {
        enc_text(e, s, strlen(s));
}

/* Encodes a result column by its stored type, so a value whose type was changed hashes differently. */
static void enc_column(enc *e, sqlite3_stmt *st, int col) {
        switch (sqlite3_column_type(st, col)) {
        case SQLITE_INTEGER:
                enc_int(e, sqlite3_column_int64(st, col));
                break;
        case SQLITE_FLOAT:
                enc_real(e, sqlite3_column_double(st, col));
                break;
        case SQLITE_TEXT: {
                const char *t = (const char *) sqlite3_column_text(st, col);
                enc_text(e, t ? t : "", (size_t) sqlite3_column_bytes(st, col));
                break;
        }
        case SQLITE_BLOB: {
                const void *b = sqlite3_column_blob(st, col);
                size_t n = (size_t) sqlite3_column_bytes(st, col);
                enc_fmt(e, "b%zu:", n);
                enc_bytes(e, b, n);
                enc_bytes(e, "\n", 1);
                break;
        }
        default:
                enc_bytes(e, "n\n", 2);
        }
}

static int enc_digest(enc *e, char out[static ND_SHA256_HEX_SIZE]) {
        if (e->oom)
                return -ENOMEM;
        nd_sha256_hex(e->data, e->len, out);
        return 0;
}

/* The hash of an audit entry: AUDIT_HASH_TAG, then seq, time_us, uid, pid as integers and actor,
 * action, object, detail, prev_hash as text. */
static int audit_entry_hash(int64_t seq, int64_t time_us, int64_t uid, int64_t pid, const char *actor,
                            const char *action, const char *object, const char *detail, const char *prev_hash,
                            char out[static ND_SHA256_HEX_SIZE]) {
        _cleanup_(enc_done) enc e = { 0 };
        enc_bytes(&e, AUDIT_HASH_TAG, strlen(AUDIT_HASH_TAG));
        enc_int(&e, seq);
        enc_int(&e, time_us);
        enc_int(&e, uid);
        enc_int(&e, pid);
        enc_str(&e, actor);
        enc_str(&e, action);
        enc_str(&e, object);
        enc_str(&e, detail);
        enc_str(&e, prev_hash);
        return enc_digest(&e, out);
}

/* The columns of a session fixed when it starts, and all its columns once it has ended: the
 * audit entries of its start and end carry their digests, which ties the rows to the chain. */
#define SESSION_BEGIN_DIGEST_COLUMNS \
        "id, pen_serial, cartridge_id, needles, profile_name, profile_yaml, profile_digest, " \
        "limits_digest, label, owner_uid, owner_pid, owner_name, start_us, single_use, max_runtime_s"
#define SESSION_END_DIGEST_COLUMNS SESSION_BEGIN_DIGEST_COLUMNS ", " \
        "end_us, duration_s, strokes, max_depth_mm, max_speed_hz, max_temperature_c, max_current_ma, end_reason"
/* Schema 2's columns, after the ones above. They are NULL in rows written before schema 2 and
 * never NULL after; a NULL one is left out of the digest, so a row written under schema 1
 * hashes as it did then, and clearing or setting one of them afterwards changes the digest. */
#define SESSION_BEGIN_DIGEST_COLUMNS_2 ", skin_type, area_cm2"
#define SESSION_END_DIGEST_COLUMNS_2 SESSION_BEGIN_DIGEST_COLUMNS_2 ", punctures, density_per_cm2"
#define SESSION_BEGIN_DIGEST_COUNT_1 15
#define SESSION_END_DIGEST_COUNT_1 23

/* schema: the file's schema version (verification reads files of every version). With cache
 * NULL the statement is prepared for this call; else *cache keeps it prepared between calls (the
 * caller finalizes it): verification asks this once per session end and start. */
static int session_row_digest_cached(sqlite3 *db, const char *id, bool ended, int64_t schema,
                                     char out[static ND_SHA256_HEX_SIZE], int *ret_sqlite_rc, sqlite3_stmt **cache) {
        _cleanup_stmt_ sqlite3_stmt *own = NULL;
        sqlite3_stmt *st;
        const char *sql;
        if (schema >= 2)
                sql = ended ? "SELECT " SESSION_END_DIGEST_COLUMNS SESSION_END_DIGEST_COLUMNS_2 " FROM sessions WHERE id = ?1"
                            : "SELECT " SESSION_BEGIN_DIGEST_COLUMNS SESSION_BEGIN_DIGEST_COLUMNS_2 " FROM sessions WHERE id = ?1";
        else
                sql = ended ? "SELECT " SESSION_END_DIGEST_COLUMNS " FROM sessions WHERE id = ?1"
                            : "SELECT " SESSION_BEGIN_DIGEST_COLUMNS " FROM sessions WHERE id = ?1";
        int first_optional = ended ? SESSION_END_DIGEST_COUNT_1 : SESSION_BEGIN_DIGEST_COUNT_1;
        int rc = SQLITE_OK;
        if (cache && *cache) {
                st = *cache;
                sqlite3_reset(st);
        } else {
                rc = sqlite3_prepare_v2(db, sql, -1, cache ? cache : &own, NULL);
                st = cache ? *cache : own;
        }
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return -ENOENT;
        if (rc != SQLITE_ROW) {
                *ret_sqlite_rc = rc;
                return -EIO;
        }
        _cleanup_(enc_done) enc e = { 0 };
        const char *tag = ended ? SESSION_END_TAG : SESSION_BEGIN_TAG;
        enc_bytes(&e, tag, strlen(tag));
        for (int i = 0; i < sqlite3_column_count(st); i++)
                if (i < first_optional || sqlite3_column_type(st, i) != SQLITE_NULL)
                        enc_column(&e, st, i);
        return enc_digest(&e, out);
}


/* ---- schema 3: rows read through the profile snapshots, entries with derived details ---- */

/* A session's row as its digests see it: the snapshot's columns joined back in, so a row hashes
 * exactly as it did when the snapshot was a part of it (schemas 1 and 2). CROSS JOIN: sessions
 * drives the join (history queries walk a sessions index). */
#define SNAPSHOT_JOIN " FROM sessions CROSS JOIN snapshots ON snapshots.snapshot_id = sessions.snapshot_id "
/* Every digest column (the end digest's, then schema 2's) in the order of the digests. */
#define ROW_DIGEST_SELECT "SELECT " SESSION_END_DIGEST_COLUMNS SESSION_END_DIGEST_COLUMNS_2
#define ROW_SQL_V2 ROW_DIGEST_SELECT " FROM sessions WHERE id = ?1"
#define ROW_SQL_V3 ROW_DIGEST_SELECT ", begin_seq, end_seq" SNAPSHOT_JOIN "WHERE id = ?1"
/* Column numbers in a ROW_SQL_* row. */
enum {
        ROW_PEN = 1, ROW_CARTRIDGE = 2, ROW_NEEDLES = 3, ROW_PROFILE_NAME = 4, ROW_PROFILE_DIGEST = 6,
        ROW_LIMITS_DIGEST = 7, ROW_LABEL = 8, ROW_END_US = 15, ROW_DURATION = 16, ROW_STROKES = 17,
        ROW_REASON = 22, ROW_SKIN = 23, ROW_AREA = 24, ROW_PUNCTURES = 25, ROW_DENSITY = 26,
        ROW_BEGIN_SEQ = 27, ROW_END_SEQ = 28,
};
/* A session entry whose detail is derived keeps this many leading bytes of the row digest it
 * recorded, as a BLOB: enough to tell a changed row (record-mismatch) from a changed entry
 * (hash-mismatch); the entry's hash covers the whole digest. */
#define DETAIL_STUB_SIZE 8
#define HASH_SIZE 32

/* The row digest of the begin (ended false) or end columns of a ROW_SQL_* row. */
static int row_digest(sqlite3_stmt *st, bool ended, enc *e, char out[static ND_SHA256_HEX_SIZE]) {
        const char *tag = ended ? SESSION_END_TAG : SESSION_BEGIN_TAG;
        int fixed = ended ? SESSION_END_DIGEST_COUNT_1 : SESSION_BEGIN_DIGEST_COUNT_1;
        e->len = 0;
        enc_bytes(e, tag, strlen(tag));
        for (int i = 0; i < fixed; i++)
                enc_column(e, st, i);
        for (int i = ROW_SKIN; i <= (ended ? ROW_DENSITY : ROW_AREA); i++)
                if (sqlite3_column_type(st, i) != SQLITE_NULL)
                        enc_column(e, st, i);
        return enc_digest(e, out);
}

static const char *col_text(sqlite3_stmt *st, int col) {
        return strempty((const char *) sqlite3_column_text(st, col));
}

/* The detail this build writes for a session's begin or end entry, from its ROW_SQL_* row and
 * that row's digest: an entry whose stored detail is exactly this keeps only a stub of the
 * digest, and verification rebuilds the text (docs/ledger.md, "Compact storage"). */
static int session_detail(sqlite3_stmt *st, bool ended, const char *digest, char **ret) {
        int n;
        if (ended)
                n = asprintf(ret, ROW_DIGEST_PREFIX "%s reason=%s pen=%s cartridge=%s duration-ms=%" PRId64
                             " strokes=%" PRId64 " punctures=%" PRId64,
                             digest, col_text(st, ROW_REASON), col_text(st, ROW_PEN), col_text(st, ROW_CARTRIDGE),
                             (int64_t) llround(sqlite3_column_double(st, ROW_DURATION) * 1000.0),
                             (int64_t) sqlite3_column_int64(st, ROW_STROKES),
                             (int64_t) sqlite3_column_int64(st, ROW_PUNCTURES));
        else {
                const char *skin = col_text(st, ROW_SKIN);
                n = asprintf(ret, ROW_DIGEST_PREFIX "%s pen=%s cartridge=%s needles=%" PRId64 " profile=%s "
                             "profile-digest=%s limits-digest=%s label=%s skin-type=%s",
                             digest, col_text(st, ROW_PEN), col_text(st, ROW_CARTRIDGE),
                             (int64_t) sqlite3_column_int64(st, ROW_NEEDLES), col_text(st, ROW_PROFILE_NAME),
                             col_text(st, ROW_PROFILE_DIGEST), col_text(st, ROW_LIMITS_DIGEST), col_text(st, ROW_LABEL),
                             *skin ? skin : "none");
        }
        if (n < 0) {
                *ret = NULL;
                return -ENOMEM;
        }
        return 0;
}

static int hex_value(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        return -1;
}

/* 2n lower-case hex digits to n bytes; false if they are not that. */
static bool hex_to_bytes(const char *hex, size_t n, uint8_t *out) {
        for (size_t i = 0; i < n; i++) {
                int hi = hex_value(hex[2 * i]), lo = hi < 0 ? -1 : hex_value(hex[2 * i + 1]);
                if (lo < 0)
                        return false;
                out[i] = (uint8_t) (hi << 4 | lo);
        }
        return true;
}

static void bytes_to_hex(const uint8_t *b, size_t n, char *out) {
        static const char hex[] = "0123456789abcdef";
        for (size_t i = 0; i < n; i++) {
                out[2 * i] = hex[b[i] >> 4];
                out[2 * i + 1] = hex[b[i] & 0xf];
        }
        out[2 * n] = '\0';
}

/* A stored hash (schema 3: a 32-byte BLOB) as hex; false when it is not one. */
static bool hash_blob_hex(sqlite3_stmt *st, int col, char out[static ND_SHA256_HEX_SIZE]) {
        if (sqlite3_column_type(st, col) != SQLITE_BLOB || sqlite3_column_bytes(st, col) != HASH_SIZE)
                return false;
        bytes_to_hex(sqlite3_column_blob(st, col), HASH_SIZE, out);
        return true;
}

/* ---- small SQL helpers ---- */

static int refuse_unchecked(nd_ledger *l) {
        return set_error(l, -EAGAIN, "the integrity check (is the file corrupt?) has not finished: nothing is "
                         "recorded, and no session starts, until it has passed; try again in a moment");
}

static int exec(nd_ledger *l, const char *sql, const char *what) {
        int rc = sqlite3_exec(l->db, sql, NULL, NULL, NULL);
        if (rc != SQLITE_OK)
                return sql_error(l, rc, what);
        return 0;
}

static int prepare(nd_ledger *l, const char *sql, sqlite3_stmt **ret) {
        int rc = sqlite3_prepare_v2(l->db, sql, -1, ret, NULL);
        if (rc != SQLITE_OK)
                return sql_error(l, rc, "preparing a statement");
        return 0;
}

/* Steps a statement that returns no row. */
static int step_done(nd_ledger *l, sqlite3_stmt *st, const char *what) {
        int rc = sqlite3_step(st);
        if (rc != SQLITE_DONE)
                return sql_error(l, rc, what);
        return 0;
}

static int set_synchronous(nd_ledger *l, int level) {
        if (l->bulk_load)
                level = LEDGER_SYNC_OFF;
        if (l->synchronous == level)
                return 0;
        int r = exec(l, level == LEDGER_SYNC_FULL   ? "PRAGMA synchronous=FULL" :
                        level == LEDGER_SYNC_NORMAL ? "PRAGMA synchronous=NORMAL" : "PRAGMA synchronous=OFF",
                     "setting the sync mode");
        if (r < 0)
                return r;
        l->synchronous = level;
        return 0;
}

static void tx_rollback(nd_ledger *l) {
        /* SQLite may already have rolled back after a full disk or I/O error. */
        if (!sqlite3_get_autocommit(l->db))
                (void) sqlite3_exec(l->db, "ROLLBACK", NULL, NULL, NULL);
}

/* IMMEDIATE: take the write lock now, so a transaction never fails half way for a lock. */
static int tx_begin(nd_ledger *l, int sync_level) {
        int r = set_synchronous(l, sync_level);
        if (r < 0)
                return r;
        return exec(l, "BEGIN IMMEDIATE", "starting a transaction");
}

static int tx_commit(nd_ledger *l) {
        int r = exec(l, "COMMIT", "committing");
        if (r < 0)
                tx_rollback(l);
        return r;
}

static int bind_text(sqlite3_stmt *st, int i, const char *s) {
        return sqlite3_bind_text(st, i, s, -1, SQLITE_STATIC);
}

/* ---- schema and migrations ---- */

static int migrate_to_1(nd_ledger *l) {
        static const char schema[] =
                "CREATE TABLE cartridges ("
                "  id TEXT PRIMARY KEY NOT NULL,"
                "  needles INTEGER NOT NULL CHECK (needles > 0),"
                "  first_used_us INTEGER NOT NULL,"
                "  state TEXT NOT NULL CHECK (state IN ('fresh', 'in-use', 'spent'))"
                ") STRICT;"
                "CREATE TABLE sessions ("
                "  id TEXT PRIMARY KEY NOT NULL,"
                "  pen_serial TEXT NOT NULL,"
                "  cartridge_id TEXT NOT NULL REFERENCES cartridges(id),"
                "  needles INTEGER NOT NULL,"
                "  profile_name TEXT NOT NULL,"
                "  profile_yaml TEXT NOT NULL,"
                "  profile_digest TEXT NOT NULL,"
                "  limits_digest TEXT NOT NULL,"
                "  label TEXT NOT NULL,"
                "  owner_uid INTEGER NOT NULL,"
                "  owner_pid INTEGER NOT NULL,"
                "  owner_name TEXT NOT NULL,"
                "  single_use INTEGER NOT NULL CHECK (single_use IN (0, 1)),"
                "  max_runtime_s INTEGER NOT NULL,"
                "  start_us INTEGER NOT NULL,"
                "  updated_us INTEGER NOT NULL,"
                "  end_us INTEGER,"                     /* NULL while running */
                "  duration_s REAL NOT NULL DEFAULT 0,"
                "  strokes INTEGER NOT NULL DEFAULT 0,"
                "  max_depth_mm REAL NOT NULL DEFAULT 0,"
                "  max_speed_hz REAL NOT NULL DEFAULT 0,"
                "  max_temperature_c REAL NOT NULL DEFAULT 0,"
                "  max_current_ma REAL NOT NULL DEFAULT 0,"
                "  end_reason TEXT,"                    /* NULL while running */
                "  CHECK ((end_us IS NULL) = (end_reason IS NULL))"
                ") STRICT;"
                "CREATE INDEX sessions_by_start ON sessions(start_us);"
                "CREATE INDEX sessions_by_pen ON sessions(pen_serial, start_us);"
                "CREATE INDEX sessions_by_cartridge ON sessions(cartridge_id);"
                "CREATE INDEX sessions_running ON sessions(end_us) WHERE end_us IS NULL;"
                "CREATE TABLE audit ("
                "  seq INTEGER PRIMARY KEY,"
                "  time_us INTEGER NOT NULL,"
                "  uid INTEGER NOT NULL,"
                "  pid INTEGER NOT NULL,"
                "  actor TEXT NOT NULL,"
                "  action TEXT NOT NULL,"
                "  object TEXT NOT NULL,"
                "  detail TEXT NOT NULL,"
                "  prev_hash TEXT NOT NULL,"
                "  hash TEXT NOT NULL"
                ") STRICT;"
                "CREATE INDEX audit_by_object ON audit(object, action);"
                /* The count and hash of the last entry, written in the same transaction as every
                 * entry: the chain alone cannot show that entries were cut from its end. */
                "CREATE TABLE audit_head ("
                "  id INTEGER PRIMARY KEY CHECK (id = 1),"
                "  count INTEGER NOT NULL,"
                "  head_hash TEXT NOT NULL"
                ") STRICT;"
                "INSERT INTO audit_head (id, count, head_hash) VALUES "
                "  (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');";
        return exec(l, schema, "creating the schema (version 1)");
}

/* Schema 2: the skin type, treated surface and measured dose of a session (docs/ledger.md).
 * Added as nullable columns, so the rows already there keep their values and their digests
 * (session_row_digest leaves NULLs out); every row written from now on fills them in. */
static int migrate_to_2(nd_ledger *l) {
        static const char schema[] =
                "ALTER TABLE sessions ADD COLUMN skin_type TEXT;"
                "ALTER TABLE sessions ADD COLUMN area_cm2 REAL CHECK (area_cm2 IS NULL OR area_cm2 >= 0);"
                "ALTER TABLE sessions ADD COLUMN punctures INTEGER CHECK (punctures IS NULL OR punctures >= 0);"
                "ALTER TABLE sessions ADD COLUMN density_per_cm2 REAL CHECK (density_per_cm2 IS NULL OR density_per_cm2 >= 0);";
        return exec(l, schema, "adding the dose columns (version 2)");
}

/* Schema 3 (compact records, docs/ledger.md): the tables as this build creates them. */
#define SCHEMA3_SNAPSHOTS \
        "CREATE TABLE snapshots (" \
        "  snapshot_id INTEGER PRIMARY KEY," \
        "  profile_name TEXT NOT NULL," \
        "  profile_yaml TEXT NOT NULL," \
        "  profile_digest TEXT NOT NULL," \
        "  limits_digest TEXT NOT NULL," \
        "  UNIQUE (profile_digest, limits_digest, profile_name, profile_yaml)" \
        ") STRICT;"
#define SCHEMA3_SESSIONS(name) \
        "CREATE TABLE " name " (" \
        "  id TEXT PRIMARY KEY NOT NULL," \
        "  pen_serial TEXT NOT NULL," \
        "  cartridge_id TEXT NOT NULL REFERENCES cartridges(id)," \
        "  needles INTEGER NOT NULL," \
        "  snapshot_id INTEGER NOT NULL REFERENCES snapshots(snapshot_id)," \
        "  label TEXT NOT NULL," \
        "  owner_uid INTEGER NOT NULL," \
        "  owner_pid INTEGER NOT NULL," \
        "  owner_name TEXT NOT NULL," \
        "  single_use INTEGER NOT NULL CHECK (single_use IN (0, 1))," \
        "  max_runtime_s INTEGER NOT NULL," \
        "  start_us INTEGER NOT NULL," \
        "  updated_us INTEGER NOT NULL," \
        "  end_us INTEGER," \
        "  duration_s REAL NOT NULL DEFAULT 0," \
        "  strokes INTEGER NOT NULL DEFAULT 0," \
        "  max_depth_mm REAL NOT NULL DEFAULT 0," \
        "  max_speed_hz REAL NOT NULL DEFAULT 0," \
        "  max_temperature_c REAL NOT NULL DEFAULT 0," \
        "  max_current_ma REAL NOT NULL DEFAULT 0," \
        "  end_reason TEXT," \
        "  skin_type TEXT," \
        "  area_cm2 REAL CHECK (area_cm2 IS NULL OR area_cm2 >= 0)," \
        "  punctures INTEGER CHECK (punctures IS NULL OR punctures >= 0)," \
        "  density_per_cm2 REAL CHECK (density_per_cm2 IS NULL OR density_per_cm2 >= 0)," \
        "  begin_seq INTEGER," \
        "  end_seq INTEGER," \
        "  CHECK ((end_us IS NULL) = (end_reason IS NULL))" \
        ") STRICT;"
#define SCHEMA3_AUDIT(name) \
        "CREATE TABLE " name " (" \
        "  seq INTEGER PRIMARY KEY," \
        "  time_us INTEGER NOT NULL," \
        "  uid INTEGER NOT NULL," \
        "  pid INTEGER NOT NULL," \
        "  actor TEXT NOT NULL," \
        "  action TEXT NOT NULL," \
        "  object TEXT NOT NULL," \
        "  detail ANY NOT NULL," \
        "  hash BLOB NOT NULL" \
        ") STRICT;"
/* The prev_hash of an entry whose stored prev_hash was not the previous entry's hash (a schema-2
 * trail changed by hand), kept by the migration so that the break still shows; never written
 * otherwise, so empty in a ledger that verifies. */
#define SCHEMA3_AUDIT_PREV \
        "CREATE TABLE audit_prev (" \
        "  seq INTEGER PRIMARY KEY," \
        "  prev_hash ANY" \
        ") STRICT;"
#define SCHEMA3_SESSION_INDEXES \
        "CREATE INDEX sessions_by_start ON sessions(start_us);" \
        "CREATE INDEX sessions_by_pen ON sessions(pen_serial, start_us);" \
        "CREATE INDEX sessions_by_cartridge ON sessions(cartridge_id);" \
        "CREATE INDEX sessions_running ON sessions(end_us) WHERE end_us IS NULL;"

/* Copies the audit trail into audit3: hashes as BLOBs, prev_hash left out (it is the previous
 * entry's hash), and the detail of a session entry that is exactly what this build would write
 * for its row replaced by a stub of the row digest. Anything unexpected (a hash that is not 64
 * hex digits, a detail that differs) is copied as it is, for verification to report. */
static int migrate_audit_to_3(nd_ledger *l) {
        _cleanup_stmt_ sqlite3_stmt *rd = NULL, *ins = NULL, *row = NULL;
        _cleanup_(enc_done) enc e = { 0 };
        int r, rc;

        _cleanup_stmt_ sqlite3_stmt *link = NULL;
        _cleanup_free_ char *last_hash = strdup(zero_hash);
        if (!last_hash)
                return set_error(l, -ENOMEM, "out of memory");
        r = prepare(l, "SELECT seq, time_us, uid, pid, actor, action, object, detail, hash, prev_hash FROM audit ORDER BY seq", &rd);
        if (r >= 0)
                r = prepare(l, "INSERT INTO audit_prev (seq, prev_hash) VALUES (?1, ?2)", &link);
        if (r >= 0)
                r = prepare(l, "INSERT INTO audit3 (seq, time_us, uid, pid, actor, action, object, detail, hash) "
                               "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)", &ins);
        if (r >= 0)
                r = prepare(l, ROW_SQL_V2, &row);
        if (r < 0)
                return r;
        while ((rc = sqlite3_step(rd)) == SQLITE_ROW) {
                uint8_t hash[HASH_SIZE], stub[DETAIL_STUB_SIZE];
                bool stubbed = false;
                const char *action = (const char *) sqlite3_column_text(rd, 5);
                bool begin = action && STREQ(action, AUDIT_ACTION_BEGIN), end = action && STREQ(action, AUDIT_ACTION_END);

                sqlite3_reset(ins);
                for (int i = 0; i < 7; i++)
                        sqlite3_bind_value(ins, i + 1, sqlite3_column_value(rd, i));
                if ((begin || end) && sqlite3_column_type(rd, 7) == SQLITE_TEXT) {
                        char digest[ND_SHA256_HEX_SIZE];
                        _cleanup_free_ char *detail = NULL;
                        sqlite3_reset(row);
                        bind_text(row, 1, (const char *) sqlite3_column_text(rd, 6));
                        rc = sqlite3_step(row);
                        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
                                return sql_error(l, rc, "reading a session (migrating to version 3)");
                        if (rc == SQLITE_ROW && (!end || sqlite3_column_type(row, ROW_END_US) != SQLITE_NULL)) {
                                if (row_digest(row, end, &e, digest) < 0 || session_detail(row, end, digest, &detail) < 0)
                                        return set_error(l, -ENOMEM, "out of memory");
                                stubbed = STREQ(detail, (const char *) sqlite3_column_text(rd, 7));
                                if (stubbed)
                                        (void) hex_to_bytes(digest, DETAIL_STUB_SIZE, stub);
                        }
                }
                if (stubbed)
                        sqlite3_bind_blob(ins, 8, stub, DETAIL_STUB_SIZE, SQLITE_TRANSIENT);
                else
                        sqlite3_bind_value(ins, 8, sqlite3_column_value(rd, 7));
                const char *h = (const char *) sqlite3_column_text(rd, 8);
                if (h && sqlite3_column_bytes(rd, 8) == HASH_HEX_LEN && hex_to_bytes(h, HASH_SIZE, hash))
                        sqlite3_bind_blob(ins, 9, hash, HASH_SIZE, SQLITE_TRANSIENT);
                else    /* not a hash: kept (as bytes) for verification to call malformed */
                        sqlite3_bind_blob(ins, 9, h ? h : "", sqlite3_column_bytes(rd, 8), SQLITE_TRANSIENT);
                r = step_done(l, ins, "copying the audit trail (migrating to version 3)");
                if (r < 0)
                        return r;
                /* prev_hash is the previous entry's hash, as stored: left out. Anything else (the
                 * trail was changed by hand) is kept, so that verification still reports it. */
                const char *ph = (const char *) sqlite3_column_text(rd, 9);
                if (sqlite3_column_type(rd, 9) != SQLITE_TEXT || !ph || !STREQ(ph, last_hash)) {
                        sqlite3_reset(link);
                        sqlite3_bind_value(link, 1, sqlite3_column_value(rd, 0));
                        sqlite3_bind_value(link, 2, sqlite3_column_value(rd, 9));
                        r = step_done(l, link, "copying the audit trail (migrating to version 3)");
                        if (r < 0)
                                return r;
                }
                free(last_hash);
                last_hash = strdup(h ? h : "");
                if (!last_hash)
                        return set_error(l, -ENOMEM, "out of memory");
        }
        if (rc != SQLITE_DONE)
                return sql_error(l, rc, "reading the audit trail (migrating to version 3)");
        return 0;
}

/* Schema 3: compact records (docs/ledger.md). The profile snapshot and the digests armed with it
 * move to a table of their own, each distinct one stored once; a session keeps the sequence
 * numbers of its begin and end entries (so the index of the trail by object goes); the trail
 * keeps hashes as 32 bytes and no second copy of the previous entry's hash, and the ledger's own
 * session entries keep a stub of their row digest instead of a text rebuilt from the row. Every
 * value, the canonical form of every entry and every row digest stay as they were. */
static int migrate_to_3(nd_ledger *l) {
        static const char tables[] =
                SCHEMA3_SNAPSHOTS
                "INSERT OR IGNORE INTO snapshots (profile_name, profile_yaml, profile_digest, limits_digest) "
                "  SELECT profile_name, profile_yaml, profile_digest, limits_digest FROM sessions ORDER BY rowid;"
                SCHEMA3_SESSIONS("sessions3")
                "INSERT INTO sessions3 (rowid, id, pen_serial, cartridge_id, needles, snapshot_id, label, owner_uid, "
                "  owner_pid, owner_name, single_use, max_runtime_s, start_us, updated_us, end_us, duration_s, strokes, "
                "  max_depth_mm, max_speed_hz, max_temperature_c, max_current_ma, end_reason, skin_type, area_cm2, "
                "  punctures, density_per_cm2, begin_seq, end_seq) "
                "SELECT s.rowid, s.id, s.pen_serial, s.cartridge_id, s.needles, "
                "  (SELECT p.snapshot_id FROM snapshots p WHERE p.profile_digest = s.profile_digest AND "
                "     p.limits_digest = s.limits_digest AND p.profile_name = s.profile_name AND "
                "     p.profile_yaml = s.profile_yaml), "
                "  s.label, s.owner_uid, s.owner_pid, s.owner_name, s.single_use, s.max_runtime_s, s.start_us, "
                "  s.updated_us, s.end_us, s.duration_s, s.strokes, s.max_depth_mm, s.max_speed_hz, "
                "  s.max_temperature_c, s.max_current_ma, s.end_reason, s.skin_type, s.area_cm2, s.punctures, "
                "  s.density_per_cm2, "
                "  (SELECT min(a.seq) FROM audit a WHERE a.object = s.id AND a.action = 'session-begin'), "
                "  (SELECT min(a.seq) FROM audit a WHERE a.object = s.id AND a.action = 'session-end') "
                "FROM sessions s ORDER BY s.rowid;"
                SCHEMA3_AUDIT("audit3")
                SCHEMA3_AUDIT_PREV;
        static const char swap[] =
                "DROP TABLE audit;"
                "ALTER TABLE audit3 RENAME TO audit;"
                "DROP TABLE sessions;"
                "ALTER TABLE sessions3 RENAME TO sessions;"
                SCHEMA3_SESSION_INDEXES;
        int r = exec(l, tables, "converting the sessions (version 3)");
        if (r >= 0)
                r = migrate_audit_to_3(l);
        if (r >= 0)
                r = exec(l, swap, "replacing the tables (version 3)");
        return r;
}

/* migrations[v - 1] brings a database at version v - 1 to version v. Version 2 is one more
 * function here; the loop in migrate() runs every step a file needs, each in its own
 * transaction, with the version written in that same transaction. */
static int (*const migrations[])(nd_ledger *l) = {
        migrate_to_1,
        migrate_to_2,
        migrate_to_3,
};
_Static_assert(ELEMENTSOF(migrations) == ND_LEDGER_SCHEMA_VERSION, "one migration per schema version");

static int pragma_int(sqlite3 *db, const char *sql, int64_t *ret, int *ret_rc) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc != SQLITE_ROW) {
                *ret_rc = rc;
                return -EIO;
        }
        *ret = sqlite3_column_int64(st, 0);
        return 0;
}

static int migrate(nd_ledger *l, int64_t from) {
        for (int64_t v = from + 1; v <= ND_LEDGER_SCHEMA_VERSION; v++) {
                char sql[64];
                int r = tx_begin(l, LEDGER_SYNC_FULL);
                if (r < 0)
                        return r;
                r = migrations[v - 1](l);
                if (r >= 0 && v == 1) {
                        snprintf(sql, sizeof sql, "PRAGMA application_id=%d", ND_LEDGER_APPLICATION_ID);
                        r = exec(l, sql, "writing the application id");
                }
                if (r >= 0) {
                        snprintf(sql, sizeof sql, "PRAGMA user_version=%" PRId64, v);
                        r = exec(l, sql, "writing the schema version");
                }
                if (r < 0) {
                        tx_rollback(l);
                        return r;
                }
                r = tx_commit(l);
                if (r < 0)
                        return r;
        }
        /* Schema 3 left the old tables' pages free: give them back to the file system, once. A
         * failure (a full disk: VACUUM needs room for a copy) changes nothing; the free pages are
         * then reused as the ledger grows. */
        if (from >= 1 && from < 3) {
                (void) sqlite3_exec(l->db, "VACUUM", NULL, NULL, NULL);
                (void) sqlite3_exec(l->db, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL);
        }
        return 0;
}

/* Reads the file without writing: it must be a database, intact, ours, and not from the future. */
static int check_file(nd_ledger *l, bool quick_check, int64_t *ret_version) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int64_t app_id, version, tables;
        int rc = SQLITE_OK;

        /* Without the check, the header is still read (the schema version): a file that is not a
         * database fails here as it would in the check. */
        rc = sqlite3_prepare_v2(l->db, quick_check ? "PRAGMA quick_check" : "PRAGMA schema_version", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc != SQLITE_ROW) {
                int code = rc & 0xff;
                const char *what = code == SQLITE_NOTADB  ? "not an SQLite database" :
                                   code == SQLITE_CORRUPT ? "the database is corrupt" :
                                   code == SQLITE_READONLY || code == SQLITE_CANTOPEN ?
                                           "cannot read the database: write-ahead logging needs its directory "
                                           "writable" :
                                   "cannot read the database";
                return set_error(l, errno_from_sqlite(l->db, rc), "%s (%s); left as it is", what,
                                 sqlite3_errmsg(l->db));
        }
        const char *res = (const char *) sqlite3_column_text(st, 0);
        if (quick_check && (!res || !STREQ(res, "ok")))
                return set_error(l, -EBADMSG, "the database is corrupt (quick_check: %s); left as it is", strempty(res));

        if (pragma_int(l->db, "PRAGMA application_id", &app_id, &rc) < 0 ||
            pragma_int(l->db, "PRAGMA user_version", &version, &rc) < 0 ||
            pragma_int(l->db, "SELECT count(*) FROM sqlite_schema", &tables, &rc) < 0)
                return sql_error(l, rc, "reading the schema version");

        if (app_id != 0 && app_id != ND_LEDGER_APPLICATION_ID)
                return set_error(l, -EBADMSG, "not a needled ledger (application id 0x%08" PRIx64 "); left as it is",
                                 (uint64_t) app_id);
        if (app_id == 0 && (version != 0 || tables != 0))
                return set_error(l, -EBADMSG, "a database of another program (no needled application id); left as it is");
        if (version > ND_LEDGER_SCHEMA_VERSION || version < 0)
                return set_error(l, -ENOTSUP,
                                 "schema version %" PRId64 " is newer than this needled understands (%d); "
                                 "refusing to touch it (downgrade is not supported)",
                                 version, ND_LEDGER_SCHEMA_VERSION);
        *ret_version = version;
        return 0;
}

static int ledger_open(const char *state_dir, bool defer_check, nd_ledger **ret, char **error) {
        _cleanup_(nd_ledger_closep) nd_ledger *l = NULL;
        struct stat stbuf;
        int64_t version = 0;
        int r, rc;

        if (!ret)
                return -EINVAL;
        *ret = NULL;
        if (error)
                *error = NULL;
        if (!state_dir || !*state_dir) {
                if (error)
                        *error = strdup("no state directory given");
                return -EINVAL;
        }

        /* No up-front bulk allocation for page caches: pages are allocated as they are used, up
         * to LEDGER_CACHE_PRAGMA's size. Process-wide, so only before SQLite is first used (SQLITE_MISUSE
         * afterwards, which changes nothing). */
        (void) sqlite3_config(SQLITE_CONFIG_PAGECACHE, NULL, 0, 0);

        l = calloc(1, sizeof *l);
        if (!l)
                return -ENOMEM;
        l->synchronous = -1;
        if (asprintf(&l->path, "%s/%s", state_dir, ND_LEDGER_FILE_NAME) < 0) {
                l->path = NULL;
                return -ENOMEM;
        }

        if (stat(state_dir, &stbuf) < 0)
                r = set_error(l, -errno, "state directory %s: %s", state_dir, strerror(errno));
        else if (!S_ISDIR(stbuf.st_mode))
                r = set_error(l, -ENOTDIR, "state directory %s is not a directory", state_dir);
        else if (lstat(l->path, &stbuf) == 0 && !S_ISREG(stbuf.st_mode))
                r = set_error(l, S_ISDIR(stbuf.st_mode) ? -EISDIR : -EBADMSG, "not a regular file");
        else {
                rc = sqlite3_open_v2(l->path, &l->db,
                                     SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOFOLLOW |
                                     SQLITE_OPEN_EXRESCODE,
                                     NULL);
                if (rc != SQLITE_OK && access(state_dir, W_OK | X_OK) < 0)
                        r = set_error(l, errno_from_sqlite(l->db, rc),
                                      "cannot open or create the ledger: state directory %s is not writable (%s)",
                                      state_dir, strerror(errno));
                else if (rc != SQLITE_OK)
                        r = sql_error(l, rc, "cannot open or create the ledger");
                else if (sqlite3_db_readonly(l->db, "main") == 1)
                        /* SQLite quietly falls back to read-only when the file is not writable. */
                        r = set_error(l, -EROFS, "the ledger is not writable");
                else
                        r = 0;
        }
        if (r >= 0) {
                sqlite3_extended_result_codes(l->db, 1);
                sqlite3_busy_timeout(l->db, LEDGER_BUSY_TIMEOUT_MS);
                /* Before quick_check reads every page. It reads the header, so on a file that is
                 * not a database it fails: check_file() then says what the file is. */
                (void) sqlite3_exec(l->db, LEDGER_CACHE_PRAGMA, NULL, NULL, NULL);
                /* The check is deferred only for a file that needs no write to be opened: ours, of
                 * this schema, already in WAL mode (header bytes 18-19 = 2). Anything else (a new
                 * file, a migration) is checked in full first, as it will be written at once. */
                /* A small file is checked at once: that costs less than a start-up takes anyway, and
                 * the ledger can record from the first moment. */
                bool defer = defer_check && stat(l->path, &stbuf) == 0 && stbuf.st_size > LEDGER_CHECK_AT_OPEN_MAX_BYTES;
                if (defer) {
                        _cleanup_stmt_ sqlite3_stmt *jm = NULL;
                        defer = sqlite3_prepare_v2(l->db, "PRAGMA journal_mode", -1, &jm, NULL) == SQLITE_OK &&
                                sqlite3_step(jm) == SQLITE_ROW &&
                                strcasecmp(strempty((const char *) sqlite3_column_text(jm, 0)), "wal") == 0;
                }
                r = check_file(l, !defer, &version);
                if (r >= 0 && defer && version != ND_LEDGER_SCHEMA_VERSION)
                        r = check_file(l, true, &version);
                l->unchecked = r >= 0 && defer && version == ND_LEDGER_SCHEMA_VERSION;
        }
        /* Only now, with the file known to be ours, is anything written. */
        if (r >= 0)
                r = exec(l, "PRAGMA trusted_schema=OFF; PRAGMA foreign_keys=ON", "configuring the connection");
        if (r >= 0) {
                _cleanup_stmt_ sqlite3_stmt *st = NULL;
                r = prepare(l, "PRAGMA journal_mode=WAL", &st);
                if (r >= 0) {
                        rc = sqlite3_step(st);
                        const char *mode = rc == SQLITE_ROW ? (const char *) sqlite3_column_text(st, 0) : NULL;
                        if (rc != SQLITE_ROW)
                                r = sql_error(l, rc, "switching to write-ahead logging");
                        else if (!mode || strcasecmp(mode, "wal") != 0)
                                r = set_error(l, -EIO, "cannot switch to write-ahead logging (journal mode %s)",
                                              strempty(mode));
                }
        }
        if (r >= 0)
                r = set_synchronous(l, LEDGER_SYNC_FULL);
        if (r >= 0)
                r = migrate(l, version);
        if (r < 0) {
                if (error)
                        *error = strdup(l->error);
                return r;
        }

        l->error[0] = '\0';
        *ret = TAKE_PTR(l);
        return 0;
}

int nd_ledger_open(const char *state_dir, nd_ledger **ret, char **error) {
        return ledger_open(state_dir, false, ret, error);
}

int nd_ledger_open_deferred(const char *state_dir, nd_ledger **ret, char **error) {
        return ledger_open(state_dir, true, ret, error);
}

bool nd_ledger_checked(const nd_ledger *l) {
        return l && !l->unchecked;
}

static void pending_clear(struct pending_audit *p) {
        free(p->actor);
        free(p->action);
        free(p->object);
        free(p->detail);
}

int nd_ledger_check_step(nd_ledger *l, unsigned step) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL, *chk = NULL;
        int r, rc;

        if (!l)
                return -EINVAL;
        /* One table (with its indexes) a step, in name order, so that other queries on this
         * connection run between the steps. */
        r = prepare(l, "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name LIMIT 1 OFFSET ?1", &st);
        if (r < 0)
                return r;
        sqlite3_bind_int64(st, 1, step);
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return 0;
        if (rc != SQLITE_ROW)
                return sql_error(l, rc, "the integrity check: listing the tables");
        char *sql = sqlite3_mprintf("PRAGMA quick_check(%Q)", (const char *) sqlite3_column_text(st, 0));
        if (!sql)
                return set_error(l, -ENOMEM, "out of memory");
        rc = sqlite3_prepare_v2(l->db, sql, -1, &chk, NULL);
        sqlite3_free(sql);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(chk);
        if (rc != SQLITE_ROW)
                return set_error(l, errno_from_sqlite(l->db, rc), "the database is corrupt (%s)", sqlite3_errmsg(l->db));
        const char *res = (const char *) sqlite3_column_text(chk, 0);
        if (!res || !STREQ(res, "ok"))
                return set_error(l, -EBADMSG, "the database is corrupt (quick_check of table %s: %s)",
                                 (const char *) sqlite3_column_text(st, 0), strempty(res));
        return 1;
}

int nd_ledger_mark_checked(nd_ledger *l) {
        int r = 0;
        size_t i;

        if (!l)
                return -EINVAL;
        l->unchecked = false;
        for (i = 0; r >= 0 && i < l->n_pending; i++) {
                struct pending_audit *p = &l->pending[i];
                r = nd_ledger_audit(l, p->time_us, p->uid, p->pid, p->actor, p->action, p->object, p->detail);
        }
        for (size_t j = 0; j < l->n_pending; j++)
                pending_clear(&l->pending[j]);
        free(l->pending);
        l->pending = NULL;
        l->n_pending = 0;
        return r < 0 ? r : (int) i;
}

size_t nd_ledger_drop_pending_audit(nd_ledger *l, nd_ledger_pending_audit_fn fn, void *userdata) {
        size_t n = l ? l->n_pending : 0;
        for (size_t i = 0; i < n; i++) {
                struct pending_audit *p = &l->pending[i];
                if (fn)
                        fn(p->time_us, p->uid, p->pid, p->actor, p->action, p->object, p->detail, userdata);
                pending_clear(p);
        }
        if (l) {
                free(l->pending);
                l->pending = NULL;
                l->n_pending = 0;
        }
        return n;
}

nd_ledger *nd_ledger_close(nd_ledger *l) {
        if (!l)
                return NULL;
        (void) nd_ledger_drop_pending_audit(l, NULL, NULL);
        if (l->db)
                sqlite3_close_v2(l->db);
        free(l->path);
        free(l);
        return NULL;
}

int nd_ledger_open_reader(const char *db_path, nd_ledger **ret, char **error) {
        _cleanup_(nd_ledger_closep) nd_ledger *l = NULL;
        int64_t app_id = 0, version = 0;
        int r, rc = SQLITE_OK;

        if (!ret)
                return -EINVAL;
        *ret = NULL;
        if (error)
                *error = NULL;
        if (!db_path || !*db_path)
                return -EINVAL;
        l = calloc(1, sizeof *l);
        if (!l)
                return -ENOMEM;
        l->synchronous = -1;
        l->path = strdup(db_path);
        if (!l->path)
                return -ENOMEM;
        /* READONLY: this connection can never write, whatever a bug asks of it. In WAL mode it
         * still maps the -shm index the writer keeps, so it sees every committed transaction. */
        rc = sqlite3_open_v2(l->path, &l->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOFOLLOW | SQLITE_OPEN_EXRESCODE,
                             NULL);
        if (rc != SQLITE_OK)
                r = sql_error(l, rc, "cannot open the ledger for reading");
        else {
                sqlite3_busy_timeout(l->db, LEDGER_BUSY_TIMEOUT_MS);
                (void) sqlite3_exec(l->db, LEDGER_CACHE_PRAGMA, NULL, NULL, NULL);
                r = exec(l, "PRAGMA trusted_schema=OFF; PRAGMA query_only=ON", "configuring the reader");
        }
        if (r >= 0 && (pragma_int(l->db, "PRAGMA application_id", &app_id, &rc) < 0 ||
                       pragma_int(l->db, "PRAGMA user_version", &version, &rc) < 0))
                r = sql_error(l, rc, "reading the schema version");
        if (r >= 0 && (app_id != ND_LEDGER_APPLICATION_ID || version != ND_LEDGER_SCHEMA_VERSION))
                r = set_error(l, -EBADMSG, "not a needled ledger of schema %d (application id 0x%08" PRIx64
                              ", version %" PRId64 ")", ND_LEDGER_SCHEMA_VERSION, (uint64_t) app_id, version);
        if (r < 0) {
                if (error)
                        *error = strdup(l->error);
                return r;
        }
        l->error[0] = '\0';
        *ret = TAKE_PTR(l);
        return 0;
}

void nd_ledger_interrupt(nd_ledger *l) {
        if (l && l->db)
                sqlite3_interrupt(l->db);
}

const char *nd_ledger_path(const nd_ledger *l) {
        return l ? l->path : NULL;
}

const char *nd_ledger_last_error(const nd_ledger *l) {
        return l ? l->error : "";
}

int nd_ledger_set_max_pages(nd_ledger *l, uint32_t pages) {
        char sql[64];
        if (!l)
                return -EINVAL;
        /* SQLite's compiled-in maximum applies for 0. */
        snprintf(sql, sizeof sql, "PRAGMA max_page_count=%" PRIu32, pages ? pages : UINT32_MAX - 1);
        return exec(l, sql, "setting the page cap");
}

int nd_ledger_set_bulk_load(nd_ledger *l, bool on) {
        if (!l)
                return -EINVAL;
        l->bulk_load = on;
        l->synchronous = -1;
        return 0;
}

int nd_ledger_session_id_new(char out[static ND_LEDGER_SESSION_ID_SIZE]) {
        sd_id128_t id;
        int r = sd_id128_randomize(&id); /* getrandom(2); sets the version 4 and variant bits */
        if (r < 0)
                return r;
        sd_id128_to_uuid_string(id, out);
        return 0;
}

/* ---- the audit trail ---- */

/* The sequence number the next entry gets and the hash it chains to (the last entry's, as stored). */
static int audit_next(nd_ledger *l, int64_t *ret_seq, char prev[static ND_SHA256_HEX_SIZE]) {
        _cleanup_stmt_ sqlite3_stmt *last = NULL;
        int r = prepare(l, "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &last);
        if (r < 0)
                return r;
        int rc = sqlite3_step(last);
        if (rc == SQLITE_ROW) {
                if (sqlite3_column_type(last, 0) != SQLITE_INTEGER || !hash_blob_hex(last, 1, prev))
                        return set_error(l, -EBADMSG, "the last audit entry is malformed");
                *ret_seq = sqlite3_column_int64(last, 0) + 1;
        } else if (rc == SQLITE_DONE) {
                memcpy(prev, zero_hash, ND_SHA256_HEX_SIZE);
                *ret_seq = 1;
        } else
                return sql_error(l, rc, "reading the audit trail");
        return 0;
}

/* Appends entry seq (from audit_next) chained to prev, and moves the head to it. The hash is of
 * detail, the text; stub (DETAIL_STUB_SIZE bytes, or NULL) is what is stored instead of a session
 * entry's detail that verification rebuilds from the row. */
static int audit_insert_tx(nd_ledger *l, int64_t seq, const char *prev, uint64_t time_us, uint32_t uid, uint32_t pid,
                           const char *actor, const char *action, const char *object, const char *detail,
                           const uint8_t *stub) {
        _cleanup_stmt_ sqlite3_stmt *ins = NULL, *head = NULL;
        char hash[ND_SHA256_HEX_SIZE];
        uint8_t hash_bytes[HASH_SIZE];
        int r;

        r = audit_entry_hash(seq, (int64_t) time_us, uid, pid, actor, action, object, detail, prev, hash);
        if (r < 0)
                return set_error(l, r, "hashing an audit entry: out of memory");
        (void) hex_to_bytes(hash, HASH_SIZE, hash_bytes);

        r = prepare(l, "INSERT INTO audit (seq, time_us, uid, pid, actor, action, object, detail, hash) "
                       "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)", &ins);
        if (r < 0)
                return r;
        sqlite3_bind_int64(ins, 1, seq);
        sqlite3_bind_int64(ins, 2, (int64_t) time_us);
        sqlite3_bind_int64(ins, 3, uid);
        sqlite3_bind_int64(ins, 4, pid);
        bind_text(ins, 5, actor);
        bind_text(ins, 6, action);
        bind_text(ins, 7, object);
        if (stub)
                sqlite3_bind_blob(ins, 8, stub, DETAIL_STUB_SIZE, SQLITE_STATIC);
        else
                bind_text(ins, 8, detail);
        sqlite3_bind_blob(ins, 9, hash_bytes, HASH_SIZE, SQLITE_STATIC);
        r = step_done(l, ins, "appending to the audit trail");
        if (r < 0)
                return r;

        r = prepare(l, "UPDATE audit_head SET count = ?1, head_hash = ?2 WHERE id = 1", &head);
        if (r < 0)
                return r;
        sqlite3_bind_int64(head, 1, seq);
        bind_text(head, 2, hash);
        r = step_done(l, head, "updating the audit head");
        if (r < 0)
                return r;
        if (sqlite3_changes(l->db) != 1)
                return set_error(l, -EBADMSG, "the audit head record is missing");
        return 0;
}

static int audit_append_tx(nd_ledger *l, uint64_t time_us, uint32_t uid, uint32_t pid, const char *actor,
                           const char *action, const char *object, const char *detail) {
        char prev[ND_SHA256_HEX_SIZE];
        int64_t seq;
        int r = audit_next(l, &seq, prev);
        if (r < 0)
                return r;
        return audit_insert_tx(l, seq, prev, time_us, uid, pid, actor, action, object, detail, NULL);
}

/* Appends the begin (ended false) or end entry of session id, entry seq (audit_next), its detail
 * rebuilt from the row as it now is. */
static int audit_session_tx(nd_ledger *l, const char *id, bool ended, int64_t seq, const char *prev, uint64_t time_us,
                            uint32_t uid, uint32_t pid, const char *actor) {
        _cleanup_stmt_ sqlite3_stmt *row = NULL;
        _cleanup_(enc_done) enc e = { 0 };
        _cleanup_free_ char *detail = NULL;
        char digest[ND_SHA256_HEX_SIZE];
        uint8_t stub[DETAIL_STUB_SIZE];
        int r = prepare(l, ROW_SQL_V3, &row);
        if (r < 0)
                return r;
        bind_text(row, 1, id);
        int rc = sqlite3_step(row);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? set_error(l, -ENOENT, "no session %s", id)
                                         : sql_error(l, rc, "reading the session back");
        if (row_digest(row, ended, &e, digest) < 0 || session_detail(row, ended, digest, &detail) < 0)
                return set_error(l, -ENOMEM, "out of memory");
        (void) hex_to_bytes(digest, DETAIL_STUB_SIZE, stub);
        return audit_insert_tx(l, seq, prev, time_us, uid, pid, actor, ended ? AUDIT_ACTION_END : AUDIT_ACTION_BEGIN, id,
                               detail, stub);
}

static int check_audit_fields(nd_ledger *l, const char *actor, const char *action, const char *object,
                              const char *detail) {
        int r;
        if ((r = check_text(l, "audit actor", actor, ND_LEDGER_AUDIT_TEXT_MAX, false)) < 0 ||
            (r = check_text(l, "audit action", action, ND_LEDGER_AUDIT_TEXT_MAX, false)) < 0 ||
            (r = check_text(l, "audit object", object, ND_LEDGER_AUDIT_TEXT_MAX, true)) < 0 ||
            (r = check_text(l, "audit detail", detail, ND_LEDGER_AUDIT_TEXT_MAX, true)) < 0)
                return r;
        return 0;
}

int nd_ledger_audit(nd_ledger *l, uint64_t time_us, uint32_t uid, uint32_t pid, const char *actor,
                    const char *action, const char *object, const char *detail) {
        int r;

        if (!l)
                return -EINVAL;
        if (!time_ok(time_us))
                return set_error(l, -EINVAL, "audit time out of range");
        r = check_audit_fields(l, actor, action, object, detail);
        if (r < 0)
                return r;
        if (l->unchecked) {
                /* Nothing is written to a file not yet known to be intact: the entry waits, in
                 * order, for nd_ledger_mark_checked(). */
                if (l->n_pending >= ND_LEDGER_PENDING_AUDIT_MAX)
                        return set_error(l, -EAGAIN, "the integrity check has not finished and %u audit entries "
                                         "already wait for it", ND_LEDGER_PENDING_AUDIT_MAX);
                struct pending_audit *a = realloc(l->pending, (l->n_pending + 1) * sizeof *a);
                if (!a)
                        return set_error(l, -ENOMEM, "out of memory");
                l->pending = a;
                a = &a[l->n_pending];
                *a = (struct pending_audit) { .time_us = time_us, .uid = uid, .pid = pid, .actor = strdup(actor),
                                              .action = strdup(action), .object = strdup(object),
                                              .detail = strdup(detail) };
                if (!a->actor || !a->action || !a->object || !a->detail) {
                        pending_clear(a);
                        return set_error(l, -ENOMEM, "out of memory");
                }
                l->n_pending++;
                return 0;
        }
        r = tx_begin(l, LEDGER_SYNC_FULL);
        if (r < 0)
                return r;
        r = audit_append_tx(l, time_us, uid, pid, actor, action, object, detail);
        if (r < 0) {
                tx_rollback(l);
                return r;
        }
        return tx_commit(l);
}

int nd_ledger_audit_head(nd_ledger *l, uint64_t *ret_seq, char ret_hash[static ND_SHA256_HEX_SIZE]) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r, rc;

        if (!l || !ret_seq)
                return -EINVAL;
        r = prepare(l, "SELECT count, head_hash FROM audit_head WHERE id = 1", &st);
        if (r < 0)
                return r;
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return set_error(l, -EBADMSG, "the audit head record is missing");
        if (rc != SQLITE_ROW)
                return sql_error(l, rc, "reading the audit head");
        const char *h = (const char *) sqlite3_column_text(st, 1);
        if (!h || strlen(h) != HASH_HEX_LEN)
                return set_error(l, -EBADMSG, "the audit head record is malformed");
        *ret_seq = (uint64_t) sqlite3_column_int64(st, 0);
        memcpy(ret_hash, h, ND_SHA256_HEX_SIZE);
        return 0;
}

/* ---- sessions ---- */

static int check_start(nd_ledger *l, const nd_ledger_session_start *s) {
        int r;
        if (!s)
                return set_error(l, -EINVAL, "no session");
        if ((r = check_session_id(l, s->id)) < 0)
                return r;
        if ((r = check_text(l, "pen serial", s->pen_serial, ND_LEDGER_NAME_MAX, false)) < 0 ||
            (r = check_text(l, "cartridge id", s->cartridge_id, ND_LEDGER_NAME_MAX, false)) < 0 ||
            (r = check_text(l, "profile name", s->profile_name, ND_LEDGER_NAME_MAX, false)) < 0 ||
            (r = check_text(l, "profile snapshot", s->profile_yaml, ND_LEDGER_PROFILE_MAX, false)) < 0 ||
            (r = check_text(l, "profile digest", s->profile_digest, ND_LEDGER_NAME_MAX, false)) < 0 ||
            (r = check_text(l, "limits digest", s->limits_digest, ND_LEDGER_NAME_MAX, false)) < 0 ||
            (r = check_text(l, "label", s->label, ND_LEDGER_NAME_MAX, true)) < 0 ||
            (r = check_text(l, "owner bus name", s->owner_name, ND_LEDGER_NAME_MAX, false)) < 0)
                return r;
        if (s->needles == 0)
                return set_error(l, -EINVAL, "cartridge %s: needle count 0", s->cartridge_id);
        if (!time_ok(s->start_us))
                return set_error(l, -EINVAL, "start time out of range");
        return 0;
}

/* May this cartridge run now? -ESTALE with the reason when not. */
static int cartridge_admit_tx(nd_ledger *l, const nd_ledger_session_start *s) {
        _cleanup_stmt_ sqlite3_stmt *cart = NULL, *use = NULL;
        int r, rc;

        r = prepare(l, "SELECT needles, state FROM cartridges WHERE id = ?1", &cart);
        if (r < 0)
                return r;
        bind_text(cart, 1, s->cartridge_id);
        rc = sqlite3_step(cart);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
                return sql_error(l, rc, "reading the cartridge");

        /* The session rows are checked as well as the state: they are tied to the audit chain,
         * so a hand-edited state alone cannot make a used cartridge fresh again. */
        r = prepare(l, "SELECT count(*), coalesce(sum(duration_s), 0), "
                       "  (SELECT id FROM sessions WHERE cartridge_id = ?1 AND end_us IS NULL LIMIT 1) "
                       "FROM sessions WHERE cartridge_id = ?1", &use);
        if (r < 0)
                return r;
        bind_text(use, 1, s->cartridge_id);
        int rc2 = sqlite3_step(use);
        if (rc2 != SQLITE_ROW)
                return sql_error(l, rc2, "reading the cartridge's sessions");
        int64_t uses = sqlite3_column_int64(use, 0);
        double runtime_s = sqlite3_column_double(use, 1);
        const char *running = (const char *) sqlite3_column_text(use, 2);

        if (running)
                return set_error(l, -ESTALE, "cartridge %s is in use by session %s", s->cartridge_id, running);
        if (rc == SQLITE_ROW) {
                const char *state = (const char *) sqlite3_column_text(cart, 1);
                int64_t needles = sqlite3_column_int64(cart, 0);
                if (state && STREQ(state, "spent"))
                        return set_error(l, -ESTALE, "cartridge %s is spent (single use)", s->cartridge_id);
                if (needles != s->needles)
                        return set_error(l, -ESTALE,
                                         "cartridge %s was recorded with %" PRId64 " needles and now reports %" PRIu32,
                                         s->cartridge_id, needles, s->needles);
        }
        if (s->single_use && uses > 0)
                return set_error(l, -ESTALE, "cartridge %s has already run (single use)", s->cartridge_id);
        if (s->cartridge_max_runtime_s > 0 && runtime_s >= s->cartridge_max_runtime_s)
                return set_error(l, -ESTALE, "cartridge %s has reached its %" PRIu32 " s runtime", s->cartridge_id,
                                 s->cartridge_max_runtime_s);
        return 0;
}

/* Prepares sql with the session's snapshot bound: ?1 profile name, ?2 YAML, ?3 profile digest, ?4 limits digest. */
static int prepare_snapshot(nd_ledger *l, const char *sql, const nd_ledger_session_start *s, sqlite3_stmt **ret) {
        int r = prepare(l, sql, ret);
        if (r < 0)
                return r;
        bind_text(*ret, 1, s->profile_name);
        bind_text(*ret, 2, s->profile_yaml);
        bind_text(*ret, 3, s->profile_digest);
        bind_text(*ret, 4, s->limits_digest);
        return 0;
}

static int session_begin_tx(nd_ledger *l, const nd_ledger_session_start *s) {
        _cleanup_stmt_ sqlite3_stmt *cart = NULL, *snap = NULL, *ins = NULL;
        char prev[ND_SHA256_HEX_SIZE];
        int64_t seq;
        int r, rc;

        r = cartridge_admit_tx(l, s);
        if (r < 0)
                return r;

        r = prepare(l, "INSERT INTO cartridges (id, needles, first_used_us, state) VALUES (?1, ?2, ?3, 'in-use') "
                       "ON CONFLICT (id) DO UPDATE SET state = 'in-use'", &cart);
        if (r < 0)
                return r;
        bind_text(cart, 1, s->cartridge_id);
        sqlite3_bind_int64(cart, 2, s->needles);
        sqlite3_bind_int64(cart, 3, (int64_t) s->start_us);
        r = step_done(l, cart, "recording the cartridge");
        if (r < 0)
                return r;

        /* The snapshot (profile and limits digests) is stored once however many sessions armed it. */
        r = prepare_snapshot(l, "INSERT INTO snapshots (profile_name, profile_yaml, profile_digest, limits_digest) "
                                "VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING", s, &snap);
        if (r < 0)
                return r;
        r = step_done(l, snap, "recording the profile snapshot");
        if (r < 0)
                return r;
        sqlite3_finalize(TAKE_PTR(snap));
        r = prepare_snapshot(l, "SELECT snapshot_id FROM snapshots WHERE profile_digest = ?3 AND limits_digest = ?4 AND "
                                "profile_name = ?1 AND profile_yaml = ?2", s, &snap);
        if (r < 0)
                return r;
        rc = sqlite3_step(snap);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? set_error(l, -EIO, "the profile snapshot just recorded is missing")
                                         : sql_error(l, rc, "reading the profile snapshot");
        int64_t snapshot_id = sqlite3_column_int64(snap, 0);

        r = audit_next(l, &seq, prev);
        if (r < 0)
                return r;
        r = prepare(l, "INSERT INTO sessions (id, pen_serial, cartridge_id, needles, snapshot_id, label, owner_uid, "
                       "  owner_pid, owner_name, single_use, max_runtime_s, start_us, updated_us, skin_type, area_cm2, "
                       "  punctures, density_per_cm2, begin_seq) "
                       "VALUES (?1, ?2, ?3, ?4, ?5, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?15, ?16, ?17, 0, 0, ?18)", &ins);
        if (r < 0)
                return r;
        bind_text(ins, 1, s->id);
        bind_text(ins, 2, s->pen_serial);
        bind_text(ins, 3, s->cartridge_id);
        sqlite3_bind_int64(ins, 4, s->needles);
        sqlite3_bind_int64(ins, 5, snapshot_id);
        bind_text(ins, 9, s->label);
        sqlite3_bind_int64(ins, 10, s->owner_uid);
        sqlite3_bind_int64(ins, 11, s->owner_pid);
        bind_text(ins, 12, s->owner_name);
        sqlite3_bind_int(ins, 13, s->single_use);
        sqlite3_bind_int64(ins, 14, s->cartridge_max_runtime_s);
        sqlite3_bind_int64(ins, 15, (int64_t) s->start_us);
        bind_text(ins, 16, strempty(s->skin_type));
        sqlite3_bind_double(ins, 17, s->area_cm2);
        sqlite3_bind_int64(ins, 18, seq);
        r = step_done(l, ins, "recording the session");
        if (r == -EEXIST)
                return set_error(l, r, "session %s already exists", s->id);
        if (r < 0)
                return r;

        return audit_session_tx(l, s->id, false, seq, prev, s->start_us, s->owner_uid, s->owner_pid, s->owner_name);
}

int nd_ledger_session_begin(nd_ledger *l, const nd_ledger_session_start *s) {
        if (l && l->unchecked)
                return refuse_unchecked(l);
        int r;

        if (!l)
                return -EINVAL;
        r = check_start(l, s);
        if (r < 0)
                return r;
        r = tx_begin(l, LEDGER_SYNC_FULL);
        if (r < 0)
                return r;
        r = session_begin_tx(l, s);
        if (r < 0) {
                tx_rollback(l);
                return r;
        }
        return tx_commit(l);
}

/* Tells a missing session from an ended one after an UPDATE ... WHERE end_us IS NULL changed nothing. */
static int session_not_running(nd_ledger *l, const char *id) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r = prepare(l, "SELECT end_reason FROM sessions WHERE id = ?1", &st);
        if (r < 0)
                return r;
        bind_text(st, 1, id);
        int rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return set_error(l, -ENOENT, "no session %s", id);
        if (rc != SQLITE_ROW)
                return sql_error(l, rc, "reading the session");
        return set_error(l, -EALREADY, "session %s has already ended (%s)", id,
                         strempty((const char *) sqlite3_column_text(st, 0)));
}

static void bind_stats(sqlite3_stmt *st, int first, const nd_ledger_stats *s) {
        sqlite3_bind_double(st, first, s->duration_s);
        sqlite3_bind_int64(st, first + 1, (int64_t) s->strokes);
        sqlite3_bind_double(st, first + 2, s->max_depth_mm);
        sqlite3_bind_double(st, first + 3, s->max_speed_hz);
        sqlite3_bind_double(st, first + 4, s->max_temperature_c);
        sqlite3_bind_double(st, first + 5, s->max_current_ma);
}

/* The dose figures go in ?10 and ?11 of the statements that use STATS_ASSIGNMENTS. */
#define DOSE_ASSIGNMENTS "punctures = ?10, density_per_cm2 = ?11"
static void bind_dose(sqlite3_stmt *st, const nd_ledger_stats *s) {
        sqlite3_bind_int64(st, 10, (int64_t) s->punctures);
        sqlite3_bind_double(st, 11, s->density_per_cm2);
}

/* Maxima never go down, whatever a caller passes. */
#define STATS_ASSIGNMENTS \
        "duration_s = ?1, strokes = ?2, max_depth_mm = max(max_depth_mm, ?3), " \
        "max_speed_hz = max(max_speed_hz, ?4), max_temperature_c = max(max_temperature_c, ?5), " \
        "max_current_ma = max(max_current_ma, ?6)"

int nd_ledger_session_progress(nd_ledger *l, const char *id, uint64_t now_us, const nd_ledger_stats *stats) {
        if (l && l->unchecked)
                return refuse_unchecked(l);
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r;

        if (!l)
                return -EINVAL;
        if ((r = check_session_id(l, id)) < 0 || (r = check_stats(l, stats)) < 0)
                return r;
        if (!time_ok(now_us))
                return set_error(l, -EINVAL, "time out of range");
        /* One statement is its own transaction. NORMAL: in WAL mode the commit is not fsync'ed; the
         * next synced commit (or checkpoint) makes it durable. A power cut can lose the last few
         * seconds of figures, never the session itself (written with FULL by session_begin). */
        r = set_synchronous(l, LEDGER_SYNC_NORMAL);
        if (r < 0)
                return r;
        r = prepare(l, "UPDATE sessions SET " STATS_ASSIGNMENTS ", " DOSE_ASSIGNMENTS ", updated_us = ?7 WHERE id = ?8 AND end_us IS NULL",
                    &st);
        if (r < 0)
                return r;
        bind_stats(st, 1, stats);
        bind_dose(st, stats);
        sqlite3_bind_int64(st, 7, (int64_t) now_us);
        bind_text(st, 8, id);
        r = step_done(l, st, "updating the session");
        if (r < 0)
                return r;
        if (sqlite3_changes(l->db) == 0)
                return session_not_running(l, id);
        return 0;
}

/* Ends a running session inside a transaction. end_us 0: at its last update (recovery).
 * force_spent: the cartridge is spent whatever the limits say (recovery: it ran for an unknown time). */
static int session_close_tx(nd_ledger *l, const char *id, uint64_t end_us, const nd_ledger_stats *stats,
                            const char *reason, bool force_spent, uint64_t audit_time_us) {
        _cleanup_stmt_ sqlite3_stmt *upd = NULL, *info = NULL, *spend = NULL;
        char prev[ND_SHA256_HEX_SIZE];
        int64_t seq;
        int r, rc = SQLITE_OK;

        r = audit_next(l, &seq, prev);
        if (r < 0)
                return r;
        if (stats)
                r = prepare(l, "UPDATE sessions SET " STATS_ASSIGNMENTS ", " DOSE_ASSIGNMENTS ", end_us = ?7, updated_us = ?7, "
                               "end_reason = ?9, end_seq = ?12 WHERE id = ?8 AND end_us IS NULL", &upd);
        else
                r = prepare(l, "UPDATE sessions SET end_us = CASE WHEN ?7 = 0 THEN updated_us ELSE ?7 END, "
                               "updated_us = CASE WHEN ?7 = 0 THEN updated_us ELSE ?7 END, "
                               "end_reason = ?9, end_seq = ?12 WHERE id = ?8 AND end_us IS NULL", &upd);
        if (r < 0)
                return r;
        if (stats) {
                bind_stats(upd, 1, stats);
                bind_dose(upd, stats);
        }
        sqlite3_bind_int64(upd, 7, (int64_t) end_us);
        bind_text(upd, 8, id);
        bind_text(upd, 9, reason);
        sqlite3_bind_int64(upd, 12, seq);
        r = step_done(l, upd, "ending the session");
        if (r < 0)
                return r;
        if (sqlite3_changes(l->db) == 0)
                return session_not_running(l, id);

        r = prepare(l, "SELECT s.cartridge_id, s.single_use, s.max_runtime_s, "
                       "  (SELECT coalesce(sum(duration_s), 0) FROM sessions WHERE cartridge_id = s.cartridge_id) "
                       "FROM sessions s WHERE s.id = ?1", &info);
        if (r < 0)
                return r;
        bind_text(info, 1, id);
        rc = sqlite3_step(info);
        if (rc != SQLITE_ROW)
                return sql_error(l, rc, "reading the ended session");
        const char *cartridge = (const char *) sqlite3_column_text(info, 0);
        bool single_use = sqlite3_column_int(info, 1) != 0;
        int64_t max_runtime_s = sqlite3_column_int64(info, 2);
        double runtime_s = sqlite3_column_double(info, 3);

        if (force_spent || single_use || (max_runtime_s > 0 && runtime_s >= (double) max_runtime_s)) {
                r = prepare(l, "UPDATE cartridges SET state = 'spent' WHERE id = ?1", &spend);
                if (r < 0)
                        return r;
                bind_text(spend, 1, cartridge);
                r = step_done(l, spend, "spending the cartridge");
                if (r < 0)
                        return r;
        }
        /* The detail (digest, reason, pen, cartridge, figures as integers: the text must not depend
         * on the locale of whoever wrote it) is rebuilt from the row. */
        return audit_session_tx(l, id, true, seq, prev, audit_time_us, (uint32_t) geteuid(), (uint32_t) getpid(),
                                ND_LEDGER_ACTOR_DAEMON);
}

int nd_ledger_session_end(nd_ledger *l, const char *id, uint64_t end_us, const nd_ledger_stats *stats,
                          const char *reason) {
        if (l && l->unchecked)
                return refuse_unchecked(l);
        int r;

        if (!l)
                return -EINVAL;
        if ((r = check_session_id(l, id)) < 0 || (r = check_reason(l, reason)) < 0 ||
            (stats && (r = check_stats(l, stats)) < 0))
                return r;
        if (end_us == 0 || !time_ok(end_us))
                return set_error(l, -EINVAL, "end time out of range");
        r = tx_begin(l, LEDGER_SYNC_FULL);
        if (r < 0)
                return r;
        r = session_close_tx(l, id, end_us, stats, reason, false, end_us);
        if (r < 0) {
                tx_rollback(l);
                return r;
        }
        return tx_commit(l);
}

/* Before session id's row is deleted (a void): its begin digest into digest, and its begin entry
 * (the row's begin_seq) given back its full detail if it keeps a stub, the text session_detail()
 * rebuilds, which is what the entry's hash covers. Refused (-EBADMSG) if the entry is not there
 * or does not record this row: a void would otherwise hide a changed row. */
static int begin_entry_keep_tx(nd_ledger *l, const char *id, char digest[static ND_SHA256_HEX_SIZE]) {
        _cleanup_stmt_ sqlite3_stmt *row = NULL, *entry = NULL, *upd = NULL;
        _cleanup_(enc_done) enc e = { 0 };
        _cleanup_free_ char *detail = NULL;
        int r = prepare(l, ROW_SQL_V3, &row);
        if (r < 0)
                return r;
        bind_text(row, 1, id);
        int rc = sqlite3_step(row);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? set_error(l, -EBADMSG, "session %s has no profile snapshot", id)
                                         : sql_error(l, rc, "reading the session");
        if (row_digest(row, false, &e, digest) < 0 || session_detail(row, false, digest, &detail) < 0)
                return set_error(l, -ENOMEM, "out of memory");
        if (sqlite3_column_type(row, ROW_BEGIN_SEQ) != SQLITE_INTEGER)
                return set_error(l, -EBADMSG, "session %s names no begin entry: not voided (needlectl audit verify)", id);
        int64_t seq = sqlite3_column_int64(row, ROW_BEGIN_SEQ);

        r = prepare(l, "SELECT detail FROM audit WHERE seq = ?1 AND action = ?2 AND object = ?3", &entry);
        if (r < 0)
                return r;
        sqlite3_bind_int64(entry, 1, seq);
        bind_text(entry, 2, AUDIT_ACTION_BEGIN);
        bind_text(entry, 3, id);
        rc = sqlite3_step(entry);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? set_error(l, -EBADMSG, "the begin entry %" PRId64 " of session %s is missing: "
                                                     "not voided (needlectl audit verify)", seq, id)
                                         : sql_error(l, rc, "reading the audit trail");
        bool recorded, stubbed = sqlite3_column_type(entry, 0) == SQLITE_BLOB;
        if (stubbed) {
                uint8_t stub[DETAIL_STUB_SIZE];
                (void) hex_to_bytes(digest, DETAIL_STUB_SIZE, stub);
                recorded = sqlite3_column_bytes(entry, 0) == DETAIL_STUB_SIZE &&
                           memcmp(sqlite3_column_blob(entry, 0), stub, DETAIL_STUB_SIZE) == 0;
        } else {
                const char *text = (const char *) sqlite3_column_text(entry, 0);
                recorded = text && strncmp(text, ROW_DIGEST_PREFIX, strlen(ROW_DIGEST_PREFIX)) == 0 &&
                           strncmp(text + strlen(ROW_DIGEST_PREFIX), digest, HASH_HEX_LEN) == 0;
        }
        if (!recorded)
                return set_error(l, -EBADMSG, "session %s differs from its begin entry %" PRId64 ": not voided "
                                 "(needlectl audit verify)", id, seq);
        if (!stubbed)
                return 0;       /* a text kept as it was written (a migrated entry) */

        r = prepare(l, "UPDATE audit SET detail = ?1 WHERE seq = ?2", &upd);
        if (r < 0)
                return r;
        bind_text(upd, 1, detail);
        sqlite3_bind_int64(upd, 2, seq);
        return step_done(l, upd, "keeping the begin entry's detail");
}

/* Voids a session that never ran, inside a transaction (nd_ledger_session_void). */
static int session_void_tx(nd_ledger *l, const char *id, uint64_t void_us, const char *why) {
        _cleanup_stmt_ sqlite3_stmt *row = NULL, *del = NULL, *cart = NULL, *fix = NULL;
        _cleanup_free_ char *pen = NULL, *cartridge = NULL, *detail = NULL;
        char digest[ND_SHA256_HEX_SIZE];
        int r, rc = SQLITE_OK;

        r = prepare(l, "SELECT pen_serial, cartridge_id, start_us, end_us IS NOT NULL, strokes, duration_s "
                       "FROM sessions WHERE id = ?1", &row);
        if (r < 0)
                return r;
        bind_text(row, 1, id);
        rc = sqlite3_step(row);
        if (rc == SQLITE_DONE)
                return set_error(l, -ENOENT, "no session %s", id);
        if (rc != SQLITE_ROW)
                return sql_error(l, rc, "reading the session");
        if (sqlite3_column_int(row, 3) != 0)
                return set_error(l, -EALREADY, "session %s has ended: it cannot be voided", id);
        if (sqlite3_column_int64(row, 4) != 0 || sqlite3_column_double(row, 5) != 0.0)
                return set_error(l, -EBUSY, "session %s has run (%" PRId64 " strokes, %.3f s): it cannot be voided", id,
                                 (int64_t) sqlite3_column_int64(row, 4), sqlite3_column_double(row, 5));
        pen = strdup(strempty((const char *) sqlite3_column_text(row, 0)));
        cartridge = strdup(strempty((const char *) sqlite3_column_text(row, 1)));
        int64_t start_us = sqlite3_column_int64(row, 2);
        if (!pen || !cartridge)
                return set_error(l, -ENOMEM, "out of memory");

        /* The row as it was begun: the void entry repeats its begin digest, which ties the two. The
         * begin entry's detail, stored as a stub rebuilt from the row, is stored in full before the
         * row goes (the same text: its hash stays valid). */
        r = begin_entry_keep_tx(l, id, digest);
        if (r < 0)
                return r;

        r = prepare(l, "DELETE FROM sessions WHERE id = ?1", &del);
        if (r < 0)
                return r;
        bind_text(del, 1, id);
        r = step_done(l, del, "removing the voided session");
        if (r < 0)
                return r;

        /* The cartridge as it was before the begin: with no other session, a row this begin created
         * (first use = its start) goes, a row known before becomes fresh again; with others, it
         * stays in-use (session_begin refuses a spent one, so it was in-use). */
        r = prepare(l, "SELECT c.first_used_us, (SELECT count(*) FROM sessions WHERE cartridge_id = c.id) "
                       "FROM cartridges c WHERE c.id = ?1", &cart);
        if (r < 0)
                return r;
        bind_text(cart, 1, cartridge);
        rc = sqlite3_step(cart);
        if (rc != SQLITE_ROW)
                return rc == SQLITE_DONE ? set_error(l, -EBADMSG, "cartridge %s of session %s is missing", cartridge, id)
                                         : sql_error(l, rc, "reading the cartridge");
        const char *left;
        if (sqlite3_column_int64(cart, 1) > 0)
                left = "in-use";
        else {
                bool created = sqlite3_column_int64(cart, 0) == start_us;
                left = "fresh";
                r = prepare(l, created ? "DELETE FROM cartridges WHERE id = ?1"
                                       : "UPDATE cartridges SET state = 'fresh' WHERE id = ?1", &fix);
                if (r < 0)
                        return r;
                bind_text(fix, 1, cartridge);
                r = step_done(l, fix, "restoring the cartridge");
                if (r < 0)
                        return r;
        }

        if (asprintf(&detail, ROW_DIGEST_PREFIX "%s pen=%s cartridge=%s cartridge-state=%s why=%s", digest, pen,
                     cartridge, left, why) < 0) {
                detail = NULL;
                return set_error(l, -ENOMEM, "out of memory");
        }
        r = check_audit_fields(l, ND_LEDGER_ACTOR_DAEMON, AUDIT_ACTION_VOID, id, detail);
        if (r < 0)
                return r;
        return audit_append_tx(l, void_us, (uint32_t) geteuid(), (uint32_t) getpid(), ND_LEDGER_ACTOR_DAEMON,
                               AUDIT_ACTION_VOID, id, detail);
}

int nd_ledger_session_void(nd_ledger *l, const char *id, uint64_t void_us, const char *why) {
        if (l && l->unchecked)
                return refuse_unchecked(l);
        int r;

        if (!l)
                return -EINVAL;
        if ((r = check_session_id(l, id)) < 0 ||
            (r = check_text(l, "why", why, ND_LEDGER_AUDIT_TEXT_MAX / 2, false)) < 0)
                return r;
        if (void_us == 0 || !time_ok(void_us))
                return set_error(l, -EINVAL, "void time out of range");
        r = tx_begin(l, LEDGER_SYNC_FULL);
        if (r < 0)
                return r;
        r = session_void_tx(l, id, void_us, why);
        if (r < 0) {
                tx_rollback(l);
                return r;
        }
        return tx_commit(l);
}

static void strv_free_n(char **v, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

int nd_ledger_recover(nd_ledger *l, uint64_t now_us) {
        if (l && l->unchecked)
                return refuse_unchecked(l);
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        char **ids = NULL;
        size_t n = 0;
        int r, rc = SQLITE_DONE;

        if (!l)
                return -EINVAL;
        if (!time_ok(now_us))
                return set_error(l, -EINVAL, "time out of range");
        r = tx_begin(l, LEDGER_SYNC_FULL);
        if (r < 0)
                return r;
        r = prepare(l, "SELECT id FROM sessions WHERE end_us IS NULL ORDER BY start_us, rowid", &st);
        while (r >= 0 && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *id = (const char *) sqlite3_column_text(st, 0);
                char **a = realloc(ids, (n + 1) * sizeof *ids);
                if (!a || !(a[n] = strdup(strempty(id)))) {
                        if (a)
                                ids = a;
                        r = set_error(l, -ENOMEM, "out of memory");
                        break;
                }
                ids = a;
                n++;
        }
        if (r >= 0 && rc != SQLITE_DONE)
                r = sql_error(l, rc, "listing running sessions");
        sqlite3_finalize(TAKE_PTR(st));
        for (size_t i = 0; r >= 0 && i < n; i++)
                r = session_close_tx(l, ids[i], 0, NULL, ND_LEDGER_REASON_DAEMON_RESTART, true, now_us);
        strv_free_n(ids, n);
        if (r < 0) {
                tx_rollback(l);
                return r;
        }
        r = tx_commit(l);
        if (r < 0)
                return r;
        return (int) MIN(n, (size_t) INT32_MAX);
}

/* ---- reading ---- */

#define SESSION_COLUMNS \
        "id, pen_serial, cartridge_id, needles, profile_name, profile_digest, limits_digest, label, " \
        "owner_uid, owner_pid, owner_name, start_us, coalesce(end_us, 0), updated_us, duration_s, strokes, " \
        "max_depth_mm, max_speed_hz, max_temperature_c, max_current_ma, coalesce(end_reason, ''), single_use, " \
        "max_runtime_s, coalesce(skin_type, ''), coalesce(area_cm2, 0), coalesce(punctures, 0), " \
        "coalesce(density_per_cm2, 0)"

static int dup_col(sqlite3_stmt *st, int col, char **ret) {
        const char *t = (const char *) sqlite3_column_text(st, col);
        *ret = strdup(t ? t : "");
        return *ret ? 0 : -ENOMEM;
}

/* Fills *s from a row of SESSION_COLUMNS (+ profile_yaml at column 27 when with_yaml). */
static int session_from_row(sqlite3_stmt *st, bool with_yaml, nd_ledger_session *s) {
        const char *id = (const char *) sqlite3_column_text(st, 0);
        int r = 0;

        *s = (nd_ledger_session) { 0 };
        snprintf(s->id, sizeof s->id, "%s", strempty(id));
        if (dup_col(st, 1, &s->pen_serial) < 0 || dup_col(st, 2, &s->cartridge_id) < 0 ||
            dup_col(st, 4, &s->profile_name) < 0 || dup_col(st, 5, &s->profile_digest) < 0 ||
            dup_col(st, 6, &s->limits_digest) < 0 || dup_col(st, 7, &s->label) < 0 ||
            dup_col(st, 10, &s->owner_name) < 0 || dup_col(st, 20, &s->reason) < 0 ||
            dup_col(st, 23, &s->skin_type) < 0 || (with_yaml && dup_col(st, 27, &s->profile_yaml) < 0))
                r = -ENOMEM;
        s->needles = (uint32_t) sqlite3_column_int64(st, 3);
        s->owner_uid = (uint32_t) sqlite3_column_int64(st, 8);
        s->owner_pid = (uint32_t) sqlite3_column_int64(st, 9);
        s->start_us = (uint64_t) sqlite3_column_int64(st, 11);
        s->end_us = (uint64_t) sqlite3_column_int64(st, 12);
        s->updated_us = (uint64_t) sqlite3_column_int64(st, 13);
        s->stats.duration_s = sqlite3_column_double(st, 14);
        s->stats.strokes = (uint64_t) sqlite3_column_int64(st, 15);
        s->stats.max_depth_mm = sqlite3_column_double(st, 16);
        s->stats.max_speed_hz = sqlite3_column_double(st, 17);
        s->stats.max_temperature_c = sqlite3_column_double(st, 18);
        s->stats.max_current_ma = sqlite3_column_double(st, 19);
        s->single_use = sqlite3_column_int(st, 21) != 0;
        s->cartridge_max_runtime_s = (uint32_t) sqlite3_column_int64(st, 22);
        s->area_cm2 = sqlite3_column_double(st, 24);
        s->stats.punctures = (uint64_t) sqlite3_column_int64(st, 25);
        s->stats.density_per_cm2 = sqlite3_column_double(st, 26);
        if (r < 0)
                nd_ledger_session_clear(s);
        return r;
}

void nd_ledger_session_clear(nd_ledger_session *s) {
        if (!s)
                return;
        free(s->pen_serial);
        free(s->cartridge_id);
        free(s->profile_name);
        free(s->profile_yaml);
        free(s->profile_digest);
        free(s->limits_digest);
        free(s->skin_type);
        free(s->label);
        free(s->owner_name);
        free(s->reason);
        *s = (nd_ledger_session) { 0 };
}

void nd_ledger_session_array_free(nd_ledger_session *a, size_t n) {
        for (size_t i = 0; a && i < n; i++)
                nd_ledger_session_clear(&a[i]);
        free(a);
}

int nd_ledger_session_get(nd_ledger *l, const char *id, nd_ledger_session *ret) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r;

        if (!l || !ret)
                return -EINVAL;
        if ((r = check_session_id(l, id)) < 0)
                return r;
        r = prepare(l, "SELECT " SESSION_COLUMNS ", profile_yaml" SNAPSHOT_JOIN "WHERE id = ?1", &st);
        if (r < 0)
                return r;
        bind_text(st, 1, id);
        int rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return set_error(l, -ENOENT, "no session %s", id);
        if (rc != SQLITE_ROW)
                return sql_error(l, rc, "reading the session");
        r = session_from_row(st, true, ret);
        return r < 0 ? set_error(l, r, "out of memory") : 0;
}

/* One statement per filter shape, so that each is answered from an index (sessions_by_pen or
 * sessions_by_start, scanned backwards; rowid breaks ties in the same index order): an OR of
 * "no filter" and "this pen" in one statement makes SQLite walk every row by start time. */
#define HISTORY_SQL_ALL \
        "SELECT " SESSION_COLUMNS SNAPSHOT_JOIN "WHERE start_us >= ?2 AND start_us < ?3 " \
        "ORDER BY start_us DESC, sessions.rowid DESC LIMIT ?4"
#define HISTORY_SQL_PEN \
        "SELECT " SESSION_COLUMNS SNAPSHOT_JOIN "WHERE pen_serial = ?1 AND start_us >= ?2 AND start_us < ?3 " \
        "ORDER BY start_us DESC, sessions.rowid DESC LIMIT ?4"

#define CARTRIDGE_SQL \
        "SELECT c.needles, c.state, c.first_used_us, " \
        "  (SELECT coalesce(sum(duration_s), 0) FROM sessions WHERE cartridge_id = c.id), " \
        "  (SELECT count(*) FROM sessions WHERE cartridge_id = c.id) " \
        "FROM cartridges c WHERE c.id = ?1"

int nd_ledger_history_query(nd_ledger *l, const nd_ledger_history_filter *f, nd_ledger_session **ret,
                            size_t *ret_n) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        nd_ledger_session *a = NULL;
        size_t n = 0;
        uint32_t limit;
        uint64_t since_us, before_us;
        int r, rc = SQLITE_DONE;

        if (!l || !f || !ret || !ret_n)
                return -EINVAL;
        if (f->pen_serial && (r = check_text(l, "pen serial", f->pen_serial, ND_LEDGER_NAME_MAX, false)) < 0)
                return r;
        limit = f->limit == 0 || f->limit > ND_LEDGER_HISTORY_LIMIT_MAX ? ND_LEDGER_HISTORY_LIMIT_MAX : f->limit;
        since_us = MIN(f->since_us, (uint64_t) INT64_MAX);
        before_us = f->before_us == 0 ? (uint64_t) INT64_MAX : MIN(f->before_us, (uint64_t) INT64_MAX);

        r = prepare(l, f->pen_serial ? HISTORY_SQL_PEN : HISTORY_SQL_ALL, &st);
        if (r < 0)
                return r;
        if (f->pen_serial)
                bind_text(st, 1, f->pen_serial);
        sqlite3_bind_int64(st, 2, (int64_t) since_us);
        sqlite3_bind_int64(st, 3, (int64_t) before_us);
        sqlite3_bind_int64(st, 4, limit);

        a = calloc(limit, sizeof *a);
        if (!a)
                return set_error(l, -ENOMEM, "out of memory");
        while (n < limit && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                r = session_from_row(st, false, &a[n]);
                if (r < 0) {
                        nd_ledger_session_array_free(a, n);
                        return set_error(l, r, "out of memory");
                }
                n++;
        }
        if (n < limit && rc != SQLITE_DONE) {
                nd_ledger_session_array_free(a, n);
                return sql_error(l, rc, "reading the history");
        }
        *ret = a;
        *ret_n = n;
        return 0;
}

int nd_ledger_history(nd_ledger *l, const char *pen_serial, uint64_t since_us, uint32_t limit,
                      nd_ledger_session **ret, size_t *ret_n) {
        nd_ledger_history_filter f = { .pen_serial = pen_serial, .since_us = since_us, .limit = limit };
        return nd_ledger_history_query(l, &f, ret, ret_n);
}

int nd_ledger_query_plan(nd_ledger *l, nd_ledger_query q, char **ret) {
        static const char *const sql[] = {
                [ND_LEDGER_QUERY_HISTORY] = HISTORY_SQL_ALL,
                [ND_LEDGER_QUERY_HISTORY_PEN] = HISTORY_SQL_PEN,
                [ND_LEDGER_QUERY_CARTRIDGE] = CARTRIDGE_SQL,
        };
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        _cleanup_free_ char *plan = NULL;
        char *buf = NULL;
        size_t size = 0;
        int r, rc;

        if (!l || !ret || (unsigned) q >= ELEMENTSOF(sql))
                return -EINVAL;
        _cleanup_free_ char *explain = NULL;
        if (asprintf(&explain, "EXPLAIN QUERY PLAN %s", sql[q]) < 0)
                return -ENOMEM;
        r = prepare(l, explain, &st);
        if (r < 0)
                return r;
        FILE *f = open_memstream(&buf, &size);
        if (!f)
                return -ENOMEM;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
                fprintf(f, "%s\n", strempty((const char *) sqlite3_column_text(st, 3)));
        if (fclose(f) != 0) {
                free(buf);
                return -ENOMEM;
        }
        plan = buf;
        if (rc != SQLITE_DONE)
                return sql_error(l, rc, "explaining a query");
        *ret = TAKE_PTR(plan);
        return 0;
}

const char *nd_ledger_cartridge_state_to_string(nd_ledger_cartridge_state s) {
        switch (s) {
        case ND_LEDGER_CARTRIDGE_FRESH:
                return "fresh";
        case ND_LEDGER_CARTRIDGE_IN_USE:
                return "in-use";
        case ND_LEDGER_CARTRIDGE_SPENT:
                return "spent";
        }
        return "unknown";
}

int nd_ledger_cartridge_get(nd_ledger *l, const char *id, nd_ledger_cartridge *ret) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r;

        if (!l || !ret)
                return -EINVAL;
        if ((r = check_text(l, "cartridge id", id, ND_LEDGER_NAME_MAX, false)) < 0)
                return r;
        r = prepare(l, CARTRIDGE_SQL, &st);
        if (r < 0)
                return r;
        bind_text(st, 1, id);
        int rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return set_error(l, -ENOENT, "cartridge %s has never been used", id);
        if (rc != SQLITE_ROW)
                return sql_error(l, rc, "reading the cartridge");

        const char *state = (const char *) sqlite3_column_text(st, 1);
        *ret = (nd_ledger_cartridge) { 0 };
        snprintf(ret->id, sizeof ret->id, "%s", id);
        ret->needles = (uint32_t) sqlite3_column_int64(st, 0);
        if (state && STREQ(state, "fresh"))
                ret->state = ND_LEDGER_CARTRIDGE_FRESH;
        else if (state && STREQ(state, "in-use"))
                ret->state = ND_LEDGER_CARTRIDGE_IN_USE;
        else
                ret->state = ND_LEDGER_CARTRIDGE_SPENT; /* anything unexpected fails closed */
        ret->first_used_us = (uint64_t) sqlite3_column_int64(st, 2);
        ret->runtime_s = sqlite3_column_double(st, 3);
        ret->sessions = (uint64_t) sqlite3_column_int64(st, 4);
        return 0;
}

/* ---- verification (read-only, standalone) ---- */

const char *nd_ledger_break_to_string(nd_ledger_break b) {
        switch (b) {
        case ND_LEDGER_INTACT:
                return "intact";
        case ND_LEDGER_BREAK_HASH:
                return "hash-mismatch";
        case ND_LEDGER_BREAK_PREV:
                return "chain-broken";
        case ND_LEDGER_BREAK_SEQ:
                return "sequence-gap";
        case ND_LEDGER_BREAK_HEAD:
                return "head-mismatch";
        case ND_LEDGER_BREAK_RECORD:
                return "record-mismatch";
        case ND_LEDGER_BREAK_MALFORMED:
                return "malformed";
        case ND_LEDGER_BREAK_ANCHOR:
                return "anchor-mismatch";
        }
        return "unknown";
}

_printf_(4, 5)
static int verify_break(nd_ledger_verify_result *v, nd_ledger_break b, uint64_t seq, const char *fmt, ...) {
        va_list ap;
        v->broken = b;
        v->broken_seq = seq;
        va_start(ap, fmt);
        vsnprintf(v->message, sizeof v->message, fmt, ap);
        va_end(ap);
        return 0;
}

_printf_(3, 4)
static int verify_fail(nd_ledger_verify_result *v, int r, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(v->message, sizeof v->message, fmt, ap);
        va_end(ap);
        return r;
}

static int verify_sql_fail(nd_ledger_verify_result *v, sqlite3 *db, int rc, const char *path, const char *what) {
        /* Our statements are fixed: a plain SQL error means a table or column of a ledger whose
         * version we know is gone or altered, which is tampering, not an unreadable file. */
        if (rc == SQLITE_ERROR)
                return verify_break(v, ND_LEDGER_BREAK_MALFORMED, 0, "%s: the schema was altered (%s)", what,
                                    sqlite3_errmsg(db));
        return verify_fail(v, errno_from_sqlite(db, rc), "%s: %s: %s", path, what, sqlite3_errmsg(db));
}

static bool is_hash_text(sqlite3_stmt *st, int col) {
        if (sqlite3_column_type(st, col) != SQLITE_TEXT || sqlite3_column_bytes(st, col) != HASH_HEX_LEN)
                return false;
        const char *h = (const char *) sqlite3_column_text(st, col);
        return h && strspn(h, "0123456789abcdef") == HASH_HEX_LEN;
}

/* An entry's recomputed hash against its stored hash, its stored prev_hash (NULL when it is not
 * stored: schema 3) against the previous entry's hash, and the anchor. True when one of them
 * failed (v says which). */
static bool verify_entry_links(nd_ledger_verify_result *v, uint64_t seq, const char *hash, const char *stored,
                               const char *stored_prev, const char *prev, uint64_t anchor_seq, const char *anchor_hash) {
        if (!STREQ(hash, stored))
                verify_break(v, ND_LEDGER_BREAK_HASH, seq,
                             "entry %" PRIu64 " was changed after it was written%s: its content does not match its hash",
                             seq, stored_prev ? "" : " (or an entry before it was replaced, its hash recomputed)");
        else if (stored_prev && !STREQ(prev, stored_prev))
                verify_break(v, ND_LEDGER_BREAK_PREV, seq,
                             "entry %" PRIu64 " does not follow entry %" PRIu64 " (prev_hash differs): "
                             "an entry was replaced, removed or inserted before it", seq, seq - 1);
        else if (anchor_seq == seq && !STREQ(hash, anchor_hash))
                verify_break(v, ND_LEDGER_BREAK_ANCHOR, seq,
                             "entry %" PRIu64 " is not the entry recorded earlier (its hash is "
                             "%.12s..., the anchor says %.12s...): the trail was rewritten", seq, hash, anchor_hash);
        else
                return false;
        return true;
}

/* Entry seq hashed to hash and is good: it is the head so far, and the next entry's predecessor. */
static void verify_entry_good(nd_ledger_verify_result *v, uint64_t seq, const char *hash,
                              char prev[static ND_SHA256_HEX_SIZE]) {
        memcpy(prev, hash, ND_SHA256_HEX_SIZE);
        v->entries = seq;
        v->head_seq = seq;
        memcpy(v->head_hash, hash, ND_SHA256_HEX_SIZE);
}

/* Entry seq where entry expected should be. */
static int verify_seq_break(nd_ledger_verify_result *v, int64_t seq, uint64_t expected) {
        if (seq > (int64_t) expected)
                return verify_break(v, ND_LEDGER_BREAK_SEQ, (uint64_t) seq,
                                    "entry %" PRId64 " follows entry %" PRIu64 ": entries %" PRIu64
                                    "..%" PRId64 " are missing (deleted or renumbered)",
                                    seq, expected - 1, expected, seq - 1);
        return verify_break(v, ND_LEDGER_BREAK_SEQ, expected,
                            "entry number %" PRId64 " where %" PRIu64 " was expected (renumbered)", seq, expected);
}

/* After the walk: the anchor within the trail, the head record on its last entry (prev). */
static int verify_tail(sqlite3 *db, const char *path, uint64_t anchor_seq, const char *prev, nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *head = NULL;
        int rc;

        if (anchor_seq > v->entries)
                return verify_break(v, ND_LEDGER_BREAK_ANCHOR, anchor_seq,
                                    "the trail ends at entry %" PRIu64 ", but entry %" PRIu64 " was recorded "
                                    "earlier: entries were removed from its end", v->entries, anchor_seq);

        rc = sqlite3_prepare_v2(db, "SELECT count, head_hash FROM audit_head WHERE id = 1", -1, &head, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the audit head");
        rc = sqlite3_step(head);
        if (rc == SQLITE_DONE)
                return verify_break(v, ND_LEDGER_BREAK_HEAD, 0, "the audit head record is missing");
        if (rc != SQLITE_ROW)
                return verify_sql_fail(v, db, rc, path, "reading the audit head");
        if (sqlite3_column_type(head, 0) != SQLITE_INTEGER || !is_hash_text(head, 1))
                return verify_break(v, ND_LEDGER_BREAK_HEAD, 0, "the audit head record is malformed");
        int64_t count = sqlite3_column_int64(head, 0);
        const char *head_hash = (const char *) sqlite3_column_text(head, 1);
        if (count != (int64_t) v->entries || !STREQ(head_hash, prev))
                return verify_break(v, ND_LEDGER_BREAK_HEAD, v->entries + 1,
                                    "the head record says the trail has %" PRId64 " entries ending in %.12s..., "
                                    "but it has %" PRIu64 " ending in %.12s...: entries were removed from its end "
                                    "(or the head record was changed)",
                                    count, head_hash, v->entries, prev);
        return 0;
}


/* The walk's last step (rc): SQLITE_DONE, then the tail. */
static int verify_walk_end(sqlite3 *db, const char *path, int rc, uint64_t anchor_seq, const char *prev,
                           nd_ledger_verify_result *v) {
        if (rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        return verify_tail(db, path, anchor_seq, prev, v);
}

/* Walks the chain from the genesis entry. Returns <0 on read errors, 0 otherwise (v says how). */
/* from_anchor: start at entry anchor_seq instead of the first; that entry's own prev_hash is taken
 * as it is, since the anchor (its hash, kept outside the database) covers it. */
static int verify_chain(sqlite3 *db, const char *path, uint64_t anchor_seq, const char *anchor_hash,
                        bool from_anchor, nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        char prev[ND_SHA256_HEX_SIZE], hash[ND_SHA256_HEX_SIZE];
        uint64_t expected = from_anchor ? anchor_seq : 1;
        int rc;

        memcpy(prev, zero_hash, sizeof prev);
        rc = sqlite3_prepare_v2(db, "SELECT seq, time_us, uid, pid, actor, action, object, detail, prev_hash, hash "
                                    "FROM audit WHERE seq >= ?1 ORDER BY seq", -1, &st, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        sqlite3_bind_int64(st, 1, (int64_t) expected);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                if (from_anchor && expected == anchor_seq && is_hash_text(st, 8))
                        memcpy(prev, sqlite3_column_text(st, 8), sizeof prev);
                if (sqlite3_column_type(st, 0) != SQLITE_INTEGER || !is_hash_text(st, 8) || !is_hash_text(st, 9))
                        return verify_break(v, ND_LEDGER_BREAK_MALFORMED, expected,
                                            "entry %" PRIu64 ": its sequence number or hashes are not of the "
                                            "expected type (changed by hand)", expected);
                int64_t seq = sqlite3_column_int64(st, 0);
                if (seq != (int64_t) expected)
                        return verify_seq_break(v, seq, expected);

                _cleanup_(enc_done) enc e = { 0 };
                enc_bytes(&e, AUDIT_HASH_TAG, strlen(AUDIT_HASH_TAG));
                for (int i = 0; i <= 8; i++)
                        enc_column(&e, st, i);
                if (enc_digest(&e, hash) < 0)
                        return verify_fail(v, -ENOMEM, "out of memory");
                if (verify_entry_links(v, expected, hash, (const char *) sqlite3_column_text(st, 9),
                                       (const char *) sqlite3_column_text(st, 8), prev, anchor_seq, anchor_hash))
                        return 0;
                verify_entry_good(v, expected++, hash, prev);
        }
        return verify_walk_end(db, path, rc, anchor_seq, prev, v);
}

/* A cartridge whose session spent it must stay spent; a session needs its cartridge. */
static int verify_cartridges(sqlite3 *db, const char *path, nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *cart = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "SELECT s.cartridge_id, s.id, coalesce(c.state, '') FROM sessions s "
                                    "LEFT JOIN cartridges c ON c.id = s.cartridge_id "
                                    "WHERE c.id IS NULL OR (c.state != 'spent' AND s.end_us IS NOT NULL "
                                    "  AND (s.single_use = 1 OR s.end_reason = ?1)) LIMIT 1", -1, &cart, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the cartridges");
        bind_text(cart, 1, ND_LEDGER_REASON_DAEMON_RESTART);
        rc = sqlite3_step(cart);
        if (rc == SQLITE_ROW) {
                const char *state = (const char *) sqlite3_column_text(cart, 2);
                return verify_break(v, ND_LEDGER_BREAK_RECORD, 0,
                                    *strempty(state) ? "cartridge %s is marked '%s' but session %s spent it (changed by hand)"
                                                     : "cartridge %s%s of session %s is missing (deleted)",
                                    strempty((const char *) sqlite3_column_text(cart, 0)), strempty(state),
                                    strempty((const char *) sqlite3_column_text(cart, 1)));
        }
        if (rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the cartridges");
        return 0;
}

/* One audit entry of this action for this session whose row digest matches. */
/* The statements verify_session_entry() runs for every session, prepared once. */
typedef struct verify_stmts {
        sqlite3_stmt *entry;
        sqlite3_stmt *row[2];           /* [ended] */
} verify_stmts;

static void verify_stmts_done(verify_stmts *vs) {
        sqlite3_finalize(vs->entry);
        sqlite3_finalize(vs->row[0]);
        sqlite3_finalize(vs->row[1]);
}

static int verify_session_entry(sqlite3 *db, const char *path, const char *id, bool ended, bool expect,
                                int64_t schema, verify_stmts *vs, nd_ledger_verify_result *v) {
        char digest[ND_SHA256_HEX_SIZE];
        const char *action = ended ? AUDIT_ACTION_END : AUDIT_ACTION_BEGIN;
        int rc = SQLITE_OK;
        if (!vs->entry)
                rc = sqlite3_prepare_v2(db, "SELECT seq, detail FROM audit WHERE object = ?1 AND action = ?2", -1,
                                        &vs->entry, NULL);
        else
                sqlite3_reset(vs->entry);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        sqlite3_stmt *st = vs->entry;
        bind_text(st, 1, id);
        bind_text(st, 2, action);
        rc = sqlite3_step(st);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        if (!expect) {
                if (rc == SQLITE_ROW)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, (uint64_t) sqlite3_column_int64(st, 0),
                                            "session %s is recorded as running, but entry %" PRId64
                                            " ended it (its end was removed)", id, (int64_t) sqlite3_column_int64(st, 0));
                return 0;
        }
        if (rc == SQLITE_DONE)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, 0,
                                    "session %s has no '%s' audit entry: the row was inserted or changed by hand",
                                    id, action);
        uint64_t seq = (uint64_t) sqlite3_column_int64(st, 0);
        const char *detail = (const char *) sqlite3_column_text(st, 1);

        int crc = SQLITE_OK;
        int r = session_row_digest_cached(db, id, ended, schema, digest, &crc, &vs->row[ended]);
        if (r == -EIO)
                return verify_sql_fail(v, db, crc, path, "reading a session");
        if (r < 0)
                return verify_fail(v, r, "%s: hashing session %s: %s", path, id, strerror(-r));
        if (!detail || strncmp(detail, ROW_DIGEST_PREFIX, strlen(ROW_DIGEST_PREFIX)) != 0 ||
            strncmp(detail + strlen(ROW_DIGEST_PREFIX), digest, HASH_HEX_LEN) != 0)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq,
                                    "session %s differs from what audit entry %" PRIu64 " recorded at its %s "
                                    "(the row was changed)", id, seq, ended ? "end" : "start");
        if (sqlite3_step(st) == SQLITE_ROW)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, (uint64_t) sqlite3_column_int64(st, 0),
                                    "session %s has a second '%s' entry", id, action);
        return 0;
}

/* Every "session-void" entry from from_seq on: its session's row is gone, an earlier
 * "session-begin" entry began that session with the same row digest, nothing ended it, and it is
 * voided once. */
static int verify_voids(sqlite3 *db, const char *path, uint64_t from_seq, nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int rc = sqlite3_prepare_v2(db,
                "SELECT a.seq, a.object, a.detail, "
                "  (SELECT min(b.seq) FROM audit b WHERE b.object = a.object AND b.action = ?2), "
                "  (SELECT b.detail FROM audit b WHERE b.object = a.object AND b.action = ?2 ORDER BY b.seq LIMIT 1), "
                "  EXISTS (SELECT 1 FROM sessions s WHERE s.id = a.object), "
                "  (SELECT count(*) FROM audit c WHERE c.object = a.object AND c.action IN (?1, ?2)), "
                "  (SELECT min(e.seq) FROM audit e WHERE e.object = a.object AND e.action = ?3) "
                "FROM audit a WHERE a.action = ?1 AND a.seq >= ?4 ORDER BY a.seq", -1, &st, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        bind_text(st, 1, AUDIT_ACTION_VOID);
        bind_text(st, 2, AUDIT_ACTION_BEGIN);
        bind_text(st, 3, AUDIT_ACTION_END);
        sqlite3_bind_int64(st, 4, (int64_t) from_seq);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                uint64_t seq = (uint64_t) sqlite3_column_int64(st, 0);
                const char *id = strempty((const char *) sqlite3_column_text(st, 1));
                const char *detail = (const char *) sqlite3_column_text(st, 2);
                const char *begun = (const char *) sqlite3_column_text(st, 4);
                size_t prefix = strlen(ROW_DIGEST_PREFIX);
                if (sqlite3_column_type(st, 3) == SQLITE_NULL || (uint64_t) sqlite3_column_int64(st, 3) >= seq)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, seq,
                                            "entry %" PRIu64 " voids session %s, which no earlier entry began", seq, id);
                if (!detail || !begun || strncmp(detail, ROW_DIGEST_PREFIX, prefix) != 0 ||
                    strncmp(begun, ROW_DIGEST_PREFIX, prefix) != 0 ||
                    strncmp(detail + prefix, begun + prefix, HASH_HEX_LEN) != 0 || strlen(detail) < prefix + HASH_HEX_LEN)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, seq,
                                            "entry %" PRIu64 " voids session %s as other than entry %" PRId64 " began it",
                                            seq, id, (int64_t) sqlite3_column_int64(st, 3));
                if (sqlite3_column_int(st, 5) != 0)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, seq,
                                            "session %s was voided by entry %" PRIu64 ", but its row is there "
                                            "(written back by hand)", id, seq);
                if (sqlite3_column_int64(st, 6) != 2)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, seq,
                                            "session %s has more than one begin or void entry", id);
                if (sqlite3_column_type(st, 7) != SQLITE_NULL)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, (uint64_t) sqlite3_column_int64(st, 7),
                                            "session %s was voided by entry %" PRIu64 " and ended by entry %" PRId64,
                                            id, seq, (int64_t) sqlite3_column_int64(st, 7));
        }
        if (rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        return 0;
}

/* The session and cartridge rows against the (verified) trail. */
static int verify_records(sqlite3 *db, const char *path, int64_t schema, nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL, *orphan = NULL;
        _cleanup_(verify_stmts_done) verify_stmts vs = { NULL, { NULL, NULL } };
        int r, rc;

        rc = sqlite3_prepare_v2(db, "SELECT id, end_us IS NOT NULL FROM sessions ORDER BY rowid", -1, &st, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the sessions");
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *id = (const char *) sqlite3_column_text(st, 0);
                bool ended = sqlite3_column_int(st, 1) != 0;
                if (!id)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, 0, "a session without an id");
                r = verify_session_entry(db, path, id, false, true, schema, &vs, v);
                if (r < 0 || v->broken)
                        return r;
                r = verify_session_entry(db, path, id, true, ended, schema, &vs, v);
                if (r < 0 || v->broken)
                        return r;
                v->sessions++;
        }
        if (rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the sessions");

        r = verify_voids(db, path, 0, v);
        if (r < 0 || v->broken)
                return r;
        /* A session entry needs its row, except the begin of a session voided since (checked above). */
        rc = sqlite3_prepare_v2(db, "SELECT a.seq, a.object FROM audit a WHERE a.action IN (?1, ?2) "
                                    "AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = a.object) "
                                    "AND NOT (a.action = ?1 AND EXISTS (SELECT 1 FROM audit x "
                                    "  WHERE x.object = a.object AND x.action = ?3)) "
                                    "ORDER BY a.seq LIMIT 1", -1, &orphan, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        bind_text(orphan, 1, AUDIT_ACTION_BEGIN);
        bind_text(orphan, 2, AUDIT_ACTION_END);
        bind_text(orphan, 3, AUDIT_ACTION_VOID);
        rc = sqlite3_step(orphan);
        if (rc == SQLITE_ROW)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, (uint64_t) sqlite3_column_int64(orphan, 0),
                                    "session %s of audit entry %" PRId64 " is missing: it was deleted",
                                    strempty((const char *) sqlite3_column_text(orphan, 1)),
                                    (int64_t) sqlite3_column_int64(orphan, 0));
        if (rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");

        return verify_cartridges(db, path, v);
}

/* ---- verification of schema 3 ---- */

/* What the walk of a schema-3 trail counted, for the check of the sessions against it. */
/* A session-begin entry whose row is gone, waiting for the session-void entry that explains it. */
typedef struct verify3_open {
        char *id;
        uint64_t seq;
        char digest[ND_SHA256_HEX_SIZE];
} verify3_open;

typedef struct verify3 {
        sqlite3_stmt *row;              /* ROW_SQL_V3, prepared once */
        sqlite3_stmt *exists;           /* is a session's row there */
        sqlite3_stmt *begun;            /* a begin entry before the walk (incremental) */
        enc e;                          /* reused for every entry and row */
        uint64_t begins, ends;          /* session entries seen, each matched to its row */
        uint64_t first_seq;             /* the first entry the walk checks */
        verify3_open *open;             /* begins without a row, not yet voided (few: a void follows its begin) */
        size_t n_open;
        verify3_open *voided;           /* sessions begun before the walk and voided in it */
        size_t n_voided;
} verify3;

static void verify3_done(verify3 *w) {
        sqlite3_finalize(w->row);
        sqlite3_finalize(w->exists);
        sqlite3_finalize(w->begun);
        enc_done(&w->e);
        for (size_t i = 0; i < w->n_open; i++)
                free(w->open[i].id);
        free(w->open);
        for (size_t i = 0; i < w->n_voided; i++)
                free(w->voided[i].id);
        free(w->voided);
}

static int verify3_add(verify3_open **a, size_t *n, uint64_t seq, const char *id, const char *digest,
                       nd_ledger_verify_result *v) {
        verify3_open *m = reallocarray(*a, *n + 1, sizeof *m);
        if (!m)
                return verify_fail(v, -ENOMEM, "out of memory");
        *a = m;
        m = &m[*n];
        *m = (verify3_open) { .id = strdup(id), .seq = seq };
        if (!m->id)
                return verify_fail(v, -ENOMEM, "out of memory");
        memcpy(m->digest, digest, ND_SHA256_HEX_SIZE);
        (*n)++;
        return 0;
}

/* The 64 hex digits after "row-sha256=" at the start of detail into out; false if there are none. */
static bool detail_row_digest(const char *detail, char out[static ND_SHA256_HEX_SIZE]) {
        size_t prefix = strlen(ROW_DIGEST_PREFIX);
        if (!detail || strncmp(detail, ROW_DIGEST_PREFIX, prefix) != 0 || strnlen(detail + prefix, HASH_HEX_LEN) != HASH_HEX_LEN)
                return false;
        memcpy(out, detail + prefix, HASH_HEX_LEN);
        out[HASH_HEX_LEN] = '\0';
        return true;
}

/* A session entry (seq, action, object: the session id) against the session's row: the row is
 * there and names this entry as its begin or end, and its digest is the one the entry recorded
 * (a stub of it, for a derived detail; the row-sha256 of a text one). With a derived detail,
 * *ret_detail gets the text the entry's hash covers (caller frees). */
static int verify3_session_entry(sqlite3 *db, const char *path, verify3 *w, uint64_t seq, bool ended, const char *id,
                                 sqlite3_stmt *entry, int detail_col, char **ret_detail, bool *ret_missing,
                                 nd_ledger_verify_result *v) {
        char digest[ND_SHA256_HEX_SIZE], stub[2 * DETAIL_STUB_SIZE + 1];
        const char *action = ended ? AUDIT_ACTION_END : AUDIT_ACTION_BEGIN;
        int rc = SQLITE_OK;

        if (!w->row)
                rc = sqlite3_prepare_v2(db, ROW_SQL_V3, -1, &w->row, NULL);
        else
                sqlite3_reset(w->row);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the sessions");
        bind_text(w->row, 1, id);
        rc = sqlite3_step(w->row);
        if (rc == SQLITE_DONE && ret_missing) {
                *ret_missing = true;
                return 0;
        }
        if (rc == SQLITE_DONE)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "session %s of audit entry %" PRIu64
                                    " is missing: it was deleted", id, seq);
        if (rc != SQLITE_ROW)
                return verify_sql_fail(v, db, rc, path, "reading a session");
        if (ended && sqlite3_column_type(w->row, ROW_END_US) == SQLITE_NULL)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "session %s is recorded as running, but entry %"
                                    PRIu64 " ended it (its end was removed)", id, seq);
        int col = ended ? ROW_END_SEQ : ROW_BEGIN_SEQ;
        if (sqlite3_column_type(w->row, col) != SQLITE_INTEGER || (uint64_t) sqlite3_column_int64(w->row, col) != seq)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "session %s does not name entry %" PRIu64
                                    " as its '%s' entry: a second such entry, or the row changed by hand", id, seq, action);
        if (row_digest(w->row, ended, &w->e, digest) < 0)
                return verify_fail(v, -ENOMEM, "out of memory");
        bool match;
        if (sqlite3_column_type(entry, detail_col) == SQLITE_BLOB) {
                bytes_to_hex(sqlite3_column_blob(entry, detail_col), DETAIL_STUB_SIZE, stub);
                match = strncmp(stub, digest, 2 * DETAIL_STUB_SIZE) == 0;
        } else {
                const char *detail = (const char *) sqlite3_column_text(entry, detail_col);
                match = detail && strncmp(detail, ROW_DIGEST_PREFIX, strlen(ROW_DIGEST_PREFIX)) == 0 &&
                        strncmp(detail + strlen(ROW_DIGEST_PREFIX), digest, HASH_HEX_LEN) == 0;
        }
        if (!match)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq,
                                    "session %s differs from what audit entry %" PRIu64 " recorded at its %s "
                                    "(the row was changed)", id, seq, ended ? "end" : "start");
        if (ret_detail && session_detail(w->row, ended, digest, ret_detail) < 0)
                return verify_fail(v, -ENOMEM, "out of memory");
        if (ended)
                w->ends++;
        else
                w->begins++;
        return 0;
}

/* A session-begin entry seq (text detail) whose session's row is gone: it stays open until a
 * session-void entry of that session closes it (verify3_void); one left open is a deleted row. */
static int verify3_begin_open(verify3 *w, uint64_t seq, const char *id, const char *detail, nd_ledger_verify_result *v) {
        char digest[ND_SHA256_HEX_SIZE];
        if (!detail_row_digest(detail, digest))
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "session %s of audit entry %" PRIu64
                                    " is missing: it was deleted", id, seq);
        return verify3_add(&w->open, &w->n_open, seq, id, digest, v);
}

/* A session-void entry seq (its hash already checked): the session's row is gone, and it voids a
 * session an earlier begin entry began with the same row digest, not voided before. That begin is
 * one left open by the walk, or (incremental) one before the walk's first entry. A session ended
 * as well has failed already: its end entry's row is gone. */
static int verify3_void(sqlite3 *db, const char *path, verify3 *w, uint64_t seq, const char *id, const char *detail,
                        nd_ledger_verify_result *v) {
        char digest[ND_SHA256_HEX_SIZE];
        int rc = SQLITE_OK;

        if (!w->exists)
                rc = sqlite3_prepare_v2(db, "SELECT 1 FROM sessions WHERE id = ?1", -1, &w->exists, NULL);
        else
                sqlite3_reset(w->exists);
        if (rc == SQLITE_OK)
                rc = bind_text(w->exists, 1, id);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(w->exists);
        if (rc == SQLITE_ROW)
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "session %s was voided by entry %" PRIu64
                                    ", but its row is there (written back by hand)", id, seq);
        if (rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the sessions");
        if (!detail_row_digest(detail, digest))
                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "entry %" PRIu64 " voids session %s without "
                                    "the digest it began with", seq, id);

        for (size_t i = 0; i < w->n_open; i++) {
                verify3_open *o = &w->open[i];
                if (!STREQ(o->id, id))
                        continue;
                if (!STREQ(o->digest, digest))
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "entry %" PRIu64 " voids session %s as "
                                            "other than entry %" PRIu64 " began it", seq, id, o->seq);
                free(o->id);
                *o = w->open[--w->n_open];
                return 0;
        }

        /* Not begun in the walk: incrementally, its begin may lie before the walk's first entry
         * (checked by the earlier verification); its latest such begin is the one voided. */
        if (w->first_seq > 1) {
                if (!w->begun)
                        rc = sqlite3_prepare_v2(db, "SELECT seq, detail FROM audit WHERE seq < ?1 AND action = ?2 AND "
                                                    "object = ?3 ORDER BY seq DESC LIMIT 1", -1, &w->begun, NULL);
                else
                        sqlite3_reset(w->begun);
                if (rc == SQLITE_OK) {
                        sqlite3_bind_int64(w->begun, 1, (int64_t) w->first_seq);
                        bind_text(w->begun, 2, AUDIT_ACTION_BEGIN);
                        bind_text(w->begun, 3, id);
                        rc = sqlite3_step(w->begun);
                }
                if (rc != SQLITE_ROW && rc != SQLITE_DONE)
                        return verify_sql_fail(v, db, rc, path, "reading the audit trail");
                if (rc == SQLITE_ROW) {
                        char began[ND_SHA256_HEX_SIZE];
                        const char *text = sqlite3_column_type(w->begun, 1) == SQLITE_TEXT
                                ? (const char *) sqlite3_column_text(w->begun, 1) : NULL;
                        if (!detail_row_digest(text, began) || !STREQ(began, digest))
                                return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "entry %" PRIu64 " voids session %s "
                                                    "as other than entry %" PRId64 " began it", seq, id,
                                                    (int64_t) sqlite3_column_int64(w->begun, 0));
                        for (size_t i = 0; i < w->n_voided; i++)
                                if (STREQ(w->voided[i].id, id))
                                        return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "session %s was voided by "
                                                            "entry %" PRIu64 " and again by entry %" PRIu64, id,
                                                            w->voided[i].seq, seq);
                        return verify3_add(&w->voided, &w->n_voided, seq, id, digest, v);
                }
        }
        return verify_break(v, ND_LEDGER_BREAK_RECORD, seq, "entry %" PRIu64 " voids session %s, which no earlier "
                            "entry began (or one voided before)", seq, id);
}

/* After a walk: a begin entry still open had its row deleted without a void. */
static int verify3_open_done(const verify3 *w, nd_ledger_verify_result *v) {
        if (w->n_open == 0)
                return 0;
        const verify3_open *first = &w->open[0];
        for (size_t i = 1; i < w->n_open; i++)
                if (w->open[i].seq < first->seq)
                        first = &w->open[i];
        return verify_break(v, ND_LEDGER_BREAK_RECORD, first->seq, "session %s of audit entry %" PRIu64
                            " is missing: it was deleted", first->id, first->seq);
}

/* Walks a schema-3 trail: each entry's hash over its canonical form (the same bytes as in schemas 1
 * and 2: prev_hash is the previous entry's stored hash, a derived detail the text rebuilt from the
 * session row), and each session entry against its row. from_anchor: from entry anchor_seq, the
 * entry before it taken as it is (what lies before the anchor is the earlier verification's). */
static int verify_chain3(sqlite3 *db, const char *path, uint64_t anchor_seq, const char *anchor_hash, bool from_anchor,
                         verify3 *w, nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        char prev[ND_SHA256_HEX_SIZE], hash[ND_SHA256_HEX_SIZE], stored[ND_SHA256_HEX_SIZE];
        uint64_t expected = from_anchor && anchor_seq > 1 ? anchor_seq - 1 : 1;
        bool skip_first = from_anchor && anchor_seq > 1;
        int r, rc;

        memcpy(prev, zero_hash, sizeof prev);
        w->first_seq = from_anchor && anchor_seq > 1 ? anchor_seq : 1;
        /* Column 9: a prev_hash kept by the migration because it was not the previous hash. */
        rc = sqlite3_prepare_v2(db, "SELECT a.seq, a.time_us, a.uid, a.pid, a.actor, a.action, a.object, a.detail, a.hash, "
                                    "p.seq IS NOT NULL, p.prev_hash "
                                    "FROM audit a LEFT JOIN audit_prev p ON p.seq = a.seq WHERE a.seq >= ?1 ORDER BY a.seq",
                                    -1, &st, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        sqlite3_bind_int64(st, 1, (int64_t) expected);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                _cleanup_free_ char *derived = NULL;
                bool own_prev = sqlite3_column_int(st, 9) != 0;
                if (sqlite3_column_type(st, 0) != SQLITE_INTEGER || !hash_blob_hex(st, 8, stored))
                        return verify_break(v, ND_LEDGER_BREAK_MALFORMED, expected,
                                            "entry %" PRIu64 ": its sequence number or hash is not of the "
                                            "expected type (changed by hand)", expected);
                int64_t seq = sqlite3_column_int64(st, 0);
                if (seq != (int64_t) expected)
                        return verify_seq_break(v, seq, expected);
                if (skip_first) {
                        /* The entry before the anchor: only its hash, to chain the anchor's entry to. */
                        skip_first = false;
                        memcpy(prev, stored, sizeof prev);
                        expected++;
                        continue;
                }

                const char *action = sqlite3_column_type(st, 5) == SQLITE_TEXT ? (const char *) sqlite3_column_text(st, 5) : NULL;
                bool begin = action && STREQ(action, AUDIT_ACTION_BEGIN), end = action && STREQ(action, AUDIT_ACTION_END);
                bool voids = action && STREQ(action, AUDIT_ACTION_VOID);
                bool stubbed = sqlite3_column_type(st, 7) == SQLITE_BLOB;
                if (stubbed && sqlite3_column_bytes(st, 7) != DETAIL_STUB_SIZE)
                        return verify_break(v, ND_LEDGER_BREAK_MALFORMED, expected,
                                            "entry %" PRIu64 ": its detail is neither text nor a session's digest "
                                            "(changed by hand)", expected);
                if (stubbed && (!(begin || end) || sqlite3_column_type(st, 6) != SQLITE_TEXT))
                        return verify_break(v, ND_LEDGER_BREAK_HASH, expected,
                                            "entry %" PRIu64 " was changed after it was written: its action or object "
                                            "no longer names the session whose record it is", expected);
                if (own_prev && !is_hash_text(st, 10))
                        return verify_break(v, ND_LEDGER_BREAK_MALFORMED, expected,
                                            "entry %" PRIu64 ": its previous hash is not of the expected type "
                                            "(changed by hand)", expected);
                /* A derived detail needs the row to be rebuilt: the row first (a changed row is a
                 * record-mismatch, a changed entry a hash-mismatch); a text one is hashed first. */
                const char *id = strempty((const char *) sqlite3_column_text(st, 6));
                if (stubbed) {
                        r = verify3_session_entry(db, path, w, expected, end, id, st, 7, &derived, NULL, v);
                        if (r < 0 || v->broken)
                                return r;
                }

                enc *e = &w->e;
                e->len = 0;
                enc_bytes(e, AUDIT_HASH_TAG, strlen(AUDIT_HASH_TAG));
                for (int i = 0; i <= 6; i++)
                        enc_column(e, st, i);
                if (derived)
                        enc_str(e, derived);
                else
                        enc_column(e, st, 7);
                if (own_prev)
                        enc_column(e, st, 10);
                else
                        enc_text(e, prev, HASH_HEX_LEN);
                if (enc_digest(e, hash) < 0)
                        return verify_fail(v, -ENOMEM, "out of memory");
                if (verify_entry_links(v, expected, hash, stored,
                                       own_prev ? (const char *) sqlite3_column_text(st, 10) : NULL, prev, anchor_seq,
                                       anchor_hash))
                        return 0;
                /* A begin kept in full whose row is gone is a voided session's (a void stores the
                 * text before it deletes the row): its void entry must follow. */
                if ((begin || end) && !stubbed) {
                        bool missing = false;
                        r = verify3_session_entry(db, path, w, expected, end, id, st, 7, NULL, begin ? &missing : NULL, v);
                        if (r >= 0 && !v->broken && missing)
                                r = verify3_begin_open(w, expected, id, (const char *) sqlite3_column_text(st, 7), v);
                        if (r < 0 || v->broken)
                                return r;
                }
                if (voids) {
                        r = verify3_void(db, path, w, expected, id,
                                         sqlite3_column_type(st, 7) == SQLITE_TEXT ? (const char *) sqlite3_column_text(st, 7) : NULL,
                                         v);
                        if (r < 0 || v->broken)
                                return r;
                }
                verify_entry_good(v, expected++, hash, prev);
        }
        return verify_walk_end(db, path, rc, anchor_seq, prev, v);
}

/* After a full walk of a schema-3 trail: every session was matched by its entries (each entry
 * matched one row, and no row two entries of a kind, so equal counts mean one each), and the
 * cartridges agree. */
static int verify_records3(sqlite3 *db, const char *path, const verify3 *w, nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL, *which = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "SELECT count(*), count(end_us) FROM sessions", -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc != SQLITE_ROW)
                return verify_sql_fail(v, db, rc, path, "reading the sessions");
        uint64_t sessions = (uint64_t) sqlite3_column_int64(st, 0), ended = (uint64_t) sqlite3_column_int64(st, 1);
        if (sessions != w->begins || ended != w->ends) {
                rc = sqlite3_prepare_v2(db, "SELECT s.id, s.end_us IS NOT NULL FROM sessions s WHERE NOT EXISTS "
                                            "(SELECT 1 FROM audit a WHERE a.seq = s.begin_seq AND a.action = ?1 AND a.object = s.id) "
                                            "OR (s.end_us IS NOT NULL AND NOT EXISTS (SELECT 1 FROM audit a WHERE "
                                            "  a.seq = s.end_seq AND a.action = ?2 AND a.object = s.id)) "
                                            "ORDER BY s.rowid LIMIT 1", -1, &which, NULL);
                if (rc == SQLITE_OK) {
                        bind_text(which, 1, AUDIT_ACTION_BEGIN);
                        bind_text(which, 2, AUDIT_ACTION_END);
                        rc = sqlite3_step(which);
                }
                if (rc == SQLITE_ROW)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, 0,
                                            "session %s has no audit entry of its start or end: the row was "
                                            "inserted or changed by hand",
                                            strempty((const char *) sqlite3_column_text(which, 0)));
                if (rc != SQLITE_DONE)
                        return verify_sql_fail(v, db, rc, path, "reading the sessions");
                return verify_break(v, ND_LEDGER_BREAK_RECORD, 0,
                                    "%" PRIu64 " sessions (%" PRIu64 " ended) but %" PRIu64 " start and %" PRIu64
                                    " end entries: rows were inserted or removed by hand",
                                    sessions, ended, w->begins, w->ends);
        }
        v->sessions = sessions;

        return verify_cartridges(db, path, v);
}

int nd_ledger_audit_verify(const char *db_path, nd_ledger_verify_result *v) {
        return nd_ledger_audit_verify_anchored(db_path, 0, NULL, v);
}

static int audit_verify(const char *db_path, uint64_t anchor_seq, const char *anchor_hash, bool from_anchor,
                        nd_ledger_verify_result *v);

/* Incremental: the session rows recorded by entries from anchor_seq on, against them. */
static int verify_records_since(sqlite3 *db, const char *path, uint64_t anchor_seq, int64_t schema,
                                nd_ledger_verify_result *v) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        _cleanup_(verify_stmts_done) verify_stmts vs = { NULL, { NULL, NULL } };
        int r, rc;

        /* The begin of a voided session has no row to check: verify_voids() checks its void. */
        rc = sqlite3_prepare_v2(db, "SELECT object, action = ?3 FROM audit a WHERE seq >= ?1 AND action IN (?2, ?3) "
                                    "AND NOT (action = ?2 AND EXISTS (SELECT 1 FROM audit x "
                                    "  WHERE x.object = a.object AND x.action = ?4)) "
                                    "ORDER BY seq", -1, &st, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        sqlite3_bind_int64(st, 1, (int64_t) anchor_seq);
        bind_text(st, 2, AUDIT_ACTION_BEGIN);
        bind_text(st, 3, AUDIT_ACTION_END);
        bind_text(st, 4, AUDIT_ACTION_VOID);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *id = (const char *) sqlite3_column_text(st, 0);
                bool ended = sqlite3_column_int(st, 1) != 0;
                if (!id)
                        return verify_break(v, ND_LEDGER_BREAK_RECORD, 0, "a session entry without a session id");
                r = verify_session_entry(db, path, id, ended, true, schema, &vs, v);
                if (r < 0 || v->broken)
                        return r;
                if (!ended)
                        v->sessions++;
        }
        if (rc != SQLITE_DONE)
                return verify_sql_fail(v, db, rc, path, "reading the audit trail");
        return verify_voids(db, path, anchor_seq, v);
}

int nd_ledger_audit_verify_anchored(const char *db_path, uint64_t anchor_seq, const char *anchor_hash,
                                    nd_ledger_verify_result *v) {
        return audit_verify(db_path, anchor_seq, anchor_hash, false, v);
}

int nd_ledger_audit_verify_from_anchor(const char *db_path, uint64_t anchor_seq, const char *anchor_hash,
                                       nd_ledger_verify_result *v) {
        if (anchor_seq == 0 || !anchor_hash) {
                if (v)
                        *v = (nd_ledger_verify_result) { 0 };
                return v ? verify_fail(v, -EINVAL, "an incremental verification needs an anchor") : -EINVAL;
        }
        return audit_verify(db_path, anchor_seq, anchor_hash, true, v);
}

static int audit_verify(const char *db_path, uint64_t anchor_seq, const char *anchor_hash, bool from_anchor,
                        nd_ledger_verify_result *v) {
        _cleanup_(sqlite3_closep) sqlite3 *db = NULL;
        struct stat stbuf;
        int64_t app_id = 0, version = 0;
        int r, rc = SQLITE_OK;

        if (!v)
                return -EINVAL;
        *v = (nd_ledger_verify_result) { 0 };
        memcpy(v->head_hash, zero_hash, sizeof v->head_hash);
        if (!db_path || !*db_path)
                return verify_fail(v, -EINVAL, "no database given");
        if (anchor_seq > 0 && (!anchor_hash || strlen(anchor_hash) != HASH_HEX_LEN))
                return verify_fail(v, -EINVAL, "an anchor needs a 64-digit SHA-256");
        if (stat(db_path, &stbuf) < 0)
                return verify_fail(v, -errno, "%s: %s", db_path, strerror(errno));
        if (!S_ISREG(stbuf.st_mode))
                return verify_fail(v, S_ISDIR(stbuf.st_mode) ? -EISDIR : -EBADMSG, "%s: not a regular file", db_path);

        /* Read-only: SQLite never writes the database file through this connection. In WAL mode it
         * still needs the -shm and -wal files beside it (creating empty ones, owned like the
         * database, if the daemon is not running). */
        rc = sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_EXRESCODE, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, db_path, "cannot open");
        sqlite3_busy_timeout(db, LEDGER_BUSY_TIMEOUT_MS);
        rc = sqlite3_exec(db, "PRAGMA trusted_schema=OFF", NULL, NULL, NULL);
        /* A command-line check reads the whole file once: a larger page cache and the file mapped
         * rather than copied page by page (read-only: a mapping cannot write the file). */
        if (rc == SQLITE_OK)
                rc = sqlite3_exec(db, VERIFY_CACHE_PRAGMAS, NULL, NULL, NULL);
        /* One read transaction: a consistent snapshot while the daemon keeps writing. */
        if (rc == SQLITE_OK)
                rc = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
        if (rc != SQLITE_OK)
                return verify_sql_fail(v, db, rc, db_path, "cannot read");
        if (pragma_int(db, "PRAGMA application_id", &app_id, &rc) < 0 ||
            pragma_int(db, "PRAGMA user_version", &version, &rc) < 0)
                return verify_sql_fail(v, db, rc, db_path, "not a readable SQLite database");
        if (app_id != ND_LEDGER_APPLICATION_ID)
                return verify_fail(v, -EBADMSG, "%s: not a needled ledger (application id 0x%08" PRIx64 ")", db_path,
                                   (uint64_t) app_id);
        if (version < 1 || version > ND_LEDGER_SCHEMA_VERSION)
                return verify_fail(v, -ENOTSUP, "%s: schema version %" PRId64 ", this needlectl reads 1..%d", db_path,
                                   version, ND_LEDGER_SCHEMA_VERSION);

        if (version >= 3) {
                _cleanup_(verify3_done) verify3 w = { 0 };
                r = verify_chain3(db, db_path, anchor_seq, anchor_hash, from_anchor, &w, v);
                if (r >= 0 && v->broken == ND_LEDGER_INTACT)
                        r = verify3_open_done(&w, v);
                if (r >= 0 && v->broken == ND_LEDGER_INTACT) {
                        if (from_anchor)
                                v->sessions = w.begins;
                        else
                                r = verify_records3(db, db_path, &w, v);
                }
        } else {
                /* Schemas 1 and 2 (a file not opened by this build yet, a copy): read as they are. */
                r = verify_chain(db, db_path, anchor_seq, anchor_hash, from_anchor, v);
                if (r >= 0 && v->broken == ND_LEDGER_INTACT)
                        r = from_anchor ? verify_records_since(db, db_path, anchor_seq, version, v)
                                        : verify_records(db, db_path, version, v);
        }
        (void) sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
        return r;
}
