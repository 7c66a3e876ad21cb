/* bouncer.c: method -> polkit action table and asynchronous, time-bounded checks. */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bouncer.h"
#include "log.h"
#include "util.h"

#define POLKIT_BUS_NAME   "org.freedesktop.PolicyKit1"
#define POLKIT_OBJECT     "/org/freedesktop/PolicyKit1/Authority"
#define POLKIT_INTERFACE  "org.freedesktop.PolicyKit1.Authority"
/* CheckAuthorization flags: AllowUserInteraction. */
#define POLKIT_CHECK_ALLOW_INTERACTION 1u

#define ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"

typedef struct method_action {
        const char *interface;
        const char *member;
        const char *action; /* "" = no authorization needed */
} method_action;

/* Every method of API v1. Stop and the read-only informational calls need no authorization:
 * stopping must never be blocked, and the rest changes nothing. */
static const method_action method_actions[] = {
        { ND_MANAGER_INTERFACE, "GetLimits",        "" },
        { ND_MANAGER_INTERFACE, "ReloadLimits",     ND_ACTION_CONFIGURE },
        { ND_MANAGER_INTERFACE, "ValidateProfile",  "" },
        { ND_MANAGER_INTERFACE, "GetProfiles",      "" },
        { ND_MANAGER_INTERFACE, "GetHistory",       ND_ACTION_READ_HISTORY },
        { ND_MANAGER_INTERFACE, "GetCartridge",     "" },
        { ND_MANAGER_INTERFACE, "FindPen",          "" },
        { ND_PEN_INTERFACE,     "LoadProfile",      ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "LoadProfileData",  ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "Start",            ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "Pause",            ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "Resume",           ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "SetDepth",         ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "SetSpeed",         ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "Heartbeat",        ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "ClearFault",       ND_ACTION_OPERATE },
        { ND_PEN_INTERFACE,     "Stop",             "" },
        { ND_PEN_INTERFACE,     "OpenTelemetry",    "" },
        { ND_PEN_INTERFACE,     "OpenTelemetryPipe", "" },
        { ND_PEN_INTERFACE,     "WatchTelemetry",   "" },
        { ND_PEN_INTERFACE,     "UnwatchTelemetry", "" },
        /* The simulator exists only when asked for on the command line (a development tool). */
        { ND_SIM_INTERFACE,     "AddPen",           "" },
        { ND_SIM_INTERFACE,     "RemovePen",        "" },
        { ND_SIM_INTERFACE,     "InsertCartridge",  "" },
        { ND_SIM_INTERFACE,     "EjectCartridge",   "" },
        { ND_SIM_INTERFACE,     "SetBattery",       "" },
        { ND_SIM_INTERFACE,     "InjectFault",      "" },
        { ND_SIM_INTERFACE,     "GetPenCounters",   "" },
};

typedef struct auth_request auth_request;

struct nd_bouncer {
        sd_bus *bus;
        nd_auth_mode mode;
        uint64_t timeout_usec;
        uint64_t interactive_timeout_usec;
        auth_request *requests; /* in flight, doubly linked */
        unsigned n_requests;
};

struct auth_request {
        nd_bouncer *bouncer;
        auth_request *prev, *next;
        sd_bus_message *call;  /* the caller's method call */
        sd_bus_slot *slot;     /* our question to polkit or to the bus driver */
        sd_event_source *defer; /* a verdict reached at once, answered from the loop */
        bool allow_at_once;
        const char *action;    /* NULL when the method is not mapped */
        bool interactive;
        uint32_t uid, pid;     /* the caller's, from the bus driver */
        nd_auth_done_fn done;
        void *userdata;
};

const char *nd_bouncer_action_for(const char *interface, const char *member) {
        if (!interface || !member)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(method_actions); i++)
                if (STREQ(method_actions[i].interface, interface) && STREQ(method_actions[i].member, member))
                        return method_actions[i].action;
        return NULL;
}

bool nd_bouncer_table_entry(size_t i, const char **interface, const char **member, const char **action) {
        if (i >= ELEMENTSOF(method_actions))
                return false;
        *interface = method_actions[i].interface;
        *member = method_actions[i].member;
        *action = method_actions[i].action;
        return true;
}

int nd_bouncer_dispatch(nd_bouncer *b, sd_bus_message *m, const nd_method *methods, size_t n, void *object,
                        void *cont_userdata, sd_bus_error *error) {
        assert(b && m && methods);
        const char *interface = sd_bus_message_get_interface(m), *member = sd_bus_message_get_member(m);
        const char *action = nd_bouncer_action_for(interface, member);
        const nd_method *method = NULL;

        for (size_t i = 0; member && i < n && !method; i++)
                if (STREQ(methods[i].member, member))
                        method = &methods[i];
        /* One of the two, never both, never neither: a table mistake must refuse, not run. */
        if (!action || !method || !method->authorized == !method->unguarded || (method->unguarded && action[0])) {
                nd_log_error("refused %s.%s from %s: %s", strempty(interface), strempty(member),
                             strempty(sd_bus_message_get_sender(m)),
                             !action ? "not in the bouncer's table" : !method ? "no implementation" : "mis-mapped");
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED, "Not authorized to call %s: %s",
                                         strempty(member), "this method is not mapped to any authorization");
        }
        if (method->unguarded)
                return method->unguarded(m, object, error);
        int r = nd_bouncer_check(b, m, method->authorized, cont_userdata);
        if (r < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED, "Could not check authorization: %s",
                                         strerror(-r));
        return 1;
}

int nd_bouncer_new(sd_bus *bus, nd_auth_mode mode, uint64_t timeout_usec,
                   uint64_t interactive_timeout_usec, nd_bouncer **ret) {
        if (!bus || !ret)
                return -EINVAL;
        nd_bouncer *b = calloc(1, sizeof *b);
        if (!b)
                return -ENOMEM;
        b->bus = sd_bus_ref(bus);
        b->mode = mode;
        b->timeout_usec = timeout_usec;
        b->interactive_timeout_usec = interactive_timeout_usec;
        *ret = b;
        return 0;
}

static void request_unlink_free(auth_request *req) {
        nd_bouncer *b = req->bouncer;
        if (req->prev)
                req->prev->next = req->next;
        else
                b->requests = req->next;
        if (req->next)
                req->next->prev = req->prev;
        b->n_requests--;
        sd_bus_slot_unref(req->slot);
        sd_event_source_unref(req->defer);
        sd_bus_message_unref(req->call);
        free(req);
}

nd_bouncer *nd_bouncer_free(nd_bouncer *b) {
        if (!b)
                return NULL;
        while (b->requests)
                request_unlink_free(b->requests);
        sd_bus_unref(b->bus);
        free(b);
        return NULL;
}

unsigned nd_bouncer_pending(const nd_bouncer *b) {
        return b ? b->n_requests : 0;
}

/* Calls the continuation and frees the request. The continuation may free the bouncer's owner
 * objects but not the bouncer itself. */
static void request_finish(auth_request *req, bool allowed, const char *error_name, const char *why) {
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        sd_bus_message *call = sd_bus_message_ref(req->call);
        nd_auth_done_fn done = req->done;
        void *userdata = req->userdata;
        nd_caller caller = { .name = sd_bus_message_get_sender(call), .uid = req->uid, .pid = req->pid };

        if (!allowed)
                sd_bus_error_setf(&error, error_name, "Not authorized to call %s%s%s: %s",
                                  strempty(sd_bus_message_get_member(call)),
                                  req->action && req->action[0] ? " (polkit action " : "",
                                  req->action && req->action[0] ? req->action : "", why);
        nd_log_debug("authorization of %s.%s for %s: %s%s%s",
                     strempty(sd_bus_message_get_interface(call)), strempty(sd_bus_message_get_member(call)),
                     strempty(sd_bus_message_get_sender(call)), allowed ? "allowed" : "denied",
                     allowed ? "" : ": ", allowed ? "" : why);
        request_unlink_free(req);
        done(call, allowed, allowed ? NULL : &error, &caller, userdata);
        sd_bus_message_unref(call);
}

static int polkit_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        auth_request *req = userdata;
        int is_authorized = 0, is_challenge = 0, r;

        if (sd_bus_message_is_method_error(reply, NULL)) {
                const sd_bus_error *e = sd_bus_message_get_error(reply);
                nd_log_warning("polkit did not answer the check of %s: %s: %s", req->action,
                               e ? strempty(e->name) : "?", e ? strempty(e->message) : "?");
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "the authorization service did not answer");
                return 0;
        }
        r = sd_bus_message_enter_container(reply, 'r', "bba{ss}");
        if (r >= 0)
                r = sd_bus_message_read(reply, "bb", &is_authorized, &is_challenge);
        if (r < 0) {
                nd_log_warning("polkit sent a malformed reply to the check of %s: %s", req->action, strerror(-r));
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "the authorization service sent a malformed reply");
                return 0;
        }
        if (is_authorized)
                request_finish(req, true, NULL, NULL);
        else if (is_challenge && !req->interactive)
                /* As the D-Bus specification says: the caller did not allow interaction, and
                 * with interaction it could have been authorized. */
                request_finish(req, false, ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED,
                               "interactive authentication is required; call again allowing interactive authorization");
        else if (is_challenge)
                /* Interaction was allowed and a challenge remains: no authentication agent
                 * could answer it (the contract's InteractiveAuthorizationRequired case). */
                request_finish(req, false, ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED,
                               "interactive authentication is required and no authentication agent answered");
        else
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "polkit said no");
        return 0;
}

static int start_polkit_check(auth_request *req) {
        nd_bouncer *b = req->bouncer;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *q = NULL;
        const char *sender = sd_bus_message_get_sender(req->call);
        int r;

        r = sd_bus_message_new_method_call(b->bus, &q, POLKIT_BUS_NAME, POLKIT_OBJECT, POLKIT_INTERFACE,
                                           "CheckAuthorization");
        if (r < 0)
                return r;
        r = sd_bus_message_append(q, "(sa{sv})s", "system-bus-name", 1, "name", "s", sender, req->action);
        if (r < 0)
                return r;
        r = sd_bus_message_append(q, "a{ss}us", 0, req->interactive ? POLKIT_CHECK_ALLOW_INTERACTION : 0u, "");
        if (r < 0)
                return r;
        return sd_bus_call_async(b->bus, &req->slot, q, polkit_reply, req,
                                 req->interactive ? b->interactive_timeout_usec : b->timeout_usec);
}

/* The caller's uid and pid, from the bus driver's GetConnectionCredentials (asynchronous:
 * dbus-daemon attaches no credentials to messages). Then the verdict: same uid, or polkit. */
static int credentials_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        auth_request *req = userdata;
        int r;

        req->slot = sd_bus_slot_unref(req->slot);
        if (sd_bus_message_is_method_error(reply, NULL)) {
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "the caller's identity could not be determined");
                return 0;
        }
        r = sd_bus_message_enter_container(reply, 'a', "{sv}");
        while (r > 0) {
                const char *key;
                r = sd_bus_message_enter_container(reply, 'e', "sv");
                if (r <= 0)
                        break;
                r = sd_bus_message_read(reply, "s", &key);
                if (r < 0)
                        break;
                if (STREQ(key, "UnixUserID") || STREQ(key, "ProcessID")) {
                        uint32_t v;
                        r = sd_bus_message_read(reply, "v", "u", &v);
                        if (r < 0)
                                break;
                        if (STREQ(key, "UnixUserID"))
                                req->uid = v;
                        else
                                req->pid = v;
                } else if ((r = sd_bus_message_skip(reply, "v")) < 0)
                        break;
                r = sd_bus_message_exit_container(reply);
                if (r >= 0)
                        r = 1;
        }
        if (r < 0 || req->uid == ND_CALLER_UNKNOWN) {
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "the caller's identity could not be determined");
                return 0;
        }

        if (req->bouncer->mode == ND_AUTH_POLKIT) {
                r = start_polkit_check(req);
                if (r < 0)
                        request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "the authorization service could not be asked");
        } else if (req->uid == (uint32_t) geteuid())
                request_finish(req, true, NULL, NULL);
        else
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED,
                               "in development mode (--session) only the daemon's own user is trusted");
        return 0;
}

static int start_credentials_query(auth_request *req) {
        return sd_bus_call_method_async(req->bouncer->bus, &req->slot, "org.freedesktop.DBus",
                                        "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetConnectionCredentials",
                                        credentials_reply, req, "s", sd_bus_message_get_sender(req->call));
}

static int deferred_verdict(sd_event_source *s, void *userdata) {
        auth_request *req = userdata;
        if (req->allow_at_once)
                request_finish(req, true, NULL, NULL);
        else if (!req->action)
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "this method is not mapped to any authorization");
        else
                request_finish(req, false, SD_BUS_ERROR_ACCESS_DENIED, "the call has no sender to authorize");
        return 0;
}

int nd_bouncer_check(nd_bouncer *b, sd_bus_message *m, nd_auth_done_fn done, void *userdata) {
        if (!b || !m || !done)
                return -EINVAL;

        auth_request *req = calloc(1, sizeof *req);
        if (!req)
                return -ENOMEM;
        req->bouncer = b;
        req->call = sd_bus_message_ref(m);
        req->done = done;
        req->userdata = userdata;
        req->action = nd_bouncer_action_for(sd_bus_message_get_interface(m), sd_bus_message_get_member(m));
        req->interactive = sd_bus_message_get_allow_interactive_authorization(m) > 0;
        req->uid = req->pid = ND_CALLER_UNKNOWN;
        req->next = b->requests;
        if (b->requests)
                b->requests->prev = req;
        b->requests = req;
        b->n_requests++;

        int r;
        if (!req->action || req->action[0] == '\0' || !sd_bus_message_get_sender(m)) {
                /* Decided here, but answered from the loop like every other verdict. */
                req->allow_at_once = req->action && req->action[0] == '\0';
                sd_event *e = sd_bus_get_event(b->bus);
                r = e ? sd_event_add_defer(e, &req->defer, deferred_verdict, req) : -ENXIO;
        } else
                r = start_credentials_query(req);
        if (r < 0) {
                request_unlink_free(req);
                return r;
        }
        return 0;
}
