/* bench-floor.c: the smallest sd-bus service, the floor needled's start-up is measured against.
 *
 * It does what any sd-bus daemon must before it can serve (connect, authenticate, Hello, attach
 * to an sd-event loop, ask for its name) and nothing else: org.freedesktop.DBus.Peer.Ping is
 * answered by sd-bus itself. The benchmark starts it and needled in turns on the same bus, so a
 * busy machine slows both alike. It takes the name org.needled (the client watches that name)
 * and ignores its arguments; SIGTERM or SIGINT ends it. */
#include <signal.h>
#include <stdlib.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

int main(int argc, char *argv[]) {
        sd_event *event = NULL;
        sd_bus *bus = NULL;
        sigset_t mask;
        int r;

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        r = sd_event_new(&event);
        if (r >= 0)
                r = sd_event_add_signal(event, NULL, SIGTERM, NULL, NULL);
        if (r >= 0)
                r = sd_event_add_signal(event, NULL, SIGINT, NULL, NULL);
        if (r >= 0)
                r = sd_bus_open_user(&bus);
        if (r >= 0)
                r = sd_bus_attach_event(bus, event, SD_EVENT_PRIORITY_NORMAL);
        if (r >= 0)
                r = sd_bus_request_name_async(bus, NULL, "org.needled", 0, NULL, NULL);
        if (r >= 0)
                r = sd_event_loop(event);
        sd_bus_flush_close_unref(bus);
        sd_event_unref(event);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
