/* ledger-state.h: the ledger's start-up: opened without reading all of it, checked in the background. */
#pragma once

typedef struct nd_daemon nd_daemon;

/* Opens the ledger (d->ledger, d->ledger_reader) and starts its integrity check on the reader's
 * thread; until it passes the ledger records nothing and Start is refused with Storage. A ledger
 * that fails it is closed (d->ledger NULL, d->ledger_error says why). */
void nd_ledger_state_open(nd_daemon *d);
