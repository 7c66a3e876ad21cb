/* pen-dbus.h: the org.needled1.Pen bus adapter (pen-dbus.c) over the pens of pen.h. */
#pragma once

#include "daemon.h"

/* Registers the fallback vtable and node enumerator for /org/needled/pen/... */
int nd_pen_export_all(nd_daemon *d);
