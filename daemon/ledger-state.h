/* ledger-state.h: the ledger's start-up: opened without reading all of it, checked in the background. */
#pragma once

#include <systemd/sd-bus.h>

typedef struct nd_daemon nd_daemon;

/* Opens the ledger (d->ledger, d->ledger_reader) and starts its integrity check on the reader's
 * thread; until it passes the ledger records nothing and Start is refused with Storage. A ledger
 * that fails it is closed (d->ledger NULL, d->ledger_error says why). */
void nd_ledger_state_open(nd_daemon *d);

/* "checking" (the background integrity check has not passed yet: nothing is recorded, Start is
 * refused), "ok", or "unavailable" (LedgerError says why). */
const char *nd_ledger_state_name(const nd_daemon *d);
/* Manager properties LedgerState and LedgerError. */
int nd_ledger_state_property_state(sd_bus *bus, const char *path, const char *interface, const char *property,
                                   sd_bus_message *reply, void *userdata, sd_bus_error *error);
int nd_ledger_state_property_error(sd_bus *bus, const char *path, const char *interface, const char *property,
                                   sd_bus_message *reply, void *userdata, sd_bus_error *error);
