/* check-main.h: the one main() of the Check unit tests (check-main.c): each test file defines
 * nd_test_suite() and links check-main.c. */
#pragma once

#include <check.h>

/* The suite of this test program, owned by the caller (the runner frees it). */
Suite *nd_test_suite(void);
