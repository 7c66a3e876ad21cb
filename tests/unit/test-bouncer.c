/* test-bouncer.c: the bouncer is the only way in (daemon/bouncer.c): nd_bouncer_dispatch runs a
 * method only when both its table and the caller's method list have it, runs an unguarded
 * implementation only for a method mapped to no authorization, and refuses everything else with
 * AccessDenied without running anything. */
#include <check.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <systemd/sd-bus.h>

#include "bouncer.h"
#include "check-main.h"
#include "util.h"

static unsigned unguarded_calls, authorized_calls;

static int count_unguarded(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        unguarded_calls++;
        ck_assert_ptr_eq(userdata, &unguarded_calls);
        return 7;
}

static void count_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *e, const nd_caller *c, void *userdata) {
        authorized_calls++;
}

/* A bus that is open (a socketpair peer, never started on the other side) to build calls on. */
static sd_bus *bus_new(void) {
        int fds[2];
        sd_bus *bus = NULL;
        ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
        ck_assert_int_ge(sd_bus_new(&bus), 0);
        ck_assert_int_ge(sd_bus_set_fd(bus, fds[0], fds[0]), 0);
        ck_assert_int_ge(sd_bus_start(bus), 0);
        close(fds[1]);
        return bus;
}

typedef struct dispatch_row {
        const char *what;
        const char *interface, *member;
        bool unguarded;          /* the method list gives an unguarded implementation (else authorized) */
        bool listed;             /* the method list has the member at all */
        bool runs;               /* expected: the unguarded implementation runs */
} dispatch_row;

static const dispatch_row rows[] = {
        { "Stop: mapped to none, unguarded", "org.needled1.Pen", "Stop", true, true, true },
        { "ValidateProfile: none", "org.needled1.Manager", "ValidateProfile", true, true, true },
        { "Simulator.AddPen: none", "org.needled1.Simulator", "AddPen", true, true, true },
        { "Start unguarded: needs operate, refused", "org.needled1.Pen", "Start", true, true, false },
        { "ReloadLimits unguarded: refused", "org.needled1.Manager", "ReloadLimits", true, true, false },
        { "not in the table", "org.needled1.Pen", "SelfDestruct", true, true, false },
        { "another interface's member", "org.needled1.Manager", "Stop", true, true, false },
        { "in the table, not in the method list", "org.needled1.Pen", "Stop", true, false, false },
};

START_TEST(test_dispatch) {
        const dispatch_row *row = &rows[_i];
        sd_bus *bus = bus_new();
        nd_bouncer *b = NULL;
        sd_bus_message *m = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        nd_method methods[] = {
                { row->listed ? row->member : "Other", row->unguarded ? NULL : count_authorized,
                  row->unguarded ? count_unguarded : NULL },
        };

        ck_assert_int_ge(nd_bouncer_new(bus, ND_AUTH_SAME_UID, USEC_PER_SEC, USEC_PER_SEC, &b), 0);
        ck_assert_int_ge(sd_bus_message_new_method_call(bus, &m, "org.needled", "/org/needled", row->interface,
                                                        row->member), 0);
        unguarded_calls = authorized_calls = 0;
        int r = nd_bouncer_dispatch(b, m, methods, ELEMENTSOF(methods), &unguarded_calls, NULL, &error);
        if (row->runs) {
                ck_assert_msg(r == 7 && unguarded_calls == 1, "%s: r=%d calls=%u", row->what, r, unguarded_calls);
                ck_assert(!sd_bus_error_is_set(&error));
        } else {
                ck_assert_msg(r < 0 && unguarded_calls == 0, "%s: r=%d calls=%u", row->what, r, unguarded_calls);
                ck_assert_msg(sd_bus_error_has_name(&error, SD_BUS_ERROR_ACCESS_DENIED), "%s: %s", row->what,
                              strempty(error.name));
        }
        ck_assert_uint_eq(authorized_calls, 0); /* never at once: a verdict comes from the loop */
        ck_assert_uint_eq(nd_bouncer_pending(b), 0);
        sd_bus_error_free(&error);
        sd_bus_message_unref(m);
        nd_bouncer_free(b);
        sd_bus_flush_close_unref(bus);
}
END_TEST

/* A method with both or neither implementation is a table mistake: refused. */
START_TEST(test_dispatch_mis_mapped) {
        sd_bus *bus = bus_new();
        nd_bouncer *b = NULL;
        sd_bus_message *m = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        const nd_method both[] = { { "Stop", count_authorized, count_unguarded } };
        const nd_method neither[] = { { "Stop", NULL, NULL } };

        ck_assert_int_ge(nd_bouncer_new(bus, ND_AUTH_SAME_UID, USEC_PER_SEC, USEC_PER_SEC, &b), 0);
        ck_assert_int_ge(sd_bus_message_new_method_call(bus, &m, "org.needled", "/p", "org.needled1.Pen", "Stop"), 0);
        unguarded_calls = 0;
        ck_assert_int_lt(nd_bouncer_dispatch(b, m, both, 1, &unguarded_calls, NULL, &error), 0);
        sd_bus_error_free(&error);
        ck_assert_int_lt(nd_bouncer_dispatch(b, m, neither, 1, &unguarded_calls, NULL, &error), 0);
        ck_assert(sd_bus_error_has_name(&error, SD_BUS_ERROR_ACCESS_DENIED));
        ck_assert_uint_eq(unguarded_calls, 0);
        sd_bus_error_free(&error);
        sd_bus_message_unref(m);
        nd_bouncer_free(b);
        sd_bus_flush_close_unref(bus);
}
END_TEST

/* A method that needs authorization is only ever queued for a verdict, never run at once. */
START_TEST(test_dispatch_authorized_waits_for_the_verdict) {
        sd_bus *bus = bus_new();
        sd_event *e = NULL;
        nd_bouncer *b = NULL;
        sd_bus_message *m = NULL;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        const nd_method methods[] = { { "Start", count_authorized, NULL } };

        ck_assert_int_ge(sd_event_new(&e), 0);
        ck_assert_int_ge(sd_bus_attach_event(bus, e, 0), 0);
        ck_assert_int_ge(nd_bouncer_new(bus, ND_AUTH_SAME_UID, USEC_PER_SEC, USEC_PER_SEC, &b), 0);
        ck_assert_int_ge(sd_bus_message_new_method_call(bus, &m, "org.needled", "/p", "org.needled1.Pen", "Start"), 0);
        authorized_calls = 0;
        ck_assert_int_eq(nd_bouncer_dispatch(b, m, methods, 1, NULL, NULL, &error), 1);
        ck_assert_uint_eq(authorized_calls, 0);
        ck_assert_uint_eq(nd_bouncer_pending(b), 1);
        sd_bus_message_unref(m);
        nd_bouncer_free(b); /* drops the check without calling it */
        ck_assert_uint_eq(authorized_calls, 0);
        sd_bus_flush_close_unref(bus);
        sd_event_unref(e);
}
END_TEST

START_TEST(test_table) {
        const char *interface, *member, *action;
        size_t n = 0;
        for (; nd_bouncer_table_entry(n, &interface, &member, &action); n++) {
                ck_assert_ptr_eq(nd_bouncer_action_for(interface, member), action);
                ck_assert(!action[0] || STREQ(action, ND_ACTION_OPERATE) || STREQ(action, ND_ACTION_CONFIGURE) ||
                          STREQ(action, ND_ACTION_READ_HISTORY));
        }
        ck_assert_uint_gt(n, 20);
        ck_assert_str_eq(nd_bouncer_action_for("org.needled1.Pen", "Stop"), "");
        ck_assert_ptr_null(nd_bouncer_action_for("org.needled1.Pen", "Bogus"));
        ck_assert_ptr_null(nd_bouncer_action_for(NULL, "Stop"));
        ck_assert_ptr_null(nd_bouncer_action_for("org.needled1.Pen", NULL));
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("bouncer");
        TCase *tc = tcase_create("dispatch");
        tcase_add_loop_test(tc, test_dispatch, 0, (int) ELEMENTSOF(rows));
        tcase_add_test(tc, test_dispatch_mis_mapped);
        tcase_add_test(tc, test_dispatch_authorized_waits_for_the_verdict);
        tcase_add_test(tc, test_table);
        suite_add_tcase(s, tc);
        return s;
}
