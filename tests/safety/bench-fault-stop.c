/* bench-fault-stop: how long from the arrival of a faulty telemetry packet at the daemon to the
 * submission of the motor stop to the transport, and whether the stop leaves in the same event
 * loop iteration that decoded the packet (the interlock contract of daemon/pen.c).
 *
 * Method. The whole daemon core runs in a child process (nd_daemon_main, --simulate, on a private
 * session bus started here). The link is built with -Wl,--wrap=nd_transport_sim_new: every
 * simulated pen's transport is wrapped in an observing transport that forwards everything and
 *   - on each packet from the pen, reads CLOCK_MONOTONIC and sd_event_get_iteration() before
 *     handing the bytes to the daemon (pendev decode -> samples -> interlocks), and
 *   - on each control request submitted, recognises MOTOR_STOP and records the time since that
 *     packet's arrival and whether it is still inside that packet's delivery, in the same loop
 *     iteration.
 * The parent drives sessions over D-Bus (Simulator.InjectFault / SetBattery) with faults that trip
 * on a telemetry sample: over-current, depth-deviation, low-battery, motor-stall, and a corrupt
 * packet. Results travel back in shared memory. No code of the daemon is changed for this.
 *
 * Usage: bench-fault-stop [ROUNDS_PER_FAULT]  (default 40; env NEEDLED_BENCH_ROUNDS too)
 * The daemon runs SCHED_FIFO at needled.service's priority when allowed; NEEDLED_BENCH_TIME_SHARED=1
 * runs it time-shared instead, for comparison.
 * Prints median/p90/p99/max per fault and overall; exits 1 if any interlock stop was submitted
 * outside the loop iteration of its packet, or if a round did not trip. */
#include <errno.h>
#include <stdarg.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <systemd/sd-bus.h>

#include "daemon.h"
#include "protocol.h"
#include "transport-sim.h"
#include "util.h"

#define ROUNDS_DEFAULT 40u
#define RECORDS_MAX 4096u
#define WAIT_STEP_USEC (2 * USEC_PER_MSEC)
#define WAIT_TIMEOUT_USEC (10 * USEC_PER_SEC)
#define CALL_TIMEOUT_USEC (10 * USEC_PER_SEC)
#define TELEMETRY_RATE_HZ 1000u

/* ---- shared between the daemon child (writer) and the driver (reader) ---- */

typedef struct stop_record {
        uint64_t latency_ns;     /* packet arrival -> MOTOR_STOP submitted */
        uint64_t packet_ns;      /* the whole delivery of that packet, for scale */
        bool in_packet;          /* submitted while the packet was being delivered */
        bool same_iteration;     /* sd_event iteration unchanged */
} stop_record;

typedef struct shared {
        volatile uint32_t n_stops;
        volatile uint32_t n_packets;
        stop_record stops[RECORDS_MAX];
} shared;

static shared *results;

static uint64_t now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC * NSEC_PER_USEC + (uint64_t) ts.tv_nsec;
}

/* ---- the observing transport (daemon side) ---- */

typedef struct obs_transport {
        nd_transport base;
        nd_transport *inner;
        bool in_packet;
        uint64_t packet_arrival_ns;
        uint64_t packet_iteration;
        uint64_t last_stop_index;   /* the stop recorded during the current packet, +1 */
} obs_transport;

static const nd_transport_ops obs_ops;

int __real_nd_transport_sim_new(sd_event *e, nd_penmodel *model, nd_transport **ret);
int __wrap_nd_transport_sim_new(sd_event *e, nd_penmodel *model, nd_transport **ret);
int __real_nd_transport_sim_unplug(nd_transport *t);
int __wrap_nd_transport_sim_unplug(nd_transport *t);
nd_penmodel *__real_nd_transport_sim_get_model(nd_transport *t);
nd_penmodel *__wrap_nd_transport_sim_get_model(nd_transport *t);

static obs_transport *obs_of(nd_transport *t) {
        return t && t->ops == &obs_ops ? (obs_transport *) t : NULL;
}

/* For the ops, which only ever see our own transports. */
static obs_transport *obs_self(nd_transport *t) {
        return (obs_transport *) t;
}

static bool is_motor_stop(const nd_control_setup *setup) {
        nd_control_setup ref;
        nd_proto_request_motor_stop(&ref);
        return setup->request_type == ref.request_type && setup->request == ref.request;
}

static int obs_control(nd_transport *t, const nd_control_setup *setup, const uint8_t *out_data, uint32_t timeout_ms,
                       nd_control_done_fn done, void *userdata) {
        obs_transport *o = obs_self(t);
        if (is_motor_stop(setup) && o->in_packet && results->n_stops < RECORDS_MAX) {
                uint64_t iteration = 0;
                (void) sd_event_get_iteration(t->event, &iteration);
                stop_record *r = &results->stops[results->n_stops];
                *r = (stop_record) {
                        .latency_ns = now_ns() - o->packet_arrival_ns,
                        .in_packet = true,
                        .same_iteration = iteration == o->packet_iteration,
                };
                o->last_stop_index = results->n_stops + 1;
                __atomic_add_fetch(&results->n_stops, 1, __ATOMIC_RELEASE);
        } else if (is_motor_stop(setup) && results->n_stops < RECORDS_MAX) {
                /* A stop from elsewhere (a timer, a method call): recorded as not in a packet. */
                results->stops[results->n_stops] = (stop_record) { .in_packet = false };
                __atomic_add_fetch(&results->n_stops, 1, __ATOMIC_RELEASE);
        }
        return nd_transport_control(o->inner, setup, out_data, timeout_ms, done, userdata);
}

static void obs_on_packet(nd_transport *inner, const uint8_t *data, size_t len, void *userdata) {
        obs_transport *o = userdata;
        o->packet_arrival_ns = now_ns();
        (void) sd_event_get_iteration(o->base.event, &o->packet_iteration);
        o->in_packet = true;
        o->last_stop_index = 0;
        if (o->base.on_packet)
                o->base.on_packet(&o->base, data, len, o->base.userdata);
        o->in_packet = false;
        if (o->last_stop_index)
                results->stops[o->last_stop_index - 1].packet_ns = now_ns() - o->packet_arrival_ns;
        results->n_packets++;
}

static void obs_on_gone(nd_transport *inner, int status, void *userdata) {
        obs_transport *o = userdata;
        nd_transport_report_gone(&o->base, status);
}

static int obs_start_stream(nd_transport *t) {
        obs_transport *o = obs_self(t);
        nd_transport_set_callbacks(o->inner, obs_on_packet, obs_on_gone, o);
        return nd_transport_start_stream(o->inner);
}

static void obs_stop_stream(nd_transport *t) {
        nd_transport_stop_stream(obs_self(t)->inner);
}

static void obs_free(nd_transport *t) {
        obs_transport *o = obs_self(t);
        nd_transport_free(o->inner);
        sd_event_unref(o->base.event);
        free(o->base.description);
        free(o);
}

static const nd_transport_ops obs_ops = {
        .control = obs_control,
        .start_stream = obs_start_stream,
        .stop_stream = obs_stop_stream,
        .free = obs_free,
};

int __wrap_nd_transport_sim_new(sd_event *e, nd_penmodel *model, nd_transport **ret) {
        nd_transport *inner = NULL;
        int r = __real_nd_transport_sim_new(e, model, &inner);
        if (r < 0)
                return r;
        obs_transport *o = calloc(1, sizeof *o);
        char *desc = strdup(nd_transport_describe(inner));
        if (!o || !desc) {
                free(o);
                free(desc);
                nd_transport_free(inner);
                return -ENOMEM;
        }
        o->base = (nd_transport) { .ops = &obs_ops, .event = sd_event_ref(e), .description = desc };
        o->inner = inner;
        /* Callbacks already set on the inner one (none are, before start_stream) follow ours. */
        nd_transport_set_callbacks(inner, obs_on_packet, obs_on_gone, o);
        *ret = &o->base;
        return 0;
}

int __wrap_nd_transport_sim_unplug(nd_transport *t) {
        obs_transport *o = obs_of(t);
        return __real_nd_transport_sim_unplug(o ? o->inner : t);
}

nd_penmodel *__wrap_nd_transport_sim_get_model(nd_transport *t) {
        obs_transport *o = obs_of(t);
        return __real_nd_transport_sim_get_model(o ? o->inner : t);
}

/* ---- the driver (parent) ---- */

static sd_bus *client;

#define CHECK(expr)                                                                                     \
        do {                                                                                            \
                int r_ = (expr);                                                                        \
                if (r_ < 0) {                                                                           \
                        fprintf(stderr, "bench-fault-stop: %s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                                strerror(-r_));                                                         \
                        exit(EXIT_FAILURE);                                                             \
                }                                                                                       \
        } while (0)

static int call(const char *path, const char *iface, const char *method, sd_bus_message **reply, const char *types,
                ...) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        int r = sd_bus_message_new_method_call(client, &m, ND_BUS_NAME, path, iface, method);
        if (r < 0)
                return r;
        if (types) {
                va_list ap;
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
                if (r < 0)
                        return r;
        }
        r = sd_bus_call(client, m, CALL_TIMEOUT_USEC, &error, reply);
        if (r < 0 && getenv("NEEDLED_BENCH_DEBUG"))
                fprintf(stderr, "bench-fault-stop: %s: %s\n", method, error.message);
        return r;
}

static char *pen_state(const char *pen) {
        char *state = NULL;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        CHECK(sd_bus_get_property_string(client, ND_BUS_NAME, pen, ND_PEN_INTERFACE, "State", &error, &state));
        return state;
}

static bool wait_state(const char *pen, const char *want) {
        for (uint64_t waited = 0; waited < WAIT_TIMEOUT_USEC; waited += WAIT_STEP_USEC) {
                _cleanup_free_ char *s = pen_state(pen);
                if (STREQ(s, want))
                        return true;
                usleep(WAIT_STEP_USEC);
        }
        return false;
}

static const char *const faults[] = {
        "over-current", "depth-deviation", "low-battery", "motor-stall", "corrupt-telemetry",
};
#define N_FAULTS ELEMENTSOF(faults)

static const char profile_yaml[] = "name: bench\nindication: other\narea: cheeks\ndepth_mm: 1.0\n"
                                   "speed_hz: 100\nduration_s: 600\nneedles: 12\n";

/* One session, one fault; returns the index of its stop record, or -1 when it did not trip. */
static int run_round(const char *pen, const char *fault, unsigned round) {
        char cart[64];
        snprintf(cart, sizeof cart, "BENCH-%s-%u", fault, round);
        CHECK(call(ND_MANAGER_PATH, ND_SIM_INTERFACE, "InsertCartridge", NULL, "osu", pen, cart, 12u));
        CHECK(call(pen, ND_PEN_INTERFACE, "LoadProfileData", NULL, "s", profile_yaml));
        CHECK(call(pen, ND_PEN_INTERFACE, "Start", NULL, "a{sv}", 0));
        /* Past the spin-up and the depth settling window, as in steady treatment. */
        usleep(300 * USEC_PER_MSEC);
        uint32_t before = __atomic_load_n(&results->n_stops, __ATOMIC_ACQUIRE);
        if (STREQ(fault, "low-battery"))
                CHECK(call(ND_MANAGER_PATH, ND_SIM_INTERFACE, "SetBattery", NULL, "ou", pen, 4u));
        else
                CHECK(call(ND_MANAGER_PATH, ND_SIM_INTERFACE, "InjectFault", NULL, "os", pen, fault));
        bool tripped = wait_state(pen, "fault");
        int index = -1;
        if (tripped && __atomic_load_n(&results->n_stops, __ATOMIC_ACQUIRE) > before)
                index = (int) before;
        CHECK(call(ND_MANAGER_PATH, ND_SIM_INTERFACE, "InjectFault", NULL, "os", pen, "clear"));
        CHECK(call(ND_MANAGER_PATH, ND_SIM_INTERFACE, "SetBattery", NULL, "ou", pen, 100u));
        for (uint64_t waited = 0; call(pen, ND_PEN_INTERFACE, "ClearFault", NULL, NULL) < 0; waited += WAIT_STEP_USEC) {
                if (waited > WAIT_TIMEOUT_USEC) {
                        fprintf(stderr, "bench-fault-stop: the %s fault does not clear\n", fault);
                        exit(EXIT_FAILURE);
                }
                usleep(WAIT_STEP_USEC);
        }
        CHECK(call(ND_MANAGER_PATH, ND_SIM_INTERFACE, "EjectCartridge", NULL, "o", pen));
        return index;
}

static int cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
        return x < y ? -1 : x > y;
}

static void report(const char *what, uint64_t *v, size_t n) {
        if (n == 0)
                return;
        qsort(v, n, sizeof *v, cmp_u64);
        printf("  %-18s n=%-4zu median %7.1f us  p90 %7.1f us  p99 %7.1f us  max %7.1f us\n", what, n,
               (double) v[n / 2] / 1e3, (double) v[n * 90 / 100] / 1e3, (double) v[MIN(n - 1, n * 99 / 100)] / 1e3,
               (double) v[n - 1] / 1e3);
}

static pid_t start_bus(char *address, size_t size) {
        int fds[2];
        CHECK(pipe(fds) < 0 ? -errno : 0);
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid == 0) {
                /* a benchmark that dies leaves no bus behind (the flag survives the exec) */
                if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent)
                        _exit(127);
                dup2(fds[1], STDOUT_FILENO);
                close(fds[0]);
                if (!freopen("/dev/null", "w", stderr))
                        _exit(127);
                execlp("dbus-daemon", "dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1",
                       (char *) NULL);
                _exit(127);
        }
        close(fds[1]);
        ssize_t n = 0, k;
        while (n < (ssize_t) size - 1 && (k = read(fds[0], address + n, size - 1 - (size_t) n)) > 0) {
                n += k;
                if (memchr(address, '\n', (size_t) n))
                        break;
        }
        close(fds[0]);
        address[n > 0 ? n : 0] = '\0';
        address[strcspn(address, "\n")] = '\0';
        if (!*address) {
                fprintf(stderr, "bench-fault-stop: dbus-daemon did not start (is package dbus installed?)\n");
                exit(77);
        }
        return pid;
}

/* needled.service's real-time priority (CPUSchedulingPriority=), 0 when it sets none. */
static int unit_rt_priority(const char *src) {
        _cleanup_free_ char *path = NULL;
        char line[256];
        int prio = 0;
        CHECK(asprintf(&path, "%s/daemon/needled.service.in", src) < 0 ? -ENOMEM : 0);
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        while (f && fgets(line, sizeof line, f))
                if (strncmp(line, "CPUSchedulingPriority=", 22) == 0)
                        prio = atoi(line + 22);
        return prio;
}

int main(int argc, char **argv) {
        unsigned rounds = ROUNDS_DEFAULT;
        const char *env = getenv("NEEDLED_BENCH_ROUNDS");
        if (argc > 1)
                env = argv[1];
        if (env && (rounds = (unsigned) strtoul(env, NULL, 10)) == 0)
                rounds = ROUNDS_DEFAULT;
        rounds = MIN(rounds, RECORDS_MAX / N_FAULTS / 2);
        const char *src = getenv("NEEDLED_SOURCE_ROOT");
        if (!src) {
                fprintf(stderr, "bench-fault-stop: NEEDLED_SOURCE_ROOT is not set\n");
                return EXIT_FAILURE;
        }

        results = mmap(NULL, sizeof *results, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        CHECK(results == MAP_FAILED ? -errno : 0);
        char address[512];
        pid_t bus_pid = start_bus(address, sizeof address);
        setenv("DBUS_SESSION_BUS_ADDRESS", address, 1);
        char state_dir[] = "/tmp/needled-bench-XXXXXX";
        CHECK(mkdtemp(state_dir) ? 0 : -errno);
        _cleanup_free_ char *limits = NULL, *profiles = NULL;
        CHECK(asprintf(&limits, "%s/conf/limits.yaml", src) < 0 ? -ENOMEM : 0);
        CHECK(asprintf(&profiles, "%s/conf/profiles.d", src) < 0 ? -ENOMEM : 0);

        /* The daemon core runs as needled.service runs needled: real-time FIFO, when this machine
         * allows it (root, or an RLIMIT_RTPRIO); otherwise time-shared, and the output says so. */
        int rt = getenv("NEEDLED_BENCH_TIME_SHARED") ? 0 : unit_rt_priority(src);
        struct sched_param sp = { .sched_priority = rt };
        if (rt > 0 && sched_setscheduler(0, SCHED_FIFO, &sp) == 0) {
                sp.sched_priority = 0;
                (void) sched_setscheduler(0, SCHED_OTHER, &sp); /* the driver itself stays time-shared */
        } else
                rt = 0;
        pid_t driver = getpid();
        pid_t daemon_pid = fork();
        if (daemon_pid == 0) {
                /* a driver that dies (CHECK exits) leaves no real-time daemon behind: SIGTERM
                 * makes it stop its pens and exit */
                if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != driver)
                        _exit(EXIT_FAILURE);
                sp.sched_priority = rt;
                if (rt > 0 && sched_setscheduler(0, SCHED_FIFO, &sp) < 0)
                        _exit(EXIT_FAILURE);
                /* The daemon logs every trip; only the figures go to the benchmark's output. */
                if (!getenv("NEEDLED_BENCH_DEBUG") && !freopen("/dev/null", "w", stderr))
                        _exit(EXIT_FAILURE);
                nd_daemon_options opts = {
                        .session_bus = true, .simulate = true, .limits_path = limits, .profiles_dir = profiles,
                        .state_dir = state_dir, .polkit_timeout_ms = ND_POLKIT_TIMEOUT_MS_DEFAULT,
                };
                _exit(nd_daemon_main(&opts) < 0 ? EXIT_FAILURE : EXIT_SUCCESS);
        }

        CHECK(sd_bus_open_user(&client));
        for (uint64_t waited = 0;; waited += WAIT_STEP_USEC) {
                _cleanup_(sd_bus_error_free) sd_bus_error e = SD_BUS_ERROR_NULL;
                _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
                int has = sd_bus_call_method(client, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                             "org.freedesktop.DBus", "NameHasOwner", &e, &reply, "s", ND_BUS_NAME);
                int owned = 0;
                if (has >= 0)
                        (void) sd_bus_message_read(reply, "b", &owned);
                if (owned)
                        break;
                CHECK(waited > WAIT_TIMEOUT_USEC ? -ETIMEDOUT : 0);
                usleep(WAIT_STEP_USEC);
        }

        _cleanup_(sd_bus_message_unrefp) sd_bus_message *added = NULL;
        CHECK(call(ND_MANAGER_PATH, ND_SIM_INTERFACE, "AddPen", &added, "a{sv}", 1, "telemetry_rate_hz", "u",
                   TELEMETRY_RATE_HZ));
        const char *pen_path;
        CHECK(sd_bus_message_read(added, "o", &pen_path));
        _cleanup_free_ char *pen = strdup(pen_path);

        uint64_t *all = calloc(rounds * N_FAULTS, sizeof *all), *per = calloc(rounds, sizeof *per);
        uint64_t *packet = calloc(rounds * N_FAULTS, sizeof *packet);
        size_t n_all = 0, n_packet = 0;
        unsigned missed = 0, outside = 0;
        CHECK(all && per && packet ? 0 : -ENOMEM);
        printf("fault-to-stop latency: packet with the faulty sample arrives -> MOTOR_STOP submitted to the transport\n"
               "(%u rounds per fault, simulated pen at %u samples/s, daemon core in-process, %s, %s)\n", rounds,
               TELEMETRY_RATE_HZ, getenv("NEEDLED_TEST_SANITIZED") ? "sanitized build" : "this build",
               rt > 0                                ? "real-time as needled.service runs it"
               : getenv("NEEDLED_BENCH_TIME_SHARED") ? "time-shared as asked (NEEDLED_BENCH_TIME_SHARED)"
                                                     : "time-shared: real-time not allowed here");
        for (size_t f = 0; f < N_FAULTS; f++) {
                size_t n_per = 0;
                for (unsigned i = 0; i < rounds; i++) {
                        int k = run_round(pen, faults[f], i);
                        if (k < 0) {
                                missed++;
                                continue;
                        }
                        stop_record *r = &results->stops[k];
                        if (!r->in_packet || !r->same_iteration) {
                                outside++;
                                continue;
                        }
                        per[n_per++] = r->latency_ns;
                        all[n_all++] = r->latency_ns;
                        packet[n_packet++] = r->packet_ns;
                }
                report(faults[f], per, n_per);
        }
        report("all faults", all, n_all);
        /* For scale: the rest of that packet's handling, which records the fault (synced ledger
         * and audit writes) after the stop has gone out. */
        report("whole packet", packet, n_packet);
        printf("stops submitted in the loop iteration of their packet: %zu of %zu; outside it: %u; "
               "rounds that did not trip: %u\n", n_all, n_all + outside, outside, missed);

        kill(daemon_pid, SIGTERM);
        int status = 0;
        waitpid(daemon_pid, &status, 0);
        kill(bus_pid, SIGTERM);
        waitpid(bus_pid, NULL, 0);
        client = sd_bus_flush_close_unref(client);
        _cleanup_free_ char *rm = NULL;
        if (asprintf(&rm, "rm -rf '%s'", state_dir) >= 0 && system(rm) != 0)
                fprintf(stderr, "bench-fault-stop: could not remove %s\n", state_dir);
        free(all);
        free(per);
        free(packet);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                fprintf(stderr, "bench-fault-stop: the daemon exited with status %d\n", status);
        if (outside || missed) {
                printf("FAIL: every interlock stop must be submitted while its packet is processed\n");
                return EXIT_FAILURE;
        }
        printf("PASS: every interlock stop was submitted within the loop iteration of its faulty packet\n");
        return EXIT_SUCCESS;
}
