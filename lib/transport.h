/* transport.h: a byte-level link to one pen (control requests and the interrupt IN telemetry
 * stream), asynchronous, on the caller's sd-event loop. No call blocks.
 *
 * Two implementations share this interface and carry the same protocol bytes:
 *   - libusb (transport-usb.c): real hardware, or a pen emulated under umockdev;
 *   - simulated (transport-sim.c): the pen model in-process, driven by sd-event timers.
 *
 * Rules every implementation keeps:
 *   - a completion callback never runs inside the call that submitted the request (it runs
 *     from the event loop), so callers need not be re-entrant;
 *   - every submitted request completes exactly once: with a status, or not at all if the
 *     transport is freed first (freeing drops pending callbacks without calling them);
 *   - after the link is gone (on_gone called once), new requests fail at once with -ENODEV;
 *   - data pointers handed to callbacks are valid only during the call. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

typedef struct nd_transport nd_transport;

/* USB control request, as on the wire (USB 2.0 §9.3). */
typedef struct nd_control_setup {
        uint8_t request_type; /* bmRequestType: bit 7 set = device-to-host (IN) */
        uint8_t request;      /* bRequest */
        uint16_t value;       /* wValue */
        uint16_t index;       /* wIndex */
        uint16_t length;      /* wLength: bytes sent (OUT) or the most accepted (IN) */
} nd_control_setup;

#define ND_CONTROL_DIR_IN 0x80u

/* Completion of one control request. status: >= 0 bytes transferred; -EPIPE the device
 * stalled (refused the request); -ETIMEDOUT no answer in time; -ENODEV the device is gone;
 * -EOVERFLOW the device sent more than asked for; -EIO any other failure.
 * For IN requests, data holds status bytes. */
typedef void (*nd_control_done_fn)(nd_transport *t, int status, const uint8_t *data, size_t len,
                                   void *userdata);

/* One interrupt IN packet, exactly as received. */
typedef void (*nd_packet_fn)(nd_transport *t, const uint8_t *data, size_t len, void *userdata);

/* The link is gone (unplugged, or a failure it cannot recover from). Called at most once,
 * from the event loop; status is -ENODEV for an unplug. The transport must still be freed. */
typedef void (*nd_gone_fn)(nd_transport *t, int status, void *userdata);

typedef struct nd_transport_ops {
        int (*control)(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                       uint32_t timeout_ms, nd_control_done_fn done, void *userdata);
        int (*start_stream)(nd_transport *t);
        void (*stop_stream)(nd_transport *t);
        void (*free)(nd_transport *t);
} nd_transport_ops;

/* The common part; implementations embed it first in their own struct. */
struct nd_transport {
        const nd_transport_ops *ops;
        sd_event *event;          /* a reference, held for the transport's life */
        char *description;        /* "usb 1-2 (bus 1 device 2)", "simulated"; owned */
        nd_packet_fn on_packet;
        nd_gone_fn on_gone;
        void *userdata;
        bool gone;
};

/* Sets the stream and departure callbacks (before start_stream). */
void nd_transport_set_callbacks(nd_transport *t, nd_packet_fn on_packet, nd_gone_fn on_gone,
                                void *userdata);

/* Submits one control request; out_data holds setup->length bytes for an OUT request and is
 * copied (the caller keeps ownership). Returns 0 when submitted, -ENODEV when gone,
 * -EINVAL for a bad argument, -ENOMEM. done may be NULL (fire and forget). */
int nd_transport_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data,
                         uint32_t timeout_ms, nd_control_done_fn done, void *userdata);

/* Starts delivering interrupt IN packets to on_packet (keeps enough transfers in flight that
 * none is lost at 1 kHz). Returns 0 or -errno. */
int nd_transport_start_stream(nd_transport *t);

/* Stops the stream; packets already received may still be delivered until the call returns. */
void nd_transport_stop_stream(nd_transport *t);

/* A one-line description for logs; owned by the transport. */
const char *nd_transport_describe(const nd_transport *t);

/* Frees the transport: cancels what is in flight without calling its callbacks, releases the
 * device. NULL is allowed. */
void nd_transport_free(nd_transport *t);

/* For implementations: report the departure once (sets gone, calls on_gone). */
void nd_transport_report_gone(nd_transport *t, int status);
