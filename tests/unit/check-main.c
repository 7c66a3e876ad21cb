/* check-main.c: runs nd_test_suite() with Check's environment settings (CK_FORK, CK_TAP_LOG_FILE_NAME,
 * CK_VERBOSITY: see tests/meson.build) and exits non-zero when any test failed. */
#include <stdlib.h>

#include "check-main.h"

int main(void) {
        SRunner *sr = srunner_create(nd_test_suite());
        srunner_run_all(sr, CK_ENV);
        int failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
