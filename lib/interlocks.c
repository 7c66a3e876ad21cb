/* interlocks.c: the safety decisions (interlocks.h): pure, no I/O, fail closed. */
#include <assert.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "interlocks.h"
#include "util.h"

static const char *const nd_interlock_verdict_table[_ND_INTERLOCK_VERDICT_MAX] = {
        [ND_INTERLOCK_NONE] = "none",
        [ND_INTERLOCK_WARN] = "warn",
        [ND_INTERLOCK_TRIP] = "trip",
        [ND_INTERLOCK_COMPLETE] = "complete",
};

static const char *const nd_interlock_phase_table[_ND_INTERLOCK_PHASE_MAX] = {
        [ND_INTERLOCK_PHASE_IDLE] = "idle",
        [ND_INTERLOCK_PHASE_PAUSED] = "paused",
        [ND_INTERLOCK_PHASE_RUNNING] = "running",
};

static const char *const nd_interlock_refusal_table[_ND_INTERLOCK_REFUSAL_MAX] = {
        [ND_INTERLOCK_ALLOWED] = "allowed",
        [ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE] = "limits-unavailable",
        [ND_INTERLOCK_REFUSE_FAULT] = "fault",
        [ND_INTERLOCK_REFUSE_WRONG_STATE] = "wrong-state",
        [ND_INTERLOCK_REFUSE_NO_CARTRIDGE] = "no-cartridge",
        [ND_INTERLOCK_REFUSE_INVALID_PROFILE] = "invalid-profile",
        [ND_INTERLOCK_REFUSE_CARTRIDGE_REJECTED] = "cartridge-rejected",
        [ND_INTERLOCK_REFUSE_CARTRIDGE_SPENT] = "cartridge-spent",
        [ND_INTERLOCK_REFUSE_LOW_BATTERY] = "low-battery",
        [ND_INTERLOCK_REFUSE_OVER_TEMPERATURE] = "over-temperature",
};

DEFINE_STRING_TABLE_TO_STRING(nd_interlock_verdict, nd_interlock_verdict)
DEFINE_STRING_TABLE_TO_STRING(nd_interlock_phase, nd_interlock_phase)
DEFINE_STRING_TABLE_TO_STRING(nd_interlock_refusal, nd_interlock_refusal)

bool nd_interlock_clock_reached(uint32_t ts, uint32_t from_ts) {
        return (int32_t) (ts - from_ts) >= 0;
}

void nd_interlock_settle_begin(nd_interlock_session *ss) {
        assert(ss);
        ss->settle_known = false;
}

void nd_interlock_settle_from(nd_interlock_session *ss, uint32_t change_ts) {
        assert(ss);
        ss->depth_check_from_ts = change_ts + ND_INTERLOCK_DEPTH_SETTLE_US;
        ss->stall_check_from_ts = change_ts + ND_INTERLOCK_SPINUP_GRACE_US;
        ss->settle_known = true;
}

unsigned nd_interlock_warnings(const nd_limits *limits, bool have_sample, double temperature_c,
                               uint32_t battery_percent) {
        unsigned w = 0;
        if (!limits || !have_sample)
                return 0;
        if (temperature_c >= limits->pen.warn_temperature_c)
                w |= ND_INTERLOCK_WARN_HIGH_TEMPERATURE;
        if (battery_percent < limits->pen.min_battery_percent)
                w |= ND_INTERLOCK_WARN_LOW_BATTERY;
        return w;
}

_printf_(3, 4)
static nd_interlock_verdict trip(nd_interlock_result *ret, const char *code, const char *fmt, ...) {
        va_list ap;
        ret->code = code;
        va_start(ap, fmt);
        vsnprintf(ret->message, sizeof ret->message, fmt, ap);
        va_end(ap);
        return ND_INTERLOCK_TRIP;
}

static void result_init(nd_interlock_result *ret) {
        ret->code = NULL;
        ret->warnings = 0;
        ret->message[0] = '\0';
}

const char *nd_interlock_pen_fault_code(uint8_t pen_faults) {
        for (unsigned bit = 1; bit <= ND_PROTO_FAULT_ALL; bit <<= 1)
                if (pen_faults & bit)
                        return nd_proto_fault_name((uint8_t) bit);
        return NULL;
}

bool nd_interlock_clear_at_connect(uint8_t pen_faults, bool motor_running) {
        return pen_faults == ND_PROTO_FAULT_WATCHDOG_EXPIRED && !motor_running;
}

bool nd_interlock_clear_settling(const nd_limits *l, bool clean_sample_seen, uint64_t since_clear_us) {
        if (since_clear_us < ND_INTERLOCK_CLEAR_GRACE_US)
                return true;
        uint64_t bound_us = l ? (uint64_t) l->pen.heartbeat_timeout_ms * 1000u : 0;
        return !clean_sample_seen && since_clear_us < bound_us;
}

nd_interlock_verdict nd_interlock_check_sample(const nd_limits *l, const nd_interlock_input *in,
                                               const nd_proto_sample *s, uint64_t device_time_us,
                                               nd_interlock_session *ss, nd_interlock_result *ret) {
        assert(in && s && ss && ret);
        assert((size_t) in->phase < _ND_INTERLOCK_PHASE_MAX);
        result_init(ret);

        /* The pen's own latched faults count in every phase, limits or not. */
        if (s->faults) {
                const char *code = nd_interlock_pen_fault_code(s->faults);
                return trip(ret, code ? code : "pen-fault", "the pen reports fault bits 0x%02x", s->faults);
        }
        /* Without limits a session trips; an idle pen has no motor to stop, and nothing can arm
         * or start it (nd_interlock_may_arm/_start refuse), so it stays as it is. */
        if (!l)
                return in->phase == ND_INTERLOCK_PHASE_IDLE ? ND_INTERLOCK_NONE
                                                            : trip(ret, ND_INTERLOCK_CODE_NO_LIMITS, "no limits are in force");
        ret->warnings = nd_interlock_warnings(l, true, s->temperature_c, s->battery_percent);
        if (in->phase == ND_INTERLOCK_PHASE_IDLE)
                return ret->warnings ? ND_INTERLOCK_WARN : ND_INTERLOCK_NONE;
        if (s->battery_percent < l->pen.stop_battery_percent)
                return trip(ret, "low-battery", "battery %u %% is below the %u %% cut-off", s->battery_percent,
                            l->pen.stop_battery_percent);
        if (in->phase != ND_INTERLOCK_PHASE_RUNNING)
                return ret->warnings ? ND_INTERLOCK_WARN : ND_INTERLOCK_NONE;
        if (s->temperature_c > l->pen.max_temperature_c)
                return trip(ret, "over-temperature", "handpiece temperature %.2f °C is above the %.2f °C maximum",
                            s->temperature_c, l->pen.max_temperature_c);
        if (s->current_ma > l->pen.max_current_ma)
                return trip(ret, "over-current", "motor current %.0f mA is above the %.0f mA maximum", s->current_ma,
                            l->pen.max_current_ma);

        bool spinning_up = !ss->settle_known || !nd_interlock_clock_reached(s->timestamp_us, ss->stall_check_from_ts);
        if (!spinning_up && s->speed_hz < l->pen.stall_speed_fraction * in->set_speed_hz) {
                /* 0 means "speed fine": a stall that begins at device time 0 is timed from 1 µs. */
                if (ss->stall_since_us == 0)
                        ss->stall_since_us = device_time_us ? device_time_us : 1;
                else if (device_time_us - ss->stall_since_us >= (uint64_t) l->pen.stall_time_ms * USEC_PER_MSEC)
                        return trip(ret, "motor-stall", "speed %.1f Hz has been below %.0f %% of the %.1f Hz set for %u ms",
                                    s->speed_hz, l->pen.stall_speed_fraction * 100.0, in->set_speed_hz,
                                    l->pen.stall_time_ms);
        } else
                ss->stall_since_us = 0;

        if (ss->settle_known && nd_interlock_clock_reached(s->timestamp_us, ss->depth_check_from_ts) &&
            fabs(s->depth_mm - in->set_depth_mm) > l->pen.depth_tolerance_mm)
                return trip(ret, "depth-deviation", "measured depth %.3f mm differs from the %.3f mm set by more than %.3f mm",
                            s->depth_mm, in->set_depth_mm, l->pen.depth_tolerance_mm);
        if (nd_interlock_cartridge_runtime_used_up(l, in->cartridge_runtime_s))
                return trip(ret, "cartridge-expired", "cartridge %s reached its %u s runtime limit",
                            strempty(in->cartridge_id), l->cartridge.max_runtime_s);
        return ret->warnings ? ND_INTERLOCK_WARN : ND_INTERLOCK_NONE;
}

nd_interlock_verdict nd_interlock_check_duration(const nd_limits *l, const char *area, double profile_duration_s,
                                                 double elapsed_s, nd_interlock_result *ret) {
        assert(ret);
        result_init(ret);
        if (!l)
                return trip(ret, ND_INTERLOCK_CODE_NO_LIMITS, "no limits are in force");
        const nd_area_limits *a = area ? nd_limits_find_area(l, area) : NULL;
        double limit_s = a ? (double) nd_limits_area_max_duration_s(l, a) : (double) l->session.max_duration_s;
        if (elapsed_s >= profile_duration_s)
                return ND_INTERLOCK_COMPLETE;
        if (elapsed_s >= limit_s)
                return trip(ret, "session-duration", "the session reached the %.0f s maximum of the limits", limit_s);
        return ND_INTERLOCK_NONE;
}

bool nd_interlock_needles_allowed(const nd_limits *l, uint32_t needles) {
        if (!l)
                return false;
        for (size_t i = 0; i < l->cartridge.n_allowed_needles; i++)
                if (l->cartridge.allowed_needles[i] == needles)
                        return true;
        return false;
}

bool nd_interlock_cartridge_runtime_used_up(const nd_limits *l, double runtime_s) {
        if (!l)
                return true;
        return l->cartridge.max_runtime_s > 0 && runtime_s >= (double) l->cartridge.max_runtime_s;
}

static bool in_fault(const nd_interlock_pen *pen) {
        return pen->in_fault || pen->pen_faults != 0;
}

nd_interlock_refusal nd_interlock_may_arm(const nd_limits *l, const nd_interlock_pen *pen) {
        assert(pen);
        if (in_fault(pen))
                return ND_INTERLOCK_REFUSE_FAULT;
        if (pen->busy)
                return ND_INTERLOCK_REFUSE_WRONG_STATE;
        if (!l)
                return ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE;
        return ND_INTERLOCK_ALLOWED;
}

nd_interlock_refusal nd_interlock_may_start(const nd_limits *l, const nd_interlock_pen *pen) {
        assert(pen);
        if (!l)
                return ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE;
        if (in_fault(pen))
                return ND_INTERLOCK_REFUSE_FAULT;
        if (!pen->armed || pen->busy)
                return ND_INTERLOCK_REFUSE_WRONG_STATE;
        if (!pen->cartridge_present)
                return ND_INTERLOCK_REFUSE_NO_CARTRIDGE;
        if (!pen->profile_valid)
                return ND_INTERLOCK_REFUSE_INVALID_PROFILE;
        if (pen->cartridge_rejected)
                return ND_INTERLOCK_REFUSE_CARTRIDGE_REJECTED;
        if (pen->cartridge_spent)
                return ND_INTERLOCK_REFUSE_CARTRIDGE_SPENT;
        if (pen->battery_percent < l->pen.min_battery_percent)
                return ND_INTERLOCK_REFUSE_LOW_BATTERY;
        return ND_INTERLOCK_ALLOWED;
}

nd_interlock_refusal nd_interlock_may_resume(const nd_limits *l, const nd_interlock_pen *pen) {
        assert(pen);
        if (!l)
                return ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE;
        if (pen->battery_percent < l->pen.min_battery_percent)
                return ND_INTERLOCK_REFUSE_LOW_BATTERY;
        if (pen->temperature_c > l->pen.max_temperature_c)
                return ND_INTERLOCK_REFUSE_OVER_TEMPERATURE;
        return ND_INTERLOCK_ALLOWED;
}

bool nd_interlock_may_clear_fault(const nd_limits *l, const nd_interlock_pen *pen, char *why, size_t size) {
        assert(pen && why && size > 0);
        if (!l) {
                snprintf(why, size, "no limits are in force");
                return false;
        }
        uint64_t timeout_us = (uint64_t) l->pen.heartbeat_timeout_ms * USEC_PER_MSEC;
        if (!pen->have_sample || pen->silent_us > timeout_us) {
                snprintf(why, size, "no telemetry from the pen for %.1f s", (double) pen->silent_us / (double) USEC_PER_SEC);
                return false;
        }
        /* An over-temperature clears only once the handpiece is below the warning level, so
         * noise around the maximum cannot clear it. */
        bool was_hot = pen->fault && STREQ(pen->fault, "over-temperature");
        double cool_c = was_hot ? l->pen.warn_temperature_c : l->pen.max_temperature_c;
        if (pen->temperature_c >= cool_c) {
                snprintf(why, size, "the handpiece is still at %.1f °C (it must be below %.1f °C)", pen->temperature_c,
                         cool_c);
                return false;
        }
        if (pen->battery_percent < l->pen.stop_battery_percent) {
                snprintf(why, size, "the battery is still at %u %% (cut-off %u %%)", pen->battery_percent,
                         l->pen.stop_battery_percent);
                return false;
        }
        return true;
}
