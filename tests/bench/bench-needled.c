/* bench-needled.c: the benchmark client for needled (docs/performance.md, "Method").
 *
 * Each subcommand starts its own needled on the bus named by DBUS_SESSION_BUS_ADDRESS (a private
 * bus started by run-benchmarks.py), measures one thing and prints one JSON object on stdout:
 *
 *   methods    round trips of Peer.Ping (the floor), Properties.Get and ValidateProfile,
 *              interleaved, optionally with client, bus and daemon pinned to one CPU
 *   telemetry  P simulated pens at 1 kHz, S Telemetry-signal subscribers (WatchTelemetry on every
 *              pen), R fd readers per pen
 *              and K stalled readers: loss, latency, the daemon's CPU and RSS
 *   floor      what the contract costs any daemon at P pens x R readers: a child process that
 *              wakes at 1 kHz and sends one datagram per sample per reader; its CPU and latency
 *   stop       Stop call to the motor stop reaching the transport (needled-bench's probe)
 *   startup    exec to owning org.needled, and RSS once idle
 *
 * It exits 0 whatever the figures are; 1 for broken behaviour (a sample lost by a subscriber or
 * a reader that keeps up, a stalled reader whose loss is not counted, a daemon that dies) and
 * 2 for a usage or set-up error. Timing goals are judged by the reader of the figures, not here. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include "bench-trace.h"
#include "contract.h"
#include "util.h"


#define PENS_MAX 8u
#define SUBSCRIBERS_MAX 64u
#define READERS_PER_PEN_MAX 32u
#define STALLED_MAX 4u
/* docs/telemetry.md, version 1 */
#define RECORD_SIZE 72u
#define RECORD_BUF_SIZE 256u
#define SAMPLE_RATE_HZ 1000u

#define DAEMON_START_TIMEOUT_US (10 * USEC_PER_SEC)
#define DAEMON_EXIT_TIMEOUT_US (5 * USEC_PER_SEC)
#define TRACE_WAIT_MS 1000
/* After the window: how long stalled readers get to catch up once told their loss. */
#define STALLED_CATCH_UP_US (200 * USEC_PER_MSEC)
#define STALLED_CATCH_UP_TIMEOUT_US (20 * USEC_PER_SEC)
/* Subscribers are drained when no Telemetry message came for this long. */
#define SIGNAL_QUIET_US (2 * USEC_PER_SEC)
#define READERS_EOF_TIMEOUT_US (5 * USEC_PER_SEC)
#define SIGNAL_DRAIN_TIMEOUT_US (60 * USEC_PER_SEC)
/* Every subscriber's WatchTelemetry on a new pen must be answered within this. */
#define WATCH_TIMEOUT_US (30 * USEC_PER_SEC)
#define EPOLL_TICK_MS 20
#define SESSION_RUN_BEFORE_STOP_US (20 * USEC_PER_MSEC)
#define IDLE_RSS_WAIT_US (100 * USEC_PER_MSEC)

/* The profile sent to ValidateProfile and armed for the running-session stops (valid against
 * conf/limits.yaml; 12 needles). */
#define BENCH_PROFILE_NAME "acne-scars-cheeks"
static const char bench_profile_yaml[] =
        "# Atrophic acne scars on the cheeks. 1.25 mm stays below the 1.5 mm cheek limit.\n"
        "name: acne-scars-cheeks\n"
        "indication: acne-scars\n"
        "area: cheeks\n"
        "depth_mm: 1.25\n"
        "speed_hz: 120\n"
        "duration_s: 900\n"
        "needles: 12\n"
        "notes: \"Three passes, cross-hatched. Stretch the skin taut over rolling scars.\"\n"
        "aftercare:\n"
        "  - No make-up for 24 hours\n"
        "  - Gentle cleanser and a plain moisturiser only for 3 days\n"
        "  - SPF 30+ and no direct sun for 7 days\n";

static void bus_error_freep(sd_bus_error *e) { sd_bus_error_free(e); }
#define _cleanup_bus_error_ _cleanup_(bus_error_freep)

/* ---- Options ------------------------------------------------------------------------------------ */

typedef struct options {
        const char *needled;       /* the daemon binary (needled, or needled-bench for traces) */
        const char *limits;
        const char *profiles;
        const char *state_dir;     /* an existing directory for the ledger */
        const char *daemon_log;    /* the daemon's stderr goes here; NULL: /dev/null */
        unsigned calls;            /* methods, stop (idle) */
        unsigned sessions;         /* stop (running sessions) */
        unsigned runs;             /* startup */
        bool fresh;                /* startup: a new, empty state directory per run */
        unsigned pens, subscribers, readers, stalled;
        double seconds, warmup_seconds;
        int pin_cpu;               /* methods: -1, or the CPU client, bus and daemon are pinned to */
        pid_t bus_pid;             /* for CPU figures and pinning; 0 unknown */
        const char *floor;         /* startup: the floor service (bench-floor), started in turns */
        const char *floor_ledger;  /* startup: the floor of the stack (bench-floor-ledger), in turns too */
        int daemon_rt;             /* > 0: daemons (and floors) run SCHED_FIFO at this priority, as
                                    * needled.service starts needled; 0: time-shared */
        int reader_rt;             /* > 0: the fd reader thread runs SCHED_FIFO at this priority */
        bool plain;                /* floor: wake with clock_nanosleep instead of sd-event */
} options;

/* ---- Small helpers ------------------------------------------------------------------------------ */

static uint64_t now_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static uint64_t now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

static void sleep_us(uint64_t us) {
        struct timespec ts = { .tv_sec = (time_t) (us / USEC_PER_SEC), .tv_nsec = (long) (us % USEC_PER_SEC) * 1000 };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

static void die(const char *fmt, ...) _printf_(1, 2) __attribute__((noreturn));
static void die(const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        fputs("bench-needled: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
        exit(2);
}

/* A growable array of latencies in µs. */
typedef struct series {
        int64_t *v;
        size_t n, size;
} series;

static void series_add(series *s, int64_t x) {
        if (s->n == s->size) {
                size_t size = s->size ? s->size * 2 : 4096;
                int64_t *v = realloc(s->v, size * sizeof *v);
                if (!v)
                        die("out of memory");
                s->v = v;
                s->size = size;
        }
        s->v[s->n++] = x;
}

static int cmp_i64(const void *a, const void *b) {
        int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;
        return (x > y) - (x < y);
}

typedef struct summary {
        size_t n;
        double median, p99, p999, min, max, mean;
} summary;

/* Sorts s in place. Nearest-rank percentiles. */
static summary series_summary(series *s) {
        summary r = { .n = s->n };
        if (s->n == 0)
                return r;
        qsort(s->v, s->n, sizeof *s->v, cmp_i64);
        double sum = 0;
        for (size_t i = 0; i < s->n; i++)
                sum += (double) s->v[i];
        size_t i99 = (size_t) ceil(0.99 * (double) s->n), i999 = (size_t) ceil(0.999 * (double) s->n);
        r.median = s->n % 2 ? (double) s->v[s->n / 2] : ((double) s->v[s->n / 2 - 1] + (double) s->v[s->n / 2]) / 2.0;
        r.p99 = (double) s->v[MAX(i99, (size_t) 1) - 1];
        r.p999 = (double) s->v[MAX(i999, (size_t) 1) - 1];
        r.min = (double) s->v[0];
        r.max = (double) s->v[s->n - 1];
        r.mean = sum / (double) s->n;
        return r;
}

/* Prints s divided by scale (1 when the series is in the unit printed). */
static void print_summary_scaled(const char *name, const summary *s, double scale, const char *sep) {
        printf("\"%s\": {\"n\": %zu, \"median\": %.3f, \"p99\": %.3f, \"p999\": %.3f, \"min\": %.3f, \"max\": %.3f, "
               "\"mean\": %.3f}%s",
               name, s->n, s->median / scale, s->p99 / scale, s->p999 / scale, s->min / scale, s->max / scale,
               s->mean / scale, sep);
}

static void print_summary(const char *name, const summary *s, const char *sep) {
        print_summary_scaled(name, s, 1.0, sep);
}

/* CPU time of a process in ns: /proc/PID/schedstat (ns, the scheduler's own count), which for
 * the single-threaded needled and dbus-daemon is the process. 0 when unknown. */
static uint64_t proc_cpu_ns(pid_t pid) {
        char path[64];
        unsigned long long ns = 0;
        snprintf(path, sizeof path, "/proc/%d/schedstat", (int) pid);
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        if (!f || fscanf(f, "%llu", &ns) != 1)
                return 0;
        return ns;
}

/* utime + stime of a process in clock ticks (/proc/PID/stat), the coarse cross-check. */
static uint64_t proc_cpu_ticks(pid_t pid) {
        char path[64], buf[1024];
        snprintf(path, sizeof path, "/proc/%d/stat", (int) pid);
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        if (!f || !fgets(buf, sizeof buf, f))
                return 0;
        const char *p = strrchr(buf, ')'); /* the command may hold spaces */
        unsigned long long utime, stime;
        if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2)
                return 0;
        return utime + stime;
}

static long proc_status_kib(pid_t pid, const char *field) {
        char path[64], line[256];
        size_t len = strlen(field);
        long kib = -1;
        snprintf(path, sizeof path, "/proc/%d/status", (int) pid);
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        while (f && fgets(line, sizeof line, f))
                if (strncmp(line, field, len) == 0 && line[len] == ':') {
                        kib = strtol(line + len + 1, NULL, 10);
                        break;
                }
        return kib;
}

/* Busy and total jiffies of the whole machine (/proc/stat), to show what else ran. */
static void machine_jiffies(uint64_t *busy, uint64_t *total) {
        unsigned long long v[10] = { 0 };
        *busy = *total = 0;
        _cleanup_fclose_ FILE *f = fopen("/proc/stat", "re");
        if (!f || fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                         &v[5], &v[6], &v[7], &v[8], &v[9]) < 8)
                return;
        for (unsigned i = 0; i < 8; i++) /* guest time is counted in user already */
                *total += v[i];
        *busy = *total - v[3] - v[4]; /* minus idle and iowait */
}

static uint64_t self_cpu_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
        return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

static void pin_to_cpu(pid_t pid, int cpu) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(pid, sizeof set, &set) < 0)
                die("cannot pin pid %d to CPU %d: %s", (int) pid, cpu, strerror(errno));
}

/* ---- The daemon --------------------------------------------------------------------------------- */

typedef struct daemon_proc {
        pid_t pid;
        int trace_fd;        /* our end of the trace pipe, -1 when none */
        bool owned, lost;    /* the bus name, as NameOwnerChanged told */
        uint64_t owned_us;
        sd_bus_slot *name_slot;
} daemon_proc;

static int on_name_owner_changed(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        daemon_proc *d = userdata;
        const char *name, *old_owner, *new_owner;
        if (sd_bus_message_read(m, "sss", &name, &old_owner, &new_owner) < 0 || !STREQ(name, ND_BUS_NAME))
                return 0;
        if (*new_owner) {
                d->owned = true;
                d->owned_us = now_us();
        } else
                d->lost = true;
        return 0;
}

/* Watches org.needled's owner on bus (before any daemon is started, so no change is missed). */
static void daemon_watch_name(sd_bus *bus, daemon_proc *d) {
        int r = sd_bus_add_match(bus, &d->name_slot,
                                 "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
                                 "interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='" ND_BUS_NAME "'",
                                 on_name_owner_changed, d);
        if (r < 0)
                die("cannot watch the bus name: %s", strerror(-r));
}

/* Starts the daemon with posix_spawn (no fork of our address space); with_trace hands it the
 * write end of a trace pipe as fd 3. Returns the time just before the spawn. */
static uint64_t daemon_spawn_exe(const options *o, const char *exe, const char *state_dir, bool with_trace,
                                 daemon_proc *d) {
        posix_spawn_file_actions_t fa;
        int pipefd[2] = { -1, -1 };
        char *argv[] = { (char *) exe, (char *) "--session", (char *) "--simulate",
                         (char *) "--limits", (char *) o->limits, (char *) "--profiles", (char *) o->profiles,
                         (char *) "--state-dir", (char *) state_dir, NULL };
        extern char **environ;

        d->owned = d->lost = false;
        d->trace_fd = -1;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, o->daemon_log ? o->daemon_log : "/dev/null",
                                         O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (with_trace) {
                if (pipe2(pipefd, O_CLOEXEC) < 0)
                        die("pipe: %s", strerror(errno));
                /* A full pipe loses a trace record rather than blocking the daemon. */
                int fl = fcntl(pipefd[1], F_GETFL);
                (void) fcntl(pipefd[1], F_SETFL, fl | O_NONBLOCK);
                posix_spawn_file_actions_adddup2(&fa, pipefd[1], 3);
                setenv(BENCH_TRACE_FD_ENV, "3", 1);
        } else
                unsetenv(BENCH_TRACE_FD_ENV);

        posix_spawnattr_t attr;
        posix_spawnattr_init(&attr);
        if (o->daemon_rt > 0) {
                struct sched_param sp = { .sched_priority = o->daemon_rt };
                posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSCHEDULER);
                posix_spawnattr_setschedpolicy(&attr, SCHED_FIFO);
                posix_spawnattr_setschedparam(&attr, &sp);
        }

        uint64_t t0 = now_us();
        int r = posix_spawn(&d->pid, exe, &fa, &attr, argv, environ);
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&attr);
        if (r != 0)
                die("cannot start %s%s: %s", exe, o->daemon_rt > 0 ? " real-time (--daemon-rt)" : "", strerror(r));
        if (with_trace) {
                close(pipefd[1]);
                d->trace_fd = pipefd[0];
        }
        return t0;
}

static uint64_t daemon_spawn(const options *o, const char *state_dir, bool with_trace, daemon_proc *d) {
        return daemon_spawn_exe(o, o->needled, state_dir, with_trace, d);
}

/* Processes bus until the daemon owns its name; dies when it exits first or takes too long. */
static void daemon_wait_owned(sd_bus *bus, daemon_proc *d) {
        uint64_t deadline = now_us() + DAEMON_START_TIMEOUT_US;
        while (!d->owned) {
                int r = sd_bus_process(bus, NULL);
                if (r < 0)
                        die("bus: %s", strerror(-r));
                if (r > 0)
                        continue;
                int status;
                if (waitpid(d->pid, &status, WNOHANG) == d->pid)
                        die("%s exited before owning %s (status 0x%x)", "needled", ND_BUS_NAME, (unsigned) status);
                if (now_us() > deadline)
                        die("needled did not own %s within %" PRIu64 " s", ND_BUS_NAME, DAEMON_START_TIMEOUT_US / USEC_PER_SEC);
                (void) sd_bus_wait(bus, 100 * USEC_PER_MSEC);
        }
}

/* SIGTERM, then waits for the exit and for the name to go. */
static void daemon_stop(sd_bus *bus, daemon_proc *d) {
        int status = 0;
        if (d->pid <= 0)
                return;
        kill(d->pid, SIGTERM);
        uint64_t deadline = now_us() + DAEMON_EXIT_TIMEOUT_US;
        for (;;) {
                pid_t w = waitpid(d->pid, &status, WNOHANG);
                if (w == d->pid)
                        break;
                if (now_us() > deadline) {
                        kill(d->pid, SIGKILL);
                        waitpid(d->pid, &status, 0);
                        fprintf(stderr, "bench-needled: needled did not exit on SIGTERM within 5 s; killed\n");
                        break;
                }
                sleep_us(USEC_PER_MSEC);
        }
        d->pid = 0;
        while (bus && d->owned && !d->lost && now_us() < deadline) {
                if (sd_bus_process(bus, NULL) <= 0)
                        (void) sd_bus_wait(bus, 10 * USEC_PER_MSEC);
        }
        if (d->trace_fd >= 0)
                close(d->trace_fd);
        d->trace_fd = -1;
}

/* Reads the next trace record, waiting up to TRACE_WAIT_MS. Returns false when none came. */
static bool trace_read(daemon_proc *d, bench_trace *rec, int wait_ms) {
        struct pollfd pfd = { .fd = d->trace_fd, .events = POLLIN };
        if (d->trace_fd < 0 || poll(&pfd, 1, wait_ms) <= 0)
                return false;
        ssize_t n = read(d->trace_fd, rec, sizeof *rec);
        if (n != (ssize_t) sizeof *rec)
                die("short trace record (%zd bytes): is %s needled-bench?", n, "the daemon");
        return true;
}

static sd_bus *bus_connect(void) {
        sd_bus *bus = NULL;
        int r = sd_bus_open_user(&bus);
        if (r < 0)
                die("cannot connect to the bus (DBUS_SESSION_BUS_ADDRESS): %s", strerror(-r));
        return bus;
}

/* Simulator.AddPen with no options; returns the pen's object path (malloc'ed). */
static char *add_pen(sd_bus *bus) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        const char *path;
        int r = sd_bus_call_method(bus, ND_BUS_NAME, ND_MANAGER_PATH, ND_SIM_INTERFACE, "AddPen", &error, &reply, "a{sv}", 0);
        if (r < 0)
                die("AddPen: %s", error.message ? error.message : strerror(-r));
        if (sd_bus_message_read(reply, "o", &path) < 0)
                die("AddPen: bad reply");
        char *s = strdup(path);
        if (!s)
                die("out of memory");
        return s;
}

static void call_or_die(sd_bus *bus, const char *path, const char *iface, const char *member, const char *types, ...) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *m = NULL, *reply = NULL;
        va_list ap;
        int r = sd_bus_message_new_method_call(bus, &m, ND_BUS_NAME, path, iface, member);
        if (r >= 0 && types) {
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
        }
        if (r >= 0)
                r = sd_bus_call(bus, m, 0, &error, &reply);
        if (r < 0)
                die("%s.%s: %s", iface, member, error.message ? error.message : strerror(-r));
}

/* ---- methods ------------------------------------------------------------------------------------ */

enum { K_PING, K_GET, K_GET_PEN, K_VALIDATE, _K_MAX };
static const char *const kind_names[_K_MAX] = { "ping", "get", "get_pen", "validate" };

static int one_call(sd_bus *bus, unsigned kind, const char *pen_path) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        switch (kind) {
        case K_PING:
                return sd_bus_call_method(bus, ND_BUS_NAME, ND_MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping", &error,
                                          &reply, NULL);
        case K_GET:
                return sd_bus_call_method(bus, ND_BUS_NAME, ND_MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get",
                                          &error, &reply, "ss", ND_MANAGER_INTERFACE, "Version");
        case K_GET_PEN:
                return sd_bus_call_method(bus, ND_BUS_NAME, pen_path, "org.freedesktop.DBus.Properties", "Get", &error,
                                          &reply, "ss", ND_PEN_INTERFACE, "State");
        case K_VALIDATE: {
                int r = sd_bus_call_method(bus, ND_BUS_NAME, ND_MANAGER_PATH, ND_MANAGER_INTERFACE, "ValidateProfile", &error,
                                           &reply, "s", bench_profile_yaml);
                /* A valid profile: an empty list of violations. */
                if (r >= 0 && (r = sd_bus_message_enter_container(reply, 'a', "(sss)")) >= 0 &&
                    sd_bus_message_at_end(reply, false) <= 0)
                        return -EBADMSG;
                return r;
        }
        }
        return -EINVAL;
}

static int cmd_methods(const options *o) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = bus_connect();
        daemon_proc d = { 0 };
        series s[_K_MAX] = { 0 };
        cpu_set_t bus_mask_before;
        bool bus_pinned = false;
        const unsigned warmup_rounds = MIN(o->calls / 10 + 1, 500u);

        daemon_watch_name(bus, &d);
        daemon_spawn(o, o->state_dir, false, &d);
        daemon_wait_owned(bus, &d);
        _cleanup_free_ char *pen_path = add_pen(bus);

        if (o->pin_cpu >= 0) {
                pin_to_cpu(0, o->pin_cpu);
                pin_to_cpu(d.pid, o->pin_cpu);
                if (o->bus_pid > 0 && sched_getaffinity(o->bus_pid, sizeof bus_mask_before, &bus_mask_before) == 0) {
                        pin_to_cpu(o->bus_pid, o->pin_cpu);
                        bus_pinned = true;
                }
        }

        /* Rounds of one call of each kind; the order rotates so that no kind always follows
         * another (a cache or a wake-up left warm by the previous call favours the next). */
        uint64_t cpu0 = proc_cpu_ns(d.pid);
        for (unsigned round = 0; round < warmup_rounds + o->calls; round++)
                for (unsigned j = 0; j < _K_MAX; j++) {
                        unsigned kind = (round + j) % _K_MAX;
                        uint64_t t0 = now_ns();
                        int r = one_call(bus, kind, pen_path);
                        uint64_t t1 = now_ns();
                        if (r < 0)
                                die("%s call failed: %s", kind_names[kind], strerror(-r));
                        if (round >= warmup_rounds)
                                series_add(&s[kind], (int64_t) (t1 - t0));
                }
        uint64_t cpu1 = proc_cpu_ns(d.pid);

        if (bus_pinned)
                (void) sched_setaffinity(o->bus_pid, sizeof bus_mask_before, &bus_mask_before);
        long rss = proc_status_kib(d.pid, "VmRSS");
        daemon_stop(bus, &d);

        summary sum[_K_MAX];
        for (unsigned k = 0; k < _K_MAX; k++)
                sum[k] = series_summary(&s[k]);
        printf("{\"bench\": \"methods\", \"calls\": %u, \"pinned_cpu\": %d, \"interleaved\": true, ", o->calls, o->pin_cpu);
        printf("\"latency_us\": {");
        for (unsigned k = 0; k < _K_MAX; k++)
                print_summary_scaled(kind_names[k], &sum[k], 1000.0, k + 1 < _K_MAX ? ", " : "");
        printf("}, \"ratio_to_ping\": {");
        for (unsigned k = 1; k < _K_MAX; k++)
                printf("\"%s\": {\"median\": %.3f, \"p99\": %.3f}%s", kind_names[k], sum[k].median / sum[K_PING].median,
                       sum[k].p99 / sum[K_PING].p99, k + 1 < _K_MAX ? ", " : "");
        printf("}, \"needled_cpu_us_per_call\": %.2f, \"needled_rss_kib\": %ld}\n",
               (double) (cpu1 - cpu0) / 1000.0 / ((double) o->calls * _K_MAX), rss);
        for (unsigned k = 0; k < _K_MAX; k++)
                free(s[k].v);
        return 0;
}

/* ---- telemetry ---------------------------------------------------------------------------------- */

/* One ordered stream of one pen's samples as one consumer sees it. */
typedef struct stream {
        unsigned pen;
        bool started;
        uint32_t first_seq, last_seq, next_seq;
        uint64_t received;
        uint64_t gap_events, gap_samples;  /* jumps ahead in the sequence */
        uint64_t out_of_order;            /* repeats or steps back: never expected */
        uint32_t dropped_field;           /* fd records: the latest `dropped` seen */
        bool eof;
} stream;

static void stream_account(stream *st, uint32_t seq) {
        if (!st->started) {
                st->started = true;
                st->first_seq = seq;
        } else if (seq != st->next_seq) {
                int32_t ahead = (int32_t) (seq - st->next_seq);
                if (ahead > 0) {
                        st->gap_events++;
                        st->gap_samples += (uint64_t) ahead;
                } else
                        st->out_of_order++;
        }
        st->last_seq = seq;
        st->next_seq = seq + 1;
        st->received++;
}

typedef struct tele_ctx tele_ctx;

typedef struct subscriber {
        tele_ctx *ctx;
        sd_bus *bus;
        sd_bus_slot *slot;
        stream streams[PENS_MAX];
} subscriber;

typedef struct reader {
        int fd;
        unsigned pen;
        bool stalled;
        stream st;
        _Atomic uint32_t told_dropped; /* the latest `dropped`, for the main thread */
} reader;

struct tele_ctx {
        const options *o;
        pthread_mutex_t lock;          /* guards pen_paths and n_pens */
        char *pen_paths[PENS_MAX];
        unsigned n_pens;
        _Atomic uint64_t epoch_us[PENS_MAX]; /* the pens' power-on, CLOCK_MONOTONIC µs; 0 unknown */

        subscriber *subs;
        unsigned n_subs;
        reader *readers;
        unsigned n_readers;

        atomic_bool measuring;          /* inside the measurement window */
        atomic_bool stop_signals;       /* the subscriber thread ends */
        atomic_bool release_stalled;    /* stalled readers start reading */
        atomic_bool stop_readers;       /* the reader thread ends, EOF or not */
        _Atomic uint64_t signals_received; /* Telemetry messages, all subscribers */
        /* Telemetry signals go only to WatchTelemetry callers. The subscribers' buses belong to
         * the subscriber thread (sd-bus is not thread-safe): the main thread asks it to watch
         * the first watch_pens pens and waits until every call is answered. */
        atomic_uint watch_pens;
        atomic_uint watches_answered;
        atomic_bool watch_failed;
        char watch_error[256];          /* written once, before watch_failed is set */

        series sig_latency;             /* subscriber thread: pen -> client, µs */
        series fd_pen_client, fd_daemon_client, fd_pen_daemon; /* reader thread */
        bool reader_errors;
        char reader_error[256];
};

/* The pen index of an object path; a path seen first is added. -1 when the table is full. */
static int pen_index(tele_ctx *c, const char *path) {
        int idx = -1;
        pthread_mutex_lock(&c->lock);
        for (unsigned i = 0; i < c->n_pens; i++)
                if (STREQ(c->pen_paths[i], path)) {
                        idx = (int) i;
                        break;
                }
        if (idx < 0 && c->n_pens < PENS_MAX) {
                c->pen_paths[c->n_pens] = strdup(path);
                if (!c->pen_paths[c->n_pens])
                        die("out of memory");
                idx = (int) c->n_pens++;
        }
        pthread_mutex_unlock(&c->lock);
        return idx;
}

static int on_telemetry_signal(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        subscriber *sub = userdata;
        tele_ctx *c = sub->ctx;
        uint64_t recv = now_us();
        int pen = pen_index(c, sd_bus_message_get_path(m));
        if (pen < 0)
                return 0;
        stream *st = &sub->streams[pen];
        st->pen = (unsigned) pen;
        uint64_t epoch = atomic_load(&c->epoch_us[pen]);
        bool measuring = atomic_load(&c->measuring);
        atomic_fetch_add(&c->signals_received, 1);
        int r = sd_bus_message_enter_container(m, 'a', "(tuddddu)");
        if (r < 0)
                return 0;
        for (;;) {
                uint64_t t;
                uint32_t seq, flags;
                double depth, speed, current, temp;
                r = sd_bus_message_read(m, "(tuddddu)", &t, &seq, &depth, &speed, &current, &temp, &flags);
                if (r <= 0)
                        break;
                stream_account(st, seq);
                if (measuring && epoch)
                        series_add(&c->sig_latency, (int64_t) recv - (int64_t) (epoch + t));
        }
        return 0;
}

static int on_watch_reply(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        tele_ctx *c = userdata;
        const sd_bus_error *e = sd_bus_message_get_error(m);
        if (e && !atomic_load(&c->watch_failed)) {
                snprintf(c->watch_error, sizeof c->watch_error, "%s: %s", e->name, e->message ? e->message : "");
                atomic_store(&c->watch_failed, true);
        }
        atomic_fetch_add(&c->watches_answered, 1);
        return 0;
}

static void *subscriber_thread(void *arg) {
        tele_ctx *c = arg;
        sd_event *e = NULL;
        unsigned watched = 0;
        if (sd_event_new(&e) < 0)
                die("sd_event_new");
        for (unsigned i = 0; i < c->n_subs; i++)
                if (sd_bus_attach_event(c->subs[i].bus, e, SD_EVENT_PRIORITY_NORMAL) < 0)
                        die("sd_bus_attach_event");
        while (!atomic_load(&c->stop_signals)) {
                for (unsigned want = atomic_load(&c->watch_pens); watched < want; watched++) {
                        pthread_mutex_lock(&c->lock);
                        const char *path = c->pen_paths[watched];
                        pthread_mutex_unlock(&c->lock);
                        for (unsigned i = 0; i < c->n_subs; i++) {
                                int r = sd_bus_call_method_async(c->subs[i].bus, NULL, ND_BUS_NAME, path,
                                                                 ND_PEN_INTERFACE, "WatchTelemetry", on_watch_reply, c,
                                                                 NULL);
                                if (r < 0)
                                        die("WatchTelemetry: %s", strerror(-r));
                        }
                }
                /* short turns while the main thread waits for watches, else 50 ms */
                uint64_t turn = atomic_load(&c->watches_answered) < watched * c->n_subs ? USEC_PER_MSEC
                                                                                          : 50 * USEC_PER_MSEC;
                if (sd_event_run(e, turn) < 0)
                        die("subscriber loop failed");
        }
        for (unsigned i = 0; i < c->n_subs; i++)
                sd_bus_detach_event(c->subs[i].bus);
        sd_event_unref(e);
        return NULL;
}

static void reader_record(tele_ctx *c, reader *rd, const uint8_t *b, size_t n, uint64_t recv) {
        uint16_t version, size;
        uint32_t seq, dropped;
        uint64_t dev_us, host_us;
        if (n < RECORD_SIZE) {
                snprintf(c->reader_error, sizeof c->reader_error, "short record: %zu bytes", n);
                c->reader_errors = true;
                return;
        }
        memcpy(&version, b, 2);
        memcpy(&size, b + 2, 2);
        memcpy(&seq, b + 4, 4);
        memcpy(&dev_us, b + 8, 8);
        memcpy(&host_us, b + 16, 8);
        memcpy(&dropped, b + 24, 4);
        if (version != 1 || size != RECORD_SIZE) {
                snprintf(c->reader_error, sizeof c->reader_error, "record version %u size %u", version, size);
                c->reader_errors = true;
                return;
        }
        stream_account(&rd->st, seq);
        rd->st.dropped_field = dropped;
        atomic_store(&rd->told_dropped, dropped);
        uint64_t epoch = atomic_load(&c->epoch_us[rd->pen]);
        if (!rd->stalled && epoch && atomic_load(&c->measuring)) {
                series_add(&c->fd_pen_client, (int64_t) recv - (int64_t) (epoch + dev_us));
                series_add(&c->fd_daemon_client, (int64_t) recv - (int64_t) host_us);
                series_add(&c->fd_pen_daemon, (int64_t) host_us - (int64_t) (epoch + dev_us));
        }
}

static void *reader_thread(void *arg) {
        tele_ctx *c = arg;
        if (c->o->reader_rt > 0) {
                struct sched_param sp = { .sched_priority = c->o->reader_rt };
                int r = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
                if (r != 0)
                        die("the reader thread cannot run real-time (--reader-rt): %s", strerror(r));
        }
        int ep = epoll_create1(EPOLL_CLOEXEC);
        unsigned open_readers = c->n_readers;
        bool stalled_added = false;
        uint8_t buf[RECORD_BUF_SIZE];

        if (ep < 0)
                die("epoll: %s", strerror(errno));
        for (unsigned i = 0; i < c->n_readers; i++)
                if (!c->readers[i].stalled) {
                        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = i };
                        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->readers[i].fd, &ev) < 0)
                                die("epoll_ctl: %s", strerror(errno));
                }
        while (open_readers > 0 && !atomic_load(&c->stop_readers)) {
                if (!stalled_added && atomic_load(&c->release_stalled)) {
                        for (unsigned i = 0; i < c->n_readers; i++)
                                if (c->readers[i].stalled) {
                                        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = i };
                                        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->readers[i].fd, &ev) < 0)
                                                die("epoll_ctl: %s", strerror(errno));
                                }
                        stalled_added = true;
                }
                struct epoll_event evs[64];
                int n = epoll_wait(ep, evs, (int) ELEMENTSOF(evs), EPOLL_TICK_MS);
                if (n < 0 && errno != EINTR)
                        die("epoll_wait: %s", strerror(errno));
                for (int i = 0; i < n; i++) {
                        reader *rd = &c->readers[evs[i].data.u32];
                        for (;;) {
                                ssize_t len = recv(rd->fd, buf, sizeof buf, MSG_DONTWAIT);
                                uint64_t recv_time = now_us();
                                if (len > 0) {
                                        reader_record(c, rd, buf, (size_t) len, recv_time);
                                        continue;
                                }
                                if (len < 0 && (errno == EAGAIN || errno == EINTR))
                                        break;
                                /* 0: the daemon closed its end (the pen went) */
                                rd->st.eof = true;
                                (void) epoll_ctl(ep, EPOLL_CTL_DEL, rd->fd, NULL);
                                open_readers--;
                                break;
                        }
                }
        }
        close(ep);
        return NULL;
}

static int open_telemetry(sd_bus *bus, const char *path) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        int fd;
        int r = sd_bus_call_method(bus, ND_BUS_NAME, path, ND_PEN_INTERFACE, "OpenTelemetry", &error, &reply, NULL);
        if (r < 0)
                die("OpenTelemetry: %s", error.message ? error.message : strerror(-r));
        if (sd_bus_message_read(reply, "h", &fd) < 0)
                die("OpenTelemetry: bad reply");
        /* The fd belongs to the message: keep a copy of our own. */
        int copy = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (copy < 0)
                die("dup: %s", strerror(errno));
        return copy;
}

static void print_stream_totals(const char *name, const stream *const *streams, size_t n, const uint64_t *expected) {
        uint64_t delivered = 0, exp = 0, lost = 0, ooo = 0, gaps = 0, dropped = 0;
        uint32_t dropped_max = 0;
        for (size_t i = 0; i < n; i++) {
                delivered += streams[i]->received;
                exp += expected[i];
                lost += expected[i] > streams[i]->received ? expected[i] - streams[i]->received : 0;
                ooo += streams[i]->out_of_order;
                gaps += streams[i]->gap_samples;
                dropped_max = MAX(dropped_max, streams[i]->dropped_field);
                dropped += streams[i]->dropped_field;
        }
        printf("\"%s\": {\"streams\": %zu, \"expected\": %" PRIu64 ", \"delivered\": %" PRIu64 ", \"lost\": %" PRIu64
               ", \"gap_samples\": %" PRIu64 ", \"out_of_order\": %" PRIu64 ", \"dropped_counted\": %" PRIu64
               ", \"dropped_field_max\": %u}, ",
               name, n, exp, delivered, lost, gaps, ooo, dropped, dropped_max);
}

static int cmd_telemetry(const options *o) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = bus_connect();
        daemon_proc d = { 0 };
        tele_ctx c = { .o = o };
        pthread_t sub_tid, rd_tid;
        int broken = 0;
        unsigned fell_behind = 0;

        if (o->pens < 1 || o->pens > PENS_MAX || o->subscribers > SUBSCRIBERS_MAX || o->readers > READERS_PER_PEN_MAX ||
            o->stalled > STALLED_MAX || o->seconds <= 0)
                die("telemetry: 1..%u pens, 0..%u subscribers, 0..%u readers per pen, 0..%u stalled, seconds > 0",
                    PENS_MAX, SUBSCRIBERS_MAX, READERS_PER_PEN_MAX, STALLED_MAX);
        pthread_mutex_init(&c.lock, NULL);
        daemon_watch_name(bus, &d);
        daemon_spawn(o, o->state_dir, true, &d);
        daemon_wait_owned(bus, &d);

        /* Subscribers first; each watches every pen as soon as it is added (WatchTelemetry: the
         * signals are unicast to watchers, the match only routes them to the callback). */
        c.n_subs = o->subscribers;
        c.subs = calloc(MAX(c.n_subs, 1u), sizeof *c.subs);
        if (!c.subs)
                die("out of memory");
        for (unsigned i = 0; i < c.n_subs; i++) {
                c.subs[i].ctx = &c;
                c.subs[i].bus = bus_connect();
                int r = sd_bus_add_match(c.subs[i].bus, &c.subs[i].slot,
                                         "type='signal',sender='" ND_BUS_NAME "',interface='" ND_PEN_INTERFACE "',member='Telemetry'",
                                         on_telemetry_signal, &c.subs[i]);
                if (r < 0)
                        die("AddMatch: %s", strerror(-r));
        }
        if (pthread_create(&sub_tid, NULL, subscriber_thread, &c) != 0)
                die("pthread_create");
        (void) pthread_setname_np(sub_tid, "bench-signals");

        for (unsigned i = 0; i < o->pens; i++) {
                _cleanup_free_ char *path = add_pen(bus), *serial = NULL;
                int idx = pen_index(&c, path);
                bench_trace rec;
                if (sd_bus_path_decode(path, ND_PEN_PATH_PREFIX, &serial) <= 0)
                        die("unexpected pen path %s", path);
                bool found = false;
                while (!found && trace_read(&d, &rec, TRACE_WAIT_MS))
                        if (rec.kind == BENCH_TRACE_PEN_EPOCH && STREQ(rec.serial, serial)) {
                                atomic_store(&c.epoch_us[idx], rec.time_us);
                                found = true;
                        }
                if (!found)
                        die("no power-on time for pen %s: is %s needled-bench?", serial, o->needled);
                atomic_store(&c.watch_pens, (unsigned) idx + 1);
                uint64_t deadline = now_us() + WATCH_TIMEOUT_US;
                while (atomic_load(&c.watches_answered) < ((unsigned) idx + 1) * c.n_subs) {
                        if (now_us() > deadline)
                                die("WatchTelemetry on %s: no answer", path);
                        sleep_us(USEC_PER_MSEC);
                }
                if (atomic_load(&c.watch_failed))
                        die("WatchTelemetry on %s: %s", path, c.watch_error);
        }

        c.n_readers = o->pens * o->readers + o->stalled;
        c.readers = calloc(MAX(c.n_readers, 1u), sizeof *c.readers);
        if (!c.readers)
                die("out of memory");
        for (unsigned i = 0; i < c.n_readers; i++) {
                reader *rd = &c.readers[i];
                rd->stalled = i >= o->pens * o->readers;
                rd->pen = rd->stalled ? 0 : i / MAX(o->readers, 1u);
                rd->st.pen = rd->pen;
                rd->fd = open_telemetry(bus, c.pen_paths[rd->pen]);
        }
        if (pthread_create(&rd_tid, NULL, reader_thread, &c) != 0)
                die("pthread_create");
        (void) pthread_setname_np(rd_tid, "bench-readers");

        sleep_us((uint64_t) (o->warmup_seconds * (double) USEC_PER_SEC));
        uint64_t cpu_d0 = proc_cpu_ns(d.pid), ticks_d0 = proc_cpu_ticks(d.pid);
        uint64_t cpu_b0 = o->bus_pid > 0 ? proc_cpu_ns(o->bus_pid) : 0, cpu_c0 = self_cpu_ns();
        uint64_t busy0, total0, busy1, total1;
        machine_jiffies(&busy0, &total0);
        uint64_t t_start = now_us();
        atomic_store(&c.measuring, true);
        sleep_us((uint64_t) (o->seconds * (double) USEC_PER_SEC));
        atomic_store(&c.measuring, false);
        uint64_t t_end = now_us();
        uint64_t cpu_d1 = proc_cpu_ns(d.pid), ticks_d1 = proc_cpu_ticks(d.pid);
        uint64_t cpu_b1 = o->bus_pid > 0 ? proc_cpu_ns(o->bus_pid) : 0, cpu_c1 = self_cpu_ns();
        machine_jiffies(&busy1, &total1);
        long rss = proc_status_kib(d.pid, "VmRSS"), hwm = proc_status_kib(d.pid, "VmHWM");
        uint64_t deadline;

        /* The stalled readers have lost what did not fit their buffer; now they catch up, until
         * a record tells each of them how many it lost (the next record that reaches a reader
         * carries its count: a loss at the very end would never be told). */
        atomic_store(&c.release_stalled, true);
        deadline = now_us() + STALLED_CATCH_UP_TIMEOUT_US;
        for (bool told = false; !told && now_us() < deadline;) {
                sleep_us(10 * USEC_PER_MSEC);
                told = true;
                for (unsigned i = 0; i < c.n_readers; i++)
                        if (c.readers[i].stalled && atomic_load(&c.readers[i].told_dropped) == 0)
                                told = false;
        }
        sleep_us(STALLED_CATCH_UP_US);

        /* Removing the pens flushes their last batch and closes every reader (EOF). */
        for (unsigned i = 0; i < c.n_pens; i++)
                call_or_die(bus, ND_MANAGER_PATH, ND_SIM_INTERFACE, "RemovePen", "o", c.pen_paths[i]);
        deadline = now_us() + READERS_EOF_TIMEOUT_US;
        for (;;) {
                bool all = true;
                for (unsigned i = 0; i < c.n_readers; i++)
                        all = all && c.readers[i].st.eof;
                if (all || now_us() > deadline)
                        break;
                sleep_us(10 * USEC_PER_MSEC);
        }
        atomic_store(&c.stop_readers, true);
        pthread_join(rd_tid, NULL);
        /* Subscribers on a busy machine may be far behind: wait until no Telemetry message has
         * come for a while, so that what is counted lost is lost, not late. */
        deadline = now_us() + SIGNAL_DRAIN_TIMEOUT_US;
        for (uint64_t before = UINT64_MAX; now_us() < deadline;) {
                uint64_t n = atomic_load(&c.signals_received);
                if (n == before)
                        break;
                before = n;
                sleep_us(SIGNAL_QUIET_US);
        }
        atomic_store(&c.stop_signals, true);
        pthread_join(sub_tid, NULL);
        daemon_stop(bus, &d);

        /* Every pen's samples, from the first any consumer saw (subscribers watch each pen right
         * after it is added) to the last: every consumer got the pen's last sample before its
         * removal. */
        uint32_t first[PENS_MAX] = { 0 }, last[PENS_MAX] = { 0 };
        bool have_first[PENS_MAX] = { false }, have_last[PENS_MAX] = { false };
        for (unsigned i = 0; i < c.n_subs; i++)
                for (unsigned p = 0; p < c.n_pens; p++) {
                        const stream *s = &c.subs[i].streams[p];
                        if (s->started && (!have_first[p] || (int32_t) (s->first_seq - first[p]) < 0)) {
                                first[p] = s->first_seq;
                                have_first[p] = true;
                        }
                        if (s->started && (!have_last[p] || (int32_t) (s->last_seq - last[p]) > 0)) {
                                last[p] = s->last_seq;
                                have_last[p] = true;
                        }
                }
        for (unsigned i = 0; i < c.n_readers; i++) {
                const stream *s = &c.readers[i].st;
                unsigned p = s->pen;
                /* the earliest consumer, subscriber or reader, defines a pen's first sample */
                if (s->started && (!have_first[p] || (int32_t) (s->first_seq - first[p]) < 0)) {
                        first[p] = s->first_seq;
                        have_first[p] = true;
                }
                if (s->started && (!have_last[p] || (int32_t) (s->last_seq - last[p]) > 0)) {
                        last[p] = s->last_seq;
                        have_last[p] = true;
                }
        }
        bool seen[PENS_MAX];
        for (unsigned p = 0; p < PENS_MAX; p++)
                seen[p] = have_first[p] && have_last[p];
        uint64_t produced = 0;
        for (unsigned p = 0; p < c.n_pens; p++)
                produced += seen[p] ? (uint64_t) (last[p] - first[p]) + 1 : 0;

        size_t n_sig = (size_t) c.n_subs * c.n_pens, n_fd = (size_t) o->pens * o->readers;
        const stream **sig = calloc(MAX(n_sig, (size_t) 1), sizeof *sig), **fds = calloc(MAX(n_fd, (size_t) 1), sizeof *fds);
        uint64_t *sig_exp = calloc(MAX(n_sig, (size_t) 1), sizeof *sig_exp), *fd_exp = calloc(MAX(n_fd, (size_t) 1), sizeof *fd_exp);
        if (!sig || !fds || !sig_exp || !fd_exp)
                die("out of memory");
        for (unsigned i = 0; i < c.n_subs; i++)
                for (unsigned p = 0; p < c.n_pens; p++) {
                        size_t k = (size_t) i * c.n_pens + p;
                        sig[k] = &c.subs[i].streams[p];
                        /* from the first sample after its watch began to the pen's last */
                        sig_exp[k] = sig[k]->started ? (uint64_t) (last[p] - sig[k]->first_seq) + 1 : 0;
                        if (!sig[k]->started || sig[k]->received != sig_exp[k] || sig[k]->out_of_order)
                                broken = 1;
                }
        for (size_t i = 0; i < n_fd; i++) {
                const stream *s = &c.readers[i].st;
                fds[i] = s;
                fd_exp[i] = s->started ? (uint64_t) (last[s->pen] - s->first_seq) + 1 : 0;
                /* A reader whose socket filled up loses records by design, counted in `dropped`
                 * (it did not keep up: the machine starved it). Broken is a gap that no record
                 * counted, or records out of order. A loss after a reader's last record cannot
                 * be told to it (the pen went): it shows in `lost`, not as broken. */
                if (s->dropped_field)
                        fell_behind++;
                if (!s->started || s->out_of_order || s->gap_samples != s->dropped_field)
                        broken = 1;
        }

        double window_s = (double) (t_end - t_start) / (double) USEC_PER_SEC;
        double window_samples = window_s * SAMPLE_RATE_HZ * o->pens;
        double d_cpu_ms = (double) (cpu_d1 - cpu_d0) / 1e6, b_cpu_ms = (double) (cpu_b1 - cpu_b0) / 1e6;
        long tck = sysconf(_SC_CLK_TCK);
        double d_cpu_ms_ticks = (double) (ticks_d1 - ticks_d0) * 1000.0 / (double) (tck > 0 ? tck : 100);

        printf("{\"bench\": \"telemetry\", \"pens\": %u, \"subscribers\": %u, \"readers_per_pen\": %u, \"stalled\": %u, "
               "\"daemon_rt\": %d, \"reader_rt\": %d, \"window_s\": %.3f, \"produced\": %" PRIu64 ", ",
               o->pens, o->subscribers, o->readers, o->stalled, o->daemon_rt, o->reader_rt, window_s, produced);
        print_stream_totals("signal", sig, n_sig, sig_exp);
        print_stream_totals("fd", fds, n_fd, fd_exp);
        printf("\"stalled_readers\": [");
        for (unsigned i = 0; i < o->stalled; i++) {
                const reader *rd = &c.readers[n_fd + i];
                uint64_t exp = rd->st.started ? (uint64_t) (last[0] - rd->st.first_seq) + 1 : 0;
                /* its loss must be counted: the gaps it saw are exactly the drops it was told of */
                if (rd->st.dropped_field == 0 || rd->st.gap_samples != rd->st.dropped_field || rd->st.out_of_order)
                        broken = 1;
                printf("{\"expected\": %" PRIu64 ", \"received\": %" PRIu64 ", \"dropped_counted\": %u, "
                       "\"gap_samples\": %" PRIu64 "}%s",
                       exp, rd->st.received, rd->st.dropped_field, rd->st.gap_samples, i + 1 < o->stalled ? ", " : "");
        }
        printf("], \"latency_us\": {");
        summary s_sig = series_summary(&c.sig_latency), s_pc = series_summary(&c.fd_pen_client),
                s_dc = series_summary(&c.fd_daemon_client), s_pd = series_summary(&c.fd_pen_daemon);
        print_summary("signal_pen_to_client", &s_sig, ", ");
        print_summary("fd_pen_to_client", &s_pc, ", ");
        print_summary("fd_daemon_to_client", &s_dc, ", ");
        print_summary("fd_pen_to_daemon", &s_pd, "");
        /* The whole machine's busy time (100 % = one CPU), and what is left of it after ours. */
        double machine_pct = total1 > total0 ? (double) (busy1 - busy0) / (double) (total1 - total0) * 100.0 *
                                                       (double) sysconf(_SC_NPROCESSORS_ONLN)
                                             : 0.0;
        double client_ms = (double) (cpu_c1 - cpu_c0) / 1e6;
        double ours_pct = (d_cpu_ms + b_cpu_ms + client_ms) / 10.0 / window_s;
        printf("}, \"cpu\": {\"needled_ms\": %.2f, \"needled_ms_from_stat_ticks\": %.0f, \"needled_percent\": %.3f, "
               "\"needled_ms_per_1000_samples\": %.4f, \"bus_ms\": %.2f, \"bus_percent\": %.3f, \"client_ms\": %.2f, "
               "\"client_percent\": %.2f, \"machine_busy_percent\": %.1f, \"others_percent\": %.1f}, "
               "\"fd_readers_fell_behind\": %u, \"needled_rss_kib\": %ld, \"needled_hwm_kib\": %ld, "
               "\"reader_error\": \"%s\", \"broken\": %s}\n",
               d_cpu_ms, d_cpu_ms_ticks, d_cpu_ms / 10.0 / window_s, d_cpu_ms / (window_samples / 1000.0), b_cpu_ms,
               b_cpu_ms / 10.0 / window_s, client_ms, client_ms / 10.0 / window_s, machine_pct,
               MAX(machine_pct - ours_pct, 0.0), fell_behind, rss, hwm, c.reader_errors ? c.reader_error : "",
               broken ? "true" : "false");
        if (c.reader_errors)
                broken = 1;

        for (unsigned i = 0; i < c.n_subs; i++) {
                sd_bus_slot_unref(c.subs[i].slot);
                sd_bus_flush_close_unref(c.subs[i].bus);
        }
        for (unsigned i = 0; i < c.n_readers; i++)
                close(c.readers[i].fd);
        for (unsigned i = 0; i < c.n_pens; i++)
                free(c.pen_paths[i]);
        free(c.subs);
        free(c.readers);
        free(sig);
        free(fds);
        free(sig_exp);
        free(fd_exp);
        free(c.sig_latency.v);
        free(c.fd_pen_client.v);
        free(c.fd_daemon_client.v);
        free(c.fd_pen_daemon.v);
        pthread_mutex_destroy(&c.lock);
        return broken;
}

/* ---- floor -------------------------------------------------------------------------------------- */

/* The floor of telemetry: what the contract makes any daemon do at P pens x R readers and nothing
 * else. A child process wakes at the pens' rate on sd-event (an absolute 1 ms timer, as the
 * simulated pens are scheduled) and sends one 72-byte datagram per sample per reader
 * (dbus-api.md: every datagram is one record), read by the same reader thread as needled's
 * records. Its CPU and the readers' latency, measured in the same run as needled's, are what
 * needled's figures are set against: on a virtual machine the wake-ups alone cost a few %. */
typedef struct ticker {
        const int *fds;
        unsigned n_fds;
        uint64_t epoch_us, next_us;
        uint32_t seq;
} ticker;

static void put16(uint8_t *b, uint16_t v) { memcpy(b, &v, 2); }
static void put32(uint8_t *b, uint32_t v) { memcpy(b, &v, 4); }
static void put64(uint8_t *b, uint64_t v) { memcpy(b, &v, 8); }

/* Sends every sample due by now to every reader, one record per datagram. */
static void ticker_send_due(ticker *t) {
        uint8_t rec[RECORD_SIZE] = { 0 };
        uint64_t now = now_us();

        for (; t->next_us <= now; t->next_us += USEC_PER_SEC / SAMPLE_RATE_HZ, t->seq++) {
                put16(rec, 1);
                put16(rec + 2, RECORD_SIZE);
                put32(rec + 4, t->seq);
                put64(rec + 8, t->next_us - t->epoch_us);
                put64(rec + 16, now);
                for (unsigned i = 0; i < t->n_fds; i++)
                        (void) send(t->fds[i], rec, sizeof rec, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
}

static int on_tick(sd_event_source *src, uint64_t usec, void *userdata) {
        ticker *t = userdata;
        ticker_send_due(t);
        return sd_event_source_set_time(src, t->next_us);
}

/* The cheapest way a process can wake at 1 kHz: clock_nanosleep to absolute times, no event
 * loop; it sends what on_tick sends. Ends with SIGTERM's default action. */
static _Noreturn void ticker_plain(const int *fds, unsigned n_fds, uint64_t epoch_us) {
        ticker t = { .fds = fds, .n_fds = n_fds, .epoch_us = epoch_us, .next_us = epoch_us };
        sigset_t term;
        sigemptyset(&term);
        sigaddset(&term, SIGTERM);
        pthread_sigmask(SIG_UNBLOCK, &term, NULL);
        for (;;) {
                struct timespec ts = { .tv_sec = (time_t) (t.next_us / USEC_PER_SEC),
                                       .tv_nsec = (long) (t.next_us % USEC_PER_SEC * NSEC_PER_USEC) };
                (void) clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                ticker_send_due(&t);
        }
}

static _Noreturn void ticker_main(const int *fds, unsigned n_fds, uint64_t epoch_us) {
        ticker t = { .fds = fds, .n_fds = n_fds, .epoch_us = epoch_us, .next_us = epoch_us };
        sd_event *e = NULL;
        sd_event_source *timer = NULL;
        /* SIGTERM (blocked by the parent before the fork) ends the loop */
        if (sd_event_new(&e) < 0 || sd_event_add_signal(e, NULL, SIGTERM, NULL, NULL) < 0 ||
            sd_event_add_time(e, &timer, CLOCK_MONOTONIC, t.next_us, 1, on_tick, &t) < 0 ||
            sd_event_source_set_enabled(timer, SD_EVENT_ON) < 0)
                _exit(2);
        int r = sd_event_loop(e);
        _exit(r < 0 ? 2 : 0);
}

static int cmd_floor(const options *o) {
        tele_ctx c = { .o = o };
        pthread_t rd_tid;
        sigset_t term, old;

        if (o->pens < 1 || o->pens > PENS_MAX || o->readers > READERS_PER_PEN_MAX || o->seconds <= 0)
                die("floor: 1..%u pens, 0..%u readers per pen, seconds > 0", PENS_MAX, READERS_PER_PEN_MAX);
        c.n_pens = o->pens;
        c.n_readers = o->pens * o->readers; /* 0: the wake-ups alone */
        c.readers = calloc(MAX(c.n_readers, 1u), sizeof *c.readers);
        int *child_fds = calloc(MAX(c.n_readers, 1u), sizeof *child_fds);
        if (!c.readers || !child_fds)
                die("out of memory");
        for (unsigned i = 0; i < c.n_readers; i++) {
                int sv[2];
                if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
                        die("socketpair: %s", strerror(errno));
                c.readers[i].fd = sv[0];
                c.readers[i].pen = c.readers[i].st.pen = i / o->readers;
                child_fds[i] = sv[1];
        }
        /* the samples' clock starts at a millisecond boundary, as the simulated pens' does */
        uint64_t epoch = (now_us() / USEC_PER_MSEC + 10) * USEC_PER_MSEC;
        for (unsigned p = 0; p < o->pens; p++)
                atomic_store(&c.epoch_us[p], epoch);

        sigemptyset(&term);
        sigaddset(&term, SIGTERM);
        pthread_sigmask(SIG_BLOCK, &term, &old);
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid < 0)
                die("fork: %s", strerror(errno));
        if (pid == 0) {
                struct sched_param sp = { .sched_priority = o->daemon_rt };
                /* a client that dies (die() exits) leaves no ticker behind */
                if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent)
                        _exit(2);
                if (o->daemon_rt > 0 && sched_setscheduler(0, SCHED_FIFO, &sp) < 0)
                        _exit(3);
                for (unsigned i = 0; i < c.n_readers; i++)
                        close(c.readers[i].fd);
                if (o->plain)
                        ticker_plain(child_fds, c.n_readers, epoch);
                ticker_main(child_fds, c.n_readers, epoch);
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        for (unsigned i = 0; i < c.n_readers; i++)
                close(child_fds[i]);
        if (pthread_create(&rd_tid, NULL, reader_thread, &c) != 0)
                die("pthread_create");
        (void) pthread_setname_np(rd_tid, "bench-readers");

        sleep_us((uint64_t) (o->warmup_seconds * (double) USEC_PER_SEC));
        uint64_t cpu0 = proc_cpu_ns(pid), t_start = now_us();
        atomic_store(&c.measuring, true);
        sleep_us((uint64_t) (o->seconds * (double) USEC_PER_SEC));
        atomic_store(&c.measuring, false);
        uint64_t cpu1 = proc_cpu_ns(pid), t_end = now_us();
        long rss = proc_status_kib(pid, "VmRSS");

        kill(pid, SIGTERM);
        int status = 0;
        if (waitpid(pid, &status, 0) < 0)
                die("waitpid: %s", strerror(errno));
        /* the plain ticker ends by SIGTERM's default action, the sd-event one by returning */
        bool ended = o->plain ? WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM
                              : WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ended)
                die("the floor's ticker failed%s", WIFEXITED(status) && WEXITSTATUS(status) == 3
                                                          ? ": not allowed to run real-time (--daemon-rt)" : "");
        /* its ends closed: every reader reads to EOF */
        uint64_t deadline = now_us() + READERS_EOF_TIMEOUT_US;
        for (bool all = false; !all && now_us() < deadline;) {
                all = true;
                for (unsigned i = 0; i < c.n_readers; i++)
                        all = all && c.readers[i].st.eof;
                if (!all)
                        sleep_us(10 * USEC_PER_MSEC);
        }
        atomic_store(&c.stop_readers, true);
        pthread_join(rd_tid, NULL);

        uint64_t received = 0, gaps = 0;
        for (unsigned i = 0; i < c.n_readers; i++) {
                received += c.readers[i].st.received;
                gaps += c.readers[i].st.gap_samples;
        }
        double window_s = (double) (t_end - t_start) / (double) USEC_PER_SEC;
        double cpu_ms = (double) (cpu1 - cpu0) / 1e6;
        printf("{\"bench\": \"floor\", \"plain\": %s, \"pens\": %u, \"readers_per_pen\": %u, \"daemon_rt\": %d, \"reader_rt\": %d, "
               "\"window_s\": %.3f, \"records_received\": %" PRIu64 ", \"gap_samples\": %" PRIu64 ", \"latency_us\": {",
               o->plain ? "true" : "false", o->pens, o->readers, o->daemon_rt, o->reader_rt, window_s, received, gaps);
        summary s_pc = series_summary(&c.fd_pen_client), s_dc = series_summary(&c.fd_daemon_client);
        print_summary("fd_pen_to_client", &s_pc, ", ");
        print_summary("fd_daemon_to_client", &s_dc, "");
        printf("}, \"cpu\": {\"floor_ms\": %.2f, \"floor_percent\": %.3f, \"floor_ms_per_1000_samples\": %.4f}, "
               "\"floor_rss_kib\": %ld, \"reader_error\": \"%s\"}\n",
               cpu_ms, cpu_ms / 10.0 / window_s, cpu_ms / (window_s * SAMPLE_RATE_HZ * o->pens / 1000.0), rss,
               c.reader_errors ? c.reader_error : "");
        for (unsigned i = 0; i < c.n_readers; i++)
                close(c.readers[i].fd);
        free(c.readers);
        free(child_fds);
        free(c.fd_pen_client.v);
        free(c.fd_daemon_client.v);
        free(c.fd_pen_daemon.v);
        return c.reader_errors ? 1 : 0;
}

/* ---- stop --------------------------------------------------------------------------------------- */

/* Calls Stop on pen and returns the µs from just before the call to the stop command reaching
 * the transport (needled-bench's probe); *rtt the call's round trip. */
static int64_t timed_stop(sd_bus *bus, daemon_proc *d, const char *pen, int64_t *rtt) {
        bench_trace rec;
        /* Nothing else sends stops here; a leftover record would pair with the wrong call. */
        while (trace_read(d, &rec, 0))
                ;
        uint64_t t0 = now_us();
        call_or_die(bus, pen, ND_PEN_INTERFACE, "Stop", NULL);
        *rtt = (int64_t) (now_us() - t0);
        while (trace_read(d, &rec, TRACE_WAIT_MS))
                if (rec.kind == BENCH_TRACE_MOTOR_STOP)
                        return (int64_t) rec.time_us - (int64_t) t0;
        die("no motor stop reached the transport after a Stop call");
}

static int cmd_stop(const options *o) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = bus_connect();
        daemon_proc d = { 0 };
        series idle = { 0 }, idle_rtt = { 0 }, ping = { 0 }, running = { 0 }, running_rtt = { 0 };
        const unsigned warmup = MIN(o->calls / 10 + 1, 200u);

        daemon_watch_name(bus, &d);
        daemon_spawn(o, o->state_dir, true, &d);
        daemon_wait_owned(bus, &d);
        _cleanup_free_ char *pen = add_pen(bus);

        /* An idle pen: Stop still sends the motor stop (it is never skipped), so many calls are
         * cheap; a Ping before each gives the floor in the same conditions. */
        for (unsigned i = 0; i < warmup + o->calls; i++) {
                int64_t rtt;
                uint64_t t0 = now_us();
                call_or_die(bus, ND_MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping", NULL);
                int64_t ping_us = (int64_t) (now_us() - t0);
                int64_t lat = timed_stop(bus, &d, pen, &rtt);
                if (i >= warmup) {
                        series_add(&ping, ping_us);
                        series_add(&idle, lat);
                        series_add(&idle_rtt, rtt);
                }
        }

        /* Running sessions: each needs a fresh cartridge (single use). */
        for (unsigned i = 0; i < o->sessions; i++) {
                char id[32];
                snprintf(id, sizeof id, "BENCH-%d-%u", (int) getpid(), i);
                call_or_die(bus, ND_MANAGER_PATH, ND_SIM_INTERFACE, "InsertCartridge", "osu", pen, id, 12u);
                call_or_die(bus, pen, ND_PEN_INTERFACE, "LoadProfile", "s", BENCH_PROFILE_NAME);
                call_or_die(bus, pen, ND_PEN_INTERFACE, "Start", "a{sv}", 0);
                sleep_us(SESSION_RUN_BEFORE_STOP_US);
                int64_t rtt, lat = timed_stop(bus, &d, pen, &rtt);
                series_add(&running, lat);
                series_add(&running_rtt, rtt);
                call_or_die(bus, ND_MANAGER_PATH, ND_SIM_INTERFACE, "EjectCartridge", "o", pen);
        }
        daemon_stop(bus, &d);

        summary s_idle = series_summary(&idle), s_rtt = series_summary(&idle_rtt), s_ping = series_summary(&ping),
                s_run = series_summary(&running), s_run_rtt = series_summary(&running_rtt);
        printf("{\"bench\": \"stop\", \"calls\": %u, \"sessions\": %u, \"latency_us\": {", o->calls, o->sessions);
        print_summary("idle_stop_to_transport", &s_idle, ", ");
        print_summary("idle_stop_round_trip", &s_rtt, ", ");
        print_summary("ping_round_trip", &s_ping, ", ");
        print_summary("running_stop_to_transport", &s_run, ", ");
        print_summary("running_stop_round_trip", &s_run_rtt, "");
        printf("}}\n");
        free(idle.v);
        free(idle_rtt.v);
        free(ping.v);
        free(running.v);
        free(running_rtt.v);
        return 0;
}

/* ---- startup ------------------------------------------------------------------------------------ */

typedef struct startup_figures {
        series to_name, to_reply, rss, pss;
} startup_figures;

/* One start of exe: spawn to name owned, to the first Ping answered; RSS and PSS once idle. */
static void startup_once(sd_bus *bus, const options *o, const char *exe, const char *state_dir, startup_figures *f) {
        daemon_proc d = { 0 };
        char path[64], line[256];

        daemon_watch_name(bus, &d);
        uint64_t t0 = daemon_spawn_exe(o, exe, state_dir, false, &d);
        daemon_wait_owned(bus, &d);
        series_add(&f->to_name, (int64_t) (d.owned_us - t0));
        /* Owning the name is not serving: the first answered call, sent at once. */
        call_or_die(bus, ND_MANAGER_PATH, "org.freedesktop.DBus.Peer", "Ping", NULL);
        series_add(&f->to_reply, (int64_t) (now_us() - t0));
        sleep_us(IDLE_RSS_WAIT_US);
        series_add(&f->rss, proc_status_kib(d.pid, "VmRSS"));
        /* Pss: shared pages counted by share, the fairer footprint */
        snprintf(path, sizeof path, "/proc/%d/smaps_rollup", (int) d.pid);
        _cleanup_fclose_ FILE *fp = fopen(path, "re");
        while (fp && fgets(line, sizeof line, fp))
                if (strncmp(line, "Pss:", 4) == 0)
                        series_add(&f->pss, strtol(line + 4, NULL, 10));
        daemon_stop(bus, &d);
        sd_bus_slot_unref(d.name_slot);
}

static void print_startup(const char *name, startup_figures *f, const char *sep) {
        summary s_name = series_summary(&f->to_name), s_reply = series_summary(&f->to_reply),
                s_rss = series_summary(&f->rss), s_pss = series_summary(&f->pss);
        printf("\"%s\": {", name);
        print_summary("exec_to_name_us", &s_name, ", ");
        print_summary("exec_to_first_reply_us", &s_reply, ", ");
        print_summary("rss_idle_kib", &s_rss, ", ");
        print_summary("pss_idle_kib", &s_pss, "");
        printf("}%s", sep);
        free(f->to_name.v);
        free(f->to_reply.v);
        free(f->rss.v);
        free(f->pss.v);
}

static int cmd_startup(const options *o) {
        _cleanup_(sd_bus_flush_close_unrefp) sd_bus *bus = bus_connect();
        startup_figures needled = { 0 }, floor_fig = { 0 }, ledger_fig = { 0 };

        /* In turns, needled then the floor, so that both see the same machine. */
        for (unsigned i = 0; i < o->runs; i++) {
                char dir[4096];
                const char *state_dir = o->state_dir;
                if (o->fresh) {
                        snprintf(dir, sizeof dir, "%s/fresh-%u", o->state_dir, i);
                        if (mkdir(dir, 0700) < 0 && errno != EEXIST)
                                die("mkdir %s: %s", dir, strerror(errno));
                        state_dir = dir;
                }
                startup_once(bus, o, o->needled, state_dir, &needled);
                if (o->floor)
                        startup_once(bus, o, o->floor, state_dir, &floor_fig);
                if (o->floor_ledger)
                        startup_once(bus, o, o->floor_ledger, state_dir, &ledger_fig);
        }
        printf("{\"bench\": \"startup\", \"runs\": %u, \"fresh_state\": %s, ", o->runs, o->fresh ? "true" : "false");
        /* medians before the series are freed */
        summary n_name = series_summary(&needled.to_name), f_name = series_summary(&floor_fig.to_name);
        summary n_reply = series_summary(&needled.to_reply), f_reply = series_summary(&floor_fig.to_reply);
        if (o->floor)
                printf("\"ratio_to_floor\": {\"exec_to_name_median\": %.3f, \"exec_to_first_reply_median\": %.3f}, ",
                       n_name.median / f_name.median, n_reply.median / f_reply.median);
        print_startup("floor", &floor_fig, ", ");
        print_startup("floor_ledger", &ledger_fig, ", ");
        print_startup("needled", &needled, "");
        printf("}\n");
        return 0;
}

/* ---- main --------------------------------------------------------------------------------------- */

static void usage(void) {
        printf("Usage: bench-needled COMMAND --needled PATH --limits FILE --profiles DIR --state-dir DIR [OPTIONS]\n"
               "Commands: methods, telemetry, floor, stop, startup (see docs/performance.md).\n"
               "  --calls N          methods/stop: calls of each kind (default 10000)\n"
               "  --pin CPU          methods: pin client, bus (--bus-pid) and daemon to CPU\n"
               "  --bus-pid PID      the bus daemon, for its CPU time and pinning\n"
               "  --pens N --subscribers N --readers N --stalled N --seconds S --warmup S   telemetry\n"
               "                     (floor: --pens, --readers, --seconds, --warmup, --plain; no daemon)\n"
               "  --plain            floor: wake with clock_nanosleep, no event loop\n"
               "  --sessions N       stop: running sessions stopped (default 100)\n"
               "  --runs N [--fresh] startup: runs; a new state directory each run\n"
               "  --floor PATH       startup: the floor service, started in turns with needled\n"
               "  --floor-ledger PATH  startup: the floor with an SQLite ledger open, in turns too\n"
               "  --daemon-log FILE  the daemon's stderr (default /dev/null)\n"
               "  --daemon-rt PRIO   run daemons and floors SCHED_FIFO at PRIO, as needled.service does (0: not)\n"
               "  --reader-rt PRIO   run the fd reader thread SCHED_FIFO at PRIO (0: not)\n");
}

static unsigned parse_unsigned(const char *s, const char *what) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (errno || !*s || *end || v > UINT32_MAX)
                die("%s: '%s' is not an unsigned number", what, s);
        return (unsigned) v;
}

static double parse_seconds(const char *s, const char *what) {
        char *end;
        double v = strtod(s, &end);
        if (!*s || *end || !(v >= 0) || v > 3600)
                die("%s: '%s' is not a number of seconds (0-3600)", what, s);
        return v;
}

int main(int argc, char *argv[]) {
        enum { A_NEEDLED = 0x100, A_LIMITS, A_PROFILES, A_STATE, A_LOG, A_CALLS, A_SESSIONS, A_RUNS, A_FRESH, A_PENS,
               A_SUBS, A_READERS, A_STALLED, A_SECONDS, A_WARMUP, A_PIN, A_BUS_PID, A_FLOOR, A_DAEMON_RT, A_READER_RT,
               A_FLOOR_LEDGER, A_PLAIN, A_HELP };
        static const struct option longopts[] = {
                { "needled", required_argument, NULL, A_NEEDLED },   { "limits", required_argument, NULL, A_LIMITS },
                { "profiles", required_argument, NULL, A_PROFILES }, { "state-dir", required_argument, NULL, A_STATE },
                { "daemon-log", required_argument, NULL, A_LOG },    { "calls", required_argument, NULL, A_CALLS },
                { "sessions", required_argument, NULL, A_SESSIONS }, { "runs", required_argument, NULL, A_RUNS },
                { "fresh", no_argument, NULL, A_FRESH },             { "pens", required_argument, NULL, A_PENS },
                { "subscribers", required_argument, NULL, A_SUBS },  { "readers", required_argument, NULL, A_READERS },
                { "stalled", required_argument, NULL, A_STALLED },   { "seconds", required_argument, NULL, A_SECONDS },
                { "warmup", required_argument, NULL, A_WARMUP },     { "pin", required_argument, NULL, A_PIN },
                { "bus-pid", required_argument, NULL, A_BUS_PID },   { "floor", required_argument, NULL, A_FLOOR },
                { "daemon-rt", required_argument, NULL, A_DAEMON_RT }, { "reader-rt", required_argument, NULL, A_READER_RT },
                { "floor-ledger", required_argument, NULL, A_FLOOR_LEDGER }, { "plain", no_argument, NULL, A_PLAIN },
                { "help", no_argument, NULL, A_HELP },
                { NULL, 0, NULL, 0 }
        };
        options o = { .calls = 10000, .sessions = 100, .runs = 30, .pens = 1, .subscribers = 1, .readers = 1,
                      .seconds = 3, .warmup_seconds = 1, .pin_cpu = -1 };
        int c;

        if (argc < 2 || argv[1][0] == '-') {
                usage();
                return argc >= 2 && STREQ(argv[1], "--help") ? 0 : 2;
        }
        const char *cmd = argv[1];
        optind = 2;
        while ((c = getopt_long(argc, argv, "", longopts, NULL)) >= 0) {
                switch (c) {
                case A_NEEDLED: o.needled = optarg; break;
                case A_LIMITS: o.limits = optarg; break;
                case A_PROFILES: o.profiles = optarg; break;
                case A_STATE: o.state_dir = optarg; break;
                case A_LOG: o.daemon_log = optarg; break;
                case A_CALLS: o.calls = parse_unsigned(optarg, "--calls"); break;
                case A_SESSIONS: o.sessions = parse_unsigned(optarg, "--sessions"); break;
                case A_RUNS: o.runs = parse_unsigned(optarg, "--runs"); break;
                case A_FRESH: o.fresh = true; break;
                case A_PENS: o.pens = parse_unsigned(optarg, "--pens"); break;
                case A_SUBS: o.subscribers = parse_unsigned(optarg, "--subscribers"); break;
                case A_READERS: o.readers = parse_unsigned(optarg, "--readers"); break;
                case A_STALLED: o.stalled = parse_unsigned(optarg, "--stalled"); break;
                case A_SECONDS: o.seconds = parse_seconds(optarg, "--seconds"); break;
                case A_WARMUP: o.warmup_seconds = parse_seconds(optarg, "--warmup"); break;
                case A_PIN: o.pin_cpu = (int) parse_unsigned(optarg, "--pin"); break;
                case A_BUS_PID: o.bus_pid = (pid_t) parse_unsigned(optarg, "--bus-pid"); break;
                case A_FLOOR: o.floor = optarg; break;
                case A_FLOOR_LEDGER: o.floor_ledger = optarg; break;
                case A_PLAIN: o.plain = true; break;
                case A_DAEMON_RT: o.daemon_rt = (int) parse_unsigned(optarg, "--daemon-rt"); break;
                case A_READER_RT: o.reader_rt = (int) parse_unsigned(optarg, "--reader-rt"); break;
                case A_HELP: usage(); return 0;
                default: return 2;
                }
        }
        if (o.daemon_rt > 99 || o.reader_rt > 99)
                die("--daemon-rt and --reader-rt take a SCHED_FIFO priority, 1-99 (0: not real-time)");
        if ((!o.needled || !o.limits || !o.profiles || !o.state_dir) && !STREQ(cmd, "floor"))
                die("--needled, --limits, --profiles and --state-dir are needed (see --help)");
        if (o.calls == 0 && !STREQ(cmd, "telemetry") && !STREQ(cmd, "startup") && !STREQ(cmd, "floor"))
                die("--calls must be at least 1");
        signal(SIGPIPE, SIG_IGN);
        setvbuf(stdout, NULL, _IOLBF, 0);

        if (STREQ(cmd, "methods"))
                return cmd_methods(&o);
        if (STREQ(cmd, "telemetry"))
                return cmd_telemetry(&o);
        if (STREQ(cmd, "floor"))
                return cmd_floor(&o);
        if (STREQ(cmd, "stop"))
                return cmd_stop(&o);
        if (STREQ(cmd, "startup")) {
                if (o.runs == 0)
                        die("--runs must be at least 1");
                return cmd_startup(&o);
        }
        die("unknown command '%s' (methods, telemetry, floor, stop, startup)", cmd);
}
