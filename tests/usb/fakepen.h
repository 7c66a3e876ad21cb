/* fakepen.h: a needle pen emulated at the usbdevfs level under umockdev, with the pen model
 * (lib/penmodel.h) behind it, so that real libusb-1.0 in the test process talks to it.
 *
 * The device appears in the testbed with the protocol's descriptors (vendor interface 0,
 * interrupt IN 0x81, 64-byte packets) and answers the usbdevfs ioctls libusb uses. Control URBs
 * go to nd_penmodel_control() at once (an unanswered one stays pending until libusb discards
 * it on its time-out); interrupt IN URBs are filled from nd_penmodel_next_packet() against
 * CLOCK_MONOTONIC when libusb reaps. The ioctl handler runs on umockdev's worker thread, so the
 * model is only touched under the harness's mutex: tests use fakepen_lock()/fakepen_unlock().
 *
 * Run the test under umockdev-wrapper (the preload library); create the testbed before libusb. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <umockdev.h>

#include "penmodel.h"

typedef struct FakePen FakePen;

typedef struct FakePenStats {
        unsigned ioctls;
        unsigned empty_reaps;
        unsigned control_urbs;      /* control URBs submitted */
        unsigned control_stalls;    /* answered with a STALL */
        unsigned control_unanswered; /* left pending (unresponsive model) */
        unsigned packets;           /* interrupt IN URBs completed with data */
        unsigned injected;          /* of which injected by the test */
        unsigned overflows;         /* injected packets longer than the URB (babble) */
        unsigned discarded;         /* URBs cancelled by libusb */
        unsigned shutdown;          /* URBs completed with -ESHUTDOWN by an unplug */
        unsigned model_errors;      /* nd_penmodel_next_packet() failures (model bugs) */
} FakePenStats;

/* The clock the model runs on (CLOCK_MONOTONIC, µs), as sd-event's CLOCK_MONOTONIC. */
uint64_t fakepen_now_us(void);

/* Plugs a pen into tb as /dev/bus/usb/001/<devnum> at port 1-<port>, with a new model made from
 * config (NULL: nd_penmodel_config_init defaults). If libusb is running, an "add" uevent
 * reaches its hotplug monitor. Aborts the test on failure. */
FakePen *fakepen_new(UMockdevTestbed *tb, const nd_penmodel_config *config, unsigned devnum, unsigned port);

/* Unplugs: further ioctls fail with ENODEV, URBs in flight complete with -ESHUTDOWN, the
 * "remove" uevent is sent and the device leaves the testbed. */
void fakepen_unplug(FakePen *p);

/* Frees the harness (unplugs first if still plugged). NULL allowed. */
void fakepen_free(FakePen *p);

/* Locks the model (advanced to now) and returns it; fakepen_unlock() when done. */
nd_penmodel *fakepen_lock(FakePen *p);
void fakepen_unlock(FakePen *p);

/* Queues a raw packet for the interrupt IN endpoint: it goes out before the model's next
 * packet. Longer than the URB, it completes with -EOVERFLOW (babble), as on hardware. */
void fakepen_inject_packet(FakePen *p, const uint8_t *data, size_t len);

/* Answers IDENTIFY with these bytes instead of the model's (NULL: the model again). */
void fakepen_set_identify_reply(FakePen *p, const uint8_t *reply, size_t len);

void fakepen_get_stats(FakePen *p, FakePenStats *ret);
const char *fakepen_syspath(const FakePen *p);
