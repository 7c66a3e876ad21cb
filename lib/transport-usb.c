/* transport-usb.c: nd_transport over libusb-1.0 on an sd-event loop, and pen discovery.
 *
 * Lifetimes, because they are the hard part:
 *   - every libusb transfer we submit is tracked on its transport's in-flight list until
 *     libusb hands it back through its callback; only then is it freed;
 *   - nd_transport_free() marks the transport freed (no user callback runs from then on) and
 *     cancels what is in flight; the device is closed once the list is empty;
 *   - the device is never closed from inside libusb's event handling: libusb still uses the
 *     device handle after a transfer callback returns, so closing there would be a
 *     use-after-free. The close runs from a deferred sd-event source instead.
 *   - libusb's hotplug callbacks only queue work; opening a pen happens from the loop. */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/time.h>
#include <time.h>

#include "log.h"
#include "transport-usb.h"

/* How often fds that cannot be watched with epoll are polled by hand. Real usbfs nodes support
 * epoll; an emulated node (umockdev: a regular file) does not, and is always "ready". */
#define UNPOLLABLE_POLL_INTERVAL_USEC (1 * USEC_PER_MSEC)

/* At shutdown, how long to wait for cancelled transfers to come back before giving up. */
#define SHUTDOWN_DRAIN_TIMEOUT_USEC (2 * USEC_PER_SEC)
#define SHUTDOWN_DRAIN_STEP_USEC (50 * USEC_PER_MSEC)

/* An interrupt IN endpoint that fails this many times in a row is declared dead. */
#define STREAM_MAX_CONSECUTIVE_ERRORS 32

/* Accuracy requested for our timers (0 would mean sd-event's default 250 ms window). */
#define TIMER_ACCURACY_USEC 1

#define USB_ENDPOINT_PACKET_SIZE_MASK 0x07ffu

typedef struct usb_transport usb_transport;
typedef struct usb_transfer usb_transfer;

typedef struct usb_pollfd {
        int fd;
        sd_event_source *source; /* NULL when the fd cannot be watched and is polled by hand */
} usb_pollfd;

struct nd_usb_context {
        sd_event *event;
        libusb_context *usb;

        usb_pollfd *pollfds;
        size_t n_pollfds, n_pollfds_allocated;
        unsigned n_unpollable;
        sd_event_source *poll_timer;    /* for unpollable fds */
        sd_event_source *timeout_timer; /* for libusb's timeouts when it has no timerfd */
        bool libusb_handles_timeouts;
        unsigned handling_events;       /* > 0 while inside libusb_handle_events_* */

        usb_transport *transports;      /* open and freed-but-draining transports */

        /* the pen monitor */
        bool watching;
        libusb_hotplug_callback_handle hotplug;
        uint16_t vendor_id, product_id;
        nd_usb_pen_added_fn added;
        void *added_userdata;
        libusb_device **arrived;        /* references, opened from monitor_defer */
        size_t n_arrived, n_arrived_allocated;
        sd_event_source *monitor_defer;
};

struct usb_transport {
        nd_transport base;              /* first: nd_transport* and usb_transport* convert */
        nd_usb_context *ctx;
        libusb_device *device;          /* a reference */
        libusb_device_handle *handle;
        uint8_t interface_number;
        uint8_t endpoint_in;
        uint16_t packet_size;
        bool claimed;

        bool freed;                     /* the owner called nd_transport_free() */
        bool no_device;                 /* libusb said the device is gone */
        bool gone_pending;              /* on_gone to be reported from the loop */
        int gone_status;

        bool streaming;
        unsigned stream_generation;     /* stream transfers of older generations are dropped */
        unsigned stream_consecutive_errors;

        usb_transfer *in_flight;        /* submitted, not yet returned by libusb */
        sd_event_source *work;          /* deferred: report gone, or close when drained */
        nd_usb_transport_stats stats;

        usb_transport *prev, *next;     /* in ctx->transports */
};

struct usb_transfer {
        usb_transport *transport;
        struct libusb_transfer *xfer;   /* owns its buffer (LIBUSB_TRANSFER_FREE_BUFFER) */
        usb_transfer *prev, *next;      /* in transport->in_flight */
        bool stream;
        unsigned generation;
        nd_control_done_fn done;
        void *userdata;
};

static const nd_transport_ops usb_transport_ops;

int nd_usb_error_to_errno(int e) {
        switch (e) {
        case LIBUSB_SUCCESS: return 0;
        case LIBUSB_ERROR_IO: return -EIO;
        case LIBUSB_ERROR_INVALID_PARAM: return -EINVAL;
        case LIBUSB_ERROR_ACCESS: return -EACCES;
        case LIBUSB_ERROR_NO_DEVICE: return -ENODEV;
        case LIBUSB_ERROR_NOT_FOUND: return -ENOENT;
        case LIBUSB_ERROR_BUSY: return -EBUSY;
        case LIBUSB_ERROR_TIMEOUT: return -ETIMEDOUT;
        case LIBUSB_ERROR_OVERFLOW: return -EOVERFLOW;
        case LIBUSB_ERROR_PIPE: return -EPIPE;
        case LIBUSB_ERROR_INTERRUPTED: return -EINTR;
        case LIBUSB_ERROR_NO_MEM: return -ENOMEM;
        case LIBUSB_ERROR_NOT_SUPPORTED: return -EOPNOTSUPP;
        default: return -EIO;
        }
}

static int transfer_status_to_errno(enum libusb_transfer_status s) {
        switch (s) {
        case LIBUSB_TRANSFER_COMPLETED: return 0;
        case LIBUSB_TRANSFER_TIMED_OUT: return -ETIMEDOUT;
        case LIBUSB_TRANSFER_STALL: return -EPIPE;
        case LIBUSB_TRANSFER_NO_DEVICE: return -ENODEV;
        case LIBUSB_TRANSFER_OVERFLOW: return -EOVERFLOW;
        case LIBUSB_TRANSFER_CANCELLED: return -ECANCELED;
        case LIBUSB_TRANSFER_ERROR:
        default: return -EIO;
        }
}

/* ---- the libusb event sources on sd-event ---- */

static void context_update_timeout_timer(nd_usb_context *c) {
        struct timeval tv;
        int r;

        if (c->libusb_handles_timeouts || !c->timeout_timer)
                return;
        r = libusb_get_next_timeout(c->usb, &tv);
        if (r <= 0) {
                (void) sd_event_source_set_enabled(c->timeout_timer, SD_EVENT_OFF);
                return;
        }
        uint64_t usec = (uint64_t) tv.tv_sec * USEC_PER_SEC + (uint64_t) tv.tv_usec;
        r = sd_event_source_set_time_relative(c->timeout_timer, MAX(usec, (uint64_t) 1));
        if (r >= 0)
                r = sd_event_source_set_enabled(c->timeout_timer, SD_EVENT_ONESHOT);
        if (r < 0)
                (void) nd_log_error_errno(r, "usb: cannot arm the libusb timeout timer");
}

/* Lets libusb handle whatever is ready, without waiting. */
static void context_process(nd_usb_context *c) {
        struct timeval zero = { 0, 0 };

        c->handling_events++;
        int r = libusb_handle_events_timeout_completed(c->usb, &zero, NULL);
        c->handling_events--;
        if (r < 0 && r != LIBUSB_ERROR_INTERRUPTED && r != LIBUSB_ERROR_TIMEOUT)
                nd_log_warning("usb: handling libusb events failed: %s", libusb_error_name(r));
        context_update_timeout_timer(c);
}

static int on_usb_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        context_process(userdata);
        return 0;
}

static int on_usb_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        context_process(userdata);
        return 0;
}

static int on_poll_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_usb_context *c = userdata;
        int r = sd_event_source_set_time_relative(s, UNPOLLABLE_POLL_INTERVAL_USEC);
        if (r < 0)
                (void) nd_log_error_errno(r, "usb: cannot re-arm the poll timer");
        context_process(c);
        return 0;
}

static uint32_t poll_to_epoll(short events) {
        uint32_t e = 0;
        if (events & POLLIN)
                e |= EPOLLIN;
        if (events & POLLOUT)
                e |= EPOLLOUT;
        if (events & POLLPRI)
                e |= EPOLLPRI;
        return e;
}

static usb_pollfd *context_find_pollfd(nd_usb_context *c, int fd) {
        for (size_t i = 0; i < c->n_pollfds; i++)
                if (c->pollfds[i].fd == fd)
                        return &c->pollfds[i];
        return NULL;
}

static void context_set_unpollable(nd_usb_context *c, int delta) {
        c->n_unpollable = (unsigned) ((int) c->n_unpollable + delta);
        if (!c->poll_timer)
                return;
        if (c->n_unpollable == 0) {
                (void) sd_event_source_set_enabled(c->poll_timer, SD_EVENT_OFF);
                return;
        }
        int enabled = SD_EVENT_OFF;
        (void) sd_event_source_get_enabled(c->poll_timer, &enabled);
        if (enabled != SD_EVENT_OFF)
                return;
        int r = sd_event_source_set_time_relative(c->poll_timer, UNPOLLABLE_POLL_INTERVAL_USEC);
        if (r >= 0)
                r = sd_event_source_set_enabled(c->poll_timer, SD_EVENT_ON);
        if (r < 0)
                (void) nd_log_error_errno(r, "usb: cannot start the poll timer");
}

static void context_add_pollfd(nd_usb_context *c, int fd, short events) {
        usb_pollfd *p = context_find_pollfd(c, fd);
        if (p) {
                /* libusb changed the events of an fd it already gave us */
                if (p->source)
                        (void) sd_event_source_set_io_events(p->source, poll_to_epoll(events));
                return;
        }
        if (c->n_pollfds == c->n_pollfds_allocated) {
                size_t n = MAX(c->n_pollfds_allocated * 2, (size_t) 8);
                usb_pollfd *a = reallocarray(c->pollfds, n, sizeof *a);
                if (!a) {
                        nd_log_error("usb: out of memory watching libusb fd %d", fd);
                        return;
                }
                c->pollfds = a;
                c->n_pollfds_allocated = n;
        }
        p = &c->pollfds[c->n_pollfds++];
        *p = (usb_pollfd) { .fd = fd };
        int r = sd_event_add_io(c->event, &p->source, fd, poll_to_epoll(events), on_usb_io, c);
        if (r < 0) {
                /* epoll refuses regular files (-EPERM): such an fd is always ready, so poll
                 * it by hand at a fixed interval. Any other failure gets the same fallback:
                 * slower, but the device keeps working. */
                if (r != -EPERM)
                        nd_log_warning("usb: cannot watch libusb fd %d (%s), polling it instead",
                                       fd, strerror(-r));
                else
                        nd_log_debug("usb: libusb fd %d cannot be watched with epoll, polling it", fd);
                p->source = NULL;
                context_set_unpollable(c, +1);
                return;
        }
        (void) sd_event_source_set_description(p->source, "libusb-fd");
}

static void context_remove_pollfd(nd_usb_context *c, int fd) {
        usb_pollfd *p = context_find_pollfd(c, fd);
        if (!p)
                return;
        if (p->source)
                p->source = sd_event_source_disable_unref(p->source);
        else
                context_set_unpollable(c, -1);
        *p = c->pollfds[--c->n_pollfds];
}

static void LIBUSB_CALL on_pollfd_added(int fd, short events, void *userdata) {
        context_add_pollfd(userdata, fd, events);
}

static void LIBUSB_CALL on_pollfd_removed(int fd, void *userdata) {
        context_remove_pollfd(userdata, fd);
}

/* ---- transfers ---- */

static void transfer_link(usb_transport *t, usb_transfer *u) {
        u->prev = NULL;
        u->next = t->in_flight;
        if (t->in_flight)
                t->in_flight->prev = u;
        t->in_flight = u;
}

static void transfer_unlink(usb_transport *t, usb_transfer *u) {
        if (u->prev)
                u->prev->next = u->next;
        else
                t->in_flight = u->next;
        if (u->next)
                u->next->prev = u->prev;
        u->prev = u->next = NULL;
}

static void transfer_free(usb_transfer *u) {
        if (!u)
                return;
        libusb_free_transfer(u->xfer); /* frees the buffer too (LIBUSB_TRANSFER_FREE_BUFFER) */
        free(u);
}

static usb_transfer *transfer_new(usb_transport *t, size_t buffer_size) {
        usb_transfer *u = calloc(1, sizeof *u);
        if (!u)
                return NULL;
        u->transport = t;
        u->xfer = libusb_alloc_transfer(0);
        /* zeroed: a short reply must never leave stale heap bytes behind the data */
        uint8_t *buffer = calloc(1, MAX(buffer_size, (size_t) 1));
        if (!u->xfer || !buffer) {
                free(buffer);
                libusb_free_transfer(u->xfer);
                free(u);
                return NULL;
        }
        u->xfer->buffer = buffer;
        u->xfer->flags = LIBUSB_TRANSFER_FREE_BUFFER;
        return u;
}

static void transport_schedule_work(usb_transport *t) {
        int r = sd_event_source_set_enabled(t->work, SD_EVENT_ONESHOT);
        if (r < 0)
                (void) nd_log_error_errno(r, "%s: cannot schedule deferred work", t->base.description);
}

/* The device is gone or the link is dead: tell the owner once, from the loop. */
static void transport_schedule_gone(usb_transport *t, int status) {
        if (status == -ENODEV)
                t->no_device = true;
        t->streaming = false;
        if (t->gone_pending || t->base.gone)
                return;
        t->gone_pending = true;
        t->gone_status = status;
        transport_schedule_work(t);
}

/* Called after a transfer came back: a freed transport closes once nothing is in flight. */
static void transport_transfer_returned(usb_transport *t) {
        if (t->freed && !t->in_flight)
                transport_schedule_work(t);
}

static void transport_destroy(usb_transport *t) {
        nd_usb_context *c = t->ctx;

        if (t->handle) {
                if (t->claimed && !t->no_device)
                        (void) libusb_release_interface(t->handle, t->interface_number);
                libusb_close(t->handle);
        }
        libusb_unref_device(t->device);

        if (t->prev)
                t->prev->next = t->next;
        else if (c->transports == t)
                c->transports = t->next;
        if (t->next)
                t->next->prev = t->prev;

        sd_event_source_disable_unref(t->work);
        sd_event_unref(t->base.event);
        free(t->base.description);
        free(t);
}

static void LIBUSB_CALL on_control_done(struct libusb_transfer *xfer) {
        usb_transfer *u = xfer->user_data;
        usb_transport *t = u->transport;
        int status = transfer_status_to_errno(xfer->status);
        const uint8_t *data = NULL;
        size_t len = 0;

        transfer_unlink(t, u);
        if (status == 0) {
                status = xfer->actual_length;
                if (xfer->buffer[0] & LIBUSB_ENDPOINT_IN) {
                        data = libusb_control_transfer_get_data(xfer);
                        len = (size_t) xfer->actual_length;
                }
                t->stats.control_ok++;
        } else
                t->stats.control_failed++;
        if (status == -ENODEV)
                transport_schedule_gone(t, -ENODEV);

        if (!t->freed && u->done)
                u->done(&t->base, status, data, len, u->userdata);

        transfer_free(u);
        transport_transfer_returned(t);
}

static int usb_control(nd_transport *base, const nd_control_setup *setup, const uint8_t *out_data,
                       uint32_t timeout_ms, nd_control_done_fn done, void *userdata) {
        usb_transport *t = (usb_transport *) base;
        usb_transfer *u;
        int r;

        if (t->no_device)
                return -ENODEV;
        u = transfer_new(t, LIBUSB_CONTROL_SETUP_SIZE + (size_t) setup->length);
        if (!u)
                return -ENOMEM;
        u->done = done;
        u->userdata = userdata;
        libusb_fill_control_setup(u->xfer->buffer, setup->request_type, setup->request, setup->value,
                                  setup->index, setup->length);
        if (!(setup->request_type & ND_CONTROL_DIR_IN) && setup->length > 0)
                memcpy(u->xfer->buffer + LIBUSB_CONTROL_SETUP_SIZE, out_data, setup->length);
        libusb_fill_control_transfer(u->xfer, t->handle, u->xfer->buffer, on_control_done, u, timeout_ms);
        u->xfer->flags = LIBUSB_TRANSFER_FREE_BUFFER;

        r = libusb_submit_transfer(u->xfer);
        if (r < 0) {
                transfer_free(u);
                r = nd_usb_error_to_errno(r);
                if (r == -ENODEV)
                        transport_schedule_gone(t, -ENODEV);
                return r;
        }
        transfer_link(t, u);
        context_update_timeout_timer(t->ctx);
        return 0;
}

static bool stream_transfers_in_flight(usb_transport *t) {
        for (usb_transfer *u = t->in_flight; u; u = u->next)
                if (u->stream && u->generation == t->stream_generation)
                        return true;
        return false;
}

static void stream_failed(usb_transport *t, int status, const char *what) {
        (void) nd_log_error_errno(status, "%s: telemetry stream stopped: %s", t->base.description, what);
        transport_schedule_gone(t, status);
}

static void LIBUSB_CALL on_stream_done(struct libusb_transfer *xfer) {
        usb_transfer *u = xfer->user_data;
        usb_transport *t = u->transport;
        int status = transfer_status_to_errno(xfer->status);

        transfer_unlink(t, u);

#define STREAM_CURRENT() (!t->freed && t->streaming && u->generation == t->stream_generation && !t->no_device)

        if (status == -ENODEV) {
                transport_schedule_gone(t, -ENODEV);
        } else if (status == -ECANCELED || !STREAM_CURRENT()) {
                /* stopped or freed: just let it go */
        } else {
                if (status == 0) {
                        if (t->stream_consecutive_errors > 0)
                                nd_log_info("%s: telemetry stream recovered after %u failed transfers",
                                            t->base.description, t->stream_consecutive_errors);
                        t->stream_consecutive_errors = 0;
                        t->stats.packets++;
                        if (t->base.on_packet)
                                t->base.on_packet(&t->base, xfer->buffer, (size_t) xfer->actual_length,
                                                  t->base.userdata);
                } else {
                        t->stats.stream_errors++;
                        if (t->stream_consecutive_errors++ == 0)
                                nd_log_warning("%s: interrupt IN transfer failed (%s), packet lost",
                                               t->base.description, strerror(-status));
                        if (t->stream_consecutive_errors >= STREAM_MAX_CONSECUTIVE_ERRORS) {
                                stream_failed(t, -EIO, "too many failed transfers in a row");
                                goto drop;
                        }
                }
                /* the owner may have stopped the stream or freed us from on_packet */
                if (STREAM_CURRENT()) {
                        int r = libusb_submit_transfer(xfer);
                        if (r >= 0) {
                                transfer_link(t, u);
                                return;
                        }
                        r = nd_usb_error_to_errno(r);
                        if (r == -ENODEV)
                                transport_schedule_gone(t, -ENODEV);
                        else if (!stream_transfers_in_flight(t))
                                stream_failed(t, r, "cannot resubmit the interrupt IN transfer");
                        else
                                nd_log_warning("%s: cannot resubmit an interrupt IN transfer: %s",
                                               t->base.description, strerror(-r));
                }
        }
#undef STREAM_CURRENT
drop:
        transfer_free(u);
        transport_transfer_returned(t);
}

static void usb_stop_stream(nd_transport *base) {
        usb_transport *t = (usb_transport *) base;

        t->streaming = false;
        for (usb_transfer *u = t->in_flight; u; u = u->next)
                if (u->stream)
                        (void) libusb_cancel_transfer(u->xfer);
}

static int usb_start_stream(nd_transport *base) {
        usb_transport *t = (usb_transport *) base;

        if (t->no_device)
                return -ENODEV;
        if (t->streaming)
                return 0;
        t->streaming = true;
        t->stream_generation++;
        t->stream_consecutive_errors = 0;
        for (unsigned i = 0; i < ND_USB_STREAM_TRANSFERS; i++) {
                usb_transfer *u = transfer_new(t, t->packet_size);
                int r;
                if (!u) {
                        usb_stop_stream(base);
                        return -ENOMEM;
                }
                u->stream = true;
                u->generation = t->stream_generation;
                libusb_fill_interrupt_transfer(u->xfer, t->handle, t->endpoint_in, u->xfer->buffer,
                                               t->packet_size, on_stream_done, u, 0);
                u->xfer->flags = LIBUSB_TRANSFER_FREE_BUFFER;
                r = libusb_submit_transfer(u->xfer);
                if (r < 0) {
                        transfer_free(u);
                        usb_stop_stream(base);
                        r = nd_usb_error_to_errno(r);
                        if (r == -ENODEV)
                                transport_schedule_gone(t, -ENODEV);
                        nd_log_error("%s: cannot start the telemetry stream: %s",
                                     t->base.description, strerror(-r));
                        return r;
                }
                transfer_link(t, u);
        }
        return 0;
}

static void usb_free(nd_transport *base) {
        usb_transport *t = (usb_transport *) base;

        t->freed = true;
        t->streaming = false;
        for (usb_transfer *u = t->in_flight; u; u = u->next)
                (void) libusb_cancel_transfer(u->xfer);
        /* inside libusb's event handling the device handle is still in use: close later */
        if (!t->in_flight && t->ctx->handling_events == 0)
                transport_destroy(t);
        else
                transport_schedule_work(t);
}

static int on_transport_work(sd_event_source *s, void *userdata) {
        usb_transport *t = userdata;

        if (t->freed) {
                if (!t->in_flight)
                        transport_destroy(t);
                return 0;
        }
        if (t->gone_pending) {
                t->gone_pending = false;
                (void) nd_log_info_errno(t->gone_status, "%s: link gone", t->base.description);
                /* the owner may free the transport in on_gone: touch nothing afterwards */
                nd_transport_report_gone(&t->base, t->gone_status);
        }
        return 0;
}

static const nd_transport_ops usb_transport_ops = {
        .control = usb_control,
        .start_stream = usb_start_stream,
        .stop_stream = usb_stop_stream,
        .free = usb_free,
};

bool nd_transport_is_usb(const nd_transport *t) {
        return t && t->ops == &usb_transport_ops;
}

int nd_transport_usb_get_stats(const nd_transport *t, nd_usb_transport_stats *ret) {
        if (!nd_transport_is_usb(t) || !ret)
                return -EINVAL;
        *ret = ((const usb_transport *) t)->stats;
        return 0;
}

/* Finds the pen's interface: vendor-specific class, with an interrupt IN endpoint. */
static int find_pen_interface(libusb_device *dev, uint8_t *ret_interface, uint8_t *ret_endpoint,
                              uint16_t *ret_packet_size) {
        struct libusb_config_descriptor *config = NULL;
        int r = libusb_get_active_config_descriptor(dev, &config);
        if (r < 0)
                return nd_usb_error_to_errno(r);

        r = -ENOENT;
        for (unsigned i = 0; i < config->bNumInterfaces && r < 0; i++) {
                if (config->interface[i].num_altsetting < 1)
                        continue;
                const struct libusb_interface_descriptor *alt = &config->interface[i].altsetting[0];
                if (alt->bInterfaceClass != LIBUSB_CLASS_VENDOR_SPEC)
                        continue;
                for (unsigned e = 0; e < alt->bNumEndpoints; e++) {
                        const struct libusb_endpoint_descriptor *ep = &alt->endpoint[e];
                        uint16_t size = ep->wMaxPacketSize & USB_ENDPOINT_PACKET_SIZE_MASK;
                        if ((ep->bmAttributes & LIBUSB_TRANSFER_TYPE_MASK) != LIBUSB_TRANSFER_TYPE_INTERRUPT ||
                            !(ep->bEndpointAddress & LIBUSB_ENDPOINT_IN) || size == 0)
                                continue;
                        *ret_interface = alt->bInterfaceNumber;
                        *ret_endpoint = ep->bEndpointAddress;
                        *ret_packet_size = size;
                        r = 0;
                        break;
                }
        }
        libusb_free_config_descriptor(config);
        return r;
}

static char *describe_device(libusb_device *dev) {
        uint8_t ports[8];
        char path[64] = "";
        char *s = NULL;
        int n = libusb_get_port_numbers(dev, ports, (int) ELEMENTSOF(ports));
        size_t off = 0;

        for (int i = 0; i < n && off < sizeof path; i++)
                off += (size_t) snprintf(path + off, sizeof path - off, "%s%u", i == 0 ? "-" : ".", ports[i]);
        if (asprintf(&s, "usb %u%s (bus %u device %u)", libusb_get_bus_number(dev), path,
                     libusb_get_bus_number(dev), libusb_get_device_address(dev)) < 0)
                return NULL;
        return s;
}

int nd_transport_usb_new(nd_usb_context *c, libusb_device *dev, nd_transport **ret) {
        _cleanup_free_ char *description = NULL;
        usb_transport *t;
        int r;

        if (!c || !dev || !ret)
                return -EINVAL;
        description = describe_device(dev);
        if (!description)
                return -ENOMEM;

        t = calloc(1, sizeof *t);
        if (!t)
                return -ENOMEM;
        t->base.ops = &usb_transport_ops;
        t->base.event = sd_event_ref(c->event);
        t->base.description = TAKE_PTR(description);
        t->ctx = c;
        t->device = libusb_ref_device(dev);
        /* linked first, so transport_destroy() can undo any step below */
        t->next = c->transports;
        if (c->transports)
                c->transports->prev = t;
        c->transports = t;

        r = find_pen_interface(dev, &t->interface_number, &t->endpoint_in, &t->packet_size);
        if (r < 0) {
                nd_log_warning("%s: no vendor interface with an interrupt IN endpoint: %s",
                               t->base.description, strerror(-r));
                goto fail;
        }
        r = sd_event_add_defer(c->event, &t->work, on_transport_work, t);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_enabled(t->work, SD_EVENT_OFF);
        (void) sd_event_source_set_description(t->work, "usb-transport-work");

        r = libusb_open(dev, &t->handle);
        if (r < 0) {
                r = nd_log_warning_errno(nd_usb_error_to_errno(r), "%s: cannot open", t->base.description);
                goto fail;
        }
        r = libusb_kernel_driver_active(t->handle, t->interface_number);
        if (r == 1) {
                r = libusb_detach_kernel_driver(t->handle, t->interface_number);
                if (r < 0 && r != LIBUSB_ERROR_NOT_FOUND) {
                        r = nd_usb_error_to_errno(r);
                        nd_log_warning("%s: cannot detach the kernel driver of interface %u: %s",
                                       t->base.description, t->interface_number, strerror(-r));
                        goto fail;
                }
        }
        r = libusb_claim_interface(t->handle, t->interface_number);
        if (r < 0) {
                r = nd_usb_error_to_errno(r);
                (void) nd_log_warning_errno(r, "%s: cannot claim interface %u", t->base.description,
                               t->interface_number);
                goto fail;
        }
        t->claimed = true;
        nd_log_debug("%s: opened, interface %u, interrupt IN endpoint 0x%02x, %u-byte packets",
                     t->base.description, t->interface_number, t->endpoint_in, t->packet_size);
        *ret = &t->base;
        return 0;

fail:
        transport_destroy(t);
        return r;
}

/* ---- the pen monitor ---- */

static bool context_has_open_transport(nd_usb_context *c, libusb_device *dev) {
        for (usb_transport *t = c->transports; t; t = t->next)
                if (t->device == dev && !t->freed && !t->no_device)
                        return true;
        return false;
}

static int on_monitor_defer(sd_event_source *s, void *userdata) {
        nd_usb_context *c = userdata;

        /* one at a time from the front: the callback may let the loop change the queue */
        while (c->n_arrived > 0) {
                libusb_device *dev = c->arrived[0];
                nd_transport *t = NULL;
                int r;

                memmove(c->arrived, c->arrived + 1, --c->n_arrived * sizeof *c->arrived);
                if (!context_has_open_transport(c, dev)) {
                        r = nd_transport_usb_new(c, dev, &t);
                        if (r < 0)
                                nd_log_error("usb: pen at bus %u device %u found but not usable: %s",
                                             libusb_get_bus_number(dev), libusb_get_device_address(dev),
                                             strerror(-r));
                        else
                                c->added(c, t, c->added_userdata);
                }
                libusb_unref_device(dev);
        }
        return 0;
}

static int LIBUSB_CALL on_hotplug(libusb_context *usb, libusb_device *dev, libusb_hotplug_event event,
                                  void *userdata) {
        nd_usb_context *c = userdata;

        if (event == LIBUSB_HOTPLUG_EVENT_DEVICE_ARRIVED) {
                if (c->n_arrived == c->n_arrived_allocated) {
                        size_t n = MAX(c->n_arrived_allocated * 2, (size_t) 4);
                        libusb_device **a = reallocarray(c->arrived, n, sizeof *a);
                        if (!a) {
                                nd_log_error("usb: out of memory queueing an arrived pen");
                                return 0;
                        }
                        c->arrived = a;
                        c->n_arrived_allocated = n;
                }
                c->arrived[c->n_arrived++] = libusb_ref_device(dev);
                if (sd_event_source_set_enabled(c->monitor_defer, SD_EVENT_ONESHOT) < 0)
                        nd_log_error("usb: cannot schedule opening an arrived pen");
        } else if (event == LIBUSB_HOTPLUG_EVENT_DEVICE_LEFT) {
                size_t kept = 0;
                for (size_t i = 0; i < c->n_arrived; i++) {
                        if (c->arrived[i] == dev)
                                libusb_unref_device(dev);
                        else
                                c->arrived[kept++] = c->arrived[i];
                }
                c->n_arrived = kept;
                for (usb_transport *t = c->transports; t; t = t->next)
                        if (t->device == dev && !t->freed)
                                transport_schedule_gone(t, -ENODEV);
        }
        return 0; /* stay registered */
}

int nd_usb_context_watch(nd_usb_context *c, uint16_t vendor_id, uint16_t product_id,
                         nd_usb_pen_added_fn added, void *userdata) {
        int r;

        if (!c || !added)
                return -EINVAL;
        if (c->watching)
                return -EBUSY;
        if (!libusb_has_capability(LIBUSB_CAP_HAS_HOTPLUG))
                return -EOPNOTSUPP;
        r = sd_event_add_defer(c->event, &c->monitor_defer, on_monitor_defer, c);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(c->monitor_defer, SD_EVENT_OFF);
        (void) sd_event_source_set_description(c->monitor_defer, "usb-monitor");
        c->vendor_id = vendor_id;
        c->product_id = product_id;
        c->added = added;
        c->added_userdata = userdata;
        /* ENUMERATE reports the pens already present through the same path as new ones */
        r = libusb_hotplug_register_callback(c->usb,
                                             LIBUSB_HOTPLUG_EVENT_DEVICE_ARRIVED | LIBUSB_HOTPLUG_EVENT_DEVICE_LEFT,
                                             LIBUSB_HOTPLUG_ENUMERATE, vendor_id, product_id,
                                             LIBUSB_HOTPLUG_MATCH_ANY, on_hotplug, c, &c->hotplug);
        if (r < 0) {
                c->monitor_defer = sd_event_source_disable_unref(c->monitor_defer);
                return nd_usb_error_to_errno(r);
        }
        c->watching = true;
        nd_log_debug("usb: watching for pens %04x:%04x", vendor_id, product_id);
        return 0;
}

/* ---- the context ---- */

static uint64_t monotonic_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

int nd_usb_context_new(sd_event *event, nd_usb_context **ret) {
        _cleanup_(nd_usb_context_freep) nd_usb_context *c = NULL;
        const struct libusb_pollfd **fds;
        int r;

        if (!event || !ret)
                return -EINVAL;
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->event = sd_event_ref(event);

        r = libusb_init(&c->usb);
        if (r < 0) {
                c->usb = NULL;
                return nd_log_error_errno(nd_usb_error_to_errno(r), "usb: cannot initialise libusb");
        }
        r = sd_event_add_time(event, &c->poll_timer, CLOCK_MONOTONIC, 0, TIMER_ACCURACY_USEC, on_poll_timer, c);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(c->poll_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_description(c->poll_timer, "libusb-poll");

        c->libusb_handles_timeouts = libusb_pollfds_handle_timeouts(c->usb) != 0;
        if (!c->libusb_handles_timeouts) {
                r = sd_event_add_time(event, &c->timeout_timer, CLOCK_MONOTONIC, 0, TIMER_ACCURACY_USEC,
                                      on_usb_timeout, c);
                if (r < 0)
                        return r;
                (void) sd_event_source_set_enabled(c->timeout_timer, SD_EVENT_OFF);
                (void) sd_event_source_set_description(c->timeout_timer, "libusb-timeout");
        }

        libusb_set_pollfd_notifiers(c->usb, on_pollfd_added, on_pollfd_removed, c);
        fds = libusb_get_pollfds(c->usb);
        if (!fds)
                return -ENOMEM;
        for (size_t i = 0; fds[i]; i++)
                context_add_pollfd(c, fds[i]->fd, fds[i]->events);
        libusb_free_pollfds(fds);

        *ret = TAKE_PTR(c);
        return 0;
}

libusb_context *nd_usb_context_get_libusb(nd_usb_context *c) {
        return c ? c->usb : NULL;
}

nd_usb_context *nd_usb_context_free(nd_usb_context *c) {
        if (!c)
                return NULL;

        if (c->watching)
                libusb_hotplug_deregister_callback(c->usb, c->hotplug);
        c->monitor_defer = sd_event_source_disable_unref(c->monitor_defer);
        for (size_t i = 0; i < c->n_arrived; i++)
                libusb_unref_device(c->arrived[i]);
        free(c->arrived);

        /* free what the owner left open (no callbacks), then wait for cancelled transfers */
        for (usb_transport *t = c->transports, *next; t; t = next) {
                next = t->next;
                if (!t->freed)
                        usb_free(&t->base);
        }
        if (c->transports && c->usb) {
                uint64_t deadline = monotonic_usec() + SHUTDOWN_DRAIN_TIMEOUT_USEC;
                for (;;) {
                        bool pending = false;
                        for (usb_transport *t = c->transports; t; t = t->next)
                                pending = pending || t->in_flight;
                        if (!pending || monotonic_usec() >= deadline)
                                break;
                        struct timeval step = { 0, (long) SHUTDOWN_DRAIN_STEP_USEC };
                        c->handling_events++;
                        (void) libusb_handle_events_timeout_completed(c->usb, &step, NULL);
                        c->handling_events--;
                }
        }
        while (c->transports) {
                usb_transport *t = c->transports;
                if (t->in_flight) {
                        /* libusb never returned them: leaking is the only safe choice */
                        nd_log_error("%s: transfers still in flight at shutdown, leaking them",
                                     t->base.description);
                        for (usb_transfer *u = t->in_flight; u; u = u->next)
                                u->transport = NULL;
                        t->in_flight = NULL;
                }
                transport_destroy(t);
        }

        if (c->usb)
                libusb_set_pollfd_notifiers(c->usb, NULL, NULL, NULL);
        for (size_t i = 0; i < c->n_pollfds; i++)
                sd_event_source_disable_unref(c->pollfds[i].source);
        free(c->pollfds);
        sd_event_source_disable_unref(c->poll_timer);
        sd_event_source_disable_unref(c->timeout_timer);
        if (c->usb)
                libusb_exit(c->usb);
        sd_event_unref(c->event);
        free(c);
        return NULL;
}
