/* history.c: Manager.GetHistory and Manager.GetCartridge, read from the ledger. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bus-int.h"
#include "daemon.h"
#include "errors.h"
#include "pen.h"
#include "util.h"

/* Longest cartridge id GetCartridge accepts (the ledger stores longer names, pens send 32). */

typedef struct history_filter {
        const char *pen;
        uint64_t since_us;
        uint32_t limit;
} history_filter;

static int parse_filter(sd_bus_message *m, history_filter *f, sd_bus_error *error) {
        int r = sd_bus_message_rewind(m, true);
        if (r >= 0)
                r = sd_bus_message_enter_container(m, 'a', "{sv}");
        if (r < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a filter a{sv}");
        while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *key;
                if (sd_bus_message_read(m, "s", &key) < 0)
                        return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed filter");
                if (STREQ(key, "pen")) {
                        if (sd_bus_message_read(m, "v", "s", &f->pen) < 0)
                                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Filter pen must be a string (s)");
                        if (strlen(f->pen) > ND_LEDGER_NAME_MAX)
                                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Filter pen is too long");
                } else if (STREQ(key, "since")) {
                        r = nd_bus_read_variant_uint(m, "Filter since (µs since the epoch)", 0, UINT64_MAX, &f->since_us, error);
                        if (r < 0)
                                return r;
                } else if (STREQ(key, "limit")) {
                        uint64_t limit;
                        r = nd_bus_read_variant_uint(m, "Filter limit", 0, UINT32_MAX, &limit, error);
                        if (r < 0)
                                return r;
                        f->limit = (uint32_t) limit;
                } else {
                        _cleanup_free_ char *shown = nd_text_sanitize(key, strlen(key), 64);
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Unknown filter key '%s' (GetHistory knows pen, since, limit)", strempty(shown));
                }
                if (sd_bus_message_exit_container(m) < 0)
                        return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed filter");
        }
        return r < 0 ? sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Malformed filter") : 0;
}

static int append_session(sd_bus_message *reply, const nd_ledger_session *s) {
        int r = sd_bus_message_open_container(reply, 'a', "{sv}");
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}", "id", "s", s->id, "pen", "s",
                                          strempty(s->pen_serial), "cartridge", "s", strempty(s->cartridge_id), "profile",
                                          "s", strempty(s->profile_name), "profile_digest", "s", strempty(s->profile_digest),
                                          "limits_digest", "s", strempty(s->limits_digest), "label", "s", strempty(s->label));
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}", "owner_uid", "u", s->owner_uid, "owner_pid", "u",
                                          s->owner_pid, "start", "t", s->start_us, "end", "t", s->end_us, "duration_s", "d",
                                          s->stats.duration_s);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}", "strokes", "t", s->stats.strokes,
                                          "max_depth_mm", "d", s->stats.max_depth_mm, "max_speed_hz", "d",
                                          s->stats.max_speed_hz, "max_temperature_c", "d", s->stats.max_temperature_c,
                                          "max_current_ma", "d", s->stats.max_current_ma, "reason", "s", strempty(s->reason),
                                          "needles", "u", s->needles);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

void nd_history_get_history_authorized(sd_bus_message *m, bool allowed, const sd_bus_error *auth_error,
                                       const nd_caller *caller, void *userdata) {
        nd_daemon *d = userdata;
        _cleanup_(sd_bus_error_free) sd_bus_error error = SD_BUS_ERROR_NULL;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        history_filter f = { .limit = 0 };
        nd_ledger_session *sessions = NULL;
        size_t n = 0;
        int r;

        if (!allowed) {
                (void) sd_bus_reply_method_error(m, auth_error);
                return;
        }
        if (parse_filter(m, &f, &error) < 0) {
                (void) sd_bus_reply_method_error(m, &error);
                return;
        }
        if (!d->ledger) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_STORAGE, "The treatment ledger is not available: %s",
                                                  strempty(d->ledger_error));
                return;
        }
        r = nd_ledger_history(d->ledger, f.pen, f.since_us, f.limit, &sessions, &n);
        if (r < 0) {
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_STORAGE, "The ledger could not be read: %s",
                                                  nd_ledger_last_error(d->ledger));
                return;
        }
        r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "a{sv}");
        for (size_t i = 0; r >= 0 && i < n; i++)
                r = append_session(reply, &sessions[i]);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        nd_ledger_session_array_free(sessions, n);
        if (r < 0)
                (void) sd_bus_reply_method_errorf(m, ND_ERROR_INTERNAL, "Could not build the reply: %s", strerror(-r));
        else
                (void) sd_bus_send(NULL, reply, NULL);
}

int nd_history_method_get_cartridge(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        nd_daemon *d = userdata;
        nd_ledger_cartridge c;
        const char *id, *state;
        int r;

        if (sd_bus_message_read(m, "s", &id) < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "Expected a cartridge id");
        if (id[0] == '\0' || strlen(id) > ND_CARTRIDGE_ID_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "A cartridge id has 1 to %u bytes", ND_CARTRIDGE_ID_MAX);
        if (!d->ledger)
                return sd_bus_error_setf(error, ND_ERROR_STORAGE, "The treatment ledger is not available: %s",
                                         strempty(d->ledger_error));
        r = nd_ledger_cartridge_get(d->ledger, id, &c);
        if (r == -ENOENT)
                return sd_bus_reply_method_return(m, "a{sv}", 6, "id", "s", id, "state", "s", "fresh", "first_used", "t",
                                                  UINT64_C(0), "runtime_s", "u", 0u, "sessions", "u", 0u, "needles", "u", 0u);
        if (r < 0)
                return sd_bus_error_setf(error, ND_ERROR_STORAGE, "The ledger could not be read: %s",
                                         nd_ledger_last_error(d->ledger));
        state = nd_ledger_cartridge_state_to_string(c.state);
        if (d->limits && c.state != ND_LEDGER_CARTRIDGE_SPENT) {
                bool allowed = false;
                for (size_t i = 0; i < d->limits->cartridge.n_allowed_needles; i++)
                        allowed = allowed || d->limits->cartridge.allowed_needles[i] == c.needles;
                if (!allowed)
                        state = "rejected";
        }
        return sd_bus_reply_method_return(m, "a{sv}", 6, "id", "s", c.id, "state", "s", state, "first_used", "t",
                                          c.first_used_us, "runtime_s", "u", (uint32_t) c.runtime_s, "sessions", "u",
                                          (uint32_t) MIN(c.sessions, (uint64_t) UINT32_MAX), "needles", "u", c.needles);
}
