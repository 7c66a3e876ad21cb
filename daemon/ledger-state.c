/* ledger-state.c: opening the ledger at start-up without reading all of it: the integrity check runs
 * table by table on the ledger reader's thread, and the ledger records nothing (no session starts)
 * until it has passed; a corrupt ledger is then closed, as one found corrupt at open (docs/ledger.md). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon.h"
#include "ledger-reader.h"
#include "ledger-state.h"
#include "log.h"
#include "pen.h"
#include "util.h"

static uint64_t clock_us(clockid_t id) {
        struct timespec ts;
        clock_gettime(id, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static void ledger_recover(nd_daemon *d) {
        int r = nd_ledger_recover(d->ledger, clock_us(CLOCK_REALTIME));
        if (r < 0)
                nd_log_error("could not close the sessions left by an earlier run: %s", nd_ledger_last_error(d->ledger));
        else if (r > 0)
                nd_log_full(LOG_WARNING, (const char *const[]) { "NEEDLED_EVENT=sessions-recovered", NULL },
                            "%d session(s) were running when needled last stopped: closed as daemon-restart, "
                            "their cartridges spent", r);
}

static void log_dropped_audit(uint64_t time_us, uint32_t uid, uint32_t pid, const char *actor, const char *action,
                              const char *object, const char *detail, void *userdata) {
        nd_log_full(LOG_ERR, (const char *const[]) { "NEEDLED_EVENT=audit-lost", NULL },
                    "audit entry not recorded (the ledger failed its integrity check): time=%llu actor=%s uid=%u "
                    "pid=%u action=%s object=%s detail=%s",
                    (unsigned long long) time_us, actor, uid, pid, action, object, detail);
}

const char *nd_ledger_state_name(const nd_daemon *d) {
        if (!d->ledger)
                return "unavailable";
        return nd_ledger_checked(d->ledger) ? "ok" : "checking";
}

int nd_ledger_state_property_state(sd_bus *bus, const char *path, const char *interface, const char *property,
                                   sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", nd_ledger_state_name(userdata));
}

int nd_ledger_state_property_error(sd_bus *bus, const char *path, const char *interface, const char *property,
                                   sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        const nd_daemon *d = userdata;
        return sd_bus_message_append(reply, "s", d->ledger ? "" : strempty(d->ledger_error));
}

static void announce(nd_daemon *d) {
        if (d->bus)
                (void) sd_bus_emit_properties_changed(d->bus, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "LedgerState",
                                                      "LedgerError", NULL);
}

static void check_done(nd_ledger_job *job, void *userdata) {
        _cleanup_(nd_ledger_job_freep) nd_ledger_job *owned = job;
        nd_daemon *d = userdata;
        uint64_t elapsed_us = clock_us(CLOCK_MONOTONIC) - d->ledger_check_started_us;
        int r;

        if (!d->ledger)
                return;
        if (job->result > 0) {
                job->check_step++;
                job->result = 0;
                r = nd_ledger_reader_submit(d->ledger_reader, job);
                if (r >= 0) {
                        TAKE_PTR(owned);
                        return;
                }
                snprintf(job->error, sizeof job->error, "%s: cannot go on with the integrity check: %s",
                         nd_ledger_path(d->ledger), strerror(-r));
                job->result = r;
        }
        if (job->result == 0) {
                r = nd_ledger_mark_checked(d->ledger);
                if (r < 0)
                        nd_log_error("the audit entries made during the integrity check could not be written: %s",
                                     nd_ledger_last_error(d->ledger));
                nd_log_full(LOG_INFO, (const char *const[]) { "NEEDLED_EVENT=ledger-checked", NULL },
                            "the ledger passed its integrity check (%u tables) in %.2f s: sessions may start",
                            job->check_step, (double) elapsed_us / 1e6);
                ledger_recover(d);
                announce(d);
                return;
        }
        /* Corrupt (or unreadable): as if nd_ledger_open() had refused it. Nothing was written. */
        free(d->ledger_error);
        d->ledger_error = strdup(job->error);
        nd_log_full(LOG_ERR, (const char *const[]) { "NEEDLED_EVENT=ledger-unavailable", NULL },
                    "the treatment ledger failed its integrity check (%s): no session can start until it is "
                    "repaired or replaced", job->error);
        (void) nd_ledger_drop_pending_audit(d->ledger, log_dropped_audit, d);
        d->ledger_reader = nd_ledger_reader_free(d->ledger_reader);
        d->ledger = nd_ledger_close(d->ledger);
        /* The reader dropped the cartridge lookups it had: without a ledger they are done at once. */
        nd_pen_cartridge_lookup_all(d);
        announce(d);
}

void nd_ledger_state_open(nd_daemon *d) {
        _cleanup_free_ char *reader_error = NULL;
        int r;

        d->ledger_check_started_us = clock_us(CLOCK_MONOTONIC);
        r = nd_ledger_open_deferred(d->state_dir, &d->ledger, &d->ledger_error);
        if (r < 0) {
                nd_log_full(LOG_ERR, (const char *const[]) { "NEEDLED_EVENT=ledger-unavailable", NULL },
                            "the treatment ledger cannot be used (%s): no session can start until it can",
                            strempty(d->ledger_error));
                return;
        }
        r = nd_ledger_reader_new(d->event, nd_ledger_path(d->ledger), &d->ledger_reader, &reader_error);
        if (r < 0) {
                free(d->ledger_reader_error);
                d->ledger_reader_error = reader_error ? TAKE_PTR(reader_error) : strdup(strerror(-r));
                nd_log_error("the ledger's history cannot be read off the loop (%s): GetHistory and GetCartridge "
                             "answer Storage", strempty(d->ledger_reader_error));
        }
        if (nd_ledger_checked(d->ledger)) {
                ledger_recover(d);
                return;
        }
        nd_ledger_job *job = d->ledger_reader ? nd_ledger_job_new(ND_LEDGER_JOB_CHECK) : NULL;
        if (job) {
                job->unbounded = true;
                job->done = check_done;
                job->userdata = d;
                r = nd_ledger_reader_submit(d->ledger_reader, job);
                if (r >= 0) {
                        nd_log_info("checking the ledger's integrity in the background; sessions start once it passes");
                        return;
                }
                nd_ledger_job_free(job);
        }
        /* No thread to check it on: check it here, whatever it costs, rather than not at all. */
        unsigned step = 0;
        while ((r = nd_ledger_check_step(d->ledger, step)) > 0)
                step++;
        nd_ledger_job fake = { .check_step = step, .result = r };
        if (r < 0)
                snprintf(fake.error, sizeof fake.error, "%s", nd_ledger_last_error(d->ledger));
        nd_ledger_job *copy = nd_ledger_job_new(ND_LEDGER_JOB_CHECK);
        if (!copy) {
                d->ledger = nd_ledger_close(d->ledger);
                return;
        }
        *copy = fake;
        check_done(copy, d);
}
