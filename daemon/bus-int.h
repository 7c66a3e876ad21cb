/* bus-int.h: integer options and filter values read liberally: a variant holding any D-Bus integer
 * type (y n q i u x t) is accepted and checked against the range the member documents, because
 * clients' tools (gdbus's text syntax, dbus-python, dbus-next) send "i" by default. */
#pragma once

#include <stdint.h>
#include <systemd/sd-bus.h>

/* Reads one variant holding an integer of any D-Bus integer type into *ret, checked against
 * [min, max]. what names the value in the error ("Filter limit", "Option battery_percent").
 * Returns 0, or the negative value of sd_bus_error_setf with InvalidArgs: "WHAT must be an
 * integer (...)" for another type, "WHAT is VALUE; MIN to MAX" out of range. Nothing is written
 * to *ret on failure. */
int nd_bus_read_variant_uint(sd_bus_message *m, const char *what, uint64_t min, uint64_t max, uint64_t *ret,
                             sd_bus_error *error);
