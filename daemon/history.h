/* history.h: the Manager's ledger queries (history.c): GetHistory and GetCartridge, answered
 * from the ledger reader's thread (ledger-reader.h). */
#pragma once

#include <stdbool.h>
#include <systemd/sd-bus.h>

#include "bouncer.h"

/* GetHistory, once the bouncer has decided (an nd_auth_done_fn with the daemon as userdata). */
void nd_history_get_history_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                       const nd_caller *caller, void *userdata);
/* GetCartridge (its authorization is the bouncer's table's, in manager.c). */
int nd_history_method_get_cartridge(sd_bus_message *m, void *userdata, sd_bus_error *error);
