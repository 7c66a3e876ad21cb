/* test-string-table.c: every enum <-> name table of libneedle (DEFINE_STRING_TABLE_* in util.h,
 * and the switch-based ones): each value has one name, in kebab case, no two values share it,
 * out-of-range values have none, and names map back; and the log call that returns the error. */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "check-main.h"
#include "ledger.h"
#include "log.h"
#include "pendev.h"
#include "penmodel.h"
#include "util.h"

typedef const char *(*to_string_fn)(int v);

static bool is_kebab(const char *s) {
        if (!s || !*s || *s == '-' || s[strlen(s) - 1] == '-')
                return false;
        for (; *s; s++)
                if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '-'))
                        return false;
        return true;
}

/* Every value in [0, n) has a kebab name, all distinct. */
static void check_table(const char *what, const char *const *names, size_t n) {
        for (size_t i = 0; i < n; i++) {
                ck_assert_msg(is_kebab(names[i]), "%s %zu: name '%s' is not kebab-case", what, i, strempty(names[i]));
                for (size_t j = 0; j < i; j++)
                        ck_assert_msg(!STREQ(names[i], names[j]), "%s %zu and %zu are both '%s'", what, j, i, names[i]);
        }
}

START_TEST(test_pendev_error_kinds) {
        const char *names[_ND_PENDEV_ERROR_KIND_MAX];
        for (int k = 0; k < _ND_PENDEV_ERROR_KIND_MAX; k++)
                names[k] = nd_pendev_error_kind_to_string((nd_pendev_error_kind) k);
        check_table("pendev error kind", names, ELEMENTSOF(names));
        ck_assert_ptr_null(nd_pendev_error_kind_to_string(_ND_PENDEV_ERROR_KIND_MAX));
        ck_assert_ptr_null(nd_pendev_error_kind_to_string((nd_pendev_error_kind) -1));
        ck_assert_str_eq(nd_pendev_error_kind_to_string(ND_PENDEV_ERROR_GONE), "device-gone");
}
END_TEST

START_TEST(test_penmodel_faults) {
        const char *names[_ND_PENMODEL_FAULT_MAX];
        for (int f = 0; f < _ND_PENMODEL_FAULT_MAX; f++) {
                names[f] = nd_penmodel_fault_to_string((nd_penmodel_fault) f);
                ck_assert_int_eq(nd_penmodel_fault_from_string(names[f]), f);
        }
        check_table("pen model fault", names, ELEMENTSOF(names));
        ck_assert_ptr_null(nd_penmodel_fault_to_string(_ND_PENMODEL_FAULT_MAX));
        ck_assert_int_eq(nd_penmodel_fault_from_string(NULL), -EINVAL);
        ck_assert_int_eq(nd_penmodel_fault_from_string(""), -EINVAL);
        ck_assert_int_eq(nd_penmodel_fault_from_string("motor-stall "), -EINVAL);
}
END_TEST

/* The ledger's names are switch-based (no _MAX): every value the header lists. */
START_TEST(test_ledger_names) {
        const char *states[] = {
                nd_ledger_cartridge_state_to_string(ND_LEDGER_CARTRIDGE_FRESH),
                nd_ledger_cartridge_state_to_string(ND_LEDGER_CARTRIDGE_IN_USE),
                nd_ledger_cartridge_state_to_string(ND_LEDGER_CARTRIDGE_SPENT),
        };
        check_table("cartridge state", states, ELEMENTSOF(states));
        const char *breaks[] = {
                nd_ledger_break_to_string(ND_LEDGER_INTACT),
                nd_ledger_break_to_string(ND_LEDGER_BREAK_HASH),
                nd_ledger_break_to_string(ND_LEDGER_BREAK_PREV),
                nd_ledger_break_to_string(ND_LEDGER_BREAK_SEQ),
                nd_ledger_break_to_string(ND_LEDGER_BREAK_HEAD),
                nd_ledger_break_to_string(ND_LEDGER_BREAK_RECORD),
                nd_ledger_break_to_string(ND_LEDGER_BREAK_MALFORMED),
                nd_ledger_break_to_string(ND_LEDGER_BREAK_ANCHOR),
        };
        check_table("audit break", breaks, ELEMENTSOF(breaks));
}
END_TEST

/* nd_log_*_errno: one line "<message>: <strerror>", and -|error| back, whatever the sign. */
START_TEST(test_log_errno_returns_the_error) {
        char path[] = "/tmp/needled-test-log-XXXXXX";
        int fd = mkstemp(path);
        ck_assert_int_ge(fd, 0);
        unlink(path);
        fflush(stderr);
        int saved = dup(STDERR_FILENO);
        ck_assert_int_ge(saved, 0);
        ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
        nd_log_set_ident("t");

        errno = EAGAIN;
        int r1 = nd_log_error_errno(-EIO, "cannot read %s", "x.yaml");
        int e1 = errno;
        int r2 = nd_log_warning_errno(ENOENT, "no file");
        int r3 = nd_log_debug_errno(-EPERM, "not shown at the default level");

        fflush(stderr);
        ck_assert_int_ge(dup2(saved, STDERR_FILENO), 0);
        close(saved);
        nd_log_set_ident(NULL);
        ck_assert_int_eq(r1, -EIO);
        ck_assert_int_eq(e1, EAGAIN);          /* errno is left as it was */
        ck_assert_int_eq(r2, -ENOENT);
        ck_assert_int_eq(r3, -EPERM);

        char buf[512] = "";
        ck_assert_int_ge(lseek(fd, 0, SEEK_SET), 0);
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        ck_assert_int_gt(n, 0);
        buf[n] = '\0';
        char want[256];
        snprintf(want, sizeof want, "t: error: cannot read x.yaml: %s\nt: warning: no file: %s\n", strerror(EIO),
                 strerror(ENOENT));
        ck_assert_str_eq(buf, want);
}
END_TEST

Suite *nd_test_suite(void) {
        Suite *s = suite_create("string-table");
        TCase *tc = tcase_create("tables");
        tcase_add_test(tc, test_pendev_error_kinds);
        tcase_add_test(tc, test_penmodel_faults);
        tcase_add_test(tc, test_ledger_names);
        tcase_add_test(tc, test_log_errno_returns_the_error);
        suite_add_tcase(s, tc);
        return s;
}
