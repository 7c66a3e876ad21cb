/* needled-client.c: a small needled client in C with GLib, on the proxies gdbus-codegen makes from
 * the shipped dbus/org.needled1.xml (as a GTK clinic application would be built).
 *
 * Lists the pens through the object manager (the Manager is one of its objects), follows a pen's
 * property changes, arms an installed profile, runs a short session, reads the telemetry socket
 * (OpenTelemetry: the UnixFD annotation makes the generated call hand over the fd list), handles a
 * named error, and prints the figures the ledger recorded (SessionRecorded).
 *
 *     needled-client [--session] SERIAL
 *
 * Exit status 0 when the session ran, ended "stopped" and the telemetry was consecutive. */
#include <gio/gio.h>
#include <gio/gunixfdlist.h>
#include <glib-unix.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "needled1-generated.h"

#define RECORD_SIZE 72            /* docs/telemetry.md, version 1 */
#define RECORD_SEQUENCE_OFFSET 4
#define RECORD_DROPPED_OFFSET 24
#define STOP_AFTER_MS 1500
#define GIVE_UP_AFTER_MS 15000

typedef struct client {
        GMainLoop *loop;
        int telemetry_fd;
        guint64 records, gaps;
        guint32 next_sequence, dropped;
        gboolean have_sequence;
        guint property_changes;
        gchar *reason;
        guint64 recorded_strokes;
        gdouble recorded_duration_s;
} client;

static guint32 get_le32(const guint8 *p) {
        return (guint32) p[0] | (guint32) p[1] << 8 | (guint32) p[2] << 16 | (guint32) p[3] << 24;
}

/* Takes one record if one is waiting; FALSE when none is (or the socket closed). */
static gboolean take_record(client *c, int fd) {
        guint8 record[256];
        ssize_t n = recv(fd, record, sizeof record, MSG_DONTWAIT);
        if (n < RECORD_SIZE)
                return FALSE;
        guint32 sequence = get_le32(record + RECORD_SEQUENCE_OFFSET);
        if (c->have_sequence && sequence != c->next_sequence)
                c->gaps += (guint32) (sequence - c->next_sequence);
        c->have_sequence = TRUE;
        c->next_sequence = sequence + 1;
        c->dropped = get_le32(record + RECORD_DROPPED_OFFSET);
        c->records++;
        return TRUE;
}

static gboolean on_telemetry(gint fd, GIOCondition condition, gpointer userdata) {
        client *c = userdata;
        if (!take_record(c, fd) && (condition & G_IO_HUP))
                return G_SOURCE_REMOVE; /* the pen went */
        return G_SOURCE_CONTINUE;
}

static void on_properties_changed(GDBusProxy *proxy, GVariant *changed, GStrv invalidated, gpointer userdata) {
        client *c = userdata;
        GVariantIter iter;
        const gchar *key;
        GVariant *value;
        g_variant_iter_init(&iter, changed);
        while (g_variant_iter_next(&iter, "{&sv}", &key, &value)) {
                c->property_changes++;
                if (strcmp(key, "State") == 0 || strcmp(key, "SessionId") == 0) {
                        gchar *text = g_variant_print(value, FALSE);
                        printf("  %s = %s\n", key, text);
                        g_free(text);
                }
                g_variant_unref(value);
        }
}

static void on_session_recorded(NeedledPen *pen, const gchar *session_id, GVariant *figures, gpointer userdata) {
        client *c = userdata;
        (void) g_variant_lookup(figures, "strokes", "t", &c->recorded_strokes);
        (void) g_variant_lookup(figures, "duration_s", "d", &c->recorded_duration_s);
}

static void on_session_ended(NeedledPen *pen, const gchar *session_id, const gchar *reason, gpointer userdata) {
        client *c = userdata;
        g_free(c->reason);
        c->reason = g_strdup(reason);
        g_main_loop_quit(c->loop);
}

static gboolean stop_session(gpointer userdata) {
        g_autoptr(GError) error = NULL;
        if (!needled_pen_call_stop_sync(NEEDLED_PEN(userdata), NULL, &error))
                g_printerr("Stop: %s\n", error->message);
        return G_SOURCE_REMOVE;
}

static gboolean give_up(gpointer userdata) {
        g_main_loop_quit(((client *) userdata)->loop);
        return G_SOURCE_REMOVE;
}

int main(int argc, char **argv) {
        g_autoptr(GError) error = NULL;
        GBusType bus_type = G_BUS_TYPE_SYSTEM;
        const gchar *serial = NULL;
        client c = { .telemetry_fd = -1 };

        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--session") == 0)
                        bus_type = G_BUS_TYPE_SESSION;
                else
                        serial = argv[i];
        }
        if (!serial) {
                g_printerr("usage: %s [--session] SERIAL\n", argv[0]);
                return 2;
        }

        g_autoptr(GDBusObjectManager) om = needled_object_manager_client_new_for_bus_sync(
                bus_type, G_DBUS_OBJECT_MANAGER_CLIENT_FLAGS_NONE, "org.needled", "/org/needled", NULL, &error);
        if (!om) {
                g_printerr("cannot reach needled: %s\n", error->message);
                return 1;
        }
        g_autoptr(GDBusObject) root = g_dbus_object_manager_get_object(om, "/org/needled");
        NeedledManager *manager = root ? needled_object_peek_manager(NEEDLED_OBJECT(root)) : NULL;
        if (!manager) {
                g_printerr("the object manager does not list the Manager\n");
                return 1;
        }
        g_autofree gchar *features = g_strjoinv(", ", (gchar **) needled_manager_get_features(manager));
        printf("needled %s, features %s\n", needled_manager_get_version(manager), features);
        GList *objects = g_dbus_object_manager_get_objects(om);
        for (GList *l = objects; l; l = l->next) {
                NeedledPen *pen = needled_object_peek_pen(NEEDLED_OBJECT(l->data));
                if (pen)
                        printf("pen %s %s\n", needled_pen_get_serial(pen), needled_pen_get_state(pen));
        }
        g_list_free_full(objects, g_object_unref);

        /* A named error: a serial nobody has. */
        g_autofree gchar *nowhere = NULL;
        if (!needled_manager_call_find_pen_sync(manager, "NO-SUCH-PEN", &nowhere, NULL, &error)) {
                g_autofree gchar *name = g_dbus_error_get_remote_error(error);
                g_dbus_error_strip_remote_error(error);
                printf("named error: %s: %s\n", name, error->message);
                g_clear_error(&error);
        }

        g_autofree gchar *path = NULL;
        if (!needled_manager_call_find_pen_sync(manager, serial, &path, NULL, &error)) {
                g_printerr("FindPen: %s\n", error->message);
                return 1;
        }
        g_autoptr(GDBusObject) object = g_dbus_object_manager_get_object(om, path);
        NeedledPen *pen = object ? needled_object_peek_pen(NEEDLED_OBJECT(object)) : NULL;
        if (!pen) {
                g_printerr("%s is not a pen\n", path);
                return 1;
        }
        c.loop = g_main_loop_new(NULL, FALSE);
        g_signal_connect(pen, "g-properties-changed", G_CALLBACK(on_properties_changed), &c);
        g_signal_connect(pen, "session-recorded", G_CALLBACK(on_session_recorded), &c);
        g_signal_connect(pen, "session-ended", G_CALLBACK(on_session_ended), &c);

        g_autoptr(GVariant) fd_index = NULL;
        g_autoptr(GUnixFDList) fds = NULL;
        if (!needled_pen_call_open_telemetry_sync(pen, NULL, &fd_index, &fds, NULL, &error)) {
                g_printerr("OpenTelemetry: %s\n", error->message);
                return 1;
        }
        c.telemetry_fd = g_unix_fd_list_get(fds, g_variant_get_handle(fd_index), &error);
        if (c.telemetry_fd < 0) {
                g_printerr("OpenTelemetry: %s\n", error->message);
                return 1;
        }
        g_unix_fd_add(c.telemetry_fd, G_IO_IN | G_IO_HUP, on_telemetry, &c);

        if (!needled_pen_call_load_profile_sync(pen, "acne-scars-cheeks", NULL, &error)) {
                g_printerr("LoadProfile: %s\n", error->message);
                return 1;
        }
        GVariantBuilder options;
        g_variant_builder_init(&options, G_VARIANT_TYPE_VARDICT);
        g_variant_builder_add(&options, "{sv}", "label", g_variant_new_string("example"));
        g_autofree gchar *session_id = NULL;
        if (!needled_pen_call_start_sync(pen, g_variant_builder_end(&options), &session_id, NULL, &error)) {
                g_printerr("Start: %s\n", error->message);
                return 1;
        }
        printf("session %s started\n", session_id);
        g_timeout_add(STOP_AFTER_MS, stop_session, pen);
        g_timeout_add(GIVE_UP_AFTER_MS, give_up, &c);
        g_main_loop_run(c.loop);

        /* Records still in the socket belong to the session: read them before judging. */
        while (take_record(&c, c.telemetry_fd))
                ;
        close(c.telemetry_fd);
        printf("ended: %s (%.1f s, %" G_GUINT64_FORMAT " strokes)\n", c.reason ? c.reason : "(none)",
               c.recorded_duration_s, c.recorded_strokes);
        printf("telemetry: %" G_GUINT64_FORMAT " records, %" G_GUINT64_FORMAT " gaps, %u dropped; %u property changes\n",
               c.records, c.gaps, c.dropped, c.property_changes);
        gboolean ok = c.reason && strcmp(c.reason, "stopped") == 0 && c.recorded_strokes > 0 && c.records > 100 &&
                      c.gaps == c.dropped;
        g_free(c.reason);
        g_main_loop_unref(c.loop);
        return ok ? 0 : 1;
}
