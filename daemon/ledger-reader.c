/* ledger-reader.c: a worker thread that runs the ledger's read queries off the event loop (see
 * ledger-reader.h). Jobs go in through a bounded queue and come back through an eventfd that is a
 * source on the loop; the mutex guards the two lists only and is never held during a query. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "digest.h"
#include "ledger-reader.h"
#include "log.h"
#include "profile.h"
#include "util.h"

/* The area of a profile snapshot, by its digest (SHA-256 of the snapshot's bytes, so one digest
 * is one area). History entries carry the area (the body site of an export) while the ledger
 * stores only the snapshot: each distinct profile is read (by a session's primary key) and parsed
 * once, not every session's snapshot. A clinic has tens of profiles; the worker's only. */
#define AREA_CACHE_SIZE 64u

typedef struct area_cache_entry {
        char digest[ND_SHA256_HEX_SIZE];        /* "" when unused */
        char *area;                             /* NULL: the snapshot names no area */
} area_cache_entry;

struct nd_ledger_reader {
        nd_ledger *db;                  /* the read-only connection; used by the worker only */
        sd_event_source *done_source;   /* the eventfd, on the loop */
        int done_fd;

        area_cache_entry areas[AREA_CACHE_SIZE];       /* the worker's */
        unsigned areas_next;                            /* the entry replaced next */

        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;
        pthread_cond_t wake;
        /* Guarded by lock. */
        nd_ledger_job *queue_head, *queue_tail; /* waiting, oldest first */
        nd_ledger_job *done_head, *done_tail;   /* finished, for the loop */
        unsigned in_flight;                     /* queued + running + done not yet handed back */
        bool stopping;
};

nd_ledger_job *nd_ledger_job_new(nd_ledger_job_kind kind) {
        nd_ledger_job *job = calloc(1, sizeof *job);
        if (job)
                job->kind = kind;
        return job;
}

nd_ledger_job *nd_ledger_job_free(nd_ledger_job *job) {
        if (!job)
                return NULL;
        free(job->pen_serial);
        if (job->areas)
                for (size_t i = 0; i < job->n_sessions; i++)
                        free(job->areas[i]);
        free(job->areas);
        nd_ledger_session_array_free(job->sessions, job->n_sessions);
        sd_bus_message_unref(job->message);
        free(job);
        return NULL;
}

static void job_list_free(nd_ledger_job *head) {
        while (head) {
                nd_ledger_job *next = head->next;
                nd_ledger_job_free(head);
                head = next;
        }
}

static uint64_t monotonic_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

/* The area named by the profile snapshot of session s (digest-cached): 0 with *ret the area or
 * NULL when the snapshot names none, -errno when the snapshot cannot be read. */
static int session_area(nd_ledger_reader *r, const nd_ledger_session *s, const char **ret) {
        const char *digest = strempty(s->profile_digest);
        for (unsigned i = 0; i < AREA_CACHE_SIZE; i++)
                if (r->areas[i].digest[0] && STREQ(r->areas[i].digest, digest)) {
                        *ret = r->areas[i].area;
                        return 0;
                }

        nd_ledger_session full = { .owner_uid = 0 };
        int k = nd_ledger_session_get(r->db, s->id, &full);
        if (k < 0)
                return k;
        char *area = NULL;
        nd_profile *p = NULL;
        nd_diags diags = ND_DIAGS_INIT;
        /* Without limits the parse reports "no-limits" (and -EINVAL) but reads every key. */
        k = nd_profile_parse(full.profile_yaml, strlen(strempty(full.profile_yaml)), NULL, NULL, &p, &diags);
        nd_diags_clear(&diags);
        if (k == -ENOMEM) {
                nd_ledger_session_clear(&full);
                return k;
        }
        if (p && p->has_area && p->area && p->area[0] && !(area = strdup(p->area)))
                k = -ENOMEM;
        nd_profile_free(p);
        nd_ledger_session_clear(&full);
        if (k == -ENOMEM)
                return k;

        area_cache_entry *e = &r->areas[r->areas_next];
        r->areas_next = (r->areas_next + 1) % AREA_CACHE_SIZE;
        free(e->area);
        e->area = area;
        snprintf(e->digest, sizeof e->digest, "%s", digest);
        *ret = area;
        return 0;
}

/* Fills job->areas for the sessions of a history job. */
static int history_areas(nd_ledger_reader *r, nd_ledger_job *job) {
        if (job->n_sessions == 0)
                return 0;
        job->areas = calloc(job->n_sessions, sizeof *job->areas);
        if (!job->areas)
                return -ENOMEM;
        for (size_t i = 0; i < job->n_sessions; i++) {
                const char *area = NULL;
                int k = session_area(r, &job->sessions[i], &area);
                if (k < 0)
                        return k;
                if (area && !(job->areas[i] = strdup(area)))
                        return -ENOMEM;
        }
        return 0;
}

static void job_run(nd_ledger_reader *r, nd_ledger_job *job) {
        uint64_t t0 = monotonic_us();

        switch (job->kind) {
        case ND_LEDGER_JOB_HISTORY:
                job->history.pen_serial = job->pen_serial;
                job->result = nd_ledger_history_query(r->db, &job->history, &job->sessions, &job->n_sessions);
                if (job->result >= 0)
                        job->result = history_areas(r, job);
                break;
        case ND_LEDGER_JOB_CARTRIDGE:
                job->result = nd_ledger_cartridge_get(r->db, job->cartridge_id, &job->cartridge);
                break;
        case ND_LEDGER_JOB_CHECK:
                job->result = nd_ledger_check_step(r->db, job->check_step);
                break;
        default:
                job->result = -EINVAL;
                break;
        }
        if (job->result < 0)
                snprintf(job->error, sizeof job->error, "%s", nd_ledger_last_error(r->db));
        job->query_us = monotonic_us() - t0;
}

static void *worker_main(void *userdata) {
        nd_ledger_reader *r = userdata;

        pthread_mutex_lock(&r->lock);
        for (;;) {
                while (!r->stopping && !r->queue_head)
                        pthread_cond_wait(&r->wake, &r->lock);
                if (r->stopping)
                        break;
                nd_ledger_job *job = r->queue_head;
                r->queue_head = job->next;
                if (!r->queue_head)
                        r->queue_tail = NULL;
                job->next = NULL;
                pthread_mutex_unlock(&r->lock);

                job_run(r, job);

                pthread_mutex_lock(&r->lock);
                if (r->done_tail)
                        r->done_tail->next = job;
                else
                        r->done_head = job;
                r->done_tail = job;
                /* A full eventfd counter cannot happen (one write per job, the loop drains it). */
                uint64_t one = 1;
                (void) !write(r->done_fd, &one, sizeof one);
        }
        pthread_mutex_unlock(&r->lock);
        return NULL;
}

/* On the loop: hands every finished job to its callback, outside the lock. */
static int on_done(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        nd_ledger_reader *r = userdata;
        uint64_t count;
        nd_ledger_job *done;

        (void) !read(fd, &count, sizeof count);
        pthread_mutex_lock(&r->lock);
        done = r->done_head;
        r->done_head = r->done_tail = NULL;
        for (nd_ledger_job *j = done; j; j = j->next)
                r->in_flight--;
        pthread_mutex_unlock(&r->lock);

        while (done) {
                nd_ledger_job *job = done;
                done = job->next;
                job->next = NULL;
                job->done(job, job->userdata);
        }
        return 0;
}

/* The worker runs time-shared and with every signal blocked: its queries must not compete with the
 * real-time loop for a CPU, and signals are the loop's (signalfd). */
static int start_worker(nd_ledger_reader *r) {
        pthread_attr_t attr;
        struct sched_param param = { .sched_priority = 0 };
        sigset_t all, old;
        int rc;

        rc = pthread_attr_init(&attr);
        if (rc != 0)
                return -rc;
        rc = pthread_attr_setinheritsched(&attr, PTHREAD_EXPLICIT_SCHED);
        if (rc == 0)
                rc = pthread_attr_setschedpolicy(&attr, SCHED_OTHER);
        if (rc == 0)
                rc = pthread_attr_setschedparam(&attr, &param);
        if (rc == 0) {
                sigfillset(&all);
                pthread_sigmask(SIG_SETMASK, &all, &old);
                rc = pthread_create(&r->thread, &attr, worker_main, r);
                pthread_sigmask(SIG_SETMASK, &old, NULL);
        }
        pthread_attr_destroy(&attr);
        if (rc != 0)
                return -rc;
        r->thread_started = true;
        return 0;
}

int nd_ledger_reader_new(sd_event *e, const char *db_path, nd_ledger_reader **ret, char **error) {
        _cleanup_(nd_ledger_reader_freep) nd_ledger_reader *r = NULL;
        pthread_mutexattr_t mattr;
        int rr;

        if (!e || !db_path || !ret)
                return -EINVAL;
        if (error)
                *error = NULL;
        r = calloc(1, sizeof *r);
        if (!r)
                return -ENOMEM;
        r->done_fd = -1;
        /* Priority inheritance: the real-time loop never waits behind a preempted worker that
         * holds the lock for a list update. */
        pthread_mutexattr_init(&mattr);
        (void) pthread_mutexattr_setprotocol(&mattr, PTHREAD_PRIO_INHERIT);
        rr = pthread_mutex_init(&r->lock, &mattr);
        pthread_mutexattr_destroy(&mattr);
        if (rr != 0) {
                free(TAKE_PTR(r));
                return -rr;
        }
        rr = pthread_cond_init(&r->wake, NULL);
        if (rr != 0) {
                pthread_mutex_destroy(&r->lock);
                free(TAKE_PTR(r));
                return -rr;
        }

        rr = nd_ledger_open_reader(db_path, &r->db, error);
        if (rr < 0)
                return rr;
        r->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (r->done_fd < 0)
                return -errno;
        rr = sd_event_add_io(e, &r->done_source, r->done_fd, EPOLLIN, on_done, r);
        if (rr < 0)
                return rr;
        (void) sd_event_source_set_description(r->done_source, "ledger-reader");
        rr = start_worker(r);
        if (rr < 0) {
                /* EPERM here is a seccomp filter that refuses sched_setscheduler(): the thread is
                 * created time-shared on purpose (see start_worker) and is not started otherwise. */
                if (error && asprintf(error, "cannot start its time-shared reader thread: %s", strerror(-rr)) < 0)
                        *error = NULL;
                return rr;
        }
        *ret = TAKE_PTR(r);
        return 0;
}

int nd_ledger_reader_submit(nd_ledger_reader *r, nd_ledger_job *job) {
        if (!r || !job || !job->done)
                return -EINVAL;
        pthread_mutex_lock(&r->lock);
        if (r->in_flight >= ND_LEDGER_READER_QUEUE_MAX && !job->unbounded) {
                pthread_mutex_unlock(&r->lock);
                return -EAGAIN;
        }
        job->next = NULL;
        if (r->queue_tail)
                r->queue_tail->next = job;
        else
                r->queue_head = job;
        r->queue_tail = job;
        r->in_flight++;
        pthread_cond_signal(&r->wake);
        pthread_mutex_unlock(&r->lock);
        return 0;
}

nd_ledger_reader *nd_ledger_reader_free(nd_ledger_reader *r) {
        if (!r)
                return NULL;
        if (r->thread_started) {
                pthread_mutex_lock(&r->lock);
                r->stopping = true;
                pthread_cond_signal(&r->wake);
                pthread_mutex_unlock(&r->lock);
                nd_ledger_interrupt(r->db);
                pthread_join(r->thread, NULL);
        }
        job_list_free(r->queue_head);
        job_list_free(r->done_head);
        sd_event_source_disable_unref(r->done_source);
        if (r->done_fd >= 0)
                close(r->done_fd);
        nd_ledger_close(r->db);
        for (unsigned i = 0; i < AREA_CACHE_SIZE; i++)
                free(r->areas[i].area);
        pthread_cond_destroy(&r->wake);
        pthread_mutex_destroy(&r->lock);
        free(r);
        return NULL;
}
