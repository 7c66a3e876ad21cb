/* fakepen.c: see fakepen.h. Everything in on_ioctl runs on umockdev's worker thread. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/usbdevice_fs.h>

#include "config.h"
#include "fakepen.h"
#include "protocol.h"
#include "unaligned.h"

#define USB_SETUP_SIZE 8u
#define USB_BUS_NUMBER 1u
#define USB_SPEED_FULL_MBPS 12u
#define USB_DEVICE_MAJOR 189u

/* Kernel facts the harness reproduces: the errno of a URB cut short by a disconnect, and of
 * a packet longer than the URB buffer (babble). */
#define URB_STATUS_DISCONNECTED (-ESHUTDOWN)
#define URB_STATUS_BABBLE (-EOVERFLOW)
#define URB_STATUS_STALL (-EPIPE)
#define URB_STATUS_UNLINKED (-ENOENT)

/* A URB belongs to the client (one open file of the device node) that submitted it: as in the
 * kernel, only that client reaps or discards it, and its URBs go when it closes. Two clients may
 * have the device open at once (a transport freed with URBs in flight, and the next one). */
typedef struct Urb {
        UMockdevIoctlClient *client; /* the client that submitted it */
        UMockdevIoctlData *urb;      /* our copy of the client's struct usbdevfs_urb */
        UMockdevIoctlData *buf;      /* our copy of its buffer, written back on reap */
} Urb;

struct FakePen {
        UMockdevTestbed *tb;
        UMockdevIoctlBase *handler;
        char *syspath, *devnode;

        GMutex lock;         /* everything below */
        nd_penmodel *model;
        GQueue pending_int;  /* Urb*: interrupt IN URBs waiting for a packet */
        GQueue pending_ctrl; /* Urb*: control URBs the model did not answer */
        GQueue done;         /* Urb*: completed, handed out by the next reap */
        GQueue injected;     /* GBytes*: raw packets to send before the model's */
        GBytes *identify_reply;
        bool unplugged;
        FakePenStats stats;
};

uint64_t fakepen_now_us(void) {
        return (uint64_t) g_get_monotonic_time();
}

static void urb_free(Urb *u) {
        if (!u)
                return;
        g_clear_object(&u->client);
        g_clear_object(&u->urb);
        g_clear_object(&u->buf);
        g_free(u);
}

static struct usbdevfs_urb *urb_of(Urb *u) {
        return (struct usbdevfs_urb *) (void *) u->urb->data;
}

/* The descriptors the kernel exposes in sysfs: device, then configuration with the pen's
 * vendor interface and its interrupt IN endpoint. */
static GString *descriptors_hex(void) {
        const uint8_t desc[] = {
                /* device: USB 2.0, class per interface, EP0 64 bytes, VID, PID, bcdDevice 1.00, 1 config */
                18, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, ND_PROTO_EP0_MAX_PACKET,
                PEN_USB_VID_DEFAULT & 0xff, PEN_USB_VID_DEFAULT >> 8,
                PEN_USB_PID_DEFAULT & 0xff, PEN_USB_PID_DEFAULT >> 8,
                0x00, 0x01, 0, 0, 0, 1,
                /* configuration 1: total 9 + 9 + 7 bytes, 1 interface, bus powered, 100 mA */
                9, 0x02, 25, 0, 1, 1, 0, 0x80, 50,
                /* interface 0, alt 0, 1 endpoint, vendor class */
                9, 0x04, ND_PROTO_INTERFACE_NUMBER, 0, 1, ND_PROTO_INTERFACE_CLASS,
                ND_PROTO_INTERFACE_SUBCLASS, ND_PROTO_INTERFACE_PROTOCOL, 0,
                /* endpoint 0x81, interrupt, 64 bytes, every frame */
                7, 0x05, ND_PROTO_TELEMETRY_ENDPOINT, 0x03, ND_PROTO_TELEMETRY_MAX_PACKET, 0,
                ND_PROTO_TELEMETRY_INTERVAL_MS,
        };
        GString *s = g_string_new(NULL);
        for (size_t i = 0; i < sizeof desc; i++)
                g_string_append_printf(s, "%02X", desc[i]);
        return s;
}

/* Answers a control URB from the model; returns false when the model does not answer. */
static bool handle_control(FakePen *p, Urb *u) {
        struct usbdevfs_urb *urb = urb_of(u);
        uint8_t *buf = urb->buffer;
        nd_control_setup setup = {
                .request_type = buf[0],
                .request = buf[1],
                .value = nd_read_le16(buf + 2),
                .index = nd_read_le16(buf + 4),
                .length = nd_read_le16(buf + 6),
        };
        size_t data_size = (size_t) urb->buffer_length - USB_SETUP_SIZE;
        int r;

        p->stats.control_urbs++;
        if (p->identify_reply && setup.request_type == ND_PROTO_REQTYPE_IN && setup.request == ND_PROTO_REQ_IDENTIFY) {
                gsize n;
                const uint8_t *reply = g_bytes_get_data(p->identify_reply, &n);
                r = (int) MIN(n, MIN((size_t) setup.length, data_size));
                memcpy(buf + USB_SETUP_SIZE, reply, (size_t) r);
        } else
                r = nd_penmodel_control(p->model, fakepen_now_us(), &setup, buf + USB_SETUP_SIZE, data_size);

        if (r == -ETIMEDOUT) {
                p->stats.control_unanswered++;
                return false;
        }
        if (r < 0) {
                if (r != -EPIPE)
                        g_warning("fakepen: model refused control request 0x%02x/0x%02x: %s",
                                  setup.request_type, setup.request, g_strerror(-r));
                p->stats.control_stalls++;
                urb->status = URB_STATUS_STALL;
                urb->actual_length = 0;
                return true;
        }
        urb->status = 0;
        urb->actual_length = r;
        return true;
}

static void complete_interrupt(FakePen *p, Urb *u, const uint8_t *data, size_t len) {
        struct usbdevfs_urb *urb = urb_of(u);
        size_t room = (size_t) urb->buffer_length;

        urb->status = len > room ? URB_STATUS_BABBLE : 0;
        if (len > room)
                p->stats.overflows++;
        urb->actual_length = (int) MIN(len, room);
        if (urb->actual_length > 0) /* an empty packet may come with no data pointer at all */
                memcpy(u->buf->data, data, (size_t) urb->actual_length);
        p->stats.packets++;
        g_queue_push_tail(&p->done, u);
}

/* Fills waiting interrupt IN URBs: injected packets first, then whatever the model has due. */
static void feed_interrupts(FakePen *p) {
        uint8_t packet[ND_PROTO_PACKET_MAX_SIZE];
        uint64_t now = fakepen_now_us();

        while (!g_queue_is_empty(&p->pending_int)) {
                GBytes *inj = g_queue_pop_head(&p->injected);
                if (inj) {
                        gsize n;
                        const uint8_t *d = g_bytes_get_data(inj, &n);
                        p->stats.injected++;
                        complete_interrupt(p, g_queue_pop_head(&p->pending_int), d, n);
                        g_bytes_unref(inj);
                        continue;
                }
                int r = nd_penmodel_next_packet(p->model, now, packet, sizeof packet);
                if (r <= 0) {
                        /* a model bug; counted (tests assert none), warned about once */
                        if (r < 0 && p->stats.model_errors++ == 0)
                                g_warning("fakepen: the model failed to make a packet: %s", g_strerror(-r));
                        break;
                }
                complete_interrupt(p, g_queue_pop_head(&p->pending_int), packet, (size_t) r);
        }
}

static bool discard_from(GQueue *q, FakePen *p, UMockdevIoctlClient *client, gulong addr) {
        for (GList *l = q->head; l; l = l->next) {
                Urb *u = l->data;
                if (u->client != client || u->urb->client_addr != addr)
                        continue;
                g_queue_delete_link(q, l);
                urb_of(u)->status = URB_STATUS_UNLINKED;
                urb_of(u)->actual_length = 0;
                g_queue_push_tail(&p->done, u);
                p->stats.discarded++;
                return true;
        }
        return false;
}

/* The first completed URB of this client, taken off the queue; NULL when it has none. */
static Urb *take_done(FakePen *p, UMockdevIoctlClient *client) {
        for (GList *l = p->done.head; l; l = l->next) {
                Urb *u = l->data;
                if (u->client == client) {
                        g_queue_delete_link(&p->done, l);
                        return u;
                }
        }
        return NULL;
}

/* Drops every URB of a client that closed the device, as the kernel kills them. */
static void drop_client(GQueue *q, UMockdevIoctlClient *client) {
        for (GList *l = q->head, *next; l; l = next) {
                next = l->next;
                Urb *u = l->data;
                if (u->client == client) {
                        g_queue_delete_link(q, l);
                        urb_free(u);
                }
        }
}

static void shutdown_pending(FakePen *p, GQueue *q) {
        Urb *u;
        while ((u = g_queue_pop_head(q))) {
                urb_of(u)->status = URB_STATUS_DISCONNECTED;
                urb_of(u)->actual_length = 0;
                p->stats.shutdown++;
                g_queue_push_tail(&p->done, u);
        }
}

/* Returns the errno to complete the ioctl with (0: success). */
static int handle_ioctl_locked(FakePen *p, UMockdevIoctlClient *client, gulong request, UMockdevIoctlData *arg,
                               UMockdevIoctlData *data) {
        switch (request) {
        case USBDEVFS_GET_CAPABILITIES:
                if (p->unplugged)
                        return ENODEV;
                *(uint32_t *) (void *) data->data = USBDEVFS_CAP_BULK_CONTINUATION | USBDEVFS_CAP_NO_PACKET_SIZE_LIM |
                                                    USBDEVFS_CAP_REAP_AFTER_DISCONNECT | USBDEVFS_CAP_ZERO_PACKET;
                return 0;

        case USBDEVFS_CLAIMINTERFACE:
        case USBDEVFS_RELEASEINTERFACE:
        case USBDEVFS_SETINTERFACE:
        case USBDEVFS_SETCONFIGURATION:
        case USBDEVFS_CLEAR_HALT:
        case USBDEVFS_RESETEP:
                return p->unplugged ? ENODEV : 0;

        case USBDEVFS_GETDRIVER:
        case USBDEVFS_IOCTL:
                /* no kernel driver is bound to the pen's interface */
                return p->unplugged ? ENODEV : ENODATA;

        case USBDEVFS_SUBMITURB: {
                if (p->unplugged)
                        return ENODEV;
                struct usbdevfs_urb *urb = (struct usbdevfs_urb *) (void *) data->data;
                g_autoptr(GError) err = NULL;
                Urb *u = g_new0(Urb, 1);
                u->client = g_object_ref(client);
                u->urb = g_object_ref(data);
                if (urb->buffer_length > 0) {
                        u->buf = umockdev_ioctl_data_resolve(data, offsetof(struct usbdevfs_urb, buffer),
                                                             (gsize) urb->buffer_length, &err);
                        if (!u->buf) {
                                urb_free(u);
                                return EFAULT;
                        }
                }
                if (urb->type == USBDEVFS_URB_TYPE_CONTROL && urb->buffer_length >= (int) USB_SETUP_SIZE) {
                        if (handle_control(p, u))
                                g_queue_push_tail(&p->done, u);
                        else
                                g_queue_push_tail(&p->pending_ctrl, u);
                } else if (urb->type == USBDEVFS_URB_TYPE_INTERRUPT && urb->endpoint == ND_PROTO_TELEMETRY_ENDPOINT) {
                        g_queue_push_tail(&p->pending_int, u);
                } else {
                        urb_free(u);
                        return EINVAL;
                }
                return 0;
        }

        case USBDEVFS_REAPURB:
        case USBDEVFS_REAPURBNDELAY: {
                if (p->unplugged) {
                        shutdown_pending(p, &p->pending_int);
                        shutdown_pending(p, &p->pending_ctrl);
                } else
                        feed_interrupts(p);
                Urb *u = take_done(p, client);
                if (!u) {
                        p->stats.empty_reaps++;
                        return p->unplugged ? ENODEV : EAGAIN;
                }
                /* points the client's "struct usbdevfs_urb *" at its own URB; URB and buffer
                 * are written back into the client's memory */
                umockdev_ioctl_data_set_ptr(data, 0, u->urb);
                urb_free(u);
                return 0;
        }

        case USBDEVFS_DISCARDURB: {
                /* the argument is the client's URB address itself */
                gulong addr = *(gulong *) (void *) arg->data;
                if (discard_from(&p->pending_int, p, client, addr) || discard_from(&p->pending_ctrl, p, client, addr))
                        return 0;
                return EINVAL; /* completed already */
        }

        default:
                return p->unplugged ? ENODEV : ENOTTY;
        }
}

static gboolean on_ioctl(UMockdevIoctlBase *handler, UMockdevIoctlClient *client, gpointer userdata) {
        FakePen *p = userdata;
        gulong request = umockdev_ioctl_client_get_request(client);
        UMockdevIoctlData *arg = umockdev_ioctl_client_get_arg(client);
        g_autoptr(UMockdevIoctlData) data = NULL;
        gsize size = _IOC_SIZE(request);
        int e;

        if (size > 0 && request != USBDEVFS_DISCARDURB) {
                g_autoptr(GError) err = NULL;
                data = umockdev_ioctl_data_resolve(arg, 0, size, &err); /* copies *arg from the client */
                if (!data) {
                        g_warning("fakepen: cannot read ioctl 0x%lx argument: %s", request,
                                  err ? err->message : "NULL pointer");
                        umockdev_ioctl_client_complete(client, -1, EFAULT);
                        return TRUE;
                }
        }
        g_mutex_lock(&p->lock);
        p->stats.ioctls++;
        e = handle_ioctl_locked(p, client, request, arg, data);
        g_mutex_unlock(&p->lock);
        umockdev_ioctl_client_complete(client, e ? -1 : 0, e);
        return TRUE;
}

static void on_client_vanished(UMockdevIoctlBase *handler, UMockdevIoctlClient *client, gpointer userdata) {
        FakePen *p = userdata;
        g_mutex_lock(&p->lock);
        drop_client(&p->pending_int, client);
        drop_client(&p->pending_ctrl, client);
        drop_client(&p->done, client);
        g_mutex_unlock(&p->lock);
}

FakePen *fakepen_new(UMockdevTestbed *tb, const nd_penmodel_config *config, unsigned devnum, unsigned port) {
        g_autoptr(GError) err = NULL;
        nd_penmodel_config defaults;
        FakePen *p = g_new0(FakePen, 1);
        int r;

        if (!config) {
                nd_penmodel_config_init(&defaults);
                config = &defaults;
        }
        g_mutex_init(&p->lock);
        g_queue_init(&p->pending_int);
        g_queue_init(&p->pending_ctrl);
        g_queue_init(&p->done);
        g_queue_init(&p->injected);
        r = nd_penmodel_new(config, fakepen_now_us(), &p->model);
        if (r < 0)
                g_error("fakepen: cannot create the pen model: %s", g_strerror(-r));

        p->tb = g_object_ref(tb);
        p->syspath = g_strdup_printf("/sys/devices/pci0000:00/0000:00:14.0/usb%u/%u-%u", USB_BUS_NUMBER,
                                     USB_BUS_NUMBER, port);
        p->devnode = g_strdup_printf("/dev/bus/usb/%03u/%03u", USB_BUS_NUMBER, devnum);

        /* the handler first: a hotplug client may open the node as soon as "add" arrives */
        p->handler = umockdev_ioctl_base_new();
        g_signal_connect(p->handler, "handle-ioctl", G_CALLBACK(on_ioctl), p);
        g_signal_connect(p->handler, "client-vanished", G_CALLBACK(on_client_vanished), p);
        if (!umockdev_testbed_attach_ioctl(tb, p->devnode, p->handler, &err))
                g_error("fakepen: attach_ioctl %s: %s", p->devnode, err->message);

        g_autoptr(GString) desc = descriptors_hex();
        g_autofree char *record = g_strdup_printf(
                "P: %s\n"
                "N: %s=%s\n"
                "E: SUBSYSTEM=usb\nE: DEVTYPE=usb_device\nE: DRIVER=usb\n"
                "E: DEVNAME=%s\nE: BUSNUM=%03u\nE: DEVNUM=%03u\nE: PRODUCT=%x/%x/100\n"
                "H: descriptors=%s\n"
                "A: busnum=%u\nA: devnum=%u\nA: speed=%u\nA: bConfigurationValue=1\n"
                "A: idVendor=%04x\nA: idProduct=%04x\nA: dev=%u:%u\n",
                p->syspath + strlen("/sys"), p->devnode + strlen("/dev/"), desc->str,
                p->devnode, USB_BUS_NUMBER, devnum, PEN_USB_VID_DEFAULT, PEN_USB_PID_DEFAULT,
                desc->str, USB_BUS_NUMBER, devnum, USB_SPEED_FULL_MBPS, PEN_USB_VID_DEFAULT, PEN_USB_PID_DEFAULT,
                USB_DEVICE_MAJOR, devnum);
        if (!umockdev_testbed_add_from_string(tb, record, &err)) /* sends "add" */
                g_error("fakepen: add device: %s", err->message);
        return p;
}

void fakepen_unplug(FakePen *p) {
        g_mutex_lock(&p->lock);
        bool was = p->unplugged;
        p->unplugged = true;
        g_mutex_unlock(&p->lock);
        if (was)
                return;
        /* the uevent needs the sysfs directory: send it before removing the device */
        umockdev_testbed_uevent(p->tb, p->syspath, "remove");
        umockdev_testbed_remove_device(p->tb, p->syspath);
}

void fakepen_free(FakePen *p) {
        if (!p)
                return;
        fakepen_unplug(p);
        umockdev_testbed_detach_ioctl(p->tb, p->devnode, NULL);
        g_signal_handlers_disconnect_by_data(p->handler, p);
        /* URBs of a client still connected when the handler goes */
        g_queue_clear_full(&p->pending_int, (GDestroyNotify) urb_free);
        g_queue_clear_full(&p->pending_ctrl, (GDestroyNotify) urb_free);
        g_queue_clear_full(&p->done, (GDestroyNotify) urb_free);
        g_queue_clear_full(&p->injected, (GDestroyNotify) g_bytes_unref);
        g_clear_pointer(&p->identify_reply, g_bytes_unref);
        nd_penmodel_unref(p->model);
        g_object_unref(p->handler);
        g_object_unref(p->tb);
        g_mutex_clear(&p->lock);
        g_free(p->syspath);
        g_free(p->devnode);
        g_free(p);
}

nd_penmodel *fakepen_lock(FakePen *p) {
        g_mutex_lock(&p->lock);
        nd_penmodel_advance(p->model, fakepen_now_us());
        return p->model;
}

void fakepen_unlock(FakePen *p) {
        g_mutex_unlock(&p->lock);
}

void fakepen_inject_packet(FakePen *p, const uint8_t *data, size_t len) {
        g_mutex_lock(&p->lock);
        g_queue_push_tail(&p->injected, g_bytes_new(data, len));
        g_mutex_unlock(&p->lock);
}

void fakepen_set_identify_reply(FakePen *p, const uint8_t *reply, size_t len) {
        g_mutex_lock(&p->lock);
        g_clear_pointer(&p->identify_reply, g_bytes_unref);
        if (reply)
                p->identify_reply = g_bytes_new(reply, len);
        g_mutex_unlock(&p->lock);
}

void fakepen_get_stats(FakePen *p, FakePenStats *ret) {
        g_mutex_lock(&p->lock);
        *ret = p->stats;
        g_mutex_unlock(&p->lock);
}

const char *fakepen_syspath(const FakePen *p) {
        return p->syspath;
}
