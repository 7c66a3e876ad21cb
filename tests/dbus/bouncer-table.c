/* bouncer-table.c: prints the bouncer's method table (daemon/bouncer.c), one
 * "interface member action" line per method ("-" for no authorization), for
 * test_bouncer_table.py to compare with dbus/org.needled1.xml. */
#include <stdio.h>
#include <stdlib.h>

#include "bouncer.h"

int main(void) {
        const char *interface, *member, *action;
        for (size_t i = 0; nd_bouncer_table_entry(i, &interface, &member, &action); i++)
                printf("%s %s %s\n", interface, member, action[0] ? action : "-");
        return fflush(stdout) == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
