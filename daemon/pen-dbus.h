/* pen-dbus.h: the org.needled1.Pen bus adapter (pen-dbus.c) over the pens of pen.h. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "daemon.h"

/* Registers the fallback vtable and node enumerator for /org/needled/pen/... */
int nd_pen_export_all(nd_daemon *d);

typedef struct nd_pen nd_pen;
typedef struct nd_ledger_stats nd_ledger_stats;
/* Emits SessionRecorded(session_id, figures) on the pen: the figures of a session that just
 * ended as the ledger recorded them (recorded false when the ledger could not take them). */
void nd_pen_emit_session_recorded(nd_pen *p, const char *session_id, const char *reason, uint64_t end_us,
                                  const nd_ledger_stats *stats, bool recorded);
