/* pen-dbus.h: the org.needled1.Pen bus adapter (pen-dbus.c) over the pens of pen.h. */
#pragma once

#include "daemon.h"
#include "interlocks.h"

/* Registers the fallback vtable and node enumerator for /org/needled/pen/... */
int nd_pen_export_all(nd_daemon *d);

/* The named D-Bus error (org.needled1.Error.*) that answers a refusal; NULL for ALLOWED; Fault
 * for anything unknown. Static. */
const char *nd_pen_refusal_error_name(nd_interlock_refusal r);
