/* test-daemon-tables.c: the daemon's enum-to-string tables (DEFINE_STRING_TABLE_* of util.h):
 * every pen state has one kebab name, none past the end; every refusal of lib/interlocks.c maps
 * to one named error of the contract, "allowed" to none, anything unknown to Fault. */
#include <check.h>
#include <string.h>

#include "check-main.h"
#include "contract.h"
#include "pen-dbus.h"
#include "pen.h"
#include "util.h"

static const char *const contract_errors[] = {
        ND_ERROR_INVALID_PROFILE, ND_ERROR_INVALID_LIMITS, ND_ERROR_LIMITS_UNAVAILABLE, ND_ERROR_LIMIT_EXCEEDED,
        ND_ERROR_WRONG_STATE, ND_ERROR_NO_CARTRIDGE, ND_ERROR_CARTRIDGE_SPENT, ND_ERROR_LOW_BATTERY,
        ND_ERROR_FAULT, ND_ERROR_DEVICE_GONE, ND_ERROR_NOT_OWNER, ND_ERROR_STORAGE, ND_ERROR_UNKNOWN_PROFILE,
};

START_TEST(test_pen_states) {
        static const char *const want[_ND_PEN_STATE_MAX] = { "idle", "armed", "running", "paused", "fault" };
        for (int s = 0; s < _ND_PEN_STATE_MAX; s++) {
                const char *name = nd_pen_state_to_string((nd_pen_state) s);
                ck_assert_ptr_nonnull(name);
                ck_assert_str_eq(name, want[s]);
                for (int t = 0; t < s; t++)
                        ck_assert_str_ne(name, nd_pen_state_to_string((nd_pen_state) t));
        }
        ck_assert_ptr_null(nd_pen_state_to_string(_ND_PEN_STATE_MAX));
        ck_assert_ptr_null(nd_pen_state_to_string((nd_pen_state) -1));
}
END_TEST

START_TEST(test_refusal_errors) {
        ck_assert_ptr_null(nd_pen_refusal_error_name(ND_INTERLOCK_ALLOWED));
        for (int r = ND_INTERLOCK_ALLOWED + 1; r < _ND_INTERLOCK_REFUSAL_MAX; r++) {
                const char *name = nd_pen_refusal_error_name((nd_interlock_refusal) r);
                bool known = false;
                ck_assert_ptr_nonnull(name);
                for (size_t i = 0; i < ELEMENTSOF(contract_errors); i++)
                        known = known || STREQ(name, contract_errors[i]);
                ck_assert_msg(known, "refusal %s maps to %s, not an error of the contract",
                              nd_interlock_refusal_to_string((nd_interlock_refusal) r), name);
        }
        ck_assert_str_eq(nd_pen_refusal_error_name(ND_INTERLOCK_REFUSE_LOW_BATTERY), ND_ERROR_LOW_BATTERY);
        ck_assert_str_eq(nd_pen_refusal_error_name(ND_INTERLOCK_REFUSE_CARTRIDGE_SPENT), ND_ERROR_CARTRIDGE_SPENT);
        ck_assert_str_eq(nd_pen_refusal_error_name(ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE), ND_ERROR_LIMITS_UNAVAILABLE);
        ck_assert_str_eq(nd_pen_refusal_error_name(_ND_INTERLOCK_REFUSAL_MAX), ND_ERROR_FAULT);
        ck_assert_str_eq(nd_pen_refusal_error_name((nd_interlock_refusal) 1000), ND_ERROR_FAULT);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("daemon-tables");
        TCase *tc = tcase_create("tables");
        tcase_add_test(tc, test_pen_states);
        tcase_add_test(tc, test_refusal_errors);
        suite_add_tcase(s, tc);
        return s;
}
