/* transport-usb.h: the pen transport over libusb-1.0, asynchronous, on the caller's sd-event
 * loop, and the discovery of pens (present at start and hot-plugged).
 *
 * One nd_usb_context owns one libusb_context and attaches it to an sd-event loop: libusb's
 * file descriptors become io sources (libusb_set_pollfd_notifiers), its timeouts a timer
 * (unless libusb handles them with a timerfd, as on Linux), and events are handled with a
 * zero timeout from those sources. There is no libusb event thread and no synchronous
 * transfer anywhere: only libusb_open and the claim of the interface at a device's arrival
 * (local ioctls that do not wait for the device).
 *
 * Transfers of a freed transport that are still in flight stay owned by the context until
 * libusb hands them back (they are cancelled, then freed in their callbacks, and the device
 * is closed afterwards, outside libusb's event handling); user callbacks never run after
 * nd_transport_free(). */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <libusb.h>
#include <systemd/sd-event.h>

#include "transport.h"
#include "util.h"

typedef struct nd_usb_context nd_usb_context;

/* Interrupt IN transfers kept in flight while streaming: at 1 kHz this covers 8 ms of
 * scheduling delay on the host before the device would have to hold a packet back. */
#define ND_USB_STREAM_TRANSFERS 8

/* Counters of one USB transport, for tests and diagnostics. */
typedef struct nd_usb_transport_stats {
        uint64_t packets;          /* interrupt IN packets delivered to on_packet */
        uint64_t stream_errors;    /* interrupt IN transfers that failed (stall, babble, I/O) */
        uint64_t control_ok;       /* control requests that completed with data/ack */
        uint64_t control_failed;   /* control requests that stalled, timed out or failed */
} nd_usb_transport_stats;

/* A pen found by the monitor was opened: the callee owns t (nd_transport_free). Runs from the
 * event loop, never from inside libusb's event handling. */
typedef void (*nd_usb_pen_added_fn)(nd_usb_context *c, nd_transport *t, void *userdata);

/* Creates a libusb context attached to event (a reference is taken). On success *ret is
 * owned by the caller (nd_usb_context_free). */
int nd_usb_context_new(sd_event *event, nd_usb_context **ret);

/* Frees the context. Transports still open are freed first (their callbacks are not called);
 * transfers still in flight are cancelled and reaped (a bounded wait, shutdown only) before
 * libusb is closed. NULL is allowed; returns NULL. */
nd_usb_context *nd_usb_context_free(nd_usb_context *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(nd_usb_context *, nd_usb_context_free)

/* The libusb context inside (borrowed), e.g. to list devices in a test. */
libusb_context *nd_usb_context_get_libusb(nd_usb_context *c);

/* Starts watching for pens with this vendor/product id: those present now and those plugged
 * later are opened and handed to added (from the event loop). A pen that leaves reports
 * on_gone(-ENODEV) on its transport. One watch per context; returns -EBUSY for a second one,
 * -ENOTSUP when libusb has no hotplug support here. */
int nd_usb_context_watch(nd_usb_context *c, uint16_t vendor_id, uint16_t product_id,
                         nd_usb_pen_added_fn added, void *userdata);

/* Opens dev as a pen transport: finds the vendor-specific interface with an interrupt IN
 * endpoint, detaches a kernel driver if one is bound, claims the interface. On success *ret is
 * owned by the caller (nd_transport_free). -ENODEV when the device has gone, -ENOENT when it
 * has no such interface, -EBUSY when another program holds it, -EACCES without permission. */
int nd_transport_usb_new(nd_usb_context *c, libusb_device *dev, nd_transport **ret);

/* True when t was made by nd_transport_usb_new. */
bool nd_transport_is_usb(const nd_transport *t);

/* Copies the counters of a USB transport into *ret; -EINVAL for another kind of transport. */
int nd_transport_usb_get_stats(const nd_transport *t, nd_usb_transport_stats *ret);

/* Maps a libusb error code to a negative errno. */
int nd_usb_error_to_errno(int libusb_error);
