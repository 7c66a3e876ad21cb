/* cmd-watch.c: needlectl watch, a live view of one pen, and the view itself, which run shares.
 * On a terminal: a full-screen view refreshed 15 times a second, restored on every way out.
 * Elsewhere: one line (or one JSON object) per update. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <langinfo.h>
#include <locale.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>

#include "bus-util.h"
#include "needlectl.h"
#include "pen-monitor.h"

/* The screen's refresh period: 15 Hz, comfortably above the 10 Hz a person reads as live. */
#define SCREEN_REFRESH_USEC (USEC_PER_SEC / 15)
/* A measured value older than this is shown as missing (the pen stopped streaming). */
#define SAMPLE_STALE_USEC (USEC_PER_SEC / 2)
/* Points kept per trace; the screen shows as many as fit. */
#define TRACE_MAX 240
#define TRACE_WIDTH_MAX 60
#define TRACE_WIDTH_MIN 8
/* The left part of a value row, before the trace. */
#define ROW_LABEL_WIDTH 44 /* > LABEL_WIDTH + VALUE_WIDTH * 2 + 2 */
#define SCREEN_WIDTH_DEFAULT 80
#define SCREEN_HEIGHT_DEFAULT 24
#define LINE_INTERVAL_DEFAULT_USEC USEC_PER_SEC

typedef struct trace {
        double v[TRACE_MAX];
        size_t n;     /* points held */
        size_t head;  /* where the next point goes */
} trace;

struct ctl_view {
        ctl_monitor *m;
        ctl_view_mode mode;
        uint64_t interval_usec;
        char *title;
        sd_event_source *refresh_timer;
        sd_event_source *stdin_source;
        sd_event_source *signals[4];
        bool screen_active;
        bool termios_saved;
        struct termios saved_termios;
        bool utf8;
        unsigned rows, cols;
        trace depth, speed, current, temperature;
        uint64_t last_sample_usec; /* CLOCK_MONOTONIC when the newest sample arrived */
        char *note;
        char last_state[32];
        bool was_present;
        ctl_view_quit_fn quit;
        void *quit_userdata;
        ctl_monitor_event_fn chained;
        void *chained_userdata;
        ctl_view_key_fn on_key;
        void *key_userdata;
        char *key_help;
};

static void trace_push(trace *t, double v) {
        t->v[t->head] = v;
        t->head = (t->head + 1) % TRACE_MAX;
        if (t->n < TRACE_MAX)
                t->n++;
}

/* The i-th newest-but-(count-1-i) point: i from 0 (oldest shown) to count-1 (newest). */
static double trace_get(const trace *t, size_t count, size_t i) {
        size_t back = count - 1 - i;
        if (back >= t->n)
                return NAN;
        return t->v[(t->head + TRACE_MAX - 1 - back) % TRACE_MAX];
}

static bool sample_fresh(const ctl_view *v) {
        return v->m->present && v->m->have_sample && ctl_now_monotonic_usec() - v->last_sample_usec < SAMPLE_STALE_USEC;
}

/* Renders the last width points of t as a sparkline scaled to their own range. */
static void render_trace(FILE *out, const ctl_view *v, const trace *t, size_t width, double min_span) {
        static const char *const bars[] = { "\u2581", "\u2582", "\u2583", "\u2584", "\u2585", "\u2586", "\u2587", "\u2588" };
        static const char ascii[] = "_.-~=+*#";
        double lo = INFINITY, hi = -INFINITY;
        for (size_t i = 0; i < width; i++) {
                double x = trace_get(t, width, i);
                if (isfinite(x)) {
                        lo = MIN(lo, x);
                        hi = MAX(hi, x);
                }
        }
        if (!isfinite(lo))
                return;
        if (hi - lo < min_span) {
                double mid = (hi + lo) / 2;
                lo = mid - min_span / 2;
                hi = mid + min_span / 2;
        }
        for (size_t i = 0; i < width; i++) {
                double x = trace_get(t, width, i);
                if (!isfinite(x)) {
                        fputc(' ', out);
                        continue;
                }
                size_t level = (size_t) lround((x - lo) / (hi - lo) * 7.0);
                level = MIN(level, (size_t) 7);
                if (v->utf8)
                        fputs(bars[level], out);
                else
                        fputc(ascii[level], out);
        }
}

static const char *degrees(const ctl_view *v) {
        return v->utf8 ? "\u00b0C" : "C";
}

/* x with `decimals` decimals and a unit ("" for none), or "-" when missing. */
static void format_value(char *buf, size_t size, double x, int decimals, const char *unit) {
        if (isfinite(x))
                snprintf(buf, size, "%.*f%s%s", decimals, x, unit[0] ? " " : "", unit);
        else
                snprintf(buf, size, "-");
}

/* Columns s takes on the screen: UTF-8 continuation bytes take none. */
static size_t display_width(const char *s) {
        size_t n = 0;
        for (; *s; s++)
                if (((unsigned char) *s & 0xc0) != 0x80)
                        n++;
        return n;
}

/* s right-aligned in width columns. */
static void put_right(FILE *out, const char *s, size_t width) {
        size_t w = display_width(s);
        fprintf(out, "%*s%s", (int) (w < width ? width - w : 0), "", s);
}

#define VALUE_WIDTH 12
#define LABEL_WIDTH 12

/* One row: label, set value, measured value, then the trace. */
static void render_row(FILE *out, const ctl_view *v, const char *label, const char *set, const char *measured,
                       const trace *t, double min_span) {
        fprintf(out, "%-*s ", LABEL_WIDTH, label);
        put_right(out, set, VALUE_WIDTH);
        fputc(' ', out);
        put_right(out, measured, VALUE_WIDTH);
        size_t used = LABEL_WIDTH + 1 + VALUE_WIDTH + 1 + VALUE_WIDTH;
        size_t width = v->cols > ROW_LABEL_WIDTH + TRACE_WIDTH_MIN ? v->cols - ROW_LABEL_WIDTH : 0;
        width = MIN(width, (size_t) TRACE_WIDTH_MAX);
        if (t && width > 0) {
                fprintf(out, "%*s", (int) (ROW_LABEL_WIDTH - used), "");
                render_trace(out, v, t, width, min_span);
        }
        fputs("\033[K\n", out);
}

static void render_screen(ctl_view *v) {
        ctl_monitor *m = v->m;
        json_object *p = m->props;
        char *text = NULL;
        size_t size = 0;
        FILE *out = open_memstream(&text, &size);
        if (!out)
                return;

        char now[64], set[32], measured[32];
        time_t t = time(NULL);
        struct tm tm;
        if (localtime_r(&t, &tm))
                strftime(now, sizeof now, "%H:%M:%S", &tm);
        else
                now[0] = '\0';
        bool fresh = sample_fresh(v);
        const nd_telemetry_record *s = &m->last;

        fputs("\033[H", out);
        fprintf(out, "\033[1mneedlectl %s: %s\033[0m  %s, firmware %s%s  generation %" PRId64 "\033[K\n", v->title,
                m->serial, ctl_json_str(p, "model"), ctl_json_str(p, "firmware_version"),
                ctl_json_bool(p, "simulated") ? ", simulated" : "", ctl_json_int(p, "generation"));
        fprintf(out, "%*s\033[K\n", (int) MIN(v->cols, (unsigned) 200) > 8 ? (int) MIN(v->cols, (unsigned) 200) - 1 : 8, now);

        if (!m->daemon_present)
                fprintf(out, "\033[1;31m%-12s needled is not running: waiting for it\033[0m\033[K\n", "State");
        else if (!m->present)
                fprintf(out, "\033[1;31m%-12s pen gone: waiting for it to come back\033[0m\033[K\n", "State");
        else {
                const char *state = ctl_json_str(p, "state");
                const char *fault = ctl_json_str(p, "fault");
                bool bad = STREQ(state, "fault");
                fprintf(out, "%-12s %s%s\033[0m", "State", bad ? "\033[1;31m" : "\033[1m", state);
                if (fault[0])
                        fprintf(out, "  fault: %s", fault);
                json_object *warnings;
                if (json_object_object_get_ex(p, "warnings", &warnings) && json_object_is_type(warnings, json_type_array) &&
                    json_object_array_length(warnings) > 0) {
                        fputs("  \033[33mwarnings:", out);
                        for (size_t i = 0; i < json_object_array_length(warnings); i++)
                                fprintf(out, " %s", json_object_get_string(json_object_array_get_idx(warnings, i)));
                        fputs("\033[0m", out);
                }
                fputs("\033[K\n", out);
        }

        json_object *profile;
        if (json_object_object_get_ex(p, "profile", &profile) && json_object_object_length(profile) > 0)
                fprintf(out, "%-12s %s: %s, %.2f mm, %.0f Hz, %.0f s, %" PRId64 " needles\033[K\n", "Profile",
                        ctl_json_str(profile, "name"), ctl_json_str(profile, "area"),
                        ctl_json_double(profile, "depth_mm"), ctl_json_double(profile, "speed_hz"),
                        ctl_json_double(profile, "duration_s"), ctl_json_int(profile, "needles"));
        else
                fprintf(out, "%-12s -\033[K\n", "Profile");
        fprintf(out, "%-12s %12s %12s%*strace\033[K\n", "", "set", "measured", ROW_LABEL_WIDTH - 37, "");

        format_value(set, sizeof set, ctl_json_double(p, "depth_mm"), 2, "mm");
        format_value(measured, sizeof measured, fresh ? s->depth_mm : NAN, 3, "mm");
        render_row(out, v, "Depth", set, measured, &v->depth, 0.05);
        format_value(set, sizeof set, ctl_json_double(p, "speed_hz"), 1, "Hz");
        format_value(measured, sizeof measured, fresh ? s->speed_hz : NAN, 1, "Hz");
        render_row(out, v, "Speed", set, measured, &v->speed, 2.0);
        format_value(measured, sizeof measured, fresh ? s->current_ma : NAN, 0, "mA");
        render_row(out, v, "Current", "", measured, &v->current, 10.0);
        format_value(measured, sizeof measured, fresh ? s->temperature_c : ctl_json_double(p, "temperature_c"),
                     1, degrees(v));
        render_row(out, v, "Temperature", "", measured, &v->temperature, 0.5);

        fprintf(out, "%-12s %" PRId64 " %%\033[K\n", "Battery", ctl_json_int(p, "battery_percent"));
        json_object *cartridge;
        if (json_object_object_get_ex(p, "cartridge", &cartridge) && ctl_json_str(cartridge, "id")[0])
                fprintf(out, "%-12s %s, %" PRId64 " needles, %s, %" PRId64 " s used\033[K\n", "Cartridge",
                        ctl_json_str(cartridge, "id"), ctl_json_int(cartridge, "needles"),
                        ctl_json_str(cartridge, "state"), ctl_json_int(cartridge, "runtime_s"));
        else
                fprintf(out, "%-12s none\033[K\n", "Cartridge");
        const char *session = ctl_json_str(p, "session_id");
        if (session[0]) {
                double duration = profile ? ctl_json_double(profile, "duration_s") : NAN;
                fprintf(out, "%-12s %s\033[K\n", "Session", session);
                fprintf(out, "%-12s %.1f s", "Elapsed", ctl_json_double(p, "elapsed_s"));
                if (isfinite(duration))
                        fprintf(out, " of %.0f s", duration);
                fprintf(out, ", %" PRId64 " strokes\033[K\n", ctl_json_int(p, "strokes"));
        } else {
                fprintf(out, "%-12s -\033[K\n%-12s -\033[K\n", "Session", "Elapsed");
        }
        fprintf(out, "%-12s %" PRId64 " Hz: %" PRIu64 " samples, %" PRIu64 " dropped, %" PRIu64 " missing\033[K\n",
                "Telemetry", ctl_json_int(p, "telemetry_rate_hz"), m->samples, m->dropped,
                m->gaps >= m->dropped ? m->gaps - m->dropped : 0);
        fputs("\033[K\n", out);
        if (v->note)
                fprintf(out, "%s\033[K\n", v->note);
        fprintf(out, "%s\033[K\n\033[J", v->key_help ? v->key_help : "q or Ctrl-C: quit");
        if (fclose(out) != 0) {
                free(text);
                return;
        }
        /* One write per frame: no tearing. */
        size_t done = 0;
        while (done < size) {
                ssize_t n = write(STDOUT_FILENO, text + done, size - done);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                done += (size_t) n;
        }
        free(text);
}

static json_object *json_double_or_null(double x) {
        return isfinite(x) ? json_object_new_double(x) : NULL;
}

static int emit_update(ctl_view *v, const char *event) {
        ctl_monitor *m = v->m;
        json_object *p = m->props;
        bool fresh = sample_fresh(v);
        const nd_telemetry_record *s = &m->last;
        uint64_t now = ctl_now_realtime_usec();

        if (v->mode == CTL_VIEW_QUIET)
                return 0;
        if (v->mode == CTL_VIEW_JSON) {
                _cleanup_json_ json_object *o = json_object_new_object();
                if (!o)
                        return -ENOMEM;
                json_object *profile = NULL, *cartridge = NULL, *warnings = NULL;
                json_object_object_get_ex(p, "profile", &profile);
                json_object_object_get_ex(p, "cartridge", &cartridge);
                json_object_object_get_ex(p, "warnings", &warnings);
                json_object_object_add(o, "time", json_object_new_int64((int64_t) now));
                json_object_object_add(o, "event", json_object_new_string(event));
                json_object_object_add(o, "pen", json_object_new_string(m->serial));
                json_object_object_add(o, "present", json_object_new_boolean(m->present));
                json_object_object_add(o, "state", m->present ? json_object_new_string(ctl_json_str(p, "state")) : NULL);
                json_object_object_add(o, "fault", json_object_new_string(ctl_json_str(p, "fault")));
                json_object_object_add(o, "warnings", json_object_get(warnings));
                json_object_object_add(o, "profile", profile && json_object_object_length(profile) > 0 ?
                                                              json_object_new_string(ctl_json_str(profile, "name")) : NULL);
                json_object_object_add(o, "set_depth_mm", json_double_or_null(ctl_json_double(p, "depth_mm")));
                json_object_object_add(o, "depth_mm", json_double_or_null(fresh ? s->depth_mm : NAN));
                json_object_object_add(o, "set_speed_hz", json_double_or_null(ctl_json_double(p, "speed_hz")));
                json_object_object_add(o, "speed_hz", json_double_or_null(fresh ? s->speed_hz : NAN));
                json_object_object_add(o, "current_ma", json_double_or_null(fresh ? s->current_ma : NAN));
                json_object_object_add(o, "temperature_c", json_double_or_null(fresh ? s->temperature_c :
                                                                                       ctl_json_double(p, "temperature_c")));
                json_object_object_add(o, "battery_percent", json_object_new_int64(ctl_json_int(p, "battery_percent")));
                json_object_object_add(o, "cartridge", json_object_get(cartridge));
                json_object_object_add(o, "session_id", json_object_new_string(ctl_json_str(p, "session_id")));
                json_object_object_add(o, "elapsed_s", json_double_or_null(ctl_json_double(p, "elapsed_s")));
                json_object_object_add(o, "strokes", json_object_new_int64(ctl_json_int(p, "strokes")));
                json_object_object_add(o, "samples", json_object_new_int64((int64_t) m->samples));
                json_object_object_add(o, "dropped", json_object_new_int64((int64_t) m->dropped));
                const char *text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
                if (!text || printf("%s\n", text) < 0 || fflush(stdout) != 0)
                        return -EIO;
                return 0;
        }

        char when[32], stamp[48];
        time_t secs = (time_t) (now / USEC_PER_SEC);
        struct tm tm;
        if (localtime_r(&secs, &tm) && strftime(when, sizeof when, "%H:%M:%S", &tm) > 0)
                snprintf(stamp, sizeof stamp, "%s.%03u", when, (unsigned) (now % USEC_PER_SEC / USEC_PER_MSEC));
        else
                snprintf(stamp, sizeof stamp, "-");
        if (!m->daemon_present)
                printf("%s %s needled is not running: waiting for it\n", stamp, m->serial);
        else if (!m->present)
                printf("%s %s gone: waiting for it to come back\n", stamp, m->serial);
        else if (STREQ(event, "pen-back"))
                printf("%s %s back: generation %" PRId64 ", %s\n", stamp, m->serial, ctl_json_int(p, "generation"),
                       ctl_json_str(p, "state"));
        else {
                char measured_depth[32], measured_speed[32], current[32], temperature[32];
                format_value(measured_depth, sizeof measured_depth, fresh ? s->depth_mm : NAN, 3, "");
                format_value(measured_speed, sizeof measured_speed, fresh ? s->speed_hz : NAN, 1, "");
                format_value(current, sizeof current, fresh ? s->current_ma : NAN, 0, "");
                format_value(temperature, sizeof temperature,
                             fresh ? s->temperature_c : ctl_json_double(p, "temperature_c"), 1, "");
                json_object *cartridge = NULL;
                json_object_object_get_ex(p, "cartridge", &cartridge);
                const char *fault = ctl_json_str(p, "fault");
                printf("%s %s %s%s%s depth %.2f/%s mm speed %.1f/%s Hz current %s mA temperature %s C battery %" PRId64
                       "%% cartridge %s elapsed %.1f s strokes %" PRId64 "\n",
                       stamp, m->serial, ctl_json_str(p, "state"), fault[0] ? ":" : "", fault,
                       ctl_json_double(p, "depth_mm"), measured_depth, ctl_json_double(p, "speed_hz"), measured_speed,
                       current, temperature, ctl_json_int(p, "battery_percent"),
                       ctl_json_str(cartridge, "id")[0] ? ctl_json_str(cartridge, "id") : "-",
                       ctl_json_double(p, "elapsed_s"), ctl_json_int(p, "strokes"));
        }
        return fflush(stdout) == 0 ? 0 : -EIO;
}

static void view_quit(ctl_view *v) {
        if (v->quit)
                v->quit(v, v->quit_userdata);
        else
                sd_event_exit(v->m->event, 0);
}

static void output_failed(ctl_view *v) {
        /* The reader went away (a closed pipe): nobody is watching, so stop as if asked. */
        view_quit(v);
}

static int on_refresh(sd_event_source *s, uint64_t usec, void *userdata) {
        ctl_view *v = userdata;
        if (v->mode == CTL_VIEW_SCREEN) {
                bool fresh = sample_fresh(v);
                trace_push(&v->depth, fresh ? v->m->last.depth_mm : NAN);
                trace_push(&v->speed, fresh ? v->m->last.speed_hz : NAN);
                trace_push(&v->current, fresh ? v->m->last.current_ma : NAN);
                trace_push(&v->temperature, fresh ? v->m->last.temperature_c : NAN);
                render_screen(v);
        } else if (emit_update(v, "update") < 0) {
                output_failed(v);
        }
        uint64_t period = v->mode == CTL_VIEW_SCREEN ? SCREEN_REFRESH_USEC : v->interval_usec;
        (void) sd_event_source_set_time_relative(s, period);
        (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static void update_size(ctl_view *v) {
        struct winsize ws;
        if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0) {
                v->cols = ws.ws_col;
                v->rows = ws.ws_row;
        }
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        ctl_view *v = userdata;
        if (si->ssi_signo == SIGWINCH) {
                update_size(v);
                if (v->screen_active) {
                        (void) !write(STDOUT_FILENO, "\033[2J", 4);
                        render_screen(v);
                }
                return 0;
        }
        view_quit(v);
        return 0;
}

static int on_stdin(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        ctl_view *v = userdata;
        char buf[64];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) {
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        return 0;
                /* The terminal is gone: nothing more to read. */
                v->stdin_source = sd_event_source_disable_unref(v->stdin_source);
                return 0;
        }
        for (ssize_t i = 0; i < n; i++) {
                if (buf[i] == 'q' || buf[i] == 'Q') {
                        view_quit(v);
                        break;
                }
                if (v->on_key && v->on_key(v, buf[i], v->key_userdata))
                        render_screen(v);
        }
        return 0;
}

static void view_event(ctl_monitor *m, ctl_monitor_event event, void *userdata) {
        ctl_view *v = userdata;
        const char *name = NULL;
        switch (event) {
        case CTL_MONITOR_PROPERTIES: {
                const char *state = ctl_json_str(m->props, "state");
                if (!STREQ(state, v->last_state)) {
                        snprintf(v->last_state, sizeof v->last_state, "%s", state);
                        name = "state";
                }
                break;
        }
        case CTL_MONITOR_PEN_GONE:
                name = "pen-gone";
                ctl_view_set_note(v, "The pen left (unplugged or removed); waiting for it to come back.");
                break;
        case CTL_MONITOR_PEN_BACK:
                name = "pen-back";
                snprintf(v->last_state, sizeof v->last_state, "%s", ctl_json_str(m->props, "state"));
                ctl_view_set_note(v, "The pen came back.");
                break;
        case CTL_MONITOR_DAEMON_GONE:
                name = "daemon-gone";
                ctl_view_set_note(v, "needled left the bus; waiting for it.");
                break;
        case CTL_MONITOR_DAEMON_BACK:
                name = "daemon-back";
                ctl_view_set_note(v, "needled is back.");
                break;
        default:
                break;
        }
        if (name && v->mode != CTL_VIEW_SCREEN && emit_update(v, name) < 0)
                output_failed(v);
        if (v->chained)
                v->chained(m, event, v->chained_userdata);
}

static void view_sample(ctl_monitor *m, const nd_telemetry_record *rec, void *userdata) {
        ctl_view *v = userdata;
        v->last_sample_usec = ctl_now_monotonic_usec();
}

int ctl_view_new(ctl_monitor *m, ctl_view_mode mode, uint64_t interval_usec, const char *title, ctl_view **ret) {
        ctl_view *v = calloc(1, sizeof *v);
        if (!v)
                return -ENOMEM;
        v->m = m;
        v->mode = mode;
        v->interval_usec = interval_usec > 0 ? interval_usec : LINE_INTERVAL_DEFAULT_USEC;
        v->title = strdup(title);
        v->cols = SCREEN_WIDTH_DEFAULT;
        v->rows = SCREEN_HEIGHT_DEFAULT;
        v->was_present = m->present;
        if (!v->title) {
                free(v);
                return -ENOMEM;
        }
        snprintf(v->last_state, sizeof v->last_state, "%s", ctl_json_str(m->props, "state"));
        setlocale(LC_CTYPE, "");
        v->utf8 = STREQ(nl_langinfo(CODESET), "UTF-8");
        ctl_monitor_set_callbacks(m, view_event, view_sample, v);
        *ret = v;
        return 0;
}

int ctl_view_start(ctl_view *v) {
        sd_event *e = v->m->event;
        static const int signals[] = { SIGINT, SIGTERM, SIGHUP, SIGWINCH };
        sigset_t mask;
        sigemptyset(&mask);
        for (size_t i = 0; i < ELEMENTSOF(signals); i++)
                sigaddset(&mask, signals[i]);
        /* sd-event takes signals through a signalfd: they must be blocked first. */
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return -errno;
        for (size_t i = 0; i < ELEMENTSOF(signals); i++) {
                int r = sd_event_add_signal(e, &v->signals[i], signals[i], on_signal, v);
                if (r < 0)
                        return r;
        }
        (void) signal(SIGPIPE, SIG_IGN);

        if (v->mode == CTL_VIEW_SCREEN) {
                update_size(v);
                if (isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &v->saved_termios) == 0) {
                        struct termios raw = v->saved_termios;
                        /* Keys arrive one by one and are not echoed; Ctrl-C still signals. */
                        raw.c_lflag &= ~(tcflag_t) (ICANON | ECHO);
                        raw.c_cc[VMIN] = 1;
                        raw.c_cc[VTIME] = 0;
                        if (tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0)
                                v->termios_saved = true;
                        int r = sd_event_add_io(e, &v->stdin_source, STDIN_FILENO, EPOLLIN, on_stdin, v);
                        if (r < 0)
                                return r;
                }
                static const char enter[] = "\033[?1049h\033[?25l\033[2J";
                if (write(STDOUT_FILENO, enter, sizeof enter - 1) < 0)
                        return -errno;
                v->screen_active = true;
                render_screen(v);
        } else if (v->mode == CTL_VIEW_QUIET) {
                return 0;
        } else if (emit_update(v, "update") < 0) {
                return -EIO;
        }
        uint64_t period = v->mode == CTL_VIEW_SCREEN ? SCREEN_REFRESH_USEC : v->interval_usec;
        return sd_event_add_time_relative(e, &v->refresh_timer, CLOCK_MONOTONIC, period, 1, on_refresh, v);
}

void ctl_view_stop(ctl_view *v) {
        v->refresh_timer = sd_event_source_disable_unref(v->refresh_timer);
        v->stdin_source = sd_event_source_disable_unref(v->stdin_source);
        if (v->screen_active) {
                static const char leave[] = "\033[?25h\033[?1049l";
                (void) !write(STDOUT_FILENO, leave, sizeof leave - 1);
                v->screen_active = false;
        }
        if (v->termios_saved) {
                (void) tcsetattr(STDIN_FILENO, TCSANOW, &v->saved_termios);
                v->termios_saved = false;
        }
}

ctl_view *ctl_view_free(ctl_view *v) {
        if (!v)
                return NULL;
        ctl_view_stop(v);
        for (size_t i = 0; i < ELEMENTSOF(v->signals); i++)
                sd_event_source_disable_unref(v->signals[i]);
        if (v->m && v->m->userdata == v)
                ctl_monitor_set_callbacks(v->m, NULL, NULL, NULL);
        free(v->note);
        free(v->key_help);
        free(v->title);
        free(v);
        return NULL;
}

void ctl_view_set_quit(ctl_view *v, ctl_view_quit_fn quit, void *userdata) {
        v->quit = quit;
        v->quit_userdata = userdata;
}

void ctl_view_set_keys(ctl_view *v, ctl_view_key_fn on_key, void *userdata, const char *help) {
        v->on_key = on_key;
        v->key_userdata = userdata;
        free(v->key_help);
        v->key_help = help ? strdup(help) : NULL;
}

void ctl_view_chain_events(ctl_view *v, ctl_monitor_event_fn on_event, void *userdata) {
        v->chained = on_event;
        v->chained_userdata = userdata;
}

void ctl_view_set_note(ctl_view *v, const char *note) {
        free(v->note);
        v->note = note ? strdup(note) : NULL;
}

void ctl_view_emit(ctl_view *v, const char *event, const char *text, json_object *extra) {
        _cleanup_json_ json_object *o = extra;
        if (v->mode == CTL_VIEW_SCREEN) {
                ctl_view_set_note(v, text);
                return;
        }
        if (v->mode == CTL_VIEW_LINES || v->mode == CTL_VIEW_QUIET) {
                if (printf("%s\n", text) < 0 || fflush(stdout) != 0)
                        output_failed(v);
                return;
        }
        if (!o)
                o = json_object_new_object();
        if (!o)
                return;
        json_object_object_add(o, "time", json_object_new_int64((int64_t) ctl_now_realtime_usec()));
        json_object_object_add(o, "event", json_object_new_string(event));
        json_object_object_add(o, "pen", json_object_new_string(v->m->serial));
        json_object_object_add(o, "message", json_object_new_string(text));
        const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        if (!s || printf("%s\n", s) < 0 || fflush(stdout) != 0)
                output_failed(v);
}

ctl_view_mode ctl_view_pick_mode(bool json) {
        if (json)
                return CTL_VIEW_JSON;
        const char *term = getenv("TERM");
        if (isatty(STDOUT_FILENO) && term && term[0] && !STREQ(term, "dumb"))
                return CTL_VIEW_SCREEN;
        return CTL_VIEW_LINES;
}

/* ---- the verb ------------------------------------------------------------------------------- */

static void watch_usage(FILE *out) {
        fprintf(out,
                "Usage: needlectl watch [PEN] [--interval SECONDS] [--json] [--system|--session]\n"
                "\n"
                "A live view of a pen (its serial or object path; may be omitted when one pen is\n"
                "connected): state, fault and warnings, the armed profile, set and measured\n"
                "depth and speed, motor current, temperature, battery, cartridge, the session's\n"
                "elapsed time and strokes, and a trace of recent measured values. Measured values\n"
                "come from the pen's telemetry socket. watch only looks: it never starts or stops\n"
                "anything. When the pen leaves it says so and waits for it to come back.\n"
                "\n"
                "On a terminal the view fills the screen and refreshes 15 times a second; q or\n"
                "Ctrl-C quits and restores the terminal. Otherwise (a pipe, a file, TERM=dumb) it\n"
                "prints one line per update: every --interval seconds and at once when the state\n"
                "changes or the pen or the daemon leaves or comes back.\n"
                "\n"
                "Options:\n"
                "      --interval SECONDS time between update lines when not on a terminal\n"
                "                         (default 1, at least 0.05)\n"
                "      --json             one JSON object per line instead: {time (us since the\n"
                "                         epoch), event (update, state, pen-gone, pen-back,\n"
                "                         daemon-gone, daemon-back), pen, present, state, fault,\n"
                "                         warnings, profile, set_depth_mm, depth_mm, set_speed_hz,\n"
                "                         speed_hz, current_ma, temperature_c, battery_percent,\n"
                "                         cartridge, session_id, elapsed_s, strokes, samples,\n"
                "                         dropped}; measured values are null when the pen is not\n"
                "                         streaming\n"
                CTL_COMMON_HELP "\n" CTL_EXIT_HELP);
}

#define INTERVAL_MIN_S 0.05
#define INTERVAL_MAX_S 3600.0

typedef struct watch_args {
        uint64_t interval_usec;
} watch_args;

enum { ARG_INTERVAL = CTL_ARG_VERB };

static int watch_option(int c, const char *arg, void *userdata) {
        watch_args *a = userdata;
        double s;
        if (c != ARG_INTERVAL)
                return NEEDLECTL_EXIT_USAGE;
        if (ctl_parse_double(arg, &s) < 0 || s < INTERVAL_MIN_S || s > INTERVAL_MAX_S)
                return ctl_fail(NEEDLECTL_EXIT_USAGE, "watch: --interval takes %g to %g seconds, not '%s'", INTERVAL_MIN_S,
                                INTERVAL_MAX_S, arg);
        a->interval_usec = (uint64_t) llround(s * (double) USEC_PER_SEC);
        return 0;
}

static void watch_args_init(void *userdata) {
        *(watch_args *) userdata = (watch_args) { .interval_usec = LINE_INTERVAL_DEFAULT_USEC };
}

static const struct option watch_options[] = {
        CTL_COMMON_OPTIONS,
        { "interval", required_argument, NULL, ARG_INTERVAL },
        { NULL, 0, NULL, 0 }
};

const ctl_verb_syntax ctl_syntax_watch = {
        .usage = watch_usage,
        .options = watch_options,
        .handler = watch_option,
        .args_size = sizeof(watch_args),
        .args_init = watch_args_init,
};

int verb_watch(ctl_invocation *inv) {
        const watch_args args = *(const watch_args *) inv->args;
        sd_bus *bus = inv->bus;
        _cleanup_free_ char *path = NULL;
        int r = ctl_resolve_pen(bus, inv->argc > 0 ? inv->argv[0] : NULL, &path);
        if (r != 0)
                return r;
        _cleanup_(sd_event_unrefp) sd_event *event = NULL;
        r = sd_event_default(&event);
        if (r >= 0)
                r = sd_bus_attach_event(bus, event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot set up the event loop: %s", strerror(-r));

        _cleanup_(ctl_monitor_freep) ctl_monitor *m = NULL;
        r = ctl_monitor_new(event, bus, path, true, &m);
        if (r != 0)
                return r;
        _cleanup_(ctl_view_freep) ctl_view *v = NULL;
        r = ctl_view_new(m, ctl_view_pick_mode(inv->common.json), args.interval_usec, "watch", &v);
        if (r < 0)
                return ctl_oom();
        r = ctl_view_start(v);
        if (r < 0) {
                ctl_view_stop(v);
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot start the view: %s", strerror(-r));
        }
        r = sd_event_loop(event);
        ctl_view_stop(v);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "the event loop failed: %s", strerror(-r));
        return NEEDLECTL_EXIT_OK;
}
