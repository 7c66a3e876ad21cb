/* audit.c: audit entries to the ledger, or to the journal when the ledger cannot take them. */
#include <assert.h>
#include <errno.h>
#include <unistd.h>

#include "audit.h"
#include "ledger.h"
#include "log.h"

void nd_audit(nd_daemon *d, const nd_caller *caller, const char *action, const char *object, const char *detail) {
        assert(d && action);
        const char *actor = caller && caller->name ? caller->name : ND_LEDGER_ACTOR_DAEMON;
        uint32_t uid = caller ? caller->uid : (uint32_t) geteuid();
        uint32_t pid = caller ? caller->pid : (uint32_t) getpid();
        int r = d->ledger ? nd_ledger_audit(d->ledger, nd_now_realtime_us(), uid, pid, actor, action, strempty(object),
                                            strempty(detail))
                          : -ENODEV;
        if (r < 0)
                nd_log_full(LOG_ERR, (const char *const[]) { "NEEDLED_EVENT=audit-lost", NULL },
                            "audit entry not recorded (%s): actor=%s uid=%u pid=%u action=%s object=%s detail=%s",
                            d->ledger ? nd_ledger_last_error(d->ledger) : "no ledger", actor, uid, pid, action,
                            strempty(object), strempty(detail));
}
