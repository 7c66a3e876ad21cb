/* simulator.c: org.needled1.Simulator (only with --simulate): pens made of the pen model behind
 * the simulated transport, so the same protocol bytes cross as with hardware. No polkit: it
 * exists only when asked for on the command line, for demos, developers and tests. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bus-int.h"
#include "daemon.h"
#include "errors.h"
#include "log.h"
#include "pen.h"
#include "penmodel.h"
#include "simulator.h"
#include "transport-sim.h"
#include "util.h"

#define SIM_SERIAL_FORMAT "SIM%04u"
#define SIM_SERIALS_MAX 9999u

/* The clock the simulated transport drives the model with (CLOCK_MONOTONIC read now, not
 * the loop's cached time), so a control from the simulator is never behind the model. */
static uint64_t sim_now(nd_daemon *d) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static bool serial_in_use(nd_daemon *d, const char *serial) {
        for (unsigned i = 0; i < d->n_pens; i++)
                if (nd_pen_get_serial(d->pens[i]) && STREQ(nd_pen_get_serial(d->pens[i]), serial))
                        return true;
        return false;
}

/* Copies s into a fixed field of the model's config, refusing what the protocol cannot carry. */
static int set_text(char *dst, size_t size, const char *s, bool allow_space, const char *what, sd_bus_error *error) {
        size_t len = strlen(s);
        if (len == 0 || len >= size)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option %s must have 1 to %zu characters", what,
                                         size - 1);
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char) s[i];
                if (c > 0x7e || c < (allow_space ? 0x20 : 0x21))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Option %s may hold printable ASCII only%s", what,
                                                 allow_space ? "" : " without spaces");
        }
        memcpy(dst, s, len + 1);
        return 0;
}

static int parse_add_options(sd_bus_message *m, nd_daemon *d, nd_penmodel_config *c, sd_bus_error *error) {
        bool have_serial = false;
        int r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Expected options a{sv}");
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *key, *s;
                uint64_t u;
                if (sd_bus_message_read(m, "s", &key) < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed options");
                if (STREQ(key, "serial") || STREQ(key, "model") || STREQ(key, "firmware_version")) {
                        if (sd_bus_message_read(m, "v", "s", &s) < 0)
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Option %s must be a string (s)", key);
                        if (STREQ(key, "serial")) {
                                r = set_text(c->serial, sizeof c->serial, s, false, key, error);
                                have_serial = true;
                        } else if (STREQ(key, "model"))
                                r = set_text(c->model, sizeof c->model, s, true, key, error);
                        else
                                r = set_text(c->firmware_version, sizeof c->firmware_version, s, true, key, error);
                        if (r < 0)
                                return r;
                } else if (STREQ(key, "battery_percent") || STREQ(key, "telemetry_rate_hz")) {
                        bool battery = STREQ(key, "battery_percent");
                        const char *what = battery ? "Option battery_percent" : "Option telemetry_rate_hz";
                        r = nd_bus_read_variant_uint(m, what, battery ? 0 : ND_PROTO_TELEMETRY_RATE_MIN_HZ,
                                                     battery ? 100 : ND_PROTO_TELEMETRY_RATE_MAX_HZ, &u, error);
                        if (r < 0)
                                return r;
                        if (battery)
                                c->battery_percent = (unsigned) u;
                        else
                                c->telemetry_rate_hz = (unsigned) u;
                } else {
                        _cleanup_free_ char *shown = nd_text_sanitize(key, strlen(key), 64);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Unknown option '%s' (AddPen knows serial, model, battery_percent, "
                                                 "telemetry_rate_hz, firmware_version)", strempty(shown));
                }
                if (sd_bus_message_exit_container(m) < 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed options");
        }
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed options");
        if (have_serial) {
                if (serial_in_use(d, c->serial))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "A pen with serial %s is connected already",
                                                 c->serial);
                return 0;
        }
        for (unsigned i = 1; i <= SIM_SERIALS_MAX; i++) {
                snprintf(c->serial, sizeof c->serial, SIM_SERIAL_FORMAT, i);
                if (!serial_in_use(d, c->serial))
                        return 0;
        }
        return sd_bus_error_set(error, SD_BUS_ERROR_LIMITS_EXCEEDED, "Every simulated serial is in use");
}

static int method_add_pen(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        nd_penmodel_config c;
        nd_penmodel *model = NULL;
        nd_transport *t = NULL;
        int r;

        nd_penmodel_config_init(&c);
        /* A different seed per pen, so two simulated pens do not show identical noise. */
        c.seed = sim_now(d) ^ ((uint64_t) d->n_pens << 32);
        r = parse_add_options(m, d, &c, error);
        if (r < 0)
                return r;
        /* Powered on at a millisecond boundary: simulated pens then sample in step, one loop
         * wake-up for all of them each millisecond, as USB pens polled in the same frames are
         * (docs/performance.md); the device clock counts from there. */
        r = nd_penmodel_new(&c, sim_now(d) / USEC_PER_MSEC * USEC_PER_MSEC, &model);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "The pen model refused the options: %s", strerror(-r));
        r = nd_transport_sim_new(d->event, model, &t);
        if (r >= 0)
                r = nd_pen_attach(d, t, model, m);
        nd_penmodel_unref(model);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot add the simulated pen: %s", strerror(-r));
        nd_log_info("simulator: pen %s added", c.serial);
        return 1; /* answered once the pen is identified */
}

/* The simulated pen at the path in m's next argument, or NULL after setting error. */
static nd_pen *read_sim_pen(sd_bus_message *m, nd_daemon *d, sd_bus_error *error) {
        const char *path;
        if (sd_bus_message_read(m, "o", &path) < 0) {
                sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a pen object path");
                return NULL;
        }
        nd_pen *p = nd_pen_find_by_path(d, path);
        if (!p) {
                sd_bus_error_setf(error, SD_BUS_ERROR_UNKNOWN_OBJECT, "No pen is connected at %s", path);
                return NULL;
        }
        if (!nd_pen_get_model(p)) {
                sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Pen %s is real hardware, not a simulated pen",
                                  nd_pen_get_serial(p));
                return NULL;
        }
        return p;
}

static int method_remove_pen(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        nd_pen *p = read_sim_pen(m, d, error);
        if (!p)
                return -EINVAL;
        int r = nd_pen_unplug(p, m);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot unplug the simulated pen: %s", strerror(-r));
        return 1; /* answered once the pen is gone */
}

static int method_insert_cartridge(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        const char *id;
        uint32_t needles;
        nd_pen *p = read_sim_pen(m, d, error);
        if (!p)
                return -EINVAL;
        if (sd_bus_message_read(m, "su", &id, &needles) < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a cartridge id and a needle count");
        int r = nd_penmodel_insert_cartridge(nd_pen_get_model(p), sim_now(d), id, needles);
        if (r == -EBUSY)
                return sd_bus_error_setf(error, ND_ERROR_WRONG_STATE, "Pen %s has a cartridge already; eject it first",
                                         nd_pen_get_serial(p));
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "A cartridge id has 1 to %u printable characters without spaces, and "
                                         "1 to 255 needles", ND_PROTO_CARTRIDGE_ID_SIZE);
        return nd_pen_refresh_cartridge(p, m);
}

static int method_eject_cartridge(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        nd_pen *p = read_sim_pen(m, d, error);
        if (!p)
                return -EINVAL;
        if (nd_pen_in_session(p))
                return sd_bus_error_setf(error, ND_ERROR_WRONG_STATE,
                                         "Pen %s is in a session: the handpiece locks its cartridge while the motor may run",
                                         nd_pen_get_serial(p));
        int r = nd_penmodel_eject_cartridge(nd_pen_get_model(p), sim_now(d));
        if (r == -ENOENT)
                return sd_bus_error_setf(error, ND_ERROR_NO_CARTRIDGE, "Pen %s has no cartridge", nd_pen_get_serial(p));
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot eject: %s", strerror(-r));
        return nd_pen_refresh_cartridge(p, m);
}

static int method_set_battery(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        uint32_t percent;
        nd_pen *p = read_sim_pen(m, d, error);
        if (!p)
                return -EINVAL;
        if (sd_bus_message_read(m, "u", &percent) < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a percentage");
        if (percent > 100 || nd_penmodel_set_battery(nd_pen_get_model(p), sim_now(d), percent) < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Battery is %u %%; 0 to 100", percent);
        return sd_bus_reply_method_return(m, NULL);
}

static int method_inject_fault(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        const char *name;
        nd_pen *p = read_sim_pen(m, d, error);
        if (!p)
                return -EINVAL;
        if (sd_bus_message_read(m, "s", &name) < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a fault name");
        int f = nd_penmodel_fault_from_string(name);
        if (f < 0) {
                _cleanup_free_ char *shown = nd_text_sanitize(name, strlen(name), 64);
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "Unknown fault '%s' (over-temperature, motor-stall, over-current, depth-deviation, "
                                         "unresponsive, corrupt-telemetry, refuse-start, clear)", strempty(shown));
        }
        int r = nd_penmodel_inject_fault(nd_pen_get_model(p), sim_now(d), (nd_penmodel_fault) f);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_INTERNAL, "Cannot inject the fault: %s", strerror(-r));
        nd_log_notice("simulator: fault %s injected into pen %s", name, nd_pen_get_serial(p));
        return sd_bus_reply_method_return(m, NULL);
}

/* The pen's own telemetry counters, as its firmware keeps them: what it measured, sent, dropped
 * (its queue full while the host did not read, or while unresponsive) and still holds. A client
 * that sees a gap in the sequence numbers can tell a sample the pen never sent from one lost on
 * the host side; the umockdev tests read the same counts from the emulated device. */
static int method_get_pen_counters(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        nd_pen *p = read_sim_pen(m, d, error);
        if (!p)
                return -EINVAL;
        nd_penmodel_state st;
        nd_penmodel_get_state(nd_pen_get_model(p), &st);
        return sd_bus_reply_method_return(m, "a{sv}", 5, "samples_produced", "t", st.samples_produced, "samples_sent", "t",
                                          st.samples_sent, "samples_dropped", "t", st.samples_dropped, "samples_queued",
                                          "u", st.queued, "next_sequence", "u", st.next_sequence);
}

/* Every method goes through the bouncer (daemon/bouncer.c), which maps them all to no
 * authorization: the simulator exists only when asked for on the command line. */
static const nd_method simulator_methods[] = {
        { "AddPen", NULL, method_add_pen },
        { "RemovePen", NULL, method_remove_pen },
        { "InsertCartridge", NULL, method_insert_cartridge },
        { "EjectCartridge", NULL, method_eject_cartridge },
        { "SetBattery", NULL, method_set_battery },
        { "InjectFault", NULL, method_inject_fault },
        { "GetPenCounters", NULL, method_get_pen_counters },
};

static int simulator_dispatch(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        return nd_bouncer_dispatch(d->bouncer, m, simulator_methods, ELEMENTSOF(simulator_methods), d, d, error);
}

static const sd_bus_vtable simulator_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_METHOD_WITH_ARGS("AddPen", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("o", pen),
                                simulator_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("RemovePen", SD_BUS_ARGS("o", pen), SD_BUS_NO_RESULT,
                                simulator_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("InsertCartridge", SD_BUS_ARGS("o", pen, "s", id, "u", needles), SD_BUS_NO_RESULT,
                                simulator_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("EjectCartridge", SD_BUS_ARGS("o", pen), SD_BUS_NO_RESULT,
                                simulator_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetBattery", SD_BUS_ARGS("o", pen, "u", percent), SD_BUS_NO_RESULT,
                                simulator_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("InjectFault", SD_BUS_ARGS("o", pen, "s", fault), SD_BUS_NO_RESULT,
                                simulator_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetPenCounters", SD_BUS_ARGS("o", pen), SD_BUS_RESULT("a{sv}", counters),
                                simulator_dispatch, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END
};

int nd_simulator_export(nd_daemon *d) {
        return sd_bus_add_object_vtable(d->bus, &d->simulator_slot, ND_MANAGER_PATH, ND_SIM_INTERFACE, simulator_vtable, d);
}
