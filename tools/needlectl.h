/* needlectl.h: the verbs of needlectl and the exit codes they share. */
#pragma once

/* Exit codes. 0..2 are fixed by the offline checks (valid, invalid, unreadable). */
enum {
        NEEDLECTL_EXIT_OK = 0,
        NEEDLECTL_EXIT_INVALID = 1,     /* the file or request was understood and is not valid */
        NEEDLECTL_EXIT_UNREADABLE = 2,  /* the file could not be read */
        /* The D-Bus verbs' own (tools/bus-util.c maps each D-Bus error name to one). */
        NEEDLECTL_EXIT_NOT_AUTHORIZED = 3, /* AccessDenied, InteractiveAuthorizationRequired */
        NEEDLECTL_EXIT_NO_DAEMON = 4,   /* bus unreachable, needled not running or not answering */
        NEEDLECTL_EXIT_NO_PEN = 5,      /* no such pen, none connected, DeviceGone, the pen left */
        NEEDLECTL_EXIT_WRONG_STATE = 6, /* WrongState, NotOwner */
        NEEDLECTL_EXIT_FAULT = 7,       /* Fault; a session ended by a fault */
        NEEDLECTL_EXIT_CARTRIDGE = 8,   /* NoCartridge, CartridgeSpent */
        NEEDLECTL_EXIT_LOW_BATTERY = 9, /* LowBattery */
        NEEDLECTL_EXIT_NO_LIMITS = 10,  /* LimitsUnavailable */
        NEEDLECTL_EXIT_STORAGE = 11,    /* Storage */
        NEEDLECTL_EXIT_ENDED = 12,      /* run/start --wait: the session ended other than completed */
        NEEDLECTL_EXIT_USAGE = 64,      /* bad command line (sysexits EX_USAGE) */
        NEEDLECTL_EXIT_SOFTWARE = 70,   /* out of memory, a reply needlectl cannot read (EX_SOFTWARE) */
};

/* Each verb takes argv with argv[0] the verb's name; it prints its own errors. */
int verb_check_limits(int argc, char *argv[]);
int verb_check_profile(int argc, char *argv[]);
int verb_audit(int argc, char *argv[]);
/* The verbs that talk to needled over D-Bus (tools/cmd-manager.c, cmd-pen.c, cmd-sim.c,
 * cmd-watch.c, cmd-record.c). */
int verb_list(int argc, char *argv[]);
int verb_status(int argc, char *argv[]);
int verb_profiles(int argc, char *argv[]);
int verb_validate(int argc, char *argv[]);
int verb_limits(int argc, char *argv[]);
int verb_reload_limits(int argc, char *argv[]);
int verb_history(int argc, char *argv[]);
int verb_export(int argc, char *argv[]);
int verb_cartridge(int argc, char *argv[]);
int verb_arm(int argc, char *argv[]);
int verb_start(int argc, char *argv[]);
int verb_run(int argc, char *argv[]);
int verb_pause(int argc, char *argv[]);
int verb_resume(int argc, char *argv[]);
int verb_stop(int argc, char *argv[]);
int verb_set_depth(int argc, char *argv[]);
int verb_set_speed(int argc, char *argv[]);
int verb_clear_fault(int argc, char *argv[]);
int verb_watch(int argc, char *argv[]);
int verb_record(int argc, char *argv[]);
int verb_sim(int argc, char *argv[]);
