/* bench-floor.c: the smallest sd-bus service, the floor needled's start-up is measured against.
 *
 * It does what any sd-bus daemon must before it can serve (connect, authenticate, Hello, attach
 * to an sd-event loop, ask for its name) and nothing else: org.freedesktop.DBus.Peer.Ping is
 * answered by sd-bus itself. The benchmark starts it and needled in turns on the same bus, so a
 * busy machine slows both alike. It takes the name org.needled (the client watches that name)
 * and ignores its arguments but --state-dir; SIGTERM or SIGINT ends it.
 *
 * Built a second time with FLOOR_LEDGER as bench-floor-ledger, the floor of the stack needled is
 * made of: before asking for its name it also opens an SQLite database in --state-dir as a ledger
 * is opened (WAL, synchronous=FULL, a table, one row written and read back), so its memory is
 * what libsystemd, SQLite and libc cost before any of needled's own code. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>
#ifdef FLOOR_LEDGER
#include <sqlite3.h>

static int open_ledger(int argc, char *argv[], sqlite3 **db) {
        const char *dir = ".";
        char path[4096];
        for (int i = 1; i + 1 < argc; i++)
                if (strcmp(argv[i], "--state-dir") == 0)
                        dir = argv[i + 1];
        snprintf(path, sizeof path, "%s/floor-ledger.sqlite", dir);
        if (sqlite3_open_v2(path, db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) != SQLITE_OK)
                return -1;
        return sqlite3_exec(*db,
                            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                            "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);"
                            "INSERT INTO t (v) VALUES ('floor'); SELECT count(*) FROM t;",
                            NULL, NULL, NULL) == SQLITE_OK ? 0 : -1;
}
#endif

int main(int argc, char *argv[]) {
        sd_event *event = NULL;
        sd_bus *bus = NULL;
        sigset_t mask;
        int r;

#ifdef FLOOR_LEDGER
        sqlite3 *db = NULL;
        if (open_ledger(argc, argv, &db) < 0) {
                fprintf(stderr, "bench-floor-ledger: %s\n", db ? sqlite3_errmsg(db) : "cannot open");
                return EXIT_FAILURE;
        }
#endif
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
#ifdef FLOOR_LEDGER
        sqlite3_close(db);
#endif
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
