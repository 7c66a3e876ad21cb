/* needlectl.h: the verbs of needlectl and the exit codes they share. */
#pragma once

/* Exit codes. 0..2 are fixed by the offline checks (valid, invalid, unreadable). */
enum {
        NEEDLECTL_EXIT_OK = 0,
        NEEDLECTL_EXIT_INVALID = 1,     /* the file or request was understood and is not valid */
        NEEDLECTL_EXIT_UNREADABLE = 2,  /* the file could not be read */
        NEEDLECTL_EXIT_USAGE = 64,      /* bad command line (sysexits EX_USAGE) */
};

/* Each verb takes argv with argv[0] the verb's name; it prints its own errors. */
int verb_check_limits(int argc, char *argv[]);
int verb_check_profile(int argc, char *argv[]);
