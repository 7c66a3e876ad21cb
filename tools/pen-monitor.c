/* pen-monitor.c: one pen followed over the bus: properties, telemetry socket, departures. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#include "bus-util.h"
#include "needlectl.h"
#include "pen-monitor.h"

/* Records read per wake-up at most: 4 s of samples at 1 kHz. */
#define TELEMETRY_DRAIN_MAX 4096u

uint64_t ctl_now_realtime_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

uint64_t ctl_now_monotonic_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / NSEC_PER_USEC;
}

static void notify(ctl_monitor *m, ctl_monitor_event event) {
        if (m->on_event)
                m->on_event(m, event, m->userdata);
}

static void telemetry_close(ctl_monitor *m) {
        m->telemetry_source = sd_event_source_disable_unref(m->telemetry_source);
        if (m->telemetry_fd >= 0) {
                close(m->telemetry_fd);
                m->telemetry_fd = -1;
        }
}

static void on_record(ctl_monitor *m, const nd_telemetry_record *rec) {
        if (m->have_sequence && rec->sequence != m->next_sequence)
                m->gaps += (uint32_t) (rec->sequence - m->next_sequence);
        m->have_sequence = true;
        m->next_sequence = rec->sequence + 1;
        if (rec->dropped > m->dropped_this_fd) {
                m->dropped += rec->dropped - m->dropped_this_fd;
                m->dropped_this_fd = rec->dropped;
        }
        m->samples++;
        m->last = *rec;
        m->have_sample = true;
        if (m->on_sample)
                m->on_sample(m, rec, m->userdata);
}

static int on_telemetry_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        ctl_monitor *m = userdata;
        uint8_t buf[ND_TELEMETRY_RECORD_RECV_SIZE];

        /* Drain what is there, bounded so one busy socket cannot starve the rest of the loop
         * (the source is level-triggered: what is left wakes us again). */
        for (unsigned i = 0; i < TELEMETRY_DRAIN_MAX; i++) {
                ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
                if (n < 0) {
                        if (errno == EAGAIN || errno == EINTR)
                                return 0;
                        break; /* the socket failed: as closed */
                }
                if (n == 0)
                        break; /* the daemon closed its end: the pen is going */
                nd_telemetry_record rec;
                if ((size_t) n > sizeof buf || nd_telemetry_record_decode(buf, (size_t) n, &rec) < 0) {
                        m->bad_records++;
                        continue;
                }
                on_record(m, &rec);
                if (m->telemetry_fd < 0)
                        return 0; /* a callback closed it */
        }
        if (m->telemetry_fd >= 0 && !(revents & (EPOLLHUP | EPOLLERR))) {
                ssize_t n = recv(fd, buf, 1, MSG_DONTWAIT | MSG_PEEK);
                if (n > 0 || (n < 0 && errno == EAGAIN))
                        return 0; /* bound reached with data left */
        }
        telemetry_close(m);
        notify(m, CTL_MONITOR_TELEMETRY_EOF);
        return 0;
}

static int telemetry_open(ctl_monitor *m, bool quiet) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *reply = NULL;
        int r = sd_bus_call_method(m->bus, ND_BUS_NAME, m->path, ND_PEN_INTERFACE, "OpenTelemetry", &error,
                                   &reply, NULL);
        if (r < 0)
                return quiet ? ctl_exit_code_for_error(&error, r)
                             : ctl_log_bus_error("cannot open the pen's telemetry", &error, r);
        int fd;
        r = sd_bus_message_read(reply, "h", &fd);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot read the telemetry socket: %s", strerror(-r));
        /* The fd belongs to the message: keep a copy of our own. */
        _cleanup_close_ int own = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (own < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot keep the telemetry socket: %s", strerror(errno));
        telemetry_close(m);
        r = sd_event_add_io(m->event, &m->telemetry_source, own, EPOLLIN, on_telemetry_io, m);
        if (r < 0)
                return ctl_fail(NEEDLECTL_EXIT_SOFTWARE, "cannot watch the telemetry socket: %s", strerror(-r));
        m->telemetry_fd = TAKE_FD(own);
        m->dropped_this_fd = 0;
        m->have_sequence = false;
        return 0;
}

static int reload_properties(ctl_monitor *m) {
        _cleanup_bus_error_ sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_bus_message_ sd_bus_message *reply = NULL;
        int r = sd_bus_call_method(m->bus, ND_BUS_NAME, m->path, "org.freedesktop.DBus.Properties", "GetAll",
                                   &error, &reply, "s", ND_PEN_INTERFACE);
        if (r < 0)
                return r;
        _cleanup_json_ json_object *props = json_object_new_object();
        if (!props)
                return -ENOMEM;
        r = ctl_message_read_properties(reply, props);
        if (r < 0)
                return r;
        json_object_put(m->props);
        m->props = TAKE_PTR(props);
        return 0;
}

static void pen_arrived(ctl_monitor *m) {
        m->present = true;
        if (m->want_telemetry)
                (void) telemetry_open(m, true);
        notify(m, CTL_MONITOR_PEN_BACK);
}

static int on_properties_changed(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        ctl_monitor *m = userdata;
        const char *interface;
        if (sd_bus_message_read(msg, "s", &interface) < 0)
                return 0;
        if (STREQ(interface, ND_MANAGER_INTERFACE)) {
                /* Only LimitsDigest matters here; the rest of the Manager is not followed. */
                _cleanup_json_ json_object *changed = json_object_new_object();
                if (changed && ctl_message_read_properties(msg, changed) >= 0 &&
                    json_object_object_get_ex(changed, "limits_digest", NULL))
                        notify(m, CTL_MONITOR_LIMITS_CHANGED);
                return 0;
        }
        if (!STREQ(interface, ND_PEN_INTERFACE) || !m->props)
                return 0;
        if (ctl_message_read_properties(msg, m->props) < 0)
                return 0;
        /* Invalidated properties (none in API v1, but allowed): re-read them all. */
        if (sd_bus_message_enter_container(msg, 'a', "s") > 0) {
                const char *name;
                bool any = false;
                while (sd_bus_message_read(msg, "s", &name) > 0)
                        any = true;
                if (any)
                        (void) reload_properties(m);
        }
        notify(m, CTL_MONITOR_PROPERTIES);
        return 0;
}

static int on_interfaces_added(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        ctl_monitor *m = userdata;
        const char *path;
        if (sd_bus_message_read(msg, "o", &path) < 0 || !STREQ(path, m->path))
                return 0;
        if (sd_bus_message_enter_container(msg, 'a', "{sa{sv}}") < 0)
                return 0;
        while (sd_bus_message_enter_container(msg, 'e', "sa{sv}") > 0) {
                const char *interface;
                if (sd_bus_message_read(msg, "s", &interface) < 0)
                        return 0;
                if (STREQ(interface, ND_PEN_INTERFACE)) {
                        _cleanup_json_ json_object *props = json_object_new_object();
                        if (!props || ctl_message_read_properties(msg, props) < 0)
                                return 0;
                        json_object_put(m->props);
                        m->props = TAKE_PTR(props);
                        pen_arrived(m);
                        return 0;
                }
                if (sd_bus_message_skip(msg, "a{sv}") < 0 || sd_bus_message_exit_container(msg) < 0)
                        return 0;
        }
        return 0;
}

static int on_interfaces_removed(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        ctl_monitor *m = userdata;
        const char *path;
        if (sd_bus_message_read(msg, "o", &path) < 0 || !STREQ(path, m->path) || !m->present)
                return 0;
        m->present = false;
        telemetry_close(m);
        notify(m, CTL_MONITOR_PEN_GONE);
        return 0;
}

static int on_session_ended(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        ctl_monitor *m = userdata;
        const char *id, *reason;
        if (sd_bus_message_read(msg, "ss", &id, &reason) < 0)
                return 0;
        char *id_copy = strdup(id), *reason_copy = strdup(reason);
        if (!id_copy || !reason_copy) {
                free(id_copy);
                free(reason_copy);
                return 0;
        }
        free(m->ended_session_id);
        free(m->ended_reason);
        m->ended_session_id = id_copy;
        m->ended_reason = reason_copy;
        notify(m, CTL_MONITOR_SESSION_ENDED);
        return 0;
}

/* The figures of the session that ends, as the ledger recorded them (sent before SessionEnded). */
static int on_session_recorded(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        ctl_monitor *m = userdata;
        const char *id;
        double duration_s = 0;
        uint64_t strokes = 0, punctures = 0;
        double density_per_cm2 = 0;
        bool have_duration = false, have_strokes = false;
        if (sd_bus_message_read(msg, "s", &id) < 0 || sd_bus_message_enter_container(msg, 'a', "{sv}") < 0)
                return 0;
        while (sd_bus_message_enter_container(msg, 'e', "sv") > 0) {
                const char *key;
                if (sd_bus_message_read(msg, "s", &key) < 0)
                        return 0;
                if (STREQ(key, "duration_s"))
                        have_duration = sd_bus_message_read(msg, "v", "d", &duration_s) >= 0;
                else if (STREQ(key, "strokes"))
                        have_strokes = sd_bus_message_read(msg, "v", "t", &strokes) >= 0;
                else if (STREQ(key, "punctures")) {
                        if (sd_bus_message_read(msg, "v", "t", &punctures) < 0)
                                return 0;
                } else if (STREQ(key, "density_per_cm2")) {
                        if (sd_bus_message_read(msg, "v", "d", &density_per_cm2) < 0)
                                return 0;
                }
                else if (sd_bus_message_skip(msg, "v") < 0)
                        return 0;
                if (sd_bus_message_exit_container(msg) < 0)
                        return 0;
        }
        if (!have_duration || !have_strokes)
                return 0;
        char *copy = strdup(id);
        if (!copy)
                return 0;
        free(m->recorded_session_id);
        m->recorded_session_id = copy;
        m->recorded_duration_s = duration_s;
        m->recorded_strokes = strokes;
        m->recorded_punctures = punctures;
        m->recorded_density_per_cm2 = density_per_cm2;
        return 0;
}

static int on_name_owner_changed(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        ctl_monitor *m = userdata;
        const char *name, *old_owner, *new_owner;
        if (sd_bus_message_read(msg, "sss", &name, &old_owner, &new_owner) < 0 || !STREQ(name, ND_BUS_NAME))
                return 0;
        if (new_owner[0] == '\0') {
                m->daemon_present = false;
                if (m->present) {
                        m->present = false;
                        telemetry_close(m);
                        notify(m, CTL_MONITOR_PEN_GONE);
                }
                notify(m, CTL_MONITOR_DAEMON_GONE);
                return 0;
        }
        m->daemon_present = true;
        notify(m, CTL_MONITOR_DAEMON_BACK);
        /* A daemon that comes back with the pen already there announced it before we could
         * see it: ask. Otherwise InterfacesAdded will tell. */
        if (!m->present && reload_properties(m) >= 0)
                pen_arrived(m);
        return 0;
}

int ctl_monitor_new(sd_event *event, sd_bus *bus, const char *path, bool telemetry, ctl_monitor **ret) {
        _cleanup_(ctl_monitor_freep) ctl_monitor *m = calloc(1, sizeof *m);
        if (!m)
                return ctl_oom();
        m->telemetry_fd = -1;
        m->event = sd_event_ref(event);
        m->bus = sd_bus_ref(bus);
        m->want_telemetry = telemetry;
        m->path = strdup(path);
        m->serial = ctl_pen_serial_from_path(path);
        if (!m->path)
                return ctl_oom();
        if (!m->serial && !(m->serial = strdup(path)))
                return ctl_oom();

        /* Subscribe first, then read: nothing that happens in between is missed. */
        int r = sd_bus_match_signal(bus, &m->slots[0], ND_BUS_NAME, path, "org.freedesktop.DBus.Properties",
                                    "PropertiesChanged", on_properties_changed, m);
        if (r >= 0)
                r = sd_bus_match_signal(bus, &m->slots[1], ND_BUS_NAME, ND_MANAGER_PATH,
                                        "org.freedesktop.DBus.ObjectManager", "InterfacesAdded", on_interfaces_added, m);
        if (r >= 0)
                r = sd_bus_match_signal(bus, &m->slots[2], ND_BUS_NAME, ND_MANAGER_PATH,
                                        "org.freedesktop.DBus.ObjectManager", "InterfacesRemoved",
                                        on_interfaces_removed, m);
        if (r >= 0)
                r = sd_bus_match_signal(bus, &m->slots[3], ND_BUS_NAME, path, ND_PEN_INTERFACE,
                                        "SessionEnded", on_session_ended, m);
        if (r >= 0)
                r = sd_bus_match_signal(bus, &m->slots[4], "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "NameOwnerChanged", on_name_owner_changed, m);
        if (r >= 0)
                r = sd_bus_match_signal(bus, &m->slots[5], ND_BUS_NAME, ND_MANAGER_PATH,
                                        "org.freedesktop.DBus.Properties", "PropertiesChanged",
                                        on_properties_changed, m);
        if (r >= 0)
                r = sd_bus_match_signal(bus, &m->slots[6], ND_BUS_NAME, path, ND_PEN_INTERFACE,
                                        "SessionRecorded", on_session_recorded, m);
        if (r < 0)
                return ctl_log_bus_error("cannot subscribe to the pen's signals", NULL, r);

        r = ctl_get_all_properties(bus, path, ND_PEN_INTERFACE, &m->props);
        if (r != 0)
                return r;
        m->present = true;
        m->daemon_present = true;
        if (telemetry) {
                r = telemetry_open(m, false);
                if (r != 0)
                        return r;
        }
        *ret = TAKE_PTR(m);
        return 0;
}

ctl_monitor *ctl_monitor_free(ctl_monitor *m) {
        if (!m)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(m->slots); i++)
                sd_bus_slot_unref(m->slots[i]);
        telemetry_close(m);
        json_object_put(m->props);
        free(m->ended_session_id);
        free(m->ended_reason);
        free(m->recorded_session_id);
        free(m->path);
        free(m->serial);
        sd_bus_unref(m->bus);
        sd_event_unref(m->event);
        free(m);
        return NULL;
}

void ctl_monitor_set_callbacks(ctl_monitor *m, ctl_monitor_event_fn on_event, ctl_monitor_sample_fn on_sample,
                               void *userdata) {
        m->on_event = on_event;
        m->on_sample = on_sample;
        m->userdata = userdata;
}
