/* pen-dbus.h: the org.needled1.Pen bus adapter (pen-dbus.c) over the pens of pen.h. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "daemon.h"
#include "interlocks.h"

/* Registers the fallback vtable and node enumerator for /org/needled/pen/... */
int nd_pen_export_all(nd_daemon *d);

/* The named D-Bus error (org.needled1.Error.*) that answers a refusal; NULL for ALLOWED; Fault
 * for anything unknown. Static. */
const char *nd_pen_refusal_error_name(nd_interlock_refusal r);

typedef struct nd_pen nd_pen;
typedef struct nd_ledger_stats nd_ledger_stats;
/* Emits SessionRecorded(session_id, figures) on the pen: the figures of a session that just
 * ended as the ledger recorded them (recorded false when the ledger could not take them). */
void nd_pen_emit_session_recorded(nd_pen *p, const char *session_id, const char *reason, uint64_t end_us,
                                  const nd_ledger_stats *stats, bool recorded);

/* Of the property names (NULL-terminated, edited in place), keeps those whose value differs from
 * the one last announced (or never announced) and remembers the values; returns how many stay. */
size_t nd_pen_keep_changed_properties(nd_pen *p, const char **names);
/* Remembers every property's current value as announced (InterfacesAdded carried them). */
void nd_pen_remember_announced(nd_pen *p);
