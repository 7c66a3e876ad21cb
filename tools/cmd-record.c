/* cmd-record.c: needlectl record, a pen's telemetry from its socket (OpenTelemetry) to CSV,
 * every sample as the daemon delivered it, with an account of what was lost. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "bus-util.h"
#include "needlectl.h"
#include "pen-monitor.h"

#define CSV_HEADER "sequence,device_time_us,host_time_us,dropped,flags,depth_mm,speed_hz,current_ma,temperature_c," \
                   "battery_percent\n"
#define DURATION_MAX_S (7.0 * 86400.0)

static void record_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl record [PEN] --output FILE [--duration SECONDS] [--samples N]\n"
                "                        [--json] [--system|--session]\n"
                "\n"
                "Records a pen's telemetry, every sample the daemon's telemetry socket delivers, to\n"
                "a CSV file (FILE '-' is standard output) with the header\n"
                "  " CSV_HEADER
                "(times in us: the pen's clock, and the daemon's CLOCK_MONOTONIC; dropped: records\n"
                "the daemon dropped for this reader so far; flags as in docs/telemetry.md).\n"
                "It records until Ctrl-C or SIGTERM, --duration, --samples, or the pen leaving,\n"
                "then prints a summary on standard error: samples written, records the daemon\n"
                "dropped because needlectl fell behind, and sequence numbers never seen (gaps,\n"
                "dropped ones included). No authorization is needed. PEN (serial or object path)\n"
                "may be omitted when one pen is connected.\n"
                "\n"
                "Options:\n"
                "      --output FILE      where the CSV goes (replaced if it exists)\n"
                "      --duration S       stop after S seconds\n"
                "      --samples N        stop after N samples\n"
                "      --json             the summary as one JSON object on standard output:\n"
                "                         {output, pen, samples, dropped, gaps, bad_records,\n"
                "                         first_sequence, last_sequence, duration_s, ended}\n"
                "                         where ended is interrupted, duration, samples or pen-gone\n"
                CTL_COMMON_HELP "\n"
                "Exit status: 0 after a stop asked for; 5 when the pen left (the file holds what\n"
                "came before); 2 when FILE cannot be written.\n" CTL_EXIT_HELP);
}

typedef struct record_args {
        const char *output;
        uint64_t duration_usec;
        uint64_t max_samples;
} record_args;

typedef struct record_ctx {
        sd_event *event;
        FILE *out;
        const char *output;
        uint64_t max_samples;
        uint64_t written;
        uint32_t first_sequence;
        uint32_t last_sequence;
        uint64_t started_usec;
        const char *ended;
        int write_errno;
} record_ctx;

enum { ARG_OUTPUT = CTL_ARG_VERB, ARG_DURATION, ARG_SAMPLES };

static int record_option(int c, const char *arg, void *userdata) {
        record_args *a = userdata;
        double s;
        switch (c) {
        case ARG_OUTPUT:
                if (arg[0] == '\0')
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "record: --output needs a file name");
                a->output = arg;
                return 0;
        case ARG_DURATION:
                if (ctl_parse_double(arg, &s) < 0 || s <= 0 || s > DURATION_MAX_S)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "record: --duration takes seconds above 0, not '%s'", arg);
                a->duration_usec = (uint64_t) llround(s * (double) USEC_PER_SEC);
                return 0;
        case ARG_SAMPLES:
                if (ctl_parse_unsigned(arg, UINT64_MAX, &a->max_samples) < 0 || a->max_samples == 0)
                        return ctl_fail(NEEDLECTL_EXIT_USAGE, "record: --samples takes a count from 1, not '%s'", arg);
                return 0;
        default:
                return NEEDLECTL_EXIT_USAGE;
        }
}

static void record_end(record_ctx *c, const char *why) {
        if (!c->ended) {
                c->ended = why;
                sd_event_exit(c->event, 0);
        }
}

static void on_sample(ctl_monitor *m, const nd_telemetry_record *rec, void *userdata) {
        record_ctx *c = userdata;
        if (c->ended)
                return;
        if (c->written == 0)
                c->first_sequence = rec->sequence;
        c->last_sequence = rec->sequence;
        if (fprintf(c->out, "%" PRIu32 ",%" PRIu64 ",%" PRIu64 ",%" PRIu32 ",%" PRIu32 ",%.9g,%.9g,%.9g,%.9g,%u\n",
                    rec->sequence, rec->device_time_us, rec->host_time_us, rec->dropped, rec->flags, rec->depth_mm,
                    rec->speed_hz, rec->current_ma, rec->temperature_c, rec->battery_percent) < 0) {
                c->write_errno = errno ? errno : EIO;
                record_end(c, "write-error");
                return;
        }
        c->written++;
        if (c->max_samples > 0 && c->written >= c->max_samples)
                record_end(c, "samples");
}

static void on_event(ctl_monitor *m, ctl_monitor_event event, void *userdata) {
        record_ctx *c = userdata;
        if (event == CTL_MONITOR_TELEMETRY_EOF || event == CTL_MONITOR_PEN_GONE || event == CTL_MONITOR_DAEMON_GONE)
                record_end(c, "pen-gone");
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        record_end(userdata, "interrupted");
        return 0;
}

static int on_duration(sd_event_source *s, uint64_t usec, void *userdata) {
        record_end(userdata, "duration");
        return 0;
}

static int record_check(ctl_invocation *inv) {
        const record_args *args = inv->args;
        if (!args->output)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "record: --output FILE is required ('-' for standard output)");
        if (STREQ(args->output, "-") && inv->common.json)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "record: --json prints the summary on standard output; "
                                                      "write the CSV to a file");
        return -1;
}

static const struct option record_options[] = {
        CTL_COMMON_OPTIONS,
        { "output",   required_argument, NULL, ARG_OUTPUT },
        { "duration", required_argument, NULL, ARG_DURATION },
        { "samples",  required_argument, NULL, ARG_SAMPLES },
        { NULL, 0, NULL, 0 }
};

const ctl_verb_syntax ctl_syntax_record = {
        .usage = record_usage,
        .options = record_options,
        .handler = record_option,
        .args_size = sizeof(record_args),
        .check = record_check,
};

int verb_record(ctl_invocation *inv) {
        const record_args args = *(const record_args *) inv->args;
        bool to_stdout = STREQ(args.output, "-");
        sd_bus *bus = inv->bus;
        _cleanup_free_ char *path = NULL;
        int r = ctl_resolve_pen(bus, inv->argc > 0 ? inv->argv[0] : NULL, &path);
        if (r != 0)
                return r;

        _cleanup_fclose_ FILE *file = NULL;
        if (!to_stdout) {
                file = fopen(args.output, "we");
                if (!file)
                        return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write %s: %s", args.output, strerror(errno));
        }
        FILE *out = to_stdout ? stdout : file;
        if (fputs(CSV_HEADER, out) < 0)
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write %s: %s", args.output, strerror(errno));

        _cleanup_(sd_event_unrefp) sd_event *event = NULL;
        r = sd_event_default(&event);
        if (r >= 0)
                r = sd_bus_attach_event(bus, event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot set up the event loop: %s", strerror(-r));
        record_ctx c = { .event = event, .out = out, .output = to_stdout ? "standard output" : args.output,
                         .max_samples = args.max_samples };

        _cleanup_(ctl_monitor_freep) ctl_monitor *m = NULL;
        r = ctl_monitor_new(event, bus, path, true, &m);
        if (r != 0)
                return r;
        ctl_monitor_set_callbacks(m, on_event, on_sample, &c);

        sigset_t mask;
        sigemptyset(&mask);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGHUP);
        (void) signal(SIGPIPE, SIG_IGN);
        _cleanup_(sd_event_source_disable_unrefp) sd_event_source *sig_int = NULL, *sig_term = NULL, *sig_hup = NULL,
                                                                   *timer = NULL;
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                r = -errno;
        if (r >= 0)
                r = sd_event_add_signal(event, &sig_int, SIGINT, on_signal, &c);
        if (r >= 0)
                r = sd_event_add_signal(event, &sig_term, SIGTERM, on_signal, &c);
        if (r >= 0)
                r = sd_event_add_signal(event, &sig_hup, SIGHUP, on_signal, &c);
        if (r >= 0 && args.duration_usec > 0)
                r = sd_event_add_time_relative(event, &timer, CLOCK_MONOTONIC, args.duration_usec, USEC_PER_MSEC,
                                               on_duration, &c);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot set up the event loop: %s", strerror(-r));

        c.started_usec = ctl_now_monotonic_usec();
        r = sd_event_loop(event);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "the event loop failed: %s", strerror(-r));
        double duration_s = (double) (ctl_now_monotonic_usec() - c.started_usec) / (double) USEC_PER_SEC;

        if (!c.write_errno && (fflush(out) != 0 || (file && fsync(fileno(file)) < 0 && errno != EINVAL)))
                c.write_errno = errno ? errno : EIO;
        if (file) {
                int fr = fclose(TAKE_PTR(file));
                if (fr != 0 && !c.write_errno)
                        c.write_errno = errno ? errno : EIO;
        }
        if (c.write_errno)
                return ctl_fail(NEEDLECTL_EXIT_UNREADABLE, "cannot write %s: %s", c.output, strerror(c.write_errno));

        if (inv->common.json) {
                _cleanup_json_ json_object *o = json_object_new_object();
                if (!o)
                        return ctl_oom();
                json_object_object_add(o, "output", json_object_new_string(args.output));
                json_object_object_add(o, "pen", json_object_new_string(m->serial));
                json_object_object_add(o, "samples", json_object_new_int64((int64_t) c.written));
                json_object_object_add(o, "dropped", json_object_new_int64((int64_t) m->dropped));
                json_object_object_add(o, "gaps", json_object_new_int64((int64_t) m->gaps));
                json_object_object_add(o, "bad_records", json_object_new_int64((int64_t) m->bad_records));
                json_object_object_add(o, "first_sequence", c.written ? json_object_new_int64(c.first_sequence) : NULL);
                json_object_object_add(o, "last_sequence", c.written ? json_object_new_int64(c.last_sequence) : NULL);
                json_object_object_add(o, "duration_s", json_object_new_double(duration_s));
                json_object_object_add(o, "ended", json_object_new_string(c.ended ? c.ended : "interrupted"));
                r = ctl_print_json(o);
                if (r != 0)
                        return r;
        } else {
                fprintf(stderr, "Recorded %" PRIu64 " samples of %s to %s in %.1f s: %" PRIu64 " dropped by the daemon, %"
                                PRIu64 " sequence gaps, %" PRIu64 " unreadable records.\n",
                        c.written, m->serial, c.output, duration_s, m->dropped, m->gaps, m->bad_records);
        }
        if (c.ended && STREQ(c.ended, "pen-gone")) {
                fprintf(stderr, "needlectl: the pen left; the recording ends with it\n");
                return NEEDLECTL_EXIT_NO_PEN;
        }
        return NEEDLECTL_EXIT_OK;
}
