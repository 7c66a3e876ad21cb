/* pen.h: org.needled1.Pen objects, one per connected pen: the treatment state machine, the
 * interlocks checked on every telemetry sample, session ownership, telemetry fan-out. */
#pragma once

#include <stdbool.h>
#include <systemd/sd-bus.h>

#include "daemon.h"
#include "safety-limits.h"
#include "penmodel.h"
#include "profile.h"
#include "transport.h"

typedef enum nd_pen_state {
        ND_PEN_IDLE,
        ND_PEN_ARMED,
        ND_PEN_RUNNING,
        ND_PEN_PAUSED,
        ND_PEN_FAULT,
} nd_pen_state;

/* The kebab name of a state ("idle", "armed", ...). */
const char *nd_pen_state_to_string(nd_pen_state s);

/* Takes ownership of transport and starts opening the pen behind it. The pen appears on the
 * bus once identified; a pen that cannot be identified is logged and dropped. model is the
 * simulated pen's model (a reference is taken), NULL for hardware. add_call (may be NULL) is
 * answered with the pen's path once identified, or with an error; on a failure returned here
 * the caller answers it. */
int nd_pen_attach(nd_daemon *d, nd_transport *transport, nd_penmodel *model, sd_bus_message *add_call);

/* Whether the pen is on the bus (identified), and whether a session is in progress. */
bool nd_pen_is_exported(const nd_pen *p);
bool nd_pen_in_session(const nd_pen *p);

/* Unplugs a simulated pen; remove_call is answered once it is gone. -EINVAL for hardware. */
int nd_pen_unplug(nd_pen *p, sd_bus_message *remove_call);

/* Asks the pen for its cartridge and answers call once the Cartridge property is up to date.
 * Returns 1 (answered later) or what sd_bus_reply_method_errorf returns. */
int nd_pen_refresh_cartridge(nd_pen *p, sd_bus_message *call);

/* The pen's object path (owned by the pen). */
const char *nd_pen_get_path(const nd_pen *p);
/* The pen's serial (owned by the pen). */
const char *nd_pen_get_serial(const nd_pen *p);
/* The simulated pen's model (borrowed), NULL for hardware. */
nd_penmodel *nd_pen_get_model(const nd_pen *p);
/* The simulated pen's transport (borrowed), NULL for hardware. */
nd_transport *nd_pen_get_transport(const nd_pen *p);
/* The connected pen at object path, or NULL. */
nd_pen *nd_pen_find_by_path(nd_daemon *d, const char *path);

/* The limits were replaced (old is still valid during the call): a running session that is
 * no longer within them is stopped with reason limits-changed. */
void nd_pen_limits_changed(nd_pen *p, const nd_limits *old);

/* Stops every motor at once and ends every session with reason (shutdown). */
void nd_pen_stop_all(nd_daemon *d, const char *reason);
/* Motor stops sent and not yet acknowledged, over all pens. */
unsigned nd_pen_stops_in_flight(const nd_daemon *d);

/* Removes every pen (daemon shutdown): ends their sessions with reason, frees them. */
void nd_pen_free_all(nd_daemon *d, const char *reason);

/* Registers the fallback vtable and node enumerator for /org/needled/pen/... */
int nd_pen_export_all(nd_daemon *d);

/* Appends an audit entry for a call by caller (NULL: the daemon itself) to the ledger; when the
 * ledger cannot take it, the entry goes to the journal with an error. */
void nd_pen_audit(nd_daemon *d, const nd_caller *caller, const char *action, const char *object, const char *detail);

/* Helpers shared with manager.c. */
int nd_manager_append_profile_fields(sd_bus_message *m, const nd_profile *p, bool with_extras);
int nd_manager_append_violations(sd_bus_message *m, const nd_diags *diags);
int nd_manager_append_limits(sd_bus_message *m, const nd_limits *l);

/* Simulator object (simulator.c). */
int nd_simulator_export(nd_daemon *d);

/* History methods of the Manager (history.c, from the ledger). */
int nd_history_method_get_history(sd_bus_message *m, void *userdata, sd_bus_error *error);
int nd_history_method_get_cartridge(sd_bus_message *m, void *userdata, sd_bus_error *error);
