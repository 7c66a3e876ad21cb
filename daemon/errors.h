/* errors.h: the errno mapping of the named D-Bus errors of API v1 (their names: contract.h). */
#pragma once

#include <systemd/sd-bus.h>

#include "contract.h"


/* sd-bus's map between our error names and errnos, so that clients (needlectl) built with
 * sd-bus get a meaningful errno, and the daemon's handlers can never leak System.Error.*. */
extern const sd_bus_error_map nd_error_map[];

/* Registers nd_error_map with sd-bus (idempotent). Returns 0 or -errno. */
int nd_errors_register(void);
