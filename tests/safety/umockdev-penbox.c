/* umockdev-penbox: pens on an emulated USB bus (umockdev testbed + tests/usb/fakepen.c, the pen
 * model behind usbdevfs), driven by a test over a control socket, for needled running in ANOTHER
 * process with umockdev's preload library (LD_PRELOAD=libumockdev-preload.so.0 and UMOCKDEV_DIR
 * from the `env` command). The pens live here, not in the daemon: the daemon can be SIGKILLed and
 * restarted while the pen model keeps its state, so a test can see what the pen does when its
 * host dies (its watchdog stops the motor) and what the model's motor really does at any time.
 *
 * Usage: umockdev-penbox SOCKET_PATH
 * SOCKET_PATH is created as an AF_UNIX SOCK_SEQPACKET socket; one command per datagram, one
 * reply per command ("ok ...", or "error: why"). Commands:
 *   env                           UMOCKDEV_DIR=<testbed root>
 *   plug NAME SERIAL DEVNUM [RATE_HZ]  a new pen (fresh model) at /dev/bus/usb/001/DEVNUM; the
 *                                 other commands address it by NAME (serials may repeat)
 *   unplug NAME                   as if the cable were pulled; the model stays readable
 *   free NAME                     forgets an unplugged pen
 *   state NAME                    the model now: key=value pairs (see cmd_state)
 *   insert NAME ID NEEDLES        a cartridge into the handpiece
 *   eject NAME                    the cartridge out (the pen stops its motor itself)
 *   fault NAME FAULT              Simulator.InjectFault names (over-current, unresponsive, ...)
 *   battery NAME PERCENT
 *   spin NAME SPEED_HZ WATCHDOG_MS  the motor started by a host that has gone since (the model
 *                                 answers these requests directly; needs a cartridge)
 *   mute NAME                     telemetry off, the pen answering otherwise (a stuck sampler)
 *   reset-sequence NAME BACK      one packet whose sample counts from BACK below the current
 *                                 sequence number, as a pen that rebooted behind the host's back
 *   quit
 * Exits on quit, on SIGTERM/SIGINT, or when the test's connection closes after a quit. */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "protocol.h"
#include "util.h"
/* After util.h: GLib redefines MIN/MAX the same way, undefining them first. */
#include "fakepen.h"

#define PENS_MAX 8
#define COMMAND_MAX 512
#define REPLY_MAX 1024
#define ARGS_MAX 6

/* The daemon this box serves runs with umockdev's preload first in LD_PRELOAD, where ASan wants
 * its runtime; the box itself links umockdev directly. Same reasoning as tests/usb. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) {
        return "verify_asan_link_order=0";
}

typedef struct Slot {
        char name[ND_PROTO_SERIAL_SIZE + 1];
        FakePen *pen;
        bool unplugged;
} Slot;

static UMockdevTestbed *testbed;
static Slot slots[PENS_MAX];

static Slot *find(const char *name) {
        for (size_t i = 0; i < PENS_MAX; i++)
                if (slots[i].pen && strcmp(slots[i].name, name) == 0)
                        return &slots[i];
        return NULL;
}

static int reply(char *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int reply(char *out, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(out, REPLY_MAX, fmt, ap);
        va_end(ap);
        return n < 0 ? 0 : MIN(n, REPLY_MAX - 1);
}

static bool parse_uint(const char *s, unsigned max, unsigned *ret) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (errno || end == s || *end || v > max)
                return false;
        *ret = (unsigned) v;
        return true;
}

static int cmd_plug(char **argv, int argc, char *out) {
        unsigned devnum, rate = ND_PROTO_TELEMETRY_RATE_MAX_HZ;
        if (argc < 4 || !parse_uint(argv[3], 127, &devnum) || devnum < 2 ||
            (argc > 4 && !parse_uint(argv[4], ND_PROTO_TELEMETRY_RATE_MAX_HZ, &rate)))
                return reply(out, "error: plug NAME SERIAL DEVNUM(2..127) [RATE_HZ]");
        if (strlen(argv[1]) > ND_PROTO_SERIAL_SIZE || strlen(argv[2]) > ND_PROTO_SERIAL_SIZE)
                return reply(out, "error: name or serial too long");
        if (find(argv[1]))
                return reply(out, "error: a pen is named %s already", argv[1]);
        Slot *free_slot = NULL;
        for (size_t i = 0; i < PENS_MAX && !free_slot; i++)
                if (!slots[i].pen)
                        free_slot = &slots[i];
        if (!free_slot)
                return reply(out, "error: %d pens plugged already", PENS_MAX);
        nd_penmodel_config cfg;
        nd_penmodel_config_init(&cfg);
        snprintf(cfg.serial, sizeof cfg.serial, "%s", argv[2]);
        cfg.telemetry_rate_hz = rate;
        cfg.seed = devnum;
        /* Two pens may share a serial on purpose (the duplicate-serial hazard): the box names
         * them itself. */
        snprintf(free_slot->name, sizeof free_slot->name, "%s", argv[1]);
        free_slot->pen = fakepen_new(testbed, &cfg, devnum, devnum);
        free_slot->unplugged = false;
        return reply(out, "ok %s", fakepen_syspath(free_slot->pen));
}

static int cmd_state(Slot *s, char *out) {
        nd_penmodel_state st;
        nd_penmodel *m = fakepen_lock(s->pen);
        nd_penmodel_get_state(m, &st);
        fakepen_unlock(s->pen);
        return reply(out,
                     "ok identified=%d motor=%d faults=0x%02x watchdog_armed=%d watchdog_timeout_ms=%u "
                     "last_heartbeat_us=%" PRIu64 " now_us=%" PRIu64 " speed_hz=%.3f set_speed_hz=%.3f "
                     "depth_mm=%.3f set_depth_mm=%.3f current_ma=%.1f temperature_c=%.2f next_sequence=%u "
                     "telemetry=%d cartridge=%s unplugged=%d",
                     st.identified, st.motor_running, st.faults, st.watchdog_armed, st.watchdog_timeout_ms,
                     st.last_heartbeat_us, st.now_us, st.speed_hz, st.set_speed_hz, st.depth_mm, st.set_depth_mm,
                     st.current_ma, st.temperature_c, st.next_sequence, st.telemetry_enabled,
                     st.cartridge_present ? st.cartridge_id : "-", s->unplugged);
}

/* A pen that rebooted: its next packet counts from far below where the host is. */
static int cmd_reset_sequence(Slot *s, const char *back_s, char *out) {
        unsigned back;
        if (!parse_uint(back_s, UINT32_MAX / 2, &back))
                return reply(out, "error: reset-sequence SERIAL BACK");
        nd_penmodel_state st;
        nd_penmodel *m = fakepen_lock(s->pen);
        nd_penmodel_get_state(m, &st);
        fakepen_unlock(s->pen);
        nd_proto_sample sample = {
                .sequence = st.next_sequence - back,
                .timestamp_us = 0,
                .depth_mm = st.depth_mm,
                .speed_hz = st.speed_hz,
                .current_ma = st.current_ma,
                .temperature_c = st.temperature_c,
                .battery_percent = 100,
                .status = (uint8_t) (st.status & ND_PROTO_STATUS_ALL),
        };
        uint8_t buf[ND_PROTO_PACKET_MAX_SIZE];
        int n = nd_proto_encode_packet(&sample, 1, buf, sizeof buf);
        if (n < 0)
                return reply(out, "error: cannot encode the packet: %s", strerror(-n));
        fakepen_inject_packet(s->pen, buf, (size_t) n);
        return reply(out, "ok sequence=%u", sample.sequence);
}

/* A pen left running by a host that is gone (a daemon that died and came back before the
 * pen's watchdog fired): the requests that host sent, played into the model directly. */
static int cmd_spin(Slot *s, const char *speed_s, const char *watchdog_s, char *out) {
        unsigned speed_hz, watchdog_ms;
        if (!parse_uint(speed_s, ND_PROTO_TELEMETRY_RATE_MAX_HZ, &speed_hz) ||
            !parse_uint(watchdog_s, ND_PROTO_WATCHDOG_MAX_MS, &watchdog_ms))
                return reply(out, "error: spin NAME SPEED_HZ WATCHDOG_MS");
        nd_control_setup setup[4];
        uint8_t data[UINT8_MAX + 1]; /* the largest reply (IDENTIFY) fits */
        nd_proto_request_identify(&setup[0], ND_PROTO_VERSION_MAJOR, ND_PROTO_VERSION_MINOR);
        int r = nd_proto_request_set_speed(&setup[1], speed_hz);
        if (r >= 0)
                r = nd_proto_request_set_watchdog(&setup[2], watchdog_ms);
        nd_proto_request_motor_start(&setup[3]);
        nd_penmodel *m = fakepen_lock(s->pen);
        for (size_t i = 0; i < ELEMENTSOF(setup) && r >= 0; i++)
                r = nd_penmodel_control(m, fakepen_now_us(), &setup[i], data, sizeof data);
        fakepen_unlock(s->pen);
        return r < 0 ? reply(out, "error: the pen refused: %s", strerror(-r)) : reply(out, "ok");
}

/* Firmware stuck in its sampling loop: the pen still answers the host but sends no telemetry
 * (SET_TELEMETRY off, played into the model directly). */
static int cmd_mute(Slot *s, char *out) {
        nd_control_setup setup;
        uint8_t data[ND_PROTO_SET_TELEMETRY_SIZE];
        int r = nd_proto_request_set_telemetry(&setup, data, 0, false);
        if (r >= 0) {
                nd_penmodel *m = fakepen_lock(s->pen);
                r = nd_penmodel_control(m, fakepen_now_us(), &setup, data, sizeof data);
                fakepen_unlock(s->pen);
        }
        return r < 0 ? reply(out, "error: the pen refused: %s", strerror(-r)) : reply(out, "ok");
}

/* Runs one command line; returns the reply's length. *quit is set by "quit". */
static int run_command(char *line, char *out, bool *quit) {
        char *argv[ARGS_MAX + 1] = { NULL };
        int argc = 0;
        for (char *save = NULL, *tok = strtok_r(line, " \n", &save); tok && argc < ARGS_MAX;
             tok = strtok_r(NULL, " \n", &save))
                argv[argc++] = tok;
        if (argc == 0)
                return reply(out, "error: empty command");
        if (strcmp(argv[0], "env") == 0)
                return reply(out, "ok UMOCKDEV_DIR=%s", umockdev_testbed_get_root_dir(testbed));
        if (strcmp(argv[0], "quit") == 0) {
                *quit = true;
                return reply(out, "ok");
        }
        if (strcmp(argv[0], "plug") == 0)
                return cmd_plug(argv, argc, out);
        if (argc < 2)
                return reply(out, "error: %s needs a pen name", argv[0]);
        Slot *s = find(argv[1]);
        if (!s)
                return reply(out, "error: no pen %s", argv[1]);
        if (strcmp(argv[0], "unplug") == 0) {
                fakepen_unplug(s->pen);
                s->unplugged = true;
                return reply(out, "ok");
        }
        if (strcmp(argv[0], "free") == 0) {
                fakepen_free(s->pen);
                *s = (Slot) { .pen = NULL };
                return reply(out, "ok");
        }
        if (strcmp(argv[0], "state") == 0)
                return cmd_state(s, out);
        if (strcmp(argv[0], "mute") == 0)
                return cmd_mute(s, out);
        if (strcmp(argv[0], "spin") == 0 && argc == 4)
                return cmd_spin(s, argv[2], argv[3], out);
        if (strcmp(argv[0], "reset-sequence") == 0 && argc == 3)
                return cmd_reset_sequence(s, argv[2], out);

        int r = -EINVAL;
        nd_penmodel *m = fakepen_lock(s->pen);
        uint64_t now = fakepen_now_us();
        unsigned u;
        if (strcmp(argv[0], "insert") == 0 && argc == 4 && parse_uint(argv[3], 255, &u))
                r = nd_penmodel_insert_cartridge(m, now, argv[2], u);
        else if (strcmp(argv[0], "eject") == 0)
                r = nd_penmodel_eject_cartridge(m, now);
        else if (strcmp(argv[0], "battery") == 0 && argc == 3 && parse_uint(argv[2], 100, &u))
                r = nd_penmodel_set_battery(m, now, u);
        else if (strcmp(argv[0], "fault") == 0 && argc == 3) {
                int f = nd_penmodel_fault_from_string(argv[2]);
                r = f < 0 ? f : nd_penmodel_inject_fault(m, now, (nd_penmodel_fault) f);
        } else {
                fakepen_unlock(s->pen);
                return reply(out, "error: unknown command or arguments: %s", argv[0]);
        }
        fakepen_unlock(s->pen);
        return r < 0 ? reply(out, "error: %s: %s", argv[0], strerror(-r)) : reply(out, "ok");
}

static int listen_on(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa.sun_path) {
                fprintf(stderr, "umockdev-penbox: socket path too long: %s\n", path);
                return -1;
        }
        strcpy(sa.sun_path, path);
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0 || listen(fd, 1) < 0) {
                fprintf(stderr, "umockdev-penbox: cannot listen on %s: %s\n", path, strerror(errno));
                if (fd >= 0)
                        close(fd);
                return -1;
        }
        return fd;
}

int main(int argc, char **argv) {
        if (argc != 2) {
                fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
                return EXIT_FAILURE;
        }
        sigset_t mask;
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        int sfd = signalfd(-1, &mask, SFD_CLOEXEC);

        testbed = umockdev_testbed_new();
        int lfd = listen_on(argv[1]);
        if (lfd < 0 || sfd < 0)
                return EXIT_FAILURE;
        printf("umockdev-penbox: testbed %s, commands on %s\n", umockdev_testbed_get_root_dir(testbed), argv[1]);
        fflush(stdout);

        int cfd = -1;
        bool quit = false;
        while (!quit) {
                struct pollfd fds[2] = {
                        { .fd = sfd, .events = POLLIN },
                        { .fd = cfd >= 0 ? cfd : lfd, .events = POLLIN },
                };
                if (poll(fds, 2, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        break;
                }
                if (fds[0].revents)
                        break;
                if (!fds[1].revents)
                        continue;
                if (cfd < 0) {
                        cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                        continue;
                }
                char line[COMMAND_MAX + 1], out[REPLY_MAX];
                ssize_t n = recv(cfd, line, COMMAND_MAX, 0);
                if (n <= 0) {
                        close(cfd);
                        cfd = -1;
                        continue;
                }
                line[n] = '\0';
                int len = run_command(line, out, &quit);
                if (send(cfd, out, (size_t) len, MSG_NOSIGNAL) < 0) {
                        close(cfd);
                        cfd = -1;
                }
        }
        if (cfd >= 0)
                close(cfd);
        close(lfd);
        unlink(argv[1]);
        for (size_t i = 0; i < PENS_MAX; i++)
                fakepen_free(slots[i].pen);
        g_object_unref(testbed);
        return EXIT_SUCCESS;
}
