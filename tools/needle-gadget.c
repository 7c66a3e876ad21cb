/* needle-gadget: the pen model (lib/penmodel.c) as a real USB device through Linux FunctionFS.
 *
 *   needle-gadget --ffs /dev/ffs-NAME --serial SERIAL [--motor-log FILE] [--control SOCKET]
 *                 [--ready FILE] [--cartridge ID:NEEDLES] [--battery PCT]
 *   needle-gadget ctl SOCKET COMMAND [ARGS...]
 *
 * One sd-event loop, no threads. ep0 is polled and read O_NONBLOCK (a read(ep0) that sleeps for
 * events holds the FunctionFS mutex, and unbinding the UDC then deadlocks on Linux 6.1); the
 * interrupt IN endpoint is written with Linux AIO, a few packets in flight, so a host that does not
 * poll it never blocks ep0. The pen itself (requests, packets, motor log, commands) is
 * needle-gadget-core.c. docs/needle-gadget.md is the manual. */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/aio_abi.h>
#include <linux/usb/ch9.h>
#include <linux/usb/functionfs.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <systemd/sd-event.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "needle-gadget-core.h"
#include "protocol.h"
#include "util.h"

#define EP0_EVENTS_MAX 4u          /* FunctionFS queues at most four events */
#define EP0_RETRY_MAX 100u         /* ep0 I/O refused with EAGAIN (its mutex busy): retries ... */
#define EP0_RETRY_SLEEP_NS 1000000L /* ... 1 ms apart */
/* A request the unresponsive pen ignores stays pending in FunctionFS; every ep0 read or write
 * would act on it, and poll() reports ep0 ready while it is pending. So ep0 is left alone for
 * longer than any host waits for an answer (needled: 1 s), then the request is resolved with a
 * late STALL, or found cancelled by a newer event. */
#define UNRESPONSIVE_HOLD_US (5 * USEC_PER_SEC)
/* Telemetry packets queued in the UDC at once: as many as needled keeps IN transfers in flight,
 * so a controller that serves several packets per tick (dummy_hcd on a HZ=250 kernel: every 4 ms)
 * finds them ready. */
#define IN_FLIGHT_MAX 8u
#define CLIENT_MAX 16u
#define LISTEN_BACKLOG 8
#define EXIT_CTL_ERROR 1
#define EXIT_CTL_CONNECT 2

typedef struct Gadget Gadget;

typedef struct Client {
        Gadget *gadget;
        int fd;
        sd_event_source *source;
        char buf[NG_COMMAND_LINE_MAX];
        size_t len;
} Client;

struct Gadget {
        sd_event *event;
        ng_gadget *pen;
        FILE *motor_log;
        const char *ffs_dir;

        int ep0_fd;
        sd_event_source *ep0_source;
        bool connected; /* ENABLE seen, no DISABLE/UNBIND since */

        /* a request held unanswered (unresponsive pen) */
        sd_event_source *hold_timer;
        bool hold_in;

        /* interrupt IN: AIO, up to IN_FLIGHT_MAX writes in flight */
        int ep_in_fd;
        aio_context_t aio;
        int aio_efd;
        sd_event_source *aio_source;
        unsigned in_flight;
        uint64_t submitted;
        uint8_t packets[IN_FLIGHT_MAX][ND_PROTO_PACKET_MAX_SIZE];
        int last_in_error;

        sd_event_source *timer;

        const char *control_path;
        int listen_fd;
        sd_event_source *listen_source;
        Client *clients[CLIENT_MAX];
};

static uint64_t clock_us(clockid_t id) {
        struct timespec ts;
        clock_gettime(id, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static uint64_t now_us(void) {
        return clock_us(CLOCK_MONOTONIC);
}

/* One motor log line; the event happened at mono_us, its wall-clock time is derived from now. */
static void on_log(uint64_t mono_us, const char *text, void *userdata) {
        Gadget *g = userdata;
        uint64_t mono_now = now_us(), rt_now = clock_us(CLOCK_REALTIME);
        uint64_t rt = rt_now - (mono_now > mono_us ? mono_now - mono_us : 0);

        fprintf(g->motor_log, "%" PRIu64 " %" PRIu64 " %s\n", rt, mono_us, text);
        fflush(g->motor_log);
}

_printf_(2, 3) static void log_event(Gadget *g, const char *fmt, ...) {
        char text[NG_REPLY_MAX];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(text, sizeof text, fmt, ap);
        va_end(ap);
        on_log(now_us(), text, g);
}

/* ---- Linux AIO (no libaio: the raw system calls) ----------------------------------------------- */

static int aio_setup(unsigned nr, aio_context_t *ctx) {
        return syscall(SYS_io_setup, nr, ctx) < 0 ? -errno : 0;
}

static void aio_destroy(aio_context_t ctx) {
        (void) syscall(SYS_io_destroy, ctx);
}

static int aio_submit(aio_context_t ctx, struct iocb *cb) {
        struct iocb *list[1] = { cb };
        return syscall(SYS_io_submit, ctx, 1L, list) < 0 ? -errno : 0;
}

static int aio_reap(aio_context_t ctx, struct io_event *events, long n) {
        struct timespec zero = { 0, 0 };
        long r = syscall(SYS_io_getevents, ctx, 0L, n, events, &zero);
        return r < 0 ? -errno : (int) r;
}

/* ---- scheduling ----------------------------------------------------------------------------------- */

static void reschedule(Gadget *g) {
        uint64_t next = ng_gadget_next_wakeup_us(g->pen);
        if (g->ep_in_fd >= 0 && g->in_flight < IN_FLIGHT_MAX)
                next = MIN(next, ng_gadget_next_packet_us(g->pen));
        if (next == UINT64_MAX) {
                (void) sd_event_source_set_enabled(g->timer, SD_EVENT_OFF);
                return;
        }
        (void) sd_event_source_set_time(g->timer, next);
        (void) sd_event_source_set_enabled(g->timer, SD_EVENT_ONESHOT);
}

/* Submits the telemetry packets due while the UDC has room for them. FunctionFS copies the data
 * at submission, but each write still gets its own buffer. */
static void pump(Gadget *g) {
        uint64_t now = now_us();

        ng_gadget_advance(g->pen, now);
        while (g->ep_in_fd >= 0 && g->in_flight < IN_FLIGHT_MAX && ng_gadget_next_packet_us(g->pen) <= now) {
                uint8_t *buf = g->packets[g->submitted % IN_FLIGHT_MAX];
                int len = ng_gadget_next_packet(g->pen, now, buf, ND_PROTO_PACKET_MAX_SIZE);
                if (len <= 0)
                        return;
                struct iocb cb = {
                        .aio_data = g->submitted,
                        .aio_lio_opcode = IOCB_CMD_PWRITE,
                        .aio_fildes = (uint32_t) g->ep_in_fd,
                        .aio_buf = (uint64_t) (uintptr_t) buf,
                        .aio_nbytes = (uint64_t) len,
                        .aio_flags = IOCB_FLAG_RESFD,
                        .aio_resfd = (uint32_t) g->aio_efd,
                };
                int r = aio_submit(g->aio, &cb);
                if (r < 0) { /* the packet is lost: the host sees a gap */
                        ng_gadget_packet_lost(g->pen, buf, (size_t) len);
                        if (r != g->last_in_error)
                                log_event(g, "event in-error submit errno=%s", strerror(-r));
                        g->last_in_error = r;
                        return;
                }
                g->submitted++;
                g->in_flight++;
        }
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Gadget *g = userdata;
        pump(g);
        reschedule(g);
        return 0;
}

static int on_aio(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Gadget *g = userdata;
        struct io_event events[IN_FLIGHT_MAX];
        uint64_t count;

        if (read(g->aio_efd, &count, sizeof count) < 0 && errno != EAGAIN)
                return 0;
        int n = aio_reap(g->aio, events, (long) ELEMENTSOF(events));
        for (int i = 0; i < n; i++) {
                if (g->in_flight > 0)
                        g->in_flight--;
                if (events[i].res < 0) {
                        int e = (int) events[i].res;
                        ng_gadget_packet_lost(g->pen, g->packets[events[i].data % IN_FLIGHT_MAX], ND_PROTO_PACKET_MAX_SIZE);
                        if (e != g->last_in_error)
                                log_event(g, "event in-error errno=%s", strerror(-e));
                        g->last_in_error = e;
                } else
                        g->last_in_error = 0;
        }
        pump(g);
        reschedule(g);
        return 0;
}

/* ---- the interrupt IN endpoint --------------------------------------------------------------------- */

static void close_in(Gadget *g) {
        if (g->ep_in_fd < 0)
                return;
        /* io_destroy cancels the write in flight (FunctionFS dequeues it) and waits for it */
        aio_destroy(g->aio);
        g->aio = 0;
        g->in_flight = 0;
        close(g->ep_in_fd);
        g->ep_in_fd = -1;
}

static int open_in(Gadget *g) {
        char path[PATH_MAX];
        int r;

        close_in(g);
        snprintf(path, sizeof path, "%s/ep1", g->ffs_dir);
        /* O_NONBLOCK: a submission while the endpoint is disabled fails instead of waiting */
        g->ep_in_fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (g->ep_in_fd < 0) {
                r = -errno;
                log_event(g, "event in-error open errno=%s", strerror(-r));
                return r;
        }
        r = aio_setup(IN_FLIGHT_MAX, &g->aio);
        if (r < 0) {
                log_event(g, "event in-error io_setup errno=%s", strerror(-r));
                close(TAKE_FD(g->ep_in_fd));
                return r;
        }
        g->last_in_error = 0;
        return 0;
}

/* ---- ep0 --------------------------------------------------------------------------------------------- */

/* One ep0 transfer: reply (write), data or status stage (read), or a STALL (the wrong direction).
 * Returns the bytes moved or -errno; EL2HLT is the answer to a STALL. */
static ssize_t ep0_io(Gadget *g, bool write_it, void *buf, size_t len) {
        const struct timespec pause = { 0, EP0_RETRY_SLEEP_NS };
        for (unsigned i = 0;; i++) {
                ssize_t n = write_it ? write(g->ep0_fd, buf, len) : read(g->ep0_fd, buf, len);
                if (n >= 0)
                        return n;
                if ((errno != EAGAIN && errno != EINTR) || i == EP0_RETRY_MAX)
                        return -errno;
                nanosleep(&pause, NULL);
        }
}

static void stall(Gadget *g, bool in) {
        ssize_t r = ep0_io(g, !in, NULL, 0);
        if (r != -EL2HLT && r != -EIDRM)
                log_event(g, "event ep0-error stall errno=%s", strerror((int) -r));
}

static int on_hold_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Gadget *g = userdata;
        stall(g, g->hold_in); /* a late STALL, or EIDRM when a newer event cancelled it */
        log_event(g, "event unanswered-released");
        (void) sd_event_source_set_enabled(g->ep0_source, SD_EVENT_ON);
        return 0;
}

static void hold(Gadget *g, bool in) {
        g->hold_in = in;
        (void) sd_event_source_set_enabled(g->ep0_source, SD_EVENT_OFF);
        (void) sd_event_source_set_time(g->hold_timer, now_us() + UNRESPONSIVE_HOLD_US);
        (void) sd_event_source_set_enabled(g->hold_timer, SD_EVENT_ONESHOT);
}

static void handle_setup(Gadget *g, const struct usb_ctrlrequest *c) {
        nd_control_setup setup = {
                .request_type = c->bRequestType,
                .request = c->bRequest,
                .value = le16toh(c->wValue),
                .index = le16toh(c->wIndex),
                .length = le16toh(c->wLength),
        };
        bool in = setup.request_type & ND_CONTROL_DIR_IN;
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE + ND_PROTO_IDENTITY_SIZE];
        ssize_t n;
        int r;

        if (in) {
                r = ng_gadget_control(g->pen, now_us(), &setup, NULL, 0, buf, sizeof buf);
                if (r >= 0) {
                        n = ep0_io(g, true, buf, (size_t) r);
                        if (n < 0 && n != -EIDRM)
                                log_event(g, "event ep0-error reply errno=%s", strerror((int) -n));
                } else if (r == -ETIMEDOUT)
                        hold(g, true);
                else
                        stall(g, true);
                return;
        }
        if (setup.length == 0) {
                r = ng_gadget_control(g->pen, now_us(), &setup, NULL, 0, NULL, 0);
                if (r >= 0) {
                        n = ep0_io(g, false, NULL, 0); /* the status stage */
                        if (n < 0 && n != -EIDRM)
                                log_event(g, "event ep0-error status errno=%s", strerror((int) -n));
                } else if (r == -ETIMEDOUT)
                        hold(g, false);
                else
                        stall(g, false);
                return;
        }
        r = ng_gadget_data_stage(g->pen, now_us(), &setup);
        if (r == -ETIMEDOUT) {
                hold(g, false);
                return;
        }
        if (r < 0) {
                stall(g, false);
                return;
        }
        n = ep0_io(g, false, buf, setup.length);
        if (n < 0) {
                if (n != -EIDRM)
                        log_event(g, "event ep0-error data errno=%s", strerror((int) -n));
                return;
        }
        if ((size_t) n != setup.length) {
                log_event(g, "event short-data length=%zd expected=%u", n, setup.length);
                return;
        }
        r = ng_gadget_control(g->pen, now_us(), &setup, buf, (size_t) n, NULL, 0);
        if (r < 0) /* the UDC has acked the status stage already: the model applied nothing */
                log_event(g, "event refused-after-data request=0x%02x (FunctionFS cannot stall after an OUT data stage)",
                          setup.request);
}

static void disconnect(Gadget *g) {
        close_in(g);
        if (g->connected) {
                int r = ng_gadget_usb_reset(g->pen, now_us());
                if (r < 0)
                        log_event(g, "event usb-reset-error errno=%s", strerror(-r));
        } else
                ng_gadget_stop_motor(g->pen, now_us(), NG_STOP_UNBIND);
        g->connected = false;
}

static int on_ep0(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Gadget *g = userdata;
        struct usb_functionfs_event ev[EP0_EVENTS_MAX];

        ssize_t n = read(fd, ev, sizeof ev);
        if (n < 0) {
                if (errno == EAGAIN || errno == EINTR || errno == EIDRM)
                        return 0;
                log_event(g, "event ep0-error read errno=%s", strerror(errno));
                return sd_event_exit(g->event, EXIT_FAILURE);
        }
        for (size_t i = 0; i < (size_t) n / sizeof ev[0]; i++) {
                switch (ev[i].type) {
                case FUNCTIONFS_BIND:
                        log_event(g, "event bind");
                        break;
                case FUNCTIONFS_UNBIND:
                        log_event(g, "event unbind");
                        disconnect(g);
                        break;
                case FUNCTIONFS_ENABLE:
                        log_event(g, "event enable");
                        if (open_in(g) >= 0)
                                g->connected = true;
                        break;
                case FUNCTIONFS_DISABLE:
                        log_event(g, "event disable");
                        disconnect(g);
                        break;
                case FUNCTIONFS_SETUP:
                        handle_setup(g, &ev[i].u.setup);
                        break;
                case FUNCTIONFS_SUSPEND:
                        log_event(g, "event suspend");
                        break;
                case FUNCTIONFS_RESUME:
                        log_event(g, "event resume");
                        break;
                default:
                        log_event(g, "event unknown-ep0-event type=%u", ev[i].type);
                        break;
                }
        }
        pump(g);
        reschedule(g);
        return 0;
}

/* ---- the control socket ------------------------------------------------------------------------------ */

static void client_free(Client *c) {
        if (!c)
                return;
        for (size_t i = 0; i < CLIENT_MAX; i++)
                if (c->gadget->clients[i] == c)
                        c->gadget->clients[i] = NULL;
        sd_event_source_disable_unref(c->source);
        close(c->fd);
        free(c);
}

static void client_run(Client *c, const char *line) {
        char reply[NG_REPLY_MAX + 1];
        (void) ng_gadget_command(c->gadget->pen, now_us(), line, reply, sizeof reply - 1);
        size_t len = strlen(reply);
        reply[len++] = '\n';
        (void) send(c->fd, reply, len, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static int on_client(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Client *c = userdata;
        Gadget *g = c->gadget;

        ssize_t n = recv(fd, c->buf + c->len, sizeof c->buf - 1 - c->len, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return 0;
        if (n <= 0) {
                if (n == 0 && c->len > 0) { /* a last command without its newline */
                        c->buf[c->len] = '\0';
                        client_run(c, c->buf);
                }
                client_free(c);
                return 0;
        }
        c->len += (size_t) n;
        c->buf[c->len] = '\0';
        char *start = c->buf, *nl;
        while ((nl = strchr(start, '\n'))) {
                *nl = '\0';
                client_run(c, start);
                start = nl + 1;
        }
        c->len -= (size_t) (start - c->buf);
        memmove(c->buf, start, c->len);
        if (c->len == sizeof c->buf - 1) {
                const char err[] = "error command line too long\n";
                (void) send(fd, err, sizeof err - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
                client_free(c);
        }
        pump(g);
        reschedule(g);
        return 0;
}

static int on_listen(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Gadget *g = userdata;
        size_t slot = CLIENT_MAX;

        int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0)
                return 0;
        for (size_t i = 0; i < CLIENT_MAX && slot == CLIENT_MAX; i++)
                if (!g->clients[i])
                        slot = i;
        Client *c = slot < CLIENT_MAX ? calloc(1, sizeof *c) : NULL;
        if (!c) {
                const char err[] = "error too many control connections\n";
                (void) send(cfd, err, sizeof err - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
                close(cfd);
                return 0;
        }
        c->gadget = g;
        c->fd = cfd;
        if (sd_event_add_io(g->event, &c->source, cfd, EPOLLIN, on_client, c) < 0) {
                close(cfd);
                free(c);
                return 0;
        }
        g->clients[slot] = c;
        return 0;
}

static int sockaddr_for(const char *path, struct sockaddr_un *sa) {
        *sa = (struct sockaddr_un) { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa->sun_path)
                return -ENAMETOOLONG;
        memcpy(sa->sun_path, path, strlen(path) + 1);
        return 0;
}

static int listen_control(Gadget *g) {
        struct sockaddr_un sa;
        struct stat st;
        int r = sockaddr_for(g->control_path, &sa);
        if (r < 0)
                return r;
        if (lstat(g->control_path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode))
                        return -EEXIST; /* never remove something that is not a stale socket */
                (void) unlink(g->control_path);
        }
        g->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (g->listen_fd < 0)
                return -errno;
        if (bind(g->listen_fd, (struct sockaddr *) &sa, sizeof sa) < 0 || listen(g->listen_fd, LISTEN_BACKLOG) < 0)
                return -errno;
        return sd_event_add_io(g->event, &g->listen_source, g->listen_fd, EPOLLIN, on_listen, g);
}

/* ---- ctl: a client for scripts --------------------------------------------------------------------------- */

static int run_ctl(int argc, char **argv) {
        char line[NG_COMMAND_LINE_MAX], reply[NG_REPLY_MAX + 2];
        struct sockaddr_un sa;
        size_t off = 0, got = 0;

        if (argc < 2) {
                fprintf(stderr, "usage: needle-gadget ctl SOCKET COMMAND [ARGS...]\n");
                return EXIT_CTL_ERROR;
        }
        for (int i = 1; i < argc; i++) {
                int n = snprintf(line + off, sizeof line - off, "%s%s", i > 1 ? " " : "", argv[i]);
                if (n < 0 || (size_t) n >= sizeof line - off - 1) {
                        fprintf(stderr, "needle-gadget ctl: command too long\n");
                        return EXIT_CTL_ERROR;
                }
                off += (size_t) n;
        }
        line[off++] = '\n';
        if (sockaddr_for(argv[0], &sa) < 0) {
                fprintf(stderr, "needle-gadget ctl: socket path too long\n");
                return EXIT_CTL_CONNECT;
        }
        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                fprintf(stderr, "needle-gadget ctl: cannot connect to %s: %s\n", argv[0], strerror(errno));
                return EXIT_CTL_CONNECT;
        }
        if (send(fd, line, off, MSG_NOSIGNAL) != (ssize_t) off) {
                fprintf(stderr, "needle-gadget ctl: cannot send: %s\n", strerror(errno));
                return EXIT_CTL_CONNECT;
        }
        (void) shutdown(fd, SHUT_WR);
        while (got < sizeof reply - 1) {
                ssize_t n = recv(fd, reply + got, sizeof reply - 1 - got, 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                got += (size_t) n;
                if (memchr(reply, '\n', got))
                        break;
        }
        reply[got] = '\0';
        char *nl = strchr(reply, '\n');
        if (nl)
                *nl = '\0';
        if (got == 0) {
                fprintf(stderr, "needle-gadget ctl: no reply\n");
                return EXIT_CTL_CONNECT;
        }
        printf("%s\n", reply);
        return strncmp(reply, "ok", 2) == 0 && (reply[2] == '\0' || reply[2] == ' ') ? EXIT_SUCCESS : EXIT_CTL_ERROR;
}

/* ---- main ------------------------------------------------------------------------------------------------ */

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Gadget *g = userdata;
        ng_gadget_stop_motor(g->pen, now_us(), NG_STOP_EXIT);
        log_event(g, "event exit signal=%s", strsignal((int) si->ssi_signo));
        return sd_event_exit(g->event, EXIT_SUCCESS);
}

static int write_all(int fd, const uint8_t *buf, size_t len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0)
                return -errno;
        return (size_t) n == len ? 0 : -EIO;
}

static void usage(FILE *f) {
        fprintf(f,
                "usage: needle-gadget --ffs DIR --serial SERIAL [--motor-log FILE] [--control SOCKET]\n"
                "                     [--ready FILE] [--cartridge ID:NEEDLES] [--battery PERCENT]\n"
                "                     [--telemetry-rate HZ]\n"
                "       needle-gadget ctl SOCKET COMMAND [ARGS...]\n"
                "A needle pen (the needled pen model, USB id %04x:%04x) on a mounted FunctionFS instance.\n"
                "See docs/needle-gadget.md.\n",
                PEN_USB_VID_DEFAULT, PEN_USB_PID_DEFAULT);
}

static int parse_cartridge(const char *arg, char *id, size_t id_size, unsigned *needles) {
        const char *colon = strrchr(arg, ':');
        char *end = NULL;
        if (!colon || colon == arg || (size_t) (colon - arg) >= id_size)
                return -EINVAL;
        memcpy(id, arg, (size_t) (colon - arg));
        id[colon - arg] = '\0';
        errno = 0;
        unsigned long n = strtoul(colon + 1, &end, 10);
        if (errno || !end || *end || colon[1] == '\0' || n < 1 || n > UINT8_MAX)
                return -EINVAL;
        *needles = (unsigned) n;
        return 0;
}

int main(int argc, char **argv) {
        static const struct option options[] = {
                { "ffs", required_argument, NULL, 'f' },
                { "serial", required_argument, NULL, 's' },
                { "motor-log", required_argument, NULL, 'm' },
                { "control", required_argument, NULL, 'c' },
                { "ready", required_argument, NULL, 'r' },
                { "cartridge", required_argument, NULL, 'k' },
                { "battery", required_argument, NULL, 'b' },
                { "telemetry-rate", required_argument, NULL, 't' },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        Gadget g = { .ep0_fd = -1, .ep_in_fd = -1, .aio_efd = -1, .listen_fd = -1, .motor_log = stderr };
        nd_penmodel_config config;
        const char *motor_log = NULL, *ready = NULL, *serial = NULL, *cartridge = NULL;
        char cartridge_id[ND_PROTO_CARTRIDGE_ID_SIZE + 2];
        unsigned needles = 0, battery = ND_PROTO_BATTERY_MAX_PERCENT;
        uint8_t desc[NG_DESCRIPTORS_MAX];
        int opt, r;

        if (argc >= 2 && STREQ(argv[1], "ctl"))
                return run_ctl(argc - 2, argv + 2);

        nd_penmodel_config_init(&config);
        while ((opt = getopt_long(argc, argv, "h", options, NULL)) >= 0) {
                switch (opt) {
                case 'f': g.ffs_dir = optarg; break;
                case 's': serial = optarg; break;
                case 'm': motor_log = optarg; break;
                case 'c': g.control_path = optarg; break;
                case 'r': ready = optarg; break;
                case 'k': cartridge = optarg; break;
                case 'b':
                        if (ng_parse_unsigned(optarg, 0, ND_PROTO_BATTERY_MAX_PERCENT, &battery) < 0) {
                                fprintf(stderr, "needle-gadget: --battery must be 0..%u, not '%s'\n",
                                        ND_PROTO_BATTERY_MAX_PERCENT, optarg);
                                return EXIT_FAILURE;
                        }
                        break;
                case 't':
                        if (ng_parse_unsigned(optarg, ND_PROTO_TELEMETRY_RATE_MIN_HZ, ND_PROTO_TELEMETRY_RATE_MAX_HZ,
                                              &config.telemetry_rate_hz) < 0) {
                                fprintf(stderr, "needle-gadget: --telemetry-rate must be %u..%u (Hz), not '%s'\n",
                                        ND_PROTO_TELEMETRY_RATE_MIN_HZ, ND_PROTO_TELEMETRY_RATE_MAX_HZ, optarg);
                                return EXIT_FAILURE;
                        }
                        break;
                case 'h': usage(stdout); return EXIT_SUCCESS;
                default: usage(stderr); return EXIT_FAILURE;
                }
        }
        if (optind < argc || !g.ffs_dir || !serial) {
                usage(stderr);
                return EXIT_FAILURE;
        }
        if (strlen(serial) > ND_PROTO_SERIAL_SIZE) {
                fprintf(stderr, "needle-gadget: --serial is 1..%u characters\n", ND_PROTO_SERIAL_SIZE);
                return EXIT_FAILURE;
        }
        snprintf(config.serial, sizeof config.serial, "%s", serial);
        config.battery_percent = battery;
        if (cartridge && parse_cartridge(cartridge, cartridge_id, sizeof cartridge_id, &needles) < 0) {
                fprintf(stderr, "needle-gadget: --cartridge wants ID:NEEDLES (NEEDLES 1..255), not '%s'\n", cartridge);
                return EXIT_FAILURE;
        }
        if (motor_log) {
                g.motor_log = fopen(motor_log, "ae");
                if (!g.motor_log) {
                        fprintf(stderr, "needle-gadget: %s: %s\n", motor_log, strerror(errno));
                        return EXIT_FAILURE;
                }
        }

        r = ng_gadget_new(&config, now_us(), on_log, &g, &g.pen);
        if (r < 0) {
                fprintf(stderr, "needle-gadget: bad pen configuration (serial '%s': 1..16 printable, no spaces)\n", serial);
                return EXIT_FAILURE;
        }
        if (cartridge && nd_penmodel_insert_cartridge(ng_gadget_model(g.pen), now_us(), cartridge_id, needles) < 0) {
                fprintf(stderr, "needle-gadget: bad cartridge id '%s'\n", cartridge_id);
                return EXIT_FAILURE;
        }

        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/ep0", g.ffs_dir);
        g.ep0_fd = open(path, O_RDWR | O_CLOEXEC);
        if (g.ep0_fd < 0) {
                fprintf(stderr, "needle-gadget: %s: %s (is FunctionFS mounted there?)\n", path, strerror(errno));
                return EXIT_FAILURE;
        }
        int len = ng_descriptors(desc, sizeof desc);
        if (len < 0 || (r = write_all(g.ep0_fd, desc, (size_t) len)) < 0) {
                fprintf(stderr, "needle-gadget: writing the descriptors to %s: %s\n", path, strerror(len < 0 ? -len : -r));
                return EXIT_FAILURE;
        }
        len = ng_strings(desc, sizeof desc);
        if (len < 0 || (r = write_all(g.ep0_fd, desc, (size_t) len)) < 0) {
                fprintf(stderr, "needle-gadget: writing the strings to %s: %s\n", path, strerror(len < 0 ? -len : -r));
                return EXIT_FAILURE;
        }
        /* From here on ep0 is only read after poll() said so, and never sleeps for events. */
        if (fcntl(g.ep0_fd, F_SETFL, fcntl(g.ep0_fd, F_GETFL) | O_NONBLOCK) < 0) {
                fprintf(stderr, "needle-gadget: O_NONBLOCK on ep0: %s\n", strerror(errno));
                return EXIT_FAILURE;
        }

        sigset_t mask;
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);

        g.aio_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (g.aio_efd < 0 || sd_event_default(&g.event) < 0 ||
            sd_event_add_io(g.event, &g.ep0_source, g.ep0_fd, EPOLLIN, on_ep0, &g) < 0 ||
            sd_event_add_io(g.event, &g.aio_source, g.aio_efd, EPOLLIN, on_aio, &g) < 0 ||
            sd_event_add_time(g.event, &g.timer, CLOCK_MONOTONIC, UINT64_MAX, 1, on_timer, &g) < 0 ||
            sd_event_add_time(g.event, &g.hold_timer, CLOCK_MONOTONIC, UINT64_MAX, 1, on_hold_timer, &g) < 0 ||
            sd_event_add_signal(g.event, NULL, SIGTERM, on_signal, &g) < 0 ||
            sd_event_add_signal(g.event, NULL, SIGINT, on_signal, &g) < 0) {
                fprintf(stderr, "needle-gadget: cannot set up the event loop\n");
                return EXIT_FAILURE;
        }
        (void) sd_event_source_set_enabled(g.timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(g.hold_timer, SD_EVENT_OFF);
        /* A heartbeat waiting on ep0 goes to the model before a timer advances it past the
         * watchdog deadline: on a busy machine the pen must not expire on a host that was on time. */
        (void) sd_event_source_set_priority(g.ep0_source, SD_EVENT_PRIORITY_IMPORTANT);
        if (g.control_path && (r = listen_control(&g)) < 0) {
                fprintf(stderr, "needle-gadget: control socket %s: %s\n", g.control_path, strerror(-r));
                return EXIT_FAILURE;
        }
        log_event(&g, "event ready serial=%s vid=%04x pid=%04x%s%s", serial, PEN_USB_VID_DEFAULT, PEN_USB_PID_DEFAULT,
                  cartridge ? " cartridge=" : "", cartridge ? cartridge_id : "");
        if (ready) {
                int fd = open(ready, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                if (fd < 0) {
                        fprintf(stderr, "needle-gadget: %s: %s\n", ready, strerror(errno));
                        return EXIT_FAILURE;
                }
                close(fd);
        }

        r = sd_event_loop(g.event);

        close_in(&g);
        for (size_t i = 0; i < CLIENT_MAX; i++)
                client_free(g.clients[i]);
        if (g.listen_fd >= 0) {
                sd_event_source_disable_unref(g.listen_source);
                close(g.listen_fd);
                (void) unlink(g.control_path);
        }
        sd_event_source_disable_unref(g.ep0_source);
        sd_event_source_disable_unref(g.aio_source);
        sd_event_source_disable_unref(g.timer);
        sd_event_source_disable_unref(g.hold_timer);
        close(g.ep0_fd);
        close(g.aio_efd);
        sd_event_unref(g.event);
        ng_gadget_free(g.pen);
        if (g.motor_log != stderr)
                fclose(g.motor_log);
        return r < 0 ? EXIT_FAILURE : r;
}
