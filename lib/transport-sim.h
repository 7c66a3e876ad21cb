/* transport-sim.h: the simulated transport, a pen model in-process behind the nd_transport
 * interface, driven by sd-event timers. The bytes are those a USB pen sends. The model is fed
 * CLOCK_MONOTONIC µs read with clock_gettime() (not the loop's cached time): create it, and
 * call its simulator controls, with that clock.
 *
 * Behaviour, as a USB host controller would show it:
 *   - control requests are answered in submission order from the event loop (never inside the
 *     submitting call); a request the model does not answer (unresponsive) completes with
 *     -ETIMEDOUT timeout_ms after submission and holds back the requests behind it, as a hung
 *     EP0 does; timeout_ms 0 waits for ever, as with libusb;
 *   - while the stream is on, a timer (accuracy 1 µs) fires at the model's next telemetry due
 *     time and hands every due packet to on_packet; with nothing due it polls every
 *     ND_TRANSPORT_SIM_IDLE_POLL_MS, so changes made to the model from outside (fault cleared,
 *     telemetry re-enabled) are noticed; the dispatch that serves one pen also serves every other
 *     simulated pen on the same loop with a packet due by then, so pens sampling in step cost one
 *     loop turn per sample period however many there are;
 *   - nd_transport_sim_unplug() makes the pen go away: pending requests complete with -ENODEV,
 *     then on_gone(-ENODEV) runs, both from the loop. */
#pragma once

#include <systemd/sd-event.h>

#include "penmodel.h"
#include "transport.h"

#define ND_TRANSPORT_SIM_IDLE_POLL_MS 10u

/* Creates a simulated transport on e for model. The transport takes its own reference on the
 * model (nd_penmodel_ref) and drops it when freed; the caller keeps its reference, e.g. to
 * inject faults. Returns 0 and the transport in *ret (free with nd_transport_free), or -errno. */
int nd_transport_sim_new(sd_event *e, nd_penmodel *model, nd_transport **ret);

/* Simulates unplugging the pen (asynchronous, see above). Idempotent. -EINVAL when t is not a
 * simulated transport. */
int nd_transport_sim_unplug(nd_transport *t);

/* The model behind a simulated transport (borrowed: valid while t lives), NULL when t is not
 * a simulated transport. */
nd_penmodel *nd_transport_sim_get_model(nd_transport *t);
