/* manager.h: the Manager object on /org/needled (manager.c): the limits in force, profile
 * validation, the installed profiles, the pens' list; history and cartridge queries are in
 * history.h, the Simulator in simulator.h. */
#pragma once

#include <stdbool.h>
#include <systemd/sd-bus.h>

#include "daemon.h"
#include "diag.h"
#include "profile.h"
#include "safety-limits.h"

/* Exports the Manager (and the Simulator with simulation on) and the ObjectManager. */
int nd_manager_export(nd_daemon *d);
/* Loads (or reloads) the limits file. On success the new limits are in force; on failure the
 * old ones stay and error (if not NULL) receives "path:line:column: message". Returns 0 or
 * -errno (-EINVAL invalid, -ENOENT missing, ...). Emits PropertiesChanged. */
int nd_manager_load_limits(nd_daemon *d, bool at_startup, char **error);

/* Message builders, also used by the pen's adapter (pen-dbus.c): a profile's keys into an open
 * a{sv} (with_extras adds the operator's texts, notes and aftercare, for GetProfiles), violations
 * as a(sss), the limits as a{sv} mirroring the YAML. Return what sd-bus returns. */
int nd_manager_append_profile_fields(sd_bus_message *m, const nd_profile *p, bool with_extras);
int nd_manager_append_violations(sd_bus_message *m, const nd_diags *diags);
int nd_manager_append_limits(sd_bus_message *m, const nd_limits *l);
