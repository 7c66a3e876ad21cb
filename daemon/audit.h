/* audit.h: the audit trail of who did what to which pen, in the ledger (or, when the ledger
 * cannot take it, in the journal as an error). */
#pragma once

#include <stdint.h>
#include <time.h>

#include "bouncer.h"
#include "daemon.h"
#include "util.h"

/* CLOCK_REALTIME now, in µs (the ledger's time base). */
static inline uint64_t nd_now_realtime_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

/* Appends an audit entry for a call by caller (NULL: the daemon itself) to the ledger; when the
 * ledger cannot take it, the entry goes to the journal with an error. */
void nd_audit(nd_daemon *d, const nd_caller *caller, const char *action, const char *object, const char *detail);
