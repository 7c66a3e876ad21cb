/* ledger-reader.h: the ledger's read queries (history, cartridges) run on a worker thread with a
 * read-only connection of their own, so that the event loop, which runs the interlocks and the
 * pens' heartbeats, never waits on the disk. The loop submits a job and gets it back, with its
 * result, in the done callback, called on the loop. The worker never touches a job's message or
 * callback (sd-bus objects belong to the loop thread); it reads the inputs and writes the outputs. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "ledger.h"

/* Jobs queued or running at once; the next submission gets -EAGAIN (the bus layer answers
 * LimitsExceeded). A page of history takes milliseconds, so a client that hits this is flooding. */
#define ND_LEDGER_READER_QUEUE_MAX 16u

typedef enum nd_ledger_job_kind {
        ND_LEDGER_JOB_HISTORY,
        ND_LEDGER_JOB_CARTRIDGE,
        ND_LEDGER_JOB_CHECK,            /* one step of the integrity check (nd_ledger_check_step) */
} nd_ledger_job_kind;

typedef struct nd_ledger_job nd_ledger_job;
typedef struct nd_ledger_reader nd_ledger_reader;

/* Called on the loop with the job done (job->result says how); the callee frees the job. */
typedef void (*nd_ledger_job_done_t)(nd_ledger_job *job, void *userdata);

struct nd_ledger_job {
        nd_ledger_job_kind kind;

        /* In: set before submitting, read by the worker. */
        char *pen_serial;                       /* owned; history.pen_serial points here */
        nd_ledger_history_filter history;
        char cartridge_id[ND_LEDGER_NAME_MAX + 1];
        unsigned check_step;
        bool unbounded;                         /* queued even when the queue is full (the check) */

        /* Out: written by the worker, read in the done callback. */
        int result;                             /* 0 (check: 1 more steps, 0 done) or -errno
                                                 * (-ENOENT: no such cartridge) */
        char error[512];                        /* the ledger's message when result < 0 */
        nd_ledger_session *sessions;            /* owned (history) */
        size_t n_sessions;
        char **areas;                           /* owned (history): n_sessions entries, each the
                                                 * area of the session's profile snapshot, NULL when
                                                 * it names none (or could not be read) */
        nd_ledger_cartridge cartridge;          /* (cartridge) */
        uint64_t query_us;                      /* how long the query ran on the worker */

        /* The loop's: never touched by the worker. */
        sd_bus_message *message;                /* a reference, dropped by nd_ledger_job_free() */
        nd_ledger_job_done_t done;
        void *userdata;
        uint64_t tag;                           /* the submitter's, to match a completion */

        nd_ledger_job *next;
};

/* A new job of this kind (zeroed), or NULL when out of memory. */
nd_ledger_job *nd_ledger_job_new(nd_ledger_job_kind kind);
/* Frees a job, what it owns and its message reference; returns NULL. */
nd_ledger_job *nd_ledger_job_free(nd_ledger_job *job);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_ledger_job *, nd_ledger_job_free)

/* Opens a read-only connection to the ledger at db_path and starts the worker thread (time-shared,
 * whatever the loop's scheduling: a query must never compete with the interlocks for a CPU), with
 * its completions an event source on e. On failure *error (if not NULL) says why (caller frees). */
int nd_ledger_reader_new(sd_event *e, const char *db_path, nd_ledger_reader **ret, char **error);
/* Queues a job; on success the reader owns it until its done callback. -EAGAIN when
 * ND_LEDGER_READER_QUEUE_MAX jobs are queued or running; -EINVAL for a job without a callback. */
int nd_ledger_reader_submit(nd_ledger_reader *r, nd_ledger_job *job);
/* Interrupts the running query, stops the worker and frees every job not yet done without calling
 * its callback (their callers get no reply: only at shutdown). Returns NULL. */
nd_ledger_reader *nd_ledger_reader_free(nd_ledger_reader *r);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_ledger_reader *, nd_ledger_reader_free)
