/* ledger-verify: nd_ledger_audit_verify() as a long-running helper, so that the soak can check
 * the audit chain after every step without paying for a process start each time.
 *
 * Reads one database path per line on stdin; for each, writes one line to stdout:
 *   intact ENTRIES SESSIONS            the trail and the session rows agree
 *   broken KIND SEQ MESSAGE            nd_ledger_break_to_string(KIND) at entry SEQ
 *   unreadable MESSAGE                 the file could not be read (-errno from the verifier)
 * Exits 0 at end of input. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ledger.h"

#define PATH_MAX_LINE 4096

int main(void) {
        char line[PATH_MAX_LINE];
        while (fgets(line, sizeof line, stdin)) {
                line[strcspn(line, "\n")] = '\0';
                nd_ledger_verify_result res;
                int r = nd_ledger_audit_verify(line, &res);
                if (r < 0)
                        printf("unreadable %s\n", res.message);
                else if (res.broken != ND_LEDGER_INTACT)
                        printf("broken %s %" PRIu64 " %s\n", nd_ledger_break_to_string(res.broken), res.broken_seq,
                               res.message);
                else
                        printf("intact %" PRIu64 " %" PRIu64 "\n", res.entries, res.sessions);
                fflush(stdout);
        }
        return EXIT_SUCCESS;
}
