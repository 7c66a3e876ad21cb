/* test-ledger.c: the ledger on real SQLite files: opening and migrating, refusing bad files without
 * touching them, storage failures, sessions and single-use cartridges, crash recovery, history, and
 * the hash-chained audit trail against every kind of tampering. */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check-main.h"
#include "digest.h"
#include "ledger.h"
#include "util.h"

#define T0_US UINT64_C(1700000000000000)
#define NOBODY_ID 65534

/* ---- fixtures ---- */

static char *make_dir(void) {
        char *d = strdup("/tmp/test-ledger-XXXXXX");
        ck_assert_ptr_nonnull(d);
        ck_assert_ptr_nonnull(mkdtemp(d));
        return d;
}

static void remove_dir(char *d) {
        DIR *dir;
        struct dirent *e;

        if (!d)
                return;
        chmod(d, 0700);
        dir = opendir(d);
        if (dir) {
                while ((e = readdir(dir))) {
                        if (STREQ(e->d_name, ".") || STREQ(e->d_name, ".."))
                                continue;
                        char p[512];
                        snprintf(p, sizeof p, "%s/%s", d, e->d_name);
                        unlink(p);
                }
                closedir(dir);
        }
        rmdir(d);
        free(d);
}
static inline void remove_dirp(char **d) {
        remove_dir(*d);
}
#define _cleanup_dir_ _cleanup_(remove_dirp)

static char *db_path(const char *dir) {
        char *p;
        ck_assert_int_ge(asprintf(&p, "%s/%s", dir, ND_LEDGER_FILE_NAME), 0);
        return p;
}

static nd_ledger *open_ok(const char *dir) {
        nd_ledger *l = NULL;
        _cleanup_free_ char *error = NULL;
        int r = nd_ledger_open(dir, &l, &error);
        ck_assert_msg(r == 0, "open %s: %d %s", dir, r, strempty(error));
        ck_assert_ptr_nonnull(l);
        return l;
}

/* Borrowed strings of one session start; id is filled with a fresh UUID. */
typedef struct start_buf {
        char id[ND_LEDGER_SESSION_ID_SIZE];
        nd_ledger_session_start s;
} start_buf;

static const nd_ledger_session_start *start_of(start_buf *b, const char *pen, const char *cartridge, uint64_t t_us) {
        ck_assert_int_eq(nd_ledger_session_id_new(b->id), 0);
        b->s = (nd_ledger_session_start) {
                .id = b->id,
                .pen_serial = pen,
                .cartridge_id = cartridge,
                .needles = 12,
                .profile_name = "cheeks-acne",
                .profile_yaml = "name: cheeks-acne\narea: cheeks\ndepth_mm: 1.25\n",
                .profile_digest = "aa11",
                .limits_digest = "bb22",
                .label = "appt-42",
                .owner_uid = 1000,
                .owner_pid = 4242,
                .owner_name = ":1.17",
                .start_us = t_us,
                .single_use = true,
        };
        return &b->s;
}

static nd_ledger_stats stats_of(double duration_s, uint64_t strokes, double depth_mm) {
        return (nd_ledger_stats) {
                .duration_s = duration_s,
                .strokes = strokes,
                .max_depth_mm = depth_mm,
                .max_speed_hz = 120,
                .max_temperature_c = 31.5,
                .max_current_ma = 210,
        };
}

/* Begins and ends one session; returns its id in id. */
static void run_session(nd_ledger *l, const char *pen, const char *cartridge, uint64_t t_us,
                        char id[static ND_LEDGER_SESSION_ID_SIZE]) {
        start_buf b;
        const nd_ledger_session_start *s = start_of(&b, pen, cartridge, t_us);
        ck_assert_msg(nd_ledger_session_begin(l, s) == 0, "%s", nd_ledger_last_error(l));
        nd_ledger_stats st = stats_of(60, 7200, 1.25);
        ck_assert_msg(nd_ledger_session_end(l, s->id, t_us + 60 * USEC_PER_SEC, &st, "completed") == 0, "%s",
                      nd_ledger_last_error(l));
        memcpy(id, b.id, ND_LEDGER_SESSION_ID_SIZE);
}

static void *read_all(const char *path, size_t *ret_n) {
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        ck_assert_ptr_nonnull(f);
        char *buf = NULL;
        size_t n = 0, cap = 0;
        for (;;) {
                if (n == cap) {
                        cap = cap ? cap * 2 : 65536;
                        buf = realloc(buf, cap);
                        ck_assert_ptr_nonnull(buf);
                }
                size_t k = fread(buf + n, 1, cap - n, f);
                n += k;
                if (k == 0)
                        break;
        }
        *ret_n = n;
        return buf;
}

static void write_all(const char *path, const void *data, size_t n) {
        _cleanup_fclose_ FILE *f = fopen(path, "we");
        ck_assert_ptr_nonnull(f);
        ck_assert_uint_eq(fwrite(data, 1, n, f), n);
}

static void assert_same_bytes(const void *a, size_t na, const char *path) {
        size_t nb;
        _cleanup_free_ void *b = read_all(path, &nb);
        ck_assert_uint_eq(na, nb);
        ck_assert_msg(memcmp(a, b, na) == 0, "%s changed", path);
}

/* Runs SQL on the database through a connection of its own, as someone editing it by hand would. */
static void sql_on(const char *dir, const char *sql) {
        _cleanup_free_ char *p = db_path(dir);
        sqlite3 *db = NULL;
        char *err = NULL;
        ck_assert_int_eq(sqlite3_open(p, &db), SQLITE_OK);
        int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
        ck_assert_msg(rc == SQLITE_OK, "%s: %s", sql, strempty(err));
        sqlite3_free(err);
        sqlite3_close(db);
}

static int64_t sql_int(const char *dir, const char *sql) {
        _cleanup_free_ char *p = db_path(dir);
        sqlite3 *db = NULL;
        sqlite3_stmt *st = NULL;
        ck_assert_int_eq(sqlite3_open_v2(p, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
        ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
        ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
        int64_t v = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        sqlite3_close(db);
        return v;
}

/* The first column of the first row, as text (caller frees); NULL for a NULL. */
static char *sql_text(const char *dir, const char *sql) {
        _cleanup_free_ char *p = db_path(dir);
        sqlite3 *db = NULL;
        sqlite3_stmt *st = NULL;
        ck_assert_int_eq(sqlite3_open_v2(p, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
        ck_assert_msg(sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK, "%s: %s", sql, sqlite3_errmsg(db));
        ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
        const char *t = (const char *) sqlite3_column_text(st, 0);
        char *v = t ? strdup(t) : NULL;
        sqlite3_finalize(st);
        sqlite3_close(db);
        return v;
}

static nd_ledger_verify_result verify_dir(const char *dir) {
        _cleanup_free_ char *p = db_path(dir);
        nd_ledger_verify_result v;
        int r = nd_ledger_audit_verify(p, &v);
        ck_assert_msg(r == 0, "verify: %d %s", r, v.message);
        return v;
}

static void assert_intact(const char *dir) {
        nd_ledger_verify_result v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "not intact: %s: %s", nd_ledger_break_to_string(v.broken),
                      v.message);
}

/* A deterministic generator, so a failing soak can be replayed. */
static uint64_t rng_state;
static uint64_t rng(void) {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        return rng_state;
}

/* ---- opening, schema, migration ---- */

START_TEST(test_create_reopen) {
        _cleanup_dir_ char *dir = make_dir();
        char id[ND_LEDGER_SESSION_ID_SIZE];
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_str_eq(nd_ledger_last_error(l), "");
                run_session(l, "PEN1", "CART1", T0_US, id);
        }
        ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), ND_LEDGER_SCHEMA_VERSION);
        ck_assert_int_eq(sql_int(dir, "PRAGMA application_id"), ND_LEDGER_APPLICATION_ID);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM sessions"), 1);
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                nd_ledger_session s;
                ck_assert_int_eq(nd_ledger_session_get(l, id, &s), 0);
                ck_assert_str_eq(s.reason, "completed");
                nd_ledger_session_clear(&s);
                /* journal_mode is stored in the file: WAL from the first open on. */
                _cleanup_free_ char *p = db_path(dir);
                sqlite3 *db;
                sqlite3_stmt *st;
                ck_assert_int_eq(sqlite3_open_v2(p, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
                ck_assert_int_eq(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL), SQLITE_OK);
                ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
                ck_assert_str_eq((const char *) sqlite3_column_text(st, 0), "wal");
                sqlite3_finalize(st);
                sqlite3_close(db);
        }
        assert_intact(dir);
}
END_TEST

START_TEST(test_migrate_from_version_0) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);

        /* An empty file is an SQLite database at version 0 (e.g. a first start cut short). */
        write_all(p, "", 0);
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                char id[ND_LEDGER_SESSION_ID_SIZE];
                run_session(l, "PEN1", "CART1", T0_US, id);
        }
        ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), ND_LEDGER_SCHEMA_VERSION);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit"), 2);
        /* Re-opening an up-to-date ledger migrates nothing and loses nothing. */
        nd_ledger_close(open_ok(dir));
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM sessions"), 1);
}
END_TEST

/* Opens must fail with r, name the path, and leave the file byte for byte as it was. */
static void assert_refused_untouched(const char *dir, int r_expected, const char *needle) {
        _cleanup_free_ char *p = db_path(dir);
        size_t n;
        _cleanup_free_ void *before = read_all(p, &n);
        nd_ledger *l = (nd_ledger *) 1;
        _cleanup_free_ char *error = NULL;

        int r = nd_ledger_open(dir, &l, &error);
        ck_assert_int_eq(r, r_expected);
        ck_assert_ptr_null(l);
        ck_assert_ptr_nonnull(error);
        ck_assert_msg(strstr(error, p), "error does not name the path: %s", error);
        ck_assert_msg(strstr(error, needle), "error does not say '%s': %s", needle, error);
        assert_same_bytes(before, n, p);
        /* Nothing was created beside it either. */
        _cleanup_free_ char *wal = NULL;
        ck_assert_int_ge(asprintf(&wal, "%s-wal", p), 0);
        ck_assert_int_ne(access(wal, F_OK), 0);
}

START_TEST(test_newer_version_refused) {
        _cleanup_dir_ char *dir = make_dir();
        char sql[256];
        snprintf(sql, sizeof sql,
                 "CREATE TABLE future (x); INSERT INTO future VALUES (1); PRAGMA application_id=%d; "
                 "PRAGMA user_version=%d;",
                 ND_LEDGER_APPLICATION_ID, ND_LEDGER_SCHEMA_VERSION + 1);
        sql_on(dir, sql);
        assert_refused_untouched(dir, -ENOTSUP, "newer");
}
END_TEST

START_TEST(test_foreign_database_refused) {
        _cleanup_dir_ char *dir = make_dir();
        sql_on(dir, "CREATE TABLE contacts (name TEXT); INSERT INTO contacts VALUES ('x');");
        assert_refused_untouched(dir, -EBADMSG, "another program");
        sql_on(dir, "PRAGMA application_id=1234;");
        assert_refused_untouched(dir, -EBADMSG, "not a needled ledger");
}
END_TEST

START_TEST(test_corrupt_random_bytes) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);
        uint8_t junk[8192];

        rng_state = 0x9e3779b97f4a7c15u;
        for (size_t i = 0; i < sizeof junk; i++)
                junk[i] = (uint8_t) rng();
        write_all(p, junk, sizeof junk);
        assert_refused_untouched(dir, -EBADMSG, "not an SQLite database");

        /* A real header followed by garbage. */
        memcpy(junk, "SQLite format 3", 16);
        write_all(p, junk, sizeof junk);
        _cleanup_free_ char *error = NULL;
        nd_ledger *l = NULL;
        int r = nd_ledger_open(dir, &l, &error);
        ck_assert_int_lt(r, 0);
        ck_assert_ptr_null(l);
        assert_same_bytes(junk, sizeof junk, p);
}
END_TEST

START_TEST(test_corrupt_truncated) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                for (int i = 0; i < 40; i++) {
                        char cart[32], id[ND_LEDGER_SESSION_ID_SIZE];
                        snprintf(cart, sizeof cart, "CART%d", i);
                        run_session(l, "PEN1", cart, T0_US + (uint64_t) i * USEC_PER_SEC, id);
                }
        }
        size_t n;
        _cleanup_free_ char *bytes = read_all(p, &n);
        ck_assert_uint_gt(n, 8 * 4096);
        write_all(p, bytes, n / 2);
        assert_refused_untouched(dir, -EBADMSG, "corrupt");

        /* The verifier says so too, without writing. */
        nd_ledger_verify_result v;
        ck_assert_int_lt(nd_ledger_audit_verify(p, &v), 0);
        ck_assert_str_ne(v.message, "");
        assert_same_bytes(bytes, n / 2, p);
}
END_TEST

START_TEST(test_missing_or_bad_dir) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *missing = NULL, *error = NULL;
        nd_ledger *l = NULL;

        ck_assert_int_ge(asprintf(&missing, "%s/nope", dir), 0);
        ck_assert_int_eq(nd_ledger_open(missing, &l, &error), -ENOENT);
        ck_assert_ptr_null(l);
        ck_assert_ptr_nonnull(strstr(error, missing));
        ck_assert_int_ne(access(missing, F_OK), 0); /* not created */
        free(TAKE_PTR(error));

        _cleanup_free_ char *file = db_path(dir);
        write_all(file, "", 0);
        ck_assert_int_eq(nd_ledger_open(file, &l, &error), -ENOTDIR);
        free(TAKE_PTR(error));
        ck_assert_int_eq(nd_ledger_open(NULL, &l, &error), -EINVAL);
        free(TAKE_PTR(error));
        ck_assert_int_eq(nd_ledger_open("", &l, NULL), -EINVAL);

        /* A directory where the database should be. */
        unlink(file);
        ck_assert_int_eq(mkdir(file, 0700), 0);
        ck_assert_int_eq(nd_ledger_open(dir, &l, &error), -EISDIR);
        rmdir(file);
}
END_TEST

/* In a child without root's override of file permissions: every way of not being able to write
 * is a Storage-class error, and nothing is changed. Exit status: 0 good, else the failing step. */
static int readonly_child(const char *dir) {
        nd_ledger *l = NULL;
        _cleanup_free_ char *error = NULL;
        _cleanup_free_ char *p = db_path(dir);

        if (geteuid() == 0 && (setresgid(NOBODY_ID, NOBODY_ID, NOBODY_ID) < 0 ||
                               setresuid(NOBODY_ID, NOBODY_ID, NOBODY_ID) < 0))
                return 10;
        /* 1. no database yet, directory read-only */
        if (nd_ledger_open(dir, &l, &error) != -EROFS || l || !error || !strstr(error, p))
                return 1;
        if (access(p, F_OK) == 0)
                return 2;
        return 0;
}

static int readonly_child_existing(const char *dir) {
        nd_ledger *l = NULL;
        _cleanup_free_ char *error = NULL;

        if (geteuid() == 0 && (setresgid(NOBODY_ID, NOBODY_ID, NOBODY_ID) < 0 ||
                               setresuid(NOBODY_ID, NOBODY_ID, NOBODY_ID) < 0))
                return 10;
        int r = nd_ledger_open(dir, &l, &error);
        if (l) {
                nd_ledger_close(l);
                return 3;
        }
        if (r != -EROFS) {
                fprintf(stderr, "open: %d %s\n", r, strempty(error));
                return 4;
        }
        return 0;
}

static void run_child(int (*fn)(const char *), const char *dir) {
        fflush(NULL);
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0)
                _exit(fn(dir));
        int status;
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child step %d failed",
                      WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

START_TEST(test_readonly) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);

        /* An empty read-only state directory. */
        ck_assert_int_eq(chmod(dir, 0555), 0);
        run_child(readonly_child, dir);

        /* An existing ledger the daemon's user may not write (owned by someone else). */
        ck_assert_int_eq(chmod(dir, 0755), 0);
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                char id[ND_LEDGER_SESSION_ID_SIZE];
                run_session(l, "PEN1", "CART1", T0_US, id);
        }
        ck_assert_int_eq(chmod(p, 0644), 0);
        size_t n;
        _cleanup_free_ void *before = read_all(p, &n);
        run_child(readonly_child_existing, dir);
        assert_same_bytes(before, n, p);

        /* A writable ledger in a read-only directory: WAL needs files beside it. */
        if (geteuid() == 0) {
                ck_assert_int_eq(chown(p, NOBODY_ID, NOBODY_ID), 0);
                ck_assert_int_eq(chmod(dir, 0555), 0);
                run_child(readonly_child_existing, dir);
                assert_same_bytes(before, n, p);
        }
}
END_TEST

START_TEST(test_disk_full) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        char id[ND_LEDGER_SESSION_ID_SIZE];
        run_session(l, "PEN1", "CART1", T0_US, id);

        /* A profile far larger than the room left. */
        size_t big_n = ND_LEDGER_PROFILE_MAX - 1;
        _cleanup_free_ char *big = malloc(big_n + 1);
        ck_assert_ptr_nonnull(big);
        memset(big, 'y', big_n);
        big[big_n] = '\0';

        int64_t pages = sql_int(dir, "PRAGMA page_count");
        ck_assert_int_eq(nd_ledger_set_max_pages(l, (uint32_t) pages + 1), 0);
        start_buf b;
        nd_ledger_session_start s = *start_of(&b, "PEN1", "CART2", T0_US + 100 * USEC_PER_SEC);
        s.profile_yaml = big;
        ck_assert_int_eq(nd_ledger_session_begin(l, &s), -ENOSPC);
        ck_assert_msg(strstr(nd_ledger_last_error(l), "full"), "%s", nd_ledger_last_error(l));

        /* Nothing of it is left: no session, no cartridge, no audit entry. */
        nd_ledger_session got;
        ck_assert_int_eq(nd_ledger_session_get(l, s.id, &got), -ENOENT);
        nd_ledger_cartridge c;
        ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART2", &c), -ENOENT);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit"), 2);
        assert_intact(dir);

        /* Room again: the same ledger works on. */
        ck_assert_int_eq(nd_ledger_set_max_pages(l, 0), 0);
        ck_assert_int_eq(nd_ledger_session_begin(l, &s), 0);
        ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART2", &c), 0);
        assert_intact(dir);
}
END_TEST

/* ---- sessions and cartridges ---- */

START_TEST(test_begin_progress_end) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        start_buf b;
        const nd_ledger_session_start *s = start_of(&b, "PEN1", "CART1", T0_US);
        nd_ledger_session got;
        nd_ledger_cartridge c;

        ck_assert_int_eq(nd_ledger_session_begin(l, s), 0);
        ck_assert_int_eq(nd_ledger_session_begin(l, s), -ESTALE); /* its cartridge is in use now */

        ck_assert_int_eq(nd_ledger_session_get(l, s->id, &got), 0);
        ck_assert_str_eq(got.id, s->id);
        ck_assert_str_eq(got.pen_serial, "PEN1");
        ck_assert_str_eq(got.cartridge_id, "CART1");
        ck_assert_str_eq(got.profile_yaml, s->profile_yaml);
        ck_assert_str_eq(got.owner_name, ":1.17");
        ck_assert_uint_eq(got.owner_uid, 1000);
        ck_assert_uint_eq(got.end_us, 0);
        ck_assert_str_eq(got.reason, "");
        nd_ledger_session_clear(&got);

        ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART1", &c), 0);
        ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_IN_USE);
        ck_assert_uint_eq(c.first_used_us, T0_US);
        ck_assert_uint_eq(c.needles, 12);

        nd_ledger_stats st = stats_of(10, 1200, 1.30);
        ck_assert_int_eq(nd_ledger_session_progress(l, s->id, T0_US + 10 * USEC_PER_SEC, &st), 0);
        st = stats_of(20, 2400, 1.10); /* a lower maximum never lowers the recorded one */
        ck_assert_int_eq(nd_ledger_session_progress(l, s->id, T0_US + 20 * USEC_PER_SEC, &st), 0);
        ck_assert_int_eq(nd_ledger_session_get(l, s->id, &got), 0);
        ck_assert_uint_eq(got.stats.strokes, 2400);
        ck_assert(got.stats.max_depth_mm == 1.30);
        ck_assert_uint_eq(got.updated_us, T0_US + 20 * USEC_PER_SEC);
        nd_ledger_session_clear(&got);
        ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART1", &c), 0);
        ck_assert(c.runtime_s == 20);

        /* Bad figures and ids are refused and change nothing. */
        st.duration_s = NAN;
        ck_assert_int_eq(nd_ledger_session_progress(l, s->id, T0_US, &st), -EINVAL);
        st = stats_of(20, 2400, 1.10);
        st.strokes = UINT64_MAX;
        ck_assert_int_eq(nd_ledger_session_progress(l, s->id, T0_US, &st), -EINVAL);
        st = stats_of(30, 3600, 1.25);
        ck_assert_int_eq(nd_ledger_session_progress(l, "not-a-uuid", T0_US, &st), -EINVAL);
        char other[ND_LEDGER_SESSION_ID_SIZE];
        ck_assert_int_eq(nd_ledger_session_id_new(other), 0);
        ck_assert_int_eq(nd_ledger_session_progress(l, other, T0_US, &st), -ENOENT);
        ck_assert_int_eq(nd_ledger_session_end(l, s->id, T0_US + 30 * USEC_PER_SEC, &st, "Completed"), -EINVAL);
        ck_assert_int_eq(nd_ledger_session_end(l, s->id, T0_US + 30 * USEC_PER_SEC, &st, ""), -EINVAL);

        ck_assert_int_eq(nd_ledger_session_end(l, s->id, T0_US + 30 * USEC_PER_SEC, &st, "fault:over-temperature"), 0);
        ck_assert_int_eq(nd_ledger_session_end(l, s->id, T0_US + 31 * USEC_PER_SEC, &st, "stopped"), -EALREADY);
        ck_assert_int_eq(nd_ledger_session_progress(l, s->id, T0_US + 31 * USEC_PER_SEC, &st), -EALREADY);
        ck_assert_int_eq(nd_ledger_session_get(l, s->id, &got), 0);
        ck_assert_uint_eq(got.end_us, T0_US + 30 * USEC_PER_SEC);
        ck_assert_str_eq(got.reason, "fault:over-temperature");
        ck_assert(got.stats.duration_s == 30);
        ck_assert_uint_eq(got.stats.strokes, 3600);
        ck_assert(got.stats.max_depth_mm == 1.30);
        nd_ledger_session_clear(&got);

        ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART1", &c), 0);
        ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);
        ck_assert(c.runtime_s == 30);
        ck_assert_uint_eq(c.sessions, 1);
        ck_assert_int_eq(nd_ledger_cartridge_get(l, "NEVER", &c), -ENOENT);
        ck_assert_str_eq(nd_ledger_cartridge_state_to_string(ND_LEDGER_CARTRIDGE_SPENT), "spent");

        /* One session: its begin and its end. */
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit"), 2);
        assert_intact(dir);
}
END_TEST

START_TEST(test_begin_bad_input) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        start_buf b;
        nd_ledger_session_start s = *start_of(&b, "PEN1", "CART1", T0_US);
        char long_text[ND_LEDGER_NAME_MAX + 2];
        memset(long_text, 'x', sizeof long_text - 1);
        long_text[sizeof long_text - 1] = '\0';

        nd_ledger_session_start bad = s;
        bad.id = "1234";
        ck_assert_int_eq(nd_ledger_session_begin(l, &bad), -EINVAL);
        bad = s;
        bad.pen_serial = "";
        ck_assert_int_eq(nd_ledger_session_begin(l, &bad), -EINVAL);
        bad = s;
        bad.label = long_text;
        ck_assert_int_eq(nd_ledger_session_begin(l, &bad), -EINVAL);
        ck_assert_ptr_nonnull(strstr(nd_ledger_last_error(l), "label"));
        bad = s;
        bad.cartridge_id = "\xc3\x28"; /* not UTF-8 */
        ck_assert_int_eq(nd_ledger_session_begin(l, &bad), -EINVAL);
        bad = s;
        bad.profile_yaml = NULL;
        ck_assert_int_eq(nd_ledger_session_begin(l, &bad), -EINVAL);
        bad = s;
        bad.needles = 0;
        ck_assert_int_eq(nd_ledger_session_begin(l, &bad), -EINVAL);
        ck_assert_int_eq(nd_ledger_session_begin(l, NULL), -EINVAL);

        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM sessions"), 0);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit"), 0);
        s.label = ""; /* no label is fine */
        ck_assert_int_eq(nd_ledger_session_begin(l, &s), 0);
}
END_TEST

START_TEST(test_single_use_across_restart) {
        _cleanup_dir_ char *dir = make_dir();
        char id[ND_LEDGER_SESSION_ID_SIZE];
        start_buf b;
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                run_session(l, "PEN1", "CART1", T0_US, id);
        }
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                nd_ledger_cartridge c;
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART1", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);

                nd_ledger_session_start s = *start_of(&b, "PEN2", "CART1", T0_US + 3600 * USEC_PER_SEC);
                ck_assert_int_eq(nd_ledger_session_begin(l, &s), -ESTALE);
                ck_assert_ptr_nonnull(strstr(nd_ledger_last_error(l), "CART1"));
                /* Spent is for ever, whatever later limits say. */
                s.single_use = false;
                ck_assert_int_eq(nd_ledger_session_begin(l, &s), -ESTALE);
                ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM sessions"), 1);
        }

        /* Someone "refreshes" the cartridge by hand: it still may not run, and verify tells. */
        sql_on(dir, "UPDATE cartridges SET state = 'in-use' WHERE id = 'CART1'");
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN2", "CART1", T0_US + 7200 * USEC_PER_SEC)),
                                 -ESTALE);
        }
        nd_ledger_verify_result v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_RECORD);
        ck_assert_ptr_nonnull(strstr(v.message, "CART1"));
}
END_TEST

START_TEST(test_reusable_cartridge) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        start_buf b;
        nd_ledger_cartridge c;
        nd_ledger_stats st = stats_of(40, 100, 1.0);

        /* Limits that allow reuse up to 100 s of runtime. */
        for (int i = 0; i < 3; i++) {
                nd_ledger_session_start s = *start_of(&b, "PEN1", "MULTI", T0_US + (uint64_t) i * 1000 * USEC_PER_SEC);
                s.single_use = false;
                s.cartridge_max_runtime_s = 100;
                int r = nd_ledger_session_begin(l, &s);
                if (i < 3 && r == 0)
                        ck_assert_int_eq(nd_ledger_session_end(l, s.id, s.start_us + 40 * USEC_PER_SEC, &st, "stopped"), 0);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "MULTI", &c), 0);
                if (i < 2) {
                        ck_assert_int_eq(r, 0);
                        ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_IN_USE);
                } else {
                        /* 80 s used: the third session ends past the cap, which spends it. */
                        ck_assert_int_eq(r, 0);
                        ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);
                }
        }
        ck_assert_uint_eq(c.sessions, 3);
        ck_assert(c.runtime_s == 120);

        /* The same id with a different needle count is not the same cartridge. */
        nd_ledger_session_start s = *start_of(&b, "PEN1", "OTHER", T0_US);
        s.single_use = false;
        ck_assert_int_eq(nd_ledger_session_begin(l, &s), 0);
        ck_assert_int_eq(nd_ledger_session_end(l, s.id, T0_US + 1, &st, "completed"), 0);
        s = *start_of(&b, "PEN1", "OTHER", T0_US + 10);
        s.single_use = false;
        s.needles = 36;
        ck_assert_int_eq(nd_ledger_session_begin(l, &s), -ESTALE);
        ck_assert_ptr_nonnull(strstr(nd_ledger_last_error(l), "needles"));
        assert_intact(dir);
}
END_TEST

START_TEST(test_recover) {
        _cleanup_dir_ char *dir = make_dir();
        start_buf b1, b2;
        char done[ND_LEDGER_SESSION_ID_SIZE];
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                run_session(l, "PEN0", "CART0", T0_US, done);
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b1, "PEN1", "CART1", T0_US + 100)), 0);
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b2, "PEN2", "CART2", T0_US + 200)), 0);
                nd_ledger_stats st = stats_of(12.5, 1500, 1.2);
                ck_assert_int_eq(nd_ledger_session_progress(l, b1.id, T0_US + 100 + 12500000, &st), 0);
                /* the daemon dies here */
        }
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_int_eq(nd_ledger_recover(l, T0_US + 999 * USEC_PER_SEC), 2);
                nd_ledger_session s;
                ck_assert_int_eq(nd_ledger_session_get(l, b1.id, &s), 0);
                ck_assert_str_eq(s.reason, ND_LEDGER_REASON_DAEMON_RESTART);
                ck_assert_uint_eq(s.end_us, T0_US + 100 + 12500000); /* its last progress */
                ck_assert_uint_eq(s.stats.strokes, 1500);
                nd_ledger_session_clear(&s);
                ck_assert_int_eq(nd_ledger_session_get(l, b2.id, &s), 0);
                ck_assert_str_eq(s.reason, ND_LEDGER_REASON_DAEMON_RESTART);
                ck_assert_uint_eq(s.end_us, T0_US + 200); /* never updated: its start */
                nd_ledger_session_clear(&s);
                ck_assert_int_eq(nd_ledger_session_get(l, done, &s), 0);
                ck_assert_str_eq(s.reason, "completed"); /* ended sessions are left alone */
                nd_ledger_session_clear(&s);

                nd_ledger_cartridge c;
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART1", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);
                ck_assert(c.runtime_s == 12.5);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART2", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);

                /* Spent even where the limits would allow reuse: how long it ran is unknown. */
                start_buf b3;
                nd_ledger_session_start s3 = *start_of(&b3, "PEN2", "CART2", T0_US + 1000 * USEC_PER_SEC);
                s3.single_use = false;
                ck_assert_int_eq(nd_ledger_session_begin(l, &s3), -ESTALE);

                ck_assert_int_eq(nd_ledger_recover(l, T0_US + 1000 * USEC_PER_SEC), 0);
        }
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit WHERE action = 'session-end' AND actor = 'needled'"), 3);
        assert_intact(dir);
}
END_TEST

/* A daemon killed outright (SIGKILL, nothing closed, the WAL not checkpointed). */
START_TEST(test_recover_after_kill) {
        _cleanup_dir_ char *dir = make_dir();
        int fds[2];
        ck_assert_int_eq(pipe(fds), 0);
        fflush(NULL);
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
                nd_ledger *l = NULL;
                start_buf b;
                if (nd_ledger_open(dir, &l, NULL) < 0 || nd_ledger_session_begin(l, start_of(&b, "P", "C", T0_US)) < 0)
                        _exit(1);
                if (write(fds[1], b.id, sizeof b.id) != (ssize_t) sizeof b.id)
                        _exit(2);
                raise(SIGKILL);
                _exit(3);
        }
        close(fds[1]);
        char id[ND_LEDGER_SESSION_ID_SIZE];
        ck_assert_int_eq(read(fds[0], id, sizeof id), (ssize_t) sizeof id);
        close(fds[0]);
        int status;
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
        ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        ck_assert_int_eq(nd_ledger_recover(l, T0_US + 5 * USEC_PER_SEC), 1);
        nd_ledger_session s;
        ck_assert_int_eq(nd_ledger_session_get(l, id, &s), 0);
        ck_assert_str_eq(s.reason, ND_LEDGER_REASON_DAEMON_RESTART);
        nd_ledger_session_clear(&s);
        assert_intact(dir);
}
END_TEST

START_TEST(test_history) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        char ids[10][ND_LEDGER_SESSION_ID_SIZE];
        nd_ledger_session *a = NULL;
        size_t n = 0;

        for (int i = 0; i < 10; i++) {
                char cart[16];
                snprintf(cart, sizeof cart, "C%d", i);
                run_session(l, i % 2 ? "ODD" : "EVEN", cart, T0_US + (uint64_t) i * USEC_PER_SEC, ids[i]);
        }

        ck_assert_int_eq(nd_ledger_history(l, NULL, 0, 0, &a, &n), 0);
        ck_assert_uint_eq(n, 10);
        for (size_t i = 0; i < n; i++) {
                ck_assert_str_eq(a[i].id, ids[9 - i]); /* newest first */
                ck_assert_ptr_null(a[i].profile_yaml);
                ck_assert_str_eq(a[i].reason, "completed");
        }
        nd_ledger_session_array_free(a, n);

        ck_assert_int_eq(nd_ledger_history(l, "ODD", 0, 0, &a, &n), 0);
        ck_assert_uint_eq(n, 5);
        for (size_t i = 0; i < n; i++)
                ck_assert_str_eq(a[i].pen_serial, "ODD");
        ck_assert_str_eq(a[0].id, ids[9]);
        nd_ledger_session_array_free(a, n);

        ck_assert_int_eq(nd_ledger_history(l, NULL, T0_US + 7 * USEC_PER_SEC, 0, &a, &n), 0);
        ck_assert_uint_eq(n, 3);
        ck_assert_str_eq(a[2].id, ids[7]);
        nd_ledger_session_array_free(a, n);

        ck_assert_int_eq(nd_ledger_history(l, "EVEN", T0_US + 3 * USEC_PER_SEC, 2, &a, &n), 0);
        ck_assert_uint_eq(n, 2);
        ck_assert_str_eq(a[0].id, ids[8]);
        ck_assert_str_eq(a[1].id, ids[6]);
        nd_ledger_session_array_free(a, n);

        ck_assert_int_eq(nd_ledger_history(l, "NOBODY", 0, 0, &a, &n), 0);
        ck_assert_uint_eq(n, 0);
        nd_ledger_session_array_free(a, n);
        ck_assert_int_eq(nd_ledger_history(l, NULL, UINT64_MAX, 0, &a, &n), 0);
        ck_assert_uint_eq(n, 0);
        nd_ledger_session_array_free(a, n);
        ck_assert_int_eq(nd_ledger_history(l, "", 0, 0, &a, &n), -EINVAL);
}
END_TEST

START_TEST(test_history_before_and_reader) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        _cleanup_(nd_ledger_closep) nd_ledger *reader = NULL;
        _cleanup_free_ char *error = NULL;
        char ids[10][ND_LEDGER_SESSION_ID_SIZE];
        nd_ledger_session *a = NULL;
        size_t n = 0;

        for (int i = 0; i < 10; i++) {
                char cart[16];
                snprintf(cart, sizeof cart, "C%d", i);
                run_session(l, i % 2 ? "ODD" : "EVEN", cart, T0_US + (uint64_t) i * USEC_PER_SEC, ids[i]);
        }
        ck_assert_int_eq(nd_ledger_open_reader(nd_ledger_path(l), &reader, &error), 0);
        ck_assert_ptr_null(error);

        /* limit + before page back through everything, once each, newest first. */
        nd_ledger_history_filter f = { .limit = 3 };
        size_t seen = 0;
        for (;;) {
                ck_assert_int_eq(nd_ledger_history_query(reader, &f, &a, &n), 0);
                for (size_t i = 0; i < n; i++)
                        ck_assert_str_eq(a[i].id, ids[9 - seen - i]);
                seen += n;
                if (n < 3) {
                        nd_ledger_session_array_free(a, n);
                        break;
                }
                f.before_us = a[n - 1].start_us;
                nd_ledger_session_array_free(a, n);
        }
        ck_assert_uint_eq(seen, 10);

        f = (nd_ledger_history_filter) { .pen_serial = "EVEN", .since_us = T0_US + 2 * USEC_PER_SEC,
                                         .before_us = T0_US + 8 * USEC_PER_SEC };
        ck_assert_int_eq(nd_ledger_history_query(reader, &f, &a, &n), 0);
        ck_assert_uint_eq(n, 3); /* 6, 4, 2 */
        ck_assert_str_eq(a[0].id, ids[6]);
        ck_assert_str_eq(a[2].id, ids[2]);
        nd_ledger_session_array_free(a, n);

        /* The reader sees what the writer commits after it opened, and cannot write. */
        char late[ND_LEDGER_SESSION_ID_SIZE];
        run_session(l, "ODD", "C10", T0_US + 20 * USEC_PER_SEC, late);
        f = (nd_ledger_history_filter) { .limit = 1 };
        ck_assert_int_eq(nd_ledger_history_query(reader, &f, &a, &n), 0);
        ck_assert_uint_eq(n, 1);
        ck_assert_str_eq(a[0].id, late);
        nd_ledger_session_array_free(a, n);
        nd_ledger_cartridge c;
        ck_assert_int_eq(nd_ledger_cartridge_get(reader, "C10", &c), 0);
        ck_assert_uint_eq(c.sessions, 1);
        ck_assert_int_lt(nd_ledger_audit(reader, T0_US, 0, 0, "x", "y", "", ""), 0);
        ck_assert_int_eq(nd_ledger_recover(reader, T0_US), -EROFS);

        /* No reader on what is not a ledger. */
        nd_ledger *bad = NULL;
        free(TAKE_PTR(error));
        char path[512];
        snprintf(path, sizeof path, "%s/nothing.sqlite", dir);
        ck_assert_int_lt(nd_ledger_open_reader(path, &bad, &error), 0);
        ck_assert_ptr_null(bad);
        ck_assert_ptr_nonnull(error);
}
END_TEST

/* A ledger past the size checked at open (1 MiB): audit entries with long details. */
static void make_large(const char *dir, char id[static ND_LEDGER_SESSION_ID_SIZE]) {
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        char detail[4001];
        memset(detail, 'x', sizeof detail - 1);
        detail[sizeof detail - 1] = '\0';
        ck_assert_int_eq(nd_ledger_set_bulk_load(l, true), 0);
        for (int i = 0; i < 400; i++)
                ck_assert_int_eq(nd_ledger_audit(l, T0_US + (uint64_t) i, 1000, 77, ":1.5", "SetDepth", "PEN1", detail), 0);
        run_session(l, "PEN1", "CART1", T0_US + 1000 * USEC_PER_SEC, id);
}

START_TEST(test_deferred_check) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *error = NULL;
        char id[ND_LEDGER_SESSION_ID_SIZE], path[512];
        nd_ledger *l = NULL, *reader = NULL;
        nd_ledger_verify_result v;
        start_buf b;
        int r;
        unsigned step = 0;

        make_large(dir, id);
        ck_assert_int_eq(nd_ledger_open_deferred(dir, &l, &error), 0);
        ck_assert(!nd_ledger_checked(l));
        /* Nothing is written before the check: audit entries wait, sessions are refused. */
        ck_assert_int_eq(nd_ledger_audit(l, T0_US + 5000 * USEC_PER_SEC, 0, 1, "needled", "LoadProfile", "PEN1", "p"), 0);
        ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN1", "CART2", T0_US + 6000 * USEC_PER_SEC)), -EAGAIN);
        ck_assert_ptr_nonnull(strstr(nd_ledger_last_error(l), "integrity check"));
        ck_assert_int_eq(nd_ledger_recover(l, T0_US), -EAGAIN);
        ck_assert_int_eq(nd_ledger_open_reader(nd_ledger_path(l), &reader, NULL), 0);
        while ((r = nd_ledger_check_step(reader, step)) > 0)
                step++;
        ck_assert_int_eq(r, 0);
        ck_assert_uint_ge(step, 4); /* audit, audit_head, cartridges, sessions */
        ck_assert_int_eq(nd_ledger_mark_checked(l), 1);
        ck_assert(nd_ledger_checked(l));
        ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN1", "CART2", T0_US + 6000 * USEC_PER_SEC)), 0);
        reader = nd_ledger_close(reader);
        l = nd_ledger_close(l);
        snprintf(path, sizeof path, "%s/" ND_LEDGER_FILE_NAME, dir);
        ck_assert_int_eq(nd_ledger_audit_verify(path, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        ck_assert_uint_eq(v.entries, 400 + 2 + 1 + 1); /* details, one session, the held entry, the new begin */

        /* Damage the middle: the open still succeeds (the header is fine), the check finds it, and
         * nothing was written to the file. */
        {
                int fd = open(path, O_RDWR);
                ck_assert_int_ge(fd, 0);
                off_t size = lseek(fd, 0, SEEK_END);
                char junk[4096];
                memset(junk, 0xa5, sizeof junk);
                ck_assert_int_eq(pwrite(fd, junk, sizeof junk, size / 2 / 4096 * 4096), (ssize_t) sizeof junk);
                close(fd);
        }
        size_t n_before = 0, n_after = 0;
        _cleanup_free_ void *before = read_all(path, &n_before);
        free(TAKE_PTR(error));
        ck_assert_int_eq(nd_ledger_open_deferred(dir, &l, &error), 0);
        ck_assert(!nd_ledger_checked(l));
        ck_assert_int_eq(nd_ledger_audit(l, T0_US + 7000 * USEC_PER_SEC, 0, 1, "needled", "LoadProfile", "PEN1", "q"), 0);
        ck_assert_int_eq(nd_ledger_open_reader(nd_ledger_path(l), &reader, NULL), 0);
        for (step = 0; (r = nd_ledger_check_step(reader, step)) > 0;)
                step++;
        ck_assert_int_eq(r, -EBADMSG);
        ck_assert_ptr_nonnull(strstr(nd_ledger_last_error(reader), "corrupt"));
        ck_assert_uint_eq(nd_ledger_drop_pending_audit(l, NULL, NULL), 1);
        reader = nd_ledger_close(reader);
        l = nd_ledger_close(l);
        _cleanup_free_ void *after = read_all(path, &n_after);
        ck_assert_uint_eq(n_before, n_after);
        ck_assert(memcmp(before, after, n_before) == 0);
}
END_TEST

/* Every documented filter is answered from an index: each table is searched by a key of the filter
 * (never scanned, not even along an index: the old pen query walked sessions_by_start), no sort. */
START_TEST(test_query_plans_use_indexes) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        static const struct {
                nd_ledger_query q;
                const char *index;
        } queries[] = {
                { ND_LEDGER_QUERY_HISTORY, "SEARCH sessions USING INDEX sessions_by_start (start_us>? AND start_us<?)" },
                { ND_LEDGER_QUERY_HISTORY_PEN,
                  "SEARCH sessions USING INDEX sessions_by_pen (pen_serial=? AND start_us>? AND start_us<?)" },
                { ND_LEDGER_QUERY_CARTRIDGE, "SEARCH sessions USING INDEX sessions_by_cartridge (cartridge_id=?)" },
        };

        for (size_t i = 0; i < ELEMENTSOF(queries); i++) {
                _cleanup_free_ char *plan = NULL;
                ck_assert_int_eq(nd_ledger_query_plan(l, queries[i].q, &plan), 0);
                ck_assert_msg(strstr(plan, queries[i].index), "query %zu: %s", i, plan);
                ck_assert_msg(!strstr(plan, "TEMP B-TREE"), "query %zu sorts: %s", i, plan);
                ck_assert_msg(!strstr(plan, "SCAN "), "query %zu scans: %s", i, plan);
        }
        ck_assert_int_eq(nd_ledger_query_plan(l, (nd_ledger_query) 99, &(char *) { NULL }), -EINVAL);
}
END_TEST

/* ---- the audit trail ---- */

/* The documented encoding (docs/ledger.md), written out independently of ledger.c. */
static void spec_text(char **buf, size_t *n, const char *s) {
        size_t k = strlen(s);
        char head[32];
        int h = snprintf(head, sizeof head, "t%zu:", k);
        *buf = realloc(*buf, *n + (size_t) h + k + 1);
        memcpy(*buf + *n, head, (size_t) h);
        memcpy(*buf + *n + h, s, k);
        (*buf)[*n + (size_t) h + k] = '\n';
        *n += (size_t) h + k + 1;
}

static void spec_audit_hash(int64_t seq, int64_t time_us, int64_t uid, int64_t pid, const char *actor,
                            const char *action, const char *object, const char *detail, const char *prev,
                            char out[static ND_SHA256_HEX_SIZE]) {
        char *buf = NULL;
        size_t n = 0;
        char ints[160];
        int k = snprintf(ints, sizeof ints, "needled-audit-v1\ni%" PRId64 "\ni%" PRId64 "\ni%" PRId64 "\ni%" PRId64 "\n",
                         seq, time_us, uid, pid);
        buf = malloc((size_t) k);
        memcpy(buf, ints, (size_t) k);
        n = (size_t) k;
        spec_text(&buf, &n, actor);
        spec_text(&buf, &n, action);
        spec_text(&buf, &n, object);
        spec_text(&buf, &n, detail);
        spec_text(&buf, &n, prev);
        nd_sha256_hex(buf, n, out);
        free(buf);
}


/* A session row's digest as docs/ledger.md describes it, written out independently of ledger.c:
 * the tag, then each column by its stored type (schema 2's columns only when not NULL). */
static void spec_row_digest(const char *dir, const char *id, bool ended, char out[static ND_SHA256_HEX_SIZE]) {
        static const char begin_cols[] = "id, pen_serial, cartridge_id, needles, profile_name, profile_yaml, profile_digest, "
                "limits_digest, label, owner_uid, owner_pid, owner_name, start_us, single_use, max_runtime_s";
        static const char end_cols[] = ", end_us, duration_s, strokes, max_depth_mm, max_speed_hz, max_temperature_c, "
                "max_current_ma, end_reason";
        _cleanup_free_ char *p = db_path(dir), *sql = NULL;
        sqlite3 *db;
        sqlite3_stmt *st;
        ck_assert_int_ge(asprintf(&sql, "SELECT %s%s, skin_type, area_cm2%s FROM sessions JOIN snapshots USING (snapshot_id) "
                                  "WHERE id = ?1", begin_cols, ended ? end_cols : "", ended ? ", punctures, density_per_cm2" : ""), 0);
        ck_assert_int_eq(sqlite3_open_v2(p, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
        ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
        char *buf = strdup(ended ? "needled-session-end-v1\n" : "needled-session-begin-v1\n");
        size_t n = strlen(buf);
        int fixed = ended ? 23 : 15;
        for (int i = 0; i < sqlite3_column_count(st); i++) {
                char num[64];
                switch (sqlite3_column_type(st, i)) {
                case SQLITE_INTEGER:
                        snprintf(num, sizeof num, "i%" PRId64 "\n", (int64_t) sqlite3_column_int64(st, i));
                        break;
                case SQLITE_FLOAT: {
                        double d = sqlite3_column_double(st, i);
                        uint64_t bits;
                        memcpy(&bits, &d, sizeof bits);
                        snprintf(num, sizeof num, "r%016" PRIx64 "\n", bits);
                        break;
                }
                case SQLITE_TEXT:
                        spec_text(&buf, &n, (const char *) sqlite3_column_text(st, i));
                        continue;
                default:
                        if (i >= fixed)
                                continue;
                        snprintf(num, sizeof num, "n\n");
                }
                buf = realloc(buf, n + strlen(num));
                memcpy(buf + n, num, strlen(num));
                n += strlen(num);
        }
        nd_sha256_hex(buf, n, out);
        free(buf);
        sqlite3_finalize(st);
        sqlite3_close(db);
}

/* Entry seq's stored hash is the documented hash of its fields as stored, with this detail text
 * and the previous entry's stored hash: what the entry says, whatever form it is stored in. */
static void assert_entry_detail(const char *dir, int64_t seq, const char *detail) {
        _cleanup_free_ char *p = db_path(dir);
        sqlite3 *db;
        sqlite3_stmt *st;
        char want[ND_SHA256_HEX_SIZE];
        ck_assert_int_eq(sqlite3_open_v2(p, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
        ck_assert_int_eq(sqlite3_prepare_v2(db, "SELECT a.time_us, a.uid, a.pid, a.actor, a.action, a.object, lower(hex(a.hash)), "
                                                "coalesce((SELECT lower(hex(b.hash)) FROM audit b WHERE b.seq = a.seq - 1), "
                                                "'0000000000000000000000000000000000000000000000000000000000000000') "
                                                "FROM audit a WHERE a.seq = ?1", -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_int64(st, 1, seq);
        ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
        spec_audit_hash(seq, sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2),
                        (const char *) sqlite3_column_text(st, 3), (const char *) sqlite3_column_text(st, 4),
                        (const char *) sqlite3_column_text(st, 5), detail, (const char *) sqlite3_column_text(st, 7), want);
        ck_assert_msg(STREQ(want, (const char *) sqlite3_column_text(st, 6)), "entry %" PRId64 " does not say '%s'", seq, detail);
        sqlite3_finalize(st);
        sqlite3_close(db);
}

/* The begin (or end) entry of session id says "row-sha256=<its row digest> REST". */
static void assert_session_detail(const char *dir, const char *id, bool ended, const char *rest) {
        char digest[ND_SHA256_HEX_SIZE], sql[256];
        _cleanup_free_ char *detail = NULL;
        spec_row_digest(dir, id, ended, digest);
        ck_assert_int_ge(asprintf(&detail, "row-sha256=%s %s", digest, rest), 0);
        snprintf(sql, sizeof sql, "SELECT %s FROM sessions WHERE id = '%s'", ended ? "end_seq" : "begin_seq", id);
        assert_entry_detail(dir, sql_int(dir, sql), detail);
}

static void make_trail(const char *dir, int extra_entries) {
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        char id[ND_LEDGER_SESSION_ID_SIZE];
        for (int i = 0; i < extra_entries; i++) {
                char detail[64];
                snprintf(detail, sizeof detail, "depth %d", i);
                ck_assert_int_eq(nd_ledger_audit(l, T0_US + (uint64_t) i, 1000, 77, ":1.5", "SetDepth", "PEN1", detail), 0);
        }
        run_session(l, "PEN1", "CART1", T0_US + 1000, id);
}

/* A start the pen refused is voided (issue 12 item 5): the row goes, the cartridge is as it was,
 * the trail keeps the attempt (begin and void entries) and verifies; only a session that has not
 * run may be voided. */
START_TEST(test_void_session) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);
        char id[ND_LEDGER_SESSION_ID_SIZE], sql[512], digest[ND_SHA256_HEX_SIZE], mid_hash[ND_SHA256_HEX_SIZE];
        _cleanup_free_ char *begin_text = NULL;
        int64_t begin_seq;
        uint64_t mid_seq;
        nd_ledger_verify_result v;
        nd_ledger_cartridge c;
        start_buf b;

        make_trail(dir, 1);
        v = verify_dir(dir);
        uint64_t anchor_seq = v.head_seq;
        char anchor[ND_SHA256_HEX_SIZE];
        memcpy(anchor, v.head_hash, sizeof anchor);
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);

                /* A cartridge the ledger had never seen: afterwards it still has not. */
                const nd_ledger_session_start *s = start_of(&b, "PEN1", "CARTV", T0_US + 5000);
                ck_assert_int_eq(nd_ledger_session_begin(l, s), 0);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CARTV", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_IN_USE);
                /* Schema 3 keeps the begin entry's detail as a stub of the row digest; the row is
                 * kept aside to be written back by hand below. */
                snprintf(sql, sizeof sql, "SELECT begin_seq FROM sessions WHERE id = '%s'", b.id);
                begin_seq = sql_int(dir, sql);
                snprintf(sql, sizeof sql, "SELECT typeof(detail) = 'blob' FROM audit WHERE seq = %" PRId64, begin_seq);
                ck_assert_int_eq(sql_int(dir, sql), 1);
                spec_row_digest(dir, b.id, false, digest);
                snprintf(sql, sizeof sql, "CREATE TABLE saved_row AS SELECT * FROM sessions WHERE id = '%s'", b.id);
                sql_on(dir, sql);
                ck_assert_msg(nd_ledger_session_void(l, b.id, T0_US + 5001, "motor start: the pen refused the command") == 0,
                              "%s", nd_ledger_last_error(l));
                /* The void stored the begin entry's text in full (its row is gone), the text its hash
                 * covers: the documented detail with the documented digest. */
                ck_assert_int_ge(asprintf(&begin_text, "row-sha256=%s pen=PEN1 cartridge=CARTV needles=12 profile=cheeks-acne "
                                          "profile-digest=aa11 limits-digest=bb22 label=appt-42 skin-type=none", digest), 0);
                snprintf(sql, sizeof sql, "SELECT detail FROM audit WHERE seq = %" PRId64 " AND typeof(detail) = 'text'",
                         begin_seq);
                _cleanup_free_ char *stored = sql_text(dir, sql);
                ck_assert_str_eq(stored, begin_text);
                assert_entry_detail(dir, begin_seq, begin_text);
                snprintf(sql, sizeof sql, "SELECT detail FROM audit WHERE action = 'session-void' AND object = '%s'", b.id);
                _cleanup_free_ char *void_text = sql_text(dir, sql);
                _cleanup_free_ char *void_want = NULL;
                ck_assert_int_ge(asprintf(&void_want, "row-sha256=%s pen=PEN1 cartridge=CARTV cartridge-state=fresh "
                                          "why=motor start: the pen refused the command", digest), 0);
                ck_assert_str_eq(void_text, void_want);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CARTV", &c), -ENOENT);
                nd_ledger_session got;
                ck_assert_int_eq(nd_ledger_session_get(l, b.id, &got), -ENOENT);
                nd_ledger_session *h = NULL;
                size_t n = 99;
                ck_assert_int_eq(nd_ledger_history(l, "PEN1", T0_US + 5000, 0, &h, &n), 0);
                ck_assert_uint_eq(n, 0);
                nd_ledger_session_array_free(h, n);
                /* Nothing more happens to it: no end, no second void. */
                ck_assert_int_eq(nd_ledger_session_end(l, b.id, T0_US + 5002, NULL, "stopped"), -ENOENT);
                ck_assert_int_eq(nd_ledger_session_void(l, b.id, T0_US + 5002, "again"), -ENOENT);
                memcpy(id, b.id, sizeof id);

                /* The single-use cartridge then runs once, and is spent after. */
                s = start_of(&b, "PEN1", "CARTV", T0_US + 6000);
                ck_assert_msg(nd_ledger_session_begin(l, s) == 0, "%s", nd_ledger_last_error(l));
                nd_ledger_stats st = stats_of(10, 1200, 1.25);
                ck_assert_int_eq(nd_ledger_session_end(l, b.id, T0_US + 7000, &st, "completed"), 0);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CARTV", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);
                ck_assert_uint_eq(c.sessions, 1);
                ck_assert_int_eq(c.first_used_us, T0_US + 6000);

                /* A reusable cartridge that has run before: in-use, its runtime and first use kept. */
                nd_ledger_session_start m = *start_of(&b, "PEN1", "MULTI", T0_US + 8000);
                m.single_use = false;
                ck_assert_int_eq(nd_ledger_session_begin(l, &m), 0);
                ck_assert_int_eq(nd_ledger_session_end(l, m.id, T0_US + 9000, &st, "stopped"), 0);
                m = *start_of(&b, "PEN1", "MULTI", T0_US + 10000);
                m.single_use = false;
                ck_assert_int_eq(nd_ledger_session_begin(l, &m), 0);
                /* An anchor between a begin and its void: the incremental check finds the begin
                 * before its walk. */
                ck_assert_int_eq(nd_ledger_audit(l, T0_US + 10000, 1000, 77, ":1.5", "SetDepth", "PEN1", "1.0"), 0);
                ck_assert_int_eq(nd_ledger_audit_head(l, &mid_seq, mid_hash), 0);
                ck_assert_int_eq(nd_ledger_session_void(l, m.id, T0_US + 10001, "set depth: the pen refused the command"), 0);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "MULTI", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_IN_USE);
                ck_assert_uint_eq(c.sessions, 1);
                ck_assert(c.runtime_s == 10);
                ck_assert_int_eq(c.first_used_us, T0_US + 8000);

                /* A row changed since its begin is not voided (that would hide the change). */
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN1", "CHANGED", T0_US + 10500)), 0);
                snprintf(sql, sizeof sql, "UPDATE sessions SET label = 'other' WHERE id = '%s'", b.id);
                sql_on(dir, sql);
                ck_assert_int_eq(nd_ledger_session_void(l, b.id, T0_US + 10501, "refused"), -EBADMSG);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CHANGED", &c), 0);
                snprintf(sql, sizeof sql, "UPDATE sessions SET label = 'appt-42' WHERE id = '%s'", b.id);
                sql_on(dir, sql);
                ck_assert_int_eq(nd_ledger_session_void(l, b.id, T0_US + 10502, "refused"), 0);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CHANGED", &c), -ENOENT);

                /* A known fresh cartridge stays known and fresh. */
                sql_on(dir, "INSERT INTO cartridges (id, needles, first_used_us, state) VALUES ('KNOWN', 12, 1, 'fresh')");
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN1", "KNOWN", T0_US + 11000)), 0);
                ck_assert_int_eq(nd_ledger_session_void(l, b.id, T0_US + 11001, "refused"), 0);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "KNOWN", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_FRESH);
                ck_assert_uint_eq(c.sessions, 0);

                /* What has run is ended, never voided: it stays as it was. */
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN2", "RAN", T0_US + 12000)), 0);
                st = stats_of(0.5, 40, 1.0);
                ck_assert_int_eq(nd_ledger_session_progress(l, b.id, T0_US + 12500, &st), 0);
                ck_assert_int_eq(nd_ledger_session_void(l, b.id, T0_US + 12600, "refused"), -EBUSY);
                ck_assert_int_eq(nd_ledger_session_end(l, b.id, T0_US + 13000, &st, "stopped"), 0);
                ck_assert_int_eq(nd_ledger_session_void(l, b.id, T0_US + 13001, "refused"), -EALREADY);
                ck_assert_int_eq(nd_ledger_session_void(l, "not-a-uuid", T0_US + 13001, "refused"), -EINVAL);
                ck_assert_int_eq(nd_ledger_session_void(l, b.id, T0_US + 13001, ""), -EINVAL);
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "RAN", &c), 0);
                ck_assert_uint_eq(c.sessions, 1);
        }
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit WHERE action = 'session-void'"), 4);
        snprintf(sql, sizeof sql, "SELECT count(*) FROM audit WHERE object = '%s' AND action = 'session-begin'", id);
        ck_assert_int_eq(sql_int(dir, sql), 1);
        assert_intact(dir);
        ck_assert_int_eq(verify_dir(dir).sessions, 4);
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, anchor_seq, anchor, &v), 0);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, mid_seq, mid_hash, &v), 0);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);

        /* The voided row written back by hand, exactly as it was, is found, in full and from both
         * anchors (after its begin; between another void's begin and void). */
        sql_on(dir, "INSERT INTO sessions SELECT * FROM saved_row");
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_BREAK_RECORD, "%s", v.message);
        ck_assert_ptr_nonnull(strstr(v.message, id));
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, anchor_seq, anchor, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_RECORD);
        snprintf(sql, sizeof sql, "DELETE FROM sessions WHERE id = '%s'; DROP TABLE saved_row", id);
        sql_on(dir, sql);
        assert_intact(dir);

        /* The void entry edited (its reason, its digest): the entry's hash. */
        snprintf(sql, sizeof sql, "UPDATE audit SET detail = replace(detail, 'why=motor', 'why=rotor') WHERE "
                 "action = 'session-void' AND object = '%s'", id);
        sql_on(dir, sql);
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_BREAK_HASH, "%s", v.message);
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, anchor_seq, anchor, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_HASH);
        snprintf(sql, sizeof sql, "UPDATE audit SET detail = replace(detail, 'why=rotor', 'why=motor') WHERE "
                 "action = 'session-void' AND object = '%s'", id);
        sql_on(dir, sql);
        assert_intact(dir);
        /* The begin entry stubbed again: a begin whose row is gone, not voided. */
        snprintf(sql, sizeof sql, "UPDATE audit SET detail = X'%.16s' WHERE seq = %" PRId64, digest, begin_seq);
        sql_on(dir, sql);
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_BREAK_RECORD, "%s", v.message);
        ck_assert_uint_eq(v.broken_seq, (uint64_t) begin_seq);
        snprintf(sql, sizeof sql, "UPDATE audit SET detail = '%s' WHERE seq = %" PRId64, begin_text, begin_seq);
        sql_on(dir, sql);
        assert_intact(dir);

        /* A session row deleted without a void is still a deletion. */
        sql_on(dir, "DELETE FROM sessions WHERE pen_serial = 'PEN2'");
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_BREAK_RECORD, "%s", v.message);
        ck_assert_ptr_nonnull(strstr(v.message, "deleted"));
}
END_TEST

/* Incremental verification from an anchor: the entries and sessions after it are checked, the
 * anchor itself must match, and a change before it is left to the full verification. */
START_TEST(test_verify_from_anchor) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);
        nd_ledger_verify_result v;
        char id[ND_LEDGER_SESSION_ID_SIZE], anchor[ND_SHA256_HEX_SIZE], sql[256];

        make_trail(dir, 3);                     /* entries 1-3, a session: 4 and 5 */
        v = verify_dir(dir);
        uint64_t anchor_seq = v.head_seq;
        memcpy(anchor, v.head_hash, sizeof anchor);
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                run_session(l, "PEN1", "CART2", T0_US + 9000 * USEC_PER_SEC, id);      /* 6 and 7 */
        }
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, anchor_seq, anchor, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        ck_assert_uint_eq(v.head_seq, 7);
        ck_assert_uint_eq(v.sessions, 1);       /* the session after the anchor only */
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, 0, NULL, &v), -EINVAL);

        /* A wrong anchor is refused. */
        char wrong[ND_SHA256_HEX_SIZE];
        memcpy(wrong, anchor, sizeof wrong);
        wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, anchor_seq, wrong, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_ANCHOR);

        /* A session after the anchor changed by hand is found. */
        snprintf(sql, sizeof sql, "UPDATE sessions SET max_depth_mm = 0.5 WHERE id = '%s'", id);
        sql_on(dir, sql);
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, anchor_seq, anchor, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_RECORD);

        /* An entry after the anchor changed by hand is found. */
        sql_on(dir, "UPDATE audit SET detail = 'x' WHERE seq = 6");
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, anchor_seq, anchor, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_HASH);
        ck_assert_uint_eq(v.broken_seq, 6);
}
END_TEST

START_TEST(test_audit_chain) {
        _cleanup_dir_ char *dir = make_dir();
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                uint64_t seq;
                char head[ND_SHA256_HEX_SIZE];
                ck_assert_int_eq(nd_ledger_audit_head(l, &seq, head), 0);
                ck_assert_uint_eq(seq, 0);
                ck_assert_str_eq(head, "0000000000000000000000000000000000000000000000000000000000000000");
                ck_assert_int_eq(nd_ledger_audit(l, T0_US, 0, 1, ":1.2", "ReloadLimits", "", "digest=abc"), 0);
                ck_assert_int_eq(nd_ledger_audit(l, T0_US + 1, 1000, 2, ":1.3", "interlock:over-temperature", "PEN1",
                                                 "42.0 C"), 0);
                ck_assert_int_eq(nd_ledger_audit(l, T0_US, 0, 1, "", "x", "", ""), -EINVAL);
                ck_assert_int_eq(nd_ledger_audit(l, T0_US, 0, 1, "a", "x", "", "\xff"), -EINVAL);
                ck_assert_int_eq(nd_ledger_audit(l, T0_US, 0, 1, "a", NULL, "", ""), -EINVAL);
                ck_assert_int_eq(nd_ledger_audit(l, UINT64_MAX, 0, 1, "a", "x", "", ""), -EINVAL);
                ck_assert_int_eq(nd_ledger_audit_head(l, &seq, head), 0);
                ck_assert_uint_eq(seq, 2);

                nd_ledger_verify_result v = verify_dir(dir);
                ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
                ck_assert_uint_eq(v.entries, 2);
                ck_assert_uint_eq(v.head_seq, 2);
                ck_assert_str_eq(v.head_hash, head);
        }
        /* The stored hashes follow the documented encoding. */
        char h1[ND_SHA256_HEX_SIZE], h2[ND_SHA256_HEX_SIZE];
        spec_audit_hash(1, (int64_t) T0_US, 0, 1, ":1.2", "ReloadLimits", "", "digest=abc",
                        "0000000000000000000000000000000000000000000000000000000000000000", h1);
        spec_audit_hash(2, (int64_t) T0_US + 1, 1000, 2, ":1.3", "interlock:over-temperature", "PEN1", "42.0 C", h1, h2);
        char sql[256];
        snprintf(sql, sizeof sql, "SELECT count(*) FROM audit WHERE (seq = 1 AND lower(hex(hash)) = '%s') OR "
                                  "(seq = 2 AND lower(hex(hash)) = '%s')",
                 h1, h2);
        ck_assert_int_eq(sql_int(dir, sql), 2);
}
END_TEST

/* Every column of the first, a middle and the last entry, changed with plain SQL. */
static const char *const tamper_columns[] = {
        "seq = seq + 1000", "time_us = time_us + 1", "uid = uid + 1", "pid = 0", "actor = ':1.666'",
        "action = 'Nothing'", "object = 'PEN9'", "detail = detail || ' '",
        /* schema 3: the hash is 32 bytes; the previous entry's hash is not stored twice */
        "hash = x'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'", "hash = zeroblob(32)",
};
#define TAMPER_ENTRIES 5 /* 3 audit calls + session begin + session end */

START_TEST(test_tamper_column) {
        _cleanup_dir_ char *dir = make_dir();
        size_t column = (size_t) _i / 3;
        int64_t seq = (int64_t[]) { 1, 3, TAMPER_ENTRIES }[_i % 3];
        char sql[256];

        make_trail(dir, TAMPER_ENTRIES - 2);
        assert_intact(dir);
        snprintf(sql, sizeof sql, "UPDATE audit SET %s WHERE seq = %" PRId64, tamper_columns[column], seq);
        sql_on(dir, sql);

        nd_ledger_verify_result v = verify_dir(dir);
        ck_assert_msg(v.broken != ND_LEDGER_INTACT, "%s on entry %" PRId64 " not detected", tamper_columns[column], seq);
        if (column == 0) {
                ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_SEQ);
                ck_assert_uint_eq(v.broken_seq, seq == TAMPER_ENTRIES ? (uint64_t) seq + 1000 : (uint64_t) seq + 1);
        } else if (seq == TAMPER_ENTRIES && strstr(tamper_columns[column], "object")) {
                /* The session entry now names a session that does not exist: its detail (derived
                 * from that session's row, schema 3) cannot be rebuilt. */
                ck_assert_msg(v.broken == ND_LEDGER_BREAK_RECORD, "%s: %s", nd_ledger_break_to_string(v.broken), v.message);
                ck_assert_uint_eq(v.broken_seq, (uint64_t) seq);
        } else {
                ck_assert_msg(v.broken == ND_LEDGER_BREAK_HASH, "%s: %s", nd_ledger_break_to_string(v.broken), v.message);
                ck_assert_uint_eq(v.broken_seq, (uint64_t) seq);
                ck_assert_uint_eq(v.entries, (uint64_t) seq - 1);
        }
        ck_assert_str_ne(v.message, "");
}
END_TEST

START_TEST(test_tamper_delete_insert_truncate) {
        _cleanup_dir_ char *dir = make_dir();
        nd_ledger_verify_result v;

        /* a middle entry deleted */
        make_trail(dir, 4);
        sql_on(dir, "DELETE FROM audit WHERE seq = 2");
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_SEQ);
        ck_assert_uint_eq(v.broken_seq, 3);
        ck_assert_ptr_nonnull(strstr(v.message, "missing"));

        /* the first entry deleted */
        sql_on(dir, "DELETE FROM audit; DELETE FROM sessions; DELETE FROM cartridges; "
                    "UPDATE audit_head SET count = 0, head_hash = '0000000000000000000000000000000000000000000000000000000000000000'");
        assert_intact(dir);
        make_trail(dir, 2);
        sql_on(dir, "DELETE FROM audit WHERE seq = 1");
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_SEQ);
        ck_assert_uint_eq(v.broken_seq, 2);
}
END_TEST

START_TEST(test_tamper_renumber) {
        _cleanup_dir_ char *dir = make_dir();
        nd_ledger_verify_result v;

        make_trail(dir, 3); /* 5 entries */

        /* Entry 2 deleted and the rest renumbered to close the gap: the chain link breaks. */
        sql_on(dir, "DELETE FROM audit WHERE seq = 2; UPDATE audit SET seq = seq - 1 WHERE seq > 2");
        v = verify_dir(dir);
        ck_assert_int_ne(v.broken, ND_LEDGER_INTACT);
        ck_assert_uint_eq(v.broken_seq, 2);
}
END_TEST

START_TEST(test_tamper_forged_tail) {
        _cleanup_dir_ char *dir = make_dir();
        nd_ledger_verify_result v;
        char sql[1024], forged[ND_SHA256_HEX_SIZE];

        make_trail(dir, 3); /* 5 entries */
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        char last[ND_SHA256_HEX_SIZE];
        memcpy(last, v.head_hash, sizeof last);

        /* An entry appended with a bad hash. */
        snprintf(sql, sizeof sql, "INSERT INTO audit VALUES (6, 1, 0, 0, 'x', 'Start', '', '', x'%s')",
                 "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc");
        sql_on(dir, sql);
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_HASH);
        ck_assert_uint_eq(v.broken_seq, 6);

        /* A well-forged entry (right hash, right link) but the head record not updated. */
        spec_audit_hash(6, 1, 0, 0, "x", "Start", "", "", last, forged);
        snprintf(sql, sizeof sql, "UPDATE audit SET hash = x'%s' WHERE seq = 6", forged);
        sql_on(dir, sql);
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_HEAD);
        ck_assert_uint_eq(v.entries, 6);

        /* A link to the wrong predecessor, with its own hash right. Schema 3 does not store the
         * previous hash a second time: the entry's hash, over the predecessor's, does not match. */
        char other[ND_SHA256_HEX_SIZE];
        spec_audit_hash(6, 1, 0, 0, "x", "Start", "", "", forged, other);
        snprintf(sql, sizeof sql, "UPDATE audit SET hash = x'%s' WHERE seq = 6", other);
        sql_on(dir, sql);
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_HASH);
        ck_assert_uint_eq(v.broken_seq, 6);

        /* The tail cut: the chain alone cannot see it, the head record does. */
        sql_on(dir, "DELETE FROM audit WHERE seq >= 5");
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_HEAD);
        ck_assert_uint_eq(v.entries, 4);
        ck_assert_ptr_nonnull(strstr(v.message, "removed from its end"));
}
END_TEST

/* Someone who rewrites the whole tail consistently (head included) defeats the chain; an anchor
 * kept outside the database does not let it pass. */
START_TEST(test_anchor) {
        _cleanup_dir_ char *dir = make_dir(), *other = make_dir();
        _cleanup_free_ char *p = db_path(dir), *q = db_path(other);
        nd_ledger_verify_result v;
        char sql[512];

        make_trail(dir, 3);
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        uint64_t anchor_seq = v.head_seq;
        char anchor[ND_SHA256_HEX_SIZE];
        memcpy(anchor, v.head_hash, sizeof anchor);
        ck_assert_int_eq(nd_ledger_audit_verify_anchored(p, anchor_seq, anchor, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        ck_assert_int_eq(nd_ledger_audit_verify_anchored(p, 1, "abc", &v), -EINVAL);

        /* An entry appended, then removed with the head record fixed up to match. */
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_int_eq(nd_ledger_audit(l, T0_US + 5000, 0, 1, ":1.1", "Stop", "PEN1", ""), 0);
        }
        v = verify_dir(dir);
        ck_assert_uint_eq(v.head_seq, 6);
        char anchor6[ND_SHA256_HEX_SIZE];
        memcpy(anchor6, v.head_hash, sizeof anchor6);
        snprintf(sql, sizeof sql, "DELETE FROM audit WHERE seq = 6; UPDATE audit_head SET count = 5, head_hash = "
                                  "(SELECT lower(hex(hash)) FROM audit WHERE seq = 5)");
        sql_on(dir, sql);
        assert_intact(dir); /* the honest limit of a chain inside the file it protects */
        ck_assert_int_eq(nd_ledger_audit_verify_anchored(p, 6, anchor6, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_ANCHOR);
        ck_assert_ptr_nonnull(strstr(v.message, "removed from its end"));

        /* A trail made anew: the anchored entry is not the same. */
        make_trail(other, 4);
        ck_assert_int_eq(nd_ledger_audit_verify_anchored(q, anchor_seq, anchor, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_ANCHOR);
        ck_assert_uint_eq(v.broken_seq, anchor_seq);
}
END_TEST

START_TEST(test_tamper_records) {
        _cleanup_dir_ char *dir = make_dir();
        nd_ledger_verify_result v;
        static const char *const edits[] = {
                "UPDATE sessions SET max_depth_mm = 0.5",
                "UPDATE sessions SET end_reason = 'stopped'",
                "UPDATE sessions SET pen_serial = 'PENX'",
                "UPDATE sessions SET end_us = NULL, end_reason = NULL",
                "PRAGMA foreign_keys=OFF; DELETE FROM cartridges",
                "DELETE FROM sessions",
                "INSERT INTO sessions SELECT '00000000-0000-4000-8000-000000000000', pen_serial, cartridge_id, needles, "
                "snapshot_id, label, owner_uid, owner_pid, owner_name, "
                "single_use, max_runtime_s, start_us, updated_us, end_us, duration_s, strokes, max_depth_mm, "
                "max_speed_hz, max_temperature_c, max_current_ma, end_reason, skin_type, area_cm2, punctures, "
                "density_per_cm2, begin_seq, end_seq FROM sessions",
                /* the same row inserted as if it had entries of its own */
                "INSERT INTO sessions SELECT '00000000-0000-4000-8000-000000000000', pen_serial, cartridge_id, needles, "
                "snapshot_id, label, owner_uid, owner_pid, owner_name, "
                "single_use, max_runtime_s, start_us, updated_us, end_us, duration_s, strokes, max_depth_mm, "
                "max_speed_hz, max_temperature_c, max_current_ma, end_reason, skin_type, area_cm2, punctures, "
                "density_per_cm2, 1000, 1001 FROM sessions",
                /* schema 3: the snapshot a session armed, in its own table, is covered too */
                "UPDATE snapshots SET profile_yaml = profile_yaml || ' '",
                "UPDATE snapshots SET profile_name = 'other'",
                "UPDATE snapshots SET limits_digest = 'ffff'",
                "INSERT INTO snapshots (profile_name, profile_yaml, profile_digest, limits_digest) VALUES ('a', 'b', 'c', 'd'); "
                "UPDATE sessions SET snapshot_id = last_insert_rowid()",
                "UPDATE sessions SET begin_seq = begin_seq + 1",
                "UPDATE sessions SET end_seq = NULL",
                "UPDATE cartridges SET state = 'in-use'",
                "UPDATE sessions SET strokes = strokes + 1",
                /* schema 2's columns are covered by the digests too, and clearing one is a change */
                "UPDATE sessions SET skin_type = 'I'",
                "UPDATE sessions SET skin_type = NULL",
                "UPDATE sessions SET area_cm2 = 100",
                "UPDATE sessions SET punctures = punctures + 1",
                "UPDATE sessions SET density_per_cm2 = 5",
                "UPDATE sessions SET density_per_cm2 = NULL",
        };
        for (size_t i = 0; i < ELEMENTSOF(edits); i++) {
                _cleanup_dir_ char *d = make_dir();
                make_trail(d, 0);
                sql_on(d, edits[i]);
                v = verify_dir(d);
                ck_assert_msg(v.broken == ND_LEDGER_BREAK_RECORD, "%s: %s %s", edits[i],
                              nd_ledger_break_to_string(v.broken), v.message);
        }
        /* A table of the trail dropped or altered. */
        {
                _cleanup_dir_ char *d = make_dir();
                make_trail(d, 0);
                sql_on(d, "DROP TABLE audit_head");
                v = verify_dir(d);
                ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_MALFORMED);
                ck_assert_ptr_nonnull(strstr(v.message, "altered"));
        }
        /* A running session's start is covered too. */
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                start_buf b;
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN1", "C", T0_US)), 0);
        }
        assert_intact(dir);
        sql_on(dir, "UPDATE snapshots SET limits_digest = 'ffff'");
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_RECORD);
        ck_assert_uint_eq(v.broken_seq, 1);
}
END_TEST

START_TEST(test_verify_while_open) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);
        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        char id[ND_LEDGER_SESSION_ID_SIZE];
        start_buf b;

        run_session(l, "PEN1", "CART1", T0_US, id);
        ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN1", "CART2", T0_US + 100)), 0);
        nd_ledger_stats st = stats_of(1, 10, 1.0);
        ck_assert_int_eq(nd_ledger_session_progress(l, b.id, T0_US + 200, &st), 0);

        /* The daemon's connection holds the WAL; committed entries live there, not yet in the file. */
        size_t n;
        _cleanup_free_ void *before = read_all(p, &n);
        nd_ledger_verify_result v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);
        ck_assert_uint_eq(v.entries, 3);
        ck_assert_uint_eq(v.sessions, 2);
        assert_same_bytes(before, n, p);

        /* The ledger keeps writing after a verification, and a second one sees it. */
        ck_assert_int_eq(nd_ledger_session_end(l, b.id, T0_US + 300, &st, "stopped"), 0);
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        ck_assert_uint_eq(v.entries, 4);

        /* ... and with the daemon gone. */
        l = nd_ledger_close(l);
        _cleanup_free_ void *closed = read_all(p, &n);
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        assert_same_bytes(closed, n, p);

        /* Files it cannot read. */
        ck_assert_int_eq(nd_ledger_audit_verify("/nonexistent/ledger.sqlite", &v), -ENOENT);
        ck_assert_ptr_nonnull(strstr(v.message, "/nonexistent/ledger.sqlite"));
        ck_assert_int_eq(nd_ledger_audit_verify(dir, &v), -EISDIR);
        sql_on(dir, "PRAGMA user_version = 99");
        ck_assert_int_eq(nd_ledger_audit_verify(p, &v), -ENOTSUP);
}
END_TEST

/* ---- a randomized mini-soak with crashes ---- */

typedef struct soak_session {
        char id[ND_LEDGER_SESSION_ID_SIZE];
        char cartridge[16];
        bool running;
} soak_session;

START_TEST(test_soak) {
        _cleanup_dir_ char *dir = make_dir();
        const bool slow = getenv("NEEDLED_TEST_VALGRIND") || getenv("NEEDLED_TEST_SANITIZED");
        const int ops = slow ? 600 : 3000;
        soak_session *sessions = calloc((size_t) ops, sizeof *sessions);
        size_t n_sessions = 0, crashes = 0, refused = 0;
        uint64_t now = T0_US;
        nd_ledger *l = open_ok(dir);

        ck_assert_ptr_nonnull(sessions);
        rng_state = 0x2545f4914f6cdd1du;
        for (int op = 0; op < ops; op++) {
                uint64_t dice = rng() % 100;
                now += 1 + rng() % USEC_PER_SEC;
                if (dice < 30) {
                        /* begin: a fresh cartridge, or one that may already have run */
                        start_buf b;
                        char cart[16];
                        snprintf(cart, sizeof cart, "K%" PRIu64, rng() % (uint64_t) (ops / 4));
                        bool used = false;
                        for (size_t i = 0; i < n_sessions; i++)
                                used |= STREQ(sessions[i].cartridge, cart);
                        int r = nd_ledger_session_begin(l, start_of(&b, rng() % 2 ? "PA" : "PB", cart, now));
                        if (used) {
                                ck_assert_int_eq(r, -ESTALE);
                                refused++;
                        } else {
                                ck_assert_msg(r == 0, "%s", nd_ledger_last_error(l));
                                soak_session *s = &sessions[n_sessions++];
                                memcpy(s->id, b.id, sizeof s->id);
                                snprintf(s->cartridge, sizeof s->cartridge, "%s", cart);
                                s->running = true;
                        }
                } else if (dice < 60 && n_sessions > 0) {
                        soak_session *s = &sessions[rng() % n_sessions];
                        nd_ledger_stats st = stats_of((double) (rng() % 1000), rng() % 100000, 1.0);
                        int r = nd_ledger_session_progress(l, s->id, now, &st);
                        ck_assert_int_eq(r, s->running ? 0 : -EALREADY);
                } else if (dice < 80 && n_sessions > 0) {
                        soak_session *s = &sessions[rng() % n_sessions];
                        nd_ledger_stats st = stats_of((double) (rng() % 1000), rng() % 100000, 1.1);
                        int r = nd_ledger_session_end(l, s->id, now, &st, "completed");
                        ck_assert_int_eq(r, s->running ? 0 : -EALREADY);
                        s->running = false;
                } else if (dice < 95) {
                        ck_assert_int_eq(nd_ledger_audit(l, now, 1000, 1, ":1.9", "SetSpeed", "PA", "120"), 0);
                } else {
                        /* crash: nothing is ended; the next start recovers */
                        nd_ledger_close(l);
                        l = open_ok(dir);
                        size_t running = 0;
                        for (size_t i = 0; i < n_sessions; i++)
                                if (sessions[i].running) {
                                        running++;
                                        sessions[i].running = false;
                                }
                        ck_assert_int_eq(nd_ledger_recover(l, now), (int) running);
                        crashes++;
                }
        }
        nd_ledger_close(l);
        l = open_ok(dir);
        ck_assert_int_ge(nd_ledger_recover(l, now + 1), 0);

        ck_assert_uint_gt(crashes, 0);
        ck_assert_uint_gt(refused, 0);
        /* No session missing, none running, no cartridge used twice. */
        for (size_t i = 0; i < n_sessions; i++) {
                nd_ledger_session s;
                ck_assert_int_eq(nd_ledger_session_get(l, sessions[i].id, &s), 0);
                ck_assert_uint_ne(s.end_us, 0);
                ck_assert_str_eq(s.cartridge_id, sessions[i].cartridge);
                nd_ledger_session_clear(&s);
                nd_ledger_cartridge c;
                ck_assert_int_eq(nd_ledger_cartridge_get(l, sessions[i].cartridge, &c), 0);
                ck_assert_uint_eq(c.sessions, 1);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);
        }
        nd_ledger_close(l);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM sessions"), (int64_t) n_sessions);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM (SELECT cartridge_id FROM sessions GROUP BY cartridge_id "
                                      "HAVING count(*) > 1)"), 0);
        nd_ledger_verify_result v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);
        ck_assert_uint_eq(v.sessions, n_sessions);
        free(sessions);
}
END_TEST


/* ---- schema 2: skin type, surface and dose ---- */

START_TEST(test_dose_columns) {
        _cleanup_dir_ char *dir = make_dir();
        char id[ND_LEDGER_SESSION_ID_SIZE], plain_id[ND_LEDGER_SESSION_ID_SIZE];
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                start_buf b;
                start_of(&b, "PEN1", "C1", T0_US);
                b.s.skin_type = "IV";
                b.s.area_cm2 = 60;
                ck_assert_msg(nd_ledger_session_begin(l, &b.s) == 0, "%s", nd_ledger_last_error(l));
                memcpy(id, b.id, sizeof id);

                nd_ledger_session s;
                ck_assert_int_eq(nd_ledger_session_get(l, id, &s), 0);
                ck_assert_str_eq(s.skin_type, "IV");
                ck_assert(s.area_cm2 == 60);
                ck_assert_uint_eq(s.stats.punctures, 0);
                ck_assert(s.stats.density_per_cm2 == 0);
                nd_ledger_session_clear(&s);

                nd_ledger_stats st = stats_of(30, 3600, 1.0);
                st.punctures = 3600 * 12;
                st.density_per_cm2 = 3600.0 * 12 / 60;
                ck_assert_int_eq(nd_ledger_session_progress(l, id, T0_US + 30 * USEC_PER_SEC, &st), 0);
                ck_assert_int_eq(nd_ledger_session_get(l, id, &s), 0);
                ck_assert_uint_eq(s.stats.punctures, 43200);
                ck_assert(s.stats.density_per_cm2 == 720);
                nd_ledger_session_clear(&s);

                st = stats_of(60, 7200, 1.0);
                st.punctures = 7200 * 12;
                st.density_per_cm2 = 7200.0 * 12 / 60;
                ck_assert_int_eq(nd_ledger_session_end(l, id, T0_US + 60 * USEC_PER_SEC, &st, "dose-reached"), 0);
                /* A session with no skin type and no surface. */
                run_session(l, "PEN1", "C2", T0_US + 100 * USEC_PER_SEC, plain_id);

                nd_ledger_session *h = NULL;
                size_t n = 0;
                ck_assert_int_eq(nd_ledger_history(l, NULL, 0, 0, &h, &n), 0);
                ck_assert_uint_eq(n, 2);
                ck_assert_str_eq(h[1].id, id);
                ck_assert_str_eq(h[1].skin_type, "IV");
                ck_assert_str_eq(h[1].reason, "dose-reached");
                ck_assert_uint_eq(h[1].stats.punctures, 86400);
                ck_assert(h[1].stats.density_per_cm2 == 1440);
                ck_assert(h[1].area_cm2 == 60);
                ck_assert_str_eq(h[0].skin_type, "");
                ck_assert(h[0].area_cm2 == 0);
                nd_ledger_session_array_free(h, n);

                /* Out-of-range figures are refused, not stored. */
                start_buf c;
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&c, "PEN1", "C3", T0_US + 200 * USEC_PER_SEC)), 0);
                st.density_per_cm2 = NAN;
                ck_assert_int_eq(nd_ledger_session_progress(l, c.id, T0_US + 201 * USEC_PER_SEC, &st), -EINVAL);
                st.density_per_cm2 = -1;
                ck_assert_int_eq(nd_ledger_session_progress(l, c.id, T0_US + 201 * USEC_PER_SEC, &st), -EINVAL);
                st.density_per_cm2 = 0;
                st.punctures = UINT64_MAX;
                ck_assert_int_eq(nd_ledger_session_progress(l, c.id, T0_US + 201 * USEC_PER_SEC, &st), -EINVAL);
        }
        assert_intact(dir);
        /* The audit trail names them: the entries' hashes cover these texts (stored as stubs of the
         * row digests, schema 3), with the row digests of the documented encoding. */
        assert_session_detail(dir, id, false, "pen=PEN1 cartridge=C1 needles=12 profile=cheeks-acne profile-digest=aa11 "
                                               "limits-digest=bb22 label=appt-42 skin-type=IV");
        assert_session_detail(dir, id, true, "reason=dose-reached pen=PEN1 cartridge=C1 duration-ms=60000 strokes=7200 "
                                              "punctures=86400");
        assert_session_detail(dir, plain_id, false, "pen=PEN1 cartridge=C2 needles=12 profile=cheeks-acne "
                                                     "profile-digest=aa11 limits-digest=bb22 label=appt-42 skin-type=none");
        /* Stored once: one snapshot for the three sessions, a stub of 8 bytes for each detail. */
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM snapshots"), 1);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit WHERE typeof(detail) = 'blob' AND length(detail) = 8"), 5);
}
END_TEST

/* tests/data/ledger-schema1.sqlite was written by needled's ledger before schema 2 (commit
 * d14ef18, tests/cli/test_audit.c): three finished sessions, one left running, 11 entries. */
START_TEST(test_migrate_schema1_ledger) {
        _cleanup_dir_ char *dir = make_dir();
        const char *root = getenv("NEEDLED_SOURCE_ROOT");
        ck_assert_msg(root, "NEEDLED_SOURCE_ROOT is not set");
        _cleanup_free_ char *src = NULL;
        ck_assert_int_ge(asprintf(&src, "%s/tests/data/ledger-schema1.sqlite", root), 0);
        size_t len;
        _cleanup_free_ void *bytes = read_all(src, &len);
        _cleanup_free_ char *path = db_path(dir);
        write_all(path, bytes, len);

        /* Read as it is, schema 1, by this build's verifier: intact. */
        ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), 1);
        nd_ledger_verify_result v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);
        ck_assert_uint_eq(v.entries, 11);
        ck_assert_uint_eq(v.sessions, 4);

        /* Opened: migrated, every row still there, the chain intact. */
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), ND_LEDGER_SCHEMA_VERSION);
                ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM sessions WHERE skin_type IS NULL AND punctures IS NULL"), 4);
                nd_ledger_session *h = NULL;
                size_t n = 0;
                ck_assert_int_eq(nd_ledger_history(l, NULL, 0, 0, &h, &n), 0);
                ck_assert_uint_eq(n, 4);
                for (size_t i = 0; i < n; i++) {
                        ck_assert_str_eq(h[i].skin_type, "");
                        ck_assert_uint_eq(h[i].stats.punctures, 0);
                        ck_assert(h[i].stats.density_per_cm2 == 0);
                        ck_assert_str_eq(h[i].profile_name, "forehead-lines");
                }
                ck_assert_str_eq(h[0].pen_serial, "PEN2");
                ck_assert_str_eq(h[0].reason, "");
                ck_assert_str_eq(h[1].reason, "completed");
                ck_assert_uint_eq(h[1].stats.strokes, 3600);
                nd_ledger_session_array_free(h, n);
                nd_ledger_cartridge c;
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "CART0", &c), 0);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_SPENT);
        }
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "after migration: %s", v.message);
        ck_assert_uint_eq(v.entries, 11);

        /* The old running session ends as a restart, a new session with the new columns runs
         * beside the old ones, and the whole trail verifies. */
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_int_eq(nd_ledger_recover(l, T0_US + 2000 * USEC_PER_SEC), 1);
                start_buf b;
                start_of(&b, "PEN1", "NEWCART", T0_US + 3000 * USEC_PER_SEC);
                b.s.skin_type = "V";
                b.s.area_cm2 = 25;
                ck_assert_int_eq(nd_ledger_session_begin(l, &b.s), 0);
                nd_ledger_stats st = stats_of(10, 1000, 0.5);
                st.punctures = 12000;
                st.density_per_cm2 = 480;
                ck_assert_int_eq(nd_ledger_session_end(l, b.id, T0_US + 3010 * USEC_PER_SEC, &st, "completed"), 0);
                /* Schema 1's single-use record still holds. */
                start_buf again;
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&again, "PEN1", "CART1", T0_US + 4000 * USEC_PER_SEC)),
                                 -ESTALE);
        }
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "after new sessions: %s", v.message);
        ck_assert_uint_eq(v.sessions, 5);

        /* An old row's new columns filled in by hand: a change the digests show. */
        sql_on(dir, "UPDATE sessions SET skin_type = 'VI' WHERE cartridge_id = 'CART0'");
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_RECORD);
}
END_TEST


/* A dump of a query's rows (each column quote()d), to compare a ledger before and after a change. */
static char *sql_dump(const char *dir, const char *sql) {
        _cleanup_free_ char *p = db_path(dir);
        sqlite3 *db;
        sqlite3_stmt *st;
        char *buf = NULL;
        size_t n = 0;
        FILE *f = open_memstream(&buf, &n);
        ck_assert_ptr_nonnull(f);
        ck_assert_int_eq(sqlite3_open_v2(p, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
        ck_assert_msg(sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK, "%s: %s", sql, sqlite3_errmsg(db));
        int rc;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                for (int i = 0; i < sqlite3_column_count(st); i++)
                        fprintf(f, "%s|", (const char *) sqlite3_column_text(st, i));
                fputc('\n', f);
        }
        ck_assert_int_eq(rc, SQLITE_DONE);
        sqlite3_finalize(st);
        sqlite3_close(db);
        fclose(f);
        return buf;
}

/* Every column of the sessions of schemas 2 and 3, by their values and types. */
#define DUMP_SESSIONS_COLUMNS \
        "quote(id), quote(pen_serial), quote(cartridge_id), quote(needles), quote(profile_name), quote(profile_yaml), " \
        "quote(profile_digest), quote(limits_digest), quote(label), quote(owner_uid), quote(owner_pid), quote(owner_name), " \
        "quote(single_use), quote(max_runtime_s), quote(start_us), quote(updated_us), quote(end_us), quote(duration_s), " \
        "quote(strokes), quote(max_depth_mm), quote(max_speed_hz), quote(max_temperature_c), quote(max_current_ma), " \
        "quote(end_reason), quote(skin_type), quote(area_cm2), quote(punctures), quote(density_per_cm2)"

static void copy_fixture(const char *dir, const char *name) {
        const char *root = getenv("NEEDLED_SOURCE_ROOT");
        ck_assert_msg(root, "NEEDLED_SOURCE_ROOT is not set");
        _cleanup_free_ char *src = NULL, *path = db_path(dir);
        ck_assert_int_ge(asprintf(&src, "%s/tests/data/%s", root, name), 0);
        size_t len;
        _cleanup_free_ void *bytes = read_all(src, &len);
        write_all(path, bytes, len);
}

/* tests/data/ledger-schema2.sqlite was written by the schema-2 code (tests/data/make-ledger-schema2.c):
 * rows and entries of schemas 1 and 2, 11 sessions (one running), 34 entries. Opening it converts
 * it to schema 3 in place: every value of every row is kept, every entry keeps its hash, and the
 * trail verifies to the same head, also from an anchor taken before the migration. */
START_TEST(test_migrate_schema2_ledger) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);
        copy_fixture(dir, "ledger-schema2.sqlite");

        ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), 2);
        nd_ledger_verify_result before = verify_dir(dir);
        ck_assert_msg(before.broken == ND_LEDGER_INTACT, "%s", before.message);
        ck_assert_uint_eq(before.entries, 34);
        ck_assert_uint_eq(before.sessions, 11);
        _cleanup_free_ char *sessions = sql_dump(dir, "SELECT " DUMP_SESSIONS_COLUMNS " FROM sessions ORDER BY rowid");
        _cleanup_free_ char *cartridges = sql_dump(dir, "SELECT quote(id), quote(needles), quote(first_used_us), quote(state) "
                                                        "FROM cartridges ORDER BY rowid");
        _cleanup_free_ char *entries = sql_dump(dir, "SELECT seq, quote(time_us), quote(uid), quote(pid), quote(actor), "
                                                     "quote(action), quote(object), hash FROM audit ORDER BY seq");
        _cleanup_free_ char *details = sql_dump(dir, "SELECT seq, detail FROM audit ORDER BY seq");
        _cleanup_free_ char *anchor20 = sql_dump(dir, "SELECT hash FROM audit WHERE seq = 20");
        anchor20[64] = '\0';

        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), 3);
                /* Through the reading API: one session with its snapshot, the history, a cartridge. */
                nd_ledger_session *h = NULL;
                size_t n = 0;
                ck_assert_int_eq(nd_ledger_history(l, NULL, 0, 0, &h, &n), 0);
                ck_assert_uint_eq(n, 11);
                ck_assert_str_eq(h[0].reason, "");                     /* the one left running */
                ck_assert_str_eq(h[0].label, "left running");
                ck_assert_str_eq(h[0].skin_type, "I");
                ck_assert_str_eq(h[0].profile_digest, "3f2b8c0e5d7a41f6b9e2c1d0a8f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5");
                nd_ledger_session got;
                ck_assert_int_eq(nd_ledger_session_get(l, h[0].id, &got), 0);
                ck_assert_str_eq(got.profile_yaml, "name: cheeks-acne\nindication: acne-scars\narea: cheeks\ndepth_mm: 1.25\n"
                                                   "duration_s: 600\n");
                nd_ledger_session_clear(&got);
                nd_ledger_session_array_free(h, n);
                nd_ledger_cartridge c;
                ck_assert_int_eq(nd_ledger_cartridge_get(l, "REUSE1", &c), 0);
                ck_assert_uint_eq(c.sessions, 2);
                ck_assert(c.runtime_s == 200);
                ck_assert_int_eq(c.state, ND_LEDGER_CARTRIDGE_IN_USE);
        }
        /* Every value as it was. */
        _cleanup_free_ char *sessions3 = sql_dump(dir, "SELECT " DUMP_SESSIONS_COLUMNS " FROM sessions JOIN snapshots "
                                                       "USING (snapshot_id) ORDER BY sessions.rowid");
        ck_assert_str_eq(sessions3, sessions);
        _cleanup_free_ char *cartridges3 = sql_dump(dir, "SELECT quote(id), quote(needles), quote(first_used_us), quote(state) "
                                                         "FROM cartridges ORDER BY rowid");
        ck_assert_str_eq(cartridges3, cartridges);
        _cleanup_free_ char *entries3 = sql_dump(dir, "SELECT seq, quote(time_us), quote(uid), quote(pid), quote(actor), "
                                                      "quote(action), quote(object), lower(hex(hash)) FROM audit ORDER BY seq");
        ck_assert_str_eq(entries3, entries);
        /* Each detail: kept as text, or a stub whose entry's hash covers the old text exactly. */
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM snapshots"), 5);
        ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit WHERE typeof(detail) = 'blob'"), 14);
        for (char *line = details, *next; line && *line; line = next) {
                next = strchr(line, '\n');
                *next++ = '\0';
                char *bar = strchr(line, '|');
                *bar = '\0';
                bar[strlen(bar + 1)] = '\0';    /* the dump's trailing '|' */
                assert_entry_detail(dir, strtoll(line, NULL, 10), bar + 1);
        }

        nd_ledger_verify_result v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "after migration: %s", v.message);
        ck_assert_uint_eq(v.entries, 34);
        ck_assert_uint_eq(v.sessions, 11);
        ck_assert_str_eq(v.head_hash, before.head_hash);        /* the anchor printed before still holds */
        ck_assert_int_eq(nd_ledger_audit_verify_anchored(p, before.head_seq, before.head_hash, &v), 0);
        ck_assert_int_eq(v.broken, ND_LEDGER_INTACT);
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, 20, anchor20, &v), 0);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "from anchor 20: %s", v.message);
        ck_assert_uint_eq(v.head_seq, 34);

        /* The ledger goes on: the running session recovered, a new one, all verified. */
        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                ck_assert_int_eq(nd_ledger_recover(l, T0_US + 20000 * USEC_PER_SEC), 1);
                char id[ND_LEDGER_SESSION_ID_SIZE];
                run_session(l, "PEN3", "AFTER3", T0_US + 21000 * USEC_PER_SEC, id);
                start_buf b;
                ck_assert_int_eq(nd_ledger_session_begin(l, start_of(&b, "PEN4", "S2CART0", T0_US + 22000 * USEC_PER_SEC)),
                                 -ESTALE);      /* spent before the migration, still spent */
        }
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "after new sessions: %s", v.message);
        ck_assert_uint_eq(v.sessions, 12);
        ck_assert_uint_eq(v.entries, 37);

        /* Changes after the migration still show: a snapshot, a row of schema 1, a derived entry. */
        sql_on(dir, "UPDATE snapshots SET profile_yaml = profile_yaml || '#' WHERE snapshot_id = 1");
        v = verify_dir(dir);
        ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_RECORD);
}
END_TEST

/* A schema-2 ledger changed by hand stays visibly changed through the migration. */
START_TEST(test_migrate_schema2_tampered) {
        static const struct {
                const char *sql;
                nd_ledger_break expect;
        } edits[] = {
                { "UPDATE sessions SET max_depth_mm = 9 WHERE cartridge_id = 'S2CART2'", ND_LEDGER_BREAK_RECORD },
                { "UPDATE sessions SET profile_yaml = 'x' WHERE cartridge_id = 'CART1'", ND_LEDGER_BREAK_RECORD },
                { "UPDATE audit SET detail = detail || ' ' WHERE seq = 14", ND_LEDGER_BREAK_HASH },
                { "UPDATE audit SET time_us = time_us + 1 WHERE seq = 16", ND_LEDGER_BREAK_HASH },
                { "UPDATE audit SET prev_hash = hash WHERE seq = 20", ND_LEDGER_BREAK_HASH },
                { "UPDATE audit SET prev_hash = 'x' WHERE seq = 20", ND_LEDGER_BREAK_MALFORMED },
                { "UPDATE audit SET hash = 'not a hash' WHERE seq = 21", ND_LEDGER_BREAK_MALFORMED },
                { "DELETE FROM audit WHERE seq = 22", ND_LEDGER_BREAK_SEQ },
                { "INSERT INTO sessions SELECT '00000000-0000-4000-8000-000000000000', pen_serial, cartridge_id, needles, "
                  "profile_name, profile_yaml, profile_digest, limits_digest, label, owner_uid, owner_pid, owner_name, "
                  "single_use, max_runtime_s, start_us, updated_us, end_us, duration_s, strokes, max_depth_mm, "
                  "max_speed_hz, max_temperature_c, max_current_ma, end_reason, skin_type, area_cm2, punctures, "
                  "density_per_cm2 FROM sessions WHERE cartridge_id = 'S2CART1'", ND_LEDGER_BREAK_RECORD },
        };
        for (size_t i = 0; i < ELEMENTSOF(edits); i++) {
                _cleanup_dir_ char *dir = make_dir();
                copy_fixture(dir, "ledger-schema2.sqlite");
                sql_on(dir, edits[i].sql);
                nd_ledger_verify_result v = verify_dir(dir);
                ck_assert_msg(v.broken != ND_LEDGER_INTACT, "%s: not seen before the migration", edits[i].sql);
                {
                        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                        ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), 3);
                }
                v = verify_dir(dir);
                ck_assert_msg(v.broken == edits[i].expect, "%s: %s: %s", edits[i].sql, nd_ledger_break_to_string(v.broken),
                              v.message);
        }
        /* A session whose cartridge row was deleted (foreign keys off) cannot be converted: the
         * open fails, naming the reason, and the file is left as it was. */
        {
                _cleanup_dir_ char *dir = make_dir();
                _cleanup_free_ char *p = db_path(dir), *error = NULL;
                copy_fixture(dir, "ledger-schema2.sqlite");
                sql_on(dir, "PRAGMA foreign_keys=OFF; DELETE FROM cartridges WHERE id = 'S2CART1'");
                size_t n;
                _cleanup_free_ void *before = read_all(p, &n);
                nd_ledger *l = NULL;
                ck_assert_int_lt(nd_ledger_open(dir, &l, &error), 0);
                ck_assert_ptr_null(l);
                ck_assert_msg(error && strstr(error, "FOREIGN KEY"), "%s", strempty(error));
                assert_same_bytes(before, n, p);
                ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), 2);
        }
        /* An entry relinked to another predecessor with its own hash recomputed: chain-broken,
         * before and after (the migration keeps that prev_hash, in audit_prev). */
        {
                _cleanup_dir_ char *dir = make_dir();
                _cleanup_free_ char *p = db_path(dir), *e = NULL;
                copy_fixture(dir, "ledger-schema2.sqlite");
                e = sql_dump(dir, "SELECT time_us, uid, pid, actor, action, object, detail FROM audit WHERE seq = 25");
                char *f[7], *cur = e;
                for (int i = 0; i < 7; i++) {
                        f[i] = cur;
                        cur = strchr(cur, '|');
                        *cur++ = '\0';
                }
                char forged[ND_SHA256_HEX_SIZE], sql[512];
                const char *zeros = "0000000000000000000000000000000000000000000000000000000000000000";
                spec_audit_hash(25, strtoll(f[0], NULL, 10), strtoll(f[1], NULL, 10), strtoll(f[2], NULL, 10), f[3], f[4],
                                f[5], f[6], zeros, forged);
                snprintf(sql, sizeof sql, "UPDATE audit SET prev_hash = '%s', hash = '%s' WHERE seq = 25", zeros, forged);
                sql_on(dir, sql);
                nd_ledger_verify_result v = verify_dir(dir);
                ck_assert_int_eq(v.broken, ND_LEDGER_BREAK_PREV);
                ck_assert_uint_eq(v.broken_seq, 25);
                {
                        _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
                }
                ck_assert_int_eq(sql_int(dir, "SELECT count(*) FROM audit_prev"), 2);   /* 25, and 26 after it */
                v = verify_dir(dir);
                ck_assert_msg(v.broken == ND_LEDGER_BREAK_PREV, "%s", v.message);
                ck_assert_uint_eq(v.broken_seq, 25);
        }
}
END_TEST

/* A schema-2 ledger with a voided start, as the schema-2 code wrote it (nd_ledger_session_void of
 * that code: the row deleted, the cartridge as it was, a session-void entry repeating the begin
 * digest; made here by hand on the schema-2 fixture's running session, which never ran, with the
 * documented hash), verifies as schema 2, is migrated, and verifies as schema 3: the begin entry
 * keeps its text (no row to rebuild it from), the void entry its text; anchors taken before the
 * migration hold, in full and incrementally; the row written back is found. */
START_TEST(test_migrate_schema2_voided) {
        _cleanup_dir_ char *dir = make_dir();
        _cleanup_free_ char *p = db_path(dir);
        static const char id[] = "e1caa5f3-d2f2-4785-a89a-d45767edda95";
        char sql[1024], hash[ND_SHA256_HEX_SIZE];
        nd_ledger_verify_result v;
        copy_fixture(dir, "ledger-schema2.sqlite");
        ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), 2);

        snprintf(sql, sizeof sql, "SELECT end_us IS NULL AND strokes = 0 AND duration_s = 0 FROM sessions WHERE id = '%s'", id);
        ck_assert_int_eq(sql_int(dir, sql), 1);
        snprintf(sql, sizeof sql, "SELECT substr(detail, 12, 64) FROM audit WHERE object = '%s' AND action = 'session-begin'", id);
        _cleanup_free_ char *digest = sql_text(dir, sql);
        snprintf(sql, sizeof sql, "SELECT pen_serial || ' ' || cartridge_id || ' ' || start_us FROM sessions WHERE id = '%s'", id);
        _cleanup_free_ char *row = sql_text(dir, sql);
        char pen[64], cart[64];
        int64_t start_us;
        ck_assert_int_eq(sscanf(row, "%63s %63s %" SCNd64, pen, cart, &start_us), 3);
        /* Its cartridge was new with it (first use = its start, no other session): it goes. */
        snprintf(sql, sizeof sql, "SELECT count(*) FROM sessions WHERE cartridge_id = '%s'", cart);
        ck_assert_int_eq(sql_int(dir, sql), 1);
        snprintf(sql, sizeof sql, "SELECT first_used_us FROM cartridges WHERE id = '%s'", cart);
        ck_assert_int_eq(sql_int(dir, sql), start_us);

        int64_t seq = sql_int(dir, "SELECT count FROM audit_head") + 1;
        _cleanup_free_ char *prev = sql_text(dir, "SELECT head_hash FROM audit_head");
        _cleanup_free_ char *detail = NULL;
        ck_assert_int_ge(asprintf(&detail, "row-sha256=%s pen=%s cartridge=%s cartridge-state=fresh why=motor start: "
                                  "the pen refused the command", digest, pen, cart), 0);
        spec_audit_hash(seq, start_us + 1, 0, 4242, "needled", "session-void", id, detail, prev, hash);
        snprintf(sql, sizeof sql,
                 "BEGIN; DELETE FROM sessions WHERE id = '%s'; DELETE FROM cartridges WHERE id = '%s'; "
                 "INSERT INTO audit (seq, time_us, uid, pid, actor, action, object, detail, prev_hash, hash) VALUES "
                 "(%" PRId64 ", %" PRId64 ", 0, 4242, 'needled', 'session-void', '%s', '%s', '%s', '%s'); "
                 "UPDATE audit_head SET count = %" PRId64 ", head_hash = '%s'; COMMIT",
                 id, cart, seq, start_us + 1, id, detail, prev, hash, seq, hash);
        sql_on(dir, sql);
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "schema 2: %s", v.message);
        ck_assert_uint_eq(v.entries, (uint64_t) seq);
        ck_assert_uint_eq(v.sessions, 10);

        {
                _cleanup_(nd_ledger_closep) nd_ledger *l = open_ok(dir);
        }
        ck_assert_int_eq(sql_int(dir, "PRAGMA user_version"), ND_LEDGER_SCHEMA_VERSION);
        snprintf(sql, sizeof sql, "SELECT count(*) FROM audit WHERE object = '%s' AND typeof(detail) = 'text'", id);
        ck_assert_int_eq(sql_int(dir, sql), 2);
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "schema 3: %s", v.message);
        ck_assert_uint_eq(v.entries, (uint64_t) seq);
        ck_assert_uint_eq(v.sessions, 10);
        ck_assert_str_eq(v.head_hash, hash);
        /* Anchors of before the migration: at the void (its begin before the walk), at the begin. */
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, (uint64_t) seq, hash, &v), 0);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, (uint64_t) seq - 1, prev, &v), 0);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);
        ck_assert_int_eq(nd_ledger_audit_verify_anchored(p, (uint64_t) seq, hash, &v), 0);
        ck_assert_msg(v.broken == ND_LEDGER_INTACT, "%s", v.message);

        /* The void entry edited: its hash. */
        sql_on(dir, "UPDATE audit SET detail = replace(detail, 'why=motor', 'why=rotor') WHERE action = 'session-void'");
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_BREAK_HASH, "%s", v.message);
        sql_on(dir, "UPDATE audit SET detail = replace(detail, 'why=rotor', 'why=motor') WHERE action = 'session-void'");
        assert_intact(dir);
        /* A row written back for the voided session (any row: it must not be there). */
        snprintf(sql, sizeof sql, "INSERT INTO cartridges (id, needles, first_used_us, state) VALUES ('%s', 12, %" PRId64
                 ", 'in-use'); INSERT INTO sessions (id, pen_serial, cartridge_id, needles, snapshot_id, label, owner_uid, "
                 "owner_pid, owner_name, single_use, max_runtime_s, start_us, updated_us, begin_seq) SELECT '%s', '%s', "
                 "'%s', 12, min(snapshot_id), '', 0, 0, ':1.1', 1, 0, %" PRId64 ", %" PRId64 ", %" PRId64 " FROM snapshots",
                 cart, start_us, id, pen, cart, start_us, start_us, seq - 1);
        sql_on(dir, sql);
        v = verify_dir(dir);
        ck_assert_msg(v.broken == ND_LEDGER_BREAK_RECORD, "%s", v.message);
        ck_assert_ptr_nonnull(strstr(v.message, id));
        ck_assert_int_eq(nd_ledger_audit_verify_from_anchor(p, (uint64_t) seq, hash, &v), 0);
        ck_assert_msg(v.broken == ND_LEDGER_BREAK_RECORD, "%s", v.message);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("ledger");
        TCase *tc;

        tc = tcase_create("open");
        tcase_add_test(tc, test_create_reopen);
        tcase_add_test(tc, test_migrate_from_version_0);
        tcase_add_test(tc, test_newer_version_refused);
        tcase_add_test(tc, test_foreign_database_refused);
        tcase_add_test(tc, test_corrupt_random_bytes);
        tcase_add_test(tc, test_corrupt_truncated);
        tcase_add_test(tc, test_missing_or_bad_dir);
        tcase_add_test(tc, test_readonly);
        tcase_add_test(tc, test_disk_full);
        suite_add_tcase(s, tc);

        tc = tcase_create("sessions");
        tcase_add_test(tc, test_begin_progress_end);
        tcase_add_test(tc, test_begin_bad_input);
        tcase_add_test(tc, test_single_use_across_restart);
        tcase_add_test(tc, test_reusable_cartridge);
        tcase_add_test(tc, test_void_session);
        tcase_add_test(tc, test_recover);
        tcase_add_test(tc, test_recover_after_kill);
        tcase_add_test(tc, test_history);
        tcase_add_test(tc, test_dose_columns);
        tcase_add_test(tc, test_migrate_schema1_ledger);
        tcase_add_test(tc, test_migrate_schema2_ledger);
        tcase_add_test(tc, test_migrate_schema2_tampered);
        tcase_add_test(tc, test_migrate_schema2_voided);
        tcase_add_test(tc, test_history_before_and_reader);
        tcase_add_test(tc, test_query_plans_use_indexes);
        tcase_add_test(tc, test_verify_from_anchor);
        /* The migration tests convert a dozen ledgers: longer than the default 4 s under the sanitizers. */
        tcase_set_timeout(tc, 120);
        suite_add_tcase(s, tc);

        /* A ledger past 1 MiB is written and checked: longer than the default 4 s under the
         * sanitizers and valgrind. */
        tc = tcase_create("deferred-check");
        tcase_add_test(tc, test_deferred_check);
        tcase_set_timeout(tc, 120);
        suite_add_tcase(s, tc);

        tc = tcase_create("audit");
        tcase_add_test(tc, test_audit_chain);
        tcase_add_loop_test(tc, test_tamper_column, 0, (int) ELEMENTSOF(tamper_columns) * 3);
        tcase_add_test(tc, test_tamper_delete_insert_truncate);
        tcase_add_test(tc, test_tamper_renumber);
        tcase_add_test(tc, test_tamper_forged_tail);
        tcase_add_test(tc, test_tamper_records);
        tcase_add_test(tc, test_anchor);
        tcase_add_test(tc, test_verify_while_open);
        /* test_tamper_records writes two dozen ledgers: longer than the default 4 s under the sanitizers. */
        tcase_set_timeout(tc, 120);
        suite_add_tcase(s, tc);

        tc = tcase_create("soak");
        tcase_add_test(tc, test_soak);
        tcase_set_timeout(tc, 300);
        suite_add_tcase(s, tc);
        return s;
}
