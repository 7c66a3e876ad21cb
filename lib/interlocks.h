/* interlocks.h: the safety decisions of a treatment as pure functions of the limits in force, the
 * set points, the session's interlock state, a telemetry sample and times. No bus, no ledger, no
 * globals: the daemon acts on the verdict (motor stop, fault, refusal). Every decision fails
 * closed: with no limits in force a sample trips, a session ends, nothing arms, starts, resumes
 * or clears a fault. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "protocol.h"
#include "safety-limits.h"

/* After the depth set point changes (or the motor starts), the needle needs this long on the
 * pen's clock to get there before a difference between set and measured depth is a fault. */
#define ND_INTERLOCK_DEPTH_SETTLE_US 150000u
/* After a motor start or a speed change the motor needs this long to reach its speed: below
 * the stall fraction during this time is spin-up, not a stall (then stall_time_ms applies). */
#define ND_INTERLOCK_SPINUP_GRACE_US 300000u
/* Room for the message of a verdict, with its terminating NUL. */
#define ND_INTERLOCK_MESSAGE_SIZE 192u

/* The fault code when no limits are in force (fail closed). */
#define ND_INTERLOCK_CODE_NO_LIMITS "limits-unavailable"

typedef enum nd_interlock_verdict {
        ND_INTERLOCK_NONE,      /* nothing to do */
        ND_INTERLOCK_WARN,      /* no trip, but a warning applies (result.warnings) */
        ND_INTERLOCK_TRIP,      /* stop the motor now: result.code, result.message */
        ND_INTERLOCK_COMPLETE,  /* the session's time is up (duration only): a normal end */
        _ND_INTERLOCK_VERDICT_MAX,
} nd_interlock_verdict;

/* Warnings (bit set), as the Warnings property lists them. */
typedef enum nd_interlock_warning {
        ND_INTERLOCK_WARN_HIGH_TEMPERATURE = 1u << 0,  /* "high-temperature" */
        ND_INTERLOCK_WARN_LOW_BATTERY      = 1u << 1,  /* "low-battery" */
} nd_interlock_warning;

typedef struct nd_interlock_result {
        const char *code;       /* the fault code of a trip (static), NULL otherwise */
        unsigned warnings;      /* nd_interlock_warning bits */
        char message[ND_INTERLOCK_MESSAGE_SIZE]; /* why, for a person; "" when nothing */
} nd_interlock_result;

/* What the interlocks keep between the samples of one session. Zero-initialised: the settle
 * time of the motor start is not known yet. */
typedef struct nd_interlock_session {
        bool settle_known;            /* the pen said when the last change took effect */
        uint32_t depth_check_from_ts; /* pen clock (32-bit, wraps): depth checked from here on */
        uint32_t stall_check_from_ts; /* pen clock: the stall check from here on (spin-up grace) */
        uint64_t stall_since_us;      /* extended device time the speed fell below; 0: fine */
} nd_interlock_session;

/* Where the pen is, as far as the sample checks go. */
typedef enum nd_interlock_phase {
        ND_INTERLOCK_PHASE_IDLE,      /* no session (idle or armed): the pen's fault bits only */
        ND_INTERLOCK_PHASE_PAUSED,    /* a session, motor stopped: fault bits and battery cut-off */
        ND_INTERLOCK_PHASE_RUNNING,   /* a session, motor running: every check */
        _ND_INTERLOCK_PHASE_MAX,
} nd_interlock_phase;

/* The session's figures a sample is judged against. */
typedef struct nd_interlock_input {
        nd_interlock_phase phase;
        double set_depth_mm, set_speed_hz;   /* the set points in force on the pen */
        double cartridge_runtime_s;          /* the cartridge's runtime including this session */
        const char *cartridge_id;            /* for messages; NULL is fine */
} nd_interlock_input;

/* The kebab name of a verdict / phase (static; NULL out of range: DEFINE_STRING_TABLE_TO_STRING). */
const char *nd_interlock_verdict_to_string(nd_interlock_verdict v);
const char *nd_interlock_phase_to_string(nd_interlock_phase p);

/* Whether ts has reached from_ts on the pen's 32-bit µs clock, across its wrap (the two are
 * less than 2^31 µs, ~35 min, apart). */
bool nd_interlock_clock_reached(uint32_t ts, uint32_t from_ts);

/* A depth or speed change (or a motor start) was acknowledged: depth and stall checks pause
 * until nd_interlock_settle_from() says when it took effect. */
void nd_interlock_settle_begin(nd_interlock_session *ss);
/* The change took effect at change_ts on the pen's clock: the depth check resumes after the
 * settle time, the stall check after the spin-up grace; a stall being timed starts over. */
void nd_interlock_settle_from(nd_interlock_session *ss, uint32_t change_ts);

/* The Warnings of the latest reading (nd_interlock_warning bits); none without limits or a
 * reading. */
unsigned nd_interlock_warnings(const nd_limits *limits, bool have_sample, double temperature_c,
                               uint32_t battery_percent);

/* Judges one sample: TRIP (code and message in *ret), WARN or NONE. device_time_us is the
 * sample's extended device time (for stall timing); ss is updated (stall timing). Precedence:
 * the pen's fault bits (lowest bit first), battery cut-off, then while running temperature,
 * current, stall, depth deviation, cartridge runtime. No limits: TRIP (limits-unavailable) in
 * a session; idle, only the pen's fault bits count. */
nd_interlock_verdict nd_interlock_check_sample(const nd_limits *limits, const nd_interlock_input *in,
                                               const nd_proto_sample *s, uint64_t device_time_us,
                                               nd_interlock_session *ss, nd_interlock_result *ret);

/* The session's time: COMPLETE at the profile's duration, TRIP (session-duration) at the
 * limits' maximum for area (NULL or unknown: session.max_duration_s), else NONE. No limits:
 * TRIP (limits-unavailable). */
nd_interlock_verdict nd_interlock_check_duration(const nd_limits *limits, const char *area, double profile_duration_s,
                                                 double elapsed_s, nd_interlock_result *ret);

/* Whether the limits allow a cartridge with this many needles (false without limits). */
bool nd_interlock_needles_allowed(const nd_limits *limits, uint32_t needles);
/* Whether a cartridge with runtime_s of use has used up the limits' runtime (true without limits). */
bool nd_interlock_cartridge_runtime_used_up(const nd_limits *limits, double runtime_s);

/* The latest reading of a pen, for fault clearing and the arm/start/resume preconditions. */
typedef struct nd_interlock_pen {
        bool in_fault;               /* the daemon holds the pen in fault */
        const char *fault;           /* its code, or NULL */
        uint8_t pen_faults;          /* fault bits the pen itself reports latched (ND_PROTO_FAULT_*) */
        bool armed;                  /* a profile is armed and the pen is in state armed */
        bool busy;                   /* a session is in progress or starting */
        bool cartridge_present;
        bool cartridge_rejected;     /* needles not allowed (nd_interlock_needles_allowed) */
        bool cartridge_spent;        /* single use spent or runtime used up */
        bool profile_valid;          /* the armed profile still passes the limits and the pen */
        bool have_sample;
        uint64_t silent_us;          /* since the latest telemetry sample */
        double temperature_c;
        uint32_t battery_percent;
} nd_interlock_pen;

/* Why an operation is refused; each maps to one named D-Bus error in the daemon. */
typedef enum nd_interlock_refusal {
        ND_INTERLOCK_ALLOWED,
        ND_INTERLOCK_REFUSE_LIMITS_UNAVAILABLE,
        ND_INTERLOCK_REFUSE_FAULT,
        ND_INTERLOCK_REFUSE_WRONG_STATE,
        ND_INTERLOCK_REFUSE_NO_CARTRIDGE,
        ND_INTERLOCK_REFUSE_INVALID_PROFILE,
        ND_INTERLOCK_REFUSE_CARTRIDGE_REJECTED,
        ND_INTERLOCK_REFUSE_CARTRIDGE_SPENT,
        ND_INTERLOCK_REFUSE_LOW_BATTERY,
        ND_INTERLOCK_REFUSE_OVER_TEMPERATURE,
        _ND_INTERLOCK_REFUSAL_MAX,
} nd_interlock_refusal;

/* The kebab name of a refusal (static; NULL out of range). */
const char *nd_interlock_refusal_to_string(nd_interlock_refusal r);

/* The pen's own latched fault code (lowest fault bit first; static), NULL when none. */
const char *nd_interlock_pen_fault_code(uint8_t pen_faults);

/* Whether the daemon clears, by itself, what a pen that has just connected reports latched: only
 * WATCHDOG_EXPIRED alone, with the motor stopped. That bit is the trace of a host that went away
 * (a daemon killed or restarted, a cable pulled) while the motor ran; the pen stopped its motor,
 * and the session was closed and recorded then (device-lost, daemon-restart). Any other bit is a
 * condition of the pen itself, which an operator must see and clear. */
bool nd_interlock_clear_at_connect(uint8_t pen_faults, bool motor_running);

/* After the pen confirmed a CLEAR_FAULTS, the samples it measured before still carry the cleared
 * bits: they are the pen's queue catching up, not a new fault. Whether a sample since_clear_us
 * after the confirmation is still in that window: always within ND_INTERLOCK_CLEAR_GRACE_US;
 * after it, until the first sample without fault bits (clean_sample_seen), and never longer than
 * the limits' heartbeat timeout (a pen whose fault came back at once trips again). */
#define ND_INTERLOCK_CLEAR_GRACE_US 100000u
bool nd_interlock_clear_settling(const nd_limits *limits, bool clean_sample_seen, uint64_t since_clear_us);

/* Whether a profile may be armed: not in fault (the daemon's or the pen's own), not busy,
 * limits in force. */
nd_interlock_refusal nd_interlock_may_arm(const nd_limits *limits, const nd_interlock_pen *pen);
/* Whether the armed profile may start: limits, fault, armed, cartridge, profile, cartridge
 * state, battery, in that order (the first that fails is the answer). */
nd_interlock_refusal nd_interlock_may_start(const nd_limits *limits, const nd_interlock_pen *pen);
/* Whether a paused session may resume: limits, battery, temperature. */
nd_interlock_refusal nd_interlock_may_resume(const nd_limits *limits, const nd_interlock_pen *pen);

/* Whether the condition behind the daemon's fault is gone, judged on the latest reading: fresh
 * telemetry (within the heartbeat timeout), the handpiece below the maximum temperature (below
 * the warning level after an over-temperature: hysteresis), the battery at or above the cut-off.
 * When not, why (size bytes) says what remains. No limits: false. */
bool nd_interlock_may_clear_fault(const nd_limits *limits, const nd_interlock_pen *pen, char *why, size_t size);
