/* bouncer.h: the one place that decides who may call what. Every method of the API is mapped to
 * its polkit action (or to "no authorization"); anything unmapped is denied. Checks are
 * asynchronous and bounded in time: a missing, slow or hanging polkit means "denied". */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-bus.h>

#include "contract.h"   /* ND_ACTION_*: the polkit actions */

typedef enum nd_auth_mode {
        ND_AUTH_POLKIT,   /* system bus: ask polkit's CheckAuthorization */
        ND_AUTH_SAME_UID, /* development (--session): trust callers with the daemon's own uid */
} nd_auth_mode;

typedef struct nd_bouncer nd_bouncer;

#define ND_CALLER_UNKNOWN UINT32_MAX

/* Who called, as the bus driver vouches for it (ND_CALLER_UNKNOWN where it could not say). */
typedef struct nd_caller {
        const char *name;   /* unique bus name */
        uint32_t uid;
        uint32_t pid;
} nd_caller;

/* Called once per check, from the event loop. allowed is true, or false with error set to
 * AccessDenied / InteractiveAuthorizationRequired and a message naming the action. m is the
 * caller's method call (a reference is held until the callback returns); caller is valid
 * during the call. */
typedef void (*nd_auth_done_fn)(sd_bus_message *m, bool allowed, const sd_bus_error *error,
                                const nd_caller *caller, void *userdata);

/* Creates a bouncer on bus. timeout_usec bounds a non-interactive polkit check; an interactive
 * one (the caller allowed it) may take interactive_timeout_usec (a person types a password). */
int nd_bouncer_new(sd_bus *bus, nd_auth_mode mode, uint64_t timeout_usec,
                   uint64_t interactive_timeout_usec, nd_bouncer **ret);

/* Frees the bouncer; checks in flight are dropped without calling their callbacks. */
nd_bouncer *nd_bouncer_free(nd_bouncer *b);

/* The action that guards interface.member: a polkit action id, "" when the method needs no
 * authorization, NULL when the method is not mapped (and so is always denied). Static. */
const char *nd_bouncer_action_for(const char *interface, const char *member);

/* One method behind the bouncer: exactly one of the two is set. authorized runs once the
 * bouncer's verdict is in (allowed or not: it replies either way) with cont_userdata. unguarded
 * runs at once with the object's userdata, as an sd-bus handler; only a method the table maps to
 * no authorization may have one (anything else is refused). */
typedef struct nd_method {
        const char *member;
        nd_auth_done_fn authorized;
        sd_bus_message_handler_t unguarded;
} nd_method;

/* The only way into a method: every vtable method entry points at a handler that calls this. m's
 * member is looked up in methods (n entries) and in the bouncer's table; a method missing from
 * either is refused with AccessDenied, as is an unguarded method the table says needs
 * authorization. Returns what an sd-bus method handler returns. */
int nd_bouncer_dispatch(nd_bouncer *b, sd_bus_message *m, const nd_method *methods, size_t n, void *object,
                        void *cont_userdata, sd_bus_error *error);

/* Entry i of the bouncer's table (interface, member, action: "" for none); false past the end.
 * For the test that compares the table with dbus/org.needled1.xml. */
bool nd_bouncer_table_entry(size_t i, const char **interface, const char **member, const char **action);

/* Starts the check of m's sender for m's method. done is called later from the loop, never
 * from within this call. Returns 0, or -errno when the check could not even start. */
int nd_bouncer_check(nd_bouncer *b, sd_bus_message *m, nd_auth_done_fn done, void *userdata);

/* Number of checks in flight (for tests and shutdown). */
unsigned nd_bouncer_pending(const nd_bouncer *b);
