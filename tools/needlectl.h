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

/* The offline verbs take argv with argv[0] the verb's name; they print their own errors. */
int verb_check_limits(int argc, char *argv[]);
int verb_check_profile(int argc, char *argv[]);
int verb_audit(int argc, char *argv[]);

/* The verbs that talk to needled over D-Bus (tools/cmd-manager.c, cmd-pen.c, cmd-sim.c,
 * cmd-watch.c, cmd-record.c): each has its syntax (options, usage, checks) and is run by
 * ctl_verb_dispatch() from the verb table in needlectl.c, which holds its argument counts
 * and whether it needs the bus. They print their own errors and return the exit code. */
struct ctl_invocation;
struct ctl_verb_syntax;
#define CTL_VERB(name)                                                  \
        extern const struct ctl_verb_syntax ctl_syntax_##name;        \
        int verb_##name(struct ctl_invocation *inv)
CTL_VERB(list);
CTL_VERB(status);
CTL_VERB(profiles);
CTL_VERB(validate);
CTL_VERB(limits);
CTL_VERB(reload_limits);
CTL_VERB(history);
CTL_VERB(export);
CTL_VERB(cartridge);
CTL_VERB(arm);
CTL_VERB(start);
CTL_VERB(run);
CTL_VERB(stop);
CTL_VERB(watch);
CTL_VERB(record);
CTL_VERB(sim);
/* pause, resume, clear-fault: one method of the pen, named by inv->verb->name. */
extern const struct ctl_verb_syntax ctl_syntax_pause, ctl_syntax_resume, ctl_syntax_clear_fault;
int verb_simple(struct ctl_invocation *inv);
/* set-depth, set-speed. */
extern const struct ctl_verb_syntax ctl_syntax_set_depth, ctl_syntax_set_speed;
int verb_setter(struct ctl_invocation *inv);
