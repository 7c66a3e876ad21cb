/* daemon.c: needled's life cycle: the loop, signals, the bus, readiness and shutdown. */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <systemd/sd-daemon.h>

#include "config.h"
#include "daemon.h"
#include "errors.h"
#include "ledger-reader.h"
#include "ledger-state.h"
#include "log.h"
#include "manager.h"
#include "pen.h"
#include "transport-usb.h"
#include "util.h"


const char *nd_limits_state_to_string(nd_limits_state s) {
        switch (s) {
        case ND_LIMITS_OK: return "ok";
        case ND_LIMITS_INVALID: return "invalid";
        case ND_LIMITS_MISSING: return "missing";
        }
        return "invalid";
}

#define SHUTDOWN_POLL_USEC (5 * USEC_PER_MSEC)

/* Exits once every motor stop is acknowledged, or at the deadline: freeing a USB transport
 * cancels what is in flight, and a stop must not be cancelled. */
static int on_shutdown_poll(sd_event_source *s, uint64_t usec, void *userdata) {
        nd_daemon *d = userdata;
        unsigned pending = nd_pen_stops_in_flight(d);
        if (pending == 0 || usec >= d->shutdown_deadline_us) {
                if (pending > 0)
                        nd_log_error("%u motor stop(s) not acknowledged before exit; the pens' own watchdogs stop "
                                     "their motors when the heartbeat ends", pending);
                sd_event_source_unref(s);
                return sd_event_exit(d->event, d->exit_code);
        }
        (void) sd_event_source_set_time(s, usec + SHUTDOWN_POLL_USEC);
        return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
}

static void daemon_request_exit(nd_daemon *d, int code) {
        uint64_t now = 0;
        if (d->shutting_down)
                return;
        d->shutting_down = true;
        d->exit_code = code;
        (void) sd_notify(false, "STOPPING=1\nSTATUS=Stopping the pens' motors and shutting down");
        nd_pen_stop_all(d, "stopped");
        (void) sd_event_now(d->event, CLOCK_MONOTONIC, &now);
        d->shutdown_deadline_us = now + (uint64_t) ND_SHUTDOWN_STOP_TIMEOUT_MS * USEC_PER_MSEC;
        if (sd_event_add_time(d->event, NULL, CLOCK_MONOTONIC, now, 1, on_shutdown_poll, d) < 0)
                sd_event_exit(d->event, code);
}

static void on_usb_pen(nd_usb_context *c, nd_transport *t, void *userdata) {
        nd_daemon *d = userdata;
        if (d->shutting_down) {
                nd_transport_free(t);
                return;
        }
        int r = nd_pen_attach(d, t, NULL, NULL);
        if (r < 0)
                nd_log_error("cannot take a USB pen: %s", strerror(-r));
}

static void daemon_start_usb(nd_daemon *d) {
        int r = nd_usb_context_new(d->event, &d->usb);
        if (r >= 0)
                r = nd_usb_context_watch(d->usb, PEN_USB_VID_DEFAULT, PEN_USB_PID_DEFAULT, on_usb_pen, d);
        if (r < 0) {
                nd_log_error("USB is not available (%s): no hardware pen will be found", strerror(-r));
                d->usb = nd_usb_context_free(d->usb);
                return;
        }
        nd_log_info("looking for pens %04x:%04x", (unsigned) PEN_USB_VID_DEFAULT, (unsigned) PEN_USB_PID_DEFAULT);
}

static int on_terminate(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        nd_daemon *d = userdata;
        nd_log_notice("%s received: stopping every motor, then exiting", strsignal((int) si->ssi_signo));
        daemon_request_exit(d, 0);
        return 0;
}

static int on_reload(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        nd_daemon *d = userdata;
        _cleanup_free_ char *error = NULL;
        (void) sd_notify(false, "RELOADING=1");
        if (nd_manager_load_limits(d, false, &error) < 0)
                nd_log_error("SIGHUP: the limits file was not reloaded, the limits in force stay: %s", strempty(error));
        (void) sd_notify(false, "READY=1");
        return 0;
}

/* How the loop is scheduled, for the log: the interlocks run in the loop's iterations, so a
 * technician must be able to see whether it runs real-time (needled.service asks for it). */
static const char *scheduling_description(char *buf, size_t size) {
        struct sched_param p = { 0 };
        int policy = sched_getscheduler(0);
        (void) sched_getparam(0, &p);
        switch (policy & ~SCHED_RESET_ON_FORK) {
        case SCHED_FIFO: snprintf(buf, size, "real-time (SCHED_FIFO, priority %d)", p.sched_priority); break;
        case SCHED_RR: snprintf(buf, size, "real-time (SCHED_RR, priority %d)", p.sched_priority); break;
        default: snprintf(buf, size, "time-shared (not real-time: interlocks may wait behind other programs)"); break;
        }
        return buf;
}

static int on_name_acquired(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        nd_daemon *d = userdata;
        const sd_bus_error *e = sd_bus_message_get_error(reply);
        if (e && sd_bus_is_open(sd_bus_message_get_bus(reply)) <= 0)
                return 0; /* no answer because the bus went away: on_bus_disconnected says so */
        if (e) {
                nd_log_error("could not own the bus name %s: %s", ND_BUS_NAME, strempty(e->message));
                daemon_request_exit(d, -EADDRINUSE);
                return 0;
        }
        char sched[96];
        nd_log_info("needled %s ready on the %s bus as %s%s; scheduling %s", PACKAGE_VERSION,
                    d->opts.session_bus ? "session" : "system", ND_BUS_NAME,
                    d->opts.simulate ? " (simulation enabled)" : "", scheduling_description(sched, sizeof sched));
        (void) sd_notifyf(false, "READY=1\nSTATUS=Serving %s; limits %s", ND_BUS_NAME,
                          nd_limits_state_to_string(d->limits_state));
        return 0;
}

/* The bus went away (the bus daemon died or dropped us): no operator can reach a running
 * treatment any more, so stop every motor and exit with an error; the service manager restarts
 * needled (Restart=on-failure) and the restarted daemon finds the pens idle. */
static int on_bus_disconnected(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        nd_daemon *d = userdata;
        nd_log_error("lost the connection to the %s bus: stopping every motor, then exiting",
                     d->opts.session_bus ? "session" : "system");
        daemon_request_exit(d, -ECONNRESET);
        return 0;
}

static int daemon_connect_bus(nd_daemon *d) {
        int r = d->opts.session_bus ? sd_bus_open_user(&d->bus) : sd_bus_open_system(&d->bus);
        if (r < 0) {
                nd_log_error("could not connect to the %s bus: %s", d->opts.session_bus ? "session" : "system", strerror(-r));
                return r;
        }
        r = sd_bus_attach_event(d->bus, d->event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return r;
        /* sd-bus turns the loss of the connection into this local signal */
        r = sd_bus_match_signal(d->bus, NULL, "org.freedesktop.DBus.Local", "/org/freedesktop/DBus/Local",
                                "org.freedesktop.DBus.Local", "Disconnected", on_bus_disconnected, d);
        if (r < 0)
                return r;
        return 0;
}

static const char *resolve_state_dir(const nd_daemon_options *opts, char **buf) {
        if (opts->state_dir)
                return opts->state_dir;
        /* systemd may pass several, separated by ':'; ours is the first. */
        const char *env = getenv("STATE_DIRECTORY");
        if (env && *env) {
                *buf = strndup(env, strcspn(env, ":"));
                return *buf;
        }
        return ND_STATE_DIR_DEFAULT;
}

static void daemon_free(nd_daemon *d) {
        d->shutting_down = true; /* the pens freed below look nothing up any more */
        d->ledger_reader = nd_ledger_reader_free(d->ledger_reader);
        nd_pen_free_all(d, "stopped");
        d->usb = nd_usb_context_free(d->usb);
        sd_bus_slot_unref(d->manager_slot);
        sd_bus_slot_unref(d->object_manager_slot);
        sd_bus_slot_unref(d->simulator_slot);
        sd_bus_slot_unref(d->pen_vtable_slot);
        sd_bus_slot_unref(d->pen_enumerator_slot);
        nd_bouncer_free(d->bouncer);
        if (d->bus) {
                sd_bus_flush(d->bus);
                sd_bus_close_unref(d->bus);
        }
        nd_limits_free(d->limits);
        free(d->limits_error);
        nd_ledger_close(d->ledger);
        free(d->ledger_error);
        free(d->ledger_reader_error);
        free(d->state_dir);
        sd_event_unref(d->event);
}

int nd_daemon_main(const nd_daemon_options *opts) {
        nd_daemon d = { .opts = *opts, .limits_state = ND_LIMITS_MISSING };
        _cleanup_free_ char *state_buf = NULL;
        _cleanup_free_ char *error = NULL;
        sigset_t mask;
        int r;

        nd_log_set_max_level(opts->verbose ? LOG_DEBUG : LOG_INFO);
        r = nd_errors_register();
        if (r < 0)
                return r;
        const char *state_dir = resolve_state_dir(opts, &state_buf);
        d.state_dir = strdup(state_dir ? state_dir : ND_STATE_DIR_DEFAULT);
        if (!d.state_dir)
                return -ENOMEM;

        /* A loop of our own, not sd_event_default(): the default loop checks its thread with a
         * gettid() system call in every iteration, and with telemetry the loop turns at least
         * 1000 times a second per pen (docs/performance.md). */
        if (opts->event)
                d.event = sd_event_ref(opts->event);
        else
                r = sd_event_new(&d.event);
        if (r < 0)
                goto finish;
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        /* A client that closes its telemetry socket must not kill us. */
        signal(SIGPIPE, SIG_IGN);
        if ((r = sd_event_add_signal(d.event, NULL, SIGTERM, on_terminate, &d)) < 0 ||
            (r = sd_event_add_signal(d.event, NULL, SIGINT, on_terminate, &d)) < 0 ||
            (r = sd_event_add_signal(d.event, NULL, SIGHUP, on_reload, &d)) < 0)
                goto finish;
        /* Sends WATCHDOG=1 at half of WatchdogSec= while the loop runs; nothing when not asked. */
        r = sd_event_set_watchdog(d.event, true);
        if (r < 0)
                goto finish;

        /* Fail closed: a missing or bad limits file leaves the daemon up, refusing to arm. */
        (void) nd_manager_load_limits(&d, true, &error);
        nd_ledger_state_open(&d);

        r = daemon_connect_bus(&d);
        if (r < 0)
                goto finish;
        r = nd_bouncer_new(d.bus, opts->session_bus ? ND_AUTH_SAME_UID : ND_AUTH_POLKIT,
                           (uint64_t) opts->polkit_timeout_ms * USEC_PER_MSEC,
                           (uint64_t) ND_POLKIT_INTERACTIVE_TIMEOUT_MS * USEC_PER_MSEC, &d.bouncer);
        if (r < 0)
                goto finish;
        r = nd_manager_export(&d);
        if (r < 0) {
                nd_log_error("could not export the D-Bus objects: %s", strerror(-r));
                goto finish;
        }
        r = sd_bus_request_name_async(d.bus, NULL, ND_BUS_NAME, 0, on_name_acquired, &d);
        if (r < 0)
                goto finish;
        if (!opts->simulate)
                daemon_start_usb(&d);

        r = sd_event_loop(d.event);
        if (r >= 0)
                r = d.exit_code;
finish:
        if (r < 0 && r != -EADDRINUSE)
                nd_log_error("exiting on error: %s", strerror(-r));
        daemon_free(&d);
        return r;
}
