/* ledger.h: the treatment ledger, an SQLite database in the state directory: treatment sessions,
 * single-use cartridges and a hash-chained audit trail (docs/ledger.md). One connection, used
 * from one thread (the daemon's event loop). The daemon keeps running when the ledger cannot be
 * opened: it then refuses Start with Storage ("no record, no treatment").
 *
 * Errors: every function returns 0 (or a count) on success and -errno on failure, with a
 * message for the journal in nd_ledger_last_error(). The errno classes callers act on:
 *   -ESTALE    the cartridge may not run (spent, running elsewhere, needle count changed):
 *              org.needled1.Error.CartridgeSpent
 *   -EINVAL    a bad argument (a bug in the caller or input that the bus layer let through)
 *   -ENOENT    no such session/cartridge
 *   -EALREADY  the session has already ended
 *   anything else (-ENOSPC disk full, -EROFS read-only or not permitted, -EBADMSG corrupt,
 *   -ENOTSUP schema newer than this build, -EBUSY locked by another process, -EIO): the ledger
 *   cannot record: org.needled1.Error.Storage. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "contract.h"
#include "digest.h"
#include "util.h"

#define ND_LEDGER_FILE_NAME "ledger.sqlite"
/* Where the daemon keeps it unless told otherwise (systemd StateDirectory=needled). */
#define ND_LEDGER_STATE_DIR_DEFAULT ND_STATE_DIR_DEFAULT
/* The schema this build writes; every older version is migrated on open, newer ones refused. */
#define ND_LEDGER_SCHEMA_VERSION 3
/* PRAGMA application_id of a needled ledger ("NDLG"), so another program's database is refused. */
#define ND_LEDGER_APPLICATION_ID 0x4e444c47

/* Text limits (bytes, without the NUL). Longer input is refused with -EINVAL, never truncated. */
#define ND_LEDGER_NAME_MAX 256          /* serials, cartridge ids, names, labels, digests */
#define ND_LEDGER_PROFILE_MAX ND_PROFILE_TEXT_MAX /* the profile snapshot (YAML) */
#define ND_LEDGER_AUDIT_TEXT_MAX 4096   /* each text field of an audit entry */
/* GetHistory never returns more than this many sessions (also the default for limit 0); a client
 * pages back with the filter key before (nd_ledger_history_filter.before_us). */
#define ND_LEDGER_HISTORY_LIMIT_MAX 1000u

/* A UUID in text form (8-4-4-4-12 lower-case hex) plus the NUL. */
#define ND_LEDGER_SESSION_ID_SIZE 37
#define ND_LEDGER_REASON_DAEMON_RESTART "daemon-restart"
/* The actor recorded for entries the daemon writes on its own behalf (recovery, session end). */
#define ND_LEDGER_ACTOR_DAEMON "needled"

typedef struct nd_ledger nd_ledger;

/* What a session has done so far; maxima are of the measured values. */
typedef struct nd_ledger_stats {
        double duration_s;
        uint64_t strokes;
        double max_depth_mm;
        double max_speed_hz;
        double max_temperature_c;
        double max_current_ma;
        uint64_t punctures;             /* strokes x the cartridge's needles (schema 2) */
        double density_per_cm2;         /* punctures / the profile's area_cm2; 0 without one (schema 2) */
} nd_ledger_stats;

/* What the daemon knows when a session starts. Strings are borrowed for the call. */
typedef struct nd_ledger_session_start {
        const char *id;                 /* from nd_ledger_session_id_new() */
        const char *pen_serial;
        const char *cartridge_id;
        uint32_t needles;               /* the cartridge's needle count */
        const char *profile_name;
        const char *profile_yaml;       /* snapshot of the armed profile */
        const char *profile_digest;
        const char *limits_digest;
        const char *label;              /* "" when the client gave none */
        uint32_t owner_uid;
        uint32_t owner_pid;
        const char *owner_name;         /* the owner's unique bus name */
        uint64_t start_us;              /* CLOCK_REALTIME, µs since the epoch */
        bool single_use;                /* limits: cartridge.single_use */
        uint32_t cartridge_max_runtime_s; /* limits: cartridge.max_runtime_s; 0: no cap */
        const char *skin_type;          /* Fitzpatrick "I".."VI", or NULL/"" when none was given */
        double area_cm2;                /* the profile's treated surface; 0: none */
} nd_ledger_session_start;

/* A session as recorded. Owns its strings: free with nd_ledger_session_clear(). */
typedef struct nd_ledger_session {
        char id[ND_LEDGER_SESSION_ID_SIZE];
        char *pen_serial;
        char *cartridge_id;
        uint32_t needles;
        char *profile_name;
        char *profile_yaml;             /* only from nd_ledger_session_get(); NULL in history */
        char *profile_digest;
        char *limits_digest;
        char *label;
        uint32_t owner_uid;
        uint32_t owner_pid;
        char *owner_name;
        uint64_t start_us;
        uint64_t end_us;                /* 0 while running */
        uint64_t updated_us;            /* last progress (or start, or end) */
        nd_ledger_stats stats;
        char *reason;                   /* "" while running */
        bool single_use;
        uint32_t cartridge_max_runtime_s;
        char *skin_type;                /* "" when none was given, or for a session recorded before schema 2 */
        double area_cm2;                /* 0: none (or recorded before schema 2) */
} nd_ledger_session;

typedef enum nd_ledger_cartridge_state {
        ND_LEDGER_CARTRIDGE_FRESH,      /* known, never run (not written by this version) */
        ND_LEDGER_CARTRIDGE_IN_USE,     /* has run and may run again (or is running) */
        ND_LEDGER_CARTRIDGE_SPENT,      /* may never run again */
} nd_ledger_cartridge_state;

typedef struct nd_ledger_cartridge {
        char id[ND_LEDGER_NAME_MAX + 1];
        uint32_t needles;
        nd_ledger_cartridge_state state;
        uint64_t first_used_us;
        double runtime_s;               /* sum of its sessions' durations */
        uint64_t sessions;
} nd_ledger_cartridge;

/* What nd_ledger_audit_verify() found; the first problem only. */
typedef enum nd_ledger_break {
        ND_LEDGER_INTACT,
        ND_LEDGER_BREAK_HASH,           /* an entry does not hash to its stored hash: edited */
        ND_LEDGER_BREAK_PREV,           /* prev_hash is not the previous entry's hash: removed/inserted
                                         * (schemas 1 and 2; from schema 3 prev_hash is not stored twice and
                                         * such a change shows as ND_LEDGER_BREAK_HASH) */
        ND_LEDGER_BREAK_SEQ,            /* a gap in the sequence numbers: entries removed */
        ND_LEDGER_BREAK_HEAD,           /* the head record disagrees with the trail: tail cut or head edited */
        ND_LEDGER_BREAK_RECORD,         /* a session or cartridge row disagrees with the trail */
        ND_LEDGER_BREAK_MALFORMED,      /* a value of the wrong type where the trail needs another */
        ND_LEDGER_BREAK_ANCHOR,         /* the entry of a hash kept elsewhere differs (or is gone): rewritten */
} nd_ledger_break;

typedef struct nd_ledger_verify_result {
        nd_ledger_break broken;
        uint64_t entries;               /* audit entries checked and found good */
        uint64_t sessions;              /* session rows checked against the trail */
        uint64_t broken_seq;            /* the first bad entry; 0 when none or not an entry */
        uint64_t head_seq;              /* last entry of the trail as read */
        char head_hash[ND_SHA256_HEX_SIZE];
        char message[512];              /* what is wrong (or why the file could not be read) */
} nd_ledger_verify_result;

/* Opens (creating if needed) STATE_DIR/ledger.sqlite and migrates it to the current schema.
 * On failure *ret stays NULL, *error (if error is not NULL) gets a message naming the path
 * and the problem (caller frees), and nothing on disk has been changed or deleted. */
int nd_ledger_open(const char *state_dir, nd_ledger **ret, char **error);
/* Audit entries held in memory while a deferred integrity check runs (nd_ledger_audit). */
#define ND_LEDGER_PENDING_AUDIT_MAX 1024u

/* As nd_ledger_open(), without reading every page first when the file needs no write to be
 * opened (ours, this schema, WAL): its integrity check is left to the caller, table by table with
 * nd_ledger_check_step() on a reader connection (nd_ledger_open_reader), off the loop. Until
 * nd_ledger_mark_checked(), nothing is written: a session cannot begin, progress or end and
 * recovery waits (-EAGAIN, docs/ledger.md), and audit entries are held in memory, in order.
 * A file that needs writing (new, older schema) is checked in full here, as nd_ledger_open() does. */
int nd_ledger_open_deferred(const char *state_dir, nd_ledger **ret, char **error);
/* Whether the file has passed its integrity check (always, after nd_ledger_open()). */
bool nd_ledger_checked(const nd_ledger *l);
/* Checks the step'th table and its indexes (PRAGMA quick_check(TABLE)). Returns 1 when it is
 * intact and there are more steps, 0 when there was no such table (all are done), -EBADMSG when
 * it is corrupt, or another -errno; the message is in nd_ledger_last_error(). */
int nd_ledger_check_step(nd_ledger *l, unsigned step);
/* The check passed: writes the held audit entries (in order, synced) and allows writes. Returns
 * how many were written, or -errno. */
int nd_ledger_mark_checked(nd_ledger *l);
typedef void (*nd_ledger_pending_audit_fn)(uint64_t time_us, uint32_t uid, uint32_t pid, const char *actor,
                                           const char *action, const char *object, const char *detail,
                                           void *userdata);
/* The check failed: hands every held audit entry to fn (for the journal) and forgets it. Returns
 * how many there were. */
size_t nd_ledger_drop_pending_audit(nd_ledger *l, nd_ledger_pending_audit_fn fn, void *userdata);

/* Closes the ledger; returns NULL. */
nd_ledger *nd_ledger_close(nd_ledger *l);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_ledger *, nd_ledger_close)

/* The database file's path (owned by the ledger). */
const char *nd_ledger_path(const nd_ledger *l);
/* The message of the last failure on this ledger (owned by the ledger, "" when none). */
const char *nd_ledger_last_error(const nd_ledger *l);

/* Writes a fresh random (version 4) UUID into out. Returns 0 or -errno. */
int nd_ledger_session_id_new(char out[static ND_LEDGER_SESSION_ID_SIZE]);

/* Closes every session left running by a daemon that died, as "daemon-restart" (end time: its
 * last progress update), spends its cartridge and audits it; call once after opening. Returns
 * how many sessions it closed, or -errno. */
int nd_ledger_recover(nd_ledger *l, uint64_t now_us);

/* Records a session that is about to start, its cartridge's use and an audit entry, in one
 * transaction synced to disk before it returns 0. Only then may the motor start.
 * -ESTALE when the cartridge may not run. */
int nd_ledger_session_begin(nd_ledger *l, const nd_ledger_session_start *s);

/* Periodic update of a running session's figures (about once a second). Not synced: a power
 * loss may lose the updates since the last synced write (docs/ledger.md). */
int nd_ledger_session_progress(nd_ledger *l, const char *id, uint64_t now_us, const nd_ledger_stats *stats);

/* Records the end of a session (final figures, or the last progress ones when stats is NULL)
 * and spends its cartridge when single use (or past its runtime cap); audited, synced. */
int nd_ledger_session_end(nd_ledger *l, const char *id, uint64_t end_us, const nd_ledger_stats *stats,
                          const char *reason);

/* Voids a session that never ran (the pen refused to start it: docs/ledger.md), in one
 * transaction synced to disk: its row is removed, its cartridge is put back as it was before
 * nd_ledger_session_begin() (no other session: fresh, a row the begin created removed; else in-use)
 * and a "session-void" audit entry records it (the begin digest, pen, cartridge, why). The
 * "session-begin" entry stays: the trail keeps every attempt, the sessions table only treatments.
 * -ENOENT for no such session, -EALREADY when it has ended, -EBUSY when it has run (strokes or
 * duration recorded): those are ended, never voided. */
int nd_ledger_session_void(nd_ledger *l, const char *id, uint64_t void_us, const char *why);

/* Reads one session, profile snapshot included, into *ret (caller clears). -ENOENT if unknown. */
int nd_ledger_session_get(nd_ledger *l, const char *id, nd_ledger_session *ret);
/* Frees what a session owns and zeroes it. */
void nd_ledger_session_clear(nd_ledger_session *s);
/* Frees an array from nd_ledger_history(). */
void nd_ledger_session_array_free(nd_ledger_session *a, size_t n);

/* Sessions newest first, of one pen (pen_serial NULL: all) started at or after since_us (0: all),
 * at most limit (0 or above ND_LEDGER_HISTORY_LIMIT_MAX: that maximum). *ret is the caller's
 * (nd_ledger_session_array_free()); profile_yaml is not filled in. */
int nd_ledger_history(nd_ledger *l, const char *pen_serial, uint64_t since_us, uint32_t limit,
                      nd_ledger_session **ret, size_t *ret_n);

/* A history query; 0 / NULL fields do not filter. */
typedef struct nd_ledger_history_filter {
        const char *pen_serial;         /* one pen's sessions */
        uint64_t since_us;              /* started at or after */
        uint64_t before_us;             /* started strictly before (0: no bound) */
        uint32_t limit;                 /* 0 or above ND_LEDGER_HISTORY_LIMIT_MAX: that maximum */
} nd_ledger_history_filter;

/* Sessions newest first that pass the filter, each query answered from an index (docs/ledger.md).
 * *ret is the caller's (nd_ledger_session_array_free()); profile_yaml is not filled in. */
int nd_ledger_history_query(nd_ledger *l, const nd_ledger_history_filter *f, nd_ledger_session **ret,
                            size_t *ret_n);

/* The read queries, for nd_ledger_query_plan(). */
typedef enum nd_ledger_query {
        ND_LEDGER_QUERY_HISTORY,        /* history without a pen filter (since, before, limit) */
        ND_LEDGER_QUERY_HISTORY_PEN,    /* one pen's history */
        ND_LEDGER_QUERY_CARTRIDGE,      /* a cartridge and its sessions' totals */
} nd_ledger_query;

/* SQLite's plan for a read query (EXPLAIN QUERY PLAN, one step a line) into *ret (caller frees):
 * tests check that every filter is answered from an index. */
int nd_ledger_query_plan(nd_ledger *l, nd_ledger_query q, char **ret);

/* Opens the ledger at db_path read-only (PRAGMA query_only), for queries run on another thread
 * than the writer's connection (WAL lets them run beside it). Never creates, checks or migrates
 * the file: open the writer (nd_ledger_open) first. Only the reading functions may be used on it
 * (nd_ledger_history*, nd_ledger_cartridge_get, nd_ledger_session_get). On failure *ret stays
 * NULL and *error (if not NULL) says why (caller frees). */
int nd_ledger_open_reader(const char *db_path, nd_ledger **ret, char **error);

/* Makes the query running on this connection (on another thread) fail soon with -EINTR; the
 * one call that may be made from another thread than the connection's user. */
void nd_ledger_interrupt(nd_ledger *l);

/* What the ledger knows of a cartridge. -ENOENT when it has never been used. */
int nd_ledger_cartridge_get(nd_ledger *l, const char *id, nd_ledger_cartridge *ret);
/* "fresh", "in-use" or "spent" (static string). */
const char *nd_ledger_cartridge_state_to_string(nd_ledger_cartridge_state s);

/* Appends an audit entry, synced. actor: the caller's bus name (or "needled"); action: the method
 * or "interlock:<code>"; object: pen serial or ""; detail: free text (may be ""). */
int nd_ledger_audit(nd_ledger *l, uint64_t time_us, uint32_t uid, uint32_t pid, const char *actor,
                    const char *action, const char *object, const char *detail);
/* The last entry's sequence number (0 when empty) and hash (64 zeros when empty), for anchoring
 * the trail outside the database (e.g. in the journal). */
int nd_ledger_audit_head(nd_ledger *l, uint64_t *ret_seq, char ret_hash[static ND_SHA256_HEX_SIZE]);

/* Verifies the audit trail of the database at db_path, and the session and cartridge rows against
 * it, opening the file read-only (the daemon may have it open). Returns 0 when it could read the
 * trail (ret->broken says whether it is intact) or -errno when it could not (ret->message says why). */
int nd_ledger_audit_verify(const char *db_path, nd_ledger_verify_result *ret);
/* The same, and entry anchor_seq must have the hash anchor_hash: a head printed by an earlier
 * verification and kept outside the database exposes a trail rewritten as a whole. */
int nd_ledger_audit_verify_anchored(const char *db_path, uint64_t anchor_seq, const char *anchor_hash,
                                    nd_ledger_verify_result *ret);
/* Incremental: verifies only from entry anchor_seq (which must hash to anchor_hash: a head printed
 * by an earlier verification) to the head, and the session rows those entries recorded; a nightly
 * check then costs what the day added. What lies before the anchor is trusted to the earlier
 * verification that printed it. */
int nd_ledger_audit_verify_from_anchor(const char *db_path, uint64_t anchor_seq, const char *anchor_hash,
                                       nd_ledger_verify_result *ret);
/* A short name for a break kind ("intact", "hash-mismatch", ...; static string). */
const char *nd_ledger_break_to_string(nd_ledger_break b);

/* Caps the database at this many pages (0: SQLite's default cap). Tests use it to make the disk
 * "full"; a deployment could use it to bound the ledger's size. Returns 0 or -errno. */
int nd_ledger_set_max_pages(nd_ledger *l, uint32_t pages);

/* Bulk loading of test ledgers (tests/bench/make-ledger): from now on no transaction waits for the
 * disk (PRAGMA synchronous=OFF), so a power loss may lose or corrupt what was written. Never in the
 * daemon. Returns 0 or -errno. */
int nd_ledger_set_bulk_load(nd_ledger *l, bool on);
